#include "server/src/http/http_server.h"

// The only file that knows Boost.Beast/Asio. Shaped after Beast's "advanced server" example: an
// acceptor on its own strand, one strand per connection (the tcp_stream's executor), a parser with
// header and body limits, a timeout on every read and write, and a pure handler that never touches
// a socket. Every Asio/Beast call uses its error_code overload; what can still throw (allocation,
// std::thread, the handler) is caught so no exception leaves an io thread or this file.
//
// HTTPS: Session is a template over the stream (plain TCP, or TLS over it); everything but the
// handshake and the orderly close is the same code. TlsContexts holds the current ssl::context;
// each TLS session keeps a shared_ptr to the context it was accepted with, so a certificate
// reload (a new context for new connections) never touches a connection already open.

#include <algorithm>
#include <array>
#include <atomic>
#include <cassert>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <fstream>
#include <iterator>
#include <limits>
#include <optional>
#include <string>
#include <string_view>
#include <system_error>
#include <thread>
#include <unordered_map>
#include <utility>
#include <vector>

#include <openssl/crypto.h>
#include <openssl/ssl.h>
#include <spdlog/spdlog.h>
#include <sys/stat.h>

#include <boost/asio/dispatch.hpp>
#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/ssl.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/strand.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <boost/beast/ssl.hpp>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "server/src/common/logging.h"
#include "server/src/common/mutex.h"
#include "server/src/common/status_macros.h"

namespace tb::http {
namespace {

namespace beast = boost::beast;
namespace bhttp = boost::beast::http;
namespace net = boost::asio;
namespace ssl = boost::asio::ssl;
using tcp = net::ip::tcp;

constexpr std::string_view kServerHeader = "token-broker";
// Read granularity while waiting for the next keep-alive request or discarding input.
constexpr size_t kReadChunk = 4096;
// After an error response we keep reading (and discarding) for a bounded time and volume before
// closing: closing a socket with unread input makes the kernel send RST, which can destroy the
// error response in the client's receive buffer before the client reads it ("lingering close").
constexpr absl::Duration kMaxLinger = absl::Seconds(2);
constexpr size_t kMaxLingerBytes = 1024 * 1024;
// A failed accept (EMFILE, ENFILE, ENOBUFS) is retried after a pause: retrying at once would spin.
constexpr std::chrono::milliseconds kAcceptRetryDelay(50);
// Longest path written to the debug log.
constexpr size_t kMaxLoggedPath = 200;
// Fields every response carries unless the handler set its own value. Nothing served here is
// meant to run script, load anything, be framed, be cached, or leak its URL (OAuth codes and
// state live in query strings) through Referer; a route that needs more says so itself.
constexpr std::array<std::pair<std::string_view, std::string_view>, 4> kDefaultFields = {{
    {"Cache-Control", "no-store"},
    {"Content-Security-Policy", "default-src 'none'; frame-ancestors 'none'"},
    {"Referrer-Policy", "no-referrer"},
    {"X-Frame-Options", "DENY"},
}};
// A TLS handshake or close_notify exchange gets at most this long (and never more than
// read_timeout).
constexpr absl::Duration kMaxTlsShutdown = absl::Seconds(2);
// Certificate and key files larger than this are not certificates and keys.
constexpr std::streamsize kMaxPemFileBytes = 1024 * 1024;

std::string ToString(beast::string_view s) { return std::string(s.data(), s.size()); }

std::chrono::steady_clock::duration ToChrono(absl::Duration d) {
  return std::chrono::duration_cast<std::chrono::steady_clock::duration>(
      absl::ToChronoNanoseconds(d));
}

std::string EndpointString(const tcp::endpoint& ep) {
  const std::string host = ep.address().to_string();
  if (ep.address().is_v6()) {
    return absl::StrCat("[", host, "]:", ep.port());
  }
  return absl::StrCat(host, ":", ep.port());
}

// ASCII case-insensitive equality. Not absl::EqualsIgnoreCase: Debian's Abseil has its own
// absl::string_view, which does not convert from std::string_view.
bool EqualsIgnoreCase(std::string_view a, std::string_view b) {
  return beast::iequals(beast::string_view(a.data(), a.size()),
                        beast::string_view(b.data(), b.size()));
}

// RFC 9110 5.6.2 token characters: what a header field name may contain.
bool IsTokenChar(char c) {
  if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9')) {
    return true;
  }
  return std::string_view("!#$%&'*+-.^_`|~").find(c) != std::string_view::npos;
}

bool IsValidFieldName(std::string_view name) {
  return !name.empty() && std::all_of(name.begin(), name.end(), IsTokenChar);
}

// No control characters other than HTAB: a CR or LF here would let a value inject header lines.
bool IsValidFieldValue(std::string_view value) {
  return std::none_of(value.begin(), value.end(), [](char c) {
    const auto u = static_cast<unsigned char>(c);
    return (u < 0x20 && c != '\t') || u == 0x7f;
  });
}

// Fields the server sets itself; a handler's copy of them is ignored.
bool IsServerOwnedField(std::string_view name) {
  for (std::string_view owned : {"Content-Length", "Transfer-Encoding", "Connection", "Keep-Alive",
                                 "Server", "Content-Type", "X-Content-Type-Options"}) {
    if (EqualsIgnoreCase(name, owned)) {
      return true;
    }
  }
  return false;
}

// Why a handler's response cannot be sent as is, or empty if it can.
std::string InvalidResponseReason(const HttpResponse& res) {
  if (res.status < 200 || res.status > 599) {
    return absl::StrCat("status ", res.status, " out of range");
  }
  if (!IsValidFieldValue(res.content_type)) {
    return "invalid content type";
  }
  for (const auto& [name, value] : res.headers) {
    if (!IsValidFieldName(name) || !IsValidFieldValue(value)) {
      return "invalid header field";
    }
  }
  return "";
}

HttpResponse PlainResponse(int status, std::string body) {
  HttpResponse res;
  res.status = status;
  res.body = std::move(body);
  return res;
}

// The response to a request the parser rejected, or 0 when `ec` is a transport condition (peer
// gone, timeout, shutdown) after which nothing can or should be sent.
int StatusForReadError(const beast::error_code& ec) {
  static const beast::error_category& kHttpCategory =
      bhttp::make_error_code(bhttp::error::bad_method).category();
  if (ec.category() != kHttpCategory || ec == bhttp::error::end_of_stream ||
      ec == bhttp::error::partial_message) {
    return 0;
  }
  if (ec == bhttp::error::header_limit) {
    return 431;
  }
  if (ec == bhttp::error::body_limit) {
    return 413;
  }
  return 400;
}

using BeastResponse = bhttp::response<bhttp::string_body>;

// Turns the handler's plain response into the Beast message put on the wire.
void BuildResponse(HttpResponse in, bool head, unsigned version, bool keep_alive,
                   BeastResponse* out) {
  BeastResponse& res = *out;
  res = BeastResponse();
  res.version(version);
  res.result(static_cast<unsigned>(in.status));
  res.set(bhttp::field::server, kServerHeader);
  res.set(bhttp::field::content_type, in.content_type);
  std::array<bool, kDefaultFields.size()> handler_set{};
  for (const auto& [name, value] : in.headers) {
    if (IsServerOwnedField(name)) {
      continue;
    }
    for (size_t i = 0; i < kDefaultFields.size(); ++i) {
      handler_set[i] = handler_set[i] || EqualsIgnoreCase(name, kDefaultFields[i].first);
    }
    res.insert(name, value);
  }
  res.set("X-Content-Type-Options", "nosniff");
  for (size_t i = 0; i < kDefaultFields.size(); ++i) {
    if (!handler_set[i]) {
      res.set(kDefaultFields[i].first, kDefaultFields[i].second);
    }
  }
  // 204 and 304 never carry a body nor (here) a Content-Length. HEAD keeps the Content-Length of
  // the GET it mirrors but sends no body. prepare_payload() is not used: it would reset the HEAD
  // Content-Length to 0.
  if (in.status != 204 && in.status != 304) {
    res.content_length(in.body.size());
    if (!head) {
      res.body() = std::move(in.body);
    }
  }
  res.keep_alive(keep_alive);
}

// What identifies one version of a file on disk: cert-manager (and a Kubernetes Secret volume)
// replaces files by renaming, which changes the inode; an in-place rewrite changes mtime or size.
struct FileStamp {
  dev_t dev = 0;
  ino_t ino = 0;
  int64_t mtime_ns = 0;
  off_t size = 0;
  bool operator==(const FileStamp&) const = default;
};

absl::StatusOr<FileStamp> StampOf(const std::string& path) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("'", path, "': ", std::error_code(errno, std::generic_category()).message()));
  }
  return FileStamp{st.st_dev, st.st_ino,
                   static_cast<int64_t>(st.st_mtim.tv_sec) * 1'000'000'000 + st.st_mtim.tv_nsec,
                   st.st_size};
}

