// The control RPCs that read or write guest state, through a real server: success and the main
// error cases of each.
#include "daemon/api/api_test_fixture.h"
#include "daemon/api/limits.h"

namespace kvmid {
namespace {

using ::testing::HasSubstr;

TEST_F(ApiTest, ControlRpcsReadRegistersAndMemoryAndReportErrorsByName) {
  ScriptedHost* host = Connect(7, "ctl");
  host->set_responder(RichResponder());
  grpc::ClientContext regs_ctx;
  kvmi::v1::GetRegistersRequest regs_request;
  regs_request.set_vm("ctl");
  regs_request.set_vcpu(1);
  regs_request.add_msrs(0xC0000082);
  kvmi::v1::GetRegistersResponse regs;
  ASSERT_TRUE(stub_->GetRegisters(&regs_ctx, regs_request, &regs).ok());
  EXPECT_EQ(regs.mode(), 8u);
  EXPECT_EQ(regs.registers().rip(), 0xffffffff81001234u);
  EXPECT_EQ(regs.registers().cr3(), 0x2000u);
  ASSERT_EQ(regs.msrs_size(), 1);
  EXPECT_EQ(regs.msrs(0).value(), 0xC0000083u);

  grpc::ClientContext bad_vcpu_ctx;
  regs_request.set_vcpu(9);
  grpc::Status bad_vcpu = stub_->GetRegisters(&bad_vcpu_ctx, regs_request, &regs);
  EXPECT_EQ(bad_vcpu.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(bad_vcpu.error_message(), HasSubstr("vcpu"));

  // 10 000 bytes across pages, reassembled in order.
  grpc::ClientContext read_ctx;
  kvmi::v1::ReadPhysicalRequest read;
  read.set_vm("ctl");
  read.set_gpa(0x1ff0);
  read.set_size(10000);
  kvmi::v1::ReadPhysicalResponse data;
  ASSERT_TRUE(stub_->ReadPhysical(&read_ctx, read, &data).ok());
  ASSERT_EQ(data.data().size(), 10000u);
  EXPECT_EQ(static_cast<uint8_t>(data.data()[5000]), static_cast<uint8_t>(0x1ff0 + 5000));

  grpc::ClientContext einval_ctx;
  read.set_gpa(0xbad000);
  read.set_size(16);
  grpc::Status einval = stub_->ReadPhysical(&einval_ctx, read, &data);
  EXPECT_EQ(einval.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(einval.error_message(), HasSubstr("KVM_EINVAL"));

  grpc::ClientContext zero_ctx;
  read.set_size(0);
  EXPECT_EQ(stub_->ReadPhysical(&zero_ctx, read, &data).error_code(),
            grpc::StatusCode::INVALID_ARGUMENT);

  grpc::ClientContext write_ctx;
  kvmi::v1::WritePhysicalRequest write;
  write.set_vm("ctl");
  write.set_gpa(0x3000);
  write.set_data(std::string(5000, 'x'));
  kvmi::v1::WritePhysicalResponse written;
  ASSERT_TRUE(stub_->WritePhysical(&write_ctx, write, &written).ok());
  EXPECT_TRUE(host->WaitForId(KVMI_WRITE_PHYSICAL));

  // The largest unary read reaches a client with gRPC's default 4 MiB receive limit; past it, both
  // directions are refused naming the field and the limit (not gRPC's generic "larger than max").
  grpc::ClientContext largest_ctx;
  read.set_gpa(0x10000);
  read.set_size(api::kMaxTransferBytes);
  ASSERT_TRUE(stub_->ReadPhysical(&largest_ctx, read, &data).ok());
  EXPECT_EQ(data.data().size(), api::kMaxTransferBytes);
  grpc::ClientContext big_read_ctx;
  read.set_size(api::kMaxTransferBytes + 1);
  grpc::Status big_read = stub_->ReadPhysical(&big_read_ctx, read, &data);
  EXPECT_EQ(big_read.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(big_read.error_message(), HasSubstr("size"));
  EXPECT_THAT(big_read.error_message(), HasSubstr("4128768 bytes"));
  grpc::ClientContext big_write_ctx;
  write.set_data(std::string(api::kMaxTransferBytes + 1, 'x'));
  grpc::Status big_write = stub_->WritePhysical(&big_write_ctx, write, &written);
  EXPECT_EQ(big_write.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(big_write.error_message(), HasSubstr("data"));
  EXPECT_THAT(big_write.error_message(), HasSubstr("4128768 bytes"));

  grpc::ClientContext missing_ctx;
  read.set_vm("nope");
  read.set_size(1);
  EXPECT_EQ(stub_->ReadPhysical(&missing_ctx, read, &data).error_code(),
            grpc::StatusCode::NOT_FOUND);
}

TEST_F(ApiTest, CpuidXsaveMtrrAndExceptionInjection) {
  ScriptedHost* host = Connect(10, "cpu");
  host->set_responder(RichResponder());
  grpc::ClientContext cpuid_ctx;
  kvmi::v1::GetCPUIDRequest cpuid;
  cpuid.set_vm("cpu");
  cpuid.set_vcpu(1);
  cpuid.set_function(0);
  kvmi::v1::GetCPUIDResponse leaf;
  ASSERT_TRUE(stub_->GetCPUID(&cpuid_ctx, cpuid, &leaf).ok());
  EXPECT_EQ(leaf.ebx(), 0x756e6547u);  // "Genu"

  grpc::ClientContext xsave_ctx;
  kvmi::v1::GetXSAVERequest xsave;
  xsave.set_vm("cpu");
  kvmi::v1::GetXSAVEResponse region;
  ASSERT_TRUE(stub_->GetXSAVE(&xsave_ctx, xsave, &region).ok());
  EXPECT_EQ(region.region().size(), 4096u);

  grpc::ClientContext mtrr_ctx;
  kvmi::v1::GetMTRRTypeRequest mtrr;
  mtrr.set_vm("cpu");
  mtrr.set_gpa(0x100000);
  kvmi::v1::GetMTRRTypeResponse type;
  ASSERT_TRUE(stub_->GetMTRRType(&mtrr_ctx, mtrr, &type).ok());
  EXPECT_EQ(type.type(), 6u);

  grpc::ClientContext inject_ctx;
  kvmi::v1::InjectExceptionRequest inject;
  inject.set_vm("cpu");
  inject.set_vcpu(0);
  inject.set_vector(14);
  inject.set_error_code(2);
  inject.set_address(0xdead000);
  kvmi::v1::InjectExceptionResponse injected;
  ASSERT_TRUE(stub_->InjectException(&inject_ctx, inject, &injected).ok());
  auto m = host->WaitForId(KVMI_INJECT_EXCEPTION);
  ASSERT_TRUE(m);
  kvmi::InjectExceptionRequest sent;
  ASSERT_TRUE(kvmi::DecodePayload(kvmi::ByteView(m->payload), &sent).ok());
  EXPECT_EQ(sent.nr, 14);
  EXPECT_TRUE(sent.has_error);
  EXPECT_EQ(sent.address, 0xdead000u);

  grpc::ClientContext bad_ctx;
  inject.set_vector(40);
  grpc::Status bad = stub_->InjectException(&bad_ctx, inject, &injected);
  EXPECT_EQ(bad.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(bad.error_message(), HasSubstr("vector"));
}

TEST_F(ApiTest, SetRegistersNeedsAPendingEventAndGoesOutBeforeTheVerdict) {
  // (and, bound to an event by event_id, only while the vCPU waits with that one)
  ScriptedHost* host = Connect(13, "regs");
  kvmi::v1::SetRegistersRequest set;
  set.set_vm("regs");
  set.set_vcpu(0);
  set.mutable_registers()->set_rip(0x401001);
  set.mutable_registers()->set_rax(42);
  kvmi::v1::SetRegistersResponse ignored;
  {
    grpc::ClientContext ctx;
    grpc::Status idle = stub_->SetRegisters(&ctx, set, &ignored);
    EXPECT_EQ(idle.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
    EXPECT_THAT(idle.error_message(), HasSubstr("no event pending"));
  }
  {
    grpc::ClientContext ctx;
    kvmi::v1::SetRegistersRequest empty;
    empty.set_vm("regs");
    EXPECT_THAT(stub_->SetRegisters(&ctx, empty, &ignored).error_message(), HasSubstr("registers"));
  }
  EXPECT_FALSE(host->WaitForId(KVMI_SET_REGISTERS, std::chrono::milliseconds(100)));

  // A handler holds a breakpoint; meanwhile the registers are set through the unary RPC.
  grpc::ClientContext attach_ctx;
  attach_ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
  auto stream = stub_->Attach(&attach_ctx);
  kvmi::v1::AttachRequest claim;
  claim.mutable_claim()->set_handler_id("setter");
  claim.mutable_claim()->add_events(kvmi::v1::EVENT_TYPE_BREAKPOINT);
  claim.mutable_claim()->set_deadline_ms(5000);
  ASSERT_TRUE(stream->Write(claim));
  kvmi::v1::AttachResponse response;
  ASSERT_TRUE(stream->Read(&response));
  host->SendEvent(MakeTestEvent(KVMI_EVENT_BREAKPOINT, 0, 21));
  ASSERT_TRUE(stream->Read(&response));
  ASSERT_TRUE(response.has_event());
  {
    grpc::ClientContext ctx;
    ASSERT_TRUE(stub_->SetRegisters(&ctx, set, &ignored).ok());
  }
  auto sent = host->WaitForId(KVMI_SET_REGISTERS);
  ASSERT_TRUE(sent);
  kvmi::SetRegistersRequest regs;
  ASSERT_TRUE(kvmi::DecodePayload(kvmi::ByteView(sent->payload), &regs).ok());
  EXPECT_EQ(regs.vcpu, 0u);
  EXPECT_EQ(regs.regs.rip, 0x401001u);
  EXPECT_EQ(regs.regs.rax, 42u);
  // Bound to the event the handler holds: set; bound to another: refused, nothing sent.
  const uint64_t held = response.event().id();
  {
    grpc::ClientContext ctx;
    set.set_event_id(held);
    ASSERT_TRUE(stub_->SetRegisters(&ctx, set, &ignored).ok());
    ASSERT_TRUE(host->WaitForId(KVMI_SET_REGISTERS));
  }
  {
    grpc::ClientContext ctx;
    set.set_event_id(held + 1);
    grpc::Status other = stub_->SetRegisters(&ctx, set, &ignored);
    EXPECT_EQ(other.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
    EXPECT_THAT(other.error_message(),
                HasSubstr("does not wait for event " + std::to_string(held + 1) +
                          " (it waits for event " + std::to_string(held) + ")"));
  }
  kvmi::v1::AttachRequest verdict;
  verdict.mutable_verdict()->set_event_id(held);
  verdict.mutable_verdict()->set_action(kvmi::v1::ACTION_RETRY);
  ASSERT_TRUE(stream->Write(verdict));
  EXPECT_TRUE(host->WaitFor(
      [](const ReceivedMessage& m) { return m.hdr.id == KVMI_EVENT_REPLY && m.hdr.seq == 21; }));

  // The vCPU's next exit: a SetRegisters meant for the answered event (say, one that arrived
  // after a deadline let it go) is refused instead of changing the registers of this one.
  host->SendEvent(MakeTestEvent(KVMI_EVENT_BREAKPOINT, 0, 22));
  ASSERT_TRUE(stream->Read(&response));
  ASSERT_TRUE(response.has_event());
  ASSERT_NE(response.event().id(), held);
  {
    grpc::ClientContext ctx;
    set.set_event_id(held);
    grpc::Status late = stub_->SetRegisters(&ctx, set, &ignored);
    EXPECT_EQ(late.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
    EXPECT_THAT(late.error_message(), HasSubstr("nothing was set"));
  }
  EXPECT_FALSE(host->WaitForId(KVMI_SET_REGISTERS, std::chrono::milliseconds(100)));
  attach_ctx.TryCancel();
}

TEST_F(ApiTest, SubPageProtectionCommandsReachTheHostAndAreChecked) {
  ScriptedHost* host = Connect(14, "spp");
  grpc::ClientContext on_ctx;
  kvmi::v1::ControlSPPRequest on;
  on.set_vm("spp");
  kvmi::v1::ControlSPPResponse on_response;
  ASSERT_TRUE(stub_->ControlSPP(&on_ctx, on, &on_response).ok());
  auto control = host->WaitForId(KVMI_CONTROL_SPP);
  ASSERT_TRUE(control);
  kvmi::ControlSppRequest decoded_control;
  ASSERT_TRUE(kvmi::DecodePayload(kvmi::ByteView(control->payload), &decoded_control).ok());
  EXPECT_TRUE(decoded_control.enable);

  grpc::ClientContext set_ctx;
  kvmi::v1::SetPageWriteBitmapRequest set;
  set.set_vm("spp");
  auto* page = set.add_pages();
  page->set_gpa(0x5000);
  page->set_bitmap(0x0000ffff);
  kvmi::v1::SetPageWriteBitmapResponse set_response;
  ASSERT_TRUE(stub_->SetPageWriteBitmap(&set_ctx, set, &set_response).ok());
  auto sent = host->WaitForId(KVMI_SET_PAGE_WRITE_BITMAP);
  ASSERT_TRUE(sent);
  kvmi::SetPageWriteBitmapRequest decoded_set;
  ASSERT_TRUE(kvmi::DecodePayload(kvmi::ByteView(sent->payload), &decoded_set).ok());
  ASSERT_EQ(decoded_set.entries.size(), 1u);
  EXPECT_EQ(decoded_set.entries[0].gpa, 0x5000u);
  EXPECT_EQ(decoded_set.entries[0].bitmap, 0x0000ffffu);

  grpc::ClientContext get_ctx;
  kvmi::v1::GetPageWriteBitmapRequest get;
  get.set_vm("spp");
  get.add_gpas(0x5000);
  get.add_gpas(0x6000);
  kvmi::v1::GetPageWriteBitmapResponse bitmaps;
  ASSERT_TRUE(stub_->GetPageWriteBitmap(&get_ctx, get, &bitmaps).ok());
  ASSERT_EQ(bitmaps.pages_size(), 2);
  EXPECT_EQ(bitmaps.pages(1).gpa(), 0x6000u);
  EXPECT_EQ(bitmaps.pages(1).bitmap(), 2u);

  grpc::ClientContext empty_ctx;
  get.clear_gpas();
  EXPECT_EQ(stub_->GetPageWriteBitmap(&empty_ctx, get, &bitmaps).error_code(),
            grpc::StatusCode::INVALID_ARGUMENT);
  grpc::ClientContext many_ctx;
  for (int i = 0; i < 256; ++i) set.add_pages()->set_gpa(0x1000 * i);
  EXPECT_EQ(stub_->SetPageWriteBitmap(&many_ctx, set, &set_response).error_code(),
            grpc::StatusCode::INVALID_ARGUMENT);
  grpc::ClientContext missing_ctx;
  on.set_vm("nobody");
  EXPECT_EQ(stub_->ControlSPP(&missing_ctx, on, &on_response).error_code(),
            grpc::StatusCode::NOT_FOUND);
}

TEST_F(ApiTest, UnhookVmReleasesTheHooksAndClosesTheSession) {
  ScriptedHost* host = Connect(15, "leaving");
  grpc::ClientContext arm_ctx;
  kvmi::v1::ControlEventsRequest arm;
  arm.set_vm("leaving");
  arm.set_enable(true);
  arm.add_events(kvmi::v1::EVENT_TYPE_BREAKPOINT);
  kvmi::v1::ControlEventsResponse armed;
  ASSERT_TRUE(stub_->ControlEvents(&arm_ctx, arm, &armed).ok());
  TakeControls(host, KVMI_CONTROL_EVENTS, 2);

  grpc::ClientContext ctx;
  kvmi::v1::UnhookVMRequest unhook;
  unhook.set_vm("leaving");
  kvmi::v1::UnhookVMResponse response;
  ASSERT_TRUE(stub_->UnhookVM(&ctx, unhook, &response).ok());
  // What kvmid armed is disarmed before the session closes.
  EXPECT_THAT(TakeControls(host, KVMI_CONTROL_EVENTS, 2),
              ::testing::UnorderedElementsAre(Control{0, KVMI_EVENT_BREAKPOINT, false},
                                              Control{1, KVMI_EVENT_BREAKPOINT, false}));
  EXPECT_TRUE(host->WaitClosed());
  grpc::ClientContext again_ctx;
  EXPECT_EQ(stub_->UnhookVM(&again_ctx, unhook, &response).error_code(),
            grpc::StatusCode::UNAVAILABLE);
}

}  // namespace
}  // namespace kvmid
