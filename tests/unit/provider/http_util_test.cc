#include "server/src/provider/internal/http_util.h"

#include "absl/strings/escaping.h"
#include "gtest/gtest.h"

namespace tb::provider::internal {
namespace {

TEST(ParseHttpUrlTest, SplitsHttpsUrl) {
  absl::StatusOr<ParsedUrl> u = ParseHttpUrl("https://Acme.Zendesk.com/oauth/tokens?x=1#frag");
  ASSERT_TRUE(u.ok()) << u.status();
  EXPECT_TRUE(u->tls);
  EXPECT_EQ(u->host, "acme.zendesk.com");
  EXPECT_EQ(u->port, 443);
  EXPECT_EQ(u->target, "/oauth/tokens?x=1");
  EXPECT_EQ(u->host_header, "acme.zendesk.com");
  EXPECT_EQ(u->authority, "acme.zendesk.com:443");
  EXPECT_EQ(u->origin, "https://acme.zendesk.com:443");
}

TEST(ParseHttpUrlTest, KeepsExplicitPortAndDefaultsPath) {
  absl::StatusOr<ParsedUrl> u = ParseHttpUrl("http://127.0.0.1:8080");
  ASSERT_TRUE(u.ok());
  EXPECT_FALSE(u->tls);
  EXPECT_EQ(u->host, "127.0.0.1");
  EXPECT_EQ(u->port, 8080);
  EXPECT_EQ(u->target, "/");
  EXPECT_EQ(u->host_header, "127.0.0.1:8080");
  u = ParseHttpUrl("https://example.com?q=1");
  ASSERT_TRUE(u.ok());
  EXPECT_EQ(u->target, "/?q=1");
}

TEST(ParseHttpUrlTest, HandlesIpv6Literals) {
  absl::StatusOr<ParsedUrl> u = ParseHttpUrl("https://[::1]:8443/x");
  ASSERT_TRUE(u.ok());
  EXPECT_EQ(u->host, "::1");
  EXPECT_EQ(u->host_header, "[::1]:8443");
  EXPECT_EQ(u->authority, "[::1]:8443");
}

TEST(ParseHttpUrlTest, RejectsWhatItCannotSend) {
  for (const char* bad : {"", "/relative", "ftp://example.com/", "https://user:pw@example.com/",
                          "https:///path", "https://exa mple.com/", "https://example.com:0/",
                          "https://example.com:99999/", "https://ex%0d%0aample.com/"}) {
    EXPECT_EQ(ParseHttpUrl(bad).status().code(), absl::StatusCode::kInvalidArgument) << bad;
  }
}

TEST(ParseProxyUrlTest, AcceptsHttpProxyWithOrWithoutScheme) {
  absl::StatusOr<ProxyConfig> p = ParseProxyUrl("http://proxy.corp:3128/");
  ASSERT_TRUE(p.ok());
  EXPECT_EQ(p->host, "proxy.corp");
  EXPECT_EQ(p->port, 3128);
  EXPECT_TRUE(p->authorization.empty());
  p = ParseProxyUrl("10.0.0.1:8080");
  ASSERT_TRUE(p.ok());
  EXPECT_EQ(p->host, "10.0.0.1");
  EXPECT_EQ(p->port, 8080);
  p = ParseProxyUrl("http://proxy");
  ASSERT_TRUE(p.ok());
  EXPECT_EQ(p->port, 80);
}

TEST(ParseProxyUrlTest, TurnsUserinfoIntoBasicCredentials) {
  absl::StatusOr<ProxyConfig> p = ParseProxyUrl("http://al%40ice:pa%3Ass@proxy:3128");
  ASSERT_TRUE(p.ok());
  std::string decoded;
  ASSERT_EQ(p->authorization.rfind("Basic ", 0), 0u);
  ASSERT_TRUE(absl::Base64Unescape(p->authorization.substr(6), &decoded));
  EXPECT_EQ(decoded, "al@ice:pa:ss");
}

TEST(ParseProxyUrlTest, RejectsOtherSchemesAndJunk) {
  for (const char* bad : {"https://proxy:443", "socks5://proxy:1080", "http://proxy:3128/path",
                          "http://", "http://proxy:0", "::::"}) {
    EXPECT_EQ(ParseProxyUrl(bad).status().code(), absl::StatusCode::kInvalidArgument) << bad;
  }
}

TEST(BypassProxyTest, MatchesDomainsAndSubdomains) {
  EXPECT_TRUE(BypassProxy("example.com", "example.com", 443));
  EXPECT_TRUE(BypassProxy("example.com", "api.example.com", 443));
  EXPECT_TRUE(BypassProxy(".example.com", "example.com", 443));
  EXPECT_TRUE(BypassProxy(".example.com", "a.b.example.com", 443));
  EXPECT_TRUE(BypassProxy("*.example.com", "a.example.com", 443));
  EXPECT_TRUE(BypassProxy("EXAMPLE.com.", "Api.Example.COM", 443));
  EXPECT_FALSE(BypassProxy("example.com", "badexample.com", 443));
  EXPECT_FALSE(BypassProxy("example.com", "example.com.evil.net", 443));
  EXPECT_FALSE(BypassProxy("", "example.com", 443));
}

TEST(BypassProxyTest, HandlesListsWildcardAndPorts) {
  EXPECT_TRUE(BypassProxy(" foo.net , example.com ", "example.com", 443));
  EXPECT_TRUE(BypassProxy("*", "anything.at.all", 443));
  EXPECT_TRUE(BypassProxy("example.com:443", "example.com", 443));
  EXPECT_FALSE(BypassProxy("example.com:8443", "example.com", 443));
  EXPECT_FALSE(BypassProxy(",,", "example.com", 443));
}

TEST(BypassProxyTest, MatchesAddressesAsAddresses) {
  EXPECT_TRUE(BypassProxy("127.0.0.1", "127.0.0.1", 443));
  EXPECT_TRUE(BypassProxy("::1", "::1", 443));
  EXPECT_TRUE(BypassProxy("[::1]", "0:0::1", 443));
  EXPECT_TRUE(BypassProxy("[::1]:8443", "::1", 8443));
  EXPECT_FALSE(BypassProxy("[::1]:8443", "::1", 443));
  // A domain-like suffix never matches an address.
  EXPECT_FALSE(BypassProxy("0.0.1", "127.0.0.1", 443));
  EXPECT_FALSE(BypassProxy("localhost", "127.0.0.1", 443));
  EXPECT_FALSE(BypassProxy("127.0.0.1", "127.0.0.2", 443));
}

TEST(BypassProxyTest, MatchesCidrBlocks) {
  EXPECT_TRUE(BypassProxy("10.0.0.0/8", "10.1.2.3", 443));
  EXPECT_TRUE(BypassProxy("192.168.1.0/25", "192.168.1.127", 443));
  EXPECT_FALSE(BypassProxy("192.168.1.0/25", "192.168.1.128", 443));
  EXPECT_TRUE(BypassProxy("fd00::/8", "fd12::1", 443));
  EXPECT_TRUE(BypassProxy("[fd00::]/8", "fd12::1", 443));
  EXPECT_FALSE(BypassProxy("fd00::/8", "fe80::1", 443));
  EXPECT_FALSE(BypassProxy("10.0.0.0/8", "ten.example.com", 443));
  EXPECT_FALSE(BypassProxy("10.0.0.0/40", "10.1.2.3", 443));
}

}  // namespace
}  // namespace tb::provider::internal
