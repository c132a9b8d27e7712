// Issue 7's "500s for a window" through the whole broker: GetToken over real gRPC, the refresher
// on its schedule, the real HTTPS provider client, and the HTTPS fake provider answering 500 to
// every refresh for a while. The still-valid token keeps being served the whole time, and the
// refresh succeeds once the provider is back, before the token dies.

#include <grpcpp/grpcpp.h>

#include <chrono>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "gtest/gtest.h"
#include "server/src/common/metrics.h"
#include "server/src/common/work_pool.h"
#include "server/src/core/provider_presets.h"
#include "server/src/crypto/openssl_digest.h"
#include "server/src/crypto/openssl_random.h"
#include "server/src/grpc/grpc_server.h"
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

constexpr char kRedirectUri[] = "https://broker.example/oauth/callback";
constexpr int kLifetimeSeconds = 4;  // the provider's expires_in: refresh_at 2 s in
constexpr int kFailures = 3;         // refreshes answered 500 in a row (breaker opens at 5)

double Seconds(const google::protobuf::Timestamp& t) { return t.seconds() + t.nanos() / 1e9; }
double Now() { return absl::ToDoubleSeconds(absl::Now() - absl::UnixEpoch()); }

// The value of the sample line `series` in a Prometheus text body, or -1 if absent.
double Sample(const std::string& text, const std::string& series) {
  for (absl::string_view line : absl::StrSplit(text, '\n')) {
    if (absl::StartsWith(line, series + " ")) {
      double v = 0;
      return absl::SimpleAtod(line.substr(series.size() + 1), &v) ? v : -1;
    }
  }
  return -1;
}

class ProviderOutageTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto fake = testing::FakeProvider::Start({});
    ASSERT_TRUE(fake.ok()) << fake.status();
    fake_ = *std::move(fake);
    const std::string secret = testing::NewTestSecret("client-secret");
    fake_->AddClient("broker-client", secret);
    const std::string base = fake_->base_url();

    core::ProviderSpec idp = *core::PresetSpec("generic");
    idp.name = "idp";
    idp.authorize_url = base + "/oauth/authorizations/new";
    idp.token_url = base + "/oauth/tokens";
    idp.revoke_url = base + "/oauth/revoke";
    idp.scopes = {"read"};
    idp.client_id = "broker-client";
    idp.client_secret = ClientSecret(secret);
    idp.ca_file = fake_->ca_file();
    idp.expires_in = kLifetimeSeconds;
    ASSERT_TRUE(core::ValidateSpec(idp).ok()) << core::ValidateSpec(idp);
    providers_.Put("idp", idp);

    provider::HttpClientOptions http;
    http.ca_file = fake_->ca_file();
    // The production gate (breaker at 5 failures in a row), with the HTTP metrics.
    auto provider_client = provider::HttpsProviderClient::Create(
        http, {idp}, clock_, &provider::HttpClient::Create, {}, &metrics_);
    ASSERT_TRUE(provider_client.ok()) << provider_client.status();
    provider_client_ = *std::move(provider_client);
    auto browser = provider::HttpClient::Create(http);
    ASSERT_TRUE(browser.ok());
    browser_ = *std::move(browser);

    revoker_ = std::make_unique<oauth::Revoker>(oauth::RevokerOptions{}, providers_, clock_,
                                                broker_, *provider_client_);
    oauth::FlowOptions flow_options;
    flow_options.public_base_url = "https://broker.example";
    flow_options.link_key = KeyMaterial(testing::NewTestSecret("link-key"));
    flow_ = std::make_unique<oauth::AuthorizationFlow>(flow_options, providers_, clock_, random_,
                                                       digest_, flow_store_, *provider_client_,
                                                       broker_, *revoker_);
    const RunBlocking run = [this](std::function<void()> task) { work_.Post(std::move(task)); };
    oauth::RefresherOptions refresh;
    refresh.provider_timeout = absl::Seconds(5);
    // Retries 0.2 s, 0.4 s, 0.8 s after the failures (no jitter in tests): the scheduled refresh
    // at 2 s and three failures put the successful attempt at 3.4 s, before the 4 s expiry.
    refresh.retry_delay = absl::Milliseconds(200);
    refresh.retry_max = absl::Seconds(1);
    refresher_ = std::make_unique<oauth::Refresher>(refresh, providers_, clock_, broker_,
                                                    *provider_client_, *revoker_, run);
    auto grpc = grpc_api::GrpcServer::Start({}, {broker_, cache_, *flow_, *refresher_, run});
    ASSERT_TRUE(grpc.ok()) << grpc.status();
    grpc_ = *std::move(grpc);
    tokens_ = v1::TokenBroker::NewStub(grpc::CreateChannel(
        absl::StrCat("127.0.0.1:", grpc_->port()), grpc::InsecureChannelCredentials()));
  }

  void TearDown() override {
    if (refresher_ != nullptr) {
      refresher_->Stop();
    }
    if (grpc_ != nullptr) {
      grpc_->Shutdown(absl::Now() + absl::Seconds(5));
    }
    work_.Stop();
  }

  // Connects `id` with a real grant from the fake: its authorize endpoint (auto-approving) gives
  // a code, the provider client exchanges it, the broker stores it.
  void Connect(const std::string& id) {
    provider::HttpRequest req;
    req.method = "GET";
    req.url = absl::StrCat(providers_.Find("idp")->authorize_url,
                           "?response_type=code&client_id=broker-client&redirect_uri=",
                           "https%3A%2F%2Fbroker.example%2Foauth%2Fcallback&state=s1");
    absl::StatusOr<provider::HttpResponse> res =
        browser_->Send(req, absl::Now() + absl::Seconds(10));
    ASSERT_TRUE(res.ok()) << res.status();
    ASSERT_EQ(res->status, 302) << res->body;
    const std::string location = res->Header("Location");
    const size_t at = location.find("code=");
    ASSERT_NE(at, std::string::npos) << "no code in the provider's redirect";
    std::string code = location.substr(at + 5);
    code = code.substr(0, code.find('&'));
    testing::RecordTestSecret(code);
    core::Connection connection;
    connection.id = id;
    connection.provider = "idp";
    absl::StatusOr<core::Grant> grant = provider_client_->ExchangeCode(
        *providers_.Find("idp"), connection, AuthCode(code), PkceVerifier(), kRedirectUri,
        absl::Now() + absl::Seconds(10));
    ASSERT_TRUE(grant.ok()) << grant.status();
    ASSERT_TRUE(broker_.CreatePending(id, "idp", {}).ok());
    ASSERT_TRUE(broker_.Activate(id, *std::move(grant)).ok());
  }

  grpc::Status GetToken(const std::string& id, v1::Token* out) {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
    v1::GetTokenRequest req;
    req.set_connection_id(id);
    v1::GetTokenResponse resp;
    const grpc::Status s = tokens_->GetToken(&ctx, req, &resp);
    *out = resp.token();
    return s;
  }

  std::unique_ptr<testing::FakeProvider> fake_;
  core::ProviderDirectory providers_;
  SystemClock clock_;
  crypto::OpenSslRandom random_;
  crypto::OpenSslDigest digest_;
  store::InMemoryTokenStore token_store_;
  store::InMemoryFlowStore flow_store_;
  cache::ConnectionCache cache_;
  metrics::Registry metrics_;
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
  std::unique_ptr<oauth::Revoker> revoker_;
  std::unique_ptr<oauth::AuthorizationFlow> flow_;
  std::unique_ptr<oauth::Refresher> refresher_;
  std::unique_ptr<grpc_api::GrpcServer> grpc_;
  WorkPool work_{2, "test-work"};
  std::unique_ptr<v1::TokenBroker::Stub> tokens_;
};

