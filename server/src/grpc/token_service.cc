#include "server/src/grpc/token_service.h"

#include <spdlog/spdlog.h>

#include <functional>
#include <optional>
#include <string>
#include <utility>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "server/src/common/logging.h"
#include "server/src/common/mutex.h"
#include "server/src/common/secret_format.h"
#include "server/src/core/connection.h"
#include "server/src/core/errors.h"
#include "server/src/grpc/caller_auth.h"
#include "server/src/grpc/rpc_metrics.h"
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

// The whole of GetToken's fast path: parse, one domain lookup, map. No I/O, no waiting, no
// allocation beyond the response. nullopt: the call must wait (the refresher completes it).
std::optional<grpc::Status> ServeGetToken(const oauth::Broker& broker,
                                          const v1::GetTokenRequest& req,
                                          v1::GetTokenResponse* resp, absl::Duration* min_ttl) {
  if (absl::Status s = core::ValidateConnectionId(req.connection_id()); !s.ok()) {
    return ToGrpcStatus(s);
  }
  absl::StatusOr<absl::Duration> ttl = ParseMinTtl(req);
  if (!ttl.ok()) {
    return ToGrpcStatus(ttl.status());
  }
  *min_ttl = *ttl;
  oauth::TokenLookup l = broker.Lookup(req.connection_id(), *ttl, req.min_generation());
  switch (l.kind) {
    case oauth::TokenLookup::Kind::kServe:
      break;
    case oauth::TokenLookup::Kind::kError:
      return ToGrpcStatus(l.error);
    case oauth::TokenLookup::Kind::kAwaitGeneration:
    case oauth::TokenLookup::Kind::kAwaitRefresh:
      return std::nullopt;
  }
  if (spdlog::should_log(spdlog::level::trace)) {
    spdlog::trace("GetToken connection={} generation={} token={}", req.connection_id(),
                  l.view.grant().generation, l.view.grant().access_token);
  }
  ToProto(l.view, resp->mutable_token());
  return grpc::Status::OK;
}

// The caller's x-request-id metadata, "" without one (ScopedRequestId keeps it if well-formed).
absl::string_view RequestIdOf(const grpc::ServerContextBase& ctx) {
  const auto& md = ctx.client_metadata();
  const auto it = md.find("x-request-id");
  return it == md.end() ? absl::string_view()
                        : absl::string_view(it->second.data(), it->second.size());
}

// Who opened a stream, for per-caller limits: the authenticated peer identity when there is
// one, else the peer's address without its port.
std::string CallerKey(const grpc::ServerContextBase* ctx) {
  if (std::shared_ptr<const grpc::AuthContext> auth = ctx->auth_context();
      auth != nullptr && auth->IsPeerAuthenticated()) {
    const std::vector<grpc::string_ref> ids = auth->GetPeerIdentity();
    if (!ids.empty()) {
      return absl::StrCat("id:", absl::string_view(ids[0].data(), ids[0].size()));
    }
  }
  std::string peer = ctx->peer();  // "ipv4:127.0.0.1:54321", "ipv6:[::1]:54321"
  if (const size_t colon = peer.rfind(':'); colon != std::string::npos && colon > 5) {
    peer.resize(colon);
  }
  return peer;
}

}  // namespace

class TokenService::Impl final {
 public:
  Impl(Deps deps, Options options)
      : broker_(deps.broker),
        cache_(deps.cache),
        refresher_(deps.refresher),
        run_blocking_(std::move(deps.run_blocking)),
        authorizer_(deps.authorizer),
        options_(options),
        get_token_metrics_(MethodMetrics(options.rpc_metrics, "GetToken")),
        refresh_metrics_(MethodMetrics(options.rpc_metrics, "Refresh")),
        revoke_metrics_(MethodMetrics(options.rpc_metrics, "Revoke")),
        watch_metrics_(MethodMetrics(options.rpc_metrics, "WatchToken")) {
    if (options.metrics != nullptr) {
      auto& cache = options.metrics->AddCounterFamily(
          "tb_token_cache_total",
          "GetToken calls answered from memory at once (hit) or after a wait (miss).", {"result"});
      cache_hits_ = &cache.WithLabels({"hit"});
      cache_misses_ = &cache.WithLabels({"miss"});
    }
  }

