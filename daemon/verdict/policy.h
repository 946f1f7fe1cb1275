// Declarative in-daemon rules: the fast path that answers a blocking event with no network hop.
// A rule matches on the guest, the event and its details, and acts (continue / retry / crash /
// keep the old value) in enforce mode, or only counts and reports in monitor mode. A rule also
// says which intercepts it needs; the daemon arms them on every matching guest, including guests
// that connect later, as a lease owned by "policy:<name>".
#ifndef KVMID_DAEMON_VERDICT_POLICY_H_
#define KVMID_DAEMON_VERDICT_POLICY_H_

#include <absl/status/status.h>
#include <absl/status/statusor.h>

#include <array>
#include <atomic>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "daemon/base/mutex.h"
#include "daemon/guest/guest.h"
#include "daemon/registry/arming.h"
#include "daemon/verdict/verdict.h"
#include "daemon/vmem/event_context.h"
#include "kernel/abi/events.h"
#include "kernel/abi/handshake.h"

namespace kvmid {

// The most pages one rule may protect: 4 GiB of guest memory.
inline constexpr size_t kMaxProtectedPages = size_t{1} << 20;

struct RuleMatch {
  // Guest selectors; each empty one matches every guest. Names accept a trailing '*'.
  std::vector<kvmi::Uuid> uuids;
  std::vector<std::string> names;
  std::map<std::string, std::string> labels;  // all must be present with these values
  std::set<uint8_t> events;                   // KVMI_EVENT_*; empty = any blocking event
  std::set<uint16_t> vcpus;                   // empty = any
  // CR events.
  std::optional<uint32_t> cr;
  uint64_t cr_bits_cleared = 0;  // match when any of these bits goes 1 -> 0
  uint64_t cr_bits_set = 0;      // match when any of these bits goes 0 -> 1
  // MSR events.
  std::optional<uint32_t> msr;
  bool msr_after_boot_only = false;  // match only once the MSR holds a non-zero value
  // PF events: the page range [gpa_first, gpa_last] and the attempted access bits.
  std::optional<uint64_t> gpa_first;
  std::optional<uint64_t> gpa_last;
  uint8_t access = 0;  // KVMI_PAGE_ACCESS_*; 0 = any
  // Event context (issue 15): the bytes at RIP begin with these (e.g. 0F 30, WRMSR); at most
  // vmem::kMaxRipPrefixBytes. A rule with a prefix makes kvmid read that many bytes at RIP with
  // the events it can match; without them (the read failed short of the prefix) it does not match.
  std::vector<uint8_t> rip_bytes_prefix;

  bool MatchesGuest(const GuestView& guest) const;
  bool MatchesEvent(const kvmi::Event& event) const;
  // The byte selectors against the event's context (true when the rule has none).
  bool MatchesContext(const vmem::CapturedContext* context) const;
};

enum class RuleAction : uint8_t { kContinue, kRetry, kCrash, kKeepOld };
enum class RuleMode : uint8_t { kEnforce, kMonitor };

// Where a policy came from (ListPolicies shows it as the policy's origin).
enum class PolicySource : uint8_t {
  kCode,    // built in code (tests, tools)
  kConfig,  // the configuration file or the command line: the operator's baseline
  kApi,     // ApplyPolicy
};
const char* PolicySourceName(PolicySource source);

const char* RuleActionName(RuleAction action);
bool ParseRuleAction(const std::string& text, RuleAction* action);

struct Rule {
  std::string name;
  std::string description;
  RuleMatch match;
  RuleAction action = RuleAction::kContinue;
  RuleMode mode = RuleMode::kEnforce;
  // Intercepts the rule needs on each matching guest (derived by the templates below; a
  // hand-written rule may add more).
  Arming arms;
  // The serialized kvmi.v1.Policy this rule was made from (empty for rules built in code), so
  // that listing gives back exactly what was applied.
  std::string origin;
  PolicySource source = PolicySource::kCode;
  // An API policy that replaced a configured one (ApplyPolicy with override_config): the name
  // still belongs to the configuration, so writes to it keep needing override_config, and the
  // next reload or restart puts the configuration's version back.
  bool overrides_config = false;

