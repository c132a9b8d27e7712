#ifndef TB_CORE_PROVIDER_CLIENT_H_
#define TB_CORE_PROVIDER_CLIENT_H_

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "server/src/common/secret.h"
#include "server/src/core/connection.h"

namespace tb::core {

// Talks to a provider's OAuth endpoints (RFC 6749 / 7009). Thread-safe. Every call is bounded by
// `deadline` and is never cancelled by a caller once sent (see DESIGN.md).
// Errors: kUnavailable (transport or 5xx, retryable), kDeadlineExceeded,
// kFailedPrecondition with Reason kNeedsReauth (`invalid_grant`) or kProviderMisconfigured
// (`invalid_client`, `unauthorized_client`), kResourceExhausted (429).
class ProviderClient {
 public:
  virtual ~ProviderClient() = default;

  // `connection` names the provider and its parameters (e.g. the Zendesk subdomain).
  virtual absl::StatusOr<Grant> ExchangeCode(const Connection& connection, const AuthCode& code,
                                             const PkceVerifier& verifier,
                                             absl::Time deadline) = 0;
  virtual absl::StatusOr<Grant> Refresh(const Connection& connection, absl::Time deadline) = 0;
  virtual absl::Status Revoke(const Connection& connection, absl::Time deadline) = 0;
};

}  // namespace tb::core

#endif  // TB_CORE_PROVIDER_CLIENT_H_
