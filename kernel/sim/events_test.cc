// Every v6 event: raised only when enabled, carries the vCPU's state, and each reply action has
// its effect on the guest.
#include <future>

#include "kernel/sim/sim_test_util.h"

namespace kvmi::sim::testing {
namespace {

class EventsTest : public SimSessionTest {
 protected:
  void SetUp() override { StartVm(); }

  Op Cr3Write(uint64_t value) { return Op{OpKind::kWriteCr3, 0, value, true, 0}; }
  Op Read(uint64_t gpa) { return Op{OpKind::kRead, 0, 0, false, gpa}; }
  Op Write(uint64_t gpa, uint64_t value) { return Op{OpKind::kWrite, 0, value, true, gpa}; }
  void SetAccess(uint64_t gpa, uint8_t access) {
    SetPageAccessRequest req;
    req.entries.push_back(PageAccess{gpa, access});
    ASSERT_EQ(ToolConnection::ErrorOf(tool_->Call(req)), 0);
  }
  // The op must not finish while its vCPU waits for our reply.
  template <typename T>
  bool StillRunning(std::future<T>& f) {
    return f.wait_for(50ms) == std::future_status::timeout;
  }
};

TEST_F(EventsTest, CrEventNeedsBothControlEventsAndControlCr) {
  ASSERT_TRUE(vm_->Execute(0, Cr3Write(0x2000000)).get().executed);
  Enable(0, KVMI_EVENT_CR);
  ASSERT_TRUE(vm_->Execute(0, Cr3Write(0x2001000)).get().executed);  // CR3 not selected
  EXPECT_TRUE(tool_->ExpectSilence(50ms));
  EXPECT_EQ(vm_->guest().Snapshot(0).sregs.cr3, 0x2001000u);
  ASSERT_EQ(ToolConnection::ErrorOf(tool_->Call(ControlCrRequest{0, 3, true})), 0);
  // Writing the same value is not a change: no event.
  ASSERT_TRUE(vm_->Execute(0, Cr3Write(0x2001000)).get().executed);
  EXPECT_TRUE(tool_->ExpectSilence(50ms));
  // Another vCPU has its own selection.
  ASSERT_TRUE(vm_->Execute(1, Cr3Write(0x2005000)).get().executed);
  EXPECT_TRUE(tool_->ExpectSilence(50ms));
}

TEST_F(EventsTest, CrEventCarriesStateAndContinueAppliesTheReplyValue) {
  Enable(1, KVMI_EVENT_CR);
  ASSERT_EQ(ToolConnection::ErrorOf(tool_->Call(ControlCrRequest{1, 3, true})), 0);
  VcpuSnapshot before = vm_->guest().Snapshot(1);
  auto done = vm_->Execute(1, Cr3Write(0x2002000));
  auto event = tool_->WaitEvent();
  ASSERT_TRUE(event);
  EXPECT_EQ(event->id(), KVMI_EVENT_CR);
  EXPECT_EQ(event->vcpu(), 1);
  EXPECT_EQ(event->seq, 1u);
  EXPECT_EQ(event->specific.cr.cr, 3);
  EXPECT_EQ(event->specific.cr.old_value, before.sregs.cr3);
  EXPECT_EQ(event->specific.cr.new_value, 0x2002000u);
  EXPECT_EQ(event->common.arch.mode, 8);
  EXPECT_EQ(event->common.arch.regs.rip, before.regs.rip);
  EXPECT_EQ(event->common.arch.regs.rsp, before.regs.rsp);
  EXPECT_EQ(event->common.arch.sregs.cr0, before.sregs.cr0);
  EXPECT_EQ(event->common.arch.sregs.cs.l, 1);
  EXPECT_EQ(event->common.arch.msrs.lstar, before.msrs[kMsrLstar]);
  EXPECT_EQ(event->common.arch.msrs.sysenter_cs, before.msrs[kMsrSysenterCs]);
  EXPECT_EQ(event->common.arch.msrs.efer, before.sregs.efer);
  EXPECT_TRUE(StillRunning(done));  // blocked until the reply
  // While blocked the vCPU still serves commands.
  auto regs = tool_->Call(GetRegistersRequest{1, {kMsrStar}});
  ASSERT_EQ(ToolConnection::ErrorOf(regs), 0);
  EventReply reply = MakeEventReply(*event, KVMI_EVENT_ACTION_CONTINUE);
  reply.specific.cr.new_val = 0x2003000;
  ASSERT_TRUE(tool_->ReplyEvent(reply));
  OpResult result = done.get();
  EXPECT_FALSE(result.faulted);
  EXPECT_EQ(vm_->guest().Snapshot(1).sregs.cr3, 0x2003000u);
}

TEST_F(EventsTest, CrEventRetryMakesTheWriteFail) {
  Enable(0, KVMI_EVENT_CR);
  ASSERT_EQ(ToolConnection::ErrorOf(tool_->Call(ControlCrRequest{0, 0, true})), 0);
  uint64_t cr0 = vm_->guest().Snapshot(0).sregs.cr0;
  auto done = vm_->Execute(0, Op{OpKind::kWriteCr0});
  auto event = tool_->WaitEvent();
  ASSERT_TRUE(event);
  EXPECT_EQ(event->specific.cr.cr, 0);
  ASSERT_TRUE(tool_->ReplyEvent(MakeEventReply(*event, KVMI_EVENT_ACTION_RETRY)));
  EXPECT_TRUE(done.get().faulted);
  VcpuSnapshot after = vm_->guest().Snapshot(0);
  EXPECT_EQ(after.sregs.cr0, cr0);
  EXPECT_EQ(after.gp_faults, 1u);
}

TEST_F(EventsTest, ShortCrReplyZeroesTheNewValue) {
  Enable(0, KVMI_EVENT_CR);
  ASSERT_EQ(ToolConnection::ErrorOf(tool_->Call(ControlCrRequest{0, 4, true})), 0);
  auto done = vm_->Execute(0, Op{OpKind::kWriteCr4});
  auto event = tool_->WaitEvent();
  ASSERT_TRUE(event);
  EventReply reply = MakeEventReply(*event, KVMI_EVENT_ACTION_CONTINUE);
  reply.specific_size = 0;  // §6 "Caution": accepted, new_val reads as 0
  ASSERT_TRUE(tool_->ReplyEvent(reply));
  done.get();
  EXPECT_EQ(vm_->guest().Snapshot(0).sregs.cr4, 0u);
}

TEST_F(EventsTest, MsrEvent) {
  Enable(0, KVMI_EVENT_MSR);
  // Not selected: no event.
  ASSERT_TRUE(vm_->Execute(0, Op{OpKind::kWriteMsr, kMsrLstar, 0x1111, true}).get().executed);
  EXPECT_TRUE(tool_->ExpectSilence(50ms));
  ASSERT_EQ(ToolConnection::ErrorOf(tool_->Call(ControlMsrRequest{0, kMsrLstar, true})), 0);
  auto done = vm_->Execute(0, Op{OpKind::kWriteMsr, kMsrLstar, 0x2222, true});
  auto event = tool_->WaitEvent();
  ASSERT_TRUE(event);
  EXPECT_EQ(event->id(), KVMI_EVENT_MSR);
  EXPECT_EQ(event->specific.msr.msr, kMsrLstar);
  EXPECT_EQ(event->specific.msr.old_value, 0x1111u);
  EXPECT_EQ(event->specific.msr.new_value, 0x2222u);
  EventReply reply = MakeEventReply(*event, KVMI_EVENT_ACTION_CONTINUE);
  reply.specific.msr.new_val = 0x3333;
  ASSERT_TRUE(tool_->ReplyEvent(reply));
  done.get();
  EXPECT_EQ(vm_->guest().Snapshot(0).msrs[kMsrLstar], 0x3333u);
  // An unsupported action makes the WRMSR fail.
  auto refused = vm_->Execute(0, Op{OpKind::kWriteMsr, kMsrLstar, 0x4444, true});
  event = tool_->WaitEvent();
  ASSERT_TRUE(event);
  ASSERT_TRUE(tool_->ReplyEvent(MakeEventReply(*event, 7)));
  EXPECT_TRUE(refused.get().faulted);
  EXPECT_EQ(vm_->guest().Snapshot(0).msrs[kMsrLstar], 0x3333u);
}

TEST_F(EventsTest, XsetbvEvent) {
  ASSERT_TRUE(vm_->Execute(0, Op{OpKind::kXsetbv, 0, 0x3, true}).get().executed);
  EXPECT_TRUE(tool_->ExpectSilence(50ms));
  Enable(0, KVMI_EVENT_XSETBV);
  auto done = vm_->Execute(0, Op{OpKind::kXsetbv, 0, 0x7, true});
  auto event = tool_->WaitEvent();
  ASSERT_TRUE(event);
  EXPECT_EQ(event->id(), KVMI_EVENT_XSETBV);
  EXPECT_TRUE(StillRunning(done));
  ASSERT_TRUE(tool_->Continue(*event));
  done.get();
  EXPECT_EQ(vm_->guest().Snapshot(0).xcr0, 0x7u);
}

TEST_F(EventsTest, BreakpointContinueReinjectsAndRetryWithNewRipSkipsIt) {
  // Without the event the guest takes its own #BP.
  ASSERT_TRUE(vm_->Execute(0, Op{OpKind::kInt3}).get().executed);
  ASSERT_TRUE(vm_->Execute(0, Op{OpKind::kInterrupt, 0x30}).get().executed);  // next entry
  EXPECT_TRUE(tool_->ExpectSilence(50ms));
  Enable(0, KVMI_EVENT_BREAKPOINT);
  kvm_regs regs = vm_->guest().Snapshot(0).regs;
  auto done = vm_->Execute(0, Op{OpKind::kInt3});
  auto event = tool_->WaitEvent();
  ASSERT_TRUE(event);
  EXPECT_EQ(event->id(), KVMI_EVENT_BREAKPOINT);
  EXPECT_EQ(event->specific.breakpoint.gpa, kTextGpa + (regs.rip - kTextGva));
  EXPECT_EQ(event->specific.breakpoint.insn_len, 1);
  ASSERT_TRUE(tool_->Continue(*event));
  done.get();
  EXPECT_EQ(vm_->guest().Snapshot(0).regs.rip, regs.rip + 1);
  ASSERT_TRUE(vm_->Execute(0, Op{OpKind::kInterrupt, 0x31}).get().executed);
  auto delivered = vm_->guest().Snapshot(0).delivered;
  ASSERT_GE(delivered.size(), 1u);
  bool saw_bp = false;
  for (const auto& d : delivered)
    saw_bp |= d.vector == 3 && d.type == KVMI_TRAP_TYPE_SOFT_EXCEPTION;
  EXPECT_TRUE(saw_bp);
  // RETRY after moving RIP with SET_REGISTERS (applied after the reply): no #BP, new RIP.
  auto count_bp = [&] {
    size_t n = 0;
    for (const auto& d : vm_->guest().Snapshot(0).delivered) n += d.vector == 3 ? 1 : 0;
    return n;
  };
  size_t bp_before = count_bp();
  auto retried = vm_->Execute(0, Op{OpKind::kInt3});
  event = tool_->WaitEvent();
  ASSERT_TRUE(event);
  SetRegistersRequest set{0, event->common.arch.regs};
  set.regs.rip += 0x40;
  set.regs.rbx = 0xb0b;
  ASSERT_EQ(ToolConnection::ErrorOf(tool_->Call(set)), 0);
  EXPECT_EQ(vm_->guest().Snapshot(0).regs.rbx, regs.rbx);  // not yet: applied after the reply
  ASSERT_TRUE(tool_->ReplyEvent(MakeEventReply(*event, KVMI_EVENT_ACTION_RETRY)));
  OpResult r = retried.get();
  EXPECT_EQ(r.attempts, 1u);
  VcpuSnapshot after = vm_->guest().Snapshot(0);
  EXPECT_EQ(after.regs.rip, set.regs.rip);
  EXPECT_EQ(after.regs.rbx, 0xb0bu);
  EXPECT_EQ(after.regs.rflags & 2, 2u);
  ASSERT_TRUE(vm_->Execute(0, Op{OpKind::kInterrupt, 0x32}).get().executed);
  EXPECT_EQ(count_bp(), bp_before);
}

TEST_F(EventsTest, HypercallEventOnlyWhenEnabled) {
  OpResult r = vm_->Execute(0, Op{OpKind::kHypercall}).get();
  EXPECT_EQ(static_cast<int64_t>(r.value), -KVM_ENOSYS);
  EXPECT_TRUE(tool_->ExpectSilence(50ms));
  Enable(0, KVMI_EVENT_HYPERCALL);
  auto done = vm_->Execute(0, Op{OpKind::kHypercall});
  auto event = tool_->WaitEvent();
  ASSERT_TRUE(event);
  EXPECT_EQ(event->id(), KVMI_EVENT_HYPERCALL);
  EXPECT_EQ(event->common.arch.regs.rax, uint64_t{KVM_HC_XEN_HVM_OP});
  EXPECT_EQ(event->common.arch.regs.rdi, uint64_t{KVM_HC_XEN_HVM_OP_GUEST_REQUEST_VM_EVENT});
  ASSERT_TRUE(tool_->Continue(*event));
  EXPECT_EQ(done.get().value, 0u);
  EXPECT_EQ(vm_->guest().Snapshot(0).regs.rax, 0u);
}

TEST_F(EventsTest, PageFaultContinueEmulatesTheWrite) {
  SetAccess(0x200000, KVMI_PAGE_ACCESS_R | KVMI_PAGE_ACCESS_X);
  // PF not enabled: the access proceeds without an event.
  ASSERT_TRUE(vm_->Execute(0, Write(0x200010, 0x11)).get().executed);
  EXPECT_TRUE(tool_->ExpectSilence(50ms));
  Enable(0, KVMI_EVENT_PF);
  // Reads are still allowed: no event.
  ASSERT_TRUE(vm_->Execute(0, Read(0x200010)).get().executed);
  EXPECT_TRUE(tool_->ExpectSilence(50ms));
  auto done = vm_->Execute(0, Write(0x200018, 0xfeedface));
  auto event = tool_->WaitEvent();
  ASSERT_TRUE(event);
  EXPECT_EQ(event->id(), KVMI_EVENT_PF);
  EXPECT_EQ(event->specific.pf.gpa, 0x200018u);
  EXPECT_EQ(event->specific.pf.gva, kDirectMapGva + 0x200018);
  EXPECT_EQ(event->specific.pf.access, KVMI_PAGE_ACCESS_W);
  EXPECT_EQ(event->specific.pf.view, 0);
  ASSERT_TRUE(tool_->Continue(*event));
  done.get();
  auto read = tool_->Call(ReadPhysicalRequest{0x200018, 8});
  ASSERT_EQ(ToolConnection::ErrorOf(read), 0);
  uint64_t value;
  std::memcpy(&value, ToolConnection::DataOf(*read).data(), 8);
  EXPECT_EQ(value, 0xfeedfaceu);
}

TEST_F(EventsTest, PageFaultRetryReexecutesAndCustomInputIsHonoured) {
  Enable(0, KVMI_EVENT_PF);
  ASSERT_EQ(ToolConnection::ErrorOf(tool_->Call(
                WritePhysicalRequest{0x210000, 8, ByteView(Bytes{1, 2, 3, 4, 5, 6, 7, 8})})),
            0);
  SetAccess(0x210000, KVMI_PAGE_ACCESS_X);
  // RETRY after giving the access back: the read executes a second time and succeeds.
  auto done = vm_->Execute(0, Read(0x210000));
  auto event = tool_->WaitEvent();
  ASSERT_TRUE(event);
  EXPECT_EQ(event->specific.pf.access, KVMI_PAGE_ACCESS_R);
  SetAccess(0x210000, KVMI_PAGE_ACCESS_RWX);
  ASSERT_TRUE(tool_->ReplyEvent(MakeEventReply(*event, KVMI_EVENT_ACTION_RETRY)));
  OpResult r = done.get();
  EXPECT_EQ(r.attempts, 2u);
  EXPECT_EQ(r.value, 0x0807060504030201u);
  // CONTINUE with custom input: the read returns ctx_data, not memory.
  SetAccess(0x210000, KVMI_PAGE_ACCESS_X);
  auto custom = vm_->Execute(0, Read(0x210000));
  event = tool_->WaitEvent();
  ASSERT_TRUE(event);
  EventReply reply = MakeEventReply(*event, KVMI_EVENT_ACTION_CONTINUE);
  reply.specific.pf.ctx_addr = kDirectMapGva + 0x210000 - 8;
  reply.specific.pf.ctx_size = 16;
  uint64_t fake = 0x1122334455667788;
  std::memcpy(reply.specific.pf.ctx_data + 8, &fake, 8);
  ASSERT_TRUE(tool_->ReplyEvent(reply));
  EXPECT_EQ(custom.get().value, fake);
  EXPECT_EQ(vm_->guest().Snapshot(0).regs.rax, fake);
}

TEST_F(EventsTest, SingleStepAfterAPageFaultReply) {
  Enable(0, KVMI_EVENT_PF);
  Enable(0, KVMI_EVENT_SINGLESTEP);
  SetAccess(0x220000, KVMI_PAGE_ACCESS_R);
  auto done = vm_->Execute(0, Write(0x220000, 42));
  auto event = tool_->WaitEvent();
  ASSERT_TRUE(event);
  EventReply reply = MakeEventReply(*event, KVMI_EVENT_ACTION_RETRY);
  reply.specific.pf.singlestep = 1;  // (code) RETRY + singlestep starts the step
  ASSERT_TRUE(tool_->ReplyEvent(reply));
  auto step = tool_->WaitEvent();
  ASSERT_TRUE(step);
  EXPECT_EQ(step->id(), KVMI_EVENT_SINGLESTEP);
  EXPECT_EQ(step->seq, event->seq + 1);
  ASSERT_TRUE(tool_->Continue(*step));
  OpResult r = done.get();
  EXPECT_TRUE(r.single_stepped);
  EXPECT_EQ(r.attempts, 1u);
  EXPECT_EQ(vm_->engine().AllowedAccess(0x220000), KVMI_PAGE_ACCESS_R);  // restriction stays
}

TEST_F(EventsTest, TrapWhenTheInjectedExceptionCollides) {
  Enable(0, KVMI_EVENT_BREAKPOINT);
  Enable(0, KVMI_EVENT_TRAP);
  auto done = vm_->Execute(0, Op{OpKind::kInt3});
  auto bp = tool_->WaitEvent();
  ASSERT_TRUE(bp);
  // Ask for #UD while the guest is about to get its own #BP back.
  ASSERT_EQ(ToolConnection::ErrorOf(tool_->Call(InjectExceptionRequest{0, 6, false, 0, 0})), 0);
  ASSERT_TRUE(tool_->Continue(*bp));
  done.get();
  auto trap = tool_->WaitEvent();
  ASSERT_TRUE(trap);
  EXPECT_EQ(trap->id(), KVMI_EVENT_TRAP);
  EXPECT_EQ(trap->specific.trap.vector, 3u);
  EXPECT_EQ(trap->specific.trap.type, uint32_t{KVMI_TRAP_TYPE_SOFT_EXCEPTION});
  ASSERT_TRUE(tool_->Continue(*trap));
  ASSERT_TRUE(vm_->Execute(0, Op{OpKind::kRead, 0, 0, false, 0x200000}).get().executed);
  for (const auto& d : vm_->guest().Snapshot(0).delivered) EXPECT_FALSE(d.from_tool);
}

TEST_F(EventsTest, DescriptorEvent) {
  ASSERT_TRUE(vm_->Execute(0, Op{OpKind::kDescriptor, 0, 0xabc000, true}).get().executed);
  EXPECT_TRUE(tool_->ExpectSilence(50ms));
  EXPECT_EQ(vm_->guest().Snapshot(0).sregs.idt.base, 0xabc000u);
  Enable(0, KVMI_EVENT_DESCRIPTOR);
  auto done = vm_->Execute(0, Op{OpKind::kDescriptor, 2 /* LGDT */, 0xdef000, true});
  auto event = tool_->WaitEvent();
  ASSERT_TRUE(event);
  EXPECT_EQ(event->specific.descriptor.descriptor, KVMI_DESC_GDTR);
  EXPECT_EQ(event->specific.descriptor.write, 1);
  ASSERT_TRUE(tool_->Continue(*event));
  done.get();
  EXPECT_EQ(vm_->guest().Snapshot(0).sregs.gdt.base, 0xdef000u);
  // SIDT (a read of the table register); RETRY after moving RIP: not emulated.
  uint64_t gdt = vm_->guest().Snapshot(0).sregs.gdt.base;
  auto skipped = vm_->Execute(0, Op{OpKind::kDescriptor, 2, 0x123000, true});
  event = tool_->WaitEvent();
  ASSERT_TRUE(event);
  SetRegistersRequest set{0, event->common.arch.regs};
  set.regs.rip += 8;
  ASSERT_EQ(ToolConnection::ErrorOf(tool_->Call(set)), 0);
  ASSERT_TRUE(tool_->ReplyEvent(MakeEventReply(*event, KVMI_EVENT_ACTION_RETRY)));
  skipped.get();
  EXPECT_EQ(vm_->guest().Snapshot(0).sregs.gdt.base, gdt);
  auto store = vm_->Execute(0, Op{OpKind::kDescriptor, 1 /* SIDT */, 0, false, 0x230000});
  event = tool_->WaitEvent();
  ASSERT_TRUE(event);
  EXPECT_EQ(event->specific.descriptor.descriptor, KVMI_DESC_IDTR);
  EXPECT_EQ(event->specific.descriptor.write, 0);
  ASSERT_TRUE(tool_->Continue(*event));
  EXPECT_EQ(store.get().value, 0xabc000u);
}

TEST_F(EventsTest, CreateVcpuForAHotAddedVcpu) {
  ASSERT_EQ(
      ToolConnection::ErrorOf(tool_->Call(ControlVmEventsRequest{KVMI_EVENT_CREATE_VCPU, true})),
      0);
  int index = vm_->AddVcpu(/*start=*/false);
  ASSERT_EQ(index, 2);
  // Uninitialised: -KVM_EAGAIN; PAUSE_VCPU does not check (code).
  EXPECT_EQ(ToolConnection::ErrorOf(tool_->Call(GetVcpuInfoRequest{2})), -KVM_EAGAIN);
  auto info = tool_->Call(GetGuestInfoRequest{});
  GuestInfoReply guest;
  ASSERT_TRUE(DecodeReplyData(ToolConnection::DataOf(*info), &guest).ok());
  EXPECT_EQ(guest.vcpu_count, 3u);
  vm_->StartVcpu(2);
  auto event = tool_->WaitEvent();
  // The hook-time CREATE_VCPU jobs of vCPUs 0/1 are sent if the event is already enabled when
  // those vCPUs get to them (normally they are earlier: a race the kernel has too).
  while (event && event->vcpu() != 2) {
    EXPECT_EQ(event->id(), KVMI_EVENT_CREATE_VCPU);
    ASSERT_TRUE(tool_->Continue(*event));
    event = tool_->WaitEvent();
  }
  ASSERT_TRUE(event);
  EXPECT_EQ(event->id(), KVMI_EVENT_CREATE_VCPU);
  EXPECT_EQ(event->vcpu(), 2);
  ASSERT_TRUE(tool_->Continue(*event));
  EXPECT_EQ(ToolConnection::ErrorOf(tool_->Call(GetVcpuInfoRequest{2})), 0);
}

TEST_F(EventsTest, EventSeqIsSharedByAllVcpus) {
  Enable(0, KVMI_EVENT_XSETBV);
  Enable(1, KVMI_EVENT_XSETBV);
  auto a = vm_->Execute(0, Op{OpKind::kXsetbv, 0, 0x3, true});
  auto e1 = tool_->WaitEvent();
  ASSERT_TRUE(e1);
  auto b = vm_->Execute(1, Op{OpKind::kXsetbv, 0, 0x3, true});
  auto e2 = tool_->WaitEvent();
  ASSERT_TRUE(e2);
  EXPECT_EQ(e1->seq, 1u);
  EXPECT_EQ(e2->seq, 2u);
  // Two vCPUs have events outstanding at once; answer in the other order.
  ASSERT_TRUE(tool_->Continue(*e2));
  b.get();
  ASSERT_TRUE(tool_->Continue(*e1));
  a.get();
}

TEST_F(EventsTest, CrashKillsTheGuestAndEndsTheSession) {
  Enable(0, KVMI_EVENT_HYPERCALL);
  auto done = vm_->Execute(0, Op{OpKind::kHypercall});
  auto event = tool_->WaitEvent();
  ASSERT_TRUE(event);
  ASSERT_TRUE(tool_->ReplyEvent(MakeEventReply(*event, KVMI_EVENT_ACTION_CRASH)));
  done.get();
  EXPECT_TRUE(tool_->WaitClosed());
  EXPECT_TRUE(vm_->guest().crashed());
  EXPECT_FALSE(vm_->Execute(1, Op{OpKind::kRead}).get().executed);
}

TEST_F(EventsTest, SessionEndReleasesBlockedVcpusAndRestoresEverything) {
  Enable(0, KVMI_EVENT_CR);
  Enable(0, KVMI_EVENT_BREAKPOINT);
  ASSERT_EQ(ToolConnection::ErrorOf(tool_->Call(ControlCrRequest{0, 3, true})), 0);
  SetAccess(0x240000, KVMI_PAGE_ACCESS_R);
  auto done = vm_->Execute(0, Cr3Write(0x2004000));
  auto event = tool_->WaitEvent();
  ASSERT_TRUE(event);
  tool_->Close();           // the tool goes away with an event outstanding
  OpResult r = done.get();  // the vCPU continues as if CONTINUE had been received
  EXPECT_FALSE(r.faulted);
  EXPECT_EQ(vm_->guest().Snapshot(0).sregs.cr3, 0x2004000u);
  ASSERT_TRUE(vm_->WaitSessionsEnded(1, Clock::now() + 10s));
  EXPECT_EQ(vm_->engine().AllowedAccess(0x240000), KVMI_PAGE_ACCESS_RWX);
  EXPECT_FALSE(vm_->engine().EventEnabled(0, KVMI_EVENT_CR));
  EXPECT_FALSE(vm_->engine().CrInterceptEnabled(0, 3));
}

TEST_F(EventsTest, UnhookWhenTheVmDetaches) {
  ASSERT_EQ(ToolConnection::ErrorOf(tool_->Call(ControlVmEventsRequest{KVMI_EVENT_UNHOOK, true})),
            0);
  Enable(1, KVMI_EVENT_XSETBV);
  auto first = vm_->Execute(1, Op{OpKind::kXsetbv, 0, 0x3, true});
  auto xsetbv = tool_->WaitEvent();
  ASSERT_TRUE(xsetbv);
  ASSERT_TRUE(tool_->Continue(*xsetbv));
  first.get();
  auto detached = std::async(std::launch::async, [&] { return vm_->Detach(10s); });
  auto event = tool_->WaitEvent();
  ASSERT_TRUE(event);
  EXPECT_EQ(event->id(), KVMI_EVENT_UNHOOK);
  EXPECT_EQ(event->vcpu(), 0);
  EXPECT_EQ(event->seq, xsetbv->seq + 1);  // shares the VM's event counter
  EXPECT_EQ(event->common.arch.mode, 0);
  tool_->Close();  // the tool unhooks by closing
  EXPECT_EQ(detached.get(), 0);
  EXPECT_EQ(vm_->sessions_ended(), 1u);
}

}  // namespace
}  // namespace kvmi::sim::testing
