#ifndef TB_PROVIDER_HTTPS_PROVIDER_CLIENT_H_
#define TB_PROVIDER_HTTPS_PROVIDER_CLIENT_H_

// core::ProviderClient over HTTPS: the OAuth 2.0 token endpoint (RFC 6749), Zendesk's token-id
// lookup and revocation, and RFC 7009 revocation. A thin adapter: it builds requests from a
// ProviderSpec, sends them with HttpClient (through a per-host ProviderGate: Retry-After,
// concurrency limit, circuit breaker) and maps answers to Grants and statuses.

#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "server/src/common/clock.h"
#include "server/src/common/metrics.h"
#include "server/src/common/mutex.h"
#include "server/src/core/provider_client.h"
#include "server/src/provider/http_client.h"
#include "server/src/provider/provider_gate.h"

namespace tb::provider {

// Status payload URL under which a 429 (or 503) answer's raw Retry-After header value is kept,
// for the retry layer. (Mirrors internal::kRetryAfterPayloadUrl.)
inline constexpr absl::string_view kRetryAfterPayloadUrl = "tokenbroker.v1/retry-after";

// Makes the HttpClient for one set of options; tests substitute a fake.
using HttpClientFactory =
    std::function<absl::StatusOr<std::unique_ptr<HttpClient>>(const HttpClientOptions&)>;

// Thread-safe. Owns one HttpClient (and so one connection pool) per distinct
// (spec.ca_file, spec.connect_timeout) it meets, each built from `base` (proxy, NO_PROXY, pool
// settings) with the spec's CA file and connect timeout. Every HTTP request is bounded by the
// earlier of its call's `deadline` (wall-clock time) and the time it is sent +
// spec.request_timeout, and blocks the calling (worker) thread.
//
// The provider gate (ProviderGateOptions, one gate for all specs): every request first passes
// its host's gate (host = the URL's scheme, host and port: each Zendesk subdomain is its own),
// which reads time from the injected clock and may refuse it before anything is sent:
//   - after a 429, or a 503 with Retry-After, from that host, every request to it fails at once
//     with RESOURCE_EXHAUSTED until the time the answer named (RetryAfterTime: seconds or an HTTP
//     date; missing or garbage: default_retry_after; capped at retry_after_cap);
//   - at most max_in_flight_per_host requests to one host at once; more wait for a slot until
//     the earlier of `deadline` and now + spec.request_timeout, then DEADLINE_EXCEEDED;
//   - failure_threshold transient failures in a row from one host (transport errors, timeouts,
//     408, 5xx; never 4xx) open its circuit for open_for: requests fail at once with
//     UNAVAILABLE "circuit open for <host>"; then one probe goes out; its success closes the
//     circuit, its failure opens it for twice as long (up to max_open_for).
// The gate acts before sending only: a request once sent is always waited for. When the host
// may be tried again is on the status for core::RetryAfterOf (core/retry_after.h): on the 429
// (and 503 + Retry-After) error itself, on calls refused for a Retry-After, and on calls refused
// by an open circuit (the probe time; none while the probe is out, none on a slot timeout). A
// refused token request spent nothing: the refresh token is still good. gate_stats() counts
// refusals, waits and circuit changes per provider name.
//
// What it sends, per spec:
//   token requests   POST token_url (URL templates filled from connection.params, validated
//                    first), Accept: application/json, body JSON or form per body_encoding.
//                    secret_post puts client_id and client_secret in the body; secret_basic sends
//                    Authorization: Basic (RFC 6749 2.3.1) and no client_id in the body.
//                    expires_in / refresh_token_expires_in when set (JSON numbers), then
//                    extra_token_params (never replacing a parameter set here). The "zendesk"
//                    preset's code exchange also sends `scope`, as Zendesk's documentation does.
//   token id         after a successful exchange or refresh, when token_info_url is set:
//                    GET it with the new access token and keep token.id as provider_token_id.
//                    Zendesk issues a new token record (new id) on every refresh, so the id is
//                    looked up again then. A failed lookup is logged and leaves the id empty (the
//                    code or refresh token is already spent, so failing the call would lose the
//                    grant); Revoke then looks the id up itself.
//   revocation       kZendeskTokenId: DELETE revoke_url with {token_id}, Bearer access token;
//                    200/204 and 404 (already gone) are OK. kRfc7009: POST revoke_url, form
//                    body token=..&token_type_hint=.., client auth as above; the refresh token
//                    first, then the access token too (a server need not cascade), 2xx OK.
//                    kNone: OK without a call. No grant: OK.
//
// Errors (codes per core::ProviderClient; messages name the provider, the operation, the HTTP
// status and the OAuth error code, never a token, secret or body):
//   UNAVAILABLE          transport failure, 5xx, 408, or a 2xx body that is not a usable token
//                        response; the host's circuit is open (nothing sent)
//   DEADLINE_EXCEEDED    the deadline passed (also while waiting for a slot: nothing sent)
//   RESOURCE_EXHAUSTED   429 (raw Retry-After kept as payload kRetryAfterPayloadUrl, its time
//                        as core::RetryAfterOf), or the host is blocked by an earlier one
//   UNAUTHENTICATED      a 401 from a Bearer-authorized endpoint (token info, revoke by id):
//                        the grant's access token was rejected (refresh, then retry)
//   FAILED_PRECONDITION  Reason kNeedsReauth for invalid_grant; kProviderMisconfigured for
//                        invalid_client / unauthorized_client / a 401 from the token endpoint,
//                        and for an unreadable spec.ca_file; kNotRefreshable for Refresh without
//                        a refresh token; no reason for other 4xx
//   INVALID_ARGUMENT     bad connection parameters or URL templates
// Logs one info line per HTTP call: provider, operation, HTTP status, latency.
//
// Metrics (with a Registry), for every request sent (not those the gate refused, which
// gate_stats() counts), labelled by the provider's configured name (ProviderSpec::name: never a
// connection id or a Zendesk subdomain) and the endpoint called, operation = token (code
// exchange and refresh), token_info or revoke:
//   tb_provider_http_request_duration_seconds{provider,operation}  histogram, send to answer
//   tb_provider_http_responses_total{provider,operation,code}      counter; code is the HTTP
//       status ("200", "429", "503") or "transport_error" (no answer: refused, reset, TLS
//       failure, timeout)
class HttpsProviderClient final : public core::ProviderClient {
 public:
  // Builds the HttpClients of `specs` up front, so an unreadable CA file or a bad proxy URL fails
  // at startup (INVALID_ARGUMENT), as do out-of-range `gate` options. A spec met later with
  // another CA file or connect timeout gets its client then. `clock` (issued_at of grants, the
  // gate's times) must outlive this object. `metrics` (null: no metrics) gets the two families
  // above, registered here (so one client per Registry), and must outlive this object.
  static absl::StatusOr<std::unique_ptr<HttpsProviderClient>> Create(
      HttpClientOptions base, const std::vector<core::ProviderSpec>& specs, const Clock& clock,
      HttpClientFactory factory = &HttpClient::Create, ProviderGateOptions gate = {},
      metrics::Registry* metrics = nullptr);

