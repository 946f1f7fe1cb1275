// The gRPC surface over a real UNIX socket, with real guests behind the daemon (scripted KVMI
// hosts through QEMU's handshake): every RPC's success and main error cases, reflection and
// health, and a slow StreamEvents reader that gets drop notices while the guest runs on.
#include <gmock/gmock.h>
#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>
#include <stdlib.h>
#include <unistd.h>

#include <future>
#include <thread>

#include "daemon/api/introspection_service.h"
#include "daemon/testing/scripted_host.h"
#include "daemon/testing/wait.h"
#include "kernel/abi/protocol.h"
#include "src/proto/grpc/reflection/v1alpha/reflection.grpc.pb.h"

namespace kvmid {
namespace {

using testing::ConnectAsQemu;
using ::testing::HasSubstr;
using testing::MakeTestEvent;
using testing::ReceivedMessage;
using testing::ScriptedHost;

using testing::WaitUntil;

class ApiTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char dir_template[] = "/tmp/kvmid-api-XXXXXX";
    dir_ = mkdtemp(dir_template);
    DaemonConfig config;
    config.unix_socket = dir_ + "/kvmi.sock";
    daemon_ = std::make_unique<Daemon>(config);
    ASSERT_EQ(daemon_->Start(), "");
    daemon_->pipeline().SetGuestLabels("web-1", {{"tier", "prod"}});
    api_ = std::make_unique<ApiServer>(daemon_.get(), /*history=*/4);
    security::ApiListenOptions listen;
    listen.unix_socket = dir_ + "/api.sock";
    listen.tcp = "127.0.0.1:0";
    listen.tcp_insecure_plaintext = true;
    ASSERT_EQ(api_->Start(listen), "");
    channel_ =
        grpc::CreateChannel("unix:" + dir_ + "/api.sock", grpc::InsecureChannelCredentials());
    stub_ = kvmi::v1::Introspection::NewStub(channel_);
  }
  void TearDown() override {
    hosts_.clear();
    api_.reset();
    daemon_.reset();
    ::rmdir(dir_.c_str());
  }

  ScriptedHost* Connect(uint8_t id, const std::string& name) {
    auto host = std::make_unique<ScriptedHost>();
    kvmi::QemuHello hello;
    hello.uuid[15] = id;
    hello.name = name;
    kvmi::IntrospectorHello answer;
    kvmi::UniqueFd fd = ConnectAsQemu(dir_ + "/kvmi.sock", hello, &answer);
    if (!fd) return nullptr;
    host->Adopt(std::move(fd));
    hosts_.push_back(std::move(host));
    EXPECT_TRUE(WaitUntil([&] {
      auto g = daemon_->registry().Lookup(name);
      return g && g->state() == GuestState::kHooked;
    }));
    return hosts_.back().get();
  }

  std::string dir_;
  std::unique_ptr<Daemon> daemon_;
  std::unique_ptr<ApiServer> api_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<kvmi::v1::Introspection::Stub> stub_;
  std::vector<std::unique_ptr<ScriptedHost>> hosts_;
};

