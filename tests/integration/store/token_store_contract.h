#ifndef TB_TESTS_INTEGRATION_STORE_TOKEN_STORE_CONTRACT_H_
#define TB_TESTS_INTEGRATION_STORE_TOKEN_STORE_CONTRACT_H_

// The contracts of core::TokenStore and core::FlowStore as value-parameterized GoogleTest
// suites, so that every backend runs the same cases. A backend's test file includes this
// header (in exactly one translation unit of its binary), defines a StoreBackend and
// instantiates:
//
//   INSTANTIATE_TEST_SUITE_P(Sqlite, TokenStoreContractTest,
//                            ::testing::Values(SqliteBackend()), BackendName);
//   INSTANTIATE_TEST_SUITE_P(Sqlite, DurableStoreContractTest,
//                            ::testing::Values(SqliteBackend()), BackendName);
//
// TokenStoreContractTest holds what every store must do, the in-memory one included;
// DurableStoreContractTest what only a store that keeps data outside the process can show
// (a reopen keeps everything, an unreadable row gives DATA_LOSS for that connection alone).

#include <cstddef>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "server/src/core/flow_store.h"
#include "server/src/core/token_store.h"
#include "tests/integration/store/store_harness.h"
#include "tests/integration/store/store_test_support.h"

namespace tb::store::testing {

class TokenStoreContractTest : public ::testing::TestWithParam<StoreBackend> {
 protected:
  void SetUp() override {
    harness_ = GetParam().make(BackendOptions{});
    ASSERT_NE(harness_, nullptr);
  }
  core::TokenStore& tokens() { return harness_->tokens(); }
  core::FlowStore& flows() { return harness_->flows(); }