  void RegisterWith(grpc::ServerBuilder& builder, cq::Queues& queues);

  void Shutdown() {
    EndStreams();
    AnswerWaitingCalls();
  }

  // Refresh: joins (or starts) the connection's single refresh flight and answers from its
  // completion; nothing blocks a gRPC thread. A caller whose deadline passes gets
  // DEADLINE_EXCEEDED from gRPC while the flight goes on.
  void Refresh(grpc::ServerContext* ctx, const v1::RefreshRequest* req, v1::RefreshResponse* resp,
               cq::UnaryReply* r) {
    const ScopedRequestId request(RequestIdOf(*ctx));
    if (absl::StatusOr<std::shared_ptr<const auth::Caller>> caller = Authorize(
            *ctx, authorizer_, auth::Permission::kRefresh, "Refresh", req->connection_id());
        !caller.ok()) {
      r->Finish(ToGrpcStatus(caller.status()));
      return;
    }
    if (absl::Status s = core::ValidateConnectionId(req->connection_id()); !s.ok()) {
      r->Finish(ToGrpcStatus(s));
      return;
    }
    refresher_.Refresh(req->connection_id(), req->if_generation(),
                       [this, r, resp, start = absl::Now()](absl::StatusOr<oauth::TokenView> v) {
                         RpcMetrics::Record(refresh_metrics_, v.status().code(),
                                            absl::Now() - start);
                         if (!v.ok()) {
                           r->Finish(ToGrpcStatus(v.status()));
                           return;
                         }
                         ToProto(*v, resp->mutable_token());
                         r->Finish(grpc::Status::OK);
                       });
  }

  // Revoke: stops serving at once, then revokes at the provider, on the work pool.
  void Revoke(grpc::ServerContext* ctx, const v1::RevokeRequest* req, v1::RevokeResponse* resp,
              cq::UnaryReply* r) {
    const ScopedRequestId request(RequestIdOf(*ctx));
    absl::StatusOr<std::shared_ptr<const auth::Caller>> caller =
        Authorize(*ctx, authorizer_, auth::Permission::kRevoke, "Revoke", req->connection_id());
    if (!caller.ok()) {
      r->Finish(ToGrpcStatus(caller.status()));
      return;
    }
    if (absl::Status s = core::ValidateConnectionId(req->connection_id()); !s.ok()) {
      r->Finish(ToGrpcStatus(s));
      return;
    }
    // Answered from the refresher's thread: the request id goes along for the lines it logs.
    auto done = [this, r, resp, id = req->connection_id(), who = (*caller)->name,
                 start = absl::Now()](absl::StatusOr<bool> confirmed) {
      RpcMetrics::Record(revoke_metrics_, confirmed.status().code(), absl::Now() - start);
      spdlog::info("Revoke connection={} code={} provider_confirmed={}", id,
                   absl::StatusCodeToString(confirmed.status().code()),
                   confirmed.ok() && *confirmed);
      Audit("revoke", {{"caller", who},
                       {"connection", id},
                       {"outcome", absl::StatusCodeToString(confirmed.status().code())},
                       {"provider_confirmed", confirmed.ok() && *confirmed ? "true" : "false"}});
      if (!confirmed.ok()) {
        r->Finish(ToGrpcStatus(confirmed.status()));
        return;
      }
      resp->set_provider_confirmed(*confirmed);
      r->Finish(grpc::Status::OK);
    };
    refresher_.Revoke(req->connection_id(), WithCurrentRequestId(std::move(done)));
  }

  cq::WriteReactor<v1::WatchTokenResponse>* WatchToken(
      grpc::ServerContext* ctx, const v1::WatchTokenRequest* req,
      cq::ServerStream<v1::WatchTokenResponse>* stream);

 private:
  class GetTokenCall;
  class WatchReactor;

  // GetToken calls that wait: registered with the refresher, answered from its callback.
  void Wait(GetTokenCall* call, absl::Duration min_ttl) ABSL_LOCKS_EXCLUDED(wait_mu_);
  void CompleteWait(GetTokenCall* call, absl::StatusOr<oauth::TokenView> result)
      ABSL_LOCKS_EXCLUDED(wait_mu_);
  // At shutdown: every waiting call gets an answer before the completion queues close.
  void AnswerWaitingCalls() ABSL_LOCKS_EXCLUDED(wait_mu_);

