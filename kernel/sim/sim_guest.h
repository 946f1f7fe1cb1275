// A simulated x86-64 guest: vCPU register state (kvm_regs/kvm_sregs, MSRs, CPUID, XSAVE, XCR0),
// sparse guest-physical memory and MTRR types. It is the GuestBackend the KVMI engine runs on;
// the instructions that change this state live in sim_vm.h.
#ifndef KVMID_KERNEL_SIM_SIM_GUEST_H_
#define KVMID_KERNEL_SIM_SIM_GUEST_H_

#include <array>
#include <atomic>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <unordered_map>
#include <vector>

#include "kernel/host/guest_backend.h"
#include "kernel/host/vm_introspection.h"
#include "kernel/sim/page_tables.h"

namespace kvmi::sim {

// Where the simulated kernel lives: text at kTextGva maps to kTextGpa, the direct map at
// kDirectMapGva maps all guest RAM (gva = kDirectMapGva + gpa).
inline constexpr uint64_t kTextGva = 0xffffffff81000000ull;
inline constexpr uint64_t kTextGpa = 0x100000;  // 1 MiB
inline constexpr uint64_t kTextSize = 0x10000;  // 64 KiB of "code"
inline constexpr uint64_t kDirectMapGva = 0xffff888000000000ull;
inline constexpr uint64_t kMinMemoryBytes = 4ull << 20;

// A guest with real page tables (GuestConfig::paging): where they and the processes' pages live.
inline constexpr uint64_t kPageTableArea = 0x800000;  // 8 MiB: 1024 table pages
inline constexpr uint64_t kPageTableAreaEnd = 0xc00000;
inline constexpr uint64_t kProcessFrames = 0xc00000;  // 256 KiB of user pages per process
inline constexpr uint64_t kProcessFrameBytes = 0x40000;
inline constexpr uint32_t kMaxProcesses = 16;
inline constexpr uint64_t kMinPagedMemoryBytes = 16ull << 20;
// Virtual layout of such a guest. 64-bit modes: kernel text at kTextGva, the direct map at
// kDirectMapGva (one 1 GiB page), kVmallocGva (2 MiB pages, then a not-present page). 32-bit
// modes: text at kTextGva32, the direct map at kDirectMapGva32 (16 large pages). Every process:
// code (4 pages, read-only), data (8 pages, NX), a stack of 4 pages with a swapped-out page below
// it, a large heap page; in 64-bit modes also a read-only 1 GiB window at kUserWindowGva + p GiB.
// (RIP/RSP and the descriptor tables keep their 64-bit values in the 32-bit modes.)
inline constexpr uint64_t kVmallocGva = 0xffffc90000000000ull;
inline constexpr uint64_t kTextGva32 = 0xf0000000ull;
inline constexpr uint64_t kDirectMapGva32 = 0xc0000000ull;
inline constexpr uint64_t kUserCodeGva = 0x400000;
inline constexpr uint64_t kUserDataGva = 0x600000;
inline constexpr uint64_t kUserHeapGva = 0x40000000;
inline constexpr uint64_t kUserWindowGva = 0x7f0000000000ull;

struct PagingConfig {
  PagingMode mode = PagingMode::k4Level;
  uint32_t processes = 4;  // 1..kMaxProcesses address spaces; vCPU i starts in i % processes
};

// MSR indices the guest knows (GET_REGISTERS fails with -KVM_EINVAL for others).
inline constexpr uint32_t kMsrSysenterCs = 0x174;
inline constexpr uint32_t kMsrSysenterEsp = 0x175;
inline constexpr uint32_t kMsrSysenterEip = 0x176;
inline constexpr uint32_t kMsrPat = 0x277;
inline constexpr uint32_t kMsrEfer = 0xc0000080;
inline constexpr uint32_t kMsrStar = 0xc0000081;
inline constexpr uint32_t kMsrLstar = 0xc0000082;
inline constexpr uint32_t kMsrCstar = 0xc0000083;
inline constexpr uint32_t kMsrFmask = 0xc0000084;
inline constexpr uint32_t kMsrKernelGsBase = 0xc0000102;
inline constexpr uint32_t kMsrTscAux = 0xc0000103;

struct GuestConfig {
  uint32_t vcpus = 1;
  uint64_t memory_bytes = 256ull << 20;  // sparse: only written pages use host memory
  uint64_t tsc_hz = 2'500'000'000ull;    // 0 = host without TSC scaling
  bool spp_supported = true;
  bool descriptor_exiting_supported = true;
  uint64_t seed = 1;  // initial register values differ per VM/vCPU
  // Unset (the default): CR3 values are plain numbers with no tables behind them. Set: the guest
  // builds real page tables in its memory (page_tables.h: kernel half, one user half per process,
  // 4 KiB/large pages, a not-present page, NX data), its vCPUs run in that paging mode
  // (CR0/CR4/EFER) and its CR3 writes switch between the processes. Needs kMinPagedMemoryBytes.
  std::optional<PagingConfig> paging;
};

// An exception or interrupt the guest received (what tests inspect).
struct DeliveredException {
  uint32_t vector = 0;
  uint32_t type = 0;  // KVMI_TRAP_TYPE_*
  bool has_error = false;
  uint32_t error_code = 0;
  bool from_tool = false;  // INJECT_EXCEPTION, as opposed to the guest's own path
};

struct VcpuSnapshot {
  kvm_regs regs{};
  kvm_sregs sregs{};
  std::map<uint32_t, uint64_t> msrs;
  uint64_t xcr0 = 0;
  std::vector<DeliveredException> delivered;
  uint64_t gp_faults = 0;
  bool initialized = false;
};

class SimGuest : public host::GuestBackend {
 public:
  static constexpr uint32_t kMaxVcpus = 256;

