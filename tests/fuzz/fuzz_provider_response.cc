// libFuzzer target: what the provider client reads from and writes to a provider
// (server/src/provider/internal/oauth_wire.h and http_util.h).
//
// The input is a response body (token JSON, token info, an error body, or a form body as some
// providers answer) and, on the side, a URL / NO_PROXY list / parameter list. Properties:
//   ParseTokenResponse  success: the grant keeps the header's promises and survives being
//                       written back as JSON and parsed again; failure: UNAVAILABLE with a
//                       short reason, never body text.
//   ParseTokenId        success is always a usable id.
//   OAuthErrorCode      "" or [A-Za-z0-9_.-]{1,64}.
//   ErrorForResponse    never OK, the code the table promises, and the body matters only
//                       through OAuthErrorCode (the same status for {"error":"<code>"}).
//   FormUrlEncode, FormBody, JsonBody, BasicAuthorization: decode back to their input.
//   ParseHttpUrl, ParseProxyUrl, BypassProxy: consistent results, no secret in messages.

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include <boost/json/parse.hpp>
#include <boost/json/serialize.hpp>
#include <boost/json/value.hpp>

#include "absl/strings/ascii.h"
#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "server/src/core/errors.h"
#include "server/src/provider/internal/http_util.h"
#include "server/src/provider/internal/oauth_wire.h"

