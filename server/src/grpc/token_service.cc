#include "server/src/grpc/token_service.h"

#include <spdlog/spdlog.h>

#include <optional>
#include <string>
#include <utility>

#include "absl/strings/str_cat.h"
#include "server/src/common/mutex.h"
#include "server/src/common/secret_format.h"
#include "server/src/core/errors.h"
#include "server/src/grpc/status_mapping.h"

namespace tb::grpc_api {

namespace v1 = tokenbroker::v1;

namespace {

// Outstanding RequestGetToken calls per completion queue: enough that a burst of new calls
// never waits for a CQ thread to re-arm one.
constexpr int kPendingCallsPerQueue = 64;

absl::StatusOr<absl::Duration> ParseMinTtl(const v1::GetTokenRequest& req) {
  if (!req.has_min_ttl()) {
    return absl::ZeroDuration();
  }
  const absl::Duration d =
      absl::Seconds(req.min_ttl().seconds()) + absl::Nanoseconds(req.min_ttl().nanos());
  if (d < absl::ZeroDuration()) {
    return absl::InvalidArgumentError("min_ttl must not be negative");
  }
  return d;
}

// The whole of GetToken's logic: parse, one domain call, map. No I/O, no waiting.
grpc::Status ServeGetToken(const oauth::Broker& broker, const v1::GetTokenRequest& req,
                           v1::GetTokenResponse* resp) {
  if (absl::Status s = core::ValidateConnectionId(req.connection_id()); !s.ok()) {
    return ToGrpcStatus(s);
  }
  absl::StatusOr<absl::Duration> min_ttl = ParseMinTtl(req);
  if (!min_ttl.ok()) {
    return ToGrpcStatus(min_ttl.status());
  }
  absl::StatusOr<oauth::TokenView> view = broker.GetToken(req.connection_id(), *min_ttl);
  if (!view.ok()) {
    return ToGrpcStatus(view.status());
  }
  if (view->grant().generation < req.min_generation()) {
    // Waiting for a future generation arrives with the refresh scheduler; until then a newer
    // generation can only come from a reconnect, so there is nothing to wait for.
    return grpc::Status(grpc::StatusCode::UNAVAILABLE, "requested generation is not available");
  }
  if (spdlog::should_log(spdlog::level::trace)) {
    spdlog::trace("GetToken connection={} generation={} token={}", req.connection_id(),
                  view->grant().generation, view->grant().access_token);
  }
  ToProto(*view, resp->mutable_token());
  return grpc::Status::OK;
}

}  // namespace

class TokenService::Impl final : public TokenService::Service {
 public:
  Impl(Deps deps, int cq_threads)
      : broker_(deps.broker),
        cache_(deps.cache),
        flow_(deps.flow),
        refresher_(deps.refresher),
        run_blocking_(std::move(deps.run_blocking)),
        cq_threads_(cq_threads) {}

  void RegisterWith(grpc::ServerBuilder& builder) {
    builder.RegisterService(this);
    for (int i = 0; i < cq_threads_; ++i) {
      cqs_.push_back(builder.AddCompletionQueue());
    }
  }

  void Start();

  void Shutdown() {
    for (auto& cq : cqs_) {
      cq->Shutdown();
    }
    for (std::thread& t : threads_) {
      t.join();
    }
    threads_.clear();
  }

  // Refresh: joins (or starts) the connection's single refresh flight and answers from its
  // completion; nothing blocks a gRPC thread. A caller whose deadline passes gets
  // DEADLINE_EXCEEDED from gRPC while the flight goes on.
  grpc::ServerUnaryReactor* Refresh(grpc::CallbackServerContext* ctx, const v1::RefreshRequest* req,
                                    v1::RefreshResponse* resp) override {
    grpc::ServerUnaryReactor* r = ctx->DefaultReactor();
    if (absl::Status s = core::ValidateConnectionId(req->connection_id()); !s.ok()) {
      r->Finish(ToGrpcStatus(s));
      return r;
    }
    refresher_.Refresh(req->connection_id(), req->if_generation(),
                       [r, resp](absl::StatusOr<oauth::TokenView> v) {
                         if (!v.ok()) {
                           r->Finish(ToGrpcStatus(v.status()));
                           return;
                         }
                         ToProto(*v, resp->mutable_token());
                         r->Finish(grpc::Status::OK);
                       });
    return r;
  }

