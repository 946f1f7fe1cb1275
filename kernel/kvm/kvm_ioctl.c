#include "kernel/kvm/kvm_ioctl.h"

#include <linux/kvm.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>

_Static_assert(sizeof(struct kvm_msrs) == 8, "C layout of struct kvm_msrs");
_Static_assert(sizeof(struct kvm_xsave) == 4096, "C layout of struct kvm_xsave");

struct one_msr {
  struct kvm_msrs header;
  struct kvm_msr_entry entry;
};

int kvmid_get_msr(int vcpu_fd, uint32_t index, uint64_t* value) {
  struct one_msr msrs;
  memset(&msrs, 0, sizeof(msrs));
  msrs.header.nmsrs = 1;
  msrs.entry.index = index;
  int rc = ioctl(vcpu_fd, KVM_GET_MSRS, &msrs);
  if (rc == 1) *value = msrs.entry.data;
  return rc;
}

int kvmid_set_msr(int vcpu_fd, uint32_t index, uint64_t value) {
  struct one_msr msrs;
  memset(&msrs, 0, sizeof(msrs));
  msrs.header.nmsrs = 1;
  msrs.entry.index = index;
  msrs.entry.data = value;
  return ioctl(vcpu_fd, KVM_SET_MSRS, &msrs);
}

int kvmid_get_xsave(int vcpu_fd, uint8_t region[4096]) {
  return ioctl(vcpu_fd, KVM_GET_XSAVE, (struct kvm_xsave*)region);
}

int kvmid_get_supported_cpuid(int kvm_fd, void* entries, uint32_t max) {
  size_t size = sizeof(struct kvm_cpuid2) + max * sizeof(struct kvm_cpuid_entry2);
  struct kvm_cpuid2* cpuid = calloc(1, size);
  if (!cpuid) return -1;
  cpuid->nent = max;
  int rc = ioctl(kvm_fd, KVM_GET_SUPPORTED_CPUID, cpuid);
  if (rc == 0) {
    memcpy(entries, cpuid->entries, cpuid->nent * sizeof(struct kvm_cpuid_entry2));
    rc = (int)cpuid->nent;
  }
  free(cpuid);
  return rc;
}

int kvmid_set_cpuid(int vcpu_fd, const void* entries, uint32_t count) {
  size_t size = sizeof(struct kvm_cpuid2) + count * sizeof(struct kvm_cpuid_entry2);
  struct kvm_cpuid2* cpuid = calloc(1, size);
  if (!cpuid) return -1;
  cpuid->nent = count;
  memcpy(cpuid->entries, entries, count * sizeof(struct kvm_cpuid_entry2));
  int rc = ioctl(vcpu_fd, KVM_SET_CPUID2, cpuid);
  free(cpuid);
  return rc;
}

int kvmid_set_msr_write_filter(int vm_fd, const uint32_t* msrs, uint32_t count) {
  static const uint8_t kDenied = 0; /* bit clear: the access is filtered (exits) */
  struct kvm_msr_filter filter;
  memset(&filter, 0, sizeof(filter));
  filter.flags = KVM_MSR_FILTER_DEFAULT_ALLOW;
  if (count > KVM_MSR_FILTER_MAX_RANGES) count = KVM_MSR_FILTER_MAX_RANGES;
  for (uint32_t i = 0; i < count; ++i) {
    filter.ranges[i].flags = KVM_MSR_FILTER_WRITE;
    filter.ranges[i].nmsrs = 1;
    filter.ranges[i].base = msrs[i];
    filter.ranges[i].bitmap = (uint8_t*)&kDenied;
  }
  return ioctl(vm_fd, KVM_X86_SET_MSR_FILTER, &filter);
}
