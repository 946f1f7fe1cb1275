// kvmid's configuration file (daemon/config/kvmid_config.proto, protobuf text format): read,
// validated field by field, and turned into the daemon's settings and rules.
#ifndef KVMID_DAEMON_CONFIG_CONFIG_H_
#define KVMID_DAEMON_CONFIG_CONFIG_H_

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "daemon/config/kvmid_config.pb.h"
#include "daemon/kvmid.h"
#include "daemon/verdict/policy.h"

namespace kvmid {

struct LoadedConfig {
  DaemonConfig daemon;
  std::string api_socket = "/run/kvmid/api.sock";
  std::string api_tcp;
  // The API's transport security (daemon/security/credentials.h has the meaning and checks).
  uint32_t api_socket_mode = 0660;
  std::string api_socket_group;
  bool api_tcp_insecure_plaintext = false;
  std::string api_tls_cert, api_tls_key, api_tls_client_ca;
  uint32_t api_tls_refresh_seconds = 60;
  std::vector<std::shared_ptr<Rule>> rules;
  std::map<std::string, std::map<std::string, std::string>> guest_labels;
};

// Parses `text` (the file's content; `origin` names it in errors) on top of the defaults.
// Returns "" or an error such as "kvmid.conf:7:12: ..." / "policies[1] (ktext): ...".
std::string ParseConfig(const std::string& text, const std::string& origin, LoadedConfig* out);
std::string LoadConfigFile(const std::string& path, LoadedConfig* out);

}  // namespace kvmid

#endif  // KVMID_DAEMON_CONFIG_CONFIG_H_
