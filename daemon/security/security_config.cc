#include "daemon/security/security_config.h"

#include <absl/strings/str_cat.h>

namespace kvmid {
namespace security {

SecurityConfig DefaultSecurityConfig() {
  SecurityConfig out;
  out.authorizer = Authorizer::Default();
  return out;
}

absl::StatusOr<SecurityConfig> SecurityFromConfig(const config::KvmidConfig& file) {
  SecurityConfig out;
  absl::StatusOr<std::shared_ptr<const Authorizer>> authz = Authorizer::FromKvmidConfig(file);
  if (!authz.ok()) return authz.status();
  out.authorizer = *std::move(authz);
  absl::StatusOr<Limits> limits = LimitsFromConfig(file);
  if (!limits.ok()) return limits.status();
  out.limits = *limits;
  for (int i = 0; i < file.policies_size(); ++i) {
    absl::Status s = CheckPolicyLimits(file.policies(i), out.limits, static_cast<size_t>(i));
    if (!s.ok()) {
      std::string where = absl::StrCat("policies[", i, "]");
      if (!file.policies(i).name().empty()) {
        absl::StrAppend(&where, " (", file.policies(i).name().substr(0, 128), ")");
      }
      return absl::Status(s.code(), absl::StrCat(where, ": ", s.message()));
    }
  }
  out.audit_log = file.audit_log();
  return out;
}

}  // namespace security
}  // namespace kvmid