absl::StatusOr<std::string> ReadSmallFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    return absl::InvalidArgumentError(absl::StrCat("cannot open '", path, "'"));
  }
  std::string data;
  data.resize(static_cast<size_t>(kMaxPemFileBytes) + 1);
  in.read(data.data(), kMaxPemFileBytes + 1);
  if (in.bad()) {
    return absl::InvalidArgumentError(absl::StrCat("cannot read '", path, "'"));
  }
  data.resize(static_cast<size_t>(in.gcount()));
  if (data.size() > static_cast<size_t>(kMaxPemFileBytes)) {
    return absl::InvalidArgumentError(absl::StrCat("'", path, "' is larger than 1 MiB"));
  }
  return data;
}

// Overwrites a string that held a private key before it is freed.
struct Cleansed {
  std::string& s;
  ~Cleansed() { OPENSSL_cleanse(s.data(), s.size()); }
};

// A server TLS context for the pair: TLS 1.2+, no compression or renegotiation, the server's
// cipher preference. Errors: kInvalidArgument naming the file at fault.
absl::StatusOr<std::shared_ptr<ssl::context>> LoadTlsContext(const HttpTlsOptions& tls) {
  TB_ASSIGN_OR_RETURN(std::string cert, ReadSmallFile(tls.cert_file));
  TB_ASSIGN_OR_RETURN(std::string key, ReadSmallFile(tls.key_file));
  const Cleansed cleanse_key{key};
  std::shared_ptr<ssl::context> ctx;
  try {
    ctx = std::make_shared<ssl::context>(ssl::context::tls_server);
  } catch (const std::exception& e) {  // SSL_CTX_new failed (out of memory)
    return absl::InternalError(absl::StrCat("TLS context: ", e.what()));
  }
  SSL_CTX* native = ctx->native_handle();
  if (SSL_CTX_set_min_proto_version(native, TLS1_2_VERSION) != 1) {
    return absl::InternalError("TLS context: cannot require TLS 1.2");
  }
  SSL_CTX_set_options(
      native, SSL_OP_NO_COMPRESSION | SSL_OP_NO_RENEGOTIATION | SSL_OP_CIPHER_SERVER_PREFERENCE);
  // An encrypted key must fail to load, not make OpenSSL prompt for a passphrase on a terminal.
  SSL_CTX_set_default_passwd_cb(native, [](char*, int, int, void*) { return 0; });
  beast::error_code ec;
  ctx->use_certificate_chain(net::buffer(cert), ec);
  if (ec) {
    return absl::InvalidArgumentError(absl::StrCat(
        "certificate file '", tls.cert_file, "' has no usable PEM certificate: ", ec.message()));
  }
  ctx->use_private_key(net::buffer(key), ssl::context::pem, ec);
  if (ec) {
    return absl::InvalidArgumentError(absl::StrCat(
        "key file '", tls.key_file, "' has no usable unencrypted PEM key: ", ec.message()));
  }
  if (SSL_CTX_check_private_key(native) != 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        "key file '", tls.key_file, "' does not match certificate file '", tls.cert_file, "'"));
  }
  return ctx;
}

