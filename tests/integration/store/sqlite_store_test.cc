#include "server/src/store/sqlite_store.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <filesystem>
#include <fstream>
#include <map>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/time/clock.h"
#include "gtest/gtest.h"
#include "server/src/store/record_codec.h"
#include "tests/fakes/fake_clock.h"
#include "tests/integration/store/sqlite_test_support.h"
#include "tests/integration/store/store_test_support.h"
#include "tokenbroker/storage/v1/records.pb.h"

namespace tb::store::testing {
namespace {

constexpr int kFailedPrecondition = static_cast<int>(absl::StatusCode::kFailedPrecondition);

// ---- A second process ----------------------------------------------------------------------

struct Child {
  pid_t pid = -1;
  int stdin_fd = -1;   // our end of its stdin
  int stdout_fd = -1;  // our end of its stdout
};

// Starts the probe binary with `args`; its stdin and stdout are pipes to us.
Child SpawnProbe(const std::vector<std::string>& args) {
  int in[2];
  int out[2];
  if (pipe2(in, O_CLOEXEC) != 0 || pipe2(out, O_CLOEXEC) != 0) {
    ADD_FAILURE() << "pipe failed";
    return {};
  }
  std::vector<std::string> argv_s = {TB_SQLITE_STORE_PROBE};
  argv_s.insert(argv_s.end(), args.begin(), args.end());
  std::vector<char*> argv;
  for (std::string& a : argv_s) {
    argv.push_back(a.data());
  }
  argv.push_back(nullptr);
  const pid_t pid = fork();
  if (pid == 0) {
    // Only async-signal-safe calls between fork and exec.
    dup2(in[0], STDIN_FILENO);
    dup2(out[1], STDOUT_FILENO);
    execv(argv[0], argv.data());
    _exit(127);
  }
  close(in[0]);
  close(out[1]);
  return Child{pid, in[1], out[0]};
}

// Waits (bounded, generously) for the child to exit; its exit code, or -1 if it did not.
int WaitForExit(Child& child, absl::Duration timeout = absl::Seconds(60)) {
  if (child.stdin_fd >= 0) {
    close(child.stdin_fd);
    child.stdin_fd = -1;
  }
  const absl::Time deadline = absl::Now() + timeout;
  while (absl::Now() < deadline) {
    int status = 0;
    const pid_t r = waitpid(child.pid, &status, WNOHANG);
    if (r == child.pid) {
      if (child.stdout_fd >= 0) {
        close(child.stdout_fd);
        child.stdout_fd = -1;
      }
      if (WIFEXITED(status)) {
        return WEXITSTATUS(status);
      }
      return 128 + (WIFSIGNALED(status) ? WTERMSIG(status) : 0);
    }
    absl::SleepFor(absl::Milliseconds(10));  // waiting for another process
  }
  kill(child.pid, SIGKILL);
  waitpid(child.pid, nullptr, 0);
  return -1;
}

// Reads from the child's stdout until `want` has appeared (bounded, generously).
bool WaitForOutput(const Child& child, absl::string_view want,
                   absl::Duration timeout = absl::Seconds(60)) {
  std::string got;
  const absl::Time deadline = absl::Now() + timeout;
  while (!absl::StrContains(got, want)) {
    const absl::Duration left = deadline - absl::Now();
    if (left <= absl::ZeroDuration()) {
      return false;
    }
    pollfd p{child.stdout_fd, POLLIN, 0};
    if (poll(&p, 1, static_cast<int>(absl::ToInt64Milliseconds(left))) <= 0) {
      return false;
    }
    char buf[256];
    const ssize_t n = read(child.stdout_fd, buf, sizeof(buf));
    if (n <= 0) {
      return false;
    }
    got.append(buf, n);
  }
  return true;
}

// ---- Fixture -------------------------------------------------------------------------------

class SqliteStoreTest : public ::testing::Test {
 protected:
  std::string path() const { return absl::StrCat(dir_.path(), "/tokens.db"); }
  std::string url() const { return absl::StrCat("sqlite://", path()); }

  absl::StatusOr<std::unique_ptr<SqliteStore>> Open(const core::Cipher& cipher,
                                                    SqliteStoreOptions options = {}) {
    return SqliteStore::Open(url(), cipher, options);
  }
  std::unique_ptr<SqliteStore> MustOpen(const core::Cipher& cipher,
                                        SqliteStoreOptions options = {}) {
    absl::StatusOr<std::unique_ptr<SqliteStore>> s = Open(cipher, options);
    EXPECT_TRUE(s.ok()) << s.status();
    return s.ok() ? *std::move(s) : nullptr;
  }
  std::string WriteKeyFile(const std::vector<TestKey>& keys) {
    const std::string file = absl::StrCat(dir_.path(), "/keys.txt");
    std::ofstream(file) << KeyFileText(keys);
    chmod(file.c_str(), 0600);
    return file;
  }
  int64_t RawCount(const std::string& sql) {
    RawDb db(path());
    absl::StatusOr<std::string> v = db.QueryBytes(sql);
    EXPECT_TRUE(v.ok()) << v.status();
    return v.ok() ? std::stoll(*v) : -1;
  }

