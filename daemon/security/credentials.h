// Transport security of kvmid's gRPC API: how each listener is exposed.
//
// The TCP listener serves TLS only, and that TLS is mutual: a server certificate and key plus a
// client-CA bundle, client certificates required and verified. gRPC's own TLS credentials do
// the work (TlsServerCredentials over a FileWatcherCertificateProvider), so the certificate, key
// and CA are re-read when their files change (cert-manager swaps a symlinked directory) without
// a restart and without touching open connections. Plaintext TCP exists only behind an
// explicitly named flag and only on a loopback address.
#ifndef KVMID_DAEMON_SECURITY_CREDENTIALS_H_
#define KVMID_DAEMON_SECURITY_CREDENTIALS_H_

#include <absl/status/status.h>
#include <absl/status/statusor.h>
#include <grpcpp/security/server_credentials.h>
#include <sys/types.h>

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>

namespace kvmid::security {

// Limits and defaults of this package (errors are built from them).
inline constexpr uint32_t kDefaultApiSocketMode = 0660;
inline constexpr uint32_t kDefaultTlsRefreshSeconds = 60;
inline constexpr uint32_t kMaxTlsRefreshSeconds = 24 * 3600;
inline constexpr size_t kMaxPemFileBytes = 1 << 20;  // a certificate chain or CA bundle

struct TlsFiles {
  std::string cert;       // PEM certificate chain of the server (leaf first)
  std::string key;        // PEM private key of that certificate
  std::string client_ca;  // PEM bundle of the CAs that issue client certificates
  // How often gRPC's file watcher looks at the three files (1..kMaxTlsRefreshSeconds).
  uint32_t refresh_seconds = kDefaultTlsRefreshSeconds;

  bool any() const { return !cert.empty() || !key.empty() || !client_ca.empty(); }
};

// Everything the API listeners need, from flags or the config file.
struct ApiListenOptions {
  std::string unix_socket;                            // empty = none
  uint32_t unix_socket_mode = kDefaultApiSocketMode;  // exactly this, whatever the umask
  std::string unix_socket_group;                      // empty = the daemon's group
  std::string tcp;                                    // HOST:PORT; empty = none
  TlsFiles tls;                                       // required with `tcp` ...
  bool tcp_insecure_plaintext = false;                // ... unless this, on loopback only
};

// Checks the options as a whole: a TCP address needs all three TLS files, or the insecure flag
// and a loopback host (never both); modes and the refresh interval are in range.
absl::Status ValidateListenOptions(const ApiListenOptions& options);

// True for 127.0.0.0/8, ::1 and "localhost" (brackets around IPv6 are accepted).
bool IsLoopbackHost(const std::string& host);
// Splits HOST:PORT ("[::1]:50051" too); INVALID_ARGUMENT naming `field` otherwise.
absl::StatusOr<std::pair<std::string, uint16_t>> SplitHostPort(const std::string& host_port,
                                                               const std::string& field);

// Reads and checks the TLS files now (so that a wrong path or a key that does not match the
// certificate stops kvmid at start with a message naming the file), then builds gRPC's mTLS
// server credentials that keep watching the files.
absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> MutualTlsServerCredentials(
    const TlsFiles& files);

// The credentials of the TCP listener from validated options: mTLS, or plaintext (insecure flag;
// a warning is logged).
absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> TcpServerCredentials(
    const ApiListenOptions& options);

// "0660" -> 0660; INVALID_ARGUMENT naming `field` unless an octal permission mode.
absl::StatusOr<uint32_t> ParseSocketMode(const std::string& text, const std::string& field);
// A group name or number -> gid; NOT_FOUND naming the group.
absl::StatusOr<gid_t> LookUpGroup(const std::string& group);

}  // namespace kvmid::security

#endif  // KVMID_DAEMON_SECURITY_CREDENTIALS_H_
