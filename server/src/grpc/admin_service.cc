#include "server/src/grpc/admin_service.h"

#include <spdlog/spdlog.h>

#include <map>
#include <string>

#include "absl/strings/escaping.h"
#include "absl/time/clock.h"
#include "server/src/common/logging.h"
#include "server/src/core/errors.h"
#include "server/src/grpc/caller_auth.h"
#include "server/src/grpc/rpc_metrics.h"
#include "server/src/grpc/status_mapping.h"

namespace tb::grpc_api {

namespace v1 = tokenbroker::v1;

namespace {

constexpr int kDefaultPageSize = 100;

void Finish(cq::UnaryReply* r, RpcMetrics::Method* m, absl::Time start,
            const grpc::Status& status) {
  RpcMetrics::Record(m, static_cast<absl::StatusCode>(status.error_code()), absl::Now() - start);
  r->Finish(status);
}

// The caller's x-request-id metadata, "" without one (ScopedRequestId keeps it if well-formed).
absl::string_view RequestIdOf(const grpc::ServerContextBase& ctx) {
  const auto& md = ctx.client_metadata();
  const auto it = md.find("x-request-id");
  return it == md.end() ? absl::string_view()
                        : absl::string_view(it->second.data(), it->second.size());
}

// Page tokens are the last id of the previous page, base64url-encoded so that callers treat
// them as opaque.
std::string EncodePageToken(const std::string& after) { return absl::WebSafeBase64Escape(after); }

absl::StatusOr<std::string> DecodePageToken(const std::string& token) {
  std::string after;
  if (!absl::WebSafeBase64Unescape(token, &after) || !core::ValidateConnectionId(after).ok()) {
    return absl::InvalidArgumentError("page_token is not one this server issued");
  }
  return after;
}

}  // namespace

AdminService::AdminService(oauth::Broker& broker, oauth::AuthorizationFlow& flow,
                           RunBlocking run_blocking, const auth::Authorizer& authorizer,
                           RpcMetrics* rpc_metrics)
    : broker_(broker),
      flow_(flow),
      run_blocking_(std::move(run_blocking)),
      authorizer_(authorizer) {
  for (const char* name : {"CreateConnectLink", "RevokeConnectLink", "GetConnection",
                           "ListConnections", "DeleteConnection", "RotateKeys"}) {
    metrics_[name] = rpc_metrics == nullptr ? nullptr : rpc_metrics->For(name);
  }
}

namespace {

// A ConnectionAdmin method served on `queues` by one of AdminService's member functions.
template <class Req, class Resp>
using AdminMethod = cq::UnaryMethod<v1::ConnectionAdmin::AsyncService, Req, Resp>;

template <class Req, class Resp>
void Serve(AdminService* self, v1::ConnectionAdmin::AsyncService* service,
           typename AdminMethod<Req, Resp>::RequestFn request,
           void (AdminService::*handler)(grpc::ServerContext*, const Req*, Resp*, cq::UnaryReply*),
           cq::Queues& queues, std::vector<std::shared_ptr<void>>& keep) {
  auto m = std::make_shared<AdminMethod<Req, Resp>>(AdminMethod<Req, Resp>{
      service, request,
      [self, handler](grpc::ServerContext* ctx, const Req* req, Resp* resp, cq::UnaryReply* r) {
        (self->*handler)(ctx, req, resp, r);
      },
      &queues, 1});
  queues.OnStart([m = m.get()](grpc::ServerCompletionQueue* q) {
    cq::UnaryCall<v1::ConnectionAdmin::AsyncService, Req, Resp>::Arm(m, q);
  });
  keep.push_back(std::move(m));
}

}  // namespace

void AdminService::RegisterWith(grpc::ServerBuilder& builder, cq::Queues& queues) {
  using S = v1::ConnectionAdmin::AsyncService;
  builder.RegisterService(&service_);
  Serve<v1::CreateConnectLinkRequest, v1::CreateConnectLinkResponse>(
      this, &service_, &S::RequestCreateConnectLink, &AdminService::CreateConnectLink, queues,
      methods_);
  Serve<v1::RevokeConnectLinkRequest, v1::RevokeConnectLinkResponse>(
      this, &service_, &S::RequestRevokeConnectLink, &AdminService::RevokeConnectLink, queues,
      methods_);
  Serve<v1::GetConnectionRequest, v1::Connection>(this, &service_, &S::RequestGetConnection,
                                                  &AdminService::GetConnection, queues, methods_);
  Serve<v1::ListConnectionsRequest, v1::ListConnectionsResponse>(
      this, &service_, &S::RequestListConnections, &AdminService::ListConnections, queues,
      methods_);
  Serve<v1::DeleteConnectionRequest, v1::DeleteConnectionResponse>(
      this, &service_, &S::RequestDeleteConnection, &AdminService::DeleteConnection, queues,
      methods_);
  Serve<v1::RotateKeysRequest, v1::RotateKeysResponse>(this, &service_, &S::RequestRotateKeys,
                                                       &AdminService::RotateKeys, queues, methods_);
}

void AdminService::CreateConnectLink(grpc::ServerContext* ctx,
                                     const v1::CreateConnectLinkRequest* req,
                                     v1::CreateConnectLinkResponse* resp, cq::UnaryReply* r) {
  const ScopedRequestId request(RequestIdOf(*ctx));
  const absl::Time start = absl::Now();
  RpcMetrics::Method* const m = metrics_.at("CreateConnectLink");
  if (absl::StatusOr<std::shared_ptr<const auth::Caller>> caller =
          Authorize(*ctx, authorizer_, auth::Permission::kAdmin, "CreateConnectLink", "");
      !caller.ok()) {
    return Finish(r, m, start, ToGrpcStatus(caller.status()));
  }
  if (req->ttl().seconds() < 0 || req->ttl().nanos() < 0) {
    return Finish(r, m, start,
                  grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "ttl must not be negative"));
  }
  cq::UnaryReply* const reactor = r;
  // Request and response stay valid until Finish.
  run_blocking_(WithCurrentRequestId([this, m, start, reactor, req, resp] {
    const std::map<std::string, std::string> params(req->params().begin(), req->params().end());
    absl::StatusOr<oauth::AuthorizationFlow::MintedLink> link =
        flow_.CreateLink(req->connection_id(), req->provider(), params,
                         absl::Seconds(req->ttl().seconds()), req->reconnect(), req->return_url());
    spdlog::info("CreateConnectLink connection={} provider={} reconnect={} code={}",
                 req->connection_id(), req->provider(), req->reconnect(),
                 absl::StatusCodeToString(link.status().code()));
    if (!link.ok()) {
      Finish(reactor, m, start, ToGrpcStatus(link.status()));
      return;
    }
    resp->set_url(link->url);
    resp->set_link_id(link->link_id);
    resp->mutable_expires_at()->set_seconds(absl::ToUnixSeconds(link->expires_at));
    Finish(reactor, m, start, grpc::Status::OK);
  }));
}

