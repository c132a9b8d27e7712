#ifndef TB_CORE_PROVIDER_CLIENT_H_
#define TB_CORE_PROVIDER_CLIENT_H_

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "server/src/common/secret.h"
#include "server/src/core/connection.h"
#include "server/src/core/provider_spec.h"

namespace tb::core {

// Talks to a provider's OAuth endpoints (RFC 6749 / 7009). Thread-safe. Every call is bounded by
// `deadline` and is never cancelled by a caller once sent (see DESIGN.md).
// Errors: kUnavailable (transport or 5xx, retryable), kDeadlineExceeded,
// kFailedPrecondition with Reason kNeedsReauth (`invalid_grant`) or kProviderMisconfigured
// (`invalid_client`, `unauthorized_client`), kResourceExhausted (429), kUnauthenticated (an API
// call authorized by the grant's access token was refused: that token is dead).
class ProviderClient {
 public:
  virtual ~ProviderClient() = default;

  // Every call takes the provider's spec and the connection (its parameters fill the URL
  // templates, its grant carries the refresh token / token id).

  // Exchanges an authorization code (RFC 6749 4.1.3) with the PKCE verifier (empty when the
  // provider takes no PKCE) and the exact redirect_uri of the authorize request. For Zendesk it
  // then looks up the new token's id (token_info_url) and sets Grant::provider_token_id.
  // The returned grant has issued_at = now and generation 0 (the broker assigns it).
  virtual absl::StatusOr<Grant> ExchangeCode(const ProviderSpec& spec, const Connection& connection,
                                             const AuthCode& code, const PkceVerifier& verifier,
                                             const std::string& redirect_uri,
                                             absl::Time deadline) = 0;
  // Uses connection.grant->refresh_token. A response without a refresh token keeps none in the
  // returned grant (the caller keeps the old one).
  virtual absl::StatusOr<Grant> Refresh(const ProviderSpec& spec, const Connection& connection,
                                        absl::Time deadline) = 0;
  // Revokes connection.grant at the provider: Zendesk by token id, RFC 7009 by refresh token
  // (or access token when there is none). OK when the provider has no revocation.
  virtual absl::Status Revoke(const ProviderSpec& spec, const Connection& connection,
                              absl::Time deadline) = 0;
};

}  // namespace tb::core

#endif  // TB_CORE_PROVIDER_CLIENT_H_
