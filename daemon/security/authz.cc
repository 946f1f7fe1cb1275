#include "daemon/security/authz.h"

#include <absl/strings/ascii.h>
#include <absl/strings/match.h>
#include <absl/strings/str_cat.h>
#include <absl/strings/str_format.h>

#include <algorithm>
#include <utility>

namespace kvmid {
namespace security {
namespace {

constexpr RpcInfo kRpcs[] = {
#define KVMID_RPC(NAME, ROLE, SCOPE, MUTATING) \
  { Rpc::k##NAME, #NAME, "/kvmi.v1.Introspection/" #NAME, Role::ROLE, RpcScope::SCOPE, MUTATING }
    KVMID_RPC(ListVMs, kViewer, kList, false), KVMID_RPC(GetVM, kViewer, kGuest, false),
    KVMID_RPC(StreamEvents, kViewer, kList, false), KVMID_RPC(ApplyPolicy, kAdmin, kDaemon, true),
    // Policies are kvmid's rules, not guest data: a viewer of any guest may read them.
    KVMID_RPC(ListPolicies, kViewer, kList, false), KVMID_RPC(DeletePolicy, kAdmin, kDaemon, true),
    KVMID_RPC(Attach, kResponder, kList, true), KVMID_RPC(GetRegisters, kOperator, kGuest, false),
    KVMID_RPC(ReadPhysical, kOperator, kGuest, false),
    KVMID_RPC(WritePhysical, kAdmin, kGuest, true), KVMID_RPC(PauseVCPU, kOperator, kGuest, true),
    KVMID_RPC(ResumeVCPU, kOperator, kGuest, true), KVMID_RPC(GetCPUID, kOperator, kGuest, false),
    KVMID_RPC(GetXSAVE, kOperator, kGuest, false), KVMID_RPC(GetMTRRType, kOperator, kGuest, false),
    KVMID_RPC(InjectException, kOperator, kGuest, true),
    KVMID_RPC(GetPageAccess, kOperator, kGuest, false),
    KVMID_RPC(SetPageAccess, kOperator, kGuest, true),
    KVMID_RPC(SetRegisters, kOperator, kGuest, true),
    KVMID_RPC(ControlSPP, kOperator, kGuest, true),
    KVMID_RPC(GetPageWriteBitmap, kOperator, kGuest, false),
    KVMID_RPC(SetPageWriteBitmap, kOperator, kGuest, true),
    KVMID_RPC(ControlEvents, kOperator, kGuest, true), KVMID_RPC(UnhookVM, kAdmin, kGuest, true),
    KVMID_RPC(WatchVMs, kViewer, kList, false),
    // Bulk memory: read like ReadPhysical, write like WritePhysical (audited with GPA and size).
    KVMID_RPC(ReadPhysicalStream, kOperator, kGuest, false),
    KVMID_RPC(WritePhysicalStream, kAdmin, kGuest, true),
    // Reads guest memory (its page tables), as GetRegisters/ReadPhysical do; changes nothing.
    KVMID_RPC(TranslateAddress, kOperator, kGuest, false),
    KVMID_RPC(ReadVirtual, kOperator, kGuest, false),        // as ReadPhysical
    KVMID_RPC(ReadVirtualStream, kOperator, kGuest, false),  // as ReadPhysicalStream
    KVMID_RPC(WriteVirtual, kAdmin, kGuest, true),           // as WritePhysical (audited)
#undef KVMID_RPC
};

// The table is indexed by the enum.
constexpr bool TableInEnumOrder() {
  for (size_t i = 0; i < sizeof(kRpcs) / sizeof(kRpcs[0]); ++i) {
    if (static_cast<size_t>(kRpcs[i].rpc) != i) return false;
  }
  return true;
}
static_assert(TableInEnumOrder(), "kRpcs must list the RPCs in the order of enum Rpc");
static_assert(sizeof(kRpcs) / sizeof(kRpcs[0]) == static_cast<size_t>(Rpc::kWriteVirtual) + 1,
              "kRpcs must list every RPC");

std::string Quoted(absl::string_view s) { return absl::StrCat("\"", s, "\""); }

absl::Status Unauthenticated(Rpc rpc) {
  return absl::UnauthenticatedError(
      absl::StrCat(InfoOf(rpc).name,
                   ": no caller identity (a verified TLS client certificate or a UNIX socket "
                   "peer is required)"));
}

bool Authenticated(const Caller& caller) {
  switch (caller.kind) {
    case Caller::Kind::kTls:
      return !caller.principal.empty();
    case Caller::Kind::kUnix:
      return true;
    case Caller::Kind::kNone:
      break;
  }
  return false;
}

// Validation of one selector of a binding; `field` names it.
absl::Status ValidateSelector(const kvmi::v1::GuestSelector& s, const std::string& field) {
  if (s.uuids().empty() && s.names().empty() && s.labels().empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat(field, ": empty selector (leave `guests` out to cover every guest)"));
  }
  for (int i = 0; i < s.uuids_size(); ++i) {
    if (s.uuids(i).empty()) {
      return absl::InvalidArgumentError(absl::StrCat(field, ".uuids[", i, "]: empty"));
    }
  }
  for (int i = 0; i < s.names_size(); ++i) {
    const std::string& n = s.names(i);
    if (n.empty() || n == "*") {
      return absl::InvalidArgumentError(absl::StrCat(
          field, ".names[", i, "]: ", n.empty() ? "empty" : "\"*\" alone (leave `guests` out)"));
    }
    if (n.find('*') != n.size() - 1 && n.find('*') != std::string::npos) {
      return absl::InvalidArgumentError(
          absl::StrCat(field, ".names[", i, "]: '*' only as the last character"));
    }
  }
  for (const auto& [key, value] : s.labels()) {
    if (key.empty()) {
      return absl::InvalidArgumentError(absl::StrCat(field, ".labels: empty key"));
    }
  }
  return absl::OkStatus();
}

}  // namespace

absl::string_view RoleName(Role role) {
  switch (role) {
    case Role::kNone:
      return "none";
    case Role::kViewer:
      return "viewer";
    case Role::kResponder:
      return "responder";
    case Role::kOperator:
      return "operator";
    case Role::kAdmin:
      return "admin";
  }
  return "none";
}

std::optional<Role> RoleFromName(absl::string_view name) {
  for (Role r : {Role::kViewer, Role::kResponder, Role::kOperator, Role::kAdmin}) {
    if (name == RoleName(r)) return r;
  }
  return std::nullopt;
}

absl::Span<const RpcInfo> RpcTable() { return kRpcs; }

const RpcInfo& InfoOf(Rpc rpc) { return kRpcs[static_cast<size_t>(rpc)]; }

const RpcInfo* FindRpc(absl::string_view name_or_method) {
  for (const RpcInfo& info : kRpcs) {
    if (name_or_method == info.name || name_or_method == info.method) return &info;
  }
  return nullptr;
}

absl::StatusOr<Rpc> RpcOfCommand(const kvmi::v1::Command& command) {
  using C = kvmi::v1::Command;
  switch (command.request_case()) {
    case C::kGetRegisters:
      return Rpc::kGetRegisters;
    case C::kSetRegisters:
      return Rpc::kSetRegisters;
    case C::kReadPhysical:
      return Rpc::kReadPhysical;
    case C::kWritePhysical:
      return Rpc::kWritePhysical;
    case C::kGetPageAccess:
      return Rpc::kGetPageAccess;
    case C::kSetPageAccess:
      return Rpc::kSetPageAccess;
    case C::kPauseVcpu:
      return Rpc::kPauseVCPU;
    case C::kResumeVcpu:
      return Rpc::kResumeVCPU;
    case C::kInjectException:
      return Rpc::kInjectException;
    case C::kControlEvents:
      return Rpc::kControlEvents;
    case C::kGetCpuid:
      return Rpc::kGetCPUID;
    case C::kGetMtrrType:
      return Rpc::kGetMTRRType;
    case C::kTranslateAddress:
      return Rpc::kTranslateAddress;
    case C::kReadVirtual:
      return Rpc::kReadVirtual;
    case C::kWriteVirtual:
      return Rpc::kWriteVirtual;
    case C::REQUEST_NOT_SET:
      break;
  }
  return absl::InvalidArgumentError("command.request: required");
}

bool CanCrash(const kvmi::v1::Verdict& verdict) {
  return verdict.action() == kvmi::v1::ACTION_CRASH;
}
bool CanCrash(const kvmi::v1::Claim& claim) { return claim.fallback() == kvmi::v1::ACTION_CRASH; }
bool CanCrash(const kvmi::v1::Policy& policy) {
  // A monitor-mode policy does not decide today, but one edit of its mode would let it crash.
  return policy.action() == kvmi::v1::ACTION_CRASH;
}

Caller Caller::None(std::string peer) {
  Caller c;
  c.peer = std::move(peer);
  return c;
}

Caller Caller::Tls(std::string principal, std::string peer) {
  Caller c;
  c.kind = Kind::kTls;
  c.principal = std::move(principal);
  c.peer = std::move(peer);
  return c;
}

Caller Caller::Unix(uint32_t uid, uint32_t gid, int32_t pid, std::string peer) {
  Caller c;
  c.kind = Kind::kUnix;
  c.uid = uid;
  c.gid = gid;
  c.pid = pid;
  c.peer = std::move(peer);
  return c;
}

std::string Caller::Describe() const {
  switch (kind) {
    case Kind::kTls:
      return principal.empty() ? "anonymous" : principal;
    case Kind::kUnix:
      return absl::StrCat("uid=", uid, ",gid=", gid);
    case Kind::kNone:
      break;
  }
  return "anonymous";
}

std::string GuestRef::Describe() const {
  if (name.empty()) return uuid;
  if (uuid.empty()) return name;
  return absl::StrCat(name, " (", uuid, ")");
}

bool SelectorMatches(const kvmi::v1::GuestSelector& selector, const GuestRef& guest) {
  if (!selector.uuids().empty() &&
      std::none_of(selector.uuids().begin(), selector.uuids().end(),
                   [&](const std::string& u) { return absl::EqualsIgnoreCase(u, guest.uuid); })) {
    return false;
  }
  if (!selector.names().empty() &&
      std::none_of(selector.names().begin(), selector.names().end(), [&](const std::string& p) {
        if (!p.empty() && p.back() == '*') {
          return absl::StartsWith(guest.name, absl::string_view(p).substr(0, p.size() - 1));
        }
        return p == guest.name;
      })) {
    return false;
  }
  for (const auto& [key, value] : selector.labels()) {
    auto it = guest.labels.find(key);
    if (it == guest.labels.end() || it->second != value) return false;
  }
  return true;
}

bool Scope::Contains(const GuestRef& guest) const {
  if (all_) return true;
  for (const kvmi::v1::GuestSelector* s : selectors_) {
    if (SelectorMatches(*s, guest)) return true;
  }
  return false;
}

bool Authorizer::Binding::Matches(const Caller& caller) const {
  switch (match) {
    case Match::kPrincipal:
      return caller.kind == Caller::Kind::kTls && !caller.principal.empty() &&
             caller.principal == principal;
    case Match::kPrincipalPrefix:
      return caller.kind == Caller::Kind::kTls && !caller.principal.empty() &&
             absl::StartsWith(caller.principal, principal);
    case Match::kUid:
      return caller.kind == Caller::Kind::kUnix && caller.uid == id;
    case Match::kGid:
      return caller.kind == Caller::Kind::kUnix && caller.gid == id;
  }
  return false;
}

bool Authorizer::Binding::Covers(const GuestRef& guest) const {
  if (guests.empty()) return true;
  for (const auto& s : guests) {
    if (SelectorMatches(s, guest)) return true;
  }
  return false;
}

Authorizer::Authorizer(std::vector<Binding> bindings)
    : bindings_(std::make_shared<const std::vector<Binding>>(std::move(bindings))) {}

std::shared_ptr<const Authorizer> Authorizer::Default() {
  Binding root;
  root.match = Binding::Match::kUid;
  root.id = 0;
  root.role = Role::kAdmin;
  std::vector<Binding> bindings;
  bindings.push_back(std::move(root));
  return std::shared_ptr<const Authorizer>(new Authorizer(std::move(bindings)));
}

absl::StatusOr<std::shared_ptr<const Authorizer>> Authorizer::FromConfig(
    const config::Authz& config) {
  std::vector<Binding> bindings;
  for (int i = 0; i < config.bindings_size(); ++i) {
    const config::AuthzBinding& b = config.bindings(i);
    const std::string field = absl::StrCat("authz.bindings[", i, "]");
    Binding out;
    int who = 0;
    if (!b.principal().empty()) {
      ++who;
      out.match = Binding::Match::kPrincipal;
      out.principal = b.principal();
    }
    if (!b.principal_prefix().empty()) {
      ++who;
      out.match = Binding::Match::kPrincipalPrefix;
      out.principal = b.principal_prefix();
      // "spiffe://corp" would also match "spiffe://corporate-evil/...": a SPIFFE prefix must
      // end at a path separator.
      if (absl::StartsWithIgnoreCase(out.principal, "spiffe://") && out.principal.back() != '/') {
        return absl::InvalidArgumentError(
            absl::StrCat(field, ".principal_prefix: a SPIFFE prefix must end with '/' (\"",
                         out.principal, "/\"), or it also matches other trust domains and paths"));
      }
    }
    if (b.has_uid()) {
      ++who;
      out.match = Binding::Match::kUid;
      out.id = b.uid();
    }
    if (b.has_gid()) {
      ++who;
      out.match = Binding::Match::kGid;
      out.id = b.gid();
    }
    if (who != 1) {
      return absl::InvalidArgumentError(
          absl::StrCat(field, ": exactly one of principal, principal_prefix, uid, gid (",
                       who == 0 ? "none" : "several", " given)"));
    }
    if (b.role().empty()) {
      return absl::InvalidArgumentError(
          absl::StrCat(field, ".role: required (viewer, responder, operator or admin)"));
    }
    std::optional<Role> role = RoleFromName(b.role());
    if (!role) {
      return absl::InvalidArgumentError(absl::StrCat(field, ".role: unknown role ",
                                                     Quoted(b.role()),
                                                     " (viewer, responder, operator or admin)"));
    }
    out.role = *role;
    for (int j = 0; j < b.guests_size(); ++j) {
      absl::Status s = ValidateSelector(b.guests(j), absl::StrCat(field, ".guests[", j, "]"));
      if (!s.ok()) return s;
      out.guests.push_back(b.guests(j));
    }
    bindings.push_back(std::move(out));
  }
  if (!config.has_unix_root_is_admin() || config.unix_root_is_admin()) {
    Binding root;
    root.match = Binding::Match::kUid;
    root.id = 0;
    root.role = Role::kAdmin;
    bindings.push_back(std::move(root));
  }
  return std::shared_ptr<const Authorizer>(new Authorizer(std::move(bindings)));
}

absl::StatusOr<std::shared_ptr<const Authorizer>> Authorizer::FromKvmidConfig(
    const config::KvmidConfig& config) {
  if (!config.has_authz()) return Default();
  return FromConfig(config.authz());
}

Role Authorizer::RoleOn(const Caller& caller, const GuestRef* guest) const {
  Role best = Role::kNone;
  if (!Authenticated(caller)) return best;
  for (const Binding& b : *bindings_) {
    if (b.role <= best || !b.Matches(caller)) continue;
    if (guest == nullptr ? b.guests.empty() : b.Covers(*guest)) best = b.role;
  }
  return best;
}

Role Authorizer::BestRole(const Caller& caller) const {
  Role best = Role::kNone;
  if (!Authenticated(caller)) return best;
  for (const Binding& b : *bindings_) {
    if (b.role > best && b.Matches(caller)) best = b.role;
  }
  return best;
}

absl::Status Authorizer::Check(const Caller& caller, Rpc rpc, const GuestRef* guest) const {
  const RpcInfo& info = InfoOf(rpc);
  if (!Authenticated(caller)) return Unauthenticated(rpc);
  const std::string needs = absl::StrCat("needs role ", Quoted(RoleName(info.role)));
  if (info.scope == RpcScope::kDaemon) {
    const Role have = RoleOn(caller, nullptr);
    if (have >= info.role) return absl::OkStatus();
    return absl::PermissionDeniedError(
        absl::StrCat(info.name, " on every guest: ", needs, " with no guest scope; ",
                     caller.Describe(), " has ", Quoted(RoleName(have)), " on every guest and ",
                     Quoted(RoleName(BestRole(caller))), " at most"));
  }
  if (info.scope == RpcScope::kGuest && guest == nullptr) {
    // Fail closed: a guest RPC checked without its guest is a bug of the caller.
    return absl::InternalError(absl::StrCat(info.name, ": authorization needs the guest"));
  }
  if (guest != nullptr) {
    const Role have = RoleOn(caller, guest);
    if (have >= info.role) return absl::OkStatus();
    return absl::PermissionDeniedError(absl::StrCat(info.name, " on guest ", guest->Describe(),
                                                    ": ", needs, "; ", caller.Describe(), " has ",
                                                    Quoted(RoleName(have)), " there"));
  }
  return CheckAnyGuest(caller, rpc);
}

absl::Status Authorizer::CheckAnyGuest(const Caller& caller, Rpc rpc) const {
  const RpcInfo& info = InfoOf(rpc);
  if (!Authenticated(caller)) return Unauthenticated(rpc);
  if (info.scope == RpcScope::kDaemon) return Check(caller, rpc, nullptr);
  const std::string needs = absl::StrCat("needs role ", Quoted(RoleName(info.role)));
  const Role have = BestRole(caller);
  if (have >= info.role) return absl::OkStatus();
  return absl::PermissionDeniedError(absl::StrCat(info.name, ": ", needs, " on some guest; ",
                                                  caller.Describe(), " has ",
                                                  Quoted(RoleName(have)), " at most"));
}

absl::Status Authorizer::CheckCrash(const Caller& caller, Rpc rpc, const GuestRef* guest) const {
  if (!Authenticated(caller)) return Unauthenticated(rpc);
  const Role have = RoleOn(caller, guest);
  if (have >= Role::kAdmin) return absl::OkStatus();
  return absl::PermissionDeniedError(
      absl::StrCat(InfoOf(rpc).name, " with ACTION_CRASH on ",
                   guest == nullptr ? std::string("every guest") : "guest " + guest->Describe(),
                   ": needs role \"admin\"; ", caller.Describe(), " has ", Quoted(RoleName(have)),
                   guest == nullptr ? " on every guest" : " there"));
}

bool Authorizer::Visible(const Caller& caller, const GuestRef& guest) const {
  return RoleOn(caller, &guest) >= Role::kViewer;
}

Scope Authorizer::ScopeOf(const Caller& caller, Role role) const {
  Scope scope;
  if (!Authenticated(caller) || role == Role::kNone) return scope;
  scope.keep_alive_ = bindings_;
  for (const Binding& b : *bindings_) {
    if (b.role < role || !b.Matches(caller)) continue;
    if (b.guests.empty()) {
      scope.all_ = true;
      scope.selectors_.clear();
      return scope;
    }
    for (const auto& s : b.guests) scope.selectors_.push_back(&s);
  }
  return scope;
}

absl::Status Authorizer::ClaimWithinScope(const Caller& caller, absl::Span<const GuestRef> claimed,
                                          bool claims_every_guest) const {
  if (!Authenticated(caller)) return Unauthenticated(Rpc::kAttach);
  if (claims_every_guest) {
    const Role have = RoleOn(caller, nullptr);
    if (have >= Role::kResponder) return absl::OkStatus();
    return absl::PermissionDeniedError(absl::StrCat(
        "Attach: a claim of every guest (empty Claim.vms) needs role \"responder\" on every "
        "guest; ",
        caller.Describe(), " has ", Quoted(RoleName(have)),
        " on every guest (name the guests in Claim.vms)"));
  }
  for (const GuestRef& guest : claimed) {
    const Role have = RoleOn(caller, &guest);
    if (have < Role::kResponder) {
      return absl::PermissionDeniedError(
          absl::StrCat("Attach on guest ", guest.Describe(), ": needs role \"responder\"; ",
                       caller.Describe(), " has ", Quoted(RoleName(have)), " there"));
    }
  }
  return absl::OkStatus();
}

AuthorizerHolder::AuthorizerHolder(std::shared_ptr<const Authorizer> initial)
    : current_(std::move(initial)) {}

std::shared_ptr<const Authorizer> AuthorizerHolder::Get() const {
  MutexLock lock(&mu_);
  return current_;
}

void AuthorizerHolder::Set(std::shared_ptr<const Authorizer> next) {
  std::shared_ptr<const Authorizer> old;
  {
    MutexLock lock(&mu_);
    old = std::move(current_);
    current_ = std::move(next);
    generation_.fetch_add(1, std::memory_order_acq_rel);
  }
  // `old` is released here, outside the lock.
}

}  // namespace security
}  // namespace kvmid
