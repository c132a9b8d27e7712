// The HTTP rows of the attack table (issue 6), through real sockets: the public front
// (HttpServer + OAuth routes over a real AuthorizationFlow) in front of the HTTPS fake provider,
// reached by a browser-like client (provider::HttpClient) and by a raw socket client for what no
// well-behaved client sends. Every attack must end in a clear 4xx page (or a flow error), store
// nothing, and leave the front serving (TearDown checks it after every test).
//
// Rows covered elsewhere, not repeated here (tests/integration/connect_flow_test.cc):
//   state replay, a state without its cookie ReusedMissingUnknownStatesAndOtherBrowsersAreRefused
//   tampered link signature, revoked/used links  TamperedRevokedAndUsedLinksGetClearPages
//   XSS payload in error_description            PagesCarrySecurityHeadersAndEscapeProviderText

#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "gtest/gtest.h"
#include "server/src/common/mutex.h"
#include "server/src/common/work_pool.h"
#include "server/src/core/connect_link.h"
#include "server/src/core/errors.h"
#include "server/src/core/provider_presets.h"
#include "server/src/crypto/openssl_digest.h"
#include "server/src/crypto/openssl_random.h"
#include "server/src/http/http_server.h"
#include "server/src/http/oauth_routes.h"
#include "server/src/http/rate_limiter.h"
#include "server/src/oauth/authorization_flow.h"
#include "server/src/provider/http_client.h"
#include "server/src/provider/https_provider_client.h"
#include "server/src/store/in_memory_flow_store.h"
#include "server/src/store/in_memory_token_store.h"
#include "tests/fake_provider/fake_provider.h"
#include "tests/fake_provider/test_ca.h"
#include "tests/support/test_secrets.h"

namespace tb {
namespace {

using testing::CallKind;

constexpr absl::Duration kTimeout = absl::Seconds(20);
// Generous bound for "promptly": the suite shares two cores with other builds.
constexpr std::chrono::seconds kPatience(10);
constexpr char kReturnBase[] = "https://app.example.com/connected";

// Real time plus an offset a test may move forward (links expiring), so that deadlines handed
// to the HTTPS client stay real.
class OffsetClock final : public Clock {
 public:
  absl::Time Now() const override {
    tb::MutexLock lock(&mu_);
    return absl::Now() + offset_;
  }
  void Advance(absl::Duration d) {
    tb::MutexLock lock(&mu_);
    offset_ += d;
  }

 private:
  mutable tb::Mutex mu_;
  absl::Duration offset_ ABSL_GUARDED_BY(mu_) = absl::ZeroDuration();
};

struct RawResponse {
  int status = 0;
  std::string head;                                          // status line and fields, raw
  std::vector<std::pair<std::string, std::string>> headers;  // names lower-cased
  std::string body;

  std::optional<std::string> Header(absl::string_view name) const {
    for (const auto& [n, v] : headers) {
      if (n == absl::AsciiStrToLower(name)) {
        return v;
      }
    }
    return std::nullopt;
  }
};

// A blocking HTTP/1.1 client over a POSIX socket, for requests no library would send.
class RawClient {
 public:
  // Connects to 127.0.0.1:port from `source` (any 127/8 address: another client IP on
  // loopback). nullptr if the connection fails.
  static std::unique_ptr<RawClient> Connect(int port, const char* source = "127.0.0.1") {
    const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0) {
      return nullptr;
    }
    auto c = std::unique_ptr<RawClient>(new RawClient(fd));
    sockaddr_in from{};
    from.sin_family = AF_INET;
    ::inet_pton(AF_INET, source, &from.sin_addr);
    if (::bind(fd, reinterpret_cast<const sockaddr*>(&from), sizeof(from)) != 0) {
      return nullptr;
    }
    sockaddr_in to{};
    to.sin_family = AF_INET;
    to.sin_port = htons(static_cast<uint16_t>(port));
    to.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (::connect(fd, reinterpret_cast<const sockaddr*>(&to), sizeof(to)) != 0) {
      return nullptr;
    }
    timeval tv{};
    tv.tv_sec = kPatience.count();
    ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    ::setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
    return c;
  }

  RawClient(const RawClient&) = delete;
  RawClient& operator=(const RawClient&) = delete;
  ~RawClient() { ::close(fd_); }

  bool Send(absl::string_view data) {
    while (!data.empty()) {
      const ssize_t n = ::send(fd_, data.data(), data.size(), MSG_NOSIGNAL);
      if (n <= 0) {
        return false;
      }
      data.remove_prefix(static_cast<size_t>(n));
    }
    return true;
  }

  void ShutdownWrite() { ::shutdown(fd_, SHUT_WR); }

