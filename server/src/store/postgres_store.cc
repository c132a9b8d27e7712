#include "server/src/store/postgres_store.h"

#include <errno.h>
#include <libpq-fe.h>
#include <poll.h>
#include <spdlog/spdlog.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <random>
#include <thread>
#include <tuple>
#include <utility>

#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "server/src/common/mutex.h"
#include "server/src/common/status_macros.h"
#include "server/src/store/record_codec.h"
#include "server/src/store/schema_version.h"

namespace tb::store {
namespace {

// ---- Schema ------------------------------------------------------------------------------

// The session advisory lock every opening process takes before it reads or migrates the
// schema ("tbschema" in ASCII).
constexpr int64_t kMigrationLockKey = 0x7462736368656d61;

// Expand only (schema_version.h): a migration adds tables, nullable (or defaulted) columns and
// indexes. The statements below name every column they use, so they keep working on a schema
// that a newer release expanded.
struct Migration {
  int version;
  const char* sql;
};
constexpr Migration kMigrations[] = {
    {1, R"sql(
CREATE SEQUENCE tb_change_seq;
CREATE TABLE connections (
  id                 text    PRIMARY KEY,
  provider           text    NOT NULL,
  status             integer NOT NULL,
  generation         bigint  NOT NULL,
  revision           bigint  NOT NULL,
  refresh_at_unix_ms bigint,
  updated_at_unix_ms bigint  NOT NULL,
  meta               bytea   NOT NULL,
  key_id             text    NOT NULL,
  nonce              bytea   NOT NULL,
  ciphertext         bytea   NOT NULL,
  change_seq         bigint  NOT NULL DEFAULT nextval('tb_change_seq'),
  changed_by         text    NOT NULL
);
CREATE INDEX connections_by_key_id ON connections (key_id);
CREATE TABLE connection_tombstones (
  id                 text        PRIMARY KEY,
  change_seq         bigint      NOT NULL,
  changed_by         text        NOT NULL,
  deleted_at         timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE links (
  link_id            text    PRIMARY KEY,
  connection_id      text    NOT NULL,
  expires_at_unix_ms bigint  NOT NULL,
  revision           bigint  NOT NULL,
  key_id             text    NOT NULL,
  nonce              bytea   NOT NULL,
  ciphertext         bytea   NOT NULL
);
CREATE INDEX links_by_key_id ON links (key_id);
CREATE TABLE authorizations (
  state_hash         bytea   PRIMARY KEY,
  expires_at_unix_ms bigint  NOT NULL,
  key_id             text    NOT NULL,
  nonce              bytea   NOT NULL,
  ciphertext         bytea   NOT NULL
);
CREATE INDEX authorizations_by_key_id ON authorizations (key_id);
CREATE INDEX authorizations_by_expiry ON authorizations (expires_at_unix_ms);
CREATE TABLE key_checks (
  key_id             text    PRIMARY KEY,
  key_check          bytea   NOT NULL
);
CREATE TABLE refresh_leases (
  connection_id      text        PRIMARY KEY,
  owner              text        NOT NULL,
  expires_at         timestamptz NOT NULL,
  fence              bigint      NOT NULL
);
)sql"},
};
static_assert(std::size(kMigrations) == PostgresStore::kSchemaVersion,
              "one migration per schema version");

constexpr char kBootstrapSql[] = R"sql(
CREATE TABLE IF NOT EXISTS schema_meta (
  id         integer     PRIMARY KEY CHECK (id = 1),
  version    integer     NOT NULL,
  updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS schema_migrations (
  version    integer     PRIMARY KEY,
  applied_at timestamptz NOT NULL DEFAULT now(),
  applied_by text        NOT NULL
);
)sql";

#define TB_PG_CONNECTION_COLUMNS                                                               \
  "id, provider, status, generation, revision, refresh_at_unix_ms, updated_at_unix_ms, meta, " \
  "key_id, nonce, ciphertext"

constexpr char kLoadAllSql[] = "SELECT " TB_PG_CONNECTION_COLUMNS " FROM connections ORDER BY id";
constexpr char kLoadSql[] = "SELECT " TB_PG_CONNECTION_COLUMNS " FROM connections WHERE id = $1";

// Every connection write notifies in its own statement (so in its own transaction): the
// notification is delivered when, and only if, the write commits.
constexpr char kCreateSql[] = R"sql(
WITH ins AS (
  INSERT INTO connections (id, provider, status, generation, revision, refresh_at_unix_ms,
                           updated_at_unix_ms, meta, key_id, nonce, ciphertext, changed_by)
  VALUES ($1, $2, $3::integer, $4::bigint, $5::bigint, $6::bigint, $7::bigint, $8::bytea, $9,
          $10::bytea, $11::bytea, $12::text)
  ON CONFLICT (id) DO NOTHING
  RETURNING id, change_seq)
SELECT change_seq, pg_notify('tokenbroker_changes', $12::text || ' ' || change_seq || ' ' || id)
FROM ins
)sql";

// The fence check locks the lease row FOR SHARE: a takeover (an UPDATE of that row) either
// commits first, and then this statement sees the new fence and writes nothing, or waits until
// this write has committed.
constexpr char kUpdateSql[] = R"sql(
WITH lease AS (
  SELECT 1 FROM refresh_leases
  WHERE connection_id = $1 AND owner = $13::text AND fence = $14::bigint
  FOR SHARE),
upd AS (
  UPDATE connections
  SET provider = $2, status = $3::integer, generation = $4::bigint, revision = $5::bigint,
      refresh_at_unix_ms = $6::bigint, updated_at_unix_ms = $7::bigint, meta = $8::bytea,
      key_id = $9, nonce = $10::bytea, ciphertext = $11::bytea,
      change_seq = nextval('tb_change_seq'), changed_by = $12::text
  WHERE id = $1 AND revision = $15::bigint AND (NOT $16::boolean OR EXISTS (SELECT 1 FROM lease))
  RETURNING id, change_seq)
SELECT change_seq, pg_notify('tokenbroker_changes', $12::text || ' ' || change_seq || ' ' || id)
FROM upd
)sql";

constexpr char kDeleteSql[] = R"sql(
WITH del AS (
  DELETE FROM connections WHERE id = $1 RETURNING id),
tomb AS (
  INSERT INTO connection_tombstones (id, change_seq, changed_by)
  SELECT id, nextval('tb_change_seq'), $2::text FROM del
  ON CONFLICT (id) DO UPDATE
    SET change_seq = EXCLUDED.change_seq, changed_by = EXCLUDED.changed_by, deleted_at = now()
  RETURNING id, change_seq)
SELECT change_seq, pg_notify('tokenbroker_changes', $2::text || ' ' || change_seq || ' ' || id)
FROM tomb
)sql";

// Free, expired or ours: granted. The fence moves only when the owner changes, so "same fence"
// means "nobody else held it in between". Both clocks are the database's.
constexpr char kAcquireLeaseSql[] = R"sql(
INSERT INTO refresh_leases AS l (connection_id, owner, expires_at, fence)
VALUES ($1, $2, clock_timestamp() + $3::bigint * interval '1 microsecond', 1)
ON CONFLICT (connection_id) DO UPDATE
  SET owner = EXCLUDED.owner,
      expires_at = EXCLUDED.expires_at,
      fence = CASE WHEN l.owner = EXCLUDED.owner THEN l.fence ELSE l.fence + 1 END
  WHERE l.owner = EXCLUDED.owner OR l.expires_at <= clock_timestamp()
RETURNING fence, (EXTRACT(EPOCH FROM (expires_at - clock_timestamp())) * 1000000)::bigint
)sql";

constexpr char kReleaseLeaseSql[] =
    "UPDATE refresh_leases SET expires_at = '-infinity' "
    "WHERE connection_id = $1 AND owner = $2 AND fence = $3::bigint";

constexpr char kPutLinkSql[] = R"sql(
INSERT INTO links (link_id, connection_id, expires_at_unix_ms, revision, key_id, nonce,
                   ciphertext)
