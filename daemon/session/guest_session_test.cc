#include "daemon/session/guest_session.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <spdlog/sinks/ringbuffer_sink.h>
#include <spdlog/spdlog.h>

#include <chrono>
#include <future>
#include <optional>
#include <set>
#include <thread>

#include "daemon/testing/scripted_host.h"
#include "daemon/testing/wait.h"
#include "kernel/abi/protocol.h"

namespace kvmid {
namespace {

using testing::ReceivedMessage;
using testing::ScriptedHost;

class RecordingListener : public GuestSession::Listener {
 public:
  void OnEvent(const std::shared_ptr<GuestSession>&, const kvmi::Event& event) override {
    MutexLock lock(&mutex_);
    events_.push_back(event);
    cv_.SignalAll();
  }
  void OnClosed(const std::shared_ptr<GuestSession>&, const std::string& reason) override {
    MutexLock lock(&mutex_);
    closed_reason_ = reason;
    closed_ = true;
    cv_.SignalAll();
  }
  std::optional<kvmi::Event> WaitEvent() {
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(5);
    MutexLock lock(&mutex_);
    while (events_.empty()) {
      if (!cv_.WaitUntil(&mutex_, deadline) && events_.empty()) return std::nullopt;
    }
    kvmi::Event e = events_.front();
    events_.erase(events_.begin());
    return e;
  }
  std::string WaitClosed() {
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(5);
    MutexLock lock(&mutex_);
    while (!closed_) {
      if (!cv_.WaitUntil(&mutex_, deadline)) break;
    }
    return closed_ ? closed_reason_ : "<not closed>";
  }

 private:
  Mutex mutex_;
  CondVar cv_;
  std::vector<kvmi::Event> events_ ABSL_GUARDED_BY(mutex_);
  bool closed_ ABSL_GUARDED_BY(mutex_) = false;
  std::string closed_reason_ ABSL_GUARDED_BY(mutex_);
};

class GuestSessionTest : public ::testing::Test {
 protected:
  void SetUp() override { loop_.Start("test-loop"); }
  void TearDown() override {
    if (session_) session_->Close("test over");
    listener_.WaitClosed();
    loop_.Stop();
  }

  void StartSession(std::chrono::milliseconds command_timeout = std::chrono::seconds(5),
                    bool consume_on_reply = true, bool reply_on_awake_loop = true) {
    GuestIdentity identity;
    identity.name = "unit";
    GuestSession::Options options;
    options.command_timeout = command_timeout;
    options.consume_on_reply = consume_on_reply;
    options.reply_on_awake_loop = reply_on_awake_loop;
    session_ =
        std::make_shared<GuestSession>(&loop_, host_.Connect(), identity, &listener_, options);
    auto session = session_;
    loop_.RunInLoop([session] { session->Start(); });
  }

  template <typename Request>
  std::future<CommandResult> Send(const Request& request) {
    auto promise = std::make_shared<std::promise<CommandResult>>();
    session_->Send(request, [promise](CommandResult r) { promise->set_value(std::move(r)); });
    return promise->get_future();
  }

  static CommandResult Get(std::future<CommandResult>& f) {
    if (f.wait_for(std::chrono::seconds(5)) != std::future_status::ready) {
      CommandResult r;
      r.status = CommandResult::Status::kInvalid;
      r.message = "test: no completion";
      return r;
    }
    return f.get();
  }

  // Returns once the loop has finished what it was doing (say, the read that delivered an event
  // the listener already saw: the listener hears of it before the read's end).
  void WaitForLoop() {
    std::promise<void> ran;
    loop_.Post([&ran] { ran.set_value(); });
    ran.get_future().wait();
  }

