#include "daemon/guest/guest.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <future>

#include "daemon/base/mutex.h"
#include "daemon/testing/scripted_host.h"
#include "daemon/testing/wait.h"
#include "kernel/abi/protocol.h"

namespace kvmid {
namespace {

using ::testing::ElementsAre;
using ::testing::IsEmpty;
using testing::MakeTestEvent;
using testing::ReceivedMessage;
using testing::ScriptedHost;
using ::testing::UnorderedElementsAre;
using testing::WaitUntil;

constexpr auto kNoMessage = std::chrono::milliseconds(200);

// Answers a blocking event (CONTINUE) when released, or when dropped unreleased.
class ReplyOnRelease : public HeldEvent {
 public:
  ReplyOnRelease(std::shared_ptr<GuestSession> session, const kvmi::Event& event)
      : session_(std::move(session)), event_(event) {}
  ~ReplyOnRelease() override { Release("dropped"); }
  void Release(const std::string&) override {
    if (released_) return;
    released_ = true;
    session_->ReplyToEvent(kvmi::MakeEventReply(event_, KVMI_EVENT_ACTION_CONTINUE), {});
  }

 private:
  std::shared_ptr<GuestSession> session_;
  kvmi::Event event_;
  bool released_ = false;
};

// The pipeline's part, as a test double: records what the guest routes, answers every blocking
// event with CONTINUE, and holds the PAUSE_VCPU events someone asked for.
class FakeRouter : public GuestEventRouter, public GuestStateListener {
 public:
  void RouteEvent(const std::shared_ptr<Guest>& guest, const std::shared_ptr<GuestSession>& session,
                  const kvmi::Event& event) override {
    {
      MutexLock lock(&mu_);
      events_.push_back(event);
    }
    if (event.id() == KVMI_EVENT_PAUSE_VCPU &&
        guest->HoldPause(event.vcpu(), std::make_unique<ReplyOnRelease>(session, event),
                         1000 + event.seq)) {
      return;
    }
    if (kvmi::FindEvent(event.id())->has_reply) {
      session->ReplyToEvent(kvmi::MakeEventReply(event, KVMI_EVENT_ACTION_CONTINUE), {});
    }
  }
  void SessionEnded(const std::shared_ptr<Guest>&, const std::shared_ptr<GuestSession>&) override {
    MutexLock lock(&mu_);
    sessions_ended_++;
  }
  void GuestHooked(const std::shared_ptr<Guest>&) override {
    MutexLock lock(&mu_);
    hooked_++;
  }
  void GuestStateChanged(const std::shared_ptr<Guest>& guest) override {
    MutexLock lock(&mu_);
    states_.push_back(guest->state());
  }

  std::vector<kvmi::Event> events() {
    MutexLock lock(&mu_);
    return events_;
  }
  int sessions_ended() {
    MutexLock lock(&mu_);
    return sessions_ended_;
  }
  int hooked() {
    MutexLock lock(&mu_);
    return hooked_;
  }
  std::vector<GuestState> states() {
    MutexLock lock(&mu_);
    return states_;
  }

 private:
  Mutex mu_;
  std::vector<kvmi::Event> events_ ABSL_GUARDED_BY(mu_);
  int sessions_ended_ ABSL_GUARDED_BY(mu_) = 0;
  int hooked_ ABSL_GUARDED_BY(mu_) = 0;
  std::vector<GuestState> states_ ABSL_GUARDED_BY(mu_);
};

template <typename Request>
Request Decode(const ReceivedMessage& m) {
  Request request;
  EXPECT_TRUE(kvmi::DecodePayload(kvmi::ByteView(m.payload), &request).ok());
  return request;
}

std::vector<uint8_t> ErrorReply(const ReceivedMessage& m, int32_t err) {
  std::vector<uint8_t> out;
  kvmi::EncodeReply(m.hdr.id, m.hdr.seq, err, {}, &out);
  return out;
}

class GuestTest : public ::testing::Test {
 protected:
  GuestTest() {
    identity_.uuid[0] = 0x42;
    identity_.name = "unit";
    guest_ = std::make_shared<Guest>("key", identity_, &router_, &router_);
  }
  void SetUp() override { loop_.Start("guest-test"); }
  void TearDown() override {
    for (const auto& session : sessions_) session->Close("test over");
    EXPECT_TRUE(WaitUntil([&] { return router_.sessions_ended() == int(sessions_.size()); }));
    loop_.Stop();
  }

