#include "server/src/oauth/refresher.h"

#include <atomic>
#include <thread>

#include "gtest/gtest.h"
#include "server/src/core/errors.h"
#include "server/src/core/provider_presets.h"
#include "server/src/core/retry_after.h"
#include "server/src/store/in_memory_token_store.h"
#include "tests/fakes/fake_clock.h"
#include "tests/fakes/fake_provider_client.h"
#include "tests/support/test_secrets.h"

namespace tb::oauth {
namespace {

using core::Reason;

// Collects one callback's result: done() tells whether it arrived, Wait() blocks until it did.
class Result {
 public:
  Refresher::Done Callback() {
    return [this](absl::StatusOr<TokenView> r) {
      MutexLock lock(&mu_);
      EXPECT_FALSE(result_.has_value()) << "done ran twice";
      result_ = std::move(r);
      cv_.SignalAll();
    };
  }
  bool done() const {
    MutexLock lock(&mu_);
    return result_.has_value();
  }
  absl::StatusOr<TokenView> Wait() {
    MutexLock lock(&mu_);
    while (!result_) {
      cv_.Wait(&mu_);
    }
    return *result_;
  }

 private:
  mutable Mutex mu_;
  CondVar cv_;
  std::optional<absl::StatusOr<TokenView>> result_ ABSL_GUARDED_BY(mu_);
};

class RefresherTest : public ::testing::Test {
 protected:
  void TearDown() override { work_.Stop(); }  // no flight outlives the fixture

  RefresherTest() {
    core::ProviderSpec spec = *core::PresetSpec("zendesk");
    spec.name = "zendesk";
    providers_.Put("zendesk", spec);
  }

  core::Grant NewGrant(absl::Duration lifetime, bool with_refresh_token = true) {
    core::Grant g;
    g.access_token = AccessToken(testing::NewTestSecret("access"));
    if (with_refresh_token) {
      g.refresh_token = RefreshToken(testing::NewTestSecret("refresh"));
    }
    g.issued_at = clock_.Now();
    g.expires_at = clock_.Now() + lifetime;
    return g;
  }

  void Connect(const std::string& id, absl::Duration lifetime = absl::Minutes(30),
               bool with_refresh_token = true) {
    ASSERT_TRUE(broker_.CreatePending(id, "zendesk", {{"subdomain", "acme"}}).ok());
    ASSERT_TRUE(broker_.Activate(id, NewGrant(lifetime, with_refresh_token)).ok());
  }

  std::unique_ptr<Refresher> MakeRefresher(RefresherOptions options) {
    return std::make_unique<Refresher>(
        options, providers_, clock_, broker_ref(), provider_, revoker_,
        [this](std::function<void()> task) { work_.Post(std::move(task)); });
  }
  BrokerOptions TrackingOptions() {
    BrokerOptions o;
    o.on_change = [this](const auto& c, const auto& id) {
      if (hooked_) {
        refresher_->Track(c, id);
      }
    };
    return o;
  }

  absl::StatusOr<TokenView> RefreshAndWait(const std::string& id, uint64_t if_generation) {
    Result r;
    refresher_->Refresh(id, if_generation, r.Callback());
    return r.Wait();
  }

  // Runs due refreshes and waits until the provider was called `calls` times in all.
  void RunDueAndAwait(int calls) {
    refresher_->RunDue();
    provider_.AwaitRefreshCalls(calls);
    work_.Drain();  // the flight's write happens before the assertions
  }

  bool hooked_ = true;  // false: changes do not reach the refresher (as during a load)
  testing::FakeClock clock_;
  store::InMemoryTokenStore store_;
  cache::ConnectionCache cache_;
  core::ProviderDirectory providers_;
  testing::FakeProviderClient provider_;
  WorkPool work_{4, "test-work"};
  // Declared before the broker, whose on_change hook feeds it.
  Revoker revoker_{{}, providers_, clock_, broker_ref(), provider_};
  std::unique_ptr<Refresher> refresher_holder_ = MakeRefresher({});
  Refresher* refresher_ = refresher_holder_.get();
  Broker broker_{clock_, store_, cache_, TrackingOptions()};

  // Replaces the refresher (before any connection exists), for tests of other options.
  void UseOptions(RefresherOptions options) {
    refresher_holder_ = MakeRefresher(options);
    refresher_ = refresher_holder_.get();
  }

