#ifndef TB_TESTS_FAKE_PROVIDER_FAKE_PROVIDER_H_
#define TB_TESTS_FAKE_PROVIDER_FAKE_PROVIDER_H_

// FakeProvider: an OAuth 2.0 authorization server that behaves like Zendesk's (DESIGN.md,
// "Zendesk facts"), served over real HTTPS on a local port with a test CA generated at start.
// Integration tests point the broker's provider URLs at base_url() and its CA file at ca_file();
// the `fake_provider` binary runs it beside the broker for trying the flow in a browser.
//
// Endpoints (paths as Zendesk's; the /oauth2/ aliases are Zendesk Chat's):
//   GET    /oauth/authorizations/new, /oauth2/authorizations/new      authorize (kAuthorize)
//   GET    /oauth/authorizations/decide, /oauth2/authorizations/decide  dev page buttons (kOther)
//   POST   /oauth/tokens, /oauth2/token        grant_type=authorization_code (kTokenCode) or
//                                              refresh_token (kTokenRefresh); JSON or form body
//   GET    /api/v2/oauth/tokens/current.json   token info for the Bearer token (kTokenInfo)
//   DELETE /api/v2/oauth/tokens/{id}.json      revoke by id (kRevokeById): 204; 404 unknown or
//                                              already revoked id; 403 if the Bearer token is
//                                              another grant's
//   DELETE /api/v2/oauth/tokens/current.json   answers 204, revokes nothing (kRevokeCurrent)
// The /api/v2 endpoints answer 401 invalid_token without a valid Bearer token. The token and
// revoke endpoints take client_id+client_secret in the body or HTTP Basic (RFC 6749 2.3.1, with
// form-encoded id and secret; both at once is 400 invalid_request), else 401 invalid_client.
//   POST   /oauth/revoke, /oauth2/revoke       RFC 7009 (kRevokeRfc7009), 200 even if unknown
//   GET    /_fake/stats                        counters as JSON, only with
//                                              FakeProviderOptions::stats_endpoint (kOther)
//   anything else                              404 JSON (kOther)
//
// Zendesk behaviours reproduced: authorization codes are single-use, bound to their client and
// redirect_uri, and expire after code_lifetime (120 s); PKCE S256; a token request with
// `expires_in` gets an expiring access token plus a refresh token, one without gets a
// non-expiring access token and no refresh token; a refresh revokes the old access token and the
// old refresh token at once, and a refresh token is never accepted twice (each reuse is counted).
//
// Thread-safe: every method may be called from any thread while the server runs. Requests are
// served on two io threads; scripted delays are timers, so a slow answer blocks nothing else.
// Logs (spdlog, debug) show method, path without query, status and call kind: never a code,
// token or secret.

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"

