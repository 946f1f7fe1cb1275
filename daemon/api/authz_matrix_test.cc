// Every RPC of kvmi.v1.Introspection, called over mutual TLS as each role, in and out of its guest
// scope, by a caller with no binding and by an anonymous plaintext caller: the exact status code
// each gets. The expected code of an admitted call is the one UNIX root (admin everywhere) gets
// for the same request: the logic's own answer. Requests are made harmless (an out-of-range vCPU,
// an empty size) so that they can be repeated; UnhookVM, which is not, runs last.
#include <google/protobuf/descriptor.h>
#include <google/protobuf/text_format.h>

#include <chrono>
#include <map>
#include <set>
#include <string>
#include <vector>

#include "daemon/api/api_test_fixture.h"
#include "daemon/security/authz.h"
#include "daemon/security/testing/test_certs.h"

namespace kvmid {
namespace {

using security::InfoOf;
using security::Role;
using security::Rpc;
using security::RpcScope;
using Stub = kvmi::v1::Introspection::Stub;
using ::testing::HasSubstr;

constexpr const char* kInScope = "web-1";
constexpr const char* kOutOfScope = "db-1";
constexpr const char* kUnknown = "ghost";

struct Who {
  std::string name;  // certificate name, or "anonymous"
  Role scoped;       // role on kInScope only (kNone: no scoped binding)
  Role global;       // role on every guest (kNone: none)
  bool anonymous = false;
};

const std::vector<Who>& Callers() {
  static const std::vector<Who> callers = {
      {"viewer", Role::kViewer, Role::kNone},
      {"responder", Role::kResponder, Role::kNone},
      {"operator", Role::kOperator, Role::kNone},
      {"admin", Role::kAdmin, Role::kNone},
      {"root", Role::kNone, Role::kAdmin},  // admin on every guest
      {"stranger", Role::kNone, Role::kNone},
      {"anonymous", Role::kNone, Role::kNone, /*anonymous=*/true},
  };
  return callers;
}

std::string Principal(const std::string& name) { return "spiffe://kvmid.test/role/" + name; }

Role RoleOn(const Who& who, const std::string& vm) {
  return vm == kInScope ? std::max(who.scoped, who.global) : who.global;
}
Role BestRole(const Who& who) { return std::max(who.scoped, who.global); }

// Sets the request's guest and makes it harmless: vCPU 9999 does not exist, size 0 is refused.
void Fill(google::protobuf::Message* request, const std::string& vm) {
  const google::protobuf::Descriptor* d = request->GetDescriptor();
  const google::protobuf::Reflection* r = request->GetReflection();
  if (const auto* f = d->FindFieldByName("vm")) r->SetString(request, f, vm);
  if (const auto* f = d->FindFieldByName("vcpu")) r->SetUInt32(request, f, 9999);
  if (const auto* f = d->FindFieldByName("name")) r->SetString(request, f, "no-such-policy");
}

template <typename Request, typename Response>
grpc::StatusCode Unary(Stub* stub,
                       grpc::Status (Stub::*method)(grpc::ClientContext*, const Request&,
                                                    Response*),
                       const std::string& vm) {
  Request request;
  Fill(&request, vm);
  Response response;
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
  return (stub->*method)(&ctx, request, &response).error_code();
}

// A stream the caller may open stays open until its deadline; a refused one ends at once.
template <typename Request, typename Message>
grpc::StatusCode Streaming(Stub* stub, std::unique_ptr<grpc::ClientReader<Message>> (Stub::*method)(
                                           grpc::ClientContext*, const Request&)) {
  Request request;
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::milliseconds(300));
  auto reader = (stub->*method)(&ctx, request);
  Message message;
  while (reader->Read(&message)) {
  }
  return reader->Finish().error_code();
}

// Bulk memory: a read stream of size 0 (INVALID_ARGUMENT once admitted), a write stream whose
// first message declares size 0 (the same).
grpc::StatusCode ReadStream(Stub* stub, const std::string& vm) {
  kvmi::v1::ReadPhysicalStreamRequest request;
  Fill(&request, vm);
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
  auto reader = stub->ReadPhysicalStream(&ctx, request);
  kvmi::v1::ReadPhysicalStreamResponse chunk;
  while (reader->Read(&chunk)) {
  }
  return reader->Finish().error_code();
}

grpc::StatusCode ReadVirtualStream(Stub* stub, const std::string& vm) {
  kvmi::v1::ReadVirtualStreamRequest request;
  Fill(&request, vm);  // vCPU 9999: INVALID_ARGUMENT once admitted
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
  auto reader = stub->ReadVirtualStream(&ctx, request);
  kvmi::v1::ReadVirtualStreamResponse chunk;
  while (reader->Read(&chunk)) {
  }
  return reader->Finish().error_code();
}

grpc::StatusCode WriteStream(Stub* stub, const std::string& vm) {
  kvmi::v1::WritePhysicalStreamRequest request;
  Fill(&request, vm);
  request.set_data("x");
  kvmi::v1::WritePhysicalStreamResponse response;
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
  auto writer = stub->WritePhysicalStream(&ctx, &response);
  writer->Write(request);
  writer->WritesDone();
  return writer->Finish().error_code();
}

// Attach: the RPC alone (a claim of the in-scope guest; its own checks are tested below).
grpc::StatusCode AttachClaim(Stub* stub, const kvmi::v1::Claim& claim,
                             kvmi::v1::AttachResponse* first = nullptr) {
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
  auto stream = stub->Attach(&ctx);
  kvmi::v1::AttachRequest request;
  *request.mutable_claim() = claim;
  stream->Write(request);
  kvmi::v1::AttachResponse response;
  if (stream->Read(&response)) {
    if (first != nullptr) *first = response;
    stream->WritesDone();
    while (stream->Read(&response)) {
    }
  }
  return stream->Finish().error_code();
}

kvmi::v1::Claim ClaimOf(const std::vector<std::string>& vms,
                        kvmi::v1::Action fallback = kvmi::v1::ACTION_UNSPECIFIED) {
  kvmi::v1::Claim claim;
  claim.set_handler_id("matrix");
  claim.add_events(kvmi::v1::EVENT_TYPE_BREAKPOINT);
  claim.set_deadline_ms(1000);
  for (const auto& vm : vms) claim.add_vms(vm);
  claim.set_fallback(fallback);
  return claim;
}

grpc::StatusCode Call(Stub* stub, Rpc rpc, const std::string& vm) {
  using S = Stub;
  switch (rpc) {
    case Rpc::kListVMs:
      return Unary(stub, &S::ListVMs, vm);
    case Rpc::kGetVM:
      return Unary(stub, &S::GetVM, vm);
    case Rpc::kStreamEvents:
      return Streaming(stub, &S::StreamEvents);
    case Rpc::kApplyPolicy:
      return Unary(stub, &S::ApplyPolicy, vm);  // no policy: INVALID_ARGUMENT once admitted
    case Rpc::kListPolicies:
      return Unary(stub, &S::ListPolicies, vm);
    case Rpc::kDeletePolicy:
      return Unary(stub, &S::DeletePolicy, vm);  // no such policy: NOT_FOUND once admitted
    case Rpc::kAttach:
      return AttachClaim(stub, ClaimOf({kInScope}));
    case Rpc::kGetRegisters:
      return Unary(stub, &S::GetRegisters, vm);
    case Rpc::kReadPhysical:
      return Unary(stub, &S::ReadPhysical, vm);
    case Rpc::kWritePhysical:
      return Unary(stub, &S::WritePhysical, vm);
    case Rpc::kPauseVCPU:
      return Unary(stub, &S::PauseVCPU, vm);
    case Rpc::kResumeVCPU:
      return Unary(stub, &S::ResumeVCPU, vm);
    case Rpc::kGetCPUID:
      return Unary(stub, &S::GetCPUID, vm);
    case Rpc::kGetXSAVE:
      return Unary(stub, &S::GetXSAVE, vm);
    case Rpc::kGetMTRRType:
      return Unary(stub, &S::GetMTRRType, vm);
    case Rpc::kInjectException:
      return Unary(stub, &S::InjectException, vm);
    case Rpc::kGetPageAccess:
      return Unary(stub, &S::GetPageAccess, vm);
    case Rpc::kSetPageAccess:
      return Unary(stub, &S::SetPageAccess, vm);
    case Rpc::kSetRegisters:
      return Unary(stub, &S::SetRegisters, vm);
    case Rpc::kControlSPP:
      return Unary(stub, &S::ControlSPP, vm);
    case Rpc::kGetPageWriteBitmap:
      return Unary(stub, &S::GetPageWriteBitmap, vm);
    case Rpc::kSetPageWriteBitmap:
      return Unary(stub, &S::SetPageWriteBitmap, vm);
    case Rpc::kControlEvents:
      return Unary(stub, &S::ControlEvents, vm);
    case Rpc::kUnhookVM:
      return Unary(stub, &S::UnhookVM, vm);
    case Rpc::kWatchVMs:
      return Streaming(stub, &S::WatchVMs);
    case Rpc::kReadPhysicalStream:
      return ReadStream(stub, vm);
    case Rpc::kWritePhysicalStream:
      return WriteStream(stub, vm);
    case Rpc::kTranslateAddress:
      return Unary(stub, &S::TranslateAddress, vm);  // no vcpu/space: INVALID_ARGUMENT admitted
    case Rpc::kReadVirtual:
      return Unary(stub, &S::ReadVirtual, vm);  // likewise
    case Rpc::kReadVirtualStream:
      return ReadVirtualStream(stub, vm);
    case Rpc::kWriteVirtual:
      return Unary(stub, &S::WriteVirtual, vm);  // vCPU 9999, no data: nothing written
  }
  ADD_FAILURE() << "an RPC the matrix does not know: " << InfoOf(rpc).name;
  return grpc::StatusCode::UNKNOWN;
}

class AuthzMatrixTest : public ApiTest {
 protected:
  void SetUp() override {
    ApiTest::SetUp();  // UNIX socket (root: the reference) and plaintext loopback TCP (anonymous)
    ASSERT_NE(Connect(1, kInScope), nullptr);
    ASSERT_NE(Connect(2, kOutOfScope), nullptr);
    ASSERT_TRUE(certs_.Ca("ca").ok());
    ASSERT_TRUE(certs_.Leaf("server", "ca", "kvmid", "DNS:localhost,IP:127.0.0.1", true).ok());
    std::string authz;
    for (const Who& who : Callers()) {
      if (who.anonymous) continue;
      ASSERT_TRUE(certs_.Leaf(who.name, "ca", who.name, "URI:" + Principal(who.name)).ok());
      if (who.scoped != Role::kNone) {
        authz += "bindings { principal: \"" + Principal(who.name) + "\" role: \"" +
                 std::string(security::RoleName(who.scoped)) + "\" guests { names: \"" + kInScope +
                 "\" } }\n";
      }
      if (who.global != Role::kNone) {
        authz += "bindings { principal: \"" + Principal(who.name) + "\" role: \"" +
                 std::string(security::RoleName(who.global)) + "\" }\n";
      }
    }
    config::Authz parsed;
    ASSERT_TRUE(google::protobuf::TextFormat::ParseFromString(authz, &parsed)) << authz;
    auto authorizer = security::Authorizer::FromConfig(parsed);
    ASSERT_TRUE(authorizer.ok()) << authorizer.status();
    daemon_->authorizer().Set(*authorizer);

    tls_api_ = std::make_unique<ApiServer>(daemon_.get(), /*history=*/4);
    security::ApiListenOptions listen;
    listen.tcp = "127.0.0.1:0";
    listen.tls = {certs_.pem("server"), certs_.key("server"), certs_.pem("ca")};
    absl::Status started = tls_api_->Start(listen);
    ASSERT_TRUE(started.ok()) << started;
  }
  void TearDown() override {
    stubs_.clear();
    tls_api_.reset();
    ApiTest::TearDown();
  }

