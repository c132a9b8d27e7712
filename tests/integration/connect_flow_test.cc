// The whole connect flow through real sockets, as a browser walks it: CreateConnectLink over
// gRPC -> GET /oauth/start (302 + cookie) -> the provider's authorize endpoint (the HTTPS fake
// provider, auto-approving: 302 back) -> GET /oauth/callback with the cookie -> result page ->
// GetToken over gRPC. The broker talks to the fake provider with the real HTTPS client.

#include <grpcpp/grpcpp.h>

#include <atomic>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "gtest/gtest.h"
#include "server/src/common/work_pool.h"
#include "server/src/core/provider_presets.h"
#include "server/src/crypto/openssl_digest.h"
#include "server/src/crypto/openssl_random.h"
#include "server/src/grpc/grpc_server.h"
#include "server/src/http/http_server.h"
#include "server/src/http/oauth_routes.h"
#include "server/src/oauth/authorization_flow.h"
#include "server/src/oauth/refresher.h"
#include "server/src/provider/http_client.h"
#include "server/src/provider/https_provider_client.h"
#include "server/src/store/in_memory_flow_store.h"
#include "server/src/store/in_memory_token_store.h"
#include "tests/fake_provider/fake_provider.h"
#include "tests/support/test_secrets.h"
#include "tokenbroker/v1/token_broker.grpc.pb.h"

namespace tb {
namespace {

namespace v1 = tokenbroker::v1;
using testing::CallKind;

constexpr absl::Duration kTimeout = absl::Seconds(20);

struct Browser {
  int status = 0;
  std::string location;
  std::string body;
};

class ConnectFlowTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto fake = testing::FakeProvider::Start({});
    ASSERT_TRUE(fake.ok()) << fake.status();
    fake_ = *std::move(fake);
    client_secret_ = testing::NewTestSecret("client-secret");
    fake_->AddClient("broker-client", client_secret_);
    const std::string base = fake_->base_url();

    core::ProviderSpec zendesk = *core::PresetSpec("zendesk");
    zendesk.name = "zendesk";
    zendesk.authorize_url = base + "/oauth/authorizations/new";
    zendesk.token_url = base + "/oauth/tokens";
    zendesk.token_info_url = base + "/api/v2/oauth/tokens/current.json";
    zendesk.revoke_url = base + "/api/v2/oauth/tokens/{token_id}.json";
    zendesk.client_id = "broker-client";
    zendesk.client_secret = ClientSecret(client_secret_);
    zendesk.ca_file = fake_->ca_file();
    ASSERT_TRUE(core::ValidateSpec(zendesk).ok()) << core::ValidateSpec(zendesk);
    providers_.Put("zendesk", zendesk);

    core::ProviderSpec generic = *core::PresetSpec("generic");
    generic.name = "idp";
    generic.authorize_url = base + "/oauth/authorizations/new";
    generic.token_url = base + "/oauth/tokens";
    generic.revoke_url = base + "/oauth/revoke";
    generic.scopes = {"read"};
    generic.client_id = "broker-client";
    generic.client_secret = ClientSecret(client_secret_);
    generic.ca_file = fake_->ca_file();
    providers_.Put("idp", generic);

    provider::HttpClientOptions http;
    http.ca_file = fake_->ca_file();
    auto provider_client = provider::HttpsProviderClient::Create(
        http, {*providers_.Find("zendesk"), *providers_.Find("idp")}, clock_);
    ASSERT_TRUE(provider_client.ok()) << provider_client.status();
    provider_client_ = *std::move(provider_client);
    auto browser = provider::HttpClient::Create(http);
    ASSERT_TRUE(browser.ok());
    browser_ = *std::move(browser);

