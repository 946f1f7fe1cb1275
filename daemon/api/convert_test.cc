// The conversions and the one mapping of internal outcomes to gRPC statuses.
#include "daemon/api/convert.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

namespace kvmid {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;

TEST(ToStatusTest, CommandResultsMapToTheCodesTheProtoDocuments) {
  EXPECT_TRUE(ToStatus(CommandResult::Ok(), "X").ok());
  grpc::Status eperm = ToStatus(CommandResult::KvmiError(-KVM_EPERM), "ReadPhysical");
  EXPECT_EQ(eperm.error_code(), grpc::StatusCode::PERMISSION_DENIED);
  EXPECT_EQ(eperm.error_message(), "ReadPhysical: the host answered KVM_EPERM");
  EXPECT_EQ(ToStatus(CommandResult::KvmiError(-KVM_EINVAL), "X").error_code(),
            grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(ToStatus(CommandResult::KvmiError(-KVM_ENOENT), "X").error_code(),
            grpc::StatusCode::NOT_FOUND);
  EXPECT_EQ(ToStatus(CommandResult::KvmiError(-KVM_EAGAIN), "X").error_code(),
            grpc::StatusCode::UNAVAILABLE);
  EXPECT_EQ(ToStatus(CommandResult::KvmiError(-KVM_EBUSY), "X").error_code(),
            grpc::StatusCode::UNAVAILABLE);
  EXPECT_EQ(ToStatus(CommandResult::KvmiError(-KVM_EOPNOTSUPP), "X").error_code(),
            grpc::StatusCode::UNIMPLEMENTED);
  EXPECT_EQ(ToStatus(CommandResult::KvmiError(-KVM_ENOMEM), "X").error_code(),
            grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_EQ(ToStatus(CommandResult::KvmiError(-12345), "X").error_code(),
            grpc::StatusCode::UNKNOWN);
  EXPECT_EQ(ToStatus(CommandResult::Invalid("too big"), "X").error_message(), "X: too big");
  grpc::Status closed = ToStatus(CommandResult::Closed("eof"), "X");
  EXPECT_EQ(closed.error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_THAT(closed.error_message(), HasSubstr("gone (eof)"));
  EXPECT_EQ(ToStatus(CommandResult::Timeout(), "X").error_code(),
            grpc::StatusCode::DEADLINE_EXCEEDED);
  EXPECT_EQ(ToStatus(CommandResult::NotWaiting("idle"), "X").error_code(),
            grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_EQ(ToStatus(CommandResult::ProtocolError("short"), "X").error_code(),
            grpc::StatusCode::INTERNAL);
}

TEST(ToStatusTest, AbslStatusesKeepTheirCodeAndMessage) {
  EXPECT_TRUE(ToStatus(absl::OkStatus()).ok());
  grpc::Status s = ToStatus(absl::NotFoundError("no guest 'x'"));
  EXPECT_EQ(s.error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_EQ(s.error_message(), "no guest 'x'");
  EXPECT_EQ(ToStatus(absl::DeadlineExceededError("late")).error_code(),
            grpc::StatusCode::DEADLINE_EXCEEDED);
  EXPECT_EQ(InvalidArgument("vcpu", "too big").error_message(), "vcpu: too big");
  EXPECT_EQ(Cancelled().error_code(), grpc::StatusCode::CANCELLED);
}

kvmi::Event EventOf(uint8_t id) {
  kvmi::Event e;
  e.common.event = id;
  return e;
}

TEST(FromProtoTest, AVerdictIsCheckedAgainstWhatTheEventAccepts) {
  Verdict v;
  kvmi::v1::Verdict in;
  in.set_action(kvmi::v1::ACTION_CONTINUE);
  in.set_new_value(0x80050033);
  ASSERT_TRUE(FromProto(in, EventOf(KVMI_EVENT_CR), &v).ok());
  EXPECT_EQ(v.action, KVMI_EVENT_ACTION_CONTINUE);
  EXPECT_EQ(v.new_value.value_or(0), 0x80050033u);

  in.set_action(kvmi::v1::ACTION_KEEP_OLD);
  absl::Status conflict = FromProto(in, EventOf(KVMI_EVENT_CR), &v);
  EXPECT_EQ(conflict.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(conflict.message(), HasSubstr("new_value"));
  in.clear_new_value();
  ASSERT_TRUE(FromProto(in, EventOf(KVMI_EVENT_MSR), &v).ok());
  EXPECT_TRUE(v.keep_old);
  EXPECT_THAT(FromProto(in, EventOf(KVMI_EVENT_PF), &v).message(), HasSubstr("KEEP_OLD"));

  in.set_action(kvmi::v1::ACTION_RETRY);  // a CR write retried would #GP the guest
  EXPECT_THAT(FromProto(in, EventOf(KVMI_EVENT_CR), &v).message(), HasSubstr("not an action"));
  in.set_action(kvmi::v1::ACTION_UNSPECIFIED);
  EXPECT_THAT(FromProto(in, EventOf(KVMI_EVENT_PF), &v).message(), HasSubstr("required"));

  in.set_action(kvmi::v1::ACTION_RETRY);
  in.mutable_pf()->set_ctx_data(std::string(KVMI_CTX_DATA_SIZE + 1, 'x'));
  EXPECT_THAT(FromProto(in, EventOf(KVMI_EVENT_PF), &v).message(), HasSubstr("pf.ctx_data"));
  in.mutable_pf()->set_ctx_data("ab");
  in.mutable_pf()->set_singlestep(true);
  ASSERT_TRUE(FromProto(in, EventOf(KVMI_EVENT_PF), &v).ok());
  ASSERT_TRUE(v.pf.has_value());
  EXPECT_EQ(v.pf->ctx_size, 2u);
  EXPECT_EQ(v.pf->singlestep, 1);
  in.set_action(kvmi::v1::ACTION_CONTINUE);
  EXPECT_THAT(FromProto(in, EventOf(KVMI_EVENT_BREAKPOINT), &v).message(), HasSubstr("pf:"));
}

TEST(ConvertTest, RegistersGoBothWaysAndALeaseListsWhatItArms) {
  kvmi::v1::Registers in;
  in.set_rax(1), in.set_r15(15), in.set_rip(0xffff), in.set_rflags(2), in.set_cr3(0x1000);
  kvm_regs regs = RegistersFromProto(in);
  EXPECT_EQ(regs.rax, 1u);
  EXPECT_EQ(regs.r15, 15u);
  EXPECT_EQ(regs.rip, 0xffffu);
  kvm_sregs sregs{};
  sregs.cr3 = 0x2000;
  kvmi::v1::Registers out = RegistersToProto(regs, sregs);
  EXPECT_EQ(out.rax(), 1u);
  EXPECT_EQ(out.rflags(), 2u);
  EXPECT_EQ(out.cr3(), 0x2000u);  // control registers come from sregs, never from the request

  Arming arming;
  arming.vcpu_events = {KVMI_EVENT_CR};
  arming.crs = {3};
  arming.page_access = {{1, 0}, {2, 0}};
  arming.vcpu_only[1].msrs = {0xc0000080};
  kvmi::v1::Lease lease = ToProto("api", arming);
  EXPECT_EQ(lease.owner(), "api");
  EXPECT_THAT(lease.vcpu_events(), ElementsAre(kvmi::v1::EVENT_TYPE_CR));
  EXPECT_THAT(lease.crs(), ElementsAre(3u));
  EXPECT_EQ(lease.restricted_pages(), 2u);
  ASSERT_EQ(lease.vcpu_only_size(), 1);
  EXPECT_EQ(lease.vcpu_only(0).vcpu(), 1u);
  EXPECT_THAT(lease.vcpu_only(0).msrs(), ElementsAre(0xc0000080u));
}

TEST(ConvertTest, AGuestsStartTimeIsATimestampAndUnsetWhenQemuSentNone) {
  GuestSnapshot snapshot;
  snapshot.identity.name = "web-1";
  snapshot.identity.start_time = 1700000000;  // seconds since the epoch, from the handshake
  kvmi::v1::VM vm = ToProto(snapshot, {});
  ASSERT_TRUE(vm.has_start_time());
  EXPECT_EQ(vm.start_time().seconds(), 1700000000);
  EXPECT_EQ(vm.start_time().nanos(), 0);

  snapshot.identity.start_time = 0;  // QEMU sent none
  EXPECT_FALSE(ToProto(snapshot, {}).has_start_time());
}

}  // namespace
ObservedEvent LabelledCrEvent() {
  GuestIdentity identity;
  identity.name = "web-1";
  identity.uuid[15] = 7;
  auto guest = std::make_shared<Guest>("k", identity, nullptr);
  auto view = std::make_shared<GuestView>();
  view->uuid = identity.uuid;
  view->name = "web-1";
  view->labels = {{"tier", "prod"}, {"team", "sec"}};
  guest->set_cached_view(view);
  ObservedEvent o;
  o.guest = guest;
  o.event_id = 42;
  o.event.common.event = KVMI_EVENT_CR;
  o.event.common.vcpu = 3;
  o.event.specific.cr.cr = 4;
  o.event.specific.cr.new_value = 0x10;
  o.verdict.decided_by = "default";
  o.monitor_hits = {"watch"};
  o.time = std::chrono::system_clock::time_point(std::chrono::seconds(1700000000));
  return o;
}

TEST(EventConvertTest, AnEventCarriesTheGuestsUuidNameLabelsNodeAndTime) {
  kvmi::v1::Event e = ToProto(LabelledCrEvent(), /*include_registers=*/false);
  EXPECT_EQ(e.id(), 42u);
  EXPECT_EQ(e.vm_name(), "web-1");
  EXPECT_EQ(e.vm_uuid(), "00000000-0000-0000-0000-000000000007");
  EXPECT_EQ(e.vm_labels().size(), 2u);
  EXPECT_EQ(e.vm_labels().at("tier"), "prod");
  EXPECT_FALSE(e.node().empty());
  EXPECT_EQ(e.time().seconds(), 1700000000);
  EXPECT_EQ(e.cr().cr(), 4u);
  EXPECT_FALSE(e.has_registers());
}

TEST(EventConvertTest, AFieldMaskBuildsOnlyItsFieldsAndTheId) {
  google::protobuf::FieldMask mask;
  mask.add_paths("vm_name");
  mask.add_paths("detail");
  mask.add_paths("registers");
  absl::StatusOr<EventFields> fields = CompileEventMask(mask, "field_mask");
  ASSERT_TRUE(fields.ok()) << fields.status();
  EXPECT_FALSE(fields->all());
  kvmi::v1::Event e = ToProto(LabelledCrEvent(), /*include_registers=*/true, *fields);
  kvmi::v1::Event expected;
  expected.set_id(42);  // always
  expected.set_vm_name("web-1");
  expected.mutable_cr()->set_cr(4);
  expected.mutable_cr()->set_new_value(0x10);
  *expected.mutable_registers() = RegistersToProto(kvm_regs{}, kvm_sregs{});
  EXPECT_EQ(e.SerializeAsString(), expected.SerializeAsString()) << e.DebugString();

  // Without registers in the mask, include_registers adds none; without the detail, no cr.
  mask.Clear();
  mask.add_paths("vm_labels");
  mask.add_paths("type");
  fields = CompileEventMask(mask, "field_mask");
  ASSERT_TRUE(fields.ok());
  e = ToProto(LabelledCrEvent(), /*include_registers=*/true, *fields);
  EXPECT_FALSE(e.has_registers());
  EXPECT_FALSE(e.has_cr());
  EXPECT_EQ(e.vm_labels().size(), 2u);
  EXPECT_EQ(e.type(), kvmi::v1::EVENT_TYPE_CR);
  EXPECT_EQ(e.vm_name(), "");
  EXPECT_EQ(e.node(), "");
  EXPECT_FALSE(e.has_time());

  // No path: every field.
  fields = CompileEventMask(google::protobuf::FieldMask(), "field_mask");
  ASSERT_TRUE(fields.ok());
  EXPECT_TRUE(fields->all());
}

TEST(EventConvertTest, AnUnknownMaskPathIsInvalidAndNamed) {
  google::protobuf::FieldMask mask;
  mask.add_paths("vm_name");
  mask.add_paths("vm_colour");
  absl::StatusOr<EventFields> fields = CompileEventMask(mask, "claim.field_mask");
  EXPECT_EQ(fields.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(fields.status().message(), HasSubstr("claim.field_mask.paths[1]: 'vm_colour'"));
  mask.set_paths(1, "cr.cr");  // nested paths are not taken
  EXPECT_THAT(CompileEventMask(mask, "field_mask").status().message(), HasSubstr("'cr.cr'"));
}

}  // namespace kvmid

namespace kvmid {
namespace {

// ---- Event context (issue 15) -----------------------------------------------------------------

TEST(ContextConvertTest, RequestsAreBoundedNamingTheFieldAndTheLimit) {
  kvmi::v1::ContextRequest request;
  request.set_rip_bytes(16);
  request.set_pf_bytes(vmem::kMaxContextBytes);
  vmem::ContextDemand demand;
  ASSERT_TRUE(ContextDemandFromProto(request, "claim.context", &demand).ok());
  EXPECT_EQ(demand, (vmem::ContextDemand{16, 0, 256}));
  request.set_rsp_bytes(vmem::kMaxContextBytes + 1);
  grpc::Status s = ContextDemandFromProto(request, "claim.context", &demand);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(s.error_message(), HasSubstr("claim.context.rsp_bytes"));
  EXPECT_THAT(s.error_message(), HasSubstr("257 bytes, above the limit of 256"));
}

TEST(ContextConvertTest, EveryBlockKeepsItsBytesAndWhyItIsIncomplete) {
  vmem::CapturedContext context;
  vmem::ContextBlock rip;
  rip.kind = vmem::ContextKind::kRip;
  rip.gva = 0xffffffff81000000ull;
  rip.size = 16;
  rip.data = {0x0f, 0x30};
  rip.complete = false;
  rip.why = "gva 0xffffffff81000002: not present at PTE";
  context.blocks.push_back(rip);
  vmem::ContextBlock pf;
  pf.kind = vmem::ContextKind::kPf;
  pf.gva = 0x1000;
  pf.size = 4;
  pf.data = {1, 2, 3, 4};
  pf.complete = true;
  context.blocks.push_back(pf);
  kvmi::v1::EventContext out;
  ContextToProto(context, &out);
  EXPECT_EQ(out.rip().gva(), 0xffffffff81000000ull);
  EXPECT_EQ(out.rip().size(), 16u);
  EXPECT_EQ(out.rip().data(), std::string("\x0f\x30", 2));
  EXPECT_FALSE(out.rip().complete());
  EXPECT_EQ(out.rip().why(), rip.why);
  EXPECT_FALSE(out.has_rsp());
  EXPECT_TRUE(out.pf().complete());
  EXPECT_EQ(out.pf().data(), std::string("\x01\x02\x03\x04", 4));
}

}  // namespace
}  // namespace kvmid
