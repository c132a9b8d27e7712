#include "server/src/oauth/refresher.h"

#include <algorithm>
#include <limits>
#include <utility>

#include "absl/strings/cord.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "server/src/core/errors.h"
#include "server/src/core/refresh_policy.h"
#include "server/src/core/retry_after.h"

namespace tb::oauth {

namespace {

bool Retryable(const absl::Status& s) {
  return s.code() == absl::StatusCode::kUnavailable ||
         s.code() == absl::StatusCode::kDeadlineExceeded ||
         s.code() == absl::StatusCode::kResourceExhausted || s.code() == absl::StatusCode::kAborted;
}

// Another replica holds the connection's refresh lease (or has refreshed it already): its
// result arrives through the store. The payload is the generation the flight set out to
// refresh, so that its callers wait for the one after it.
constexpr absl::string_view kLeaseHeldUrl = "tokenbroker.v1/lease-held";
absl::Status LeaseHeldError(uint64_t generation) {
  absl::Status s = absl::UnavailableError(
      "another replica is refreshing this connection; its token arrives shortly");
  s.SetPayload(kLeaseHeldUrl, absl::Cord(absl::StrCat(generation)));
  return s;
}
bool IsLeaseHeld(const absl::Status& s) { return s.GetPayload(kLeaseHeldUrl).has_value(); }
uint64_t LeaseHeldGeneration(const absl::Status& s) {
  uint64_t g = 0;
  const absl::optional<absl::Cord> p = s.GetPayload(kLeaseHeldUrl);
  return p && absl::SimpleAtoi(std::string(*p), &g) ? g : 0;
}

bool Active(const std::shared_ptr<const core::Connection>& c) {
  return c != nullptr && c->status == core::ConnectionStatus::kActive && c->grant.has_value();
}

}  // namespace

Refresher::Refresher(RefresherOptions options, const core::ProviderDirectory& providers,
                     const Clock& clock, Broker& broker, core::ProviderClient& provider_client,
                     Revoker& revoker, RunBlocking run_blocking, EventSink events)
    : options_(options),
      providers_(providers),
      clock_(clock),
      broker_(broker),
      provider_client_(provider_client),
      revoker_(revoker),
      run_blocking_(std::move(run_blocking)),
      events_(std::move(events)) {
  if (options_.metrics != nullptr) {
    attempts_ = &options_.metrics->AddCounterFamily(
        "tb_refresh_attempts_total",
        "Refreshes at providers, by provider and outcome (ok, transient, needs_reauth, "
        "rotation_lost, misconfigured).",
        {"provider", "outcome"});
    lateness_ = &options_.metrics->AddHistogram(
        "tb_refresh_lateness_seconds", "How long after its refresh_at a scheduled refresh started.",
        metrics::ExponentialBuckets(0.001, 2, 18));
  }
}

void Refresher::CountAttempt(const std::string& provider, absl::string_view outcome) {
  if (attempts_ != nullptr) {
    attempts_->WithLabels({provider, std::string(outcome)}).Increment();  // cold path
  }
}

Refresher::~Refresher() { Stop(); }

void Refresher::Event(absl::string_view event, const core::ConnectionId& id,
                      const absl::Status& s) const {
  if (events_) {
    events_(event, id, s);
  }
}

bool Refresher::provider_misconfigured(const std::string& provider) const {
  MutexLock lock(&mu_);
  return misconfigured_.contains(provider);
}

Refresher::Stats Refresher::stats() const {
  Stats s;
  s.refreshed = refreshed_.load(std::memory_order_relaxed);
  s.failed = failed_.load(std::memory_order_relaxed);
  s.needs_reauth = needs_reauth_.load(std::memory_order_relaxed);
  s.rotation_lost = rotation_lost_.load(std::memory_order_relaxed);
  s.provider_misconfigured = provider_misconfigured_.load(std::memory_order_relaxed);
  s.wait_timeouts = wait_timeouts_.load(std::memory_order_relaxed);
  return s;
}

size_t Refresher::waiters() const {
  MutexLock lock(&mu_);
  return waiters_.size();
}

// --- Waiting for a token -------------------------------------------------------------------

uint64_t Refresher::AwaitToken(const core::ConnectionId& id, absl::Duration min_ttl,
                               uint64_t min_generation, absl::Time deadline, Done done) {
  const absl::Time now = clock_.Now();
  TokenLookup l = broker_.Lookup(id, min_ttl, min_generation);
  if (l.kind == TokenLookup::Kind::kServe) {
    done(std::move(l.view));
    return 0;
  }
  if (l.kind == TokenLookup::Kind::kError) {
    done(std::move(l.error));
    return 0;
  }
  auto w = std::make_shared<Waiter>();
  w->id = id;
  w->min_ttl = min_ttl;
  w->min_generation = min_generation;
  w->deadline = std::min(deadline, now + options_.max_wait);
  w->done = std::move(done);
  absl::Status refused;
  bool recheck = false;
  bool start = false;
  {
    MutexLock lock(&mu_);
    if (waiters_.size() >= options_.max_waiters) {
      refused = absl::ResourceExhaustedError("too many GetToken calls are waiting; retry later");
    } else if (l.kind == TokenLookup::Kind::kAwaitRefresh) {
      const auto nb = not_before_.find(id);
      if (nb != not_before_.end() && now < nb->second && !in_flight_.contains(id)) {
        // The last refresh failed moments ago and the token does not serve min_ttl: say so
        // now rather than hold the caller until the retry.
        refused = absl::UnavailableError(
            "the provider did not refresh this token and no token with the requested lifetime "
            "is left; retrying shortly");
        // Unless that failure moved the promise after our lookup: Finish reschedules (and
        // publishes) before it records not_before, so a second lookup sees the new promise.
        recheck = true;
      } else {
        start = l.refresh_due;
      }
    }
    if (refused.ok()) {
      w->handle = next_waiter_++;
      waiters_.emplace(w->handle, w);
      waiting_[id].push_back(w);
      deadlines_.emplace(w->deadline, w->handle);
    }
  }
  if (!refused.ok()) {
    if (recheck) {
      if (TokenLookup again = broker_.Lookup(id, min_ttl, min_generation);
          again.kind == TokenLookup::Kind::kServe) {
        w->done(std::move(again.view));
        return 0;
      }
    }
    w->done(std::move(refused));
    return 0;
  }
  const uint64_t handle = w->handle;
  wake_.SignalAll();  // the scheduling thread wakes at the earliest deadline
  if (start) {
    Join(id, Trigger::kUse, nullptr);
  }
  // A change published between the lookup and the registration would otherwise be missed.
  NotifyWaiters(id, nullptr);
  return handle;
}

bool Refresher::CancelWait(uint64_t handle) {
  std::shared_ptr<Waiter> w;
  {
    MutexLock lock(&mu_);
    const auto it = waiters_.find(handle);
    if (it == waiters_.end()) {
      return false;
    }
    w = it->second;
  }
  if (!w->Claim()) {
    return false;
  }
  MutexLock lock(&mu_);
  Forget(*w);
  return true;
}

void Refresher::Forget(const Waiter& w) {
  waiters_.erase(w.handle);
  const auto it = waiting_.find(w.id);
  if (it == waiting_.end()) {
    return;
  }
  std::erase_if(it->second, [&](const std::shared_ptr<Waiter>& x) { return x.get() == &w; });
  if (it->second.empty()) {
    waiting_.erase(it);
  }
}

void Refresher::Complete(const std::shared_ptr<Waiter>& w, absl::StatusOr<TokenView> result) {
  if (!w->Claim()) {
    return;
  }
  {
    MutexLock lock(&mu_);
    Forget(*w);
  }
  w->done(std::move(result));
}

void Refresher::NotifyWaiters(const core::ConnectionId& id,
                              const absl::StatusOr<TokenView>* flight) {
  std::vector<std::shared_ptr<Waiter>> list;
  {
    MutexLock lock(&mu_);
    const auto it = waiting_.find(id);
    if (it == waiting_.end()) {
      return;
    }
    list = it->second;
  }
  for (const std::shared_ptr<Waiter>& w : list) {
    if (w->claimed.load()) {
      continue;
    }
    TokenLookup l = broker_.Lookup(id, w->min_ttl, w->min_generation);
    switch (l.kind) {
      case TokenLookup::Kind::kServe:
        Complete(w, std::move(l.view));
        break;
      case TokenLookup::Kind::kError:
        Complete(w, std::move(l.error));
        break;
      case TokenLookup::Kind::kAwaitGeneration:
        break;  // only a new generation answers it, whatever happened to a refresh
      case TokenLookup::Kind::kAwaitRefresh:
        if (flight != nullptr) {
          Complete(w, flight->ok() ? absl::UnavailableError(
                                         "the refreshed token does not live the requested min_ttl")
                                   : flight->status());
        }
        break;
    }
  }
}

// --- Refreshing ----------------------------------------------------------------------------

void Refresher::Refresh(const core::ConnectionId& id, uint64_t if_generation, Done done) {
  absl::StatusOr<std::shared_ptr<const core::Connection>> c = broker_.GetConnection(id);
  if (!c.ok()) {
    done(c.status());
    return;
  }
  if (absl::Status s = core::StatusErrorFor(**c); !s.ok()) {
    done(s);
    return;
  }
  if (if_generation != 0 && (*c)->generation() > if_generation) {
    done(broker_.GetToken(id));  // someone already refreshed past what the caller saw
    return;
  }
  if (Join(id, Trigger::kCaller, std::move(done),
           if_generation == 0 ? std::numeric_limits<uint64_t>::max() : if_generation)) {
    return;
  }
  // Refused as too soon. The flight that set the limit may have ended between our read above
  // and Join's look at in_flight_: a flight publishes its generation before it leaves
  // in_flight_, so read again. A caller who saw the old generation gets the new one.
  c = broker_.GetConnection(id);
  if (c.ok() && core::StatusErrorFor(**c).ok() && if_generation != 0 &&
      (*c)->generation() > if_generation) {
    done(broker_.GetToken(id));
    return;
  }
  done(absl::ResourceExhaustedError(
      absl::StrCat("connection was refreshed on request less than ",
                   absl::FormatDuration(options_.caller_refresh_interval), " ago")));
}

bool Refresher::Join(const core::ConnectionId& id, Trigger trigger, Done&& done,
                     uint64_t early_through) {
  const absl::Time now = clock_.Now();
  bool start = false;
  {
    MutexLock lock(&mu_);
    if (!in_flight_.contains(id)) {
      if (trigger == Trigger::kUse) {
        const auto nb = not_before_.find(id);
        if (nb != not_before_.end() && now < nb->second) {
          return false;  // a refresh failed moments ago; the scheduled retry comes at not_before
        }
        const auto held = lease_held_until_.find(id);
        if (held != lease_held_until_.end() && now < held->second) {
          return false;  // another replica is refreshing; its result arrives through the store
        }
      }
      if (trigger == Trigger::kCaller) {
        // Checked and taken under the same lock as the flight is entered: a second caller
        // sees either the flight or the limit of a flight that has ended.
        const auto last = last_caller_refresh_.find(id);
        if (last != last_caller_refresh_.end() &&
            now - last->second < options_.caller_refresh_interval) {
          return false;
        }
        last_caller_refresh_[id] = now;
      }
    }
    std::vector<Done>& waiters = in_flight_[id];
    start = waiters.empty();
    waiters.push_back(done ? std::move(done) : [](const absl::StatusOr<TokenView>&) {});
    if (trigger == Trigger::kScheduled) {
      scheduled_in_flight_.insert(id);
    }
  }
  if (start) {
    // Detached: the call runs to its own timeout whatever happens to the callers. Only a
    // caller's Refresh may cut a generation short (the one the caller saw: another flight may
    // have ended since it looked); the others refresh a due token only.
    if (trigger != Trigger::kCaller) {
      early_through = 0;
    }
    run_blocking_([this, id, early_through] { Finish(id, RefreshNow(id, early_through)); });
  }
  return true;
}

void Refresher::Finish(const core::ConnectionId& id, const absl::StatusOr<TokenView>& result) {
  // Read before taking mu_: no lock is held across a call into another component.
  const absl::Time now = clock_.Now();
  std::optional<std::pair<uint64_t, absl::Time>> retry;  // generation, when
  if (!result.ok() && IsLeaseHeld(result.status())) {
    FinishLeaseHeld(id, now, LeaseHeldGeneration(result.status()));
    return;
  }
  const bool transient = !result.ok() && Retryable(result.status());
  absl::Time next_try = now;
  if (transient) {
    int n = 0;
    {
      MutexLock lock(&mu_);
      n = ++failures_[id];
    }
    std::shared_ptr<const core::Connection> c = broker_.GetConnection(id).value_or(nullptr);
    const absl::Time expires =
        Active(c) && c->grant->expires_at ? *c->grant->expires_at : absl::InfiniteFuture();
    next_try = RetryAt(n, now, expires, result.status());
    if (Active(c) && c->grant->refresh_at && *c->grant->refresh_at <= now) {
      // It was due: the promise moves with the retry (never past the expiry), and until then
      // the token keeps being served. The retry itself is scheduled here, at next_try exactly:
      // the store may not take the new refresh_at, and a Retry-After may lie past the expiry.
      (void)broker_.Reschedule(id, c->generation(), next_try);
      retry.emplace(c->generation(), next_try);
    }
  }
  std::vector<Done> waiters;
  {
    MutexLock lock(&mu_);
    waiters = std::move(in_flight_[id]);
    in_flight_.erase(id);
    scheduled_in_flight_.erase(id);
    if (retry) {
      if (const Schedule* s = LiveSchedule(id);
          s == nullptr || s->generation != retry->first || s->at != retry->second) {
        ScheduleLocked(id, retry->first, retry->second);  // supersedes Reschedule's publish's
      }
    }
    if (transient) {
      not_before_[id] = next_try;
    } else {
      not_before_.erase(id);
      if (result.ok()) {
        failures_.erase(id);
      }
    }
    lease_held_until_.erase(id);
  }
  wake_.SignalAll();
  for (Done& done : waiters) {
    done(result);
  }
  NotifyWaiters(id, &result);
}

void Refresher::FinishLeaseHeld(const core::ConnectionId& id, absl::Time now, uint64_t generation) {
  std::shared_ptr<const core::Connection> c = broker_.GetConnection(id).value_or(nullptr);
  std::vector<Done> callers;
  {
    MutexLock lock(&mu_);
    callers = std::move(in_flight_[id]);
    in_flight_.erase(id);
    scheduled_in_flight_.erase(id);
    lease_held_until_[id] = now + std::min(absl::Seconds(1), options_.lease_margin);
    if (Active(c) && c->generation() == generation) {
      // If the holder dies, its lease expires: look again then and take over. (If its result is
      // already here, the new grant's own schedule applies.)
      const absl::Time again = now + options_.provider_timeout + 2 * options_.lease_margin;
      ScheduleLocked(id, generation, again);
    }
  }
  wake_.SignalAll();
  // Callers of this flight wait for the holder's generation instead, like GetToken waiters.
  for (Done& done : callers) {
    AwaitToken(id, absl::ZeroDuration(), generation + 1, now + options_.max_wait, std::move(done));
  }
}

absl::StatusOr<TokenView> Refresher::RefreshNow(const core::ConnectionId& id,
                                                uint64_t early_through) {
  absl::StatusOr<std::shared_ptr<const core::Connection>> got = broker_.GetConnection(id);
  if (!got.ok()) {
    return got.status();
  }
  std::shared_ptr<const core::Connection> c = *got;
  if (absl::Status s = core::StatusErrorFor(*c); !s.ok()) {
    return s;
  }
  if (!c->grant || !c->grant->refresh_token || c->grant->refresh_token->empty()) {
    return core::ReasonError(absl::StatusCode::kFailedPrecondition, core::Reason::kNotRefreshable,
                             "the grant has no refresh token");
  }
  const std::shared_ptr<const core::ProviderSpec> spec = providers_.Find(c->provider);
  if (spec == nullptr || provider_misconfigured(c->provider)) {
    return core::ReasonError(absl::StatusCode::kFailedPrecondition,
                             core::Reason::kProviderMisconfigured,
                             "the provider is not configured or rejected our client credentials");
  }
  const uint64_t generation = c->generation();
  // One replica at a time calls the provider for a connection.
  absl::StatusOr<std::optional<core::Lease>> lease =
      broker_.AcquireRefreshLease(id, options_.provider_timeout + 2 * options_.lease_margin);
  if (!lease.ok()) {
    return lease.status();
  }
  if (!lease->has_value() ||
      (**lease).expires_at - clock_.Now() < options_.provider_timeout + options_.lease_margin) {
    return LeaseHeldError(generation);
  }
  const core::Lease held = **lease;
  struct Release {
    Broker& broker;
    const core::Lease& lease;
    ~Release() { broker.ReleaseRefreshLease(lease); }
  } release{broker_, held};
  // With the lease, what the store says decides, not our cached copy: another replica may have
  // refreshed (and released the lease) since this flight was triggered. (A store that is down
  // leaves the cached copy, which is all there is. A store no other process writes holds
  // nothing newer than the cache: one read and one decryption per refresh saved.)
  if (broker_.StoreHasOtherWriters()) {
    (void)broker_.Reload(id);
  }
  if (absl::StatusOr<std::shared_ptr<const core::Connection>> fresh = broker_.GetConnection(id);
      fresh.ok()) {
    c = *fresh;
  } else {
    return fresh.status();
  }
  if (absl::Status s = core::StatusErrorFor(*c); !s.ok()) {
    return s;
  }
  if (!c->grant || c->generation() != generation) {
    // Refreshed elsewhere meanwhile: serve that one (its callers wait for it if it does not
    // suit them) and call no provider.
    absl::StatusOr<TokenView> now_served = broker_.GetToken(id);
    return now_served.ok() ? now_served : LeaseHeldError(generation);
  }
  if (generation > early_through && c->grant->refresh_at && clock_.Now() < *c->grant->refresh_at) {
    // The promise made with this token still holds (the schedule that triggered this flight
    // was for an older state): never refresh before valid_until on our own.
    return broker_.GetToken(id);
  }
  absl::StatusOr<bool> earlier_unknown = broker_.RecordRefreshIntent(id, generation, &held);
  if (!earlier_unknown.ok()) {
    if (earlier_unknown.status().code() == absl::StatusCode::kAborted) {
      // It moved on meanwhile (another writer, another replica): serve what is there now, or
      // wait for it.
      (void)broker_.Reload(id);
      absl::StatusOr<TokenView> now_served = broker_.GetToken(id);
      return now_served.ok() ? now_served : LeaseHeldError(generation);
    }
    const bool store_down = earlier_unknown.status().code() == absl::StatusCode::kUnavailable ||
                            earlier_unknown.status().code() == absl::StatusCode::kDeadlineExceeded;
    const bool expiring = c->grant->expires_at &&
                          *c->grant->expires_at - clock_.Now() <= options_.store_outage_margin;
    if (!store_down || !expiring) {
      return earlier_unknown.status();  // scheduled refreshes pause while the store is down
    }
    // The store is down (we hold a lease, so no other replica can refresh) and the token is
    // about to die: refresh without a durable intent; the rotated grant serves from memory.
    Event("refresh_without_store", id, earlier_unknown.status());
    earlier_unknown = false;
  }
  absl::StatusOr<core::Grant> grant =
      provider_client_.Refresh(*spec, *c, clock_.Now() + options_.provider_timeout);
  if (!grant.ok()) {
    const std::optional<core::Reason> reason = core::ReasonOf(grant.status());
    if (reason == core::Reason::kNeedsReauth) {
      // Another replica may have rotated the grant (a lease that expired under a slow holder):
      // what is stored decides, not our stale copy.
      if (broker_.Reload(id).ok()) {
        std::shared_ptr<const core::Connection> now_stored =
            broker_.GetConnection(id).value_or(nullptr);
        if (now_stored != nullptr && now_stored->generation() > generation) {
          return broker_.GetToken(id);
        }
      }
      const core::Reason why =
          *earlier_unknown ? core::Reason::kRotationLost : core::Reason::kNeedsReauth;
      (void)broker_.MarkNeedsReauth(id, why, std::string(grant.status().message()));
      (why == core::Reason::kRotationLost ? rotation_lost_ : needs_reauth_)
          .fetch_add(1, std::memory_order_relaxed);
      CountAttempt(c->provider,
                   why == core::Reason::kRotationLost ? "rotation_lost" : "needs_reauth");
      Event(why == core::Reason::kRotationLost ? "rotation_lost" : "needs_reauth", id,
            grant.status());
      return core::ReasonError(absl::StatusCode::kFailedPrecondition, why,
                               "the provider rejected the refresh token; reconnect the account");
    }
    if (reason == core::Reason::kProviderMisconfigured) {
      bool first = false;
      {
        MutexLock lock(&mu_);
        first = misconfigured_.insert(c->provider).second;
      }
      provider_misconfigured_.fetch_add(1, std::memory_order_relaxed);
      CountAttempt(c->provider, "misconfigured");
      if (first) {
        Event("provider_misconfigured", id, grant.status());
      }
      return grant.status();
    }
    failed_.fetch_add(1, std::memory_order_relaxed);
    CountAttempt(c->provider, "transient");
    Event("refresh_failed", id, grant.status());
    return grant.status();  // Finish schedules the retry
  }
  absl::StatusOr<std::shared_ptr<const core::Connection>> rotated =
      broker_.Rotate(id, generation, *grant, &held);
  if (!rotated.ok()) {
    // Revoked, reconnected or deleted while the provider answered: the new grant must not
    // outlive that decision.
    core::Grant orphan = *grant;
    if (!orphan.refresh_token || orphan.refresh_token->empty()) {
      orphan.refresh_token = c->grant->refresh_token;
    }
    if (broker_.AddRevocation(id, orphan).ok()) {
      (void)revoker_.RevokePending(id);
    } else {
      (void)revoker_.RevokeDetached(*c, orphan);
    }
    return rotated.status();
  }
  refreshed_.fetch_add(1, std::memory_order_relaxed);
  CountAttempt(c->provider, "ok");
  return broker_.GetToken(id);
}

absl::Time Refresher::RetryAt(int n, absl::Time now, absl::Time expires_at,
                              const absl::Status& s) const {
  absl::Duration backoff = options_.retry_delay;
  for (int i = 1; i < n && backoff < options_.retry_max; ++i) {
    backoff *= 2;
  }
  backoff = std::min(backoff, options_.retry_max);
  // Full jitter: anywhere in (0, backoff], but not so soon that failures loop.
  const double factor = options_.jitter ? std::clamp(options_.jitter(), 0.0, 1.0) : 1.0;
  backoff = std::max(backoff * factor, absl::Milliseconds(100));
  absl::Time at = now + backoff;
  // A retry is worth something only while the token still works.
  if (expires_at != absl::InfiniteFuture() && expires_at > now) {
    at = std::min(at, std::max(now + absl::Milliseconds(100), expires_at));
  }
  if (std::optional<absl::Time> after = core::RetryAfterOf(s)) {
    at = std::max(at, *after);  // the provider said when: not a moment before
  }
  return at;
}

// --- Revoking ------------------------------------------------------------------------------

absl::Duration Refresher::RevokeBackoff(int attempts) const {
  absl::Duration d = options_.revoke_retry_min;
  for (int i = 1; i < attempts && d < options_.revoke_retry_max; ++i) {
    d *= 2;
  }
  return std::min(d, options_.revoke_retry_max);
}

void Refresher::QueueRevocation(const core::ConnectionId& id, absl::Time at) {
  RevokeState& st = revocations_[id];
  if (st.queued) {
    return;
  }
  st.queued = true;
  revoke_due_.push(RevokeDue{at, id});
}

void Refresher::ScheduleLocked(const core::ConnectionId& id, uint64_t generation, absl::Time at) {
  QueueLocked(*tracked_.try_emplace(id).first, generation, at);
}

void Refresher::QueueLocked(Tracked::value_type& node, uint64_t generation, absl::Time at) {
  node.second.generation = generation;
  node.second.at = at;
  node.second.live = true;
  ++node.second.queued;
  due_.push(Due{at, &node, generation});
}

void Refresher::UntrackLocked(const core::ConnectionId& id) {
  const auto it = tracked_.find(id);
  if (it == tracked_.end()) {
    return;
  }
  if (it->second.queued == 0) {
    tracked_.erase(it);
  } else {
    it->second.live = false;  // RunDue erases it when it pops the last entry pointing here
  }
}

const Refresher::Schedule* Refresher::LiveSchedule(const core::ConnectionId& id) const {
  const auto it = tracked_.find(id);
  return it != tracked_.end() && it->second.live ? &it->second : nullptr;
}

void Refresher::Revoke(const core::ConnectionId& id, RevokeDone done) {
  run_blocking_([this, id, done = std::move(done)] {
    absl::StatusOr<std::shared_ptr<const core::Connection>> c = broker_.GetConnection(id);
    if (!c.ok()) {
      done(c.status());
      return;
    }
    if ((*c)->status == core::ConnectionStatus::kPending) {
      done(core::StatusErrorFor(**c));  // nothing to revoke: NOT_CONNECTED
      return;
    }
    if ((*c)->status != core::ConnectionStatus::kRevoked) {
      // Stop serving first: from here on no caller gets this grant's token.
      absl::Status s;
      for (int i = 0; i < 3; ++i) {
        s = broker_.MarkRevoked(id);
        if (s.code() != absl::StatusCode::kAborted) {
          break;
        }
      }
      if (!s.ok()) {
        done(s);
        return;
      }
      Event("connection_revoked", id, absl::OkStatus());
    }
    {
      MutexLock lock(&mu_);
      revocations_[id].running = true;
    }
    absl::StatusOr<bool> confirmed = revoker_.RevokePending(id);
    {
      MutexLock lock(&mu_);
      revocations_[id].running = false;
    }
    RunRevocations(id, &confirmed);
    done(confirmed);
  });
}

void Refresher::RunRevocations(const core::ConnectionId& id, const absl::StatusOr<bool>* already) {
  absl::StatusOr<bool> result = already != nullptr ? *already : revoker_.RevokePending(id);
  std::shared_ptr<const core::Connection> c = broker_.GetConnection(id).value_or(nullptr);
  const absl::Time now = clock_.Now();
  {
    MutexLock lock(&mu_);
    RevokeState& st = revocations_[id];
    st.running = false;
    if (c == nullptr || c->to_revoke.empty()) {
      revocations_.erase(id);
      return;
    }
    // Something is still owed: the provider did not confirm, or an entry arrived meanwhile.
    ++st.attempts;
    QueueRevocation(id, now + RevokeBackoff(st.attempts));
  }
  wake_.SignalAll();
}

// --- Scheduling ----------------------------------------------------------------------------

void Refresher::TrackLocked(const std::shared_ptr<const core::Connection>& c,
                            const core::ConnectionId& id, absl::Time now) {
  if (!Active(c) || !c->grant->refresh_at) {
    UntrackLocked(id);
    not_before_.erase(id);
    lease_held_until_.erase(id);
  } else {
    const uint64_t generation = c->generation();
    const absl::Time at = *c->grant->refresh_at;
    // One lookup (a million of them at start, hashing ids that may be UUIDs).
    Tracked::value_type& node = *tracked_.try_emplace(id).first;
    const Schedule& s = node.second;
    if (!s.live || s.generation != generation || (s.at != at && s.at <= at)) {
      // A new grant, or the same grant's refresh moved later (Reschedule). A schedule entry
      // already later than refresh_at (a retry, an idle connection's keep-alive) stays.
      QueueLocked(node, generation, at);
    }
  }
  if (c != nullptr && !c->to_revoke.empty()) {
    const auto st = revocations_.find(id);
    if (st == revocations_.end() || (!st->second.queued && !st->second.running)) {
      QueueRevocation(id, now);
    }
  }
}

void Refresher::Track(const std::shared_ptr<const core::Connection>& c,
                      const core::ConnectionId& id) {
  const absl::Time now = clock_.Now();
  bool waiters = false;
  {
    MutexLock lock(&mu_);
    TrackLocked(c, id, now);
    // Nobody waits during a load: no second lock and hash of the id per loaded connection.
    waiters = !waiting_.empty();
  }
  wake_.SignalAll();
  if (waiters) {
    NotifyWaiters(id, nullptr);
  }
}

void Refresher::Reserve(size_t connections) {
  MutexLock lock(&mu_);
  tracked_.reserve(tracked_.size() + connections);
}

void Refresher::ProvidersChanged(const std::vector<std::string>& names) {
  if (names.empty()) {
    return;
  }
  const absl::Time now = clock_.Now();
  {
    MutexLock lock(&mu_);
    for (const std::string& name : names) {
      misconfigured_.erase(name);
    }
    // Due entries already run (and refused: no provider, rejected credentials) are in no heap
    // any more; a duplicate of one still queued is harmless (single-flight).
    for (Tracked::value_type& node : tracked_) {
      const Schedule& s = node.second;
      if (s.live && s.at <= now && !in_flight_.contains(node.first)) {
        QueueLocked(node, s.generation, s.at);
      }
    }
  }
  wake_.SignalAll();
}

absl::Time Refresher::RunDue() {
  const absl::Time now = clock_.Now();
  std::vector<std::shared_ptr<Waiter>> expired;
  struct Ready {
    core::ConnectionId id;
    uint64_t generation;
    absl::Time at;
  };
  std::vector<Ready> ready;
  std::vector<core::ConnectionId> revoke;
  {
    MutexLock lock(&mu_);
    while (!deadlines_.empty() && deadlines_.top().first <= now) {
      const auto it = waiters_.find(deadlines_.top().second);
      deadlines_.pop();
      if (it != waiters_.end()) {
        expired.push_back(it->second);
      }
    }
    while (!revoke_due_.empty() && revoke_due_.top().at <= now) {
      const core::ConnectionId id = revoke_due_.top().id;
      revoke_due_.pop();
      RevokeState& st = revocations_[id];
      st.queued = false;
      if (!st.running) {
        st.running = true;
        revoke.push_back(id);
      }
    }
    while (!due_.empty() && due_.top().at <= now) {
      if (scheduled_in_flight_.size() + ready.size() >= options_.max_concurrent) {
        break;
      }
      const Due d = due_.top();
      due_.pop();
      Schedule& s = d.node->second;
      --s.queued;
      if (s.live && s.generation == d.generation && s.at == d.at) {
        ready.push_back(Ready{d.node->first, d.generation, d.at});
      } else if (!s.live && s.queued == 0) {
        tracked_.erase(tracked_.find(d.node->first));  // untracked, and this was the last entry
      }
      // else superseded by a later entry of the same node
    }
  }
  for (const std::shared_ptr<Waiter>& w : expired) {
    if (!w->claimed.load()) {
      wait_timeouts_.fetch_add(1, std::memory_order_relaxed);
    }
    Complete(w, absl::DeadlineExceededError(
                    "no token with the requested lifetime or generation before the deadline"));
  }
  for (const core::ConnectionId& id : revoke) {
    run_blocking_([this, id] { RunRevocations(id, nullptr); });
  }
  for (const Ready& d : ready) {
    // Stale entries (refreshed, reconnected, revoked since) are dropped here.
    std::shared_ptr<const core::Connection> c = broker_.GetConnection(d.id).value_or(nullptr);
    if (!Active(c) || c->generation() != d.generation) {
      continue;
    }
    if (options_.hot_window > absl::ZeroDuration() &&
        broker_.LastUsed(d.id) < now - options_.hot_window) {
      // Idle: refreshed on its next use, or when its refresh token is half spent.
      const std::optional<absl::Time> keep_alive = core::KeepAliveAt(*c->grant);
      if (keep_alive && *keep_alive > now) {
        MutexLock lock(&mu_);
        if (const Schedule* s = LiveSchedule(d.id);
            s != nullptr && s->generation == d.generation && s->at == d.at) {
          ScheduleLocked(d.id, d.generation, *keep_alive);
        }
        continue;
      }
    }
    if (lateness_ != nullptr && c->grant->refresh_at) {
      lateness_->Observe(std::max(absl::ZeroDuration(), now - *c->grant->refresh_at));
    }
    Join(d.id, Trigger::kScheduled, nullptr);
  }
  MutexLock lock(&mu_);
  absl::Time next = absl::InfiniteFuture();
  if (!due_.empty()) {
    next = due_.top().at;
  }
  if (!revoke_due_.empty()) {
    next = std::min(next, revoke_due_.top().at);
  }
  if (!deadlines_.empty()) {
    next = std::min(next, deadlines_.top().first);
  }
  return next;
}

void Refresher::Start(Backlog backlog) {
  // Every connection in the cache, under one lock and with room made for all of them at once:
  // at a million connections, a lock, a signal and a rehash now and then per connection were a
  // tenth of the start.
  const std::vector<std::shared_ptr<const core::Connection>> all =
      backlog == Backlog::kTrackTheCache ? broker_.Snapshot()
                                         : std::vector<std::shared_ptr<const core::Connection>>();
  const absl::Time now = clock_.Now();
  std::vector<core::ConnectionId> waited;
  {
    MutexLock lock(&mu_);
    tracked_.reserve(tracked_.size() + all.size());
    for (const std::shared_ptr<const core::Connection>& c : all) {
      TrackLocked(c, c->id, now);
    }
    for (const auto& [id, unused] : waiting_) {
      waited.push_back(id);
    }
  }
  wake_.SignalAll();
  for (const core::ConnectionId& id : waited) {
    NotifyWaiters(id, nullptr);
  }
  thread_ = std::thread([this] {
    for (;;) {
      const absl::Time next = RunDue();
      MutexLock lock(&mu_);
      if (stopping_) {
        return;
      }
      // At most a second at a time: the clock may jump, and capacity frees up on Finish.
      const absl::Duration wait =
          std::clamp(next - clock_.Now(), absl::Milliseconds(1), absl::Seconds(1));
      wake_.WaitFor(&mu_, absl::ToChronoMilliseconds(wait));
      if (stopping_) {
        return;
      }
    }
  });
}

void Refresher::Stop() {
  {
    MutexLock lock(&mu_);
    stopping_ = true;
  }
  wake_.SignalAll();
  if (thread_.joinable()) {
    thread_.join();
  }
}

}  // namespace tb::oauth