namespace {

namespace json = boost::json;
namespace wire = tb::provider::internal;

const absl::Time kIssuedAt = absl::FromUnixSeconds(1'700'000'000);
const std::vector<std::string> kDefaultScopes = {"read", "write"};

void Fail(const char* what, absl::string_view detail = "") {
  std::fprintf(stderr, "fuzz_provider_response: property violated: %s %.*s\n", what,
               static_cast<int>(detail.size()), detail.data());
  std::abort();
}

std::optional<json::value> Json(absl::string_view s) {
  boost::system::error_code ec;
  json::value v = json::parse(json::string_view(s.data(), s.size()), ec);
  if (ec) {
    return std::nullopt;
  }
  return v;
}

// RFC 3629 UTF-8: no overlong forms, no surrogates, nothing above U+10FFFF.
bool IsUtf8(absl::string_view s) {
  size_t i = 0;
  while (i < s.size()) {
    const unsigned char c = static_cast<unsigned char>(s[i]);
    int n = 0;
    uint32_t cp = 0;
    if (c < 0x80) {
      ++i;
      continue;
    } else if ((c & 0xE0) == 0xC0) {
      n = 1;
      cp = c & 0x1F;
    } else if ((c & 0xF0) == 0xE0) {
      n = 2;
      cp = c & 0x0F;
    } else if ((c & 0xF8) == 0xF0) {
      n = 3;
      cp = c & 0x07;
    } else {
      return false;
    }
    if (i + n >= s.size()) {
      return false;
    }
    for (int k = 1; k <= n; ++k) {
      const unsigned char d = static_cast<unsigned char>(s[i + k]);
      if ((d & 0xC0) != 0x80) {
        return false;
      }
      cp = (cp << 6) | (d & 0x3F);
    }
    static constexpr uint32_t kMin[] = {0, 0x80, 0x800, 0x10000};
    if (cp < kMin[n] || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) {
      return false;
    }
    i += n + 1;
  }
  return true;
}

// A reason: words of letters, underscores, dots and dashes, short. Body content would need other
// bytes, or be longer.
void CheckReason(const absl::Status& s) {
  if (s.code() != absl::StatusCode::kUnavailable) {
    Fail("a parse error is not UNAVAILABLE", s.ToString());
  }
  const absl::string_view m = s.message();
  if (m.empty() || m.size() > 64 || !std::all_of(m.begin(), m.end(), [](char c) {
        return absl::ascii_isalpha(static_cast<unsigned char>(c)) || c == ' ' || c == '_' ||
               c == '.' || c == '-';
      })) {
    Fail("a parse error's message is not a bare reason", m);
  }
}

int64_t SecondsBetween(absl::Time from, absl::Time to) { return absl::ToInt64Seconds(to - from); }

bool SameGrant(const tb::core::Grant& a, const tb::core::Grant& b) {
  const auto same_time = [](const std::optional<absl::Time>& x,
                            const std::optional<absl::Time>& y) { return x == y; };
  const bool same_refresh =
      a.refresh_token.has_value() == b.refresh_token.has_value() &&
      (!a.refresh_token || a.refresh_token->Reveal() == b.refresh_token->Reveal());
  return a.access_token.Reveal() == b.access_token.Reveal() && a.token_type == b.token_type &&
         a.scopes == b.scopes && same_refresh && a.issued_at == b.issued_at &&
         same_time(a.expires_at, b.expires_at) &&
         same_time(a.refresh_token_expires_at, b.refresh_token_expires_at);
}

void CheckTokenResponse(absl::string_view body) {
  absl::StatusOr<tb::core::Grant> g = wire::ParseTokenResponse(body, kDefaultScopes, kIssuedAt);
  if (!g.ok()) {
    CheckReason(g.status());
    return;
  }
  if (g->access_token.Reveal().empty()) {
    Fail("empty access token accepted");
  }
  if (g->token_type.empty() ||
      (absl::EqualsIgnoreCase(g->token_type, "bearer") && g->token_type != "Bearer")) {
    Fail("token_type not normalized", g->token_type);
  }
  if (g->scopes.empty()) {
    Fail("no scopes (the defaults apply when none are given)");
  }
  for (const std::string& s : g->scopes) {
    if (s.empty() || absl::StrContains(s, ' ')) {
      Fail("a scope is empty or holds a space", s);
    }
  }
  if (g->issued_at != kIssuedAt || g->generation != 0 || g->refresh_at.has_value()) {
    Fail("issued_at, generation or refresh_at not as documented");
  }
  if (g->expires_at && *g->expires_at <= kIssuedAt) {
    Fail("expires_at not after issued_at");
  }
  if (g->refresh_token && g->refresh_token->Reveal().empty()) {
    Fail("empty refresh token kept");
  }
  if (g->refresh_token_expires_at &&
      (!g->refresh_token || *g->refresh_token_expires_at <= kIssuedAt)) {
    Fail("refresh_token_expires_at without a refresh token, or not after issued_at");
  }

  // Written back the way a provider would send it, the grant parses to itself.
  json::object o;
  o["access_token"] =
      json::string_view(g->access_token.Reveal().data(), g->access_token.Reveal().size());
  o["token_type"] = g->token_type;
  o["scope"] = absl::StrJoin(g->scopes, " ");
  if (g->expires_at) {
    o["expires_in"] = SecondsBetween(kIssuedAt, *g->expires_at);
  }
  if (g->refresh_token) {
    o["refresh_token"] =
        json::string_view(g->refresh_token->Reveal().data(), g->refresh_token->Reveal().size());
  }
  if (g->refresh_token_expires_at) {
    o["refresh_token_expires_in"] = SecondsBetween(kIssuedAt, *g->refresh_token_expires_at);
  }
  const std::string again_body = json::serialize(o);
  absl::StatusOr<tb::core::Grant> again =
      wire::ParseTokenResponse(again_body, kDefaultScopes, kIssuedAt);
  if (!again.ok()) {
    Fail("a parsed grant written back does not parse", again.status().ToString());
  }
  // expires_in is read in whole seconds; a fraction in the body is truncated on the first pass,
  // so the second is exact.
  if (!SameGrant(*g, *again)) {
    Fail("a parsed grant written back parses differently", again_body);
  }
}

void CheckTokenId(absl::string_view body) {
  absl::StatusOr<std::string> id = wire::ParseTokenId(body);
  if (!id.ok()) {
    CheckReason(id.status());
    return;
  }
  if (!wire::IsValidTokenId(*id)) {
    Fail("ParseTokenId returned an id that cannot go into a URL path", *id);
  }
}

bool IsCodeChar(char c) {
  return absl::ascii_isalnum(static_cast<unsigned char>(c)) || c == '_' || c == '.' || c == '-';
}

void CheckErrors(absl::string_view body, uint32_t selector) {
  const std::string code = wire::OAuthErrorCode(body);
  if (!code.empty() && (code.size() > 64 || !std::all_of(code.begin(), code.end(), IsCodeChar))) {
    Fail("OAuthErrorCode returned something that is not a code", code);
  }
  // Canonical body: only the code, in the simplest JSON.
  const std::string canonical = code.empty() ? "" : absl::StrCat("{\"error\":\"", code, "\"}");
  if (wire::OAuthErrorCode(canonical) != code) {
    Fail("OAuthErrorCode of the canonical body differs", code);
  }
  static constexpr int kStatuses[] = {400, 401, 403, 404, 408, 409, 422, 429, 500, 502, 503, 504,
                                      301, 302, 200, 204, 0,   -1,  100, 600, 999, 499, 399, 599};
  const int status = kStatuses[selector % (sizeof(kStatuses) / sizeof(kStatuses[0]))];
  const std::string retry_after = (selector & 0x100) ? "120" : "";
  for (const wire::Endpoint endpoint :
       {wire::Endpoint::kClientAuthenticated, wire::Endpoint::kBearer}) {
    const absl::Status s =
        wire::ErrorForResponse("provider 'zendesk' refresh", endpoint, status, body, retry_after);
    if (s.ok()) {
      Fail("ErrorForResponse returned OK");
    }
    if (!absl::StartsWith(s.message(), "provider 'zendesk' refresh: ")) {
      Fail("ErrorForResponse's message does not start with `what`", s.message());
    }
    absl::StatusCode want;
    if (status == 429) {
      want = absl::StatusCode::kResourceExhausted;
    } else if (status == 408 || (status >= 500 && status <= 599)) {
      want = absl::StatusCode::kUnavailable;
    } else if (status == 401 && endpoint == wire::Endpoint::kBearer && code != "invalid_grant") {
      want = absl::StatusCode::kUnauthenticated;
    } else if (status >= 300 && status <= 499) {
      want = absl::StatusCode::kFailedPrecondition;
    } else {
      want = absl::StatusCode::kUnavailable;
    }
    if (s.code() != want) {
      Fail("ErrorForResponse's code is not the table's", s.ToString());
    }
    if (status >= 400 && status <= 499 && status != 408 && status != 429 &&
        (code == "invalid_grant") != (tb::core::ReasonOf(s) == tb::core::Reason::kNeedsReauth)) {
      Fail("invalid_grant and kNeedsReauth do not go together", s.ToString());
    }
    const bool has_retry_after = s.GetPayload(wire::kRetryAfterPayloadUrl).has_value();
    if (has_retry_after != ((status == 429 || status == 503) && !retry_after.empty())) {
      Fail("Retry-After payload present when it should not be, or missing", s.ToString());
    }
    // The body counts only through its OAuth code.
    const absl::Status c = wire::ErrorForResponse("provider 'zendesk' refresh", endpoint, status,
                                                  canonical, retry_after);
    if (c != s) {
      Fail("ErrorForResponse depends on more of the body than its code", s.ToString());
    }
  }
}

// WHATWG application/x-www-form-urlencoded decoding of one value, strict: nullopt on a bad
// escape.
std::optional<std::string> FormDecode(absl::string_view s) {
  std::string out;
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] == '+') {
      out.push_back(' ');
    } else if (s[i] == '%') {
      if (i + 2 >= s.size()) {
        return std::nullopt;
      }
      int v = 0;
      for (int k = 1; k <= 2; ++k) {
        const char h = s[i + k];
        if (!absl::ascii_isxdigit(static_cast<unsigned char>(h))) {
          return std::nullopt;
        }
        v = v * 16 + (absl::ascii_isdigit(static_cast<unsigned char>(h))
                          ? h - '0'
                          : absl::ascii_tolower(static_cast<unsigned char>(h)) - 'a' + 10);
      }
      out.push_back(static_cast<char>(v));
      i += 2;
    } else {
      out.push_back(s[i]);
    }
  }
  return out;
}

