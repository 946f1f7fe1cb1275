// The shared event ring alone: sequence numbers and slots, Next's type filter, scan bound and
// skip-ahead when a reader fell behind, the type counts that let a reader count what it lost,
// resume cursors (held, overwritten, out of id order, from the future), the listener, and
// appends racing readers (run under TSan).
#include "daemon/api/event_history.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <atomic>
#include <thread>
#include <vector>

namespace kvmid {
namespace {

constexpr uint8_t kCr = 1;
constexpr uint8_t kMsr = 2;
constexpr uint8_t kPf = 3;
constexpr uint32_t Bit(uint8_t type) { return 1u << type; }
constexpr uint32_t kAll = ~0u;

class EventHistoryTest : public ::testing::Test {
 protected:
  explicit EventHistoryTest(size_t capacity = 8)
      : pipeline_(&policies_, VerdictPipeline::Options{}), ring_(&pipeline_, capacity) {}

  // Appends an event of `type` with the next id (or `id`).
  void Emit(uint8_t type, uint64_t id = 0) {
    ObservedEvent o;
    o.event.common.event = type;
    o.event_id = id != 0 ? id : ++next_id_;
    if (id > next_id_) next_id_ = id;
    ring_.Append(o);
  }

  // Every event id Next delivers of `types` from *cursor until caught up (lost counted apart).
  std::vector<uint64_t> Drain(uint64_t* cursor, uint32_t types, uint64_t max_behind = 0,
                              uint64_t* lost_total = nullptr) {
    std::vector<uint64_t> ids;
    for (;;) {
      ObservedEvent out;
      uint64_t lost = 0;
      switch (ring_.Next(cursor, types, max_behind, /*max_scan=*/1000, &out, &lost)) {
        case EventHistory::Found::kEvent:
          ids.push_back(out.event_id);
          break;
        case EventHistory::Found::kLost:
          if (lost_total != nullptr) *lost_total += lost;
          break;
        case EventHistory::Found::kMore:
          break;
        case EventHistory::Found::kCaughtUp:
          return ids;
      }
    }
  }

