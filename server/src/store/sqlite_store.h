#ifndef TB_STORE_SQLITE_STORE_H_
#define TB_STORE_SQLITE_STORE_H_

// The embedded default store (`store.url: sqlite:///abs/path/tokens.db`): connections, links
// and in-flight authorizations in one SQLite database file, every secret sealed through
// core::Cipher (record_codec.h).
//
// Why one class for both ports: core::TokenStore and core::FlowStore share one database file,
// one sqlite3 connection, one process lock, one set of key checks and one key rotation that
// walks the tables of both; splitting them would only add a third object that owns those.
//
// Schema (version kSchemaVersion; migrations only add, see schema_version.h):
//   schema_meta    (id = 1, version)
//   connections    (id PK, provider, status, generation, revision, refresh_at_unix_ms,
//                   updated_at_unix_ms, meta, key_id, nonce, ciphertext)
//   links          (link_id PK, connection_id, expires_at_unix_ms, revision, key_id, nonce,
//                   ciphertext)
//   authorizations (state_hash PK (SHA-256 of the state, never the state), expires_at_unix_ms,
//                   revision, key_id, nonce, ciphertext)
//   key_checks     (key_id PK, key_check): Cipher::KeyCheck of every key that ever sealed a row
// with indexes on key_id (rotation) and on authorizations.expires_at_unix_ms (purge).

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "absl/container/flat_hash_set.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "server/src/common/clock.h"
#include "server/src/common/mutex.h"
#include "server/src/core/cipher.h"
#include "server/src/core/flow_store.h"
#include "server/src/core/token_store.h"

struct sqlite3;
struct sqlite3_stmt;

namespace tb::store {

struct SqliteStoreOptions {
  // In-flight authorizations kept at most; when the cap is reached the expired ones are purged,
  // and if that is not enough PutAuthorization answers RESOURCE_EXHAUSTED.
  size_t max_pending_authorizations = 100'000;
  // How long a statement waits for a lock held by another connection to the file (an
  // operator's `sqlite3` shell, a backup) before failing with UNAVAILABLE.
  absl::Duration busy_timeout = absl::Seconds(5);
  // The store's clock, for lease expiry. Null: the system clock. Must outlive the store.
  const Clock* clock = nullptr;
};

using RotationProgress = core::RotationProgress;

// Thread-safe: one sqlite3 connection behind a mutex, statements prepared once. Every write is
// committed, and on disk (WAL, synchronous=FULL), before the call returns, so the broker
// publishes nothing that is not durable. Updates are group-committed: those that arrive while
// one transaction is being synced wait, and the next transaction writes all of them with one
// sync (each in its own savepoint, so one update's failure fails only its own call).
//
// Errors, in addition to those of the ports: every SQLite error becomes a status with the
// SQLite message (SQLite never puts bound values into it): SQLITE_BUSY / SQLITE_LOCKED ->
// UNAVAILABLE (retryable), SQLITE_CORRUPT / SQLITE_NOTADB -> DATA_LOSS, anything else ->
// INTERNAL.
class SqliteStore final : public core::TokenStore, public core::FlowStore {
 public:
  static constexpr int kSchemaVersion = 1;

  // Opens (creating if needed) the database at `url`, `sqlite:///` followed by the rest of an
  // absolute path (`sqlite:///var/lib/token-broker/tokens.db`).
  //
  // At open, in this order:
  //  1. Takes an exclusive lock (flock) on `<path>.lock` and writes our pid into it. Only one
  //     process may own the file, since two brokers would both refresh the same grants. The
  //     lock dies with the process, so a crashed owner never blocks its successor. The lock
  //     file is never deleted (deleting it would let two processes lock two different files).
  //  2. WAL journal, synchronous=FULL, the busy timeout.
  //  3. Migrations up to kSchemaVersion in one BEGIN IMMEDIATE transaction; a database at
  //     kSchemaVersion + 1 (a newer release, after a rollback) is used as it is.
  //  4. Key checks: every key id that rows are sealed with must be in cipher.key_ids(), and
  //     every configured key with a recorded check must match it.
  //
  // `cipher` must outlive the store.
  // Errors: INVALID_ARGUMENT (not a sqlite:/// URL with an absolute path); FAILED_PRECONDITION
  // (another process holds the lock, naming its pid; the lock file cannot be opened; the
  // schema is newer than kSchemaVersion + 1; rows sealed with a key id that is not configured,
  // or a configured key whose bytes differ from the key that sealed them, naming the key id;
  // the file system refuses WAL); DATA_LOSS (not a database, or corrupted); INTERNAL.
  static absl::StatusOr<std::unique_ptr<SqliteStore>> Open(absl::string_view url,
                                                           const core::Cipher& cipher,
                                                           SqliteStoreOptions options = {});

