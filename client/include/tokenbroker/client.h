#ifndef TOKENBROKER_CLIENT_H_
#define TOKENBROKER_CLIENT_H_

// tokenbroker::Client: what an internal service links to get Zendesk access tokens from
// token-broker without an RPC per outbound call.
//
//   auto client = tokenbroker::Client::Create({.broker = {.target = "token-broker:8443",
//                                                         .ca_file = "/tls/ca.crt",
//                                                         .api_key = key}});
//   absl::StatusOr<std::shared_ptr<const tokenbroker::Token>> t = (*client)->Get("acme");
//   ... call Zendesk with (*t)->access_token ...
//   if (zendesk_said_401) t = (*client)->Invalidate("acme", (*t)->generation);
//
// Each token is cached until its valid_until minus `margin` (measured on this process's clock
// from the broker's valid_for, so clock skew between hosts does not matter). The first Get of a
// connection also opens a WatchToken stream, so new generations arrive before the cached one
// runs out and Get stays local; a broken stream is reopened with jittered backoff. A stream the
// broker ends because the connection stopped serving (revoked, deleted, needs reauth, access
// withdrawn) drops the cached token at once. A token that is not watched (watch off, more than
// max_watches connections, or a stream that is down) is asked for again after
// `unwatched_recheck` at the latest, so a revocation reaches this process within that time.
//
// Invalidate is the 401 path: it drops the refused generation and asks for a newer one with
// Refresh(if_generation), so a hundred instances seeing the same 401 cause one refresh at the
// broker. Concurrent misses of one connection share one RPC. Every RPC has a deadline.
//
// Thread-safe. A cached Get takes one reader lock of one of 16 shards and copies a shared_ptr.

#include <array>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "server/src/common/clock.h"
#include "server/src/common/mutex.h"
#include "tb/client/token_client.h"

namespace tokenbroker {

// An access token as the client hands it out. Immutable; shared.
struct Token {
  std::string connection_id;
  std::string access_token;  // a secret: never log it
  std::string token_type;
  uint64_t generation = 0;
  // When this process should stop using it: the broker's valid_for, counted from when the
  // answer arrived, minus the client's margin. InfiniteFuture(): valid until revoked.
  absl::Time use_until = absl::InfiniteFuture();
};

struct ClientOptions {
  tb::client::ClientOptions broker;  // where and how to reach the broker
  // Get hands out tokens that live at least this long more (the broker is asked for such a
  // token, and waits for its scheduled refresh when the current one is nearly over).
  absl::Duration margin = absl::Seconds(5);
  // Deadline of every unary RPC; a GetToken that may wait for a refresh gets `margin` more.
  absl::Duration rpc_timeout = absl::Seconds(5);
  bool watch = true;         // push new generations and revocations through WatchToken
  size_t max_watches = 256;  // connections watched at most; the others are rechecked
  // How long a token that is not watched is used before the broker is asked again.
  absl::Duration unwatched_recheck = absl::Minutes(1);
  // How long a generation passed to Invalidate, that the broker still serves because it could
  // not refresh yet, is used before the broker is asked again.
  absl::Duration refused_recheck = absl::Seconds(1);
  absl::Duration max_reconnect_delay = absl::Seconds(30);  // backoff cap of a broken stream
  // The clock use_until is measured on; nullptr: the system clock. Must outlive the client.
  const tb::Clock* clock = nullptr;
};

class Client {
 public:
  // Errors: INVALID_ARGUMENT (options: no target, a margin outside 0..1h, a non-positive or
  // infinite timeout, a non-positive delay or recheck; unreadable TLS files...).
  static absl::StatusOr<std::unique_ptr<Client>> Create(ClientOptions options);
  ~Client();  // ends every watch stream
  Client(const Client&) = delete;
  Client& operator=(const Client&) = delete;

  // A token usable for at least `margin` more: the cached one when it still is, else from the
  // broker (GetToken with min_ttl = margin; concurrent callers share that RPC). A connection
  // whose tokens never live `margin` (not refreshable) gets its current token, cached for half
  // of what is left of it. Errors: the broker's (NOT_FOUND, FAILED_PRECONDITION with a reason
  // tb::client::ErrorReason() reads, UNAVAILABLE, DEADLINE_EXCEEDED, UNAUTHENTICATED,
  // PERMISSION_DENIED).
  absl::StatusOr<std::shared_ptr<const Token>> Get(absl::string_view connection_id)
      ABSL_LOCKS_EXCLUDED(watch_mu_, flights_mu_);

  // The provider refused the token of `generation` (a 401): forget it and get a newer one
  // (Refresh(if_generation); callers reporting the same generation share that RPC). If a newer
  // generation is cached or at the broker, that one comes back. Until the broker has a newer
  // one, Get returns what it has, the refused generation, cached for `refused_recheck` at a
  // time, and an Invalidate of it within refused_recheck of a failed Refresh returns that
  // failure again without an RPC: the broker is asked about once per refused_recheck, not on
  // every Get and every 401. A connection deleted and created again counts from 1: a
  // generation below the refused one, asked for after the refusal, is its new token and
  // cached as usual. Errors: INVALID_ARGUMENT
  // (generation 0); as Get; RESOURCE_EXHAUSTED (refreshed on request moments ago: retry later).
  absl::StatusOr<std::shared_ptr<const Token>> Invalidate(absl::string_view connection_id,
                                                          uint64_t generation)
      ABSL_LOCKS_EXCLUDED(flights_mu_);

