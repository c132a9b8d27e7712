#include "server/src/grpc/cq_calls.h"

#include <pthread.h>

#include <string>
#include <utility>

#include "absl/time/clock.h"

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
    std::string name = name_ + "-" + std::to_string(threads_.size());
    threads_.emplace_back([q = cq.get(), name = std::move(name), every = look_every_] {
      pthread_setname_np(pthread_self(), name.substr(0, 15).c_str());
      if (every == absl::ZeroDuration()) {
        Drive(q);
      } else {
        Look(q, every);
      }
    });
  }
}

void Queues::Shutdown() {
  if (shut_down_) {
    return;
  }
  shut_down_ = true;
  {
    MutexLock lock(&mu_);
    while (calls_ > 0) {
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

void Queues::CallArmed() {
  MutexLock lock(&mu_);
  ++calls_;
}

void Queues::CallDeleted() {
  MutexLock lock(&mu_);
  if (--calls_ == 0) {
    idle_.SignalAll();  // under the lock: Shutdown may free this object as soon as it sees 0
  }
}

void Queues::Drive(grpc::ServerCompletionQueue* cq) {
  void* tag = nullptr;
  bool ok = false;
  while (cq->Next(&tag, &ok)) {
    static_cast<Tag*>(tag)->Run(ok);
  }
}

void Queues::Look(grpc::ServerCompletionQueue* cq, absl::Duration every) {
  void* tag = nullptr;
  bool ok = false;
  for (;;) {
    // A deadline already past: take what is there, never wait for more inside gRPC.
    switch (cq->AsyncNext(&tag, &ok, gpr_time_0(GPR_CLOCK_MONOTONIC))) {
      case grpc::CompletionQueue::GOT_EVENT:
        static_cast<Tag*>(tag)->Run(ok);
        break;
      case grpc::CompletionQueue::TIMEOUT:
        absl::SleepFor(every);
        break;
      case grpc::CompletionQueue::SHUTDOWN:
        return;
    }
  }
}

}  // namespace tb::grpc_api::cq
