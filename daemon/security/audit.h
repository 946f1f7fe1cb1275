// The audit log: one JSON line per mutating call and per denied call (docs/SECURITY.md
// "Audit log"), appended to --audit_log=PATH with one write(2) per line (O_APPEND), reopened on
// SIGHUP for logrotate.
//
//   {"time":"2026-12-05T08:12:16.123456789Z","identity":{"kind":"tls","principal":"spiffe://..."},
//    "peer":"ipv4:10.0.0.7:41234","rpc":"WritePhysical",
//    "guest":{"uuid":"5f0e...","name":"web-1"},"args":{"gpa":"0x1000","size":16},
//    "code":"OK","message":"","duration_ns":183000}
//
// Integration (the API's per-RPC entry point; only API calls write, never a guest's event path):
//
//   if (info.mutating && !audit->Healthy()) -> refuse with audit->UnavailableStatus() (and still
//       Write the refusal: that attempt is how a sink that recovered becomes healthy again);
//   ... run the call ...
//   if (info.mutating || denied) {
//     absl::Status w = audit->Write(record);
//     if (!w.ok()) -> log the record's ToJson() to the error log, and answer a mutating call
//                     with UNAVAILABLE "... done, but the audit log failed: <w>".
//   }
//
// Argument summaries are built from scalars only (AuditArgs): there is no way to put bytes,
// memory contents or a Registers message in a record; Summarize*() pick the fields to keep.
#ifndef KVMID_DAEMON_SECURITY_AUDIT_H_
#define KVMID_DAEMON_SECURITY_AUDIT_H_

#include <absl/status/status.h>
#include <absl/strings/string_view.h>
#include <absl/time/time.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "daemon/base/mutex.h"
#include "daemon/security/authz.h"

namespace kvmid {
namespace security {

// Appends `s` to `out` as a JSON string (with the quotes): '"', '\\' and control characters are
// escaped, as are U+2028/U+2029; bytes that are not well-formed UTF-8 become U+FFFD, so the
// line is always valid UTF-8 and valid JSON whatever a certificate or a client put in `s`.
void AppendJsonString(absl::string_view s, std::string* out);

// A call's argument summary: at most kMaxEntries key/value pairs of scalars (a key set twice
// keeps its last value). Keys are string
// literals (compile-time constants); values are integers, booleans, enum-like names or short
// identifiers (guest, policy and handler names, clipped to kMaxTextBytes). There is no overload
// for bytes or messages: memory contents and register values cannot go in.
class AuditArgs {
 public:
  static constexpr size_t kMaxEntries = 16;
  static constexpr size_t kMaxTextBytes = 256;

  template <size_t N>
  AuditArgs& Uint(const char (&key)[N], uint64_t value) {
    return Add(key, Kind::kUint, value, {});
  }
  // As "0x1000" (addresses).
  template <size_t N>
  AuditArgs& Hex(const char (&key)[N], uint64_t value) {
    return Add(key, Kind::kHex, value, {});
  }
  template <size_t N>
  AuditArgs& Bool(const char (&key)[N], bool value) {
    return Add(key, Kind::kBool, value ? 1 : 0, {});
  }
  // An identifier (a name, an enum value's name): escaped, clipped to kMaxTextBytes.
  template <size_t N>
  AuditArgs& Text(const char (&key)[N], absl::string_view value) {
    return Add(key, Kind::kText, 0, value);
  }

  size_t size() const { return entries_.size(); }
  bool truncated() const { return truncated_; }
  void AppendJson(std::string* out) const;  // {"k":v,...}