VALUES ($1, $2, $3::bigint, 0, $4, $5::bytea, $6::bytea)
ON CONFLICT (link_id) DO UPDATE
  SET connection_id = EXCLUDED.connection_id, expires_at_unix_ms = EXCLUDED.expires_at_unix_ms,
      revision = links.revision + 1, key_id = EXCLUDED.key_id, nonce = EXCLUDED.nonce,
      ciphertext = EXCLUDED.ciphertext
)sql";
constexpr char kGetLinkSql[] =
    "SELECT link_id, connection_id, expires_at_unix_ms, revision, key_id, nonce, ciphertext "
    "FROM links WHERE link_id = $1";
constexpr char kRewriteLinkSql[] =
    "UPDATE links SET revision = revision + 1, key_id = $3, nonce = $4::bytea, "
    "ciphertext = $5::bytea WHERE link_id = $1 AND revision = $2::bigint";

// The cap counts at most $6 rows, so a full table costs a bounded scan, not a full count.
constexpr char kPutAuthorizationSql[] = R"sql(
INSERT INTO authorizations (state_hash, expires_at_unix_ms, key_id, nonce, ciphertext)
SELECT $1::bytea, $2::bigint, $3::text, $4::bytea, $5::bytea
WHERE (SELECT count(*) FROM (SELECT 1 FROM authorizations LIMIT $6::bigint) AS pending)
      < $6::bigint
ON CONFLICT (state_hash) DO UPDATE
  SET expires_at_unix_ms = EXCLUDED.expires_at_unix_ms, key_id = EXCLUDED.key_id,
      nonce = EXCLUDED.nonce, ciphertext = EXCLUDED.ciphertext
)sql";
constexpr char kPurgeAuthorizationsSql[] =
    "DELETE FROM authorizations WHERE expires_at_unix_ms < $1::bigint";
constexpr char kTakeAuthorizationSql[] =
    "DELETE FROM authorizations WHERE state_hash = $1::bytea "
    "RETURNING state_hash, expires_at_unix_ms, key_id, nonce, ciphertext";

// Key rotation, per table (connections, links, authorizations): rows under an old key, the
// compare-and-set re-seal (never touching revision, change_seq or the plaintext columns), and
// whether an unreadable row is still as rotation found it.
constexpr const char* kUnderOldKeySql[] = {
    ("SELECT " TB_PG_CONNECTION_COLUMNS
     " FROM connections WHERE key_id <> $1 ORDER BY id LIMIT $2::bigint"),
    ("SELECT link_id, connection_id, expires_at_unix_ms, revision, key_id, nonce, ciphertext "
     "FROM links WHERE key_id <> $1 ORDER BY link_id LIMIT $2::bigint"),
    ("SELECT state_hash, expires_at_unix_ms, key_id, nonce, ciphertext "
     "FROM authorizations WHERE key_id <> $1 ORDER BY state_hash LIMIT $2::bigint"),
};
constexpr const char* kResealSql[] = {
    ("UPDATE connections SET key_id = $2, nonce = $3::bytea, ciphertext = $4::bytea "
     "WHERE id = $1 AND revision = $5::bigint AND nonce = $6::bytea"),
    ("UPDATE links SET key_id = $2, nonce = $3::bytea, ciphertext = $4::bytea "
     "WHERE link_id = $1 AND revision = $5::bigint AND nonce = $6::bytea"),
    // Authorizations have no revision; the nonce changes with every write.
    ("UPDATE authorizations SET key_id = $2, nonce = $3::bytea, ciphertext = $4::bytea "
     "WHERE state_hash = $1::bytea AND $5::bigint = 0 AND nonce = $6::bytea"),
};
constexpr const char* kStillUnreadableSql[] = {
    "SELECT 1 FROM connections WHERE id = $1 AND nonce = $2::bytea AND key_id <> $3",
    "SELECT 1 FROM links WHERE link_id = $1 AND nonce = $2::bytea AND key_id <> $3",
    ("SELECT 1 FROM authorizations WHERE state_hash = $1::bytea AND nonce = $2::bytea "
     "AND key_id <> $3"),
};
constexpr char kCountConnectionsSql[] = "SELECT count(*) FROM connections";
constexpr char kCountNotUnderKeySql[] =
    "SELECT (SELECT count(*) FROM connections WHERE key_id <> $1) + "
    "(SELECT count(*) FROM links WHERE key_id <> $1) + "
    "(SELECT count(*) FROM authorizations WHERE key_id <> $1)";

constexpr char kChangesSql[] =
    "SELECT id, change_seq, changed_by FROM connections "
    "UNION ALL SELECT id, change_seq, changed_by FROM connection_tombstones";
constexpr char kPruneTombstonesSql[] =
    "DELETE FROM connection_tombstones WHERE deleted_at < now() - interval '1 day'";

// ---- libpq plumbing ------------------------------------------------------------------------

struct ResultDeleter {
  void operator()(PGresult* r) const { PQclear(r); }
};
using Result = std::unique_ptr<PGresult, ResultDeleter>;

void IgnoreNotice(void*, const char*) {}

// Statement parameters: text, or raw bytes sent in binary format (bytea).
class Params {
 public:
  Params& Text(absl::string_view s) { return Add(std::string(s), 0, false); }
  Params& Bytes(absl::string_view b) { return Add(std::string(b), 1, false); }
  Params& Int(int64_t v) { return Add(absl::StrCat(v), 0, false); }
  Params& Bool(bool v) { return Add(v ? "true" : "false", 0, false); }
  Params& OptInt(const std::optional<int64_t>& v) { return v ? Int(*v) : Add("", 0, true); }

  int size() const { return static_cast<int>(values_.size()); }
  // Valid until the next Add.
  const char* const* values() const {
    ptrs_.clear();
    for (size_t i = 0; i < values_.size(); ++i) {
      ptrs_.push_back(null_[i] ? nullptr : values_[i].data());
    }
    return ptrs_.data();
  }
  const int* lengths() const {
    lengths_.clear();
    for (const std::string& v : values_) {
      lengths_.push_back(static_cast<int>(v.size()));
    }
    return lengths_.data();
  }
  const int* formats() const { return formats_.data(); }

 private:
  Params& Add(std::string v, int format, bool null) {
    values_.push_back(std::move(v));
    formats_.push_back(format);
    null_.push_back(null);
    return *this;
  }

  std::vector<std::string> values_;
  std::vector<int> formats_;
  std::vector<bool> null_;
  mutable std::vector<const char*> ptrs_;
  mutable std::vector<int> lengths_;
};

// Reads a result fetched in binary format.
class Rows {
 public:
  explicit Rows(const PGresult* r) : r_(r) {}
  int size() const { return PQntuples(r_); }
  bool IsNull(int row, int col) const { return PQgetisnull(r_, row, col) != 0; }
  std::string Bytes(int row, int col) const {
    return std::string(PQgetvalue(r_, row, col), PQgetlength(r_, row, col));
  }
  // int2, int4 and int8 arrive big-endian in 2, 4 or 8 bytes.
  int64_t Int(int row, int col) const {
    const auto* p = reinterpret_cast<const unsigned char*>(PQgetvalue(r_, row, col));
    const int n = PQgetlength(r_, row, col);
    uint64_t v = 0;
    for (int i = 0; i < n; ++i) {
      v = (v << 8) | p[i];
    }
    switch (n) {
      case 2:
        return static_cast<int16_t>(v);
      case 4:
        return static_cast<int32_t>(v);
      default:
        return static_cast<int64_t>(v);
    }
  }
  std::optional<int64_t> OptInt(int row, int col) const {
    if (IsNull(row, col)) {
      return std::nullopt;
    }
    return Int(row, col);
  }

 private:
  const PGresult* r_;
};

