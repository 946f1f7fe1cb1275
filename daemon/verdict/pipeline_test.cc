#include "daemon/verdict/pipeline.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <future>
#include <map>

#include "daemon/base/mutex.h"
#include "daemon/testing/scripted_host.h"
#include "daemon/testing/wait.h"
#include "kernel/abi/protocol.h"

namespace kvmid {
namespace {

using ::testing::ElementsAre;
using testing::MakeTestEvent;
using testing::ReceivedMessage;
using testing::ScriptedHost;
using testing::WaitUntil;

constexpr uint64_t kPeWp = (1u << 0) | (1u << 16);  // CR0.PE | CR0.WP

kvmi::Event Cr0Event(uint32_t seq, uint64_t old_value, uint64_t new_value) {
  kvmi::Event e = MakeTestEvent(KVMI_EVENT_CR, 0, seq);
  e.specific.cr.cr = 0;
  e.specific.cr.old_value = old_value;
  e.specific.cr.new_value = new_value;
  return e;
}

// A handler whose behaviour the test picks: answer at once, keep the promise, or drop it.
class TestHandler : public VerdictHandler {
 public:
  enum class Mode { kAnswer, kKeep, kDrop };
  explicit TestHandler(Mode mode, uint8_t action = KVMI_EVENT_ACTION_CONTINUE)
      : mode_(mode), action_(action) {}
  std::string id() const override { return "test"; }
  void OnBlockingEvent(const EventContext& ctx, VerdictPromise promise) override {
    {
      MutexLock lock(&mu_);
      calls_++;
      deadline_ = ctx.deadline;
      context_ = ctx.context;
    }
    switch (mode_) {
      case Mode::kAnswer: {
        Verdict v;
        v.action = action_;
        v.decided_by = "handler:test";
        promise.Answer(v);
        break;
      }
      case Mode::kKeep: {
        MutexLock lock(&mu_);
        kept_.push_back(std::move(promise));
        break;
      }
      case Mode::kDrop:
        break;  // the promise dies unanswered
    }
  }
  int calls() {
    MutexLock lock(&mu_);
    return calls_;
  }
  std::shared_ptr<const vmem::CapturedContext> context() {
    MutexLock lock(&mu_);
    return context_;
  }
  // Answers the first kept promise; false if the event was answered already.
  bool AnswerKept() {
    VerdictPromise promise;
    {
      MutexLock lock(&mu_);
      if (kept_.empty()) return false;
      promise = std::move(kept_.front());
      kept_.erase(kept_.begin());
    }
    return promise.Answer(Verdict::Continue("late"));
  }

 private:
  const Mode mode_;
  const uint8_t action_;
  Mutex mu_;
  int calls_ ABSL_GUARDED_BY(mu_) = 0;
  Clock::time_point deadline_ ABSL_GUARDED_BY(mu_);
  std::shared_ptr<const vmem::CapturedContext> context_ ABSL_GUARDED_BY(mu_);
  std::vector<VerdictPromise> kept_ ABSL_GUARDED_BY(mu_);
};

class Observed {
 public:
  EventObserver observer() {
    return [this](const ObservedEvent& e) {
      MutexLock lock(&mu_);
      events_.push_back(e);
    };
  }
  std::vector<ObservedEvent> events() {
    MutexLock lock(&mu_);
    return events_;
  }

 private:
  Mutex mu_;
  std::vector<ObservedEvent> events_ ABSL_GUARDED_BY(mu_);
};

class PipelineTest : public ::testing::Test {
 protected:
  PipelineTest() {
    VerdictPipeline::Options options;
    for (auto& d : options.deadlines) {
      d.deadline = std::chrono::milliseconds(100);
      d.fallback_action = KVMI_EVENT_ACTION_CRASH;
    }
    pipeline_ = std::make_unique<VerdictPipeline>(&policies_, options);
    identity_.uuid[0] = 7;
    identity_.name = "vm-under-test";
    guest_ = std::make_shared<Guest>("key", identity_, pipeline_.get());
  }
  void SetUp() override { loop_.Start("pipeline-test"); }
  void TearDown() override {
    if (session_) {
      session_->Close("test over");
      EXPECT_TRUE(WaitUntil([&] { return guest_->state() == GuestState::kGone; }));
    }
    loop_.Stop();
  }

