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

}  // namespace
}  // namespace kvmid
