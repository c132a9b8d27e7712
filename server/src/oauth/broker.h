#ifndef TB_OAUTH_BROKER_H_
#define TB_OAUTH_BROKER_H_

#include <atomic>
#include <cstddef>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "server/src/cache/connection_cache.h"
#include "server/src/common/clock.h"
#include "server/src/common/metrics.h"
#include "server/src/common/mutex.h"
#include "server/src/core/connection.h"
#include "server/src/core/refresh_policy.h"
#include "server/src/core/token_store.h"

namespace tb::oauth {

struct BrokerOptions {
  core::RefreshPolicy refresh;
  // The largest min_ttl a GetToken may ask for (larger: INVALID_ARGUMENT). It bounds how long a
  // caller can wait for a scheduled refresh.
  absl::Duration max_min_ttl = absl::Hours(1);
  // Random delay added to each grant's refresh time (see RefreshPolicy::max_jitter); empty:
  // none. Injected so that tests see exact times.
  std::function<absl::Duration()> jitter;
  // Called after every published change (new grant, status change, delete: nullptr), outside
  // any lock; the refresh scheduler tracks refresh_at through it. Must not block.
  std::function<void(const std::shared_ptr<const core::Connection>&, const core::ConnectionId&)>
      on_change;
  // Store latency and errors (tb_store_*). Null: none. Must outlive the broker.
  metrics::Registry* metrics = nullptr;
  // Degraded-mode events (a record that cannot be decrypted at load); may be empty.
  std::function<void(absl::string_view event, const core::ConnectionId& id,
                     const absl::Status& status)>
      events;
};

// A token as handed to a caller: the connection snapshot it came from plus the promise.
struct TokenView {
  std::shared_ptr<const core::Connection> connection;  // status kActive, grant set
  absl::Time valid_until;                              // InfiniteFuture(): until revoked
  absl::Duration valid_for;                            // valid_until - now, or InfiniteDuration()

  const core::Grant& grant() const { return *connection->grant; }
};

// What GetToken can answer without waiting (Broker::Lookup).
struct TokenLookup {
  enum class Kind {
    kServe,            // `view` serves the request
    kError,            // `error` is the final answer
    kAwaitGeneration,  // the caller asked for a newer generation than there is: wait for it
    kAwaitRefresh,     // the token does not live min_ttl more: wait for its refresh
  };
  Kind kind = Kind::kError;
  TokenView view;      // kServe
  absl::Status error;  // kError
  // kAwaitRefresh: the connection is past its refresh_at, so a refresh may start now without
  // breaking any promise (otherwise the scheduled one, at refresh_at, is what to wait for).
  bool refresh_due = false;
};

// The connection lifecycle and the serving path (DESIGN.md, "Words").
//
// Thread-safe. Reads (GetToken, GetConnection, ListConnections) touch only the cache: no store
// I/O, no global lock, never blocking. Writes persist to the store first (compare-and-set) and
// publish to the cache after, so nothing is served that is not stored.
//
// `clock`, `store` and `cache` must outlive the broker.
class Broker {
 public:
  Broker(const Clock& clock, core::TokenStore& store, cache::ConnectionCache& cache,
         BrokerOptions options = {});

  // Loads every stored connection into the cache. Called once at start, before serving. A
  // record that cannot be read back is published as it is (it alone answers DATA_LOSS) and
  // reported through options.events ("data_loss"); `data_loss_count()` counts them.
  absl::Status Load();
  size_t data_loss_count() const { return data_loss_.load(std::memory_order_relaxed); }

  // Another replica changed `id` in the store: publishes the stored record if it is newer than
  // the cached one (or drops the cached one if it was deleted). Errors: store errors.
  absl::Status Reload(const core::ConnectionId& id);
  // Whether another process may change the store (core::TokenStore::HasOtherWriters): if not,
  // the cache is never behind it and a reload finds nothing new.
  bool StoreHasOtherWriters() const { return store_.HasOtherWriters(); }

  // The refresh lease of `id` (several replicas: only its holder calls the provider).
  // nullopt: another replica holds it. Errors: store errors.
  absl::StatusOr<std::optional<core::Lease>> AcquireRefreshLease(const core::ConnectionId& id,
                                                                 absl::Duration ttl);
  void ReleaseRefreshLease(const core::Lease& lease);

