#ifndef TB_GRPC_RPC_METRICS_H_
#define TB_GRPC_RPC_METRICS_H_

#include <map>
#include <string>

#include "absl/status/status.h"
#include "absl/time/time.h"
#include "server/src/common/metrics.h"

namespace tb::grpc_api {

// gRPC request counts by method and code, and latency by method, resolved once per method so
// that recording is two lock-free updates (metrics.h). Without a registry it records nothing.
// Thread-safe after construction.
class RpcMetrics {
 public:
  struct Method {
    metrics::StatusCodeCounters codes;
    metrics::Histogram* latency = nullptr;
  };

  explicit RpcMetrics(metrics::Registry* registry);

  // The method's slot; null without a registry. Call at construction, not per request.
  Method* For(const std::string& method);

  static void Record(Method* m, absl::StatusCode code, absl::Duration elapsed) {
    if (m != nullptr) {
      m->codes.Increment(code);
      m->latency->Observe(elapsed);
    }
  }

 private:
  metrics::CounterFamily* requests_ = nullptr;
  metrics::HistogramFamily* latency_ = nullptr;
  std::map<std::string, Method> methods_;
};

}  // namespace tb::grpc_api

#endif  // TB_GRPC_RPC_METRICS_H_
