// A scripted KVMI host for daemon unit tests: the far end of a socketpair that decodes what the
// daemon sends with the real codec and answers as the test says. For the full kernel semantics
// the end-to-end tests use the host-side model (//kernel/host, kvmi-sim) instead.
#ifndef KVMID_DAEMON_TESTING_SCRIPTED_HOST_H_
#define KVMID_DAEMON_TESTING_SCRIPTED_HOST_H_

#include <chrono>
#include <cstdint>
#include <deque>
#include <functional>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "daemon/base/mutex.h"
#include "kernel/abi/events.h"
#include "kernel/abi/framing.h"
#include "kernel/abi/handshake.h"
#include "kernel/abi/messages.h"
#include "kernel/transport/unique_fd.h"

namespace kvmid::testing {

struct ReceivedMessage {
  kvmi_msg_hdr hdr{};
  std::vector<uint8_t> payload;
  // UnreadBySession() when the host read this message.
  int unread_by_session = -1;
};

class ScriptedHost {
 public:
  // How the host answers a command; return nullopt to leave it unanswered. The default answers
  // like a permissive v6 kernel: GET_VERSION 1, GET_GUEST_INFO `vcpus`, everything else 0.
  using Responder = std::function<std::optional<std::vector<uint8_t>>(const ReceivedMessage&)>;

  // Returns the daemon's end of a fresh socketpair.
  kvmi::UniqueFd Connect();
  // Serves an already connected socket (e.g. one that went through the QEMU handshake).
  void Adopt(kvmi::UniqueFd fd);
  ~ScriptedHost();

  void set_vcpus(uint32_t vcpus) { vcpus_ = vcpus; }
  void set_responder(Responder responder);

  // Sends raw bytes / an event to the daemon.
  void SendRaw(const std::vector<uint8_t>& bytes);
  void SendEvent(const kvmi::Event& event);
  void Close();

  // Waits for the next received message matching `pred` (in arrival order, consumed).
  std::optional<ReceivedMessage> WaitFor(
      const std::function<bool(const ReceivedMessage&)>& pred,
      std::chrono::milliseconds timeout = std::chrono::milliseconds(5000));
  std::optional<ReceivedMessage> WaitForId(
      uint16_t id, std::chrono::milliseconds timeout = std::chrono::milliseconds(5000));
  // True once the daemon closed its end.
  bool WaitClosed(std::chrono::milliseconds timeout = std::chrono::milliseconds(5000));
  size_t received_count();
  // What this host sent that the session has not taken off the socket yet (SIOCOUTQ: the bytes
  // and the kernel's overhead for them; 0 when everything was taken).
  int UnreadBySession();

  // The default answer for a command (what a permissive v6 kernel says).
  std::vector<uint8_t> DefaultReply(const ReceivedMessage& message) const;

 private:
  void ReadLoop();

  kvmi::UniqueFd fd_;
  std::thread reader_;
  uint32_t vcpus_ = 2;
  Mutex mutex_;
  CondVar cv_;
  Responder responder_ ABSL_GUARDED_BY(mutex_);
  std::deque<ReceivedMessage> received_ ABSL_GUARDED_BY(mutex_);
  size_t received_total_ ABSL_GUARDED_BY(mutex_) = 0;
  bool closed_ ABSL_GUARDED_BY(mutex_) = false;
  Mutex write_mutex_;  // one writer at a time on fd_
};

// Connects to the daemon's UNIX socket and runs QEMU's side of the §9 handshake. Returns the
// connected socket (invalid on failure) and the daemon's answer.
kvmi::UniqueFd ConnectAsQemu(const std::string& path, const kvmi::QemuHello& hello,
                             kvmi::IntrospectorHello* answer);

// A minimal valid event of kind `id` on `vcpu`, in 64-bit mode.
kvmi::Event MakeTestEvent(uint8_t id, uint16_t vcpu, uint32_t seq);

}  // namespace kvmid::testing

#endif  // KVMID_DAEMON_TESTING_SCRIPTED_HOST_H_