// An error of a statement as a status. PostgreSQL puts values into the primary message only
// for data exceptions (class 22: "invalid input syntax ...: <value>"), so those keep just the
// SQLSTATE; others keep the message, which names tables and constraints (values are in DETAIL,
// which is never read).
absl::Status StatementError(const PGresult* r, absl::string_view op) {
  const char* state = r != nullptr ? PQresultErrorField(r, PG_DIAG_SQLSTATE) : nullptr;
  const std::string code = state != nullptr ? state : "";
  std::string message = absl::StrCat("postgres ", op, ": SQLSTATE ", code.empty() ? "?" : code);
  const char* primary = r != nullptr ? PQresultErrorField(r, PG_DIAG_MESSAGE_PRIMARY) : nullptr;
  if (primary != nullptr && !absl::StartsWith(code, "22")) {
    absl::StrAppend(&message, ": ", primary);
  }
  if (code == "40001" || code == "40P01") {  // serialization failure, deadlock
    return absl::AbortedError(std::move(message));
  }
  if (code == "57014") {  // query_canceled: statement_timeout
    return absl::DeadlineExceededError(std::move(message));
  }
  if (absl::StartsWith(code, "08") || absl::StartsWith(code, "57P") ||
      absl::StartsWith(code, "53") || code == "55P03") {
    // connection exception, admin/crash shutdown, cannot connect now, insufficient resources,
    // lock not available
    return absl::UnavailableError(std::move(message));
  }
  return absl::InternalError(std::move(message));
}

// libpq's own message (connection failures): host, port and reason, never a password.
std::string ConnMessage(PGconn* c) {
  if (c == nullptr) {
    return "out of memory";
  }
  std::string m = PQerrorMessage(c);
  absl::StripTrailingAsciiWhitespace(&m);
  std::replace(m.begin(), m.end(), '\n', ' ');
  return m;
}

