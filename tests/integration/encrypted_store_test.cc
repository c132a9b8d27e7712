// The broker on its default store (SQLite, encrypted) through the real gRPC server: key rotation
// while GetToken traffic flows, and a row that cannot be decrypted failing for its connection
// alone. Real database files in a temporary directory; real AES-256-GCM keys.

#include <grpcpp/grpcpp.h>

#include <atomic>
#include <cstdlib>
#include <filesystem>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "gtest/gtest.h"
#include "server/src/cache/connection_cache.h"
#include "server/src/crypto/aes_gcm_cipher.h"
#include "server/src/crypto/key_ring.h"
#include "server/src/grpc/grpc_server.h"
#include "server/src/oauth/broker.h"
#include "server/src/store/sqlite_store.h"
#include "tests/fakes/fake_clock.h"
#include "tests/integration/store/sqlite_test_support.h"
#include "tests/support/flow_parts.h"
#include "tests/support/seed.h"
#include "tests/support/test_secrets.h"
#include "tokenbroker/v1/token_broker.grpc.pb.h"

namespace tb {
namespace {

namespace v1 = tokenbroker::v1;

std::string RandomKeyBase64() {
  std::random_device rd;
  std::string key(32, '\0');
  for (char& c : key) {
    c = static_cast<char>(rd());
  }
  std::string b64 = absl::Base64Escape(key);
  testing::RecordTestSecret(b64);
  return b64;
}

crypto::KeyRing Ring(const std::vector<std::pair<std::string, std::string>>& keys) {
  std::string text;
  for (const auto& [id, b64] : keys) {
    absl::StrAppend(&text, id, " ", b64, "\n");
  }
  absl::StatusOr<crypto::KeyRing> ring = crypto::KeyRing::Parse(text, "test");
  EXPECT_TRUE(ring.ok()) << ring.status();
  return *std::move(ring);
}

// One broker process's worth of parts over the database file at `path`.
class BrokerOnSqlite {
 public:
  BrokerOnSqlite(const std::string& path, crypto::KeyRing ring, testing::FakeClock& clock)
      : cipher_(std::move(ring)), clock_(clock) {
    store::SqliteStoreOptions o;
    o.clock = &clock_;
    auto s = store::SqliteStore::Open(absl::StrCat("sqlite://", path), cipher_, o);
    EXPECT_TRUE(s.ok()) << s.status();
    store_ = *std::move(s);
    broker_ = std::make_unique<oauth::Broker>(clock_, *store_, cache_);
    parts_ = std::make_unique<testing::FlowParts>(clock_, *broker_);
  }
  ~BrokerOnSqlite() {
    if (server_ != nullptr) {
      server_->Shutdown(absl::Now() + absl::Seconds(5));
    }
  }

  absl::Status Load() { return broker_->Load(); }
  void Serve() {
    auto server = grpc_api::GrpcServer::Start(
        {}, {*broker_, cache_, parts_->flow, parts_->refresher, parts_->run_blocking()});
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = *std::move(server);
    channel_ = grpc::CreateChannel(absl::StrCat("127.0.0.1:", server_->port()),
                                   grpc::InsecureChannelCredentials());
  }

  oauth::Broker& broker() { return *broker_; }
  store::SqliteStore& store() { return *store_; }
  std::shared_ptr<grpc::Channel> channel() { return channel_; }

 private:
  crypto::AesGcmCipher cipher_;
  testing::FakeClock& clock_;
  std::unique_ptr<store::SqliteStore> store_;
  cache::ConnectionCache cache_;
  std::unique_ptr<oauth::Broker> broker_;
  std::unique_ptr<testing::FlowParts> parts_;
  std::unique_ptr<grpc_api::GrpcServer> server_;
  std::shared_ptr<grpc::Channel> channel_;
};

class EncryptedStoreTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = std::filesystem::path(::testing::TempDir()) /
           absl::StrFormat("encrypted-store-%d-%d", getpid(), std::random_device{}());
    std::filesystem::create_directories(dir_);
    path_ = (dir_ / "tokens.db").string();
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }

  grpc::StatusCode GetToken(const std::shared_ptr<grpc::Channel>& ch, const std::string& id) {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
    v1::GetTokenRequest req;
    req.set_connection_id(id);
    v1::GetTokenResponse resp;
    return v1::TokenBroker::NewStub(ch)->GetToken(&ctx, req, &resp).error_code();
  }

  std::filesystem::path dir_;
  std::string path_;
  testing::FakeClock clock_;
  const std::string k1_ = RandomKeyBase64();
  const std::string k2_ = RandomKeyBase64();
};

