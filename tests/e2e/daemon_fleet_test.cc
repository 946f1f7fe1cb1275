// kvmid against the project's own host side: a fleet of simulated guests (//kernel/sim) speaking
// KVMI v6 over real UNIX sockets, through QEMU's handshake, to the real daemon core. Checks the
// product's promises end to end: guests are hooked and identified, policies are armed and
// enforced on the guest's real state, a handler that misses its deadline costs the guest only the
// deadline, and a daemon that dies leaves guests running unrestricted and re-hooks them when it
// comes back.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <stdlib.h>
#include <unistd.h>

#include <fstream>
#include <future>
#include <set>
#include <thread>

#include "daemon/kvmid.h"
#include "daemon/testing/wait.h"
#include "kernel/sim/fleet.h"

namespace kvmid {
namespace {

constexpr uint32_t kMsrLstar = 0xC0000082;
constexpr uint64_t kCr0Wp = 1ull << 16;

using testing::WaitUntil;

class DaemonFleetTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char dir_template[] = "/tmp/kvmid-e2e-XXXXXX";
    dir_ = mkdtemp(dir_template);
    std::ofstream(dir_ + "/cookie") << "fleet-secret";
    config_.unix_socket = dir_ + "/kvmi.sock";
    config_.cookie_file = dir_ + "/cookie";
    for (auto& d : config_.verdicts.deadlines) d.deadline = std::chrono::milliseconds(300);
  }
  void TearDown() override {
    if (fleet_) fleet_->Stop();
    daemon_.reset();
    ::unlink((dir_ + "/cookie").c_str());
    ::rmdir(dir_.c_str());
  }

  void StartDaemon() {
    daemon_ = std::make_unique<Daemon>(config_);
    ASSERT_TRUE(daemon_->Start().ok());
  }

  void StartFleet(uint32_t vms, uint32_t vcpus) {
    kvmi::sim::FleetConfig fleet;
    fleet.vms = vms;
    fleet.guest.vcpus = vcpus;
    fleet.connector.endpoint.family = kvmi::Endpoint::Family::kUnix;
    fleet.connector.endpoint.path = config_.unix_socket;
    fleet.connector.cookie = "fleet-secret";  // kvmi-v7 QEMU: refuse a tool with a wrong hash
    fleet.connector.reconnect_seconds = 0.2;
    fleet.name_prefix = "e2e-";
    fleet_ = std::make_unique<kvmi::sim::Fleet>(fleet);
    fleet_->Start();
  }

  bool AllHooked(size_t n) {
    return WaitUntil([&] {
      size_t hooked = 0;
      for (const auto& g : daemon_->registry().List()) {
        hooked += g->state() == GuestState::kHooked ? 1 : 0;
      }
      return hooked == n;
    });
  }

  // Waits until the policy leases are applied on every vCPU of the guest.
  bool Armed(const std::string& name, const std::string& owner) {
    return WaitUntil([&] {
      auto guest = daemon_->registry().Lookup(name);
      if (!guest) return false;
      GuestSnapshot s = guest->Snapshot();
      auto lease = s.leases.find(owner);
      if (lease == s.leases.end()) return false;
      for (uint8_t e : lease->second.vcpu_events) {
        if (s.applied.vcpu_events.count(e) == 0) return false;
      }
      return s.arming_in_flight == 0;  // and the host has acknowledged it
    });
  }

  kvmi::sim::OpResult Run(kvmi::sim::SimVm& vm, uint16_t vcpu, const kvmi::sim::Op& op) {
    auto future = vm.Execute(vcpu, op);
    if (future.wait_for(std::chrono::seconds(10)) != std::future_status::ready) {
      ADD_FAILURE() << "guest operation did not complete";
      return {};
    }
    return future.get();
  }

  std::string dir_;
  DaemonConfig config_;
  std::unique_ptr<Daemon> daemon_;
  std::unique_ptr<kvmi::sim::Fleet> fleet_;
};