  void Hook() {
    GuestSession::Options options;
    session_ =
        std::make_shared<GuestSession>(&loop_, host_.Connect(), identity_, guest_.get(), options);
    auto session = session_;
    loop_.RunInLoop([session] { session->Start(); });
    ASSERT_TRUE(guest_->Attach(session_));
    ASSERT_TRUE(WaitUntil([&] {
      GuestSnapshot s = guest_->Snapshot();
      return s.state == GuestState::kHooked && s.arming_in_flight == 0;
    }));
  }
  // The host's reply to the event it sent with `seq`.
  std::optional<kvmi::EventReply> ReplyTo(const kvmi::Event& event) {
    auto m = host_.WaitFor([&](const ReceivedMessage& m) {
      return m.hdr.id == KVMI_EVENT_REPLY && m.hdr.seq == event.seq;
    });
    if (!m) return std::nullopt;
    kvmi::EventReply reply;
    if (!kvmi::DecodeEventReply(kvmi::ByteView(m->payload), event.id(), &reply).ok()) {
      return std::nullopt;
    }
    return reply;
  }

  EventLoop loop_;
  ScriptedHost host_;
  PolicySet policies_;
  std::unique_ptr<VerdictPipeline> pipeline_;
  GuestIdentity identity_;
  std::shared_ptr<Guest> guest_;
  std::shared_ptr<GuestSession> session_;
};

TEST_F(PipelineTest, AnEnforcingPolicyAnswersWithoutAskingAHandler) {
  ASSERT_EQ(policies_.Apply(ForbidClearCr0WpRule("wp", RuleMode::kEnforce)), "");
  auto handler = std::make_shared<TestHandler>(TestHandler::Mode::kAnswer);
  auto registration = pipeline_->RegisterHandler(handler, HandlerClaim{});
  Observed observed;
  pipeline_->AddObserver(observed.observer());
  Hook();
  // The policy's intercept was armed as its lease when the guest was hooked.
  EXPECT_EQ(guest_->Snapshot().leases.count("policy:wp"), 1u);
  kvmi::Event event = Cr0Event(21, kPeWp, 1);
  host_.SendEvent(event);
  auto reply = ReplyTo(event);
  ASSERT_TRUE(reply);
  EXPECT_EQ(reply->action, KVMI_EVENT_ACTION_CONTINUE);
  EXPECT_EQ(reply->specific.cr.new_val, kPeWp);  // the old value is kept
  EXPECT_EQ(handler->calls(), 0);
  EXPECT_EQ(pipeline_->stats().by_policy.load(), 1u);
  ASSERT_TRUE(WaitUntil([&] { return observed.events().size() == 1; }));
  EXPECT_EQ(observed.events()[0].verdict.decided_by, "policy:wp");
}

TEST_F(PipelineTest, AHandlerAnsweringInTimeDecides) {
  auto handler = std::make_shared<TestHandler>(TestHandler::Mode::kAnswer, KVMI_EVENT_ACTION_RETRY);
  auto registration = pipeline_->RegisterHandler(handler, HandlerClaim{});
  Hook();
  kvmi::Event event = MakeTestEvent(KVMI_EVENT_BREAKPOINT, 1, 22);
  host_.SendEvent(event);
  auto reply = ReplyTo(event);
  ASSERT_TRUE(reply);
  EXPECT_EQ(reply->action, KVMI_EVENT_ACTION_RETRY);
  EXPECT_EQ(handler->calls(), 1);
  EXPECT_EQ(pipeline_->stats().by_handler.load(), 1u);
  EXPECT_EQ(pipeline_->stats().fallbacks.load(), 0u);
}

TEST_F(PipelineTest, AHandlerPastItsDeadlineGetsTheFallback) {
  auto handler = std::make_shared<TestHandler>(TestHandler::Mode::kKeep);
  HandlerClaim claim;
  claim.deadline = std::chrono::milliseconds(50);
  claim.fallback_action = KVMI_EVENT_ACTION_RETRY;
  auto registration = pipeline_->RegisterHandler(handler, claim);
  Hook();
  kvmi::Event event = MakeTestEvent(KVMI_EVENT_BREAKPOINT, 0, 23);
  host_.SendEvent(event);
  auto reply = ReplyTo(event);
  ASSERT_TRUE(reply);
  EXPECT_EQ(reply->action, KVMI_EVENT_ACTION_RETRY);  // the claim's fallback
  EXPECT_EQ(pipeline_->stats().fallback_deadline.load(), 1u);
  EXPECT_EQ(pipeline_->stats().fallbacks.load(), 1u);
  EXPECT_EQ(guest_->Snapshot().fallbacks, 1u);
  EXPECT_FALSE(handler->AnswerKept());  // too late: answered already
  EXPECT_FALSE(host_.WaitForId(KVMI_EVENT_REPLY, std::chrono::milliseconds(100)));
}

TEST_F(PipelineTest, AHandlerThatGoesAwayLetsTheVcpuGoAtOnce) {
  auto handler = std::make_shared<TestHandler>(TestHandler::Mode::kDrop);
  HandlerClaim claim;
  claim.deadline = std::chrono::seconds(30);  // never reached: the drop answers
  auto registration = pipeline_->RegisterHandler(handler, claim);
  Hook();
  kvmi::Event event = MakeTestEvent(KVMI_EVENT_BREAKPOINT, 0, 24);
  host_.SendEvent(event);
  auto reply = ReplyTo(event);
  ASSERT_TRUE(reply);
  EXPECT_EQ(reply->action, KVMI_EVENT_ACTION_CRASH);  // the event type's fallback
  EXPECT_EQ(pipeline_->stats().fallback_handler_gone.load(), 1u);
}

TEST_F(PipelineTest, WithNoHandlerTheDefaultActionAnswersAtOnce) {
  // A handler for another guest only.
  auto handler = std::make_shared<TestHandler>(TestHandler::Mode::kAnswer);
  HandlerClaim claim;
  claim.vms = {"some-other-vm"};
  auto registration = pipeline_->RegisterHandler(handler, claim);
  Observed observed;
  pipeline_->AddObserver(observed.observer());
  Hook();
  kvmi::Event event = MakeTestEvent(KVMI_EVENT_BREAKPOINT, 0, 25);
  host_.SendEvent(event);
  auto reply = ReplyTo(event);
  ASSERT_TRUE(reply);
  EXPECT_EQ(reply->action, KVMI_EVENT_ACTION_CRASH);
  EXPECT_EQ(handler->calls(), 0);
  EXPECT_EQ(pipeline_->stats().fallback_no_handler.load(), 1u);
  EXPECT_EQ(pipeline_->stats().fallbacks.load(), 0u);  // a default is not a missed deadline
  ASSERT_TRUE(WaitUntil([&] { return observed.events().size() == 1; }));
  EXPECT_EQ(observed.events()[0].verdict.decided_by, "default");
}

TEST_F(PipelineTest, MonitorRulesAreReportedWithTheVerdictOfWhoeverDecides) {
  ASSERT_EQ(policies_.Apply(ForbidClearCr0WpRule("wp-watch", RuleMode::kMonitor)), "");
  auto handler = std::make_shared<TestHandler>(TestHandler::Mode::kAnswer, KVMI_EVENT_ACTION_RETRY);
  auto registration = pipeline_->RegisterHandler(handler, HandlerClaim{});
  Observed observed;
  pipeline_->AddObserver(observed.observer());
  Hook();
  kvmi::Event event = Cr0Event(26, kPeWp, 1);
  host_.SendEvent(event);
  auto reply = ReplyTo(event);
  ASSERT_TRUE(reply);
  EXPECT_EQ(reply->action, KVMI_EVENT_ACTION_RETRY);  // monitor mode does not decide
  ASSERT_TRUE(WaitUntil([&] { return observed.events().size() == 1; }));
  ObservedEvent seen = observed.events()[0];
  EXPECT_THAT(seen.monitor_hits, ElementsAre("wp-watch"));
  EXPECT_EQ(seen.verdict.decided_by, "handler:test");
  EXPECT_EQ(seen.event.seq, 26u);
  EXPECT_EQ(seen.guest, guest_);
}

TEST_F(PipelineTest, ObserversSeeEveryEventUntilRemoved) {
  Observed first, second;
  uint64_t first_id = pipeline_->AddObserver(first.observer());
  pipeline_->AddObserver(second.observer());
  EXPECT_EQ(pipeline_->observer_count(), 2u);
  Hook();
  kvmi::Event a = MakeTestEvent(KVMI_EVENT_BREAKPOINT, 0, 27);
  host_.SendEvent(a);
  ASSERT_TRUE(ReplyTo(a));
  ASSERT_TRUE(WaitUntil([&] { return first.events().size() == 1 && second.events().size() == 1; }));
  pipeline_->RemoveObserver(first_id);
  EXPECT_EQ(pipeline_->observer_count(), 1u);
  kvmi::Event b = MakeTestEvent(KVMI_EVENT_BREAKPOINT, 0, 28);
  host_.SendEvent(b);
  ASSERT_TRUE(ReplyTo(b));
  ASSERT_TRUE(WaitUntil([&] { return second.events().size() == 2; }));
  EXPECT_EQ(first.events().size(), 1u);
}

TEST_F(PipelineTest, AnUnregisteredHandlerIsNoLongerAsked) {
  auto handler = std::make_shared<TestHandler>(TestHandler::Mode::kAnswer, KVMI_EVENT_ACTION_RETRY);
  auto registration = pipeline_->RegisterHandler(handler, HandlerClaim{});
  registration.Reset();
  Hook();
  kvmi::Event event = MakeTestEvent(KVMI_EVENT_BREAKPOINT, 0, 29);
  host_.SendEvent(event);
  auto reply = ReplyTo(event);
  ASSERT_TRUE(reply);
  EXPECT_EQ(reply->action, KVMI_EVENT_ACTION_CRASH);
  EXPECT_EQ(handler->calls(), 0);
}

TEST_F(PipelineTest, GuestLabelsReachPolicySelectors) {
  auto rule = ForbidClearCr0WpRule("wp-prod", RuleMode::kEnforce);
  rule->match.labels = {{"tier", "prod"}};
  ASSERT_EQ(policies_.Apply(rule), "");
  pipeline_->SetGuestLabels("vm-under-test", {{"tier", "prod"}});
  Hook();
  EXPECT_EQ(pipeline_->ViewOf(*guest_)->labels.at("tier"), "prod");
  kvmi::Event event = Cr0Event(30, kPeWp, 1);
  host_.SendEvent(event);
  auto reply = ReplyTo(event);
  ASSERT_TRUE(reply);
  EXPECT_EQ(reply->specific.cr.new_val, kPeWp);
  EXPECT_EQ(pipeline_->stats().by_policy.load(), 1u);
}

TEST_F(PipelineTest, AHandlerAtItsHeldCapGetsNoMoreEvents) {
  // A handler that never answers, with a cap of 2 and a deadline far away.
  auto handler = std::make_shared<TestHandler>(TestHandler::Mode::kKeep);
  HandlerClaim claim;
  claim.deadline = std::chrono::seconds(60);
  claim.fallback_action = KVMI_EVENT_ACTION_RETRY;
  claim.max_held = 2;
  auto registration = pipeline_->RegisterHandler(handler, claim);
  Hook();
  kvmi::Event first = MakeTestEvent(KVMI_EVENT_BREAKPOINT, 0, 40);
  kvmi::Event second = MakeTestEvent(KVMI_EVENT_BREAKPOINT, 1, 41);
  host_.SendEvent(first);
  host_.SendEvent(second);
  ASSERT_TRUE(WaitUntil([&] { return handler->calls() == 2; }));
  // The third waits for nothing: the claim's fallback at once (long before the 60 s deadline),
  // and the handler never sees it.
  const auto sent = std::chrono::steady_clock::now();
  kvmi::Event third = MakeTestEvent(KVMI_EVENT_BREAKPOINT, 2, 42);
  host_.SendEvent(third);
  auto reply = ReplyTo(third);
  ASSERT_TRUE(reply);
  EXPECT_LT(std::chrono::steady_clock::now() - sent, std::chrono::seconds(30));
  EXPECT_EQ(reply->action, KVMI_EVENT_ACTION_RETRY);
  EXPECT_EQ(handler->calls(), 2);
  EXPECT_EQ(pipeline_->stats().fallback_held_cap.load(), 1u);
  EXPECT_EQ(pipeline_->stats().fallbacks.load(), 1u);
  EXPECT_EQ(guest_->Snapshot().fallbacks, 1u);
  // The held two are still held; answering one makes room for the next event.
  EXPECT_FALSE(host_.WaitFor(
      [&](const ReceivedMessage& m) {
        return m.hdr.id == KVMI_EVENT_REPLY && (m.hdr.seq == first.seq || m.hdr.seq == second.seq);
      },
      std::chrono::milliseconds(50)));
  ASSERT_TRUE(handler->AnswerKept());
  ASSERT_TRUE(ReplyTo(first));
  kvmi::Event fourth = MakeTestEvent(KVMI_EVENT_BREAKPOINT, 0, 43);
  host_.SendEvent(fourth);
  ASSERT_TRUE(WaitUntil([&] { return handler->calls() == 3; }));
  EXPECT_EQ(pipeline_->stats().fallback_held_cap.load(), 1u);
  // The guest keeps running: every held event is answered when the handler lets go.
  ASSERT_TRUE(handler->AnswerKept());
  ASSERT_TRUE(handler->AnswerKept());
  ASSERT_TRUE(ReplyTo(second));
  ASSERT_TRUE(ReplyTo(fourth));
}

TEST_F(PipelineTest, WithoutACapAHandlerHoldsEveryEvent) {
  auto handler = std::make_shared<TestHandler>(TestHandler::Mode::kKeep);
  HandlerClaim claim;
  claim.deadline = std::chrono::seconds(60);
  auto registration = pipeline_->RegisterHandler(handler, claim);
  Hook();
  for (uint16_t vcpu = 0; vcpu < 4; ++vcpu) {
    host_.SendEvent(MakeTestEvent(KVMI_EVENT_BREAKPOINT, vcpu, 50 + vcpu));
  }
  ASSERT_TRUE(WaitUntil([&] { return handler->calls() == 4; }));
  EXPECT_EQ(pipeline_->stats().fallback_held_cap.load(), 0u);
  for (int i = 0; i < 4; ++i) ASSERT_TRUE(handler->AnswerKept());
}

}  // namespace
}  // namespace kvmid

