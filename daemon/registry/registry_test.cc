#include "daemon/registry/registry.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cctype>

#include "daemon/base/mutex.h"
#include "daemon/testing/scripted_host.h"
#include "daemon/testing/wait.h"
#include "kernel/abi/protocol.h"

namespace kvmid {
namespace {

using ::testing::Contains;
using testing::ScriptedHost;
using ::testing::UnorderedElementsAre;
using testing::WaitUntil;

class CountingRouter : public GuestEventRouter {
 public:
  void RouteEvent(const std::shared_ptr<Guest>&, const std::shared_ptr<GuestSession>& session,
                  const kvmi::Event& event) override {
    if (kvmi::FindEvent(event.id())->has_reply) {
      session->ReplyToEvent(kvmi::MakeEventReply(event, KVMI_EVENT_ACTION_CONTINUE), {});
    }
  }
  void SessionEnded(const std::shared_ptr<Guest>&, const std::shared_ptr<GuestSession>&) override {
    ended_++;
  }
  void GuestHooked(const std::shared_ptr<Guest>&) override {}
  std::atomic<int> ended_{0};
};

GuestIdentity Identity(uint8_t uuid_byte, std::string name) {
  GuestIdentity identity;
  identity.uuid[0] = uuid_byte;
  identity.name = std::move(name);
  return identity;
}

class RegistryTest : public ::testing::Test {
 protected:
  void SetUp() override { loop_.Start("registry-test"); }
  void TearDown() override {
    for (const auto& session : sessions_) session->Close("test over");
    EXPECT_TRUE(WaitUntil([&] { return router_.ended_.load() == int(sessions_.size()); }));
    loop_.Stop();
  }
  std::shared_ptr<GuestSession> Connect(ScriptedHost* host, const std::shared_ptr<Guest>& guest,
                                        const GuestIdentity& identity) {
    auto session = std::make_shared<GuestSession>(&loop_, host->Connect(), identity, guest.get(),
                                                  GuestSession::Options{});
    loop_.RunInLoop([session] { session->Start(); });
    sessions_.push_back(session);
    return session;
  }

  EventLoop loop_;
  CountingRouter router_;
  Registry registry_{&router_};
  std::vector<std::shared_ptr<GuestSession>> sessions_;
};

TEST_F(RegistryTest, KeysAreTheUuidElseTheNameElseFreshAnonymousKeys) {
  EXPECT_EQ(registry_.KeyFor(Identity(0xab, "vm")), kvmi::UuidToString(Identity(0xab, "").uuid));
  EXPECT_EQ(registry_.KeyFor(Identity(0, "vm")), "name:vm");
  std::string first = registry_.KeyFor(Identity(0, ""));
  std::string second = registry_.KeyFor(Identity(0, ""));
  EXPECT_EQ(first.rfind("anonymous:", 0), 0u);
  EXPECT_NE(first, second);
}

TEST_F(RegistryTest, AGuestIsCreatedOnceAndFoundByKeyUuidOrName) {
  GuestIdentity identity = Identity(0xab, "web-1");
  std::shared_ptr<Guest> guest = registry_.FindOrCreate(identity);
  ASSERT_TRUE(guest);
  EXPECT_EQ(registry_.FindOrCreate(identity), guest);
  const std::string uuid = kvmi::UuidToString(identity.uuid);
  EXPECT_EQ(guest->key(), uuid);
  EXPECT_EQ(registry_.Find(uuid), guest);
  EXPECT_EQ(registry_.Lookup(uuid), guest);
  std::string upper = uuid;
  for (char& c : upper) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
  EXPECT_EQ(registry_.Lookup(upper), guest);
  EXPECT_EQ(registry_.Lookup("web-1"), guest);
  EXPECT_EQ(registry_.Lookup("web-2"), nullptr);
  EXPECT_EQ(registry_.Find("web-1"), nullptr);  // Find takes keys only

  std::shared_ptr<Guest> other = registry_.FindOrCreate(Identity(0xcd, "web-2"));
  EXPECT_NE(other, guest);
  EXPECT_THAT(registry_.List(), UnorderedElementsAre(guest, other));
}

TEST_F(RegistryTest, AReconnectGetsTheSameGuestAndASecondLiveConnectionIsRefused) {
  GuestIdentity identity = Identity(0xab, "web-1");
  std::shared_ptr<Guest> guest = registry_.FindOrCreate(identity);
  ScriptedHost first;
  ASSERT_TRUE(registry_.Attach(guest, Connect(&first, guest, identity)));
  ASSERT_TRUE(WaitUntil([&] { return guest->state() == GuestState::kHooked; }));

  ScriptedHost intruder;
  EXPECT_FALSE(registry_.Attach(guest, Connect(&intruder, guest, identity)));
  EXPECT_EQ(registry_.duplicate_rejections(), 1u);

  first.Close();
  ASSERT_TRUE(WaitUntil([&] { return guest->state() == GuestState::kGone; }));
  ScriptedHost again;
  std::shared_ptr<Guest> back = registry_.FindOrCreate(identity);
  EXPECT_EQ(back, guest);
  auto session = Connect(&again, back, identity);
  ASSERT_TRUE(registry_.Attach(back, session));
  ASSERT_TRUE(WaitUntil([&] { return guest->state() == GuestState::kHooked; }));
  EXPECT_EQ(guest->session(), session);
  EXPECT_EQ(guest->Snapshot().connections, 2u);
  EXPECT_EQ(registry_.List().size(), 1u);
}

// Records the states a watcher was told about.
class StateRecorder {
 public:
  Registry::StateWatcher watcher() {
    return [this](const std::shared_ptr<Guest>& guest) {
      MutexLock lock(&mu_);
      states_.push_back(guest->state());
    };
  }
  std::vector<GuestState> states() {
    MutexLock lock(&mu_);
    return states_;
  }

