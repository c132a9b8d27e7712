// TokenBroker, ConnectionAdmin, health and reflection through a real gRPC server on
// 127.0.0.1:0, with the real broker and cache behind it (in-memory store, fake clock).

#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>

#include <atomic>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <memory>
#include <set>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "absl/strings/str_cat.h"
#include "google/rpc/error_details.pb.h"
#include "google/rpc/status.pb.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "gtest/gtest.h"
#include "server/src/core/provider_presets.h"
#include "server/src/grpc/grpc_server.h"
#include "server/src/store/in_memory_token_store.h"
#include "tests/fakes/fake_clock.h"
#include "tests/support/flow_parts.h"
#include "tests/support/seed.h"
#include "tests/support/test_secrets.h"
#include "tokenbroker/v1/token_broker.grpc.pb.h"

namespace tb {
namespace {

namespace v1 = tokenbroker::v1;
using grpc::health::v1::HealthCheckRequest;
using grpc::health::v1::HealthCheckResponse;

// The ErrorInfo reason in a failed call's details, "" if none.
std::string ReasonOf(const grpc::Status& s) {
  google::rpc::Status details;
  if (s.error_details().empty() || !details.ParseFromString(s.error_details())) {
    return "";
  }
  for (const google::protobuf::Any& any : details.details()) {
    google::rpc::ErrorInfo info;
    if (any.UnpackTo(&info)) {
      EXPECT_EQ(info.domain(), "tokenbroker.v1");
      return info.reason();
    }
  }
  return "";
}

class GrpcServiceTest : public ::testing::Test {
 protected:
  void SetUp() override {
    // The seeded connections' provider; its refreshes go to the scriptable fake client, which
    // fails them (UNAVAILABLE) unless a test queues a result.
    core::ProviderSpec zendesk = *core::PresetSpec("zendesk");
    zendesk.name = "zendesk";
    flow_parts_.providers.Put("zendesk", zendesk);
    ASSERT_TRUE(testing::SeedEveryStatus(broker_, clock_.Now()).ok());
    auto server = StartServer({});
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = *std::move(server);
    server_->SetReady(true);
    channel_ = grpc::CreateChannel(absl::StrCat("127.0.0.1:", server_->port()),
                                   grpc::InsecureChannelCredentials());
    probe_channel_ = grpc::CreateChannel(absl::StrCat("127.0.0.1:", server_->probe_port()),
                                         grpc::InsecureChannelCredentials());
    tokens_ = v1::TokenBroker::NewStub(channel_);
    admin_ = v1::ConnectionAdmin::NewStub(channel_);
  }

  void TearDown() override { server_->Shutdown(absl::Now() + absl::Seconds(5)); }

  // A server over the fixture's domain; tests that need other limits start a second one.
  absl::StatusOr<std::unique_ptr<grpc_api::GrpcServer>> StartServer(
      const grpc_api::GrpcServerOptions& options) {
    return grpc_api::GrpcServer::Start(
        options,
        {broker_, cache_, flow_parts_.flow, flow_parts_.refresher, flow_parts_.run_blocking()});
  }
  static std::unique_ptr<v1::TokenBroker::Stub> TokenStubFor(const grpc_api::GrpcServer& server) {
    return v1::TokenBroker::NewStub(grpc::CreateChannel(absl::StrCat("127.0.0.1:", server.port()),
                                                        grpc::InsecureChannelCredentials()));
  }

  grpc::Status GetToken(const std::string& id, v1::GetTokenResponse* resp,
                        absl::Duration min_ttl = absl::ZeroDuration()) {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
    v1::GetTokenRequest req;
    req.set_connection_id(id);
    if (min_ttl != absl::ZeroDuration()) {
      req.mutable_min_ttl()->set_seconds(absl::ToInt64Seconds(min_ttl));
    }
    return tokens_->GetToken(&ctx, req, resp);
  }

  HealthCheckResponse::ServingStatus Health(const std::shared_ptr<grpc::Channel>& ch,
                                            const std::string& service,
                                            grpc::StatusCode* code = nullptr) {
    auto stub = grpc::health::v1::Health::NewStub(ch);
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
    HealthCheckRequest req;
    req.set_service(service);
    HealthCheckResponse resp;
    const grpc::Status s = stub->Check(&ctx, req, &resp);
    if (code != nullptr) {
      *code = s.error_code();
    }
    return s.ok() ? resp.status() : HealthCheckResponse::UNKNOWN;
  }

