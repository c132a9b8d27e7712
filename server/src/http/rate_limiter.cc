#include "server/src/http/rate_limiter.h"

#include <algorithm>
#include <cmath>
#include <utility>

#include "absl/strings/str_cat.h"

namespace tb::http {
namespace {

// Forgotten buckets are swept this often even when the table is not full, so memory follows the
// number of recent clients rather than the peak.
constexpr absl::Duration kSweepInterval = absl::Minutes(1);
// When the table is full of buckets that are all in use, this share of them (the fullest) goes
// at once, so that making room is amortised over many new clients rather than paid by each.
constexpr size_t kEvictFraction = 16;

}  // namespace

absl::StatusOr<std::shared_ptr<ClientRateLimiter>> ClientRateLimiter::Create(
    RateLimitOptions options, const Clock& clock) {
  if (options.per_minute < 0 || options.burst < 0) {
    return absl::InvalidArgumentError("rate limit: per_minute and burst must not be negative");
  }
  if (options.per_minute > 0 && options.burst < 1) {
    return absl::InvalidArgumentError("rate limit: burst must be at least 1");
  }
  if (options.max_clients == 0) {
    return absl::InvalidArgumentError("rate limit: max_clients must be positive");
  }
  absl::StatusOr<ClientIpResolver> resolver = ClientIpResolver::Create(options.client_ip);
  if (!resolver.ok()) {
    return resolver.status();
  }
  return std::shared_ptr<ClientRateLimiter>(
      new ClientRateLimiter(std::move(options), *std::move(resolver), clock));
}

ClientRateLimiter::ClientRateLimiter(RateLimitOptions options, ClientIpResolver resolver,
                                     const Clock& clock)
    : options_(std::move(options)),
      per_second_(options_.per_minute / 60.0),
      resolver_(std::move(resolver)),
      clock_(clock),
      last_sweep_(clock.Now()) {}

std::string ClientRateLimiter::KeyOf(const HttpRequest& req) const {
  std::optional<IpAddress> ip = resolver_.Resolve(req);
  if (!ip) {
    return "unknown";
  }
  if (!ip->v6) {
    return ip->ToString();
  }
  std::fill(ip->bytes.begin() + 8, ip->bytes.end(), 0);
  return absl::StrCat(ip->ToString(), "/64");
}

double ClientRateLimiter::Refilled(const Bucket& b, absl::Time now) const {
  // A clock that stepped back refills nothing rather than draining.
  const double elapsed = std::max(0.0, absl::ToDoubleSeconds(now - b.updated));
  return std::min<double>(options_.burst, b.tokens + elapsed * per_second_);
}

void ClientRateLimiter::SweepRefilled(absl::Time now) {
  absl::erase_if(buckets_,
                 [&](const auto& kv) { return Refilled(kv.second, now) >= options_.burst; });
  last_sweep_ = now;
}

void ClientRateLimiter::MakeRoom(absl::Time now) {
  SweepRefilled(now);
  if (buckets_.size() < options_.max_clients) {
    return;
  }
  std::vector<std::pair<double, std::string>> fullest;
  fullest.reserve(buckets_.size());
  for (const auto& [key, bucket] : buckets_) {
    fullest.emplace_back(Refilled(bucket, now), key);
  }
  const size_t evict = std::max<size_t>(1, buckets_.size() / kEvictFraction);
  std::nth_element(fullest.begin(), fullest.begin() + static_cast<std::ptrdiff_t>(evict - 1),
                   fullest.end(), [](const auto& a, const auto& b) { return a.first > b.first; });
  for (size_t i = 0; i < evict; ++i) {
    buckets_.erase(fullest[i].second);
  }
}

ClientRateLimiter::Decision ClientRateLimiter::Admit(const HttpRequest& req) {
  if (options_.per_minute == 0) {
    return {};
  }
  const std::string key = KeyOf(req);
  const absl::Time now = clock_.Now();
  tb::MutexLock lock(&mu_);
  if (now - last_sweep_ >= kSweepInterval) {
    SweepRefilled(now);
  }
  auto it = buckets_.find(key);
  if (it == buckets_.end()) {
    if (buckets_.size() >= options_.max_clients) {
      MakeRoom(now);
    }
    it = buckets_.emplace(key, Bucket{static_cast<double>(options_.burst), now}).first;
  }
  Bucket& b = it->second;
  b.tokens = Refilled(b, now);
  b.updated = now;
  if (b.tokens >= 1) {
    b.tokens -= 1;
    return {};
  }
  Decision refused;
  refused.allowed = false;
  refused.retry_after_seconds =
      std::max(1, static_cast<int>(std::ceil((1 - b.tokens) / per_second_)));
  return refused;
}

size_t ClientRateLimiter::tracked() const {
  tb::MutexLock lock(&mu_);
  return buckets_.size();
}

}  // namespace tb::http