TEST_F(DaemonFleetTest, EveryGuestOfTheFleetIsHookedAndIdentified) {
  StartDaemon();
  StartFleet(6, 3);
  ASSERT_TRUE(AllHooked(6));
  for (size_t i = 0; i < fleet_->size(); ++i) {
    const auto& vm = fleet_->vm(i);
    auto guest = daemon_->registry().Lookup(kvmi::UuidToString(vm.config().uuid));
    ASSERT_NE(guest, nullptr) << vm.config().name;
    GuestSnapshot s = guest->Snapshot();
    EXPECT_EQ(s.identity.name, vm.config().name);
    EXPECT_EQ(s.vcpu_count, 3u);
    EXPECT_EQ(s.kvmi_version, 1u);
    EXPECT_NE(s.identity.start_time, 0);
  }
  EXPECT_EQ(fleet_->handshake_failures(), 0u);  // the cookie hash was right
}

TEST_F(DaemonFleetTest, LstarAndCr0WpPoliciesHoldOnTheGuestsRealState) {
  StartDaemon();
  ASSERT_TRUE(
      daemon_->ApplyPolicy(LockMsrAfterBootRule("lstar", kMsrLstar, RuleMode::kEnforce)).ok());
  ASSERT_TRUE(daemon_->ApplyPolicy(ForbidClearCr0WpRule("wp", RuleMode::kEnforce)).ok());
  StartFleet(1, 2);
  ASSERT_TRUE(AllHooked(1));
  auto& vm = fleet_->vm(0);
  ASSERT_TRUE(Armed(vm.config().name, "policy:lstar"));
  ASSERT_TRUE(Armed(vm.config().name, "policy:wp"));

  uint64_t lstar_before = vm.guest().Snapshot(1).msrs.at(kMsrLstar);
  ASSERT_NE(lstar_before, 0u);
  kvmi::sim::Op rootkit;
  rootkit.kind = kvmi::sim::OpKind::kWriteMsr;
  rootkit.index = kMsrLstar;
  rootkit.value = 0xdeadbeef000;
  rootkit.explicit_value = true;
  kvmi::sim::OpResult r = Run(vm, 1, rootkit);
  EXPECT_TRUE(r.executed);
  EXPECT_FALSE(r.faulted);  // keep-old: the write "succeeds" with no effect, no #GP
  EXPECT_EQ(vm.guest().Snapshot(1).msrs.at(kMsrLstar), lstar_before);

  uint64_t cr0 = vm.guest().Snapshot(0).sregs.cr0;
  ASSERT_NE(cr0 & kCr0Wp, 0u);
  kvmi::sim::Op clear_wp;
  clear_wp.kind = kvmi::sim::OpKind::kWriteCr0;
  clear_wp.value = cr0 & ~kCr0Wp;
  clear_wp.explicit_value = true;
  Run(vm, 0, clear_wp);
  EXPECT_EQ(vm.guest().Snapshot(0).sregs.cr0, cr0);

  // A monitor-mode copy of the rule would have let it through: switch and try again.
  ASSERT_TRUE(daemon_->ApplyPolicy(ForbidClearCr0WpRule("wp", RuleMode::kMonitor)).ok());
  Run(vm, 0, clear_wp);
  EXPECT_EQ(vm.guest().Snapshot(0).sregs.cr0, cr0 & ~kCr0Wp);
  const auto rules = daemon_->policies().rules();
  EXPECT_GE((*rules)[0]->enforced.load(), 1u);  // lstar
}

class StallingHandler : public VerdictHandler {
 public:
  std::string id() const override { return "stalling"; }
  void OnBlockingEvent(const EventContext&, VerdictPromise promise) override {
    std::lock_guard<std::mutex> lock(mutex_);
    kept_.push_back(std::move(promise));  // never answers: a hung analysis service
  }

 private:
  std::mutex mutex_;
  std::vector<VerdictPromise> kept_;
};

