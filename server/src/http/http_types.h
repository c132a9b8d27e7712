#ifndef TB_HTTP_HTTP_TYPES_H_
#define TB_HTTP_HTTP_TYPES_H_

// Plain HTTP request/response values exchanged between the Beast server (http_server.cc, the only
// file that knows Beast) and the pure route functions (admin_routes.cc, later the OAuth routes).
// Nothing here names Boost, so route code and its tests stay framework-free.

#include <functional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace tb::http {

struct HttpRequest {
  std::string method;  // as sent, e.g. "GET"; HTTP methods are case-sensitive
  std::string target;  // origin-form request target: path + optional "?query"
  // Header fields in arrival order, names as sent: compare names case-insensitively.
  std::vector<std::pair<std::string, std::string>> headers;
  // The socket peer's IP address without the port (IPv6 without brackets; an IPv4 peer of a
  // dual-stack socket may read "::ffff:a.b.c.d"); empty if unknown. What a proxy says the client
  // was is in `headers`: ClientIpResolver (client_ip.h) decides whether to believe it.
  std::string remote_address;
  std::string body;
};

struct HttpResponse {
  int status = 200;  // 200..599; anything else is replaced by a 500 by the server
  std::string content_type = "text/plain; charset=utf-8";
  std::string body;  // dropped by the server for HEAD (Content-Length is kept)
  // Extra header fields. The server owns Content-Length, Transfer-Encoding, Connection, Server,
  // Content-Type (use `content_type`) and X-Content-Type-Options, and ignores them here.
  // A Cache-Control, Content-Security-Policy, Referrer-Policy or X-Frame-Options set here
  // replaces the server's default for that field (http_server.h lists them).
  std::vector<std::pair<std::string, std::string>> headers;
};

// Maps a request to a response. Must be pure and non-blocking: the server calls it on its io
// threads, possibly concurrently from several of them, and never holds a lock while doing so.
using Handler = std::function<HttpResponse(const HttpRequest&)>;

// Completes one request. Call it exactly once, from any thread (later calls are ignored).
using Respond = std::function<void(HttpResponse)>;
// A handler that may finish later, e.g. after blocking work on another thread pool (the OAuth
// callback's code exchange). It must itself return at once; the server keeps the connection
// waiting, and Stop() waits for every pending Respond before it joins.
using AsyncHandler = std::function<void(HttpRequest, Respond)>;

// The path part of a request target: everything before the first '?'. Query strings carry OAuth
// codes and state, so this is also what may be logged.
inline std::string_view RequestPath(std::string_view target) {
  return target.substr(0, target.find('?'));
}

}  // namespace tb::http

#endif  // TB_HTTP_HTTP_TYPES_H_
