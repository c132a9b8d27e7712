#include "server/src/http/http_server.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <thread>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/time/time.h"
#include "gtest/gtest.h"
#include "server/src/common/mutex.h"
#include "server/src/http/http_types.h"

namespace tb::http {
namespace {

using Clock = std::chrono::steady_clock;

// Generous bound for anything that should happen "promptly": the suite runs on a loaded machine.
constexpr std::chrono::seconds kPatience(5);

struct RawResponse {
  int status = 0;
  std::vector<std::pair<std::string, std::string>> headers;  // names lower-cased
  std::string body;

  std::optional<std::string> Header(std::string_view name) const {
    for (const auto& [n, v] : headers) {
      if (n == absl::AsciiStrToLower(std::string(name))) {
        return v;
      }
    }
    return std::nullopt;
  }
};

// A tiny blocking HTTP/1.1 client over a POSIX socket, enough to look at what the server writes.
class TestClient {
 public:
  // Connects to 127.0.0.1:port; nullopt (with errno kept) if the connection is refused.
  static std::optional<TestClient> Connect(int port) {
    const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0) {
      return std::nullopt;
    }
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_port = htons(static_cast<uint16_t>(port));
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (::connect(fd, reinterpret_cast<const sockaddr*>(&addr), sizeof(addr)) != 0) {
      const int saved = errno;
      ::close(fd);
      errno = saved;
      return std::nullopt;
    }
    TestClient client(fd);
    client.SetReceiveTimeout(kPatience);
    return client;
  }

  TestClient(TestClient&& other) noexcept
      : fd_(std::exchange(other.fd_, -1)), pending_(std::move(other.pending_)) {}
  TestClient& operator=(TestClient&&) = delete;
  ~TestClient() {
    if (fd_ >= 0) {
      ::close(fd_);
    }
  }