TEST_F(DaemonFleetTest, AHungHandlerCostsTheGuestOnlyTheDeadline) {
  StartDaemon();
  auto handler = std::make_shared<StallingHandler>();
  HandlerClaim claim;
  claim.events = {KVMI_EVENT_CR};
  claim.deadline = std::chrono::milliseconds(200);
  auto registration = daemon_->pipeline().RegisterHandler(handler, claim);
  // Something must arm CR3 events: a client lease, as the gRPC Attach will take.
  StartFleet(1, 1);
  ASSERT_TRUE(AllHooked(1));
  auto& vm = fleet_->vm(0);
  auto guest = daemon_->registry().Lookup(vm.config().name);
  Arming arming;
  arming.vcpu_events = {KVMI_EVENT_CR};
  arming.crs = {3};
  guest->SetLease("client:hung", arming);
  ASSERT_TRUE(Armed(vm.config().name, "client:hung"));
  kvmi::sim::Op switch_process;
  switch_process.kind = kvmi::sim::OpKind::kWriteCr3;
  switch_process.value = 0x5000;
  switch_process.explicit_value = true;
  auto start = Clock::now();
  Run(vm, 0, switch_process);
  auto took = Clock::now() - start;
  EXPECT_GE(took, std::chrono::milliseconds(200));
  EXPECT_LT(took, std::chrono::seconds(3));
  EXPECT_EQ(vm.guest().Snapshot(0).sregs.cr3, 0x5000u);  // fallback CONTINUE: the write happened
  EXPECT_GE(daemon_->pipeline().stats().fallback_deadline.load(), 1u);
}

TEST_F(DaemonFleetTest, KillingTheDaemonFreesTheGuestsAndTheyAreReHookedWhenItReturns) {
  StartDaemon();
  ASSERT_TRUE(
      daemon_->ApplyPolicy(LockMsrAfterBootRule("lstar", kMsrLstar, RuleMode::kEnforce)).ok());
  StartFleet(2, 1);
  ASSERT_TRUE(AllHooked(2));
  auto& vm = fleet_->vm(0);
  ASSERT_TRUE(Armed(vm.config().name, "policy:lstar"));
  // Abrupt end: no unhook, no disarming (the kernel restores everything at session end).
  daemon_->Shutdown(std::chrono::milliseconds(0));
  daemon_.reset();
  ASSERT_TRUE(WaitUntil([&] { return fleet_->hooked_count() == 0; }));

  kvmi::sim::Op write_lstar;
  write_lstar.kind = kvmi::sim::OpKind::kWriteMsr;
  write_lstar.index = kMsrLstar;
  write_lstar.value = 0x1111000;
  write_lstar.explicit_value = true;
  Run(vm, 0, write_lstar);
  EXPECT_EQ(vm.guest().Snapshot(0).msrs.at(kMsrLstar), 0x1111000u);  // unrestricted

  StartDaemon();
  ASSERT_TRUE(
      daemon_->ApplyPolicy(LockMsrAfterBootRule("lstar", kMsrLstar, RuleMode::kEnforce)).ok());
  ASSERT_TRUE(AllHooked(2));
  ASSERT_TRUE(Armed(vm.config().name, "policy:lstar"));
  write_lstar.value = 0x2222000;
  Run(vm, 0, write_lstar);
  EXPECT_EQ(vm.guest().Snapshot(0).msrs.at(kMsrLstar), 0x1111000u);  // locked again
}

TEST_F(DaemonFleetTest, UnhookFromTheHostReleasesHooksAndLetsTheVmGo) {
  config_.verdicts.deadlines[KVMI_EVENT_UNHOOK].deadline = std::chrono::milliseconds(300);
  StartDaemon();
  ASSERT_TRUE(daemon_->ApplyPolicy(ForbidClearCr4SmepSmapRule("smep", RuleMode::kEnforce)).ok());
  StartFleet(1, 2);
  ASSERT_TRUE(AllHooked(1));
  auto& vm = fleet_->vm(0);
  ASSERT_TRUE(Armed(vm.config().name, "policy:smep"));
  auto start = Clock::now();
  vm.Detach(std::chrono::seconds(5));  // KVM_INTROSPECTION_UNHOOK, waits for kvmid to close
  EXPECT_LT(Clock::now() - start, std::chrono::seconds(2));  // kvmid closed promptly
  EXPECT_TRUE(WaitUntil(
      [&] { return daemon_->registry().Lookup(vm.config().name)->state() == GuestState::kGone; }));
}

