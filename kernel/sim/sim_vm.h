// One simulated VM: a SimGuest, its KVMI engine, one thread per vCPU running guest operations,
// and a QEMU-like connector thread that connects to the tool, runs the kvmi-v6 handshake, hooks
// the engine (whose receive loop then runs on that thread) and reconnects after `reconnect`
// seconds when the tool goes away (QEMU's `reconnect=N`).
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
#include "kernel/host/vm_introspection.h"
#include "kernel/sim/sim_guest.h"
#include "kernel/sim/workload.h"
#include "kernel/transport/socket.h"

namespace kvmi::sim {

struct ConnectorConfig {
  Endpoint endpoint;
  // Seconds before reconnecting after the tool went away or refused us; 0 = never reconnect.
  double reconnect_seconds = 1.0;
  // Fill uuid, name and start_time in qemu2introspector (v6 QEMU leaves name/start_time zero).
  bool fill_identity = true;
  // When set, refuse a tool whose cookie_hash is not SHA-1(cookie) (kvmi-v7 QEMU behaviour).
  std::optional<std::string> cookie;
  // KVM_INTROSPECTION_COMMAND / _EVENT calls QEMU makes after HOOK ({-1} = allow all, as v6).
  std::vector<int32_t> allowed_commands = {host::kAllIds};
  std::vector<int32_t> allowed_events = {host::kAllIds};
  std::chrono::milliseconds handshake_timeout{30000};
};

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

  // Blocks until a session is hooked (or the deadline); true if hooked.
  bool WaitHooked(Clock::time_point deadline);
  // Blocks until `count` sessions have ended.
  bool WaitSessionsEnded(uint64_t count, Clock::time_point deadline);
  uint64_t sessions_started() const;
  uint64_t sessions_ended() const;
  std::string last_end_reason() const;
  // Handshakes refused (cookie mismatch, bad answer) and failed connects.
  uint64_t handshake_failures() const { return handshake_failures_.load(); }

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
  void ConnectorLoop();
  // Returns the socket after a successful handshake, or an invalid fd.
  UniqueFd ConnectAndHandshake(std::string* error);
  void SleepInterruptibly(std::chrono::milliseconds duration);
  VcpuRunner& runner(uint16_t vcpu) { return *runners_[vcpu]; }
  bool stopping() const { return stop_.load(std::memory_order_acquire); }

  const VmConfig config_;
  std::unique_ptr<SimGuest> guest_;
  std::unique_ptr<host::VmIntrospection> engine_;
  std::unique_ptr<VcpuRunner> runners_[SimGuest::kMaxVcpus];
  std::thread connector_;
  std::atomic<bool> stop_{false};
  std::atomic<bool> detached_{false};
  std::atomic<bool> started_{false};
  std::atomic<uint64_t> ops_executed_{0};
  std::atomic<uint64_t> handshake_failures_{0};

  mutable std::mutex state_mu_;
  std::condition_variable state_cv_;
  uint64_t sessions_started_ = 0;
  uint64_t sessions_ended_ = 0;
  std::string last_end_reason_;
  int handshake_fd_ = -1;  // shut down by Stop() to interrupt a handshake
  bool connector_done_ = false;
};

}  // namespace kvmi::sim

#endif  // KVMID_KERNEL_SIM_SIM_VM_H_
