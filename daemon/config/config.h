// kvmid's configuration file (daemon/config/kvmid_config.proto, protobuf text format): read,
// validated field by field, and turned into the daemon's settings and rules.
#ifndef KVMID_DAEMON_CONFIG_CONFIG_H_
#define KVMID_DAEMON_CONFIG_CONFIG_H_

#include <absl/status/statusor.h>

#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "daemon/config/kvmid_config.pb.h"
#include "daemon/kvmid.h"
#include "daemon/verdict/policy.h"

namespace kvmid {

// LoadedConfig (what a file gives) is declared in daemon/kvmid.h: Daemon::Reload takes it.

// Parses `text` (the file's content; `origin` names it in errors) on top of the defaults.
// InvalidArgument names the place: "kvmid.conf:7:12: ..." / "kvmid.conf: policies[1] (ktext): ...".
absl::StatusOr<LoadedConfig> ParseConfig(const std::string& text, const std::string& origin);
// Reads and parses the file (an unreadable file is the errno's status, naming the path).
absl::StatusOr<LoadedConfig> LoadConfigFile(const std::string& path);

}  // namespace kvmid

#endif  // KVMID_DAEMON_CONFIG_CONFIG_H_
