#include "kernel/sim/sim_vm.h"

#include <pthread.h>
#include <spdlog/spdlog.h>
#include <sys/socket.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <ctime>

#include "spdlog/spdlog.h"

namespace kvmi::sim {
namespace {

constexpr uint32_t kCr4Pge = 1u << 7;
constexpr uint64_t kXcr0Avx = 1u << 2;
constexpr int64_t kKvmEnosys = -KVM_ENOSYS;

// What the guest "sees" as process page-table roots: CR3 cycles through 16 of them, or through
// its processes' real roots when it has page tables (GuestConfig::paging).
uint64_t ProcessCr3(const SimGuest& guest, uint32_t slot) {
  const std::vector<uint64_t>& roots = guest.process_roots();
  if (!roots.empty()) return roots[slot % roots.size()];
  return 0x1000000 + (uint64_t{slot % 16} << 12);
}

uint8_t DescriptorOf(DescInsn insn) {
  switch (insn) {
    case DescInsn::kLidt:
    case DescInsn::kSidt:
      return KVMI_DESC_IDTR;
    case DescInsn::kLgdt:
    case DescInsn::kSgdt:
      return KVMI_DESC_GDTR;
    case DescInsn::kLldt:
    case DescInsn::kSldt:
      return KVMI_DESC_LDTR;
    default:
      return KVMI_DESC_TR;
  }
}

// Pacing of rated workloads: see VcpuLoop.
constexpr std::chrono::milliseconds kPacingQuantum{100};
// Unlimited rate: after this many consecutive operations without an event the vCPU sleeps,
// doubling the sleep while nothing is reported.
constexpr uint32_t kQuietOpsBeforeIdle = 64;
constexpr std::chrono::milliseconds kMinIdleBackoff{1};
constexpr std::chrono::milliseconds kMaxIdleBackoff{64};

// splitmix64 finaliser: a well-spread per-vCPU pacing phase from a small seed.
uint64_t Mix(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

bool IsLoad(DescInsn insn) {
  return insn == DescInsn::kLidt || insn == DescInsn::kLgdt || insn == DescInsn::kLldt ||
         insn == DescInsn::kLtr;
}

}  // namespace

SimVm::SimVm(VmConfig config) : config_(std::move(config)) {
  guest_ = std::make_unique<SimGuest>(config_.guest);
  host::EngineOptions options;
  options.vm_name = config_.name;
  engine_ = std::make_unique<host::VmIntrospection>(guest_.get(), options);
  for (uint32_t i = 0; i < guest_->VcpuCount(); ++i) runners_[i] = std::make_unique<VcpuRunner>();
  connector_ = std::make_unique<host::QemuConnector>(
      engine_.get(), config_.connector, host::GuestIdentity{config_.name, config_.uuid},
      [this] { return guest_->crashed(); });
  // CRASH: the kernel SIGTERMs every vCPU thread, QEMU dies and the socket closes.
  guest_->set_on_crash([this] {
    engine_->EndSession("guest crashed (CRASH action)");
    for (uint32_t i = 0; i < guest_->VcpuCount(); ++i) engine_->Kick(static_cast<uint16_t>(i));
    connector_->WakeWaiters();
  });
}

SimVm::~SimVm() { Stop(); }

void SimVm::Start() {
  if (started_.exchange(true)) return;
  // Create spdlog's registry here, before the threads that log: its lazy first use from several
  // threads at once happens inside Debian's uninstrumented libspdlog, which TSan cannot see
  // synchronise.
  spdlog::default_logger_raw();
  for (uint32_t i = 0; i < guest_->VcpuCount(); ++i) StartVcpu(static_cast<uint16_t>(i));
  connector_->Start();
}

void SimVm::Stop() {
  if (stop_.exchange(true)) return;
  connector_->Stop();
  engine_->EndSession("simulator stopping");
  // No vCPU is added once stop_ is seen under vcpus_mu_: this count covers every thread.
  uint32_t count;
  {
    std::lock_guard<std::mutex> lock(vcpus_mu_);
    count = guest_->VcpuCount();
  }
  for (uint32_t i = 0; i < count; ++i) {
    if (runners_[i] && runners_[i]->thread.joinable()) {
      engine_->Kick(static_cast<uint16_t>(i));
      runners_[i]->thread.join();
    }
  }
}

// ---- vCPUs
// ----------------------------------------------------------------------------------------

int SimVm::AddVcpu(bool start) {
  std::lock_guard<std::mutex> lock(vcpus_mu_);
  if (stopping()) return -1;
  int index = guest_->AddVcpu();
  if (index < 0) return -1;
  runners_[index] = std::make_unique<VcpuRunner>();
  runners_[index]->hot_added = true;
  if (start) StartVcpu(static_cast<uint16_t>(index));
  return index;
}

void SimVm::MaybeHotplug(const Scenario& scenario, Clock::time_point now, Clock::time_point* due) {
  if (hotplugged_.load(std::memory_order_relaxed) >= scenario.hotplug_vcpus) return;
  // Counted in hooked time: a vCPU added before the tool enabled CREATE_VCPU raises nothing.
  if (!engine_->hooked()) {
    *due = now + std::chrono::milliseconds(scenario.hotplug_period_ms);
    return;
  }
  if (now < *due) return;
  *due = now + std::chrono::milliseconds(scenario.hotplug_period_ms);
  int index = AddVcpu(/*start=*/true);
  if (index < 0) {
    hotplugged_.store(scenario.hotplug_vcpus, std::memory_order_relaxed);  // full: stop trying
    return;
  }
  hotplugged_.fetch_add(1, std::memory_order_relaxed);
  spdlog::info("[{}] hot-plugged vCPU {}", config_.name, index);
}

void SimVm::StartVcpu(uint16_t vcpu) {
  VcpuRunner& r = runner(vcpu);
  if (r.started) return;
  r.started = true;
  r.thread = std::thread([this, vcpu] { VcpuLoop(vcpu); });
}

std::future<OpResult> SimVm::Execute(uint16_t vcpu, const Op& op) {
  TestOp test_op{op, {}};
  std::future<OpResult> result = test_op.done.get_future();
  VcpuRunner* r = nullptr;
  {
    std::lock_guard<std::mutex> lock(vcpus_mu_);  // a scenario may be adding a vCPU
    if (vcpu < guest_->VcpuCount() && !stopping()) r = runners_[vcpu].get();
  }
  if (r == nullptr) {
    test_op.done.set_value(OpResult{});
    return result;
  }
  {
    std::lock_guard<std::mutex> lock(r->mu);
    if (r->exited) {
      test_op.done.set_value(OpResult{});
      return result;
    }
    r->test_ops.push_back(std::move(test_op));
  }
  engine_->Kick(vcpu);
  return result;
}

void SimVm::VcpuLoop(uint16_t vcpu) {
  pthread_setname_np(pthread_self(), "sim-vcpu");  // for profiles and benches
  VcpuRunner& r = runner(vcpu);
  // First KVM_RUN: the vCPU leaves KVM_MP_STATE_UNINITIALIZED; a hot-added one reports itself.
  guest_->MarkInitialized(vcpu);
  if (r.hot_added) engine_->OnVcpuFirstRun(vcpu);
  Scenario none;
  const Scenario& scenario = config_.workload ? *config_.workload : none;
  OpGenerator generator(scenario, config_.guest.seed * 7919 + vcpu);
  const bool has_workload = config_.workload.has_value() && generator.Next().has_value();
  const double rate = scenario.ops_per_second;
  const auto interval =
      rate > 0
          ? std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(1.0 / rate))
          : Clock::duration::zero();
  // Coarse pacing: a vCPU sleeps until its next operation is due plus up to one quantum and then
  // runs every operation that is due, so a timer wake-up (a context switch, the simulator's main
  // cost besides the event itself) serves Q/interval + 1 operations instead of one. The average
  // rate is unchanged; each vCPU's operations come in short bursts, one event outstanding at a
  // time as always. A per-vCPU phase spreads the bursts of a fleet over the quantum.
  const auto quantum = rate > 0 && interval < kPacingQuantum
                           ? std::chrono::duration_cast<Clock::duration>(kPacingQuantum)
                           : Clock::duration::zero();
  const auto phase =
      quantum.count() > 0
          ? Clock::duration(static_cast<Clock::rep>(Mix(config_.guest.seed * 7919 + vcpu) %
                                                    static_cast<uint64_t>(quantum.count())))
          : Clock::duration::zero();
  auto next_op = Clock::now() + interval + phase;
  auto total_events = [this] {
    uint64_t n = 0;
    for (const auto& c : engine_->stats().events_sent) n += c.load(std::memory_order_relaxed);
    return n;
  };
  uint32_t quiet_ops = 0;  // consecutive operations (unlimited rate) that raised no event
  auto idle_backoff = kMinIdleBackoff;
  // vCPU 0 hot-plugs the scenario's vCPUs (scenario.hotplug_vcpus).
  const bool hotplugs = vcpu == 0 && has_workload && scenario.hotplug_vcpus > 0;
  auto hotplug_due = Clock::now() + std::chrono::milliseconds(scenario.hotplug_period_ms);

