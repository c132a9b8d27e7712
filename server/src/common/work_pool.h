#ifndef TB_COMMON_WORK_POOL_H_
#define TB_COMMON_WORK_POOL_H_

#include <algorithm>
#include <deque>
#include <functional>
#include <string>
#include <thread>
#include <vector>

#include "server/src/common/mutex.h"

namespace tb {

// Runs a task off the calling thread (a WorkPool's Post, or inline in tests).
using RunBlocking = std::function<void(std::function<void()>)>;

// The `work` executor (STYLE.md, threading rule): a fixed set of threads for blocking domain
// calls (provider exchanges, store writes) that start on io or gRPC threads, which must never
// block. Hand-written because Abseil has no public thread pool and the domain must not link
// Asio for asio::thread_pool.
//
// Thread-safe. Stop() (or the destructor) runs every queued task, then joins. Its threads are
// named `name` (the first 15 bytes).
class WorkPool {
 public:
  explicit WorkPool(int threads, std::string name = "work");
  ~WorkPool();
  WorkPool(const WorkPool&) = delete;
  WorkPool& operator=(const WorkPool&) = delete;

  // Queues `task`. Returns false (and drops it) once Stop() has begun.
  bool Post(std::function<void()> task) ABSL_LOCKS_EXCLUDED(mu_);
  // Blocks until every task queued so far, and every task those queue meanwhile, has run.
  // The pool keeps running. Not from a pool thread.
  void Drain() ABSL_LOCKS_EXCLUDED(mu_);
  void Stop() ABSL_LOCKS_EXCLUDED(mu_);

 private:
  void Run() ABSL_LOCKS_EXCLUDED(mu_);

  const std::string name_;
  Mutex mu_;
  // Two conditions, so that neither wakes the other's waiters: a Post wakes one idle worker,
  // not the whole pool (waking all 20 for every task, and again when it ended, cost the broker
  // about a sixth of its CPU per refresh at 2 000 refreshes a second), and Drain() waits for
  // the pool to go idle without the workers waking for every task that ends.
  CondVar work_;  // signalled when a task is queued or Stop() begins
  CondVar idle_;  // signalled when the queue is empty and no task is running
  std::deque<std::function<void()>> queue_ ABSL_GUARDED_BY(mu_);
  int running_ ABSL_GUARDED_BY(mu_) = 0;  // tasks being run right now
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::vector<std::thread> threads_;  // joined by Stop(), which only the owner calls
};

}  // namespace tb

#endif  // TB_COMMON_WORK_POOL_H_
