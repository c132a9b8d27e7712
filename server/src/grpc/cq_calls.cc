#include "server/src/grpc/cq_calls.h"

#include <utility>

namespace tb::grpc_api::cq {

Queues::~Queues() { Shutdown(); }

void Queues::AddTo(grpc::ServerBuilder& builder, int count) {
  for (int i = 0; i < count; ++i) {
    cqs_.push_back(builder.AddCompletionQueue());
  }
}

void Queues::OnStart(std::function<void(grpc::ServerCompletionQueue*)> arm) {
  arms_.push_back(std::move(arm));
}

void Queues::Start() {
  for (const auto& cq : cqs_) {
    for (const auto& arm : arms_) {
      arm(cq.get());
    }
    threads_.emplace_back([q = cq.get()] { Drive(q); });
  }
}

void Queues::Shutdown() {
  if (shut_down_) {
    return;
  }
  shut_down_ = true;
  {
    MutexLock lock(&mu_);
    while (open_calls_ > 0) {
      idle_.Wait(&mu_);
    }
  }
  for (const auto& cq : cqs_) {
    cq->Shutdown();
  }
  if (threads_.empty()) {  // never started: nothing is armed, only the shutdown to take
    for (const auto& cq : cqs_) {
      Drive(cq.get());
    }
  }
  for (std::thread& t : threads_) {
    t.join();
  }
  threads_.clear();
}

void Queues::CallBegan() {
  MutexLock lock(&mu_);
  ++open_calls_;
}

void Queues::CallFinished() {
  bool idle = false;
  {
    MutexLock lock(&mu_);
    idle = --open_calls_ == 0;
  }
  if (idle) {
    idle_.SignalAll();
  }
}

void Queues::Drive(grpc::ServerCompletionQueue* cq) {
  void* tag = nullptr;
  bool ok = false;
  while (cq->Next(&tag, &ok)) {
    static_cast<Tag*>(tag)->Run(ok);
  }
}

}  // namespace tb::grpc_api::cq