 private:
  Broker& broker_ref() { return broker_; }  // bound now, used only after construction
};

TEST_F(RefresherTest, ScheduledRefreshHappensAtRefreshAtAndNeverBefore) {
  Connect("acme", absl::Minutes(30));
  const TokenView before = *broker_.GetToken("acme");
  EXPECT_EQ(before.valid_until, before.grant().issued_at + absl::Minutes(25));

  clock_.Advance(absl::Minutes(25) - absl::Seconds(1));
  refresher_->RunDue();
  EXPECT_EQ(provider_.refresh_calls(), 0);  // the promise holds until valid_until

  const core::Grant next = NewGrant(absl::Minutes(30));
  provider_.NextRefreshReturns(next);
  clock_.Advance(absl::Seconds(1));
  RunDueAndAwait(1);
  absl::StatusOr<TokenView> after = broker_.GetToken("acme");
  ASSERT_TRUE(after.ok());
  EXPECT_EQ(after->grant().generation, 2u);
  EXPECT_EQ(after->grant().access_token, next.access_token);
  EXPECT_EQ(store_.Load("acme")->grant->access_token, next.access_token);  // stored
  EXPECT_FALSE(store_.Load("acme")->refresh_intent.has_value());
}

TEST_F(RefresherTest, StartTracksTheCacheUnlessEveryConnectionWasTrackedAsItWasPublished) {
  Connect("acme", absl::Minutes(30));  // through the hook, due at 25 min
  hooked_ = false;
  Connect("loaded", absl::Minutes(30));  // in the cache, never tracked
  hooked_ = true;

  // Told that everything was tracked as it was published: "loaded" is not looked for. (The
  // provider's answers are queued before Start: its thread may run what is due at any time.)
  provider_.NextRefreshReturns(NewGrant(absl::Minutes(30)));
  refresher_->Start(Refresher::Backlog::kAlreadyTracked);
  clock_.Advance(absl::Minutes(25));
  RunDueAndAwait(1);
  refresher_->RunDue();
  work_.Drain();
  EXPECT_EQ(provider_.refresh_calls(), 1);
  EXPECT_EQ(broker_.GetToken("acme")->grant().generation, 2u);
  EXPECT_EQ(cache_.Get("loaded")->generation(), 1u);  // not refreshed

  // The default walks the cache: "loaded", overdue, is refreshed at once.
  UseOptions({});
  provider_.NextRefreshReturns(NewGrant(absl::Minutes(30)));
  refresher_->Start();
  RunDueAndAwait(2);
  EXPECT_EQ(broker_.GetToken("loaded")->grant().generation, 2u);
  EXPECT_EQ(broker_.GetToken("acme")->grant().generation, 2u);  // not due again yet
}

TEST_F(RefresherTest, ADeletedConnectionsQueuedRefreshIsDroppedAndItsNewIncarnationKeepsItsOwn) {
  Connect("acme", absl::Minutes(30));  // queued for 25 min
  Connect("other", absl::Minutes(30));
  ASSERT_TRUE(broker_.Delete("acme").ok());
  ASSERT_TRUE(broker_.Delete("other").ok());
  Connect("acme", absl::Minutes(60));  // generation 1 again, due at 55 min
  clock_.Advance(absl::Minutes(25));
  refresher_->RunDue();  // both old entries pop: one superseded, one untracked
  work_.Drain();
  EXPECT_EQ(provider_.refresh_calls(), 0);

  Connect("other", absl::Minutes(30));  // tracked afresh after its old schedule went
  clock_.Advance(absl::Minutes(30));    // 55 min: acme's; other's at 25 min after its reconnect
  provider_.NextRefreshReturns(NewGrant(absl::Minutes(30)));
  provider_.NextRefreshReturns(NewGrant(absl::Minutes(30)));
  RunDueAndAwait(2);
  EXPECT_EQ(broker_.GetToken("acme")->grant().generation, 2u);
  EXPECT_EQ(broker_.GetToken("other")->grant().generation, 2u);
  EXPECT_EQ(provider_.refresh_calls(), 2);
}

TEST_F(RefresherTest, FailedScheduledRefreshIsRetriedLaterWhileTheOldTokenServes) {
  Connect("acme", absl::Hours(1));
  provider_.NextRefreshReturns(absl::UnavailableError("provider down"));
  clock_.Advance(absl::Minutes(55));
  refresher_->RunDue();
  provider_.AwaitRefreshCalls(1);
  for (int i = 0; i < 2000 && refresher_->RunDue() == absl::InfiniteFuture(); ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1));  // until the retry is queued
  }
  EXPECT_EQ(broker_.GetConnection("acme").value()->generation(), 1u);
  clock_.Advance(absl::Seconds(29));
  refresher_->RunDue();
  EXPECT_EQ(provider_.refresh_calls(), 1);  // not before the retry delay
  provider_.NextRefreshReturns(NewGrant(absl::Hours(1)));
  clock_.Advance(absl::Seconds(1));
  RunDueAndAwait(2);
  EXPECT_EQ(broker_.GetConnection("acme").value()->generation(), 2u);
}

TEST_F(RefresherTest, TwoSecondTokensDoNotLoop) {
  Connect("acme", absl::Seconds(2));
  provider_.NextRefreshReturns(NewGrant(absl::Seconds(2)));
  clock_.Advance(absl::Seconds(1));
  refresher_->RunDue();
  provider_.AwaitRefreshCalls(1);
  // Let the flight finish before looking.
  work_.Drain();  // the flight
  ASSERT_EQ(broker_.GetConnection("acme").value()->generation(), 2u);
  // The new token's refresh is a second away, not now.
  refresher_->RunDue();
  refresher_->RunDue();
  EXPECT_EQ(provider_.refresh_calls(), 1);
}

TEST_F(RefresherTest, HundredConcurrentRefreshesOfOneGenerationMakeOneProviderCall) {
  Connect("acme");
  provider_.HoldRefreshes();
  provider_.NextRefreshReturns(NewGrant(absl::Minutes(30)));
  std::vector<std::unique_ptr<Result>> results;
  for (int i = 0; i < 100; ++i) {
    results.push_back(std::make_unique<Result>());
  }
  std::vector<std::thread> callers;
  for (int i = 0; i < 100; ++i) {
    callers.emplace_back([&, i] { refresher_->Refresh("acme", 1, results[i]->Callback()); });
  }
  for (std::thread& t : callers) {
    t.join();
  }
  provider_.AwaitRefreshCalls(1);
  provider_.ReleaseRefreshes();
  for (auto& r : results) {
    absl::StatusOr<TokenView> v = r->Wait();
    ASSERT_TRUE(v.ok()) << v.status();
    EXPECT_EQ(v->grant().generation, 2u);
  }
  EXPECT_EQ(provider_.refresh_calls(), 1);
  // A caller that saw generation 1 after the fact gets generation 2 without a call.
  EXPECT_EQ(RefreshAndWait("acme", 1)->grant().generation, 2u);
  EXPECT_EQ(provider_.refresh_calls(), 1);
}

