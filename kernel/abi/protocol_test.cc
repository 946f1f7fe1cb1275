// The protocol table against §2, §3.1 and §6 of KVMI-V6-ABI.md, written out here a second time
// so that a typo in either place fails; plus the naming helpers and the arch.mode rule.
#include "kernel/abi/protocol.h"

#include <gtest/gtest.h>

#include <string>

#include "kernel/abi/status.h"

namespace kvmi {
namespace {

struct CommandRow {
  uint16_t id;
  const char* name;
  CommandScope scope;
  bool vcpu_hdr;
  bool always_allowed;
  uint16_t request_fixed, request_item, reply_fixed, reply_item;
};

// §2, request/reply sizes without the 8-byte error code. CONTROL_VE has no handler.
constexpr CommandRow kCommands[] = {
    {2, "KVMI_GET_VERSION", CommandScope::kVm, false, true, 0, 0, 8, 0},
    {3, "KVMI_CHECK_COMMAND", CommandScope::kVm, false, true, 8, 0, 0, 0},
    {4, "KVMI_CHECK_EVENT", CommandScope::kVm, false, true, 8, 0, 0, 0},
    {5, "KVMI_GET_GUEST_INFO", CommandScope::kVm, false, false, 0, 0, 16, 0},
    {6, "KVMI_GET_VCPU_INFO", CommandScope::kVcpu, true, false, 8, 0, 8, 0},
    {7, "KVMI_PAUSE_VCPU", CommandScope::kPauseVcpu, true, false, 16, 0, 0, 0},
    {8, "KVMI_CONTROL_VM_EVENTS", CommandScope::kVm, false, false, 8, 0, 0, 0},
    {9, "KVMI_CONTROL_EVENTS", CommandScope::kVcpu, true, false, 16, 0, 0, 0},
    {10, "KVMI_CONTROL_CR", CommandScope::kVcpu, true, false, 16, 0, 0, 0},
    {11, "KVMI_CONTROL_MSR", CommandScope::kVcpu, true, false, 16, 0, 0, 0},
    {13, "KVMI_GET_REGISTERS", CommandScope::kVcpu, true, false, 16, 4, 472, 16},
    {14, "KVMI_SET_REGISTERS", CommandScope::kVcpu, true, false, 152, 0, 0, 0},
    {15, "KVMI_GET_CPUID", CommandScope::kVcpu, true, false, 16, 0, 16, 0},
    {16, "KVMI_GET_XSAVE", CommandScope::kVcpu, true, false, 8, 0, 4096, 0},
    {17, "KVMI_READ_PHYSICAL", CommandScope::kVm, false, false, 16, 0, 0, 1},
    {18, "KVMI_WRITE_PHYSICAL", CommandScope::kVm, false, false, 16, 1, 0, 0},
    {19, "KVMI_INJECT_EXCEPTION", CommandScope::kVcpu, true, false, 24, 0, 0, 0},
    {20, "KVMI_GET_PAGE_ACCESS", CommandScope::kVm, false, false, 8, 8, 0, 1},
    {21, "KVMI_SET_PAGE_ACCESS", CommandScope::kVm, false, false, 8, 16, 0, 0},
    {22, "KVMI_GET_MAP_TOKEN", CommandScope::kVm, false, false, 0, 0, 32, 0},
    {23, "KVMI_GET_MTRR_TYPE", CommandScope::kVcpu, true, false, 16, 0, 8, 0},
    {24, "KVMI_CONTROL_SPP", CommandScope::kVm, false, false, 8, 0, 0, 0},
    {25, "KVMI_GET_PAGE_WRITE_BITMAP", CommandScope::kVm, false, false, 8, 8, 0, 4},
    {26, "KVMI_SET_PAGE_WRITE_BITMAP", CommandScope::kVm, false, false, 8, 16, 0, 0},
    {27, "KVMI_CONTROL_CMD_RESPONSE", CommandScope::kVm, false, false, 8, 0, 0, 0},
};

TEST(CommandTable, MatchesTheAbi) {
  for (const CommandRow& row : kCommands) {
    SCOPED_TRACE(row.name);
    const CommandInfo* info = FindCommand(row.id);
    ASSERT_NE(info, nullptr);
    EXPECT_EQ(info->id, row.id);
    EXPECT_STREQ(info->name, row.name);
    EXPECT_STREQ(CommandName(row.id), row.name);
    EXPECT_EQ(info->scope, row.scope);
    EXPECT_EQ(info->has_vcpu_hdr, row.vcpu_hdr);
    EXPECT_EQ(info->always_allowed, row.always_allowed);
    EXPECT_EQ(info->request_fixed, row.request_fixed);
    EXPECT_EQ(info->request_item, row.request_item);
    EXPECT_EQ(info->reply_fixed, row.reply_fixed);
    EXPECT_EQ(info->reply_item, row.reply_item);
  }
}

TEST(CommandTable, ControlVeIsKnownButUnsupported) {
  const CommandInfo* info = FindCommand(KVMI_CONTROL_VE);
  ASSERT_NE(info, nullptr);
  EXPECT_EQ(info->scope, CommandScope::kUnsupported);
  EXPECT_TRUE(IsKnownCommand(KVMI_CONTROL_VE));
  EXPECT_STREQ(CommandName(KVMI_CONTROL_VE), "KVMI_CONTROL_VE");
}

TEST(CommandTable, UnknownIdsHaveNoEntryAndAStableName) {
  for (uint16_t id : {0, 1, 28, 29, 1000, 0xffff}) {
    EXPECT_EQ(FindCommand(id), nullptr) << id;
    EXPECT_NE(std::string(CommandName(id)), "") << id;
  }
}

struct EventRow {
  uint8_t id;
  const char* name;
  bool vm_event, vcpu_event, has_reply;
  uint16_t specific, reply;
  uint8_t actions;  // bits of CONTINUE/RETRY/CRASH
};

constexpr uint8_t C = 1 << KVMI_EVENT_ACTION_CONTINUE;
constexpr uint8_t R = 1 << KVMI_EVENT_ACTION_RETRY;
constexpr uint8_t X = 1 << KVMI_EVENT_ACTION_CRASH;

// §3.1 and §6 (UNHOOK's "allowed actions" are irrelevant: it has no reply).
constexpr EventRow kEvents[] = {
    {0, "KVMI_EVENT_UNHOOK", true, false, false, 0, 0, C | X},
    {1, "KVMI_EVENT_CR", false, true, true, 24, 8, C | X},
    {2, "KVMI_EVENT_MSR", false, true, true, 24, 8, C | X},
    {3, "KVMI_EVENT_XSETBV", false, true, true, 0, 0, C | X},
    {4, "KVMI_EVENT_BREAKPOINT", false, true, true, 16, 0, C | R | X},
    {5, "KVMI_EVENT_HYPERCALL", false, true, true, 0, 0, C | X},
    {6, "KVMI_EVENT_PF", false, true, true, 24, 272, C | R | X},
    {7, "KVMI_EVENT_TRAP", false, true, true, 24, 0, C | X},
    {8, "KVMI_EVENT_DESCRIPTOR", false, true, true, 8, 0, C | R | X},
    {9, "KVMI_EVENT_CREATE_VCPU", true, false, true, 0, 0, C | X},
    {10, "KVMI_EVENT_PAUSE_VCPU", false, true, true, 0, 0, C | X},
    {11, "KVMI_EVENT_SINGLESTEP", false, true, true, 0, 0, C | X},
};

TEST(EventTable, MatchesTheAbi) {
  for (const EventRow& row : kEvents) {
    SCOPED_TRACE(row.name);
    const EventInfo* info = FindEvent(row.id);
    ASSERT_NE(info, nullptr);
    EXPECT_EQ(info->id, row.id);
    EXPECT_STREQ(info->name, row.name);
    EXPECT_STREQ(EventName(row.id), row.name);
    EXPECT_EQ(info->vm_event, row.vm_event);
    EXPECT_EQ(info->vcpu_event, row.vcpu_event);
    EXPECT_EQ(info->has_reply, row.has_reply);
    EXPECT_EQ(info->specific_size, row.specific);
    EXPECT_EQ(info->reply_size, row.reply);
    if (row.has_reply) {
      EXPECT_EQ(info->allowed_actions, row.actions);
    }
  }
  EXPECT_EQ(FindEvent(KVMI_NUM_EVENTS), nullptr);
  EXPECT_EQ(FindEvent(0xff), nullptr);
}

TEST(Limits, DerivedMaximaOfSection1) {
  EXPECT_EQ(kMaxCommandPayload, 4088u);
  EXPECT_EQ(kMaxReplyPayload, 4104u);
  EXPECT_EQ(kMaxWritePhysicalData, 4072u);
  EXPECT_EQ(kMaxSetPageAccessEntries, 255u);
  EXPECT_EQ(kMaxGetPageAccessGpas, 510u);
  EXPECT_EQ(kMaxGetRegistersMsrs, 226u);
  EXPECT_EQ(kMaxGetRegistersRequestMsrs, 1018u);
  EXPECT_EQ(kEventCommonSize + 24 + kHdrSize, 576u);  // largest event on the wire
}

TEST(ControlRules, CrsAndMsrsTheV6KernelAccepts) {
  for (uint32_t cr : {0u, 3u, 4u}) EXPECT_TRUE(IsControllableCr(cr)) << cr;
  for (uint32_t cr : {1u, 2u, 5u, 8u, 0xffffffffu}) EXPECT_FALSE(IsControllableCr(cr)) << cr;
  for (uint32_t msr : {0u, 0x1fffu, 0xc0000000u, 0xc0000080u, 0xc0001fffu}) {
    EXPECT_TRUE(IsControllableMsr(msr)) << std::hex << msr;
  }
  for (uint32_t msr : {0x2000u, 0xbfffffffu, 0xc0002000u, 0xffffffffu}) {
    EXPECT_FALSE(IsControllableMsr(msr)) << std::hex << msr;
  }
  EXPECT_STREQ(kControllableCrs, "0, 3 or 4");
  EXPECT_STREQ(kControllableMsrs, "0-0x1fff or 0xc0000000-0xc0001fff");
}

TEST(Names, ActionsAndErrors) {
  EXPECT_STREQ(ActionName(KVMI_EVENT_ACTION_CONTINUE), "KVMI_EVENT_ACTION_CONTINUE");
  EXPECT_STREQ(ActionName(KVMI_EVENT_ACTION_RETRY), "KVMI_EVENT_ACTION_RETRY");
  EXPECT_STREQ(ActionName(KVMI_EVENT_ACTION_CRASH), "KVMI_EVENT_ACTION_CRASH");
  EXPECT_NE(std::string(ActionName(3)), "");
  EXPECT_STREQ(ErrorName(0), "OK");
  EXPECT_STREQ(ErrorName(-1), "KVM_EPERM");
  EXPECT_STREQ(ErrorName(-2), "KVM_ENOENT");
  EXPECT_STREQ(ErrorName(-7), "KVM_E2BIG");
  EXPECT_STREQ(ErrorName(-11), "KVM_EAGAIN");
  EXPECT_STREQ(ErrorName(-12), "KVM_ENOMEM");
  EXPECT_STREQ(ErrorName(-14), "KVM_EFAULT");
  EXPECT_STREQ(ErrorName(-16), "KVM_EBUSY");
  EXPECT_STREQ(ErrorName(-22), "KVM_EINVAL");
  EXPECT_STREQ(ErrorName(-95), "KVM_EOPNOTSUPP");
  EXPECT_STREQ(ErrorName(-1000), "KVM_ENOSYS");
  EXPECT_STREQ(ErrorName(-3), "KVM_E?");
  EXPECT_STREQ(ErrorName(22), "KVM_E?");
}

// §4.2: long mode -> 8 if CS.L, else 2 if !CS.DB, else 4; otherwise 2 if !CS.DB else 4.
TEST(CpuMode, FollowsTheArchModeRule) {
  constexpr uint64_t kEferLma = 1u << 10;
  kvm_sregs sregs{};
  sregs.efer = kEferLma;
  sregs.cs.l = 1;
  EXPECT_EQ(CpuModeFromSregs(sregs), 8);
  sregs.cs.l = 0;
  sregs.cs.db = 1;
  EXPECT_EQ(CpuModeFromSregs(sregs), 4);
  sregs.cs.db = 0;
  EXPECT_EQ(CpuModeFromSregs(sregs), 2);
  sregs.efer = 0;
  sregs.cs.l = 1;  // CS.L means nothing outside long mode
  EXPECT_EQ(CpuModeFromSregs(sregs), 2);
  sregs.cs.db = 1;
  EXPECT_EQ(CpuModeFromSregs(sregs), 4);
}

TEST(CodecErrors, EveryErrorHasAName) {
  for (int e = 0; e <= static_cast<int>(CodecError::kUnexpectedMessage); ++e) {
    std::string name = CodecErrorName(static_cast<CodecError>(e));
    EXPECT_FALSE(name.empty()) << e;
  }
  DecodeStatus status = DecodeStatus::Fail(CodecError::kTruncated, "kvmi_event_pf");
  EXPECT_EQ(status.ToString(),
            std::string(CodecErrorName(CodecError::kTruncated)) + ": kvmi_event_pf");
}

}  // namespace
}  // namespace kvmi
