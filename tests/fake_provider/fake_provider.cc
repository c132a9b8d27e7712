#include "tests/fake_provider/fake_provider.h"
#include "server/src/http/oauth_routes.h"
#include "tests/support/test_secrets.h"

// Two halves. `State` is the authorization server's logic: it maps a parsed request to a reply
// and keeps codes, grants, counters and scripted failures under one tb::Mutex; it never touches a
// socket. `Session`/`Listener` are the HTTPS transport, shaped after Beast's advanced server: an
// acceptor on its own strand, one strand per connection (the tcp_stream's executor), limits and a
// timeout on every read, and scripted delays as timers on the connection's strand, so a "slow
// provider" blocks only its own connection. Every Asio/Beast call uses its error_code overload;
// what can still throw (allocation, std::thread, Boost.JSON serialisation) is caught so that no
// exception leaves an io thread or this file.

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/rand.h>
#include <openssl/sha.h>
#include <spdlog/spdlog.h>
#include <unistd.h>

#include <array>
#include <atomic>
#include <cassert>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <deque>
#include <exception>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <system_error>
#include <thread>
#include <unordered_map>
#include <utility>
#include <vector>

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
#include <boost/json.hpp>
#include <boost/url/parse.hpp>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "server/src/common/mutex.h"
#include "tests/fake_provider/test_ca.h"

