#include "server/src/grpc/rpc_metrics.h"

namespace tb::grpc_api {

RpcMetrics::RpcMetrics(metrics::Registry* registry) {
  if (registry == nullptr) {
    return;
  }
  requests_ = &registry->AddCounterFamily("tb_grpc_requests_total",
                                          "gRPC requests answered, by method and status code.",
                                          {"method", "code"});
  // 25 µs to ~13 s: the cached GetToken sits in the first buckets, a wait for a refresh in the
  // last ones.
  latency_ = &registry->AddHistogramFamily("tb_grpc_request_duration_seconds",
                                           "gRPC request latency in the server, by method.",
                                           {"method"}, metrics::ExponentialBuckets(25e-6, 2, 20));
}

RpcMetrics::Method* RpcMetrics::For(const std::string& method) {
  if (requests_ == nullptr) {
    return nullptr;
  }
  auto [it, inserted] = methods_.try_emplace(method);
  if (inserted) {
    it->second.codes = metrics::StatusCodeCounters(*requests_, {method});
    it->second.latency = &latency_->WithLabels({method});
  }
  return &it->second;
}

}  // namespace tb::grpc_api
