#include "server/src/core/connect_link.h"

#include <string>
#include <vector>

#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
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

TEST_F(ConnectLinkTest, LinksWithoutAReturnUrlKeepTheFirstVersionByteForByte) {
  // What releases before return URLs signed: the same payload, so their links still verify and
  // a rollback still verifies links minted now without a return URL.
  const std::string token = SignLink(Link(), key_, digest_);
  std::string payload;
  ASSERT_TRUE(absl::WebSafeBase64Unescape(token.substr(0, token.find('.')), &payload));
  const auto b64 = [](absl::string_view s) { return absl::WebSafeBase64Escape(s); };
  EXPECT_EQ(payload, absl::StrCat("tblink1.", b64("link-1"), ".", b64("acme"), ".", b64("zendesk"),
                                  ".2000000000.1.", b64("subdomain"), ":", b64("acme")));
  EXPECT_TRUE(VerifyLink(token, key_, digest_, now_)->return_url.empty());
}

TEST_F(ConnectLinkTest, ReturnUrlIsSignedInTheSecondVersion) {
  ConnectLink l = Link();
  l.return_url = "https://app.example.com/done?x=1";
  const std::string token = SignLink(l, key_, digest_);
  std::string payload;
  ASSERT_TRUE(absl::WebSafeBase64Unescape(token.substr(0, token.find('.')), &payload));
  EXPECT_TRUE(absl::StartsWith(payload, "tblink2."));
  absl::StatusOr<ConnectLink> back = VerifyLink(token, key_, digest_, now_);
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(back->return_url, l.return_url);
  EXPECT_EQ(back->params, l.params);

  // Swapping the return URL, or dropping it by relabelling the version, breaks the signature.
  ConnectLink evil = l;
  evil.return_url = "https://evil.example/";
  const std::string other = SignLink(evil, KeyMaterial("attacker"), digest_);
  EXPECT_EQ(FlowErrorOf(VerifyLink(other.substr(0, other.find('.')) + token.substr(token.find('.')),
                                   key_, digest_, now_)
                            .status()),
            FlowErrorKind::kLinkInvalid);
  std::string relabelled = payload;
  relabelled[6] = '1';
  EXPECT_FALSE(VerifyLink(absl::WebSafeBase64Escape(relabelled) + token.substr(token.find('.')),
                          key_, digest_, now_)
                   .ok());
}

TEST(ReturnUrlTest, AllowedOnlyUnderAnEntryOfTheSameOrigin) {
  const std::vector<std::string> allow = {"https://app.example.com/connected",
                                          "http://127.0.0.1:3000/", "https://[2001:db8::1]/cb/"};
  for (const char* ok : {
           "https://app.example.com/connected",
           "https://app.example.com/connected/acme",
           "https://app.example.com/connected?tab=zendesk#top",
           "https://app.example.com:443/connected",
           "HTTPS://APP.Example.COM/connected",
           "http://127.0.0.1:3000/",
           "http://127.0.0.1:3000/anything/at%20all",
           "https://[2001:DB8::1]/cb/x",
       }) {
    EXPECT_TRUE(CheckReturnUrl(ok, allow).ok()) << ok << ": " << CheckReturnUrl(ok, allow);
  }
  for (const char* refused : {
           "https://app.example.com/connectedx",           // not at a segment boundary
           "https://app.example.com/Connected",            // paths are case-sensitive
           "https://app.example.com/",                     // above the entry's path
           "http://app.example.com/connected",             // another scheme
           "https://app.example.com:8443/connected",       // another port
           "https://app.example.com.evil.com/connected",   // another host
           "https://evil.com#@app.example.com/connected",  // a fragment is not a host
           "https://evil.com/connected",
           "http://127.0.0.1/",
           "https://[2001:db8::2]/cb/",
       }) {
    EXPECT_EQ(CheckReturnUrl(refused, allow).code(), absl::StatusCode::kInvalidArgument) << refused;
  }
  EXPECT_EQ(CheckReturnUrl("https://app.example.com/connected", {}).code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(ReturnUrlTest, AmbiguousOrDangerousFormsAreRefusedEvenUnderAnEntry) {
  const std::vector<std::string> allow = {"https://app.example.com/"};
  for (const std::string& bad : {
           std::string("https://user:pw@app.example.com/"),     // userinfo
           std::string("https://app.example.com@evil.com/"),    // userinfo in disguise
           std::string("https://app.example.com\\@evil.com/"),  // backslash
           std::string("https:\\\\app.example.com/"),
           std::string("https://app.example.com/a\rb"),  // control characters
           std::string("https://app.example.com/a\nSet-Cookie:x=y"),
           std::string("https://app.example.com/\t"),
           std::string("https://app.example.com/a b"),  // space
           std::string("https://app.example.com/\x7f"),
           std::string("https://app.example.com/caf\xc3\xa9"),  // non-ASCII
           std::string("https://\xe2\x80\x8b"
                       "app.example.com/"),                          // zero-width space
           std::string("javascript://app.example.com/%0aalert(1)"),  // other schemes
           std::string("data://app.example.com/"),
           std::string("//app.example.com/"),  // scheme-relative
           std::string("/relative"),
           std::string("https:app.example.com/"),
           std::string("https://app.example.com/\"onmouseover=\"x"),  // quotes
           std::string("https://app.example.com/<script>"),
           std::string("https://app.example.com/x/../../admin"),  // dot segments
           std::string("https://app.example.com/x/%2e%2E/admin"),
           std::string("https://app.example.com/x/."),
           std::string("https://app.example.com/x%2fy"),  // encoded slashes
           std::string("https://app.example.com/x%5Cy"),
           std::string("https://app.example.com/%zz"),  // malformed escapes
           std::string("https://app.example.com/%4"),
           std::string("https://app.example.com:0/"),  // ports
           std::string("https://app.example.com:65536/"),
           std::string("https://app.example.com:/"),
           std::string("https://app.example.com:+443/"),
           std::string("https://app..example.com/"),  // hosts
           std::string("https://.app.example.com/"),
           std::string("https://app.example.com./"),
           std::string("https://app_example.com/"),
           std::string("https://app.example.com%2f.evil.com/"),
           std::string("https://[::1/"),
           std::string("https:///"),
           std::string(""),
           std::string("https://app.example.com/") + std::string(3000, 'a'),
       }) {
    EXPECT_EQ(CheckReturnUrl(bad, allow).code(), absl::StatusCode::kInvalidArgument)
        << absl::CHexEscape(bad);
  }
}

TEST(ReturnUrlTest, AllowlistEntriesAreValidatedNamingTheBadOne) {
  EXPECT_TRUE(ValidateReturnUrlAllowlist({}).ok());
  EXPECT_TRUE(
      ValidateReturnUrlAllowlist({"https://app.example.com/", "http://localhost:3000/x"}).ok());
  for (const char* bad :
       {"app.example.com", "https://app.example.com/?q=1", "https://app.example.com/#f",
        "ftp://app.example.com/", "https://u@app.example.com/"}) {
    const absl::Status s = ValidateReturnUrlAllowlist({"https://ok.example.com/", bad});
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << bad;
    EXPECT_NE(s.message().find(bad), absl::string_view::npos) << s;
  }
  // An invalid entry allows nothing.
  EXPECT_FALSE(
      CheckReturnUrl("https://app.example.com/?q=1", {"https://app.example.com/?q=1"}).ok());
}

}  // namespace
}  // namespace tb::core
