#ifndef TB_PROVIDER_PROVIDER_GATE_H_
#define TB_PROVIDER_PROVIDER_GATE_H_

// ProviderGate: what the provider adapter checks before it sends a request to a provider host,
// and tells after the answer. Per host (the URL's origin, "https://acme.zendesk.com:443": every
// Zendesk subdomain is its own host) it keeps
//   - a Retry-After block: a 429 (or a 503 with Retry-After) stops every call to that host until
//     the time the answer named;
//   - a concurrency limit: at most max_in_flight calls at once, later ones wait for a slot, never
//     past their deadline;
//   - a circuit breaker: failure_threshold transient failures in a row (transport errors,
//     timeouts, 408, 5xx) open the circuit for open_for; calls then fail at once; after that one
//     probe call goes out (half-open): its success closes the circuit, its failure opens it again
//     for twice as long (capped at max_open_for).
// The gate acts before a request is sent and never cancels one that was: a refresh the provider
// may already have processed is always waited for. Refused calls never reach the network.
// Logic over an injected clock: no I/O (state changes are logged), std and Abseil types only.

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <utility>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "server/src/common/clock.h"
#include "server/src/common/mutex.h"

namespace tb::provider {

struct ProviderGateOptions {
  // Calls in flight to one host at most; more wait for a slot until their deadline. >= 1.
  size_t max_in_flight_per_host = 8;
  // Transient failures in a row that open a host's circuit. >= 1.
  int failure_threshold = 5;
  // How long a circuit stays open before its probe; a failed probe doubles it, up to
  // max_open_for (set both equal for a fixed period). > 0, max_open_for >= open_for.
  absl::Duration open_for = absl::Seconds(30);
  absl::Duration max_open_for = absl::Minutes(5);
  // A 429 without a usable Retry-After (missing, garbage, negative) blocks its host this long; a
  // 503 with an unusable one too. A Retry-After further away than retry_after_cap is cut to it.
  // > 0, retry_after_cap >= default_retry_after.
  absl::Duration default_retry_after = absl::Seconds(30);
  absl::Duration retry_after_cap = absl::Hours(1);
  // Host table bound. Hosts that carry no state (circuit closed, no failures, no block, nothing
  // in flight) are forgotten when unused for idle_ttl, and at once when the table is full; if it
  // is still full, the least recently used host without calls in flight or waiting goes (its
  // block or open circuit is forgotten, counted in hosts_evicted). Hosts with calls in flight are
  // never evicted, so the table exceeds max_hosts only by those. >= 1; idle_ttl > 0.
  size_t max_hosts = 4096;
  absl::Duration idle_ttl = absl::Minutes(10);
};

// INVALID_ARGUMENT naming the first out-of-range field.
absl::Status ValidateProviderGateOptions(const ProviderGateOptions& options);

// When a host that answered with Retry-After value `value` (raw header; "" if none) at `now` may
// be called again: delay-seconds ("120") or an HTTP date (RFC 9110 5.6.7: IMF-fixdate
// "Sun, 06 Nov 1994 08:49:37 GMT", obsolete RFC 850 "Sunday, 06-Nov-94 08:49:37 GMT" and asctime
// "Sun Nov  6 08:49:37 1994"), surrounding whitespace ignored. A date in the past is `now`. A
// missing or unparsable value gives now + default_retry_after; anything beyond
// now + retry_after_cap is cut to it.
absl::Time RetryAfterTime(absl::string_view value, absl::Time now,
                          const ProviderGateOptions& options);

// Counters of one provider (by ProviderSpec::name; a host's state changes count for the provider
// whose call caused them). Monotonic.
struct ProviderGateCounters {
  uint64_t rate_limited = 0;            // 429 answers, and 503 answers with Retry-After
  uint64_t blocked_by_retry_after = 0;  // calls refused: host blocked by a Retry-After
  uint64_t blocked_by_circuit = 0;      // calls refused: circuit open (or its probe out)
  uint64_t slot_waits = 0;              // calls that had to wait for a concurrency slot
  uint64_t slot_timeouts = 0;           // ... and gave up at their deadline
  uint64_t circuit_opened = 0;          // closed -> open, and half-open -> open (failed probe)
  uint64_t circuit_half_opened = 0;     // open -> half-open (a probe let through)
  uint64_t circuit_closed = 0;          // half-open -> closed (the probe succeeded)
};

// A snapshot for metrics.
struct ProviderGateStats {
  std::map<std::string, ProviderGateCounters> providers;  // by provider name
  size_t hosts = 0;                                       // hosts in the table
  size_t hosts_blocked = 0;                               // under a Retry-After block now
  size_t circuits_open = 0;                               // open or half-open now
  size_t in_flight = 0;        // calls sent and not yet answered, all hosts
  size_t waiting = 0;          // calls waiting for a slot, all hosts
  uint64_t hosts_evicted = 0;  // hosts forgotten while they still had state (table full)
};

// Thread-safe. Admit blocks only while waiting for a concurrency slot (bounded by the deadline);
// everything else is a short critical section under one mutex. The clock must outlive the gate.
class ProviderGate {
 public:
  // How a sent call ended, for the circuit breaker.
  enum class Outcome {
    kAnswered,  // the host answered (any status but 408 and 5xx, 429 included): it is up
    kFailed,    // transport error, timeout, 408 or 5xx: a transient failure
    kNeutral,   // says nothing about the host (the request was refused locally)
  };

