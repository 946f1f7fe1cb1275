// kvmid: owns the KVMI sockets of the guests on this host and answers their events.
//
//   kvmid --kvmi_socket=/run/kvmid/kvmi.sock --cookie_file=/etc/kvmid/cookie --baseline=enforce
//
// Start-up is the list of steps below; whatever started is torn down in reverse, on a failed
// start as on SIGTERM/SIGINT (answer what is pending, restore every guest, close, exit 0).
// SIGHUP reloads the configuration (Daemon::Reload); a second kvmid on the same socket directory
// is refused (InstanceLock).
#include <absl/flags/parse.h>
#include <signal.h>
#include <spdlog/spdlog.h>

#include <cstdio>
#include <memory>
#include <optional>
#include <string>

#include "common/program.h"
#include "daemon/api/server.h"
#include "daemon/event_log.h"
#include "daemon/export/exporter.h"
#include "daemon/export/node_name.h"
#include "daemon/export/rotating_file.h"
#include "daemon/kvmid.h"
#include "daemon/metrics/metrics_server.h"
#include "daemon/security/audit.h"
#include "daemon/startup/flags.h"
#include "daemon/startup/instance_lock.h"
#include "daemon/startup/json_log.h"
#include "daemon/startup/steps.h"
#include "daemon/state/policy_store.h"

