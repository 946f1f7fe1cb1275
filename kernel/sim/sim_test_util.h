// Shared fixture for the host-side tests: one simulated VM connected to a minimal test tool over a
// real UNIX socket, plus byte builders that use the uapi structs as the oracle for wire bytes.
#ifndef KVMID_KERNEL_SIM_SIM_TEST_UTIL_H_
#define KVMID_KERNEL_SIM_SIM_TEST_UTIL_H_

#include <chrono>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

#include "gtest/gtest.h"
#include "kernel/sim/sim_vm.h"
#include "kernel/sim/test_tool.h"

namespace kvmi::sim::testing {

using Bytes = std::vector<uint8_t>;
using namespace std::chrono_literals;

inline void AppendTo(Bytes* out, const Bytes& b) { out->insert(out->end(), b.begin(), b.end()); }
template <typename T>
void AppendTo(Bytes* out, const T& value) {
  static_assert(std::is_trivially_copyable_v<T>, "wire structs only");
  const auto* p = reinterpret_cast<const uint8_t*>(&value);
  out->insert(out->end(), p, p + sizeof(T));
}
template <typename... Parts>
Bytes Cat(const Parts&... parts) {
  Bytes out;
  (AppendTo(&out, parts), ...);
  return out;
}
// A message with a hand-made header: hdr.size defaults to the payload length.
inline Bytes Msg(uint16_t id, uint32_t seq, const Bytes& payload, int size = -1) {
  kvmi_msg_hdr hdr{id, static_cast<uint16_t>(size < 0 ? payload.size() : size), seq};
  return Cat(hdr, payload);
}
// The reply the ABI prescribes: hdr{id, 8 + data, seq} + kvmi_error_code + data (when err == 0).
inline Bytes ReplyBytes(uint16_t id, uint32_t seq, int32_t err, const Bytes& data = {}) {
  kvmi_msg_hdr hdr{id, static_cast<uint16_t>(8 + (err == 0 ? data.size() : 0)), seq};
  kvmi_error_code ec{err, 0};
  return err == 0 ? Cat(hdr, ec, data) : Cat(hdr, ec);
}
inline kvmi_vcpu_hdr VcpuHdr(uint16_t vcpu) {
  kvmi_vcpu_hdr h{};
  h.vcpu = vcpu;
  return h;
}

class SimSessionTest : public ::testing::Test {
 protected:
  static VmConfig DefaultConfig(const Endpoint& endpoint) {
    VmConfig c;
    c.name = "test-vm";
    c.uuid = Uuid{1, 2, 3, 4, 5, 6, 0x47, 8, 0x89, 10, 11, 12, 13, 14, 15, 16};
    c.guest.vcpus = 2;
    c.guest.memory_bytes = 64ull << 20;
    c.connector.endpoint = endpoint;
    c.connector.reconnect_seconds = 0;  // tests that want reconnects say so
    return c;
  }
  // Starts the VM and accepts its connection (handshake done).
  void StartVm(const std::function<void(VmConfig&)>& tweak = nullptr) {
    ASSERT_TRUE(listener_.ok());
    VmConfig config = DefaultConfig(listener_.endpoint());
    if (tweak) tweak(config);
    vm_ = std::make_unique<SimVm>(config);
    vm_->Start();
    tool_ = listener_.AcceptAndHandshake(10s, &hello_);
    ASSERT_NE(tool_, nullptr);
    // As libkvmi does: GET_VERSION first. Its reply also proves that the hook and QEMU's
    // allow-mask ioctls are done (the receive loop starts after them).
    ASSERT_EQ(ToolConnection::ErrorOf(tool_->Call(GetVersionRequest{})), 0);
  }
  void TearDown() override {
    if (vm_) vm_->Stop();
  }
  // Sends raw bytes and returns the next message (a reply). Never nullopt (so `->wire` is
  // safe): a missing reply is a test failure and comes back as an empty message.
  std::optional<RawMessage> Exchange(const Bytes& message) {
    EXPECT_TRUE(tool_->SendRaw(message));
    std::optional<RawMessage> reply = tool_->ReadMessage(10s);
    if (!reply) {
      ADD_FAILURE() << "no reply";
      return RawMessage{};
    }
    return reply;
  }
  // The session must end: the socket closes and the VM records a protocol violation.
  void ExpectSessionClosed(const std::string& reason_part = "protocol violation") {
    EXPECT_TRUE(tool_->WaitClosed(10s)) << "the kernel side should have closed the socket";
    ASSERT_TRUE(vm_->WaitSessionsEnded(1, Clock::now() + 10s));
    EXPECT_NE(vm_->last_end_reason().find(reason_part), std::string::npos)
        << vm_->last_end_reason();
  }
  // Enables an event on a vCPU through the protocol.
  void Enable(uint16_t vcpu, uint16_t event) {
    ControlEventsRequest req;
    req.vcpu = vcpu;
    req.event_id = event;
    req.enable = true;
    ASSERT_EQ(ToolConnection::ErrorOf(tool_->Call(req)), 0) << EventName(event);
  }

  ToolListener listener_;
  std::unique_ptr<SimVm> vm_;
  std::unique_ptr<ToolConnection> tool_;
  QemuHello hello_;
};

}  // namespace kvmi::sim::testing

#endif  // KVMID_KERNEL_SIM_SIM_TEST_UTIL_H_
