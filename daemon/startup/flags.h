// kvmid's command-line flags and how they merge over the configuration file.
//
// The file (--config) gives the base; a flag overrides it only when the user set it: on the
// command line, in a --flagfile, as -single_dash or --noflag. Abseil tells us which flags it set:
// every kvmid flag carries an OnUpdate callback (KVMID_FLAG) that records its name when Abseil's
// parser (or absl::SetFlag) assigns it, so nothing re-reads argv.
#ifndef KVMID_DAEMON_STARTUP_FLAGS_H_
#define KVMID_DAEMON_STARTUP_FLAGS_H_

#include <absl/flags/flag.h>
#include <absl/status/statusor.h>
#include <absl/strings/string_view.h>
#include <spdlog/common.h>

#include <memory>
#include <string>
#include <vector>

#include "daemon/config/config.h"
#include "daemon/event_log.h"
#include "daemon/verdict/policy.h"

namespace kvmid {

// Records that the flag `name` was assigned (callback of every KVMID_FLAG).
void MarkFlagGiven(absl::string_view name);
// Forgets every assignment so far (Abseil also assigns defaults while registering callbacks).
// Call it right before absl::ParseCommandLine.
void ForgetGivenFlags();
// True if the flag was assigned since the last ForgetGivenFlags.
bool FlagGiven(absl::string_view name);

// ABSL_FLAG with the "given" marker. Use it for every flag that overlays the configuration file.
#define KVMID_FLAG(Type, name, default_value, help) \
  ABSL_FLAG(Type, name, default_value, help).OnUpdate([] { ::kvmid::MarkFlagGiven(#name); })

// The log line format of --log_format.
enum class LogFormat : uint8_t { kText, kJson };

// Everything start-up needs, after the file and the flags are merged.
struct Settings {
  std::string config_path;  // empty: no --config
  LoadedConfig config;      // daemon settings, API addresses, labels, the file's policies
  // Policies to apply: the file's, then --baseline's, then --protect's.
  std::vector<std::shared_ptr<Rule>> rules;
  EventLogOptions event_log;
  spdlog::level::level_enum log_level = spdlog::level::info;
  LogFormat log_format = LogFormat::kText;
  // Prometheus metrics and HTTP health; empty = off. Required: given by a flag or the file (a
  // failure to serve it stops start-up); otherwise the default, which may be taken.
  std::string metrics_address;
  bool metrics_address_required = false;
  // Operations (flags only; checked by the steps that use them, daemon/main.cc).
  std::string state_dir;      // API policies kept here; empty = not persisted
  std::string state_recover;  // fail or quarantine
  std::string export_file;    // JSON lines export; empty = off
  uint64_t export_max_bytes = 0;
  uint32_t export_max_files = 0;
  uint64_t export_queue = 0;
  std::string node_name;  // empty = $NODE_NAME, else the host name
};

// Merges the flags Abseil set over `file` (the parsed --config, or the defaults when there is
// none, in which case --kvmi_socket's default applies too). InvalidArgument names the flag.
absl::StatusOr<Settings> OverlayFlags(LoadedConfig file, bool have_file);
// Reads --config (if given) and overlays the flags.
absl::StatusOr<Settings> SettingsFromFlags();
// Parses one --protect value: NAME:GPA_FIRST-GPA_LAST:ALLOWED[:ACTION][:monitor].
absl::StatusOr<std::shared_ptr<Rule>> ParseProtect(const std::string& spec);
// "HOST:PORT" with PORT 0..65535 (0: any free port); InvalidArgument otherwise.
absl::Status CheckTcpAddress(const std::string& address);

}  // namespace kvmid

#endif  // KVMID_DAEMON_STARTUP_FLAGS_H_
