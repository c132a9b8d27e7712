#include "server/src/http/oauth_routes.h"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <boost/url/params_encoded_view.hpp>
#include <boost/url/parse.hpp>
#include <boost/url/parse_query.hpp>
#include <boost/url/pct_string_view.hpp>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "server/src/core/errors.h"

namespace tb::http {

namespace {

constexpr size_t kMaxParams = 32;
// The pages are headings, paragraphs and at most one link: nothing to allow. (No stylesheet
// either: an inline one would need style-src 'unsafe-inline', and unstyled text reads fine.)
constexpr char kCsp[] =
    "default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'";

void AddSecurityHeaders(HttpResponse& res) {
  res.headers.emplace_back("Content-Security-Policy", kCsp);
  res.headers.emplace_back("Referrer-Policy", "no-referrer");
  res.headers.emplace_back("Cache-Control", "no-store");
  res.headers.emplace_back("X-Frame-Options", "DENY");
}

// `continue_url`, when set, is an allow-listed return URL (AuthorizationFlow checked it); it is
// only ever a link the account admin may follow, never a redirect.
HttpResponse Page(int status, absl::string_view title, absl::string_view message_html,
                  absl::string_view continue_url = "") {
  HttpResponse res;
  res.status = status;
  res.content_type = "text/html; charset=utf-8";
  res.body = absl::StrCat(
      "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
      "<meta name=\"viewport\" content=\"width=device-width\"><title>",
      HtmlEscape(title), "</title></head><body><h1>", HtmlEscape(title), "</h1><p>", message_html,
      "</p>",
      continue_url.empty()
          ? std::string()
          : absl::StrCat("<p><a href=\"", HtmlEscape(continue_url), "\">Continue</a></p>"),
      "</body></html>\n");
  AddSecurityHeaders(res);
  return res;
}

HttpResponse PlainError(int status, absl::string_view text) {
  HttpResponse res;
  res.status = status;
  res.body = std::string(text);
  AddSecurityHeaders(res);
  return res;
}

// What an account admin reads when the flow fails: what happened and what to do, never
// internal detail.
HttpResponse ErrorPage(const absl::Status& status, const std::string& provider_description,
                       const std::string& continue_url = "") {
  const auto page = [&](int code, absl::string_view title, absl::string_view message_html) {
    return Page(code, title, message_html, continue_url);
  };
  using K = core::FlowErrorKind;
  const std::optional<K> kind = core::FlowErrorOf(status);
  if (!kind) {
    return page(500, "Something went wrong",
                "The connection could not be completed. Nothing was changed. Please try again "
                "later, or ask the person who sent you the link.");
  }
  switch (*kind) {
    case K::kLinkInvalid:
      return page(400, "This link is not valid",
                  "This connect link is not valid. Please ask the person who sent it for a new "
                  "one.");
    case K::kLinkExpired:
      return page(410, "This link has expired",
                  "This connect link has expired. Please ask the person who sent it for a new "
                  "one.");
    case K::kLinkRevoked:
      return page(410, "This link was withdrawn",
                  "This connect link was withdrawn. Please ask the person who sent it for a new "
                  "one.");
    case K::kLinkUsed:
      return page(410, "This link was already used",
                  "This connect link was already used to connect the account. If it needs to "
                  "be connected again, ask for a new link.");
    case K::kAlreadyConnected:
      return page(409, "Already connected",
                  "This account is already connected. To connect it again, ask for a reconnect "
                  "link.");
    case K::kStateInvalid:
      return page(400, "This sign-in is no longer valid",
                  "This sign-in attempt was already used or took longer than 10 minutes. Please "
                  "open your connect link again.");
    case K::kWrongBrowser:
      return page(400, "Please use the same browser",
                  "This sign-in was started in another browser or window. Please open your "
                  "connect link again, in this browser, and finish there.");
    case K::kAccessDenied:
      return page(403, "Access was not granted",
                  "You declined access, so nothing was connected. If that was a mistake, open "
                  "your connect link again.");
    case K::kProviderError:
      return page(
          502, "The sign-in did not complete",
          absl::StrCat("The provider reported a problem",
                       provider_description.empty()
                           ? std::string(".")
                           : absl::StrCat(": \u201c", HtmlEscape(provider_description), "\u201d."),
                       " Nothing was connected. Please open your connect link again."));
    case K::kExchangeFailed:
      return page(502, "The sign-in did not complete",
                  "The provider did not accept the sign-in, so nothing was connected. Please "
                  "open your connect link again; if it keeps failing, tell the person who sent "
                  "it.");
    case K::kStoreFailed:
      return page(503, "Please try again",
                  "The account could not be saved, so nothing was connected. Please open your "
                  "connect link again in a few minutes.");
  }
  return page(500, "Something went wrong", "Please try again later.");
}

std::string SetCookie(bool secure, absl::string_view value, int max_age) {
  return absl::StrCat(BindingCookieName(secure), "=", value, "; Path=/; Max-Age=", max_age,
                      "; HttpOnly; SameSite=Lax", secure ? "; Secure" : "");
}

absl::string_view QueryOf(const std::string& target) {
  const size_t q = target.find('?');
  return q == std::string::npos ? absl::string_view() : absl::string_view(target).substr(q + 1);
}

struct Routes {
  oauth::AuthorizationFlow& flow;
  RunBlocking run_blocking;
  OAuthRoutesOptions options;