    // The public port must be known before the flow (its redirect_uri), so the server starts
    // with a handler that forwards to the flow's routes once they exist.
    auto public_http = http::HttpServer::Start(
        {}, http::AsyncHandler([this](http::HttpRequest req, http::Respond respond) {
          routes_(std::move(req), std::move(respond));
        }));
    ASSERT_TRUE(public_http.ok());
    public_http_ = *std::move(public_http);
    oauth::FlowOptions options;
    options.public_base_url = absl::StrCat("http://127.0.0.1:", public_http_->port());
    options.link_key = KeyMaterial(testing::NewTestSecret("link-key"));
    revoker_ = std::make_unique<oauth::Revoker>(oauth::RevokerOptions{}, providers_, clock_,
                                                broker_, *provider_client_);
    flow_ = std::make_unique<oauth::AuthorizationFlow>(options, providers_, clock_, random_,
                                                       digest_, flow_store_, *provider_client_,
                                                       broker_, *revoker_);
    const RunBlocking run = [this](std::function<void()> task) { work_.Post(std::move(task)); };
    http::OAuthRoutesOptions routes;
    routes.secure_cookies = false;
    routes_ = http::MakeOAuthHandler(*flow_, run, routes);

    refresher_ = std::make_unique<oauth::Refresher>(oauth::RefresherOptions{}, providers_, clock_,
                                                    broker_, *provider_client_, *revoker_, run);
    auto grpc = grpc_api::GrpcServer::Start({}, {broker_, cache_, *flow_, *refresher_, run});
    ASSERT_TRUE(grpc.ok());
    grpc_ = *std::move(grpc);
    auto channel = grpc::CreateChannel(absl::StrCat("127.0.0.1:", grpc_->port()),
                                       grpc::InsecureChannelCredentials());
    tokens_ = v1::TokenBroker::NewStub(channel);
    admin_ = v1::ConnectionAdmin::NewStub(channel);
  }

  void TearDown() override {
    refresher_->Stop();
    grpc_->Shutdown(absl::Now() + absl::Seconds(5));
    public_http_->Stop();
    work_.Stop();
  }

  absl::StatusOr<v1::CreateConnectLinkResponse> CreateLink(const std::string& id,
                                                           const std::string& provider,
                                                           bool reconnect = false) {
    grpc::ClientContext ctx;
    v1::CreateConnectLinkRequest req;
    req.set_connection_id(id);
    req.set_provider(provider);
    if (provider == "zendesk") {
      (*req.mutable_params())["subdomain"] = "acme";
    }
    req.set_reconnect(reconnect);
    v1::CreateConnectLinkResponse resp;
    const grpc::Status s = admin_->CreateConnectLink(&ctx, req, &resp);
    if (!s.ok()) {
      return absl::Status(static_cast<absl::StatusCode>(s.error_code()), s.error_message());
    }
    return resp;
  }

  // One GET as a browser sends it, with the cookie jar; remembers Set-Cookie.
  Browser Get(const std::string& url) {
    provider::HttpRequest req;
    req.method = "GET";
    req.url = url;
    if (!cookie_.empty() && absl::StartsWith(url, "http://127.0.0.1")) {
      req.headers.emplace_back("Cookie", cookie_);
    }
    absl::StatusOr<provider::HttpResponse> res = browser_->Send(req, absl::Now() + kTimeout);
    EXPECT_TRUE(res.ok()) << res.status();
    if (!res.ok()) {
      return {};
    }
    for (const auto& [name, value] : res->headers) {
      if (absl::EqualsIgnoreCase(name, "set-cookie")) {
        const std::string pair = value.substr(0, value.find(';'));
        const bool cleared = absl::StrContains(value, "Max-Age=0");
        cookie_ = cleared ? "" : pair;
        if (!cleared) {
          testing::RecordTestSecret(pair.substr(pair.find('=') + 1));  // the browser binding
        }
        last_set_cookie_ = value;
      }
    }
    return {res->status, res->Header("Location"), res->body};
  }

  // Link -> start -> provider -> callback; returns the callback's page.
  Browser WalkLink(const std::string& link_url, std::string* callback_url = nullptr) {
    const Browser start = Get(link_url);
    EXPECT_EQ(start.status, 302) << start.body;
    const Browser authorize = Get(start.location);
    EXPECT_EQ(authorize.status, 302) << authorize.body;
    EXPECT_TRUE(absl::StartsWith(authorize.location, flow_->redirect_uri())) << authorize.location;
    if (callback_url != nullptr) {
      *callback_url = authorize.location;
    }
    return Get(authorize.location);
  }

  grpc::Status GetToken(const std::string& id, v1::Token* out) {
    grpc::ClientContext ctx;
    v1::GetTokenRequest req;
    req.set_connection_id(id);
    v1::GetTokenResponse resp;
    const grpc::Status s = tokens_->GetToken(&ctx, req, &resp);
    *out = resp.token();
    return s;
  }

