// The PostgreSQL store against a real PostgreSQL 15 (tests/support/postgres.h; scripts/test.sh
// starts one, and these tests fail without it): the shared store contracts, and what only
// several replicas on one database show: compare-and-set between replicas, lease exclusivity,
// takeover and fencing, the change feed, migrations under concurrency, a server restart.

#include "server/src/store/postgres_store.h"

#include <libpq-fe.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "gtest/gtest.h"
#include "server/src/common/mutex.h"
#include "tests/fakes/fake_clock.h"
#include "tests/integration/store/store_harness.h"
#include "tests/integration/store/store_test_support.h"
#include "tests/integration/store/token_store_contract.h"
#include "tests/support/postgres.h"

namespace tb::store::testing {
namespace {

using ::tb::testing::PrivatePostgresServer;
using ::tb::testing::TestDatabase;

// Generous bounds for what happens in the background (notifications, polls, reconnects).
constexpr absl::Duration kEventually = absl::Seconds(20);

// Polls `done` every 20 ms until it holds or `bound` passes.
template <typename F>
bool Eventually(F done, absl::Duration bound = kEventually) {
  const absl::Time until = absl::Now() + bound;
  while (absl::Now() < until) {
    if (done()) {
      return true;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return done();
}

absl::StatusOr<std::unique_ptr<PostgresStore>> OpenStore(const std::string& url,
                                                         const core::Cipher& cipher,
                                                         PostgresStoreOptions options = {}) {
  return PostgresStore::Open(url, cipher, std::move(options));
}

// ---- The shared contracts --------------------------------------------------------------------

// One PostgreSQL store on a database of its own, under one key.
class PostgresHarness final : public StoreHarness {
 public:
  explicit PostgresHarness(const BackendOptions& options)
      : key_(NewKey("k1")), cipher_(MakeCipher({key_})) {
    options_.max_pending_authorizations = options.max_pending_authorizations;
    const absl::Status s = Reopen();
    EXPECT_TRUE(s.ok()) << s;
  }

  bool opened() const { return store_ != nullptr; }

  core::TokenStore& tokens() override { return *store_; }
  core::FlowStore& flows() override { return *store_; }

  absl::Status Reopen() override {
    store_.reset();
    absl::StatusOr<std::unique_ptr<PostgresStore>> s = OpenStore(db_.url(), *cipher_, options_);
    if (!s.ok()) {
      return s.status();
    }
    store_ = *std::move(s);
    return absl::OkStatus();
  }

  absl::Status CorruptConnectionSecrets(const core::ConnectionId& id) override {
    return db_
        .Query(
            "UPDATE connections SET ciphertext = set_byte(ciphertext, length(ciphertext) / 2, "
            "get_byte(ciphertext, length(ciphertext) / 2) # 1) WHERE id = $1",
            {id})
        .status();
  }

 private:
  TestDatabase db_;
  TestKey key_;
  std::unique_ptr<core::Cipher> cipher_;
  PostgresStoreOptions options_;
  std::unique_ptr<PostgresStore> store_;
};

StoreBackend PostgresBackend() {
  // No store (no server, say): no harness, and the contract's SetUp fails the test.
  return StoreBackend{"Postgres",
                      [](const BackendOptions& options) -> std::unique_ptr<StoreHarness> {
                        auto harness = std::make_unique<PostgresHarness>(options);
                        if (!harness->opened()) {
                          return nullptr;
                        }
                        return harness;
                      }};
}

INSTANTIATE_TEST_SUITE_P(Postgres, TokenStoreContractTest, ::testing::Values(PostgresBackend()),
                         BackendName);
INSTANTIATE_TEST_SUITE_P(Postgres, DurableStoreContractTest, ::testing::Values(PostgresBackend()),
                         BackendName);

// ---- Replicas on one database ----------------------------------------------------------------

class PostgresStoreTest : public ::testing::Test {
 protected:
  PostgresStoreTest() : key_(NewKey("k1")), cipher_(MakeCipher({key_})) {}

  // A store ("replica") on the test database.
  std::unique_ptr<PostgresStore> Replica(PostgresStoreOptions options = {}) {
    absl::StatusOr<std::unique_ptr<PostgresStore>> s = OpenStore(db_.url(), *cipher_, options);
    EXPECT_TRUE(s.ok()) << s.status();
    return s.ok() ? *std::move(s) : nullptr;
  }

  TestDatabase db_;
  TestKey key_;
  std::unique_ptr<core::Cipher> cipher_;
};

TEST_F(PostgresStoreTest, ReopenedStoreFindsWhatTheLastOneWrote) {
  const core::Connection c = FullConnection("acme");
  {
    std::unique_ptr<PostgresStore> first = Replica();
    ASSERT_NE(first, nullptr);
    ASSERT_TRUE(first->Create(c).ok());
  }
  std::unique_ptr<PostgresStore> second = Replica();
  ASSERT_NE(second, nullptr);
  absl::StatusOr<core::Connection> loaded = second->Load("acme");
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  ExpectSameConnection(*loaded, c);
}

TEST_F(PostgresStoreTest, CompareAndSetBetweenReplicasLetsOnlyOneWriterWin) {
  std::unique_ptr<PostgresStore> a = Replica();
  std::unique_ptr<PostgresStore> b = Replica();
  ASSERT_NE(a, nullptr);
  ASSERT_NE(b, nullptr);
  ASSERT_TRUE(a->Create(FullConnection("acme")).ok());

  absl::StatusOr<core::Connection> seen_by_a = a->Load("acme");
  absl::StatusOr<core::Connection> seen_by_b = b->Load("acme");
  ASSERT_TRUE(seen_by_a.ok() && seen_by_b.ok());
  core::Connection from_a = *seen_by_a;
  from_a.revision = 1;
  from_a.grant = FullGrant(8, "from-a");
  core::Connection from_b = *seen_by_b;
  from_b.revision = 1;
  from_b.grant = FullGrant(8, "from-b");

  ASSERT_TRUE(a->Update(from_a, 0, nullptr).ok());
  EXPECT_EQ(b->Update(from_b, 0, nullptr).code(), absl::StatusCode::kAborted);
  absl::StatusOr<core::Connection> now = b->Load("acme");
  ASSERT_TRUE(now.ok()) << now.status();
  ExpectSameConnection(*now, from_a);
  EXPECT_EQ(b->Create(PendingConnection("acme")).code(), absl::StatusCode::kAlreadyExists);
}

TEST_F(PostgresStoreTest, LeaseIsExclusiveBetweenReplicasAndRenewalKeepsTheFence) {
  std::unique_ptr<PostgresStore> a = Replica();
  std::unique_ptr<PostgresStore> b = Replica();
  ASSERT_NE(a, nullptr);
  ASSERT_NE(b, nullptr);
  ASSERT_NE(a->instance_id(), b->instance_id());

  const absl::Time before = absl::Now();
  absl::StatusOr<std::optional<core::Lease>> held = a->AcquireLease("acme", absl::Seconds(30));
  ASSERT_TRUE(held.ok()) << held.status();
  ASSERT_TRUE(held->has_value());
  EXPECT_EQ((*held)->owner, a->instance_id());
  EXPECT_GE((*held)->expires_at, before + absl::Seconds(29));
  EXPECT_LE((*held)->expires_at, absl::Now() + absl::Seconds(30));

  absl::StatusOr<std::optional<core::Lease>> other = b->AcquireLease("acme", absl::Seconds(30));
  ASSERT_TRUE(other.ok()) << other.status();
  EXPECT_FALSE(other->has_value());

  absl::StatusOr<std::optional<core::Lease>> renewed = a->AcquireLease("acme", absl::Seconds(60));
  ASSERT_TRUE(renewed.ok() && renewed->has_value());
  EXPECT_EQ((*renewed)->fence, (*held)->fence);

  // Another connection's lease is independent.
  absl::StatusOr<std::optional<core::Lease>> beta = b->AcquireLease("beta", absl::Seconds(30));
  ASSERT_TRUE(beta.ok() && beta->has_value());

  // Released, it is free at once, and it changes hands with a higher fence.
  ASSERT_TRUE(a->ReleaseLease(**renewed).ok());
  other = b->AcquireLease("acme", absl::Seconds(30));
  ASSERT_TRUE(other.ok() && other->has_value());
  EXPECT_GT((*other)->fence, (*held)->fence);
  // Releasing a lease one no longer holds leaves the holder's alone.
  ASSERT_TRUE(a->ReleaseLease(**renewed).ok());
  absl::StatusOr<std::optional<core::Lease>> again = a->AcquireLease("acme", absl::Seconds(30));
  ASSERT_TRUE(again.ok());
  EXPECT_FALSE(again->has_value());

  EXPECT_EQ(a->AcquireLease("acme", absl::ZeroDuration()).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST_F(PostgresStoreTest, ExpiredLeaseIsTakenOverWithAHigherFenceAndTheStaleHolderIsFenced) {
  std::unique_ptr<PostgresStore> a = Replica();
  std::unique_ptr<PostgresStore> b = Replica();
  ASSERT_NE(a, nullptr);
  ASSERT_NE(b, nullptr);
  ASSERT_TRUE(a->Create(FullConnection("acme")).ok());

  absl::StatusOr<std::optional<core::Lease>> a_lease =
      a->AcquireLease("acme", absl::Milliseconds(300));
  ASSERT_TRUE(a_lease.ok() && a_lease->has_value());

  // B takes it once it has expired on the database's clock.
  std::optional<core::Lease> b_lease;
  ASSERT_TRUE(Eventually([&] {
    absl::StatusOr<std::optional<core::Lease>> l = b->AcquireLease("acme", absl::Seconds(30));
    EXPECT_TRUE(l.ok()) << l.status();
    if (l.ok() && l->has_value()) {
      b_lease = **l;
      return true;
    }
    return false;
  }));
  EXPECT_GT(b_lease->fence, (*a_lease)->fence);
  EXPECT_EQ(b_lease->owner, b->instance_id());

  // A, which still believes it holds the lease, is refused even at the right revision.
  absl::StatusOr<core::Connection> c = a->Load("acme");
  ASSERT_TRUE(c.ok());
  core::Connection stale = *c;
  stale.revision = 1;
  stale.grant = FullGrant(8, "stale-holder");
  EXPECT_EQ(a->Update(stale, 0, &**a_lease).code(), absl::StatusCode::kAborted);
  // And A cannot take the lease back while B holds it.
  absl::StatusOr<std::optional<core::Lease>> back = a->AcquireLease("acme", absl::Seconds(30));
  ASSERT_TRUE(back.ok());
  EXPECT_FALSE(back->has_value());

  // B, the holder, writes.
  core::Connection fresh = *c;
  fresh.revision = 1;
  fresh.grant = FullGrant(8, "new-holder");
  ASSERT_TRUE(b->Update(fresh, 0, &*b_lease).ok());
  absl::StatusOr<core::Connection> loaded = a->Load("acme");
  ASSERT_TRUE(loaded.ok());
  ExpectSameConnection(*loaded, fresh);

  // A fence the database never granted is refused too; no fence means no lease check.
  core::Lease forged = *b_lease;
  forged.fence += 7;
  fresh.revision = 2;
  EXPECT_EQ(b->Update(fresh, 1, &forged).code(), absl::StatusCode::kAborted);
  EXPECT_TRUE(a->Update(fresh, 1, nullptr).ok());
  // A lease for a connection that does not exist fences nothing: NOT_FOUND.
  core::Connection nobody = FullConnection("nobody");
  nobody.revision = 1;
  EXPECT_EQ(b->Update(nobody, 0, &*b_lease).code(), absl::StatusCode::kNotFound);
}

TEST_F(PostgresStoreTest, LeaseExpiryIsMeasuredOnTheDatabaseClockAndReportedOnOurs) {
  // Our clock is years off: the lease still lasts its ttl on the database's clock, and its
  // expiry is expressed on our clock.
  ::tb::testing::FakeClock skewed;
  skewed.Set(absl::FromUnixSeconds(946'684'800));  // 2000-01-01
  PostgresStoreOptions options;
  options.clock = &skewed;
  std::unique_ptr<PostgresStore> a = Replica(options);
  std::unique_ptr<PostgresStore> b = Replica();
  ASSERT_NE(a, nullptr);
  ASSERT_NE(b, nullptr);

  absl::StatusOr<std::optional<core::Lease>> held = a->AcquireLease("acme", absl::Seconds(30));
  ASSERT_TRUE(held.ok() && held->has_value());
  EXPECT_LE((*held)->expires_at, skewed.Now() + absl::Seconds(30));
  EXPECT_GE((*held)->expires_at, skewed.Now() + absl::Seconds(25));
  // Advancing our clock past it changes nothing for the database.
  skewed.Advance(absl::Hours(24));
  absl::StatusOr<std::optional<core::Lease>> other = b->AcquireLease("acme", absl::Seconds(30));
  ASSERT_TRUE(other.ok());
  EXPECT_FALSE(other->has_value());
}

TEST_F(PostgresStoreTest, ConcurrentAcquirersGetTheLeaseExactlyOnce) {
  std::vector<std::unique_ptr<PostgresStore>> replicas;
  for (int i = 0; i < 4; ++i) {
    replicas.push_back(Replica());
    ASSERT_NE(replicas.back(), nullptr);
  }
  // Every replica asks ten times at once; only one of them ever gets it (the others until it
  // expires, long after the test).
  std::atomic<int> holders{0};
  std::vector<std::thread> threads;
  for (auto& r : replicas) {
    threads.emplace_back([&holders, store = r.get()] {
      bool held = false;
      for (int round = 0; round < 10; ++round) {
        absl::StatusOr<std::optional<core::Lease>> l =
            store->AcquireLease("contested", absl::Seconds(60));
        ASSERT_TRUE(l.ok()) << l.status();
        held = held || l->has_value();
      }
      if (held) {
        holders.fetch_add(1);
      }
    });
  }
  for (std::thread& t : threads) {
    t.join();
  }
  EXPECT_EQ(holders.load(), 1);
}

// ---- Change feed ---------------------------------------------------------------------------

// Collects the ids a store's change feed delivers. Thread-safe.
class Changes {
 public:
  std::function<void(const core::ConnectionId&)> Callback() {
    return [this](const core::ConnectionId& id) {
      MutexLock lock(&mu_);
      ids_.push_back(id);
    };
  }
  bool Contains(const std::string& id) const {
    MutexLock lock(&mu_);
    return std::find(ids_.begin(), ids_.end(), id) != ids_.end();
  }
  size_t Count(const std::string& id) const {
    MutexLock lock(&mu_);
    return std::count(ids_.begin(), ids_.end(), id);
  }

 private:
  mutable Mutex mu_;
  std::vector<std::string> ids_ ABSL_GUARDED_BY(mu_);
};

TEST_F(PostgresStoreTest, ChangeFeedDeliversAnotherReplicasWritesAndNotOurOwn) {
  std::unique_ptr<PostgresStore> a = Replica();
  std::unique_ptr<PostgresStore> b = Replica();
  ASSERT_NE(a, nullptr);
  ASSERT_NE(b, nullptr);
  Changes changes;
  a->WatchRemoteChanges(changes.Callback());

  // Our own write first, then theirs: once theirs has arrived, ours would have too (one
  // channel, delivered in commit order; the poll sees both).
  ASSERT_TRUE(a->Create(PendingConnection("ours")).ok());
  ASSERT_TRUE(b->Create(PendingConnection("theirs")).ok());
  ASSERT_TRUE(Eventually([&] { return changes.Contains("theirs"); }));
  EXPECT_FALSE(changes.Contains("ours"));

  // Updates and deletions too.
  absl::StatusOr<core::Connection> c = b->Load("theirs");
  ASSERT_TRUE(c.ok());
  const size_t before = changes.Count("theirs");
  c->revision = 1;
  ASSERT_TRUE(b->Update(*c, 0, nullptr).ok());
  ASSERT_TRUE(Eventually([&] { return changes.Count("theirs") > before; }));
  const size_t after_update = changes.Count("theirs");
  ASSERT_TRUE(b->Delete("theirs").ok());
  ASSERT_TRUE(Eventually([&] { return changes.Count("theirs") > after_update; }));
  ASSERT_TRUE(a->Delete("ours").ok());
  ASSERT_TRUE(b->Create(PendingConnection("marker")).ok());
  ASSERT_TRUE(Eventually([&] { return changes.Contains("marker"); }));
  EXPECT_FALSE(changes.Contains("ours"));
}

TEST_F(PostgresStoreTest, ChangeFeedReportsChangesMadeBetweenOpenAndWatch) {
  std::unique_ptr<PostgresStore> a = Replica();
  std::unique_ptr<PostgresStore> b = Replica();
  ASSERT_NE(a, nullptr);
  ASSERT_NE(b, nullptr);
  ASSERT_TRUE(b->Create(PendingConnection("early")).ok());
  Changes changes;
  a->WatchRemoteChanges(changes.Callback());
  EXPECT_TRUE(Eventually([&] { return changes.Contains("early"); }));
}

TEST_F(PostgresStoreTest, ChangeFeedPollsWhenANotificationIsLost) {
  PostgresStoreOptions fast;
  fast.poll_interval = absl::Milliseconds(200);
  std::unique_ptr<PostgresStore> a = Replica(fast);
  ASSERT_NE(a, nullptr);
  ASSERT_TRUE(a->Create(PendingConnection("quiet")).ok());
  Changes changes;
  a->WatchRemoteChanges(changes.Callback());

  // Another process's write whose notification never came: only the poll can see it.
  ASSERT_TRUE(db_.Query("UPDATE connections SET change_seq = nextval('tb_change_seq'), "
                        "changed_by = 'elsewhere' WHERE id = 'quiet'")
                  .ok());
  EXPECT_TRUE(Eventually([&] { return changes.Contains("quiet"); }));
}

TEST_F(PostgresStoreTest, ChangeFeedSurvivesLosingItsListenConnection) {
  PostgresStoreOptions fast;
  fast.poll_interval = absl::Milliseconds(200);
  std::unique_ptr<PostgresStore> a = Replica(fast);
  std::unique_ptr<PostgresStore> b = Replica();
  ASSERT_NE(a, nullptr);
  ASSERT_NE(b, nullptr);
  Changes changes;
  a->WatchRemoteChanges(changes.Callback());
  ASSERT_TRUE(b->Create(PendingConnection("first")).ok());
  ASSERT_TRUE(Eventually([&] { return changes.Contains("first"); }));

  absl::StatusOr<tb::testing::PgRows> killed = db_.Query(
      "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
      "WHERE datname = current_database() AND application_name = 'token-broker-feed'");
  ASSERT_TRUE(killed.ok()) << killed.status();
  ASSERT_FALSE(killed->empty());
  ASSERT_TRUE(b->Create(PendingConnection("second")).ok());
  EXPECT_TRUE(Eventually([&] { return changes.Contains("second"); }));
  // And it listens again.
  EXPECT_TRUE(Eventually([&] {
    absl::StatusOr<tb::testing::PgRows> rows = db_.Query(
        "SELECT 1 FROM pg_stat_activity WHERE datname = current_database() "
        "AND application_name = 'token-broker-feed'");
    return rows.ok() && !rows->empty();
  }));
}

// ---- Migrations and keys -------------------------------------------------------------------

TEST_F(PostgresStoreTest, ConcurrentOpensMigrateExactlyOnce) {
  constexpr int kOpeners = 4;
  std::vector<absl::Status> results(kOpeners);
  std::vector<std::thread> threads;
  std::atomic<int> ready{0};
  for (int i = 0; i < kOpeners; ++i) {
    threads.emplace_back([&, i] {
      ready.fetch_add(1);
      while (ready.load() < kOpeners) {
        std::this_thread::yield();
      }
      results[i] = OpenStore(db_.url(), *cipher_).status();
    });
  }
  for (std::thread& t : threads) {
    t.join();
  }
  for (const absl::Status& s : results) {
    EXPECT_TRUE(s.ok()) << s;
  }
  absl::StatusOr<tb::testing::PgRows> applied =
      db_.Query("SELECT count(*), count(DISTINCT applied_by) FROM schema_migrations");
  ASSERT_TRUE(applied.ok()) << applied.status();
  EXPECT_EQ((*applied)[0][0], std::to_string(PostgresStore::kSchemaVersion));
  EXPECT_EQ((*applied)[0][1], "1");
  absl::StatusOr<tb::testing::PgRows> version =
      db_.Query("SELECT version FROM schema_meta WHERE id = 1");
  ASSERT_TRUE(version.ok()) << version.status();
  EXPECT_EQ((*version)[0][0], std::to_string(PostgresStore::kSchemaVersion));
}

TEST_F(PostgresStoreTest, SchemaOneAheadOpensAndTwoAheadIsRefused) {
  {
    std::unique_ptr<PostgresStore> s = Replica();
    ASSERT_NE(s, nullptr);
    ASSERT_TRUE(s->Create(FullConnection("acme")).ok());
  }
  // The next release expanded the schema (a new nullable column) and was rolled back.
  ASSERT_TRUE(db_.Query("ALTER TABLE connections ADD COLUMN next_release_note text").ok());
  ASSERT_TRUE(db_.Query(absl::StrCat("UPDATE schema_meta SET version = ",
                                     PostgresStore::kSchemaVersion + 1))
                  .ok());
  {
    std::unique_ptr<PostgresStore> s = Replica();
    ASSERT_NE(s, nullptr);
    absl::StatusOr<core::Connection> c = s->Load("acme");
    ASSERT_TRUE(c.ok()) << c.status();
    c->revision = 1;
    EXPECT_TRUE(s->Update(*c, 0, nullptr).ok());
    EXPECT_TRUE(s->Create(PendingConnection("beta")).ok());
  }
  absl::StatusOr<tb::testing::PgRows> version =
      db_.Query("SELECT version FROM schema_meta WHERE id = 1");
  ASSERT_TRUE(version.ok());
  EXPECT_EQ((*version)[0][0], std::to_string(PostgresStore::kSchemaVersion + 1));  // untouched

  ASSERT_TRUE(db_.Query(absl::StrCat("UPDATE schema_meta SET version = ",
                                     PostgresStore::kSchemaVersion + 2))
                  .ok());
  EXPECT_EQ(OpenStore(db_.url(), *cipher_).status().code(), absl::StatusCode::kFailedPrecondition);
}

TEST_F(PostgresStoreTest, WrongOrMissingKeyIsRefusedAtOpen) {
  {
    std::unique_ptr<PostgresStore> s = Replica();
    ASSERT_NE(s, nullptr);
    ASSERT_TRUE(s->Create(FullConnection("acme")).ok());
  }
  // Other bytes under the same id.
  std::unique_ptr<core::Cipher> impostor = MakeCipher({NewKey("k1")});
  EXPECT_EQ(OpenStore(db_.url(), *impostor).status().code(), absl::StatusCode::kFailedPrecondition);
  // The key that sealed the rows is not configured at all.
  std::unique_ptr<core::Cipher> other = MakeCipher({NewKey("k2")});
  EXPECT_EQ(OpenStore(db_.url(), *other).status().code(), absl::StatusCode::kFailedPrecondition);
  // Rotation: the old key still opens, the new one seals.
  std::unique_ptr<core::Cipher> rotated = MakeCipher({key_, NewKey("k2")});
  absl::StatusOr<std::unique_ptr<PostgresStore>> s = OpenStore(db_.url(), *rotated);
  ASSERT_TRUE(s.ok()) << s.status();
  absl::StatusOr<core::Connection> c = (*s)->Load("acme");
  ASSERT_TRUE(c.ok());
  EXPECT_TRUE(c->data_loss.empty());
}

TEST_F(PostgresStoreTest, RawTablesHoldNoTokenBytes) {
  std::unique_ptr<PostgresStore> s = Replica();
  ASSERT_NE(s, nullptr);
  const core::Connection c = FullConnection("acme");
  ASSERT_TRUE(s->Create(c).ok());
  const core::PendingAuthorization auth = FullAuthorization(T(600));
  ASSERT_TRUE(s->PutAuthorization(auth, T(0)).ok());
  ASSERT_TRUE(s->PutLink(FullLink("link-1")).ok());

  std::vector<std::string> secrets = {
      std::string(c.grant->access_token.Reveal()),
      std::string(c.grant->refresh_token->Reveal()),
      std::string(auth.state.Reveal()),
      std::string(auth.browser_binding.Reveal()),
      std::string(auth.verifier.Reveal()),
  };
  for (const core::Grant& g : c.to_revoke) {
    secrets.emplace_back(g.access_token.Reveal());
    if (g.refresh_token) {
      secrets.emplace_back(g.refresh_token->Reveal());
    }
  }
  // Every column of every table, as raw bytes (binary format) and as text.
  std::string everything;
  for (const char* table : {"connections", "links", "authorizations", "key_checks",
                            "connection_tombstones", "refresh_leases"}) {
    for (const bool binary : {true, false}) {
      absl::StatusOr<tb::testing::PgRows> rows =
          db_.Query(absl::StrCat("SELECT * FROM ", table), {}, binary);
      ASSERT_TRUE(rows.ok()) << rows.status();
      for (const auto& row : *rows) {
        for (const auto& col : row) {
          absl::StrAppend(&everything, col.value_or(""), "\n");
        }
      }
    }
  }
  ASSERT_FALSE(everything.empty());
  for (const std::string& secret : secrets) {
    ASSERT_FALSE(secret.empty());
    EXPECT_FALSE(absl::StrContains(everything, secret)) << "a secret is stored in plaintext";
  }
  // The store reads them back all the same.
  absl::StatusOr<core::Connection> loaded = s->Load("acme");
  ASSERT_TRUE(loaded.ok());
  ExpectSameConnection(*loaded, c);
}

TEST_F(PostgresStoreTest, RotationReSealsEveryRowUnderTheNewKeyAndLosesNoConcurrentWrite) {
  std::vector<core::Connection> written;
  {
    std::unique_ptr<PostgresStore> s = Replica();
    ASSERT_NE(s, nullptr);
    for (const char* id : {"bad", "c0", "c1", "c2", "c3", "c4"}) {
      written.push_back(FullConnection(id));
      ASSERT_TRUE(s->Create(written.back()).ok());
    }
    ASSERT_TRUE(s->PutLink(FullLink("link-1")).ok());
    ASSERT_TRUE(s->PutLink(FullLink("link-2")).ok());
    ASSERT_TRUE(s->PutAuthorization(FullAuthorization(T(600)), T(0)).ok());
    ASSERT_TRUE(s->PutAuthorization(FullAuthorization(T(600)), T(0)).ok());
  }
  ASSERT_TRUE(db_.Query("UPDATE connections SET ciphertext = set_byte(ciphertext, 3, "
                        "get_byte(ciphertext, 3) # 1) WHERE id = 'bad'")
                  .ok());

  const TestKey k2 = NewKey("k2");
  std::unique_ptr<core::Cipher> rotated = MakeCipher({key_, k2});
  HookedCipher hooked(*rotated);
  absl::StatusOr<std::unique_ptr<PostgresStore>> a = OpenStore(db_.url(), hooked);
  absl::StatusOr<std::unique_ptr<PostgresStore>> b = OpenStore(db_.url(), *rotated);
  ASSERT_TRUE(a.ok() && b.ok());
  // While A re-seals its first readable row (c0, after "bad", which does not open), replica B
  // writes that row: B's write must survive.
  core::Connection during = written[1];
  during.revision = 1;
  during.last_error = "written during rotation";
  absl::Status during_write;
  hooked.RunOnceBeforeNextSeal([&] { during_write = (*b)->Update(during, 0, nullptr); });

  core::RotationProgress progress;
  for (int i = 0; i < 50; ++i) {
    absl::StatusOr<core::RotationProgress> p = (*a)->ReencryptBatch(3);
    ASSERT_TRUE(p.ok()) << p.status();
    progress = *p;
    if (progress.remaining == progress.unreadable) {
      break;
    }
  }
  ASSERT_TRUE(during_write.ok()) << during_write;
  EXPECT_EQ(progress.remaining, 1u);
  EXPECT_EQ(progress.unreadable, 1u);
  absl::StatusOr<size_t> left = (*a)->CountNotUnderCurrentKey();
  ASSERT_TRUE(left.ok());
  EXPECT_EQ(*left, 1u);
  absl::StatusOr<tb::testing::PgRows> old_rows = db_.Query(
      "SELECT id FROM connections WHERE key_id <> 'k2' UNION ALL "
      "SELECT link_id FROM links WHERE key_id <> 'k2' UNION ALL "
      "SELECT 'authorization' FROM authorizations WHERE key_id <> 'k2'");
  ASSERT_TRUE(old_rows.ok()) << old_rows.status();
  ASSERT_EQ(old_rows->size(), 1u);
  EXPECT_EQ((*old_rows)[0][0], "bad");

  for (const core::Connection& w : written) {
    absl::StatusOr<core::Connection> c = (*b)->Load(w.id);
    ASSERT_TRUE(c.ok()) << c.status();
    if (w.id == "bad") {
      EXPECT_FALSE(c->data_loss.empty());
    } else if (w.id == "c0") {
      ExpectSameConnection(*c, during);
    } else {
      ExpectSameConnection(*c, w);  // revision unchanged too
    }
  }
  EXPECT_TRUE((*b)->GetLink("link-2").ok());
  EXPECT_EQ((*a)->ReencryptBatch(0).status().code(), absl::StatusCode::kInvalidArgument);

  // Without the old key the store does not open while a row still needs it; once that row is
  // gone, it does.
  a->reset();
  b->reset();
  std::unique_ptr<core::Cipher> only_new = MakeCipher({k2});
  EXPECT_EQ(OpenStore(db_.url(), *only_new).status().code(), absl::StatusCode::kFailedPrecondition);
  ASSERT_TRUE(db_.Query("DELETE FROM connections WHERE id = 'bad'").ok());
  absl::StatusOr<std::unique_ptr<PostgresStore>> after = OpenStore(db_.url(), *only_new);
  ASSERT_TRUE(after.ok()) << after.status();
  absl::StatusOr<core::Connection> c1 = (*after)->Load("c1");
  ASSERT_TRUE(c1.ok());
  ExpectSameConnection(*c1, written[2]);
}

// ---- Pool, timeouts, restarts --------------------------------------------------------------

TEST_F(PostgresStoreTest, ManyThreadsShareASmallPool) {
  PostgresStoreOptions small;
  small.pool_size = 2;
  std::unique_ptr<PostgresStore> s = Replica(small);
  ASSERT_NE(s, nullptr);
  ASSERT_TRUE(s->Create(FullConnection("acme")).ok());
  std::vector<std::thread> threads;
  std::atomic<int> failures{0};
  for (int t = 0; t < 6; ++t) {
    threads.emplace_back([&] {
      for (int i = 0; i < 20; ++i) {
        if (!s->Load("acme").ok()) {
          failures.fetch_add(1);
        }
      }
    });
  }
  for (std::thread& t : threads) {
    t.join();
  }
  EXPECT_EQ(failures.load(), 0);
  EXPECT_LE(s->open_connections(), 2u);
}

TEST_F(PostgresStoreTest, StatementTimeoutIsDeadlineExceededAndTheStoreRecovers) {
  PostgresStoreOptions quick;
  quick.statement_timeout = absl::Milliseconds(300);
  std::unique_ptr<PostgresStore> s = Replica(quick);
  ASSERT_NE(s, nullptr);
  ASSERT_TRUE(s->Create(FullConnection("acme")).ok());

  // Another session holds the table locked.
  PGconn* locker = PQconnectdb(db_.url().c_str());
  ASSERT_EQ(PQstatus(locker), CONNECTION_OK);
  PGresult* r = PQexec(locker, "BEGIN; LOCK TABLE connections IN ACCESS EXCLUSIVE MODE");
  ASSERT_EQ(PQresultStatus(r), PGRES_COMMAND_OK);
  PQclear(r);
  const absl::Time start = absl::Now();
  EXPECT_EQ(s->Load("acme").status().code(), absl::StatusCode::kDeadlineExceeded);
  EXPECT_LT(absl::Now() - start, absl::Seconds(5));
  PQclear(PQexec(locker, "ROLLBACK"));
  PQfinish(locker);

  EXPECT_TRUE(s->Load("acme").ok());
}

TEST_F(PostgresStoreTest, BadUrlsAreInvalidArgumentAndAnUnreachableServerIsUnavailable) {
  EXPECT_EQ(OpenStore("sqlite:///tmp/x.db", *cipher_).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(OpenStore("postgres://host:notaport:/db?x", *cipher_).status().code(),
            absl::StatusCode::kInvalidArgument);
  // Port 1 on loopback: nothing listens there.
  EXPECT_EQ(OpenStore("postgresql://tbtest@127.0.0.1:1/postgres", *cipher_).status().code(),
            absl::StatusCode::kUnavailable);
}

TEST(PostgresServerRestartTest, StoreReconnectsAfterTheServerRestartsAndFailsFastWhileItIsDown) {
  PrivatePostgresServer server;
  ASSERT_FALSE(server.url().empty());
  TestDatabase db(server.url());
  const TestKey key = NewKey("k1");
  std::unique_ptr<core::Cipher> cipher = MakeCipher({key});
  PostgresStoreOptions fast;
  fast.poll_interval = absl::Milliseconds(200);
  fast.statement_timeout = absl::Seconds(2);
  fast.connect_timeout = absl::Seconds(2);
  absl::StatusOr<std::unique_ptr<PostgresStore>> a = OpenStore(db.url(), *cipher, fast);
  absl::StatusOr<std::unique_ptr<PostgresStore>> b = OpenStore(db.url(), *cipher, fast);
  ASSERT_TRUE(a.ok()) << a.status();
  ASSERT_TRUE(b.ok()) << b.status();
  Changes changes;
  (*a)->WatchRemoteChanges(changes.Callback());
  const core::Connection c = FullConnection("acme");
  ASSERT_TRUE((*a)->Create(c).ok());
  ASSERT_TRUE((*a)->Load("acme").ok());  // the pool has a connection open

  // A restart: every connection is cut. Calls may fail UNAVAILABLE once, then work again.
  ASSERT_TRUE(server.Restart().ok());
  ASSERT_TRUE(Eventually([&] {
    absl::StatusOr<core::Connection> l = (*a)->Load("acme");
    EXPECT_TRUE(l.ok() || l.status().code() == absl::StatusCode::kUnavailable) << l.status();
    return l.ok();
  }));
  absl::StatusOr<core::Connection> loaded = (*a)->Load("acme");
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  ExpectSameConnection(*loaded, c);
  // The other replica's writes reach the feed again (it listens anew, or polls).
  ASSERT_TRUE(Eventually([&] { return (*b)->Create(PendingConnection("after-restart")).ok(); }));
  EXPECT_TRUE(Eventually([&] { return changes.Contains("after-restart"); }));

  // Down: every call fails UNAVAILABLE, quickly, and nothing crashes or hangs.
  ASSERT_TRUE(server.Pause().ok());
  for (int i = 0; i < 3; ++i) {
    const absl::Time start = absl::Now();
    EXPECT_EQ((*a)->Load("acme").status().code(), absl::StatusCode::kUnavailable);
    core::Connection next = c;
    next.revision = 1;
    EXPECT_EQ((*a)->Update(next, 0, nullptr).code(), absl::StatusCode::kUnavailable);
    absl::StatusOr<std::optional<core::Lease>> lease =
        (*a)->AcquireLease("acme", absl::Seconds(30));
    EXPECT_EQ(lease.status().code(), absl::StatusCode::kUnavailable);
    EXPECT_LT(absl::Now() - start, absl::Seconds(15));
  }
  // Back: the same data, and writes work.
  ASSERT_TRUE(server.Resume().ok());
  ASSERT_TRUE(Eventually([&] { return (*a)->Load("acme").ok(); }));
  core::Connection next = c;
  next.revision = 1;
  EXPECT_TRUE((*a)->Update(next, 0, nullptr).ok());
  ASSERT_TRUE((*b)->Delete("after-restart").ok());
  EXPECT_TRUE(Eventually([&] { return changes.Count("after-restart") >= 2; }));
  a->reset();
  b->reset();
}

}  // namespace
}  // namespace tb::store::testing
