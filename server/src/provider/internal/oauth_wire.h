#ifndef TB_PROVIDER_INTERNAL_OAUTH_WIRE_H_
#define TB_PROVIDER_INTERNAL_OAUTH_WIRE_H_

// Pure helpers of the provider client: request body encodings, client authentication, token
// response parsing and the mapping of provider error answers to statuses. No I/O, nothing
// throws; private to tb_provider (exposed for its unit tests).

#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "server/src/core/connection.h"

namespace tb::provider::internal {

// One request parameter. `number` values (digits, an optional leading '-') are sent as JSON
// numbers in JSON bodies (Zendesk's expires_in); form bodies send every value as text.
struct Param {
  std::string name;
  std::string value;
  bool number = false;
};

// application/x-www-form-urlencoded serialization of one value (WHATWG URL standard, as
// RFC 6749 appendix B asks): ASCII letters, digits and "*-._" stay, space becomes '+', every
// other byte becomes %XX (upper-case hex).
std::string FormUrlEncode(absl::string_view s);

// "a=1&b=2" in `params` order.
std::string FormBody(const std::vector<Param>& params);

// {"a":"1","b":2} in `params` order; `number` params whose value is not an integer are sent as
// strings.
std::string JsonBody(const std::vector<Param>& params);

// RFC 6749 2.3.1 client_secret_basic: "Basic " + base64(form(client_id) ":" form(secret)).
// The result is a credential.
std::string BasicAuthorization(absl::string_view client_id, absl::string_view client_secret);

// Parses a token endpoint success body (RFC 6749 5.1) into a Grant with generation 0 and no
// refresh_at:
//   access_token   required non-empty string
//   token_type     string, default "Bearer"; any case of "bearer" becomes "Bearer"
//   scope          space-separated string; absent, null or empty: `default_scopes`
//   expires_in     non-negative integer, or a string of one; absent, null or 0: no expiry (0 is
//                  read as "not given", as Go's x/oauth2 does); expires_at = issued_at + it
//   refresh_token  optional string; null or "" is absent
//   refresh_token_expires_in  like expires_in, for the refresh token (Zendesk); kept only with
//                  a refresh token, as refresh_token_expires_at
//   unknown members are ignored.
// Errors: UNAVAILABLE whose message is only the reason ("not JSON", "missing access_token",
// "expires_in is negative", ...), never body content. The caller prefixes the provider.
absl::StatusOr<core::Grant> ParseTokenResponse(absl::string_view body,
                                               const std::vector<std::string>& default_scopes,
                                               absl::Time issued_at);

// Zendesk GET /api/v2/oauth/tokens/current.json: {"token":{"id":123,...}}. The id may be a
// number or a string of [A-Za-z0-9_-]{1,64}. Errors: UNAVAILABLE with the reason only.
absl::StatusOr<std::string> ParseTokenId(absl::string_view body);

// True when `id` can go into a URL path: [A-Za-z0-9_-]{1,64}.
bool IsValidTokenId(absl::string_view id);

// The OAuth "error" member of an error body (RFC 6749 5.2), when the body is a JSON object whose
// "error" is a string of [A-Za-z0-9_.-]{1,64}; "" otherwise. Never anything else from the body.
std::string OAuthErrorCode(absl::string_view body);

// Which endpoint answered, for reading a 401 without an OAuth error code.
enum class Endpoint {
  kClientAuthenticated,  // token endpoint, RFC 7009 revocation: 401 means our client credentials
  kBearer,               // Zendesk token info and revoke-by-id: 401 means the access token
};

// The status for a non-2xx answer. `what` names the call for the message, e.g.
// "provider 'zendesk' refresh". `retry_after` is the raw Retry-After header ("" if none).
//   429                              RESOURCE_EXHAUSTED
//   408, 5xx                         UNAVAILABLE
//   4xx error=invalid_grant          FAILED_PRECONDITION, Reason kNeedsReauth
//   401 from a kBearer endpoint      UNAUTHENTICATED (the access token was rejected)
//   4xx error=invalid_client or
//       unauthorized_client, or 401
//       from a kClientAuthenticated
//       endpoint without a code      FAILED_PRECONDITION, Reason kProviderMisconfigured
//   other 4xx, 3xx                   FAILED_PRECONDITION, no reason (the OAuth code in the message)
//   anything else                    UNAVAILABLE
// A non-empty `retry_after` on 429 and 503 is kept as the payload kRetryAfterPayloadUrl (raw
// value), for the retry layer. Messages carry the HTTP status and the OAuth code, nothing else
// of the body.
absl::Status ErrorForResponse(absl::string_view what, Endpoint endpoint, int http_status,
                              absl::string_view body, absl::string_view retry_after);

// Status payload URL of the raw Retry-After header value.
inline constexpr absl::string_view kRetryAfterPayloadUrl = "tokenbroker.v1/retry-after";

}  // namespace tb::provider::internal

#endif  // TB_PROVIDER_INTERNAL_OAUTH_WIRE_H_