  v1::ConnectionStatus StatusOf(const std::string& id) {
    grpc::ClientContext ctx;
    v1::GetConnectionRequest req;
    req.set_connection_id(id);
    v1::Connection c;
    EXPECT_TRUE(admin_->GetConnection(&ctx, req, &c).ok());
    return c.status();
  }

  std::unique_ptr<testing::FakeProvider> fake_;
  std::string client_secret_;
  core::ProviderDirectory providers_;
  SystemClock clock_;
  crypto::OpenSslRandom random_;
  crypto::OpenSslDigest digest_;
  store::InMemoryTokenStore token_store_;
  store::InMemoryFlowStore flow_store_;
  cache::ConnectionCache cache_;
  // Every change reaches the refresher once it exists, as main wires it.
  oauth::Broker broker_{clock_, token_store_, cache_, [this] {
                          oauth::BrokerOptions o;
                          o.on_change = [this](const auto& c, const auto& id) {
                            if (refresher_ != nullptr) {
                              refresher_->Track(c, id);
                            }
                          };
                          return o;
                        }()};
  std::unique_ptr<provider::HttpsProviderClient> provider_client_;
  std::unique_ptr<provider::HttpClient> browser_;
  http::AsyncHandler routes_;
  std::unique_ptr<http::HttpServer> public_http_;
  std::unique_ptr<oauth::Revoker> revoker_;
  std::unique_ptr<oauth::AuthorizationFlow> flow_;
  std::unique_ptr<oauth::Refresher> refresher_;
  std::unique_ptr<grpc_api::GrpcServer> grpc_;
  WorkPool work_{2, "test-work"};
  std::string cookie_;
  std::string last_set_cookie_;
  std::unique_ptr<v1::TokenBroker::Stub> tokens_;
  std::unique_ptr<v1::ConnectionAdmin::Stub> admin_;
};

TEST_F(ConnectFlowTest, ZendeskPresetConnectsThroughTheBrowserFlow) {
  absl::StatusOr<v1::CreateConnectLinkResponse> link = CreateLink("acme", "zendesk");
  ASSERT_TRUE(link.ok()) << link.status();
  EXPECT_EQ(StatusOf("acme"), v1::CONNECTION_STATUS_PENDING);
  v1::Token token;
  EXPECT_EQ(GetToken("acme", &token).error_code(), grpc::StatusCode::FAILED_PRECONDITION);

  const Browser start = Get(link->url());
  ASSERT_EQ(start.status, 302);
  EXPECT_TRUE(absl::StartsWith(start.location, fake_->base_url() + "/oauth/authorizations/new?"));
  EXPECT_TRUE(absl::StrContains(last_set_cookie_, "HttpOnly"));
  EXPECT_TRUE(absl::StrContains(last_set_cookie_, "SameSite=Lax"));
  const Browser authorize = Get(start.location);
  ASSERT_EQ(authorize.status, 302);
  const Browser page = Get(authorize.location);
  EXPECT_EQ(page.status, 200) << page.body;
  EXPECT_TRUE(absl::StrContains(page.body, "acme"));

  ASSERT_TRUE(GetToken("acme", &token).ok());
  EXPECT_TRUE(fake_->IsAccessTokenValid(token.access_token()));
  EXPECT_EQ(token.generation(), 1u);
  EXPECT_GT(token.valid_for().seconds(), 0);
  EXPECT_EQ(StatusOf("acme"), v1::CONNECTION_STATUS_ACTIVE);
  // JSON body with the secret in it, PKCE, and the token id looked up for revocation.
  EXPECT_TRUE(absl::StrContains(fake_->last_token_request_content_type(), "application/json"));
  EXPECT_EQ(fake_->last_token_request_client_auth(), testing::ClientAuth::kBody);
  EXPECT_TRUE(absl::StrContains(fake_->last_authorize_query(), "code_challenge="));
  EXPECT_EQ(fake_->calls(CallKind::kTokenInfo), 1);
  EXPECT_FALSE(cache_.Get("acme")->grant->provider_token_id.empty());
}

