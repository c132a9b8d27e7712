#include "server/src/common/logging.h"

#include <spdlog/pattern_formatter.h>
#include <spdlog/sinks/basic_file_sink.h>
#include <spdlog/sinks/stdout_sinks.h>
#include <spdlog/spdlog.h>

#include <atomic>
#include <memory>
#include <string>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"

namespace tb {

namespace {

// %j: the message, escaped for a JSON string, so that a quote or a newline in a message can
// never break the one-object-per-line format log collectors parse.
class JsonEscapedMessage final : public spdlog::custom_flag_formatter {
 public:
  void format(const spdlog::details::log_msg& msg, const std::tm&,
              spdlog::memory_buf_t& dest) override {
    for (char c : msg.payload) {
      switch (c) {
        case '"':
          dest.append(std::string_view("\\\""));
          break;
        case '\\':
          dest.append(std::string_view("\\\\"));
          break;
        case '\n':
          dest.append(std::string_view("\\n"));
          break;
        default:
          if (static_cast<unsigned char>(c) < 0x20) {
            fmt::format_to(std::back_inserter(dest), "\\u{:04x}", static_cast<int>(c));
          } else {
            dest.push_back(c);
          }
      }
    }
  }
  std::unique_ptr<custom_flag_formatter> clone() const override {
    return std::make_unique<JsonEscapedMessage>();
  }
};

// %q (text) `request_id=<id> ` and %k (JSON) `,"request_id":"<id>"` while the logging thread
// handles a request, nothing otherwise. Ids are well-formed by construction
// (IsWellFormedRequestId's characters), so no escaping.
class RequestIdFlag final : public spdlog::custom_flag_formatter {
 public:
  RequestIdFlag(std::string_view prefix, std::string_view suffix)
      : prefix_(prefix), suffix_(suffix) {}
  void format(const spdlog::details::log_msg&, const std::tm&,
              spdlog::memory_buf_t& dest) override {
    const absl::string_view id = CurrentRequestId();
    if (id.empty()) {
      return;
    }
    dest.append(prefix_);
    dest.append(std::string_view(id.data(), id.size()));
    dest.append(suffix_);
  }
  std::unique_ptr<custom_flag_formatter> clone() const override {
    return std::make_unique<RequestIdFlag>(prefix_, suffix_);
  }

 private:
  std::string_view prefix_;  // string literals only
  std::string_view suffix_;
};

void AppendJsonEscaped(absl::string_view in, std::string* out) {
  for (const char c : in) {
    switch (c) {
      case '"':
        out->append("\\\"");
        break;
      case '\\':
        out->append("\\\\");
        break;
      case '\n':
        out->append("\\n");
        break;
      default:
        if (static_cast<unsigned char>(c) < 0x20) {
          absl::StrAppend(out, "\\u00", absl::Hex(static_cast<unsigned char>(c), absl::kZeroPad2));
        } else {
          out->push_back(c);
        }
    }
  }
}

std::shared_ptr<spdlog::logger>& AuditLogger() {
  static auto* const logger = new std::shared_ptr<spdlog::logger>(
      std::make_shared<spdlog::logger>("audit", std::make_shared<spdlog::sinks::stderr_sink_mt>()));
  return *logger;
}

}  // namespace

void Audit(absl::string_view event,
           std::initializer_list<std::pair<absl::string_view, absl::string_view>> fields) {
  std::string line = "{\"time\":\"";
  line += absl::FormatTime("%Y-%m-%dT%H:%M:%E6SZ", absl::Now(), absl::UTCTimeZone());
  line += "\",\"audit\":\"";
  AppendJsonEscaped(event, &line);
  line += "\"";
  if (const absl::string_view id = CurrentRequestId(); !id.empty()) {
    line += ",\"request_id\":\"";
    AppendJsonEscaped(id, &line);
    line += "\"";
  }
  for (const auto& [k, v] : fields) {
    line += ",\"";
    AppendJsonEscaped(k, &line);
    line += "\":\"";
    AppendJsonEscaped(v, &line);
    line += "\"";
  }
  line += "}";
  std::shared_ptr<spdlog::logger> logger = std::atomic_load(&AuditLogger());
  logger->info(line);
}

absl::Status InitLogging(const LogOptions& options) {
  const spdlog::level::level_enum level = spdlog::level::from_str(options.level);
  if (level == spdlog::level::off && options.level != "off") {
    return absl::InvalidArgumentError(absl::StrCat("unknown log level '", options.level, "'"));
  }
  std::shared_ptr<spdlog::logger> logger;
  try {  // spdlog reports sink errors by throwing; keep them inside this function.
    if (options.file.empty()) {
      logger = std::make_shared<spdlog::logger>("token-broker",
                                                std::make_shared<spdlog::sinks::stderr_sink_mt>());
    } else {
      logger = std::make_shared<spdlog::logger>(
          "token-broker",
          std::make_shared<spdlog::sinks::basic_file_sink_mt>(options.file, /*truncate=*/false));
    }
  } catch (const spdlog::spdlog_ex& e) {
    return absl::UnavailableError(absl::StrCat("cannot open log file: ", e.what()));
  }
  if (options.format == "json") {
    auto formatter = std::make_unique<spdlog::pattern_formatter>(spdlog::pattern_time_type::utc);
    formatter->add_flag<JsonEscapedMessage>('j')
        .add_flag<RequestIdFlag>('k', ",\"request_id\":\"", "\"")
        .set_pattern(R"({"time":"%Y-%m-%dT%H:%M:%S.%fZ","level":"%l","thread":%t%k,"msg":"%j"})");
    logger->set_formatter(std::move(formatter));
  } else if (options.format == "text") {
    auto formatter = std::make_unique<spdlog::pattern_formatter>(spdlog::pattern_time_type::utc);
    formatter->add_flag<RequestIdFlag>('q', "request_id=", " ")
        .set_pattern("%Y-%m-%dT%H:%M:%S.%fZ %L %t %q%v");
    logger->set_formatter(std::move(formatter));
  } else {
    return absl::InvalidArgumentError("log format must be text or json");
  }
  logger->set_level(level);
  logger->flush_on(spdlog::level::trace);
  // Audit lines go where the log goes, as bare JSON objects, never filtered by level. A sink
  // of their own (a formatter belongs to a sink), appending to the same destination.
  std::shared_ptr<spdlog::logger> audit;
  try {
    if (options.file.empty()) {
      audit = std::make_shared<spdlog::logger>("audit",
                                               std::make_shared<spdlog::sinks::stderr_sink_mt>());
    } else {
      audit = std::make_shared<spdlog::logger>(
          "audit",
          std::make_shared<spdlog::sinks::basic_file_sink_mt>(options.file, /*truncate=*/false));
    }
  } catch (const spdlog::spdlog_ex& e) {
    return absl::UnavailableError(absl::StrCat("cannot open log file: ", e.what()));
  }
  audit->set_pattern("%v");
  audit->set_level(spdlog::level::trace);
  audit->flush_on(spdlog::level::trace);
  std::atomic_store(&AuditLogger(), std::move(audit));
  spdlog::set_default_logger(std::move(logger));
  return absl::OkStatus();
}

}  // namespace tb