  void Start(const HttpRequest& req, Respond respond) const {
    absl::StatusOr<std::map<std::string, std::string>> q = ParseQuery(QueryOf(req.target));
    if (!q.ok() || !q->contains("link")) {
      respond(ErrorPage(core::FlowError(absl::StatusCode::kInvalidArgument,
                                        core::FlowErrorKind::kLinkInvalid, "no link"),
                        ""));
      return;
    }
    run_blocking([this, link = (*q)["link"], respond = std::move(respond)] {
      absl::StatusOr<oauth::AuthorizationFlow::Started> started = flow.Start(link);
      if (!started.ok()) {
        spdlog::info("oauth start refused: {}", started.status().ToString());
        respond(ErrorPage(started.status(), ""));
        return;
      }
      HttpResponse res;
      res.status = 302;
      res.headers.emplace_back("Location", started->authorize_url);
      res.headers.emplace_back(
          "Set-Cookie", SetCookie(options.secure_cookies, started->browser_binding.Reveal(), 600));
      AddSecurityHeaders(res);
      respond(std::move(res));
    });
  }

  void Callback(const HttpRequest& req, Respond respond) const {
    absl::StatusOr<std::map<std::string, std::string>> q = ParseQuery(QueryOf(req.target));
    if (!q.ok()) {
      respond(ErrorPage(core::FlowError(absl::StatusCode::kInvalidArgument,
                                        core::FlowErrorKind::kStateInvalid, "bad query"),
                        ""));
      return;
    }
    oauth::AuthorizationFlow::Callback cb;
    cb.state = (*q)["state"];
    cb.code = (*q)["code"];
    cb.error = (*q)["error"];
    cb.error_description = (*q)["error_description"].substr(0, 300);
    // Shown on the page: the provider's words, not its control characters (a CR LF there is
    // no header injection, but nothing of it belongs on a page either).
    std::replace_if(
        cb.error_description.begin(), cb.error_description.end(),
        [](char c) { return static_cast<unsigned char>(c) < 0x20 || c == 0x7f; }, ' ');
    cb.browser_binding = CookieValue(req, BindingCookieName(options.secure_cookies));
    run_blocking([this, cb = std::move(cb), respond = std::move(respond)] {
      std::string return_url;  // allow-listed by the flow, or empty
      absl::StatusOr<core::ConnectionId> id = flow.Complete(cb, &return_url);
      HttpResponse res =
          id.ok() ? Page(200, "Connected",
                         absl::StrCat("The account is now connected as <strong>", HtmlEscape(*id),
                                      "</strong>.",
                                      return_url.empty() ? " You can close this window." : ""),
                         return_url)
                  : ErrorPage(id.status(), cb.error_description, return_url);
      if (!id.ok()) {
        spdlog::info("oauth callback refused: {}", id.status().ToString());
      }
      // The binding has done its job either way.
      res.headers.emplace_back("Set-Cookie", SetCookie(options.secure_cookies, "", 0));
      respond(std::move(res));
    });
  }
};

}  // namespace

std::string BindingCookieName(bool secure) {
  // __Host- needs Secure, which browsers refuse over plain http.
  return secure ? "__Host-tb_oauth" : "tb_oauth";
}

std::string HtmlEscape(absl::string_view s) {
  std::string out;
  out.reserve(s.size());
  for (char c : s) {
    switch (c) {
      case '&':
        out += "&amp;";
        break;
      case '<':
        out += "&lt;";
        break;
      case '>':
        out += "&gt;";
        break;
      case '"':
        out += "&quot;";
        break;
      case '\'':
        out += "&#39;";
        break;
      default:
        out.push_back(c);
    }
  }
  return out;
}

absl::StatusOr<std::map<std::string, std::string>> ParseQuery(absl::string_view query) {
  std::map<std::string, std::string> out;
  if (query.empty()) {
    return out;
  }
  auto params = boost::urls::parse_query(std::string_view(query.data(), query.size()));
  if (!params) {
    return absl::InvalidArgumentError("query string is malformed");
  }
  size_t n = 0;
  for (const auto& p : *params) {
    if (++n > kMaxParams) {
      return absl::InvalidArgumentError("too many query parameters");
    }
    // Form encoding: a literal '+' is a space, while "%2B" is a '+' (authorization codes may
    // hold one). So the '+' is replaced while decoding, never after (found by the fuzzer:
    // tests/fuzz/regressions/fuzz_callback_query/plus_after_decode).
    const boost::urls::encoding_opts form(/*space_as_plus=*/true);
    std::string key = p.key.decode(form);
    std::string value = p.has_value ? p.value.decode(form) : std::string();
    if (!out.emplace(std::move(key), std::move(value)).second) {
      return absl::InvalidArgumentError("repeated query parameter");
    }
  }
  return out;
}

std::string CookieValue(const HttpRequest& req, absl::string_view name) {
  for (const auto& [header, value] : req.headers) {
    if (!absl::EqualsIgnoreCase(header, "cookie")) {
      continue;
    }
    for (absl::string_view part : absl::StrSplit(value, ';')) {
      part = absl::StripAsciiWhitespace(part);
      const size_t eq = part.find('=');
      if (eq != absl::string_view::npos && part.substr(0, eq) == name) {
        return std::string(part.substr(eq + 1));
      }
    }
  }
  return "";
}

AsyncHandler MakeOAuthHandler(oauth::AuthorizationFlow& flow, RunBlocking run_blocking,
                              OAuthRoutesOptions options) {
  auto routes = std::make_shared<Routes>(Routes{flow, std::move(run_blocking), options});
  return [routes](HttpRequest req, Respond respond) {
    const std::string_view path = RequestPath(req.target);
    if (routes->options.rate_limiter != nullptr && path.starts_with("/oauth/")) {
      if (const ClientRateLimiter::Decision d = routes->options.rate_limiter->Admit(req);
          !d.allowed) {
        HttpResponse res = Page(429, "Too many attempts",
                                "Too many requests came from your network. Please wait a minute, "
                                "then open your connect link again.");
        res.headers.emplace_back("Retry-After", absl::StrCat(d.retry_after_seconds));
        respond(std::move(res));
        return;
      }
    }
    const bool known = path == "/oauth/start" || path == "/oauth/callback";
    if (!known) {
      respond(PlainError(404, "not found\n"));
      return;
    }
    if (req.method != "GET" && req.method != "HEAD") {
      HttpResponse res = PlainError(405, "method not allowed\n");
      res.headers.emplace_back("Allow", "GET, HEAD");
      respond(std::move(res));
      return;
    }
    if (path == "/oauth/start") {
      routes->Start(req, std::move(respond));
    } else {
      routes->Callback(req, std::move(respond));
    }
  };
}

}  // namespace tb::http
