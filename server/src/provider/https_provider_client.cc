#include "server/src/provider/https_provider_client.h"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <string_view>

#include "absl/strings/cord.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "server/src/common/status_macros.h"
#include "server/src/core/errors.h"
#include "server/src/core/retry_after.h"
#include "server/src/provider/internal/http_util.h"
#include "server/src/provider/internal/oauth_wire.h"

namespace tb::provider {
namespace {

using core::ProviderSpec;
using internal::Endpoint;
using internal::Param;

static_assert(kRetryAfterPayloadUrl == internal::kRetryAfterPayloadUrl);
static_assert(kRetryAfterPayloadUrl == core::kRetryAfterPayloadUrl);

// One provider operation, for messages ("provider 'zendesk' refresh") and log fields.
struct Op {
  const ProviderSpec& spec;
  absl::string_view name;  // "code exchange", "refresh", "token id lookup", "revoke"

  std::string What() const { return absl::StrCat("provider '", spec.name, "' ", name); }
};

// fmt formats std::string_view, not Debian's own absl::string_view.
std::string_view Sv(absl::string_view s) { return std::string_view(s.data(), s.size()); }

bool Is2xx(int status) { return status >= 200 && status <= 299; }

// `s` with `what` prepended to its message; code and payloads kept.
absl::Status Prefixed(absl::string_view what, const absl::Status& s) {
  absl::Status out(s.code(), absl::StrCat(what, ": ", s.message()));
  s.ForEachPayload(
      [&out](absl::string_view url, const absl::Cord& payload) { out.SetPayload(url, payload); });
  return out;
}

// Expands `url_template` with the connection's parameters, validated first: a Zendesk subdomain
// goes into a host name.
absl::StatusOr<std::string> Url(const Op& op, absl::string_view url_template,
                                const core::Connection& connection,
                                const std::map<std::string, std::string>& extra = {}) {
  if (url_template.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(op.What(), ": no URL configured"));
  }
  if (absl::Status s = core::ValidateConnectionParams(op.spec, connection.params); !s.ok()) {
    return Prefixed(op.What(), s);
  }
  absl::StatusOr<std::string> url = core::ExpandUrl(url_template, connection.params, extra);
  if (!url.ok()) {
    return Prefixed(op.What(), url.status());
  }
  return url;
}

bool HasParam(const std::vector<Param>& params, absl::string_view name) {
  return std::any_of(params.begin(), params.end(),
                     [name](const Param& p) { return p.name == name; });
}

// Client authentication per spec (RFC 6749 2.3.1).
void AddClientAuth(const ProviderSpec& spec, std::vector<Param>& params, HttpRequest& req) {
  if (spec.client_auth == core::ClientAuth::kSecretBasic) {
    req.headers.emplace_back(
        "Authorization", internal::BasicAuthorization(spec.client_id, spec.client_secret.Reveal()));
    return;
  }
  params.push_back({"client_id", spec.client_id});
  params.push_back({"client_secret", std::string(spec.client_secret.Reveal())});
}

void SetBody(core::BodyEncoding encoding, const std::vector<Param>& params, HttpRequest& req) {
  if (encoding == core::BodyEncoding::kJson) {
    req.headers.emplace_back("Content-Type", "application/json");
    req.body = internal::JsonBody(params);
  } else {
    req.headers.emplace_back("Content-Type", "application/x-www-form-urlencoded");
    req.body = internal::FormBody(params);
  }
}

HttpRequest TokenRequest(const ProviderSpec& spec, std::string url, std::vector<Param> params) {
  HttpRequest req;
  req.method = "POST";
  req.url = std::move(url);
  req.headers.emplace_back("Accept", "application/json");
  AddClientAuth(spec, params, req);
  // Zendesk: without these the response has no expires_in and older clients get non-expiring
  // tokens and no refresh token (DESIGN.md, "Zendesk facts").
  if (spec.expires_in) {
    params.push_back({"expires_in", absl::StrCat(*spec.expires_in), /*number=*/true});
  }
  if (spec.refresh_token_expires_in) {
    params.push_back(
        {"refresh_token_expires_in", absl::StrCat(*spec.refresh_token_expires_in), true});
  }
  for (const auto& [name, value] : spec.extra_token_params) {
    if (!HasParam(params, name)) {
      params.push_back({name, value});
    }
  }
  SetBody(spec.body_encoding, params, req);
  return req;
}

// What one call needs to reach a provider: the HttpClient for its spec, the per-host gate, the
// clock the gate's times are read from, and the HTTP call metrics (null: none).
struct Channel {
  HttpClient& http;
  ProviderGate& gate;
  const Clock& clock;
  const HttpsProviderClient::HttpMetrics* metrics;
};

// The `operation` label of an Op: the endpoint called, not the use case (a code exchange and a
// refresh both call the token endpoint).
absl::string_view MetricOperation(const Op& op) {
  if (op.name == "token id lookup") {
    return "token_info";
  }
  if (op.name == "revoke") {
    return "revoke";
  }
  return "token";
}

// The `code` label of an answer: the HTTP status, or "invalid" for a number no server may send.
std::string MetricCode(int http_status) {
  return http_status >= 100 && http_status <= 599 ? absl::StrCat(http_status) : "invalid";
}

// One sent call: its latency by provider and operation, its answer by provider, operation and
// HTTP status ("transport_error" when none came: refused connection, reset, TLS failure,
// timeout). WithLabels costs tens of nanoseconds; a provider call takes milliseconds.
void RecordCall(const Channel& ch, const Op& op, absl::Duration latency, absl::string_view code) {
  if (ch.metrics == nullptr) {
    return;
  }
  const absl::string_view operation = MetricOperation(op);
  ch.metrics->latency->WithLabels({op.spec.name, operation}).Observe(latency);
  ch.metrics->responses->WithLabels({op.spec.name, operation, code}).Increment();
}

// An HTTP answer, and when its host may be called again if it said so (429, 503 + Retry-After).
struct Answer {
  HttpResponse res;
  std::optional<absl::Time> retry_at;
};

// How a transport-level failure reads for the circuit breaker: the host did not answer in time
// or at all. Other codes (a URL or header refused locally) say nothing about the host.
ProviderGate::Outcome OutcomeOf(const absl::Status& s) {
  return s.code() == absl::StatusCode::kUnavailable ||
                 s.code() == absl::StatusCode::kDeadlineExceeded
             ? ProviderGate::Outcome::kFailed
             : ProviderGate::Outcome::kNeutral;
}

ProviderGate::Outcome OutcomeOf(int http_status) {
  return http_status == 408 || (http_status >= 500 && http_status <= 599)
             ? ProviderGate::Outcome::kFailed
             : ProviderGate::Outcome::kAnswered;
}

// Sends `req` once the host's gate lets it, and logs the call (never the URL's path or query, a
// header or a body). A refused call sends nothing. Waiting for a slot ends at the earlier of
// `deadline` and the spec's request timeout; a request, once sent, gets the request timeout
// from then on (capped by `deadline`), so a wait never shortens the time a provider that may
// already be processing it has to answer.
absl::StatusOr<Answer> Send(const Channel& ch, const Op& op, const HttpRequest& req,
                            absl::Time deadline) {
  std::optional<ProviderGate::Permit> permit;
  // A URL that does not parse is refused by HttpClient::Send itself, before any traffic.
  if (absl::StatusOr<internal::ParsedUrl> url = internal::ParseHttpUrl(req.url); url.ok()) {
    const absl::Time wait_until = std::min(deadline, absl::Now() + op.spec.request_timeout);
    absl::StatusOr<ProviderGate::Permit> admitted =
        ch.gate.Admit(url->origin, op.spec.name, wait_until);
    if (!admitted.ok()) {
      spdlog::debug("provider call not sent: provider={} op=\"{}\" code={} reason=\"{}\"",
                    op.spec.name, Sv(op.name), absl::StatusCodeToString(admitted.status().code()),
                    Sv(admitted.status().message()));
      return Prefixed(op.What(), admitted.status());
    }
    permit.emplace(*std::move(admitted));
  }
  const absl::Time start = absl::Now();
  const absl::Time bounded = std::min(deadline, start + op.spec.request_timeout);
  absl::StatusOr<HttpResponse> res = ch.http.Send(req, bounded);
  const absl::Duration latency = absl::Now() - start;
  const int64_t latency_ms = absl::ToInt64Milliseconds(latency);
  if (!res.ok()) {
    if (permit) {
      permit->Finish(OutcomeOf(res.status()));
    }
    RecordCall(ch, op, latency, "transport_error");
    spdlog::warn("provider call failed: provider={} op=\"{}\" code={} latency_ms={} error=\"{}\"",
                 op.spec.name, Sv(op.name), absl::StatusCodeToString(res.status().code()),
                 latency_ms, Sv(res.status().message()));
    return Prefixed(op.What(), res.status());
  }
  Answer answer{*std::move(res), std::nullopt};
  const std::string retry_after = answer.res.Header("Retry-After");
  if (answer.res.status == 429 || (answer.res.status == 503 && !retry_after.empty())) {
    answer.retry_at = RetryAfterTime(retry_after, ch.clock.Now(), ch.gate.options());
  }
  if (permit) {
    permit->Finish(OutcomeOf(answer.res.status), answer.retry_at);
  }
  RecordCall(ch, op, latency, MetricCode(answer.res.status));
  spdlog::info("provider call: provider={} op=\"{}\" http_status={} latency_ms={}", op.spec.name,
               Sv(op.name), answer.res.status, latency_ms);
  return answer;
}

// The status of a non-2xx answer; a 429 (or 503 with Retry-After) carries when its host may be
// called again (core::RetryAfterOf), besides the raw header (kRetryAfterPayloadUrl).
absl::Status ErrorFor(const Op& op, Endpoint endpoint, const Answer& answer) {
  absl::Status s = internal::ErrorForResponse(op.What(), endpoint, answer.res.status,
                                              answer.res.body, answer.res.Header("Retry-After"));
  if (answer.retry_at) {
    s = core::WithRetryAt(std::move(s), *answer.retry_at);
  }
  return s;
}

// POSTs a token request and parses the answer into a Grant.
absl::StatusOr<core::Grant> TokenCall(const Channel& ch, const Op& op,
                                      const core::Connection& connection, std::vector<Param> params,
                                      absl::Time deadline) {
  TB_ASSIGN_OR_RETURN(std::string url, Url(op, op.spec.token_url, connection));
  const HttpRequest req = TokenRequest(op.spec, std::move(url), std::move(params));
  // Read before sending: the provider starts the token's lifetime no earlier than this, so the
  // expiry we compute is never later than the provider's.
  const absl::Time issued_at = ch.clock.Now();
  TB_ASSIGN_OR_RETURN(const Answer answer, Send(ch, op, req, deadline));
  if (!Is2xx(answer.res.status)) {
    return ErrorFor(op, Endpoint::kClientAuthenticated, answer);
  }
  absl::StatusOr<core::Grant> grant =
      internal::ParseTokenResponse(answer.res.body, op.spec.scopes, issued_at);
  if (!grant.ok()) {
    return absl::UnavailableError(
        absl::StrCat(op.What(), ": token endpoint answered ", answer.res.status,
                     " with an unusable body: ", grant.status().message()));
  }
  // A provider that does not say how long the refresh token lives was asked for a lifetime
  // (Zendesk honours what it is sent): the keep-alive refresh of idle connections relies on it.
  if (grant->refresh_token && !grant->refresh_token_expires_at &&
      op.spec.refresh_token_expires_in) {
    grant->refresh_token_expires_at = issued_at + absl::Seconds(*op.spec.refresh_token_expires_in);
  }
  return grant;
}

// GET token_info_url with `access`: Zendesk's id of that token.
absl::StatusOr<std::string> LookUpTokenId(const Channel& ch, const ProviderSpec& spec,
                                          const core::Connection& connection,
                                          const AccessToken& access, absl::Time deadline) {
  const Op op{spec, "token id lookup"};
  TB_ASSIGN_OR_RETURN(std::string url, Url(op, spec.token_info_url, connection));
  HttpRequest req;
  req.method = "GET";
  req.url = std::move(url);
  req.headers = {{"Accept", "application/json"},
                 {"Authorization", absl::StrCat("Bearer ", access.Reveal())}};
  TB_ASSIGN_OR_RETURN(const Answer answer, Send(ch, op, req, deadline));
  if (!Is2xx(answer.res.status)) {
    return ErrorFor(op, Endpoint::kBearer, answer);
  }
  absl::StatusOr<std::string> id = internal::ParseTokenId(answer.res.body);
  if (!id.ok()) {
    return absl::UnavailableError(absl::StrCat(op.What(), ": answered ", answer.res.status,
                                               " with an unusable body: ", id.status().message()));
  }
  return id;
}

// Sets grant.provider_token_id when the provider has a token-info endpoint. A failure is logged
// and leaves the id empty: the code (or refresh token) is spent already, so failing would lose
// the grant; Revoke looks the id up itself when it is missing.
void FillTokenId(const Channel& ch, const Op& op, const core::Connection& connection,
                 core::Grant& grant, absl::Time deadline) {
  if (op.spec.token_info_url.empty()) {
    return;
  }
  absl::StatusOr<std::string> id =
      LookUpTokenId(ch, op.spec, connection, grant.access_token, deadline);
  if (!id.ok()) {
    spdlog::warn(
        "provider token id lookup failed, keeping the grant without an id: provider={} "
        "connection={} op=\"{}\" code={} error=\"{}\"",
        op.spec.name, connection.id, Sv(op.name), absl::StatusCodeToString(id.status().code()),
        Sv(id.status().message()));
    return;
  }
  grant.provider_token_id = *std::move(id);
}

absl::Status RevokeByTokenId(const Channel& ch, const Op& op, const core::Connection& connection,
                             absl::Time deadline) {
  const core::Grant& grant = *connection.grant;
  if (grant.access_token.empty()) {
    return absl::FailedPreconditionError(
        absl::StrCat(op.What(), ": no access token to authorize the revocation"));
  }
  std::string id = grant.provider_token_id;
  if (id.empty()) {
    TB_ASSIGN_OR_RETURN(id, LookUpTokenId(ch, op.spec, connection, grant.access_token, deadline));
  }
  if (!internal::IsValidTokenId(id)) {
    return absl::FailedPreconditionError(
        absl::StrCat(op.What(), ": the stored provider token id is not a valid id"));
  }
  TB_ASSIGN_OR_RETURN(std::string url, Url(op, op.spec.revoke_url, connection, {{"token_id", id}}));
  HttpRequest req;
  req.method = "DELETE";
  req.url = std::move(url);
  req.headers = {{"Accept", "application/json"},
                 {"Authorization", absl::StrCat("Bearer ", grant.access_token.Reveal())}};
  TB_ASSIGN_OR_RETURN(const Answer answer, Send(ch, op, req, deadline));
  if (Is2xx(answer.res.status) || answer.res.status == 404) {  // 404: already gone, as wanted
    return absl::OkStatus();
  }
  return ErrorFor(op, Endpoint::kBearer, answer);
}

// RFC 7009 2.1: one token per request, always form-encoded, with client authentication.
absl::Status RevokeOne(const Channel& ch, const Op& op, const core::Connection& connection,
                       absl::string_view token, absl::string_view hint, absl::Time deadline) {
  TB_ASSIGN_OR_RETURN(std::string url, Url(op, op.spec.revoke_url, connection));
  HttpRequest req;
  req.method = "POST";
  req.url = std::move(url);
  req.headers.emplace_back("Accept", "application/json");
  std::vector<Param> params = {{"token", std::string(token)},
                               {"token_type_hint", std::string(hint)}};
  AddClientAuth(op.spec, params, req);
  SetBody(core::BodyEncoding::kForm, params, req);
  TB_ASSIGN_OR_RETURN(const Answer answer, Send(ch, op, req, deadline));
  if (Is2xx(answer.res.status)) {
    return absl::OkStatus();
  }
  return ErrorFor(op, Endpoint::kClientAuthenticated, answer);
}

}  // namespace

