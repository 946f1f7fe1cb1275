#include "daemon/api/inventory.h"

#include <spdlog/spdlog.h>

#include <memory>
#include <string>

#include "daemon/api/convert.h"
#include "daemon/config/policy_convert.h"

namespace kvmid::api {

using grpc::Status;
using grpc::StatusCode;

kvmi::v1::VM Inventory::Describe(const Guest& guest) {
  return ToProto(guest.Snapshot(), daemon_->pipeline().ViewOf(guest)->labels);
}

Status Inventory::ListVMs(const CallContext& call, const kvmi::v1::ListVMsRequest&,
                          kvmi::v1::ListVMsResponse* response) {
  for (const auto& guest : daemon_->registry().List()) {
    if (call.Visible(*daemon_->pipeline().ViewOf(*guest))) *response->add_vms() = Describe(*guest);
  }
  return Status::OK;
}

Status Inventory::GetVM(const CallContext& call, const kvmi::v1::GetVMRequest& request,
                        kvmi::v1::VM* response) {
  std::shared_ptr<Guest> guest;
  Status s = guests_.Lookup(request.vm(), &guest);
  if (!s.ok()) return s;
  if (!call.Visible(*daemon_->pipeline().ViewOf(*guest))) {
    return Status(StatusCode::NOT_FOUND, "no guest '" + request.vm() + "'");
  }
  *response = Describe(*guest);
  return Status::OK;
}

Status Inventory::ApplyPolicy(const kvmi::v1::ApplyPolicyRequest& request,
                              kvmi::v1::ApplyPolicyResponse* response) {
  if (!request.has_policy()) return InvalidArgument("policy", "required");
  absl::StatusOr<std::shared_ptr<Rule>> converted = PolicyToRule(request.policy());
  if (!converted.ok()) {
    return Status(StatusCode::INVALID_ARGUMENT,
                  "policy." + std::string(converted.status().message()));
  }
  std::shared_ptr<Rule> rule = *std::move(converted);
  bool existed = false;
  for (const auto& r : *daemon_->policies().rules()) existed = existed || r->name == rule->name;
  rule->origin = request.policy().SerializeAsString();  // persisted as the client sent it
  absl::Status applied = daemon_->ApplyApiPolicy(rule);
  if (!applied.ok()) {
    if (applied.code() == absl::StatusCode::kInvalidArgument) {
      return InvalidArgument("policy", std::string(applied.message()));
    }
    return ToStatus(applied);
  }
  response->set_replaced(existed);
  spdlog::info("policy {} {} through the API", rule->name, existed ? "replaced" : "applied");
  return Status::OK;
}

Status Inventory::ListPolicies(const kvmi::v1::ListPoliciesRequest&,
                               kvmi::v1::ListPoliciesResponse* response) {
  for (const auto& rule : *daemon_->policies().rules()) {
    kvmi::v1::PolicyStatus* status = response->add_policies();
    *status->mutable_policy() = RuleToPolicy(*rule);
    status->mutable_counters()->set_name(rule->name);
    status->mutable_counters()->set_hits(rule->hits.load());
    status->mutable_counters()->set_enforced(rule->enforced.load());
  }
  return Status::OK;
}

Status Inventory::DeletePolicy(const kvmi::v1::DeletePolicyRequest& request,
                               kvmi::v1::DeletePolicyResponse*) {
  if (request.name().empty()) return InvalidArgument("name", "required");
  absl::Status removed = daemon_->RemoveApiPolicy(request.name());
  if (!removed.ok()) return ToStatus(removed);
  spdlog::info("policy {} deleted through the API", request.name());
  return Status::OK;
}

}  // namespace kvmid::api
