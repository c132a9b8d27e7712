#include "server/src/core/errors.h"

#include "absl/strings/cord.h"
#include "absl/strings/str_cat.h"

namespace tb::core {

absl::Status ReasonError(absl::StatusCode code, Reason reason, absl::string_view message) {
  absl::Status s(code, message);
  if (reason != Reason::kNone) {
    s.SetPayload(kReasonPayloadUrl, absl::Cord(ReasonName(reason)));
  }
  return s;
}

std::optional<Reason> ReasonOf(const absl::Status& status) {
  const absl::optional<absl::Cord> payload = status.GetPayload(kReasonPayloadUrl);
  if (!payload) {
    return std::nullopt;
  }
  for (Reason r : {Reason::kNotConnected, Reason::kNeedsReauth, Reason::kRotationLost,
                   Reason::kRevoked, Reason::kNotRefreshable, Reason::kProviderMisconfigured}) {
    if (*payload == ReasonName(r)) {
      return r;
    }
  }
  return std::nullopt;
}

namespace {
constexpr FlowErrorKind kAllFlowErrors[] = {
    FlowErrorKind::kLinkInvalid,    FlowErrorKind::kLinkExpired,      FlowErrorKind::kLinkRevoked,
    FlowErrorKind::kLinkUsed,       FlowErrorKind::kAlreadyConnected, FlowErrorKind::kStateInvalid,
    FlowErrorKind::kWrongBrowser,   FlowErrorKind::kAccessDenied,     FlowErrorKind::kProviderError,
    FlowErrorKind::kExchangeFailed, FlowErrorKind::kStoreFailed};
}  // namespace

absl::string_view FlowErrorName(FlowErrorKind kind) {
  switch (kind) {
    case FlowErrorKind::kLinkInvalid:
      return "LINK_INVALID";
    case FlowErrorKind::kLinkExpired:
      return "LINK_EXPIRED";
    case FlowErrorKind::kLinkRevoked:
      return "LINK_REVOKED";
    case FlowErrorKind::kLinkUsed:
      return "LINK_USED";
    case FlowErrorKind::kAlreadyConnected:
      return "ALREADY_CONNECTED";
    case FlowErrorKind::kStateInvalid:
      return "STATE_INVALID";
    case FlowErrorKind::kWrongBrowser:
      return "WRONG_BROWSER";
    case FlowErrorKind::kAccessDenied:
      return "ACCESS_DENIED";
    case FlowErrorKind::kProviderError:
      return "PROVIDER_ERROR";
    case FlowErrorKind::kExchangeFailed:
      return "EXCHANGE_FAILED";
    case FlowErrorKind::kStoreFailed:
      return "STORE_FAILED";
  }
  return "";
}

absl::Status FlowError(absl::StatusCode code, FlowErrorKind kind, absl::string_view message) {
  absl::Status s(code, message);
  s.SetPayload(kFlowErrorPayloadUrl, absl::Cord(FlowErrorName(kind)));
  return s;
}

std::optional<FlowErrorKind> FlowErrorOf(const absl::Status& status) {
  const absl::optional<absl::Cord> payload = status.GetPayload(kFlowErrorPayloadUrl);
  if (!payload) {
    return std::nullopt;
  }
  for (FlowErrorKind k : kAllFlowErrors) {
    if (*payload == FlowErrorName(k)) {
      return k;
    }
  }
  return std::nullopt;
}

absl::Status StatusErrorFor(const Connection& c) {
  if (!c.data_loss.empty() && c.status != ConnectionStatus::kRevoked) {
    return absl::DataLossError(
        "the stored token set of this connection cannot be read (see the broker's log); "
        "reconnect the account or restore the encryption key");
  }
  switch (c.status) {
    case ConnectionStatus::kActive:
      return absl::OkStatus();
    case ConnectionStatus::kPending:
      return ReasonError(absl::StatusCode::kFailedPrecondition, Reason::kNotConnected,
                         "connection is not connected yet: open its connect link");
    case ConnectionStatus::kNeedsReauth: {
      const Reason r =
          c.reason == Reason::kRotationLost ? Reason::kRotationLost : Reason::kNeedsReauth;
      return ReasonError(absl::StatusCode::kFailedPrecondition, r,
                         "connection needs re-authorization: mint a reconnect link");
    }
    case ConnectionStatus::kRevoked:
      return ReasonError(absl::StatusCode::kFailedPrecondition, Reason::kRevoked,
                         "connection was revoked");
  }
  return absl::InternalError("unknown connection status");
}

}  // namespace tb::core