ProviderGateStats HttpsProviderClient::gate_stats() const { return gate_.Stats(); }

HttpsProviderClient::HttpsProviderClient(HttpClientOptions base, const Clock& clock,
                                         HttpClientFactory factory, ProviderGateOptions gate,
                                         metrics::Registry* metrics)
    : base_(std::move(base)),
      clock_(clock),
      factory_(std::move(factory)),
      gate_(std::move(gate), clock) {
  if (metrics != nullptr) {
    // 5 ms .. 41 s: a provider answers in tens to hundreds of milliseconds, and the default
    // request timeout is 30 s.
    http_metrics_ = HttpMetrics{
        &metrics->AddHistogramFamily(
            "tb_provider_http_request_duration_seconds",
            "Provider HTTP calls sent, from sending to the answer (or the transport failure), by "
            "provider and operation (token, token_info, revoke). Calls the provider gate refused "
            "are not sent and not counted here.",
            {"provider", "operation"}, metrics::ExponentialBuckets(0.005, 2, 14)),
        &metrics->AddCounterFamily(
            "tb_provider_http_responses_total",
            "Provider HTTP calls sent, by provider, operation (token, token_info, revoke) and "
            "HTTP status code; code=\"transport_error\" when no answer came (connection refused "
            "or reset, TLS failure, timeout).",
            {"provider", "operation", "code"})};
  }
}