  // Closes the database, then releases the process lock.
  ~SqliteStore() override;
  SqliteStore(const SqliteStore&) = delete;
  SqliteStore& operator=(const SqliteStore&) = delete;

  // core::TokenStore. LoadEach reads the table in pages in id order and decodes each page on a
  // second thread; LoadAll collects LoadEach. A row whose secrets do not open, or whose
  // metadata is unreadable, comes back with Connection::data_loss set and without secrets; it
  // never fails the load.
  absl::StatusOr<std::vector<core::Connection>> LoadAll() override ABSL_LOCKS_EXCLUDED(mu_);
  absl::Status LoadEach(const std::function<void(core::Connection&&)>& sink) override
      ABSL_LOCKS_EXCLUDED(mu_);
  // count(*): a scan of the smallest index, about 10 ms at a million rows.
  size_t ConnectionCountHint() override ABSL_LOCKS_EXCLUDED(mu_);
  absl::StatusOr<core::Connection> Load(const core::ConnectionId& id) override
      ABSL_LOCKS_EXCLUDED(mu_);
  absl::Status Create(const core::Connection& c) override ABSL_LOCKS_EXCLUDED(mu_);
  // Compare-and-set on the stored revision; `fence` is ignored (one process owns the file).
  // Fields a newer release wrote into the row are kept (record_codec.h). Group-committed with
  // the updates that arrive while another commit syncs.
  absl::Status Update(const core::Connection& c, uint64_t expected_revision,
                      const core::Lease* fence) override ABSL_LOCKS_EXCLUDED(mu_, group_mu_);
  absl::Status Delete(const core::ConnectionId& id) override ABSL_LOCKS_EXCLUDED(mu_);
  // Always granted (the process lock is the lease): owner "sqlite:<pid>", fence 1, expiring
  // `ttl` from now on the store's clock.
  absl::StatusOr<std::optional<core::Lease>> AcquireLease(const core::ConnectionId& id,
                                                          absl::Duration ttl) override;
  absl::Status ReleaseLease(const core::Lease& lease) override;
  // No other process writes the file: false, and WatchRemoteChanges never calls back.
  bool HasOtherWriters() const override { return false; }

  // core::FlowStore. Links: PutLink inserts or replaces. Authorizations are keyed by
  // StateHash(state); TakeAuthorization deletes and returns the row in one statement (one
  // transaction), so a state works exactly once even if the caller fails right after.
  absl::Status PutLink(const core::LinkRecord& record) override ABSL_LOCKS_EXCLUDED(mu_);
  absl::StatusOr<core::LinkRecord> GetLink(const std::string& link_id) override
      ABSL_LOCKS_EXCLUDED(mu_);
  absl::Status RevokeLink(const std::string& link_id) override ABSL_LOCKS_EXCLUDED(mu_);
  absl::Status MarkLinkUsed(const std::string& link_id, absl::Time when) override
      ABSL_LOCKS_EXCLUDED(mu_);
  absl::Status PutAuthorization(const core::PendingAuthorization& auth, absl::Time now) override
      ABSL_LOCKS_EXCLUDED(mu_);
  absl::StatusOr<core::PendingAuthorization> TakeAuthorization(absl::string_view state,
                                                               absl::Time now) override
      ABSL_LOCKS_EXCLUDED(mu_);

