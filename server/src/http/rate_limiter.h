#ifndef TB_HTTP_RATE_LIMITER_H_
#define TB_HTTP_RATE_LIMITER_H_

// The per-client-IP request limit of the public OAuth routes: a token bucket per client, in
// bounded memory. Beast-free.

#include <cstddef>
#include <memory>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "server/src/common/clock.h"
#include "server/src/common/mutex.h"
#include "server/src/http/client_ip.h"
#include "server/src/http/http_types.h"

namespace tb::http {

struct RateLimitOptions {
  // Tokens added per minute (the sustained rate). 0: no limit (Admit always allows).
  int per_minute = 60;
  // Bucket size: requests a client may make at once after being idle. >= 1 when limiting.
  int burst = 20;
  // Most clients tracked at once. A client whose bucket has refilled completely is forgotten
  // (it is indistinguishable from a new one). When the table is still full, the buckets closest
  // to full are dropped first (those clients lose at most the difference).
  size_t max_clients = 65'536;
  // Whose address counts as the client's.
  ClientIpOptions client_ip;
};

// Token buckets keyed by client address. IPv6 clients are keyed by their /64 (one subscriber's
// allocation: a single host can use any address in it). A request whose client address cannot be
// told is keyed as one shared "unknown" client, never let through unlimited.
//
// Thread-safe. Admit() takes one short lock and never blocks on I/O.
class ClientRateLimiter {
 public:
  // `clock` must outlive the limiter. Errors: INVALID_ARGUMENT (negative rate, burst < 1 with a
  // rate, max_clients == 0, a bad trusted proxy entry or header name: the message names it).
  static absl::StatusOr<std::shared_ptr<ClientRateLimiter>> Create(RateLimitOptions options,
                                                                   const Clock& clock);

  struct Decision {
    bool allowed = true;
    // When refused: whole seconds until the client's next token (>= 1), for Retry-After.
    int retry_after_seconds = 0;
  };
  Decision Admit(const HttpRequest& req) ABSL_LOCKS_EXCLUDED(mu_);

  // Clients currently tracked.
  size_t tracked() const ABSL_LOCKS_EXCLUDED(mu_);

 private:
  struct Bucket {
    double tokens = 0;
    absl::Time updated;
  };

  ClientRateLimiter(RateLimitOptions options, ClientIpResolver resolver, const Clock& clock);

  std::string KeyOf(const HttpRequest& req) const;
  double Refilled(const Bucket& b, absl::Time now) const;
  // Forgets every bucket that has refilled completely (a new client would get the same).
  void SweepRefilled(absl::Time now) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Below max_clients again: refilled buckets first, then the fullest sixteenth.
  void MakeRoom(absl::Time now) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const RateLimitOptions options_;
  const double per_second_;
  const ClientIpResolver resolver_;
  const Clock& clock_;
  mutable tb::Mutex mu_;
  absl::flat_hash_map<std::string, Bucket> buckets_ ABSL_GUARDED_BY(mu_);
  absl::Time last_sweep_ ABSL_GUARDED_BY(mu_);
};

}  // namespace tb::http

#endif  // TB_HTTP_RATE_LIMITER_H_
