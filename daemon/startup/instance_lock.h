// One kvmid per socket directory: an flock(2) on `<dir>/kvmid.lock`, holding the owner's PID.
// The kernel drops the lock when its holder exits, however it exits (SIGKILL too), so a lock
// that can be taken means every socket file in the directory is stale and may be replaced; a
// lock that cannot be taken means another kvmid serves them, and nothing may be touched.
#ifndef KVMID_DAEMON_STARTUP_INSTANCE_LOCK_H_
#define KVMID_DAEMON_STARTUP_INSTANCE_LOCK_H_

#include <absl/status/statusor.h>
#include <sys/types.h>

#include <string>

#include "kernel/transport/unique_fd.h"

namespace kvmid {

// The lock file kvmid uses for the socket at `socket_path` (its directory + "/kvmid.lock").
std::string LockPathFor(const std::string& socket_path);

class InstanceLock {
 public:
  // Creates the directory if needed (0750), opens and locks `path`, writes this process's PID.
  // FailedPrecondition, naming the holder's PID, if another process holds it.
  static absl::StatusOr<InstanceLock> Acquire(const std::string& path);

  InstanceLock(InstanceLock&&) noexcept = default;
  InstanceLock& operator=(InstanceLock&&) noexcept = default;
  // Releases the lock (the file stays: removing it would race with a newcomer's open).
  ~InstanceLock() = default;

  const std::string& path() const { return path_; }

 private:
  InstanceLock(std::string path, kvmi::UniqueFd fd) : path_(std::move(path)), fd_(std::move(fd)) {}
  std::string path_;
  kvmi::UniqueFd fd_;
};

}  // namespace kvmid

#endif  // KVMID_DAEMON_STARTUP_INSTANCE_LOCK_H_