namespace tb::testing {
namespace {

namespace beast = boost::beast;
namespace bhttp = boost::beast::http;
namespace net = boost::asio;
namespace ssl = boost::asio::ssl;
namespace json = boost::json;
using tcp = net::ip::tcp;

using Request = bhttp::request<bhttp::string_body>;
using Response = bhttp::response<bhttp::string_body>;
// Decoded query or body parameters. Sorted, so field-name lists come out in a stable order.
using Params = std::map<std::string, std::string>;

constexpr int kCallKinds = static_cast<int>(CallKind::kOther) + 1;
constexpr int64_t kDefaultRefreshTokenExpiresIn = 30 * 24 * 3600;  // Zendesk: 30 days
constexpr std::string_view kDefaultScope = "read write";
// Zendesk token ids are large: starting above 2^32 catches clients that keep them in an int32.
constexpr int64_t kFirstTokenId = 360'000'000'001;
constexpr int64_t kUserId = 360'000'000'042;
constexpr size_t kHeaderLimit = 16 * 1024;
constexpr size_t kBodyLimit = 1024 * 1024;
constexpr absl::Duration kHandshakeTimeout = absl::Seconds(10);
constexpr absl::Duration kWriteTimeout = absl::Seconds(30);
constexpr absl::Duration kShutdownTimeout = absl::Seconds(2);
constexpr size_t kMaxLoggedPath = 200;
constexpr int kIoThreads = 2;

std::string ToStd(beast::string_view s) { return std::string(s.data(), s.size()); }

std::chrono::steady_clock::duration ToChrono(absl::Duration d) {
  return std::chrono::duration_cast<std::chrono::steady_clock::duration>(
      absl::ToChronoNanoseconds(d));
}

bool EqualsIgnoreCase(std::string_view a, std::string_view b) {
  return beast::iequals(beast::string_view(a.data(), a.size()),
                        beast::string_view(b.data(), b.size()));
}

// ---------------------------------------------------------------------------------------------
// Encodings

// base64url without padding (RFC 4648 section 5), as JWTs and PKCE (RFC 7636) use it.
std::string Base64Url(std::string_view bytes) {
  return absl::WebSafeBase64Escape(absl::string_view(bytes.data(), bytes.size()));
}

// Standard base64 (RFC 4648 section 4), padding optional. nullopt if malformed.
std::optional<std::string> Base64Decode(std::string_view in) {
  std::string out;
  if (!absl::Base64Unescape(absl::string_view(in.data(), in.size()), &out)) {
    return std::nullopt;
  }
  return out;
}

int HexValue(char c) {
  if (c >= '0' && c <= '9') {
    return c - '0';
  }
  if (c >= 'a' && c <= 'f') {
    return c - 'a' + 10;
  }
  if (c >= 'A' && c <= 'F') {
    return c - 'A' + 10;
  }
  return -1;
}

// application/x-www-form-urlencoded decoding of one name or value: '+' is a space, %XX a byte.
std::optional<std::string> FormDecode(std::string_view in) {
  std::string out;
  out.reserve(in.size());
  for (size_t i = 0; i < in.size(); ++i) {
    const char c = in[i];
    if (c == '+') {
      out += ' ';
    } else if (c == '%') {
      if (i + 2 >= in.size()) {
        return std::nullopt;
      }
      const int hi = HexValue(in[i + 1]);
      const int lo = HexValue(in[i + 2]);
      if (hi < 0 || lo < 0) {
        return std::nullopt;
      }
      out += static_cast<char>(hi * 16 + lo);
      i += 2;
    } else {
      out += c;
    }
  }
  return out;
}

// Percent-encodes everything but RFC 3986 unreserved characters (so a space becomes %20).
std::string PercentEncode(std::string_view in) {
  static constexpr char kHex[] = "0123456789ABCDEF";
  std::string out;
  for (const char c : in) {
    const auto u = static_cast<unsigned char>(c);
    if ((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '-' ||
        c == '.' || c == '_' || c == '~') {
      out += c;
    } else {
      out += '%';
      out += kHex[u >> 4];
      out += kHex[u & 15];
    }
  }
  return out;
}

// The broker's own escaping: one implementation to trust.
std::string HtmlEscape(std::string_view in) {
  return tb::http::HtmlEscape(absl::string_view(in.data(), in.size()));
}

// Parses "a=1&b=2" (a query string or a form body). A name given twice is an error (RFC 6749
// 3.1/3.2: parameters must not be repeated); a part without '=' has an empty value.
absl::StatusOr<Params> ParseForm(std::string_view s) {
  Params out;
  if (s.empty()) {
    return out;
  }
  for (absl::string_view part : absl::StrSplit(absl::string_view(s.data(), s.size()), '&')) {
    if (part.empty()) {
      continue;
    }
    const size_t eq = part.find('=');
    const std::optional<std::string> name =
        FormDecode(std::string_view(part.data(), std::min(eq, part.size())));
    const std::optional<std::string> value =
        eq == absl::string_view::npos
            ? std::optional<std::string>("")
            : FormDecode(std::string_view(part.data() + eq + 1, part.size() - eq - 1));
    if (!name || !value) {
      return absl::InvalidArgumentError("malformed percent-encoding");
    }
    if (!out.emplace(*name, *value).second) {
      return absl::InvalidArgumentError(absl::StrCat("parameter '", *name, "' repeated"));
    }
  }
  return out;
}

// A JSON object body as parameters: strings as they are, numbers in decimal (Zendesk accepts
// `"expires_in": 1800` and `"expires_in": "1800"`), booleans as "true"/"false", nulls dropped.
absl::StatusOr<Params> ParseJsonObject(std::string_view s) {
  json::error_code ec;
  const json::value v = json::parse(json::string_view(s.data(), s.size()), ec);
  if (ec) {
    return absl::InvalidArgumentError("body is not valid JSON");
  }
  if (!v.is_object()) {
    return absl::InvalidArgumentError("body is not a JSON object");
  }
  Params out;
  for (const auto& [key, value] : v.get_object()) {
    std::string str;
    switch (value.kind()) {
      case json::kind::string:
        str = std::string(value.get_string().data(), value.get_string().size());
        break;
      case json::kind::int64:
        str = std::to_string(value.get_int64());
        break;
      case json::kind::uint64:
        str = std::to_string(value.get_uint64());
        break;
      case json::kind::double_: {
        const double d = value.get_double();
        if (d != static_cast<double>(static_cast<int64_t>(d))) {
          return absl::InvalidArgumentError(
              absl::StrCat("field '", std::string(key.data(), key.size()), "' is not an integer"));
        }
        str = std::to_string(static_cast<int64_t>(d));
        break;
      }
      case json::kind::bool_:
        str = value.get_bool() ? "true" : "false";
        break;
      case json::kind::null:
        continue;
      default:
        return absl::InvalidArgumentError(
            absl::StrCat("field '", std::string(key.data(), key.size()), "' is not a scalar"));
    }
    out.emplace(std::string(key.data(), key.size()), std::move(str));
  }
  return out;
}

// The media type of a Content-Type value, lower-cased, without parameters.
std::string MediaType(std::string_view content_type) {
  std::string_view t = content_type.substr(0, content_type.find(';'));
  while (!t.empty() && (t.front() == ' ' || t.front() == '\t')) {
    t.remove_prefix(1);
  }
  while (!t.empty() && (t.back() == ' ' || t.back() == '\t')) {
    t.remove_suffix(1);
  }
  std::string out(t);
  for (char& c : out) {
    if (c >= 'A' && c <= 'Z') {
      c = static_cast<char>(c - 'A' + 'a');
    }
  }
  return out;
}

absl::StatusOr<Params> ParseBody(const Request& req) {
  const std::string media = MediaType(ToStd(req[bhttp::field::content_type]));
  if (media == "application/json") {
    return ParseJsonObject(req.body());
  }
  if (media == "application/x-www-form-urlencoded") {
    return ParseForm(req.body());
  }
  return absl::InvalidArgumentError(
      "Content-Type must be application/json or application/x-www-form-urlencoded");
}

// "<scheme> <credentials>" of the Authorization header when the scheme matches, else nullopt.
std::optional<std::string> AuthorizationCredentials(const Request& req, std::string_view scheme) {
  const std::string value = ToStd(req[bhttp::field::authorization]);
  if (value.size() <= scheme.size() || value[scheme.size()] != ' ' ||
      !EqualsIgnoreCase(std::string_view(value).substr(0, scheme.size()), scheme)) {
    return std::nullopt;
  }
  std::string_view rest = std::string_view(value).substr(scheme.size() + 1);
  while (!rest.empty() && rest.front() == ' ') {
    rest.remove_prefix(1);
  }
  while (!rest.empty() && rest.back() == ' ') {
    rest.remove_suffix(1);
  }
  return std::string(rest);
}

const std::string* Find(const Params& p, const std::string& key) {
  const auto it = p.find(key);
  return it == p.end() ? nullptr : &it->second;
}

bool SecretEquals(std::string_view a, std::string_view b) {
  return a.size() == b.size() && CRYPTO_memcmp(a.data(), b.data(), a.size()) == 0;
}

std::string RandomBytes(size_t n) {
  std::string out(n, '\0');
  if (RAND_bytes(reinterpret_cast<unsigned char*>(out.data()), static_cast<int>(n)) != 1) {
    // A fake that cannot make unpredictable tokens would make tests pass for the wrong reason.
    spdlog::critical("fake_provider: RAND_bytes failed");
    std::abort();
  }
  return out;
}

std::string Hex(std::string_view bytes) {
  static constexpr char kHex[] = "0123456789abcdef";
  std::string out;
  for (const char c : bytes) {
    const auto u = static_cast<unsigned char>(c);
    out += kHex[u >> 4];
    out += kHex[u & 15];
  }
  return out;
}

// About 1 KB and shaped like Zendesk's JWT-like tokens (three base64url parts with dots), so a
// client that truncates, or mangles dots, fails here and not in production.
// Every token and code it issues is recorded for the test run's secret-in-logs scan.
std::string Recorded(std::string secret) {
  tb::testing::RecordTestSecret(secret);
  return secret;
}

std::string NewAccessToken() {
  static const std::string kHeader = Base64Url(R"({"alg":"HS256","typ":"JWT"})");
  return Recorded(
      absl::StrCat(kHeader, ".", Base64Url(RandomBytes(700)), ".", Base64Url(RandomBytes(32))));
}

std::string NewRefreshToken() { return Recorded(Hex(RandomBytes(32))); }
std::string NewCode() { return Recorded(Base64Url(RandomBytes(24))); }

std::string S256(std::string_view verifier) {
  unsigned char digest[SHA256_DIGEST_LENGTH];
  SHA256(reinterpret_cast<const unsigned char*>(verifier.data()), verifier.size(), digest);
  return Base64Url(std::string_view(reinterpret_cast<const char*>(digest), sizeof digest));
}

std::string IsoTime(absl::Time t) {
  return absl::FormatTime("%Y-%m-%dT%H:%M:%SZ", t, absl::UTCTimeZone());
}

// RFC 7636 4.1: 43 to 128 unreserved characters (also the shape of an S256 challenge).
bool IsPkceString(std::string_view s) {
  if (s.size() < 43 || s.size() > 128) {
    return false;
  }
  for (const char c : s) {
    if (!((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '-' ||
          c == '.' || c == '_' || c == '~')) {
      return false;
    }
  }
  return true;
}

// An absolute http(s) URI with a host and without a fragment (RFC 6749 3.1.2); also no control
// characters, since it ends up in a Location header.
bool IsValidRedirectUri(const std::string& uri) {
  for (const char c : uri) {
    if (static_cast<unsigned char>(c) < 0x21 || c == 0x7f) {
      return false;
    }
  }
  const auto parsed = boost::urls::parse_absolute_uri(uri);
  if (!parsed) {
    return false;
  }
  const boost::urls::scheme scheme = parsed->scheme_id();
  return (scheme == boost::urls::scheme::http || scheme == boost::urls::scheme::https) &&
         parsed->has_authority() && !parsed->encoded_host().empty();
}

// ---------------------------------------------------------------------------------------------
// Replies

struct Reply {
  unsigned status = 200;
  std::string content_type = "application/json";
  std::vector<std::pair<std::string, std::string>> headers;
  std::string body;
};

Reply JsonReply(unsigned status, const json::object& body) {
  Reply r;
  r.status = status;
  r.body = json::serialize(body);
  return r;
}

Reply OAuthError(unsigned status, std::string_view error, std::string_view description) {
  json::object body;
  body["error"] = json::string_view(error.data(), error.size());
  body["error_description"] = json::string_view(description.data(), description.size());
  Reply r = JsonReply(status, body);
  if (status == 401) {
    r.headers.emplace_back("WWW-Authenticate", R"(Basic realm="fake_provider")");
  }
  return r;
}

// Zendesk's answer to an API call with a bad Bearer token.
Reply InvalidToken() {
  Reply r = OAuthError(401, "invalid_token",
                       "The access token provided is expired, revoked, malformed or invalid for "
                       "other reasons.");
  r.headers = {{"WWW-Authenticate", R"(Bearer realm="fake_provider", error="invalid_token")"}};
  return r;
}

Reply NotFound() {
  json::object body;
  body["error"] = "RecordNotFound";
  body["description"] = "Not found";
  return JsonReply(404, body);
}

Reply Empty(unsigned status) {
  Reply r;
  r.status = status;
  r.content_type.clear();
  return r;
}

Reply Redirect(const std::string& location) {
  Reply r = Empty(302);
  r.headers.emplace_back("Location", location);
  r.headers.emplace_back("Referrer-Policy", "no-referrer");
  return r;
}

Reply HtmlPage(unsigned status, std::string_view title, std::string_view body_html) {
  Reply r;
  r.status = status;
  r.content_type = "text/html; charset=utf-8";
  r.headers = {
      {"Referrer-Policy", "no-referrer"},
      {"X-Frame-Options", "DENY"},
      // No form-action: browsers apply it to the redirect that follows the form submission.
      {"Content-Security-Policy", "default-src 'none'; style-src 'unsafe-inline'"},
  };
  r.body = absl::StrCat(
      "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>", HtmlEscape(title),
      "</title><style>body{font-family:sans-serif;max-width:40em;margin:3em auto;line-height:1.5}"
      "form{display:inline-block;margin-right:1em}button{font-size:1.1em;padding:.4em 1.2em}"
      "code{word-break:break-all}</style></head><body>\n<h1>",
      HtmlEscape(title), "</h1>\n", std::string(body_html),
      "\n<p><small>fake_provider: a local stand-in for Zendesk's OAuth server, for development "
      "and tests.</small></p>\n</body></html>\n");
  return r;
}

Reply FaultReply(const Failure& f) {
  std::string error = f.error;
  if (error.empty()) {
    error = f.http_status == 429   ? "too_many_requests"
            : f.http_status >= 500 ? "server_error"
                                   : "invalid_request";
  }
  Reply r = OAuthError(static_cast<unsigned>(f.http_status), error, "scripted failure");
  r.headers.clear();
  std::string retry_after = f.retry_after;
  if (retry_after.empty() && f.http_status == 429) {
    retry_after = "1";
  }
  if (!retry_after.empty()) {
    r.headers.emplace_back("Retry-After", retry_after);
  }
  return r;
}

// ---------------------------------------------------------------------------------------------
// The authorization server

enum class Endpoint {
  kAuthorize,
  kDecide,
  kToken,
  kTokenInfo,
  kRevokeById,
  kRevokeCurrent,
  kRevokeRfc7009,
  kStats,
  kNotFound,
};

// One request, routed and parsed, with the fault scripted for it.
struct Call {
  Endpoint endpoint = Endpoint::kNotFound;
  CallKind kind = CallKind::kOther;
  std::string path;               // without the query: safe to log
  std::string decide_prefix;      // "/oauth" or "/oauth2", for the dev page's form action
  absl::StatusOr<Params> params;  // query (authorize, decide) or body (token, revoke)
  int64_t token_id = 0;           // kRevokeById
  std::optional<Failure> failure;
};

struct Lifetimes {
  std::optional<int64_t> expires_in;  // none: a non-expiring token, no refresh token
  int64_t refresh_token_expires_in = kDefaultRefreshTokenExpiresIn;
};

struct NewTokens {
  std::string access;
  std::string refresh;
};

struct ClientRecord {
  std::string secret;
  int64_t number = 0;  // Zendesk's numeric OAuth client id, shown by current.json
};

struct CodeRecord {
  std::string client_id;
  std::string redirect_uri;
  std::string scope;
  std::string code_challenge;  // empty: no PKCE
  absl::Time expires_at;
};

struct GrantRecord {
  int64_t id = 0;
  std::string client_id;
  std::string scope;
  std::string access_token;
  std::string refresh_token;  // empty: none issued
  absl::Time created_at;
  std::optional<absl::Time> access_expires_at;  // none: never expires
  absl::Time refresh_expires_at;
  bool revoked = false;
  bool rotated = false;  // its refresh token was used: it must never work again
};

absl::StatusOr<std::optional<int64_t>> ParseLifetime(const Params& p, const std::string& key) {
  const std::string* value = Find(p, key);
  if (value == nullptr) {
    return std::optional<int64_t>();
  }
  int64_t n = 0;
  if (value->empty() || value->size() > 12) {
    return absl::InvalidArgumentError(absl::StrCat(key, " must be a positive integer"));
  }
  for (const char c : *value) {
    if (c < '0' || c > '9') {
      return absl::InvalidArgumentError(absl::StrCat(key, " must be a positive integer"));
    }
    n = n * 10 + (c - '0');
  }
  if (n <= 0) {
    return absl::InvalidArgumentError(absl::StrCat(key, " must be a positive integer"));
  }
  return std::optional<int64_t>(n);
}

// Thread-safe. Never performs I/O: the transport below calls Begin() and Process() per request.
class State {
 public:
  State(const FakeProviderOptions& options, std::string base_url)
      : auto_approve_(options.auto_approve),
        stats_endpoint_(options.stats_endpoint),
        code_lifetime_(options.code_lifetime),
        base_url_(std::move(base_url)) {}

  // Routes and parses `req`, counts it, pops its scripted failure and records what the
  // introspection methods report.
  Call Begin(const Request& req) ABSL_LOCKS_EXCLUDED(mu_) {
    Call call;
    const std::string target = ToStd(req.target());
    const size_t q = target.find('?');
    call.path = target.substr(0, q);
    const std::string query = q == std::string::npos ? "" : target.substr(q + 1);
    const bhttp::verb method = req.method();
    const std::string& path = call.path;
    if (method == bhttp::verb::get &&
        (path == "/oauth/authorizations/new" || path == "/oauth2/authorizations/new")) {
      call.endpoint = Endpoint::kAuthorize;
      call.kind = CallKind::kAuthorize;
      call.decide_prefix = path.rfind("/oauth2/", 0) == 0 ? "/oauth2" : "/oauth";
      call.params = ParseForm(query);
    } else if (method == bhttp::verb::get && (path == "/oauth/authorizations/decide" ||
                                              path == "/oauth2/authorizations/decide")) {
      call.endpoint = Endpoint::kDecide;
      call.params = ParseForm(query);
    } else if (method == bhttp::verb::post &&
               (path == "/oauth/tokens" || path == "/oauth2/token")) {
      call.endpoint = Endpoint::kToken;
      call.params = ParseBody(req);
      if (call.params.ok()) {
        const std::string* grant = Find(*call.params, "grant_type");
        if (grant != nullptr && *grant == "authorization_code") {
          call.kind = CallKind::kTokenCode;
        } else if (grant != nullptr && *grant == "refresh_token") {
          call.kind = CallKind::kTokenRefresh;
        }
      }
    } else if (method == bhttp::verb::post &&
               (path == "/oauth/revoke" || path == "/oauth2/revoke")) {
      call.endpoint = Endpoint::kRevokeRfc7009;
      call.kind = CallKind::kRevokeRfc7009;
      call.params = ParseBody(req);
    } else if (path == "/api/v2/oauth/tokens/current.json" && method == bhttp::verb::get) {
      call.endpoint = Endpoint::kTokenInfo;
      call.kind = CallKind::kTokenInfo;
    } else if (path == "/api/v2/oauth/tokens/current.json" && method == bhttp::verb::delete_) {
      call.endpoint = Endpoint::kRevokeCurrent;
      call.kind = CallKind::kRevokeCurrent;
    } else if (method == bhttp::verb::delete_ && ParseTokenIdPath(path, &call.token_id)) {
      call.endpoint = Endpoint::kRevokeById;
      call.kind = CallKind::kRevokeById;
    } else if (stats_endpoint_ && method == bhttp::verb::get && path == "/_fake/stats") {
      call.endpoint = Endpoint::kStats;
    }

    tb::MutexLock lock(&mu_);
    const int k = static_cast<int>(call.kind);
    ++calls_[k];
    if (!failures_[k].empty()) {
      call.failure = std::move(failures_[k].front());
      failures_[k].pop_front();
    }
    if (call.endpoint == Endpoint::kAuthorize) {
      last_authorize_query_ = query;
    }
    if (call.endpoint == Endpoint::kToken) {
      last_token_content_type_ = ToStd(req[bhttp::field::content_type]);
      last_token_fields_.clear();
      if (call.params.ok()) {
        for (const auto& [name, value] : *call.params) {
          last_token_fields_.push_back(name);
        }
      }
      if (AuthorizationCredentials(req, "Basic")) {
        last_token_client_auth_ = ClientAuth::kBasic;
      } else if (call.params.ok() && (Find(*call.params, "client_id") != nullptr ||
                                      Find(*call.params, "client_secret") != nullptr)) {
        last_token_client_auth_ = ClientAuth::kBody;
      } else {
        last_token_client_auth_ = ClientAuth::kNone;
      }
    }
    return call;
  }

  // The normal answer to `call`, with its effects (codes issued, tokens rotated or revoked).
  Reply Process(const Request& req, const Call& call) ABSL_LOCKS_EXCLUDED(mu_) {
    switch (call.endpoint) {
      case Endpoint::kAuthorize:
        return Authorize(call, std::nullopt);
      case Endpoint::kDecide: {
        const bool approve = call.params.ok() && Find(*call.params, "decision") != nullptr &&
                             *Find(*call.params, "decision") == "approve";
        return Authorize(call, approve);
      }
      case Endpoint::kToken:
        return Token(req, call);
      case Endpoint::kTokenInfo:
        return TokenInfo(req);
      case Endpoint::kRevokeById:
        return RevokeById(req, call.token_id);
      case Endpoint::kRevokeCurrent:
        return RevokeCurrent(req);
      case Endpoint::kRevokeRfc7009:
        return RevokeRfc7009(req, call);
      case Endpoint::kStats:
        return Stats();
      case Endpoint::kNotFound:
        break;
    }
    json::object body;
    body["error"] = "InvalidEndpoint";
    body["description"] = "Not found";
    return JsonReply(404, body);
  }

  void AddClient(std::string client_id, std::string secret) ABSL_LOCKS_EXCLUDED(mu_) {
    tb::MutexLock lock(&mu_);
    ClientRecord& c = clients_[std::move(client_id)];
    c.secret = std::move(secret);
    if (c.number == 0) {
      c.number = next_client_number_++;
    }
  }

  void FailNext(CallKind kind, Failure failure) ABSL_LOCKS_EXCLUDED(mu_) {
    tb::MutexLock lock(&mu_);
    failures_[static_cast<int>(kind)].push_back(std::move(failure));
  }

  void SetAuthorizeDecision(bool approve) ABSL_LOCKS_EXCLUDED(mu_) {
    tb::MutexLock lock(&mu_);
    approve_ = approve;
  }

  void RevokeAll() ABSL_LOCKS_EXCLUDED(mu_) {
    tb::MutexLock lock(&mu_);
    for (auto& [id, grant] : grants_) {
      grant.revoked = true;
    }
  }

  void ExpireAllAccessTokens() ABSL_LOCKS_EXCLUDED(mu_) {
    const absl::Time past = absl::Now() - absl::Seconds(1);
    tb::MutexLock lock(&mu_);
    for (auto& [id, grant] : grants_) {
      grant.access_expires_at = past;
    }
  }

  int calls(CallKind kind) const ABSL_LOCKS_EXCLUDED(mu_) {
    tb::MutexLock lock(&mu_);
    return calls_[static_cast<int>(kind)];
  }

  bool IsAccessTokenValid(const std::string& token) const ABSL_LOCKS_EXCLUDED(mu_) {
    const absl::Time now = absl::Now();
    tb::MutexLock lock(&mu_);
    return GrantForAccessLocked(token, now) != nullptr;
  }

  bool IsRefreshTokenValid(const std::string& token) const ABSL_LOCKS_EXCLUDED(mu_) {
    const absl::Time now = absl::Now();
    tb::MutexLock lock(&mu_);
    const auto it = by_refresh_.find(token);
    if (it == by_refresh_.end()) {
      return false;
    }
    const GrantRecord& g = grants_.at(it->second);
    return !g.revoked && !g.rotated && now < g.refresh_expires_at;
  }

  std::optional<int64_t> TokenIdOf(const std::string& token) const ABSL_LOCKS_EXCLUDED(mu_) {
    tb::MutexLock lock(&mu_);
    const auto it = by_access_.find(token);
    if (it == by_access_.end()) {
      return std::nullopt;
    }
    return it->second;
  }

  int refresh_token_reuse_attempts() const ABSL_LOCKS_EXCLUDED(mu_) {
    tb::MutexLock lock(&mu_);
    return reuse_attempts_;
  }
  std::string last_token_request_content_type() const ABSL_LOCKS_EXCLUDED(mu_) {
    tb::MutexLock lock(&mu_);
    return last_token_content_type_;
  }
  std::vector<std::string> last_token_request_fields() const ABSL_LOCKS_EXCLUDED(mu_) {
    tb::MutexLock lock(&mu_);
    return last_token_fields_;
  }
  ClientAuth last_token_request_client_auth() const ABSL_LOCKS_EXCLUDED(mu_) {
    tb::MutexLock lock(&mu_);
    return last_token_client_auth_;
  }
  std::string last_authorize_query() const ABSL_LOCKS_EXCLUDED(mu_) {
    tb::MutexLock lock(&mu_);
    return last_authorize_query_;
  }

 private:
  // "/api/v2/oauth/tokens/<digits>.json"
  static bool ParseTokenIdPath(const std::string& path, int64_t* id) {
    static constexpr std::string_view kPrefix = "/api/v2/oauth/tokens/";
    static constexpr std::string_view kSuffix = ".json";
    if (path.size() <= kPrefix.size() + kSuffix.size() || path.rfind(kPrefix, 0) != 0 ||
        path.compare(path.size() - kSuffix.size(), kSuffix.size(), kSuffix) != 0) {
      return false;
    }
    const std::string digits =
        path.substr(kPrefix.size(), path.size() - kPrefix.size() - kSuffix.size());
    if (digits.size() > 18) {
      return false;
    }
    int64_t n = 0;
    for (const char c : digits) {
      if (c < '0' || c > '9') {
        return false;
      }
      n = n * 10 + (c - '0');
    }
    *id = n;
    return true;
  }

  // Authorize and decide. `user_decision` is the dev page's button (decide), nullopt for the
  // authorize request itself.
  Reply Authorize(const Call& call, std::optional<bool> user_decision) ABSL_LOCKS_EXCLUDED(mu_) {
    if (!call.params.ok()) {
      return HtmlPage(400, "Bad request", "<p>The query string is malformed.</p>");
    }
    const Params& q = *call.params;
    const std::string* client_id = Find(q, "client_id");
    const std::string* redirect_uri = Find(q, "redirect_uri");
    {
      tb::MutexLock lock(&mu_);
      if (client_id == nullptr || clients_.find(*client_id) == clients_.end()) {
        return HtmlPage(400, "Unknown client",
                        "<p>No OAuth client with this client_id is registered.</p>");
      }
    }
    // Errors about the redirect URI itself are shown, never redirected (RFC 6749 4.1.2.1).
    if (redirect_uri == nullptr || !IsValidRedirectUri(*redirect_uri)) {
      return HtmlPage(400, "Invalid redirect_uri",
                      "<p>redirect_uri is missing or not an absolute http(s) URL.</p>");
    }
    const std::string* state = Find(q, "state");
    if (state != nullptr) {
      tb::testing::RecordTestSecret(*state);  // the broker's state: scanned for in the logs
    }
    const std::string* response_type = Find(q, "response_type");
    const std::string* challenge = Find(q, "code_challenge");
    const std::string* method = Find(q, "code_challenge_method");
    if (response_type == nullptr || *response_type != "code") {
      return ErrorRedirect(*redirect_uri, "unsupported_response_type",
                           "Only response_type=code is supported.", state);
    }
    if (challenge != nullptr &&
        (method == nullptr || *method != "S256" || !IsPkceString(*challenge))) {
      return ErrorRedirect(*redirect_uri, "invalid_request",
                           "code_challenge must come with code_challenge_method=S256.", state);
    }
    if (challenge == nullptr && method != nullptr) {
      return ErrorRedirect(*redirect_uri, "invalid_request",
                           "code_challenge_method without code_challenge.", state);
    }

    bool approve;
    if (user_decision.has_value()) {
      approve = *user_decision;
    } else if (auto_approve_) {
      tb::MutexLock lock(&mu_);
      approve = approve_;
    } else {
      return ConsentPage(call);
    }
    if (!approve) {
      return ErrorRedirect(*redirect_uri, "access_denied",
                           "The end-user or authorization server denied the request.", state);
    }

    const std::string code = NewCode();
    const std::string* scope = Find(q, "scope");
    const absl::Time now = absl::Now();
    {
      tb::MutexLock lock(&mu_);
      // Expired codes are dropped here, so a long dev session does not grow without bound.
      for (auto it = codes_.begin(); it != codes_.end();) {
        it = it->second.expires_at <= now ? codes_.erase(it) : std::next(it);
      }
      CodeRecord& rec = codes_[code];
      rec.client_id = *client_id;
      rec.redirect_uri = *redirect_uri;
      rec.scope = scope != nullptr ? *scope : "";
      rec.code_challenge = challenge != nullptr ? *challenge : "";
      rec.expires_at = now + code_lifetime_;
    }
    std::vector<std::pair<std::string, std::string>> params = {{"code", code}};
    if (state != nullptr) {
      params.emplace_back("state", *state);
    }
    return Redirect(AppendQuery(*redirect_uri, params));
  }

  static std::string AppendQuery(const std::string& uri,
                                 const std::vector<std::pair<std::string, std::string>>& params) {
    std::string out = uri;
    char sep = uri.find('?') == std::string::npos ? '?' : '&';
    if (!out.empty() && (out.back() == '?' || out.back() == '&')) {
      sep = '\0';
    }
    for (const auto& [name, value] : params) {
      if (sep != '\0') {
        out += sep;
      }
      absl::StrAppend(&out, PercentEncode(name), "=", PercentEncode(value));
      sep = '&';
    }
    return out;
  }

  static Reply ErrorRedirect(const std::string& redirect_uri, std::string_view error,
                             std::string_view description, const std::string* state) {
    std::vector<std::pair<std::string, std::string>> params = {
        {"error", std::string(error)}, {"error_description", std::string(description)}};
    if (state != nullptr) {
      params.emplace_back("state", *state);
    }
    return Redirect(AppendQuery(redirect_uri, params));
  }

  // Dev mode: the page a Zendesk user sees, with the original parameters carried by both forms.
  static Reply ConsentPage(const Call& call) {
    const Params& q = *call.params;
    std::string hidden;
    for (const auto& [name, value] : q) {
      if (name == "decision") {
        continue;
      }
      absl::StrAppend(&hidden, "<input type=\"hidden\" name=\"", HtmlEscape(name), "\" value=\"",
                      HtmlEscape(value), "\">");
    }
    const std::string action =
        HtmlEscape(absl::StrCat(call.decide_prefix, "/authorizations/decide"));
    const std::string* scope = Find(q, "scope");
    const std::string body = absl::StrCat(
        "<p>The application <b>", HtmlEscape(*Find(q, "client_id")),
        "</b> asks for access to your account with scope <b>",
        HtmlEscape(scope != nullptr ? *scope : ""),
        "</b>.</p>\n<p>Your browser then returns to <code>", HtmlEscape(*Find(q, "redirect_uri")),
        "</code>.</p>\n<form method=\"get\" action=\"", action, "\">", hidden,
        "<input type=\"hidden\" name=\"decision\" value=\"approve\">"
        "<button type=\"submit\">Approve</button></form>\n<form method=\"get\" action=\"",
        action, "\">", hidden,
        "<input type=\"hidden\" name=\"decision\" value=\"deny\">"
        "<button type=\"submit\">Deny</button></form>");
    return HtmlPage(200, "Authorize access", body);
  }

  struct ClientAuthResult {
    std::optional<Reply> error;
    std::string client_id;
  };

  // RFC 6749 2.3.1: HTTP Basic with form-url-encoded id and secret, or both in the body; never
  // both methods at once.
  ClientAuthResult AuthenticateClientLocked(const Request& req, const Params& p) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    ClientAuthResult out;
    std::string secret;
    const std::string* body_id = Find(p, "client_id");
    const std::string* body_secret = Find(p, "client_secret");
    if (const std::optional<std::string> basic = AuthorizationCredentials(req, "Basic")) {
      if (body_secret != nullptr) {
        out.error = OAuthError(400, "invalid_request",
                               "Use one client authentication method, not Basic and body both.");
        return out;
      }
      const std::optional<std::string> decoded = Base64Decode(*basic);
      const size_t colon = decoded ? decoded->find(':') : std::string::npos;
      std::optional<std::string> id;
      std::optional<std::string> pass;
      if (colon != std::string::npos) {
        id = FormDecode(std::string_view(*decoded).substr(0, colon));
        pass = FormDecode(std::string_view(*decoded).substr(colon + 1));
      }
      if (!id || !pass || (body_id != nullptr && *body_id != *id)) {
        out.error = OAuthError(401, "invalid_client", "Client authentication failed.");
        return out;
      }
      out.client_id = *std::move(id);
      secret = *std::move(pass);
    } else if (body_id != nullptr) {
      out.client_id = *body_id;
      secret = body_secret != nullptr ? *body_secret : "";
    } else {
      out.error = OAuthError(401, "invalid_client", "Client authentication is required.");
      return out;
    }
    const auto it = clients_.find(out.client_id);
    if (it == clients_.end() || !SecretEquals(secret, it->second.secret)) {
      out.error = OAuthError(401, "invalid_client", "Client authentication failed.");
    }
    return out;
  }

  Reply Token(const Request& req, const Call& call) ABSL_LOCKS_EXCLUDED(mu_) {
    if (!call.params.ok()) {
      return OAuthError(400, "invalid_request", std::string(call.params.status().message()));
    }
    const Params& p = *call.params;
    Lifetimes lifetimes;
    absl::StatusOr<std::optional<int64_t>> expires_in = ParseLifetime(p, "expires_in");
    absl::StatusOr<std::optional<int64_t>> refresh_expires_in =
        ParseLifetime(p, "refresh_token_expires_in");
    if (!expires_in.ok() || !refresh_expires_in.ok()) {
      return OAuthError(400, "invalid_request",
                        std::string(!expires_in.ok() ? expires_in.status().message()
                                                     : refresh_expires_in.status().message()));
    }
    lifetimes.expires_in = *expires_in;
    if (refresh_expires_in->has_value()) {
      lifetimes.refresh_token_expires_in = **refresh_expires_in;
    }
    // Made before locking: 1 KB of randomness per token is not work to do under the lock.
    const NewTokens fresh{NewAccessToken(), NewRefreshToken()};
    const absl::Time now = absl::Now();

    tb::MutexLock lock(&mu_);
    ClientAuthResult auth = AuthenticateClientLocked(req, p);
    if (auth.error) {
      return *std::move(auth.error);
    }
    const std::string* grant_type = Find(p, "grant_type");
    if (grant_type == nullptr) {
      return OAuthError(400, "invalid_request", "grant_type is missing.");
    }
    if (*grant_type == "authorization_code") {
      return ExchangeCodeLocked(p, auth.client_id, lifetimes, fresh, now);
    }
    if (*grant_type == "refresh_token") {
      return RefreshLocked(p, auth.client_id, lifetimes, fresh, now);
    }
    return OAuthError(400, "unsupported_grant_type", "Unsupported grant_type.");
  }

  Reply ExchangeCodeLocked(const Params& p, const std::string& client_id,
                           const Lifetimes& lifetimes, const NewTokens& fresh, absl::Time now)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    const std::string* code = Find(p, "code");
    if (code == nullptr) {
      return OAuthError(400, "invalid_request", "code is missing.");
    }
    const auto it = codes_.find(*code);
    if (it == codes_.end()) {
      return OAuthError(400, "invalid_grant",
                        "The authorization code is invalid, expired or already used.");
    }
    // Single use: consumed by any attempt, a failed one included.
    const CodeRecord rec = std::move(it->second);
    codes_.erase(it);
    if (now >= rec.expires_at) {
      return OAuthError(400, "invalid_grant", "The authorization code has expired.");
    }
    if (rec.client_id != client_id) {
      return OAuthError(400, "invalid_grant", "The authorization code belongs to another client.");
    }
    const std::string* redirect_uri = Find(p, "redirect_uri");
    if (redirect_uri == nullptr || *redirect_uri != rec.redirect_uri) {
      return OAuthError(400, "invalid_grant",
                        "redirect_uri does not match the one of the authorization request.");
    }
    // A code_verifier without a code_challenge is ignored, as most servers do.
    if (!rec.code_challenge.empty()) {
      const std::string* verifier = Find(p, "code_verifier");
      if (verifier != nullptr) {
        tb::testing::RecordTestSecret(*verifier);  // the broker's PKCE verifier, likewise
      }
      if (verifier == nullptr || !SecretEquals(S256(*verifier), rec.code_challenge)) {
        return OAuthError(400, "invalid_grant", "PKCE verification failed.");
      }
    }
    const GrantRecord& grant =
        IssueLocked(client_id, rec.scope.empty() ? std::string(kDefaultScope) : rec.scope,
                    lifetimes, fresh, now);
    return TokenReply(grant, lifetimes);
  }

  Reply RefreshLocked(const Params& p, const std::string& client_id, const Lifetimes& lifetimes,
                      const NewTokens& fresh, absl::Time now) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    const std::string* refresh = Find(p, "refresh_token");
    if (refresh == nullptr) {
      return OAuthError(400, "invalid_request", "refresh_token is missing.");
    }
    const auto it = by_refresh_.find(*refresh);
    if (it == by_refresh_.end()) {
      return OAuthError(400, "invalid_grant", "The refresh token is invalid.");
    }
    GrantRecord& old = grants_.at(it->second);
    if (old.rotated) {
      ++reuse_attempts_;
      reused_token_ids_.push_back(old.id);
      return OAuthError(400, "invalid_grant", "The refresh token has already been used.");
    }
    if (old.revoked || now >= old.refresh_expires_at) {
      return OAuthError(400, "invalid_grant", "The refresh token is expired or revoked.");
    }
    if (old.client_id != client_id) {
      return OAuthError(400, "invalid_grant", "The refresh token belongs to another client.");
    }
    // Zendesk deletes the previous access token and the previous refresh token at once.
    old.revoked = true;
    old.rotated = true;
    const std::string scope = old.scope;
    const GrantRecord& grant = IssueLocked(client_id, scope, lifetimes, fresh, now);
    return TokenReply(grant, lifetimes);
  }

