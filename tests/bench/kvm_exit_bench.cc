// Real exits on /dev/kvm: the repository's guest (kernel/kvm) tries to hijack LSTAR in a tight
// loop (`bench=N`: WRMSR LSTAR, read it back, undo if it took), timed by the guest's own TSC.
// In one run:
//   * no introspection -- the same guest, kvmi-vmm not connected to anything: the WRMSRs never
//     leave the guest;
//   * kvmid policy     -- the daemon core in this process with a lock_msr rule on LSTAR: every
//     attempt is a real exit (MSR filter -> KVM_EXIT_X86_WRMSR) -> KVMI MSR event -> kvmid's
//     policy verdict (KEEP_OLD) -> reply -> KVM_SET_MSRS + re-entry.
// Prints a table; docs/PERFORMANCE.md has figures and the command.
#include <absl/flags/flag.h>
#include <absl/flags/parse.h>
#include <spdlog/spdlog.h>
#include <stdlib.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <mutex>
#include <regex>
#include <string>
#include <thread>
#include <vector>

#include "common/program.h"
#include "daemon/kvmid.h"
#include "daemon/verdict/policy.h"
#include "kernel/kvm/guest_image.h"
#include "kernel/kvm/kvm_vmm.h"

ABSL_FLAG(double, seconds, 3, "Measured seconds per configuration");
ABSL_FLAG(int64_t, batch, 200, "Attempts per batch the guest times");

namespace {

using Clock = std::chrono::steady_clock;
constexpr uint32_t kLstar = 0xc0000082;

struct Row {
  std::string config;
  uint64_t attempts = 0;
  double seconds = 0;
  double mean_us = 0;               // per attempt, from the guest's TSC
  uint64_t p50_us = 0, p99_us = 0;  // event round trips as the host side saw them
  uint64_t exits = 0;               // every exit to the VMM (console output included)
  uint64_t msr_exits = 0;           // KVM_EXIT_X86_WRMSR
};

// Runs the guest for --seconds after it is ready (and hooked, when `socket` is set).
bool Measure(const std::string& config_name, const std::string& socket, Row* row) {
  const int64_t batch = absl::GetFlag(FLAGS_batch);
  std::mutex mu;
  uint64_t attempts = 0, cycles = 0;
  std::atomic<bool> counting{false};
  std::regex line(R"(^bench: (\d+) attempts in (\d+) cycles$)");
  kvmi::kvm::VmmConfig config;
  config.name = "bench-vm";
  config.image = kvmi::kvm::GuestImage();
  config.cmdline = "bench=" + std::to_string(batch);
  if (!socket.empty()) {
    config.connector.endpoint.family = kvmi::Endpoint::Family::kUnix;
    config.connector.endpoint.path = socket;
    config.connector.reconnect_seconds = 0.05;
  }
  config.on_console_line = [&](const std::string& text) {
    std::smatch m;
    if (!counting.load() || !std::regex_match(text, m, line)) return;
    std::lock_guard<std::mutex> lock(mu);
    attempts += std::stoull(m[1]);
    cycles += std::stoull(m[2]);
  };
  std::string error;
  auto vmm = kvmi::kvm::KvmVmm::Create(std::move(config), &error);
  if (!vmm) {
    std::fprintf(stderr, "kvm_exit_bench: %s\n", error.c_str());
    return false;
  }
  vmm->Start();
  if (!socket.empty() && !vmm->connector().WaitHooked(Clock::now() + std::chrono::seconds(20))) {
    std::fprintf(stderr, "kvm_exit_bench: the guest was not hooked\n");
    return false;
  }
  std::this_thread::sleep_for(std::chrono::milliseconds(500));  // arming, warm-up
  const uint64_t exits_before = vmm->stats().exits.load();
  const uint64_t msr_exits_before = vmm->stats().msr_exits.load();
  counting = true;
  auto start = Clock::now();
  std::this_thread::sleep_for(std::chrono::duration<double>(absl::GetFlag(FLAGS_seconds)));
  counting = false;
  row->seconds = std::chrono::duration<double>(Clock::now() - start).count();
  row->exits = vmm->stats().exits.load() - exits_before;
  row->msr_exits = vmm->stats().msr_exits.load() - msr_exits_before;
  const uint64_t tsc_hz = vmm->backend().TscSpeedHz(0);
  const kvmi::host::EngineStats& stats = vmm->engine().stats();
  row->p50_us = stats.round_trip.PercentileMicros(0.50);
  row->p99_us = stats.round_trip.PercentileMicros(0.99);
  vmm->Stop();
  std::lock_guard<std::mutex> lock(mu);
  row->config = config_name;
  row->attempts = attempts;
  row->mean_us = attempts && tsc_hz ? cycles * 1e6 / tsc_hz / attempts : 0;
  return attempts > 0;
}

}  // namespace

int main(int argc, char** argv) {
  kvmid::UseReleaseAbslMutexes();  // as kvmid's main (common/program.h)
  absl::ParseCommandLine(argc, argv);
  spdlog::set_level(spdlog::level::err);
  if (absl::GetFlag(FLAGS_batch) < 1 || absl::GetFlag(FLAGS_batch) > 10000000) {
    std::fprintf(stderr, "--batch must be 1..10000000\n");
    return 2;
  }
  std::vector<Row> rows(2);
  if (!Measure("no introspection", "", &rows[0])) return 1;

  char dir_template[] = "/tmp/kvm-bench-XXXXXX";
  std::string dir = mkdtemp(dir_template);
  kvmid::DaemonConfig config;
  config.unix_socket = dir + "/kvmid.sock";
  config.io_threads = 1;
  kvmid::Daemon daemon(config);
  if (!daemon
           .ApplyPolicy(
               kvmid::LockMsrAfterBootRule("lstar-locked", kLstar, kvmid::RuleMode::kEnforce))
           .ok()) {
    return 1;
  }
  absl::Status started = daemon.Start();
  if (!started.ok()) {
    std::fprintf(stderr, "kvmid: %s\n", std::string(started.message()).c_str());
    return 1;
  }
  bool ok = Measure("kvmid policy (lock LSTAR)", config.unix_socket, &rows[1]);
  daemon.Shutdown(std::chrono::milliseconds(0));
  ::unlink(config.unix_socket.c_str());
  ::rmdir(dir.c_str());
  if (!ok) return 1;

  std::printf(
      "\n| guest | attempts/s | mean per attempt (us) | exits/s | WRMSR exits/s | "
      "event RTT p50 (us) | p99 (us) | vs no introspection |\n");
  std::printf("|---|---:|---:|---:|---:|---:|---:|---:|\n");
  for (const Row& r : rows) {
    std::printf("| %s | %.0f | %.1f | %.0f | %.0f | %llu | %llu | %.1fx |\n", r.config.c_str(),
                r.attempts / r.seconds, r.mean_us, r.exits / r.seconds, r.msr_exits / r.seconds,
                static_cast<unsigned long long>(r.p50_us),
                static_cast<unsigned long long>(r.p99_us),
                rows[0].mean_us > 0 ? r.mean_us / rows[0].mean_us : 0.0);
  }
  return 0;
}