// The TLS context new connections get, reloaded when the files change. Thread-safe.
class TlsContexts {
 public:
  // Loads the pair. Errors: those of LoadTlsContext.
  static absl::StatusOr<std::unique_ptr<TlsContexts>> Create(HttpTlsOptions tls, std::string name) {
    TB_ASSIGN_OR_RETURN(const FileStamp cert, StampOf(tls.cert_file));
    TB_ASSIGN_OR_RETURN(const FileStamp key, StampOf(tls.key_file));
    TB_ASSIGN_OR_RETURN(std::shared_ptr<ssl::context> ctx, LoadTlsContext(tls));
    return std::unique_ptr<TlsContexts>(
        new TlsContexts(std::move(tls), std::move(name), std::move(ctx), {cert, key}));
  }

  // The context for a connection accepted now. At most once per reload_interval, first looks
  // whether the files changed and, if so, loads them (outside the lock; a concurrent caller gets
  // the current context meanwhile).
  std::shared_ptr<ssl::context> Current() ABSL_LOCKS_EXCLUDED(mu_) {
    const auto now = std::chrono::steady_clock::now();
    Stamps seen;
    {
      tb::MutexLock lock(&mu_);
      if (now < next_check_ || checking_) {
        return current_;
      }
      checking_ = true;
      next_check_ = now + ToChrono(tls_.reload_interval);
    }
    absl::StatusOr<FileStamp> cert = StampOf(tls_.cert_file);
    absl::StatusOr<FileStamp> key = StampOf(tls_.key_file);
    absl::StatusOr<std::shared_ptr<ssl::context>> loaded;
    bool attempted = false;
    if (cert.ok() && key.ok()) {
      seen = {*cert, *key};
      tb::MutexLock lock(&mu_);
      attempted = !(seen == loaded_) && !(failed_ && seen == *failed_);
    } else {
      // Mid-rotation a file can be missing for a moment; it is looked at again next interval.
      spdlog::warn("http server {}: TLS files not readable, keeping the current certificate: {}",
                   name_, std::string((!cert.ok() ? cert.status() : key.status()).message()));
    }
    if (attempted) {
      loaded = LoadTlsContext(tls_);
      if (loaded.ok()) {
        spdlog::info("http server {}: loaded a new TLS certificate from '{}'", name_,
                     tls_.cert_file);
      } else {
        spdlog::error(
            "http server {}: new TLS files do not load, keeping the current certificate: "
            "{}",
            name_, std::string(loaded.status().message()));
      }
    }
    tb::MutexLock lock(&mu_);
    checking_ = false;
    if (attempted && loaded.ok()) {
      current_ = *std::move(loaded);
      loaded_ = seen;
      failed_.reset();
      ++stats_.reloaded;
    } else if (attempted) {
      failed_ = seen;  // not retried (nor logged again) until the files change again
      ++stats_.failed;
    }
    return current_;
  }

  TlsReloadStats stats() const ABSL_LOCKS_EXCLUDED(mu_) {
    tb::MutexLock lock(&mu_);
    return stats_;
  }

 private:
  struct Stamps {
    FileStamp cert;
    FileStamp key;
    bool operator==(const Stamps&) const = default;
  };

  TlsContexts(HttpTlsOptions tls, std::string name, std::shared_ptr<ssl::context> ctx,
              Stamps stamps)
      : tls_(std::move(tls)),
        name_(std::move(name)),
        current_(std::move(ctx)),
        loaded_(stamps),
        next_check_(std::chrono::steady_clock::now() + ToChrono(tls_.reload_interval)) {}

  const HttpTlsOptions tls_;
  const std::string name_;
  mutable tb::Mutex mu_;
  std::shared_ptr<ssl::context> current_ ABSL_GUARDED_BY(mu_);
  Stamps loaded_ ABSL_GUARDED_BY(mu_);
  std::optional<Stamps> failed_ ABSL_GUARDED_BY(mu_);
  std::chrono::steady_clock::time_point next_check_ ABSL_GUARDED_BY(mu_);
  bool checking_ ABSL_GUARDED_BY(mu_) = false;
  TlsReloadStats stats_ ABSL_GUARDED_BY(mu_);
};

class SessionBase;

// What the acceptor and every session share: options, handler and the registry of live sessions
// that Stop() closes. Outlives them all (each holds a shared_ptr). Thread-safe.
class ServerCore : public std::enable_shared_from_this<ServerCore> {
 public:
  // `tls` is null for plain HTTP.
  ServerCore(HttpServerOptions options, AsyncHandler handler, std::unique_ptr<TlsContexts> tls)
      : options_(std::move(options)), handler_(std::move(handler)), tls_(std::move(tls)) {}