  const GrantRecord& IssueLocked(const std::string& client_id, const std::string& scope,
                                 const Lifetimes& lifetimes, const NewTokens& fresh, absl::Time now)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    const int64_t id = next_token_id_++;
    GrantRecord& g = grants_[id];
    g.id = id;
    g.client_id = client_id;
    g.scope = scope;
    g.access_token = fresh.access;
    g.created_at = now;
    by_access_[g.access_token] = id;
    if (lifetimes.expires_in) {
      g.access_expires_at = now + absl::Seconds(*lifetimes.expires_in);
      g.refresh_token = fresh.refresh;
      g.refresh_expires_at = now + absl::Seconds(lifetimes.refresh_token_expires_in);
      by_refresh_[g.refresh_token] = id;
    }
    return g;
  }

  static Reply TokenReply(const GrantRecord& g, const Lifetimes& lifetimes) {
    json::object body;
    body["access_token"] = g.access_token;
    body["token_type"] = "bearer";
    body["scope"] = g.scope;
    if (lifetimes.expires_in) {
      body["refresh_token"] = g.refresh_token;
      body["expires_in"] = *lifetimes.expires_in;
      body["refresh_token_expires_in"] = lifetimes.refresh_token_expires_in;
    }
    Reply r = JsonReply(200, body);
    r.headers.emplace_back("Pragma", "no-cache");
    return r;
  }

