#include "daemon/security/credentials.h"

#include <absl/strings/numbers.h>
#include <absl/strings/str_cat.h>
#include <arpa/inet.h>
#include <grp.h>
#include <grpcpp/security/tls_certificate_provider.h>
#include <grpcpp/security/tls_credentials_options.h>
#include <openssl/bio.h>
#include <openssl/pem.h>
#include <openssl/x509.h>
#include <spdlog/spdlog.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <sstream>
#include <vector>

namespace kvmid::security {
namespace {

struct BioFree {
  void operator()(BIO* b) const { BIO_free(b); }
};
struct X509Free {
  void operator()(X509* x) const { X509_free(x); }
};
struct KeyFree {
  void operator()(EVP_PKEY* k) const { EVP_PKEY_free(k); }
};
using Bio = std::unique_ptr<BIO, BioFree>;
using X509Ptr = std::unique_ptr<X509, X509Free>;
using KeyPtr = std::unique_ptr<EVP_PKEY, KeyFree>;

absl::StatusOr<std::string> ReadPemFile(const std::string& path, const std::string& field) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    return absl::FailedPreconditionError(
        absl::StrCat(field, ": cannot read ", path, ": ", std::strerror(errno)));
  }
  std::string text(kMaxPemFileBytes + 1, '\0');
  in.read(text.data(), static_cast<std::streamsize>(text.size()));
  text.resize(static_cast<size_t>(in.gcount()));
  if (text.size() > kMaxPemFileBytes) {
    return absl::InvalidArgumentError(
        absl::StrCat(field, ": ", path, " is larger than ", kMaxPemFileBytes, " bytes"));
  }
  return text;
}

Bio MemBio(const std::string& text) {
  return Bio(BIO_new_mem_buf(text.data(), static_cast<int>(text.size())));
}

// The certificates of a PEM bundle, in order; INVALID_ARGUMENT if there is none.
absl::StatusOr<std::vector<X509Ptr>> ParseCertificates(const std::string& pem,
                                                       const std::string& what) {
  std::vector<X509Ptr> certs;
  Bio bio = MemBio(pem);
  while (X509* cert = PEM_read_bio_X509(bio.get(), nullptr, nullptr, nullptr)) {
    certs.emplace_back(cert);
  }
  if (certs.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": no PEM certificate in it"));
  }
  return certs;
}

}  // namespace

absl::StatusOr<std::pair<std::string, uint16_t>> SplitHostPort(const std::string& host_port,
                                                               const std::string& field) {
  size_t colon = host_port.rfind(':');
  if (colon == std::string::npos || colon == 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(field, ": '", host_port, "' is not HOST:PORT (e.g. 127.0.0.1:50051)"));
  }
  std::string host = host_port.substr(0, colon);
  if (host.size() >= 2 && host.front() == '[' && host.back() == ']') {
    host = host.substr(1, host.size() - 2);
  }
  uint32_t port = 0;
  if (!absl::SimpleAtoi(host_port.substr(colon + 1), &port) || port > 0xffff) {
    return absl::InvalidArgumentError(
        absl::StrCat(field, ": '", host_port, "': the port must be 0..65535"));
  }
  return std::make_pair(host, static_cast<uint16_t>(port));
}

bool IsLoopbackHost(const std::string& host_in) {
  std::string host = host_in;
  if (host.size() >= 2 && host.front() == '[' && host.back() == ']') {
    host = host.substr(1, host.size() - 2);
  }
  in_addr v4;
  if (inet_pton(AF_INET, host.c_str(), &v4) == 1) return (ntohl(v4.s_addr) >> 24) == 127;
  in6_addr v6;
  if (inet_pton(AF_INET6, host.c_str(), &v6) == 1) {
    if (IN6_IS_ADDR_LOOPBACK(&v6)) return true;
    // ::ffff:127.x.y.z
    return IN6_IS_ADDR_V4MAPPED(&v6) && v6.s6_addr[12] == 127;
  }
  return false;  // names (even "localhost") may resolve to anything: literal addresses only
}

absl::StatusOr<uint32_t> ParseSocketMode(const std::string& text, const std::string& field) {
  uint32_t mode = 0;
  bool octal = !text.empty() && text.size() <= 4;
  for (char c : text) {
    if (c < '0' || c > '7') octal = false;
    if (octal) mode = mode * 8 + static_cast<uint32_t>(c - '0');
  }
  if (!octal || mode > 0777) {
    return absl::InvalidArgumentError(
        absl::StrCat(field, ": '", text, "' is not an octal permission mode such as 0660"));
  }
  return mode;
}

absl::StatusOr<gid_t> LookUpGroup(const std::string& group) {
  uint32_t number = 0;
  if (absl::SimpleAtoi(group, &number)) return static_cast<gid_t>(number);
  std::vector<char> buffer(16384);
  struct group entry;
  struct group* found = nullptr;
  int error = getgrnam_r(group.c_str(), &entry, buffer.data(), buffer.size(), &found);
  if (error != 0 || found == nullptr) {
    return absl::NotFoundError(absl::StrCat("unknown group '", group, "'"));
  }
  return found->gr_gid;
}

