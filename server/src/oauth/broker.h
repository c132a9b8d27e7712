#ifndef TB_OAUTH_BROKER_H_
#define TB_OAUTH_BROKER_H_

#include <cstddef>
#include <map>
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "server/src/cache/connection_cache.h"
#include "server/src/common/clock.h"
#include "server/src/core/connection.h"
#include "server/src/core/token_store.h"

namespace tb::oauth {

// A token as handed to a caller: the connection snapshot it came from plus the promise.
struct TokenView {
  std::shared_ptr<const core::Connection> connection;  // status kActive, grant set
  absl::Time valid_until;                              // InfiniteFuture(): until revoked
  absl::Duration valid_for;                            // valid_until - now, or InfiniteDuration()

  const core::Grant& grant() const { return *connection->grant; }
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
  Broker(const Clock& clock, core::TokenStore& store, cache::ConnectionCache& cache);

  // Loads every stored connection into the cache. Called once at start, before serving.
  absl::Status Load();

  // A token that serves for at least `min_ttl` more.
  // Errors: NOT_FOUND (unknown or deleted), FAILED_PRECONDITION with Reason NOT_CONNECTED /
  // NEEDS_REAUTH / ROTATION_LOST / REVOKED, UNAVAILABLE (no token with `min_ttl` left).
  absl::StatusOr<TokenView> GetToken(const core::ConnectionId& id,
                                     absl::Duration min_ttl = absl::ZeroDuration()) const;

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

  // Stores `grant` as the connection's new token set (generation = previous + 1) and makes it
  // `active`. Errors: NOT_FOUND, ABORTED (concurrent change), store errors.
  absl::StatusOr<std::shared_ptr<const core::Connection>> Activate(const core::ConnectionId& id,
                                                                   core::Grant grant);

  // Moves an active connection to `needs_reauth` with `reason` (kNeedsReauth or kRotationLost).
  // Errors: NOT_FOUND, ABORTED, store errors.
  absl::Status MarkNeedsReauth(const core::ConnectionId& id, core::Reason reason,
                               std::string last_error);

  // Marks the connection `revoked` and forgets its tokens (revocation at the provider is the
  // caller's job, done before). Errors: NOT_FOUND, ABORTED, store errors.
  absl::Status MarkRevoked(const core::ConnectionId& id);

  // Removes the connection: afterwards it is NOT_FOUND. Errors: NOT_FOUND, store errors.
  absl::Status Delete(const core::ConnectionId& id);

 private:
  // Persists `next` over `current` (compare-and-set) and publishes it.
  absl::Status Replace(const std::shared_ptr<const core::Connection>& current,
                       std::shared_ptr<const core::Connection> next);

  const Clock& clock_;
  core::TokenStore& store_;
  cache::ConnectionCache& cache_;
};

}  // namespace tb::oauth

#endif  // TB_OAUTH_BROKER_H_
