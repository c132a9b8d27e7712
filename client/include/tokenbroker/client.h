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
// runs out and Get stays local; a broken stream is reopened with backoff. Invalidate is the 401
// path: it drops the refused generation and asks for a newer one with Refresh(if_generation),
// so a hundred instances seeing the same 401 cause one refresh at the broker. Every RPC has a
// deadline.
//
// Thread-safe. A cached Get takes one reader lock of one shard and copies a shared_ptr.

#include <array>
#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
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
  tb::client::ClientOptions broker;               // where and how to reach the broker
  absl::Duration margin = absl::Seconds(30);      // stop using a token this long before its end
  absl::Duration rpc_timeout = absl::Seconds(5);  // deadline of every unary RPC
  bool watch = true;                              // push new generations through WatchToken
  absl::Duration max_reconnect_delay = absl::Seconds(30);
};

class Client {
 public:
  // Errors: INVALID_ARGUMENT (options: unreadable TLS files...).
  static absl::StatusOr<std::unique_ptr<Client>> Create(ClientOptions options);
  ~Client();  // ends every watch stream
  Client(const Client&) = delete;
  Client& operator=(const Client&) = delete;

  // A token usable for at least `margin` more: the cached one when it still is, else from the
  // broker (GetToken with min_ttl = margin). Errors: the broker's (NOT_FOUND,
  // FAILED_PRECONDITION with a reason tb::client::ErrorReason() reads, UNAVAILABLE,
  // DEADLINE_EXCEEDED, UNAUTHENTICATED, PERMISSION_DENIED).
  absl::StatusOr<std::shared_ptr<const Token>> Get(absl::string_view connection_id)
      ABSL_LOCKS_EXCLUDED(watch_mu_);

  // The provider refused the token of `generation` (a 401): forget it and get a newer one
  // (Refresh(if_generation)); if the broker already has a newer one, that one comes back at
  // once. Errors: as Get, plus RESOURCE_EXHAUSTED (refreshed on request moments ago: use Get).
  absl::StatusOr<std::shared_ptr<const Token>> Invalidate(absl::string_view connection_id,
                                                          uint64_t generation);

  // Counters, for tests and for the embedding service's metrics.
  struct Stats {
    uint64_t cache_hits = 0;
    uint64_t rpcs = 0;           // GetToken and Refresh calls made
    uint64_t watch_updates = 0;  // tokens received on watch streams
  };
  Stats stats() const;

 private:
  class Watch;
  struct Shard {
    mutable tb::SharedMutex mu;
    absl::flat_hash_map<std::string, std::shared_ptr<const Token>> tokens ABSL_GUARDED_BY(mu);
  };

  explicit Client(ClientOptions options, std::unique_ptr<tb::client::TokenClient> rpc);

  Shard& ShardFor(absl::string_view id);
  // Caches `t` unless a newer generation is there already.
  void Put(std::shared_ptr<const Token> t);
  std::shared_ptr<const Token> FromProto(const tokenbroker::v1::Token& t) const;
  void EnsureWatch(absl::string_view connection_id) ABSL_LOCKS_EXCLUDED(watch_mu_);

  const ClientOptions options_;
  const std::unique_ptr<tb::client::TokenClient> rpc_;
  std::array<Shard, 16> shards_;
  std::atomic<uint64_t> hits_{0};
  std::atomic<uint64_t> rpcs_{0};
  std::atomic<uint64_t> watch_updates_{0};

  tb::Mutex watch_mu_;
  absl::flat_hash_set<std::string> watched_ ABSL_GUARDED_BY(watch_mu_);
  std::vector<std::unique_ptr<Watch>> watches_ ABSL_GUARDED_BY(watch_mu_);
  bool stopping_ ABSL_GUARDED_BY(watch_mu_) = false;
};

}  // namespace tokenbroker

#endif  // TOKENBROKER_CLIENT_H_
