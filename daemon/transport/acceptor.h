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
#include "daemon/security/limits.h"
#include "daemon/session/guest_session.h"
#include "kernel/abi/handshake.h"
#include "kernel/transport/unique_fd.h"

namespace kvmid {

// Handshakes in progress at once by default; more connections wait in the kernel's backlog.
inline constexpr size_t kDefaultMaxConcurrentHandshakes = 1024;
// At EMFILE/ENFILE (descriptor limit) the acceptor sheds the waiting connection with a reserved
// descriptor and stops watching the listener this long, so it never spins.
inline constexpr std::chrono::milliseconds kAcceptPauseAtFdLimit{100};
// Listener warnings (descriptor limit, a peer over its handshake slots): at most one line per
// interval and kind, with the count of what happened since the previous line.
inline constexpr std::chrono::seconds kListenerWarningInterval{10};

// One log line per interval at most; the occurrences in between are counted and reported by the
// next line. Single-threaded (the acceptor's loop).
class WarningLimiter {
 public:
  explicit WarningLimiter(std::chrono::steady_clock::duration interval) : interval_(interval) {}
  // True if a line may be written now; then *since_last = occurrences since the previous line
  // (this one included).
  bool Allow(uint64_t* since_last);
  uint64_t total() const { return total_; }

 private:
  std::chrono::steady_clock::duration interval_;
  std::optional<std::chrono::steady_clock::time_point> last_;
  uint64_t pending_ = 0;
  uint64_t total_ = 0;
};

struct AcceptorOptions {
  std::chrono::milliseconds handshake_timeout{5000};
  // Sent back as cookie_hash (SHA-1 of the shared secret); QEMU kvmi-v7 refuses a mismatch.
  std::optional<std::array<uint8_t, kvmi::kCookieHashSize>> cookie_hash;
  // UNIX sockets: peer uids allowed to connect (SO_PEERCRED); empty = any.
  std::vector<uid_t> allowed_uids;
  // AF_VSOCK: peer CIDs allowed; empty = any.
  std::vector<uint32_t> allowed_cids;
  size_t max_concurrent_handshakes = kDefaultMaxConcurrentHandshakes;
  // Handshakes in progress at once per connecting peer (uid on UNIX, CID on vsock), within the
  // global max_concurrent_handshakes, so that one peer cannot take every slot (limits
  // handshake_slots_per_peer; Daemon::limits()).
  uint64_t handshake_slots_per_peer = security::Limits{}.handshake_slots_per_peer;
  // Tests: the key a connection's slots are counted under, instead of "uid N" / "cid N" (tests
  // all run as one uid). Gets the accepted socket.
  std::function<std::string(int fd)> peer_key_for_test;
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
  // Any thread (a reload): the per-peer handshake slots for the next connections.
  void SetHandshakeSlotsPerPeer(uint64_t slots) { peer_slots_.SetMax(slots); }

  struct Stats {
    uint64_t accepted = 0;
    uint64_t completed = 0;
    uint64_t rejected = 0;         // garbage, timeout, authentication, busy
    uint64_t over_peer_limit = 0;  // closed at once: the peer had all its handshake slots
    uint64_t fd_limit_pauses = 0;  // EMFILE/ENFILE: connection shed, listener paused
  };
  Stats stats() const { return stats_; }

 private:
  struct Pending {
    kvmi::UniqueFd fd;
    std::string peer;      // for logs: "uid 64055 pid 1234" / "cid 3"
    std::string peer_key;  // what its handshake slot is counted under: "uid 64055" / "cid 3"
    security::KeyedSlots::Slot slot;  // released when the handshake ends, however it ends
    std::string transport;
    std::vector<uint8_t> buffer;
    uint32_t struct_size = 0;  // known once 4 bytes arrived
    EventLoop::TimerId timer = 0;
  };

  void OnAcceptable();
  // EMFILE/ENFILE: shed one waiting connection, stop watching the listener for a while.
  void PauseAtFdLimit(int error);
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
  security::KeyedSlots peer_slots_;
  kvmi::UniqueFd reserve_fd_;  // /dev/null, given up at EMFILE to accept (and shed) one connection
  EventLoop::TimerId resume_timer_ = 0;
  WarningLimiter fd_limit_warnings_{kListenerWarningInterval};
  WarningLimiter peer_limit_warnings_{kListenerWarningInterval};
  Stats stats_;
};

}  // namespace kvmid

#endif  // KVMID_DAEMON_TRANSPORT_ACCEPTOR_H_
