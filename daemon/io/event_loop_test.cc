#include "daemon/io/event_loop.h"

#include <gtest/gtest.h>

#include <future>
#include <vector>

namespace kvmid {
namespace {

// A quiet task waits for the loop's next wake-up, and keeps its place among posted tasks.
TEST(EventLoopTest, AQuietTaskRunsAtTheNextWakeUpInPostingOrder) {
  EventLoop loop;
  loop.Start("test-loop");
  Mutex mutex;
  std::vector<int> order;
  auto record = [&](int n) {
    MutexLock lock(&mutex);
    order.push_back(n);
  };
  loop.PostQuietly([&] { record(1); });
  // An idle loop with no timers sleeps in epoll_wait: nothing runs the quiet task yet.
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  {
    MutexLock lock(&mutex);
    EXPECT_TRUE(order.empty());
  }
  std::promise<void> done;
  loop.Post([&] {
    record(2);
    done.set_value();
  });
  ASSERT_EQ(done.get_future().wait_for(std::chrono::seconds(5)), std::future_status::ready);
  loop.Stop();
  EXPECT_EQ(order, (std::vector<int>{1, 2}));
}

TEST(EventLoopTest, RunInLoopRunsInlineOnTheLoopThreadAndPostsFromOthers) {
  EventLoop loop;
  loop.Start("test-loop");
  std::promise<bool> inline_run;
  loop.Post([&] {
    bool ran = false;
    loop.RunInLoop([&] { ran = true; });
    inline_run.set_value(ran);  // ran before RunInLoop returned
  });
  EXPECT_TRUE(inline_run.get_future().get());
  std::promise<bool> on_loop;
  loop.RunInLoop([&] { on_loop.set_value(loop.InLoopThread()); });
  EXPECT_TRUE(on_loop.get_future().get());
  loop.Stop();
}

}  // namespace
}  // namespace kvmid
