#include "server/src/oauth/refresher.h"

#include <utility>

#include "absl/strings/str_cat.h"
#include "server/src/core/errors.h"

namespace tb::oauth {

namespace {

// A scheduled refresh that failed transiently is tried again after this long. (Backoff with
// jitter and Retry-After arrive with the 'Stay up' work.)
constexpr absl::Duration kScheduledRetry = absl::Seconds(30);

bool Retryable(const absl::Status& s) {
  return s.code() == absl::StatusCode::kUnavailable ||
         s.code() == absl::StatusCode::kDeadlineExceeded ||
         s.code() == absl::StatusCode::kResourceExhausted || s.code() == absl::StatusCode::kAborted;
}

}  // namespace

Refresher::Refresher(RefresherOptions options, const core::ProviderRegistry& providers,
                     const Clock& clock, Broker& broker, core::ProviderClient& provider_client,
                     RunBlocking run_blocking)
    : options_(options),
      providers_(providers),
      clock_(clock),
      broker_(broker),
      provider_client_(provider_client),
      run_blocking_(std::move(run_blocking)) {}

Refresher::~Refresher() { Stop(); }

bool Refresher::provider_misconfigured(const std::string& provider) const {
  MutexLock lock(&mu_);
  return misconfigured_.contains(provider);
}

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
  {
    MutexLock lock(&mu_);
    if (!in_flight_.contains(id)) {
      const absl::Time now = clock_.Now();
      const auto last = last_caller_refresh_.find(id);
      if (last != last_caller_refresh_.end() &&
          now - last->second < options_.caller_refresh_interval) {
        done(absl::ResourceExhaustedError(
            absl::StrCat("connection was refreshed on request less than ",
                         absl::FormatDuration(options_.caller_refresh_interval), " ago")));
        return;
      }
      last_caller_refresh_[id] = now;
    }
  }
  Join(id, /*scheduled=*/false, std::move(done));
}

void Refresher::Join(const core::ConnectionId& id, bool scheduled, Done done) {
  bool start = false;
  {
    MutexLock lock(&mu_);
    std::vector<Done>& waiters = in_flight_[id];
    start = waiters.empty();
    waiters.push_back(std::move(done));
    if (scheduled) {
      scheduled_in_flight_.insert(id);
    }
  }
  if (start) {
    // Detached: the call runs to its own timeout whatever happens to the callers.
    run_blocking_([this, id] { Finish(id, RefreshNow(id)); });
  }
}

void Refresher::Finish(const core::ConnectionId& id, const absl::StatusOr<TokenView>& result) {
  // Read before taking mu_: no lock is held across a call into another component.
  std::optional<Due> retry;
  if (!result.ok() && Retryable(result.status())) {
    if (std::shared_ptr<const core::Connection> c = broker_.GetConnection(id).value_or(nullptr);
        c != nullptr && c->grant) {
      retry = Due{clock_.Now() + kScheduledRetry, id, c->generation()};
    }
  }
  std::vector<Done> waiters;
  {
    MutexLock lock(&mu_);
    waiters = std::move(in_flight_[id]);
    in_flight_.erase(id);
    const bool was_scheduled = scheduled_in_flight_.erase(id) > 0;
    if (was_scheduled && retry) {
      tracked_[id] = {retry->generation, retry->at};
      due_.push(*retry);
    }
  }
  wake_.SignalAll();
  for (Done& done : waiters) {
    done(result);
  }
}

