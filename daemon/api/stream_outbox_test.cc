// StreamOutbox alone: one write at a time, bounded by its capacity and the shared budget, drop
// notices, and an end that calls Finish exactly once and never writes after it, also while other
// threads keep offering (tagged tsan).
#include "daemon/api/stream_outbox.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <atomic>
#include <string>
#include <thread>
#include <vector>

#include "daemon/base/mutex.h"
#include "daemon/testing/wait.h"

namespace kvmid::api {
namespace {

using Outbox = StreamOutbox<int>;
using ::testing::ElementsAre;

// Stands in for the reactor: records what the token holder wrote; the test completes writes.
struct Wire {
  Mutex mu;
  std::vector<std::string> written ABSL_GUARDED_BY(mu);  // "7" or "dropped:3"
  int in_flight ABSL_GUARDED_BY(mu) = 0;
  int max_in_flight ABSL_GUARDED_BY(mu) = 0;
  int finished ABSL_GUARDED_BY(mu) = 0;
  bool wrote_after_finish ABSL_GUARDED_BY(mu) = false;

  Outbox::Write Writer() {
    return [this](Outbox::Next next) {
      MutexLock lock(&mu);
      if (finished > 0) wrote_after_finish = true;
      written.push_back(next.item ? std::to_string(*next.item)
                                  : "dropped:" + std::to_string(next.dropped));
      ++in_flight;
      if (in_flight > max_in_flight) max_in_flight = in_flight;
    };
  }
  Outbox::Finish Finisher() {
    return [this] {
      MutexLock lock(&mu);
      ++finished;
    };
  }
  // Completes the write in flight, as gRPC's OnWriteDone would (false: none was).
  bool Complete(Outbox* outbox, bool ok = true) {
    {
      MutexLock lock(&mu);
      if (in_flight == 0) return false;
      --in_flight;
    }
    outbox->OnWriteDone(ok);
    return true;
  }
  std::vector<std::string> Written() {
    MutexLock lock(&mu);
    return written;
  }
  int Finished() {
    MutexLock lock(&mu);
    return finished;
  }
};

TEST(StreamOutboxTest, WritesOneAtATimeInOrderOnceReleasedWithTheReplayFirst) {
  security::ByteBudget budget(1000);
  Wire wire;
  Outbox outbox(8, &budget, /*notices=*/true, wire.Writer(), wire.Finisher());
  EXPECT_EQ(outbox.Offer(3, 10), Outbox::Offered::kQueued);
  EXPECT_EQ(outbox.Offer(2, 10), Outbox::Offered::kQueued);  // a duplicate of the replay
  EXPECT_TRUE(wire.Written().empty());                       // held until Release
  EXPECT_EQ(budget.used(), 20u);
  std::vector<Outbox::Charged> replay;
  replay.push_back({1, 10});
  replay.push_back({2, 10});
  outbox.Release(std::move(replay), /*lost=*/4, [](int i) { return i == 2; });
  EXPECT_EQ(outbox.Offer(2, 10), Outbox::Offered::kQueued);  // skipped: the replay had it
  EXPECT_EQ(outbox.Offer(5, 10), Outbox::Offered::kQueued);
  EXPECT_THAT(wire.Written(), ElementsAre("dropped:4"));  // one write in flight
  while (wire.Complete(&outbox)) {
  }
  EXPECT_THAT(wire.Written(), ElementsAre("dropped:4", "1", "2", "3", "5"));
  {
    MutexLock lock(&wire.mu);
    EXPECT_EQ(wire.max_in_flight, 1);
  }
  EXPECT_EQ(budget.used(), 0u);  // taken for writing: returned
  EXPECT_EQ(wire.Finished(), 0);
}

TEST(StreamOutboxTest, AFullQueueDropsCountsAndTellsBeforeTheNextItem) {
  security::ByteBudget budget(1000);
  Wire wire;
  Outbox outbox(2, &budget, /*notices=*/true, wire.Writer(), wire.Finisher());
  outbox.Release({}, 0, nullptr);
  EXPECT_EQ(outbox.Offer(1, 10), Outbox::Offered::kQueued);  // written at once
  EXPECT_EQ(outbox.Offer(2, 10), Outbox::Offered::kQueued);
  EXPECT_EQ(outbox.Offer(3, 10), Outbox::Offered::kQueued);
  EXPECT_EQ(outbox.Offer(4, 10), Outbox::Offered::kDropped);  // capacity 2
  EXPECT_EQ(outbox.Offer(5, 10), Outbox::Offered::kDropped);
  EXPECT_EQ(outbox.dropped_total(), 2u);
  EXPECT_EQ(budget.used(), 20u);
  while (wire.Complete(&outbox)) {
  }
  EXPECT_THAT(wire.Written(), ElementsAre("1", "dropped:2", "2", "3"));
}

TEST(StreamOutboxTest, AnExhaustedBudgetDropsInsteadOfQueueingAndNeverGoesOver) {
  security::ByteBudget budget(25);
  Wire wire;
  Outbox stuck(100, &budget, /*notices=*/false, wire.Writer(), wire.Finisher());
  stuck.Release({}, 0, nullptr);
  EXPECT_EQ(stuck.Offer(1, 10), Outbox::Offered::kQueued);  // in flight, not charged any more
  EXPECT_EQ(stuck.Offer(2, 10), Outbox::Offered::kQueued);
  EXPECT_EQ(stuck.Offer(3, 10), Outbox::Offered::kQueued);
  EXPECT_EQ(stuck.Offer(4, 10), Outbox::Offered::kDropped);  // 30 > 25
  EXPECT_EQ(budget.used(), 20u);
  EXPECT_LE(budget.used(), budget.budget());
  // Another stream's items do not fit either until the stuck one gives its bytes back.
  Wire other_wire;
  Outbox other(100, &budget, /*notices=*/true, other_wire.Writer(), other_wire.Finisher());
  other.Release({}, 0, nullptr);
  EXPECT_EQ(other.Offer(7, 10), Outbox::Offered::kQueued);  // written at once: not queued
  EXPECT_EQ(other.Offer(8, 10), Outbox::Offered::kDropped);
  EXPECT_EQ(stuck.Close(), 20u);
  EXPECT_EQ(budget.used(), 0u);
  EXPECT_EQ(other.Offer(9, 10), Outbox::Offered::kQueued);
  EXPECT_EQ(wire.Finished(), 0);  // a write is still in flight
  EXPECT_TRUE(wire.Complete(&stuck));
  EXPECT_EQ(wire.Finished(), 1);
  while (other_wire.Complete(&other)) {
  }
  EXPECT_THAT(other_wire.Written(), ElementsAre("7", "dropped:1", "9"));
}

TEST(StreamOutboxTest, CloseFinishesOnceAfterTheWriteInFlightAndThenTakesNothing) {
  security::ByteBudget budget(1000);
  Wire wire;
  Outbox outbox(8, &budget, /*notices=*/true, wire.Writer(), wire.Finisher());
  outbox.Release({}, 0, nullptr);
  outbox.Offer(1, 10);
  outbox.Offer(2, 10);
  EXPECT_EQ(outbox.Close(), 10u);  // item 2's bytes
  EXPECT_EQ(outbox.Close(), 0u);   // idempotent
  EXPECT_EQ(wire.Finished(), 0);
  EXPECT_TRUE(wire.Complete(&outbox, /*ok=*/false));
  EXPECT_EQ(wire.Finished(), 1);
  EXPECT_EQ(outbox.Offer(3, 10), Outbox::Offered::kClosed);
  outbox.Close();
  EXPECT_EQ(wire.Finished(), 1);
  EXPECT_THAT(wire.Written(), ElementsAre("1"));
  EXPECT_EQ(budget.used(), 0u);
}

TEST(StreamOutboxTest, AFailedWriteEndsTheStream) {
  security::ByteBudget budget(1000);
  Wire wire;
  Outbox outbox(8, &budget, /*notices=*/true, wire.Writer(), wire.Finisher());
  outbox.Release({}, 0, nullptr);
  outbox.Offer(1, 10);
  outbox.Offer(2, 10);
  EXPECT_TRUE(wire.Complete(&outbox, /*ok=*/false));
  EXPECT_EQ(wire.Finished(), 1);
  EXPECT_EQ(budget.used(), 0u);
  EXPECT_THAT(wire.Written(), ElementsAre("1"));
}

// With a pump, the thread that queues into an idle stream never writes: the pump does, once for
// everything queued meanwhile; the idle stream's next item is not charged.
TEST(StreamOutboxTest, APumpStartsIdleStreamsSoThatOfferingThreadsOnlyQueue) {
  security::ByteBudget budget(1000);
  Mutex mu;
  std::vector<std::thread::id> writers;
  Wire wire;
  Outbox::Write record = wire.Writer();
  StreamPump pump;
  auto outbox = std::make_shared<Outbox>(
      8, &budget, /*notices=*/true,
      [&](Outbox::Next next) {
        {
          MutexLock lock(&mu);
          writers.push_back(std::this_thread::get_id());
        }
        record(next);
      },
      wire.Finisher(), &pump);
  outbox->Release({}, 0, nullptr);
  EXPECT_EQ(outbox->Offer(1, 10), Outbox::Offered::kQueued);
  EXPECT_EQ(outbox->Offer(2, 10), Outbox::Offered::kQueued);
  ASSERT_TRUE(testing::WaitUntil([&] { return wire.Written().size() == 1; }));
  EXPECT_EQ(budget.used(), 10u);  // item 2; item 1 went uncharged
  while (wire.Written().size() < 2) wire.Complete(outbox.get());
  EXPECT_THAT(wire.Written(), ElementsAre("1", "2"));
  MutexLock lock(&mu);
  ASSERT_EQ(writers.size(), 2u);
  EXPECT_NE(writers[0], std::this_thread::get_id());  // the pump
  EXPECT_EQ(writers[1], std::this_thread::get_id());  // OnWriteDone's thread
}

// Loop threads offer while "gRPC" completes writes and the stream is cancelled midway: one write
// at a time, Finish exactly once, nothing written after it, every byte back in the budget.
TEST(StreamOutboxTest, CancellationRacesWithOfferingThreads) {
  StreamPump pump;
  for (int round = 0; round < 50; ++round) {
    security::ByteBudget budget(4000);
    Wire wire;
    auto outbox =
        // Odd rounds start idle streams from a pump, as the server does.
        std::make_shared<Outbox>(64, &budget, /*notices=*/true, wire.Writer(), wire.Finisher(),
                                 round % 2 ? &pump : nullptr);
    outbox->Release({}, 0, nullptr);
    std::atomic<bool> stop{false};
    std::vector<std::thread> loops;
    loops.reserve(3);
    for (int t = 0; t < 3; ++t) {
      loops.emplace_back([&, t] {
        for (int i = 0; !stop.load(); ++i) {
          outbox->Offer(t * 1000000 + i, 16);
          EXPECT_LE(budget.used(), budget.budget());
        }
      });
    }
    std::thread grpc([&] {
      while (wire.Finished() == 0) wire.Complete(outbox.get(), /*ok=*/true);
    });
    ASSERT_TRUE(testing::WaitUntil([&] { return wire.Written().size() > 20; }));
    outbox->Close();  // OnCancel
    ASSERT_TRUE(testing::WaitUntil([&] { return wire.Finished() == 1; }));
    stop = true;
    for (auto& t : loops) t.join();
    grpc.join();
    outbox->Close();  // OnDone
    EXPECT_EQ(outbox->Offer(1, 16), Outbox::Offered::kClosed);
    MutexLock lock(&wire.mu);
    EXPECT_EQ(wire.finished, 1);
    EXPECT_FALSE(wire.wrote_after_finish);
    EXPECT_EQ(wire.max_in_flight, 1);
    EXPECT_EQ(budget.used(), 0u);
  }
}

}  // namespace
}  // namespace kvmid::api
