// HttpsProviderClient over a scripted HttpClient: what goes on the wire for each spec, and how
// answers become grants and statuses. The real HTTPS path is covered by
// tests/integration/provider/https_provider_client_test.cc.

#include "server/src/provider/https_provider_client.h"

#include <atomic>
#include <deque>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include <boost/json/parse.hpp>
#include <boost/json/value.hpp>

#include "absl/strings/cord.h"
#include "absl/strings/escaping.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "gtest/gtest.h"
#include "server/src/core/errors.h"
#include "server/src/core/provider_presets.h"
#include "server/src/core/retry_after.h"
#include "server/src/provider/internal/oauth_wire.h"
#include "tests/fakes/fake_clock.h"
#include "tests/support/test_secrets.h"

namespace tb::provider {
namespace {

const absl::Time kFarDeadline = absl::InfiniteFuture();

// Records requests and answers them from a script. Single-threaded use.
class ScriptedHttp final : public HttpClient {
 public:
  absl::StatusOr<HttpResponse> Send(const HttpRequest& request, absl::Time deadline) override {
    requests.push_back(request);
    deadlines.push_back(deadline);
    if (script.empty()) {
      return absl::InternalError("test: no scripted answer");
    }
    absl::StatusOr<HttpResponse> next = script.front();
    script.pop_front();
    return next;
  }
  HttpClientStats stats() const override { return {}; }

  void Answer(int status, std::string body,
              std::vector<std::pair<std::string, std::string>> h = {}) {
    HttpResponse r;
    r.status = status;
    r.body = std::move(body);
    r.headers = std::move(h);
    script.push_back(std::move(r));
  }
  void Fail(absl::Status s) { script.push_back(std::move(s)); }

  std::vector<HttpRequest> requests;
  std::vector<absl::Time> deadlines;
  std::deque<absl::StatusOr<HttpResponse>> script;
};

// The factory hands out forwarders to one ScriptedHttp, and records the options it saw.
class Forwarder final : public HttpClient {
 public:
  explicit Forwarder(ScriptedHttp& target) : target_(target) {}
  absl::StatusOr<HttpResponse> Send(const HttpRequest& request, absl::Time deadline) override {
    return target_.Send(request, deadline);
  }
  HttpClientStats stats() const override { return {}; }

 private:
  ScriptedHttp& target_;
};

std::string HeaderOf(const HttpRequest& r, absl::string_view name) {
  for (const auto& [k, v] : r.headers) {
    if (absl::EqualsIgnoreCase(k, name)) {
      return v;
    }
  }
  return "";
}

std::map<std::string, std::string> DecodeForm(absl::string_view body) {
  std::map<std::string, std::string> out;
  const auto decode = [](absl::string_view s) {
    std::string r;
    for (size_t i = 0; i < s.size(); ++i) {
      if (s[i] == '+') {
        r.push_back(' ');
      } else if (s[i] == '%' && i + 2 < s.size()) {
        int v = 0;
        r.push_back(absl::SimpleHexAtoi(s.substr(i + 1, 2), &v) ? static_cast<char>(v) : '?');
        i += 2;
      } else {
        r.push_back(s[i]);
      }
    }
    return r;
  };
  for (absl::string_view pair : absl::StrSplit(body, '&', absl::SkipEmpty())) {
    std::pair<absl::string_view, absl::string_view> kv = absl::StrSplit(pair, '=');
    out[decode(kv.first)] = decode(kv.second);
  }
  return out;
}

boost::json::object DecodeJson(const std::string& body) {
  boost::system::error_code ec;
  boost::json::value v = boost::json::parse(body, ec);
  EXPECT_FALSE(ec) << "body is not JSON";
  return v.is_object() ? v.as_object() : boost::json::object();
}

std::string JsonString(const boost::json::object& o, const char* key) {
  const auto it = o.find(key);
  if (it == o.end() || !it->value().is_string()) {
    return "<missing>";
  }
  return std::string(it->value().as_string().c_str());
}

class HttpsProviderClientTest : public ::testing::Test {
 protected:
  void SetUp() override {
    zendesk_ = *core::PresetSpec("zendesk");
    zendesk_.name = "zendesk";
    zendesk_.client_id = "broker";
    zendesk_.client_secret = ClientSecret(client_secret_);

    generic_ = *core::PresetSpec("generic");
    generic_.name = "idp";
    generic_.authorize_url = "https://idp.example/authorize";
    generic_.token_url = "https://idp.example/token";
    generic_.revoke_url = "https://idp.example/revoke";
    generic_.scopes = {"openid", "offline_access"};
    generic_.client_id = "broker:app";
    generic_.client_secret = ClientSecret(client_secret_);

    acme_.id = "acme";
    acme_.provider = "zendesk";
    acme_.params = {{"subdomain", "acme"}};
    plain_.id = "plain";
    plain_.provider = "idp";

    client_ = MakeClient(ProviderGateOptions{});
    ASSERT_NE(client_, nullptr);
  }