  while (!stopping() && !guest_->crashed()) {
    EnterGuest(vcpu);
    std::optional<TestOp> test_op;
    {
      std::lock_guard<std::mutex> lock(r.mu);
      if (!r.test_ops.empty()) {
        test_op = std::move(r.test_ops.front());
        r.test_ops.pop_front();
      }
    }
    if (test_op) {
      test_op->done.set_value(RunOp(vcpu, test_op->op));
      continue;
    }
    if (!has_workload) {
      // Idle: halted inside KVM, serving commands; woken by jobs, pauses and Kick().
      engine_->WaitForWork(vcpu, Clock::now() + std::chrono::hours(1));
      continue;
    }
    auto now = Clock::now();
    if (hotplugs) MaybeHotplug(scenario, now, &hotplug_due);
    if (rate > 0 && now < next_op) {
      auto wake = next_op + quantum;
      if (hotplugs && hotplugged() < scenario.hotplug_vcpus) wake = std::min(wake, hotplug_due);
      engine_->WaitForWork(vcpu, wake);
      continue;
    }
    uint64_t events_before = rate > 0 ? 0 : total_events();
    RunOp(vcpu, *generator.Next());
    if (rate > 0) {
      next_op += interval;
      if (next_op + std::chrono::seconds(1) < now) next_op = now + interval;  // no catch-up burst
    } else if (total_events() != events_before) {
      quiet_ops = 0;
      idle_backoff = kMinIdleBackoff;
    } else if (++quiet_ops >= kQuietOpsBeforeIdle) {
      // Unlimited rate but the tool enabled nothing these ops could report: do not spin a core.
      // (Ops that raise no event in a mix that does, e.g. reads of unrestricted pages, run back
      // to back: sleeping after each of them cost a timer wake-up per operation.) Jobs from the
      // tool (CONTROL_EVENTS, ...) end the sleep at once.
      engine_->WaitForWork(vcpu, now + idle_backoff);
      idle_backoff = std::min(idle_backoff * 2, kMaxIdleBackoff);
    }
  }
  // Operations nobody will run: tell the waiting tests.
  std::lock_guard<std::mutex> lock(r.mu);
  r.exited = true;
  for (TestOp& op : r.test_ops) op.done.set_value(OpResult{});
  r.test_ops.clear();
}

void SimVm::EnterGuest(uint16_t vcpu) {
  engine_->RunJobs(vcpu);
  VcpuRunner& r = runner(vcpu);
  std::optional<host::GuestInjection> busy = r.injecting;
  if (std::optional<host::ToolException> e = engine_->TakeToolException(vcpu, busy)) {
    if (e->vector == 14) {  // #PF: the address becomes CR2
      kvm_sregs sregs;
      guest_->GetSregs(vcpu, &sregs);
      sregs.cr2 = e->address;
      guest_->SetSregs(vcpu, sregs);
    }
    guest_->RecordDelivered(vcpu, DeliveredException{e->vector, KVMI_TRAP_TYPE_HARD_EXCEPTION,
                                                     e->has_error || e->vector == 14, e->error_code,
                                                     /*from_tool=*/true});
  }
  if (busy) {
    guest_->RecordDelivered(vcpu, DeliveredException{busy->vector, busy->type, false,
                                                     busy->error_code, /*from_tool=*/false});
    r.injecting.reset();
  }
}

OpResult SimVm::RunOp(uint16_t vcpu, const Op& op) {
  OpResult result;
  for (;;) {
    ++result.attempts;
    if (ExecuteOnce(vcpu, op, &result)) {
      result.executed = !guest_->crashed();
      break;
    }
    if (stopping() || guest_->crashed()) break;
    EnterGuest(vcpu);  // RETRY: back into the guest, which executes the instruction again
  }
  ops_executed_.fetch_add(1, std::memory_order_relaxed);
  return result;
}

bool SimVm::ExecuteOnce(uint16_t vcpu, const Op& op, OpResult* result) {
  kvm_regs regs;
  guest_->GetRegs(vcpu, &regs);
  const uint64_t rip_before = regs.rip;
  auto advance = [&](uint64_t len) {
    kvm_regs now;
    guest_->GetRegs(vcpu, &now);
    now.rip = kTextGva + ((now.rip - kTextGva + len) % kTextSize);
    guest_->SetRegs(vcpu, now);
  };
  auto rip_unchanged = [&] {
    kvm_regs now;
    guest_->GetRegs(vcpu, &now);
    return now.rip == rip_before;
  };
  auto general_protection = [&] {
    result->faulted = true;
    guest_->CountGpFault(vcpu);
    runner(vcpu).injecting = host::GuestInjection{13, KVMI_TRAP_TYPE_HARD_EXCEPTION, 0, 0};
  };

  switch (op.kind) {
    case OpKind::kWriteCr0:
    case OpKind::kWriteCr3:
    case OpKind::kWriteCr4: {
      kvm_sregs sregs;
      guest_->GetSregs(vcpu, &sregs);
      uint32_t cr = op.kind == OpKind::kWriteCr0 ? 0 : op.kind == OpKind::kWriteCr3 ? 3 : 4;
      __u64& reg = cr == 0 ? sregs.cr0 : cr == 3 ? sregs.cr3 : sregs.cr4;
      uint64_t old_value = reg;
      uint64_t new_value = op.value;
      if (!op.explicit_value) {
        new_value = cr == 0   ? old_value ^ kCr0Wp
                    : cr == 3 ? ProcessCr3(*guest_, ++runner(vcpu).cr3_slot)
                              : old_value ^ kCr4Pge;
        if (cr == 3 && new_value == old_value) {
          new_value = ProcessCr3(*guest_, ++runner(vcpu).cr3_slot);
        }
      }
      host::WriteOutcome outcome = engine_->OnCrWrite(vcpu, cr, old_value, new_value);
      if (!outcome.allowed) {
        general_protection();
        return true;
      }
      guest_->GetSregs(vcpu, &sregs);
      (cr == 0 ? sregs.cr0 : cr == 3 ? sregs.cr3 : sregs.cr4) = outcome.value;
      guest_->SetSregs(vcpu, sregs);
      result->value = outcome.value;
      advance(3);  // mov crN, reg
      return true;
    }
    case OpKind::kWriteMsr: {
      uint32_t msr = op.index != 0 ? op.index : kMsrLstar;
      uint64_t old_value = 0;
      if (!guest_->GetMsr(vcpu, msr, &old_value)) {
        general_protection();  // WRMSR to an MSR the CPU does not have
        return true;
      }
      uint64_t new_value = op.explicit_value ? op.value : old_value ^ 0x1000;
      host::WriteOutcome outcome = engine_->OnMsrWrite(vcpu, msr, old_value, new_value);
      if (!outcome.allowed) {
        general_protection();
        return true;
      }
      guest_->SetMsr(vcpu, msr, outcome.value);
      result->value = outcome.value;
      advance(2);  // wrmsr
      return true;
    }
    case OpKind::kRead:
      return MemoryAccess(vcpu, op, KVMI_PAGE_ACCESS_R, result);
    case OpKind::kWrite:
      return MemoryAccess(vcpu, op, KVMI_PAGE_ACCESS_W, result);
    case OpKind::kExecute:
      return MemoryAccess(vcpu, op, KVMI_PAGE_ACCESS_X, result);

    case OpKind::kInt3: {
      // The INT3 sits at RIP; its physical address is CS.base + RIP through the text mapping.
      uint64_t gpa = kTextGpa + (regs.rip - kTextGva) % kTextSize;
      host::BreakpointOutcome outcome = engine_->OnBreakpoint(vcpu, gpa, 1);
      if (outcome == host::BreakpointOutcome::kReinject) {
        advance(1);  // #BP is a trap: the guest's handler sees RIP after the INT3
        runner(vcpu).injecting = host::GuestInjection{3, KVMI_TRAP_TYPE_SOFT_EXCEPTION, 0, 0};
        return true;
      }
      // RETRY: nothing injected; if the tool did not move RIP the guest hits the INT3 again.
      return !rip_unchanged();
    }
    case OpKind::kHypercall: {
      regs.rax = KVM_HC_XEN_HVM_OP;
      regs.rdi = KVM_HC_XEN_HVM_OP_GUEST_REQUEST_VM_EVENT;
      regs.rsi = 0;
      guest_->SetRegs(vcpu, regs);
      bool sent = engine_->OnHypercall(vcpu);
      kvm_regs after;
      guest_->GetRegs(vcpu, &after);
      after.rax = sent ? 0 : static_cast<uint64_t>(kKvmEnosys);
      after.rip = kTextGva + ((after.rip - kTextGva + 3) % kTextSize);  // vmcall
      guest_->SetRegs(vcpu, after);
      result->value = after.rax;
      return true;
    }
    case OpKind::kDescriptor: {
      auto insn = static_cast<DescInsn>(op.index % 8);
      bool load = IsLoad(insn);
      host::DescriptorOutcome outcome = engine_->OnDescriptor(vcpu, DescriptorOf(insn), load);
      if (outcome == host::DescriptorOutcome::kRetry) return !rip_unchanged();
      kvm_sregs sregs;
      guest_->GetSregs(vcpu, &sregs);
      uint64_t value = 0;
      switch (insn) {
        case DescInsn::kLidt:
          value = sregs.idt.base = op.explicit_value ? op.value : sregs.idt.base ^ 0x1000;
          break;
        case DescInsn::kLgdt:
          value = sregs.gdt.base = op.explicit_value ? op.value : sregs.gdt.base ^ 0x1000;
          break;
        case DescInsn::kLldt:
          value = sregs.ldt.selector = static_cast<uint16_t>(op.explicit_value ? op.value : 0x50);
          break;
        case DescInsn::kLtr:
          value = sregs.tr.selector = static_cast<uint16_t>(op.explicit_value ? op.value : 0x40);
          break;
        case DescInsn::kSidt:
          value = sregs.idt.base;
          break;
        case DescInsn::kSgdt:
          value = sregs.gdt.base;
          break;
        case DescInsn::kSldt:
          value = sregs.ldt.selector;
          break;
        case DescInsn::kStr:
          value = sregs.tr.selector;
          break;
      }
      if (load) {
        guest_->SetSregs(vcpu, sregs);
      } else if (guest_->IsGuestPhysical(op.gpa)) {
        guest_->WritePhysical(op.gpa & ~uint64_t{7}, &value, sizeof(value));  // the store
      }
      result->value = value;
      advance(3);
      return true;
    }
    case OpKind::kXsetbv: {
      uint64_t old_value = guest_->xcr0(vcpu);
      uint64_t new_value = op.explicit_value ? op.value : old_value ^ kXcr0Avx;
      // Sent before the write is validated, only when the value changes; CONTINUE only.
      if (new_value != old_value) engine_->OnXsetbv(vcpu);
      guest_->set_xcr0(vcpu, new_value);
      result->value = new_value;
      advance(3);
      return true;
    }
    case OpKind::kInterrupt:
      runner(vcpu).injecting =
          host::GuestInjection{op.index != 0 ? op.index : 0x20, KVMI_TRAP_TYPE_EXT_INTR, 0, 0};
      return true;
    case OpKind::kCount:
      break;
  }
  return true;
}

bool SimVm::MemoryAccess(uint16_t vcpu, const Op& op, uint8_t access, OpResult* result) {
  const uint64_t gpa = op.gpa & ~uint64_t{7};  // 8-byte aligned: never crosses a page
  const uint64_t gva = kDirectMapGva + gpa;
  kvm_regs regs;
  guest_->GetRegs(vcpu, &regs);
  const uint64_t rip_before = regs.rip;
  host::PageFaultOutcome outcome;
  if (!engine_->AccessAllowed(gpa, access)) {
    outcome = engine_->OnPageFault(vcpu, gpa, gva, access);
    if (outcome.kind == host::PageFaultOutcome::kRetry) {
      guest_->GetRegs(vcpu, &regs);
      return regs.rip != rip_before;  // re-executed unless the tool moved RIP
    }
  }
  // The access happens (no restriction, CONTINUE, or the single step with relaxed access).
  uint64_t value = 0;
  if (access == KVMI_PAGE_ACCESS_W) {
    value = op.explicit_value ? op.value : rip_before;
    guest_->WritePhysical(gpa, &value, sizeof(value));
  } else {
    guest_->ReadPhysical(gpa, &value, sizeof(value));
    // PF custom input: reads entirely inside [ctx_addr, ctx_addr + ctx_size) come from ctx_data.
    if (outcome.ctx_size >= sizeof(value) && gva >= outcome.ctx_addr &&
        gva - outcome.ctx_addr <= outcome.ctx_size - sizeof(value)) {
      std::memcpy(&value, outcome.ctx_data.data() + (gva - outcome.ctx_addr), sizeof(value));
    }
    if (access == KVMI_PAGE_ACCESS_R) {
      guest_->GetRegs(vcpu, &regs);
      regs.rax = value;  // mov rax, [gva]
      guest_->SetRegs(vcpu, regs);
    }
  }
  result->value = value;
  guest_->GetRegs(vcpu, &regs);
  regs.rip = kTextGva + ((regs.rip - kTextGva + 4) % kTextSize);
  guest_->SetRegs(vcpu, regs);
  if (outcome.kind == host::PageFaultOutcome::kSingleStep) {
    // (code) RETRY + singlestep: the instruction ran with the page access relaxed for one step
    // (other vCPUs are not paused in the simulator); then the MTF exit reports SINGLESTEP.
    result->single_stepped = true;
    engine_->OnSingleStep(vcpu);
  }
  return true;
}

int SimVm::Detach(std::chrono::milliseconds grace) { return connector_->Detach(grace); }

}  // namespace kvmi::sim
