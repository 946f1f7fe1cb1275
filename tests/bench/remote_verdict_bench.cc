// The remote verdict round trip, measured next to a bare gRPC bidirectional echo in one run:
//   echo         a client sends a message the size of an event and waits for it to come back
//                (gRPC's own cost: the floor for any remote verdict);
//   remote       a simulated guest vCPU writes CR3 -> KVMI event -> kvmid -> Attach stream ->
//                a C++ handler answers CONTINUE -> kvmid -> KVMI reply -> the vCPU resumes;
//   local        the same guest answered by an in-daemon policy (no remote hop): what the KVMI
//                part of the remote row costs.
// For every guest row, kvmid's own verdict time (event received -> reply written) too: for a
// remote verdict, the gRPC round trip to the handler plus kvmid's dispatch.
// Each over the UNIX socket and over TCP loopback. TCP is mutual TLS for both the echo and
// kvmid (kvmid's TCP API serves nothing else to a caller it must authorize), with the same
// server credentials (daemon/security/credentials.h) and certificates made by openssl at start;
// the handler's certificate is bound to the admin role. Over UNIX the bench (root) is admin.
// One vCPU, closed loop, so throughput is 1 / round trip. Prints a table (docs/PERFORMANCE.md).
//
//   bazel run -c opt //tests/bench:remote_verdict_bench -- --seconds=3 --rounds=3
#include <absl/flags/flag.h>
#include <absl/flags/parse.h>
#include <grpcpp/grpcpp.h>
#include <spdlog/spdlog.h>
#include <stdlib.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <optional>
#include <thread>
#include <unordered_map>
#include <vector>

#include "daemon/api/server.h"
#include "daemon/kvmid.h"
#include "daemon/security/authz.h"
#include "daemon/security/credentials.h"
#include "daemon/security/testing/test_certs.h"
#include "kernel/sim/fleet.h"
#include "tests/bench/bench_policies.h"
#include "tests/bench/echo.grpc.pb.h"
#include "tests/bench/echo_client.h"

ABSL_FLAG(double, seconds, 3.0, "measurement window per row and round");
ABSL_FLAG(int, rounds, 3, "rounds; each measures every row once (the summary takes the median)");

namespace {

using Clock = std::chrono::steady_clock;

struct Row {
  std::string what;
  double per_second = 0;
  double p50_us = 0;
  double p99_us = 0;
  double verdict_p50_us = 0;  // inside kvmid: event received -> reply written (observer)
  // The two halves of a remote verdict (p50): kvmid received the event -> the handler read it,
  // and the handler began writing its verdict -> kvmid wrote the reply to the guest.
  double out_p50_us = 0;
  double back_p50_us = 0;
};

// When the handler read each event and when it started writing its verdict (same process and
// clock as kvmid in this bench), by event id.
struct HandlerTimes {
  std::mutex mutex;
  std::unordered_map<uint64_t, std::pair<Clock::time_point, Clock::time_point>> by_event;
};

double Percentile(std::vector<double> v, double q) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v[static_cast<size_t>(q * static_cast<double>(v.size() - 1))];
}

class EchoService final : public kvmid::bench::Echo::Service {
  grpc::Status Chat(grpc::ServerContext*,
                    grpc::ServerReaderWriter<kvmid::bench::EchoMessage, kvmid::bench::EchoMessage>*
                        stream) override {
    kvmid::bench::EchoMessage m;
    while (stream->Read(&m)) {
      if (!stream->Write(m)) break;
    }
    return grpc::Status::OK;
  }
};

// The bench's PKI: a CA, a server certificate for 127.0.0.1, the handler's client certificate.
struct BenchTls {
  kvmid::security::testing::TestCerts certs;
  kvmid::security::TlsFiles server_files;
  std::shared_ptr<grpc::ChannelCredentials> client;
  static constexpr const char* kHandler = "spiffe://kvmid.bench/handler";
  absl::Status Make() {
    absl::Status s = certs.Ca("ca");
    if (s.ok()) s = certs.Leaf("server", "ca", "localhost", "DNS:localhost,IP:127.0.0.1", true);
    if (s.ok()) s = certs.Leaf("handler", "ca", "handler", std::string("URI:") + kHandler);
    if (!s.ok()) return s;
    server_files.cert = certs.pem("server");
    server_files.key = certs.key("server");
    server_files.client_ca = certs.pem("ca");
    grpc::SslCredentialsOptions options;
    options.pem_root_certs = kvmid::security::testing::TestCerts::ReadFile(certs.pem("ca"));
    options.pem_private_key = kvmid::security::testing::TestCerts::ReadFile(certs.key("handler"));
    options.pem_cert_chain = kvmid::security::testing::TestCerts::ReadFile(certs.pem("handler"));
    client = grpc::SslCredentials(options);
    return absl::OkStatus();
  }
};

