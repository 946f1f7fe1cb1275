// The Attach stream through a real server: claims, remote verdicts, inline commands owned by the
// stream, half-close and cancellation.
#include "daemon/api/attach.h"

#include <set>
#include <string>
#include <vector>

#include "daemon/api/api_test_fixture.h"
#include "daemon/api/limits.h"

namespace kvmid {
namespace {

using ::testing::HasSubstr;
using AttachStream = grpc::ClientReaderWriter<kvmi::v1::AttachRequest, kvmi::v1::AttachResponse>;

// Sends `claim` as the stream's first message; kvmid must answer Claimed.
void ClaimOn(AttachStream* stream, const kvmi::v1::Claim& claim) {
  kvmi::v1::AttachRequest request;
  *request.mutable_claim() = claim;
  ASSERT_TRUE(stream->Write(request));
  kvmi::v1::AttachResponse response;
  ASSERT_TRUE(stream->Read(&response));
  ASSERT_TRUE(response.has_claimed()) << response.DebugString();
}

TEST_F(ApiTest, AttachedHandlerAnswersEventsAndItsArmingGoesWithTheStream) {
  ScriptedHost* host = Connect(9, "attached");
  grpc::ClientContext ctx;
  // Attach streams carry a deadline: a hang becomes a failure, not a test timeout.
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
  auto stream = stub_->Attach(&ctx);
  kvmi::v1::AttachRequest claim;
  claim.mutable_claim()->set_handler_id("debugger");
  claim.mutable_claim()->add_events(kvmi::v1::EVENT_TYPE_BREAKPOINT);
  claim.mutable_claim()->add_arm_events(kvmi::v1::EVENT_TYPE_BREAKPOINT);
  claim.mutable_claim()->set_deadline_ms(5000);
  ASSERT_TRUE(stream->Write(claim));
  kvmi::v1::AttachResponse response;
  ASSERT_TRUE(stream->Read(&response));
  ASSERT_TRUE(response.has_claimed());
  EXPECT_THAT(response.claimed().owner(), HasSubstr("client:debugger#"));
  auto armed = [](bool enable) {
    return [enable](const ReceivedMessage& m) {
      kvmi::ControlEventsRequest r;
      return m.hdr.id == KVMI_CONTROL_EVENTS &&
             kvmi::DecodePayload(kvmi::ByteView(m.payload), &r).ok() &&
             r.event_id == KVMI_EVENT_BREAKPOINT && r.enable == enable;
    };
  };
  EXPECT_TRUE(host->WaitFor(armed(true)));

  kvmi::Event bp = MakeTestEvent(KVMI_EVENT_BREAKPOINT, 0, 3);
  bp.common.arch.regs.rip = 0x401000;
  bp.specific.breakpoint.gpa = 0x401000;
  bp.specific.breakpoint.insn_len = 1;
  host->SendEvent(bp);
  ASSERT_TRUE(stream->Read(&response));
  ASSERT_TRUE(response.has_event());
  EXPECT_EQ(response.event().type(), kvmi::v1::EVENT_TYPE_BREAKPOINT);
  EXPECT_EQ(response.event().breakpoint().gpa(), 0x401000u);
  EXPECT_EQ(response.event().registers().rip(), 0x401000u);
  uint64_t id = response.event().id();

  // Nothing invalid reaches the guest: KEEP_OLD is not a breakpoint action.
  kvmi::v1::AttachRequest wrong;
  wrong.mutable_verdict()->set_event_id(id);
  wrong.mutable_verdict()->set_action(kvmi::v1::ACTION_KEEP_OLD);
  ASSERT_TRUE(stream->Write(wrong));
  ASSERT_TRUE(stream->Read(&response));
  ASSERT_TRUE(response.has_error());
  EXPECT_THAT(response.error().message(), HasSubstr("KEEP_OLD"));

  // Skip the INT3 (RIP + 1) and retry: SET_REGISTERS and the reply go out together.
  kvmi::v1::AttachRequest verdict;
  verdict.mutable_verdict()->set_event_id(id);
  verdict.mutable_verdict()->set_action(kvmi::v1::ACTION_RETRY);
  verdict.mutable_verdict()->mutable_set_registers()->set_rip(0x401001);
  ASSERT_TRUE(stream->Write(verdict));
  auto set = host->WaitForId(KVMI_SET_REGISTERS);
  ASSERT_TRUE(set);
  kvmi::SetRegistersRequest regs;
  ASSERT_TRUE(kvmi::DecodePayload(kvmi::ByteView(set->payload), &regs).ok());
  EXPECT_EQ(regs.regs.rip, 0x401001u);
  auto reply = host->WaitFor(
      [](const ReceivedMessage& m) { return m.hdr.id == KVMI_EVENT_REPLY && m.hdr.seq == 3; });
  ASSERT_TRUE(reply);
  kvmi::EventReply decoded;
  ASSERT_TRUE(
      kvmi::DecodeEventReply(kvmi::ByteView(reply->payload), KVMI_EVENT_BREAKPOINT, &decoded).ok());
  EXPECT_EQ(decoded.action, KVMI_EVENT_ACTION_RETRY);

  // The client dies holding an event: the guest is answered at once (not after 5 s), and the
  // breakpoint interception it armed is disarmed.
  host->SendEvent(MakeTestEvent(KVMI_EVENT_BREAKPOINT, 1, 4));
  ASSERT_TRUE(stream->Read(&response));
  ASSERT_TRUE(response.has_event());
  auto died = Clock::now();
  ctx.TryCancel();
  EXPECT_TRUE(host->WaitFor(
      [](const ReceivedMessage& m) { return m.hdr.id == KVMI_EVENT_REPLY && m.hdr.seq == 4; }));
  EXPECT_LT(Clock::now() - died, std::chrono::seconds(3));
  EXPECT_TRUE(host->WaitFor(armed(false)));
  EXPECT_GE(daemon_->pipeline().stats().fallback_handler_gone.load(), 1u);
}

TEST_F(ApiTest, AttachRejectsABadClaim) {
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
  auto stream = stub_->Attach(&ctx);
  kvmi::v1::AttachRequest claim;
  claim.mutable_claim()->set_handler_id("x");
  claim.mutable_claim()->add_events(kvmi::v1::EVENT_TYPE_UNHOOK);  // never answered: not claimable
  ASSERT_TRUE(stream->Write(claim));
  kvmi::v1::AttachResponse response;
  EXPECT_FALSE(stream->Read(&response));
  grpc::Status s = stream->Finish();
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(s.error_message(), HasSubstr("claim.events[0]"));
}

// Claim.max_batch: events reach the handler alone or in batches of at most max_batch, each
// exactly once, and one VerdictBatch answers them all (each vCPU gets its own verdict).
TEST_F(ApiTest, AttachBatchesWaitingEventsAndTakesVerdictsInBatches) {
  ScriptedHost* host = Connect(23, "batched");
  constexpr uint16_t kVcpus = 16;
  host->set_vcpus(kVcpus);
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
  auto stream = stub_->Attach(&ctx);
  kvmi::v1::AttachRequest claim;
  claim.mutable_claim()->set_handler_id("batcher");
  claim.mutable_claim()->add_events(kvmi::v1::EVENT_TYPE_BREAKPOINT);
  claim.mutable_claim()->set_deadline_ms(5000);
  claim.mutable_claim()->set_max_batch(4);
  ASSERT_TRUE(stream->Write(claim));
  kvmi::v1::AttachResponse response;
  ASSERT_TRUE(stream->Read(&response));
  ASSERT_TRUE(response.has_claimed());
  // All sixteen in one write: kvmid's loop reads them in one wake-up, and they go out batched.
  std::vector<uint8_t> wire;
  for (uint16_t vcpu = 0; vcpu < kVcpus; ++vcpu) {
    kvmi::EncodeEvent(MakeTestEvent(KVMI_EVENT_BREAKPOINT, vcpu, 100 + vcpu), &wire);
  }
  host->SendRaw(wire);
  std::set<uint64_t> ids;
  std::set<uint32_t> vcpus;
  int batches = 0;
  while (ids.size() < kVcpus) {
    ASSERT_TRUE(stream->Read(&response));
    std::vector<kvmi::v1::Event> events;
    if (response.has_event()) events.push_back(response.event());
    for (const kvmi::v1::Event& e : response.events().events()) events.push_back(e);
    ASSERT_FALSE(events.empty()) << response.DebugString();
    EXPECT_LE(events.size(), 4u);
    if (response.has_events()) {
      ++batches;
      EXPECT_GE(events.size(), 2u) << "a batch of one is an `event`";
    }
    for (const kvmi::v1::Event& e : events) {
      EXPECT_TRUE(ids.insert(e.id()).second) << "event " << e.id() << " sent twice";
      vcpus.insert(e.vcpu());
    }
  }
  EXPECT_EQ(vcpus.size(), size_t{kVcpus});
  EXPECT_GE(batches, 1) << "sixteen events read at once, none batched";
  kvmi::v1::AttachRequest answers;
  for (uint64_t id : ids) {
    kvmi::v1::Verdict* verdict = answers.mutable_verdicts()->add_verdicts();
    verdict->set_event_id(id);
    verdict->set_action(kvmi::v1::ACTION_CONTINUE);
  }
  ASSERT_TRUE(stream->Write(answers));
  for (uint16_t vcpu = 0; vcpu < kVcpus; ++vcpu) {
    const uint32_t seq = 100 + vcpu;
    auto reply = host->WaitFor([seq](const ReceivedMessage& m) {
      return m.hdr.id == KVMI_EVENT_REPLY && m.hdr.seq == seq;
    });
    ASSERT_TRUE(reply) << "vCPU " << vcpu;
    kvmi::EventReply decoded;
    ASSERT_TRUE(
        kvmi::DecodeEventReply(kvmi::ByteView(reply->payload), KVMI_EVENT_BREAKPOINT, &decoded)
            .ok());
    EXPECT_EQ(decoded.action, KVMI_EVENT_ACTION_CONTINUE);
  }
  EXPECT_EQ(daemon_->pipeline().stats().fallbacks.load(), 0u);
  ctx.TryCancel();
}

// A request with none of the fields this kvmid knows (a newer client's) ends the stream with a
// clear error instead of being dropped unseen.
TEST_F(ApiTest, AttachEndsAStreamSendingARequestItDoesNotKnow) {
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
  auto stream = stub_->Attach(&ctx);
  kvmi::v1::Claim claim;
  claim.set_handler_id("newer");
  ASSERT_NO_FATAL_FAILURE(ClaimOn(stream.get(), claim));
  ASSERT_TRUE(stream->Write(kvmi::v1::AttachRequest()));  // no field set
  kvmi::v1::AttachResponse response;
  EXPECT_FALSE(stream->Read(&response));
  grpc::Status s = stream->Finish();
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(s.error_message(), HasSubstr("message"));
}

TEST_F(ApiTest, AttachRefusesBatchesAboveTheirLimitsNamingTheField) {
  {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
    auto stream = stub_->Attach(&ctx);
    kvmi::v1::AttachRequest claim;
    claim.mutable_claim()->set_handler_id("greedy");
    claim.mutable_claim()->set_max_batch(api::kMaxEventBatch + 1);
    ASSERT_TRUE(stream->Write(claim));
    kvmi::v1::AttachResponse response;
    EXPECT_FALSE(stream->Read(&response));
    grpc::Status s = stream->Finish();
    EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
    EXPECT_THAT(s.error_message(), HasSubstr("claim.max_batch"));
  }
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
  auto stream = stub_->Attach(&ctx);
  kvmi::v1::Claim claim;
  claim.set_handler_id("flood");
  ASSERT_NO_FATAL_FAILURE(ClaimOn(stream.get(), claim));
  kvmi::v1::AttachRequest answers;
  for (int i = 0; i <= api::kMaxVerdictBatch; ++i) {
    kvmi::v1::Verdict* verdict = answers.mutable_verdicts()->add_verdicts();
    verdict->set_event_id(1000 + i);
    verdict->set_action(kvmi::v1::ACTION_CONTINUE);
  }
  ASSERT_TRUE(stream->Write(answers));
  kvmi::v1::AttachResponse response;
  EXPECT_FALSE(stream->Read(&response));
  grpc::Status s = stream->Finish();
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(s.error_message(), HasSubstr("verdicts.verdicts"));
}

TEST_F(ApiTest, AttachCarriesInlineCommandsOwnedByTheStream) {
  ScriptedHost* host = Connect(16, "inline");
  host->set_responder(RichResponder());
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
  auto stream = stub_->Attach(&ctx);
  kvmi::v1::AttachRequest claim;
  claim.mutable_claim()->set_handler_id("inline");
  claim.mutable_claim()->add_events(kvmi::v1::EVENT_TYPE_PF);
  ASSERT_TRUE(stream->Write(claim));
  kvmi::v1::AttachResponse response;
  ASSERT_TRUE(stream->Read(&response));
  ASSERT_TRUE(response.has_claimed());

  kvmi::v1::AttachRequest regs;
  regs.mutable_command()->set_id(100);
  regs.mutable_command()->mutable_get_registers()->set_vm("inline");
  regs.mutable_command()->mutable_get_registers()->set_vcpu(1);
  ASSERT_TRUE(stream->Write(regs));
  kvmi::v1::AttachRequest pages;
  pages.mutable_command()->set_id(101);
  auto* set = pages.mutable_command()->mutable_set_page_access();
  set->set_vm("inline");
  auto* page = set->add_pages();
  page->set_gpa(0x7000);
  page->set_access("r");
  ASSERT_TRUE(stream->Write(pages));
  kvmi::v1::AttachRequest bad;
  bad.mutable_command()->set_id(102);
  bad.mutable_command()->mutable_read_physical()->set_vm("nobody");
  bad.mutable_command()->mutable_read_physical()->set_size(1);
  ASSERT_TRUE(stream->Write(bad));
  kvmi::v1::AttachRequest empty;
  empty.mutable_command()->set_id(103);
  ASSERT_TRUE(stream->Write(empty));

  // Results come in the order sent, each with its id.
  ASSERT_TRUE(stream->Read(&response));
  ASSERT_TRUE(response.has_command_result());
  EXPECT_EQ(response.command_result().id(), 100u);
  EXPECT_EQ(response.command_result().code(), 0);
  EXPECT_EQ(response.command_result().get_registers().registers().cr3(), 0x2000u);
  ASSERT_TRUE(stream->Read(&response));
  EXPECT_EQ(response.command_result().id(), 101u);
  EXPECT_EQ(response.command_result().code(), 0);
  ASSERT_TRUE(stream->Read(&response));
  EXPECT_EQ(response.command_result().id(), 102u);
  EXPECT_EQ(response.command_result().code(), static_cast<int>(grpc::StatusCode::NOT_FOUND));
  EXPECT_THAT(response.command_result().message(), HasSubstr("nobody"));
  ASSERT_TRUE(stream->Read(&response));
  EXPECT_EQ(response.command_result().id(), 103u);
  EXPECT_EQ(response.command_result().code(), static_cast<int>(grpc::StatusCode::INVALID_ARGUMENT));

  auto restricted = host->WaitFor([](const ReceivedMessage& m) {
    kvmi::SetPageAccessRequest r;
    return m.hdr.id == KVMI_SET_PAGE_ACCESS &&
           kvmi::DecodePayload(kvmi::ByteView(m.payload), &r).ok() && r.entries.size() == 1 &&
           r.entries[0].gpa == 0x7000 && r.entries[0].access == KVMI_PAGE_ACCESS_R;
  });
  EXPECT_TRUE(restricted);
  // The page restriction belongs to the stream: it ends, the page is restored.
  ctx.TryCancel();
  EXPECT_TRUE(host->WaitFor([](const ReceivedMessage& m) {
    kvmi::SetPageAccessRequest r;
    return m.hdr.id == KVMI_SET_PAGE_ACCESS &&
           kvmi::DecodePayload(kvmi::ByteView(m.payload), &r).ok() && r.entries.size() == 1 &&
           r.entries[0].gpa == 0x7000 && r.entries[0].access == KVMI_PAGE_ACCESS_RWX;
  }));
}

// The deferral of the read after a handler's last verdict, set for one test and back to its
// default (1 ms) when the test ends, also when an ASSERT ended it early.
class ScopedReadDeferral {
 public:
  explicit ScopedReadDeferral(std::chrono::microseconds deferral) {
    api::SetAttachReadDeferralForTesting(deferral);
  }
  ~ScopedReadDeferral() { api::SetAttachReadDeferralForTesting(std::chrono::milliseconds(1)); }
  ScopedReadDeferral(const ScopedReadDeferral&) = delete;
  ScopedReadDeferral& operator=(const ScopedReadDeferral&) = delete;
};

// Whether kvmid's reply to the event of `seq` reaches the guest (WaitFor's time bound).
bool ReplyReaches(ScriptedHost* host, uint32_t seq) {
  return host
      ->WaitFor([seq](const ReceivedMessage& m) {
        return m.hdr.id == KVMI_EVENT_REPLY && m.hdr.seq == seq;
      })
      .has_value();
}

// The time a GetRegisters command on `vm` takes to be answered on an Attach stream: long only if
// its read waited for the deferral's alarm.
Clock::duration TimedCommand(AttachStream* stream, uint64_t id, const std::string& vm) {
  kvmi::v1::AttachRequest regs;
  regs.mutable_command()->set_id(id);
  regs.mutable_command()->mutable_get_registers()->set_vm(vm);
  const auto sent = Clock::now();
  EXPECT_TRUE(stream->Write(regs));
  kvmi::v1::AttachResponse response;
  EXPECT_TRUE(stream->Read(&response));
  EXPECT_TRUE(response.has_command_result()) << response.DebugString();
  EXPECT_EQ(response.command_result().id(), id);
  EXPECT_EQ(response.command_result().code(), 0);
  return Clock::now() - sent;
}

// After the handler's last held event is answered kvmid starts its next read with its next write
// (design 8 in docs/PERFORMANCE.md), or when the deferral's alarm fires (here 1.5 s instead of
// 1 ms, to tell the two apart): a verdict for an event written meanwhile is read with that
// write, at once; a command sent while kvmid writes nothing is read when the alarm fires, and so
// is a half-close.
TEST_F(ApiTest, TheReadAfterAHandlersLastVerdictStartsWithTheNextWriteOrItsAlarm) {
  constexpr auto kDeferral = std::chrono::milliseconds(1500);
  ScopedReadDeferral deferral(kDeferral);
  ScriptedHost* host = Connect(19, "lastverdict");
  host->set_responder(RichResponder());
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
  auto stream = stub_->Attach(&ctx);
  kvmi::v1::Claim claim;
  claim.set_handler_id("last");
  claim.add_events(kvmi::v1::EVENT_TYPE_BREAKPOINT);
  claim.set_deadline_ms(5000);
  ClaimOn(stream.get(), claim);
  // The time from the verdict's write to its reply reaching the guest.
  auto answer_one = [&](uint16_t vcpu, uint32_t seq) -> Clock::duration {
    host->SendEvent(MakeTestEvent(KVMI_EVENT_BREAKPOINT, vcpu, seq));
    kvmi::v1::AttachResponse response;
    EXPECT_TRUE(stream->Read(&response));
    EXPECT_TRUE(response.has_event());
    kvmi::v1::AttachRequest verdict;
    verdict.mutable_verdict()->set_event_id(response.event().id());
    verdict.mutable_verdict()->set_action(kvmi::v1::ACTION_CONTINUE);
    auto sent = Clock::now();
    EXPECT_TRUE(stream->Write(verdict));
    EXPECT_TRUE(ReplyReaches(host, seq));
    return Clock::now() - sent;
  };
  answer_one(0, 5);  // the read after it waits
  // The next event's write starts it: this verdict is read at once, not after the alarm.
  EXPECT_LT(answer_one(1, 6), kDeferral / 2);
  EXPECT_GE(TimedCommand(stream.get(), 7, "lastverdict"), kDeferral / 2);  // read by the alarm

  answer_one(2, 8);
  ASSERT_TRUE(stream->WritesDone());
  kvmi::v1::AttachResponse response;
  EXPECT_FALSE(stream->Read(&response));
  EXPECT_TRUE(stream->Finish().ok());
  EXPECT_EQ(daemon_->pipeline().stats().fallback_deadline.load(), 0u);
}

TEST_F(ApiTest, AVerdictBatchThatLeavesTheHandlerHoldingNothingDefersTheNextReadToo) {
  constexpr auto kDeferral = std::chrono::milliseconds(1500);
  ScopedReadDeferral deferral(kDeferral);
  ScriptedHost* host = Connect(20, "lastbatch");
  host->set_responder(RichResponder());
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
  auto stream = stub_->Attach(&ctx);
  kvmi::v1::Claim claim;
  claim.set_handler_id("lastbatch");
  claim.add_events(kvmi::v1::EVENT_TYPE_BREAKPOINT);
  claim.set_deadline_ms(5000);
  claim.set_max_batch(8);
  ClaimOn(stream.get(), claim);
  // Events of vCPUs 0..n-1 (seq first_seq + vCPU), read however kvmid batched them.
  auto read_events = [&](uint32_t first_seq, uint16_t n) {
    for (uint16_t vcpu = 0; vcpu < n; ++vcpu) {
      host->SendEvent(MakeTestEvent(KVMI_EVENT_BREAKPOINT, vcpu, first_seq + vcpu));
    }
    std::vector<uint64_t> ids;
    kvmi::v1::AttachResponse response;
    while (ids.size() < n && stream->Read(&response)) {
      if (response.has_event()) ids.push_back(response.event().id());
      for (const kvmi::v1::Event& event : response.events().events()) ids.push_back(event.id());
    }
    EXPECT_EQ(ids.size(), n);
    return ids;
  };
  auto verdicts = [](const std::vector<uint64_t>& ids) {
    kvmi::v1::AttachRequest request;
    for (uint64_t id : ids) {
      kvmi::v1::Verdict* verdict = request.mutable_verdicts()->add_verdicts();
      verdict->set_event_id(id);
      verdict->set_action(kvmi::v1::ACTION_CONTINUE);
    }
    return request;
  };
  std::vector<uint64_t> ids = read_events(10, 2);
  ASSERT_EQ(ids.size(), 2u);
  // A batch that leaves an event held: the next read starts at once.
  ASSERT_TRUE(stream->Write(verdicts({ids[0]})));
  EXPECT_LT(TimedCommand(stream.get(), 1, "lastbatch"), kDeferral / 2);
  // The batch that answers the last held event: the next read waits for a write or the alarm.
  ASSERT_TRUE(stream->Write(verdicts({ids[1]})));
  EXPECT_TRUE(ReplyReaches(host, 10));
  EXPECT_TRUE(ReplyReaches(host, 11));
  EXPECT_GE(TimedCommand(stream.get(), 2, "lastbatch"), kDeferral / 2);

  // Both events answered in one batch (the guests' loops write the replies, HandOff): the same.
  ids = read_events(20, 2);
  ASSERT_EQ(ids.size(), 2u);
  ASSERT_TRUE(stream->Write(verdicts(ids)));
  EXPECT_TRUE(ReplyReaches(host, 20));
  EXPECT_TRUE(ReplyReaches(host, 21));
  EXPECT_GE(TimedCommand(stream.get(), 3, "lastbatch"), kDeferral / 2);
  // And the next event's write starts that read, so the next event's verdict is read at once.
  ids = read_events(30, 2);
  ASSERT_EQ(ids.size(), 2u);
  ASSERT_TRUE(stream->Write(verdicts(ids)));
  EXPECT_TRUE(ReplyReaches(host, 30));
  EXPECT_TRUE(ReplyReaches(host, 31));
  ids = read_events(40, 1);
  ASSERT_EQ(ids.size(), 1u);
  auto sent = Clock::now();
  ASSERT_TRUE(stream->Write(verdicts(ids)));
  EXPECT_TRUE(ReplyReaches(host, 40));
  EXPECT_LT(Clock::now() - sent, kDeferral / 2);

  ASSERT_TRUE(stream->WritesDone());
  kvmi::v1::AttachResponse response;
  EXPECT_FALSE(stream->Read(&response));
  EXPECT_TRUE(stream->Finish().ok());
  EXPECT_EQ(daemon_->pipeline().stats().fallback_deadline.load(), 0u);
}

TEST_F(ApiTest, AHalfClosedAttachStreamGetsItsCommandResultsThenOk) {
  ScriptedHost* host = Connect(17, "halfclosed");
  host->set_responder(RichResponder());
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
  auto stream = stub_->Attach(&ctx);
  kvmi::v1::AttachRequest claim;
  claim.mutable_claim()->set_handler_id("drain");
  ASSERT_TRUE(stream->Write(claim));
  for (uint64_t id = 1; id <= 3; ++id) {
    kvmi::v1::AttachRequest regs;
    regs.mutable_command()->set_id(id);
    regs.mutable_command()->mutable_get_registers()->set_vm("halfclosed");
    ASSERT_TRUE(stream->Write(regs));
  }
  ASSERT_TRUE(stream->WritesDone());
  kvmi::v1::AttachResponse response;
  ASSERT_TRUE(stream->Read(&response));
  EXPECT_TRUE(response.has_claimed());
  for (uint64_t id = 1; id <= 3; ++id) {
    ASSERT_TRUE(stream->Read(&response));
    ASSERT_TRUE(response.has_command_result());
    EXPECT_EQ(response.command_result().id(), id);
    EXPECT_EQ(response.command_result().code(), 0);
  }
  EXPECT_FALSE(stream->Read(&response));
  EXPECT_TRUE(stream->Finish().ok());
}

TEST_F(ApiTest, APauseWhoseStreamEndsBeforeTheVcpuStopsDoesNotHoldIt) {
  ScriptedHost* host = Connect(18, "unpaused");
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
  auto stream = stub_->Attach(&ctx);
  kvmi::v1::AttachRequest claim;
  claim.mutable_claim()->set_handler_id("pauser");
  ASSERT_TRUE(stream->Write(claim));
  kvmi::v1::AttachResponse response;
  ASSERT_TRUE(stream->Read(&response));
  kvmi::v1::AttachRequest pause;
  pause.mutable_command()->set_id(1);
  pause.mutable_command()->mutable_pause_vcpu()->set_vm("unpaused");
  pause.mutable_command()->mutable_pause_vcpu()->set_vcpu(1);
  ASSERT_TRUE(stream->Write(pause));
  ASSERT_TRUE(host->WaitForId(KVMI_PAUSE_VCPU));
  // The client goes away while the vCPU is still on its way to stop.
  ctx.TryCancel();
  EXPECT_TRUE(WaitUntil([&] {
    auto guest = daemon_->registry().Lookup("unpaused");
    for (const auto& [owner, unused] : guest->Snapshot().leases) {
      if (owner.rfind("client:pauser", 0) == 0) return false;
    }
    return true;
  }));
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  // Its PAUSE_VCPU event arrives now: nobody holds it, the vCPU is let go at once.
  host->SendEvent(MakeTestEvent(KVMI_EVENT_PAUSE_VCPU, 1, 91));
  EXPECT_TRUE(host->WaitFor(
      [](const ReceivedMessage& m) { return m.hdr.id == KVMI_EVENT_REPLY && m.hdr.seq == 91; },
      std::chrono::milliseconds(2000)));
  EXPECT_TRUE(daemon_->registry().Lookup("unpaused")->Snapshot().paused_vcpus.empty());
}

TEST_F(ApiTest, AttachRefusesContextAboveTheLimitNamingTheField) {
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
  auto stream = stub_->Attach(&ctx);
  kvmi::v1::AttachRequest claim;
  claim.mutable_claim()->set_handler_id("greedy");
  claim.mutable_claim()->mutable_context()->set_rip_bytes(16);
  claim.mutable_claim()->mutable_context()->set_pf_bytes(4096);
  ASSERT_TRUE(stream->Write(claim));
  kvmi::v1::AttachResponse response;
  EXPECT_FALSE(stream->Read(&response));
  grpc::Status s = stream->Finish();
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(s.error_message(), HasSubstr("claim.context.pf_bytes"));
  EXPECT_THAT(s.error_message(), HasSubstr("above the limit of 256"));
  EXPECT_TRUE(daemon_->pipeline().context_demand(KVMI_EVENT_PF).empty());  // nothing registered
}

TEST_F(ApiTest, AttachRefusesADeadlineAboveTheLimit) {
  for (uint32_t deadline_ms : {5001u, 60000u, 4000000000u}) {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
    auto stream = stub_->Attach(&ctx);
    kvmi::v1::AttachRequest claim;
    claim.mutable_claim()->set_handler_id("slow");
    claim.mutable_claim()->set_deadline_ms(deadline_ms);
    ASSERT_TRUE(stream->Write(claim));
    kvmi::v1::AttachResponse response;
    EXPECT_FALSE(stream->Read(&response));
    grpc::Status s = stream->Finish();
    EXPECT_EQ(s.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << deadline_ms;
    EXPECT_THAT(s.error_message(), HasSubstr("max_attach_deadline_ms = 5000"));
    EXPECT_THAT(s.error_message(), HasSubstr("limits.max_attach_deadline_ms"));
  }
}

TEST_F(ApiTest, AttachHandlerAtItsHeldCapGetsNoMoreEventsAndTheGuestRunsOn) {
  security::Limits limits;
  limits.max_held_events_per_handler = 2;
  daemon_->set_limits(limits);
  ScriptedHost* host = Connect(21, "held");
  host->set_vcpus(4);
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
  auto stream = stub_->Attach(&ctx);
  kvmi::v1::AttachRequest claim;
  claim.mutable_claim()->set_handler_id("silent");
  claim.mutable_claim()->add_events(kvmi::v1::EVENT_TYPE_BREAKPOINT);
  claim.mutable_claim()->set_deadline_ms(5000);  // the maximum; never answered
  ASSERT_TRUE(stream->Write(claim));
  kvmi::v1::AttachResponse response;
  ASSERT_TRUE(stream->Read(&response));
  ASSERT_TRUE(response.has_claimed());
  for (uint16_t vcpu = 0; vcpu < 2; ++vcpu) {
    host->SendEvent(MakeTestEvent(KVMI_EVENT_BREAKPOINT, vcpu, 60 + vcpu));
    ASSERT_TRUE(stream->Read(&response));
    ASSERT_TRUE(response.has_event());
  }
  // The third is answered at once with the fallback, well before the 5 s deadline.
  const auto sent = Clock::now();
  host->SendEvent(MakeTestEvent(KVMI_EVENT_BREAKPOINT, 2, 62));
  auto reply = host->WaitFor(
      [](const ReceivedMessage& m) { return m.hdr.id == KVMI_EVENT_REPLY && m.hdr.seq == 62; });
  ASSERT_TRUE(reply);
  EXPECT_LT(Clock::now() - sent, std::chrono::seconds(3));
  EXPECT_EQ(daemon_->pipeline().stats().fallback_held_cap.load(), 1u);
  // The held two get their fallback at their deadline; the guest was never stopped for good.
  EXPECT_TRUE(host->WaitFor(
      [](const ReceivedMessage& m) { return m.hdr.id == KVMI_EVENT_REPLY && m.hdr.seq == 60; },
      std::chrono::seconds(10)));
  ctx.TryCancel();
}

// An Attach stream that ends while its inline command still waits for the guest joins that
// command on a thread of its own: as many such streams as the API has completion-queue threads
// hold up no other stream (before, each held one of those threads until the command's timeout).
TEST_F(ApiTest, AttachStreamsEndingWithACommandInProgressHoldUpNoOtherStream) {
  ScriptedHost* host = Connect(19, "slowcmd");
  ScriptedHost::Responder rich = RichResponder();
  host->set_responder([rich](const ReceivedMessage& m) -> std::optional<std::vector<uint8_t>> {
    if (m.hdr.id == KVMI_GET_CPUID) return std::nullopt;  // never answered: the command waits
    return rich(m);
  });
  for (int i = 0; i < api::kAsyncThreads; ++i) {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
    auto stream = stub_->Attach(&ctx);
    kvmi::v1::AttachRequest claim;
    claim.mutable_claim()->set_handler_id("slow-" + std::to_string(i));
    ASSERT_TRUE(stream->Write(claim));
    kvmi::v1::AttachResponse response;
    ASSERT_TRUE(stream->Read(&response));
    ASSERT_TRUE(response.has_claimed());
    kvmi::v1::AttachRequest cpuid;
    cpuid.mutable_command()->set_id(1);
    cpuid.mutable_command()->mutable_get_cpuid()->set_vm("slowcmd");
    ASSERT_TRUE(stream->Write(cpuid));
    ASSERT_TRUE(host->WaitForId(KVMI_GET_CPUID).has_value());
    // A second claim ends the stream (INVALID_ARGUMENT) with the command still at the guest.
    ASSERT_TRUE(stream->Write(claim));
    EXPECT_EQ(stream->Finish().error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  }
  // Another stream is served now, well within the commands' timeout (10 s).
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(3));
  auto stream = stub_->Attach(&ctx);
  kvmi::v1::AttachRequest claim;
  claim.mutable_claim()->set_handler_id("next");
  ASSERT_TRUE(stream->Write(claim));
  kvmi::v1::AttachResponse response;
  ASSERT_TRUE(stream->Read(&response)) << "the API's threads are held by the ended streams";
  EXPECT_TRUE(response.has_claimed());
  ctx.TryCancel();
  stream->Finish();
  host->Close();  // the waiting commands fail now: the ended streams' last release runs
}

}  // namespace
}  // namespace kvmid
