#include "server/src/core/connect_link.h"

#include "absl/strings/escaping.h"
#include "gtest/gtest.h"
#include "server/src/core/errors.h"
#include "server/src/crypto/openssl_digest.h"
#include "tests/support/test_secrets.h"

namespace tb::core {
namespace {

class ConnectLinkTest : public ::testing::Test {
 protected:
  ConnectLink Link() const {
    ConnectLink l;
    l.id = "link-1";
    l.connection_id = "acme";
    l.provider = "zendesk";
    l.params = {{"subdomain", "acme"}};
    l.expires_at = absl::FromUnixSeconds(2'000'000'000);
    l.reconnect = true;
    return l;
  }

  crypto::OpenSslDigest digest_;
  KeyMaterial key_{testing::NewTestSecret("linkkey")};
  absl::Time now_ = absl::FromUnixSeconds(1'900'000'000);
};

TEST_F(ConnectLinkTest, SignedLinkVerifiesWithEveryField) {
  absl::StatusOr<ConnectLink> back =
      VerifyLink(SignLink(Link(), key_, digest_), key_, digest_, now_);
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(back->id, "link-1");
  EXPECT_EQ(back->connection_id, "acme");
  EXPECT_EQ(back->provider, "zendesk");
  EXPECT_EQ(back->params, Link().params);
  EXPECT_EQ(back->expires_at, Link().expires_at);
  EXPECT_TRUE(back->reconnect);
}

TEST_F(ConnectLinkTest, ExpiredLinkIsRejected) {
  const std::string token = SignLink(Link(), key_, digest_);
  absl::StatusOr<ConnectLink> r = VerifyLink(token, key_, digest_, Link().expires_at);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(FlowErrorOf(r.status()), FlowErrorKind::kLinkExpired);
}

TEST_F(ConnectLinkTest, TamperedOrForeignLinksAreRejected) {
  const std::string token = SignLink(Link(), key_, digest_);
  // Another key.
  EXPECT_EQ(FlowErrorOf(VerifyLink(token, KeyMaterial("other"), digest_, now_).status()),
            FlowErrorKind::kLinkInvalid);
  // A payload changed to another connection, keeping the signature.
  ConnectLink other = Link();
  other.connection_id = "victim";
  const std::string forged = SignLink(other, KeyMaterial("attacker"), digest_);
  const std::string spliced = forged.substr(0, forged.find('.')) + token.substr(token.find('.'));
  EXPECT_EQ(FlowErrorOf(VerifyLink(spliced, key_, digest_, now_).status()),
            FlowErrorKind::kLinkInvalid);
  // Every single-character change.
  for (size_t i = 0; i < token.size(); ++i) {
    std::string t = token;
    t[i] = t[i] == 'A' ? 'B' : 'A';
    EXPECT_FALSE(VerifyLink(t, key_, digest_, now_).ok()) << i;
  }
  for (const char* garbage : {"", ".", "abc", "a.b.c", "%%%.%%%", "AAAA.AAAA"}) {
    EXPECT_EQ(FlowErrorOf(VerifyLink(garbage, key_, digest_, now_).status()),
              FlowErrorKind::kLinkInvalid)
        << garbage;
  }
  EXPECT_FALSE(VerifyLink(std::string(5000, 'A'), key_, digest_, now_).ok());
}

TEST_F(ConnectLinkTest, ReconnectFlagIsSigned) {
  ConnectLink l = Link();
  l.reconnect = false;
  const std::string token = SignLink(l, key_, digest_);
  std::string payload;
  ASSERT_TRUE(absl::WebSafeBase64Unescape(token.substr(0, token.find('.')), &payload));
  const size_t flag = payload.rfind(".0.");
  ASSERT_NE(flag, std::string::npos);
  payload[flag + 1] = '1';
  const std::string forged = absl::WebSafeBase64Escape(payload) + token.substr(token.find('.'));
  EXPECT_EQ(FlowErrorOf(VerifyLink(forged, key_, digest_, now_).status()),
            FlowErrorKind::kLinkInvalid);
}

}  // namespace
}  // namespace tb::core