absl::StatusOr<std::unique_ptr<HttpsProviderClient>> HttpsProviderClient::Create(
    HttpClientOptions base, const std::vector<core::ProviderSpec>& specs, const Clock& clock,
    HttpClientFactory factory, ProviderGateOptions gate, metrics::Registry* metrics) {
  if (!factory) {
    return absl::InvalidArgumentError("HttpsProviderClient: no HttpClient factory");
  }
  TB_RETURN_IF_ERROR(ValidateProviderGateOptions(gate));
  std::unique_ptr<HttpsProviderClient> client(new HttpsProviderClient(
      std::move(base), clock, std::move(factory), std::move(gate), metrics));
  for (const core::ProviderSpec& spec : specs) {
    if (absl::StatusOr<HttpClient*> http = client->ClientFor(spec); !http.ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat("provider '", spec.name, "': ", http.status().message()));
    }
  }
  return client;
}

absl::StatusOr<HttpClient*> HttpsProviderClient::ClientFor(const core::ProviderSpec& spec) {
  const std::pair<std::string, absl::Duration> key(spec.ca_file, spec.connect_timeout);
  {
    MutexLock lock(&mu_);
    if (const auto it = clients_.find(key); it != clients_.end()) {
      return it->second.get();
    }
  }
  // Built outside the lock: it reads the CA file.
  HttpClientOptions options = base_;
  options.ca_file = spec.ca_file;
  options.connect_timeout = spec.connect_timeout;
  absl::StatusOr<std::unique_ptr<HttpClient>> created = factory_(options);
  if (!created.ok()) {
    return created.status();
  }
  MutexLock lock(&mu_);
  // If another thread got there first, its client stays and ours is dropped.
  const auto [it, inserted] = clients_.emplace(key, *std::move(created));
  return it->second.get();
}