  Stub* StubOf(const Who& who) {
    auto it = stubs_.find(who.name);
    if (it != stubs_.end()) return it->second.get();
    std::shared_ptr<grpc::Channel> channel;
    if (who.anonymous) {
      channel = grpc::CreateChannel("127.0.0.1:" + std::to_string(api_->tcp_port()),
                                    grpc::InsecureChannelCredentials());
    } else {
      grpc::SslCredentialsOptions options;
      options.pem_root_certs = security::testing::TestCerts::ReadFile(certs_.pem("ca"));
      options.pem_cert_chain = security::testing::TestCerts::ReadFile(certs_.pem(who.name));
      options.pem_private_key = security::testing::TestCerts::ReadFile(certs_.key(who.name));
      channel = grpc::CreateChannel("127.0.0.1:" + std::to_string(tls_api_->tcp_port()),
                                    grpc::SslCredentials(options));
    }
    return (stubs_[who.name] = kvmi::v1::Introspection::NewStub(channel)).get();
  }
  const Who& Named(const std::string& name) {
    for (const Who& who : Callers()) {
      if (who.name == name) return who;
    }
    ADD_FAILURE() << name;
    return Callers().front();
  }

  // What `who` must get for `rpc` on `vm` when the logic answers `logic`.
  static grpc::StatusCode Expected(const Who& who, Rpc rpc, const std::string& vm,
                                   grpc::StatusCode logic) {
    if (who.anonymous) return grpc::StatusCode::UNAUTHENTICATED;
    const security::RpcInfo& info = InfoOf(rpc);
    switch (info.scope) {
      case RpcScope::kDaemon:
        return who.global >= info.role ? logic : grpc::StatusCode::PERMISSION_DENIED;
      case RpcScope::kList:
        return BestRole(who) >= info.role ? logic : grpc::StatusCode::PERMISSION_DENIED;
      case RpcScope::kGuest:
        if (vm == kUnknown) {
          return BestRole(who) >= info.role ? grpc::StatusCode::NOT_FOUND
                                            : grpc::StatusCode::PERMISSION_DENIED;
        }
        return RoleOn(who, vm) >= info.role ? logic : grpc::StatusCode::PERMISSION_DENIED;
    }
    return grpc::StatusCode::UNKNOWN;
  }

