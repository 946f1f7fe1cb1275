#include "daemon/api/admission.h"

#include <gmock/gmock.h>
#include <google/protobuf/text_format.h>
#include <gtest/gtest.h>

#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "daemon/api/api_test_fixture.h"
#include "daemon/api/convert.h"
#include "daemon/metrics/hooks.h"
#include "daemon/testing/wait.h"

namespace kvmid {
namespace {

using api::Admission;
using api::AdmittedCall;
using api::CallTarget;
using security::AuditArgs;
using security::Caller;
using security::Rpc;
using ::testing::HasSubstr;
using ::testing::Not;

// Operator "op", responder "resp" and viewer "view" on web-1 only; admin everywhere.
constexpr const char* kAuthz = R"pb(
  bindings {
    principal: "spiffe://t/resp"
    role: "responder"
    guests { names: "web-1" }
  }
  bindings {
    principal: "spiffe://t/op"
    role: "operator"
    guests { names: "web-1" }
  }
  bindings {
    principal: "spiffe://t/view"
    role: "viewer"
    guests { names: "web-1" }
  }
  bindings { principal: "spiffe://t/admin" role: "admin" }
)pb";

std::vector<std::string> ReadLines(const std::string& path) {
  std::ifstream in(path);
  std::vector<std::string> lines;
  for (std::string line; std::getline(in, line);) lines.push_back(line);
  return lines;
}

uint64_t DeniedCount(const std::string& method) {
  for (const auto& [name, count] : Metrics::Read().authz_denied) {
    if (name == method) return count;
  }
  return 0;
}

class AdmissionTest : public ApiTest {
 protected:
  void SetUp() override {
    ApiTest::SetUp();
    ASSERT_NE(Connect(1, "web-1"), nullptr);
    ASSERT_NE(Connect(2, "db-1"), nullptr);
    config::Authz authz;
    ASSERT_TRUE(google::protobuf::TextFormat::ParseFromString(kAuthz, &authz));
    auto authorizer = security::Authorizer::FromConfig(authz);
    ASSERT_TRUE(authorizer.ok()) << authorizer.status();
    daemon_->authorizer().Set(*authorizer);
    audit_path_ = dir_ + "/audit.log";
    auto audit = security::AuditLog::Open(audit_path_);
    ASSERT_TRUE(audit.ok()) << audit.status();
    audit_ = *std::move(audit);
    admission_ = std::make_unique<Admission>(daemon_.get(), audit_.get());
  }
  void TearDown() override {
    admission_.reset();
    audit_.reset();
    ::unlink(audit_path_.c_str());
    ApiTest::TearDown();
  }

  grpc::Status Admit(const Caller& caller, Rpc rpc, const std::string* vm,
                     AdmittedCall* call = nullptr, AuditArgs args = AuditArgs()) {
    AdmittedCall local;
    CallTarget target;
    target.vm = vm;
    return admission_->Admit(
        caller, rpc, target, [&] { return args; }, call != nullptr ? call : &local);
  }

