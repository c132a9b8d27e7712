// HttpsProviderClient against a real HTTPS fake of Zendesk's OAuth server (tests/fake_provider)
// on 127.0.0.1: the zendesk and generic presets end to end, rotation, error mapping, transport
// failures, TLS verification, deadlines, connection reuse and the CONNECT proxy.

#include "server/src/provider/https_provider_client.h"

#include <openssl/sha.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include <boost/url/parse.hpp>
#include <boost/url/url_view.hpp>

#include "absl/strings/cord.h"
#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "gtest/gtest.h"
#include "server/src/common/clock.h"
#include "server/src/core/errors.h"
#include "server/src/core/provider_presets.h"
#include "server/src/core/retry_after.h"
#include "tests/fake_provider/fake_provider.h"
#include "tests/integration/provider/connect_proxy.h"
#include "tests/support/test_secrets.h"

namespace tb::provider {
namespace {

using tb::testing::CallKind;
using tb::testing::ConnectProxy;
using tb::testing::Failure;
using tb::testing::FakeProvider;

constexpr char kClientId[] = "token-broker";
constexpr char kRedirectUri[] = "https://broker.example/oauth/callback";

absl::Time Soon() { return absl::Now() + absl::Seconds(10); }

// RFC 7636 S256: base64url(SHA-256(verifier)) without padding.
std::string S256(const std::string& verifier) {
  unsigned char digest[SHA256_DIGEST_LENGTH];
  SHA256(reinterpret_cast<const unsigned char*>(verifier.data()), verifier.size(), digest);
  return absl::WebSafeBase64Escape(
      absl::string_view(reinterpret_cast<const char*>(digest), sizeof(digest)));
}

class HttpsProviderClientIntegrationTest : public ::testing::Test {
 protected:
  void SetUp() override {
    absl::StatusOr<std::unique_ptr<FakeProvider>> fake = FakeProvider::Start({});
    ASSERT_TRUE(fake.ok()) << fake.status();
    fake_ = *std::move(fake);
    fake_->AddClient(kClientId, client_secret_);
    const std::string base = fake_->base_url();

    // The zendesk preset with its URLs pointed at the fake (which serves Zendesk's paths).
    zendesk_ = *core::PresetSpec("zendesk");
    zendesk_.name = "zendesk";
    zendesk_.authorize_url = absl::StrCat(base, "/oauth/authorizations/new");
    zendesk_.token_url = absl::StrCat(base, "/oauth/tokens");
    zendesk_.token_info_url = absl::StrCat(base, "/api/v2/oauth/tokens/current.json");
    zendesk_.revoke_url = absl::StrCat(base, "/api/v2/oauth/tokens/{token_id}.json");
    zendesk_.client_id = kClientId;
    zendesk_.client_secret = ClientSecret(client_secret_);
    zendesk_.ca_file = fake_->ca_file();
    ASSERT_TRUE(core::ValidateSpec(zendesk_).ok());

    // The generic preset: form bodies, client_secret_basic, RFC 7009. It asks for expiring
    // tokens through extra params so that the fake issues a refresh token.
    generic_ = *core::PresetSpec("generic");
    generic_.name = "generic";
    generic_.authorize_url = zendesk_.authorize_url;
    generic_.token_url = zendesk_.token_url;
    generic_.revoke_url = absl::StrCat(base, "/oauth/revoke");
    generic_.scopes = {"read"};
    generic_.extra_token_params = {{"expires_in", "600"}};
    generic_.client_id = kClientId;
    generic_.client_secret = ClientSecret(client_secret_);
    generic_.ca_file = fake_->ca_file();
    ASSERT_TRUE(core::ValidateSpec(generic_).ok());

    acme_.id = "acme";
    acme_.provider = "zendesk";
    acme_.params = {{"subdomain", "acme"}};
    plain_.id = "plain";
    plain_.provider = "generic";

    client_ = NewClient(HttpClientOptions{});
  }

