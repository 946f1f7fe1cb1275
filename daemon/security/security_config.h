// The trust boundary's part of kvmid's configuration (KvmidConfig fields 50-69: `authz`,
// `limits`, `audit_log`), parsed and validated in one call, for start-up and for reloads:
//
//   absl::StatusOr<SecurityConfig> s = SecurityFromConfig(file);   // file: config::KvmidConfig
//   if (!s.ok()) -> refuse the (re)load with s.status() (its message names the field)
//   holder.Set(s->authorizer); limits = s->limits; ...
#ifndef KVMID_DAEMON_SECURITY_SECURITY_CONFIG_H_
#define KVMID_DAEMON_SECURITY_SECURITY_CONFIG_H_

#include <absl/status/statusor.h>

#include <memory>
#include <string>

#include "daemon/config/kvmid_config.pb.h"
#include "daemon/security/authz.h"
#include "daemon/security/limits.h"

namespace kvmid {
namespace security {

struct SecurityConfig {
  std::shared_ptr<const Authorizer> authorizer;
  Limits limits;
  std::string audit_log;  // empty: none (the --audit_log flag overrides it)
};

// No `authz`, `limits` or `audit_log` in the file: Authorizer::Default(), default limits, no log.
SecurityConfig DefaultSecurityConfig();

// Also checks the file's own `policies` against the policy limits ("policies[3] (ktext):
// policy.description is 5000 bytes: over the limit ...").
absl::StatusOr<SecurityConfig> SecurityFromConfig(const config::KvmidConfig& file);

}  // namespace security
}  // namespace kvmid

#endif  // KVMID_DAEMON_SECURITY_SECURITY_CONFIG_H_
