#include "server/src/grpc/caller_auth.h"

#include <grpc/grpc_security_constants.h>
#include <openssl/sha.h>

#include <string>

#include "absl/strings/ascii.h"
#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/strings/string_view.h"
#include "server/src/common/logging.h"

namespace tb::grpc_api {

namespace {

absl::string_view View(const grpc::string_ref& r) { return absl::string_view(r.data(), r.size()); }

// The key of `authorization: Bearer <key>`, or empty.
absl::string_view BearerKey(const grpc::ServerContextBase& ctx) {
  const auto& md = ctx.client_metadata();
  const auto it = md.find("authorization");
  if (it == md.end()) {
    return {};
  }
  absl::string_view v = View(it->second);
  constexpr absl::string_view kScheme = "bearer ";
  if (v.size() <= kScheme.size() || !absl::StartsWithIgnoreCase(v, kScheme)) {
    return {};
  }
  return absl::StripAsciiWhitespace(v.substr(kScheme.size()));
}

std::string Sha256Hex(absl::string_view key) {
  unsigned char digest[SHA256_DIGEST_LENGTH];
  SHA256(reinterpret_cast<const unsigned char*>(key.data()), key.size(), digest);
  return absl::BytesToHexString(
      absl::string_view(reinterpret_cast<const char*>(digest), sizeof(digest)));
}

}  // namespace

auth::Identity IdentityOf(const grpc::ServerContextBase& ctx) {
  auth::Identity id;
  if (std::shared_ptr<const grpc::AuthContext> a = ctx.auth_context();
      a != nullptr && a->IsPeerAuthenticated()) {
    // Only a TLS handshake that verified the client's certificate against our client CA makes
    // the peer "authenticated" and fills these properties.
    id.certificate = true;
    for (const grpc::string_ref& san : a->FindPropertyValues("peer_spiffe_id")) {
      id.uri_sans.emplace_back(View(san));
    }
    for (const grpc::string_ref& san : a->FindPropertyValues("peer_uri")) {
      if (std::find(id.uri_sans.begin(), id.uri_sans.end(), View(san)) == id.uri_sans.end()) {
        id.uri_sans.emplace_back(View(san));
      }
    }
    const std::vector<grpc::string_ref> cn = a->FindPropertyValues(GRPC_X509_CN_PROPERTY_NAME);
    if (!cn.empty()) {
      id.common_name = std::string(View(cn.front()));
    }
  }
  if (absl::string_view key = BearerKey(ctx); !key.empty()) {
    id.api_key_sha256 = Sha256Hex(key);
  }
  return id;
}

absl::StatusOr<std::shared_ptr<const auth::Caller>> Authorize(const grpc::ServerContextBase& ctx,
                                                              const auth::Authorizer& authorizer,
                                                              auth::Permission permission,
                                                              absl::string_view rpc,
                                                              absl::string_view connection_id) {
  if (authorizer.allows_all()) {
    return authorizer.Authenticate({});
  }
  absl::StatusOr<std::shared_ptr<const auth::Caller>> caller =
      authorizer.Authenticate(IdentityOf(ctx));
  if (!caller.ok()) {
    Audit("unauthenticated", {{"rpc", rpc},
                              {"connection", connection_id},
                              {"peer", ctx.peer()},
                              {"outcome", caller.status().message()}});
    return caller.status();
  }
  if (absl::Status s = auth::Authorizer::Authorize(**caller, permission, connection_id); !s.ok()) {
    Audit("permission_denied", {{"caller", (*caller)->name},
                                {"rpc", rpc},
                                {"connection", connection_id},
                                {"peer", ctx.peer()},
                                {"outcome", s.message()}});
    return s;
  }
  return caller;
}

}  // namespace tb::grpc_api
