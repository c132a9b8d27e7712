#include "server/src/http/rate_limiter.h"

#include <memory>
#include <string>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "tests/fakes/fake_clock.h"

namespace tb::http {
namespace {

HttpRequest From(const std::string& peer, const std::string& forwarded_for = "") {
  HttpRequest req;
  req.method = "GET";
  req.target = "/oauth/start";
  req.remote_address = peer;
  if (!forwarded_for.empty()) {
    req.headers.emplace_back("X-Forwarded-For", forwarded_for);
  }
  return req;
}

RateLimitOptions Options(int per_minute, int burst, size_t max_clients = 65'536) {
  RateLimitOptions o;
  o.per_minute = per_minute;
  o.burst = burst;
  o.max_clients = max_clients;
  return o;
}

class RateLimiterTest : public ::testing::Test {
 protected:
  std::shared_ptr<ClientRateLimiter> Make(RateLimitOptions options) {
    absl::StatusOr<std::shared_ptr<ClientRateLimiter>> l =
        ClientRateLimiter::Create(std::move(options), clock_);
    EXPECT_TRUE(l.ok()) << l.status();
    return *l;
  }

  // How many requests in a row the client gets before the first refusal.
  static int AllowedInARow(ClientRateLimiter& l, const HttpRequest& req, int limit = 1000) {
    int n = 0;
    while (n < limit && l.Admit(req).allowed) {
      ++n;
    }
    return n;
  }

  testing::FakeClock clock_;
};

TEST_F(RateLimiterTest, BurstThenRefusedWithRetryAfterThenRefilled) {
  auto l = Make(Options(6, 3));
  const HttpRequest req = From("192.0.2.1");
  EXPECT_EQ(AllowedInARow(*l, req), 3);
  const ClientRateLimiter::Decision refused = l->Admit(req);
  EXPECT_FALSE(refused.allowed);
  EXPECT_EQ(refused.retry_after_seconds, 10);  // one token per 10 s
  clock_.Advance(absl::Seconds(4));
  EXPECT_FALSE(l->Admit(req).allowed);
  EXPECT_EQ(l->Admit(req).retry_after_seconds, 6);
  clock_.Advance(absl::Seconds(6));
  EXPECT_TRUE(l->Admit(req).allowed);
  EXPECT_FALSE(l->Admit(req).allowed);
  // Idle long enough, the whole burst is back, and never more than it.
  clock_.Advance(absl::Hours(1));
  EXPECT_EQ(AllowedInARow(*l, req), 3);
}

TEST_F(RateLimiterTest, ClientsHaveTheirOwnBuckets) {
  auto l = Make(Options(1, 2));
  EXPECT_EQ(AllowedInARow(*l, From("192.0.2.1")), 2);
  EXPECT_EQ(AllowedInARow(*l, From("192.0.2.2")), 2);
  EXPECT_FALSE(l->Admit(From("192.0.2.1")).allowed);
  // An IPv4 peer seen through a dual-stack socket is the same client.
  EXPECT_FALSE(l->Admit(From("::ffff:192.0.2.1")).allowed);
}

TEST_F(RateLimiterTest, Ipv6ClientsAreKeyedByTheirSlash64) {
  auto l = Make(Options(1, 2));
  EXPECT_EQ(AllowedInARow(*l, From("2001:db8:1:2::1")), 2);
  EXPECT_FALSE(l->Admit(From("2001:db8:1:2:ffff::9")).allowed);  // same /64
  EXPECT_TRUE(l->Admit(From("2001:db8:1:3::1")).allowed);        // the next /64
}

TEST_F(RateLimiterTest, TrustedProxyHeaderKeysByTheForwardedClient) {
  RateLimitOptions options = Options(1, 2);
  options.client_ip = {"X-Forwarded-For", {"10.0.0.0/8"}};
  auto l = Make(options);
  EXPECT_EQ(AllowedInARow(*l, From("10.0.0.1", "203.0.113.1")), 2);
  EXPECT_EQ(AllowedInARow(*l, From("10.0.0.2", "203.0.113.2")), 2);  // another client
  EXPECT_FALSE(l->Admit(From("10.0.0.3", "203.0.113.1")).allowed);   // via another proxy
  // From an untrusted peer the header changes nothing: rotating it buys no fresh bucket.
  int allowed = 0;
  for (int i = 0; i < 10; ++i) {
    allowed += l->Admit(From("198.51.100.7", absl::StrCat("203.0.113.", 100 + i))).allowed;
  }
  EXPECT_EQ(allowed, 2);
}

TEST_F(RateLimiterTest, UnknownPeersShareOneBucket) {
  auto l = Make(Options(1, 1));
  EXPECT_TRUE(l->Admit(From("")).allowed);
  EXPECT_FALSE(l->Admit(From("not-an-ip")).allowed);
}

TEST_F(RateLimiterTest, ZeroRateIsNoLimit) {
  auto l = Make(Options(0, 0));
  EXPECT_EQ(AllowedInARow(*l, From("192.0.2.1"), 500), 500);
  EXPECT_EQ(l->tracked(), 0u);
}

TEST_F(RateLimiterTest, MemoryIsBoundedAndRefilledBucketsAreForgotten) {
  auto l = Make(Options(60, 5, 100));
  for (int i = 0; i < 1000; ++i) {
    ASSERT_TRUE(l->Admit(From(absl::StrCat("10.0.", i / 256, ".", i % 256))).allowed) << i;
    ASSERT_LE(l->tracked(), 100u);
  }
  // A client whose bucket was dropped while it was busy gets no more than a fresh burst.
  const HttpRequest busy = From("192.0.2.1");
  EXPECT_EQ(AllowedInARow(*l, busy), 5);
  EXPECT_FALSE(l->Admit(busy).allowed);
  // Refilled buckets go at the periodic sweep, table full or not.
  clock_.Advance(absl::Minutes(2));
  EXPECT_TRUE(l->Admit(From("192.0.2.2")).allowed);
  EXPECT_EQ(l->tracked(), 1u);
}

TEST_F(RateLimiterTest, CreateRejectsBadOptionsNamingTheEntry) {
  EXPECT_EQ(ClientRateLimiter::Create(Options(-1, 20), clock_).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ClientRateLimiter::Create(Options(10, 0), clock_).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ClientRateLimiter::Create(Options(60, 20, 0), clock_).status().code(),
            absl::StatusCode::kInvalidArgument);
  RateLimitOptions options;
  options.client_ip = {"X-Forwarded-For", {"10.0.0.0/8", "192.168.1.300"}};
  const absl::Status s = ClientRateLimiter::Create(options, clock_).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("192.168.1.300"), absl::string_view::npos) << s;
}

}  // namespace
}  // namespace tb::http
