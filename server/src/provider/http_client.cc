#include "server/src/provider/http_client.h"

// The only file of tb_provider that knows Boost.Beast/Asio and OpenSSL.
//
// Synchronous by design: provider calls run on worker threads, never on gRPC or HTTP-front
// threads, and a provider call, once sent, is never cancelled (DESIGN.md). Each connection owns a
// small io_context; a call starts one Beast operation with the tcp_stream's expiry set to the
// deadline and runs that io_context on the calling thread until the operation completes. So every
// read, write, connect and handshake is bounded, without a thread per call.
//
// Every Asio/Beast/OpenSSL call uses its error_code overload; what can still throw (allocation,
// ssl::context construction) is caught at the public entry points, so no exception leaves this
// file.

#include <poll.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <exception>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <openssl/ssl.h>
#include <openssl/x509.h>
#include <openssl/x509_vfy.h>
#include <openssl/x509v3.h>
#include <spdlog/spdlog.h>
#include <boost/asio/connect.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/address.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/ssl/context.hpp>
#include <boost/asio/ssl/error.hpp>
#include <boost/asio/ssl/host_name_verification.hpp>
#include <boost/asio/ssl/stream.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/strings/ascii.h"
#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "server/src/common/mutex.h"
#include "server/src/common/status_macros.h"
#include "server/src/provider/internal/http_util.h"

namespace tb::provider {

std::string HttpResponse::Header(absl::string_view name) const {
  for (const auto& [key, value] : headers) {
    if (absl::EqualsIgnoreCase(key, name)) {
      return value;
    }
  }
  return "";
}

namespace {

namespace beast = boost::beast;
namespace bhttp = boost::beast::http;
namespace net = boost::asio;
namespace ssl = boost::asio::ssl;
using tcp = net::ip::tcp;

constexpr size_t kMaxResponseBody = 1024 * 1024;
// Zendesk's answers carry long security headers; Beast's default 8 KiB is tight.
constexpr uint32_t kMaxResponseHeader = 64 * 1024;
constexpr std::string_view kUserAgent = "token-broker";
// Asio timers take steady_clock time points; an infinite absl deadline becomes "a day".
constexpr absl::Duration kLongestWait = absl::Hours(24);

template <typename S>
std::string ToString(const S& s) {
  return std::string(s.data(), s.size());
}

beast::string_view ToBeast(absl::string_view s) { return beast::string_view(s.data(), s.size()); }

std::chrono::steady_clock::time_point SteadyDeadline(absl::Time deadline) {
  const absl::Duration left =
      std::clamp(deadline - absl::Now(), absl::ZeroDuration(), kLongestWait);
  return std::chrono::steady_clock::now() +
         std::chrono::duration_cast<std::chrono::steady_clock::duration>(
             absl::ToChronoNanoseconds(left));
}

// Maps an Asio/Beast error to a status. `deadline_bound`: the expiry that fired was the caller's
// deadline (DEADLINE_EXCEEDED), not the shorter connect timeout (UNAVAILABLE: the host is slow or
// unreachable, and trying again later may work).
absl::Status FromError(absl::string_view what, const beast::error_code& ec, bool deadline_bound) {
  if (ec == beast::error::timeout) {
    return deadline_bound ? absl::DeadlineExceededError(absl::StrCat(what, ": deadline exceeded"))
                          : absl::UnavailableError(absl::StrCat(what, ": timed out"));
  }
  if (ec == bhttp::error::body_limit) {
    return absl::UnavailableError(absl::StrCat(what, ": response body larger than 1 MiB"));
  }
  if (ec == bhttp::error::header_limit) {
    return absl::UnavailableError(absl::StrCat(what, ": response header larger than 64 KiB"));
  }
  return absl::UnavailableError(absl::StrCat(what, ": ", ec.message()));
}

// Header names are tokens; values carry no CR, LF or NUL (no header injection).
bool IsValidHeader(absl::string_view name, absl::string_view value) {
  if (name.empty()) {
    return false;
  }
  for (const char c : name) {
    if (!absl::ascii_isalnum(static_cast<unsigned char>(c)) && c != '-' && c != '_') {
      return false;
    }
  }
  return value.find_first_of(absl::string_view("\r\n\0", 3)) == absl::string_view::npos;
}

// Runs `ioc` on this thread until the operation `start` launched completes. Every operation runs
// under a tcp_stream expiry, so this returns by the deadline at the latest.
template <typename Start>
beast::error_code RunOp(net::io_context& ioc, Start&& start) {
  std::optional<beast::error_code> result;
  std::forward<Start>(start)([&result](beast::error_code ec, auto&&...) { result = ec; });
  ioc.restart();
  ioc.run();
  return result.value_or(beast::error_code(net::error::operation_aborted));
}

// One TCP connection, TLS or not, with the io_context its operations run on. Used by one call at
// a time: checked out of the pool, used, returned.
struct Connection {
  // Declared first, destroyed last: the streams below are bound to it.
  net::io_context ioc{1};
  std::optional<beast::tcp_stream> plain;
  std::optional<ssl::stream<beast::tcp_stream>> tls;
  beast::flat_buffer buffer;
  absl::Time idle_since = absl::InfinitePast();

