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
#include <thread>

#include "daemon/kvmid.h"
#include "kernel/sim/fleet.h"

namespace kvmid {
namespace {

constexpr uint32_t kMsrLstar = 0xC0000082;
constexpr uint64_t kCr0Wp = 1ull << 16;

template <typename Pred>
bool WaitUntil(Pred pred, std::chrono::milliseconds timeout = std::chrono::seconds(10)) {
  auto deadline = Clock::now() + timeout;
  while (Clock::now() < deadline) {
    if (pred()) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  return pred();
}

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
    ASSERT_EQ(daemon_->Start(), "");
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
      return true;
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
  ASSERT_EQ(daemon_->ApplyPolicy(LockMsrAfterBootRule("lstar", kMsrLstar, RuleMode::kEnforce)), "");
  ASSERT_EQ(daemon_->ApplyPolicy(ForbidClearCr0WpRule("wp", RuleMode::kEnforce)), "");
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
  ASSERT_EQ(daemon_->ApplyPolicy(ForbidClearCr0WpRule("wp", RuleMode::kMonitor)), "");
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
  ASSERT_EQ(daemon_->ApplyPolicy(LockMsrAfterBootRule("lstar", kMsrLstar, RuleMode::kEnforce)), "");
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
  ASSERT_EQ(daemon_->ApplyPolicy(LockMsrAfterBootRule("lstar", kMsrLstar, RuleMode::kEnforce)), "");
  ASSERT_TRUE(AllHooked(2));
  ASSERT_TRUE(Armed(vm.config().name, "policy:lstar"));
  write_lstar.value = 0x2222000;
  Run(vm, 0, write_lstar);
  EXPECT_EQ(vm.guest().Snapshot(0).msrs.at(kMsrLstar), 0x1111000u);  // locked again
}

TEST_F(DaemonFleetTest, UnhookFromTheHostReleasesHooksAndLetsTheVmGo) {
  config_.verdicts.deadlines[KVMI_EVENT_UNHOOK].deadline = std::chrono::milliseconds(300);
  StartDaemon();
  ASSERT_EQ(daemon_->ApplyPolicy(ForbidClearCr4SmepSmapRule("smep", RuleMode::kEnforce)), "");
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

}  // namespace
}  // namespace kvmid
