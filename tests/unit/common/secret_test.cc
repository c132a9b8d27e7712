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

TEST(SecretTest, FingerprintIsShortStableAndDistinct) {
  EXPECT_EQ(Fingerprint("abc"), Fingerprint("abc"));
  EXPECT_NE(Fingerprint("abc"), Fingerprint("abd"));
  EXPECT_EQ(Fingerprint("abc").size(), 8u);
  // SHA-256("abc") starts with ba7816bf.
  EXPECT_EQ(Fingerprint("abc"), "ba7816bf");
}

TEST(SecretTest, RevealGivesTheRawValue) {
  const std::string raw = testing::NewTestSecret("code");
  EXPECT_EQ(AuthCode(raw).Reveal(), raw);
  EXPECT_EQ(AuthCode().Redacted(), "auth_code:<empty>");
}

}  // namespace
}  // namespace tb
