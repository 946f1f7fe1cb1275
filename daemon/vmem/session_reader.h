// The page walker's reader in kvmid: each entry is one READ_PHYSICAL on the guest's session
// (pipelined with whatever else is in flight on it).
#ifndef KVMID_DAEMON_VMEM_SESSION_READER_H_
#define KVMID_DAEMON_VMEM_SESSION_READER_H_

#include <memory>

#include "daemon/session/guest_session.h"
#include "daemon/vmem/page_walker.h"

namespace kvmid::vmem {

class SessionReader : public EntryReader {
 public:
  explicit SessionReader(std::shared_ptr<GuestSession> session) : session_(std::move(session)) {}
  // `done` runs on the session's loop thread. A failed read keeps the guest's error: the kernel's
  // err name (e.g. -KVM_EINVAL for a GPA outside guest RAM) as FAILED_PRECONDITION, a closed
  // session as UNAVAILABLE, a timeout as DEADLINE_EXCEEDED.
  void ReadEntry(uint64_t gpa, unsigned size,
                 std::function<void(absl::StatusOr<uint64_t>)> done) override;

 private:
  std::shared_ptr<GuestSession> session_;
};

// A failed command as an absl::Status (the codes of the API's ToStatus).
absl::Status StatusOf(const CommandResult& result, const std::string& what);

}  // namespace kvmid::vmem

#endif  // KVMID_DAEMON_VMEM_SESSION_READER_H_
