#include "server/src/provider/provider_gate.h"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "server/src/core/retry_after.h"

namespace tb::provider {
namespace {

// A waiter re-reads the clock at least this often, so that its deadline holds even for an
// injected clock that does not move with real time (tests); a freed slot wakes it at once.
constexpr absl::Duration kWaitSlice = absl::Milliseconds(50);

// RFC 9110 5.6.7: the preferred IMF-fixdate, then the two obsolete forms recipients must accept.
constexpr const char* kHttpDateFormats[] = {
    "%a, %d %b %Y %H:%M:%S GMT",  // Sun, 06 Nov 1994 08:49:37 GMT
    "%A, %d-%b-%y %H:%M:%S GMT",  // Sunday, 06-Nov-94 08:49:37 GMT
    "%a %b %e %H:%M:%S %Y",       // Sun Nov  6 08:49:37 1994
};

std::string Stamp(absl::Time t) {
  return absl::FormatTime("%Y-%m-%dT%H:%M:%E3SZ", t, absl::UTCTimeZone());
}

}  // namespace

absl::Status ValidateProviderGateOptions(const ProviderGateOptions& o) {
  const auto bad = [](absl::string_view field) {
    return absl::InvalidArgumentError(absl::StrCat("provider gate: ", field, " out of range"));
  };
  if (o.max_in_flight_per_host < 1) {
    return bad("max_in_flight_per_host");
  }
  if (o.failure_threshold < 1) {
    return bad("failure_threshold");
  }
  if (o.open_for <= absl::ZeroDuration()) {
    return bad("open_for");
  }
  if (o.max_open_for < o.open_for) {
    return bad("max_open_for");
  }
  if (o.default_retry_after <= absl::ZeroDuration()) {
    return bad("default_retry_after");
  }
  if (o.retry_after_cap < o.default_retry_after) {
    return bad("retry_after_cap");
  }
  if (o.max_hosts < 1) {
    return bad("max_hosts");
  }
  if (o.idle_ttl <= absl::ZeroDuration()) {
    return bad("idle_ttl");
  }
  return absl::OkStatus();
}

absl::Time RetryAfterTime(absl::string_view value, absl::Time now,
                          const ProviderGateOptions& options) {
  const absl::Time fallback = now + options.default_retry_after;
  const absl::Time cap = now + options.retry_after_cap;
  const absl::string_view v = absl::StripAsciiWhitespace(value);
  if (v.empty()) {
    return fallback;
  }
  if (std::all_of(v.begin(), v.end(), [](char c) { return absl::ascii_isdigit(c); })) {
    // delay-seconds = 1*DIGIT. More digits than any int64 of seconds: absurd, so the cap.
    int64_t seconds = 0;
    if (v.size() > 12 || !absl::SimpleAtoi(v, &seconds)) {
      return cap;
    }
    return std::min(now + absl::Seconds(seconds), cap);
  }
  for (const char* format : kHttpDateFormats) {
    absl::Time t;
    std::string error;
    if (absl::ParseTime(format, std::string(v), absl::UTCTimeZone(), &t, &error)) {
      return std::clamp(t, now, cap);
    }
  }
  return fallback;
}

// One provider host. Guarded by ProviderGate::mu_ (not expressible as an annotation here).
struct ProviderGate::Host {
  enum class Circuit { kClosed, kOpen, kHalfOpen };

  explicit Host(std::string o, absl::Duration open_for)
      : origin(std::move(o)), open_period(open_for) {}

  // No state worth keeping: forgetting this host changes nothing.
  bool Clean(absl::Time now) const {
    return circuit == Circuit::kClosed && failures == 0 && blocked_until <= now;
  }
  // Its block and open period are over: forgetting it loses at most a failure count.
  bool Stale(absl::Time now) const {
    return blocked_until <= now &&
           (circuit == Circuit::kClosed || (circuit == Circuit::kOpen && now >= open_until) ||
            (circuit == Circuit::kHalfOpen && !probe_out));
  }
  bool InUse() const { return in_flight > 0 || waiting > 0; }

