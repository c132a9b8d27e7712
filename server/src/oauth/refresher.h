#ifndef TB_OAUTH_REFRESHER_H_
#define TB_OAUTH_REFRESHER_H_

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <queue>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/container/node_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "server/src/common/clock.h"
#include "server/src/common/metrics.h"
#include "server/src/common/mutex.h"
#include "server/src/common/work_pool.h"
#include "server/src/core/provider_client.h"
#include "server/src/core/provider_spec.h"
#include "server/src/oauth/broker.h"
#include "server/src/oauth/events.h"
#include "server/src/oauth/revoker.h"

namespace tb::oauth {

struct RefresherOptions {
  // Bound on one provider call. A call once sent is never cancelled by a caller.
  absl::Duration provider_timeout = absl::Seconds(30);
  // Several replicas: a refresh is sent only by the holder of the connection's lease in the
  // store, taken for provider_timeout + 2 * lease_margin, and only while at least
  // provider_timeout + lease_margin of it is left (time to call, then to store the answer).
  absl::Duration lease_margin = absl::Seconds(10);
  // At most one caller-triggered refresh (Refresh RPC) per connection per interval.
  absl::Duration caller_refresh_interval = absl::Seconds(10);
  // Scheduled refreshes in flight at once.
  size_t max_concurrent = 16;
  // Zero: every connection is refreshed ahead, at its refresh_at. Positive: only connections
  // used within this window are; an idle one is refreshed on its next use, and at the latest
  // when half of its refresh token's lifetime has passed (core::KeepAliveAt), so it never dies
  // unused.
  absl::Duration hot_window = absl::ZeroDuration();
  // A refresh that failed transiently is tried again later: after retry_delay * 2^(n-1) for
  // the n-th failure in a row, capped at retry_max, times a random factor in (0, 1] (full
  // jitter), never later than the token's expiry, and never before a provider's Retry-After.
  // The token keeps being served until then (Broker::Reschedule moves its promise along).
  absl::Duration retry_delay = absl::Seconds(30);
  absl::Duration retry_max = absl::Minutes(5);
  // The jitter factor source; empty: always 1 (tests see exact times). main passes a random one.
  std::function<double()> jitter;
  // While the store is unreachable, scheduled refreshes pause, but a token this close to its
  // expiry is refreshed all the same (single-owner stores only: without the store there is no
  // lease, so a replica of a shared store does not send); its rotated grant serves from memory
  // and is written when the store is back.
  absl::Duration store_outage_margin = absl::Minutes(2);
  // GetToken waits: at most this many at once (more: RESOURCE_EXHAUSTED), none longer than
  // max_wait whatever the caller's deadline.
  size_t max_waiters = 100'000;
  absl::Duration max_wait = absl::Seconds(60);
  // Revocations the provider did not confirm are retried with exponential backoff between
  // these bounds, until it does.
  absl::Duration revoke_retry_min = absl::Seconds(5);
  absl::Duration revoke_retry_max = absl::Minutes(10);
  // Refresh attempts by provider and outcome, and lateness against the schedule (tb_refresh_*).
  // Null: none. Must outlive the refresher.
  metrics::Registry* metrics = nullptr;
};

// Refreshes grants: on schedule at each grant's refresh_at, on use when a caller needs a fresher
// token than the cache has, and on request (Refresh RPC); and drives owed revocations
// (Connection::to_revoke) to the provider until it confirms.
//
// Single-flight per connection, and across replicas on one database: only the holder of the
// connection's refresh lease calls the provider; the others wait for its result through the
// store's change feed (Broker::Reload), and take over when a dead holder's lease expires.
// Within a process every caller of a connection's refresh shares one provider call. The call runs
// detached on `run_blocking` under provider_timeout; callers get the result through their callback
// and give up on their own deadlines without cancelling it. Before the call the intent is recorded;
// the rotated grant is stored (compare-and-set) before it is published. invalid_grant moves the
// connection to needs_reauth (ROTATION_LOST if an earlier refresh of the same generation had an
// unknown outcome) and no further call is made; invalid_client marks the provider misconfigured and
// leaves every grant as it is.
//
// Waiting (AwaitToken) never blocks a thread: a waiter is a callback, completed by whoever
// publishes the token it waits for, by the end of the refresh it waits for, or by the scheduling
// thread at its deadline.
//
// Thread-safe. Everything passed to the constructor must outlive the refresher. Done callbacks
// run on work, writer or scheduling threads (or inline) and must not block.
class Refresher {
 public:
  using Done = std::function<void(absl::StatusOr<TokenView>)>;
  using RevokeDone = std::function<void(absl::StatusOr<bool> provider_confirmed)>;

