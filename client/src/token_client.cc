#include "tb/client/token_client.h"

#include <grpcpp/client_context.h>
#include <grpcpp/create_channel.h>
#include <grpcpp/security/credentials.h>
#include <grpcpp/support/channel_arguments.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <fstream>
#include <sstream>
#include <string>
#include <utility>

#include "absl/strings/cord.h"
#include "absl/strings/str_cat.h"
#include "absl/types/optional.h"
#include "google/rpc/error_details.pb.h"
#include "google/rpc/status.pb.h"

namespace tb::client {

namespace v1 = tokenbroker::v1;
namespace health = grpc::health::v1;

namespace {

void SetDuration(absl::Duration d, google::protobuf::Duration* out) {
  const int64_t seconds = absl::IDivDuration(d, absl::Seconds(1), &d);
  out->set_seconds(seconds);
  out->set_nanos(static_cast<int32_t>(absl::ToInt64Nanoseconds(d)));
}

absl::StatusOr<std::string> ReadFile(const std::string& path, absl::string_view what) {
  std::ifstream in(path);
  if (!in) {
    return absl::InvalidArgumentError(absl::StrCat("cannot read the ", what, " file ", path));
  }
  std::stringstream buf;
  buf << in.rdbuf();
  return buf.str();
}

}  // namespace

void TokenClient::SetDeadline(grpc::ClientContext& ctx, absl::Duration timeout) const {
  // An infinite timeout means no deadline; converting it would overflow the chrono time point.
  if (timeout != absl::InfiniteDuration()) {
    ctx.set_deadline(absl::ToChronoTime(absl::Now() + timeout));
  }
  if (!api_key_.empty()) {
    ctx.AddMetadata("authorization", absl::StrCat("Bearer ", api_key_));
  }
}

absl::StatusOr<std::unique_ptr<TokenClient>> TokenClient::Create(const ClientOptions& options) {
  if (options.keepalive < absl::ZeroDuration() ||
      (options.keepalive > absl::ZeroDuration() &&
       options.keepalive_timeout <= absl::ZeroDuration())) {
    return absl::InvalidArgumentError(
        "keepalive must not be negative, and keepalive_timeout must be positive");
  }
  std::shared_ptr<grpc::ChannelCredentials> creds;
  if (options.tls || !options.ca_file.empty() || !options.cert_file.empty()) {
    grpc::SslCredentialsOptions ssl;
    if (!options.ca_file.empty()) {
      absl::StatusOr<std::string> ca = ReadFile(options.ca_file, "CA");
      if (!ca.ok()) {
        return ca.status();
      }
      ssl.pem_root_certs = *std::move(ca);
    }
    if (options.cert_file.empty() != options.key_file.empty()) {
      return absl::InvalidArgumentError("a client certificate needs both cert_file and key_file");
    }
    if (!options.cert_file.empty()) {
      absl::StatusOr<std::string> cert = ReadFile(options.cert_file, "certificate");
      absl::StatusOr<std::string> key = ReadFile(options.key_file, "private key");
      if (!cert.ok() || !key.ok()) {
        return !cert.ok() ? cert.status() : key.status();
      }
      ssl.pem_cert_chain = *std::move(cert);
      ssl.pem_private_key = *std::move(key);
    }
    creds = grpc::SslCredentials(ssl);
  } else {
    creds = grpc::InsecureChannelCredentials();
  }
  grpc::ChannelArguments args;
  if (options.keepalive > absl::ZeroDuration()) {
    // gRPC takes int milliseconds: clamp, so that a huge value means "rarely", not a wrap.
    const auto ms = [](absl::Duration d) {
      return static_cast<int>(std::clamp<int64_t>(absl::ToInt64Milliseconds(d), 1, INT_MAX));
    };
    args.SetInt(GRPC_ARG_KEEPALIVE_TIME_MS, ms(options.keepalive));
    args.SetInt(GRPC_ARG_KEEPALIVE_TIMEOUT_MS, ms(options.keepalive_timeout));
    // Only while calls are open (an idle channel needs no pings), but then without limit: by
    // default gRPC stops after two pings with no data, and a watch stream is quiet for hours.
    args.SetInt(GRPC_ARG_KEEPALIVE_PERMIT_WITHOUT_CALLS, 0);
    args.SetInt(GRPC_ARG_HTTP2_MAX_PINGS_WITHOUT_DATA, 0);
  }
  auto client =
      std::make_unique<TokenClient>(grpc::CreateCustomChannel(options.target, creds, args));
  client->api_key_ = options.api_key;
  return client;
}

absl::Status FromGrpcStatus(const grpc::Status& status) {
  if (status.ok()) {
    return absl::OkStatus();
  }
  // gRPC's codes are Abseil's codes (absl/status/status.h), so the mapping is a cast.
  absl::Status out(static_cast<absl::StatusCode>(status.error_code()), status.error_message());
  if (status.error_details().empty()) {
    return out;
  }
  google::rpc::Status details;
  if (!details.ParseFromString(status.error_details())) {
    return out;
  }
  for (const google::protobuf::Any& any : details.details()) {
    google::rpc::ErrorInfo info;
    if (any.Is<google::rpc::ErrorInfo>() && any.UnpackTo(&info) && info.domain() == kErrorDomain &&
        !info.reason().empty()) {
      out.SetPayload(kReasonPayloadUrl, absl::Cord(info.reason()));
      break;
    }
  }
  return out;
}

std::string ErrorReason(const absl::Status& status) {
  const absl::optional<absl::Cord> reason = status.GetPayload(kReasonPayloadUrl);
  return reason ? std::string(*reason) : std::string();
}

bool IsUnreachable(const absl::Status& status) {
  return status.code() == absl::StatusCode::kUnavailable &&
         status.GetPayload(kUnreachablePayloadUrl).has_value();
}

TokenClient::TokenClient(std::shared_ptr<grpc::Channel> channel)
    : channel_(std::move(channel)),
      broker_(v1::TokenBroker::NewStub(channel_)),
      admin_(v1::ConnectionAdmin::NewStub(channel_)),
      health_(health::Health::NewStub(channel_)) {}

std::unique_ptr<TokenClient> TokenClient::Insecure(const std::string& target) {
  return std::make_unique<TokenClient>(
      grpc::CreateChannel(target, grpc::InsecureChannelCredentials()));
}

absl::Status TokenClient::Finish(const grpc::Status& status) const {
  absl::Status out = FromGrpcStatus(status);
  // A call that never reached a server fails UNAVAILABLE like a server that answers
  // UNAVAILABLE (e.g. the provider is down). Only the first means "check the address", and only
  // then is the channel not connected once the call is over.
  if (out.code() == absl::StatusCode::kUnavailable &&
      channel_->GetState(/*try_to_connect=*/false) != GRPC_CHANNEL_READY) {
    out.SetPayload(kUnreachablePayloadUrl, absl::Cord("1"));
  }
  return out;
}

absl::StatusOr<v1::Token> TokenClient::GetToken(absl::string_view connection_id,
                                                absl::Duration min_ttl, absl::Duration timeout) {
  v1::GetTokenRequest req;
  req.set_connection_id(std::string(connection_id));
  if (min_ttl > absl::ZeroDuration()) {
    SetDuration(min_ttl, req.mutable_min_ttl());
  }
  v1::GetTokenResponse resp;
  grpc::ClientContext ctx;
  SetDeadline(ctx, timeout);
  if (absl::Status s = Finish(broker_->GetToken(&ctx, req, &resp)); !s.ok()) {
    return s;
  }
  return std::move(*resp.mutable_token());
}

absl::StatusOr<v1::Connection> TokenClient::GetConnection(absl::string_view connection_id,
                                                          absl::Duration timeout) {
  v1::GetConnectionRequest req;
  req.set_connection_id(std::string(connection_id));
  v1::Connection resp;
  grpc::ClientContext ctx;
  SetDeadline(ctx, timeout);
  if (absl::Status s = Finish(admin_->GetConnection(&ctx, req, &resp)); !s.ok()) {
    return s;
  }
  return resp;
}

absl::StatusOr<v1::ListConnectionsResponse> TokenClient::ListConnections(
    int page_size, absl::string_view page_token, absl::string_view provider,
    v1::ConnectionStatus status, absl::Duration timeout) {
  v1::ListConnectionsRequest req;
  req.set_page_size(page_size);
  req.set_page_token(std::string(page_token));
  req.set_provider(std::string(provider));
  req.set_status(status);
  v1::ListConnectionsResponse resp;
  grpc::ClientContext ctx;
  SetDeadline(ctx, timeout);
  if (absl::Status s = Finish(admin_->ListConnections(&ctx, req, &resp)); !s.ok()) {
    return s;
  }
  return resp;
}

absl::StatusOr<v1::RotateKeysResponse> TokenClient::RotateKeys(int batch_size,
                                                               absl::Duration timeout) {
  v1::RotateKeysRequest req;
  req.set_batch_size(batch_size);
  v1::RotateKeysResponse resp;
  grpc::ClientContext ctx;
  SetDeadline(ctx, timeout);
  if (absl::Status s = Finish(admin_->RotateKeys(&ctx, req, &resp)); !s.ok()) {
    return s;
  }
  return resp;
}

absl::Status TokenClient::DeleteConnection(absl::string_view connection_id,
                                           absl::Duration timeout) {
  v1::DeleteConnectionRequest req;
  req.set_connection_id(std::string(connection_id));
  v1::DeleteConnectionResponse resp;
  grpc::ClientContext ctx;
  SetDeadline(ctx, timeout);
  return Finish(admin_->DeleteConnection(&ctx, req, &resp));
}

absl::StatusOr<v1::Token> TokenClient::Refresh(absl::string_view connection_id,
                                               uint64_t if_generation, absl::Duration timeout) {
  v1::RefreshRequest req;
  req.set_connection_id(std::string(connection_id));
  req.set_if_generation(if_generation);
  v1::RefreshResponse resp;
  grpc::ClientContext ctx;
  SetDeadline(ctx, timeout);
  if (absl::Status s = Finish(broker_->Refresh(&ctx, req, &resp)); !s.ok()) {
    return s;
  }
  return resp.token();
}

absl::StatusOr<bool> TokenClient::Revoke(absl::string_view connection_id, absl::Duration timeout) {
  v1::RevokeRequest req;
  req.set_connection_id(std::string(connection_id));
  v1::RevokeResponse resp;
  grpc::ClientContext ctx;
  SetDeadline(ctx, timeout);
  if (absl::Status s = Finish(broker_->Revoke(&ctx, req, &resp)); !s.ok()) {
    return s;
  }
  return resp.provider_confirmed();
}

absl::Status TokenClient::Watch(absl::string_view connection_id,
                                const std::function<bool(const v1::Token&)>& on_token) {
  grpc::ClientContext ctx;
  return Watch(connection_id, on_token, ctx);
}

absl::Status TokenClient::Watch(absl::string_view connection_id,
                                const std::function<bool(const v1::Token&)>& on_token,
                                grpc::ClientContext& ctx) {
  v1::WatchTokenRequest req;
  req.set_connection_id(std::string(connection_id));
  SetDeadline(ctx, absl::InfiniteDuration());  // a stream: no deadline, but the credentials
  std::unique_ptr<grpc::ClientReader<v1::WatchTokenResponse>> reader =
      broker_->WatchToken(&ctx, req);
  v1::WatchTokenResponse msg;
  while (reader->Read(&msg)) {
    if (!on_token(msg.token())) {
      ctx.TryCancel();
      (void)reader->Finish();
      return absl::OkStatus();
    }
  }
  return Finish(reader->Finish());
}

absl::StatusOr<v1::CreateConnectLinkResponse> TokenClient::CreateConnectLink(
    absl::string_view connection_id, absl::string_view provider,
    const std::map<std::string, std::string>& params, absl::Duration ttl, bool reconnect,
    absl::string_view return_url, absl::Duration timeout) {
  v1::CreateConnectLinkRequest req;
  req.set_connection_id(std::string(connection_id));
  req.set_provider(std::string(provider));
  for (const auto& [k, v] : params) {
    (*req.mutable_params())[k] = v;
  }
  req.mutable_ttl()->set_seconds(absl::ToInt64Seconds(ttl));
  req.set_reconnect(reconnect);
  req.set_return_url(std::string(return_url));
  v1::CreateConnectLinkResponse resp;
  grpc::ClientContext ctx;
  SetDeadline(ctx, timeout);
  if (absl::Status s = Finish(admin_->CreateConnectLink(&ctx, req, &resp)); !s.ok()) {
    return s;
  }
  return resp;
}

absl::Status TokenClient::RevokeConnectLink(absl::string_view link_id, absl::Duration timeout) {
  v1::RevokeConnectLinkRequest req;
  req.set_link_id(std::string(link_id));
  v1::RevokeConnectLinkResponse resp;
  grpc::ClientContext ctx;
  SetDeadline(ctx, timeout);
  return Finish(admin_->RevokeConnectLink(&ctx, req, &resp));
}

absl::StatusOr<health::HealthCheckResponse::ServingStatus> TokenClient::Check(
    absl::string_view service, absl::Duration timeout) {
  health::HealthCheckRequest req;
  req.set_service(std::string(service));
  health::HealthCheckResponse resp;
  grpc::ClientContext ctx;
  SetDeadline(ctx, timeout);
  if (absl::Status s = Finish(health_->Check(&ctx, req, &resp)); !s.ok()) {
    return s;
  }
  return resp.status();
}

}  // namespace tb::client
