// Bulk guest memory, in one run, against the same simulated guest (kvmi-sim's SimGuest, its
// memory filled with a non-zero pattern so that nothing is skipped):
//   raw KVMI, 64 in flight   a pipelined KVMI reader on the guest's socket, no kvmid (the ceiling)
//   raw KVMI, serial         the same, one READ_PHYSICAL at a time
//   API stream, C++          ReadPhysicalStream through kvmid from a C++ client (stock channel)
//   API unary 1 MiB, C++     the old way: ReadPhysical calls of 1 MiB, one after the other
//   API stream, Python       kvmi_client.read_physical_stream (Debian's python3-grpcio)
//   API unary 1 MiB, Python  kvmi_client.read_physical in 1 MiB calls
// Every row reads the same --mib MiB and checks the bytes. Prints a table
// (docs/PERFORMANCE.md, "Bulk memory").
//
//   bazel run -c opt //tests/bench:memory_bench -- --mib=256
#include <absl/flags/flag.h>
#include <absl/flags/parse.h>
#include <absl/strings/str_format.h>
#include <grpcpp/grpcpp.h>
#include <spdlog/spdlog.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <string>
#include <thread>
#include <vector>

#include "common/program.h"
#include "daemon/api/server.h"
#include "daemon/kvmid.h"
#include "kernel/sim/fleet.h"
#include "kernel/sim/test_tool.h"
#include "kernel/transport/socket.h"
#include "proto/kvmi/v1/introspection.grpc.pb.h"

ABSL_FLAG(int, mib, 256, "MiB of guest memory each row reads");
ABSL_FLAG(int, in_flight, 64, "READ_PHYSICAL commands in flight for the raw pipelined reader");
ABSL_FLAG(int, chunk_kib, 256, "chunk size of the API stream rows (KiB); 1 MiB is shown too");
ABSL_FLAG(std::string, python, "/usr/bin/python3", "Python for the Python rows (empty: skip)");
ABSL_FLAG(std::string, python_client, "clients/python",
          "directory of kvmi_client.py and the generated kvmi/v1 stubs (bazel run: runfiles)");