  const GrantRecord* GrantForAccessLocked(const std::string& token, absl::Time now) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    const auto it = by_access_.find(token);
    if (it == by_access_.end()) {
      return nullptr;
    }
    const GrantRecord& g = grants_.at(it->second);
    if (g.revoked || (g.access_expires_at && now >= *g.access_expires_at)) {
      return nullptr;
    }
    return &g;
  }

  // The grant of the request's valid Bearer token, or nullptr.
  const GrantRecord* BearerGrantLocked(const Request& req, absl::Time now) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    const std::optional<std::string> token = AuthorizationCredentials(req, "Bearer");
    return token ? GrantForAccessLocked(*token, now) : nullptr;
  }

  // GET /_fake/stats: counters only, never a token or code.
  Reply Stats() const ABSL_LOCKS_EXCLUDED(mu_) {
    tb::MutexLock lock(&mu_);
    json::object calls;
    for (int k = 0; k < kCallKinds; ++k) {
      calls[CallKindName(static_cast<CallKind>(k))] = calls_[k];
    }
    json::array reused;
    for (const int64_t id : reused_token_ids_) {
      reused.emplace_back(id);
    }
    json::object body;
    body["calls"] = std::move(calls);
    body["refresh_token_reuse_attempts"] = reuse_attempts_;
    body["reused_token_ids"] = std::move(reused);
    return JsonReply(200, body);
  }

  Reply TokenInfo(const Request& req) ABSL_LOCKS_EXCLUDED(mu_) {
    const absl::Time now = absl::Now();
    tb::MutexLock lock(&mu_);
    const GrantRecord* g = BearerGrantLocked(req, now);
    if (g == nullptr) {
      return InvalidToken();
    }
    json::object token;
    token["url"] = absl::StrCat(base_url_, "/api/v2/oauth/tokens/", g->id, ".json");
    token["id"] = g->id;
    token["user_id"] = kUserId;
    token["client_id"] = clients_.count(g->client_id) ? clients_.at(g->client_id).number : 0;
    json::array scopes;
    for (absl::string_view s : absl::StrSplit(g->scope, ' ', absl::SkipEmpty())) {
      scopes.emplace_back(json::string_view(s.data(), s.size()));
    }
    token["scopes"] = std::move(scopes);
    token["created_at"] = IsoTime(g->created_at);
    token["used_at"] = IsoTime(now);
    if (g->access_expires_at) {
      token["expires_at"] = IsoTime(*g->access_expires_at);
    } else {
      token["expires_at"] = nullptr;
    }
    if (!g->refresh_token.empty()) {
      token["refresh_token_expires_at"] = IsoTime(g->refresh_expires_at);
    } else {
      token["refresh_token_expires_at"] = nullptr;
    }
    json::object body;
    body["token"] = std::move(token);
    return JsonReply(200, body);
  }

  Reply RevokeById(const Request& req, int64_t id) ABSL_LOCKS_EXCLUDED(mu_) {
    const absl::Time now = absl::Now();
    tb::MutexLock lock(&mu_);
    const GrantRecord* bearer = BearerGrantLocked(req, now);
    if (bearer == nullptr) {
      return InvalidToken();
    }
    const auto it = grants_.find(id);
    if (it == grants_.end() || it->second.revoked) {
      return NotFound();
    }
    if (bearer->id != id) {
      json::object body;
      body["error"] = "Forbidden";
      body["description"] = "You do not have access to this page.";
      return JsonReply(403, body);
    }
    it->second.revoked = true;
    return Empty(204);
  }

  // Zendesk's quirk: the token stays valid.
  Reply RevokeCurrent(const Request& req) ABSL_LOCKS_EXCLUDED(mu_) {
    const absl::Time now = absl::Now();
    tb::MutexLock lock(&mu_);
    if (BearerGrantLocked(req, now) == nullptr) {
      return InvalidToken();
    }
    return Empty(204);
  }

  // RFC 7009: 200 for unknown tokens too, and for another client's (not revoked).
  Reply RevokeRfc7009(const Request& req, const Call& call) ABSL_LOCKS_EXCLUDED(mu_) {
    if (!call.params.ok()) {
      return OAuthError(400, "invalid_request", std::string(call.params.status().message()));
    }
    const Params& p = *call.params;
    tb::MutexLock lock(&mu_);
    ClientAuthResult auth = AuthenticateClientLocked(req, p);
    if (auth.error) {
      return *std::move(auth.error);
    }
    const std::string* token = Find(p, "token");
    if (token == nullptr) {
      return OAuthError(400, "invalid_request", "token is missing.");
    }
    std::optional<int64_t> id;
    if (const auto it = by_access_.find(*token); it != by_access_.end()) {
      id = it->second;
    } else if (const auto rit = by_refresh_.find(*token); rit != by_refresh_.end()) {
      id = rit->second;
    }
    if (id) {
      GrantRecord& g = grants_.at(*id);
      if (g.client_id == auth.client_id) {
        g.revoked = true;
      }
    }
    Reply r = Empty(200);
    r.content_type = "application/json";
    return r;
  }

  const bool auto_approve_;
  const bool stats_endpoint_;
  const absl::Duration code_lifetime_;
  const std::string base_url_;

  mutable tb::Mutex mu_;
  bool approve_ ABSL_GUARDED_BY(mu_) = true;
  std::map<std::string, ClientRecord> clients_ ABSL_GUARDED_BY(mu_);
  int64_t next_client_number_ ABSL_GUARDED_BY(mu_) = 360'000'100'001;
  std::unordered_map<std::string, CodeRecord> codes_ ABSL_GUARDED_BY(mu_);
  // Grants by token id. std::map: references stay valid while others are inserted.
  std::map<int64_t, GrantRecord> grants_ ABSL_GUARDED_BY(mu_);
  std::unordered_map<std::string, int64_t> by_access_ ABSL_GUARDED_BY(mu_);
  std::unordered_map<std::string, int64_t> by_refresh_ ABSL_GUARDED_BY(mu_);
  int64_t next_token_id_ ABSL_GUARDED_BY(mu_) = kFirstTokenId;
  std::array<int, kCallKinds> calls_ ABSL_GUARDED_BY(mu_) = {};
  std::array<std::deque<Failure>, kCallKinds> failures_ ABSL_GUARDED_BY(mu_);
  int reuse_attempts_ ABSL_GUARDED_BY(mu_) = 0;
  std::vector<int64_t> reused_token_ids_ ABSL_GUARDED_BY(mu_);
  std::string last_token_content_type_ ABSL_GUARDED_BY(mu_);
  std::vector<std::string> last_token_fields_ ABSL_GUARDED_BY(mu_);
  ClientAuth last_token_client_auth_ ABSL_GUARDED_BY(mu_) = ClientAuth::kNone;
  std::string last_authorize_query_ ABSL_GUARDED_BY(mu_);
};

