// Callers of the main gRPC port through real TLS on 127.0.0.1: mTLS identities (URI SAN, CN),
// API keys, per-connection and per-RPC rules, reloads, and the certificate files rotating on
// disk. Certificates are made at run time by the test CA.

#include <grpcpp/grpcpp.h>
#include <grpcpp/security/credentials.h>

#include <chrono>
#include <filesystem>
#include <memory>
#include <random>
#include <string>
#include <thread>

#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "gtest/gtest.h"
#include "server/src/auth/authorizer.h"
#include "server/src/core/provider_presets.h"
#include "server/src/grpc/grpc_server.h"
#include "server/src/store/in_memory_token_store.h"
#include "tests/fake_provider/test_ca.h"
#include "tests/fakes/fake_clock.h"
#include "tests/support/flow_parts.h"
#include "tests/support/seed.h"
#include "tests/support/test_secrets.h"
#include "tokenbroker/v1/token_broker.grpc.pb.h"

namespace tb {
namespace {

namespace v1 = tokenbroker::v1;
using auth::CallerRule;
using auth::Permission;

constexpr char kBillingSpiffe[] = "spiffe://corp.example/ns/billing/sa/api";
constexpr char kOpsCn[] = "ops.corp.example";

std::string Sha256Hex(const std::string& s);  // below

std::string ApiKey() {
  std::random_device rd;
  const std::string key = absl::StrFormat("tbk_%08x%08x%08x", rd(), rd(), rd());
  testing::RecordTestSecret(key);
  return key;
}

class GrpcAuthTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = std::filesystem::path(::testing::TempDir()) /
           absl::StrFormat("grpc-auth-%d-%d", getpid(), std::random_device{}());
    std::filesystem::create_directories(dir_);
    absl::StatusOr<testing::TestCertificates> ca = testing::GenerateTestCertificates();
    ASSERT_TRUE(ca.ok()) << ca.status();
    ca_ = *std::move(ca);
    testing::RecordTestSecret(ca_.server_key_pem);
    testing::RecordTestSecret(ca_.ca_key_pem);
    WriteServerFiles(ca_);
    ASSERT_TRUE(testing::WritePemFile(Path("client-ca.pem"), ca_.ca_cert_pem).ok());

    core::ProviderSpec zendesk = *core::PresetSpec("zendesk");
    zendesk.name = "zendesk";
    parts_.providers.Put("zendesk", zendesk);
    ASSERT_TRUE(testing::SeedEveryStatus(broker_, clock_.Now()).ok());

    absl::StatusOr<std::unique_ptr<auth::Authorizer>> a = auth::Authorizer::Create(Rules());
    ASSERT_TRUE(a.ok()) << a.status();
    authorizer_ = *std::move(a);

    grpc_api::GrpcServerOptions options;
    options.tls = grpc_api::GrpcTlsOptions{Path("server.pem"), Path("server.key"),
                                           Path("client-ca.pem"), absl::Seconds(1)};
    auto server = grpc_api::GrpcServer::Start(
        options,
        {broker_, cache_, parts_.flow, parts_.refresher, parts_.run_blocking(), authorizer_.get()});
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = *std::move(server);
  }

  void TearDown() override {
    server_->Shutdown(absl::Now() + absl::Seconds(5));
    std::filesystem::remove_all(dir_);
  }

  std::vector<CallerRule> Rules() {
    CallerRule billing;
    billing.name = "billing";
    billing.uri_sans = {kBillingSpiffe};
    billing.connections = {testing::kActiveId};
    billing.permissions = {Permission::kGetToken, Permission::kRefresh};
    CallerRule ops;
    ops.name = "ops";
    ops.common_names = {kOpsCn};
    ops.permissions = {Permission::kAdmin};
    CallerRule keyed;
    keyed.name = "keyed";
    keyed.api_key_sha256 = {Sha256Hex(key_)};
    keyed.connections = {"forever-*"};
    keyed.permissions = {Permission::kGetToken};
    return {billing, ops, keyed};
  }

  std::string Path(const std::string& name) const { return (dir_ / name).string(); }

  void WriteServerFiles(const testing::TestCertificates& certs) {
    // Key first, then certificate: a reader between the two sees a mismatched pair and keeps the
    // old one, which is what cert-manager's atomic symlink swap avoids in production.
    ASSERT_TRUE(testing::WritePemFile(Path("server.key"), certs.server_key_pem).ok());
    ASSERT_TRUE(testing::WritePemFile(Path("server.pem"), certs.server_cert_pem).ok());
  }