  beast::tcp_stream& lowest() { return tls ? beast::get_lowest_layer(*tls) : *plain; }

  // Runs `op(stream, handler)` on whichever stream this connection has.
  template <typename Op>
  beast::error_code Run(Op&& op) {
    return RunOp(ioc, [&](auto handler) {
      if (tls) {
        op(*tls, std::move(handler));
      } else {
        op(*plain, std::move(handler));
      }
    });
  }

  // A pooled connection is worth reusing only if the peer has not closed it and nothing is
  // waiting to be read: poll() reports FIN, RST and stray bytes alike as readable. This catches
  // almost every stale connection before a request (which may be a POST we must not resend) is
  // written to it.
  bool LooksReusable() {
    if (buffer.size() != 0 || !lowest().socket().is_open()) {
      return false;
    }
    if (tls && SSL_pending(tls->native_handle()) > 0) {
      return false;
    }
    pollfd pfd{};
    pfd.fd = lowest().socket().native_handle();
    pfd.events = POLLIN;
    return ::poll(&pfd, 1, 0) == 0;
  }
};

// The outcome of one request on one connection.
struct Outcome {
  absl::StatusOr<HttpResponse> response = absl::UnknownError("not sent");
  bool nothing_read = false;  // failed before any response byte arrived
  bool reusable = false;      // keep-alive: the connection may go back to the pool
};

// Sets SNI and host-name verification. For a name, OpenSSL checks the certificate's DNS names
// during chain verification (X509_VERIFY_PARAM_set1_host, which reports a precise
// "hostname mismatch"); for an IP address it checks the IP SANs (set1_ip_asc), and no SNI is
// sent (RFC 6066 forbids addresses there). Asio's host_name_verification repeats the leaf check
// in the verify callback, as a second lock on the same door.
absl::Status ConfigureTls(ssl::stream<beast::tcp_stream>& stream, const std::string& host) {
  beast::error_code ec;
  net::ip::make_address(host, ec);
  const bool is_ip = !ec;
  SSL* ssl = stream.native_handle();
  if (!is_ip && SSL_set_tlsext_host_name(ssl, host.c_str()) != 1) {
    return absl::InternalError("TLS: setting SNI failed");
  }
  X509_VERIFY_PARAM* param = SSL_get0_param(ssl);
  if (is_ip) {
    if (X509_VERIFY_PARAM_set1_ip_asc(param, host.c_str()) != 1) {
      return absl::InternalError("TLS: setting the expected IP address failed");
    }
  } else {
    X509_VERIFY_PARAM_set_hostflags(param, X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS);
    if (X509_VERIFY_PARAM_set1_host(param, host.c_str(), host.size()) != 1) {
      return absl::InternalError("TLS: setting the expected host name failed");
    }
  }
  stream.set_verify_mode(ssl::verify_peer, ec);
  if (!ec) {
    stream.set_verify_callback(ssl::host_name_verification(host), ec);
  }
  if (ec) {
    return absl::InternalError(absl::StrCat("TLS: ", ec.message()));
  }
  return absl::OkStatus();
}

class HttpClientImpl final : public HttpClient {
 public:
  HttpClientImpl(HttpClientOptions options, std::unique_ptr<ssl::context> tls,
                 std::optional<internal::ProxyConfig> proxy)
      : options_(std::move(options)), tls_(std::move(tls)), proxy_(std::move(proxy)) {}

  absl::StatusOr<HttpResponse> Send(const HttpRequest& request, absl::Time deadline) override
      ABSL_LOCKS_EXCLUDED(mu_) {
    try {
      return SendImpl(request, deadline);
    } catch (const std::exception& e) {
      return absl::InternalError(absl::StrCat("HTTP client: ", e.what()));
    }
  }