// The provider answers at once, so late callers of a round arrive just as its flight ends:
// one that read generation g before the flight published g + 1 and looks for the flight after
// it left must still get g + 1 (it once got "refreshed on request less than 10s ago"), and
// none may start a second refresh of the new generation.
TEST_F(RefresherTest, CallersArrivingAsTheFlightEndsGetItsGenerationAndStartNoOther) {
  Connect("acme");
  constexpr int kRounds = 300;
  constexpr int kCallers = 6;
  for (uint64_t g = 1; g <= kRounds; ++g) {
    clock_.Advance(absl::Seconds(11));  // past the caller rate limit
    provider_.NextRefreshReturns(NewGrant(absl::Minutes(30)));
    std::vector<std::unique_ptr<Result>> results;
    for (int i = 0; i < kCallers; ++i) {
      results.push_back(std::make_unique<Result>());
    }
    std::vector<std::thread> callers;
    for (int i = 0; i < kCallers; ++i) {
      callers.emplace_back([&, i] { refresher_->Refresh("acme", g, results[i]->Callback()); });
    }
    for (std::thread& t : callers) {
      t.join();
    }
    for (auto& r : results) {
      absl::StatusOr<TokenView> v = r->Wait();
      ASSERT_TRUE(v.ok()) << "round " << g << ": " << v.status();
      ASSERT_EQ(v->grant().generation, g + 1) << "round " << g;
    }
    ASSERT_EQ(provider_.refresh_calls(), static_cast<int>(g)) << "round " << g;
    work_.Drain();
  }
}

// The same race with a scheduled flight, which sets no caller rate limit: a caller that read
// generation g while the schedule was refreshing it, and finds no flight any more, starts one
// that must not refresh g + 1 before it is due (that would be a second provider call).
TEST_F(RefresherTest, CallersRacingAScheduledRefreshGetItsGenerationAndStartNoOther) {
  Connect("acme");
  constexpr int kRounds = 300;
  constexpr int kCallers = 4;
  for (uint64_t g = 1; g <= kRounds; ++g) {
    clock_.Advance(absl::Minutes(25));  // due: the schedule refreshes it
    provider_.NextRefreshReturns(NewGrant(absl::Minutes(30)));
    std::vector<std::unique_ptr<Result>> results;
    for (int i = 0; i < kCallers; ++i) {
      results.push_back(std::make_unique<Result>());
    }
    std::vector<std::thread> threads;
    threads.emplace_back([&] { refresher_->RunDue(); });
    for (int i = 0; i < kCallers; ++i) {
      threads.emplace_back([&, i] { refresher_->Refresh("acme", g, results[i]->Callback()); });
    }
    for (std::thread& t : threads) {
      t.join();
    }
    for (auto& r : results) {
      absl::StatusOr<TokenView> v = r->Wait();
      ASSERT_TRUE(v.ok()) << "round " << g << ": " << v.status();
      ASSERT_EQ(v->grant().generation, g + 1) << "round " << g;
    }
    work_.Drain();
    ASSERT_EQ(provider_.refresh_calls(), static_cast<int>(g)) << "round " << g;
  }
}

TEST_F(RefresherTest, CallerTriggeredRefreshesAreRateLimited) {
  Connect("acme");
  provider_.NextRefreshReturns(NewGrant(absl::Minutes(30)));
  ASSERT_TRUE(RefreshAndWait("acme", 1).ok());
  EXPECT_EQ(RefreshAndWait("acme", 2).status().code(), absl::StatusCode::kResourceExhausted);
  clock_.Advance(absl::Seconds(11));
  provider_.NextRefreshReturns(NewGrant(absl::Minutes(30)));
  EXPECT_EQ(RefreshAndWait("acme", 2)->grant().generation, 3u);
}

TEST_F(RefresherTest, ResponseWithoutRefreshTokenKeepsTheOldOne) {
  Connect("acme");
  const RefreshToken old = *broker_.GetToken("acme")->grant().refresh_token;
  core::Grant next = NewGrant(absl::Minutes(30), /*with_refresh_token=*/false);
  provider_.NextRefreshReturns(next);
  absl::StatusOr<TokenView> v = RefreshAndWait("acme", 1);
  ASSERT_TRUE(v.ok());
  EXPECT_EQ(*v->grant().refresh_token, old);
}

TEST_F(RefresherTest, InvalidGrantNeedsReauthAndStopsProviderCalls) {
  Connect("acme");
  provider_.NextRefreshReturns(core::ReasonError(absl::StatusCode::kFailedPrecondition,
                                                 Reason::kNeedsReauth, "invalid_grant"));
  absl::StatusOr<TokenView> v = RefreshAndWait("acme", 1);
  EXPECT_EQ(core::ReasonOf(v.status()), Reason::kNeedsReauth);
  EXPECT_EQ(core::ReasonOf(broker_.GetToken("acme").status()), Reason::kNeedsReauth);
  clock_.Advance(absl::Minutes(30));
  refresher_->RunDue();
  EXPECT_EQ(core::ReasonOf(RefreshAndWait("acme", 0).status()), Reason::kNeedsReauth);
  EXPECT_EQ(provider_.refresh_calls(), 1);
}

TEST_F(RefresherTest, InvalidGrantAfterAnUnknownOutcomeIsRotationLost) {
  Connect("acme");
  provider_.NextRefreshReturns(absl::DeadlineExceededError("no answer"));  // rotated? unknown
  EXPECT_EQ(RefreshAndWait("acme", 1).status().code(), absl::StatusCode::kDeadlineExceeded);
  EXPECT_EQ(store_.Load("acme")->refresh_intent->generation, 1u);  // the intent was durable
  EXPECT_TRUE(broker_.GetToken("acme").ok());                      // the old token still serves
  clock_.Advance(absl::Seconds(11));
  provider_.NextRefreshReturns(core::ReasonError(absl::StatusCode::kFailedPrecondition,
                                                 Reason::kNeedsReauth, "invalid_grant"));
  EXPECT_EQ(core::ReasonOf(RefreshAndWait("acme", 1).status()), Reason::kRotationLost);
  EXPECT_EQ(core::ReasonOf(broker_.GetToken("acme").status()), Reason::kRotationLost);
  EXPECT_EQ(refresher_->stats().rotation_lost, 1u);  // counted
  EXPECT_EQ(refresher_->stats().needs_reauth, 0u);
}

