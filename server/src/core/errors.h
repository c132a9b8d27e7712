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
// Payload of RESOURCE_EXHAUSTED / UNAVAILABLE provider errors: the raw Retry-After value.
inline constexpr absl::string_view kRetryAfterPayloadUrl = "tokenbroker.v1/retry-after";

absl::Status ReasonError(absl::StatusCode code, Reason reason, absl::string_view message);
std::optional<Reason> ReasonOf(const absl::Status& status);

// What went wrong in the browser flow, for the result page (words an account admin
// understands) and for metrics. Carried as a payload like Reason.
enum class FlowErrorKind {
  kLinkInvalid,       // malformed or tampered link
  kLinkExpired,       // link past its expiry
  kLinkRevoked,       // link revoked by an operator
  kLinkUsed,          // link already used to connect
  kAlreadyConnected,  // active connection, link minted without reconnect
  kStateInvalid,      // state missing, unknown, reused or expired
  kWrongBrowser,      // state without its cookie: the flow started in another browser
  kAccessDenied,      // the account admin declined at the provider
  kProviderError,     // the provider sent another error to the callback
  kExchangeFailed,    // the code exchange failed
  kStoreFailed,       // the token set could not be stored
};
inline constexpr absl::string_view kFlowErrorPayloadUrl = "tokenbroker.v1/flow-error";
absl::string_view FlowErrorName(FlowErrorKind kind);  // "LINK_INVALID", ...
absl::Status FlowError(absl::StatusCode code, FlowErrorKind kind, absl::string_view message);
std::optional<FlowErrorKind> FlowErrorOf(const absl::Status& status);

// The error a connection in a non-serving state answers GetToken with.
// kPending -> FAILED_PRECONDITION/NOT_CONNECTED, kNeedsReauth -> FAILED_PRECONDITION/<its reason>,
// kRevoked -> FAILED_PRECONDITION/REVOKED; a record with data_loss set (and not revoked) ->
// DATA_LOSS. OkStatus for kActive.
absl::Status StatusErrorFor(const Connection& c);

}  // namespace tb::core

#endif  // TB_CORE_ERRORS_H_