  HttpClientStats stats() const override {
    HttpClientStats s;
    s.requests = requests_.load();
    s.connections_opened = opened_.load();
    s.connections_reused = reused_.load();
    s.retries = retries_.load();
    return s;
  }

 private:
  absl::StatusOr<HttpResponse> SendImpl(const HttpRequest& request, absl::Time deadline)
      ABSL_LOCKS_EXCLUDED(mu_) {
    TB_ASSIGN_OR_RETURN(const internal::ParsedUrl url, internal::ParseHttpUrl(request.url));
    const bhttp::verb verb = bhttp::string_to_verb(ToBeast(request.method));
    if (verb == bhttp::verb::unknown || verb == bhttp::verb::connect) {
      return absl::InvalidArgumentError(
          absl::StrCat("unsupported HTTP method '", absl::CEscape(request.method), "'"));
    }
    bhttp::request<bhttp::string_body> req(verb, ToBeast(url.target), 11);
    req.set(bhttp::field::host, ToBeast(url.host_header));
    req.set(bhttp::field::user_agent, kUserAgent);
    for (const auto& [name, value] : request.headers) {
      if (!IsValidHeader(name, value)) {
        return absl::InvalidArgumentError(
            absl::StrCat("invalid HTTP header '", absl::CEscape(name), "'"));
      }
      req.set(ToBeast(name), ToBeast(value));
    }
    req.body() = request.body;
    req.prepare_payload();
    req.keep_alive(true);
    const bool head = verb == bhttp::verb::head;
    const bool idempotent = head || verb == bhttp::verb::get || verb == bhttp::verb::delete_;

    if (absl::Now() >= deadline) {
      return absl::DeadlineExceededError(
          absl::StrCat(url.authority, ": deadline exceeded before sending"));
    }
    requests_.fetch_add(1);
    std::unique_ptr<Connection> conn = TakeIdle(url.origin);
    const bool pooled = conn != nullptr;
    if (pooled) {
      reused_.fetch_add(1);
    } else {
      TB_ASSIGN_OR_RETURN(conn, Connect(url, deadline));
    }
    Outcome out = Exchange(*conn, req, url, deadline, head);
    // A keep-alive connection can die between our liveness check and the write (the server's
    // idle timeout). Resending is safe only when the server cannot have acted on the request:
    // nothing came back, and the method is idempotent. Never a POST: the token endpoint may
    // already have rotated the refresh token.
    if (!out.response.ok() && pooled && out.nothing_read && idempotent &&
        out.response.status().code() == absl::StatusCode::kUnavailable) {
      retries_.fetch_add(1);
      spdlog::debug("http client: pooled connection to {} was dead, retrying {} once",
                    url.authority, request.method);
      conn.reset();
      TB_ASSIGN_OR_RETURN(conn, Connect(url, deadline));
      out = Exchange(*conn, req, url, deadline, head);
    }
    if (out.response.ok() && out.reusable) {
      PutIdle(url.origin, std::move(conn));
    }
    return std::move(out.response);
  }