  // Revoke: stops serving at once, then revokes at the provider, on the work pool.
  grpc::ServerUnaryReactor* Revoke(grpc::CallbackServerContext* ctx, const v1::RevokeRequest* req,
                                   v1::RevokeResponse*) override {
    grpc::ServerUnaryReactor* r = ctx->DefaultReactor();
    if (absl::Status s = core::ValidateConnectionId(req->connection_id()); !s.ok()) {
      r->Finish(ToGrpcStatus(s));
      return r;
    }
    run_blocking_([this, r, req] {
      const absl::Status s = flow_.RevokeConnection(req->connection_id());
      spdlog::info("Revoke connection={} code={}", req->connection_id(),
                   absl::StatusCodeToString(s.code()));
      r->Finish(ToGrpcStatus(s));
    });
    return r;
  }

  grpc::ServerWriteReactor<v1::WatchTokenResponse>* WatchToken(
      grpc::CallbackServerContext* ctx, const v1::WatchTokenRequest* req) override;

 private:
  class GetTokenCall;
  class WatchReactor;

  // One CQ thread: takes events and advances calls. The loop owns every call object: a call
  // returns false from Proceed when it is over and the loop destroys it.
  void Drive(grpc::ServerCompletionQueue* cq);

  oauth::Broker& broker_;
  cache::ConnectionCache& cache_;
  oauth::AuthorizationFlow& flow_;
  oauth::Refresher& refresher_;
  const RunBlocking run_blocking_;
  const int cq_threads_;
  std::vector<std::unique_ptr<grpc::ServerCompletionQueue>> cqs_;
  std::vector<std::thread> threads_;
};

// A GetToken in flight on the CQ model: requested -> finishing -> done.
class TokenService::Impl::GetTokenCall {
 public:
  GetTokenCall(Impl& impl, grpc::ServerCompletionQueue* cq)
      : impl_(impl), cq_(cq), responder_(&ctx_) {
    impl_.RequestGetToken(&ctx_, &request_, &responder_, cq_, cq_, this);
  }

  // Advances the call on a CQ event; false when the call is over.
  bool Proceed(bool ok) {
    if (finishing_ || !ok) {
      return false;  // Finish completed, or the server is shutting down.
    }
    new GetTokenCall(impl_, cq_);  // keep a request armed for the next caller
    finishing_ = true;
    v1::GetTokenResponse response;
    const grpc::Status status = ServeGetToken(impl_.broker_, request_, &response);
    if (status.ok()) {
      responder_.Finish(response, status, this);
    } else {
      responder_.FinishWithError(status, this);
    }
    return true;
  }

