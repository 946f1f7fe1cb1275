#include "daemon/security/identity.h"

#include <absl/strings/numbers.h>
#include <absl/strings/str_cat.h>
#include <absl/strings/string_view.h>
#include <grpc/grpc_security_constants.h>

namespace kvmid::security {
namespace {

constexpr absl::string_view kFdPeerPrefix = "fd:";  // gRPC's name of an adopted descriptor
constexpr size_t kMaxPrincipalBytes = 1024;         // longer names are refused, not truncated

std::string FirstValue(const grpc::AuthContext& auth, const char* property) {
  std::vector<grpc::string_ref> values = auth.FindPropertyValues(property);
  if (values.empty()) return "";
  return std::string(values[0].data(), values[0].size());
}

// A name fit for a log line and a policy match: printable ASCII, no spaces, bounded.
bool Printable(const std::string& name) {
  if (name.empty() || name.size() > kMaxPrincipalBytes) return false;
  for (unsigned char c : name) {
    if (c <= 0x20 || c >= 0x7f) return false;
  }
  return true;
}

}  // namespace

const char* SourceName(CallerIdentity::Source source) {
  switch (source) {
    case CallerIdentity::Source::kSpiffeId:
      return "spiffe";
    case CallerIdentity::Source::kDnsSan:
      return "dns";
    case CallerIdentity::Source::kCommonName:
      return "cn";
    case CallerIdentity::Source::kNone:
      break;
  }
  return "none";
}

std::string CallerIdentity::ToString() const {
  switch (kind) {
    case Kind::kTls:
      return absl::StrCat("tls ", SourceName(source), "=", principal, " peer=", peer);
    case Kind::kUnix:
      return absl::StrCat("unix uid=", unix.uid, " gid=", unix.gid, " pid=", unix.pid,
                          " peer=", peer);
    case Kind::kAnonymous:
      break;
  }
  return absl::StrCat("anonymous peer=", peer);
}

absl::StatusOr<CallerIdentity> IdentityFromAuthContext(const grpc::AuthContext& auth,
                                                       const std::string& peer) {
  CallerIdentity identity;
  identity.peer = peer;
  std::string security = FirstValue(auth, GRPC_TRANSPORT_SECURITY_TYPE_PROPERTY_NAME);
  // gRPC's TlsServerCredentials say "tls", its older SslServerCredentials "ssl".
  if (security != GRPC_TLS_TRANSPORT_SECURITY_TYPE &&
      security != GRPC_SSL_TRANSPORT_SECURITY_TYPE) {
    identity.kind = CallerIdentity::Kind::kAnonymous;  // insecure credentials: nothing verified
    return identity;
  }
  // Only a certificate gRPC verified against the client CA names anyone (the listener requires
  // and verifies one, so an unauthenticated TLS peer is not expected; refuse it all the same).
  if (!auth.IsPeerAuthenticated()) {
    return absl::UnauthenticatedError(
        absl::StrCat("TLS peer ", peer, " presented no verified client certificate"));
  }
  identity.kind = CallerIdentity::Kind::kTls;
  // gRPC sets peer_spiffe_id only for exactly one well-formed spiffe:// URI SAN.
  std::string name = FirstValue(auth, GRPC_PEER_SPIFFE_ID_PROPERTY_NAME);
  if (!name.empty()) {
    identity.source = CallerIdentity::Source::kSpiffeId;
  } else if (!(name = FirstValue(auth, GRPC_PEER_DNS_PROPERTY_NAME)).empty()) {
    identity.source = CallerIdentity::Source::kDnsSan;
  } else if (!(name = FirstValue(auth, GRPC_X509_CN_PROPERTY_NAME)).empty()) {
    identity.source = CallerIdentity::Source::kCommonName;
  } else {
    return absl::UnauthenticatedError(absl::StrCat(
        "TLS peer ", peer, ": its client certificate has no SPIFFE ID, DNS SAN or CN"));
  }
  if (!Printable(name)) {
    return absl::UnauthenticatedError(absl::StrCat(
        "TLS peer ", peer, ": the client certificate's ", SourceName(identity.source),
        " name is empty, longer than ", kMaxPrincipalBytes, " bytes or not printable ASCII"));
  }
  identity.principal = std::move(name);
  return identity;
}

absl::StatusOr<CallerIdentity> IdentifyCaller(const grpc::ServerContextBase& context) {
  std::string peer = context.peer();
  if (absl::string_view(peer).substr(0, kFdPeerPrefix.size()) == kFdPeerPrefix) {
    int fd = -1;
    std::optional<UnixPeer> unix;
    if (absl::SimpleAtoi(absl::string_view(peer).substr(kFdPeerPrefix.size()), &fd)) {
      unix = UnixPeerTable::Global().Get(fd);
    }
    if (!unix) {
      return absl::UnauthenticatedError(
          absl::StrCat("UNIX peer ", peer, " has no recorded peer credentials"));
    }
    CallerIdentity identity;
    identity.kind = CallerIdentity::Kind::kUnix;
    identity.unix = *unix;
    identity.principal = absl::StrCat("uid:", unix->uid);
    identity.peer = UnixPeerName(*unix);
    return identity;
  }
  std::shared_ptr<const grpc::AuthContext> auth = context.auth_context();
  if (!auth) {
    CallerIdentity identity;
    identity.peer = std::move(peer);
    return identity;  // no security connector at all: anonymous
  }
  return IdentityFromAuthContext(*auth, peer);
}

std::string UnixPeerName(const UnixPeer& peer) {
  return absl::StrCat("unix:", peer.socket_path, " pid=", peer.pid, " uid=", peer.uid,
                      " gid=", peer.gid);
}

UnixPeerTable& UnixPeerTable::Global() {
  static UnixPeerTable* table = new UnixPeerTable();  // never destroyed: used until exit
  return *table;
}

void UnixPeerTable::Set(int fd, const UnixPeer& peer) {
  MutexLock lock(&mu_);
  by_fd_[fd] = peer;
}

std::optional<UnixPeer> UnixPeerTable::Get(int fd) const {
  MutexLock lock(&mu_);
  auto it = by_fd_.find(fd);
  if (it == by_fd_.end()) return std::nullopt;
  return it->second;
}

void UnixPeerTable::Erase(int fd) {
  MutexLock lock(&mu_);
  by_fd_.erase(fd);
}

}  // namespace kvmid::security
