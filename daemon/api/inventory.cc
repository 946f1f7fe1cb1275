#include "daemon/api/inventory.h"

#include <absl/strings/escaping.h>
#include <absl/strings/numbers.h>
#include <absl/strings/str_cat.h>
#include <absl/strings/strip.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "daemon/api/convert.h"
#include "daemon/api/limits.h"
#include "daemon/config/policy_convert.h"
#include "daemon/security/limits.h"

namespace kvmid::api {

using grpc::Status;
using grpc::StatusCode;

namespace {

// Page tokens: web-safe base64 of a version prefix and where the last page ended. ListPolicies:
// "p2/<position>" (Rule::position of the page's last policy: positions grow along evaluation
// order and a replacement keeps its own, so resuming after it is stable under any concurrent
// change); ListVMs: "v2/<uuid>" (the page's last guest; guests are listed by UUID).
constexpr absl::string_view kPolicyTokenPrefix = "p2/";
constexpr absl::string_view kVmTokenPrefix = "v2/";

std::string PageToken(absl::string_view prefix, absl::string_view last) {
  return absl::WebSafeBase64Escape(absl::StrCat(prefix, last));
}

// What follows `prefix` in a token kvmid issued, or nullopt.
std::optional<std::string> TokenValue(const std::string& token, absl::string_view prefix) {
  std::string text;
  if (!absl::WebSafeBase64Unescape(token, &text)) return std::nullopt;
  absl::string_view rest = text;
  if (!absl::ConsumePrefix(&rest, prefix) || rest.empty()) return std::nullopt;
  return std::string(rest);
}

constexpr char kBadToken[] = "not a token kvmid issued (pass next_page_token as it came)";

// What one policy adds to a ListPolicies response, without converting it when it came from a
// client: its serialized policy, its name again in the counters and its etag (PolicyPageEnd
// adds the rest of the framing).
size_t ListedBytes(const Rule& rule) {
  const size_t policy =
      rule.origin.empty() ? RuleToPolicy(rule).ByteSizeLong() : rule.origin.size();
  return policy + rule.name.size() + rule.etag.size();
}

kvmi::v1::PolicyOrigin OriginOf(const Rule& rule) {
  switch (rule.source) {
    case PolicySource::kConfig:
      return kvmi::v1::POLICY_ORIGIN_CONFIG;
    case PolicySource::kApi:
      return rule.overrides_config ? kvmi::v1::POLICY_ORIGIN_API_OVERRIDE
                                   : kvmi::v1::POLICY_ORIGIN_API;
    case PolicySource::kCode:
      return kvmi::v1::POLICY_ORIGIN_BUILTIN;
  }
  return kvmi::v1::POLICY_ORIGIN_UNSPECIFIED;
}

}  // namespace

kvmi::v1::VM Inventory::Describe(const Guest& guest) {
  return ToProto(guest.Snapshot(), daemon_->pipeline().ViewOf(guest)->labels);
}

Status Inventory::ListVMs(const CallContext& call, const kvmi::v1::ListVMsRequest& request,
                          kvmi::v1::ListVMsResponse* response) {
  std::optional<kvmi::Uuid> after;
  if (!request.page_token().empty()) {
    std::optional<std::string> last = TokenValue(request.page_token(), kVmTokenPrefix);
    kvmi::Uuid uuid;
    if (!last || !kvmi::ParseUuid(*last, &uuid)) return InvalidArgument("page_token", kBadToken);
    after = uuid;
  }
  const uint32_t page_size = request.page_size() == 0
                                 ? kListVMsDefaultPageSize
                                 : std::min(request.page_size(), kListVMsMaxPageSize);
  // The visible guests after the token, by UUID.
  std::vector<std::pair<kvmi::Uuid, std::shared_ptr<Guest>>> guests;
  for (auto& guest : daemon_->registry().List()) {
    const std::shared_ptr<const GuestView> view = daemon_->pipeline().ViewOf(*guest);
    if ((after && !(*after < view->uuid)) || !call.Visible(*view)) continue;
    guests.emplace_back(view->uuid, std::move(guest));
  }
  std::sort(guests.begin(), guests.end(),
            [](const auto& a, const auto& b) { return a.first < b.first; });
  size_t bytes = 0;
  size_t listed = 0;
  for (const auto& [uuid, guest] : guests) {
    if (listed == page_size || (listed > 0 && bytes >= kListVMsMaxPageBytes)) break;
    kvmi::v1::VM* vm = response->add_vms();
    *vm = Describe(*guest);
    bytes += vm->ByteSizeLong();
    ++listed;
  }
  if (listed < guests.size()) {
    response->set_next_page_token(
        PageToken(kVmTokenPrefix, kvmi::UuidToString(guests[listed - 1].first)));
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

namespace {

// The request's expectations of the policy it names.
PolicyPrecondition PreconditionOf(const std::string& etag, bool allow_replace,
                                  bool override_config) {
  PolicyPrecondition precondition;
  precondition.etag = etag;
  precondition.allow_replace = allow_replace;
  precondition.override_config = override_config;
  return precondition;
}

}  // namespace

Status Inventory::ApplyPolicy(const kvmi::v1::ApplyPolicyRequest& request,
                              kvmi::v1::ApplyPolicyResponse* response) {
  if (!request.has_policy()) return InvalidArgument("policy", "required");
  if (request.etag().size() > kMaxEtagBytes) {
    return InvalidArgument(
        "etag", absl::StrCat("longer than ", kMaxEtagBytes, " bytes: not an etag kvmid issued"));
  }
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
  rule->origin = request.policy().SerializeAsString();  // persisted as the client sent it
  absl::StatusOr<PolicyWrite> applied = daemon_->ApplyApiPolicy(
      rule, PreconditionOf(request.etag(), request.allow_replace(), request.override_config()));
  if (!applied.ok()) {
    if (applied.status().code() == absl::StatusCode::kInvalidArgument) {
      return InvalidArgument("policy", std::string(applied.status().message()));
    }
    return ToStatus(applied.status());
  }
  const bool replaced = applied->previous != nullptr;
  response->set_replaced(replaced);
  response->set_etag(applied->rule->etag);
  response->set_overrode_config(applied->overrode_config());
  if (applied->overrode_config()) {
    spdlog::warn(
        "policy {} from the configuration replaced through the API (override_config, etag {}); "
        "the next reload or restart puts the configuration's version back",
        rule->name, applied->rule->etag);
  } else {
    spdlog::info("policy {} {} through the API (etag {})", rule->name,
                 replaced ? "replaced" : "created", applied->rule->etag);
  }
  return Status::OK;
}

Status Inventory::ListPolicies(const kvmi::v1::ListPoliciesRequest& request,
                               kvmi::v1::ListPoliciesResponse* response) {
  const PolicySet::Snapshot rules = daemon_->policies().rules();
  size_t start = 0;
  if (!request.page_token().empty()) {
    std::optional<std::string> last = TokenValue(request.page_token(), kPolicyTokenPrefix);
    uint64_t position = 0;
    if (!last || !absl::SimpleAtoi(*last, &position)) {
      return InvalidArgument("page_token", kBadToken);
    }
    // Positions grow along the list: the page starts at the first policy after that one.
    start = static_cast<size_t>(
        std::upper_bound(rules->begin(), rules->end(), position,
                         [](uint64_t p, const auto& rule) { return p < rule->position; }) -
        rules->begin());
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
    status->set_etag(rule.etag);
    status->set_origin(OriginOf(rule));
    bytes += sizes[i - start];
  }
  if (end < rules->size()) {
    response->set_next_page_token(
        PageToken(kPolicyTokenPrefix, std::to_string((*rules)[end - 1]->position)));
  }
  // Nothing of the response is kept: gRPC frees it once sent, and the trimmer gives a big one
  // back to the kernel.
  daemon_->memory_trimmer().Freed(bytes);
  return Status::OK;
}

Status Inventory::DeletePolicy(const kvmi::v1::DeletePolicyRequest& request,
                               kvmi::v1::DeletePolicyResponse* response) {
  if (request.name().empty()) return InvalidArgument("name", "required");
  if (request.etag().size() > kMaxEtagBytes) {
    return InvalidArgument(
        "etag", absl::StrCat("longer than ", kMaxEtagBytes, " bytes: not an etag kvmid issued"));
  }
  absl::StatusOr<PolicyWrite> removed = daemon_->RemoveApiPolicy(
      request.name(), PreconditionOf(request.etag(), false, request.override_config()));
  if (!removed.ok()) return ToStatus(removed.status());
  response->set_overrode_config(removed->overrode_config());
  if (removed->overrode_config()) {
    spdlog::warn(
        "policy {} from the configuration deleted through the API (override_config); the next "
        "reload or restart puts it back",
        request.name());
  } else {
    spdlog::info("policy {} deleted through the API", request.name());
  }
  return Status::OK;
}

}  // namespace kvmid::api