TEST_F(DaemonFleetTest, TwoHundredGuestsWithFourVcpusHookConcurrently) {
  config_.io_threads = 2;
  // 1,000 simulator threads share two cores with the daemon (and, under sanitizers, run many
  // times slower): the handshake deadline is for hostile peers, not for a loaded test machine.
  config_.handshake_timeout = std::chrono::seconds(60);
  StartDaemon();
  ASSERT_TRUE(daemon_->ApplyPolicy(ForbidClearCr0WpRule("wp", RuleMode::kEnforce)).ok());
  auto start = Clock::now();
  StartFleet(200, 4);
  ASSERT_TRUE(AllHooked(200)) << daemon_->registry().List().size() << " guests known";
  // Every guest armed on all four vCPUs (policy lease applied).
  EXPECT_TRUE(WaitUntil([&] {
    for (const auto& g : daemon_->registry().List()) {
      GuestSnapshot s = g->Snapshot();
      if (s.vcpu_count != 4 || s.applied.crs.count(0) == 0) return false;
    }
    return true;
  }));
  EXPECT_LT(Clock::now() - start, std::chrono::seconds(60));
  EXPECT_EQ(fleet_->handshake_failures(), 0u);
  EXPECT_EQ(daemon_->registry().duplicate_rejections(), 0u);
}

// Records every blocking event it is given and answers per event type.
class RecordingHandler : public VerdictHandler {
 public:
  using Answer = std::function<void(const EventContext&, VerdictPromise)>;
  explicit RecordingHandler(Answer answer) : answer_(std::move(answer)) {}
  std::string id() const override { return "recording"; }
  void OnBlockingEvent(const EventContext& ctx, VerdictPromise promise) override {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      events_.push_back(ctx.event);
    }
    cv_.notify_all();
    answer_(ctx, std::move(promise));
  }
  std::optional<kvmi::Event> WaitFor(uint8_t id) {
    std::unique_lock<std::mutex> lock(mutex_);
    std::optional<kvmi::Event> found;
    cv_.wait_for(lock, std::chrono::seconds(10), [&] {
      for (const auto& e : events_) {
        if (e.id() == id) found = e;
      }
      return found.has_value();
    });
    return found;
  }

 private:
  Answer answer_;
  std::mutex mutex_;
  std::condition_variable cv_;
  std::vector<kvmi::Event> events_;
};

