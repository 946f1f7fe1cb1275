// Authorization of API calls: built-in roles, the role every RPC of kvmi.v1.Introspection
// needs, and an immutable Authorizer built from the configuration's `authz` section that
// answers "may this caller make this call on this guest?" (docs/SECURITY.md "Roles and scopes").
//
// Integration (the API's single per-RPC entry point):
//
//   std::shared_ptr<const Authorizer> authz = holder.Get();   // one snapshot per call
//   absl::Status s = authz->Check(caller, Rpc::kWritePhysical, &guest);
//   if (!s.ok()) -> audit the denial, return it;
//
// - Guest RPCs (GetRegisters, ...): resolve the guest, then Check(caller, rpc, &guest). When the
//   guest is unknown, CheckAnyGuest(caller, rpc) (the caller needs the role on some guest), then
//   answer NOT_FOUND.
// - List RPCs (ListVMs, WatchVMs, StreamEvents, ListPolicies): Check(caller, rpc, nullptr) needs
//   the role on at least one guest; then show only the guests for which Visible(caller, guest) (or
//   a Scope from ScopeOf, which is cheaper per event) is true.
// - Daemon RPCs (ApplyPolicy, DeletePolicy): policies select guests by themselves,
//   so the role is needed on every guest (a binding without guest selectors); pass nullptr.
//   ApplyPolicy with an ACTION_CRASH policy: also CheckCrash.
// - Attach: Check(caller, kAttach, nullptr) at the claim, then ClaimWithinScope with the guests the
// claim
//   names (resolved; an empty claim means every guest) and CheckCrash for the claim's fallback.
//   Each inline Command: RpcOfCommand, then Check on its guest as for the unary RPC. A Verdict
//   with ACTION_CRASH: CheckCrash on the event's guest.
#ifndef KVMID_DAEMON_SECURITY_AUTHZ_H_
#define KVMID_DAEMON_SECURITY_AUTHZ_H_

#include <absl/status/status.h>
#include <absl/status/statusor.h>
#include <absl/strings/string_view.h>
#include <absl/types/span.h>

#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "daemon/base/mutex.h"
#include "daemon/config/kvmid_config.pb.h"
#include "proto/kvmi/v1/introspection.pb.h"
#include "proto/kvmi/v1/policy.pb.h"

namespace kvmid {
namespace security {

// Built-in roles, each including the ones before it.
enum class Role : uint8_t {
  kNone = 0,  // no binding: nothing allowed
  kViewer = 1,
  kResponder = 2,
  kOperator = 3,
  kAdmin = 4,
};
// "viewer", "responder", "operator", "admin" ("none" for kNone).
absl::string_view RoleName(Role role);
std::optional<Role> RoleFromName(absl::string_view name);

// Every RPC of kvmi.v1.Introspection.
enum class Rpc : uint8_t {
  kListVMs,
  kGetVM,
  kStreamEvents,
  kApplyPolicy,
  kListPolicies,
  kDeletePolicy,
  kAttach,
  kGetRegisters,
  kReadPhysical,
  kWritePhysical,
  kPauseVCPU,
  kResumeVCPU,
  kGetCPUID,
  kGetXSAVE,
  kGetMTRRType,
  kInjectException,
  kGetPageAccess,
  kSetPageAccess,
  kSetRegisters,
  kControlSPP,
  kGetPageWriteBitmap,
  kSetPageWriteBitmap,
  kControlEvents,
  kUnhookVM,
  kWatchVMs,
  kReadPhysicalStream,
  kWritePhysicalStream,
  kTranslateAddress,
  kReadVirtual,
  kReadVirtualStream,
  kWriteVirtual,
};

// What an RPC is checked against.
enum class RpcScope : uint8_t {
  kGuest,   // one named guest: the role on that guest
  kList,    // many guests, filtered: the role on some guest, then Visible per guest
  kDaemon,  // kvmid-wide (policies): the role on every guest
};

struct RpcInfo {
  Rpc rpc;
  const char* name;    // "WritePhysical"
  const char* method;  // "/kvmi.v1.Introspection/WritePhysical" (grpc::ServerContext's method)
  Role role;           // the least role that may call it
  RpcScope scope;
  bool mutating;  // changes a guest or kvmid: always audited (denied calls are audited too)
};

// One entry per RPC, in the service's order. A test checks it against the service descriptor.
absl::Span<const RpcInfo> RpcTable();
const RpcInfo& InfoOf(Rpc rpc);
// By short name ("GetVM") or full method ("/kvmi.v1.Introspection/GetVM"); nullptr if none.
const RpcInfo* FindRpc(absl::string_view name_or_method);
// The unary RPC an inline Attach command stands for; INVALID_ARGUMENT if the command is empty.
absl::StatusOr<Rpc> RpcOfCommand(const kvmi::v1::Command& command);

// CRASH stops a guest: verdicts, claim fallbacks and policies that can crash need admin.
bool CanCrash(const kvmi::v1::Verdict& verdict);
bool CanCrash(const kvmi::v1::Claim& claim);
bool CanCrash(const kvmi::v1::Policy& policy);

// Who is calling, as far as authorization cares (the lead maps the transport's CallerIdentity
// onto it). A TLS caller is its principal; a UNIX caller its uid and gid.
struct Caller {
  enum class Kind : uint8_t { kNone, kTls, kUnix };
  Kind kind = Kind::kNone;
  std::string principal;  // kTls: SPIFFE URI SAN, else DNS SAN, else CN
  uint32_t uid = 0;       // kUnix
  uint32_t gid = 0;       // kUnix
  int32_t pid = 0;        // kUnix, for logs only (0: unknown)
  std::string peer;       // transport address, for logs only ("ipv4:10.0.0.1:5000", "unix:")