TEST_F(EncryptedStoreTest, KeyRotationUnderGetTokenLoadFailsNoCallAndLeavesEveryRowUnderTheNewKey) {
  constexpr int kConnections = 300;
  {
    BrokerOnSqlite first(path_, Ring({{"k1", k1_}}), clock_);
    ASSERT_TRUE(testing::SeedBulk(first.broker(), clock_.Now(), kConnections).ok());
  }
  // The operator appends k2 to the key file and restarts: k2 seals from now on.
  BrokerOnSqlite broker(path_, Ring({{"k1", k1_}, {"k2", k2_}}), clock_);
  ASSERT_TRUE(broker.Load().ok());
  broker.Serve();
  EXPECT_EQ(*broker.store().CountNotUnderCurrentKey(), static_cast<size_t>(kConnections));

  std::atomic<bool> stop{false};
  std::atomic<int> served{0};
  std::atomic<int> failed{0};
  std::vector<std::thread> load;
  for (int t = 0; t < 4; ++t) {
    load.emplace_back([&, t] {
      for (int i = t; !stop.load(); i = (i + 7) % kConnections) {
        if (GetToken(broker.channel(), absl::StrFormat("bulk-%06d", i)) == grpc::StatusCode::OK) {
          ++served;
        } else {
          ++failed;
        }
      }
    });
  }
  auto admin = v1::ConnectionAdmin::NewStub(broker.channel());
  uint64_t reencrypted = 0;
  for (int round = 0; round < 1000; ++round) {
    grpc::ClientContext ctx;
    v1::RotateKeysRequest req;
    req.set_batch_size(25);
    v1::RotateKeysResponse resp;
    ASSERT_TRUE(admin->RotateKeys(&ctx, req, &resp).ok());
    reencrypted += resp.reencrypted();
    if (resp.remaining() == resp.unreadable()) {
      EXPECT_EQ(resp.unreadable(), 0u);
      break;
    }
  }
  // Writes during the rotation too: a refresh's rotated grant must never be lost to it.
  ASSERT_TRUE(broker.broker().Reschedule("bulk-000001", 1, clock_.Now() + absl::Minutes(1)).ok());
  stop = true;
  for (std::thread& t : load) {
    t.join();
  }
  EXPECT_EQ(failed.load(), 0);
  EXPECT_GT(served.load(), 0);
  EXPECT_EQ(reencrypted, static_cast<uint64_t>(kConnections));
  EXPECT_EQ(*broker.store().CountNotUnderCurrentKey(), 0u);
}

TEST_F(EncryptedStoreTest, OnlyTheNewKeyIsNeededOnceRotationIsDone) {
  {
    BrokerOnSqlite first(path_, Ring({{"k1", k1_}}), clock_);
    ASSERT_TRUE(testing::SeedBulk(first.broker(), clock_.Now(), 20).ok());
  }
  {
    BrokerOnSqlite rotating(path_, Ring({{"k1", k1_}, {"k2", k2_}}), clock_);
    ASSERT_TRUE(rotating.Load().ok());
    ASSERT_TRUE(rotating.broker().RotateKeys(100).ok());
  }
  BrokerOnSqlite after(path_, Ring({{"k2", k2_}}), clock_);  // k1 removed from the key file
  ASSERT_TRUE(after.Load().ok());
  after.Serve();
  for (int i = 0; i < 20; ++i) {
    EXPECT_EQ(GetToken(after.channel(), absl::StrFormat("bulk-%06d", i)), grpc::StatusCode::OK);
  }
}

TEST_F(EncryptedStoreTest, AnUnreadableRowIsDataLossForItsConnectionAlone) {
  {
    BrokerOnSqlite first(path_, Ring({{"k1", k1_}}), clock_);
    ASSERT_TRUE(testing::SeedBulk(first.broker(), clock_.Now(), 3).ok());
  }
  {
    store::testing::RawDb raw(path_);
    // bulk-000000: one flipped bit of ciphertext (a disk error, a tampering).
    absl::StatusOr<std::string> ct =
        raw.QueryBytes("SELECT ciphertext FROM connections WHERE id = ?1", "bulk-000000");
    ASSERT_TRUE(ct.ok());
    std::string flipped = *ct;
    flipped[flipped.size() / 2] ^= 0x01;
    ASSERT_TRUE(raw.ExecWithBlob("UPDATE connections SET ciphertext = ?1 WHERE id = ?2", flipped,
                                 "bulk-000000")
                    .ok());
    // bulk-000002 gets bulk-000001's sealed secrets: a valid ciphertext under the right key,
    // bound to another row, must not open here.
    absl::StatusOr<std::string> other_ct =
        raw.QueryBytes("SELECT ciphertext FROM connections WHERE id = ?1", "bulk-000001");
    absl::StatusOr<std::string> other_nonce =
        raw.QueryBytes("SELECT nonce FROM connections WHERE id = ?1", "bulk-000001");
    ASSERT_TRUE(other_ct.ok() && other_nonce.ok());
    ASSERT_TRUE(raw.ExecWithBlob("UPDATE connections SET ciphertext = ?1 WHERE id = ?2", *other_ct,
                                 "bulk-000002")
                    .ok());
    ASSERT_TRUE(raw.ExecWithBlob("UPDATE connections SET nonce = ?1 WHERE id = ?2", *other_nonce,
                                 "bulk-000002")
                    .ok());
  }
  BrokerOnSqlite broker(path_, Ring({{"k1", k1_}}), clock_);
  ASSERT_TRUE(broker.Load().ok());  // the load itself never fails on one bad row
  EXPECT_EQ(broker.broker().data_loss_count(), 2u);
  broker.Serve();
  EXPECT_EQ(GetToken(broker.channel(), "bulk-000000"), grpc::StatusCode::DATA_LOSS);
  EXPECT_EQ(GetToken(broker.channel(), "bulk-000002"), grpc::StatusCode::DATA_LOSS);
  EXPECT_EQ(GetToken(broker.channel(), "bulk-000001"), grpc::StatusCode::OK);
  // Nothing was dropped: the rows are still listed, with their metadata.
  EXPECT_TRUE(broker.broker().GetConnection("bulk-000000").ok());
}

}  // namespace
}  // namespace tb
