// HttpServer over HTTPS: certificates made by the test CA at runtime, a blocking Asio TLS client
// that trusts exactly one CA, and certificate reloads while connections stay open.

#include <stdlib.h>
#include <sys/socket.h>
#include <sys/time.h>

#include <chrono>
#include <filesystem>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <utility>

#include <boost/asio/connect.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/ssl.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <boost/beast/ssl.hpp>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "server/src/http/http_server.h"
#include "tests/fake_provider/test_ca.h"
#include "tests/support/test_secrets.h"

namespace tb::http {
namespace {

namespace beast = boost::beast;
namespace bhttp = boost::beast::http;
namespace net = boost::asio;
namespace ssl = boost::asio::ssl;
using tcp = net::ip::tcp;

// Generous: the suite runs on a loaded machine.
constexpr std::chrono::seconds kPatience(10);

// A TLS client that trusts only `ca_pem` and checks that the certificate names 127.0.0.1.
// Blocking, with a receive timeout on the socket so that nothing here can hang.
class TlsClient {
 public:
  // nullopt if the TCP connect or the TLS handshake fails (the reason in *error).
  static std::unique_ptr<TlsClient> Connect(int port, const std::string& ca_pem, std::string* error,
                                            int max_version = 0 /* 0: any */) {
    auto c = std::unique_ptr<TlsClient>(new TlsClient());
    beast::error_code ec;
    c->ctx_.add_certificate_authority(net::buffer(ca_pem), ec);
    if (ec) {
      *error = "bad CA: " + ec.message();
      return nullptr;
    }
    if (max_version != 0) {
      SSL_CTX_set_max_proto_version(c->ctx_.native_handle(), max_version);
      SSL_CTX_set_security_level(c->ctx_.native_handle(), 0);  // let the client offer old TLS
    }
    c->ctx_.set_verify_mode(ssl::verify_peer);
    c->stream_.emplace(c->ioc_, c->ctx_);
    c->stream_->set_verify_callback(ssl::host_name_verification("127.0.0.1"));
    tcp::socket& socket = c->stream_->next_layer();
    socket.connect(
        tcp::endpoint(net::ip::make_address("127.0.0.1"), static_cast<unsigned short>(port)), ec);
    if (ec) {
      *error = "connect: " + ec.message();
      return nullptr;
    }
    timeval tv{};
    tv.tv_sec = kPatience.count();
    ::setsockopt(socket.native_handle(), SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    ::setsockopt(socket.native_handle(), SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
    c->stream_->handshake(ssl::stream_base::client, ec);
    if (ec) {
      *error = "handshake: " + ec.message();
      return nullptr;
    }
    return c;
  }

  // One GET on this connection (keep-alive); nullopt if the exchange fails.
  std::optional<bhttp::response<bhttp::string_body>> Get(const std::string& target) {
    bhttp::request<bhttp::empty_body> req(bhttp::verb::get, target, 11);
    req.set(bhttp::field::host, "127.0.0.1");
    beast::error_code ec;
    bhttp::write(*stream_, req, ec);
    if (ec) {
      return std::nullopt;
    }
    bhttp::response<bhttp::string_body> res;
    bhttp::read(*stream_, buffer_, res, ec);
    if (ec) {
      return std::nullopt;
    }
    return res;
  }

 private:
  TlsClient() = default;

  net::io_context ioc_;
  ssl::context ctx_{ssl::context::tls_client};
  std::optional<ssl::stream<tcp::socket>> stream_;
  beast::flat_buffer buffer_;
};

// Polls `done` until it holds or kPatience passes. For waiting on the server's background
// reload, which has no event to wait on from outside.
bool Eventually(const std::function<bool()>& done) {
  const auto deadline = std::chrono::steady_clock::now() + kPatience;
  while (std::chrono::steady_clock::now() < deadline) {
    if (done()) {
      return true;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return done();
}

Handler Hello() {
  return [](const HttpRequest& req) {
    HttpResponse res;
    res.body = "hello " + req.target;
    return res;
  };
}

class HttpServerTlsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string tmpl = (std::filesystem::temp_directory_path() / "tb-https-XXXXXX").string();
    ASSERT_NE(::mkdtemp(tmpl.data()), nullptr);
    dir_ = tmpl;
    cert_file_ = dir_ + "/tls.crt";
    key_file_ = dir_ + "/tls.key";
    first_ = Generate();
    Install(first_);
  }

  void TearDown() override {
    std::error_code ignored;
    std::filesystem::remove_all(dir_, ignored);
  }

  static testing::TestCertificates Generate() {
    absl::StatusOr<testing::TestCertificates> c = testing::GenerateTestCertificates({});
    EXPECT_TRUE(c.ok()) << c.status();
    testing::RecordTestSecret(c->server_key_pem);  // the log scan proves no key is ever logged
    testing::RecordTestSecret(c->ca_key_pem);
    return *c;
  }

  // As cert-manager does: each file replaced atomically (written beside, then renamed).
  void Install(const testing::TestCertificates& c) {
    ASSERT_TRUE(testing::WritePemFile(key_file_, c.server_key_pem).ok());
    ASSERT_TRUE(testing::WritePemFile(cert_file_, c.server_cert_pem).ok());
  }

  HttpServerOptions Options(absl::Duration reload = absl::Milliseconds(50)) const {
    HttpServerOptions o;
    o.name = "tls-test";
    o.tls = HttpTlsOptions{cert_file_, key_file_, reload};
    return o;
  }

  std::unique_ptr<HttpServer> StartOrDie(HttpServerOptions options) {
    absl::StatusOr<std::unique_ptr<HttpServer>> s = HttpServer::Start(std::move(options), Hello());
    EXPECT_TRUE(s.ok()) << s.status();
    return s.ok() ? *std::move(s) : nullptr;
  }

  // Whether a new connection that trusts only `c`'s CA gets through the handshake and a GET.
  static bool NewConnectionTrusts(int port, const testing::TestCertificates& c) {
    std::string error;
    std::unique_ptr<TlsClient> client = TlsClient::Connect(port, c.ca_cert_pem, &error);
    if (client == nullptr) {
      return false;
    }
    const auto res = client->Get("/probe");
    return res.has_value() && res->result_int() == 200;
  }

  std::string dir_;
  std::string cert_file_;
  std::string key_file_;
  testing::TestCertificates first_;
};

TEST_F(HttpServerTlsTest, ServesHttpsWithTheConfiguredCertificate) {
  auto server = StartOrDie(Options());
  ASSERT_NE(server, nullptr);
  std::string error;
  std::unique_ptr<TlsClient> client =
      TlsClient::Connect(server->port(), first_.ca_cert_pem, &error);
  ASSERT_NE(client, nullptr) << error;
  for (const char* target : {"/a", "/b"}) {  // keep-alive over TLS
    const auto res = client->Get(target);
    ASSERT_TRUE(res.has_value()) << target;
    EXPECT_EQ(res->result_int(), 200);
    EXPECT_EQ(res->body(), std::string("hello ") + target);
    EXPECT_EQ(res->at("X-Content-Type-Options"), "nosniff");
    EXPECT_EQ(res->at("Content-Security-Policy"), "default-src 'none'; frame-ancestors 'none'");
  }
  // A client that trusts another CA refuses the server.
  EXPECT_FALSE(NewConnectionTrusts(server->port(), Generate()));
  EXPECT_EQ(server->tls_stats().reloaded, 0u);
}

TEST_F(HttpServerTlsTest, PlainHttpAndOldTlsAreRefused) {
  auto server = StartOrDie(Options());
  ASSERT_NE(server, nullptr);
  // Plain HTTP to the HTTPS port: no HTTP answer, the connection is closed.
  net::io_context ioc;
  tcp::socket plain(ioc);
  beast::error_code ec;
  plain.connect(tcp::endpoint(net::ip::make_address("127.0.0.1"),
                              static_cast<unsigned short>(server->port())),
                ec);
  ASSERT_FALSE(ec) << ec.message();
  timeval tv{};
  tv.tv_sec = kPatience.count();
  ::setsockopt(plain.native_handle(), SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  const std::string get = "GET / HTTP/1.1\r\nHost: x\r\n\r\n";
  net::write(plain, net::buffer(get), ec);
  std::string received;
  char buf[512];
  for (;;) {
    const size_t n = plain.read_some(net::buffer(buf), ec);
    if (ec) {
      break;
    }
    received.append(buf, n);
  }
  EXPECT_TRUE(ec == net::error::eof || ec == net::error::connection_reset) << ec.message();
  EXPECT_EQ(received.find("HTTP/1.1"), std::string::npos);

  std::string error;
  EXPECT_EQ(TlsClient::Connect(server->port(), first_.ca_cert_pem, &error, TLS1_1_VERSION),
            nullptr);
  // The server still serves.
  EXPECT_TRUE(NewConnectionTrusts(server->port(), first_));
}

TEST_F(HttpServerTlsTest, ReplacedCertificateReachesNewConnectionsWhileOpenOnesKeepWorking) {
  auto server = StartOrDie(Options());
  ASSERT_NE(server, nullptr);
  std::string error;
  std::unique_ptr<TlsClient> open = TlsClient::Connect(server->port(), first_.ca_cert_pem, &error);
  ASSERT_NE(open, nullptr) << error;
  ASSERT_TRUE(open->Get("/before").has_value());

  const testing::TestCertificates second = Generate();
  Install(second);
  // The next check (at most 50 ms on, triggered by an accept) loads the new pair.
  EXPECT_TRUE(Eventually([&] { return NewConnectionTrusts(server->port(), second); }));
  EXPECT_EQ(server->tls_stats().reloaded, 1u);
  EXPECT_EQ(server->tls_stats().failed, 0u);
  EXPECT_FALSE(NewConnectionTrusts(server->port(), first_));

  // The connection opened before the reload was neither dropped nor switched.
  const auto res = open->Get("/after");
  ASSERT_TRUE(res.has_value());
  EXPECT_EQ(res->result_int(), 200);
  EXPECT_EQ(res->body(), "hello /after");
}

TEST_F(HttpServerTlsTest, ABadNewPairIsRefusedAndTheOldOneKeepsServing) {
  auto server = StartOrDie(Options());
  ASSERT_NE(server, nullptr);
  // A certificate whose key is not in the key file (a half-finished rotation).
  const testing::TestCertificates second = Generate();
  ASSERT_TRUE(testing::WritePemFile(cert_file_, second.server_cert_pem).ok());
  EXPECT_TRUE(Eventually([&] {
    NewConnectionTrusts(server->port(), first_);  // each accept may trigger the check
    return server->tls_stats().failed >= 1;
  }));
  EXPECT_TRUE(NewConnectionTrusts(server->port(), first_));
  EXPECT_EQ(server->tls_stats().reloaded, 0u);
  const uint64_t failed = server->tls_stats().failed;

  // Garbage in both files: still the first pair, and a failure is not retried until they change.
  ASSERT_TRUE(testing::WritePemFile(key_file_, "not a key").ok());
  ASSERT_TRUE(testing::WritePemFile(cert_file_, "not a certificate").ok());
  EXPECT_TRUE(Eventually([&] {
    NewConnectionTrusts(server->port(), first_);
    return server->tls_stats().failed > failed;
  }));
  EXPECT_TRUE(NewConnectionTrusts(server->port(), first_));

  // The rotation finishes: the new pair is taken.
  Install(second);
  EXPECT_TRUE(Eventually([&] { return NewConnectionTrusts(server->port(), second); }));
  EXPECT_EQ(server->tls_stats().reloaded, 1u);
}

TEST_F(HttpServerTlsTest, StartRefusesFilesThatDoNotLoad) {
  const auto start_code = [&](HttpServerOptions o) {
    return HttpServer::Start(std::move(o), Hello()).status().code();
  };
  HttpServerOptions missing = Options();
  missing.tls->cert_file = dir_ + "/nope.crt";
  EXPECT_EQ(start_code(missing), absl::StatusCode::kInvalidArgument);
  HttpServerOptions empty = Options();
  empty.tls->key_file = "";
  EXPECT_EQ(start_code(empty), absl::StatusCode::kInvalidArgument);
  HttpServerOptions no_reload = Options(absl::ZeroDuration());
  EXPECT_EQ(start_code(no_reload), absl::StatusCode::kInvalidArgument);

  const testing::TestCertificates other = Generate();
  ASSERT_TRUE(testing::WritePemFile(dir_ + "/other.key", other.server_key_pem).ok());
  HttpServerOptions mismatched = Options();
  mismatched.tls->key_file = dir_ + "/other.key";
  const absl::Status s = HttpServer::Start(mismatched, Hello()).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("other.key"), absl::string_view::npos) << s;

  ASSERT_TRUE(
      testing::WritePemFile(dir_ + "/garbage.crt", "-----BEGIN CERTIFICATE-----\nxx\n").ok());
  HttpServerOptions garbage = Options();
  garbage.tls->cert_file = dir_ + "/garbage.crt";
  EXPECT_EQ(start_code(garbage), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace tb::http