  // Rules were reloaded: every open WatchToken stream checks its caller again.
  void RecheckStreams() ABSL_LOCKS_EXCLUDED(watch_mu_);
  // At shutdown: every open WatchToken stream ends, and new ones are refused.
  void EndStreams() ABSL_LOCKS_EXCLUDED(watch_mu_);
  std::vector<std::shared_ptr<WatchReactor>> OpenStreams() ABSL_LOCKS_EXCLUDED(watch_mu_);

  // WatchToken stream accounting and registration, in one critical section (so that a stream
  // is either refused or seen by EndStreams). Not OK: refused, with the status to end it with.
  grpc::Status AcquireStream(const std::string& caller, const std::shared_ptr<WatchReactor>& r)
      ABSL_LOCKS_EXCLUDED(watch_mu_);
  void ReleaseStream(const std::string& caller) ABSL_LOCKS_EXCLUDED(watch_mu_);

  oauth::Broker& broker_;
  cache::ConnectionCache& cache_;
  oauth::Refresher& refresher_;
  const RunBlocking run_blocking_;
  auth::Authorizer& authorizer_;
  const Options options_;
  v1::TokenBroker::AsyncService service_;
  cq::Queues* queues_ = nullptr;  // set by RegisterWith; GetTokenCall counts itself there
  cq::UnaryMethod<v1::TokenBroker::AsyncService, v1::RefreshRequest, v1::RefreshResponse>
      refresh_method_;
  cq::UnaryMethod<v1::TokenBroker::AsyncService, v1::RevokeRequest, v1::RevokeResponse>
      revoke_method_;
  cq::StreamMethod<v1::TokenBroker::AsyncService, v1::WatchTokenRequest, v1::WatchTokenResponse>
      watch_method_;

  static RpcMetrics::Method* MethodMetrics(RpcMetrics* m, const std::string& name) {
    return m == nullptr ? nullptr : m->For(name);
  }

  RpcMetrics::Method* const get_token_metrics_;
  RpcMetrics::Method* const refresh_metrics_;
  RpcMetrics::Method* const revoke_metrics_;
  RpcMetrics::Method* const watch_metrics_;
  metrics::Counter* cache_hits_ = nullptr;
  metrics::Counter* cache_misses_ = nullptr;

  Mutex wait_mu_;
  CondVar wait_cv_;
  // Waiting call -> its refresher handle (0 until AwaitToken returned).
  absl::flat_hash_map<GetTokenCall*, uint64_t> waiting_calls_ ABSL_GUARDED_BY(wait_mu_);
  int completing_ ABSL_GUARDED_BY(wait_mu_) = 0;  // answers being sent right now
  bool shutting_down_ ABSL_GUARDED_BY(wait_mu_) = false;

  Mutex watch_mu_;
  bool streams_ended_ ABSL_GUARDED_BY(watch_mu_) = false;
  size_t watch_streams_ ABSL_GUARDED_BY(watch_mu_) = 0;
  absl::flat_hash_map<std::string, size_t> watch_streams_by_caller_ ABSL_GUARDED_BY(watch_mu_);
  absl::flat_hash_map<WatchReactor*, std::weak_ptr<WatchReactor>> watches_
      ABSL_GUARDED_BY(watch_mu_);
};

// A GetToken in flight: requested -> (waiting ->) finishing -> done. Not a cq::UnaryCall: its
// own class keeps the hot path free of std::function and of the open-call count (a GetToken
// that waits is answered by AnswerWaitingCalls at shutdown instead).
//
// Lifetime: the CQ thread owns the call and deletes it when its Finish tag comes back. Each CQ
// has exactly one thread, so that tag cannot be processed while Run() still runs on it: a call
// that starts waiting inside Run() may be answered from another thread at once, and Run()
// touches nothing of it afterwards.
class TokenService::Impl::GetTokenCall final : public cq::Tag {
 public:
  GetTokenCall(Impl& impl, grpc::ServerCompletionQueue* cq)
      : impl_(impl), cq_(cq), responder_(&ctx_) {
    impl_.queues_->CallArmed();
    impl_.service_.RequestGetToken(&ctx_, &request_, &responder_, cq_, cq_, this);
  }

