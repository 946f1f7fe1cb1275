// kvmi-sim: a fleet of simulated guests whose host side speaks KVMI v6 to an introspection tool,
// as QEMU (kvmi-v6) + the v6 kernel would. Prints a summary at exit.
//
//   kvmi-sim --connect=unix:/run/kvmid.sock --vms=200 --vcpus=4 --scenario=mixed --rate=100
//            --duration=60 [--cookie_file=PATH] [--scenario_file=PATH] [--reconnect=1]
#include <sys/resource.h>
#include <sys/time.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <csignal>
#include <cstdio>
#include <fstream>
#include <mutex>
#include <sstream>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "common/program.h"
#include "kernel/sim/fleet.h"
#include "spdlog/spdlog.h"

ABSL_FLAG(std::string, connect, "", "Tool endpoint: unix:PATH or vsock:CID:PORT (required)");
ABSL_FLAG(int64_t, vms, 1, "Number of simulated VMs (1..10000)");
ABSL_FLAG(int64_t, vcpus, 1, "vCPUs per VM (1..256)");
ABSL_FLAG(std::string, scenario, "mixed",
          "Named workload (idle, mixed, process-switch, "
          "syscalls, memory, breakpoints, all-events, processes)");
ABSL_FLAG(std::string, scenario_file, "", "Scenario file (overrides/extends --scenario)");
ABSL_FLAG(double, rate, -1,
          "Guest operations per second per vCPU that can raise events; 0 = as "
          "fast as the tool answers; default: the scenario's");
ABSL_FLAG(double, duration, 10,
          "Seconds to run (0 = until SIGINT/SIGTERM); at the end every VM sends UNHOOK (if "
          "enabled) and waits up to --unhook_grace for the tool to close, as QEMU at shutdown");
ABSL_FLAG(double, unhook_grace, 2, "Seconds the VMs wait for the tool to close after UNHOOK");
ABSL_FLAG(std::string, cookie_file, "",
          "Verify the tool's cookie_hash against SHA-1 of this "
          "file's contents (kvmi-v7 QEMU behaviour); refuse on mismatch");
ABSL_FLAG(double, reconnect, 1,
          "Seconds before reconnecting when the tool goes away "
          "(QEMU reconnect=N); 0 = never");
ABSL_FLAG(int64_t, memory_mib, 256, "Guest RAM per VM in MiB (sparse)");
ABSL_FLAG(bool, fill_identity, true,
          "Send uuid/name/start_time in the handshake (v6 QEMU sends "
          "zeros for name and start_time)");
ABSL_FLAG(std::string, paging, "",
          "Give the guests real page tables in this mode: 32bit, pae, 4level, 5level (a kernel "
          "half, --processes user halves, CR3 writes switch between them); default: none, or "
          "4level for --scenario=processes");
ABSL_FLAG(int64_t, processes, 4, "Address spaces per guest with --paging (1..16)");
ABSL_FLAG(uint64_t, seed, 1, "Seed for guest state and workloads");
ABSL_FLAG(std::string, log_level, "warn", "trace, debug, info, warn, error, off");

