// HttpClient against a real HTTPS server (tests/fake_provider) on 127.0.0.1: TLS verification of
// chain and host name, connection reuse and its retry rule, CONNECT proxy and NO_PROXY,
// deadlines and limits.

#include "server/src/provider/http_client.h"

#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "tests/fake_provider/fake_provider.h"
#include "tests/integration/provider/connect_proxy.h"

namespace tb::provider {
namespace {

using tb::testing::CallKind;
using tb::testing::ConnectProxy;
using tb::testing::Failure;
using tb::testing::FakeProvider;
using tb::testing::FakeProviderOptions;

absl::Time Soon() { return absl::Now() + absl::Seconds(10); }

class HttpClientTest : public ::testing::Test {
 protected:
  void SetUp() override { StartFake(FakeProviderOptions{}); }

  void StartFake(FakeProviderOptions options) {
    fake_.reset();
    absl::StatusOr<std::unique_ptr<FakeProvider>> fake = FakeProvider::Start(std::move(options));
    ASSERT_TRUE(fake.ok()) << fake.status();
    fake_ = *std::move(fake);
  }

  std::unique_ptr<HttpClient> NewClient(HttpClientOptions options = {}, bool trust_test_ca = true) {
    if (trust_test_ca) {
      options.ca_file = fake_->ca_file();
    }
    absl::StatusOr<std::unique_ptr<HttpClient>> client = HttpClient::Create(std::move(options));
    EXPECT_TRUE(client.ok()) << client.status();
    return client.ok() ? *std::move(client) : nullptr;
  }

  // A request the fake answers 404 (CallKind::kOther).
  HttpRequest Get(const std::string& path = "/nothing/here") {
    HttpRequest r;
    r.method = "GET";
    r.url = absl::StrCat(fake_->base_url(), path);
    r.headers = {{"Accept", "application/json"}};
    return r;
  }

  std::unique_ptr<FakeProvider> fake_;
};

TEST_F(HttpClientTest, VerifiesTheTestCaAndReusesOneConnection) {
  std::unique_ptr<HttpClient> http = NewClient();
  ASSERT_NE(http, nullptr);
  for (int i = 0; i < 5; ++i) {
    absl::StatusOr<HttpResponse> res = http->Send(Get(), Soon());
    ASSERT_TRUE(res.ok()) << res.status();
    EXPECT_EQ(res->status, 404);
    EXPECT_FALSE(res->body.empty());
    EXPECT_FALSE(res->Header("content-type").empty());
  }
  const HttpClientStats stats = http->stats();
  EXPECT_EQ(stats.requests, 5u);
  EXPECT_EQ(stats.connections_opened, 1u);
  EXPECT_EQ(stats.connections_reused, 4u);
  EXPECT_EQ(fake_->calls(CallKind::kOther), 5);
}

TEST_F(HttpClientTest, WithoutReuseEveryRequestOpensAConnection) {
  HttpClientOptions options;
  options.max_idle_per_host = 0;
  std::unique_ptr<HttpClient> http = NewClient(options);
  for (int i = 0; i < 3; ++i) {
    ASSERT_TRUE(http->Send(Get(), Soon()).ok());
  }
  EXPECT_EQ(http->stats().connections_opened, 3u);
}

TEST_F(HttpClientTest, ConcurrentCallsShareThePool) {
  std::unique_ptr<HttpClient> http = NewClient();
  std::vector<std::thread> threads;
  std::atomic<int> ok{0};
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&] {
      for (int i = 0; i < 5; ++i) {
        absl::StatusOr<HttpResponse> res = http->Send(Get(), Soon());
        if (res.ok() && res->status == 404) {
          ++ok;
        }
      }
    });
  }
  for (std::thread& t : threads) {
    t.join();
  }
  EXPECT_EQ(ok.load(), 20);
  EXPECT_LE(http->stats().connections_opened, 8u);
}

