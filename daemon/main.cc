// kvmid: owns the KVMI sockets of the guests on this host and answers their events.
//
//   kvmid --kvmi_socket=/run/kvmid/kvmi.sock --cookie_file=/etc/kvmid/cookie --baseline=enforce
//
// SIGTERM/SIGINT: answer what is pending, restore every guest, close, exit 0.
#include <absl/flags/flag.h>
#include <absl/flags/parse.h>
#include <absl/flags/usage.h>
#include <absl/strings/numbers.h>
#include <absl/strings/str_split.h>
#include <signal.h>
#include <spdlog/spdlog.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "daemon/api/introspection_service.h"
#include "daemon/config/config.h"
#include "daemon/event_log.h"
#include "daemon/kvmid.h"
#include "daemon/security/credentials.h"

ABSL_FLAG(std::string, config, "",
          "configuration file (protobuf text format, daemon/config/kvmid_config.proto); flags "
          "given on the command line override it");
ABSL_FLAG(std::string, kvmi_socket, "/run/kvmid/kvmi.sock",
          "UNIX socket QEMU connects to (chardev socket path); empty = none");
ABSL_FLAG(std::string, kvmi_socket_mode, "0660", "permissions of the UNIX socket (octal)");
ABSL_FLAG(std::string, kvmi_socket_group, "", "group owning the UNIX socket (e.g. kvm)");
ABSL_FLAG(int, kvmi_vsock_port, -1, "AF_VSOCK port to listen on; -1 = none");
ABSL_FLAG(std::string, api_socket, "/run/kvmid/api.sock",
          "UNIX socket of the gRPC API (kvmi.v1.Introspection, reflection, health); empty = none");
ABSL_FLAG(std::string, api_tcp, "",
          "HOST:PORT for the gRPC API over TCP (e.g. 127.0.0.1:50051); empty = none");
// ---- API transport security (daemon/security, docs/SECURITY.md) -------------------------------
ABSL_FLAG(std::string, api_socket_mode, "0660",
          "permissions of the API socket (octal), set exactly whatever the umask");
ABSL_FLAG(std::string, api_socket_group, "",
          "group owning the API socket (name or number); empty = kvmid's group");
ABSL_FLAG(std::string, api_tls_cert, "", "PEM server certificate chain of the TCP API (mTLS)");
ABSL_FLAG(std::string, api_tls_key, "", "PEM private key of --api_tls_cert");
ABSL_FLAG(std::string, api_tls_client_ca, "",
          "PEM bundle of the CAs whose client certificates the TCP API accepts (required)");
ABSL_FLAG(int, api_tls_refresh_seconds, 60,
          "how often the TLS files are checked for changes (rotation without restart)");
ABSL_FLAG(bool, api_tcp_insecure_plaintext, false,
          "serve --api_tcp WITHOUT TLS (no encryption, no identity); loopback addresses only, "
          "for tests");
// ---- end of API transport security flags -----------------------------------------------------
ABSL_FLAG(std::string, cookie_file, "",
          "shared secret; its SHA-1 goes back to QEMU as cookie_hash (kvmi-v7 QEMU checks it)");
ABSL_FLAG(std::string, allowed_uids, "",
          "comma-separated uids allowed to connect on the UNIX socket (SO_PEERCRED); empty = any");
ABSL_FLAG(int, io_threads, 2, "I/O threads serving guest sockets (1..64)");
ABSL_FLAG(int, handshake_timeout_ms, 5000, "a QEMU that has not finished its handshake is dropped");
ABSL_FLAG(int, command_timeout_ms, 10000, "a command with no reply by then fails with a timeout");
ABSL_FLAG(int, deadline_ms, 1000,
          "how long a handler may take to answer a blocking event before the fallback");
ABSL_FLAG(std::string, fallback, "continue",
          "fallback action when a handler misses its deadline: continue or crash");
ABSL_FLAG(std::string, baseline, "off",
          "ready-made protections (CR0.WP, CR4.SMEP/SMAP, LSTAR, SYSENTER_EIP locked after "
          "boot): off, monitor or enforce");
ABSL_FLAG(std::vector<std::string>, protect, {},
          "page protections NAME:GPA_FIRST-GPA_LAST:ALLOWED[:ACTION][:monitor], e.g. "
          "ktext:0x1000000-0x1ffffff:rx:retry (ALLOWED from r, w, x; ACTION continue, retry or "
          "crash)");
