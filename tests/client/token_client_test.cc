// TokenClient against hand-written fake services on 127.0.0.1:0 (as userver's samples do): the
// request it sends, and how it maps statuses and ErrorInfo reasons.

#include "tb/client/token_client.h"

#include <grpcpp/create_channel.h>
#include <grpcpp/security/credentials.h>
#include <grpcpp/security/server_credentials.h>
#include <grpcpp/server.h>
#include <grpcpp/server_builder.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <memory>
#include <string>
#include <thread>

#include "absl/strings/str_cat.h"
#include "google/rpc/error_details.pb.h"
#include "google/rpc/status.pb.h"
#include "gtest/gtest.h"
#include "server/src/common/mutex.h"
#include "tests/support/test_secrets.h"

namespace tb::client {
namespace {

namespace v1 = tokenbroker::v1;

grpc::Status WithReason(grpc::StatusCode code, const std::string& reason,
                        const std::string& domain = "tokenbroker.v1") {
  google::rpc::ErrorInfo info;
  info.set_reason(reason);
  info.set_domain(domain);
  google::rpc::Status details;
  details.set_code(code);
  details.set_message("fake");
  details.add_details()->PackFrom(info);
  return grpc::Status(code, "fake", details.SerializeAsString());
}

// Answers with `next_status` when it is set, else with the configured token / page. Records
// the last requests. Thread-safe.
class FakeBroker final : public v1::TokenBroker::Service, public v1::ConnectionAdmin::Service {
 public:
  void FailNext(grpc::Status status) {
    MutexLock lock(&mu_);
    next_status_ = std::move(status);
  }
  void SetToken(const std::string& access_token) {
    MutexLock lock(&mu_);
    access_token_ = access_token;
  }
  // GetToken waits until the call is cancelled (e.g. its deadline passes).
  void HangGetToken() {
    MutexLock lock(&mu_);
    hang_ = true;
  }
  v1::GetTokenRequest last_get() const {
    MutexLock lock(&mu_);
    return last_get_;
  }
  v1::ListConnectionsRequest last_list() const {
    MutexLock lock(&mu_);
    return last_list_;
  }

  grpc::Status GetToken(grpc::ServerContext* ctx, const v1::GetTokenRequest* req,
                        v1::GetTokenResponse* resp) override {
    bool hang = false;
    {
      MutexLock lock(&mu_);
      last_get_ = *req;
      hang = hang_;
      if (!next_status_.ok()) {
        return std::exchange(next_status_, grpc::Status::OK);
      }
      resp->mutable_token()->set_connection_id(req->connection_id());
      resp->mutable_token()->set_access_token(access_token_);
      resp->mutable_token()->set_generation(7);
    }
    // A sync handler has no cancellation callback; polling is the simple way to block until the
    // client's deadline cancels the call.
    while (hang && !ctx->IsCancelled()) {
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    return grpc::Status::OK;
  }

  grpc::Status ListConnections(grpc::ServerContext*, const v1::ListConnectionsRequest* req,
                               v1::ListConnectionsResponse* resp) override {
    MutexLock lock(&mu_);
    last_list_ = *req;
    if (!next_status_.ok()) {
      return std::exchange(next_status_, grpc::Status::OK);
    }
    resp->add_connections()->set_id("acme");
    resp->set_next_page_token("next");
    return grpc::Status::OK;
  }

  grpc::Status GetConnection(grpc::ServerContext*, const v1::GetConnectionRequest* req,
                             v1::Connection* resp) override {
    MutexLock lock(&mu_);
    if (!next_status_.ok()) {
      return std::exchange(next_status_, grpc::Status::OK);
    }
    resp->set_id(req->connection_id());
    resp->set_status(v1::CONNECTION_STATUS_ACTIVE);
    return grpc::Status::OK;
  }

  grpc::Status DeleteConnection(grpc::ServerContext*, const v1::DeleteConnectionRequest*,
                                v1::DeleteConnectionResponse*) override {
    MutexLock lock(&mu_);
    return std::exchange(next_status_, grpc::Status::OK);
  }

 private:
  mutable Mutex mu_;
  grpc::Status next_status_ ABSL_GUARDED_BY(mu_);
  std::string access_token_ ABSL_GUARDED_BY(mu_);
  bool hang_ ABSL_GUARDED_BY(mu_) = false;
  v1::GetTokenRequest last_get_ ABSL_GUARDED_BY(mu_);
  v1::ListConnectionsRequest last_list_ ABSL_GUARDED_BY(mu_);
};

class TokenClientTest : public ::testing::Test {
 protected:
  void SetUp() override {
    grpc::ServerBuilder builder;
    builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port_);
    builder.RegisterService(static_cast<v1::TokenBroker::Service*>(&fake_));
    builder.RegisterService(static_cast<v1::ConnectionAdmin::Service*>(&fake_));
    server_ = builder.BuildAndStart();
    ASSERT_NE(server_, nullptr);
    client_ = TokenClient::Insecure(absl::StrCat("127.0.0.1:", port_));
  }

  void TearDown() override {
    if (server_ != nullptr) {
      server_->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(1));
    }
  }

