#include "kernel/abi/kernel_v6_quirks.h"

#include "kernel/uapi/kvmi.h"

namespace kvmi {

PauseVcpuAsV6Kernel DecodePauseVcpuAsV6Kernel(ByteView payload) {
  PauseVcpuAsV6Kernel out;
  kvmi_vcpu_hdr hdr;
  ByteReader(payload).ReadZeroFilled(&hdr);
  // The same bytes, read a second time as the pause struct (the v6 handler's pointer mix-up).
  kvmi_pause_vcpu overlay;
  ByteReader(payload).ReadZeroFilled(&overlay);
  out.vcpu = hdr.vcpu;
  out.wait = overlay.wait == 1;
  out.pause_padding_ok = overlay.padding1 == 0 && overlay.padding2 == 0 && overlay.padding3 == 0;
  out.vcpu_hdr_padding_ok = hdr.padding1 == 0 && hdr.padding2 == 0;
  return out;
}

}  // namespace kvmi