absl::Status ValidateListenOptions(const ApiListenOptions& options) {
  if (options.unix_socket.empty() && options.tcp.empty()) {
    return absl::InvalidArgumentError("no API address (api_socket or api_tcp)");
  }
  if (options.unix_socket_mode > 0777) {
    return absl::InvalidArgumentError(absl::StrCat("api_socket_mode: 0",
                                                   absl::Hex(options.unix_socket_mode),
                                                   " is not a permission mode (at most 0777)"));
  }
  if (options.tls.refresh_seconds < 1 || options.tls.refresh_seconds > kMaxTlsRefreshSeconds) {
    return absl::InvalidArgumentError(
        absl::StrCat("api_tls_refresh_seconds: must be 1..", kMaxTlsRefreshSeconds));
  }
  if (options.tcp.empty()) {
    if (options.tcp_insecure_plaintext) {
      return absl::InvalidArgumentError("api_tcp_insecure_plaintext: there is no api_tcp");
    }
    return absl::OkStatus();
  }
  auto host_port = SplitHostPort(options.tcp, "api_tcp");
  if (!host_port.ok()) return host_port.status();
  if (options.tcp_insecure_plaintext) {
    if (options.tls.any()) {
      return absl::InvalidArgumentError(
          "api_tcp_insecure_plaintext: cannot be combined with the api_tls_* files (pick one)");
    }
    if (!IsLoopbackHost(host_port->first)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "api_tcp_insecure_plaintext: plaintext is allowed only on a loopback address "
          "(127.0.0.1, ::1), not '",
          host_port->first, "'; give api_tls_cert, api_tls_key and api_tls_client_ca instead"));
    }
    return absl::OkStatus();
  }
  std::vector<std::string> missing;
  if (options.tls.cert.empty()) missing.push_back("api_tls_cert");
  if (options.tls.key.empty()) missing.push_back("api_tls_key");
  if (options.tls.client_ca.empty()) missing.push_back("api_tls_client_ca");
  if (!missing.empty()) {
    std::string names;
    for (const std::string& name : missing)
      absl::StrAppend(&names, names.empty() ? "" : ", ", name);
    return absl::InvalidArgumentError(
        absl::StrCat("api_tcp ", options.tcp, " serves mutual TLS only: missing ", names,
                     " (plaintext needs api_tcp_insecure_plaintext and a loopback address)"));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> MutualTlsServerCredentials(
    const TlsFiles& files) {
  auto cert_pem = ReadPemFile(files.cert, "api_tls_cert");
  if (!cert_pem.ok()) return cert_pem.status();
  auto key_pem = ReadPemFile(files.key, "api_tls_key");
  if (!key_pem.ok()) return key_pem.status();
  auto ca_pem = ReadPemFile(files.client_ca, "api_tls_client_ca");
  if (!ca_pem.ok()) return ca_pem.status();

  auto chain = ParseCertificates(*cert_pem, "api_tls_cert " + files.cert);
  if (!chain.ok()) return chain.status();
  Bio key_bio = MemBio(*key_pem);
  KeyPtr key(PEM_read_bio_PrivateKey(key_bio.get(), nullptr, nullptr, nullptr));
  if (!key) {
    return absl::InvalidArgumentError(
        absl::StrCat("api_tls_key ", files.key, ": no PEM private key in it (or encrypted)"));
  }
  X509* leaf = (*chain)[0].get();
  if (X509_check_private_key(leaf, key.get()) != 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("api_tls_key ", files.key, " does not match the certificate in ", files.cert));
  }
  if (X509_cmp_current_time(X509_get0_notAfter(leaf)) < 0) {
    spdlog::warn(
        "api_tls_cert {}: the server certificate has expired; clients will refuse it "
        "until the file is replaced",
        files.cert);
  }
  auto cas = ParseCertificates(*ca_pem, "api_tls_client_ca " + files.client_ca);
  if (!cas.ok()) return cas.status();

  auto provider = std::make_shared<grpc::experimental::FileWatcherCertificateProvider>(
      files.key, files.cert, files.client_ca, files.refresh_seconds);
  grpc::experimental::TlsServerCredentialsOptions options(provider);
  options.watch_root_certs();
  options.watch_identity_key_cert_pairs();
  options.set_cert_request_type(GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY);
  std::shared_ptr<grpc::ServerCredentials> credentials =
      grpc::experimental::TlsServerCredentials(options);
  if (!credentials) return absl::InternalError("gRPC refused the TLS server credentials");
  return credentials;
}

absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> TcpServerCredentials(
    const ApiListenOptions& options) {
  absl::Status valid = ValidateListenOptions(options);
  if (!valid.ok()) return valid;
  if (options.tcp_insecure_plaintext) {
    spdlog::warn(
        "API on {} is PLAINTEXT (api_tcp_insecure_plaintext): no encryption and no "
        "caller identity; any local process can reach it. Use mutual TLS outside tests.",
        options.tcp);
    return grpc::InsecureServerCredentials();
  }
  return MutualTlsServerCredentials(options.tls);
}

}  // namespace kvmid::security
