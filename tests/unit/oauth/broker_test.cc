#include "server/src/oauth/broker.h"

#include <spdlog/spdlog.h>

#include <thread>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "server/src/common/secret_format.h"
#include "server/src/core/errors.h"
#include "server/src/store/in_memory_token_store.h"
#include "tests/fakes/fake_clock.h"
#include "tests/support/test_secrets.h"

namespace tb::oauth {
namespace {

using core::ConnectionStatus;
using core::Reason;

class BrokerTest : public ::testing::Test {
 protected:
  core::Grant NewGrant(absl::Duration lifetime) {
    core::Grant g;
    g.access_token = AccessToken(testing::NewTestSecret("access"));
    g.refresh_token = RefreshToken(testing::NewTestSecret("refresh"));
    g.scopes = {"read", "write"};
    g.issued_at = clock_.Now();
    g.expires_at = clock_.Now() + lifetime;
    spdlog::debug("test grant {} {}", g.access_token, *g.refresh_token);
    return g;
  }

  void CreateActive(const std::string& id, absl::Duration lifetime = absl::Hours(1)) {
    ASSERT_TRUE(broker_.CreatePending(id, "zendesk", {{"subdomain", "acme"}}).ok());
    ASSERT_TRUE(broker_.Activate(id, NewGrant(lifetime)).ok());
  }

