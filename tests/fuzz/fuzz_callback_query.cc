// libFuzzer target: the OAuth routes of the public port (server/src/http/oauth_routes.h).
//
// The input is an HTTP request head as a browser sends it:
//   GET /oauth/callback?state=...&code=... HTTP/1.1
//   Cookie: tb_oauth=...
// (a first line without a space is a bare target, method GET). Properties:
//   ParseQuery   failure is INVALID_ARGUMENT; success has at most 32 parameters and is what a
//                reference WHATWG form-urlencoded decoder makes of the query, and re-encoding
//                the result parses back to it.
//   CookieValue  never holds a ';'.
//   HtmlEscape   leaves no metacharacter, and unescapes to its input.
//   the handler  over a real AuthorizationFlow (in-memory stores, fake provider, fixed key and
//                zero "randomness", rebuilt for every input so that inputs stay independent):
//                one response; a status from the routes' list (never 500); the security headers
//                on every answer; no CR or LF in any header; a 302 only for the minted link and
//                a 200 only for the callback with its state and cookie; HTML bodies whose only
//                tags are the page template's, with the provider's error_description escaped.
// Before each input a link is minted and started, so the seeds can carry a live state and
// cookie: run with FUZZ_CALLBACK_PRINT=1 to print them (and each request's status).

#include <spdlog/spdlog.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/string_view.h"
#include "absl/strings/strip.h"
#include "server/src/core/provider_presets.h"
#include "server/src/crypto/openssl_digest.h"
#include "server/src/http/oauth_routes.h"
#include "server/src/oauth/authorization_flow.h"
#include "server/src/store/in_memory_flow_store.h"
#include "server/src/store/in_memory_token_store.h"
#include "tests/fakes/fake_clock.h"
#include "tests/fakes/fake_provider_client.h"

namespace {

using tb::http::HttpRequest;
using tb::http::HttpResponse;

void Fail(const char* what, absl::string_view detail = "") {
  std::fprintf(stderr, "fuzz_callback_query: property violated: %s %.*s\n", what,
               static_cast<int>(detail.size()), detail.data());
  std::abort();
}

// ---------------------------------------------------------------------------------------------
// Reference decoder: the WHATWG application/x-www-form-urlencoded parser (URL standard 5.1),
// '+' to space before percent-decoding, with ParseQuery's choices layered on: an empty piece
// between '&'s is a parameter with an empty name, a malformed escape is an error.

std::optional<std::string> PercentDecode(absl::string_view s) {
  std::string out;
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] != '%') {
      out.push_back(s[i]);
      continue;
    }
    if (i + 2 >= s.size() || !absl::ascii_isxdigit(static_cast<unsigned char>(s[i + 1])) ||
        !absl::ascii_isxdigit(static_cast<unsigned char>(s[i + 2]))) {
      return std::nullopt;
    }
    const auto hex = [](char h) {
      return absl::ascii_isdigit(static_cast<unsigned char>(h))
                 ? h - '0'
                 : absl::ascii_tolower(static_cast<unsigned char>(h)) - 'a' + 10;
    };
    out.push_back(static_cast<char>(hex(s[i + 1]) * 16 + hex(s[i + 2])));
    i += 2;
  }
  return out;
}

// FUZZ_CALLBACK_KNOWN_BUGS=plus: mimic ParseQuery's '+' handling (it turns '+' into a space
// after percent-decoding, so "%2B" comes out as a space), to keep fuzzing past that reported
// bug (tests/fuzz/regressions/fuzz_callback_query/plus_after_decode) until it is fixed.
bool KnownPlusBug() {
  static const bool known = [] {
    const char* v = std::getenv("FUZZ_CALLBACK_KNOWN_BUGS");
    return v != nullptr && absl::StrContains(v, "plus");
  }();
  return known;
}

std::optional<std::map<std::string, std::string>> ReferenceParse(absl::string_view query) {
  std::map<std::string, std::string> out;
  if (query.empty()) {
    return out;
  }
  const auto decode = [](absl::string_view s) -> std::optional<std::string> {
    std::string raw(s);
    if (KnownPlusBug()) {
      std::optional<std::string> d = PercentDecode(raw);
      if (d) {
        std::replace(d->begin(), d->end(), '+', ' ');
      }
      return d;
    }
    std::replace(raw.begin(), raw.end(), '+', ' ');
    return PercentDecode(raw);
  };
  for (absl::string_view piece : absl::StrSplit(query, '&')) {
    const size_t eq = piece.find('=');
    std::optional<std::string> n = decode(piece.substr(0, eq));
    std::optional<std::string> v =
        decode(eq == absl::string_view::npos ? absl::string_view() : piece.substr(eq + 1));
    if (!n || !v || !out.emplace(*std::move(n), *std::move(v)).second) {
      return std::nullopt;
    }
  }
  return out;
}

