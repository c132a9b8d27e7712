#include "server/src/http/client_ip.h"

#include <string>
#include <utility>
#include <vector>

#include "gtest/gtest.h"

namespace tb::http {
namespace {

HttpRequest From(std::string peer, std::vector<std::pair<std::string, std::string>> headers = {}) {
  HttpRequest req;
  req.method = "GET";
  req.target = "/oauth/start";
  req.remote_address = std::move(peer);
  req.headers = std::move(headers);
  return req;
}

std::string Resolved(const ClientIpResolver& r, const HttpRequest& req) {
  const std::optional<IpAddress> ip = r.Resolve(req);
  return ip ? ip->ToString() : "<none>";
}

ClientIpResolver ResolverOrDie(ClientIpOptions options) {
  absl::StatusOr<ClientIpResolver> r = ClientIpResolver::Create(options);
  EXPECT_TRUE(r.ok()) << r.status();
  return *std::move(r);
}

TEST(IpAddressTest, ParsesBothFamiliesAndUnmapsIpv4) {
  EXPECT_EQ(ParseIpAddress("192.0.2.1")->ToString(), "192.0.2.1");
  EXPECT_FALSE(ParseIpAddress("192.0.2.1")->v6);
  EXPECT_EQ(ParseIpAddress("2001:DB8::1")->ToString(), "2001:db8::1");
  EXPECT_TRUE(ParseIpAddress("2001:db8::1")->v6);
  // What a dual-stack socket reports for an IPv4 peer is that IPv4 address.
  EXPECT_EQ(*ParseIpAddress("::ffff:192.0.2.1"), *ParseIpAddress("192.0.2.1"));
  EXPECT_EQ(ParseIpAddress("fe80::1%eth0")->ToString(), "fe80::1");
  for (const char* bad : {"", "192.0.2", "192.0.2.256", "01.2.3.4", "example.com", "1.2.3.4 ",
                          "2001:db8::1::2", "[::1]"}) {
    EXPECT_EQ(ParseIpAddress(bad).status().code(), absl::StatusCode::kInvalidArgument) << bad;
  }
}

TEST(IpRangeTest, ContainsFollowsThePrefix) {
  const IpRange ten = *ParseIpRange("10.0.0.0/8");
  EXPECT_TRUE(ten.Contains(*ParseIpAddress("10.255.1.2")));
  EXPECT_FALSE(ten.Contains(*ParseIpAddress("11.0.0.1")));
  EXPECT_FALSE(ten.Contains(*ParseIpAddress("::ffff:11.0.0.1")));
  const IpRange odd = *ParseIpRange("192.0.2.128/25");
  EXPECT_TRUE(odd.Contains(*ParseIpAddress("192.0.2.200")));
  EXPECT_FALSE(odd.Contains(*ParseIpAddress("192.0.2.127")));
  const IpRange v6 = *ParseIpRange("2001:db8:abcd::/48");
  EXPECT_TRUE(v6.Contains(*ParseIpAddress("2001:db8:abcd:12::1")));
  EXPECT_FALSE(v6.Contains(*ParseIpAddress("2001:db8:abce::1")));
  EXPECT_FALSE(v6.Contains(*ParseIpAddress("10.0.0.1")));  // families never mix
  const IpRange single = *ParseIpRange("192.0.2.7");
  EXPECT_EQ(single.prefix_len, 32);
  EXPECT_TRUE(single.Contains(*ParseIpAddress("192.0.2.7")));
  EXPECT_FALSE(single.Contains(*ParseIpAddress("192.0.2.8")));
  EXPECT_EQ(ParseIpRange("::1")->prefix_len, 128);
  EXPECT_TRUE(ParseIpRange("0.0.0.0/0")->Contains(*ParseIpAddress("203.0.113.9")));
}

TEST(IpRangeTest, BadEntriesAreNamedInTheError) {
  for (const char* bad : {"10.0.0.0/33", "10.0.0.0/", "10.0.0.0/-1", "10.0.0.0/8x", "::/129",
                          "10.0.0.1/8", "2001:db8::1/32", "proxy.internal", "10.0.0.0/8/8",
                          "fe80::%eth0/64", "::ffff:10.0.0.0/104", ""}) {
    const absl::StatusOr<IpRange> r = ParseIpRange(bad);
    ASSERT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << bad;
    EXPECT_NE(r.status().message().find(std::string("'") + bad + "'"), absl::string_view::npos)
        << r.status();
  }
}

TEST(ClientIpResolverTest, CreateRejectsABadProxyEntryOrHeaderName) {
  ClientIpOptions options;
  options.trusted_proxy_header = "X-Forwarded-For";
  options.trusted_proxies = {"10.0.0.0/8", "10.0.0.1/8"};
  absl::StatusOr<ClientIpResolver> r = ClientIpResolver::Create(options);
  ASSERT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(r.status().message().find("10.0.0.1/8"), absl::string_view::npos);
  options.trusted_proxies = {"10.0.0.0/8"};
  options.trusted_proxy_header = "X-Forwarded For";
  EXPECT_EQ(ClientIpResolver::Create(options).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(ClientIpResolverTest, WithoutTrustedProxiesThePeerIsTheClient) {
  const ClientIpResolver r = ResolverOrDie({"X-Forwarded-For", {}});
  EXPECT_EQ(Resolved(r, From("198.51.100.4", {{"X-Forwarded-For", "203.0.113.9"}})),
            "198.51.100.4");
  const ClientIpResolver no_header = ResolverOrDie({"", {"198.51.100.0/24"}});
  EXPECT_EQ(Resolved(no_header, From("198.51.100.4", {{"X-Forwarded-For", "203.0.113.9"}})),
            "198.51.100.4");
  EXPECT_EQ(Resolved(r, From("")), "<none>");
  EXPECT_EQ(Resolved(r, From("::ffff:198.51.100.4")), "198.51.100.4");
}

TEST(ClientIpResolverTest, HeaderIsBelievedOnlyFromATrustedPeer) {
  const ClientIpResolver r = ResolverOrDie({"X-Forwarded-For", {"10.0.0.0/8", "2001:db8::/32"}});
  // An untrusted peer's header is ignored, whatever it claims.
  EXPECT_EQ(Resolved(r, From("198.51.100.4", {{"x-forwarded-for", "10.1.1.1"}})), "198.51.100.4");
  // From a trusted proxy: the rightmost entry that is not a trusted proxy itself.
  EXPECT_EQ(Resolved(r, From("10.0.0.2", {{"X-Forwarded-For", "203.0.113.9"}})), "203.0.113.9");
  EXPECT_EQ(Resolved(r, From("10.0.0.2", {{"X-Forwarded-For", "1.1.1.1, 203.0.113.9, 10.0.0.3"}})),
            "203.0.113.9");  // 1.1.1.1 is what the client claimed: ignored
  // Header names compare case-insensitively; repeated fields are one list, in order.
  EXPECT_EQ(Resolved(r, From("10.0.0.2", {{"x-FORWARDED-for", "1.1.1.1"},
                                          {"X-Forwarded-For", "203.0.113.9, 10.9.9.9"}})),
            "203.0.113.9");
  EXPECT_EQ(Resolved(r, From("2001:db8::7", {{"X-Forwarded-For", "[2001:db9::1]:443"}})),
            "2001:db9::1");
  EXPECT_EQ(Resolved(r, From("10.0.0.2", {{"X-Forwarded-For", "203.0.113.9:5555"}})),
            "203.0.113.9");
  EXPECT_EQ(Resolved(r, From("10.0.0.2", {{"X-Forwarded-For", "2001:db9::2"}})), "2001:db9::2");
}

TEST(ClientIpResolverTest, GarbageOrAllTrustedChainsNeverYieldAClientChosenAddress) {
  const ClientIpResolver r = ResolverOrDie({"X-Forwarded-For", {"10.0.0.0/8"}});
  // No header, or an empty one: the proxy itself.
  EXPECT_EQ(Resolved(r, From("10.0.0.2")), "10.0.0.2");
  EXPECT_EQ(Resolved(r, From("10.0.0.2", {{"X-Forwarded-For", ""}})), "10.0.0.2");
  // The entry to take is not an address: the nearest trusted hop to its right.
  EXPECT_EQ(Resolved(r, From("10.0.0.2", {{"X-Forwarded-For", "203.0.113.9, unknown"}})),
            "10.0.0.2");
  EXPECT_EQ(Resolved(r, From("10.0.0.2", {{"X-Forwarded-For", "junk, 10.0.0.5"}})), "10.0.0.5");
  // Every listed hop trusted: the leftmost one.
  EXPECT_EQ(Resolved(r, From("10.0.0.2", {{"X-Forwarded-For", "10.0.0.9, 10.0.0.5"}})), "10.0.0.9");
}

}  // namespace
}  // namespace tb::http
