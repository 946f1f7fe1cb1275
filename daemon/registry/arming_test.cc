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

}  // namespace
}  // namespace kvmid