 private:
  Mutex mu_;
  std::vector<GuestState> states_ ABSL_GUARDED_BY(mu_);
};

TEST_F(RegistryTest, WatchersSeeEveryStateChangeUntilRemoved) {
  StateRecorder removed, kept;
  uint64_t id = registry_.AddStateWatcher(removed.watcher());
  registry_.AddStateWatcher(kept.watcher());
  GuestIdentity identity = Identity(0xab, "web-1");
  std::shared_ptr<Guest> guest = registry_.FindOrCreate(identity);
  ScriptedHost host;
  ASSERT_TRUE(registry_.Attach(guest, Connect(&host, guest, identity)));
  ASSERT_TRUE(WaitUntil([&] { return removed.states().size() == 2; }));
  EXPECT_THAT(removed.states(), Contains(GuestState::kHooked));  // handshaking, hooked
  registry_.RemoveStateWatcher(id);
  host.Close();
  // The watcher still registered sees the guest go; the removed one does not.
  ASSERT_TRUE(WaitUntil([&] { return kept.states().size() == 3; }));
  EXPECT_EQ(kept.states().back(), GuestState::kGone);
  EXPECT_EQ(removed.states().size(), 2u);
}

TEST_F(RegistryTest, SnapshotsOfListedGuestsShowTheirState) {
  GuestIdentity identity = Identity(0xab, "web-1");
  std::shared_ptr<Guest> guest = registry_.FindOrCreate(identity);
  registry_.FindOrCreate(Identity(0xcd, "web-2"));
  ScriptedHost host;
  host.set_vcpus(3);
  ASSERT_TRUE(registry_.Attach(guest, Connect(&host, guest, identity)));
  ASSERT_TRUE(WaitUntil([&] { return guest->state() == GuestState::kHooked; }));
  std::map<std::string, GuestSnapshot> by_name;
  for (const auto& g : registry_.List()) {
    GuestSnapshot s = g->Snapshot();
    by_name[s.identity.name] = s;
  }
  ASSERT_EQ(by_name.size(), 2u);
  EXPECT_EQ(by_name["web-1"].state, GuestState::kHooked);
  EXPECT_EQ(by_name["web-1"].vcpu_count, 3u);
  EXPECT_EQ(by_name["web-1"].key, kvmi::UuidToString(identity.uuid));
  EXPECT_EQ(by_name["web-2"].state, GuestState::kHandshaking);  // never connected
  EXPECT_EQ(by_name["web-2"].connections, 0u);
}

// A guest connects, is hooked, and goes (its host closes): the registry remembers it as gone.
class GoneGuestTest : public RegistryTest {
 protected:
  std::shared_ptr<Guest> ConnectAndHook(uint8_t uuid_byte, ScriptedHost* host) {
    GuestIdentity identity = Identity(uuid_byte, "vm-" + std::to_string(uuid_byte));
    std::shared_ptr<Guest> guest = registry_.FindOrCreate(identity);
    EXPECT_TRUE(registry_.Attach(guest, Connect(host, guest, identity)));
    EXPECT_TRUE(WaitUntil([&] { return guest->state() == GuestState::kHooked; }));
    return guest;
  }
  std::shared_ptr<Guest> ConnectHookAndGo(uint8_t uuid_byte) {
    auto host = std::make_unique<ScriptedHost>();
    std::shared_ptr<Guest> guest = ConnectAndHook(uuid_byte, host.get());
    host->Close();
    EXPECT_TRUE(WaitUntil([&] { return guest->state() == GuestState::kGone; }));
    hosts_.push_back(std::move(host));
    return guest;
  }
  std::vector<std::unique_ptr<ScriptedHost>> hosts_;
};

TEST_F(GoneGuestTest, PastMaxGoneGuestsTheOldestGoneAreForgotten) {
  registry_.SetGoneGuestBounds(std::chrono::hours(1), 2);
  ScriptedHost live_host;
  std::shared_ptr<Guest> live = ConnectAndHook(9, &live_host);  // hooked: never counted
  std::vector<std::shared_ptr<Guest>> gone;
  for (uint8_t i = 1; i <= 4; ++i) {
    gone.push_back(ConnectHookAndGo(i));
    ASSERT_TRUE(WaitUntil([&] { return registry_.gone_guests() >= std::min<size_t>(i, 2); }));
  }
  // The two that went first are forgotten (on the next List), the two last and the live one stay.
  ASSERT_TRUE(WaitUntil([&] { return registry_.List().size() == 3; }));
  EXPECT_THAT(registry_.List(), UnorderedElementsAre(live, gone[2], gone[3]));
  EXPECT_EQ(registry_.Lookup("vm-1"), nullptr);
  EXPECT_EQ(registry_.Lookup(kvmi::UuidToString(Identity(2, "").uuid)), nullptr);
  EXPECT_EQ(registry_.Lookup("vm-3"), gone[2]);
  EXPECT_EQ(registry_.forgotten_guests(), 2u);
  EXPECT_EQ(registry_.gone_guests(), 2u);
  // As if never seen: the same UUID again is a new guest.
  std::shared_ptr<Guest> again = registry_.FindOrCreate(Identity(1, "vm-1"));
  EXPECT_NE(again, gone[0]);
  EXPECT_EQ(again->Snapshot().connections, 0u);
  EXPECT_EQ(gone[0].use_count(), 1) << "the registry still holds the forgotten guest";
}

TEST_F(GoneGuestTest, AfterTheRetentionAGoneGuestIsForgottenAReconnectedOneIsNot) {
  registry_.SetGoneGuestBounds(std::chrono::seconds(1), 100);
  std::shared_ptr<Guest> gone = ConnectHookAndGo(1);
  std::shared_ptr<Guest> back = ConnectHookAndGo(2);
  ScriptedHost again;
  ASSERT_EQ(ConnectAndHook(2, &again), back);  // reconnected within the retention
  ASSERT_TRUE(WaitUntil([&] { return registry_.Lookup("vm-1") == nullptr; }));
  EXPECT_EQ(registry_.Lookup("vm-2"), back);
  EXPECT_THAT(registry_.List(), UnorderedElementsAre(back));
  EXPECT_EQ(registry_.forgotten_guests(), 1u);
  EXPECT_EQ(registry_.gone_guests(), 0u);
}

}  // namespace
}  // namespace kvmid
