// Event context end to end (issue 15): the real daemon and API server, a simulated guest with
// real page tables (kernel/sim page_tables, 4- and 5-level), over real sockets. An Attach
// handler claims MSR writes with 16 bytes at RIP as context, and decides from those bytes alone:
// WRMSR (0F 30) at RIP -> CONTINUE, anything else -> KEEP_OLD. The bytes must equal what the
// guest holds at RIP (read from the simulator's own memory through its page-table oracle), and
// the handler's channel carries no call but its Attach stream (counted by a client interceptor),
// and the stream no message but the claim and the verdicts: no ReadPhysical, ReadVirtual or
// inline command.
#include <gmock/gmock.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/support/client_interceptor.h>
#include <gtest/gtest.h>
#include <stdlib.h>
#include <unistd.h>

#include <atomic>
#include <future>
#include <map>
#include <mutex>

#include "daemon/api/server.h"
#include "daemon/kvmid.h"
#include "daemon/testing/wait.h"
#include "kernel/sim/fleet.h"
#include "proto/kvmi/v1/introspection.grpc.pb.h"

namespace kvmid {
namespace {

namespace sim = ::kvmi::sim;
using testing::WaitUntil;

// Every RPC the handler's channel starts, by method.
class CallCounter {
 public:
  void Count(const std::string& method) {
    std::lock_guard<std::mutex> lock(mu_);
    calls_[method]++;
  }
  std::map<std::string, int> calls() {
    std::lock_guard<std::mutex> lock(mu_);
    return calls_;
  }

 private:
  std::mutex mu_;
  std::map<std::string, int> calls_;
};

class CountingInterceptor : public grpc::experimental::Interceptor {
 public:
  void Intercept(grpc::experimental::InterceptorBatchMethods* methods) override {
    methods->Proceed();
  }
};

class CountingFactory : public grpc::experimental::ClientInterceptorFactoryInterface {
 public:
  explicit CountingFactory(CallCounter* counter) : counter_(counter) {}
  grpc::experimental::Interceptor* CreateClientInterceptor(
      grpc::experimental::ClientRpcInfo* info) override {
    counter_->Count(info->method());
    return new CountingInterceptor();
  }

 private:
  CallCounter* counter_;
};

class ContextE2eTest : public ::testing::TestWithParam<sim::PagingMode> {
 protected:
  void SetUp() override {
    char dir_template[] = "/tmp/kvmid-ctx-XXXXXX";
    dir_ = mkdtemp(dir_template);
    DaemonConfig config;
    config.unix_socket = dir_ + "/kvmi.sock";
    daemon_ = std::make_unique<Daemon>(config);
    ASSERT_TRUE(daemon_->Start().ok());
    api_ = std::make_unique<ApiServer>(daemon_.get(), /*history=*/64);
    security::ApiListenOptions listen;
    listen.unix_socket = dir_ + "/api.sock";
    ASSERT_TRUE(api_->Start(listen).ok());
    std::vector<std::unique_ptr<grpc::experimental::ClientInterceptorFactoryInterface>> counting;
    counting.push_back(std::make_unique<CountingFactory>(&handler_calls_));
    handler_stub_ =
        kvmi::v1::Introspection::NewStub(grpc::experimental::CreateCustomChannelWithInterceptors(
            "unix:" + dir_ + "/api.sock", grpc::InsecureChannelCredentials(),
            grpc::ChannelArguments(), std::move(counting)));

    sim::FleetConfig fleet;
    fleet.vms = 1;
    fleet.guest.vcpus = 2;
    fleet.guest.memory_bytes = 64ull << 20;
    fleet.guest.paging = sim::PagingConfig{GetParam(), 2};
    fleet.connector.endpoint.family = kvmi::Endpoint::Family::kUnix;
    fleet.connector.endpoint.path = config.unix_socket;
    fleet.connector.reconnect_seconds = 0.2;
    fleet.name_prefix = "ctx-";
    fleet_ = std::make_unique<sim::Fleet>(fleet);
    fleet_->Start();
    ASSERT_TRUE(WaitUntil([&] {
      auto g = daemon_->registry().Lookup("ctx-0000");
      return g && g->state() == GuestState::kHooked;
    }));
  }
  void TearDown() override {
    if (fleet_) fleet_->Stop();
    api_.reset();
    daemon_.reset();
    ::unlink((dir_ + "/kvmi.sock").c_str());
    ::unlink((dir_ + "/api.sock").c_str());
    ::rmdir(dir_.c_str());
  }

