// ProviderGate on a fake clock: Retry-After parsing and blocking, the concurrency limit, the
// circuit breaker, the bounded host table and the counters. Threads appear only where a call
// must wait for a slot; no test sleeps to make time pass.

#include "server/src/provider/provider_gate.h"

#include <atomic>
#include <optional>
#include <thread>
#include <utility>
#include <vector>

#include "absl/time/clock.h"
#include "gtest/gtest.h"
#include "server/src/core/retry_after.h"
#include "tests/fakes/fake_clock.h"

namespace tb::provider {
namespace {

using Outcome = ProviderGate::Outcome;

constexpr char kAcme[] = "https://acme.zendesk.com:443";
constexpr char kBeta[] = "https://beta.zendesk.com:443";
constexpr char kZendesk[] = "zendesk";
const absl::Time kNoDeadline = absl::InfiniteFuture();

// Polls (in real time) until `done` holds; for handing over between threads, not for timing.
template <typename F>
bool Eventually(F done) {
  const absl::Time give_up = absl::Now() + absl::Seconds(10);
  while (!done()) {
    if (absl::Now() > give_up) {
      return false;
    }
    absl::SleepFor(absl::Milliseconds(1));
  }
  return true;
}

std::string ImfDate(absl::Time t) {
  return absl::FormatTime("%a, %d %b %Y %H:%M:%S GMT", t, absl::UTCTimeZone());
}

// --- Retry-After values ----------------------------------------------------------------------

class RetryAfterTimeTest : public ::testing::Test {
 protected:
  absl::Time At(absl::string_view value) { return RetryAfterTime(value, now_, options_); }

  // Whole seconds, as HTTP dates are.
  const absl::Time now_ = absl::FromUnixSeconds(1'700'000'000);
  ProviderGateOptions options_;
};

TEST_F(RetryAfterTimeTest, DelaySeconds) {
  EXPECT_EQ(At("2"), now_ + absl::Seconds(2));
  EXPECT_EQ(At("  120 "), now_ + absl::Seconds(120));
  EXPECT_EQ(At("0"), now_);
}

TEST_F(RetryAfterTimeTest, HttpDateInAllThreeForms) {
  // 1700000090 is Tue, 14 Nov 2023 22:14:50 GMT.
  const absl::Time at = now_ + absl::Seconds(90);
  ASSERT_EQ(ImfDate(at), "Tue, 14 Nov 2023 22:14:50 GMT");
  EXPECT_EQ(At("Tue, 14 Nov 2023 22:14:50 GMT"), at);    // IMF-fixdate
  EXPECT_EQ(At("Tuesday, 14-Nov-23 22:14:50 GMT"), at);  // RFC 850
  EXPECT_EQ(At("Tue Nov 14 22:14:50 2023"), at);         // asctime
  EXPECT_EQ(At("Tue Nov  7 22:14:50 2023"), now_);       // asctime, space-padded day, in the past
}

TEST_F(RetryAfterTimeTest, DateInThePastIsNow) {
  EXPECT_EQ(At(ImfDate(now_ - absl::Hours(5))), now_);
}

TEST_F(RetryAfterTimeTest, MissingOrGarbageFallsBackToTheDefault) {
  const absl::Time fallback = now_ + absl::Seconds(30);
  for (const char* v : {"", "   ", "soon", "-5", "+5", "1.5", "2s", "Tue, 99 Nov 2023 22:14:50 GMT",
                        "Tue, 14 Nov 2023 22:14:50 +0000"}) {
    EXPECT_EQ(At(v), fallback) << "'" << v << "'";
  }
  options_.default_retry_after = absl::Seconds(7);
  EXPECT_EQ(At("later"), now_ + absl::Seconds(7));
}

TEST_F(RetryAfterTimeTest, AbsurdValuesAreCapped) {
  const absl::Time cap = now_ + absl::Hours(1);
  EXPECT_EQ(At("3601"), cap);
  EXPECT_EQ(At("99999999999999999999999"), cap);
  EXPECT_EQ(At(ImfDate(now_ + absl::Hours(24 * 365))), cap);
  EXPECT_EQ(At("3600"), cap);
  EXPECT_EQ(At("3599"), now_ + absl::Seconds(3599));
}

// --- The gate --------------------------------------------------------------------------------

class ProviderGateTest : public ::testing::Test {
 protected:
  ProviderGate& Gate() {
    if (!gate_) {
      gate_.emplace(options_, clock_);
    }
    return *gate_;
  }
  // Admits and finishes one call at once.
  absl::Status Call(absl::string_view host, Outcome outcome,
                    std::optional<absl::Time> blocked_until = std::nullopt) {
    absl::StatusOr<ProviderGate::Permit> p = Gate().Admit(host, kZendesk, kNoDeadline);
    if (!p.ok()) {
      return p.status();
    }
    p->Finish(outcome, blocked_until);
    return absl::OkStatus();
  }
  ProviderGateCounters Counters() { return Gate().Stats().providers[kZendesk]; }