  const HttpServerOptions& options() const { return options_; }
  TlsContexts* tls() const { return tls_.get(); }

  // Calls the handler; `done` gets its response exactly once, possibly on another thread. A
  // throwing handler or an unsendable response becomes a 500. Never throws.
  void Handle(HttpRequest req, std::function<void(HttpResponse)> done) ABSL_LOCKS_EXCLUDED(mu_) {
    {
      tb::MutexLock lock(&mu_);
      ++pending_;
    }
    auto once = std::make_shared<std::atomic<bool>>(false);
    auto self = shared_from_this();
    Respond respond = [self, once, done = std::move(done)](HttpResponse res) {
      if (once->exchange(true)) {
        return;
      }
      if (std::string reason = InvalidResponseReason(res); !reason.empty()) {
        spdlog::error("http server {}: handler returned an invalid response: {}",
                      self->options_.name, reason);
        res = PlainResponse(500, "internal server error\n");
      }
      done(std::move(res));
      self->Finished();
    };
    try {
      handler_(std::move(req), respond);
      return;
    } catch (const std::exception& e) {
      spdlog::error("http server {}: handler threw: {}", options_.name, e.what());
    } catch (...) {
      spdlog::error("http server {}: handler threw a non-standard exception", options_.name);
    }
    respond(PlainResponse(500, "internal server error\n"));
  }

  // Blocks until every Respond handed out has been called.
  void WaitForPending() ABSL_LOCKS_EXCLUDED(mu_) {
    tb::MutexLock lock(&mu_);
    while (pending_ > 0) {
      pending_done_.Wait(&mu_);
    }
  }

  enum class Admission { kAdmitted, kAtCapacity, kStopping };

  // Admits a new connection unless stopping or at max_connections.
  Admission Register(const std::shared_ptr<SessionBase>& session) ABSL_LOCKS_EXCLUDED(mu_) {
    tb::MutexLock lock(&mu_);
    if (stopping_) {
      return Admission::kStopping;
    }
    if (sessions_.size() >= options_.max_connections) {
      return Admission::kAtCapacity;
    }
    sessions_.emplace(session.get(), session);
    return Admission::kAdmitted;
  }

  void Unregister(const SessionBase* session) ABSL_LOCKS_EXCLUDED(mu_) {
    tb::MutexLock lock(&mu_);
    sessions_.erase(session);
  }

  bool stopping() const ABSL_LOCKS_EXCLUDED(mu_) {
    tb::MutexLock lock(&mu_);
    return stopping_;
  }

  // Marks the server as stopping. Returns true (with the live sessions) only on the first call,
  // so exactly one caller performs the shutdown.
  bool BeginStop(std::vector<std::shared_ptr<SessionBase>>* live) ABSL_LOCKS_EXCLUDED(mu_) {
    tb::MutexLock lock(&mu_);
    if (stopping_) {
      return false;
    }
    stopping_ = true;
    for (const auto& [ptr, weak] : sessions_) {
      if (std::shared_ptr<SessionBase> session = weak.lock()) {
        live->push_back(std::move(session));
      }
    }
    return true;
  }

 private:
  void Finished() ABSL_LOCKS_EXCLUDED(mu_) {
    tb::MutexLock lock(&mu_);
    if (--pending_ == 0) {
      pending_done_.SignalAll();
    }
  }

  const HttpServerOptions options_;
  const AsyncHandler handler_;
  const std::unique_ptr<TlsContexts> tls_;
  mutable tb::Mutex mu_;
  tb::CondVar pending_done_;
  size_t pending_ ABSL_GUARDED_BY(mu_) = 0;
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::unordered_map<const SessionBase*, std::weak_ptr<SessionBase>> sessions_ ABSL_GUARDED_BY(mu_);
};

// What the registry knows of a session: it can be closed from any thread.
class SessionBase {
 public:
  virtual ~SessionBase() = default;
  // Thread-safe: closes the connection on its strand, aborting whatever it is doing.
  virtual void Close() = 0;
};

// One connection: (TLS handshake,) read a request, answer it, repeat while keep-alive. Confined to
// its strand (the executor of the TCP stream); only Run() and Close() may be called from
// elsewhere. Kept alive by the shared_ptr bound into its pending operation, so it dies when its
// last operation completes.
template <bool kTls>
class Session final : public SessionBase, public std::enable_shared_from_this<Session<kTls>> {
 public:
  using Stream = std::conditional_t<kTls, ssl::stream<beast::tcp_stream>, beast::tcp_stream>;

  // `tls_ctx` is null for plain HTTP; a TLS session keeps its context alive for as long as it
  // lives, whatever contexts later connections get.
  Session(tcp::socket&& socket, std::shared_ptr<ServerCore> core,
          std::shared_ptr<ssl::context> tls_ctx)
      : tls_ctx_(std::move(tls_ctx)),
        stream_(MakeStream(std::move(socket), tls_ctx_.get())),
        core_(std::move(core)) {
    beast::error_code ec;
    const tcp::endpoint peer = lowest().socket().remote_endpoint(ec);
    if (!ec) {
      remote_address_ = peer.address().to_string();
    }
  }

  ~Session() override { core_->Unregister(this); }

  Session(const Session&) = delete;
  Session& operator=(const Session&) = delete;

