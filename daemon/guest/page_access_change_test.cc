#include "daemon/guest/page_access_change.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <future>

#include "daemon/testing/scripted_host.h"
#include "daemon/testing/wait.h"
#include "kernel/abi/protocol.h"

namespace kvmid {
namespace {

using ::testing::ElementsAre;
using ::testing::IsEmpty;
using testing::ReceivedMessage;
using testing::ScriptedHost;

constexpr uint8_t kR = KVMI_PAGE_ACCESS_R;
constexpr uint8_t kRW = KVMI_PAGE_ACCESS_R | KVMI_PAGE_ACCESS_W;
constexpr uint8_t kRWX = KVMI_PAGE_ACCESS_RWX;

Arming PagesArming(std::map<uint64_t, uint8_t> pages) {
  Arming a;
  a.page_access = std::move(pages);
  return a;
}

std::map<uint64_t, uint8_t> LeasePages(const Leases& leases, const OwnerId& owner) {
  auto it = leases.by_owner().find(owner);
  return it == leases.by_owner().end() ? std::map<uint64_t, uint8_t>{} : it->second.page_access;
}

MATCHER_P2(EntryIs, gfn, access, "") {
  return arg.gpa == static_cast<uint64_t>(gfn) * KVMI_PAGE_SIZE && arg.access == access;
}

TEST(PageAccessChangeTest, PlanEditsTheLeaseAndListsWhatChangesOnTheHost) {
  Leases leases;
  Arming applied;
  PageAccessChange change("a", {{1, kR}, {2, kRW}, {3, kRWX}}, true);
  change.Plan(&leases, &applied);
  // rwx is "no restriction": no lease entry, and nothing to send for a page never restricted.
  EXPECT_EQ(LeasePages(leases, "a"), (std::map<uint64_t, uint8_t>{{1, kR}, {2, kRW}}));
  EXPECT_EQ(applied.page_access, (std::map<uint64_t, uint8_t>{{1, kR}, {2, kRW}}));
  EXPECT_THAT(change.entries(), ElementsAre(EntryIs(1, kR), EntryIs(2, kRW)));
  EXPECT_THAT(change.errors(), ElementsAre(0, 0, 0));
}

TEST(PageAccessChangeTest, PlanSendsTheIntersectionOfEveryOwnersRights) {
  Leases leases;
  leases.Set("b", PagesArming({{1, kR}}));
  Arming applied = leases.Effective();
  PageAccessChange change("a", {{1, kRW}, {2, kRW}}, true);
  change.Plan(&leases, &applied);
  // Page 1 stays R (b's lease is stricter): only page 2 changes on the host.
  EXPECT_THAT(change.entries(), ElementsAre(EntryIs(2, kRW)));
  EXPECT_EQ(LeasePages(leases, "a"), (std::map<uint64_t, uint8_t>{{1, kRW}, {2, kRW}}));
}

TEST(PageAccessChangeTest, ReleasingAPageSendsRwx) {
  Leases leases;
  leases.Set("a", PagesArming({{1, kR}}));
  Arming applied = leases.Effective();
  PageAccessChange change("a", {{1, kRWX}}, true);
  change.Plan(&leases, &applied);
  EXPECT_THAT(change.entries(), ElementsAre(EntryIs(1, kRWX)));
  EXPECT_EQ(leases.by_owner().count("a"), 0u);
  EXPECT_TRUE(applied.page_access.empty());
}

TEST(PageAccessChangeTest, ARepeatedPageKeepsItsLastRightsAndGetsAnErrorSlotEachTime) {
  Leases leases;
  Arming applied;
  PageAccessChange change("a", {{1, kR}, {1, kRW}}, true);
  change.Plan(&leases, &applied);
  EXPECT_THAT(change.entries(), ElementsAre(EntryIs(1, kRW)));
  change.RecordAnswer({-KVM_EINVAL});
  EXPECT_THAT(change.errors(), ElementsAre(-KVM_EINVAL, -KVM_EINVAL));
}

TEST(PageAccessChangeTest, NothingToRollBackWithoutAFailure) {
  Leases leases;
  Arming applied;
  PageAccessChange change("a", {{1, kR}}, true);
  change.Plan(&leases, &applied);
  change.RecordAnswer({0});
  EXPECT_FALSE(change.failed());
  EXPECT_FALSE(change.rolled_back());
  EXPECT_THAT(change.RollBack(&leases, &applied), IsEmpty());
  EXPECT_EQ(applied.page_access, (std::map<uint64_t, uint8_t>{{1, kR}}));
}

TEST(PageAccessChangeTest, AllOrNothingPutsEveryPageBackAndUndoesWhatChangedOnTheHost) {
  Leases leases;
  leases.Set("a", PagesArming({{1, kRW}, {9, kR}}));
  Arming applied = leases.Effective();
  PageAccessChange change("a", {{1, kR}, {2, kR}, {3, kR}}, /*all_or_nothing=*/true);
  change.Plan(&leases, &applied);
  ASSERT_EQ(change.entries().size(), 3u);
  change.RecordAnswer({0, -KVM_EINVAL, 0});
  EXPECT_TRUE(change.failed());
  EXPECT_TRUE(change.rolled_back());
  EXPECT_THAT(change.errors(), ElementsAre(0, -KVM_EINVAL, 0));
  std::vector<kvmi::PageAccess> undo = change.RollBack(&leases, &applied);
  // Pages 1 and 3 changed on the host and go back; page 2 never changed there.
  EXPECT_THAT(undo, ElementsAre(EntryIs(1, kRW), EntryIs(3, kRWX)));
  EXPECT_EQ(LeasePages(leases, "a"), (std::map<uint64_t, uint8_t>{{1, kRW}, {9, kR}}));
  EXPECT_EQ(applied.page_access, (std::map<uint64_t, uint8_t>{{1, kRW}, {9, kR}}));
}

TEST(PageAccessChangeTest, BestEffortPutsBackOnlyTheFailedPages) {
  Leases leases;
  Arming applied;
  PageAccessChange change("a", {{1, kR}, {2, kR}}, /*all_or_nothing=*/false);
  change.Plan(&leases, &applied);
  change.RecordAnswer({0, -KVM_EPERM});
  EXPECT_TRUE(change.failed());
  EXPECT_FALSE(change.rolled_back());
  EXPECT_THAT(change.RollBack(&leases, &applied), IsEmpty());
  EXPECT_EQ(LeasePages(leases, "a"), (std::map<uint64_t, uint8_t>{{1, kR}}));
  EXPECT_EQ(applied.page_access, (std::map<uint64_t, uint8_t>{{1, kR}}));
}

class NullListener : public GuestSession::Listener {
 public:
  void OnEvent(const std::shared_ptr<GuestSession>&, const kvmi::Event&) override {}
  void OnClosed(const std::shared_ptr<GuestSession>&, const std::string&) override {
    closed = true;
  }
  std::atomic<bool> closed{false};
};

TEST(PageAccessChangeTest, SendAndUndoGoToTheHostAndEachMessagesErrorReachesItsPages) {
  EventLoop loop;
  loop.Start("pages-test");
  ScriptedHost host;
  // The host refuses the message carrying the last page.
  host.set_responder([&](const ReceivedMessage& m) -> std::optional<std::vector<uint8_t>> {
    kvmi::SetPageAccessRequest request;
    if (m.hdr.id == KVMI_SET_PAGE_ACCESS &&
        kvmi::DecodePayload(kvmi::ByteView(m.payload), &request).ok() &&
        request.entries.size() == 1) {
      std::vector<uint8_t> out;
      kvmi::EncodeReply(m.hdr.id, m.hdr.seq, -KVM_EINVAL, {}, &out);
      return out;
    }
    return host.DefaultReply(m);
  });
  NullListener listener;
  auto session = std::make_shared<GuestSession>(&loop, host.Connect(), GuestIdentity{}, &listener,
                                                GuestSession::Options{});
  loop.RunInLoop([session] { session->Start(); });

  std::vector<std::pair<uint64_t, uint8_t>> pages;
  for (uint64_t gfn = 0; gfn <= kvmi::kMaxSetPageAccessEntries; ++gfn) pages.emplace_back(gfn, kR);
  Leases leases;
  Arming applied;
  PageAccessChange change("a", pages, /*all_or_nothing=*/true);
  change.Plan(&leases, &applied);
  std::promise<void> answered;
  loop.RunInLoop([&] { change.Send(session, [&] { answered.set_value(); }); });
  ASSERT_EQ(answered.get_future().wait_for(std::chrono::seconds(5)), std::future_status::ready);
  std::vector<int32_t> errors = change.errors();
  ASSERT_EQ(errors.size(), pages.size());
  EXPECT_EQ(errors.front(), 0);
  EXPECT_EQ(errors.back(), -KVM_EINVAL);
  ASSERT_TRUE(host.WaitForId(KVMI_SET_PAGE_ACCESS));
  ASSERT_TRUE(host.WaitForId(KVMI_SET_PAGE_ACCESS));

  std::vector<kvmi::PageAccess> undo = change.RollBack(&leases, &applied);
  ASSERT_EQ(undo.size(), kvmi::kMaxSetPageAccessEntries);
  std::promise<std::vector<std::string>> undone;
  PageAccessChange::SendUndo(session, undo, [&](std::vector<std::string> failures) {
    undone.set_value(std::move(failures));
  });
  auto undone_future = undone.get_future();
  ASSERT_EQ(undone_future.wait_for(std::chrono::seconds(5)), std::future_status::ready);
  EXPECT_THAT(undone_future.get(), IsEmpty());
  auto m = host.WaitForId(KVMI_SET_PAGE_ACCESS);
  ASSERT_TRUE(m);
  kvmi::SetPageAccessRequest request;
  ASSERT_TRUE(kvmi::DecodePayload(kvmi::ByteView(m->payload), &request).ok());
  EXPECT_EQ(request.entries.size(), kvmi::kMaxSetPageAccessEntries);
  EXPECT_EQ(request.entries[0].access, kRWX);

  session->Close("test over");
  EXPECT_TRUE(testing::WaitUntil([&] { return listener.closed.load(); }));
  loop.Stop();
}

}  // namespace
}  // namespace kvmid