  // A channel trusting `ca`, presenting `client` (if any).
  std::shared_ptr<grpc::Channel> Channel(const testing::TestCertificates& ca,
                                         const testing::ClientCertificate* client) {
    grpc::SslCredentialsOptions ssl;
    ssl.pem_root_certs = ca.ca_cert_pem;
    if (client != nullptr) {
      ssl.pem_cert_chain = client->cert_pem;
      ssl.pem_private_key = client->key_pem;
    }
    grpc::ChannelArguments args;
    args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);  // a connection of its own
    return grpc::CreateCustomChannel(absl::StrCat("127.0.0.1:", server_->port()),
                                     grpc::SslCredentials(ssl), args);
  }

  testing::ClientCertificate Client(const testing::TestCertificates& ca, const std::string& cn,
                                    std::vector<std::string> sans) {
    absl::StatusOr<testing::ClientCertificate> c = testing::IssueClientCertificate(ca, cn, sans);
    EXPECT_TRUE(c.ok()) << c.status();
    testing::RecordTestSecret(c->key_pem);
    return *c;
  }

  grpc::StatusCode GetToken(const std::shared_ptr<grpc::Channel>& ch, const std::string& id,
                            const std::string& key = "") {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
    if (!key.empty()) {
      ctx.AddMetadata("authorization", "Bearer " + key);
    }
    v1::GetTokenRequest req;
    req.set_connection_id(id);
    v1::GetTokenResponse resp;
    return v1::TokenBroker::NewStub(ch)->GetToken(&ctx, req, &resp).error_code();
  }

  grpc::StatusCode List(const std::shared_ptr<grpc::Channel>& ch) {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
    v1::ListConnectionsRequest req;
    v1::ListConnectionsResponse resp;
    return v1::ConnectionAdmin::NewStub(ch)->ListConnections(&ctx, req, &resp).error_code();
  }

  grpc::StatusCode Revoke(const std::shared_ptr<grpc::Channel>& ch, const std::string& id) {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
    v1::RevokeRequest req;
    req.set_connection_id(id);
    v1::RevokeResponse resp;
    return v1::TokenBroker::NewStub(ch)->Revoke(&ctx, req, &resp).error_code();
  }

  std::filesystem::path dir_;
  testing::TestCertificates ca_;
  const std::string key_ = ApiKey();
  testing::FakeClock clock_;
  store::InMemoryTokenStore store_;
  cache::ConnectionCache cache_;
  oauth::Broker broker_{clock_, store_, cache_};
  testing::FlowParts parts_{clock_, broker_};
  std::unique_ptr<auth::Authorizer> authorizer_;
  std::unique_ptr<grpc_api::GrpcServer> server_;
};

}  // namespace
}  // namespace tb

#include <openssl/sha.h>

