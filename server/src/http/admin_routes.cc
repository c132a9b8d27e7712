#include "server/src/http/admin_routes.h"

#include <string_view>
#include <utility>

namespace tb::http {
namespace {

constexpr char kPrometheusContentType[] = "text/plain; version=0.0.4";

HttpResponse Text(int status, std::string body) {
  HttpResponse res;
  res.status = status;
  res.body = std::move(body);
  return res;
}

HttpResponse NotFound() { return Text(404, "not found\n"); }

HttpResponse MethodNotAllowed() {
  HttpResponse res = Text(405, "method not allowed\n");
  res.headers.emplace_back("Allow", "GET, HEAD");
  return res;
}

bool IsGetOrHead(const HttpRequest& req) { return req.method == "GET" || req.method == "HEAD"; }

// A probe whose source is missing reports failure: a wiring mistake must not look healthy.
bool Probe(const std::function<bool()>& f) { return f && f(); }

HttpResponse RouteAdmin(const AdminState& state, const HttpRequest& req) {
  const std::string_view path = RequestPath(req.target);
  if (path == "/healthz") {
    if (!IsGetOrHead(req)) {
      return MethodNotAllowed();
    }
    return Probe(state.live) ? Text(200, "ok\n") : Text(503, "not live\n");
  }
  if (path == "/readyz") {
    if (!IsGetOrHead(req)) {
      return MethodNotAllowed();
    }
    return Probe(state.ready) ? Text(200, "ready\n") : Text(503, "not ready\n");
  }
  if (path == "/metrics" && state.metrics) {
    if (!IsGetOrHead(req)) {
      return MethodNotAllowed();
    }
    HttpResponse res = Text(200, state.metrics());
    res.content_type = kPrometheusContentType;
    return res;
  }
  return NotFound();
}

// The OAuth routes (start, callback) are dispatched here when they arrive.
HttpResponse RoutePublic(const HttpRequest& /*req*/) { return NotFound(); }

// The public port only ever serves plain text and redirects: forbid any active content and
// framing, and keep OAuth URLs (codes, state) out of Referer headers sent onwards.
void AddPublicSecurityHeaders(HttpResponse* res) {
  res->headers.emplace_back("Referrer-Policy", "no-referrer");
  res->headers.emplace_back("Content-Security-Policy",
                            "default-src 'none'; frame-ancestors 'none'");
}

}  // namespace

Handler MakeAdminHandler(AdminState state) {
  return [state = std::move(state)](const HttpRequest& req) { return RouteAdmin(state, req); };
}

Handler MakePublicHandler() {
  return [](const HttpRequest& req) {
    HttpResponse res = RoutePublic(req);
    AddPublicSecurityHeaders(&res);
    return res;
  };
}

}  // namespace tb::http