  // The serving decision for a token that serves at least `min_ttl` more and has at least
  // `min_generation`; records the use (ConnectionCache::Use). Never blocks, never does I/O.
  // kError errors: INVALID_ARGUMENT (min_ttl negative or above max_min_ttl), NOT_FOUND,
  // FAILED_PRECONDITION with Reason NOT_CONNECTED / NEEDS_REAUTH / ROTATION_LOST / REVOKED /
  // NOT_REFRESHABLE (expired, no refresh token), DATA_LOSS (unreadable record), OUT_OF_RANGE
  // (no token of this connection will ever live min_ttl: it cannot be refreshed, or its
  // tokens are promised for less).
  TokenLookup Lookup(const core::ConnectionId& id, absl::Duration min_ttl,
                     uint64_t min_generation) const;

  // Lookup() for callers that do not wait: a kAwait* answer is UNAVAILABLE.
  absl::StatusOr<TokenView> GetToken(const core::ConnectionId& id,
                                     absl::Duration min_ttl = absl::ZeroDuration()) const;

  // When the connection was last served (Lookup/GetToken); InfinitePast() if never.
  absl::Time LastUsed(const core::ConnectionId& id) const { return cache_.LastUsed(id); }

  // Errors: NOT_FOUND.
  absl::StatusOr<std::shared_ptr<const core::Connection>> GetConnection(
      const core::ConnectionId& id) const;

  // Errors: INVALID_ARGUMENT (page_size out of 1..1000).
  absl::StatusOr<cache::ConnectionCache::Page> ListConnections(
      const cache::ConnectionCache::Filter& filter, size_t page_size,
      absl::string_view after) const;

  // Registers a new connection in status `pending`.
  // Errors: INVALID_ARGUMENT (bad id), ALREADY_EXISTS, store errors.
  absl::StatusOr<std::shared_ptr<const core::Connection>> CreatePending(
      const core::ConnectionId& id, const std::string& provider,
      std::map<std::string, std::string> params);

  // Stores `grant` as the connection's new token set (generation = previous + 1, refresh_at per
  // the refresh policy) and makes it `active`. A previous grant that still holds tokens
  // (reconnect) joins `to_revoke` in the same write, so it is revoked at the provider even if
  // we crash right after. Errors: NOT_FOUND, ABORTED (concurrent change), store errors.
  absl::StatusOr<std::shared_ptr<const core::Connection>> Activate(const core::ConnectionId& id,
                                                                   core::Grant grant);

  // Records that a refresh of `generation` is about to be sent (the durable intent). Returns
  // whether an intent for that same generation was already recorded, i.e. an earlier refresh's
  // outcome is unknown. Errors: NOT_FOUND, ABORTED (the generation or status moved on).
  // With `fence`, the write is refused (ABORTED) if another replica took the lease since.
  absl::StatusOr<bool> RecordRefreshIntent(const core::ConnectionId& id, uint64_t generation,
                                           const core::Lease* fence = nullptr);

  // Stores a refreshed grant over `expected_generation` (compare-and-set) and publishes it; a
  // grant without a refresh token keeps the old one. Clears the intent.
  // Errors: NOT_FOUND, ABORTED (revoked, reconnected or refreshed meanwhile), store errors.
  absl::StatusOr<std::shared_ptr<const core::Connection>> Rotate(
      const core::ConnectionId& id, uint64_t expected_generation, core::Grant grant,
      const core::Lease* fence = nullptr);

  // Moves the refresh of the current grant of `generation` to `at` (never past its expiry):
  // a refresh that failed is retried then, and until then the token keeps being served with
  // that promise. With the store down the new promise is published from memory and written once
  // the store is back (FlushUnwritten). Errors: NOT_FOUND, ABORTED (the grant changed), store
  // errors other than the store being unreachable.
  absl::Status Reschedule(const core::ConnectionId& id, uint64_t generation, absl::Time at);

  // Revocations at the provider that are still owed (Connection::to_revoke):
  // AddRevocation appends `grant` (a refresh that lost to a revoke); ReplaceRevocation swaps
  // the entry with `old`'s access token for `replacement` (refreshed first to be revocable);
  // ResolveRevocation removes it once the provider confirmed. Each retries compare-and-set
  // conflicts. Errors: NOT_FOUND (connection gone), store errors.
  absl::Status AddRevocation(const core::ConnectionId& id, core::Grant grant);
  absl::Status ReplaceRevocation(const core::ConnectionId& id, const core::Grant& old,
                                 core::Grant replacement);
  absl::Status ResolveRevocation(const core::ConnectionId& id, const core::Grant& revoked);