 private:
  enum class Kind : uint8_t { kUint, kHex, kBool, kText };
  struct Entry {
    const char* key;
    Kind kind;
    uint64_t number;
    std::string text;
  };
  AuditArgs& Add(const char* key, Kind kind, uint64_t number, absl::string_view text);
  std::vector<Entry> entries_;
  bool truncated_ = false;
};

// Summaries of the requests worth auditing: addresses, sizes, counts, vCPU indexes, names,
// enum names; never data, register or bitmap values. (The guest is in the record itself.)
AuditArgs SummarizeRequest(const kvmi::v1::ApplyPolicyRequest& r);
AuditArgs SummarizeRequest(const kvmi::v1::DeletePolicyRequest& r);
AuditArgs SummarizeRequest(const kvmi::v1::Claim& r);
AuditArgs SummarizeRequest(const kvmi::v1::Verdict& r);
AuditArgs SummarizeRequest(const kvmi::v1::GetRegistersRequest& r);
AuditArgs SummarizeRequest(const kvmi::v1::ReadPhysicalRequest& r);
AuditArgs SummarizeRequest(const kvmi::v1::WritePhysicalRequest& r);
AuditArgs SummarizeRequest(const kvmi::v1::PauseVCPURequest& r);
AuditArgs SummarizeRequest(const kvmi::v1::ResumeVCPURequest& r);
AuditArgs SummarizeRequest(const kvmi::v1::InjectExceptionRequest& r);
AuditArgs SummarizeRequest(const kvmi::v1::GetPageAccessRequest& r);
AuditArgs SummarizeRequest(const kvmi::v1::SetPageAccessRequest& r);
AuditArgs SummarizeRequest(const kvmi::v1::SetRegistersRequest& r);
AuditArgs SummarizeRequest(const kvmi::v1::ControlSPPRequest& r);
AuditArgs SummarizeRequest(const kvmi::v1::GetPageWriteBitmapRequest& r);
AuditArgs SummarizeRequest(const kvmi::v1::SetPageWriteBitmapRequest& r);
AuditArgs SummarizeRequest(const kvmi::v1::ControlEventsRequest& r);
AuditArgs SummarizeRequest(const kvmi::v1::UnhookVMRequest& r);
// Guest-virtual memory: the GVA and the size, never the bytes.
AuditArgs SummarizeRequest(const kvmi::v1::ReadVirtualStreamRequest& r);
AuditArgs SummarizeRequest(const kvmi::v1::WriteVirtualRequest& r);
// An inline Attach command: its request's summary plus "command_id".
AuditArgs SummarizeCommand(const kvmi::v1::Command& c);

struct AuditRecord {
  absl::Time time = absl::Now();  // when the call started
  Caller caller;                  // identity and peer
  const char* rpc = "";           // RpcInfo::name
  std::string guest_uuid;         // empty when the call names no guest (policies, lists)
  std::string guest_name;
  AuditArgs args;
  absl::StatusCode code = absl::StatusCode::kOk;  // the call's result
  std::string message;                            // its error message, clipped
  absl::Duration duration;

  // One line, '\n' included.
  std::string ToJson() const;
};

// Thread-safe; one per daemon.
class AuditLog {
 public:
  // Opens (creates, mode 0600) `path` for appending.
  static absl::StatusOr<std::unique_ptr<AuditLog>> Open(std::string path);
  ~AuditLog();
  AuditLog(const AuditLog&) = delete;
  AuditLog& operator=(const AuditLog&) = delete;

  // Appends the record with one write(2). An error (ENOSPC, EIO, a short write, a closed sink)
  // makes the log unhealthy until a later Write or Reopen succeeds; it is returned as
  // UNAVAILABLE naming the path and the reason.
  absl::Status Write(const AuditRecord& record);
  // Closes and reopens the path (after logrotate moved the file). On failure the old file
  // stays in use if it was healthy; otherwise the log stays unhealthy.
  absl::Status Reopen();
  // False once a write or a reopen failed, until one succeeds.
  bool Healthy() const;
  // OK, or UNAVAILABLE saying why mutating calls are refused.
  absl::Status UnavailableStatus() const;
  const std::string& path() const { return path_; }

 private:
  AuditLog(std::string path, int fd);
  absl::Status FailLocked(absl::Status status) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const std::string path_;
  mutable Mutex mu_;
  int fd_ ABSL_GUARDED_BY(mu_);
  absl::Status failure_ ABSL_GUARDED_BY(mu_);  // OK while healthy
};

}  // namespace security
}  // namespace kvmid

#endif  // KVMID_DAEMON_SECURITY_AUDIT_H_
