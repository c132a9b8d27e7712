#ifndef TB_HTTP_CLIENT_IP_H_
#define TB_HTTP_CLIENT_IP_H_

// Who is asking: the client IP address of a request on the public port, for the per-client rate
// limit. The socket peer, unless the peer is one of the configured trusted proxies; then the
// address that proxy reports in the configured header. Beast-free (POSIX inet_pton underneath).

#include <array>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "server/src/http/http_types.h"

namespace tb::http {

// An IPv4 or IPv6 address. IPv4-mapped IPv6 addresses (::ffff:a.b.c.d, as a dual-stack socket
// reports IPv4 peers) are IPv4.
struct IpAddress {
  bool v6 = false;
  std::array<uint8_t, 16> bytes{};  // IPv4: the first 4

  int bits() const { return v6 ? 128 : 32; }
  // Canonical text (inet_ntop): "192.0.2.1", "2001:db8::1".
  std::string ToString() const;
  bool operator==(const IpAddress& other) const = default;
};

// Parses an IP literal. A zone ("fe80::1%eth0") is dropped. Errors: INVALID_ARGUMENT.
absl::StatusOr<IpAddress> ParseIpAddress(absl::string_view text);

// An address range: "10.0.0.0/8", "2001:db8::/32", or a single address ("192.0.2.7" is /32,
// "::1" is /128).
struct IpRange {
  IpAddress base;  // host bits zero
  int prefix_len = 0;

  bool Contains(const IpAddress& ip) const;
};

// Errors: INVALID_ARGUMENT naming `text` (not an address, a prefix length out of range, host
// bits set as in "10.0.0.1/8": almost always a typo for another range).
absl::StatusOr<IpRange> ParseIpRange(absl::string_view text);

struct ClientIpOptions {
  // A header such as "X-Forwarded-For": a comma-separated list of addresses, each proxy
  // appending the address it received the request from. Empty: the socket peer is the client.
  std::string trusted_proxy_header;
  // CIDRs of the proxies whose header is believed. Empty: the header is never believed.
  std::vector<std::string> trusted_proxies;
};

// Resolves the client address of a request. Thread-safe (immutable after Create).
class ClientIpResolver {
 public:
  // Errors: INVALID_ARGUMENT naming the bad trusted_proxies entry, or a header name that is not
  // a valid HTTP field name.
  static absl::StatusOr<ClientIpResolver> Create(const ClientIpOptions& options);

  // The socket peer (HttpRequest::remote_address) when it is not a trusted proxy or no header is
  // configured. From a trusted proxy: the rightmost address in the header (every field of that
  // name, in order) that is not itself a trusted proxy; if every listed address is trusted, the
  // leftmost; if the entry to take is not an address, the nearest trusted hop to its right
  // (never something a client chose). nullopt only when the peer address itself is unknown or
  // unparsable.
  std::optional<IpAddress> Resolve(const HttpRequest& req) const;

  bool IsTrustedProxy(const IpAddress& ip) const;

 private:
  ClientIpResolver() = default;

  std::string header_;
  std::vector<IpRange> trusted_;
};

}  // namespace tb::http

#endif  // TB_HTTP_CLIENT_IP_H_
