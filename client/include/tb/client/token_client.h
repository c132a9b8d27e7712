#ifndef TB_CLIENT_TOKEN_CLIENT_H_
#define TB_CLIENT_TOKEN_CLIENT_H_

// A thin C++ client for token-broker's gRPC API (proto/tokenbroker/v1/token_broker.proto).
//
// Every call takes a timeout and turns gRPC's status into an absl::Status with the same numeric
// code. Where the broker attached a google.rpc.ErrorInfo (domain "tokenbroker.v1"), its reason
// (e.g. "NEEDS_REAUTH") stays readable through ErrorReason(). Responses are the proto messages.

#include <grpcpp/channel.h>
#include <grpcpp/support/status.h>

#include <functional>
#include <map>
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "tokenbroker/v1/token_broker.grpc.pb.h"

namespace tb::client {

// The google.rpc.ErrorInfo domain the broker uses.
inline constexpr absl::string_view kErrorDomain = "tokenbroker.v1";

// Payload type URLs FromGrpcStatus sets on an absl::Status.
inline constexpr absl::string_view kReasonPayloadUrl = "tokenbroker.v1/reason";
inline constexpr absl::string_view kUnreachablePayloadUrl = "tokenbroker.v1/client-unreachable";

inline constexpr absl::Duration kDefaultTimeout = absl::Seconds(5);

// grpc::Status -> absl::Status with the same code and message. A google.rpc.Status in
// error_details() whose details hold an ErrorInfo of domain kErrorDomain contributes its reason
// as a payload (read it with ErrorReason). Malformed details are ignored.
absl::Status FromGrpcStatus(const grpc::Status& status);

// The broker's ErrorInfo reason carried by `status` (e.g. "NOT_CONNECTED"), or "" if none.
std::string ErrorReason(const absl::Status& status);

// True if `status` is UNAVAILABLE because this client could not reach the server at all (no
// connection), as opposed to the server answering UNAVAILABLE.
bool IsUnreachable(const absl::Status& status);

// How to reach and authenticate to the broker.
struct ClientOptions {
  std::string target;  // host:port
  // TLS: trust `ca_file` (PEM; empty: the system roots). Set by any of these fields.
  bool tls = false;
  std::string ca_file;
  // mTLS: this client's certificate and key (PEM files).
  std::string cert_file;
  std::string key_file;
  // Sent as `authorization: Bearer <key>` on every call. A secret: never logged.
  std::string api_key;
  // While a call or stream is open, ping the broker this often; a broker that does not answer
  // within keepalive_timeout is given up on, so a WatchToken stream over a connection that
  // died silently (a node gone, a NAT entry dropped) fails and is reopened instead of hanging.
  // The broker accepts pings down to 10 s apart. Zero: no pings.
  absl::Duration keepalive = absl::Seconds(30);
  absl::Duration keepalive_timeout = absl::Seconds(10);
};

// One client over one channel: TokenBroker, ConnectionAdmin and grpc.health.v1.Health.
//
// Thread-safe (gRPC stubs are). Each method blocks until the answer arrives or `timeout`
// passes (then DEADLINE_EXCEEDED). Besides the codes named per method, every call can fail with
// UNAVAILABLE (see IsUnreachable), DEADLINE_EXCEEDED, UNAUTHENTICATED or PERMISSION_DENIED.
class TokenClient {
 public:
  // `channel` carries the credentials; it is shared, and kept alive by this client.
  explicit TokenClient(std::shared_ptr<grpc::Channel> channel);

  // A client over a plaintext channel to `target` (e.g. "127.0.0.1:8443"). The connection is
  // made lazily, by the first call.
  static std::unique_ptr<TokenClient> Insecure(const std::string& target);
  // A client as `options` says. Errors: INVALID_ARGUMENT (a file that cannot be read, a
  // certificate without its key).
  static absl::StatusOr<std::unique_ptr<TokenClient>> Create(const ClientOptions& options);

  // A token valid for at least `min_ttl` (zero: any valid token).
  // Errors: NOT_FOUND (unknown connection); FAILED_PRECONDITION with a reason (NOT_CONNECTED,
  // NEEDS_REAUTH, ROTATION_LOST, REVOKED, NOT_REFRESHABLE, PROVIDER_MISCONFIGURED); UNAVAILABLE
  // (no token with that lifetime); INVALID_ARGUMENT.
  absl::StatusOr<tokenbroker::v1::Token> GetToken(absl::string_view connection_id,
                                                  absl::Duration min_ttl = absl::ZeroDuration(),
                                                  absl::Duration timeout = kDefaultTimeout);

