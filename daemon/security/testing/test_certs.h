// Certificates for tests, made at test time by make_cert.sh (openssl, EC P-256) in a private
// temporary directory that goes away with the object.
#ifndef KVMID_DAEMON_SECURITY_TESTING_TEST_CERTS_H_
#define KVMID_DAEMON_SECURITY_TESTING_TEST_CERTS_H_

#include <absl/status/status.h>

#include <string>

namespace kvmid::security::testing {

class TestCerts {
 public:
  TestCerts();
  ~TestCerts();
  TestCerts(const TestCerts&) = delete;
  TestCerts& operator=(const TestCerts&) = delete;

  // A self-signed CA: pem(name), key(name).
  absl::Status Ca(const std::string& name);
  // A leaf signed by `ca`. `cn` may be empty (no CN); `san` is an openssl subjectAltName value
  // ("URI:spiffe://td/x", "DNS:a.example,IP:127.0.0.1") or empty.
  absl::Status Leaf(const std::string& name, const std::string& ca, const std::string& cn,
                    const std::string& san, bool server = false, bool expired = false);

  std::string pem(const std::string& name) const { return dir_ + "/" + name + ".pem"; }
  std::string key(const std::string& name) const { return dir_ + "/" + name + ".key"; }
  const std::string& dir() const { return dir_; }

  static std::string ReadFile(const std::string& path);

 private:
  std::string dir_;
};

}  // namespace kvmid::security::testing

#endif  // KVMID_DAEMON_SECURITY_TESTING_TEST_CERTS_H_