// ---------------------------------------------------------------------------------------------
// HTTPS transport

bool IsValidHeaderValue(std::string_view v) {
  for (const char c : v) {
    const auto u = static_cast<unsigned char>(c);
    if ((u < 0x20 && c != '\t') || u == 0x7f) {
      return false;
    }
  }
  return true;
}

void BuildResponse(const Reply& reply, unsigned version, bool keep_alive, Response* out) {
  Response& res = *out;
  res = Response();
  res.version(version);
  res.result(reply.status);
  res.set(bhttp::field::server, "fake_provider");
  if (!reply.content_type.empty()) {
    res.set(bhttp::field::content_type, reply.content_type);
  }
  res.set(bhttp::field::cache_control, "no-store");
  for (const auto& [name, value] : reply.headers) {
    if (IsValidHeaderValue(value)) {
      res.insert(name, value);
    }
  }
  if (reply.status != 204 && reply.status != 304 && reply.status >= 200) {
    res.body() = reply.body;
    res.content_length(res.body().size());
  }
  res.keep_alive(keep_alive);
}

class Session;

// What the listener and every session share. Outlives them all (each holds a shared_ptr).
// Thread-safe.
class Core {
 public:
  Core(const FakeProviderOptions& options, std::string base_url, ssl::context& ssl_ctx)
      : idle_timeout_(options.idle_timeout),
        state_(options, std::move(base_url)),
        ssl_ctx_(ssl_ctx) {}

