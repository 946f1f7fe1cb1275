#include "daemon/security/testing/test_certs.h"

#include <absl/strings/str_cat.h>
#include <stdlib.h>

#include <cstdlib>
#include <fstream>
#include <sstream>

namespace kvmid::security::testing {
namespace {

std::string Script() {
  const char* srcdir = std::getenv("TEST_SRCDIR");
  const char* workspace = std::getenv("TEST_WORKSPACE");
  if (srcdir == nullptr) return "daemon/security/testing/make_cert.sh";
  return absl::StrCat(srcdir, "/", workspace ? workspace : "kvmid",
                      "/daemon/security/testing/make_cert.sh");
}

// Single-quoted for the shell (test inputs only).
std::string Quote(const std::string& s) {
  std::string out = "'";
  for (char c : s) {
    if (c == '\'') {
      out += "'\\''";
    } else {
      out += c;
    }
  }
  return out + "'";
}

absl::Status Run(const std::string& command) {
  int rc = std::system(command.c_str());
  if (rc != 0) return absl::InternalError(absl::StrCat("'", command, "' exited ", rc));
  return absl::OkStatus();
}

}  // namespace

TestCerts::TestCerts() {
  char dir_template[] = "/tmp/kvmid-certs-XXXXXX";
  dir_ = ::mkdtemp(dir_template);
}

TestCerts::~TestCerts() { (void)Run("rm -rf " + Quote(dir_)); }

absl::Status TestCerts::Ca(const std::string& name) {
  return Run(absl::StrCat("bash ", Quote(Script()), " ca ", Quote(dir_), " ", Quote(name)));
}

absl::Status TestCerts::Leaf(const std::string& name, const std::string& ca, const std::string& cn,
                             const std::string& san, bool server, bool expired) {
  return Run(absl::StrCat("bash ", Quote(Script()), " leaf ", Quote(dir_), " ", Quote(name), " ",
                          Quote(ca), " ", Quote(cn), " ", Quote(san), " ",
                          server ? "server" : "client", " ", expired ? "expired" : "''"));
}

std::string TestCerts::ReadFile(const std::string& path) {
  std::ifstream in(path);
  std::stringstream text;
  text << in.rdbuf();
  return text.str();
}

}  // namespace kvmid::security::testing
