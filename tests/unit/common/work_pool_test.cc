#include "server/src/common/work_pool.h"

#include <atomic>
#include <filesystem>
#include <fstream>
#include <string>

#include "absl/strings/numbers.h"
#include "gtest/gtest.h"

namespace tb {
namespace {

TEST(WorkPoolTest, RunsEveryTaskBeforeStopReturns) {
  std::atomic<int> ran{0};
  WorkPool pool(3);
  for (int i = 0; i < 1000; ++i) {
    ASSERT_TRUE(pool.Post([&ran] { ran.fetch_add(1); }));
  }
  pool.Stop();
  EXPECT_EQ(ran.load(), 1000);
  EXPECT_FALSE(pool.Post([] {}));
}

TEST(WorkPoolTest, DrainWaitsForQueuedTasksAndTheirChildrenAndKeepsThePoolRunning) {
  std::atomic<int> ran{0};
  WorkPool pool(2);
  for (int i = 0; i < 100; ++i) {
    pool.Post([&] {
      ran.fetch_add(1);
      pool.Post([&ran] { ran.fetch_add(1); });  // queued while draining: waited for too
    });
  }
  pool.Drain();
  EXPECT_EQ(ran.load(), 200);
  ASSERT_TRUE(pool.Post([&ran] { ran.fetch_add(1); }));
  pool.Drain();
  EXPECT_EQ(ran.load(), 201);
}

TEST(WorkPoolTest, TasksRunOffTheCallersThread) {
  const std::thread::id caller = std::this_thread::get_id();
  std::atomic<bool> other{false};
  {
    WorkPool pool(1);
    pool.Post([&] { other = std::this_thread::get_id() != caller; });
  }
  EXPECT_TRUE(other.load());
}

// The times this process's threads named `name` went to sleep and were woken, from
// /proc/self/task/*/status (voluntary_ctxt_switches).
int64_t SleepsOfThreadsNamed(const std::string& name) {
  int64_t sleeps = 0;
  for (const auto& task : std::filesystem::directory_iterator("/proc/self/task")) {
    std::ifstream comm(task.path() / "comm");
    std::string task_name;
    std::getline(comm, task_name);
    if (task_name != name) {
      continue;
    }
    std::ifstream status(task.path() / "status");
    for (std::string line; std::getline(status, line);) {
      int64_t n = 0;
      if (line.rfind("voluntary_ctxt_switches:", 0) == 0 &&
          absl::SimpleAtoi(line.substr(line.find(':') + 1), &n)) {
        sleeps += n;
      }
    }
  }
  return sleeps;
}

TEST(WorkPoolTest, APostWakesOneIdleThreadNotTheWholePool) {
  constexpr int kThreads = 16;
  constexpr int kTasks = 200;
  WorkPool pool(kThreads, "wp-wake-test");
  // A thread that has not reached its first wait yet adds one sleep: kThreads at most.
  const int64_t before = SleepsOfThreadsNamed("wp-wake-test");
  for (int i = 0; i < kTasks; ++i) {
    ASSERT_TRUE(pool.Post([] {}));
    pool.Drain();  // one task at a time
  }
  const int64_t sleeps = SleepsOfThreadsNamed("wp-wake-test") - before;
  // One task at a time on an idle pool: one thread wakes for each and sleeps again, about
  // kTasks sleeps in all. Waking all 16 for every task (and again when each ends) would be
  // about 16 to 32 times as many.
  EXPECT_LT(sleeps, 3 * kTasks) << "the pool's threads slept " << sleeps << " times for " << kTasks
                                << " tasks run one at a time";
}

}  // namespace
}  // namespace tb