namespace {

std::mutex g_mu;
std::condition_variable g_cv;
bool g_stop = false;

void OnSignal(int) {
  // Only async-signal-safe work here: a dedicated thread waits on the condition below.
  g_stop = true;
}

int Fail(const std::string& message) {
  std::fprintf(stderr, "kvmi-sim: %s\n", message.c_str());
  return 2;
}

double CpuSeconds() {
  rusage ru{};
  getrusage(RUSAGE_SELF, &ru);
  return ru.ru_utime.tv_sec + ru.ru_stime.tv_sec +
         (ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e6;
}

}  // namespace

int main(int argc, char** argv) {
  kvmid::SetUpProgram("kvmi-sim", "kvmi-sim: simulated KVMI v6 guests for an introspection tool.",
                      {"kernel/sim/"});
  std::vector<char*> rest = absl::ParseCommandLine(argc, argv);
  if (rest.size() > 1) return Fail(std::string("unexpected argument '") + rest[1] + "'");

  auto level = spdlog::level::from_str(absl::GetFlag(FLAGS_log_level));
  if (level == spdlog::level::off && absl::GetFlag(FLAGS_log_level) != "off") {
    return Fail("--log_level must be one of trace, debug, info, warn, error, off");
  }
  spdlog::set_level(level);

  using namespace kvmi;
  sim::FleetConfig config;
  std::string error;
  if (absl::GetFlag(FLAGS_connect).empty())
    return Fail("--connect=unix:PATH|vsock:CID:PORT is required");
  auto endpoint = ParseEndpoint(absl::GetFlag(FLAGS_connect));
  if (!endpoint.ok()) return Fail("--connect: " + std::string(endpoint.status().message()));
  config.connector.endpoint = *endpoint;

  int64_t vms = absl::GetFlag(FLAGS_vms);
  if (vms < 1 || vms > 10000) return Fail("--vms must be 1..10000, got " + std::to_string(vms));
  int64_t vcpus = absl::GetFlag(FLAGS_vcpus);
  if (vcpus < 1 || vcpus > sim::SimGuest::kMaxVcpus) {
    return Fail("--vcpus must be 1..256, got " + std::to_string(vcpus));
  }
  config.vms = static_cast<uint32_t>(vms);
  config.guest.vcpus = static_cast<uint32_t>(vcpus);
  int64_t memory_mib = absl::GetFlag(FLAGS_memory_mib);
  if (memory_mib < 4 || memory_mib > (int64_t{1} << 22)) {
    return Fail("--memory_mib must be 4..4194304, got " + std::to_string(memory_mib));
  }
  config.guest.memory_bytes = static_cast<uint64_t>(memory_mib) << 20;
  config.seed = absl::GetFlag(FLAGS_seed);

  sim::Scenario scenario;
  if (!sim::NamedScenario(absl::GetFlag(FLAGS_scenario), &scenario)) {
    std::string names;
    for (const auto& n : sim::ScenarioNames()) names += (names.empty() ? "" : ", ") + n;
    return Fail("--scenario: unknown '" + absl::GetFlag(FLAGS_scenario) + "' (one of: " + names +
                ")");
  }
  if (!absl::GetFlag(FLAGS_scenario_file).empty()) {
    std::ifstream in(absl::GetFlag(FLAGS_scenario_file));
    if (!in)
      return Fail("--scenario_file: cannot read '" + absl::GetFlag(FLAGS_scenario_file) + "'");
    std::stringstream text;
    text << in.rdbuf();
    if (!sim::ParseScenarioText(text.str(), &scenario, &error)) {
      return Fail("--scenario_file: " + error);
    }
  }
  double rate = absl::GetFlag(FLAGS_rate);
  if (rate != -1) {
    if (!(rate >= 0) || rate > 1e7) return Fail("--rate must be 0 (unlimited)..1e7");
    scenario.ops_per_second = rate;
  }
  if ((scenario.data_gpa + uint64_t{scenario.data_pages} * 4096) > config.guest.memory_bytes) {
    return Fail("the scenario's data pages lie outside guest RAM (raise --memory_mib)");
  }
  config.workload = scenario;
  std::string paging = absl::GetFlag(FLAGS_paging);
  if (paging.empty() && scenario.needs_paging) paging = "4level";
  if (!paging.empty()) {
    sim::PagingConfig page_tables;
    if (!sim::ParsePagingMode(paging, &page_tables.mode)) {
      return Fail("--paging must be one of 32bit, pae, 4level, 5level, got '" + paging + "'");
    }
    int64_t processes = absl::GetFlag(FLAGS_processes);
    if (processes < 1 || processes > sim::kMaxProcesses) {
      return Fail("--processes must be 1.." + std::to_string(sim::kMaxProcesses) + ", got " +
                  std::to_string(processes));
    }
    page_tables.processes = static_cast<uint32_t>(processes);
    if (config.guest.memory_bytes < sim::kMinPagedMemoryBytes) {
      return Fail("--paging needs --memory_mib >= " +
                  std::to_string(sim::kMinPagedMemoryBytes >> 20));
    }
    config.guest.paging = page_tables;
  }

  double duration = absl::GetFlag(FLAGS_duration);
  if (!(duration >= 0) || duration > 1e7) return Fail("--duration must be >= 0 seconds");
  double unhook_grace = absl::GetFlag(FLAGS_unhook_grace);
  if (!(unhook_grace >= 0) || unhook_grace > 3600) return Fail("--unhook_grace must be 0..3600");
  double reconnect = absl::GetFlag(FLAGS_reconnect);
  if (!(reconnect >= 0) || reconnect > 86400) return Fail("--reconnect must be 0..86400 seconds");
  config.connector.reconnect_seconds = reconnect;
  config.connector.fill_identity = absl::GetFlag(FLAGS_fill_identity);
  if (!absl::GetFlag(FLAGS_cookie_file).empty()) {
    std::ifstream in(absl::GetFlag(FLAGS_cookie_file), std::ios::binary);
    if (!in) return Fail("--cookie_file: cannot read '" + absl::GetFlag(FLAGS_cookie_file) + "'");
    std::stringstream cookie;
    cookie << in.rdbuf();
    config.connector.cookie = cookie.str();
  }

  std::signal(SIGINT, OnSignal);
  std::signal(SIGTERM, OnSignal);
  std::signal(SIGPIPE, SIG_IGN);

  std::fprintf(
      stderr, "kvmi-sim: %u VMs x %u vCPUs, scenario %s at %s ops/s/vCPU -> %s\n", config.vms,
      config.guest.vcpus, scenario.name.c_str(),
      scenario.ops_per_second > 0 ? std::to_string(scenario.ops_per_second).c_str() : "unlimited",
      endpoint->ToString().c_str());
  sim::Fleet fleet(config);
  auto start = std::chrono::steady_clock::now();
  double cpu_start = CpuSeconds();
  fleet.Start();
  auto deadline = duration > 0
                      ? start + std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                                    std::chrono::duration<double>(duration))
                      : std::chrono::steady_clock::time_point::max();
  while (!g_stop && std::chrono::steady_clock::now() < deadline) {
    // A signal handler cannot notify a condition variable safely: wake up a few times a second.
    std::unique_lock<std::mutex> lock(g_mu);
    g_cv.wait_for(lock, std::chrono::milliseconds(200));
  }
  double wall = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  double cpu = CpuSeconds() - cpu_start;
  size_t hooked = fleet.hooked_count();
  // QEMU at shutdown: KVM_INTROSPECTION_UNHOOK, i.e. UNHOOK to the tool, a grace period for it to
  // close, then the sessions end.
  size_t unhooked = fleet.DetachAll(std::chrono::duration_cast<std::chrono::milliseconds>(
      std::chrono::duration<double>(unhook_grace)));
  fleet.Stop();

  host::EngineStats stats;
  fleet.AggregateStats(&stats);
  uint64_t events = 0;
  for (const auto& e : stats.events_sent) events += e.load();
  std::printf(
      "kvmi-sim summary: %.1f s, %u VMs x %u vCPUs, %zu hooked at the end, %zu sent UNHOOK\n", wall,
      config.vms, config.guest.vcpus, hooked, unhooked);
  std::printf("%s", stats.Summary().c_str());
  std::printf("guest operations: %llu, events/s: %.0f, handshake/connect failures: %llu\n",
              static_cast<unsigned long long>(fleet.ops_executed()), events / (wall > 0 ? wall : 1),
              static_cast<unsigned long long>(fleet.handshake_failures()));
  std::printf("simulator CPU: %.2f s over %.1f s = %.1f%% of one core (%.1f us per event)\n", cpu,
              wall, 100.0 * cpu / (wall > 0 ? wall : 1), events ? cpu * 1e6 / events : 0.0);
  return 0;
}