std::shared_ptr<grpc::ChannelCredentials> CredentialsFor(const std::string& target,
                                                         const BenchTls& tls) {
  return target.rfind("unix:", 0) == 0 ? grpc::InsecureChannelCredentials() : tls.client;
}

Row MeasureEcho(const std::string& name, const std::string& target, double seconds,
                const BenchTls& tls) {
  std::vector<double> rtts =
      kvmid::bench::EchoRoundTrips(target, seconds, CredentialsFor(target, tls));
  return Row{name, rtts.size() / seconds, Percentile(rtts, 0.5), Percentile(rtts, 0.99)};
}

// The remote handler: answers every event CONTINUE as soon as it arrives.
void RunHandler(const std::string& target, std::shared_ptr<grpc::ChannelCredentials> credentials,
                std::atomic<bool>* stop, std::atomic<bool>* ready, HandlerTimes* times) {
  auto stub = kvmi::v1::Introspection::NewStub(grpc::CreateChannel(target, credentials));
  grpc::ClientContext ctx;
  auto stream = stub->Attach(&ctx);
  kvmi::v1::AttachRequest claim;
  claim.mutable_claim()->set_handler_id("bench");
  claim.mutable_claim()->add_events(kvmi::v1::EVENT_CR);
  claim.mutable_claim()->add_arm_events(kvmi::v1::EVENT_CR);
  claim.mutable_claim()->add_arm_crs(3);
  stream->Write(claim);
  kvmi::v1::AttachResponse response;
  stream->Read(&response);  // Claimed
  *ready = true;
  std::thread canceller([&] {
    while (!*stop) std::this_thread::sleep_for(std::chrono::milliseconds(20));
    ctx.TryCancel();
  });
  kvmi::v1::AttachRequest verdict;
  while (stream->Read(&response)) {
    if (!response.has_event()) continue;
    Clock::time_point read = Clock::now();
    verdict.mutable_verdict()->set_event_id(response.event().id());
    verdict.mutable_verdict()->set_action(kvmi::v1::ACTION_CONTINUE);
    {
      std::lock_guard<std::mutex> lock(times->mutex);
      times->by_event[response.event().id()] = {read, Clock::now()};
    }
    if (!stream->Write(verdict)) break;
  }
  canceller.join();
}

