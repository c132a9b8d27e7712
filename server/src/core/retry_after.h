#ifndef TB_CORE_RETRY_AFTER_H_
#define TB_CORE_RETRY_AFTER_H_

// "Not before this time": a provider's Retry-After, carried on an absl::Status from the
// provider adapter (which parses the header) to the refresher (which schedules the retry).

#include <optional>

#include "absl/status/status.h"
#include "absl/time/time.h"

namespace tb::core {

// Payload type URL; the value is the time in unix microseconds, as decimal text.
inline constexpr char kRetryAtPayloadUrl[] = "tokenbroker.v1/retry-at";

// `status` with the retry time attached (replacing any earlier one). OK stays OK.
absl::Status WithRetryAt(absl::Status status, absl::Time at);
// The retry time `status` carries, if any.
std::optional<absl::Time> RetryAfterOf(const absl::Status& status);

}  // namespace tb::core

#endif  // TB_CORE_RETRY_AFTER_H_
