#include "kernel/kvm/guest_image.h"

// Symbols of guest_image.o (objcopy -I binary, see BUILD.bazel).
extern "C" const uint8_t kvmid_guest_image_start[];
extern "C" const uint8_t kvmid_guest_image_end[];

namespace kvmi::kvm {

std::vector<uint8_t> GuestImage() {
  return std::vector<uint8_t>(kvmid_guest_image_start, kvmid_guest_image_end);
}

}  // namespace kvmi::kvm
