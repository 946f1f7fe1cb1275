// kvmid: owns the KVMI sockets of the guests on this host and answers their events.
//
//   kvmid --kvmi_socket=/run/kvmid/kvmi.sock --cookie_file=/etc/kvmid/cookie --baseline=enforce
//
// Start-up is the list of steps below; whatever started is torn down in reverse, on a failed
// start as on SIGTERM/SIGINT (answer what is pending, restore every guest, close, exit 0).
#include <absl/flags/parse.h>
#include <signal.h>
#include <spdlog/spdlog.h>

#include <cstdio>
#include <memory>
#include <optional>
#include <string>

#include "common/program.h"
#include "daemon/api/introspection_service.h"
#include "daemon/event_log.h"
#include "daemon/kvmid.h"
#include "daemon/startup/flags.h"
#include "daemon/startup/steps.h"

namespace {

// What the steps build, torn down by the steps.
struct Process {
  kvmid::Settings settings;
  sigset_t signals;
  std::unique_ptr<kvmid::Daemon> daemon;
  std::unique_ptr<kvmid::EventLog> event_log;
  std::unique_ptr<kvmid::ApiServer> api;
};

absl::Status SetUpLogging(const kvmid::Settings& settings) {
  spdlog::set_level(settings.log_level);
  spdlog::set_pattern("%Y-%m-%dT%H:%M:%S.%e %^%L%$ %v");
  return absl::OkStatus();
}

// Signals are taken synchronously by the main thread; every other thread inherits the mask.
absl::Status BlockSignals(sigset_t* signals) {
  sigemptyset(signals);
  sigaddset(signals, SIGTERM);
  sigaddset(signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, signals, nullptr);
  signal(SIGPIPE, SIG_IGN);
  return absl::OkStatus();
}

absl::Status CreateDaemon(Process* p) {
  p->daemon = std::make_unique<kvmid::Daemon>(p->settings.config.daemon);
  for (const auto& [name, labels] : p->settings.config.guest_labels) {
    p->daemon->pipeline().SetGuestLabels(name, labels);
  }
  for (const auto& rule : p->settings.rules) {
    absl::Status applied = p->daemon->ApplyPolicy(rule);
    if (!applied.ok()) return applied;
  }
  return absl::OkStatus();
}

absl::Status StartApi(Process* p) {
  const kvmid::LoadedConfig& c = p->settings.config;
  if (c.api_socket.empty() && c.api_tcp.empty()) return absl::OkStatus();
  p->api = std::make_unique<kvmid::ApiServer>(p->daemon.get());
  std::string error = p->api->Start(c.api_socket, c.api_tcp);
  if (!error.empty()) return absl::UnavailableError(error);
  return absl::OkStatus();
}

int WaitForStopSignal(const sigset_t& signals) {
  int signal_number = 0;
  sigwait(&signals, &signal_number);
  return signal_number;
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
  steps.Add("policies", [&] { return CreateDaemon(&p); });
  steps.Add(
      "event log",
      [&] {
        p.event_log =
            std::make_unique<kvmid::EventLog>(&p.daemon->pipeline(), p.settings.event_log);
        return absl::OkStatus();
      },
      [&] { p.event_log->Stop(); });
  steps.Add(
      "guest listeners", [&] { return p.daemon->Start(); }, [&] { p.daemon->Shutdown(); });
  steps.Add(
      "api", [&] { return StartApi(&p); },
      [&] {
        if (p.api) p.api->Shutdown();
      });

  absl::Status started = steps.Run();
  if (!started.ok()) {
    std::fprintf(stderr, "kvmid: %s\n", std::string(started.message()).c_str());
    return 2;
  }
  int signal_number = WaitForStopSignal(p.signals);
  spdlog::info("kvmid: {} received; restoring guests and exiting", strsignal(signal_number));
  steps.Teardown();
  p.event_log->PrintSummary();
  return 0;
}