  testing::FakeClock clock_;
  store::InMemoryTokenStore store_;
  cache::ConnectionCache cache_;
  Broker broker_{clock_, store_, cache_};
};

TEST_F(BrokerTest, UnknownConnectionIsNotFound) {
  EXPECT_EQ(broker_.GetToken("nobody").status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(broker_.GetConnection("nobody").status().code(), absl::StatusCode::kNotFound);
}

TEST_F(BrokerTest, PendingConnectionIsNotConnected) {
  ASSERT_TRUE(broker_.CreatePending("acme", "zendesk", {}).ok());
  const absl::Status s = broker_.GetToken("acme").status();
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(core::ReasonOf(s), Reason::kNotConnected);
}

TEST_F(BrokerTest, ActivatedConnectionServesItsTokenWithPromise) {
  ASSERT_TRUE(broker_.CreatePending("acme", "zendesk", {}).ok());
  core::Grant g = NewGrant(absl::Minutes(30));
  const std::string raw(g.access_token.Reveal());
  ASSERT_TRUE(broker_.Activate("acme", g).ok());

  clock_.Advance(absl::Minutes(5));
  absl::StatusOr<TokenView> v = broker_.GetToken("acme");
  ASSERT_TRUE(v.ok()) << v.status();
  EXPECT_EQ(v->grant().access_token.Reveal(), raw);
  EXPECT_EQ(v->grant().generation, 1u);
  // refresh_at = expiry - 5 min (the default margin); valid_until is the earlier of the two.
  EXPECT_EQ(v->grant().refresh_at, *g.expires_at - absl::Minutes(5));
  EXPECT_EQ(v->valid_until, *g.expires_at - absl::Minutes(5));
  EXPECT_EQ(v->valid_for, absl::Minutes(20));
}

TEST_F(BrokerTest, TokenWithoutExpiryIsValidUntilRevoked) {
  ASSERT_TRUE(broker_.CreatePending("acme", "zendesk", {}).ok());
  core::Grant g = NewGrant(absl::Hours(1));
  g.expires_at.reset();
  ASSERT_TRUE(broker_.Activate("acme", g).ok());
  clock_.Advance(absl::Hours(24 * 365));
  absl::StatusOr<TokenView> v = broker_.GetToken("acme", absl::Hours(1));  // the cap
  ASSERT_TRUE(v.ok());
  EXPECT_EQ(v->valid_until, absl::InfiniteFuture());
  EXPECT_EQ(v->valid_for, absl::InfiniteDuration());
}

TEST_F(BrokerTest, ExpiredOrTooShortTokenIsUnavailable) {
  CreateActive("acme", absl::Minutes(10));  // refresh_at: 5 min in
  EXPECT_TRUE(broker_.GetToken("acme", absl::Minutes(4)).ok());
  clock_.Advance(absl::Minutes(2));  // 3 min of the promise left
  EXPECT_EQ(broker_.GetToken("acme", absl::Minutes(4)).status().code(),
            absl::StatusCode::kUnavailable);  // a waiting caller would wait for the refresh
  clock_.Advance(absl::Minutes(8));
  EXPECT_EQ(broker_.GetToken("acme").status().code(), absl::StatusCode::kUnavailable);
}

TEST_F(BrokerTest, LookupSaysWhetherToServeWaitOrFail) {
  CreateActive("acme", absl::Minutes(10));  // refresh_at: 5 min in
  EXPECT_EQ(broker_.Lookup("acme", absl::Minutes(4), 0).kind, TokenLookup::Kind::kServe);
  EXPECT_EQ(broker_.Lookup("acme", absl::Minutes(4), 2).kind, TokenLookup::Kind::kAwaitGeneration);
  // No token of this connection is promised for 6 minutes: waiting would not help.
  TokenLookup too_long = broker_.Lookup("acme", absl::Minutes(6), 0);
  EXPECT_EQ(too_long.kind, TokenLookup::Kind::kError);
  EXPECT_EQ(too_long.error.code(), absl::StatusCode::kOutOfRange);
  // Above the configured cap, or negative: a bad argument.
  EXPECT_EQ(broker_.Lookup("acme", absl::Minutes(61), 0).error.code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(broker_.Lookup("acme", -absl::Seconds(1), 0).error.code(),
            absl::StatusCode::kInvalidArgument);

  clock_.Advance(absl::Minutes(2));
  TokenLookup before_due = broker_.Lookup("acme", absl::Minutes(4), 0);
  EXPECT_EQ(before_due.kind, TokenLookup::Kind::kAwaitRefresh);
  EXPECT_FALSE(before_due.refresh_due);  // wait for the scheduled refresh, start none
  clock_.Advance(absl::Minutes(3));
  TokenLookup due = broker_.Lookup("acme", absl::ZeroDuration(), 0);
  EXPECT_EQ(due.kind, TokenLookup::Kind::kAwaitRefresh);
  EXPECT_TRUE(due.refresh_due);
  EXPECT_EQ(broker_.LastUsed("acme"), clock_.Now());
}

TEST_F(BrokerTest, UnrefreshableTokenSaysSoInsteadOfWaiting) {
  ASSERT_TRUE(broker_.CreatePending("acme", "zendesk", {}).ok());
  core::Grant g = NewGrant(absl::Minutes(10));
  g.refresh_token.reset();
  ASSERT_TRUE(broker_.Activate("acme", g).ok());
  EXPECT_EQ(broker_.Lookup("acme", absl::Minutes(4), 0).kind, TokenLookup::Kind::kServe);
  clock_.Advance(absl::Minutes(8));
  EXPECT_EQ(broker_.Lookup("acme", absl::Minutes(4), 0).error.code(),
            absl::StatusCode::kOutOfRange);
  clock_.Advance(absl::Minutes(2));
  const absl::Status expired = broker_.Lookup("acme", absl::ZeroDuration(), 0).error;
  EXPECT_EQ(expired.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(core::ReasonOf(expired), Reason::kNotRefreshable);
}

TEST_F(BrokerTest, RevokeKeepsTheTokensOnlyForTheProviderRevocation) {
  CreateActive("acme");
  const core::Grant g = *broker_.GetConnection("acme").value()->grant;
  ASSERT_TRUE(broker_.MarkRevoked("acme").ok());
  std::shared_ptr<const core::Connection> c = *broker_.GetConnection("acme");
  EXPECT_TRUE(c->grant->access_token.empty());
  ASSERT_EQ(c->to_revoke.size(), 1u);
  EXPECT_EQ(c->to_revoke.get()[0].access_token, g.access_token);
  EXPECT_EQ(store_.Load("acme")->to_revoke.size(), 1u);  // durable
  ASSERT_TRUE(broker_.ResolveRevocation("acme", g).ok());
  EXPECT_TRUE(broker_.GetConnection("acme").value()->to_revoke.empty());
  EXPECT_TRUE(store_.Load("acme")->to_revoke.empty());
}

TEST_F(BrokerTest, ReconnectQueuesThePreviousGrantForRevocationInTheSameWrite) {
  CreateActive("acme");
  const core::Grant old = *broker_.GetConnection("acme").value()->grant;
  ASSERT_TRUE(broker_.Activate("acme", NewGrant(absl::Hours(1))).ok());
  const core::Connection stored = *store_.Load("acme");
  ASSERT_EQ(stored.to_revoke.size(), 1u);
  EXPECT_EQ(stored.to_revoke.get()[0].access_token, old.access_token);
  EXPECT_EQ(stored.generation(), 2u);
}

TEST_F(BrokerTest, RescheduleMovesThePromiseButNeverPastExpiry) {
  CreateActive("acme", absl::Minutes(10));  // refresh_at: 5 min in
  clock_.Advance(absl::Minutes(5));
  ASSERT_TRUE(broker_.Reschedule("acme", 1, clock_.Now() + absl::Seconds(30)).ok());
  EXPECT_EQ(broker_.GetToken("acme")->valid_until, clock_.Now() + absl::Seconds(30));
  EXPECT_EQ(*store_.Load("acme")->grant->refresh_at, clock_.Now() + absl::Seconds(30));
  ASSERT_TRUE(broker_.Reschedule("acme", 1, clock_.Now() + absl::Hours(1)).ok());
  EXPECT_EQ(broker_.GetToken("acme")->valid_until, clock_.Now() + absl::Minutes(5));  // expiry
  EXPECT_EQ(broker_.Reschedule("acme", 7, clock_.Now()).code(), absl::StatusCode::kAborted);
}

TEST_F(BrokerTest, RescheduleWithTheStoreDownKeepsThePromiseInMemoryUntilFlushed) {
  CreateActive("acme", absl::Minutes(10));
  clock_.Advance(absl::Minutes(5));  // the refresh is due, and (say) failed: retry in 30 s
  store_.FailNextWrite(absl::UnavailableError("store unreachable"));
  ASSERT_TRUE(broker_.Reschedule("acme", 1, clock_.Now() + absl::Seconds(30)).ok());
  // Still served, with the new promise, although the store has the old one.
  absl::StatusOr<TokenView> v = broker_.GetToken("acme", absl::Seconds(10));
  ASSERT_TRUE(v.ok()) << v.status();
  EXPECT_EQ(v->valid_until, clock_.Now() + absl::Seconds(30));
  EXPECT_EQ(*store_.Load("acme")->grant->refresh_at, clock_.Now());
  EXPECT_EQ(broker_.unwritten(), 1u);
  EXPECT_EQ(broker_.FlushUnwritten(), 0u);
  EXPECT_EQ(*store_.Load("acme")->grant->refresh_at, clock_.Now() + absl::Seconds(30));
  // Any other store error is still an error, and publishes nothing.
  store_.FailNextWrite(absl::InternalError("constraint violated"));
  EXPECT_EQ(broker_.Reschedule("acme", 1, clock_.Now() + absl::Seconds(60)).code(),
            absl::StatusCode::kInternal);
  EXPECT_EQ(broker_.GetToken("acme")->valid_until, clock_.Now() + absl::Seconds(30));
}

TEST_F(BrokerTest, ReactivationIncreasesGeneration) {
  CreateActive("acme");
  ASSERT_TRUE(broker_.Activate("acme", NewGrant(absl::Hours(1))).ok());
  EXPECT_EQ(broker_.GetToken("acme")->grant().generation, 2u);
  EXPECT_EQ(store_.Load("acme")->generation(), 2u);
}

TEST_F(BrokerTest, NeedsReauthCarriesItsReason) {
  CreateActive("a");
  CreateActive("b");
  ASSERT_TRUE(broker_.MarkNeedsReauth("a", Reason::kNeedsReauth, "invalid_grant").ok());
  ASSERT_TRUE(broker_.MarkNeedsReauth("b", Reason::kRotationLost, "lost").ok());
  EXPECT_EQ(core::ReasonOf(broker_.GetToken("a").status()), Reason::kNeedsReauth);
  EXPECT_EQ(core::ReasonOf(broker_.GetToken("b").status()), Reason::kRotationLost);
  EXPECT_EQ(broker_.GetConnection("a").value()->status, ConnectionStatus::kNeedsReauth);
  EXPECT_EQ(broker_.MarkNeedsReauth("a", Reason::kRevoked, "").code(),
            absl::StatusCode::kInvalidArgument);
}

TEST_F(BrokerTest, RevokedConnectionForgetsItsTokens) {
  CreateActive("acme");
  ASSERT_TRUE(broker_.MarkRevoked("acme").ok());
  const absl::Status s = broker_.GetToken("acme").status();
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(core::ReasonOf(s), Reason::kRevoked);
  const core::Connection stored = *store_.Load("acme");
  EXPECT_TRUE(stored.grant->access_token.empty());
  EXPECT_FALSE(stored.grant->refresh_token.has_value());
  EXPECT_EQ(stored.grant->generation, 1u);
}

TEST_F(BrokerTest, DeletedConnectionIsNotFound) {
  CreateActive("acme");
  ASSERT_TRUE(broker_.Delete("acme").ok());
  EXPECT_EQ(broker_.GetToken("acme").status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(store_.Load("acme").status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(broker_.Delete("acme").code(), absl::StatusCode::kNotFound);
}

TEST_F(BrokerTest, CreateRejectsBadIdsAndDuplicates) {
  EXPECT_EQ(broker_.CreatePending("bad id", "zendesk", {}).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(broker_.CreatePending("acme", "", {}).status().code(),
            absl::StatusCode::kInvalidArgument);
  ASSERT_TRUE(broker_.CreatePending("acme", "zendesk", {}).ok());
  EXPECT_EQ(broker_.CreatePending("acme", "zendesk", {}).status().code(),
            absl::StatusCode::kAlreadyExists);
}

TEST_F(BrokerTest, FailedStoreWritePublishesNothingAndLosesNothing) {
  CreateActive("acme");
  const std::string before(broker_.GetToken("acme")->grant().access_token.Reveal());
  store_.FailNextWrite(absl::UnavailableError("disk gone"));
  EXPECT_EQ(broker_.Activate("acme", NewGrant(absl::Hours(1))).status().code(),
            absl::StatusCode::kUnavailable);
  absl::StatusOr<TokenView> v = broker_.GetToken("acme");
  ASSERT_TRUE(v.ok());
  EXPECT_EQ(v->grant().access_token.Reveal(), before);
  EXPECT_EQ(v->grant().generation, 1u);

  store_.FailNextWrite(absl::UnavailableError("disk gone"));
  EXPECT_FALSE(broker_.MarkRevoked("acme").ok());
  EXPECT_TRUE(broker_.GetToken("acme").ok());
}

TEST_F(BrokerTest, LoadPublishesEveryStoredConnection) {
  for (int i = 0; i < 10; ++i) {
    core::Connection c;
    c.id = absl::StrCat("c", i);
    c.provider = "zendesk";
    ASSERT_TRUE(store_.Create(c).ok());
  }
  ASSERT_TRUE(broker_.Load().ok());
  EXPECT_EQ(cache_.size(), 10u);
  EXPECT_EQ(core::ReasonOf(broker_.GetToken("c3").status()), Reason::kNotConnected);
}

TEST_F(BrokerTest, ListConnectionsValidatesPageSize) {
  EXPECT_EQ(broker_.ListConnections({}, 0, "").status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(broker_.ListConnections({}, 1001, "").status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(broker_.ListConnections({}, 1000, "").ok());
}

// Lifecycle writers racing on one connection: whatever interleaving, the cache and the store
// agree at the end and generations only go up. Runs under ThreadSanitizer in CI.
TEST_F(BrokerTest, ConcurrentLifecycleChangesKeepCacheAndStoreInAgreement) {
  CreateActive("acme");
  std::vector<core::Grant> grants;
  for (int i = 0; i < 200; ++i) {
    grants.push_back(NewGrant(absl::Hours(1)));
  }
  std::atomic<int> readers_bad{0};
  std::atomic<bool> stop{false};
  std::thread reader([&] {
    uint64_t last = 0;
    while (!stop) {
      absl::StatusOr<TokenView> v = broker_.GetToken("acme");
      if (v.ok()) {
        if (v->grant().generation < last) {
          readers_bad++;
        }
        last = v->grant().generation;
      }
    }
  });
  std::vector<std::thread> writers;
  for (int w = 0; w < 2; ++w) {
    writers.emplace_back([&, w] {
      for (int i = w; i < 200; i += 2) {
        (void)broker_.Activate("acme", grants[i]);  // ABORTED on a lost race is fine
      }
    });
  }
  for (std::thread& t : writers) {
    t.join();
  }
  stop = true;
  reader.join();
  EXPECT_EQ(readers_bad.load(), 0);
  const core::Connection stored = *store_.Load("acme");
  std::shared_ptr<const core::Connection> cached = *broker_.GetConnection("acme");
  EXPECT_EQ(stored.generation(), cached->generation());
  EXPECT_EQ(stored.grant->access_token, cached->grant->access_token);
  EXPECT_GE(cached->generation(), 2u);
}

}  // namespace
}  // namespace tb::oauth
