#include "daemon/startup/flags.h"

#include <absl/strings/numbers.h>
#include <absl/strings/str_split.h>

#include <chrono>
#include <set>

#include "daemon/base/mutex.h"
#include "daemon/config/policy_convert.h"
#include "kernel/uapi/kvmi.h"

KVMID_FLAG(std::string, config, "",
           "configuration file (protobuf text format, daemon/config/kvmid_config.proto); flags "
           "given on the command line (or in a --flagfile) override it; SIGHUP reloads it");
KVMID_FLAG(std::string, kvmi_socket, "/run/kvmid/kvmi.sock",
           "UNIX socket QEMU connects to (chardev socket path); empty = none");
KVMID_FLAG(std::string, kvmi_socket_mode, "0660", "permissions of the UNIX socket (octal)");
KVMID_FLAG(std::string, kvmi_socket_group, "", "group owning the UNIX socket (e.g. kvm)");
KVMID_FLAG(int, kvmi_vsock_port, -1, "AF_VSOCK port to listen on; -1 = none");
KVMID_FLAG(std::string, api_socket, "/run/kvmid/api.sock",
           "UNIX socket of the gRPC API (kvmi.v1.Introspection, reflection, health); empty = none");
KVMID_FLAG(std::string, api_tcp, "",
           "HOST:PORT for the gRPC API over TCP (e.g. 127.0.0.1:50051; port 0 = any free port); "
           "empty = none");
KVMID_FLAG(std::string, cookie_file, "",
           "shared secret; its SHA-1 goes back to QEMU as cookie_hash (kvmi-v7 QEMU checks it)");
KVMID_FLAG(std::string, allowed_uids, "",
           "comma-separated uids allowed to connect on the UNIX socket (SO_PEERCRED); empty = any");
KVMID_FLAG(int, io_threads, 2, "I/O threads serving guest sockets (1..64)");
KVMID_FLAG(int, io_nice, -10,
           "nice value of the I/O threads, which carry every guest's events (-20..19; raising it "
           "needs CAP_SYS_NICE); the gRPC threads keep the process's");
KVMID_FLAG(int, io_idle_yields, 3,
           "how often an I/O thread that exchanged events or verdicts with a remote handler gives "
           "up its CPU to the guests it woke, and takes their next events, before it sleeps "
           "(0..64; 0: it sleeps at once)");
KVMID_FLAG(int, handshake_timeout_ms, 5000,
           "a QEMU that has not finished its handshake is dropped");
KVMID_FLAG(int, command_timeout_ms, 10000, "a command with no reply by then fails with a timeout");
KVMID_FLAG(int, deadline_ms, 1000,
           "how long a handler may take to answer a blocking event before the fallback");
KVMID_FLAG(std::string, fallback, "continue",
           "fallback action when a handler misses its deadline: continue or crash");
KVMID_FLAG(std::string, baseline, "off",
           "ready-made protections (CR0.WP, CR4.SMEP/SMAP, LSTAR, SYSENTER_EIP locked after "
           "boot): off, monitor or enforce");
KVMID_FLAG(std::vector<std::string>, protect, {},
           "page protections NAME:GPA_FIRST-GPA_LAST:ALLOWED[:ACTION][:monitor], e.g. "
           "ktext:0x1000000-0x1ffffff:rx:retry (ALLOWED from r, w, x; ACTION continue, retry or "
           "crash)");
KVMID_FLAG(std::string, log_events, "blocked",
           "which events to log live: none, blocked (decided by a policy or fallback) or all");
KVMID_FLAG(int, log_events_per_second, 20, "at most this many live event lines per second");
KVMID_FLAG(std::string, log_level, "info", "trace, debug, info, warn, error or off");
KVMID_FLAG(std::string, log_format, "text",
           "text, or json: one JSON object per line (time, level, msg; vm_name and vm_uuid on "
           "lines about a guest)");
KVMID_FLAG(std::string, api_socket_mode, "0660",
           "permissions of the API socket (octal), set exactly whatever the umask");
KVMID_FLAG(std::string, api_socket_group, "",
           "group owning the API socket (name or number); empty = kvmid's group");