namespace kvmid {
namespace {

// ---- Event context (issue 15) -----------------------------------------------------------------

// Guest memory for the context capture, standing in for the session: byte at gpa x is x & 0xff,
// except what Put wrote; with `hold`, reads are kept unanswered (until Release).
class FakeMemory : public vmem::PhysicalMemory {
 public:
  void Read(uint64_t gpa, uint32_t size,
            std::function<void(absl::StatusOr<std::vector<uint8_t>>)> done) override {
    std::vector<uint8_t> bytes(size);
    {
      MutexLock lock(&mu_);
      ++reads_;
      for (uint32_t i = 0; i < size; ++i) {
        auto it = put_.find(gpa + i);
        bytes[i] = it != put_.end() ? it->second : static_cast<uint8_t>(gpa + i);
      }
      if (hold_) {
        held_.push_back(std::move(done));
        return;
      }
    }
    done(std::move(bytes));
  }
  void Put(uint64_t gpa, std::vector<uint8_t> bytes) {
    MutexLock lock(&mu_);
    for (size_t i = 0; i < bytes.size(); ++i) put_[gpa + i] = bytes[i];
  }
  void set_hold(bool hold) {
    MutexLock lock(&mu_);
    hold_ = hold;
  }
  // Answers what was held with an error (late: the capture has answered already).
  void Release() {
    std::vector<std::function<void(absl::StatusOr<std::vector<uint8_t>>)>> held;
    {
      MutexLock lock(&mu_);
      held.swap(held_);
    }
    for (auto& done : held) done(absl::UnavailableError("released"));
  }
  int reads() {
    MutexLock lock(&mu_);
    return reads_;
  }

