// The API's UNIX socket, accepted by kvmid itself so that every connection's peer credentials
// (SO_PEERCRED) are known before gRPC sees it (gRPC keeps them to itself for UDS).
//
// The socket appears at its path already with its final mode and group, whatever the umask: it
// is bound inside a fresh private directory (mkdtemp, 0700) next to the target, chmod/chown'ed
// there, and rename()d into place (atomic; a stale socket of a previous run is replaced). The
// umask is process-wide and kvmid already runs threads when the API starts, so changing it
// around bind() would race with every other file the daemon creates; the private directory has
// no such window and no global state.
//
// Each accepted connection's credentials go to UnixPeerTable under its descriptor number, then
// the descriptor goes to gRPC (grpc::AddInsecureChannelFromFd), which names it "fd:N":
// IdentifyCaller (identity.h) maps it back.
#ifndef KVMID_DAEMON_SECURITY_UNIX_LISTENER_H_
#define KVMID_DAEMON_SECURITY_UNIX_LISTENER_H_

#include <absl/status/statusor.h>
#include <absl/strings/string_view.h>
#include <grpcpp/server.h>
#include <sys/types.h>

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <thread>

#include "kernel/transport/unique_fd.h"

namespace kvmid::security {

inline constexpr int kUnixListenBacklog = 128;
// After EMFILE/ENFILE (descriptor limit), the accept loop sheds the pending connection with
// its reserved descriptor and pauses this long before accepting again (no spinning).
inline constexpr int kAcceptPauseMs = 100;
inline constexpr int kAcceptWarningIntervalSeconds = 10;  // at most one such warning per period

// A listening UNIX socket created at `path` with exactly `mode` and, if `group` is not empty,
// that group (a name or a number), by the private-directory-and-rename() scheme above. The parent
// directory is created 0750 if missing; an existing non-socket at `path` is an error, a stale
// socket is replaced. Errors name `knob` ("api_socket", "unix_socket"; "<knob>_mode",
// "<knob>_group"). Used for the API socket and for the KVMI socket.
struct BoundUnixSocket {
  kvmi::UniqueFd fd;  // non-blocking, listening
  ino_t inode = 0;    // of the socket file
};
absl::StatusOr<BoundUnixSocket> BindUnixSocketWithFinalMode(const std::string& path, uint32_t mode,
                                                            const std::string& group,
                                                            absl::string_view knob, int backlog);

class UnixApiListener {
 public:
  // Creates the listening socket at `path` with exactly `mode` (e.g. 0660) and, if `group` is
  // not empty, that group (a name or a number). The parent directory is created 0750 if it
  // does not exist. An existing non-socket file at `path` is an error, never replaced.
  static absl::StatusOr<std::unique_ptr<UnixApiListener>> Bind(const std::string& path,
                                                               uint32_t mode,
                                                               const std::string& group);
  ~UnixApiListener();
  UnixApiListener(const UnixApiListener&) = delete;
  UnixApiListener& operator=(const UnixApiListener&) = delete;

  // Starts the accept thread; each connection is handed to `server` (which must outlive Stop).
  void Start(grpc::Server* server);
  // Stops accepting (connections already handed over stay with gRPC) and removes the socket.
  // Call before shutting the server down. Idempotent.
  void Stop();

  const std::string& path() const { return path_; }
  uint64_t accepted() const { return accepted_.load(std::memory_order_relaxed); }

 private:
  UnixApiListener(std::string path, kvmi::UniqueFd listen_fd, kvmi::UniqueFd wake_fd, ino_t inode);
  void AcceptLoop(grpc::Server* server);  // the accept thread only
  void Adopt(grpc::Server* server, kvmi::UniqueFd connection);

  const std::string path_;
  const ino_t inode_;  // of the socket file we created (Stop unlinks only that one)
  kvmi::UniqueFd listen_fd_;
  kvmi::UniqueFd wake_fd_;     // eventfd: Stop wakes the loop
  kvmi::UniqueFd reserve_fd_;  // accept thread only: given up to shed a connection at EMFILE
  std::thread thread_;
  std::atomic<uint64_t> accepted_{0};
};

}  // namespace kvmid::security

#endif  // KVMID_DAEMON_SECURITY_UNIX_LISTENER_H_
