#include "daemon/guest/probe.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <atomic>
#include <future>

#include "daemon/testing/scripted_host.h"
#include "daemon/testing/wait.h"
#include "kernel/abi/protocol.h"

namespace kvmid {
namespace {

using ::testing::HasSubstr;
using testing::ReceivedMessage;
using testing::ScriptedHost;

std::vector<uint8_t> ErrorReply(const ReceivedMessage& m, int32_t err) {
  std::vector<uint8_t> out;
  kvmi::EncodeReply(m.hdr.id, m.hdr.seq, err, {}, &out);
  return out;
}

class ProbeTest : public ::testing::Test, public GuestSession::Listener {
 protected:
  void SetUp() override { loop_.Start("probe-test"); }
  void TearDown() override {
    if (session_) {
      session_->Close("test over");
      EXPECT_TRUE(testing::WaitUntil([&] { return closed_.load(); }));
    }
    loop_.Stop();
  }
  void OnEvent(const std::shared_ptr<GuestSession>&, const kvmi::Event&) override {}
  void OnClosed(const std::shared_ptr<GuestSession>&, const std::string&) override {
    closed_ = true;
  }

  absl::StatusOr<HostCapabilities> Run(
      std::chrono::milliseconds command_timeout = std::chrono::seconds(5)) {
    GuestSession::Options options;
    options.command_timeout = command_timeout;
    session_ =
        std::make_shared<GuestSession>(&loop_, host_.Connect(), GuestIdentity{}, this, options);
    auto session = session_;
    loop_.RunInLoop([session] { session->Start(); });
    std::promise<absl::StatusOr<HostCapabilities>> done;
    std::atomic<int> calls{0};
    Probe::Start(session_, [&](absl::StatusOr<HostCapabilities> result) {
      if (calls++ == 0) done.set_value(std::move(result));
    });
    auto future = done.get_future();
    if (future.wait_for(std::chrono::seconds(10)) != std::future_status::ready) {
      return absl::DeadlineExceededError("test: the probe never finished");
    }
    auto result = future.get();
    EXPECT_EQ(calls.load(), 1);
    return result;
  }

