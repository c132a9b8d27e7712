#include "server/src/oauth/refresher.h"

#include <atomic>
#include <thread>

#include "gtest/gtest.h"
#include "server/src/core/errors.h"
#include "server/src/core/provider_presets.h"
#include "server/src/store/in_memory_token_store.h"
#include "tests/fakes/fake_clock.h"
#include "tests/fakes/fake_provider_client.h"
#include "tests/support/test_secrets.h"

namespace tb::oauth {
namespace {

using core::Reason;

// Collects one callback's result; Wait() blocks until it came.
class Result {
 public:
  Refresher::Done Callback() {
    return [this](absl::StatusOr<TokenView> r) {
      MutexLock lock(&mu_);
      result_ = std::move(r);
      cv_.SignalAll();
    };
  }
  absl::StatusOr<TokenView> Wait() {
    MutexLock lock(&mu_);
    while (!result_) {
      cv_.Wait(&mu_);
    }
    return *result_;
  }

 private:
  Mutex mu_;
  CondVar cv_;
  std::optional<absl::StatusOr<TokenView>> result_ ABSL_GUARDED_BY(mu_);
};

class RefresherTest : public ::testing::Test {
 protected:
  void TearDown() override { work_.Stop(); }  // no flight outlives the fixture

  RefresherTest() {
    core::ProviderSpec spec = *core::PresetSpec("zendesk");
    spec.name = "zendesk";
    providers_["zendesk"] = spec;
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

  absl::StatusOr<TokenView> RefreshAndWait(const std::string& id, uint64_t if_generation) {
    Result r;
    refresher_.Refresh(id, if_generation, r.Callback());
    return r.Wait();
  }

  // Runs due refreshes and waits until the provider was called `calls` times in all.
  void RunDueAndAwait(int calls) {
    refresher_.RunDue();
    provider_.AwaitRefreshCalls(calls);
    work_.Stop();  // drain: the flight's write happens before the assertions
  }

  testing::FakeClock clock_;
  store::InMemoryTokenStore store_;
  cache::ConnectionCache cache_;
  core::ProviderRegistry providers_;
  testing::FakeProviderClient provider_;
  WorkPool work_{4, "test-work"};
  // Declared before the broker, whose on_change hook feeds it.
  std::unique_ptr<Refresher> refresher_holder_ = std::make_unique<Refresher>(
      RefresherOptions{}, providers_, clock_, broker_ref(), provider_,
      [this](std::function<void()> task) { work_.Post(std::move(task)); });
  Refresher& refresher_ = *refresher_holder_;
  Broker broker_{clock_, store_, cache_,
                 BrokerOptions{{}, nullptr, [this](const auto& c, const auto& id) {
                                 refresher_.Track(c, id);
                               }}};

 private:
  Broker& broker_ref() { return broker_; }  // bound now, used only after construction
};

TEST_F(RefresherTest, ScheduledRefreshHappensAtRefreshAtAndNeverBefore) {
  Connect("acme", absl::Minutes(30));
  const TokenView before = *broker_.GetToken("acme");
  EXPECT_EQ(before.valid_until, before.grant().issued_at + absl::Minutes(25));

  clock_.Advance(absl::Minutes(25) - absl::Seconds(1));
  refresher_.RunDue();
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

TEST_F(RefresherTest, FailedScheduledRefreshIsRetriedLaterWhileTheOldTokenServes) {
  Connect("acme", absl::Hours(1));
  provider_.NextRefreshReturns(absl::UnavailableError("provider down"));
  clock_.Advance(absl::Minutes(55));
  refresher_.RunDue();
  provider_.AwaitRefreshCalls(1);
  for (int i = 0; i < 2000 && refresher_.RunDue() == absl::InfiniteFuture(); ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1));  // until the retry is queued
  }
  EXPECT_EQ(broker_.GetConnection("acme").value()->generation(), 1u);
  clock_.Advance(absl::Seconds(29));
  refresher_.RunDue();
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
  refresher_.RunDue();
  provider_.AwaitRefreshCalls(1);
  // Let the flight finish before looking.
  work_.Stop();  // drain the flight
  ASSERT_EQ(broker_.GetConnection("acme").value()->generation(), 2u);
  // The new token's refresh is a second away, not now.
  refresher_.RunDue();
  refresher_.RunDue();
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
    callers.emplace_back([&, i] { refresher_.Refresh("acme", 1, results[i]->Callback()); });
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
  refresher_.RunDue();
  EXPECT_EQ(core::ReasonOf(RefreshAndWait("acme", 0).status()), Reason::kNeedsReauth);
  EXPECT_EQ(provider_.refresh_calls(), 1);
}

TEST_F(RefresherTest, InvalidGrantAfterAnUnknownOutcomeIsRotationLost) {
  Connect("acme");
  provider_.NextRefreshReturns(absl::DeadlineExceededError("no answer"));  // rotated? unknown
  EXPECT_EQ(RefreshAndWait("acme", 1).status().code(), absl::StatusCode::kDeadlineExceeded);
  EXPECT_EQ(store_.Load("acme")->refresh_intent->generation, 1u);  // the intent was durable
  EXPECT_TRUE(broker_.GetToken("acme").ok());          // the old token still serves
  clock_.Advance(absl::Seconds(11));
  provider_.NextRefreshReturns(core::ReasonError(absl::StatusCode::kFailedPrecondition,
                                                 Reason::kNeedsReauth, "invalid_grant"));
  EXPECT_EQ(core::ReasonOf(RefreshAndWait("acme", 1).status()), Reason::kRotationLost);
  EXPECT_EQ(core::ReasonOf(broker_.GetToken("acme").status()), Reason::kRotationLost);
}

TEST_F(RefresherTest, InvalidClientMarksTheProviderAndLeavesGrantsAlone) {
  Connect("a");
  Connect("b");
  provider_.NextRefreshReturns(core::ReasonError(absl::StatusCode::kFailedPrecondition,
                                                 Reason::kProviderMisconfigured, "invalid_client"));
  EXPECT_EQ(core::ReasonOf(RefreshAndWait("a", 1).status()), Reason::kProviderMisconfigured);
  EXPECT_TRUE(refresher_.provider_misconfigured("zendesk"));
  EXPECT_TRUE(broker_.GetToken("a").ok());
  EXPECT_TRUE(broker_.GetToken("b").ok());
  EXPECT_EQ(core::ReasonOf(RefreshAndWait("b", 1).status()), Reason::kProviderMisconfigured);
  EXPECT_EQ(provider_.refresh_calls(), 1);
}

TEST_F(RefresherTest, GrantWithoutRefreshTokenIsNotRefreshable) {
  Connect("acme", absl::Minutes(30), /*with_refresh_token=*/false);
  EXPECT_EQ(core::ReasonOf(RefreshAndWait("acme", 1).status()), Reason::kNotRefreshable);
  EXPECT_EQ(provider_.refresh_calls(), 0);
}

TEST_F(RefresherTest, RefreshRacingARevokeLosesAndItsNewTokenIsRevoked) {
  Connect("acme");
  provider_.HoldRefreshes();
  const core::Grant next = NewGrant(absl::Minutes(30));
  provider_.NextRefreshReturns(next);
  Result r;
  refresher_.Refresh("acme", 1, r.Callback());
  provider_.AwaitRefreshCalls(1);
  ASSERT_TRUE(broker_.MarkRevoked("acme").ok());
  provider_.ReleaseRefreshes();
  EXPECT_FALSE(r.Wait().ok());
  EXPECT_EQ(core::ReasonOf(broker_.GetToken("acme").status()), Reason::kRevoked);
  EXPECT_EQ(provider_.revoked(), std::vector<std::string>{std::string(next.access_token.Reveal())});
}

}  // namespace
}  // namespace tb::oauth
