#ifndef TB_GRPC_ADMIN_SERVICE_H_
#define TB_GRPC_ADMIN_SERVICE_H_

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "server/src/auth/authorizer.h"
#include "server/src/common/work_pool.h"
#include "server/src/grpc/cq_calls.h"
#include "server/src/grpc/rpc_metrics.h"
#include "server/src/oauth/authorization_flow.h"
#include "server/src/oauth/broker.h"
#include "tokenbroker/v1/token_broker.grpc.pb.h"

namespace tb::grpc_api {

// tokenbroker.v1.ConnectionAdmin on the completion-queue model (cq_calls.h). Metadata and
// status only: no method returns a secret. Calls that reach the store or the provider (links,
// delete) run on `run_blocking`, never on a gRPC thread, and answer from there. `broker` and
// `flow` must outlive the service.
class AdminService final {
 public:
  // Every method needs the caller's Admin permission (`authorizer`, which must outlive it).
  // Requests and latencies go to `rpc_metrics` when it is not null (it must outlive the service).
  AdminService(oauth::Broker& broker, oauth::AuthorizationFlow& flow, RunBlocking run_blocking,
               const auth::Authorizer& authorizer, RpcMetrics* rpc_metrics = nullptr);

  // Serves the methods on a server being built, on its `queues`; before BuildAndStart, once.
  void RegisterWith(grpc::ServerBuilder& builder, cq::Queues& queues);

  // The methods; each answers through `reply` once, maybe later from another thread.

  void CreateConnectLink(grpc::ServerContext* ctx,
                         const tokenbroker::v1::CreateConnectLinkRequest* req,
                         tokenbroker::v1::CreateConnectLinkResponse* resp, cq::UnaryReply* reply);
  void RevokeConnectLink(grpc::ServerContext* ctx,
                         const tokenbroker::v1::RevokeConnectLinkRequest* req,
                         tokenbroker::v1::RevokeConnectLinkResponse* resp, cq::UnaryReply* reply);
  void GetConnection(grpc::ServerContext* ctx, const tokenbroker::v1::GetConnectionRequest* req,
                     tokenbroker::v1::Connection* resp, cq::UnaryReply* reply);
  void ListConnections(grpc::ServerContext* ctx, const tokenbroker::v1::ListConnectionsRequest* req,
                       tokenbroker::v1::ListConnectionsResponse* resp, cq::UnaryReply* reply);
  void DeleteConnection(grpc::ServerContext* ctx,
                        const tokenbroker::v1::DeleteConnectionRequest* req,
                        tokenbroker::v1::DeleteConnectionResponse* resp, cq::UnaryReply* reply);
  void RotateKeys(grpc::ServerContext* ctx, const tokenbroker::v1::RotateKeysRequest* req,
                  tokenbroker::v1::RotateKeysResponse* resp, cq::UnaryReply* reply);

 private:
  tokenbroker::v1::ConnectionAdmin::AsyncService service_;
  std::vector<std::shared_ptr<void>> methods_;  // the cq::UnaryMethod of each, for the calls
  oauth::Broker& broker_;
  oauth::AuthorizationFlow& flow_;
  const RunBlocking run_blocking_;
  const auth::Authorizer& authorizer_;
  std::map<std::string, RpcMetrics::Method*> metrics_;  // filled at construction, then read-only
};

}  // namespace tb::grpc_api

#endif  // TB_GRPC_ADMIN_SERVICE_H_