  class Permit;

  ProviderGate(ProviderGateOptions options, const Clock& clock);
  ~ProviderGate();
  ProviderGate(const ProviderGate&) = delete;
  ProviderGate& operator=(const ProviderGate&) = delete;

  // Asks to send one request to `host` (an origin) for provider `provider` (counters only),
  // waiting for a slot until `deadline` (compared with the injected clock). Errors, all without
  // any network traffic:
  //   RESOURCE_EXHAUSTED  the host is blocked by a Retry-After (core::RetryAfterOf: its end)
  //   UNAVAILABLE         "circuit open for <host>" (core::RetryAfterOf: when the probe may go,
  //                       absent while a probe is out)
  //   DEADLINE_EXCEEDED   no slot freed up before `deadline`
  // Messages name the host, never a path or query.
  absl::StatusOr<Permit> Admit(absl::string_view host, absl::string_view provider,
                               absl::Time deadline) ABSL_LOCKS_EXCLUDED(mu_);

  ProviderGateStats Stats() const ABSL_LOCKS_EXCLUDED(mu_);

  const ProviderGateOptions& options() const { return options_; }

 private:
  struct Host;

  void Finish(Host* host, bool probe, const std::string& provider, Outcome outcome,
              std::optional<absl::Time> blocked_until) ABSL_LOCKS_EXCLUDED(mu_);
  Host& HostLocked(absl::string_view origin, absl::Time now) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void SweepLocked(absl::Time now, bool full) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void OpenLocked(Host& host, absl::Time now, absl::Duration period, const std::string& provider)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const ProviderGateOptions options_;
  const Clock& clock_;

  mutable Mutex mu_;
  // Hosts are heap-allocated so that waiters and permits keep a stable pointer; a host with
  // calls in flight or waiting is never erased.
  absl::flat_hash_map<std::string, std::unique_ptr<Host>> hosts_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_map<std::string, ProviderGateCounters> counters_ ABSL_GUARDED_BY(mu_);
  absl::Time last_sweep_ ABSL_GUARDED_BY(mu_);
  uint64_t evicted_ ABSL_GUARDED_BY(mu_) = 0;
};

// The right to send one request to a host: holds one of its concurrency slots (and, half-open,
// its probe) until Finish() or destruction. Move-only. Destroyed without Finish() it counts as
// Outcome::kNeutral. Must not outlive its gate.
class ProviderGate::Permit {
 public:
  Permit(Permit&& other) noexcept;
  Permit& operator=(Permit&& other) noexcept;
  Permit(const Permit&) = delete;
  Permit& operator=(const Permit&) = delete;
  ~Permit();

  // Reports how the call ended and frees the slot. `blocked_until`: the answer's Retry-After
  // (RetryAfterTime), blocking the host until then. Once only; later calls do nothing.
  void Finish(Outcome outcome, std::optional<absl::Time> blocked_until = std::nullopt);

  // True when this call is the half-open circuit's probe.
  bool probe() const { return probe_; }

 private:
  friend class ProviderGate;
  Permit(ProviderGate* gate, Host* host, bool probe, std::string provider)
      : gate_(gate), host_(host), probe_(probe), provider_(std::move(provider)) {}

  ProviderGate* gate_ = nullptr;
  Host* host_ = nullptr;
  bool probe_ = false;
  std::string provider_;
};

}  // namespace tb::provider

#endif  // TB_PROVIDER_PROVIDER_GATE_H_