  std::unique_ptr<HttpsProviderClient> MakeClient(ProviderGateOptions gate) {
    absl::StatusOr<std::unique_ptr<HttpsProviderClient>> client = HttpsProviderClient::Create(
        HttpClientOptions{}, {zendesk_, generic_}, clock_,
        [this](const HttpClientOptions& options) -> absl::StatusOr<std::unique_ptr<HttpClient>> {
          factory_options_.push_back(options);
          return std::make_unique<Forwarder>(http_);
        },
        gate);
    EXPECT_TRUE(client.ok()) << client.status();
    return client.ok() ? *std::move(client) : nullptr;
  }

  core::Connection Beta() {
    core::Connection c = acme_;
    c.id = "beta";
    c.params = {{"subdomain", "beta"}};
    return c;
  }

  ProviderGateCounters Counters(const std::string& provider = "zendesk") {
    return client_->gate_stats().providers[provider];
  }

  std::string TokenBody(const std::string& access, const std::string& refresh,
                        int expires_in = 1800) {
    std::string body = absl::StrCat(R"({"access_token":")", access,
                                    R"(","token_type":"bearer","scope":"read write")");
    if (!refresh.empty()) {
      absl::StrAppend(&body, R"(,"refresh_token":")", refresh, R"(")");
    }
    if (expires_in > 0) {
      absl::StrAppend(&body, R"(,"expires_in":)", expires_in);
    }
    return absl::StrCat(body, "}");
  }

  core::Connection WithGrant(core::Connection c, const std::string& access,
                             const std::string& refresh, const std::string& token_id = "") {
    core::Grant g;
    g.access_token = AccessToken(access);
    if (!refresh.empty()) {
      g.refresh_token = RefreshToken(refresh);
    }
    g.provider_token_id = token_id;
    c.grant = g;
    return c;
  }