TEST_F(ConnectFlowTest, GenericPresetUsesFormBodiesAndBasicAuth) {
  absl::StatusOr<v1::CreateConnectLinkResponse> link = CreateLink("idp-co", "idp");
  ASSERT_TRUE(link.ok()) << link.status();
  const Browser page = WalkLink(link->url());
  EXPECT_EQ(page.status, 200) << page.body;
  v1::Token token;
  ASSERT_TRUE(GetToken("idp-co", &token).ok());
  EXPECT_TRUE(fake_->IsAccessTokenValid(token.access_token()));
  EXPECT_TRUE(absl::StrContains(fake_->last_token_request_content_type(),
                                "application/x-www-form-urlencoded"));
  EXPECT_EQ(fake_->last_token_request_client_auth(), testing::ClientAuth::kBasic);
  EXPECT_EQ(fake_->calls(CallKind::kTokenInfo), 0);
}

TEST_F(ConnectFlowTest, DeniedAccessShowsAPageAndStoresNothing) {
  fake_->SetAuthorizeDecision(false);
  absl::StatusOr<v1::CreateConnectLinkResponse> link = CreateLink("acme", "zendesk");
  ASSERT_TRUE(link.ok());
  const Browser page = WalkLink(link->url());
  EXPECT_EQ(page.status, 403);
  EXPECT_TRUE(absl::StrContains(page.body, "declined"));
  EXPECT_EQ(StatusOf("acme"), v1::CONNECTION_STATUS_PENDING);
  EXPECT_EQ(fake_->calls(CallKind::kTokenCode), 0);
}

TEST_F(ConnectFlowTest, ReusedMissingUnknownStatesAndOtherBrowsersAreRefused) {
  absl::StatusOr<v1::CreateConnectLinkResponse> link = CreateLink("acme", "zendesk");
  ASSERT_TRUE(link.ok());
  // Another browser: the same callback without the cookie.
  std::string callback;
  const Browser start = Get(link->url());
  const Browser authorize = Get(start.location);
  callback = authorize.location;
  const std::string cookie = cookie_;
  cookie_.clear();
  Browser page = Get(callback);
  EXPECT_EQ(page.status, 400);
  EXPECT_TRUE(absl::StrContains(page.body, "same browser"));
  // The state is burnt: the right browser cannot use it now either.
  cookie_ = cookie;
  page = Get(callback);
  EXPECT_EQ(page.status, 400);
  EXPECT_EQ(StatusOf("acme"), v1::CONNECTION_STATUS_PENDING);

  const std::string base = flow_->redirect_uri();
  for (const std::string& url :
       {base, base + "?code=x", base + "?state=unknown&code=x", base + "?state=a&state=b&code=x"}) {
    page = Get(url);
    EXPECT_EQ(page.status, 400) << url;
    EXPECT_TRUE(absl::StrContains(page.body, "no longer valid")) << url;
  }

  // A complete flow, then its callback replayed.
  page = WalkLink(link->url(), &callback);
  ASSERT_EQ(page.status, 200) << page.body;
  page = Get(callback);
  EXPECT_EQ(page.status, 400);
  EXPECT_EQ(fake_->calls(CallKind::kTokenCode), 1);
}

TEST_F(ConnectFlowTest, TamperedRevokedAndUsedLinksGetClearPages) {
  absl::StatusOr<v1::CreateConnectLinkResponse> link = CreateLink("acme", "zendesk");
  ASSERT_TRUE(link.ok());
  std::string tampered = link->url();
  tampered[tampered.size() - 3] = tampered[tampered.size() - 3] == 'A' ? 'B' : 'A';
  Browser page = Get(tampered);
  EXPECT_EQ(page.status, 400);
  EXPECT_TRUE(absl::StrContains(page.body, "not valid"));
  page = Get(flow_->redirect_uri().substr(0, flow_->redirect_uri().rfind('/')) + "/start");
  EXPECT_EQ(page.status, 400);

  grpc::ClientContext ctx;
  v1::RevokeConnectLinkRequest req;
  req.set_link_id(link->link_id());
  v1::RevokeConnectLinkResponse resp;
  ASSERT_TRUE(admin_->RevokeConnectLink(&ctx, req, &resp).ok());
  page = Get(link->url());
  EXPECT_EQ(page.status, 410);
  EXPECT_TRUE(absl::StrContains(page.body, "withdrawn"));

  absl::StatusOr<v1::CreateConnectLinkResponse> second = CreateLink("acme", "zendesk");
  ASSERT_TRUE(second.ok());
  ASSERT_EQ(WalkLink(second->url()).status, 200);
  page = Get(second->url());
  EXPECT_EQ(page.status, 410);
}

