#include "daemon/api/tarpit.h"

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include "daemon/base/mutex.h"

namespace kvmid::api {
namespace {

using Clock = Tarpit::Clock;
using std::chrono::milliseconds;

grpc::Status Refused() {
  return grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED,
                      "policy.description is 1048576 bytes: over the limit "
                      "max_policy_description_bytes = 4096 bytes "
                      "(limits.max_policy_description_bytes)");
}

// Counts the answers and when they came.
class Answers {
 public:
  std::function<void()> Next() {
    return [this] {
      MutexLock lock(&mu_);
      at_.push_back(Clock::now());
      cv_.SignalAll();
    };
  }
  // Waits (up to 10 s) for `n` answers.
  bool WaitFor(size_t n) {
    MutexLock lock(&mu_);
    const auto deadline = Clock::now() + std::chrono::seconds(10);
    while (at_.size() < n) {
      if (!cv_.WaitUntil(&mu_, deadline)) return at_.size() >= n;
    }
    return true;
  }
  size_t count() {
    MutexLock lock(&mu_);
    return at_.size();
  }

 private:
  Mutex mu_;
  CondVar cv_;
  std::vector<Clock::time_point> at_ ABSL_GUARDED_BY(mu_);
};

TEST(TarpitTest, AnswersWhatIsNoLimitRefusalAtOnce) {
  Tarpit tarpit;
  Answers answers;
  EXPECT_EQ(tarpit.Finish("uid:0", grpc::Status::OK, 10, answers.Next()), Clock::duration::zero());
  EXPECT_EQ(tarpit.Finish("uid:0", grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "policy.name"),
                          10, answers.Next()),
            Clock::duration::zero());
  // RESOURCE_EXHAUSTED that names no limit of kvmid's (a guest's ENOMEM): not held.
  EXPECT_EQ(tarpit.Finish("uid:0", grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED, "ENOMEM"), 10,
                          answers.Next()),
            Clock::duration::zero());
  EXPECT_EQ(answers.count(), 3u);  // synchronously
  EXPECT_EQ(tarpit.held_total(), 0u);
  EXPECT_TRUE(Tarpit::IsLimitRefusal(Refused()));
}

TEST(TarpitTest, DrainAnswersEveryHeldCallNowAndHoldsNoMore) {
  Tarpit tarpit;
  Answers answers;
  const auto max = std::chrono::seconds(10);  // held far longer than the test waits
  for (int i = 0; i < 3; ++i) {
    ASSERT_GT(tarpit.Finish("uid:65534", Refused(), 10, answers.Next(), max),
              Clock::duration::zero());
  }
  EXPECT_EQ(tarpit.held(), 3u);
  EXPECT_EQ(answers.count(), 0u);
  tarpit.Drain();  // returns once every held call was answered
  EXPECT_EQ(answers.count(), 3u);
  EXPECT_EQ(tarpit.held(), 0u);
  EXPECT_EQ(tarpit.Finish("uid:65534", Refused(), 10, answers.Next(), max),
            Clock::duration::zero());
  EXPECT_EQ(answers.count(), 4u);
  tarpit.Drain();  // idempotent
}

TEST(TarpitTest, RepeatedRefusalsOfOneIdentityWaitLongerUpToTheMaximum) {
  Tarpit tarpit;
  Answers answers;
  std::vector<Clock::duration> delays;
  for (int i = 0; i < 8; ++i) {
    const auto start = Clock::now();
    delays.push_back(tarpit.Finish("uid:65534", Refused(), 100, answers.Next()));
    ASSERT_TRUE(answers.WaitFor(i + 1));
    // Never answered before its delay.
    EXPECT_GE(Clock::now() - start, delays.back());
  }
  EXPECT_EQ(delays[0], Tarpit::kFirstDelay);
  EXPECT_EQ(delays[1], 2 * Tarpit::kFirstDelay);
  EXPECT_EQ(delays[2], 4 * Tarpit::kFirstDelay);
  EXPECT_EQ(delays.back(), Tarpit::kMaxDelay);
  EXPECT_EQ(tarpit.held_total(), 8u);
  // Another identity starts from the first delay.
  EXPECT_EQ(tarpit.Finish("uid:1000", Refused(), 100, answers.Next()), Tarpit::kFirstDelay);
  ASSERT_TRUE(answers.WaitFor(9));
}

TEST(TarpitTest, TheConfiguredMaximumCapsEveryDelay) {
  Tarpit tarpit;
  Answers answers;
  const Clock::duration max = milliseconds(5);  // limits.refusal_delay_max_ms = 5
  for (int i = 0; i < 6; ++i) {
    EXPECT_EQ(tarpit.Finish("uid:65534", Refused(), 10, answers.Next(), max), max) << i;
  }
  ASSERT_TRUE(answers.WaitFor(6));
}

// No delay at all (a maximum of zero, below what the configuration allows): every refusal is
// answered once, at once.
TEST(TarpitTest, AZeroMaximumAnswersEveryRefusalAtOnce) {
  Tarpit tarpit;
  Answers answers;
  for (int i = 0; i < 3; ++i) {
    EXPECT_EQ(tarpit.Finish("uid:65534", Refused(), 10, answers.Next(), Clock::duration::zero()),
              Clock::duration::zero())
        << i;
  }
  EXPECT_EQ(answers.count(), 3u);
}

TEST(TarpitTest, BoundsWhatOneIdentityAndAllTogetherHold) {
  Tarpit tarpit;
  Answers answers;
  size_t held = 0, at_once = 0;
  for (size_t i = 0; i < Tarpit::kMaxHeldPerKey + 5; ++i) {
    (tarpit.Finish("uid:65534", Refused(), 10, answers.Next()) == Clock::duration::zero() ? at_once
                                                                                          : held)++;
  }
  EXPECT_EQ(held, Tarpit::kMaxHeldPerKey);
  EXPECT_EQ(at_once, 5u);
  EXPECT_LE(tarpit.held(), Tarpit::kMaxHeldPerKey);
  // A request that would pass the bytes bound is answered at once.
  EXPECT_EQ(tarpit.Finish("uid:7", Refused(), Tarpit::kMaxHeldBytes, answers.Next()),
            Clock::duration::zero());
  ASSERT_TRUE(answers.WaitFor(Tarpit::kMaxHeldPerKey + 6));
  EXPECT_EQ(tarpit.held(), 0u);
}

TEST(TarpitTest, DestructionAnswersEveryHeldCall) {
  Answers answers;
  {
    Tarpit tarpit;
    for (int i = 0; i < 8; ++i) tarpit.Finish("uid:65534", Refused(), 10, answers.Next());
    EXPECT_GT(tarpit.held(), 0u);
  }
  EXPECT_EQ(answers.count(), 8u);
}

TEST(TarpitTest, ManyThreadsRefusedAtOnceAreAllAnswered) {
  Answers answers;
  std::atomic<int> started{0};
  {
    Tarpit tarpit;
    std::vector<std::thread> threads;
    threads.reserve(4);
    for (int t = 0; t < 4; ++t) {
      threads.emplace_back([&, t] {
        for (int i = 0; i < 50; ++i) {
          tarpit.Finish("uid:" + std::to_string(t % 2), Refused(), 10, answers.Next());
          ++started;
        }
      });
    }
    for (auto& thread : threads) thread.join();
    EXPECT_TRUE(answers.WaitFor(200));
  }
  EXPECT_EQ(answers.count(), 200u);
  EXPECT_EQ(started.load(), 200);
}

}  // namespace
}  // namespace kvmid::api
