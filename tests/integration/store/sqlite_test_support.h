#ifndef TB_TESTS_INTEGRATION_STORE_SQLITE_TEST_SUPPORT_H_
#define TB_TESTS_INTEGRATION_STORE_SQLITE_TEST_SUPPORT_H_

// SQLite test helpers: a raw connection to the database file, to do behind the store's back
// what a disk error, an operator or another release would, and the contract harness.

#include <sqlite3.h>

#include <fstream>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "server/src/store/sqlite_store.h"
#include "tests/integration/store/store_harness.h"
#include "tests/integration/store/store_test_support.h"

namespace tb::store::testing {

// A plain sqlite3 connection to the store's file (the store's process lock is a separate
// file, so this works while the store is open).
class RawDb {
 public:
  explicit RawDb(const std::string& path) {
    if (sqlite3_open_v2(path.c_str(), &db_, SQLITE_OPEN_READWRITE, nullptr) != SQLITE_OK) {
      ADD_FAILURE() << "cannot open " << path << ": " << sqlite3_errmsg(db_);
    }
    sqlite3_busy_timeout(db_, 10'000);
  }
  ~RawDb() { sqlite3_close_v2(db_); }
  RawDb(const RawDb&) = delete;
  RawDb& operator=(const RawDb&) = delete;

  absl::Status Exec(const std::string& sql) {
    char* err = nullptr;
    if (sqlite3_exec(db_, sql.c_str(), nullptr, nullptr, &err) != SQLITE_OK) {
      absl::Status s = absl::InternalError(err != nullptr ? err : "sqlite error");
      sqlite3_free(err);
      return s;
    }
    return absl::OkStatus();
  }

  // The first column of the first row of `sql` with `arg` bound to ?1 (as text), as bytes.
  absl::StatusOr<std::string> QueryBytes(const std::string& sql, const std::string& arg = "") {
    sqlite3_stmt* s = nullptr;
    if (sqlite3_prepare_v2(db_, sql.c_str(), -1, &s, nullptr) != SQLITE_OK) {
      return absl::InternalError(sqlite3_errmsg(db_));
    }
    if (sqlite3_bind_parameter_count(s) > 0) {
      sqlite3_bind_text(s, 1, arg.data(), static_cast<int>(arg.size()), SQLITE_TRANSIENT);
    }
    absl::StatusOr<std::string> out = absl::NotFoundError("no row");
    if (sqlite3_step(s) == SQLITE_ROW) {
      const void* p = sqlite3_column_blob(s, 0);
      out = std::string(static_cast<const char*>(p), sqlite3_column_bytes(s, 0));
    }
    sqlite3_finalize(s);
    return out;
  }

  // Runs `sql` with ?1 bound to the blob `blob` and ?2 to the text `arg`.
  absl::Status ExecWithBlob(const std::string& sql, const std::string& blob,
                            const std::string& arg) {
    sqlite3_stmt* s = nullptr;
    if (sqlite3_prepare_v2(db_, sql.c_str(), -1, &s, nullptr) != SQLITE_OK) {
      return absl::InternalError(sqlite3_errmsg(db_));
    }
    sqlite3_bind_blob(s, 1, blob.data(), static_cast<int>(blob.size()), SQLITE_TRANSIENT);
    sqlite3_bind_text(s, 2, arg.data(), static_cast<int>(arg.size()), SQLITE_TRANSIENT);
    const int rc = sqlite3_step(s);
    sqlite3_finalize(s);
    return rc == SQLITE_DONE ? absl::OkStatus() : absl::InternalError(sqlite3_errmsg(db_));
  }

  // Flips one bit in the middle of the `column` blob of the row `key_column` = `key`.
  absl::Status FlipBit(const std::string& table, const std::string& column,
                       const std::string& key_column, const std::string& key) {
    absl::StatusOr<std::string> blob = QueryBytes(
        absl::StrCat("SELECT ", column, " FROM ", table, " WHERE ", key_column, " = ?1"), key);
    if (!blob.ok()) {
      return blob.status();
    }
    if (blob->empty()) {
      return absl::FailedPreconditionError("empty blob");
    }
    (*blob)[blob->size() / 2] ^= 0x01;
    return ExecWithBlob(
        absl::StrCat("UPDATE ", table, " SET ", column, " = ?1 WHERE ", key_column, " = ?2"), *blob,
        key);
  }

 private:
  sqlite3* db_ = nullptr;
};

inline std::string ReadFileBytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

// The key-file format of crypto::KeyRing::Parse.
inline std::string KeyFileText(const std::vector<TestKey>& keys) {
  std::string out;
  for (const TestKey& k : keys) {
    absl::StrAppend(&out, k.id, " ", absl::Base64Escape(k.bytes.Reveal()), "\n");
  }
  return out;
}

// One SQLite store in its own temporary directory, under one key.
class SqliteHarness final : public StoreHarness {
 public:
  explicit SqliteHarness(const BackendOptions& options)
      : key_(NewKey("k1")), cipher_(MakeCipher({key_})) {
    options_.max_pending_authorizations = options.max_pending_authorizations;
    const absl::Status s = Reopen();
    EXPECT_TRUE(s.ok()) << s;
  }

  core::TokenStore& tokens() override { return *store_; }
  core::FlowStore& flows() override { return *store_; }

  absl::Status Reopen() override {
    store_.reset();
    absl::StatusOr<std::unique_ptr<SqliteStore>> s = SqliteStore::Open(url(), *cipher_, options_);
    if (!s.ok()) {
      return s.status();
    }
    store_ = *std::move(s);
    return absl::OkStatus();
  }

  absl::Status CorruptConnectionSecrets(const core::ConnectionId& id) override {
    RawDb db(path());
    return db.FlipBit("connections", "ciphertext", "id", id);
  }

  std::string path() const { return absl::StrCat(dir_.path(), "/tokens.db"); }
  std::string url() const { return absl::StrCat("sqlite://", path()); }

 private:
  TempDir dir_;
  TestKey key_;
  std::unique_ptr<core::Cipher> cipher_;
  SqliteStoreOptions options_;
  std::unique_ptr<SqliteStore> store_;
};

inline StoreBackend SqliteBackend() {
  return StoreBackend{"Sqlite", [](const BackendOptions& options) {
                        return std::make_unique<SqliteHarness>(options);
                      }};
}

}  // namespace tb::store::testing

#endif  // TB_TESTS_INTEGRATION_STORE_SQLITE_TEST_SUPPORT_H_