absl::StatusOr<core::Grant> HttpsProviderClient::ExchangeCode(
    const core::ProviderSpec& spec, const core::Connection& connection, const AuthCode& code,
    const PkceVerifier& verifier, const std::string& redirect_uri, absl::Time deadline) {
  const Op op{spec, "code exchange"};
  absl::StatusOr<HttpClient*> http = ClientFor(spec);
  if (!http.ok()) {
    return core::ReasonError(absl::StatusCode::kFailedPrecondition,
                             core::Reason::kProviderMisconfigured,
                             absl::StrCat(op.What(), ": ", http.status().message()));
  }
  std::vector<Param> params = {{"grant_type", "authorization_code"},
                               {"code", std::string(code.Reveal())},
                               {"redirect_uri", redirect_uri}};
  if (spec.pkce && !verifier.empty()) {
    params.push_back({"code_verifier", std::string(verifier.Reveal())});
  }
  if (spec.preset == "zendesk" && !spec.scopes.empty()) {
    params.push_back({"scope", absl::StrJoin(spec.scopes, " ")});
  }
  const Channel ch{**http, gate_, clock_, HttpMetricsOrNull()};
  TB_ASSIGN_OR_RETURN(core::Grant grant,
                      TokenCall(ch, op, connection, std::move(params), deadline));
  FillTokenId(ch, op, connection, grant, deadline);
  return grant;
}

