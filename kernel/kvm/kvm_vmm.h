// kvmi-vmm's VM: a KvmBackend, the KVMI engine on it, one thread per vCPU running KVM_RUN and
// handling its exits (console and sleep ports, MMIO exits of restricted pages, WRMSR exits of
// filtered MSRs, guest-debug exits), and QEMU's side of the introspection channel
// (host::QemuConnector, shared with the simulator). The guest is a flat image entered in 32-bit
// protected mode at GUEST_LOAD_GPA with its command line at GUEST_CMDLINE_GPA (guest/layout.h).
#ifndef KVMID_KERNEL_KVM_KVM_VMM_H_
#define KVMID_KERNEL_KVM_KVM_VMM_H_

#include <array>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "kernel/host/qemu_connector.h"
#include "kernel/host/vm_introspection.h"
#include "kernel/kvm/kvm_backend.h"

namespace kvmi::kvm {

// The events stock KVM lets a user-space VMM produce. The others (CR, XSETBV, DESCRIPTOR,
// HYPERCALL) are never allowed for this guest: CHECK_EVENT answers -KVM_EPERM (docs/KVM.md).
inline const std::vector<int32_t> kRealEvents = {
    KVMI_EVENT_UNHOOK, KVMI_EVENT_MSR,         KVMI_EVENT_BREAKPOINT, KVMI_EVENT_PF,
    KVMI_EVENT_TRAP,   KVMI_EVENT_CREATE_VCPU, KVMI_EVENT_PAUSE_VCPU, KVMI_EVENT_SINGLESTEP,
};

struct VmmConfig {
  std::string name = "kvm-vm";
  Uuid uuid{};
  uint64_t memory_bytes = 32ull << 20;
  std::vector<uint8_t> image;  // flat binary, loaded at GUEST_LOAD_GPA
  std::string cmdline;
  host::ConnectorConfig connector;  // allowed_events is narrowed to kRealEvents
  // Connect once the guest reports its kernel set up (GUEST_PORT_BOOTED) rather than at start.
  bool hook_after_boot = true;
  // vCPUs at start (1..GUEST_MAX_VCPUS). vCPU 0 boots the kernel; the others are application
  // processors the VMM starts once the kernel reports itself set up (guest/layout.h).
  uint32_t vcpus = 1;
  // If >= 0: one more vCPU is created (KVM_CREATE_VCPU) and started this long after Start, as a
  // CPU hot-add; the engine sends CREATE_VCPU for it when it first runs.
  int64_t hotplug_vcpu_after_ms = -1;
  // Enforce execute restrictions (KvmBackend::set_enforce_execute; docs/KVM.md for the cost).
  bool enforce_execute = false;
  // One console line (without the newline), from the vCPU thread that printed it.
  std::function<void(const std::string&)> on_console_line;
};

// Exit counters (any thread).
struct VmmStats {
  std::atomic<uint64_t> exits{0};
  std::atomic<uint64_t> io_exits{0};
  std::atomic<uint64_t> mmio_exits{0};
  std::atomic<uint64_t> msr_exits{0};
  std::atomic<uint64_t> debug_exits{0};
  std::atomic<uint64_t> breakpoint_exits{0};  // INT3s KVM could not emulate
  std::atomic<uint64_t> fetch_faults{0};      // fetches from execute-restricted pages
  std::atomic<uint64_t> kicks{0};             // KVM_RUN interrupted (-EINTR)
};

class KvmVmm {
 public:
  static std::unique_ptr<KvmVmm> Create(VmmConfig config, std::string* error);
  ~KvmVmm();
  KvmVmm(const KvmVmm&) = delete;
  KvmVmm& operator=(const KvmVmm&) = delete;

  // Starts the vCPU and the connector.
  void Start();
  // Asks the tool to unhook (KVMI_EVENT_UNHOOK, if it enabled it) and waits a little for it to
  // let go, then ends the session (restoring the guest), stops the vCPU and the connector.
  // Idempotent.
  void Stop();
  // True once the guest halted, shut down (triple fault) or was crashed by the tool.
  bool guest_stopped() const { return guest_stopped_.load(std::memory_order_acquire); }
  std::string stop_reason() const;

