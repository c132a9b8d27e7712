#include "tests/support/postgres.h"

#include <libpq-fe.h>
#include <stdio.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cstdlib>
#include <memory>
#include <random>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/strip.h"
#include "gtest/gtest.h"

#ifndef TB_SOURCE_DIR
#error "TB_SOURCE_DIR must name the source tree (for scripts/postgres.sh)"
#endif

namespace tb::testing {
namespace {

constexpr char kStartHint[] =
    "TB_TEST_POSTGRES_URL is not set: the store tests need a real PostgreSQL 15. Start one "
    "with\n  eval \"$(bash scripts/postgres.sh start)\"\n(scripts/test.sh does this itself).";

struct ConnDeleter {
  void operator()(PGconn* c) const { PQfinish(c); }
};
struct ResultDeleter {
  void operator()(PGresult* r) const { PQclear(r); }
};
using ConnPtr = std::unique_ptr<PGconn, ConnDeleter>;
using ResultPtr = std::unique_ptr<PGresult, ResultDeleter>;

void IgnoreNotice(void*, const char*) {}

std::string PercentEncode(const std::string& s) {
  std::string out;
  for (const unsigned char ch : s) {
    if (absl::ascii_isalnum(ch) || ch == '-' || ch == '.' || ch == '_' || ch == '~') {
      out.push_back(static_cast<char>(ch));
    } else {
      absl::StrAppendFormat(&out, "%%%02X", ch);
    }
  }
  return out;
}

std::string RandomHex(int bytes) {
  std::random_device rd;
  std::string out;
  for (int i = 0; i < bytes; ++i) {
    absl::StrAppendFormat(&out, "%02x", rd() & 0xff);
  }
  return out;
}

// Runs `command` through /bin/sh and returns its standard output; its standard error goes to
// ours (the test log). Errors: INTERNAL when it exits non-zero.
absl::StatusOr<std::string> RunCommand(const std::string& command) {
  FILE* pipe = popen(command.c_str(), "r");
  if (pipe == nullptr) {
    return absl::InternalError(absl::StrCat("cannot run: ", command));
  }
  std::string out;
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof(buf), pipe)) > 0) {
    out.append(buf, n);
  }
  const int rc = pclose(pipe);
  if (rc != 0) {
    return absl::InternalError(absl::StrCat("`", command, "` failed (status ", rc, ")"));
  }
  return out;
}

}  // namespace

std::string TestPostgresUrl() {
  const char* url = std::getenv("TB_TEST_POSTGRES_URL");
  if (url == nullptr || *url == '\0') {
    ADD_FAILURE() << kStartHint;
    return "";
  }
  return url;
}

absl::StatusOr<std::string> PostgresUrlWithDatabase(const std::string& url,
                                                    const std::string& dbname) {
  if (!absl::StartsWith(url, "postgres://") && !absl::StartsWith(url, "postgresql://")) {
    return absl::InvalidArgumentError("not a postgres:// URL");
  }
  char* err = nullptr;
  PQconninfoOption* options = PQconninfoParse(url.c_str(), &err);
  if (options == nullptr) {
    PQfreemem(err);
    return absl::InvalidArgumentError("malformed postgres URL");
  }
  std::string user, password, host, port;
  for (PQconninfoOption* o = options; o->keyword != nullptr; ++o) {
    if (o->val == nullptr) {
      continue;
    }
    const absl::string_view k = o->keyword;
    if (k == "user") {
      user = o->val;
    } else if (k == "password") {
      password = o->val;
    } else if (k == "host") {
      host = o->val;
    } else if (k == "port") {
      port = o->val;
    }
  }
  PQconninfoFree(options);
  std::string out = "postgresql://";
  if (!user.empty()) {
    absl::StrAppend(&out, PercentEncode(user));
    if (!password.empty()) {
      absl::StrAppend(&out, ":", PercentEncode(password));
    }
    absl::StrAppend(&out, "@");
  }
  const bool socket_dir = absl::StartsWith(host, "/");
  if (!socket_dir) {
    absl::StrAppend(&out, host);
    if (!port.empty()) {
      absl::StrAppend(&out, ":", port);
    }
  }
  absl::StrAppend(&out, "/", PercentEncode(dbname));
  if (socket_dir) {
    absl::StrAppend(&out, "?host=", PercentEncode(host));
    if (!port.empty()) {
      absl::StrAppend(&out, "&port=", port);
    }
  }
  return out;
}

