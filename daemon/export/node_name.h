// The node this kvmid runs on, stamped on every event (API, export): --node_name, else the
// NODE_NAME environment variable (the Kubernetes downward API: spec.nodeName), else the host
// name.
#ifndef KVMID_DAEMON_EXPORT_NODE_NAME_H_
#define KVMID_DAEMON_EXPORT_NODE_NAME_H_

#include <absl/status/status.h>
#include <absl/strings/string_view.h>

#include <cstddef>
#include <string>

namespace kvmid {

inline constexpr size_t kMaxNodeNameBytes = 253;  // a DNS name, as Kubernetes node names are

// $NODE_NAME if set and not empty, else gethostname(), else "unknown".
std::string DefaultNodeName();

// Checks `name` (1..kMaxNodeNameBytes printable ASCII, no spaces) and makes it the process's
// node name. Call once in main, before any thread that reads it starts.
absl::Status SetNodeName(absl::string_view name);

// The node name (DefaultNodeName() until SetNodeName). Safe from any thread once set.
const std::string& NodeName();

}  // namespace kvmid

#endif  // KVMID_DAEMON_EXPORT_NODE_NAME_H_
