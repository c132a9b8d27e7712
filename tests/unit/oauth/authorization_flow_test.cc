#include "server/src/oauth/authorization_flow.h"

#include "absl/strings/match.h"
#include "absl/strings/str_split.h"
#include "gtest/gtest.h"
#include "server/src/core/errors.h"
#include "server/src/core/oauth_state.h"
#include "server/src/core/provider_presets.h"
#include "server/src/crypto/openssl_digest.h"
#include "server/src/crypto/openssl_random.h"
#include "server/src/store/in_memory_flow_store.h"
#include "server/src/store/in_memory_token_store.h"
#include "tests/fakes/fake_clock.h"
#include "tests/fakes/fake_provider_client.h"
#include "tests/support/test_secrets.h"

namespace tb::oauth {
namespace {

using core::FlowErrorKind;

// The query parameters of a URL, decoded enough for our tokens (no '+' or '%' in them).
std::map<std::string, std::string> Query(const std::string& url) {
  std::map<std::string, std::string> out;
  const size_t q = url.find('?');
  if (q == std::string::npos) {
    return out;
  }
  for (absl::string_view kv : absl::StrSplit(url.substr(q + 1), '&')) {
    const size_t eq = kv.find('=');
    out[std::string(kv.substr(0, eq))] = std::string(kv.substr(eq + 1));
  }
  return out;
}

class AuthorizationFlowTest : public ::testing::Test {
 protected:
  static FlowOptions Options() {
    FlowOptions options;
    options.public_base_url = "https://broker.example.com/";
    options.link_key = KeyMaterial(testing::NewTestSecret("link-key"));
    options.return_url_allowlist = {"https://app.example.com/connected"};
    return options;
  }

  AuthorizationFlowTest() {
    core::ProviderSpec zendesk = *core::PresetSpec("zendesk");
    zendesk.name = "zendesk";
    zendesk.client_id = "broker";
    zendesk.client_secret = ClientSecret(testing::NewTestSecret("client-secret"));
    providers_.Put("zendesk", zendesk);
    core::ProviderSpec chat = *core::PresetSpec("zendesk-chat");
    chat.name = "chat";
    chat.client_id = "broker-chat";
    chat.client_secret = ClientSecret(testing::NewTestSecret("client-secret"));
    providers_.Put("chat", chat);
  }

  core::Grant NewGrant() {
    core::Grant g;
    g.access_token = AccessToken(testing::NewTestSecret("access"));
    g.refresh_token = RefreshToken(testing::NewTestSecret("refresh"));
    g.issued_at = clock_.Now();
    g.expires_at = clock_.Now() + absl::Hours(1);
    return g;
  }

  // CreateLink + Start; returns the authorize URL's query and the cookie value.
  struct Started {
    std::map<std::string, std::string> query;
    std::string cookie;
    std::string authorize_url;
  };
  Started MintAndStart(const std::string& id, bool reconnect = false,
                       const std::string& provider = "zendesk") {
    absl::StatusOr<AuthorizationFlow::MintedLink> link =
        flow_.CreateLink(id, provider, {{"subdomain", "acme"}}, absl::ZeroDuration(), reconnect);
    EXPECT_TRUE(link.ok()) << link.status();
    link_token_ = Query(link->url)["link"];
    link_id_ = link->link_id;
    absl::StatusOr<AuthorizationFlow::Started> started = flow_.Start(link_token_);
    EXPECT_TRUE(started.ok()) << started.status();
    return {Query(started->authorize_url), std::string(started->browser_binding.Reveal()),
            started->authorize_url};
  }

  AuthorizationFlow::Callback CallbackFor(const Started& s) {
    AuthorizationFlow::Callback cb;
    cb.state = s.query.at("state");
    cb.code = testing::NewTestSecret("code");
    cb.browser_binding = s.cookie;
    return cb;
  }