  const Caller op_ = Caller::Tls("spiffe://t/op", "ipv4:10.0.0.7:4000");
  const Caller viewer_ = Caller::Tls("spiffe://t/view", "ipv4:10.0.0.8:4000");
  const Caller admin_ = Caller::Tls("spiffe://t/admin", "ipv4:10.0.0.9:4000");
  const Caller resp_ = Caller::Tls("spiffe://t/resp", "ipv4:10.0.0.10:4000");
  const std::string web_ = "web-1";
  const std::string db_ = "db-1";
  std::string audit_path_;
  std::unique_ptr<security::AuditLog> audit_;
  std::unique_ptr<Admission> admission_;
};

TEST(CallerOfTest, MapsEachTransportIdentity) {
  security::CallerIdentity tls;
  tls.kind = security::CallerIdentity::Kind::kTls;
  tls.principal = "spiffe://t/op";
  tls.peer = "ipv4:10.0.0.7:4000";
  Caller c = api::CallerOf(tls);
  EXPECT_EQ(c.kind, Caller::Kind::kTls);
  EXPECT_EQ(c.principal, "spiffe://t/op");
  EXPECT_EQ(c.peer, "ipv4:10.0.0.7:4000");

  security::CallerIdentity unix_peer;
  unix_peer.kind = security::CallerIdentity::Kind::kUnix;
  unix_peer.principal = "uid:1000";
  unix_peer.unix = {1000, 100, 4242, "/run/kvmid/api.sock"};
  unix_peer.peer = security::UnixPeerName(unix_peer.unix);
  c = api::CallerOf(unix_peer);
  EXPECT_EQ(c.kind, Caller::Kind::kUnix);
  EXPECT_EQ(c.uid, 1000u);
  EXPECT_EQ(c.gid, 100u);
  EXPECT_EQ(c.pid, 4242);
  EXPECT_EQ(c.peer, "unix:/run/kvmid/api.sock pid=4242 uid=1000 gid=100");

  security::CallerIdentity anonymous;
  anonymous.peer = "ipv4:127.0.0.1:5000";
  c = api::CallerOf(anonymous);
  EXPECT_EQ(c.kind, Caller::Kind::kNone);
  EXPECT_EQ(c.peer, "ipv4:127.0.0.1:5000");
}

TEST_F(AdmissionTest, AnonymousIsUnauthenticatedAndAudited) {
  const uint64_t before = DeniedCount("kvmi.v1.Introspection/GetRegisters");
  grpc::Status s = Admit(Caller::None("ipv4:127.0.0.1:5000"), Rpc::kGetRegisters, &web_);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::UNAUTHENTICATED);
  EXPECT_EQ(DeniedCount("kvmi.v1.Introspection/GetRegisters"), before + 1);
  std::vector<std::string> lines = ReadLines(audit_path_);
  ASSERT_EQ(lines.size(), 1u);
  EXPECT_THAT(lines[0], HasSubstr("\"code\":\"UNAUTHENTICATED\""));
  EXPECT_THAT(lines[0], HasSubstr("\"rpc\":\"GetRegisters\""));
  EXPECT_THAT(lines[0], HasSubstr("ipv4:127.0.0.1:5000"));
}

TEST_F(AdmissionTest, DenialNamesRpcGuestAndRole) {
  grpc::Status s = Admit(op_, Rpc::kGetRegisters, &db_);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::PERMISSION_DENIED);
  EXPECT_THAT(s.error_message(), HasSubstr("GetRegisters"));
  EXPECT_THAT(s.error_message(), HasSubstr("db-1"));
  EXPECT_THAT(s.error_message(), HasSubstr("\"operator\""));
  // In scope but below the role: WritePhysical needs admin.
  s = Admit(op_, Rpc::kWritePhysical, &web_);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::PERMISSION_DENIED);
  EXPECT_THAT(s.error_message(), HasSubstr("WritePhysical"));
  EXPECT_THAT(s.error_message(), HasSubstr("web-1"));
  EXPECT_THAT(s.error_message(), HasSubstr("\"admin\""));
  // Allowed: in scope with the role.
  EXPECT_TRUE(Admit(op_, Rpc::kGetRegisters, &web_).ok());
  EXPECT_TRUE(Admit(viewer_, Rpc::kGetVM, &web_).ok());
  EXPECT_EQ(Admit(viewer_, Rpc::kGetRegisters, &web_).error_code(),
            grpc::StatusCode::PERMISSION_DENIED);
  EXPECT_GE(admission_->denials_logged(), 3u);
}

TEST_F(AdmissionTest, UnknownGuestIsNotFoundOnlyForCallersWithTheRole) {
  const std::string ghost = "ghost";
  EXPECT_EQ(Admit(op_, Rpc::kGetRegisters, &ghost).error_code(), grpc::StatusCode::NOT_FOUND);
  // A viewer has no operator role anywhere: denied, without learning whether the guest exists.
  grpc::Status s = Admit(viewer_, Rpc::kGetRegisters, &ghost);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::PERMISSION_DENIED);
  EXPECT_EQ(Admit(viewer_, Rpc::kGetRegisters, &web_).error_code(), s.error_code());
  const std::string empty;
  EXPECT_EQ(Admit(op_, Rpc::kGetRegisters, &empty).error_code(),
            grpc::StatusCode::INVALID_ARGUMENT);
}

