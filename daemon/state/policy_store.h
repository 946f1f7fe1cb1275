// Persistent state: the policies applied through the API survive a restart or a SIGKILL.
//
// They live in one file, <state_dir>/policies.txtpb: a header line
//
//   # kvmid policy state: format 1, crc32c 0x1a2b3c4d, 1234 bytes
//
// then a kvmid.state.PolicyState (daemon/state/policy_state.proto) in protobuf text format, so
// an operator can read what kvmid will restore. The header's length and CRC-32C cover all bytes
// after the header line: a torn or edited file is caught, never half-restored. Each save writes
// a temporary file beside it, fsyncs it, renames it over the old one and fsyncs the directory:
// after a crash the file is either the old or the new state.
//
// A state file that cannot be read, parsed or validated stops start-up with an error naming the
// file and what is wrong. The operator either repairs it or starts with
// --state_recover=quarantine: the bad file is renamed aside (kept for inspection), the event is
// logged, and kvmid starts with no API policies. Never a silent reset.
//
// Leases (what clients armed) are not persisted: their owners are gone after a restart.
#ifndef KVMID_DAEMON_STATE_POLICY_STORE_H_
#define KVMID_DAEMON_STATE_POLICY_STORE_H_

#include <absl/status/status.h>
#include <absl/status/statusor.h>
#include <absl/strings/string_view.h>

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "daemon/base/mutex.h"
#include "daemon/kvmid.h"
#include "proto/kvmi/v1/policy.pb.h"

namespace kvmid {

// The limits of the state file, in one place (error messages name them).
inline constexpr uint32_t kPolicyStateFormat = 1;          // the version this kvmid writes
inline constexpr size_t kMaxPolicyStateBytes = 16u << 20;  // a larger file is refused
inline constexpr size_t kMaxPersistedPolicies = 10000;     // more policies than this are refused
inline constexpr char kPolicyStateFileName[] = "policies.txtpb";

// What start-up does with a state file it cannot use.
enum class StateRecovery {
  kFail,        // stop with the error (default)
  kQuarantine,  // rename the file aside, log it, start with no API policies
};
// "" or "fail" -> kFail, "quarantine" -> kQuarantine.
absl::StatusOr<StateRecovery> ParseStateRecovery(absl::string_view text);

// CRC-32C (Castagnoli), as in the header line.
uint32_t Crc32c(absl::string_view data);

class PolicyStore {
 public:
  // `dir` is created (mode 0700, parents too) on the first Save; Load on a missing directory or
  // file is an empty set (first start).
  explicit PolicyStore(std::string dir);

  const std::string& dir() const { return dir_; }
  const std::string& path() const { return path_; }

  // The saved policies, in order. Errors name the file and what is wrong (I/O, header, length,
  // checksum, text format position, a policy that does not validate, duplicate names).
  absl::StatusOr<std::vector<kvmi::v1::Policy>> Load() const;

  // Replaces the file atomically (temporary file, fsync, rename, fsync of the directory).
  absl::Status Save(const std::vector<kvmi::v1::Policy>& policies);

  // Renames the state file to <file>.corrupt-<UTC time> and returns the new path.
  absl::StatusOr<std::string> Quarantine();

 private:
  const std::string dir_;
  const std::string path_;
  Mutex save_mutex_;  // one writer of the temporary file at a time
};

// The file's bytes for `policies` (header + text). Exposed for tests.
std::string EncodePolicyState(const std::vector<kvmi::v1::Policy>& policies);

// Start-up, before any listener opens: loads the saved policies (quarantining a bad file if
// `recovery` says so), applies them to `daemon` as API-owned policies, then makes the store the
// daemon's persister so that every later API change is saved before it is acknowledged. A
// saved policy whose name the configuration defines is not restored (logged): the configuration
// owns its names, and API overrides of them last until the next reload or restart.
absl::Status RestorePolicies(Daemon* daemon, PolicyStore* store, StateRecovery recovery);

}  // namespace kvmid

#endif  // KVMID_DAEMON_STATE_POLICY_STORE_H_