  // Counters, for tests and for the embedding service's metrics.
  struct Stats {
    uint64_t cache_hits = 0;
    uint64_t rpcs = 0;           // GetToken and Refresh calls made
    uint64_t shared = 0;         // calls that waited for another caller's RPC instead
    uint64_t watch_updates = 0;  // tokens received on watch streams
    uint64_t watches = 0;        // watch streams open or reconnecting
  };
  Stats stats() const ABSL_LOCKS_EXCLUDED(watch_mu_);

 private:
  class Watch;
  using TokenPtr = std::shared_ptr<const Token>;
  struct Entry {
    TokenPtr token;                // null: none usable
    uint64_t refused_through = 0;  // Invalidate was called for this generation and older ones
    uint64_t refused_seq = 0;      // refusals_ when refused_through was last set
    // How the last Refresh past refused_through failed: Invalidate answers so, without an
    // RPC, until failed_until.
    absl::Status refresh_failed;
    absl::Time failed_until;
    void ForgetRefusals() {
      refused_through = 0;
      refused_seq = 0;
      refresh_failed = absl::OkStatus();
    }
  };
  struct Shard {
    mutable tb::SharedMutex mu;
    absl::flat_hash_map<std::string, Entry> entries ABSL_GUARDED_BY(mu);
  };
  // One RPC in flight that other callers wait for.
  struct Flight {
    bool done = false;
    absl::StatusOr<TokenPtr> result;
  };

  explicit Client(ClientOptions options, std::unique_ptr<tb::client::TokenClient> rpc);

  Shard& ShardFor(absl::string_view id) const;
  // The cached token of `id` if it is usable now, else null.
  TokenPtr Cached(absl::string_view id) const;
  // Caches `t` unless a newer generation (or the same one, usable longer) is cached and still
  // usable. An older one replaces a newer one that is not: the connection was deleted and
  // created again, and counts generations from 1. A refused generation is cached for
  // refused_recheck at most, unless `t` answers a request sent after the refusal
  // (`asked_after`: refusals_ when it was sent; 0 for a watch push) and is older than it: then
  // the connection was created again, and its refusals are forgotten. Returns `t`, or its
  // copy with the shorter use_until of a refused generation.
  TokenPtr Put(const TokenPtr& t, uint64_t asked_after);
  // Drops the cached token of `id` (it stopped serving, for reason `why`). A deletion
  // (NOT_FOUND) forgets the refused generations too.
  void Drop(absl::string_view id, absl::StatusCode why);
  // Records that Refresh past the refused `generation` of `id` failed with `why`.
  void RefreshFailed(absl::string_view id, uint64_t generation, const absl::Status& why);
  // Caches the broker's answer `t` for `connection_id` and returns it as cached (see Put).
  // `asked_after`: refusals_ when the request was sent.
  TokenPtr Store(absl::string_view connection_id, const tokenbroker::v1::Token& t, bool short_lived,
                 uint64_t asked_after) ABSL_LOCKS_EXCLUDED(watch_mu_);
  // Caps the cached token of `id` at now + unwatched_recheck (its watch stream broke).
  void CapUnwatched(absl::string_view id);
  // `watched`: a live stream will push the next generation or the end of this one.
  TokenPtr FromProto(const tokenbroker::v1::Token& t, bool watched, bool short_lived) const;
  // Runs `rpc` unless a call with the same key is in flight, whose result is then shared.
  absl::StatusOr<TokenPtr> Shared(const std::string& key,
                                  const std::function<absl::StatusOr<TokenPtr>()>& rpc)
      ABSL_LOCKS_EXCLUDED(flights_mu_);
  absl::StatusOr<TokenPtr> Fetch(absl::string_view connection_id) ABSL_LOCKS_EXCLUDED(watch_mu_);
  // Opens a watch of `connection_id` unless one is open or max_watches are. Returns whether the
  // connection has a live stream (one that has delivered its current token).
  bool EnsureWatch(absl::string_view connection_id) ABSL_LOCKS_EXCLUDED(watch_mu_);

  const ClientOptions options_;
  const tb::Clock& clock_;
  const std::unique_ptr<tb::client::TokenClient> rpc_;
  mutable std::array<Shard, 16> shards_;  // mutable: ShardFor is const, each shard locks
  std::atomic<uint64_t> hits_{0};
  std::atomic<uint64_t> rpcs_{0};
  std::atomic<uint64_t> shared_{0};
  std::atomic<uint64_t> watch_updates_{0};
  std::atomic<uint64_t> refusals_{0};  // Invalidate calls that set a refused_through

  tb::Mutex flights_mu_;
  tb::CondVar flights_cv_;
  absl::flat_hash_map<std::string, std::shared_ptr<Flight>> flights_ ABSL_GUARDED_BY(flights_mu_);

  mutable tb::Mutex watch_mu_;
  absl::flat_hash_map<std::string, std::unique_ptr<Watch>> watches_ ABSL_GUARDED_BY(watch_mu_);
  bool stopping_ ABSL_GUARDED_BY(watch_mu_) = false;
};

}  // namespace tokenbroker

#endif  // TOKENBROKER_CLIENT_H_
