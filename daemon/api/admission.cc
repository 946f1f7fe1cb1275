#include "daemon/api/admission.h"

#include <absl/strings/str_cat.h>
#include <spdlog/spdlog.h>

#include <memory>
#include <utility>
#include <vector>

#include "daemon/api/convert.h"
#include "daemon/metrics/hooks.h"

namespace kvmid::api {

using grpc::Status;
using grpc::StatusCode;
using security::AuditArgs;
using security::AuditRecord;
using security::Caller;
using security::GuestRef;
using security::Rpc;
using security::RpcInfo;

namespace {

// A guest selector from a request, as it may appear in a record or a log line.
std::string Clipped(const std::string& text) {
  return text.size() <= AuditArgs::kMaxTextBytes ? text : text.substr(0, AuditArgs::kMaxTextBytes);
}

// "kvmi.v1.Introspection/GetVM": the method as Metrics labels it (no leading slash).
absl::string_view MetricMethod(const RpcInfo& info) {
  absl::string_view method = info.method;
  if (!method.empty() && method.front() == '/') method.remove_prefix(1);
  return method;
}

bool IsDenial(absl::StatusCode code) {
  return code == absl::StatusCode::kPermissionDenied || code == absl::StatusCode::kUnauthenticated;
}

AuditRecord RecordOf(const Caller& caller, const RpcInfo& info, const GuestRef& guest,
                     AuditArgs args, absl::Time start, absl::StatusCode code,
                     absl::string_view message) {
  AuditRecord record;
  record.time = start;
  record.caller = caller;
  record.rpc = info.name;
  record.guest_uuid = guest.uuid;
  record.guest_name = guest.name;
  record.args = std::move(args);
  record.code = code;
  record.message = std::string(message);
  record.duration = absl::Now() - start;
  return record;
}

absl::StatusCode CodeOf(const Status& status) {
  return static_cast<absl::StatusCode>(status.error_code());
}

}  // namespace

security::Caller CallerOf(const security::CallerIdentity& identity) {
  switch (identity.kind) {
    case security::CallerIdentity::Kind::kTls:
      return Caller::Tls(identity.principal, identity.peer);
    case security::CallerIdentity::Kind::kUnix:
      return Caller::Unix(identity.unix.uid, identity.unix.gid, identity.unix.pid, identity.peer);
    case security::CallerIdentity::Kind::kAnonymous:
      break;
  }
  return Caller::None(identity.peer);
}

absl::StatusOr<security::Caller> Admission::Identify(const grpc::ServerContextBase& context) {
  absl::StatusOr<security::CallerIdentity> identity = security::IdentifyCaller(context);
  if (!identity.ok()) return identity.status();
  return CallerOf(*identity);
}

GuestRef Admission::RefOf(const Guest& guest) const {
  return GuestRefOf(*daemon_->pipeline().ViewOf(guest));
}

Status Admission::Admit(const grpc::ServerContextBase& context, Rpc rpc, const CallTarget& target,
                        absl::FunctionRef<AuditArgs()> args, AdmittedCall* call) {
  absl::StatusOr<Caller> caller = Identify(context);
  if (!caller.ok()) {
    // No caller at all (an untrusted transport): refused as unauthenticated, and audited so.
    absl::Status status = absl::UnauthenticatedError(
        absl::StrCat(security::InfoOf(rpc).name, ": ", caller.status().message()));
    GuestRef guest;
    if (target.vm != nullptr) guest.name = Clipped(*target.vm);
    return Deny(Caller::None(context.peer()), security::InfoOf(rpc), guest, args, absl::Now(),
                status);
  }
  return Admit(*caller, rpc, target, args, call);
}

Status Admission::Admit(const Caller& caller, Rpc rpc, const CallTarget& target,
                        absl::FunctionRef<AuditArgs()> args, AdmittedCall* call) {
  const absl::Time start = absl::Now();
  const RpcInfo& info = security::InfoOf(rpc);
  std::shared_ptr<const security::Authorizer> authz = daemon_->authorizer().Get();
  call->info_ = &info;
  call->start_ = start;
  call->context_.caller = caller;
  call->context_.authorizer = authz;
  call->context_.rpc = rpc;
  call->context_.refusals = this;
  GuestRef& guest = call->guest_;
  absl::Status checked;
  Status logic_error;  // the logic's own answer when the guest cannot be found
  if (info.scope == security::RpcScope::kGuest) {
    if (target.vm == nullptr) {
      checked = absl::InternalError(absl::StrCat(info.name, ": admitted without its guest"));
    } else if (std::shared_ptr<Guest> found =
                   target.vm->empty() ? nullptr : daemon_->registry().Lookup(*target.vm)) {
      guest = RefOf(*found);
      checked = authz->Check(caller, rpc, &guest);
    } else {
      // Only a caller with the role on some guest learns that this one does not exist.
      guest.name = Clipped(*target.vm);
      checked = authz->CheckAnyGuest(caller, rpc);
      logic_error = target.vm->empty()
                        ? InvalidArgument("vm", "a UUID or name is required")
                        : Status(StatusCode::NOT_FOUND, "no guest '" + *target.vm + "'");
    }
  } else {
    checked = authz->Check(caller, rpc, nullptr);
  }
  if (checked.ok() && target.crash) {
    checked =
        authz->CheckCrash(caller, rpc, info.scope == security::RpcScope::kGuest ? &guest : nullptr);
  }
  if (!checked.ok()) return Deny(caller, info, guest, args, start, checked);
  if (info.mutating && audit_ != nullptr) {
    call->args_ = args();
    if (!audit_->Healthy()) {
      // Refused, and the refusal is still written: that attempt is how a sink that recovered
      // becomes healthy again.
      absl::Status unavailable = audit_->UnavailableStatus();
      Write(RecordOf(caller, info, guest, call->args_, start, unavailable.code(),
                     unavailable.message()))
          .IgnoreError();
      return ToStatus(unavailable);
    }
  }
  if (!logic_error.ok()) return Finish(*call, logic_error);
  return Status::OK;
}

Status Admission::Finish(const AdmittedCall& call, Status result) {
  if (result.error_code() == StatusCode::RESOURCE_EXHAUSTED &&
      LimitNameOf(result.error_message()) != kUnknownLimit) {
    // Refused by one of kvmid's limits (not, e.g., a guest's ENOMEM): nothing was done, the
    // record (if due) is the refusal's, and a failed write does not change the answer.
    Metrics::LimitRefused(LimitNameOf(result.error_message()));
    AuditLimitRefusal(call.context_.caller, *call.info_, call.guest_,
                      call.info_->mutating ? call.args_ : AuditArgs(), call.start_, result);
    return result;
  }
  if (!call.info_->mutating || audit_ == nullptr) return result;
  absl::Status written = Write(RecordOf(call.context_.caller, *call.info_, call.guest_, call.args_,
                                        call.start_, CodeOf(result), result.error_message()));
  if (written.ok()) return result;
  return Status(StatusCode::UNAVAILABLE,
                absl::StrCat(call.info_->name,
                             result.ok() ? " done" : " failed (" + result.error_message() + ")",
                             ", but the audit log failed: ", written.message()));
}

Status Admission::AuditAllowed(const Caller& caller, const RpcInfo& info, const GuestRef& guest,
                               absl::FunctionRef<security::AuditArgs()> args, absl::Time start,
                               absl::string_view what) {
  if (audit_ == nullptr) return Status::OK;
  absl::Status unavailable = audit_->UnavailableStatus();
  absl::Status written = Write(
      RecordOf(caller, info, guest, args(), start, unavailable.code(), unavailable.message()));
  if (!unavailable.ok()) return ToStatus(unavailable);
  if (!written.ok()) {
    return Status(StatusCode::UNAVAILABLE,
                  absl::StrCat(what, " refused: the audit log failed: ", written.message()));
  }
  return Status::OK;
}

Status Admission::AdmitClaim(const CallContext& stream, const kvmi::v1::Claim& claim) {
  const absl::Time start = absl::Now();
  const RpcInfo& info = security::InfoOf(Rpc::kAttach);
  std::shared_ptr<const security::Authorizer> authz = daemon_->authorizer().Get();
  // A claimed guest that is not connected yet is known by the claim's text alone: it is in
  // scope only if a selector names that UUID or name (a label selector cannot match it).
  std::vector<GuestRef> claimed;
  claimed.reserve(claim.vms_size());
  for (const std::string& vm : claim.vms()) {
    if (std::shared_ptr<Guest> found = daemon_->registry().Lookup(vm)) {
      claimed.push_back(RefOf(*found));
    } else {
      GuestRef unknown;
      unknown.name = vm;
      unknown.uuid = vm;
      claimed.push_back(std::move(unknown));
    }
  }
  const bool every_guest = claim.vms().empty();
  absl::Status checked = authz->ClaimWithinScope(stream.caller, claimed, every_guest);
  if (checked.ok() && security::CanCrash(claim)) {
    if (every_guest) {
      checked = authz->CheckCrash(stream.caller, Rpc::kAttach, nullptr);
    } else {
      for (const GuestRef& guest : claimed) {
        checked = authz->CheckCrash(stream.caller, Rpc::kAttach, &guest);
        if (!checked.ok()) break;
      }
    }
    if (!checked.ok()) {
      checked = absl::PermissionDeniedError(
          absl::StrCat("claim.fallback ACTION_CRASH: ", checked.message()));
    }
  }
  const kvmi::v1::ContextRequest& context = claim.context();
  if (checked.ok() &&
      (context.rip_bytes() != 0 || context.rsp_bytes() != 0 || context.pf_bytes() != 0)) {
    // Event context is guest memory read for the handler: the role of ReadVirtual (operator),
    // on every claimed guest (no guest named: on every guest).
    const security::Role needed = security::InfoOf(Rpc::kReadVirtual).role;
    if (every_guest) {
      const security::Role has = authz->RoleOn(stream.caller, nullptr);
      if (has < needed) {
        checked = absl::PermissionDeniedError(
            absl::StrCat("claim.context: guest memory with the events of every guest needs ",
                         security::RoleName(needed), " on every guest; the caller has ",
                         security::RoleName(has)));
      }
    } else {
      for (const GuestRef& guest : claimed) {
        const security::Role has = authz->RoleOn(stream.caller, &guest);
        if (has < needed) {
          checked = absl::PermissionDeniedError(absl::StrCat(
              "claim.context: guest memory with the events of guest '", guest.name, "' needs ",
              security::RoleName(needed), "; the caller has ", security::RoleName(has)));
          break;
        }
      }
    }
  }
  GuestRef guest;
  if (claimed.size() == 1) guest = claimed.front();
  auto args = [&] { return security::SummarizeRequest(claim); };
  if (!checked.ok()) return Deny(stream.caller, info, guest, args, start, checked);
  return AuditAllowed(stream.caller, info, guest, args, start, "Attach claim");
}

Status Admission::AdmitCrashVerdict(const CallContext& stream, const kvmi::v1::Verdict& verdict,
                                    const Guest& target) {
  const absl::Time start = absl::Now();
  const RpcInfo& info = security::InfoOf(Rpc::kAttach);
  std::shared_ptr<const security::Authorizer> authz = daemon_->authorizer().Get();
  const GuestRef guest = RefOf(target);
  auto args = [&] { return security::SummarizeRequest(verdict); };
  absl::Status checked = authz->CheckCrash(stream.caller, Rpc::kAttach, &guest);
  if (!checked.ok()) return Deny(stream.caller, info, guest, args, start, checked);
  return AuditAllowed(stream.caller, info, guest, args, start, "verdict ACTION_CRASH");
}

Status Admission::Deny(const Caller& caller, const RpcInfo& info, const GuestRef& guest,
                       absl::FunctionRef<AuditArgs()> args, absl::Time start,
                       const absl::Status& status) {
  if (IsDenial(status.code())) {
    Metrics::AuthzDenied(MetricMethod(info));
    LogDenial(caller, info, guest, status);
  }
  if (audit_ != nullptr) {
    Write(RecordOf(caller, info, guest, args(), start, status.code(), status.message()))
        .IgnoreError();
  }
  return ToStatus(status);
}

absl::Status Admission::Write(const AuditRecord& record) const {
  absl::Status written = audit_->Write(record);
  if (!written.ok()) {
    // Never silently: the record goes to the error log instead.
    spdlog::error("audit log: {}; record: {}", std::string(written.message()), record.ToJson());
  }
  return written;
}

void Admission::LogDenial(const Caller& caller, const RpcInfo& info, const GuestRef& guest,
                          const absl::Status& status) {
  uint64_t suppressed = 0;
  {
    const int64_t second = absl::ToUnixSeconds(absl::Now());
    MutexLock lock(&log_mu_);
    if (second != log_second_) {
      log_second_ = second;
      logged_this_second_ = 0;
    }
    if (logged_this_second_ >= kMaxDenialLogsPerSecond) {
      ++suppressed_since_log_;
      ++denials_suppressed_;
      return;
    }
    ++logged_this_second_;
    ++denials_logged_;
    suppressed = suppressed_since_log_;
    suppressed_since_log_ = 0;
  }
  spdlog::warn("API denied: {} from {} called {}{}: {} ({}){}", caller.Describe(),
               caller.peer.empty() ? "?" : caller.peer, info.name,
               guest.name.empty() && guest.uuid.empty() ? "" : " on guest " + guest.Describe(),
               std::string(status.message()), absl::StatusCodeToString(status.code()),
               suppressed == 0
                   ? ""
                   : absl::StrCat(" [", suppressed, " more denials not logged, at most ",
                                  kMaxDenialLogsPerSecond, "/s]"));
}

void Admission::RefusedByLimit(const CallContext& call, const Status& status) const {
  if (status.error_code() != StatusCode::RESOURCE_EXHAUSTED) return;
  AuditLimitRefusal(call.caller, security::InfoOf(call.rpc), GuestRef(), AuditArgs(), absl::Now(),
                    status);
}

void Admission::AuditLimitRefusal(const Caller& caller, const RpcInfo& info, const GuestRef& guest,
                                  AuditArgs args, absl::Time start, const Status& status) const {
  if (audit_ == nullptr) return;
  const std::string limit = LimitNameOf(status.error_message());
  const int64_t second = absl::ToUnixSeconds(absl::Now());
  uint64_t suppressed = 0;
  uint64_t forgotten = 0;
  {
    MutexLock lock(&refusal_mu_);
    std::string key = absl::StrCat(caller.Describe(), "\n", limit);
    auto it = refusal_windows_.find(key);
    if (it == refusal_windows_.end()) {
      if (refusal_windows_.size() >= kMaxLimitRefusalKeys) {
        // Bounded: pairs idle since an earlier second go (a pair refused in this second stays).
        for (auto old = refusal_windows_.begin(); old != refusal_windows_.end();) {
          if (old->second.second < second) {
            forgotten += old->second.suppressed;
            refusal_windows_.erase(old++);
          } else {
            ++old;
          }
        }
      }
      // Past the bound with every pair busy in this second: written, never lost.
      it = refusal_windows_.emplace(std::move(key), RefusalWindow{second - 1, 0}).first;
    }
    RefusalWindow& window = it->second;
    if (window.second == second) {
      ++window.suppressed;
      ++limit_refusals_suppressed_;
      return;
    }
    suppressed = window.suppressed;
    window.second = second;
    window.suppressed = 0;
    ++limit_refusals_audited_;
  }
  if (forgotten > 0) {
    spdlog::warn(
        "audit: {} limit refusals not written (rate limit) and no longer tracked ({} "
        "identity+limit pairs at most)",
        forgotten, kMaxLimitRefusalKeys);
  }
  args.Text("limit", limit).Uint("suppressed", suppressed);
  const absl::Status refusal(absl::StatusCode::kResourceExhausted, status.error_message());
  Write(RecordOf(caller, info, guest, std::move(args), start, refusal.code(), refusal.message()))
      .IgnoreError();
}

std::string LimitNameOf(absl::string_view message) {
  constexpr absl::string_view kMarker = "over the limit ";
  const size_t at = message.rfind(kMarker);
  if (at == absl::string_view::npos) return kUnknownLimit;
  absl::string_view rest = message.substr(at + kMarker.size());
  const size_t end = rest.find_first_of(" =");
  rest = rest.substr(0, end);
  if (rest.empty()) return kUnknownLimit;
  return std::string(rest);
}

uint64_t Admission::limit_refusals_audited() const {
  MutexLock lock(&refusal_mu_);
  return limit_refusals_audited_;
}

uint64_t Admission::limit_refusals_suppressed() const {
  MutexLock lock(&refusal_mu_);
  return limit_refusals_suppressed_;
}

uint64_t Admission::denials_logged() const {
  MutexLock lock(&log_mu_);
  return denials_logged_;
}

uint64_t Admission::denials_suppressed() const {
  MutexLock lock(&log_mu_);
  return denials_suppressed_;
}

}  // namespace kvmid::api