// Percent-encodes every byte but RFC 3986 unreserved ones.
std::string Encode(absl::string_view s) {
  static constexpr char kHex[] = "0123456789ABCDEF";
  std::string out;
  for (const char c : s) {
    const unsigned char u = static_cast<unsigned char>(c);
    if (absl::ascii_isalnum(u) || c == '-' || c == '.' || c == '_' || c == '~') {
      out.push_back(c);
    } else {
      absl::StrAppend(&out, "%", std::string(1, kHex[u >> 4]), std::string(1, kHex[u & 0xf]));
    }
  }
  return out;
}

absl::string_view QueryOf(absl::string_view target) {
  const size_t q = target.find('?');
  return q == absl::string_view::npos ? absl::string_view() : target.substr(q + 1);
}

// HtmlEscape leaves no metacharacter, every '&' starts an entity, and it unescapes back.
void CheckHtmlEscape(absl::string_view s) {
  const std::string e = tb::http::HtmlEscape(s);
  if (e.find_first_of("<>\"'") != std::string::npos) {
    Fail("HtmlEscape left a metacharacter", e);
  }
  static constexpr std::pair<absl::string_view, char> kEntities[] = {
      {"&amp;", '&'}, {"&lt;", '<'}, {"&gt;", '>'}, {"&quot;", '"'}, {"&#39;", '\''}};
  std::string back;
  for (size_t i = 0; i < e.size();) {
    if (e[i] != '&') {
      back.push_back(e[i++]);
      continue;
    }
    bool found = false;
    for (const auto& [entity, c] : kEntities) {
      if (absl::StartsWith(absl::string_view(e).substr(i), entity)) {
        back.push_back(c);
        i += entity.size();
        found = true;
        break;
      }
    }
    if (!found) {
      Fail("HtmlEscape left a bare '&'", e);
    }
  }
  if (back != s) {
    Fail("HtmlEscape does not unescape to its input", e);
  }
}

void CheckParseQuery(absl::string_view target) {
  const absl::string_view query = QueryOf(target);
  absl::StatusOr<std::map<std::string, std::string>> q = tb::http::ParseQuery(query);
  if (!q.ok()) {
    if (q.status().code() != absl::StatusCode::kInvalidArgument) {
      Fail("ParseQuery error is not INVALID_ARGUMENT", q.status().ToString());
    }
    return;
  }
  if (q->size() > 32) {
    Fail("ParseQuery accepted more than 32 parameters");
  }
  if (std::optional<std::map<std::string, std::string>> ref = ReferenceParse(query);
      !ref || *ref != *q) {
    Fail("ParseQuery differs from form-urlencoded decoding", query);
  }
  std::vector<std::string> pieces;
  for (const auto& [k, v] : *q) {
    pieces.push_back(absl::StrCat(Encode(k), "=", Encode(v)));
  }
  absl::StatusOr<std::map<std::string, std::string>> again =
      tb::http::ParseQuery(absl::StrJoin(pieces, "&"));
  if (!again.ok() || *again != *q) {
    Fail("ParseQuery of the re-encoded parameters differs", absl::StrJoin(pieces, "&"));
  }
  for (const auto& [k, v] : *q) {
    CheckHtmlEscape(k);
    CheckHtmlEscape(v);
  }
}

// ---------------------------------------------------------------------------------------------
// The request.

HttpRequest ParseRequest(absl::string_view input) {
  HttpRequest req;
  std::vector<absl::string_view> lines = absl::StrSplit(input, '\n');
  absl::string_view first = absl::StripSuffix(lines[0], "\r");
  std::vector<absl::string_view> words = absl::StrSplit(first, ' ');
  if (words.size() >= 2) {
    req.method = std::string(words[0]);
    req.target = std::string(words[1]);
  } else {
    req.method = "GET";
    req.target = std::string(first);
  }
  for (size_t i = 1; i < lines.size(); ++i) {
    const absl::string_view line = absl::StripSuffix(lines[i], "\r");
    const size_t colon = line.find(':');
    if (colon == absl::string_view::npos) {
      continue;
    }
    req.headers.emplace_back(std::string(line.substr(0, colon)),
                             std::string(absl::StripAsciiWhitespace(line.substr(colon + 1))));
  }
  return req;
}

