#ifndef TB_GRPC_ADMIN_SERVICE_H_
#define TB_GRPC_ADMIN_SERVICE_H_

#include <map>
#include <string>

#include "server/src/auth/authorizer.h"
#include "server/src/common/work_pool.h"
#include "server/src/grpc/rpc_metrics.h"
#include "server/src/oauth/authorization_flow.h"
#include "server/src/oauth/broker.h"
#include "tokenbroker/v1/token_broker.grpc.pb.h"

namespace tb::grpc_api {

// tokenbroker.v1.ConnectionAdmin on the callback API. Metadata and status only: no method
// returns a secret. Calls that reach the store or the provider (links, delete) run on
// `run_blocking`, never on a gRPC thread. `broker` and `flow` must outlive the service.
class AdminService final : public tokenbroker::v1::ConnectionAdmin::CallbackService {
 public:
  // Every method needs the caller's Admin permission (`authorizer`, which must outlive it).
  // Requests and latencies go to `rpc_metrics` when it is not null (it must outlive the service).
  AdminService(oauth::Broker& broker, oauth::AuthorizationFlow& flow, RunBlocking run_blocking,
               const auth::Authorizer& authorizer, RpcMetrics* rpc_metrics = nullptr);

  grpc::ServerUnaryReactor* CreateConnectLink(
      grpc::CallbackServerContext* ctx, const tokenbroker::v1::CreateConnectLinkRequest* req,
      tokenbroker::v1::CreateConnectLinkResponse* resp) override;
  grpc::ServerUnaryReactor* RevokeConnectLink(
      grpc::CallbackServerContext* ctx, const tokenbroker::v1::RevokeConnectLinkRequest* req,
      tokenbroker::v1::RevokeConnectLinkResponse* resp) override;
  grpc::ServerUnaryReactor* GetConnection(grpc::CallbackServerContext* ctx,
                                          const tokenbroker::v1::GetConnectionRequest* req,
                                          tokenbroker::v1::Connection* resp) override;
  grpc::ServerUnaryReactor* ListConnections(
      grpc::CallbackServerContext* ctx, const tokenbroker::v1::ListConnectionsRequest* req,
      tokenbroker::v1::ListConnectionsResponse* resp) override;
  grpc::ServerUnaryReactor* DeleteConnection(
      grpc::CallbackServerContext* ctx, const tokenbroker::v1::DeleteConnectionRequest* req,
      tokenbroker::v1::DeleteConnectionResponse* resp) override;
  grpc::ServerUnaryReactor* RotateKeys(grpc::CallbackServerContext* ctx,
                                       const tokenbroker::v1::RotateKeysRequest* req,
                                       tokenbroker::v1::RotateKeysResponse* resp) override;

 private:
  oauth::Broker& broker_;
  oauth::AuthorizationFlow& flow_;
  const RunBlocking run_blocking_;
  const auth::Authorizer& authorizer_;
  std::map<std::string, RpcMetrics::Method*> metrics_;  // filled at construction, then read-only
};

}  // namespace tb::grpc_api

#endif  // TB_GRPC_ADMIN_SERVICE_H_
