#include "daemon/registry/arming.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

namespace kvmid {
namespace {

using ::testing::IsEmpty;
using ::testing::Pair;
using ::testing::UnorderedElementsAre;

TEST(LeasesTest, EffectiveArmingIsTheUnionOfInterceptsAndTheIntersectionOfPageRights) {
  Leases leases;
  Arming a;
  a.vcpu_events = {1};
  a.crs = {0};
  a.page_access = {{10, 5 /* r-x */}};
  Arming b;
  b.vcpu_events = {6};
  b.msrs = {0xC0000082};
  b.page_access = {{10, 3 /* rw- */}, {11, 7 /* no restriction */}};
  leases.Set("policy:a", a);
  leases.Set("client:b", b);
  Arming all = leases.Effective();
  EXPECT_THAT(all.vcpu_events, UnorderedElementsAre(1, 6));
  EXPECT_THAT(all.crs, UnorderedElementsAre(0));
  EXPECT_THAT(all.msrs, UnorderedElementsAre(0xC0000082));
  // r-x & rw- = r--; a page left rwx is no restriction at all.
  EXPECT_THAT(all.page_access, UnorderedElementsAre(Pair(10, 1)));
}

TEST(LeasesTest, ReleasingAnOwnerDropsOnlyWhatNobodyElseNeeds) {
  Leases leases;
  Arming a;
  a.vcpu_events = {1, 6};
  Arming b;
  b.vcpu_events = {6};
  leases.Set("a", a);
  leases.Set("b", b);
  EXPECT_TRUE(leases.Release("a"));
  EXPECT_FALSE(leases.Release("a"));
  EXPECT_THAT(leases.Effective().vcpu_events, UnorderedElementsAre(6));
}

TEST(ArmingDiffTest, DiffEnablesTheNewAndDisablesTheGoneAndRestoresPages) {
  Arming applied;
  applied.vcpu_events = {1, 2};
  applied.page_access = {{5, 1}, {6, 1}};
  Arming wanted;
  wanted.vcpu_events = {2, 6};
  wanted.page_access = {{6, 5}, {7, 1}};
  ArmingDelta delta = Diff(applied, wanted);
  EXPECT_THAT(delta.vcpu_events, UnorderedElementsAre(Pair(6, true), Pair(1, false)));
  EXPECT_THAT(delta.page_access, UnorderedElementsAre(Pair(6, 5), Pair(7, 1), Pair(5, 7)));
  EXPECT_TRUE(Diff(wanted, wanted).empty());
}

TEST(ArmingDiffTest, DisarmingEverythingRestoresEveryPage) {
  Arming applied;
  applied.crs = {3};
  applied.page_access = {{1, 0}};
  ArmingDelta delta = Diff(applied, Arming());
  EXPECT_THAT(delta.crs, UnorderedElementsAre(Pair(3, false)));
  EXPECT_THAT(delta.page_access, UnorderedElementsAre(Pair(1, 7)));
  EXPECT_THAT(delta.vcpu_events, IsEmpty());
}

TEST(ArmingDiffTest, AVcpuOnlySelectionReachesThatVcpuAlone) {
  Arming applied;
  applied.vcpu_events = {1};
  Arming wanted = applied;
  wanted.vcpu_only[2].events = {6};
  wanted.vcpu_only[2].msrs = {0xC0000082};
  ArmingDelta delta = Diff(applied, wanted);
  EXPECT_FALSE(delta.empty());
  // Every other vCPU: nothing to do.
  EXPECT_TRUE(delta.ForVcpu(0).empty());
  EXPECT_TRUE(delta.ForVcpu(3).empty());
  VcpuArmingDelta two = delta.ForVcpu(2);
  EXPECT_THAT(two.events, UnorderedElementsAre(Pair(6, true)));
  EXPECT_THAT(two.msrs, UnorderedElementsAre(Pair(0xC0000082, true)));
  EXPECT_THAT(wanted.ForVcpu(2).events, UnorderedElementsAre(1, 6));
  EXPECT_THAT(wanted.ForVcpu(0).events, UnorderedElementsAre(1));
}

TEST(ArmingDiffTest, DisablingForEveryVcpuKeepsWhatOneVcpuStillHasOnItsOwn) {
  Arming applied;
  applied.vcpu_events = {6};
  applied.vcpu_only[1].events = {6};
  Arming wanted;
  wanted.vcpu_only[1].events = {6};
  ArmingDelta delta = Diff(applied, wanted);
  EXPECT_THAT(delta.ForVcpu(0).events, UnorderedElementsAre(Pair(6, false)));
  EXPECT_TRUE(delta.ForVcpu(1).empty());  // still wanted there: no disable, no re-enable
  EXPECT_THAT(Diff(wanted, Arming()).ForVcpu(1).events, UnorderedElementsAre(Pair(6, false)));
  EXPECT_TRUE(Diff(wanted, Arming()).ForVcpu(0).empty());
}

TEST(LeasesTest, VcpuOnlySelectionsOfTwoOwnersAreUnited) {
  Leases leases;
  Arming a;
  a.vcpu_only[0].crs = {3};
  Arming b;
  b.vcpu_only[0].crs = {4};
  b.vcpu_only[1].events = {2};
  leases.Set("a", a);
  leases.Set("b", b);
  Arming all = leases.Effective();
  EXPECT_THAT(all.vcpu_only[0].crs, UnorderedElementsAre(3, 4));
  EXPECT_THAT(all.vcpu_only[1].events, UnorderedElementsAre(2));
  leases.Release("b");
  EXPECT_EQ(leases.Effective().vcpu_only.count(1), 0u);
}

ArmingEdit Edit(bool enable, std::optional<uint16_t> vcpu, VcpuArming intercepts,
                std::set<uint8_t> vm_events = {}) {
  ArmingEdit edit;
  edit.enable = enable;
  edit.vcpu = vcpu;
  edit.intercepts = std::move(intercepts);
  edit.vm_events = std::move(vm_events);
  return edit;
}

TEST(ArmingEditTest, EnablingForEveryVcpuAddsToTheSharedSetsAndVmEvents) {
  Arming lease;
  lease.vcpu_events = {2};
  lease.Apply(Edit(true, std::nullopt, VcpuArming{{6}, {3}, {0xc0000080}}, {0}));
  EXPECT_THAT(lease.vcpu_events, UnorderedElementsAre(2, 6));
  EXPECT_THAT(lease.crs, UnorderedElementsAre(3));
  EXPECT_THAT(lease.msrs, UnorderedElementsAre(0xc0000080u));
  EXPECT_THAT(lease.vm_events, UnorderedElementsAre(0));
  EXPECT_THAT(lease.vcpu_only, IsEmpty());
}

TEST(ArmingEditTest, OneVcpuGetsItsOwnSelectionAndLosesItWhenEmpty) {
  Arming lease;
  lease.Apply(Edit(true, uint16_t{1}, VcpuArming{{6}, {4}, {}}));
  EXPECT_THAT(lease.vcpu_events, IsEmpty());
  ASSERT_EQ(lease.vcpu_only.count(1), 1u);
  EXPECT_THAT(lease.vcpu_only[1].events, UnorderedElementsAre(6));
  EXPECT_THAT(lease.vcpu_only[1].crs, UnorderedElementsAre(4));
  lease.Apply(Edit(false, uint16_t{1}, VcpuArming{{6}, {}, {}}));
  EXPECT_THAT(lease.vcpu_only[1].crs, UnorderedElementsAre(4));
  lease.Apply(Edit(false, uint16_t{1}, VcpuArming{{}, {4}, {}}));
  EXPECT_EQ(lease.vcpu_only.count(1), 0u);  // never an empty VcpuArming
  EXPECT_TRUE(lease.empty());
}

TEST(ArmingEditTest, DisablingForEveryVcpuAlsoDisablesItOnSingleVcpus) {
  Arming lease;
  lease.vcpu_events = {6};
  lease.crs = {3};
  lease.vcpu_only[0].events = {6, 2};
  lease.vcpu_only[1].crs = {3};
  lease.Apply(Edit(false, std::nullopt, VcpuArming{{6}, {3}, {}}));
  EXPECT_THAT(lease.vcpu_events, IsEmpty());
  EXPECT_THAT(lease.crs, IsEmpty());
  ASSERT_EQ(lease.vcpu_only.count(0), 1u);
  EXPECT_THAT(lease.vcpu_only[0].events, UnorderedElementsAre(2));
  EXPECT_EQ(lease.vcpu_only.count(1), 0u);
}

TEST(ArmingEditTest, EnablingForOneVcpuLeavesTheOthersAndPagesAlone) {
  Arming lease;
  lease.vcpu_events = {2};
  lease.page_access[0x10] = 1;
  lease.Apply(Edit(true, uint16_t{3}, VcpuArming{{}, {}, {0x10}}));
  EXPECT_THAT(lease.vcpu_events, UnorderedElementsAre(2));
  EXPECT_THAT(lease.vcpu_only[3].msrs, UnorderedElementsAre(0x10u));
  EXPECT_THAT(lease.page_access, UnorderedElementsAre(Pair(0x10u, 1)));
  // Disabling what was never enabled changes nothing.
  lease.Apply(Edit(false, std::nullopt, VcpuArming{{9}, {0}, {}}, {1}));
  EXPECT_THAT(lease.vcpu_events, UnorderedElementsAre(2));
  EXPECT_THAT(lease.vcpu_only[3].msrs, UnorderedElementsAre(0x10u));
}

}  // namespace
}  // namespace kvmid