absl::StatusOr<PgRows> PgQuery(const std::string& url, const std::string& sql,
                               const std::vector<std::string>& params, bool binary) {
  ConnPtr conn(PQconnectdb(url.c_str()));
  if (conn == nullptr || PQstatus(conn.get()) != CONNECTION_OK) {
    return absl::UnavailableError(
        absl::StrCat("cannot connect: ", conn ? PQerrorMessage(conn.get()) : "out of memory"));
  }
  PQsetNoticeProcessor(conn.get(), IgnoreNotice, nullptr);
  std::vector<const char*> values;
  values.reserve(params.size());
  for (const std::string& p : params) {
    values.push_back(p.c_str());
  }
  ResultPtr res(PQexecParams(conn.get(), sql.c_str(), static_cast<int>(values.size()), nullptr,
                             values.data(), nullptr, nullptr, binary ? 1 : 0));
  const ExecStatusType st = res ? PQresultStatus(res.get()) : PGRES_FATAL_ERROR;
  if (st != PGRES_TUPLES_OK && st != PGRES_COMMAND_OK) {
    return absl::InternalError(absl::StrCat("`", sql, "`: ", PQerrorMessage(conn.get())));
  }
  PgRows rows;
  for (int r = 0; r < PQntuples(res.get()); ++r) {
    std::vector<std::optional<std::string>> row;
    for (int c = 0; c < PQnfields(res.get()); ++c) {
      if (PQgetisnull(res.get(), r, c)) {
        row.push_back(std::nullopt);
      } else {
        row.push_back(std::string(PQgetvalue(res.get(), r, c), PQgetlength(res.get(), r, c)));
      }
    }
    rows.push_back(std::move(row));
  }
  return rows;
}

// ---- TestDatabase --------------------------------------------------------------------------

TestDatabase::TestDatabase() : server_url_(TestPostgresUrl()) { Create(); }

TestDatabase::TestDatabase(std::string server_url) : server_url_(std::move(server_url)) {
  Create();
}

void TestDatabase::Create() {
  if (server_url_.empty()) {
    return;  // TestPostgresUrl() has failed the test already
  }
  static std::atomic<int> counter{0};
  name_ = absl::StrCat("tb_test_", getpid(), "_", counter.fetch_add(1), "_", RandomHex(4));
  const absl::StatusOr<PgRows> created =
      PgQuery(server_url_, absl::StrCat("CREATE DATABASE ", name_));
  if (!created.ok()) {
    ADD_FAILURE() << "cannot create the test database: " << created.status();
    name_.clear();
    return;
  }
  absl::StatusOr<std::string> url = PostgresUrlWithDatabase(server_url_, name_);
  if (!url.ok()) {
    ADD_FAILURE() << url.status();
    return;
  }
  url_ = *std::move(url);
}

TestDatabase::~TestDatabase() {
  if (name_.empty()) {
    return;
  }
  // FORCE: a test that failed half-way may leave connections open.
  const absl::StatusOr<PgRows> dropped =
      PgQuery(server_url_, absl::StrCat("DROP DATABASE IF EXISTS ", name_, " WITH (FORCE)"));
  if (!dropped.ok()) {
    ADD_FAILURE() << "cannot drop the test database " << name_ << ": " << dropped.status();
  }
}

// ---- PrivatePostgresServer -----------------------------------------------------------------

PrivatePostgresServer::PrivatePostgresServer() {
  // Directly under the temporary directory: as root the server runs as another user, who must
  // be able to reach the folder (the script creates it, 0700, owned by that user).
  std::string tmp = ::testing::TempDir();
  if (tmp.empty() || tmp.back() != '/') {
    tmp.push_back('/');
  }
  dir_ = absl::StrCat(tmp, "tb-pg-private.", getpid(), ".", RandomHex(4));
  absl::StatusOr<std::string> out = Script("start");
  if (!out.ok()) {
    ADD_FAILURE() << "cannot start a private PostgreSQL: " << out.status();
    return;
  }
  absl::string_view line = absl::StripTrailingAsciiWhitespace(*out);
  if (!absl::ConsumePrefix(&line, "export TB_TEST_POSTGRES_URL=")) {
    ADD_FAILURE() << "unexpected output of scripts/postgres.sh start: " << *out;
    return;
  }
  url_ = std::string(line);
}

PrivatePostgresServer::~PrivatePostgresServer() {
  const absl::StatusOr<std::string> out = Script("stop");
  if (!out.ok()) {
    ADD_FAILURE() << "cannot stop the private PostgreSQL: " << out.status();
  }
  unlink(absl::StrCat(dir_, ".lock").c_str());
}

absl::StatusOr<std::string> PrivatePostgresServer::Script(const std::string& command) {
  return RunCommand(absl::StrCat("TB_PG_DIR='", dir_, "' bash '", TB_SOURCE_DIR,
                                 "/scripts/postgres.sh' ", command));
}

absl::Status PrivatePostgresServer::Restart() { return Script("restart").status(); }
absl::Status PrivatePostgresServer::Pause() { return Script("pause").status(); }
absl::Status PrivatePostgresServer::Resume() { return Script("start").status(); }

}  // namespace tb::testing