absl::StatusOr<core::Grant> HttpsProviderClient::Refresh(const core::ProviderSpec& spec,
                                                         const core::Connection& connection,
                                                         absl::Time deadline) {
  const Op op{spec, "refresh"};
  if (!connection.grant || !connection.grant->refresh_token ||
      connection.grant->refresh_token->empty()) {
    return core::ReasonError(
        absl::StatusCode::kFailedPrecondition, core::Reason::kNotRefreshable,
        absl::StrCat(op.What(), ": connection '", connection.id, "' has no refresh token"));
  }
  absl::StatusOr<HttpClient*> http = ClientFor(spec);
  if (!http.ok()) {
    return core::ReasonError(absl::StatusCode::kFailedPrecondition,
                             core::Reason::kProviderMisconfigured,
                             absl::StrCat(op.What(), ": ", http.status().message()));
  }
  std::vector<Param> params = {
      {"grant_type", "refresh_token"},
      {"refresh_token", std::string(connection.grant->refresh_token->Reveal())}};
  const Channel ch{**http, gate_, clock_, HttpMetricsOrNull()};
  TB_ASSIGN_OR_RETURN(core::Grant grant,
                      TokenCall(ch, op, connection, std::move(params), deadline));
  // Zendesk made a new token record: the old id is dead, look up the new one.
  FillTokenId(ch, op, connection, grant, deadline);
  return grant;
}