  // A new connection to `url` (through the proxy's CONNECT tunnel when one applies), TLS
  // handshake done for https.
  absl::StatusOr<std::unique_ptr<Connection>> Connect(const internal::ParsedUrl& url,
                                                      absl::Time deadline) {
    const absl::Time connect_deadline = std::min(deadline, absl::Now() + options_.connect_timeout);
    const bool deadline_bound = connect_deadline == deadline;
    const bool via_proxy = url.tls && proxy_.has_value() &&
                           !internal::BypassProxy(options_.no_proxy, url.host, url.port);
    const std::string& dial_host = via_proxy ? proxy_->host : url.host;
    const uint16_t dial_port = via_proxy ? proxy_->port : url.port;
    const std::string dial_name =
        via_proxy ? absl::StrCat("proxy ", dial_host, ":", dial_port) : url.authority;

    auto conn = std::make_unique<Connection>();
    beast::error_code ec;
    // Synchronous: asio's asynchronous resolver starts a thread per io_context, and pooled
    // connections each have one. The system resolver has its own timeouts.
    tcp::resolver resolver(conn->ioc);
    const tcp::resolver::results_type endpoints =
        resolver.resolve(dial_host, std::to_string(dial_port), ec);
    if (ec) {
      return absl::UnavailableError(absl::StrCat("resolving ", dial_name, ": ", ec.message()));
    }
    if (absl::Now() >= connect_deadline) {
      return FromError(absl::StrCat("connecting to ", dial_name), beast::error::timeout,
                       deadline_bound);
    }
    beast::tcp_stream tcp(conn->ioc);
    tcp.expires_at(SteadyDeadline(connect_deadline));
    ec = RunOp(conn->ioc, [&](auto handler) { tcp.async_connect(endpoints, std::move(handler)); });
    if (ec) {
      return FromError(absl::StrCat("connecting to ", dial_name), ec, deadline_bound);
    }
    opened_.fetch_add(1);
    tcp.socket().set_option(tcp::no_delay(true), ec);  // best effort

    if (via_proxy) {
      TB_RETURN_IF_ERROR(Tunnel(*conn, tcp, url, deadline_bound));
    }
    if (!url.tls) {
      conn->plain.emplace(std::move(tcp));
      return conn;
    }
    conn->tls.emplace(std::move(tcp), *tls_);
    TB_RETURN_IF_ERROR(ConfigureTls(*conn->tls, url.host));
    ec = RunOp(conn->ioc, [&](auto handler) {
      conn->tls->async_handshake(ssl::stream_base::client, std::move(handler));
    });
    if (ec) {
      std::string what = absl::StrCat("TLS handshake with ", url.authority);
      const long verify = SSL_get_verify_result(conn->tls->native_handle());
      if (verify != X509_V_OK) {
        absl::StrAppend(&what,
                        " (certificate verification: ", X509_verify_cert_error_string(verify), ")");
      }
      return FromError(what, ec, deadline_bound);
    }
    return conn;
  }

  // Opens an HTTP CONNECT tunnel to `url` through the proxy `tcp` is connected to.
  absl::Status Tunnel(Connection& conn, beast::tcp_stream& tcp, const internal::ParsedUrl& url,
                      bool deadline_bound) {
    const std::string what =
        absl::StrCat("CONNECT ", url.authority, " via proxy ", proxy_->host, ":", proxy_->port);
    bhttp::request<bhttp::empty_body> req(bhttp::verb::connect, ToBeast(url.authority), 11);
    req.set(bhttp::field::host, ToBeast(url.authority));
    req.set(bhttp::field::user_agent, kUserAgent);
    if (!proxy_->authorization.empty()) {
      req.set(bhttp::field::proxy_authorization, ToBeast(proxy_->authorization));
    }
    beast::error_code ec =
        RunOp(conn.ioc, [&](auto handler) { bhttp::async_write(tcp, req, std::move(handler)); });
    if (ec) {
      return FromError(what, ec, deadline_bound);
    }
    // A 2xx answer to CONNECT has no body (RFC 9110 9.3.6): skip() tells the parser so.
    bhttp::response_parser<bhttp::empty_body> parser;
    parser.skip(true);
    beast::flat_buffer buffer;
    ec = RunOp(conn.ioc,
               [&](auto handler) { bhttp::async_read(tcp, buffer, parser, std::move(handler)); });
    if (ec) {
      return FromError(what, ec, deadline_bound);
    }
    const int status = parser.get().result_int();
    if (status < 200 || status > 299) {
      return absl::UnavailableError(absl::StrCat(what, ": proxy answered HTTP ", status));
    }
    if (buffer.size() != 0) {
      return absl::UnavailableError(absl::StrCat(what, ": proxy sent data before the tunnel"));
    }
    return absl::OkStatus();
  }

  // Writes `req` and reads the response on `conn`, all under `deadline`.
  Outcome Exchange(Connection& conn, bhttp::request<bhttp::string_body>& req,
                   const internal::ParsedUrl& url, absl::Time deadline, bool head) {
    Outcome out;
    conn.lowest().expires_at(SteadyDeadline(deadline));
    beast::error_code ec = conn.Run(
        [&](auto& stream, auto handler) { bhttp::async_write(stream, req, std::move(handler)); });
    if (ec) {
      out.nothing_read = true;
      out.response = FromError(absl::StrCat("sending request to ", url.authority), ec, true);
      return out;
    }
    bhttp::response_parser<bhttp::string_body> parser;
    parser.body_limit(kMaxResponseBody);
    parser.header_limit(kMaxResponseHeader);
    if (head) {
      parser.skip(true);
    }
    ec = conn.Run([&](auto& stream, auto handler) {
      bhttp::async_read(stream, conn.buffer, parser, std::move(handler));
    });
    if (ec) {
      out.nothing_read = !parser.got_some() && conn.buffer.size() == 0;
      out.response = FromError(absl::StrCat("reading response from ", url.authority), ec, true);
      return out;
    }
    bhttp::response<bhttp::string_body>& res = parser.get();
    HttpResponse response;
    response.status = static_cast<int>(res.result_int());
    for (const auto& field : res) {
      response.headers.emplace_back(ToString(field.name_string()), ToString(field.value()));
    }
    out.reusable = res.keep_alive() && !parser.need_eof() && conn.buffer.size() == 0;
    response.body = std::move(res.body());
    out.response = std::move(response);
    return out;
  }