ABSL_FLAG(std::string, log_events, "blocked",
          "which events to log live: none, blocked (decided by a policy or fallback) or all");
ABSL_FLAG(int, log_events_per_second, 20, "at most this many live event lines per second");
ABSL_FLAG(std::string, log_level, "info", "trace, debug, info, warn, error");

namespace {

// Flags the user typed (names only). Only those override the configuration file. (This absl
// release keeps CommandLineFlag::IsSpecifiedOnCommandLine private.)
std::set<std::string>& GivenFlags() {
  static std::set<std::string> given;
  return given;
}

void RecordGivenFlags(int argc, char** argv) {
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    if (arg == "--") break;
    if (arg.rfind("--", 0) != 0) continue;
    std::string name = arg.substr(2, arg.find('=') - 2);
    GivenFlags().insert(name);
    if (name.rfind("no", 0) == 0) GivenFlags().insert(name.substr(2));
  }
}

bool Given(const char* name) { return GivenFlags().count(name) > 0; }

[[noreturn]] void Die(const std::string& message) {
  std::fprintf(stderr, "kvmid: %s\n", message.c_str());
  std::exit(2);
}

bool ParseU64(const std::string& text, uint64_t* out) {
  if (text.rfind("0x", 0) == 0 || text.rfind("0X", 0) == 0) {
    return absl::SimpleHexAtoi(text.substr(2), out);
  }
  return absl::SimpleAtoi(text, out);
}

