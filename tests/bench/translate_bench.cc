// TranslateAddress, cold and cached, through the API and in the daemon, in one run:
//   api vcpu cold     TranslateAddress(vm, vcpu, gva, no_cache): GET_REGISTERS + a 4-level walk
//                     (4 READ_PHYSICAL, one after the other) + the gRPC round trip;
//   api vcpu cached   the same answered from the cache: GET_REGISTERS + gRPC;
//   api cr3 cold      TranslateAddress(vm, address_space{cr3, 4-level}, gva, no_cache): the walk;
//   api cr3 cached    the same from the cache: gRPC only;
//   daemon walk       vmem::Walk over the guest's session (what "cold" costs inside kvmid);
//   daemon cached     TranslationCache::Lookup (what "cached" costs inside kvmid).
// Then bulk reads of the same guest memory, streamed (--bulk_mib, 1 MiB chunks): the guest's
// direct map (one 1 GiB page) through ReadVirtualStream (every 4 KiB piece translated, no
// cache) next to ReadPhysicalStream of the same physical range.
// A simulated guest with real 4-level page tables (kernel/sim page_tables) over a real KVMI
// socket; the API over its UNIX socket; closed loop, one call at a time.
//
//   bazel run -c opt //tests/bench:translate_bench -- --seconds=2
#include <absl/flags/flag.h>
#include <absl/flags/parse.h>
#include <grpcpp/grpcpp.h>
#include <spdlog/spdlog.h>
#include <stdlib.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cinttypes>
#include <cstdio>
#include <functional>
#include <future>
#include <random>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#include "common/program.h"
#include "daemon/api/server.h"
#include "daemon/kvmid.h"
#include "daemon/testing/wait.h"
#include "daemon/vmem/page_walker.h"
#include "daemon/vmem/session_reader.h"
#include "daemon/vmem/translation_cache.h"
#include "kernel/sim/fleet.h"
#include "proto/kvmi/v1/introspection.grpc.pb.h"

ABSL_FLAG(double, seconds, 2, "Seconds per row");
ABSL_FLAG(int, addresses, 64, "Distinct mapped addresses cycled through");
ABSL_FLAG(int, bulk_mib, 64, "MiB per bulk streamed read (the guest has 64 MiB)");
ABSL_FLAG(int, bulk_runs, 3, "Bulk reads per row (the best is shown)");

namespace kvmid {
namespace {

using Clock = std::chrono::steady_clock;
namespace sim = ::kvmi::sim;

struct Row {
  const char* name;
  std::vector<double> us;
  double hit_ratio = -1;  // cached rows: answers that came from the cache
};

double Percentile(std::vector<double> v, double p) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v[std::min(v.size() - 1, static_cast<size_t>(p * (v.size() - 1) + 0.5))];
}

Row Measure(const char* name, double seconds, const std::function<bool(size_t)>& once) {
  Row row{name, {}};
  for (size_t i = 0; i < 50; ++i) once(i);  // warm up
  auto end = Clock::now() +
             std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(seconds));
  for (size_t i = 0; Clock::now() < end; ++i) {
    auto start = Clock::now();
    if (!once(i)) {
      std::fprintf(stderr, "translate_bench: %s failed\n", name);
      std::exit(1);
    }
    row.us.push_back(std::chrono::duration<double, std::micro>(Clock::now() - start).count());
  }
  return row;
}

