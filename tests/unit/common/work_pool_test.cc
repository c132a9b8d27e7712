#include "server/src/common/work_pool.h"

#include <atomic>

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

}  // namespace
}  // namespace tb
