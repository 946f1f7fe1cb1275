// The shared ring and its fan-out alone (no gRPC): streams whose filter cannot match an event's
// type cost no work, a stalled stream is skipped and then told what it lost, resume, per-stream
// order, streams ending while the delivery thread holds them, and a reload of the authorization
// re-deciding an open stream's visibility.
#include "daemon/api/event_fanout.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <atomic>
#include <memory>
#include <thread>
#include <vector>

#include "daemon/api/limits.h"
#include "daemon/base/mutex.h"
#include "daemon/metrics/hooks.h"
#include "daemon/testing/wait.h"

namespace kvmid::api {
namespace {

using testing::WaitUntil;

// A stream's side: records what it was asked to write; the test completes each write.
class FakeSink : public EventFanout::Sink {
 public:
  struct Written {
    uint64_t event_id = 0;  // 0: a drop notice or a heartbeat
    uint64_t dropped = 0;
    bool heartbeat = false;
    uint64_t last_event_id = 0;  // a heartbeat's
  };

  void Open(EventFanout* fanout, std::unique_ptr<EventFanout::Subscription> sub) {
    fanout_ = fanout;
    sub_ = std::move(sub);
    fanout_->Start(sub_.get());
  }
  void StartWrite(const ObservedEvent* event, uint64_t dropped) override {
    MutexLock lock(&mu_);
    EXPECT_FALSE(in_flight_) << "two writes at once";
    EXPECT_FALSE(finished_) << "a write after Finish";
    in_flight_ = true;
    written_.push_back(Written{event != nullptr ? event->event_id : 0, dropped});
  }
  void StartHeartbeat(uint64_t last_event_id) override {
    MutexLock lock(&mu_);
    EXPECT_FALSE(in_flight_) << "two writes at once";
    EXPECT_FALSE(finished_) << "a write after Finish";
    in_flight_ = true;
    written_.push_back(Written{0, 0, true, last_event_id});
  }
  void Finish() override {
    MutexLock lock(&mu_);
    EXPECT_FALSE(in_flight_) << "Finish with a write in flight";
    EXPECT_FALSE(finished_) << "Finish twice";
    finished_ = true;
  }
  // Completes the write in flight, if any (gRPC's OnWriteDone).
  bool Complete(bool ok = true) {
    {
      MutexLock lock(&mu_);
      if (!in_flight_) return false;
      in_flight_ = false;
    }
    fanout_->WriteDone(sub_.get(), ok);
    return true;
  }
  void Cancel() { fanout_->Cancel(sub_.get()); }

  std::vector<Written> written() const {
    MutexLock lock(&mu_);
    return written_;
  }
  size_t count() const {
    MutexLock lock(&mu_);
    return written_.size();
  }
  bool in_flight() const {
    MutexLock lock(&mu_);
    return in_flight_;
  }
  bool finished() const {
    MutexLock lock(&mu_);
    return finished_;
  }

 private:
  EventFanout* fanout_ = nullptr;
  std::unique_ptr<EventFanout::Subscription> sub_;
  mutable Mutex mu_;
  std::vector<Written> written_ ABSL_GUARDED_BY(mu_);
  bool in_flight_ ABSL_GUARDED_BY(mu_) = false;
  bool finished_ ABSL_GUARDED_BY(mu_) = false;
};

CompiledFilter Filter(std::initializer_list<uint8_t> types) {
  CompiledFilter f;
  f.empty = false;
  f.events.insert(types.begin(), types.end());
  return f;
}
// One allow filter of these types (none: every type).
StreamFilter Allow(std::initializer_list<uint8_t> types) {
  StreamFilter f;
  f.allow.push_back(Filter(types));
  return f;
}

class FanoutTest : public ::testing::Test {
 protected:
  explicit FanoutTest(size_t capacity = 1024)
      : pipeline_(&policies_, VerdictPipeline::Options{}),
        guest_(std::make_shared<Guest>("g", GuestIdentity{}, nullptr)),
        ring_(&pipeline_, capacity),
        fanout_(std::make_unique<EventFanout>(&ring_)) {}

