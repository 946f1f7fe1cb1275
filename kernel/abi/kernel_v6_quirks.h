// Decoders for the places where the posted v6 *kernel code* reads a request differently from its
// documented layout. Only a faithful host-side model needs them; a tool must keep sending the
// documented layout (messages.h). Added for the host model (kernel/host), see KVMI-V6-ABI.md.
#ifndef KVMID_KERNEL_ABI_KERNEL_V6_QUIRKS_H_
#define KVMID_KERNEL_ABI_KERNEL_V6_QUIRKS_H_

#include <cstdint>

#include "kernel/abi/bytes.h"
#include "kernel/abi/status.h"

namespace kvmi {

// KVMI_PAUSE_VCPU as the v6 handler sees it (§5.6 "(code, v6 as posted)"): the vcpu hdr and the
// kvmi_pause_vcpu struct are both read from the start of the payload, so
//   wait      = low byte of the vCPU index,
//   padding1  = high byte of the vCPU index (vCPU >= 256 -> -KVM_EINVAL),
//   padding2/3 = the vcpu-hdr paddings,
// and the real second 8 bytes are ignored. Missing bytes read as 0 (zeroed receive buffer).
struct PauseVcpuAsV6Kernel {
  uint16_t vcpu = 0;
  bool wait = false;             // wait == 1 only, as the kernel tests it
  bool pause_padding_ok = true;  // the overlaid kvmi_pause_vcpu paddings (checked first)
  bool vcpu_hdr_padding_ok = true;
};
// Never fails: every byte pattern is a valid input for the handler, which then replies.
PauseVcpuAsV6Kernel DecodePauseVcpuAsV6Kernel(ByteView payload);

}  // namespace kvmi

#endif  // KVMID_KERNEL_ABI_KERNEL_V6_QUIRKS_H_