 private:
  Mutex mu_;
  std::map<uint64_t, uint8_t> put_ ABSL_GUARDED_BY(mu_);
  bool hold_ ABSL_GUARDED_BY(mu_) = false;
  int reads_ ABSL_GUARDED_BY(mu_) = 0;
  std::vector<std::function<void(absl::StatusOr<std::vector<uint8_t>>)>> held_ ABSL_GUARDED_BY(mu_);
};

class ContextPipelineTest : public PipelineTest {
 protected:
  void SetUp() override {
    PipelineTest::SetUp();
    pipeline_->set_context_capturer(
        [this](const std::shared_ptr<Guest>&, const std::shared_ptr<GuestSession>&,
               const kvmi::Event& event, const vmem::ContextDemand& demand,
               vmem::ContextCapture::Done done) {
          captures_++;
          return vmem::ContextCapture::Start(memory_, nullptr, event, demand, std::move(done));
        });
  }
  void TearDown() override {
    memory_->Release();
    PipelineTest::TearDown();
  }
  // An MSR event with paging off (the test event's CR0 is 0): RIP and RSP are physical.
  kvmi::Event MsrEvent(uint32_t seq, uint64_t rip) {
    kvmi::Event e = MakeTestEvent(KVMI_EVENT_MSR, 0, seq);
    e.specific.msr.msr = 0xc0000082;
    e.specific.msr.old_value = 1;
    e.specific.msr.new_value = 2;
    e.common.arch.regs.rip = rip;
    e.common.arch.regs.rsp = 0x8000;
    return e;
  }

