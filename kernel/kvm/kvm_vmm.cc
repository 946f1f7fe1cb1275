#include "kernel/kvm/kvm_vmm.h"

#include <cerrno>
#include <cstdio>
#include <cstring>

#include "kernel/kvm/guest/layout.h"
#include "spdlog/spdlog.h"

namespace kvmi::kvm {
namespace {

constexpr uint64_t kBootStackGpa = 0x7000;
constexpr uint32_t kMaxSleepMs = 10000;
constexpr size_t kMaxConsoleLine = 4096;
constexpr uint8_t kBreakpointVector = 3;
constexpr uint8_t kDebugVector = 1;
constexpr uint8_t kInt3Opcode = 0xcc;
// How long Stop() waits for the tool to let go after KVMI_EVENT_UNHOOK.
constexpr std::chrono::milliseconds kUnhookGrace{2000};

}  // namespace

std::unique_ptr<KvmVmm> KvmVmm::Create(VmmConfig config, std::string* error) {
  if (config.image.empty() || GUEST_LOAD_GPA + config.image.size() > config.memory_bytes) {
    *error = "the guest image is empty or does not fit in guest memory";
    return nullptr;
  }
  if (config.cmdline.size() >= GUEST_CMDLINE_MAX) {
    *error = "the guest command line is longer than " + std::to_string(GUEST_CMDLINE_MAX - 1);
    return nullptr;
  }
  const uint32_t max_vcpus = config.vcpus + (config.hotplug_vcpu_after_ms >= 0 ? 1 : 0);
  if (config.vcpus == 0 || max_vcpus > GUEST_MAX_VCPUS) {
    *error = "the guest runs 1.." + std::to_string(GUEST_MAX_VCPUS) + " vCPUs, hot-added included";
    return nullptr;
  }
  std::unique_ptr<KvmVmm> vmm(new KvmVmm(std::move(config)));
  vmm->backend_ = KvmBackend::Create(vmm->config_.memory_bytes, vmm->config_.vcpus, error);
  if (!vmm->backend_) return nullptr;
  vmm->backend_->set_enforce_execute(vmm->config_.enforce_execute);
  std::memcpy(vmm->backend_->memory() + GUEST_LOAD_GPA, vmm->config_.image.data(),
              vmm->config_.image.size());
  std::memcpy(vmm->backend_->memory() + GUEST_CMDLINE_GPA, vmm->config_.cmdline.c_str(),
              vmm->config_.cmdline.size() + 1);
  host::EngineOptions options;
  options.vm_name = vmm->config_.name;
  vmm->engine_ = std::make_unique<host::VmIntrospection>(vmm->backend_.get(), options);
  host::ConnectorConfig connector = vmm->config_.connector;
  // QEMU's KVM_INTROSPECTION_EVENT calls: only what this VMM can produce.
  std::vector<int32_t> allowed;
  for (int32_t id : connector.allowed_events) {
    for (int32_t real : kRealEvents) {
      if (id == host::kAllIds || id == real) allowed.push_back(real);
    }
  }
  connector.allowed_events = allowed;
  KvmVmm* raw = vmm.get();
  vmm->connector_ = std::make_unique<host::QemuConnector>(
      vmm->engine_.get(), connector, host::GuestIdentity{vmm->config_.name, vmm->config_.uuid},
      [raw] { return raw->backend_->crashed(); });
  vmm->backend_->set_on_crash([raw] {
    raw->engine_->EndSession("guest crashed (CRASH action)");
    raw->StopGuest("crashed by the introspection tool");
    raw->connector_->WakeWaiters();
  });
  vmm->SetBootState(0);  // the APs get their state when the kernel is up
  return vmm;
}

KvmVmm::KvmVmm(VmmConfig config)
    : config_(std::move(config)), console_lines_(KvmBackend::kMaxVcpus) {}

KvmVmm::~KvmVmm() { Stop(); }

void KvmVmm::SetBootState(uint16_t vcpu) {
  kvm_sregs sregs;
  backend_->GetSregs(vcpu, &sregs);
  sregs.cs = host::FlatSegment(0x08, 0xb, false);  // 32-bit execute/read, accessed
  sregs.ds = sregs.es = sregs.fs = sregs.gs = sregs.ss = host::FlatSegment(0x10, 0x3, false);
  sregs.cr0 = 0x11;  // PE | ET: protected mode, paging off (the guest turns it on)
  sregs.cr3 = 0;
  sregs.cr4 = 0;
  sregs.efer = 0;
  backend_->SetSregs(vcpu, sregs);
  kvm_regs regs{};
  regs.rip = GUEST_LOAD_GPA;
  regs.rflags = 0x2;
  regs.rbx = GUEST_CMDLINE_GPA;
  regs.rsp = kBootStackGpa;
  backend_->SetRegs(vcpu, regs);
}

void KvmVmm::Start() {
  if (started_.exchange(true)) return;
  spdlog::default_logger_raw();  // create the registry before the threads that log
  for (uint32_t i = 0; i < backend_->VcpuCount(); ++i) {
    StartVcpuThread(static_cast<uint16_t>(i), false);
  }
  if (config_.hotplug_vcpu_after_ms >= 0) {
    std::chrono::milliseconds delay(config_.hotplug_vcpu_after_ms);
    hotplug_thread_ = std::thread([this, delay] { HotplugAfter(delay); });
  }
  if (!config_.hook_after_boot) StartConnector();
}

void KvmVmm::StartVcpuThread(uint16_t vcpu, bool hot_added) {
  std::lock_guard<std::mutex> lock(threads_mu_);
  if (stopping()) return;
  vcpu_threads_.emplace_back([this, vcpu, hot_added] { VcpuLoop(vcpu, hot_added); });
}

void KvmVmm::HotplugAfter(std::chrono::milliseconds delay) {
  {
    std::unique_lock<std::mutex> lock(ap_mu_);
    if (ap_cv_.wait_for(lock, delay, [this] { return stopping(); })) return;
  }
  std::string error;
  int index = backend_->AddVcpu(&error);
  if (index < 0) {
    spdlog::error("[{}] vCPU hot-add: {}", config_.name, error);
    return;
  }
  spdlog::info("[{}] vCPU {} hot-added", config_.name, index);
  StartVcpuThread(static_cast<uint16_t>(index), true);
}

bool KvmVmm::WaitAndSetApState(uint16_t vcpu) {
  ApBoot boot;
  {
    std::unique_lock<std::mutex> lock(ap_mu_);
    ap_cv_.wait(lock, [this] { return ap_boot_.has_value() || stopping(); });
    if (!ap_boot_) return false;
    boot = *ap_boot_;
  }
  // As an OS's trampoline would leave it: the kernel's mode, tables and segments. The AP keeps
  // its own APIC base (KVM's BSP flag is vCPU 0's).
  kvm_sregs sregs;
  backend_->GetSregs(vcpu, &sregs);
  sregs.cs = boot.sregs.cs;
  sregs.ds = boot.sregs.ds;
  sregs.es = boot.sregs.es;
  sregs.fs = boot.sregs.fs;
  sregs.gs = boot.sregs.gs;
  sregs.ss = boot.sregs.ss;
  sregs.tr = boot.sregs.tr;
  sregs.ldt = boot.sregs.ldt;
  sregs.gdt = boot.sregs.gdt;
  sregs.idt = boot.sregs.idt;
  sregs.cr0 = boot.sregs.cr0;
  sregs.cr3 = boot.sregs.cr3;
  sregs.cr4 = boot.sregs.cr4;
  sregs.efer = boot.sregs.efer;
  backend_->SetSregs(vcpu, sregs);
  kvm_regs regs{};
  regs.rip = boot.entry;
  // The top of its stack, minus a return address slot: the ABI's alignment at a function entry.
  regs.rsp = boot.stacks + uint64_t{vcpu} * GUEST_AP_STACK_SIZE - 8;
  regs.rdi = vcpu;
  regs.r15 = boot.r15;  // reserved in the guest for the boot marker (-ffixed-r15)
  regs.rflags = 0x2;
  backend_->SetRegs(vcpu, regs);
  return true;
}

void KvmVmm::StartConnector() {
  std::lock_guard<std::mutex> lock(connector_mu_);
  if (connector_started_ || stopping()) return;
  connector_started_ = true;
  connector_->Start();
}

void KvmVmm::Stop() {
  // As QEMU at VM shutdown: KVM_INTROSPECTION_UNHOOK first, while the vCPU still runs the
  // commands with which the tool disarms, then the session ends whatever the tool did.
  if (connector_ && !stop_.load() && engine_->hooked()) {
    connector_->Detach(kUnhookGrace);
  }
  if (stop_.exchange(true)) return;
  if (!connector_) return;  // Create failed half-way: nothing runs yet
  {
    std::lock_guard<std::mutex> lock(ap_mu_);  // waiters check stopping() under it
  }
  ap_cv_.notify_all();
  if (hotplug_thread_.joinable()) hotplug_thread_.join();
  {
    std::lock_guard<std::mutex> lock(connector_mu_);
    connector_->Stop();
  }
  engine_->EndSession("VMM stopping");
  for (uint32_t i = 0; i < backend_->VcpuCount(); ++i) {
    engine_->Kick(static_cast<uint16_t>(i));  // also KickVcpu: out of KVM_RUN
  }
  std::lock_guard<std::mutex> lock(threads_mu_);  // StartVcpuThread adds none once stopping
  for (std::thread& t : vcpu_threads_) {
    if (t.joinable()) t.join();
  }
}

std::string KvmVmm::stop_reason() const {
  std::lock_guard<std::mutex> lock(reason_mu_);
  return stop_reason_;
}

void KvmVmm::StopGuest(const std::string& reason) {
  {
    std::lock_guard<std::mutex> lock(reason_mu_);
    if (stop_reason_.empty()) stop_reason_ = reason;
  }
  guest_stopped_.store(true, std::memory_order_release);
  for (uint32_t i = 0; i < backend_->VcpuCount(); ++i) backend_->KickVcpu(static_cast<uint16_t>(i));
}

void KvmVmm::Idle(uint16_t vcpu, host::Clock::time_point deadline) {
  while (!stopping() && host::Clock::now() < deadline) {
    engine_->WaitForWork(vcpu, deadline);
    engine_->RunJobs(vcpu);
  }
}

void KvmVmm::EnterGuest(uint16_t vcpu) {
  engine_->RunJobs(vcpu);
  std::optional<host::GuestInjection> busy = backend_->PendingInjection(vcpu);
  KvmVcpu& v = backend_->vcpu(vcpu);
  if (!busy && v.breakpoint_injected) {
    busy = host::GuestInjection{kBreakpointVector, KVMI_TRAP_TYPE_SOFT_EXCEPTION, 0, 0};
  }
  v.breakpoint_injected = false;  // delivered by this entry
  if (std::optional<host::ToolException> e = engine_->TakeToolException(vcpu, busy)) {
    if (!backend_->InjectException(vcpu, e->vector, e->has_error || e->vector == 14, e->error_code,
                                   e->address)) {
      spdlog::warn("[{}] vcpu {}: KVM_SET_VCPU_EVENTS: {}", config_.name, vcpu,
                   std::strerror(errno));
    }
  }
}

void KvmVmm::VcpuLoop(uint16_t vcpu, bool hot_added) {
  KvmVcpu& v = backend_->vcpu(vcpu);
  if (vcpu > 0 && !WaitAndSetApState(vcpu)) return;
  backend_->MarkRunning(vcpu);
  if (hot_added) engine_->OnVcpuFirstRun(vcpu);
  while (!stopping()) {
    if (guest_stopped()) {
      // Halted for good (no interrupts in this machine): keep serving the tool.
      Idle(vcpu, host::Clock::now() + std::chrono::milliseconds(200));
      continue;
    }
    EnterGuest(vcpu);
    if (stopping()) break;
    int rc = backend_->Run(vcpu);
    if (rc == -EINTR || rc == -EAGAIN) {
      stats_.kicks.fetch_add(1, std::memory_order_relaxed);
      continue;
    }
    if (rc < 0) {
      StopGuest(std::string("KVM_RUN: ") + std::strerror(-rc));
      continue;
    }
    stats_.exits.fetch_add(1, std::memory_order_relaxed);
    switch (v.run->exit_reason) {
      case KVM_EXIT_IO:
        HandleIo(vcpu);
        break;
      case KVM_EXIT_MMIO:
        HandleMmio(vcpu);
        break;
      case KVM_EXIT_X86_WRMSR:
        HandleWrmsr(vcpu);
        break;
      case KVM_EXIT_X86_RDMSR:
        v.run->msr.error = 1;  // reads are never filtered; refuse rather than invent a value
        break;
      case KVM_EXIT_DEBUG:
        HandleDebug(vcpu);
        break;
      case KVM_EXIT_HLT:
        StopGuest("guest halted");
        break;
      case KVM_EXIT_SHUTDOWN:
        StopGuest("guest shut down (triple fault)");
        break;
      case KVM_EXIT_INTR:
        stats_.kicks.fetch_add(1, std::memory_order_relaxed);
        break;
      case KVM_EXIT_INTERNAL_ERROR: {
        // The fetch first: an INT3 on a non-executable page is a restricted fetch.
        if (v.run->internal.suberror == KVM_INTERNAL_ERROR_EMULATION &&
            (HandleFetchFromRestrictedPage(vcpu) || HandleUnemulatedInt3(vcpu))) {
          break;
        }
        kvm_regs regs;
        backend_->GetRegs(vcpu, &regs);
        char where[64];
        std::snprintf(where, sizeof(where), " at rip %#llx",
                      static_cast<unsigned long long>(regs.rip));
        StopGuest("KVM internal error, suberror " + std::to_string(v.run->internal.suberror) +
                  where);
        break;
      }
      case KVM_EXIT_FAIL_ENTRY:
        StopGuest("VM entry failed, reason " +
                  std::to_string(v.run->fail_entry.hardware_entry_failure_reason));
        break;
      default:
        StopGuest("unexpected exit reason " + std::to_string(v.run->exit_reason));
        break;
    }
  }
  // The session is over for this vCPU: no job may stay queued behind it.
  engine_->RunJobs(vcpu);
}

void KvmVmm::HandleIo(uint16_t vcpu) {
  stats_.io_exits.fetch_add(1, std::memory_order_relaxed);
  kvm_run* run = backend_->vcpu(vcpu).run;
  uint8_t* data = reinterpret_cast<uint8_t*>(run) + run->io.data_offset;
  const size_t bytes = size_t{run->io.size} * run->io.count;
  if (run->io.data_offset + bytes > backend_->vcpu(vcpu).run_size) return;  // never from KVM
  if (run->io.direction == KVM_EXIT_IO_IN) {
    std::memset(data, 0xff, bytes);  // nothing else on this bus
    return;
  }
  if (run->io.port == GUEST_PORT_SERIAL) {
    std::string& console_line = console_lines_[vcpu];
    for (size_t i = 0; i < bytes; ++i) {
      char c = static_cast<char>(data[i]);
      if (c == '\n' || console_line.size() >= kMaxConsoleLine) {
        if (config_.on_console_line) config_.on_console_line(console_line);
        console_line.clear();
        if (c == '\n') continue;
      }
      if (c != '\r') console_line += c;
    }
  } else if (run->io.port == GUEST_PORT_BOOTED) {
    if (vcpu == 0) {
      ApBoot boot;
      kvm_regs regs;
      backend_->GetRegs(vcpu, &regs);
      backend_->GetSregs(vcpu, &boot.sregs);
      boot.entry = regs.rdi;
      boot.stacks = regs.rsi;
      boot.r15 = regs.r15;
      {
        std::lock_guard<std::mutex> lock(ap_mu_);
        ap_boot_ = boot;
      }
      ap_cv_.notify_all();
    }
    StartConnector();
  } else if (run->io.port == GUEST_PORT_SLEEP_MS && run->io.size == 4) {
    uint32_t ms;
    std::memcpy(&ms, data, sizeof(ms));
    Idle(vcpu, host::Clock::now() + std::chrono::milliseconds(std::min(ms, kMaxSleepMs)));
  }
}

uint64_t KvmVmm::GvaForGpa(uint16_t vcpu, uint64_t gpa) {
  uint64_t translated = 0;
  return backend_->Translate(vcpu, gpa, &translated) && translated == gpa ? gpa : 0;
}

void KvmVmm::HandleMmio(uint16_t vcpu) {
  stats_.mmio_exits.fetch_add(1, std::memory_order_relaxed);
  kvm_run* run = backend_->vcpu(vcpu).run;
  const uint64_t gpa = run->mmio.phys_addr;
  const uint32_t len = std::min<uint32_t>(run->mmio.len, sizeof(run->mmio.data));
  const bool is_write = run->mmio.is_write != 0;
  if (len == 0 || !backend_->IsGuestPhysical(gpa) || !backend_->IsGuestPhysical(gpa + len - 1)) {
    if (!is_write) std::memset(run->mmio.data, 0xff, len);  // no devices: open bus
    return;
  }
  // RAM reached through an MMIO exit: a page the tool restricted (read-only or absent slot), or
  // a range whose slot is being rebuilt. KVM has decoded the instruction; the VMM performs the
  // access unless the tool says otherwise.
  const uint8_t access = is_write ? KVMI_PAGE_ACCESS_W : KVMI_PAGE_ACCESS_R;
  host::PageFaultOutcome outcome;
  uint64_t gva = 0;
  if (!engine_->AccessAllowed(gpa, access)) {
    gva = GvaForGpa(vcpu, gpa);
    outcome = engine_->OnPageFault(vcpu, gpa, gva, access);
  }
  if (outcome.kind == host::PageFaultOutcome::kRetry) {
    // KVM completes the emulated instruction when we re-enter, so RETRY cannot re-execute it as
    // on EPT hardware: the store is dropped, a read yields zeros (docs/KVM.md).
    if (!is_write) std::memset(run->mmio.data, 0, len);
    return;
  }
  uint8_t* host = backend_->memory() + gpa;
  if (is_write) {
    std::memcpy(host, run->mmio.data, len);
  } else {
    std::memcpy(run->mmio.data, host, len);
    // PF custom input: bytes of the read inside [ctx_addr, ctx_addr + ctx_size) come from the
    // tool's ctx_data.
    if (outcome.ctx_size > 0 && gva != 0) {
      for (uint32_t i = 0; i < len; ++i) {
        uint64_t at = gva + i;
        if (at >= outcome.ctx_addr && at - outcome.ctx_addr < outcome.ctx_size &&
            at - outcome.ctx_addr < outcome.ctx_data.size()) {
          run->mmio.data[i] = outcome.ctx_data[at - outcome.ctx_addr];
        }
      }
    }
  }
  if (outcome.kind == host::PageFaultOutcome::kSingleStep) {
    // RETRY + singlestep: the access was allowed for this one instruction, which KVM retires at
    // the next entry; with guest-debug single-step on, KVM exits right after it (HandleDebug
    // reports SINGLESTEP then).
    if (backend_->SetSingleStep(vcpu, true) < 0) engine_->OnSingleStep(vcpu);
  }
}

void KvmVmm::HandleWrmsr(uint16_t vcpu) {
  stats_.msr_exits.fetch_add(1, std::memory_order_relaxed);
  kvm_run* run = backend_->vcpu(vcpu).run;
  const uint32_t index = run->msr.index;
  const uint64_t new_value = run->msr.data;
  uint64_t old_value = 0;
  if (!backend_->GetMsr(vcpu, index, &old_value)) {
    run->msr.error = 1;  // an MSR this vCPU does not have: #GP, as without the filter
    return;
  }
  host::WriteOutcome outcome = engine_->OnMsrWrite(vcpu, index, old_value, new_value);
  // The write is performed by the VMM (host-initiated writes are not filtered); a refusal or a
  // value KVM rejects becomes the guest's #GP.
  run->msr.error = outcome.allowed && backend_->SetMsr(vcpu, index, outcome.value) ? 0 : 1;
}

bool KvmVmm::HandleUnemulatedInt3(uint16_t vcpu) {
  kvm_regs regs;
  kvm_sregs sregs;
  backend_->GetRegs(vcpu, &regs);
  backend_->GetSregs(vcpu, &sregs);
  uint64_t gpa = 0;
  uint8_t opcode = 0;
  if (!backend_->Translate(vcpu, sregs.cs.base + regs.rip, &gpa) ||
      !backend_->ReadPhysical(gpa, &opcode, 1) || opcode != kInt3Opcode) {
    return false;
  }
  stats_.breakpoint_exits.fetch_add(1, std::memory_order_relaxed);
  // KVM gives up on the INT3 at its RIP before anything is delivered: the same point at which
  // an intercepted #BP (KVM_EXIT_DEBUG) stops, so the tool sees RIP at the INT3. A #UD KVM may
  // have queued with the failure is not the guest's: it goes.
  backend_->ClearException(vcpu);
  if (engine_->OnBreakpoint(vcpu, gpa, 1) == host::BreakpointOutcome::kRetry) {
    return true;  // re-executed at RIP (the tool removed its INT3 or moved RIP)
  }
  // What the CPU would have done: #BP is a trap, delivered with RIP past the INT3. RIP is read
  // again because the tool may have set the registers while the vCPU waited for its reply.
  backend_->GetRegs(vcpu, &regs);
  regs.rip += 1;
  backend_->SetRegs(vcpu, regs);
  if (backend_->InjectException(vcpu, kBreakpointVector, false, 0, 0)) {
    backend_->vcpu(vcpu).breakpoint_injected = true;
  } else {
    StopGuest(std::string("KVM_SET_VCPU_EVENTS (#BP): ") + std::strerror(errno));
  }
  return true;
}

bool KvmVmm::HandleFetchFromRestrictedPage(uint16_t vcpu) {
  if (!backend_->enforce_execute()) return false;
  kvm_regs regs;
  kvm_sregs sregs;
  backend_->GetRegs(vcpu, &regs);
  backend_->GetSregs(vcpu, &sregs);
  const uint64_t gva = sregs.cs.base + regs.rip;
  uint64_t gpa = 0;
  if (!backend_->Translate(vcpu, gva, &gpa) || !backend_->IsGuestPhysical(gpa) ||
      engine_->AccessAllowed(gpa, KVMI_PAGE_ACCESS_X)) {
    return false;
  }
  stats_.fetch_faults.fetch_add(1, std::memory_order_relaxed);
  backend_->ClearException(vcpu);  // KVM's #UD for the failed emulation is not the guest's
  host::PageFaultOutcome outcome = engine_->OnPageFault(vcpu, gpa, gva, KVMI_PAGE_ACCESS_X);
  if (outcome.kind == host::PageFaultOutcome::kRetry) return true;  // fetched again at RIP
  // The instruction runs once with the page mapped (readable, and writable only if the tool
  // allows writes), then HandleDebug puts the restriction back. Other vCPUs could fetch from
  // the page meanwhile: the relaxation is VM-wide, as memslots are.
  const uint64_t gfn = gpa >> 12;
  KvmVcpu& v = backend_->vcpu(vcpu);
  v.exec_step_gfn = gfn;
  v.exec_step_event = outcome.kind == host::PageFaultOutcome::kSingleStep;
  backend_->OnPageAccessChanged(
      gfn, engine_->AllowedAccess(gpa) | KVMI_PAGE_ACCESS_R | KVMI_PAGE_ACCESS_X);
  if (backend_->SetSingleStep(vcpu, true) < 0) {
    StopGuest(std::string("KVM_SET_GUEST_DEBUG (single step): ") + std::strerror(errno));
  }
  return true;
}

void KvmVmm::HandleDebug(uint16_t vcpu) {
  stats_.debug_exits.fetch_add(1, std::memory_order_relaxed);
  kvm_run* run = backend_->vcpu(vcpu).run;
  if (run->debug.arch.exception == kBreakpointVector) {
    uint64_t gpa = 0;
    if (!backend_->Translate(vcpu, run->debug.arch.pc, &gpa)) gpa = ~0ull;
    host::BreakpointOutcome outcome = engine_->OnBreakpoint(vcpu, gpa, 1);
    if (outcome == host::BreakpointOutcome::kReinject) {
      // The guest gets its own #BP: injected as a soft exception with the INT3's length, so its
      // handler sees RIP after the INT3.
      if (backend_->InjectException(vcpu, kBreakpointVector, false, 0, 0)) {
        backend_->vcpu(vcpu).breakpoint_injected = true;
      }
    }
    return;
  }
  KvmVcpu& v = backend_->vcpu(vcpu);
  if (run->debug.arch.exception == kDebugVector && v.single_step) {
    backend_->SetSingleStep(vcpu, false);
    bool step_event = true;
    if (v.exec_step_gfn != ~uint64_t{0}) {
      // The fetched instruction retired: the page gets the mode the tool's access asks for now.
      const uint64_t gpa = v.exec_step_gfn << 12;
      v.exec_step_gfn = ~uint64_t{0};
      step_event = v.exec_step_event;
      backend_->OnPageAccessChanged(gpa >> 12, engine_->AllowedAccess(gpa));
    }
    if (step_event) engine_->OnSingleStep(vcpu);
  }
}

}  // namespace kvmi::kvm
