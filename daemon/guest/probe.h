// Probing a freshly connected host: what KVMI version it speaks, how many vCPUs the guest has,
// and which commands and events QEMU allows (CHECK_COMMAND / CHECK_EVENT for every id), all
// pipelined in one go (replies to VM commands come back in request order, §7.4).
//
// QEMU issues the COMMAND/EVENT allow ioctls only after handing the socket to the kernel, so a
// command that arrives first is refused with -KVM_EPERM (§9 "Race"): a GET_GUEST_INFO refused
// that way is probed again, every kRetryDelay, up to kMaxAttempts rounds.
#ifndef KVMID_DAEMON_GUEST_PROBE_H_
#define KVMID_DAEMON_GUEST_PROBE_H_

#include <absl/status/statusor.h>

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>

#include "daemon/session/guest_session.h"

namespace kvmid {

// What the host allows, as probed.
struct HostCapabilities {
  uint32_t kvmi_version = 0;
  uint32_t vcpu_count = 0;
  uint32_t allowed_commands = 0;  // bit per command id
  uint16_t allowed_events = 0;    // bit per event id
};

class Probe {
 public:
  static constexpr int kMaxAttempts = 40;
  static constexpr std::chrono::milliseconds kRetryDelay{50};

  // The host's answers to one round of probing commands.
  struct Answers {
    bool transport_failed = false;  // a command got no KVMI answer (closed, timeout, malformed)
    std::string failure;            // the first such failure
    uint32_t version = 0;
    int32_t guest_info_err = 0;
    HostCapabilities capabilities;
  };
  // What a round's answers mean: the capabilities, a retry (nullopt), or why the session must
  // close (the status message is the reason).
  static std::optional<absl::StatusOr<HostCapabilities>> Decide(const Answers& answers,
                                                                int attempt);

  using Done = std::function<void(absl::StatusOr<HostCapabilities>)>;
  // Probes `session` (any thread; `done` runs once, on the session's loop thread), retrying as
  // the header says. On an error the caller closes the session with the status message.
  static void Start(const std::shared_ptr<GuestSession>& session, Done done);

 private:
  static void Round(const std::shared_ptr<GuestSession>& session, int attempt,
                    const std::shared_ptr<const Done>& done);
};

}  // namespace kvmid

#endif  // KVMID_DAEMON_GUEST_PROBE_H_