  State& state() { return state_; }
  ssl::context& ssl_ctx() { return ssl_ctx_; }
  absl::Duration idle_timeout() const { return idle_timeout_; }

  bool Register(const std::shared_ptr<Session>& s) ABSL_LOCKS_EXCLUDED(mu_) {
    tb::MutexLock lock(&mu_);
    if (stopping_) {
      return false;
    }
    sessions_.emplace(s.get(), s);
    return true;
  }

  void Unregister(const Session* s) ABSL_LOCKS_EXCLUDED(mu_) {
    tb::MutexLock lock(&mu_);
    sessions_.erase(s);
  }

  bool stopping() const ABSL_LOCKS_EXCLUDED(mu_) {
    tb::MutexLock lock(&mu_);
    return stopping_;
  }

  // True, with the live sessions, for the first caller only.
  bool BeginStop(std::vector<std::shared_ptr<Session>>* live) ABSL_LOCKS_EXCLUDED(mu_) {
    tb::MutexLock lock(&mu_);
    if (stopping_) {
      return false;
    }
    stopping_ = true;
    for (const auto& [ptr, weak] : sessions_) {
      if (std::shared_ptr<Session> s = weak.lock()) {
        live->push_back(std::move(s));
      }
    }
    return true;
  }

 private:
  const absl::Duration idle_timeout_;
  State state_;
  ssl::context& ssl_ctx_;  // owned by FakeProvider::Impl, which outlives every session
  mutable tb::Mutex mu_;
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::unordered_map<const Session*, std::weak_ptr<Session>> sessions_ ABSL_GUARDED_BY(mu_);
};

// One TLS connection: handshake, then read a request, answer it, repeat while keep-alive.
// Confined to its strand (the tcp_stream's executor); only Run() and Close() are called from
// elsewhere. Kept alive by the shared_ptr bound into its pending operation or timer.
class Session : public std::enable_shared_from_this<Session> {
 public:
  Session(tcp::socket&& socket, std::shared_ptr<Core> core)
      : stream_(std::move(socket), core->ssl_ctx()),
        timer_(stream_.get_executor()),
        core_(std::move(core)) {}

  ~Session() { core_->Unregister(this); }

  Session(const Session&) = delete;
  Session& operator=(const Session&) = delete;

