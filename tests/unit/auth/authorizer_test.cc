#include "server/src/auth/authorizer.h"

#include <thread>
#include <vector>

#include "gtest/gtest.h"

namespace tb::auth {
namespace {

const std::string kKeyA(64, 'a');
const std::string kKeyB(64, 'b');

CallerRule Billing() {
  CallerRule r;
  r.name = "billing";
  r.uri_sans = {"spiffe://corp/ns/billing/sa/api"};
  r.api_key_sha256 = {kKeyA};
  r.connections = {"acme", "zd-*"};
  r.permissions = {Permission::kGetToken, Permission::kRefresh};
  return r;
}

CallerRule Ops() {
  CallerRule r;
  r.name = "ops";
  r.common_names = {"ops.corp.example"};
  r.permissions = {Permission::kAdmin};
  return r;
}

std::unique_ptr<Authorizer> Make(std::vector<CallerRule> rules) {
  absl::StatusOr<std::unique_ptr<Authorizer>> a = Authorizer::Create(std::move(rules));
  EXPECT_TRUE(a.ok()) << a.status();
  return *std::move(a);
}

Identity Key(const std::string& hash) {
  Identity id;
  id.api_key_sha256 = hash;
  return id;
}

Identity Cert(std::vector<std::string> sans, std::string cn = "") {
  Identity id;
  id.certificate = true;
  id.uri_sans = std::move(sans);
  id.common_name = std::move(cn);
  return id;
}

TEST(AuthorizerTest, KnownCredentialsNameTheirCaller) {
  auto a = Make({Billing(), Ops()});
  EXPECT_EQ((*a->Authenticate(Key(kKeyA)))->name, "billing");
  EXPECT_EQ((*a->Authenticate(Cert({"spiffe://corp/ns/billing/sa/api"})))->name, "billing");
  EXPECT_EQ((*a->Authenticate(Cert({}, "ops.corp.example")))->name, "ops");
}

TEST(AuthorizerTest, NoOrUnknownCredentialsAreUnauthenticated) {
  auto a = Make({Billing(), Ops()});
  EXPECT_EQ(a->Authenticate(Identity{}).status().code(), absl::StatusCode::kUnauthenticated);
  EXPECT_EQ(a->Authenticate(Key(kKeyB)).status().code(), absl::StatusCode::kUnauthenticated);
  EXPECT_EQ(a->Authenticate(Cert({"spiffe://corp/ns/evil/sa/x"}, "evil")).status().code(),
            absl::StatusCode::kUnauthenticated);
  // A URI SAN or CN from something that is not a verified certificate counts for nothing.
  Identity claimed;
  claimed.uri_sans = {"spiffe://corp/ns/billing/sa/api"};
  EXPECT_EQ(a->Authenticate(claimed).status().code(), absl::StatusCode::kUnauthenticated);
  // No rules at all: deny by default.
  EXPECT_EQ(Make({})->Authenticate(Key(kKeyA)).status().code(), absl::StatusCode::kUnauthenticated);
}

TEST(AuthorizerTest, PermissionsAreByRpcAndConnection) {
  auto a = Make({Billing(), Ops()});
  const Caller& billing = **a->Authenticate(Key(kKeyA));
  EXPECT_TRUE(Authorizer::Authorize(billing, Permission::kGetToken, "acme").ok());
  EXPECT_TRUE(Authorizer::Authorize(billing, Permission::kRefresh, "zd-42").ok());
  EXPECT_EQ(Authorizer::Authorize(billing, Permission::kGetToken, "other").code(),
            absl::StatusCode::kPermissionDenied);
  EXPECT_EQ(Authorizer::Authorize(billing, Permission::kGetToken, "acme2").code(),
            absl::StatusCode::kPermissionDenied);
  EXPECT_EQ(Authorizer::Authorize(billing, Permission::kRevoke, "acme").code(),
            absl::StatusCode::kPermissionDenied);
  EXPECT_EQ(Authorizer::Authorize(billing, Permission::kAdmin, "").code(),
            absl::StatusCode::kPermissionDenied);
  const Caller& ops = **a->Authenticate(Cert({}, "ops.corp.example"));
  EXPECT_TRUE(Authorizer::Authorize(ops, Permission::kAdmin, "").ok());
  EXPECT_EQ(Authorizer::Authorize(ops, Permission::kGetToken, "acme").code(),
            absl::StatusCode::kPermissionDenied);
}

TEST(AuthorizerTest, InsecureModeAllowsEverything) {
  auto a = Authorizer::AllowAll();
  absl::StatusOr<std::shared_ptr<const Caller>> c = a->Authenticate(Identity{});
  ASSERT_TRUE(c.ok());
  EXPECT_TRUE(Authorizer::Authorize(**c, Permission::kRevoke, "anything").ok());
}

TEST(AuthorizerTest, BadRulesAreRefusedNamingTheCaller) {
  CallerRule nameless = Billing();
  nameless.name = "";
  CallerRule twice = Billing();
  CallerRule same_key = Ops();
  same_key.api_key_sha256 = {kKeyA};
  CallerRule bad_hash = Billing();
  bad_hash.api_key_sha256 = {"not-hex"};
  CallerRule nothing;
  nothing.name = "nothing";
  for (const std::vector<CallerRule>& rules : std::vector<std::vector<CallerRule>>{
           {nameless}, {Billing(), twice}, {Billing(), same_key}, {bad_hash}, {nothing}}) {
    EXPECT_EQ(Authorizer::Create(rules).status().code(), absl::StatusCode::kInvalidArgument);
  }
}

TEST(AuthorizerTest, ReplaceSwapsRulesForEveryThreadAndTellsOpenStreams) {
  auto a = Make({Billing()});
  int replaced = 0;
  a->set_on_replace([&] { ++replaced; });
  ASSERT_TRUE(a->Authenticate(Key(kKeyA)).ok());
  // Another thread has the old table cached: it must see the new one too.
  std::thread([&] { ASSERT_TRUE(a->Authenticate(Key(kKeyA)).ok()); }).join();
  CallerRule rotated = Billing();
  rotated.api_key_sha256 = {kKeyB};  // the key was rotated
  ASSERT_TRUE(a->Replace({rotated}).ok());
  EXPECT_EQ(replaced, 1);
  EXPECT_EQ(a->Authenticate(Key(kKeyA)).status().code(), absl::StatusCode::kUnauthenticated);
  EXPECT_TRUE(a->Authenticate(Key(kKeyB)).ok());
  std::thread([&] {
    EXPECT_EQ(a->Authenticate(Key(kKeyA)).status().code(), absl::StatusCode::kUnauthenticated);
  }).join();
  // A bad reload changes nothing.
  CallerRule broken = Billing();
  broken.api_key_sha256 = {"zz"};
  EXPECT_FALSE(a->Replace({broken}).ok());
  EXPECT_TRUE(a->Authenticate(Key(kKeyB)).ok());
  EXPECT_EQ(replaced, 1);
}

TEST(AuthorizerTest, ConcurrentReadersAndAReload) {
  auto a = Make({Billing()});
  std::atomic<bool> stop{false};
  std::vector<std::thread> readers;
  for (int i = 0; i < 4; ++i) {
    readers.emplace_back([&] {
      while (!stop) {
        absl::StatusOr<std::shared_ptr<const Caller>> c = a->Authenticate(Key(kKeyA));
        if (c.ok()) {
          EXPECT_EQ((*c)->name, "billing");
        }
      }
    });
  }
  for (int i = 0; i < 100; ++i) {
    ASSERT_TRUE(a->Replace({Billing()}).ok());
  }
  stop = true;
  for (std::thread& t : readers) {
    t.join();
  }
}

}  // namespace
}  // namespace tb::auth