absl::StatusOr<TokenView> Refresher::RefreshNow(const core::ConnectionId& id) {
  absl::StatusOr<std::shared_ptr<const core::Connection>> got = broker_.GetConnection(id);
  if (!got.ok()) {
    return got.status();
  }
  const std::shared_ptr<const core::Connection> c = *got;
  if (absl::Status s = core::StatusErrorFor(*c); !s.ok()) {
    return s;
  }
  if (!c->grant || !c->grant->refresh_token || c->grant->refresh_token->empty()) {
    return core::ReasonError(absl::StatusCode::kFailedPrecondition, core::Reason::kNotRefreshable,
                             "the grant has no refresh token");
  }
  const auto spec = providers_.find(c->provider);
  if (spec == providers_.end() || provider_misconfigured(c->provider)) {
    return core::ReasonError(absl::StatusCode::kFailedPrecondition,
                             core::Reason::kProviderMisconfigured,
                             "the provider is not configured or rejected our client credentials");
  }
  const uint64_t generation = c->generation();
  absl::StatusOr<bool> earlier_unknown = broker_.RecordRefreshIntent(id, generation);
  if (!earlier_unknown.ok()) {
    if (earlier_unknown.status().code() == absl::StatusCode::kAborted) {
      return broker_.GetToken(id);  // it moved on meanwhile: serve what is there now
    }
    return earlier_unknown.status();
  }
  absl::StatusOr<core::Grant> grant =
      provider_client_.Refresh(spec->second, *c, clock_.Now() + options_.provider_timeout);
  if (!grant.ok()) {
    const std::optional<core::Reason> reason = core::ReasonOf(grant.status());
    if (reason == core::Reason::kNeedsReauth) {
      const core::Reason why =
          *earlier_unknown ? core::Reason::kRotationLost : core::Reason::kNeedsReauth;
      (void)broker_.MarkNeedsReauth(id, why, std::string(grant.status().message()));
      return core::ReasonError(absl::StatusCode::kFailedPrecondition, why,
                               "the provider rejected the refresh token; reconnect the account");
    }
    if (reason == core::Reason::kProviderMisconfigured) {
      MutexLock lock(&mu_);
      misconfigured_.insert(c->provider);
    }
    return grant.status();
  }
  absl::StatusOr<std::shared_ptr<const core::Connection>> rotated =
      broker_.Rotate(id, generation, *grant);
  if (!rotated.ok()) {
    // Revoked, reconnected or deleted while the provider answered: the new grant must not
    // outlive that decision.
    core::Connection orphan = *c;
    orphan.grant = *grant;
    (void)provider_client_.Revoke(spec->second, orphan, clock_.Now() + options_.provider_timeout);
    return rotated.status();
  }
  return broker_.GetToken(id);
}

void Refresher::Track(const std::shared_ptr<const core::Connection>& c,
                      const core::ConnectionId& id) {
  if (c == nullptr || c->status != core::ConnectionStatus::kActive || !c->grant ||
      !c->grant->refresh_at) {
    MutexLock lock(&mu_);
    tracked_.erase(id);
    return;
  }
  {
    MutexLock lock(&mu_);
    const auto it = tracked_.find(id);
    if (it != tracked_.end() && it->second.first == c->generation()) {
      return;  // this grant is already scheduled (or being retried)
    }
    tracked_[id] = {c->generation(), *c->grant->refresh_at};
    due_.push(Due{*c->grant->refresh_at, id, c->generation()});
  }
  wake_.SignalAll();
}

absl::Time Refresher::RunDue() {
  const absl::Time now = clock_.Now();
  std::vector<Due> ready;
  {
    MutexLock lock(&mu_);
    while (!due_.empty() && due_.top().at <= now &&
           scheduled_in_flight_.size() + ready.size() < options_.max_concurrent) {
      const Due d = due_.top();
      due_.pop();
      const auto it = tracked_.find(d.id);
      if (it == tracked_.end() || it->second != std::make_pair(d.generation, d.at)) {
        continue;  // superseded
      }
      ready.push_back(d);
    }
  }
  for (const Due& d : ready) {
    // Stale entries (refreshed, reconnected, revoked since) are dropped here.
    std::shared_ptr<const core::Connection> c = broker_.GetConnection(d.id).value_or(nullptr);
    if (c == nullptr || c->status != core::ConnectionStatus::kActive || !c->grant ||
        c->generation() != d.generation) {
      continue;
    }
    Join(d.id, /*scheduled=*/true, [](const absl::StatusOr<TokenView>&) {});
  }
  MutexLock lock(&mu_);
  return due_.empty() ? absl::InfiniteFuture() : due_.top().at;
}

void Refresher::Start() {
  for (const std::shared_ptr<const core::Connection>& c : broker_.Snapshot()) {
    Track(c, c->id);
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