TEST_F(ConnectFlowTest, ActiveConnectionNeedsReconnectWhichRevokesTheOldGrant) {
  absl::StatusOr<v1::CreateConnectLinkResponse> link = CreateLink("acme", "zendesk");
  ASSERT_TRUE(link.ok());
  ASSERT_EQ(WalkLink(link->url()).status, 200);
  v1::Token first;
  ASSERT_TRUE(GetToken("acme", &first).ok());

  EXPECT_EQ(CreateLink("acme", "zendesk").status().code(), absl::StatusCode::kFailedPrecondition);

  absl::StatusOr<v1::CreateConnectLinkResponse> again = CreateLink("acme", "zendesk", true);
  ASSERT_TRUE(again.ok()) << again.status();
  ASSERT_EQ(WalkLink(again->url()).status, 200);
  v1::Token second;
  ASSERT_TRUE(GetToken("acme", &second).ok());
  EXPECT_EQ(second.generation(), 2u);
  EXPECT_TRUE(fake_->IsAccessTokenValid(second.access_token()));
  EXPECT_FALSE(fake_->IsAccessTokenValid(first.access_token()));  // revoked by id
  EXPECT_EQ(fake_->calls(CallKind::kRevokeById), 1);
}

TEST_F(ConnectFlowTest, FailedCodeExchangeShowsAPageAndStoresNothing) {
  absl::StatusOr<v1::CreateConnectLinkResponse> link = CreateLink("acme", "zendesk");
  ASSERT_TRUE(link.ok());
  testing::Failure server_error;
  server_error.http_status = 500;
  fake_->FailNext(CallKind::kTokenCode, server_error);
  Browser page = WalkLink(link->url());
  EXPECT_EQ(page.status, 502);
  EXPECT_EQ(StatusOf("acme"), v1::CONNECTION_STATUS_PENDING);
  testing::Failure invalid_grant;
  invalid_grant.http_status = 400;
  invalid_grant.error = "invalid_grant";
  fake_->FailNext(CallKind::kTokenCode, invalid_grant);
  page = WalkLink(link->url());
  EXPECT_EQ(page.status, 502);
  EXPECT_EQ(StatusOf("acme"), v1::CONNECTION_STATUS_PENDING);
  // The link still works once the provider does.
  EXPECT_EQ(WalkLink(link->url()).status, 200);
}

TEST_F(ConnectFlowTest, PagesCarrySecurityHeadersAndEscapeProviderText) {
  absl::StatusOr<v1::CreateConnectLinkResponse> link = CreateLink("acme", "zendesk");
  ASSERT_TRUE(link.ok());
  const Browser start = Get(link->url());
  const std::string state_start = start.location.substr(start.location.find("state=") + 6);
  const std::string state = state_start.substr(0, state_start.find('&'));
  provider::HttpRequest req;
  req.method = "GET";
  req.url =
      absl::StrCat(flow_->redirect_uri(), "?state=", state,
                   "&error=server_error&error_description=%3Cscript%3Ealert(1)%3C%2Fscript%3E");
  req.headers.emplace_back("Cookie", cookie_);
  absl::StatusOr<provider::HttpResponse> res = browser_->Send(req, absl::Now() + kTimeout);
  ASSERT_TRUE(res.ok());
  EXPECT_EQ(res->status, 502);
  EXPECT_FALSE(absl::StrContains(res->body, "<script>"));
  EXPECT_TRUE(absl::StrContains(res->body, "&lt;script&gt;"));
  EXPECT_TRUE(absl::StrContains(res->Header("Content-Security-Policy"), "default-src 'none'"));
  EXPECT_TRUE(absl::StrContains(res->Header("Content-Security-Policy"), "frame-ancestors 'none'"));
  EXPECT_EQ(res->Header("Referrer-Policy"), "no-referrer");
  EXPECT_EQ(res->Header("Cache-Control"), "no-store");
  EXPECT_EQ(res->Header("X-Content-Type-Options"), "nosniff");

  req.method = "POST";
  res = browser_->Send(req, absl::Now() + kTimeout);
  ASSERT_TRUE(res.ok());
  EXPECT_EQ(res->status, 405);
}

}  // namespace
}  // namespace tb