  // Key rotation: re-encrypts up to `batch` stored rows under the newest key (the store's
  // compare-and-set keeps concurrent writes). Errors: INVALID_ARGUMENT (batch out of
  // 1..10000), store errors.
  absl::StatusOr<core::RotationProgress> RotateKeys(size_t batch);

  // The store's health, from the outcome of every store call made here (UNAVAILABLE or
  // DEADLINE_EXCEEDED: down). A store outage never makes the broker unready: reads come from
  // memory.
  bool store_healthy() const { return store_healthy_.load(std::memory_order_relaxed); }
  uint64_t store_errors() const { return store_errors_.load(std::memory_order_relaxed); }
  // A read of the store, to notice it is back (or gone) when nothing else writes. Returns the
  // store's error when it is unreachable.
  absl::Status ProbeStore();
  // Rotated grants the store did not take (it was down): they serve from memory and are
  // written by FlushUnwritten once the store answers again. Returns how many remain unwritten.
  size_t unwritten() const ABSL_LOCKS_EXCLUDED(unwritten_mu_);
  size_t FlushUnwritten() ABSL_LOCKS_EXCLUDED(unwritten_mu_);

  // Every connection, for the refresh scheduler's start. Reads the cache only.
  std::vector<std::shared_ptr<const core::Connection>> Snapshot() const;

  // Moves an active connection to `needs_reauth` with `reason` (kNeedsReauth or kRotationLost).
  // Errors: NOT_FOUND, ABORTED, store errors.
  absl::Status MarkNeedsReauth(const core::ConnectionId& id, core::Reason reason,
                               std::string last_error);

  // Marks the connection `revoked`: it stops serving at once. Its grant's tokens move to
  // `to_revoke` (revocation at the provider is the caller's job, done after); the grant left
  // holds no secret. Errors: NOT_FOUND, ABORTED, store errors.
  absl::Status MarkRevoked(const core::ConnectionId& id);

  // Removes the connection: afterwards it is NOT_FOUND. Errors: NOT_FOUND, store errors.
  absl::Status Delete(const core::ConnectionId& id);

 private:
  // Persists `next` over `current` (compare-and-set) and publishes it.
  // `keep_if_store_down`: if the store is unreachable, publish anyway and remember the write
  // for FlushUnwritten (only for a rotated grant, which nothing else could replace).
  absl::Status Replace(const std::shared_ptr<const core::Connection>& current,
                       std::shared_ptr<core::Connection> next, const core::Lease* fence = nullptr,
                       bool keep_if_store_down = false) ABSL_LOCKS_EXCLUDED(unwritten_mu_);
  // Health, error count and latency of one store call (op: "update", "create"...).
  void RecordStoreOutcome(const absl::Status& s, absl::string_view op = "",
                          absl::Duration elapsed = absl::ZeroDuration());

  // Applies `change` to the current snapshot and writes it, retrying compare-and-set conflicts.
  // `change` returns false to write nothing (then OK). `keep_if_store_down` as for Replace.
  absl::Status Modify(const core::ConnectionId& id,
                      const std::function<bool(core::Connection&)>& change,
                      bool keep_if_store_down = false);
  void Schedule(core::Grant& grant) const;
  void Changed(const std::shared_ptr<const core::Connection>& c,
               const core::ConnectionId& id) const;

  const Clock& clock_;
  core::TokenStore& store_;
  cache::ConnectionCache& cache_;
  const BrokerOptions options_;
  std::atomic<size_t> data_loss_{0};
  struct OpMetrics {
    metrics::Histogram* latency = nullptr;
    metrics::Counter* errors = nullptr;
  };
  absl::flat_hash_map<std::string, OpMetrics> store_ops_;  // filled in the constructor
  std::atomic<bool> store_healthy_{true};
  std::atomic<uint64_t> store_errors_{0};
  mutable Mutex unwritten_mu_;
  // Connections whose latest snapshot only reached memory -> the revision the store has.
  absl::flat_hash_map<core::ConnectionId, uint64_t> unwritten_ ABSL_GUARDED_BY(unwritten_mu_);
};

}  // namespace tb::oauth

#endif  // TB_OAUTH_BROKER_H_
