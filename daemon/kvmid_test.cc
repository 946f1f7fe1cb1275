// The daemon core over real UNIX sockets: QEMU-side handshakes, probing, arming, policies,
// handlers with deadlines and fallbacks, reconnects, UNHOOK and shutdown. The host is scripted
// (daemon/testing); tests/e2e runs the same daemon against the host-side model.
#include "daemon/kvmid.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <malloc.h>
#include <stdlib.h>
#include <sys/resource.h>
#include <unistd.h>

#include <atomic>
#include <fstream>
#include <future>
#include <set>
#include <thread>

#include "daemon/testing/scripted_host.h"
#include "daemon/testing/threads.h"
#include "daemon/testing/wait.h"
#include "kernel/abi/protocol.h"
#include "kernel/transport/socket.h"

namespace kvmid {
namespace {

using testing::ConnectAsQemu;
using testing::MakeTestEvent;
using testing::ReceivedMessage;
using testing::ScriptedHost;

using testing::WaitUntil;

kvmi::QemuHello Hello(uint8_t id, const std::string& name) {
  kvmi::QemuHello hello;
  hello.uuid[15] = id;
  hello.name = name;
  hello.start_time = 1700000000;
  return hello;
}

class DaemonTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char dir_template[] = "/tmp/kvmid-test-XXXXXX";
    dir_ = mkdtemp(dir_template);
    std::ofstream(dir_ + "/cookie") << "s3cret\n";
    config_.unix_socket = dir_ + "/kvmi.sock";
    config_.cookie_file = dir_ + "/cookie";
    config_.handshake_timeout = std::chrono::milliseconds(300);
    config_.command_timeout = std::chrono::seconds(5);
    for (auto& d : config_.verdicts.deadlines) d.deadline = std::chrono::milliseconds(200);
  }
  void TearDown() override {
    hosts_.clear();
    daemon_.reset();
    ::unlink((dir_ + "/cookie").c_str());
    ::rmdir(dir_.c_str());
  }

  void StartDaemon() {
    daemon_ = std::make_unique<Daemon>(config_);
    ASSERT_TRUE(daemon_->Start().ok());
  }

  // A guest that completed the handshake and is served by a scripted host.
  ScriptedHost* Connect(uint8_t id, const std::string& name, uint32_t vcpus = 2,
                        ScriptedHost::Responder responder = nullptr) {
    auto host = std::make_unique<ScriptedHost>();
    host->set_vcpus(vcpus);
    if (responder) host->set_responder(std::move(responder));
    kvmi::IntrospectorHello answer;
    kvmi::UniqueFd fd = ConnectAsQemu(config_.unix_socket, Hello(id, name), &answer);
    if (!fd) return nullptr;
    last_answer_ = answer;
    host->Adopt(std::move(fd));
    hosts_.push_back(std::move(host));
    return hosts_.back().get();
  }

  // Hooked, and what it should have armed is acknowledged by the host: only then is there
  // something for unhook or shutdown to disarm (before, the arming is simply never sent).
  std::shared_ptr<Guest> WaitArmed(const std::string& name,
                                   const std::function<bool(const GuestSnapshot&)>& armed) {
    std::shared_ptr<Guest> guest = WaitHooked(name);
    if (!guest) return nullptr;
    bool ok = WaitUntil([&] {
      GuestSnapshot s = guest->Snapshot();
      return armed(s) && s.arming_in_flight == 0;
    });
    return ok ? guest : nullptr;
  }

  std::shared_ptr<Guest> WaitHooked(const std::string& name) {
    std::shared_ptr<Guest> guest;
    WaitUntil([&] {
      guest = daemon_->registry().Lookup(name);
      return guest && guest->state() == GuestState::kHooked;
    });
    return guest && guest->state() == GuestState::kHooked ? guest : nullptr;
  }

  // The reply the host got for event `seq`.
  std::optional<kvmi::EventReply> WaitEventReply(ScriptedHost* host, uint32_t seq,
                                                 uint8_t event_id) {
    auto m = host->WaitFor([seq](const ReceivedMessage& m) {
      return m.hdr.id == KVMI_EVENT_REPLY && m.hdr.seq == seq;
    });
    if (!m) return std::nullopt;
    kvmi::EventReply reply;
    if (!kvmi::DecodeEventReply(kvmi::ByteView(m->payload), event_id, &reply).ok()) {
      return std::nullopt;
    }
    reply.seq = m->hdr.seq;
    return reply;
  }

  std::string dir_;
  DaemonConfig config_;
  std::unique_ptr<Daemon> daemon_;
  std::vector<std::unique_ptr<ScriptedHost>> hosts_;
  kvmi::IntrospectorHello last_answer_;
};

// This process's threads by name (/proc/self/task/*/comm) with their nice values.
std::multimap<std::string, int> ThreadNiceValues() {
  std::multimap<std::string, int> out;
  for (const kvmid::testing::ThreadEntry& thread : kvmid::testing::ListThreads()) {
    errno = 0;
    const int nice = ::getpriority(PRIO_PROCESS, static_cast<id_t>(thread.tid));
    if (errno == 0) out.emplace(thread.name, nice);
  }
  return out;
}

// Whether this process may give a thread a stronger nice value than its own (CAP_SYS_NICE or
// RLIMIT_NICE): tried on a thread of its own.
bool CanRaisePriority(int nice) {
  bool raised = false;
  std::thread([&] { raised = ::setpriority(PRIO_PROCESS, ::gettid(), nice) == 0; }).join();
  return raised;
}

// Checks every kvmid-io-N thread has `io`, and the accept loop and this thread `process`.
void ExpectNiceValues(int io, int process, int io_threads) {
  const std::multimap<std::string, int> threads = ThreadNiceValues();
  int seen = 0;
  for (const auto& [name, nice] : threads) {
    if (name.rfind("kvmid-io-", 0) == 0) {
      ++seen;
      EXPECT_EQ(nice, io) << name;
    } else if (name == "kvmid-accept") {
      EXPECT_EQ(nice, process) << name;
    }
  }
  EXPECT_EQ(seen, io_threads);
  EXPECT_EQ(threads.count("kvmid-accept"), 1u);
  errno = 0;
  EXPECT_EQ(::getpriority(PRIO_PROCESS, 0), process);
}

// io_nice applies to the I/O threads (the guests' event path) only: the accept loop, which serves
// whoever connects, keeps the process's value.
TEST_F(DaemonTest, TheIoThreadsAndOnlyThemGetIoNice) {
  errno = 0;
  const int mine = ::getpriority(PRIO_PROCESS, 0);
  ASSERT_EQ(errno, 0);
  if (mine == kMinNice || !CanRaisePriority(mine - 1)) {
    GTEST_SKIP() << "this process (nice " << mine
                 << ") may not give a thread a stronger value (CAP_SYS_NICE, RLIMIT_NICE)";
  }
  config_.io_nice = mine - 1;
  config_.io_threads = 3;
  ASSERT_NO_FATAL_FAILURE(StartDaemon());
  ExpectNiceValues(mine - 1, mine, 3);
}

