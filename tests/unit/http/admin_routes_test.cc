#include "server/src/http/admin_routes.h"

#include <atomic>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <utility>

#include "gtest/gtest.h"
#include "server/src/http/http_types.h"

namespace tb::http {
namespace {

HttpRequest Request(std::string method, std::string target) {
  HttpRequest req;
  req.method = std::move(method);
  req.target = std::move(target);
  req.remote_address = "127.0.0.1";
  return req;
}

std::optional<std::string> Header(const HttpResponse& res, std::string_view name) {
  for (const auto& [n, v] : res.headers) {
    if (n == name) {
      return v;
    }
  }
  return std::nullopt;
}

AdminState State(bool live, bool ready) {
  AdminState state;
  state.live = [live] { return live; };
  state.ready = [ready] { return ready; };
  state.metrics = [] { return std::string("tb_up 1\n"); };
  return state;
}

TEST(AdminRoutesTest, HealthzIsOkWhenLive) {
  const Handler handler = MakeAdminHandler(State(/*live=*/true, /*ready=*/false));
  const HttpResponse res = handler(Request("GET", "/healthz"));
  EXPECT_EQ(res.status, 200);
  EXPECT_EQ(res.body, "ok\n");
  EXPECT_EQ(res.content_type, "text/plain; charset=utf-8");
}

TEST(AdminRoutesTest, HealthzIs503WhenNotLive) {
  const Handler handler = MakeAdminHandler(State(/*live=*/false, /*ready=*/true));
  const HttpResponse res = handler(Request("GET", "/healthz"));
  EXPECT_EQ(res.status, 503);
  EXPECT_EQ(res.body, "not live\n");
}

TEST(AdminRoutesTest, ReadyzFollowsReadiness) {
  const Handler ready = MakeAdminHandler(State(/*live=*/true, /*ready=*/true));
  EXPECT_EQ(ready(Request("GET", "/readyz")).status, 200);
  EXPECT_EQ(ready(Request("GET", "/readyz")).body, "ready\n");

  const Handler not_ready = MakeAdminHandler(State(/*live=*/true, /*ready=*/false));
  EXPECT_EQ(not_ready(Request("GET", "/readyz")).status, 503);
  EXPECT_EQ(not_ready(Request("GET", "/readyz")).body, "not ready\n");
}

TEST(AdminRoutesTest, ProbesAreEvaluatedOnEveryRequest) {
  auto ready = std::make_shared<std::atomic<bool>>(false);
  AdminState state = State(true, false);
  state.ready = [ready] { return ready->load(); };
  const Handler handler = MakeAdminHandler(std::move(state));
  EXPECT_EQ(handler(Request("GET", "/readyz")).status, 503);
  ready->store(true);
  EXPECT_EQ(handler(Request("GET", "/readyz")).status, 200);
}

TEST(AdminRoutesTest, HeadIsAllowedOnProbes) {
  const Handler handler = MakeAdminHandler(State(true, true));
  EXPECT_EQ(handler(Request("HEAD", "/healthz")).status, 200);
  EXPECT_EQ(handler(Request("HEAD", "/readyz")).status, 200);
  EXPECT_EQ(handler(Request("HEAD", "/metrics")).status, 200);
}

TEST(AdminRoutesTest, MissingProbeSourcesFailClosed) {
  const Handler handler = MakeAdminHandler(AdminState{});
  EXPECT_EQ(handler(Request("GET", "/healthz")).status, 503);
  EXPECT_EQ(handler(Request("GET", "/readyz")).status, 503);
}

TEST(AdminRoutesTest, MetricsServesPrometheusText) {
  const Handler handler = MakeAdminHandler(State(true, true));
  const HttpResponse res = handler(Request("GET", "/metrics"));
  EXPECT_EQ(res.status, 200);
  EXPECT_EQ(res.body, "tb_up 1\n");
  EXPECT_EQ(res.content_type, "text/plain; version=0.0.4");
}

TEST(AdminRoutesTest, MetricsIs404WithoutSource) {
  AdminState state = State(true, true);
  state.metrics = nullptr;
  const Handler handler = MakeAdminHandler(std::move(state));
  EXPECT_EQ(handler(Request("GET", "/metrics")).status, 404);
  EXPECT_EQ(handler(Request("POST", "/metrics")).status, 404);
}

TEST(AdminRoutesTest, OtherMethodsOnKnownPathsAre405WithAllow) {
  const Handler handler = MakeAdminHandler(State(true, true));
  for (const char* path : {"/healthz", "/readyz", "/metrics"}) {
    for (const char* method : {"POST", "PUT", "DELETE", "OPTIONS", "get"}) {
      const HttpResponse res = handler(Request(method, path));
      EXPECT_EQ(res.status, 405) << method << " " << path;
      EXPECT_EQ(Header(res, "Allow"), "GET, HEAD") << method << " " << path;
    }
  }
}

TEST(AdminRoutesTest, QueryStringIsIgnoredForRouting) {
  const Handler handler = MakeAdminHandler(State(true, true));
  EXPECT_EQ(handler(Request("GET", "/healthz?verbose=1")).status, 200);
  EXPECT_EQ(handler(Request("GET", "/readyz?")).status, 200);
  EXPECT_EQ(handler(Request("GET", "/metrics?name[]=x")).status, 200);
}

TEST(AdminRoutesTest, UnknownPathsAre404) {
  const Handler handler = MakeAdminHandler(State(true, true));
  for (const char* target : {"/", "/healthz/", "/HEALTHZ", "/healthzx", "/readyz/x", "x?/healthz",
                             "http://localhost/healthz", "*"}) {
    const HttpResponse res = handler(Request("GET", target));
    EXPECT_EQ(res.status, 404) << target;
    EXPECT_EQ(res.body, "not found\n") << target;
  }
}

TEST(PublicRoutesTest, EveryPathIs404WithSecurityHeaders) {
  const Handler handler = MakePublicHandler();
  for (const char* method : {"GET", "HEAD", "POST"}) {
    for (const char* target : {"/", "/healthz", "/oauth/callback?code=abc&state=xyz"}) {
      const HttpResponse res = handler(Request(method, target));
      EXPECT_EQ(res.status, 404) << method << " " << target;
      EXPECT_EQ(res.body, "not found\n");
      EXPECT_EQ(Header(res, "Referrer-Policy"), "no-referrer");
      EXPECT_EQ(Header(res, "Content-Security-Policy"),
                "default-src 'none'; frame-ancestors 'none'");
    }
  }
}

TEST(RequestPathTest, StripsTheQueryString) {
  EXPECT_EQ(RequestPath("/a/b?code=secret&state=s"), "/a/b");
  EXPECT_EQ(RequestPath("/a/b"), "/a/b");
  EXPECT_EQ(RequestPath("?x"), "");
  EXPECT_EQ(RequestPath(""), "");
}

}  // namespace
}  // namespace tb::http
