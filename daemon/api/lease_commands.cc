// GuestCommands that change what a lease owns: pauses, page restrictions and arming.
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "daemon/api/guest_commands.h"
#include "daemon/config/policy_convert.h"
#include "kernel/abi/protocol.h"

namespace kvmid::api {

using grpc::Status;
using grpc::StatusCode;

Status GuestCommands::PauseVCPU(const OwnerId& owner, Context* context,
                                const kvmi::v1::PauseVCPURequest& request,
                                kvmi::v1::PauseVCPUResponse* response) {
  Target target;
  Status s = request.has_vcpu() ? guests_.FindVcpu(request.vm(), request.vcpu(), &target)
                                : guests_.Find(request.vm(), &target);
  if (!s.ok()) return s;
  std::vector<uint16_t> vcpus;
  if (request.has_vcpu()) {
    vcpus.push_back(static_cast<uint16_t>(request.vcpu()));
  } else {
    uint32_t count = target.guest->vcpu_count();
    for (uint32_t v = 0; v < count; ++v) vcpus.push_back(static_cast<uint16_t>(v));
  }
  std::vector<Waiter<CommandResult>> waiters(vcpus.size());
  for (size_t i = 0; i < vcpus.size(); ++i) {
    target.guest->Pause(owner, vcpus[i], waiters[i].callback());
  }
  for (size_t i = 0; i < vcpus.size(); ++i) {
    CommandResult result;
    if (!(s = Await(context, &waiters[i], &result)).ok()) return s;
    if (!result.ok()) return ToStatus(result, "PauseVCPU " + std::to_string(vcpus[i]));
    response->add_paused(vcpus[i]);
    response->add_event_ids(target.guest->PausedEventId(vcpus[i]));
  }
  return Status::OK;
}

// Resumes what `owner` paused; a guest in any state (a pause outlives nothing but its owner).
Status GuestCommands::ResumeVCPU(const OwnerId& owner, Context*,
                                 const kvmi::v1::ResumeVCPURequest& request,
                                 kvmi::v1::ResumeVCPUResponse* response) {
  std::shared_ptr<Guest> guest;
  Status s = guests_.Lookup(request.vm(), &guest);
  if (!s.ok()) return s;
  GuestSnapshot snapshot = guest->Snapshot();
  for (const auto& [vcpu, holder] : snapshot.paused_vcpus) {
    if (holder != owner) continue;
    if (request.has_vcpu() && vcpu != request.vcpu()) continue;
    if (guest->Resume(owner, vcpu)) response->add_resumed(vcpu);
  }
  if (request.has_vcpu() && response->resumed_size() == 0) {
    return Status(StatusCode::FAILED_PRECONDITION,
                  "vCPU " + std::to_string(request.vcpu()) + " is not paused by " + owner);
  }
  return Status::OK;
}

// Pages set through the API belong to the caller's lease (restore them with "rwx").
Status GuestCommands::SetPageAccess(const OwnerId& owner, Context* context,
                                    const kvmi::v1::SetPageAccessRequest& request,
                                    kvmi::v1::SetPageAccessResponse* response) {
  Target target;
  Status s = guests_.Find(request.vm(), &target);
  if (!s.ok()) return s;
  if (request.pages_size() == 0 || request.pages_size() > kMaxPagesPerCall) {
    return InvalidArgument("pages", "1 .. " + std::to_string(kMaxPagesPerCall) + " pages");
  }
  std::vector<std::pair<uint64_t, uint8_t>> pages;
  for (int i = 0; i < request.pages_size(); ++i) {
    uint8_t access;
    if (!ParseAccess(request.pages(i).access(), &access)) {
      return InvalidArgument("pages[" + std::to_string(i) + "].access",
                             "'" + request.pages(i).access() + "' is not made of r, w, x");
    }
    pages.emplace_back(request.pages(i).gpa() / KVMI_PAGE_SIZE, access);
  }
  struct Outcome {
    std::vector<int32_t> errors;
    bool rolled_back = false;
  };
  Waiter<Outcome> waiter;
  target.guest->SetPages(owner, std::move(pages), request.all_or_nothing(),
                         [done = waiter.callback()](std::vector<int32_t> errors, bool rolled_back) {
                           done(Outcome{std::move(errors), rolled_back});
                         });
  Outcome outcome;
  if (!(s = Await(context, &waiter, &outcome)).ok()) return s;
  for (int i = 0; i < request.pages_size(); ++i) {
    kvmi::v1::PageResult* result = response->add_results();
    result->set_gpa(request.pages(i).gpa());
    if (outcome.errors[i] != 0) result->set_error(kvmi::ErrorName(outcome.errors[i]));
  }
  response->set_rolled_back(outcome.rolled_back);
  return Status::OK;
}

namespace {

// A ControlEvents request as an edit of a lease, checked against what the guest allows.
Status ParseEdit(const kvmi::v1::ControlEventsRequest& request, const Guest& guest,
                 ArmingEdit* edit) {
  if (request.events_size() == 0 && request.crs_size() == 0 && request.msrs_size() == 0) {
    return InvalidArgument("events", "name at least one event, CR or MSR");
  }
  edit->enable = request.enable();
  if (request.has_vcpu()) edit->vcpu = static_cast<uint16_t>(request.vcpu());
  for (int i = 0; i < request.events_size(); ++i) {
    const std::string field = "events[" + std::to_string(i) + "]";
    uint8_t id;
    if (!FromEventType(request.events(i), &id) || id == KVMI_EVENT_PAUSE_VCPU) {
      return InvalidArgument(field, "not an event that can be enabled (PAUSE_VCPU is always on)");
    }
    if (!guest.EventAllowed(id)) {
      return Status(StatusCode::PERMISSION_DENIED,
                    field + ": the host does not allow " + kvmi::EventName(id) + " for this guest");
    }
    if (kvmi::FindEvent(id)->vm_event) {
      if (edit->vcpu) return InvalidArgument(field, "a VM event cannot be set for one vCPU");
      edit->vm_events.insert(id);
    } else {
      edit->intercepts.events.insert(id);
    }
  }
  for (int i = 0; i < request.crs_size(); ++i) {
    if (!kvmi::IsControllableCr(request.crs(i))) {
      return InvalidArgument("crs[" + std::to_string(i) + "]", kvmi::kControllableCrs);
    }
    edit->intercepts.crs.insert(request.crs(i));
  }
  for (int i = 0; i < request.msrs_size(); ++i) {
    if (!kvmi::IsControllableMsr(request.msrs(i))) {
      return InvalidArgument("msrs[" + std::to_string(i) + "]", kvmi::kControllableMsrs);
    }
    edit->intercepts.msrs.insert(request.msrs(i));
  }
  return Status::OK;
}

}  // namespace

Status GuestCommands::ControlEvents(const OwnerId& owner, Context* context,
                                    const kvmi::v1::ControlEventsRequest& request,
                                    kvmi::v1::ControlEventsResponse* response) {
  Target target;
  Status s = request.has_vcpu() ? guests_.FindVcpu(request.vm(), request.vcpu(), &target)
                                : guests_.Find(request.vm(), &target);
  if (!s.ok()) return s;
  ArmingEdit edit;
  if (!(s = ParseEdit(request, *target.guest, &edit)).ok()) return s;
  Waiter<std::vector<std::string>> armed;
  Arming lease = target.guest->UpdateLease(
      owner, [&edit](Arming* arming) { arming->Apply(edit); }, armed.callback());
  *response->mutable_lease() = ToProto(owner, lease);
  // Answer once the host has acknowledged what this change sent (bounded by kvmid's command
  // timeout), with the commands it refused.
  std::vector<std::string> errors;
  if (!(s = Await(context, &armed, &errors)).ok()) return s;
  for (std::string& e : errors) response->add_arm_errors(std::move(e));
  return Status::OK;
}

}  // namespace kvmid::api
