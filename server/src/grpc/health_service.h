#ifndef TB_GRPC_HEALTH_SERVICE_H_
#define TB_GRPC_HEALTH_SERVICE_H_

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "grpc/health/v1/health.grpc.pb.h"
#include "server/src/common/mutex.h"

namespace tb::grpc_api {

// grpc.health.v1.Health (Check and Watch) over one status table, so that the main port and the
// probe port answer from the same state. gRPC's built-in health service is one per server and
// cannot run alone on a server without other callback services; this one can.
//
// Thread-safe. A service never set answers NOT_FOUND to Check and SERVICE_UNKNOWN to Watch, as
// the health protocol specifies.
class HealthService final : public grpc::health::v1::Health::CallbackService {
 public:
  HealthService() = default;
  ~HealthService() override;

  void SetServing(const std::string& service, bool serving) ABSL_LOCKS_EXCLUDED(mu_);
  // Ends every Watch stream (call before the server's Shutdown, which waits for streams).
  // Check keeps answering with the last statuses, so liveness probes see no change.
  void Shutdown() ABSL_LOCKS_EXCLUDED(mu_);

  grpc::ServerUnaryReactor* Check(grpc::CallbackServerContext* ctx,
                                  const grpc::health::v1::HealthCheckRequest* req,
                                  grpc::health::v1::HealthCheckResponse* resp) override;
  grpc::ServerWriteReactor<grpc::health::v1::HealthCheckResponse>* Watch(
      grpc::CallbackServerContext* ctx, const grpc::health::v1::HealthCheckRequest* req) override;

 private:
  class WatchReactor;
  using Status = grpc::health::v1::HealthCheckResponse::ServingStatus;

  Status StatusOf(const std::string& service) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  std::vector<std::shared_ptr<WatchReactor>> Watchers() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  mutable Mutex mu_;
  std::map<std::string, bool> serving_ ABSL_GUARDED_BY(mu_);
  std::map<uint64_t, std::weak_ptr<WatchReactor>> watchers_ ABSL_GUARDED_BY(mu_);
  uint64_t next_watcher_ ABSL_GUARDED_BY(mu_) = 1;
  bool shut_down_ ABSL_GUARDED_BY(mu_) = false;
};

}  // namespace tb::grpc_api

#endif  // TB_GRPC_HEALTH_SERVICE_H_