  Refresher(RefresherOptions options, const core::ProviderDirectory& providers, const Clock& clock,
            Broker& broker, core::ProviderClient& provider_client, Revoker& revoker,
            RunBlocking run_blocking, EventSink events = nullptr);

  // GetToken's slow path, for a Broker::Lookup that said kAwait*: waits until the connection
  // has a token with `min_generation` that serves `min_ttl` more, or until `deadline` (capped at
  // now + max_wait). A wait for a refresh starts one if the connection is past its refresh_at
  // (never before: that would break the promise made with the current token); a wait for a
  // generation never starts one. `done` runs exactly once, unless CancelWait returns true.
  // Errors through `done`: Lookup's; DEADLINE_EXCEEDED; the refresh's error when the refresh it
  // waited for failed and the old token does not serve min_ttl; RESOURCE_EXHAUSTED (too many
  // waiters). Returns a handle for CancelWait (0 when `done` already ran).
  uint64_t AwaitToken(const core::ConnectionId& id, absl::Duration min_ttl, uint64_t min_generation,
                      absl::Time deadline, Done done) ABSL_LOCKS_EXCLUDED(mu_);
  // Removes a wait. True: `done` will never run. False: it has run or is running.
  bool CancelWait(uint64_t handle) ABSL_LOCKS_EXCLUDED(mu_);

  // The Refresh RPC: refreshes `id` unless its generation is already past `if_generation`
  // (then answers with the current token at once; 0 means "refresh regardless"). `done` runs
  // exactly once, inline or on a work thread.
  // Errors: NOT_FOUND; FAILED_PRECONDITION with NOT_CONNECTED, NEEDS_REAUTH, ROTATION_LOST,
  // REVOKED, NOT_REFRESHABLE or PROVIDER_MISCONFIGURED; RESOURCE_EXHAUSTED (refreshed on
  // request less than caller_refresh_interval ago); UNAVAILABLE / DEADLINE_EXCEEDED (provider).
  void Refresh(const core::ConnectionId& id, uint64_t if_generation, Done done)
      ABSL_LOCKS_EXCLUDED(mu_);

  // The Revoke RPC, on the work pool: stops serving at once (REVOKED), then revokes at the
  // provider. `done` gets whether the provider confirmed; if not, the revocation is retried in
  // the background until it does. Revoking a revoked connection retries what is still owed;
  // a needs_reauth one is revoked too (its access token may still live).
  // Errors: NOT_FOUND, FAILED_PRECONDITION/NOT_CONNECTED (pending), store errors.
  void Revoke(const core::ConnectionId& id, RevokeDone done) ABSL_LOCKS_EXCLUDED(mu_);

  // Scheduling: Track() is the broker's on_change hook; RunDue() starts every refresh and
  // revocation whose time has come (at most max_concurrent refreshes in flight), expires
  // waiters past their deadline, and returns when it next has something to do
  // (InfiniteFuture() when nothing). Start() runs a thread that calls RunDue() as time passes;
  // tests call RunDue() with a fake clock instead.
  void Track(const std::shared_ptr<const core::Connection>& c, const core::ConnectionId& id)
      ABSL_LOCKS_EXCLUDED(mu_);
  absl::Time RunDue() ABSL_LOCKS_EXCLUDED(mu_);
  // What Start() does about the connections already in the cache. kTrackTheCache: tracks them
  // all. kAlreadyTracked: nothing, because Track() was the broker's on_change hook before the
  // cache was loaded, so every connection loaded or changed was tracked as it was published.
  // The second is how the binary starts: at a million connections, tracking inside the load
  // uses the time the loading thread would wait for the decoding thread anyway, where a second
  // pass over the cache after the load took a third of the start.
  enum class Backlog { kTrackTheCache, kAlreadyTracked };
  void Start(Backlog backlog = Backlog::kTrackTheCache) ABSL_LOCKS_EXCLUDED(mu_);
  // Makes room for `connections` more tracked connections (before a load of that many).
  void Reserve(size_t connections) ABSL_LOCKS_EXCLUDED(mu_);
  // Stops the scheduling thread (in-flight refreshes finish on the work pool).
  void Stop() ABSL_LOCKS_EXCLUDED(mu_);
  ~Refresher();

  // The providers `names` were added, redefined or removed (a configuration reload): one that
  // rejected our client credentials gets another chance with its new definition, and every
  // refresh that came due meanwhile and is not in flight is queued again.
  void ProvidersChanged(const std::vector<std::string>& names) ABSL_LOCKS_EXCLUDED(mu_);