  security::testing::TestCerts certs_;
  std::unique_ptr<ApiServer> tls_api_;
  std::map<std::string, std::unique_ptr<Stub>> stubs_;
};

TEST_F(AuthzMatrixTest, EveryRpcAsEveryCallerInAndOutOfScope) {
  size_t checked = 0;
  for (const security::RpcInfo& info : security::RpcTable()) {
    if (info.rpc == Rpc::kUnhookVM) continue;  // not harmless: below
    std::vector<std::string> guests = {""};
    if (info.scope == RpcScope::kGuest) guests = {kInScope, kOutOfScope, kUnknown};
    for (const std::string& vm : guests) {
      const grpc::StatusCode logic = Call(stub_.get(), info.rpc, vm);  // as UNIX root
      if (vm != kUnknown) {
        ASSERT_NE(logic, grpc::StatusCode::PERMISSION_DENIED) << info.name << " as root";
        ASSERT_NE(logic, grpc::StatusCode::UNAUTHENTICATED) << info.name << " as root";
      }
      for (const Who& who : Callers()) {
        EXPECT_EQ(Call(StubOf(who), info.rpc, vm), Expected(who, info.rpc, vm, logic))
            << info.name << " on '" << vm << "' as " << who.name << " (root got " << logic << ")";
        ++checked;
      }
    }
  }
  EXPECT_GT(checked, security::RpcTable().size() * Callers().size());

  // UnhookVM: every refusal first, then the calls that unhook.
  const grpc::StatusCode denied = grpc::StatusCode::PERMISSION_DENIED;
  for (const Who& who : Callers()) {
    for (const char* vm : {kInScope, kOutOfScope, kUnknown}) {
      const grpc::StatusCode expected = Expected(who, Rpc::kUnhookVM, vm, grpc::StatusCode::OK);
      if (expected == grpc::StatusCode::OK) continue;
      EXPECT_EQ(Call(StubOf(who), Rpc::kUnhookVM, vm), expected)
          << "UnhookVM " << vm << " as " << who.name;
    }
  }
  EXPECT_EQ(Call(StubOf(Named("admin")), Rpc::kUnhookVM, kOutOfScope), denied);
  EXPECT_EQ(Call(StubOf(Named("admin")), Rpc::kUnhookVM, kInScope), grpc::StatusCode::OK);
  EXPECT_EQ(Call(StubOf(Named("root")), Rpc::kUnhookVM, kOutOfScope), grpc::StatusCode::OK);
}

TEST_F(AuthzMatrixTest, ListsShowOnlyGuestsInScope) {
  for (const Who& who : Callers()) {
    kvmi::v1::ListVMsResponse listed;
    grpc::ClientContext ctx;
    grpc::Status s = StubOf(who)->ListVMs(&ctx, kvmi::v1::ListVMsRequest(), &listed);
    if (who.anonymous || BestRole(who) == Role::kNone) {
      EXPECT_FALSE(s.ok()) << who.name;
      continue;
    }
    ASSERT_TRUE(s.ok()) << who.name << ": " << s.error_message();
    std::set<std::string> names;
    for (const auto& vm : listed.vms()) names.insert(vm.name());
    if (who.global != Role::kNone) {
      EXPECT_EQ(names, (std::set<std::string>{kInScope, kOutOfScope})) << who.name;
    } else {
      EXPECT_EQ(names, (std::set<std::string>{kInScope})) << who.name;
    }
  }
}

TEST_F(AuthzMatrixTest, DenialNamesTheRpcTheGuestAndTheRole) {
  kvmi::v1::GetRegistersRequest request;
  request.set_vm(kOutOfScope);
  kvmi::v1::GetRegistersResponse response;
  grpc::ClientContext ctx;
  grpc::Status s = StubOf(Named("operator"))->GetRegisters(&ctx, request, &response);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::PERMISSION_DENIED);
  EXPECT_THAT(s.error_message(), HasSubstr("GetRegisters"));
  EXPECT_THAT(s.error_message(), HasSubstr(kOutOfScope));
  EXPECT_THAT(s.error_message(), HasSubstr("\"operator\""));
  EXPECT_THAT(s.error_message(), HasSubstr(Principal("operator")));
}