  // One connection's metadata. Errors: NOT_FOUND, INVALID_ARGUMENT.
  absl::StatusOr<tokenbroker::v1::Connection> GetConnection(
      absl::string_view connection_id, absl::Duration timeout = kDefaultTimeout);

  // One page of connections in id order. `page_size` 0 means the server's default; an empty
  // `provider` and CONNECTION_STATUS_UNSPECIFIED mean no filter. Follow next_page_token until it
  // is empty. Errors: INVALID_ARGUMENT (bad page size or page token).
  absl::StatusOr<tokenbroker::v1::ListConnectionsResponse> ListConnections(
      int page_size, absl::string_view page_token, absl::string_view provider = "",
      tokenbroker::v1::ConnectionStatus status = tokenbroker::v1::CONNECTION_STATUS_UNSPECIFIED,
      absl::Duration timeout = kDefaultTimeout);

  // Revokes (best effort) and removes a connection. Errors: NOT_FOUND, INVALID_ARGUMENT.
  // One batch of key rotation (ConnectionAdmin.RotateKeys). Errors: INVALID_ARGUMENT.
  absl::StatusOr<tokenbroker::v1::RotateKeysResponse> RotateKeys(
      int batch_size, absl::Duration timeout = kDefaultTimeout);

  absl::Status DeleteConnection(absl::string_view connection_id,
                                absl::Duration timeout = kDefaultTimeout);

  // Refresh(if_generation): a new token unless one newer than `if_generation` exists (0:
  // unconditionally). Errors as GetToken, plus RESOURCE_EXHAUSTED (refreshed on request moments
  // ago) and NOT_REFRESHABLE.
  absl::StatusOr<tokenbroker::v1::Token> Refresh(absl::string_view connection_id,
                                                 uint64_t if_generation,
                                                 absl::Duration timeout = kDefaultTimeout);

  // Revokes the grant (stops serving at once, then at the provider). Returns whether the
  // provider confirmed; if not, the broker keeps retrying until it does. Revoking a revoked
  // connection retries what is still owed. Errors: NOT_FOUND, FAILED_PRECONDITION
  // (NOT_CONNECTED).
  absl::StatusOr<bool> Revoke(absl::string_view connection_id,
                              absl::Duration timeout = kDefaultTimeout);

  // WatchToken: calls `on_token` with the current token and each new generation until the
  // stream ends (its status is returned) or `on_token` returns false (then OK).
  absl::Status Watch(absl::string_view connection_id,
                     const std::function<bool(const tokenbroker::v1::Token&)>& on_token);
  // The same over `ctx`, which another thread may TryCancel() to end the stream (then
  // CANCELLED). `ctx` must be fresh and outlive the call; the credentials are added here.
  absl::Status Watch(absl::string_view connection_id,
                     const std::function<bool(const tokenbroker::v1::Token&)>& on_token,
                     grpc::ClientContext& ctx);

  // Mints a connect link (ConnectionAdmin.CreateConnectLink). `ttl` zero: the server's default.
  // Errors: INVALID_ARGUMENT (unknown provider, bad parameters), FAILED_PRECONDITION with flow
  // error ALREADY_CONNECTED when the connection is active and `reconnect` is false, and
  // INVALID_ARGUMENT for a non-empty `return_url` not on the broker's links.return_url_allowlist.
  absl::StatusOr<tokenbroker::v1::CreateConnectLinkResponse> CreateConnectLink(
      absl::string_view connection_id, absl::string_view provider,
      const std::map<std::string, std::string>& params, absl::Duration ttl, bool reconnect,
      absl::string_view return_url = "", absl::Duration timeout = kDefaultTimeout);

  // Withdraws a link. Errors: NOT_FOUND.
  absl::Status RevokeConnectLink(absl::string_view link_id,
                                 absl::Duration timeout = kDefaultTimeout);

  // grpc.health.v1 Check of `service` ("" is the whole server).
  // Errors: NOT_FOUND (the server does not know `service`).
  absl::StatusOr<grpc::health::v1::HealthCheckResponse::ServingStatus> Check(
      absl::string_view service, absl::Duration timeout = kDefaultTimeout);

 private:
  // Maps a finished call's status, marking transport failures (see IsUnreachable).
  absl::Status Finish(const grpc::Status& status) const;
  // The call's deadline and credentials.
  void SetDeadline(grpc::ClientContext& ctx, absl::Duration timeout) const;

  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<tokenbroker::v1::TokenBroker::Stub> broker_;
  std::unique_ptr<tokenbroker::v1::ConnectionAdmin::Stub> admin_;
  std::unique_ptr<grpc::health::v1::Health::Stub> health_;
  std::string api_key_;  // a secret: only ever put into the authorization header
};

}  // namespace tb::client

#endif  // TB_CLIENT_TOKEN_CLIENT_H_
