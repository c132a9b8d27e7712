#ifndef TB_PROVIDER_INTERNAL_HTTP_UTIL_H_
#define TB_PROVIDER_INTERNAL_HTTP_UTIL_H_

// Pure helpers of the outbound HTTP client: URL parsing, proxy URL parsing and NO_PROXY matching.
// No I/O; private to tb_provider (exposed for its unit tests).

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace tb::provider::internal {

// An absolute http:// or https:// URL, split for a request.
struct ParsedUrl {
  bool tls = false;         // https
  std::string host;         // lower case, IPv6 without brackets: "acme.zendesk.com", "::1"
  uint16_t port = 0;        // explicit, or 443 / 80
  std::string target;       // origin-form request target: path and query, "/" when empty
  std::string host_header;  // "host" or "host:port" when the port is not the default; IPv6 in []
  std::string authority;    // "host:port" always (IPv6 in []), for CONNECT
  std::string origin;       // "https://host:port": the connection pool's key
};

// Parses `url` (Boost.URL). Userinfo is refused (credentials never go in a URL here), the
// fragment is dropped. Errors: INVALID_ARGUMENT naming the problem, without the URL's query.
absl::StatusOr<ParsedUrl> ParseHttpUrl(absl::string_view url);

// Where to send CONNECT requests.
struct ProxyConfig {
  std::string host;
  uint16_t port = 0;
  // "Basic <base64(user:password)>" when the proxy URL carried userinfo, else empty. A
  // credential: never logged.
  std::string authorization;
};

// Parses an HTTPS_PROXY value: "http://[user:password@]host[:port][/]" or "host:port" (curl
// accepts a bare authority too). The port defaults to 80. Only http:// proxies (TLS runs inside
// the tunnel). Errors: INVALID_ARGUMENT; the message never repeats the value, which may hold a
// password.
absl::StatusOr<ProxyConfig> ParseProxyUrl(absl::string_view url);

// True when `host`:`port` must be reached directly according to `no_proxy`, a NO_PROXY list:
// comma-separated entries, each "*" (everything), a domain ("example.com" and ".example.com"
// both match example.com and every subdomain; "*.example.com" is read as ".example.com"), an IP
// address (compared as an address, "::1" == "0:0::1"), or a CIDR block ("10.0.0.0/8",
// "fd00::/8"). An entry may end in ":port" ("[::1]:8443" for IPv6) to match only that port.
// Domain entries never match IP hosts by suffix. Matching ignores case and a trailing dot.
bool BypassProxy(absl::string_view no_proxy, absl::string_view host, uint16_t port);

}  // namespace tb::provider::internal

#endif  // TB_PROVIDER_INTERNAL_HTTP_UTIL_H_
