#include "server/src/store/record_codec.h"

#include <openssl/sha.h>

#include <cstdint>
#include <limits>
#include <map>
#include <optional>
#include <string>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "google/protobuf/descriptor.h"
#include "google/protobuf/message.h"
#include "google/protobuf/unknown_field_set.h"
#include "server/src/common/status_macros.h"
#include "tokenbroker/storage/v1/records.pb.h"

namespace tb::store {
namespace {

namespace pb = ::tokenbroker::storage::v1;

constexpr int64_t kPastUs = std::numeric_limits<int64_t>::min();
constexpr int64_t kFutureUs = std::numeric_limits<int64_t>::max();

// Microseconds keep every time a provider or our clock produces that matters; the infinities
// get sentinels because absl::FromUnixMicros(INT64_MIN) is a finite time.
int64_t ToUs(absl::Time t) {
  if (t == absl::InfinitePast()) {
    return kPastUs;
  }
  if (t == absl::InfiniteFuture()) {
    return kFutureUs;
  }
  return absl::ToUnixMicros(t);
}

absl::Time FromUs(int64_t us) {
  if (us == kPastUs) {
    return absl::InfinitePast();
  }
  if (us == kFutureUs) {
    return absl::InfiniteFuture();
  }
  return absl::FromUnixMicros(us);
}

int64_t ToMs(absl::Time t) { return absl::ToUnixMillis(t); }  // saturates at the infinities

pb::ConnectionStatus ToProto(core::ConnectionStatus s) {
  switch (s) {
    case core::ConnectionStatus::kPending:
      return pb::CONNECTION_STATUS_PENDING;
    case core::ConnectionStatus::kActive:
      return pb::CONNECTION_STATUS_ACTIVE;
    case core::ConnectionStatus::kNeedsReauth:
      return pb::CONNECTION_STATUS_NEEDS_REAUTH;
    case core::ConnectionStatus::kRevoked:
      return pb::CONNECTION_STATUS_REVOKED;
  }
  return pb::CONNECTION_STATUS_UNSPECIFIED;
}

std::optional<core::ConnectionStatus> FromProto(pb::ConnectionStatus s) {
  switch (s) {
    case pb::CONNECTION_STATUS_PENDING:
      return core::ConnectionStatus::kPending;
    case pb::CONNECTION_STATUS_ACTIVE:
      return core::ConnectionStatus::kActive;
    case pb::CONNECTION_STATUS_NEEDS_REAUTH:
      return core::ConnectionStatus::kNeedsReauth;
    case pb::CONNECTION_STATUS_REVOKED:
      return core::ConnectionStatus::kRevoked;
    default:
      return std::nullopt;
  }
}

pb::Reason ToProto(core::Reason r) {
  switch (r) {
    case core::Reason::kNone:
      return pb::REASON_NONE;
    case core::Reason::kNotConnected:
      return pb::REASON_NOT_CONNECTED;
    case core::Reason::kNeedsReauth:
      return pb::REASON_NEEDS_REAUTH;
    case core::Reason::kRotationLost:
      return pb::REASON_ROTATION_LOST;
    case core::Reason::kRevoked:
      return pb::REASON_REVOKED;
    case core::Reason::kNotRefreshable:
      return pb::REASON_NOT_REFRESHABLE;
    case core::Reason::kProviderMisconfigured:
      return pb::REASON_PROVIDER_MISCONFIGURED;
  }
  return pb::REASON_NONE;
}

std::optional<core::Reason> FromProto(pb::Reason r) {
  switch (r) {
    case pb::REASON_NONE:
      return core::Reason::kNone;
    case pb::REASON_NOT_CONNECTED:
      return core::Reason::kNotConnected;
    case pb::REASON_NEEDS_REAUTH:
      return core::Reason::kNeedsReauth;
    case pb::REASON_ROTATION_LOST:
      return core::Reason::kRotationLost;
    case pb::REASON_REVOKED:
      return core::Reason::kRevoked;
    case pb::REASON_NOT_REFRESHABLE:
      return core::Reason::kNotRefreshable;
    case pb::REASON_PROVIDER_MISCONFIGURED:
      return core::Reason::kProviderMisconfigured;
    default:
      return std::nullopt;
  }
}

// The stable numbers of ConnectionRow::status.
int StatusColumn(core::ConnectionStatus s) {
  switch (s) {
    case core::ConnectionStatus::kPending:
      return 0;
    case core::ConnectionStatus::kActive:
      return 1;
    case core::ConnectionStatus::kNeedsReauth:
      return 2;
    case core::ConnectionStatus::kRevoked:
      return 3;
  }
  return 0;
}

core::ConnectionStatus StatusFromColumn(int s) {
  switch (s) {
    case 1:
      return core::ConnectionStatus::kActive;
    case 2:
      return core::ConnectionStatus::kNeedsReauth;
    case 3:
      return core::ConnectionStatus::kRevoked;
    default:
      return core::ConnectionStatus::kPending;
  }
}

// Associated data: a kind, then length-prefixed fields, so that no two identities (and no
// identity under two key ids) authenticate the same bytes. The cipher binds the key id too;
// binding it here as well keeps that property whatever Cipher implementation is plugged in.
std::string AssociatedData(absl::string_view kind, absl::string_view key_id,
                           absl::string_view identity, uint64_t generation = 0) {
  return absl::StrCat("tokenbroker.storage.v1/", kind, "/", key_id.size(), ":", key_id, "/",
                      identity.size(), ":", identity, "/", generation);
}

std::string ConnectionAd(absl::string_view key_id, absl::string_view id, uint64_t generation) {
  return AssociatedData("connection", key_id, id, generation);
}
std::string LinkAd(absl::string_view key_id, absl::string_view link_id) {
  return AssociatedData("link", key_id, link_id);
}
std::string AuthorizationAd(absl::string_view key_id, absl::string_view state_hash) {
  return AssociatedData("authorization", key_id, state_hash);
}

// Seals under the cipher's current key with associated data made for that key id.
template <typename MakeAd>
absl::StatusOr<core::Sealed> SealUnderCurrentKey(const core::Cipher& cipher,
                                                 absl::string_view plaintext, MakeAd make_ad) {
  const std::string key_id = cipher.current_key_id();
  TB_ASSIGN_OR_RETURN(core::Sealed sealed, cipher.Seal(plaintext, make_ad(key_id)));
  if (sealed.key_id != key_id) {
    // The associated data named another key than the one that sealed: it could never open.
    return absl::InternalError(absl::StrCat("the cipher sealed under key id \"", sealed.key_id,
                                            "\" instead of its current key id \"", key_id, "\""));
  }
  return sealed;
}

template <typename Message>
absl::StatusOr<std::string> Serialize(const Message& m, absl::string_view what) {
  std::string out;
  if (!m.SerializeToString(&out)) {
    return absl::InternalError(absl::StrCat("cannot serialize ", what));
  }
  return out;
}

// Copies the unknown fields of `from` (fields a newer release wrote) into `to`, recursing into
// singular sub-messages present in both. Repeated and map fields are not matched up.
void KeepUnknownFields(const google::protobuf::Message& from, google::protobuf::Message* to) {
  const google::protobuf::Reflection* rf = from.GetReflection();
  const google::protobuf::Reflection* rt = to->GetReflection();
  if (!rf->GetUnknownFields(from).empty()) {
    rt->MutableUnknownFields(to)->MergeFrom(rf->GetUnknownFields(from));
  }
  const google::protobuf::Descriptor* d = from.GetDescriptor();
  for (int i = 0; i < d->field_count(); ++i) {
    const google::protobuf::FieldDescriptor* f = d->field(i);
    if (f->cpp_type() != google::protobuf::FieldDescriptor::CPPTYPE_MESSAGE || f->is_repeated()) {
      continue;
    }
    if (rf->HasField(from, f) && rt->HasField(*to, f)) {
      KeepUnknownFields(rf->GetMessage(from, f), rt->MutableMessage(to, f));
    }
  }
}

void ParamsToProto(const std::map<std::string, std::string>& params,
                   google::protobuf::Map<std::string, std::string>* out) {
  for (const auto& [k, v] : params) {
    (*out)[k] = v;
  }
}

std::map<std::string, std::string> ParamsFromProto(
    const google::protobuf::Map<std::string, std::string>& params) {
  return std::map<std::string, std::string>(params.begin(), params.end());
}

void GrantMetaToProto(const core::Grant& g, pb::GrantMeta* out) {
  out->set_generation(g.generation);
  out->set_token_type(g.token_type);
  for (const std::string& s : g.scopes) {
    out->add_scopes(s);
  }
  out->set_issued_at_unix_us(ToUs(g.issued_at));
  if (g.expires_at) {
    out->set_expires_at_unix_us(ToUs(*g.expires_at));
  }
  if (g.refresh_at) {
    out->set_refresh_at_unix_us(ToUs(*g.refresh_at));
  }
  if (g.refresh_token_expires_at) {
    out->set_refresh_token_expires_at_unix_us(ToUs(*g.refresh_token_expires_at));
  }
}

core::Grant GrantMetaFromProto(const pb::GrantMeta& m) {
  core::Grant g;
  g.generation = m.generation();
  g.token_type = m.token_type();
  g.scopes.assign(m.scopes().begin(), m.scopes().end());
  g.issued_at = FromUs(m.issued_at_unix_us());
  if (m.has_expires_at_unix_us()) {
    g.expires_at = FromUs(m.expires_at_unix_us());
  }
  if (m.has_refresh_at_unix_us()) {
    g.refresh_at = FromUs(m.refresh_at_unix_us());
  }
  if (m.has_refresh_token_expires_at_unix_us()) {
    g.refresh_token_expires_at = FromUs(m.refresh_token_expires_at_unix_us());
  }
  return g;
}

void GrantSecretsToProto(const core::Grant& g, pb::GrantSecrets* out) {
  out->set_access_token(std::string(g.access_token.Reveal()));
  if (g.refresh_token) {
    out->set_refresh_token(std::string(g.refresh_token->Reveal()));
  }
  out->set_provider_token_id(g.provider_token_id);
}

void GrantSecretsFromProto(const pb::GrantSecrets& s, core::Grant* g) {
  g->access_token = AccessToken(s.access_token());
  if (s.has_refresh_token()) {
    g->refresh_token = RefreshToken(s.refresh_token());
  } else {
    g->refresh_token.reset();
  }
  g->provider_token_id = s.provider_token_id();
}

pb::ConnectionMeta MetaToProto(const core::Connection& c) {
  pb::ConnectionMeta m;
  m.set_provider(c.provider);
  ParamsToProto(c.params, m.mutable_params());
  m.set_status(ToProto(c.status));
  m.set_reason(ToProto(c.reason));
  m.set_last_error(c.last_error.get());
  m.set_created_at_unix_us(ToUs(c.created_at));
  m.set_updated_at_unix_us(ToUs(c.updated_at));
  if (c.grant) {
    GrantMetaToProto(*c.grant, m.mutable_grant());
  }
  if (c.refresh_intent) {
    pb::RefreshIntent* i = m.mutable_refresh_intent();
    i->set_generation(c.refresh_intent->generation);
    i->set_refresh_token_fingerprint(c.refresh_intent->refresh_token_fingerprint);
    i->set_recorded_at_unix_us(ToUs(c.refresh_intent->recorded_at));
  }
  m.set_revision(c.revision);
  return m;
}

pb::ConnectionSecrets SecretsToProto(const core::Connection& c) {
  pb::ConnectionSecrets s;
  if (c.grant) {
    GrantSecretsToProto(*c.grant, s.mutable_grant());
  }
  for (const core::Grant& g : c.to_revoke) {
    pb::RevocableGrant* r = s.add_to_revoke();
    GrantMetaToProto(g, r->mutable_meta());
    GrantSecretsToProto(g, r->mutable_secrets());
  }
  return s;
}

uint64_t MetaGeneration(const pb::ConnectionMeta& m) {
  return m.has_grant() ? m.grant().generation() : 0;
}

absl::StatusOr<pb::ConnectionMeta> ParseMeta(absl::string_view bytes) {
  pb::ConnectionMeta m;
  if (!m.ParseFromArray(bytes.data(), static_cast<int>(bytes.size()))) {
    return absl::DataLossError("the connection's metadata is unreadable");
  }
  return m;
}

}  // namespace

absl::StatusOr<ConnectionRow> EncodeConnection(const core::Connection& c,
                                               const core::Cipher& cipher) {
  return EncodeConnection(c, cipher, nullptr);
}

absl::StatusOr<ConnectionRow> EncodeConnection(const core::Connection& c,
                                               const core::Cipher& cipher,
                                               const ConnectionRow* previous) {
  pb::ConnectionMeta meta = MetaToProto(c);
  pb::ConnectionSecrets secrets = SecretsToProto(c);
  if (previous != nullptr) {
    if (absl::StatusOr<pb::ConnectionMeta> old = ParseMeta(previous->meta); old.ok()) {
      KeepUnknownFields(*old, &meta);
      absl::StatusOr<std::string> plain =
          cipher.Open(previous->sealed,
                      ConnectionAd(previous->sealed.key_id, previous->id, MetaGeneration(*old)));
      pb::ConnectionSecrets old_secrets;
      if (plain.ok() && old_secrets.ParseFromString(*plain)) {
        KeepUnknownFields(old_secrets, &secrets);
      }
    }
  }
  ConnectionRow row;
  row.id = c.id;
  row.provider = c.provider;
  row.status = StatusColumn(c.status);
  row.generation = c.generation();
  row.revision = c.revision;
  if (c.grant && c.grant->refresh_at) {
    row.refresh_at_unix_ms = ToMs(*c.grant->refresh_at);
  }
  row.updated_at_unix_ms = ToMs(c.updated_at);
  TB_ASSIGN_OR_RETURN(row.meta, Serialize(meta, "connection metadata"));
  TB_ASSIGN_OR_RETURN(const std::string plain, Serialize(secrets, "connection secrets"));
  const uint64_t generation = c.generation();
  TB_ASSIGN_OR_RETURN(row.sealed, SealUnderCurrentKey(cipher, plain, [&](absl::string_view k) {
                        return ConnectionAd(k, c.id, generation);
                      }));
  return row;
}

absl::StatusOr<core::Connection> DecodeConnection(const ConnectionRow& row,
                                                  const core::Cipher& cipher) {
  TB_ASSIGN_OR_RETURN(const pb::ConnectionMeta meta, ParseMeta(row.meta));
  core::Connection c;
  c.id = row.id;
  c.provider = meta.provider();
  c.params = ParamsFromProto(meta.params());
  const std::optional<core::ConnectionStatus> status = FromProto(meta.status());
  if (!status) {
    return absl::DataLossError(
        absl::StrCat("the connection's metadata has an unknown status ", meta.status()));
  }
  c.status = *status;
  const std::optional<core::Reason> reason = FromProto(meta.reason());
  if (!reason) {
    return absl::DataLossError(
        absl::StrCat("the connection's metadata has an unknown reason ", meta.reason()));
  }
  c.reason = *reason;
  c.last_error = meta.last_error();
  c.created_at = FromUs(meta.created_at_unix_us());
  c.updated_at = FromUs(meta.updated_at_unix_us());
  if (meta.has_grant()) {
    c.grant = GrantMetaFromProto(meta.grant());
  }
  if (meta.has_refresh_intent()) {
    core::RefreshIntent intent;
    intent.generation = meta.refresh_intent().generation();
    intent.refresh_token_fingerprint = meta.refresh_intent().refresh_token_fingerprint();
    intent.recorded_at = FromUs(meta.refresh_intent().recorded_at_unix_us());
    c.refresh_intent = std::move(intent);
  }
  // The revision column is what writes compare-and-set on, so it is the one reported.
  c.revision = row.revision;

  // From here on nothing fails the decode: the metadata is sound, so the connection is
  // returned whatever happens to its secrets.
  absl::StatusOr<std::string> plain =
      cipher.Open(row.sealed, ConnectionAd(row.sealed.key_id, row.id, MetaGeneration(meta)));
  if (!plain.ok()) {
    // The cipher's messages name the key id and never the data (core::Cipher's contract).
    c.data_loss = absl::StrCat("the connection's secrets do not open: ", plain.status().message());
    return c;
  }
  pb::ConnectionSecrets secrets;
  if (!secrets.ParseFromString(*plain)) {
    c.data_loss = "the connection's secrets are unreadable";
    return c;
  }
  if (secrets.has_grant() != meta.has_grant()) {
    c.data_loss = "the connection's secrets do not match its metadata";
    return c;
  }
  if (c.grant) {
    GrantSecretsFromProto(secrets.grant(), &*c.grant);
  }
  if (secrets.to_revoke_size() > 0) {
    std::vector<core::Grant>& to_revoke = c.to_revoke.mutable_value();
    to_revoke.reserve(secrets.to_revoke_size());
    for (const pb::RevocableGrant& r : secrets.to_revoke()) {
      core::Grant g = GrantMetaFromProto(r.meta());
      GrantSecretsFromProto(r.secrets(), &g);
      to_revoke.push_back(std::move(g));
    }
  }
  return c;
}

core::Connection UnreadableConnection(const ConnectionRow& row, const absl::Status& why) {
  core::Connection c;
  c.id = row.id;
  c.provider = row.provider;
  c.status = StatusFromColumn(row.status);
  c.reason = core::Reason::kNone;
  if (row.generation > 0) {
    // Keeps the generation, so that a reconnect still counts up from it.
    core::Grant g;
    g.generation = row.generation;
    c.grant = std::move(g);
  }
  c.revision = row.revision;
  c.updated_at = absl::FromUnixMillis(row.updated_at_unix_ms);
  c.data_loss =
      std::string(why.message().empty() ? "the connection's record is unreadable" : why.message());
  return c;
}

core::Connection DecodeOrUnreadable(const ConnectionRow& row, const core::Cipher& cipher) {
  absl::StatusOr<core::Connection> c = DecodeConnection(row, cipher);
  return c.ok() ? *std::move(c) : UnreadableConnection(row, c.status());
}

absl::StatusOr<core::Sealed> ResealConnection(const ConnectionRow& row,
                                              const core::Cipher& cipher) {
  TB_ASSIGN_OR_RETURN(const pb::ConnectionMeta meta, ParseMeta(row.meta));
  const uint64_t generation = MetaGeneration(meta);
  TB_ASSIGN_OR_RETURN(const std::string plain,
                      cipher.Open(row.sealed, ConnectionAd(row.sealed.key_id, row.id, generation)));
  return SealUnderCurrentKey(
      cipher, plain, [&](absl::string_view k) { return ConnectionAd(k, row.id, generation); });
}

absl::StatusOr<LinkRow> EncodeLink(const core::LinkRecord& record, const core::Cipher& cipher) {
  pb::LinkRecord m;
  m.set_id(record.link.id);
  m.set_connection_id(record.link.connection_id);
  m.set_provider(record.link.provider);
  ParamsToProto(record.link.params, m.mutable_params());
  m.set_expires_at_unix_us(ToUs(record.link.expires_at));
  m.set_reconnect(record.link.reconnect);
  m.set_return_url(record.link.return_url);
  m.set_revoked(record.revoked);
  if (record.used_at) {
    m.set_used_at_unix_us(ToUs(*record.used_at));
  }
  LinkRow row;
  row.link_id = record.link.id;
  row.connection_id = record.link.connection_id;
  row.expires_at_unix_ms = ToMs(record.link.expires_at);
  TB_ASSIGN_OR_RETURN(const std::string plain, Serialize(m, "link record"));
  TB_ASSIGN_OR_RETURN(row.sealed, SealUnderCurrentKey(cipher, plain, [&](absl::string_view k) {
                        return LinkAd(k, row.link_id);
                      }));
  return row;
}

absl::StatusOr<core::LinkRecord> DecodeLink(const LinkRow& row, const core::Cipher& cipher) {
  absl::StatusOr<std::string> plain =
      cipher.Open(row.sealed, LinkAd(row.sealed.key_id, row.link_id));
  if (!plain.ok()) {
    return absl::DataLossError(
        absl::StrCat("link ", row.link_id, " does not open: ", plain.status().message()));
  }
  pb::LinkRecord m;
  if (!m.ParseFromString(*plain)) {
    return absl::DataLossError(absl::StrCat("link ", row.link_id, " is unreadable"));
  }
  core::LinkRecord r;
  r.link.id = m.id();
  r.link.connection_id = m.connection_id();
  r.link.provider = m.provider();
  r.link.params = ParamsFromProto(m.params());
  r.link.expires_at = FromUs(m.expires_at_unix_us());
  r.link.reconnect = m.reconnect();
  r.link.return_url = m.return_url();
  r.revoked = m.revoked();
  if (m.has_used_at_unix_us()) {
    r.used_at = FromUs(m.used_at_unix_us());
  }
  return r;
}

absl::StatusOr<core::Sealed> ResealLink(const LinkRow& row, const core::Cipher& cipher) {
  TB_ASSIGN_OR_RETURN(const std::string plain,
                      cipher.Open(row.sealed, LinkAd(row.sealed.key_id, row.link_id)));
  return SealUnderCurrentKey(cipher, plain,
                             [&](absl::string_view k) { return LinkAd(k, row.link_id); });
}

std::string StateHash(absl::string_view state) {
  std::string out(SHA256_DIGEST_LENGTH, '\0');
  SHA256(reinterpret_cast<const unsigned char*>(state.data()), state.size(),
         reinterpret_cast<unsigned char*>(out.data()));
  return out;
}

absl::StatusOr<AuthorizationRow> EncodeAuthorization(const core::PendingAuthorization& auth,
                                                     const core::Cipher& cipher) {
  pb::PendingAuthorization m;
  m.set_browser_binding(std::string(auth.browser_binding.Reveal()));
  m.set_pkce_verifier(std::string(auth.verifier.Reveal()));
  m.set_link_id(auth.link_id);
  m.set_connection_id(auth.connection_id);
  m.set_provider(auth.provider);
  ParamsToProto(auth.params, m.mutable_params());
  m.set_reconnect(auth.reconnect);
  m.set_redirect_uri(auth.redirect_uri);
  m.set_expires_at_unix_us(ToUs(auth.expires_at));
  m.set_return_url(auth.return_url);
  AuthorizationRow row;
  row.state_hash = StateHash(auth.state.Reveal());
  row.expires_at_unix_ms = ToMs(auth.expires_at);
  TB_ASSIGN_OR_RETURN(const std::string plain, Serialize(m, "pending authorization"));
  TB_ASSIGN_OR_RETURN(row.sealed, SealUnderCurrentKey(cipher, plain, [&](absl::string_view k) {
                        return AuthorizationAd(k, row.state_hash);
                      }));
  return row;
}

absl::StatusOr<core::PendingAuthorization> DecodeAuthorization(const AuthorizationRow& row,
                                                               const core::Cipher& cipher) {
  absl::StatusOr<std::string> plain =
      cipher.Open(row.sealed, AuthorizationAd(row.sealed.key_id, row.state_hash));
  if (!plain.ok()) {
    return absl::DataLossError(
        absl::StrCat("a pending authorization does not open: ", plain.status().message()));
  }
  pb::PendingAuthorization m;
  if (!m.ParseFromString(*plain)) {
    return absl::DataLossError("a pending authorization is unreadable");
  }
  core::PendingAuthorization auth;
  auth.browser_binding = OAuthState(m.browser_binding());
  auth.verifier = PkceVerifier(m.pkce_verifier());
  auth.link_id = m.link_id();
  auth.connection_id = m.connection_id();
  auth.provider = m.provider();
  auth.params = ParamsFromProto(m.params());
  auth.reconnect = m.reconnect();
  auth.redirect_uri = m.redirect_uri();
  auth.expires_at = FromUs(m.expires_at_unix_us());
  auth.return_url = m.return_url();
  return auth;
}

absl::StatusOr<core::PendingAuthorization> DecodeAuthorization(const AuthorizationRow& row,
                                                               absl::string_view state,
                                                               const core::Cipher& cipher) {
  if (StateHash(state) != row.state_hash) {
    return absl::DataLossError("a pending authorization is stored under another state");
  }
  TB_ASSIGN_OR_RETURN(core::PendingAuthorization auth, DecodeAuthorization(row, cipher));
  auth.state = OAuthState(std::string(state));
  return auth;
}

absl::StatusOr<core::Sealed> ResealAuthorization(const AuthorizationRow& row,
                                                 const core::Cipher& cipher) {
  TB_ASSIGN_OR_RETURN(const std::string plain,
                      cipher.Open(row.sealed, AuthorizationAd(row.sealed.key_id, row.state_hash)));
  return SealUnderCurrentKey(
      cipher, plain, [&](absl::string_view k) { return AuthorizationAd(k, row.state_hash); });
}

}  // namespace tb::store
