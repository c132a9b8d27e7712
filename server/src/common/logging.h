#ifndef TB_COMMON_LOGGING_H_
#define TB_COMMON_LOGGING_H_

#include <initializer_list>
#include <string>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"

namespace tb {

struct LogOptions {
  std::string level = "info";   // spdlog level name
  std::string format = "text";  // "text" or "json" (one JSON object per line)
  std::string file;             // empty: stderr; else append to this file
};

// Installs the process-wide spdlog logger. Errors: INVALID_ARGUMENT (level/format),
// UNAVAILABLE (file cannot be opened).
absl::Status InitLogging(const LogOptions& options);

// Writes one audit event as a JSON line, {"time":...,"audit":"<event>","k":"v",...}, to the same
// destination as the log, whatever the log format and level (audit lines are never filtered).
// Events: connect, reconnect, revoke, needs_reauth, permission_denied, unauthenticated,
// key_rotation... Values must never be secrets (pass Redacted() forms). Thread-safe; before
// InitLogging it writes to stderr.
void Audit(absl::string_view event,
           std::initializer_list<std::pair<absl::string_view, absl::string_view>> fields);

}  // namespace tb

#endif  // TB_COMMON_LOGGING_H_