  EventLoop loop_;
  ScriptedHost host_;
  std::atomic<bool> closed_{false};
  std::shared_ptr<GuestSession> session_;
};

TEST_F(ProbeTest, APermissiveHostAllowsEverything) {
  host_.set_vcpus(4);
  absl::StatusOr<HostCapabilities> probed = Run();
  ASSERT_TRUE(probed.ok()) << probed.status();
  EXPECT_EQ(probed->kvmi_version, uint32_t{KVMI_VERSION});
  EXPECT_EQ(probed->vcpu_count, 4u);
  for (uint16_t id = KVMI_FIRST_COMMAND; id < KVMI_NEXT_AVAILABLE_COMMAND; ++id) {
    EXPECT_NE(probed->allowed_commands & (1u << id), 0u) << "command " << id;
  }
  EXPECT_EQ(probed->allowed_events, (1u << KVMI_NUM_EVENTS) - 1);
}

TEST_F(ProbeTest, WhatTheHostRefusesIsNotAllowed) {
  host_.set_responder([&](const ReceivedMessage& m) -> std::optional<std::vector<uint8_t>> {
    kvmi::CheckCommandRequest command;
    kvmi::CheckEventRequest event;
    if (m.hdr.id == KVMI_CHECK_COMMAND &&
        kvmi::DecodePayload(kvmi::ByteView(m.payload), &command).ok() &&
        command.id == KVMI_SET_REGISTERS) {
      return ErrorReply(m, -KVM_EPERM);
    }
    if (m.hdr.id == KVMI_CHECK_EVENT &&
        kvmi::DecodePayload(kvmi::ByteView(m.payload), &event).ok() && event.id == KVMI_EVENT_PF) {
      return ErrorReply(m, -KVM_EPERM);
    }
    return host_.DefaultReply(m);
  });
  absl::StatusOr<HostCapabilities> probed = Run();
  ASSERT_TRUE(probed.ok()) << probed.status();
  EXPECT_EQ(probed->allowed_commands & (1u << KVMI_SET_REGISTERS), 0u);
  EXPECT_NE(probed->allowed_commands & (1u << KVMI_GET_REGISTERS), 0u);
  EXPECT_EQ(probed->allowed_events & (1u << KVMI_EVENT_PF), 0u);
  EXPECT_NE(probed->allowed_events & (1u << KVMI_EVENT_CR), 0u);
}

TEST_F(ProbeTest, AnOlderHostIsRefused) {
  host_.set_responder([&](const ReceivedMessage& m) -> std::optional<std::vector<uint8_t>> {
    if (m.hdr.id != KVMI_GET_VERSION) return host_.DefaultReply(m);
    std::vector<uint8_t> data, out;
    kvmi::ByteWriter w(&data);
    kvmi::EncodeReplyData(kvmi::GetVersionReply{KVMI_VERSION - 1}, w);
    kvmi::EncodeReply(m.hdr.id, m.hdr.seq, 0, kvmi::ByteView(data), &out);
    return out;
  });
  absl::StatusOr<HostCapabilities> probed = Run();
  EXPECT_EQ(probed.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(probed.status().message(), "unsupported KVMI version");
}

TEST_F(ProbeTest, GuestInfoRefusedWithEpermIsProbedAgainUntilQemuAllowsIt) {
  std::atomic<int> guest_info_asked{0};
  host_.set_responder([&](const ReceivedMessage& m) -> std::optional<std::vector<uint8_t>> {
    // QEMU's allow ioctls arrive after the first two rounds (§9 "Race").
    if (m.hdr.id == KVMI_GET_GUEST_INFO && guest_info_asked++ < 2) {
      return ErrorReply(m, -KVM_EPERM);
    }
    return host_.DefaultReply(m);
  });
  absl::StatusOr<HostCapabilities> probed = Run();
  ASSERT_TRUE(probed.ok()) << probed.status();
  EXPECT_EQ(guest_info_asked.load(), 3);
  EXPECT_EQ(probed->vcpu_count, 2u);
}

TEST_F(ProbeTest, GuestInfoRefusedOtherwiseIsRefusedAtOnce) {
  std::atomic<int> guest_info_asked{0};
  host_.set_responder([&](const ReceivedMessage& m) -> std::optional<std::vector<uint8_t>> {
    if (m.hdr.id == KVMI_GET_GUEST_INFO) {
      guest_info_asked++;
      return ErrorReply(m, -KVM_EOPNOTSUPP);
    }
    return host_.DefaultReply(m);
  });
  absl::StatusOr<HostCapabilities> probed = Run();
  EXPECT_EQ(probed.status().code(), absl::StatusCode::kPermissionDenied);
  EXPECT_EQ(probed.status().message(), "the host does not allow GET_GUEST_INFO");
  EXPECT_EQ(guest_info_asked.load(), 1);
}

TEST_F(ProbeTest, ACommandWithoutAnswerFailsTheProbe) {
  host_.set_responder([&](const ReceivedMessage& m) -> std::optional<std::vector<uint8_t>> {
    if (m.hdr.id == KVMI_GET_VERSION) return std::nullopt;
    return host_.DefaultReply(m);
  });
  absl::StatusOr<HostCapabilities> probed = Run(std::chrono::milliseconds(100));
  EXPECT_EQ(probed.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(probed.status().message(), HasSubstr("probe failed: "));
}

TEST(ProbeDecideTest, EpermIsRetriedOnlyUpToTheLastAttempt) {
  Probe::Answers answers;
  answers.version = KVMI_VERSION;
  answers.guest_info_err = -KVM_EPERM;
  EXPECT_FALSE(Probe::Decide(answers, 1).has_value());
  EXPECT_FALSE(Probe::Decide(answers, Probe::kMaxAttempts - 1).has_value());
  auto last = Probe::Decide(answers, Probe::kMaxAttempts);
  ASSERT_TRUE(last.has_value());
  EXPECT_EQ(last->status().code(), absl::StatusCode::kPermissionDenied);
}

TEST(ProbeDecideTest, ATransportFailureWinsOverEverythingElse) {
  Probe::Answers answers;
  answers.transport_failed = true;
  answers.failure = "closed";
  answers.version = 0;
  auto decided = Probe::Decide(answers, 1);
  ASSERT_TRUE(decided.has_value());
  EXPECT_EQ(decided->status().message(), "probe failed: closed");
}

}  // namespace
}  // namespace kvmid