  // Key rotation while serving. Re-seals up to `max_rows` rows (connections, then links, then
  // authorizations) that are not under cipher.current_key_id(), plaintext unchanged (a
  // connection's revision too, so the broker's next compare-and-set still matches). Rows are
  // read under the lock, re-sealed outside it, and written back in one transaction, each only
  // if its revision and nonce are still the ones read: a write that came in between wins and
  // is never lost (it sealed under the current key anyway, so nothing is left to retry). Call
  // repeatedly until remaining == unreadable; each call holds the lock for one read and one
  // write of at most `max_rows` rows.
  // Errors: INVALID_ARGUMENT (max_rows == 0), the SQLite errors above, INTERNAL (cipher).
  absl::StatusOr<RotationProgress> ReencryptBatch(size_t max_rows) override
      ABSL_LOCKS_EXCLUDED(mu_);
  // Rows (all tables) sealed under another key than cipher.current_key_id().
  absl::StatusOr<size_t> CountNotUnderCurrentKey() ABSL_LOCKS_EXCLUDED(mu_);

  // The database file.
  const std::string& path() const { return path_; }

  // Group commit, as seen from outside (tests): transactions that committed updates so far,
  // and updates waiting for the next transaction now.
  uint64_t update_commits() const { return update_commits_.load(std::memory_order_relaxed); }
  size_t queued_updates() const ABSL_LOCKS_EXCLUDED(group_mu_);

 private:
  struct Statements;

  SqliteStore(std::string path, int lock_fd, sqlite3* db, const core::Cipher& cipher,
              SqliteStoreOptions options);

  absl::Status Init() ABSL_LOCKS_EXCLUDED(mu_);
  absl::Status Migrate() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status CheckKeys() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Inside a write transaction: records cipher_.KeyCheck(key_id) the first time a row is
  // sealed with `key_id`.
  absl::Status RecordKeyCheck(const std::string& key_id) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::StatusOr<size_t> CountNotUnderCurrentKeyLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // One update waiting for its group commit, on its caller's stack.
  struct QueuedUpdate {
    const core::Connection& c;
    const uint64_t expected_revision;
    absl::Status result;
    bool done = false;
  };
  // Writes `batch` in one transaction and sets each one's result.
  void CommitUpdates(const std::vector<QueuedUpdate*>& batch) ABSL_LOCKS_EXCLUDED(mu_, group_mu_);
  // Inside the transaction: the compare-and-set of one update. Returns the key id it sealed with.
  absl::StatusOr<std::string> UpdateLocked(const core::Connection& c, uint64_t expected_revision)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Reads, changes and rewrites one link in one transaction.
  absl::Status ModifyLink(const std::string& link_id,
                          const std::function<void(core::LinkRecord&)>& change)
      ABSL_LOCKS_EXCLUDED(mu_);

  const std::string path_;
  const int lock_fd_;

  // Group commit of updates. Never held together with mu_.
  mutable Mutex group_mu_;
  CondVar group_done_;
  // Updates waiting for the next transaction.
  std::vector<QueuedUpdate*> queued_ ABSL_GUARDED_BY(group_mu_);
  // A caller is writing a batch (it takes queued_ as a whole when it starts).
  bool committing_ ABSL_GUARDED_BY(group_mu_) = false;
  std::atomic<uint64_t> update_commits_{0};
  const core::Cipher& cipher_;
  const SqliteStoreOptions options_;
  SystemClock system_clock_;
  const Clock& clock_;

  mutable Mutex mu_;
  sqlite3* const db_ ABSL_PT_GUARDED_BY(mu_);
  std::unique_ptr<Statements> stmts_ ABSL_GUARDED_BY(mu_);
  // Key ids whose check is in key_checks.
  absl::flat_hash_set<std::string> recorded_keys_ ABSL_GUARDED_BY(mu_);
  // An upper bound of the rows in `authorizations` (exact but for rare replaces), recounted
  // when the cap is reached.
  size_t pending_count_ ABSL_GUARDED_BY(mu_) = 0;
  // Rows rotation found unopenable, as (table, primary key, nonce): a rewrite (new nonce) makes
  // the row a candidate again, and batches are not filled with rows that never open.
  absl::flat_hash_set<std::tuple<int, std::string, std::string>> unreadable_ ABSL_GUARDED_BY(mu_);
};

}  // namespace tb::store

#endif  // TB_STORE_SQLITE_STORE_H_
