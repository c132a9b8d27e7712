#ifndef TB_CONFIG_CONFIG_H_
#define TB_CONFIG_CONFIG_H_

#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace tb::config {

// Every listener is "host:port"; port 0 picks a free port (tests).
struct GrpcConfig {
  std::string listen = "127.0.0.1:8443";
  std::string probe_listen = "127.0.0.1:8081";
  int threads = 0;  // completion-queue threads; 0: one per core
};

struct HttpConfig {
  std::string public_listen = "127.0.0.1:8080";  // OAuth routes
  std::string admin_listen = "127.0.0.1:9090";   // /healthz /readyz /metrics
  int threads = 1;
};

struct StoreConfig {
  std::string url = "memory:";  // the only backend so far; nothing survives a restart
};

struct LogConfig {
  std::string level = "info";   // trace, debug, info, warn, error
  std::string format = "text";  // text or json
};

// The whole configuration. Defaults are the embedded development setup: every listener on
// loopback, in-memory store.
struct Config {
  GrpcConfig grpc;
  HttpConfig http;
  StoreConfig store;
  LogConfig log;
};

// Parses YAML text. Unknown keys, wrong types and invalid values are errors naming the key
// (INVALID_ARGUMENT), so a typo never silently falls back to a default.
absl::StatusOr<Config> ParseConfig(absl::string_view yaml);
// Reads and parses a file. Errors: NOT_FOUND / PERMISSION_DENIED reading it, or ParseConfig's.
absl::StatusOr<Config> LoadConfigFile(const std::string& path);
// Checks cross-field rules (listeners parse as host:port, levels exist...).
absl::Status Validate(const Config& config);

// Splits "host:port" ("[::1]:80" for IPv6). Errors: INVALID_ARGUMENT.
struct HostPort {
  std::string host;
  int port = 0;
};
absl::StatusOr<HostPort> ParseHostPort(absl::string_view address);

}  // namespace tb::config

#endif  // TB_CONFIG_CONFIG_H_
