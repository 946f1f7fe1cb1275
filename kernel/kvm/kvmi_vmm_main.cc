// kvmi-vmm: a minimal VMM that boots the repository's guest kernel on /dev/kvm and connects to an
// introspection tool (kvmid) as QEMU with KVMI v6 would: handshake, hook, reconnect.
//
//   kvmi-vmm --connect=unix:/run/kvmid/kvmi.sock [--cookie_file=PATH] [--guest_args=rootkit]
//            [--duration=60] [--reconnect=1] [--name=kvm-vm]
//
// The guest's serial console goes to stdout, each line prefixed with --console_prefix. Without
// --connect the guest runs without introspection. Exit status: 0 after --duration or a signal,
// 3 if KVM is unavailable, 2 for bad flags, 1 if the guest stopped on its own (halt, triple fault).
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
#include "kernel/kvm/guest/layout.h"
#include "kernel/kvm/guest_image.h"
#include "kernel/kvm/kvm_vmm.h"
#include "spdlog/spdlog.h"

ABSL_FLAG(std::string, connect, "", "Tool endpoint: unix:PATH or vsock:CID:PORT (empty: none)");
ABSL_FLAG(std::string, cookie_file, "",
          "Verify the tool's cookie_hash against SHA-1 of this file's contents; refuse on "
          "mismatch (kvmi-v7 QEMU behaviour)");
ABSL_FLAG(double, reconnect, 1,
          "Seconds before reconnecting when the tool goes away (QEMU reconnect=N); 0 = never");
ABSL_FLAG(double, duration, 10, "Seconds to run (0 = until SIGINT/SIGTERM)");
ABSL_FLAG(std::string, guest_args, "",
          "The guest's command line: 'rootkit' (attack LSTAR, kernel text, IDT every round), "
          "'int3=N' (an INT3 every round from round N on), 'period_ms=N' (pause between rounds), "
          "'ring3' (processes in ring 3)");
ABSL_FLAG(std::string, name, "kvm-vm", "VM name sent in the handshake");
ABSL_FLAG(int64_t, vcpus, 1,
          "vCPUs at start (1..8, hot-added included): vCPU 0 runs the kernel, the others tick on "
          "the console (\"ap N: tick K\")");
ABSL_FLAG(bool, enforce_execute, false,
          "Enforce the tool's execute restrictions (a page without X loses its memslot, so KVM "
          "cannot read it either: never restrict page tables, GDT, IDT or TSS without X)");
ABSL_FLAG(int64_t, hotplug_vcpu_after_ms, -1,
          "If >= 0: create and start one more vCPU this many milliseconds after start (CPU "
          "hot-add; the tool gets CREATE_VCPU for it)");
ABSL_FLAG(std::string, uuid, "", "VM UUID sent in the handshake (default: random)");
ABSL_FLAG(int64_t, memory_mib, 32, "Guest RAM in MiB (even, 4..4096)");
ABSL_FLAG(std::string, console_prefix, "[guest] ", "Prefix of each console line on stdout");
ABSL_FLAG(std::string, log_level, "warn", "trace, debug, info, warn, error, off");

namespace {

std::atomic<bool> g_stop{false};

void OnSignal(int) { g_stop = true; }

int Fail(int code, const std::string& message) {
  std::fprintf(stderr, "kvmi-vmm: %s\n", message.c_str());
  return code;
}

kvmi::Uuid RandomUuid() {
  kvmi::Uuid uuid{};
  std::ifstream random("/dev/urandom", std::ios::binary);
  random.read(reinterpret_cast<char*>(uuid.data()), uuid.size());
  uuid[6] = static_cast<uint8_t>((uuid[6] & 0x0f) | 0x40);  // version 4
  uuid[8] = static_cast<uint8_t>((uuid[8] & 0x3f) | 0x80);
  return uuid;
}

}  // namespace

