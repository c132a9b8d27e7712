#ifndef TB_CORE_TOKEN_STORE_H_
#define TB_CORE_TOKEN_STORE_H_

#include <cstddef>
#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "server/src/core/connection.h"

namespace tb::core {

// The right to refresh one connection, held by one broker process at a time (several replicas
// on one database). `fence` increases every time the lease changes hands; a write carrying an
// older fence is refused, so a holder that lost its lease can never overwrite what the next
// holder wrote.
struct Lease {
  ConnectionId id;
  std::string owner;
  uint64_t fence = 0;
  // Until when the lease is held, converted from the store's clock to ours at acquisition.
  absl::Time expires_at = absl::InfinitePast();
};

// Progress of re-encrypting every stored row under the newest key (key rotation).
struct RotationProgress {
  size_t reencrypted = 0;  // rows re-sealed under the newest key by this call
  size_t remaining = 0;    // rows still sealed under an older key after it
  // Of `remaining`, rows whose secrets do not open (wrong key, corrupted): left exactly as they
  // are, never dropped. Rotation is complete when remaining == unreadable.
  size_t unreadable = 0;
};

// Where connections and their grants live durably. Implementations are thread-safe.
// Every write is compare-and-set on the record's revision (Connection::revision), so a stale
// writer never overwrites a newer record.
// Errors: kNotFound (no such connection), kAborted (revision conflict or lost lease: reload and
// retry), kAlreadyExists (Create of an existing id), kUnavailable (store unreachable,
// retryable), kDataLoss (a record that cannot be read back, e.g. it fails to decrypt).
class TokenStore {
 public:
  virtual ~TokenStore() = default;

  // Every stored connection, for loading the cache at start. A record whose secrets cannot be
  // read back (kDataLoss: wrong key, corrupted ciphertext) does not fail the load: it comes back
  // with its metadata and Connection::data_loss set, so that it alone answers DATA_LOSS and is
  // never dropped silently. Load() does the same for one record.
  virtual absl::StatusOr<std::vector<Connection>> LoadAll() = 0;
  // LoadAll() one connection at a time, in id order, on the calling thread, for loading a
  // million connections without holding them twice. Stops at the first store error. A store
  // may read ahead and decode on another thread; this default hands out LoadAll()'s result.
  virtual absl::Status LoadEach(const std::function<void(Connection&&)>& sink) {
    absl::StatusOr<std::vector<Connection>> all = LoadAll();
    if (!all.ok()) {
      return all.status();
    }
    for (Connection& c : *all) {
      sink(std::move(c));
    }
    return absl::OkStatus();
  }
  // About how many connections LoadEach() will hand out, so that the cache makes room for
  // them once instead of growing (and rehashing every id) twenty times on the way to a million;
  // 0 when the store cannot tell cheaply. A hint only: a load never relies on it.
  virtual size_t ConnectionCountHint() { return 0; }
  virtual absl::StatusOr<Connection> Load(const ConnectionId& id) = 0;

  // Inserts a connection that must not exist yet.
  virtual absl::Status Create(const Connection& c) = 0;
  // Replaces `c.id` (whose c.revision is expected_revision + 1) only if the stored revision is
  // still `expected_revision`, so a concurrent change is never lost. With `fence`, also only if
  // no other process took the connection's refresh lease since `fence` was granted.
  virtual absl::Status Update(const Connection& c, uint64_t expected_revision,
                              const Lease* fence) = 0;
  virtual absl::Status Delete(const ConnectionId& id) = 0;

  // Takes (or renews) the refresh lease of `id` for `ttl`, measured on the store's clock.
  // nullopt: another process holds it. Stores with a single owning process grant every request.
  virtual absl::StatusOr<std::optional<Lease>> AcquireLease(const ConnectionId& id,
                                                            absl::Duration ttl) = 0;
  virtual absl::Status ReleaseLease(const Lease& lease) = 0;

  // Re-seals up to `max_rows` rows not under the newest key, while the broker serves: each by
  // compare-and-set, so a concurrent write is never lost (a conflicting row is retried on the
  // next batch). Stores that encrypt nothing answer all zeros.
  virtual absl::StatusOr<RotationProgress> ReencryptBatch(size_t max_rows) {
    (void)max_rows;
    return RotationProgress{};
  }

  // Whether other processes may write this store (replicas sharing PostgreSQL). A store with
  // a single owning process answers false: nothing in it is newer than what its owner wrote,
  // so the owner need not read a row back before a refresh.
  virtual bool HasOtherWriters() const { return true; }

  // Calls `on_change` (on a store thread, never under a lock of the caller's) with the id of
  // each connection another process changed, as soon as the store learns of it. Stores with a
  // single owning process never call it. Call once, before serving.
  virtual void WatchRemoteChanges(std::function<void(const ConnectionId&)> on_change) {
    (void)on_change;
  }
};

}  // namespace tb::core

#endif  // TB_CORE_TOKEN_STORE_H_
