#include "daemon/api/guest_call.h"

namespace kvmid::api {

using grpc::Status;
using grpc::StatusCode;

Status GuestFinder::Lookup(const std::string& vm, std::shared_ptr<Guest>* guest) const {
  if (vm.empty()) return InvalidArgument("vm", "a UUID or name is required");
  *guest = registry_->Lookup(vm);
  if (!*guest) return Status(StatusCode::NOT_FOUND, "no guest '" + vm + "'");
  return Status::OK;
}

Status GuestFinder::Find(const std::string& vm, Target* target) const {
  Status s = Lookup(vm, &target->guest);
  if (!s.ok()) return s;
  target->session = target->guest->session();
  if (target->guest->state() != GuestState::kHooked || !target->session) {
    return Status(StatusCode::UNAVAILABLE,
                  "guest '" + vm + "' is " + GuestStateName(target->guest->state()));
  }
  return Status::OK;
}

Status GuestFinder::FindVcpu(const std::string& vm, uint32_t vcpu, Target* target) const {
  Status s = Find(vm, target);
  return s.ok() ? CheckVcpu(*target->guest, vcpu) : s;
}

Status CheckVcpu(const Guest& guest, uint32_t vcpu) {
  uint32_t count = guest.vcpu_count();
  if (vcpu < count) return Status::OK;
  return InvalidArgument("vcpu", std::to_string(vcpu) + " is not below the guest's " +
                                     std::to_string(count) + " vCPUs");
}

}  // namespace kvmid::api