TEST_F(ApiTest, ListAndGetVmsShowIdentityStateAndLeases) {
  ASSERT_NE(Connect(1, "web-1"), nullptr);
  ASSERT_NE(Connect(2, "db-1"), nullptr);
  grpc::ClientContext list_ctx;
  kvmi::v1::ListVMsResponse list;
  ASSERT_TRUE(stub_->ListVMs(&list_ctx, {}, &list).ok());
  ASSERT_EQ(list.vms_size(), 2);

  grpc::ClientContext get_ctx;
  kvmi::v1::GetVMRequest get;
  get.set_vm("web-1");
  kvmi::v1::VM vm;
  ASSERT_TRUE(stub_->GetVM(&get_ctx, get, &vm).ok());
  EXPECT_EQ(vm.name(), "web-1");
  EXPECT_EQ(vm.uuid(), "00000000-0000-0000-0000-000000000001");
  EXPECT_EQ(vm.state(), kvmi::v1::VM_STATE_HOOKED);
  EXPECT_EQ(vm.vcpu_count(), 2u);
  EXPECT_EQ(vm.kvmi_version(), 1u);
  EXPECT_EQ(vm.allowed_commands_size(), 26);
  EXPECT_EQ(vm.allowed_events_size(), 12);
  EXPECT_EQ(vm.labels().at("tier"), "prod");
  ASSERT_GE(vm.leases_size(), 1);
  EXPECT_EQ(vm.leases(0).owner(), "daemon");

  // By UUID too; unknown and empty names are errors with a reason.
  grpc::ClientContext by_uuid_ctx;
  get.set_vm("00000000-0000-0000-0000-000000000002");
  ASSERT_TRUE(stub_->GetVM(&by_uuid_ctx, get, &vm).ok());
  EXPECT_EQ(vm.name(), "db-1");
  grpc::ClientContext missing_ctx;
  get.set_vm("nope");
  grpc::Status missing = stub_->GetVM(&missing_ctx, get, &vm);
  EXPECT_EQ(missing.error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_THAT(missing.error_message(), HasSubstr("nope"));
  grpc::ClientContext empty_ctx;
  get.set_vm("");
  EXPECT_EQ(stub_->GetVM(&empty_ctx, get, &vm).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
}

TEST_F(ApiTest, PoliciesAreAppliedListedWithCountersAndDeleted) {
  ScriptedHost* host = Connect(3, "web-1");
  ASSERT_NE(host, nullptr);
  kvmi::v1::ApplyPolicyRequest apply;
  apply.mutable_policy()->set_name("wp");
  apply.mutable_policy()->mutable_forbid_cr_bits_clear()->set_cr(0);
  apply.mutable_policy()->mutable_forbid_cr_bits_clear()->set_bits(1u << 16);
  grpc::ClientContext apply_ctx;
  kvmi::v1::ApplyPolicyResponse applied;
  ASSERT_TRUE(stub_->ApplyPolicy(&apply_ctx, apply, &applied).ok());
  EXPECT_FALSE(applied.replaced());
  // Armed on the guest that is already there.
  EXPECT_TRUE(host->WaitFor([](const ReceivedMessage& m) {
    kvmi::ControlCrRequest r;
    return m.hdr.id == KVMI_CONTROL_CR && kvmi::DecodePayload(kvmi::ByteView(m.payload), &r).ok() &&
           r.cr == 0 && r.enable;
  }));
  kvmi::Event event = MakeTestEvent(KVMI_EVENT_CR, 0, 1);
  event.specific.cr.cr = 0;
  event.specific.cr.old_value = 1u << 16;
  host->SendEvent(event);
  ASSERT_TRUE(host->WaitForId(KVMI_EVENT_REPLY));

  grpc::ClientContext list_ctx;
  kvmi::v1::ListPoliciesResponse list;
  ASSERT_TRUE(stub_->ListPolicies(&list_ctx, {}, &list).ok());
  ASSERT_EQ(list.policies_size(), 1);
  EXPECT_EQ(list.policies(0).policy().forbid_cr_bits_clear().bits(), 1u << 16);
  EXPECT_EQ(list.policies(0).counters().hits(), 1u);
  EXPECT_EQ(list.policies(0).counters().enforced(), 1u);

  grpc::ClientContext again_ctx;
  ASSERT_TRUE(stub_->ApplyPolicy(&again_ctx, apply, &applied).ok());
  EXPECT_TRUE(applied.replaced());

  kvmi::v1::ApplyPolicyRequest bad;
  bad.mutable_policy()->set_name("bad");
  bad.mutable_policy()->mutable_protect_pages()->set_allowed("rq");
  grpc::ClientContext bad_ctx;
  grpc::Status s = stub_->ApplyPolicy(&bad_ctx, bad, &applied);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(s.error_message(), HasSubstr("policy.protect_pages.allowed"));

  kvmi::v1::DeletePolicyRequest del;
  del.set_name("wp");
  grpc::ClientContext del_ctx;
  kvmi::v1::DeletePolicyResponse deleted;
  ASSERT_TRUE(stub_->DeletePolicy(&del_ctx, del, &deleted).ok());
  EXPECT_TRUE(host->WaitFor([](const ReceivedMessage& m) {  // disarmed
    kvmi::ControlCrRequest r;
    return m.hdr.id == KVMI_CONTROL_CR && kvmi::DecodePayload(kvmi::ByteView(m.payload), &r).ok() &&
           r.cr == 0 && !r.enable;
  }));
  grpc::ClientContext del_again_ctx;
  EXPECT_EQ(stub_->DeletePolicy(&del_again_ctx, del, &deleted).error_code(),
            grpc::StatusCode::NOT_FOUND);
}

TEST_F(ApiTest, StreamEventsFiltersAndCarriesVerdicts) {
  ScriptedHost* web = Connect(4, "web-1");
  ScriptedHost* db = Connect(5, "db-1");
  grpc::ClientContext ctx;
  kvmi::v1::StreamEventsRequest request;
  request.mutable_allow()->add_vms("web-1");
  request.mutable_allow()->add_events(kvmi::v1::EVENT_MSR);
  request.set_include_registers(true);
  auto reader = stub_->StreamEvents(&ctx, request);
  // The stream is registered once the server runs the call: wait for its observer (the event
  // history is the first).
  ASSERT_TRUE(WaitUntil([&] { return daemon_->pipeline().observer_count() == 2; }));
  kvmi::Event other = MakeTestEvent(KVMI_EVENT_MSR, 0, 1);  // db-1: filtered out
  db->SendEvent(other);
  kvmi::Event wanted = MakeTestEvent(KVMI_EVENT_MSR, 1, 1);
  wanted.specific.msr.msr = 0xC0000082;
  wanted.specific.msr.new_value = 0x1234;
  wanted.common.arch.regs.rip = 0xffffffff81000010;
  web->SendEvent(wanted);
  kvmi::v1::EventMessage message;
  ASSERT_TRUE(reader->Read(&message));
  ASSERT_TRUE(message.has_event());
  const kvmi::v1::Event& e = message.event();
  EXPECT_EQ(e.vm_name(), "web-1");
  EXPECT_EQ(e.vcpu(), 1u);
  EXPECT_EQ(e.type(), kvmi::v1::EVENT_MSR);
  EXPECT_EQ(e.msr().msr(), 0xC0000082u);
  EXPECT_EQ(e.msr().new_value(), 0x1234u);
  EXPECT_EQ(e.registers().rip(), 0xffffffff81000010u);
  EXPECT_EQ(e.action(), kvmi::v1::ACTION_CONTINUE);
  EXPECT_EQ(e.decided_by(), "default");
  ctx.TryCancel();
  while (reader->Read(&message)) {
  }
}

TEST_F(ApiTest, StreamEventsRejectsBadFilters) {
  grpc::ClientContext ctx;
  kvmi::v1::StreamEventsRequest request;
  request.mutable_allow()->set_access("z");
  auto reader = stub_->StreamEvents(&ctx, request);
  kvmi::v1::EventMessage message;
  EXPECT_FALSE(reader->Read(&message));
  grpc::Status s = reader->Finish();
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(s.error_message(), HasSubstr("allow.access"));
}

TEST_F(ApiTest, ASlowReaderGetsDropNoticesWhileTheGuestRunsAtFullSpeed) {
  ScriptedHost* host = Connect(6, "busy");
  // A reader with a small HTTP/2 window (no BDP growth), as over a slow link: the server's
  // writes stall soon, and the stream's own bounded queue has to overflow.
  grpc::ChannelArguments args;
  args.SetInt(GRPC_ARG_HTTP2_BDP_PROBE, 0);
  args.SetInt(GRPC_ARG_HTTP2_STREAM_LOOKAHEAD_BYTES, 8192);
  auto slow = kvmi::v1::Introspection::NewStub(grpc::CreateCustomChannel(
      "unix:" + dir_ + "/api.sock", grpc::InsecureChannelCredentials(), args));
  grpc::ClientContext ctx;
  kvmi::v1::StreamEventsRequest request;
  request.set_max_queue(4);
  request.set_include_registers(true);  // ~250 bytes an event
  auto reader = slow->StreamEvents(&ctx, request);
  ASSERT_TRUE(WaitUntil([&] { return daemon_->pipeline().observer_count() == 2; }));
  // Events answered at once by the daemon while nobody reads the stream: more than HTTP/2's
  // window can hold, so the stream's own queue overflows.
  constexpr uint32_t kEvents = 3000;
  for (uint32_t seq = 1; seq <= kEvents; ++seq) {
    host->SendEvent(MakeTestEvent(KVMI_EVENT_HYPERCALL, 0, seq));
    ASSERT_TRUE(host->WaitFor([seq](const ReceivedMessage& m) {
      return m.hdr.id == KVMI_EVENT_REPLY && m.hdr.seq == seq;
    })) << "the guest waited on the slow reader at event "
        << seq;
  }
  uint64_t events = 0, dropped = 0;
  kvmi::v1::EventMessage message;
  auto deadline = Clock::now() + std::chrono::seconds(5);
  while (events + dropped < kEvents && Clock::now() < deadline && reader->Read(&message)) {
    if (message.has_event()) ++events;
    if (message.has_dropped()) dropped = message.dropped().dropped_total();
  }
  EXPECT_EQ(events + dropped, kEvents);  // nothing lost silently
  EXPECT_GT(dropped, 0u);
  ctx.TryCancel();
  while (reader->Read(&message)) {
  }
}

TEST_F(ApiTest, ReflectionAndHealthAreOn) {
  auto reflection = grpc::reflection::v1alpha::ServerReflection::NewStub(channel_);
  grpc::ClientContext ctx;
  auto stream = reflection->ServerReflectionInfo(&ctx);
  grpc::reflection::v1alpha::ServerReflectionRequest request;
  request.set_list_services("");
  ASSERT_TRUE(stream->Write(request));
  grpc::reflection::v1alpha::ServerReflectionResponse response;
  ASSERT_TRUE(stream->Read(&response));
  std::vector<std::string> services;
  for (const auto& s : response.list_services_response().service()) services.push_back(s.name());
  EXPECT_THAT(services,
              ::testing::IsSupersetOf({"kvmi.v1.Introspection", "grpc.health.v1.Health"}));
  stream->WritesDone();
  stream->Finish();

  // grpc.health.v1.Health/Check with an empty request: SERVING is field 1 = 1 (bytes 08 01).
  grpc::GenericStub generic(channel_);
  grpc::ClientContext health_ctx;
  grpc::CompletionQueue cq;
  grpc::ByteBuffer empty_request;
  grpc::Slice nothing("");
  empty_request = grpc::ByteBuffer(&nothing, 1);
  grpc::ByteBuffer reply;
  grpc::Status status;
  std::mutex mutex;
  std::condition_variable cv;
  bool done = false;
  generic.UnaryCall(&health_ctx, "/grpc.health.v1.Health/Check", grpc::StubOptions(),
                    &empty_request, &reply, [&](grpc::Status s) {
                      std::lock_guard<std::mutex> lock(mutex);
                      status = s;
                      done = true;
                      cv.notify_all();
                    });
  std::unique_lock<std::mutex> lock(mutex);
  ASSERT_TRUE(cv.wait_for(lock, std::chrono::seconds(5), [&] { return done; }));
  ASSERT_TRUE(status.ok()) << status.error_message();
  std::vector<grpc::Slice> slices;
  ASSERT_TRUE(reply.Dump(&slices).ok());
  std::string bytes;
  for (const auto& s : slices)
    bytes += std::string(reinterpret_cast<const char*>(s.begin()), s.size());
  EXPECT_EQ(bytes, std::string("\x08\x01", 2));
}

TEST_F(ApiTest, TheApiIsAlsoServedOverTcp) {
  ASSERT_GT(api_->tcp_port(), 0);
  auto tcp = kvmi::v1::Introspection::NewStub(grpc::CreateChannel(
      "127.0.0.1:" + std::to_string(api_->tcp_port()), grpc::InsecureChannelCredentials()));
  grpc::ClientContext ctx;
  kvmi::v1::ListVMsResponse list;
  EXPECT_TRUE(tcp->ListVMs(&ctx, {}, &list).ok());
}

// A host that answers GET_REGISTERS with recognisable values and fails reads at 0xbad000.
ScriptedHost::Responder RichResponder() {
  auto defaults = std::make_shared<ScriptedHost>();
  return [defaults](const ReceivedMessage& m) {
    std::vector<uint8_t> out;
    if (m.hdr.id == KVMI_GET_REGISTERS) {
      kvmi::GetRegistersRequest request;
      kvmi::DecodePayload(kvmi::ByteView(m.payload), &request);
      kvmi::RegistersReply reply;
      reply.mode = 8;
      reply.regs.rip = 0xffffffff81001234;
      reply.sregs.cr3 = 0x1000 * (request.vcpu + 1);
      for (uint32_t index : request.msrs)
        reply.msrs.push_back(kvm_msr_entry{index, 0, index + 1ull});
      std::vector<uint8_t> data;
      kvmi::ByteWriter w(&data);
      kvmi::EncodeReplyData(reply, w);
      kvmi::EncodeReply(m.hdr.id, m.hdr.seq, 0, kvmi::ByteView(data), &out);
      return std::optional<std::vector<uint8_t>>(out);
    }
    if (m.hdr.id == KVMI_GET_CPUID || m.hdr.id == KVMI_GET_XSAVE ||
        m.hdr.id == KVMI_GET_MTRR_TYPE) {
      std::vector<uint8_t> data;
      kvmi::ByteWriter w(&data);
      if (m.hdr.id == KVMI_GET_CPUID) {
        kvmi::GetCpuidRequest request;
        kvmi::DecodePayload(kvmi::ByteView(m.payload), &request);
        kvmi::EncodeReplyData(
            kvmi::CpuidReply{request.function, 0x756e6547, 0x6c65746e, 0x49656e69}, w);
      } else if (m.hdr.id == KVMI_GET_XSAVE) {
        kvmi::EncodeReplyData(kvmi::XsaveReply{std::vector<uint8_t>(4096, 0x5a)}, w);
      } else {
        kvmi::EncodeReplyData(kvmi::MtrrTypeReply{6}, w);
      }
      kvmi::EncodeReply(m.hdr.id, m.hdr.seq, 0, kvmi::ByteView(data), &out);
      return std::optional<std::vector<uint8_t>>(out);
    }
    if (m.hdr.id == KVMI_GET_PAGE_ACCESS) {
      kvmi::GetPageAccessRequest request;
      kvmi::DecodePayload(kvmi::ByteView(m.payload), &request);
      std::vector<uint8_t> data(request.gpas.size(), KVMI_PAGE_ACCESS_R | KVMI_PAGE_ACCESS_X);
      kvmi::EncodeReply(m.hdr.id, m.hdr.seq, 0, kvmi::ByteView(data), &out);
      return std::optional<std::vector<uint8_t>>(out);
    }
    if (m.hdr.id == KVMI_SET_PAGE_ACCESS) {
      kvmi::SetPageAccessRequest request;
      kvmi::DecodePayload(kvmi::ByteView(m.payload), &request);
      for (const kvmi::PageAccess& e : request.entries) {
        if (e.gpa == 0xbad000) {  // the v6 kernel reports the (last) failing entry's error
          kvmi::EncodeReply(m.hdr.id, m.hdr.seq, -KVM_EINVAL, {}, &out);
          return std::optional<std::vector<uint8_t>>(out);
        }
      }
    }
    if (m.hdr.id == KVMI_READ_PHYSICAL) {
      kvmi::ReadPhysicalRequest request;
      kvmi::DecodePayload(kvmi::ByteView(m.payload), &request);
      if (request.gpa == 0xbad000) {
        kvmi::EncodeReply(m.hdr.id, m.hdr.seq, -KVM_EINVAL, {}, &out);
        return std::optional<std::vector<uint8_t>>(out);
      }
    }
    return std::optional<std::vector<uint8_t>>(defaults->DefaultReply(m));
  };
}

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

  grpc::ClientContext missing_ctx;
  read.set_vm("nope");
  read.set_size(1);
  EXPECT_EQ(stub_->ReadPhysical(&missing_ctx, read, &data).error_code(),
            grpc::StatusCode::NOT_FOUND);
}

TEST_F(ApiTest, PauseHoldsTheVcpuUntilResume) {
  ScriptedHost* host = Connect(8, "pausable");
  auto paused = std::async(std::launch::async, [&] {
    grpc::ClientContext ctx;
    kvmi::v1::PauseVCPURequest request;
    request.set_vm("pausable");
    request.set_vcpu(1);
    kvmi::v1::PauseVCPUResponse response;
    grpc::Status s = stub_->PauseVCPU(&ctx, request, &response);
    return s.ok() && response.paused_size() == 1;
  });
  ASSERT_TRUE(host->WaitForId(KVMI_PAUSE_VCPU));
  host->SendEvent(MakeTestEvent(KVMI_EVENT_PAUSE_VCPU, 1, 77));
  EXPECT_TRUE(paused.get());
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

TEST_F(ApiTest, AttachedHandlerAnswersEventsAndItsArmingGoesWithTheStream) {
  ScriptedHost* host = Connect(9, "attached");
  grpc::ClientContext ctx;
  // Attach streams carry a deadline: a hang becomes a failure, not a test timeout.
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
  auto stream = stub_->Attach(&ctx);
  kvmi::v1::AttachRequest claim;
  claim.mutable_claim()->set_handler_id("debugger");
  claim.mutable_claim()->add_events(kvmi::v1::EVENT_BREAKPOINT);
  claim.mutable_claim()->add_arm_events(kvmi::v1::EVENT_BREAKPOINT);
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
  EXPECT_EQ(response.event().type(), kvmi::v1::EVENT_BREAKPOINT);
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
  claim.mutable_claim()->add_events(kvmi::v1::EVENT_UNHOOK);  // never answered: not claimable
  ASSERT_TRUE(stream->Write(claim));
  kvmi::v1::AttachResponse response;
  EXPECT_FALSE(stream->Read(&response));
  grpc::Status s = stream->Finish();
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(s.error_message(), HasSubstr("claim.events[0]"));
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

TEST_F(ApiTest, WatchVmsSendsTheCurrentGuestsThenEveryChange) {
  ASSERT_NE(Connect(11, "first"), nullptr);
  grpc::ClientContext ctx;
  auto reader = stub_->WatchVMs(&ctx, {});
  kvmi::v1::VMChange change;
  ASSERT_TRUE(reader->Read(&change));
  EXPECT_EQ(change.kind(), kvmi::v1::VMChange::KIND_EXISTING);
  EXPECT_EQ(change.vm().name(), "first");
  ScriptedHost* second = Connect(12, "second");
  ASSERT_NE(second, nullptr);
  auto next_state_of = [&](const std::string& name, kvmi::v1::VMState state) {
    while (reader->Read(&change)) {
      if (change.kind() == kvmi::v1::VMChange::KIND_CHANGED && change.vm().name() == name &&
          change.vm().state() == state) {
        return true;
      }
    }
    return false;
  };
  EXPECT_TRUE(next_state_of("second", kvmi::v1::VM_STATE_HOOKED));
  second->Close();
  EXPECT_TRUE(next_state_of("second", kvmi::v1::VM_STATE_GONE));
  ctx.TryCancel();
  while (reader->Read(&change)) {
  }
}

TEST_F(ApiTest, AReconnectingReaderResumesAfterItsCursorAndIsToldWhatIsGone) {
  ScriptedHost* host = Connect(13, "resumable");
  // Six events while nobody streams; kvmid remembers the last four (ids 3..6).
  for (uint32_t seq = 1; seq <= 6; ++seq) {
    host->SendEvent(MakeTestEvent(KVMI_EVENT_XSETBV, 0, seq));
    ASSERT_TRUE(host->WaitFor([seq](const ReceivedMessage& m) {
      return m.hdr.id == KVMI_EVENT_REPLY && m.hdr.seq == seq;
    }));
  }
  // Observers run just after each reply is written: wait for the last one to be remembered.
  ASSERT_TRUE(WaitUntil([&] { return api_->history().latest_id() == 6; }));
  grpc::ClientContext ctx;
  kvmi::v1::StreamEventsRequest request;
  request.set_resume_after(1);  // the reader had seen event 1
  auto reader = stub_->StreamEvents(&ctx, request);
  kvmi::v1::EventMessage message;
  ASSERT_TRUE(reader->Read(&message));
  ASSERT_TRUE(message.has_dropped());
  EXPECT_EQ(message.dropped().dropped(), 1u);  // event 2 is gone
  std::vector<uint64_t> ids;
  for (int i = 0; i < 4 && reader->Read(&message); ++i) {
    ASSERT_TRUE(message.has_event());
    ids.push_back(message.event().id());
  }
  EXPECT_THAT(ids, ::testing::ElementsAre(3u, 4u, 5u, 6u));
  host->SendEvent(MakeTestEvent(KVMI_EVENT_XSETBV, 0, 7));  // then live, without duplicates
  ASSERT_TRUE(reader->Read(&message));
  ASSERT_TRUE(message.has_event());
  EXPECT_EQ(message.event().id(), 7u);
  ctx.TryCancel();
  while (reader->Read(&message)) {
  }
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

// CONTROL_* commands of one kind the host received, as (vcpu, id, enable) triples.
struct Control {
  uint16_t vcpu;
  uint32_t what;
  bool enable;
  bool operator==(const Control& o) const {
    return vcpu == o.vcpu && what == o.what && enable == o.enable;
  }
};
std::ostream& operator<<(std::ostream& os, const Control& c) {
  return os << "{vcpu " << c.vcpu << ", " << c.what << (c.enable ? " on}" : " off}");
}
std::vector<Control> TakeControls(ScriptedHost* host, uint16_t id, size_t count) {
  std::vector<Control> out;
  while (out.size() < count) {
    auto m = host->WaitForId(id);
    if (!m) break;
    if (id == KVMI_CONTROL_EVENTS) {
      kvmi::ControlEventsRequest r;
      EXPECT_TRUE(kvmi::DecodePayload(kvmi::ByteView(m->payload), &r).ok());
      out.push_back({r.vcpu, r.event_id, r.enable});
    } else if (id == KVMI_CONTROL_CR) {
      kvmi::ControlCrRequest r;
      EXPECT_TRUE(kvmi::DecodePayload(kvmi::ByteView(m->payload), &r).ok());
      out.push_back({r.vcpu, r.cr, r.enable});
    } else if (id == KVMI_CONTROL_MSR) {
      kvmi::ControlMsrRequest r;
      EXPECT_TRUE(kvmi::DecodePayload(kvmi::ByteView(m->payload), &r).ok());
      out.push_back({r.vcpu, r.msr, r.enable});
    } else if (id == KVMI_CONTROL_VM_EVENTS) {
      kvmi::ControlVmEventsRequest r;
      EXPECT_TRUE(kvmi::DecodePayload(kvmi::ByteView(m->payload), &r).ok());
      out.push_back({0, r.event_id, r.enable});
    }
  }
  return out;
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
  one.add_events(kvmi::v1::EVENT_CR);
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
  all.add_events(kvmi::v1::EVENT_MSR);
  all.add_events(kvmi::v1::EVENT_UNHOOK);
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
  EXPECT_THAT(api_lease->vcpu_events(), ::testing::ElementsAre(kvmi::v1::EVENT_MSR));
  EXPECT_THAT(api_lease->vm_events(), ::testing::ElementsAre(kvmi::v1::EVENT_UNHOOK));

  // Off for every vCPU: vCPU 1's own CR selection goes too.
  grpc::ClientContext off_ctx;
  kvmi::v1::ControlEventsRequest off;
  off.set_vm("controlled");
  off.set_enable(false);
  off.add_events(kvmi::v1::EVENT_CR);
  off.add_crs(3);
  ASSERT_TRUE(stub_->ControlEvents(&off_ctx, off, &response).ok());
  EXPECT_EQ(response.lease().vcpu_only_size(), 0);
  EXPECT_THAT(TakeControls(host, KVMI_CONTROL_EVENTS, 1),
              UnorderedElementsAre(Control{1, KVMI_EVENT_CR, false}));
  EXPECT_THAT(TakeControls(host, KVMI_CONTROL_CR, 1), UnorderedElementsAre(Control{1, 3, false}));

  // Errors name the field; nothing reaches the guest.
  auto refused = [&](kvmi::v1::ControlEventsRequest request) {
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
  bad.add_events(kvmi::v1::EVENT_UNHOOK);
  EXPECT_THAT(refused(bad).error_message(), HasSubstr("VM event"));
  bad = all;
  bad.add_events(kvmi::v1::EVENT_PAUSE_VCPU);
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

TEST_F(ApiTest, SetRegistersNeedsAPendingEventAndGoesOutBeforeTheVerdict) {
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
  claim.mutable_claim()->add_events(kvmi::v1::EVENT_BREAKPOINT);
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
  kvmi::v1::AttachRequest verdict;
  verdict.mutable_verdict()->set_event_id(response.event().id());
  verdict.mutable_verdict()->set_action(kvmi::v1::ACTION_RETRY);
  ASSERT_TRUE(stream->Write(verdict));
  EXPECT_TRUE(host->WaitFor(
      [](const ReceivedMessage& m) { return m.hdr.id == KVMI_EVENT_REPLY && m.hdr.seq == 21; }));
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
  arm.add_events(kvmi::v1::EVENT_BREAKPOINT);
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

TEST_F(ApiTest, AttachCarriesInlineCommandsOwnedByTheStream) {
  ScriptedHost* host = Connect(16, "inline");
  host->set_responder(RichResponder());
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
  auto stream = stub_->Attach(&ctx);
  kvmi::v1::AttachRequest claim;
  claim.mutable_claim()->set_handler_id("inline");
  claim.mutable_claim()->add_events(kvmi::v1::EVENT_PF);
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

}  // namespace
}  // namespace kvmid
