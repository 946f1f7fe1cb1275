#include "daemon/vmem/session_reader.h"

#include <cstring>

namespace kvmid::vmem {

absl::Status StatusOf(const CommandResult& result, const std::string& what) {
  using S = CommandResult::Status;
  std::string message = what + ": " + result.ToString();
  switch (result.status) {
    case S::kOk:
      return absl::OkStatus();
    case S::kKvmiError:
      return absl::FailedPreconditionError(message);
    case S::kInvalid:
      return absl::InvalidArgumentError(message);
    case S::kClosed:
      return absl::UnavailableError(message);
    case S::kTimeout:
      return absl::DeadlineExceededError(message);
    case S::kProtocolError:
      return absl::InternalError(message);
    case S::kNotWaiting:
      return absl::FailedPreconditionError(message);
  }
  return absl::UnknownError(message);
}

void SessionReader::ReadEntry(uint64_t gpa, unsigned size,
                              std::function<void(absl::StatusOr<uint64_t>)> done) {
  session_->ReadPhysical(gpa, size, [size, done = std::move(done)](CommandResult result) {
    if (!result.ok()) {
      done(StatusOf(result, "READ_PHYSICAL"));
      return;
    }
    if (result.data.size() != size) {
      done(absl::InternalError("READ_PHYSICAL returned " + std::to_string(result.data.size()) +
                               " bytes for a " + std::to_string(size) + "-byte entry"));
      return;
    }
    uint64_t value = 0;
    std::memcpy(&value, result.data.data(), size);  // x86: little-endian, as the host
    done(value);
  });
}

}  // namespace kvmid::vmem