  const std::string origin;
  Circuit circuit = Circuit::kClosed;
  int failures = 0;            // transient failures in a row while closed
  absl::Time open_until;       // kOpen: when the probe may go
  absl::Duration open_period;  // the last open period (doubled by a failed probe)
  bool probe_out = false;      // kHalfOpen: the probe is in flight
  absl::Time blocked_until = absl::InfinitePast();  // Retry-After
  size_t in_flight = 0;
  size_t waiting = 0;
  absl::Time last_used;
  CondVar slot_freed;
};

ProviderGate::ProviderGate(ProviderGateOptions options, const Clock& clock)
    : options_(std::move(options)), clock_(clock), last_sweep_(clock.Now()) {}

ProviderGate::~ProviderGate() = default;

absl::StatusOr<ProviderGate::Permit> ProviderGate::Admit(absl::string_view origin,
                                                         absl::string_view provider,
                                                         absl::Time deadline) {
  const std::string name(provider);
  MutexLock lock(&mu_);
  // The clock is read under mu_ because the wait below needs it there; clocks take no lock of
  // ours, so this cannot deadlock.
  absl::Time now = clock_.Now();
  Host& h = HostLocked(origin, now);
  bool waited = false;
  for (;;) {
    // Looked up each time: a wait releases mu_, and another provider's insertion may rehash.
    ProviderGateCounters& counters = counters_[name];
    h.last_used = now;
    if (now < h.blocked_until) {
      ++counters.blocked_by_retry_after;
      return core::WithRetryAt(absl::ResourceExhaustedError(absl::StrCat(
                                   h.origin, " is rate limited until ", Stamp(h.blocked_until),
                                   " (Retry-After): not sent")),
                               h.blocked_until);
    }
    if (h.circuit == Host::Circuit::kOpen) {
      if (now < h.open_until) {
        ++counters.blocked_by_circuit;
        return core::WithRetryAt(
            absl::UnavailableError(absl::StrCat("circuit open for ", h.origin, " until ",
                                                Stamp(h.open_until), ": not sent")),
            h.open_until);
      }
      h.circuit = Host::Circuit::kHalfOpen;
      h.probe_out = false;
      ++counters.circuit_half_opened;
      spdlog::info("provider host circuit half-open, probing: provider={} host={}", name, h.origin);
    }
    if (h.circuit == Host::Circuit::kHalfOpen && h.probe_out) {
      ++counters.blocked_by_circuit;
      return absl::UnavailableError(
          absl::StrCat("circuit open for ", h.origin, ": a probe is in flight; not sent"));
    }
    if (h.in_flight < options_.max_in_flight_per_host) {
      ++h.in_flight;
      const bool probe = h.circuit == Host::Circuit::kHalfOpen;
      h.probe_out = probe;
      return Permit(this, &h, probe, name);
    }
    if (!waited) {
      waited = true;
      ++counters.slot_waits;
    }
    if (now >= deadline) {
      ++counters.slot_timeouts;
      return absl::DeadlineExceededError(absl::StrCat("deadline passed waiting for one of the ",
                                                      options_.max_in_flight_per_host,
                                                      " call slots of ", h.origin, ": not sent"));
    }
    ++h.waiting;
    h.slot_freed.WaitFor(&mu_, absl::ToChronoMicroseconds(std::min(deadline - now, kWaitSlice)));
    --h.waiting;
    now = clock_.Now();
  }
}

void ProviderGate::Finish(Host* host, bool probe, const std::string& provider, Outcome outcome,
                          std::optional<absl::Time> blocked_until) {
  MutexLock lock(&mu_);
  const absl::Time now = clock_.Now();
  Host& h = *host;
  ProviderGateCounters& counters = counters_[provider];
  --h.in_flight;
  h.last_used = now;
  if (blocked_until) {
    ++counters.rate_limited;
    if (*blocked_until > h.blocked_until && *blocked_until > now) {
      h.blocked_until = *blocked_until;
      spdlog::warn("provider host rate limited: provider={} host={} until={}", provider, h.origin,
                   Stamp(h.blocked_until));
    }
  }
  if (probe) {
    h.probe_out = false;
    if (outcome == Outcome::kAnswered) {
      h.circuit = Host::Circuit::kClosed;
      h.failures = 0;
      h.open_period = options_.open_for;
      ++counters.circuit_closed;
      spdlog::info("provider host circuit closed: provider={} host={}", provider, h.origin);
    } else if (outcome == Outcome::kFailed) {
      OpenLocked(h, now, std::min(h.open_period * 2, options_.max_open_for), provider);
    }
    // kNeutral: still half-open, the next call probes.
  } else if (h.circuit == Host::Circuit::kClosed) {
    // Answers of calls sent before the circuit opened say nothing about the host now: only
    // closed-state results count.
    if (outcome == Outcome::kAnswered) {
      h.failures = 0;
    } else if (outcome == Outcome::kFailed && ++h.failures >= options_.failure_threshold) {
      OpenLocked(h, now, options_.open_for, provider);
    }
  }
  if (h.waiting > 0) {
    h.slot_freed.SignalAll();
  }
}

void ProviderGate::OpenLocked(Host& h, absl::Time now, absl::Duration period,
                              const std::string& provider) {
  spdlog::warn("provider host circuit opened: provider={} host={} failures={} open_ms={}", provider,
               h.origin, h.failures, absl::ToInt64Milliseconds(period));
  h.circuit = Host::Circuit::kOpen;
  h.failures = 0;
  h.open_period = period;
  h.open_until = now + period;
  ++counters_[provider].circuit_opened;
}

ProviderGate::Host& ProviderGate::HostLocked(absl::string_view origin, absl::Time now) {
  if (now - last_sweep_ >= options_.idle_ttl) {
    SweepLocked(now, /*full=*/false);
  }
  if (const auto it = hosts_.find(origin); it != hosts_.end()) {
    return *it->second;
  }
  if (hosts_.size() >= options_.max_hosts) {
    SweepLocked(now, /*full=*/true);
  }
  auto [it, inserted] = hosts_.emplace(
      std::string(origin), std::make_unique<Host>(std::string(origin), options_.open_for));
  it->second->last_used = now;
  return *it->second;
}

void ProviderGate::SweepLocked(absl::Time now, bool full) {
  if (!full) {
    last_sweep_ = now;
    for (auto it = hosts_.begin(); it != hosts_.end();) {
      const Host& h = *it->second;
      if (!h.InUse() && now - h.last_used >= options_.idle_ttl && h.Stale(now)) {
        hosts_.erase(it++);
      } else {
        ++it;
      }
    }
    return;
  }
  // Full: hosts without state go first, whatever their age.
  for (auto it = hosts_.begin(); it != hosts_.end();) {
    const Host& h = *it->second;
    if (!h.InUse() && h.Clean(now)) {
      hosts_.erase(it++);
    } else {
      ++it;
    }
  }
  if (hosts_.size() < options_.max_hosts) {
    return;
  }
  // Still full: the least recently used host not in use, state and all.
  auto victim = hosts_.end();
  for (auto it = hosts_.begin(); it != hosts_.end(); ++it) {
    if (!it->second->InUse() &&
        (victim == hosts_.end() || it->second->last_used < victim->second->last_used)) {
      victim = it;
    }
  }
  if (victim != hosts_.end()) {
    spdlog::warn("provider gate host table full ({} hosts): forgetting host={}", hosts_.size(),
                 victim->second->origin);
    hosts_.erase(victim);
    ++evicted_;
  }
}

ProviderGateStats ProviderGate::Stats() const {
  ProviderGateStats out;
  MutexLock lock(&mu_);
  const absl::Time now = clock_.Now();
  for (const auto& [name, counters] : counters_) {
    out.providers[name] = counters;
  }
  out.hosts = hosts_.size();
  for (const auto& [origin, h] : hosts_) {
    out.hosts_blocked += h->blocked_until > now ? 1 : 0;
    out.circuits_open += h->circuit != Host::Circuit::kClosed ? 1 : 0;
    out.in_flight += h->in_flight;
    out.waiting += h->waiting;
  }
  out.hosts_evicted = evicted_;
  return out;
}

// --- Permit ----------------------------------------------------------------------------------

ProviderGate::Permit::Permit(Permit&& other) noexcept
    : gate_(std::exchange(other.gate_, nullptr)),
      host_(std::exchange(other.host_, nullptr)),
      probe_(other.probe_),
      provider_(std::move(other.provider_)) {}

ProviderGate::Permit& ProviderGate::Permit::operator=(Permit&& other) noexcept {
  if (this != &other) {
    Finish(Outcome::kNeutral);
    gate_ = std::exchange(other.gate_, nullptr);
    host_ = std::exchange(other.host_, nullptr);
    probe_ = other.probe_;
    provider_ = std::move(other.provider_);
  }
  return *this;
}

ProviderGate::Permit::~Permit() { Finish(Outcome::kNeutral); }

void ProviderGate::Permit::Finish(Outcome outcome, std::optional<absl::Time> blocked_until) {
  if (gate_ == nullptr) {
    return;
  }
  ProviderGate* gate = std::exchange(gate_, nullptr);
  gate->Finish(std::exchange(host_, nullptr), probe_, provider_, outcome, blocked_until);
}

}  // namespace tb::provider
