// Prints the KVMI v6 ABI as this build sees it: the command and event tables the codec uses, the
// wire sizes of every structure (sizeof on the uapi structs, so a layout regression shows here as
// well as in the static_asserts) and the derived limits. README command (1) runs it.
#include <cstdio>

#include "kernel/abi/handshake.h"
#include "kernel/abi/protocol.h"
#include "kernel/uapi/kvmi.h"

namespace {

const char* ScopeName(kvmi::CommandScope scope) {
  switch (scope) {
    case kvmi::CommandScope::kVm:
      return "VM";
    case kvmi::CommandScope::kVcpu:
      return "vCPU";
    case kvmi::CommandScope::kPauseVcpu:
      return "VM (pause)";
    case kvmi::CommandScope::kUnsupported:
      return "unsupported";
  }
  return "?";
}

void PrintCommands() {
  std::printf(
      "Commands (request/reply sizes are payload bytes; reply after the 8-byte error code)\n");
  std::printf("  %3s  %-28s %-11s %-5s %-8s %-14s %s\n", "id", "name", "thread", "vcpu", "always",
              "request", "reply");
  for (uint16_t id = KVMI_FIRST_COMMAND; id < KVMI_NEXT_AVAILABLE_COMMAND; ++id) {
    const kvmi::CommandInfo* c = kvmi::FindCommand(id);
    char request[32];
    char reply[32];
    if (c->request_item != 0) {
      std::snprintf(request, sizeof(request), "%u + %u*n", c->request_fixed, c->request_item);
    } else {
      std::snprintf(request, sizeof(request), "%u", c->request_fixed);
    }
    if (c->reply_item != 0) {
      std::snprintf(reply, sizeof(reply), "%u + %u*n", c->reply_fixed, c->reply_item);
    } else {
      std::snprintf(reply, sizeof(reply), "%u", c->reply_fixed);
    }
    std::printf("  %3u  %-28s %-11s %-5s %-8s %-14s %s\n", c->id, c->name, ScopeName(c->scope),
                c->has_vcpu_hdr ? "yes" : "no", c->always_allowed ? "yes" : "no", request,
                c->scope == kvmi::CommandScope::kUnsupported ? "-KVM_EOPNOTSUPP" : reply);
  }
}

void PrintEvents() {
  std::printf("\nEvents (KVMI_EVENT payload = %zu + S; KVMI_EVENT_REPLY payload = %zu + R)\n",
              kvmi::kEventCommonSize, kvmi::kEventReplyCommonSize);
  std::printf("  %3s  %-24s %-9s %4s %6s  %s\n", "id", "name", "enabled", "S", "R", "actions");
  for (uint8_t id = 0; id < KVMI_NUM_EVENTS; ++id) {
    const kvmi::EventInfo* e = kvmi::FindEvent(id);
    char reply[16];
    if (e->has_reply) {
      std::snprintf(reply, sizeof(reply), "%u", e->reply_size);
    } else {
      std::snprintf(reply, sizeof(reply), "none");
    }
    std::printf("  %3u  %-24s %-9s %4u %6s ", e->id, e->name, e->vm_event ? "per VM" : "per vCPU",
                e->specific_size, reply);
    for (uint8_t action = 0; action < 8; ++action) {
      if ((e->allowed_actions >> action) & 1) std::printf(" %s", kvmi::ActionName(action) + 18);
    }
    std::printf("\n");
  }
}

#define KVMI_PRINT_SIZE(type) std::printf("  %-34s %5zu\n", #type, sizeof(struct type))

void PrintSizes() {
  std::printf("\nWire structures (bytes, x86-64)\n");
  KVMI_PRINT_SIZE(kvmi_msg_hdr);
  KVMI_PRINT_SIZE(kvmi_error_code);
  KVMI_PRINT_SIZE(kvmi_vcpu_hdr);
  KVMI_PRINT_SIZE(kvmi_event_reply);
  KVMI_PRINT_SIZE(kvmi_event);
  KVMI_PRINT_SIZE(kvmi_event_arch);
  KVMI_PRINT_SIZE(kvm_regs);
  KVMI_PRINT_SIZE(kvm_sregs);
  KVMI_PRINT_SIZE(kvm_segment);
  KVMI_PRINT_SIZE(kvm_dtable);
  KVMI_PRINT_SIZE(kvm_msr_entry);
  KVMI_PRINT_SIZE(kvmi_get_version_reply);
  KVMI_PRINT_SIZE(kvmi_control_cmd_response);
  KVMI_PRINT_SIZE(kvmi_check_command);
  KVMI_PRINT_SIZE(kvmi_check_event);
  KVMI_PRINT_SIZE(kvmi_get_guest_info_reply);
  KVMI_PRINT_SIZE(kvmi_get_vcpu_info_reply);
  KVMI_PRINT_SIZE(kvmi_pause_vcpu);
  KVMI_PRINT_SIZE(kvmi_control_vm_events);
  KVMI_PRINT_SIZE(kvmi_control_events);
  KVMI_PRINT_SIZE(kvmi_control_cr);
  KVMI_PRINT_SIZE(kvmi_control_msr);
  KVMI_PRINT_SIZE(kvmi_get_registers);
  KVMI_PRINT_SIZE(kvmi_get_registers_reply);
  KVMI_PRINT_SIZE(kvmi_get_cpuid);
  KVMI_PRINT_SIZE(kvmi_get_cpuid_reply);
  KVMI_PRINT_SIZE(kvmi_read_physical);
  KVMI_PRINT_SIZE(kvmi_write_physical);
  KVMI_PRINT_SIZE(kvmi_inject_exception);
  KVMI_PRINT_SIZE(kvmi_get_page_access);
  KVMI_PRINT_SIZE(kvmi_page_access_entry);
  KVMI_PRINT_SIZE(kvmi_set_page_access);
  KVMI_PRINT_SIZE(kvmi_map_mem_token);
  KVMI_PRINT_SIZE(kvmi_get_mtrr_type);
  KVMI_PRINT_SIZE(kvmi_get_mtrr_type_reply);
  KVMI_PRINT_SIZE(kvmi_control_spp);
  KVMI_PRINT_SIZE(kvmi_get_page_write_bitmap);
  KVMI_PRINT_SIZE(kvmi_page_write_bitmap_entry);
  KVMI_PRINT_SIZE(kvmi_set_page_write_bitmap);
  KVMI_PRINT_SIZE(kvmi_event_cr);
  KVMI_PRINT_SIZE(kvmi_event_cr_reply);
  KVMI_PRINT_SIZE(kvmi_event_msr);
  KVMI_PRINT_SIZE(kvmi_event_msr_reply);
  KVMI_PRINT_SIZE(kvmi_event_breakpoint);
  KVMI_PRINT_SIZE(kvmi_event_pf);
  KVMI_PRINT_SIZE(kvmi_event_pf_reply);
  KVMI_PRINT_SIZE(kvmi_event_trap);
  KVMI_PRINT_SIZE(kvmi_event_descriptor);
  KVMI_PRINT_SIZE(kvm_introspection);
  KVMI_PRINT_SIZE(kvm_introspection_feature);
  KVMI_PRINT_SIZE(kvmi_mem_map);
  KVMI_PRINT_SIZE(kvmi_qemu2introspector);
  KVMI_PRINT_SIZE(kvmi_introspector2qemu);
}

void PrintLimits() {
  std::printf("\nLimits\n");
  std::printf("  %-34s %5zu\n", "max command payload (KVMI_MSG_SIZE)", kvmi::kMaxCommandPayload);
  std::printf("  %-34s %5zu\n", "max reply payload", kvmi::kMaxReplyPayload);
  std::printf("  %-34s %5zu\n", "WRITE_PHYSICAL data per message", kvmi::kMaxWritePhysicalData);
  std::printf("  %-34s %5zu\n", "SET_PAGE_ACCESS entries", kvmi::kMaxSetPageAccessEntries);
  std::printf("  %-34s %5zu\n", "GET_PAGE_ACCESS gpas", kvmi::kMaxGetPageAccessGpas);
  std::printf("  %-34s %5zu\n", "GET_REGISTERS msrs (reply fits)", kvmi::kMaxGetRegistersMsrs);
  std::printf("  %-34s %5zu\n", "QEMU hello struct_size min", kvmi::kQemuHelloMinSize);
  std::printf("  %-34s %5zu\n", "QEMU hello struct_size max", kvmi::kQemuHelloMaxSize);
}

}  // namespace

int main() {
  std::printf("KVMI v6 ABI (version %d), as compiled into //kernel/abi\n\n", KVMI_VERSION);
  PrintCommands();
  PrintEvents();
  PrintSizes();
  PrintLimits();
  return 0;
}
