// HttpsProviderClient's provider HTTP metrics (tb_provider_http_request_duration_seconds and
// tb_provider_http_responses_total) over a scripted HttpClient: one observation per request
// sent, labelled by provider name and endpoint, never by connection or host; nothing for a call
// the gate refused.

#include <deque>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "server/src/common/metrics.h"
#include "server/src/core/provider_presets.h"
#include "server/src/provider/https_provider_client.h"
#include "tests/fakes/fake_clock.h"
#include "tests/support/test_secrets.h"

namespace tb::provider {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;

const absl::Time kFarDeadline = absl::InfiniteFuture();

// Answers from a script, shared by every HttpClient the factory makes. Single-threaded use.
class ScriptedHttp final : public HttpClient {
 public:
  absl::StatusOr<HttpResponse> Send(const HttpRequest&, absl::Time) override {
    ++sent;
    if (script.empty()) {
      return absl::InternalError("test: no scripted answer");
    }
    absl::StatusOr<HttpResponse> next = script.front();
    script.pop_front();
    return next;
  }
  HttpClientStats stats() const override { return {}; }

  void Answer(int status, std::string body,
              std::vector<std::pair<std::string, std::string>> headers = {}) {
    HttpResponse r;
    r.status = status;
    r.body = std::move(body);
    r.headers = std::move(headers);
    script.push_back(std::move(r));
  }
  void Fail(absl::Status s) { script.push_back(std::move(s)); }

  int sent = 0;
  std::deque<absl::StatusOr<HttpResponse>> script;
};

class Forwarder final : public HttpClient {
 public:
  explicit Forwarder(ScriptedHttp& target) : target_(target) {}
  absl::StatusOr<HttpResponse> Send(const HttpRequest& r, absl::Time d) override {
    return target_.Send(r, d);
  }
  HttpClientStats stats() const override { return {}; }

 private:
  ScriptedHttp& target_;
};

// The value of the sample line `series` (name and labels exactly as rendered), or -1 if absent.
double Sample(const std::string& text, const std::string& series) {
  for (absl::string_view line : absl::StrSplit(text, '\n')) {
    if (absl::StartsWith(line, series + " ")) {
      double v = 0;
      return absl::SimpleAtod(line.substr(series.size() + 1), &v) ? v : -1;
    }
  }
  return -1;
}

class HttpsProviderClientMetricsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    zendesk_ = *core::PresetSpec("zendesk");
    zendesk_.name = "zendesk";
    zendesk_.client_id = "broker";
    zendesk_.client_secret = ClientSecret(secret_);
    generic_ = *core::PresetSpec("generic");
    generic_.name = "idp";
    generic_.authorize_url = "https://idp.example/authorize";
    generic_.token_url = "https://idp.example/token";
    generic_.revoke_url = "https://idp.example/revoke";
    generic_.client_id = "broker";
    generic_.client_secret = ClientSecret(secret_);
    acme_.id = "acme-connection";
    acme_.provider = "zendesk";
    acme_.params = {{"subdomain", "acmesub"}};
    acme_.grant = Grant();
    plain_.id = "plain-connection";
    plain_.provider = "idp";
    plain_.grant = Grant();

    absl::StatusOr<std::unique_ptr<HttpsProviderClient>> client = HttpsProviderClient::Create(
        HttpClientOptions{}, {zendesk_, generic_}, clock_,
        [this](const HttpClientOptions&) -> absl::StatusOr<std::unique_ptr<HttpClient>> {
          return std::make_unique<Forwarder>(http_);
        },
        ProviderGateOptions{}, &registry_);
    ASSERT_TRUE(client.ok()) << client.status();
    client_ = *std::move(client);
  }

  core::Grant Grant() {
    core::Grant g;
    g.access_token = AccessToken(access_);
    g.refresh_token = RefreshToken(refresh_);
    g.provider_token_id = "987";
    return g;
  }

  std::string TokenBody() {
    return absl::StrCat(R"({"access_token":")", access_, R"(","refresh_token":")", refresh_,
                        R"(","token_type":"bearer","expires_in":1800})");
  }

  static std::string Responses(absl::string_view provider, absl::string_view op,
                               absl::string_view code) {
    return absl::StrCat("tb_provider_http_responses_total{provider=\"", provider, "\",operation=\"",
                        op, "\",code=\"", code, "\"}");
  }
  static std::string LatencyCount(absl::string_view provider, absl::string_view op) {
    return absl::StrCat("tb_provider_http_request_duration_seconds_count{provider=\"", provider,
                        "\",operation=\"", op, "\"}");
  }

  const std::string secret_ = tb::testing::NewTestSecret("client-secret");
  const std::string access_ = tb::testing::NewTestSecret("access");
  const std::string refresh_ = tb::testing::NewTestSecret("refresh");
  const std::string code_ = tb::testing::NewTestSecret("code");
  const std::string verifier_ = tb::testing::NewTestSecret("verifier");
  tb::testing::FakeClock clock_;
  metrics::Registry registry_;
  ScriptedHttp http_;
  core::ProviderSpec zendesk_;
  core::ProviderSpec generic_;
  core::Connection acme_;
  core::Connection plain_;
  std::unique_ptr<HttpsProviderClient> client_;
};

