#include "daemon/api/inventory.h"

#include <absl/strings/escaping.h>
#include <absl/strings/numbers.h>
#include <absl/strings/str_cat.h>
#include <absl/strings/strip.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <memory>
#include <string>
#include <vector>

#include "daemon/api/convert.h"
#include "daemon/config/policy_convert.h"
#include "daemon/security/limits.h"

namespace kvmid::api {

using grpc::Status;
using grpc::StatusCode;

namespace {

// ListPolicies' page token: web-safe base64 of "v1/<index>/<name>", the last policy of the page.
// The next page starts after that name, or at its index if it was deleted meanwhile.
constexpr absl::string_view kPageTokenVersion = "v1/";

std::string PageToken(size_t last_index, const std::string& last_name) {
  return absl::WebSafeBase64Escape(absl::StrCat(kPageTokenVersion, last_index, "/", last_name));
}

// Where the page after `token` starts in `rules`, or false for a token kvmid did not issue.
bool PageStart(const std::string& token, const std::vector<std::shared_ptr<const Rule>>& rules,
               size_t* start) {
  std::string text;
  if (!absl::WebSafeBase64Unescape(token, &text)) return false;
  absl::string_view rest = text;
  if (!absl::ConsumePrefix(&rest, kPageTokenVersion)) return false;
  const size_t slash = rest.find('/');
  size_t index = 0;
  if (slash == absl::string_view::npos || !absl::SimpleAtoi(rest.substr(0, slash), &index)) {
    return false;
  }
  const absl::string_view name = rest.substr(slash + 1);
  if (name.empty()) return false;
  auto it =
      std::find_if(rules.begin(), rules.end(), [&](const auto& r) { return r->name == name; });
  *start = it != rules.end() ? static_cast<size_t>(it - rules.begin()) + 1
                             : std::min(index, rules.size());
  return true;
}

// What one policy adds to a ListPolicies response, without converting it when it came from a
// client: its serialized policy and its name again in the counters (PolicyPageEnd adds the
// rest of the framing).
size_t ListedBytes(const Rule& rule) {
  const size_t policy =
      rule.origin.empty() ? RuleToPolicy(rule).ByteSizeLong() : rule.origin.size();
  return policy + rule.name.size();
}

}  // namespace

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
  // The size bounds before any copy is made (Daemon::ApplyApiPolicy checks them again with the
  // count, atomically with the insertion).
  const kvmi::v1::Policy& policy = request.policy();
  if (absl::Status within = security::CheckPolicySizes(policy.name(), policy.description().size(),
                                                       policy.ByteSizeLong(), daemon_->limits());
      !within.ok()) {
    daemon_->memory_trimmer().Freed(policy.ByteSizeLong());  // the request goes with the call
    return ToStatus(within);
  }
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

Status Inventory::ListPolicies(const kvmi::v1::ListPoliciesRequest& request,
                               kvmi::v1::ListPoliciesResponse* response) {
  const PolicySet::Snapshot rules = daemon_->policies().rules();
  size_t start = 0;
  if (!request.page_token().empty() && !PageStart(request.page_token(), *rules, &start)) {
    return InvalidArgument("page_token", "not a token kvmid issued (pass next_page_token as is)");
  }
  security::Limits page = daemon_->limits();
  if (request.page_size() != 0 && request.page_size() < page.list_policies_page_size) {
    page.list_policies_page_size = request.page_size();
  }
  // The sizes of the page's candidates only (at most page_size of them), in list order.
  std::vector<size_t> sizes;
  const size_t window_end = std::min<size_t>(rules->size(), start + page.list_policies_page_size);
  sizes.reserve(window_end - start);
  for (size_t i = start; i < window_end; ++i) sizes.push_back(ListedBytes(*(*rules)[i]));
  const size_t end = start + security::PolicyPageEnd(sizes, 0, page);
  size_t bytes = 0;
  for (size_t i = start; i < end; ++i) {
    const Rule& rule = *(*rules)[i];
    kvmi::v1::PolicyStatus* status = response->add_policies();
    *status->mutable_policy() = RuleToPolicy(rule);
    status->mutable_counters()->set_name(rule.name);
    status->mutable_counters()->set_hits(rule.hits.load());
    status->mutable_counters()->set_enforced(rule.enforced.load());
    bytes += sizes[i - start];
  }
  if (end < rules->size())
    response->set_next_page_token(PageToken(end - 1, (*rules)[end - 1]->name));
  // Nothing of the response is kept: gRPC frees it once sent, and the trimmer gives a big one
  // back to the kernel.
  daemon_->memory_trimmer().Freed(bytes);
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
