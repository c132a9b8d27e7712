#ifndef TB_GRPC_TOKEN_SERVICE_H_
#define TB_GRPC_TOKEN_SERVICE_H_

#include <grpcpp/grpcpp.h>

#include <memory>

#include "server/src/auth/authorizer.h"
#include "server/src/cache/connection_cache.h"
#include "server/src/common/metrics.h"
#include "server/src/common/work_pool.h"
#include "server/src/grpc/cq_calls.h"
#include "server/src/grpc/rpc_metrics.h"
#include "server/src/oauth/authorization_flow.h"
#include "server/src/oauth/broker.h"
#include "server/src/oauth/refresher.h"
#include "tokenbroker/v1/token_broker.grpc.pb.h"

namespace tb::grpc_api {

// tokenbroker.v1.TokenBroker.
//
// Every method runs on the completion-queue model, on the server's queues (cq_calls.h).
// GetToken, the hot path, answers from the broker's in-memory cache and completes inline, never
// blocking a CQ thread. A GetToken that must wait (min_ttl, min_generation) becomes a callback
// in the refresher and is completed from whichever thread publishes its token; Refresh and
// Revoke are answered from the refresher the same way, and WatchToken streams write from the
// cache's writer threads.
//
// Lifecycle: construct, RegisterWith(builder, queues) before BuildAndStart (the queues start
// the calls), Shutdown() before the server's Shutdown() (which would otherwise wait out its
// deadline for the open streams and the waiting calls, then cancel them).
// `broker` and `cache` must outlive it.
class TokenService {
 public:
  struct Options {
    // Open WatchToken streams at most, in all and per caller (RESOURCE_EXHAUSTED beyond).
    size_t max_watch_streams = 10'000;
    size_t max_watch_streams_per_caller = 1'000;
    // Cache hits and misses (tb_token_cache_total). Null: none.
    metrics::Registry* metrics = nullptr;
    // Request counts and latencies, shared with the other services. Null: none.
    RpcMetrics* rpc_metrics = nullptr;
  };
  // What the service calls; all must outlive it.
  struct Deps {
    oauth::Broker& broker;
    cache::ConnectionCache& cache;
    oauth::AuthorizationFlow& flow;
    oauth::Refresher& refresher;
    RunBlocking run_blocking;
    // Who may call what. Its on_replace hook is taken by the service: open WatchToken streams
    // whose caller lost the permission end with PERMISSION_DENIED.
    auth::Authorizer& authorizer;
  };
  TokenService(Deps deps, Options options);
  ~TokenService();

  // Registers the service and the calls it serves on `queues` (which must outlive the server).
  void RegisterWith(grpc::ServerBuilder& builder, cq::Queues& queues);
  // Ends every open WatchToken stream and answers every GetToken still waiting, both with
  // UNAVAILABLE ("the broker is shutting down", so clients retry elsewhere); from then on new
  // streams and waits are refused the same way, while cached GetTokens, Refresh and Revoke are
  // still served until the server shuts down. Idempotent.
  void Shutdown();

 private:
  class Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace tb::grpc_api

#endif  // TB_GRPC_TOKEN_SERVICE_H_