  // One response (Content-Length framed; HEAD: none). nullopt on EOF or timeout first.
  std::optional<RawResponse> ReadResponse(bool head = false) {
    size_t end;
    while ((end = pending_.find("\r\n\r\n")) == std::string::npos) {
      if (!Fill()) {
        return std::nullopt;
      }
    }
    RawResponse res;
    res.head = pending_.substr(0, end);
    pending_.erase(0, end + 4);
    std::vector<std::string> lines = absl::StrSplit(res.head, "\r\n");
    std::vector<std::string> status = absl::StrSplit(lines[0], absl::MaxSplits(' ', 2));
    if (status.size() < 2 || !absl::SimpleAtoi(status[1], &res.status)) {
      return std::nullopt;
    }
    for (size_t i = 1; i < lines.size(); ++i) {
      const size_t colon = lines[i].find(':');
      if (colon == std::string::npos) {
        return std::nullopt;
      }
      res.headers.emplace_back(absl::AsciiStrToLower(lines[i].substr(0, colon)),
                               std::string(absl::StripAsciiWhitespace(lines[i].substr(colon + 1))));
    }
    size_t length = 0;
    if (head || !absl::SimpleAtoi(res.Header("content-length").value_or("0"), &length)) {
      return res;
    }
    while (pending_.size() < length) {
      if (!Fill()) {
        return std::nullopt;
      }
    }
    res.body = pending_.substr(0, length);
    pending_.erase(0, length);
    return res;
  }

  // Whether the server has closed the connection (EOF or reset), without blocking.
  bool ClosedByPeer() {
    pollfd p{fd_, POLLIN, 0};
    if (::poll(&p, 1, 0) <= 0) {
      return false;
    }
    char c;
    const ssize_t n = ::recv(fd_, &c, 1, MSG_PEEK | MSG_DONTWAIT);
    return n == 0 || (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK);
  }

  // Reads until the server closes; true if it did within kPatience.
  bool WaitForClose() {
    char buf[4096];
    for (;;) {
      const ssize_t n = ::recv(fd_, buf, sizeof(buf), 0);
      if (n == 0 || (n < 0 && errno == ECONNRESET)) {
        return true;
      }
      if (n < 0) {
        return false;  // timeout
      }
    }
  }

 private:
  explicit RawClient(int fd) : fd_(fd) {}

  bool Fill() {
    char buf[4096];
    const ssize_t n = ::recv(fd_, buf, sizeof(buf), 0);
    if (n <= 0) {
      return false;
    }
    pending_.append(buf, static_cast<size_t>(n));
    return true;
  }

  int fd_;
  std::string pending_;
};

std::string Get(const std::string& target, const std::string& extra = "") {
  return absl::StrCat("GET ", target, " HTTP/1.1\r\nHost: 127.0.0.1\r\n", extra, "\r\n");
}

// The value of query parameter `key` in `url`, still percent-encoded.
std::string QueryParam(const std::string& url, const std::string& key) {
  const size_t q = url.find('?');
  if (q == std::string::npos) {
    return "";
  }
  for (absl::string_view kv : absl::StrSplit(url.substr(q + 1), '&')) {
    if (absl::StartsWith(kv, key + "=")) {
      return std::string(kv.substr(key.size() + 1));
    }
  }
  return "";
}

std::string Replace(std::string url, const std::string& key, const std::string& value) {
  const std::string old = QueryParam(url, key);
  const size_t at = url.find(key + "=" + old);
  return url.replace(at, key.size() + 1 + old.size(), key + "=" + value);
}

struct Page {
  int status = 0;
  std::string location;
  std::string set_cookie;
  std::string body;
};

class HttpAttackTest : public ::testing::Test {
 protected:
  // What the public port's rate limit is for this fixture; none by default.
  virtual http::RateLimitOptions Limit() {
    http::RateLimitOptions none;
    none.per_minute = 0;
    return none;
  }
  // Whether the public port speaks HTTPS (a certificate from the test CA) in this fixture.
  virtual bool Https() { return false; }

