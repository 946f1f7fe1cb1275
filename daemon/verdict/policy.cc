#include "daemon/verdict/policy.h"

#include <absl/strings/str_cat.h>
#include <absl/strings/str_format.h>

#include <algorithm>

namespace kvmid {
namespace {

bool NameMatches(const std::string& pattern, const std::string& name) {
  if (!pattern.empty() && pattern.back() == '*') {
    return name.compare(0, pattern.size() - 1, pattern, 0, pattern.size() - 1) == 0;
  }
  return pattern == name;
}

constexpr uint64_t kCr0Wp = 1ull << 16;
constexpr uint64_t kCr4Smep = 1ull << 20;
constexpr uint64_t kCr4Smap = 1ull << 21;

}  // namespace

bool RuleMatch::MatchesGuest(const GuestView& guest) const {
  if (!uuids.empty() && std::find(uuids.begin(), uuids.end(), guest.uuid) == uuids.end()) {
    return false;
  }
  if (!names.empty() && std::none_of(names.begin(), names.end(), [&](const std::string& p) {
        return NameMatches(p, guest.name);
      })) {
    return false;
  }
  for (const auto& [key, value] : labels) {
    auto it = guest.labels.find(key);
    if (it == guest.labels.end() || it->second != value) return false;
  }
  return true;
}

bool RuleMatch::MatchesEvent(const kvmi::Event& event) const {
  if (!events.empty() && events.count(event.id()) == 0) return false;
  if (!vcpus.empty() && vcpus.count(event.vcpu()) == 0) return false;
  switch (event.id()) {
    case KVMI_EVENT_CR: {
      const kvmi_event_cr& cr_event = event.specific.cr;
      if (cr && *cr != cr_event.cr) return false;
      uint64_t cleared = cr_event.old_value & ~cr_event.new_value;
      uint64_t set = ~cr_event.old_value & cr_event.new_value;
      if (cr_bits_cleared != 0 || cr_bits_set != 0) {
        bool hit = (cleared & cr_bits_cleared) != 0 || (set & cr_bits_set) != 0;
        if (!hit) return false;
      }
      return true;
    }
    case KVMI_EVENT_MSR: {
      const kvmi_event_msr& msr_event = event.specific.msr;
      if (msr && *msr != msr_event.msr) return false;
      if (msr_after_boot_only && msr_event.old_value == 0) return false;
      return true;
    }
    case KVMI_EVENT_PF: {
      const kvmi_event_pf& pf = event.specific.pf;
      if (gpa_first && pf.gpa < *gpa_first) return false;
      if (gpa_last && pf.gpa > *gpa_last) return false;
      if (access != 0 && (pf.access & access) == 0) return false;
      return true;
    }
    default:
      // Detail selectors apply to their own event kinds only: a rule with a CR selector does
      // not match a PF event.
      return !cr && !msr && !gpa_first && !gpa_last && access == 0;
  }
}

bool RuleMatch::MatchesContext(const vmem::CapturedContext* context) const {
  if (rip_bytes_prefix.empty()) return true;
  if (context == nullptr) return false;
  const vmem::ContextBlock* rip = context->Find(vmem::ContextKind::kRip);
  return rip != nullptr && rip->data.size() >= rip_bytes_prefix.size() &&
         std::equal(rip_bytes_prefix.begin(), rip_bytes_prefix.end(), rip->data.begin());
}

const char* RuleActionName(RuleAction action) {
  switch (action) {
    case RuleAction::kContinue:
      return "continue";
    case RuleAction::kRetry:
      return "retry";
    case RuleAction::kCrash:
      return "crash";
    case RuleAction::kKeepOld:
      return "keep_old";
  }
  return "?";
}

bool ParseRuleAction(const std::string& text, RuleAction* action) {
  for (RuleAction a :
       {RuleAction::kContinue, RuleAction::kRetry, RuleAction::kCrash, RuleAction::kKeepOld}) {
    if (text == RuleActionName(a)) {
      *action = a;
      return true;
    }
  }
  return false;
}

Verdict Rule::ToVerdict() const {
  Verdict v;
  v.decided_by = "policy:" + name;
  switch (action) {
    case RuleAction::kContinue:
      v.action = KVMI_EVENT_ACTION_CONTINUE;
      break;
    case RuleAction::kRetry:
      v.action = KVMI_EVENT_ACTION_RETRY;
      break;
    case RuleAction::kCrash:
      v.action = KVMI_EVENT_ACTION_CRASH;
      break;
    case RuleAction::kKeepOld:
      // CR/MSR: CONTINUE writing the old value back, so the guest's write has no effect and the
      // guest goes on (RETRY or an unknown action would make the write fault, §3.2).
      v.action = KVMI_EVENT_ACTION_CONTINUE;
      v.keep_old = true;
      break;
  }
  return v;
}

namespace {

// Checks a rule before it enters a set; fills its verdict. "" or the error.
std::string PrepareRule(Rule* rule) {
  if (rule->name.empty()) return "rule.name is empty";
  if (rule->match.gpa_first && rule->match.gpa_last &&
      *rule->match.gpa_first > *rule->match.gpa_last) {
    return "rule " + rule->name + ": gpa_first is above gpa_last";
  }
  if (rule->action == RuleAction::kKeepOld && !rule->match.events.empty()) {
    for (uint8_t e : rule->match.events) {
      if (e != KVMI_EVENT_CR && e != KVMI_EVENT_MSR) {
        return "rule " + rule->name + ": keep_old applies to CR and MSR events only";
      }
    }
  }
  if (rule->match.rip_bytes_prefix.size() > vmem::kMaxRipPrefixBytes) {
    return "rule " + rule->name + ": rip_bytes_prefix holds " +
           std::to_string(rule->match.rip_bytes_prefix.size()) + " bytes, above the limit of " +
           std::to_string(vmem::kMaxRipPrefixBytes);
  }
  if (rule->arms.page_access.size() > kMaxProtectedPages) {
    return "rule " + rule->name + ": protects more than " + std::to_string(kMaxProtectedPages) +
           " pages";
  }
  for (uint8_t e : rule->match.events) {
    if (e >= KVMI_NUM_EVENTS || e == KVMI_EVENT_UNHOOK) {
      return "rule " + rule->name + ": event " + std::to_string(e) + " cannot be answered";
    }
  }
  rule->verdict = rule->ToVerdict();
  return "";
}

// FNV-1a, 64 bits: stable across runs (an etag must not depend on a per-process seed).
uint64_t Fnv1a64(absl::string_view data) {
  uint64_t hash = 0xcbf29ce484222325ull;
  for (unsigned char c : data) {
    hash ^= c;
    hash *= 0x100000001b3ull;
  }
  return hash;
}

// A copy of everything but the counters (a new rule starts at zero hits).
std::shared_ptr<Rule> CopyRule(const Rule& from) {
  auto rule = std::make_shared<Rule>();
  rule->name = from.name;
  rule->description = from.description;
  rule->match = from.match;
  rule->action = from.action;
  rule->mode = from.mode;
  rule->arms = from.arms;
  rule->origin = from.origin;
  rule->source = from.source;
  rule->overrides_config = from.overrides_config;
  rule->verdict = from.verdict;
  return rule;
}

std::shared_ptr<const Rule> FindIn(const std::vector<std::shared_ptr<const Rule>>& rules,
                                   const std::string& name) {
  for (const auto& rule : rules) {
    if (rule->name == name) return rule;
  }
  return nullptr;
}

// PolicyPrecondition's checks of a write to `name`, whose current rule is `current` (or null).
absl::Status CheckPrecondition(const Rule* current, const std::string& name,
                               const PolicyPrecondition& precondition, bool deleting) {
  if (current == nullptr) {
    if (deleting) return absl::NotFoundError(absl::StrCat("no policy '", name, "'"));
    if (!precondition.etag.empty()) {
      return absl::NotFoundError(absl::StrCat("no policy '", name, "' (etag ", precondition.etag,
                                              " was given: it replaces an existing policy; "
                                              "leave etag empty to create one)"));
    }
    return absl::OkStatus();
  }
  if (current->config_owned() && !precondition.override_config) {
    return absl::FailedPreconditionError(absl::StrCat(
        "policy '", name, "' comes from the configuration file",
        current->overrides_config ? " (overridden through the API)" : "", "; ",
        deleting ? "deleting" : "replacing",
        " it through the API needs override_config (admin; audited), and lasts until the next "
        "configuration reload"));
  }
  if (!precondition.etag.empty() && precondition.etag != current->etag) {
    return absl::FailedPreconditionError(
        absl::StrCat("policy '", name, "' is at etag ", current->etag, ", not ", precondition.etag,
                     " (it changed since it was read: list it again)"));
  }
  if (!deleting && precondition.etag.empty() && !precondition.allow_replace) {
    return absl::AlreadyExistsError(absl::StrCat(
        "policy '", name, "' exists (etag ", current->etag,
        "); pass that etag to replace it, or allow_replace to replace it whatever its etag"));
  }
  return absl::OkStatus();
}

}  // namespace

const char* PolicySourceName(PolicySource source) {
  switch (source) {
    case PolicySource::kCode:
      return "code";
    case PolicySource::kConfig:
      return "config";
    case PolicySource::kApi:
      return "api";
  }
  return "?";
}

void PolicySet::Stamp(Rule* rule, const Rule* previous) {
  rule->revision = ++last_revision_;
  rule->position = previous != nullptr ? previous->position : rule->revision;
  const std::string& content = rule->origin.empty() ? rule->name : rule->origin;
  rule->etag = absl::StrFormat("%x-%016x", rule->revision,
                               Fnv1a64(content) ^ static_cast<uint64_t>(rule->source));
}

void PolicySet::Upsert(std::vector<std::shared_ptr<const Rule>>* rules,
                       std::shared_ptr<Rule> rule) {
  auto it = std::find_if(rules->begin(), rules->end(),
                         [&](const auto& r) { return r->name == rule->name; });
  if (it != rules->end()) {
    Stamp(rule.get(), it->get());
    *it = std::move(rule);
  } else {
    Stamp(rule.get(), nullptr);
    rules->push_back(std::move(rule));
  }
}

std::string PolicySet::Apply(std::shared_ptr<Rule> rule) {
  std::string error = PrepareRule(rule.get());
  if (!error.empty()) return error;
  MutexLock lock(&writers_mutex_);
  auto next = std::make_shared<std::vector<std::shared_ptr<const Rule>>>(*rules_);
  Upsert(next.get(), std::move(rule));
  PublishLocked(Snapshot(std::move(next)));
  return "";
}

absl::Status PolicySet::ApplyIf(std::shared_ptr<Rule> rule,
                                const std::function<absl::Status(size_t count_without_it)>& admit) {
  std::string error = PrepareRule(rule.get());
  if (!error.empty()) return absl::InvalidArgumentError(error);
  MutexLock lock(&writers_mutex_);
  const size_t count_without_it = static_cast<size_t>(std::count_if(
      rules_->begin(), rules_->end(), [&](const auto& r) { return r->name != rule->name; }));
  absl::Status admitted = admit(count_without_it);
  if (!admitted.ok()) return admitted;
  auto next = std::make_shared<std::vector<std::shared_ptr<const Rule>>>(*rules_);
  Upsert(next.get(), std::move(rule));
  PublishLocked(Snapshot(std::move(next)));
  return absl::OkStatus();
}

absl::StatusOr<PolicyWrite> PolicySet::ApplyChecked(
    std::shared_ptr<Rule> rule, const PolicyPrecondition& precondition,
    const std::function<absl::Status(size_t count_without_it)>& admit) {
  std::string error = PrepareRule(rule.get());
  if (!error.empty()) return absl::InvalidArgumentError(error);
  MutexLock lock(&writers_mutex_);
  PolicyWrite write;
  write.previous = FindIn(*rules_, rule->name);
  absl::Status checked =
      CheckPrecondition(write.previous.get(), rule->name, precondition, /*deleting=*/false);
  if (!checked.ok()) return checked;
  const size_t count_without_it = rules_->size() - (write.previous != nullptr ? 1 : 0);
  absl::Status admitted = admit(count_without_it);
  if (!admitted.ok()) return admitted;
  rule->source = PolicySource::kApi;
  rule->overrides_config = write.previous != nullptr && write.previous->config_owned();
  write.rule = rule;
  auto next = std::make_shared<std::vector<std::shared_ptr<const Rule>>>(*rules_);
  Upsert(next.get(), std::move(rule));
  PublishLocked(Snapshot(std::move(next)));
  return write;
}

absl::StatusOr<PolicyWrite> PolicySet::RemoveChecked(const std::string& name,
                                                     const PolicyPrecondition& precondition) {
  MutexLock lock(&writers_mutex_);
  PolicyWrite write;
  write.previous = FindIn(*rules_, name);
  absl::Status checked = CheckPrecondition(write.previous.get(), name, precondition, true);
  if (!checked.ok()) return checked;
  auto next = std::make_shared<std::vector<std::shared_ptr<const Rule>>>(*rules_);
  next->erase(
      std::remove_if(next->begin(), next->end(), [&](const auto& r) { return r->name == name; }),
      next->end());
  ++last_revision_;  // a later policy of this name gets an etag this one never had
  PublishLocked(Snapshot(std::move(next)));
  return write;
}

absl::Status PolicySet::CheckWrite(const std::string& name, const PolicyPrecondition& precondition,
                                   bool deleting) const {
  const Snapshot snapshot = rules();
  return CheckPrecondition(FindIn(*snapshot, name).get(), name, precondition, deleting);
}

std::string PolicySet::Replace(const std::set<std::string>& remove,
                               std::vector<std::shared_ptr<Rule>> add) {
  for (const auto& rule : add) {
    std::string error = PrepareRule(rule.get());
    if (!error.empty()) return error;
  }
  MutexLock lock(&writers_mutex_);
  auto next = std::make_shared<std::vector<std::shared_ptr<const Rule>>>(*rules_);
  next->erase(std::remove_if(next->begin(), next->end(),
                             [&](const auto& r) { return remove.count(r->name) > 0; }),
              next->end());
  for (auto& rule : add) Upsert(next.get(), std::move(rule));
  PublishLocked(Snapshot(std::move(next)));
  return "";
}

std::string PolicySet::ReplaceConfigured(const std::set<std::string>& remove,
                                         const std::vector<std::shared_ptr<Rule>>& add) {
  std::vector<std::shared_ptr<Rule>> copies;
  copies.reserve(add.size());
  for (const auto& rule : add) {
    copies.push_back(CopyRule(*rule));
    copies.back()->source = PolicySource::kConfig;
    copies.back()->overrides_config = false;
    std::string error = PrepareRule(copies.back().get());
    if (!error.empty()) return error;
  }
  MutexLock lock(&writers_mutex_);
  auto next = std::make_shared<std::vector<std::shared_ptr<const Rule>>>(*rules_);
  next->erase(std::remove_if(next->begin(), next->end(),
                             [&](const auto& r) { return remove.count(r->name) > 0; }),
              next->end());
  for (auto& rule : copies) {
    const std::shared_ptr<const Rule> current = FindIn(*next, rule->name);
    if (current != nullptr && current->source == PolicySource::kConfig &&
        !current->origin.empty() && current->origin == rule->origin) {
      continue;  // unchanged: same etag, counters kept
    }
    Upsert(next.get(), std::move(rule));
  }
  PublishLocked(Snapshot(std::move(next)));
  return "";
}

bool PolicySet::Remove(const std::string& name) {
  MutexLock lock(&writers_mutex_);
  auto next = std::make_shared<std::vector<std::shared_ptr<const Rule>>>(*rules_);
  auto it =
      std::remove_if(next->begin(), next->end(), [&](const auto& r) { return r->name == name; });
  if (it == next->end()) return false;
  next->erase(it, next->end());
  ++last_revision_;
  PublishLocked(Snapshot(std::move(next)));
  return true;
}

std::shared_ptr<const Rule> PolicySet::Find(const std::string& name) const {
  const Snapshot snapshot = rules();
  return FindIn(*snapshot, name);
}

void PolicySet::PublishLocked(Snapshot next) {
  std::array<vmem::ContextDemand, KVMI_NUM_EVENTS> by_event{};
  for (const auto& rule : *next) {
    const uint32_t prefix = static_cast<uint32_t>(rule->match.rip_bytes_prefix.size());
    if (prefix == 0) continue;
    for (size_t id = 0; id < by_event.size(); ++id) {
      if (rule->match.events.empty() || rule->match.events.count(static_cast<uint8_t>(id)) > 0) {
        by_event[id].Add(vmem::ContextDemand{prefix, 0, 0});
      }
    }
  }
  // The demand first: an evaluation that sees a new rule also finds its bytes asked for (an
  // event already past the check simply does not match the new rule's bytes).
  for (size_t id = 0; id < by_event.size(); ++id) {
    context_demand_[id].store(by_event[id].Pack(), std::memory_order_relaxed);
  }
  std::atomic_store(&rules_, std::move(next));
}

PolicySet::Snapshot PolicySet::rules() const { return std::atomic_load(&rules_); }

PolicyDecision PolicySet::Evaluate(const GuestView& guest, const kvmi::Event& event,
                                   const vmem::CapturedContext* context) const {
  PolicyDecision decision;
  Snapshot snapshot = rules();
  for (const auto& rule : *snapshot) {
    if (!rule->match.MatchesEvent(event) || !rule->match.MatchesContext(context) ||
        !rule->match.MatchesGuest(guest)) {
      continue;
    }
    rule->hits++;
    if (rule->mode == RuleMode::kMonitor) {
      decision.monitoring.push_back(rule);
    } else if (!decision.enforcing) {
      rule->enforced++;
      decision.enforcing = rule;
    }
  }
  return decision;
}

std::map<std::string, Arming> PolicySet::ArmsFor(const GuestView& guest) const {
  std::map<std::string, Arming> arms;
  Snapshot snapshot = rules();
  for (const auto& rule : *snapshot) {
    if (rule->match.MatchesGuest(guest) && !rule->arms.empty()) {
      arms["policy:" + rule->name] = rule->arms;
    }
  }
  return arms;
}

// ---- templates ------------------------------------------------------------------------------

std::shared_ptr<Rule> ProtectPagesRule(std::string name, uint64_t gpa_first, uint64_t gpa_last,
                                       uint8_t allowed, RuleAction action, RuleMode mode) {
  auto rule = std::make_shared<Rule>();
  rule->name = std::move(name);
  rule->description = "pages keep only the access they are allowed";
  rule->match.events = {KVMI_EVENT_PF};
  rule->match.gpa_first = gpa_first;
  rule->match.gpa_last = gpa_last;
  rule->match.access = static_cast<uint8_t>(~allowed & KVMI_PAGE_ACCESS_RWX);
  rule->action = action;
  rule->mode = mode;
  rule->arms.vcpu_events = {KVMI_EVENT_PF};
  for (uint64_t gfn = gpa_first / KVMI_PAGE_SIZE; gfn <= gpa_last / KVMI_PAGE_SIZE; ++gfn) {
    rule->arms.page_access[gfn] = allowed;
  }
  return rule;
}

std::shared_ptr<Rule> ForbidClearCr0WpRule(std::string name, RuleMode mode) {
  auto rule = std::make_shared<Rule>();
  rule->name = std::move(name);
  rule->description = "CR0.WP may not be cleared";
  rule->match.events = {KVMI_EVENT_CR};
  rule->match.cr = 0;
  rule->match.cr_bits_cleared = kCr0Wp;
  rule->action = RuleAction::kKeepOld;
  rule->mode = mode;
  rule->arms.vcpu_events = {KVMI_EVENT_CR};
  rule->arms.crs = {0};
  return rule;
}

std::shared_ptr<Rule> ForbidClearCr4SmepSmapRule(std::string name, RuleMode mode) {
  auto rule = std::make_shared<Rule>();
  rule->name = std::move(name);
  rule->description = "CR4.SMEP and CR4.SMAP may not be cleared";
  rule->match.events = {KVMI_EVENT_CR};
  rule->match.cr = 4;
  rule->match.cr_bits_cleared = kCr4Smep | kCr4Smap;
  rule->action = RuleAction::kKeepOld;
  rule->mode = mode;
  rule->arms.vcpu_events = {KVMI_EVENT_CR};
  rule->arms.crs = {4};
  return rule;
}

std::shared_ptr<Rule> LockMsrAfterBootRule(std::string name, uint32_t msr, RuleMode mode) {
  auto rule = std::make_shared<Rule>();
  rule->name = std::move(name);
  rule->description = "the MSR may be set at boot, never changed afterwards";
  rule->match.events = {KVMI_EVENT_MSR};
  rule->match.msr = msr;
  rule->match.msr_after_boot_only = true;
  rule->action = RuleAction::kKeepOld;
  rule->mode = mode;
  rule->arms.vcpu_events = {KVMI_EVENT_MSR};
  rule->arms.msrs = {msr};
  return rule;
}

}  // namespace kvmid