  explicit SimGuest(const GuestConfig& config);
  ~SimGuest() override;

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
  uint64_t TscSpeedHz(uint16_t vcpu) override { return config_.tsc_hz; }
  uint8_t MtrrType(uint16_t vcpu, uint64_t gpa) override;
  bool IsGuestPhysical(uint64_t gpa) const override { return gpa < config_.memory_bytes; }
  bool ReadPhysical(uint64_t gpa, void* buf, size_t size) override;
  bool WritePhysical(uint64_t gpa, const void* buf, size_t size) override;
  int SetBreakpointInterception(uint16_t vcpu, bool enable) override { return 0; }
  int SetDescriptorInterception(uint16_t vcpu, bool enable) override;
  bool SppSupported() const override { return config_.spp_supported; }
  void Crash() override;

  // ---- simulator side ----
  // Adds a vCPU in the KVM_MP_STATE_UNINITIALIZED state; returns its index or -1 when full.
  int AddVcpu();
  void MarkInitialized(uint16_t vcpu);
  bool crashed() const { return crashed_.load(std::memory_order_acquire); }
  void set_on_crash(std::function<void()> on_crash) { on_crash_ = std::move(on_crash); }
  const GuestConfig& config() const { return config_; }

  // Register/MSR access for the instruction model (vCPU thread) and tests (any thread).
  void SetSregs(uint16_t vcpu, const kvm_sregs& sregs);
  void SetMsr(uint16_t vcpu, uint32_t index, uint64_t value);
  uint64_t xcr0(uint16_t vcpu) const;
  void set_xcr0(uint16_t vcpu, uint64_t value);
  void RecordDelivered(uint16_t vcpu, const DeliveredException& e);
  void CountGpFault(uint16_t vcpu);
  VcpuSnapshot Snapshot(uint16_t vcpu) const;
  // Bytes of guest RAM the simulator had to allocate (sparse memory).
  size_t resident_bytes() const;
  // With GuestConfig::paging: the tables' builder (its oracle: Expect) and the processes' CR3s;
  // null / empty otherwise. Built in the constructor, never changed afterwards.
  const PageTableBuilder* page_tables() const { return page_tables_.get(); }
  const std::vector<uint64_t>& process_roots() const { return process_roots_; }

 private:
  struct VcpuState {
    mutable std::mutex mu;
    kvm_regs regs{};
    kvm_sregs sregs{};
    std::map<uint32_t, uint64_t> msrs;
    uint64_t xcr0 = 0x7;
    std::vector<uint8_t> xsave;
    std::vector<DeliveredException> delivered;
    uint64_t gp_faults = 0;
    std::atomic<bool> initialized{false};
  };
  using Page = std::array<uint8_t, KVMI_PAGE_SIZE>;

  VcpuState& vcpu(uint16_t index) const { return *vcpus_[index]; }
  void InitVcpu(VcpuState* s, uint32_t index);
  // The layout described at GuestConfig::paging; aborts on a builder error (a bug).
  void BuildPageTables(const PagingConfig& paging);

  const GuestConfig config_;
  // Fixed capacity, so the receive thread can index it while a vCPU is hot-added.
  std::unique_ptr<VcpuState> vcpus_[kMaxVcpus];
  std::atomic<uint32_t> vcpu_count_{0};
  std::mutex add_mu_;
  std::map<std::pair<uint32_t, uint32_t>, host::CpuidLeaf> cpuid_;

  mutable std::mutex memory_mu_;
  std::unordered_map<uint64_t, std::unique_ptr<Page>> pages_;  // gfn -> page; absent = zeros

  std::unique_ptr<PageTableBuilder> page_tables_;
  std::vector<uint64_t> process_roots_;

  std::atomic<bool> crashed_{false};
  std::function<void()> on_crash_;
};

}  // namespace kvmi::sim

#endif  // KVMID_KERNEL_SIM_SIM_GUEST_H_
