#include "daemon/api/call_context.h"

#include <utility>

namespace kvmid::api {

security::GuestRef GuestRefOf(const GuestView& guest) {
  security::GuestRef ref;
  ref.name = guest.name;
  ref.uuid = kvmi::UuidToString(guest.uuid);
  ref.labels = guest.labels;
  return ref;
}

bool CallContext::Visible(const GuestView& guest) const {
  if (!authorizer) return true;
  return authorizer->Visible(caller, GuestRefOf(guest));
}

CallContext CallContext::Unrestricted(std::string peer) {
  CallContext context;
  context.caller = security::Caller::None(std::move(peer));
  return context;
}

}  // namespace kvmid::api
