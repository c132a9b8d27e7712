#include "server/src/common/work_pool.h"

#include <pthread.h>

#include <utility>

namespace tb {

WorkPool::WorkPool(int threads, std::string name) : name_(std::move(name)) {
  for (int i = 0; i < std::max(threads, 1); ++i) {
    threads_.emplace_back([this] {
      // Named, so that `top -H` and /proc/<pid>/task/*/comm show the pool (at most 15 bytes).
      pthread_setname_np(pthread_self(), name_.substr(0, 15).c_str());
      Run();
    });
  }
}

WorkPool::~WorkPool() { Stop(); }

bool WorkPool::Post(std::function<void()> task) {
  {
    MutexLock lock(&mu_);
    if (stopping_) {
      return false;
    }
    queue_.push_back(std::move(task));
  }
  work_.Signal();
  return true;
}

void WorkPool::Drain() {
  MutexLock lock(&mu_);
  while (!queue_.empty() || running_ > 0) {
    idle_.Wait(&mu_);
  }
}

void WorkPool::Stop() {
  {
    MutexLock lock(&mu_);
    stopping_ = true;
  }
  work_.SignalAll();
  for (std::thread& t : threads_) {
    if (t.joinable()) {
      t.join();
    }
  }
}

void WorkPool::Run() {
  for (;;) {
    std::function<void()> task;
    {
      MutexLock lock(&mu_);
      while (queue_.empty() && !stopping_) {
        work_.Wait(&mu_);
      }
      if (queue_.empty()) {
        return;  // stopping and drained
      }
      task = std::move(queue_.front());
      queue_.pop_front();
      ++running_;
    }
    task();
    bool idle;
    {
      MutexLock lock(&mu_);
      idle = --running_ == 0 && queue_.empty();
    }
    if (idle) {
      idle_.SignalAll();  // for Drain()
    }
  }
}

}  // namespace tb
