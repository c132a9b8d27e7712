#include "server/src/grpc/health_service.h"

#include <memory>
#include <utility>
#include <vector>

namespace tb::grpc_api {

using grpc::health::v1::HealthCheckRequest;
using grpc::health::v1::HealthCheckResponse;

// One Watch stream: sends the status, then every change; one write in flight at a time, with
// changes arriving meanwhile coalesced into the next write. StartWrite and Finish are called
// under mu_, so that a write decided on one thread cannot start after another ended the stream.
class HealthService::WatchReactor final : public cq::WriteReactor<HealthCheckResponse> {
 public:
  WatchReactor(HealthService& health, std::string service,
               cq::ServerStream<HealthCheckResponse>* stream)
      : cq::WriteReactor<HealthCheckResponse>(stream),
        health_(health),
        service_(std::move(service)) {}

  static WatchReactor* Begin(std::shared_ptr<WatchReactor> self) {
    WatchReactor* raw = self.get();
    raw->self_ = self;
    bool shut_down = false;
    {
      MutexLock lock(&raw->health_.mu_);
      shut_down = raw->health_.shut_down_;
      if (!shut_down) {
        raw->handle_ = raw->health_.next_watcher_++;
        raw->health_.watchers_.emplace(raw->handle_, self);
      }
    }
    if (shut_down) {
      raw->End(grpc::Status(grpc::StatusCode::UNAVAILABLE, "server shutting down"));
    } else {
      raw->Pump();
    }
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
    Pump();
  }

  void OnCancel() override { End(grpc::Status::CANCELLED); }

  void OnDone() override {
    {
      MutexLock lock(&health_.mu_);
      health_.watchers_.erase(handle_);
    }
    self_.reset();  // may destroy this reactor: nothing after this line
  }

  void End(const grpc::Status& status) {
    MutexLock lock(&mu_);
    if (finished_) {
      return;
    }
    finished_ = true;
    Finish(status);
  }

  void Pump() {
    Status status;
    {
      MutexLock lock(&health_.mu_);
      status = health_.StatusOf(service_);
    }
    if (status == HealthCheckResponse::UNKNOWN) {
      status = HealthCheckResponse::SERVICE_UNKNOWN;
    }
    MutexLock lock(&mu_);
    if (finished_ || writing_ || (sent_any_ && status == last_sent_)) {
      return;
    }
    sent_any_ = true;
    last_sent_ = status;
    writing_ = true;
    response_.set_status(status);
    StartWrite(&response_);
  }

 private:
  HealthService& health_;
  const std::string service_;
  std::shared_ptr<WatchReactor> self_;
  uint64_t handle_ = 0;

  Mutex mu_;
  bool finished_ ABSL_GUARDED_BY(mu_) = false;
  bool writing_ ABSL_GUARDED_BY(mu_) = false;
  bool sent_any_ ABSL_GUARDED_BY(mu_) = false;
  Status last_sent_ ABSL_GUARDED_BY(mu_) = HealthCheckResponse::UNKNOWN;
  HealthCheckResponse response_ ABSL_GUARDED_BY(mu_);  // the write in flight's while writing_
};

HealthService::~HealthService() { Shutdown(); }

HealthService::Status HealthService::StatusOf(const std::string& service) const {
  const auto it = serving_.find(service);
  if (it == serving_.end()) {
    return HealthCheckResponse::UNKNOWN;
  }
  return it->second ? HealthCheckResponse::SERVING : HealthCheckResponse::NOT_SERVING;
}

std::vector<std::shared_ptr<HealthService::WatchReactor>> HealthService::Watchers() const {
  std::vector<std::shared_ptr<WatchReactor>> out;
  for (const auto& [handle, weak] : watchers_) {
    if (std::shared_ptr<WatchReactor> r = weak.lock()) {
      out.push_back(std::move(r));
    }
  }
  return out;
}

void HealthService::SetServing(const std::string& service, bool serving) {
  std::vector<std::shared_ptr<WatchReactor>> notify;
  {
    MutexLock lock(&mu_);
    serving_[service] = serving;
    notify = Watchers();
  }
  for (const auto& r : notify) {
    r->Pump();
  }
}

void HealthService::Shutdown() {
  std::vector<std::shared_ptr<WatchReactor>> notify;
  {
    MutexLock lock(&mu_);
    shut_down_ = true;
    notify = Watchers();
  }
  for (const auto& r : notify) {
    r->End(grpc::Status(grpc::StatusCode::UNAVAILABLE, "server shutting down"));
  }
}

void HealthService::RegisterWith(grpc::ServerBuilder& builder, cq::Queues& queues) {
  auto ep = std::make_unique<Endpoint>();
  ep->check = {&ep->service, &AsyncService::RequestCheck,
               [this](grpc::ServerContext*, const Request* req, Response* resp,
                      cq::UnaryReply* reply) { Check(*req, resp, reply); },
               &queues};
  ep->watch = {&ep->service, &AsyncService::RequestWatch,
               [this](grpc::ServerContext*, const Request* req,
                      cq::ServerStream<Response>* stream) { return Watch(*req, stream); },
               &queues, 2};
  builder.RegisterService(&ep->service);
  queues.OnStart([e = ep.get()](grpc::ServerCompletionQueue* q) {
    cq::UnaryCall<AsyncService, Request, Response>::Arm(&e->check, q);
    cq::StreamCall<AsyncService, Request, Response>::Arm(&e->watch, q);
  });
  endpoints_.push_back(std::move(ep));
}

void HealthService::Check(const Request& req, Response* resp, cq::UnaryReply* reply) {
  Status status;
  {
    MutexLock lock(&mu_);
    status = StatusOf(req.service());
  }
  if (status == HealthCheckResponse::UNKNOWN) {
    reply->Finish(grpc::Status(grpc::StatusCode::NOT_FOUND, "unknown service"));
  } else {
    resp->set_status(status);
    reply->Finish(grpc::Status::OK);
  }
}

cq::WriteReactor<HealthCheckResponse>* HealthService::Watch(const Request& req,
                                                            cq::ServerStream<Response>* stream) {
  return WatchReactor::Begin(std::make_shared<WatchReactor>(*this, req.service(), stream));
}

}  // namespace tb::grpc_api
