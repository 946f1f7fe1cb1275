#include "daemon/startup/instance_lock.h"

#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <string>

namespace kvmid {
namespace {

// The PID text a holder wrote (at most a line); "unknown" if there is none yet.
std::string ReadHolder(int fd) {
  char buffer[32] = {};
  ssize_t n = ::pread(fd, buffer, sizeof(buffer) - 1, 0);
  std::string text = n > 0 ? std::string(buffer, static_cast<size_t>(n)) : std::string();
  while (!text.empty() && (text.back() == '\n' || text.back() == ' ')) text.pop_back();
  for (char c : text) {
    if (c < '0' || c > '9') return "unknown";
  }
  return text.empty() ? "unknown" : text;
}

}  // namespace

std::string LockPathFor(const std::string& socket_path) {
  size_t slash = socket_path.rfind('/');
  std::string dir = slash == std::string::npos ? "." : socket_path.substr(0, slash);
  if (dir.empty()) dir = "/";
  return (dir == "/" ? "" : dir) + "/kvmid.lock";
}

absl::StatusOr<InstanceLock> InstanceLock::Acquire(const std::string& path) {
  size_t slash = path.rfind('/');
  if (slash != std::string::npos && slash > 0) {
    ::mkdir(path.substr(0, slash).c_str(), 0750);  // /run/kvmid on a fresh host
  }
  kvmi::UniqueFd fd(::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0644));
  if (!fd) return absl::ErrnoToStatus(errno, "cannot open the instance lock " + path);
  if (::flock(fd.get(), LOCK_EX | LOCK_NB) != 0) {
    if (errno == EWOULDBLOCK) {
      return absl::FailedPreconditionError("another kvmid (pid " + ReadHolder(fd.get()) +
                                           ") holds " + path +
                                           " and serves its sockets; not touching them");
    }
    return absl::ErrnoToStatus(errno, "cannot lock " + path);
  }
  std::string pid = std::to_string(::getpid()) + "\n";
  if (::ftruncate(fd.get(), 0) != 0 ||
      ::pwrite(fd.get(), pid.data(), pid.size(), 0) != static_cast<ssize_t>(pid.size())) {
    return absl::ErrnoToStatus(errno, "cannot write the PID into " + path);
  }
  return InstanceLock(path, std::move(fd));
}

}  // namespace kvmid