  void Run(bool ok) override {
    if (finishing_ || !ok) {
      cq::Queues* const queues = impl_.queues_;
      delete this;  // Finish completed, or the server is shutting down.
      queues->CallDeleted();
      return;
    }
    new GetTokenCall(impl_, cq_);  // keep a request armed for the next caller
    finishing_ = true;
    start_ = absl::Now();
    const ScopedRequestId request(RequestIdOf(ctx_));
    if (absl::StatusOr<std::shared_ptr<const auth::Caller>> caller =
            Authorize(ctx_, impl_.authorizer_, auth::Permission::kGetToken, "GetToken",
                      request_.connection_id());
        !caller.ok()) {
      Finish(ToGrpcStatus(caller.status()));
      return;
    }
    absl::Duration min_ttl;
    if (std::optional<grpc::Status> status =
            ServeGetToken(impl_.broker_, request_, &response_, &min_ttl)) {
      if (status->ok() && impl_.cache_hits_ != nullptr) {
        impl_.cache_hits_->Increment();
      }
      Finish(*status);
      return;
    }
    if (impl_.cache_misses_ != nullptr) {
      impl_.cache_misses_->Increment();
    }
    impl_.Wait(this, min_ttl);  // answered later, from the refresher's callback
  }

  void Finish(const grpc::Status& status) {
    const auto code = static_cast<absl::StatusCode>(status.error_code());
    RpcMetrics::Record(impl_.get_token_metrics_, code, absl::Now() - start_);
    if (!status.ok() && spdlog::should_log(spdlog::level::debug)) {
      // A caller's id is printed only once it is known to be well-formed: a newline in it
      // would forge a line of the text format.
      const std::string& id = request_.connection_id();
      spdlog::debug("GetToken failed connection={} code={} message={}",
                    core::ValidateConnectionId(id).ok() ? id : "(not a valid id)",
                    absl::StatusCodeToString(code), status.error_message());
    }
    if (status.ok()) {
      responder_.Finish(response_, status, this);
    } else {
      responder_.FinishWithError(status, this);
    }
  }

  const v1::GetTokenRequest& request() const { return request_; }
  absl::Time deadline() const { return absl::FromChrono(ctx_.deadline()); }
  v1::GetTokenResponse& response() { return response_; }

 private:
  Impl& impl_;
  grpc::ServerCompletionQueue* const cq_;
  grpc::ServerContext ctx_;
  v1::GetTokenRequest request_;
  v1::GetTokenResponse response_;
  grpc::ServerAsyncResponseWriter<v1::GetTokenResponse> responder_;
  bool finishing_ = false;
  absl::Time start_;
};

void TokenService::Impl::Wait(GetTokenCall* call, absl::Duration min_ttl) {
  bool shutting_down = false;
  {
    MutexLock lock(&wait_mu_);
    shutting_down = shutting_down_;
    if (!shutting_down) {
      waiting_calls_.emplace(call, 0);
    }
  }
  if (shutting_down) {
    call->Finish(grpc::Status(grpc::StatusCode::UNAVAILABLE, "the broker is shutting down"));
    return;
  }
  const v1::GetTokenRequest& req = call->request();
  const uint64_t handle = refresher_.AwaitToken(
      req.connection_id(), min_ttl, req.min_generation(), call->deadline(),
      [this, call](absl::StatusOr<oauth::TokenView> r) { CompleteWait(call, std::move(r)); });
  MutexLock lock(&wait_mu_);
  if (const auto it = waiting_calls_.find(call); it != waiting_calls_.end()) {
    it->second = handle;
  }
}

void TokenService::Impl::CompleteWait(GetTokenCall* call, absl::StatusOr<oauth::TokenView> result) {
  {
    MutexLock lock(&wait_mu_);
    // Unregistered before Finish: once answered, the call may be deleted and its address reused.
    waiting_calls_.erase(call);
    ++completing_;
  }
  grpc::Status status = grpc::Status::OK;
  if (result.ok()) {
    ToProto(*result, call->response().mutable_token());
  } else {
    status = ToGrpcStatus(result.status());
  }
  call->Finish(status);
  MutexLock lock(&wait_mu_);
  --completing_;
  wait_cv_.SignalAll();  // under the lock: AnswerWaitingCalls may return as soon as it sees 0
}

