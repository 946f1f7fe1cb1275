// A minimal introspection tool for tests and benchmarks: listens on a UNIX socket, runs the tool
// side of the handshake, and speaks KVMI through the codec -- commands with (id, seq) matching,
// events queued while waiting for replies, event replies. Everything it reads is decoded by
// //kernel/abi, so the tests check the simulator against the codec, and the reply bytes against
// the uapi structs.
#ifndef KVMID_KERNEL_SIM_TEST_TOOL_H_
#define KVMID_KERNEL_SIM_TEST_TOOL_H_

#include <atomic>
#include <chrono>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "kernel/abi/events.h"
#include "kernel/abi/framing.h"
#include "kernel/abi/handshake.h"
#include "kernel/abi/messages.h"
#include "kernel/transport/socket.h"

namespace kvmi::sim {

// A whole message as received.
struct RawMessage {
  kvmi_msg_hdr hdr{};
  std::vector<uint8_t> payload;
  std::vector<uint8_t> wire;  // header + payload, for byte-exact checks
};

class ToolConnection {
 public:
  explicit ToolConnection(UniqueFd fd);

  // Tool side of §9: reads qemu2introspector, answers introspector2qemu with SHA-1(cookie) (or
  // `hash_override`). False on any failure.
  bool Handshake(QemuHello* hello, const std::string& cookie = "",
                 const std::optional<std::array<uint8_t, 20>>& hash_override = std::nullopt);

  bool SendRaw(const std::vector<uint8_t>& bytes);
  template <typename Request>
  uint32_t Send(const Request& request) {
    uint32_t seq = next_seq_++;
    std::vector<uint8_t> bytes;
    EncodeCommand(request, seq, &bytes);
    return SendRaw(bytes) ? seq : 0;
  }
  // Next message from the socket (queued events first are NOT returned here).
  std::optional<RawMessage> ReadMessage(std::chrono::milliseconds timeout);
  // The reply to (id, seq); events read meanwhile are queued for WaitEvent.
  std::optional<RawMessage> WaitReply(uint16_t id, uint32_t seq,
                                      std::chrono::milliseconds timeout = kDefaultTimeout);
  // Sends a command and returns its decoded reply (error code + data).
  template <typename Request>
  std::optional<RawMessage> Call(const Request& request,
                                 std::chrono::milliseconds timeout = kDefaultTimeout) {
    uint32_t seq = Send(request);
    if (seq == 0) return std::nullopt;
    return WaitReply(Request::kId, seq, timeout);
  }
  // Error code of a reply (0 or -KVM_E*); INT32_MIN if no reply / undecodable.
  static int32_t ErrorOf(const std::optional<RawMessage>& reply);
  static ByteView DataOf(const RawMessage& reply);

  std::optional<Event> WaitEvent(std::chrono::milliseconds timeout = kDefaultTimeout);
  bool ReplyEvent(const EventReply& reply);
  bool Continue(const Event& event) {
    return ReplyEvent(MakeEventReply(event, KVMI_EVENT_ACTION_CONTINUE));
  }
  // True when the peer closed (EOF) within the timeout with no message in between.
  bool WaitClosed(std::chrono::milliseconds timeout = kDefaultTimeout);
  // Nothing arrives within `quiet` (used to check that no event / reply is sent).
  bool ExpectSilence(std::chrono::milliseconds quiet);
  int fd() const { return fd_.get(); }
  void Close() { fd_.Reset(); }
  // Use a specific next seq (tests of seq echoing).
  void set_next_seq(uint32_t seq) { next_seq_ = seq; }

  static constexpr std::chrono::milliseconds kDefaultTimeout{10000};

 private:
  UniqueFd fd_;
  MessageFramer framer_{kMaxReplyPayload};
  std::deque<RawMessage> queued_;  // events (and unmatched replies) read while waiting
  uint32_t next_seq_ = 1;
  bool closed_ = false;
};

class ToolListener {
 public:
  // Creates a fresh directory under /tmp (sun_path is short) and listens on <dir>/tool.sock.
  ToolListener();
  ~ToolListener();
  bool ok() const { return fd_.valid(); }
  const std::string& path() const { return path_; }
  Endpoint endpoint() const;
  // Accepts one connection (no handshake).
  std::unique_ptr<ToolConnection> Accept(std::chrono::milliseconds timeout);
  // Accepts and completes the handshake.
  std::unique_ptr<ToolConnection> AcceptAndHandshake(std::chrono::milliseconds timeout,
                                                     QemuHello* hello = nullptr,
                                                     const std::string& cookie = "");

 private:
  std::string dir_;
  std::string path_;
  UniqueFd fd_;
};

// A tool that serves any number of VMs: per connection it runs the handshake, enables the given
// events on every vCPU (CR3/CR0/CR4 and a few MSRs are selected; PF needs `restrict_pages`), and
// answers every event with CONTINUE. Used for fleet tests and as the peer of kvmi-sim benchmarks.
struct AutoToolOptions {
  std::vector<uint8_t> events = {
      KVMI_EVENT_CR,         KVMI_EVENT_MSR,        KVMI_EVENT_XSETBV,
      KVMI_EVENT_BREAKPOINT, KVMI_EVENT_HYPERCALL,  KVMI_EVENT_PF,
      KVMI_EVENT_TRAP,       KVMI_EVENT_DESCRIPTOR, KVMI_EVENT_SINGLESTEP};
  // Pages whose write access is removed (SET_PAGE_ACCESS R|X) so that writes raise PF; on each
  // write PF the tool answers CONTINUE (the write is emulated, the restriction stays).
  uint64_t restrict_gpa = 0x200000;
  uint32_t restrict_pages = 16;
  std::string cookie;
};

class AutoTool {
 public:
  AutoTool(std::string socket_path, AutoToolOptions options);
  ~AutoTool();
  bool Start(std::string* error);
  void Stop();
  uint64_t events_handled() const { return events_.load(); }
  uint64_t connections() const { return connections_.load(); }
  uint64_t errors() const { return errors_.load(); }
  const std::string& path() const { return path_; }

 private:
  void AcceptLoop();
  void Serve(std::unique_ptr<ToolConnection> conn);

  std::string path_;
  AutoToolOptions options_;
  UniqueFd listen_fd_;
  std::thread acceptor_;
  std::mutex mu_;
  std::vector<std::thread> servers_;
  std::vector<int> conn_fds_;
  std::atomic<bool> stop_{false};
  std::atomic<uint64_t> events_{0};
  std::atomic<uint64_t> connections_{0};
  std::atomic<uint64_t> errors_{0};
};

}  // namespace kvmi::sim

#endif  // KVMID_KERNEL_SIM_TEST_TOOL_H_