TEST_F(RefresherTest, InvalidClientMarksTheProviderAndLeavesGrantsAlone) {
  Connect("a");
  Connect("b");
  provider_.NextRefreshReturns(core::ReasonError(absl::StatusCode::kFailedPrecondition,
                                                 Reason::kProviderMisconfigured, "invalid_client"));
  EXPECT_EQ(core::ReasonOf(RefreshAndWait("a", 1).status()), Reason::kProviderMisconfigured);
  EXPECT_TRUE(refresher_->provider_misconfigured("zendesk"));
  EXPECT_TRUE(broker_.GetToken("a").ok());
  EXPECT_TRUE(broker_.GetToken("b").ok());
  EXPECT_EQ(core::ReasonOf(RefreshAndWait("b", 1).status()), Reason::kProviderMisconfigured);
  EXPECT_EQ(provider_.refresh_calls(), 1);
}

TEST_F(RefresherTest, AReloadedProviderDefinitionClearsMisconfiguredAndResumesDueRefreshes) {
  Connect("a", absl::Hours(1));
  provider_.NextRefreshReturns(core::ReasonError(absl::StatusCode::kFailedPrecondition,
                                                 Reason::kProviderMisconfigured, "invalid_client"));
  clock_.Advance(absl::Minutes(55));
  RunDueAndAwait(1);
  ASSERT_TRUE(refresher_->provider_misconfigured("zendesk"));
  refresher_->RunDue();
  EXPECT_EQ(provider_.refresh_calls(), 1);  // marked: no further call

  // The operator fixes the client credentials and reloads.
  core::ProviderSpec fixed = *providers_.Find("zendesk");
  fixed.client_id = "rotated-client";
  providers_.Put("zendesk", fixed);
  refresher_->ProvidersChanged({"zendesk"});
  EXPECT_FALSE(refresher_->provider_misconfigured("zendesk"));
  const core::Grant next = NewGrant(absl::Hours(1));
  provider_.NextRefreshReturns(next);
  RunDueAndAwait(2);  // the refresh that came due meanwhile runs again, by itself
  EXPECT_EQ(provider_.refresh_client_ids(),
            (std::vector<std::string>{core::PresetSpec("zendesk")->client_id, "rotated-client"}));
  EXPECT_EQ(broker_.GetToken("a")->grant().access_token, next.access_token);
}

TEST_F(RefresherTest, ARemovedProviderStopsRefreshesUntilItIsConfiguredAgain) {
  Connect("a", absl::Hours(1));
  const core::ProviderSpec zendesk = *providers_.Find("zendesk");
  EXPECT_EQ(providers_.Replace({}), std::vector<std::string>{"zendesk"});
  clock_.Advance(absl::Minutes(55));
  refresher_->RunDue();
  work_.Drain();
  EXPECT_EQ(provider_.refresh_calls(), 0);
  EXPECT_EQ(core::ReasonOf(RefreshAndWait("a", 1).status()), Reason::kProviderMisconfigured);
  const std::shared_ptr<const core::Connection> kept = broker_.GetConnection("a").value();
  EXPECT_EQ(kept->status, core::ConnectionStatus::kActive);  // its grant is kept as it was
  EXPECT_EQ(kept->generation(), 1u);

  EXPECT_EQ(providers_.Replace({{"zendesk", zendesk}}), std::vector<std::string>{"zendesk"});
  refresher_->ProvidersChanged({"zendesk"});
  provider_.NextRefreshReturns(NewGrant(absl::Hours(1)));
  RunDueAndAwait(1);
  EXPECT_EQ(broker_.GetConnection("a").value()->generation(), 2u);
}

TEST_F(RefresherTest, GrantWithoutRefreshTokenIsNotRefreshable) {
  Connect("acme", absl::Minutes(30), /*with_refresh_token=*/false);
  EXPECT_EQ(core::ReasonOf(RefreshAndWait("acme", 1).status()), Reason::kNotRefreshable);
  EXPECT_EQ(provider_.refresh_calls(), 0);
}

TEST_F(RefresherTest, RefreshRacingARevokeLosesAndItsNewTokenIsRevoked) {
  Connect("acme");
  const std::string old(broker_.GetToken("acme")->grant().access_token.Reveal());
  provider_.HoldRefreshes();
  const core::Grant next = NewGrant(absl::Minutes(30));
  provider_.NextRefreshReturns(next);
  Result r;
  refresher_->Refresh("acme", 1, r.Callback());
  provider_.AwaitRefreshCalls(1);
  ASSERT_TRUE(broker_.MarkRevoked("acme").ok());
  provider_.ReleaseRefreshes();
  EXPECT_FALSE(r.Wait().ok());
  EXPECT_EQ(core::ReasonOf(broker_.GetToken("acme").status()), Reason::kRevoked);
  // Both the revoked grant and the one the racing refresh got are revoked at the provider.
  EXPECT_EQ(provider_.revoked(),
            (std::vector<std::string>{old, std::string(next.access_token.Reveal())}));
  EXPECT_TRUE(broker_.GetConnection("acme").value()->to_revoke.empty());
}

// --- GetToken waits (AwaitToken) -------------------------------------------------------------

constexpr absl::Duration kFar = absl::Hours(1);

TEST_F(RefresherTest, HundredConcurrentGetTokensOnADueTokenMakeOneProviderCall) {
  Connect("acme", absl::Minutes(30));  // valid_until: 25 min in
  clock_.Advance(absl::Minutes(25));
  provider_.HoldRefreshes();
  provider_.NextRefreshReturns(NewGrant(absl::Minutes(30)));
  std::vector<std::unique_ptr<Result>> results;
  for (int i = 0; i < 100; ++i) {
    results.push_back(std::make_unique<Result>());
  }
  std::vector<std::thread> callers;
  for (int i = 0; i < 100; ++i) {
    callers.emplace_back([&, i] {
      refresher_->AwaitToken("acme", absl::ZeroDuration(), 0, clock_.Now() + kFar,
                             results[i]->Callback());
    });
  }
  for (std::thread& t : callers) {
    t.join();
  }
  provider_.AwaitRefreshCalls(1);
  for (auto& r : results) {
    EXPECT_FALSE(r->done());  // all wait for the one refresh
  }
  provider_.ReleaseRefreshes();
  for (auto& r : results) {
    absl::StatusOr<TokenView> v = r->Wait();
    ASSERT_TRUE(v.ok()) << v.status();
    EXPECT_EQ(v->grant().generation, 2u);
  }
  EXPECT_EQ(provider_.refresh_calls(), 1);
  EXPECT_EQ(refresher_->waiters(), 0u);
}