int main(int argc, char** argv) {
  kvmid::SetUpProgram("kvmi-vmm",
                      "kvmi-vmm: a minimal VMM, the repository's guest on /dev/kvm, KVMI v6.",
                      {"kernel/kvm/"});
  std::vector<char*> rest = absl::ParseCommandLine(argc, argv);
  if (rest.size() > 1) return Fail(2, std::string("unexpected argument '") + rest[1] + "'");
  auto level = spdlog::level::from_str(absl::GetFlag(FLAGS_log_level));
  if (level == spdlog::level::off && absl::GetFlag(FLAGS_log_level) != "off") {
    return Fail(2, "--log_level must be one of trace, debug, info, warn, error, off");
  }
  spdlog::set_level(level);

  using namespace kvmi;
  kvm::VmmConfig config;
  std::string error;
  if (!absl::GetFlag(FLAGS_connect).empty()) {
    auto endpoint = ParseEndpoint(absl::GetFlag(FLAGS_connect));
    if (!endpoint.ok()) {
      return Fail(2, "--connect: " + std::string(endpoint.status().message()));
    }
    config.connector.endpoint = *endpoint;
  }
  double reconnect = absl::GetFlag(FLAGS_reconnect);
  if (!(reconnect >= 0) || reconnect > 86400) return Fail(2, "--reconnect must be 0..86400");
  config.connector.reconnect_seconds = reconnect;
  if (!absl::GetFlag(FLAGS_cookie_file).empty()) {
    std::ifstream in(absl::GetFlag(FLAGS_cookie_file), std::ios::binary);
    if (!in)
      return Fail(2, "--cookie_file: cannot read '" + absl::GetFlag(FLAGS_cookie_file) + "'");
    std::stringstream cookie;
    cookie << in.rdbuf();
    config.connector.cookie = cookie.str();
  }
  double duration = absl::GetFlag(FLAGS_duration);
  if (!(duration >= 0) || duration > 1e7) return Fail(2, "--duration must be >= 0 seconds");
  int64_t memory_mib = absl::GetFlag(FLAGS_memory_mib);
  if (memory_mib < 4 || memory_mib > 4096 || memory_mib % 2 != 0) {
    return Fail(2, "--memory_mib must be even, 4..4096");
  }
  config.memory_bytes = static_cast<uint64_t>(memory_mib) << 20;
  config.name = absl::GetFlag(FLAGS_name);
  if (config.name.empty() || config.name.size() > 63) return Fail(2, "--name: 1..63 characters");
  if (absl::GetFlag(FLAGS_uuid).empty()) {
    config.uuid = RandomUuid();
  } else if (!ParseUuid(absl::GetFlag(FLAGS_uuid), &config.uuid)) {
    return Fail(2, "--uuid: not a UUID");
  }
  const int64_t vcpus = absl::GetFlag(FLAGS_vcpus);
  const int64_t hotplug_ms = absl::GetFlag(FLAGS_hotplug_vcpu_after_ms);
  if (vcpus < 1 || vcpus + (hotplug_ms >= 0 ? 1 : 0) > GUEST_MAX_VCPUS) {
    return Fail(2, "--vcpus: 1.." + std::to_string(GUEST_MAX_VCPUS) + ", hot-added vCPU included");
  }
  if (hotplug_ms > 3600 * 1000) return Fail(2, "--hotplug_vcpu_after_ms: at most an hour");
  config.vcpus = static_cast<uint32_t>(vcpus);
  config.hotplug_vcpu_after_ms = hotplug_ms;
  config.enforce_execute = absl::GetFlag(FLAGS_enforce_execute);
  config.cmdline = absl::GetFlag(FLAGS_guest_args);
  for (char c : config.cmdline) {
    if (c < 0x20 || c > 0x7e) return Fail(2, "--guest_args: printable ASCII only");
  }
  config.image = kvm::GuestImage();
  const std::string prefix = absl::GetFlag(FLAGS_console_prefix);
  config.on_console_line = [&prefix](const std::string& line) {
    // The guest is not trusted either: only printable bytes reach the terminal.
    std::string clean;
    for (char c : line) clean += (c >= 0x20 && c <= 0x7e) ? c : '?';
    std::printf("%s%s\n", prefix.c_str(), clean.c_str());
    std::fflush(stdout);
  };

  std::signal(SIGINT, OnSignal);
  std::signal(SIGTERM, OnSignal);
  std::signal(SIGPIPE, SIG_IGN);

  auto vmm = kvm::KvmVmm::Create(std::move(config), &error);
  if (!vmm) return Fail(3, "cannot create the VM: " + error);
  std::fprintf(stderr, "kvmi-vmm: %s, %lld MiB, guest args \"%s\" -> %s\n",
               absl::GetFlag(FLAGS_name).c_str(), static_cast<long long>(memory_mib),
               absl::GetFlag(FLAGS_guest_args).c_str(),
               absl::GetFlag(FLAGS_connect).empty() ? "no introspection"
                                                    : absl::GetFlag(FLAGS_connect).c_str());
  auto start = std::chrono::steady_clock::now();
  vmm->Start();
  auto deadline = duration > 0
                      ? start + std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                                    std::chrono::duration<double>(duration))
                      : std::chrono::steady_clock::time_point::max();
  while (!g_stop && !vmm->guest_stopped() && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  const bool guest_stopped = vmm->guest_stopped();
  vmm->Stop();
  double wall = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  const kvm::VmmStats& s = vmm->stats();
  std::fprintf(stderr,
               "kvmi-vmm summary: %.1f s, exits %llu (io %llu, mmio %llu, msr %llu, debug %llu, "
               "int3 %llu, fetch %llu), kicks %llu, sessions %llu%s%s\n",
               wall, static_cast<unsigned long long>(s.exits.load()),
               static_cast<unsigned long long>(s.io_exits.load()),
               static_cast<unsigned long long>(s.mmio_exits.load()),
               static_cast<unsigned long long>(s.msr_exits.load()),
               static_cast<unsigned long long>(s.debug_exits.load()),
               static_cast<unsigned long long>(s.breakpoint_exits.load()),
               static_cast<unsigned long long>(s.fetch_faults.load()),
               static_cast<unsigned long long>(s.kicks.load()),
               static_cast<unsigned long long>(vmm->connector().sessions_started()),
               guest_stopped ? ", guest stopped: " : "",
               guest_stopped ? vmm->stop_reason().c_str() : "");
  std::fprintf(stderr, "%s", vmm->engine().stats().Summary().c_str());
  return guest_stopped ? 1 : 0;
}
