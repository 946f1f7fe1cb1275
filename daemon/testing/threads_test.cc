#include "daemon/testing/threads.h"

#include <pthread.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
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

// A thread that sleeps N times is put back on a CPU at least N times, and the time it spins is
// counted; a thread that is gone reads as zeros.
TEST(ReadSchedStatTest, CountsCpuTimeAndWakeUps) {
  if (ReadSchedStat(::gettid()).timeslices == 0) {
    GTEST_SKIP() << "this kernel keeps no schedstats (/proc/self/task/TID/schedstat)";
  }
  std::atomic<pid_t> tid{0};
  std::atomic<bool> go{false}, slept{false}, done{false};
  std::thread thread([&] {
    tid = ::gettid();
    while (!go) std::this_thread::yield();
    for (int i = 0; i < 20; ++i) std::this_thread::sleep_for(std::chrono::milliseconds(1));
    // 30 ms of its own CPU time, however often it is preempted meanwhile.
    auto cpu_ns = [] {
      timespec ts{};
      ::clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
      return static_cast<int64_t>(ts.tv_sec) * 1'000'000'000 + ts.tv_nsec;
    };
    const int64_t spin_until = cpu_ns() + 30'000'000;
    while (cpu_ns() < spin_until) {
    }
    slept = true;
    while (!done) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  });
  while (tid == 0) std::this_thread::yield();
  const SchedStat before = ReadSchedStat(tid);
  go = true;
  while (!slept) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  const SchedStat after = ReadSchedStat(tid);
  done = true;
  const pid_t gone = tid;
  thread.join();

  EXPECT_GE(after.timeslices - before.timeslices, 20u);
  EXPECT_GE(after.cpu_ns - before.cpu_ns, 30'000'000u);
  EXPECT_EQ(ReadSchedStat(gone).timeslices, 0u);
  EXPECT_EQ(ReadSchedStat(gone).cpu_ns, 0u);
}

}  // namespace
}  // namespace kvmid::testing