namespace {

// What the steps build, torn down by the steps.
struct Process {
  kvmid::Settings settings;
  sigset_t signals;
  std::optional<kvmid::InstanceLock> lock;
  std::unique_ptr<kvmid::Daemon> daemon;
  std::unique_ptr<kvmid::PolicyStore> state;
  std::unique_ptr<kvmid::Exporter> exporter;
  std::unique_ptr<kvmid::EventLog> event_log;
  std::unique_ptr<kvmid::MetricsServer> metrics;
  std::unique_ptr<kvmid::security::AuditLog> audit;  // --audit_log; null without one
  std::unique_ptr<kvmid::ApiServer> api;
};

absl::Status SetUpLogging(const kvmid::Settings& settings) {
  spdlog::set_level(settings.log_level);
  if (settings.log_format == kvmid::LogFormat::kJson) {
    spdlog::set_formatter(kvmid::JsonLogFormatter());
  } else {
    spdlog::set_pattern("%Y-%m-%dT%H:%M:%S.%e %^%L%$ %v");
  }
  return absl::OkStatus();
}

// Signals are taken synchronously by the main thread; every other thread inherits the mask.
absl::Status BlockSignals(sigset_t* signals) {
  sigemptyset(signals);
  sigaddset(signals, SIGTERM);
  sigaddset(signals, SIGINT);
  sigaddset(signals, SIGHUP);
  pthread_sigmask(SIG_BLOCK, signals, nullptr);
  signal(SIGPIPE, SIG_IGN);
  return absl::OkStatus();
}

// The configuration the daemon applies: the file's settings with the flags' policies.
kvmid::LoadedConfig Configured(const kvmid::Settings& settings) {
  kvmid::LoadedConfig config = settings.config;
  config.rules = settings.rules;
  return config;
}

absl::Status CreateDaemon(Process* p) {
  p->daemon = std::make_unique<kvmid::Daemon>(p->settings.config.daemon);
  return p->daemon->Reload(Configured(p->settings));
}

// One kvmid per socket directory: a second one stops here, before it touches any socket.
absl::Status LockInstance(Process* p) {
  const kvmid::LoadedConfig& c = p->settings.config;
  const std::string& socket = !c.daemon.unix_socket.empty() ? c.daemon.unix_socket : c.api_socket;
  if (socket.empty()) return absl::OkStatus();  // vsock and TCP only: their bind() decides
  absl::StatusOr<kvmid::InstanceLock> lock =
      kvmid::InstanceLock::Acquire(kvmid::LockPathFor(socket));
  if (!lock.ok()) return lock.status();
  p->lock.emplace(*std::move(lock));
  return absl::OkStatus();
}

// --audit_log: opened before the API serves, so that no call goes unaudited; a path that cannot
// be opened stops start-up.
absl::Status OpenAuditLog(Process* p) {
  const std::string& path = p->settings.config.security.audit_log;
  if (path.empty()) {
    spdlog::info("no audit log (--audit_log): API calls are not audited");
    return absl::OkStatus();
  }
  absl::StatusOr<std::unique_ptr<kvmid::security::AuditLog>> audit =
      kvmid::security::AuditLog::Open(path);
  if (!audit.ok()) {
    return absl::Status(audit.status().code(),
                        "--audit_log: " + std::string(audit.status().message()));
  }
  p->audit = *std::move(audit);
  spdlog::info("audit log: mutating and denied API calls to {}", path);
  return absl::OkStatus();
}

// SIGHUP: the audit file is reopened (logrotate moved it). A failure is logged; mutating calls
// are refused (UNAVAILABLE) until a write or a later reopen succeeds.
void ReopenAuditLog(Process* p) {
  if (!p->audit) return;
  absl::Status reopened = p->audit->Reopen();
  if (reopened.ok()) {
    spdlog::info("SIGHUP: audit log {} reopened", p->audit->path());
  } else {
    spdlog::error("SIGHUP: audit log: {}", std::string(reopened.message()));
  }
}

// SIGHUP: the file is read again and the flags go over it, as at start. A configuration that
// does not load or apply is refused, and the running one stays.
void ReloadConfiguration(Process* p) {
  ReopenAuditLog(p);  // logrotate's SIGHUP, whether or not the new configuration is taken
  absl::StatusOr<kvmid::Settings> settings = kvmid::SettingsFromFlags();
  absl::Status status =
      settings.ok() ? p->daemon->Reload(Configured(*settings)) : settings.status();
  if (!status.ok()) {
    spdlog::error("SIGHUP: new configuration refused, the running one stays: {}",
                  std::string(status.message()));
    return;
  }
  // The audit log's path is kept open by the API server: a new path takes a restart (like the
  // listener settings), so that no record can land in a file nobody expects it in.
  const std::string& audit_now = p->settings.config.security.audit_log;
  const std::string& audit_next = settings->config.security.audit_log;
  if (audit_next != audit_now) {
    spdlog::warn("reload: audit_log changed from '{}' to '{}'; it takes effect at the next restart",
                 audit_now, audit_next);
    settings->config.security.audit_log = audit_now;
  }
  spdlog::set_level(settings->log_level);
  spdlog::info("SIGHUP: configuration reloaded from {} ({} configured policies)",
               settings->config_path.empty() ? "flags" : settings->config_path,
               settings->rules.size());
  p->settings = *std::move(settings);
}

absl::Status SetNodeName(const kvmid::Settings& settings) {
  if (settings.node_name.empty()) return absl::OkStatus();
  absl::Status node = kvmid::SetNodeName(settings.node_name);
  if (!node.ok()) return absl::InvalidArgumentError("--node_name: " + std::string(node.message()));
  return absl::OkStatus();
}

// API policies saved by an earlier run, before any guest can connect (and be armed).
absl::Status RestoreSavedPolicies(Process* p) {
  absl::StatusOr<kvmid::StateRecovery> recovery =
      kvmid::ParseStateRecovery(p->settings.state_recover);
  if (!recovery.ok()) return recovery.status();
  if (p->settings.state_dir.empty()) {
    spdlog::info("API policies are not persisted (--state_dir is empty)");
    return absl::OkStatus();
  }
  p->state = std::make_unique<kvmid::PolicyStore>(p->settings.state_dir);
  absl::Status restored = kvmid::RestorePolicies(p->daemon.get(), p->state.get(), *recovery);
  if (restored.ok()) spdlog::info("API policies kept in {}", p->state->path());
  return restored;
}

absl::Status StartExport(Process* p) {
  const kvmid::Settings& s = p->settings;
  if (s.export_file.empty()) return absl::OkStatus();
  if (s.export_queue < 1 || s.export_queue > kvmid::kMaxExportQueue) {
    return absl::InvalidArgumentError("--export_queue must be 1.." +
                                      std::to_string(kvmid::kMaxExportQueue));
  }
  auto file = kvmid::RotatingFile::Open({s.export_file, s.export_max_bytes, s.export_max_files});
  if (!file.ok()) return file.status();
  kvmid::Exporter::Options options;
  options.queue_capacity = s.export_queue;
  options.node = kvmid::NodeName();
  p->exporter = std::make_unique<kvmid::Exporter>(std::move(*file), options);
  p->exporter->Attach(&p->daemon->pipeline(), &p->daemon->registry());
  spdlog::info("export: events, verdicts and guest changes to {}", s.export_file);
  return absl::OkStatus();
}

// After the daemon's shutdown (the steps' reverse order): the guests' last changes are exported.
void StopExport(Process* p) {
  if (!p->exporter) return;
  p->exporter->Stop();
  spdlog::info("export: {} records written, {} dropped, {} lost to write errors",
               p->exporter->written(), p->exporter->dropped(), p->exporter->write_errors());
}

// Before the guest listeners, so that every event is counted.
absl::Status StartMetrics(Process* p) {
  const kvmid::Settings& s = p->settings;
  if (s.metrics_address.empty()) return absl::OkStatus();
  kvmid::MetricsOptions options;
  options.address = s.metrics_address;
  absl::StatusOr<std::unique_ptr<kvmid::MetricsServer>> started =
      kvmid::StartMetrics(p->daemon.get(), options);
  if (started.ok()) {
    p->metrics = *std::move(started);
    return absl::OkStatus();
  }
  if (s.metrics_address_required) return started.status();
  // The default address taken (e.g. by another tool or a test's kvmid): run without metrics.
  spdlog::warn("{}; running without metrics", std::string(started.status().message()));
  return absl::OkStatus();
}

absl::Status StartApi(Process* p) {
  const kvmid::LoadedConfig& c = p->settings.config;
  if (c.api_socket.empty() && c.api_tcp.empty()) return absl::OkStatus();
  p->api = std::make_unique<kvmid::ApiServer>(
      p->daemon.get(), /*history=*/p->daemon->limits().stream_event_ring_events, p->audit.get());
  kvmid::security::ApiListenOptions listen;
  listen.unix_socket = c.api_socket;
  listen.unix_socket_mode = c.api_socket_mode;
  listen.unix_socket_group = c.api_socket_group;
  listen.tcp = c.api_tcp;
  listen.tcp_insecure_plaintext = c.api_tcp_insecure_plaintext;
  listen.tls = {c.api_tls_cert, c.api_tls_key, c.api_tls_client_ca, c.api_tls_refresh_seconds};
  absl::Status started = p->api->Start(listen);
  if (!started.ok()) return started;
  if (!c.api_tcp.empty()) {
    spdlog::info("API over TCP: {} bound port {}", c.api_tcp, p->api->tcp_port());
  }
  return absl::OkStatus();
}

// Serves SIGHUP (reload) until SIGTERM or SIGINT; returns that one.
int ServeUntilStopped(Process* p) {
  for (;;) {
    int signal_number = 0;
    if (sigwait(&p->signals, &signal_number) != 0) continue;
    if (signal_number != SIGHUP) return signal_number;
    ReloadConfiguration(p);
  }
}

}  // namespace

