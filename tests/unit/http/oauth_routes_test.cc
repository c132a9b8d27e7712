#include "server/src/http/oauth_routes.h"

#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "gtest/gtest.h"
#include "server/src/core/provider_presets.h"
#include "server/src/crypto/openssl_digest.h"
#include "server/src/crypto/openssl_random.h"
#include "server/src/store/in_memory_flow_store.h"
#include "server/src/store/in_memory_token_store.h"
#include "tests/fakes/fake_clock.h"
#include "tests/fakes/fake_provider_client.h"
#include "tests/support/test_secrets.h"

namespace tb::http {
namespace {

TEST(OAuthRoutesTest, ParseQueryDecodesFormEncoding) {
  absl::StatusOr<std::map<std::string, std::string>> q =
      ParseQuery("state=a%2Fb&code=x+y&error_description=%E2%9C%93&empty=&flag");
  ASSERT_TRUE(q.ok()) << q.status();
  EXPECT_EQ(q->at("state"), "a/b");
  EXPECT_EQ(q->at("code"), "x y");
  EXPECT_EQ(q->at("error_description"), "\u2713");
  EXPECT_EQ(q->at("empty"), "");
  EXPECT_EQ(q->at("flag"), "");
  EXPECT_TRUE(ParseQuery("")->empty());
  // An encoded '+' stays a '+' (a code such as "4/0Ae+q7w"); only a literal '+' is a space.
  absl::StatusOr<std::map<std::string, std::string>> plus =
      ParseQuery("code=4%2F0Ae%2Bq7w+x&state=%2B+%2B");
  ASSERT_TRUE(plus.ok()) << plus.status();
  EXPECT_EQ(plus->at("code"), "4/0Ae+q7w x");
  EXPECT_EQ(plus->at("state"), "+ +");
}

TEST(OAuthRoutesTest, ParseQueryRejectsGarbage) {
  for (const char* bad : {"state=%zz", "state=%4", "a=1&a=2", "state=%00%"}) {
    EXPECT_EQ(ParseQuery(bad).status().code(), absl::StatusCode::kInvalidArgument) << bad;
  }
  std::string many;
  for (int i = 0; i < 40; ++i) {
    absl::StrAppend(&many, "p", i, "=1&");
  }
  EXPECT_FALSE(ParseQuery(many).ok());
}

TEST(OAuthRoutesTest, CookieValueFindsTheNamedCookie) {
  HttpRequest req;
  req.headers = {{"Cookie", "a=1; tb_oauth=xyz; b=2"}, {"cookie", "c=3"}};
  EXPECT_EQ(CookieValue(req, "tb_oauth"), "xyz");
  EXPECT_EQ(CookieValue(req, "c"), "3");
  EXPECT_EQ(CookieValue(req, "tb"), "");
  EXPECT_EQ(BindingCookieName(true), "__Host-tb_oauth");
  EXPECT_EQ(BindingCookieName(false), "tb_oauth");
}

TEST(OAuthRoutesTest, HtmlEscapeCoversEveryMetacharacter) {
  EXPECT_EQ(HtmlEscape("<a href=\"x\">'&'</a>"),
            "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;");
}

std::optional<std::string> Header(const HttpResponse& res, absl::string_view name) {
  for (const auto& [n, v] : res.headers) {
    if (absl::EqualsIgnoreCase(n, name)) {
      return v;
    }
  }
  return std::nullopt;
}

int HeaderCount(const HttpResponse& res, absl::string_view name) {
  int n = 0;
  for (const auto& header : res.headers) {
    n += absl::EqualsIgnoreCase(header.first, name);
  }
  return n;
}

std::string QueryParam(const std::string& url, const std::string& key) {
  const size_t q = url.find('?');
  for (absl::string_view kv : absl::StrSplit(url.substr(q + 1), '&')) {
    if (absl::StartsWith(kv, key + "=")) {
      return std::string(kv.substr(key.size() + 1));
    }
  }
  return "";
}

// The handler over a real AuthorizationFlow (in-memory stores, scripted provider client), with
// the flow's blocking calls run inline so that every response is there when Handle returns.
class OAuthHandlerTest : public ::testing::Test {
 protected:
  OAuthHandlerTest() {
    core::ProviderSpec zendesk = *core::PresetSpec("zendesk");
    zendesk.name = "zendesk";
    zendesk.client_id = "broker";
    zendesk.client_secret = ClientSecret(testing::NewTestSecret("client-secret"));
    providers_.Put("zendesk", zendesk);
    options_.public_base_url = "https://broker.example.com";
    options_.link_key = KeyMaterial(testing::NewTestSecret("link-key"));
    options_.return_url_allowlist = {"https://app.example.com/connected"};
    flow_ = std::make_unique<oauth::AuthorizationFlow>(
        options_, providers_, clock_, random_, digest_, flow_store_, provider_, broker_, revoker_);
    UseRoutes({});
  }