TEST_F(RefresherTest, MinTtlPastValidUntilWaitsForTheScheduledRefreshAndStartsNone) {
  Connect("acme", absl::Minutes(30));                     // valid_until: 25 min in
  clock_.Advance(absl::Minutes(24) + absl::Seconds(30));  // 30 s of the promise left
  Result r;
  refresher_->AwaitToken("acme", absl::Minutes(10), 0, clock_.Now() + kFar, r.Callback());
  refresher_->RunDue();
  work_.Drain();
  EXPECT_FALSE(r.done());
  EXPECT_EQ(provider_.refresh_calls(), 0);  // never before the announced valid_until

  provider_.NextRefreshReturns(NewGrant(absl::Minutes(30)));
  clock_.Advance(absl::Seconds(30));
  refresher_->RunDue();  // the scheduled refresh, at refresh_at
  absl::StatusOr<TokenView> v = r.Wait();
  ASSERT_TRUE(v.ok()) << v.status();
  EXPECT_EQ(v->grant().generation, 2u);
  EXPECT_GE(v->valid_for, absl::Minutes(10));
  EXPECT_EQ(provider_.refresh_calls(), 1);
}

TEST_F(RefresherTest, MinGenerationWaitsForItAndNeverTriggersARefresh) {
  Connect("acme", absl::Minutes(30));
  Result next_generation;
  Result gives_up;
  refresher_->AwaitToken("acme", absl::ZeroDuration(), 2, clock_.Now() + kFar,
                         next_generation.Callback());
  refresher_->AwaitToken("acme", absl::ZeroDuration(), 3, clock_.Now() + absl::Seconds(2),
                         gives_up.Callback());
  refresher_->RunDue();
  EXPECT_EQ(provider_.refresh_calls(), 0);
  EXPECT_FALSE(next_generation.done());

  // Someone else's Refresh (after a 401) makes generation 2: the waiter gets it.
  provider_.NextRefreshReturns(NewGrant(absl::Minutes(30)));
  ASSERT_TRUE(RefreshAndWait("acme", 1).ok());
  absl::StatusOr<TokenView> v = next_generation.Wait();
  ASSERT_TRUE(v.ok()) << v.status();
  EXPECT_EQ(v->grant().generation, 2u);

  EXPECT_FALSE(gives_up.done());
  clock_.Advance(absl::Seconds(2));
  refresher_->RunDue();
  EXPECT_EQ(gives_up.Wait().status().code(), absl::StatusCode::kDeadlineExceeded);
  EXPECT_EQ(provider_.refresh_calls(), 1);
}

TEST_F(RefresherTest, ShortDeadlineDuringASlowRefreshExpiresWhileTheRefreshCompletesAndIsStored) {
  Connect("acme", absl::Minutes(30));
  clock_.Advance(absl::Minutes(25));
  provider_.HoldRefreshes();
  const core::Grant next = NewGrant(absl::Minutes(30));
  provider_.NextRefreshReturns(next);
  Result r;
  refresher_->AwaitToken("acme", absl::ZeroDuration(), 0, clock_.Now() + absl::Milliseconds(50),
                         r.Callback());
  provider_.AwaitRefreshCalls(1);
  clock_.Advance(absl::Milliseconds(50));
  refresher_->RunDue();
  EXPECT_EQ(r.Wait().status().code(), absl::StatusCode::kDeadlineExceeded);
  provider_.ReleaseRefreshes();  // the provider answers after the caller gave up
  work_.Drain();
  EXPECT_EQ(store_.Load("acme")->grant->access_token, next.access_token);  // stored
  EXPECT_EQ(broker_.GetToken("acme")->grant().generation, 2u);
}