TEST_F(AdmissionTest, ListsNeedTheRoleOnSomeGuestAndDaemonRpcsOnEveryGuest) {
  EXPECT_TRUE(Admit(viewer_, Rpc::kListVMs, nullptr).ok());
  EXPECT_TRUE(Admit(viewer_, Rpc::kStreamEvents, nullptr).ok());
  EXPECT_EQ(Admit(Caller::Tls("spiffe://t/stranger", "p"), Rpc::kListVMs, nullptr).error_code(),
            grpc::StatusCode::PERMISSION_DENIED);
  EXPECT_EQ(Admit(op_, Rpc::kDeletePolicy, nullptr).error_code(),
            grpc::StatusCode::PERMISSION_DENIED);
  EXPECT_TRUE(Admit(admin_, Rpc::kDeletePolicy, nullptr).ok());
  AdmittedCall call;
  ASSERT_TRUE(Admit(viewer_, Rpc::kListVMs, nullptr, &call).ok());
  auto web = daemon_->registry().Lookup("web-1");
  auto db = daemon_->registry().Lookup("db-1");
  EXPECT_TRUE(call.context().Visible(*daemon_->pipeline().ViewOf(*web)));
  EXPECT_FALSE(call.context().Visible(*daemon_->pipeline().ViewOf(*db)));
}

TEST_F(AdmissionTest, MutatingCallIsAuditedAfterItRanWithItsResult) {
  kvmi::v1::WritePhysicalRequest request;
  request.set_vm("web-1");
  request.set_gpa(0x1000);
  request.set_data("SECRET-CONTENT");
  AdmittedCall call;
  ASSERT_TRUE(
      Admit(admin_, Rpc::kWritePhysical, &web_, &call, security::SummarizeRequest(request)).ok());
  EXPECT_TRUE(ReadLines(audit_path_).empty());  // written after the call
  grpc::Status answer =
      admission_->Finish(call, grpc::Status(grpc::StatusCode::UNAVAILABLE, "guest went away"));
  EXPECT_EQ(answer.error_code(), grpc::StatusCode::UNAVAILABLE);
  std::vector<std::string> lines = ReadLines(audit_path_);
  ASSERT_EQ(lines.size(), 1u);
  const std::string& line = lines[0];
  EXPECT_THAT(line, HasSubstr("\"principal\":\"spiffe://t/admin\""));
  EXPECT_THAT(line, HasSubstr("\"peer\":\"ipv4:10.0.0.9:4000\""));
  EXPECT_THAT(line, HasSubstr("\"rpc\":\"WritePhysical\""));
  EXPECT_THAT(line, HasSubstr("\"name\":\"web-1\""));
  EXPECT_THAT(line, HasSubstr("\"uuid\":\"00000000-0000-0000-0000-000000000001\""));
  EXPECT_THAT(line, HasSubstr("\"gpa\":\"0x1000\""));
  EXPECT_THAT(line, HasSubstr("\"size\":14"));
  EXPECT_THAT(line, HasSubstr("\"code\":\"UNAVAILABLE\""));
  EXPECT_THAT(line, HasSubstr("guest went away"));
  EXPECT_THAT(line, HasSubstr("\"duration_ns\":"));
  EXPECT_THAT(line, Not(HasSubstr("SECRET")));
  // A read that is allowed is not audited.
  AdmittedCall read;
  ASSERT_TRUE(Admit(op_, Rpc::kGetRegisters, &web_, &read).ok());
  EXPECT_TRUE(admission_->Finish(read, grpc::Status::OK).ok());
  EXPECT_EQ(ReadLines(audit_path_).size(), 1u);
}