  static Caller None(std::string peer = "");
  static Caller Tls(std::string principal, std::string peer);
  static Caller Unix(uint32_t uid, uint32_t gid, int32_t pid = 0, std::string peer = "unix:");
  // "spiffe://corp/x", "uid=1000,gid=1000", "anonymous": for messages.
  std::string Describe() const;
};

// What authorization knows about a guest (the registry's view, copied).
struct GuestRef {
  std::string name;
  std::string uuid;
  std::map<std::string, std::string> labels;
  // `name` or `uuid` for messages: web-1 (5f0e...).
  std::string Describe() const;
};

// Which guests a caller may see with a given role: evaluate once per stream, then per guest.
class Scope {
 public:
  Scope() = default;  // nothing
  bool Contains(const GuestRef& guest) const;
  bool all() const { return all_; }
  bool empty() const { return !all_ && selectors_.empty(); }

 private:
  friend class Authorizer;
  bool all_ = false;
  std::vector<const kvmi::v1::GuestSelector*> selectors_;  // owned by the Authorizer
  std::shared_ptr<const void> keep_alive_;                 // the Authorizer's bindings
};

// Immutable: build one per configuration, swap it in AuthorizerHolder on reload.
class Authorizer {
 public:
  // From the configuration's `authz` section; errors name the field
  // ("authz.bindings[2].role: unknown role \"root\"").
  static absl::StatusOr<std::shared_ptr<const Authorizer>> FromConfig(const config::Authz& config);
  // With no `authz` section: UNIX uid 0 is admin on every guest, everything else is denied.
  static std::shared_ptr<const Authorizer> Default();
  // From the whole configuration: FromConfig(authz) if present, else Default().
  static absl::StatusOr<std::shared_ptr<const Authorizer>> FromKvmidConfig(
      const config::KvmidConfig& config);

  // OK, UNAUTHENTICATED (no identity) or PERMISSION_DENIED naming the RPC, the guest and the
  // role missing. `guest`: required for a kGuest RPC (nullptr is INTERNAL: fail closed);
  // nullptr for a kList RPC means "on some guest"; ignored for a kDaemon RPC (every guest).
  absl::Status Check(const Caller& caller, Rpc rpc, const GuestRef* guest) const;
  // The RPC's role on at least one guest (a kDaemon RPC: on every guest). For lists, and for a
  // guest RPC whose guest does not exist (then answer NOT_FOUND).
  absl::Status CheckAnyGuest(const Caller& caller, Rpc rpc) const;
  // Crash (a verdict, a claim fallback or a policy) on `guest` (nullptr: every guest).
  absl::Status CheckCrash(const Caller& caller, Rpc rpc, const GuestRef* guest) const;
  // Lists and streams: whether `guest` is shown to the caller (viewer on it).
  bool Visible(const Caller& caller, const GuestRef& guest) const;
  // The guests on which the caller has at least `role`.
  Scope ScopeOf(const Caller& caller, Role role) const;
  // Attach: every claimed guest must be in the caller's responder scope; an empty claim
  // (every guest) needs responder on every guest. PERMISSION_DENIED names the first guest out
  // of scope.
  absl::Status ClaimWithinScope(const Caller& caller, absl::Span<const GuestRef> claimed,
                                bool claims_every_guest) const;

  // The caller's highest role on `guest` (nullptr: on every guest, i.e. unscoped bindings).
  Role RoleOn(const Caller& caller, const GuestRef* guest) const;
  // The caller's highest role on any guest.
  Role BestRole(const Caller& caller) const;

  struct Binding {
    enum class Match : uint8_t { kPrincipal, kPrincipalPrefix, kUid, kGid };
    Match match;
    std::string principal;  // kPrincipal, kPrincipalPrefix
    uint32_t id = 0;        // kUid, kGid
    Role role = Role::kNone;
    std::vector<kvmi::v1::GuestSelector> guests;  // empty: every guest
    bool Matches(const Caller& caller) const;
    bool Covers(const GuestRef& guest) const;
  };
  const std::vector<Binding>& bindings() const { return *bindings_; }

 private:
  explicit Authorizer(std::vector<Binding> bindings);
  std::shared_ptr<const std::vector<Binding>> bindings_;
};

// The current Authorizer, swapped whole when the configuration is reloaded. Readers take a
// snapshot per call (a shared_ptr copy under a short lock); streams compare generation() to
// notice a reload and recompute their Scope.
class AuthorizerHolder {
 public:
  explicit AuthorizerHolder(std::shared_ptr<const Authorizer> initial = Authorizer::Default());
  std::shared_ptr<const Authorizer> Get() const;
  void Set(std::shared_ptr<const Authorizer> next);
  uint64_t generation() const { return generation_.load(std::memory_order_acquire); }

 private:
  mutable Mutex mu_;
  std::shared_ptr<const Authorizer> current_ ABSL_GUARDED_BY(mu_);
  std::atomic<uint64_t> generation_{0};
};

// True when `guest` matches `selector` (UUIDs case-insensitively, names exactly or by a prefix
// ending in '*', every label).
bool SelectorMatches(const kvmi::v1::GuestSelector& selector, const GuestRef& guest);

}  // namespace security
}  // namespace kvmid

#endif  // KVMID_DAEMON_SECURITY_AUTHZ_H_