  core::ProviderDirectory providers_;
  FlowOptions options_ = Options();
  testing::FakeClock clock_;
  crypto::OpenSslRandom random_;
  crypto::OpenSslDigest digest_;
  store::InMemoryFlowStore flow_store_;
  store::InMemoryTokenStore token_store_;
  cache::ConnectionCache cache_;
  Broker broker_{clock_, token_store_, cache_};
  testing::FakeProviderClient provider_;
  Revoker revoker_{{}, providers_, clock_, broker_, provider_};
  AuthorizationFlow flow_{options_,    providers_, clock_,  random_, digest_,
                          flow_store_, provider_,  broker_, revoker_};
  std::string link_token_;
  std::string link_id_;
};

TEST_F(AuthorizationFlowTest, LinkStartCallbackConnectsTheAccount) {
  const Started s = MintAndStart("acme");
  EXPECT_EQ(broker_.GetConnection("acme").value()->status, core::ConnectionStatus::kPending);
  EXPECT_TRUE(
      absl::StartsWith(s.authorize_url, "https://acme.zendesk.com/oauth/authorizations/new?"));
  EXPECT_EQ(s.query.at("response_type"), "code");
  EXPECT_EQ(s.query.at("client_id"), "broker");
  EXPECT_EQ(s.query.at("redirect_uri"), "https%3A%2F%2Fbroker.example.com%2Foauth%2Fcallback");
  EXPECT_EQ(s.query.at("code_challenge_method"), "S256");
  EXPECT_EQ(s.query.at("scope"), "read%20write");
  EXPECT_GE(s.query.at("state").size(), 43u);

  const core::Grant grant = NewGrant();
  provider_.NextExchangeReturns(grant);
  const AuthorizationFlow::Callback cb = CallbackFor(s);
  absl::StatusOr<core::ConnectionId> id = flow_.Complete(cb);
  ASSERT_TRUE(id.ok()) << id.status();
  EXPECT_EQ(*id, "acme");

  // The exchange used the code, the PKCE verifier behind the challenge, and the exact
  // redirect_uri.
  ASSERT_EQ(provider_.exchange_calls().size(), 1u);
  const auto call = provider_.exchange_calls()[0];
  EXPECT_EQ(call.code, cb.code);
  EXPECT_EQ(core::PkceChallengeS256(digest_, PkceVerifier(call.verifier)),
            s.query.at("code_challenge"));
  EXPECT_EQ(call.redirect_uri, "https://broker.example.com/oauth/callback");

  absl::StatusOr<TokenView> token = broker_.GetToken("acme");
  ASSERT_TRUE(token.ok());
  EXPECT_EQ(token->grant().access_token, grant.access_token);
  EXPECT_TRUE(flow_store_.GetLink(link_id_)->used_at.has_value());
}

TEST_F(AuthorizationFlowTest, StartDoesNotConsumeTheLink) {
  MintAndStart("acme");
  EXPECT_TRUE(flow_.Start(link_token_).ok());  // a mail scanner's prefetch, then the admin
  EXPECT_TRUE(flow_.Start(link_token_).ok());
}

TEST_F(AuthorizationFlowTest, StateWorksExactlyOnce) {
  const Started s = MintAndStart("acme");
  provider_.NextExchangeReturns(NewGrant());
  ASSERT_TRUE(flow_.Complete(CallbackFor(s)).ok());
  EXPECT_EQ(core::FlowErrorOf(flow_.Complete(CallbackFor(s)).status()),
            FlowErrorKind::kStateInvalid);
  EXPECT_EQ(provider_.exchange_calls().size(), 1u);
}

TEST_F(AuthorizationFlowTest, BadCallbacksStoreNothing) {
  struct Case {
    const char* name;
    std::function<void(AuthorizationFlow::Callback&)> mutate;
    FlowErrorKind want;
  };
  const Case cases[] = {
      {"missing state", [](auto& cb) { cb.state.clear(); }, FlowErrorKind::kStateInvalid},
      {"unknown state", [](auto& cb) { cb.state = "forged"; }, FlowErrorKind::kStateInvalid},
      {"no cookie", [](auto& cb) { cb.browser_binding.clear(); }, FlowErrorKind::kWrongBrowser},
      {"other cookie", [](auto& cb) { cb.browser_binding = "x"; }, FlowErrorKind::kWrongBrowser},
      {"access denied", [](auto& cb) { cb.error = "access_denied"; }, FlowErrorKind::kAccessDenied},
      {"server error", [](auto& cb) { cb.error = "server_error"; }, FlowErrorKind::kProviderError},
      {"no code", [](auto& cb) { cb.code.clear(); }, FlowErrorKind::kProviderError},
  };
  for (const Case& c : cases) {
    const Started s = MintAndStart(absl::StrCat("c-", &c - cases));
    AuthorizationFlow::Callback cb = CallbackFor(s);
    c.mutate(cb);
    EXPECT_EQ(core::FlowErrorOf(flow_.Complete(cb).status()), c.want) << c.name;
    EXPECT_EQ(broker_.GetConnection(absl::StrCat("c-", &c - cases)).value()->status,
              core::ConnectionStatus::kPending)
        << c.name;
  }
  EXPECT_TRUE(provider_.exchange_calls().empty());
}

TEST_F(AuthorizationFlowTest, StateExpiresAfterTenMinutes) {
  const Started s = MintAndStart("acme");
  clock_.Advance(absl::Minutes(10) + absl::Seconds(1));
  EXPECT_EQ(core::FlowErrorOf(flow_.Complete(CallbackFor(s)).status()),
            FlowErrorKind::kStateInvalid);
}

TEST_F(AuthorizationFlowTest, StateWithoutItsCookieIsBurnt) {
  const Started s = MintAndStart("acme");
  AuthorizationFlow::Callback cb = CallbackFor(s);
  cb.browser_binding.clear();
  EXPECT_FALSE(flow_.Complete(cb).ok());
  // The right browser cannot use it afterwards either: it was consumed.
  EXPECT_EQ(core::FlowErrorOf(flow_.Complete(CallbackFor(s)).status()),
            FlowErrorKind::kStateInvalid);
}

TEST_F(AuthorizationFlowTest, FailedExchangeStoresNothing) {
  const Started s = MintAndStart("acme");
  provider_.NextExchangeReturns(absl::UnavailableError("provider down"));
  EXPECT_EQ(core::FlowErrorOf(flow_.Complete(CallbackFor(s)).status()),
            FlowErrorKind::kExchangeFailed);
  EXPECT_EQ(broker_.GetConnection("acme").value()->status, core::ConnectionStatus::kPending);
  EXPECT_FALSE(flow_store_.GetLink(link_id_)->used_at.has_value());
}

TEST_F(AuthorizationFlowTest, TamperedExpiredRevokedAndUsedLinksAreRefused) {
  MintAndStart("acme");
  std::string tampered = link_token_;
  tampered[5] = tampered[5] == 'A' ? 'B' : 'A';
  EXPECT_EQ(core::FlowErrorOf(flow_.Start(tampered).status()), FlowErrorKind::kLinkInvalid);

  ASSERT_TRUE(flow_.RevokeLink(link_id_).ok());
  EXPECT_EQ(core::FlowErrorOf(flow_.Start(link_token_).status()), FlowErrorKind::kLinkRevoked);

  MintAndStart("beta");
  clock_.Advance(absl::Hours(73));
  EXPECT_EQ(core::FlowErrorOf(flow_.Start(link_token_).status()), FlowErrorKind::kLinkExpired);
}

TEST_F(AuthorizationFlowTest, RevokedLinkFailsAtCallbackToo) {
  const Started s = MintAndStart("acme");
  ASSERT_TRUE(flow_.RevokeLink(link_id_).ok());
  EXPECT_EQ(core::FlowErrorOf(flow_.Complete(CallbackFor(s)).status()),
            FlowErrorKind::kLinkRevoked);
  EXPECT_TRUE(provider_.exchange_calls().empty());
}

TEST_F(AuthorizationFlowTest, UsedLinkCannotConnectAgain) {
  const Started s = MintAndStart("acme");
  provider_.NextExchangeReturns(NewGrant());
  ASSERT_TRUE(flow_.Complete(CallbackFor(s)).ok());
  EXPECT_FALSE(flow_.Start(link_token_).ok());
}

TEST_F(AuthorizationFlowTest, ActiveConnectionNeedsAReconnectLink) {
  const Started s = MintAndStart("acme");
  const core::Grant first = NewGrant();
  provider_.NextExchangeReturns(first);
  ASSERT_TRUE(flow_.Complete(CallbackFor(s)).ok());

  EXPECT_EQ(
      core::FlowErrorOf(
          flow_.CreateLink("acme", "zendesk", {{"subdomain", "acme"}}, absl::ZeroDuration(), false)
              .status()),
      FlowErrorKind::kAlreadyConnected);

  const Started again = MintAndStart("acme", /*reconnect=*/true);
  const core::Grant second = NewGrant();
  provider_.NextExchangeReturns(second);
  ASSERT_TRUE(flow_.Complete(CallbackFor(again)).ok());
  EXPECT_EQ(broker_.GetToken("acme")->grant().access_token, second.access_token);
  EXPECT_EQ(broker_.GetToken("acme")->grant().generation, 2u);
  // The previous grant was revoked at the provider, after the new one was stored.
  EXPECT_EQ(provider_.revoked(),
            std::vector<std::string>{std::string(first.access_token.Reveal())});
}

TEST_F(AuthorizationFlowTest, NonReconnectLinkMintedBeforeConnectingCannotReplaceTheGrant) {
  const Started a = MintAndStart("acme");
  const Started b = MintAndStart("acme");  // a second, ordinary link for the same connection
  provider_.NextExchangeReturns(NewGrant());
  ASSERT_TRUE(flow_.Complete(CallbackFor(a)).ok());
  EXPECT_EQ(core::FlowErrorOf(flow_.Complete(CallbackFor(b)).status()),
            FlowErrorKind::kAlreadyConnected);
  EXPECT_EQ(provider_.exchange_calls().size(), 1u);
}

TEST_F(AuthorizationFlowTest, CreateLinkValidatesItsInput) {
  EXPECT_EQ(
      flow_.CreateLink("bad id", "zendesk", {{"subdomain", "acme"}}, absl::ZeroDuration(), false)
          .status()
          .code(),
      absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(flow_.CreateLink("acme", "okta", {}, absl::ZeroDuration(), false).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(
      flow_.CreateLink("acme", "zendesk", {{"subdomain", "evil.com/"}}, absl::ZeroDuration(), false)
          .status()
          .code(),
      absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(
      flow_.CreateLink("acme", "zendesk", {{"subdomain", "acme"}}, absl::Hours(24 * 365), false)
          .status()
          .code(),
      absl::StatusCode::kInvalidArgument);
  ASSERT_TRUE(
      flow_.CreateLink("acme", "zendesk", {{"subdomain", "acme"}}, absl::ZeroDuration(), false)
          .ok());
  EXPECT_EQ(
      flow_.CreateLink("acme", "zendesk", {{"subdomain", "other"}}, absl::ZeroDuration(), false)
          .status()
          .code(),
      absl::StatusCode::kInvalidArgument);
}

TEST_F(AuthorizationFlowTest, ZendeskChatSendsSubdomainAndNoPkce) {
  const Started s = MintAndStart("chat-co", false, "chat");
  EXPECT_TRUE(
      absl::StartsWith(s.authorize_url, "https://www.zopim.com/oauth2/authorizations/new?"));
  EXPECT_EQ(s.query.at("subdomain"), "acme");
  EXPECT_EQ(s.query.at("scope"), "read%20write%20chat");
  EXPECT_FALSE(s.query.contains("code_challenge"));
  provider_.NextExchangeReturns(NewGrant());
  ASSERT_TRUE(flow_.Complete(CallbackFor(s)).ok());
  EXPECT_EQ(provider_.exchange_calls()[0].verifier, "");
}

TEST_F(AuthorizationFlowTest, ValidateOptionsNamesABadAllowlistEntry) {
  EXPECT_TRUE(AuthorizationFlow::ValidateOptions(options_).ok());
  FlowOptions bad = options_;
  bad.return_url_allowlist.push_back("https://user@app.example.com/");
  const absl::Status s = AuthorizationFlow::ValidateOptions(bad);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(absl::StrContains(s.message(), "https://user@app.example.com/")) << s;
}

TEST_F(AuthorizationFlowTest, CreateLinkRefusesAReturnUrlOffTheListAndStoresNothing) {
  for (const char* bad : {"https://evil.example/connected", "https://app.example.com/other",
                          "https://app.example.com/connected/../admin", "javascript:alert(1)",
                          "https://app.example.com/connected\r\nX: y"}) {
    EXPECT_EQ(flow_
                  .CreateLink("acme", "zendesk", {{"subdomain", "acme"}}, absl::ZeroDuration(),
                              false, bad)
                  .status()
                  .code(),
              absl::StatusCode::kInvalidArgument)
        << bad;
  }
  EXPECT_EQ(broker_.GetConnection("acme").status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(flow_store_.pending(), 0u);
}

TEST_F(AuthorizationFlowTest, ReturnUrlReachesTheResultOfSuccessAndFailure) {
  const std::string url = "https://app.example.com/connected?account=acme&x=<1>";
  for (const bool succeed : {true, false}) {
    const std::string id = succeed ? "ok" : "denied";
    absl::StatusOr<AuthorizationFlow::MintedLink> link =
        flow_.CreateLink(id, "zendesk", {{"subdomain", "acme"}}, absl::ZeroDuration(), false, url);
    // '<' and '>' are not URL characters: refused, then minted with them percent-encoded.
    ASSERT_EQ(link.status().code(), absl::StatusCode::kInvalidArgument);
    const std::string encoded = "https://app.example.com/connected?account=acme&x=%3C1%3E";
    link = flow_.CreateLink(id, "zendesk", {{"subdomain", "acme"}}, absl::ZeroDuration(), false,
                            encoded);
    ASSERT_TRUE(link.ok()) << link.status();
    absl::StatusOr<AuthorizationFlow::Started> started = flow_.Start(Query(link->url)["link"]);
    ASSERT_TRUE(started.ok()) << started.status();
    AuthorizationFlow::Callback cb;
    cb.state = Query(started->authorize_url).at("state");
    cb.browser_binding = std::string(started->browser_binding.Reveal());
    if (succeed) {
      cb.code = testing::NewTestSecret("code");
      provider_.NextExchangeReturns(NewGrant());
    } else {
      cb.error = "access_denied";
    }
    std::string return_url = "stale";
    absl::StatusOr<core::ConnectionId> done = flow_.Complete(cb, &return_url);
    EXPECT_EQ(done.ok(), succeed) << done.status();
    EXPECT_EQ(return_url, encoded);
    // A state nobody knows has no return URL to offer.
    EXPECT_FALSE(flow_.Complete(cb, &return_url).ok());
    EXPECT_EQ(return_url, "");
  }
}

TEST_F(AuthorizationFlowTest, AReturnUrlTakenOffTheListIsNeverOffered) {
  FlowOptions strict = options_;
  strict.return_url_allowlist = {"https://app.example.com/elsewhere"};
  AuthorizationFlow later{strict,      providers_, clock_,  random_, digest_,
                          flow_store_, provider_,  broker_, revoker_};
  const std::string url = "https://app.example.com/connected";
  // Minted under the old list, started under the new one: dropped at /oauth/start.
  absl::StatusOr<AuthorizationFlow::MintedLink> link =
      flow_.CreateLink("a", "zendesk", {{"subdomain", "acme"}}, absl::ZeroDuration(), false, url);
  ASSERT_TRUE(link.ok());
  absl::StatusOr<AuthorizationFlow::Started> started = later.Start(Query(link->url)["link"]);
  ASSERT_TRUE(started.ok());
  AuthorizationFlow::Callback cb;
  cb.state = Query(started->authorize_url).at("state");
  cb.browser_binding = std::string(started->browser_binding.Reveal());
  cb.error = "access_denied";
  std::string return_url;
  EXPECT_FALSE(flow_.Complete(cb, &return_url).ok());
  EXPECT_EQ(return_url, "");
  // Started under the old list, called back under the new one: checked again at the callback.
  link =
      flow_.CreateLink("b", "zendesk", {{"subdomain", "acme"}}, absl::ZeroDuration(), false, url);
  ASSERT_TRUE(link.ok());
  started = flow_.Start(Query(link->url)["link"]);
  ASSERT_TRUE(started.ok());
  cb.state = Query(started->authorize_url).at("state");
  cb.browser_binding = std::string(started->browser_binding.Reveal());
  EXPECT_FALSE(later.Complete(cb, &return_url).ok());
  EXPECT_EQ(return_url, "");
}

TEST_F(AuthorizationFlowTest, StartRefusesASignedLinkWithParametersItsProviderRejects) {
  // Only the link key can make such a link; /oauth/start still checks before building a host.
  for (const char* subdomain : {"evil.com#", "a.b", "ACME", "\xc3\xa9", ""}) {
    core::LinkRecord record;
    record.link.id = absl::StrCat("forged-", subdomain);
    record.link.connection_id = "acme";
    record.link.provider = "zendesk";
    record.link.params = {{"subdomain", subdomain}};
    record.link.expires_at = clock_.Now() + absl::Hours(1);
    ASSERT_TRUE(flow_store_.PutLink(record).ok());
    absl::StatusOr<AuthorizationFlow::Started> started =
        flow_.Start(core::SignLink(record.link, options_.link_key, digest_));
    EXPECT_EQ(core::FlowErrorOf(started.status()), FlowErrorKind::kLinkInvalid) << subdomain;
  }
  EXPECT_EQ(flow_store_.pending(), 0u);
}

}  // namespace
}  // namespace tb::oauth

namespace tb::oauth {
namespace {

TEST_F(AuthorizationFlowTest, DeleteRevokesAtTheProviderThenRemoves) {
  const Started s = MintAndStart("acme");
  const core::Grant grant = NewGrant();
  provider_.NextExchangeReturns(grant);
  ASSERT_TRUE(flow_.Complete(CallbackFor(s)).ok());
  provider_.NextRevokeReturns(absl::UnavailableError("provider down"));  // best effort
  ASSERT_TRUE(flow_.DeleteConnection("acme").ok());
  EXPECT_EQ(provider_.revoked(),
            std::vector<std::string>{std::string(grant.access_token.Reveal())});
  EXPECT_EQ(broker_.GetConnection("acme").status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(flow_.DeleteConnection("acme").code(), absl::StatusCode::kNotFound);
}

}  // namespace
}  // namespace tb::oauth
