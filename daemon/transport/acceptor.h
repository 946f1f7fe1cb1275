// Accepts QEMU's KVMI connections on one listening socket and runs the §9 handshake for each,
// concurrently, on an event loop: every handshake is a small state machine with its own deadline,
// so a QEMU that stalls or sends garbage delays nobody else (libkvmi handshakes serially on its
// accept thread). Only completed, authenticated handshakes leave this class.
#ifndef KVMID_DAEMON_TRANSPORT_ACCEPTOR_H_
#define KVMID_DAEMON_TRANSPORT_ACCEPTOR_H_

#include <absl/status/status.h>
#include <sys/types.h>

#include <array>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

#include "daemon/io/event_loop.h"
#include "daemon/metrics/hooks.h"
#include "daemon/session/guest_session.h"
#include "kernel/abi/handshake.h"
#include "kernel/transport/unique_fd.h"

namespace kvmid {

// Handshakes in progress at once by default; more connections wait in the kernel's backlog.
inline constexpr size_t kDefaultMaxConcurrentHandshakes = 256;

struct AcceptorOptions {
  std::chrono::milliseconds handshake_timeout{5000};
  // Sent back as cookie_hash (SHA-1 of the shared secret); QEMU kvmi-v7 refuses a mismatch.
  std::optional<std::array<uint8_t, kvmi::kCookieHashSize>> cookie_hash;
  // UNIX sockets: peer uids allowed to connect (SO_PEERCRED); empty = any.
  std::vector<uid_t> allowed_uids;
  // AF_VSOCK: peer CIDs allowed; empty = any.
  std::vector<uint32_t> allowed_cids;
  size_t max_concurrent_handshakes = kDefaultMaxConcurrentHandshakes;
};

struct AcceptedGuest {
  kvmi::UniqueFd fd;  // non-blocking, handshake done
  GuestIdentity identity;
  std::vector<uint8_t> early_bytes;  // KVMI bytes that arrived with the handshake, if any
};

class Acceptor {
 public:
  using OnGuest = std::function<void(AcceptedGuest)>;

  // `transport` is "unix" or "vsock" (for identities and logs). Call Start on the loop thread.
  Acceptor(EventLoop* loop, kvmi::UniqueFd listen_fd, std::string transport,
           AcceptorOptions options, OnGuest on_guest);
  ~Acceptor();

  void Start();
  void Stop();  // loop thread

  struct Stats {
    uint64_t accepted = 0;
    uint64_t completed = 0;
    uint64_t rejected = 0;  // garbage, timeout, authentication
  };
  Stats stats() const { return stats_; }

 private:
  struct Pending {
    kvmi::UniqueFd fd;
    std::string peer;  // for logs: "uid 64055 pid 1234" / "cid 3"
    std::string transport;
    std::vector<uint8_t> buffer;
    uint32_t struct_size = 0;  // known once 4 bytes arrived
    EventLoop::TimerId timer = 0;
  };

  void OnAcceptable();
  void OnHandshakeReadable(int fd);
  void Reject(int fd, const std::string& why, HandshakeResult result = HandshakeResult::kFailed);
  // Who is on the other end (for logs and identities), refused with PermissionDenied when not
  // allowed.
  absl::Status Authenticate(int fd, Pending* pending);

  EventLoop* loop_;
  kvmi::UniqueFd listen_fd_;
  std::string transport_;
  AcceptorOptions options_;
  OnGuest on_guest_;
  std::unordered_map<int, std::unique_ptr<Pending>> pending_;
  Stats stats_;
};

}  // namespace kvmid

#endif  // KVMID_DAEMON_TRANSPORT_ACCEPTOR_H_