  void Run() {
    net::dispatch(stream_.get_executor(),
                  beast::bind_front_handler(&Session::Handshake, shared_from_this()));
  }

  // Thread-safe: closes on the strand, cancelling any pending read, write or delay.
  void Close() {
    net::post(stream_.get_executor(),
              beast::bind_front_handler(&Session::CloseNow, shared_from_this()));
  }

 private:
  beast::tcp_stream& lowest() { return beast::get_lowest_layer(stream_); }

  void Handshake() {
    lowest().expires_after(ToChrono(kHandshakeTimeout));
    stream_.async_handshake(ssl::stream_base::server,
                            beast::bind_front_handler(&Session::OnHandshake, shared_from_this()));
  }

  void OnHandshake(beast::error_code ec) {
    if (ec) {
      spdlog::debug("fake_provider: TLS handshake failed: {}", ec.message());
      CloseNow();
      return;
    }
    ReadRequest();
  }

  // One idle_timeout covers both the wait for a keep-alive request and reading it.
  void ReadRequest() {
    if (core_->stopping()) {
      CloseNow();
      return;
    }
    parser_.emplace();
    parser_->header_limit(static_cast<std::uint32_t>(kHeaderLimit));
    parser_->body_limit(kBodyLimit);
    lowest().expires_after(ToChrono(core_->idle_timeout()));
    bhttp::async_read(stream_, buffer_, *parser_,
                      beast::bind_front_handler(&Session::OnRead, shared_from_this()));
  }

  void OnRead(beast::error_code ec, std::size_t /*bytes*/) {
    if (ec == bhttp::error::end_of_stream) {
      Shutdown();
      return;
    }
    if (ec) {
      static const beast::error_category& kHttpCategory =
          bhttp::make_error_code(bhttp::error::bad_method).category();
      if (ec.category() != kHttpCategory || ec == bhttp::error::partial_message) {
        CloseNow();  // peer gone, timeout, TLS error or Stop()
        return;
      }
      const unsigned status = ec == bhttp::error::body_limit     ? 413
                              : ec == bhttp::error::header_limit ? 431
                                                                 : 400;
      Reply r = OAuthError(status, "invalid_request", "Malformed HTTP request.");
      call_ = Call();
      call_.path = "(unparsed)";
      method_ = "-";
      reply_ = std::move(r);
      keep_alive_ = false;
      Write();
      return;
    }
    lowest().expires_never();
    req_ = parser_->release();
    method_ = ToStd(req_.method_string());
    try {
      call_ = core_->state().Begin(req_);
    } catch (const std::exception& e) {
      spdlog::error("fake_provider: routing threw: {}", e.what());
      CloseNow();
      return;
    }
    const Failure* f = call_.failure ? &*call_.failure : nullptr;
    if (f != nullptr && f->delay_before > absl::ZeroDuration()) {
      timer_.expires_after(ToChrono(f->delay_before));
      timer_.async_wait(beast::bind_front_handler(&Session::OnDelayBefore, shared_from_this()));
      return;
    }
    Process();
  }

  void OnDelayBefore(beast::error_code ec) {
    if (ec) {  // Stop()
      return;
    }
    Process();
  }

  void Process() {
    const Failure none;
    const Failure& f = call_.failure ? *call_.failure : none;
    const bool fault = f.reset_connection || f.http_status != 0 || !f.garbage_body.empty();
    reset_ = f.reset_connection;
    if (!fault || f.process_first) {
      try {
        reply_ = core_->state().Process(req_, call_);
      } catch (const std::exception& e) {
        spdlog::error("fake_provider: handler threw: {}", e.what());
        reply_ = OAuthError(500, "server_error", "internal error");
      }
    }
    if (f.http_status != 0) {
      reply_ = FaultReply(f);
    } else if (!f.garbage_body.empty()) {
      reply_ = Reply();
      reply_.body = f.garbage_body;
    }
    keep_alive_ = req_.keep_alive();
    if (f.delay_after > absl::ZeroDuration()) {
      timer_.expires_after(ToChrono(f.delay_after));
      timer_.async_wait(beast::bind_front_handler(&Session::OnDelayAfter, shared_from_this()));
      return;
    }
    Finish();
  }

  void OnDelayAfter(beast::error_code ec) {
    if (ec) {  // Stop()
      return;
    }
    Finish();
  }

  void Finish() {
    if (reset_) {
      spdlog::debug("fake_provider: {} {} -> reset ({})", method_, LoggablePath(),
                    CallKindName(call_.kind));
      Reset();
      return;
    }
    Write();
  }

  void Write() {
    if (core_->stopping()) {
      keep_alive_ = false;
    }
    try {
      BuildResponse(reply_, req_.version() == 10 ? 10 : 11, keep_alive_, &res_);
    } catch (const std::exception& e) {
      spdlog::error("fake_provider: cannot build response: {}", e.what());
      CloseNow();
      return;
    }
    spdlog::debug("fake_provider: {} {} -> {} ({})", method_, LoggablePath(), reply_.status,
                  CallKindName(call_.kind));
    lowest().expires_after(ToChrono(kWriteTimeout));
    bhttp::async_write(stream_, res_,
                       beast::bind_front_handler(&Session::OnWrite, shared_from_this()));
  }

  void OnWrite(beast::error_code ec, std::size_t /*bytes*/) {
    res_ = Response();
    if (ec) {
      CloseNow();
      return;
    }
    if (!keep_alive_) {
      Shutdown();
      return;
    }
    ReadRequest();
  }

  // TLS close_notify, then close (bounded: the peer may never answer it).
  void Shutdown() {
    lowest().expires_after(ToChrono(kShutdownTimeout));
    stream_.async_shutdown([self = shared_from_this()](beast::error_code) { self->CloseNow(); });
  }

  // "The answer was lost": RST instead of an answer or a TLS close_notify.
  void Reset() {
    beast::error_code ignored;
    lowest().socket().set_option(net::socket_base::linger(true, 0), ignored);
    timer_.cancel();
    lowest().close();
  }

  void CloseNow() {
    timer_.cancel();
    beast::error_code ignored;
    lowest().socket().shutdown(tcp::socket::shutdown_both, ignored);
    lowest().close();
  }

  std::string LoggablePath() const {
    if (call_.path.size() > kMaxLoggedPath) {
      return call_.path.substr(0, kMaxLoggedPath) + "...";
    }
    return call_.path;
  }

  ssl::stream<beast::tcp_stream> stream_;
  net::steady_timer timer_;
  const std::shared_ptr<Core> core_;
  beast::flat_buffer buffer_;
  std::optional<bhttp::request_parser<bhttp::string_body>> parser_;
  Request req_;
  Call call_;
  Reply reply_;
  Response res_;        // lives until its write completes
  std::string method_;  // of the current request, for the log line
  bool keep_alive_ = true;
  bool reset_ = false;
};

// Accepts connections and starts a Session for each. Confined to the acceptor's strand, except
// Run() and Close().
class Listener : public std::enable_shared_from_this<Listener> {
 public:
  Listener(net::io_context& ioc, tcp::acceptor acceptor, std::shared_ptr<Core> core)
      : ioc_(ioc), acceptor_(std::move(acceptor)), core_(std::move(core)) {}

  void Run() {
    net::dispatch(acceptor_.get_executor(),
                  beast::bind_front_handler(&Listener::DoAccept, shared_from_this()));
  }

  void Close() {
    net::post(acceptor_.get_executor(), [self = shared_from_this()] {
      beast::error_code ignored;
      self->acceptor_.close(ignored);
    });
  }

 private:
  void DoAccept() {
    if (!acceptor_.is_open()) {
      return;
    }
    acceptor_.async_accept(net::make_strand(ioc_),
                           beast::bind_front_handler(&Listener::OnAccept, shared_from_this()));
  }

  void OnAccept(beast::error_code ec, tcp::socket socket) {
    if (ec) {
      if (ec == net::error::operation_aborted || !acceptor_.is_open()) {
        return;
      }
      // EMFILE and friends: a test fake can afford to just keep trying.
      spdlog::warn("fake_provider: accept failed: {}", ec.message());
      DoAccept();
      return;
    }
    auto session = std::make_shared<Session>(std::move(socket), core_);
    if (core_->Register(session)) {
      session->Run();
    }
    DoAccept();
  }

  net::io_context& ioc_;
  tcp::acceptor acceptor_;
  const std::shared_ptr<Core> core_;
};

void RunIoThread(net::io_context& ioc) {
  for (;;) {
    try {
      ioc.run();
      return;
    } catch (const std::exception& e) {
      spdlog::error("fake_provider: io thread caught: {}", e.what());
    } catch (...) {
      spdlog::error("fake_provider: io thread caught a non-standard exception");
    }
  }
}

std::string UrlHost(const net::ip::address& address) {
  if (address.is_unspecified()) {
    return "127.0.0.1";
  }
  if (address.is_v6()) {
    return absl::StrCat("[", address.to_string(), "]");
  }
  return address.to_string();
}

}  // namespace