  std::unique_ptr<StoreHarness> harness_;
};

class DurableStoreContractTest : public TokenStoreContractTest {};
GTEST_ALLOW_UNINSTANTIATED_PARAMETERIZED_TEST(DurableStoreContractTest);

// ---- Connections ---------------------------------------------------------------------------

TEST_P(TokenStoreContractTest, LoadOfUnknownIdIsNotFound) {
  EXPECT_EQ(tokens().Load("nobody").status().code(), absl::StatusCode::kNotFound);
  absl::StatusOr<std::vector<core::Connection>> all = tokens().LoadAll();
  ASSERT_TRUE(all.ok()) << all.status();
  EXPECT_TRUE(all->empty());
}

TEST_P(TokenStoreContractTest, EveryFieldRoundTrips) {
  const core::Connection c = FullConnection("acme");
  ASSERT_TRUE(tokens().Create(c).ok());
  absl::StatusOr<core::Connection> loaded = tokens().Load("acme");
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  ExpectSameConnection(*loaded, c);
}

TEST_P(TokenStoreContractTest, PendingConnectionWithoutGrantRoundTrips) {
  const core::Connection c = PendingConnection("beta");
  ASSERT_TRUE(tokens().Create(c).ok());
  absl::StatusOr<core::Connection> loaded = tokens().Load("beta");
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  ExpectSameConnection(*loaded, c);
  EXPECT_FALSE(loaded->grant.has_value());
  EXPECT_FALSE(loaded->refresh_intent.has_value());
}

TEST_P(TokenStoreContractTest, AbsentOptionalsAndInfiniteTimesRoundTrip) {
  core::Connection c = FullConnection("classic");
  // A classic Zendesk token: no expiry, no refresh token, nothing scheduled.
  c.grant->refresh_token.reset();
  c.grant->expires_at.reset();
  c.grant->refresh_at.reset();
  c.grant->refresh_token_expires_at.reset();
  c.grant->scopes.clear();
  c.grant->issued_at = absl::InfinitePast();
  c.refresh_intent.reset();
  c.to_revoke.clear();
  c.params.clear();
  c.last_error.clear();
  c.status = core::ConnectionStatus::kRevoked;
  c.reason = core::Reason::kRevoked;
  c.updated_at = absl::InfiniteFuture();
  ASSERT_TRUE(tokens().Create(c).ok());
  absl::StatusOr<core::Connection> loaded = tokens().Load("classic");
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  ExpectSameConnection(*loaded, c);
}

TEST_P(TokenStoreContractTest, EveryStatusAndReasonRoundTrips) {
  const std::pair<core::ConnectionStatus, core::Reason> cases[] = {
      {core::ConnectionStatus::kPending, core::Reason::kNotConnected},
      {core::ConnectionStatus::kActive, core::Reason::kNone},
      {core::ConnectionStatus::kNeedsReauth, core::Reason::kNeedsReauth},
      {core::ConnectionStatus::kNeedsReauth, core::Reason::kRotationLost},
      {core::ConnectionStatus::kNeedsReauth, core::Reason::kNotRefreshable},
      {core::ConnectionStatus::kNeedsReauth, core::Reason::kProviderMisconfigured},
      {core::ConnectionStatus::kRevoked, core::Reason::kRevoked},
  };
  int i = 0;
  for (const auto& [status, reason] : cases) {
    core::Connection c = PendingConnection(absl::StrCat("c", i++));
    c.status = status;
    c.reason = reason;
    ASSERT_TRUE(tokens().Create(c).ok());
    absl::StatusOr<core::Connection> loaded = tokens().Load(c.id);
    ASSERT_TRUE(loaded.ok()) << loaded.status();
    EXPECT_EQ(loaded->status, status);
    EXPECT_EQ(loaded->reason, reason);
  }
}

TEST_P(TokenStoreContractTest, CreateOfExistingIdIsAlreadyExistsAndKeepsTheFirst) {
  const core::Connection first = FullConnection("acme");
  ASSERT_TRUE(tokens().Create(first).ok());
  core::Connection second = PendingConnection("acme");
  EXPECT_EQ(tokens().Create(second).code(), absl::StatusCode::kAlreadyExists);
  absl::StatusOr<core::Connection> loaded = tokens().Load("acme");
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  ExpectSameConnection(*loaded, first);
}

TEST_P(TokenStoreContractTest, UpdateAtTheExpectedRevisionReplaces) {
  core::Connection c = PendingConnection("acme");
  ASSERT_TRUE(tokens().Create(c).ok());
  core::Connection next = FullConnection("acme");
  next.revision = c.revision + 1;
  ASSERT_TRUE(tokens().Update(next, c.revision, nullptr).ok());
  absl::StatusOr<core::Connection> loaded = tokens().Load("acme");
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  ExpectSameConnection(*loaded, next);
}

TEST_P(TokenStoreContractTest, StaleUpdateIsAbortedAndNeverOverwritesTheNewer) {
  core::Connection c = FullConnection("acme");
  ASSERT_TRUE(tokens().Create(c).ok());
  core::Connection newer = c;
  newer.revision = 1;
  newer.grant = FullGrant(8, "newer");
  ASSERT_TRUE(tokens().Update(newer, 0, nullptr).ok());

  core::Connection stale = c;  // a writer that read revision 0 and lost the race
  stale.revision = 1;
  stale.grant = FullGrant(8, "stale");
  EXPECT_EQ(tokens().Update(stale, 0, nullptr).code(), absl::StatusCode::kAborted);
  // Nor does a guess of a revision that was never written.
  stale.revision = 6;
  EXPECT_EQ(tokens().Update(stale, 5, nullptr).code(), absl::StatusCode::kAborted);

  absl::StatusOr<core::Connection> loaded = tokens().Load("acme");
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  ExpectSameConnection(*loaded, newer);
}

TEST_P(TokenStoreContractTest, UpdateOfUnknownIdIsNotFound) {
  core::Connection c = FullConnection("nobody");
  c.revision = 1;
  EXPECT_EQ(tokens().Update(c, 0, nullptr).code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(tokens().Load("nobody").status().code(), absl::StatusCode::kNotFound);
}

TEST_P(TokenStoreContractTest, DeleteRemovesAndASecondDeleteIsNotFound) {
  ASSERT_TRUE(tokens().Create(FullConnection("acme")).ok());
  ASSERT_TRUE(tokens().Create(PendingConnection("beta")).ok());
  ASSERT_TRUE(tokens().Delete("acme").ok());
  EXPECT_EQ(tokens().Load("acme").status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(tokens().Delete("acme").code(), absl::StatusCode::kNotFound);
  EXPECT_TRUE(tokens().Load("beta").ok());
  // The id can be used again.
  EXPECT_TRUE(tokens().Create(PendingConnection("acme")).ok());
}

TEST_P(TokenStoreContractTest, TheCountHintIsTheNumberOfStoredConnections) {
  EXPECT_EQ(tokens().ConnectionCountHint(), 0u);
  for (int i = 0; i < 3; ++i) {
    ASSERT_TRUE(tokens().Create(FullConnection(absl::StrCat("count-", i))).ok());
  }
  ASSERT_TRUE(tokens().Delete("count-1").ok());
  EXPECT_EQ(tokens().ConnectionCountHint(), 2u);
}

TEST_P(TokenStoreContractTest, LoadAllReturnsEveryConnection) {
  std::vector<core::Connection> written;
  for (int i = 0; i < 5; ++i) {
    written.push_back(i % 2 == 0 ? FullConnection(absl::StrCat("full-", i))
                                 : PendingConnection(absl::StrCat("pending-", i)));
    ASSERT_TRUE(tokens().Create(written.back()).ok());
  }
  absl::StatusOr<std::vector<core::Connection>> all = tokens().LoadAll();
  ASSERT_TRUE(all.ok()) << all.status();
  ASSERT_EQ(all->size(), written.size());
  for (const core::Connection& w : written) {
    bool found = false;
    for (const core::Connection& c : *all) {
      if (c.id == w.id) {
        found = true;
        ExpectSameConnection(c, w);
      }
    }
    EXPECT_TRUE(found) << w.id;
  }
}

TEST_P(TokenStoreContractTest, AFreeLeaseIsGrantedAndItsFenceAllowsUpdates) {
  core::Connection c = FullConnection("acme");
  ASSERT_TRUE(tokens().Create(c).ok());
  absl::StatusOr<std::optional<core::Lease>> lease =
      tokens().AcquireLease("acme", absl::Seconds(30));
  ASSERT_TRUE(lease.ok()) << lease.status();
  ASSERT_TRUE(lease->has_value());
  EXPECT_EQ((*lease)->id, "acme");
  EXPECT_FALSE((*lease)->owner.empty());
  c.revision = 1;
  EXPECT_TRUE(tokens().Update(c, 0, &**lease).ok());
  EXPECT_TRUE(tokens().ReleaseLease(**lease).ok());
}

TEST_P(TokenStoreContractTest, ConcurrentCompareAndSetWritersLoseNoUpdate) {
  ASSERT_TRUE(tokens().Create(PendingConnection("counter")).ok());
  constexpr int kThreads = 4;
  constexpr int kUpdatesEach = 25;
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([this, t] {
      int done = 0;
      while (done < kUpdatesEach) {
        absl::StatusOr<core::Connection> c = tokens().Load("counter");
        ASSERT_TRUE(c.ok()) << c.status();
        const uint64_t seen = c->revision;
        c->revision = seen + 1;
        c->last_error = absl::StrCat("thread ", t, " update ", done);
        const absl::Status s = tokens().Update(*c, seen, nullptr);
        if (s.ok()) {
          ++done;
        } else {
          ASSERT_EQ(s.code(), absl::StatusCode::kAborted) << s;
        }
      }
    });
  }
  for (std::thread& t : threads) {
    t.join();
  }
  absl::StatusOr<core::Connection> c = tokens().Load("counter");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->revision, static_cast<uint64_t>(kThreads * kUpdatesEach));
}

// ---- Links ---------------------------------------------------------------------------------

TEST_P(TokenStoreContractTest, LinkRoundTripsAndPutReplaces) {
  core::LinkRecord r = FullLink("link-1");
  ASSERT_TRUE(flows().PutLink(r).ok());
  absl::StatusOr<core::LinkRecord> got = flows().GetLink("link-1");
  ASSERT_TRUE(got.ok()) << got.status();
  ExpectSameLink(*got, r);

  r.link.reconnect = false;
  r.link.params = {{"subdomain", "other"}};
  r.used_at = T(60);
  ASSERT_TRUE(flows().PutLink(r).ok());
  got = flows().GetLink("link-1");
  ASSERT_TRUE(got.ok()) << got.status();
  ExpectSameLink(*got, r);
}

TEST_P(TokenStoreContractTest, UnknownLinkIsNotFound) {
  EXPECT_EQ(flows().GetLink("nope").status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(flows().RevokeLink("nope").code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(flows().MarkLinkUsed("nope", T(1)).code(), absl::StatusCode::kNotFound);
}

TEST_P(TokenStoreContractTest, RevokeAndMarkUsedChangeOnlyTheirField) {
  const core::LinkRecord r = FullLink("link-1");
  ASSERT_TRUE(flows().PutLink(r).ok());
  ASSERT_TRUE(flows().PutLink(FullLink("link-2")).ok());
  ASSERT_TRUE(flows().RevokeLink("link-1").ok());
  ASSERT_TRUE(flows().MarkLinkUsed("link-1", T(120)).ok());
  absl::StatusOr<core::LinkRecord> got = flows().GetLink("link-1");
  ASSERT_TRUE(got.ok()) << got.status();
  core::LinkRecord want = r;
  want.revoked = true;
  want.used_at = T(120);
  ExpectSameLink(*got, want);
  got = flows().GetLink("link-2");
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_FALSE(got->revoked);
  EXPECT_FALSE(got->used_at.has_value());
}

// ---- Authorizations ------------------------------------------------------------------------

TEST_P(TokenStoreContractTest, AuthorizationRoundTripsAndWorksExactlyOnce) {
  const core::PendingAuthorization a = FullAuthorization(T(120));
  ASSERT_TRUE(flows().PutAuthorization(a, T(0)).ok());
  absl::StatusOr<core::PendingAuthorization> got =
      flows().TakeAuthorization(a.state.Reveal(), T(1));
  ASSERT_TRUE(got.ok()) << got.status();
  ExpectSameAuthorization(*got, a);
  EXPECT_EQ(flows().TakeAuthorization(a.state.Reveal(), T(1)).status().code(),
            absl::StatusCode::kNotFound);
}

TEST_P(TokenStoreContractTest, AuthorizationWithoutPkceRoundTrips) {
  core::PendingAuthorization a = FullAuthorization(T(120));
  a.verifier = PkceVerifier();
  a.reconnect = false;
  a.params.clear();
  ASSERT_TRUE(flows().PutAuthorization(a, T(0)).ok());
  absl::StatusOr<core::PendingAuthorization> got =
      flows().TakeAuthorization(a.state.Reveal(), T(1));
  ASSERT_TRUE(got.ok()) << got.status();
  ExpectSameAuthorization(*got, a);
}

TEST_P(TokenStoreContractTest, UnknownStateIsNotFound) {
  ASSERT_TRUE(flows().PutAuthorization(FullAuthorization(T(120)), T(0)).ok());
  EXPECT_EQ(flows().TakeAuthorization("not-a-state", T(1)).status().code(),
            absl::StatusCode::kNotFound);
  EXPECT_EQ(flows().TakeAuthorization("", T(1)).status().code(), absl::StatusCode::kNotFound);
}

TEST_P(TokenStoreContractTest, ExpiredAuthorizationIsNotFoundAndConsumed) {
  const core::PendingAuthorization a = FullAuthorization(T(120));
  ASSERT_TRUE(flows().PutAuthorization(a, T(0)).ok());
  EXPECT_EQ(flows().TakeAuthorization(a.state.Reveal(), T(120)).status().code(),
            absl::StatusCode::kNotFound);
  // Gone, not merely refused: an earlier clock does not bring it back.
  EXPECT_EQ(flows().TakeAuthorization(a.state.Reveal(), T(1)).status().code(),
            absl::StatusCode::kNotFound);
}

TEST_P(TokenStoreContractTest, PendingAuthorizationsAreCappedAndExpiredOnesPurged) {
  std::unique_ptr<StoreHarness> small =
      GetParam().make(BackendOptions{.max_pending_authorizations = 3});
  ASSERT_NE(small, nullptr);
  core::FlowStore& flows = small->flows();
  const core::PendingAuthorization soon = FullAuthorization(T(10));
  const core::PendingAuthorization later1 = FullAuthorization(T(600));
  const core::PendingAuthorization later2 = FullAuthorization(T(600));
  ASSERT_TRUE(flows.PutAuthorization(soon, T(0)).ok());
  ASSERT_TRUE(flows.PutAuthorization(later1, T(0)).ok());
  ASSERT_TRUE(flows.PutAuthorization(later2, T(0)).ok());
  const core::PendingAuthorization extra = FullAuthorization(T(600));
  EXPECT_EQ(flows.PutAuthorization(extra, T(5)).code(), absl::StatusCode::kResourceExhausted);
  // Once `soon` has expired, putting purges it and there is room again.
  ASSERT_TRUE(flows.PutAuthorization(extra, T(11)).ok());
  EXPECT_EQ(flows.TakeAuthorization(soon.state.Reveal(), T(1)).status().code(),
            absl::StatusCode::kNotFound);
  EXPECT_TRUE(flows.TakeAuthorization(later1.state.Reveal(), T(12)).ok());
  EXPECT_TRUE(flows.TakeAuthorization(later2.state.Reveal(), T(12)).ok());
  EXPECT_TRUE(flows.TakeAuthorization(extra.state.Reveal(), T(12)).ok());
  // Taking frees room too.
  for (int i = 0; i < 3; ++i) {
    EXPECT_TRUE(flows.PutAuthorization(FullAuthorization(T(600)), T(12)).ok());
  }
}

// ---- Durable stores ------------------------------------------------------------------------

TEST_P(DurableStoreContractTest, ReopenKeepsConnectionsLinksAndAuthorizations) {
  const core::Connection full = FullConnection("acme");
  const core::Connection pending = PendingConnection("beta");
  ASSERT_TRUE(tokens().Create(full).ok());
  ASSERT_TRUE(tokens().Create(pending).ok());
  core::LinkRecord link = FullLink("link-1");
  ASSERT_TRUE(flows().PutLink(link).ok());
  ASSERT_TRUE(flows().MarkLinkUsed("link-1", T(30)).ok());
  link.used_at = T(30);
  const core::PendingAuthorization auth = FullAuthorization(T(120));
  ASSERT_TRUE(flows().PutAuthorization(auth, T(0)).ok());

  ASSERT_TRUE(harness_->Reopen().ok());

  absl::StatusOr<std::vector<core::Connection>> all = tokens().LoadAll();
  ASSERT_TRUE(all.ok()) << all.status();
  ASSERT_EQ(all->size(), 2u);
  absl::StatusOr<core::Connection> loaded = tokens().Load("acme");
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  ExpectSameConnection(*loaded, full);
  loaded = tokens().Load("beta");
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  ExpectSameConnection(*loaded, pending);
  absl::StatusOr<core::LinkRecord> got_link = flows().GetLink("link-1");
  ASSERT_TRUE(got_link.ok()) << got_link.status();
  ExpectSameLink(*got_link, link);
  absl::StatusOr<core::PendingAuthorization> got_auth =
      flows().TakeAuthorization(auth.state.Reveal(), T(1));
  ASSERT_TRUE(got_auth.ok()) << got_auth.status();
  ExpectSameAuthorization(*got_auth, auth);

  // The revision survives too: compare-and-set continues where it was.
  core::Connection next = full;
  next.revision = 1;
  EXPECT_TRUE(tokens().Update(next, 0, nullptr).ok());
  ASSERT_TRUE(harness_->Reopen().ok());
  EXPECT_EQ(tokens().Update(next, 0, nullptr).code(), absl::StatusCode::kAborted);
  EXPECT_EQ(flows().TakeAuthorization(auth.state.Reveal(), T(1)).status().code(),
            absl::StatusCode::kNotFound);
}

TEST_P(DurableStoreContractTest, UnreadableSecretsGiveDataLossForThatConnectionOnly) {
  const core::Connection bad = FullConnection("bad");
  const core::Connection good = FullConnection("good");
  const core::Connection pending = PendingConnection("pending");
  ASSERT_TRUE(tokens().Create(bad).ok());
  ASSERT_TRUE(tokens().Create(good).ok());
  ASSERT_TRUE(tokens().Create(pending).ok());
  ASSERT_TRUE(harness_->CorruptConnectionSecrets("bad").ok());

  absl::StatusOr<std::vector<core::Connection>> all = tokens().LoadAll();
  ASSERT_TRUE(all.ok()) << all.status();  // one bad row never fails the load
  ASSERT_EQ(all->size(), 3u);
  for (const core::Connection& c : *all) {
    if (c.id == "bad") {
      EXPECT_FALSE(c.data_loss.empty());
    } else {
      EXPECT_TRUE(c.data_loss.empty()) << c.id << ": " << c.data_loss.get();
    }
  }
  absl::StatusOr<core::Connection> loaded = tokens().Load("bad");
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  EXPECT_FALSE(loaded->data_loss.empty());
  // Its metadata is still there; its secrets are not (and are not made up).
  EXPECT_EQ(loaded->provider, bad.provider);
  EXPECT_EQ(loaded->status, bad.status);
  EXPECT_EQ(loaded->generation(), bad.generation());
  EXPECT_EQ(loaded->revision, bad.revision);
  if (loaded->grant) {
    EXPECT_TRUE(loaded->grant->access_token.empty());
    EXPECT_FALSE(loaded->grant->refresh_token.has_value());
  }
  EXPECT_TRUE(loaded->to_revoke.empty());

  loaded = tokens().Load("good");
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  ExpectSameConnection(*loaded, good);

  // A reconnect writes a fresh grant over it, and the connection is whole again.
  core::Connection reconnected = FullConnection("bad");
  reconnected.grant = FullGrant(bad.generation() + 1, "reconnected");
  reconnected.revision = 1;
  ASSERT_TRUE(tokens().Update(reconnected, 0, nullptr).ok());
  loaded = tokens().Load("bad");
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  ExpectSameConnection(*loaded, reconnected);
}

}  // namespace tb::store::testing

#endif  // TB_TESTS_INTEGRATION_STORE_TOKEN_STORE_CONTRACT_H_
