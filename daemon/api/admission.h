// Admission: the one gate every API call passes before its logic (docs/SECURITY.md "Roles and
// scopes", "Audit log"). For each RPC and each inline Attach command it
//
//   1. identifies the caller from its transport (security::IdentifyCaller): a verified TLS
//      client certificate or the UNIX peer credentials; plaintext TCP is anonymous, and an
//      anonymous caller gets UNAUTHENTICATED;
//   2. takes one Authorizer snapshot (Daemon::authorizer().Get(), swapped by reloads);
//   3. resolves the request's guest through the registry and checks the RPC's role on it (an
//      unknown guest: the role on some guest, then NOT_FOUND, the logic's own error); lists,
//      streams and Attach need the role on some guest; policies the role on every guest; what
//      can CRASH a guest needs admin (Authorizer::CheckCrash);
//   4. audits every mutating call after it ran (result code, duration) and every denied call,
//      with the Summarize* argument summaries (never memory contents or register values). With
//      an audit log that failed, mutating calls are refused with UNAVAILABLE saying why;
//   5. counts denials (Metrics::AuthzDenied) and logs them, rate-limited, naming the identity,
//      the peer, the RPC and the guest.
//
// What it hands the logic below is an api::CallContext (call_context.h).
#ifndef KVMID_DAEMON_API_ADMISSION_H_
#define KVMID_DAEMON_API_ADMISSION_H_

#include <absl/container/flat_hash_map.h>
#include <absl/functional/function_ref.h>
#include <absl/status/statusor.h>
#include <absl/time/time.h>
#include <grpcpp/grpcpp.h>

#include <cstdint>
#include <string>
#include <type_traits>
#include <utility>

#include "daemon/api/call_context.h"
#include "daemon/base/mutex.h"
#include "daemon/kvmid.h"
#include "daemon/security/audit.h"
#include "daemon/security/authz.h"
#include "daemon/security/identity.h"

namespace kvmid::api {

// At most this many denials are logged per second; the rest are counted and their number is
// logged with the next one that is (a client cannot flood the log by being refused).
inline constexpr uint32_t kMaxDenialLogsPerSecond = 20;
// Refusals by a limit (RESOURCE_EXHAUSTED) are audited once per identity and limit per second:
// the first of each second is written, with "limit" and "suppressed" (the refusals of that
// identity and limit not written since its previous record) in its args; the others are only
// counted (Metrics::LimitRefused). At most this many identity+limit pairs are tracked at once
// (past it, pairs idle since an earlier second are forgotten, their suppressed counts logged).
inline constexpr size_t kMaxLimitRefusalKeys = 4096;

// What a call works on, for authorization.
struct CallTarget {
  // Guest RPCs: the request's guest selector (UUID or name). Null for the others.
  const std::string* vm = nullptr;
  // The call can crash guests (ApplyPolicy of an ACTION_CRASH policy): admin is needed on them.
  bool crash = false;
};

// One admitted call, from Admit to Finish.
class AdmittedCall {
 public:
  const CallContext& context() const { return context_; }
  const security::RpcInfo& info() const { return *info_; }
  // The guest the call was checked on (empty name and uuid when none).
  const security::GuestRef& guest() const { return guest_; }
  // What only the call's outcome tells, added to its audit record before Finish (ApplyPolicy
  // and DeletePolicy: overrode_config).
  security::AuditArgs& audit_args() { return args_; }

 private:
  friend class Admission;
  CallContext context_;
  const security::RpcInfo* info_ = nullptr;
  security::GuestRef guest_;
  security::AuditArgs args_;  // kept for the audit record of a mutating call
  absl::Time start_;
};

// The audit summary of a request: security::SummarizeRequest where one exists (the mutating
// requests and those worth a GPA or vCPU), else empty (lists, GetVM).
template <typename Request, typename = void>
struct HasAuditSummary : std::false_type {};
template <typename Request>
struct HasAuditSummary<
    Request, std::void_t<decltype(security::SummarizeRequest(std::declval<const Request&>()))>>
    : std::true_type {};
template <typename Request>
security::AuditArgs AuditSummaryOf(const Request& request) {
  if constexpr (HasAuditSummary<Request>::value) {
    return security::SummarizeRequest(request);
  } else {
    return security::AuditArgs();
  }
}

// The authenticated caller of a transport identity: TLS principal, UNIX uid/gid/pid, or none
// (anonymous, which authorization answers with UNAUTHENTICATED).
security::Caller CallerOf(const security::CallerIdentity& identity);

// Thread-safe; one per API server.
class Admission final : public LimitRefusalSink {
 public:
  // `audit` may be null (no --audit_log: nothing is written and nothing is refused for it).
  Admission(Daemon* daemon, security::AuditLog* audit) : daemon_(daemon), audit_(audit) {}

  // The caller of `context`, or UNAUTHENTICATED when its transport gives no identity that can
  // be trusted.
  static absl::StatusOr<security::Caller> Identify(const grpc::ServerContextBase& context);