void AdminService::RevokeConnectLink(grpc::ServerContext* ctx,
                                     const v1::RevokeConnectLinkRequest* req,
                                     v1::RevokeConnectLinkResponse*, cq::UnaryReply* r) {
  const ScopedRequestId request(RequestIdOf(*ctx));
  const absl::Time start = absl::Now();
  RpcMetrics::Method* const m = metrics_.at("RevokeConnectLink");
  if (absl::StatusOr<std::shared_ptr<const auth::Caller>> caller =
          Authorize(*ctx, authorizer_, auth::Permission::kAdmin, "RevokeConnectLink", "");
      !caller.ok()) {
    return Finish(r, m, start, ToGrpcStatus(caller.status()));
  }
  cq::UnaryReply* const reactor = r;
  run_blocking_(WithCurrentRequestId([this, m, start, reactor, req] {
    const absl::Status s = flow_.RevokeLink(req->link_id());
    spdlog::info("RevokeConnectLink code={}", absl::StatusCodeToString(s.code()));
    Finish(reactor, m, start, ToGrpcStatus(s));
  }));
}

void AdminService::GetConnection(grpc::ServerContext* ctx, const v1::GetConnectionRequest* req,
                                 v1::Connection* resp, cq::UnaryReply* r) {
  const ScopedRequestId request(RequestIdOf(*ctx));
  const absl::Time start = absl::Now();
  RpcMetrics::Method* const m = metrics_.at("GetConnection");
  if (absl::StatusOr<std::shared_ptr<const auth::Caller>> caller =
          Authorize(*ctx, authorizer_, auth::Permission::kAdmin, "GetConnection", "");
      !caller.ok()) {
    return Finish(r, m, start, ToGrpcStatus(caller.status()));
  }
  if (absl::Status s = core::ValidateConnectionId(req->connection_id()); !s.ok()) {
    return Finish(r, m, start, ToGrpcStatus(s));
  }
  absl::StatusOr<std::shared_ptr<const core::Connection>> c =
      broker_.GetConnection(req->connection_id());
  if (!c.ok()) {
    return Finish(r, m, start, ToGrpcStatus(c.status()));
  }
  ToProto(**c, resp);
  return Finish(r, m, start, grpc::Status::OK);
}