namespace tb {
namespace {

std::string Sha256Hex(const std::string& s) {
  unsigned char d[SHA256_DIGEST_LENGTH];
  SHA256(reinterpret_cast<const unsigned char*>(s.data()), s.size(), d);
  return absl::BytesToHexString(absl::string_view(reinterpret_cast<const char*>(d), sizeof(d)));
}

TEST_F(GrpcAuthTest, MtlsCallerIsAllowedItsConnectionsAndRpcsOnly) {
  const testing::ClientCertificate billing = Client(ca_, "billing", {kBillingSpiffe});
  auto ch = Channel(ca_, &billing);
  EXPECT_EQ(GetToken(ch, testing::kActiveId), grpc::StatusCode::OK);
  EXPECT_EQ(GetToken(ch, testing::kForeverId), grpc::StatusCode::PERMISSION_DENIED);  // A, not B
  EXPECT_EQ(Revoke(ch, testing::kActiveId), grpc::StatusCode::PERMISSION_DENIED);     // no Revoke
  EXPECT_EQ(List(ch), grpc::StatusCode::PERMISSION_DENIED);                           // no Admin
  EXPECT_EQ(broker_.GetToken(testing::kActiveId).status().code(), absl::StatusCode::kOk);
}

TEST_F(GrpcAuthTest, CommonNameIdentifiesACallerWithoutAUriSan) {
  const testing::ClientCertificate ops = Client(ca_, kOpsCn, {});
  auto ch = Channel(ca_, &ops);
  EXPECT_EQ(List(ch), grpc::StatusCode::OK);
  EXPECT_EQ(GetToken(ch, testing::kActiveId), grpc::StatusCode::PERMISSION_DENIED);
}

TEST_F(GrpcAuthTest, NoCredentialsOrAnUnknownKeyIsUnauthenticated) {
  auto ch = Channel(ca_, nullptr);  // TLS, but no client certificate
  EXPECT_EQ(GetToken(ch, testing::kActiveId), grpc::StatusCode::UNAUTHENTICATED);
  EXPECT_EQ(List(ch), grpc::StatusCode::UNAUTHENTICATED);
  EXPECT_EQ(GetToken(ch, testing::kForeverId, "tbk_not_a_key"), grpc::StatusCode::UNAUTHENTICATED);
  // A certificate the CA signed, for an identity no rule names.
  const testing::ClientCertificate stranger = Client(ca_, "stranger", {"spiffe://corp/x"});
  EXPECT_EQ(GetToken(Channel(ca_, &stranger), testing::kActiveId),
            grpc::StatusCode::UNAUTHENTICATED);
}

TEST_F(GrpcAuthTest, ApiKeyCallerWorksAndARevokedKeyStopsWorking) {
  auto ch = Channel(ca_, nullptr);
  EXPECT_EQ(GetToken(ch, testing::kForeverId, key_), grpc::StatusCode::OK);
  EXPECT_EQ(GetToken(ch, testing::kActiveId, key_), grpc::StatusCode::PERMISSION_DENIED);
  // The key is withdrawn from the callers file and the rules reload.
  std::vector<CallerRule> rules = Rules();
  rules.pop_back();
  ASSERT_TRUE(authorizer_->Replace(rules).ok());
  EXPECT_EQ(GetToken(ch, testing::kForeverId, key_), grpc::StatusCode::UNAUTHENTICATED);
}

TEST_F(GrpcAuthTest, ACertificateFromAnotherCaCannotConnect) {
  absl::StatusOr<testing::TestCertificates> other = testing::GenerateTestCertificates();
  ASSERT_TRUE(other.ok());
  testing::RecordTestSecret(other->ca_key_pem);
  testing::RecordTestSecret(other->server_key_pem);
  // Same identity as the billing caller, signed by a CA the broker does not trust.
  const testing::ClientCertificate forged = Client(*other, "billing", {kBillingSpiffe});
  EXPECT_EQ(GetToken(Channel(ca_, &forged), testing::kActiveId), grpc::StatusCode::UNAVAILABLE);
}

TEST_F(GrpcAuthTest, WatchStreamEndsWhenItsPermissionIsWithdrawn) {
  const testing::ClientCertificate billing = Client(ca_, "billing", {kBillingSpiffe});
  auto ch = Channel(ca_, &billing);
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
  v1::WatchTokenRequest req;
  req.set_connection_id(testing::kActiveId);
  auto reader = v1::TokenBroker::NewStub(ch)->WatchToken(&ctx, req);
  v1::WatchTokenResponse msg;
  ASSERT_TRUE(reader->Read(&msg));
  std::vector<CallerRule> rules = Rules();
  rules[0].connections = {};  // billing may no longer use active-co
  ASSERT_TRUE(authorizer_->Replace(rules).ok());
  EXPECT_FALSE(reader->Read(&msg));
  EXPECT_EQ(reader->Finish().error_code(), grpc::StatusCode::PERMISSION_DENIED);
}

TEST_F(GrpcAuthTest, RotatedCertificateFilesServeNewConnectionsWithoutDroppingOpenOnes) {
  const testing::ClientCertificate billing = Client(ca_, "billing", {kBillingSpiffe});
  auto old_channel = Channel(ca_, &billing);
  ASSERT_EQ(GetToken(old_channel, testing::kActiveId), grpc::StatusCode::OK);

  // cert-manager renews: a new server certificate from a new CA lands on disk.
  absl::StatusOr<testing::TestCertificates> renewed = testing::GenerateTestCertificates();
  ASSERT_TRUE(renewed.ok());
  testing::RecordTestSecret(renewed->server_key_pem);
  testing::RecordTestSecret(renewed->ca_key_pem);
  WriteServerFiles(*renewed);
  bool rotated = false;
  for (int i = 0; i < 200 && !rotated; ++i) {  // the file watcher looks every second
    rotated = GetToken(Channel(*renewed, &billing), testing::kActiveId) == grpc::StatusCode::OK;
    if (!rotated) {
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
  }
  EXPECT_TRUE(rotated) << "new connections never saw the renewed certificate";
  // The connection made before the renewal still works: nothing was dropped.
  EXPECT_EQ(GetToken(old_channel, testing::kActiveId), grpc::StatusCode::OK);
  // And a new connection that only trusts the old CA is now refused.
  EXPECT_EQ(GetToken(Channel(ca_, &billing), testing::kActiveId), grpc::StatusCode::UNAVAILABLE);
}

TEST_F(GrpcAuthTest, HealthNeedsNoCredentials) {
  auto stub = grpc::health::v1::Health::NewStub(Channel(ca_, nullptr));
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
  grpc::health::v1::HealthCheckRequest req;
  req.set_service("liveness");
  grpc::health::v1::HealthCheckResponse resp;
  ASSERT_TRUE(stub->Check(&ctx, req, &resp).ok());
  EXPECT_EQ(resp.status(), grpc::health::v1::HealthCheckResponse::SERVING);
}

}  // namespace
}  // namespace tb
