#include "server/src/common/logging.h"

#include <spdlog/sinks/basic_file_sink.h>
#include <spdlog/sinks/stdout_sinks.h>
#include <spdlog/spdlog.h>

#include "absl/strings/str_cat.h"

namespace tb {

absl::Status InitLogging(const LogOptions& options) {
  const spdlog::level::level_enum level = spdlog::level::from_str(options.level);
  if (level == spdlog::level::off && options.level != "off") {
    return absl::InvalidArgumentError(absl::StrCat("unknown log level '", options.level, "'"));
  }
  std::shared_ptr<spdlog::logger> logger;
  try {  // spdlog reports sink errors by throwing; keep them inside this function.
    if (options.file.empty()) {
      logger = std::make_shared<spdlog::logger>(
          "token-broker", std::make_shared<spdlog::sinks::stderr_sink_mt>());
    } else {
      logger = std::make_shared<spdlog::logger>(
          "token-broker",
          std::make_shared<spdlog::sinks::basic_file_sink_mt>(options.file, /*truncate=*/false));
    }
  } catch (const spdlog::spdlog_ex& e) {
    return absl::UnavailableError(absl::StrCat("cannot open log file: ", e.what()));
  }
  if (options.format == "json") {
    // Messages are built by our own code from redacted values and validated ids; the pattern
    // keeps one object per line for log collectors.
    logger->set_pattern(
        R"({"time":"%Y-%m-%dT%H:%M:%S.%fZ","level":"%l","thread":%t,"msg":"%v"})",
        spdlog::pattern_time_type::utc);
  } else if (options.format == "text") {
    logger->set_pattern("%Y-%m-%dT%H:%M:%S.%fZ %L %t %v", spdlog::pattern_time_type::utc);
  } else {
    return absl::InvalidArgumentError("log format must be text or json");
  }
  logger->set_level(level);
  logger->flush_on(spdlog::level::trace);
  spdlog::set_default_logger(std::move(logger));
  return absl::OkStatus();
}

}  // namespace tb