  sim::SimGuest& guest() { return fleet_->vm(0).guest(); }

  // Puts `bytes` at vCPU `vcpu`'s RIP (through the guest's own tables); returns that RIP.
  uint64_t PlaceAtRip(uint16_t vcpu, const std::vector<uint8_t>& bytes) {
    sim::VcpuSnapshot s = guest().Snapshot(vcpu);
    uint64_t rip = s.regs.rip;
    for (size_t i = 0; i < bytes.size(); ++i) {
      sim::ExpectedTranslation t = guest().page_tables()->Expect(s.sregs.cr3, rip + i);
      EXPECT_TRUE(t.present) << std::hex << "rip 0x" << rip;
      EXPECT_TRUE(guest().WritePhysical(t.gpa, &bytes[i], 1));
    }
    return rip;
  }
  // What the guest holds at [gva, gva + n) in address space cr3 (the simulator's own view).
  std::string GuestBytes(uint64_t cr3, uint64_t gva, size_t n) {
    std::string out;
    for (size_t i = 0; i < n; ++i) {
      sim::ExpectedTranslation t = guest().page_tables()->Expect(cr3, gva + i);
      if (!t.present) break;
      uint8_t b = 0;
      EXPECT_TRUE(guest().ReadPhysical(t.gpa, &b, 1));
      out.push_back(static_cast<char>(b));
    }
    return out;
  }

