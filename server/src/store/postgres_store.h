#ifndef TB_STORE_POSTGRES_STORE_H_
#define TB_STORE_POSTGRES_STORE_H_

// The store for several replicas (`store.url: postgres://...` or `postgresql://...`):
// connections, links and in-flight authorizations in one PostgreSQL database shared by every
// broker process, through libpq (no exceptions anywhere), every secret sealed through
// core::Cipher by the shared record codec (record_codec.h).
//
// Schema (version kSchemaVersion; expand/contract, see schema_version.h):
//   schema_meta        (id = 1, version, updated_at)
//   schema_migrations  (version PK, applied_at, applied_by): one row per migration applied
//   connections        (id PK, provider, status, generation, revision, refresh_at_unix_ms,
//                       updated_at_unix_ms, meta, key_id, nonce, ciphertext,
//                       change_seq, changed_by)
//   connection_tombstones (id PK, change_seq, changed_by, deleted_at): deletions, for the
//                       polling change feed; pruned after a day
//   links              (link_id PK, connection_id, expires_at_unix_ms, revision, key_id,
//                       nonce, ciphertext)
//   authorizations     (state_hash PK (SHA-256 of the state, never the state),
//                       expires_at_unix_ms, key_id, nonce, ciphertext)
//   key_checks         (key_id PK, key_check): Cipher::KeyCheck of every key that sealed rows
//   refresh_leases     (connection_id PK, owner, expires_at timestamptz, fence)
//   sequence tb_change_seq: change_seq of every connection write and deletion
// Every write of a connection notifies channel `tokenbroker_changes` with the payload
// "<instance id> <change_seq> <connection id>", in the writing transaction.
//
// Several processes (replicas) use one database at once. Each store has an instance id
// (random unless configured): it owns leases under that id, and the change feed skips the
// changes it made itself.

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "server/src/common/clock.h"
#include "server/src/core/cipher.h"
#include "server/src/core/flow_store.h"
#include "server/src/core/token_store.h"

namespace tb::store {

struct PostgresStoreOptions {
  // Connections for the store's calls (the change feed has one more of its own). A call that
  // finds all of them busy waits up to statement_timeout for one, then fails UNAVAILABLE.
  size_t pool_size = 4;
  // Set on every pooled connection (SET statement_timeout): a statement running longer is
  // cancelled by the server (DEADLINE_EXCEEDED). The client gives up too, a little later, if
  // the server does not answer at all (UNAVAILABLE, and the connection is dropped).
  absl::Duration statement_timeout = absl::Seconds(5);
  // Opening a connection (libpq connect_timeout, whole seconds, at least 2), unless the URL
  // sets connect_timeout itself.
  absl::Duration connect_timeout = absl::Seconds(5);
  // How long Open waits for another process's migrations (the advisory lock).
  absl::Duration migration_lock_timeout = absl::Seconds(60);
  // In-flight authorizations kept at most (across every replica); when the cap is reached the
  // expired ones are purged, and if that is not enough PutAuthorization answers
  // RESOURCE_EXHAUSTED.
  size_t max_pending_authorizations = 100'000;
  // The change feed's fallback: every poll_interval it compares every connection's change_seq
  // with what it has seen, in case a notification was lost or the LISTEN connection broke.
  absl::Duration poll_interval = absl::Seconds(2);
  // This process's id, the owner of its leases. Empty: "<hostname>:<pid>:<random>".
  std::string instance_id;
  // Our clock, to express a lease's expiry (measured on the database's clock) in our time.
  // Null: the system clock. Must outlive the store.
  const Clock* clock = nullptr;
};

// Thread-safe. Every call is one or two statements on a pooled connection and returns when
// they have committed (fsync on the server side is the server's configuration). A connection
// that breaks (server restart, network) is dropped and re-opened on next use: the call that
// met the break fails UNAVAILABLE, later ones work again as soon as the server is back; an
// idle connection that the server closed meanwhile is noticed and replaced before use.
//
// Errors, in addition to those of the ports: the server unreachable or the connection broken
// -> UNAVAILABLE; statement timeout -> DEADLINE_EXCEEDED; serialization failure or deadlock
// -> ABORTED; anything else -> INTERNAL. Messages name the operation and the SQLSTATE, never a
// value.
class PostgresStore final : public core::TokenStore, public core::FlowStore {
 public:
  static constexpr int kSchemaVersion = 1;
  // The channel every write notifies.
  static constexpr char kChannel[] = "tokenbroker_changes";

  // Connects to `url` and, in this order, under a session advisory lock (so that two
  // processes opening at once never both migrate):
  //  1. creates schema_meta if missing and reads the schema version; refuses a database newer
  //     than kSchemaVersion + 1 (CheckSchemaVersion), uses kSchemaVersion + 1 as it is;
  //  2. applies the missing migrations, each in its own transaction with its schema_meta
  //     update;
  //  3. key checks: every key id that rows are sealed with must be in cipher.key_ids(), every
  //     configured key with a recorded check must match it, and the current key's check is
  //     recorded.
  // Then opens the pool and takes the change feed's starting point (changes made after Open
  // are reported once WatchRemoteChanges is called).
  //
  // `cipher` must outlive the store.
  // Errors: INVALID_ARGUMENT (not a postgres:// or postgresql:// URL, malformed, or a bad
  // option); UNAVAILABLE (cannot connect); FAILED_PRECONDITION (schema newer than
  // kSchemaVersion + 1, naming both versions; rows sealed with a key id that is not
  // configured, or a configured key whose check differs from the recorded one, naming the key
  // id); DEADLINE_EXCEEDED (another process held the migration lock too long); INTERNAL.
  static absl::StatusOr<std::unique_ptr<PostgresStore>> Open(absl::string_view url,
                                                             const core::Cipher& cipher,
                                                             PostgresStoreOptions options = {});

