// Policies the benchmarks share: the in-daemon verdict every "kvmid policy" row measures.
#ifndef KVMID_TESTS_BENCH_BENCH_POLICIES_H_
#define KVMID_TESTS_BENCH_BENCH_POLICIES_H_

#include <memory>

#include "daemon/verdict/policy.h"
#include "kernel/uapi/kvmi.h"

namespace kvmid::bench {

// CONTINUE for every CR3 write, arming CR3 exits: the least a policy can do, with the whole
// verdict pipeline (rule evaluation, handler lookup, observers check, reply) on the path.
inline std::shared_ptr<Rule> AllowCr3Rule() {
  auto rule = std::make_shared<Rule>();
  rule->name = "allow-cr3";
  rule->match.events = {KVMI_EVENT_CR};
  rule->match.cr = 3;
  rule->action = RuleAction::kContinue;
  rule->arms.vcpu_events = {KVMI_EVENT_CR};
  rule->arms.crs = {3};
  return rule;
}

}  // namespace kvmid::bench

#endif  // KVMID_TESTS_BENCH_BENCH_POLICIES_H_
