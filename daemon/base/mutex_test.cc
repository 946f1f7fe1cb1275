#include "daemon/base/mutex.h"

#include <gtest/gtest.h>

#include <chrono>
#include <thread>
#include <vector>

namespace kvmid {
namespace {

class Counter {
 public:
  void Add() {
    MutexLock lock(&mu_);
    ++value_;
    cv_.SignalAll();
  }
  int WaitFor(int target) {
    MutexLock lock(&mu_);
    while (value_ < target) cv_.Wait(&mu_);
    return value_;
  }
  bool WaitBriefly(int target) {
    MutexLock lock(&mu_);
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(20);
    while (value_ < target) {
      if (!cv_.WaitUntil(&mu_, deadline)) return value_ >= target;
    }
    return true;
  }

 private:
  Mutex mu_;
  CondVar cv_;
  int value_ ABSL_GUARDED_BY(mu_) = 0;
};

TEST(Mutex, CountsFromManyThreadsAndWakesWaiters) {
  Counter counter;
  std::vector<std::thread> threads;
  threads.reserve(4);
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&counter] {
      for (int i = 0; i < 1000; ++i) counter.Add();
    });
  }
  EXPECT_EQ(counter.WaitFor(4000), 4000);
  for (auto& t : threads) t.join();
}

TEST(Mutex, TimedWaitGivesUp) {
  Counter counter;
  EXPECT_FALSE(counter.WaitBriefly(1));
  counter.Add();
  EXPECT_TRUE(counter.WaitBriefly(1));
}

TEST(Mutex, UnlockScopeReleasesAndReacquires) {
  Mutex mu;
  MutexLock lock(&mu);
  {
    MutexUnlock unlock(&mu);
    std::thread other([&mu] {
      MutexLock inner(&mu);  // would deadlock if the scope had not released it
    });
    other.join();
  }
  bool other_got_it = true;
  std::thread probe([&mu, &other_got_it] {
    if (mu.TryLock()) {  // held again by the test's thread: fails
      mu.Unlock();
    } else {
      other_got_it = false;
    }
  });
  probe.join();
  EXPECT_FALSE(other_got_it);
}

}  // namespace
}  // namespace kvmid