  TempDir dir_;
  TestKey k1_ = NewKey("k1");
  TestKey k2_ = NewKey("k2");
  std::unique_ptr<core::Cipher> cipher1_ = MakeCipher({k1_});
};

// ---- Restart and durability ----------------------------------------------------------------

TEST_F(SqliteStoreTest, RestartFindsEverythingThatWasWritten) {
  std::vector<core::Connection> written;
  core::LinkRecord link = FullLink("link-1");
  const core::PendingAuthorization auth = FullAuthorization(T(600));
  {
    std::unique_ptr<SqliteStore> store = MustOpen(*cipher1_);
    ASSERT_NE(store, nullptr);
    for (int i = 0; i < 10; ++i) {
      written.push_back(i % 3 == 0 ? PendingConnection(absl::StrCat("c", i))
                                   : FullConnection(absl::StrCat("c", i)));
      ASSERT_TRUE(store->Create(written.back()).ok());
    }
    // Committed when the call returns: another connection to the file sees it at once.
    EXPECT_EQ(RawCount("SELECT COUNT(*) FROM connections"), 10);
    written[1].revision = 1;
    written[1].grant = FullGrant(8, "rotated");
    ASSERT_TRUE(store->Update(written[1], 0, nullptr).ok());
    ASSERT_TRUE(store->Delete("c2").ok());
    written.erase(written.begin() + 2);
    ASSERT_TRUE(store->PutLink(link).ok());
    ASSERT_TRUE(store->RevokeLink("link-1").ok());
    link.revoked = true;
    ASSERT_TRUE(store->PutAuthorization(auth, T(0)).ok());
  }

  // A new process would build its cipher again from the same key file.
  std::unique_ptr<core::Cipher> cipher = MakeCipher({k1_});
  std::unique_ptr<SqliteStore> store = MustOpen(*cipher);
  ASSERT_NE(store, nullptr);
  absl::StatusOr<std::vector<core::Connection>> all = store->LoadAll();
  ASSERT_TRUE(all.ok()) << all.status();
  std::map<std::string, core::Connection> by_id;
  for (core::Connection& c : *all) {
    by_id.emplace(c.id, std::move(c));
  }
  ASSERT_EQ(by_id.size(), written.size());
  for (const core::Connection& w : written) {
    ASSERT_TRUE(by_id.contains(w.id)) << w.id;
    ExpectSameConnection(by_id[w.id], w);
  }
  absl::StatusOr<core::LinkRecord> got_link = store->GetLink("link-1");
  ASSERT_TRUE(got_link.ok()) << got_link.status();
  ExpectSameLink(*got_link, link);
  absl::StatusOr<core::PendingAuthorization> got_auth =
      store->TakeAuthorization(auth.state.Reveal(), T(1));
  ASSERT_TRUE(got_auth.ok()) << got_auth.status();
  ExpectSameAuthorization(*got_auth, auth);
}

TEST_F(SqliteStoreTest, LoadEachHandsOutEveryRowOfManyPagesInIdOrder) {
  // LoadEach reads pages of 2048 rows and decodes them on a second thread: 5000 rows make three
  // pages, one of them short, with an unreadable row in the middle one.
  std::unique_ptr<SqliteStore> store = MustOpen(*cipher1_);
  ASSERT_NE(store, nullptr);
  constexpr int kRows = 5000;
  std::vector<core::Connection> written;
  for (int i = 0; i < kRows; ++i) {
    written.push_back(FullConnection(absl::StrFormat("c%05d", i)));
    ASSERT_TRUE(store->Create(written.back()).ok());
  }
  {
    RawDb db(path());
    ASSERT_TRUE(db.FlipBit("connections", "ciphertext", "id", "c03000").ok());
  }
  std::vector<core::Connection> seen;
  ASSERT_TRUE(
      store->LoadEach([&seen](core::Connection&& c) { seen.push_back(std::move(c)); }).ok());
  ASSERT_EQ(seen.size(), static_cast<size_t>(kRows));
  for (int i = 0; i < kRows; ++i) {
    const std::string id = absl::StrFormat("c%05d", i);
    ASSERT_EQ(seen[i].id, id);
    if (i == 3000) {
      EXPECT_FALSE(seen[i].data_loss.empty());
    } else {
      EXPECT_TRUE(seen[i].data_loss.empty()) << id << ": " << seen[i].data_loss.get();
      ExpectSameConnection(seen[i], written[i]);
    }
  }
  absl::StatusOr<std::vector<core::Connection>> all = store->LoadAll();
  ASSERT_TRUE(all.ok()) << all.status();
  EXPECT_EQ(all->size(), static_cast<size_t>(kRows));
}

TEST_F(SqliteStoreTest, ANewDatabaseIsInWalModeAtTheBinarysSchemaVersion) {
  std::unique_ptr<SqliteStore> store = MustOpen(*cipher1_);
  ASSERT_NE(store, nullptr);
  EXPECT_EQ(store->path(), path());
  RawDb db(path());
  EXPECT_EQ(db.QueryBytes("PRAGMA journal_mode").value_or(""), "wal");
  EXPECT_EQ(db.QueryBytes("SELECT version FROM schema_meta WHERE id = 1").value_or(""),
            absl::StrCat(SqliteStore::kSchemaVersion));
}

// ---- One process owns the file -------------------------------------------------------------

TEST_F(SqliteStoreTest, ASecondProcessIsRefusedWhileTheFirstHoldsTheStore) {
  const std::string keys = WriteKeyFile({k1_});
  {
    std::unique_ptr<SqliteStore> store = MustOpen(*cipher1_);
    ASSERT_NE(store, nullptr);
    ASSERT_TRUE(store->Create(FullConnection("acme")).ok());
    Child child = SpawnProbe({url(), keys});
    EXPECT_EQ(WaitForExit(child), kFailedPrecondition);
    // The refused process changed nothing.
    absl::StatusOr<std::vector<core::Connection>> all = store->LoadAll();
    ASSERT_TRUE(all.ok());
    EXPECT_EQ(all->size(), 1u);
  }
  // Closed: now the other process may have it.
  Child child = SpawnProbe({url(), keys});
  EXPECT_EQ(WaitForExit(child), 0);
}

TEST_F(SqliteStoreTest, TheLockDiesWithItsHolder) {
  const std::string keys = WriteKeyFile({k1_});
  Child holder = SpawnProbe({url(), keys, "hold"});
  ASSERT_TRUE(WaitForOutput(holder, "ready"));

  absl::StatusOr<std::unique_ptr<SqliteStore>> refused = Open(*cipher1_);
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_TRUE(absl::StrContains(refused.status().message(), absl::StrCat(holder.pid)))
      << "the error names the holder's pid";

  kill(holder.pid, SIGKILL);  // a crash: nothing is cleaned up, the lock file stays
  EXPECT_EQ(WaitForExit(holder), 128 + SIGKILL);
  EXPECT_TRUE(std::filesystem::exists(path() + ".lock"));
  std::unique_ptr<SqliteStore> store = MustOpen(*cipher1_);
  EXPECT_NE(store, nullptr);
}

TEST_F(SqliteStoreTest, ASecondOpenInTheSameProcessIsRefusedToo) {
  std::unique_ptr<SqliteStore> first = MustOpen(*cipher1_);
  ASSERT_NE(first, nullptr);
  EXPECT_EQ(Open(*cipher1_).status().code(), absl::StatusCode::kFailedPrecondition);
}

// ---- Schema versions -----------------------------------------------------------------------

TEST_F(SqliteStoreTest, ASchemaOneReleaseNewerOpensAndWorks) {
  const core::Connection c = FullConnection("acme");
  {
    std::unique_ptr<SqliteStore> store = MustOpen(*cipher1_);
    ASSERT_NE(store, nullptr);
    ASSERT_TRUE(store->Create(c).ok());
  }
  {
    // What the next release's migration could do: expand only.
    RawDb db(path());
    ASSERT_TRUE(
        db.Exec(absl::StrCat("UPDATE schema_meta SET version = ", SqliteStore::kSchemaVersion + 1,
                             "; ALTER TABLE connections ADD COLUMN next_release TEXT;"
                             " CREATE TABLE next_release_table (x INTEGER);"))
            .ok());
  }
  std::unique_ptr<SqliteStore> store = MustOpen(*cipher1_);
  ASSERT_NE(store, nullptr);
  absl::StatusOr<core::Connection> loaded = store->Load("acme");
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  ExpectSameConnection(*loaded, c);
  core::Connection next = c;
  next.revision = 1;
  EXPECT_TRUE(store->Update(next, 0, nullptr).ok());
  EXPECT_TRUE(store->Create(PendingConnection("beta")).ok());
  EXPECT_TRUE(store->PutLink(FullLink("l")).ok());
  // The newer version is left as it is, not downgraded.
  RawDb db(path());
  EXPECT_EQ(db.QueryBytes("SELECT version FROM schema_meta").value_or(""),
            absl::StrCat(SqliteStore::kSchemaVersion + 1));
}

TEST_F(SqliteStoreTest, ASchemaTwoReleasesNewerIsRefused) {
  { ASSERT_NE(MustOpen(*cipher1_), nullptr); }
  {
    RawDb db(path());
    ASSERT_TRUE(
        db.Exec(absl::StrCat("UPDATE schema_meta SET version = ", SqliteStore::kSchemaVersion + 2))
            .ok());
  }
  absl::StatusOr<std::unique_ptr<SqliteStore>> s = Open(*cipher1_);
  EXPECT_EQ(s.status().code(), absl::StatusCode::kFailedPrecondition);
  RawDb db(path());
  EXPECT_EQ(db.QueryBytes("SELECT version FROM schema_meta").value_or(""),
            absl::StrCat(SqliteStore::kSchemaVersion + 2));
}

TEST_F(SqliteStoreTest, FieldsANewerReleaseWroteSurviveAnUpdate) {
  namespace pb = ::tokenbroker::storage::v1;
  std::unique_ptr<SqliteStore> store = MustOpen(*cipher1_);
  ASSERT_NE(store, nullptr);
  core::Connection c = FullConnection("acme");
  ASSERT_TRUE(store->Create(c).ok());
  RawDb db(path());
  {
    absl::StatusOr<std::string> meta =
        db.QueryBytes("SELECT meta FROM connections WHERE id = ?1", "acme");
    ASSERT_TRUE(meta.ok());
    // Field 1000, varint 7: what a newer release might add.
    ASSERT_TRUE(db.ExecWithBlob("UPDATE connections SET meta = ?1 WHERE id = ?2",
                                absl::StrCat(*meta, std::string("\xc0\x3e\x07", 3)), "acme")
                    .ok());
  }
  c.revision = 1;
  c.last_error = "rewritten by this release";
  ASSERT_TRUE(store->Update(c, 0, nullptr).ok());
  absl::StatusOr<std::string> meta =
      db.QueryBytes("SELECT meta FROM connections WHERE id = ?1", "acme");
  ASSERT_TRUE(meta.ok());
  pb::ConnectionMeta m;
  ASSERT_TRUE(m.ParseFromString(*meta));
  EXPECT_EQ(m.last_error(), "rewritten by this release");
  const google::protobuf::UnknownFieldSet& unknown = m.GetReflection()->GetUnknownFields(m);
  ASSERT_EQ(unknown.field_count(), 1);
  EXPECT_EQ(unknown.field(0).number(), 1000);
  EXPECT_EQ(unknown.field(0).varint(), 7u);
}

// ---- Secrets at rest -----------------------------------------------------------------------

TEST_F(SqliteStoreTest, TheRawFilesHoldNoTokenVerifierOrState) {
  std::vector<std::string> secrets = {std::string(k1_.bytes.Reveal())};
  const auto add_grant = [&](const core::Grant& g) {
    secrets.emplace_back(g.access_token.Reveal());
    if (g.refresh_token) {
      secrets.emplace_back(g.refresh_token->Reveal());
    }
  };
  std::unique_ptr<SqliteStore> store = MustOpen(*cipher1_);
  ASSERT_NE(store, nullptr);
  for (const char* id : {"acme-raw", "beta-raw"}) {
    core::Connection c = FullConnection(id);
    ASSERT_TRUE(store->Create(c).ok());
    add_grant(*c.grant);
    for (const core::Grant& g : c.to_revoke) {
      add_grant(g);
    }
    // A refresh: the new grant is written, the old one goes to to_revoke.
    core::Connection next = c;
    next.to_revoke.mutable_value().push_back(*c.grant);
    next.grant = FullGrant(8, absl::StrCat(id, "-next"));
    next.revision = 1;
    ASSERT_TRUE(store->Update(next, 0, nullptr).ok());
    add_grant(*next.grant);
  }
  ASSERT_TRUE(store->PutLink(FullLink("link-raw")).ok());
  for (int i = 0; i < 3; ++i) {
    const core::PendingAuthorization a = FullAuthorization(T(600));
    ASSERT_TRUE(store->PutAuthorization(a, T(0)).ok());
    secrets.emplace_back(a.state.Reveal());
    secrets.emplace_back(a.verifier.Reveal());
    secrets.emplace_back(a.browser_binding.Reveal());
    if (i == 0) {
      ASSERT_TRUE(store->TakeAuthorization(a.state.Reveal(), T(1)).ok());
    }
  }

  const auto check = [&](const std::string& bytes, absl::string_view what) {
    for (const std::string& s : secrets) {
      EXPECT_FALSE(absl::StrContains(bytes, s)) << what << " holds a secret in plaintext";
    }
  };
  // While open, the latest writes are in the WAL.
  const std::string db_bytes = ReadFileBytes(path());
  const std::string wal_bytes = ReadFileBytes(path() + "-wal");
  ASSERT_FALSE(wal_bytes.empty());
  // The search itself works: what is not secret is there in plaintext.
  EXPECT_TRUE(absl::StrContains(db_bytes + wal_bytes, "acme-raw"));
  check(db_bytes, "the database file");
  check(wal_bytes, "the WAL file");
  store.reset();  // closing checkpoints the WAL into the database file
  check(ReadFileBytes(path()), "the database file after close");
  check(ReadFileBytes(path() + "-wal"), "the WAL file after close");
}

TEST_F(SqliteStoreTest, AWrongKeyUnderAKnownIdIsRefusedAtOpenNamingTheId) {
  {
    std::unique_ptr<SqliteStore> store = MustOpen(*cipher1_);
    ASSERT_NE(store, nullptr);
    ASSERT_TRUE(store->Create(FullConnection("acme")).ok());
  }
  const TestKey impostor = NewKey("k1");  // same id, other bytes
  std::unique_ptr<core::Cipher> wrong = MakeCipher({impostor});
  absl::StatusOr<std::unique_ptr<SqliteStore>> s = Open(*wrong);
  EXPECT_EQ(s.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_TRUE(absl::StrContains(s.status().message(), "\"k1\"")) << s.status();
  // Also when the wrong key is an old one and the current key is fine.
  std::unique_ptr<core::Cipher> wrong_old = MakeCipher({impostor, k2_});
  s = Open(*wrong_old);
  EXPECT_EQ(s.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_TRUE(absl::StrContains(s.status().message(), "\"k1\"")) << s.status();
  // The right key still opens it.
  EXPECT_NE(MustOpen(*cipher1_), nullptr);
}

TEST_F(SqliteStoreTest, AMissingKeyIdIsRefusedAtOpenNamingIt) {
  {
    std::unique_ptr<SqliteStore> store = MustOpen(*cipher1_);
    ASSERT_NE(store, nullptr);
    // Only an authorization is sealed under k1: every table is checked.
    ASSERT_TRUE(store->PutAuthorization(FullAuthorization(T(600)), T(0)).ok());
  }
  std::unique_ptr<core::Cipher> other = MakeCipher({k2_});
  absl::StatusOr<std::unique_ptr<SqliteStore>> s = Open(*other);
  EXPECT_EQ(s.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_TRUE(absl::StrContains(s.status().message(), "\"k1\"")) << s.status();
}

TEST_F(SqliteStoreTest, CorruptedCiphertextIsDataLossForThatRowAlone) {
  std::unique_ptr<SqliteStore> store = MustOpen(*cipher1_);
  ASSERT_NE(store, nullptr);
  const core::Connection good = FullConnection("good");
  ASSERT_TRUE(store->Create(FullConnection("bad")).ok());
  ASSERT_TRUE(store->Create(good).ok());
  ASSERT_TRUE(store->PutLink(FullLink("bad-link")).ok());
  ASSERT_TRUE(store->PutLink(FullLink("good-link")).ok());
  const core::PendingAuthorization bad_auth = FullAuthorization(T(600));
  const core::PendingAuthorization good_auth = FullAuthorization(T(600));
  ASSERT_TRUE(store->PutAuthorization(bad_auth, T(0)).ok());
  ASSERT_TRUE(store->PutAuthorization(good_auth, T(0)).ok());
  {
    RawDb db(path());
    ASSERT_TRUE(db.FlipBit("connections", "ciphertext", "id", "bad").ok());
    ASSERT_TRUE(db.FlipBit("links", "ciphertext", "link_id", "bad-link").ok());
    const std::string hash = StateHash(bad_auth.state.Reveal());
    absl::StatusOr<std::string> ct =
        db.QueryBytes("SELECT ciphertext FROM authorizations WHERE lower(hex(state_hash)) = ?1",
                      absl::BytesToHexString(hash));
    ASSERT_TRUE(ct.ok());
    (*ct)[0] ^= 1;
    ASSERT_TRUE(db.ExecWithBlob("UPDATE authorizations SET ciphertext = ?1 "
                                "WHERE lower(hex(state_hash)) = ?2",
                                *ct, absl::BytesToHexString(hash))
                    .ok());
  }
  // Also after a restart: the store opens (the key is right), and only the bad rows fail.
  store.reset();
  store = MustOpen(*cipher1_);
  ASSERT_NE(store, nullptr);
  absl::StatusOr<core::Connection> c = store->Load("bad");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_FALSE(c->data_loss.empty());
  c = store->Load("good");
  ASSERT_TRUE(c.ok()) << c.status();
  ExpectSameConnection(*c, good);
  EXPECT_EQ(store->GetLink("bad-link").status().code(), absl::StatusCode::kDataLoss);
  EXPECT_TRUE(store->GetLink("good-link").ok());
  EXPECT_EQ(store->RevokeLink("bad-link").code(), absl::StatusCode::kDataLoss);
  EXPECT_EQ(store->TakeAuthorization(bad_auth.state.Reveal(), T(1)).status().code(),
            absl::StatusCode::kDataLoss);
  // Even a state that does not open works only once.
  EXPECT_EQ(store->TakeAuthorization(bad_auth.state.Reveal(), T(1)).status().code(),
            absl::StatusCode::kNotFound);
  EXPECT_TRUE(store->TakeAuthorization(good_auth.state.Reveal(), T(1)).ok());
}

TEST_F(SqliteStoreTest, UnreadableMetadataIsDataLossForThatConnectionAlone) {
  std::unique_ptr<SqliteStore> store = MustOpen(*cipher1_);
  ASSERT_NE(store, nullptr);
  ASSERT_TRUE(store->Create(FullConnection("bad")).ok());
  ASSERT_TRUE(store->Create(FullConnection("good")).ok());
  {
    RawDb db(path());
    ASSERT_TRUE(db.ExecWithBlob("UPDATE connections SET meta = ?1 WHERE id = ?2",
                                std::string("\xff\xff\xff", 3), "bad")
                    .ok());
  }
  absl::StatusOr<std::vector<core::Connection>> all = store->LoadAll();
  ASSERT_TRUE(all.ok()) << all.status();
  ASSERT_EQ(all->size(), 2u);
  for (const core::Connection& c : *all) {
    EXPECT_EQ(c.data_loss.empty(), c.id == "good") << c.id;
  }
}

// ---- Key rotation --------------------------------------------------------------------------

TEST_F(SqliteStoreTest, RotationReencryptsEveryRowUnderTheNewKey) {
  std::vector<core::Connection> conns;
  std::vector<core::PendingAuthorization> auths;
  {
    std::unique_ptr<SqliteStore> store = MustOpen(*cipher1_);
    ASSERT_NE(store, nullptr);
    for (int i = 0; i < 7; ++i) {
      conns.push_back(FullConnection(absl::StrCat("c", i)));
      conns.back().revision = 0;
      ASSERT_TRUE(store->Create(conns.back()).ok());
    }
    for (int i = 0; i < 3; ++i) {
      ASSERT_TRUE(store->PutLink(FullLink(absl::StrCat("l", i))).ok());
    }
    for (int i = 0; i < 2; ++i) {
      auths.push_back(FullAuthorization(T(600)));
      ASSERT_TRUE(store->PutAuthorization(auths.back(), T(0)).ok());
    }
  }
  std::unique_ptr<core::Cipher> rotating = MakeCipher({k1_, k2_});
  {
    std::unique_ptr<SqliteStore> store = MustOpen(*rotating);
    ASSERT_NE(store, nullptr);
    EXPECT_EQ(store->CountNotUnderCurrentKey().value_or(0), 12u);
    EXPECT_EQ(store->ReencryptBatch(0).status().code(), absl::StatusCode::kInvalidArgument);
    size_t total = 0;
    std::vector<size_t> remaining;
    for (int round = 0; round < 10; ++round) {
      absl::StatusOr<RotationProgress> p = store->ReencryptBatch(5);
      ASSERT_TRUE(p.ok()) << p.status();
      EXPECT_LE(p->reencrypted, 5u);
      EXPECT_EQ(p->unreadable, 0u);
      total += p->reencrypted;
      remaining.push_back(p->remaining);
      if (p->remaining == 0) {
        break;
      }
    }
    EXPECT_EQ(total, 12u);
    EXPECT_EQ(remaining, (std::vector<size_t>{7, 2, 0}));
    EXPECT_EQ(store->CountNotUnderCurrentKey().value_or(99), 0u);
    // A connection's revision is untouched: the broker's next compare-and-set still matches.
    absl::StatusOr<core::Connection> c = store->Load("c0");
    ASSERT_TRUE(c.ok());
    EXPECT_EQ(c->revision, 0u);
  }
  EXPECT_EQ(RawCount("SELECT COUNT(*) FROM connections WHERE key_id <> 'k2'"), 0);
  EXPECT_EQ(RawCount("SELECT COUNT(*) FROM links WHERE key_id <> 'k2'"), 0);
  EXPECT_EQ(RawCount("SELECT COUNT(*) FROM authorizations WHERE key_id <> 'k2'"), 0);

  // The old key can now be removed from the key file.
  std::unique_ptr<core::Cipher> only_new = MakeCipher({k2_});
  std::unique_ptr<SqliteStore> store = MustOpen(*only_new);
  ASSERT_NE(store, nullptr);
  for (const core::Connection& w : conns) {
    absl::StatusOr<core::Connection> c = store->Load(w.id);
    ASSERT_TRUE(c.ok()) << c.status();
    ExpectSameConnection(*c, w);
  }
  for (int i = 0; i < 3; ++i) {
    absl::StatusOr<core::LinkRecord> l = store->GetLink(absl::StrCat("l", i));
    ASSERT_TRUE(l.ok()) << l.status();
    ExpectSameLink(*l, FullLink(absl::StrCat("l", i)));
  }
  for (const core::PendingAuthorization& a : auths) {
    absl::StatusOr<core::PendingAuthorization> got =
        store->TakeAuthorization(a.state.Reveal(), T(1));
    ASSERT_TRUE(got.ok()) << got.status();
    ExpectSameAuthorization(*got, a);
  }
}

TEST_F(SqliteStoreTest, UpdatesThatArriveDuringACommitShareTheNextOneAndKeepTheirOwnResults) {
  HookedCipher hooked(*cipher1_);
  std::unique_ptr<SqliteStore> store = MustOpen(hooked);
  ASSERT_NE(store, nullptr);
  std::map<std::string, core::Connection> created;
  for (const char* id : {"first", "a", "b", "c", "moved"}) {
    created[id] = FullConnection(id);
    ASSERT_TRUE(store->Create(created[id]).ok());
  }
  const auto next = [&created](const char* id, uint64_t revision, const char* access) {
    core::Connection c = created.contains(id) ? created[id] : FullConnection(id);
    c.grant = FullGrant(5, access);
    c.revision = revision;
    return c;
  };
  // Written while "first" is inside its transaction: "a", "b" and "c" must commit, "moved" is
  // expected at a revision it is not at, and "gone" was never created.
  const std::vector<core::Connection> queued = {next("a", 1, "a-1"), next("b", 1, "b-1"),
                                                next("moved", 8, "moved-8"), next("c", 1, "c-1"),
                                                next("gone", 1, "gone-1")};
  const std::vector<uint64_t> expected_revisions = {0, 0, 7, 0, 0};
  std::vector<absl::Status> results(queued.size(), absl::UnknownError("not run"));
  std::vector<std::thread> writers;
  bool all_queued = false;
  hooked.RunOnceBeforeNextSeal([&] {
    for (size_t i = 0; i < queued.size(); ++i) {
      writers.emplace_back(
          [&, i] { results[i] = store->Update(queued[i], expected_revisions[i], nullptr); });
    }
    const absl::Time give_up = absl::Now() + absl::Seconds(30);
    while (store->queued_updates() < queued.size() && absl::Now() < give_up) {
      absl::SleepFor(absl::Milliseconds(1));
    }
    all_queued = store->queued_updates() == queued.size();
  });
  const core::Connection first = next("first", 1, "first-1");
  const uint64_t commits_before = store->update_commits();
  const absl::Status first_status = store->Update(first, 0, nullptr);
  for (std::thread& t : writers) {
    t.join();
  }
  ASSERT_TRUE(first_status.ok()) << first_status;
  ASSERT_TRUE(all_queued) << "the updates did not wait for the commit in progress";
  EXPECT_EQ(store->update_commits() - commits_before, 2u);  // "first", then the other five
  EXPECT_TRUE(results[0].ok()) << results[0];
  EXPECT_TRUE(results[1].ok()) << results[1];
  EXPECT_EQ(results[2].code(), absl::StatusCode::kAborted) << results[2];
  EXPECT_TRUE(results[3].ok()) << results[3];
  EXPECT_EQ(results[4].code(), absl::StatusCode::kNotFound) << results[4];

  for (const core::Connection& want : {first, queued[0], queued[1], queued[3]}) {
    absl::StatusOr<core::Connection> got = store->Load(want.id);
    ASSERT_TRUE(got.ok()) << got.status();
    ExpectSameConnection(*got, want);
  }
  absl::StatusOr<core::Connection> moved = store->Load("moved");
  ASSERT_TRUE(moved.ok()) << moved.status();
  ExpectSameConnection(*moved, created["moved"]);  // the failed update left nothing
  EXPECT_EQ(store->Load("gone").status().code(), absl::StatusCode::kNotFound);
}

TEST_F(SqliteStoreTest, AnUpdateThatRacesTheRotationIsNotLost) {
  {
    std::unique_ptr<SqliteStore> store = MustOpen(*cipher1_);
    ASSERT_NE(store, nullptr);
    ASSERT_TRUE(store->Create(FullConnection("raced")).ok());
    ASSERT_TRUE(store->Create(FullConnection("quiet")).ok());
  }
  std::unique_ptr<core::Cipher> rotating = MakeCipher({k1_, k2_});
  HookedCipher hooked(*rotating);
  std::unique_ptr<SqliteStore> store = MustOpen(hooked);
  ASSERT_NE(store, nullptr);

  // The broker writes "raced" after the batch read it and before the batch writes it back.
  core::Connection update = FullConnection("raced");
  update.grant = FullGrant(8, "written-during-rotation");
  update.revision = 1;
  absl::Status update_status = absl::UnknownError("not run");
  hooked.RunOnceBeforeNextSeal([&] { update_status = store->Update(update, 0, nullptr); });

  absl::StatusOr<RotationProgress> p = store->ReencryptBatch(10);
  ASSERT_TRUE(p.ok()) << p.status();
  ASSERT_TRUE(update_status.ok()) << update_status;
  EXPECT_EQ(p->reencrypted, 1u);  // "quiet"; "raced" lost its compare-and-set
  EXPECT_EQ(p->remaining, 0u);    // the update sealed under the new key itself

  absl::StatusOr<core::Connection> c = store->Load("raced");
  ASSERT_TRUE(c.ok()) << c.status();
  ExpectSameConnection(*c, update);
  c = store->Load("quiet");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_TRUE(c->data_loss.empty());
}

TEST_F(SqliteStoreTest, RotationUnderConcurrentWritesLosesNoWrite) {
  constexpr int kConnections = 20;
  {
    std::unique_ptr<SqliteStore> store = MustOpen(*cipher1_);
    ASSERT_NE(store, nullptr);
    for (int i = 0; i < kConnections; ++i) {
      ASSERT_TRUE(store->Create(FullConnection(absl::StrCat("c", i))).ok());
    }
  }
  std::unique_ptr<core::Cipher> rotating = MakeCipher({k1_, k2_});
  std::unique_ptr<SqliteStore> store = MustOpen(*rotating);
  ASSERT_NE(store, nullptr);

  std::atomic<bool> stop{false};
  std::vector<int> successes(kConnections, 0);
  std::thread writer([&] {
    for (int round = 0; !stop.load() || round < 3; ++round) {
      for (int i = 0; i < kConnections; i += 3) {  // some rows are written, some are not
        const std::string id = absl::StrCat("c", i);
        absl::StatusOr<core::Connection> c = store->Load(id);
        ASSERT_TRUE(c.ok()) << c.status();
        const uint64_t seen = c->revision;
        c->revision = seen + 1;
        c->last_error = absl::StrCat("write ", round);
        const absl::Status s = store->Update(*c, seen, nullptr);
        ASSERT_TRUE(s.ok()) << s;  // rotation never makes a broker write fail
        ++successes[i];
      }
    }
  });
  size_t reencrypted = 0;
  for (int round = 0; round < 1000; ++round) {
    absl::StatusOr<RotationProgress> p = store->ReencryptBatch(1);
    ASSERT_TRUE(p.ok()) << p.status();
    reencrypted += p->reencrypted;
    if (p->remaining == 0) {
      break;
    }
  }
  stop.store(true);
  writer.join();

  EXPECT_EQ(store->CountNotUnderCurrentKey().value_or(99), 0u);
  EXPECT_LE(reencrypted, static_cast<size_t>(kConnections));
  for (int i = 0; i < kConnections; ++i) {
    absl::StatusOr<core::Connection> c = store->Load(absl::StrCat("c", i));
    ASSERT_TRUE(c.ok()) << c.status();
    EXPECT_TRUE(c->data_loss.empty());
    EXPECT_EQ(c->revision, static_cast<uint64_t>(successes[i])) << c->id;
  }
}

TEST_F(SqliteStoreTest, RotationLeavesAnUnreadableRowAsItIsAndCountsIt) {
  {
    std::unique_ptr<SqliteStore> store = MustOpen(*cipher1_);
    ASSERT_NE(store, nullptr);
    for (const char* id : {"a", "bad", "c"}) {
      ASSERT_TRUE(store->Create(FullConnection(id)).ok());
    }
  }
  {
    RawDb db(path());
    ASSERT_TRUE(db.FlipBit("connections", "ciphertext", "id", "bad").ok());
  }
  std::unique_ptr<core::Cipher> rotating = MakeCipher({k1_, k2_});
  std::unique_ptr<SqliteStore> store = MustOpen(*rotating);
  ASSERT_NE(store, nullptr);
  size_t total = 0;
  RotationProgress last;
  for (int round = 0; round < 10; ++round) {
    absl::StatusOr<RotationProgress> p = store->ReencryptBatch(1);
    ASSERT_TRUE(p.ok()) << p.status();
    total += p->reencrypted;
    last = *p;
    if (p->remaining == p->unreadable) {
      break;
    }
  }
  EXPECT_EQ(total, 2u);
  EXPECT_EQ(last.remaining, 1u);
  EXPECT_EQ(last.unreadable, 1u);
  absl::StatusOr<core::Connection> c = store->Load("bad");
  ASSERT_TRUE(c.ok());
  EXPECT_FALSE(c->data_loss.empty());  // still there, still saying so
  // Another batch does not spin on it.
  absl::StatusOr<RotationProgress> p = store->ReencryptBatch(10);
  ASSERT_TRUE(p.ok());
  EXPECT_EQ(p->reencrypted, 0u);
  EXPECT_EQ(p->unreadable, 1u);
  // Once it is deleted (or reconnected), rotation is complete.
  ASSERT_TRUE(store->Delete("bad").ok());
  p = store->ReencryptBatch(10);
  ASSERT_TRUE(p.ok());
  EXPECT_EQ(p->remaining, 0u);
  EXPECT_EQ(p->unreadable, 0u);
}

// ---- Leases --------------------------------------------------------------------------------

TEST_F(SqliteStoreTest, LeasesAreAlwaysGrantedAndFencesIgnored) {
  tb::testing::FakeClock clock;
  std::unique_ptr<SqliteStore> store = MustOpen(*cipher1_, SqliteStoreOptions{.clock = &clock});
  ASSERT_NE(store, nullptr);
  core::Connection c = FullConnection("acme");
  ASSERT_TRUE(store->Create(c).ok());
  absl::StatusOr<std::optional<core::Lease>> a = store->AcquireLease("acme", absl::Seconds(30));
  absl::StatusOr<std::optional<core::Lease>> b = store->AcquireLease("acme", absl::Seconds(30));
  ASSERT_TRUE(a.ok() && b.ok());
  ASSERT_TRUE(a->has_value() && b->has_value());
  EXPECT_EQ((*a)->expires_at, clock.Now() + absl::Seconds(30));
  core::Lease stale = **a;
  stale.fence = 0;
  c.revision = 1;
  EXPECT_TRUE(store->Update(c, 0, &stale).ok());
  EXPECT_TRUE(store->ReleaseLease(**b).ok());
}

// ---- SQLite errors -------------------------------------------------------------------------

TEST_F(SqliteStoreTest, ADatabaseLockedByAnotherConnectionIsUnavailable) {
  std::unique_ptr<SqliteStore> store =
      MustOpen(*cipher1_, SqliteStoreOptions{.busy_timeout = absl::Milliseconds(20)});
  ASSERT_NE(store, nullptr);
  RawDb db(path());  // an operator's sqlite3 shell, say
  ASSERT_TRUE(db.Exec("BEGIN IMMEDIATE").ok());
  EXPECT_EQ(store->Create(FullConnection("acme")).code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ(store->PutLink(FullLink("l")).code(), absl::StatusCode::kUnavailable);
  ASSERT_TRUE(db.Exec("ROLLBACK").ok());
  EXPECT_TRUE(store->Create(FullConnection("acme")).ok());
}

TEST_F(SqliteStoreTest, AFileThatIsNotADatabaseIsDataLoss) {
  std::ofstream(path(), std::ios::binary) << std::string(8192, '\x5a');
  EXPECT_EQ(Open(*cipher1_).status().code(), absl::StatusCode::kDataLoss);
}

TEST_F(SqliteStoreTest, BadUrlsAreInvalidArgument) {
  for (const std::string& url :
       {std::string("sqlite://relative/tokens.db"), std::string("sqlite:///"),
        std::string("postgres://user:pw@host/db"), std::string(""),
        absl::StrCat("sqlite://", dir_.path(), "/")}) {
    EXPECT_EQ(SqliteStore::Open(url, *cipher1_).status().code(), absl::StatusCode::kInvalidArgument)
        << url;
  }
}

TEST_F(SqliteStoreTest, AMissingDirectoryIsFailedPrecondition) {
  EXPECT_EQ(
      SqliteStore::Open(absl::StrCat("sqlite://", dir_.path(), "/missing/tokens.db"), *cipher1_)
          .status()
          .code(),
      absl::StatusCode::kFailedPrecondition);
}

}  // namespace
}  // namespace tb::store::testing
