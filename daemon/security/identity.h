// Who is calling: the identity of an API caller, from its transport.
//
// - TLS (the TCP listener): the client certificate gRPC verified. Its SPIFFE ID (a
//   spiffe:// URI SAN) if it has one, else its first DNS SAN, else its subject CN.
// - UNIX (the API socket): the peer credentials (SO_PEERCRED: uid, gid, pid) of the connection,
//   read by kvmid's own accept loop (daemon/security/unix_listener.h) before the connection is
//   handed to gRPC. gRPC names such a connection "fd:N"; UnixPeerTable maps N back to the
//   credentials. N cannot be reused while a call of that connection is alive: every call holds
//   its transport, which owns the descriptor until the last call is gone
//   (UnixListenerTest.DescriptorOutlivesItsCalls pins this for the gRPC we link).
// - Plaintext TCP (only with api_tcp_insecure_plaintext, loopback): no identity at all; the
//   caller is kAnonymous and authorization must treat it as unauthenticated.
#ifndef KVMID_DAEMON_SECURITY_IDENTITY_H_
#define KVMID_DAEMON_SECURITY_IDENTITY_H_

#include <absl/container/flat_hash_map.h>
#include <absl/status/statusor.h>
#include <grpcpp/security/auth_context.h>
#include <grpcpp/server_context.h>
#include <sys/types.h>

#include <optional>
#include <string>

#include "daemon/base/mutex.h"

namespace kvmid::security {

// The credentials of a UNIX peer at connect time (SO_PEERCRED), and the socket it connected to.
struct UnixPeer {
  uid_t uid = 0;
  gid_t gid = 0;
  pid_t pid = 0;
  std::string socket_path;  // the API socket's path ("" if unknown)
};

// What logs and audit records call a UNIX caller's peer (instead of gRPC's "fd:N", which names
// nothing once the connection is gone): "unix:/run/kvmid/api.sock pid=1234 uid=0 gid=0".
std::string UnixPeerName(const UnixPeer& peer);

struct CallerIdentity {
  enum class Kind {
    kTls,        // verified client certificate; `principal` and `source` set
    kUnix,       // API socket; `unix` set, `principal` is "uid:<uid>"
    kAnonymous,  // plaintext TCP (insecure flag): nothing is known but the peer address
  };
  // Which part of the client certificate `principal` comes from.
  enum class Source { kNone, kSpiffeId, kDnsSan, kCommonName };

  Kind kind = Kind::kAnonymous;
  Source source = Source::kNone;
  std::string principal;  // spiffe://td/path, a DNS name, a CN, or uid:N
  UnixPeer unix;          // kUnix only
  // gRPC's peer for TCP: "ipv4:127.0.0.1:40312", "ipv6:[::1]:40312"; UnixPeerName for UNIX.
  std::string peer;

  // One token-like line for logs and audit records, e.g.
  //   tls spiffe=spiffe://kvmid.dev/role/admin peer=ipv4:10.0.0.7:51234
  //   unix uid=1000 gid=1000 pid=4242 peer=unix:/run/kvmid/api.sock pid=4242 uid=1000 gid=1000
  //   anonymous peer=ipv4:127.0.0.1:40312
  std::string ToString() const;
};

const char* SourceName(CallerIdentity::Source source);

// The identity of the caller of the RPC `context` belongs to. UNAUTHENTICATED when the
// transport gives none that can be trusted (a TLS peer without a usable name, a UNIX
// connection kvmid did not accept itself).
absl::StatusOr<CallerIdentity> IdentifyCaller(const grpc::ServerContextBase& context);

// The TLS part, from gRPC's auth context of a call (exposed for tests).
absl::StatusOr<CallerIdentity> IdentityFromAuthContext(const grpc::AuthContext& auth,
                                                       const std::string& peer);

// Peer credentials of the UNIX connections kvmid handed to gRPC, by descriptor number.
class UnixPeerTable {
 public:
  static UnixPeerTable& Global();

  // Records `peer` for descriptor `fd` (a fresh connection; replaces a closed one's entry).
  void Set(int fd, const UnixPeer& peer);
  std::optional<UnixPeer> Get(int fd) const;
  void Erase(int fd);

 private:
  mutable Mutex mu_;
  absl::flat_hash_map<int, UnixPeer> by_fd_ ABSL_GUARDED_BY(mu_);
};

}  // namespace kvmid::security

#endif  // KVMID_DAEMON_SECURITY_IDENTITY_H_