  void SetUp() override {
    auto fake = testing::FakeProvider::Start({});
    ASSERT_TRUE(fake.ok()) << fake.status();
    fake_ = *std::move(fake);
    const std::string secret = testing::NewTestSecret("client-secret");
    fake_->AddClient("broker-client", secret);
    const std::string base = fake_->base_url();
    core::ProviderSpec zendesk = *core::PresetSpec("zendesk");
    zendesk.name = "zendesk";
    zendesk.authorize_url = base + "/oauth/authorizations/new";
    zendesk.token_url = base + "/oauth/tokens";
    zendesk.token_info_url = base + "/api/v2/oauth/tokens/current.json";
    zendesk.revoke_url = base + "/api/v2/oauth/tokens/{token_id}.json";
    zendesk.client_id = "broker-client";
    zendesk.client_secret = ClientSecret(secret);
    zendesk.ca_file = fake_->ca_file();
    providers_.Put("zendesk", zendesk);

    provider::HttpClientOptions http;
    http.ca_file = fake_->ca_file();
    auto provider_client =
        provider::HttpsProviderClient::Create(http, {*providers_.Find("zendesk")}, clock_);
    ASSERT_TRUE(provider_client.ok()) << provider_client.status();
    provider_client_ = *std::move(provider_client);
    std::optional<http::HttpTlsOptions> tls;
    if (Https()) {
      absl::StatusOr<testing::TestCertificates> front = testing::GenerateTestCertificates({});
      ASSERT_TRUE(front.ok()) << front.status();
      testing::RecordTestSecret(front->server_key_pem);
      testing::RecordTestSecret(front->ca_key_pem);
      const std::string dir = ::testing::TempDir();
      const std::string tag = absl::StrCat(::getpid(), "-", absl::ToUnixNanos(absl::Now()));
      tls = http::HttpTlsOptions{absl::StrCat(dir, "/front-", tag, ".crt"),
                                 absl::StrCat(dir, "/front-", tag, ".key")};
      ASSERT_TRUE(testing::WritePemFile(tls->cert_file, front->server_cert_pem).ok());
      ASSERT_TRUE(testing::WritePemFile(tls->key_file, front->server_key_pem).ok());
      // The browser trusts both: the provider's CA and the front's.
      http.ca_file = absl::StrCat(dir, "/browser-ca-", tag, ".pem");
      ASSERT_TRUE(testing::WritePemFile(http.ca_file, fake_->ca_pem() + front->ca_cert_pem).ok());
      temp_files_ = {tls->cert_file, tls->key_file, http.ca_file};
    }
    auto browser = provider::HttpClient::Create(http);
    ASSERT_TRUE(browser.ok());
    browser_ = *std::move(browser);

    auto limiter = http::ClientRateLimiter::Create(Limit(), clock_);
    ASSERT_TRUE(limiter.ok()) << limiter.status();
    // The public port must be known before the flow (its redirect_uri): the handler forwards to
    // the routes, set once below before any request can arrive.
    http::HttpServerOptions server_options;
    server_options.max_connections = kMaxConnections;
    server_options.read_timeout = kReadTimeout;
    server_options.idle_timeout = absl::Seconds(5);
    server_options.max_header_bytes = 8 * 1024;
    server_options.max_body_bytes = 4 * 1024;
    server_options.tls = tls;
    auto server = http::HttpServer::Start(
        server_options, http::AsyncHandler([this](http::HttpRequest req, http::Respond respond) {
          routes_(std::move(req), std::move(respond));
        }));
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = *std::move(server);
    oauth::FlowOptions options;
    options.public_base_url = Url("");
    options.link_key = KeyMaterial(testing::NewTestSecret("link-key"));
    options.return_url_allowlist = {kReturnBase};
    ASSERT_TRUE(oauth::AuthorizationFlow::ValidateOptions(options).ok());
    link_key_ = options.link_key;
    revoker_ = std::make_unique<oauth::Revoker>(oauth::RevokerOptions{}, providers_, clock_,
                                                broker_, *provider_client_);
    flow_ = std::make_unique<oauth::AuthorizationFlow>(options, providers_, clock_, random_,
                                                       digest_, flow_store_, *provider_client_,
                                                       broker_, *revoker_);
    http::OAuthRoutesOptions routes;
    routes.secure_cookies = Https();
    routes.rate_limiter = *limiter;
    routes_ = http::MakeOAuthHandler(
        *flow_, [this](std::function<void()> task) { work_.Post(std::move(task)); }, routes);
  }

  void TearDown() override {
    for (const std::string& f : temp_files_) {
      ::unlink(f.c_str());
    }
    if (server_ != nullptr && Https()) {
      EXPECT_EQ(Browse(Url("/oauth/start")).status, 400);
      server_->Stop();
    } else if (server_ != nullptr) {
      // Whatever the attack, the front still answers a plain request.
      std::unique_ptr<RawClient> c = RawClient::Connect(server_->port(), "127.0.0.254");
      ASSERT_NE(c, nullptr);
      ASSERT_TRUE(c->Send(Get("/oauth/start")));
      const std::optional<RawResponse> res = c->ReadResponse();
      ASSERT_TRUE(res.has_value());
      EXPECT_EQ(res->status, 400);
      server_->Stop();
    }
    work_.Stop();
  }

  std::string Url(const std::string& target) {
    return absl::StrCat(Https() ? "https" : "http", "://127.0.0.1:", server_->port(), target);
  }