KVMID_FLAG(std::string, api_tls_cert, "", "PEM server certificate chain of the TCP API (mTLS)");
KVMID_FLAG(std::string, api_tls_key, "", "PEM private key of --api_tls_cert");
KVMID_FLAG(std::string, api_tls_client_ca, "",
           "PEM bundle of the CAs whose client certificates the TCP API accepts (required)");
KVMID_FLAG(int, api_tls_refresh_seconds, 60,
           "how often the TLS files are checked for changes (rotation without restart)");
KVMID_FLAG(bool, api_tcp_insecure_plaintext, false,
           "serve --api_tcp WITHOUT TLS (no encryption, no identity); loopback addresses only, "
           "for tests");
KVMID_FLAG(std::string, audit_log, "",
           "append one JSON line per mutating or denied API call to this file (reopened on "
           "SIGHUP, for logrotate); empty = the file's audit_log, else none");
KVMID_FLAG(std::string, metrics_address, "127.0.0.1:9464",
           "HOST:PORT serving Prometheus metrics (/metrics) and HTTP health (/healthz, /readyz); "
           "empty = off. If the default address is taken kvmid runs without metrics (a warning); "
           "an address given here or in the file must work");
KVMID_FLAG(std::string, state_dir, "/var/lib/kvmid",
           "where policies applied through the API are kept across restarts (created on the "
           "first change); empty = not persisted");
KVMID_FLAG(std::string, state_recover, "fail",
           "what start-up does with a state file it cannot read: fail (stop with the error) or "
           "quarantine (move it aside to <file>.corrupt-<time>, start with no API policies)");
KVMID_FLAG(std::string, export_file, "",
           "write every event, verdict and guest state change as JSON lines to this file, "
           "rotated by size (for Fluent Bit, Vector, Filebeat); empty = no export");
KVMID_FLAG(uint64_t, export_max_bytes, 100ull << 20, "rotate the export file at this size");
KVMID_FLAG(uint32_t, export_max_files, 5,
           "export files kept, the live one included: disk use stays within "
           "export_max_files * export_max_bytes");
KVMID_FLAG(uint64_t, export_queue, 16384,
           "records waiting for the export writer; beyond that they are dropped and counted");
KVMID_FLAG(std::string, node_name, "",
           "node name stamped on every event (API, export); empty = $NODE_NAME, else the host "
           "name");