TEST_F(HttpsProviderClientMetricsTest, CountsEverySentCallByProviderOperationAndStatus) {
  // A Zendesk refresh: the token endpoint, then the token-info lookup.
  http_.Answer(200, TokenBody());
  http_.Answer(200, R"({"token":{"id":1}})");
  ASSERT_TRUE(client_->Refresh(zendesk_, acme_, kFarDeadline).ok());
  // invalid_grant, a 503 and a reset: each one call.
  http_.Answer(400, R"({"error":"invalid_grant"})");
  EXPECT_FALSE(client_->Refresh(zendesk_, acme_, kFarDeadline).ok());
  http_.Answer(503, "<html>down</html>");
  EXPECT_FALSE(client_->Refresh(zendesk_, acme_, kFarDeadline).ok());
  http_.Fail(absl::UnavailableError("reading response: connection reset by peer"));
  EXPECT_FALSE(client_->Refresh(zendesk_, acme_, kFarDeadline).ok());
  http_.Fail(absl::DeadlineExceededError("reading response: timed out"));
  EXPECT_FALSE(client_->Refresh(zendesk_, acme_, kFarDeadline).ok());
  // Revocation by id, and RFC 7009 revocation (refresh token, then access token).
  http_.Answer(204, "");
  EXPECT_TRUE(client_->Revoke(zendesk_, acme_, kFarDeadline).ok());
  http_.Answer(200, "");
  http_.Answer(200, "");
  EXPECT_TRUE(client_->Revoke(generic_, plain_, kFarDeadline).ok());
  // A code exchange on the generic provider is a token call too.
  http_.Answer(200, TokenBody());
  EXPECT_TRUE(client_
                  ->ExchangeCode(generic_, plain_, AuthCode(code_), PkceVerifier(verifier_),
                                 "https://broker.example/oauth/callback", kFarDeadline)
                  .ok());
  ASSERT_EQ(http_.sent, 10);

  const std::string text = registry_.Render();
  EXPECT_EQ(Sample(text, Responses("zendesk", "token", "200")), 1);
  EXPECT_EQ(Sample(text, Responses("zendesk", "token", "400")), 1);
  EXPECT_EQ(Sample(text, Responses("zendesk", "token", "503")), 1);
  EXPECT_EQ(Sample(text, Responses("zendesk", "token", "transport_error")), 2);
  EXPECT_EQ(Sample(text, Responses("zendesk", "token_info", "200")), 1);
  EXPECT_EQ(Sample(text, Responses("zendesk", "revoke", "204")), 1);
  EXPECT_EQ(Sample(text, Responses("idp", "revoke", "200")), 2);
  EXPECT_EQ(Sample(text, Responses("idp", "token", "200")), 1);
  EXPECT_EQ(Sample(text, LatencyCount("zendesk", "token")), 5);
  EXPECT_EQ(Sample(text, LatencyCount("zendesk", "token_info")), 1);
  EXPECT_EQ(Sample(text, LatencyCount("zendesk", "revoke")), 1);
  EXPECT_EQ(Sample(text, LatencyCount("idp", "revoke")), 2);
  EXPECT_EQ(Sample(text, LatencyCount("idp", "token")), 1);
  EXPECT_GE(Sample(text,
                   "tb_provider_http_request_duration_seconds_sum{provider=\"zendesk\","
                   "operation=\"token\"}"),
            0);
  // Labels are provider names: no connection id, no subdomain or host.
  EXPECT_THAT(text, Not(HasSubstr("acme")));
  EXPECT_THAT(text, Not(HasSubstr("plain-connection")));
  EXPECT_THAT(text, Not(HasSubstr("idp.example")));
}

TEST_F(HttpsProviderClientMetricsTest, CallsTheGateRefusesAreNotCounted) {
  http_.Answer(429, "", {{"Retry-After", "2"}});
  EXPECT_EQ(client_->Refresh(zendesk_, acme_, kFarDeadline).status().code(),
            absl::StatusCode::kResourceExhausted);
  // Blocked by the Retry-After: refused before sending.
  EXPECT_EQ(client_->Refresh(zendesk_, acme_, kFarDeadline).status().code(),
            absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(client_->Revoke(zendesk_, acme_, kFarDeadline).code(),
            absl::StatusCode::kResourceExhausted);
  ASSERT_EQ(http_.sent, 1);

  const std::string text = registry_.Render();
  EXPECT_EQ(Sample(text, Responses("zendesk", "token", "429")), 1);
  EXPECT_EQ(Sample(text, LatencyCount("zendesk", "token")), 1);
  EXPECT_EQ(Sample(text, LatencyCount("zendesk", "revoke")), -1);
}

TEST(HttpsProviderClientMetricsCreateTest, WithoutARegistryNothingIsRegistered) {
  tb::testing::FakeClock clock;
  ScriptedHttp http;
  absl::StatusOr<std::unique_ptr<HttpsProviderClient>> client = HttpsProviderClient::Create(
      HttpClientOptions{}, {}, clock,
      [&http](const HttpClientOptions&) -> absl::StatusOr<std::unique_ptr<HttpClient>> {
        return std::make_unique<Forwarder>(http);
      });
  ASSERT_TRUE(client.ok()) << client.status();
  core::ProviderSpec spec = *core::PresetSpec("generic");
  spec.name = "idp";
  spec.token_url = "https://idp.example/token";
  core::Connection c;
  c.id = "x";
  c.provider = "idp";
  core::Grant g;
  g.access_token = AccessToken(tb::testing::NewTestSecret("access"));
  g.refresh_token = RefreshToken(tb::testing::NewTestSecret("refresh"));
  c.grant = g;
  http.Answer(500, "");
  EXPECT_EQ((*client)->Refresh(spec, c, kFarDeadline).status().code(),
            absl::StatusCode::kUnavailable);
  EXPECT_EQ(http.sent, 1);
}

}  // namespace
}  // namespace tb::provider
