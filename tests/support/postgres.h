#ifndef TB_TESTS_SUPPORT_POSTGRES_H_
#define TB_TESTS_SUPPORT_POSTGRES_H_

// The real PostgreSQL the tests talk to. scripts/postgres.sh starts it (scripts/test.sh does so
// for the whole suite) and exports TB_TEST_POSTGRES_URL; a test that needs it and does not find
// it FAILS, it never skips:
//
//   eval "$(bash scripts/postgres.sh start)"
//
// Every test gets a database of its own (TestDatabase), so tests in parallel ctest processes
// never share state. Tests that stop or restart the server get a private server
// (PrivatePostgresServer) and leave the shared one alone.

#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace tb::testing {

// TB_TEST_POSTGRES_URL, a superuser's URL to the test server. When it is unset, fails the
// current test (ADD_FAILURE, saying how to start the server) and returns "".
std::string TestPostgresUrl();

// `url` (a postgres:// or postgresql:// URL) with its database name replaced by `dbname`
// (user, password, host, port kept; other parameters dropped). Errors: INVALID_ARGUMENT.
absl::StatusOr<std::string> PostgresUrlWithDatabase(const std::string& url,
                                                    const std::string& dbname);

// Rows of a query: each row's columns, NULL as nullopt. Text format, or raw bytes with
// `binary` (bytea columns then hold their exact bytes).
using PgRows = std::vector<std::vector<std::optional<std::string>>>;

// Runs one statement on a fresh libpq connection to `url`, with text parameters $1, $2, ...
// Errors: UNAVAILABLE (cannot connect), INTERNAL (the statement failed; the message is the
// server's).
absl::StatusOr<PgRows> PgQuery(const std::string& url, const std::string& sql,
                               const std::vector<std::string>& params = {}, bool binary = false);

// A database of its own on a PostgreSQL server, created with a unique name (pid, counter,
// random) and dropped, with FORCE, in the destructor. Failures are test failures
// (ADD_FAILURE); url() is then "" and every store open fails.
class TestDatabase {
 public:
  // On the server of TestPostgresUrl().
  TestDatabase();
  // On the server whose superuser URL is `server_url`.
  explicit TestDatabase(std::string server_url);
  ~TestDatabase();
  TestDatabase(const TestDatabase&) = delete;
  TestDatabase& operator=(const TestDatabase&) = delete;

  // URL of this database.
  const std::string& url() const { return url_; }
  const std::string& name() const { return name_; }

  // PgQuery on this database.
  absl::StatusOr<PgRows> Query(const std::string& sql, const std::vector<std::string>& params = {},
                               bool binary = false) const {
    return PgQuery(url_, sql, params, binary);
  }

 private:
  void Create();

  std::string server_url_;
  std::string name_;
  std::string url_;
};

// A PostgreSQL 15 server of this test's own (scripts/postgres.sh with a private TB_PG_DIR),
// for tests that stop or restart the server. Started by the constructor (a failure is a test
// failure and url() is ""), stopped and removed by the destructor. Not thread-safe.
class PrivatePostgresServer {
 public:
  PrivatePostgresServer();
  ~PrivatePostgresServer();
  PrivatePostgresServer(const PrivatePostgresServer&) = delete;
  PrivatePostgresServer& operator=(const PrivatePostgresServer&) = delete;

  // Superuser URL of its `postgres` database.
  const std::string& url() const { return url_; }

  // `pg_ctl restart -m fast`: every connection to it is terminated; it listens again, on the
  // same port, when this returns. Errors: INTERNAL.
  absl::Status Restart();
  // Stops the server, keeping its data: connections fail until Resume. Errors: INTERNAL.
  absl::Status Pause();
  // Starts it again after Pause, with its data, on the same port. Errors: INTERNAL.
  absl::Status Resume();

 private:
  absl::StatusOr<std::string> Script(const std::string& command);

  std::string dir_;
  std::string url_;
};

}  // namespace tb::testing

#endif  // TB_TESTS_SUPPORT_POSTGRES_H_
