#ifndef TB_CORE_REFRESH_POLICY_H_
#define TB_CORE_REFRESH_POLICY_H_

#include <optional>

#include "absl/time/time.h"
#include "server/src/core/connection.h"

namespace tb::core {

// When a grant is refreshed. Zendesk kills the old access token the moment we refresh, so the
// refresh time is also the end of the validity we promise callers (valid_until).
struct RefreshPolicy {
  // Refresh this long before expiry...
  absl::Duration margin = absl::Minutes(5);
  // ...but never before this fraction of the lifetime has passed, so that short-lived tokens
  // (2 s in tests, 5 min at Zendesk's minimum) do not refresh in a loop.
  double min_lifetime_fraction = 0.5;
  // Up to this much random delay, spreading refreshes of grants issued together; capped at a
  // tenth of the lifetime.
  absl::Duration max_jitter = absl::Seconds(30);
};

// The refresh time of `grant`: max(issued_at + fraction * lifetime, expires_at - margin) plus
// `jitter` (clamped to [0, min(max_jitter, lifetime / 10)]), never past expires_at nor past
// KeepAliveAt(grant). nullopt for a grant without expiry (valid until revoked) or without a
// refresh token (nothing to refresh with: it serves until it expires). Pure: no clock, no
// randomness.
std::optional<absl::Time> RefreshAt(const Grant& grant, const RefreshPolicy& policy,
                                    absl::Duration jitter);

// The latest time an unused connection must be refreshed so that its refresh token never dies
// unused: half of the refresh token's lifetime. nullopt when the grant has no refresh token or
// its refresh token's expiry is unknown.
std::optional<absl::Time> KeepAliveAt(const Grant& grant);

}  // namespace tb::core

#endif  // TB_CORE_REFRESH_POLICY_H_
