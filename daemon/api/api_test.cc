// The gRPC surface over a real UNIX socket, with real guests behind the daemon (scripted KVMI
// hosts through QEMU's handshake): every RPC's success and main error cases, reflection and
// health, and a slow StreamEvents reader that gets drop notices while the guest runs on.
#include <gmock/gmock.h>
#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>
#include <stdlib.h>
#include <unistd.h>

#include <thread>

#include "daemon/api/introspection_service.h"
#include "daemon/testing/scripted_host.h"
#include "kernel/abi/protocol.h"
#include "src/proto/grpc/reflection/v1alpha/reflection.grpc.pb.h"

namespace kvmid {
namespace {

using testing::ConnectAsQemu;
using ::testing::HasSubstr;
using testing::MakeTestEvent;
using testing::ReceivedMessage;
using testing::ScriptedHost;

template <typename Pred>
bool WaitUntil(Pred pred, std::chrono::milliseconds timeout = std::chrono::seconds(5)) {
  auto deadline = Clock::now() + timeout;
  while (Clock::now() < deadline) {
    if (pred()) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
  return pred();
}

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
    api_ = std::make_unique<ApiServer>(daemon_.get());
    ASSERT_EQ(api_->Start(dir_ + "/api.sock", "127.0.0.1:0"), "");
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
  // The stream is registered once the server runs the call: wait for the observer.
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
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
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
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

}  // namespace
}  // namespace kvmid