// An io_nice weaker than the process's own value would rank the guests' loops below the threads
// that serve clients: they keep the process's value instead.
TEST_F(DaemonTest, AnIoNiceWeakerThanTheProcessLeavesTheIoThreadsAtTheProcesssValue) {
  errno = 0;
  const int mine = ::getpriority(PRIO_PROCESS, 0);
  ASSERT_EQ(errno, 0);
  if (mine == kMaxNice) GTEST_SKIP() << "this process runs at nice 19: no weaker value to ask";
  config_.io_nice = mine + 1;
  config_.io_threads = 2;
  ASSERT_NO_FATAL_FAILURE(StartDaemon());
  ExpectNiceValues(mine, mine, 2);
}

TEST_F(DaemonTest, HandshakeAnswersTheCookieHashAndTheGuestIsProbedAndHooked) {
  StartDaemon();
  ScriptedHost* host = Connect(1, "web-1", 4);
  ASSERT_NE(host, nullptr);
  EXPECT_EQ(last_answer_.struct_size, kvmi::kIntrospectorHelloSize);
  EXPECT_EQ(last_answer_.cookie_hash,
            kvmi::CookieHash(kvmi::ByteView(std::string("s3cret\n"))));  // exact bytes
  auto guest = WaitArmed("web-1", [](const GuestSnapshot&) { return true; });
  ASSERT_NE(guest, nullptr);
  GuestSnapshot s = guest->Snapshot();
  EXPECT_EQ(s.vcpu_count, 4u);
  EXPECT_EQ(s.kvmi_version, 1u);
  EXPECT_EQ(s.identity.start_time, 1700000000);
  EXPECT_EQ(__builtin_popcount(s.allowed_commands), 26);
  EXPECT_EQ(__builtin_popcount(s.allowed_events), 12);
  // The daemon follows new vCPUs and UNHOOK requests on its own.
  EXPECT_THAT(s.applied.vm_events,
              ::testing::UnorderedElementsAre(KVMI_EVENT_CREATE_VCPU, KVMI_EVENT_UNHOOK));
  EXPECT_TRUE(host->WaitForId(KVMI_CONTROL_VM_EVENTS));
}

TEST_F(DaemonTest, AStalledHandshakeDelaysNobodyAndIsDropped) {
  StartDaemon();
  auto connected = kvmi::ConnectUnix(config_.unix_socket);
  ASSERT_TRUE(connected.ok()) << connected.status();
  kvmi::UniqueFd stalled = std::move(*connected);
  ASSERT_NE(Connect(2, "quick"), nullptr);
  EXPECT_NE(WaitHooked("quick"), nullptr);
  // The stalled connection is closed after the 300 ms handshake timeout.
  uint8_t byte;
  auto result = kvmi::ReadExact(stalled.get(), &byte, 1, Clock::now() + std::chrono::seconds(5));
  EXPECT_EQ(result.kind, kvmi::IoResult::kClosed);
}

TEST_F(DaemonTest, GarbageHandshakeIsRejected) {
  StartDaemon();
  auto connected = kvmi::ConnectUnix(config_.unix_socket);
  ASSERT_TRUE(connected.ok()) << connected.status();
  kvmi::UniqueFd fd = std::move(*connected);
  uint32_t bogus_size = 5;  // below the smallest qemu2introspector
  ASSERT_TRUE(kvmi::WriteAll(fd.get(), &bogus_size, 4).ok());
  uint8_t byte;
  EXPECT_EQ(kvmi::ReadExact(fd.get(), &byte, 1, Clock::now() + std::chrono::seconds(5)).kind,
            kvmi::IoResult::kClosed);
  EXPECT_TRUE(daemon_->registry().List().empty());
}

TEST_F(DaemonTest, ProbeRetriesWhileQemuHasNotAllowedCommandsYet) {
  StartDaemon();
  auto refusals = std::make_shared<std::atomic<int>>(3);
  auto defaults = std::make_shared<ScriptedHost>();  // only for its DefaultReply
  auto responder = [defaults, refusals](const ReceivedMessage& m) {
    if (m.hdr.id == KVMI_GET_GUEST_INFO && refusals->fetch_sub(1) > 0) {
      std::vector<uint8_t> out;
      kvmi::EncodeReply(m.hdr.id, m.hdr.seq, -KVM_EPERM, {}, &out);
      return std::optional<std::vector<uint8_t>>(out);
    }
    return std::optional<std::vector<uint8_t>>(defaults->DefaultReply(m));
  };
  ScriptedHost* host = Connect(3, "racy", 2, responder);
  ASSERT_NE(host, nullptr);
  EXPECT_NE(WaitHooked("racy"), nullptr);
  EXPECT_LE(refusals->load(), 0);
}

TEST_F(DaemonTest, TwoLiveConnectionsClaimingOneUuidAreRefusedNotMerged) {
  StartDaemon();
  ScriptedHost* first = Connect(4, "twin");
  ASSERT_NE(first, nullptr);
  ASSERT_NE(WaitHooked("twin"), nullptr);
  ScriptedHost* second = Connect(4, "twin");
  ASSERT_NE(second, nullptr);
  EXPECT_TRUE(second->WaitClosed());
  EXPECT_EQ(daemon_->registry().duplicate_rejections(), 1u);
  EXPECT_EQ(daemon_->registry().Lookup("twin")->state(), GuestState::kHooked);
}

TEST_F(DaemonTest, PolicyIsArmedOnConnectEnforcedAndReArmedAfterAReconnect) {
  StartDaemon();
  ASSERT_TRUE(daemon_->ApplyPolicy(ForbidClearCr0WpRule("wp", RuleMode::kEnforce)).ok());
  ScriptedHost* host = Connect(5, "guarded", 2);
  ASSERT_NE(host, nullptr);
  ASSERT_NE(WaitHooked("guarded"), nullptr);
  auto is_cr0_armed = [](const ReceivedMessage& m) {
    if (m.hdr.id != KVMI_CONTROL_CR) return false;
    kvmi::ControlCrRequest r;
    return kvmi::DecodePayload(kvmi::ByteView(m.payload), &r).ok() && r.cr == 0 && r.enable;
  };
  EXPECT_TRUE(host->WaitFor(is_cr0_armed));
  EXPECT_TRUE(host->WaitFor(is_cr0_armed));  // both vCPUs

  kvmi::Event event = MakeTestEvent(KVMI_EVENT_CR, 1, 7);
  event.specific.cr.cr = 0;
  event.specific.cr.old_value = 0x80010033;  // PG|WP|...
  event.specific.cr.new_value = 0x80000033;  // WP cleared
  host->SendEvent(event);
  auto reply = WaitEventReply(host, 7, KVMI_EVENT_CR);
  ASSERT_TRUE(reply);
  EXPECT_EQ(reply->action, KVMI_EVENT_ACTION_CONTINUE);
  EXPECT_EQ(reply->specific.cr.new_val, 0x80010033u);

  // QEMU reconnects (reconnect=N): same UUID, fresh kernel state; the daemon re-arms.
  host->Close();
  ASSERT_TRUE(WaitUntil(
      [&] { return daemon_->registry().Lookup("guarded")->state() == GuestState::kGone; }));
  ScriptedHost* again = Connect(5, "guarded", 2);
  ASSERT_NE(again, nullptr);
  ASSERT_NE(WaitHooked("guarded"), nullptr);
  EXPECT_TRUE(again->WaitFor(is_cr0_armed));
  EXPECT_EQ(daemon_->registry().Lookup("guarded")->Snapshot().connections, 2u);
}

