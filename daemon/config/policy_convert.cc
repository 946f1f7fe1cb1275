#include "daemon/config/policy_convert.h"

#include "kernel/abi/handshake.h"

namespace kvmid {

kvmi::v1::EventType ToEventType(uint8_t kvmi_event) {
  return static_cast<kvmi::v1::EventType>(kvmi_event + 1);
}

bool FromEventType(kvmi::v1::EventType type, uint8_t* kvmi_event) {
  if (type <= kvmi::v1::EVENT_TYPE_UNSPECIFIED || static_cast<int>(type) > KVMI_NUM_EVENTS) {
    return false;
  }
  *kvmi_event = static_cast<uint8_t>(type - 1);
  return true;
}

bool ParseAccess(const std::string& letters, uint8_t* access) {
  uint8_t bits = 0;
  for (char c : letters) {
    if (c == 'r') {
      bits |= KVMI_PAGE_ACCESS_R;
    } else if (c == 'w') {
      bits |= KVMI_PAGE_ACCESS_W;
    } else if (c == 'x') {
      bits |= KVMI_PAGE_ACCESS_X;
    } else if (c != '-') {
      return false;
    }
  }
  *access = bits;
  return true;
}

std::string AccessLetters(uint8_t access) {
  std::string s;
  if (access & KVMI_PAGE_ACCESS_R) s += 'r';
  if (access & KVMI_PAGE_ACCESS_W) s += 'w';
  if (access & KVMI_PAGE_ACCESS_X) s += 'x';
  return s.empty() ? "-" : s;
}

namespace {

absl::Status ConvertAction(kvmi::v1::Action action, RuleAction fallback, RuleAction* out) {
  switch (action) {
    case kvmi::v1::ACTION_UNSPECIFIED:
      *out = fallback;
      return absl::OkStatus();
    case kvmi::v1::ACTION_CONTINUE:
      *out = RuleAction::kContinue;
      return absl::OkStatus();
    case kvmi::v1::ACTION_RETRY:
      *out = RuleAction::kRetry;
      return absl::OkStatus();
    case kvmi::v1::ACTION_CRASH:
      *out = RuleAction::kCrash;
      return absl::OkStatus();
    case kvmi::v1::ACTION_KEEP_OLD:
      *out = RuleAction::kKeepOld;
      return absl::OkStatus();
    default:
      return absl::InvalidArgumentError("action: unknown value " + std::to_string(action));
  }
}

kvmi::v1::Action ToProtoAction(RuleAction action) {
  switch (action) {
    case RuleAction::kContinue:
      return kvmi::v1::ACTION_CONTINUE;
    case RuleAction::kRetry:
      return kvmi::v1::ACTION_RETRY;
    case RuleAction::kCrash:
      return kvmi::v1::ACTION_CRASH;
    case RuleAction::kKeepOld:
      return kvmi::v1::ACTION_KEEP_OLD;
  }
  return kvmi::v1::ACTION_UNSPECIFIED;
}

}  // namespace

absl::StatusOr<std::shared_ptr<Rule>> PolicyToRule(const kvmi::v1::Policy& policy) {
  RuleMode mode;
  switch (policy.mode()) {
    case kvmi::v1::MODE_UNSPECIFIED:  // refused below, once the rest is known to be valid
    case kvmi::v1::MODE_ENFORCE:
      mode = RuleMode::kEnforce;
      break;
    case kvmi::v1::MODE_MONITOR:
      mode = RuleMode::kMonitor;
      break;
    default:
      return absl::InvalidArgumentError("mode: unknown value " + std::to_string(policy.mode()));
  }
  if (policy.name().empty()) return absl::InvalidArgumentError("name: must not be empty");
  std::shared_ptr<Rule> rule;
  RuleAction action;
  absl::Status error;
  switch (policy.rule_case()) {
    case kvmi::v1::Policy::kProtectPages: {
      const auto& p = policy.protect_pages();
      uint8_t allowed;
      if (!ParseAccess(p.allowed(), &allowed)) {
        return absl::InvalidArgumentError("protect_pages.allowed: '" + p.allowed() +
                                          "' is not made of r, w, x");
      }
      if (p.gpa_first() > p.gpa_last())
        return absl::InvalidArgumentError("protect_pages: gpa_first is above gpa_last");
      if (allowed == KVMI_PAGE_ACCESS_RWX)
        return absl::InvalidArgumentError("protect_pages.allowed: rwx protects nothing");
      if (!(error = ConvertAction(policy.action(), RuleAction::kRetry, &action)).ok()) return error;
      if ((p.gpa_last() - p.gpa_first()) / KVMI_PAGE_SIZE >= kMaxProtectedPages) {
        return absl::InvalidArgumentError(
            "protect_pages: the range covers more than " +
            std::to_string(kMaxProtectedPages * KVMI_PAGE_SIZE >> 30) + " GiB");
      }
      rule = ProtectPagesRule(policy.name(), p.gpa_first(), p.gpa_last(), allowed, action, mode);
      break;
    }
    case kvmi::v1::Policy::kForbidCrBitsClear: {
      const auto& p = policy.forbid_cr_bits_clear();
      if (p.cr() != 0 && p.cr() != 3 && p.cr() != 4)
        return absl::InvalidArgumentError("forbid_cr_bits_clear.cr: must be 0, 3 or 4");
      if (p.bits() == 0)
        return absl::InvalidArgumentError("forbid_cr_bits_clear.bits: must not be 0");
      if (!(error = ConvertAction(policy.action(), RuleAction::kKeepOld, &action)).ok())
        return error;
      rule = std::make_shared<Rule>();
      rule->name = policy.name();
      rule->match.events = {KVMI_EVENT_CR};
      rule->match.cr = p.cr();
      rule->match.cr_bits_cleared = p.bits();
      rule->action = action;
      rule->mode = mode;
      rule->arms.vcpu_events = {KVMI_EVENT_CR};
      rule->arms.crs = {p.cr()};
      break;
    }
    case kvmi::v1::Policy::kLockMsr: {
      uint32_t msr = policy.lock_msr().msr();
      bool low = msr <= KVMI_MSR_LOW_LAST;
      bool high = msr >= KVMI_MSR_HIGH_FIRST && msr <= KVMI_MSR_HIGH_LAST;
      if (!low && !high)
        return absl::InvalidArgumentError(
            "lock_msr.msr: KVMI tracks 0-0x1fff and 0xc0000000-0xc0001fff");
      if (!(error = ConvertAction(policy.action(), RuleAction::kKeepOld, &action)).ok())
        return error;
      rule = LockMsrAfterBootRule(policy.name(), msr, mode);
      rule->action = action;
      break;
    }
    case kvmi::v1::Policy::kMatch: {
      const auto& m = policy.match();
      rule = std::make_shared<Rule>();
      rule->name = policy.name();
      for (int i = 0; i < m.events_size(); ++i) {
        uint8_t id;
        if (!FromEventType(m.events(i), &id)) {
          return absl::InvalidArgumentError("match.events[" + std::to_string(i) +
                                            "]: unknown event type");
        }
        rule->match.events.insert(id);
        if (id != KVMI_EVENT_CREATE_VCPU && id != KVMI_EVENT_UNHOOK &&
            id != KVMI_EVENT_PAUSE_VCPU) {
          rule->arms.vcpu_events.insert(id);
        }
      }
      for (uint32_t vcpu : m.vcpus()) {
        if (vcpu > 0xffff)
          return absl::InvalidArgumentError("match.vcpus: " + std::to_string(vcpu) +
                                            " is not a vCPU index");
        rule->match.vcpus.insert(static_cast<uint16_t>(vcpu));
      }
      if (m.has_cr()) {
        if (m.cr() != 0 && m.cr() != 3 && m.cr() != 4)
          return absl::InvalidArgumentError("match.cr: must be 0, 3 or 4");
        rule->match.cr = m.cr();
        rule->arms.crs.insert(m.cr());
        rule->arms.vcpu_events.insert(KVMI_EVENT_CR);
      }
      rule->match.cr_bits_cleared = m.cr_bits_cleared();
      rule->match.cr_bits_set = m.cr_bits_set();
      if (m.has_msr()) {
        rule->match.msr = m.msr();
        rule->arms.msrs.insert(m.msr());
        rule->arms.vcpu_events.insert(KVMI_EVENT_MSR);
      }
      rule->match.msr_after_boot_only = m.msr_after_boot_only();
      if (m.has_gpa_first()) rule->match.gpa_first = m.gpa_first();
      if (m.has_gpa_last()) rule->match.gpa_last = m.gpa_last();
      if (!ParseAccess(m.access(), &rule->match.access)) {
        return absl::InvalidArgumentError("match.access: '" + m.access() +
                                          "' is not made of r, w, x");
      }
      if (m.rip_bytes_prefix().size() > vmem::kMaxRipPrefixBytes) {
        return absl::InvalidArgumentError(
            "match.rip_bytes_prefix: " + std::to_string(m.rip_bytes_prefix().size()) +
            " bytes, above the limit of " + std::to_string(vmem::kMaxRipPrefixBytes));
      }
      rule->match.rip_bytes_prefix.assign(m.rip_bytes_prefix().begin(), m.rip_bytes_prefix().end());
      if (!(error = ConvertAction(policy.action(), RuleAction::kContinue, &action)).ok())
        return error;
      rule->action = action;
      rule->mode = mode;
      break;
    }
    case kvmi::v1::Policy::RULE_NOT_SET:
      return absl::InvalidArgumentError(
          "rule: one of protect_pages, forbid_cr_bits_clear, lock_msr, match is required");
  }
  rule->description = policy.description();
  rule->origin = policy.SerializeAsString();
  const auto& guests = policy.guests();
  for (int i = 0; i < guests.uuids_size(); ++i) {
    kvmi::Uuid uuid;
    if (!kvmi::ParseUuid(guests.uuids(i), &uuid)) {
      return absl::InvalidArgumentError("guests.uuids[" + std::to_string(i) + "]: '" +
                                        guests.uuids(i) + "' is not a UUID");
    }
    rule->match.uuids.push_back(uuid);
  }
  rule->match.names.assign(guests.names().begin(), guests.names().end());
  for (const auto& [key, value] : guests.labels()) rule->match.labels[key] = value;
  if (policy.mode() == kvmi::v1::MODE_UNSPECIFIED) {
    return absl::InvalidArgumentError(
        "mode: required, MODE_UNSPECIFIED is refused (MODE_ENFORCE: the rule decides the "
        "verdict; MODE_MONITOR: it only counts and reports)");
  }
  return rule;
}

kvmi::v1::Policy RuleToPolicy(const Rule& rule) {
  kvmi::v1::Policy p;
  if (!rule.origin.empty() && p.ParseFromString(rule.origin)) return p;
  p.Clear();
  p.set_name(rule.name);
  p.set_description(rule.description);
  p.set_mode(rule.mode == RuleMode::kMonitor ? kvmi::v1::MODE_MONITOR : kvmi::v1::MODE_ENFORCE);
  p.set_action(ToProtoAction(rule.action));
  for (const kvmi::Uuid& uuid : rule.match.uuids)
    p.mutable_guests()->add_uuids(kvmi::UuidToString(uuid));
  for (const std::string& name : rule.match.names) p.mutable_guests()->add_names(name);
  for (const auto& [key, value] : rule.match.labels)
    (*p.mutable_guests()->mutable_labels())[key] = value;
  auto* m = p.mutable_match();
  for (uint8_t e : rule.match.events) m->add_events(ToEventType(e));
  for (uint16_t v : rule.match.vcpus) m->add_vcpus(v);
  if (rule.match.cr) m->set_cr(*rule.match.cr);
  m->set_cr_bits_cleared(rule.match.cr_bits_cleared);
  m->set_cr_bits_set(rule.match.cr_bits_set);
  if (rule.match.msr) m->set_msr(*rule.match.msr);
  m->set_msr_after_boot_only(rule.match.msr_after_boot_only);
  if (rule.match.gpa_first) m->set_gpa_first(*rule.match.gpa_first);
  if (rule.match.gpa_last) m->set_gpa_last(*rule.match.gpa_last);
  if (rule.match.access != 0) m->set_access(AccessLetters(rule.match.access));
  m->set_rip_bytes_prefix(
      std::string(rule.match.rip_bytes_prefix.begin(), rule.match.rip_bytes_prefix.end()));
  return p;
}

}  // namespace kvmid