  // Set by PolicySet when the rule goes in (callers leave them alone):
  // the write that put it there (a set-wide counter, never reused), ...
  uint64_t revision = 0;
  // ... its place in evaluation order (the revision of the first write of this name still in
  // the set: a replacement keeps its place; a new name goes last), ...
  uint64_t position = 0;
  // ... and the opaque revision tag clients see and send back (ApplyPolicy, DeletePolicy): it
  // changes with every write of the name.
  std::string etag;

  // The configuration owns the name: configured, or an API override of a configured policy.
  bool config_owned() const { return source == PolicySource::kConfig || overrides_config; }

  // Hit counters (a rule is shared, immutable but for these).
  mutable std::atomic<uint64_t> hits{0};
  mutable std::atomic<uint64_t> enforced{0};

  Verdict ToVerdict() const;
  // ToVerdict(), computed once when the rule is applied (the event path copies nothing).
  Verdict verdict;
};

// The outcome of evaluating the rules for one event.
struct PolicyDecision {
  std::shared_ptr<const Rule> enforcing;                // first enforce rule that matched
  std::vector<std::shared_ptr<const Rule>> monitoring;  // monitor rules that matched
};

// What a client's write (ApplyPolicy, DeletePolicy) expects of the policy it names. The checks,
// in order: a configuration-owned policy needs override_config (FAILED_PRECONDITION naming the
// policy and the flag); an etag must be the policy's current one (FAILED_PRECONDITION naming the
// current etag; NOT_FOUND when there is no such policy); applying over an existing name with
// neither an etag nor allow_replace is ALREADY_EXISTS naming the policy and its etag.
struct PolicyPrecondition {
  std::string etag;              // non-empty: the policy must be at this etag
  bool allow_replace = false;    // apply: replace whatever is there (no etag check)
  bool override_config = false;  // may replace or delete a configuration-owned policy
};

// The outcome of a checked write.
struct PolicyWrite {
  std::shared_ptr<const Rule> rule;      // now in effect (null after a delete)
  std::shared_ptr<const Rule> previous;  // replaced or deleted (null for a creation)
  // The write replaced or deleted a configuration-owned policy.
  bool overrode_config() const { return previous != nullptr && previous->config_owned(); }
};

// The rule set. Readers take a snapshot (an atomic shared_ptr load); writers replace the
// snapshot under a mutex, so evaluation never blocks on a policy change.
class PolicySet {
 public:
  using Snapshot = std::shared_ptr<const std::vector<std::shared_ptr<const Rule>>>;

  // Adds or replaces (by name). Returns an error text for an invalid rule, else "".
  std::string Apply(std::shared_ptr<Rule> rule);
  // Apply, if `admit` agrees: it is called under the writers' lock with the number of rules held
  // not counting one of the same name (a replacement adds none), so that a count limit is checked
  // and the rule inserted in one step. InvalidArgument for an invalid rule, else admit's status.
  absl::Status ApplyIf(std::shared_ptr<Rule> rule,
                       const std::function<absl::Status(size_t count_without_it)>& admit);
  size_t size() const { return rules()->size(); }
  // A client's write, checked (PolicyPrecondition) and done in one step under the writers' lock,
  // with `admit` as in ApplyIf. The rule goes in as PolicySource::kApi, marked overrides_config
  // when it replaces a configuration-owned policy.
  absl::StatusOr<PolicyWrite> ApplyChecked(
      std::shared_ptr<Rule> rule, const PolicyPrecondition& precondition,
      const std::function<absl::Status(size_t count_without_it)>& admit);
  // DeletePolicy, checked the same way (allow_replace plays no part). NOT_FOUND naming the
  // policy when there is none.
  absl::StatusOr<PolicyWrite> RemoveChecked(const std::string& name,
                                            const PolicyPrecondition& precondition);
  // The checks of ApplyChecked (deleting = false) or RemoveChecked (true) against the current
  // set, changing nothing: for a caller that must persist a write before doing it.
  absl::Status CheckWrite(const std::string& name, const PolicyPrecondition& precondition,
                          bool deleting) const;
  // In one step (evaluations see the old set or the new one, never a mix): removes the rules
  // named in `remove`, then adds or replaces `add`. Nothing changes if any rule is invalid.
  std::string Replace(const std::set<std::string>& remove, std::vector<std::shared_ptr<Rule>> add);
  // A configuration (re)load: Replace with copies of `add` marked PolicySource::kConfig, so that
  // the caller's rules are never changed. A configured policy whose serialized form (origin) is
  // the one already in effect as configured stays as it is: same etag, counters kept.
  std::string ReplaceConfigured(const std::set<std::string>& remove,
                                const std::vector<std::shared_ptr<Rule>>& add);
  bool Remove(const std::string& name);
  Snapshot rules() const;
  // The policy of that name, or null.
  std::shared_ptr<const Rule> Find(const std::string& name) const;