// SIGHUP's work: the configured policies change as a set, the API's stay, deadlines, fallbacks
// and labels follow, and the guest keeps its connection. A bad configuration changes nothing.
TEST_F(DaemonTest, ReloadReplacesConfiguredPoliciesKeepsTheApisAndTheGuest) {
  StartDaemon();
  auto names = [this] {
    std::set<std::string> out;
    for (const auto& rule : *daemon_->policies().rules()) out.insert(rule->name);
    return out;
  };
  auto armed_cr = [](uint32_t cr) {
    return [cr](const ReceivedMessage& m) {
      if (m.hdr.id != KVMI_CONTROL_CR) return false;
      kvmi::ControlCrRequest r;
      return kvmi::DecodePayload(kvmi::ByteView(m.payload), &r).ok() && r.cr == cr && r.enable;
    };
  };
  LoadedConfig first;
  first.daemon = config_;
  first.rules = {ForbidClearCr0WpRule("wp", RuleMode::kEnforce)};
  first.guest_labels["reloaded"] = {{"tier", "dev"}};
  ASSERT_TRUE(daemon_->Reload(first).ok());
  ASSERT_TRUE(
      daemon_->ApplyPolicy(LockMsrAfterBootRule("api-lstar", 0xC0000082, RuleMode::kEnforce)).ok());
  ScriptedHost* host = Connect(20, "reloaded", 1);
  ASSERT_NE(host, nullptr);
  std::shared_ptr<Guest> guest = WaitHooked("reloaded");
  ASSERT_NE(guest, nullptr);
  EXPECT_TRUE(host->WaitFor(armed_cr(0)));
  std::shared_ptr<GuestSession> session = guest->session();
  ASSERT_NE(session, nullptr);
  EXPECT_EQ(daemon_->pipeline().ViewOf(*guest)->labels.at("tier"), "dev");

  LoadedConfig second = first;
  second.rules = {ForbidClearCr4SmepSmapRule("smep", RuleMode::kEnforce)};
  second.guest_labels = {{"reloaded", {{"tier", "prod"}}}};
  for (EventDeadline& d : second.daemon.verdicts.deadlines) {
    d = EventDeadline{std::chrono::milliseconds(777), KVMI_EVENT_ACTION_CRASH};
  }
  ASSERT_TRUE(daemon_->Reload(second).ok());
  EXPECT_EQ(names(), (std::set<std::string>{"api-lstar", "smep"}));
  EXPECT_EQ(daemon_->configured_policies(), (std::set<std::string>{"smep"}));
  EXPECT_TRUE(host->WaitFor(armed_cr(4)));  // the new policy is armed on the live guest
  EXPECT_EQ(daemon_->pipeline().deadline_for(KVMI_EVENT_PF).deadline.count(), 777);
  EXPECT_EQ(daemon_->pipeline().deadline_for(KVMI_EVENT_PF).fallback_action,
            KVMI_EVENT_ACTION_CRASH);
  EXPECT_EQ(daemon_->pipeline().ViewOf(*guest)->labels.at("tier"), "prod");
  EXPECT_EQ(guest->session(), session);  // same connection, never dropped
  EXPECT_FALSE(session->closed());
  EXPECT_EQ(guest->state(), GuestState::kHooked);

  // One valid and one invalid policy: refused as a whole, nothing changes.
  LoadedConfig bad = first;
  bad.rules = {ForbidClearCr0WpRule("wp2", RuleMode::kEnforce), std::make_shared<Rule>()};
  for (EventDeadline& d : bad.daemon.verdicts.deadlines) d.deadline = std::chrono::seconds(9);
  absl::Status refused = daemon_->Reload(bad);
  EXPECT_EQ(refused.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(refused.message()), ::testing::HasSubstr("name"));
  EXPECT_EQ(names(), (std::set<std::string>{"api-lstar", "smep"}));
  EXPECT_EQ(daemon_->configured_policies(), (std::set<std::string>{"smep"}));
  EXPECT_EQ(daemon_->pipeline().deadline_for(KVMI_EVENT_PF).deadline.count(), 777);
  EXPECT_EQ(daemon_->pipeline().ViewOf(*guest)->labels.at("tier"), "prod");
}