  void Emit(uint8_t type) {
    ObservedEvent o;
    o.guest = guest_;
    o.event.common.event = type;
    o.event_id = ++next_id_;
    ring_.Append(o);
  }
  std::unique_ptr<FakeSink> Open(StreamFilter filter, uint64_t max_behind = 0,
                                 std::unique_ptr<VisibleGuests> visible = nullptr,
                                 std::chrono::nanoseconds heartbeat = {}) {
    auto sink = std::make_unique<FakeSink>();
    sink->Open(fanout_.get(), fanout_->Subscribe(sink.get(), std::move(filter), std::move(visible),
                                                 max_behind, ring_.head(), 0, heartbeat));
    return sink;
  }
  // Ends a stream as gRPC does (cancel, complete what is in flight), until it finished.
  void End(FakeSink* sink) {
    sink->Cancel();
    sink->Complete(false);
    ASSERT_TRUE(WaitUntil([&] { return sink->finished(); }));
  }

  PolicySet policies_;
  VerdictPipeline pipeline_;
  std::shared_ptr<Guest> guest_;
  EventHistory ring_;
  std::unique_ptr<EventFanout> fanout_;
  uint64_t next_id_ = 0;
};

TEST_F(FanoutTest, StreamsThatCannotMatchAnEventsTypeCostNothing) {
  constexpr int kStreams = 1000;
  std::vector<std::unique_ptr<FakeSink>> idle;
  idle.reserve(kStreams);
  for (int i = 0; i < kStreams; ++i) idle.push_back(Open(Allow({KVMI_EVENT_BREAKPOINT})));
  EXPECT_EQ(fanout_->waiting(), static_cast<size_t>(kStreams));

  for (int i = 0; i < 5000; ++i) Emit(KVMI_EVENT_CR);
  // Nothing looked at any of them: no filter ran, nothing was written.
  EXPECT_TRUE(WaitUntil([&] { return fanout_->waiting() == kStreams; }));
  EXPECT_EQ(fanout_->filter_evaluations(), 0u);
  for (const auto& s : idle) EXPECT_EQ(s->count(), 0u);

  // An event of their type: each is evaluated once and gets it.
  Emit(KVMI_EVENT_BREAKPOINT);
  for (const auto& s : idle) {
    ASSERT_TRUE(WaitUntil([&] { return s->count() == 1; }));
    EXPECT_EQ(s->written()[0].event_id, next_id_);
  }
  EXPECT_EQ(fanout_->filter_evaluations(), static_cast<uint64_t>(kStreams));
  for (const auto& s : idle) End(s.get());
  EXPECT_EQ(fanout_->waiting(), 0u);
}

class SmallRingTest : public FanoutTest {
 protected:
  SmallRingTest() : FanoutTest(8) {}
};

TEST_F(SmallRingTest, AStalledStreamIsSkippedThenToldWhatItLostThenGetsTheNewest) {
  auto stalled = Open(Allow({}));  // every type
  Emit(KVMI_EVENT_CR);             // seq 1, id 1
  ASSERT_TRUE(WaitUntil([&] { return stalled->in_flight(); }));
  const uint64_t evaluations = fanout_->filter_evaluations();
  for (int i = 0; i < 20; ++i) Emit(KVMI_EVENT_CR);  // ids 2..21; the ring keeps 14..21
  // The client does not read: the stream with a write in flight is not looked at.
  EXPECT_EQ(fanout_->filter_evaluations(), evaluations);

  ASSERT_TRUE(stalled->Complete());  // it reads again
  ASSERT_TRUE(stalled->in_flight());
  ASSERT_TRUE(stalled->written().back().event_id == 0);
  // Ids 2..17: 2..13 overwritten, then on to half the ring behind the head (not the oldest slot,
  // the next to be overwritten while the notice is written).
  EXPECT_EQ(stalled->written().back().dropped, 16u);
  for (uint64_t id = 18; id <= 21; ++id) {
    ASSERT_TRUE(stalled->Complete());
    ASSERT_TRUE(stalled->in_flight()) << id;
    EXPECT_EQ(stalled->written().back().event_id, id);
  }
  ASSERT_TRUE(stalled->Complete());
  EXPECT_FALSE(stalled->in_flight());  // caught up: waiting
  EXPECT_EQ(fanout_->waiting(), 1u);
  End(stalled.get());
}

// After a loss the stream gets events again while new ones keep coming (it does not restart at
// the oldest slot, the next to be overwritten, and lose again on every write).
TEST_F(SmallRingTest, AfterALossTheStreamGetsEventsNotOnlyNotices) {
  auto stream = Open(Allow({}));
  Emit(KVMI_EVENT_CR);
  ASSERT_TRUE(WaitUntil([&] { return stream->in_flight(); }));
  for (int i = 0; i < 20; ++i) Emit(KVMI_EVENT_CR);  // overflows the ring of 8
  size_t events = 0, notices = 0;
  for (int i = 0; i < 20; ++i) {
    ASSERT_TRUE(stream->Complete());
    Emit(KVMI_EVENT_CR);  // one more event during every write
    ASSERT_TRUE(stream->in_flight());
    (stream->written().back().event_id != 0 ? events : notices)++;
  }
  EXPECT_EQ(notices, 1u);
  EXPECT_EQ(events, 19u);
  End(stream.get());
}

TEST_F(SmallRingTest, MaxBehindCountsWhatTheStreamFellBehind) {
  auto slow = Open(Allow({}), /*max_behind=*/2);
  Emit(KVMI_EVENT_CR);
  ASSERT_TRUE(WaitUntil([&] { return slow->in_flight(); }));
  for (int i = 0; i < 5; ++i) Emit(KVMI_EVENT_CR);  // ids 2..6; 2 behind: 5, 6
  ASSERT_TRUE(slow->Complete());
  EXPECT_EQ(slow->written().back().dropped, 4u);  // ids 2..5: on to half the window (1) behind
  ASSERT_TRUE(slow->Complete());
  EXPECT_EQ(slow->written().back().event_id, 6u);
  End(slow.get());
}

TEST_F(SmallRingTest, ResumeStartsAfterTheCursorAndCountsWhatIsGone) {
  for (int i = 0; i < 6; ++i) Emit(KVMI_EVENT_CR);  // ids 1..6, all held
  uint64_t lost = 0;
  const uint64_t cursor = ring_.CursorAfter(3, &lost);
  EXPECT_EQ(lost, 0u);
  auto resumed = std::make_unique<FakeSink>();
  resumed->Open(fanout_.get(),
                fanout_->Subscribe(resumed.get(), Allow({}), nullptr, 0, cursor, lost));
  for (uint64_t id = 4; id <= 6; ++id) {
    ASSERT_TRUE(resumed->in_flight());
    EXPECT_EQ(resumed->written().back().event_id, id);
    resumed->Complete();
  }
  EXPECT_FALSE(resumed->in_flight());
  EXPECT_EQ(resumed->count(), 3u);  // nothing twice

  for (int i = 0; i < 6; ++i) Emit(KVMI_EVENT_CR);  // ids 7..12: the ring holds 5..12
  ASSERT_TRUE(WaitUntil([&] { return resumed->in_flight(); }));
  End(resumed.get());
  const uint64_t old = ring_.CursorAfter(2, &lost);
  EXPECT_EQ(lost, 2u);  // ids 3 and 4
  EXPECT_EQ(old, ring_.tail());
  // A stream resumed there is told first, and the loss is counted like any other drop.
  const uint64_t dropped_before = Metrics::Read().stream_events_dropped;
  auto late = std::make_unique<FakeSink>();
  late->Open(fanout_.get(), fanout_->Subscribe(late.get(), Allow({}), nullptr, 0, old, lost));
  ASSERT_TRUE(late->in_flight());
  EXPECT_EQ(late->written().back().event_id, 0u);
  EXPECT_EQ(late->written().back().dropped, 2u);
  EXPECT_EQ(Metrics::Read().stream_events_dropped - dropped_before, 2u);
  late->Complete();
  ASSERT_TRUE(late->in_flight());
  EXPECT_EQ(late->written().back().event_id, 5u);
  End(late.get());
  EXPECT_EQ(ring_.CursorAfter(99, &lost), ring_.head());  // from the future: live
  EXPECT_EQ(lost, 0u);
}

TEST_F(FanoutTest, EachStreamSeesEventsInOrderWithNothingLostSilently) {
  constexpr uint64_t kEvents = 20000;
  auto a = Open(Allow({}));
  auto b = Open(Allow({KVMI_EVENT_CR}));
  std::atomic<bool> stop{false};
  std::thread reader([&] {
    while (!stop) {
      a->Complete();
      b->Complete();
    }
  });
  for (uint64_t i = 0; i < kEvents; ++i) Emit(i % 2 == 0 ? KVMI_EVENT_CR : KVMI_EVENT_MSR);
  auto accounted = [](const FakeSink& s) {
    uint64_t n = 0;
    for (const auto& w : s.written()) n += w.event_id != 0 ? 1 : w.dropped;
    return n;
  };
  EXPECT_TRUE(WaitUntil([&] { return accounted(*a) == kEvents; }))
      << accounted(*a) << " waiting " << fanout_->waiting() << " head " << ring_.head() << " tail "
      << ring_.tail() << " in flight " << a->in_flight() << " last " << a->written().back().event_id
      << "/" << a->written().back().dropped;
  stop = true;
  reader.join();
  {
    // Where a lost events silently: a gap not covered by the drop notice before it.
    uint64_t expected = 1, pending = 0;
    for (const auto& w : a->written()) {
      if (w.event_id == 0) {
        pending += w.dropped;
        continue;
      }
      EXPECT_EQ(w.event_id, expected + pending) << "after a notice of " << pending;
      if (w.event_id != expected + pending) break;
      expected = w.event_id + 1;
      pending = 0;
    }
  }
  for (const FakeSink* s : {a.get(), b.get()}) {
    uint64_t last = 0;
    for (const auto& w : s->written()) {
      if (w.event_id == 0) continue;
      EXPECT_GT(w.event_id, last);
      last = w.event_id;
    }
  }
  for (const auto& w : b->written()) {
    if (w.event_id != 0) {
      EXPECT_EQ(w.event_id % 2, 1u) << "only CR (odd ids)";
    }
  }
  End(a.get());
  End(b.get());
}

TEST_F(FanoutTest, StreamsEndingWhileTheDeliveryThreadHoldsThemFinishOnce) {
  constexpr int kRounds = 20, kStreams = 50;
  for (int round = 0; round < kRounds; ++round) {
    std::vector<std::unique_ptr<FakeSink>> sinks;
    sinks.reserve(kStreams);
    for (int i = 0; i < kStreams; ++i) sinks.push_back(Open(Allow({KVMI_EVENT_CR})));
    std::atomic<bool> stop{false};
    std::thread emitter([&] {
      while (!stop) Emit(KVMI_EVENT_CR);
    });
    std::thread completer([&] {
      while (!stop) {
        for (auto& s : sinks) s->Complete();
      }
    });
    // Cancelled from a third thread (gRPC's OnCancel) while events flow.
    for (auto& s : sinks) s->Cancel();
    stop = true;
    emitter.join();
    completer.join();
    for (auto& s : sinks) {
      s->Complete(false);
      ASSERT_TRUE(WaitUntil([&] { return s->finished(); }));
    }
    // OnDone: the subscriptions go.
    sinks.clear();
    // Events after they went: a fan-out that still referred to one of them would touch freed
    // memory here (ASan). A fresh stream gets the event, so the delivery thread did pass.
    auto probe = Open(Allow({KVMI_EVENT_CR}));
    Emit(KVMI_EVENT_CR);
    ASSERT_TRUE(WaitUntil([&] { return probe->in_flight(); }));
    End(probe.get());
  }
  EXPECT_EQ(fanout_->waiting(), 0u);
  EXPECT_EQ(fanout_->subscriptions(), 0u);
}

TEST_F(FanoutTest, AReloadOfTheAuthorizationReDecidesAnOpenStreamsVisibility) {
  config::Authz viewer;
  auto* binding = viewer.add_bindings();
  binding->set_uid(1000);
  binding->set_role("viewer");
  auto granting = security::Authorizer::FromConfig(viewer);
  ASSERT_TRUE(granting.ok()) << granting.status();

  security::AuthorizerHolder holder(security::Authorizer::Default());
  CallContext call;
  call.caller = security::Caller::Unix(1000, 1000);
  call.authorizer = holder.Get();  // uid 1000 sees nothing
  auto stream = Open(Allow({}), 0, std::make_unique<VisibleGuests>(call, &pipeline_, &holder));

  Emit(KVMI_EVENT_CR);
  ASSERT_TRUE(WaitUntil([&] { return fanout_->filter_evaluations() == 1; }));
  EXPECT_EQ(stream->count(), 0u);

  holder.Set(*granting);  // SIGHUP: uid 1000 is a viewer of every guest
  Emit(KVMI_EVENT_CR);
  ASSERT_TRUE(WaitUntil([&] { return stream->in_flight(); }));
  EXPECT_EQ(stream->written().back().event_id, next_id_);
  stream->Complete();

  holder.Set(security::Authorizer::Default());  // and revoked again
  Emit(KVMI_EVENT_CR);
  ASSERT_TRUE(WaitUntil([&] { return fanout_->filter_evaluations() == 3; }));
  EXPECT_EQ(stream->count(), 1u);
  End(stream.get());
}

TEST_F(FanoutTest, ARoleOnTheGuestDecidesWhatAStreamMaySee) {
  // A viewer sees the guest's events but not guest memory read with them (event context needs
  // operator, as ReadVirtual); an operator sees both; a stranger neither.
  config::Authz authz;
  auto* viewer = authz.add_bindings();
  viewer->set_uid(1000);
  viewer->set_role("viewer");
  auto* op = authz.add_bindings();
  op->set_uid(1001);
  op->set_role("operator");
  auto rules = security::Authorizer::FromConfig(authz);
  ASSERT_TRUE(rules.ok()) << rules.status();
  security::AuthorizerHolder holder(*rules);
  auto guests_of = [&](uint32_t uid) {
    CallContext call;
    call.caller = security::Caller::Unix(uid, uid);
    call.authorizer = holder.Get();
    return std::make_unique<VisibleGuests>(call, &pipeline_, &holder);
  };
  auto as_viewer = guests_of(1000), as_op = guests_of(1001), as_stranger = guests_of(1002);
  EXPECT_TRUE(as_viewer->Visible(guest_));
  EXPECT_FALSE(as_viewer->Allows(guest_, security::Role::kOperator));
  EXPECT_TRUE(as_viewer->Allows(guest_, security::Role::kViewer));
  EXPECT_TRUE(as_op->Visible(guest_));
  EXPECT_TRUE(as_op->Allows(guest_, security::Role::kOperator));
  EXPECT_FALSE(as_op->Allows(guest_, security::Role::kAdmin));
  EXPECT_FALSE(as_stranger->Visible(guest_));
  // Without an authorizer (kvmid's tests, no authz at all) every role.
  CallContext unrestricted;
  VisibleGuests all(unrestricted, &pipeline_);
  EXPECT_TRUE(all.Allows(guest_, security::Role::kAdmin));
}

// ---- allow and deny filters --------------------------------------------------------------------

ObservedEvent CrEvent(uint32_t cr, uint16_t vcpu) {
  ObservedEvent o;
  o.event.common.event = KVMI_EVENT_CR;
  o.event.common.vcpu = vcpu;
  o.event.specific.cr.cr = cr;
  return o;
}

CompiledFilter Crs(std::initializer_list<uint32_t> crs) {
  CompiledFilter f = Filter({KVMI_EVENT_CR});
  f.crs.insert(crs.begin(), crs.end());
  return f;
}

TEST(StreamFilterTest, AnyAllowFilterLetsAnEventThroughAndAnyDenyFilterStopsIt) {
  StreamFilter none;
  EXPECT_TRUE(none.Matches(CrEvent(0, 0)));  // no allow filter: everything

  StreamFilter f;
  f.allow = {Crs({0}), Crs({4})};
  EXPECT_TRUE(f.Matches(CrEvent(0, 1)));   // the first
  EXPECT_TRUE(f.Matches(CrEvent(4, 1)));   // the second
  EXPECT_FALSE(f.Matches(CrEvent(3, 1)));  // neither
  CompiledFilter vcpu1 = Filter({});
  vcpu1.vcpus.insert(1);
  f.deny = {Crs({3}), vcpu1};
  EXPECT_FALSE(f.Matches(CrEvent(0, 1)));  // allowed, but a deny filter matches: deny wins
  EXPECT_TRUE(f.Matches(CrEvent(0, 2)));
  EXPECT_FALSE(f.Matches(CrEvent(3, 2)));

  StreamFilter only_deny;
  only_deny.deny = {Crs({3})};
  EXPECT_TRUE(only_deny.Matches(CrEvent(0, 0)));
  EXPECT_FALSE(only_deny.Matches(CrEvent(3, 0)));
}

TEST(StreamFilterTest, TheTypesWaitedForAreTheUnionOfTheAllowFiltersDenyCannotWiden) {
  auto bit = [](uint8_t type) { return 1u << type; };
  StreamFilter f;
  EXPECT_EQ(f.Types(), ~0u);
  f.allow = {Crs({0}), Filter({KVMI_EVENT_MSR, KVMI_EVENT_PF})};
  const uint32_t allowed = bit(KVMI_EVENT_CR) | bit(KVMI_EVENT_MSR) | bit(KVMI_EVENT_PF);
  EXPECT_EQ(f.Types(), allowed);
  f.deny = {Filter({KVMI_EVENT_BREAKPOINT}), Filter({})};
  EXPECT_EQ(f.Types(), allowed);
  f.allow.push_back(CompiledFilter{});  // a filter that matches nothing adds no type
  EXPECT_EQ(f.Types(), allowed);
}

TEST(StreamFilterTest, TooManyFiltersOrEntriesAreInvalidAndNamed) {
  kvmi::v1::StreamEventsRequest request;
  for (size_t i = 0; i < kMaxStreamFilters; ++i) request.add_allow()->add_crs(0);
  for (size_t i = 0; i < kMaxStreamFilters; ++i) request.add_deny()->add_crs(3);
  StreamFilter f;
  ASSERT_TRUE(CompileStreamFilter(request, &f).ok());
  EXPECT_EQ(f.allow.size(), kMaxStreamFilters);
  EXPECT_EQ(f.deny.size(), kMaxStreamFilters);

  request.add_deny();
  grpc::Status s = CompileStreamFilter(request, &f);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(s.error_message(), ::testing::StartsWith("deny: 17 filters, at most 16"));
  request.mutable_deny()->RemoveLast();

  for (size_t i = 0; i < kMaxFilterEntries; ++i) request.mutable_allow(2)->add_vcpus(1);
  EXPECT_TRUE(CompileStreamFilter(request, &f).ok());
  request.mutable_allow(2)->add_vcpus(1);
  s = CompileStreamFilter(request, &f);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(s.error_message(), ::testing::StartsWith("allow[2].vcpus: 257 entries, at most 256"));
  request.mutable_allow(2)->clear_vcpus();
  request.mutable_deny(5)->set_access("q");
  EXPECT_THAT(CompileStreamFilter(request, &f).error_message(),
              ::testing::StartsWith("deny[5].access"));
}

// ---- heartbeats ---------------------------------------------------------------------------------

TEST_F(FanoutTest, AQuietStreamGetsHeartbeatsWithTheLastEventItLookedAt) {
  constexpr std::chrono::milliseconds kInterval{50};
  Emit(KVMI_EVENT_CR);
  Emit(KVMI_EVENT_CR);  // ids 1, 2: before the stream (live from the head)
  auto quiet = Open(Allow({KVMI_EVENT_BREAKPOINT}), 0, nullptr, kInterval);
  auto without = Open(Allow({KVMI_EVENT_BREAKPOINT}));  // no heartbeat asked for
  ASSERT_TRUE(WaitUntil([&] { return quiet->in_flight(); }));
  FakeSink::Written w = quiet->written().back();
  EXPECT_TRUE(w.heartbeat);
  EXPECT_EQ(w.last_event_id, 2u);

  // Events of a type it does not take move what it has looked at.
  Emit(KVMI_EVENT_CR);  // id 3
  quiet->Complete();
  ASSERT_TRUE(WaitUntil([&] { return quiet->in_flight(); }));
  w = quiet->written().back();
  EXPECT_TRUE(w.heartbeat);
  EXPECT_EQ(w.last_event_id, 3u);
  quiet->Complete();

  // An event it takes is delivered as usual.
  Emit(KVMI_EVENT_BREAKPOINT);  // id 4
  ASSERT_TRUE(WaitUntil([&] {
    return !quiet->written().empty() && quiet->written().back().event_id == 4 &&
           without->count() == 1;
  }));
  quiet->Complete();
  without->Complete();
  ASSERT_TRUE(WaitUntil([&] { return fanout_->heartbeats() >= 3; }));
  for (const FakeSink::Written& x : without->written()) EXPECT_FALSE(x.heartbeat);
  EXPECT_EQ(without->count(), 1u);
  End(quiet.get());
  End(without.get());
  EXPECT_EQ(fanout_->waiting(), 0u);
}

TEST_F(FanoutTest, ManyQuietStreamsShareOneHeartbeatWalk) {
  constexpr int kStreams = 500;
  std::vector<std::unique_ptr<FakeSink>> streams;
  const auto start = std::chrono::steady_clock::now();
  streams.reserve(kStreams);
  for (int i = 0; i < kStreams; ++i) {
    streams.push_back(Open(Allow({KVMI_EVENT_BREAKPOINT}), 0, nullptr, std::chrono::seconds(1)));
  }
  const auto opening = std::chrono::steady_clock::now() - start;
  for (const auto& s : streams) {
    ASSERT_TRUE(WaitUntil([&] { return s->in_flight(); }));
    EXPECT_TRUE(s->written().back().heartbeat);
  }
  EXPECT_EQ(fanout_->heartbeats(), static_cast<uint64_t>(kStreams));
  // Due within the time it took to open them: one walk per 20 ms of it (kHeartbeatCoalesce), a
  // few more at most, not one per stream.
  const uint64_t bound = 3 + static_cast<uint64_t>(opening / std::chrono::milliseconds(20));
  EXPECT_LE(fanout_->heartbeat_walks(), bound) << "opening took " << opening.count() << " ns";
  EXPECT_LT(bound, static_cast<uint64_t>(kStreams) / 4) << "the machine is too slow to tell";
  for (const auto& s : streams) End(s.get());
  EXPECT_EQ(fanout_->waiting(), 0u);
}

}  // namespace
}  // namespace kvmid::api