  // One GET as a browser sends it, with `cookie` if any; redirects are not followed.
  Page Browse(const std::string& url, const std::string& cookie = "") {
    provider::HttpRequest req;
    req.method = "GET";
    req.url = url;
    if (!cookie.empty()) {
      req.headers.emplace_back("Cookie", cookie);
    }
    absl::StatusOr<provider::HttpResponse> res = browser_->Send(req, absl::Now() + kTimeout);
    EXPECT_TRUE(res.ok()) << res.status();
    if (!res.ok()) {
      return {};
    }
    Page page{res->status, res->Header("Location"), res->Header("Set-Cookie"), res->body};
    if (const size_t eq = page.set_cookie.find('='); eq != std::string::npos) {
      const size_t end = page.set_cookie.find(';');
      testing::RecordTestSecret(page.set_cookie.substr(eq + 1, end - eq - 1));  // the binding
    }
    return page;
  }

  std::string MintLink(const std::string& id, bool reconnect = false,
                       const std::string& return_url = "") {
    absl::StatusOr<oauth::AuthorizationFlow::MintedLink> link = flow_->CreateLink(
        id, "zendesk", {{"subdomain", "acme"}}, absl::ZeroDuration(), reconnect, return_url);
    EXPECT_TRUE(link.ok()) << link.status();
    return link.ok() ? link->url : "";
  }

  // A browser opens the link: the provider's authorize URL, and the browser's cookie.
  struct Started {
    std::string authorize_url;
    std::string cookie;  // "name=value"
  };
  Started Start(const std::string& link_url) {
    const Page start = Browse(link_url);
    EXPECT_EQ(start.status, 302) << start.body;
    return {start.location, start.set_cookie.substr(0, start.set_cookie.find(';'))};
  }

  // The provider approves: the callback URL it sends the browser back to.
  std::string Approve(const std::string& authorize_url) {
    const Page authorize = Browse(authorize_url);
    EXPECT_EQ(authorize.status, 302) << authorize.body;
    return authorize.location;
  }

  bool Connected(const std::string& id) const {
    absl::StatusOr<std::shared_ptr<const core::Connection>> c = broker_.GetConnection(id);
    return c.ok() && (*c)->status == core::ConnectionStatus::kActive;
  }

  static constexpr size_t kMaxConnections = 16;
  static constexpr absl::Duration kReadTimeout = absl::Seconds(4);