namespace {

using Clock = std::chrono::steady_clock;
constexpr uint64_t kPage = 4096;

// The pattern every byte of guest memory holds: recognisable per page and never a zero page.
uint8_t PatternByte(uint64_t gpa) { return static_cast<uint8_t>((gpa >> 12) * 31 + gpa + 1); }

void FillGuest(kvmi::sim::Fleet* fleet, uint64_t bytes) {
  std::vector<uint8_t> page(kPage);
  for (uint64_t gpa = 0; gpa < bytes; gpa += kPage) {
    for (uint64_t i = 0; i < kPage; ++i) page[i] = PatternByte(gpa + i);
    fleet->vm(0).guest().WritePhysical(gpa, page.data(), kPage);
  }
}

// Spot checks (every 4099th byte) of a read at `gpa`.
bool Matches(const std::string& data, uint64_t gpa) {
  for (size_t i = 0; i < data.size(); i += 4099) {
    if (static_cast<uint8_t>(data[i]) != PatternByte(gpa + i)) return false;
  }
  return true;
}

struct Row {
  std::string what;
  double mib_per_second = 0;
  bool ok = false;
  std::string note;
};

kvmi::sim::FleetConfig OneGuest(const std::string& socket, uint64_t memory) {
  kvmi::sim::FleetConfig config;
  config.vms = 1;
  config.guest.vcpus = 1;
  config.guest.memory_bytes = memory;
  config.connector.endpoint.family = kvmi::Endpoint::Family::kUnix;
  config.connector.endpoint.path = socket;
  config.connector.reconnect_seconds = 0;
  kvmi::sim::Scenario idle;
  kvmi::sim::NamedScenario("idle", &idle);
  config.workload = idle;
  return config;
}

// READ_PHYSICAL of every page of [0, bytes) with `in_flight` commands outstanding.
Row RawReader(kvmi::sim::ToolConnection* tool, uint64_t bytes, int in_flight) {
  Row row;
  row.what = in_flight > 1 ? absl::StrFormat("raw KVMI reader, %d in flight", in_flight)
                           : "raw KVMI reader, serial";
  const uint64_t pages = bytes / kPage;
  uint64_t sent = 0, received = 0, bad = 0;
  std::vector<uint8_t> sink(kPage);
  auto t0 = Clock::now();
  while (received < pages) {
    while (sent < pages && sent - received < static_cast<uint64_t>(in_flight)) {
      kvmi::ReadPhysicalRequest request;
      request.gpa = sent * kPage;
      request.size = kPage;
      if (tool->Send(request) == 0) return row;
      ++sent;
    }
    auto reply = tool->ReadMessage(std::chrono::seconds(10));
    if (!reply) return row;
    if (reply->hdr.id != KVMI_READ_PHYSICAL) continue;
    kvmi::ByteView data = kvmi::sim::ToolConnection::DataOf(*reply);
    if (kvmi::sim::ToolConnection::ErrorOf(reply) != 0 || data.size() != kPage) ++bad;
    std::memcpy(sink.data(), data.data(), std::min<size_t>(data.size(), kPage));
    ++received;
  }
  double seconds = std::chrono::duration<double>(Clock::now() - t0).count();
  row.mib_per_second = bytes / double(1 << 20) / seconds;
  row.ok = bad == 0;
  return row;
}

Row ApiStream(kvmi::v1::Introspection::Stub* stub, const std::string& vm, uint64_t bytes,
              uint32_t chunk) {
  Row row;
  row.what = absl::StrFormat("API ReadPhysicalStream, C++ (%u KiB chunks)", chunk >> 10);
  kvmi::v1::ReadPhysicalStreamRequest request;
  request.set_vm(vm);
  request.set_size(bytes);
  request.set_chunk_bytes(chunk);
  grpc::ClientContext ctx;
  auto t0 = Clock::now();
  auto reader = stub->ReadPhysicalStream(&ctx, request);
  kvmi::v1::ReadPhysicalStreamResponse message;
  uint64_t got = 0;
  bool ok = true;
  while (reader->Read(&message)) {
    ok = ok && message.gpa() == got && Matches(message.data(), message.gpa());
    got += message.data().size();
  }
  grpc::Status s = reader->Finish();
  double seconds = std::chrono::duration<double>(Clock::now() - t0).count();
  row.mib_per_second = bytes / double(1 << 20) / seconds;
  row.ok = ok && s.ok() && got == bytes;
  if (!s.ok()) row.note = s.error_message();
  return row;
}

Row ApiUnary(kvmi::v1::Introspection::Stub* stub, const std::string& vm, uint64_t bytes) {
  Row row;
  row.what = "API ReadPhysical 1 MiB calls, C++";
  constexpr uint64_t kCall = 1 << 20;
  auto t0 = Clock::now();
  row.ok = true;
  for (uint64_t gpa = 0; gpa < bytes; gpa += kCall) {
    kvmi::v1::ReadPhysicalRequest request;
    request.set_vm(vm);
    request.set_gpa(gpa);
    request.set_size(kCall);
    kvmi::v1::ReadPhysicalResponse response;
    grpc::ClientContext ctx;
    grpc::Status s = stub->ReadPhysical(&ctx, request, &response);
    if (!s.ok() || !Matches(response.data(), gpa)) {
      row.ok = false;
      row.note = s.error_message();
      break;
    }
  }
  double seconds = std::chrono::duration<double>(Clock::now() - t0).count();
  row.mib_per_second = bytes / double(1 << 20) / seconds;
  return row;
}

// The Python client in a child process; it prints "MiB/s OK|BAD".
Row Python(const std::string& target, const std::string& vm, uint64_t bytes, bool stream,
           uint32_t chunk) {
  Row row;
  row.what = stream ? absl::StrFormat("API ReadPhysicalStream, Python (%u KiB chunks)", chunk >> 10)
                    : "API ReadPhysical 1 MiB calls, Python";
  const std::string script =
      absl::StrFormat(R"(
import sys, time
sys.path.insert(0, %s)
import kvmi_client as kc
c = kc.Client(%s, timeout=60)
c.list_vms()
size, ok, got = %d, True, 0
t0 = time.monotonic()
if %d:
    for chunk in c.read_physical_stream(%s, 0, size, chunk_bytes=%d):
        got += len(chunk.data)
        d = chunk.data
        ok = ok and d[0] == ((chunk.gpa >> 12) * 31 + chunk.gpa + 1) %% 256
else:
    for gpa in range(0, size, 1 << 20):
        d = c.read_physical(%s, gpa, 1 << 20)
        got += len(d)
        ok = ok and d[0] == ((gpa >> 12) * 31 + gpa + 1) %% 256
t = time.monotonic() - t0
print("%%.1f %%s" %% (size / 1048576 / t, "OK" if ok and got == size else "BAD"))
)",
                      "'" + absl::GetFlag(FLAGS_python_client) + "'", "'" + target + "'", bytes,
                      stream ? 1 : 0, "'" + vm + "'", chunk, "'" + vm + "'");
  std::string command = absl::GetFlag(FLAGS_python) + " -c \"$KVMID_BENCH_SCRIPT\"";
  setenv("KVMID_BENCH_SCRIPT", script.c_str(), 1);
  FILE* pipe = popen(command.c_str(), "r");
  if (pipe == nullptr) return row;
  char line[256] = {};
  std::string out;
  while (fgets(line, sizeof(line), pipe) != nullptr) out += line;
  int rc = pclose(pipe);
  char verdict[16] = {};
  if (rc == 0 && sscanf(out.c_str(), "%lf %15s", &row.mib_per_second, verdict) == 2) {
    row.ok = std::string(verdict) == "OK";
  } else {
    row.note = "python failed: " + out;
  }
  return row;
}

}  // namespace

