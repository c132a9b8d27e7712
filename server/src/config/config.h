#ifndef TB_CONFIG_CONFIG_H_
#define TB_CONFIG_CONFIG_H_

#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "server/src/auth/authorizer.h"
#include "server/src/common/secret.h"
#include "server/src/core/provider_spec.h"

namespace tb::config {

// Every listener is "host:port"; port 0 picks a free port (tests).
// A certificate and its key in PEM files, re-read when they change on disk (cert-manager).
struct TlsFiles {
  std::string cert_file;
  std::string key_file;
  std::string client_ca_file;  // gRPC only: verify client certificates against it (mTLS)
  absl::Duration reload_interval = absl::Seconds(60);
};

struct GrpcConfig {
  std::string listen = "127.0.0.1:8443";
  std::string probe_listen = "127.0.0.1:8081";
  int threads = 0;  // completion-queue threads; 0: one per core
  // Open WatchToken streams at most, in all and per caller.
  int max_watch_streams = 10'000;
  int max_watch_streams_per_caller = 1'000;
  // TLS on the main port. Unset: plaintext, allowed only on a loopback listener.
  std::optional<TlsFiles> tls;
  // Development only: no TLS and no caller authentication. Loud at start; refused on a
  // non-loopback listener unless --allow_insecure_grpc_on_non_loopback.
  bool insecure = false;
  bool reflection = true;  // server reflection on the main port (the schema, no data)
};

struct HttpConfig {
  std::string public_listen = "127.0.0.1:8080";  // OAuth routes
  std::string admin_listen = "127.0.0.1:9090";   // /healthz /readyz /metrics
  int threads = 1;
  // Limits of the public front (it faces the internet).
  int max_header_bytes = 8 * 1024;
  int max_body_bytes = 4 * 1024;
  absl::Duration read_timeout = absl::Seconds(10);  // a whole request must arrive within
  absl::Duration idle_timeout = absl::Seconds(30);  // keep-alive between requests
  int max_connections = 1024;
  // Per client IP on /oauth/*: a token bucket of `rate_limit_burst` refilled at
  // `rate_limit_per_minute`. 0: no limit.
  int rate_limit_per_minute = 60;
  int rate_limit_burst = 20;
  // The client IP comes from this header (e.g. X-Forwarded-For, rightmost untrusted entry)
  // only when the peer is one of `trusted_proxies` (CIDRs); otherwise from the socket.
  std::string trusted_proxy_header;
  std::vector<std::string> trusted_proxies;
  std::optional<TlsFiles> tls;  // HTTPS on the public port
};

// SIGTERM: readiness goes NOT_SERVING, then after `drain_delay` (load balancers notice) the
// listeners stop accepting and in-flight calls get up to `grace` to finish.
struct ShutdownConfig {
  absl::Duration drain_delay = absl::Seconds(5);
  absl::Duration grace = absl::Seconds(20);
};

// Who may call the gRPC API (auth::CallerRule), from the file `callers_file` (re-read when it
// changes) and/or inline.
struct AuthConfig {
  std::string callers_file;
  std::vector<auth::CallerRule> callers;
};

struct StoreConfig {
  // sqlite:///abs/path/tokens.db (one process owns the file), postgres://... (several
  // replicas), or memory: (tests; nothing survives a restart).
  std::string url = "sqlite:///var/lib/token-broker/tokens.db";
  // The encryption key ring (lines "<key-id> <base64 of 32 bytes>", the last one seals), from
  // `encryption_keys_file` or `encryption_keys_env`. Required by sqlite: and postgres:.
  std::optional<KeyMaterial> encryption_keys;
  std::string encryption_keys_source;  // the file or "env VAR", for messages
  // postgres: connections in the pool, and the bound on every statement.
  int pool_size = 4;
  absl::Duration statement_timeout = absl::Seconds(5);
};

struct LogConfig {
  std::string level = "info";   // trace, debug, info, warn, error
  std::string format = "text";  // text or json
};

// When and how tokens are refreshed (README, "Refresh").
struct RefreshConfig {
  absl::Duration margin = absl::Minutes(5);       // refresh this long before expiry...
  absl::Duration max_jitter = absl::Seconds(30);  // ...plus up to this random delay
  // Zero: refresh every connection ahead. Positive: only those used within this window; idle
  // ones refresh on next use, and before half their refresh token's lifetime has passed.
  absl::Duration hot_window = absl::ZeroDuration();
  absl::Duration provider_timeout = absl::Seconds(30);
  absl::Duration caller_refresh_interval = absl::Seconds(10);  // Refresh RPC, per connection
  absl::Duration retry_delay = absl::Seconds(30);              // after a failed refresh...
  absl::Duration retry_max = absl::Minutes(5);                 // ...doubling up to this
  absl::Duration store_outage_margin = absl::Minutes(2);       // refresh anyway this near expiry
  int max_concurrent = 16;                                     // scheduled refreshes in flight
  absl::Duration max_min_ttl = absl::Hours(1);  // GetToken.min_ttl above: INVALID_ARGUMENT
  absl::Duration max_wait = absl::Seconds(60);  // longest GetToken wait, whatever the deadline
};

struct LinksConfig {
  // HMAC key for connect links, from `signing_key_file` or `signing_key_env`. Unset: main
  // generates a random key at start (links then die with the process) and warns.
  std::optional<KeyMaterial> signing_key;
  absl::Duration default_ttl = absl::Hours(72);
  absl::Duration max_ttl = absl::Hours(24 * 30);
  // Where a connect link may send the account admin after the flow (a link's return_url must
  // start with one of these). Empty: links carry no return URL.
  std::vector<std::string> return_url_allowlist;
};

struct OutboundConfig {
  // Proxy for outbound HTTPS; when unset in the file, main fills them from HTTPS_PROXY and
  // NO_PROXY (or their lower-case forms).
  std::optional<std::string> https_proxy;
  std::optional<std::string> no_proxy;
};

// The whole configuration. Defaults are the embedded development setup: every listener on
// loopback, in-memory store, no providers.
struct Config {
  GrpcConfig grpc;
  HttpConfig http;
  StoreConfig store;
  LogConfig log;
  RefreshConfig refresh;
  AuthConfig auth;
  ShutdownConfig shutdown;
  // The broker's origin as browsers see it; redirect_uri and link URLs are built from it.
  std::string public_base_url = "http://127.0.0.1:8080";
  LinksConfig links;
  OutboundConfig outbound;
  core::ProviderRegistry providers;  // by name; each built from its preset plus overrides
};

// Where secrets named by `*_env` keys come from. main passes getenv; tests pass a map.
using EnvLookup = std::function<std::optional<std::string>(const std::string& name)>;

// Parses YAML text. Unknown keys, wrong types and invalid values are errors naming the key
// (INVALID_ARGUMENT), so a typo never silently falls back to a default. Secret values are read
// from `*_file` paths (trailing newline trimmed) or `*_env` variables through `env`; a secret
// never appears in the file itself.
absl::StatusOr<Config> ParseConfig(absl::string_view yaml, const EnvLookup& env = nullptr);
// Reads and parses a file. Errors: NOT_FOUND / PERMISSION_DENIED reading it, or ParseConfig's.
absl::StatusOr<Config> LoadConfigFile(const std::string& path, const EnvLookup& env = nullptr);

// The callers file (auth.callers_file): a YAML list of callers, the same shape as auth.callers:
//   - name: billing
//     uri_sans: ["spiffe://corp.example/ns/billing/sa/api"]
//     common_names: [billing.corp.example]
//     api_key_sha256: ["<64 hex digits>"]
//     connections: ["acme", "zd-*"]
//     rpcs: [GetToken, Refresh]          # GetToken (with WatchToken), Refresh, Revoke, Admin
// Errors: NOT_FOUND / PERMISSION_DENIED reading it, INVALID_ARGUMENT naming the entry.
absl::StatusOr<std::vector<auth::CallerRule>> ParseCallers(absl::string_view yaml,
                                                           absl::string_view source);
absl::StatusOr<std::vector<auth::CallerRule>> LoadCallersFile(const std::string& path);
// Checks every value (listeners parse as host:port, levels exist...), as ParseConfig does, and
// that a durable store has its encryption keys. main runs it after its flag overrides (so that
// --store_url=memory: needs no keys).
absl::Status ValidateFields(const Config& config);
absl::Status Validate(const Config& config);

// Splits "host:port" ("[::1]:80" for IPv6). Errors: INVALID_ARGUMENT.
struct HostPort {
  std::string host;
  int port = 0;
};
absl::StatusOr<HostPort> ParseHostPort(absl::string_view address);

}  // namespace tb::config

#endif  // TB_CONFIG_CONFIG_H_