std::shared_ptr<kvmid::Rule> ParseProtect(const std::string& spec) {
  std::vector<std::string> parts = absl::StrSplit(spec, ':');
  if (parts.size() < 3 || parts.size() > 5) {
    Die("--protect=" + spec + ": expected NAME:GPA_FIRST-GPA_LAST:ALLOWED[:ACTION][:monitor]");
  }
  std::vector<std::string> range = absl::StrSplit(parts[1], '-');
  uint64_t first = 0, last = 0;
  if (range.size() != 2 || !ParseU64(range[0], &first) || !ParseU64(range[1], &last) ||
      first > last) {
    Die("--protect=" + spec + ": GPA range must be FIRST-LAST with FIRST <= LAST");
  }
  uint8_t allowed = 0;
  for (char c : parts[2]) {
    if (c == 'r')
      allowed |= KVMI_PAGE_ACCESS_R;
    else if (c == 'w')
      allowed |= KVMI_PAGE_ACCESS_W;
    else if (c == 'x')
      allowed |= KVMI_PAGE_ACCESS_X;
    else if (c != '-')
      Die("--protect=" + spec + ": ALLOWED takes r, w, x (or - for none)");
  }
  kvmid::RuleAction action = kvmid::RuleAction::kRetry;
  if (parts.size() >= 4 && !kvmid::ParseRuleAction(parts[3], &action)) {
    Die("--protect=" + spec + ": ACTION must be continue, retry or crash");
  }
  kvmid::RuleMode mode = kvmid::RuleMode::kEnforce;
  if (parts.size() == 5) {
    if (parts[4] != "monitor") Die("--protect=" + spec + ": the last field may only be 'monitor'");
    mode = kvmid::RuleMode::kMonitor;
  }
  return kvmid::ProtectPagesRule(parts[0], first, last, allowed, action, mode);
}

}  // namespace

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "kvmid: KVM introspection (KVMI v6) daemon. QEMU connects to --kvmi_socket; kvmid answers "
      "each guest's events with in-daemon policies, registered handlers or a fallback.");
  RecordGivenFlags(argc, argv);
  absl::ParseCommandLine(argc, argv);

  spdlog::level::level_enum level = spdlog::level::from_str(absl::GetFlag(FLAGS_log_level));
  if (level == spdlog::level::off && absl::GetFlag(FLAGS_log_level) != "off") {
    Die("--log_level must be trace, debug, info, warn, error or off");
  }
  spdlog::set_level(level);
  spdlog::set_pattern("%Y-%m-%dT%H:%M:%S.%e %^%L%$ %v");

  kvmid::LoadedConfig loaded;
  if (!absl::GetFlag(FLAGS_config).empty()) {
    std::string error = kvmid::LoadConfigFile(absl::GetFlag(FLAGS_config), &loaded);
    if (!error.empty()) Die(error);
  }
  kvmid::DaemonConfig& config = loaded.daemon;
  if (Given("kvmi_socket") || absl::GetFlag(FLAGS_config).empty()) {
    config.unix_socket = absl::GetFlag(FLAGS_kvmi_socket);
  }
  if (Given("kvmi_socket_mode")) {
    uint64_t mode = 0;
    if (!absl::numbers_internal::safe_strtou64_base(absl::GetFlag(FLAGS_kvmi_socket_mode), &mode,
                                                    8) ||
        mode > 0777) {
      Die("--kvmi_socket_mode must be an octal mode such as 0660");
    }
    config.unix_socket_mode = static_cast<uint32_t>(mode);
  }
  if (Given("kvmi_socket_group")) config.unix_socket_group = absl::GetFlag(FLAGS_kvmi_socket_group);
  if (Given("kvmi_vsock_port")) {
    int vsock_port = absl::GetFlag(FLAGS_kvmi_vsock_port);
    if (vsock_port > 0xffff) Die("--kvmi_vsock_port must be -1 or a port number");
    if (vsock_port >= 0) {
      config.vsock_port = static_cast<uint32_t>(vsock_port);
    } else {
      config.vsock_port.reset();
    }
  }
  if (Given("api_socket")) loaded.api_socket = absl::GetFlag(FLAGS_api_socket);
  if (Given("api_tcp")) loaded.api_tcp = absl::GetFlag(FLAGS_api_tcp);
  if (!loaded.api_tcp.empty() && loaded.api_tcp.find(':') == std::string::npos) {
    Die("--api_tcp must be HOST:PORT, e.g. 127.0.0.1:50051");
  }
  // ---- API transport security: flags over the config file ----
  kvmid::security::ApiListenOptions api_listen;
  api_listen.unix_socket = loaded.api_socket;
  api_listen.unix_socket_mode = loaded.api_socket_mode;
  api_listen.unix_socket_group = loaded.api_socket_group;
  api_listen.tcp = loaded.api_tcp;
  api_listen.tcp_insecure_plaintext = loaded.api_tcp_insecure_plaintext;
  api_listen.tls = {loaded.api_tls_cert, loaded.api_tls_key, loaded.api_tls_client_ca,
                    loaded.api_tls_refresh_seconds};
  if (Given("api_socket_mode")) {
    auto mode =
        kvmid::security::ParseSocketMode(absl::GetFlag(FLAGS_api_socket_mode), "--api_socket_mode");
    if (!mode.ok()) Die(std::string(mode.status().message()));
    api_listen.unix_socket_mode = *mode;
  }
  if (Given("api_socket_group"))
    api_listen.unix_socket_group = absl::GetFlag(FLAGS_api_socket_group);
  if (Given("api_tls_cert")) api_listen.tls.cert = absl::GetFlag(FLAGS_api_tls_cert);
  if (Given("api_tls_key")) api_listen.tls.key = absl::GetFlag(FLAGS_api_tls_key);
  if (Given("api_tls_client_ca")) api_listen.tls.client_ca = absl::GetFlag(FLAGS_api_tls_client_ca);
  if (Given("api_tls_refresh_seconds")) {
    int seconds = absl::GetFlag(FLAGS_api_tls_refresh_seconds);
    if (seconds < 1) Die("--api_tls_refresh_seconds must be positive");
    api_listen.tls.refresh_seconds = static_cast<uint32_t>(seconds);
  }
  if (Given("api_tcp_insecure_plaintext")) {
    api_listen.tcp_insecure_plaintext = absl::GetFlag(FLAGS_api_tcp_insecure_plaintext);
  }
  if (!api_listen.unix_socket.empty() || !api_listen.tcp.empty()) {
    absl::Status valid = kvmid::security::ValidateListenOptions(api_listen);
    if (!valid.ok()) Die(std::string(valid.message()));
  }
  // ---- end of API transport security ----
  if (Given("cookie_file")) config.cookie_file = absl::GetFlag(FLAGS_cookie_file);
  if (Given("allowed_uids")) {
    config.allowed_uids.clear();
    std::vector<std::string> uids =
        absl::StrSplit(absl::GetFlag(FLAGS_allowed_uids), ',', absl::SkipEmpty());
    for (const std::string& uid : uids) {
      uint32_t value;
      if (!absl::SimpleAtoi(uid, &value)) Die("--allowed_uids: '" + uid + "' is not a uid");
      config.allowed_uids.push_back(value);
    }
  }
  if (Given("io_threads")) config.io_threads = absl::GetFlag(FLAGS_io_threads);
  auto positive_ms = [](const char* name, int value) {
    if (value <= 0) Die(std::string("--") + name + " must be positive");
    return std::chrono::milliseconds(value);
  };
  if (Given("handshake_timeout_ms")) {
    config.handshake_timeout =
        positive_ms("handshake_timeout_ms", absl::GetFlag(FLAGS_handshake_timeout_ms));
  }
  if (Given("command_timeout_ms")) {
    config.command_timeout =
        positive_ms("command_timeout_ms", absl::GetFlag(FLAGS_command_timeout_ms));
  }
  if (Given("deadline_ms")) {
    auto deadline = positive_ms("deadline_ms", absl::GetFlag(FLAGS_deadline_ms));
    for (kvmid::EventDeadline& d : config.verdicts.deadlines) d.deadline = deadline;
  }
  if (Given("fallback")) {
    std::string fallback_text = absl::GetFlag(FLAGS_fallback);
    uint8_t fallback;
    if (fallback_text == "continue") {
      fallback = KVMI_EVENT_ACTION_CONTINUE;
    } else if (fallback_text == "crash") {
      fallback = KVMI_EVENT_ACTION_CRASH;
    } else {
      Die("--fallback must be continue or crash");
    }
    for (kvmid::EventDeadline& d : config.verdicts.deadlines) d.fallback_action = fallback;
  }

  std::vector<std::shared_ptr<kvmid::Rule>> rules = loaded.rules;
  std::string baseline = absl::GetFlag(FLAGS_baseline);
  if (baseline != "off") {
    if (baseline != "monitor" && baseline != "enforce") {
      Die("--baseline must be off, monitor or enforce");
    }
    auto rule_mode = baseline == "enforce" ? kvmid::RuleMode::kEnforce : kvmid::RuleMode::kMonitor;
    rules.push_back(kvmid::ForbidClearCr0WpRule("cr0-wp", rule_mode));
    rules.push_back(kvmid::ForbidClearCr4SmepSmapRule("cr4-smep-smap", rule_mode));
    rules.push_back(kvmid::LockMsrAfterBootRule("lstar-locked", 0xC0000082, rule_mode));
    rules.push_back(kvmid::LockMsrAfterBootRule("sysenter-eip-locked", 0x176, rule_mode));
  }
  for (const std::string& spec : absl::GetFlag(FLAGS_protect)) rules.push_back(ParseProtect(spec));

  kvmid::EventLogOptions log_options;
  std::string log_events = absl::GetFlag(FLAGS_log_events);
  if (!kvmid::ParseEventLogMode(log_events, &log_options.mode)) {
    Die("--log_events must be none, blocked or all");
  }
  log_options.max_lines_per_second = absl::GetFlag(FLAGS_log_events_per_second);

  // Signals are taken synchronously by the main thread; every other thread inherits the mask.
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGTERM);
  sigaddset(&signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);
  signal(SIGPIPE, SIG_IGN);

  kvmid::Daemon daemon(config);
  for (const auto& [name, labels] : loaded.guest_labels) {
    daemon.pipeline().SetGuestLabels(name, labels);
  }
  for (auto& rule : rules) {
    std::string error = daemon.ApplyPolicy(rule);
    if (!error.empty()) Die(error);
  }
  kvmid::EventLog event_log(&daemon.pipeline(), log_options);
  std::string error = daemon.Start();
  if (!error.empty()) Die(error);
  kvmid::ApiServer api(&daemon);
  if (!loaded.api_socket.empty() || !loaded.api_tcp.empty()) {
    error = api.Start(api_listen);
    if (!error.empty()) {
      daemon.Shutdown();
      Die(error);
    }
  }

  int signal_number = 0;
  sigwait(&signals, &signal_number);
  spdlog::info("kvmid: {} received; restoring guests and exiting", strsignal(signal_number));
  event_log.Stop();
  api.Shutdown();
  daemon.Shutdown();
  event_log.PrintSummary();
  return 0;
}