const char* CallKindName(CallKind kind) {
  switch (kind) {
    case CallKind::kAuthorize:
      return "authorize";
    case CallKind::kTokenCode:
      return "token_code";
    case CallKind::kTokenRefresh:
      return "token_refresh";
    case CallKind::kTokenInfo:
      return "token_info";
    case CallKind::kRevokeById:
      return "revoke_by_id";
    case CallKind::kRevokeCurrent:
      return "revoke_current";
    case CallKind::kRevokeRfc7009:
      return "revoke_rfc7009";
    case CallKind::kOther:
      return "other";
  }
  return "unknown";
}

class FakeProvider::Impl {
 public:
  Impl() = default;
  Impl(const Impl&) = delete;
  Impl& operator=(const Impl&) = delete;

  ~Impl() {
    assert(!ioc_.get_executor().running_in_this_thread());
    Stop();
    if (remove_ca_file_) {
      unlink(ca_file_.c_str());
    }
  }

  absl::Status Init(FakeProviderOptions options) {
    if (options.port < 0 || options.port > 65535) {
      return absl::InvalidArgumentError(absl::StrCat("fake_provider: bad port ", options.port));
    }
    for (absl::Duration d : {options.code_lifetime, options.idle_timeout}) {
      if (d <= absl::ZeroDuration() || d == absl::InfiniteDuration()) {
        return absl::InvalidArgumentError("fake_provider: durations must be positive and finite");
      }
    }
    beast::error_code ec;
    const net::ip::address address = net::ip::make_address(options.address, ec);
    if (ec) {
      return absl::InvalidArgumentError(
          absl::StrCat("fake_provider: bad address '", options.address, "': ", ec.message()));
    }

    TestCaOptions ca_options;
    ca_options.ip_addresses = {"127.0.0.1", "::1"};
    if (!address.is_unspecified() && !address.is_loopback()) {
      ca_options.ip_addresses.push_back(address.to_string());
    }
    absl::StatusOr<TestCertificates> certs = GenerateTestCertificates(ca_options);
    if (!certs.ok()) {
      return certs.status();
    }
    ca_pem_ = certs->ca_cert_pem;
    if (options.ca_file_path.empty()) {
      static std::atomic<int> counter{0};
      const char* tmpdir = std::getenv("TMPDIR");
      ca_file_ = absl::StrCat(tmpdir != nullptr && *tmpdir != '\0' ? tmpdir : "/tmp",
                              "/fake-provider-ca-", getpid(), "-", counter.fetch_add(1), ".pem");
      remove_ca_file_ = true;
    } else {
      ca_file_ = options.ca_file_path;
    }
    if (absl::Status s = WritePemFile(ca_file_, ca_pem_); !s.ok()) {
      remove_ca_file_ = false;
      return s;
    }

    ssl_ctx_.set_options(ssl::context::default_workarounds | ssl::context::no_sslv2 |
                             ssl::context::no_sslv3 | ssl::context::no_tlsv1 |
                             ssl::context::no_tlsv1_1,
                         ec);
    if (!ec) {
      ssl_ctx_.use_certificate_chain(net::buffer(certs->server_cert_pem), ec);
    }
    if (!ec) {
      ssl_ctx_.use_private_key(net::buffer(certs->server_key_pem), ssl::context::pem, ec);
    }
    if (ec) {
      return absl::InternalError(absl::StrCat("fake_provider: TLS setup: ", ec.message()));
    }

    const tcp::endpoint endpoint(address, static_cast<unsigned short>(options.port));
    tcp::acceptor acceptor(net::make_strand(ioc_));
    const std::string where = absl::StrCat("fake_provider on ", options.address, ":", options.port);
    if (acceptor.open(endpoint.protocol(), ec); ec) {
      return absl::UnavailableError(absl::StrCat(where, ": socket: ", ec.message()));
    }
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
    base_url_ = absl::StrCat("https://", UrlHost(address), ":", port_);

    core_ = std::make_shared<Core>(options, base_url_, ssl_ctx_);
    listener_ = std::make_shared<Listener>(ioc_, std::move(acceptor), core_);
    listener_->Run();
    work_.emplace(net::make_work_guard(ioc_));
    tb::MutexLock lock(&join_mu_);
    try {
      for (int i = 0; i < kIoThreads; ++i) {
        threads_.emplace_back([this] { RunIoThread(ioc_); });
      }
    } catch (const std::system_error& e) {
      return absl::UnavailableError(absl::StrCat(where, ": cannot start io threads: ", e.what()));
    }
    spdlog::info("fake_provider listening on {} (CA file {})", base_url_, ca_file_);
    return absl::OkStatus();
  }

  void Stop() {
    std::vector<std::shared_ptr<Session>> live;
    if (core_ != nullptr && core_->BeginStop(&live)) {
      listener_->Close();
      for (const std::shared_ptr<Session>& s : live) {
        s->Close();
      }
      live.clear();
      work_.reset();
    }
    if (ioc_.get_executor().running_in_this_thread()) {
      return;
    }
    // Held across the joins: a concurrent Stop() must not return before everything is closed.
    tb::MutexLock lock(&join_mu_);
    for (std::thread& t : threads_) {
      if (t.joinable()) {
        t.join();
      }
    }
  }

  State& state() { return core_->state(); }
  int port() const { return port_; }
  const std::string& base_url() const { return base_url_; }
  const std::string& ca_file() const { return ca_file_; }
  const std::string& ca_pem() const { return ca_pem_; }

 private:
  // Declared first, destroyed last: sessions still queued in ioc_ refer to it.
  ssl::context ssl_ctx_{ssl::context::tls_server};
  net::io_context ioc_{kIoThreads};
  std::optional<net::executor_work_guard<net::io_context::executor_type>> work_;
  std::shared_ptr<Core> core_;          // set in Init(), then read-only
  std::shared_ptr<Listener> listener_;  // set in Init(), then read-only
  int port_ = 0;
  std::string base_url_;
  std::string ca_file_;
  std::string ca_pem_;
  bool remove_ca_file_ = false;
  tb::Mutex join_mu_;
  std::vector<std::thread> threads_ ABSL_GUARDED_BY(join_mu_);
};

absl::StatusOr<std::unique_ptr<FakeProvider>> FakeProvider::Start(FakeProviderOptions options) {
  try {
    auto impl = std::make_unique<Impl>();
    if (absl::Status s = impl->Init(std::move(options)); !s.ok()) {
      return s;
    }
    return std::unique_ptr<FakeProvider>(new FakeProvider(std::move(impl)));
  } catch (const std::exception& e) {
    return absl::UnavailableError(absl::StrCat("fake_provider: start failed: ", e.what()));
  }
}

FakeProvider::FakeProvider(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
FakeProvider::~FakeProvider() = default;

void FakeProvider::Stop() { impl_->Stop(); }
int FakeProvider::port() const { return impl_->port(); }
std::string FakeProvider::base_url() const { return impl_->base_url(); }
std::string FakeProvider::ca_file() const { return impl_->ca_file(); }
std::string FakeProvider::ca_pem() const { return impl_->ca_pem(); }

void FakeProvider::AddClient(std::string client_id, std::string client_secret) {
  impl_->state().AddClient(std::move(client_id), std::move(client_secret));
}
void FakeProvider::FailNext(CallKind kind, Failure failure) {
  impl_->state().FailNext(kind, std::move(failure));
}
void FakeProvider::SetAuthorizeDecision(bool approve) {
  impl_->state().SetAuthorizeDecision(approve);
}
void FakeProvider::RevokeAllTokens() { impl_->state().RevokeAll(); }
void FakeProvider::ExpireAllAccessTokens() { impl_->state().ExpireAllAccessTokens(); }
int FakeProvider::calls(CallKind kind) const { return impl_->state().calls(kind); }
bool FakeProvider::IsAccessTokenValid(const std::string& access_token) const {
  return impl_->state().IsAccessTokenValid(access_token);
}
bool FakeProvider::IsRefreshTokenValid(const std::string& refresh_token) const {
  return impl_->state().IsRefreshTokenValid(refresh_token);
}
std::optional<int64_t> FakeProvider::TokenIdOf(const std::string& access_token) const {
  return impl_->state().TokenIdOf(access_token);
}
int FakeProvider::refresh_token_reuse_attempts() const {
  return impl_->state().refresh_token_reuse_attempts();
}
std::string FakeProvider::last_token_request_content_type() const {
  return impl_->state().last_token_request_content_type();
}
std::vector<std::string> FakeProvider::last_token_request_fields() const {
  return impl_->state().last_token_request_fields();
}
ClientAuth FakeProvider::last_token_request_client_auth() const {
  return impl_->state().last_token_request_client_auth();
}
std::string FakeProvider::last_authorize_query() const {
  return impl_->state().last_authorize_query();
}

}  // namespace tb::testing