  // Stops the change feed's thread (waits for a callback in progress), then closes every
  // connection. No call may be in progress.
  ~PostgresStore() override;
  PostgresStore(const PostgresStore&) = delete;
  PostgresStore& operator=(const PostgresStore&) = delete;

  // core::TokenStore. A row whose secrets do not open, or whose metadata is unreadable,
  // comes back with Connection::data_loss set and without secrets; it never fails LoadAll.
  absl::StatusOr<std::vector<core::Connection>> LoadAll() override;
  size_t ConnectionCountHint() override;
  absl::StatusOr<core::Connection> Load(const core::ConnectionId& id) override;
  absl::Status Create(const core::Connection& c) override;
  // Compare-and-set on the stored revision, in one statement; with `fence`, in the same
  // statement only if the lease row still carries fence->owner and fence->fence (locked FOR
  // SHARE, so a takeover waits for this write or this write sees the takeover). ABORTED
  // otherwise; NOT_FOUND when the connection does not exist. Fields a newer release wrote into
  // the row are kept (record_codec.h).
  absl::Status Update(const core::Connection& c, uint64_t expected_revision,
                      const core::Lease* fence) override;
  absl::Status Delete(const core::ConnectionId& id) override;

  // Refresh leases, on the database's clock (clock_timestamp()), never ours. Granted when the
  // lease is free, expired or already ours (a renewal: same fence); taking it from another
  // owner increments the fence. The returned expires_at is our clock's now (read before the
  // statement) plus the time the database says is left, so it errs early.
  // Errors: INVALID_ARGUMENT (ttl <= 0), and those above.
  absl::StatusOr<std::optional<core::Lease>> AcquireLease(const core::ConnectionId& id,
                                                          absl::Duration ttl) override;
  // Expires the lease now if `lease` still holds it (owner and fence); the fence is kept, so
  // the next holder's is higher. A lease held by someone else is left alone (OK).
  absl::Status ReleaseLease(const core::Lease& lease) override;

  // Starts the change feed's thread: a connection of its own LISTENs on kChannel and delivers
  // the ids of changes made by other instances (our own notifications are skipped); every
  // poll_interval, and whenever the LISTEN connection has been re-established, it also polls
  // (every connection's change_seq and the tombstones) so that nothing is lost when a
  // notification is. `on_change` runs on that thread, with no lock of the store's held; an
  // id may be delivered more than once. Call at most once; later calls are ignored.
  void WatchRemoteChanges(std::function<void(const core::ConnectionId&)> on_change) override;

  // core::FlowStore. PutLink inserts or replaces; RevokeLink and MarkLinkUsed rewrite the
  // sealed record, compare-and-set on the link's revision (retried a few times, then
  // ABORTED). TakeAuthorization deletes and returns the row in one statement, so a state
  // works exactly once.
  absl::Status PutLink(const core::LinkRecord& record) override;
  absl::StatusOr<core::LinkRecord> GetLink(const std::string& link_id) override;
  absl::Status RevokeLink(const std::string& link_id) override;
  absl::Status MarkLinkUsed(const std::string& link_id, absl::Time when) override;
  absl::Status PutAuthorization(const core::PendingAuthorization& auth, absl::Time now) override;
  absl::StatusOr<core::PendingAuthorization> TakeAuthorization(absl::string_view state,
                                                               absl::Time now) override;

  // Key rotation while serving (every replica may run it; rows are claimed by compare-and-set,
  // not by a lock). Re-seals up to `max_rows` rows (connections, then links, then
  // authorizations) that are not under cipher.current_key_id(), plaintext unchanged (a
  // connection's revision too, so the broker's next compare-and-set still matches, and no
  // change is announced). Each row is written back only if its revision and nonce are still the
  // ones read: a write that came in between wins and is never lost (it sealed under the current
  // key anyway). Rows whose blob does not open are left exactly as they are and counted as
  // unreadable; rotation is complete when remaining == unreadable.
  // Errors: INVALID_ARGUMENT (max_rows == 0), the PostgreSQL errors above, INTERNAL (cipher).
  absl::StatusOr<core::RotationProgress> ReencryptBatch(size_t max_rows) override;
  // Rows (all tables) sealed under another key than cipher.current_key_id().
  absl::StatusOr<size_t> CountNotUnderCurrentKey();

  // The owner name of this store's leases and the tag of its notifications.
  const std::string& instance_id() const { return instance_id_; }

  // For tests and metrics: connections currently open in the pool.
  size_t open_connections() const;

 private:
  class Pool;
  class Feed;

  PostgresStore(std::string instance_id, const core::Cipher& cipher, PostgresStoreOptions options,
                std::unique_ptr<Pool> pool);

  absl::Status ModifyLink(const std::string& link_id,
                          const std::function<void(core::LinkRecord&)>& change);
  // Unreadable rows found by rotation, as (table, primary key, nonce), so that batches are not
  // filled with rows that never open; a rewrite (new nonce) makes a row a candidate again.
  struct Rotation;

  const std::string instance_id_;
  const core::Cipher& cipher_;
  const PostgresStoreOptions options_;
  SystemClock system_clock_;
  const Clock& clock_;
  const std::unique_ptr<Pool> pool_;
  const std::unique_ptr<Rotation> rotation_;
  std::unique_ptr<Feed> feed_;
};

}  // namespace tb::store

#endif  // TB_STORE_POSTGRES_STORE_H_
