#include "server/src/store/sqlite_store.h"

#include <errno.h>
#include <fcntl.h>
#include <sqlite3.h>
#include <sys/file.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <future>
#include <iterator>
#include <utility>

#include "absl/cleanup/cleanup.h"
#include "absl/container/flat_hash_set.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "server/src/common/status_macros.h"
#include "server/src/store/record_codec.h"
#include "server/src/store/schema_version.h"

namespace tb::store {
namespace {

// ---- Schema ------------------------------------------------------------------------------

struct Migration {
  int version;
  const char* sql;
};

// Expand only (schema_version.h): a migration adds tables, nullable columns and indexes. The
// statements below name every column they use, so they keep working on a schema that a newer
// release expanded.
constexpr Migration kMigrations[] = {
    {1, R"sql(
CREATE TABLE connections (
  id                 TEXT    PRIMARY KEY NOT NULL,
  provider           TEXT    NOT NULL,
  status             INTEGER NOT NULL,
  generation         INTEGER NOT NULL,
  revision           INTEGER NOT NULL,
  refresh_at_unix_ms INTEGER,
  updated_at_unix_ms INTEGER NOT NULL,
  meta               BLOB    NOT NULL,
  key_id             TEXT    NOT NULL,
  nonce              BLOB    NOT NULL,
  ciphertext         BLOB    NOT NULL
);
CREATE INDEX connections_by_key_id ON connections (key_id);
CREATE TABLE links (
  link_id            TEXT    PRIMARY KEY NOT NULL,
  connection_id      TEXT    NOT NULL,
  expires_at_unix_ms INTEGER NOT NULL,
  revision           INTEGER NOT NULL,
  key_id             TEXT    NOT NULL,
  nonce              BLOB    NOT NULL,
  ciphertext         BLOB    NOT NULL
);
CREATE INDEX links_by_key_id ON links (key_id);
CREATE TABLE authorizations (
  state_hash         BLOB    PRIMARY KEY NOT NULL,
  expires_at_unix_ms INTEGER NOT NULL,
  revision           INTEGER NOT NULL,
  key_id             TEXT    NOT NULL,
  nonce              BLOB    NOT NULL,
  ciphertext         BLOB    NOT NULL
);
CREATE INDEX authorizations_by_key_id ON authorizations (key_id);
CREATE INDEX authorizations_by_expiry ON authorizations (expires_at_unix_ms);
CREATE TABLE key_checks (
  key_id             TEXT    PRIMARY KEY NOT NULL,
  key_check          BLOB    NOT NULL
);
)sql"},
};
static_assert(std::size(kMigrations) == SqliteStore::kSchemaVersion,
              "one migration per schema version");

constexpr char kConnectionColumns[] =
    "id, provider, status, generation, revision, refresh_at_unix_ms, updated_at_unix_ms, meta, "
    "key_id, nonce, ciphertext";
constexpr char kLinkColumns[] =
    "link_id, connection_id, expires_at_unix_ms, revision, key_id, nonce, ciphertext";
constexpr char kAuthorizationColumns[] =
    "state_hash, expires_at_unix_ms, revision, key_id, nonce, ciphertext";

// Tables in rotation order; also the first element of SqliteStore::unreadable_'s keys.
enum Table : int { kConnections = 0, kLinks = 1, kAuthorizations = 2 };

// ---- SQLite errors -----------------------------------------------------------------------

// SQLite's messages name tables, columns and constraints, never bound values.
absl::Status SqliteError(int rc, sqlite3* db, absl::string_view op) {
  const char* detail = db != nullptr ? sqlite3_errmsg(db) : sqlite3_errstr(rc);
  std::string message = absl::StrCat("sqlite ", op, ": ", detail);
  switch (rc & 0xff) {
    case SQLITE_BUSY:
    case SQLITE_LOCKED:
      return absl::UnavailableError(std::move(message));
    case SQLITE_CORRUPT:
    case SQLITE_NOTADB:
      return absl::DataLossError(std::move(message));
    default:
      return absl::InternalError(std::move(message));
  }
}

absl::Status Exec(sqlite3* db, const char* sql, absl::string_view op) {
  const int rc = sqlite3_exec(db, sql, nullptr, nullptr, nullptr);
  return rc == SQLITE_OK ? absl::OkStatus() : SqliteError(rc, db, op);
}

struct StmtDeleter {
  void operator()(sqlite3_stmt* s) const { sqlite3_finalize(s); }
};
using StmtPtr = std::unique_ptr<sqlite3_stmt, StmtDeleter>;

// One use of a prepared statement: binds (the bound memory must outlive the use), steps, reads
// columns, and resets the statement when it goes out of scope so that it can be used again.
class Query {
 public:
  Query(sqlite3* db, const StmtPtr& stmt) : db_(db), s_(stmt.get()) {}
  ~Query() {
    sqlite3_reset(s_);
    sqlite3_clear_bindings(s_);
  }
  Query(const Query&) = delete;
  Query& operator=(const Query&) = delete;

  Query& Text(int i, absl::string_view v) {
    return Check(sqlite3_bind_text(s_, i, NonNull(v), static_cast<int>(v.size()), SQLITE_STATIC));
  }
  // A zero-length blob stays a (non-NULL) empty blob.
  Query& Blob(int i, absl::string_view v) {
    return Check(sqlite3_bind_blob(s_, i, NonNull(v), static_cast<int>(v.size()), SQLITE_STATIC));
  }
  Query& Int(int i, int64_t v) { return Check(sqlite3_bind_int64(s_, i, v)); }
  Query& OptionalInt(int i, const std::optional<int64_t>& v) {
    return v ? Int(i, *v) : Check(sqlite3_bind_null(s_, i));
  }

  // True: a row is ready; false: done.
  absl::StatusOr<bool> Step(absl::string_view op) {
    if (bind_rc_ != SQLITE_OK) {
      return SqliteError(bind_rc_, db_, op);
    }
    const int rc = sqlite3_step(s_);
    if (rc == SQLITE_ROW) {
      return true;
    }
    if (rc == SQLITE_DONE) {
      return false;
    }
    return SqliteError(rc, db_, op);
  }
  // Steps to the end, ignoring rows.
  absl::Status Run(absl::string_view op) {
    while (true) {
      TB_ASSIGN_OR_RETURN(const bool row, Step(op));
      if (!row) {
        return absl::OkStatus();
      }
    }
  }