  bool provider_misconfigured(const std::string& provider) const ABSL_LOCKS_EXCLUDED(mu_);
  size_t waiters() const ABSL_LOCKS_EXCLUDED(mu_);

  // Counters since start, for metrics.
  struct Stats {
    uint64_t refreshed = 0;               // rotated grants stored and published
    uint64_t failed = 0;                  // provider calls that failed transiently
    uint64_t needs_reauth = 0;            // invalid_grant
    uint64_t rotation_lost = 0;           // invalid_grant after an unknown outcome
    uint64_t provider_misconfigured = 0;  // invalid_client / unauthorized_client
    uint64_t wait_timeouts = 0;           // GetToken waits that reached their deadline
  };
  Stats stats() const;

 private:
  // A refreshable connection's schedule: its one live refresh entry (generation, time), and
  // how many heap entries point at it. Heap entries that differ from the live one are stale
  // and dropped, so repeated notifications for one grant never refresh it twice.
  struct Schedule {
    uint64_t generation = 0;
    absl::Time at;
    uint32_t queued = 0;  // entries of due_ that point here: the node lives while any do
    bool live = false;    // false: no longer tracked, kept only for those entries
  };
  // A node map: it holds every refreshable connection, and at a million a flat map's slots
  // (half empty after it doubles) cost about 120 bytes per connection, the nodes about 80.
  // Nodes also keep their address, so heap entries point at them instead of copying the id
  // (a UUID is a 48-byte allocation: another 80 MB at a million).
  using Tracked = absl::node_hash_map<core::ConnectionId, Schedule>;
  struct Due {
    absl::Time at;
    Tracked::value_type* node;  // pinned by Schedule::queued
    uint64_t generation;        // the grant it is for
    bool operator>(const Due& o) const { return at > o.at; }
  };
  struct RevokeDue {
    absl::Time at;
    core::ConnectionId id;
    bool operator>(const RevokeDue& o) const { return at > o.at; }
  };
  struct Waiter {
    uint64_t handle = 0;
    core::ConnectionId id;
    absl::Duration min_ttl;
    uint64_t min_generation = 0;
    absl::Time deadline;
    Done done;
    std::atomic<bool> claimed{false};
    // Whoever claims the waiter runs (or, for CancelWait, drops) its callback.
    bool Claim() { return !claimed.exchange(true); }
  };
  struct RevokeState {
    int attempts = 0;
    bool queued = false;   // a kRevoke entry is in due_
    bool running = false;  // an attempt is on the work pool
  };

  // Joins or starts the single flight of `id`. `kind` tells who asked: only scheduled flights
  // count against max_concurrent; flights on use wait out a recent failure; a caller's flight
  // starts at most once per caller_refresh_interval. False: refused for one of those reasons
  // (`done` not taken, not called).
  enum class Trigger { kScheduled, kUse, kCaller };
  // `early_through`: for a caller's flight (Refresh RPC), the newest generation it may
  // refresh before its refresh_at (the one the caller saw); other triggers never do.
  bool Join(const core::ConnectionId& id, Trigger trigger, Done&& done, uint64_t early_through = 0)
      ABSL_LOCKS_EXCLUDED(mu_);
  // The flight itself, on a work thread: refreshes a due token, or one of generation
  // `early_through` or older before it is due.
  absl::StatusOr<TokenView> RefreshNow(const core::ConnectionId& id, uint64_t early_through);
  void Finish(const core::ConnectionId& id, const absl::StatusOr<TokenView>& result)
      ABSL_LOCKS_EXCLUDED(mu_);
  // The flight found another replica holding the lease: its callers wait for that replica's
  // generation, and the schedule looks again when the lease would have expired.
  void FinishLeaseHeld(const core::ConnectionId& id, absl::Time now, uint64_t generation)
      ABSL_LOCKS_EXCLUDED(mu_);

