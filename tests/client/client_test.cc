// tokenbroker::Client against the real gRPC server and broker (in-memory store, fake clock on
// the server side, scriptable provider client): the local cache, watch pushes, the 401 path,
// one RPC for many concurrent misses, revocations and deletions reaching the cache, the
// recheck of unwatched tokens, and the watch stream coming back after the server restarts.

#include "tokenbroker/client.h"

#include <grpcpp/grpcpp.h>

#include <chrono>
#include <memory>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "server/src/core/provider_presets.h"
#include "server/src/grpc/grpc_server.h"
#include "server/src/store/in_memory_token_store.h"
#include "tests/client/blackhole_proxy.h"
#include "tests/fakes/fake_clock.h"
#include "tests/support/flow_parts.h"
#include "tests/support/seed.h"
#include "tests/support/test_secrets.h"

namespace tb {
namespace {

template <typename F>
bool Eventually(F cond) {
  for (int i = 0; i < 1000; ++i) {
    if (cond()) {
      return true;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  return cond();
}

core::Grant Fresh(const Clock& clock, absl::Duration lifetime) {
  core::Grant g;
  g.access_token = AccessToken(testing::NewTestSecret("access"));
  g.refresh_token = RefreshToken(testing::NewTestSecret("refresh"));
  g.issued_at = clock.Now();
  g.expires_at = clock.Now() + lifetime;
  return g;
}

class ClientTest : public ::testing::Test {
 protected:
  void SetUp() override {
    core::ProviderSpec zendesk = *core::PresetSpec("zendesk");
    zendesk.name = "zendesk";
    parts_.providers.Put("zendesk", zendesk);
    ASSERT_TRUE(testing::SeedEveryStatus(broker_, clock_.Now()).ok());
    StartServer("127.0.0.1:0");
    client_ = NewClient(Options());
    ASSERT_NE(client_, nullptr);
  }
  tokenbroker::ClientOptions Options() const {
    tokenbroker::ClientOptions o;
    o.broker.target = absl::StrCat("127.0.0.1:", port_);
    o.margin = absl::Seconds(30);
    o.max_reconnect_delay = absl::Milliseconds(200);
    return o;
  }
  static std::unique_ptr<tokenbroker::Client> NewClient(const tokenbroker::ClientOptions& o) {
    auto c = tokenbroker::Client::Create(o);
    EXPECT_TRUE(c.ok()) << c.status();
    return c.ok() ? *std::move(c) : nullptr;
  }
  // Moves the broker's clock to 2 s before the active connection's token runs out (its
  // scheduled refresh) and queues the grant that refresh will get, which it returns.
  core::Grant NearTheScheduledRefresh() {
    auto current = Admin()->GetToken(testing::kActiveId);
    EXPECT_TRUE(current.ok()) << current.status();
    if (current.ok()) {
      clock_.Advance(absl::Seconds(current->valid_for().seconds()) - absl::Seconds(2));
    }
    const core::Grant next = Fresh(clock_, absl::Hours(1));
    parts_.provider.NextRefreshReturns(next);
    parts_.provider.NextRefreshReturns(next);  // RunDue refreshes the seeded expired-co too
    return next;
  }
  // The operators' view of the same server (Revoke, DeleteConnection).
  std::unique_ptr<tb::client::TokenClient> Admin() const {
    return tb::client::TokenClient::Insecure(absl::StrCat("127.0.0.1:", port_));
  }
  void TearDown() override {
    client_.reset();
    if (server_ != nullptr) {
      server_->Shutdown(absl::Now() + absl::Seconds(5));
    }
  }

  void StartServer(const std::string& listen) {
    grpc_api::GrpcServerOptions options = server_options_;
    options.listen = listen;
    auto server = grpc_api::GrpcServer::Start(
        options, {broker_, cache_, parts_.flow, parts_.refresher, parts_.run_blocking()});
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = *std::move(server);
    port_ = server_->port();
  }

  testing::FakeClock clock_;
  store::InMemoryTokenStore store_;
  cache::ConnectionCache cache_;
  oauth::Broker broker_{clock_, store_, cache_, testing::TrackedBy(&parts_)};
  testing::FlowParts parts_{clock_, broker_};
  grpc_api::GrpcServerOptions server_options_;  // of the next StartServer
  std::unique_ptr<grpc_api::GrpcServer> server_;
  int port_ = 0;
  std::unique_ptr<tokenbroker::Client> client_;
};

TEST_F(ClientTest, CachedGetsMakeNoRpc) {
  auto first = client_->Get(testing::kActiveId);
  ASSERT_TRUE(first.ok()) << first.status();
  for (int i = 0; i < 1000; ++i) {
    auto t = client_->Get(testing::kActiveId);
    ASSERT_TRUE(t.ok());
    EXPECT_EQ((*t)->access_token, (*first)->access_token);
  }
  EXPECT_EQ(client_->stats().rpcs, 1u);
  EXPECT_EQ(client_->stats().cache_hits, 1000u);
  // Until its watch has delivered, a token is used for unwatched_recheck at most; the watched
  // copy is used until its end (55 min left, minus the 30 s margin).
  EXPECT_LE((*first)->use_until, absl::Now() + absl::Minutes(1));
  ASSERT_TRUE(Eventually([&] { return client_->stats().watch_updates >= 1; }));
  EXPECT_GT((*client_->Get(testing::kActiveId))->use_until, absl::Now() + absl::Minutes(50));
  EXPECT_EQ(client_->stats().rpcs, 1u);
}

TEST_F(ClientTest, ConcurrentMissesShareOneGetTokenThatWaitsForTheRefresh) {
  // 2 s before the broker's promise runs out (its scheduled refresh), less than the margin.
  const core::Grant next = NearTheScheduledRefresh();
  tokenbroker::ClientOptions o = Options();
  o.margin = absl::Seconds(3);
  o.rpc_timeout = absl::Seconds(20);
  o.watch = false;
  std::unique_ptr<tokenbroker::Client> client = NewClient(o);
  ASSERT_NE(client, nullptr);
  std::vector<absl::StatusOr<std::shared_ptr<const tokenbroker::Token>>> got(8);
  std::vector<std::thread> callers;
  for (auto& g : got) {
    callers.emplace_back([&client, &g] { g = client->Get(testing::kActiveId); });
  }
  // One GetToken, waiting at the broker for the refresh (not yet due); the others wait for it.
  const bool all_joined =
      Eventually([&] { return client->stats().rpcs == 1 && client->stats().shared == 7; });
  EXPECT_EQ(parts_.provider.refresh_calls(), 0);
  clock_.Advance(absl::Seconds(3));
  parts_.refresher.RunDue();  // the scheduled refresh
  for (auto& t : callers) {
    t.join();
  }
  ASSERT_TRUE(all_joined) << "rpcs " << client->stats().rpcs << " shared "
                          << client->stats().shared;
  for (const auto& g : got) {
    ASSERT_TRUE(g.ok()) << g.status();
    EXPECT_EQ((*g)->generation, 2u);  // not generation 1, 2 s from its end
    EXPECT_EQ((*g)->access_token, next.access_token.Reveal());
  }
  EXPECT_EQ(client->stats().rpcs, 1u);
}

TEST_F(ClientTest, ARevocationDropsTheCachedTokenThroughTheWatch) {
  ASSERT_TRUE(client_->Get(testing::kActiveId).ok());
  ASSERT_TRUE(Eventually([&] { return client_->stats().watch_updates >= 1; }));
  ASSERT_TRUE(Admin()->Revoke(testing::kActiveId).ok());
  absl::Status last;
  EXPECT_TRUE(Eventually([&] {
    last = client_->Get(testing::kActiveId).status();
    return last.code() == absl::StatusCode::kFailedPrecondition;
  })) << last;
  EXPECT_EQ(tb::client::ErrorReason(last), "REVOKED");
}

TEST_F(ClientTest, AConnectionDeletedAndCreatedAgainServesItsNewToken) {
  ASSERT_TRUE(broker_.Activate(testing::kActiveId, Fresh(clock_, absl::Hours(1))).ok());
  auto old = client_->Get(testing::kActiveId);
  ASSERT_TRUE(old.ok()) << old.status();
  ASSERT_EQ((*old)->generation, 2u);
  ASSERT_TRUE(Eventually([&] { return client_->stats().watch_updates >= 1; }));
  ASSERT_TRUE(Admin()->DeleteConnection(testing::kActiveId).ok());
  ASSERT_TRUE(broker_.CreatePending(testing::kActiveId, "zendesk", {{"subdomain", "acme"}}).ok());
  const core::Grant fresh = Fresh(clock_, absl::Hours(1));
  ASSERT_TRUE(broker_.Activate(testing::kActiveId, fresh).ok());  // generation 1 again
  EXPECT_TRUE(Eventually([&] {
    auto t = client_->Get(testing::kActiveId);
    return t.ok() && (*t)->access_token == fresh.access_token.Reveal();
  }));
}

TEST_F(ClientTest, AnUnwatchedTokenIsRecheckedSoARevocationReachesIt) {
  testing::FakeClock local;  // this process's clock, apart from the broker's
  tokenbroker::ClientOptions o = Options();
  o.watch = false;
  o.unwatched_recheck = absl::Seconds(60);
  o.clock = &local;
  std::unique_ptr<tokenbroker::Client> client = NewClient(o);
  ASSERT_NE(client, nullptr);
  auto first = client->Get(testing::kForeverId);  // never expires: only the recheck ends it
  ASSERT_TRUE(first.ok()) << first.status();
  EXPECT_EQ((*first)->use_until, local.Now() + absl::Seconds(60));
  local.Advance(absl::Seconds(59));
  ASSERT_TRUE(client->Get(testing::kForeverId).ok());
  EXPECT_EQ(client->stats().rpcs, 1u);
  ASSERT_TRUE(Admin()->Revoke(testing::kForeverId).ok());
  local.Advance(absl::Seconds(2));
  auto after = client->Get(testing::kForeverId);
  EXPECT_EQ(client->stats().rpcs, 2u);
  EXPECT_EQ(after.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(tb::client::ErrorReason(after.status()), "REVOKED");
}

TEST_F(ClientTest, ConnectionsPastMaxWatchesAreRecheckedInstead) {
  testing::FakeClock local;
  tokenbroker::ClientOptions o = Options();
  o.max_watches = 1;
  o.clock = &local;
  std::unique_ptr<tokenbroker::Client> client = NewClient(o);
  ASSERT_NE(client, nullptr);
  ASSERT_TRUE(client->Get(testing::kActiveId).ok());
  ASSERT_TRUE(Eventually([&] { return client->stats().watch_updates >= 1; }));
  auto watched = client->Get(testing::kActiveId);
  EXPECT_GT((*watched)->use_until, local.Now() + absl::Minutes(50));
  auto other = client->Get(testing::kForeverId);
  ASSERT_TRUE(other.ok()) << other.status();
  EXPECT_EQ(client->stats().watches, 1u);
  EXPECT_EQ((*other)->use_until, local.Now() + o.unwatched_recheck);
}

TEST_F(ClientTest, AFinishedWatchFreesItsPlaceUnderMaxWatches) {
  tokenbroker::ClientOptions o = Options();
  o.max_watches = 1;
  std::unique_ptr<tokenbroker::Client> client = NewClient(o);
  ASSERT_NE(client, nullptr);
  ASSERT_TRUE(client->Get(testing::kActiveId).ok());
  ASSERT_TRUE(Eventually([&] { return client->stats().watch_updates >= 1; }));
  ASSERT_TRUE(Admin()->Revoke(testing::kActiveId).ok());  // its watch ends for good
  ASSERT_TRUE(Eventually([&] { return client->stats().watches == 0; }));
  ASSERT_TRUE(client->Get(testing::kForeverId).ok());
  EXPECT_EQ(client->stats().watches, 1u);
  // Watched, its never-expiring token is used without a recheck.
  EXPECT_TRUE(Eventually([&] {
    auto t = client->Get(testing::kForeverId);
    return t.ok() && (*t)->use_until == absl::InfiniteFuture();
  }));
}

TEST_F(ClientTest, AnUnwatchedConnectionCreatedAgainReplacesItsOldHigherGeneration) {
  testing::FakeClock local;
  tokenbroker::ClientOptions o = Options();
  o.watch = false;
  o.clock = &local;
  std::unique_ptr<tokenbroker::Client> client = NewClient(o);
  ASSERT_NE(client, nullptr);
  ASSERT_TRUE(broker_.Activate(testing::kActiveId, Fresh(clock_, absl::Hours(1))).ok());
  ASSERT_EQ((*client->Get(testing::kActiveId))->generation, 2u);
  ASSERT_TRUE(Admin()->DeleteConnection(testing::kActiveId).ok());
  ASSERT_TRUE(broker_.CreatePending(testing::kActiveId, "zendesk", {{"subdomain", "acme"}}).ok());
  const core::Grant fresh = Fresh(clock_, absl::Hours(1));
  ASSERT_TRUE(broker_.Activate(testing::kActiveId, fresh).ok());  // generation 1
  local.Advance(o.unwatched_recheck + absl::Seconds(1));  // generation 2 is due for a recheck
  auto t = client->Get(testing::kActiveId);
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_EQ((*t)->access_token, fresh.access_token.Reveal());
  const uint64_t rpcs = client->stats().rpcs;
  ASSERT_TRUE(client->Get(testing::kActiveId).ok());
  EXPECT_EQ(client->stats().rpcs, rpcs);  // generation 1 was cached over the old generation 2
}

TEST_F(ClientTest, ATokenThatCannotLiveTheMarginIsCachedForHalfOfWhatIsLeft) {
  core::Grant last = Fresh(clock_, absl::Hours(1));
  last.refresh_token.reset();  // not refreshable: no token of it will ever live 30 s more
  ASSERT_TRUE(broker_.Activate(testing::kActiveId, last).ok());
  clock_.Advance(absl::Hours(1) - absl::Seconds(20));  // 20 s left
  testing::FakeClock local;
  tokenbroker::ClientOptions o = Options();
  o.clock = &local;
  std::unique_ptr<tokenbroker::Client> client = NewClient(o);
  ASSERT_NE(client, nullptr);
  auto t = client->Get(testing::kActiveId);
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_EQ((*t)->access_token, last.access_token.Reveal());
  EXPECT_EQ((*t)->use_until, local.Now() + absl::Seconds(10));
  EXPECT_EQ(client->stats().rpcs, 2u);  // min_ttl 30 s: OUT_OF_RANGE; then min_ttl 0
  local.Advance(absl::Seconds(9));
  ASSERT_TRUE(client->Get(testing::kActiveId).ok());
  EXPECT_EQ(client->stats().rpcs, 2u);
  local.Advance(absl::Seconds(2));
  ASSERT_TRUE(client->Get(testing::kActiveId).ok());
  EXPECT_EQ(client->stats().rpcs, 4u);
}

TEST_F(ClientTest, BadOptionsAreRefused) {
  tokenbroker::ClientOptions o = Options();
  o.broker.target.clear();
  EXPECT_EQ(tokenbroker::Client::Create(o).status().code(), absl::StatusCode::kInvalidArgument);
  o = Options();
  o.margin = absl::Seconds(-1);
  EXPECT_EQ(tokenbroker::Client::Create(o).status().code(), absl::StatusCode::kInvalidArgument);
  o = Options();
  o.rpc_timeout = absl::ZeroDuration();
  EXPECT_EQ(tokenbroker::Client::Create(o).status().code(), absl::StatusCode::kInvalidArgument);
  o = Options();
  o.refused_recheck = absl::ZeroDuration();
  EXPECT_EQ(tokenbroker::Client::Create(o).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(ClientTest, NewGenerationsArriveThroughTheWatchWithoutAnRpc) {
  ASSERT_TRUE(client_->Get(testing::kActiveId).ok());
  ASSERT_TRUE(Eventually([&] { return client_->stats().watch_updates >= 1; }));
  const core::Grant next = Fresh(clock_, absl::Hours(1));
  ASSERT_TRUE(broker_.Activate(testing::kActiveId, next).ok());  // a reconnect: generation 2
  ASSERT_TRUE(Eventually([&] {
    auto t = client_->Get(testing::kActiveId);
    return t.ok() && (*t)->generation == 2;
  }));
  EXPECT_EQ((*client_->Get(testing::kActiveId))->access_token, next.access_token.Reveal());
  EXPECT_EQ(client_->stats().rpcs, 1u);
}

TEST_F(ClientTest, InvalidateAfterA401GetsANewerGenerationThroughRefresh) {
  auto first = client_->Get(testing::kActiveId);
  ASSERT_TRUE(first.ok());
  parts_.provider.NextRefreshReturns(Fresh(clock_, absl::Hours(1)));
  auto fresh = client_->Invalidate(testing::kActiveId, (*first)->generation);
  ASSERT_TRUE(fresh.ok()) << fresh.status();
  EXPECT_EQ((*fresh)->generation, (*first)->generation + 1);
  EXPECT_EQ(parts_.provider.refresh_calls(), 1);
  // Another instance reporting the same 401 gets the newer token without a second refresh.
  auto again = client_->Invalidate(testing::kActiveId, (*first)->generation);
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ((*again)->generation, (*fresh)->generation);
  EXPECT_EQ(parts_.provider.refresh_calls(), 1);
  EXPECT_EQ((*client_->Get(testing::kActiveId))->generation, (*fresh)->generation);
}

TEST_F(ClientTest, InvalidatingAnOlderGenerationThanTheCachedOneMakesNoRpc) {
  ASSERT_TRUE(client_->Get(testing::kActiveId).ok());
  ASSERT_TRUE(broker_.Activate(testing::kActiveId, Fresh(clock_, absl::Hours(1))).ok());
  ASSERT_TRUE(Eventually([&] { return (*client_->Get(testing::kActiveId))->generation == 2; }));
  const uint64_t rpcs = client_->stats().rpcs;
  auto t = client_->Invalidate(testing::kActiveId, 1);  // a call that began with generation 1
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_EQ((*t)->generation, 2u);
  EXPECT_EQ(client_->stats().rpcs, rpcs);
  EXPECT_EQ(parts_.provider.refresh_calls(), 0);
}

TEST_F(ClientTest, ARefusedGenerationTheBrokerStillServesIsAskedForOncePerRecheck) {
  core::Grant last = Fresh(clock_, absl::Hours(1));
  last.refresh_token.reset();  // Refresh answers FAILED_PRECONDITION NOT_REFRESHABLE
  ASSERT_TRUE(broker_.Activate(testing::kActiveId, last).ok());
  testing::FakeClock local;
  tokenbroker::ClientOptions o = Options();
  o.clock = &local;
  o.refused_recheck = absl::Seconds(2);
  std::unique_ptr<tokenbroker::Client> client = NewClient(o);
  ASSERT_NE(client, nullptr);
  auto t = client->Get(testing::kActiveId);
  ASSERT_TRUE(t.ok()) << t.status();
  const uint64_t refused = (*t)->generation;
  ASSERT_GE(refused, 2u);
  ASSERT_TRUE(Eventually([&] { return client->stats().watch_updates >= 1; }));
  const auto not_refreshable = [](const absl::Status& s) {
    return s.code() == absl::StatusCode::kFailedPrecondition &&
           tb::client::ErrorReason(s) == "NOT_REFRESHABLE";
  };
  EXPECT_TRUE(not_refreshable(client->Invalidate(testing::kActiveId, refused).status()));
  // The broker still has only the refused token: the first Get asks it, the next ones use
  // that answer for refused_recheck, not for the hour the token has left.
  const uint64_t rpcs = client->stats().rpcs;
  for (int i = 0; i < 3; ++i) {
    auto again = client->Get(testing::kActiveId);
    ASSERT_TRUE(again.ok()) << again.status();
    EXPECT_EQ((*again)->generation, refused);
    EXPECT_EQ((*again)->use_until, local.Now() + o.refused_recheck);
  }
  EXPECT_EQ(client->stats().rpcs, rpcs + 1);
  // Each 401 on it, or on an older generation, gets the refresh's failure again, no RPC.
  EXPECT_TRUE(not_refreshable(client->Invalidate(testing::kActiveId, refused).status()));
  EXPECT_TRUE(not_refreshable(client->Invalidate(testing::kActiveId, refused).status()));
  EXPECT_TRUE(not_refreshable(client->Invalidate(testing::kActiveId, refused - 1).status()));
  ASSERT_TRUE(client->Get(testing::kActiveId).ok());
  EXPECT_EQ(client->stats().rpcs, rpcs + 1);
  local.Advance(absl::Seconds(1));
  ASSERT_TRUE(client->Get(testing::kActiveId).ok());
  EXPECT_EQ(client->stats().rpcs, rpcs + 1);
  local.Advance(absl::Seconds(1));  // refused_recheck is over
  auto later = client->Get(testing::kActiveId);
  ASSERT_TRUE(later.ok()) << later.status();
  EXPECT_EQ((*later)->generation, refused);
  EXPECT_EQ(client->stats().rpcs, rpcs + 2);
  // Now the broker is asked again, and says it tried moments ago (its clock did not move).
  EXPECT_EQ(client->Invalidate(testing::kActiveId, refused).status().code(),
            absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(client->stats().rpcs, rpcs + 3);
}

TEST_F(ClientTest, AnUnwatchedConnectionCreatedAgainAfterAnInvalidateCachesItsNewToken) {
  testing::FakeClock local;
  tokenbroker::ClientOptions o = Options();
  o.watch = false;
  o.clock = &local;
  std::unique_ptr<tokenbroker::Client> client = NewClient(o);
  ASSERT_NE(client, nullptr);
  ASSERT_TRUE(broker_.Activate(testing::kActiveId, Fresh(clock_, absl::Hours(1))).ok());
  ASSERT_EQ((*client->Get(testing::kActiveId))->generation, 2u);
  parts_.provider.NextRefreshReturns(Fresh(clock_, absl::Hours(1)));
  auto refreshed = client->Invalidate(testing::kActiveId, 2);  // generation 2 refused
  ASSERT_TRUE(refreshed.ok()) << refreshed.status();
  ASSERT_EQ((*refreshed)->generation, 3u);
  ASSERT_TRUE(Admin()->DeleteConnection(testing::kActiveId).ok());
  ASSERT_TRUE(broker_.CreatePending(testing::kActiveId, "zendesk", {{"subdomain", "acme"}}).ok());
  const core::Grant fresh = Fresh(clock_, absl::Hours(1));
  ASSERT_TRUE(broker_.Activate(testing::kActiveId, fresh).ok());  // generation 1
  local.Advance(o.unwatched_recheck + absl::Seconds(1));  // generation 3 is due for a recheck
  auto t = client->Get(testing::kActiveId);
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_EQ((*t)->access_token, fresh.access_token.Reveal());
  const uint64_t rpcs = client->stats().rpcs;
  // Generation 1 is below the refused 2, and the broker gave it when asked after the refusal:
  // it is the new connection's token, cached for unwatched_recheck, not refused_recheck.
  local.Advance(o.refused_recheck + absl::Seconds(1));
  auto cached = client->Get(testing::kActiveId);
  ASSERT_TRUE(cached.ok()) << cached.status();
  EXPECT_EQ((*cached)->access_token, fresh.access_token.Reveal());
  EXPECT_EQ(client->stats().rpcs, rpcs);
}

TEST_F(ClientTest, AGetTokenThatWaitsForTheRefreshHasTheMarginMoreThanRpcTimeout) {
  // 2 s before the broker's promise runs out, less than the 30 s margin: the GetToken waits
  // at the broker for the scheduled refresh.
  const core::Grant next = NearTheScheduledRefresh();
  tokenbroker::ClientOptions o = Options();
  o.rpc_timeout = absl::Milliseconds(500);
  o.watch = false;
  std::unique_ptr<tokenbroker::Client> client = NewClient(o);
  ASSERT_NE(client, nullptr);
  absl::StatusOr<std::shared_ptr<const tokenbroker::Token>> got;
  std::thread caller([&] { got = client->Get(testing::kActiveId); });
  // Three times rpc_timeout: a deadline of rpc_timeout alone would have ended the call.
  std::this_thread::sleep_for(std::chrono::milliseconds(1500));
  clock_.Advance(absl::Seconds(3));
  parts_.refresher.RunDue();
  caller.join();
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ((*got)->access_token, next.access_token.Reveal());
  EXPECT_EQ(client->stats().rpcs, 1u);
}

// The system clock, except that once armed for a thread, that thread's next Now() waits until
// Release(): a way to stop a call between two of its steps.
class ParkingClock final : public Clock {
 public:
  absl::Time Now() const override {
    MutexLock lock(&mu_);
    if (armed_ && std::this_thread::get_id() == thread_) {
      armed_ = false;
      parked_ = true;
      while (!released_) {
        cv_.Wait(&mu_);
      }
    }
    return absl::Now();
  }
  void ArmForThisThread() {
    MutexLock lock(&mu_);
    armed_ = true;
    thread_ = std::this_thread::get_id();
  }
  bool parked() const {
    MutexLock lock(&mu_);
    return parked_;
  }
  void Release() {
    {
      MutexLock lock(&mu_);
      released_ = true;
    }
    cv_.SignalAll();
  }

 private:
  mutable Mutex mu_;
  mutable CondVar cv_;
  mutable bool armed_ ABSL_GUARDED_BY(mu_) = false;
  mutable bool parked_ ABSL_GUARDED_BY(mu_) = false;
  bool released_ ABSL_GUARDED_BY(mu_) = false;
  std::thread::id thread_ ABSL_GUARDED_BY(mu_);
};

TEST_F(ClientTest, ARevocationDuringAnInvalidateIsNotUndoneByItsAnswer) {
  ParkingClock parking;
  tokenbroker::ClientOptions o = Options();
  o.clock = &parking;
  std::unique_ptr<tokenbroker::Client> client = NewClient(o);
  ASSERT_NE(client, nullptr);
  ASSERT_TRUE(client->Get(testing::kActiveId).ok());
  ASSERT_TRUE(Eventually([&] { return client->stats().watch_updates >= 1; }));
  parts_.provider.NextRefreshReturns(Fresh(clock_, absl::Hours(1)));
  // The Invalidate gets generation 2 and sees the watch live, then stops before caching it
  // (its first clock reading); meanwhile the connection is revoked and the watch ends.
  std::thread invalidator([&] {
    parking.ArmForThisThread();
    EXPECT_TRUE(client->Invalidate(testing::kActiveId, 1).ok());
  });
  ASSERT_TRUE(Eventually([&] { return parking.parked(); }));
  ASSERT_TRUE(Admin()->Revoke(testing::kActiveId).ok());
  ASSERT_TRUE(Eventually([&] { return client->stats().watches == 0; }));
  parking.Release();
  invalidator.join();
  absl::Status last;
  EXPECT_TRUE(Eventually([&] {
    last = client->Get(testing::kActiveId).status();
    return last.code() == absl::StatusCode::kFailedPrecondition;
  })) << last;
}

TEST_F(ClientTest, AnAnswerSentBeforeTheRefusalIsNotTakenForARecreatedConnection) {
  ParkingClock parking;
  tokenbroker::ClientOptions o = Options();
  o.watch = false;
  o.clock = &parking;
  std::unique_ptr<tokenbroker::Client> client = NewClient(o);
  ASSERT_NE(client, nullptr);
  // The Get has generation 1 from the broker and stops before caching it (its first clock
  // reading); meanwhile generation 2 arrives and is refused.
  std::thread getter([&] {
    parking.ArmForThisThread();
    auto t = client->Get(testing::kActiveId);
    ASSERT_TRUE(t.ok()) << t.status();
    EXPECT_EQ((*t)->generation, 1u);
  });
  ASSERT_TRUE(Eventually([&] { return parking.parked(); }));
  core::Grant last = Fresh(clock_, absl::Hours(1));
  last.refresh_token.reset();
  ASSERT_TRUE(broker_.Activate(testing::kActiveId, last).ok());  // generation 2
  EXPECT_EQ(client->Invalidate(testing::kActiveId, 2).status().code(),
            absl::StatusCode::kFailedPrecondition);
  parking.Release();
  getter.join();
  // Generation 1 is below the refused 2 but was asked for before the refusal: it is held
  // briefly like a refused one, not cached for unwatched_recheck as a new connection's.
  auto t = client->Get(testing::kActiveId);
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_LE((*t)->use_until, absl::Now() + o.refused_recheck);
}

TEST_F(ClientTest, ATokenWhoseWatchBrokeIsRecheckedInsteadOfTrusted) {
  testing::FakeClock local;
  tokenbroker::ClientOptions o = Options();
  o.clock = &local;
  o.max_reconnect_delay = absl::Seconds(30);  // the stream stays down for the assertion
  std::unique_ptr<tokenbroker::Client> client = NewClient(o);
  ASSERT_NE(client, nullptr);
  ASSERT_TRUE(client->Get(testing::kActiveId).ok());
  ASSERT_TRUE(Eventually([&] { return client->stats().watch_updates >= 1; }));
  EXPECT_GT((*client->Get(testing::kActiveId))->use_until, local.Now() + absl::Minutes(50));
  server_->Shutdown(absl::Now() + absl::Seconds(5));  // the stream ends UNAVAILABLE
  server_.reset();
  EXPECT_TRUE(Eventually([&] {
    auto t = client->Get(testing::kActiveId);
    return t.ok() && (*t)->use_until <= local.Now() + o.unwatched_recheck;
  }));
}

TEST_F(ClientTest, InvalidatingGenerationZeroIsRefused) {
  ASSERT_TRUE(client_->Get(testing::kActiveId).ok());
  EXPECT_EQ(client_->Invalidate(testing::kActiveId, 0).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(parts_.provider.refresh_calls(), 0);  // Refresh(0) would have refreshed
}

TEST_F(ClientTest, ErrorsKeepTheBrokersCodeAndReason) {
  auto pending = client_->Get(testing::kPendingId);
  EXPECT_EQ(pending.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(tb::client::ErrorReason(pending.status()), "NOT_CONNECTED");
  EXPECT_EQ(client_->Get("nobody").status().code(), absl::StatusCode::kNotFound);
}

TEST_F(ClientTest, TheWatchComesBackAfterTheServerRestarts) {
  ASSERT_TRUE(client_->Get(testing::kActiveId).ok());
  ASSERT_TRUE(Eventually([&] { return client_->stats().watch_updates >= 1; }));
  const uint64_t before = client_->stats().watch_updates;
  server_->Shutdown(absl::Now() + absl::Seconds(5));
  server_.reset();
  StartServer(absl::StrCat("127.0.0.1:", port_));  // same address: the client reconnects
  ASSERT_TRUE(Eventually([&] { return client_->stats().watch_updates > before; }));
  ASSERT_TRUE(broker_.Activate(testing::kActiveId, Fresh(clock_, absl::Hours(1))).ok());
  EXPECT_TRUE(Eventually([&] {
    auto t = client_->Get(testing::kActiveId);
    return t.ok() && (*t)->generation == 2;
  }));
}

// Keepalive, both ways, through a proxy that can make a connection go silent as a vanished
// peer does. The server is restarted with fast pings allowed (the defaults are 10 s and 1 min).
class KeepaliveTest : public ClientTest {
 protected:
  void Restart(absl::Duration min_client_ping_interval, absl::Duration server_keepalive) {
    server_->Shutdown(absl::Now() + absl::Seconds(5));
    server_.reset();
    server_options_.min_client_ping_interval = min_client_ping_interval;
    server_options_.keepalive = server_keepalive;
    server_options_.keepalive_timeout = absl::Seconds(2);  // generous: sanitizer builds
    StartServer("127.0.0.1:0");
  }
  std::unique_ptr<tokenbroker::Client> ClientVia(const testing::BlackholeProxy& proxy,
                                                 absl::Duration keepalive) {
    tokenbroker::ClientOptions o = Options();
    o.broker.target = absl::StrCat("127.0.0.1:", proxy.port());
    o.broker.keepalive = keepalive;
    o.broker.keepalive_timeout = absl::Seconds(2);
    return NewClient(o);
  }
};

TEST_F(KeepaliveTest, AWatchOverAConnectionThatWentSilentIsReopened) {
  Restart(/*min_client_ping_interval=*/absl::Milliseconds(100),
          /*server_keepalive=*/absl::Hours(1));
  testing::BlackholeProxy proxy(port_);
  std::unique_ptr<tokenbroker::Client> client = ClientVia(proxy, absl::Seconds(1));
  ASSERT_NE(client, nullptr);
  ASSERT_TRUE(client->Get(testing::kActiveId).ok());
  ASSERT_TRUE(Eventually([&] { return client->stats().watch_updates >= 1; }));
  // The server takes pings this often on a quiet stream: no GOAWAY, no second stream. (Under
  // gRPC's default policy the third ping within 5 min gets GOAWAY too_many_pings: at 1 s
  // apart, about 4 s in.)
  std::this_thread::sleep_for(std::chrono::seconds(6));
  EXPECT_EQ(client->stats().watch_updates, 1u);
  EXPECT_EQ(proxy.accepted(), 1);

  proxy.SwallowOpenConnections();
  ASSERT_TRUE(broker_.Activate(testing::kActiveId, Fresh(clock_, absl::Hours(1))).ok());
  // Unanswered pings end the stream; the new one (a new connection) brings generation 2.
  EXPECT_TRUE(Eventually([&] {
    auto t = client->Get(testing::kActiveId);
    return t.ok() && (*t)->generation == 2;
  }));
  EXPECT_GE(proxy.accepted(), 2);
  EXPECT_EQ(client->stats().rpcs, 1u);
}

TEST_F(KeepaliveTest, TheServerDropsTheStreamsOfAClientThatWentSilent) {
  server_options_.max_watch_streams = 1;
  Restart(/*min_client_ping_interval=*/absl::Seconds(10),
          /*server_keepalive=*/absl::Milliseconds(300));
  testing::BlackholeProxy proxy(port_);
  // A client that never pings: only the server can find out that it is gone.
  std::unique_ptr<tokenbroker::Client> gone = ClientVia(proxy, absl::ZeroDuration());
  ASSERT_NE(gone, nullptr);
  ASSERT_TRUE(gone->Get(testing::kActiveId).ok());
  ASSERT_TRUE(Eventually([&] { return gone->stats().watch_updates >= 1; }));
  std::unique_ptr<tb::client::TokenClient> other = Admin();
  const auto watch_once = [&] {
    return other->Watch(testing::kForeverId, [](const auto&) { return false; });
  };
  // max_watch_streams is 1, and the silent client holds it.
  EXPECT_EQ(watch_once().code(), absl::StatusCode::kResourceExhausted);
  proxy.SwallowOpenConnections();
  absl::Status last;
  EXPECT_TRUE(Eventually([&] {
    last = watch_once();
    return last.ok();
  })) << last;
}

}  // namespace
}  // namespace tb