void CheckEncodings(absl::string_view input) {
  const std::string encoded = wire::FormUrlEncode(input);
  for (const char c : encoded) {
    if (!absl::ascii_isalnum(static_cast<unsigned char>(c)) && c != '*' && c != '-' && c != '.' &&
        c != '_' && c != '+' && c != '%') {
      Fail("FormUrlEncode let a reserved byte through", encoded);
    }
  }
  if (FormDecode(encoded) != std::string(input)) {
    Fail("FormUrlEncode does not decode back", encoded);
  }

  // Parameters from the input: "name=value" pieces between '&'; names ending in _in are numbers.
  std::vector<wire::Param> params;
  for (absl::string_view piece : absl::StrSplit(input, '&')) {
    const size_t eq = piece.find('=');
    wire::Param p;
    p.name = std::string(piece.substr(0, eq));
    p.value = eq == absl::string_view::npos ? "" : std::string(piece.substr(eq + 1));
    p.number = absl::EndsWith(p.name, "_in");
    params.push_back(std::move(p));
    if (params.size() == 16) {
      break;
    }
  }
  const std::string form = wire::FormBody(params);
  std::vector<absl::string_view> pieces = absl::StrSplit(form, '&');
  if (pieces.size() != params.size()) {
    Fail("FormBody does not have one piece per parameter", form);
  }
  for (size_t i = 0; i < params.size(); ++i) {
    const size_t eq = pieces[i].find('=');
    if (eq == absl::string_view::npos || FormDecode(pieces[i].substr(0, eq)) != params[i].name ||
        FormDecode(pieces[i].substr(eq + 1)) != params[i].value) {
      Fail("FormBody does not decode back", form);
    }
  }

  // JSON bodies: the last value of each name, numbers where `number` holds an integer. Only
  // for valid UTF-8: JSON cannot carry other bytes (what JsonBody makes of them is checked
  // below, separately).
  const std::string body = wire::JsonBody(params);
  std::optional<json::value> parsed = Json(body);
  bool all_utf8 = true;
  for (const wire::Param& p : params) {
    all_utf8 = all_utf8 && IsUtf8(p.name) && IsUtf8(p.value);
  }
  if (!parsed || !parsed->is_object()) {
    if (all_utf8) {
      Fail("JsonBody made something that is not a JSON object", body);
    }
    return;
  }
  std::map<std::string, const wire::Param*> last;
  for (const wire::Param& p : params) {
    last[p.name] = &p;
  }
  const json::object& o = parsed->as_object();
  if (o.size() != last.size()) {
    Fail("JsonBody has the wrong number of members", body);
  }
  for (const auto& [name, p] : last) {
    const auto it = o.find(json::string_view(name.data(), name.size()));
    if (it == o.end()) {
      Fail("JsonBody lost a member", body);
    }
    int64_t n = 0;
    if (p->number && absl::SimpleAtoi(p->value, &n)) {
      if (!it->value().is_int64() || it->value().as_int64() != n) {
        Fail("JsonBody changed a number", body);
      }
    } else if (!it->value().is_string() ||
               std::string(it->value().as_string().data(), it->value().as_string().size()) !=
                   p->value) {
      Fail("JsonBody changed a string", body);
    }
  }

  // client_secret_basic: "Basic " base64(form(id) ":" form(secret)) splits at the one ':'.
  const size_t colon = input.find(':');
  const absl::string_view id = input.substr(0, colon);
  const absl::string_view secret =
      colon == absl::string_view::npos ? absl::string_view() : input.substr(colon + 1);
  const std::string basic = wire::BasicAuthorization(id, secret);
  std::string decoded;
  if (!absl::StartsWith(basic, "Basic ") ||
      !absl::Base64Unescape(absl::string_view(basic).substr(6), &decoded)) {
    Fail("BasicAuthorization is not Basic base64", basic);
  }
  const std::vector<absl::string_view> halves = absl::StrSplit(decoded, ':');
  if (halves.size() != 2 || FormDecode(halves[0]) != std::string(id) ||
      FormDecode(halves[1]) != std::string(secret)) {
    Fail("BasicAuthorization does not decode back", decoded);
  }
}