TEST_F(AdmissionTest, UnhealthyAuditLogRefusesMutatingCallsButNotReads) {
  auto full = security::AuditLog::Open("/dev/full");
  ASSERT_TRUE(full.ok()) << full.status();
  Admission admission(daemon_.get(), full->get());
  AdmittedCall call;
  CallTarget target;
  target.vm = &web_;
  auto none = [] { return AuditArgs(); };
  // The first mutating call runs; its record cannot be written, so its answer says so.
  ASSERT_TRUE(admission.Admit(admin_, Rpc::kPauseVCPU, target, none, &call).ok());
  grpc::Status answer = admission.Finish(call, grpc::Status::OK);
  EXPECT_EQ(answer.error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_THAT(answer.error_message(), HasSubstr("PauseVCPU done, but the audit log failed"));
  EXPECT_THAT(answer.error_message(), HasSubstr("/dev/full"));
  // From now on mutating calls are refused before they run, naming why.
  grpc::Status refused = admission.Admit(admin_, Rpc::kPauseVCPU, target, none, &call);
  EXPECT_EQ(refused.error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_THAT(refused.error_message(), HasSubstr("/dev/full"));
  // A read still works.
  EXPECT_TRUE(admission.Admit(admin_, Rpc::kGetRegisters, target, none, &call).ok());
  EXPECT_TRUE(admission.Admit(admin_, Rpc::kListVMs, CallTarget(), none, &call).ok());
}

TEST_F(AdmissionTest, ClaimWithEventContextNeedsOperator) {
  // Event context is guest memory: a responder may claim web-1's events, but not with the bytes
  // at RIP; an operator may (the role of ReadVirtual), and it is audited with the sizes.
  api::CallContext responder;
  responder.caller = resp_;
  kvmi::v1::Claim claim;
  claim.set_handler_id("h");
  claim.add_vms("web-1");
  EXPECT_TRUE(admission_->AdmitClaim(responder, claim).ok());
  claim.mutable_context()->set_rip_bytes(16);
  grpc::Status s = admission_->AdmitClaim(responder, claim);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::PERMISSION_DENIED);
  EXPECT_THAT(s.error_message(), HasSubstr("claim.context"));
  EXPECT_THAT(s.error_message(), HasSubstr("guest 'web-1' needs operator"));
  EXPECT_THAT(s.error_message(), HasSubstr("has responder"));
  api::CallContext op;
  op.caller = op_;
  EXPECT_TRUE(admission_->AdmitClaim(op, claim).ok());
  kvmi::v1::Claim every;
  every.set_handler_id("h");
  every.mutable_context()->set_pf_bytes(8);
  api::CallContext admin;
  admin.caller = admin_;
  EXPECT_TRUE(admission_->AdmitClaim(admin, every).ok());
  std::vector<std::string> lines = ReadLines(audit_path_);
  ASSERT_EQ(lines.size(), 4u);
  EXPECT_THAT(lines[1], HasSubstr("PERMISSION_DENIED"));
  EXPECT_THAT(lines[1], HasSubstr("\"context_rip_bytes\":16"));
  EXPECT_THAT(lines[0], Not(HasSubstr("context_rip_bytes")));
}

TEST_F(AdmissionTest, ClaimScopeAndCrashFallback) {
  api::CallContext responder;
  responder.caller = op_;  // operator includes responder
  kvmi::v1::Claim claim;
  claim.set_handler_id("h");
  claim.add_vms("web-1");
  EXPECT_TRUE(admission_->AdmitClaim(responder, claim).ok());
  claim.add_vms("db-1");
  grpc::Status s = admission_->AdmitClaim(responder, claim);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::PERMISSION_DENIED);
  EXPECT_THAT(s.error_message(), HasSubstr("db-1"));
  kvmi::v1::Claim every;
  every.set_handler_id("h");
  EXPECT_EQ(admission_->AdmitClaim(responder, every).error_code(),
            grpc::StatusCode::PERMISSION_DENIED);
  kvmi::v1::Claim crash;
  crash.set_handler_id("h");
  crash.add_vms("web-1");
  crash.set_fallback(kvmi::v1::ACTION_CRASH);
  s = admission_->AdmitClaim(responder, crash);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::PERMISSION_DENIED);
  EXPECT_THAT(s.error_message(), HasSubstr("ACTION_CRASH"));
  api::CallContext admin;
  admin.caller = admin_;
  EXPECT_TRUE(admission_->AdmitClaim(admin, crash).ok());
  EXPECT_TRUE(admission_->AdmitClaim(admin, every).ok());
  // Every claim decision is in the audit log.
  std::vector<std::string> lines = ReadLines(audit_path_);
  ASSERT_EQ(lines.size(), 6u);
  EXPECT_THAT(lines[0], HasSubstr("\"rpc\":\"Attach\""));
  EXPECT_THAT(lines[0], HasSubstr("\"handler_id\":\"h\""));
  EXPECT_THAT(lines[3], HasSubstr("\"fallback\":\"ACTION_CRASH\""));
  EXPECT_THAT(lines[3], HasSubstr("PERMISSION_DENIED"));
}

