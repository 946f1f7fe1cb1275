// One simulated VM: a SimGuest, its KVMI engine, one thread per vCPU running guest operations,
// and QEMU's side of the channel (host::QemuConnector: handshake, hook, reconnect).
#ifndef KVMID_KERNEL_SIM_SIM_VM_H_
#define KVMID_KERNEL_SIM_SIM_VM_H_

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <future>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "kernel/abi/handshake.h"
#include "kernel/host/qemu_connector.h"
#include "kernel/host/vm_introspection.h"
#include "kernel/sim/sim_guest.h"
#include "kernel/sim/workload.h"
#include "kernel/transport/socket.h"

namespace kvmi::sim {

using ConnectorConfig = host::ConnectorConfig;

struct VmConfig {
  std::string name = "vm";
  Uuid uuid{};
  GuestConfig guest;
  ConnectorConfig connector;
  std::optional<Scenario> workload;  // nullopt: vCPUs only run test operations and serve commands
};

// What one operation did, for tests.
struct OpResult {
  bool executed = false;  // false: the VM stopped or crashed first
  bool faulted = false;   // the guest took #GP (CR/MSR write refused)
  uint32_t attempts = 0;  // > 1 when a RETRY re-executed it
  uint64_t value = 0;     // value read / written / loaded
  bool single_stepped = false;
};

class SimVm {
 public:
  explicit SimVm(VmConfig config);
  ~SimVm();
  SimVm(const SimVm&) = delete;
  SimVm& operator=(const SimVm&) = delete;

  // Starts vCPU threads and the connector.
  void Start();
  // Ends the session, stops every thread. Idempotent.
  void Stop();

  // Runs `op` on a vCPU (after whatever it is doing now). The future is ready once the
  // operation completed, including any event round trips.
  std::future<OpResult> Execute(uint16_t vcpu, const Op& op);
  // Hot-adds a vCPU (KVM_CREATE_VCPU). With start = false it stays uninitialised (commands to it
  // get -KVM_EAGAIN) until StartVcpu. Returns the index or -1.
  int AddVcpu(bool start = true);
  void StartVcpu(uint16_t vcpu);
  // KVM_INTROSPECTION_UNHOOK: sends UNHOOK (if enabled), waits up to `grace` for the tool to
  // close, then ends the session; the connector does not reconnect afterwards.
  int Detach(std::chrono::milliseconds grace);
  // The two halves of Detach (host::QemuConnector::BeginDetach / FinishDetach).
  int BeginDetach() { return connector_->BeginDetach(); }
  void FinishDetach(Clock::time_point deadline) { connector_->FinishDetach(deadline); }
  // vCPUs hot-plugged by the scenario (hotplug_vcpus).
  uint32_t hotplugged() const { return hotplugged_.load(std::memory_order_relaxed); }

  // Blocks until a session is hooked (or the deadline); true if hooked.
  bool WaitHooked(Clock::time_point deadline) { return connector_->WaitHooked(deadline); }
  // Blocks until `count` sessions have ended.
  bool WaitSessionsEnded(uint64_t count, Clock::time_point deadline) {
    return connector_->WaitSessionsEnded(count, deadline);
  }
  uint64_t sessions_started() const { return connector_->sessions_started(); }
  uint64_t sessions_ended() const { return connector_->sessions_ended(); }
  std::string last_end_reason() const { return connector_->last_end_reason(); }
  // Handshakes refused (cookie mismatch, bad answer) and failed connects.
  uint64_t handshake_failures() const { return connector_->handshake_failures(); }

  SimGuest& guest() { return *guest_; }
  host::VmIntrospection& engine() { return *engine_; }
  const VmConfig& config() const { return config_; }
  // Guest operations executed (all vCPUs).
  uint64_t ops_executed() const { return ops_executed_.load(std::memory_order_relaxed); }

 private:
  struct TestOp {
    Op op;
    std::promise<OpResult> done;
  };
  struct VcpuRunner {
    std::thread thread;
    std::mutex mu;
    std::deque<TestOp> test_ops;
    bool hot_added = false;
    bool exited = false;  // (mu) the thread no longer takes operations
    bool started = false;
    std::optional<host::GuestInjection> injecting;  // the guest's own pending injection
    uint32_t cr3_slot = 0;
  };

  void VcpuLoop(uint16_t vcpu);
  // KVM_RUN's entry path: jobs, then event injection (tool exception or TRAP on a collision).
  void EnterGuest(uint16_t vcpu);
  OpResult RunOp(uint16_t vcpu, const Op& op);
  // One attempt; returns true when done, false when the guest must re-execute (RETRY).
  bool ExecuteOnce(uint16_t vcpu, const Op& op, OpResult* result);
  bool MemoryAccess(uint16_t vcpu, const Op& op, uint8_t access, OpResult* result);
  // vCPU 0's thread: hot-plugs the scenario's next vCPU when it is due (see Scenario).
  void MaybeHotplug(const Scenario& scenario, Clock::time_point now, Clock::time_point* due);
  VcpuRunner& runner(uint16_t vcpu) { return *runners_[vcpu]; }
  bool stopping() const { return stop_.load(std::memory_order_acquire); }

  const VmConfig config_;
  std::unique_ptr<SimGuest> guest_;
  std::unique_ptr<host::VmIntrospection> engine_;
  std::unique_ptr<VcpuRunner> runners_[SimGuest::kMaxVcpus];
  std::unique_ptr<host::QemuConnector> connector_;
  std::atomic<bool> stop_{false};
  std::atomic<bool> started_{false};
  std::atomic<uint64_t> ops_executed_{0};
  std::atomic<uint32_t> hotplugged_{0};
  // Serialises adding a vCPU (runners_ and the guest's vCPU count) with Stop's walk over them, so
  // that a scenario's hot-plug from a vCPU thread never races with the shutdown.
  std::mutex vcpus_mu_;
};

}  // namespace kvmi::sim

#endif  // KVMID_KERNEL_SIM_SIM_VM_H_
