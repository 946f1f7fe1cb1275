// What the v6 ABI says about each message and event id, as data: the one table that the
// codec, the host-side model and the daemon all consult (§2, §3.1, §6 of KVMI-V6-ABI.md).
#ifndef KVMID_KERNEL_ABI_PROTOCOL_H_
#define KVMID_KERNEL_ABI_PROTOCOL_H_

#include <cstddef>
#include <cstdint>

#include "kernel/uapi/kvmi.h"

namespace kvmi {

// Wire sizes, named once.
inline constexpr size_t kHdrSize = sizeof(kvmi_msg_hdr);                                  // 8
inline constexpr size_t kErrorCodeSize = sizeof(kvmi_error_code);                         // 8
inline constexpr size_t kVcpuHdrSize = sizeof(kvmi_vcpu_hdr);                             // 8
inline constexpr size_t kEventCommonSize = sizeof(kvmi_event);                            // 544
inline constexpr size_t kEventReplyCommonSize = kVcpuHdrSize + sizeof(kvmi_event_reply);  // 16
// Largest payload the kernel accepts from the tool; it CLOSEs above this.
inline constexpr size_t kMaxCommandPayload = KVMI_MSG_SIZE;  // 4088
// Largest payload the kernel sends: error code + 4096 (GET_XSAVE, READ_PHYSICAL of a page).
inline constexpr size_t kMaxReplyPayload = KVMI_MAX_REPLY_PAYLOAD;  // 4104
// Derived per-message limits (§1 "Maximum sizes").
inline constexpr size_t kMaxWritePhysicalData =
    kMaxCommandPayload - sizeof(kvmi_write_physical);  // 4072
inline constexpr size_t kMaxSetPageAccessEntries =
    (kMaxCommandPayload - sizeof(kvmi_set_page_access)) / sizeof(kvmi_page_access_entry);  // 255
inline constexpr size_t kMaxGetPageAccessGpas =
    (kMaxCommandPayload - sizeof(kvmi_get_page_access)) / sizeof(uint64_t);  // 510
inline constexpr size_t kMaxGetRegistersMsrs =
    (KVMI_PAGE_SIZE - sizeof(kvmi_get_registers_reply)) / sizeof(kvm_msr_entry);  // 226
inline constexpr size_t kMaxGetRegistersRequestMsrs =
    (kMaxCommandPayload - kVcpuHdrSize - sizeof(kvmi_get_registers)) / sizeof(uint32_t);  // 1018
inline constexpr size_t kMaxReadPhysical = KVMI_PAGE_SIZE;

// What CONTROL_CR and CONTROL_MSR accept (§5.9, §5.10): the v6 kernel answers -KVM_EINVAL to any
// other register. One rule for the host-side model and for kvmid's checks before sending; the
// texts name the accepted values in error messages.
inline constexpr bool IsControllableCr(uint32_t cr) { return cr == 0 || cr == 3 || cr == 4; }
inline constexpr const char* kControllableCrs = "0, 3 or 4";
inline constexpr bool IsControllableMsr(uint32_t msr) {
  return msr <= KVMI_MSR_LOW_LAST || (msr >= KVMI_MSR_HIGH_FIRST && msr <= KVMI_MSR_HIGH_LAST);
}
inline constexpr const char* kControllableMsrs = "0-0x1fff or 0xc0000000-0xc0001fff";

// Which kernel thread executes a command (§2 "Thread").
enum class CommandScope : uint8_t {
  kVm,           // receive thread, replied at once
  kVcpu,         // queued to the vCPU's job list, executed and replied by that vCPU
  kPauseVcpu,    // has a vcpu hdr but is handled on the receive thread (§5.6)
  kUnsupported,  // known id without a handler (KVMI_CONTROL_VE): -KVM_EOPNOTSUPP
};

struct CommandInfo {
  uint16_t id;
  const char* name;  // "KVMI_GET_REGISTERS"
  CommandScope scope;
  bool has_vcpu_hdr;
  bool always_allowed;     // GET_VERSION, CHECK_COMMAND, CHECK_EVENT
  uint16_t request_fixed;  // payload bytes before any variable part (vcpu hdr included)
  uint16_t request_item;   // bytes per variable element (0 = fixed-size request)
  uint16_t reply_fixed;    // reply data after kvmi_error_code when err == 0
  uint16_t reply_item;     // bytes per variable reply element (0 = fixed)
};

// The v6 command table, ids 2..27. Null for any other id (0/1 are the event ids).
const CommandInfo* FindCommand(uint16_t id);
bool IsKnownCommand(uint16_t id);  // 2..27: counted in the allow masks

struct EventInfo {
  uint8_t id;
  const char* name;         // "KVMI_EVENT_PF"
  bool vm_event;            // UNHOOK, CREATE_VCPU: enabled by CONTROL_VM_EVENTS
  bool vcpu_event;          // accepted by CONTROL_EVENTS
  bool has_reply;           // UNHOOK has none
  uint16_t specific_size;   // S in §6
  uint16_t reply_size;      // R in §6
  uint8_t allowed_actions;  // bit per KVMI_EVENT_ACTION_* the event handles (doc)
};

const EventInfo* FindEvent(uint8_t id);  // null for ids >= KVMI_NUM_EVENTS

// Names for logs and the gRPC surface. Unknown values give "KVMI_UNKNOWN(<n>)"-style static
// text "unknown".
const char* CommandName(uint16_t id);
const char* EventName(uint8_t id);
const char* ActionName(uint8_t action);
// "KVM_EPERM" for -1, "OK" for 0, "KVM_E?" for anything else.
const char* ErrorName(int32_t err);

// The arch.mode rule of §4.2 (also GET_REGISTERS reply mode).
uint8_t CpuModeFromSregs(const kvm_sregs& sregs);

}  // namespace kvmi

#endif  // KVMID_KERNEL_ABI_PROTOCOL_H_