TEST_F(ProviderOutageTest,
       ServerErrorsForAWindowKeepTheValidTokenServedAndTheRefreshSucceedsAfter) {
  Connect("acme");
  v1::Token first;
  ASSERT_TRUE(GetToken("acme", &first).ok());
  ASSERT_EQ(first.generation(), 1u);
  const double expires = Seconds(first.expires_at());
  testing::Failure server_error;
  server_error.http_status = 500;
  for (int i = 0; i < kFailures; ++i) {
    fake_->FailNext(CallKind::kTokenRefresh, server_error);
  }
  refresher_->Start();

  // GetToken every 20 ms until the second generation shows up (or the first token is long
  // dead): every call answers, with a token the provider takes at that moment.
  int served_first = 0, served_during_failures = 0, not_live = 0, errors = 0;
  v1::Token latest = first;
  while (latest.generation() == 1 && Now() < expires + 3) {
    v1::Token t;
    const double sent = Now();
    const grpc::Status s = GetToken("acme", &t);
    if (!s.ok()) {
      ++errors;
      ADD_FAILURE() << "GetToken failed " << sent - (expires - kLifetimeSeconds)
                    << " s after the grant: " << s.error_code() << " " << s.error_message();
      continue;
    }
    const double received = Now();
    if (!fake_->IsAccessTokenValid(t.access_token()) && received < Seconds(t.valid_until())) {
      ++not_live;  // handed out as promised, yet dead at the provider
    }
    EXPECT_GE(Seconds(t.valid_until()), sent - 0.001) << "served past its promise";
    EXPECT_LE(Seconds(t.valid_until()), Seconds(t.expires_at()));
    if (t.generation() == 1) {
      ++served_first;
      const int refresh_calls = fake_->calls(CallKind::kTokenRefresh);
      if (refresh_calls >= 1 && refresh_calls <= kFailures) {
        ++served_during_failures;  // the provider was answering 500s
      }
    }
    latest = t;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  EXPECT_EQ(errors, 0);
  EXPECT_EQ(not_live, 0);
  EXPECT_GT(served_during_failures, 10) << "the window of failures was not under load";
  ASSERT_EQ(latest.generation(), 2u) << "no successful refresh after the 500s";
  // The refresh that succeeded came before the first token expired, and the first token stayed
  // served until then: its successor was issued after the window.
  EXPECT_LT(Seconds(latest.expires_at()) - kLifetimeSeconds, expires);
  EXPECT_GT(served_first, 50);
  EXPECT_TRUE(fake_->IsAccessTokenValid(latest.access_token()));
  EXPECT_FALSE(fake_->IsAccessTokenValid(first.access_token()));  // rotated
  EXPECT_EQ(fake_->calls(CallKind::kTokenRefresh), kFailures + 1);
  EXPECT_EQ(fake_->refresh_token_reuse_attempts(), 0);
  const std::shared_ptr<const core::Connection> stored = *broker_.GetConnection("acme");
  EXPECT_EQ(stored->status, core::ConnectionStatus::kActive);
  EXPECT_EQ(token_store_.Load("acme")->grant->access_token.Reveal(), latest.access_token());

  const std::string text = metrics_.Render();
  EXPECT_EQ(Sample(text, R"(tb_provider_http_responses_total{provider="idp",operation="token",)"
                         R"(code="500"})"),
            kFailures);
  EXPECT_EQ(Sample(text, R"(tb_provider_http_responses_total{provider="idp",operation="token",)"
                         R"(code="200"})"),
            2);  // the code exchange and the refresh that succeeded
}

}  // namespace
}  // namespace tb
