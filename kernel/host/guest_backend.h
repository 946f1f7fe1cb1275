// What the KVMI engine needs from "KVM": the state of one VM and its vCPUs. The engine (vm_
// introspection.h) implements the v6 kernel's introspection subsystem once; a backend supplies the
// guest -- the simulator (kernel/sim) today, a /dev/kvm VMM later. One engine, two backends.
//
// Threading contract: methods taking a vCPU index are called on that vCPU's own thread (the
// engine runs vCPU commands there, as the kernel does), except VcpuCount/VcpuInitialized which any
// thread may call. Memory methods are called from the receive thread and from vCPU threads.
#ifndef KVMID_KERNEL_HOST_GUEST_BACKEND_H_
#define KVMID_KERNEL_HOST_GUEST_BACKEND_H_

#include <cstddef>
#include <cstdint>
#include <optional>
#include <vector>

#include "kernel/uapi/kvmi.h"

namespace kvmi::host {

// A flat (base 0, 4 GiB, present, DPL 0) code or data segment as KVM describes it, for a
// backend's initial vCPU state: `type` as in the descriptor, `code64` for a long-mode code segment.
inline kvm_segment FlatSegment(uint16_t selector, uint8_t type, bool code64) {
  kvm_segment s{};
  s.base = 0;
  s.limit = 0xffffffff;
  s.selector = selector;
  s.type = type;
  s.present = 1;
  s.s = 1;
  s.l = code64 ? 1 : 0;
  s.db = code64 ? 0 : 1;
  s.g = 1;
  return s;
}

struct CpuidLeaf {
  uint32_t eax = 0, ebx = 0, ecx = 0, edx = 0;
};

class GuestBackend {
 public:
  virtual ~GuestBackend() = default;

  // ---- vCPUs (any thread) ----
  // Online vCPUs; indices are 0..VcpuCount()-1.
  virtual uint32_t VcpuCount() const = 0;
  // False while the vCPU is KVM_MP_STATE_UNINITIALIZED (created, never run): commands get
  // -KVM_EAGAIN.
  virtual bool VcpuInitialized(uint16_t vcpu) const = 0;

  // ---- vCPU state (the vCPU's thread) ----
  virtual void GetRegs(uint16_t vcpu, kvm_regs* regs) = 0;
  virtual void SetRegs(uint16_t vcpu, const kvm_regs& regs) = 0;
  virtual void GetSregs(uint16_t vcpu, kvm_sregs* sregs) = 0;
  // False if the MSR cannot be read (unknown index): GET_REGISTERS answers -KVM_EINVAL.
  virtual bool GetMsr(uint16_t vcpu, uint32_t index, uint64_t* value) = 0;
  virtual std::optional<CpuidLeaf> GetCpuid(uint16_t vcpu, uint32_t function, uint32_t index) = 0;
  // The KVM_GET_XSAVE image (4096 bytes in v6).
  virtual void GetXsave(uint16_t vcpu, std::vector<uint8_t>* region) = 0;
  // Guest TSC frequency in Hz, 0 if the host cannot scale the TSC.
  virtual uint64_t TscSpeedHz(uint16_t vcpu) = 0;
  virtual uint8_t MtrrType(uint16_t vcpu, uint64_t gpa) = 0;

  // ---- guest physical memory (any thread) ----
  // True if gpa lies in a memslot (guest RAM).
  virtual bool IsGuestPhysical(uint64_t gpa) const = 0;
  // Within one 4 KiB page; false if the page is not backed.
  virtual bool ReadPhysical(uint64_t gpa, void* buf, size_t size) = 0;
  virtual bool WritePhysical(uint64_t gpa, const void* buf, size_t size) = 0;

  // ---- interception controls the engine turns on and off (VMX knobs on real hardware) ----
  // KVM guest debug SW breakpoints; returns 0 or a negative errno that CONTROL_EVENTS forwards.
  virtual int SetBreakpointInterception(uint16_t vcpu, bool enable) { return 0; }
  // Descriptor-table exiting; -KVM_EOPNOTSUPP when the CPU lacks it.
  virtual int SetDescriptorInterception(uint16_t vcpu, bool enable) { return 0; }
  virtual void SetCr3LoadExiting(uint16_t vcpu, bool enable) {}
  virtual void SetMsrWriteInterception(uint16_t vcpu, uint32_t msr, bool enable) {}
  // The tool's page restriction changed (the engine keeps the table; a hardware backend updates
  // EPT here). access == KVMI_PAGE_ACCESS_RWX means "no restriction".
  virtual void OnPageAccessChanged(uint64_t gfn, uint8_t access) {}
  // Intel sub-page protection: whether the hardware has it.
  virtual bool SppSupported() const { return false; }

  // ---- leaving guest mode ----
  // The engine queued work for this vCPU (a command, PAUSE_VCPU, CREATE_VCPU) and it must reach
  // RunJobs soon. A vCPU inside KVM_RUN has to be forced out (immediate_exit + a signal); the
  // simulator's vCPUs wait on the engine's condition variable and need nothing. Any thread, may be
  // called with the engine's locks held: must not call back into the engine.
  virtual void KickVcpu(uint16_t vcpu) {}

  // ---- actions ----
  // KVMI_EVENT_ACTION_CRASH: the kernel sends SIGTERM to every vCPU thread. Called on the vCPU
  // thread that received the reply.
  virtual void Crash() = 0;
};

}  // namespace kvmi::host

#endif  // KVMID_KERNEL_HOST_GUEST_BACKEND_H_