  void Run() {
    // The first request's read budget runs from accept and covers the TLS handshake too: a client
    // that handshakes slowly gets no more time than one that sends slowly.
    first_deadline_ = std::chrono::steady_clock::now() + ToChrono(options().read_timeout);
    if constexpr (kTls) {
      net::dispatch(stream_.get_executor(),
                    beast::bind_front_handler(&Session::Handshake, this->shared_from_this()));
    } else {
      net::dispatch(stream_.get_executor(),
                    beast::bind_front_handler(&Session::ReadRequest, this->shared_from_this()));
    }
  }

  void Close() override {
    net::post(stream_.get_executor(),
              beast::bind_front_handler(&Session::CloseNow, this->shared_from_this()));
  }

 private:
  static Stream MakeStream(tcp::socket&& socket, ssl::context* ctx) {
    if constexpr (kTls) {
      return Stream(std::move(socket), *ctx);
    } else {
      (void)ctx;
      return Stream(std::move(socket));
    }
  }

  const HttpServerOptions& options() const { return core_->options(); }
  beast::tcp_stream& lowest() { return beast::get_lowest_layer(stream_); }

  void Handshake() {
    lowest().expires_at(first_deadline_);
    stream_.async_handshake(
        ssl::stream_base::server,
        beast::bind_front_handler(&Session::OnHandshake, this->shared_from_this()));
  }

  void OnHandshake(beast::error_code ec) {
    if (ec) {  // not TLS (plain HTTP to the HTTPS port), no common protocol, timeout, Stop()
      if (ec != net::error::operation_aborted) {
        spdlog::debug("http server {}: TLS handshake failed: {}", options().name, ec.message());
      }
      CloseNow();
      return;
    }
    ReadRequest();
  }

  // Reads one whole request under read_timeout: a client that trickles bytes cannot hold the
  // connection longer than that (slowloris).
  void ReadRequest() {
    if (core_->stopping()) {
      CloseNow();
      return;
    }
    parser_.emplace();
    parser_->header_limit(static_cast<std::uint32_t>(
        std::min<size_t>(options().max_header_bytes, std::numeric_limits<std::uint32_t>::max())));
    parser_->body_limit(static_cast<std::uint64_t>(options().max_body_bytes));
    if (first_request_) {
      first_request_ = false;
      lowest().expires_at(first_deadline_);
    } else {
      lowest().expires_after(ToChrono(options().read_timeout));
    }
    bhttp::async_read(stream_, buffer_, *parser_,
                      beast::bind_front_handler(&Session::OnRequest, this->shared_from_this()));
  }

  void OnRequest(beast::error_code ec, std::size_t /*bytes*/) {
    if (ec) {
      const int status = StatusForReadError(ec);
      if (status == 0) {
        if (ec != bhttp::error::end_of_stream && ec != net::error::operation_aborted) {
          spdlog::debug("http server {}: closing connection: {}", options().name, ec.message());
        }
        CloseNow();
        return;
      }
      // The request cannot be trusted past this point: answer, then close.
      log_method_ = "-";
      log_path_ = "-";
      if (parser_->is_header_done()) {
        log_method_ = ToString(parser_->get().method_string());
        log_path_ = LoggablePath(parser_->get().target());
      }
      received_at_ = std::chrono::steady_clock::now();
      const char* body = status == 431   ? "request header fields too large\n"
                         : status == 413 ? "payload too large\n"
                                         : "bad request\n";
      Write(PlainResponse(status, body), /*head=*/false, /*version=*/11, /*keep_alive=*/false,
            /*linger=*/true);
      return;
    }

    received_at_ = std::chrono::steady_clock::now();
    bhttp::request<bhttp::string_body> req = parser_->release();
    HttpRequest request;
    request.method = ToString(req.method_string());
    request.target = ToString(req.target());
    request.remote_address = remote_address_;
    request.headers.reserve(static_cast<size_t>(std::distance(req.begin(), req.end())));
    for (const auto& field : req) {
      request.headers.emplace_back(ToString(field.name_string()), ToString(field.value()));
    }
    request.body = std::move(req.body());
    log_method_ = request.method;
    log_path_ = LoggablePath(req.target());
    // Every line logged while handling the request carries its id: the client's X-Request-Id
    // when well-formed, else a new one. Kept for the request's access log line (OnWrite).
    const tb::ScopedRequestId request_id(ToString(req["x-request-id"]));
    request_id_ = std::string(tb::CurrentRequestId());

    const bool head = req.method() == bhttp::verb::head;
    const unsigned version = req.version();
    const bool wants_keep_alive = req.keep_alive();
    core_->Handle(std::move(request), [self = this->shared_from_this(), head, version,
                                       wants_keep_alive](HttpResponse response) {
      // Back onto this connection's strand: inline for a synchronous handler, a hop for a
      // response that comes from another thread.
      net::dispatch(self->stream_.get_executor(), [self, head, version, wants_keep_alive,
                                                   response = std::move(response)]() mutable {
        const bool keep_alive = wants_keep_alive && !self->core_->stopping();
        self->Write(std::move(response), head, version, keep_alive, /*linger=*/false);
      });
    });
  }

  void Write(HttpResponse response, bool head, unsigned version, bool keep_alive, bool linger) {
    BuildResponse(std::move(response), head, version, keep_alive, &res_);
    // The write gets the read budget too: a client that stops reading is dropped.
    lowest().expires_after(ToChrono(options().read_timeout));
    bhttp::async_write(
        stream_, res_,
        beast::bind_front_handler(&Session::OnWrite, this->shared_from_this(), keep_alive, linger));
  }