  std::shared_ptr<FakeMemory> memory_ = std::make_shared<FakeMemory>();
  std::atomic<int> captures_{0};
};

TEST_F(ContextPipelineTest, TheClaimsBytesReachTheHandlerAndTheObserversWithTheEvent) {
  auto handler = std::make_shared<TestHandler>(TestHandler::Mode::kAnswer);
  HandlerClaim claim;
  claim.events = {KVMI_EVENT_MSR};
  claim.context = vmem::ContextDemand{16, 8, 0};
  auto registration = pipeline_->RegisterHandler(handler, claim);
  EXPECT_EQ(pipeline_->context_demand(KVMI_EVENT_MSR), (vmem::ContextDemand{16, 8, 0}));
  EXPECT_TRUE(pipeline_->context_demand(KVMI_EVENT_CR).empty());  // not claimed
  Observed observed;
  pipeline_->AddObserver(observed.observer());
  memory_->Put(0x1000, {0x0f, 0x30});
  Hook();
  kvmi::Event event = MsrEvent(31, 0x1000);
  host_.SendEvent(event);
  ASSERT_TRUE(ReplyTo(event));
  std::shared_ptr<const vmem::CapturedContext> context = handler->context();
  ASSERT_TRUE(context);
  const vmem::ContextBlock* rip = context->Find(vmem::ContextKind::kRip);
  ASSERT_NE(rip, nullptr);
  EXPECT_TRUE(rip->complete);
  ASSERT_EQ(rip->data.size(), 16u);
  EXPECT_EQ(rip->data[0], 0x0f);
  EXPECT_EQ(rip->data[1], 0x30);
  EXPECT_EQ(rip->data[2], 0x02);  // 0x1002 & 0xff
  EXPECT_EQ(context->Find(vmem::ContextKind::kRsp)->data.size(), 8u);
  ASSERT_TRUE(WaitUntil([&] { return observed.events().size() == 1; }));
  EXPECT_EQ(observed.events()[0].context, context);  // the same block, not a copy
  EXPECT_EQ(pipeline_->stats().context_captures.load(), 1u);
  EXPECT_EQ(pipeline_->stats().context_incomplete.load(), 0u);
  registration.Reset();  // the demand goes with the claim
  EXPECT_TRUE(pipeline_->context_demand(KVMI_EVENT_MSR).empty());
}

TEST_F(ContextPipelineTest, AReadPastItsBudgetSendsTheEventOnIncompleteInsteadOfHoldingIt) {
  auto handler = std::make_shared<TestHandler>(TestHandler::Mode::kAnswer);
  HandlerClaim claim;
  claim.deadline = std::chrono::milliseconds(80);  // budget: 40 ms
  claim.context = vmem::ContextDemand{16, 0, 0};
  auto registration = pipeline_->RegisterHandler(handler, claim);
  memory_->set_hold(true);  // the guest never answers the reads
  Hook();
  kvmi::Event event = MsrEvent(32, 0x1000);
  const auto sent = Clock::now();
  host_.SendEvent(event);
  auto reply = ReplyTo(event);
  ASSERT_TRUE(reply);
  EXPECT_EQ(reply->action, KVMI_EVENT_ACTION_CONTINUE);  // the handler's verdict, in time
  EXPECT_LT(Clock::now() - sent, std::chrono::milliseconds(80) + std::chrono::seconds(2));
  std::shared_ptr<const vmem::CapturedContext> context = handler->context();
  ASSERT_TRUE(context);
  const vmem::ContextBlock* rip = context->Find(vmem::ContextKind::kRip);
  ASSERT_NE(rip, nullptr);
  EXPECT_FALSE(rip->complete);
  EXPECT_TRUE(rip->data.empty());
  EXPECT_THAT(rip->why, ::testing::HasSubstr("did not finish within 40 ms"));
  EXPECT_EQ(pipeline_->stats().context_expired.load(), 1u);
  EXPECT_EQ(pipeline_->stats().context_incomplete.load(), 1u);
  EXPECT_EQ(pipeline_->stats().fallbacks.load(), 0u);
}

TEST_F(ContextPipelineTest, NobodyAskingMeansNoCaptureAndNoContext) {
  auto handler = std::make_shared<TestHandler>(TestHandler::Mode::kAnswer);
  auto registration = pipeline_->RegisterHandler(handler, HandlerClaim{});
  Observed observed;
  pipeline_->AddObserver(observed.observer());
  Hook();
  kvmi::Event event = MsrEvent(33, 0x1000);
  host_.SendEvent(event);
  ASSERT_TRUE(ReplyTo(event));
  EXPECT_EQ(handler->calls(), 1);
  EXPECT_FALSE(handler->context());
  ASSERT_TRUE(WaitUntil([&] { return observed.events().size() == 1; }));
  EXPECT_FALSE(observed.events()[0].context);
  EXPECT_EQ(captures_.load(), 0);
  EXPECT_EQ(memory_->reads(), 0);
  EXPECT_EQ(pipeline_->stats().context_captures.load(), 0u);
}

TEST_F(ContextPipelineTest, AStreamsDemandAddsToTheClaimsUntilItsLeaseEnds) {
  HandlerClaim claim;
  claim.events = {KVMI_EVENT_MSR};
  claim.context = vmem::ContextDemand{16, 0, 0};
  auto registration =
      pipeline_->RegisterHandler(std::make_shared<TestHandler>(TestHandler::Mode::kAnswer), claim);
  {
    VerdictPipeline::ContextDemandLease lease =
        pipeline_->AddContextDemand(1u << KVMI_EVENT_PF, vmem::ContextDemand{4, 0, 64});
    EXPECT_EQ(pipeline_->context_demand(KVMI_EVENT_PF), (vmem::ContextDemand{4, 0, 64}));
    EXPECT_EQ(pipeline_->context_demand(KVMI_EVENT_MSR), (vmem::ContextDemand{16, 0, 0}));
    VerdictPipeline::ContextDemandLease every =
        pipeline_->AddContextDemand(0, vmem::ContextDemand{32, 0, 0});
    EXPECT_EQ(pipeline_->context_demand(KVMI_EVENT_MSR), (vmem::ContextDemand{32, 0, 0}));
    EXPECT_EQ(pipeline_->context_demand(KVMI_EVENT_CR), (vmem::ContextDemand{32, 0, 0}));
  }
  EXPECT_TRUE(pipeline_->context_demand(KVMI_EVENT_PF).empty());
  EXPECT_EQ(pipeline_->context_demand(KVMI_EVENT_MSR), (vmem::ContextDemand{16, 0, 0}));
}

TEST_F(ContextPipelineTest, APolicyDecidesOnTheBytesAtRip) {
  auto rule = std::make_shared<Rule>();
  rule->name = "not-wrmsr";
  rule->match.events = {KVMI_EVENT_MSR};
  rule->match.rip_bytes_prefix = {0x0f, 0x30};
  rule->action = RuleAction::kKeepOld;
  ASSERT_EQ(policies_.Apply(rule), "");
  EXPECT_EQ(pipeline_->context_demand(KVMI_EVENT_MSR), (vmem::ContextDemand{2, 0, 0}));
  auto handler = std::make_shared<TestHandler>(TestHandler::Mode::kAnswer);
  auto registration = pipeline_->RegisterHandler(handler, HandlerClaim{});
  memory_->Put(0x1000, {0x0f, 0x30});
  memory_->Put(0x2000, {0x0f, 0x32});  // RDMSR: not the rule's
  Hook();
  kvmi::Event wrmsr = MsrEvent(34, 0x1000);
  host_.SendEvent(wrmsr);
  auto kept = ReplyTo(wrmsr);
  ASSERT_TRUE(kept);
  EXPECT_EQ(kept->specific.msr.new_val, 1u);  // the old value: the policy decided
  EXPECT_EQ(handler->calls(), 0);
  kvmi::Event other = MsrEvent(35, 0x2000);
  host_.SendEvent(other);
  auto passed = ReplyTo(other);
  ASSERT_TRUE(passed);
  EXPECT_EQ(passed->specific.msr.new_val, 2u);
  EXPECT_EQ(handler->calls(), 1);  // the handler decided that one
  EXPECT_EQ(pipeline_->stats().by_policy.load(), 1u);
}

}  // namespace
}  // namespace kvmid
