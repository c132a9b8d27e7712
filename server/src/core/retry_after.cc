#include "server/src/core/retry_after.h"

#include <cstdint>
#include <string>

#include "absl/strings/cord.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"

namespace tb::core {

absl::Status WithRetryAt(absl::Status status, absl::Time at) {
  if (!status.ok()) {
    status.SetPayload(kRetryAtPayloadUrl, absl::Cord(absl::StrCat(absl::ToUnixMicros(at))));
  }
  return status;
}

std::optional<absl::Time> RetryAfterOf(const absl::Status& status) {
  const absl::optional<absl::Cord> p = status.GetPayload(kRetryAtPayloadUrl);
  int64_t micros = 0;
  if (!p || !absl::SimpleAtoi(std::string(*p), &micros)) {
    return std::nullopt;
  }
  return absl::FromUnixMicros(micros);
}

}  // namespace tb::core