absl::Status HttpsProviderClient::Revoke(const core::ProviderSpec& spec,
                                         const core::Connection& connection, absl::Time deadline) {
  const Op op{spec, "revoke"};
  if (spec.revocation == core::Revocation::kNone || !connection.grant) {
    return absl::OkStatus();
  }
  absl::StatusOr<HttpClient*> http = ClientFor(spec);
  if (!http.ok()) {
    return core::ReasonError(absl::StatusCode::kFailedPrecondition,
                             core::Reason::kProviderMisconfigured,
                             absl::StrCat(op.What(), ": ", http.status().message()));
  }
  const Channel ch{**http, gate_, clock_, HttpMetricsOrNull()};
  if (spec.revocation == core::Revocation::kZendeskTokenId) {
    return RevokeByTokenId(ch, op, connection, deadline);
  }
  const core::Grant& grant = *connection.grant;
  const bool has_refresh = grant.refresh_token && !grant.refresh_token->empty();
  if (has_refresh) {
    TB_RETURN_IF_ERROR(
        RevokeOne(ch, op, connection, grant.refresh_token->Reveal(), "refresh_token", deadline));
  }
  if (!grant.access_token.empty()) {
    TB_RETURN_IF_ERROR(
        RevokeOne(ch, op, connection, grant.access_token.Reveal(), "access_token", deadline));
  }
  return absl::OkStatus();
}

}  // namespace tb::provider