int main(int argc, char** argv) {
  kvmid::UseReleaseAbslMutexes();  // as kvmid's main (common/program.h)
  kvmid::UseGrpcPollEngine();
  absl::ParseCommandLine(argc, argv);
  spdlog::set_level(spdlog::level::warn);
  const uint64_t bytes = uint64_t(absl::GetFlag(FLAGS_mib)) << 20;
  const uint64_t memory = bytes + (uint64_t{16} << 20);
  const uint32_t chunk = uint32_t(absl::GetFlag(FLAGS_chunk_kib)) << 10;
  char dir_template[] = "/tmp/kvmid-membench-XXXXXX";
  const std::string dir = mkdtemp(dir_template);
  std::vector<Row> rows;

  // (c) The raw pipelined reader: the simulator connects to a bare tool socket.
  {
    auto listener = kvmi::ListenUnix(dir + "/raw.sock");
    if (!listener.ok()) return 1;
    kvmi::sim::Fleet fleet(OneGuest(dir + "/raw.sock", memory));
    FillGuest(&fleet, bytes);
    fleet.Start();
    kvmi::UniqueFd fd;
    if (!kvmi::Accept(listener->get(), Clock::now() + std::chrono::seconds(30), &fd).ok()) {
      fprintf(stderr, "the simulator did not connect\n");
      return 1;
    }
    kvmi::sim::ToolConnection tool(std::move(fd));
    kvmi::QemuHello hello;
    if (!tool.Handshake(&hello)) return 1;
    rows.push_back(RawReader(&tool, bytes, absl::GetFlag(FLAGS_in_flight)));
    rows.push_back(RawReader(&tool, std::min<uint64_t>(bytes, 64 << 20), 1));
    rows.back().what += " (64 MiB)";
    tool.Close();
    fleet.Stop();
  }

  // (a), (b) and the unary calls: the same guest behind kvmid.
  {
    kvmid::DaemonConfig config;
    config.unix_socket = dir + "/kvmi.sock";
    kvmid::Daemon daemon(config);
    if (!daemon.Start().ok()) return 1;
    kvmid::ApiServer api(&daemon);
    kvmid::security::ApiListenOptions listen;
    listen.unix_socket = dir + "/api.sock";
    if (!api.Start(listen).ok()) return 1;
    kvmi::sim::Fleet fleet(OneGuest(config.unix_socket, memory));
    FillGuest(&fleet, bytes);
    fleet.Start();
    const std::string vm = "sim-vm-0000";
    auto deadline = Clock::now() + std::chrono::seconds(30);
    while (Clock::now() < deadline) {
      auto guest = daemon.registry().Lookup(vm);
      if (guest && guest->state() == kvmid::GuestState::kHooked) break;
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    const std::string target = "unix:" + dir + "/api.sock";
    auto stub = kvmi::v1::Introspection::NewStub(
        grpc::CreateChannel(target, grpc::InsecureChannelCredentials()));
    rows.push_back(ApiStream(stub.get(), vm, bytes, chunk));
    if (chunk != (1u << 20)) rows.push_back(ApiStream(stub.get(), vm, bytes, 1u << 20));
    rows.push_back(ApiUnary(stub.get(), vm, bytes));
    if (!absl::GetFlag(FLAGS_python).empty()) {
      rows.push_back(Python(target, vm, bytes, /*stream=*/true, chunk));
      if (chunk != (1u << 20)) rows.push_back(Python(target, vm, bytes, /*stream=*/true, 1u << 20));
      rows.push_back(Python(target, vm, bytes, /*stream=*/false, chunk));
    }
    api.Shutdown();
    fleet.Stop();
    daemon.Shutdown(std::chrono::milliseconds(0));
  }

  const double raw = rows.front().mib_per_second;
  printf("\n%d MiB of one simulated guest, read once per row (%u hardware threads)\n\n",
         absl::GetFlag(FLAGS_mib), std::thread::hardware_concurrency());
  printf("| %-52s | %9s | %8s | %s\n", "reader", "MiB/s", "x raw", "bytes");
  printf("|%s|%s|%s|%s\n", std::string(54, '-').c_str(), std::string(11, '-').c_str(),
         std::string(10, '-').c_str(), "-------");
  bool all_ok = true;
  for (const Row& r : rows) {
    printf("| %-52s | %9.0f | %7.2fx | %s %s\n", r.what.c_str(), r.mib_per_second,
           raw > 0 ? r.mib_per_second / raw : 0, r.ok ? "ok" : "WRONG", r.note.c_str());
    all_ok = all_ok && r.ok;
  }
  return all_ok ? 0 : 1;
}
