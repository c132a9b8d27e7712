#ifndef TB_HTTP_OAUTH_ROUTES_H_
#define TB_HTTP_OAUTH_ROUTES_H_

#include <functional>
#include <map>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "server/src/common/work_pool.h"
#include "server/src/http/http_types.h"
#include "server/src/http/rate_limiter.h"
#include "server/src/oauth/authorization_flow.h"

namespace tb::http {

struct OAuthRoutesOptions {
  // Secure cookies with the __Host- prefix; on when the public base URL is https. Browsers
  // refuse Secure cookies over plain http, so development on http://127.0.0.1 runs without.
  bool secure_cookies = true;
  // Every request to a path under /oauth/ (unknown ones and refused methods included) takes a
  // token from its client's bucket first; an empty bucket is 429 with Retry-After. Null: no
  // limit. Build it with ClientRateLimiter::Create (which checks the trusted proxy entries).
  std::shared_ptr<ClientRateLimiter> rate_limiter;
};

// The public port: GET|HEAD /oauth/start?link=... and /oauth/callback?state=...&code=...
// Everything else is 404; other methods on these paths 405 with "Allow: GET, HEAD"; over the
// rate limit 429. Every response carries Content-Security-Policy: default-src 'none';
// frame-ancestors 'none'; base-uri 'none'; form-action 'none' (the pages are plain HTML: no
// script, style, image or form), Referrer-Policy: no-referrer, Cache-Control: no-store,
// X-Frame-Options: DENY (and the server adds X-Content-Type-Options: nosniff); all text is
// HTML-escaped. The callback's result page, success or failure, links "Continue" to the link's
// return URL when the flow still finds it on the allow-list; nothing here ever redirects to it.
// `flow` must outlive the handler.
// `run_blocking` runs the flow's calls (store and provider I/O) off the io threads.
AsyncHandler MakeOAuthHandler(oauth::AuthorizationFlow& flow, RunBlocking run_blocking,
                              OAuthRoutesOptions options);

// The cookie that binds a state to the browser that started the flow.
std::string BindingCookieName(bool secure);

// Decodes an application/x-www-form-urlencoded query. A repeated key, a malformed
// percent-escape or more than 32 parameters is INVALID_ARGUMENT.
absl::StatusOr<std::map<std::string, std::string>> ParseQuery(absl::string_view query);

// The value of cookie `name` in the request's Cookie headers; empty if absent.
std::string CookieValue(const HttpRequest& req, absl::string_view name);

// &, <, >, ", ' as entities.
std::string HtmlEscape(absl::string_view s);

}  // namespace tb::http

#endif  // TB_HTTP_OAUTH_ROUTES_H_