  int64_t ColInt(int i) const { return sqlite3_column_int64(s_, i); }
  bool ColIsNull(int i) const { return sqlite3_column_type(s_, i) == SQLITE_NULL; }
  std::string ColString(int i) const {
    const void* p = sqlite3_column_blob(s_, i);
    const int n = sqlite3_column_bytes(s_, i);
    return p == nullptr ? std::string() : std::string(static_cast<const char*>(p), n);
  }

 private:
  static const char* NonNull(absl::string_view v) { return v.data() != nullptr ? v.data() : ""; }
  Query& Check(int rc) {
    if (rc != SQLITE_OK && bind_rc_ == SQLITE_OK) {
      bind_rc_ = rc;
    }
    return *this;
  }

  sqlite3* const db_;
  sqlite3_stmt* const s_;
  int bind_rc_ = SQLITE_OK;
};

// BEGIN IMMEDIATE ... COMMIT; rolls back unless committed. IMMEDIATE takes the write lock up
// front, so a transaction never fails half-way for want of it.
class Transaction {
 public:
  Transaction(sqlite3* db, const StmtPtr& begin, const StmtPtr& commit, const StmtPtr& rollback)
      : db_(db), begin_(begin), commit_(commit), rollback_(rollback) {}
  ~Transaction() {
    if (open_) {
      Query(db_, rollback_).Run("rollback").IgnoreError();
    }
  }
  Transaction(const Transaction&) = delete;
  Transaction& operator=(const Transaction&) = delete;

  absl::Status Begin() {
    TB_RETURN_IF_ERROR(Query(db_, begin_).Run("begin transaction"));
    open_ = true;
    return absl::OkStatus();
  }
  absl::Status Commit() {
    TB_RETURN_IF_ERROR(Query(db_, commit_).Run("commit"));
    open_ = false;
    return absl::OkStatus();
  }