TEST_F(DaemonFleetTest, EveryEventTypeReachesTheDaemonWithItsFields) {
  StartDaemon();
  std::mutex observed_mutex;
  std::set<uint8_t> observed;
  daemon_->pipeline().AddObserver([&](const ObservedEvent& o) {
    std::lock_guard<std::mutex> lock(observed_mutex);
    observed.insert(o.event.id());
  });
  std::shared_ptr<Guest> guest;
  auto handler =
      std::make_shared<RecordingHandler>([&](const EventContext& ctx, VerdictPromise promise) {
        auto shared = std::make_shared<VerdictPromise>(std::move(promise));
        Verdict verdict = Verdict::Continue("handler:recording");
        if (ctx.event.id() == KVMI_EVENT_PF) {
          // Let the write through by single-stepping it (the restriction stays).
          verdict.action = KVMI_EVENT_ACTION_RETRY;
          verdict.pf = kvmi_event_pf_reply{};
          verdict.pf->singlestep = 1;
        }
        if (ctx.event.id() == KVMI_EVENT_BREAKPOINT) {
          // Inject #UD while the guest is about to get its #BP back: the collision is a TRAP.
          kvmi::InjectExceptionRequest inject;
          inject.vcpu = ctx.event.vcpu();
          inject.nr = 6;
          ctx.guest->session()->Send(inject,
                                     [shared, verdict](CommandResult) { shared->Answer(verdict); });
          return;
        }
        shared->Answer(verdict);
      });
  auto registration = daemon_->pipeline().RegisterHandler(handler, HandlerClaim{});
  StartFleet(1, 1);
  ASSERT_TRUE(AllHooked(1));
  auto& vm = fleet_->vm(0);
  guest = daemon_->registry().Lookup(vm.config().name);
  Arming arming;
  arming.vcpu_events = {KVMI_EVENT_CR,         KVMI_EVENT_MSR,        KVMI_EVENT_XSETBV,
                        KVMI_EVENT_BREAKPOINT, KVMI_EVENT_HYPERCALL,  KVMI_EVENT_PF,
                        KVMI_EVENT_TRAP,       KVMI_EVENT_DESCRIPTOR, KVMI_EVENT_SINGLESTEP};
  arming.crs = {3};
  arming.msrs = {0x176};
  arming.page_access = {{0x200, KVMI_PAGE_ACCESS_R | KVMI_PAGE_ACCESS_X}};
  guest->SetLease("client:e2e", arming);
  ASSERT_TRUE(Armed(vm.config().name, "client:e2e"));
  ASSERT_TRUE(WaitUntil([&] {
    GuestSnapshot s = guest->Snapshot();
    return s.applied.page_access.size() == 1 && s.arming_in_flight == 0;
  }));

  using kvmi::sim::Op;
  using kvmi::sim::OpKind;
  Run(vm, 0, Op{OpKind::kWriteCr3, 0, 0x7000, true});
  auto cr = handler->WaitFor(KVMI_EVENT_CR);
  ASSERT_TRUE(cr);
  EXPECT_EQ(cr->specific.cr.cr, 3);
  EXPECT_EQ(cr->specific.cr.new_value, 0x7000u);
  EXPECT_EQ(cr->common.arch.mode, 8);

  Run(vm, 0, Op{OpKind::kWriteMsr, 0x176, 0xffffffff81234000, true});
  auto msr = handler->WaitFor(KVMI_EVENT_MSR);
  ASSERT_TRUE(msr);
  EXPECT_EQ(msr->specific.msr.msr, 0x176u);
  EXPECT_EQ(msr->specific.msr.new_value, 0xffffffff81234000u);
  EXPECT_EQ(vm.guest().Snapshot(0).msrs.at(0x176), 0xffffffff81234000u);

  Run(vm, 0, Op{OpKind::kXsetbv});
  EXPECT_TRUE(handler->WaitFor(KVMI_EVENT_XSETBV));
  Run(vm, 0, Op{OpKind::kHypercall});
  EXPECT_TRUE(handler->WaitFor(KVMI_EVENT_HYPERCALL));
  Run(vm, 0, Op{OpKind::kDescriptor, 2 /* LGDT */, 0xdef000, true});
  auto desc = handler->WaitFor(KVMI_EVENT_DESCRIPTOR);
  ASSERT_TRUE(desc);
  EXPECT_EQ(desc->specific.descriptor.descriptor, KVMI_DESC_GDTR);
  EXPECT_EQ(desc->specific.descriptor.write, 1);

  kvmi::sim::OpResult write = Run(vm, 0, Op{OpKind::kWrite, 0, 0x1122334455667788, true, 0x200010});
  auto pf = handler->WaitFor(KVMI_EVENT_PF);
  ASSERT_TRUE(pf);
  EXPECT_EQ(pf->specific.pf.gpa, 0x200010u);
  EXPECT_EQ(pf->specific.pf.access, KVMI_PAGE_ACCESS_W);
  EXPECT_TRUE(handler->WaitFor(KVMI_EVENT_SINGLESTEP));
  EXPECT_TRUE(write.single_stepped);
  uint64_t written = 0;
  vm.guest().ReadPhysical(0x200010, &written, sizeof(written));
  EXPECT_EQ(written, 0x1122334455667788u);

  Run(vm, 0, Op{OpKind::kInt3});
  auto bp = handler->WaitFor(KVMI_EVENT_BREAKPOINT);
  ASSERT_TRUE(bp);
  EXPECT_EQ(bp->specific.breakpoint.insn_len, 1);
  auto trap = handler->WaitFor(KVMI_EVENT_TRAP);
  ASSERT_TRUE(trap);
  EXPECT_EQ(trap->specific.trap.vector, 3u);

  // The daemon's own events: a hot-added vCPU, a pause, and UNHOOK.
  ASSERT_GE(vm.AddVcpu(true), 1);
  EXPECT_TRUE(WaitUntil([&] { return guest->vcpu_count() == 2; }));
  std::promise<CommandResult> paused;
  guest->Pause("client:e2e", 0, [&](CommandResult r) { paused.set_value(r); });
  auto paused_future = paused.get_future();
  ASSERT_EQ(paused_future.wait_for(std::chrono::seconds(10)), std::future_status::ready);
  EXPECT_TRUE(paused_future.get().ok());
  EXPECT_TRUE(guest->Resume("client:e2e", 0));
  vm.Detach(std::chrono::seconds(5));
  EXPECT_TRUE(WaitUntil([&] {
    std::lock_guard<std::mutex> lock(observed_mutex);
    return observed.size() == KVMI_NUM_EVENTS;
  })) << "observed "
      << observed.size() << " of " << KVMI_NUM_EVENTS << " event types";
}

}  // namespace
}  // namespace kvmid
