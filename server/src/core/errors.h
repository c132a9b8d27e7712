#ifndef TB_CORE_ERRORS_H_
#define TB_CORE_ERRORS_H_

// Domain errors carry a Reason as an absl::Status payload; the gRPC adapter turns it into a
// google.rpc.ErrorInfo. The core never builds protobufs.

#include <optional>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "server/src/core/connection.h"

namespace tb::core {

// Payload type URL under which the reason name is stored.
inline constexpr absl::string_view kReasonPayloadUrl = "tokenbroker.v1/reason";

absl::Status ReasonError(absl::StatusCode code, Reason reason, absl::string_view message);
std::optional<Reason> ReasonOf(const absl::Status& status);

// The error a connection in a non-serving state answers GetToken with.
// kPending -> FAILED_PRECONDITION/NOT_CONNECTED, kNeedsReauth -> FAILED_PRECONDITION/<its reason>,
// kRevoked -> FAILED_PRECONDITION/REVOKED. OkStatus for kActive.
absl::Status StatusErrorFor(const Connection& c);

}  // namespace tb::core

#endif  // TB_CORE_ERRORS_H_
