#include "daemon/security/unix_listener.h"

#include <absl/strings/str_cat.h>
#include <fcntl.h>
#include <grpcpp/server_posix.h>
#include <poll.h>
#include <spdlog/spdlog.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <vector>

#include "daemon/security/credentials.h"
#include "daemon/security/identity.h"

namespace kvmid::security {
namespace {

std::string Errno(const std::string& what) {
  return absl::StrCat(what, ": ", std::strerror(errno));
}

// Removes the private bind directory (and the socket if it is still there) on every exit path.
struct TempDir {
  std::string dir, socket;
  ~TempDir() {
    if (!socket.empty()) ::unlink(socket.c_str());
    if (!dir.empty()) ::rmdir(dir.c_str());
  }
};

}  // namespace

absl::StatusOr<BoundUnixSocket> BindUnixSocketWithFinalMode(const std::string& path, uint32_t mode,
                                                            const std::string& group,
                                                            absl::string_view knob, int backlog) {
  if (path.empty() || path.back() == '/') {
    return absl::InvalidArgumentError(absl::StrCat(knob, ": '", path, "' is not a file path"));
  }
  if (mode > 0777) {
    return absl::InvalidArgumentError(absl::StrCat(knob, "_mode: at most 0777"));
  }
  gid_t gid = static_cast<gid_t>(-1);
  if (!group.empty()) {
    auto found = LookUpGroup(group);
    if (!found.ok())
      return absl::NotFoundError(absl::StrCat(knob, "_group: ", found.status().message()));
    gid = *found;
  }
  size_t slash = path.rfind('/');
  std::string dir = slash == std::string::npos ? "." : (slash == 0 ? "/" : path.substr(0, slash));
  if (::mkdir(dir.c_str(), 0750) != 0 && errno != EEXIST) {
    return absl::FailedPreconditionError(Errno(absl::StrCat(knob, ": mkdir ", dir)));
  }
  struct stat existing;
  if (::lstat(path.c_str(), &existing) == 0 && !S_ISSOCK(existing.st_mode)) {
    return absl::FailedPreconditionError(
        absl::StrCat(knob, ": ", path, " exists and is not a socket; not replacing it"));
  }

  TempDir temp;
  std::string dir_template = (dir == "/" ? "" : dir) + "/.kvmid-sock-XXXXXX";
  std::vector<char> buffer(dir_template.begin(), dir_template.end());
  buffer.push_back('\0');
  if (::mkdtemp(buffer.data()) == nullptr) {
    return absl::FailedPreconditionError(Errno(absl::StrCat(knob, ": mkdtemp in ", dir)));
  }
  temp.dir = buffer.data();
  std::string temp_socket = temp.dir + "/s";
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (temp_socket.size() >= sizeof(addr.sun_path) || path.size() >= sizeof(addr.sun_path)) {
    return absl::InvalidArgumentError(
        absl::StrCat(knob, ": ", path, " is too long for a UNIX socket (its directory ",
                     "plus 20 bytes must stay under ", sizeof(addr.sun_path), ")"));
  }
  std::memcpy(addr.sun_path, temp_socket.c_str(), temp_socket.size() + 1);

  kvmi::UniqueFd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
  if (!fd) return absl::InternalError(Errno(absl::StrCat(knob, ": socket")));
  if (::bind(fd.get(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
    return absl::FailedPreconditionError(Errno(absl::StrCat(knob, ": bind ", temp_socket)));
  }
  temp.socket = temp_socket;
  // Mode and group while nobody but us can reach the directory.
  if (::chmod(temp_socket.c_str(), mode) != 0) {
    return absl::FailedPreconditionError(Errno(absl::StrCat(knob, ": chmod ", temp_socket)));
  }
  if (gid != static_cast<gid_t>(-1) &&
      ::chown(temp_socket.c_str(), static_cast<uid_t>(-1), gid) != 0) {
    return absl::FailedPreconditionError(Errno(absl::StrCat(knob, "_group: chown to ", group)));
  }
  struct stat st;
  if (::stat(temp_socket.c_str(), &st) != 0) {
    return absl::InternalError(Errno(absl::StrCat(knob, ": stat ", temp_socket)));
  }
  if (::listen(fd.get(), backlog) != 0) {
    return absl::InternalError(Errno(absl::StrCat(knob, ": listen")));
  }
  if (::rename(temp_socket.c_str(), path.c_str()) != 0) {
    return absl::FailedPreconditionError(Errno(absl::StrCat(knob, ": rename to ", path)));
  }
  temp.socket.clear();  // it is at `path` now; the directory goes
  return BoundUnixSocket{std::move(fd), st.st_ino};
}

absl::StatusOr<std::unique_ptr<UnixApiListener>> UnixApiListener::Bind(const std::string& path,
                                                                       uint32_t mode,
                                                                       const std::string& group) {
  absl::StatusOr<BoundUnixSocket> bound =
      BindUnixSocketWithFinalMode(path, mode, group, "api_socket", kUnixListenBacklog);
  if (!bound.ok()) return bound.status();
  kvmi::UniqueFd wake(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  if (!wake) {
    ::unlink(path.c_str());
    return absl::InternalError(Errno("api_socket: eventfd"));
  }
  if (mode & 0007) {
    spdlog::warn("API socket {} is open to every local user (api_socket_mode {:04o})", path, mode);
  }
  return std::unique_ptr<UnixApiListener>(
      new UnixApiListener(path, std::move(bound->fd), std::move(wake), bound->inode));
}

UnixApiListener::UnixApiListener(std::string path, kvmi::UniqueFd listen_fd, kvmi::UniqueFd wake_fd,
                                 ino_t inode)
    : path_(std::move(path)),
      inode_(inode),
      listen_fd_(std::move(listen_fd)),
      wake_fd_(std::move(wake_fd)) {}

UnixApiListener::~UnixApiListener() { Stop(); }

void UnixApiListener::Start(grpc::Server* server) {
  if (thread_.joinable() || !listen_fd_) return;
  reserve_fd_.Reset(::open("/dev/null", O_RDONLY | O_CLOEXEC));
  thread_ = std::thread([this, server] { AcceptLoop(server); });
}

void UnixApiListener::Stop() {
  if (thread_.joinable()) {
    uint64_t one = 1;
    ssize_t ignored = ::write(wake_fd_.get(), &one, sizeof(one));
    (void)ignored;
    thread_.join();
  }
  if (listen_fd_) {
    listen_fd_.Reset();
    struct stat st;
    // Only our socket: a newer kvmid may have replaced it already.
    if (::lstat(path_.c_str(), &st) == 0 && st.st_ino == inode_) ::unlink(path_.c_str());
  }
}

void UnixApiListener::AcceptLoop(grpc::Server* server) {
  auto last_warning = std::chrono::steady_clock::now() - std::chrono::hours(1);
  uint64_t failures_since_warning = 0;
  for (;;) {
    pollfd fds[2] = {{wake_fd_.get(), POLLIN, 0}, {listen_fd_.get(), POLLIN, 0}};
    if (::poll(fds, 2, -1) < 0) {
      if (errno == EINTR) continue;
      spdlog::error("API socket {}: poll: {}; no longer accepting", path_, std::strerror(errno));
      return;
    }
    if (fds[0].revents) return;
    if (!fds[1].revents) continue;
    int fd = ::accept4(listen_fd_.get(), nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK);
    if (fd >= 0) {
      Adopt(server, kvmi::UniqueFd(fd));
      continue;
    }
    if (errno == EINTR || errno == EAGAIN || errno == ECONNABORTED) continue;
    if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM) {
      int error = errno;
      auto now = std::chrono::steady_clock::now();
      ++failures_since_warning;
      if (now - last_warning >= std::chrono::seconds(kAcceptWarningIntervalSeconds)) {
        last_warning = now;
        spdlog::warn(
            "API socket {}: accept: {}; shedding connections ({} times since the last warning; "
            "warned at most every {} s)",
            path_, std::strerror(error), failures_since_warning, kAcceptWarningIntervalSeconds);
        failures_since_warning = 0;
      }
      // Shed the waiting connection with the reserved descriptor (so poll does not report it
      // again at once), then pause: the limit may take a while to clear.
      if (reserve_fd_) {
        reserve_fd_.Reset();
        int shed = ::accept4(listen_fd_.get(), nullptr, nullptr, SOCK_CLOEXEC);
        if (shed >= 0) ::close(shed);
        reserve_fd_.Reset(::open("/dev/null", O_RDONLY | O_CLOEXEC));
      }
      pollfd wake = {wake_fd_.get(), POLLIN, 0};
      if (::poll(&wake, 1, kAcceptPauseMs) > 0) return;
      continue;
    }
    spdlog::error("API socket {}: accept: {}; no longer accepting", path_, std::strerror(errno));
    return;
  }
}

void UnixApiListener::Adopt(grpc::Server* server, kvmi::UniqueFd connection) {
  ucred cred{};
  socklen_t len = sizeof(cred);
  if (::getsockopt(connection.get(), SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0 ||
      len != sizeof(cred)) {
    spdlog::warn("API socket {}: SO_PEERCRED: {}; connection dropped", path_, std::strerror(errno));
    return;
  }
  UnixPeer peer{cred.uid, cred.gid, cred.pid, path_};
  // Recorded before gRPC can read a byte from it: no call can arrive without its credentials.
  UnixPeerTable::Global().Set(connection.get(), peer);
  accepted_.fetch_add(1, std::memory_order_relaxed);
  spdlog::debug("API socket {}: connection fd:{} from uid={} gid={} pid={}", path_,
                connection.get(), peer.uid, peer.gid, peer.pid);
  grpc::AddInsecureChannelFromFd(server, connection.Release());
}

}  // namespace kvmid::security