  // `context`: the bytes read with the event (null: none were).
  PolicyDecision Evaluate(const GuestView& guest, const kvmi::Event& event,
                          const vmem::CapturedContext* context = nullptr) const;
  // The context the rules need for events of type `event` (vmem::ContextDemand::Pack): one relaxed
  // load, on the event path.
  uint64_t packed_context_demand(uint8_t event) const {
    return context_demand_[event].load(std::memory_order_relaxed);
  }
  // The union of what every rule matching `guest` needs armed.
  std::map<std::string, Arming> ArmsFor(const GuestView& guest) const;

 private:
  // Installs `next` as the rule set and what it needs read with events.
  void PublishLocked(Snapshot next) ABSL_EXCLUSIVE_LOCKS_REQUIRED(writers_mutex_);

  // Serializes writers; readers load rules_ with std::atomic_load and take no lock.
  Mutex writers_mutex_;
  uint64_t last_revision_ ABSL_GUARDED_BY(writers_mutex_) = 0;
  // Sets the rule's revision, position (`previous`'s when it replaces one) and etag.
  void Stamp(Rule* rule, const Rule* previous) ABSL_EXCLUSIVE_LOCKS_REQUIRED(writers_mutex_);
  // Adds `rule` to `rules`, stamped, or replaces the one of the same name in place.
  void Upsert(std::vector<std::shared_ptr<const Rule>>* rules, std::shared_ptr<Rule> rule)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(writers_mutex_);
  Snapshot rules_ = std::make_shared<std::vector<std::shared_ptr<const Rule>>>();
  // Per event id, what the rules' byte selectors need (written with rules_).
  std::array<std::atomic<uint64_t>, KVMI_NUM_EVENTS> context_demand_{};
};

// ---- Ready-made rules (what users expect to find) -------------------------------------------

// Pages in [gpa_first, gpa_last] keep only `allowed` (e.g. R|X for kernel text: read-only;
// R|W for an IDT: non-executable); an attempt at anything else is answered with `action`.
std::shared_ptr<Rule> ProtectPagesRule(std::string name, uint64_t gpa_first, uint64_t gpa_last,
                                       uint8_t allowed, RuleAction action, RuleMode mode);
// CR0.WP (bit 16) may not be cleared.
std::shared_ptr<Rule> ForbidClearCr0WpRule(std::string name, RuleMode mode);
// CR4.SMEP (bit 20) / CR4.SMAP (bit 21) may not be cleared.
std::shared_ptr<Rule> ForbidClearCr4SmepSmapRule(std::string name, RuleMode mode);
// The MSR (LSTAR 0xC0000082, SYSENTER_EIP 0x176, ...) may be set once at boot, never changed.
std::shared_ptr<Rule> LockMsrAfterBootRule(std::string name, uint32_t msr, RuleMode mode);

}  // namespace kvmid

#endif  // KVMID_DAEMON_VERDICT_POLICY_H_