  std::unique_ptr<testing::FakeProvider> fake_;
  core::ProviderDirectory providers_;
  OffsetClock clock_;
  crypto::OpenSslRandom random_;
  crypto::OpenSslDigest digest_;
  store::InMemoryTokenStore token_store_;
  store::InMemoryFlowStore flow_store_;
  cache::ConnectionCache cache_;
  oauth::Broker broker_{clock_, token_store_, cache_};
  std::unique_ptr<provider::HttpsProviderClient> provider_client_;
  std::unique_ptr<provider::HttpClient> browser_;
  std::unique_ptr<oauth::Revoker> revoker_;
  std::unique_ptr<oauth::AuthorizationFlow> flow_;
  KeyMaterial link_key_;
  http::AsyncHandler routes_;
  std::unique_ptr<http::HttpServer> server_;
  std::vector<std::string> temp_files_;
  WorkPool work_{2, "attack-work"};
};

TEST_F(HttpAttackTest, AuthorizationCodeReplayIsRefusedByTheProviderAndStoresNothing) {
  // Connected once, through the whole flow.
  const std::string link = MintLink("acme2");
  const Started a = Start(link);
  const std::string callback = Approve(a.authorize_url);
  ASSERT_EQ(Browse(callback, a.cookie).status, 200);
  const core::Grant stored = *(*broker_.GetConnection("acme2"))->grant;

  // A reconnect flow of its own (fresh state and cookie) fed the code already used above.
  const Started again = Start(MintLink("acme2", /*reconnect=*/true));
  const std::string replay = Replace(callback, "state", QueryParam(again.authorize_url, "state"));
  const Page page = Browse(replay, again.cookie);
  EXPECT_EQ(page.status, 502);
  EXPECT_TRUE(absl::StrContains(page.body, "did not accept")) << page.body;
  // The provider refused the used code; the stored grant is the one from before.
  const core::Grant after = *(*broker_.GetConnection("acme2"))->grant;
  EXPECT_EQ(after.generation, stored.generation);
  EXPECT_EQ(after.access_token, stored.access_token);
  EXPECT_EQ(fake_->calls(CallKind::kTokenCode), 2);
}

TEST_F(HttpAttackTest, LoginCsrfAStateFromOneBrowserIsRefusedInAnotherWithItsOwnCookie) {
  // The attacker starts a flow and stops at the callback URL (their state and code).
  const std::string attacker_callback = Approve(Start(MintLink("victim")).authorize_url);
  // The victim's browser holds a binding of its own, from its own start.
  const Started victim = Start(MintLink("victim"));
  const Page page = Browse(attacker_callback, victim.cookie);
  EXPECT_EQ(page.status, 400);
  EXPECT_TRUE(absl::StrContains(page.body, "same browser")) << page.body;
  EXPECT_FALSE(Connected("victim"));
  EXPECT_EQ(fake_->calls(CallKind::kTokenCode), 0);  // refused before any exchange
  // The victim's own flow is untouched.
  EXPECT_EQ(Browse(Approve(victim.authorize_url), victim.cookie).status, 200);
  EXPECT_TRUE(Connected("victim"));
}

TEST_F(HttpAttackTest, ExpiredLinkGetsAClearPageAndStartsNothing) {
  absl::StatusOr<oauth::AuthorizationFlow::MintedLink> link =
      flow_->CreateLink("acme", "zendesk", {{"subdomain", "acme"}}, absl::Minutes(1), false);
  ASSERT_TRUE(link.ok());
  clock_.Advance(absl::Minutes(1) + absl::Seconds(1));
  const Page page = Browse(link->url);
  EXPECT_EQ(page.status, 410);
  EXPECT_TRUE(absl::StrContains(page.body, "expired")) << page.body;
  EXPECT_TRUE(page.set_cookie.empty());
  EXPECT_EQ(flow_store_.pending(), 0u);
  EXPECT_EQ(fake_->calls(CallKind::kAuthorize), 0);
}

TEST_F(HttpAttackTest, BadSubdomainsAreRefusedAtCreateLinkAndAtStart) {
  for (const std::string subdomain :
       {"evil.com#", "a.b", "ACME", "\xc3\xa9vil", "", "evil.com/", "a%2eb", "-acme"}) {
    absl::StatusOr<oauth::AuthorizationFlow::MintedLink> link = flow_->CreateLink(
        "sub", "zendesk", {{"subdomain", subdomain}}, absl::ZeroDuration(), false);
    EXPECT_EQ(link.status().code(), absl::StatusCode::kInvalidArgument)
        << absl::CHexEscape(subdomain);
    EXPECT_EQ(broker_.GetConnection("sub").status().code(), absl::StatusCode::kNotFound);

    // A link can only carry one if signed with the link key; /oauth/start checks all the same.
    core::LinkRecord record;
    record.link.id = absl::StrCat("forged-", absl::CHexEscape(subdomain));
    record.link.connection_id = "sub";
    record.link.provider = "zendesk";
    record.link.params = {{"subdomain", subdomain}};
    record.link.expires_at = clock_.Now() + absl::Hours(1);
    ASSERT_TRUE(flow_store_.PutLink(record).ok());
    const Page page = Browse(
        Url(absl::StrCat("/oauth/start?link=", core::SignLink(record.link, link_key_, digest_))));
    EXPECT_EQ(page.status, 400) << absl::CHexEscape(subdomain);
    EXPECT_TRUE(page.location.empty());
  }
  EXPECT_EQ(flow_store_.pending(), 0u);
  EXPECT_EQ(fake_->calls(CallKind::kAuthorize), 0);
}

TEST_F(HttpAttackTest, ACodeIssuedForAnotherRedirectUriIsRefusedByTheProvider) {
  const Started s = Start(MintLink("acme"));
  // The attacker has the provider issue a code for their own redirect_uri...
  const std::string evil = "https%3A%2F%2Fevil.example%2Fcallback";
  const Page authorize = Browse(Replace(s.authorize_url, "redirect_uri", evil));
  ASSERT_EQ(authorize.status, 302);
  ASSERT_TRUE(absl::StartsWith(authorize.location, "https://evil.example/callback?"))
      << authorize.location;
  // ...and lands it on our callback with a valid state and cookie: we exchange with ours.
  const std::string callback =
      absl::StrCat(flow_->redirect_uri(), "?state=", QueryParam(s.authorize_url, "state"),
                   "&code=", QueryParam(authorize.location, "code"));
  const Page page = Browse(callback, s.cookie);
  EXPECT_EQ(page.status, 502);
  EXPECT_FALSE(Connected("acme"));
  EXPECT_EQ(fake_->calls(CallKind::kTokenCode), 1);
}

TEST_F(HttpAttackTest, CrlfInQueryValuesInjectsNoHeader) {
  const std::string inject = "%0D%0ASet-Cookie:%20evil=1%0D%0AX-Injected:%20yes";
  const Started s = Start(MintLink("acme"));
  const std::string state = QueryParam(s.authorize_url, "state");
  const std::vector<std::pair<std::string, std::string>> attacks = {
      {"/oauth/start?link=" + inject, ""},
      {"/oauth/start?link=x&return_url=" + inject, ""},
      {"/oauth/callback?state=" + inject + "&code=" + inject, ""},
      {"/oauth/callback?state=x&error=" + inject + "&error_description=" + inject, ""},
      // A live state with the right cookie: the provider's text reaches the page, escaped.
      {absl::StrCat("/oauth/callback?state=", state,
                    "&error=server_error&error_description=", inject),
       s.cookie},
  };
  for (const auto& [target, cookie] : attacks) {
    std::unique_ptr<RawClient> c = RawClient::Connect(server_->port());
    ASSERT_NE(c, nullptr);
    ASSERT_TRUE(
        c->Send(Get(target, cookie.empty() ? "" : absl::StrCat("Cookie: ", cookie, "\r\n"))));
    const std::optional<RawResponse> res = c->ReadResponse();
    ASSERT_TRUE(res.has_value()) << target;
    EXPECT_GE(res->status, 400) << target;
    EXPECT_LT(res->status, 600) << target;
    EXPECT_EQ(res->Header("x-injected"), std::nullopt) << target;
    EXPECT_FALSE(absl::StrContains(res->head, "evil=1")) << res->head;
    EXPECT_FALSE(absl::StrContains(res->body, "\r\nX-Injected")) << target;
  }
  // Raw CR or LF in the request line or a field never reaches a handler.
  for (const std::string& raw :
       {std::string("GET /oauth/start?link=a\rb HTTP/1.1\r\nHost: x\r\n\r\n"),
        std::string("GET /oauth/start?link=a\nX-Injected: 1 HTTP/1.1\r\n\r\n"),
        std::string("GET /oauth/start HTTP/1.1\r\nX-A: a\rb\r\n\r\n")}) {
    std::unique_ptr<RawClient> c = RawClient::Connect(server_->port());
    ASSERT_NE(c, nullptr);
    ASSERT_TRUE(c->Send(raw));
    const std::optional<RawResponse> res = c->ReadResponse();
    ASSERT_TRUE(res.has_value()) << absl::CHexEscape(raw);
    EXPECT_EQ(res->status, 400) << absl::CHexEscape(raw);
    EXPECT_EQ(res->Header("connection"), "close");
    EXPECT_EQ(res->Header("content-security-policy"), "default-src 'none'; frame-ancestors 'none'");
  }
  EXPECT_FALSE(Connected("acme"));
  EXPECT_EQ(fake_->calls(CallKind::kTokenCode), 0);
}

TEST_F(HttpAttackTest, AOneMegabyteHeaderGets431AndTheConnectionIsClosed) {
  std::unique_ptr<RawClient> c = RawClient::Connect(server_->port());
  ASSERT_NE(c, nullptr);
  const std::string request = absl::StrCat("GET /oauth/start?link=x HTTP/1.1\r\nHost: x\r\nX-Big: ",
                                           std::string(1024 * 1024, 'a'), "\r\n\r\n");
  // Sent from another thread: the server answers long before it has read all of it.
  std::thread sender([&] {
    c->Send(request);  // may fail once the server closes: that is the point
    c->ShutdownWrite();
  });
  const std::optional<RawResponse> res = c->ReadResponse();
  sender.join();
  ASSERT_TRUE(res.has_value());
  EXPECT_EQ(res->status, 431);
  EXPECT_EQ(res->Header("connection"), "close");
  EXPECT_EQ(res->Header("content-security-policy"), "default-src 'none'; frame-ancestors 'none'");
  EXPECT_TRUE(c->WaitForClose());
  EXPECT_EQ(flow_store_.pending(), 0u);
}

TEST_F(HttpAttackTest, SlowLorisIsBoundedByTheConnectionCapAndTheReadTimeout) {
  std::vector<std::unique_ptr<RawClient>> slow;
  const auto open_slow = [&](size_t n) {
    for (size_t i = 0; i < n; ++i) {
      std::unique_ptr<RawClient> c = RawClient::Connect(server_->port());
      ASSERT_NE(c, nullptr);
      c->Send("GET /oauth/start?link=x HTTP/1.1\r\nHost: x\r\nX-Slow: ");
      slow.push_back(std::move(c));
    }
  };
  // Each slow client keeps sending one byte every 100 ms: a read timeout per read would never
  // fire; the one per request does.
  std::atomic<bool> stop{false};
  tb::Mutex mu;
  std::thread trickle([&] {
    while (!stop) {
      {
        tb::MutexLock lock(&mu);
        for (const std::unique_ptr<RawClient>& c : slow) {
          c->Send("a");
        }
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
  });

  // Fewer than the cap: a normal client is served meanwhile, at once.
  {
    tb::MutexLock lock(&mu);
    open_slow(kMaxConnections - 4);
  }
  const auto before = std::chrono::steady_clock::now();
  const Page normal = Browse(Url("/oauth/start"));
  EXPECT_EQ(normal.status, 400);
  EXPECT_LT(std::chrono::steady_clock::now() - before, kPatience);

  // Far more than the cap: those beyond it are closed on arrival, and every one is closed by the
  // read timeout, trickling or not.
  {
    tb::MutexLock lock(&mu);
    open_slow(3 * kMaxConnections);
  }
  const auto opened = std::chrono::steady_clock::now();
  const size_t beyond_cap = slow.size() - kMaxConnections;
  size_t closed = 0;
  size_t closed_early = 0;  // within half the read timeout: refused for the cap, not timed out
  while (closed < slow.size() && std::chrono::steady_clock::now() - opened < 2 * kPatience) {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    tb::MutexLock lock(&mu);
    closed = std::count_if(slow.begin(), slow.end(),
                           [](const std::unique_ptr<RawClient>& c) { return c->ClosedByPeer(); });
    if (std::chrono::steady_clock::now() - opened < absl::ToChronoMilliseconds(kReadTimeout / 2)) {
      closed_early = closed;
    }
  }
  stop = true;
  trickle.join();
  EXPECT_EQ(closed, slow.size());
  EXPECT_GE(closed_early, beyond_cap);
  // Not before the read timeout could have passed for the admitted ones: the bound is the
  // timeout, not some accident.
  EXPECT_GE(std::chrono::steady_clock::now() - before, absl::ToChronoMilliseconds(kReadTimeout));
  EXPECT_EQ(flow_store_.pending(), 0u);
  // Served again right after (TearDown checks once more from another address).
  EXPECT_EQ(Browse(Url("/oauth/start")).status, 400);
}

TEST_F(HttpAttackTest, ReturnUrlOffTheListIsRefusedAndOnTheListShownEscaped) {
  for (const std::string& bad :
       {std::string("https://evil.example/connected"),
        std::string("https://app.example.com/connected/../../admin"),
        std::string("https://app.example.com@evil.example/connected"),
        std::string("https://app.example.com/connected\r\nSet-Cookie: x=y"),
        std::string("javascript:alert(document.cookie)//https://app.example.com/connected")}) {
    absl::StatusOr<oauth::AuthorizationFlow::MintedLink> link = flow_->CreateLink(
        "ret", "zendesk", {{"subdomain", "acme"}}, absl::ZeroDuration(), false, bad);
    EXPECT_EQ(link.status().code(), absl::StatusCode::kInvalidArgument) << absl::CHexEscape(bad);
  }
  EXPECT_EQ(broker_.GetConnection("ret").status().code(), absl::StatusCode::kNotFound);

  // On the list: a Continue link on the result page, escaped, on failure and on success, and
  // never a redirect. A return_url in the query of /oauth/start is not looked at.
  const std::string url = absl::StrCat(kReturnBase, "?account=acme&note='x'");
  const std::string escaped = absl::StrCat(kReturnBase, "?account=acme&amp;note=&#39;x&#39;");
  fake_->SetAuthorizeDecision(false);
  const std::string link = MintLink("ret", false, url);
  Started s = Start(link + "&return_url=https%3A%2F%2Fevil.example%2F");
  Page page = Browse(Approve(s.authorize_url), s.cookie);
  EXPECT_EQ(page.status, 403);
  EXPECT_TRUE(absl::StrContains(page.body, absl::StrCat("<a href=\"", escaped, "\">Continue</a>")))
      << page.body;
  EXPECT_FALSE(absl::StrContains(page.body, "evil"));
  EXPECT_TRUE(page.location.empty());
  fake_->SetAuthorizeDecision(true);
  s = Start(link);
  page = Browse(Approve(s.authorize_url), s.cookie);
  EXPECT_EQ(page.status, 200);
  EXPECT_TRUE(absl::StrContains(page.body, absl::StrCat("<a href=\"", escaped, "\">Continue</a>")))
      << page.body;
  EXPECT_TRUE(page.location.empty());
  EXPECT_TRUE(Connected("ret"));
}

// The per-client-IP limit on /oauth/*: 5 at once, then one every 10 s; 127.0.0.2 is the trusted
// proxy. Loopback has all of 127/8, so each source address is another client.
class RateLimitAttackTest : public HttpAttackTest {
 protected:
  http::RateLimitOptions Limit() override {
    http::RateLimitOptions limit;
    limit.per_minute = 6;
    limit.burst = 5;
    limit.client_ip.trusted_proxy_header = "X-Forwarded-For";
    limit.client_ip.trusted_proxies = {"127.0.0.2/32"};
    return limit;
  }

  // The status of GET /oauth/start from `source`, with an X-Forwarded-For if given.
  int StartFrom(const char* source, const std::string& forwarded_for = "",
                std::optional<RawResponse>* out = nullptr) {
    std::unique_ptr<RawClient> c = RawClient::Connect(server_->port(), source);
    EXPECT_NE(c, nullptr);
    if (c == nullptr) {
      return 0;
    }
    c->Send(
        Get("/oauth/start?link=x",
            forwarded_for.empty() ? "" : absl::StrCat("X-Forwarded-For: ", forwarded_for, "\r\n")));
    std::optional<RawResponse> res = c->ReadResponse();
    const int status = res ? res->status : 0;
    if (out != nullptr) {
      *out = std::move(res);
    }
    return status;
  }
};

TEST_F(RateLimitAttackTest, OverTheBurstIs429PerClientIp) {
  for (int i = 0; i < 5; ++i) {
    EXPECT_EQ(StartFrom("127.0.0.1"), 400) << i;
  }
  std::optional<RawResponse> limited;
  EXPECT_EQ(StartFrom("127.0.0.1", "", &limited), 429);
  ASSERT_TRUE(limited.has_value());
  int retry_after = 0;
  ASSERT_TRUE(absl::SimpleAtoi(limited->Header("retry-after").value_or(""), &retry_after));
  EXPECT_GE(retry_after, 1);
  EXPECT_LE(retry_after, 10);
  EXPECT_EQ(limited->Header("cache-control"), "no-store");
  EXPECT_TRUE(absl::StrContains(limited->Header("content-security-policy").value_or(""),
                                "default-src 'none'"));
  // Another address has its own bucket.
  EXPECT_EQ(StartFrom("127.0.0.3"), 400);
  // An untrusted peer cannot buy fresh buckets with a forged X-Forwarded-For.
  for (int i = 0; i < 3; ++i) {
    EXPECT_EQ(StartFrom("127.0.0.1", absl::StrCat("203.0.113.", i + 1)), 429) << i;
  }
  // Ten seconds later (per_minute 6), one more.
  clock_.Advance(absl::Seconds(10));
  EXPECT_EQ(StartFrom("127.0.0.1"), 400);
  EXPECT_EQ(StartFrom("127.0.0.1"), 429);
  EXPECT_EQ(flow_store_.pending(), 0u);
}

TEST_F(RateLimitAttackTest, TheForwardedClientCountsOnlyBehindTheTrustedProxy) {
  for (int i = 0; i < 5; ++i) {
    EXPECT_EQ(StartFrom("127.0.0.2", "203.0.113.7"), 400) << i;
  }
  EXPECT_EQ(StartFrom("127.0.0.2", "203.0.113.7"), 429);
  // The same proxy, another client behind it.
  EXPECT_EQ(StartFrom("127.0.0.2", "203.0.113.8"), 400);
  // What a client prepends is skipped; trusted hops on the right are too.
  EXPECT_EQ(StartFrom("127.0.0.2", "198.51.100.1, 203.0.113.7"), 429);
  EXPECT_EQ(StartFrom("127.0.0.2", "203.0.113.7, 127.0.0.2"), 429);
  // The proxy's own address is not charged for its clients.
  EXPECT_EQ(StartFrom("127.0.0.2"), 400);
}

// The public port over HTTPS, as with a TLS certificate configured: the flow works end to end,
// the binding cookie becomes __Host- and Secure, and plain HTTP gets no HTTP answer at all.
class HttpsAttackTest : public HttpAttackTest {
 protected:
  bool Https() override { return true; }
};

TEST_F(HttpsAttackTest, TheFlowRunsOverHttpsWithASecureCookieAndPlainHttpIsRefused) {
  const std::string link = MintLink("acme");
  ASSERT_TRUE(absl::StartsWith(link, "https://127.0.0.1:")) << link;
  const Page start = Browse(link);
  ASSERT_EQ(start.status, 302) << start.body;
  EXPECT_TRUE(absl::StartsWith(start.set_cookie, "__Host-tb_oauth=")) << start.set_cookie;
  EXPECT_TRUE(absl::StrContains(start.set_cookie, "; Secure"));
  EXPECT_TRUE(
      absl::StrContains(QueryParam(start.location, "redirect_uri"), "https%3A%2F%2F127.0.0.1%3A"));
  const std::string cookie = start.set_cookie.substr(0, start.set_cookie.find(';'));
  EXPECT_EQ(Browse(Approve(start.location), cookie).status, 200);
  EXPECT_TRUE(Connected("acme"));

  std::unique_ptr<RawClient> plain = RawClient::Connect(server_->port());
  ASSERT_NE(plain, nullptr);
  ASSERT_TRUE(plain->Send(Get("/oauth/start")));
  EXPECT_FALSE(plain->ReadResponse().has_value());
}

}  // namespace
}  // namespace tb
