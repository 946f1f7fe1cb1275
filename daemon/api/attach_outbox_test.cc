// AttachOutbox and StreamHandler without gRPC: a fake stream records what the outbox starts
// writing and completes writes by hand, so order, the one-write-at-a-time rule, holding until
// Release, backpressure and finishing exactly once are each pinned.
#include "daemon/api/attach_outbox.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <functional>
#include <future>
#include <string>
#include <thread>
#include <vector>

#include "daemon/io/event_loop.h"

namespace kvmid::api {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::IsEmpty;

// What a real stream does with the outbox's calls, recorded.
class FakeStream {
 public:
  FakeStream()
      : outbox_(std::make_shared<AttachOutbox>(
            [this](const kvmi::v1::AttachResponse* m) {
              MutexLock lock(&mu_);
              ++in_flight_;
              started_.push_back(m->command_result().id());
              last_ = *m;
            },
            [this](const grpc::Status& s) {
              MutexLock lock(&mu_);
              finishes_.push_back(s);
            })) {}

  AttachOutbox& outbox() { return *outbox_; }
  std::shared_ptr<AttachOutbox> shared() { return outbox_; }

  // Completes the write in flight (as gRPC's OnWriteDone would).
  void Complete(bool ok = true) {
    {
      MutexLock lock(&mu_);
      ASSERT_EQ(in_flight_, 1) << "no write (or more than one) in flight";
      --in_flight_;
    }
    outbox_->OnWriteDone(ok);
  }
  std::vector<uint64_t> started() {
    MutexLock lock(&mu_);
    return started_;
  }
  int in_flight() {
    MutexLock lock(&mu_);
    return in_flight_;
  }
  std::vector<grpc::Status> finishes() {
    MutexLock lock(&mu_);
    return finishes_;
  }
  kvmi::v1::AttachResponse last() {
    MutexLock lock(&mu_);
    return last_;
  }

