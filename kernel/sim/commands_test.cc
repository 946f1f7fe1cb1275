// Every v6 command id 2..27 against the ABI file: reply bytes (sizes, error codes) and the CLOSE
// cases, driven by a minimal tool over a real UNIX socket.
#include <cstring>

#include "kernel/sim/sim_test_util.h"

namespace kvmi::sim::testing {
namespace {

class CommandsTest : public SimSessionTest {
 protected:
  void SetUp() override { StartVm(); }
};

TEST_F(CommandsTest, HandshakeCarriesIdentity) {
  EXPECT_EQ(hello_.struct_size, 96u);
  EXPECT_EQ(hello_.name, "test-vm");
  EXPECT_EQ(hello_.uuid, vm_->config().uuid);
  EXPECT_GT(hello_.start_time, 0);
}

TEST_F(CommandsTest, GetVersionMatchesTheWorkedExample) {
  // §12: GET_VERSION seq 1.
  auto reply = Exchange(Msg(KVMI_GET_VERSION, 1, {}));
  ASSERT_TRUE(reply);
  Bytes expected = {0x02, 0x00, 0x10, 0x00, 0x01, 0, 0, 0, 0, 0, 0, 0,
                    0,    0,    0,    0,    0x01, 0, 0, 0, 0, 0, 0, 0};
  EXPECT_EQ(reply->wire, expected);
}

TEST_F(CommandsTest, SeqIsEchoedWhateverItIs) {
  auto reply = Exchange(Msg(KVMI_GET_VERSION, 0xdeadbeef, {}));
  ASSERT_TRUE(reply);
  EXPECT_EQ(reply->hdr.seq, 0xdeadbeefu);
}

TEST_F(CommandsTest, CheckCommandTestsOnlyTheAllowMask) {
  auto check = [&](uint16_t id, uint32_t padding2 = 0) {
    kvmi_check_command req{id, 0, padding2};
    return Exchange(Msg(KVMI_CHECK_COMMAND, 3, Cat(req)));
  };
  EXPECT_EQ(check(KVMI_GET_REGISTERS)->wire, ReplyBytes(KVMI_CHECK_COMMAND, 3, 0));
  // (code) CONTROL_VE is allowed by the mask although it has no handler.
  EXPECT_EQ(check(KVMI_CONTROL_VE)->wire, ReplyBytes(KVMI_CHECK_COMMAND, 3, 0));
  EXPECT_EQ(check(28)->wire, ReplyBytes(KVMI_CHECK_COMMAND, 3, -KVM_EPERM));
  EXPECT_EQ(check(KVMI_EVENT)->wire, ReplyBytes(KVMI_CHECK_COMMAND, 3, -KVM_EPERM));
  EXPECT_EQ(check(KVMI_GET_VERSION, 1)->wire, ReplyBytes(KVMI_CHECK_COMMAND, 3, -KVM_EINVAL));
}

TEST_F(CommandsTest, CheckEvent) {
  auto check = [&](uint16_t id, uint16_t padding1 = 0) {
    kvmi_check_event req{id, padding1, 0};
    return Exchange(Msg(KVMI_CHECK_EVENT, 4, Cat(req)))->wire;
  };
  EXPECT_EQ(check(KVMI_EVENT_PF), ReplyBytes(KVMI_CHECK_EVENT, 4, 0));
  EXPECT_EQ(check(KVMI_EVENT_SINGLESTEP), ReplyBytes(KVMI_CHECK_EVENT, 4, 0));
  EXPECT_EQ(check(KVMI_NUM_EVENTS), ReplyBytes(KVMI_CHECK_EVENT, 4, -KVM_EPERM));
  EXPECT_EQ(check(KVMI_EVENT_PF, 1), ReplyBytes(KVMI_CHECK_EVENT, 4, -KVM_EINVAL));
}

TEST_F(CommandsTest, GetGuestInfo) {
  kvmi_get_guest_info_reply data{};
  data.vcpu_count = 2;
  EXPECT_EQ(Exchange(Msg(KVMI_GET_GUEST_INFO, 5, {}))->wire,
            ReplyBytes(KVMI_GET_GUEST_INFO, 5, 0, Cat(data)));
  // (code) fixed-size requests are not length-checked: extra bytes are ignored.
  EXPECT_EQ(Exchange(Msg(KVMI_GET_GUEST_INFO, 6, Bytes(12, 0xee)))->wire,
            ReplyBytes(KVMI_GET_GUEST_INFO, 6, 0, Cat(data)));
}

TEST_F(CommandsTest, GetVcpuInfo) {
  kvmi_get_vcpu_info_reply data{2'500'000'000ull};
  EXPECT_EQ(Exchange(Msg(KVMI_GET_VCPU_INFO, 6, Cat(VcpuHdr(1))))->wire,
            ReplyBytes(KVMI_GET_VCPU_INFO, 6, 0, Cat(data)));
  EXPECT_EQ(Exchange(Msg(KVMI_GET_VCPU_INFO, 7, Cat(VcpuHdr(2))))->wire,
            ReplyBytes(KVMI_GET_VCPU_INFO, 7, -KVM_EINVAL));
  // (code) a short payload reads as zeros: vCPU 0.
  EXPECT_EQ(Exchange(Msg(KVMI_GET_VCPU_INFO, 8, {}))->wire,
            ReplyBytes(KVMI_GET_VCPU_INFO, 8, 0, Cat(data)));
}

TEST_F(CommandsTest, PauseVcpuRaisesOnePauseEventPerRequest) {
  kvmi_pause_vcpu pause{};
  ASSERT_TRUE(tool_->SendRaw(Msg(KVMI_PAUSE_VCPU, 7, Cat(VcpuHdr(1), pause))));
  EXPECT_EQ(tool_->WaitReply(KVMI_PAUSE_VCPU, 7)->wire, ReplyBytes(KVMI_PAUSE_VCPU, 7, 0));
  auto event = tool_->WaitEvent();
  ASSERT_TRUE(event);
  EXPECT_EQ(event->id(), KVMI_EVENT_PAUSE_VCPU);
  EXPECT_EQ(event->vcpu(), 1);
  EXPECT_EQ(event->seq, 1u);  // first event of the session
  ASSERT_TRUE(tool_->Continue(*event));
  EXPECT_TRUE(tool_->ExpectSilence(100ms));
}

TEST_F(CommandsTest, PauseVcpuReadsTheVcpuHeaderTwice) {
  // (code, §5.6) the documented second 8 bytes are ignored: non-zero "padding" there passes.
  kvmi_pause_vcpu pause{};
  pause.padding1 = 0xff;
  pause.padding3 = 0xffffffff;
  ASSERT_TRUE(tool_->SendRaw(Msg(KVMI_PAUSE_VCPU, 1, Cat(VcpuHdr(0), pause))));
  EXPECT_EQ(tool_->WaitReply(KVMI_PAUSE_VCPU, 1)->wire, ReplyBytes(KVMI_PAUSE_VCPU, 1, 0));
  auto event = tool_->WaitEvent();
  ASSERT_TRUE(event);
  ASSERT_TRUE(tool_->Continue(*event));
  // vCPU >= 256: its high byte is the overlaid padding1 -> -KVM_EINVAL (not the index check).
  EXPECT_EQ(Exchange(Msg(KVMI_PAUSE_VCPU, 2, Cat(VcpuHdr(0x100), kvmi_pause_vcpu{})))->wire,
            ReplyBytes(KVMI_PAUSE_VCPU, 2, -KVM_EINVAL));
  // Bad index: this handler replies -KVM_EINVAL (it checks the vcpu hdr itself).
  EXPECT_EQ(Exchange(Msg(KVMI_PAUSE_VCPU, 3, Cat(VcpuHdr(7), kvmi_pause_vcpu{})))->wire,
            ReplyBytes(KVMI_PAUSE_VCPU, 3, -KVM_EINVAL));
  // vcpu-hdr padding is a replied -KVM_EINVAL here, not the generic CLOSE.
  kvmi_vcpu_hdr bad = VcpuHdr(0);
  bad.padding2 = 1;
  EXPECT_EQ(Exchange(Msg(KVMI_PAUSE_VCPU, 4, Cat(bad, kvmi_pause_vcpu{})))->wire,
            ReplyBytes(KVMI_PAUSE_VCPU, 4, -KVM_EINVAL));
}

TEST_F(CommandsTest, PauseVcpuIsBusyAbove1001PendingRequests) {
  kvmi_pause_vcpu pause{};
  ASSERT_TRUE(tool_->SendRaw(Msg(KVMI_PAUSE_VCPU, 1, Cat(VcpuHdr(0), pause))));
  // The event may overtake the reply (vCPU and receive thread write independently, §7.4).
  ASSERT_EQ(ToolConnection::ErrorOf(tool_->WaitReply(KVMI_PAUSE_VCPU, 1)), 0);
  // Leave the first PAUSE event unanswered: the vCPU blocks and the counter only grows.
  auto first = tool_->WaitEvent();
  ASSERT_TRUE(first);
  Bytes batch;
  for (uint32_t i = 0; i < KVMI_MAX_PAUSE_REQUESTS + 2; ++i) {
    AppendTo(&batch, Msg(KVMI_PAUSE_VCPU, 100 + i, Cat(VcpuHdr(0), pause)));
  }
  ASSERT_TRUE(tool_->SendRaw(batch));
  for (uint32_t i = 0; i < KVMI_MAX_PAUSE_REQUESTS + 1; ++i) {
    auto reply = tool_->WaitReply(KVMI_PAUSE_VCPU, 100 + i);
    ASSERT_EQ(ToolConnection::ErrorOf(reply), 0) << i;
  }
  EXPECT_EQ(
      ToolConnection::ErrorOf(tool_->WaitReply(KVMI_PAUSE_VCPU, 100 + KVMI_MAX_PAUSE_REQUESTS + 1)),
      -KVM_EBUSY);
  EXPECT_EQ(vm_->engine().PendingPauses(0), KVMI_MAX_PAUSE_REQUESTS + 1u);
}

TEST_F(CommandsTest, ControlVmEvents) {
  auto control = [&](uint16_t id, uint8_t enable, uint8_t padding1 = 0) {
    kvmi_control_vm_events req{id, enable, padding1, 0};
    return Exchange(Msg(KVMI_CONTROL_VM_EVENTS, 8, Cat(req)))->wire;
  };
  EXPECT_EQ(control(KVMI_EVENT_UNHOOK, 1), ReplyBytes(KVMI_CONTROL_VM_EVENTS, 8, 0));
  EXPECT_EQ(control(KVMI_EVENT_CREATE_VCPU, 1), ReplyBytes(KVMI_CONTROL_VM_EVENTS, 8, 0));
  EXPECT_EQ(control(KVMI_EVENT_CREATE_VCPU, 0), ReplyBytes(KVMI_CONTROL_VM_EVENTS, 8, 0));
  EXPECT_EQ(control(KVMI_EVENT_CR, 1), ReplyBytes(KVMI_CONTROL_VM_EVENTS, 8, -KVM_EINVAL));
  EXPECT_EQ(control(KVMI_EVENT_UNHOOK, 1, 1), ReplyBytes(KVMI_CONTROL_VM_EVENTS, 8, -KVM_EINVAL));
}

TEST_F(CommandsTest, ControlEvents) {
  auto control = [&](uint16_t vcpu, uint16_t id, uint32_t padding2 = 0) {
    kvmi_control_events req{id, 1, 0, padding2};
    return Exchange(Msg(KVMI_CONTROL_EVENTS, 9, Cat(VcpuHdr(vcpu), req)))->wire;
  };
  // §12 worked example: CONTROL_EVENTS vCPU 0 enable PF, seq 9.
  EXPECT_EQ(Msg(KVMI_CONTROL_EVENTS, 9, Cat(VcpuHdr(0), kvmi_control_events{6, 1, 0, 0})),
            (Bytes{0x09, 0, 0x10, 0, 0x09, 0, 0,    0, 0, 0, 0, 0,
                   0,    0, 0,    0, 0x06, 0, 0x01, 0, 0, 0, 0, 0}));
  EXPECT_EQ(control(0, KVMI_EVENT_PF), ReplyBytes(KVMI_CONTROL_EVENTS, 9, 0));
  EXPECT_TRUE(vm_->engine().EventEnabled(0, KVMI_EVENT_PF));
  EXPECT_FALSE(vm_->engine().EventEnabled(1, KVMI_EVENT_PF));  // per vCPU
  EXPECT_EQ(control(1, KVMI_EVENT_PAUSE_VCPU), ReplyBytes(KVMI_CONTROL_EVENTS, 9, 0));
  EXPECT_EQ(control(0, KVMI_EVENT_UNHOOK), ReplyBytes(KVMI_CONTROL_EVENTS, 9, -KVM_EINVAL));
  EXPECT_EQ(control(0, KVMI_EVENT_CREATE_VCPU), ReplyBytes(KVMI_CONTROL_EVENTS, 9, -KVM_EINVAL));
  EXPECT_EQ(control(0, KVMI_NUM_EVENTS), ReplyBytes(KVMI_CONTROL_EVENTS, 9, -KVM_EINVAL));
  EXPECT_EQ(control(0, KVMI_EVENT_CR, 5), ReplyBytes(KVMI_CONTROL_EVENTS, 9, -KVM_EINVAL));
  EXPECT_EQ(control(9, KVMI_EVENT_CR), ReplyBytes(KVMI_CONTROL_EVENTS, 9, -KVM_EINVAL));
}

TEST_F(CommandsTest, ControlCr) {
  auto control = [&](uint32_t cr, uint8_t padding1 = 0) {
    kvmi_control_cr req{1, padding1, 0, cr};
    return Exchange(Msg(KVMI_CONTROL_CR, 10, Cat(VcpuHdr(1), req)))->wire;
  };
  for (uint32_t cr : {0u, 3u, 4u}) EXPECT_EQ(control(cr), ReplyBytes(KVMI_CONTROL_CR, 10, 0));
  EXPECT_TRUE(vm_->engine().CrInterceptEnabled(1, 3));
  EXPECT_EQ(control(2), ReplyBytes(KVMI_CONTROL_CR, 10, -KVM_EINVAL));
  EXPECT_EQ(control(8), ReplyBytes(KVMI_CONTROL_CR, 10, -KVM_EINVAL));
  EXPECT_EQ(control(3, 1), ReplyBytes(KVMI_CONTROL_CR, 10, -KVM_EINVAL));
}

TEST_F(CommandsTest, ControlMsr) {
  auto control = [&](uint32_t msr, uint8_t enable = 1) {
    kvmi_control_msr req{enable, 0, 0, msr};
    return Exchange(Msg(KVMI_CONTROL_MSR, 11, Cat(VcpuHdr(0), req)))->wire;
  };
  for (uint32_t msr : {0x0u, 0x1fffu, 0xc0000000u, 0xc0001fffu}) {
    EXPECT_EQ(control(msr), ReplyBytes(KVMI_CONTROL_MSR, 11, 0)) << msr;
  }
  EXPECT_TRUE(vm_->engine().MsrInterceptEnabled(0, 0xc0000000u));
  EXPECT_EQ(control(0xc0000000u, 0), ReplyBytes(KVMI_CONTROL_MSR, 11, 0));
  EXPECT_FALSE(vm_->engine().MsrInterceptEnabled(0, 0xc0000000u));
  for (uint32_t msr : {0x2000u, 0xbfffffffu, 0xc0002000u}) {
    EXPECT_EQ(control(msr), ReplyBytes(KVMI_CONTROL_MSR, 11, -KVM_EINVAL)) << msr;
  }
}

TEST_F(CommandsTest, ControlVeIsUnsupportedAndItsPayloadDiscarded) {
  // §12: unsupported id 12, seq 7.
  auto reply = Exchange(Msg(KVMI_CONTROL_VE, 7, Bytes(40, 0xab)));
  ASSERT_TRUE(reply);
  EXPECT_EQ(reply->wire,
            (Bytes{0x0c, 0, 0x08, 0, 0x07, 0, 0, 0, 0xa1, 0xff, 0xff, 0xff, 0, 0, 0, 0}));
  // The stream is still in sync.
  EXPECT_EQ(ToolConnection::ErrorOf(tool_->Call(GetVersionRequest{})), 0);
}

TEST_F(CommandsTest, UnknownIdsGetEopnotsupp) {
  for (uint16_t id : {uint16_t{KVMI_EVENT}, uint16_t{28}, uint16_t{29}, uint16_t{0xffff}}) {
    EXPECT_EQ(Exchange(Msg(id, 77, Bytes(3, 1)))->wire, ReplyBytes(id, 77, -KVM_EOPNOTSUPP));
  }
}

TEST_F(CommandsTest, GetRegisters) {
  kvmi_get_registers req{2, 0, 0};
  uint32_t msrs[2] = {kMsrLstar, kMsrEfer};
  auto reply = Exchange(Msg(KVMI_GET_REGISTERS, 13, Cat(VcpuHdr(1), req, msrs)));
  ASSERT_TRUE(reply);
  VcpuSnapshot snap = vm_->guest().Snapshot(1);
  kvmi_get_registers_reply data{};
  data.mode = 8;
  data.regs = snap.regs;
  data.sregs = snap.sregs;
  data.msrs.nmsrs = 2;
  kvm_msr_entry e1{}, e2{};
  e1.index = kMsrLstar;
  e1.data = snap.msrs[kMsrLstar];
  e2.index = kMsrEfer;
  e2.data = snap.sregs.efer;
  EXPECT_EQ(reply->wire, ReplyBytes(KVMI_GET_REGISTERS, 13, 0, Cat(data, e1, e2)));
  EXPECT_EQ(reply->hdr.size, 8 + 472 + 32);
}

TEST_F(CommandsTest, GetRegistersErrors) {
  auto get = [&](uint16_t n, const std::vector<uint32_t>& msrs, uint16_t padding1 = 0) {
    kvmi_get_registers req{n, padding1, 0};
    Bytes payload = Cat(VcpuHdr(0), req);
    for (uint32_t m : msrs) AppendTo(&payload, m);
    return ToolConnection::ErrorOf(Exchange(Msg(KVMI_GET_REGISTERS, 13, payload)));
  };
  EXPECT_EQ(get(0, {}), 0);
  EXPECT_EQ(get(3, {kMsrLstar, kMsrStar}), -KVM_EINVAL);  // hdr.size < 8 + 8 + 4n
  EXPECT_EQ(get(1, {0x1234}), -KVM_EINVAL);               // MSR read failure
  EXPECT_EQ(get(0, {}, 1), -KVM_EINVAL);                  // padding
  EXPECT_EQ(get(226, std::vector<uint32_t>(226, kMsrLstar)), 0);
  EXPECT_EQ(get(227, std::vector<uint32_t>(227, kMsrLstar)), -KVM_ENOMEM);  // > 4096 bytes
}

TEST_F(CommandsTest, SetRegistersOutsideAnEventIsAnsweredButDropped) {
  kvm_regs before = vm_->guest().Snapshot(0).regs;
  kvm_regs regs = before;
  regs.rax = 0x1234567;
  EXPECT_EQ(Exchange(Msg(KVMI_SET_REGISTERS, 14, Cat(VcpuHdr(0), regs)))->wire,
            ReplyBytes(KVMI_SET_REGISTERS, 14, 0));
  EXPECT_EQ(vm_->guest().Snapshot(0).regs.rax, before.rax);
}

TEST_F(CommandsTest, GetCpuid) {
  kvmi_get_cpuid req{0, 0};
  kvmi_get_cpuid_reply data{0xd, 0x756e6547, 0x6c65746e, 0x49656e69};
  EXPECT_EQ(Exchange(Msg(KVMI_GET_CPUID, 15, Cat(VcpuHdr(0), req)))->wire,
            ReplyBytes(KVMI_GET_CPUID, 15, 0, Cat(data)));
  kvmi_get_cpuid missing{0x4fffffff, 0};
  EXPECT_EQ(Exchange(Msg(KVMI_GET_CPUID, 16, Cat(VcpuHdr(0), missing)))->wire,
            ReplyBytes(KVMI_GET_CPUID, 16, -KVM_ENOENT));
}

TEST_F(CommandsTest, GetXsave) {
  auto reply = Exchange(Msg(KVMI_GET_XSAVE, 16, Cat(VcpuHdr(1))));
  ASSERT_TRUE(reply);
  std::vector<uint8_t> region;
  vm_->guest().GetXsave(1, &region);
  ASSERT_EQ(region.size(), 4096u);
  EXPECT_EQ(reply->hdr.size, 4104);  // the largest kernel->tool payload
  EXPECT_EQ(reply->wire, ReplyBytes(KVMI_GET_XSAVE, 16, 0, region));
}

TEST_F(CommandsTest, WriteThenReadPhysical) {
  Bytes data(KVMI_PAGE_SIZE - 24);  // 4072: the most one v6 message can carry
  for (size_t i = 0; i < data.size(); ++i) data[i] = static_cast<uint8_t>(i * 13 + 1);
  kvmi_write_physical w{0x500000 + 24, data.size()};
  Bytes write = Msg(KVMI_WRITE_PHYSICAL, 18, Cat(w, data));
  EXPECT_EQ(write.size() - 8, 4088u);
  EXPECT_EQ(Exchange(write)->wire, ReplyBytes(KVMI_WRITE_PHYSICAL, 18, 0));
  kvmi_read_physical r{0x500000, 4096};
  auto reply = Exchange(Msg(KVMI_READ_PHYSICAL, 17, Cat(r)));
  Bytes expected = Cat(Bytes(24, 0), data);
  EXPECT_EQ(reply->wire, ReplyBytes(KVMI_READ_PHYSICAL, 17, 0, expected));
  EXPECT_EQ(reply->hdr.size, 4104);
  // Outside guest RAM: -KVM_EINVAL.
  kvmi_read_physical far{1ull << 40, 8};
  EXPECT_EQ(Exchange(Msg(KVMI_READ_PHYSICAL, 19, Cat(far)))->wire,
            ReplyBytes(KVMI_READ_PHYSICAL, 19, -KVM_EINVAL));
  kvmi_write_physical wfar{1ull << 40, 1};
  EXPECT_EQ(Exchange(Msg(KVMI_WRITE_PHYSICAL, 20, Cat(wfar, Bytes{1})))->wire,
            ReplyBytes(KVMI_WRITE_PHYSICAL, 20, -KVM_EINVAL));
}

TEST_F(CommandsTest, ReadPhysicalOfZeroBytesCloses) {
  kvmi_read_physical r{0x500000, 0};
  ASSERT_TRUE(tool_->SendRaw(Msg(KVMI_READ_PHYSICAL, 1, Cat(r))));
  ExpectSessionClosed();
}

TEST_F(CommandsTest, ReadPhysicalAcrossAPageCloses) {
  kvmi_read_physical r{0x500ff8, 16};
  ASSERT_TRUE(tool_->SendRaw(Msg(KVMI_READ_PHYSICAL, 1, Cat(r))));
  ExpectSessionClosed();
}

TEST_F(CommandsTest, WritePhysicalShorterThanItsSizeCloses) {
  kvmi_write_physical w{0x500000, 64};
  ASSERT_TRUE(tool_->SendRaw(Msg(KVMI_WRITE_PHYSICAL, 1, Cat(w, Bytes(32, 1)))));
  ExpectSessionClosed();
}

TEST_F(CommandsTest, InjectException) {
  kvmi_inject_exception req{14, 1, 0, 2, 0xdead000};
  EXPECT_EQ(Exchange(Msg(KVMI_INJECT_EXCEPTION, 19, Cat(VcpuHdr(0), req)))->wire,
            ReplyBytes(KVMI_INJECT_EXCEPTION, 19, 0));
  kvmi_inject_exception bad{14, 1, 1, 2, 0};
  EXPECT_EQ(Exchange(Msg(KVMI_INJECT_EXCEPTION, 20, Cat(VcpuHdr(0), bad)))->wire,
            ReplyBytes(KVMI_INJECT_EXCEPTION, 20, -KVM_EINVAL));
  // Delivered at the next guest entry: #PF with CR2 = address.
  ASSERT_TRUE(vm_->Execute(0, Op{OpKind::kRead, 0, 0, false, 0x200000}).get().executed);
  VcpuSnapshot snap = vm_->guest().Snapshot(0);
  ASSERT_FALSE(snap.delivered.empty());
  EXPECT_EQ(snap.delivered.back().vector, 14u);
  EXPECT_TRUE(snap.delivered.back().from_tool);
  EXPECT_EQ(snap.delivered.back().error_code, 2u);
  EXPECT_EQ(snap.sregs.cr2, 0xdead000u);
}

TEST_F(CommandsTest, GetAndSetPageAccess) {
  auto get = [&](uint16_t view, const std::vector<uint64_t>& gpas, uint32_t seq) {
    kvmi_get_page_access req{view, static_cast<uint16_t>(gpas.size()), 0};
    Bytes payload = Cat(req);
    for (uint64_t g : gpas) AppendTo(&payload, g);
    return Exchange(Msg(KVMI_GET_PAGE_ACCESS, seq, payload))->wire;
  };
  EXPECT_EQ(get(0, {0x200000, 0x201000}, 1), ReplyBytes(KVMI_GET_PAGE_ACCESS, 1, 0, Bytes{7, 7}));
  kvmi_set_page_access set{0, 2, 0};
  kvmi_page_access_entry e1{}, e2{};
  e1.gpa = 0x200123;  // any address inside the page
  e1.access = KVMI_PAGE_ACCESS_R;
  e2.gpa = 0x201000;
  e2.access = KVMI_PAGE_ACCESS_R | KVMI_PAGE_ACCESS_X;
  EXPECT_EQ(Exchange(Msg(KVMI_SET_PAGE_ACCESS, 2, Cat(set, e1, e2)))->wire,
            ReplyBytes(KVMI_SET_PAGE_ACCESS, 2, 0));
  EXPECT_EQ(get(0, {0x200000, 0x201fff, 0x202000}, 3),
            ReplyBytes(KVMI_GET_PAGE_ACCESS, 3, 0, Bytes{1, 5, 7}));
  EXPECT_EQ(get(1, {0x200000}, 4), ReplyBytes(KVMI_GET_PAGE_ACCESS, 4, -KVM_EOPNOTSUPP));
  // count says 2, one gpa present: -KVM_EINVAL.
  kvmi_get_page_access short_req{0, 2, 0};
  EXPECT_EQ(Exchange(Msg(KVMI_GET_PAGE_ACCESS, 5, Cat(short_req, uint64_t{0x200000})))->wire,
            ReplyBytes(KVMI_GET_PAGE_ACCESS, 5, -KVM_EINVAL));
  // Setting rwx forgets the page.
  e1.access = KVMI_PAGE_ACCESS_RWX;
  set.count = 1;
  EXPECT_EQ(Exchange(Msg(KVMI_SET_PAGE_ACCESS, 6, Cat(set, e1)))->wire,
            ReplyBytes(KVMI_SET_PAGE_ACCESS, 6, 0));
  EXPECT_EQ(get(0, {0x200000}, 7), ReplyBytes(KVMI_GET_PAGE_ACCESS, 7, 0, Bytes{7}));
}

TEST_F(CommandsTest, SetPageAccessReportsTheLastEntry) {
  kvmi_set_page_access set{0, 2, 0};
  kvmi_page_access_entry good{}, bad_bits{}, bad_padding{};
  good.gpa = 0x300000;
  good.access = KVMI_PAGE_ACCESS_R;
  bad_bits.gpa = 0x301000;
  bad_bits.access = 0x8;
  bad_padding.gpa = 0x302000;
  bad_padding.padding3 = 1;
  // (code) a bad entry first, a good one last: 0, and the good one is applied.
  EXPECT_EQ(Exchange(Msg(KVMI_SET_PAGE_ACCESS, 1, Cat(set, bad_bits, good)))->wire,
            ReplyBytes(KVMI_SET_PAGE_ACCESS, 1, 0));
  EXPECT_EQ(vm_->engine().AllowedAccess(0x300000), KVMI_PAGE_ACCESS_R);
  // Good first, bad last: -KVM_EINVAL, and the good one is still applied.
  good.gpa = 0x303000;
  EXPECT_EQ(Exchange(Msg(KVMI_SET_PAGE_ACCESS, 2, Cat(set, good, bad_padding)))->wire,
            ReplyBytes(KVMI_SET_PAGE_ACCESS, 2, -KVM_EINVAL));
  EXPECT_EQ(vm_->engine().AllowedAccess(0x303000), KVMI_PAGE_ACCESS_R);
  // Outside guest RAM.
  kvmi_page_access_entry far{};
  far.gpa = 1ull << 40;
  set.count = 1;
  EXPECT_EQ(Exchange(Msg(KVMI_SET_PAGE_ACCESS, 3, Cat(set, far)))->wire,
            ReplyBytes(KVMI_SET_PAGE_ACCESS, 3, -KVM_EINVAL));
  kvmi_set_page_access view1{1, 1, 0};
  EXPECT_EQ(Exchange(Msg(KVMI_SET_PAGE_ACCESS, 4, Cat(view1, good)))->wire,
            ReplyBytes(KVMI_SET_PAGE_ACCESS, 4, -KVM_EOPNOTSUPP));
  kvmi_set_page_access padded{0, 1, 9};
  EXPECT_EQ(Exchange(Msg(KVMI_SET_PAGE_ACCESS, 5, Cat(padded, good)))->wire,
            ReplyBytes(KVMI_SET_PAGE_ACCESS, 5, -KVM_EINVAL));
}

TEST_F(CommandsTest, GetMapTokenAllowsEightOutstanding) {
  Bytes first;
  for (int i = 0; i < KVMI_MEM_MAX_TOKENS; ++i) {
    auto reply = Exchange(Msg(KVMI_GET_MAP_TOKEN, 22, {}));
    ASSERT_EQ(ToolConnection::ErrorOf(reply), 0);
    EXPECT_EQ(reply->hdr.size, 40);
    Bytes token = ToolConnection::DataOf(*reply).ToVector();
    EXPECT_NE(token, first);
    first = token;
  }
  EXPECT_EQ(Exchange(Msg(KVMI_GET_MAP_TOKEN, 23, {}))->wire,
            ReplyBytes(KVMI_GET_MAP_TOKEN, 23, -KVM_EAGAIN));
}

TEST_F(CommandsTest, GetMtrrType) {
  kvmi_get_mtrr_type_reply wb{};
  wb.type = 6;
  kvmi_get_mtrr_type_reply uc{};
  EXPECT_EQ(Exchange(Msg(KVMI_GET_MTRR_TYPE, 23, Cat(VcpuHdr(0), uint64_t{0x200000})))->wire,
            ReplyBytes(KVMI_GET_MTRR_TYPE, 23, 0, Cat(wb)));
  EXPECT_EQ(Exchange(Msg(KVMI_GET_MTRR_TYPE, 24, Cat(VcpuHdr(0), uint64_t{0xa0000})))->wire,
            ReplyBytes(KVMI_GET_MTRR_TYPE, 24, 0, Cat(uc)));
}

TEST_F(CommandsTest, SppCommands) {
  auto get_bitmap = [&](uint32_t seq, uint64_t gpa) {
    kvmi_get_page_write_bitmap req{0, 1, 0};
    return Exchange(Msg(KVMI_GET_PAGE_WRITE_BITMAP, seq, Cat(req, gpa)))->wire;
  };
  kvmi_set_page_write_bitmap set{0, 1, 0};
  kvmi_page_write_bitmap_entry entry{0x400000, 0x1, 0};
  // Before CONTROL_SPP: -KVM_EOPNOTSUPP.
  EXPECT_EQ(get_bitmap(1, 0x400000), ReplyBytes(KVMI_GET_PAGE_WRITE_BITMAP, 1, -KVM_EOPNOTSUPP));
  EXPECT_EQ(Exchange(Msg(KVMI_SET_PAGE_WRITE_BITMAP, 2, Cat(set, entry)))->wire,
            ReplyBytes(KVMI_SET_PAGE_WRITE_BITMAP, 2, -KVM_EOPNOTSUPP));
  kvmi_control_spp off{0, 0, 0, 0}, on{1, 0, 0, 0}, padded{1, 1, 0, 0};
  EXPECT_EQ(Exchange(Msg(KVMI_CONTROL_SPP, 3, Cat(off)))->wire,
            ReplyBytes(KVMI_CONTROL_SPP, 3, -KVM_EOPNOTSUPP));
  EXPECT_EQ(Exchange(Msg(KVMI_CONTROL_SPP, 4, Cat(padded)))->wire,
            ReplyBytes(KVMI_CONTROL_SPP, 4, -KVM_EINVAL));
  EXPECT_EQ(Exchange(Msg(KVMI_CONTROL_SPP, 5, Cat(on)))->wire, ReplyBytes(KVMI_CONTROL_SPP, 5, 0));
  EXPECT_EQ(get_bitmap(6, 0x400000), ReplyBytes(KVMI_GET_PAGE_WRITE_BITMAP, 6, 0, Cat(0u)));
  // (code) entry padding is not checked by SET_PAGE_WRITE_BITMAP.
  entry.padding = 0x77;
  EXPECT_EQ(Exchange(Msg(KVMI_SET_PAGE_WRITE_BITMAP, 7, Cat(set, entry)))->wire,
            ReplyBytes(KVMI_SET_PAGE_WRITE_BITMAP, 7, 0));
  EXPECT_EQ(get_bitmap(8, 0x400abc), ReplyBytes(KVMI_GET_PAGE_WRITE_BITMAP, 8, 0, Cat(1u)));
  // A partial bitmap write-protects the page except sub-page 0.
  EXPECT_EQ(vm_->engine().AllowedAccess(0x400000), KVMI_PAGE_ACCESS_R | KVMI_PAGE_ACCESS_X);
  EXPECT_TRUE(vm_->engine().AccessAllowed(0x400000 + 64, KVMI_PAGE_ACCESS_W));
  EXPECT_FALSE(vm_->engine().AccessAllowed(0x400000 + 128, KVMI_PAGE_ACCESS_W));
  // All ones: fully writable again.
  kvmi_page_write_bitmap_entry all{0x400000, 0xffffffffu, 0};
  EXPECT_EQ(Exchange(Msg(KVMI_SET_PAGE_WRITE_BITMAP, 9, Cat(set, all)))->wire,
            ReplyBytes(KVMI_SET_PAGE_WRITE_BITMAP, 9, 0));
  EXPECT_EQ(vm_->engine().AllowedAccess(0x400000), KVMI_PAGE_ACCESS_RWX);
  // Stops at the first error (a gpa outside RAM).
  kvmi_set_page_write_bitmap two{0, 2, 0};
  kvmi_page_write_bitmap_entry far{1ull << 40, 0, 0}, later{0x401000, 0, 0};
  EXPECT_EQ(Exchange(Msg(KVMI_SET_PAGE_WRITE_BITMAP, 10, Cat(two, far, later)))->wire,
            ReplyBytes(KVMI_SET_PAGE_WRITE_BITMAP, 10, -KVM_EINVAL));
  EXPECT_EQ(vm_->engine().AllowedAccess(0x401000), KVMI_PAGE_ACCESS_RWX);
  kvmi_get_page_write_bitmap view1{1, 1, 0};
  EXPECT_EQ(Exchange(Msg(KVMI_GET_PAGE_WRITE_BITMAP, 11, Cat(view1, uint64_t{0})))->wire,
            ReplyBytes(KVMI_GET_PAGE_WRITE_BITMAP, 11, -KVM_EOPNOTSUPP));
}

TEST_F(CommandsTest, ControlCmdResponseSuppressesReplies) {
  kvmi_control_cmd_response off_now{0, 1, 0, 0};
  ASSERT_TRUE(tool_->SendRaw(Msg(KVMI_CONTROL_CMD_RESPONSE, 1, Cat(off_now))));
  // A command without reply data, and a failing one: nothing comes back.
  kvmi_check_event check{KVMI_EVENT_CR, 0, 0};
  // (A vCPU command's reply is decided when it is received too: see
  // BatchedEventReplyWithSetRegistersGetsNoStrayReply.)
  kvmi_control_vm_events bad_event{KVMI_EVENT_CR, 1, 0, 0};
  ASSERT_TRUE(tool_->SendRaw(Msg(KVMI_CHECK_EVENT, 2, Cat(check))));
  ASSERT_TRUE(tool_->SendRaw(Msg(KVMI_CONTROL_VM_EVENTS, 3, Cat(bad_event))));
  // Unsupported ids are still answered.
  EXPECT_EQ(Exchange(Msg(KVMI_CONTROL_VE, 4, {}))->wire,
            ReplyBytes(KVMI_CONTROL_VE, 4, -KVM_EOPNOTSUPP));
  // now = 0: answered under the old state (off), so no reply; on from the next command.
  kvmi_control_cmd_response on_later{1, 0, 0, 0};
  ASSERT_TRUE(tool_->SendRaw(Msg(KVMI_CONTROL_CMD_RESPONSE, 5, Cat(on_later))));
  EXPECT_EQ(Exchange(Msg(KVMI_CHECK_EVENT, 6, Cat(check)))->wire,
            ReplyBytes(KVMI_CHECK_EVENT, 6, 0));
  // enable = 1, now = 1 while on: answered.
  kvmi_control_cmd_response on_now{1, 1, 0, 0};
  EXPECT_EQ(Exchange(Msg(KVMI_CONTROL_CMD_RESPONSE, 7, Cat(on_now)))->wire,
            ReplyBytes(KVMI_CONTROL_CMD_RESPONSE, 7, 0));
  // enable = 0, now = 0: this one is still answered.
  kvmi_control_cmd_response off_later{0, 0, 0, 0};
  EXPECT_EQ(Exchange(Msg(KVMI_CONTROL_CMD_RESPONSE, 8, Cat(off_later)))->wire,
            ReplyBytes(KVMI_CONTROL_CMD_RESPONSE, 8, 0));
  // now = 2 is not "1": treated as later.
  kvmi_control_cmd_response on_two{1, 2, 0, 0};
  ASSERT_TRUE(tool_->SendRaw(Msg(KVMI_CONTROL_CMD_RESPONSE, 9, Cat(on_two))));
  EXPECT_EQ(Exchange(Msg(KVMI_GET_VERSION, 10, {}))->hdr.seq, 10u);
}

TEST_F(CommandsTest, BatchBuilderGetsOnlyTheClosingReply) {
  std::vector<uint8_t> batch;
  BatchBuilder builder(&batch, 100);
  builder.Add(ControlCrRequest{0, 3, true}, 101);
  builder.Add(CheckEventRequest{KVMI_EVENT_PF}, 102);
  builder.Close(103);
  ASSERT_TRUE(tool_->SendRaw(batch));
  auto reply = tool_->ReadMessage(10s);
  ASSERT_TRUE(reply);
  EXPECT_EQ(reply->wire, ReplyBytes(KVMI_CONTROL_CMD_RESPONSE, 103, 0));
  // CONTROL_CR ran on vCPU 0's thread; a later command to that vCPU is ordered after it.
  ASSERT_EQ(ToolConnection::ErrorOf(tool_->Call(GetVcpuInfoRequest{0})), 0);
  EXPECT_TRUE(vm_->engine().CrInterceptEnabled(0, 3));
}

// Issue 13: the standard batched event reply of a third-party client, which waits for no reply
// at all: CMD_RESPONSE(enable=0, now=1), SET_REGISTERS, EVENT_REPLY, CMD_RESPONSE(enable=1,
// now=0) in one write, while the vCPU waits in an event. Whether SET_REGISTERS is answered is
// decided when the receive thread accepts it (replies off), not when the vCPU thread runs it
// (by then the receive thread may have turned replies back on): no reply may ever appear.
TEST_F(CommandsTest, BatchedEventReplyWithSetRegistersGetsNoStrayReply) {
  constexpr int kIterations = 1000;
  Enable(0, KVMI_EVENT_XSETBV);
  uint32_t seq = 1000;
  for (int i = 0; i < kIterations; ++i) {
    auto done = vm_->Execute(0, Op{OpKind::kXsetbv});  // toggles XCR0.AVX: always an event
    // The next message must be the event: a stray reply to the previous batch would be here.
    std::optional<RawMessage> message = tool_->ReadMessage(10s);
    ASSERT_TRUE(message) << "iteration " << i;
    ASSERT_EQ(message->hdr.id, KVMI_EVENT)
        << "iteration " << i << ": stray " << CommandName(message->hdr.id) << " seq "
        << message->hdr.seq;
    Event event;
    ASSERT_TRUE(DecodeEvent(message->hdr, ByteView(message->payload), &event).ok());
    ASSERT_EQ(event.id(), KVMI_EVENT_XSETBV);
    SetRegistersRequest set{0, event.common.arch.regs};
    set.regs.rbx = 0x5e70000u + static_cast<uint64_t>(i);
    Bytes batch;
    kvmi_control_cmd_response off_now{0, 1, 0, 0};
    AppendTo(&batch, Msg(KVMI_CONTROL_CMD_RESPONSE, seq++, Cat(off_now)));
    EncodeCommand(set, seq++, &batch);
    EncodeEventReply(MakeEventReply(event, KVMI_EVENT_ACTION_CONTINUE), &batch);
    kvmi_control_cmd_response on_later{1, 0, 0, 0};
    AppendTo(&batch, Msg(KVMI_CONTROL_CMD_RESPONSE, seq++, Cat(on_later)));
    ASSERT_TRUE(tool_->SendRaw(batch));
    ASSERT_TRUE(done.get().executed);
    ASSERT_EQ(vm_->guest().Snapshot(0).regs.rbx, set.regs.rbx) << "iteration " << i;
  }
  // Replies are on again, and the first message is the answer to this command.
  ASSERT_TRUE(tool_->SendRaw(Msg(KVMI_GET_VERSION, 7, {})));
  auto reply = tool_->ReadMessage(10s);
  ASSERT_TRUE(reply);
  EXPECT_EQ(reply->hdr.id, KVMI_GET_VERSION) << "stray seq " << reply->hdr.seq;
  EXPECT_EQ(reply->hdr.seq, 7u);
  EXPECT_EQ(vm_->engine().stats().sessions_closed_by_violation.load(), 0u);
}

TEST_F(CommandsTest, ReplyWithDataWhileRepliesAreDisabledCloses) {
  kvmi_control_cmd_response off_now{0, 1, 0, 0};
  ASSERT_TRUE(tool_->SendRaw(Msg(KVMI_CONTROL_CMD_RESPONSE, 1, Cat(off_now))));
  ASSERT_TRUE(tool_->SendRaw(Msg(KVMI_GET_VERSION, 2, {})));
  ExpectSessionClosed();
}

TEST_F(CommandsTest, VcpuCommandWithDataWhileRepliesAreDisabledCloses) {
  kvmi_control_cmd_response off_now{0, 1, 0, 0};
  ASSERT_TRUE(tool_->SendRaw(Msg(KVMI_CONTROL_CMD_RESPONSE, 1, Cat(off_now))));
  ASSERT_TRUE(tool_->SendRaw(Msg(KVMI_GET_XSAVE, 2, Cat(VcpuHdr(0)))));
  ExpectSessionClosed();
}

TEST_F(CommandsTest, ControlCmdResponsePaddingCloses) {
  kvmi_control_cmd_response padded{1, 0, 1, 0};
  ASSERT_TRUE(tool_->SendRaw(Msg(KVMI_CONTROL_CMD_RESPONSE, 1, Cat(padded))));
  ExpectSessionClosed();
}

// ---- allow masks (the COMMAND / EVENT ioctls QEMU issues after HOOK) --------------------------

class AllowMaskTest : public SimSessionTest {};

TEST_F(AllowMaskTest, OnlyAlwaysAllowedCommandsBeforeTheIoctls) {
  StartVm([](VmConfig& c) {
    c.connector.allowed_commands.clear();
    c.connector.allowed_events.clear();
  });
  EXPECT_EQ(ToolConnection::ErrorOf(tool_->Call(GetVersionRequest{})), 0);
  EXPECT_EQ(ToolConnection::ErrorOf(tool_->Call(CheckCommandRequest{KVMI_GET_VERSION})), 0);
  EXPECT_EQ(ToolConnection::ErrorOf(tool_->Call(CheckCommandRequest{KVMI_GET_GUEST_INFO})),
            -KVM_EPERM);
  EXPECT_EQ(ToolConnection::ErrorOf(tool_->Call(GetGuestInfoRequest{})), -KVM_EPERM);
  EXPECT_EQ(ToolConnection::ErrorOf(tool_->Call(CheckEventRequest{KVMI_EVENT_PF})), -KVM_EPERM);
  // CONTROL_CMD_RESPONSE itself is not allowed here: -KVM_EPERM, replies stay on.
  kvmi_control_cmd_response off_now{0, 1, 0, 0};
  EXPECT_EQ(Exchange(Msg(KVMI_CONTROL_CMD_RESPONSE, 9, Cat(off_now)))->wire,
            ReplyBytes(KVMI_CONTROL_CMD_RESPONSE, 9, -KVM_EPERM));
}

TEST_F(AllowMaskTest, IoctlSemantics) {
  StartVm([](VmConfig& c) {
    c.connector.allowed_commands = {KVMI_GET_GUEST_INFO, KVMI_CONTROL_CMD_RESPONSE, KVMI_PAUSE_VCPU,
                                    KVMI_CONTROL_EVENTS};
    c.connector.allowed_events = {KVMI_EVENT_CR};
  });
  host::VmIntrospection& e = vm_->engine();
  EXPECT_EQ(e.SetCommandAllowed(KVMI_GET_VERSION, false), -EPERM);
  EXPECT_EQ(e.SetCommandAllowed(28, true), -EINVAL);
  EXPECT_EQ(e.SetCommandAllowed(-2, true), -EINVAL);
  EXPECT_EQ(e.SetEventAllowed(KVMI_NUM_EVENTS, true), -EINVAL);
  EXPECT_EQ(ToolConnection::ErrorOf(tool_->Call(GetGuestInfoRequest{})), 0);
  EXPECT_EQ(ToolConnection::ErrorOf(tool_->Call(GetMapTokenRequest{})), -KVM_EPERM);
  EXPECT_EQ(ToolConnection::ErrorOf(tool_->Call(ControlEventsRequest{0, KVMI_EVENT_CR, true})), 0);
  EXPECT_EQ(ToolConnection::ErrorOf(tool_->Call(ControlEventsRequest{0, KVMI_EVENT_PF, true})),
            -KVM_EPERM);
  // PAUSE_VCPU with the pause event disallowed: -KVM_EPERM, even with replies disabled.
  kvmi_control_cmd_response off_now{0, 1, 0, 0};
  ASSERT_TRUE(tool_->SendRaw(Msg(KVMI_CONTROL_CMD_RESPONSE, 1, Cat(off_now))));
  EXPECT_EQ(Exchange(Msg(KVMI_PAUSE_VCPU, 2, Cat(VcpuHdr(0), kvmi_pause_vcpu{})))->wire,
            ReplyBytes(KVMI_PAUSE_VCPU, 2, -KVM_EPERM));
  // Disallowed commands are answered even with replies disabled.
  EXPECT_EQ(Exchange(Msg(KVMI_GET_MAP_TOKEN, 3, {}))->wire,
            ReplyBytes(KVMI_GET_MAP_TOKEN, 3, -KVM_EPERM));
  kvmi_control_cmd_response on_now{1, 1, 0, 0};
  EXPECT_EQ(Exchange(Msg(KVMI_CONTROL_CMD_RESPONSE, 4, Cat(on_now)))->wire,
            ReplyBytes(KVMI_CONTROL_CMD_RESPONSE, 4, 0));
  // With id -1 the always-allowed commands are silently kept.
  EXPECT_EQ(e.SetCommandAllowed(host::kAllIds, false), 0);
  EXPECT_EQ(ToolConnection::ErrorOf(tool_->Call(CheckCommandRequest{KVMI_GET_VERSION})), 0);
  EXPECT_EQ(ToolConnection::ErrorOf(tool_->Call(CheckCommandRequest{KVMI_GET_GUEST_INFO})),
            -KVM_EPERM);
  EXPECT_EQ(ToolConnection::ErrorOf(tool_->Call(GetVersionRequest{})), 0);
}

TEST_F(AllowMaskTest, DescriptorExitingUnsupported) {
  StartVm([](VmConfig& c) { c.guest.descriptor_exiting_supported = false; });
  EXPECT_EQ(
      ToolConnection::ErrorOf(tool_->Call(ControlEventsRequest{0, KVMI_EVENT_DESCRIPTOR, true})),
      -KVM_EOPNOTSUPP);
}

TEST_F(AllowMaskTest, SppUnsupported) {
  StartVm([](VmConfig& c) { c.guest.spp_supported = false; });
  EXPECT_EQ(ToolConnection::ErrorOf(tool_->Call(ControlSppRequest{true})), -KVM_EOPNOTSUPP);
}

}  // namespace
}  // namespace kvmi::sim::testing
