#include "daemon/testing/threads.h"

#include <pthread.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <thread>

#include "gtest/gtest.h"

namespace kvmid::testing {
namespace {

TEST(ListThreadsTest, FindsANamedThreadAndThisOne) {
  std::atomic<bool> named{false}, done{false};
  std::atomic<pid_t> tid{0};
  std::thread thread([&] {
    pthread_setname_np(pthread_self(), "threads-test");
    tid = ::gettid();
    named = true;
    while (!done) std::this_thread::yield();
  });
  while (!named) std::this_thread::yield();
  const std::vector<ThreadEntry> threads = ListThreads();
  done = true;
  thread.join();

  ASSERT_GE(threads.size(), 2u);
  EXPECT_TRUE(
      std::is_sorted(threads.begin(), threads.end(),
                     [](const ThreadEntry& a, const ThreadEntry& b) { return a.tid < b.tid; }));
  auto named_entry = std::find_if(threads.begin(), threads.end(),
                                  [](const ThreadEntry& t) { return t.name == "threads-test"; });
  ASSERT_NE(named_entry, threads.end());
  EXPECT_EQ(named_entry->tid, tid.load());
  EXPECT_TRUE(std::any_of(threads.begin(), threads.end(),
                          [](const ThreadEntry& t) { return t.tid == ::gettid(); }));
}

}  // namespace
}  // namespace kvmid::testing