TEST_F(AdmissionTest, CrashVerdictNeedsAdminOnTheEventsGuest) {
  auto web = daemon_->registry().Lookup("web-1");
  ASSERT_NE(web, nullptr);
  kvmi::v1::Verdict verdict;
  verdict.set_event_id(7);
  verdict.set_action(kvmi::v1::ACTION_CRASH);
  api::CallContext responder;
  responder.caller = op_;
  grpc::Status s = admission_->AdmitCrashVerdict(responder, verdict, *web);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::PERMISSION_DENIED);
  EXPECT_THAT(s.error_message(), HasSubstr("web-1"));
  api::CallContext admin;
  admin.caller = admin_;
  EXPECT_TRUE(admission_->AdmitCrashVerdict(admin, verdict, *web).ok());
  std::vector<std::string> lines = ReadLines(audit_path_);
  ASSERT_EQ(lines.size(), 2u);
  EXPECT_THAT(lines[1], HasSubstr("\"code\":\"OK\""));
  EXPECT_THAT(lines[1], HasSubstr("\"name\":\"web-1\""));
}

TEST_F(AdmissionTest, DenialLogIsRateLimited) {
  const uint64_t logged = admission_->denials_logged();
  for (uint32_t i = 0; i < 3 * api::kMaxDenialLogsPerSecond; ++i) {
    EXPECT_EQ(Admit(viewer_, Rpc::kUnhookVM, &web_).error_code(),
              grpc::StatusCode::PERMISSION_DENIED);
  }
  // Within one or two seconds at most twice the per-second budget reach the log.
  EXPECT_LE(admission_->denials_logged() - logged, 2 * api::kMaxDenialLogsPerSecond);
  EXPECT_GE(admission_->denials_suppressed(), api::kMaxDenialLogsPerSecond);
  // Each denial is still audited.
  EXPECT_EQ(ReadLines(audit_path_).size(), 3 * api::kMaxDenialLogsPerSecond);
}

grpc::Status LimitRefusal(security::Limit limit, uint64_t value, const std::string& what) {
  return ToStatus(security::Exhausted(limit, value, what));
}

int64_t NowSecond() { return absl::ToUnixSeconds(absl::Now()); }

TEST(LimitNameOfTest, ReadsTheLimitOfAnExhaustedMessage) {
  EXPECT_EQ(
      api::LimitNameOf(
          security::Exhausted(security::Limit::kMaxPolicies, 3, "policy p: 3 applied").message()),
      "max_policies");
  EXPECT_EQ(api::LimitNameOf("no limit here"), "unknown");
  EXPECT_EQ(api::LimitNameOf("over the limit "), "unknown");
}

