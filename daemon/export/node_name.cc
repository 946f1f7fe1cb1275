#include "daemon/export/node_name.h"

#include <absl/strings/str_cat.h>
#include <limits.h>
#include <unistd.h>

#include <cstdlib>

namespace kvmid {
namespace {

absl::Status Validate(absl::string_view name) {
  if (name.empty() || name.size() > kMaxNodeNameBytes) {
    return absl::InvalidArgumentError(
        absl::StrCat("node name: 1 to ", kMaxNodeNameBytes, " characters, not ", name.size()));
  }
  for (char c : name) {
    if (c <= ' ' || c > '~' || c == '"' || c == '\\') {
      return absl::InvalidArgumentError(
          absl::StrCat("node name '", name, "': printable ASCII without spaces, quotes or '\\'"));
    }
  }
  return absl::OkStatus();
}

std::string& Storage() {
  static std::string* name = new std::string(DefaultNodeName());
  return *name;
}

}  // namespace

std::string DefaultNodeName() {
  const char* env = std::getenv("NODE_NAME");
  if (env != nullptr && Validate(env).ok()) return env;
  char host[HOST_NAME_MAX + 1] = {};
  if (::gethostname(host, sizeof(host) - 1) == 0 && Validate(host).ok()) return host;
  return "unknown";
}

absl::Status SetNodeName(absl::string_view name) {
  absl::Status valid = Validate(name);
  if (valid.ok()) Storage() = std::string(name);
  return valid;
}

const std::string& NodeName() { return Storage(); }

}  // namespace kvmid
