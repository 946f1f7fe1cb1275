#include "daemon/security/audit.h"

#include <absl/strings/str_cat.h>
#include <absl/strings/str_format.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <utility>

namespace kvmid {
namespace security {
namespace {

constexpr size_t kMaxMessageBytes = 1024;

// The length of the well-formed UTF-8 sequence at the start of `s` (RFC 3629: no overlong
// forms, no surrogates, nothing above U+10FFFF), or 0.
size_t Utf8SequenceLength(absl::string_view s) {
  const auto b = [&](size_t i) { return static_cast<unsigned char>(s[i]); };
  const unsigned char c = b(0);
  if (c < 0x80) return 1;
  size_t n;
  unsigned char lo = 0x80, hi = 0xbf;  // bounds of the second byte
  if (c >= 0xc2 && c <= 0xdf) {
    n = 2;
  } else if (c >= 0xe0 && c <= 0xef) {
    n = 3;
    if (c == 0xe0) lo = 0xa0;  // overlong
    if (c == 0xed) hi = 0x9f;  // surrogates
  } else if (c >= 0xf0 && c <= 0xf4) {
    n = 4;
    if (c == 0xf0) lo = 0x90;  // overlong
    if (c == 0xf4) hi = 0x8f;  // above U+10FFFF
  } else {
    return 0;
  }
  if (s.size() < n) return 0;
  if (b(1) < lo || b(1) > hi) return 0;
  for (size_t i = 2; i < n; ++i) {
    if (b(i) < 0x80 || b(i) > 0xbf) return 0;
  }
  return n;
}

// Clips `s` to at most `max` bytes without cutting a UTF-8 sequence in two.
absl::string_view Clip(absl::string_view s, size_t max) {
  if (s.size() <= max) return s;
  size_t end = 0;
  while (end < max) {
    size_t n = Utf8SequenceLength(s.substr(end));
    if (n == 0) n = 1;  // replaced anyway
    if (end + n > max) break;
    end += n;
  }
  return s.substr(0, end);
}

void AppendCaller(const Caller& caller, std::string* out) {
  switch (caller.kind) {
    case Caller::Kind::kTls:
      out->append("{\"kind\":\"tls\",\"principal\":");
      AppendJsonString(caller.principal, out);
      out->append("}");
      return;
    case Caller::Kind::kUnix:
      absl::StrAppend(out, "{\"kind\":\"unix\",\"uid\":", caller.uid, ",\"gid\":", caller.gid);
      if (caller.pid != 0) absl::StrAppend(out, ",\"pid\":", caller.pid);
      out->append("}");
      return;
    case Caller::Kind::kNone:
      break;
  }
  out->append("{\"kind\":\"none\"}");
}

absl::Status ErrnoStatus(absl::string_view what, const std::string& path, int err) {
  return absl::UnavailableError(
      absl::StrCat("audit log ", path, ": ", what, ": ", std::strerror(err)));
}

int OpenForAppend(const std::string& path) {
  return ::open(path.c_str(), O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC | O_NOCTTY, 0600);
}

}  // namespace

void AppendJsonString(absl::string_view s, std::string* out) {
  out->push_back('"');
  size_t i = 0;
  while (i < s.size()) {
    const unsigned char c = static_cast<unsigned char>(s[i]);
    if (c < 0x80) {
      switch (c) {
        case '"':
          out->append("\\\"");
          break;
        case '\\':
          out->append("\\\\");
          break;
        case '\n':
          out->append("\\n");
          break;
        case '\r':
          out->append("\\r");
          break;
        case '\t':
          out->append("\\t");
          break;
        default:
          if (c < 0x20 || c == 0x7f) {
            absl::StrAppendFormat(out, "\\u%04x", c);
          } else {
            out->push_back(static_cast<char>(c));
          }
      }
      ++i;
      continue;
    }
    const size_t n = Utf8SequenceLength(s.substr(i));
    if (n == 0) {
      out->append("\\ufffd");
      ++i;
      continue;
    }
    // U+2028 and U+2029 end lines in JavaScript.
    if (n == 3 && c == 0xe2 && static_cast<unsigned char>(s[i + 1]) == 0x80 &&
        (static_cast<unsigned char>(s[i + 2]) == 0xa8 ||
         static_cast<unsigned char>(s[i + 2]) == 0xa9)) {
      absl::StrAppendFormat(out, "\\u%04x", s[i + 2] == '\xa8' ? 0x2028 : 0x2029);
    } else {
      out->append(s.data() + i, n);
    }
    i += n;
  }
  out->push_back('"');
}

AuditArgs& AuditArgs::Add(const char* key, Kind kind, uint64_t number, absl::string_view text) {
  for (Entry& e : entries_) {
    if (std::strcmp(e.key, key) == 0) {  // a key once: the last value wins
      e = Entry{key, kind, number, std::string(Clip(text, kMaxTextBytes))};
      return *this;
    }
  }
  if (entries_.size() >= kMaxEntries) {
    truncated_ = true;
    return *this;
  }
  entries_.push_back(Entry{key, kind, number, std::string(Clip(text, kMaxTextBytes))});
  return *this;
}

void AuditArgs::AppendJson(std::string* out) const {
  out->push_back('{');
  bool first = true;
  for (const Entry& e : entries_) {
    if (!first) out->push_back(',');
    first = false;
    AppendJsonString(e.key, out);
    out->push_back(':');
    switch (e.kind) {
      case Kind::kUint:
        absl::StrAppend(out, e.number);
        break;
      case Kind::kHex:
        absl::StrAppendFormat(out, "\"0x%x\"", e.number);
        break;
      case Kind::kBool:
        out->append(e.number ? "true" : "false");
        break;
      case Kind::kText:
        AppendJsonString(e.text, out);
        break;
    }
  }
  if (truncated_) absl::StrAppend(out, first ? "" : ",", "\"truncated\":true");
  out->push_back('}');
}

// ---- Summaries ----

namespace {

template <typename Repeated>
uint64_t Count(const Repeated& r) {
  return static_cast<uint64_t>(r.size());
}

}  // namespace

AuditArgs SummarizeRequest(const kvmi::v1::ApplyPolicyRequest& r) {
  const kvmi::v1::Policy& p = r.policy();
  AuditArgs a;
  a.Text("policy", p.name())
      .Text("mode", kvmi::v1::Mode_Name(p.mode()))
      .Text("action", kvmi::v1::Action_Name(p.action()));
  switch (p.rule_case()) {
    case kvmi::v1::Policy::kProtectPages:
      a.Text("rule", "protect_pages")
          .Hex("gpa_first", p.protect_pages().gpa_first())
          .Hex("gpa_last", p.protect_pages().gpa_last());
      break;
    case kvmi::v1::Policy::kForbidCrBitsClear:
      a.Text("rule", "forbid_cr_bits_clear").Uint("cr", p.forbid_cr_bits_clear().cr());
      break;
    case kvmi::v1::Policy::kLockMsr:
      a.Text("rule", "lock_msr").Hex("msr", p.lock_msr().msr());
      break;
    case kvmi::v1::Policy::kMatch:
      a.Text("rule", "match");
      break;
    case kvmi::v1::Policy::RULE_NOT_SET:
      a.Text("rule", "none");
      break;
  }
  a.Uint("description_bytes", p.description().size())
      .Uint("policy_bytes", p.ByteSizeLong())
      .Uint("guest_uuids", Count(p.guests().uuids()))
      .Uint("guest_names", Count(p.guests().names()))
      .Uint("guest_labels", Count(p.guests().labels()))
      .Bool("etag_given", !r.etag().empty())
      .Bool("allow_replace", r.allow_replace())
      .Bool("override_config", r.override_config());
  return a;
}

AuditArgs SummarizeRequest(const kvmi::v1::DeletePolicyRequest& r) {
  return std::move(AuditArgs()
                       .Text("policy", r.name())
                       .Bool("etag_given", !r.etag().empty())
                       .Bool("override_config", r.override_config()));
}

AuditArgs SummarizeRequest(const kvmi::v1::Claim& r) {
  AuditArgs a;
  a.Text("handler_id", r.handler_id())
      .Uint("vms", Count(r.vms()))
      .Uint("events", Count(r.events()))
      .Uint("deadline_ms", r.deadline_ms())
      .Text("fallback", kvmi::v1::Action_Name(r.fallback()))
      .Uint("arm_events", Count(r.arm_events()))
      .Uint("arm_crs", Count(r.arm_crs()))
      .Uint("arm_msrs", Count(r.arm_msrs()));
  if (r.has_context()) {  // guest memory read with each event: how much, never the bytes
    a.Uint("context_rip_bytes", r.context().rip_bytes())
        .Uint("context_rsp_bytes", r.context().rsp_bytes())
        .Uint("context_pf_bytes", r.context().pf_bytes());
  }
  return a;
}

AuditArgs SummarizeRequest(const kvmi::v1::Verdict& r) {
  // Whether registers or a new CR/MSR value were given, never their values.
  AuditArgs a;
  a.Uint("event_id", r.event_id())
      .Text("action", kvmi::v1::Action_Name(r.action()))
      .Bool("new_value", r.has_new_value())
      .Bool("set_registers", r.has_set_registers())
      .Bool("pf_reply", r.has_pf());
  return a;
}

AuditArgs SummarizeRequest(const kvmi::v1::GetRegistersRequest& r) {
  AuditArgs a;
  a.Text("vm", r.vm()).Uint("vcpu", r.vcpu()).Uint("msrs", Count(r.msrs()));
  return a;
}

AuditArgs SummarizeRequest(const kvmi::v1::ReadPhysicalRequest& r) {
  AuditArgs a;
  a.Text("vm", r.vm()).Hex("gpa", r.gpa()).Uint("size", r.size());
  return a;
}

AuditArgs SummarizeRequest(const kvmi::v1::WritePhysicalRequest& r) {
  AuditArgs a;
  a.Text("vm", r.vm()).Hex("gpa", r.gpa()).Uint("size", r.data().size());
  return a;
}

namespace {

// Pause and Resume name a guest and one vCPU or all of them.
template <typename Request>
AuditArgs SummarizeVcpuTarget(const Request& r) {
  AuditArgs a;
  a.Text("vm", r.vm());
  if (r.has_vcpu()) {
    a.Uint("vcpu", r.vcpu());
  } else {
    a.Text("vcpu", "all");
  }
  return a;
}

}  // namespace

AuditArgs SummarizeRequest(const kvmi::v1::PauseVCPURequest& r) { return SummarizeVcpuTarget(r); }

AuditArgs SummarizeRequest(const kvmi::v1::ResumeVCPURequest& r) { return SummarizeVcpuTarget(r); }

AuditArgs SummarizeRequest(const kvmi::v1::InjectExceptionRequest& r) {
  AuditArgs a;
  a.Text("vm", r.vm()).Uint("vcpu", r.vcpu()).Uint("vector", r.vector());
  if (r.has_error_code()) a.Hex("error_code", r.error_code());
  if (r.address() != 0) a.Hex("address", r.address());
  return a;
}

AuditArgs SummarizeRequest(const kvmi::v1::GetPageAccessRequest& r) {
  AuditArgs a;
  a.Text("vm", r.vm()).Uint("pages", Count(r.gpas()));
  return a;
}

AuditArgs SummarizeRequest(const kvmi::v1::SetPageAccessRequest& r) {
  AuditArgs a;
  a.Text("vm", r.vm()).Uint("pages", Count(r.pages()));
  if (r.pages_size() > 0) a.Hex("first_gpa", r.pages(0).gpa());
  a.Bool("all_or_nothing", r.all_or_nothing());
  return a;
}

AuditArgs SummarizeRequest(const kvmi::v1::SetRegistersRequest& r) {
  // Which vCPU and which of its events, never the values. event_id 0 (unset): the registers went
  // to whatever event the vCPU waited with, and the record says so by leaving it out.
  AuditArgs a;
  a.Text("vm", r.vm()).Uint("vcpu", r.vcpu());
  if (r.event_id() != 0) a.Uint("event_id", r.event_id());
  return a;
}

AuditArgs SummarizeRequest(const kvmi::v1::ControlSPPRequest& r) {
  return std::move(AuditArgs().Text("vm", r.vm()));
}

AuditArgs SummarizeRequest(const kvmi::v1::GetPageWriteBitmapRequest& r) {
  AuditArgs a;
  a.Text("vm", r.vm()).Uint("pages", Count(r.gpas()));
  return a;
}

AuditArgs SummarizeRequest(const kvmi::v1::SetPageWriteBitmapRequest& r) {
  AuditArgs a;
  a.Text("vm", r.vm()).Uint("pages", Count(r.pages()));
  if (r.pages_size() > 0) a.Hex("first_gpa", r.pages(0).gpa());
  return a;
}

AuditArgs SummarizeRequest(const kvmi::v1::ControlEventsRequest& r) {
  AuditArgs a;
  a.Text("vm", r.vm());
  if (r.has_vcpu()) {
    a.Uint("vcpu", r.vcpu());
  } else {
    a.Text("vcpu", "all");
  }
  a.Bool("enable", r.enable())
      .Uint("events", Count(r.events()))
      .Uint("crs", Count(r.crs()))
      .Uint("msrs", Count(r.msrs()));
  return a;
}

AuditArgs SummarizeRequest(const kvmi::v1::UnhookVMRequest& r) {
  return std::move(AuditArgs().Text("vm", r.vm()));
}

AuditArgs SummarizeRequest(const kvmi::v1::ReadVirtualStreamRequest& r) {
  AuditArgs a;
  a.Text("vm", r.vm()).Hex("gva", r.gva()).Uint("size", r.size());
  return a;
}

AuditArgs SummarizeRequest(const kvmi::v1::WriteVirtualRequest& r) {
  AuditArgs a;
  a.Text("vm", r.vm()).Hex("gva", r.gva()).Uint("size", r.data().size());
  return a;
}

AuditArgs SummarizeCommand(const kvmi::v1::Command& c) {
  using C = kvmi::v1::Command;
  AuditArgs a;
  switch (c.request_case()) {
    case C::kGetRegisters:
      a = SummarizeRequest(c.get_registers());
      break;
    case C::kSetRegisters:
      a = SummarizeRequest(c.set_registers());
      break;
    case C::kReadPhysical:
      a = SummarizeRequest(c.read_physical());
      break;
    case C::kWritePhysical:
      a = SummarizeRequest(c.write_physical());
      break;
    case C::kGetPageAccess:
      a = SummarizeRequest(c.get_page_access());
      break;
    case C::kSetPageAccess:
      a = SummarizeRequest(c.set_page_access());
      break;
    case C::kPauseVcpu:
      a = SummarizeRequest(c.pause_vcpu());
      break;
    case C::kResumeVcpu:
      a = SummarizeRequest(c.resume_vcpu());
      break;
    case C::kInjectException:
      a = SummarizeRequest(c.inject_exception());
      break;
    case C::kControlEvents:
      a = SummarizeRequest(c.control_events());
      break;
    case C::kGetCpuid:
      a.Text("vm", c.get_cpuid().vm()).Uint("vcpu", c.get_cpuid().vcpu());
      break;
    case C::kGetMtrrType:
      a.Text("vm", c.get_mtrr_type().vm()).Uint("vcpu", c.get_mtrr_type().vcpu());
      break;
    case C::kTranslateAddress:
      a.Text("vm", c.translate_address().vm()).Uint("gva", c.translate_address().gva());
      break;
    case C::kReadVirtual:
      a.Text("vm", c.read_virtual().vm())
          .Hex("gva", c.read_virtual().gva())
          .Uint("size", c.read_virtual().size());
      break;
    case C::kWriteVirtual:
      a = SummarizeRequest(c.write_virtual());
      break;
    case C::REQUEST_NOT_SET:
      break;
  }
  a.Uint("command_id", c.id());
  return a;
}

// ---- Records ----

std::string AuditRecord::ToJson() const {
  std::string out;
  out.reserve(256);
  out.append("{\"time\":");
  AppendJsonString(absl::FormatTime("%Y-%m-%dT%H:%M:%E9SZ", time, absl::UTCTimeZone()), &out);
  out.append(",\"identity\":");
  AppendCaller(caller, &out);
  out.append(",\"peer\":");
  AppendJsonString(caller.peer, &out);
  out.append(",\"rpc\":");
  AppendJsonString(rpc == nullptr ? "" : rpc, &out);
  out.append(",\"guest\":{\"uuid\":");
  AppendJsonString(guest_uuid, &out);
  out.append(",\"name\":");
  AppendJsonString(Clip(guest_name, AuditArgs::kMaxTextBytes), &out);
  out.append("},\"args\":");
  args.AppendJson(&out);
  out.append(",\"code\":");
  AppendJsonString(absl::StatusCodeToString(code), &out);
  out.append(",\"message\":");
  AppendJsonString(Clip(message, kMaxMessageBytes), &out);
  absl::StrAppend(&out, ",\"duration_ns\":", absl::ToInt64Nanoseconds(duration), "}\n");
  return out;
}

// ---- The log ----

absl::StatusOr<std::unique_ptr<AuditLog>> AuditLog::Open(std::string path) {
  if (path.empty()) return absl::InvalidArgumentError("audit_log: empty path");
  const int fd = OpenForAppend(path);
  if (fd < 0) {
    return absl::UnavailableError(
        absl::StrCat("audit log ", path, ": cannot open: ", std::strerror(errno)));
  }
  return std::unique_ptr<AuditLog>(new AuditLog(std::move(path), fd));
}

AuditLog::AuditLog(std::string path, int fd) : path_(std::move(path)), fd_(fd) {}

AuditLog::~AuditLog() {
  MutexLock lock(&mu_);
  if (fd_ >= 0) ::close(fd_);
}

absl::Status AuditLog::FailLocked(absl::Status status) {
  failure_ = status;
  return status;
}

absl::Status AuditLog::Write(const AuditRecord& record) {
  const std::string line = record.ToJson();
  MutexLock lock(&mu_);
  if (fd_ < 0) return FailLocked(ErrnoStatus("not open", path_, EBADF));
  // A file removed under us (not renamed: logrotate's rename keeps a link) would swallow every
  // record: recreate it, or fail.
  struct stat st;
  if (::fstat(fd_, &st) != 0) return FailLocked(ErrnoStatus("fstat", path_, errno));
  if (st.st_nlink == 0) {
    const int fd = OpenForAppend(path_);
    if (fd < 0) return FailLocked(ErrnoStatus("removed, and cannot be recreated", path_, errno));
    ::close(fd_);
    fd_ = fd;
  }
  ssize_t n;
  do {
    n = ::write(fd_, line.data(), line.size());
  } while (n < 0 && errno == EINTR);
  if (n < 0) return FailLocked(ErrnoStatus("write", path_, errno));
  if (static_cast<size_t>(n) != line.size()) {
    // Most likely the disk filled up mid-line. End the partial line so that the next record
    // starts on a line of its own (best effort), and report the loss.
    (void)!::write(fd_, "\n", 1);
    return FailLocked(absl::UnavailableError(absl::StrFormat(
        "audit log %s: short write (%d of %d bytes; disk full?)", path_, n, line.size())));
  }
  failure_ = absl::OkStatus();
  return absl::OkStatus();
}

absl::Status AuditLog::Reopen() {
  const int fd = OpenForAppend(path_);
  const int err = errno;
  MutexLock lock(&mu_);
  if (fd < 0) {
    absl::Status s = ErrnoStatus("cannot reopen", path_, err);
    // A healthy old descriptor keeps taking records (into the rotated file): nothing is lost.
    if (!failure_.ok() || fd_ < 0) failure_ = s;
    return s;
  }
  if (fd_ >= 0) ::close(fd_);
  fd_ = fd;
  failure_ = absl::OkStatus();
  return absl::OkStatus();
}

bool AuditLog::Healthy() const {
  MutexLock lock(&mu_);
  return failure_.ok();
}

absl::Status AuditLog::UnavailableStatus() const {
  MutexLock lock(&mu_);
  if (failure_.ok()) return absl::OkStatus();
  return absl::UnavailableError(
      absl::StrCat("refused: the audit log cannot record this call (", failure_.message(), ")"));
}

}  // namespace security
}  // namespace kvmid