// A reload may not take the policies past max_policies: configured + API-applied (a name in
// both counts once) beyond the reload's own limit is refused, naming the limit, and the running
// configuration stays (policies, configured names, limits).
TEST_F(DaemonTest, ReloadPastMaxPoliciesIsRefusedAndTheOldConfigurationStays) {
  StartDaemon();
  auto names = [this] {
    std::set<std::string> out;
    for (const auto& rule : *daemon_->policies().rules()) out.insert(rule->name);
    return out;
  };
  auto named = [](const std::string& name) {
    return ForbidClearCr0WpRule(name, RuleMode::kEnforce);
  };
  LoadedConfig first;
  first.daemon = config_;
  first.security.limits.max_policies = 4;
  first.rules = {named("c1")};
  ASSERT_TRUE(daemon_->Reload(first).ok());
  ASSERT_TRUE(daemon_->ApplyApiPolicy(named("a1"), PolicyPrecondition{}).ok());
  ASSERT_TRUE(daemon_->ApplyApiPolicy(named("a2"), PolicyPrecondition{}).ok());

  LoadedConfig more = first;
  more.security.limits.max_policies = 4;
  more.security.limits.max_policy_name_bytes = 64;       // would change with the reload
  more.rules = {named("c1"), named("c2"), named("c3")};  // 3 + 2 API = 5 > 4
  absl::Status refused = daemon_->Reload(more);
  EXPECT_EQ(refused.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(std::string(refused.message()), ::testing::HasSubstr("limits.max_policies"));
  EXPECT_THAT(std::string(refused.message()), ::testing::HasSubstr("5 policies"));
  EXPECT_EQ(names(), (std::set<std::string>{"c1", "a1", "a2"}));
  EXPECT_EQ(daemon_->configured_policies(), (std::set<std::string>{"c1"}));
  EXPECT_EQ(daemon_->limits().max_policy_name_bytes, first.security.limits.max_policy_name_bytes);

  // A lower limit on its own counts too: 1 configured + 2 API = 3 > 2.
  LoadedConfig lower = first;
  lower.security.limits.max_policies = 2;
  EXPECT_EQ(daemon_->Reload(lower).code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(daemon_->limits().max_policies, 4u);

  // Within the limit: one removed configured policy makes room; a configured name that an API
  // policy has too is one policy.
  LoadedConfig fits = first;
  fits.rules = {named("c2"), named("a1")};  // c1 goes: {c2, a1, a2} = 3
  fits.security.limits.max_policies = 3;
  ASSERT_TRUE(daemon_->Reload(fits).ok());
  EXPECT_EQ(names(), (std::set<std::string>{"c2", "a1", "a2"}));
  EXPECT_EQ(daemon_->limits().max_policies, 3u);
}

// The configuration owns its names: an API override (override_config) or deletion of a
// configured policy lasts until the next reload, which puts the file's version back; an API
// policy whose name the file starts to configure is replaced by the file's and leaves the saved
// API set; an unchanged configured policy keeps its etag.
TEST_F(DaemonTest, ReloadPutsTheConfigurationsVersionBackOverApiOverrides) {
  StartDaemon();
  auto lstar = [](RuleMode mode, const std::string& origin) {
    auto rule = LockMsrAfterBootRule("lstar-locked", 0xC0000082, mode);
    rule->origin = origin;
    return rule;
  };
  auto named = [](const std::string& name) {
    auto rule = ForbidClearCr0WpRule(name, RuleMode::kEnforce);
    rule->origin = name;
    return rule;
  };
  std::vector<std::vector<std::shared_ptr<const Rule>>> saved;
  daemon_->set_policy_persister([&saved](const std::vector<std::shared_ptr<const Rule>>& rules) {
    saved.push_back(rules);
    return absl::OkStatus();
  });
  LoadedConfig config;
  config.daemon = config_;
  config.rules = {lstar(RuleMode::kEnforce, "file"), named("cr0-wp")};
  ASSERT_TRUE(daemon_->Reload(config).ok());
  const std::shared_ptr<const Rule> configured = daemon_->policies().Find("lstar-locked");
  ASSERT_NE(configured, nullptr);
  const std::string wp_etag = daemon_->policies().Find("cr0-wp")->etag;

  // Without override_config neither the etag nor allow_replace gets through.
  PolicyPrecondition replace;
  replace.etag = configured->etag;
  absl::StatusOr<PolicyWrite> refused =
      daemon_->ApplyApiPolicy(lstar(RuleMode::kMonitor, "api"), replace);
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(refused.status().message()), ::testing::HasSubstr("override_config"));
  EXPECT_EQ(daemon_->RemoveApiPolicy("cr0-wp", PolicyPrecondition{}).status().code(),
            absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(daemon_->policies().Find("lstar-locked"), configured);

  // With it: overridden, not saved (it lasts until the next reload or restart).
  replace.override_config = true;
  absl::StatusOr<PolicyWrite> overridden =
      daemon_->ApplyApiPolicy(lstar(RuleMode::kMonitor, "api"), replace);
  ASSERT_TRUE(overridden.ok()) << overridden.status();
  EXPECT_TRUE(overridden->overrode_config());
  EXPECT_EQ(daemon_->policies().Find("lstar-locked")->mode, RuleMode::kMonitor);
  EXPECT_TRUE(daemon_->api_policies().empty());
  EXPECT_TRUE(saved.empty());
  PolicyPrecondition override_delete;
  override_delete.override_config = true;
  absl::StatusOr<PolicyWrite> deleted = daemon_->RemoveApiPolicy("cr0-wp", override_delete);
  ASSERT_TRUE(deleted.ok()) << deleted.status();
  EXPECT_TRUE(deleted->overrode_config());
  EXPECT_EQ(daemon_->policies().Find("cr0-wp"), nullptr);

  // An API policy of a name the file does not configure yet.
  ASSERT_TRUE(daemon_->ApplyApiPolicy(named("later"), PolicyPrecondition{}).ok());
  ASSERT_EQ(daemon_->api_policies().size(), 1u);

  // SIGHUP, with "later" now in the file: the file's versions are in force again.
  LoadedConfig next = config;
  next.rules = {lstar(RuleMode::kEnforce, "file"), named("cr0-wp"), named("later")};
  ASSERT_TRUE(daemon_->Reload(next).ok());
  const std::shared_ptr<const Rule> back = daemon_->policies().Find("lstar-locked");
  EXPECT_EQ(back->mode, RuleMode::kEnforce);
  EXPECT_EQ(back->source, PolicySource::kConfig);
  EXPECT_FALSE(back->overrides_config);
  EXPECT_NE(back->etag, overridden->rule->etag);
  ASSERT_NE(daemon_->policies().Find("cr0-wp"), nullptr);
  EXPECT_EQ(daemon_->policies().Find("later")->source, PolicySource::kConfig);
  EXPECT_TRUE(daemon_->api_policies().empty());
  ASSERT_FALSE(saved.empty());
  EXPECT_TRUE(saved.back().empty()) << "the displaced API policy left the state";

  // An unchanged configured policy keeps its etag across a reload.
  const std::string later_etag = daemon_->policies().Find("later")->etag;
  ASSERT_TRUE(daemon_->Reload(next).ok());
  EXPECT_EQ(daemon_->policies().Find("later")->etag, later_etag);
  EXPECT_NE(daemon_->policies().Find("cr0-wp")->etag, wp_etag) << "it was deleted meanwhile";
}

class TestHandler : public VerdictHandler {
 public:
  std::string id() const override { return "test"; }
  void OnBlockingEvent(const EventContext& ctx, VerdictPromise promise) override {
    MutexLock lock(&mutex);
    contexts.push_back(ctx);
    promises.push_back(std::move(promise));
    cv.SignalAll();
  }
  bool WaitCount(size_t n) {
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(5);
    MutexLock lock(&mutex);
    while (promises.size() < n) {
      if (!cv.WaitUntil(&mutex, deadline)) return promises.size() >= n;
    }
    return true;
  }
  Mutex mutex;
  CondVar cv;
  // Appended under `mutex`; the tests read them once WaitCount said they are there.
  std::vector<EventContext> contexts;
  std::vector<VerdictPromise> promises;
};

TEST_F(DaemonTest, HandlerVerdictIsSentWithItsRegistersInOneBatch) {
  StartDaemon();
  auto handler = std::make_shared<TestHandler>();
  auto registration = daemon_->pipeline().RegisterHandler(
      handler, HandlerClaim{{KVMI_EVENT_BREAKPOINT}, {}, {}, std::chrono::seconds(5), {}, 0, {}});
  ScriptedHost* host = Connect(6, "debugged");
  ASSERT_NE(WaitHooked("debugged"), nullptr);
  host->SendEvent(MakeTestEvent(KVMI_EVENT_BREAKPOINT, 0, 11));
  ASSERT_TRUE(handler->WaitCount(1));
  Verdict verdict;
  verdict.action = KVMI_EVENT_ACTION_RETRY;
  verdict.registers = kvm_regs{};
  verdict.registers->rip = 0xffffffff81000001;
  verdict.decided_by = "handler:test";
  EXPECT_TRUE(handler->promises[0].Answer(verdict));
  EXPECT_FALSE(handler->promises[0].Answer(verdict));  // exactly once
  auto set = host->WaitForId(KVMI_SET_REGISTERS);
  ASSERT_TRUE(set);
  kvmi::SetRegistersRequest regs;
  ASSERT_TRUE(kvmi::DecodePayload(kvmi::ByteView(set->payload), &regs).ok());
  EXPECT_EQ(regs.regs.rip, 0xffffffff81000001u);
  auto reply = WaitEventReply(host, 11, KVMI_EVENT_BREAKPOINT);
  ASSERT_TRUE(reply);
  EXPECT_EQ(reply->action, KVMI_EVENT_ACTION_RETRY);
  EXPECT_EQ(daemon_->pipeline().stats().by_handler.load(), 1u);
}

// A remote verdict is written by the thread that answers it (while the guest's loop sleeps; by the
// loop while it is awake), and observed there before the vCPU's next event can be: a slow
// observer holds the reply to the guest's next event (and so its observation) back rather than
// let observers see the two out of order. The deadline timer left behind does nothing when it
// fires.
TEST_F(DaemonTest, AVerdictAnsweredOffTheLoopIsWrittenObservedInOrderAndNotFallenBackOn) {
  StartDaemon();
  auto handler = std::make_shared<TestHandler>();
  HandlerClaim claim;
  claim.events = {KVMI_EVENT_BREAKPOINT};
  claim.deadline = std::chrono::seconds(1);  // far enough to be answered first under load
  auto registration = daemon_->pipeline().RegisterHandler(handler, claim);
  Mutex observed_mutex;
  std::vector<std::pair<uint32_t, std::string>> observed;  // (seq, decided_by)
  uint64_t observer = daemon_->pipeline().AddObserver([&](const ObservedEvent& o) {
    if (o.event.id() == KVMI_EVENT_BREAKPOINT) {
      std::this_thread::sleep_for(std::chrono::milliseconds(100));  // a slow observer
    }
    MutexLock lock(&observed_mutex);
    observed.emplace_back(o.event.seq, o.verdict.decided_by);
  });
  ScriptedHost* host = Connect(12, "remote");
  ASSERT_NE(WaitHooked("remote"), nullptr);
  const auto sent = Clock::now();
  host->SendEvent(MakeTestEvent(KVMI_EVENT_BREAKPOINT, 0, 31));
  ASSERT_TRUE(handler->WaitCount(1));
  std::thread answering([&] { handler->promises[0].Answer(Verdict::Continue("handler:test")); });
  auto reply = WaitEventReply(host, 31, KVMI_EVENT_BREAKPOINT);
  ASSERT_TRUE(reply);
  // The vCPU goes on at once and traps again; nobody claims XSETBV: answered on the loop.
  host->SendEvent(MakeTestEvent(KVMI_EVENT_XSETBV, 0, 32));
  ASSERT_TRUE(WaitEventReply(host, 32, KVMI_EVENT_XSETBV));
  answering.join();
  ASSERT_TRUE(WaitUntil([&] {
    MutexLock lock(&observed_mutex);
    return observed.size() >= 2;
  }));
  std::this_thread::sleep_until(sent + claim.deadline + std::chrono::milliseconds(200));
  daemon_->pipeline().RemoveObserver(observer);
  {
    MutexLock lock(&observed_mutex);
    ASSERT_EQ(observed.size(), 2u);
    EXPECT_EQ(observed[0], std::make_pair(31u, std::string("handler:test")));
    EXPECT_EQ(observed[1].first, 32u);
  }
  EXPECT_FALSE(host->WaitFor([](const ReceivedMessage& m) { return m.hdr.id == KVMI_EVENT_REPLY; },
                             std::chrono::milliseconds(100)));
  EXPECT_EQ(daemon_->pipeline().stats().by_handler.load(), 1u);
  EXPECT_EQ(daemon_->pipeline().stats().fallback_deadline.load(), 0u);
}

TEST_F(DaemonTest, AHandlerThatMissesItsDeadlineGetsTheFallback) {
  StartDaemon();
  auto handler = std::make_shared<TestHandler>();
  HandlerClaim claim;
  claim.events = {KVMI_EVENT_MSR};
  claim.deadline = std::chrono::milliseconds(100);
  claim.fallback_action = KVMI_EVENT_ACTION_CONTINUE;
  auto registration = daemon_->pipeline().RegisterHandler(handler, claim);
  ScriptedHost* host = Connect(7, "slow");
  ASSERT_NE(WaitHooked("slow"), nullptr);
  kvmi::Event event = MakeTestEvent(KVMI_EVENT_MSR, 0, 21);
  event.specific.msr.msr = 0x176;
  event.specific.msr.new_value = 0x1234;
  auto sent = Clock::now();
  host->SendEvent(event);
  auto reply = WaitEventReply(host, 21, KVMI_EVENT_MSR);
  ASSERT_TRUE(reply);
  EXPECT_GE(Clock::now() - sent, std::chrono::milliseconds(100));
  EXPECT_EQ(reply->action, KVMI_EVENT_ACTION_CONTINUE);
  EXPECT_EQ(reply->specific.msr.new_val, 0x1234u);  // CONTINUE keeps the guest's value
  EXPECT_EQ(daemon_->pipeline().stats().fallback_deadline.load(), 1u);
  EXPECT_FALSE(handler->promises.at(0).Answer(Verdict::Continue("late")));
  EXPECT_EQ(daemon_->registry().Lookup("slow")->Snapshot().fallbacks, 1u);
}

TEST_F(DaemonTest, AHandlerThatGoesAwayReleasesItsEventsAtOnce) {
  StartDaemon();
  auto handler = std::make_shared<TestHandler>();
  HandlerClaim claim;
  claim.deadline = std::chrono::seconds(30);  // far away: only the handler going away helps
  auto registration = daemon_->pipeline().RegisterHandler(handler, claim);
  ScriptedHost* host = Connect(8, "orphan");
  ASSERT_NE(WaitHooked("orphan"), nullptr);
  host->SendEvent(MakeTestEvent(KVMI_EVENT_HYPERCALL, 1, 31));
  ASSERT_TRUE(handler->WaitCount(1));
  auto sent = Clock::now();
  registration.Reset();
  handler->promises.clear();  // the client's stream is gone: its promises die
  auto reply = WaitEventReply(host, 31, KVMI_EVENT_HYPERCALL);
  ASSERT_TRUE(reply);
  EXPECT_LT(Clock::now() - sent, std::chrono::seconds(5));
  EXPECT_EQ(daemon_->pipeline().stats().fallback_handler_gone.load(), 1u);
}

TEST_F(DaemonTest, ReleasingALeaseRestoresTheGuest) {
  StartDaemon();
  ScriptedHost* host = Connect(9, "leased");
  auto guest = WaitHooked("leased");
  ASSERT_NE(guest, nullptr);
  Arming arming;
  arming.vcpu_events = {KVMI_EVENT_PF};
  arming.page_access = {{0x10, KVMI_PAGE_ACCESS_R}};
  guest->SetLease("client:42", arming);
  auto page_set = [](uint8_t access) {
    return [access](const ReceivedMessage& m) {
      kvmi::SetPageAccessRequest r;
      return m.hdr.id == KVMI_SET_PAGE_ACCESS &&
             kvmi::DecodePayload(kvmi::ByteView(m.payload), &r).ok() && r.entries.size() == 1 &&
             r.entries[0].gpa == 0x10000 && r.entries[0].access == access;
    };
  };
  EXPECT_TRUE(host->WaitFor(page_set(KVMI_PAGE_ACCESS_R)));
  guest->ReleaseLease("client:42");
  EXPECT_TRUE(host->WaitFor(page_set(KVMI_PAGE_ACCESS_RWX)));
  EXPECT_TRUE(guest->Snapshot().applied.page_access.empty());
}

// A lease change counts as in flight from the moment it is made (not only once its commands are
// on the wire) until the host answered every command it turned into: a client that waits for
// zero knows its hooks are in effect.
TEST_F(DaemonTest, ALeaseChangeIsInFlightUntilTheHostAnsweredIt) {
  config_.command_timeout = std::chrono::seconds(2);  // long enough to look at it in flight
  StartDaemon();
  // How the host treats CONTROL_MSR. Shared with the host's reader thread, which may outlive this
  // body until TearDown.
  enum MsrAnswer : int { kNever, kHeld, kAnswer };
  auto msr = std::make_shared<std::atomic<int>>(kNever);
  auto held = std::make_shared<std::atomic<bool>>(false);  // the host holds an answer now
  auto answers = std::make_shared<ScriptedHost>();  // only its default replies (never connected)
  ScriptedHost* host = Connect(10, "slow-host", 2, [msr, held, answers](const ReceivedMessage& m) {
    if (m.hdr.id == KVMI_CONTROL_MSR) {
      if (*msr == kNever) return std::optional<std::vector<uint8_t>>();  // left unanswered
      // Held (its reader stalls) until the test has looked at the count: an answer sent at
      // once can be taken before the test's next step (kvmid's loop outranks the test).
      if (*msr == kHeld) *held = true;
      for (int i = 0; i < 5000 && *msr == kHeld; ++i) {
        std::this_thread::sleep_for(std::chrono::milliseconds(1));
      }
    }
    return std::optional<std::vector<uint8_t>>(answers->DefaultReply(m));
  });
  ASSERT_NE(host, nullptr);
  auto guest = WaitArmed("slow-host", [](const GuestSnapshot&) { return true; });
  ASSERT_NE(guest, nullptr);
  auto control_msr = [](bool enable) {
    return [enable](const ReceivedMessage& m) {
      kvmi::ControlMsrRequest r;
      return m.hdr.id == KVMI_CONTROL_MSR &&
             kvmi::DecodePayload(kvmi::ByteView(m.payload), &r).ok() && r.enable == enable;
    };
  };

  Arming arming;
  arming.msrs = {0xc0000082};
  guest->SetLease("client:1", arming);
  EXPECT_GT(guest->Snapshot().arming_in_flight, 0u);  // decided, maybe not even sent yet
  for (int vcpu = 0; vcpu < 2; ++vcpu) ASSERT_TRUE(host->WaitFor(control_msr(true)));
  EXPECT_GT(guest->Snapshot().arming_in_flight, 0u);  // sent, not answered
  // The host never answers: the commands time out, the count drops, the failure is reported.
  ASSERT_TRUE(WaitUntil([&] { return guest->Snapshot().arming_in_flight == 0; }));
  EXPECT_THAT(guest->Snapshot().arm_errors, ::testing::Not(::testing::IsEmpty()));

  // The release: in flight while the host holds its answers, settled once it gives them.
  *msr = kHeld;
  guest->ReleaseLease("client:1");
  EXPECT_GT(guest->Snapshot().arming_in_flight, 0u);  // decided
  ASSERT_TRUE(WaitUntil([&] { return held->load(); }));
  EXPECT_GT(guest->Snapshot().arming_in_flight, 0u);  // sent, not answered
  *msr = kAnswer;
  for (int vcpu = 0; vcpu < 2; ++vcpu) ASSERT_TRUE(host->WaitFor(control_msr(false)));
  ASSERT_TRUE(WaitUntil([&] { return guest->Snapshot().arming_in_flight == 0; }));
}

TEST_F(DaemonTest, UnhookEventReleasesHooksAndClosesPromptly) {
  StartDaemon();
  ASSERT_TRUE(
      daemon_->ApplyPolicy(LockMsrAfterBootRule("lstar", 0xC0000082, RuleMode::kEnforce)).ok());
  ScriptedHost* host = Connect(10, "migrating", 1);
  ASSERT_NE(WaitArmed("migrating",
                      [](const GuestSnapshot& s) { return s.applied.msrs.count(0xC0000082) > 0; }),
            nullptr);
  host->SendEvent(MakeTestEvent(KVMI_EVENT_UNHOOK, 0, 40));
  auto disarm_msr = host->WaitFor([](const ReceivedMessage& m) {
    kvmi::ControlMsrRequest r;
    return m.hdr.id == KVMI_CONTROL_MSR &&
           kvmi::DecodePayload(kvmi::ByteView(m.payload), &r).ok() && !r.enable;
  });
  EXPECT_TRUE(disarm_msr);
  EXPECT_TRUE(host->WaitClosed());
  EXPECT_TRUE(WaitUntil(
      [&] { return daemon_->registry().Lookup("migrating")->state() == GuestState::kGone; }));
  // No reply is ever sent for UNHOOK (§6.1).
  EXPECT_FALSE(host->WaitFor(
      [](const ReceivedMessage& m) { return m.hdr.id == KVMI_EVENT_REPLY && m.hdr.seq == 40; },
      std::chrono::milliseconds(50)));
}

TEST_F(DaemonTest, ShutdownDisarmsEveryGuestAndCloses) {
  StartDaemon();
  ASSERT_TRUE(daemon_->ApplyPolicy(ForbidClearCr4SmepSmapRule("smep", RuleMode::kEnforce)).ok());
  ScriptedHost* a = Connect(11, "a", 1);
  ScriptedHost* b = Connect(12, "b", 1);
  auto cr4_armed = [](const GuestSnapshot& s) { return s.applied.crs.count(4) > 0; };
  ASSERT_NE(WaitArmed("a", cr4_armed), nullptr);
  ASSERT_NE(WaitArmed("b", cr4_armed), nullptr);
  daemon_->Shutdown();
  for (ScriptedHost* host : {a, b}) {
    EXPECT_TRUE(host->WaitFor([](const ReceivedMessage& m) {
      kvmi::ControlCrRequest r;
      return m.hdr.id == KVMI_CONTROL_CR &&
             kvmi::DecodePayload(kvmi::ByteView(m.payload), &r).ok() && r.cr == 4 && !r.enable;
    }));
    EXPECT_TRUE(host->WaitClosed());
  }
  EXPECT_NE(::access(config_.unix_socket.c_str(), F_OK), 0);
}

TEST_F(DaemonTest, APausedVcpuStaysPausedUntilResumedOrItsOwnerGoesAway) {
  StartDaemon();
  ScriptedHost* host = Connect(13, "paused", 2);
  auto guest = WaitHooked("paused");
  ASSERT_NE(guest, nullptr);
  std::promise<CommandResult> paused;
  guest->Pause("client:1", 1, [&](CommandResult r) { paused.set_value(std::move(r)); });
  auto request = host->WaitForId(KVMI_PAUSE_VCPU);
  ASSERT_TRUE(request);
  kvmi::PauseVcpuRequest decoded;
  ASSERT_TRUE(kvmi::DecodePayload(kvmi::ByteView(request->payload), &decoded).ok());
  EXPECT_EQ(decoded.vcpu, 1);
  host->SendEvent(MakeTestEvent(KVMI_EVENT_PAUSE_VCPU, 1, 50));  // the vCPU stopped
  auto paused_future = paused.get_future();
  ASSERT_EQ(paused_future.wait_for(std::chrono::seconds(5)), std::future_status::ready);
  EXPECT_TRUE(paused_future.get().ok());
  EXPECT_EQ(guest->Snapshot().paused_vcpus.at(1), "client:1");
  // Held: no reply until resumed.
  EXPECT_FALSE(host->WaitFor([](const ReceivedMessage& m) { return m.hdr.id == KVMI_EVENT_REPLY; },
                             std::chrono::milliseconds(300)));
  EXPECT_FALSE(guest->Resume("client:2", 1));  // not the owner
  EXPECT_TRUE(guest->Resume("client:1", 1));
  auto reply = WaitEventReply(host, 50, KVMI_EVENT_PAUSE_VCPU);
  ASSERT_TRUE(reply);
  EXPECT_EQ(reply->action, KVMI_EVENT_ACTION_CONTINUE);

  // Paused again, then the owner disappears: the vCPU is let go at once.
  guest->Pause("client:1", 0, [](const CommandResult&) {});
  ASSERT_TRUE(host->WaitForId(KVMI_PAUSE_VCPU));
  host->SendEvent(MakeTestEvent(KVMI_EVENT_PAUSE_VCPU, 0, 51));
  ASSERT_TRUE(WaitUntil([&] { return guest->Snapshot().paused_vcpus.count(0) == 1; }));
  guest->ReleaseOwner("client:1");
  EXPECT_TRUE(WaitEventReply(host, 51, KVMI_EVENT_PAUSE_VCPU));
  EXPECT_TRUE(guest->Snapshot().paused_vcpus.empty());
}

TEST_F(DaemonTest, AForgottenPauseEndsAtThePauseDeadline) {
  config_.verdicts.max_pause = std::chrono::milliseconds(150);
  StartDaemon();
  ScriptedHost* host = Connect(14, "forgotten", 1);
  auto guest = WaitHooked("forgotten");
  ASSERT_NE(guest, nullptr);
  guest->Pause("client:9", 0, [](const CommandResult&) {});
  ASSERT_TRUE(host->WaitForId(KVMI_PAUSE_VCPU));
  host->SendEvent(MakeTestEvent(KVMI_EVENT_PAUSE_VCPU, 0, 60));
  auto reply = WaitEventReply(host, 60, KVMI_EVENT_PAUSE_VCPU);
  ASSERT_TRUE(reply);
  EXPECT_EQ(reply->action, KVMI_EVENT_ACTION_CONTINUE);
}

TEST_F(DaemonTest, APauseEventNobodyAskedForIsAnsweredAtOnce) {
  StartDaemon();
  ScriptedHost* host = Connect(15, "stray", 1);
  ASSERT_NE(WaitHooked("stray"), nullptr);
  host->SendEvent(MakeTestEvent(KVMI_EVENT_PAUSE_VCPU, 0, 70));
  EXPECT_TRUE(WaitEventReply(host, 70, KVMI_EVENT_PAUSE_VCPU));
  EXPECT_EQ(daemon_->pipeline().stats().fallbacks.load(), 0u);
}

TEST_F(DaemonTest, HostileGuestsAreDroppedWhileTheOthersRunOn) {
  StartDaemon();
  ScriptedHost* good = Connect(20, "good", 1);
  ScriptedHost* oversized = Connect(21, "oversized", 1);
  ScriptedHost* truncated = Connect(22, "truncated", 1);
  ScriptedHost* wrong_seq = Connect(23, "wrong-seq", 1);
  ScriptedHost* garbage = Connect(24, "garbage", 1);
  for (const char* name : {"good", "oversized", "truncated", "wrong-seq", "garbage"}) {
    ASSERT_NE(WaitHooked(name), nullptr) << name;
  }
  // A header announcing more than any kernel message can hold.
  kvmi_msg_hdr huge{KVMI_EVENT, 0xffff, 1};
  std::vector<uint8_t> bytes(sizeof(huge));
  std::memcpy(bytes.data(), &huge, sizeof(huge));
  oversized->SendRaw(bytes);
  // Half an event, then the connection ends.
  std::vector<uint8_t> half;
  kvmi::EncodeEvent(MakeTestEvent(KVMI_EVENT_CR, 0, 1), &half);
  half.resize(half.size() / 2);
  truncated->SendRaw(half);
  truncated->Close();
  // A reply to a command that was never sent.
  std::vector<uint8_t> reply;
  kvmi::EncodeReply(KVMI_GET_VERSION, 0x7fffffff, 0, {}, &reply);
  wrong_seq->SendRaw(reply);
  // Random bytes that happen to look like an event of an unknown type.
  kvmi::Event bogus = MakeTestEvent(KVMI_EVENT_CR, 0, 1);
  std::vector<uint8_t> wire;
  kvmi::EncodeEvent(bogus, &wire);
  wire[kvmi::kHdrSize + offsetof(kvmi_event, event)] = 200;
  garbage->SendRaw(wire);

  for (ScriptedHost* hostile : {oversized, wrong_seq, garbage}) EXPECT_TRUE(hostile->WaitClosed());
  for (const char* name : {"oversized", "truncated", "wrong-seq", "garbage"}) {
    EXPECT_TRUE(WaitUntil([&] {
      return daemon_->registry().Lookup(name)->state() == GuestState::kGone;
    })) << name;
  }
  // The good guest never noticed.
  EXPECT_EQ(daemon_->registry().Lookup("good")->state(), GuestState::kHooked);
  good->SendEvent(MakeTestEvent(KVMI_EVENT_HYPERCALL, 0, 5));
  EXPECT_TRUE(WaitEventReply(good, 5, KVMI_EVENT_HYPERCALL));
}

TEST_F(DaemonTest, AGuestThatDisconnectsMidCommandFailsItCleanly) {
  StartDaemon();
  ScriptedHost* host = nullptr;
  auto defaults = std::make_shared<ScriptedHost>();
  host = Connect(25, "leaving", 1, [defaults](const ReceivedMessage& m) {
    if (m.hdr.id == KVMI_READ_PHYSICAL) return std::optional<std::vector<uint8_t>>();  // hangs
    return std::optional<std::vector<uint8_t>>(defaults->DefaultReply(m));
  });
  auto guest = WaitHooked("leaving");
  ASSERT_NE(guest, nullptr);
  std::promise<CommandResult> read;
  guest->session()->ReadPhysical(0x1000, 64, [&](const CommandResult& r) { read.set_value(r); });
  ASSERT_TRUE(host->WaitForId(KVMI_READ_PHYSICAL));
  host->Close();  // QEMU died with the command in flight
  auto future = read.get_future();
  ASSERT_EQ(future.wait_for(std::chrono::seconds(5)), std::future_status::ready);
  CommandResult r = future.get();
  EXPECT_EQ(r.status, CommandResult::Status::kClosed);
  EXPECT_THAT(r.ToString(), ::testing::HasSubstr("closed"));
}

// ---- Policy limits and memory --------------------------------------------------------------

TEST_F(DaemonTest, ApiPoliciesAreBoundedInSizeAndCountEvenWhenAppliedConcurrently) {
  StartDaemon();
  security::Limits limits;
  limits.max_policies = 5;
  daemon_->set_limits(limits);

  auto named = [](const std::string& name) {
    return ForbidClearCr0WpRule(name, RuleMode::kEnforce);
  };
  auto too_long = named(std::string(limits.max_policy_name_bytes + 1, 'n'));
  absl::Status s = daemon_->ApplyApiPolicy(too_long, PolicyPrecondition{}).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(std::string(s.message()), ::testing::HasSubstr("limits.max_policy_name_bytes"));
  auto wordy = named("wordy");
  wordy->description.assign(limits.max_policy_description_bytes + 1, 'd');
  s = daemon_->ApplyApiPolicy(wordy, PolicyPrecondition{}).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(std::string(s.message()),
              ::testing::HasSubstr("limits.max_policy_description_bytes"));
  auto big = named("big");
  big->origin.assign(limits.max_policy_bytes + 1, 'o');
  s = daemon_->ApplyApiPolicy(big, PolicyPrecondition{}).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(std::string(s.message()), ::testing::HasSubstr("limits.max_policy_bytes"));

  // 8 threads race 80 new names into room for 5: exactly 5 go in.
  std::atomic<int> applied{0}, refused{0}, other{0};
  std::vector<std::thread> threads;
  threads.reserve(8);
  for (int t = 0; t < 8; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < 10; ++i) {
        absl::Status r =
            daemon_->ApplyApiPolicy(named("p" + std::to_string(t * 10 + i)), PolicyPrecondition{})
                .status();
        if (r.ok()) {
          applied++;
        } else if (r.code() == absl::StatusCode::kResourceExhausted &&
                   r.message().find("limits.max_policies") != absl::string_view::npos) {
          refused++;
        } else {
          other++;
        }
      }
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(applied.load(), 5);
  EXPECT_EQ(refused.load(), 75);
  EXPECT_EQ(other.load(), 0);
  EXPECT_EQ(daemon_->policies().size(), 5u);
  EXPECT_EQ(daemon_->api_policies().size(), 5u);

  // A replacement adds none; a deletion makes room.
  const std::string kept = daemon_->api_policies()[0]->name;
  PolicyPrecondition replace;
  replace.allow_replace = true;
  EXPECT_TRUE(daemon_->ApplyApiPolicy(named(kept), replace).ok());
  EXPECT_EQ(daemon_->ApplyApiPolicy(named("one-more"), PolicyPrecondition{}).status().code(),
            absl::StatusCode::kResourceExhausted);
  ASSERT_TRUE(daemon_->RemoveApiPolicy(kept, PolicyPrecondition{}).ok());
  EXPECT_TRUE(daemon_->ApplyApiPolicy(named("one-more"), PolicyPrecondition{}).ok());
  EXPECT_EQ(daemon_->policies().size(), 5u);
}

// (The tsan config hides __SANITIZE_THREAD__ from the headers and defines KVMID_TSAN instead.)
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__) || \
    (defined(KVMID_TSAN) && KVMID_TSAN)
#define KVMID_SANITIZED_MALLOC 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer) || \
    __has_feature(memory_sanitizer)
#define KVMID_SANITIZED_MALLOC 1
#endif
#endif

size_t ResidentBytes() {
  std::ifstream statm("/proc/self/statm");
  size_t pages = 0, resident = 0;
  statm >> pages >> resident;
  return resident * static_cast<size_t>(::sysconf(_SC_PAGESIZE));
}

TEST_F(DaemonTest, BigPoliciesGiveTheirMemoryBackWhenDeleted) {
  StartDaemon();
  security::Limits limits;
  limits.max_policy_bytes = 1u << 20;
  limits.max_policy_description_bytes = 1u << 20;
  limits.list_policies_max_bytes = 2u << 20;
  ASSERT_TRUE(security::ValidateLimits(limits).ok());
  daemon_->set_limits(limits);
  constexpr size_t kMiB = 1u << 20;
  constexpr int kPolicies = 100;

  MemoryTrimmer::TrimNow();
  const size_t heap_before = mallinfo2().uordblks;
  const size_t rss_before = ResidentBytes();
  for (int i = 0; i < kPolicies; ++i) {
    auto rule = ForbidClearCr0WpRule("big-" + std::to_string(i), RuleMode::kMonitor);
    rule->description.assign(kMiB - 4096, 'd');
    rule->origin.assign(kMiB - 1024, 'o');  // stands for the serialized policy
    ASSERT_TRUE(daemon_->ApplyApiPolicy(std::move(rule), PolicyPrecondition{}).ok()) << i;
  }
  const size_t rss_peak = ResidentBytes();
  for (int i = 0; i < kPolicies; ++i) {
    ASSERT_TRUE(daemon_->RemoveApiPolicy("big-" + std::to_string(i), PolicyPrecondition{}).ok())
        << i;
  }
  EXPECT_EQ(daemon_->policies().size(), 0u);
  // The trimmer runs by itself after big frees (its own thread, rate-limited).
  EXPECT_TRUE(WaitUntil([&] { return daemon_->memory_trimmer().trims() >= 1; }));
#ifndef KVMID_SANITIZED_MALLOC
  // Nothing kept: the heap in use is back near where it was, and after a trim so is RSS (the
  // bounds are generous: ~200 MiB came and went).
  MemoryTrimmer::TrimNow();
  EXPECT_GT(rss_peak, rss_before + 150 * kMiB);
  EXPECT_LT(mallinfo2().uordblks, heap_before + 16 * kMiB);
  EXPECT_LT(ResidentBytes(), rss_before + 64 * kMiB);
#else
  (void)heap_before;
  (void)rss_before;
  (void)rss_peak;
#endif
}

}  // namespace
}  // namespace kvmid
