#ifndef TB_OAUTH_REFRESHER_H_
#define TB_OAUTH_REFRESHER_H_

#include <cstddef>
#include <functional>
#include <memory>
#include <optional>
#include <queue>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "server/src/common/clock.h"
#include "server/src/common/mutex.h"
#include "server/src/common/work_pool.h"
#include "server/src/core/provider_client.h"
#include "server/src/core/provider_spec.h"
#include "server/src/oauth/broker.h"

namespace tb::oauth {

struct RefresherOptions {
  // Bound on one provider call. A call once sent is never cancelled by a caller.
  absl::Duration provider_timeout = absl::Seconds(30);
  // At most one caller-triggered refresh (Refresh RPC) per connection per interval.
  absl::Duration caller_refresh_interval = absl::Seconds(10);
  // Scheduled refreshes in flight at once.
  size_t max_concurrent = 16;
};

// Refreshes grants: on schedule at each grant's refresh_at, and on request (Refresh RPC).
//
// Single-flight per connection: every caller of a connection's refresh shares one provider
// call. The call runs detached on `run_blocking` under provider_timeout; callers get the result
// through their callback and give up on their own deadlines without cancelling it. Before the
// call the intent is recorded; the rotated grant is stored (compare-and-set on the generation)
// before it is published. invalid_grant moves the connection to needs_reauth (ROTATION_LOST if
// an earlier refresh of the same generation had an unknown outcome) and no further call is made;
// invalid_client marks the provider misconfigured and leaves every grant as it is.
//
// Thread-safe. Everything passed to the constructor must outlive the refresher.
class Refresher {
 public:
  using Done = std::function<void(absl::StatusOr<TokenView>)>;

  Refresher(RefresherOptions options, const core::ProviderRegistry& providers, const Clock& clock,
            Broker& broker, core::ProviderClient& provider_client, RunBlocking run_blocking);

  // The Refresh RPC: refreshes `id` unless its generation is already past `if_generation`
  // (then answers with the current token at once; 0 means "refresh regardless"). `done` runs
  // exactly once, inline or on a work thread.
  // Errors: NOT_FOUND; FAILED_PRECONDITION with NOT_CONNECTED, NEEDS_REAUTH, ROTATION_LOST,
  // REVOKED, NOT_REFRESHABLE or PROVIDER_MISCONFIGURED; RESOURCE_EXHAUSTED (refreshed on
  // request less than caller_refresh_interval ago); UNAVAILABLE / DEADLINE_EXCEEDED (provider).
  void Refresh(const core::ConnectionId& id, uint64_t if_generation, Done done)
      ABSL_LOCKS_EXCLUDED(mu_);

  // Scheduling: Track() is the broker's on_change hook; RunDue() starts every refresh whose
  // time has come (at most max_concurrent in flight) and returns when the next one is due
  // (InfiniteFuture() when none). Start() runs a thread that calls RunDue() as time passes;
  // tests call RunDue() with a fake clock instead.
  void Track(const std::shared_ptr<const core::Connection>& c, const core::ConnectionId& id)
      ABSL_LOCKS_EXCLUDED(mu_);
  absl::Time RunDue() ABSL_LOCKS_EXCLUDED(mu_);
  void Start() ABSL_LOCKS_EXCLUDED(mu_);
  // Stops the scheduling thread (in-flight refreshes finish on the work pool).
  void Stop() ABSL_LOCKS_EXCLUDED(mu_);
  ~Refresher();

  bool provider_misconfigured(const std::string& provider) const ABSL_LOCKS_EXCLUDED(mu_);

 private:
  struct Due {
    absl::Time at;
    core::ConnectionId id;
    uint64_t generation;
    bool operator>(const Due& o) const { return at > o.at; }
  };

  // Joins or starts the single flight of `id`.
  void Join(const core::ConnectionId& id, bool scheduled, Done done) ABSL_LOCKS_EXCLUDED(mu_);
  // The flight itself, on a work thread.
  absl::StatusOr<TokenView> RefreshNow(const core::ConnectionId& id);
  void Finish(const core::ConnectionId& id, const absl::StatusOr<TokenView>& result)
      ABSL_LOCKS_EXCLUDED(mu_);

  const RefresherOptions options_;
  const core::ProviderRegistry& providers_;
  const Clock& clock_;
  Broker& broker_;
  core::ProviderClient& provider_client_;
  const RunBlocking run_blocking_;

  mutable Mutex mu_;
  CondVar wake_;
  absl::flat_hash_map<core::ConnectionId, std::vector<Done>> in_flight_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_set<core::ConnectionId> scheduled_in_flight_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_map<core::ConnectionId, absl::Time> last_caller_refresh_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_set<std::string> misconfigured_ ABSL_GUARDED_BY(mu_);
  std::priority_queue<Due, std::vector<Due>, std::greater<Due>> due_ ABSL_GUARDED_BY(mu_);
  // The one live schedule entry per connection (generation, time); heap entries that differ
  // are stale and dropped, so repeated notifications for one grant never refresh it twice.
  absl::flat_hash_map<core::ConnectionId, std::pair<uint64_t, absl::Time>> tracked_
      ABSL_GUARDED_BY(mu_);
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::thread thread_;
};

}  // namespace tb::oauth

#endif  // TB_OAUTH_REFRESHER_H_
