// tokenbroker::Client against the real gRPC server and broker (in-memory store, fake clock on
// the server side, scriptable provider client): the local cache, watch pushes, the 401 path,
// and the watch stream coming back after the server restarts.

#include "tokenbroker/client.h"

#include <grpcpp/grpcpp.h>

#include <chrono>
#include <memory>
#include <thread>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "server/src/core/provider_presets.h"
#include "server/src/grpc/grpc_server.h"
#include "server/src/store/in_memory_token_store.h"
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
    tokenbroker::ClientOptions o;
    o.broker.target = absl::StrCat("127.0.0.1:", port_);
    o.margin = absl::Seconds(30);
    o.max_reconnect_delay = absl::Milliseconds(200);
    auto c = tokenbroker::Client::Create(o);
    ASSERT_TRUE(c.ok()) << c.status();
    client_ = *std::move(c);
  }
  void TearDown() override {
    client_.reset();
    if (server_ != nullptr) {
      server_->Shutdown(absl::Now() + absl::Seconds(5));
    }
  }

  void StartServer(const std::string& listen) {
    grpc_api::GrpcServerOptions options;
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
  EXPECT_GT((*first)->use_until, absl::Now() + absl::Minutes(50));  // 55 min left, minus 30 s
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

TEST_F(ClientTest, ErrorsKeepTheBrokersCodeAndReason) {
  auto pending = client_->Get(testing::kPendingId);
  EXPECT_EQ(pending.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(tb::client::ErrorReason(pending.status()), "NOT_CONNECTED");
  EXPECT_EQ(client_->Get("nobody").status().code(), absl::StatusCode::kNotFound);
}

TEST_F(ClientTest, TheWatchComesBackAfterTheServerRestarts) {
  ASSERT_TRUE(client_->Get(testing::kActiveId).ok());
  ASSERT_TRUE(Eventually([&] { return client_->stats().watch_updates >= 1; }));
  server_->Shutdown(absl::Now() + absl::Seconds(5));
  server_.reset();
  StartServer(absl::StrCat("127.0.0.1:", port_));  // same address: the client reconnects
  const uint64_t before = client_->stats().watch_updates;
  ASSERT_TRUE(Eventually([&] { return client_->stats().watch_updates > before; }));
  ASSERT_TRUE(broker_.Activate(testing::kActiveId, Fresh(clock_, absl::Hours(1))).ok());
  EXPECT_TRUE(Eventually([&] {
    auto t = client_->Get(testing::kActiveId);
    return t.ok() && (*t)->generation == 2;
  }));
}

}  // namespace
}  // namespace tb
