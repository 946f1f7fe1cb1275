// The API over a real UNIX socket, with real guests behind the daemon (scripted KVMI hosts
// through QEMU's handshake): the fixture and host scripts the API's test files share.
#ifndef KVMID_DAEMON_API_API_TEST_FIXTURE_H_
#define KVMID_DAEMON_API_API_TEST_FIXTURE_H_

#include <gmock/gmock.h>
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>
#include <stdlib.h>
#include <unistd.h>

#include <future>
#include <memory>
#include <ostream>
#include <string>
#include <thread>
#include <vector>

#include "daemon/api/server.h"
#include "daemon/testing/scripted_host.h"
#include "daemon/testing/wait.h"
#include "kernel/abi/protocol.h"
#include "proto/kvmi/v1/introspection.grpc.pb.h"

namespace kvmid {

using testing::ConnectAsQemu;
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
    ASSERT_TRUE(daemon_->Start().ok());
    daemon_->pipeline().SetGuestLabels("web-1", {{"tier", "prod"}});
    api_ = std::make_unique<ApiServer>(daemon_.get(), /*history=*/4);
    security::ApiListenOptions listen;
    listen.unix_socket = dir_ + "/api.sock";
    listen.tcp = "127.0.0.1:0";
    listen.tcp_insecure_plaintext = true;  // loopback, for the tests' plaintext TCP channel
    ASSERT_TRUE(api_->Start(listen).ok());
    channel_ =
        grpc::CreateChannel("unix:" + dir_ + "/api.sock", grpc::InsecureChannelCredentials());
    stub_ = kvmi::v1::Introspection::NewStub(channel_);
  }
  void TearDown() override {
    hosts_.clear();
    // The client goes first, as a client process would: a connection nobody polls any more (this
    // process's, under gRPC's "poll" engine as in kvmid) would hold the server's shutdown for its
    // grace, waiting for the client's answer to its GOAWAY.
    stub_.reset();
    channel_.reset();
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

// A host that answers GET_REGISTERS, GET_CPUID, GET_XSAVE, GET_MTRR_TYPE and GET_PAGE_ACCESS with
// recognisable data, and fails READ_PHYSICAL / SET_PAGE_ACCESS of 0xbad000 with -KVM_EINVAL.
ScriptedHost::Responder RichResponder();

// CONTROL_* commands of one kind the host received, as (vcpu, id, enable) triples.
struct Control {
  uint16_t vcpu;
  uint32_t what;
  bool enable;
  bool operator==(const Control& o) const {
    return vcpu == o.vcpu && what == o.what && enable == o.enable;
  }
};
std::ostream& operator<<(std::ostream& os, const Control& c);
// The next `count` CONTROL_* commands of kind `id` the host received.
std::vector<Control> TakeControls(ScriptedHost* host, uint16_t id, size_t count);

}  // namespace kvmid

#endif  // KVMID_DAEMON_API_API_TEST_FIXTURE_H_