  void UseRoutes(OAuthRoutesOptions routes) {
    routes.secure_cookies = false;
    handler_ = MakeOAuthHandler(
        *flow_, [](std::function<void()> task) { task(); }, std::move(routes));
  }

  HttpResponse Handle(const std::string& method, const std::string& target,
                      const std::string& peer = "192.0.2.1", const std::string& cookie = "") {
    HttpRequest req;
    req.method = method;
    req.target = target;
    req.remote_address = peer;
    if (!cookie.empty()) {
      req.headers.emplace_back("Cookie", cookie);
    }
    std::optional<HttpResponse> out;
    handler_(std::move(req), [&out](HttpResponse res) { out = std::move(res); });
    EXPECT_TRUE(out.has_value()) << method << " " << target;
    return out.value_or(HttpResponse{});
  }

  static void ExpectSecurityHeaders(const HttpResponse& res, const std::string& what) {
    EXPECT_EQ(Header(res, "Content-Security-Policy"),
              "default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'")
        << what;
    EXPECT_EQ(Header(res, "Referrer-Policy"), "no-referrer") << what;
    EXPECT_EQ(Header(res, "Cache-Control"), "no-store") << what;
    EXPECT_EQ(Header(res, "X-Frame-Options"), "DENY") << what;
    EXPECT_EQ(HeaderCount(res, "Content-Security-Policy"), 1) << what;
    EXPECT_FALSE(absl::StrContains(res.body, "<style")) << what;
    EXPECT_FALSE(absl::StrContains(res.body, "style=")) << what;
    EXPECT_FALSE(absl::StrContains(res.body, "<script")) << what;
  }

