#include "kernel/sim/sim_guest.h"

#include <cstdio>
#include <cstdlib>
#include <cstring>

namespace kvmi::sim {

using host::FlatSegment;

SimGuest::SimGuest(const GuestConfig& config) : config_(config) {
  // A plausible Intel CPUID table: leaf 0 (vendor), 1 (features), 7, 0xd (XSAVE), 0x80000000+.
  cpuid_[{0, 0}] = {0xd, 0x756e6547, 0x6c65746e, 0x49656e69};  // "GenuineIntel"
  cpuid_[{1, 0}] = {0x000906ea, 0x00000800, 0xfeda3203, 0x178bfbff};
  cpuid_[{7, 0}] = {0, 0x029c6fbf, 0x00000000, 0xbc000400};
  cpuid_[{0xd, 0}] = {0x7, 0x340, 0x340, 0};
  cpuid_[{0xd, 1}] = {0xf, 0x340, 0, 0};
  cpuid_[{0x80000000, 0}] = {0x80000008, 0, 0, 0};
  cpuid_[{0x80000001, 0}] = {0, 0, 0x121, 0x2c100800};
  cpuid_[{0x80000008, 0}] = {0x3027, 0, 0, 0};
  if (config_.paging) BuildPageTables(*config_.paging);
  for (uint32_t i = 0; i < config_.vcpus && i < kMaxVcpus; ++i) {
    int index = AddVcpu();
    MarkInitialized(static_cast<uint16_t>(index));
  }
}

SimGuest::~SimGuest() = default;

void SimGuest::InitVcpu(VcpuState* s, uint32_t index) {
  uint64_t salt = config_.seed * 0x9e3779b97f4a7c15ull + index;
  kvm_regs& r = s->regs;
  r.rax = 0x1000 + index;
  r.rbx = salt & 0xffff;
  r.rcx = 0xc0000082;
  r.rsp = kDirectMapGva + 0x300000 + index * 0x4000;
  r.rip = kTextGva + (index * 0x100) % kTextSize;
  r.rflags = 0x202;
  kvm_sregs& sr = s->sregs;
  sr.cs = FlatSegment(0x10, 0xb, true);
  sr.ds = sr.es = sr.fs = sr.gs = sr.ss = FlatSegment(0x18, 0x3, false);
  sr.gs.base = 0xffff88807fc00000ull + index * 0x40000;
  sr.tr = FlatSegment(0x40, 0xb, false);
  sr.tr.s = 0;
  sr.ldt = FlatSegment(0, 0x2, false);
  sr.ldt.s = 0;
  sr.ldt.unusable = 1;
  sr.gdt.base = 0xfffffe0000001000ull + index * 0x10000;
  sr.gdt.limit = 0x7f;
  sr.idt.base = 0xfffffe0000000000ull;
  sr.idt.limit = 0xfff;
  sr.cr0 = 0x80050033;  // PG | AM | WP | NE | ET | MP | PE
  sr.cr3 = 0x1000000 + ((salt % 16) << 12);
  sr.cr4 = 0x3706f0;
  sr.efer = 0xd01;  // SCE | LME | LMA | NXE
  if (config_.paging) {
    PagingRegisters paging =
        RegistersFor(config_.paging->mode, PagingRegisters{sr.cr0, sr.cr4, sr.efer});
    sr.cr0 = paging.cr0;
    sr.cr4 = paging.cr4;
    sr.efer = paging.efer;
    sr.cr3 = process_roots_[index % process_roots_.size()];
  }
  sr.apic_base = 0xfee00900 | (index == 0 ? 0x100 : 0);
  s->msrs = {
      {kMsrSysenterCs, 0x10},
      {kMsrSysenterEsp, kDirectMapGva + 0x400000 + index * 0x1000},
      {kMsrSysenterEip, kTextGva + 0x1600},
      {kMsrPat, 0x0007040600070406ull},
      {kMsrEfer, sr.efer},
      {kMsrStar, 0x0023001000000000ull},
      {kMsrLstar, kTextGva + 0x1000},
      {kMsrCstar, kTextGva + 0x1400},
      {kMsrFmask, 0x47700},
      {kMsrKernelGsBase, 0},
      {kMsrTscAux, index},
  };
  s->xcr0 = 0x7;
  s->xsave.assign(KVMI_XSAVE_SIZE, 0);
  // Legacy area: FCW 0x37f, MXCSR 0x1f80; a distinctive XMM0 so tests can recognise the vCPU.
  uint16_t fcw = 0x37f;
  uint32_t mxcsr = 0x1f80;
  std::memcpy(&s->xsave[0], &fcw, sizeof(fcw));
  std::memcpy(&s->xsave[24], &mxcsr, sizeof(mxcsr));
  uint64_t xmm0 = 0x584d4d3000000000ull | index;
  std::memcpy(&s->xsave[160], &xmm0, sizeof(xmm0));
  std::memcpy(&s->xsave[512], &s->xcr0, sizeof(s->xcr0));  // XSTATE_BV
}

void SimGuest::BuildPageTables(const PagingConfig& paging) {
  auto die = [&](const std::string& why) {
    std::fprintf(stderr, "kvmi-sim: cannot build %s page tables: %s\n", PagingModeName(paging.mode),
                 why.c_str());
    std::abort();
  };
  if (config_.memory_bytes < kMinPagedMemoryBytes) die("guest RAM below 16 MiB");
  if (paging.processes == 0 || paging.processes > kMaxProcesses) die("1..16 processes");
  page_tables_ = std::make_unique<PageTableBuilder>(
      paging.mode,
      [this](uint64_t gpa, const void* data, size_t size) {
        return WritePhysical(gpa, data, size);
      },
      kPageTableArea, kPageTableAreaEnd);
  PageTableBuilder& b = *page_tables_;
  const bool wide = paging.mode == PagingMode::k4Level || paging.mode == PagingMode::k5Level;
  const uint64_t big = PageSizes(paging.mode)[1];  // 2 MiB, or 4 MiB in 32-bit paging
  MapOptions text{/*writable=*/false, /*user=*/false, /*executable=*/true};
  MapOptions data{/*writable=*/true, /*user=*/false, /*executable=*/false};
  bool ok = true;
  // The kernel half, shared by every process.
  if (wide) {
    ok &= b.Map(0, kTextGva, kTextGpa, kTextSize, k4KiB, text);
    ok &= b.Map(0, kDirectMapGva, 0, k1GiB, k1GiB, data);  // all of RAM (and beyond)
    ok &= b.Map(0, kVmallocGva, 2 * k2MiB, 2 * k2MiB, k2MiB, data);
    ok &= b.MapNotPresent(0, kVmallocGva + 2 * k2MiB, 0x1234);
  } else {
    ok &= b.Map(0, kTextGva32, kTextGpa, kTextSize, k4KiB, text);
    ok &= b.Map(0, kDirectMapGva32, 0, 16 * big, big, data);
    ok &= b.MapNotPresent(0, kTextGva32 + kTextSize, 0x1234);
  }
  // One user half per process: code, data, stack (and a swapped-out page below it), a large
  // shared heap page, and in 64-bit modes a read-only 1 GiB window onto RAM.
  MapOptions user_code{false, true, true};
  MapOptions user_data{true, true, false};
  MapOptions user_ro{false, true, false};
  const uint64_t stack = wide ? 0x7ffffffde000ull : 0xbffdc000ull;
  for (uint32_t p = 0; p < paging.processes && ok; ++p) {
    uint64_t cr3 = b.NewProcess();
    if (cr3 == 0) break;
    uint64_t frames = kProcessFrames + p * kProcessFrameBytes;
    ok &= b.Map(cr3, kUserCodeGva, frames, 4 * k4KiB, k4KiB, user_code);
    ok &= b.Map(cr3, kUserDataGva, frames + 0x10000, 8 * k4KiB, k4KiB, user_data);
    ok &= b.Map(cr3, stack, frames + 0x20000, 4 * k4KiB, k4KiB, user_data);
    ok &= b.MapNotPresent(cr3, stack - k4KiB, 0x5000 + p);
    ok &= b.Map(cr3, kUserHeapGva, 2 * big, big, big, user_data);
    if (wide) ok &= b.Map(cr3, kUserWindowGva + p * k1GiB, 0, k1GiB, k1GiB, user_ro);
    process_roots_.push_back(cr3);
  }
  if (!ok || process_roots_.size() != paging.processes) die(b.error());
}

int SimGuest::AddVcpu() {
  std::lock_guard<std::mutex> lock(add_mu_);
  uint32_t index = vcpu_count_.load(std::memory_order_relaxed);
  if (index >= kMaxVcpus) return -1;
  auto state = std::make_unique<VcpuState>();
  InitVcpu(state.get(), index);
  vcpus_[index] = std::move(state);
  vcpu_count_.store(index + 1, std::memory_order_release);
  return static_cast<int>(index);
}

void SimGuest::MarkInitialized(uint16_t index) {
  vcpu(index).initialized.store(true, std::memory_order_release);
}

bool SimGuest::VcpuInitialized(uint16_t index) const {
  return index < VcpuCount() && vcpu(index).initialized.load(std::memory_order_acquire);
}

void SimGuest::GetRegs(uint16_t index, kvm_regs* regs) {
  std::lock_guard<std::mutex> lock(vcpu(index).mu);
  *regs = vcpu(index).regs;
}

void SimGuest::SetRegs(uint16_t index, const kvm_regs& regs) {
  std::lock_guard<std::mutex> lock(vcpu(index).mu);
  vcpu(index).regs = regs;
}

void SimGuest::GetSregs(uint16_t index, kvm_sregs* sregs) {
  std::lock_guard<std::mutex> lock(vcpu(index).mu);
  *sregs = vcpu(index).sregs;
}

void SimGuest::SetSregs(uint16_t index, const kvm_sregs& sregs) {
  std::lock_guard<std::mutex> lock(vcpu(index).mu);
  vcpu(index).sregs = sregs;
}

bool SimGuest::GetMsr(uint16_t index, uint32_t msr, uint64_t* value) {
  std::lock_guard<std::mutex> lock(vcpu(index).mu);
  const VcpuState& s = vcpu(index);
  if (msr == kMsrEfer) {
    *value = s.sregs.efer;
    return true;
  }
  auto it = s.msrs.find(msr);
  if (it == s.msrs.end()) return false;
  *value = it->second;
  return true;
}

void SimGuest::SetMsr(uint16_t index, uint32_t msr, uint64_t value) {
  std::lock_guard<std::mutex> lock(vcpu(index).mu);
  VcpuState& s = vcpu(index);
  if (msr == kMsrEfer) s.sregs.efer = value;
  s.msrs[msr] = value;
}

std::optional<host::CpuidLeaf> SimGuest::GetCpuid(uint16_t, uint32_t function, uint32_t index) {
  auto it = cpuid_.find({function, index});
  if (it == cpuid_.end()) return std::nullopt;
  return it->second;
}

void SimGuest::GetXsave(uint16_t index, std::vector<uint8_t>* region) {
  std::lock_guard<std::mutex> lock(vcpu(index).mu);
  *region = vcpu(index).xsave;
}

uint8_t SimGuest::MtrrType(uint16_t, uint64_t gpa) {
  // The PC layout: legacy VGA window and everything that is not RAM are uncachable, RAM is WB.
  constexpr uint8_t kUc = 0, kWb = 6;
  if (gpa >= 0xa0000 && gpa < 0x100000) return kUc;
  return IsGuestPhysical(gpa) ? kWb : kUc;
}

bool SimGuest::ReadPhysical(uint64_t gpa, void* buf, size_t size) {
  if (!IsGuestPhysical(gpa) || (gpa & (KVMI_PAGE_SIZE - 1)) + size > KVMI_PAGE_SIZE) return false;
  std::lock_guard<std::mutex> lock(memory_mu_);
  auto it = pages_.find(gpa / KVMI_PAGE_SIZE);
  if (it == pages_.end()) {
    std::memset(buf, 0, size);
  } else {
    std::memcpy(buf, it->second->data() + (gpa & (KVMI_PAGE_SIZE - 1)), size);
  }
  return true;
}

bool SimGuest::WritePhysical(uint64_t gpa, const void* buf, size_t size) {
  if (!IsGuestPhysical(gpa) || (gpa & (KVMI_PAGE_SIZE - 1)) + size > KVMI_PAGE_SIZE) return false;
  std::lock_guard<std::mutex> lock(memory_mu_);
  std::unique_ptr<Page>& page = pages_[gpa / KVMI_PAGE_SIZE];
  if (!page) page = std::make_unique<Page>(Page{});
  std::memcpy(page->data() + (gpa & (KVMI_PAGE_SIZE - 1)), buf, size);
  return true;
}

size_t SimGuest::resident_bytes() const {
  std::lock_guard<std::mutex> lock(memory_mu_);
  return pages_.size() * KVMI_PAGE_SIZE;
}

int SimGuest::SetDescriptorInterception(uint16_t, bool enable) {
  if (enable && !config_.descriptor_exiting_supported) return -KVM_EOPNOTSUPP;
  return 0;
}

void SimGuest::Crash() {
  if (crashed_.exchange(true)) return;
  if (on_crash_) on_crash_();
}

uint64_t SimGuest::xcr0(uint16_t index) const {
  std::lock_guard<std::mutex> lock(vcpu(index).mu);
  return vcpu(index).xcr0;
}

void SimGuest::set_xcr0(uint16_t index, uint64_t value) {
  std::lock_guard<std::mutex> lock(vcpu(index).mu);
  vcpu(index).xcr0 = value;
  std::memcpy(&vcpu(index).xsave[512], &value, sizeof(value));
}

void SimGuest::RecordDelivered(uint16_t index, const DeliveredException& e) {
  std::lock_guard<std::mutex> lock(vcpu(index).mu);
  auto& list = vcpu(index).delivered;
  if (list.size() >= 1024) list.erase(list.begin());  // bounded: long runs keep the latest
  list.push_back(e);
}

void SimGuest::CountGpFault(uint16_t index) {
  std::lock_guard<std::mutex> lock(vcpu(index).mu);
  ++vcpu(index).gp_faults;
}

VcpuSnapshot SimGuest::Snapshot(uint16_t index) const {
  VcpuSnapshot out;
  if (index >= VcpuCount()) return out;
  const VcpuState& s = vcpu(index);
  std::lock_guard<std::mutex> lock(s.mu);
  out.regs = s.regs;
  out.sregs = s.sregs;
  out.msrs = s.msrs;
  out.xcr0 = s.xcr0;
  out.delivered = s.delivered;
  out.gp_faults = s.gp_faults;
  out.initialized = s.initialized.load();
  return out;
}

}  // namespace kvmi::sim