  absl::StatusOr<core::Grant> ExchangeCode(const core::ProviderSpec& spec,
                                           const core::Connection& connection, const AuthCode& code,
                                           const PkceVerifier& verifier,
                                           const std::string& redirect_uri,
                                           absl::Time deadline) override ABSL_LOCKS_EXCLUDED(mu_);
  absl::StatusOr<core::Grant> Refresh(const core::ProviderSpec& spec,
                                      const core::Connection& connection,
                                      absl::Time deadline) override ABSL_LOCKS_EXCLUDED(mu_);
  absl::Status Revoke(const core::ProviderSpec& spec, const core::Connection& connection,
                      absl::Time deadline) override ABSL_LOCKS_EXCLUDED(mu_);

  // The HttpClient used for `spec` (created if needed). For tests and metrics.
  absl::StatusOr<HttpClient*> ClientFor(const core::ProviderSpec& spec) ABSL_LOCKS_EXCLUDED(mu_);

  // The gate's counters (per provider name) and current host states, for metrics.
  ProviderGateStats gate_stats() const;

  // The HTTP call metrics' families (owned by the Registry).
  struct HttpMetrics {
    metrics::HistogramFamily* latency;  // {provider, operation}
    metrics::CounterFamily* responses;  // {provider, operation, code}
  };

 private:
  HttpsProviderClient(HttpClientOptions base, const Clock& clock, HttpClientFactory factory,
                      ProviderGateOptions gate, metrics::Registry* metrics);

  const HttpMetrics* HttpMetricsOrNull() const {
    return http_metrics_.has_value() ? &*http_metrics_ : nullptr;
  }

  const HttpClientOptions base_;
  const Clock& clock_;
  const HttpClientFactory factory_;
  ProviderGate gate_;
  std::optional<HttpMetrics> http_metrics_;  // set in the constructor, then read only

  Mutex mu_;
  // Key: (ca_file, connect_timeout). Clients are never removed, so pointers stay valid.
  std::map<std::pair<std::string, absl::Duration>, std::unique_ptr<HttpClient>> clients_
      ABSL_GUARDED_BY(mu_);
};

}  // namespace tb::provider

#endif  // TB_PROVIDER_HTTPS_PROVIDER_CLIENT_H_
