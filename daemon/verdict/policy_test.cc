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