void TokenService::Impl::AnswerWaitingCalls() {
  for (;;) {
    std::vector<std::pair<GetTokenCall*, uint64_t>> calls;
    {
      MutexLock lock(&wait_mu_);
      shutting_down_ = true;
      if (waiting_calls_.empty() && completing_ == 0) {
        return;
      }
      calls.assign(waiting_calls_.begin(), waiting_calls_.end());
    }
    for (const auto& [call, handle] : calls) {
      // handle 0: AwaitToken has not returned yet; look again shortly. Not cancelled: the
      // callback is answering it right now. Cancelled: its callback will never run, so the
      // answer is ours to send.
      if (handle == 0 || !refresher_.CancelWait(handle)) {
        continue;
      }
      bool mine = false;
      {
        MutexLock lock(&wait_mu_);
        mine = waiting_calls_.erase(call) > 0;
        if (mine) {
          ++completing_;
        }
      }
      if (mine) {
        call->Finish(grpc::Status(grpc::StatusCode::UNAVAILABLE, "the broker is shutting down"));
        MutexLock lock(&wait_mu_);
        --completing_;
      }
    }
    MutexLock lock(&wait_mu_);
    if (!waiting_calls_.empty() || completing_ > 0) {
      wait_cv_.WaitFor(&wait_mu_, std::chrono::milliseconds(10));
    }
  }
}

grpc::Status TokenService::Impl::AcquireStream(const std::string& caller,
                                               const std::shared_ptr<WatchReactor>& r) {
  MutexLock lock(&watch_mu_);
  if (streams_ended_) {
    return grpc::Status(grpc::StatusCode::UNAVAILABLE, "the broker is shutting down");
  }
  size_t& mine = watch_streams_by_caller_[caller];
  if (watch_streams_ >= options_.max_watch_streams ||
      mine >= options_.max_watch_streams_per_caller) {
    if (mine == 0) {
      watch_streams_by_caller_.erase(caller);
    }
    spdlog::warn("WatchToken refused: stream limit reached caller={}", caller);
    return grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED,
                        "too many WatchToken streams open; close some or use fewer");
  }
  ++mine;
  ++watch_streams_;
  watches_.emplace(r.get(), r);
  return grpc::Status::OK;
}

void TokenService::Impl::ReleaseStream(const std::string& caller) {
  MutexLock lock(&watch_mu_);
  --watch_streams_;
  if (const auto it = watch_streams_by_caller_.find(caller);
      it != watch_streams_by_caller_.end() && --it->second == 0) {
    watch_streams_by_caller_.erase(it);
  }
}

void TokenService::Impl::RegisterWith(grpc::ServerBuilder& builder, cq::Queues& queues) {
  using S = v1::TokenBroker::AsyncService;
  queues_ = &queues;
  authorizer_.set_on_replace([this] { RecheckStreams(); });
  builder.RegisterService(&service_);
  refresh_method_ = {
      &service_, &S::RequestRefresh,
      [this](grpc::ServerContext* ctx, const v1::RefreshRequest* req, v1::RefreshResponse* resp,
             cq::UnaryReply* r) { Refresh(ctx, req, resp, r); },
      &queues};
  revoke_method_ = {
      &service_, &S::RequestRevoke,
      [this](grpc::ServerContext* ctx, const v1::RevokeRequest* req, v1::RevokeResponse* resp,
             cq::UnaryReply* r) { Revoke(ctx, req, resp, r); },
      &queues};
  watch_method_ = {&service_, &S::RequestWatchToken,
                   [this](grpc::ServerContext* ctx, const v1::WatchTokenRequest* req,
                          cq::ServerStream<v1::WatchTokenResponse>* stream) {
                     return WatchToken(ctx, req, stream);
                   },
                   &queues, 16};
  queues.OnStart([this](grpc::ServerCompletionQueue* q) {
    for (int i = 0; i < kPendingCallsPerQueue; ++i) {
      new GetTokenCall(*this, q);  // owned by the queue's thread from here on
    }
    cq::UnaryCall<S, v1::RefreshRequest, v1::RefreshResponse>::Arm(&refresh_method_, q);
    cq::UnaryCall<S, v1::RevokeRequest, v1::RevokeResponse>::Arm(&revoke_method_, q);
    cq::StreamCall<S, v1::WatchTokenRequest, v1::WatchTokenResponse>::Arm(&watch_method_, q);
  });
}

