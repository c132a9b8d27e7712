#include "server/src/grpc/admin_service.h"

#include <spdlog/spdlog.h>

#include <map>
#include <string>

#include "absl/strings/escaping.h"
#include "server/src/core/errors.h"
#include "server/src/grpc/caller_auth.h"
#include "server/src/grpc/status_mapping.h"

namespace tb::grpc_api {

namespace v1 = tokenbroker::v1;

namespace {

constexpr int kDefaultPageSize = 100;

grpc::ServerUnaryReactor* Done(grpc::CallbackServerContext* ctx, const grpc::Status& status) {
  grpc::ServerUnaryReactor* r = ctx->DefaultReactor();
  r->Finish(status);
  return r;
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

grpc::ServerUnaryReactor* AdminService::CreateConnectLink(grpc::CallbackServerContext* ctx,
                                                          const v1::CreateConnectLinkRequest* req,
                                                          v1::CreateConnectLinkResponse* resp) {
  if (absl::StatusOr<std::shared_ptr<const auth::Caller>> caller =
          Authorize(*ctx, authorizer_, auth::Permission::kAdmin, "CreateConnectLink", "");
      !caller.ok()) {
    return Done(ctx, ToGrpcStatus(caller.status()));
  }
  if (req->ttl().seconds() < 0 || req->ttl().nanos() < 0) {
    return Done(ctx, grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "ttl must not be negative"));
  }
  grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
  // Request and response stay valid until Finish.
  run_blocking_([this, reactor, req, resp] {
    const std::map<std::string, std::string> params(req->params().begin(), req->params().end());
    absl::StatusOr<oauth::AuthorizationFlow::MintedLink> link =
        flow_.CreateLink(req->connection_id(), req->provider(), params,
                         absl::Seconds(req->ttl().seconds()), req->reconnect());
    spdlog::info("CreateConnectLink connection={} provider={} reconnect={} code={}",
                 req->connection_id(), req->provider(), req->reconnect(),
                 absl::StatusCodeToString(link.status().code()));
    if (!link.ok()) {
      reactor->Finish(ToGrpcStatus(link.status()));
      return;
    }
    resp->set_url(link->url);
    resp->set_link_id(link->link_id);
    resp->mutable_expires_at()->set_seconds(absl::ToUnixSeconds(link->expires_at));
    reactor->Finish(grpc::Status::OK);
  });
  return reactor;
}

grpc::ServerUnaryReactor* AdminService::RevokeConnectLink(grpc::CallbackServerContext* ctx,
                                                          const v1::RevokeConnectLinkRequest* req,
                                                          v1::RevokeConnectLinkResponse*) {
  if (absl::StatusOr<std::shared_ptr<const auth::Caller>> caller =
          Authorize(*ctx, authorizer_, auth::Permission::kAdmin, "RevokeConnectLink", "");
      !caller.ok()) {
    return Done(ctx, ToGrpcStatus(caller.status()));
  }
  grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
  run_blocking_([this, reactor, req] {
    const absl::Status s = flow_.RevokeLink(req->link_id());
    spdlog::info("RevokeConnectLink code={}", absl::StatusCodeToString(s.code()));
    reactor->Finish(ToGrpcStatus(s));
  });
  return reactor;
}

grpc::ServerUnaryReactor* AdminService::GetConnection(grpc::CallbackServerContext* ctx,
                                                      const v1::GetConnectionRequest* req,
                                                      v1::Connection* resp) {
  if (absl::StatusOr<std::shared_ptr<const auth::Caller>> caller =
          Authorize(*ctx, authorizer_, auth::Permission::kAdmin, "GetConnection", "");
      !caller.ok()) {
    return Done(ctx, ToGrpcStatus(caller.status()));
  }
  if (absl::Status s = core::ValidateConnectionId(req->connection_id()); !s.ok()) {
    return Done(ctx, ToGrpcStatus(s));
  }
  absl::StatusOr<std::shared_ptr<const core::Connection>> c =
      broker_.GetConnection(req->connection_id());
  if (!c.ok()) {
    return Done(ctx, ToGrpcStatus(c.status()));
  }
  ToProto(**c, resp);
  return Done(ctx, grpc::Status::OK);
}

grpc::ServerUnaryReactor* AdminService::ListConnections(grpc::CallbackServerContext* ctx,
                                                        const v1::ListConnectionsRequest* req,
                                                        v1::ListConnectionsResponse* resp) {
  if (absl::StatusOr<std::shared_ptr<const auth::Caller>> caller =
          Authorize(*ctx, authorizer_, auth::Permission::kAdmin, "ListConnections", "");
      !caller.ok()) {
    return Done(ctx, ToGrpcStatus(caller.status()));
  }
  if (req->page_size() < 0) {
    return Done(ctx,
                grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "page_size must not be negative"));
  }
  std::string after;
  if (!req->page_token().empty()) {
    absl::StatusOr<std::string> decoded = DecodePageToken(req->page_token());
    if (!decoded.ok()) {
      return Done(ctx, ToGrpcStatus(decoded.status()));
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
    return Done(ctx, ToGrpcStatus(page.status()));
  }
  for (const cache::ConnectionCache::Entry& e : page->entries) {
    ToProto(*e, resp->add_connections());
  }
  if (!page->next_after.empty()) {
    resp->set_next_page_token(EncodePageToken(page->next_after));
  }
  return Done(ctx, grpc::Status::OK);
}

grpc::ServerUnaryReactor* AdminService::DeleteConnection(grpc::CallbackServerContext* ctx,
                                                         const v1::DeleteConnectionRequest* req,
                                                         v1::DeleteConnectionResponse*) {
  if (absl::StatusOr<std::shared_ptr<const auth::Caller>> caller =
          Authorize(*ctx, authorizer_, auth::Permission::kAdmin, "DeleteConnection", "");
      !caller.ok()) {
    return Done(ctx, ToGrpcStatus(caller.status()));
  }
  if (absl::Status s = core::ValidateConnectionId(req->connection_id()); !s.ok()) {
    return Done(ctx, ToGrpcStatus(s));
  }
  grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
  run_blocking_([this, reactor, req] {
    const absl::Status s = flow_.DeleteConnection(req->connection_id());
    spdlog::info("DeleteConnection connection={} code={}", req->connection_id(),
                 absl::StatusCodeToString(s.code()));
    reactor->Finish(ToGrpcStatus(s));
  });
  return reactor;
}

grpc::ServerUnaryReactor* AdminService::RotateKeys(grpc::CallbackServerContext* ctx,
                                                   const v1::RotateKeysRequest* req,
                                                   v1::RotateKeysResponse* resp) {
  if (absl::StatusOr<std::shared_ptr<const auth::Caller>> caller =
          Authorize(*ctx, authorizer_, auth::Permission::kAdmin, "RotateKeys", "");
      !caller.ok()) {
    return Done(ctx, ToGrpcStatus(caller.status()));
  }
  if (req->batch_size() < 0 || req->batch_size() > 10'000) {
    return Done(ctx, grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                                  "batch_size must be 0 (500) to 10000"));
  }
  grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
  run_blocking_([this, reactor, req, resp] {
    const size_t batch = req->batch_size() == 0 ? 500 : static_cast<size_t>(req->batch_size());
    absl::StatusOr<core::RotationProgress> p = broker_.RotateKeys(batch);
    spdlog::info("RotateKeys batch={} code={} reencrypted={} remaining={} unreadable={}", batch,
                 absl::StatusCodeToString(p.status().code()), p.ok() ? p->reencrypted : 0,
                 p.ok() ? p->remaining : 0, p.ok() ? p->unreadable : 0);
    if (!p.ok()) {
      reactor->Finish(ToGrpcStatus(p.status()));
      return;
    }
    resp->set_reencrypted(p->reencrypted);
    resp->set_remaining(p->remaining);
    resp->set_unreadable(p->unreadable);
    reactor->Finish(grpc::Status::OK);
  });
  return reactor;
}

}  // namespace tb::grpc_api
