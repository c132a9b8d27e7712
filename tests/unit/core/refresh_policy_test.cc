#include "server/src/core/refresh_policy.h"

#include "gtest/gtest.h"

namespace tb::core {
namespace {

Grant Token(absl::Duration lifetime, bool refreshable = true) {
  Grant g;
  g.issued_at = absl::FromUnixSeconds(1'000'000);
  g.expires_at = g.issued_at + lifetime;
  if (refreshable) {
    g.refresh_token = RefreshToken("rt");
  }
  return g;
}

TEST(RefreshPolicyTest, LongTokensRefreshAMarginBeforeExpiry) {
  const Grant g = Token(absl::Hours(1));
  EXPECT_EQ(RefreshAt(g, {}, absl::ZeroDuration()), *g.expires_at - absl::Minutes(5));
}

TEST(RefreshPolicyTest, ShortTokensRefreshNoEarlierThanHalfTheirLifetime) {
  const Grant g = Token(absl::Seconds(2));
  EXPECT_EQ(RefreshAt(g, {}, absl::ZeroDuration()), g.issued_at + absl::Seconds(1));
  const Grant five = Token(absl::Minutes(5));  // Zendesk's minimum lifetime
  EXPECT_EQ(RefreshAt(five, {}, absl::ZeroDuration()), five.issued_at + absl::Seconds(150));
}

TEST(RefreshPolicyTest, JitterIsCappedAndNeverPassesExpiry) {
  const Grant g = Token(absl::Hours(1));
  EXPECT_EQ(RefreshAt(g, {}, absl::Seconds(10)),
            *g.expires_at - absl::Minutes(5) + absl::Seconds(10));
  EXPECT_EQ(RefreshAt(g, {}, absl::Hours(5)), *g.expires_at - absl::Minutes(5) + absl::Seconds(30));
  EXPECT_EQ(RefreshAt(g, {}, absl::Seconds(-5)), *g.expires_at - absl::Minutes(5));
  const Grant tiny = Token(absl::Seconds(2));
  EXPECT_EQ(RefreshAt(tiny, {}, absl::Seconds(30)), tiny.issued_at + absl::Milliseconds(1200));
}

TEST(RefreshPolicyTest, NothingToScheduleWithoutExpiryOrRefreshToken) {
  Grant forever = Token(absl::Hours(1));
  forever.expires_at.reset();
  EXPECT_EQ(RefreshAt(forever, {}, absl::ZeroDuration()), std::nullopt);
  EXPECT_EQ(RefreshAt(Token(absl::Hours(1), false), {}, absl::ZeroDuration()), std::nullopt);
}

TEST(RefreshPolicyTest, RefreshTokenHalfLifeBoundsTheScheduleAndKeepsIdleGrantsAlive) {
  Grant g = Token(absl::Hours(48));                                // Zendesk's longest access token
  EXPECT_EQ(KeepAliveAt(g), std::nullopt);                         // refresh token lifetime unknown
  g.refresh_token_expires_at = g.issued_at + absl::Hours(24 * 7);  // Zendesk's shortest
  EXPECT_EQ(KeepAliveAt(g), g.issued_at + absl::Hours(24 * 7) / 2);
  EXPECT_EQ(RefreshAt(g, {}, absl::ZeroDuration()), *g.expires_at - absl::Minutes(5));
  g.refresh_token_expires_at = g.issued_at + absl::Hours(60);  // half of it is before expiry
  EXPECT_EQ(RefreshAt(g, {}, absl::ZeroDuration()), g.issued_at + absl::Hours(30));
  g.refresh_token.reset();
  EXPECT_EQ(KeepAliveAt(g), std::nullopt);
}

}  // namespace
}  // namespace tb::core