  bool Send(std::string_view data) {
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

  // Reads one response. For HEAD (or 204/304) no body is expected. nullopt on EOF, error or
  // timeout before a complete response.
  std::optional<RawResponse> ReadResponse(bool head = false) {
    size_t header_end;
    while ((header_end = pending_.find("\r\n\r\n")) == std::string::npos) {
      if (!Fill()) {
        return std::nullopt;
      }
    }
    const std::string head_text = pending_.substr(0, header_end);
    pending_.erase(0, header_end + 4);
    std::vector<std::string> lines = absl::StrSplit(head_text, "\r\n");
    RawResponse res;
    std::vector<std::string> status_line = absl::StrSplit(lines[0], absl::MaxSplits(' ', 2));
    if (status_line.size() < 2 || !absl::SimpleAtoi(status_line[1], &res.status)) {
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
    if (head || res.status == 204 || res.status == 304) {
      return res;
    }
    size_t length = 0;
    const std::optional<std::string> content_length = res.Header("Content-Length");
    if (!content_length || !absl::SimpleAtoi(*content_length, &length)) {
      return std::nullopt;  // the server always sends Content-Length
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

  // Everything the server sends until it closes the connection (bytes already buffered included).
  std::string ReadUntilClosed() {
    while (Fill()) {
    }
    return std::exchange(pending_, "");
  }

  // True if the server closes the connection (EOF or reset) within `timeout` without sending.
  bool WaitForClose(std::chrono::milliseconds timeout) {
    SetReceiveTimeout(timeout);
    char c;
    const ssize_t n = ::recv(fd_, &c, 1, 0);
    SetReceiveTimeout(kPatience);
    return n == 0 || (n < 0 && errno == ECONNRESET);
  }

  const std::string& pending() const { return pending_; }

 private:
  explicit TestClient(int fd) : fd_(fd) {}

  void SetReceiveTimeout(std::chrono::milliseconds timeout) {
    timeval tv{};
    tv.tv_sec = static_cast<time_t>(timeout.count() / 1000);
    tv.tv_usec = static_cast<suseconds_t>((timeout.count() % 1000) * 1000);
    ::setsockopt(fd_, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  }

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

// Records what the handler saw. The handler runs on io threads, so the record is locked.
class RequestLog {
 public:
  void Add(const HttpRequest& req) {
    tb::MutexLock lock(&mu_);
    requests_.push_back(req);
  }
  std::vector<HttpRequest> requests() const {
    tb::MutexLock lock(&mu_);
    return requests_;
  }

 private:
  mutable tb::Mutex mu_;
  std::vector<HttpRequest> requests_ ABSL_GUARDED_BY(mu_);
};

// Echoes the request: 200 with "<method> <target>" unless a route below says otherwise.
Handler EchoHandler(std::shared_ptr<RequestLog> log = nullptr) {
  return [log](const HttpRequest& req) {
    if (log != nullptr) {
      log->Add(req);
    }
    HttpResponse res;
    const std::string_view path = RequestPath(req.target);
    if (path == "/created") {
      res.status = 201;
      res.body = "made it\n";
    } else if (path == "/cacheable") {
      res.headers.emplace_back("Cache-Control", "max-age=60");
      res.headers.emplace_back("X-Extra", "1");
      res.body = "cache me";
    } else if (path == "/throw") {
      throw std::runtime_error("boom");
    } else if (path == "/bad-status") {
      res.status = 1000;
    } else if (path == "/bad-header") {
      res.headers.emplace_back("X-Injected", "a\r\nSet-Cookie: x=y");
    } else if (path == "/no-content") {
      res.status = 204;
    } else if (path == "/own-policy") {
      res.headers.emplace_back("content-security-policy", "default-src 'self'");
      res.headers.emplace_back("Referrer-Policy", "same-origin");
    } else {
      res.body = absl::StrCat(req.method, " ", req.target, " ", req.body);
    }
    return res;
  };
}

HttpServerOptions TestOptions() {
  HttpServerOptions options;
  options.address = "127.0.0.1";
  options.port = 0;
  options.name = "test";
  return options;
}

std::unique_ptr<HttpServer> StartOrDie(HttpServerOptions options, Handler handler) {
  absl::StatusOr<std::unique_ptr<HttpServer>> server =
      HttpServer::Start(std::move(options), std::move(handler));
  if (!server.ok()) {
    ADD_FAILURE() << server.status();
    std::abort();
  }
  return *std::move(server);
}

TestClient ConnectOrDie(int port) {
  std::optional<TestClient> client = TestClient::Connect(port);
  if (!client.has_value()) {
    ADD_FAILURE() << "connect to port " << port << " failed: errno " << errno;
    std::abort();
  }
  return *std::move(client);
}

std::string Get(const std::string& target, const std::string& extra_headers = "") {
  return absl::StrCat("GET ", target, " HTTP/1.1\r\nHost: localhost\r\n", extra_headers, "\r\n");
}

TEST(HttpServerTest, GetReturnsHandlerStatusAndBody) {
  auto server = StartOrDie(TestOptions(), EchoHandler());
  ASSERT_GT(server->port(), 0);
  TestClient client = ConnectOrDie(server->port());
  ASSERT_TRUE(client.Send(Get("/created")));
  const std::optional<RawResponse> res = client.ReadResponse();
  ASSERT_TRUE(res.has_value());
  EXPECT_EQ(res->status, 201);
  EXPECT_EQ(res->body, "made it\n");
  EXPECT_EQ(res->Header("Content-Length"), "8");
  EXPECT_EQ(res->Header("Content-Type"), "text/plain; charset=utf-8");
  EXPECT_EQ(res->Header("Server"), "token-broker");
  EXPECT_EQ(res->Header("X-Content-Type-Options"), "nosniff");
  EXPECT_EQ(res->Header("Cache-Control"), "no-store");
}

TEST(HttpServerTest, HandlerSeesMethodTargetHeadersBodyAndPeer) {
  auto log = std::make_shared<RequestLog>();
  auto server = StartOrDie(TestOptions(), EchoHandler(log));
  TestClient client = ConnectOrDie(server->port());
  ASSERT_TRUE(
      client.Send("POST /echo?code=abc&state=xyz HTTP/1.1\r\nHost: localhost\r\nX-Test: yes\r\n"
                  "Content-Length: 5\r\n\r\nhello"));
  const std::optional<RawResponse> res = client.ReadResponse();
  ASSERT_TRUE(res.has_value());
  EXPECT_EQ(res->status, 200);
  EXPECT_EQ(res->body, "POST /echo?code=abc&state=xyz hello");

  const std::vector<HttpRequest> seen = log->requests();
  ASSERT_EQ(seen.size(), 1u);
  EXPECT_EQ(seen[0].method, "POST");
  EXPECT_EQ(seen[0].target, "/echo?code=abc&state=xyz");
  EXPECT_EQ(seen[0].body, "hello");
  EXPECT_EQ(seen[0].remote_address, "127.0.0.1");
  bool found = false;
  for (const auto& [name, value] : seen[0].headers) {
    found = found || (name == "X-Test" && value == "yes");
  }
  EXPECT_TRUE(found);
}

// Both ports' pages, the server's own error answers included, forbid active content, framing,
// caching and Referer leaks unless the handler says otherwise.
TEST(HttpServerTest, EveryResponseCarriesTheSecurityHeaders) {
  HttpServerOptions options = TestOptions();
  options.max_header_bytes = 1024;
  auto server = StartOrDie(options, EchoHandler());
  const std::vector<std::pair<std::string, int>> requests = {
      {Get("/created"), 201},
      {Get("/throw"), 500},
      {Get("/", absl::StrCat("X-Pad: ", std::string(4096, 'a'), "\r\n")), 431},
      {"GET / HTTP/1.1\r\nBad Header Without Colon\r\n\r\n", 400},
  };
  for (const auto& [request, status] : requests) {
    TestClient client = ConnectOrDie(server->port());
    ASSERT_TRUE(client.Send(request));
    const std::optional<RawResponse> res = client.ReadResponse();
    ASSERT_TRUE(res.has_value()) << status;
    EXPECT_EQ(res->status, status);
    EXPECT_EQ(res->Header("Content-Security-Policy"), "default-src 'none'; frame-ancestors 'none'")
        << status;
    EXPECT_EQ(res->Header("Referrer-Policy"), "no-referrer") << status;
    EXPECT_EQ(res->Header("X-Frame-Options"), "DENY") << status;
    EXPECT_EQ(res->Header("X-Content-Type-Options"), "nosniff") << status;
    EXPECT_EQ(res->Header("Cache-Control"), "no-store") << status;
  }
}

TEST(HttpServerTest, HandlerSecurityHeadersReplaceTheDefaults) {
  auto server = StartOrDie(TestOptions(), EchoHandler());
  TestClient client = ConnectOrDie(server->port());
  ASSERT_TRUE(client.Send(Get("/own-policy")));
  const std::optional<RawResponse> res = client.ReadResponse();
  ASSERT_TRUE(res.has_value());
  int csp = 0;
  for (const auto& [name, value] : res->headers) {
    csp += name == "content-security-policy";
  }
  EXPECT_EQ(csp, 1);
  EXPECT_EQ(res->Header("Content-Security-Policy"), "default-src 'self'");
  EXPECT_EQ(res->Header("Referrer-Policy"), "same-origin");
  EXPECT_EQ(res->Header("X-Frame-Options"), "DENY");
}

TEST(HttpServerTest, HandlerCacheControlAndExtraHeadersAreKept) {
  auto server = StartOrDie(TestOptions(), EchoHandler());
  TestClient client = ConnectOrDie(server->port());
  ASSERT_TRUE(client.Send(Get("/cacheable")));
  const std::optional<RawResponse> res = client.ReadResponse();
  ASSERT_TRUE(res.has_value());
  EXPECT_EQ(res->Header("Cache-Control"), "max-age=60");
  EXPECT_EQ(res->Header("X-Extra"), "1");
  EXPECT_EQ(res->Header("X-Content-Type-Options"), "nosniff");
}

TEST(HttpServerTest, HeadKeepsContentLengthButSendsNoBody) {
  auto server = StartOrDie(TestOptions(), EchoHandler());
  TestClient client = ConnectOrDie(server->port());
  ASSERT_TRUE(
      client.Send("HEAD /created HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"));
  const std::optional<RawResponse> res = client.ReadResponse(/*head=*/true);
  ASSERT_TRUE(res.has_value());
  EXPECT_EQ(res->status, 201);
  EXPECT_EQ(res->Header("Content-Length"), "8");
  EXPECT_EQ(client.ReadUntilClosed(), "");  // nothing after the header block
}

TEST(HttpServerTest, NoContentHasNoBody) {
  auto server = StartOrDie(TestOptions(), EchoHandler());
  TestClient client = ConnectOrDie(server->port());
  ASSERT_TRUE(client.Send(Get("/no-content", "Connection: close\r\n")));
  const std::optional<RawResponse> res = client.ReadResponse();
  ASSERT_TRUE(res.has_value());
  EXPECT_EQ(res->status, 204);
  EXPECT_EQ(client.ReadUntilClosed(), "");
}

TEST(HttpServerTest, OversizedHeaderGets431) {
  HttpServerOptions options = TestOptions();
  options.max_header_bytes = 1024;
  auto server = StartOrDie(options, EchoHandler());
  TestClient client = ConnectOrDie(server->port());
  ASSERT_TRUE(client.Send(Get("/", absl::StrCat("X-Pad: ", std::string(4096, 'a'), "\r\n"))));
  const std::optional<RawResponse> res = client.ReadResponse();
  ASSERT_TRUE(res.has_value());
  EXPECT_EQ(res->status, 431);
  EXPECT_EQ(res->Header("Connection"), "close");
  client.ShutdownWrite();
  EXPECT_TRUE(client.WaitForClose(kPatience));
}

TEST(HttpServerTest, OversizedBodyGets413) {
  HttpServerOptions options = TestOptions();
  options.max_body_bytes = 16;
  auto server = StartOrDie(options, EchoHandler());
  TestClient client = ConnectOrDie(server->port());
  ASSERT_TRUE(client.Send(absl::StrCat(
      "POST / HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100\r\n\r\n", std::string(100, 'b'))));
  const std::optional<RawResponse> res = client.ReadResponse();
  ASSERT_TRUE(res.has_value());
  EXPECT_EQ(res->status, 413);
}

TEST(HttpServerTest, MalformedRequestGets400) {
  auto server = StartOrDie(TestOptions(), EchoHandler());
  TestClient client = ConnectOrDie(server->port());
  ASSERT_TRUE(client.Send("GET / HTTP/1.1\r\nBad Header Without Colon\r\n\r\n"));
  const std::optional<RawResponse> res = client.ReadResponse();
  ASSERT_TRUE(res.has_value());
  EXPECT_EQ(res->status, 400);
  EXPECT_EQ(res->Header("X-Content-Type-Options"), "nosniff");
}

TEST(HttpServerTest, ThrowingHandlerGets500AndServerKeepsServing) {
  auto server = StartOrDie(TestOptions(), EchoHandler());
  TestClient client = ConnectOrDie(server->port());
  ASSERT_TRUE(client.Send(Get("/throw")));
  std::optional<RawResponse> res = client.ReadResponse();
  ASSERT_TRUE(res.has_value());
  EXPECT_EQ(res->status, 500);
  ASSERT_TRUE(client.Send(Get("/created")));
  res = client.ReadResponse();
  ASSERT_TRUE(res.has_value());
  EXPECT_EQ(res->status, 201);
}

TEST(HttpServerTest, InvalidHandlerResponsesGet500) {
  auto server = StartOrDie(TestOptions(), EchoHandler());
  TestClient client = ConnectOrDie(server->port());
  for (const char* target : {"/bad-status", "/bad-header"}) {
    ASSERT_TRUE(client.Send(Get(target)));
    const std::optional<RawResponse> res = client.ReadResponse();
    ASSERT_TRUE(res.has_value()) << target;
    EXPECT_EQ(res->status, 500) << target;
    EXPECT_EQ(res->Header("Set-Cookie"), std::nullopt) << target;
  }
}

TEST(HttpServerTest, SilentClientIsDisconnectedAfterReadTimeout) {
  HttpServerOptions options = TestOptions();
  options.read_timeout = absl::Milliseconds(200);
  auto server = StartOrDie(options, EchoHandler());
  TestClient client = ConnectOrDie(server->port());
  const Clock::time_point start = Clock::now();
  EXPECT_TRUE(client.WaitForClose(kPatience));
  const auto elapsed = Clock::now() - start;
  EXPECT_GE(elapsed, std::chrono::milliseconds(100));
  EXPECT_LT(elapsed, kPatience);
}

TEST(HttpServerTest, TricklingClientIsDisconnectedAfterReadTimeout) {
  HttpServerOptions options = TestOptions();
  options.read_timeout = absl::Milliseconds(200);
  auto server = StartOrDie(options, EchoHandler());
  TestClient client = ConnectOrDie(server->port());
  // Half a request: the timeout covers the whole request, not each read.
  ASSERT_TRUE(client.Send("GET / HTTP/1.1\r\nHost: loc"));
  const Clock::time_point start = Clock::now();
  EXPECT_TRUE(client.WaitForClose(kPatience));
  EXPECT_LT(Clock::now() - start, kPatience);
}

TEST(HttpServerTest, KeepAliveServesTwoRequestsOnOneConnection) {
  auto log = std::make_shared<RequestLog>();
  auto server = StartOrDie(TestOptions(), EchoHandler(log));
  TestClient client = ConnectOrDie(server->port());
  ASSERT_TRUE(client.Send(Get("/one")));
  std::optional<RawResponse> res = client.ReadResponse();
  ASSERT_TRUE(res.has_value());
  EXPECT_EQ(res->body, "GET /one ");
  EXPECT_EQ(res->Header("Connection"), std::nullopt);  // HTTP/1.1 default: stays open

  ASSERT_TRUE(client.Send(Get("/two")));
  res = client.ReadResponse();
  ASSERT_TRUE(res.has_value());
  EXPECT_EQ(res->body, "GET /two ");
  EXPECT_EQ(log->requests().size(), 2u);
}

TEST(HttpServerTest, PipelinedRequestsAreAnsweredInOrder) {
  auto server = StartOrDie(TestOptions(), EchoHandler());
  TestClient client = ConnectOrDie(server->port());
  ASSERT_TRUE(client.Send(absl::StrCat(Get("/a"), Get("/b"), Get("/c", "Connection: close\r\n"))));
  for (const char* expected : {"GET /a ", "GET /b ", "GET /c "}) {
    const std::optional<RawResponse> res = client.ReadResponse();
    ASSERT_TRUE(res.has_value());
    EXPECT_EQ(res->body, expected);
  }
  EXPECT_EQ(client.ReadUntilClosed(), "");
}

TEST(HttpServerTest, IdleKeepAliveConnectionIsClosedAfterIdleTimeout) {
  HttpServerOptions options = TestOptions();
  options.idle_timeout = absl::Milliseconds(200);
  auto server = StartOrDie(options, EchoHandler());
  TestClient client = ConnectOrDie(server->port());
  ASSERT_TRUE(client.Send(Get("/")));
  ASSERT_TRUE(client.ReadResponse().has_value());
  const Clock::time_point start = Clock::now();
  EXPECT_TRUE(client.WaitForClose(kPatience));
  EXPECT_LT(Clock::now() - start, kPatience);
}

TEST(HttpServerTest, ConnectionCloseIsHonoured) {
  auto server = StartOrDie(TestOptions(), EchoHandler());
  TestClient client = ConnectOrDie(server->port());
  ASSERT_TRUE(client.Send(Get("/", "Connection: close\r\n")));
  const std::optional<RawResponse> res = client.ReadResponse();
  ASSERT_TRUE(res.has_value());
  EXPECT_EQ(res->Header("Connection"), "close");
  EXPECT_TRUE(client.WaitForClose(kPatience));
}

TEST(HttpServerTest, ConnectionsOverTheCapAreClosed) {
  HttpServerOptions options = TestOptions();
  options.max_connections = 1;
  auto server = StartOrDie(options, EchoHandler());
  TestClient first = ConnectOrDie(server->port());
  TestClient second = ConnectOrDie(server->port());  // the kernel accepts; the server closes
  EXPECT_TRUE(second.WaitForClose(kPatience));
  ASSERT_TRUE(first.Send(Get("/")));
  const std::optional<RawResponse> res = first.ReadResponse();
  ASSERT_TRUE(res.has_value());
  EXPECT_EQ(res->status, 200);
}

TEST(HttpServerTest, ServesConcurrentClientsOnSeveralThreads) {
  HttpServerOptions options = TestOptions();
  options.threads = 2;
  auto server = StartOrDie(options, EchoHandler());
  const int port = server->port();
  std::atomic<int> ok{0};
  std::vector<std::thread> clients;
  for (int i = 0; i < 4; ++i) {
    clients.emplace_back([port, i, &ok] {
      std::optional<TestClient> client = TestClient::Connect(port);
      if (!client.has_value()) {
        return;
      }
      for (int j = 0; j < 20; ++j) {
        const std::string target = absl::StrCat("/c", i, "/r", j);
        if (!client->Send(Get(target))) {
          return;
        }
        const std::optional<RawResponse> res = client->ReadResponse();
        if (res.has_value() && res->body == absl::StrCat("GET ", target, " ")) {
          ok.fetch_add(1);
        }
      }
    });
  }
  for (std::thread& t : clients) {
    t.join();
  }
  EXPECT_EQ(ok.load(), 80);
}

TEST(HttpServerTest, StopIsIdempotentAndClosesThePort) {
  auto server = StartOrDie(TestOptions(), EchoHandler());
  const int port = server->port();
  {
    TestClient client = ConnectOrDie(port);
    ASSERT_TRUE(client.Send(Get("/")));
    ASSERT_TRUE(client.ReadResponse().has_value());
  }
  server->Stop();
  server->Stop();
  const std::optional<TestClient> after = TestClient::Connect(port);
  const int connect_errno = errno;
  EXPECT_FALSE(after.has_value());
  EXPECT_EQ(connect_errno, ECONNREFUSED);
  server.reset();  // the destructor stops again
}

TEST(HttpServerTest, StopClosesOpenConnections) {
  auto server = StartOrDie(TestOptions(), EchoHandler());
  TestClient idle = ConnectOrDie(server->port());
  TestClient kept_alive = ConnectOrDie(server->port());
  ASSERT_TRUE(kept_alive.Send(Get("/")));
  ASSERT_TRUE(kept_alive.ReadResponse().has_value());
  server->Stop();
  EXPECT_TRUE(idle.WaitForClose(kPatience));
  EXPECT_TRUE(kept_alive.WaitForClose(kPatience));
}

TEST(HttpServerTest, StopFromSeveralThreadsAtOnce) {
  auto server = StartOrDie(TestOptions(), EchoHandler());
  const int port = server->port();
  std::vector<std::thread> stoppers;
  for (int i = 0; i < 3; ++i) {
    stoppers.emplace_back([&server] { server->Stop(); });
  }
  for (std::thread& t : stoppers) {
    t.join();
  }
  EXPECT_FALSE(TestClient::Connect(port).has_value());
}

TEST(HttpServerTest, StopFromInsideTheHandlerDoesNotDeadlock) {
  // The handler only sees the server once Start() has returned it.
  auto server_slot = std::make_shared<std::atomic<HttpServer*>>(nullptr);
  auto server = StartOrDie(TestOptions(), [server_slot](const HttpRequest&) {
    if (HttpServer* s = server_slot->load(); s != nullptr) {
      s->Stop();  // on an io thread: starts the shutdown, cannot join itself
    }
    return HttpResponse();
  });
  server_slot->store(server.get());
  const int port = server->port();
  TestClient client = ConnectOrDie(port);
  ASSERT_TRUE(client.Send(Get("/")));
  client.ReadUntilClosed();  // the response may or may not make it out; the connection closes
  server->Stop();            // joins the io threads
  EXPECT_FALSE(TestClient::Connect(port).has_value());
}

TEST(HttpServerTest, DestructorStopsARunningServer) {
  int port = 0;
  {
    auto server = StartOrDie(TestOptions(), EchoHandler());
    port = server->port();
    TestClient client = ConnectOrDie(port);  // an open connection while destroying
    ASSERT_TRUE(client.Send(Get("/")));
    ASSERT_TRUE(client.ReadResponse().has_value());
    server.reset();
    EXPECT_TRUE(client.WaitForClose(kPatience));
  }
  EXPECT_FALSE(TestClient::Connect(port).has_value());
}

TEST(HttpServerTest, StartRejectsABadAddress) {
  HttpServerOptions options = TestOptions();
  options.address = "not-an-ip";
  EXPECT_EQ(HttpServer::Start(options, EchoHandler()).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(HttpServerTest, StartRejectsBadOptions) {
  HttpServerOptions bad_port = TestOptions();
  bad_port.port = 70000;
  EXPECT_EQ(HttpServer::Start(bad_port, EchoHandler()).status().code(),
            absl::StatusCode::kInvalidArgument);
  HttpServerOptions no_threads = TestOptions();
  no_threads.threads = 0;
  EXPECT_EQ(HttpServer::Start(no_threads, EchoHandler()).status().code(),
            absl::StatusCode::kInvalidArgument);
  HttpServerOptions no_timeout = TestOptions();
  no_timeout.read_timeout = absl::ZeroDuration();
  EXPECT_EQ(HttpServer::Start(no_timeout, EchoHandler()).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(HttpServer::Start(TestOptions(), Handler()).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(HttpServerTest, StartFailsWhenThePortIsTaken) {
  auto first = StartOrDie(TestOptions(), EchoHandler());
  HttpServerOptions options = TestOptions();
  options.port = first->port();
  EXPECT_EQ(HttpServer::Start(options, EchoHandler()).status().code(),
            absl::StatusCode::kUnavailable);
}

}  // namespace
}  // namespace tb::http

namespace tb::http {
namespace {

// An async handler answers from another thread; the connection waits for it and stays usable.
TEST(HttpServerAsyncTest, ResponseFromAnotherThreadReachesTheClient) {
  std::vector<std::thread> workers;
  tb::Mutex mu;
  auto server = HttpServer::Start(
      TestOptions(), AsyncHandler([&](HttpRequest req, Respond respond) {
        tb::MutexLock lock(&mu);
        workers.emplace_back([req = std::move(req), respond = std::move(respond)] {
          std::this_thread::sleep_for(std::chrono::milliseconds(50));
          HttpResponse res;
          res.body = absl::StrCat("later ", req.target);
          respond(res);
          respond(HttpResponse{});  // a second call is ignored
        });
      }));
  ASSERT_TRUE(server.ok()) << server.status();
  TestClient client = ConnectOrDie((*server)->port());
  for (const char* target : {"/one", "/two"}) {  // keep-alive across async answers
    ASSERT_TRUE(client.Send(Get(target)));
    const std::optional<RawResponse> res = client.ReadResponse();
    ASSERT_TRUE(res.has_value());
    EXPECT_EQ(res->status, 200);
    EXPECT_EQ(res->body, absl::StrCat("later ", target));
  }
  (*server)->Stop();
  tb::MutexLock lock(&mu);
  for (std::thread& t : workers) {
    t.join();
  }
}

// Stop() waits for a response still being computed instead of tearing the io_context down
// under it.
TEST(HttpServerAsyncTest, StopWaitsForPendingResponses) {
  std::thread worker;
  std::atomic<bool> answered{false};
  std::atomic<bool> started{false};
  auto server = HttpServer::Start(TestOptions(), AsyncHandler([&](HttpRequest, Respond respond) {
                                    started = true;
                                    worker = std::thread([&answered, respond = std::move(respond)] {
                                      std::this_thread::sleep_for(std::chrono::milliseconds(200));
                                      answered = true;
                                      respond(HttpResponse{});
                                    });
                                  }));
  ASSERT_TRUE(server.ok());
  TestClient client = ConnectOrDie((*server)->port());
  ASSERT_TRUE(client.Send(Get("/slow")));
  while (!started) {
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  (*server)->Stop();
  EXPECT_TRUE(answered.load());
  worker.join();
}

}  // namespace
}  // namespace tb::http