  std::unique_ptr<HttpsProviderClient> NewClient(HttpClientOptions base,
                                                 ProviderGateOptions gate = {}) {
    absl::StatusOr<std::unique_ptr<HttpsProviderClient>> client = HttpsProviderClient::Create(
        std::move(base), {zendesk_, generic_}, clock_, &HttpClient::Create, gate);
    EXPECT_TRUE(client.ok()) << client.status();
    return client.ok() ? *std::move(client) : nullptr;
  }

  // Runs the authorize step as a browser would (the fake auto-approves) and returns the code
  // from the redirect's Location.
  AuthCode Authorize(const core::ProviderSpec& spec, const std::string& verifier) {
    std::string url = absl::StrCat(spec.authorize_url, "?response_type=code&client_id=", kClientId,
                                   "&redirect_uri=https%3A%2F%2Fbroker.example%2Foauth%2Fcallback",
                                   "&state=st4te&scope=read");
    if (!verifier.empty()) {
      absl::StrAppend(&url, "&code_challenge=", S256(verifier), "&code_challenge_method=S256");
    }
    absl::StatusOr<HttpClient*> http = client_->ClientFor(spec);
    EXPECT_TRUE(http.ok());
    if (!http.ok()) {
      return AuthCode();
    }
    HttpRequest req;
    req.method = "GET";
    req.url = url;
    absl::StatusOr<HttpResponse> res = (*http)->Send(req, Soon());
    EXPECT_TRUE(res.ok()) << res.status();
    if (!res.ok()) {
      return AuthCode();
    }
    EXPECT_EQ(res->status, 302);
    const std::string location = res->Header("Location");
    boost::urls::result<boost::urls::url_view> u = boost::urls::parse_uri(location);
    EXPECT_TRUE(u.has_value());
    if (!u.has_value()) {
      return AuthCode();
    }
    const auto it = u->params().find("code");
    EXPECT_NE(it, u->params().end());
    return it == u->params().end() ? AuthCode() : AuthCode(std::string((*it).value));
  }

  // Code exchange through the zendesk preset, with PKCE.
  core::Connection ConnectZendesk() {
    const std::string verifier = tb::testing::NewTestSecret("pkce-verifier-long-enough-for-s256");
    const AuthCode code = Authorize(zendesk_, verifier);
    absl::StatusOr<core::Grant> grant =
        client_->ExchangeCode(zendesk_, acme_, code, PkceVerifier(verifier), kRedirectUri, Soon());
    EXPECT_TRUE(grant.ok()) << grant.status();
    core::Connection c = acme_;
    if (grant.ok()) {
      c.grant = *std::move(grant);
    }
    return c;
  }

