// The KVMI engine's GuestBackend over a real VM on /dev/kvm: vCPU state through KVM's vCPU ioctls,
// guest memory through the VMM's own mapping of guest RAM, and the interception knobs stock KVM
// gives user space:
//   * MSR writes: KVM_X86_SET_MSR_FILTER denies writes to the intercepted MSRs, and with
//     KVM_CAP_X86_USER_SPACE_MSR (KVM_MSR_EXIT_REASON_FILTER) the denied WRMSR exits to us;
//   * page access: RAM is a set of memslots split at restricted pages; a page without W is a
//     read-only slot (writes exit as KVM_EXIT_MMIO), a page without R has no slot (every access
//     exits as MMIO); with execute enforcement a page without X has no slot either (fetches
//     stop the vCPU, which the VMM reports as PF);
//   * breakpoints: KVM_SET_GUEST_DEBUG (USE_SW_BP), single-step likewise (where KVM cannot
//     deliver an INT3 at all, the VMM catches it at the emulation failure, docs/KVM.md).
// A vCPU inside KVM_RUN is forced out with immediate_exit and SIGUSR1 (its process-wide handler,
// installed by Create, does nothing).
// What stock KVM cannot give user space (CR writes, XSETBV, descriptor-table exiting, the KVMI
// hypercall) has no knob here; kvmi-vmm disallows those events instead (docs/KVM.md).
#ifndef KVMID_KERNEL_KVM_KVM_BACKEND_H_
#define KVMID_KERNEL_KVM_KVM_BACKEND_H_

#include <linux/kvm.h>
#include <pthread.h>

#include <array>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <vector>

#include "kernel/host/guest_backend.h"
#include "kernel/host/vm_introspection.h"
#include "kernel/transport/unique_fd.h"

namespace kvmi::kvm {

// One vCPU's KVM objects. The kvm_run page is shared with the kernel.
struct KvmVcpu {
  UniqueFd fd;
  kvm_run* run = nullptr;
  size_t run_size = 0;
  std::atomic<pthread_t> thread{};  // set by the vCPU thread before its first KVM_RUN
  std::atomic<bool> has_thread{false};
  std::atomic<bool> initialized{false};
  bool single_step = false;  // vCPU thread only
  bool sw_breakpoints = false;
  // An instruction fetched from an execute-restricted page runs as one single step with the page
  // mapped (vCPU thread only): its gfn (~0: none), and whether SINGLESTEP is owed to the tool.
  uint64_t exec_step_gfn = ~uint64_t{0};
  bool exec_step_event = false;
  // The VMM injected #BP for the next entry (vCPU thread only). KVM_GET_VCPU_EVENTS never shows
  // an injected software exception (KVM expects to see its instruction again), so TRAP needs this.
  bool breakpoint_injected = false;
};

class KvmBackend : public host::GuestBackend {
 public:
  static constexpr uint32_t kMaxVcpus = 64;
  // Opens /dev/kvm and creates the VM with `memory_bytes` of RAM (a multiple of 2 MiB) and
  // `vcpus` vCPUs. Returns nullptr and sets *error when KVM is missing or lacks a capability.
  static std::unique_ptr<KvmBackend> Create(uint64_t memory_bytes, uint32_t vcpus,
                                            std::string* error);
  ~KvmBackend() override;
  KvmBackend(const KvmBackend&) = delete;
  KvmBackend& operator=(const KvmBackend&) = delete;

  // ---- GuestBackend ----
  uint32_t VcpuCount() const override { return vcpu_count_.load(std::memory_order_acquire); }
  bool VcpuInitialized(uint16_t vcpu) const override;
  void GetRegs(uint16_t vcpu, kvm_regs* regs) override;
  void SetRegs(uint16_t vcpu, const kvm_regs& regs) override;
  void GetSregs(uint16_t vcpu, kvm_sregs* sregs) override;
  bool GetMsr(uint16_t vcpu, uint32_t index, uint64_t* value) override;
  std::optional<host::CpuidLeaf> GetCpuid(uint16_t vcpu, uint32_t function,
                                          uint32_t index) override;
  void GetXsave(uint16_t vcpu, std::vector<uint8_t>* region) override;
  uint64_t TscSpeedHz(uint16_t vcpu) override;
  uint8_t MtrrType(uint16_t vcpu, uint64_t gpa) override;
  bool IsGuestPhysical(uint64_t gpa) const override { return gpa < memory_bytes_; }
  bool ReadPhysical(uint64_t gpa, void* buf, size_t size) override;
  bool WritePhysical(uint64_t gpa, const void* buf, size_t size) override;
  int SetBreakpointInterception(uint16_t vcpu, bool enable) override;
  int SetDescriptorInterception(uint16_t vcpu, bool enable) override { return -KVM_EOPNOTSUPP; }
  void SetMsrWriteInterception(uint16_t vcpu, uint32_t msr, bool enable) override;
  void OnPageAccessChanged(uint64_t gfn, uint8_t access) override;
  void KickVcpu(uint16_t vcpu) override;
  void Crash() override;