// WatchToken: the current token, then each new generation. Notifications come from the
// cache's writer threads; one write is in flight at a time and notifications that arrive
// meanwhile coalesce, so a slow reader only ever gets the latest generation. Decisions and the
// stream calls they lead to (StartWrite, Finish) are made under mu_, so that a write decided on
// a writer thread cannot start after another thread ended the stream (cq::WriteReactor never
// runs a reaction inline, so this cannot deadlock).
class TokenService::Impl::WatchReactor final : public cq::WriteReactor<v1::WatchTokenResponse> {
 public:
  // `release` runs once when the stream is over (the stream-limit accounting); empty: none.
  WatchReactor(cq::ServerStream<v1::WatchTokenResponse>* stream, cache::ConnectionCache& cache,
               const oauth::Broker& broker, std::string id, std::function<void()> release)
      : cq::WriteReactor<v1::WatchTokenResponse>(stream),
        cache_(cache),
        broker_(broker),
        id_(std::move(id)),
        request_id_(CurrentRequestId()),
        release_(std::move(release)) {}

  // Starts the stream: subscribes, then sends the current token (or ends with its error, or
  // with `refusal` when that is not OK).
  static WatchReactor* Begin(std::shared_ptr<WatchReactor> self, const grpc::Status& refusal) {
    WatchReactor* raw = self.get();
    raw->self_ = self;
    if (!refusal.ok()) {
      raw->End(refusal);
      return raw;
    }
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

  void SetIdentity(auth::Identity identity) { identity_ = std::move(identity); }
  void SetRelease(std::function<void()> release) { release_ = std::move(release); }

  // The rules changed: a caller that may no longer watch this connection is cut off.
  void Recheck(const auth::Authorizer& authorizer) {
    const ScopedRequestId request = ScopedRequestId::Resume(request_id_);
    absl::StatusOr<std::shared_ptr<const auth::Caller>> c = authorizer.Authenticate(identity_);
    absl::Status allowed =
        c.ok() ? auth::Authorizer::Authorize(**c, auth::Permission::kGetToken, id_) : c.status();
    if (!allowed.ok()) {
      Audit("permission_denied", {{"caller", c.ok() ? (*c)->name : std::string("unknown")},
                                  {"rpc", "WatchToken"},
                                  {"connection", id_},
                                  {"outcome", "stream ended: permission withdrawn"}});
      End(grpc::Status(grpc::StatusCode::PERMISSION_DENIED,
                       "permission to watch this connection was withdrawn"));
    }
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

  // Ends the stream with `status` unless it has ended already. Any thread.
  void End(const grpc::Status& status) {
    MutexLock lock(&mu_);
    if (finished_) {
      return;
    }
    finished_ = true;
    Finish(status);
  }

  void OnDone() override {
    if (handle_ != 0) {
      cache_.Unsubscribe(id_, handle_);
    }
    if (release_) {
      release_();
    }
    self_.reset();  // may destroy this reactor: nothing after this line
  }

 private:
  // Sends the current generation if it is newer than the last one sent, or ends the stream if
  // the connection stopped serving. A token past its valid_until (a refresh pending, retrying,
  // or held back by a provider that rejects our credentials) has not stopped serving: the
  // stream stays open and the refreshed generation follows.
  void OnChange() {
    const ScopedRequestId request = ScopedRequestId::Resume(request_id_);
    oauth::TokenLookup found = broker_.Lookup(id_, absl::ZeroDuration(), 0);
    if (found.kind == oauth::TokenLookup::Kind::kError) {
      End(ToGrpcStatus(found.error));
      return;
    }
    if (found.kind != oauth::TokenLookup::Kind::kServe) {
      return;  // awaiting its refresh: the next publish brings it
    }
    const oauth::TokenView& view = found.view;
    MutexLock lock(&mu_);
    if (finished_ || writing_ || view.grant().generation <= last_sent_) {
      return;  // a write in flight re-checks when it completes
    }
    last_sent_ = view.grant().generation;
    writing_ = true;
    response_.Clear();
    ToProto(view, response_.mutable_token());
    spdlog::debug("WatchToken connection={} generation={} token={}", id_, view.grant().generation,
                  view.grant().access_token);
    StartWrite(&response_);
  }

  cache::ConnectionCache& cache_;
  const oauth::Broker& broker_;
  const std::string id_;
  const std::string request_id_;        // of the WatchToken call, for the stream's log lines
  std::function<void()> release_;       // set before Begin
  auth::Identity identity_;             // set before Begin; what the caller presented
  std::shared_ptr<WatchReactor> self_;  // keeps the reactor alive until OnDone
  uint64_t handle_ = 0;                 // set before any notification can arrive

  Mutex mu_;
  bool finished_ ABSL_GUARDED_BY(mu_) = false;
  bool writing_ ABSL_GUARDED_BY(mu_) = false;
  uint64_t last_sent_ ABSL_GUARDED_BY(mu_) = 0;
  // Owned by the write in flight while writing_ is true; written only when it is false.
  v1::WatchTokenResponse response_ ABSL_GUARDED_BY(mu_);
};

cq::WriteReactor<v1::WatchTokenResponse>* TokenService::Impl::WatchToken(
    grpc::ServerContext* ctx, const v1::WatchTokenRequest* req,
    cq::ServerStream<v1::WatchTokenResponse>* stream) {
  const ScopedRequestId request(RequestIdOf(*ctx));
  absl::StatusOr<std::shared_ptr<const auth::Caller>> who =
      Authorize(*ctx, authorizer_, auth::Permission::kGetToken, "WatchToken", req->connection_id());
  if (watch_metrics_ != nullptr) {
    watch_metrics_->codes.Increment(who.status().code());  // streams opened or refused
  }
  if (!who.ok()) {
    return WatchReactor::Begin(
        std::make_shared<WatchReactor>(stream, cache_, broker_, req->connection_id(), nullptr),
        ToGrpcStatus(who.status()));
  }
  // Limits are per authenticated caller; in insecure mode everyone is the same caller, so the
  // peer's address stands in.
  std::string caller = authorizer_.allows_all() ? CallerKey(ctx) : (*who)->name;
  auto reactor =
      std::make_shared<WatchReactor>(stream, cache_, broker_, req->connection_id(), nullptr);
  if (grpc::Status refused = AcquireStream(caller, reactor); !refused.ok()) {
    return WatchReactor::Begin(std::move(reactor), refused);
  }
  WatchReactor* raw = reactor.get();
  reactor->SetIdentity(IdentityOf(*ctx));
  // EndStreams may already have ended it: the stream's reactions run on this CQ thread after
  // this handler returns, so the release is in place before OnDone.
  reactor->SetRelease([this, raw, caller = std::move(caller)] {
    {
      MutexLock lock(&watch_mu_);
      watches_.erase(raw);
    }
    ReleaseStream(caller);
  });
  return WatchReactor::Begin(std::move(reactor), grpc::Status::OK);
}

std::vector<std::shared_ptr<TokenService::Impl::WatchReactor>> TokenService::Impl::OpenStreams() {
  std::vector<std::shared_ptr<WatchReactor>> open;
  MutexLock lock(&watch_mu_);
  for (const auto& [raw, weak] : watches_) {
    if (std::shared_ptr<WatchReactor> r = weak.lock()) {
      open.push_back(std::move(r));
    }
  }
  return open;
}

void TokenService::Impl::RecheckStreams() {
  for (const std::shared_ptr<WatchReactor>& r : OpenStreams()) {
    r->Recheck(authorizer_);
  }
}

void TokenService::Impl::EndStreams() {
  {
    MutexLock lock(&watch_mu_);
    streams_ended_ = true;  // from here on AcquireStream refuses, so the list below is complete
  }
  for (const std::shared_ptr<WatchReactor>& r : OpenStreams()) {
    r->End(grpc::Status(grpc::StatusCode::UNAVAILABLE, "the broker is shutting down"));
  }
}

TokenService::TokenService(Deps deps, Options options)
    : impl_(std::make_unique<Impl>(std::move(deps), options)) {}

TokenService::~TokenService() = default;

void TokenService::RegisterWith(grpc::ServerBuilder& builder, cq::Queues& queues) {
  impl_->RegisterWith(builder, queues);
}
void TokenService::Shutdown() { impl_->Shutdown(); }

}  // namespace tb::grpc_api
