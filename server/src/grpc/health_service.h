#ifndef TB_GRPC_HEALTH_SERVICE_H_
#define TB_GRPC_HEALTH_SERVICE_H_

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "grpc/health/v1/health.grpc.pb.h"
#include "server/src/common/mutex.h"
#include "server/src/grpc/cq_calls.h"

namespace tb::grpc_api {

// grpc.health.v1.Health (Check and Watch) over one status table, so that the main port and the
// probe port answer from the same state, on the completion-queue model (cq_calls.h). gRPC's
// built-in health service is one per server and runs on the callback API; this one is neither.
//
// Thread-safe. A service never set answers NOT_FOUND to Check and SERVICE_UNKNOWN to Watch, as
// the health protocol specifies.
class HealthService final {
 public:
  HealthService() = default;
  ~HealthService();

  // Serves the table on a server being built, on that server's `queues`: once per server,
  // before BuildAndStart. This object must outlive the server.
  void RegisterWith(grpc::ServerBuilder& builder, cq::Queues& queues);

  void SetServing(const std::string& service, bool serving) ABSL_LOCKS_EXCLUDED(mu_);
  // Ends every Watch stream (call before the server's Shutdown, which waits for streams).
  // Check keeps answering with the last statuses, so liveness probes see no change.
  void Shutdown() ABSL_LOCKS_EXCLUDED(mu_);

 private:
  class WatchReactor;
  using Status = grpc::health::v1::HealthCheckResponse::ServingStatus;
  using Request = grpc::health::v1::HealthCheckRequest;
  using Response = grpc::health::v1::HealthCheckResponse;
  using AsyncService = grpc::health::v1::Health::AsyncService;
  // One server's service object (an async service serves one server) and its methods.
  struct Endpoint {
    AsyncService service;
    cq::UnaryMethod<AsyncService, Request, Response> check;
    cq::StreamMethod<AsyncService, Request, Response> watch;
  };

  void Check(const Request& req, Response* resp, cq::UnaryReply* reply) ABSL_LOCKS_EXCLUDED(mu_);
  cq::WriteReactor<Response>* Watch(const Request& req, cq::ServerStream<Response>* stream);

  Status StatusOf(const std::string& service) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  std::vector<std::shared_ptr<WatchReactor>> Watchers() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  std::vector<std::unique_ptr<Endpoint>> endpoints_;  // added before the servers start

  mutable Mutex mu_;
  std::map<std::string, bool> serving_ ABSL_GUARDED_BY(mu_);
  std::map<uint64_t, std::weak_ptr<WatchReactor>> watchers_ ABSL_GUARDED_BY(mu_);
  uint64_t next_watcher_ ABSL_GUARDED_BY(mu_) = 1;
  bool shut_down_ ABSL_GUARDED_BY(mu_) = false;
};

}  // namespace tb::grpc_api

#endif  // TB_GRPC_HEALTH_SERVICE_H_
