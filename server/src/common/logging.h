#ifndef TB_COMMON_LOGGING_H_
#define TB_COMMON_LOGGING_H_

#include <string>

#include "absl/status/status.h"

namespace tb {

struct LogOptions {
  std::string level = "info";   // spdlog level name
  std::string format = "text";  // "text" or "json" (one JSON object per line)
  std::string file;             // empty: stderr; else append to this file
};

// Installs the process-wide spdlog logger. Errors: INVALID_ARGUMENT (level/format),
// UNAVAILABLE (file cannot be opened).
absl::Status InitLogging(const LogOptions& options);

}  // namespace tb

#endif  // TB_COMMON_LOGGING_H_