  void OnWrite(bool keep_alive, bool linger, beast::error_code ec, std::size_t /*bytes*/) {
    const tb::ScopedRequestId request_id =
        tb::ScopedRequestId::Resume(std::exchange(request_id_, {}));
    const auto latency = std::chrono::duration_cast<std::chrono::microseconds>(
        std::chrono::steady_clock::now() - received_at_);
    // Path only: the query string may carry OAuth codes and state.
    spdlog::debug("http server {}: {} {} {} {}us{}", options().name, log_method_, log_path_,
                  res_.result_int(), latency.count(), ec ? " (write failed)" : "");
    res_ = BeastResponse();  // free the body now; the next response rebuilds it
    if (ec) {
      CloseNow();
      return;
    }
    if (linger) {
      StartLingeringClose();
      return;
    }
    if (!keep_alive) {
      CloseGracefully();
      return;
    }
    WaitForNextRequest();
  }

  // Between keep-alive requests the client gets idle_timeout to start the next one; once its
  // first bytes arrive, ReadRequest() gives the rest read_timeout.
  void WaitForNextRequest() {
    if (core_->stopping()) {
      CloseNow();
      return;
    }
    if (buffer_.size() > 0) {  // a pipelined request is already buffered
      ReadRequest();
      return;
    }
    lowest().expires_after(ToChrono(options().idle_timeout));
    stream_.async_read_some(
        buffer_.prepare(kReadChunk),
        beast::bind_front_handler(&Session::OnIdleRead, this->shared_from_this()));
  }

  void OnIdleRead(beast::error_code ec, std::size_t bytes) {
    if (ec) {  // idle timeout, peer closed, or Stop()
      CloseNow();
      return;
    }
    buffer_.commit(bytes);
    ReadRequest();
  }

  // After a response with Connection: close. Plain: FIN, then close. TLS: close_notify first
  // (bounded: the peer may never answer it), so the client can tell the end from a truncation.
  void CloseGracefully() {
    if constexpr (kTls) {
      lowest().expires_after(ToChrono(std::min(options().read_timeout, kMaxTlsShutdown)));
      stream_.async_shutdown(
          [self = this->shared_from_this()](beast::error_code) { self->CloseNow(); });
    } else {
      beast::error_code ignored;
      lowest().socket().shutdown(tcp::socket::shutdown_send, ignored);
      CloseNow();
    }
  }

  // After an error response the rest of the request is still arriving. The discard reads raw TCP
  // bytes in both modes: what arrives is of no interest, decrypted or not.
  void StartLingeringClose() {
    beast::error_code ec;
    lowest().socket().shutdown(tcp::socket::shutdown_send, ec);
    if (ec) {
      CloseNow();
      return;
    }
    buffer_.clear();
    lowest().expires_after(ToChrono(std::min(options().read_timeout, kMaxLinger)));
    Discard();
  }

  void Discard() {
    lowest().async_read_some(
        buffer_.prepare(kReadChunk),
        beast::bind_front_handler(&Session::OnDiscard, this->shared_from_this()));
  }

  void OnDiscard(beast::error_code ec, std::size_t bytes) {
    lingered_bytes_ += bytes;
    if (ec || lingered_bytes_ > kMaxLingerBytes) {  // EOF (the normal end), timeout or Stop()
      CloseNow();
      return;
    }
    Discard();  // prepare() hands out the same scratch space again: nothing is committed
  }

  // Cancels any pending operation (it completes with operation_aborted) and closes the socket.
  void CloseNow() {
    beast::error_code ignored;
    lowest().socket().shutdown(tcp::socket::shutdown_both, ignored);
    lowest().close();
  }

  static std::string LoggablePath(beast::string_view target) {
    std::string_view path = RequestPath(std::string_view(target.data(), target.size()));
    if (path.size() > kMaxLoggedPath) {
      return std::string(path.substr(0, kMaxLoggedPath)) + "...";
    }
    return std::string(path);
  }

  // Declared before stream_: the SSL object inside the stream refers to it.
  const std::shared_ptr<ssl::context> tls_ctx_;
  Stream stream_;
  beast::flat_buffer buffer_;
  std::optional<bhttp::request_parser<bhttp::string_body>> parser_;
  BeastResponse res_;  // lives until its write completes
  const std::shared_ptr<ServerCore> core_;
  std::string remote_address_;
  std::chrono::steady_clock::time_point first_deadline_;
  bool first_request_ = true;
  size_t lingered_bytes_ = 0;
  // For the per-request log line.
  std::string log_method_;
  std::string log_path_;
  std::chrono::steady_clock::time_point received_at_;
  std::string request_id_;  // of the request being answered ("" for an unreadable one)
};

// Accepts connections and starts a Session for each. Confined to the acceptor's strand, except
// Run() and Close(). Kept alive by its pending accept (or retry timer); Close() ends both.
class Listener : public std::enable_shared_from_this<Listener> {
 public:
  // `acceptor` is open, bound and listening, with a strand executor on `ioc`.
  Listener(net::io_context& ioc, tcp::acceptor acceptor, std::shared_ptr<ServerCore> core)
      : ioc_(ioc),
        acceptor_(std::move(acceptor)),
        retry_timer_(acceptor_.get_executor()),
        core_(std::move(core)) {}

  Listener(const Listener&) = delete;
  Listener& operator=(const Listener&) = delete;

  void Run() {
    net::dispatch(acceptor_.get_executor(),
                  beast::bind_front_handler(&Listener::DoAccept, shared_from_this()));
  }