 private:
  Mutex mu_;
  int in_flight_ ABSL_GUARDED_BY(mu_) = 0;
  std::vector<uint64_t> started_ ABSL_GUARDED_BY(mu_);
  std::vector<grpc::Status> finishes_ ABSL_GUARDED_BY(mu_);
  kvmi::v1::AttachResponse last_ ABSL_GUARDED_BY(mu_);
  std::shared_ptr<AttachOutbox> outbox_;
};

kvmi::v1::AttachResponse Message(uint64_t id, size_t padding = 0) {
  kvmi::v1::AttachResponse m;
  m.mutable_command_result()->set_id(id);
  if (padding > 0) m.mutable_command_result()->set_message(std::string(padding, 'x'));
  return m;
}

TEST(AttachOutboxTest, NothingIsWrittenBeforeReleaseThenOneWriteAtATimeInOrder) {
  FakeStream stream;
  stream.outbox().Send(Message(1));
  stream.outbox().Send(Message(2));
  EXPECT_THAT(stream.started(), IsEmpty());  // held: Claimed must not overtake the handler
  stream.outbox().Release();
  EXPECT_THAT(stream.started(), ElementsAre(1u));
  stream.outbox().Send(Message(3));
  EXPECT_THAT(stream.started(), ElementsAre(1u));  // one write in flight at a time
  stream.Complete();
  EXPECT_THAT(stream.started(), ElementsAre(1u, 2u));
  stream.Complete();
  stream.Complete();
  EXPECT_THAT(stream.started(), ElementsAre(1u, 2u, 3u));
  EXPECT_EQ(stream.in_flight(), 0);
  stream.outbox().Send(Message(4));  // idle: the sender writes at once
  EXPECT_THAT(stream.started(), ElementsAre(1u, 2u, 3u, 4u));
  EXPECT_THAT(stream.finishes(), IsEmpty());
}

kvmi::v1::AttachResponse EventMessage(uint64_t id) {
  kvmi::v1::AttachResponse m;
  m.mutable_event()->set_id(id);
  return m;
}

// The event ids of a written message: one event, or a batch.
std::vector<uint64_t> EventIds(const kvmi::v1::AttachResponse& m) {
  std::vector<uint64_t> ids;
  if (m.has_event()) ids.push_back(m.event().id());
  for (const kvmi::v1::Event& e : m.events().events()) ids.push_back(e.id());
  return ids;
}

// Claim.max_batch: events that wait behind a write in flight go out together, in order, at most
// max_batch per message and never across another kind of message; an event alone is still an
// `event`. The backlog counts each event until it is taken.
TEST(AttachOutboxTest, WaitingEventsGoOutInBatchesOfAtMostMaxBatch) {
  FakeStream stream;
  stream.outbox().SetMaxBatch(3);
  stream.outbox().Release();
  stream.outbox().Send(EventMessage(1));  // idle: written alone at once
  EXPECT_TRUE(stream.last().has_event());
  EXPECT_THAT(EventIds(stream.last()), ElementsAre(1u));
  for (uint64_t id = 2; id <= 5; ++id) stream.outbox().Send(EventMessage(id));
  stream.outbox().Send(Message(9));
  stream.outbox().Send(EventMessage(6));
  stream.outbox().Send(EventMessage(7));
  stream.Complete();
  ASSERT_TRUE(stream.last().has_events());
  EXPECT_THAT(EventIds(stream.last()), ElementsAre(2u, 3u, 4u));  // max_batch
  stream.Complete();
  EXPECT_TRUE(stream.last().has_event());  // 5 alone: a command result follows it
  EXPECT_THAT(EventIds(stream.last()), ElementsAre(5u));
  stream.Complete();
  EXPECT_EQ(stream.last().command_result().id(), 9u);
  stream.Complete();
  EXPECT_THAT(EventIds(stream.last()), ElementsAre(6u, 7u));
  stream.Complete();
  EXPECT_EQ(stream.in_flight(), 0);
  EXPECT_FALSE(stream.outbox().Congested());
}

// Runs `body` on `loop` as one task and returns once the loop has begun its next iteration, so
// that the end-of-iteration work `body` asked for (a corked flush) has run.
void RunOneIteration(EventLoop& loop, const std::function<void()>& body) {
  std::promise<void> next_iteration;
  loop.Post([&] {
    body();
    loop.Post([&] { next_iteration.set_value(); });
  });
  next_iteration.get_future().wait();
}

// With max_batch, events sent on a guest's loop thread are written at the end of that loop's
// iteration: the events one wake-up brought go as one message, not one write and then a batch.
TEST(AttachOutboxTest, EventsSentOnALoopThreadGoOutTogetherAtTheEndOfItsIteration) {
  FakeStream stream;
  stream.outbox().SetMaxBatch(8);
  stream.outbox().Release();
  EventLoop loop;
  loop.Start("test-loop");
  int in_flight_during = -1;
  RunOneIteration(loop, [&] {
    for (uint64_t id = 1; id <= 3; ++id) stream.outbox().Send(EventMessage(id));
    in_flight_during = stream.in_flight();
  });
  loop.Stop();
  EXPECT_EQ(in_flight_during, 0) << "written before the iteration ended";
  ASSERT_EQ(stream.in_flight(), 1);
  EXPECT_THAT(EventIds(stream.last()), ElementsAre(1u, 2u, 3u));
  stream.Complete();
  // Off a loop thread (gRPC's, a command runner's) an event is written at once, as without
  // batches.
  stream.outbox().Send(EventMessage(4));
  EXPECT_EQ(stream.in_flight(), 1);
  EXPECT_THAT(EventIds(stream.last()), ElementsAre(4u));
  stream.Complete();
}

// A guest's event sent on its loop thread goes to a remote handler, whose verdict comes back from
// another thread: the loop is asked to yield before it sleeps (and take the events of the guests
// it woke in the same wake-up). A command's result asks nothing.
TEST(AttachOutboxTest, AnEventSentOnALoopThreadAsksTheLoopToYieldBeforeItSleeps) {
  FakeStream stream;
  stream.outbox().SetMaxBatch(8);
  stream.outbox().Release();
  EventLoop loop;
  loop.SetIdleYields(2);
  loop.Start("test-loop");
  // Runs `body` as one task, then gives the loop 50 ms with nothing posted: the yields the
  // iteration asked for are all taken by then.
  auto yields_after = [&loop](const std::function<void()>& body) {
    std::promise<void> ran;
    loop.Post([&] {
      body();
      ran.set_value();
    });
    ran.get_future().wait();
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    return loop.idle_yields_taken();
  };
  EXPECT_EQ(yields_after([&] { stream.outbox().Send(Message(7)); }), 0u);
  stream.Complete();
  EXPECT_EQ(yields_after([&] { stream.outbox().Send(EventMessage(1)); }), 2u);
  ASSERT_EQ(stream.in_flight(), 1);  // the corked event was flushed at the iteration's end
  stream.Complete();
  loop.Stop();
}

// While a loop's flush is pending: another thread's message is written at once (not held for the
// loop's iteration), the loop's events follow it in order; and a stream aborted meanwhile writes
// nothing more and finishes once.
TEST(AttachOutboxTest, APendingFlushHoldsUpNoOtherThreadAndAnAbortStopsIt) {
  FakeStream stream;
  stream.outbox().SetMaxBatch(8);
  stream.outbox().Release();
  EventLoop loop;
  loop.Start("test-loop");
  int in_flight_after_other = -1;
  RunOneIteration(loop, [&] {
    stream.outbox().Send(EventMessage(1));  // corked until this iteration ends
    std::thread other([&] { stream.outbox().Send(Message(9)); });  // e.g. a command result
    other.join();
    in_flight_after_other = stream.in_flight();
    stream.outbox().Send(EventMessage(2));
  });
  EXPECT_EQ(in_flight_after_other, 1) << "held for the loop's iteration";
  EXPECT_EQ(stream.in_flight(), 1);  // the flush found the write in flight and left it
  EXPECT_THAT(EventIds(stream.last()), ElementsAre(1u));  // taken first: queued first
  stream.Complete();
  EXPECT_EQ(stream.last().command_result().id(), 9u);
  stream.Complete();
  EXPECT_THAT(EventIds(stream.last()), ElementsAre(2u));
  stream.Complete();

  // Aborted with a flush pending: the flush writes nothing, Finish comes once, at once.
  RunOneIteration(loop, [&] {
    stream.outbox().Send(EventMessage(3));
    stream.outbox().RequestFinish(grpc::Status::CANCELLED, /*drain=*/false);
  });
  loop.Stop();
  EXPECT_EQ(stream.in_flight(), 0);
  ASSERT_EQ(stream.finishes().size(), 1u);
  EXPECT_EQ(stream.finishes()[0].error_code(), grpc::StatusCode::CANCELLED);
}

TEST(AttachOutboxTest, ADrainingFinishWithAFlushPendingWritesTheEventsThenFinishes) {
  FakeStream stream;
  stream.outbox().SetMaxBatch(8);
  stream.outbox().Release();
  EventLoop loop;
  loop.Start("test-loop");
  RunOneIteration(loop, [&] {
    stream.outbox().Send(EventMessage(1));
    stream.outbox().Send(EventMessage(2));
    stream.outbox().RequestFinish(grpc::Status::OK, /*drain=*/true);
  });
  loop.Stop();
  EXPECT_THAT(stream.finishes(), IsEmpty());  // the batch is still to be written
  EXPECT_THAT(EventIds(stream.last()), ElementsAre(1u, 2u));
  stream.Complete();
  ASSERT_EQ(stream.finishes().size(), 1u);
  EXPECT_TRUE(stream.finishes()[0].ok());
}

TEST(AttachOutboxTest, WithoutMaxBatchEveryEventIsAMessageOfItsOwn) {
  FakeStream stream;
  stream.outbox().Release();
  stream.outbox().Send(EventMessage(1));
  stream.outbox().Send(EventMessage(2));
  stream.outbox().Send(EventMessage(3));
  stream.Complete();
  EXPECT_TRUE(stream.last().has_event());
  EXPECT_THAT(EventIds(stream.last()), ElementsAre(2u));
  stream.Complete();
  EXPECT_THAT(EventIds(stream.last()), ElementsAre(3u));
  stream.Complete();
}

TEST(AttachOutboxTest, ADrainingFinishWaitsForTheQueueAndHappensOnce) {
  FakeStream stream;
  stream.outbox().Release();
  stream.outbox().Send(Message(1));
  stream.outbox().Send(Message(2));
  stream.outbox().RequestFinish(grpc::Status::OK, /*drain=*/true);
  EXPECT_THAT(stream.finishes(), IsEmpty());  // 1 in flight, 2 queued
  stream.Complete();
  EXPECT_THAT(stream.finishes(), IsEmpty());
  stream.Complete();
  ASSERT_EQ(stream.finishes().size(), 1u);
  EXPECT_TRUE(stream.finishes()[0].ok());
  EXPECT_THAT(stream.started(), ElementsAre(1u, 2u));
  // Later requests neither finish again nor write.
  stream.outbox().RequestFinish(grpc::Status::CANCELLED, /*drain=*/false);
  stream.outbox().Send(Message(3));
  EXPECT_EQ(stream.finishes().size(), 1u);
  EXPECT_THAT(stream.started(), ElementsAre(1u, 2u));
}

TEST(AttachOutboxTest, AnAbortDropsTheQueueAndFinishesAfterTheWriteInFlight) {
  FakeStream stream;
  stream.outbox().Release();
  stream.outbox().Send(Message(1));
  stream.outbox().Send(Message(2));
  grpc::Status failure(grpc::StatusCode::INVALID_ARGUMENT, "bad claim");
  stream.outbox().RequestFinish(failure, /*drain=*/false);
  EXPECT_THAT(stream.finishes(), IsEmpty());  // gRPC still owns message 1
  stream.Complete();
  ASSERT_EQ(stream.finishes().size(), 1u);
  EXPECT_EQ(stream.finishes()[0].error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(stream.started(), ElementsAre(1u));  // 2 was dropped
}

TEST(AttachOutboxTest, AFailedWriteClosesTheOutbox) {
  FakeStream stream;
  stream.outbox().Release();
  stream.outbox().Send(Message(1));
  stream.outbox().Send(Message(2));
  stream.Complete(/*ok=*/false);
  stream.outbox().Send(Message(3));
  EXPECT_THAT(stream.started(), ElementsAre(1u));
  EXPECT_FALSE(stream.outbox().WaitForRoom());  // closed: a waiter gives up
  stream.outbox().RequestFinish(grpc::Status::CANCELLED, /*drain=*/false);
  ASSERT_EQ(stream.finishes().size(), 1u);
  EXPECT_EQ(stream.finishes()[0].error_code(), grpc::StatusCode::CANCELLED);
}

TEST(AttachOutboxTest, ABacklogAtItsLimitIsCongestedUntilTheClientTakesSome) {
  FakeStream stream;
  stream.outbox().Release();
  stream.outbox().Send(Message(0));  // in flight, not backlog
  for (size_t i = 1; i < AttachOutbox::kMaxBacklogMessages; ++i) stream.outbox().Send(Message(i));
  EXPECT_FALSE(stream.outbox().Congested());
  stream.outbox().Send(Message(AttachOutbox::kMaxBacklogMessages));
  EXPECT_TRUE(stream.outbox().Congested());
  // A command runner waiting for room is let go once one write completes.
  std::future<bool> room =
      std::async(std::launch::async, [&] { return stream.outbox().WaitForRoom(); });
  EXPECT_EQ(room.wait_for(std::chrono::milliseconds(50)), std::future_status::timeout);
  stream.Complete();
  ASSERT_EQ(room.wait_for(std::chrono::seconds(10)), std::future_status::ready);
  EXPECT_TRUE(room.get());
  EXPECT_FALSE(stream.outbox().Congested());
}

TEST(AttachOutboxTest, ByteBacklogCountsToo) {
  FakeStream stream;
  stream.outbox().Release();
  stream.outbox().Send(Message(0));  // in flight
  const size_t big = AttachOutbox::kMaxBacklogBytes / 4;
  for (uint64_t i = 1; i <= 3; ++i) stream.outbox().Send(Message(i, big));
  EXPECT_FALSE(stream.outbox().Congested());
  stream.outbox().Send(Message(4, big));
  EXPECT_TRUE(stream.outbox().Congested());
  stream.Complete();  // message 1 leaves the backlog for the wire
  EXPECT_FALSE(stream.outbox().Congested());
}

TEST(AttachOutboxTest, WritesFromManyThreadsAllGoOutOnceEach) {
  FakeStream stream;
  stream.outbox().Release();
  constexpr int kThreads = 4, kEach = 100;
  std::atomic<bool> done{false};
  // The fake client: completes writes as they appear.
  std::thread client([&] {
    size_t completed = 0;
    while (completed < kThreads * kEach) {
      if (stream.in_flight() == 1) {
        stream.Complete();
        ++completed;
      } else {
        std::this_thread::yield();
      }
    }
    done = true;
  });
  std::vector<std::thread> senders;
  senders.reserve(kThreads);
  for (int t = 0; t < kThreads; ++t) {
    senders.emplace_back([&, t] {
      for (int i = 0; i < kEach; ++i) stream.outbox().Send(Message(t * kEach + i));
    });
  }
  for (auto& s : senders) s.join();
  client.join();
  std::vector<uint64_t> started = stream.started();
  std::sort(started.begin(), started.end());
  ASSERT_EQ(started.size(), static_cast<size_t>(kThreads * kEach));
  for (size_t i = 0; i < started.size(); ++i) ASSERT_EQ(started[i], i);
}

TEST(StreamHandlerTest, AVerdictForAnEventNotPendingIsAnsweredWithAnError) {
  FakeStream stream;
  stream.outbox().Release();
  StreamHandler handler("h", stream.shared());
  EXPECT_EQ(handler.id(), "h");
  kvmi::v1::Verdict verdict;
  verdict.set_event_id(42);
  verdict.set_action(kvmi::v1::ACTION_CONTINUE);
  handler.Answer(verdict);
  kvmi::v1::AttachResponse sent = stream.last();
  ASSERT_TRUE(sent.has_error());
  EXPECT_EQ(sent.error().event_id(), 42u);
  EXPECT_THAT(sent.error().message(), HasSubstr("not pending"));
}

TEST(StreamHandlerTest, AnEventIsSentWithoutItsVerdictAndAClosedHandlerSendsNothing) {
  FakeStream stream;
  stream.outbox().Release();
  auto handler = std::make_shared<StreamHandler>("h", stream.shared());
  EventContext ctx;
  ctx.guest = std::make_shared<Guest>("g", GuestIdentity{}, nullptr);
  ctx.event.common.event = KVMI_EVENT_BREAKPOINT;
  ctx.event.common.arch.regs.rip = 0x1234;
  ctx.event_id = 7;
  ctx.deadline = Clock::now() + std::chrono::seconds(5);
  handler->OnBlockingEvent(ctx, VerdictPromise());
  kvmi::v1::AttachResponse sent = stream.last();
  ASSERT_TRUE(sent.has_event());
  EXPECT_EQ(sent.event().id(), 7u);
  EXPECT_EQ(sent.event().rip(), 0x1234u);
  EXPECT_EQ(sent.event().action(), kvmi::v1::ACTION_UNSPECIFIED);
  EXPECT_TRUE(sent.event().decided_by().empty());
  EXPECT_TRUE(sent.event().has_registers());
  // A verdict the event cannot take goes back as an error naming the field.
  stream.Complete();
  kvmi::v1::Verdict keep_old;
  keep_old.set_event_id(7);
  keep_old.set_action(kvmi::v1::ACTION_KEEP_OLD);
  EXPECT_FALSE(handler->Answer(keep_old));  // event 7 still held
  ASSERT_TRUE(stream.last().has_error());
  EXPECT_THAT(stream.last().error().message(), HasSubstr("KEEP_OLD"));
  // ... and the event still waits for a verdict it can take, which takes it.
  EXPECT_EQ(handler->GuestOf(7), ctx.guest);
  stream.Complete();
  kvmi::v1::Verdict proceed;
  proceed.set_event_id(7);
  proceed.set_action(kvmi::v1::ACTION_CONTINUE);
  EXPECT_TRUE(handler->Answer(proceed));  // the last one held
  EXPECT_EQ(handler->GuestOf(7), nullptr);
  EXPECT_EQ(stream.in_flight(), 0);  // no error for a verdict taken

  handler->Close();
  ctx.event_id = 8;
  handler->OnBlockingEvent(ctx, VerdictPromise());
  EXPECT_EQ(stream.in_flight(), 0);  // nothing sent after Close
  EXPECT_EQ(stream.started().size(), 2u);
}

}  // namespace
}  // namespace kvmid::api
