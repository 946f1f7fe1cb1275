// The control RPCs that pause, restrict pages or arm events for a lease owner, through a real
// server.
#include "daemon/api/api_test_fixture.h"

namespace kvmid {
namespace {

using ::testing::HasSubstr;

TEST_F(ApiTest, PauseHoldsTheVcpuUntilResume) {
  ScriptedHost* host = Connect(8, "pausable");
  auto paused = std::async(std::launch::async, [&] {
    grpc::ClientContext ctx;
    kvmi::v1::PauseVCPURequest request;
    request.set_vm("pausable");
    request.set_vcpu(1);
    kvmi::v1::PauseVCPUResponse response;
    grpc::Status s = stub_->PauseVCPU(&ctx, request, &response);
    // The pause event's id comes with it (0: not paused).
    return s.ok() && response.paused_size() == 1 && response.event_ids_size() == 1
               ? response.event_ids(0)
               : 0;
  });
  ASSERT_TRUE(host->WaitForId(KVMI_PAUSE_VCPU));
  host->SendEvent(MakeTestEvent(KVMI_EVENT_PAUSE_VCPU, 1, 77));
  const uint64_t pause_event = paused.get();
  ASSERT_NE(pause_event, 0u);
  {
    // Registers bound to this pause reach it; bound to another event, nothing is sent.
    kvmi::v1::SetRegistersRequest set;
    set.set_vm("pausable");
    set.set_vcpu(1);
    set.mutable_registers()->set_rax(7);
    set.set_event_id(pause_event + 1);
    kvmi::v1::SetRegistersResponse ignored;
    grpc::ClientContext wrong_ctx;
    EXPECT_EQ(stub_->SetRegisters(&wrong_ctx, set, &ignored).error_code(),
              grpc::StatusCode::FAILED_PRECONDITION);
    EXPECT_FALSE(host->WaitForId(KVMI_SET_REGISTERS, std::chrono::milliseconds(100)));
    set.set_event_id(pause_event);
    grpc::ClientContext ctx;
    EXPECT_TRUE(stub_->SetRegisters(&ctx, set, &ignored).ok());
    EXPECT_TRUE(host->WaitForId(KVMI_SET_REGISTERS));
  }
  grpc::ClientContext get_ctx;
  kvmi::v1::GetVMRequest get;
  get.set_vm("pausable");
  kvmi::v1::VM vm;
  ASSERT_TRUE(stub_->GetVM(&get_ctx, get, &vm).ok());
  EXPECT_EQ(vm.state(), kvmi::v1::VM_STATE_HOOKED);  // one of two vCPUs paused
  EXPECT_FALSE(host->WaitFor([](const ReceivedMessage& m) { return m.hdr.id == KVMI_EVENT_REPLY; },
                             std::chrono::milliseconds(200)));
  grpc::ClientContext resume_ctx;
  kvmi::v1::ResumeVCPURequest resume;
  resume.set_vm("pausable");
  kvmi::v1::ResumeVCPUResponse resumed;
  ASSERT_TRUE(stub_->ResumeVCPU(&resume_ctx, resume, &resumed).ok());
  EXPECT_THAT(resumed.resumed(), ::testing::ElementsAre(1u));
  EXPECT_TRUE(host->WaitFor(
      [](const ReceivedMessage& m) { return m.hdr.id == KVMI_EVENT_REPLY && m.hdr.seq == 77; }));
  grpc::ClientContext again_ctx;
  resume.set_vcpu(1);
  EXPECT_EQ(stub_->ResumeVCPU(&again_ctx, resume, &resumed).error_code(),
            grpc::StatusCode::FAILED_PRECONDITION);
}

uint32_t RestrictedPages(kvmi::v1::Introspection::Stub* stub, const std::string& vm) {
  grpc::ClientContext ctx;
  kvmi::v1::GetVMRequest get;
  get.set_vm(vm);
  kvmi::v1::VM out;
  if (!stub->GetVM(&ctx, get, &out).ok()) return UINT32_MAX;
  for (const auto& lease : out.leases()) {
    if (lease.owner() == "api") return lease.restricted_pages();
  }
  return 0;
}

TEST_F(ApiTest, PageAccessIsBatchedReportedPerPageAndRolledBackOnRequest) {
  ScriptedHost* host = Connect(14, "pages");
  host->set_responder(RichResponder());
  // 600 pages read-only: three SET_PAGE_ACCESS messages of at most 255 entries.
  kvmi::v1::SetPageAccessRequest set;
  set.set_vm("pages");
  for (uint64_t i = 0; i < 600; ++i) {
    kvmi::v1::PageRights* page = set.add_pages();
    page->set_gpa(0x100000 + i * 4096);
    page->set_access("r");
  }
  grpc::ClientContext set_ctx;
  kvmi::v1::SetPageAccessResponse result;
  ASSERT_TRUE(stub_->SetPageAccess(&set_ctx, set, &result).ok());
  ASSERT_EQ(result.results_size(), 600);
  for (const auto& r : result.results()) EXPECT_EQ(r.error(), "") << r.gpa();
  EXPECT_FALSE(result.rolled_back());
  for (int i = 0; i < 3; ++i) EXPECT_TRUE(host->WaitForId(KVMI_SET_PAGE_ACCESS));
  EXPECT_EQ(RestrictedPages(stub_.get(), "pages"), 600u);

  grpc::ClientContext get_ctx;
  kvmi::v1::GetPageAccessRequest get;
  get.set_vm("pages");
  for (uint64_t i = 0; i < 520; ++i) get.add_gpas(0x100000 + i * 4096);  // two messages
  kvmi::v1::GetPageAccessResponse rights;
  ASSERT_TRUE(stub_->GetPageAccess(&get_ctx, get, &rights).ok());
  ASSERT_EQ(rights.pages_size(), 520);
  EXPECT_EQ(rights.pages(519).access(), "rx");

  // All or nothing: 300 more pages, the last of which the host refuses. The first message
  // (255 pages) was applied, so it is undone; the call leaves nothing behind.
  kvmi::v1::SetPageAccessRequest risky;
  risky.set_vm("pages");
  risky.set_all_or_nothing(true);
  for (uint64_t i = 0; i < 299; ++i) {
    kvmi::v1::PageRights* page = risky.add_pages();
    page->set_gpa(0x800000 + i * 4096);
    page->set_access("rx");
  }
  risky.add_pages()->set_gpa(0xbad000);
  risky.mutable_pages(299)->set_access("rx");
  grpc::ClientContext risky_ctx;
  ASSERT_TRUE(stub_->SetPageAccess(&risky_ctx, risky, &result).ok());
  EXPECT_TRUE(result.rolled_back());
  EXPECT_EQ(result.results(299).error(), "KVM_EINVAL");
  EXPECT_EQ(result.results(0).error(), "");
  auto undo = host->WaitFor([](const ReceivedMessage& m) {
    kvmi::SetPageAccessRequest r;
    return m.hdr.id == KVMI_SET_PAGE_ACCESS &&
           kvmi::DecodePayload(kvmi::ByteView(m.payload), &r).ok() && r.entries.size() == 255 &&
           r.entries[0].gpa == 0x800000 && r.entries[0].access == KVMI_PAGE_ACCESS_RWX;
  });
  EXPECT_TRUE(undo) << "the applied half was restored";
  EXPECT_EQ(RestrictedPages(stub_.get(), "pages"), 600u);

  // Without all_or_nothing the good pages stay; the refused message's pages report the error.
  risky.set_all_or_nothing(false);
  grpc::ClientContext partial_ctx;
  ASSERT_TRUE(stub_->SetPageAccess(&partial_ctx, risky, &result).ok());
  EXPECT_FALSE(result.rolled_back());
  EXPECT_EQ(result.results(0).error(), "");
  EXPECT_EQ(result.results(299).error(), "KVM_EINVAL");
  EXPECT_EQ(RestrictedPages(stub_.get(), "pages"), 600u + 255u);

  grpc::ClientContext bad_ctx;
  set.mutable_pages(3)->set_access("rq");
  grpc::Status bad = stub_->SetPageAccess(&bad_ctx, set, &result);
  EXPECT_EQ(bad.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(bad.error_message(), HasSubstr("pages[3].access"));
}

TEST_F(ApiTest, ControlEventsArmsOneVcpuOrEveryVcpuAsTheApisLease) {
  ScriptedHost* host = Connect(12, "controlled");
  using ::testing::UnorderedElementsAre;
  // CR3 writes on vCPU 1 only.
  grpc::ClientContext one_ctx;
  kvmi::v1::ControlEventsRequest one;
  one.set_vm("controlled");
  one.set_vcpu(1);
  one.set_enable(true);
  one.add_events(kvmi::v1::EVENT_TYPE_CR);
  one.add_crs(3);
  kvmi::v1::ControlEventsResponse response;
  ASSERT_TRUE(stub_->ControlEvents(&one_ctx, one, &response).ok());
  EXPECT_EQ(response.lease().owner(), "api");
  ASSERT_EQ(response.lease().vcpu_only_size(), 1);
  EXPECT_EQ(response.lease().vcpu_only(0).vcpu(), 1u);
  EXPECT_THAT(response.arm_errors(), ::testing::IsEmpty());
  // Acknowledged before the answer: the commands are already at the host, for vCPU 1 alone.
  EXPECT_THAT(TakeControls(host, KVMI_CONTROL_EVENTS, 1),
              UnorderedElementsAre(Control{1, KVMI_EVENT_CR, true}));
  EXPECT_THAT(TakeControls(host, KVMI_CONTROL_CR, 1), UnorderedElementsAre(Control{1, 3, true}));
  EXPECT_FALSE(host->WaitForId(KVMI_CONTROL_EVENTS, std::chrono::milliseconds(100)));

  // LSTAR writes and UNHOOK on every vCPU.
  grpc::ClientContext all_ctx;
  kvmi::v1::ControlEventsRequest all;
  all.set_vm("controlled");
  all.set_enable(true);
  all.add_events(kvmi::v1::EVENT_TYPE_MSR);
  all.add_events(kvmi::v1::EVENT_TYPE_UNHOOK);
  all.add_msrs(0xC0000082);
  ASSERT_TRUE(stub_->ControlEvents(&all_ctx, all, &response).ok());
  EXPECT_THAT(
      TakeControls(host, KVMI_CONTROL_EVENTS, 2),
      UnorderedElementsAre(Control{0, KVMI_EVENT_MSR, true}, Control{1, KVMI_EVENT_MSR, true}));
  EXPECT_THAT(TakeControls(host, KVMI_CONTROL_MSR, 2),
              UnorderedElementsAre(Control{0, 0xC0000082, true}, Control{1, 0xC0000082, true}));
  EXPECT_THAT(TakeControls(host, KVMI_CONTROL_VM_EVENTS, 1),
              UnorderedElementsAre(Control{0, KVMI_EVENT_UNHOOK, true}));

  grpc::ClientContext get_ctx;
  kvmi::v1::GetVMRequest get;
  get.set_vm("controlled");
  kvmi::v1::VM vm;
  ASSERT_TRUE(stub_->GetVM(&get_ctx, get, &vm).ok());
  const kvmi::v1::Lease* api_lease = nullptr;
  for (const auto& lease : vm.leases()) {
    if (lease.owner() == "api") api_lease = &lease;
  }
  ASSERT_NE(api_lease, nullptr);
  EXPECT_THAT(api_lease->vcpu_events(), ::testing::ElementsAre(kvmi::v1::EVENT_TYPE_MSR));
  EXPECT_THAT(api_lease->vm_events(), ::testing::ElementsAre(kvmi::v1::EVENT_TYPE_UNHOOK));

  // Off for every vCPU: vCPU 1's own CR selection goes too.
  grpc::ClientContext off_ctx;
  kvmi::v1::ControlEventsRequest off;
  off.set_vm("controlled");
  off.set_enable(false);
  off.add_events(kvmi::v1::EVENT_TYPE_CR);
  off.add_crs(3);
  ASSERT_TRUE(stub_->ControlEvents(&off_ctx, off, &response).ok());
  EXPECT_EQ(response.lease().vcpu_only_size(), 0);
  EXPECT_THAT(TakeControls(host, KVMI_CONTROL_EVENTS, 1),
              UnorderedElementsAre(Control{1, KVMI_EVENT_CR, false}));
  EXPECT_THAT(TakeControls(host, KVMI_CONTROL_CR, 1), UnorderedElementsAre(Control{1, 3, false}));

  // Errors name the field; nothing reaches the guest.
  auto refused = [&](const kvmi::v1::ControlEventsRequest& request) {
    grpc::ClientContext ctx;
    kvmi::v1::ControlEventsResponse ignored;
    return stub_->ControlEvents(&ctx, request, &ignored);
  };
  kvmi::v1::ControlEventsRequest bad = one;
  bad.set_vcpu(5);
  EXPECT_EQ(refused(bad).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  bad = one;
  bad.add_crs(2);
  EXPECT_THAT(refused(bad).error_message(), HasSubstr("crs[1]"));
  bad = one;
  bad.add_events(kvmi::v1::EVENT_TYPE_UNHOOK);
  EXPECT_THAT(refused(bad).error_message(), HasSubstr("VM event"));
  bad = all;
  bad.add_events(kvmi::v1::EVENT_TYPE_PAUSE_VCPU);
  EXPECT_EQ(refused(bad).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  bad = all;
  bad.add_msrs(0x40000000);
  EXPECT_THAT(refused(bad).error_message(), HasSubstr("msrs[1]"));
  bad.Clear();
  bad.set_vm("controlled");
  EXPECT_EQ(refused(bad).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  bad = all;
  bad.set_vm("nobody");
  EXPECT_EQ(refused(bad).error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_FALSE(host->WaitForId(KVMI_CONTROL_EVENTS, std::chrono::milliseconds(100)));
}

}  // namespace
}  // namespace kvmid