// Waits until `fd` has one of `events` (or an error) or `deadline` passes. Returns the
// revents, 0 on timeout.
short WaitFd(int fd, short events, absl::Time deadline) {
  while (true) {
    const absl::Duration left = deadline - absl::Now();
    if (left <= absl::ZeroDuration()) {
      return 0;
    }
    pollfd p{fd, events, 0};
    const int ms = static_cast<int>(std::min<int64_t>(absl::ToInt64Milliseconds(left) + 1, 60'000));
    const int rc = poll(&p, 1, ms);
    if (rc > 0) {
      return p.revents;
    }
    if (rc < 0 && errno != EINTR) {
      return POLLERR;
    }
  }
}

// How to reach the server: the URL's parameters plus our defaults, as libpq keywords.
struct ConnSettings {
  std::vector<std::pair<std::string, std::string>> params;
  absl::Duration statement_timeout;
};

absl::StatusOr<ConnSettings> ParseUrl(absl::string_view url, const PostgresStoreOptions& o) {
  if (!absl::StartsWith(url, "postgres://") && !absl::StartsWith(url, "postgresql://")) {
    return absl::InvalidArgumentError(
        "a PostgreSQL store URL starts with postgres:// or "
        "postgresql://");
  }
  if (o.pool_size == 0 || o.statement_timeout <= absl::ZeroDuration() ||
      o.poll_interval <= absl::ZeroDuration()) {
    return absl::InvalidArgumentError(
        "PostgreSQL store: pool_size, statement_timeout and poll_interval must be positive");
  }
  char* err = nullptr;
  PQconninfoOption* parsed = PQconninfoParse(std::string(url).c_str(), &err);
  if (parsed == nullptr) {
    // libpq's message may quote parts of the URL (a password among them): not repeated.
    PQfreemem(err);
    return absl::InvalidArgumentError("malformed PostgreSQL URL");
  }
  ConnSettings s;
  s.statement_timeout = o.statement_timeout;
  absl::flat_hash_set<std::string> given;
  for (PQconninfoOption* p = parsed; p->keyword != nullptr; ++p) {
    if (p->val != nullptr) {
      s.params.emplace_back(p->keyword, p->val);
      given.insert(p->keyword);
    }
  }
  PQconninfoFree(parsed);
  const auto set_default = [&](const char* k, std::string v) {
    if (!given.contains(k)) {
      s.params.emplace_back(k, std::move(v));
    }
  };
  set_default("connect_timeout",
              absl::StrCat(std::max<int64_t>(2, absl::ToInt64Seconds(o.connect_timeout))));
  // Keepalives and a TCP user timeout, so that a server that vanished (no FIN, no RST) is
  // noticed instead of hanging a call.
  set_default("keepalives", "1");
  set_default("keepalives_idle", "30");
  set_default("keepalives_interval", "10");
  set_default("keepalives_count", "3");
  set_default("tcp_user_timeout",
              absl::StrCat(absl::ToInt64Milliseconds(o.statement_timeout + absl::Seconds(10))));
  return s;
}

// One libpq connection in non-blocking mode. Confined to one thread at a time (the pool hands
// it out exclusively).
class PgConn {
 public:
  // Connects and sets the session's statement timeout. Errors: UNAVAILABLE.
  static absl::StatusOr<std::unique_ptr<PgConn>> Connect(const ConnSettings& s,
                                                         absl::string_view application_name) {
    std::vector<const char*> keys;
    std::vector<const char*> values;
    bool has_app = false;
    for (const auto& [k, v] : s.params) {
      keys.push_back(k.c_str());
      values.push_back(v.c_str());
      has_app = has_app || k == "application_name";
    }
    const std::string app(application_name);
    if (!has_app) {
      keys.push_back("application_name");
      values.push_back(app.c_str());
    }
    keys.push_back(nullptr);
    values.push_back(nullptr);
    PGconn* c = PQconnectdbParams(keys.data(), values.data(), /*expand_dbname=*/0);
    if (c == nullptr || PQstatus(c) != CONNECTION_OK) {
      absl::Status s_err =
          absl::UnavailableError(absl::StrCat("postgres connect: ", ConnMessage(c)));
      PQfinish(c);
      return s_err;
    }
    PQsetNoticeProcessor(c, IgnoreNotice, nullptr);
    auto conn = std::unique_ptr<PgConn>(new PgConn(c, s.statement_timeout));
    if (PQsetnonblocking(c, 1) != 0) {
      return absl::UnavailableError("postgres connect: cannot enter non-blocking mode");
    }
    TB_RETURN_IF_ERROR(conn->SetStatementTimeout(s.statement_timeout));
    TB_RETURN_IF_ERROR(conn->ExecScript("SET idle_in_transaction_session_timeout = 60000",
                                        "set the idle transaction timeout"));
    return conn;
  }

  ~PgConn() { PQfinish(conn_); }
  PgConn(const PgConn&) = delete;
  PgConn& operator=(const PgConn&) = delete;

  // SET statement_timeout, and the client's own limit a little above it.
  absl::Status SetStatementTimeout(absl::Duration d) {
    client_timeout_ = d + absl::Seconds(5);
    return ExecScript(
        absl::StrCat("SET statement_timeout = ", std::max<int64_t>(1, absl::ToInt64Milliseconds(d)))
            .c_str(),
        "set the statement timeout");
  }

  // One statement with parameters; results in binary format.
  absl::StatusOr<Result> Exec(const char* sql, const Params& p, absl::string_view op) {
    if (broken_) {
      return absl::UnavailableError(absl::StrCat("postgres ", op, ": connection lost"));
    }
    if (PQsendQueryParams(conn_, sql, p.size(), nullptr, p.values(), p.lengths(), p.formats(),
                          /*resultFormat=*/1) == 0) {
      return Broken(op);
    }
    return Await(op);
  }

  // Statements without parameters (several allowed); the last result, or the first error.
  absl::Status ExecScript(const char* sql, absl::string_view op) {
    if (broken_) {
      return absl::UnavailableError(absl::StrCat("postgres ", op, ": connection lost"));
    }
    if (PQsendQuery(conn_, sql) == 0) {
      return Broken(op);
    }
    return Await(op).status();
  }

  // Whether an idle connection can be handed out: nothing may have arrived on it meanwhile
  // (the server's "terminating connection" message, or the end of the stream, after a
  // restart).
  bool IdleAndHealthy() {
    if (broken_ || PQstatus(conn_) != CONNECTION_OK) {
      return false;
    }
    pollfd p{PQsocket(conn_), POLLIN, 0};
    return poll(&p, 1, 0) == 0;
  }

  bool broken() const { return broken_ || PQstatus(conn_) != CONNECTION_OK; }
  PGconn* raw() { return conn_; }

 private:
  PgConn(PGconn* c, absl::Duration statement_timeout)
      : conn_(c), client_timeout_(statement_timeout + absl::Seconds(5)) {}

  absl::Status Broken(absl::string_view op) {
    broken_ = true;
    return absl::UnavailableError(absl::StrCat("postgres ", op, ": ", ConnMessage(conn_)));
  }

  absl::StatusOr<Result> Await(absl::string_view op) {
    const absl::Time deadline = absl::Now() + client_timeout_;
    const int fd = PQsocket(conn_);
    // Send everything first (non-blocking mode).
    while (true) {
      const int f = PQflush(conn_);
      if (f == 0) {
        break;
      }
      if (f < 0) {
        return Broken(op);
      }
      const short ev = WaitFd(fd, POLLIN | POLLOUT, deadline);
      if (ev == 0) {
        broken_ = true;
        return absl::UnavailableError(absl::StrCat("postgres ", op, ": no answer in time"));
      }
      if ((ev & POLLIN) != 0 && PQconsumeInput(conn_) == 0) {
        return Broken(op);
      }
    }
    Result first_error;
    Result last;
    while (true) {
      if (PQconsumeInput(conn_) == 0) {
        return Broken(op);
      }
      while (PQisBusy(conn_) == 0) {
        Result r(PQgetResult(conn_));
        if (r == nullptr) {
          if (PQstatus(conn_) != CONNECTION_OK) {
            broken_ = true;
            return absl::UnavailableError(
                absl::StrCat("postgres ", op, ": connection lost: ", ConnMessage(conn_)));
          }
          if (first_error != nullptr) {
            return StatementError(first_error.get(), op);
          }
          return last;
        }
        const ExecStatusType st = PQresultStatus(r.get());
        if (st == PGRES_TUPLES_OK || st == PGRES_COMMAND_OK || st == PGRES_EMPTY_QUERY) {
          last = std::move(r);
        } else if (first_error == nullptr) {
          first_error = std::move(r);
        }
      }
      const short ev = WaitFd(fd, POLLIN, deadline);
      if (ev == 0) {
        // The server's statement_timeout fires first; this is a server that does not answer
        // at all. The connection is in an unknown state: drop it.
        broken_ = true;
        return absl::UnavailableError(absl::StrCat("postgres ", op, ": no answer in time"));
      }
    }
  }

  PGconn* const conn_;
  absl::Duration client_timeout_;
  bool broken_ = false;
};

absl::StatusOr<Result> Exec(PgConn& c, const char* sql, const Params& p, absl::string_view op) {
  return c.Exec(sql, p, op);
}

std::string RandomHex(int bytes) {
  std::random_device rd;
  std::string out;
  for (int i = 0; i < bytes; ++i) {
    absl::StrAppendFormat(&out, "%02x", rd() & 0xff);
  }
  return out;
}

std::string DefaultInstanceId() {
  char host[256] = {0};
  if (gethostname(host, sizeof(host) - 1) != 0) {
    std::strcpy(host, "unknown");
  }
  return absl::StrCat(host, ":", getpid(), ":", RandomHex(6));
}

ConnectionRow ReadConnectionRow(const Rows& rows, int i) {
  ConnectionRow r;
  r.id = rows.Bytes(i, 0);
  r.provider = rows.Bytes(i, 1);
  r.status = static_cast<int>(rows.Int(i, 2));
  r.generation = static_cast<uint64_t>(rows.Int(i, 3));
  r.revision = static_cast<uint64_t>(rows.Int(i, 4));
  r.refresh_at_unix_ms = rows.OptInt(i, 5);
  r.updated_at_unix_ms = rows.Int(i, 6);
  r.meta = rows.Bytes(i, 7);
  r.sealed.key_id = rows.Bytes(i, 8);
  r.sealed.nonce = rows.Bytes(i, 9);
  r.sealed.ciphertext = rows.Bytes(i, 10);
  return r;
}

// $1..$11 of kCreateSql and kUpdateSql.
Params ConnectionParams(const ConnectionRow& r) {
  Params p;
  p.Text(r.id)
      .Text(r.provider)
      .Int(r.status)
      .Int(static_cast<int64_t>(r.generation))
      .Int(static_cast<int64_t>(r.revision))
      .OptInt(r.refresh_at_unix_ms)
      .Int(r.updated_at_unix_ms)
      .Bytes(r.meta)
      .Text(r.sealed.key_id)
      .Bytes(r.sealed.nonce)
      .Bytes(r.sealed.ciphertext);
  return p;
}

struct StoredLink {
  LinkRow row;
  int64_t revision = 0;
};

StoredLink ReadLinkRow(const Rows& rows, int i) {
  StoredLink l;
  l.row.link_id = rows.Bytes(i, 0);
  l.row.connection_id = rows.Bytes(i, 1);
  l.row.expires_at_unix_ms = rows.Int(i, 2);
  l.revision = rows.Int(i, 3);
  l.row.sealed.key_id = rows.Bytes(i, 4);
  l.row.sealed.nonce = rows.Bytes(i, 5);
  l.row.sealed.ciphertext = rows.Bytes(i, 6);
  return l;
}

// Opening: the schema and the key checks, on a connection of its own that holds the advisory
// lock (closing it releases the lock, whatever happened).
absl::Status MigrateAndCheckKeys(PgConn& c, const core::Cipher& cipher,
                                 const std::string& instance_id,
                                 const PostgresStoreOptions& options) {
  TB_RETURN_IF_ERROR(c.SetStatementTimeout(options.migration_lock_timeout));
  TB_RETURN_IF_ERROR(Exec(c, "SELECT pg_advisory_lock($1::bigint)", Params().Int(kMigrationLockKey),
                          "take the migration lock")
                         .status());
  TB_RETURN_IF_ERROR(c.ExecScript(kBootstrapSql, "create schema_meta"));
  TB_ASSIGN_OR_RETURN(Result version_result, Exec(c, "SELECT version FROM schema_meta WHERE id = 1",
                                                  Params(), "read the schema version"));
  const Rows version_rows(version_result.get());
  const int db_version = version_rows.size() > 0 ? static_cast<int>(version_rows.Int(0, 0)) : 0;
  TB_RETURN_IF_ERROR(CheckSchemaVersion(db_version, PostgresStore::kSchemaVersion));
  for (const Migration& m : kMigrations) {
    if (m.version <= db_version) {
      continue;
    }
    TB_RETURN_IF_ERROR(c.ExecScript("BEGIN", "begin a migration"));
    TB_RETURN_IF_ERROR(c.ExecScript(m.sql, absl::StrCat("migrate to version ", m.version)));
    TB_RETURN_IF_ERROR(Exec(c,
                            "INSERT INTO schema_migrations (version, applied_by) "
                            "VALUES ($1::integer, $2)",
                            Params().Int(m.version).Text(instance_id), "record a migration")
                           .status());
    TB_RETURN_IF_ERROR(
        Exec(c,
             "INSERT INTO schema_meta (id, version) VALUES (1, $1::integer) "
             "ON CONFLICT (id) DO UPDATE SET version = EXCLUDED.version, updated_at = now()",
             Params().Int(m.version), "write the schema version")
            .status());
    TB_RETURN_IF_ERROR(c.ExecScript("COMMIT", "commit a migration"));
    spdlog::info("postgres store: schema migrated to version {} (instance {})", m.version,
                 instance_id);
  }

  // Key checks.
  const std::vector<std::string> ids = cipher.key_ids();
  const absl::flat_hash_set<std::string> configured(ids.begin(), ids.end());
  TB_ASSIGN_OR_RETURN(Result used,
                      Exec(c,
                           "SELECT key_id FROM connections UNION SELECT key_id FROM links "
                           "UNION SELECT key_id FROM authorizations",
                           Params(), "list the key ids in use"));
  const Rows used_rows(used.get());
  for (int i = 0; i < used_rows.size(); ++i) {
    const std::string id = used_rows.Bytes(i, 0);
    if (!configured.contains(id)) {
      return absl::FailedPreconditionError(absl::StrCat(
          "rows in the PostgreSQL store are sealed with the key id \"", id,
          "\", which is not configured: add that key back to the key file (a key may be "
          "removed only after rotation has re-sealed every row under a newer one)"));
    }
  }
  const std::string current = cipher.current_key_id();
  TB_ASSIGN_OR_RETURN(const std::string current_check, cipher.KeyCheck(current));
  TB_RETURN_IF_ERROR(Exec(c,
                          "INSERT INTO key_checks (key_id, key_check) VALUES ($1, $2::bytea) "
                          "ON CONFLICT (key_id) DO NOTHING",
                          Params().Text(current).Bytes(current_check), "record a key check")
                         .status());
  TB_ASSIGN_OR_RETURN(Result checks, Exec(c, "SELECT key_id, key_check FROM key_checks", Params(),
                                          "read the key checks"));
  const Rows check_rows(checks.get());
  for (int i = 0; i < check_rows.size(); ++i) {
    const std::string id = check_rows.Bytes(i, 0);
    if (!configured.contains(id)) {
      continue;  // a retired key: no row uses it any more (checked above)
    }
    TB_ASSIGN_OR_RETURN(const std::string check, cipher.KeyCheck(id));
    if (check != check_rows.Bytes(i, 1)) {
      return absl::FailedPreconditionError(absl::StrCat(
          "the key configured under the id \"", id,
          "\" is not the key that sealed the PostgreSQL store's rows under that id: configure "
          "the original key bytes for \"",
          id, "\""));
    }
  }
  return Exec(c, "SELECT pg_advisory_unlock($1::bigint)", Params().Int(kMigrationLockKey),
              "release the migration lock")
      .status();
}

}  // namespace

// ---- Pool ----------------------------------------------------------------------------------

// Up to `size` connections, opened on demand. A connection found broken when it comes back is
// closed; its slot is re-opened by the next call that needs one.
class PostgresStore::Pool {
 public:
  Pool(ConnSettings settings, size_t size) : settings_(std::move(settings)), size_(size) {}

  ~Pool() {
    MutexLock lock(&mu_);
    idle_.clear();
  }

  // Exclusive use of one connection until destroyed.
  class Handle {
   public:
    Handle(Pool* pool, std::unique_ptr<PgConn> conn) : pool_(pool), conn_(std::move(conn)) {}
    Handle(Handle&& other) = default;
    Handle& operator=(Handle&&) = delete;
    ~Handle() {
      if (conn_ != nullptr) {
        pool_->Put(std::move(conn_));
      }
    }
    PgConn& operator*() { return *conn_; }
    PgConn* operator->() { return conn_.get(); }

   private:
    Pool* pool_;
    std::unique_ptr<PgConn> conn_;
  };

  // Errors: UNAVAILABLE (cannot connect; every connection busy for a statement timeout).
  absl::StatusOr<Handle> Get() ABSL_LOCKS_EXCLUDED(mu_) {
    const absl::Time deadline = absl::Now() + settings_.statement_timeout;
    std::unique_ptr<PgConn> conn;
    {
      MutexLock lock(&mu_);
      while (idle_.empty() && open_ >= size_) {
        const absl::Duration left = deadline - absl::Now();
        if (left <= absl::ZeroDuration()) {
          return absl::UnavailableError(
              absl::StrCat("postgres: all ", size_, " pooled connections are busy"));
        }
        cv_.WaitFor(&mu_, absl::ToChronoMilliseconds(left));
      }
      if (!idle_.empty()) {
        conn = std::move(idle_.back());
        idle_.pop_back();
      } else {
        ++open_;  // this slot is ours; connected below, outside the lock
      }
    }
    if (conn != nullptr && conn->IdleAndHealthy()) {
      return Handle(this, std::move(conn));
    }
    conn.reset();  // closed by the server meanwhile (restart): replaced in the same slot
    absl::StatusOr<std::unique_ptr<PgConn>> fresh = PgConn::Connect(settings_, "token-broker");
    if (!fresh.ok()) {
      MutexLock lock(&mu_);
      --open_;
      cv_.SignalAll();
      return fresh.status();
    }
    return Handle(this, *std::move(fresh));
  }

  size_t open() const ABSL_LOCKS_EXCLUDED(mu_) {
    MutexLock lock(&mu_);
    return open_;
  }

  const ConnSettings& settings() const { return settings_; }

 private:
  void Put(std::unique_ptr<PgConn> conn) ABSL_LOCKS_EXCLUDED(mu_) {
    const bool broken = conn->broken();
    if (broken) {
      spdlog::debug("postgres store: dropped a broken pooled connection; re-opened on next use");
      conn.reset();  // close outside the lock
    }
    MutexLock lock(&mu_);
    if (broken) {
      --open_;
    } else {
      idle_.push_back(std::move(conn));
    }
    cv_.SignalAll();
  }

  const ConnSettings settings_;
  const size_t size_;
  mutable Mutex mu_;
  CondVar cv_;
  std::vector<std::unique_ptr<PgConn>> idle_ ABSL_GUARDED_BY(mu_);
  size_t open_ ABSL_GUARDED_BY(mu_) = 0;
};

// ---- Change feed ---------------------------------------------------------------------------

// The thread behind WatchRemoteChanges. Everything but the stop signal is confined to that
// thread (and to Open, before the thread starts).
class PostgresStore::Feed {
 public:
  Feed(Pool& pool, std::string instance_id, absl::Duration poll_interval)
      : pool_(pool), me_(std::move(instance_id)), poll_interval_(poll_interval) {
    wake_fd_ = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  }

  ~Feed() {
    stop_.store(true);
    if (wake_fd_ >= 0) {
      const uint64_t one = 1;
      (void)!write(wake_fd_, &one, sizeof(one));
    }
    if (thread_.joinable()) {
      thread_.join();
    }
    if (wake_fd_ >= 0) {
      close(wake_fd_);
    }
  }

  // The starting point: the change_seq of every connection (and tombstone) as of Open.
  absl::Status Baseline() {
    std::vector<core::ConnectionId> ignored;
    return Poll(&ignored);
  }

  void Start(std::function<void(const core::ConnectionId&)> on_change) {
    if (started_.exchange(true)) {
      return;
    }
    on_change_ = std::move(on_change);
    thread_ = std::thread([this] { Run(); });
  }

 private:
  void Run() {
    absl::Time next_poll = absl::InfinitePast();  // poll at once: changes since Open
    absl::Time next_listen_attempt = absl::InfinitePast();
    while (!stop_.load()) {
      const absl::Time now = absl::Now();
      if (listen_ == nullptr && now >= next_listen_attempt) {
        if (const absl::Status s = Listen(); s.ok()) {
          if (!listening_logged_) {
            spdlog::info("postgres change feed: listening on {} (instance {})", kChannel, me_);
            listening_logged_ = true;
          }
          next_poll = now;  // whatever happened while we were not listening
        } else {
          listen_.reset();
          next_listen_attempt = now + poll_interval_;
          if (listening_logged_) {
            spdlog::warn("postgres change feed: cannot listen ({}); polling every {} ms",
                         std::string(s.message()), absl::ToInt64Milliseconds(poll_interval_));
            listening_logged_ = false;
          }
        }
      }
      std::vector<core::ConnectionId> changed;
      if (absl::Now() >= next_poll) {
        if (const absl::Status s = Poll(&changed); !s.ok()) {
          // Retried at the next interval; said once per outage.
          if (!poll_failing_) {
            spdlog::warn("postgres change feed: poll failed ({}); retrying every {} ms",
                         std::string(s.message()), absl::ToInt64Milliseconds(poll_interval_));
          }
          poll_failing_ = true;
        } else {
          poll_failing_ = false;
        }
        next_poll = absl::Now() + poll_interval_;
      }
      Deliver(changed);
      changed.clear();

      absl::Time wake_at = next_poll;
      if (listen_ == nullptr) {
        wake_at = std::min(wake_at, next_listen_attempt);
      }
      pollfd fds[2] = {{wake_fd_, POLLIN, 0}, {-1, POLLIN, 0}};
      if (listen_ != nullptr) {
        fds[1].fd = PQsocket(listen_->raw());
      }
      const int ms = static_cast<int>(
          std::clamp<int64_t>(absl::ToInt64Milliseconds(wake_at - absl::Now()) + 1, 0, 60'000));
      const int rc = poll(fds, 2, ms);
      if (rc < 0 && errno != EINTR) {
        continue;
      }
      if (stop_.load()) {
        break;
      }
      if (listen_ != nullptr && (fds[1].revents & (POLLIN | POLLERR | POLLHUP)) != 0) {
        if (PQconsumeInput(listen_->raw()) == 0 || PQstatus(listen_->raw()) != CONNECTION_OK) {
          spdlog::warn(
              "postgres change feed: listen connection lost; reconnecting, and polling "
              "meanwhile");
          listening_logged_ = false;
          listen_.reset();  // re-established (and followed by a poll) on the next turn
          next_listen_attempt = absl::Now();
        } else {
          while (PGnotify* n = PQnotifies(listen_->raw())) {
            Note(n->extra, &changed);
            PQfreemem(n);
          }
          // Anything else that arrived (a result to nothing we sent) is discarded.
          while (PQisBusy(listen_->raw()) == 0) {
            PGresult* r = PQgetResult(listen_->raw());
            if (r == nullptr) {
              break;
            }
            PQclear(r);
          }
        }
      }
      Deliver(changed);
    }
  }

  absl::Status Listen() {
    TB_ASSIGN_OR_RETURN(listen_, PgConn::Connect(pool_.settings(), "token-broker-feed"));
    return listen_->ExecScript("LISTEN tokenbroker_changes", "listen for changes");
  }

  // "<instance> <change_seq> <connection id>".
  void Note(absl::string_view payload, std::vector<core::ConnectionId>* changed) {
    const std::vector<absl::string_view> parts = absl::StrSplit(payload, absl::MaxSplits(' ', 2));
    int64_t seq = 0;
    if (parts.size() != 3 || !absl::SimpleAtoi(parts[1], &seq)) {
      return;
    }
    Saw(std::string(parts[2]), seq, parts[0], changed);
  }

  void Saw(const std::string& id, int64_t seq, absl::string_view by,
           std::vector<core::ConnectionId>* changed) {
    auto [it, inserted] = seen_.try_emplace(id, seq);
    if (!inserted) {
      if (seq <= it->second) {
        return;  // already known (a notification and a poll saw the same change)
      }
      it->second = seq;
    }
    if (by != me_) {
      changed->push_back(id);
    }
  }

  absl::Status Poll(std::vector<core::ConnectionId>* changed) {
    TB_ASSIGN_OR_RETURN(Pool::Handle conn, pool_.Get());
    if (polls_++ % 1800 == 0) {  // about hourly
      TB_RETURN_IF_ERROR(
          Exec(*conn, kPruneTombstonesSql, Params(), "prune connection tombstones").status());
    }
    TB_ASSIGN_OR_RETURN(Result r, Exec(*conn, kChangesSql, Params(), "poll for changes"));
    const Rows rows(r.get());
    // A connection that was deleted and created again has both a row and a tombstone: the
    // higher change_seq is the latest change.
    absl::flat_hash_map<std::string, std::pair<int64_t, std::string>> latest;
    for (int i = 0; i < rows.size(); ++i) {
      const int64_t seq = rows.Int(i, 1);
      auto [it, inserted] = latest.try_emplace(rows.Bytes(i, 0), seq, rows.Bytes(i, 2));
      if (!inserted && seq > it->second.first) {
        it->second = {seq, rows.Bytes(i, 2)};
      }
    }
    for (const auto& [id, change] : latest) {
      Saw(id, change.first, change.second, changed);
    }
    // Gone from both tables (a tombstone older than a day was pruned): forget it.
    for (auto it = seen_.begin(); it != seen_.end();) {
      if (!latest.contains(it->first)) {
        seen_.erase(it++);
      } else {
        ++it;
      }
    }
    return absl::OkStatus();
  }

  void Deliver(const std::vector<core::ConnectionId>& changed) {
    for (const core::ConnectionId& id : changed) {
      on_change_(id);
    }
  }

  Pool& pool_;
  const std::string me_;
  const absl::Duration poll_interval_;
  int wake_fd_ = -1;
  std::atomic<bool> stop_{false};
  std::atomic<bool> started_{false};
  std::thread thread_;
  std::function<void(const core::ConnectionId&)> on_change_;
  // Confined to the thread.
  std::unique_ptr<PgConn> listen_;
  absl::flat_hash_map<std::string, int64_t> seen_;
  uint64_t polls_ = 0;
  bool listening_logged_ = false;  // "listening" was said and not taken back since
  bool poll_failing_ = false;
};

// ---- Rotation state --------------------------------------------------------------------------

struct PostgresStore::Rotation {
  Mutex mu;
  absl::flat_hash_set<std::tuple<int, std::string, std::string>> unreadable ABSL_GUARDED_BY(mu);
};

// ---- PostgresStore -------------------------------------------------------------------------

absl::StatusOr<std::unique_ptr<PostgresStore>> PostgresStore::Open(absl::string_view url,
                                                                   const core::Cipher& cipher,
                                                                   PostgresStoreOptions options) {
  TB_ASSIGN_OR_RETURN(ConnSettings settings, ParseUrl(url, options));
  std::string instance_id = options.instance_id.empty() ? DefaultInstanceId() : options.instance_id;
  {
    TB_ASSIGN_OR_RETURN(std::unique_ptr<PgConn> migrator,
                        PgConn::Connect(settings, "token-broker-migrate"));
    TB_RETURN_IF_ERROR(MigrateAndCheckKeys(*migrator, cipher, instance_id, options));
  }
  auto pool = std::make_unique<Pool>(std::move(settings), options.pool_size);
  std::unique_ptr<PostgresStore> store(
      new PostgresStore(std::move(instance_id), cipher, std::move(options), std::move(pool)));
  TB_RETURN_IF_ERROR(store->feed_->Baseline());
  return store;
}

PostgresStore::PostgresStore(std::string instance_id, const core::Cipher& cipher,
                             PostgresStoreOptions options, std::unique_ptr<Pool> pool)
    : instance_id_(std::move(instance_id)),
      cipher_(cipher),
      options_(std::move(options)),
      clock_(options_.clock != nullptr ? *options_.clock : system_clock_),
      pool_(std::move(pool)),
      rotation_(std::make_unique<Rotation>()),
      feed_(std::make_unique<Feed>(*pool_, instance_id_, options_.poll_interval)) {}

PostgresStore::~PostgresStore() {
  feed_.reset();  // the thread uses the pool
}

size_t PostgresStore::open_connections() const { return pool_->open(); }

void PostgresStore::WatchRemoteChanges(std::function<void(const core::ConnectionId&)> on_change) {
  feed_->Start(std::move(on_change));
}

absl::StatusOr<std::vector<core::Connection>> PostgresStore::LoadAll() {
  Result r;
  {
    TB_ASSIGN_OR_RETURN(Pool::Handle conn, pool_->Get());
    TB_ASSIGN_OR_RETURN(r, Exec(*conn, kLoadAllSql, Params(), "load connections"));
  }
  const Rows rows(r.get());
  std::vector<core::Connection> out;
  out.reserve(rows.size());
  for (int i = 0; i < rows.size(); ++i) {
    out.push_back(DecodeOrUnreadable(ReadConnectionRow(rows, i), cipher_));
  }
  return out;
}

size_t PostgresStore::ConnectionCountHint() {
  // An error here is the load's to report (it reads the same table next).
  absl::StatusOr<Pool::Handle> conn = pool_->Get();
  if (!conn.ok()) {
    return 0;
  }
  absl::StatusOr<Result> r = Exec(**conn, kCountConnectionsSql, Params(), "count connections");
  if (!r.ok()) {
    return 0;
  }
  const Rows rows(r->get());
  return rows.size() > 0 ? static_cast<size_t>(std::max<int64_t>(0, rows.Int(0, 0))) : 0;
}

absl::StatusOr<core::Connection> PostgresStore::Load(const core::ConnectionId& id) {
  Result r;
  {
    TB_ASSIGN_OR_RETURN(Pool::Handle conn, pool_->Get());
    TB_ASSIGN_OR_RETURN(r, Exec(*conn, kLoadSql, Params().Text(id), "load a connection"));
  }
  const Rows rows(r.get());
  if (rows.size() == 0) {
    return absl::NotFoundError("no such connection");
  }
  return DecodeOrUnreadable(ReadConnectionRow(rows, 0), cipher_);
}

absl::Status PostgresStore::Create(const core::Connection& c) {
  TB_ASSIGN_OR_RETURN(const ConnectionRow row, EncodeConnection(c, cipher_));
  Params p = ConnectionParams(row);
  p.Text(instance_id_);
  TB_ASSIGN_OR_RETURN(Pool::Handle conn, pool_->Get());
  TB_ASSIGN_OR_RETURN(Result r, Exec(*conn, kCreateSql, p, "insert a connection"));
  if (Rows(r.get()).size() == 0) {
    return absl::AlreadyExistsError("connection already exists");
  }
  return absl::OkStatus();
}

absl::Status PostgresStore::Update(const core::Connection& c, uint64_t expected_revision,
                                   const core::Lease* fence) {
  TB_ASSIGN_OR_RETURN(Pool::Handle conn, pool_->Get());
  // The stored row, to carry over what a newer release wrote into it (record_codec.h). Read
  // outside any transaction: the compare-and-set below refuses the write if it changed since.
  ConnectionRow previous;
  {
    TB_ASSIGN_OR_RETURN(Result r, Exec(*conn, kLoadSql, Params().Text(c.id), "load a connection"));
    const Rows rows(r.get());
    if (rows.size() == 0) {
      return absl::NotFoundError("no such connection");
    }
    previous = ReadConnectionRow(rows, 0);
  }
  if (previous.revision != expected_revision) {
    return absl::AbortedError("connection changed concurrently; reload and retry");
  }
  TB_ASSIGN_OR_RETURN(const ConnectionRow row, EncodeConnection(c, cipher_, &previous));
  Params p = ConnectionParams(row);
  p.Text(instance_id_)
      .Text(fence != nullptr ? fence->owner : "")
      .Int(fence != nullptr ? static_cast<int64_t>(fence->fence) : 0)
      .Int(static_cast<int64_t>(expected_revision))
      .Bool(fence != nullptr);
  TB_ASSIGN_OR_RETURN(Result r, Exec(*conn, kUpdateSql, p, "update a connection"));
  if (Rows(r.get()).size() == 1) {
    return absl::OkStatus();
  }
  // Nothing written: gone, changed, or the lease was taken over.
  TB_ASSIGN_OR_RETURN(Result again, Exec(*conn, "SELECT 1 FROM connections WHERE id = $1",
                                         Params().Text(c.id), "look a connection up"));
  if (Rows(again.get()).size() == 0) {
    return absl::NotFoundError("no such connection");
  }
  return absl::AbortedError(
      "connection changed concurrently or its refresh lease was taken over; reload and retry");
}

absl::Status PostgresStore::Delete(const core::ConnectionId& id) {
  TB_ASSIGN_OR_RETURN(Pool::Handle conn, pool_->Get());
  TB_ASSIGN_OR_RETURN(Result r, Exec(*conn, kDeleteSql, Params().Text(id).Text(instance_id_),
                                     "delete a connection"));
  if (Rows(r.get()).size() == 0) {
    return absl::NotFoundError("no such connection");
  }
  return absl::OkStatus();
}

absl::StatusOr<std::optional<core::Lease>> PostgresStore::AcquireLease(const core::ConnectionId& id,
                                                                       absl::Duration ttl) {
  if (ttl <= absl::ZeroDuration()) {
    return absl::InvalidArgumentError("a lease needs a positive ttl");
  }
  // Read before the statement: the expiry we report errs early by the round trip.
  const absl::Time before = clock_.Now();
  TB_ASSIGN_OR_RETURN(Pool::Handle conn, pool_->Get());
  TB_ASSIGN_OR_RETURN(Result r,
                      Exec(*conn, kAcquireLeaseSql,
                           Params().Text(id).Text(instance_id_).Int(absl::ToInt64Microseconds(ttl)),
                           "acquire a refresh lease"));
  const Rows rows(r.get());
  if (rows.size() == 0) {
    return std::optional<core::Lease>();
  }
  core::Lease lease;
  lease.id = id;
  lease.owner = instance_id_;
  lease.fence = static_cast<uint64_t>(rows.Int(0, 0));
  lease.expires_at = before + absl::Microseconds(rows.Int(0, 1));
  return std::optional<core::Lease>(std::move(lease));
}

absl::Status PostgresStore::ReleaseLease(const core::Lease& lease) {
  TB_ASSIGN_OR_RETURN(Pool::Handle conn, pool_->Get());
  return Exec(*conn, kReleaseLeaseSql,
              Params().Text(lease.id).Text(lease.owner).Int(static_cast<int64_t>(lease.fence)),
              "release a refresh lease")
      .status();
}

// ---- FlowStore -----------------------------------------------------------------------------

absl::Status PostgresStore::PutLink(const core::LinkRecord& record) {
  TB_ASSIGN_OR_RETURN(const LinkRow row, EncodeLink(record, cipher_));
  TB_ASSIGN_OR_RETURN(Pool::Handle conn, pool_->Get());
  return Exec(*conn, kPutLinkSql,
              Params()
                  .Text(row.link_id)
                  .Text(row.connection_id)
                  .Int(row.expires_at_unix_ms)
                  .Text(row.sealed.key_id)
                  .Bytes(row.sealed.nonce)
                  .Bytes(row.sealed.ciphertext),
              "store a link")
      .status();
}

absl::StatusOr<core::LinkRecord> PostgresStore::GetLink(const std::string& link_id) {
  Result r;
  {
    TB_ASSIGN_OR_RETURN(Pool::Handle conn, pool_->Get());
    TB_ASSIGN_OR_RETURN(r, Exec(*conn, kGetLinkSql, Params().Text(link_id), "load a link"));
  }
  const Rows rows(r.get());
  if (rows.size() == 0) {
    return absl::NotFoundError("no such link");
  }
  return DecodeLink(ReadLinkRow(rows, 0).row, cipher_);
}

absl::Status PostgresStore::ModifyLink(const std::string& link_id,
                                       const std::function<void(core::LinkRecord&)>& change) {
  // Compare-and-set on the link's revision; another replica's concurrent change makes us
  // read again.
  constexpr int kAttempts = 5;
  for (int attempt = 0; attempt < kAttempts; ++attempt) {
    TB_ASSIGN_OR_RETURN(Pool::Handle conn, pool_->Get());
    TB_ASSIGN_OR_RETURN(Result r, Exec(*conn, kGetLinkSql, Params().Text(link_id), "load a link"));
    const Rows rows(r.get());
    if (rows.size() == 0) {
      return absl::NotFoundError("no such link");
    }
    const StoredLink link = ReadLinkRow(rows, 0);
    TB_ASSIGN_OR_RETURN(core::LinkRecord record, DecodeLink(link.row, cipher_));
    change(record);
    TB_ASSIGN_OR_RETURN(const LinkRow row, EncodeLink(record, cipher_));
    TB_ASSIGN_OR_RETURN(Result w, Exec(*conn, kRewriteLinkSql,
                                       Params()
                                           .Text(link_id)
                                           .Int(link.revision)
                                           .Text(row.sealed.key_id)
                                           .Bytes(row.sealed.nonce)
                                           .Bytes(row.sealed.ciphertext),
                                       "update a link"));
    const char* affected = PQcmdTuples(w.get());
    if (affected != nullptr && std::strcmp(affected, "1") == 0) {
      return absl::OkStatus();
    }
  }
  return absl::AbortedError("link changed concurrently; retry");
}

absl::Status PostgresStore::RevokeLink(const std::string& link_id) {
  return ModifyLink(link_id, [](core::LinkRecord& r) { r.revoked = true; });
}

absl::Status PostgresStore::MarkLinkUsed(const std::string& link_id, absl::Time when) {
  return ModifyLink(link_id, [when](core::LinkRecord& r) { r.used_at = when; });
}

absl::Status PostgresStore::PutAuthorization(const core::PendingAuthorization& auth,
                                             absl::Time now) {
  TB_ASSIGN_OR_RETURN(const AuthorizationRow row, EncodeAuthorization(auth, cipher_));
  TB_ASSIGN_OR_RETURN(Pool::Handle conn, pool_->Get());
  Params p;
  p.Bytes(row.state_hash)
      .Int(row.expires_at_unix_ms)
      .Text(row.sealed.key_id)
      .Bytes(row.sealed.nonce)
      .Bytes(row.sealed.ciphertext)
      .Int(static_cast<int64_t>(options_.max_pending_authorizations));
  for (int attempt = 0; attempt < 2; ++attempt) {
    TB_ASSIGN_OR_RETURN(Result r, Exec(*conn, kPutAuthorizationSql, p, "store an authorization"));
    const char* affected = PQcmdTuples(r.get());
    if (affected != nullptr && std::strcmp(affected, "1") == 0) {
      return absl::OkStatus();
    }
    if (attempt == 0) {
      // At the cap: purge what expired strictly before this millisecond (the column is in
      // milliseconds, so `<` never removes one that is still valid), then try once more.
      TB_RETURN_IF_ERROR(Exec(*conn, kPurgeAuthorizationsSql, Params().Int(absl::ToUnixMillis(now)),
                              "purge expired authorizations")
                             .status());
    }
  }
  return absl::ResourceExhaustedError("too many authorizations in flight; try again later");
}

absl::StatusOr<core::PendingAuthorization> PostgresStore::TakeAuthorization(absl::string_view state,
                                                                            absl::Time now) {
  AuthorizationRow row;
  {
    TB_ASSIGN_OR_RETURN(Pool::Handle conn, pool_->Get());
    // DELETE ... RETURNING is one statement, hence one transaction: once it has run, the
    // state is gone, whatever happens next.
    TB_ASSIGN_OR_RETURN(Result r, Exec(*conn, kTakeAuthorizationSql,
                                       Params().Bytes(StateHash(state)), "take an authorization"));
    const Rows rows(r.get());
    if (rows.size() == 0) {
      return absl::NotFoundError("unknown state");
    }
    row.state_hash = rows.Bytes(0, 0);
    row.expires_at_unix_ms = rows.Int(0, 1);
    row.sealed.key_id = rows.Bytes(0, 2);
    row.sealed.nonce = rows.Bytes(0, 3);
    row.sealed.ciphertext = rows.Bytes(0, 4);
  }
  TB_ASSIGN_OR_RETURN(core::PendingAuthorization out, DecodeAuthorization(row, state, cipher_));
  if (out.expires_at <= now) {
    return absl::NotFoundError("expired state");
  }
  return out;
}

// ---- Key rotation --------------------------------------------------------------------------

absl::StatusOr<size_t> PostgresStore::CountNotUnderCurrentKey() {
  TB_ASSIGN_OR_RETURN(Pool::Handle conn, pool_->Get());
  TB_ASSIGN_OR_RETURN(Result r,
                      Exec(*conn, kCountNotUnderKeySql, Params().Text(cipher_.current_key_id()),
                           "count rows under old keys"));
  const Rows rows(r.get());
  return rows.size() > 0 ? static_cast<size_t>(rows.Int(0, 0)) : 0;
}

absl::StatusOr<core::RotationProgress> PostgresStore::ReencryptBatch(size_t max_rows) {
  if (max_rows == 0) {
    return absl::InvalidArgumentError("max_rows must be at least 1");
  }
  enum Table : int { kConnections = 0, kLinks = 1, kAuthorizations = 2 };
  struct Candidate {
    int table = kConnections;
    std::string key;  // primary key
    int64_t revision = 0;
    ConnectionRow connection;
    LinkRow link;
    AuthorizationRow authorization;
  };
  const std::string current = cipher_.current_key_id();
  absl::flat_hash_set<std::tuple<int, std::string, std::string>> known_unreadable;
  {
    MutexLock lock(&rotation_->mu);
    known_unreadable = rotation_->unreadable;
  }

  // 1. A batch of rows under old keys, skipping those known not to open.
  std::vector<Candidate> candidates;
  {
    TB_ASSIGN_OR_RETURN(Pool::Handle conn, pool_->Get());
    for (int t = 0; t < 3 && candidates.size() < max_rows; ++t) {
      TB_ASSIGN_OR_RETURN(Result r,
                          Exec(*conn, kUnderOldKeySql[t],
                               Params().Text(current).Int(static_cast<int64_t>(
                                   max_rows - candidates.size() + known_unreadable.size())),
                               "list rows under an old key"));
      const Rows rows(r.get());
      for (int i = 0; i < rows.size() && candidates.size() < max_rows; ++i) {
        Candidate c;
        c.table = t;
        switch (t) {
          case kConnections:
            c.connection = ReadConnectionRow(rows, i);
            c.key = c.connection.id;
            c.revision = static_cast<int64_t>(c.connection.revision);
            break;
          case kLinks: {
            StoredLink l = ReadLinkRow(rows, i);
            c.link = std::move(l.row);
            c.key = c.link.link_id;
            c.revision = l.revision;
            break;
          }
          default:
            c.authorization.state_hash = rows.Bytes(i, 0);
            c.authorization.expires_at_unix_ms = rows.Int(i, 1);
            c.authorization.sealed.key_id = rows.Bytes(i, 2);
            c.authorization.sealed.nonce = rows.Bytes(i, 3);
            c.authorization.sealed.ciphertext = rows.Bytes(i, 4);
            c.key = c.authorization.state_hash;
            break;
        }
        const std::string& nonce = t == kConnections ? c.connection.sealed.nonce
                                   : t == kLinks     ? c.link.sealed.nonce
                                                     : c.authorization.sealed.nonce;
        if (!known_unreadable.contains(std::make_tuple(t, c.key, nonce))) {
          candidates.push_back(std::move(c));
        }
      }
    }
  }

  // 2. Re-seal (no connection held) and write back, each row only if nothing rewrote it.
  core::RotationProgress progress;
  std::vector<std::tuple<int, std::string, std::string>> newly_unreadable;
  for (Candidate& c : candidates) {
    const core::Sealed& old = c.table == kConnections ? c.connection.sealed
                              : c.table == kLinks     ? c.link.sealed
                                                      : c.authorization.sealed;
    absl::StatusOr<core::Sealed> sealed =
        c.table == kConnections ? ResealConnection(c.connection, cipher_)
        : c.table == kLinks     ? ResealLink(c.link, cipher_)
                                : ResealAuthorization(c.authorization, cipher_);
    if (absl::IsDataLoss(sealed.status())) {
      // Left exactly as it is: it still answers DATA_LOSS until reconnected or deleted.
      newly_unreadable.emplace_back(c.table, c.key, old.nonce);
      continue;
    }
    if (!sealed.ok()) {
      return sealed.status();
    }
    Params p;
    if (c.table == kAuthorizations) {
      p.Bytes(c.key);
    } else {
      p.Text(c.key);
    }
    p.Text(sealed->key_id)
        .Bytes(sealed->nonce)
        .Bytes(sealed->ciphertext)
        .Int(c.revision)
        .Bytes(old.nonce);
    TB_ASSIGN_OR_RETURN(Pool::Handle conn, pool_->Get());
    TB_ASSIGN_OR_RETURN(Result w, Exec(*conn, kResealSql[c.table], p, "re-seal a row"));
    const char* affected = PQcmdTuples(w.get());
    if (affected != nullptr && std::strcmp(affected, "1") == 0) {
      ++progress.reencrypted;
    }
  }

  // 3. Forget unreadable rows that were since rewritten or deleted; count what is left.
  std::vector<std::tuple<int, std::string, std::string>> unreadable;
  {
    MutexLock lock(&rotation_->mu);
    for (auto& u : newly_unreadable) {
      rotation_->unreadable.insert(std::move(u));
    }
    unreadable.assign(rotation_->unreadable.begin(), rotation_->unreadable.end());
  }
  std::vector<std::tuple<int, std::string, std::string>> gone;
  {
    TB_ASSIGN_OR_RETURN(Pool::Handle conn, pool_->Get());
    for (const auto& u : unreadable) {
      const auto& [t, key, nonce] = u;
      Params p;
      if (t == kAuthorizations) {
        p.Bytes(key);
      } else {
        p.Text(key);
      }
      p.Bytes(nonce).Text(current);
      TB_ASSIGN_OR_RETURN(Result r,
                          Exec(*conn, kStillUnreadableSql[t], p, "look up an unreadable row"));
      if (Rows(r.get()).size() == 0) {
        gone.push_back(u);
      }
    }
  }
  {
    MutexLock lock(&rotation_->mu);
    for (const auto& u : gone) {
      rotation_->unreadable.erase(u);
    }
    progress.unreadable = rotation_->unreadable.size();
  }
  TB_ASSIGN_OR_RETURN(progress.remaining, CountNotUnderCurrentKey());
  return progress;
}

}  // namespace tb::store
