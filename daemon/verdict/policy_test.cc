#include "daemon/verdict/policy.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "daemon/testing/scripted_host.h"

namespace kvmid {
namespace {

using testing::MakeTestEvent;

kvmi::Event CrEvent(uint32_t cr, uint64_t old_value, uint64_t new_value) {
  kvmi::Event e = MakeTestEvent(KVMI_EVENT_CR, 0, 1);
  e.specific.cr.cr = static_cast<uint16_t>(cr);
  e.specific.cr.old_value = old_value;
  e.specific.cr.new_value = new_value;
  return e;
}

kvmi::Event MsrEvent(uint32_t msr, uint64_t old_value, uint64_t new_value) {
  kvmi::Event e = MakeTestEvent(KVMI_EVENT_MSR, 0, 1);
  e.specific.msr.msr = msr;
  e.specific.msr.old_value = old_value;
  e.specific.msr.new_value = new_value;
  return e;
}

kvmi::Event PfEvent(uint64_t gpa, uint8_t access) {
  kvmi::Event e = MakeTestEvent(KVMI_EVENT_PF, 0, 1);
  e.specific.pf.gpa = gpa;
  e.specific.pf.access = access;
  return e;
}

GuestView Guest(std::string name) {
  GuestView g;
  g.name = std::move(name);
  g.uuid[0] = 1;
  return g;
}

TEST(PolicyTest, ClearingCr0WpIsRefusedButOtherCr0ChangesPass) {
  PolicySet set;
  ASSERT_EQ(set.Apply(ForbidClearCr0WpRule("wp", RuleMode::kEnforce)), "");
  constexpr uint64_t kPeWp = (1u << 0) | (1u << 16);
  PolicyDecision d = set.Evaluate(Guest("g"), CrEvent(0, kPeWp, 1));
  ASSERT_TRUE(d.enforcing);
  Verdict v = d.enforcing->ToVerdict();
  EXPECT_EQ(v.action, KVMI_EVENT_ACTION_CONTINUE);
  EXPECT_TRUE(v.keep_old);
  EXPECT_EQ(v.decided_by, "policy:wp");
  kvmi::Event cleared = CrEvent(0, kPeWp, 1);
  kvmi::EventReply reply = MakeReply(cleared, v);
  EXPECT_EQ(reply.specific.cr.new_val, kPeWp);  // the old value goes back
  // Setting WP, or touching CR3/CR4, does not match.
  EXPECT_FALSE(set.Evaluate(Guest("g"), CrEvent(0, 1, kPeWp)).enforcing);
  EXPECT_FALSE(set.Evaluate(Guest("g"), CrEvent(4, kPeWp, 1)).enforcing);
  EXPECT_EQ(d.enforcing->hits.load(), 1u);
}

TEST(PolicyTest, Cr4SmepAndSmapAreBothGuarded) {
  PolicySet set;
  ASSERT_EQ(set.Apply(ForbidClearCr4SmepSmapRule("smep", RuleMode::kEnforce)), "");
  EXPECT_TRUE(set.Evaluate(Guest("g"), CrEvent(4, 1u << 20, 0)).enforcing);
  EXPECT_TRUE(set.Evaluate(Guest("g"), CrEvent(4, 1u << 21, 0)).enforcing);
  EXPECT_FALSE(set.Evaluate(Guest("g"), CrEvent(4, 1u << 5, 0)).enforcing);
}

TEST(PolicyTest, LstarMayBeSetAtBootButNotChangedLater) {
  PolicySet set;
  ASSERT_EQ(set.Apply(LockMsrAfterBootRule("lstar", 0xC0000082, RuleMode::kEnforce)), "");
  EXPECT_FALSE(set.Evaluate(Guest("g"), MsrEvent(0xC0000082, 0, 0xffffffff81000000)).enforcing);
  EXPECT_TRUE(set.Evaluate(Guest("g"), MsrEvent(0xC0000082, 0xffffffff81000000, 0xdead)).enforcing);
  EXPECT_FALSE(set.Evaluate(Guest("g"), MsrEvent(0x176, 0x1000, 0xdead)).enforcing);
}

TEST(PolicyTest, ProtectPagesMatchesOnlyForbiddenAccessInsideTheRange) {
  PolicySet set;
  auto rule = ProtectPagesRule("ktext", 0x100000, 0x1fffff, KVMI_PAGE_ACCESS_R | KVMI_PAGE_ACCESS_X,
                               RuleAction::kRetry, RuleMode::kEnforce);
  EXPECT_EQ(rule->arms.page_access.size(), 256u);
  EXPECT_EQ(rule->arms.page_access.at(0x100), KVMI_PAGE_ACCESS_R | KVMI_PAGE_ACCESS_X);
  EXPECT_THAT(rule->arms.vcpu_events, ::testing::ElementsAre(KVMI_EVENT_PF));
  ASSERT_EQ(set.Apply(rule), "");
  auto d = set.Evaluate(Guest("g"), PfEvent(0x150000, KVMI_PAGE_ACCESS_W));
  ASSERT_TRUE(d.enforcing);
  EXPECT_EQ(d.enforcing->ToVerdict().action, KVMI_EVENT_ACTION_RETRY);
  EXPECT_FALSE(set.Evaluate(Guest("g"), PfEvent(0x150000, KVMI_PAGE_ACCESS_X)).enforcing);
  EXPECT_FALSE(set.Evaluate(Guest("g"), PfEvent(0x200000, KVMI_PAGE_ACCESS_W)).enforcing);
}

TEST(PolicyTest, MonitorRulesCountButDoNotDecide) {
  PolicySet set;
  ASSERT_EQ(set.Apply(ForbidClearCr0WpRule("wp", RuleMode::kMonitor)), "");
  PolicyDecision d = set.Evaluate(Guest("g"), CrEvent(0, 1u << 16, 0));
  EXPECT_FALSE(d.enforcing);
  ASSERT_EQ(d.monitoring.size(), 1u);
  EXPECT_EQ(d.monitoring[0]->hits.load(), 1u);
  EXPECT_EQ(d.monitoring[0]->enforced.load(), 0u);
}

TEST(PolicyTest, GuestSelectorsByNamePrefixUuidAndLabels) {
  auto rule = ForbidClearCr0WpRule("wp", RuleMode::kEnforce);
  rule->match.names = {"web-*"};
  rule->match.labels = {{"tier", "prod"}};
  PolicySet set;
  ASSERT_EQ(set.Apply(rule), "");
  GuestView web = Guest("web-1");
  web.labels["tier"] = "prod";
  GuestView dev = Guest("web-2");
  dev.labels["tier"] = "dev";
  EXPECT_TRUE(set.Evaluate(web, CrEvent(0, 1u << 16, 0)).enforcing);
  EXPECT_FALSE(set.Evaluate(dev, CrEvent(0, 1u << 16, 0)).enforcing);
  EXPECT_FALSE(set.Evaluate(Guest("db-1"), CrEvent(0, 1u << 16, 0)).enforcing);
  EXPECT_EQ(set.ArmsFor(web).count("policy:wp"), 1u);
  EXPECT_EQ(set.ArmsFor(Guest("db-1")).count("policy:wp"), 0u);
}

TEST(PolicyTest, InvalidRulesAreRefusedWithAReason) {
  PolicySet set;
  auto keep_old_pf = ProtectPagesRule("bad", 0, 0xfff, 0, RuleAction::kKeepOld, RuleMode::kEnforce);
  EXPECT_THAT(set.Apply(keep_old_pf), ::testing::HasSubstr("keep_old"));
  auto unnamed = ForbidClearCr0WpRule("", RuleMode::kEnforce);
  EXPECT_THAT(set.Apply(unnamed), ::testing::HasSubstr("name"));
  auto unhook = ForbidClearCr0WpRule("u", RuleMode::kEnforce);
  unhook->match.events = {KVMI_EVENT_UNHOOK};
  unhook->action = RuleAction::kContinue;
  EXPECT_THAT(set.Apply(unhook), ::testing::HasSubstr("cannot be answered"));
  EXPECT_TRUE(set.rules()->empty());
}

TEST(PolicyTest, ApplyReplacesByNameAndRemoveDeletes) {
  PolicySet set;
  ASSERT_EQ(set.Apply(ForbidClearCr0WpRule("wp", RuleMode::kMonitor)), "");
  ASSERT_EQ(set.Apply(ForbidClearCr0WpRule("wp", RuleMode::kEnforce)), "");
  ASSERT_EQ(set.rules()->size(), 1u);
  EXPECT_EQ(set.rules()->at(0)->mode, RuleMode::kEnforce);
  EXPECT_TRUE(set.Remove("wp"));
  EXPECT_FALSE(set.Remove("wp"));
}

// ---- checked writes (ApplyPolicy / DeletePolicy) --------------------------------------------

absl::Status Admit(size_t) { return absl::OkStatus(); }

std::shared_ptr<Rule> Named(const std::string& name, const std::string& origin = "") {
  auto rule = ForbidClearCr0WpRule(name, RuleMode::kEnforce);
  rule->origin = origin.empty() ? name + "-v1" : origin;
  return rule;
}

PolicyPrecondition WithEtag(std::string etag) {
  PolicyPrecondition p;
  p.etag = std::move(etag);
  return p;
}

TEST(PolicyWriteTest, CreateThenReplaceNeedsTheEtagOrAllowReplace) {
  PolicySet set;
  absl::StatusOr<PolicyWrite> created = set.ApplyChecked(Named("a"), {}, Admit);
  ASSERT_TRUE(created.ok()) << created.status();
  EXPECT_EQ(created->previous, nullptr);
  EXPECT_EQ(created->rule->source, PolicySource::kApi);
  const std::string first = created->rule->etag;
  EXPECT_FALSE(first.empty());

  // Creating it again: ALREADY_EXISTS naming the policy and its etag; nothing changed.
  absl::StatusOr<PolicyWrite> again = set.ApplyChecked(Named("a", "a-v2"), {}, Admit);
  EXPECT_EQ(again.status().code(), absl::StatusCode::kAlreadyExists);
  EXPECT_THAT(again.status().message(), ::testing::HasSubstr("'a'"));
  EXPECT_THAT(again.status().message(), ::testing::HasSubstr(first));
  EXPECT_EQ(set.Find("a")->origin, "a-v1");

  // A stale etag: FAILED_PRECONDITION naming the current one.
  absl::StatusOr<PolicyWrite> stale = set.ApplyChecked(Named("a", "a-v2"), WithEtag("1-0"), Admit);
  EXPECT_EQ(stale.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(stale.status().message(), ::testing::HasSubstr(first));

  // The current etag replaces it, in place, with a new etag.
  absl::StatusOr<PolicyWrite> replaced =
      set.ApplyChecked(Named("a", "a-v2"), WithEtag(first), Admit);
  ASSERT_TRUE(replaced.ok()) << replaced.status();
  EXPECT_EQ(replaced->previous->origin, "a-v1");
  const std::string second = replaced->rule->etag;
  EXPECT_NE(second, first);
  EXPECT_EQ(replaced->rule->position, created->rule->position);

  // The old etag no longer works; allow_replace does, whatever the etag.
  EXPECT_EQ(set.ApplyChecked(Named("a", "a-v3"), WithEtag(first), Admit).status().code(),
            absl::StatusCode::kFailedPrecondition);
  PolicyPrecondition blind;
  blind.allow_replace = true;
  absl::StatusOr<PolicyWrite> blindly = set.ApplyChecked(Named("a", "a-v3"), blind, Admit);
  ASSERT_TRUE(blindly.ok()) << blindly.status();
  EXPECT_NE(blindly->rule->etag, second);
  // Even re-applying the same content changes the etag (every write does).
  absl::StatusOr<PolicyWrite> same = set.ApplyChecked(Named("a", "a-v3"), blind, Admit);
  ASSERT_TRUE(same.ok());
  EXPECT_NE(same->rule->etag, blindly->rule->etag);
  // An etag for a name that does not exist: NOT_FOUND (no accidental creation).
  EXPECT_EQ(set.ApplyChecked(Named("b"), WithEtag(first), Admit).status().code(),
            absl::StatusCode::kNotFound);
  EXPECT_EQ(set.size(), 1u);
}

TEST(PolicyWriteTest, DeleteChecksTheEtagAndNamesWhatIsMissing) {
  PolicySet set;
  absl::StatusOr<PolicyWrite> created = set.ApplyChecked(Named("a"), {}, Admit);
  ASSERT_TRUE(created.ok());
  EXPECT_EQ(set.RemoveChecked("a", WithEtag("nope")).status().code(),
            absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(set.Find("a"), nullptr);
  absl::StatusOr<PolicyWrite> removed = set.RemoveChecked("a", WithEtag(created->rule->etag));
  ASSERT_TRUE(removed.ok()) << removed.status();
  EXPECT_EQ(removed->previous->name, "a");
  EXPECT_EQ(set.Find("a"), nullptr);
  absl::StatusOr<PolicyWrite> missing = set.RemoveChecked("a", {});
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(missing.status().message(), ::testing::HasSubstr("'a'"));
  // Created again: an etag it never had.
  absl::StatusOr<PolicyWrite> recreated = set.ApplyChecked(Named("a"), {}, Admit);
  ASSERT_TRUE(recreated.ok());
  EXPECT_NE(recreated->rule->etag, created->rule->etag);
}

TEST(PolicyWriteTest, ConfiguredPoliciesNeedOverrideConfigAndStayConfigOwned) {
  PolicySet set;
  ASSERT_EQ(set.ReplaceConfigured({}, {Named("lstar-locked")}), "");
  const std::shared_ptr<const Rule> configured = set.Find("lstar-locked");
  ASSERT_NE(configured, nullptr);
  EXPECT_EQ(configured->source, PolicySource::kConfig);
  EXPECT_TRUE(configured->config_owned());

  // Neither the etag nor allow_replace is enough to replace or delete it.
  PolicyPrecondition with_etag = WithEtag(configured->etag);
  with_etag.allow_replace = true;
  absl::StatusOr<PolicyWrite> refused =
      set.ApplyChecked(Named("lstar-locked", "x"), with_etag, Admit);
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(refused.status().message(), ::testing::HasSubstr("lstar-locked"));
  EXPECT_THAT(refused.status().message(), ::testing::HasSubstr("override_config"));
  EXPECT_EQ(set.RemoveChecked("lstar-locked", with_etag).status().code(),
            absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(set.Find("lstar-locked"), configured);
  // override_config alone is no replace permission: the etag (or allow_replace) is still needed.
  PolicyPrecondition override_only;
  override_only.override_config = true;
  EXPECT_EQ(set.ApplyChecked(Named("lstar-locked", "x"), override_only, Admit).status().code(),
            absl::StatusCode::kAlreadyExists);

  // With it: an API override, still owned by the configuration.
  PolicyPrecondition override_with_etag = WithEtag(configured->etag);
  override_with_etag.override_config = true;
  absl::StatusOr<PolicyWrite> overridden =
      set.ApplyChecked(Named("lstar-locked", "monitor"), override_with_etag, Admit);
  ASSERT_TRUE(overridden.ok()) << overridden.status();
  EXPECT_TRUE(overridden->overrode_config());
  EXPECT_EQ(overridden->rule->source, PolicySource::kApi);
  EXPECT_TRUE(overridden->rule->overrides_config);
  PolicyPrecondition blind;
  blind.allow_replace = true;
  EXPECT_EQ(set.ApplyChecked(Named("lstar-locked", "y"), blind, Admit).status().code(),
            absl::StatusCode::kFailedPrecondition);

  // The next configuration load puts the file's version back.
  ASSERT_EQ(set.ReplaceConfigured({}, {Named("lstar-locked")}), "");
  EXPECT_EQ(set.Find("lstar-locked")->source, PolicySource::kConfig);
  EXPECT_EQ(set.Find("lstar-locked")->origin, "lstar-locked-v1");
  EXPECT_FALSE(set.Find("lstar-locked")->overrides_config);
}

TEST(PolicyWriteTest, ReloadKeepsUnchangedConfiguredPoliciesAndCopiesTheCallersRules) {
  PolicySet set;
  std::vector<std::shared_ptr<Rule>> config = {Named("a"), Named("b")};
  ASSERT_EQ(set.ReplaceConfigured({}, config), "");
  const std::shared_ptr<const Rule> a = set.Find("a");
  EXPECT_NE(a.get(), config[0].get());  // a copy: the caller's rule is not changed
  EXPECT_TRUE(config[0]->etag.empty());
  a->hits += 3;
  std::vector<std::shared_ptr<Rule>> next = {Named("a"), Named("b", "b-v2")};
  ASSERT_EQ(set.ReplaceConfigured({}, next), "");
  EXPECT_EQ(set.Find("a"), a);  // unchanged: same etag, counters kept
  EXPECT_EQ(set.Find("a")->hits.load(), 3u);
  EXPECT_EQ(set.Find("b")->origin, "b-v2");
  // Removed by name.
  ASSERT_EQ(set.ReplaceConfigured({"a"}, {}), "");
  EXPECT_EQ(set.Find("a"), nullptr);
}

TEST(PolicyWriteTest, PositionsGrowAlongEvaluationOrderAndReplacementsKeepTheirs) {
  PolicySet set;
  PolicyPrecondition blind;
  blind.allow_replace = true;
  for (const char* name : {"a", "b", "c"})
    ASSERT_TRUE(set.ApplyChecked(Named(name), {}, Admit).ok());
  ASSERT_TRUE(set.ApplyChecked(Named("a", "a-v2"), blind, Admit).ok());
  ASSERT_TRUE(set.RemoveChecked("b", {}).ok());
  ASSERT_TRUE(set.ApplyChecked(Named("d"), {}, Admit).ok());
  const PolicySet::Snapshot rules = set.rules();
  std::vector<std::string> names;
  for (size_t i = 0; i < rules->size(); ++i) {
    names.push_back((*rules)[i]->name);
    if (i > 0) {
      EXPECT_LT((*rules)[i - 1]->position, (*rules)[i]->position);
    }
  }
  EXPECT_THAT(names, ::testing::ElementsAre("a", "c", "d"));
}

TEST(PolicyWriteTest, AdmitRefusalAndInvalidRulesChangeNothing) {
  PolicySet set;
  absl::StatusOr<PolicyWrite> refused = set.ApplyChecked(
      Named("a"), {}, [](size_t) { return absl::ResourceExhaustedError("max_policies"); });
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kResourceExhausted);
  auto bad = Named("b");
  bad->action = RuleAction::kKeepOld;
  bad->match.events = {KVMI_EVENT_PF};
  EXPECT_EQ(set.ApplyChecked(bad, {}, Admit).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(set.size(), 0u);
  EXPECT_TRUE(set.CheckWrite("a", {}, false).ok());
  EXPECT_EQ(set.CheckWrite("a", {}, true).code(), absl::StatusCode::kNotFound);
}

}  // namespace
}  // namespace kvmid

namespace kvmid {
namespace {

// ---- Event context (issue 15): rip_bytes_prefix --------------------------------------------

std::shared_ptr<Rule> WrmsrRule(std::string name, std::set<uint8_t> events) {
  auto rule = std::make_shared<Rule>();
  rule->name = std::move(name);
  rule->match.events = std::move(events);
  rule->match.rip_bytes_prefix = {0x0f, 0x30};
  rule->action = RuleAction::kKeepOld;
  return rule;
}

vmem::CapturedContext RipBytes(std::vector<uint8_t> data, bool complete) {
  vmem::CapturedContext context;
  vmem::ContextBlock block;
  block.kind = vmem::ContextKind::kRip;
  block.size = 16;
  block.data = std::move(data);
  block.complete = complete;
  context.blocks.push_back(std::move(block));
  return context;
}

TEST(RipBytesPrefixTest, MatchesOnlyWhenTheBytesAtRipBeginWithThePrefix) {
  PolicySet set;
  ASSERT_EQ(set.Apply(WrmsrRule("wrmsr", {KVMI_EVENT_MSR})), "");
  kvmi::Event e = MsrEvent(0xc0000082, 1, 2);
  vmem::CapturedContext wrmsr = RipBytes({0x0f, 0x30, 0x90}, true);
  vmem::CapturedContext rdmsr = RipBytes({0x0f, 0x32, 0x90}, true);
  vmem::CapturedContext short_read = RipBytes({0x0f}, false);  // the page after was not present
  EXPECT_TRUE(set.Evaluate(Guest("g"), e, &wrmsr).enforcing);
  EXPECT_FALSE(set.Evaluate(Guest("g"), e, &rdmsr).enforcing);
  EXPECT_FALSE(set.Evaluate(Guest("g"), e, &short_read).enforcing);
  EXPECT_FALSE(set.Evaluate(Guest("g"), e, nullptr).enforcing);  // no bytes: no match
  // Enough bytes of an incomplete block still match.
  vmem::CapturedContext partial = RipBytes({0x0f, 0x30}, false);
  EXPECT_TRUE(set.Evaluate(Guest("g"), e, &partial).enforcing);
}

TEST(RipBytesPrefixTest, TheRulesAskForTheBytesOfTheEventsTheyCanMatch) {
  PolicySet set;
  EXPECT_EQ(set.packed_context_demand(KVMI_EVENT_MSR), 0u);
  ASSERT_EQ(set.Apply(WrmsrRule("wrmsr", {KVMI_EVENT_MSR})), "");
  EXPECT_EQ(vmem::ContextDemand::Unpack(set.packed_context_demand(KVMI_EVENT_MSR)),
            (vmem::ContextDemand{2, 0, 0}));
  EXPECT_EQ(set.packed_context_demand(KVMI_EVENT_CR), 0u);
  auto longer = WrmsrRule("any", {});  // every event type
  longer->match.rip_bytes_prefix = {0x0f, 0x01, 0xc1};
  ASSERT_EQ(set.Apply(longer), "");
  EXPECT_EQ(vmem::ContextDemand::Unpack(set.packed_context_demand(KVMI_EVENT_MSR)).rip, 3u);
  EXPECT_EQ(vmem::ContextDemand::Unpack(set.packed_context_demand(KVMI_EVENT_CR)).rip, 3u);
  ASSERT_TRUE(set.Remove("any"));
  EXPECT_EQ(set.packed_context_demand(KVMI_EVENT_CR), 0u);
  EXPECT_EQ(vmem::ContextDemand::Unpack(set.packed_context_demand(KVMI_EVENT_MSR)).rip, 2u);
  ASSERT_EQ(set.Replace({"wrmsr"}, {}), "");
  EXPECT_EQ(set.packed_context_demand(KVMI_EVENT_MSR), 0u);
}

TEST(RipBytesPrefixTest, APrefixAboveTheLimitIsRefusedNamingIt) {
  PolicySet set;
  auto rule = WrmsrRule("long", {KVMI_EVENT_MSR});
  rule->match.rip_bytes_prefix.assign(vmem::kMaxRipPrefixBytes + 1, 0x90);
  EXPECT_THAT(set.Apply(rule), ::testing::HasSubstr("rip_bytes_prefix holds 17 bytes, above the "
                                                    "limit of 16"));
  EXPECT_EQ(set.size(), 0u);
}

}  // namespace
}  // namespace kvmid