  std::string dir_;
  std::unique_ptr<Daemon> daemon_;
  std::unique_ptr<ApiServer> api_;
  CallCounter handler_calls_;
  std::unique_ptr<kvmi::v1::Introspection::Stub> handler_stub_;
  std::unique_ptr<sim::Fleet> fleet_;
};

TEST_P(ContextE2eTest, AHandlerDecidesFromTheBytesAtRipWithoutASingleExtraCall) {
  // The handler: claims MSR writes with 16 bytes at RIP, answers from them alone.
  grpc::ClientContext ctx;
  auto stream = handler_stub_->Attach(&ctx);
  int messages_sent = 0;
  kvmi::v1::AttachRequest claim;
  claim.mutable_claim()->set_handler_id("wrmsr-check");
  claim.mutable_claim()->add_events(kvmi::v1::EVENT_TYPE_MSR);
  claim.mutable_claim()->add_arm_events(kvmi::v1::EVENT_TYPE_MSR);
  claim.mutable_claim()->add_arm_msrs(sim::kMsrLstar);
  claim.mutable_claim()->set_deadline_ms(5000);
  claim.mutable_claim()->mutable_context()->set_rip_bytes(16);
  ASSERT_TRUE(stream->Write(claim));
  ++messages_sent;
  kvmi::v1::AttachResponse response;
  ASSERT_TRUE(stream->Read(&response));
  ASSERT_TRUE(response.has_claimed());
  ASSERT_TRUE(WaitUntil([&] {
    GuestSnapshot s = daemon_->registry().Lookup("ctx-0000")->Snapshot();
    return s.arming_in_flight == 0 && s.leases.count(response.claimed().owner()) == 1;
  }));

  struct Case {
    uint16_t vcpu;
    std::vector<uint8_t> code;
    bool expect_changed;
  };
  const std::vector<Case> cases = {
      {0, {0x0f, 0x30, 0x48, 0x89, 0xc3}, true},  // wrmsr; mov %rax,%rbx
      {1, {0x90, 0x90, 0x0f, 0x30}, false},       // nop nop: not a WRMSR at RIP
      {0, {0x0f, 0x30, 0xcc, 0xcc, 0xcc}, true},  // the RIP page is a cache hit now
  };
  for (const Case& c : cases) {
    const uint64_t rip = PlaceAtRip(c.vcpu, c.code);
    uint64_t before = 0;
    ASSERT_TRUE(guest().GetMsr(c.vcpu, sim::kMsrLstar, &before));
    sim::Op op;
    op.kind = sim::OpKind::kWriteMsr;
    op.index = sim::kMsrLstar;
    op.value = before + 0x1000;
    op.explicit_value = true;
    std::future<sim::OpResult> done = fleet_->vm(0).Execute(c.vcpu, op);

    ASSERT_TRUE(stream->Read(&response));
    ASSERT_TRUE(response.has_event()) << response.DebugString();
    const kvmi::v1::Event& event = response.event();
    ASSERT_EQ(event.type(), kvmi::v1::EVENT_TYPE_MSR);
    EXPECT_EQ(event.rip(), rip);
    ASSERT_TRUE(event.has_context());
    const kvmi::v1::ContextBlock& at_rip = event.context().rip();
    EXPECT_TRUE(at_rip.complete()) << at_rip.why();
    EXPECT_EQ(at_rip.gva(), rip);
    EXPECT_EQ(at_rip.size(), 16u);
    ASSERT_EQ(at_rip.data().size(), 16u);
    // Exactly what the guest holds at RIP, in its own address space.
    EXPECT_EQ(at_rip.data(), GuestBytes(event.registers().cr3(), rip, 16));
    EXPECT_EQ(at_rip.data().substr(0, c.code.size()), std::string(c.code.begin(), c.code.end()));
    EXPECT_FALSE(event.context().has_rsp());  // not asked

    // The decision, from the bytes alone.
    const bool wrmsr = at_rip.data().compare(0, 2, "\x0f\x30", 2) == 0;
    kvmi::v1::AttachRequest verdict;
    verdict.mutable_verdict()->set_event_id(event.id());
    verdict.mutable_verdict()->set_action(wrmsr ? kvmi::v1::ACTION_CONTINUE
                                                : kvmi::v1::ACTION_KEEP_OLD);
    ASSERT_TRUE(stream->Write(verdict));
    ++messages_sent;
    ASSERT_EQ(done.wait_for(std::chrono::seconds(10)), std::future_status::ready);
    EXPECT_TRUE(done.get().executed);
    uint64_t after = 0;
    ASSERT_TRUE(guest().GetMsr(c.vcpu, sim::kMsrLstar, &after));
    EXPECT_EQ(after != before, c.expect_changed) << std::hex << "rip 0x" << rip;
    EXPECT_EQ(event.decided_by(), "");  // sent before any decision
  }
  // Nothing but the Attach stream on the handler's channel; nothing on the stream but the claim
  // and one verdict per event (no inline ReadPhysical/ReadVirtual/TranslateAddress command).
  EXPECT_EQ(handler_calls_.calls(),
            (std::map<std::string, int>{{"/kvmi.v1.Introspection/Attach", 1}}));
  EXPECT_EQ(messages_sent, 1 + static_cast<int>(cases.size()));
  const auto& stats = daemon_->pipeline().stats();
  EXPECT_EQ(stats.context_captures.load(), cases.size());
  EXPECT_EQ(stats.context_incomplete.load(), 0u);
  EXPECT_EQ(stats.fallbacks.load(), 0u);
  stream->WritesDone();
  ctx.TryCancel();
  stream->Finish();
}

INSTANTIATE_TEST_SUITE_P(Modes, ContextE2eTest,
                         ::testing::Values(sim::PagingMode::k4Level, sim::PagingMode::k5Level),
                         [](const ::testing::TestParamInfo<sim::PagingMode>& info) {
                           return info.param == sim::PagingMode::k4Level ? "FourLevel"
                                                                         : "FiveLevel";
                         });

}  // namespace
}  // namespace kvmid