 private:
  Impl& impl_;
  grpc::ServerCompletionQueue* const cq_;
  grpc::ServerContext ctx_;
  v1::GetTokenRequest request_;
  grpc::ServerAsyncResponseWriter<v1::GetTokenResponse> responder_;
  bool finishing_ = false;
};

void TokenService::Impl::Start() {
  for (auto& cq : cqs_) {
    for (int i = 0; i < kPendingCallsPerQueue; ++i) {
      new GetTokenCall(*this, cq.get());  // owned by the CQ loop from here on
    }
    threads_.emplace_back([this, q = cq.get()] { Drive(q); });
  }
}

void TokenService::Impl::Drive(grpc::ServerCompletionQueue* cq) {
  void* tag = nullptr;
  bool ok = false;
  while (cq->Next(&tag, &ok)) {
    auto* call = static_cast<GetTokenCall*>(tag);
    if (!call->Proceed(ok)) {
      std::unique_ptr<GetTokenCall> done(call);
    }
  }
}

// WatchToken: the current token, then each new generation. Notifications come from the
// cache's writer threads; one write is in flight at a time and notifications that arrive
// meanwhile coalesce, so a slow reader only ever gets the latest generation. Decisions are made
// under mu_, gRPC calls (StartWrite, Finish) after releasing it, since the library may run
// reactions on other threads at once.
class TokenService::Impl::WatchReactor final
    : public grpc::ServerWriteReactor<v1::WatchTokenResponse> {
 public:
  WatchReactor(cache::ConnectionCache& cache, const oauth::Broker& broker, std::string id)
      : cache_(cache), broker_(broker), id_(std::move(id)) {}

  // Starts the stream: subscribes, then sends the current token (or ends with its error).
  static WatchReactor* Begin(std::shared_ptr<WatchReactor> self) {
    WatchReactor* raw = self.get();
    raw->self_ = self;
    if (absl::Status s = core::ValidateConnectionId(raw->id_); !s.ok()) {
      raw->End(ToGrpcStatus(s));
      return raw;
    }
    std::weak_ptr<WatchReactor> weak = self;
    raw->handle_ = raw->cache_.Subscribe(raw->id_, [weak](const cache::ConnectionCache::Entry&) {
      if (std::shared_ptr<WatchReactor> r = weak.lock()) {
        r->OnChange();
      }
    });
    raw->OnChange();
    return raw;
  }

  void OnWriteDone(bool ok) override {
    if (!ok) {
      End(grpc::Status(grpc::StatusCode::CANCELLED, "stream closed"));
      return;
    }
    {
      MutexLock lock(&mu_);
      writing_ = false;
    }
    OnChange();
  }

  void OnCancel() override { End(grpc::Status::CANCELLED); }

  void OnDone() override {
    if (handle_ != 0) {
      cache_.Unsubscribe(id_, handle_);
    }
    self_.reset();  // may destroy this reactor: nothing after this line
  }

 private:
  // Sends the current generation if it is newer than the last one sent, or ends the stream if
  // the connection stopped serving.
  void OnChange() {
    absl::StatusOr<oauth::TokenView> view = broker_.GetToken(id_);
    if (!view.ok()) {
      End(ToGrpcStatus(view.status()));
      return;
    }
    {
      MutexLock lock(&mu_);
      if (finished_ || writing_ || view->grant().generation <= last_sent_) {
        return;  // a write in flight re-checks when it completes
      }
      last_sent_ = view->grant().generation;
      writing_ = true;
      response_.Clear();
      ToProto(*view, response_.mutable_token());
    }
    spdlog::debug("WatchToken connection={} generation={} token={}", id_, view->grant().generation,
                  view->grant().access_token);
    StartWrite(&response_);
  }

  void End(const grpc::Status& status) {
    {
      MutexLock lock(&mu_);
      if (finished_) {
        return;
      }
      finished_ = true;
    }
    Finish(status);
  }

  cache::ConnectionCache& cache_;
  const oauth::Broker& broker_;
  const std::string id_;
  std::shared_ptr<WatchReactor> self_;  // keeps the reactor alive until OnDone
  uint64_t handle_ = 0;                 // set before any notification can arrive

  Mutex mu_;
  bool finished_ ABSL_GUARDED_BY(mu_) = false;
  bool writing_ ABSL_GUARDED_BY(mu_) = false;
  uint64_t last_sent_ ABSL_GUARDED_BY(mu_) = 0;
  // Owned by the write in flight while writing_ is true; written only when it is false.
  v1::WatchTokenResponse response_;
};

grpc::ServerWriteReactor<v1::WatchTokenResponse>* TokenService::Impl::WatchToken(
    grpc::CallbackServerContext*, const v1::WatchTokenRequest* req) {
  return WatchReactor::Begin(std::make_shared<WatchReactor>(cache_, broker_, req->connection_id()));
}

TokenService::TokenService(Deps deps, int cq_threads)
    : impl_(std::make_unique<Impl>(std::move(deps), cq_threads)) {}

TokenService::~TokenService() = default;

void TokenService::RegisterWith(grpc::ServerBuilder& builder) { impl_->RegisterWith(builder); }
void TokenService::Start() { impl_->Start(); }
void TokenService::Shutdown() { impl_->Shutdown(); }

}  // namespace tb::grpc_api
