/* The KVM ioctls whose argument structs end in a flexible array. Linux 6.1's headers declare those
 * arrays so that the structs have different sizes in C and C++ (docs/BUILDING.md, pitfall 1), and
 * the size is part of the ioctl number: from C++, KVM_GET_MSRS is a different, unknown ioctl.
 * These wrappers are compiled as C, where the numbers are the kernel's. Each returns the ioctl's
 * result (-1 with errno on failure). */
#ifndef KVMID_KERNEL_KVM_KVM_IOCTL_H_
#define KVMID_KERNEL_KVM_KVM_IOCTL_H_

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* KVM_GET_MSRS / KVM_SET_MSRS for one MSR: 1 if done, 0 if KVM refused the index, -1 on error. */
int kvmid_get_msr(int vcpu_fd, uint32_t index, uint64_t* value);
int kvmid_set_msr(int vcpu_fd, uint32_t index, uint64_t value);
/* KVM_GET_XSAVE into a 4096-byte buffer. */
int kvmid_get_xsave(int vcpu_fd, uint8_t region[4096]);
/* KVM_GET_SUPPORTED_CPUID (system fd) into `entries` (struct kvm_cpuid_entry2[max]); returns the
 * number of entries or -1. */
int kvmid_get_supported_cpuid(int kvm_fd, void* entries, uint32_t max);
/* KVM_SET_CPUID2 from `entries` (struct kvm_cpuid_entry2[count]). */
int kvmid_set_cpuid(int vcpu_fd, const void* entries, uint32_t count);
/* KVM_X86_SET_MSR_FILTER: default allow, writes to each of `msrs` denied (exit to user space
 * with KVM_MSR_EXIT_REASON_FILTER); count <= 16 (KVM_MSR_FILTER_MAX_RANGES). */
int kvmid_set_msr_write_filter(int vm_fd, const uint32_t* msrs, uint32_t count);

#ifdef __cplusplus
}
#endif

#endif /* KVMID_KERNEL_KVM_KVM_IOCTL_H_ */