  std::shared_ptr<GuestSession> NewSession(ScriptedHost* host) {
    GuestSession::Options options;
    options.command_timeout = std::chrono::seconds(5);
    auto session =
        std::make_shared<GuestSession>(&loop_, host->Connect(), identity_, guest_.get(), options);
    loop_.RunInLoop([session] { session->Start(); });
    sessions_.push_back(session);
    return session;
  }
  bool Settled() { return guest_->Snapshot().arming_in_flight == 0; }
  // Attaches a session on `host` and waits until the guest is hooked and its arming settled.
  std::shared_ptr<GuestSession> Hook(ScriptedHost* host) {
    auto session = NewSession(host);
    EXPECT_TRUE(guest_->Attach(session));
    EXPECT_TRUE(WaitUntil([&] { return guest_->state() == GuestState::kHooked && Settled(); }));
    return session;
  }
  // Changes `owner`'s lease and waits for the host's acknowledgement.
  std::vector<std::string> Lease(const OwnerId& owner, Arming arming) {
    std::promise<std::vector<std::string>> armed;
    guest_->UpdateLease(
        owner, [&](Arming* lease) { *lease = arming; },
        [&](std::vector<std::string> errors) { armed.set_value(std::move(errors)); });
    auto future = armed.get_future();
    EXPECT_EQ(future.wait_for(std::chrono::seconds(5)), std::future_status::ready);
    return future.get();
  }
  struct PagesResult {
    std::vector<int32_t> errors;
    bool rolled_back = false;
  };
  PagesResult SetPages(const OwnerId& owner, std::vector<std::pair<uint64_t, uint8_t>> pages,
                       bool all_or_nothing) {
    std::promise<PagesResult> result;
    guest_->SetPages(owner, std::move(pages), all_or_nothing,
                     [&](std::vector<int32_t> errors, bool rolled_back) {
                       result.set_value(PagesResult{std::move(errors), rolled_back});
                     });
    auto future = result.get_future();
    EXPECT_EQ(future.wait_for(std::chrono::seconds(5)), std::future_status::ready);
    return future.get();
  }