namespace tb {
namespace {

class RefreshRpcTest : public ConnectFlowTest {
 protected:
  void SetUp() override {
    ConnectFlowTest::SetUp();
    absl::StatusOr<v1::CreateConnectLinkResponse> link = CreateLink("acme", "zendesk");
    ASSERT_TRUE(link.ok());
    ASSERT_EQ(WalkLink(link->url()).status, 200);
    ASSERT_TRUE(GetToken("acme", &first_).ok());
  }

  grpc::Status Refresh(uint64_t if_generation, v1::Token* out) {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(20));
    v1::RefreshRequest req;
    req.set_connection_id("acme");
    req.set_if_generation(if_generation);
    v1::RefreshResponse resp;
    const grpc::Status s = tokens_->Refresh(&ctx, req, &resp);
    *out = resp.token();
    return s;
  }

  v1::Token first_;
};

TEST_F(RefreshRpcTest, ConcurrentRefreshesOfOneGenerationRotateOnceAtTheProvider) {
  std::vector<std::thread> callers;
  std::atomic<int> ok{0};
  std::vector<std::string> answers(20);  // what each caller got, printed when one is wrong
  for (int i = 0; i < 20; ++i) {
    callers.emplace_back([&, i] {
      v1::Token t;
      const grpc::Status s = Refresh(1, &t);
      answers[i] =
          absl::StrCat(s.error_code(), " '", s.error_message(), "' generation ", t.generation());
      if (s.ok() && t.generation() == 2) {
        ok++;
      }
    });
  }
  for (std::thread& t : callers) {
    t.join();
  }
  EXPECT_EQ(ok.load(), 20) << absl::StrJoin(answers, "; ");
  EXPECT_EQ(fake_->calls(CallKind::kTokenRefresh), 1);
  v1::Token now;
  ASSERT_TRUE(GetToken("acme", &now).ok());
  EXPECT_EQ(now.generation(), 2u);
  EXPECT_TRUE(fake_->IsAccessTokenValid(now.access_token()));
  EXPECT_FALSE(fake_->IsAccessTokenValid(first_.access_token()));  // Zendesk kills the old one
  EXPECT_EQ(fake_->refresh_token_reuse_attempts(), 0);
}

TEST_F(RefreshRpcTest, InvalidGrantNeedsReauthAndStopsProviderCalls) {
  testing::Failure invalid_grant;
  invalid_grant.http_status = 400;
  invalid_grant.error = "invalid_grant";
  fake_->FailNext(CallKind::kTokenRefresh, invalid_grant);
  v1::Token t;
  grpc::Status s = Refresh(1, &t);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_EQ(GetToken("acme", &t).error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_EQ(StatusOf("acme"), v1::CONNECTION_STATUS_NEEDS_REAUTH);
  EXPECT_FALSE(Refresh(0, &t).ok());
  EXPECT_EQ(fake_->calls(CallKind::kTokenRefresh), 1);
}

TEST_F(RefreshRpcTest, InvalidClientLeavesTheGrantServing) {
  testing::Failure invalid_client;
  invalid_client.http_status = 401;
  invalid_client.error = "invalid_client";
  fake_->FailNext(CallKind::kTokenRefresh, invalid_client);
  v1::Token t;
  EXPECT_EQ(Refresh(1, &t).error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  ASSERT_TRUE(GetToken("acme", &t).ok());
  EXPECT_EQ(t.access_token(), first_.access_token());
  EXPECT_EQ(StatusOf("acme"), v1::CONNECTION_STATUS_ACTIVE);
}

TEST_F(RefreshRpcTest, RevokeStopsServingAndReachesTheProviderById) {
  grpc::ClientContext ctx;
  v1::RevokeRequest req;
  req.set_connection_id("acme");
  v1::RevokeResponse resp;
  ASSERT_TRUE(tokens_->Revoke(&ctx, req, &resp).ok());
  v1::Token t;
  EXPECT_EQ(GetToken("acme", &t).error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_EQ(StatusOf("acme"), v1::CONNECTION_STATUS_REVOKED);
  EXPECT_FALSE(fake_->IsAccessTokenValid(first_.access_token()));
  EXPECT_EQ(fake_->calls(CallKind::kRevokeById), 1);
  EXPECT_EQ(fake_->calls(CallKind::kRevokeCurrent), 0);  // the quirk revokes nothing
}

TEST_F(RefreshRpcTest, RevokeOfATokenTheProviderNoLongerTakesRefreshesFirst) {
  fake_->ExpireAllAccessTokens();  // Zendesk: the token cannot authorize its own revocation
  grpc::ClientContext ctx;
  v1::RevokeRequest req;
  req.set_connection_id("acme");
  v1::RevokeResponse resp;
  ASSERT_TRUE(tokens_->Revoke(&ctx, req, &resp).ok());
  EXPECT_TRUE(resp.provider_confirmed());
  EXPECT_EQ(fake_->calls(CallKind::kTokenRefresh), 1);  // refreshed to get a live token...
  EXPECT_EQ(fake_->calls(CallKind::kRevokeById), 2);    // ...which revoked itself by id
  EXPECT_EQ(fake_->refresh_token_reuse_attempts(), 0);
  const core::Connection stored = *token_store_.Load("acme");
  EXPECT_TRUE(stored.to_revoke.empty());
  EXPECT_EQ(stored.status, core::ConnectionStatus::kRevoked);
}

TEST_F(RefreshRpcTest, RevokeWhileTheProviderIsDownIsRetriedOnRequest) {
  testing::Failure down;
  down.http_status = 503;
  fake_->FailNext(CallKind::kRevokeById, down);
  grpc::ClientContext ctx;
  v1::RevokeRequest req;
  req.set_connection_id("acme");
  v1::RevokeResponse resp;
  ASSERT_TRUE(tokens_->Revoke(&ctx, req, &resp).ok());
  EXPECT_FALSE(resp.provider_confirmed());
  EXPECT_TRUE(fake_->IsAccessTokenValid(first_.access_token()));  // not yet revoked there
  v1::Token t;
  EXPECT_EQ(GetToken("acme", &t).error_code(), grpc::StatusCode::FAILED_PRECONDITION);

  grpc::ClientContext again;
  ASSERT_TRUE(tokens_->Revoke(&again, req, &resp).ok());
  EXPECT_TRUE(resp.provider_confirmed());
  EXPECT_FALSE(fake_->IsAccessTokenValid(first_.access_token()));
}

TEST_F(RefreshRpcTest, ATenSecondAnswerIsWaitedForAndStoredBeforeOrAfterTheRotation) {
  // The provider takes 10 s: once before it rotates (acme), once after (rotated, then answered
  // late; acme2). Both answers are waited for (the provider timeout is 30 s), stored, and no
  // ROTATION_LOST.
  absl::StatusOr<v1::CreateConnectLinkResponse> link = CreateLink("acme2", "zendesk");
  ASSERT_TRUE(link.ok());
  ASSERT_EQ(WalkLink(link->url()).status, 200);
  for (const auto& [id, after] : {std::pair<std::string, bool>{"acme", false}, {"acme2", true}}) {
    testing::Failure slow;
    (after ? slow.delay_after : slow.delay_before) = absl::Seconds(10);
    fake_->FailNext(CallKind::kTokenRefresh, slow);
    v1::Token before;
    ASSERT_TRUE(GetToken(id, &before).ok());
    const absl::Time started = absl::Now();
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(25));
    v1::RefreshRequest req;
    req.set_connection_id(id);
    req.set_if_generation(before.generation());
    v1::RefreshResponse resp;
    const grpc::Status s = tokens_->Refresh(&ctx, req, &resp);
    ASSERT_TRUE(s.ok()) << id << ": " << s.error_message();
    EXPECT_GE(absl::Now() - started, absl::Seconds(9)) << id;
    EXPECT_EQ(resp.token().generation(), before.generation() + 1) << id;
    EXPECT_TRUE(fake_->IsAccessTokenValid(resp.token().access_token())) << id;
    EXPECT_EQ(token_store_.Load(id)->grant->access_token.Reveal(), resp.token().access_token())
        << id;  // stored
    EXPECT_EQ(StatusOf(id), v1::CONNECTION_STATUS_ACTIVE) << id;
  }
  EXPECT_EQ(fake_->refresh_token_reuse_attempts(), 0);
}

// Zendesk tokens of 8 s (valid_until 4 s in): the scheduler refreshes each at its refresh_at,
// and callers that need more life than is left wait for that refresh instead of causing one.
class ShortTokenTest : public ConnectFlowTest {
 protected:
  void SetUp() override {
    ConnectFlowTest::SetUp();
    // 8 s tokens, promised for 4 s: a margin of a second for the callers below, which must
    // hold under ASan on a busy CI machine too.
    core::ProviderSpec zendesk = *providers_.Find("zendesk");
    zendesk.expires_in = 8;
    providers_.Put("zendesk", zendesk);
    refresher_->Start();
    absl::StatusOr<v1::CreateConnectLinkResponse> link = CreateLink("acme", "zendesk");
    ASSERT_TRUE(link.ok());
    ASSERT_EQ(WalkLink(link->url()).status, 200);
    ASSERT_TRUE(GetToken("acme", &first_).ok());
  }

  grpc::Status GetTokenFor(absl::Duration min_ttl, v1::Token* out) {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(20));
    v1::GetTokenRequest req;
    req.set_connection_id("acme");
    req.mutable_min_ttl()->set_seconds(absl::ToInt64Seconds(min_ttl));
    req.mutable_min_ttl()->set_nanos(
        static_cast<int32_t>(absl::ToInt64Nanoseconds(min_ttl % absl::Seconds(1))));
    v1::GetTokenResponse resp;
    const grpc::Status s = tokens_->GetToken(&ctx, req, &resp);
    *out = resp.token();
    return s;
  }

  v1::Token first_;
};

TEST_F(ShortTokenTest, CallersNeedingMoreLifeWaitForTheScheduledRefresh) {
  EXPECT_LE(first_.valid_for().seconds(), 4);
  std::this_thread::sleep_for(std::chrono::milliseconds(1100));  // now less than 3 s is left
  std::vector<std::thread> callers;
  std::atomic<int> newer{0};
  for (int i = 0; i < 20; ++i) {
    callers.emplace_back([&] {
      v1::Token t;
      // 3 s: more than the first token has left, less than a fresh one is promised (4 s).
      const grpc::Status s = GetTokenFor(absl::Seconds(3), &t);
      EXPECT_TRUE(s.ok()) << s.error_code() << " " << s.error_message();
      EXPECT_GE(t.generation(), 2u);
      EXPECT_GE(t.valid_for().seconds() * 1000 + t.valid_for().nanos() / 1'000'000, 3000);
      if (s.ok() && t.generation() >= 2 &&
          t.valid_for().seconds() * 1000 + t.valid_for().nanos() / 1'000'000 >= 3000) {
        ++newer;
      }
    });
  }
  for (std::thread& t : callers) {
    t.join();
  }
  EXPECT_EQ(newer.load(), 20);
  // One scheduled refresh served them all (the next is due 4 s after it).
  EXPECT_EQ(fake_->calls(CallKind::kTokenRefresh), 1);
  EXPECT_FALSE(fake_->IsAccessTokenValid(first_.access_token()));
  EXPECT_EQ(fake_->refresh_token_reuse_attempts(), 0);
}

TEST_F(ShortTokenTest, ShortLivedTokensAreRefreshedOnScheduleWithoutLooping) {
  std::this_thread::sleep_for(std::chrono::seconds(5));
  // One refresh, at about 4 s: a schedule that ignored the half-lifetime floor would have
  // looped hundreds of times.
  const int calls = fake_->calls(CallKind::kTokenRefresh);
  EXPECT_GE(calls, 1);
  EXPECT_LE(calls, 3);
  v1::Token t;
  ASSERT_TRUE(GetToken("acme", &t).ok());
  EXPECT_TRUE(fake_->IsAccessTokenValid(t.access_token()));
  EXPECT_EQ(t.generation(), static_cast<uint64_t>(calls) + 1);
  EXPECT_EQ(fake_->refresh_token_reuse_attempts(), 0);
}

}  // namespace
}  // namespace tb
