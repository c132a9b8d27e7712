#include "server/src/common/secret.h"

#include <spdlog/fmt/ostr.h>
#include <spdlog/spdlog.h>

#include <sstream>

#include "gtest/gtest.h"
#include "server/src/common/secret_format.h"
#include "tests/support/test_secrets.h"

namespace tb {
namespace {

TEST(SecretTest, StreamingPrintsKindAndFingerprintOnly) {
  const std::string raw = testing::NewTestSecret("access");
  const AccessToken token(raw);
  std::ostringstream os;
  os << token;
  EXPECT_EQ(os.str(), "access_token:" + Fingerprint(raw));
  EXPECT_EQ(os.str().find(raw), std::string::npos);
}

TEST(SecretTest, FmtFormattingPrintsRedactedForm) {
  const std::string raw = testing::NewTestSecret("refresh");
  const RefreshToken token(raw);
  const std::string formatted = fmt::format("token={}", token);
  EXPECT_EQ(formatted, "token=refresh_token:" + Fingerprint(raw));
  spdlog::info("secret_test logs a refresh token: {}", token);  // the scan checks this line
}

TEST(SecretTest, FingerprintIsShortStableDistinctAndKeyed) {
  EXPECT_EQ(Fingerprint("abc"), Fingerprint("abc"));
  EXPECT_NE(Fingerprint("abc"), Fingerprint("abd"));
  EXPECT_EQ(Fingerprint("abc").size(), 8u);
  // Not the plain SHA-256 ("ba7816bf..."), which anyone could compute for a guessed token.
  EXPECT_NE(Fingerprint("abc"), "ba7816bf");
  SetFingerprintKey("fingerprint-test-key");
  EXPECT_EQ(Fingerprint("abc"), "3d410263");  // HMAC-SHA-256("fingerprint-test-key", "abc")
  SetFingerprintKey("another-key");
  EXPECT_NE(Fingerprint("abc"), "3d410263");
}

TEST(SecretTest, MemoryIsWipedOnDestructionAndMove) {
  // A short value lives in the string's inline buffer, inside the Secret object itself, so the
  // bytes can be inspected after destruction without touching freed memory.
  const std::string raw = "s3cr3t-v4lu3";  // shorter than the inline capacity (15)
  alignas(AccessToken) unsigned char storage[sizeof(AccessToken)];
  auto* t = new (storage) AccessToken(raw);
  const std::string before(reinterpret_cast<const char*>(storage), sizeof(storage));
  ASSERT_NE(before.find(raw), std::string::npos);
  t->~AccessToken();
  const std::string after(reinterpret_cast<const char*>(storage), sizeof(storage));
  EXPECT_EQ(after.find(raw), std::string::npos);

  alignas(AccessToken) unsigned char from_storage[sizeof(AccessToken)];
  auto* from = new (from_storage) AccessToken(raw);
  AccessToken to(std::move(*from));
  const std::string moved(reinterpret_cast<const char*>(from_storage), sizeof(from_storage));
  EXPECT_EQ(moved.find(raw), std::string::npos);
  EXPECT_EQ(to.Reveal(), raw);
  from->~AccessToken();
}

TEST(SecretTest, RevealGivesTheRawValue) {
  const std::string raw = testing::NewTestSecret("code");
  EXPECT_EQ(AuthCode(raw).Reveal(), raw);
  EXPECT_EQ(AuthCode().Redacted(), "auth_code:<empty>");
}

}  // namespace
}  // namespace tb
