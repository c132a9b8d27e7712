#ifndef TB_HTTP_ADMIN_ROUTES_H_
#define TB_HTTP_ADMIN_ROUTES_H_

// Route functions for the two HTTP ports. Pure: no sockets, no Beast; the HttpServer calls them.

#include <functional>
#include <string>

#include "server/src/http/http_types.h"

namespace tb::http {

// Liveness, readiness and metrics sources, provided by main. Each is called on io threads,
// possibly concurrently, so each must be thread-safe and non-blocking. An empty `live` or `ready`
// counts as false (fail closed); an empty `metrics` makes /metrics a 404.
struct AdminState {
  std::function<bool()> live;
  std::function<bool()> ready;
  std::function<std::string()> metrics;  // Prometheus text exposition format 0.0.4
};

// The admin port. Matches on the path only (the query string is ignored):
//   GET|HEAD /healthz  200 "ok\n" if live(), else 503 "not live\n"
//   GET|HEAD /readyz   200 "ready\n" if ready(), else 503 "not ready\n"
//   GET|HEAD /metrics  200 "text/plain; version=0.0.4" with metrics(); 404 if metrics is empty
//   other methods on those paths: 405 with "Allow: GET, HEAD"; any other path: 404.
// HEAD responses carry the GET body; the server drops it on the wire.
Handler MakeAdminHandler(AdminState state);

// The public (internet-facing) port. Currently every request gets 404 "not found\n"; the OAuth
// routes are added here. Every response carries `Referrer-Policy: no-referrer` and
// `Content-Security-Policy: default-src 'none'; frame-ancestors 'none'`.
Handler MakePublicHandler();

}  // namespace tb::http

#endif  // TB_HTTP_ADMIN_ROUTES_H_