// One guest, one vCPU writing CR3 in a closed loop against kvmid at `kvmi_socket`; empty
// `api_target`: answered by kvmid's policy, else by a remote handler on that API endpoint.
Row MeasureGuest(kvmid::Daemon* daemon, const std::string& name, const std::string& kvmi_socket,
                 const std::string& api_target, double seconds, const BenchTls& tls) {
  // kvmid's own view of each verdict: event received -> reply written. For a remote verdict this
  // is the gRPC round trip to the handler plus kvmid's dispatch, without the guest's side.
  std::mutex latencies_mutex;
  std::vector<double> latencies, outs, backs;
  std::atomic<bool> measuring{false};
  HandlerTimes times;
  uint64_t observer = daemon->pipeline().AddObserver([&](const kvmid::ObservedEvent& observed) {
    if (!measuring) return;
    Clock::time_point written = Clock::now();
    auto micros = [](Clock::duration d) {
      return std::chrono::duration<double, std::micro>(d).count();
    };
    std::optional<std::pair<Clock::time_point, Clock::time_point>> handled;
    {
      std::lock_guard<std::mutex> lock(times.mutex);
      auto it = times.by_event.find(observed.event_id);
      if (it != times.by_event.end()) {
        handled = it->second;
        times.by_event.erase(it);
      }
    }
    std::lock_guard<std::mutex> lock(latencies_mutex);
    latencies.push_back(micros(observed.latency));
    if (handled) {
      outs.push_back(micros(handled->first - (written - observed.latency)));
      backs.push_back(micros(written - handled->second));
    }
  });
  std::atomic<bool> stop{false}, ready{api_target.empty()};
  std::thread handler;
  if (!api_target.empty()) {
    handler =
        std::thread(RunHandler, api_target, CredentialsFor(api_target, tls), &stop, &ready, &times);
  }
  while (!ready) std::this_thread::sleep_for(std::chrono::milliseconds(5));
  kvmi::sim::FleetConfig config;
  config.vms = 1;
  config.guest.vcpus = 1;
  config.connector.endpoint.family = kvmi::Endpoint::Family::kUnix;
  config.connector.endpoint.path = kvmi_socket;
  kvmi::sim::Scenario cr3;
  cr3.weights[static_cast<size_t>(kvmi::sim::OpKind::kWriteCr3)] = 1;
  cr3.ops_per_second = 0;
  config.workload = cr3;
  kvmi::sim::Fleet fleet(config);
  fleet.Start();
  auto events = [&] {
    kvmi::host::EngineStats stats;
    fleet.AggregateStats(&stats);
    return stats.events_sent[KVMI_EVENT_CR].load();
  };
  auto ready_deadline = Clock::now() + std::chrono::seconds(30);
  while (events() < 100 && Clock::now() < ready_deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  uint64_t before = events();
  auto t0 = Clock::now();
  measuring = true;
  std::this_thread::sleep_for(std::chrono::duration<double>(seconds));
  measuring = false;
  uint64_t after = events();
  double elapsed = std::chrono::duration<double>(Clock::now() - t0).count();
  kvmi::host::EngineStats stats;
  fleet.AggregateStats(&stats);
  fleet.Stop();
  stop = true;
  if (handler.joinable()) handler.join();
  double rate = (after - before) / elapsed;
  Row row{name, rate, 0, 0};
  row.p50_us = static_cast<double>(stats.round_trip.PercentileMicros(0.5));
  row.p99_us = static_cast<double>(stats.round_trip.PercentileMicros(0.99));
  daemon->pipeline().RemoveObserver(observer);
  std::lock_guard<std::mutex> lock(latencies_mutex);
  row.verdict_p50_us = Percentile(latencies, 0.5);
  row.out_p50_us = Percentile(outs, 0.5);
  row.back_p50_us = Percentile(backs, 0.5);
  return row;
}

}  // namespace

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  spdlog::set_level(spdlog::level::err);
  double seconds = absl::GetFlag(FLAGS_seconds);
  char dir_template[] = "/tmp/kvmid-rbench-XXXXXX";
  std::string dir = mkdtemp(dir_template);
  const int rounds = std::max(1, absl::GetFlag(FLAGS_rounds));
  BenchTls tls;
  if (absl::Status made = tls.Make(); !made.ok()) {
    std::fprintf(stderr, "certificates: %s\n", made.ToString().c_str());
    return 1;
  }
  auto server_tls = kvmid::security::MutualTlsServerCredentials(tls.server_files);
  if (!server_tls.ok()) {
    std::fprintf(stderr, "TLS: %s\n", server_tls.status().ToString().c_str());
    return 1;
  }
  kvmid::config::Authz authz;
  auto* binding = authz.add_bindings();
  binding->set_principal(BenchTls::kHandler);
  binding->set_role("admin");
  auto authorizer = kvmid::security::Authorizer::FromConfig(authz);
  if (!authorizer.ok()) return 1;

  // Each round measures every row once, so a remote row is compared with the echo measured
  // seconds before it (this host's speed drifts). Only the server being measured is up: gRPC's
  // pollers are process-wide, and an idle server's threads would poll for the measured one.
  std::vector<double> verdict_ratio[2], guest_ratio[2];  // per round; [0] unix, [1] tcp
  for (int round = 1; round <= rounds; ++round) {
    std::vector<Row> rows;
    {
      EchoService echo;
      grpc::ServerBuilder builder;
      int port = 0;
      builder.AddListeningPort("unix:" + dir + "/echo.sock", grpc::InsecureServerCredentials());
      builder.AddListeningPort("127.0.0.1:0", *server_tls, &port);
      builder.RegisterService(&echo);
      auto server = builder.BuildAndStart();
      rows.push_back(
          MeasureEcho("bare gRPC bidi echo, unix", "unix:" + dir + "/echo.sock", seconds, tls));
      rows.push_back(MeasureEcho("bare gRPC bidi echo, tcp (mTLS)",
                                 "127.0.0.1:" + std::to_string(port), seconds, tls));
      server->Shutdown();
      ::unlink((dir + "/echo.sock").c_str());
    }
    Row local;
    {
      kvmid::DaemonConfig config;
      config.unix_socket = dir + "/kvmi-local.sock";
      config.io_threads = 1;
      kvmid::Daemon daemon(config);
      if (!daemon.ApplyPolicy(kvmid::bench::AllowCr3Rule()).ok()) return 1;
      if (!daemon.Start().ok()) return 1;
      local = MeasureGuest(&daemon, "local policy verdict (no remote hop)", config.unix_socket, "",
                           seconds, tls);
      daemon.Shutdown(std::chrono::milliseconds(0));
    }
    {
      kvmid::DaemonConfig config;
      config.unix_socket = dir + "/kvmi.sock";
      config.io_threads = 1;
      kvmid::Daemon daemon(config);
      daemon.authorizer().Set(*authorizer);
      if (!daemon.Start().ok()) return 1;
      kvmid::ApiServer api(&daemon);
      kvmid::security::ApiListenOptions listen;
      listen.unix_socket = dir + "/api.sock";
      listen.tcp = "127.0.0.1:0";
      listen.tls = tls.server_files;
      if (!api.Start(listen).ok()) return 1;
      rows.push_back(MeasureGuest(&daemon, "remote verdict (Attach), unix", config.unix_socket,
                                  "unix:" + dir + "/api.sock", seconds, tls));
      rows.push_back(MeasureGuest(&daemon, "remote verdict (Attach), tcp (mTLS)",
                                  config.unix_socket, "127.0.0.1:" + std::to_string(api.tcp_port()),
                                  seconds, tls));
      api.Shutdown();
      daemon.Shutdown(std::chrono::milliseconds(0));
    }

    // Two views of each row: the guest's round trip (p50/p99, the simulator's histogram: KVMI
    // event out -> reply in, which includes the simulator's and kvmid's loop wake-ups), and
    // kvmid's own verdict time (event received -> reply written, exact): for a remote verdict
    // that is the gRPC round trip to the handler plus kvmid's dispatch, the part a bare echo is
    // the floor for.
    std::printf("\nround %d of %d\n", round, rounds);
    std::printf(
        "| path | round trips/s | guest p50 (us) | guest p99 (us) | p50 vs echo | verdict in "
        "kvmid p50 (us) | verdict vs echo | kvmid -> handler p50 (us) | handler -> reply p50 "
        "(us) |\n");
    std::printf("|---|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    std::printf("| %s | %.0f | %.0f | %.0f | | %.1f | | | |\n", local.what.c_str(),
                local.per_second, local.p50_us, local.p99_us, local.verdict_p50_us);
    for (size_t i = 0; i < rows.size(); ++i) {
      const Row& r = rows[i];
      const Row& echo_row = rows[i % 2];  // unix rows pair with unix echo, tcp with tcp
      bool remote = i >= 2;
      double verdict = remote ? r.verdict_p50_us : r.p50_us;
      double guest_vs_echo = echo_row.p50_us > 0 ? r.p50_us / echo_row.p50_us : 0.0;
      double verdict_vs_echo = echo_row.p50_us > 0 ? verdict / echo_row.p50_us : 0.0;
      std::printf("| %s | %.0f | %.0f | %.0f | %.2fx | %.1f | %.2fx |", r.what.c_str(),
                  r.per_second, r.p50_us, r.p99_us, guest_vs_echo, verdict, verdict_vs_echo);
      if (remote) {
        std::printf(" %.1f | %.1f |\n", r.out_p50_us, r.back_p50_us);
        verdict_ratio[i % 2].push_back(verdict_vs_echo);
        guest_ratio[i % 2].push_back(guest_vs_echo);
      } else {
        std::printf(" | |\n");
      }
    }
    std::fflush(stdout);
  }
  ::rmdir(dir.c_str());

  std::printf(
      "\n(echo: exact per-message timings; guest: the simulator's histogram, bucket upper "
      "bounds ~19%% wide)\n");
  std::printf("\nmedian over %d rounds | verdict in kvmid vs echo | guest p50 vs echo |\n", rounds);
  std::printf("|---|---:|---:|\n");
  const char* transports[2] = {"unix", "tcp"};
  for (int t = 0; t < 2; ++t) {
    std::printf("| remote verdict, %s | %.2fx | %.2fx |\n", transports[t],
                Percentile(verdict_ratio[t], 0.5), Percentile(guest_ratio[t], 0.5));
  }
  return 0;
}
