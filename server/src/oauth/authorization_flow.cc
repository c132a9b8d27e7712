#include "server/src/oauth/authorization_flow.h"

#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "server/src/common/status_macros.h"
#include "server/src/core/connect_link.h"
#include "server/src/core/errors.h"
#include "server/src/core/oauth_state.h"

namespace tb::oauth {

using core::FlowError;
using core::FlowErrorKind;

std::string PercentEncode(absl::string_view s) {
  static constexpr char kHex[] = "0123456789ABCDEF";
  std::string out;
  out.reserve(s.size() * 3);
  for (unsigned char c : s) {
    if (absl::ascii_isalnum(c) || c == '-' || c == '.' || c == '_' || c == '~') {
      out.push_back(static_cast<char>(c));
    } else {
      out.push_back('%');
      out.push_back(kHex[c >> 4]);
      out.push_back(kHex[c & 15]);
    }
  }
  return out;
}

namespace {

std::string TrimSlash(std::string s) {
  while (absl::EndsWith(s, "/")) {
    s.pop_back();
  }
  return s;
}

}  // namespace

AuthorizationFlow::AuthorizationFlow(FlowOptions options, const core::ProviderDirectory& providers,
                                     const Clock& clock, core::Random& random,
                                     const core::Digest& digest, core::FlowStore& store,
                                     core::ProviderClient& provider_client, Broker& broker,
                                     Revoker& revoker, FlowEventSink events)
    : options_(std::move(options)),
      redirect_uri_(TrimSlash(options_.public_base_url) + "/oauth/callback"),
      providers_(providers),
      clock_(clock),
      random_(random),
      digest_(digest),
      store_(store),
      provider_client_(provider_client),
      broker_(broker),
      revoker_(revoker),
      events_(std::move(events)) {}

absl::Status AuthorizationFlow::ValidateOptions(const FlowOptions& options) {
  return core::ValidateReturnUrlAllowlist(options.return_url_allowlist);
}

bool AuthorizationFlow::ReturnUrlAllowed(const std::string& url) const {
  return !url.empty() && core::CheckReturnUrl(url, options_.return_url_allowlist).ok();
}

void AuthorizationFlow::Event(absl::string_view event, const core::ConnectionId& id,
                              const absl::Status& s) const {
  if (events_) {
    events_(event, id, s);
  }
}

absl::StatusOr<std::shared_ptr<const core::ProviderSpec>> AuthorizationFlow::Spec(
    const std::string& provider) const {
  std::shared_ptr<const core::ProviderSpec> spec = providers_.Find(provider);
  if (spec == nullptr) {
    std::vector<std::string> names;
    for (const auto& [name, unused] : *providers_.Snapshot()) {
      names.push_back(name);
    }
    return absl::InvalidArgumentError(absl::StrCat("unknown provider '", provider,
                                                   "'; configured: ", absl::StrJoin(names, ", ")));
  }
  return spec;
}

absl::StatusOr<AuthorizationFlow::MintedLink> AuthorizationFlow::CreateLink(
    const core::ConnectionId& id, const std::string& provider,
    const std::map<std::string, std::string>& params, absl::Duration ttl, bool reconnect,
    const std::string& return_url) {
  TB_RETURN_IF_ERROR(core::ValidateConnectionId(id));
  TB_ASSIGN_OR_RETURN(const std::shared_ptr<const core::ProviderSpec> spec, Spec(provider));
  TB_RETURN_IF_ERROR(core::ValidateConnectionParams(*spec, params));
  if (!return_url.empty()) {
    TB_RETURN_IF_ERROR(core::CheckReturnUrl(return_url, options_.return_url_allowlist));
  }
  if (ttl == absl::ZeroDuration()) {
    ttl = options_.default_link_ttl;
  }
  if (ttl < absl::Minutes(1) || ttl > options_.max_link_ttl) {
    return absl::InvalidArgumentError(
        absl::StrCat("ttl must be 1 minute to ", absl::FormatDuration(options_.max_link_ttl)));
  }
  absl::StatusOr<std::shared_ptr<const core::Connection>> existing = broker_.GetConnection(id);
  if (existing.ok()) {
    const core::Connection& c = **existing;
    if (c.provider != provider || c.params != params) {
      return absl::InvalidArgumentError(
          "connection exists with another provider or parameters; delete it first");
    }
    if (c.status == core::ConnectionStatus::kActive && !reconnect) {
      return FlowError(absl::StatusCode::kFailedPrecondition, FlowErrorKind::kAlreadyConnected,
                       "connection is active; mint the link with reconnect to replace its grant");
    }
  } else if (existing.status().code() == absl::StatusCode::kNotFound) {
    absl::StatusOr<std::shared_ptr<const core::Connection>> created =
        broker_.CreatePending(id, provider, params);
    if (!created.ok() && created.status().code() != absl::StatusCode::kAlreadyExists) {
      return created.status();
    }
  } else {
    return existing.status();
  }

  core::LinkRecord record;
  record.link.id = core::RandomToken(random_, 16);
  record.link.connection_id = id;
  record.link.provider = provider;
  record.link.params = params;
  // Whole seconds: the signed payload carries Unix seconds.
  record.link.expires_at = absl::FromUnixSeconds(absl::ToUnixSeconds(clock_.Now() + ttl));
  record.link.reconnect = reconnect;
  record.link.return_url = return_url;
  TB_RETURN_IF_ERROR(store_.PutLink(record));
  Event("link_created", id, absl::OkStatus());
  return MintedLink{absl::StrCat(TrimSlash(options_.public_base_url), "/oauth/start?link=",
                                 SignLink(record.link, options_.link_key, digest_)),
                    record.link.id, record.link.expires_at};
}

absl::Status AuthorizationFlow::RevokeLink(const std::string& link_id) {
  return store_.RevokeLink(link_id);
}

absl::Status AuthorizationFlow::CheckLinkUsable(const core::LinkRecord& record) const {
  if (record.revoked) {
    return FlowError(absl::StatusCode::kFailedPrecondition, FlowErrorKind::kLinkRevoked,
                     "connect link was revoked");
  }
  if (record.used_at) {
    return FlowError(absl::StatusCode::kFailedPrecondition, FlowErrorKind::kLinkUsed,
                     "connect link was already used");
  }
  return absl::OkStatus();
}

absl::StatusOr<std::string> AuthorizationFlow::AuthorizeUrl(
    const core::ProviderSpec& spec, const core::PendingAuthorization& auth) const {
  TB_ASSIGN_OR_RETURN(std::string base, core::ExpandUrl(spec.authorize_url, auth.params));
  std::vector<std::pair<std::string, std::string>> q = {
      {"response_type", "code"},
      {"client_id", spec.client_id},
      {"redirect_uri", auth.redirect_uri},
      {"state", std::string(auth.state.Reveal())},
  };
  if (!spec.scopes.empty()) {
    q.emplace_back("scope", absl::StrJoin(spec.scopes, " "));
  }
  if (spec.pkce) {
    q.emplace_back("code_challenge", core::PkceChallengeS256(digest_, auth.verifier));
    q.emplace_back("code_challenge_method", "S256");
  }
  for (const std::string& name : spec.authorize_params_from_connection) {
    if (const auto it = auth.params.find(name); it != auth.params.end()) {
      q.emplace_back(name, it->second);
    }
  }
  for (const auto& [k, v] : spec.extra_authorize_params) {
    q.emplace_back(k, v);
  }
  std::string url = base;
  char sep = absl::StrContains(base, '?') ? '&' : '?';
  for (const auto& [k, v] : q) {
    absl::StrAppend(&url, std::string(1, sep), PercentEncode(k), "=", PercentEncode(v));
    sep = '&';
  }
  return url;
}

absl::StatusOr<AuthorizationFlow::Started> AuthorizationFlow::Start(absl::string_view link_token) {
  const absl::Time now = clock_.Now();
  TB_ASSIGN_OR_RETURN(core::ConnectLink link,
                      core::VerifyLink(link_token, options_.link_key, digest_, now));
  absl::StatusOr<core::LinkRecord> record = store_.GetLink(link.id);
  if (!record.ok()) {
    // Signed by our key but unknown to the store (e.g. minted before a store was wiped).
    return FlowError(absl::StatusCode::kInvalidArgument, FlowErrorKind::kLinkInvalid,
                     "connect link is not known");
  }
  TB_RETURN_IF_ERROR(CheckLinkUsable(*record));
  TB_ASSIGN_OR_RETURN(const std::shared_ptr<const core::ProviderSpec> spec, Spec(link.provider));
  // Signed by us, so checked when minted; checked again (a provider's rules may have changed
  // since) before any of it goes into a host name, and refused like any unusable link.
  if (!core::ValidateConnectionParams(*spec, link.params).ok()) {
    return FlowError(absl::StatusCode::kInvalidArgument, FlowErrorKind::kLinkInvalid,
                     "connect link parameters are not valid for its provider");
  }
  if (absl::StatusOr<std::shared_ptr<const core::Connection>> c =
          broker_.GetConnection(link.connection_id);
      c.ok() && (*c)->status == core::ConnectionStatus::kActive && !link.reconnect) {
    return FlowError(absl::StatusCode::kFailedPrecondition, FlowErrorKind::kAlreadyConnected,
                     "connection is already connected");
  }

  core::PendingAuthorization auth;
  auth.state = core::NewState(random_);
  auth.browser_binding = OAuthState(core::RandomToken(random_, 32));
  if (spec->pkce) {
    auth.verifier = core::NewPkceVerifier(random_);
  }
  auth.link_id = link.id;
  auth.connection_id = link.connection_id;
  auth.provider = link.provider;
  auth.params = link.params;
  auth.reconnect = link.reconnect;
  auth.redirect_uri = redirect_uri_;
  auth.expires_at = now + options_.state_ttl;
  if (ReturnUrlAllowed(link.return_url)) {
    auth.return_url = link.return_url;
  } else if (!link.return_url.empty()) {
    Event("return_url_dropped", auth.connection_id,
          absl::InvalidArgumentError("the link's return URL is no longer on the allow-list"));
  }
  TB_ASSIGN_OR_RETURN(std::string url, AuthorizeUrl(*spec, auth));
  TB_RETURN_IF_ERROR(store_.PutAuthorization(auth, now));
  Event("authorization_started", auth.connection_id, absl::OkStatus());
  return Started{std::move(url), auth.browser_binding};
}

absl::StatusOr<core::ConnectionId> AuthorizationFlow::Complete(const Callback& cb) {
  std::string ignored;
  return Complete(cb, &ignored);
}

absl::StatusOr<core::ConnectionId> AuthorizationFlow::Complete(const Callback& cb,
                                                               std::string* return_url) {
  return_url->clear();
  const absl::Time now = clock_.Now();
  if (cb.state.empty() || cb.state.size() > 512) {
    return FlowError(absl::StatusCode::kInvalidArgument, FlowErrorKind::kStateInvalid,
                     "callback without a usable state");
  }
  // Taken (deleted) before anything else: a state works once, whatever happens below.
  absl::StatusOr<core::PendingAuthorization> taken = store_.TakeAuthorization(cb.state, now);
  if (!taken.ok()) {
    return FlowError(absl::StatusCode::kInvalidArgument, FlowErrorKind::kStateInvalid,
                     "unknown, used or expired state");
  }
  const core::PendingAuthorization& auth = *taken;
  // Checked again now: the allow-list may have changed since /oauth/start (a restart between).
  if (ReturnUrlAllowed(auth.return_url)) {
    *return_url = auth.return_url;
  }
  if (cb.browser_binding.empty() ||
      !core::ConstantTimeEquals(cb.browser_binding, auth.browser_binding.Reveal())) {
    absl::Status s = FlowError(absl::StatusCode::kPermissionDenied, FlowErrorKind::kWrongBrowser,
                               "state arrived without its cookie");
    Event("callback_rejected", auth.connection_id, s);
    return s;
  }
  if (!cb.error.empty()) {
    const bool denied = cb.error == "access_denied";
    absl::Status s =
        FlowError(absl::StatusCode::kFailedPrecondition,
                  denied ? FlowErrorKind::kAccessDenied : FlowErrorKind::kProviderError,
                  denied ? "the account admin declined" : "the provider answered with an error");
    Event("callback_error", auth.connection_id, s);
    return s;
  }
  if (cb.code.empty() || cb.code.size() > 4096) {
    return FlowError(absl::StatusCode::kInvalidArgument, FlowErrorKind::kProviderError,
                     "callback without a code");
  }
  absl::StatusOr<core::LinkRecord> record = store_.GetLink(auth.link_id);
  if (!record.ok()) {
    return FlowError(absl::StatusCode::kInvalidArgument, FlowErrorKind::kLinkInvalid,
                     "connect link is not known");
  }
  TB_RETURN_IF_ERROR(CheckLinkUsable(*record));
  TB_ASSIGN_OR_RETURN(const std::shared_ptr<const core::ProviderSpec> spec, Spec(auth.provider));

  std::shared_ptr<const core::Connection> current;
  absl::StatusOr<std::shared_ptr<const core::Connection>> c =
      broker_.GetConnection(auth.connection_id);
  if (!c.ok()) {
    // The link may have been minted on another replica moments ago, before its change reached
    // us: the store knows.
    (void)broker_.Reload(auth.connection_id);
    c = broker_.GetConnection(auth.connection_id);
  }
  if (c.ok()) {
    current = *c;
  } else {
    // Deleted while the admin was at the provider: the link still stands for it.
    absl::StatusOr<std::shared_ptr<const core::Connection>> created =
        broker_.CreatePending(auth.connection_id, auth.provider, auth.params);
    if (!created.ok()) {
      return FlowError(absl::StatusCode::kUnavailable, FlowErrorKind::kStoreFailed,
                       "could not create the connection");
    }
    current = *created;
  }
  if (current->status == core::ConnectionStatus::kActive && !auth.reconnect) {
    return FlowError(absl::StatusCode::kFailedPrecondition, FlowErrorKind::kAlreadyConnected,
                     "connection is already connected");
  }

  absl::StatusOr<core::Grant> grant =
      provider_client_.ExchangeCode(*spec, *current, AuthCode(cb.code), auth.verifier,
                                    auth.redirect_uri, now + options_.exchange_timeout);
  if (!grant.ok()) {
    absl::Status s = FlowError(absl::StatusCode::kUnavailable, FlowErrorKind::kExchangeFailed,
                               "the provider did not accept the authorization");
    Event("exchange_failed", auth.connection_id, grant.status());
    return s;
  }
  absl::StatusOr<std::shared_ptr<const core::Connection>> activated =
      broker_.Activate(auth.connection_id, *std::move(grant));
  if (!activated.ok()) {
    Event("store_failed", auth.connection_id, activated.status());
    return FlowError(absl::StatusCode::kUnavailable, FlowErrorKind::kStoreFailed,
                     "the new grant could not be stored");
  }
  if (absl::Status s = store_.MarkLinkUsed(auth.link_id, now); !s.ok()) {
    Event("link_mark_failed", auth.connection_id, s);
  }
  Event("connected", auth.connection_id, absl::OkStatus());
  // The new grant is stored, and the previous one with it in to_revoke: only now may it go.
  if (!(*activated)->to_revoke.empty()) {
    absl::StatusOr<bool> revoked = revoker_.RevokePending(auth.connection_id);
    Event("previous_grant_revoked", auth.connection_id,
          !revoked.ok() ? revoked.status()
          : *revoked    ? absl::OkStatus()
                        : absl::UnavailableError("not confirmed yet; the refresher retries"));
  }
  return auth.connection_id;
}

absl::Status AuthorizationFlow::DeleteConnection(const core::ConnectionId& id) {
  TB_ASSIGN_OR_RETURN(std::shared_ptr<const core::Connection> c, broker_.GetConnection(id));
  if (c->status != core::ConnectionStatus::kRevoked) {
    TB_RETURN_IF_ERROR(broker_.MarkRevoked(id));  // stops serving; tokens move to to_revoke
  }
  absl::StatusOr<bool> revoked = revoker_.RevokePending(id);
  if (!revoked.ok() || !*revoked) {
    Event("revoke_on_delete_failed", id,
          revoked.ok() ? absl::UnavailableError("the provider did not confirm the revocation")
                       : revoked.status());
  }
  TB_RETURN_IF_ERROR(broker_.Delete(id));
  Event("connection_deleted", id, absl::OkStatus());
  return absl::OkStatus();
}

}  // namespace tb::oauth