  // Thread-safe: stops accepting and closes the listening socket, on the acceptor's strand.
  void Close() {
    net::post(acceptor_.get_executor(), [self = shared_from_this()] {
      beast::error_code ignored;
      self->acceptor_.close(ignored);
      self->retry_timer_.cancel();
    });
  }

 private:
  void DoAccept() {
    if (!acceptor_.is_open()) {
      return;
    }
    // Each connection gets its own strand: its handlers never run concurrently, without a lock.
    acceptor_.async_accept(net::make_strand(ioc_),
                           beast::bind_front_handler(&Listener::OnAccept, shared_from_this()));
  }

  void OnAccept(beast::error_code ec, tcp::socket socket) {
    if (ec) {
      if (ec == net::error::operation_aborted || !acceptor_.is_open()) {
        return;
      }
      spdlog::warn("http server {}: accept failed: {}", core_->options().name, ec.message());
      retry_timer_.expires_after(kAcceptRetryDelay);
      retry_timer_.async_wait(beast::bind_front_handler(&Listener::OnRetry, shared_from_this()));
      return;
    }
    if (TlsContexts* tls = core_->tls(); tls != nullptr) {
      Admit(std::make_shared<Session<true>>(std::move(socket), core_, tls->Current()));
    } else {
      Admit(std::make_shared<Session<false>>(std::move(socket), core_, nullptr));
    }
    DoAccept();
  }

  template <bool kTls>
  void Admit(const std::shared_ptr<Session<kTls>>& session) {
    // A refused session is dropped by the caller: its destructor closes the socket at once.
    switch (core_->Register(session)) {
      case ServerCore::Admission::kAdmitted:
        if (at_capacity_) {
          at_capacity_ = false;
          spdlog::info("http server {}: accepting connections again", core_->options().name);
        }
        session->Run();
        break;
      case ServerCore::Admission::kAtCapacity:
        // Logged once per episode, not per connection: a flood must not flood the log too.
        if (!at_capacity_) {
          at_capacity_ = true;
          spdlog::warn("http server {}: {} connections open, closing new ones",
                       core_->options().name, core_->options().max_connections);
        }
        break;
      case ServerCore::Admission::kStopping:
        break;
    }
  }

  void OnRetry(beast::error_code ec) {
    if (!ec) {
      DoAccept();
    }
  }

  net::io_context& ioc_;
  tcp::acceptor acceptor_;
  net::steady_timer retry_timer_;
  const std::shared_ptr<ServerCore> core_;
  bool at_capacity_ = false;  // whether the last connection was refused for max_connections
};

// io threads must outlive any exception a completion handler lets through: log and keep running.
void RunIoThread(net::io_context& ioc, const std::string& name) {
  for (;;) {
    try {
      ioc.run();
      return;  // no more work: Stop() released the work guard and everything closed
    } catch (const std::exception& e) {
      spdlog::error("http server {}: io thread caught: {}", name, e.what());
    } catch (...) {
      spdlog::error("http server {}: io thread caught a non-standard exception", name);
    }
  }
}

absl::Status ValidateOptions(const HttpServerOptions& o) {
  if (o.port < 0 || o.port > 65535) {
    return absl::InvalidArgumentError(absl::StrCat("http server ", o.name, ": bad port ", o.port));
  }
  if (o.threads < 1) {
    return absl::InvalidArgumentError(absl::StrCat("http server ", o.name, ": threads < 1"));
  }
  if (o.max_connections == 0 || o.max_header_bytes == 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("http server ", o.name, ": max_connections and max_header_bytes must be > 0"));
  }
  for (absl::Duration d : {o.read_timeout, o.idle_timeout}) {
    if (d <= absl::ZeroDuration() || d == absl::InfiniteDuration()) {
      return absl::InvalidArgumentError(
          absl::StrCat("http server ", o.name, ": timeouts must be positive and finite"));
    }
  }
  if (o.tls) {
    if (o.tls->cert_file.empty() || o.tls->key_file.empty()) {
      return absl::InvalidArgumentError(
          absl::StrCat("http server ", o.name, ": TLS needs both a cert_file and a key_file"));
    }
    if (o.tls->reload_interval <= absl::ZeroDuration() ||
        o.tls->reload_interval == absl::InfiniteDuration()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "http server ", o.name, ": TLS reload_interval must be positive and finite"));
    }
  }
  return absl::OkStatus();
}

}  // namespace

class HttpServer::Impl {
 public:
  explicit Impl(int threads) : ioc_(threads) {}

  Impl(const Impl&) = delete;
  Impl& operator=(const Impl&) = delete;

  ~Impl() {
    // Joining needs another thread: destroying the server from its own handler is a bug.
    assert(!ioc_.get_executor().running_in_this_thread());
    Stop();
  }