  KvmBackend& backend() { return *backend_; }
  host::VmIntrospection& engine() { return *engine_; }
  host::QemuConnector& connector() { return *connector_; }
  const VmmStats& stats() const { return stats_; }

 private:
  explicit KvmVmm(VmmConfig config);
  void VcpuLoop(uint16_t vcpu, bool hot_added);
  void SetBootState(uint16_t vcpu);
  // An application processor: waits until the kernel reported where APs start (or the VMM
  // stops), then enters there. False if the VMM stopped first.
  bool WaitAndSetApState(uint16_t vcpu);
  void StartVcpuThread(uint16_t vcpu, bool hot_added);
  void HotplugAfter(std::chrono::milliseconds delay);
  // Before KVM_RUN: queued jobs, then the tool's exception (or TRAP if the guest is busy).
  void EnterGuest(uint16_t vcpu);
  void HandleIo(uint16_t vcpu);
  void HandleMmio(uint16_t vcpu);
  void HandleWrmsr(uint16_t vcpu);
  void HandleDebug(uint16_t vcpu);
  // KVM_EXIT_INTERNAL_ERROR (emulation failure): hosts whose KVM sends a guest's INT3 to its
  // instruction emulator, which cannot deliver software interrupts in protected mode (PVM,
  // docs/KVM.md), stop the vCPU at the INT3 instead of exiting with KVM_EXIT_DEBUG. If RIP is at
  // an INT3, this is the BREAKPOINT point: the event, then the guest's #BP (delivered by the VMM,
  // as KVM could not) unless the tool answers RETRY. False if RIP is not at an INT3.
  bool HandleUnemulatedInt3(uint16_t vcpu);
  // Also at an emulation failure: with execute enforcement, a fetch from a page the tool made
  // non-executable (it has no memslot). PF (access X, GPA and GVA of RIP); RETRY re-enters at
  // RIP, CONTINUE runs that one instruction with the page mapped (single step), RETRY +
  // singlestep likewise and then SINGLESTEP. False if RIP is not in such a page.
  bool HandleFetchFromRestrictedPage(uint16_t vcpu);
  // The guest virtual address of a kernel access to gpa, when the identity map the guest uses
  // for its kernel translates it back (KVM's exits carry no linear address); 0 otherwise.
  uint64_t GvaForGpa(uint16_t vcpu, uint64_t gpa);
  // Serves commands while the guest sleeps (sleep port) or is halted, until `deadline`.
  void Idle(uint16_t vcpu, host::Clock::time_point deadline);
  void StopGuest(const std::string& reason);
  void StartConnector();
  bool stopping() const { return stop_.load(std::memory_order_acquire); }

  VmmConfig config_;
  std::unique_ptr<KvmBackend> backend_;
  std::unique_ptr<host::VmIntrospection> engine_;
  std::unique_ptr<host::QemuConnector> connector_;
  std::mutex threads_mu_;  // vcpu_threads_: Start and the hot-add thread against Stop
  std::vector<std::thread> vcpu_threads_;
  std::thread hotplug_thread_;
  // Where APs start, from vCPU 0's registers at GUEST_PORT_BOOTED.
  struct ApBoot {
    uint64_t entry = 0;
    uint64_t stacks = 0;
    uint64_t r15 = 0;
    kvm_sregs sregs{};
  };
  std::mutex ap_mu_;
  std::condition_variable ap_cv_;  // ap_boot_ set, or stopping (also wakes the hot-add thread)
  std::optional<ApBoot> ap_boot_;
  std::atomic<bool> stop_{false};
  std::atomic<bool> started_{false};
  std::atomic<bool> guest_stopped_{false};
  std::mutex connector_mu_;  // StartConnector (a vCPU thread) against Stop
  bool connector_started_ = false;
  mutable std::mutex reason_mu_;
  std::string stop_reason_;
  // Per vCPU, each used by its vCPU's thread only (sized for the most vCPUs there can be).
  std::vector<std::string> console_lines_;
  VmmStats stats_;
};

}  // namespace kvmi::kvm

#endif  // KVMID_KERNEL_KVM_KVM_VMM_H_