  FakeBroker fake_;
  int port_ = 0;
  std::unique_ptr<grpc::Server> server_;
  std::unique_ptr<TokenClient> client_;
};

TEST_F(TokenClientTest, GetTokenSendsIdAndMinTtlAndReturnsTheToken) {
  const std::string secret = testing::NewTestSecret("access");
  fake_.SetToken(secret);
  absl::StatusOr<v1::Token> token = client_->GetToken("acme", absl::Milliseconds(90'500));
  ASSERT_TRUE(token.ok()) << token.status();
  EXPECT_TRUE(token->access_token() == secret);
  EXPECT_EQ(token->generation(), 7u);
  const v1::GetTokenRequest req = fake_.last_get();
  EXPECT_EQ(req.connection_id(), "acme");
  EXPECT_EQ(req.min_ttl().seconds(), 90);
  EXPECT_EQ(req.min_ttl().nanos(), 500'000'000);
}

TEST_F(TokenClientTest, ZeroMinTtlLeavesTheFieldUnset) {
  ASSERT_TRUE(client_->GetToken("acme").ok());
  EXPECT_FALSE(fake_.last_get().has_min_ttl());
}

TEST_F(TokenClientTest, ErrorInfoReasonIsReadable) {
  fake_.FailNext(WithReason(grpc::StatusCode::FAILED_PRECONDITION, "NEEDS_REAUTH"));
  absl::StatusOr<v1::Token> token = client_->GetToken("acme");
  ASSERT_FALSE(token.ok());
  EXPECT_EQ(token.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(ErrorReason(token.status()), "NEEDS_REAUTH");
  EXPECT_FALSE(IsUnreachable(token.status()));
}

TEST_F(TokenClientTest, ReasonOfAnotherDomainIsIgnored) {
  fake_.FailNext(WithReason(grpc::StatusCode::FAILED_PRECONDITION, "NEEDS_REAUTH", "other.v1"));
  absl::StatusOr<v1::Token> token = client_->GetToken("acme");
  EXPECT_EQ(token.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(ErrorReason(token.status()), "");
}

TEST_F(TokenClientTest, CodeWithoutDetailsMapsToTheSameCode) {
  fake_.FailNext(grpc::Status(grpc::StatusCode::NOT_FOUND, "no"));
  absl::StatusOr<v1::Connection> c = client_->GetConnection("acme");
  EXPECT_EQ(c.status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(ErrorReason(c.status()), "");
}

TEST_F(TokenClientTest, ServerAnsweringUnavailableIsNotUnreachable) {
  fake_.FailNext(grpc::Status(grpc::StatusCode::UNAVAILABLE, "provider down"));
  absl::StatusOr<v1::Token> token = client_->GetToken("acme");
  EXPECT_EQ(token.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_FALSE(IsUnreachable(token.status()));
}

TEST_F(TokenClientTest, ListConnectionsSendsPagingAndFilters) {
  absl::StatusOr<v1::ListConnectionsResponse> page =
      client_->ListConnections(25, "tok", "zendesk", v1::CONNECTION_STATUS_REVOKED);
  ASSERT_TRUE(page.ok()) << page.status();
  EXPECT_EQ(page->connections_size(), 1);
  EXPECT_EQ(page->next_page_token(), "next");
  const v1::ListConnectionsRequest req = fake_.last_list();
  EXPECT_EQ(req.page_size(), 25);
  EXPECT_EQ(req.page_token(), "tok");
  EXPECT_EQ(req.provider(), "zendesk");
  EXPECT_EQ(req.status(), v1::CONNECTION_STATUS_REVOKED);
}

TEST_F(TokenClientTest, DeleteConnectionMapsItsStatus) {
  EXPECT_TRUE(client_->DeleteConnection("acme").ok());
  fake_.FailNext(grpc::Status(grpc::StatusCode::PERMISSION_DENIED, "no"));
  EXPECT_EQ(client_->DeleteConnection("acme").code(), absl::StatusCode::kPermissionDenied);
}

TEST_F(TokenClientTest, TimeoutEndsTheCallWithDeadlineExceeded) {
  fake_.HangGetToken();
  absl::StatusOr<v1::Token> token =
      client_->GetToken("acme", absl::ZeroDuration(), absl::Milliseconds(100));
  EXPECT_EQ(token.status().code(), absl::StatusCode::kDeadlineExceeded);
}

TEST_F(TokenClientTest, HealthIsUnimplementedWithoutAHealthService) {
  absl::StatusOr<grpc::health::v1::HealthCheckResponse::ServingStatus> s = client_->Check("");
  EXPECT_EQ(s.status().code(), absl::StatusCode::kUnimplemented);
}

TEST(TokenClientUnreachableTest, ClosedPortIsUnreachable) {
  // A port nothing listens on: bound, then closed.
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr = {};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof addr;
  ASSERT_EQ(bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr), 0);
  ASSERT_EQ(getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len), 0);
  close(fd);
  std::unique_ptr<TokenClient> client =
      TokenClient::Insecure(absl::StrCat("127.0.0.1:", ntohs(addr.sin_port)));
  absl::StatusOr<v1::Token> token = client->GetToken("acme");
  EXPECT_EQ(token.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_TRUE(IsUnreachable(token.status()));
}

TEST(FromGrpcStatusTest, KeepsCodeAndMessageAndIgnoresMalformedDetails) {
  const absl::Status s =
      FromGrpcStatus(grpc::Status(grpc::StatusCode::ABORTED, "conflict", "\xff not a proto"));
  EXPECT_EQ(s.code(), absl::StatusCode::kAborted);
  EXPECT_EQ(s.message(), "conflict");
  EXPECT_EQ(ErrorReason(s), "");
  EXPECT_TRUE(FromGrpcStatus(grpc::Status::OK).ok());
}

}  // namespace
}  // namespace tb::client
