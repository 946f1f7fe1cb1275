// Hostile tool input ends that VM's session exactly as the ABI says, and nothing else: the reply
// (or the silence), the close, and another VM that keeps working.
#include <sys/socket.h>

#include "kernel/sim/sim_test_util.h"

namespace kvmi::sim::testing {
namespace {

class HostileTest : public SimSessionTest {
 protected:
  void SetUp() override { StartVm(); }
  // Starts an event on vCPU 0 and returns it (the vCPU then waits for the reply).
  Event PendingXsetbv(std::future<OpResult>* done) {
    Enable(0, KVMI_EVENT_XSETBV);
    *done = vm_->Execute(0, Op{OpKind::kXsetbv, 0, 0x3, true});
    auto event = tool_->WaitEvent();
    EXPECT_TRUE(event);
    return event ? *event : Event{};
  }
};

TEST_F(HostileTest, OversizedHeaderClosesWithoutReply) {
  ASSERT_TRUE(tool_->SendRaw(Msg(KVMI_GET_VERSION, 1, {}, /*size=*/4089)));
  ExpectSessionClosed("payload too large");
}

TEST_F(HostileTest, LargestAllowedPayloadIsAccepted) {
  // 4088 bytes of an unknown id: discarded and answered.
  EXPECT_EQ(Exchange(Msg(40, 1, Bytes(4088, 0x5a)))->wire, ReplyBytes(40, 1, -KVM_EOPNOTSUPP));
}

TEST_F(HostileTest, TruncatedMessageThenEofEndsTheSession) {
  Bytes message = Msg(KVMI_GET_GUEST_INFO, 1, Bytes(100, 0));
  message.resize(50);
  ASSERT_TRUE(tool_->SendRaw(message));
  EXPECT_TRUE(tool_->ExpectSilence(50ms));  // the kernel waits for the rest
  ::shutdown(tool_->fd(), SHUT_WR);
  ASSERT_TRUE(vm_->WaitSessionsEnded(1, Clock::now() + 10s));
  EXPECT_NE(vm_->last_end_reason().find("middle of a message"), std::string::npos);
  EXPECT_TRUE(tool_->WaitClosed());
}

TEST_F(HostileTest, BadVcpuIndexIsAnsweredAndTheSessionGoesOn) {
  EXPECT_EQ(Exchange(Msg(KVMI_GET_REGISTERS, 1, Cat(VcpuHdr(2), kvmi_get_registers{})))->wire,
            ReplyBytes(KVMI_GET_REGISTERS, 1, -KVM_EINVAL));
  EXPECT_EQ(Exchange(Msg(KVMI_GET_CPUID, 2, Cat(VcpuHdr(0xffff), kvmi_get_cpuid{})))->wire,
            ReplyBytes(KVMI_GET_CPUID, 2, -KVM_EINVAL));
  EXPECT_EQ(ToolConnection::ErrorOf(tool_->Call(GetVersionRequest{})), 0);
}

TEST_F(HostileTest, VcpuHeaderPaddingCloses) {
  kvmi_vcpu_hdr hdr = VcpuHdr(0);
  hdr.padding1 = 1;
  ASSERT_TRUE(tool_->SendRaw(Msg(KVMI_GET_XSAVE, 1, Cat(hdr))));
  ExpectSessionClosed("kvmi_vcpu_hdr");
}

TEST_F(HostileTest, EventReplyWithTheWrongSeqCloses) {
  std::future<OpResult> done;
  Event event = PendingXsetbv(&done);
  EventReply reply = MakeEventReply(event, KVMI_EVENT_ACTION_CONTINUE);
  reply.seq = event.seq + 1;
  ASSERT_TRUE(tool_->ReplyEvent(reply));
  ExpectSessionClosed("seq");
  EXPECT_TRUE(done.get().executed);  // the vCPU carries on as after CONTINUE
}

TEST_F(HostileTest, EventReplyLongerThanTheEventsReplyCloses) {
  std::future<OpResult> done;
  Event event = PendingXsetbv(&done);
  EventReply reply = MakeEventReply(event, KVMI_EVENT_ACTION_CONTINUE);
  reply.specific_size = 8;  // XSETBV has no specific reply
  ASSERT_TRUE(tool_->ReplyEvent(reply));
  ExpectSessionClosed();
  done.get();
}

TEST_F(HostileTest, EventReplyPaddingCloses) {
  std::future<OpResult> done;
  Event event = PendingXsetbv(&done);
  kvmi_event_reply common{KVMI_EVENT_ACTION_CONTINUE, KVMI_EVENT_XSETBV, 1, 0};
  ASSERT_TRUE(tool_->SendRaw(Msg(KVMI_EVENT_REPLY, event.seq, Cat(VcpuHdr(0), common))));
  ExpectSessionClosed();
  done.get();
}

TEST_F(HostileTest, TruncatedEventReplyCloses) {
  std::future<OpResult> done;
  Event event = PendingXsetbv(&done);
  ASSERT_TRUE(tool_->SendRaw(Msg(KVMI_EVENT_REPLY, event.seq, Cat(VcpuHdr(0), uint32_t{0}))));
  ExpectSessionClosed();
  done.get();
}

TEST_F(HostileTest, PageFaultReplyWithOversizedContextCloses) {
  Enable(0, KVMI_EVENT_PF);
  SetPageAccessRequest restrict;
  restrict.entries.push_back(PageAccess{0x200000, KVMI_PAGE_ACCESS_R});
  ASSERT_EQ(ToolConnection::ErrorOf(tool_->Call(restrict)), 0);
  auto done = vm_->Execute(0, Op{OpKind::kWrite, 0, 1, true, 0x200000});
  auto event = tool_->WaitEvent();
  ASSERT_TRUE(event);
  EventReply reply = MakeEventReply(*event, KVMI_EVENT_ACTION_CONTINUE);
  reply.specific.pf.ctx_size = 257;
  ASSERT_TRUE(tool_->ReplyEvent(reply));
  ExpectSessionClosed("ctx_size");
  done.get();
}

TEST_F(HostileTest, EventReplyToAnIdleVcpuIsIgnored) {
  kvmi_event_reply common{KVMI_EVENT_ACTION_CONTINUE, KVMI_EVENT_CR, 0, 0};
  ASSERT_TRUE(tool_->SendRaw(Msg(KVMI_EVENT_REPLY, 99, Cat(VcpuHdr(1), common))));
  EXPECT_TRUE(tool_->ExpectSilence(50ms));
  EXPECT_EQ(ToolConnection::ErrorOf(tool_->Call(GetVersionRequest{})), 0);
}

TEST_F(HostileTest, EventReplyToAMissingVcpuGetsAnErrorWithIdZero) {
  kvmi_event_reply common{KVMI_EVENT_ACTION_CONTINUE, KVMI_EVENT_CR, 0, 0};
  EXPECT_EQ(Exchange(Msg(KVMI_EVENT_REPLY, 5, Cat(VcpuHdr(7), common)))->wire,
            ReplyBytes(KVMI_EVENT_REPLY, 5, -KVM_EINVAL));
}

TEST_F(HostileTest, AViolationEndsOnlyThatVmsSession) {
  ToolListener other_listener;
  VmConfig config = DefaultConfig(other_listener.endpoint());
  config.name = "bystander";
  SimVm bystander(config);
  bystander.Start();
  auto other = other_listener.AcceptAndHandshake(10s);
  ASSERT_NE(other, nullptr);
  ASSERT_TRUE(tool_->SendRaw(Msg(KVMI_GET_VERSION, 1, {}, 5000)));
  ExpectSessionClosed();
  EXPECT_EQ(ToolConnection::ErrorOf(other->Call(GetGuestInfoRequest{})), 0);
  EXPECT_TRUE(bystander.engine().hooked());
  bystander.Stop();
}

TEST_F(HostileTest, AfterAViolationTheVmReconnectsWithAFreshSession) {
  vm_->Stop();
  VmConfig config = DefaultConfig(listener_.endpoint());
  config.connector.reconnect_seconds = 0.05;
  vm_ = std::make_unique<SimVm>(config);
  vm_->Start();
  tool_ = listener_.AcceptAndHandshake(10s);
  ASSERT_NE(tool_, nullptr);
  ASSERT_EQ(ToolConnection::ErrorOf(tool_->Call(GetVersionRequest{})), 0);
  SetPageAccessRequest restrict;
  restrict.entries.push_back(PageAccess{0x200000, KVMI_PAGE_ACCESS_R});
  ASSERT_EQ(ToolConnection::ErrorOf(tool_->Call(restrict)), 0);
  ASSERT_TRUE(tool_->SendRaw(Msg(KVMI_GET_VERSION, 1, {}, 5000)));
  EXPECT_TRUE(tool_->WaitClosed());
  tool_ = listener_.AcceptAndHandshake(10s);  // QEMU's reconnect=N
  ASSERT_NE(tool_, nullptr);
  ASSERT_EQ(ToolConnection::ErrorOf(tool_->Call(GetVersionRequest{})), 0);
  EXPECT_EQ(vm_->engine().AllowedAccess(0x200000), KVMI_PAGE_ACCESS_RWX);  // restored
  auto pause = tool_->Call(PauseVcpuRequest{0, false});
  ASSERT_EQ(ToolConnection::ErrorOf(pause), 0);
  auto event = tool_->WaitEvent();
  ASSERT_TRUE(event);
  EXPECT_EQ(event->seq, 1u);  // per-session counter
  ASSERT_TRUE(tool_->Continue(*event));
}

}  // namespace
}  // namespace kvmi::sim::testing