  const std::string client_secret_ = tb::testing::NewTestSecret("client-secret");
  SystemClock clock_;
  std::unique_ptr<FakeProvider> fake_;
  core::ProviderSpec zendesk_;
  core::ProviderSpec generic_;
  core::Connection acme_;
  core::Connection plain_;
  std::unique_ptr<HttpsProviderClient> client_;
};

TEST_F(HttpsProviderClientIntegrationTest, ZendeskPresetConnectsLooksUpIdAndRevokesById) {
  const absl::Time before = absl::Now();
  const core::Connection c = ConnectZendesk();
  ASSERT_TRUE(c.grant.has_value());
  const core::Grant& g = *c.grant;
  EXPECT_TRUE(fake_->IsAccessTokenValid(std::string(g.access_token.Reveal())));
  ASSERT_TRUE(g.refresh_token.has_value());  // expires_in was sent: an expiring token
  EXPECT_TRUE(fake_->IsRefreshTokenValid(std::string(g.refresh_token->Reveal())));
  EXPECT_EQ(g.token_type, "Bearer");
  ASSERT_TRUE(g.expires_at.has_value());
  EXPECT_GE(*g.expires_at, before + absl::Seconds(1800));
  EXPECT_LE(*g.expires_at, absl::Now() + absl::Seconds(1800));
  EXPECT_EQ(fake_->last_token_request_content_type(), "application/json");
  EXPECT_EQ(fake_->last_token_request_client_auth(), tb::testing::ClientAuth::kBody);
  const std::vector<std::string> fields = fake_->last_token_request_fields();
  for (const char* f : {"client_id", "client_secret", "code", "code_verifier", "expires_in",
                        "grant_type", "redirect_uri", "refresh_token_expires_in"}) {
    EXPECT_NE(std::find(fields.begin(), fields.end(), f), fields.end()) << f;
  }
  const std::optional<int64_t> id = fake_->TokenIdOf(std::string(g.access_token.Reveal()));
  ASSERT_TRUE(id.has_value());
  EXPECT_EQ(g.provider_token_id, absl::StrCat(*id));

  ASSERT_TRUE(client_->Revoke(zendesk_, c, Soon()).ok());
  EXPECT_EQ(fake_->calls(CallKind::kRevokeById), 1);
  EXPECT_EQ(fake_->calls(CallKind::kRevokeCurrent), 0);
  EXPECT_FALSE(fake_->IsAccessTokenValid(std::string(g.access_token.Reveal())));
  EXPECT_FALSE(fake_->IsRefreshTokenValid(std::string(g.refresh_token->Reveal())));
}

TEST_F(HttpsProviderClientIntegrationTest, RefreshRotatesAndTheOldRefreshTokenIsDead) {
  const core::Connection c = ConnectZendesk();
  ASSERT_TRUE(c.grant.has_value());
  absl::StatusOr<core::Grant> next = client_->Refresh(zendesk_, c, Soon());
  ASSERT_TRUE(next.ok()) << next.status();
  EXPECT_NE(next->access_token, c.grant->access_token);
  ASSERT_TRUE(next->refresh_token.has_value());
  EXPECT_NE(*next->refresh_token, *c.grant->refresh_token);
  EXPECT_TRUE(fake_->IsAccessTokenValid(std::string(next->access_token.Reveal())));
  EXPECT_FALSE(fake_->IsAccessTokenValid(std::string(c.grant->access_token.Reveal())));
  // The new token is a new Zendesk record: its id was looked up again.
  EXPECT_EQ(next->provider_token_id,
            absl::StrCat(*fake_->TokenIdOf(std::string(next->access_token.Reveal()))));
  EXPECT_NE(next->provider_token_id, c.grant->provider_token_id);

  // Presenting the spent refresh token again: invalid_grant, the user must re-authorize.
  const absl::Status again = client_->Refresh(zendesk_, c, Soon()).status();
  EXPECT_EQ(again.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(core::ReasonOf(again), core::Reason::kNeedsReauth);
  EXPECT_EQ(fake_->refresh_token_reuse_attempts(), 1);

  // Revoking the rotated grant by its new id kills it.
  core::Connection rotated = acme_;
  rotated.grant = *next;
  ASSERT_TRUE(client_->Revoke(zendesk_, rotated, Soon()).ok());
  EXPECT_FALSE(fake_->IsAccessTokenValid(std::string(next->access_token.Reveal())));
}

TEST_F(HttpsProviderClientIntegrationTest, GenericPresetUsesFormBasicAuthAndRfc7009) {
  const std::string verifier = tb::testing::NewTestSecret("pkce-verifier-long-enough-for-s256");
  absl::StatusOr<core::Grant> g =
      client_->ExchangeCode(generic_, plain_, Authorize(generic_, verifier), PkceVerifier(verifier),
                            kRedirectUri, Soon());
  ASSERT_TRUE(g.ok()) << g.status();
  EXPECT_EQ(fake_->last_token_request_content_type(), "application/x-www-form-urlencoded");
  EXPECT_EQ(fake_->last_token_request_client_auth(), tb::testing::ClientAuth::kBasic);
  EXPECT_TRUE(g->provider_token_id.empty());  // no token-info endpoint
  EXPECT_EQ(fake_->calls(CallKind::kTokenInfo), 0);
  ASSERT_TRUE(g->refresh_token.has_value());

  core::Connection c = plain_;
  c.grant = *g;
  absl::StatusOr<core::Grant> next = client_->Refresh(generic_, c, Soon());
  ASSERT_TRUE(next.ok()) << next.status();
  c.grant = *next;

  ASSERT_TRUE(client_->Revoke(generic_, c, Soon()).ok());
  EXPECT_GE(fake_->calls(CallKind::kRevokeRfc7009), 1);
  EXPECT_FALSE(fake_->IsAccessTokenValid(std::string(next->access_token.Reveal())));
  EXPECT_FALSE(fake_->IsRefreshTokenValid(std::string(next->refresh_token->Reveal())));
}

TEST_F(HttpsProviderClientIntegrationTest, RejectedClientCredentialsMarkProviderMisconfigured) {
  const core::Connection c = ConnectZendesk();
  ASSERT_TRUE(c.grant.has_value());
  core::ProviderSpec wrong = zendesk_;
  wrong.client_secret = ClientSecret(tb::testing::NewTestSecret("wrong-secret"));
  const absl::Status s = client_->Refresh(wrong, c, Soon()).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(core::ReasonOf(s), core::Reason::kProviderMisconfigured);
  // The grant was not touched.
  EXPECT_TRUE(fake_->IsRefreshTokenValid(std::string(c.grant->refresh_token->Reveal())));
}

TEST_F(HttpsProviderClientIntegrationTest, RateLimitKeepsRetryAfter) {
  const core::Connection c = ConnectZendesk();
  Failure limited;
  limited.http_status = 429;
  limited.retry_after = "7";
  fake_->FailNext(CallKind::kTokenRefresh, limited);
  const absl::Status s = client_->Refresh(zendesk_, c, Soon()).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(s.GetPayload(kRetryAfterPayloadUrl), absl::Cord("7"));
  EXPECT_TRUE(fake_->IsRefreshTokenValid(std::string(c.grant->refresh_token->Reveal())));
}

TEST_F(HttpsProviderClientIntegrationTest, ServerErrorAndGarbageAreUnavailable) {
  const core::Connection c = ConnectZendesk();
  Failure broken;
  broken.http_status = 500;
  fake_->FailNext(CallKind::kTokenRefresh, broken);
  EXPECT_EQ(client_->Refresh(zendesk_, c, Soon()).status().code(), absl::StatusCode::kUnavailable);

  Failure garbage;
  garbage.garbage_body = R"({"token_type":"bearer","expires_in":"soon"})";
  fake_->FailNext(CallKind::kTokenRefresh, garbage);
  EXPECT_EQ(client_->Refresh(zendesk_, c, Soon()).status().code(), absl::StatusCode::kUnavailable);

  garbage.garbage_body = "<html>maintenance</html>";
  fake_->FailNext(CallKind::kTokenRefresh, garbage);
  EXPECT_EQ(client_->Refresh(zendesk_, c, Soon()).status().code(), absl::StatusCode::kUnavailable);
  // None of these were processed: the refresh token still works.
  EXPECT_TRUE(client_->Refresh(zendesk_, c, Soon()).ok());
}

TEST_F(HttpsProviderClientIntegrationTest, ResetConnectionIsUnavailableAndNotResent) {
  const core::Connection c = ConnectZendesk();
  Failure reset;
  reset.reset_connection = true;
  fake_->FailNext(CallKind::kTokenRefresh, reset);
  EXPECT_EQ(client_->Refresh(zendesk_, c, Soon()).status().code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ(fake_->calls(CallKind::kTokenRefresh), 1);  // a POST is never resent
}

// --- The per-host gate against the real fake --------------------------------------------------

TEST_F(HttpsProviderClientIntegrationTest, RetryAfterTwoSecondsMeansNoCallInsideThem) {
  const core::Connection c = ConnectZendesk();
  ASSERT_TRUE(c.grant.has_value());
  Failure limited;
  limited.http_status = 429;
  limited.retry_after = "2";
  fake_->FailNext(CallKind::kTokenRefresh, limited);
  const absl::Time sent = absl::Now();
  const absl::Status s = client_->Refresh(zendesk_, c, Soon()).status();
  ASSERT_EQ(s.code(), absl::StatusCode::kResourceExhausted);
  const std::optional<absl::Time> until = core::RetryAfterOf(s);
  ASSERT_TRUE(until.has_value());
  EXPECT_GE(*until, sent + absl::Seconds(2));
  EXPECT_LE(*until, absl::Now() + absl::Seconds(2));
  const int refreshes = fake_->calls(CallKind::kTokenRefresh);
  const int infos = fake_->calls(CallKind::kTokenInfo);

  // Keep trying inside the window: every call fails at once and the fake sees none of them.
  int refused = 0;
  while (absl::Now() < *until - absl::Milliseconds(200)) {
    EXPECT_EQ(client_->Refresh(zendesk_, c, Soon()).status().code(),
              absl::StatusCode::kResourceExhausted);
    EXPECT_EQ(client_->Revoke(zendesk_, c, Soon()).code(), absl::StatusCode::kResourceExhausted);
    ++refused;
    absl::SleepFor(absl::Milliseconds(100));
  }
  EXPECT_GT(refused, 5);
  EXPECT_EQ(fake_->calls(CallKind::kTokenRefresh), refreshes);
  EXPECT_EQ(fake_->calls(CallKind::kTokenInfo), infos);
  EXPECT_EQ(fake_->calls(CallKind::kRevokeById), 0);

  // After it, the refresh goes out, and the refresh token was never spent meanwhile.
  absl::SleepFor(*until - absl::Now() + absl::Milliseconds(50));
  absl::StatusOr<core::Grant> next = client_->Refresh(zendesk_, c, Soon());
  ASSERT_TRUE(next.ok()) << next.status();
  EXPECT_EQ(fake_->calls(CallKind::kTokenRefresh), refreshes + 1);
  EXPECT_EQ(fake_->refresh_token_reuse_attempts(), 0);
  const ProviderGateCounters counters = client_->gate_stats().providers["zendesk"];
  EXPECT_EQ(counters.rate_limited, 1u);
  EXPECT_EQ(counters.blocked_by_retry_after, static_cast<uint64_t>(2 * refused));
}

TEST_F(HttpsProviderClientIntegrationTest, ServerErrorsForAWhileOpenTheBreakerThenItRecovers) {
  ProviderGateOptions gate;
  gate.failure_threshold = 3;
  gate.open_for = absl::Milliseconds(500);
  client_ = NewClient(HttpClientOptions{}, gate);
  ASSERT_NE(client_, nullptr);
  const core::Connection c = ConnectZendesk();
  ASSERT_TRUE(c.grant.has_value());
  Failure broken;
  broken.http_status = 500;
  for (int i = 0; i < 5; ++i) {  // the provider is down for longer than the threshold
    fake_->FailNext(CallKind::kTokenRefresh, broken);
  }
  for (int i = 0; i < 3; ++i) {
    EXPECT_EQ(client_->Refresh(zendesk_, c, Soon()).status().code(),
              absl::StatusCode::kUnavailable);
  }
  EXPECT_EQ(fake_->calls(CallKind::kTokenRefresh), 3);

  // Open: calls fail at once and reach nothing.
  const absl::Status s = client_->Refresh(zendesk_, c, Soon()).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kUnavailable);
  const std::optional<absl::Time> probe_at = core::RetryAfterOf(s);
  ASSERT_TRUE(probe_at.has_value());
  EXPECT_EQ(fake_->calls(CallKind::kTokenRefresh), 3);

  // The probe meets the fourth 500: open again (for 1 s).
  absl::SleepFor(*probe_at - absl::Now() + absl::Milliseconds(50));
  EXPECT_EQ(client_->Refresh(zendesk_, c, Soon()).status().code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ(fake_->calls(CallKind::kTokenRefresh), 4);
  const absl::Status again = client_->Refresh(zendesk_, c, Soon()).status();
  EXPECT_EQ(again.code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ(fake_->calls(CallKind::kTokenRefresh), 4);

  // Retrying as the refresher would, at the time the error names: the fifth 500 re-opens it once
  // more, then the provider is back and the refresh succeeds.
  absl::StatusOr<core::Grant> next = absl::UnavailableError("not tried");
  const absl::Time give_up = absl::Now() + absl::Seconds(20);
  while (!next.ok() && absl::Now() < give_up) {
    const std::optional<absl::Time> at = core::RetryAfterOf(next.status());
    absl::SleepFor(at ? *at - absl::Now() + absl::Milliseconds(50) : absl::Milliseconds(100));
    next = client_->Refresh(zendesk_, c, Soon());
  }
  ASSERT_TRUE(next.ok()) << next.status();
  EXPECT_EQ(fake_->calls(CallKind::kTokenRefresh), 6);
  EXPECT_TRUE(fake_->IsAccessTokenValid(std::string(next->access_token.Reveal())));
  // After the circuit closed, calls flow normally.
  core::Connection rotated = c;
  rotated.grant = *next;
  EXPECT_TRUE(client_->Refresh(zendesk_, rotated, Soon()).ok());

  const ProviderGateCounters counters = client_->gate_stats().providers["zendesk"];
  EXPECT_EQ(counters.circuit_opened, 3u);
  EXPECT_EQ(counters.circuit_closed, 1u);
  EXPECT_GE(counters.blocked_by_circuit, 2u);
}

TEST_F(HttpsProviderClientIntegrationTest, ConnectionResetsCountAsTransientFailures) {
  ProviderGateOptions gate;
  gate.failure_threshold = 2;
  client_ = NewClient(HttpClientOptions{}, gate);
  ASSERT_NE(client_, nullptr);
  const core::Connection c = ConnectZendesk();
  ASSERT_TRUE(c.grant.has_value());
  Failure reset;
  reset.reset_connection = true;
  fake_->FailNext(CallKind::kTokenRefresh, reset);
  fake_->FailNext(CallKind::kTokenRefresh, reset);
  EXPECT_EQ(client_->Refresh(zendesk_, c, Soon()).status().code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ(client_->Refresh(zendesk_, c, Soon()).status().code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ(fake_->calls(CallKind::kTokenRefresh), 2);
  EXPECT_EQ(client_->Refresh(zendesk_, c, Soon()).status().code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ(fake_->calls(CallKind::kTokenRefresh), 2);  // the circuit is open: nothing sent
  EXPECT_EQ(client_->gate_stats().providers["zendesk"].circuit_opened, 1u);
  EXPECT_TRUE(fake_->IsRefreshTokenValid(std::string(c.grant->refresh_token->Reveal())));
}

TEST_F(HttpsProviderClientIntegrationTest, ConcurrencyLimitHoldsCallsBackUntilTheirDeadline) {
  ProviderGateOptions gate;
  gate.max_in_flight_per_host = 1;
  client_ = NewClient(HttpClientOptions{}, gate);
  ASSERT_NE(client_, nullptr);
  const core::Connection c = ConnectZendesk();
  ASSERT_TRUE(c.grant.has_value());
  Failure slow;
  slow.delay_before = absl::Seconds(2);
  fake_->FailNext(CallKind::kTokenRefresh, slow);
  absl::StatusOr<core::Grant> first = absl::UnknownError("not run");
  std::thread a([&] { first = client_->Refresh(zendesk_, c, Soon()); });
  const absl::Time give_up = absl::Now() + absl::Seconds(10);
  while (fake_->calls(CallKind::kTokenRefresh) < 1 && absl::Now() < give_up) {
    absl::SleepFor(absl::Milliseconds(5));
  }
  ASSERT_EQ(fake_->calls(CallKind::kTokenRefresh), 1);

  // The one slot is busy for ~2 s: this call waits 300 ms, then gives up without sending.
  const absl::Time start = absl::Now();
  EXPECT_EQ(client_->Refresh(zendesk_, c, start + absl::Milliseconds(300)).status().code(),
            absl::StatusCode::kDeadlineExceeded);
  EXPECT_GE(absl::Now() - start, absl::Milliseconds(250));
  EXPECT_LT(absl::Now() - start, absl::Milliseconds(1500));
  a.join();
  ASSERT_TRUE(first.ok()) << first.status();  // the slow answer was waited for
  EXPECT_EQ(fake_->calls(CallKind::kTokenRefresh), 1);
  EXPECT_EQ(client_->gate_stats().providers["zendesk"].slot_timeouts, 1u);
}

TEST_F(HttpsProviderClientIntegrationTest, UntrustedServerIsUnavailable) {
  core::ProviderSpec untrusted = zendesk_;
  untrusted.ca_file.clear();  // the system trust store does not know the test CA
  const absl::Status s =
      client_
          ->ExchangeCode(untrusted, acme_, AuthCode(tb::testing::NewTestSecret("code")),
                         PkceVerifier(), kRedirectUri, Soon())
          .status();
  EXPECT_EQ(s.code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ(fake_->calls(CallKind::kTokenCode), 0);
}

TEST_F(HttpsProviderClientIntegrationTest, DeadlineIsHonoured) {
  const core::Connection c = ConnectZendesk();
  Failure slow;
  slow.delay_before = absl::Seconds(3);
  fake_->FailNext(CallKind::kTokenRefresh, slow);
  const absl::Time start = absl::Now();
  EXPECT_EQ(client_->Refresh(zendesk_, c, start + absl::Milliseconds(300)).status().code(),
            absl::StatusCode::kDeadlineExceeded);
  EXPECT_LT(absl::Now() - start, absl::Seconds(2));

  // spec.request_timeout bounds a call whose caller gave no deadline.
  core::ProviderSpec impatient = zendesk_;
  impatient.request_timeout = absl::Milliseconds(300);
  fake_->FailNext(CallKind::kTokenRefresh, slow);
  EXPECT_EQ(client_->Refresh(impatient, c, absl::InfiniteFuture()).status().code(),
            absl::StatusCode::kDeadlineExceeded);
}

TEST_F(HttpsProviderClientIntegrationTest, ReusesConnectionsAcrossCalls) {
  core::Connection c = ConnectZendesk();  // authorize, exchange, token info: 3 requests
  for (int i = 0; i < 3; ++i) {           // refresh + token info each
    absl::StatusOr<core::Grant> next = client_->Refresh(zendesk_, c, Soon());
    ASSERT_TRUE(next.ok()) << next.status();
    c.grant = *std::move(next);
  }
  absl::StatusOr<HttpClient*> http = client_->ClientFor(zendesk_);
  ASSERT_TRUE(http.ok());
  const HttpClientStats stats = (*http)->stats();
  EXPECT_EQ(stats.requests, 9u);
  EXPECT_EQ(stats.connections_opened, 1u);
}

TEST_F(HttpsProviderClientIntegrationTest, WorksThroughAConnectProxy) {
  ConnectProxy proxy;
  ASSERT_TRUE(proxy.ok());
  HttpClientOptions base;
  base.https_proxy = proxy.url();
  client_ = NewClient(base);
  ASSERT_NE(client_, nullptr);
  const core::Connection c = ConnectZendesk();
  ASSERT_TRUE(c.grant.has_value());
  ASSERT_TRUE(client_->Refresh(zendesk_, c, Soon()).ok());
  EXPECT_EQ(proxy.targets(), std::vector<std::string>{absl::StrCat("127.0.0.1:", fake_->port())});
}

TEST_F(HttpsProviderClientIntegrationTest, NoProxyBypassesTheProxy) {
  ConnectProxy proxy;
  ASSERT_TRUE(proxy.ok());
  HttpClientOptions base;
  base.https_proxy = proxy.url();
  base.no_proxy = "127.0.0.1";
  client_ = NewClient(base);
  ASSERT_NE(client_, nullptr);
  const core::Connection c = ConnectZendesk();
  ASSERT_TRUE(c.grant.has_value());
  EXPECT_TRUE(proxy.targets().empty());
}

}  // namespace
}  // namespace tb::provider
