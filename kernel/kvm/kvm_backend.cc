#include "kernel/kvm/kvm_backend.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "kernel/kvm/kvm_ioctl.h"
#include "spdlog/spdlog.h"

namespace kvmi::kvm {
namespace {

constexpr uint64_t kPageShift = 12;
constexpr uint32_t kMaxCpuidEntries = 256;
// Where Intel's KVM wants its three private pages (below 4 GiB, outside guest RAM).
constexpr uint64_t kTssAddress = 0xfffbd000;
// The signal that forces a vCPU thread out of KVM_RUN; its handler does nothing.
constexpr int kKickSignal = SIGUSR1;

void IgnoreKick(int) {}

std::string Errno(const char* what) { return std::string(what) + ": " + std::strerror(errno); }

// The supported CPUID table as one vCPU sees it: its APIC id in leaves 1 and 0xb.
void SetApicId(uint32_t function, uint32_t vcpu, uint32_t* ebx, uint32_t* edx) {
  if (function == 1) *ebx = (*ebx & 0x00ffffff) | (vcpu << 24);
  if (function == 0xb) *edx = vcpu;
}

}  // namespace

std::unique_ptr<KvmBackend> KvmBackend::Create(uint64_t memory_bytes, uint32_t vcpus,
                                               std::string* error) {
  std::unique_ptr<KvmBackend> backend(new KvmBackend());
  if (!backend->Init(memory_bytes, vcpus, error)) return nullptr;
  return backend;
}

bool KvmBackend::Init(uint64_t memory_bytes, uint32_t vcpus, std::string* error) {
  if (memory_bytes == 0 || memory_bytes % (2u << 20) != 0 || memory_bytes > (uint64_t{1} << 32)) {
    *error = "guest memory must be a multiple of 2 MiB, at most 4 GiB";
    return false;
  }
  if (vcpus == 0 || vcpus > kMaxVcpus) {
    *error = "1.." + std::to_string(kMaxVcpus) + " vCPUs";
    return false;
  }
  kvm_fd_ = UniqueFd(::open("/dev/kvm", O_RDWR | O_CLOEXEC));
  if (!kvm_fd_) {
    *error = Errno("open /dev/kvm");
    return false;
  }
  if (ioctl(kvm_fd_.get(), KVM_GET_API_VERSION, 0) != KVM_API_VERSION) {
    *error = "KVM API version is not 12";
    return false;
  }
  const std::pair<int, const char*> required[] = {
      {KVM_CAP_READONLY_MEM, "KVM_CAP_READONLY_MEM"},
      {KVM_CAP_X86_USER_SPACE_MSR, "KVM_CAP_X86_USER_SPACE_MSR"},
      {KVM_CAP_X86_MSR_FILTER, "KVM_CAP_X86_MSR_FILTER"},
      {KVM_CAP_SET_GUEST_DEBUG, "KVM_CAP_SET_GUEST_DEBUG"},
      {KVM_CAP_IMMEDIATE_EXIT, "KVM_CAP_IMMEDIATE_EXIT"},
      {KVM_CAP_XSAVE, "KVM_CAP_XSAVE"},
  };
  for (const auto& [cap, name] : required) {
    if (ioctl(kvm_fd_.get(), KVM_CHECK_EXTENSION, cap) <= 0) {
      *error = std::string("KVM lacks ") + name;
      return false;
    }
  }
  vm_fd_ = UniqueFd(ioctl(kvm_fd_.get(), KVM_CREATE_VM, 0));
  if (!vm_fd_) {
    *error = Errno("KVM_CREATE_VM");
    return false;
  }
  if (ioctl(vm_fd_.get(), KVM_SET_TSS_ADDR, kTssAddress) < 0) {
    *error = Errno("KVM_SET_TSS_ADDR");
    return false;
  }
  kvm_enable_cap msr_exits{};
  msr_exits.cap = KVM_CAP_X86_USER_SPACE_MSR;
  msr_exits.args[0] = KVM_MSR_EXIT_REASON_FILTER;
  if (ioctl(vm_fd_.get(), KVM_ENABLE_CAP, &msr_exits) < 0) {
    *error = Errno("KVM_ENABLE_CAP(KVM_CAP_X86_USER_SPACE_MSR)");
    return false;
  }
  void* memory = mmap(nullptr, memory_bytes, PROT_READ | PROT_WRITE,
                      MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (memory == MAP_FAILED) {
    *error = Errno("mmap guest memory");
    return false;
  }
  memory_ = static_cast<uint8_t*>(memory);
  memory_bytes_ = memory_bytes;
  int slots = ioctl(kvm_fd_.get(), KVM_CHECK_EXTENSION, KVM_CAP_NR_MEMSLOTS);
  if (slots < 3) slots = 32;
  for (int id = slots - 1; id >= 1; --id) free_slot_ids_.push_back(id);
  slots_[0] = Slot{memory_bytes >> kPageShift, SlotMode::kReadWrite, 0};
  if (!SetSlot(0, 0, memory_bytes >> kPageShift, SlotMode::kReadWrite)) {
    *error = Errno("KVM_SET_USER_MEMORY_REGION");
    return false;
  }

  cpuid_.resize(kMaxCpuidEntries);
  int entries = kvmid_get_supported_cpuid(kvm_fd_.get(), cpuid_.data(), kMaxCpuidEntries);
  if (entries < 0) {
    *error = Errno("KVM_GET_SUPPORTED_CPUID");
    return false;
  }
  cpuid_.resize(static_cast<size_t>(entries));

  run_size_ = ioctl(kvm_fd_.get(), KVM_GET_VCPU_MMAP_SIZE, 0);
  if (run_size_ <= 0) {
    *error = Errno("KVM_GET_VCPU_MMAP_SIZE");
    return false;
  }
  struct sigaction action {};
  action.sa_handler = IgnoreKick;  // no SA_RESTART: KVM_RUN returns -EINTR
  sigemptyset(&action.sa_mask);
  sigaction(kKickSignal, &action, nullptr);
  for (uint32_t i = 0; i < vcpus; ++i) {
    if (AddVcpu(error) < 0) return false;
  }
  return true;
}

int KvmBackend::AddVcpu(std::string* error) {
  std::lock_guard<std::mutex> lock(add_mu_);
  const uint32_t index = vcpu_count_.load(std::memory_order_relaxed);
  if (index >= kMaxVcpus) {
    *error = "at most " + std::to_string(kMaxVcpus) + " vCPUs";
    return -1;
  }
  auto v = std::make_unique<KvmVcpu>();
  v->fd = UniqueFd(ioctl(vm_fd_.get(), KVM_CREATE_VCPU, index));
  if (!v->fd) {
    *error = Errno("KVM_CREATE_VCPU");
    return -1;
  }
  void* run = mmap(nullptr, static_cast<size_t>(run_size_), PROT_READ | PROT_WRITE, MAP_SHARED,
                   v->fd.get(), 0);
  if (run == MAP_FAILED) {
    *error = Errno("mmap kvm_run");
    return -1;
  }
  v->run = static_cast<kvm_run*>(run);
  v->run_size = static_cast<size_t>(run_size_);
  std::vector<kvm_cpuid_entry2> cpuid = cpuid_;
  for (kvm_cpuid_entry2& e : cpuid) SetApicId(e.function, index, &e.ebx, &e.edx);
  if (kvmid_set_cpuid(v->fd.get(), cpuid.data(), static_cast<uint32_t>(cpuid.size())) < 0) {
    *error = Errno("KVM_SET_CPUID2");
    munmap(v->run, v->run_size);
    return -1;
  }
  vcpus_[index] = std::move(v);
  vcpu_count_.store(index + 1, std::memory_order_release);
  return static_cast<int>(index);
}

KvmBackend::~KvmBackend() {
  for (auto& v : vcpus_) {
    if (v && v->run) munmap(v->run, v->run_size);
    v.reset();
  }
  vm_fd_.Reset();
  if (memory_) munmap(memory_, memory_bytes_);
}

bool KvmBackend::VcpuInitialized(uint16_t vcpu) const {
  return vcpu < VcpuCount() && vcpus_[vcpu]->initialized.load(std::memory_order_acquire);
}

void KvmBackend::GetRegs(uint16_t vcpu, kvm_regs* regs) {
  if (ioctl(vcpus_[vcpu]->fd.get(), KVM_GET_REGS, regs) < 0) std::memset(regs, 0, sizeof(*regs));
}

void KvmBackend::SetRegs(uint16_t vcpu, const kvm_regs& regs) {
  if (ioctl(vcpus_[vcpu]->fd.get(), KVM_SET_REGS, &regs) < 0) {
    spdlog::error("vcpu {}: KVM_SET_REGS: {}", vcpu, std::strerror(errno));
  }
}

void KvmBackend::GetSregs(uint16_t vcpu, kvm_sregs* sregs) {
  if (ioctl(vcpus_[vcpu]->fd.get(), KVM_GET_SREGS, sregs) < 0) {
    std::memset(sregs, 0, sizeof(*sregs));
  }
}

void KvmBackend::SetSregs(uint16_t vcpu, const kvm_sregs& sregs) {
  if (ioctl(vcpus_[vcpu]->fd.get(), KVM_SET_SREGS, &sregs) < 0) {
    spdlog::error("vcpu {}: KVM_SET_SREGS: {}", vcpu, std::strerror(errno));
  }
}

bool KvmBackend::GetMsr(uint16_t vcpu, uint32_t index, uint64_t* value) {
  return kvmid_get_msr(vcpus_[vcpu]->fd.get(), index, value) == 1;
}

bool KvmBackend::SetMsr(uint16_t vcpu, uint32_t index, uint64_t value) {
  return kvmid_set_msr(vcpus_[vcpu]->fd.get(), index, value) == 1;
}

std::optional<host::CpuidLeaf> KvmBackend::GetCpuid(uint16_t vcpu, uint32_t function,
                                                    uint32_t index) {
  // The table given to KVM_SET_CPUID2 (KVM_GET_CPUID2 would return the same).
  for (const kvm_cpuid_entry2& e : cpuid_) {
    bool indexed = (e.flags & KVM_CPUID_FLAG_SIGNIFCANT_INDEX) != 0;
    if (e.function != function || (indexed && e.index != index)) continue;
    host::CpuidLeaf leaf{e.eax, e.ebx, e.ecx, e.edx};
    SetApicId(function, vcpu, &leaf.ebx, &leaf.edx);
    return leaf;
  }
  return std::nullopt;
}

void KvmBackend::GetXsave(uint16_t vcpu, std::vector<uint8_t>* region) {
  region->assign(4096, 0);
  if (kvmid_get_xsave(vcpus_[vcpu]->fd.get(), region->data()) < 0) {
    spdlog::error("vcpu {}: KVM_GET_XSAVE: {}", vcpu, std::strerror(errno));
  }
}

uint64_t KvmBackend::TscSpeedHz(uint16_t vcpu) {
  int khz = ioctl(vcpus_[vcpu]->fd.get(), KVM_GET_TSC_KHZ, 0);
  return khz > 0 ? uint64_t(khz) * 1000 : 0;
}

uint8_t KvmBackend::MtrrType(uint16_t vcpu, uint64_t gpa) {
  // The guest programs no MTRRs (MTRRdefType reads 0: MTRRs off), so every access is UC as far
  // as the guest's MTRRs go; with MTRRs enabled, the default type applies.
  uint64_t def_type = 0;
  if (!GetMsr(vcpu, 0x2ff, &def_type) || (def_type & (1u << 11)) == 0) return 0;  // UC
  return static_cast<uint8_t>(def_type & 0xff);
}

bool KvmBackend::ReadPhysical(uint64_t gpa, void* buf, size_t size) {
  if (gpa >= memory_bytes_ || (gpa & 0xfff) + size > 4096) return false;
  if (size) std::memcpy(buf, memory_ + gpa, size);
  return true;
}

bool KvmBackend::WritePhysical(uint64_t gpa, const void* buf, size_t size) {
  // The VMM's mapping is writable even where the guest's slot is read-only: the introspector
  // writes past its own restrictions, as KVMI's kvm_write_guest does past EPT permissions.
  if (gpa >= memory_bytes_ || (gpa & 0xfff) + size > 4096) return false;
  if (size) std::memcpy(memory_ + gpa, buf, size);
  return true;
}

// ---- guest debug
// ----------------------------------------------------------------------------------

int KvmBackend::ApplyGuestDebug(uint16_t vcpu) {
  KvmVcpu& v = *vcpus_[vcpu];
  kvm_guest_debug debug{};
  if (v.sw_breakpoints || v.single_step) debug.control = KVM_GUESTDBG_ENABLE;
  if (v.sw_breakpoints) debug.control |= KVM_GUESTDBG_USE_SW_BP;
  if (v.single_step) debug.control |= KVM_GUESTDBG_SINGLESTEP;
  return ioctl(v.fd.get(), KVM_SET_GUEST_DEBUG, &debug) < 0 ? -errno : 0;
}

int KvmBackend::SetBreakpointInterception(uint16_t vcpu, bool enable) {
  vcpus_[vcpu]->sw_breakpoints = enable;
  return ApplyGuestDebug(vcpu) < 0 ? -KVM_EOPNOTSUPP : 0;
}

int KvmBackend::SetSingleStep(uint16_t vcpu, bool enable) {
  vcpus_[vcpu]->single_step = enable;
  return ApplyGuestDebug(vcpu);
}

bool KvmBackend::Translate(uint16_t vcpu, uint64_t gva, uint64_t* gpa) {
  kvm_translation t{};
  t.linear_address = gva;
  if (ioctl(vcpus_[vcpu]->fd.get(), KVM_TRANSLATE, &t) < 0 || !t.valid) return false;
  *gpa = t.physical_address;
  return true;
}

bool KvmBackend::InjectException(uint16_t vcpu, uint8_t vector, bool has_error, uint32_t error_code,
                                 uint64_t cr2) {
  if (vector == 14) {
    kvm_sregs sregs;
    GetSregs(vcpu, &sregs);
    sregs.cr2 = cr2;
    SetSregs(vcpu, sregs);
  }
  kvm_vcpu_events events{};
  if (ioctl(vcpus_[vcpu]->fd.get(), KVM_GET_VCPU_EVENTS, &events) < 0) return false;
  events.exception.injected = 1;
  events.exception.nr = vector;
  events.exception.has_error_code = has_error ? 1 : 0;
  events.exception.error_code = error_code;
  events.flags = 0;
  return ioctl(vcpus_[vcpu]->fd.get(), KVM_SET_VCPU_EVENTS, &events) == 0;
}

bool KvmBackend::ClearException(uint16_t vcpu) {
  kvm_vcpu_events events{};
  if (ioctl(vcpus_[vcpu]->fd.get(), KVM_GET_VCPU_EVENTS, &events) < 0) return false;
  if (!events.exception.injected && !events.exception.pending) return true;
  events.exception = {};
  events.flags = 0;
  return ioctl(vcpus_[vcpu]->fd.get(), KVM_SET_VCPU_EVENTS, &events) == 0;
}

std::optional<host::GuestInjection> KvmBackend::PendingInjection(uint16_t vcpu) {
  kvm_vcpu_events events{};
  if (ioctl(vcpus_[vcpu]->fd.get(), KVM_GET_VCPU_EVENTS, &events) < 0) return std::nullopt;
  host::GuestInjection injection;
  if (events.exception.injected || events.exception.pending) {
    injection.vector = events.exception.nr;
    // #BP and #OF come from INT3 / INTO: software exceptions, as VMX and KVMI classify them.
    injection.type = injection.vector == 3 || injection.vector == 4 ? KVMI_TRAP_TYPE_SOFT_EXCEPTION
                                                                    : KVMI_TRAP_TYPE_HARD_EXCEPTION;
    if (events.exception.has_error_code) injection.error_code = events.exception.error_code;
    if (injection.vector == 14) {
      kvm_sregs sregs;
      GetSregs(vcpu, &sregs);
      injection.cr2 = sregs.cr2;
    }
    return injection;
  }
  if (events.nmi.injected) {
    injection.vector = 2;
    injection.type = KVMI_TRAP_TYPE_NMI;
    return injection;
  }
  if (events.interrupt.injected) {
    injection.vector = events.interrupt.nr;
    injection.type = events.interrupt.soft ? KVMI_TRAP_TYPE_SOFT_INTR : KVMI_TRAP_TYPE_EXT_INTR;
    return injection;
  }
  return std::nullopt;
}

// ---- MSR writes
// -----------------------------------------------------------------------------------

void KvmBackend::SetMsrWriteInterception(uint16_t vcpu, uint32_t msr, bool enable) {
  std::lock_guard<std::mutex> lock(msr_mu_);
  // The filter is per VM: an MSR is filtered while any vCPU intercepts it; the exit handler asks
  // the engine, which knows which vCPUs did.
  auto& vcpus = msr_interceptors_[msr];
  if (enable) {
    vcpus.insert(vcpu);
  } else {
    vcpus.erase(vcpu);
    if (vcpus.empty()) msr_interceptors_.erase(msr);
  }
  ApplyMsrFilter();
}

void KvmBackend::ApplyMsrFilter() {
  std::vector<uint32_t> msrs;
  for (const auto& entry : msr_interceptors_) msrs.push_back(entry.first);
  if (msrs.size() > KVM_MSR_FILTER_MAX_RANGES) {
    spdlog::warn("only {} MSRs can be intercepted; the rest are not", KVM_MSR_FILTER_MAX_RANGES);
    msrs.resize(KVM_MSR_FILTER_MAX_RANGES);
  }
  spdlog::debug("MSR write filter: {} MSRs", msrs.size());
  if (kvmid_set_msr_write_filter(vm_fd_.get(), msrs.data(), static_cast<uint32_t>(msrs.size())) <
      0) {
    spdlog::error("KVM_X86_SET_MSR_FILTER: {}", std::strerror(errno));
  }
}

// ---- page access: memslots
// ------------------------------------------------------------------------

KvmBackend::SlotMode KvmBackend::ModeFor(uint8_t access) const {
  // Without execute enforcement, X is ignored: an instruction fetch from a page without a slot
  // is an emulation failure, which only the VMM's fetch handling turns into a PF event.
  if ((access & KVMI_PAGE_ACCESS_R) == 0) return SlotMode::kUnmapped;
  if (enforce_execute_ && (access & KVMI_PAGE_ACCESS_X) == 0) return SlotMode::kUnmapped;
  if ((access & KVMI_PAGE_ACCESS_W) == 0) return SlotMode::kReadOnly;
  return SlotMode::kReadWrite;
}

bool KvmBackend::SetSlot(int id, uint64_t first_gfn, uint64_t end_gfn, SlotMode mode) {
  kvm_userspace_memory_region region{};
  region.slot = static_cast<uint32_t>(id);
  region.flags = mode == SlotMode::kReadOnly ? KVM_MEM_READONLY : 0;
  region.guest_phys_addr = first_gfn << kPageShift;
  region.memory_size = (end_gfn - first_gfn) << kPageShift;  // 0 deletes the slot
  region.userspace_addr = reinterpret_cast<uint64_t>(memory_ + (first_gfn << kPageShift));
  return ioctl(vm_fd_.get(), KVM_SET_USER_MEMORY_REGION, &region) == 0;
}

void KvmBackend::OnPageAccessChanged(uint64_t gfn, uint8_t access) {
  if ((gfn << kPageShift) >= memory_bytes_) return;
  std::unique_lock<std::mutex> lock(slot_mu_);
  SlotMode mode = ModeFor(access);
  // The run containing gfn and its neighbours are rebuilt: [gfn] gets `mode`, and runs of the
  // same mode merge, so protecting a contiguous range costs few slots.
  auto it = std::prev(slots_.upper_bound(gfn));
  if (it->second.mode == mode) return;
  uint64_t first = it->first, end = it->second.end_gfn;
  std::map<uint64_t, Slot> removed, added;
  removed.insert(*it);
  uint64_t new_first = gfn, new_end = gfn + 1;
  if (first < gfn) added[first] = Slot{gfn, it->second.mode, -1};
  if (gfn + 1 < end) added[gfn + 1] = Slot{end, it->second.mode, -1};
  if (first == gfn && it != slots_.begin()) {
    auto left = std::prev(it);
    if (left->second.mode == mode) {
      removed.insert(*left);
      new_first = left->first;
    }
  }
  if (gfn + 1 == end) {
    auto right = std::next(it);
    if (right != slots_.end() && right->second.mode == mode) {
      removed.insert(*right);
      new_end = right->second.end_gfn;
    }
  }
  added[new_first] = Slot{new_end, mode, -1};

  RewriteSlotsLocked(lock, removed, added);
}

// `added` is a copy on purpose: its slots get their ids and modes below (clang-tidy 14 says
// otherwise).
void KvmBackend::RewriteSlotsLocked(
    std::unique_lock<std::mutex>& lock, const std::map<uint64_t, Slot>& removed,
    std::map<uint64_t, Slot> added) {  // NOLINT(performance-unnecessary-value-param)
  // Every vCPU out of KVM_RUN while slots come and go: a vCPU fetching instructions from a range
  // that is momentarily without a slot would stop with an emulation failure.
  slots_changing_ = true;
  lock.unlock();
  for (uint32_t i = 0; i < VcpuCount(); ++i) KickVcpu(static_cast<uint16_t>(i));
  lock.lock();
  slot_cv_.wait(lock, [&] {
    if (in_guest_ == 0) return true;
    // A vCPU that entered before seeing the flag may have missed the kick.
    for (uint32_t i = 0; i < VcpuCount(); ++i) KickVcpu(static_cast<uint16_t>(i));
    return false;
  });
  for (const auto& [start, slot] : removed) {
    slots_.erase(start);
    if (slot.id >= 0) {
      SetSlot(slot.id, start, start, slot.mode);
      free_slot_ids_.push_back(slot.id);
    }
  }
  for (auto& [start, slot] : added) {
    if (slot.mode != SlotMode::kUnmapped) {
      if (free_slot_ids_.empty()) {
        // No slot left: the range stays without one, so its accesses still reach the VMM as MMIO
        // exits and are checked there (instruction fetches from it would fail).
        spdlog::error("out of KVM memslots at {:#x}", start << kPageShift);
        slot.mode = SlotMode::kUnmapped;
        slots_[start] = slot;
        continue;
      }
      slot.id = free_slot_ids_.back();
      free_slot_ids_.pop_back();
      if (!SetSlot(slot.id, start, slot.end_gfn, slot.mode)) {
        spdlog::error("KVM_SET_USER_MEMORY_REGION {:#x}+{:#x}: {}", start << kPageShift,
                      (slot.end_gfn - start) << kPageShift, std::strerror(errno));
      }
    }
    slots_[start] = slot;
  }
  slots_changing_ = false;
  slot_cv_.notify_all();
}

size_t KvmBackend::memslot_count() const {
  std::lock_guard<std::mutex> lock(slot_mu_);
  size_t n = 0;
  for (const auto& entry : slots_) n += entry.second.id >= 0 ? 1 : 0;
  return n;
}

// ---- running
// ----------------------------------------------------------------------------------------

void KvmBackend::KickVcpu(uint16_t vcpu) {
  if (vcpu >= VcpuCount()) return;
  KvmVcpu& v = *vcpus_[vcpu];
  // immediate_exit makes the next KVM_RUN return at once; the signal interrupts a running one.
  __atomic_store_n(&v.run->immediate_exit, 1, __ATOMIC_SEQ_CST);
  if (v.has_thread.load(std::memory_order_acquire)) pthread_kill(v.thread.load(), kKickSignal);
}

void KvmBackend::MarkRunning(uint16_t vcpu) {
  vcpus_[vcpu]->initialized.store(true, std::memory_order_release);
}

int KvmBackend::Run(uint16_t vcpu) {
  KvmVcpu& v = *vcpus_[vcpu];
  if (!v.has_thread.load(std::memory_order_relaxed)) {
    v.thread.store(pthread_self());
    v.has_thread.store(true, std::memory_order_release);
  }
  {
    std::unique_lock<std::mutex> lock(slot_mu_);
    slot_cv_.wait(lock, [&] { return !slots_changing_; });
    ++in_guest_;
  }
  int rc = ioctl(v.fd.get(), KVM_RUN, 0);
  int saved_errno = errno;
  // Cleared before the caller runs its jobs: a kick after this point is for the next entry.
  __atomic_store_n(&v.run->immediate_exit, 0, __ATOMIC_SEQ_CST);
  {
    std::lock_guard<std::mutex> lock(slot_mu_);
    --in_guest_;
    slot_cv_.notify_all();
  }
  return rc < 0 ? -saved_errno : 0;
}

void KvmBackend::Crash() {
  if (crashed_.exchange(true)) return;
  if (on_crash_) on_crash_();
}

}  // namespace kvmi::kvm