void CheckCookies(const HttpRequest& req) {
  for (const bool secure : {false, true}) {
    const std::string v = tb::http::CookieValue(req, tb::http::BindingCookieName(secure));
    if (absl::StrContains(v, ';')) {
      Fail("CookieValue holds a ';'", v);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// The handler over a real flow.

// "Randomness" of zeros: every state, cookie and link id is the same, so seeds can hold them.
class ZeroRandom final : public tb::core::Random {
 public:
  void Fill(absl::Span<uint8_t> out) override { std::fill(out.begin(), out.end(), 0); }
};

constexpr absl::string_view kLinkKey = "fuzz-callback-link-key-0123456789abcdefghijklmnop";
// The minted link's return URL: the callback's pages link "Continue" to it.
constexpr absl::string_view kReturnUrl = "https://app.example.com/settings/zendesk?tab=1&from=tb";

struct World {
  static tb::core::ProviderRegistry Providers() {
    tb::core::ProviderRegistry providers;
    tb::core::ProviderSpec zendesk = *tb::core::PresetSpec("zendesk");
    zendesk.name = "zendesk";
    zendesk.client_id = "broker";
    zendesk.client_secret = tb::ClientSecret("fuzz-client-secret");
    providers["zendesk"] = zendesk;
    return providers;
  }
  static tb::oauth::FlowOptions Options() {
    tb::oauth::FlowOptions options;
    options.public_base_url = "https://broker.example.com";
    options.link_key = tb::KeyMaterial(std::string(kLinkKey));
    options.return_url_allowlist = {"https://app.example.com/settings/"};
    return options;
  }

  tb::core::ProviderDirectory providers{Providers()};
  tb::testing::FakeClock clock;
  ZeroRandom random;
  tb::crypto::OpenSslDigest digest;
  tb::store::InMemoryFlowStore flow_store;
  tb::store::InMemoryTokenStore token_store;
  tb::cache::ConnectionCache cache;
  tb::oauth::Broker broker{clock, token_store, cache};
  tb::testing::FakeProviderClient provider;
  tb::oauth::Revoker revoker{{}, providers, clock, broker, provider};
  tb::oauth::AuthorizationFlow flow{Options(),  providers, clock,  random, digest,
                                    flow_store, provider,  broker, revoker};
  std::string link;     // the minted link's token
  std::string state;    // the started authorization's state
  std::string binding;  // and its cookie value

  World() {
    absl::StatusOr<tb::oauth::AuthorizationFlow::MintedLink> minted =
        flow.CreateLink("acme", "zendesk", {{"subdomain", "acme"}}, absl::ZeroDuration(), false,
                        std::string(kReturnUrl));
    if (!minted.ok()) {
      Fail("CreateLink failed", minted.status().ToString());
    }
    absl::StatusOr<std::map<std::string, std::string>> q =
        tb::http::ParseQuery(QueryOf(minted->url));
    link = q->at("link");
    absl::StatusOr<tb::oauth::AuthorizationFlow::Started> started = flow.Start(link);
    if (!started.ok()) {
      Fail("Start failed", started.status().ToString());
    }
    state = tb::http::ParseQuery(QueryOf(started->authorize_url))->at("state");
    binding = std::string(started->browser_binding.Reveal());
    tb::core::Grant grant;
    grant.access_token = tb::AccessToken("fuzz-access-token");
    grant.refresh_token = tb::RefreshToken("fuzz-refresh-token");
    grant.issued_at = clock.Now();
    grant.expires_at = clock.Now() + absl::Hours(1);
    provider.NextExchangeReturns(grant);
  }
};

std::optional<std::string> Header(const HttpResponse& res, absl::string_view name) {
  for (const auto& [k, v] : res.headers) {
    if (absl::EqualsIgnoreCase(k, name)) {
      return v;
    }
  }
  return std::nullopt;
}

// Every '<' in a page opens a tag of the template; the one link is the minted return URL.
void CheckHtml(absl::string_view body) {
  static const std::string kContinue =
      absl::StrCat("<a href=\"", tb::http::HtmlEscape(kReturnUrl), "\">Continue</a>");
  static const absl::string_view kTags[] = {
      "<!doctype html>",
      "<html lang=\"en\">",
      "<head>",
      "<meta charset=\"utf-8\">",
      "<meta name=\"viewport\" content=\"width=device-width\">",
      "<title>",
      "</title>",
      "</head>",
      "<body>",
      "<h1>",
      "</h1>",
      "<p>",
      "</p>",
      "</body>",
      "</html>",
      "<strong>",
      "</strong>",
      kContinue,
      "</a>"};
  for (size_t i = body.find('<'); i != absl::string_view::npos; i = body.find('<', i + 1)) {
    const absl::string_view rest = body.substr(i);
    if (std::none_of(std::begin(kTags), std::end(kTags),
                     [&](absl::string_view t) { return absl::StartsWith(rest, t); })) {
      Fail("a page holds a tag that is not the template's", rest.substr(0, 80));
    }
  }
}

void CheckHandler(const HttpRequest& req, bool secure) {
  World world;
  tb::http::OAuthRoutesOptions options;
  options.secure_cookies = secure;
  tb::http::AsyncHandler handler = tb::http::MakeOAuthHandler(
      world.flow, [](std::function<void()> f) { f(); }, options);
  std::vector<HttpResponse> responses;
  handler(req, [&](HttpResponse res) { responses.push_back(std::move(res)); });
  if (responses.size() != 1) {
    Fail("the handler did not answer exactly once");
  }
  const HttpResponse& res = responses[0];
  static const bool verbose = std::getenv("FUZZ_CALLBACK_PRINT") != nullptr;
  if (verbose) {
    std::printf("%s %s -> %d\n", req.method.c_str(), req.target.substr(0, 60).c_str(), res.status);
  }

  static constexpr int kStatuses[] = {200, 302, 400, 403, 404, 405, 409, 410, 502, 503};
  if (std::find(std::begin(kStatuses), std::end(kStatuses), res.status) == std::end(kStatuses)) {
    Fail("unexpected status", absl::StrCat(res.status));
  }
  const std::optional<std::string> csp = Header(res, "Content-Security-Policy");
  if (!csp || !absl::StrContains(*csp, "default-src 'none'") ||
      !absl::StrContains(*csp, "frame-ancestors 'none'") ||
      Header(res, "X-Frame-Options") != "DENY" || Header(res, "Referrer-Policy") != "no-referrer" ||
      Header(res, "Cache-Control") != "no-store") {
    Fail("security headers missing", absl::StrCat(res.status));
  }
  for (const auto& [k, v] : res.headers) {
    if (k.find_first_of("\r\n") != std::string::npos ||
        v.find_first_of("\r\n") != std::string::npos) {
      Fail("CR or LF in a response header", k);
    }
  }

  const std::string path(tb::http::RequestPath(req.target));
  absl::StatusOr<std::map<std::string, std::string>> q = tb::http::ParseQuery(QueryOf(req.target));
  const auto param = [&](const std::string& name) -> std::string {
    if (!q.ok()) {
      return "";
    }
    const auto it = q->find(name);
    return it == q->end() ? "" : it->second;
  };
  const std::string cookie = tb::http::CookieValue(req, tb::http::BindingCookieName(secure));
  if (res.status == 302) {
    if (path != "/oauth/start" || param("link") != world.link) {
      Fail("a redirect for something else than the minted link", req.target);
    }
    const std::optional<std::string> location = Header(res, "Location");
    if (!location ||
        !absl::StartsWith(*location, "https://acme.zendesk.com/oauth/authorizations/new?")) {
      Fail("a redirect somewhere else than the provider", location.value_or(""));
    }
  }
  if (res.status == 200 &&
      (path != "/oauth/callback" || param("state") != world.state || cookie != world.binding ||
       param("code").empty() || !param("error").empty())) {
    Fail("a success page for a callback that should fail", req.target);
  }
  // A callback that reached the flow used up its state: the binding has done its job.
  if (path == "/oauth/callback" && (req.method == "GET" || req.method == "HEAD") && q.ok()) {
    const std::optional<std::string> set_cookie = Header(res, "Set-Cookie");
    if (!set_cookie || !absl::StrContains(*set_cookie, "Max-Age=0")) {
      Fail("a callback answer does not clear the binding cookie");
    }
  }
  if (absl::StartsWith(res.content_type, "text/html")) {
    CheckHtml(res.body);
    // The provider's words, as the page shows them: escaped, at most 300 bytes of them, and
    // control characters shown as spaces.
    std::string description = param("error_description").substr(0, 300);
    std::replace_if(
        description.begin(), description.end(),
        [](char c) { return static_cast<unsigned char>(c) < 0x20 || c == 0x7f; }, ' ');
    if (res.status == 502 && !param("error").empty() && !description.empty() &&
        !absl::StrContains(res.body,
                           absl::StrCat("\u201c", tb::http::HtmlEscape(description), "\u201d"))) {
      Fail("the provider's error_description is not shown escaped", description);
    }
  }
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  spdlog::set_level(spdlog::level::off);  // the routes log every refusal
  if (std::getenv("FUZZ_CALLBACK_PRINT") != nullptr) {
    World world;
    std::printf("link=%s\nstate=%s\ncookie=%s\n", world.link.c_str(), world.state.c_str(),
                world.binding.c_str());
  }
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const absl::string_view input(reinterpret_cast<const char*>(data), size);
  const HttpRequest req = ParseRequest(input);
  CheckParseQuery(req.target);
  CheckCookies(req);
  // Which cookie name the routes expect: from the input, so both are explored.
  CheckHandler(req, /*secure=*/absl::StrContains(input, "__Host-tb_oauth"));
  return 0;
}