  absl::Status Init(HttpServerOptions options, AsyncHandler handler) {
    TB_RETURN_IF_ERROR(ValidateOptions(options));
    if (!handler) {
      return absl::InvalidArgumentError(
          absl::StrCat("http server ", options.name, ": empty handler"));
    }
    beast::error_code ec;
    const net::ip::address address = net::ip::make_address(options.address, ec);
    if (ec) {
      return absl::InvalidArgumentError(absl::StrCat(
          "http server ", options.name, ": bad address '", options.address, "': ", ec.message()));
    }
    const tcp::endpoint endpoint(address, static_cast<unsigned short>(options.port));
    const std::string where =
        absl::StrCat("http server ", options.name, " on ", EndpointString(endpoint));

    tcp::acceptor acceptor(net::make_strand(ioc_));
    if (acceptor.open(endpoint.protocol(), ec); ec) {
      return absl::UnavailableError(absl::StrCat(where, ": socket: ", ec.message()));
    }
    // Lets a restarted server rebind while old connections sit in TIME_WAIT. On Linux this does
    // not let two live listeners share the port.
    if (acceptor.set_option(net::socket_base::reuse_address(true), ec); ec) {
      return absl::UnavailableError(absl::StrCat(where, ": setsockopt: ", ec.message()));
    }
    if (acceptor.bind(endpoint, ec); ec) {
      return absl::UnavailableError(absl::StrCat(where, ": bind: ", ec.message()));
    }
    if (acceptor.listen(net::socket_base::max_listen_connections, ec); ec) {
      return absl::UnavailableError(absl::StrCat(where, ": listen: ", ec.message()));
    }
    const tcp::endpoint local = acceptor.local_endpoint(ec);
    if (ec) {
      return absl::UnavailableError(absl::StrCat(where, ": getsockname: ", ec.message()));
    }
    port_ = local.port();

    std::unique_ptr<TlsContexts> tls;
    if (options.tls) {
      absl::StatusOr<std::unique_ptr<TlsContexts>> loaded =
          TlsContexts::Create(*options.tls, options.name);
      if (!loaded.ok()) {
        return absl::Status(loaded.status().code(),
                            absl::StrCat(where, ": TLS: ", loaded.status().message()));
      }
      tls = *std::move(loaded);
    }

    const std::string name = options.name;
    const int threads = options.threads;
    const bool https = options.tls.has_value();
    core_ = std::make_shared<ServerCore>(std::move(options), std::move(handler), std::move(tls));
    listener_ = std::make_shared<Listener>(ioc_, std::move(acceptor), core_);
    listener_->Run();
    work_.emplace(net::make_work_guard(ioc_));
    {
      tb::MutexLock lock(&join_mu_);
      try {
        for (int i = 0; i < threads; ++i) {
          threads_.emplace_back([this, name] { RunIoThread(ioc_, name); });
        }
      } catch (const std::system_error& e) {
        // Those already started are joined by Stop() in the destructor.
        return absl::UnavailableError(absl::StrCat(where, ": cannot start io threads: ", e.what()));
      }
    }
    spdlog::info("http server {} listening on {}{}", name, EndpointString(local),
                 https ? " (HTTPS)" : "");
    return absl::OkStatus();
  }

  int port() const { return port_; }

  TlsReloadStats tls_stats() const {
    return core_ != nullptr && core_->tls() != nullptr ? core_->tls()->stats() : TlsReloadStats{};
  }

  void Stop() {
    std::vector<std::shared_ptr<SessionBase>> live;
    if (core_ != nullptr && core_->BeginStop(&live)) {
      listener_->Close();
      for (const std::shared_ptr<SessionBase>& session : live) {
        session->Close();
      }
      live.clear();
      if (!ioc_.get_executor().running_in_this_thread()) {
        // Responses still being computed elsewhere post back to this io_context: it must keep
        // running until they have.
        core_->WaitForPending();
      }
      // Only the first Stop() gets here. Without the guard, run() returns once the closes above
      // have drained every pending operation.
      work_.reset();
    }
    if (ioc_.get_executor().running_in_this_thread()) {
      return;  // a thread cannot join itself; a later Stop() or the destructor joins
    }
    // Held across the joins on purpose: a concurrent Stop() must not return before the port is
    // closed, and two threads must not join the same std::thread. No io thread takes this lock.
    tb::MutexLock lock(&join_mu_);
    for (std::thread& t : threads_) {
      if (t.joinable()) {
        t.join();
      }
    }
  }

 private:
  net::io_context ioc_;  // first member: destroyed last, after everything that uses it
  // Keeps run() from returning while idle. Set in Init(), reset by the first Stop() only.
  std::optional<net::executor_work_guard<net::io_context::executor_type>> work_;
  std::shared_ptr<ServerCore> core_;    // set in Init(), then read-only
  std::shared_ptr<Listener> listener_;  // set in Init(), then read-only
  int port_ = 0;                        // set in Init(), then read-only
  tb::Mutex join_mu_;
  std::vector<std::thread> threads_ ABSL_GUARDED_BY(join_mu_);
};

absl::StatusOr<std::unique_ptr<HttpServer>> HttpServer::Start(HttpServerOptions options,
                                                              Handler handler) {
  if (!handler) {
    return absl::InvalidArgumentError(
        absl::StrCat("http server ", options.name, ": empty handler"));
  }
  return Start(std::move(options),
               AsyncHandler([handler = std::move(handler)](HttpRequest req, Respond respond) {
                 respond(handler(req));
               }));
}

absl::StatusOr<std::unique_ptr<HttpServer>> HttpServer::Start(HttpServerOptions options,
                                                              AsyncHandler handler) {
  try {
    auto impl = std::make_unique<Impl>(options.threads < 1 ? 1 : options.threads);
    TB_RETURN_IF_ERROR(impl->Init(std::move(options), std::move(handler)));
    return std::unique_ptr<HttpServer>(new HttpServer(std::move(impl)));
  } catch (const std::exception& e) {  // allocation or io_context creation failure
    return absl::UnavailableError(absl::StrCat("http server: start failed: ", e.what()));
  }
}

HttpServer::HttpServer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

HttpServer::~HttpServer() { Stop(); }

int HttpServer::port() const { return impl_->port(); }

TlsReloadStats HttpServer::tls_stats() const { return impl_->tls_stats(); }

void HttpServer::Stop() { impl_->Stop(); }

}  // namespace tb::http
