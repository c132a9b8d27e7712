#include "server/src/grpc/status_mapping.h"

#include <string>

#include "google/rpc/error_details.pb.h"
#include "google/rpc/status.pb.h"
#include "server/src/core/errors.h"

namespace tb::grpc_api {

namespace v1 = tokenbroker::v1;

namespace {

void SetTimestamp(absl::Time t, google::protobuf::Timestamp* out) {
  const int64_t nanos = absl::ToUnixNanos(t);
  out->set_seconds(nanos / 1'000'000'000);
  out->set_nanos(static_cast<int32_t>(nanos % 1'000'000'000));
}

}  // namespace

grpc::Status ToGrpcStatus(const absl::Status& status) {
  if (status.ok()) {
    return grpc::Status::OK;
  }
  const auto code = static_cast<grpc::StatusCode>(status.code());
  std::string message(status.message());
  const std::optional<core::Reason> reason = core::ReasonOf(status);
  if (!reason) {
    return grpc::Status(code, message);
  }
  google::rpc::ErrorInfo info;
  info.set_reason(std::string(core::ReasonName(*reason)));
  info.set_domain(std::string(kErrorDomain));
  google::rpc::Status details;
  details.set_code(static_cast<int32_t>(code));
  details.set_message(message);
  details.add_details()->PackFrom(info);
  return grpc::Status(code, message, details.SerializeAsString());
}

void ToProto(const oauth::TokenView& view, v1::Token* out) {
  const core::Grant& g = view.grant();
  out->set_connection_id(view.connection->id);
  out->set_access_token(std::string(g.access_token.Reveal()));
  out->set_token_type(g.token_type);
  for (const std::string& s : g.scopes) {
    out->add_scopes(s);
  }
  if (g.expires_at) {
    SetTimestamp(*g.expires_at, out->mutable_expires_at());
  }
  if (view.valid_until != absl::InfiniteFuture()) {
    SetTimestamp(view.valid_until, out->mutable_valid_until());
    // Rounded down to the microsecond: never a promise longer than the one made.
    const int64_t micros = absl::ToInt64Microseconds(view.valid_for);
    out->mutable_valid_for()->set_seconds(micros / 1'000'000);
    out->mutable_valid_for()->set_nanos(static_cast<int32_t>(micros % 1'000'000) * 1000);
  }
  out->set_generation(g.generation);
}

v1::ConnectionStatus ToProto(core::ConnectionStatus s) {
  switch (s) {
    case core::ConnectionStatus::kPending:
      return v1::CONNECTION_STATUS_PENDING;
    case core::ConnectionStatus::kActive:
      return v1::CONNECTION_STATUS_ACTIVE;
    case core::ConnectionStatus::kNeedsReauth:
      return v1::CONNECTION_STATUS_NEEDS_REAUTH;
    case core::ConnectionStatus::kRevoked:
      return v1::CONNECTION_STATUS_REVOKED;
  }
  return v1::CONNECTION_STATUS_UNSPECIFIED;
}

std::optional<core::ConnectionStatus> FromProto(v1::ConnectionStatus s) {
  switch (s) {
    case v1::CONNECTION_STATUS_PENDING:
      return core::ConnectionStatus::kPending;
    case v1::CONNECTION_STATUS_ACTIVE:
      return core::ConnectionStatus::kActive;
    case v1::CONNECTION_STATUS_NEEDS_REAUTH:
      return core::ConnectionStatus::kNeedsReauth;
    case v1::CONNECTION_STATUS_REVOKED:
      return core::ConnectionStatus::kRevoked;
    default:
      return std::nullopt;
  }
}

void ToProto(const core::Connection& c, v1::Connection* out) {
  out->set_id(c.id);
  out->set_provider(c.provider);
  for (const auto& [k, v] : c.params) {
    (*out->mutable_params())[k] = v;
  }
  out->set_status(ToProto(c.status));
  out->set_reason(std::string(core::ReasonName(c.reason)));
  out->set_last_error(c.last_error.get());
  if (c.grant) {
    for (const std::string& s : c.grant->scopes) {
      out->add_scopes(s);
    }
    out->set_generation(c.grant->generation);
    if (c.grant->expires_at) {
      SetTimestamp(*c.grant->expires_at, out->mutable_expires_at());
    }
    if (c.grant->refresh_at) {
      SetTimestamp(*c.grant->refresh_at, out->mutable_refresh_at());
    }
    out->set_refreshable(c.grant->refresh_token.has_value() && !c.grant->refresh_token->empty());
  }
  if (c.created_at != absl::InfinitePast()) {
    SetTimestamp(c.created_at, out->mutable_created_at());
  }
  if (c.updated_at != absl::InfinitePast()) {
    SetTimestamp(c.updated_at, out->mutable_updated_at());
  }
}

}  // namespace tb::grpc_api