// A read refused by a limit is audited like a mutating call: identity, peer, RPC, guest, the
// limit's name and its refusal (code, message naming the knob).
TEST_F(AdmissionTest, LimitRefusalOfAReadIsAuditedFieldByField) {
  AdmittedCall call;
  ASSERT_TRUE(Admit(op_, Rpc::kGetRegisters, &web_, &call).ok());
  grpc::Status refusal =
      LimitRefusal(security::Limit::kListPoliciesMaxBytes, 100, "response is 200 bytes");
  grpc::Status answer = admission_->Finish(call, refusal);
  EXPECT_EQ(answer.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_EQ(answer.error_message(), refusal.error_message());
  std::vector<std::string> lines = ReadLines(audit_path_);
  ASSERT_EQ(lines.size(), 1u);
  const std::string& line = lines[0];
  EXPECT_THAT(line, HasSubstr("\"principal\":\"spiffe://t/op\""));
  EXPECT_THAT(line, HasSubstr("\"peer\":\"ipv4:10.0.0.7:4000\""));
  EXPECT_THAT(line, HasSubstr("\"rpc\":\"GetRegisters\""));
  EXPECT_THAT(line, HasSubstr("\"name\":\"web-1\""));
  EXPECT_THAT(line, HasSubstr("\"uuid\":\"00000000-0000-0000-0000-000000000001\""));
  EXPECT_THAT(line, HasSubstr("\"limit\":\"list_policies_max_bytes\""));
  EXPECT_THAT(line, HasSubstr("\"suppressed\":0"));
  EXPECT_THAT(line, HasSubstr("\"code\":\"RESOURCE_EXHAUSTED\""));
  EXPECT_THAT(line, HasSubstr("limits.list_policies_max_bytes"));
  EXPECT_THAT(line, HasSubstr("\"duration_ns\":"));
  // Any other failure of a read is not audited, nor a RESOURCE_EXHAUSTED that names no limit of
  // kvmid's (a guest's ENOMEM).
  AdmittedCall other;
  ASSERT_TRUE(Admit(op_, Rpc::kGetRegisters, &web_, &other).ok());
  admission_->Finish(other, grpc::Status(grpc::StatusCode::UNAVAILABLE, "gone")).ok();
  AdmittedCall enomem;
  ASSERT_TRUE(Admit(op_, Rpc::kGetRegisters, &web_, &enomem).ok());
  EXPECT_EQ(admission_
                ->Finish(enomem, grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED,
                                              "GetRegisters: KVMI error -ENOMEM"))
                .error_code(),
            grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_EQ(ReadLines(audit_path_).size(), 1u);
}

// A mutating call refused by a limit keeps its argument summary next to the limit.
TEST_F(AdmissionTest, LimitRefusalOfAMutatingCallKeepsItsArguments) {
  kvmi::v1::ApplyPolicyRequest request;
  request.mutable_policy()->set_name("wordy");
  AdmittedCall call;
  ASSERT_TRUE(
      Admit(admin_, Rpc::kApplyPolicy, nullptr, &call, security::SummarizeRequest(request)).ok());
  grpc::Status answer =
      admission_->Finish(call, LimitRefusal(security::Limit::kMaxPolicyDescriptionBytes, 4096,
                                            "policy.description is 1048576 bytes"));
  EXPECT_EQ(answer.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  std::vector<std::string> lines = ReadLines(audit_path_);
  ASSERT_EQ(lines.size(), 1u);
  EXPECT_THAT(lines[0], HasSubstr("\"rpc\":\"ApplyPolicy\""));
  EXPECT_THAT(lines[0], HasSubstr("\"policy\":\"wordy\""));
  EXPECT_THAT(lines[0], HasSubstr("\"limit\":\"max_policy_description_bytes\""));
  EXPECT_THAT(lines[0], HasSubstr("1048576 bytes"));
}

// Streams refused below the handler (StreamLimits) report through their CallContext.
TEST_F(AdmissionTest, StreamLimitRefusalIsAuditedThroughTheCallContext) {
  AdmittedCall call;
  ASSERT_TRUE(Admit(viewer_, Rpc::kWatchVMs, nullptr, &call).ok());
  EXPECT_EQ(call.context().rpc, Rpc::kWatchVMs);
  call.context().AuditLimitRefusal(
      LimitRefusal(security::Limit::kStreamsPerIdentity, 64, "spiffe://t/view holds 64 streams"));
  std::vector<std::string> lines = ReadLines(audit_path_);
  ASSERT_EQ(lines.size(), 1u);
  EXPECT_THAT(lines[0], HasSubstr("\"principal\":\"spiffe://t/view\""));
  EXPECT_THAT(lines[0], HasSubstr("\"peer\":\"ipv4:10.0.0.8:4000\""));
  EXPECT_THAT(lines[0], HasSubstr("\"rpc\":\"WatchVMs\""));
  EXPECT_THAT(lines[0], HasSubstr("\"limit\":\"streams_per_identity\""));
  EXPECT_THAT(lines[0], HasSubstr("\"code\":\"RESOURCE_EXHAUSTED\""));
  // A context not admitted here (tests of the logic) audits nothing.
  api::CallContext::Unrestricted().AuditLimitRefusal(
      LimitRefusal(security::Limit::kStreamsPerIdentity, 64, "x"));
  EXPECT_EQ(ReadLines(audit_path_).size(), 1u);
}

// A flood of refusals writes one record per identity and limit per second; the next record of
// the pair says how many were left out. Other identities and other limits have their own.
TEST_F(AdmissionTest, LimitRefusalAuditIsRateLimitedPerIdentityAndLimit) {
  const grpc::Status refusal = LimitRefusal(security::Limit::kMaxPolicyDescriptionBytes, 4096,
                                            "policy.description is 5000 bytes");
  auto refuse = [&](const Caller& caller, const grpc::Status& status) {
    AdmittedCall call;
    ASSERT_TRUE(Admit(caller, Rpc::kListPolicies, nullptr, &call).ok());
    EXPECT_EQ(admission_->Finish(call, status).error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  };
  // Start right after a second begins, so that the flood fits in one second.
  const int64_t first = NowSecond();
  ASSERT_TRUE(WaitUntil([&] { return NowSecond() != first; }, std::chrono::seconds(3)));
  const int64_t flood_second = NowSecond();
  constexpr int kFlood = 200;
  for (int i = 0; i < kFlood; ++i) refuse(op_, refusal);
  refuse(admin_, refusal);  // another identity
  refuse(op_, LimitRefusal(security::Limit::kListPoliciesPageSize, 256, "page"));  // another limit
  const bool same_second = NowSecond() == flood_second;
  std::vector<std::string> lines = ReadLines(audit_path_);
  if (same_second) {
    ASSERT_EQ(lines.size(), 3u);
    EXPECT_EQ(admission_->limit_refusals_suppressed(), uint64_t{kFlood - 1});
  } else {
    ASSERT_GE(lines.size(), 3u);  // a slow machine crossed a second: at most one more
    ASSERT_LE(lines.size(), 4u);
  }
  EXPECT_EQ(admission_->limit_refusals_audited() + admission_->limit_refusals_suppressed(),
            uint64_t{kFlood + 2});
  // The next second: one record for the pair, carrying what was left out.
  ASSERT_TRUE(WaitUntil([&] { return NowSecond() > flood_second + 1; }, std::chrono::seconds(4)));
  const uint64_t suppressed = admission_->limit_refusals_suppressed();
  refuse(op_, refusal);
  lines = ReadLines(audit_path_);
  ASSERT_FALSE(lines.empty());
  EXPECT_THAT(lines.back(), HasSubstr("\"principal\":\"spiffe://t/op\""));
  EXPECT_THAT(lines.back(), HasSubstr("\"limit\":\"max_policy_description_bytes\""));
  if (same_second) {
    EXPECT_THAT(lines.back(), HasSubstr("\"suppressed\":" + std::to_string(suppressed)));
  }
  EXPECT_EQ(admission_->limit_refusals_suppressed(), suppressed);
}

}  // namespace
}  // namespace kvmid