  // Admits one call of `rpc` by the caller of `context` (or by `caller`, already identified: an
  // Attach stream's inline commands, tests). `args` builds the audit summary of the request; it
  // is only called when a record is written. Not OK: the call's answer (already audited).
  grpc::Status Admit(const grpc::ServerContextBase& context, security::Rpc rpc,
                     const CallTarget& target, absl::FunctionRef<security::AuditArgs()> args,
                     AdmittedCall* call);
  grpc::Status Admit(const security::Caller& caller, security::Rpc rpc, const CallTarget& target,
                     absl::FunctionRef<security::AuditArgs()> args, AdmittedCall* call);
  // The end of an admitted call whose logic answered `result`: a mutating call is audited with
  // its result and duration; a refusal by a limit (RESOURCE_EXHAUSTED), mutating or not, is
  // audited once per identity and limit per second (kMaxLimitRefusalKeys). Returns the call's
  // answer: `result`, or UNAVAILABLE when the call was done but its audit record could not be
  // written (never for a refusal: nothing was done).
  grpc::Status Finish(const AdmittedCall& call, grpc::Status result);
  // A call admitted here (call.rpc) that a limit refused below its handler (streams).
  void RefusedByLimit(const CallContext& call, const grpc::Status& status) const override;

  // Attach, after the claim parsed: the claimed guests must be within the caller's responder
  // scope (an empty claim: every guest) and a CRASH fallback needs admin on them. Audited.
  grpc::Status AdmitClaim(const CallContext& stream, const kvmi::v1::Claim& claim);
  // Attach: a verdict with ACTION_CRASH on `guest` needs admin there. Audited, allowed or not.
  grpc::Status AdmitCrashVerdict(const CallContext& stream, const kvmi::v1::Verdict& verdict,
                                 const Guest& guest);

  // Denials logged so far and those the rate limit kept out of the log (tests).
  uint64_t denials_logged() const;
  uint64_t denials_suppressed() const;
  // Limit refusals written to the audit log and those the rate limit kept out (tests).
  uint64_t limit_refusals_audited() const;
  uint64_t limit_refusals_suppressed() const;

 private:
  security::GuestRef RefOf(const Guest& guest) const;
  // Audits (when due), counts and logs a refusal; returns it as the call's answer.
  // An allowed Attach-time decision (a claim, a CRASH verdict), audited now: UNAVAILABLE, naming
  // `what`, when the audit log is unhealthy or the record cannot be written.
  grpc::Status AuditAllowed(const security::Caller& caller, const security::RpcInfo& info,
                            const security::GuestRef& guest,
                            absl::FunctionRef<security::AuditArgs()> args, absl::Time start,
                            absl::string_view what);
  grpc::Status Deny(const security::Caller& caller, const security::RpcInfo& info,
                    const security::GuestRef& guest, absl::FunctionRef<security::AuditArgs()> args,
                    absl::Time start, const absl::Status& status);
  // Writes `record`; a failure is logged with the record itself.
  absl::Status Write(const security::AuditRecord& record) const;
  void LogDenial(const security::Caller& caller, const security::RpcInfo& info,
                 const security::GuestRef& guest, const absl::Status& status);
  // Audits a refusal by a limit, rate-limited (kMaxLimitRefusalKeys); `args` is the request's
  // summary, to which "limit" and "suppressed" are added.
  void AuditLimitRefusal(const security::Caller& caller, const security::RpcInfo& info,
                         const security::GuestRef& guest, security::AuditArgs args,
                         absl::Time start, const grpc::Status& status) const;
  struct RefusalWindow {
    int64_t second = 0;       // of the last record written for the pair
    uint64_t suppressed = 0;  // refusals since then that were not written
  };

  Daemon* const daemon_;
  security::AuditLog* const audit_;

  mutable Mutex log_mu_;
  int64_t log_second_ ABSL_GUARDED_BY(log_mu_) = 0;
  uint32_t logged_this_second_ ABSL_GUARDED_BY(log_mu_) = 0;
  uint64_t suppressed_since_log_ ABSL_GUARDED_BY(log_mu_) = 0;
  uint64_t denials_logged_ ABSL_GUARDED_BY(log_mu_) = 0;
  uint64_t denials_suppressed_ ABSL_GUARDED_BY(log_mu_) = 0;

  mutable Mutex refusal_mu_;
  // By caller.Describe() + '\n' + the limit's name.
  mutable absl::flat_hash_map<std::string, RefusalWindow> refusal_windows_
      ABSL_GUARDED_BY(refusal_mu_);
  mutable uint64_t limit_refusals_audited_ ABSL_GUARDED_BY(refusal_mu_) = 0;
  mutable uint64_t limit_refusals_suppressed_ ABSL_GUARDED_BY(refusal_mu_) = 0;
};

// The limit a RESOURCE_EXHAUSTED message of security::Exhausted names ("... over the limit
// max_policies = 1024 policies (limits.max_policies)" -> "max_policies"); kUnknownLimit
// otherwise (a RESOURCE_EXHAUSTED that is no limit of kvmid's, e.g. a guest's ENOMEM).
inline constexpr char kUnknownLimit[] = "unknown";
std::string LimitNameOf(absl::string_view message);

}  // namespace kvmid::api

#endif  // KVMID_DAEMON_API_ADMISSION_H_