  PolicySet policies_;
  VerdictPipeline pipeline_;
  EventHistory ring_;
  uint64_t next_id_ = 0;
};

TEST_F(EventHistoryTest, SequenceNumbersStartAtOneAndTheTailFollowsTheCapacity) {
  EXPECT_EQ(ring_.head(), 1u);
  EXPECT_EQ(ring_.tail(), 1u);
  EXPECT_EQ(ring_.latest_id(), 0u);
  for (int i = 0; i < 5; ++i) Emit(kCr);
  EXPECT_EQ(ring_.head(), 6u);
  EXPECT_EQ(ring_.tail(), 1u);
  for (int i = 0; i < 10; ++i) Emit(kCr);
  EXPECT_EQ(ring_.head(), 16u);
  EXPECT_EQ(ring_.tail(), 8u);  // 8 slots: 8..15 held
  EXPECT_EQ(ring_.latest_id(), 15u);
  ObservedEvent out;
  EXPECT_FALSE(ring_.CopyAt(7, &out));
  ASSERT_TRUE(ring_.CopyAt(8, &out));
  EXPECT_EQ(out.event_id, 8u);
  ASSERT_TRUE(ring_.CopyAt(15, &out));
  EXPECT_EQ(out.event_id, 15u);
  EXPECT_FALSE(ring_.CopyAt(16, &out));  // not yet
  EXPECT_EQ(ring_.TypeAt(15), kCr);
  EXPECT_EQ(ring_.TypeAt(7), -1);
  EXPECT_EQ(ring_.TypeAt(16), -1);
}

TEST_F(EventHistoryTest, NextDeliversOnlyTheWantedTypesInRingOrder) {
  Emit(kCr);   // 1
  Emit(kMsr);  // 2
  Emit(kPf);   // 3
  Emit(kMsr);  // 4
  uint64_t cursor = 1;
  EXPECT_THAT(Drain(&cursor, Bit(kMsr)), ::testing::ElementsAre(2u, 4u));
  EXPECT_EQ(cursor, ring_.head());
  cursor = 1;
  EXPECT_THAT(Drain(&cursor, Bit(kCr) | Bit(kPf)), ::testing::ElementsAre(1u, 3u));
  cursor = 1;
  EXPECT_THAT(Drain(&cursor, 0), ::testing::IsEmpty());
  EXPECT_EQ(cursor, ring_.head()) << "a reader of nothing still moves to the head";
}

TEST_F(EventHistoryTest, NextLooksAtMostMaxScanSlotsPerCall) {
  for (int i = 0; i < 6; ++i) Emit(kCr);
  Emit(kMsr);  // 7
  uint64_t cursor = 1;
  ObservedEvent out;
  uint64_t lost = 0;
  EXPECT_EQ(ring_.Next(&cursor, Bit(kMsr), 0, 4, &out, &lost), EventHistory::Found::kMore);
  EXPECT_EQ(cursor, 5u);
  ASSERT_EQ(ring_.Next(&cursor, Bit(kMsr), 0, 4, &out, &lost), EventHistory::Found::kEvent);
  EXPECT_EQ(out.event_id, 7u);
  EXPECT_EQ(ring_.Next(&cursor, Bit(kMsr), 0, 4, &out, &lost), EventHistory::Found::kCaughtUp);
  EXPECT_EQ(lost, 0u);
}

TEST_F(EventHistoryTest, AReaderBehindTheRingSkipsToHalfAWindowAndCountsWhatItSkipped) {
  for (int i = 0; i < 20; ++i) Emit(kCr);  // head 21, tail 13
  uint64_t cursor = 3;
  ObservedEvent out;
  uint64_t lost = 0;
  ASSERT_EQ(ring_.Next(&cursor, kAll, 0, 100, &out, &lost), EventHistory::Found::kLost);
  EXPECT_EQ(cursor, 17u) << "half the ring (4) behind the head (21)";
  EXPECT_EQ(lost, 14u) << "3..16";
  EXPECT_THAT(Drain(&cursor, kAll), ::testing::ElementsAre(17u, 18u, 19u, 20u));
}

TEST_F(EventHistoryTest, MaxBehindBoundsAReaderInsideTheRing) {
  for (int i = 0; i < 8; ++i) Emit(kCr);  // head 9, all held
  uint64_t cursor = 1;
  uint64_t lost = 0;
  EXPECT_THAT(Drain(&cursor, kAll, /*max_behind=*/4, &lost), ::testing::ElementsAre(7u, 8u));
  EXPECT_EQ(lost, 6u) << "1..6: more than 4 behind, skipped to 2 behind";
  cursor = 7;
  lost = 0;
  EXPECT_THAT(Drain(&cursor, kAll, 4, &lost), ::testing::ElementsAre(7u, 8u));
  EXPECT_EQ(lost, 0u) << "within max_behind: nothing lost";
}

TEST_F(EventHistoryTest, TypeCountsCountWhatWasAppendedBeforeASequenceNumber) {
  Emit(kCr);   // 1
  Emit(kMsr);  // 2
  Emit(kMsr);  // 3
  EventHistory::TypeCounts counts{};
  ASSERT_TRUE(ring_.CountsAt(3, &counts));
  EXPECT_EQ(counts[kCr], 1u);
  EXPECT_EQ(counts[kMsr], 1u);
  ASSERT_TRUE(ring_.CountsAt(ring_.head(), &counts));
  EXPECT_EQ(counts[kMsr], 2u);
  EXPECT_FALSE(ring_.CountsAt(ring_.head() + 1, &counts));
  for (int i = 0; i < 10; ++i) Emit(kPf);  // 4..13; tail 6
  EXPECT_FALSE(ring_.CountsAt(5, &counts)) << "no longer held";
  const uint64_t tail = ring_.TailCounts(&counts);
  EXPECT_EQ(tail, 6u);
  EXPECT_EQ(counts[kCr], 1u);
  EXPECT_EQ(counts[kMsr], 2u);
  EXPECT_EQ(counts[kPf], 2u) << "4 and 5 were appended before the tail";
  // A reader that lost [from, tail) can count what it lost of its types from two counts.
  EventHistory::TypeCounts at_head{};
  ASSERT_TRUE(ring_.CountsAt(ring_.head(), &at_head));
  EXPECT_EQ(at_head[kPf] - counts[kPf], 8u);
  EXPECT_TRUE(ring_.AnyOfTypes(1, ring_.head(), Bit(kPf)));
  EXPECT_FALSE(ring_.AnyOfTypes(1, ring_.head(), Bit(kMsr))) << "2 and 3 are no longer held";
  EXPECT_FALSE(ring_.AnyOfTypes(8, 8, kAll));
}

TEST_F(EventHistoryTest, ResumeStartsRightAfterTheLastEventSeen) {
  for (int i = 0; i < 5; ++i) Emit(kCr);
  uint64_t lost = 99;
  uint64_t cursor = ring_.CursorAfter(3, &lost);
  EXPECT_EQ(lost, 0u);
  EXPECT_THAT(Drain(&cursor, kAll), ::testing::ElementsAre(4u, 5u));
  cursor = ring_.CursorAfter(5, &lost);
  EXPECT_EQ(cursor, ring_.head());
  EXPECT_EQ(lost, 0u);
  cursor = ring_.CursorAfter(1000, &lost);
  EXPECT_EQ(cursor, ring_.head()) << "a cursor from the future starts live";
  EXPECT_EQ(lost, 0u);
}

TEST_F(EventHistoryTest, ResumeAfterAnOverwrittenEventCountsTheIdsNoLongerHeld) {
  for (int i = 0; i < 20; ++i) Emit(kCr);  // ids 1..20, held 13..20
  uint64_t lost = 0;
  uint64_t cursor = ring_.CursorAfter(4, &lost);
  EXPECT_EQ(lost, 8u) << "5..12";
  EXPECT_EQ(cursor, ring_.tail());
  EXPECT_THAT(Drain(&cursor, kAll), ::testing::ElementsAre(13u, 14u, 15u, 16u, 17u, 18u, 19u, 20u));
}

TEST_F(EventHistoryTest, ResumeFollowsRingOrderWhenIdsArriveOutOfOrder) {
  // An event held by a handler reaches the ring after later ones: ids 1, 3, 2, 4.
  Emit(kCr, 1);
  Emit(kCr, 3);
  Emit(kCr, 2);
  Emit(kCr, 4);
  uint64_t lost = 0;
  uint64_t cursor = ring_.CursorAfter(3, &lost);
  EXPECT_EQ(lost, 0u);
  EXPECT_THAT(Drain(&cursor, kAll), ::testing::ElementsAre(2u, 4u))
      << "exactly what a reader that had seen 1 and 3 had not seen yet";
}

// A ring larger than the walk's chunk (4096 slots per hold of the lock): the walk crosses chunk
// boundaries and finds the same cursors as one walk of the whole ring would.
class BigEventHistoryTest : public EventHistoryTest {
 protected:
  static constexpr size_t kCapacity = 10000;
  BigEventHistoryTest() : EventHistoryTest(kCapacity) {}
};

TEST_F(BigEventHistoryTest, ResumeFindsEventsInEveryChunkOfTheRing) {
  for (int i = 0; i < 25000; ++i) Emit(i % 3 == 0 ? kCr : kMsr);  // held: 15001..25000
  for (uint64_t after : {15001u, 15500u, 19999u, 20904u, 24999u}) {
    uint64_t lost = 99;
    const uint64_t cursor = ring_.CursorAfter(after, &lost);
    EXPECT_EQ(lost, 0u) << after;
    EXPECT_EQ(cursor, after + 1) << "ids equal sequence numbers here: the slot after " << after;
  }
  uint64_t lost = 0;
  EXPECT_EQ(ring_.CursorAfter(25000, &lost), ring_.head());
  EXPECT_EQ(lost, 0u);
  // Overwritten: resumes at the oldest held event past it, the ids in between counted lost.
  EXPECT_EQ(ring_.CursorAfter(14000, &lost), ring_.tail());
  EXPECT_EQ(lost, 1000u) << "14001..15000";
}

TEST_F(BigEventHistoryTest, ResumeAfterAnOverwrittenIdFindsTheOldestLaterOneAcrossChunks) {
  // Ids out of ring order across the whole ring: in every pair, the larger id comes first.
  for (uint64_t i = 1; i <= 12000; i += 2) {
    Emit(kCr, i + 1);
    Emit(kCr, i);
  }  // seq s holds id s+1 (s odd) or s-1 (s even); held: seq 2001..12000
  uint64_t lost = 0;
  const uint64_t cursor = ring_.CursorAfter(1999, &lost);  // id 1999 was at seq 2000: overwritten
  EXPECT_EQ(cursor, 2001u) << "seq 2001 holds id 2002, the oldest held id past 1999";
  EXPECT_EQ(lost, 1u) << "of the ids past 1999, only 2000 (at seq 1999) is no longer held";
  uint64_t found_lost = 0;
  EXPECT_EQ(ring_.CursorAfter(2002, &found_lost), 2002u) << "id 2002 at seq 2001";
}

TEST_F(BigEventHistoryTest, TypeCountsAfterManyWrapsMatchACountOfEveryAppend) {
  std::vector<uint8_t> types;  // types[seq - 1]
  uint32_t x = 12345;
  for (int i = 0; i < 33333; ++i) {
    x = x * 1103515245 + 12345;
    const uint8_t type = static_cast<uint8_t>(1 + (x >> 16) % 5);
    types.push_back(type);
    Emit(type);
  }
  auto before = [&](uint64_t seq) {
    EventHistory::TypeCounts c{};
    for (uint64_t s = 1; s < seq; ++s) ++c[types[s - 1]];
    return c;
  };
  EventHistory::TypeCounts counts{};
  const uint64_t tail = ring_.TailCounts(&counts);
  EXPECT_EQ(tail, ring_.head() - kCapacity);
  EXPECT_EQ(counts, before(tail));
  // Near the tail (counted up from it) and near the head (counted down from it).
  for (uint64_t seq :
       {tail, tail + 1, tail + 1234, ring_.head() - 4321, ring_.head() - 1, ring_.head()}) {
    ASSERT_TRUE(ring_.CountsAt(seq, &counts)) << seq;
    EXPECT_EQ(counts, before(seq)) << seq;
  }
}

TEST_F(BigEventHistoryTest, AResumeRacingAnAppenderGetsAHeldCursor) {
  for (int i = 0; i < 12000; ++i) Emit(kCr);
  std::atomic<bool> stop{false};
  std::thread appender([&] {
    while (!stop.load()) Emit(kMsr);
  });
  for (int round = 0; round < 50; ++round) {
    const uint64_t tail_before = ring_.tail();
    const uint64_t latest = ring_.latest_id();
    const uint64_t after = latest > 9000 ? latest - 9000 : 1;  // soon overwritten, or gone
    uint64_t lost = 0;
    const uint64_t cursor = ring_.CursorAfter(after, &lost);
    EXPECT_LE(cursor, ring_.head());
    EXPECT_GE(cursor, tail_before) << "never before where the ring started when it was called";
    EXPECT_LE(lost, latest - after);
  }
  stop.store(true);
  appender.join();
}

class CountingListener : public EventHistory::Listener {
 public:
  void Appended(uint8_t type) override {
    ++calls;
    last = type;
  }
  std::atomic<int> calls{0};
  std::atomic<uint8_t> last{0};
};

TEST_F(EventHistoryTest, TheListenerHearsEveryAppendUntilCleared) {
  CountingListener listener;
  ring_.SetListener(&listener);
  Emit(kMsr);
  Emit(kPf);
  EXPECT_EQ(listener.calls.load(), 2);
  EXPECT_EQ(listener.last.load(), kPf);
  ring_.SetListener(nullptr);
  Emit(kCr);
  EXPECT_EQ(listener.calls.load(), 2);
}

class EventHistoryRaceTest : public EventHistoryTest {
 protected:
  EventHistoryRaceTest() : EventHistoryTest(64) {}
};

TEST_F(EventHistoryRaceTest, ReadersRacingAnAppenderSeeIncreasingIdsAndCountEveryLoss) {
  constexpr uint64_t kEvents = 20000;
  std::atomic<bool> done{false};
  std::vector<std::thread> readers;
  std::vector<uint64_t> seen(3, 0), lost(3, 0);
  std::vector<bool> ordered(3, true);
  readers.reserve(3);
  for (int r = 0; r < 3; ++r) {
    readers.emplace_back([&, r] {
      uint64_t cursor = 1;
      uint64_t last = 0;
      for (;;) {
        const bool finished = done.load();
        ObservedEvent out;
        uint64_t l = 0;
        const EventHistory::Found found = ring_.Next(&cursor, kAll, 0, 16, &out, &l);
        if (found == EventHistory::Found::kEvent) {
          if (out.event_id <= last) ordered[r] = false;
          last = out.event_id;
          ++seen[r];
        } else if (found == EventHistory::Found::kLost) {
          lost[r] += l;
        } else if (found == EventHistory::Found::kCaughtUp && finished) {
          return;
        }
      }
    });
  }
  for (uint64_t i = 0; i < kEvents; ++i) Emit(i % 2 == 0 ? kCr : kMsr);
  done.store(true);
  for (auto& t : readers) t.join();
  for (int r = 0; r < 3; ++r) {
    EXPECT_TRUE(ordered[r]) << "reader " << r;
    EXPECT_EQ(seen[r] + lost[r], kEvents) << "reader " << r << ": every event seen or counted";
  }
}

}  // namespace
}  // namespace kvmid