TEST_F(RefresherTest, FailedRefreshServesTheOldTokenWithAMovedPromiseOrFailsTheWaiter) {
  Connect("acme", absl::Minutes(30));
  const AccessToken old = broker_.GetToken("acme")->grant().access_token;
  clock_.Advance(absl::Minutes(25));
  provider_.HoldRefreshes();
  provider_.NextRefreshReturns(absl::UnavailableError("provider down"));
  Result any;
  Result long_lived;
  refresher_->AwaitToken("acme", absl::ZeroDuration(), 0, clock_.Now() + kFar, any.Callback());
  refresher_->AwaitToken("acme", absl::Minutes(2), 0, clock_.Now() + kFar, long_lived.Callback());
  provider_.AwaitRefreshCalls(1);
  provider_.ReleaseRefreshes();
  absl::StatusOr<TokenView> v = any.Wait();
  ASSERT_TRUE(v.ok()) << v.status();
  EXPECT_EQ(v->grant().access_token, old);
  // The retry is 30 s away: the old token is promised until then, and not longer.
  EXPECT_EQ(v->valid_until, clock_.Now() + absl::Seconds(30));
  EXPECT_EQ(long_lived.Wait().status().code(), absl::StatusCode::kUnavailable);
  // A caller arriving meanwhile does not start another call (no retry storm)...
  Result later;
  refresher_->AwaitToken("acme", absl::Minutes(2), 0, clock_.Now() + kFar, later.Callback());
  EXPECT_EQ(later.Wait().status().code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ(provider_.refresh_calls(), 1);
  // ...and the retry comes on schedule.
  provider_.NextRefreshReturns(NewGrant(absl::Minutes(30)));
  clock_.Advance(absl::Seconds(30));
  RunDueAndAwait(2);
  EXPECT_EQ(broker_.GetToken("acme")->grant().generation, 2u);
}

TEST_F(RefresherTest, CancelledWaitNeverCompletes) {
  Connect("acme", absl::Minutes(30));
  Result r;
  const uint64_t h =
      refresher_->AwaitToken("acme", absl::ZeroDuration(), 5, clock_.Now() + kFar, r.Callback());
  ASSERT_NE(h, 0u);
  EXPECT_TRUE(refresher_->CancelWait(h));
  EXPECT_FALSE(refresher_->CancelWait(h));
  EXPECT_EQ(refresher_->waiters(), 0u);
  clock_.Advance(absl::Hours(2));
  refresher_->RunDue();
  EXPECT_FALSE(r.done());
}

TEST_F(RefresherTest, ServableAndHopelessRequestsAnswerAtOnce) {
  Connect("acme", absl::Minutes(30));
  Result now;
  EXPECT_EQ(
      refresher_->AwaitToken("acme", absl::ZeroDuration(), 1, clock_.Now() + kFar, now.Callback()),
      0u);
  EXPECT_TRUE(now.Wait().ok());
  Result unknown;
  refresher_->AwaitToken("nobody", absl::ZeroDuration(), 0, clock_.Now() + kFar,
                         unknown.Callback());
  EXPECT_EQ(unknown.Wait().status().code(), absl::StatusCode::kNotFound);
}

TEST_F(RefresherTest, TooManyWaitersAreRefused) {
  RefresherOptions o;
  o.max_waiters = 2;
  UseOptions(o);
  Connect("acme", absl::Minutes(30));
  Result a, b, c;
  refresher_->AwaitToken("acme", absl::ZeroDuration(), 9, clock_.Now() + kFar, a.Callback());
  refresher_->AwaitToken("acme", absl::ZeroDuration(), 9, clock_.Now() + kFar, b.Callback());
  refresher_->AwaitToken("acme", absl::ZeroDuration(), 9, clock_.Now() + kFar, c.Callback());
  EXPECT_EQ(c.Wait().status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_FALSE(a.done());
}

// --- hot_window ----------------------------------------------------------------------------

TEST_F(RefresherTest, HotWindowRefreshesIdleConnectionsOnUseOrBeforeTheirRefreshTokenDies) {
  RefresherOptions o;
  o.hot_window = absl::Minutes(10);
  UseOptions(o);
  core::Grant g = NewGrant(absl::Minutes(30));
  g.refresh_token_expires_at = clock_.Now() + absl::Hours(24 * 30);
  ASSERT_TRUE(broker_.CreatePending("idle", "zendesk", {{"subdomain", "acme"}}).ok());
  ASSERT_TRUE(broker_.Activate("idle", g).ok());
  g = NewGrant(absl::Minutes(30));
  g.refresh_token_expires_at = clock_.Now() + absl::Hours(24 * 30);
  ASSERT_TRUE(broker_.CreatePending("hot", "zendesk", {{"subdomain", "acme"}}).ok());
  ASSERT_TRUE(broker_.Activate("hot", g).ok());

  clock_.Advance(absl::Minutes(20));
  ASSERT_TRUE(broker_.GetToken("hot").ok());  // used within the window
  provider_.NextRefreshReturns(NewGrant(absl::Minutes(30)));
  clock_.Advance(absl::Minutes(5));
  RunDueAndAwait(1);
  EXPECT_EQ(broker_.GetConnection("hot").value()->generation(), 2u);
  EXPECT_EQ(broker_.GetConnection("idle").value()->generation(), 1u);  // not refreshed ahead
  EXPECT_EQ(provider_.refresh_calls(), 1);

  // On its next use, the idle one is refreshed (it is past its refresh_at).
  provider_.NextRefreshReturns(NewGrant(absl::Minutes(30)));
  Result used;
  refresher_->AwaitToken("idle", absl::ZeroDuration(), 0, clock_.Now() + kFar, used.Callback());
  absl::StatusOr<TokenView> v = used.Wait();
  ASSERT_TRUE(v.ok()) << v.status();
  EXPECT_EQ(v->grant().generation, 2u);
  EXPECT_EQ(provider_.refresh_calls(), 2);
}

TEST_F(RefresherTest, HotWindowKeepsAnUnusedConnectionAliveAtHalfItsRefreshTokenLifetime) {
  RefresherOptions o;
  o.hot_window = absl::Minutes(10);
  UseOptions(o);
  core::Grant g = NewGrant(absl::Minutes(30));
  g.refresh_token_expires_at = clock_.Now() + absl::Hours(24 * 30);
  ASSERT_TRUE(broker_.CreatePending("idle", "zendesk", {{"subdomain", "acme"}}).ok());
  ASSERT_TRUE(broker_.Activate("idle", g).ok());
  clock_.Advance(absl::Minutes(25));
  refresher_->RunDue();
  EXPECT_EQ(provider_.refresh_calls(), 0);
  clock_.Advance(absl::Hours(24 * 15) - absl::Minutes(26));
  refresher_->RunDue();
  EXPECT_EQ(provider_.refresh_calls(), 0);  // not yet half of the 30 days
  core::Grant next = NewGrant(absl::Minutes(30));
  next.refresh_token_expires_at = clock_.Now() + absl::Hours(24 * 30);
  provider_.NextRefreshReturns(next);
  clock_.Advance(absl::Minutes(1));
  RunDueAndAwait(1);
  EXPECT_EQ(broker_.GetConnection("idle").value()->generation(), 2u);
}

// --- Revoke ------------------------------------------------------------------------------

// Runs a Revoke RPC to its end.
absl::StatusOr<bool> RevokeAndWait(Refresher& refresher, const std::string& id) {
  Mutex mu;
  CondVar cv;
  std::optional<absl::StatusOr<bool>> out;
  refresher.Revoke(id, [&](absl::StatusOr<bool> r) {
    MutexLock lock(&mu);
    out = std::move(r);
    cv.SignalAll();
  });
  MutexLock lock(&mu);
  while (!out) {
    cv.Wait(&mu);
  }
  return *out;
}

TEST_F(RefresherTest, RevokeStopsServingAtOnceAndRetriesUntilTheProviderConfirms) {
  Connect("acme", absl::Minutes(30));
  const std::string token(broker_.GetToken("acme")->grant().access_token.Reveal());
  provider_.NextRevokeReturns(absl::UnavailableError("provider down"));
  absl::StatusOr<bool> confirmed = RevokeAndWait(*refresher_, "acme");
  ASSERT_TRUE(confirmed.ok()) << confirmed.status();
  EXPECT_FALSE(*confirmed);
  EXPECT_EQ(core::ReasonOf(broker_.GetToken("acme").status()), Reason::kRevoked);
  EXPECT_EQ(store_.Load("acme")->to_revoke.size(), 1u);  // still owed, durably

  provider_.NextRevokeReturns(absl::UnavailableError("still down"));
  clock_.Advance(absl::Seconds(5));  // first backoff
  refresher_->RunDue();
  work_.Drain();
  EXPECT_EQ(provider_.revoked().size(), 2u);
  clock_.Advance(absl::Seconds(9));
  refresher_->RunDue();  // the second backoff is 10 s: not yet
  work_.Drain();
  EXPECT_EQ(provider_.revoked().size(), 2u);
  clock_.Advance(absl::Seconds(1));
  refresher_->RunDue();
  work_.Drain();
  EXPECT_EQ(provider_.revoked(), (std::vector<std::string>{token, token, token}));
  EXPECT_TRUE(store_.Load("acme")->to_revoke.empty());
  clock_.Advance(absl::Hours(1));
  refresher_->RunDue();
  work_.Drain();
  EXPECT_EQ(provider_.revoked().size(), 3u);  // nothing left to retry
}

TEST_F(RefresherTest, RevokeOfAnExpiredZendeskTokenRefreshesFirstAndRevokesTheFreshOne) {
  Connect("acme", absl::Minutes(30));
  clock_.Advance(absl::Minutes(31));  // expired: it cannot authorize its own revocation
  const core::Grant fresh = NewGrant(absl::Minutes(30));
  provider_.NextRefreshReturns(fresh);
  absl::StatusOr<bool> confirmed = RevokeAndWait(*refresher_, "acme");
  ASSERT_TRUE(confirmed.ok()) << confirmed.status();
  EXPECT_TRUE(*confirmed);
  EXPECT_EQ(provider_.refresh_calls(), 1);
  EXPECT_EQ(provider_.revoked(),
            std::vector<std::string>{std::string(fresh.access_token.Reveal())});
  EXPECT_TRUE(store_.Load("acme")->to_revoke.empty());
}

TEST_F(RefresherTest, RevokeRejectedWithUnauthenticatedRefreshesAndRevokesAgain) {
  Connect("acme", absl::Minutes(30));
  const std::string old(broker_.GetToken("acme")->grant().access_token.Reveal());
  const core::Grant fresh = NewGrant(absl::Minutes(30));
  provider_.NextRefreshReturns(fresh);
  provider_.NextRevokeReturns(absl::UnauthenticatedError("access token rejected"));
  absl::StatusOr<bool> confirmed = RevokeAndWait(*refresher_, "acme");
  ASSERT_TRUE(confirmed.ok()) << confirmed.status();
  EXPECT_TRUE(*confirmed);
  EXPECT_EQ(provider_.revoked(),
            (std::vector<std::string>{old, std::string(fresh.access_token.Reveal())}));
}

TEST_F(RefresherTest, RevokingARevokedConnectionRetriesWhatIsOwed) {
  Connect("acme", absl::Minutes(30));
  provider_.NextRevokeReturns(absl::UnavailableError("provider down"));
  ASSERT_FALSE(*RevokeAndWait(*refresher_, "acme"));
  absl::StatusOr<bool> again = RevokeAndWait(*refresher_, "acme");
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_TRUE(*again);
  EXPECT_EQ(RevokeAndWait(*refresher_, "nobody").status().code(), absl::StatusCode::kNotFound);
}

// --- Several replicas: the lease ------------------------------------------------------------

TEST_F(RefresherTest, WithoutTheLeaseNoProviderCallAndCallersGetTheHoldersGeneration) {
  Connect("acme", absl::Minutes(30));
  clock_.Advance(absl::Minutes(25));  // due
  store_.SetLeasesHeldElsewhere(true);
  Result waiting;
  refresher_->AwaitToken("acme", absl::ZeroDuration(), 0, clock_.Now() + kFar, waiting.Callback());
  Result asked;
  refresher_->Refresh("acme", 1, asked.Callback());
  work_.Drain();
  EXPECT_EQ(provider_.refresh_calls(), 0);  // only the holder calls the provider
  EXPECT_FALSE(waiting.done());

  // The holder (another process) stores generation 2; its change reaches us through the store.
  core::Connection stored = *store_.Load("acme");
  core::Grant next = NewGrant(absl::Minutes(30));
  next.generation = 2;
  next.refresh_at = clock_.Now() + absl::Minutes(25);
  stored.grant = next;
  stored.refresh_intent.reset();
  stored.revision += 1;
  ASSERT_TRUE(store_.Update(stored, stored.revision - 1, nullptr).ok());
  ASSERT_TRUE(broker_.Reload("acme").ok());
  absl::StatusOr<TokenView> v = waiting.Wait();
  ASSERT_TRUE(v.ok()) << v.status();
  EXPECT_EQ(v->grant().access_token, next.access_token);
  absl::StatusOr<TokenView> r = asked.Wait();
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->grant().generation, 2u);
  EXPECT_EQ(provider_.refresh_calls(), 0);
}

TEST_F(RefresherTest, WithTheLeaseTheStoredRecordIsReadBackUnlessNoOtherProcessWritesTheStore) {
  Connect("acme", absl::Minutes(30));
  clock_.Advance(absl::Minutes(25));  // due
  provider_.NextRefreshReturns(NewGrant(absl::Minutes(30)));
  size_t loads = store_.loads();
  RunDueAndAwait(1);
  EXPECT_EQ(store_.loads(), loads + 1);  // another replica may have refreshed meanwhile

  // A store only this process writes (SQLite) holds nothing newer than the cache.
  store_.SetHasOtherWriters(false);
  clock_.Advance(absl::Minutes(25));
  provider_.NextRefreshReturns(NewGrant(absl::Minutes(30)));
  loads = store_.loads();
  RunDueAndAwait(2);
  EXPECT_EQ(store_.loads(), loads);
  EXPECT_EQ(broker_.GetConnection("acme").value()->generation(), 3u);
}

TEST_F(RefresherTest, ADeadHoldersLeaseIsTakenOverWhenItExpires) {
  Connect("acme", absl::Minutes(30));
  clock_.Advance(absl::Minutes(25));
  store_.SetLeasesHeldElsewhere(true);
  refresher_->RunDue();
  work_.Drain();
  EXPECT_EQ(provider_.refresh_calls(), 0);
  store_.SetLeasesHeldElsewhere(false);  // the holder died; its lease runs out
  provider_.NextRefreshReturns(NewGrant(absl::Minutes(30)));
  clock_.Advance(absl::Seconds(49));
  refresher_->RunDue();
  work_.Drain();
  EXPECT_EQ(provider_.refresh_calls(), 0);  // not before the lease (30 s + 2 x 10 s) is over
  clock_.Advance(absl::Seconds(1));
  RunDueAndAwait(1);
  EXPECT_EQ(broker_.GetConnection("acme").value()->generation(), 2u);
}

// --- Provider and store faults --------------------------------------------------------------

TEST_F(RefresherTest, TransientFailuresBackOffExponentiallyAndHonourRetryAfter) {
  Connect("acme", absl::Hours(2));  // refresh_at: 1 h 55 min in, expiry at 2 h
  clock_.Advance(absl::Hours(1) + absl::Minutes(55));
  const auto fail_and_expect_retry_in = [&](absl::Duration d, int calls) {
    provider_.NextRefreshReturns(absl::UnavailableError("provider down"));
    RunDueAndAwait(calls);
    clock_.Advance(d - absl::Milliseconds(1));
    refresher_->RunDue();
    work_.Drain();
    EXPECT_EQ(provider_.refresh_calls(), calls) << "retried before " << d;
    clock_.Advance(absl::Milliseconds(1));
  };
  fail_and_expect_retry_in(absl::Seconds(30), 1);
  fail_and_expect_retry_in(absl::Seconds(60), 2);
  fail_and_expect_retry_in(absl::Seconds(120), 3);
  // A 429 says when: not a moment before, whatever the backoff would say.
  provider_.NextRefreshReturns(
      core::WithRetryAt(absl::ResourceExhaustedError("429"), clock_.Now() + absl::Minutes(4)));
  RunDueAndAwait(4);
  clock_.Advance(absl::Minutes(4) - absl::Milliseconds(1));
  refresher_->RunDue();
  work_.Drain();
  EXPECT_EQ(provider_.refresh_calls(), 4);
  provider_.NextRefreshReturns(NewGrant(absl::Hours(2)));
  clock_.Advance(absl::Milliseconds(1));
  RunDueAndAwait(5);
  EXPECT_EQ(broker_.GetConnection("acme").value()->generation(), 2u);
  // The old token served all along, its promise moved with each retry.
  EXPECT_EQ(refresher_->stats().failed, 4u);
}

TEST_F(RefresherTest, StoreOutageServesFromMemoryPausesRefreshesAndKeepsAnExpiringTokenAlive) {
  Connect("acme", absl::Minutes(30));  // refresh_at 25 min in, expiry at 30
  store_.SetDown(true);
  EXPECT_FALSE(broker_.ProbeStore().ok());
  EXPECT_FALSE(broker_.store_healthy());
  EXPECT_TRUE(broker_.GetToken("acme").ok());  // reads come from memory

  clock_.Advance(absl::Minutes(25));  // due, but 5 min from expiry: refreshes pause
  RunDueAndAwait(0);
  EXPECT_EQ(provider_.refresh_calls(), 0);

  // Within 2 min of expiry the token is refreshed all the same, and kept in memory.
  const core::Grant next = NewGrant(absl::Minutes(30));
  provider_.NextRefreshReturns(next);
  clock_.Advance(absl::Minutes(3) + absl::Seconds(30));
  RunDueAndAwait(1);
  absl::StatusOr<TokenView> served = broker_.GetToken("acme");
  ASSERT_TRUE(served.ok()) << served.status();
  EXPECT_EQ(served->grant().access_token, next.access_token);
  EXPECT_EQ(broker_.unwritten(), 1u);
  store_.SetDown(false);
  EXPECT_EQ(store_.Load("acme")->generation(), 1u);  // not written yet
  EXPECT_TRUE(broker_.ProbeStore().ok());
  EXPECT_EQ(broker_.FlushUnwritten(), 0u);
  EXPECT_EQ(store_.Load("acme")->grant->access_token, next.access_token);
  EXPECT_TRUE(broker_.store_healthy());
  // Later writes go on from the written revision.
  ASSERT_TRUE(broker_.MarkRevoked("acme").ok());
  EXPECT_EQ(store_.Load("acme")->status, core::ConnectionStatus::kRevoked);
}

TEST_F(RefresherTest, AFlightWhoseGenerationWasRefreshedElsewhereCallsNoProvider) {
  Connect("acme", absl::Minutes(30));
  clock_.Advance(absl::Minutes(25));  // due
  // Another replica refreshed and stored generation 2; its change has not reached us yet.
  core::Connection stored = *store_.Load("acme");
  core::Grant next = NewGrant(absl::Minutes(30));
  next.generation = 2;
  next.refresh_at = clock_.Now() + absl::Minutes(25);
  stored.grant = next;
  stored.revision += 1;
  ASSERT_TRUE(store_.Update(stored, stored.revision - 1, nullptr).ok());
  Result r;
  refresher_->AwaitToken("acme", absl::ZeroDuration(), 0, clock_.Now() + kFar, r.Callback());
  absl::StatusOr<TokenView> v = r.Wait();
  ASSERT_TRUE(v.ok()) << v.status();
  EXPECT_EQ(v->grant().generation, 2u);  // what the store had, not a second refresh
  work_.Drain();
  EXPECT_EQ(provider_.refresh_calls(), 0);
}

}  // namespace
}  // namespace tb::oauth
