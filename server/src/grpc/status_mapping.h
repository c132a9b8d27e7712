#ifndef TB_GRPC_STATUS_MAPPING_H_
#define TB_GRPC_STATUS_MAPPING_H_

#include <grpcpp/support/status.h>

#include "absl/status/status.h"
#include "absl/time/time.h"
#include "server/src/core/connection.h"
#include "server/src/oauth/broker.h"
#include "tokenbroker/v1/token_broker.pb.h"

namespace tb::grpc_api {

inline constexpr absl::string_view kErrorDomain = "tokenbroker.v1";

// absl::Status -> grpc::Status. The codes are the same numbers (absl/status/status.h). A domain
// Reason becomes a google.rpc.ErrorInfo{reason, domain "tokenbroker.v1"} inside a
// google.rpc.Status in the details, which every gRPC client library can decode.
grpc::Status ToGrpcStatus(const absl::Status& status);

// Domain -> wire. `now` is the broker's clock, for valid_for.
void ToProto(const oauth::TokenView& view, tokenbroker::v1::Token* out);
void ToProto(const core::Connection& c, tokenbroker::v1::Connection* out);
tokenbroker::v1::ConnectionStatus ToProto(core::ConnectionStatus s);
// nullopt for CONNECTION_STATUS_UNSPECIFIED (no filter).
std::optional<core::ConnectionStatus> FromProto(tokenbroker::v1::ConnectionStatus s);

}  // namespace tb::grpc_api

#endif  // TB_GRPC_STATUS_MAPPING_H_