TEST_F(AuthzMatrixTest, AttachClaimMustStayInScopeAndCrashFallbackNeedsAdmin) {
  Stub* responder = StubOf(Named("responder"));
  kvmi::v1::AttachResponse first;
  EXPECT_EQ(AttachClaim(responder, ClaimOf({kInScope}), &first), grpc::StatusCode::OK);
  EXPECT_TRUE(first.has_claimed());
  EXPECT_EQ(AttachClaim(responder, ClaimOf({kOutOfScope})), grpc::StatusCode::PERMISSION_DENIED);
  EXPECT_EQ(AttachClaim(responder, ClaimOf({kInScope, kOutOfScope})),
            grpc::StatusCode::PERMISSION_DENIED);
  EXPECT_EQ(AttachClaim(responder, ClaimOf({})), grpc::StatusCode::PERMISSION_DENIED);
  EXPECT_EQ(AttachClaim(responder, ClaimOf({kInScope}, kvmi::v1::ACTION_CRASH)),
            grpc::StatusCode::PERMISSION_DENIED);
  EXPECT_EQ(AttachClaim(StubOf(Named("admin")), ClaimOf({kInScope}, kvmi::v1::ACTION_CRASH)),
            grpc::StatusCode::OK);
  EXPECT_EQ(AttachClaim(StubOf(Named("root")), ClaimOf({}, kvmi::v1::ACTION_CRASH)),
            grpc::StatusCode::OK);
  EXPECT_EQ(AttachClaim(StubOf(Named("viewer")), ClaimOf({kInScope})),
            grpc::StatusCode::PERMISSION_DENIED);
  EXPECT_EQ(AttachClaim(StubOf(Named("anonymous")), ClaimOf({kInScope})),
            grpc::StatusCode::UNAUTHENTICATED);
}

