#ifndef TB_HTTP_HTTP_SERVER_H_
#define TB_HTTP_HTTP_SERVER_H_

// A small HTTP/1.1 server (Boost.Beast underneath, hidden in http_server.cc) that hands every
// request to a pure Handler. Used for the admin port (health, readiness, metrics) and the public
// port (OAuth callbacks).

#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "server/src/http/http_types.h"

namespace tb::http {

// HTTPS: a PEM certificate chain (leaf first, then intermediates) and its unencrypted PEM private
// key. TLS 1.2 and 1.3 only.
struct HttpTlsOptions {
  std::string cert_file;
  std::string key_file;
  // How often the files are looked at again (on accept, at most this often; a stat() of each).
  // When either changed (modification time, size or inode: cert-manager's atomic symlink swap
  // changes them), the pair is loaded into a new TLS context that every new connection uses;
  // connections already open keep the certificate they started with. A new pair that does not
  // load (half-written, key not matching the certificate) is logged and counted, and the previous
  // pair stays in use until the files change again.
  absl::Duration reload_interval = absl::Seconds(60);
};

// Certificate reloads of an HTTPS server since it started (the initial load not counted).
struct TlsReloadStats {
  uint64_t reloaded = 0;  // new pairs taken into use
  uint64_t failed = 0;    // changed pairs that did not load (the old pair kept serving)
};

struct HttpServerOptions {
  // IPv4 or IPv6 literal; host names are not resolved.
  std::string address = "127.0.0.1";
  // 0 lets the OS pick one; HttpServer::port() tells which.
  int port = 0;
  // io threads running the server.
  int threads = 1;
  // Request line plus header fields; a larger request gets 431.
  size_t max_header_bytes = 8 * 1024;
  // A larger request body gets 413.
  size_t max_body_bytes = 64 * 1024;
  // Budget for reading one whole request (from its first byte, or from accept for the first
  // request on a connection), and for writing one response.
  absl::Duration read_timeout = absl::Seconds(10);
  // How long a keep-alive connection may sit idle between requests.
  absl::Duration idle_timeout = absl::Seconds(30);
  // Open connections beyond this are accepted and closed at once.
  size_t max_connections = 1024;
  // Names the server in logs.
  std::string name = "http";
  // Set: the port speaks HTTPS only (a client speaking plain HTTP fails the handshake and is
  // closed). The TLS handshake counts against read_timeout of the first request.
  std::optional<HttpTlsOptions> tls;
};

// Serves HTTP/1.x (optionally over TLS) on its own io_context threads. Every connection has its own
// strand; the handler runs on the io thread that read the request. Every response, the server's
// own error responses included, carries `Server: token-broker`, `X-Content-Type-Options: nosniff`
// and, unless the handler set its own value of that field:
//   Cache-Control: no-store
//   Content-Security-Policy: default-src 'none'; frame-ancestors 'none'
//   Referrer-Policy: no-referrer
//   X-Frame-Options: DENY
// Malformed requests get 400 (431 header too large, 413 body too large) and the connection is
// closed. Per-request debug logs show method, path without the query string, status and latency.
//
// Thread-safe: port() and Stop() may be called from any thread.
class HttpServer {
 public:
  // Validates `options`, binds, listens and starts serving before returning. `handler` is kept
  // and called until Stop() returns.
  // Errors: kInvalidArgument (address is not an IP literal, port out of range, threads < 1,
  // max_connections or max_header_bytes == 0, timeouts not positive and finite, empty handler;
  // with tls: a file missing or unreadable, not PEM, a key that does not match the certificate,
  // reload_interval not positive and finite: the message names the file);
  // kUnavailable (socket, bind or listen failed: the message names the address and the OS error;
  // also if the io threads cannot be created).
  static absl::StatusOr<std::unique_ptr<HttpServer>> Start(HttpServerOptions options,
                                                           Handler handler);
  // The same with a handler that answers later through Respond.
  static absl::StatusOr<std::unique_ptr<HttpServer>> Start(HttpServerOptions options,
                                                           AsyncHandler handler);

  HttpServer(const HttpServer&) = delete;
  HttpServer& operator=(const HttpServer&) = delete;
  ~HttpServer();  // Stop()s. Must not run on one of the server's own io threads.

  // The bound port: the OS-chosen one when options.port was 0.
  int port() const;

  // Certificate reloads so far; all zero without TLS.
  TlsReloadStats tls_stats() const;

  // Stops accepting, closes every connection (in-flight responses are dropped), waits for every
  // pending async Respond, and joins the io threads; when it returns, the port is closed and the
  // handler is no longer called. Idempotent. Called from inside the handler (an io thread) it only
  // starts the shutdown; the join then happens in a later Stop() or the destructor on another
  // thread.
  void Stop();

 private:
  class Impl;
  explicit HttpServer(std::unique_ptr<Impl> impl);

  std::unique_ptr<Impl> impl_;
};

}  // namespace tb::http

#endif  // TB_HTTP_HTTP_SERVER_H_