int Main() {
  spdlog::set_level(spdlog::level::warn);
  const double seconds = absl::GetFlag(FLAGS_seconds);
  char dir_template[] = "/tmp/kvmid-tb-XXXXXX";
  std::string dir = mkdtemp(dir_template);
  DaemonConfig config;
  config.unix_socket = dir + "/kvmi.sock";
  Daemon daemon(config);
  if (!daemon.Start().ok()) return 1;
  ApiServer api(&daemon, /*history=*/4);
  security::ApiListenOptions listen;
  listen.unix_socket = dir + "/api.sock";
  if (!api.Start(listen).ok()) return 1;
  auto stub = kvmi::v1::Introspection::NewStub(
      grpc::CreateChannel("unix:" + dir + "/api.sock", grpc::InsecureChannelCredentials()));

  sim::FleetConfig fleet_config;
  fleet_config.guest.vcpus = 1;
  fleet_config.guest.memory_bytes = 64ull << 20;
  fleet_config.guest.paging = sim::PagingConfig{sim::PagingMode::k4Level, 2};
  fleet_config.connector.endpoint.family = kvmi::Endpoint::Family::kUnix;
  fleet_config.connector.endpoint.path = config.unix_socket;
  fleet_config.name_prefix = "tb-";
  sim::Fleet fleet(fleet_config);
  fleet.Start();
  if (!fleet.vm(0).WaitHooked(Clock::now() + std::chrono::seconds(10))) return 1;
  std::shared_ptr<Guest> guest;
  if (!testing::WaitUntil([&] {
        guest = daemon.registry().Lookup("tb-0000");
        return guest && guest->state() == GuestState::kHooked;
      })) {
    std::fprintf(stderr, "translate_bench: the guest did not hook\n");
    return 1;
  }

  const sim::SimGuest& g = fleet.vm(0).guest();
  const uint64_t cr3 = g.Snapshot(0).sregs.cr3;
  std::vector<uint64_t> gvas;
  std::mt19937_64 rng(3);
  for (int i = 0; i < absl::GetFlag(FLAGS_addresses); ++i) {
    uint64_t gva;
    do {
      gva = g.page_tables()->MappedAddress(cr3, rng());
    } while (!g.page_tables()->Expect(cr3, gva).present);
    gvas.push_back(gva);
  }
  size_t hits = 0;
  auto call = [&](bool by_vcpu, bool no_cache, size_t i) {
    kvmi::v1::TranslateAddressRequest request;
    request.set_vm("tb-0000");
    if (by_vcpu) {
      request.set_vcpu(0);
    } else {
      request.mutable_address_space()->set_cr3(cr3);
      request.mutable_address_space()->set_mode(kvmi::v1::PAGING_MODE_4LEVEL);
      request.mutable_address_space()->set_nxe(true);
    }
    request.set_gva(gvas[i % gvas.size()]);
    request.set_no_cache(no_cache);
    kvmi::v1::TranslateAddressResponse response;
    grpc::ClientContext ctx;
    grpc::Status s = stub->TranslateAddress(&ctx, request, &response);
    if (response.cached()) ++hits;
    // Uncached calls must never be answered from the cache; cached ones are, except the first
    // of each address per time to live (counted: the row's hit ratio).
    return s.ok() && response.present() && !(no_cache && response.cached());
  };

  std::vector<Row> rows;
  rows.push_back(Measure("api vcpu cold", seconds, [&](size_t i) { return call(true, true, i); }));
  hits = 0;
  rows.push_back(
      Measure("api vcpu cached", seconds, [&](size_t i) { return call(true, false, i); }));
  rows.back().hit_ratio = static_cast<double>(hits) / (rows.back().us.size() + 50);
  rows.push_back(Measure("api cr3 cold", seconds, [&](size_t i) { return call(false, true, i); }));
  hits = 0;
  rows.push_back(
      Measure("api cr3 cached", seconds, [&](size_t i) { return call(false, false, i); }));
  rows.back().hit_ratio = static_cast<double>(hits) / (rows.back().us.size() + 50);

  vmem::PagingContext context;
  context.mode = vmem::PagingMode::k4Level;
  context.cr3 = cr3;
  context.nxe = true;
  auto reader = std::make_shared<vmem::SessionReader>(guest->session());
  rows.push_back(Measure("daemon walk", seconds, [&](size_t i) {
    std::promise<bool> done;
    vmem::Walk(reader, context, gvas[i % gvas.size()],
               [&](absl::StatusOr<vmem::Translation> t) { done.set_value(t.ok() && t->present); });
    return done.get_future().get();
  }));
  // A long time to live: this row measures the lookup, not the expiry.
  vmem::TranslationCache cache(vmem::CacheOptions{std::chrono::hours(1)});
  for (uint64_t gva : gvas) {
    std::promise<vmem::Translation> done;
    vmem::Walk(reader, context, gva,
               [&](absl::StatusOr<vmem::Translation> t) { done.set_value(*t); });
    cache.Insert(0, context, gva, done.get_future().get(), Clock::now());
  }
  rows.push_back(Measure("daemon cached", seconds, [&](size_t i) {
    return cache.Lookup(0, context, gvas[i % gvas.size()], Clock::now()).has_value();
  }));

  std::printf("TranslateAddress, 4-level guest page tables, %zu addresses, %.1f s per row\n",
              gvas.size(), seconds);
  std::printf("%-18s %10s %10s %10s %12s %8s\n", "path", "calls", "p50 us", "p99 us", "calls/s",
              "hits");
  for (const Row& row : rows) {
    double total = 0;
    for (double v : row.us) total += v;
    std::string hit = row.hit_ratio < 0 ? "-" : std::to_string(int(row.hit_ratio * 100)) + "%";
    std::printf("%-18s %10zu %10.2f %10.2f %12.0f %8s\n", row.name, row.us.size(),
                Percentile(row.us, 0.5), Percentile(row.us, 0.99),
                row.us.empty() ? 0 : row.us.size() / (total / 1e6), hit.c_str());
  }

  // Bulk: the same bytes through the virtual and the physical stream.
  const uint64_t bulk = uint64_t(absl::GetFlag(FLAGS_bulk_mib)) << 20;
  auto drain = [&](auto&& reader, auto* chunk, uint64_t* bytes, bool* complete) {
    while (reader->Read(chunk)) {
      *bytes += chunk->size();
      if constexpr (std::is_same_v<std::decay_t<decltype(*chunk)>,
                                   kvmi::v1::ReadVirtualStreamResponse>) {
        *complete &= chunk->complete();
      }
    }
    return reader->Finish().ok();
  };
  struct BulkRow {
    const char* name;
    double best_s = 0;
  };
  std::vector<BulkRow> bulk_rows;
  auto bulk_row = [&](const char* name, const std::function<bool()>& once) {
    BulkRow row{name};
    for (int i = 0; i < absl::GetFlag(FLAGS_bulk_runs); ++i) {
      auto start = Clock::now();
      if (!once()) {
        std::fprintf(stderr, "translate_bench: %s failed\n", name);
        return;
      }
      double s = std::chrono::duration<double>(Clock::now() - start).count();
      if (row.best_s == 0 || s < row.best_s) row.best_s = s;
    }
    bulk_rows.push_back(row);
  };
  auto virtual_read = [&](uint64_t gva) {
    kvmi::v1::ReadVirtualStreamRequest request;
    request.set_vm("tb-0000");
    request.set_vcpu(0);
    request.set_gva(gva);
    request.set_size(bulk);
    request.set_chunk_bytes(1 << 20);
    request.set_no_cache(true);
    grpc::ClientContext ctx;
    kvmi::v1::ReadVirtualStreamResponse chunk;
    uint64_t bytes = 0;
    bool complete = true;
    bool ok = drain(stub->ReadVirtualStream(&ctx, request), &chunk, &bytes, &complete);
    return ok && bytes == bulk && complete;
  };
  bulk_row("virtual stream, direct map (1 GiB page)",
           [&] { return virtual_read(sim::kDirectMapGva); });
  bulk_row("physical stream", [&] {
    kvmi::v1::ReadPhysicalStreamRequest request;
    request.set_vm("tb-0000");
    request.set_gpa(0);
    request.set_size(bulk);
    request.set_chunk_bytes(1 << 20);
    grpc::ClientContext ctx;
    kvmi::v1::ReadPhysicalStreamResponse chunk;
    uint64_t bytes = 0;
    bool complete = true;
    return drain(stub->ReadPhysicalStream(&ctx, request), &chunk, &bytes, &complete) &&
           bytes == bulk;
  });
  std::printf("\nBulk streamed reads, %" PRIu64 " MiB, 1 MiB chunks, best of %d\n", bulk >> 20,
              absl::GetFlag(FLAGS_bulk_runs));
  std::printf("%-42s %10s %10s\n", "path", "seconds", "MiB/s");
  for (const BulkRow& row : bulk_rows) {
    std::printf("%-42s %10.3f %10.0f\n", row.name, row.best_s, (bulk >> 20) / row.best_s);
  }
  fleet.Stop();
  api.Shutdown();
  daemon.Shutdown();
  ::unlink(config.unix_socket.c_str());
  ::unlink(listen.unix_socket.c_str());
  ::rmdir(dir.c_str());
  return 0;
}

}  // namespace
}  // namespace kvmid

int main(int argc, char** argv) {
  kvmid::UseReleaseAbslMutexes();  // as kvmid's main (common/program.h)
  kvmid::UseGrpcPollEngine();
  absl::ParseCommandLine(argc, argv);
  return kvmid::Main();
}