// An inline command is checked as its unary RPC on its guest.
int32_t InlineCommand(Stub* stub, const kvmi::v1::Command& command,
                      kvmi::v1::CommandResult* out = nullptr) {
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
  auto stream = stub->Attach(&ctx);
  kvmi::v1::AttachRequest request;
  *request.mutable_claim() = ClaimOf({kInScope});
  EXPECT_TRUE(stream->Write(request));
  kvmi::v1::AttachResponse response;
  EXPECT_TRUE(stream->Read(&response));
  EXPECT_TRUE(response.has_claimed());
  kvmi::v1::AttachRequest inline_command;
  *inline_command.mutable_command() = command;
  EXPECT_TRUE(stream->Write(inline_command));
  int32_t code = -1;
  while (stream->Read(&response)) {
    if (response.has_command_result() && response.command_result().id() == command.id()) {
      code = response.command_result().code();
      if (out != nullptr) *out = response.command_result();
      break;
    }
  }
  stream->WritesDone();
  while (stream->Read(&response)) {
  }
  stream->Finish();
  return code;
}

// TranslateAddress inline: reads guest memory, so operator (not responder) on its guest. With
// paging off the answer needs no guest read at all.
kvmi::v1::Command TranslateCommand(const std::string& vm) {
  kvmi::v1::Command command;
  command.set_id(9);
  command.mutable_translate_address()->set_vm(vm);
  command.mutable_translate_address()->mutable_address_space()->set_mode(kvmi::v1::PAGING_MODE_OFF);
  command.mutable_translate_address()->set_gva(0x1234);
  return command;
}