  const std::string client_secret_ = tb::testing::NewTestSecret("client-secret");
  const std::string code_ = tb::testing::NewTestSecret("code");
  const std::string verifier_ = tb::testing::NewTestSecret("verifier");
  const std::string access_ = tb::testing::NewTestSecret("access");
  const std::string refresh_ = tb::testing::NewTestSecret("refresh");
  tb::testing::FakeClock clock_;
  ScriptedHttp http_;
  std::vector<HttpClientOptions> factory_options_;
  core::ProviderSpec zendesk_;
  core::ProviderSpec generic_;
  core::Connection acme_;
  core::Connection plain_;
  std::unique_ptr<HttpsProviderClient> client_;
};

TEST_F(HttpsProviderClientTest, OneHttpClientPerCaFileAndTimeout) {
  ASSERT_EQ(factory_options_.size(), 1u);  // both specs: system trust store, 5 s
  core::ProviderSpec other = generic_;
  other.ca_file = "/etc/tb/ca.pem";
  ASSERT_TRUE(client_->ClientFor(other).ok());
  ASSERT_TRUE(client_->ClientFor(other).ok());
  ASSERT_EQ(factory_options_.size(), 2u);
  EXPECT_EQ(factory_options_[1].ca_file, "/etc/tb/ca.pem");
}

TEST_F(HttpsProviderClientTest, ZendeskExchangeSendsDocumentedJsonAndLooksUpTokenId) {
  http_.Answer(200, TokenBody(access_, refresh_));
  http_.Answer(200, R"({"token":{"id":987654,"user_id":1}})");
  absl::StatusOr<core::Grant> g =
      client_->ExchangeCode(zendesk_, acme_, AuthCode(code_), PkceVerifier(verifier_),
                            "https://broker.example/oauth/callback", kFarDeadline);
  ASSERT_TRUE(g.ok()) << g.status();

  ASSERT_EQ(http_.requests.size(), 2u);
  const HttpRequest& token = http_.requests[0];
  EXPECT_EQ(token.method, "POST");
  EXPECT_EQ(token.url, "https://acme.zendesk.com/oauth/tokens");
  EXPECT_EQ(HeaderOf(token, "Content-Type"), "application/json");
  EXPECT_EQ(HeaderOf(token, "Accept"), "application/json");
  EXPECT_EQ(HeaderOf(token, "Authorization"), "");
  const boost::json::object body = DecodeJson(token.body);
  EXPECT_EQ(JsonString(body, "grant_type"), "authorization_code");
  EXPECT_EQ(JsonString(body, "code"), code_);
  EXPECT_EQ(JsonString(body, "redirect_uri"), "https://broker.example/oauth/callback");
  EXPECT_EQ(JsonString(body, "code_verifier"), verifier_);
  EXPECT_EQ(JsonString(body, "client_id"), "broker");
  EXPECT_EQ(JsonString(body, "client_secret"), client_secret_);
  EXPECT_EQ(JsonString(body, "scope"), "read write");
  ASSERT_TRUE(body.contains("expires_in"));
  EXPECT_EQ(body.at("expires_in").as_int64(), 1800);
  ASSERT_TRUE(body.contains("refresh_token_expires_in"));
  EXPECT_EQ(body.at("refresh_token_expires_in").as_int64(), 30 * 24 * 3600);

  const HttpRequest& info = http_.requests[1];
  EXPECT_EQ(info.method, "GET");
  EXPECT_EQ(info.url, "https://acme.zendesk.com/api/v2/oauth/tokens/current.json");
  EXPECT_EQ(HeaderOf(info, "Authorization"), absl::StrCat("Bearer ", access_));

  EXPECT_EQ(g->access_token.Reveal(), access_);
  ASSERT_TRUE(g->refresh_token.has_value());
  EXPECT_EQ(g->refresh_token->Reveal(), refresh_);
  EXPECT_EQ(g->token_type, "Bearer");
  EXPECT_EQ(g->issued_at, clock_.Now());
  EXPECT_EQ(g->expires_at, clock_.Now() + absl::Seconds(1800));
  EXPECT_EQ(g->provider_token_id, "987654");
  EXPECT_EQ(g->generation, 0u);
}

TEST_F(HttpsProviderClientTest, GenericExchangeSendsFormWithBasicAuthAndNoLookup) {
  http_.Answer(200, TokenBody(access_, refresh_, /*expires_in=*/0));
  absl::StatusOr<core::Grant> g =
      client_->ExchangeCode(generic_, plain_, AuthCode(code_), PkceVerifier(verifier_),
                            "https://broker.example/cb", kFarDeadline);
  ASSERT_TRUE(g.ok()) << g.status();
  ASSERT_EQ(http_.requests.size(), 1u);
  const HttpRequest& token = http_.requests[0];
  EXPECT_EQ(token.url, "https://idp.example/token");
  EXPECT_EQ(HeaderOf(token, "Content-Type"), "application/x-www-form-urlencoded");
  EXPECT_EQ(HeaderOf(token, "Authorization"),
            internal::BasicAuthorization("broker:app", client_secret_));
  const std::map<std::string, std::string> form = DecodeForm(token.body);
  EXPECT_EQ(form.at("grant_type"), "authorization_code");
  EXPECT_EQ(form.at("code"), code_);
  EXPECT_EQ(form.at("code_verifier"), verifier_);
  EXPECT_EQ(form.at("redirect_uri"), "https://broker.example/cb");
  EXPECT_FALSE(form.contains("client_id"));
  EXPECT_FALSE(form.contains("client_secret"));
  EXPECT_FALSE(form.contains("scope"));
  EXPECT_FALSE(form.contains("expires_in"));
  EXPECT_FALSE(g->expires_at.has_value());
  EXPECT_TRUE(g->provider_token_id.empty());
}

TEST_F(HttpsProviderClientTest, NoPkceVerifierWhenSpecHasNoPkce) {
  generic_.pkce = false;
  generic_.extra_token_params = {{"audience", "api"}, {"grant_type", "evil"}};
  http_.Answer(200, TokenBody(access_, ""));
  ASSERT_TRUE(client_
                  ->ExchangeCode(generic_, plain_, AuthCode(code_), PkceVerifier(verifier_),
                                 "https://broker.example/cb", kFarDeadline)
                  .ok());
  const std::map<std::string, std::string> form = DecodeForm(http_.requests[0].body);
  EXPECT_FALSE(form.contains("code_verifier"));
  EXPECT_EQ(form.at("audience"), "api");
  EXPECT_EQ(form.at("grant_type"), "authorization_code");  // extras never override
}

TEST_F(HttpsProviderClientTest, FailedTokenIdLookupKeepsTheGrant) {
  http_.Answer(200, TokenBody(access_, refresh_));
  http_.Answer(503, "");
  absl::StatusOr<core::Grant> g =
      client_->ExchangeCode(zendesk_, acme_, AuthCode(code_), PkceVerifier(verifier_),
                            "https://broker.example/cb", kFarDeadline);
  ASSERT_TRUE(g.ok()) << g.status();
  EXPECT_EQ(g->access_token.Reveal(), access_);
  EXPECT_TRUE(g->provider_token_id.empty());
}

TEST_F(HttpsProviderClientTest, RefreshSendsRefreshTokenAndLooksUpTheNewId) {
  const std::string new_access = tb::testing::NewTestSecret("access");
  const std::string new_refresh = tb::testing::NewTestSecret("refresh");
  http_.Answer(200, TokenBody(new_access, new_refresh));
  http_.Answer(200, R"({"token":{"id":"555"}})");
  absl::StatusOr<core::Grant> g =
      client_->Refresh(zendesk_, WithGrant(acme_, access_, refresh_, "111"), kFarDeadline);
  ASSERT_TRUE(g.ok()) << g.status();
  const boost::json::object body = DecodeJson(http_.requests[0].body);
  EXPECT_EQ(JsonString(body, "grant_type"), "refresh_token");
  EXPECT_EQ(JsonString(body, "refresh_token"), refresh_);
  EXPECT_EQ(JsonString(body, "client_secret"), client_secret_);
  EXPECT_FALSE(body.contains("code"));
  EXPECT_FALSE(body.contains("scope"));
  EXPECT_EQ(body.at("expires_in").as_int64(), 1800);
  EXPECT_EQ(HeaderOf(http_.requests[1], "Authorization"), absl::StrCat("Bearer ", new_access));
  EXPECT_EQ(g->access_token.Reveal(), new_access);
  EXPECT_EQ(g->refresh_token->Reveal(), new_refresh);
  EXPECT_EQ(g->provider_token_id, "555");
}

TEST_F(HttpsProviderClientTest, RefreshAnswerWithoutRefreshTokenHasNone) {
  http_.Answer(200, TokenBody(access_, ""));
  absl::StatusOr<core::Grant> g =
      client_->Refresh(generic_, WithGrant(plain_, access_, refresh_), kFarDeadline);
  ASSERT_TRUE(g.ok()) << g.status();
  EXPECT_FALSE(g->refresh_token.has_value());
  const std::map<std::string, std::string> form = DecodeForm(http_.requests[0].body);
  EXPECT_EQ(form.at("refresh_token"), refresh_);
}

TEST_F(HttpsProviderClientTest, RefreshWithoutRefreshTokenIsNotRefreshable) {
  const absl::Status s =
      client_->Refresh(zendesk_, WithGrant(acme_, access_, ""), kFarDeadline).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(core::ReasonOf(s), core::Reason::kNotRefreshable);
  EXPECT_EQ(client_->Refresh(zendesk_, acme_, kFarDeadline).status().code(),
            absl::StatusCode::kFailedPrecondition);
  EXPECT_TRUE(http_.requests.empty());
}

TEST_F(HttpsProviderClientTest, MapsProviderAnswers) {
  const core::Connection c = WithGrant(acme_, access_, refresh_);
  http_.Answer(400, R"({"error":"invalid_grant","error_description":"expired"})");
  absl::Status s = client_->Refresh(zendesk_, c, kFarDeadline).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(core::ReasonOf(s), core::Reason::kNeedsReauth);

  http_.Answer(401, R"({"error":"invalid_client"})");
  s = client_->Refresh(zendesk_, c, kFarDeadline).status();
  EXPECT_EQ(core::ReasonOf(s), core::Reason::kProviderMisconfigured);

  http_.Answer(429, "", {{"retry-after", "42"}});
  s = client_->Refresh(zendesk_, c, kFarDeadline).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(s.GetPayload(kRetryAfterPayloadUrl), absl::Cord("42"));
  EXPECT_EQ(core::RetryAfterOf(s), clock_.Now() + absl::Seconds(42));
  clock_.Advance(absl::Seconds(42));  // the host is blocked until then

  http_.Answer(502, "<html>bad gateway</html>");
  EXPECT_EQ(client_->Refresh(zendesk_, c, kFarDeadline).status().code(),
            absl::StatusCode::kUnavailable);

  http_.Answer(200, "<html>not a token</html>");
  EXPECT_EQ(client_->Refresh(zendesk_, c, kFarDeadline).status().code(),
            absl::StatusCode::kUnavailable);

  http_.Fail(absl::UnavailableError("connecting to acme.zendesk.com:443: refused"));
  EXPECT_EQ(client_->Refresh(zendesk_, c, kFarDeadline).status().code(),
            absl::StatusCode::kUnavailable);

  http_.Fail(absl::DeadlineExceededError("reading response: deadline exceeded"));
  EXPECT_EQ(client_->Refresh(zendesk_, c, kFarDeadline).status().code(),
            absl::StatusCode::kDeadlineExceeded);
}

TEST_F(HttpsProviderClientTest, CallsAreBoundedByRequestTimeout) {
  zendesk_.request_timeout = absl::Seconds(7);
  http_.Fail(absl::UnavailableError("down"));
  const absl::Time before = absl::Now();
  (void)client_->Refresh(zendesk_, WithGrant(acme_, access_, refresh_), kFarDeadline);
  ASSERT_EQ(http_.deadlines.size(), 1u);
  EXPECT_GE(http_.deadlines[0], before + absl::Seconds(7));
  EXPECT_LE(http_.deadlines[0], absl::Now() + absl::Seconds(7));

  const absl::Time soon = absl::Now() + absl::Seconds(1);
  http_.Fail(absl::UnavailableError("down"));
  (void)client_->Refresh(zendesk_, WithGrant(acme_, access_, refresh_), soon);
  EXPECT_EQ(http_.deadlines[1], soon);
}

TEST_F(HttpsProviderClientTest, InvalidSubdomainNeverReachesTheNetwork) {
  core::Connection evil = acme_;
  evil.params = {{"subdomain", "evil.com/x"}};
  const absl::Status s = client_
                             ->ExchangeCode(zendesk_, evil, AuthCode(code_), PkceVerifier(),
                                            "https://broker.example/cb", kFarDeadline)
                             .status();
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(http_.requests.empty());
}

TEST_F(HttpsProviderClientTest, ZendeskRevokeDeletesTokenById) {
  http_.Answer(204, "");
  ASSERT_TRUE(
      client_->Revoke(zendesk_, WithGrant(acme_, access_, refresh_, "987"), kFarDeadline).ok());
  ASSERT_EQ(http_.requests.size(), 1u);
  EXPECT_EQ(http_.requests[0].method, "DELETE");
  EXPECT_EQ(http_.requests[0].url, "https://acme.zendesk.com/api/v2/oauth/tokens/987.json");
  EXPECT_EQ(HeaderOf(http_.requests[0], "Authorization"), absl::StrCat("Bearer ", access_));

  http_.Answer(404, R"({"error":"RecordNotFound"})");  // already gone
  EXPECT_TRUE(
      client_->Revoke(zendesk_, WithGrant(acme_, access_, refresh_, "987"), kFarDeadline).ok());
  http_.Answer(401, R"({"error":"invalid_token"})");  // the access token died: refresh first
  EXPECT_EQ(
      client_->Revoke(zendesk_, WithGrant(acme_, access_, refresh_, "987"), kFarDeadline).code(),
      absl::StatusCode::kUnauthenticated);
  http_.Answer(500, "");
  EXPECT_EQ(
      client_->Revoke(zendesk_, WithGrant(acme_, access_, refresh_, "987"), kFarDeadline).code(),
      absl::StatusCode::kUnavailable);
}

TEST_F(HttpsProviderClientTest, ZendeskRevokeLooksUpAMissingId) {
  http_.Answer(200, R"({"token":{"id":42}})");
  http_.Answer(204, "");
  ASSERT_TRUE(client_->Revoke(zendesk_, WithGrant(acme_, access_, refresh_), kFarDeadline).ok());
  ASSERT_EQ(http_.requests.size(), 2u);
  EXPECT_EQ(http_.requests[0].method, "GET");
  EXPECT_EQ(http_.requests[1].url, "https://acme.zendesk.com/api/v2/oauth/tokens/42.json");
}

TEST_F(HttpsProviderClientTest, ZendeskRevokeRefusesAnUnsafeStoredId) {
  EXPECT_EQ(
      client_->Revoke(zendesk_, WithGrant(acme_, access_, refresh_, "../users/1"), kFarDeadline)
          .code(),
      absl::StatusCode::kFailedPrecondition);
  EXPECT_TRUE(http_.requests.empty());
}

TEST_F(HttpsProviderClientTest, Rfc7009RevokesRefreshThenAccessToken) {
  http_.Answer(200, "");
  http_.Answer(200, "");
  ASSERT_TRUE(client_->Revoke(generic_, WithGrant(plain_, access_, refresh_), kFarDeadline).ok());
  ASSERT_EQ(http_.requests.size(), 2u);
  for (const HttpRequest& r : http_.requests) {
    EXPECT_EQ(r.method, "POST");
    EXPECT_EQ(r.url, "https://idp.example/revoke");
    EXPECT_EQ(HeaderOf(r, "Content-Type"), "application/x-www-form-urlencoded");
    EXPECT_EQ(HeaderOf(r, "Authorization"),
              internal::BasicAuthorization("broker:app", client_secret_));
  }
  std::map<std::string, std::string> form = DecodeForm(http_.requests[0].body);
  EXPECT_EQ(form.at("token"), refresh_);
  EXPECT_EQ(form.at("token_type_hint"), "refresh_token");
  form = DecodeForm(http_.requests[1].body);
  EXPECT_EQ(form.at("token"), access_);
  EXPECT_EQ(form.at("token_type_hint"), "access_token");
}

TEST_F(HttpsProviderClientTest, Rfc7009WithSecretPostAndOnlyAnAccessToken) {
  generic_.client_auth = core::ClientAuth::kSecretPost;
  http_.Answer(200, "");
  ASSERT_TRUE(client_->Revoke(generic_, WithGrant(plain_, access_, ""), kFarDeadline).ok());
  ASSERT_EQ(http_.requests.size(), 1u);
  const std::map<std::string, std::string> form = DecodeForm(http_.requests[0].body);
  EXPECT_EQ(form.at("token"), access_);
  EXPECT_EQ(form.at("token_type_hint"), "access_token");
  EXPECT_EQ(form.at("client_id"), "broker:app");
  EXPECT_EQ(form.at("client_secret"), client_secret_);
  EXPECT_EQ(HeaderOf(http_.requests[0], "Authorization"), "");
}

TEST_F(HttpsProviderClientTest, Rfc7009ErrorsAreMapped) {
  http_.Answer(401, R"({"error":"invalid_client"})");
  const absl::Status s =
      client_->Revoke(generic_, WithGrant(plain_, access_, refresh_), kFarDeadline);
  EXPECT_EQ(core::ReasonOf(s), core::Reason::kProviderMisconfigured);
  EXPECT_EQ(http_.requests.size(), 1u);  // stops at the first failure
}

TEST_F(HttpsProviderClientTest, NoRevocationOrNoGrantMakesNoCall) {
  core::ProviderSpec chat = *core::PresetSpec("zendesk-chat");
  chat.name = "chat";
  EXPECT_TRUE(client_->Revoke(chat, WithGrant(acme_, access_, refresh_), kFarDeadline).ok());
  EXPECT_TRUE(client_->Revoke(zendesk_, acme_, kFarDeadline).ok());
  EXPECT_TRUE(http_.requests.empty());
}

// --- The per-host gate ------------------------------------------------------------------------

TEST_F(HttpsProviderClientTest, RetryAfterSecondsBlocksThatHostAndOnlyItUntilThen) {
  const core::Connection c = WithGrant(acme_, access_, refresh_);
  http_.Answer(429, "", {{"Retry-After", "2"}});
  const absl::Time until = clock_.Now() + absl::Seconds(2);
  absl::Status s = client_->Refresh(zendesk_, c, kFarDeadline).status();
  ASSERT_EQ(s.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(core::RetryAfterOf(s), until);
  EXPECT_EQ(s.GetPayload(kRetryAfterPayloadUrl), absl::Cord("2"));
  ASSERT_EQ(http_.requests.size(), 1u);

  // Inside the 2 s: every call to that host fails at once, nothing is sent.
  for (const absl::Duration at :
       {absl::ZeroDuration(), absl::Seconds(1), absl::Milliseconds(999)}) {
    clock_.Advance(at);
    s = client_->Refresh(zendesk_, c, kFarDeadline).status();
    EXPECT_EQ(s.code(), absl::StatusCode::kResourceExhausted);
    EXPECT_EQ(core::RetryAfterOf(s), until);
  }
  EXPECT_EQ(
      client_->Revoke(zendesk_, WithGrant(acme_, access_, refresh_, "987"), kFarDeadline).code(),
      absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(http_.requests.size(), 1u);

  // Another Zendesk subdomain and another provider are other hosts.
  http_.Answer(200, TokenBody(access_, refresh_));
  http_.Answer(200, R"({"token":{"id":1}})");
  EXPECT_TRUE(client_->Refresh(zendesk_, WithGrant(Beta(), access_, refresh_), kFarDeadline).ok());
  EXPECT_EQ(http_.requests.back().url, "https://beta.zendesk.com/api/v2/oauth/tokens/current.json");
  http_.Answer(200, TokenBody(access_, refresh_));
  EXPECT_TRUE(client_->Refresh(generic_, WithGrant(plain_, access_, refresh_), kFarDeadline).ok());
  EXPECT_EQ(http_.requests.size(), 4u);

  // At 2 s the call goes out.
  clock_.Advance(absl::Milliseconds(1));
  http_.Answer(200, TokenBody(access_, refresh_));
  http_.Answer(200, R"({"token":{"id":2}})");
  EXPECT_TRUE(client_->Refresh(zendesk_, c, kFarDeadline).ok());
  EXPECT_EQ(http_.requests[4].url, "https://acme.zendesk.com/oauth/tokens");

  const ProviderGateCounters counters = Counters();
  EXPECT_EQ(counters.rate_limited, 1u);
  EXPECT_EQ(counters.blocked_by_retry_after, 4u);
  EXPECT_EQ(client_->gate_stats().hosts_blocked, 0u);
}

TEST_F(HttpsProviderClientTest, RetryAfterAsHttpDate) {
  const core::Connection c = WithGrant(plain_, access_, refresh_);
  const absl::Time until = clock_.Now() + absl::Seconds(90);  // the fake clock is on a second
  http_.Answer(
      429, "",
      {{"Retry-After", absl::FormatTime("%a, %d %b %Y %H:%M:%S GMT", until, absl::UTCTimeZone())}});
  EXPECT_EQ(core::RetryAfterOf(client_->Refresh(generic_, c, kFarDeadline).status()), until);
  clock_.Advance(absl::Seconds(89));
  EXPECT_EQ(client_->Refresh(generic_, c, kFarDeadline).status().code(),
            absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(http_.requests.size(), 1u);
  clock_.Advance(absl::Seconds(1));
  http_.Answer(200, TokenBody(access_, refresh_));
  EXPECT_TRUE(client_->Refresh(generic_, c, kFarDeadline).ok());
  EXPECT_EQ(http_.requests.size(), 2u);
}

TEST_F(HttpsProviderClientTest, GarbageOrMissingRetryAfterBlocksForTheDefault) {
  ProviderGateOptions gate;
  gate.default_retry_after = absl::Seconds(20);
  client_ = MakeClient(gate);
  const core::Connection c = WithGrant(plain_, access_, refresh_);
  for (const char* value : {"in a while", ""}) {
    http_.Answer(429, "", {{"Retry-After", value}});
    const absl::Status s = client_->Refresh(generic_, c, kFarDeadline).status();
    EXPECT_EQ(core::RetryAfterOf(s), clock_.Now() + absl::Seconds(20)) << value;
    clock_.Advance(absl::Seconds(19));
    EXPECT_EQ(client_->Refresh(generic_, c, kFarDeadline).status().code(),
              absl::StatusCode::kResourceExhausted);
    clock_.Advance(absl::Seconds(1));
  }
  EXPECT_EQ(http_.requests.size(), 2u);
}

TEST_F(HttpsProviderClientTest, AbsurdRetryAfterIsCapped) {
  const core::Connection c = WithGrant(plain_, access_, refresh_);
  http_.Answer(429, "", {{"Retry-After", "864000000"}});
  EXPECT_EQ(core::RetryAfterOf(client_->Refresh(generic_, c, kFarDeadline).status()),
            clock_.Now() + absl::Hours(1));
}

TEST_F(HttpsProviderClientTest, ServiceUnavailableWithRetryAfterBlocksToo) {
  const core::Connection c = WithGrant(plain_, access_, refresh_);
  http_.Answer(503, "");  // no Retry-After: a transient failure, no block
  absl::Status s = client_->Refresh(generic_, c, kFarDeadline).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kUnavailable);
  EXPECT_FALSE(core::RetryAfterOf(s).has_value());

  http_.Answer(503, "", {{"Retry-After", "5"}});
  s = client_->Refresh(generic_, c, kFarDeadline).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ(core::RetryAfterOf(s), clock_.Now() + absl::Seconds(5));
  EXPECT_EQ(client_->Refresh(generic_, c, kFarDeadline).status().code(),
            absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(http_.requests.size(), 2u);
}

TEST_F(HttpsProviderClientTest, BreakerOpensAfterFiveTransientFailuresAndProbesAfter30s) {
  const core::Connection c = WithGrant(plain_, access_, refresh_);
  http_.Answer(502, "");
  http_.Fail(absl::UnavailableError("connection reset by peer"));
  http_.Fail(absl::DeadlineExceededError("reading response"));
  http_.Answer(408, "");
  http_.Answer(500, "");
  for (int i = 0; i < 5; ++i) {
    EXPECT_NE(client_->Refresh(generic_, c, kFarDeadline).status().code(), absl::StatusCode::kOk);
  }
  ASSERT_EQ(http_.requests.size(), 5u);

  // Open: fails at once, nothing sent, with the probe time for the retry layer.
  absl::Status s = client_->Refresh(generic_, c, kFarDeadline).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ(core::RetryAfterOf(s), clock_.Now() + absl::Seconds(30));
  EXPECT_EQ(http_.requests.size(), 5u);
  EXPECT_EQ(client_->gate_stats().circuits_open, 1u);

  // Zendesk's hosts are not affected.
  http_.Answer(200, TokenBody(access_, refresh_));
  http_.Answer(200, R"({"token":{"id":1}})");
  EXPECT_TRUE(client_->Refresh(zendesk_, WithGrant(acme_, access_, refresh_), kFarDeadline).ok());

  // After 30 s one probe goes out; its success closes the circuit.
  clock_.Advance(absl::Seconds(30));
  http_.Answer(200, TokenBody(access_, refresh_));
  EXPECT_TRUE(client_->Refresh(generic_, c, kFarDeadline).ok());
  http_.Answer(200, TokenBody(access_, refresh_));
  EXPECT_TRUE(client_->Refresh(generic_, c, kFarDeadline).ok());
  EXPECT_EQ(http_.requests.size(), 9u);

  const ProviderGateCounters counters = Counters("idp");
  EXPECT_EQ(counters.circuit_opened, 1u);
  EXPECT_EQ(counters.circuit_half_opened, 1u);
  EXPECT_EQ(counters.circuit_closed, 1u);
  EXPECT_EQ(counters.blocked_by_circuit, 1u);
  EXPECT_EQ(client_->gate_stats().circuits_open, 0u);
}

TEST_F(HttpsProviderClientTest, FailedProbeReopensTheCircuit) {
  ProviderGateOptions gate;
  gate.failure_threshold = 2;
  gate.open_for = absl::Seconds(10);
  client_ = MakeClient(gate);
  const core::Connection c = WithGrant(plain_, access_, refresh_);
  http_.Answer(500, "");
  http_.Answer(500, "");
  (void)client_->Refresh(generic_, c, kFarDeadline);
  (void)client_->Refresh(generic_, c, kFarDeadline);
  clock_.Advance(absl::Seconds(10));
  http_.Fail(absl::UnavailableError("connection reset by peer"));  // the probe fails
  EXPECT_EQ(client_->Refresh(generic_, c, kFarDeadline).status().code(),
            absl::StatusCode::kUnavailable);
  ASSERT_EQ(http_.requests.size(), 3u);

  // Re-opened, for twice as long.
  const absl::Status s = client_->Refresh(generic_, c, kFarDeadline).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ(core::RetryAfterOf(s), clock_.Now() + absl::Seconds(20));
  clock_.Advance(absl::Seconds(19));
  (void)client_->Refresh(generic_, c, kFarDeadline);
  EXPECT_EQ(http_.requests.size(), 3u);
  clock_.Advance(absl::Seconds(1));
  http_.Answer(200, TokenBody(access_, refresh_));
  EXPECT_TRUE(client_->Refresh(generic_, c, kFarDeadline).ok());
  EXPECT_EQ(Counters("idp").circuit_opened, 2u);
}

TEST_F(HttpsProviderClientTest, ClientErrorsAndRateLimitsDoNotOpenTheCircuit) {
  const core::Connection c = WithGrant(plain_, access_, refresh_);
  for (int i = 0; i < 6; ++i) {
    http_.Answer(400, R"({"error":"invalid_request"})");
    EXPECT_EQ(client_->Refresh(generic_, c, kFarDeadline).status().code(),
              absl::StatusCode::kFailedPrecondition);
  }
  for (int i = 0; i < 4; ++i) {
    http_.Answer(500, "");
    (void)client_->Refresh(generic_, c, kFarDeadline);
  }
  http_.Answer(429, "", {{"Retry-After", "0"}});  // an answer: the host is up; resets the count
  (void)client_->Refresh(generic_, c, kFarDeadline);
  http_.Answer(500, "");
  (void)client_->Refresh(generic_, c, kFarDeadline);
  http_.Answer(200, TokenBody(access_, refresh_));
  EXPECT_TRUE(client_->Refresh(generic_, c, kFarDeadline).ok());
  EXPECT_EQ(http_.requests.size(), 13u);
  EXPECT_EQ(Counters("idp").circuit_opened, 0u);
}

TEST_F(HttpsProviderClientTest, BadGateOptionsFailAtStartup) {
  ProviderGateOptions gate;
  gate.max_in_flight_per_host = 0;
  EXPECT_EQ(HttpsProviderClient::Create(HttpClientOptions{}, {generic_}, clock_,
                                        &HttpClient::Create, gate)
                .status()
                .code(),
            absl::StatusCode::kInvalidArgument);
}

// Polls (in real time) until `done` holds: for handing over between threads, not for timing.
template <typename F>
bool Eventually(F done) {
  const absl::Time give_up = absl::Now() + absl::Seconds(10);
  while (!done()) {
    if (absl::Now() > give_up) {
      return false;
    }
    absl::SleepFor(absl::Milliseconds(1));
  }
  return true;
}

// Every Send blocks until the test lets one through, then answers a token response.
class BlockingHttp final : public HttpClient {
 public:
  explicit BlockingHttp(std::string body) : body_(std::move(body)) {}
  absl::StatusOr<HttpResponse> Send(const HttpRequest&, absl::Time) override {
    MutexLock lock(&mu_);
    ++entered_;
    while (tickets_ == 0) {
      cv_.Wait(&mu_);
    }
    --tickets_;
    HttpResponse r;
    r.status = 200;
    r.body = body_;
    return r;
  }
  HttpClientStats stats() const override { return {}; }

  void Let(int n) {
    MutexLock lock(&mu_);
    tickets_ += n;
    cv_.SignalAll();
  }
  int entered() const {
    MutexLock lock(&mu_);
    return entered_;
  }

 private:
  const std::string body_;
  mutable Mutex mu_;
  CondVar cv_;
  int entered_ ABSL_GUARDED_BY(mu_) = 0;
  int tickets_ ABSL_GUARDED_BY(mu_) = 0;
};

class BlockingForwarder final : public HttpClient {
 public:
  explicit BlockingForwarder(BlockingHttp& target) : target_(target) {}
  absl::StatusOr<HttpResponse> Send(const HttpRequest& request, absl::Time deadline) override {
    return target_.Send(request, deadline);
  }
  HttpClientStats stats() const override { return {}; }

 private:
  BlockingHttp& target_;
};

TEST_F(HttpsProviderClientTest, ConcurrencyLimitPerHostWaitsForASlotUntilTheDeadline) {
  BlockingHttp blocking(TokenBody(access_, refresh_));
  ProviderGateOptions gate;
  gate.max_in_flight_per_host = 1;
  absl::StatusOr<std::unique_ptr<HttpsProviderClient>> created = HttpsProviderClient::Create(
      HttpClientOptions{}, {generic_}, clock_,
      [&blocking](const HttpClientOptions&) -> absl::StatusOr<std::unique_ptr<HttpClient>> {
        return std::make_unique<BlockingForwarder>(blocking);
      },
      gate);
  ASSERT_TRUE(created.ok()) << created.status();
  HttpsProviderClient& client = **created;
  const core::Connection c = WithGrant(plain_, access_, refresh_);

  absl::Status first;
  std::thread a([&] { first = client.Refresh(generic_, c, kFarDeadline).status(); });
  ASSERT_TRUE(Eventually([&] { return blocking.entered() == 1; }));

  // The slot is taken: a call with a deadline waits, then gives up without sending.
  absl::Status late;
  std::thread b(
      [&] { late = client.Refresh(generic_, c, clock_.Now() + absl::Seconds(1)).status(); });
  ASSERT_TRUE(Eventually([&] { return client.gate_stats().waiting == 1; }));
  clock_.Advance(absl::Seconds(2));
  b.join();
  EXPECT_EQ(late.code(), absl::StatusCode::kDeadlineExceeded);
  EXPECT_EQ(blocking.entered(), 1);

  // One without a deadline waits until the first call is answered, then goes out.
  absl::Status next;
  std::thread d([&] { next = client.Refresh(generic_, c, kFarDeadline).status(); });
  ASSERT_TRUE(Eventually([&] { return client.gate_stats().waiting == 1; }));
  EXPECT_EQ(blocking.entered(), 1);
  blocking.Let(2);
  a.join();
  d.join();
  EXPECT_TRUE(first.ok()) << first;
  EXPECT_TRUE(next.ok()) << next;
  EXPECT_EQ(blocking.entered(), 2);

  const ProviderGateCounters counters = client.gate_stats().providers["idp"];
  EXPECT_EQ(counters.slot_waits, 2u);
  EXPECT_EQ(counters.slot_timeouts, 1u);
  EXPECT_EQ(client.gate_stats().in_flight, 0u);
}

TEST(HttpsProviderClientCreateTest, UnreadableCaFileFailsAtStartup) {
  tb::testing::FakeClock clock;
  core::ProviderSpec spec = *core::PresetSpec("generic");
  spec.name = "idp";
  spec.ca_file = "/nonexistent/ca.pem";
  EXPECT_EQ(HttpsProviderClient::Create(HttpClientOptions{}, {spec}, clock).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(HttpsProviderClientCreateTest, BadProxyFailsAtStartup) {
  tb::testing::FakeClock clock;
  core::ProviderSpec spec = *core::PresetSpec("generic");
  HttpClientOptions options;
  options.https_proxy = "socks5://proxy:1080";
  EXPECT_EQ(HttpsProviderClient::Create(options, {spec}, clock).status().code(),
            absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace tb::provider