  // The most recently used live idle connection to `origin`, or nullptr. Expired and dead
  // connections met on the way are closed (outside the lock).
  std::unique_ptr<Connection> TakeIdle(const std::string& origin) ABSL_LOCKS_EXCLUDED(mu_) {
    while (true) {
      std::unique_ptr<Connection> conn;
      {
        MutexLock lock(&mu_);
        const auto it = idle_.find(origin);
        if (it == idle_.end() || it->second.empty()) {
          return nullptr;
        }
        conn = std::move(it->second.back());
        it->second.pop_back();
      }
      if (absl::Now() - conn->idle_since < options_.idle_timeout && conn->LooksReusable()) {
        return conn;
      }
      // Closed here, outside the lock; the loop tries the next one.
    }
  }

  void PutIdle(const std::string& origin, std::unique_ptr<Connection> conn)
      ABSL_LOCKS_EXCLUDED(mu_) {
    if (options_.max_idle_per_host == 0) {
      return;
    }
    const absl::Time now = absl::Now();
    conn->idle_since = now;
    std::vector<std::unique_ptr<Connection>> to_close;
    {
      MutexLock lock(&mu_);
      idle_[origin].push_back(std::move(conn));
      // Sweep every origin: a host we stop calling must not keep its sockets open forever.
      for (auto& [key, conns] : idle_) {
        while (!conns.empty() && (conns.size() > options_.max_idle_per_host ||
                                  now - conns.front()->idle_since >= options_.idle_timeout)) {
          to_close.push_back(std::move(conns.front()));
          conns.erase(conns.begin());
        }
      }
    }
    // to_close's connections are closed here, outside the lock.
  }

  const HttpClientOptions options_;
  const std::unique_ptr<ssl::context> tls_;  // outlives the pooled connections below
  const std::optional<internal::ProxyConfig> proxy_;

  mutable Mutex mu_;
  std::map<std::string, std::vector<std::unique_ptr<Connection>>> idle_ ABSL_GUARDED_BY(mu_);

  std::atomic<uint64_t> requests_{0};
  std::atomic<uint64_t> opened_{0};
  std::atomic<uint64_t> reused_{0};
  std::atomic<uint64_t> retries_{0};
};

}  // namespace

absl::StatusOr<std::unique_ptr<HttpClient>> HttpClient::Create(HttpClientOptions options) {
  if (options.connect_timeout <= absl::ZeroDuration()) {
    return absl::InvalidArgumentError("HTTP client: connect_timeout must be positive");
  }
  try {
    std::optional<internal::ProxyConfig> proxy;
    if (!options.https_proxy.empty()) {
      TB_ASSIGN_OR_RETURN(proxy, internal::ParseProxyUrl(options.https_proxy));
    }
    auto tls = std::make_unique<ssl::context>(ssl::context::tls_client);
    if (SSL_CTX_set_min_proto_version(tls->native_handle(), TLS1_2_VERSION) != 1) {
      return absl::InternalError("TLS: cannot require TLS 1.2");
    }
    beast::error_code ec;
    tls->set_default_verify_paths(ec);
    if (ec && options.ca_file.empty()) {
      return absl::InvalidArgumentError(
          absl::StrCat("TLS: cannot load the system trust store: ", ec.message()));
    }
    if (!options.ca_file.empty()) {
      tls->load_verify_file(options.ca_file, ec);
      if (ec) {
        return absl::InvalidArgumentError(
            absl::StrCat("TLS: cannot load CA file '", options.ca_file, "': ", ec.message()));
      }
    }
    tls->set_verify_mode(ssl::verify_peer, ec);
    if (ec) {
      return absl::InternalError(absl::StrCat("TLS: ", ec.message()));
    }
    return std::unique_ptr<HttpClient>(
        new HttpClientImpl(std::move(options), std::move(tls), std::move(proxy)));
  } catch (const std::exception& e) {
    return absl::InternalError(absl::StrCat("HTTP client setup: ", e.what()));
  }
}

}  // namespace tb::provider
