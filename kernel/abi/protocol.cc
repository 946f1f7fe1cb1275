#include "kernel/abi/protocol.h"

namespace kvmi {
namespace {

constexpr uint16_t V = static_cast<uint16_t>(kVcpuHdrSize);
constexpr uint16_t E = 0;  // "no variable part"

// §2 of KVMI-V6-ABI.md, row by row. request_fixed includes the vcpu hdr.
constexpr CommandInfo kCommands[] = {
    {KVMI_GET_VERSION, "KVMI_GET_VERSION", CommandScope::kVm, false, true, 0, E,
     sizeof(kvmi_get_version_reply), E},
    {KVMI_CHECK_COMMAND, "KVMI_CHECK_COMMAND", CommandScope::kVm, false, true,
     sizeof(kvmi_check_command), E, 0, E},
    {KVMI_CHECK_EVENT, "KVMI_CHECK_EVENT", CommandScope::kVm, false, true, sizeof(kvmi_check_event),
     E, 0, E},
    {KVMI_GET_GUEST_INFO, "KVMI_GET_GUEST_INFO", CommandScope::kVm, false, false, 0, E,
     sizeof(kvmi_get_guest_info_reply), E},
    {KVMI_GET_VCPU_INFO, "KVMI_GET_VCPU_INFO", CommandScope::kVcpu, true, false, V, E,
     sizeof(kvmi_get_vcpu_info_reply), E},
    {KVMI_PAUSE_VCPU, "KVMI_PAUSE_VCPU", CommandScope::kPauseVcpu, true, false,
     V + sizeof(kvmi_pause_vcpu), E, 0, E},
    {KVMI_CONTROL_VM_EVENTS, "KVMI_CONTROL_VM_EVENTS", CommandScope::kVm, false, false,
     sizeof(kvmi_control_vm_events), E, 0, E},
    {KVMI_CONTROL_EVENTS, "KVMI_CONTROL_EVENTS", CommandScope::kVcpu, true, false,
     V + sizeof(kvmi_control_events), E, 0, E},
    {KVMI_CONTROL_CR, "KVMI_CONTROL_CR", CommandScope::kVcpu, true, false,
     V + sizeof(kvmi_control_cr), E, 0, E},
    {KVMI_CONTROL_MSR, "KVMI_CONTROL_MSR", CommandScope::kVcpu, true, false,
     V + sizeof(kvmi_control_msr), E, 0, E},
    {KVMI_CONTROL_VE, "KVMI_CONTROL_VE", CommandScope::kUnsupported, false, false, 0, E, 0, E},
    {KVMI_GET_REGISTERS, "KVMI_GET_REGISTERS", CommandScope::kVcpu, true, false,
     V + sizeof(kvmi_get_registers), sizeof(uint32_t), sizeof(kvmi_get_registers_reply),
     sizeof(kvm_msr_entry)},
    {KVMI_SET_REGISTERS, "KVMI_SET_REGISTERS", CommandScope::kVcpu, true, false,
     V + sizeof(kvm_regs), E, 0, E},
    {KVMI_GET_CPUID, "KVMI_GET_CPUID", CommandScope::kVcpu, true, false, V + sizeof(kvmi_get_cpuid),
     E, sizeof(kvmi_get_cpuid_reply), E},
    {KVMI_GET_XSAVE, "KVMI_GET_XSAVE", CommandScope::kVcpu, true, false, V, E, KVMI_XSAVE_SIZE, E},
    {KVMI_READ_PHYSICAL, "KVMI_READ_PHYSICAL", CommandScope::kVm, false, false,
     sizeof(kvmi_read_physical), E, 0, 1},
    {KVMI_WRITE_PHYSICAL, "KVMI_WRITE_PHYSICAL", CommandScope::kVm, false, false,
     sizeof(kvmi_write_physical), 1, 0, E},
    {KVMI_INJECT_EXCEPTION, "KVMI_INJECT_EXCEPTION", CommandScope::kVcpu, true, false,
     V + sizeof(kvmi_inject_exception), E, 0, E},
    {KVMI_GET_PAGE_ACCESS, "KVMI_GET_PAGE_ACCESS", CommandScope::kVm, false, false,
     sizeof(kvmi_get_page_access), sizeof(uint64_t), 0, 1},
    {KVMI_SET_PAGE_ACCESS, "KVMI_SET_PAGE_ACCESS", CommandScope::kVm, false, false,
     sizeof(kvmi_set_page_access), sizeof(kvmi_page_access_entry), 0, E},
    {KVMI_GET_MAP_TOKEN, "KVMI_GET_MAP_TOKEN", CommandScope::kVm, false, false, 0, E,
     sizeof(kvmi_get_map_token_reply), E},
    {KVMI_GET_MTRR_TYPE, "KVMI_GET_MTRR_TYPE", CommandScope::kVcpu, true, false,
     V + sizeof(kvmi_get_mtrr_type), E, sizeof(kvmi_get_mtrr_type_reply), E},
    {KVMI_CONTROL_SPP, "KVMI_CONTROL_SPP", CommandScope::kVm, false, false,
     sizeof(kvmi_control_spp), E, 0, E},
    {KVMI_GET_PAGE_WRITE_BITMAP, "KVMI_GET_PAGE_WRITE_BITMAP", CommandScope::kVm, false, false,
     sizeof(kvmi_get_page_write_bitmap), sizeof(uint64_t), 0, sizeof(uint32_t)},
    {KVMI_SET_PAGE_WRITE_BITMAP, "KVMI_SET_PAGE_WRITE_BITMAP", CommandScope::kVm, false, false,
     sizeof(kvmi_set_page_write_bitmap), sizeof(kvmi_page_write_bitmap_entry), 0, E},
    {KVMI_CONTROL_CMD_RESPONSE, "KVMI_CONTROL_CMD_RESPONSE", CommandScope::kVm, false, false,
     sizeof(kvmi_control_cmd_response), E, 0, E},
};
static_assert(sizeof(kCommands) / sizeof(kCommands[0]) ==
                  KVMI_NEXT_AVAILABLE_COMMAND - KVMI_FIRST_COMMAND,
              "one row per v6 command");

constexpr uint8_t kContinue = 1u << KVMI_EVENT_ACTION_CONTINUE;
constexpr uint8_t kRetry = 1u << KVMI_EVENT_ACTION_RETRY;
constexpr uint8_t kCrash = 1u << KVMI_EVENT_ACTION_CRASH;

// §3.1 and the S/R table of §6.
constexpr EventInfo kEvents[] = {
    {KVMI_EVENT_UNHOOK, "KVMI_EVENT_UNHOOK", true, false, false, 0, 0, kContinue | kCrash},
    {KVMI_EVENT_CR, "KVMI_EVENT_CR", false, true, true, sizeof(kvmi_event_cr),
     sizeof(kvmi_event_cr_reply), kContinue | kCrash},
    {KVMI_EVENT_MSR, "KVMI_EVENT_MSR", false, true, true, sizeof(kvmi_event_msr),
     sizeof(kvmi_event_msr_reply), kContinue | kCrash},
    {KVMI_EVENT_XSETBV, "KVMI_EVENT_XSETBV", false, true, true, 0, 0, kContinue | kCrash},
    {KVMI_EVENT_BREAKPOINT, "KVMI_EVENT_BREAKPOINT", false, true, true,
     sizeof(kvmi_event_breakpoint), 0, kContinue | kRetry | kCrash},
    {KVMI_EVENT_HYPERCALL, "KVMI_EVENT_HYPERCALL", false, true, true, 0, 0, kContinue | kCrash},
    {KVMI_EVENT_PF, "KVMI_EVENT_PF", false, true, true, sizeof(kvmi_event_pf),
     sizeof(kvmi_event_pf_reply), kContinue | kRetry | kCrash},
    {KVMI_EVENT_TRAP, "KVMI_EVENT_TRAP", false, true, true, sizeof(kvmi_event_trap), 0,
     kContinue | kCrash},
    {KVMI_EVENT_DESCRIPTOR, "KVMI_EVENT_DESCRIPTOR", false, true, true,
     sizeof(kvmi_event_descriptor), 0, kContinue | kRetry | kCrash},
    {KVMI_EVENT_CREATE_VCPU, "KVMI_EVENT_CREATE_VCPU", true, false, true, 0, 0, kContinue | kCrash},
    {KVMI_EVENT_PAUSE_VCPU, "KVMI_EVENT_PAUSE_VCPU", false, true, true, 0, 0, kContinue | kCrash},
    {KVMI_EVENT_SINGLESTEP, "KVMI_EVENT_SINGLESTEP", false, true, true, 0, 0, kContinue | kCrash},
};
static_assert(sizeof(kEvents) / sizeof(kEvents[0]) == KVMI_NUM_EVENTS, "one row per v6 event");

}  // namespace

const CommandInfo* FindCommand(uint16_t id) {
  if (id < KVMI_FIRST_COMMAND || id >= KVMI_NEXT_AVAILABLE_COMMAND) return nullptr;
  return &kCommands[id - KVMI_FIRST_COMMAND];
}

bool IsKnownCommand(uint16_t id) { return FindCommand(id) != nullptr; }

const EventInfo* FindEvent(uint8_t id) {
  if (id >= KVMI_NUM_EVENTS) return nullptr;
  return &kEvents[id];
}

const char* CommandName(uint16_t id) {
  if (id == KVMI_EVENT_REPLY) return "KVMI_EVENT_REPLY";
  if (id == KVMI_EVENT) return "KVMI_EVENT";
  const CommandInfo* info = FindCommand(id);
  return info != nullptr ? info->name : "KVMI_UNKNOWN_COMMAND";
}

const char* EventName(uint8_t id) {
  const EventInfo* info = FindEvent(id);
  return info != nullptr ? info->name : "KVMI_UNKNOWN_EVENT";
}

const char* ActionName(uint8_t action) {
  switch (action) {
    case KVMI_EVENT_ACTION_CONTINUE:
      return "KVMI_EVENT_ACTION_CONTINUE";
    case KVMI_EVENT_ACTION_RETRY:
      return "KVMI_EVENT_ACTION_RETRY";
    case KVMI_EVENT_ACTION_CRASH:
      return "KVMI_EVENT_ACTION_CRASH";
    default:
      return "KVMI_EVENT_ACTION_UNKNOWN";
  }
}

const char* ErrorName(int32_t err) {
  switch (-static_cast<int64_t>(err)) {
    case 0:
      return "OK";
    case KVM_EPERM:
      return "KVM_EPERM";
    case KVM_ENOENT:
      return "KVM_ENOENT";
    case KVM_E2BIG:
      return "KVM_E2BIG";
    case KVM_EAGAIN:
      return "KVM_EAGAIN";
    case KVM_ENOMEM:
      return "KVM_ENOMEM";
    case KVM_EFAULT:
      return "KVM_EFAULT";
    case KVM_EBUSY:
      return "KVM_EBUSY";
    case KVM_EINVAL:
      return "KVM_EINVAL";
    case KVM_EOPNOTSUPP:
      return "KVM_EOPNOTSUPP";
    case KVM_ENOSYS:
      return "KVM_ENOSYS";
    default:
      return "KVM_E?";
  }
}

uint8_t CpuModeFromSregs(const kvm_sregs& sregs) {
  constexpr uint64_t kEferLma = 1ull << 10;
  if ((sregs.efer & kEferLma) != 0 && sregs.cs.l != 0) return 8;
  return sregs.cs.db != 0 ? 4 : 2;
}

}  // namespace kvmi