namespace tb::testing {

struct FakeProviderOptions {
  // IP literal to listen on. The certificate names 127.0.0.1, localhost and this address.
  std::string address = "127.0.0.1";
  // 0 lets the OS pick; port() tells which.
  int port = 0;
  // Where to write the CA certificate PEM. Empty: a temporary file, removed by the destructor.
  std::string ca_file_path;
  // true: the authorize endpoint redirects at once (decision set by SetAuthorizeDecision).
  // false (dev mode): it shows an HTML page with Approve and Deny buttons.
  bool auto_approve = true;
  // How long an authorization code stays exchangeable (Zendesk: 120 s).
  absl::Duration code_lifetime = absl::Seconds(120);
  // A connection idle (or a request unfinished) this long is closed.
  absl::Duration idle_timeout = absl::Seconds(60);
  // true: GET /_fake/stats answers the introspection counters as JSON, for tests that drive
  // the fake_provider binary and cannot call the methods below:
  //   {"calls": {"<CallKindName>": n, ...}, "refresh_token_reuse_attempts": n,
  //    "reused_token_ids": [token id of each reused refresh token, in order]}
  // Counted as kOther. false: that path is a 404 like any other.
  bool stats_endpoint = false;
};

// What a request was, for counters and scripted failures. A token request whose body cannot be
// parsed or whose grant_type is missing or unknown is kOther.
enum class CallKind {
  kAuthorize,
  kTokenCode,
  kTokenRefresh,
  kTokenInfo,
  kRevokeById,
  kRevokeCurrent,
  kRevokeRfc7009,
  kOther,
};

// "authorize", "token_code", ... (for messages).
const char* CallKindName(CallKind kind);

// A scripted fault for the next call of one kind. Order of events for that call:
//   sleep delay_before; process the request normally unless a fault (reset_connection,
//   http_status or garbage_body) is set without process_first; sleep delay_after; then reset the
//   connection, or send the fault's answer, or the normal answer.
// So {delay_after} alone is "rotated, then answered late"; {reset_connection, process_first} is
// "rotated, then the answer was lost"; {http_status=502, process_first} is "rotated, then a proxy
// answered 502".
struct Failure {
  // Answer with this status and a JSON body {"error": error, "error_description": ...}.
  // 0: no status fault.
  int http_status = 0;
  // OAuth error code for the body. Empty: "too_many_requests" (429), "invalid_request" (other
  // 4xx), "server_error" (5xx).
  std::string error;
  // Retry-After header value ("3", or an HTTP date). Empty: "1" on a 429, none otherwise.
  std::string retry_after;
  absl::Duration delay_before = absl::ZeroDuration();
  absl::Duration delay_after = absl::ZeroDuration();
  // Close the TCP connection with a reset (SO_LINGER 0) instead of answering. Wins over
  // http_status and garbage_body.
  bool reset_connection = false;
  // With a fault set: process the request (rotate, revoke, ...) before applying the fault.
  bool process_first = false;
  // Answer 200 (Content-Type application/json) with this body instead.
  std::string garbage_body;
};

// How the client authenticated on the last token or RFC 7009 revoke request.
enum class ClientAuth { kNone, kBasic, kBody };

class FakeProvider {
 public:
  // Generates the test CA and server certificate, writes the CA PEM, binds, and serves before
  // returning. Errors: kInvalidArgument (address not an IP literal, port out of range, timeouts
  // not positive); kUnavailable (bind/listen failed, CA file not writable); kInternal (OpenSSL).
  static absl::StatusOr<std::unique_ptr<FakeProvider>> Start(FakeProviderOptions options);

  FakeProvider(const FakeProvider&) = delete;
  FakeProvider& operator=(const FakeProvider&) = delete;
  ~FakeProvider();  // Stop()s, and removes a temporary CA file.

  // Stops accepting, closes every connection (pending delays are cancelled, in-flight answers
  // dropped) and joins the io threads. Idempotent.
  void Stop();

  int port() const;
  // "https://127.0.0.1:<port>" ("https://[addr]:<port>" for an IPv6 address).
  std::string base_url() const;
  // Path of the CA certificate PEM file.
  std::string ca_file() const;
  // The CA certificate PEM itself.
  std::string ca_pem() const;

  // Registers (or re-registers with a new secret) an OAuth client.
  void AddClient(std::string client_id, std::string client_secret);
  // Queues a fault for the next call of `kind`; each such call pops one, in FIFO order.
  void FailNext(CallKind kind, Failure failure);
  // Auto-approve mode: true (default) redirects with a code; false redirects with
  // error=access_denied. Dev mode ignores it (the user's button decides).
  void SetAuthorizeDecision(bool approve);

  // Revokes every token (access and refresh) issued so far, as an admin would in Zendesk's UI.
  void RevokeAllTokens();
  // Expires every access token issued so far; refresh tokens stay valid.
  void ExpireAllAccessTokens();

  // Calls of `kind` received so far, faulted ones included.
  int calls(CallKind kind) const;
  bool IsAccessTokenValid(const std::string& access_token) const;
  bool IsRefreshTokenValid(const std::string& refresh_token) const;
  // The Zendesk token id of an access token ever issued (valid or not), or nullopt.
  std::optional<int64_t> TokenIdOf(const std::string& access_token) const;
  // Refresh tokens presented again after they had been used for a refresh (always rejected).
  int refresh_token_reuse_attempts() const;
  // Content-Type header of the last token request ("" if none yet).
  std::string last_token_request_content_type() const;
  // Names of the fields in the last token request body, sorted (values are not kept).
  std::vector<std::string> last_token_request_fields() const;
  ClientAuth last_token_request_client_auth() const;
  // Raw (still percent-encoded) query string of the last authorize request.
  std::string last_authorize_query() const;

 private:
  class Impl;
  explicit FakeProvider(std::unique_ptr<Impl> impl);

  std::unique_ptr<Impl> impl_;
};

}  // namespace tb::testing

#endif  // TB_TESTS_FAKE_PROVIDER_FAKE_PROVIDER_H_