  // ---- the VMM's side ----
  // Host address of guest RAM (the VMM loads the image and serves MMIO exits through it).
  uint8_t* memory() { return memory_; }
  uint64_t memory_bytes() const { return memory_bytes_; }
  KvmVcpu& vcpu(uint16_t index) { return *vcpus_[index]; }
  // KVM_CREATE_VCPU at run time (hot-add): the new vCPU's index, or -1 with *error set. It stays
  // uninitialised (commands refused) until its thread calls MarkRunning.
  int AddVcpu(std::string* error);
  // The vCPU's thread is about to enter the guest for the first time: it leaves
  // KVM_MP_STATE_UNINITIALIZED, so commands (and event replies) to it are accepted.
  void MarkRunning(uint16_t vcpu);
  // KVM_RUN with the bookkeeping kicks and memslot updates need. Call on the vCPU's thread.
  // Returns 0, or -errno (-EINTR: kicked).
  int Run(uint16_t vcpu);
  void SetSregs(uint16_t vcpu, const kvm_sregs& sregs);
  bool SetMsr(uint16_t vcpu, uint32_t index, uint64_t value);
  // KVM_SET_GUEST_DEBUG with the vCPU's breakpoint and single-step settings.
  int SetSingleStep(uint16_t vcpu, bool enable);
  // KVM_TRANSLATE on the vCPU (its current CR3): the GPA of gva, or false if unmapped.
  bool Translate(uint16_t vcpu, uint64_t gva, uint64_t* gpa);
  // KVM_SET_VCPU_EVENTS: an exception delivered at the next entry.
  bool InjectException(uint16_t vcpu, uint8_t vector, bool has_error, uint32_t error_code,
                       uint64_t cr2);
  // Drops an exception KVM has pending or injected for the next entry (KVM_SET_VCPU_EVENTS).
  bool ClearException(uint16_t vcpu);
  // The exception, NMI or interrupt KVM injects at the next entry (KVM_GET_VCPU_EVENTS), as the
  // TRAP event describes it; nullopt if none.
  std::optional<host::GuestInjection> PendingInjection(uint16_t vcpu);
  bool crashed() const { return crashed_.load(std::memory_order_acquire); }
  void set_on_crash(std::function<void()> on_crash) { on_crash_ = std::move(on_crash); }
  // Execute restrictions: a page without X gets no memslot, so that fetches from it stop the vCPU
  // (an emulation failure the VMM turns into a PF event). Off by default: KVM itself cannot read
  // a page without a slot either, so page tables, GDT, IDT or TSS restricted without X would
  // crash the guest (docs/KVM.md). Set before any restriction.
  void set_enforce_execute(bool enforce) { enforce_execute_ = enforce; }
  bool enforce_execute() const { return enforce_execute_; }
  // Memslots in use (tests: restrictions split RAM, restoring merges it back).
  size_t memslot_count() const;

 private:
  enum class SlotMode : uint8_t { kReadWrite, kReadOnly, kUnmapped };
  struct Slot {
    uint64_t end_gfn = 0;  // exclusive
    SlotMode mode = SlotMode::kReadWrite;
    int id = -1;  // KVM slot id; -1 for kUnmapped
  };

  KvmBackend() = default;
  bool Init(uint64_t memory_bytes, uint32_t vcpus, std::string* error);
  SlotMode ModeFor(uint8_t access) const;
  // Deletes the `removed` slots and creates the `added` runs (ids assigned here) with every vCPU
  // held outside KVM_RUN. `lock` holds slot_mu_; it is released while the vCPUs are kicked.
  void RewriteSlotsLocked(std::unique_lock<std::mutex>& lock,
                          const std::map<uint64_t, Slot>& removed, std::map<uint64_t, Slot> added);
  bool SetSlot(int id, uint64_t first_gfn, uint64_t end_gfn, SlotMode mode);
  void ApplyMsrFilter();  // msr_mu_ held
  int ApplyGuestDebug(uint16_t vcpu);

  UniqueFd kvm_fd_;
  UniqueFd vm_fd_;
  uint8_t* memory_ = nullptr;
  uint64_t memory_bytes_ = 0;
  // Fixed capacity so that vCPUs can be added while others run: entries below vcpu_count_ are
  // set before the count is published and never change.
  std::array<std::unique_ptr<KvmVcpu>, kMaxVcpus> vcpus_;
  std::atomic<uint32_t> vcpu_count_{0};
  std::mutex add_mu_;
  int run_size_ = 0;
  std::vector<kvm_cpuid_entry2> cpuid_;

  // Memslots: start gfn -> slot, covering all of RAM. Changed only with every vCPU outside
  // KVM_RUN: `slots_changing_` holds vCPUs back, `in_guest_` counts those inside.
  mutable std::mutex slot_mu_;
  std::condition_variable slot_cv_;
  std::map<uint64_t, Slot> slots_;
  std::vector<int> free_slot_ids_;
  bool slots_changing_ = false;
  uint32_t in_guest_ = 0;

  std::mutex msr_mu_;
  std::map<uint32_t, std::set<uint16_t>> msr_interceptors_;  // msr -> vCPUs that intercept it

  bool enforce_execute_ = false;
  std::atomic<bool> crashed_{false};
  std::function<void()> on_crash_;
};

}  // namespace kvmi::kvm

#endif  // KVMID_KERNEL_KVM_KVM_BACKEND_H_