int main(int argc, char** argv) {
  kvmid::SetUpProgram(
      "kvmid",
      "kvmid: KVM introspection (KVMI v6) daemon. QEMU connects to --kvmi_socket; kvmid answers "
      "each guest's events with in-daemon policies, registered handlers or a fallback.",
      {"daemon/"});
  kvmid::ForgetGivenFlags();
  absl::ParseCommandLine(argc, argv);

  Process p;
  kvmid::Steps steps;
  steps.Add("configuration", [&] {
    absl::StatusOr<kvmid::Settings> settings = kvmid::SettingsFromFlags();
    if (!settings.ok()) return settings.status();
    p.settings = *std::move(settings);
    return absl::OkStatus();
  });
  steps.Add("logging", [&] { return SetUpLogging(p.settings); });
  steps.Add("signals", [&] { return BlockSignals(&p.signals); });
  steps.Add("node name", [&] { return SetNodeName(p.settings); });
  steps.Add("policies", [&] { return CreateDaemon(&p); });
  steps.Add(
      "instance lock", [&] { return LockInstance(&p); }, [&] { p.lock.reset(); });
  steps.Add("saved policies", [&] { return RestoreSavedPolicies(&p); });
  steps.Add(
      "export", [&] { return StartExport(&p); }, [&] { StopExport(&p); });
  steps.Add(
      "event log",
      [&] {
        p.event_log =
            std::make_unique<kvmid::EventLog>(&p.daemon->pipeline(), p.settings.event_log);
        return absl::OkStatus();
      },
      [&] { p.event_log->Stop(); });
  steps.Add(
      "metrics", [&] { return StartMetrics(&p); }, [&] { p.metrics.reset(); });
  steps.Add(
      "guest listeners", [&] { return p.daemon->Start(); }, [&] { p.daemon->Shutdown(); });
  steps.Add(
      "audit log", [&] { return OpenAuditLog(&p); }, [&] { p.audit.reset(); });
  steps.Add(
      "api", [&] { return StartApi(&p); },
      [&] {
        if (p.api) p.api->Shutdown();
      });

  // /readyz: listeners up, configuration applied; not ready again from the first teardown step.
  steps.Add(
      "ready",
      [&] {
        if (p.metrics) p.metrics->SetReady(true);
        return absl::OkStatus();
      },
      [&] {
        if (p.metrics) p.metrics->SetReady(false);
      });

  absl::Status started = steps.Run();
  if (!started.ok()) {
    std::fprintf(stderr, "kvmid: %s\n", std::string(started.message()).c_str());
    return 2;
  }
  int signal_number = ServeUntilStopped(&p);
  spdlog::info("kvmid: {} received; restoring guests and exiting", strsignal(signal_number));
  steps.Teardown();
  p.event_log->PrintSummary();
  return 0;
}