 private:
  sqlite3* const db_;
  const StmtPtr& begin_;
  const StmtPtr& commit_;
  const StmtPtr& rollback_;
  bool open_ = false;
};

// ---- Rows ----------------------------------------------------------------------------------

ConnectionRow ReadConnectionRow(const Query& q) {
  ConnectionRow row;
  row.id = q.ColString(0);
  row.provider = q.ColString(1);
  row.status = static_cast<int>(q.ColInt(2));
  row.generation = static_cast<uint64_t>(q.ColInt(3));
  row.revision = static_cast<uint64_t>(q.ColInt(4));
  if (!q.ColIsNull(5)) {
    row.refresh_at_unix_ms = q.ColInt(5);
  }
  row.updated_at_unix_ms = q.ColInt(6);
  row.meta = q.ColString(7);
  row.sealed.key_id = q.ColString(8);
  row.sealed.nonce = q.ColString(9);
  row.sealed.ciphertext = q.ColString(10);
  return row;
}

// Binds a connection row as ?1 .. ?11 in kConnectionColumns order.
void BindConnectionRow(Query& q, const ConnectionRow& row) {
  q.Text(1, row.id)
      .Text(2, row.provider)
      .Int(3, row.status)
      .Int(4, static_cast<int64_t>(row.generation))
      .Int(5, static_cast<int64_t>(row.revision))
      .OptionalInt(6, row.refresh_at_unix_ms)
      .Int(7, row.updated_at_unix_ms)
      .Blob(8, row.meta)
      .Text(9, row.sealed.key_id)
      .Blob(10, row.sealed.nonce)
      .Blob(11, row.sealed.ciphertext);
}

struct StoredLink {
  LinkRow row;
  int64_t revision = 0;
};

StoredLink ReadLinkRow(const Query& q) {
  StoredLink l;
  l.row.link_id = q.ColString(0);
  l.row.connection_id = q.ColString(1);
  l.row.expires_at_unix_ms = q.ColInt(2);
  l.revision = q.ColInt(3);
  l.row.sealed.key_id = q.ColString(4);
  l.row.sealed.nonce = q.ColString(5);
  l.row.sealed.ciphertext = q.ColString(6);
  return l;
}

struct StoredAuthorization {
  AuthorizationRow row;
  int64_t revision = 0;
};

StoredAuthorization ReadAuthorizationRow(const Query& q) {
  StoredAuthorization a;
  a.row.state_hash = q.ColString(0);
  a.row.expires_at_unix_ms = q.ColInt(1);
  a.revision = q.ColInt(2);
  a.row.sealed.key_id = q.ColString(3);
  a.row.sealed.nonce = q.ColString(4);
  a.row.sealed.ciphertext = q.ColString(5);
  return a;
}

// ---- URL and process lock ---------------------------------------------------------------

// The URL is not echoed in errors: a mistyped store URL may be a PostgreSQL one with a password.
absl::StatusOr<std::string> PathFromUrl(absl::string_view url) {
  const auto bad = [] {
    return absl::InvalidArgumentError(
        "a SQLite store URL is sqlite:/// followed by the rest of an absolute file path, e.g. "
        "sqlite:///var/lib/token-broker/tokens.db");
  };
  if (!absl::ConsumePrefix(&url, "sqlite://") || url.size() < 2 || url.front() != '/' ||
      url.back() == '/' || absl::StrContains(url, '\0')) {
    return bad();
  }
  return std::string(url);
}

// flock, not fcntl locks: fcntl locks belong to the process, so SQLite's own fcntl locks on
// other files, or a second open of the same lock file in this process, could silently drop
// them; flock belongs to the open file description and dies with the process.
absl::StatusOr<int> LockFile(const std::string& db_path) {
  const std::string lock_path = db_path + ".lock";
  const int fd = open(lock_path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600);
  if (fd < 0) {
    return absl::FailedPreconditionError(
        absl::StrCat("cannot open the lock file ", lock_path, ": ", std::strerror(errno)));
  }
  if (flock(fd, LOCK_EX | LOCK_NB) != 0) {
    const int err = errno;
    std::string owner = "another process";
    if (err == EWOULDBLOCK) {
      char buf[32] = {};
      const ssize_t n = pread(fd, buf, sizeof(buf) - 1, 0);
      int64_t pid = 0;
      if (n > 0 && absl::SimpleAtoi(absl::StripAsciiWhitespace(absl::string_view(buf, n)), &pid)) {
        owner = absl::StrCat("the process with pid ", pid);
      }
    }
    close(fd);
    if (err != EWOULDBLOCK) {
      return absl::InternalError(absl::StrCat("cannot lock ", lock_path, ": ", std::strerror(err)));
    }
    return absl::FailedPreconditionError(absl::StrCat(
        "the SQLite store ", db_path, " is in use by ", owner, " (it holds ", lock_path,
        "): only one token-broker process may own a SQLite store, since two would both refresh "
        "the same grants; stop the other one, or use a PostgreSQL store for several replicas"));
  }
  const std::string pid = absl::StrCat(getpid(), "\n");
  if (ftruncate(fd, 0) != 0 ||
      pwrite(fd, pid.data(), pid.size(), 0) != static_cast<ssize_t>(pid.size())) {
    const int err = errno;
    close(fd);
    return absl::InternalError(
        absl::StrCat("cannot write the lock file ", lock_path, ": ", std::strerror(err)));
  }
  return fd;
}

}  // namespace

// ---- Statements ----------------------------------------------------------------------------

struct SqliteStore::Statements {
  StmtPtr begin, commit, rollback;
  StmtPtr savepoint, release_savepoint, rollback_to_savepoint;
  StmtPtr load_page, count_connections, load, insert_connection, update_connection,
      delete_connection;
  StmtPtr put_link, get_link, rewrite_link;
  StmtPtr put_authorization, take_authorization, purge_authorizations, count_authorizations;
  StmtPtr insert_key_check;
  // Rotation, per table (index Table): rows under one key id, the count under one key id, a
  // re-seal compare-and-set on revision and nonce, and whether a row still has a nonce.
  StmtPtr under_key[3], count_under_key[3], reseal[3], has_nonce[3];
};

namespace {

absl::Status Prepare(sqlite3* db, const std::string& sql, StmtPtr* out) {
  sqlite3_stmt* s = nullptr;
  const int rc = sqlite3_prepare_v3(db, sql.c_str(), static_cast<int>(sql.size()),
                                    SQLITE_PREPARE_PERSISTENT, &s, nullptr);
  if (rc != SQLITE_OK) {
    sqlite3_finalize(s);
    return SqliteError(rc, db, "prepare");
  }
  out->reset(s);
  return absl::OkStatus();
}

}  // namespace

// ---- Open and close ------------------------------------------------------------------------

SqliteStore::SqliteStore(std::string path, int lock_fd, sqlite3* db, const core::Cipher& cipher,
                         SqliteStoreOptions options)
    : path_(std::move(path)),
      lock_fd_(lock_fd),
      cipher_(cipher),
      options_(options),
      clock_(options.clock != nullptr ? *options.clock : system_clock_),
      db_(db) {}

SqliteStore::~SqliteStore() {
  {
    MutexLock lock(&mu_);
    stmts_.reset();  // every statement is finalized before the connection closes
    sqlite3_close_v2(db_);
  }
  close(lock_fd_);  // releases the process lock, only once the database is closed
}

absl::StatusOr<std::unique_ptr<SqliteStore>> SqliteStore::Open(absl::string_view url,
                                                               const core::Cipher& cipher,
                                                               SqliteStoreOptions options) {
  TB_ASSIGN_OR_RETURN(std::string path, PathFromUrl(url));
  TB_ASSIGN_OR_RETURN(const int lock_fd, LockFile(path));
  sqlite3* db = nullptr;
  // NOMUTEX: the store's own mutex serializes every use of the connection.
  const int rc = sqlite3_open_v2(
      path.c_str(), &db,
      SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_NOMUTEX | SQLITE_OPEN_EXRESCODE,
      nullptr);
  if (rc != SQLITE_OK) {
    absl::Status s = SqliteError(rc, db, "open");
    sqlite3_close_v2(db);
    close(lock_fd);
    return s;
  }
  std::unique_ptr<SqliteStore> store(
      new SqliteStore(std::move(path), lock_fd, db, cipher, options));
  TB_RETURN_IF_ERROR(store->Init());
  return store;
}

absl::Status SqliteStore::Init() {
  MutexLock lock(&mu_);
  sqlite3_extended_result_codes(db_, 1);
  sqlite3_busy_timeout(db_, static_cast<int>(std::clamp<int64_t>(
                                absl::ToInt64Milliseconds(options_.busy_timeout), 0, INT32_MAX)));
  // The first statement reads the file header: a file that is not a database fails here with
  // DATA_LOSS.
  {
    StmtPtr wal;
    TB_RETURN_IF_ERROR(Prepare(db_, "PRAGMA journal_mode = WAL", &wal));
    Query q(db_, wal);
    TB_ASSIGN_OR_RETURN(const bool row, q.Step("set journal_mode"));
    if (!row || !absl::EqualsIgnoreCase(q.ColString(0), "wal")) {
      return absl::FailedPreconditionError(
          absl::StrCat("the SQLite store ", path_,
                       " cannot use WAL journaling (file system without shared "
                       "memory support?)"));
    }
  }
  // FULL: every commit fsyncs the WAL, so a write that returned survives a power loss.
  TB_RETURN_IF_ERROR(Exec(db_, "PRAGMA synchronous = FULL", "set synchronous"));
  TB_RETURN_IF_ERROR(Migrate());

  auto s = std::make_unique<Statements>();
  TB_RETURN_IF_ERROR(Prepare(db_, "BEGIN IMMEDIATE", &s->begin));
  TB_RETURN_IF_ERROR(Prepare(db_, "COMMIT", &s->commit));
  TB_RETURN_IF_ERROR(Prepare(db_, "ROLLBACK", &s->rollback));
  TB_RETURN_IF_ERROR(Prepare(db_, "SAVEPOINT one_update", &s->savepoint));
  TB_RETURN_IF_ERROR(Prepare(db_, "RELEASE one_update", &s->release_savepoint));
  TB_RETURN_IF_ERROR(Prepare(db_, "ROLLBACK TO one_update", &s->rollback_to_savepoint));
  TB_RETURN_IF_ERROR(Prepare(db_,
                             absl::StrCat("SELECT ", kConnectionColumns,
                                          " FROM connections WHERE id > ?1 ORDER BY id LIMIT ?2"),
                             &s->load_page));
  TB_RETURN_IF_ERROR(Prepare(db_, "SELECT count(*) FROM connections", &s->count_connections));
  TB_RETURN_IF_ERROR(
      Prepare(db_, absl::StrCat("SELECT ", kConnectionColumns, " FROM connections WHERE id = ?1"),
              &s->load));
  TB_RETURN_IF_ERROR(
      Prepare(db_,
              absl::StrCat("INSERT INTO connections (", kConnectionColumns,
                           ") VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)"),
              &s->insert_connection));
  TB_RETURN_IF_ERROR(Prepare(db_,
                             "UPDATE connections SET provider = ?2, status = ?3, generation = ?4, "
                             "revision = ?5, refresh_at_unix_ms = ?6, updated_at_unix_ms = ?7, "
                             "meta = ?8, key_id = ?9, nonce = ?10, ciphertext = ?11 "
                             "WHERE id = ?1 AND revision = ?12",
                             &s->update_connection));
  TB_RETURN_IF_ERROR(Prepare(db_, "DELETE FROM connections WHERE id = ?1", &s->delete_connection));
  TB_RETURN_IF_ERROR(Prepare(
      db_,
      absl::StrCat("INSERT INTO links (", kLinkColumns,
                   ") VALUES (?1, ?2, ?3, 1, ?4, ?5, ?6) ON CONFLICT (link_id) DO UPDATE SET "
                   "connection_id = excluded.connection_id, "
                   "expires_at_unix_ms = excluded.expires_at_unix_ms, "
                   "revision = links.revision + 1, key_id = excluded.key_id, "
                   "nonce = excluded.nonce, ciphertext = excluded.ciphertext"),
      &s->put_link));
  TB_RETURN_IF_ERROR(Prepare(
      db_, absl::StrCat("SELECT ", kLinkColumns, " FROM links WHERE link_id = ?1"), &s->get_link));
  TB_RETURN_IF_ERROR(Prepare(db_,
                             "UPDATE links SET revision = revision + 1, key_id = ?3, nonce = ?4, "
                             "ciphertext = ?5 WHERE link_id = ?1 AND revision = ?2",
                             &s->rewrite_link));
  TB_RETURN_IF_ERROR(Prepare(
      db_,
      absl::StrCat("INSERT INTO authorizations (", kAuthorizationColumns,
                   ") VALUES (?1, ?2, 1, ?3, ?4, ?5) ON CONFLICT (state_hash) DO UPDATE SET "
                   "expires_at_unix_ms = excluded.expires_at_unix_ms, "
                   "revision = authorizations.revision + 1, key_id = excluded.key_id, "
                   "nonce = excluded.nonce, ciphertext = excluded.ciphertext"),
      &s->put_authorization));
  TB_RETURN_IF_ERROR(Prepare(db_,
                             absl::StrCat("DELETE FROM authorizations WHERE state_hash = ?1 "
                                          "RETURNING ",
                                          kAuthorizationColumns),
                             &s->take_authorization));
  TB_RETURN_IF_ERROR(Prepare(db_, "DELETE FROM authorizations WHERE expires_at_unix_ms < ?1",
                             &s->purge_authorizations));
  TB_RETURN_IF_ERROR(Prepare(db_, "SELECT COUNT(*) FROM authorizations", &s->count_authorizations));
  TB_RETURN_IF_ERROR(Prepare(db_,
                             "INSERT INTO key_checks (key_id, key_check) VALUES (?1, ?2) "
                             "ON CONFLICT (key_id) DO NOTHING",
                             &s->insert_key_check));
  struct TableSql {
    const char* name;
    const char* key;
    const char* columns;
  };
  const TableSql tables[3] = {{"connections", "id", kConnectionColumns},
                              {"links", "link_id", kLinkColumns},
                              {"authorizations", "state_hash", kAuthorizationColumns}};
  for (int t = 0; t < 3; ++t) {
    const TableSql& ts = tables[t];
    TB_RETURN_IF_ERROR(Prepare(
        db_, absl::StrCat("SELECT ", ts.columns, " FROM ", ts.name, " WHERE key_id = ?1 LIMIT ?2"),
        &s->under_key[t]));
    TB_RETURN_IF_ERROR(Prepare(db_,
                               absl::StrCat("SELECT COUNT(*) FROM ", ts.name, " WHERE key_id = ?1"),
                               &s->count_under_key[t]));
    // A connection's revision is the broker's compare-and-set key and stays as it is; links
    // and authorizations count their own writes.
    TB_RETURN_IF_ERROR(
        Prepare(db_,
                absl::StrCat("UPDATE ", ts.name, " SET key_id = ?1, nonce = ?2, ciphertext = ?3",
                             t == kConnections ? "" : ", revision = revision + 1", " WHERE ",
                             ts.key, " = ?4 AND revision = ?5 AND nonce = ?6"),
                &s->reseal[t]));
    TB_RETURN_IF_ERROR(Prepare(
        db_, absl::StrCat("SELECT 1 FROM ", ts.name, " WHERE ", ts.key, " = ?1 AND nonce = ?2"),
        &s->has_nonce[t]));
  }
  stmts_ = std::move(s);

  TB_RETURN_IF_ERROR(CheckKeys());
  // The newest key is recorded now, before it seals anything: a later start with other bytes
  // under its id is refused even if nothing was stored in between.
  TB_RETURN_IF_ERROR(RecordKeyCheck(cipher_.current_key_id()));
  recorded_keys_.insert(cipher_.current_key_id());
  Query count(db_, stmts_->count_authorizations);
  TB_ASSIGN_OR_RETURN(const bool row, count.Step("count authorizations"));
  pending_count_ = row ? static_cast<size_t>(count.ColInt(0)) : 0;
  return absl::OkStatus();
}

absl::Status SqliteStore::Migrate() {
  // One transaction, taken with the write lock: the schema and its version change together or
  // not at all.
  TB_RETURN_IF_ERROR(Exec(db_, "BEGIN IMMEDIATE", "begin migration"));
  absl::Status status = [&]() -> absl::Status {
    TB_RETURN_IF_ERROR(Exec(db_,
                            "CREATE TABLE IF NOT EXISTS schema_meta ("
                            "id INTEGER PRIMARY KEY CHECK (id = 1), version INTEGER NOT NULL)",
                            "create schema_meta"));
    int db_version = 0;
    {
      StmtPtr read;
      TB_RETURN_IF_ERROR(Prepare(db_, "SELECT version FROM schema_meta WHERE id = 1", &read));
      Query q(db_, read);
      TB_ASSIGN_OR_RETURN(const bool row, q.Step("read the schema version"));
      if (row) {
        db_version = static_cast<int>(q.ColInt(0));
      }
    }
    TB_RETURN_IF_ERROR(CheckSchemaVersion(db_version, kSchemaVersion));
    if (db_version >= kSchemaVersion) {
      return absl::OkStatus();  // current, or one release newer: used as it is
    }
    for (const Migration& m : kMigrations) {
      if (m.version > db_version) {
        TB_RETURN_IF_ERROR(Exec(db_, m.sql, absl::StrCat("migrate to schema ", m.version)));
      }
    }
    StmtPtr write;
    TB_RETURN_IF_ERROR(Prepare(db_,
                               "INSERT INTO schema_meta (id, version) VALUES (1, ?1) "
                               "ON CONFLICT (id) DO UPDATE SET version = excluded.version",
                               &write));
    return Query(db_, write).Int(1, kSchemaVersion).Run("write the schema version");
  }();
  if (!status.ok()) {
    Exec(db_, "ROLLBACK", "roll back migration").IgnoreError();
    return status;
  }
  return Exec(db_, "COMMIT", "commit migration");
}

absl::Status SqliteStore::CheckKeys() {
  const std::vector<std::string> ids = cipher_.key_ids();
  const absl::flat_hash_set<std::string> configured(ids.begin(), ids.end());
  {
    StmtPtr used;
    TB_RETURN_IF_ERROR(Prepare(db_,
                               "SELECT key_id FROM connections UNION SELECT key_id FROM links "
                               "UNION SELECT key_id FROM authorizations",
                               &used));
    Query q(db_, used);
    while (true) {
      TB_ASSIGN_OR_RETURN(const bool row, q.Step("list the key ids in use"));
      if (!row) {
        break;
      }
      const std::string id = q.ColString(0);
      if (!configured.contains(id)) {
        return absl::FailedPreconditionError(absl::StrCat(
            "rows in ", path_, " are sealed with the key id \"", id,
            "\", which is not configured: add that key back to the key file (a key may be "
            "removed only after rotation has re-sealed every row under a newer one)"));
      }
    }
  }
  StmtPtr checks;
  TB_RETURN_IF_ERROR(Prepare(db_, "SELECT key_id, key_check FROM key_checks", &checks));
  Query q(db_, checks);
  while (true) {
    TB_ASSIGN_OR_RETURN(const bool row, q.Step("read the key checks"));
    if (!row) {
      break;
    }
    const std::string id = q.ColString(0);
    recorded_keys_.insert(id);
    if (!configured.contains(id)) {
      continue;  // a retired key: no row uses it any more
    }
    TB_ASSIGN_OR_RETURN(const std::string check, cipher_.KeyCheck(id));
    if (check != q.ColString(1)) {
      return absl::FailedPreconditionError(
          absl::StrCat("the key configured under the id \"", id, "\" is not the key that sealed ",
                       path_, " under that id: configure the original key bytes for \"", id, "\""));
    }
  }
  return absl::OkStatus();
}

absl::Status SqliteStore::RecordKeyCheck(const std::string& key_id) {
  if (recorded_keys_.contains(key_id)) {
    return absl::OkStatus();
  }
  TB_ASSIGN_OR_RETURN(const std::string check, cipher_.KeyCheck(key_id));
  return Query(db_, stmts_->insert_key_check)
      .Text(1, key_id)
      .Blob(2, check)
      .Run("record a key check");
  // The caller adds key_id to recorded_keys_ once its transaction has committed.
}

// ---- TokenStore ----------------------------------------------------------------------------

absl::StatusOr<std::vector<core::Connection>> SqliteStore::LoadAll() {
  std::vector<core::Connection> out;
  TB_RETURN_IF_ERROR(LoadEach([&out](core::Connection&& c) { out.push_back(std::move(c)); }));
  return out;
}

absl::Status SqliteStore::LoadEach(const std::function<void(core::Connection&&)>& sink) {
  // A second thread decodes one page (AES-GCM, two protobuf parses, the allocations) while
  // this one reads the next page (under the lock, keyset on id) and hands the page decoded
  // before to `sink`: decoding costs about as much as reading and publishing together, so a
  // load of a million connections keeps both cores busy. The lock is held per page, never
  // while `sink` runs.
  constexpr int kPage = 2048;
  const auto decode = [this](std::vector<ConnectionRow> rows) {
    std::vector<core::Connection> page;
    page.reserve(rows.size());
    for (const ConnectionRow& r : rows) {
      page.push_back(DecodeOrUnreadable(r, cipher_));
    }
    return page;
  };
  std::future<std::vector<core::Connection>> decoding;
  std::string after;  // ids are never empty
  while (true) {
    std::vector<ConnectionRow> rows;
    rows.reserve(kPage);
    {
      MutexLock lock(&mu_);
      Query q(db_, stmts_->load_page);
      q.Text(1, after).Int(2, kPage);
      while (true) {
        TB_ASSIGN_OR_RETURN(const bool row, q.Step("load connections"));
        if (!row) {
          break;
        }
        rows.push_back(ReadConnectionRow(q));
      }
    }
    std::vector<core::Connection> decoded;
    if (decoding.valid()) {
      decoded = decoding.get();
    }
    const bool last = rows.empty();
    if (!last) {
      after = rows.back().id;
      decoding = std::async(std::launch::async, decode, std::move(rows));
    }
    for (core::Connection& c : decoded) {  // while the next page decodes
      sink(std::move(c));
    }
    if (last) {
      return absl::OkStatus();
    }
  }
}

size_t SqliteStore::ConnectionCountHint() {
  MutexLock lock(&mu_);
  Query q(db_, stmts_->count_connections);
  absl::StatusOr<bool> row = q.Step("count connections");
  // An error here is the load's to report (it reads the same table next).
  return row.ok() && *row ? static_cast<size_t>(std::max<int64_t>(0, q.ColInt(0))) : 0;
}

absl::StatusOr<core::Connection> SqliteStore::Load(const core::ConnectionId& id) {
  ConnectionRow r;
  {
    MutexLock lock(&mu_);
    Query q(db_, stmts_->load);
    q.Text(1, id);
    TB_ASSIGN_OR_RETURN(const bool row, q.Step("load a connection"));
    if (!row) {
      return absl::NotFoundError("no such connection");
    }
    r = ReadConnectionRow(q);
  }
  return DecodeOrUnreadable(r, cipher_);
}

absl::Status SqliteStore::Create(const core::Connection& c) {
  TB_ASSIGN_OR_RETURN(const ConnectionRow row, EncodeConnection(c, cipher_));
  MutexLock lock(&mu_);
  Transaction txn(db_, stmts_->begin, stmts_->commit, stmts_->rollback);
  TB_RETURN_IF_ERROR(txn.Begin());
  {
    Query q(db_, stmts_->insert_connection);
    BindConnectionRow(q, row);
    if (absl::Status s = q.Run("insert a connection"); !s.ok()) {
      if (sqlite3_extended_errcode(db_) == SQLITE_CONSTRAINT_PRIMARYKEY) {
        return absl::AlreadyExistsError("connection already exists");
      }
      return s;
    }
  }
  TB_RETURN_IF_ERROR(RecordKeyCheck(row.sealed.key_id));
  TB_RETURN_IF_ERROR(txn.Commit());
  recorded_keys_.insert(row.sealed.key_id);
  return absl::OkStatus();
}

absl::Status SqliteStore::Update(const core::Connection& c, uint64_t expected_revision,
                                 const core::Lease*) {
  // Group commit: the sync of a commit costs more than everything else an update does, and the
  // refresher runs many updates at once. An update that arrives while a batch is being written
  // waits; when that batch is done, one of the waiters writes every update queued meanwhile.
  QueuedUpdate mine{c, expected_revision, absl::OkStatus(), false};
  std::vector<QueuedUpdate*> batch;
  {
    MutexLock lock(&group_mu_);
    queued_.push_back(&mine);
    while (committing_ && !mine.done) {
      group_done_.Wait(&group_mu_);
    }
    if (mine.done) {
      return mine.result;
    }
    committing_ = true;
    batch.swap(queued_);
  }
  // However CommitUpdates ends (an exception such as bad_alloc included), the batch is answered
  // and the next caller may lead: otherwise every later update would wait forever.
  bool answered = false;
  absl::Cleanup finish = [this, &batch, &answered] {
    {
      MutexLock lock(&group_mu_);
      // The waiters own their QueuedUpdate: none is touched after this.
      for (QueuedUpdate* u : batch) {
        if (!answered) {
          u->result = absl::InternalError("the update was not written (the commit failed)");
        }
        u->done = true;
      }
      committing_ = false;
    }
    group_done_.SignalAll();
  };
  CommitUpdates(batch);
  answered = true;
  return mine.result;
}

void SqliteStore::CommitUpdates(const std::vector<QueuedUpdate*>& batch) {
  MutexLock lock(&mu_);
  // Fails every update that has not failed on its own (the batch did not commit).
  const auto fail_all = [&batch](const absl::Status& s) {
    for (QueuedUpdate* u : batch) {
      if (u->result.ok()) {
        u->result = s;
      }
    }
  };
  Transaction txn(db_, stmts_->begin, stmts_->commit, stmts_->rollback);
  if (absl::Status s = txn.Begin(); !s.ok()) {
    fail_all(s);
    return;
  }
  std::vector<std::string> sealed_with;
  bool any_ok = false;
  for (QueuedUpdate* u : batch) {
    // A savepoint per update: one that fails (a revision that moved, a row that is gone, an
    // SQLite error) leaves nothing behind, and the others still commit.
    if (absl::Status s = Query(db_, stmts_->savepoint).Run("savepoint"); !s.ok()) {
      fail_all(s);
      return;
    }
    absl::StatusOr<std::string> key_id = UpdateLocked(u->c, u->expected_revision);
    if (key_id.ok()) {
      any_ok = true;
      sealed_with.push_back(*std::move(key_id));
    } else {
      u->result = key_id.status();
      if (sqlite3_get_autocommit(db_) != 0) {
        // SQLite rolled the whole transaction back itself (SQLITE_FULL, SQLITE_IOERR,
        // SQLITE_NOMEM): nothing of the batch is written, and its cause is every update's.
        fail_all(key_id.status());
        return;
      }
      if (absl::Status s = Query(db_, stmts_->rollback_to_savepoint).Run("roll back an update");
          !s.ok()) {
        fail_all(s);
        return;
      }
    }
    if (absl::Status s = Query(db_, stmts_->release_savepoint).Run("release savepoint"); !s.ok()) {
      fail_all(s);
      return;
    }
  }
  if (!any_ok) {
    return;  // nothing to commit: the transaction rolls back, without a sync
  }
  if (absl::Status s = txn.Commit(); !s.ok()) {
    fail_all(s);
    return;
  }
  update_commits_.fetch_add(1, std::memory_order_relaxed);
  for (std::string& key_id : sealed_with) {
    recorded_keys_.insert(std::move(key_id));
  }
}

size_t SqliteStore::queued_updates() const {
  MutexLock lock(&group_mu_);
  return queued_.size();
}

absl::StatusOr<std::string> SqliteStore::UpdateLocked(const core::Connection& c,
                                                      uint64_t expected_revision) {
  ConnectionRow previous;
  {
    Query q(db_, stmts_->load);
    q.Text(1, c.id);
    TB_ASSIGN_OR_RETURN(const bool row, q.Step("load a connection"));
    if (!row) {
      return absl::NotFoundError("no such connection");
    }
    previous = ReadConnectionRow(q);
  }
  if (previous.revision != expected_revision) {
    return absl::AbortedError("connection changed concurrently; reload and retry");
  }
  // Sealed under the lock because the previous row is needed to carry over what a newer
  // release wrote into it: one open and one seal of a few hundred bytes.
  TB_ASSIGN_OR_RETURN(ConnectionRow row, EncodeConnection(c, cipher_, &previous));
  {
    Query q(db_, stmts_->update_connection);
    BindConnectionRow(q, row);
    q.Int(12, static_cast<int64_t>(expected_revision));
    TB_RETURN_IF_ERROR(q.Run("update a connection"));
  }
  if (sqlite3_changes(db_) != 1) {
    return absl::AbortedError("connection changed concurrently; reload and retry");
  }
  TB_RETURN_IF_ERROR(RecordKeyCheck(row.sealed.key_id));
  return std::move(row.sealed.key_id);
}

absl::Status SqliteStore::Delete(const core::ConnectionId& id) {
  MutexLock lock(&mu_);
  // One statement: its own transaction, committed (and synced) when it completes.
  TB_RETURN_IF_ERROR(Query(db_, stmts_->delete_connection).Text(1, id).Run("delete a connection"));
  if (sqlite3_changes(db_) == 0) {
    return absl::NotFoundError("no such connection");
  }
  return absl::OkStatus();
}

absl::StatusOr<std::optional<core::Lease>> SqliteStore::AcquireLease(const core::ConnectionId& id,
                                                                     absl::Duration ttl) {
  core::Lease lease;
  lease.id = id;
  lease.owner = absl::StrCat("sqlite:", getpid());
  lease.fence = 1;
  lease.expires_at = clock_.Now() + ttl;
  return lease;
}

absl::Status SqliteStore::ReleaseLease(const core::Lease&) { return absl::OkStatus(); }

// ---- FlowStore -----------------------------------------------------------------------------

absl::Status SqliteStore::PutLink(const core::LinkRecord& record) {
  TB_ASSIGN_OR_RETURN(const LinkRow row, EncodeLink(record, cipher_));
  MutexLock lock(&mu_);
  Transaction txn(db_, stmts_->begin, stmts_->commit, stmts_->rollback);
  TB_RETURN_IF_ERROR(txn.Begin());
  TB_RETURN_IF_ERROR(Query(db_, stmts_->put_link)
                         .Text(1, row.link_id)
                         .Text(2, row.connection_id)
                         .Int(3, row.expires_at_unix_ms)
                         .Text(4, row.sealed.key_id)
                         .Blob(5, row.sealed.nonce)
                         .Blob(6, row.sealed.ciphertext)
                         .Run("store a link"));
  TB_RETURN_IF_ERROR(RecordKeyCheck(row.sealed.key_id));
  TB_RETURN_IF_ERROR(txn.Commit());
  recorded_keys_.insert(row.sealed.key_id);
  return absl::OkStatus();
}

absl::StatusOr<core::LinkRecord> SqliteStore::GetLink(const std::string& link_id) {
  StoredLink link;
  {
    MutexLock lock(&mu_);
    Query q(db_, stmts_->get_link);
    q.Text(1, link_id);
    TB_ASSIGN_OR_RETURN(const bool row, q.Step("load a link"));
    if (!row) {
      return absl::NotFoundError("no such link");
    }
    link = ReadLinkRow(q);
  }
  return DecodeLink(link.row, cipher_);
}

absl::Status SqliteStore::ModifyLink(const std::string& link_id,
                                     const std::function<void(core::LinkRecord&)>& change) {
  MutexLock lock(&mu_);
  Transaction txn(db_, stmts_->begin, stmts_->commit, stmts_->rollback);
  TB_RETURN_IF_ERROR(txn.Begin());
  StoredLink link;
  {
    Query q(db_, stmts_->get_link);
    q.Text(1, link_id);
    TB_ASSIGN_OR_RETURN(const bool row, q.Step("load a link"));
    if (!row) {
      return absl::NotFoundError("no such link");
    }
    link = ReadLinkRow(q);
  }
  TB_ASSIGN_OR_RETURN(core::LinkRecord record, DecodeLink(link.row, cipher_));
  change(record);
  TB_ASSIGN_OR_RETURN(const LinkRow row, EncodeLink(record, cipher_));
  TB_RETURN_IF_ERROR(Query(db_, stmts_->rewrite_link)
                         .Text(1, link_id)
                         .Int(2, link.revision)
                         .Text(3, row.sealed.key_id)
                         .Blob(4, row.sealed.nonce)
                         .Blob(5, row.sealed.ciphertext)
                         .Run("update a link"));
  if (sqlite3_changes(db_) != 1) {
    return absl::AbortedError("link changed concurrently; retry");
  }
  TB_RETURN_IF_ERROR(RecordKeyCheck(row.sealed.key_id));
  TB_RETURN_IF_ERROR(txn.Commit());
  recorded_keys_.insert(row.sealed.key_id);
  return absl::OkStatus();
}

absl::Status SqliteStore::RevokeLink(const std::string& link_id) {
  return ModifyLink(link_id, [](core::LinkRecord& r) { r.revoked = true; });
}

absl::Status SqliteStore::MarkLinkUsed(const std::string& link_id, absl::Time when) {
  return ModifyLink(link_id, [when](core::LinkRecord& r) { r.used_at = when; });
}

absl::Status SqliteStore::PutAuthorization(const core::PendingAuthorization& auth, absl::Time now) {
  TB_ASSIGN_OR_RETURN(const AuthorizationRow row, EncodeAuthorization(auth, cipher_));
  MutexLock lock(&mu_);
  Transaction txn(db_, stmts_->begin, stmts_->commit, stmts_->rollback);
  TB_RETURN_IF_ERROR(txn.Begin());
  size_t count = pending_count_;
  if (count >= options_.max_pending_authorizations) {
    // Purge what expired strictly before this millisecond (the column is in milliseconds, so
    // `<` never removes one that is still valid), then count exactly.
    TB_RETURN_IF_ERROR(Query(db_, stmts_->purge_authorizations)
                           .Int(1, absl::ToUnixMillis(now))
                           .Run("purge expired authorizations"));
    Query q(db_, stmts_->count_authorizations);
    TB_ASSIGN_OR_RETURN(const bool has_row, q.Step("count authorizations"));
    count = has_row ? static_cast<size_t>(q.ColInt(0)) : 0;
    if (count >= options_.max_pending_authorizations) {
      TB_RETURN_IF_ERROR(txn.Commit());  // keep the purge
      pending_count_ = count;
      return absl::ResourceExhaustedError("too many authorizations in flight; try again later");
    }
  }
  TB_RETURN_IF_ERROR(Query(db_, stmts_->put_authorization)
                         .Blob(1, row.state_hash)
                         .Int(2, row.expires_at_unix_ms)
                         .Text(3, row.sealed.key_id)
                         .Blob(4, row.sealed.nonce)
                         .Blob(5, row.sealed.ciphertext)
                         .Run("store an authorization"));
  TB_RETURN_IF_ERROR(RecordKeyCheck(row.sealed.key_id));
  TB_RETURN_IF_ERROR(txn.Commit());
  recorded_keys_.insert(row.sealed.key_id);
  pending_count_ = count + 1;
  return absl::OkStatus();
}

absl::StatusOr<core::PendingAuthorization> SqliteStore::TakeAuthorization(absl::string_view state,
                                                                          absl::Time now) {
  const std::string hash = StateHash(state);
  StoredAuthorization auth;
  {
    MutexLock lock(&mu_);
    // DELETE ... RETURNING is one statement, hence one transaction: once it has run, the
    // state is gone, whatever happens next.
    Query q(db_, stmts_->take_authorization);
    q.Blob(1, hash);
    TB_ASSIGN_OR_RETURN(const bool row, q.Step("take an authorization"));
    if (!row) {
      return absl::NotFoundError("unknown state");
    }
    auth = ReadAuthorizationRow(q);
    TB_RETURN_IF_ERROR(q.Run("take an authorization"));  // completes (commits) the delete
    if (pending_count_ > 0) {
      --pending_count_;
    }
  }
  TB_ASSIGN_OR_RETURN(core::PendingAuthorization out,
                      DecodeAuthorization(auth.row, state, cipher_));
  if (out.expires_at <= now) {
    return absl::NotFoundError("expired state");
  }
  return out;
}

// ---- Key rotation --------------------------------------------------------------------------

absl::StatusOr<size_t> SqliteStore::CountNotUnderCurrentKeyLocked() {
  const std::string current = cipher_.current_key_id();
  size_t n = 0;
  // Every row is under a configured key (checked at open; every write seals under the current
  // one), so counting per configured key id uses the key_id indexes instead of a scan.
  for (const std::string& key_id : cipher_.key_ids()) {
    if (key_id == current) {
      continue;
    }
    for (int t = 0; t < 3; ++t) {
      Query q(db_, stmts_->count_under_key[t]);
      q.Text(1, key_id);
      TB_ASSIGN_OR_RETURN(const bool row, q.Step("count rows under a key"));
      n += row ? static_cast<size_t>(q.ColInt(0)) : 0;
    }
  }
  return n;
}

absl::StatusOr<size_t> SqliteStore::CountNotUnderCurrentKey() {
  MutexLock lock(&mu_);
  return CountNotUnderCurrentKeyLocked();
}

absl::StatusOr<RotationProgress> SqliteStore::ReencryptBatch(size_t max_rows) {
  if (max_rows == 0) {
    return absl::InvalidArgumentError("max_rows must be at least 1");
  }
  struct Candidate {
    Table table;
    std::string key;  // primary key
    int64_t revision = 0;
    std::string old_nonce;
    ConnectionRow connection;
    LinkRow link;
    AuthorizationRow authorization;
    core::Sealed resealed;
  };
  const std::string current = cipher_.current_key_id();
  std::vector<Candidate> candidates;

  // 1. Read a batch under the lock.
  {
    MutexLock lock(&mu_);
    for (int t = 0; t < 3 && candidates.size() < max_rows; ++t) {
      for (const std::string& key_id : cipher_.key_ids()) {
        if (key_id == current || candidates.size() >= max_rows) {
          continue;
        }
        Query q(db_, stmts_->under_key[t]);
        q.Text(1, key_id).Int(
            2, static_cast<int64_t>(max_rows - candidates.size() + unreadable_.size()));
        while (candidates.size() < max_rows) {
          TB_ASSIGN_OR_RETURN(const bool row, q.Step("list rows under an old key"));
          if (!row) {
            break;
          }
          Candidate c;
          c.table = static_cast<Table>(t);
          switch (c.table) {
            case kConnections:
              c.connection = ReadConnectionRow(q);
              c.key = c.connection.id;
              c.revision = static_cast<int64_t>(c.connection.revision);
              c.old_nonce = c.connection.sealed.nonce;
              break;
            case kLinks: {
              StoredLink l = ReadLinkRow(q);
              c.link = std::move(l.row);
              c.key = c.link.link_id;
              c.revision = l.revision;
              c.old_nonce = c.link.sealed.nonce;
              break;
            }
            case kAuthorizations: {
              StoredAuthorization a = ReadAuthorizationRow(q);
              c.authorization = std::move(a.row);
              c.key = c.authorization.state_hash;
              c.revision = a.revision;
              c.old_nonce = c.authorization.sealed.nonce;
              break;
            }
          }
          if (!unreadable_.contains(std::make_tuple(t, c.key, c.old_nonce))) {
            candidates.push_back(std::move(c));
          }
        }
      }
    }
  }

  // 2. Re-seal outside the lock: the broker keeps writing meanwhile.
  std::vector<std::tuple<int, std::string, std::string>> newly_unreadable;
  std::vector<const Candidate*> resealed;
  for (Candidate& c : candidates) {
    absl::StatusOr<core::Sealed> s;
    switch (c.table) {
      case kConnections:
        s = ResealConnection(c.connection, cipher_);
        break;
      case kLinks:
        s = ResealLink(c.link, cipher_);
        break;
      case kAuthorizations:
        s = ResealAuthorization(c.authorization, cipher_);
        break;
    }
    if (s.ok()) {
      c.resealed = *std::move(s);
      resealed.push_back(&c);
    } else if (absl::IsDataLoss(s.status())) {
      // Left exactly as it is: it still answers DATA_LOSS until reconnected or deleted.
      newly_unreadable.emplace_back(c.table, c.key, c.old_nonce);
    } else {
      return s.status();
    }
  }

  // 3. Write back, each row only if nothing rewrote it since step 1.
  MutexLock lock(&mu_);
  RotationProgress progress;
  if (!resealed.empty()) {
    Transaction txn(db_, stmts_->begin, stmts_->commit, stmts_->rollback);
    TB_RETURN_IF_ERROR(txn.Begin());
    for (const Candidate* c : resealed) {
      Query q(db_, stmts_->reseal[c->table]);
      q.Text(1, c->resealed.key_id)
          .Blob(2, c->resealed.nonce)
          .Blob(3, c->resealed.ciphertext)
          .Int(5, c->revision)
          .Blob(6, c->old_nonce);
      if (c->table == kAuthorizations) {
        q.Blob(4, c->key);
      } else {
        q.Text(4, c->key);
      }
      TB_RETURN_IF_ERROR(q.Run("re-seal a row"));
      progress.reencrypted += static_cast<size_t>(sqlite3_changes(db_));
    }
    TB_RETURN_IF_ERROR(RecordKeyCheck(current));
    TB_RETURN_IF_ERROR(txn.Commit());
    recorded_keys_.insert(current);
  }
  for (auto& u : newly_unreadable) {
    unreadable_.insert(std::move(u));
  }
  // Forget unreadable rows that were since rewritten or deleted.
  for (auto it = unreadable_.begin(); it != unreadable_.end();) {
    const auto& [t, key, nonce] = *it;
    Query q(db_, stmts_->has_nonce[t]);
    if (t == kAuthorizations) {
      q.Blob(1, key);
    } else {
      q.Text(1, key);
    }
    q.Blob(2, nonce);
    TB_ASSIGN_OR_RETURN(const bool present, q.Step("look up an unreadable row"));
    if (present) {
      ++it;
    } else {
      unreadable_.erase(it++);
    }
  }
  TB_ASSIGN_OR_RETURN(progress.remaining, CountNotUnderCurrentKeyLocked());
  progress.unreadable = unreadable_.size();
  return progress;
}

}  // namespace tb::store