  // Waits (up to 5 s) until the session has taken all but `left` of the bytes the host sent.
  bool WaitUnread(int left) {
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(5);
    while (host_.UnreadBySession() != left) {
      if (std::chrono::steady_clock::now() > deadline) return false;
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    return true;
  }

  EventLoop loop_;
  ScriptedHost host_;
  RecordingListener listener_;
  std::shared_ptr<GuestSession> session_;
};

TEST_F(GuestSessionTest, PipelinedRepliesAreMatchedBySeqWhateverTheirOrder) {
  host_.set_responder([](const ReceivedMessage&) { return std::nullopt; });  // answer by hand
  StartSession();
  kvmi::CheckCommandRequest a, b;
  a.id = KVMI_GET_REGISTERS;
  b.id = KVMI_SET_REGISTERS;
  auto fa = Send(a);
  auto fb = Send(b);
  auto ma = host_.WaitForId(KVMI_CHECK_COMMAND);
  auto mb = host_.WaitForId(KVMI_CHECK_COMMAND);
  ASSERT_TRUE(ma && mb);
  EXPECT_NE(ma->hdr.seq, mb->hdr.seq);
  // Answer the second first, with different results, to prove the matching.
  std::vector<uint8_t> reply;
  kvmi::EncodeReply(KVMI_CHECK_COMMAND, mb->hdr.seq, -KVM_EPERM, {}, &reply);
  kvmi::EncodeReply(KVMI_CHECK_COMMAND, ma->hdr.seq, 0, {}, &reply);
  host_.SendRaw(reply);
  CommandResult ra = Get(fa), rb = Get(fb);
  EXPECT_TRUE(ra.ok()) << ra.ToString();
  EXPECT_EQ(rb.status, CommandResult::Status::kKvmiError);
  EXPECT_EQ(rb.err, -KVM_EPERM);
}

TEST_F(GuestSessionTest, ReplyWithTheWrongIdClosesTheSession) {
  host_.set_responder([](const ReceivedMessage& m) {
    std::vector<uint8_t> out;
    kvmi::EncodeReply(KVMI_GET_GUEST_INFO, m.hdr.seq, 0, {}, &out);  // id does not echo
    return std::optional<std::vector<uint8_t>>(out);
  });
  StartSession();
  auto f = Send(kvmi::GetVersionRequest{});
  CommandResult r = Get(f);
  EXPECT_EQ(r.status, CommandResult::Status::kClosed);
  EXPECT_THAT(listener_.WaitClosed(), ::testing::HasSubstr("reply id does not match"));
}

TEST_F(GuestSessionTest, OversizedHeaderFromTheHostClosesTheSession) {
  StartSession();
  kvmi_msg_hdr hdr{KVMI_EVENT, static_cast<uint16_t>(kvmi::kMaxReplyPayload + 1), 1};
  std::vector<uint8_t> bytes(sizeof(hdr));
  std::memcpy(bytes.data(), &hdr, sizeof(hdr));
  host_.SendRaw(bytes);
  EXPECT_THAT(listener_.WaitClosed(), ::testing::HasSubstr("payload too large"));
}

TEST_F(GuestSessionTest, MalformedEventClosesTheSessionAndFailsPendingCommands) {
  host_.set_responder([](const ReceivedMessage&) { return std::nullopt; });
  StartSession();
  auto pending = Send(kvmi::GetVersionRequest{});
  ASSERT_TRUE(host_.WaitForId(KVMI_GET_VERSION));
  kvmi::Event event = testing::MakeTestEvent(KVMI_EVENT_CR, 0, 1);
  std::vector<uint8_t> wire;
  kvmi::EncodeEvent(event, &wire);
  wire.pop_back();  // kvmi_event_cr one byte short...
  wire[2] -= 1;     // ...and hdr.size says so: the event-specific part is truncated
  host_.SendRaw(wire);
  EXPECT_THAT(listener_.WaitClosed(), ::testing::HasSubstr("event"));
  EXPECT_EQ(Get(pending).status, CommandResult::Status::kClosed);
}

TEST_F(GuestSessionTest, EventReachesTheListenerAndTheReplyBytesMatchTheAbi) {
  StartSession();
  kvmi::Event event = testing::MakeTestEvent(KVMI_EVENT_CR, 2, 5);
  event.specific.cr.cr = 4;
  event.specific.cr.old_value = 0x3000;
  event.specific.cr.new_value = 0x1000;
  host_.SendEvent(event);
  auto got = listener_.WaitEvent();
  ASSERT_TRUE(got);
  EXPECT_EQ(got->specific.cr.new_value, 0x1000u);
  kvmi::EventReply reply = kvmi::MakeEventReply(*got, KVMI_EVENT_ACTION_CONTINUE);
  reply.specific.cr.new_val = 0x3000;
  std::promise<bool> sent;
  session_->ReplyToEvent(reply, {}, [&](bool s) { sent.set_value(s); });
  EXPECT_TRUE(sent.get_future().get());
  auto m = host_.WaitForId(KVMI_EVENT_REPLY);
  ASSERT_TRUE(m);
  // §12: "00 00 18 00 05 00 00 00 | 02 00 .. | 00 01 .. | V" with action CONTINUE, event CR.
  EXPECT_EQ(m->hdr.size, 24);
  EXPECT_EQ(m->hdr.seq, 5u);
  std::vector<uint8_t> expected = {2, 0, 0, 0, 0,    0,    0, 0, 0, 1, 0, 0,
                                   0, 0, 0, 0, 0x00, 0x30, 0, 0, 0, 0, 0, 0};
  EXPECT_EQ(m->payload, expected);
}

// consume_on_reply: the host's thread blocked in recv() is woken whenever bytes it sent are
// freed. The session leaves an event's bytes in the socket until it writes the reply, so that
// thread is woken once, just before the reply, instead of once for the read and once for the reply.
TEST_F(GuestSessionTest, AnEventStaysInTheSocketUntilItsReplyIsWritten) {
  StartSession();
  host_.SendEvent(testing::MakeTestEvent(KVMI_EVENT_CR, 1, 7));
  auto got = listener_.WaitEvent();
  ASSERT_TRUE(got);
  EXPECT_GT(host_.UnreadBySession(), 0);  // still the host's (SIOCOUTQ: bytes and overhead)
  // The read ends with a check of which vCPUs wait: a reply that beats it (the listener hears of
  // the event first) ends the wait, and the next event is read plainly. Correct, but not what
  // this test is about.
  WaitForLoop();
  std::promise<bool> sent;
  session_->ReplyToEvent(kvmi::MakeEventReply(*got, KVMI_EVENT_ACTION_CONTINUE), {},
                         [&](bool s) { sent.set_value(s); });
  EXPECT_TRUE(sent.get_future().get());
  auto m = host_.WaitForId(KVMI_EVENT_REPLY);
  ASSERT_TRUE(m);
  EXPECT_EQ(m->unread_by_session, 0);  // taken before the reply went out
  // The next event is held the same way: nothing was read twice or skipped.
  host_.SendEvent(testing::MakeTestEvent(KVMI_EVENT_XSETBV, 1, 8));
  got = listener_.WaitEvent();
  ASSERT_TRUE(got);
  EXPECT_EQ(got->seq, 8u);
  EXPECT_EQ(got->id(), KVMI_EVENT_XSETBV);
  EXPECT_GT(host_.UnreadBySession(), 0);
}

// Edge-triggered while peeking: bytes and the hang-up in one wake-up still end the session.
TEST_F(GuestSessionTest, AHalfMessageAndAHangUpInOneWakeUpCloseTheSession) {
  std::vector<uint8_t> wire;
  kvmi::EncodeEvent(testing::MakeTestEvent(KVMI_EVENT_CR, 0, 1), &wire);
  wire.resize(wire.size() / 2);
  GuestIdentity identity;
  identity.name = "unit";
  session_ = std::make_shared<GuestSession>(&loop_, host_.Connect(), identity, &listener_,
                                            GuestSession::Options{});
  host_.SendRaw(wire);
  host_.Close();  // before the session reads anything
  auto session = session_;
  loop_.RunInLoop([session] { session->Start(); });
  EXPECT_THAT(listener_.WaitClosed(), ::testing::HasSubstr("peer closed"));
}

// Command replies are taken at once even while a vCPU waits: held, they would fill the host's
// send buffer (the kernel's overhead per small message is far larger than the message), and a
// pipelined command would wait for its replies while the host waits for buffer space.
TEST_F(GuestSessionTest, APipelinedCommandCompletesWhileAVcpuWaits) {
  StartSession();
  host_.SendEvent(testing::MakeTestEvent(KVMI_EVENT_CR, 0, 2));  // vCPU 0 waits throughout
  ASSERT_TRUE(listener_.WaitEvent());
  std::promise<CommandResult> wrote;
  session_->WritePhysical(0, std::vector<uint8_t>(2 << 20, 0x90),
                          [&](CommandResult r) { wrote.set_value(std::move(r)); });
  auto f = wrote.get_future();
  ASSERT_EQ(f.wait_for(std::chrono::seconds(5)), std::future_status::ready);
  CommandResult r = f.get();
  EXPECT_TRUE(r.ok()) << r.ToString();
}

TEST_F(GuestSessionTest, WithoutConsumeOnReplyAnEventIsTakenWhenRead) {
  StartSession(std::chrono::seconds(5), /*consume_on_reply=*/false);
  host_.SendEvent(testing::MakeTestEvent(KVMI_EVENT_CR, 0, 3));
  ASSERT_TRUE(listener_.WaitEvent());
  EXPECT_EQ(host_.UnreadBySession(), 0);
}

TEST_F(GuestSessionTest, BytesNoReplyWillConsumeAreTakenAtOnce) {
  // A command's reply, with no vCPU waiting: nothing would take it later.
  StartSession();
  auto f = Send(kvmi::GetVersionRequest{});
  ASSERT_TRUE(Get(f).ok());
  EXPECT_TRUE(WaitUnread(0)) << host_.UnreadBySession();
  // An event answered at once (as a policy does, on the loop) leaves nothing either.
  host_.SendEvent(testing::MakeTestEvent(KVMI_EVENT_XSETBV, 0, 4));
  auto got = listener_.WaitEvent();
  ASSERT_TRUE(got);
  std::promise<bool> sent;
  loop_.RunInLoop([&, reply = kvmi::MakeEventReply(*got, KVMI_EVENT_ACTION_CONTINUE)] {
    session_->ReplyToEvent(reply, {}, [&](bool s) { sent.set_value(s); });
  });
  EXPECT_TRUE(sent.get_future().get());
  EXPECT_TRUE(WaitUnread(0)) << host_.UnreadBySession();
}

TEST_F(GuestSessionTest, RepliesNobodyWaitsForAreTakenAtOnceWhileAVcpuWaits) {
  host_.set_responder([](const ReceivedMessage&) { return std::nullopt; });  // answer by hand
  StartSession();
  auto f = Send(kvmi::GetVersionRequest{});
  auto m = host_.WaitForId(KVMI_GET_VERSION);
  ASSERT_TRUE(m);
  std::vector<uint8_t> reply;
  kvmi::EncodeReply(KVMI_GET_VERSION, m->hdr.seq, -KVM_EINVAL, {}, &reply);
  host_.SendRaw(reply);
  ASSERT_EQ(Get(f).status, CommandResult::Status::kKvmiError);
  // vCPU 0's event follows a read that left no vCPU waiting: taken at once. vCPU 1's is held.
  host_.SendEvent(testing::MakeTestEvent(KVMI_EVENT_CR, 0, 5));
  ASSERT_TRUE(listener_.WaitEvent());
  EXPECT_EQ(host_.UnreadBySession(), 0);
  host_.SendEvent(testing::MakeTestEvent(KVMI_EVENT_CR, 1, 6));
  ASSERT_TRUE(listener_.WaitEvent());
  ASSERT_GT(host_.UnreadBySession(), 0);
  // Small late replies (the same seq again, skipped), far below the bytes a session may hold:
  // taken at once, with everything before them (held, 200 would take most of the host's send
  // buffer, which also counts the kernel's overhead per message).
  std::vector<uint8_t> late;
  kvmi::EncodeReply(KVMI_GET_VERSION, m->hdr.seq, 0, {}, &late);
  for (int i = 0; i < 200; ++i) host_.SendRaw(late);
  EXPECT_TRUE(WaitUnread(0)) << host_.UnreadBySession();
  EXPECT_EQ(session_->counters().unexpected_replies, 200u);
}

// Several remote verdicts read at once: the guests' loops write them (their threads run at
// io_nice), each loop woken once when the reader is done.
TEST_F(GuestSessionTest, RepliesUnderAHandOffAreWrittenByTheLoop) {
  // (Without reply_on_awake_loop: the last reply below must take the caller's path even if the
  // session's sweep timer has just woken the loop.)
  StartSession(std::chrono::seconds(5), /*consume_on_reply=*/true, /*reply_on_awake_loop=*/false);
  host_.SendEvent(testing::MakeTestEvent(KVMI_EVENT_CR, 0, 11));
  host_.SendEvent(testing::MakeTestEvent(KVMI_EVENT_CR, 1, 12));
  auto a = listener_.WaitEvent();
  auto b = listener_.WaitEvent();
  ASSERT_TRUE(a && b);
  std::promise<EventLoop*> wrote_a, wrote_b;
  {
    EventLoop::HandOff hand_off;
    session_->ReplyToEvent(kvmi::MakeEventReply(*a, KVMI_EVENT_ACTION_CONTINUE), {},
                           [&](bool s) { wrote_a.set_value(s ? EventLoop::Current() : nullptr); });
    session_->ReplyToEvent(kvmi::MakeEventReply(*b, KVMI_EVENT_ACTION_CONTINUE), {},
                           [&](bool s) { wrote_b.set_value(s ? EventLoop::Current() : nullptr); });
  }
  EXPECT_EQ(wrote_a.get_future().get(), &loop_);
  EXPECT_EQ(wrote_b.get_future().get(), &loop_);
  auto ra = host_.WaitForId(KVMI_EVENT_REPLY);
  auto rb = host_.WaitForId(KVMI_EVENT_REPLY);
  ASSERT_TRUE(ra && rb);
  EXPECT_EQ(ra->hdr.seq, 11u);
  EXPECT_EQ(rb->hdr.seq, 12u);
  EXPECT_TRUE(WaitUnread(0));
  // Without a hand-off, the calling thread writes (the latency path: no loop wake-up).
  host_.SendEvent(testing::MakeTestEvent(KVMI_EVENT_CR, 0, 13));
  auto c = listener_.WaitEvent();
  ASSERT_TRUE(c);
  EventLoop not_sent;
  std::promise<EventLoop*> wrote_c;
  session_->ReplyToEvent(kvmi::MakeEventReply(*c, KVMI_EVENT_ACTION_CONTINUE), {},
                         [&](bool s) { wrote_c.set_value(s ? EventLoop::Current() : &not_sent); });
  EXPECT_EQ(wrote_c.get_future().get(), nullptr);
}

// A single remote verdict while the loop is awake anyway: the loop writes it (the Post costs no
// wake-up, and the loop's write is not preempted by the thread it wakes).
TEST_F(GuestSessionTest, ASingleReplyGoesToTheLoopWhileItIsAwake) {
  StartSession();
  host_.SendEvent(testing::MakeTestEvent(KVMI_EVENT_CR, 0, 21));
  auto got = listener_.WaitEvent();
  ASSERT_TRUE(got);
  std::promise<void> running, release;
  loop_.Post([&] {
    running.set_value();
    release.get_future().wait();
  });
  running.get_future().wait();  // the loop is awake until this task returns
  const uint64_t wake_writes = loop_.wake_writes();
  EventLoop not_sent;
  std::promise<EventLoop*> wrote;
  session_->ReplyToEvent(kvmi::MakeEventReply(*got, KVMI_EVENT_ACTION_CONTINUE), {},
                         [&](bool s) { wrote.set_value(s ? EventLoop::Current() : &not_sent); });
  release.set_value();
  EXPECT_EQ(wrote.get_future().get(), &loop_);
  EXPECT_EQ(loop_.wake_writes(), wake_writes);
  auto m = host_.WaitForId(KVMI_EVENT_REPLY);
  ASSERT_TRUE(m);
  EXPECT_EQ(m->hdr.seq, 21u);
}

TEST_F(GuestSessionTest, OnlyTheFirstReplyToAnEventIsSent) {
  StartSession();
  host_.SendEvent(testing::MakeTestEvent(KVMI_EVENT_XSETBV, 0, 9));
  auto got = listener_.WaitEvent();
  ASSERT_TRUE(got);
  std::promise<bool> first, second;
  kvmi::EventReply reply = kvmi::MakeEventReply(*got, KVMI_EVENT_ACTION_CONTINUE);
  session_->ReplyToEvent(reply, {}, [&](bool s) { first.set_value(s); });
  session_->ReplyToEvent(reply, {}, [&](bool s) { second.set_value(s); });
  EXPECT_TRUE(first.get_future().get());
  EXPECT_FALSE(second.get_future().get());
  ASSERT_TRUE(host_.WaitForId(KVMI_EVENT_REPLY));
  EXPECT_FALSE(host_.WaitForId(KVMI_EVENT_REPLY, std::chrono::milliseconds(200)));
}

// Remote verdicts are written by the threads that received them, while the loop writes
// commands: every message must reach the host whole, each reply exactly once.
TEST_F(GuestSessionTest, RepliesFromOtherThreadsInterleaveWithCommandsAndStayWhole) {
  // The repliers write themselves, concurrently (reply_on_awake_loop off: never the loop).
  StartSession(std::chrono::seconds(5), /*consume_on_reply=*/true, /*reply_on_awake_loop=*/false);
  constexpr uint16_t kVcpus = 8;
  constexpr int kRounds = 20;
  constexpr int kCommandsPerRound = 10;
  std::atomic<int> sent{0};
  std::vector<std::future<CommandResult>> commands;
  for (int round = 0; round < kRounds; ++round) {
    std::vector<kvmi::Event> events;
    for (uint16_t vcpu = 0; vcpu < kVcpus; ++vcpu) {
      host_.SendEvent(
          testing::MakeTestEvent(KVMI_EVENT_HYPERCALL, vcpu, round * kVcpus + vcpu + 1));
    }
    for (uint16_t i = 0; i < kVcpus; ++i) {
      auto got = listener_.WaitEvent();
      ASSERT_TRUE(got);
      events.push_back(*got);
    }
    std::vector<std::thread> repliers;
    repliers.reserve(events.size());
    for (const kvmi::Event& event : events) {
      repliers.emplace_back([&, event] {
        kvmi::EventReply reply = kvmi::MakeEventReply(event, KVMI_EVENT_ACTION_CONTINUE);
        session_->ReplyToEvent(reply, {}, [&](bool ok) { sent += ok ? 1 : 0; });
        session_->ReplyToEvent(reply, {}, [&](bool ok) { sent += ok ? 100000 : 0; });  // dropped
      });
    }
    kvmi::GetVersionRequest version;
    for (int i = 0; i < kCommandsPerRound; ++i) commands.push_back(Send(version));
    for (std::thread& t : repliers) t.join();
    // A reply is on the wire once its `done` ran. Only then may the host send the vCPU's next
    // event, as a real one does.
    ASSERT_TRUE(testing::WaitUntil([&] { return sent.load() >= (round + 1) * kVcpus; }));
  }
  EXPECT_EQ(sent.load(), kRounds * kVcpus);
  for (auto& f : commands) EXPECT_TRUE(Get(f).ok());
  std::set<uint32_t> replied;
  for (int i = 0; i < kRounds * kVcpus; ++i) {
    auto m = host_.WaitForId(KVMI_EVENT_REPLY);
    ASSERT_TRUE(m) << "reply " << i;
    EXPECT_TRUE(replied.insert(m->hdr.seq).second) << "seq " << m->hdr.seq << " twice";
  }
  EXPECT_EQ(replied.size(), static_cast<size_t>(kRounds * kVcpus));
  EXPECT_FALSE(host_.WaitForId(KVMI_EVENT_REPLY, std::chrono::milliseconds(100)));
}

// A remote verdict's writer holds the write lock across its send() and the observers; the loop
// must go on taking events meanwhile (the same vCPU's next one, which the host may send as soon as
// the reply is on the wire, and every other vCPU's), not wait for that writer.
TEST_F(GuestSessionTest, EventsReachTheListenerWhileAnotherThreadsReplyRunsItsObservers) {
  // The other thread writes whatever the loop is doing (reply_on_awake_loop off): handed to the
  // loop, the reply's observers would hold the loop (observers must not block; this one only
  // stands for a slow one).
  StartSession(std::chrono::seconds(5), /*consume_on_reply=*/true, /*reply_on_awake_loop=*/false);
  host_.SendEvent(testing::MakeTestEvent(KVMI_EVENT_CR, 0, 1));
  auto first = listener_.WaitEvent();
  ASSERT_TRUE(first);
  std::promise<void> observing, release;
  std::shared_future<void> released = release.get_future().share();
  std::thread replier([&] {
    session_->ReplyToEvent(kvmi::MakeEventReply(*first, KVMI_EVENT_ACTION_CONTINUE), {},
                           [&](bool sent) {
                             EXPECT_TRUE(sent);
                             observing.set_value();
                             released.wait();  // a slow observer, inside the write lock
                           });
  });
  const bool observed =
      observing.get_future().wait_for(std::chrono::seconds(5)) == std::future_status::ready;
  // On the wire before the observers ran.
  const bool replied = observed && host_.WaitForId(KVMI_EVENT_REPLY).has_value();
  std::optional<kvmi::Event> next, other;
  if (replied) {
    host_.SendEvent(testing::MakeTestEvent(KVMI_EVENT_CR, 0, 2));  // the vCPU's next event
    host_.SendEvent(testing::MakeTestEvent(KVMI_EVENT_XSETBV, 1, 3));
    next = listener_.WaitEvent();
    other = listener_.WaitEvent();
  }
  release.set_value();
  replier.join();
  ASSERT_TRUE(observed) << "the reply's observer never ran";
  ASSERT_TRUE(replied);
  ASSERT_TRUE(next);
  ASSERT_TRUE(other);
  EXPECT_EQ(next->seq, 2u);
  EXPECT_EQ(other->seq, 3u);
  // The next event is answered as usual.
  std::promise<bool> sent;
  session_->ReplyToEvent(kvmi::MakeEventReply(*next, KVMI_EVENT_ACTION_CONTINUE), {},
                         [&](bool s) { sent.set_value(s); });
  EXPECT_TRUE(sent.get_future().get());
  auto m = host_.WaitForId(KVMI_EVENT_REPLY);
  ASSERT_TRUE(m);
  EXPECT_EQ(m->hdr.seq, 2u);
}

TEST_F(GuestSessionTest, ASecondOutstandingEventOnOneVcpuIsAProtocolError) {
  StartSession();
  host_.SendEvent(testing::MakeTestEvent(KVMI_EVENT_XSETBV, 1, 1));
  host_.SendEvent(testing::MakeTestEvent(KVMI_EVENT_HYPERCALL, 1, 2));
  EXPECT_THAT(listener_.WaitClosed(), ::testing::HasSubstr("two outstanding events"));
}

TEST_F(GuestSessionTest, BatchedReplyGoesOutInCmdResponseBrackets) {
  StartSession();
  host_.SendEvent(testing::MakeTestEvent(KVMI_EVENT_BREAKPOINT, 0, 3));
  auto got = listener_.WaitEvent();
  ASSERT_TRUE(got);
  kvmi::SetRegistersRequest set;
  set.vcpu = 0;
  set.regs.rip = 0x1234;
  std::vector<std::vector<uint8_t>> batched(1);
  kvmi::EncodeCommand(set, 0, &batched[0]);
  session_->ReplyToEvent(kvmi::MakeEventReply(*got, KVMI_EVENT_ACTION_RETRY), std::move(batched));
  std::vector<uint16_t> ids;
  for (int i = 0; i < 4; ++i) {
    auto m = host_.WaitFor([](const ReceivedMessage&) { return true; });
    ASSERT_TRUE(m);
    ids.push_back(m->hdr.id);
    if (m->hdr.id == KVMI_CONTROL_CMD_RESPONSE) {
      kvmi::ControlCmdResponseRequest r;
      ASSERT_TRUE(kvmi::DecodePayload(kvmi::ByteView(m->payload), &r).ok());
      EXPECT_EQ(r.enable, i != 0);
      EXPECT_TRUE(r.now);
    }
  }
  EXPECT_THAT(ids, ::testing::ElementsAre(KVMI_CONTROL_CMD_RESPONSE, KVMI_SET_REGISTERS,
                                          KVMI_EVENT_REPLY, KVMI_CONTROL_CMD_RESPONSE));
}

// Issue 13: a host that decides a command's reply when it runs the command (not when it receives
// it) answers the SET_REGISTERS of a batched event reply although replies were disabled. That
// reply answers nothing of ours: it is skipped by its size (here with data that looks like a
// header), counted, logged once per guest, and the session stays in step.
TEST_F(GuestSessionTest, RepliesNobodyWaitsForAreSkippedCountedAndLoggedOnce) {
  auto ring = std::make_shared<spdlog::sinks::ringbuffer_sink_mt>(64);
  auto previous = spdlog::default_logger();
  spdlog::set_default_logger(std::make_shared<spdlog::logger>("ring", ring));
  // A wrong host: answers every command, even inside CMD_RESPONSE(off) brackets, and answers
  // SET_REGISTERS with reply data that a confused reader would take for a header.
  host_.set_responder([](const ReceivedMessage& m) -> std::optional<std::vector<uint8_t>> {
    std::vector<uint8_t> out;
    if (m.hdr.id == KVMI_SET_REGISTERS) {
      std::vector<uint8_t> junk(24, 0);
      kvmi_msg_hdr fake{KVMI_EVENT, 0, 77};
      std::memcpy(junk.data(), &fake, sizeof(fake));
      kvmi::EncodeReply(m.hdr.id, m.hdr.seq, 0, kvmi::ByteView(junk), &out);
    } else {
      std::vector<uint8_t> data;
      if (m.hdr.id == KVMI_GET_VERSION) {
        kvmi::ByteWriter w(&data);
        kvmi::EncodeReplyData(kvmi::GetVersionReply{KVMI_VERSION}, w);
      }
      kvmi::EncodeReply(m.hdr.id, m.hdr.seq, 0, kvmi::ByteView(data), &out);
    }
    return out;
  });
  StartSession();
  constexpr int kRounds = 3;
  for (int round = 0; round < kRounds; ++round) {
    host_.SendEvent(testing::MakeTestEvent(KVMI_EVENT_BREAKPOINT, 0, 10 + round));
    auto got = listener_.WaitEvent();
    ASSERT_TRUE(got) << "round " << round;
    kvmi::SetRegistersRequest set;
    set.vcpu = 0;
    set.regs.rip = 0x1000 + round;
    std::vector<std::vector<uint8_t>> batched(1);
    kvmi::EncodeCommand(set, 0, &batched[0]);
    session_->ReplyToEvent(kvmi::MakeEventReply(*got, KVMI_EVENT_ACTION_CONTINUE),
                           std::move(batched));
    ASSERT_TRUE(host_.WaitForId(KVMI_EVENT_REPLY)) << "round " << round;
    // Pipelined commands still get their own replies, matched by seq.
    auto version = Send(kvmi::GetVersionRequest{});
    CommandResult r = Get(version);
    ASSERT_TRUE(r.ok()) << r.ToString();
  }
  // Per round: the CMD_RESPONSE(off) and the SET_REGISTERS replies are unexpected; the closing
  // CMD_RESPONSE and GET_VERSION replies were awaited.
  const uint64_t unexpected = session_->counters().unexpected_replies.load();
  EXPECT_EQ(unexpected, 2u * kRounds);
  EXPECT_FALSE(session_->closed());
  int lines = 0;
  for (const std::string& line : ring->last_formatted()) {
    if (line.find("answers no pending command") != std::string::npos) ++lines;
  }
  spdlog::set_default_logger(previous);
  EXPECT_EQ(lines, 1);
}

// A command for a vCPU that waits for no event reply never leaves, and says which vCPU.
TEST_F(GuestSessionTest, ACommandWhileNoEventWaitsNamesTheVcpu) {
  StartSession();
  auto promise = std::make_shared<std::promise<CommandResult>>();
  kvmi::SetRegistersRequest set;
  set.vcpu = 3;
  session_->SendWhileVcpuWaits(3, set,
                               [promise](const CommandResult& r) { promise->set_value(r); });
  auto future = promise->get_future();
  CommandResult r = Get(future);
  EXPECT_EQ(r.status, CommandResult::Status::kNotWaiting);
  EXPECT_EQ(r.message, "vCPU 3 has no event pending");
}

// A command bound to one event (SetRegisters with event_id) goes out only while the vCPU waits
// with that event: late, it is refused, and never lands on the vCPU's next exit.
TEST_F(GuestSessionTest, ACommandForOneEventNeverLandsOnTheVcpusNextOne) {
  StartSession();
  auto note = [this](uint32_t seq, uint64_t event_id) {  // what the pipeline does in OnEvent
    std::promise<void> noted;
    loop_.RunInLoop([&] {
      session_->NoteEventId(0, seq, event_id);
      noted.set_value();
    });
    noted.get_future().wait();
  };
  kvmi::SetRegistersRequest set;
  set.vcpu = 0;
  set.regs.rax = 0x6b766d6964;
  // Sends SET_REGISTERS bound to `event_id` (0: unbound): "sent" if the host got it, else the
  // refusal's message (and nothing reached the host).
  auto send_for = [&](uint64_t event_id) -> std::string {
    auto promise = std::make_shared<std::promise<CommandResult>>();
    session_->SendWhileVcpuWaits(
        0, set, [promise](const CommandResult& r) { promise->set_value(r); }, event_id);
    auto future = promise->get_future();
    CommandResult r = Get(future);
    if (r.ok()) return host_.WaitForId(KVMI_SET_REGISTERS) ? "sent" : "ok, but not on the wire";
    if (r.status != CommandResult::Status::kNotWaiting) return "unexpected: " + r.ToString();
    if (host_.WaitForId(KVMI_SET_REGISTERS, std::chrono::milliseconds(100))) return "sent anyway";
    return r.message;
  };
  auto answer = [&](const kvmi::Event& event) {  // as the verdict, or a deadline's fallback
    std::promise<bool> sent;
    session_->ReplyToEvent(kvmi::MakeEventReply(event, KVMI_EVENT_ACTION_CONTINUE), {},
                           [&](bool s) { sent.set_value(s); });
    return sent.get_future().get();
  };

  host_.SendEvent(testing::MakeTestEvent(KVMI_EVENT_BREAKPOINT, 0, 21));
  auto first = listener_.WaitEvent();
  ASSERT_TRUE(first);
  note(21, 700);
  EXPECT_EQ(send_for(699), "vCPU 0 does not wait for event 699 (it waits for event 700)");
  EXPECT_EQ(send_for(700), "sent");

  // The event is answered; the vCPU's next exit has another id.
  ASSERT_TRUE(answer(*first));
  EXPECT_EQ(send_for(700), "vCPU 0 does not wait for event 700 (no event pending)");
  host_.SendEvent(testing::MakeTestEvent(KVMI_EVENT_BREAKPOINT, 0, 22));
  auto second = listener_.WaitEvent();
  ASSERT_TRUE(second);
  note(21, 700);  // an id for an event no longer waited with changes nothing
  note(22, 701);
  EXPECT_EQ(send_for(700), "vCPU 0 does not wait for event 700 (it waits for event 701)");
  // Unbound (0): whatever event the vCPU waits with, as before.
  EXPECT_EQ(send_for(0), "sent");
  // An event whose id was never noted (one kvmid answers itself, say CREATE_VCPU) matches no id.
  ASSERT_TRUE(answer(*second));
  host_.SendEvent(testing::MakeTestEvent(KVMI_EVENT_BREAKPOINT, 0, 23));
  ASSERT_TRUE(listener_.WaitEvent());
  EXPECT_EQ(send_for(701),
            "vCPU 0 does not wait for event 701 (it waits for an event kvmid answers itself)");
}

TEST_F(GuestSessionTest, ReadPhysicalIsSplitAtPageBoundariesAndReassembled) {
  StartSession();
  auto promise = std::make_shared<std::promise<CommandResult>>();
  constexpr uint64_t kGpa = 0x1ff0, kSize = 10000;
  session_->ReadPhysical(kGpa, kSize, [promise](const CommandResult& r) { promise->set_value(r); });
  auto future = promise->get_future();
  CommandResult r = Get(future);
  ASSERT_TRUE(r.ok()) << r.ToString();
  ASSERT_EQ(r.data.size(), kSize);
  for (uint64_t i = 0; i < kSize; ++i) {
    ASSERT_EQ(r.data[i], static_cast<uint8_t>(kGpa + i)) << "byte " << i;
  }
  // 0x1ff0..0x2000, then two full pages, then the rest: 4 messages, none crossing a page.
  for (int i = 0; i < 4; ++i) {
    auto m = host_.WaitForId(KVMI_READ_PHYSICAL);
    ASSERT_TRUE(m);
    kvmi::ReadPhysicalRequest req;
    ASSERT_TRUE(kvmi::DecodePayload(kvmi::ByteView(m->payload), &req).ok());
    EXPECT_LE(req.gpa % 4096 + req.size, 4096u);
  }
  EXPECT_FALSE(host_.WaitForId(KVMI_READ_PHYSICAL, std::chrono::milliseconds(100)));
}

TEST_F(GuestSessionTest, WritePhysicalRespectsTheMessageSizeLimit) {
  StartSession();
  std::vector<uint8_t> data(9000, 0xab);
  auto promise = std::make_shared<std::promise<CommandResult>>();
  session_->WritePhysical(0, data, [promise](const CommandResult& r) { promise->set_value(r); });
  auto future = promise->get_future();
  ASSERT_TRUE(Get(future).ok());
  uint64_t total = 0;
  std::vector<uint64_t> sizes;
  while (auto m = host_.WaitForId(KVMI_WRITE_PHYSICAL, std::chrono::milliseconds(200))) {
    EXPECT_LE(m->hdr.size, kvmi::kMaxCommandPayload);
    kvmi::WritePhysicalRequest req;
    ASSERT_TRUE(kvmi::DecodePayload(kvmi::ByteView(m->payload), &req).ok());
    EXPECT_LE(req.gpa % 4096 + req.size, 4096u);
    sizes.push_back(req.size);
    total += req.size;
  }
  EXPECT_EQ(total, 9000u);
  EXPECT_THAT(sizes, ::testing::ElementsAre(4072, 24, 4072, 24, 808));
}

TEST_F(GuestSessionTest, SetPageAccessIsSplitIntoMessagesOf255Entries) {
  StartSession();
  std::vector<kvmi::PageAccess> entries(600);
  for (size_t i = 0; i < entries.size(); ++i) {
    entries[i].gpa = i * 4096;
    entries[i].access = KVMI_PAGE_ACCESS_R;
  }
  std::promise<std::vector<int32_t>> per_entry;
  session_->SetPageAccess(
      entries, [&](const std::vector<CommandResult>& messages, const std::vector<int32_t>& errs) {
        EXPECT_EQ(messages.size(), 3u);
        per_entry.set_value(errs);
      });
  auto errs = per_entry.get_future().get();
  EXPECT_EQ(errs.size(), 600u);
  std::vector<size_t> counts;
  for (int i = 0; i < 3; ++i) {
    auto m = host_.WaitForId(KVMI_SET_PAGE_ACCESS);
    ASSERT_TRUE(m);
    kvmi::SetPageAccessRequest req;
    ASSERT_TRUE(kvmi::DecodePayload(kvmi::ByteView(m->payload), &req).ok());
    counts.push_back(req.entries.size());
  }
  EXPECT_THAT(counts, ::testing::ElementsAre(255, 255, 90));
}

// Answers GET_PAGE_ACCESS with an access mask derived from each GPA (its page number's low
// bits), so that a piece answered out of place shows; a GPA of `fail_gpa` fails its message.
ScriptedHost::Responder PageAccessResponder(ScriptedHost* host, uint64_t fail_gpa = 1) {
  return [host, fail_gpa](const ReceivedMessage& m) -> std::optional<std::vector<uint8_t>> {
    if (m.hdr.id != KVMI_GET_PAGE_ACCESS) return host->DefaultReply(m);
    kvmi::GetPageAccessRequest request;
    if (!kvmi::DecodePayload(kvmi::ByteView(m.payload), &request).ok()) return std::nullopt;
    std::vector<uint8_t> out;
    std::vector<uint8_t> data;
    for (uint64_t gpa : request.gpas) {
      if (gpa == fail_gpa) {
        kvmi::EncodeReply(m.hdr.id, m.hdr.seq, -KVM_EINVAL, {}, &out);
        return out;
      }
      data.push_back(static_cast<uint8_t>((gpa >> 12) & 7));
    }
    kvmi::EncodeReply(m.hdr.id, m.hdr.seq, 0, kvmi::ByteView(data), &out);
    return out;
  };
}

struct PageAccessOutcome {
  CommandResult result;
  std::vector<uint8_t> access;
};

TEST_F(GuestSessionTest, GetPageAccessIsPipelinedInPiecesThatFitAMessageAndAnsweredInOrder) {
  host_.set_responder(PageAccessResponder(&host_));
  StartSession();
  constexpr size_t kCount = 2 * kvmi::kMaxGetPageAccessGpas + 7;  // three messages
  std::vector<uint64_t> gpas(kCount);
  for (size_t i = 0; i < kCount; ++i) gpas[i] = (kCount - i) * 4096;  // descending
  std::promise<PageAccessOutcome> promise;
  session_->GetPageAccess(gpas, [&](CommandResult r, std::vector<uint8_t> access) {
    promise.set_value({std::move(r), std::move(access)});
  });
  auto future = promise.get_future();
  ASSERT_EQ(future.wait_for(std::chrono::seconds(5)), std::future_status::ready);
  PageAccessOutcome outcome = future.get();
  ASSERT_TRUE(outcome.result.ok()) << outcome.result.ToString();
  ASSERT_EQ(outcome.access.size(), kCount);
  for (size_t i = 0; i < kCount; ++i) {
    ASSERT_EQ(outcome.access[i], static_cast<uint8_t>((kCount - i) & 7)) << "gpa " << i;
  }
  std::vector<size_t> counts;
  for (int i = 0; i < 3; ++i) {
    auto m = host_.WaitForId(KVMI_GET_PAGE_ACCESS);
    ASSERT_TRUE(m);
    EXPECT_LE(m->hdr.size, kvmi::kMaxCommandPayload);
    kvmi::GetPageAccessRequest req;
    ASSERT_TRUE(kvmi::DecodePayload(kvmi::ByteView(m->payload), &req).ok());
    counts.push_back(req.gpas.size());
  }
  EXPECT_THAT(counts,
              ::testing::ElementsAre(kvmi::kMaxGetPageAccessGpas, kvmi::kMaxGetPageAccessGpas, 7u));
  EXPECT_FALSE(host_.WaitForId(KVMI_GET_PAGE_ACCESS, std::chrono::milliseconds(100)));
}

TEST_F(GuestSessionTest, GetPageAccessReportsTheFailingPieceAndNoMasks) {
  constexpr uint64_t kBad = 0xbad000;
  host_.set_responder(PageAccessResponder(&host_, kBad));
  StartSession();
  std::vector<uint64_t> gpas(kvmi::kMaxGetPageAccessGpas + 1, 0x1000);
  gpas.back() = kBad;  // the second piece fails
  std::promise<PageAccessOutcome> promise;
  session_->GetPageAccess(gpas, [&](CommandResult r, std::vector<uint8_t> access) {
    promise.set_value({std::move(r), std::move(access)});
  });
  auto future = promise.get_future();
  ASSERT_EQ(future.wait_for(std::chrono::seconds(5)), std::future_status::ready);
  PageAccessOutcome outcome = future.get();
  EXPECT_EQ(outcome.result.status, CommandResult::Status::kKvmiError);
  EXPECT_EQ(outcome.result.err, -KVM_EINVAL);
  EXPECT_TRUE(outcome.access.empty());

  std::promise<PageAccessOutcome> none;
  session_->GetPageAccess({}, [&](CommandResult r, std::vector<uint8_t> access) {
    none.set_value({std::move(r), std::move(access)});
  });
  EXPECT_EQ(none.get_future().get().result.status, CommandResult::Status::kInvalid);
}

TEST_F(GuestSessionTest, ACommandTooLargeForTheKernelNeverLeaves) {
  StartSession();
  kvmi::GetPageAccessRequest huge;
  huge.gpas.resize(600);  // 8 + 600 * 8 > 4088
  auto f = Send(huge);
  CommandResult r = Get(f);
  EXPECT_EQ(r.status, CommandResult::Status::kInvalid);
  EXPECT_THAT(r.message, ::testing::HasSubstr("4088"));
  EXPECT_FALSE(host_.WaitForId(KVMI_GET_PAGE_ACCESS, std::chrono::milliseconds(100)));
}

TEST_F(GuestSessionTest, UnansweredCommandTimesOut) {
  host_.set_responder([](const ReceivedMessage&) { return std::nullopt; });
  StartSession(std::chrono::milliseconds(150));
  auto f = Send(kvmi::GetGuestInfoRequest{});
  EXPECT_EQ(Get(f).status, CommandResult::Status::kTimeout);
}

}  // namespace
}  // namespace kvmid