namespace kvmid {
namespace {

constexpr uint64_t kMsrLstar = 0xC0000082;
constexpr uint64_t kMsrSysenterEip = 0x176;
constexpr int kMaxVsockPort = 0xffff;
constexpr int kMaxTcpPort = 0xffff;

Mutex& GivenMutex() {
  static Mutex mu;
  return mu;
}
std::set<std::string, std::less<>>& GivenNames() {
  static std::set<std::string, std::less<>> names;
  return names;
}

absl::Status FlagError(const char* name, const std::string& what) {
  return absl::InvalidArgumentError(std::string("--") + name + " " + what);
}

bool ParseU64(const std::string& text, uint64_t* out) {
  if (text.rfind("0x", 0) == 0 || text.rfind("0X", 0) == 0) {
    return absl::SimpleHexAtoi(text.substr(2), out);
  }
  return absl::SimpleAtoi(text, out);
}

bool ParseOctal(const std::string& text, uint64_t* out) {
  if (text.empty() || text.size() > 12) return false;
  uint64_t value = 0;
  for (char c : text) {
    if (c < '0' || c > '7') return false;
    value = value * 8 + static_cast<uint64_t>(c - '0');
  }
  *out = value;
  return true;
}

absl::StatusOr<std::chrono::milliseconds> PositiveMs(const char* name, int value) {
  if (value <= 0) return FlagError(name, "must be positive");
  return std::chrono::milliseconds(value);
}

}  // namespace

void MarkFlagGiven(absl::string_view name) {
  MutexLock lock(&GivenMutex());
  GivenNames().emplace(name);
}

void ForgetGivenFlags() {
  MutexLock lock(&GivenMutex());
  GivenNames().clear();
}

bool FlagGiven(absl::string_view name) {
  MutexLock lock(&GivenMutex());
  return GivenNames().find(name) != GivenNames().end();
}

absl::Status CheckTcpAddress(const std::string& address) {
  size_t colon = address.rfind(':');
  if (colon == std::string::npos || colon == 0) {
    return absl::InvalidArgumentError("must be HOST:PORT, e.g. 127.0.0.1:50051, got '" + address +
                                      "'");
  }
  uint32_t port = 0;
  if (!absl::SimpleAtoi(address.substr(colon + 1), &port) || port > kMaxTcpPort) {
    return absl::InvalidArgumentError("port must be 0.." + std::to_string(kMaxTcpPort) +
                                      " (0 = any free port), got '" + address.substr(colon + 1) +
                                      "'");
  }
  return absl::OkStatus();
}

absl::StatusOr<std::shared_ptr<Rule>> ParseProtect(const std::string& spec) {
  auto invalid = [&spec](const std::string& what) {
    return absl::InvalidArgumentError("--protect=" + spec + ": " + what);
  };
  std::vector<std::string> parts = absl::StrSplit(spec, ':');
  if (parts.size() < 3 || parts.size() > 5) {
    return invalid("expected NAME:GPA_FIRST-GPA_LAST:ALLOWED[:ACTION][:monitor]");
  }
  std::vector<std::string> range = absl::StrSplit(parts[1], '-');
  uint64_t first = 0, last = 0;
  if (range.size() != 2 || !ParseU64(range[0], &first) || !ParseU64(range[1], &last) ||
      first > last) {
    return invalid("GPA range must be FIRST-LAST with FIRST <= LAST");
  }
  if ((last - first) / KVMI_PAGE_SIZE >= kMaxProtectedPages) {
    return invalid("the range covers more than " + std::to_string(kMaxProtectedPages) + " pages");
  }
  uint8_t allowed = 0;
  if (!ParseAccess(parts[2], &allowed)) return invalid("ALLOWED takes r, w, x (or - for none)");
  RuleAction action = RuleAction::kRetry;
  if (parts.size() >= 4 && !ParseRuleAction(parts[3], &action)) {
    return invalid("ACTION must be continue, retry or crash");
  }
  RuleMode mode = RuleMode::kEnforce;
  if (parts.size() == 5) {
    if (parts[4] != "monitor") return invalid("the last field may only be 'monitor'");
    mode = RuleMode::kMonitor;
  }
  return ProtectPagesRule(parts[0], first, last, allowed, action, mode);
}

absl::StatusOr<Settings> OverlayFlags(LoadedConfig file, bool have_file) {
  Settings s;
  s.config = std::move(file);
  DaemonConfig& d = s.config.daemon;
  auto given = [](const char* name) { return FlagGiven(name); };

  const std::string level_text = absl::GetFlag(FLAGS_log_level);
  s.log_level = spdlog::level::from_str(level_text);
  if (s.log_level == spdlog::level::off && level_text != "off") {
    return FlagError("log_level", "must be trace, debug, info, warn, error or off");
  }

  const std::string format = absl::GetFlag(FLAGS_log_format);
  if (format == "text") {
    s.log_format = LogFormat::kText;
  } else if (format == "json") {
    s.log_format = LogFormat::kJson;
  } else {
    return FlagError("log_format", "must be text or json");
  }

  if (given("metrics_address")) s.config.metrics_address = absl::GetFlag(FLAGS_metrics_address);
  if (s.config.metrics_address) {
    s.metrics_address = *s.config.metrics_address;
    s.metrics_address_required = true;
  } else {
    s.metrics_address = absl::GetFlag(FLAGS_metrics_address);
  }

  if (given("kvmi_socket") || !have_file) d.unix_socket = absl::GetFlag(FLAGS_kvmi_socket);
  if (given("kvmi_socket_mode")) {
    uint64_t mode = 0;
    if (!ParseOctal(absl::GetFlag(FLAGS_kvmi_socket_mode), &mode) || mode > kMaxSocketMode) {
      return FlagError("kvmi_socket_mode", "must be an octal mode such as 0660 (at most " +
                                               OctalMode(kMaxSocketMode) + ")");
    }
    d.unix_socket_mode = static_cast<uint32_t>(mode);
  }
  if (given("kvmi_socket_group")) d.unix_socket_group = absl::GetFlag(FLAGS_kvmi_socket_group);
  if (given("kvmi_vsock_port")) {
    int port = absl::GetFlag(FLAGS_kvmi_vsock_port);
    if (port < -1 || port > kMaxVsockPort) {
      return FlagError("kvmi_vsock_port",
                       "must be -1 (none) or a port 0.." + std::to_string(kMaxVsockPort));
    }
    if (port >= 0) {
      d.vsock_port = static_cast<uint32_t>(port);
    } else {
      d.vsock_port.reset();
    }
  }
  if (given("api_socket")) s.config.api_socket = absl::GetFlag(FLAGS_api_socket);
  if (given("api_tcp")) s.config.api_tcp = absl::GetFlag(FLAGS_api_tcp);
  if (given("api_socket_mode")) {
    uint64_t mode = 0;
    if (!ParseOctal(absl::GetFlag(FLAGS_api_socket_mode), &mode) || mode > kMaxSocketMode) {
      return FlagError("api_socket_mode", "must be an octal mode such as 0660 (at most " +
                                              OctalMode(kMaxSocketMode) + ")");
    }
    s.config.api_socket_mode = static_cast<uint32_t>(mode);
  }
  if (given("api_socket_group")) s.config.api_socket_group = absl::GetFlag(FLAGS_api_socket_group);
  if (given("api_tls_cert")) s.config.api_tls_cert = absl::GetFlag(FLAGS_api_tls_cert);
  if (given("api_tls_key")) s.config.api_tls_key = absl::GetFlag(FLAGS_api_tls_key);
  if (given("api_tls_client_ca")) {
    s.config.api_tls_client_ca = absl::GetFlag(FLAGS_api_tls_client_ca);
  }
  if (given("api_tls_refresh_seconds")) {
    const int seconds = absl::GetFlag(FLAGS_api_tls_refresh_seconds);
    if (seconds < 1) return FlagError("api_tls_refresh_seconds", "must be positive");
    s.config.api_tls_refresh_seconds = static_cast<uint32_t>(seconds);
  }
  if (given("audit_log")) s.config.security.audit_log = absl::GetFlag(FLAGS_audit_log);
  if (given("api_tcp_insecure_plaintext")) {
    s.config.api_tcp_insecure_plaintext = absl::GetFlag(FLAGS_api_tcp_insecure_plaintext);
  }
  if (!s.config.api_tcp.empty()) {
    absl::Status valid = CheckTcpAddress(s.config.api_tcp);
    if (!valid.ok()) return FlagError("api_tcp", std::string(valid.message()));
  }
  if (given("cookie_file")) d.cookie_file = absl::GetFlag(FLAGS_cookie_file);
  if (given("allowed_uids")) {
    d.allowed_uids.clear();
    std::vector<std::string> uids =
        absl::StrSplit(absl::GetFlag(FLAGS_allowed_uids), ',', absl::SkipEmpty());
    for (const std::string& uid : uids) {
      uint32_t value;
      if (!absl::SimpleAtoi(uid, &value))
        return FlagError("allowed_uids", "'" + uid + "' is not a uid");
      d.allowed_uids.push_back(value);
    }
  }
  if (given("io_threads")) {
    int threads = absl::GetFlag(FLAGS_io_threads);
    if (threads < 1 || threads > kMaxIoThreads) {
      return FlagError("io_threads", "must be 1.." + std::to_string(kMaxIoThreads));
    }
    d.io_threads = threads;
  }
  if (given("io_nice")) {
    int nice = absl::GetFlag(FLAGS_io_nice);
    if (nice < kMinNice || nice > kMaxNice) {
      return FlagError("io_nice",
                       "must be " + std::to_string(kMinNice) + ".." + std::to_string(kMaxNice));
    }
    d.io_nice = nice;
  }
  if (given("io_idle_yields")) {
    int yields = absl::GetFlag(FLAGS_io_idle_yields);
    if (yields < 0 || yields > kMaxIdleYields) {
      return FlagError("io_idle_yields", "must be 0.." + std::to_string(kMaxIdleYields));
    }
    d.io_idle_yields = yields;
  }
  if (given("handshake_timeout_ms")) {
    auto ms = PositiveMs("handshake_timeout_ms", absl::GetFlag(FLAGS_handshake_timeout_ms));
    if (!ms.ok()) return ms.status();
    d.handshake_timeout = *ms;
  }
  if (given("command_timeout_ms")) {
    auto ms = PositiveMs("command_timeout_ms", absl::GetFlag(FLAGS_command_timeout_ms));
    if (!ms.ok()) return ms.status();
    d.command_timeout = *ms;
  }
  if (given("deadline_ms")) {
    auto ms = PositiveMs("deadline_ms", absl::GetFlag(FLAGS_deadline_ms));
    if (!ms.ok()) return ms.status();
    for (EventDeadline& deadline : d.verdicts.deadlines) deadline.deadline = *ms;
  }
  if (given("fallback")) {
    const std::string text = absl::GetFlag(FLAGS_fallback);
    uint8_t fallback;
    if (text == "continue") {
      fallback = KVMI_EVENT_ACTION_CONTINUE;
    } else if (text == "crash") {
      fallback = KVMI_EVENT_ACTION_CRASH;
    } else {
      return FlagError("fallback", "must be continue or crash");
    }
    for (EventDeadline& deadline : d.verdicts.deadlines) deadline.fallback_action = fallback;
  }

  s.rules = s.config.rules;
  const std::string baseline = absl::GetFlag(FLAGS_baseline);
  if (baseline != "off") {
    if (baseline != "monitor" && baseline != "enforce") {
      return FlagError("baseline", "must be off, monitor or enforce");
    }
    RuleMode mode = baseline == "enforce" ? RuleMode::kEnforce : RuleMode::kMonitor;
    s.rules.push_back(ForbidClearCr0WpRule("cr0-wp", mode));
    s.rules.push_back(ForbidClearCr4SmepSmapRule("cr4-smep-smap", mode));
    s.rules.push_back(LockMsrAfterBootRule("lstar-locked", kMsrLstar, mode));
    s.rules.push_back(LockMsrAfterBootRule("sysenter-eip-locked", kMsrSysenterEip, mode));
  }
  for (const std::string& spec : absl::GetFlag(FLAGS_protect)) {
    absl::StatusOr<std::shared_ptr<Rule>> rule = ParseProtect(spec);
    if (!rule.ok()) return rule.status();
    s.rules.push_back(*std::move(rule));
  }

  if (!ParseEventLogMode(absl::GetFlag(FLAGS_log_events), &s.event_log.mode)) {
    return FlagError("log_events", "must be none, blocked or all");
  }
  int per_second = absl::GetFlag(FLAGS_log_events_per_second);
  if (per_second < 0) return FlagError("log_events_per_second", "must not be negative");
  s.event_log.max_lines_per_second = per_second;
  s.state_dir = absl::GetFlag(FLAGS_state_dir);
  s.state_recover = absl::GetFlag(FLAGS_state_recover);
  s.export_file = absl::GetFlag(FLAGS_export_file);
  s.export_max_bytes = absl::GetFlag(FLAGS_export_max_bytes);
  s.export_max_files = absl::GetFlag(FLAGS_export_max_files);
  s.export_queue = absl::GetFlag(FLAGS_export_queue);
  s.node_name = absl::GetFlag(FLAGS_node_name);
  return s;
}

absl::StatusOr<Settings> SettingsFromFlags() {
  const std::string path = absl::GetFlag(FLAGS_config);
  LoadedConfig file;
  if (!path.empty()) {
    absl::StatusOr<LoadedConfig> loaded = LoadConfigFile(path);
    if (!loaded.ok()) return loaded.status();
    file = *std::move(loaded);
  }
  absl::StatusOr<Settings> settings = OverlayFlags(std::move(file), !path.empty());
  if (settings.ok()) settings->config_path = path;
  return settings;
}

}  // namespace kvmid