  tb::testing::FakeClock clock_;
  ProviderGateOptions options_;
  std::optional<ProviderGate> gate_;
};

TEST_F(ProviderGateTest, RetryAfterBlocksThatHostOnlyUntilItsTime) {
  const absl::Time until = clock_.Now() + absl::Seconds(2);
  ASSERT_TRUE(Call(kAcme, Outcome::kAnswered, until).ok());

  absl::StatusOr<ProviderGate::Permit> p = Gate().Admit(kAcme, kZendesk, kNoDeadline);
  ASSERT_EQ(p.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(core::RetryAfterOf(p.status()), until);
  EXPECT_TRUE(Call(kBeta, Outcome::kAnswered).ok());  // another subdomain is another host

  clock_.Advance(absl::Seconds(2) - absl::Milliseconds(1));
  EXPECT_EQ(Call(kAcme, Outcome::kAnswered).code(), absl::StatusCode::kResourceExhausted);
  clock_.Advance(absl::Milliseconds(1));
  EXPECT_TRUE(Call(kAcme, Outcome::kAnswered).ok());

  const ProviderGateCounters c = Counters();
  EXPECT_EQ(c.rate_limited, 1u);
  EXPECT_EQ(c.blocked_by_retry_after, 2u);
  EXPECT_EQ(c.circuit_opened, 0u);
}

TEST_F(ProviderGateTest, ALaterShorterRetryAfterDoesNotShortenTheBlock) {
  absl::StatusOr<ProviderGate::Permit> a = Gate().Admit(kAcme, kZendesk, kNoDeadline);
  absl::StatusOr<ProviderGate::Permit> b = Gate().Admit(kAcme, kZendesk, kNoDeadline);
  ASSERT_TRUE(a.ok() && b.ok());
  a->Finish(Outcome::kAnswered, clock_.Now() + absl::Seconds(60));
  b->Finish(Outcome::kAnswered, clock_.Now() + absl::Seconds(5));
  clock_.Advance(absl::Seconds(30));
  EXPECT_EQ(Call(kAcme, Outcome::kAnswered).code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(Gate().Stats().hosts_blocked, 1u);
}

TEST_F(ProviderGateTest, BreakerOpensAfterThresholdFailsFastAndProbesAfterThePeriod) {
  options_.failure_threshold = 3;
  options_.open_for = absl::Seconds(30);
  for (int i = 0; i < 3; ++i) {
    ASSERT_TRUE(Call(kAcme, Outcome::kFailed).ok()) << i;
  }
  const absl::Time probe_at = clock_.Now() + absl::Seconds(30);
  absl::StatusOr<ProviderGate::Permit> refused = Gate().Admit(kAcme, kZendesk, kNoDeadline);
  ASSERT_EQ(refused.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ(core::RetryAfterOf(refused.status()), probe_at);
  EXPECT_TRUE(Call(kBeta, Outcome::kAnswered).ok());
  EXPECT_EQ(Gate().Stats().circuits_open, 1u);

  clock_.Advance(absl::Seconds(29));
  EXPECT_EQ(Call(kAcme, Outcome::kAnswered).code(), absl::StatusCode::kUnavailable);
  clock_.Advance(absl::Seconds(1));

  absl::StatusOr<ProviderGate::Permit> probe = Gate().Admit(kAcme, kZendesk, kNoDeadline);
  ASSERT_TRUE(probe.ok()) << probe.status();
  EXPECT_TRUE(probe->probe());
  // One probe at a time: the others still fail fast, without a retry time.
  absl::StatusOr<ProviderGate::Permit> second = Gate().Admit(kAcme, kZendesk, kNoDeadline);
  EXPECT_EQ(second.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_FALSE(core::RetryAfterOf(second.status()).has_value());

  probe->Finish(Outcome::kAnswered);
  EXPECT_EQ(Gate().Stats().circuits_open, 0u);
  absl::StatusOr<ProviderGate::Permit> closed = Gate().Admit(kAcme, kZendesk, kNoDeadline);
  ASSERT_TRUE(closed.ok());
  EXPECT_FALSE(closed->probe());

  const ProviderGateCounters c = Counters();
  EXPECT_EQ(c.circuit_opened, 1u);
  EXPECT_EQ(c.circuit_half_opened, 1u);
  EXPECT_EQ(c.circuit_closed, 1u);
  EXPECT_EQ(c.blocked_by_circuit, 3u);
}

TEST_F(ProviderGateTest, FailedProbeReopensForTwiceAsLongUpToTheCap) {
  options_.failure_threshold = 1;
  options_.open_for = absl::Seconds(10);
  options_.max_open_for = absl::Seconds(25);
  ASSERT_TRUE(Call(kAcme, Outcome::kFailed).ok());
  for (const absl::Duration period :
       {absl::Seconds(10), absl::Seconds(20), absl::Seconds(25), absl::Seconds(25)}) {
    clock_.Advance(period - absl::Milliseconds(1));
    EXPECT_EQ(Call(kAcme, Outcome::kFailed).code(), absl::StatusCode::kUnavailable) << period;
    clock_.Advance(absl::Milliseconds(1));
    ASSERT_TRUE(Call(kAcme, Outcome::kFailed).ok()) << period;  // the probe, failing
  }
  EXPECT_EQ(Counters().circuit_opened, 5u);

  // A successful probe closes it, and the next opening starts from open_for again.
  clock_.Advance(absl::Seconds(25));
  ASSERT_TRUE(Call(kAcme, Outcome::kAnswered).ok());
  ASSERT_TRUE(Call(kAcme, Outcome::kFailed).ok());
  clock_.Advance(absl::Seconds(10));
  absl::StatusOr<ProviderGate::Permit> probe = Gate().Admit(kAcme, kZendesk, kNoDeadline);
  ASSERT_TRUE(probe.ok());
  EXPECT_TRUE(probe->probe());
}

TEST_F(ProviderGateTest, AnAnswerResetsTheFailureCount) {
  options_.failure_threshold = 3;
  for (Outcome o : {Outcome::kFailed, Outcome::kFailed, Outcome::kAnswered, Outcome::kFailed,
                    Outcome::kFailed, Outcome::kNeutral}) {
    ASSERT_TRUE(Call(kAcme, o).ok());
  }
  EXPECT_TRUE(Call(kAcme, Outcome::kFailed).ok());  // the third failure in a row opens it
  EXPECT_EQ(Call(kAcme, Outcome::kAnswered).code(), absl::StatusCode::kUnavailable);
}

TEST_F(ProviderGateTest, CallsSentBeforeTheCircuitOpenedDoNotMoveIt) {
  options_.failure_threshold = 1;
  absl::StatusOr<ProviderGate::Permit> early = Gate().Admit(kAcme, kZendesk, kNoDeadline);
  absl::StatusOr<ProviderGate::Permit> late = Gate().Admit(kAcme, kZendesk, kNoDeadline);
  ASSERT_TRUE(early.ok() && late.ok());
  early->Finish(Outcome::kFailed);   // opens
  late->Finish(Outcome::kAnswered);  // sent before: does not close it
  EXPECT_EQ(Call(kAcme, Outcome::kAnswered).code(), absl::StatusCode::kUnavailable);
}

TEST_F(ProviderGateTest, NeutralOrAbandonedProbeLetsTheNextCallProbe) {
  options_.failure_threshold = 1;
  ASSERT_TRUE(Call(kAcme, Outcome::kFailed).ok());
  clock_.Advance(options_.open_for);
  {
    absl::StatusOr<ProviderGate::Permit> probe = Gate().Admit(kAcme, kZendesk, kNoDeadline);
    ASSERT_TRUE(probe.ok() && probe->probe());
  }  // destroyed unfinished: neutral
  absl::StatusOr<ProviderGate::Permit> probe = Gate().Admit(kAcme, kZendesk, kNoDeadline);
  ASSERT_TRUE(probe.ok());
  EXPECT_TRUE(probe->probe());
  probe->Finish(Outcome::kNeutral);
  EXPECT_EQ(Gate().Stats().circuits_open, 1u);
  EXPECT_EQ(Gate().Stats().in_flight, 0u);
}

TEST_F(ProviderGateTest, ConcurrencyLimitMakesCallsWaitForASlot) {
  options_.max_in_flight_per_host = 2;
  absl::StatusOr<ProviderGate::Permit> a = Gate().Admit(kAcme, kZendesk, kNoDeadline);
  absl::StatusOr<ProviderGate::Permit> b = Gate().Admit(kAcme, kZendesk, kNoDeadline);
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_TRUE(Call(kBeta, Outcome::kAnswered).ok());  // per host

  std::atomic<bool> admitted{false};
  std::thread waiter([&] {
    absl::StatusOr<ProviderGate::Permit> c = Gate().Admit(kAcme, kZendesk, kNoDeadline);
    EXPECT_TRUE(c.ok()) << c.status();
    admitted = true;
  });
  ASSERT_TRUE(Eventually([&] { return Gate().Stats().waiting == 1; }));
  EXPECT_FALSE(admitted);
  EXPECT_EQ(Gate().Stats().in_flight, 2u);
  a->Finish(Outcome::kAnswered);
  waiter.join();
  EXPECT_TRUE(admitted);
  const ProviderGateCounters c = Counters();
  EXPECT_EQ(c.slot_waits, 1u);
  EXPECT_EQ(c.slot_timeouts, 0u);
}

TEST_F(ProviderGateTest, WaitingForASlotEndsAtTheDeadline) {
  options_.max_in_flight_per_host = 1;
  absl::StatusOr<ProviderGate::Permit> a = Gate().Admit(kAcme, kZendesk, kNoDeadline);
  ASSERT_TRUE(a.ok());
  // Already past: no wait at all.
  EXPECT_EQ(Gate().Admit(kAcme, kZendesk, clock_.Now()).status().code(),
            absl::StatusCode::kDeadlineExceeded);

  absl::Status waited;
  std::thread waiter(
      [&] { waited = Gate().Admit(kAcme, kZendesk, clock_.Now() + absl::Seconds(1)).status(); });
  ASSERT_TRUE(Eventually([&] { return Gate().Stats().waiting == 1; }));
  clock_.Advance(absl::Seconds(1));
  waiter.join();
  EXPECT_EQ(waited.code(), absl::StatusCode::kDeadlineExceeded);
  const ProviderGateCounters c = Counters();
  EXPECT_EQ(c.slot_waits, 2u);
  EXPECT_EQ(c.slot_timeouts, 2u);
  EXPECT_EQ(Gate().Stats().waiting, 0u);
}

TEST_F(ProviderGateTest, AWaiterFailsFastOnceItsHostGetsBlocked) {
  options_.max_in_flight_per_host = 1;
  absl::StatusOr<ProviderGate::Permit> a = Gate().Admit(kAcme, kZendesk, kNoDeadline);
  ASSERT_TRUE(a.ok());
  absl::Status waited;
  std::thread waiter([&] { waited = Gate().Admit(kAcme, kZendesk, kNoDeadline).status(); });
  ASSERT_TRUE(Eventually([&] { return Gate().Stats().waiting == 1; }));
  a->Finish(Outcome::kAnswered, clock_.Now() + absl::Seconds(5));  // a 429
  waiter.join();
  EXPECT_EQ(waited.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(core::RetryAfterOf(waited), clock_.Now() + absl::Seconds(5));
}

TEST_F(ProviderGateTest, HostTableStaysBoundedAndKeepsHostsInUse) {
  options_.max_hosts = 2;
  ASSERT_TRUE(Call("https://a:443", Outcome::kAnswered).ok());
  ASSERT_TRUE(Call("https://b:443", Outcome::kAnswered).ok());
  ASSERT_TRUE(Call("https://c:443", Outcome::kAnswered).ok());
  EXPECT_LE(Gate().Stats().hosts, 2u);
  EXPECT_EQ(Gate().Stats().hosts_evicted, 0u);  // they had no state

  // Full of blocked hosts: the least recently used one goes, state and all.
  ProviderGate& gate = Gate();
  const absl::Time until = clock_.Now() + absl::Minutes(5);
  ASSERT_TRUE(Call("https://d:443", Outcome::kAnswered, until).ok());
  clock_.Advance(absl::Seconds(1));
  ASSERT_TRUE(Call("https://e:443", Outcome::kAnswered, until).ok());
  clock_.Advance(absl::Seconds(1));
  ASSERT_TRUE(Call("https://f:443", Outcome::kAnswered).ok());
  EXPECT_EQ(gate.Stats().hosts, 2u);
  EXPECT_EQ(gate.Stats().hosts_evicted, 1u);
  EXPECT_TRUE(Call("https://d:443", Outcome::kAnswered).ok());  // forgotten
  EXPECT_EQ(Call("https://e:443", Outcome::kAnswered).code(), absl::StatusCode::kResourceExhausted);

  // Hosts with calls in flight are never evicted.
  absl::StatusOr<ProviderGate::Permit> x = gate.Admit("https://x:443", kZendesk, kNoDeadline);
  absl::StatusOr<ProviderGate::Permit> y = gate.Admit("https://y:443", kZendesk, kNoDeadline);
  absl::StatusOr<ProviderGate::Permit> z = gate.Admit("https://z:443", kZendesk, kNoDeadline);
  ASSERT_TRUE(x.ok() && y.ok() && z.ok());
  EXPECT_EQ(gate.Stats().hosts, 3u);
  EXPECT_EQ(gate.Stats().in_flight, 3u);
}

TEST_F(ProviderGateTest, IdleHostsAreForgotten) {
  options_.idle_ttl = absl::Minutes(10);
  ASSERT_TRUE(Call(kAcme, Outcome::kFailed).ok());  // a failure count, no block
  ASSERT_TRUE(Call(kBeta, Outcome::kAnswered, clock_.Now() + absl::Hours(1)).ok());
  EXPECT_EQ(Gate().Stats().hosts, 2u);
  clock_.Advance(absl::Minutes(10));
  ASSERT_TRUE(Call("https://other:443", Outcome::kAnswered).ok());
  // acme went; beta is still blocked, so it stays.
  EXPECT_EQ(Gate().Stats().hosts, 2u);
  EXPECT_EQ(Call(kBeta, Outcome::kAnswered).code(), absl::StatusCode::kResourceExhausted);
}

TEST_F(ProviderGateTest, CountersArePerProvider) {
  ProviderGate& gate = Gate();
  absl::StatusOr<ProviderGate::Permit> p = gate.Admit(kAcme, "zendesk", kNoDeadline);
  ASSERT_TRUE(p.ok());
  p->Finish(Outcome::kAnswered, clock_.Now() + absl::Seconds(3));
  EXPECT_FALSE(gate.Admit(kAcme, "zendesk-eu", kNoDeadline).ok());
  const ProviderGateStats s = gate.Stats();
  EXPECT_EQ(s.providers.at("zendesk").rate_limited, 1u);
  EXPECT_EQ(s.providers.at("zendesk").blocked_by_retry_after, 0u);
  EXPECT_EQ(s.providers.at("zendesk-eu").blocked_by_retry_after, 1u);
}

TEST(ProviderGateOptionsTest, OutOfRangeOptionsAreRefused) {
  EXPECT_TRUE(ValidateProviderGateOptions({}).ok());
  std::vector<ProviderGateOptions> bad(7);
  bad[0].max_in_flight_per_host = 0;
  bad[1].failure_threshold = 0;
  bad[2].open_for = absl::ZeroDuration();
  bad[3].max_open_for = absl::Seconds(1);
  bad[4].default_retry_after = absl::Seconds(-1);
  bad[5].retry_after_cap = absl::Seconds(1);
  bad[6].max_hosts = 0;
  for (const ProviderGateOptions& o : bad) {
    EXPECT_EQ(ValidateProviderGateOptions(o).code(), absl::StatusCode::kInvalidArgument);
  }
}

}  // namespace
}  // namespace tb::provider