void AdminService::ListConnections(grpc::ServerContext* ctx, const v1::ListConnectionsRequest* req,
                                   v1::ListConnectionsResponse* resp, cq::UnaryReply* r) {
  const ScopedRequestId request(RequestIdOf(*ctx));
  const absl::Time start = absl::Now();
  RpcMetrics::Method* const m = metrics_.at("ListConnections");
  if (absl::StatusOr<std::shared_ptr<const auth::Caller>> caller =
          Authorize(*ctx, authorizer_, auth::Permission::kAdmin, "ListConnections", "");
      !caller.ok()) {
    return Finish(r, m, start, ToGrpcStatus(caller.status()));
  }
  if (req->page_size() < 0) {
    return Finish(
        r, m, start,
        grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "page_size must not be negative"));
  }
  std::string after;
  if (!req->page_token().empty()) {
    absl::StatusOr<std::string> decoded = DecodePageToken(req->page_token());
    if (!decoded.ok()) {
      return Finish(r, m, start, ToGrpcStatus(decoded.status()));
    }
    after = *std::move(decoded);
  }
  cache::ConnectionCache::Filter filter;
  filter.provider = req->provider();
  filter.status = FromProto(req->status());
  const size_t page_size = req->page_size() == 0 ? kDefaultPageSize : req->page_size();
  absl::StatusOr<cache::ConnectionCache::Page> page =
      broker_.ListConnections(filter, page_size, after);
  if (!page.ok()) {
    return Finish(r, m, start, ToGrpcStatus(page.status()));
  }
  for (const cache::ConnectionCache::Entry& e : page->entries) {
    ToProto(*e, resp->add_connections());
  }
  if (!page->next_after.empty()) {
    resp->set_next_page_token(EncodePageToken(page->next_after));
  }
  return Finish(r, m, start, grpc::Status::OK);
}

void AdminService::DeleteConnection(grpc::ServerContext* ctx,
                                    const v1::DeleteConnectionRequest* req,
                                    v1::DeleteConnectionResponse*, cq::UnaryReply* r) {
  const ScopedRequestId request(RequestIdOf(*ctx));
  const absl::Time start = absl::Now();
  RpcMetrics::Method* const m = metrics_.at("DeleteConnection");
  if (absl::StatusOr<std::shared_ptr<const auth::Caller>> caller =
          Authorize(*ctx, authorizer_, auth::Permission::kAdmin, "DeleteConnection", "");
      !caller.ok()) {
    return Finish(r, m, start, ToGrpcStatus(caller.status()));
  }
  if (absl::Status s = core::ValidateConnectionId(req->connection_id()); !s.ok()) {
    return Finish(r, m, start, ToGrpcStatus(s));
  }
  cq::UnaryReply* const reactor = r;
  run_blocking_(WithCurrentRequestId([this, m, start, reactor, req] {
    const absl::Status s = flow_.DeleteConnection(req->connection_id());
    spdlog::info("DeleteConnection connection={} code={}", req->connection_id(),
                 absl::StatusCodeToString(s.code()));
    Finish(reactor, m, start, ToGrpcStatus(s));
  }));
}

void AdminService::RotateKeys(grpc::ServerContext* ctx, const v1::RotateKeysRequest* req,
                              v1::RotateKeysResponse* resp, cq::UnaryReply* r) {
  const ScopedRequestId request(RequestIdOf(*ctx));
  const absl::Time start = absl::Now();
  RpcMetrics::Method* const m = metrics_.at("RotateKeys");
  if (absl::StatusOr<std::shared_ptr<const auth::Caller>> caller =
          Authorize(*ctx, authorizer_, auth::Permission::kAdmin, "RotateKeys", "");
      !caller.ok()) {
    return Finish(r, m, start, ToGrpcStatus(caller.status()));
  }
  if (req->batch_size() < 0 || req->batch_size() > 10'000) {
    return Finish(
        r, m, start,
        grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "batch_size must be 0 (500) to 10000"));
  }
  cq::UnaryReply* const reactor = r;
  run_blocking_(WithCurrentRequestId([this, m, start, reactor, req, resp] {
    const size_t batch = req->batch_size() == 0 ? 500 : static_cast<size_t>(req->batch_size());
    absl::StatusOr<core::RotationProgress> p = broker_.RotateKeys(batch);
    spdlog::info("RotateKeys batch={} code={} reencrypted={} remaining={} unreadable={}", batch,
                 absl::StatusCodeToString(p.status().code()), p.ok() ? p->reencrypted : 0,
                 p.ok() ? p->remaining : 0, p.ok() ? p->unreadable : 0);
    if (!p.ok()) {
      Finish(reactor, m, start, ToGrpcStatus(p.status()));
      return;
    }
    resp->set_reencrypted(p->reencrypted);
    resp->set_remaining(p->remaining);
    resp->set_unreadable(p->unreadable);
    Finish(reactor, m, start, grpc::Status::OK);
  }));
}

}  // namespace tb::grpc_api