  // Completes every waiter of `id` that can be answered now; `flight` is the result of the
  // refresh that just ended, if that is why we look.
  void NotifyWaiters(const core::ConnectionId& id, const absl::StatusOr<TokenView>* flight)
      ABSL_LOCKS_EXCLUDED(mu_);
  // Runs one waiter's callback if nobody else did, and forgets it.
  void Complete(const std::shared_ptr<Waiter>& w, absl::StatusOr<TokenView> result)
      ABSL_LOCKS_EXCLUDED(mu_);
  void Forget(const Waiter& w) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  // One round of owed revocations of `id` (or the outcome of one just made, `already`), then a
  // retry with backoff if some are left.
  void RunRevocations(const core::ConnectionId& id, const absl::StatusOr<bool>* already)
      ABSL_LOCKS_EXCLUDED(mu_);
  // Track() without the lock, the signal and the waiters (Start() tracks every connection
  // under one lock).
  void TrackLocked(const std::shared_ptr<const core::Connection>& c, const core::ConnectionId& id,
                   absl::Time now) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void QueueRevocation(const core::ConnectionId& id, absl::Time at)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Makes (generation, at) the live refresh entry of `id` and queues it.
  void ScheduleLocked(const core::ConnectionId& id, uint64_t generation, absl::Time at)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The same for a node of tracked_.
  void QueueLocked(Tracked::value_type& node, uint64_t generation, absl::Time at)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Stops tracking `id`; its node goes when no heap entry points at it.
  void UntrackLocked(const core::ConnectionId& id) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The live schedule of `id`, or null.
  const Schedule* LiveSchedule(const core::ConnectionId& id) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Duration RevokeBackoff(int attempts) const;

  void Event(absl::string_view event, const core::ConnectionId& id, const absl::Status& s) const;
  // When to try again after the n-th transient failure in a row, at `now`, for a token that
  // expires at `expires_at` (InfiniteFuture(): never), given the failure `s`.
  absl::Time RetryAt(int n, absl::Time now, absl::Time expires_at, const absl::Status& s) const;

  const RefresherOptions options_;
  const core::ProviderDirectory& providers_;
  const Clock& clock_;
  Broker& broker_;
  core::ProviderClient& provider_client_;
  Revoker& revoker_;
  const RunBlocking run_blocking_;
  const EventSink events_;

  mutable Mutex mu_;
  CondVar wake_;
  absl::flat_hash_map<core::ConnectionId, std::vector<Done>> in_flight_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_set<core::ConnectionId> scheduled_in_flight_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_map<core::ConnectionId, absl::Time> last_caller_refresh_ ABSL_GUARDED_BY(mu_);
  // After a failed refresh, no flight on use starts before this (no retry storm from callers).
  absl::flat_hash_map<core::ConnectionId, absl::Time> not_before_ ABSL_GUARDED_BY(mu_);
  // Another replica held the lease moments ago: callers wait for its result through the store
  // instead of asking the database for the lease again on every call.
  absl::flat_hash_map<core::ConnectionId, absl::Time> lease_held_until_ ABSL_GUARDED_BY(mu_);
  // Transient failures in a row, per connection (for the backoff).
  absl::flat_hash_map<core::ConnectionId, int> failures_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_set<std::string> misconfigured_ ABSL_GUARDED_BY(mu_);
  Tracked tracked_ ABSL_GUARDED_BY(mu_);
  std::priority_queue<Due, std::vector<Due>, std::greater<Due>> due_ ABSL_GUARDED_BY(mu_);
  std::priority_queue<RevokeDue, std::vector<RevokeDue>, std::greater<RevokeDue>> revoke_due_
      ABSL_GUARDED_BY(mu_);
  absl::flat_hash_map<core::ConnectionId, RevokeState> revocations_ ABSL_GUARDED_BY(mu_);

  uint64_t next_waiter_ ABSL_GUARDED_BY(mu_) = 1;
  absl::flat_hash_map<uint64_t, std::shared_ptr<Waiter>> waiters_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_map<core::ConnectionId, std::vector<std::shared_ptr<Waiter>>> waiting_
      ABSL_GUARDED_BY(mu_);
  std::priority_queue<std::pair<absl::Time, uint64_t>, std::vector<std::pair<absl::Time, uint64_t>>,
                      std::greater<>>
      deadlines_ ABSL_GUARDED_BY(mu_);

  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::thread thread_;

  // Outcome counters per provider, made on first use.
  void CountAttempt(const std::string& provider, absl::string_view outcome)
      ABSL_LOCKS_EXCLUDED(mu_);
  metrics::CounterFamily* attempts_ = nullptr;
  metrics::Histogram* lateness_ = nullptr;

  std::atomic<uint64_t> refreshed_{0};
  std::atomic<uint64_t> failed_{0};
  std::atomic<uint64_t> needs_reauth_{0};
  std::atomic<uint64_t> rotation_lost_{0};
  std::atomic<uint64_t> provider_misconfigured_{0};
  std::atomic<uint64_t> wait_timeouts_{0};
};

}  // namespace tb::oauth

#endif  // TB_OAUTH_REFRESHER_H_
