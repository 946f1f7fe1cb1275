#include "kernel/transport/socket.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/vm_sockets.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <climits>
#include <cstring>
#include <vector>

namespace kvmi {
namespace {

// Milliseconds for poll() until the deadline: -1 = forever, 0 = already passed.
int PollTimeoutMs(Clock::time_point deadline) {
  if (deadline == kNoDeadline) return -1;
  auto now = Clock::now();
  if (now >= deadline) return 0;
  auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - now).count() + 1;
  return ms > INT_MAX ? INT_MAX : static_cast<int>(ms);
}

// Waits for `events` on fd. kOk when ready (including POLLHUP/POLLERR: the following I/O call
// reports the precise outcome).
IoResult WaitFor(int fd, short events, Clock::time_point deadline) {
  for (;;) {
    pollfd p{fd, events, 0};
    int rc = ::poll(&p, 1, PollTimeoutMs(deadline));
    if (rc > 0) {
      if (p.revents & POLLNVAL) return {IoResult::kError, EBADF};
      return IoResult::Ok();
    }
    if (rc == 0) return {IoResult::kTimeout, 0};
    if (errno != EINTR) return {IoResult::kError, errno};
  }
}

absl::Status FillUnixAddress(const std::string& path, sockaddr_un* addr) {
  std::memset(addr, 0, sizeof(*addr));
  addr->sun_family = AF_UNIX;
  if (path.empty() || path.size() >= sizeof(addr->sun_path)) {
    return absl::InvalidArgumentError("unix socket path must be 1.." +
                                      std::to_string(sizeof(addr->sun_path) - 1) +
                                      " bytes long: '" + path + "'");
  }
  std::memcpy(addr->sun_path, path.data(), path.size());
  return absl::OkStatus();
}

absl::Status ErrnoStatus(const std::string& what, int err) {
  return absl::ErrnoToStatus(err, what);
}

absl::StatusOr<UniqueFd> NewSocket(int family) {
  UniqueFd fd(::socket(family, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (!fd) {
    int err = errno;
    if (family == AF_VSOCK && (err == EAFNOSUPPORT || err == EINVAL || err == ENODEV)) {
      return absl::UnavailableError(
          "AF_VSOCK is not available on this machine (load the vsock modules)");
    }
    return ErrnoStatus("socket", err);
  }
  return fd;
}

bool ParseU32(const std::string& text, uint32_t* out) {
  if (text.empty() || text.size() > 10) return false;
  uint64_t v = 0;
  for (char c : text) {
    if (c < '0' || c > '9') return false;
    v = v * 10 + static_cast<uint64_t>(c - '0');
  }
  if (v > UINT32_MAX) return false;
  *out = static_cast<uint32_t>(v);
  return true;
}

IoResult TryReceive(int fd, void* buf, size_t n, size_t* got, int flags) {
  *got = 0;
  for (;;) {
    ssize_t rc = ::recv(fd, buf, n, MSG_DONTWAIT | flags);
    if (rc > 0) {
      *got = static_cast<size_t>(rc);
      return IoResult::Ok();
    }
    if (rc == 0) return {IoResult::kClosed, 0};
    if (errno == EINTR) continue;
    if (errno == EAGAIN || errno == EWOULDBLOCK) return IoResult::Ok();
    if (errno == ECONNRESET || errno == EPIPE) return {IoResult::kClosed, errno};
    return {IoResult::kError, errno};
  }
}

}  // namespace

std::string IoResult::ToString() const {
  switch (kind) {
    case kOk:
      return "ok";
    case kTimeout:
      return "timed out";
    case kClosed:
      return "peer closed the connection";
    case kError:
      return std::strerror(error);
  }
  return "?";
}

std::string Endpoint::ToString() const {
  if (family == Family::kUnix) return "unix:" + path;
  return "vsock:" + std::to_string(cid) + ":" + std::to_string(port);
}

absl::StatusOr<Endpoint> ParseEndpoint(const std::string& text) {
  Endpoint ep;
  if (text.rfind("unix:", 0) == 0) {
    ep.family = Endpoint::Family::kUnix;
    ep.path = text.substr(5);
    sockaddr_un addr;
    absl::Status valid = FillUnixAddress(ep.path, &addr);
    if (!valid.ok()) return valid;
    return ep;
  }
  if (text.rfind("vsock:", 0) == 0) {
    std::string rest = text.substr(6);
    size_t colon = rest.find(':');
    if (colon == std::string::npos || !ParseU32(rest.substr(0, colon), &ep.cid) ||
        !ParseU32(rest.substr(colon + 1), &ep.port)) {
      return absl::InvalidArgumentError(
          "vsock endpoint must be vsock:CID:PORT with decimal numbers, got '" + text + "'");
    }
    ep.family = Endpoint::Family::kVsock;
    return ep;
  }
  return absl::InvalidArgumentError("endpoint must start with 'unix:' or 'vsock:', got '" + text +
                                    "'");
}

absl::StatusOr<UniqueFd> ConnectEndpoint(const Endpoint& endpoint) {
  if (endpoint.family == Endpoint::Family::kUnix) return ConnectUnix(endpoint.path);
  return ConnectVsock(endpoint.cid, endpoint.port);
}

absl::StatusOr<UniqueFd> ListenEndpoint(const Endpoint& endpoint) {
  if (endpoint.family == Endpoint::Family::kUnix) return ListenUnix(endpoint.path);
  return ListenVsock(endpoint.port);
}

absl::StatusOr<UniqueFd> ConnectUnix(const std::string& path) {
  sockaddr_un addr;
  absl::Status valid = FillUnixAddress(path, &addr);
  if (!valid.ok()) return valid;
  absl::StatusOr<UniqueFd> fd = NewSocket(AF_UNIX);
  if (!fd.ok()) return fd;
  int rc;
  do {
    rc = ::connect(fd->get(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr));
  } while (rc != 0 && errno == EINTR);
  if (rc != 0) return ErrnoStatus("connect unix:" + path, errno);
  return fd;
}

absl::StatusOr<UniqueFd> ConnectVsock(uint32_t cid, uint32_t port) {
  absl::StatusOr<UniqueFd> fd = NewSocket(AF_VSOCK);
  if (!fd.ok()) return fd;
  sockaddr_vm addr;
  std::memset(&addr, 0, sizeof(addr));
  addr.svm_family = AF_VSOCK;
  addr.svm_cid = cid;
  addr.svm_port = port;
  int rc;
  do {
    rc = ::connect(fd->get(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr));
  } while (rc != 0 && errno == EINTR);
  if (rc != 0) {
    return ErrnoStatus("connect vsock:" + std::to_string(cid) + ":" + std::to_string(port), errno);
  }
  return fd;
}

absl::StatusOr<UniqueFd> ListenUnix(const std::string& path) {
  sockaddr_un addr;
  absl::Status valid = FillUnixAddress(path, &addr);
  if (!valid.ok()) return valid;
  absl::StatusOr<UniqueFd> fd = NewSocket(AF_UNIX);
  if (!fd.ok()) return fd;
  struct stat st;
  if (::stat(path.c_str(), &st) == 0 && S_ISSOCK(st.st_mode)) ::unlink(path.c_str());
  if (::bind(fd->get(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
    return ErrnoStatus("bind unix:" + path, errno);
  }
  if (::listen(fd->get(), SOMAXCONN) != 0) return ErrnoStatus("listen unix:" + path, errno);
  return fd;
}

absl::StatusOr<UniqueFd> ListenVsock(uint32_t port) {
  absl::StatusOr<UniqueFd> fd = NewSocket(AF_VSOCK);
  if (!fd.ok()) return fd;
  sockaddr_vm addr;
  std::memset(&addr, 0, sizeof(addr));
  addr.svm_family = AF_VSOCK;
  addr.svm_cid = VMADDR_CID_ANY;
  addr.svm_port = port;
  if (::bind(fd->get(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
    return ErrnoStatus("bind vsock port " + std::to_string(port), errno);
  }
  if (::listen(fd->get(), SOMAXCONN) != 0) {
    return ErrnoStatus("listen vsock port " + std::to_string(port), errno);
  }
  return fd;
}

IoResult Accept(int listen_fd, Clock::time_point deadline, UniqueFd* out) {
  for (;;) {
    IoResult ready = WaitFor(listen_fd, POLLIN, deadline);
    if (!ready.ok()) return ready;
    int fd = ::accept4(listen_fd, nullptr, nullptr, SOCK_CLOEXEC);
    if (fd >= 0) {
      out->Reset(fd);
      return IoResult::Ok();
    }
    if (errno == EINTR || errno == EAGAIN || errno == EWOULDBLOCK || errno == ECONNABORTED) {
      continue;
    }
    return {IoResult::kError, errno};
  }
}

IoResult ReadSome(int fd, void* buf, size_t n, size_t* got, Clock::time_point deadline) {
  *got = 0;
  // Without a deadline a blocking recv() is one syscall per read instead of recv+poll+recv (the
  // host model's receive loop lives here); shutdown(SHUT_RDWR) still wakes it.
  const int flags = deadline == kNoDeadline ? 0 : MSG_DONTWAIT;
  for (;;) {
    ssize_t rc = ::recv(fd, buf, n, flags);
    if (rc > 0) {
      *got = static_cast<size_t>(rc);
      return IoResult::Ok();
    }
    if (rc == 0) return {IoResult::kClosed, 0};
    if (errno == EINTR) continue;
    if (errno != EAGAIN && errno != EWOULDBLOCK) {
      if (errno == ECONNRESET || errno == EPIPE) return {IoResult::kClosed, errno};
      return {IoResult::kError, errno};
    }
    IoResult ready = WaitFor(fd, POLLIN, deadline);
    if (!ready.ok()) return ready;
  }
}

IoResult ReadExact(int fd, void* buf, size_t n, Clock::time_point deadline) {
  auto* p = static_cast<uint8_t*>(buf);
  while (n > 0) {
    size_t got = 0;
    IoResult r = ReadSome(fd, p, n, &got, deadline);
    if (!r.ok()) return r;
    p += got;
    n -= got;
  }
  return IoResult::Ok();
}

IoResult WriteAll(int fd, const void* buf, size_t n, Clock::time_point deadline) {
  const auto* p = static_cast<const uint8_t*>(buf);
  while (n > 0) {
    ssize_t rc = ::send(fd, p, n, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (rc > 0) {
      p += rc;
      n -= static_cast<size_t>(rc);
      continue;
    }
    if (rc < 0 && errno == EINTR) continue;
    if (rc < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      IoResult ready = WaitFor(fd, POLLOUT, deadline);
      if (!ready.ok()) return ready;
      continue;
    }
    if (rc < 0 && (errno == EPIPE || errno == ECONNRESET)) return {IoResult::kClosed, errno};
    return {IoResult::kError, rc < 0 ? errno : EIO};
  }
  return IoResult::Ok();
}

IoResult WaitReadable(int fd, Clock::time_point deadline) { return WaitFor(fd, POLLIN, deadline); }

IoResult TryRead(int fd, void* buf, size_t n, size_t* got) {
  return TryReceive(fd, buf, n, got, 0);
}

bool EnablePeekOffset(int fd) {
  int domain = 0;
  socklen_t len = sizeof(domain);
  if (::getsockopt(fd, SOL_SOCKET, SO_DOMAIN, &domain, &len) != 0) return false;
  if (domain != AF_UNIX) {
    errno = EOPNOTSUPP;
    return false;
  }
  int offset = 0;
  return ::setsockopt(fd, SOL_SOCKET, SO_PEEK_OFF, &offset, sizeof(offset)) == 0;
}

IoResult TryPeek(int fd, void* buf, size_t n, size_t* got) {
  return TryReceive(fd, buf, n, got, MSG_PEEK);
}

IoResult Consume(int fd, size_t n) {
  thread_local std::vector<uint8_t> discard(64 * 1024);  // one recv() for what a reader holds
  while (n > 0) {
    size_t got = 0;
    IoResult r = TryReceive(fd, discard.data(), std::min(n, discard.size()), &got, 0);
    if (!r.ok()) return r;
    // Peeked bytes are in the socket until taken: none there means the caller's count is wrong.
    if (got == 0) return {IoResult::kError, EPROTO};
    n -= got;
  }
  return IoResult::Ok();
}

IoResult TryWrite(int fd, const void* buf, size_t n, size_t* sent) {
  *sent = 0;
  const auto* p = static_cast<const uint8_t*>(buf);
  while (*sent < n) {
    ssize_t rc = ::send(fd, p + *sent, n - *sent, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (rc > 0) {
      *sent += static_cast<size_t>(rc);
      continue;
    }
    if (rc < 0 && errno == EINTR) continue;
    if (rc < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return IoResult::Ok();
    if (rc < 0 && (errno == EPIPE || errno == ECONNRESET)) return {IoResult::kClosed, errno};
    return {IoResult::kError, rc < 0 ? errno : EIO};
  }
  return IoResult::Ok();
}

}  // namespace kvmi
