#include "server/src/core/refresh_policy.h"

#include <algorithm>

namespace tb::core {

std::optional<absl::Time> KeepAliveAt(const Grant& grant) {
  if (!grant.refresh_token || grant.refresh_token->empty() || !grant.refresh_token_expires_at) {
    return std::nullopt;
  }
  const absl::Duration lifetime =
      std::max(*grant.refresh_token_expires_at - grant.issued_at, absl::ZeroDuration());
  return grant.issued_at + lifetime / 2;
}

std::optional<absl::Time> RefreshAt(const Grant& grant, const RefreshPolicy& policy,
                                    absl::Duration jitter) {
  if (!grant.expires_at || !grant.refresh_token || grant.refresh_token->empty()) {
    return std::nullopt;
  }
  const absl::Time expires = *grant.expires_at;
  const absl::Duration lifetime = std::max(expires - grant.issued_at, absl::ZeroDuration());
  const absl::Time earliest = grant.issued_at + lifetime * policy.min_lifetime_fraction;
  const absl::Time ahead = expires - policy.margin;
  const absl::Duration max_jitter = std::min(policy.max_jitter, lifetime / 10);
  jitter = std::clamp(jitter, absl::ZeroDuration(), max_jitter);
  absl::Time at = std::min(std::max(earliest, ahead) + jitter, expires);
  if (const std::optional<absl::Time> keep_alive = KeepAliveAt(grant)) {
    at = std::min(at, *keep_alive);
  }
  return at;
}

}  // namespace tb::core