  EventLoop loop_;
  ScriptedHost host_;
  FakeRouter router_;
  GuestIdentity identity_;
  std::shared_ptr<Guest> guest_;
  std::vector<std::shared_ptr<GuestSession>> sessions_;
};

TEST_F(GuestTest, ProbesTheHostThenHooksAndArmsTheDaemonsOwnEvents) {
  host_.set_vcpus(3);
  Hook(&host_);
  GuestSnapshot s = guest_->Snapshot();
  EXPECT_EQ(s.state, GuestState::kHooked);
  EXPECT_EQ(s.kvmi_version, uint32_t{KVMI_VERSION});
  EXPECT_EQ(s.vcpu_count, 3u);
  EXPECT_EQ(s.connections, 1u);
  EXPECT_TRUE(guest_->EventAllowed(KVMI_EVENT_CR));
  EXPECT_EQ(router_.hooked(), 1);
  EXPECT_THAT(router_.states(), ElementsAre(GuestState::kHandshaking, GuestState::kHooked));
  // The daemon's lease: new vCPUs and UNHOOK requests, sent to the host.
  ASSERT_EQ(s.leases.count("daemon"), 1u);
  EXPECT_THAT(s.leases["daemon"].vm_events,
              UnorderedElementsAre(KVMI_EVENT_CREATE_VCPU, KVMI_EVENT_UNHOOK));
  std::set<uint8_t> enabled;
  for (int i = 0; i < 2; ++i) {
    auto m = host_.WaitForId(KVMI_CONTROL_VM_EVENTS);
    ASSERT_TRUE(m);
    auto request = Decode<kvmi::ControlVmEventsRequest>(*m);
    EXPECT_TRUE(request.enable);
    enabled.insert(request.event_id);
  }
  EXPECT_THAT(enabled, UnorderedElementsAre(KVMI_EVENT_CREATE_VCPU, KVMI_EVENT_UNHOOK));
}

TEST_F(GuestTest, AHostTooOldIsNeverHooked) {
  host_.set_responder([&](const ReceivedMessage& m) -> std::optional<std::vector<uint8_t>> {
    if (m.hdr.id != KVMI_GET_VERSION) return host_.DefaultReply(m);
    std::vector<uint8_t> data, out;
    kvmi::ByteWriter w(&data);
    kvmi::EncodeReplyData(kvmi::GetVersionReply{KVMI_VERSION - 1}, w);
    kvmi::EncodeReply(m.hdr.id, m.hdr.seq, 0, kvmi::ByteView(data), &out);
    return out;
  });
  auto session = NewSession(&host_);
  ASSERT_TRUE(guest_->Attach(session));
  EXPECT_TRUE(host_.WaitClosed());
  EXPECT_TRUE(WaitUntil([&] { return guest_->state() == GuestState::kGone; }));
  EXPECT_EQ(router_.hooked(), 0);
}

TEST_F(GuestTest, EventsGoToTheRouterAndAreCounted) {
  Hook(&host_);
  host_.SendEvent(MakeTestEvent(KVMI_EVENT_BREAKPOINT, 1, 77));
  auto reply = host_.WaitForId(KVMI_EVENT_REPLY);
  ASSERT_TRUE(reply);
  EXPECT_EQ(reply->hdr.seq, 77u);
  auto events = router_.events();
  ASSERT_EQ(events.size(), 1u);
  EXPECT_EQ(events[0].id(), KVMI_EVENT_BREAKPOINT);
  EXPECT_EQ(events[0].vcpu(), 1);
  EXPECT_EQ(guest_->Snapshot().events, 1u);
}

TEST_F(GuestTest, LeasesBecomeArmingCommandsForTheirUnion) {
  Hook(&host_);
  Arming cr4;
  cr4.crs = {4};
  EXPECT_THAT(Lease("a", cr4), IsEmpty());
  for (uint16_t vcpu : {0, 1}) {
    auto m = host_.WaitForId(KVMI_CONTROL_CR);
    ASSERT_TRUE(m);
    auto request = Decode<kvmi::ControlCrRequest>(*m);
    EXPECT_EQ(request.cr, 4u);
    EXPECT_TRUE(request.enable);
    EXPECT_EQ(request.vcpu, vcpu);
  }
  // A second owner of the same intercept, and one of the two going away: nothing to send.
  EXPECT_THAT(Lease("b", cr4), IsEmpty());
  guest_->ReleaseLease("a");
  EXPECT_TRUE(WaitUntil([&] { return Settled(); }));
  EXPECT_FALSE(host_.WaitForId(KVMI_CONTROL_CR, kNoMessage));
  EXPECT_EQ(guest_->Snapshot().applied.crs, std::set<uint32_t>{4});
  // The last owner going away disarms it.
  guest_->ReleaseOwner("b");
  for (int i = 0; i < 2; ++i) {
    auto m = host_.WaitForId(KVMI_CONTROL_CR);
    ASSERT_TRUE(m);
    EXPECT_FALSE(Decode<kvmi::ControlCrRequest>(*m).enable);
  }
  EXPECT_TRUE(WaitUntil([&] { return Settled(); }));
  GuestSnapshot s = guest_->Snapshot();
  EXPECT_TRUE(s.applied.crs.empty());
  EXPECT_EQ(s.leases.count("b"), 0u);
}

TEST_F(GuestTest, ArmingFailuresReachTheCallerAndTheSnapshot) {
  host_.set_responder([&](const ReceivedMessage& m) -> std::optional<std::vector<uint8_t>> {
    if (m.hdr.id == KVMI_CONTROL_MSR) return ErrorReply(m, -KVM_EPERM);
    return host_.DefaultReply(m);
  });
  Hook(&host_);
  Arming msr;
  msr.msrs = {0xC0000082};
  std::vector<std::string> errors = Lease("a", msr);
  ASSERT_EQ(errors.size(), 2u);  // one per vCPU
  EXPECT_THAT(errors[0], ::testing::HasSubstr("CONTROL_MSR"));
  EXPECT_EQ(guest_->Snapshot().arm_errors.size(), 2u);
}

TEST_F(GuestTest, ANewVcpuGetsWhatEveryVcpuHas) {
  Hook(&host_);
  Arming cr3;
  cr3.crs = {3};
  Lease("a", cr3);
  for (int i = 0; i < 2; ++i) ASSERT_TRUE(host_.WaitForId(KVMI_CONTROL_CR));
  host_.SendEvent(MakeTestEvent(KVMI_EVENT_CREATE_VCPU, 2, 5));
  auto m = host_.WaitForId(KVMI_CONTROL_CR);
  ASSERT_TRUE(m);
  EXPECT_EQ(Decode<kvmi::ControlCrRequest>(*m).vcpu, 2);
  EXPECT_TRUE(host_.WaitForId(KVMI_EVENT_REPLY));
  EXPECT_TRUE(WaitUntil([&] { return Settled(); }));
  EXPECT_EQ(guest_->vcpu_count(), 3u);
}

TEST_F(GuestTest, APausedVcpuIsHeldUntilResumed) {
  Hook(&host_);
  std::promise<CommandResult> paused;
  guest_->Pause("client", 1, [&](CommandResult r) { paused.set_value(std::move(r)); });
  auto m = host_.WaitForId(KVMI_PAUSE_VCPU);
  ASSERT_TRUE(m);
  EXPECT_EQ(Decode<kvmi::PauseVcpuRequest>(*m).vcpu, 1);
  EXPECT_TRUE(guest_->HasPauseRequest(1));
  host_.SendEvent(MakeTestEvent(KVMI_EVENT_PAUSE_VCPU, 1, 9));
  auto future = paused.get_future();
  ASSERT_EQ(future.wait_for(std::chrono::seconds(5)), std::future_status::ready);
  EXPECT_TRUE(future.get().ok());
  EXPECT_EQ(guest_->Snapshot().paused_vcpus, (std::map<uint16_t, OwnerId>{{1, "client"}}));
  EXPECT_FALSE(host_.WaitForId(KVMI_EVENT_REPLY, kNoMessage));  // held
  EXPECT_FALSE(guest_->Resume("someone else", 1));
  EXPECT_TRUE(guest_->Resume("client", 1));
  auto reply = host_.WaitForId(KVMI_EVENT_REPLY);
  ASSERT_TRUE(reply);
  EXPECT_EQ(reply->hdr.seq, 9u);
  EXPECT_TRUE(guest_->Snapshot().paused_vcpus.empty());
  EXPECT_FALSE(guest_->Resume("client", 1));
}

// The pause deadline answers a held pause without telling the guest. The vCPU's next pause (its
// event can only come after that answer) is held for its own owner, with its own id.
TEST_F(GuestTest, APauseAfterOneTheDeadlineEndedIsHeldAgain) {
  Hook(&host_);
  std::promise<CommandResult> first;
  guest_->Pause("client", 1, [&](CommandResult r) { first.set_value(std::move(r)); });
  ASSERT_TRUE(host_.WaitForId(KVMI_PAUSE_VCPU));
  kvmi::Event pause = MakeTestEvent(KVMI_EVENT_PAUSE_VCPU, 1, 9);
  host_.SendEvent(pause);
  ASSERT_EQ(first.get_future().wait_for(std::chrono::seconds(5)), std::future_status::ready);
  EXPECT_EQ(guest_->PausedEventId(1), 1009u);
  // The deadline's fallback, as the pipeline sends it: straight to the session.
  guest_->session()->ReplyToEvent(kvmi::MakeEventReply(pause, KVMI_EVENT_ACTION_CONTINUE), {});
  auto reply = host_.WaitForId(KVMI_EVENT_REPLY);
  ASSERT_TRUE(reply);
  EXPECT_EQ(reply->hdr.seq, 9u);

  std::promise<CommandResult> second;
  guest_->Pause("other", 1, [&](CommandResult r) { second.set_value(std::move(r)); });
  ASSERT_TRUE(host_.WaitForId(KVMI_PAUSE_VCPU));
  host_.SendEvent(MakeTestEvent(KVMI_EVENT_PAUSE_VCPU, 1, 10));
  auto future = second.get_future();
  ASSERT_EQ(future.wait_for(std::chrono::seconds(5)), std::future_status::ready);
  EXPECT_TRUE(future.get().ok());
  EXPECT_EQ(guest_->Snapshot().paused_vcpus, (std::map<uint16_t, OwnerId>{{1, "other"}}));
  EXPECT_EQ(guest_->PausedEventId(1), 1010u);
  EXPECT_FALSE(host_.WaitForId(KVMI_EVENT_REPLY, kNoMessage));  // held, not let go at once
  EXPECT_TRUE(guest_->Resume("other", 1));
  reply = host_.WaitForId(KVMI_EVENT_REPLY);
  ASSERT_TRUE(reply);
  EXPECT_EQ(reply->hdr.seq, 10u);
  EXPECT_EQ(guest_->PausedEventId(1), 0u);
}

TEST_F(GuestTest, AnOwnerGoingAwayLetsItsVcpusGo) {
  Hook(&host_);
  std::promise<CommandResult> paused;
  guest_->Pause("client", 0, [&](CommandResult r) { paused.set_value(std::move(r)); });
  ASSERT_TRUE(host_.WaitForId(KVMI_PAUSE_VCPU));
  host_.SendEvent(MakeTestEvent(KVMI_EVENT_PAUSE_VCPU, 0, 11));
  ASSERT_EQ(paused.get_future().wait_for(std::chrono::seconds(5)), std::future_status::ready);
  guest_->ReleaseOwner("client");
  auto reply = host_.WaitForId(KVMI_EVENT_REPLY);
  ASSERT_TRUE(reply);
  EXPECT_EQ(reply->hdr.seq, 11u);
  EXPECT_TRUE(guest_->Snapshot().paused_vcpus.empty());
}

TEST_F(GuestTest, AFailedPauseIsReportedAndForgotten) {
  host_.set_responder([&](const ReceivedMessage& m) -> std::optional<std::vector<uint8_t>> {
    if (m.hdr.id == KVMI_PAUSE_VCPU) return ErrorReply(m, -KVM_EINVAL);
    return host_.DefaultReply(m);
  });
  Hook(&host_);
  std::promise<CommandResult> paused;
  guest_->Pause("client", 0, [&](CommandResult r) { paused.set_value(std::move(r)); });
  auto future = paused.get_future();
  ASSERT_EQ(future.wait_for(std::chrono::seconds(5)), std::future_status::ready);
  CommandResult r = future.get();
  EXPECT_EQ(r.status, CommandResult::Status::kKvmiError);
  EXPECT_EQ(r.err, -KVM_EINVAL);
  EXPECT_FALSE(guest_->HasPauseRequest(0));
}

TEST_F(GuestTest, APauseOnAGuestNotHookedFailsAtOnce) {
  CommandResult r;
  guest_->Pause("client", 0, [&](CommandResult result) { r = std::move(result); });
  EXPECT_EQ(r.status, CommandResult::Status::kClosed);
}

TEST_F(GuestTest, ClosingForgetsTheSessionAndAReconnectArmsTheLeasesAgain) {
  auto first = Hook(&host_);
  Arming cr4;
  cr4.crs = {4};
  Lease("a", cr4);
  // A second live connection for the same guest is refused.
  ScriptedHost intruder;
  EXPECT_FALSE(guest_->Attach(NewSession(&intruder)));
  EXPECT_EQ(guest_->session(), first);

  host_.Close();
  EXPECT_TRUE(WaitUntil([&] { return guest_->state() == GuestState::kGone; }));
  EXPECT_EQ(guest_->session(), nullptr);
  GuestSnapshot gone = guest_->Snapshot();
  EXPECT_TRUE(gone.applied.empty());
  EXPECT_EQ(gone.leases.count("a"), 1u);  // kept for the reconnect

  ScriptedHost again;
  Hook(&again);
  EXPECT_EQ(guest_->Snapshot().connections, 2u);
  for (int i = 0; i < 2; ++i) {
    auto m = again.WaitForId(KVMI_CONTROL_CR);
    ASSERT_TRUE(m);
    EXPECT_TRUE(Decode<kvmi::ControlCrRequest>(*m).enable);
  }
  EXPECT_EQ(guest_->Snapshot().applied.crs, std::set<uint32_t>{4});
}

TEST_F(GuestTest, UnhookDisarmsEverythingThenCloses) {
  Hook(&host_);
  Arming cr4;
  cr4.crs = {4};
  Lease("a", cr4);
  for (int i = 0; i < 2; ++i) ASSERT_TRUE(host_.WaitForId(KVMI_CONTROL_CR));
  host_.SendEvent(MakeTestEvent(KVMI_EVENT_UNHOOK, 0, 3));
  for (int i = 0; i < 2; ++i) {
    auto m = host_.WaitForId(KVMI_CONTROL_CR);
    ASSERT_TRUE(m);
    EXPECT_FALSE(Decode<kvmi::ControlCrRequest>(*m).enable);
  }
  EXPECT_TRUE(host_.WaitClosed());
  EXPECT_TRUE(WaitUntil([&] { return guest_->state() == GuestState::kGone; }));
  EXPECT_THAT(router_.states(), ::testing::Contains(GuestState::kUnhooking));
}

TEST_F(GuestTest, PageAccessChangesGoToTheHostAndTheLease) {
  Hook(&host_);
  PagesResult r = SetPages("owner", {{0x10, KVMI_PAGE_ACCESS_R}, {0x11, KVMI_PAGE_ACCESS_RWX}},
                           /*all_or_nothing=*/true);
  EXPECT_THAT(r.errors, ElementsAre(0, 0));
  EXPECT_FALSE(r.rolled_back);
  auto m = host_.WaitForId(KVMI_SET_PAGE_ACCESS);
  ASSERT_TRUE(m);
  auto request = Decode<kvmi::SetPageAccessRequest>(*m);
  ASSERT_EQ(request.entries.size(), 1u);  // 0x11 was not restricted: nothing to send for it
  EXPECT_EQ(request.entries[0].gpa, 0x10u * KVMI_PAGE_SIZE);
  EXPECT_EQ(request.entries[0].access, KVMI_PAGE_ACCESS_R);
  EXPECT_TRUE(WaitUntil([&] { return Settled(); }));
  GuestSnapshot s = guest_->Snapshot();
  EXPECT_EQ(s.applied.page_access, (std::map<uint64_t, uint8_t>{{0x10, KVMI_PAGE_ACCESS_R}}));
  EXPECT_EQ(s.leases["owner"].page_access,
            (std::map<uint64_t, uint8_t>{{0x10, KVMI_PAGE_ACCESS_R}}));
}

TEST_F(GuestTest, PageAccessChangesWithoutAGuestFailWithEagain) {
  PagesResult r = SetPages("owner", {{0x10, KVMI_PAGE_ACCESS_R}}, true);
  EXPECT_THAT(r.errors, ElementsAre(-KVM_EAGAIN));
  EXPECT_FALSE(r.rolled_back);
}

// Two messages (one page more than one SET_PAGE_ACCESS carries); the host refuses the second.
class GuestPagesRollBackTest : public GuestTest {
 protected:
  void SetUp() override {
    GuestTest::SetUp();
    host_.set_responder([&](const ReceivedMessage& m) -> std::optional<std::vector<uint8_t>> {
      if (m.hdr.id == KVMI_SET_PAGE_ACCESS &&
          Decode<kvmi::SetPageAccessRequest>(m).entries.size() == 1) {
        return ErrorReply(m, -KVM_EINVAL);
      }
      return host_.DefaultReply(m);
    });
    Hook(&host_);
    for (uint64_t gfn = 0; gfn <= kvmi::kMaxSetPageAccessEntries; ++gfn) {
      pages_.emplace_back(gfn, KVMI_PAGE_ACCESS_R);
    }
  }
  std::vector<int32_t> ExpectedErrors() const {
    std::vector<int32_t> errors(pages_.size(), 0);
    errors.back() = -KVM_EINVAL;
    return errors;
  }
  std::vector<std::pair<uint64_t, uint8_t>> pages_;
};

TEST_F(GuestPagesRollBackTest, AllOrNothingTakesHostAndLeaseBack) {
  PagesResult r = SetPages("owner", pages_, /*all_or_nothing=*/true);
  EXPECT_EQ(r.errors, ExpectedErrors());
  EXPECT_TRUE(r.rolled_back);
  ASSERT_TRUE(host_.WaitForId(KVMI_SET_PAGE_ACCESS));
  ASSERT_TRUE(host_.WaitForId(KVMI_SET_PAGE_ACCESS));
  // The pages that did change go back to rwx.
  auto undo = host_.WaitForId(KVMI_SET_PAGE_ACCESS);
  ASSERT_TRUE(undo);
  auto request = Decode<kvmi::SetPageAccessRequest>(*undo);
  ASSERT_EQ(request.entries.size(), kvmi::kMaxSetPageAccessEntries);
  for (const auto& entry : request.entries) EXPECT_EQ(entry.access, KVMI_PAGE_ACCESS_RWX);
  EXPECT_TRUE(WaitUntil([&] { return Settled(); }));
  GuestSnapshot s = guest_->Snapshot();
  EXPECT_TRUE(s.applied.page_access.empty());
  EXPECT_EQ(s.leases.count("owner"), 0u);
}

TEST_F(GuestPagesRollBackTest, BestEffortTakesBackOnlyTheFailedPages) {
  PagesResult r = SetPages("owner", pages_, /*all_or_nothing=*/false);
  EXPECT_EQ(r.errors, ExpectedErrors());
  EXPECT_FALSE(r.rolled_back);
  ASSERT_TRUE(host_.WaitForId(KVMI_SET_PAGE_ACCESS));
  ASSERT_TRUE(host_.WaitForId(KVMI_SET_PAGE_ACCESS));
  EXPECT_FALSE(host_.WaitForId(KVMI_SET_PAGE_ACCESS, kNoMessage));  // nothing to undo
  EXPECT_TRUE(WaitUntil([&] { return Settled(); }));
  GuestSnapshot s = guest_->Snapshot();
  EXPECT_EQ(s.applied.page_access.size(), kvmi::kMaxSetPageAccessEntries);
  EXPECT_EQ(s.applied.page_access.count(pages_.back().first), 0u);
  EXPECT_EQ(s.leases["owner"].page_access.size(), kvmi::kMaxSetPageAccessEntries);
}

}  // namespace
}  // namespace kvmid