void CheckUrls(absl::string_view input) {
  absl::StatusOr<wire::ParsedUrl> url = wire::ParseHttpUrl(input);
  if (url.ok()) {
    if (url->host.empty() || url->host != absl::AsciiStrToLower(url->host)) {
      Fail("ParseHttpUrl host empty or not lower case", url->host);
    }
    if (url->target.empty() || url->target[0] != '/') {
      Fail("ParseHttpUrl target is not origin-form", url->target);
    }
    if (url->port == 0) {
      Fail("ParseHttpUrl port 0");
    }
    const bool v6 = absl::StrContains(url->host, ':');
    const std::string bracketed = v6 ? absl::StrCat("[", url->host, "]") : url->host;
    const std::string authority = absl::StrCat(bracketed, ":", url->port);
    if (url->authority != authority) {
      Fail("ParseHttpUrl authority inconsistent", url->authority);
    }
    const bool default_port = url->port == (url->tls ? 443 : 80);
    if (url->host_header != (default_port ? bracketed : authority)) {
      Fail("ParseHttpUrl host_header inconsistent", url->host_header);
    }
    if (url->origin != absl::StrCat(url->tls ? "https://" : "http://", authority)) {
      Fail("ParseHttpUrl origin inconsistent", url->origin);
    }
    // The pieces make the same URL again.
    absl::StatusOr<wire::ParsedUrl> again =
        wire::ParseHttpUrl(absl::StrCat(url->origin, url->target));
    if (!again.ok() || again->host != url->host || again->port != url->port ||
        again->tls != url->tls || again->target != url->target) {
      Fail("ParseHttpUrl of origin+target differs", absl::StrCat(url->origin, url->target));
    }
    const std::string no_proxy = "localhost,.internal,10.0.0.0/8,[::1]:8443,*.zendesk.com";
    const bool bypass = wire::BypassProxy(no_proxy, url->host, url->port);
    if (bypass != wire::BypassProxy(absl::AsciiStrToUpper(no_proxy), url->host, url->port)) {
      Fail("BypassProxy depends on case", url->host);
    }
    if (!wire::BypassProxy("*", url->host, url->port)) {
      Fail("BypassProxy(\"*\") is false", url->host);
    }
  } else {
    if (url.status().code() != absl::StatusCode::kInvalidArgument) {
      Fail("ParseHttpUrl error is not INVALID_ARGUMENT", url.status().ToString());
    }
    if (!absl::StrContains(input, '?') && !absl::StrContains(input, '#')) {
      absl::StatusOr<wire::ParsedUrl> q =
          wire::ParseHttpUrl(absl::StrCat(input, "?code=QUERYSECRET42"));
      if (!q.ok() && absl::StrContains(q.status().message(), "QUERYSECRET42")) {
        Fail("ParseHttpUrl error repeats the query", q.status().message());
      }
    }
  }

  // The input as the host part of a proxy URL with a password: the password never shows.
  for (const std::string& proxy :
       {std::string(input), absl::StrCat("http://user:PROXYPASS42@", input)}) {
    absl::StatusOr<wire::ProxyConfig> p = wire::ParseProxyUrl(proxy);
    if (!p.ok()) {
      if (p.status().code() != absl::StatusCode::kInvalidArgument) {
        Fail("ParseProxyUrl error is not INVALID_ARGUMENT", p.status().ToString());
      }
      if (absl::StrContains(p.status().message(), "PROXYPASS42")) {
        Fail("ParseProxyUrl error repeats the password");
      }
    } else if (p->host.empty()) {
      Fail("ParseProxyUrl gave an empty host");
    }
  }

  // The input as a NO_PROXY list.
  for (const auto& [host, port] : {std::pair<const char*, uint16_t>{"acme.zendesk.com", 443},
                                   {"10.1.2.3", 443},
                                   {"::1", 8443},
                                   {"localhost", 80}}) {
    const bool bypass = wire::BypassProxy(input, host, port);
    if (bypass != wire::BypassProxy(input, absl::AsciiStrToUpper(host), port)) {
      Fail("BypassProxy depends on the host's case", host);
    }
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const absl::string_view input(reinterpret_cast<const char*>(data), size);
  uint32_t selector = 0;
  for (size_t i = 0; i < std::min<size_t>(size, 4); ++i) {
    selector = selector * 31 + data[size - 1 - i];
  }
  CheckTokenResponse(input);
  CheckTokenId(input);
  CheckErrors(input, selector);
  CheckEncodings(input);
  CheckUrls(input);
  return 0;
}