TEST_F(HttpClientTest, RejectsAServerOutsideTheTrustStore) {
  std::unique_ptr<HttpClient> http = NewClient({}, /*trust_test_ca=*/false);
  EXPECT_EQ(http->Send(Get(), Soon()).status().code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ(fake_->calls(CallKind::kOther), 0);
}

TEST_F(HttpClientTest, VerifiesTheHostNameNotJustTheChain) {
  // The proxy delivers every tunnel to the fake, whose certificate names 127.0.0.1 and localhost
  // only: a trusted chain for the wrong name must fail.
  ConnectProxy proxy(static_cast<uint16_t>(fake_->port()));
  ASSERT_TRUE(proxy.ok());
  HttpClientOptions options;
  options.https_proxy = proxy.url();
  std::unique_ptr<HttpClient> http = NewClient(options);

  HttpRequest wrong = Get();
  wrong.url = absl::StrCat("https://acme.zendesk.com:", fake_->port(), "/nothing");
  EXPECT_EQ(http->Send(wrong, Soon()).status().code(), absl::StatusCode::kUnavailable);

  HttpRequest right = Get();
  right.url = absl::StrCat("https://localhost:", fake_->port(), "/nothing");
  absl::StatusOr<HttpResponse> res = http->Send(right, Soon());
  ASSERT_TRUE(res.ok()) << res.status();
  EXPECT_EQ(res->status, 404);
  EXPECT_EQ(fake_->calls(CallKind::kOther), 1);
}

TEST_F(HttpClientTest, TunnelsThroughTheHttpsProxy) {
  ConnectProxy proxy;
  ASSERT_TRUE(proxy.ok());
  HttpClientOptions options;
  options.https_proxy = proxy.url();
  std::unique_ptr<HttpClient> http = NewClient(options);
  for (int i = 0; i < 3; ++i) {
    absl::StatusOr<HttpResponse> res = http->Send(Get(), Soon());
    ASSERT_TRUE(res.ok()) << res.status();
    EXPECT_EQ(res->status, 404);
  }
  // One tunnel, reused.
  EXPECT_EQ(proxy.targets(), std::vector<std::string>{absl::StrCat("127.0.0.1:", fake_->port())});
}

TEST_F(HttpClientTest, NoProxyBypassesTheProxy) {
  ConnectProxy proxy;
  ASSERT_TRUE(proxy.ok());
  HttpClientOptions options;
  options.https_proxy = proxy.url();
  options.no_proxy = "example.com, 127.0.0.0/8";
  std::unique_ptr<HttpClient> http = NewClient(options);
  ASSERT_TRUE(http->Send(Get(), Soon()).ok());
  EXPECT_TRUE(proxy.targets().empty());
}

TEST_F(HttpClientTest, ProxyRefusalIsUnavailable) {
  ConnectProxy proxy(std::nullopt, /*answer_status=*/403);
  ASSERT_TRUE(proxy.ok());
  HttpClientOptions options;
  options.https_proxy = proxy.url();
  std::unique_ptr<HttpClient> http = NewClient(options);
  EXPECT_EQ(http->Send(Get(), Soon()).status().code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ(proxy.targets().size(), 1u);
}

TEST_F(HttpClientTest, DeadlineBoundsASlowAnswer) {
  std::unique_ptr<HttpClient> http = NewClient();
  Failure slow;
  slow.delay_before = absl::Seconds(3);
  fake_->FailNext(CallKind::kOther, slow);
  const absl::Time start = absl::Now();
  EXPECT_EQ(http->Send(Get(), start + absl::Milliseconds(300)).status().code(),
            absl::StatusCode::kDeadlineExceeded);
  EXPECT_LT(absl::Now() - start, absl::Seconds(2));
  EXPECT_EQ(http->Send(Get(), absl::Now() - absl::Seconds(1)).status().code(),
            absl::StatusCode::kDeadlineExceeded);
}

TEST_F(HttpClientTest, RefusedConnectionIsUnavailable) {
  // A port nobody listens on: bind one, note it, close it.
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof(addr);
  ASSERT_EQ(::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0);
  ASSERT_EQ(::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len), 0);
  ::close(fd);
  std::unique_ptr<HttpClient> http = NewClient();
  HttpRequest r = Get();
  r.url = absl::StrCat("https://127.0.0.1:", ntohs(addr.sin_port), "/");
  EXPECT_EQ(http->Send(r, Soon()).status().code(), absl::StatusCode::kUnavailable);
}

TEST_F(HttpClientTest, RetriesAGetOnceWhenThePooledConnectionDies) {
  std::unique_ptr<HttpClient> http = NewClient();
  ASSERT_TRUE(http->Send(Get(), Soon()).ok());
  Failure reset;
  reset.reset_connection = true;
  fake_->FailNext(CallKind::kOther, reset);
  absl::StatusOr<HttpResponse> res = http->Send(Get(), Soon());
  ASSERT_TRUE(res.ok()) << res.status();
  EXPECT_EQ(res->status, 404);
  EXPECT_EQ(http->stats().retries, 1u);
  EXPECT_EQ(fake_->calls(CallKind::kOther), 3);
}

TEST_F(HttpClientTest, NeverResendsAPost) {
  std::unique_ptr<HttpClient> http = NewClient();
  ASSERT_TRUE(http->Send(Get(), Soon()).ok());
  Failure reset;
  reset.reset_connection = true;
  fake_->FailNext(CallKind::kOther, reset);
  HttpRequest post = Get("/oauth/tokens");  // no grant_type: the fake files it as kOther
  post.method = "POST";
  post.headers.emplace_back("Content-Type", "application/json");
  post.body = "{}";
  EXPECT_EQ(http->Send(post, Soon()).status().code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ(http->stats().retries, 0u);
  EXPECT_EQ(fake_->calls(CallKind::kOther), 2);
}

TEST_F(HttpClientTest, ReplacesAnIdleConnectionTheServerClosed) {
  FakeProviderOptions options;
  options.idle_timeout = absl::Milliseconds(200);
  StartFake(options);
  std::unique_ptr<HttpClient> http = NewClient();
  ASSERT_TRUE(http->Send(Get(), Soon()).ok());
  absl::SleepFor(absl::Milliseconds(600));  // the server closes the idle connection
  HttpRequest post = Get("/oauth/tokens");
  post.method = "POST";
  post.body = "{}";
  absl::StatusOr<HttpResponse> res = http->Send(post, Soon());
  ASSERT_TRUE(res.ok()) << res.status();
  EXPECT_EQ(http->stats().connections_opened, 2u);
  EXPECT_EQ(http->stats().retries, 0u);
}

TEST_F(HttpClientTest, LimitsTheResponseBody) {
  std::unique_ptr<HttpClient> http = NewClient();
  Failure huge;
  huge.garbage_body = std::string(2 * 1024 * 1024, 'x');
  fake_->FailNext(CallKind::kOther, huge);
  EXPECT_EQ(http->Send(Get(), Soon()).status().code(), absl::StatusCode::kUnavailable);
  // The connection was dropped, not reused mid-body.
  absl::StatusOr<HttpResponse> res = http->Send(Get(), Soon());
  ASSERT_TRUE(res.ok()) << res.status();
  EXPECT_EQ(res->status, 404);
}

TEST_F(HttpClientTest, RejectsBadRequestsBeforeConnecting) {
  std::unique_ptr<HttpClient> http = NewClient();
  HttpRequest r = Get();
  r.url = "not a url";
  EXPECT_EQ(http->Send(r, Soon()).status().code(), absl::StatusCode::kInvalidArgument);
  r = Get();
  r.method = "BREW";
  EXPECT_EQ(http->Send(r, Soon()).status().code(), absl::StatusCode::kInvalidArgument);
  r = Get();
  r.headers.emplace_back("X-Injected", "a\r\nEvil: yes");
  EXPECT_EQ(http->Send(r, Soon()).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(http->stats().connections_opened, 0u);
}

TEST(HttpClientCreateTest, RejectsUnreadableCaFileAndBadProxy) {
  HttpClientOptions options;
  options.ca_file = "/nonexistent/ca.pem";
  EXPECT_EQ(HttpClient::Create(options).status().code(), absl::StatusCode::kInvalidArgument);
  options = {};
  options.https_proxy = "https://proxy:3128";
  EXPECT_EQ(HttpClient::Create(options).status().code(), absl::StatusCode::kInvalidArgument);
  options = {};
  options.connect_timeout = absl::ZeroDuration();
  EXPECT_EQ(HttpClient::Create(options).status().code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace tb::provider
