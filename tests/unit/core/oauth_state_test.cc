#include "server/src/core/oauth_state.h"

#include "absl/strings/ascii.h"
#include "gtest/gtest.h"
#include "server/src/crypto/openssl_digest.h"
#include "server/src/crypto/openssl_random.h"
#include "tests/fakes/fake_provider_client.h"

namespace tb::core {
namespace {

// RFC 7636 Appendix B: these 32 octets give this verifier, whose S256 challenge is this.
TEST(OAuthStateTest, PkceMatchesRfc7636AppendixB) {
  testing::FixedRandom random({116, 24,  223, 180, 151, 153, 224, 37,  79,  250, 96,
                               125, 216, 173, 187, 186, 22,  212, 37,  77,  105, 214,
                               191, 240, 91,  88,  5,   88,  83,  132, 141, 121});
  const PkceVerifier verifier = NewPkceVerifier(random);
  EXPECT_EQ(verifier.Reveal(), "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk");
  crypto::OpenSslDigest digest;
  EXPECT_EQ(PkceChallengeS256(digest, verifier), "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM");
}

TEST(OAuthStateTest, StatesAreLongRandomAndUrlSafe) {
  crypto::OpenSslRandom random;
  const OAuthState a = NewState(random);
  const OAuthState b = NewState(random);
  EXPECT_NE(a.Reveal(), b.Reveal());
  EXPECT_GE(a.Reveal().size(), 43u);  // 256 bits in base64url
  for (char c : a.Reveal()) {
    EXPECT_TRUE(absl::ascii_isalnum(c) || c == '-' || c == '_') << c;
  }
}

TEST(OAuthStateTest, ConstantTimeEquals) {
  EXPECT_TRUE(ConstantTimeEquals("abc", "abc"));
  EXPECT_FALSE(ConstantTimeEquals("abc", "abd"));
  EXPECT_FALSE(ConstantTimeEquals("abc", "abcd"));
  EXPECT_TRUE(ConstantTimeEquals("", ""));
}

}  // namespace
}  // namespace tb::core