  testing::FakeClock clock_;
  store::InMemoryTokenStore store_;
  cache::ConnectionCache cache_;
  // The refresher follows every change, as main wires it: waiting GetTokens are woken by it.
  oauth::Broker broker_{clock_, store_, cache_, testing::TrackedBy(&flow_parts_)};
  testing::FlowParts flow_parts_{clock_, broker_};
  std::unique_ptr<grpc_api::GrpcServer> server_;
  std::shared_ptr<grpc::Channel> channel_;
  std::shared_ptr<grpc::Channel> probe_channel_;
  std::unique_ptr<v1::TokenBroker::Stub> tokens_;
  std::unique_ptr<v1::ConnectionAdmin::Stub> admin_;
};

TEST_F(GrpcServiceTest, GetTokenOnEveryStatusGivesItsCodeAndReason) {
  struct Case {
    const char* id;
    grpc::StatusCode code;
    const char* reason;
  };
  const Case cases[] = {
      {testing::kActiveId, grpc::StatusCode::OK, ""},
      {testing::kForeverId, grpc::StatusCode::OK, ""},
      {testing::kExpiredId, grpc::StatusCode::UNAVAILABLE, ""},
      {testing::kPendingId, grpc::StatusCode::FAILED_PRECONDITION, "NOT_CONNECTED"},
      {testing::kNeedsReauthId, grpc::StatusCode::FAILED_PRECONDITION, "NEEDS_REAUTH"},
      {testing::kRotationLostId, grpc::StatusCode::FAILED_PRECONDITION, "ROTATION_LOST"},
      {testing::kRevokedId, grpc::StatusCode::FAILED_PRECONDITION, "REVOKED"},
      {testing::kDeletedId, grpc::StatusCode::NOT_FOUND, ""},
      {"never-existed", grpc::StatusCode::NOT_FOUND, ""},
  };
  for (const Case& c : cases) {
    v1::GetTokenResponse resp;
    const grpc::Status s = GetToken(c.id, &resp);
    EXPECT_EQ(s.error_code(), c.code) << c.id << ": " << s.error_message();
    EXPECT_EQ(ReasonOf(s), c.reason) << c.id;
    if (c.code != grpc::StatusCode::OK) {
      EXPECT_FALSE(resp.has_token()) << c.id;
    }
  }
}

TEST_F(GrpcServiceTest, GetTokenCarriesEveryTokenField) {
  clock_.Advance(absl::Minutes(10));
  v1::GetTokenResponse resp;
  ASSERT_TRUE(GetToken(testing::kActiveId, &resp).ok());
  const v1::Token& t = resp.token();
  const core::Grant& stored = *cache_.Get(testing::kActiveId)->grant;
  EXPECT_EQ(t.connection_id(), testing::kActiveId);
  EXPECT_EQ(t.access_token(), stored.access_token.Reveal());
  EXPECT_EQ(t.token_type(), "Bearer");
  EXPECT_EQ(std::vector<std::string>(t.scopes().begin(), t.scopes().end()),
            (std::vector<std::string>{"read", "write"}));
  EXPECT_EQ(t.expires_at().seconds(), absl::ToUnixSeconds(*stored.expires_at));
  // valid_until is the scheduled refresh: 5 minutes before the 1 h token's expiry.
  EXPECT_EQ(t.valid_until().seconds(), absl::ToUnixSeconds(*stored.expires_at) - 5 * 60);
  EXPECT_EQ(t.valid_until().seconds(), absl::ToUnixSeconds(*stored.refresh_at));
  EXPECT_EQ(t.valid_for().seconds(), 45 * 60);  // 10 min after issue
  EXPECT_EQ(t.generation(), 1u);

  ASSERT_TRUE(GetToken(testing::kForeverId, &resp).ok());
  EXPECT_FALSE(resp.token().has_expires_at());
  EXPECT_FALSE(resp.token().has_valid_until());
  EXPECT_FALSE(resp.token().has_valid_for());
}

TEST_F(GrpcServiceTest, GetTokenRejectsBadArguments) {
  v1::GetTokenResponse resp;
  EXPECT_EQ(GetToken("", &resp).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(GetToken("../etc/passwd", &resp).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(GetToken(testing::kActiveId, &resp, absl::Seconds(-5)).error_code(),
            grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(GetToken(testing::kActiveId, &resp, absl::Hours(2)).error_code(),
            grpc::StatusCode::INVALID_ARGUMENT);  // above the 1 h cap
  EXPECT_TRUE(GetToken(testing::kActiveId, &resp, absl::Minutes(54)).ok());
  // Past valid_until, though before expiry: no token of this connection is promised that long.
  EXPECT_EQ(GetToken(testing::kActiveId, &resp, absl::Minutes(56)).error_code(),
            grpc::StatusCode::OUT_OF_RANGE);
}

TEST_F(GrpcServiceTest, ListConnectionsPagesThroughTenThousand) {
  ASSERT_TRUE(testing::SeedBulk(broker_, clock_.Now(), 10'000).ok());
  std::set<std::string> seen;
  std::string last;
  std::string token;
  int pages = 0;
  do {
    grpc::ClientContext ctx;
    v1::ListConnectionsRequest req;
    req.set_page_size(1000);
    req.set_page_token(token);
    v1::ListConnectionsResponse resp;
    ASSERT_TRUE(admin_->ListConnections(&ctx, req, &resp).ok());
    ASSERT_LE(resp.connections_size(), 1000);
    for (const v1::Connection& c : resp.connections()) {
      EXPECT_GT(c.id(), last);
      last = c.id();
      seen.insert(c.id());
    }
    token = resp.next_page_token();
    ++pages;
  } while (!token.empty());
  EXPECT_EQ(seen.size(), 10'000u + 7u);  // bulk plus the 7 seeded that remain
  EXPECT_EQ(pages, 11);

  grpc::ClientContext ctx;
  v1::ListConnectionsRequest req;
  req.set_page_size(1000);
  req.set_provider("zendesk-chat");
  req.set_status(v1::CONNECTION_STATUS_ACTIVE);
  v1::ListConnectionsResponse resp;
  ASSERT_TRUE(admin_->ListConnections(&ctx, req, &resp).ok());
  EXPECT_EQ(resp.connections_size(), 1000);
  for (const v1::Connection& c : resp.connections()) {
    EXPECT_EQ(c.provider(), "zendesk-chat");
    EXPECT_EQ(c.status(), v1::CONNECTION_STATUS_ACTIVE);
  }
}

TEST_F(GrpcServiceTest, ListConnectionsFiltersByStatusAndRejectsGarbageTokens) {
  grpc::ClientContext ctx;
  v1::ListConnectionsRequest req;
  req.set_status(v1::CONNECTION_STATUS_NEEDS_REAUTH);
  v1::ListConnectionsResponse resp;
  ASSERT_TRUE(admin_->ListConnections(&ctx, req, &resp).ok());
  ASSERT_EQ(resp.connections_size(), 2);
  EXPECT_EQ(resp.connections(0).id(), testing::kRotationLostId);
  EXPECT_EQ(resp.connections(0).reason(), "ROTATION_LOST");
  EXPECT_EQ(resp.connections(1).id(), testing::kNeedsReauthId);
  EXPECT_TRUE(resp.next_page_token().empty());

  for (const char* bad : {"%%%", "not-base64!", "YS9i"}) {  // "YS9i" decodes to "a/b"
    grpc::ClientContext c2;
    v1::ListConnectionsRequest r2;
    r2.set_page_token(bad);
    EXPECT_EQ(admin_->ListConnections(&c2, r2, &resp).error_code(),
              grpc::StatusCode::INVALID_ARGUMENT)
        << bad;
  }
  grpc::ClientContext c3;
  v1::ListConnectionsRequest r3;
  r3.set_page_size(5000);
  EXPECT_EQ(admin_->ListConnections(&c3, r3, &resp).error_code(),
            grpc::StatusCode::INVALID_ARGUMENT);
}

TEST_F(GrpcServiceTest, GetConnectionShowsMetadataAndNoSecret) {
  grpc::ClientContext ctx;
  v1::GetConnectionRequest req;
  req.set_connection_id(testing::kActiveId);
  v1::Connection c;
  ASSERT_TRUE(admin_->GetConnection(&ctx, req, &c).ok());
  EXPECT_EQ(c.status(), v1::CONNECTION_STATUS_ACTIVE);
  EXPECT_EQ(c.params().at("subdomain"), "acme");
  EXPECT_TRUE(c.refreshable());
  const std::string wire = c.SerializeAsString();
  const core::Grant& g = *cache_.Get(testing::kActiveId)->grant;
  EXPECT_EQ(wire.find(std::string(g.access_token.Reveal())), std::string::npos);
  EXPECT_EQ(wire.find(std::string(g.refresh_token->Reveal())), std::string::npos);
}

TEST_F(GrpcServiceTest, DeleteConnectionMakesItNotFound) {
  grpc::ClientContext ctx;
  v1::DeleteConnectionRequest req;
  req.set_connection_id(testing::kActiveId);
  v1::DeleteConnectionResponse resp;
  ASSERT_TRUE(admin_->DeleteConnection(&ctx, req, &resp).ok());
  v1::GetTokenResponse token;
  EXPECT_EQ(GetToken(testing::kActiveId, &token).error_code(), grpc::StatusCode::NOT_FOUND);
  grpc::ClientContext ctx2;
  EXPECT_EQ(admin_->DeleteConnection(&ctx2, req, &resp).error_code(), grpc::StatusCode::NOT_FOUND);
}

TEST_F(GrpcServiceTest, ProbePortReportsLivenessAndReadinessSeparately) {
  EXPECT_EQ(Health(probe_channel_, "liveness"), HealthCheckResponse::SERVING);
  EXPECT_EQ(Health(probe_channel_, ""), HealthCheckResponse::SERVING);
  EXPECT_EQ(Health(probe_channel_, "tokenbroker.v1.TokenBroker"), HealthCheckResponse::SERVING);

  server_->SetReady(false);  // e.g. draining
  EXPECT_EQ(Health(probe_channel_, "liveness"), HealthCheckResponse::SERVING);
  EXPECT_EQ(Health(probe_channel_, ""), HealthCheckResponse::NOT_SERVING);
  EXPECT_EQ(Health(probe_channel_, "tokenbroker.v1.TokenBroker"), HealthCheckResponse::NOT_SERVING);
  EXPECT_EQ(Health(channel_, ""), HealthCheckResponse::NOT_SERVING);

  grpc::StatusCode code;
  Health(probe_channel_, "no.such.Service", &code);
  EXPECT_EQ(code, grpc::StatusCode::NOT_FOUND);
}

TEST_F(GrpcServiceTest, HealthWatchStreamsReadinessChanges) {
  server_->SetReady(false);
  auto stub = grpc::health::v1::Health::NewStub(probe_channel_);
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
  HealthCheckRequest req;
  auto reader = stub->Watch(&ctx, req);
  HealthCheckResponse resp;
  ASSERT_TRUE(reader->Read(&resp));
  EXPECT_EQ(resp.status(), HealthCheckResponse::NOT_SERVING);
  server_->SetReady(true);
  ASSERT_TRUE(reader->Read(&resp));
  EXPECT_EQ(resp.status(), HealthCheckResponse::SERVING);

  grpc::ClientContext ctx2;
  ctx2.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
  req.set_service("no.such.Service");
  auto unknown = stub->Watch(&ctx2, req);
  ASSERT_TRUE(unknown->Read(&resp));
  EXPECT_EQ(resp.status(), HealthCheckResponse::SERVICE_UNKNOWN);
  ctx2.TryCancel();
  ctx.TryCancel();
}

TEST_F(GrpcServiceTest, TakenPortIsAStartupError) {
  grpc_api::GrpcServerOptions options;
  options.listen = absl::StrCat("127.0.0.1:", server_->port());
  auto second = StartServer(options);
  EXPECT_EQ(second.status().code(), absl::StatusCode::kUnavailable);
}

TEST_F(GrpcServiceTest, ProbePortServesHealthOnly) {
  auto stub = v1::TokenBroker::NewStub(probe_channel_);
  grpc::ClientContext ctx;
  v1::GetTokenRequest req;
  req.set_connection_id(testing::kActiveId);
  v1::GetTokenResponse resp;
  EXPECT_EQ(stub->GetToken(&ctx, req, &resp).error_code(), grpc::StatusCode::UNIMPLEMENTED);
}

// Server reflection (v1alpha, what gRPC 1.51 serves) on the main port lists our services; the
// probe port has none. The request is hand-encoded (ServerReflectionRequest.list_services = "",
// field 7) because Debian ships no reflection client stubs.
std::string ListServicesViaReflection(const std::shared_ptr<grpc::Channel>& ch,
                                      grpc::StatusCode* code) {
  grpc::GenericStub stub(ch);
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
  grpc::CompletionQueue cq;
  auto call =
      stub.PrepareCall(&ctx, "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", &cq);
  void* tag;
  bool ok;
  call->StartCall(reinterpret_cast<void*>(1));
  cq.Next(&tag, &ok);
  const char request[] = {0x3a, 0x00};
  grpc::Slice slice(request, sizeof request);
  grpc::ByteBuffer buf(&slice, 1);
  call->Write(buf, reinterpret_cast<void*>(2));
  cq.Next(&tag, &ok);
  call->WritesDone(reinterpret_cast<void*>(3));
  cq.Next(&tag, &ok);
  grpc::ByteBuffer reply;
  call->Read(&reply, reinterpret_cast<void*>(4));
  cq.Next(&tag, &ok);
  std::string out;
  if (ok) {
    std::vector<grpc::Slice> slices;
    (void)reply.Dump(&slices);
    for (const grpc::Slice& s : slices) {
      out.append(reinterpret_cast<const char*>(s.begin()), s.size());
    }
  }
  grpc::Status status;
  call->Finish(&status, reinterpret_cast<void*>(5));
  while (cq.Next(&tag, &ok) && tag != reinterpret_cast<void*>(5)) {
  }
  *code = status.error_code();
  return out;
}

TEST_F(GrpcServiceTest, ReflectionOnMainPortOnly) {
  grpc::StatusCode code;
  const std::string services = ListServicesViaReflection(channel_, &code);
  EXPECT_EQ(code, grpc::StatusCode::OK);
  EXPECT_NE(services.find("tokenbroker.v1.TokenBroker"), std::string::npos);
  EXPECT_NE(services.find("tokenbroker.v1.ConnectionAdmin"), std::string::npos);
  EXPECT_NE(services.find("grpc.health.v1.Health"), std::string::npos);

  ListServicesViaReflection(probe_channel_, &code);
  EXPECT_EQ(code, grpc::StatusCode::UNIMPLEMENTED);
}

TEST_F(GrpcServiceTest, WatchTokenPushesEachGenerationThenEndsOnRevoke) {
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
  v1::WatchTokenRequest req;
  req.set_connection_id(testing::kActiveId);
  auto reader = tokens_->WatchToken(&ctx, req);
  v1::WatchTokenResponse msg;
  ASSERT_TRUE(reader->Read(&msg));
  EXPECT_EQ(msg.token().generation(), 1u);

  core::Grant next;
  next.access_token = AccessToken(testing::NewTestSecret("access"));
  next.expires_at = clock_.Now() + absl::Hours(1);
  ASSERT_TRUE(broker_.Activate(testing::kActiveId, next).ok());
  ASSERT_TRUE(reader->Read(&msg));
  EXPECT_EQ(msg.token().generation(), 2u);
  EXPECT_EQ(msg.token().access_token(), next.access_token.Reveal());

  ASSERT_TRUE(broker_.MarkRevoked(testing::kActiveId).ok());
  EXPECT_FALSE(reader->Read(&msg));
  const grpc::Status s = reader->Finish();
  EXPECT_EQ(s.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_EQ(ReasonOf(s), "REVOKED");
}

TEST_F(GrpcServiceTest, WatchTokenOnATokenAwaitingItsRefreshStaysOpenForTheNextGeneration) {
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
  v1::WatchTokenRequest req;
  req.set_connection_id(testing::kExpiredId);  // GetToken answers UNAVAILABLE: nothing to send
  auto reader = tokens_->WatchToken(&ctx, req);
  std::this_thread::sleep_for(std::chrono::milliseconds(300));  // the stream is open by now

  core::Grant next;
  next.access_token = AccessToken(testing::NewTestSecret("access"));
  next.expires_at = clock_.Now() + absl::Hours(1);
  ASSERT_TRUE(broker_.Activate(testing::kExpiredId, next).ok());
  v1::WatchTokenResponse msg;
  ASSERT_TRUE(reader->Read(&msg)) << reader->Finish().error_message();
  EXPECT_EQ(msg.token().generation(), 2u);
  EXPECT_EQ(msg.token().access_token(), next.access_token.Reveal());
  ctx.TryCancel();
}

TEST_F(GrpcServiceTest, WatchTokenOnUnservableConnectionEndsWithItsError) {
  for (const auto& [id, code] : std::vector<std::pair<std::string, grpc::StatusCode>>{
           {testing::kPendingId, grpc::StatusCode::FAILED_PRECONDITION},
           {"never-existed", grpc::StatusCode::NOT_FOUND},
           {"bad id", grpc::StatusCode::INVALID_ARGUMENT}}) {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
    v1::WatchTokenRequest req;
    req.set_connection_id(id);
    auto reader = tokens_->WatchToken(&ctx, req);
    v1::WatchTokenResponse msg;
    EXPECT_FALSE(reader->Read(&msg));
    EXPECT_EQ(reader->Finish().error_code(), code) << id;
  }
}

TEST_F(GrpcServiceTest, RefreshOnUnservableConnectionsGivesTheirErrors) {
  for (const auto& [id, code, reason] :
       std::vector<std::tuple<std::string, grpc::StatusCode, std::string>>{
           {testing::kPendingId, grpc::StatusCode::FAILED_PRECONDITION, "NOT_CONNECTED"},
           {testing::kRevokedId, grpc::StatusCode::FAILED_PRECONDITION, "REVOKED"},
           {testing::kNeedsReauthId, grpc::StatusCode::FAILED_PRECONDITION, "NEEDS_REAUTH"},
           {"never-existed", grpc::StatusCode::NOT_FOUND, ""},
           {"bad id", grpc::StatusCode::INVALID_ARGUMENT, ""}}) {
    grpc::ClientContext ctx;
    v1::RefreshRequest req;
    req.set_connection_id(id);
    v1::RefreshResponse resp;
    const grpc::Status s = tokens_->Refresh(&ctx, req, &resp);
    EXPECT_EQ(s.error_code(), code) << id;
    EXPECT_EQ(ReasonOf(s), reason) << id;
  }
}

// --- GetToken that waits, Revoke, stream limits ----------------------------------------------

core::Grant FreshGrant(const Clock& clock, absl::Duration lifetime) {
  core::Grant g;
  g.access_token = AccessToken(testing::NewTestSecret("access"));
  g.refresh_token = RefreshToken(testing::NewTestSecret("refresh"));
  g.issued_at = clock.Now();
  g.expires_at = clock.Now() + lifetime;
  return g;
}

// Polls `cond` for up to 10 s (it turns true from another thread).
template <typename F>
bool Eventually(F cond) {
  for (int i = 0; i < 2000; ++i) {
    if (cond()) {
      return true;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  return cond();
}

TEST_F(GrpcServiceTest, HundredGetTokensOnADueTokenWaitForOneRefresh) {
  clock_.Advance(absl::Minutes(55));  // active-co's valid_until: due now
  testing::FakeProviderClient& provider = flow_parts_.provider;
  provider.HoldRefreshes();
  provider.NextRefreshReturns(FreshGrant(clock_, absl::Hours(1)));
  std::atomic<int> ok{0};
  std::vector<std::thread> callers;
  for (int i = 0; i < 100; ++i) {
    callers.emplace_back([&] {
      v1::GetTokenResponse resp;
      if (GetToken(testing::kActiveId, &resp).ok() && resp.token().generation() == 2) {
        ++ok;
      }
    });
  }
  ASSERT_TRUE(Eventually([&] { return flow_parts_.refresher.waiters() == 100; }));
  EXPECT_EQ(provider.refresh_calls(), 1);
  provider.ReleaseRefreshes();
  for (std::thread& t : callers) {
    t.join();
  }
  EXPECT_EQ(ok.load(), 100);
  EXPECT_EQ(provider.refresh_calls(), 1);
}

TEST_F(GrpcServiceTest, GetTokenWithAFiftyMillisecondDeadlineDuringASlowRefresh) {
  clock_.Advance(absl::Minutes(55));
  testing::FakeProviderClient& provider = flow_parts_.provider;
  provider.HoldRefreshes();
  const core::Grant next = FreshGrant(clock_, absl::Hours(1));
  provider.NextRefreshReturns(next);
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::milliseconds(50));
  v1::GetTokenRequest req;
  req.set_connection_id(testing::kActiveId);
  v1::GetTokenResponse resp;
  EXPECT_EQ(tokens_->GetToken(&ctx, req, &resp).error_code(), grpc::StatusCode::DEADLINE_EXCEEDED);
  provider.AwaitRefreshCalls(1);
  provider.ReleaseRefreshes();  // the refresh outlives its caller and is stored
  ASSERT_TRUE(Eventually([&] { return store_.Load(testing::kActiveId)->generation() == 2; }));
  EXPECT_EQ(store_.Load(testing::kActiveId)->grant->access_token, next.access_token);
  ASSERT_TRUE(GetToken(testing::kActiveId, &resp).ok());
  EXPECT_EQ(resp.token().generation(), 2u);
}

TEST_F(GrpcServiceTest, GetTokenWithMinGenerationWaitsForSomeoneElsesRefresh) {
  std::thread waiter_thread;
  grpc::Status waited;
  v1::GetTokenResponse waited_resp;
  waiter_thread = std::thread([&] {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(20));
    v1::GetTokenRequest req;
    req.set_connection_id(testing::kActiveId);
    req.set_min_generation(2);
    waited = tokens_->GetToken(&ctx, req, &waited_resp);
  });
  ASSERT_TRUE(Eventually([&] { return flow_parts_.refresher.waiters() == 1; }));
  EXPECT_EQ(flow_parts_.provider.refresh_calls(), 0);  // waiting triggers no refresh

  flow_parts_.provider.NextRefreshReturns(FreshGrant(clock_, absl::Hours(1)));
  grpc::ClientContext ctx;
  v1::RefreshRequest req;
  req.set_connection_id(testing::kActiveId);
  req.set_if_generation(1);
  v1::RefreshResponse resp;
  ASSERT_TRUE(tokens_->Refresh(&ctx, req, &resp).ok());
  waiter_thread.join();
  ASSERT_TRUE(waited.ok()) << waited.error_message();
  EXPECT_EQ(waited_resp.token().generation(), 2u);
  EXPECT_EQ(flow_parts_.provider.refresh_calls(), 1);
}

TEST_F(GrpcServiceTest, ShutdownAnswersGetTokensStillWaiting) {
  grpc::Status waited;
  std::thread waiter_thread([&] {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(20));
    v1::GetTokenRequest req;
    req.set_connection_id(testing::kActiveId);
    req.set_min_generation(5);
    v1::GetTokenResponse resp;
    waited = tokens_->GetToken(&ctx, req, &resp);
  });
  ASSERT_TRUE(Eventually([&] { return flow_parts_.refresher.waiters() == 1; }));
  // A grace far longer than the bound below: the waiting call is answered before the server
  // shuts down, not cancelled when the grace runs out.
  const absl::Time t0 = absl::Now();
  server_->Shutdown(t0 + absl::Seconds(120));
  waiter_thread.join();
  EXPECT_LT(absl::Now() - t0, absl::Seconds(30));
  EXPECT_EQ(waited.error_code(), grpc::StatusCode::UNAVAILABLE) << waited.error_message();
  EXPECT_EQ(waited.error_message(), "the broker is shutting down");
  EXPECT_EQ(flow_parts_.refresher.waiters(), 0u);
}

TEST_F(GrpcServiceTest, RevokeSaysWhetherTheProviderConfirmed) {
  flow_parts_.provider.NextRevokeReturns(absl::UnavailableError("provider down"));
  grpc::ClientContext ctx;
  v1::RevokeRequest req;
  req.set_connection_id(testing::kActiveId);
  v1::RevokeResponse resp;
  ASSERT_TRUE(tokens_->Revoke(&ctx, req, &resp).ok());
  EXPECT_FALSE(resp.provider_confirmed());
  v1::GetTokenResponse token;
  const grpc::Status s = GetToken(testing::kActiveId, &token);
  EXPECT_EQ(ReasonOf(s), "REVOKED");  // stopped serving all the same

  grpc::ClientContext again;
  ASSERT_TRUE(tokens_->Revoke(&again, req, &resp).ok());  // idempotent: retries what is owed
  EXPECT_TRUE(resp.provider_confirmed());
  EXPECT_TRUE(store_.Load(testing::kActiveId)->to_revoke.empty());
}

TEST_F(GrpcServiceTest, WatchTokenStreamsAreLimitedPerCaller) {
  grpc_api::GrpcServerOptions options;
  options.max_watch_streams_per_caller = 2;
  auto limited = StartServer(options);
  ASSERT_TRUE(limited.ok());
  auto stub = TokenStubFor(**limited);
  v1::WatchTokenRequest req;
  req.set_connection_id(testing::kActiveId);
  std::vector<std::unique_ptr<grpc::ClientContext>> contexts;
  std::vector<std::unique_ptr<grpc::ClientReader<v1::WatchTokenResponse>>> open;
  for (int i = 0; i < 2; ++i) {
    contexts.push_back(std::make_unique<grpc::ClientContext>());
    open.push_back(stub->WatchToken(contexts.back().get(), req));
    v1::WatchTokenResponse msg;
    ASSERT_TRUE(open.back()->Read(&msg));
  }
  grpc::ClientContext third_ctx;
  auto third = stub->WatchToken(&third_ctx, req);
  v1::WatchTokenResponse msg;
  EXPECT_FALSE(third->Read(&msg));
  EXPECT_EQ(third->Finish().error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);

  // Closing one frees its place.
  contexts[0]->TryCancel();
  EXPECT_EQ(open[0]->Finish().error_code(), grpc::StatusCode::CANCELLED);
  bool reopened = Eventually([&] {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
    auto r = stub->WatchToken(&ctx, req);
    v1::WatchTokenResponse m;
    const bool got = r->Read(&m);
    ctx.TryCancel();
    r->Finish();
    return got;
  });
  EXPECT_TRUE(reopened);
  contexts[1]->TryCancel();
  open[1]->Finish();
  (*limited)->Shutdown(absl::Now() + absl::Seconds(5));
}

TEST_F(GrpcServiceTest, WatchTokenStreamsAreLimitedInAll) {
  grpc_api::GrpcServerOptions options;
  options.max_watch_streams = 1;
  options.max_watch_streams_per_caller = 5;
  auto limited = StartServer(options);
  ASSERT_TRUE(limited.ok());
  auto stub = TokenStubFor(**limited);
  v1::WatchTokenRequest req;
  req.set_connection_id(testing::kActiveId);
  grpc::ClientContext first_ctx;
  auto first = stub->WatchToken(&first_ctx, req);
  v1::WatchTokenResponse msg;
  ASSERT_TRUE(first->Read(&msg));
  grpc::ClientContext second_ctx;
  auto second = stub->WatchToken(&second_ctx, req);
  EXPECT_FALSE(second->Read(&msg));
  EXPECT_EQ(second->Finish().error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  first_ctx.TryCancel();
  first->Finish();
  (*limited)->Shutdown(absl::Now() + absl::Seconds(5));
}

// The names of this process's threads (/proc/self/task/*/comm).
std::multiset<std::string> ThreadNames() {
  std::multiset<std::string> names;
  for (const auto& task : std::filesystem::directory_iterator("/proc/self/task")) {
    std::ifstream comm(task.path() / "comm");
    std::string name;
    if (std::getline(comm, name)) {
      names.insert(name);
    }
  }
  return names;
}

// gRPC 1.51 starts its callback threads (`nexting_thread`) with the first server that has a
// callback method, and they poll beside the CQ threads for as long as it lives; every service,
// on both ports, must run on the completion queues instead. This test process starts no other
// server.
TEST_F(GrpcServiceTest, EveryServiceRunsOnTheCompletionQueuesWithoutCallbackThreads) {
  v1::GetTokenResponse token;
  ASSERT_TRUE(GetToken(testing::kActiveId, &token).ok());
  {
    grpc::ClientContext ctx;
    v1::RefreshRequest req;
    req.set_connection_id("no-such-connection");
    v1::RefreshResponse resp;
    EXPECT_EQ(tokens_->Refresh(&ctx, req, &resp).error_code(), grpc::StatusCode::NOT_FOUND);
  }
  {
    grpc::ClientContext ctx;
    v1::ListConnectionsRequest req;
    v1::ListConnectionsResponse resp;
    ASSERT_TRUE(admin_->ListConnections(&ctx, req, &resp).ok());
    EXPECT_GT(resp.connections_size(), 0);
  }
  EXPECT_EQ(Health(channel_, ""), HealthCheckResponse::SERVING);
  EXPECT_EQ(Health(probe_channel_, "liveness"), HealthCheckResponse::SERVING);
  grpc::ClientContext watch_ctx;
  v1::WatchTokenRequest watch_req;
  watch_req.set_connection_id(testing::kActiveId);
  auto watch = tokens_->WatchToken(&watch_ctx, watch_req);
  v1::WatchTokenResponse msg;
  ASSERT_TRUE(watch->Read(&msg));
  grpc::ClientContext health_ctx;
  auto health_stub = grpc::health::v1::Health::NewStub(probe_channel_);
  auto health = health_stub->Watch(&health_ctx, HealthCheckRequest());
  HealthCheckResponse status;
  ASSERT_TRUE(health->Read(&status));

  const std::multiset<std::string> names = ThreadNames();
  EXPECT_EQ(names.count("nexting_thread"), 0u) << "gRPC's callback threads are running";

  watch_ctx.TryCancel();
  watch->Finish();
  health_ctx.TryCancel();
  health->Finish();
}

// Streams still open at shutdown end (health first, WatchToken when the grace runs out), and
// Shutdown returns once every call the services took has been answered.
TEST_F(GrpcServiceTest, ShutdownEndsOpenStreamsOnBothPorts) {
  grpc::ClientContext watch_ctx;
  v1::WatchTokenRequest watch_req;
  watch_req.set_connection_id(testing::kActiveId);
  auto watch = tokens_->WatchToken(&watch_ctx, watch_req);
  v1::WatchTokenResponse msg;
  ASSERT_TRUE(watch->Read(&msg));
  std::vector<std::unique_ptr<grpc::ClientContext>> contexts;
  std::vector<std::unique_ptr<grpc::ClientReader<HealthCheckResponse>>> health;
  std::vector<std::unique_ptr<grpc::health::v1::Health::Stub>> stubs;
  for (const auto& ch : {channel_, probe_channel_}) {
    stubs.push_back(grpc::health::v1::Health::NewStub(ch));
    contexts.push_back(std::make_unique<grpc::ClientContext>());
    health.push_back(stubs.back()->Watch(contexts.back().get(), HealthCheckRequest()));
    HealthCheckResponse status;
    ASSERT_TRUE(health.back()->Read(&status));
    EXPECT_EQ(status.status(), HealthCheckResponse::SERVING);
  }

  // A grace far longer than the bound below: the streams are ended, not waited for and then
  // cancelled.
  const absl::Time t0 = absl::Now();
  server_->Shutdown(t0 + absl::Seconds(120));
  EXPECT_LT(absl::Now() - t0, absl::Seconds(30));

  EXPECT_FALSE(watch->Read(&msg));
  const grpc::Status ended = watch->Finish();
  EXPECT_EQ(ended.error_code(), grpc::StatusCode::UNAVAILABLE) << ended.error_message();
  EXPECT_EQ(ended.error_message(), "the broker is shutting down");
  for (auto& h : health) {
    HealthCheckResponse status;
    while (h->Read(&status)) {  // NOT_SERVING may come first
      EXPECT_EQ(status.status(), HealthCheckResponse::NOT_SERVING);
    }
    EXPECT_EQ(h->Finish().error_code(), grpc::StatusCode::UNAVAILABLE);
  }
}

}  // namespace
}  // namespace tb