int32_t InlineWrite(Stub* stub, const std::string& vm) {
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
  auto stream = stub->Attach(&ctx);
  kvmi::v1::AttachRequest request;
  *request.mutable_claim() = ClaimOf({kInScope});
  EXPECT_TRUE(stream->Write(request));
  kvmi::v1::AttachResponse response;
  EXPECT_TRUE(stream->Read(&response));
  EXPECT_TRUE(response.has_claimed());
  kvmi::v1::AttachRequest write;
  write.mutable_command()->set_id(7);
  write.mutable_command()->mutable_write_physical()->set_vm(vm);
  write.mutable_command()->mutable_write_physical()->set_gpa(0x1000);
  write.mutable_command()->mutable_write_physical()->set_data("x");
  EXPECT_TRUE(stream->Write(write));
  int32_t code = -1;
  while (stream->Read(&response)) {
    if (response.has_command_result() && response.command_result().id() == 7) {
      code = response.command_result().code();
      break;
    }
  }
  stream->WritesDone();
  while (stream->Read(&response)) {
  }
  stream->Finish();
  return code;
}

TEST_F(AuthzMatrixTest, InlineCommandsAreCheckedAsTheirRpcOnTheirGuest) {
  EXPECT_EQ(InlineWrite(StubOf(Named("operator")), kInScope), grpc::StatusCode::PERMISSION_DENIED);
  EXPECT_EQ(InlineWrite(StubOf(Named("admin")), kInScope), grpc::StatusCode::OK);
  EXPECT_EQ(InlineWrite(StubOf(Named("admin")), kOutOfScope), grpc::StatusCode::PERMISSION_DENIED);
  EXPECT_EQ(InlineWrite(StubOf(Named("root")), kOutOfScope), grpc::StatusCode::OK);
}

TEST_F(AuthzMatrixTest, InlineTranslateAddressNeedsOperatorOnItsGuest) {
  EXPECT_EQ(InlineCommand(StubOf(Named("responder")), TranslateCommand(kInScope)),
            grpc::StatusCode::PERMISSION_DENIED);
  EXPECT_EQ(InlineCommand(StubOf(Named("operator")), TranslateCommand(kOutOfScope)),
            grpc::StatusCode::PERMISSION_DENIED);
  kvmi::v1::CommandResult result;
  EXPECT_EQ(InlineCommand(StubOf(Named("operator")), TranslateCommand(kInScope), &result),
            grpc::StatusCode::OK);
  EXPECT_TRUE(result.translate_address().present());
  EXPECT_EQ(result.translate_address().gpa(), 0x1234u);
  EXPECT_EQ(result.translate_address().mode(), kvmi::v1::PAGING_MODE_OFF);
}

TEST_F(AuthzMatrixTest, CrashVerdictNeedsAdminAndTheEventFallsBackInstead) {
  ScriptedHost* host = hosts_.front().get();  // kInScope
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
  auto stream = StubOf(Named("operator"))->Attach(&ctx);
  kvmi::v1::AttachRequest claim;
  *claim.mutable_claim() = ClaimOf({kInScope});
  claim.mutable_claim()->set_deadline_ms(300);
  ASSERT_TRUE(stream->Write(claim));
  kvmi::v1::AttachResponse response;
  ASSERT_TRUE(stream->Read(&response));
  ASSERT_TRUE(response.has_claimed());
  host->SendEvent(MakeTestEvent(KVMI_EVENT_BREAKPOINT, 0, 41));
  ASSERT_TRUE(stream->Read(&response));
  ASSERT_TRUE(response.has_event());
  kvmi::v1::AttachRequest crash;
  crash.mutable_verdict()->set_event_id(response.event().id());
  crash.mutable_verdict()->set_action(kvmi::v1::ACTION_CRASH);
  ASSERT_TRUE(stream->Write(crash));
  ASSERT_TRUE(stream->Read(&response));
  ASSERT_TRUE(response.has_error());
  EXPECT_THAT(response.error().message(), HasSubstr("ACTION_CRASH"));
  EXPECT_THAT(response.error().message(), HasSubstr("\"admin\""));
  // The guest is answered by the deadline's fallback (not CRASH), and stays hooked.
  auto reply = host->WaitFor(
      [](const ReceivedMessage& m) { return m.hdr.id == KVMI_EVENT_REPLY && m.hdr.seq == 41; });
  ASSERT_TRUE(reply);
  kvmi::EventReply decoded;
  ASSERT_TRUE(
      kvmi::DecodeEventReply(kvmi::ByteView(reply->payload), KVMI_EVENT_BREAKPOINT, &decoded).ok());
  EXPECT_NE(decoded.action, KVMI_EVENT_ACTION_CRASH);
  EXPECT_EQ(daemon_->registry().Lookup(kInScope)->state(), GuestState::kHooked);
  ctx.TryCancel();
}

}  // namespace
}  // namespace kvmid
