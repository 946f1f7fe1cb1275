// Between the public Policy message (proto/kvmi/v1/policy.proto) and the daemon's Rule. One
// place validates a policy, whether it comes from the configuration file or from a client.
#ifndef KVMID_DAEMON_CONFIG_POLICY_CONVERT_H_
#define KVMID_DAEMON_CONFIG_POLICY_CONVERT_H_

#include <absl/status/statusor.h>

#include <memory>
#include <string>

#include "daemon/verdict/policy.h"
#include "proto/kvmi/v1/policy.pb.h"

namespace kvmid {

// The rule, or InvalidArgument naming the field ("protect_pages.allowed: ..."). mode is
// required: MODE_UNSPECIFIED is "mode: required ...".
absl::StatusOr<std::shared_ptr<Rule>> PolicyToRule(const kvmi::v1::Policy& policy);
// For listing: the rule as a policy message (templates come back as `match` rules).
kvmi::v1::Policy RuleToPolicy(const Rule& rule);

// KVMI event id <-> EventType (value = id + 1).
kvmi::v1::EventType ToEventType(uint8_t kvmi_event);
bool FromEventType(kvmi::v1::EventType type, uint8_t* kvmi_event);
// "rwx" letters <-> KVMI_PAGE_ACCESS_* bits.
bool ParseAccess(const std::string& letters, uint8_t* access);
std::string AccessLetters(uint8_t access);

}  // namespace kvmid

#endif  // KVMID_DAEMON_CONFIG_POLICY_CONVERT_H_