  core::ProviderDirectory providers_;
  oauth::FlowOptions options_;
  testing::FakeClock clock_;
  crypto::OpenSslRandom random_;
  crypto::OpenSslDigest digest_;
  store::InMemoryFlowStore flow_store_;
  store::InMemoryTokenStore token_store_;
  cache::ConnectionCache cache_;
  oauth::Broker broker_{clock_, token_store_, cache_};
  testing::FakeProviderClient provider_;
  oauth::Revoker revoker_{{}, providers_, clock_, broker_, provider_};
  std::unique_ptr<oauth::AuthorizationFlow> flow_;
  AsyncHandler handler_;
};

TEST_F(OAuthHandlerTest, EveryAnswerCarriesTheSecurityHeaders) {
  const HttpResponse not_found = Handle("GET", "/oauth/nope");
  EXPECT_EQ(not_found.status, 404);
  ExpectSecurityHeaders(not_found, "404");
  for (const char* method : {"POST", "PUT", "DELETE", "OPTIONS", "TRACE", "get"}) {
    for (const char* path : {"/oauth/start", "/oauth/callback"}) {
      const HttpResponse res = Handle(method, path);
      EXPECT_EQ(res.status, 405) << method << " " << path;
      EXPECT_EQ(Header(res, "Allow"), "GET, HEAD");
      ExpectSecurityHeaders(res, "405");
    }
  }
  const HttpResponse bad_link = Handle("GET", "/oauth/start?link=garbage");
  EXPECT_EQ(bad_link.status, 400);
  ExpectSecurityHeaders(bad_link, "bad link");
  const HttpResponse head = Handle("HEAD", "/oauth/callback?state=unknown&code=x");
  EXPECT_EQ(head.status, 400);
  ExpectSecurityHeaders(head, "bad state");
}

TEST_F(OAuthHandlerTest, OverTheLimitIs429WithRetryAfterPerClient) {
  RateLimitOptions limit;
  limit.per_minute = 2;
  limit.burst = 3;
  OAuthRoutesOptions routes;
  routes.rate_limiter = *ClientRateLimiter::Create(limit, clock_);
  UseRoutes(std::move(routes));
  // Every /oauth/ path counts, known or not, whatever the method.
  EXPECT_EQ(Handle("GET", "/oauth/start").status, 400);
  EXPECT_EQ(Handle("POST", "/oauth/callback").status, 405);
  EXPECT_EQ(Handle("GET", "/oauth/other").status, 404);
  const HttpResponse limited = Handle("GET", "/oauth/start");
  EXPECT_EQ(limited.status, 429);
  EXPECT_EQ(Header(limited, "Retry-After"), "30");
  ExpectSecurityHeaders(limited, "429");
  EXPECT_EQ(Handle("GET", "/oauth/start", "192.0.2.2").status, 400);  // another client
  EXPECT_EQ(Handle("GET", "/favicon.ico").status, 404);               // not under /oauth/
  clock_.Advance(absl::Seconds(30));
  EXPECT_EQ(Handle("GET", "/oauth/start").status, 400);
  EXPECT_EQ(Handle("GET", "/oauth/start").status, 429);
}

TEST_F(OAuthHandlerTest, ResultPagesLinkToTheReturnUrlEscapedAndNeverRedirect) {
  const std::string return_url = "https://app.example.com/connected?a=1&b='2'";
  for (const bool approve : {true, false}) {
    const std::string id = approve ? "yes" : "no";
    absl::StatusOr<oauth::AuthorizationFlow::MintedLink> link = flow_->CreateLink(
        id, "zendesk", {{"subdomain", "acme"}}, absl::ZeroDuration(), false, return_url);
    ASSERT_TRUE(link.ok()) << link.status();
    const HttpResponse start =
        Handle("GET", absl::StrCat("/oauth/start?link=", QueryParam(link->url, "link")));
    ASSERT_EQ(start.status, 302);
    const std::string cookie =
        Header(start, "Set-Cookie")->substr(0, Header(start, "Set-Cookie")->find(';'));
    const std::string state = QueryParam(*Header(start, "Location"), "state");
    std::string callback = absl::StrCat("/oauth/callback?state=", state);
    if (approve) {
      provider_.NextExchangeReturns([&] {
        core::Grant g;
        g.access_token = AccessToken(testing::NewTestSecret("access"));
        g.issued_at = clock_.Now();
        return g;
      }());
      absl::StrAppend(&callback, "&code=", testing::NewTestSecret("code"));
    } else {
      absl::StrAppend(&callback, "&error=access_denied");
    }
    const HttpResponse page = Handle("GET", callback, "192.0.2.1", cookie);
    EXPECT_EQ(page.status, approve ? 200 : 403);
    EXPECT_TRUE(absl::StrContains(
        page.body,
        "<a href=\"https://app.example.com/connected?a=1&amp;b=&#39;2&#39;\">Continue</a>"))
        << page.body;
    EXPECT_EQ(Header(page, "Location"), std::nullopt);
    ExpectSecurityHeaders(page, id);
  }
  // No return URL, no Continue link.
  const HttpResponse unknown = Handle("GET", "/oauth/callback?state=unknown&code=x");
  EXPECT_FALSE(absl::StrContains(unknown.body, "Continue"));
}

}  // namespace
}  // namespace tb::http
