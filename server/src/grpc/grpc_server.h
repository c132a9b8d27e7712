#ifndef TB_GRPC_GRPC_SERVER_H_
#define TB_GRPC_GRPC_SERVER_H_

#include <memory>
#include <optional>
#include <string>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "server/src/auth/authorizer.h"
#include "server/src/cache/connection_cache.h"
#include "server/src/common/metrics.h"
#include "server/src/common/work_pool.h"
#include "server/src/oauth/authorization_flow.h"
#include "server/src/oauth/broker.h"
#include "server/src/oauth/refresher.h"

namespace tb::grpc_api {

// A server certificate and key (and optionally the CA that client certificates must chain to),
// in PEM files that are re-read every `reload_interval` (gRPC's FileWatcherCertificateProvider):
// cert-manager can rotate them without a restart, and open connections are not dropped.
struct GrpcTlsOptions {
  std::string cert_file;
  std::string key_file;
  std::string client_ca_file;  // empty: no client certificates (API keys only)
  absl::Duration reload_interval = absl::Seconds(60);
};

struct GrpcServerOptions {
  std::string listen = "127.0.0.1:0";        // main port: every service
  std::string probe_listen = "127.0.0.1:0";  // plaintext probe port: grpc.health.v1 only
  int cq_threads = 0;                        // 0: one per core
  // TLS on the main port; nullopt: plaintext (main refuses that on a non-loopback listener).
  std::optional<GrpcTlsOptions> tls;
  bool reflection = true;                // server reflection on the main port
  metrics::Registry* metrics = nullptr;  // request counts and latencies; null: none
  // Open WatchToken streams at most, in all and per caller.
  size_t max_watch_streams = 10'000;
  size_t max_watch_streams_per_caller = 1'000;
  // Keepalive on the main port. Clients may ping this often while calls are open (tokenbroker
  // clients ping every 30 s, so a quiet WatchToken stream over a dead connection fails); faster
  // pings are answered with GOAWAY. The server itself pings every `keepalive` while calls are
  // open and drops a client that has not answered within `keepalive_timeout`, so the streams
  // of a vanished client stop counting against max_watch_streams.
  absl::Duration min_client_ping_interval = absl::Seconds(10);
  absl::Duration keepalive = absl::Minutes(1);
  absl::Duration keepalive_timeout = absl::Seconds(20);
};

// Health service names.
inline constexpr char kLivenessService[] = "liveness";
inline constexpr char kTokenBrokerService[] = "tokenbroker.v1.TokenBroker";
// The store's health: NOT_SERVING while it is unreachable. The broker stays ready meanwhile
// (reads come from memory), so this is for operators and alerts, not for load balancers.
inline constexpr char kStoreService[] = "tokenbroker.v1.Store";

// The two gRPC listeners. The main port serves TokenBroker, ConnectionAdmin, grpc.health.v1 and
// server reflection. The probe port serves only grpc.health.v1, without TLS or credentials,
// because Kubernetes' native gRPC probes carry neither: service "liveness" says the process
// works; "" and "tokenbroker.v1.TokenBroker" say it is ready (connections loaded, not draining).
//
// What the services call. All must outlive the server; `run_blocking` must keep running tasks
// until the server's Shutdown() has returned.
struct GrpcDomain {
  oauth::Broker& broker;
  cache::ConnectionCache& cache;
  oauth::AuthorizationFlow& flow;
  oauth::Refresher& refresher;
  RunBlocking run_blocking;
  // Who may call what on the main port (health needs no credentials). Null: insecure mode,
  // everything allowed (tests; main only with grpc.insecure).
  auth::Authorizer* authorizer = nullptr;
};

// Thread-safe.
class GrpcServer {
 public:
  // Binds both ports and starts serving; readiness starts NOT_SERVING.
  // Errors: UNAVAILABLE (a port could not be bound), INVALID_ARGUMENT (a TLS file that cannot be
  // read, or that is not a certificate / key).
  static absl::StatusOr<std::unique_ptr<GrpcServer>> Start(const GrpcServerOptions& options,
                                                           GrpcDomain domain);
  ~GrpcServer();

  int port() const;
  int probe_port() const;

  // Readiness on both ports ("" and tokenbroker.v1.TokenBroker).
  void SetReady(bool ready);
  // Another component's health on both ports (e.g. kStoreService); never readiness.
  void SetHealth(const std::string& service, bool serving);
  bool ready() const;

  // Stops accepting, lets in-flight calls finish until `deadline`, then cancels the rest.
  // Idempotent.
  void Shutdown(absl::Time deadline);

 private:
  class Impl;
  explicit GrpcServer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace tb::grpc_api

#endif  // TB_GRPC_GRPC_SERVER_H_
