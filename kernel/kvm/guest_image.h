// The guest kernel (kernel/kvm/guest), built by this repository's BUILD and linked into the VMM
// as a flat binary.
#ifndef KVMID_KERNEL_KVM_GUEST_IMAGE_H_
#define KVMID_KERNEL_KVM_GUEST_IMAGE_H_

#include <cstdint>
#include <vector>

namespace kvmi::kvm {

std::vector<uint8_t> GuestImage();

}  // namespace kvmi::kvm

#endif  // KVMID_KERNEL_KVM_GUEST_IMAGE_H_
