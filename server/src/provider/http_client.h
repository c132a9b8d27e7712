#ifndef TB_PROVIDER_HTTP_CLIENT_H_
#define TB_PROVIDER_HTTP_CLIENT_H_

// A small blocking HTTP/1.1 client for the provider adapter: TLS that verifies the peer and its
// host name, keep-alive connection reuse, an HTTPS_PROXY CONNECT tunnel, and a deadline on every
// call. Beast-free: Boost.Beast/Asio and OpenSSL live only in http_client.cc.

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"

namespace tb::provider {

struct HttpClientOptions {
  // Extra CA bundle (PEM), trusted in addition to the system trust store; empty: the system
  // trust store only.
  std::string ca_file;
  // Bound on TCP connect + proxy CONNECT + TLS handshake of a new connection (capped by the
  // call's deadline).
  absl::Duration connect_timeout = absl::Seconds(5);
  // "http://[user:password@]proxy:3128" (or "proxy:3128"): https:// requests go through an HTTP
  // CONNECT tunnel there. Empty: direct. Plain http:// requests never use it. main.cc reads
  // HTTPS_PROXY / https_proxy and passes it here: nobody else calls getenv.
  std::string https_proxy;
  // NO_PROXY list: hosts reached directly even with a proxy (see internal::BypassProxy: "*",
  // domains with or without a leading dot, IP addresses, CIDR blocks, optional ":port").
  std::string no_proxy;
  // Idle keep-alive connections kept per (scheme, host, port); 0 disables reuse.
  size_t max_idle_per_host = 8;
  // An idle connection older than this is closed instead of reused.
  absl::Duration idle_timeout = absl::Seconds(60);
};

struct HttpRequest {
  std::string method;  // "GET", "POST", "DELETE", ...
  std::string url;     // absolute http:// or https:// URL
  // Sent as given (a later header of the same name replaces an earlier one). Host and
  // User-Agent are set by the client unless given here; Content-Length is set from the body.
  std::vector<std::pair<std::string, std::string>> headers;
  std::string body;
};

struct HttpResponse {
  int status = 0;
  std::vector<std::pair<std::string, std::string>> headers;
  std::string body;

  // The first value of header `name` (ASCII case-insensitive), or "".
  std::string Header(absl::string_view name) const;
};

// Counters, for tests and metrics.
struct HttpClientStats {
  uint64_t requests = 0;            // Send calls that got as far as a connection
  uint64_t connections_opened = 0;  // new TCP connections (to the proxy when tunnelling)
  uint64_t connections_reused = 0;  // requests sent on a pooled connection
  uint64_t retries = 0;             // requests retried on a fresh connection
};

// Thread-safe: any number of threads may Send at once; each pooled connection is used by one
// call at a time. Every call blocks the calling thread (a worker thread, never a gRPC or HTTP
// front thread) until the response or `deadline`.
class HttpClient {
 public:
  virtual ~HttpClient() = default;

  // Errors: INVALID_ARGUMENT for an unreadable CA file, a bad proxy URL or a non-positive
  // connect timeout.
  static absl::StatusOr<std::unique_ptr<HttpClient>> Create(HttpClientOptions options);

  // Sends `request` and reads the whole response (body at most 1 MiB). Any HTTP status is OK at
  // this level; redirects are not followed.
  // https:// verifies the certificate chain against the trust store and the certificate against
  // the URL's host (DNS name or IP address), with SNI for names. A pooled connection that proves
  // dead before any response byte is read is retried once on a fresh connection, but only for
  // GET, HEAD and DELETE: a POST to a token endpoint is never resent, because the provider may
  // already have rotated the refresh token.
  // Errors: UNAVAILABLE (DNS, connect, proxy, TLS handshake or verification, reset, oversized or
  // malformed response; the message names host:port and the cause, never the path or query),
  // DEADLINE_EXCEEDED (`deadline` passed), INVALID_ARGUMENT (bad URL, method or header).
  // Host-name resolution uses the system resolver synchronously, bounded by its own timeouts
  // (resolv.conf) rather than by `deadline`; the deadline is checked when it returns.
  virtual absl::StatusOr<HttpResponse> Send(const HttpRequest& request, absl::Time deadline) = 0;

  virtual HttpClientStats stats() const = 0;
};

}  // namespace tb::provider

#endif  // TB_PROVIDER_HTTP_CLIENT_H_
