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
// One vCPU, closed loop, so throughput is 1 / round trip. In each round the echo and the remote
// verdict are measured in alternating slices (--latency_slices, default 6 of seconds/6: echo then
// verdict, verdict then echo, ...) and each row's samples pooled, so that both see the same
// moments of the machine.
// Then throughput with many waiting vCPUs (--vcpus, default 16 and 256): that many simulated
// guests with one vCPU each write CR3 in a closed loop, every event claimed by ONE Attach stream
// whose handler (one thread, sync client) answers CONTINUE as fast as it reads, next to the same
// fleet answered by the in-daemon policy. kvmid has one I/O thread in every row, and
// limits.max_held_events_per_handler raised so that one handler may hold every waiting event.
// Each throughput row also says what kvmid's threads cost per verdict, as the scheduler counted
// them (/proc/self/task/TID/schedstat): CPU time, and how often they were put on a CPU. On a
// noisy machine these move less than the verdicts per second do.
// Prints tables (docs/PERFORMANCE.md) with the CPU model and the load average of the machine.
//
//   bazel run -c opt //tests/bench:remote_verdict_bench -- --seconds=3 --rounds=3
// (--nolatency --vcpus=16: the 16-vCPU throughput rows alone, e.g. under a profiler.)
#include <absl/flags/flag.h>
#include <absl/flags/parse.h>
#include <absl/strings/numbers.h>
#include <absl/strings/str_split.h>
#include <grpcpp/grpcpp.h>
#include <pthread.h>
#include <spdlog/spdlog.h>
#include <stdlib.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <fstream>
#include <limits>
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include "common/program.h"
#include "daemon/api/server.h"
#include "daemon/kvmid.h"
#include "daemon/security/authz.h"
#include "daemon/security/credentials.h"
#include "daemon/security/testing/test_certs.h"
#include "daemon/testing/threads.h"
#include "kernel/sim/fleet.h"
#include "tests/bench/bench_policies.h"
#include "tests/bench/echo.grpc.pb.h"
#include "tests/bench/echo_client.h"

ABSL_FLAG(double, seconds, 3.0, "measurement window per row and round");
ABSL_FLAG(
    bool, release_absl_mutexes, true,
    "Abseil's mutexes without the debug deadlock graph, as in kvmid (false: Debian's default)");
ABSL_FLAG(bool, grpc_poll_engine, true,
          "gRPC's \"poll\" polling engine, as in kvmid (common/program.h; false: gRPC's default, "
          "epoll1)");
ABSL_FLAG(bool, beside_callback, true,
          "after the rounds, measure the echo beside a callback-API service once (gRPC's callback "
          "threads then stay for the rest of the process)");
ABSL_FLAG(int, io_nice, kvmid::kDefaultIoNice,
          "kvmid's io_nice (its I/O thread's nice value; the handler and echo threads keep 0)");
ABSL_FLAG(bool, consume_on_reply, true,
          "kvmid leaves a guest's event bytes in its socket until the reply (one wake-up of the "
          "host's receive thread per event instead of two); false: it takes them when it reads");
ABSL_FLAG(int, io_idle_yields, kvmid::DaemonConfig().io_idle_yields,
          "kvmid's io_idle_yields (yields of its I/O thread before it sleeps)");
ABSL_FLAG(bool, latency, true,
          "measure the latency rows (1 vCPU: the local policy, the bare echo and the remote "
          "verdict); false: only the throughput table (--vcpus)");
ABSL_FLAG(int, rounds, 3, "rounds; each measures every row once (the summary takes the median)");
ABSL_FLAG(
    int, latency_slices, 6,
    "each round measures the bare echo and the remote verdict in this many alternating "
    "slices of seconds/latency_slices (echo first, then the verdict first, in turn) and pools "
    "their samples, so that both are measured in the same moments of a machine whose speed "
    "drifts; 1: one window each, the echo first");
// --vcpus at most; kvmid's limits.max_held_events_per_handler is raised to it (default 128).
constexpr uint32_t kMaxVcpus = 1000;

ABSL_FLAG(uint32_t, max_batch, 64,
          "Claim.max_batch of the batched throughput rows (events per message; verdicts answered "
          "with one VerdictBatch per batch)");
ABSL_FLAG(std::string, vcpus, "16,256",
          "waiting vCPU counts of the throughput table (guests of one vCPU each; empty: none)");

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
  // Remote rows: verdicts in the window that did not come from the handler (a deadline's
  // fallback): a remote row counts only if this is 0.
  uint64_t not_by_handler = 0;
  // Remote rows: events per message the handler read (above 1 only with Claim.max_batch).
  double events_per_message = 0;
  // What the scheduler counted for kvmid's threads (named kvmid-*) in the window, per verdict:
  // CPU time, and how often one of them was put on a CPU (wake-ups, returns after preemption).
  double kvmid_cpu_us = 0;
  double kvmid_slices = 0;
  // The rest of the process in the same window, per verdict (CPU time): the handler's thread,
  // the simulated host side (vCPU threads and KVMI receive threads), everything else (gRPC's own
  // threads, the bench). With kvmid's, the whole cost of a verdict on this machine.
  double handler_cpu_us = 0;
  double host_cpu_us = 0;
  double other_cpu_us = 0;
};

// The scheduler's counts of a set of this process's threads (by name prefix) from one moment to
// the next; a thread that ends in between drops out.
class ThreadGroupUsage {
 public:
  explicit ThreadGroupUsage(std::string prefix) : prefix_(std::move(prefix)) {}
  void Start() {
    start_.clear();
    for (const kvmid::testing::ThreadEntry& thread : kvmid::testing::ListThreads()) {
      if (thread.name.rfind(prefix_, 0) == 0) {
        start_[thread.tid] = kvmid::testing::ReadSchedStat(thread.tid);
      }
    }
  }
  kvmid::testing::SchedStat Since() const {
    kvmid::testing::SchedStat sum;
    for (const auto& [tid, start] : start_) {
      kvmid::testing::SchedStat now = kvmid::testing::ReadSchedStat(tid);
      if (now.timeslices < start.timeslices) continue;  // gone
      sum.cpu_ns += now.cpu_ns - start.cpu_ns;
      sum.timeslices += now.timeslices - start.timeslices;
    }
    return sum;
  }

 private:
  const std::string prefix_;
  std::map<pid_t, kvmid::testing::SchedStat> start_;
};

// The remote handler's thread, by name (its CPU time is counted apart).
constexpr char kHandlerThread[] = "bench-handler";

// What the handler read: messages with events, and events.
struct HandlerCounts {
  std::atomic<uint64_t> messages{0};
  std::atomic<uint64_t> events{0};
};

// When the handler read each event and when it started writing its verdict (same process and
// clock as kvmid in this bench), by event id.
struct HandlerTimes {
  std::mutex mutex;
  std::unordered_map<uint64_t, std::pair<Clock::time_point, Clock::time_point>> by_event;
};

// The samples of one latency row, pooled over a round's slices.
struct LatencySamples {
  std::vector<double> round_trips;  // echo: each round trip (us)
  // Guest rows: kvmid's verdict time and its halves (us), and the simulator's histogram.
  std::vector<double> verdicts, outs, backs;
  kvmi::host::LatencyHistogram guest;
  uint64_t count = 0;  // round trips (echo) or verdicts (guest)
  double seconds = 0;  // the windows' total
  uint64_t not_by_handler = 0;
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

// A callback-API service beside the echo, as every kvmid process had before issue 14 (StreamEvents,
// WatchVMs, Attach, grpc.health.v1 were callback services): gRPC serves the callback API from a
// process-wide completion queue whose own threads poll the same epoll set as everyone else
// (grpc_flavors_bench). Never called. Those threads, once started, stay for the rest of the
// process, so this row is measured once, after every round.
class CallbackSide final : public kvmid::bench::Side::CallbackService {
  grpc::ServerUnaryReactor* Ping(grpc::CallbackServerContext* context,
                                 const kvmid::bench::EchoMessage* request,
                                 kvmid::bench::EchoMessage* response) override {
    *response = *request;
    auto* reactor = context->DefaultReactor();
    reactor->Finish(grpc::Status::OK);
    return reactor;
  }
};

// The machine, printed with every table: the CPU model and the load average now.
std::string CpuModel() {
  std::ifstream cpuinfo("/proc/cpuinfo");
  std::string line;
  while (std::getline(cpuinfo, line)) {
    if (line.rfind("model name", 0) == 0) {
      size_t colon = line.find(':');
      return colon == std::string::npos ? line : line.substr(colon + 2);
    }
  }
  return "unknown";
}

std::string LoadAverage() {
  std::ifstream loadavg("/proc/loadavg");
  std::string one, five, fifteen;
  loadavg >> one >> five >> fifteen;
  return one + ", " + five + ", " + fifteen;
}

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

void SampleEcho(const std::string& target, double seconds, const BenchTls& tls,
                LatencySamples* pool) {
  std::vector<double> rtts =
      kvmid::bench::EchoRoundTrips(target, seconds, CredentialsFor(target, tls));
  pool->count += rtts.size();
  pool->seconds += seconds;
  pool->round_trips.insert(pool->round_trips.end(), rtts.begin(), rtts.end());
}

Row EchoRow(const std::string& name, const LatencySamples& pool) {
  return Row{name, pool.seconds > 0 ? pool.count / pool.seconds : 0,
             Percentile(pool.round_trips, 0.5), Percentile(pool.round_trips, 0.99)};
}

// The remote handler: answers every event CONTINUE as soon as it arrives, one thread on one
// stream (reads an Event, writes its Verdict, in turn).
// `max_batch` above 1: the claim asks for batches, and a batch is answered with one VerdictBatch.
void RunHandler(const std::string& target, std::shared_ptr<grpc::ChannelCredentials> credentials,
                std::atomic<bool>* stop, std::atomic<bool>* ready, HandlerTimes* times,
                uint32_t max_batch, HandlerCounts* counts) {
  pthread_setname_np(pthread_self(), kHandlerThread);
  auto stub = kvmi::v1::Introspection::NewStub(grpc::CreateChannel(target, credentials));
  grpc::ClientContext ctx;
  auto stream = stub->Attach(&ctx);
  kvmi::v1::AttachRequest claim;
  claim.mutable_claim()->set_handler_id("bench");
  claim.mutable_claim()->add_events(kvmi::v1::EVENT_TYPE_CR);
  claim.mutable_claim()->add_arm_events(kvmi::v1::EVENT_TYPE_CR);
  claim.mutable_claim()->add_arm_crs(3);
  // The longest deadline kvmid allows (max_attach_deadline_ms): the throughput rows measure a
  // handler that keeps up, and count the fallbacks if it did not.
  claim.mutable_claim()->set_deadline_ms(5000);
  claim.mutable_claim()->set_max_batch(max_batch);
  stream->Write(claim);
  kvmi::v1::AttachResponse response;
  stream->Read(&response);  // Claimed
  *ready = true;
  std::thread canceller([&] {
    while (!*stop) std::this_thread::sleep_for(std::chrono::milliseconds(20));
    ctx.TryCancel();
  });
  kvmi::v1::AttachRequest verdict, verdicts;
  while (stream->Read(&response)) {
    if (response.has_events()) {
      counts->messages++;
      counts->events += response.events().events_size();
      verdicts.Clear();
      for (const kvmi::v1::Event& event : response.events().events()) {
        kvmi::v1::Verdict* v = verdicts.mutable_verdicts()->add_verdicts();
        v->set_event_id(event.id());
        v->set_action(kvmi::v1::ACTION_CONTINUE);
      }
      if (!stream->Write(verdicts)) break;
      continue;
    }
    if (!response.has_event()) continue;
    counts->messages++;
    counts->events++;
    Clock::time_point read = Clock::now();
    verdict.mutable_verdict()->set_event_id(response.event().id());
    verdict.mutable_verdict()->set_action(kvmi::v1::ACTION_CONTINUE);
    if (times != nullptr) {
      std::lock_guard<std::mutex> lock(times->mutex);
      times->by_event[response.event().id()] = {read, Clock::now()};
    }
    if (!stream->Write(verdict)) break;
  }
  canceller.join();
}

// `guests` guests of one vCPU each writing CR3 in a closed loop against kvmid at `kvmi_socket`;
// empty `api_target`: answered by kvmid's policy, else by a remote handler on that API endpoint.
// `detail`: kvmid's verdict time and its two halves too (an observer and the handler's
// timestamps: a lock and a map entry per event, so not in the throughput rows).
// `pool`: the window's samples are added to it too (a latency row measured in slices).
Row MeasureGuest(kvmid::Daemon* daemon, const std::string& name, const std::string& kvmi_socket,
                 const std::string& api_target, double seconds, const BenchTls& tls,
                 uint32_t guests = 1, bool detail = true, uint32_t max_batch = 0,
                 LatencySamples* pool = nullptr) {
  // kvmid's own view of each verdict: event received -> reply written. For a remote verdict this
  // is the gRPC round trip to the handler plus kvmid's dispatch, without the guest's side.
  std::mutex latencies_mutex;
  std::vector<double> latencies, outs, backs;
  std::atomic<bool> measuring{false};
  HandlerTimes times;
  std::atomic<uint64_t> not_by_handler{0};
  uint64_t observer = daemon->pipeline().AddObserver([&](const kvmid::ObservedEvent& observed) {
    if (!measuring) return;
    if (!api_target.empty() && observed.verdict.decided_by.rfind("handler:", 0) != 0) {
      ++not_by_handler;
    }
    if (!detail) return;
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
  HandlerCounts counts;
  if (!api_target.empty()) {
    handler = std::thread(RunHandler, api_target, CredentialsFor(api_target, tls), &stop, &ready,
                          detail ? &times : nullptr, max_batch, &counts);
  }
  while (!ready) std::this_thread::sleep_for(std::chrono::milliseconds(5));
  kvmi::sim::FleetConfig config;
  config.vms = guests;
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
  while ((events() < 100 * guests || fleet.hooked_count() < guests) &&
         Clock::now() < ready_deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  ThreadGroupUsage kvmid_threads("kvmid-"), handler_threads(kHandlerThread),
      vcpu_threads("sim-vcpu"), receive_threads("kvmi-recv"), all_threads("");
  for (ThreadGroupUsage* group :
       {&kvmid_threads, &handler_threads, &vcpu_threads, &receive_threads, &all_threads}) {
    group->Start();
  }
  uint64_t before = events();
  auto t0 = Clock::now();
  measuring = true;
  std::this_thread::sleep_for(std::chrono::duration<double>(seconds));
  measuring = false;
  uint64_t after = events();
  const kvmid::testing::SchedStat kvmid_usage = kvmid_threads.Since();
  const uint64_t handler_ns = handler_threads.Since().cpu_ns;
  const uint64_t host_ns = vcpu_threads.Since().cpu_ns + receive_threads.Since().cpu_ns;
  const uint64_t all_ns = all_threads.Since().cpu_ns;
  double elapsed = std::chrono::duration<double>(Clock::now() - t0).count();
  kvmi::host::EngineStats stats;
  fleet.AggregateStats(&stats);
  if (fleet.hooked_count() < guests) {
    std::fprintf(stderr, "%s: %zu of %u guests hooked\n", name.c_str(), fleet.hooked_count(),
                 guests);
  }
  fleet.Stop();
  stop = true;
  if (handler.joinable()) handler.join();
  double rate = (after - before) / elapsed;
  Row row{name, rate, 0, 0};
  row.not_by_handler = not_by_handler;
  if (after > before) {
    const double verdicts = static_cast<double>(after - before);
    row.kvmid_cpu_us = kvmid_usage.cpu_ns / 1e3 / verdicts;
    row.kvmid_slices = kvmid_usage.timeslices / verdicts;
    row.handler_cpu_us = handler_ns / 1e3 / verdicts;
    row.host_cpu_us = host_ns / 1e3 / verdicts;
    const uint64_t named = kvmid_usage.cpu_ns + handler_ns + host_ns;
    row.other_cpu_us = all_ns > named ? (all_ns - named) / 1e3 / verdicts : 0;
  }
  row.events_per_message =
      counts.messages > 0 ? static_cast<double>(counts.events) / counts.messages : 0;
  row.p50_us = static_cast<double>(stats.round_trip.PercentileMicros(0.5));
  row.p99_us = static_cast<double>(stats.round_trip.PercentileMicros(0.99));
  daemon->pipeline().RemoveObserver(observer);
  std::lock_guard<std::mutex> lock(latencies_mutex);
  row.verdict_p50_us = Percentile(latencies, 0.5);
  row.out_p50_us = Percentile(outs, 0.5);
  row.back_p50_us = Percentile(backs, 0.5);
  if (pool != nullptr) {
    pool->count += after - before;
    pool->seconds += elapsed;
    pool->not_by_handler += row.not_by_handler;
    pool->guest.MergeFrom(stats.round_trip);
    pool->verdicts.insert(pool->verdicts.end(), latencies.begin(), latencies.end());
    pool->outs.insert(pool->outs.end(), outs.begin(), outs.end());
    pool->backs.insert(pool->backs.end(), backs.begin(), backs.end());
  }
  return row;
}

// A guest row from its pooled samples.
Row GuestRow(const std::string& name, const LatencySamples& pool) {
  Row row{name, pool.seconds > 0 ? pool.count / pool.seconds : 0,
          static_cast<double>(pool.guest.PercentileMicros(0.5)),
          static_cast<double>(pool.guest.PercentileMicros(0.99))};
  row.not_by_handler = pool.not_by_handler;
  row.verdict_p50_us = Percentile(pool.verdicts, 0.5);
  row.out_p50_us = Percentile(pool.outs, 0.5);
  row.back_p50_us = Percentile(pool.backs, 0.5);
  return row;
}

}  // namespace

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  // As kvmid's main (common/program.h): gRPC's locks without the debug deadlock graph.
  if (absl::GetFlag(FLAGS_release_absl_mutexes)) kvmid::UseReleaseAbslMutexes();
  if (absl::GetFlag(FLAGS_grpc_poll_engine)) kvmid::UseGrpcPollEngine();
  spdlog::set_level(spdlog::level::err);
  double seconds = absl::GetFlag(FLAGS_seconds);
  char dir_template[] = "/tmp/kvmid-rbench-XXXXXX";
  std::string dir = mkdtemp(dir_template);
  const int rounds = std::max(1, absl::GetFlag(FLAGS_rounds));
  const int slices = std::max(1, absl::GetFlag(FLAGS_latency_slices));
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

  std::vector<uint32_t> vcpu_counts;
  for (absl::string_view part :
       absl::StrSplit(absl::GetFlag(FLAGS_vcpus), ',', absl::SkipEmpty())) {
    uint32_t n = 0;
    if (!absl::SimpleAtoi(part, &n) || n == 0 || n > kMaxVcpus) {
      std::fprintf(stderr, "--vcpus: '%s' is not a count in 1..%u\n", std::string(part).c_str(),
                   kMaxVcpus);
      return 1;
    }
    vcpu_counts.push_back(n);
  }
  const char* engine = ::getenv("GRPC_POLL_STRATEGY");
  std::printf("CPU: %s, %u online; load average at start: %s; gRPC polling engine: %s\n",
              CpuModel().c_str(), std::thread::hardware_concurrency(), LoadAverage().c_str(),
              engine != nullptr ? engine : "gRPC's default (epoll1)");

  // gRPC's default health service (a callback service) is a process-wide switch: the echo
  // servers are built with it off (a bare echo). kvmid serves its own health service and no
  // callback-API method (daemon/api/async_reactor.h); the echo beside a callback service is
  // measured once, after the rounds.
  // The echo over both transports for `secs`, its samples added to pools[0] (unix), [1] (tcp).
  auto sample_echo = [&](bool beside_callback, double secs, LatencySamples pools[2]) {
    grpc::EnableDefaultHealthCheckService(false);
    EchoService echo;
    CallbackSide side;
    grpc::ServerBuilder builder;
    int port = 0;
    builder.AddListeningPort("unix:" + dir + "/echo.sock", grpc::InsecureServerCredentials());
    builder.AddListeningPort("127.0.0.1:0", *server_tls, &port);
    builder.RegisterService(&echo);
    if (beside_callback) builder.RegisterService(&side);
    auto server = builder.BuildAndStart();
    SampleEcho("unix:" + dir + "/echo.sock", secs, tls, &pools[0]);
    SampleEcho("127.0.0.1:" + std::to_string(port), secs, tls, &pools[1]);
    server->Shutdown();
    ::unlink((dir + "/echo.sock").c_str());
  };
  auto start_kvmid = [&](const std::string& kvmi_socket, bool policy) {
    kvmid::DaemonConfig config;
    config.unix_socket = kvmi_socket;
    config.io_threads = 1;
    config.io_nice = absl::GetFlag(FLAGS_io_nice);
    config.io_idle_yields = absl::GetFlag(FLAGS_io_idle_yields);
    config.consume_on_reply = absl::GetFlag(FLAGS_consume_on_reply);
    auto daemon = std::make_unique<kvmid::Daemon>(config);
    daemon->authorizer().Set(*authorizer);
    // One handler holds every waiting vCPU's event: the operator's knob above the default 128.
    kvmid::security::Limits limits = daemon->limits();
    limits.max_held_events_per_handler =
        std::max<uint64_t>(limits.max_held_events_per_handler, kMaxVcpus);
    daemon->set_limits(limits);
    if (policy && !daemon->ApplyPolicy(kvmid::bench::AllowCr3Rule()).ok()) {
      return decltype(daemon)();
    }
    if (!daemon->Start().ok()) return decltype(daemon)();
    return daemon;
  };
  auto start_api = [&](kvmid::Daemon* daemon) {
    auto api = std::make_unique<kvmid::ApiServer>(daemon);
    kvmid::security::ApiListenOptions listen;
    listen.unix_socket = dir + "/api.sock";
    listen.tcp = "127.0.0.1:0";
    listen.tls = tls.server_files;
    if (!api->Start(listen).ok()) return decltype(api)();
    return api;
  };

  // Each round measures every row, so a remote row is compared with an echo measured in the same
  // seconds (this host's speed drifts; the latency rows in alternating slices, below). Only the
  // server being measured is up: gRPC's pollers are process-wide, and an idle server's threads
  // would poll for the measured one.
  // Per round; [0] unix, [1] tcp.
  std::vector<double> verdict_ratio[2], guest_ratio[2];
  std::vector<Row> last_echo;  // the last round's bare echo, unix and tcp
  std::vector<std::vector<double>> throughput_ratio(vcpu_counts.size());
  std::vector<std::vector<double>> batched_ratio(vcpu_counts.size());
  for (int round = 1; round <= rounds; ++round) {
    const std::string load_before = LoadAverage();
    Row local;
    std::vector<Row> rows;  // bare echo unix, tcp; remote unix, tcp
    if (absl::GetFlag(FLAGS_latency)) {
      {
        auto daemon = start_kvmid(dir + "/kvmi-local.sock", /*policy=*/true);
        if (!daemon) return 1;
        local = MeasureGuest(daemon.get(), "local policy verdict (no remote hop)",
                             dir + "/kvmi-local.sock", "", seconds, tls);
        daemon->Shutdown(std::chrono::milliseconds(0));
      }
      // The bare echo and the remote verdict in alternating slices (echo first, then the verdict
      // first, ...), samples pooled: a drift of this machine's speed within the round falls on both
      // alike instead of on whichever was measured in the slower seconds.
      LatencySamples echo_pool[2], remote_pool[2];  // [0] unix, [1] tcp
      const double slice_seconds = seconds / slices;
      auto remote_slice = [&]() -> bool {
        auto daemon = start_kvmid(dir + "/kvmi.sock", /*policy=*/false);
        if (!daemon) return false;
        auto api = start_api(daemon.get());
        if (!api) return false;
        MeasureGuest(daemon.get(), "", dir + "/kvmi.sock", "unix:" + dir + "/api.sock",
                     slice_seconds, tls, 1, /*detail=*/true, 0, &remote_pool[0]);
        MeasureGuest(daemon.get(), "", dir + "/kvmi.sock",
                     "127.0.0.1:" + std::to_string(api->tcp_port()), slice_seconds, tls, 1,
                     /*detail=*/true, 0, &remote_pool[1]);
        api->Shutdown();
        daemon->Shutdown(std::chrono::milliseconds(0));
        return true;
      };
      for (int slice = 0; slice < slices; ++slice) {
        if (slice % 2 == 0) sample_echo(false, slice_seconds, echo_pool);
        if (!remote_slice()) return 1;
        if (slice % 2 == 1) sample_echo(false, slice_seconds, echo_pool);
      }
      rows = {EchoRow("bare gRPC bidi echo, unix", echo_pool[0]),
              EchoRow("bare gRPC bidi echo, tcp (mTLS)", echo_pool[1]),
              GuestRow("remote verdict (Attach), unix", remote_pool[0]),
              GuestRow("remote verdict (Attach), tcp (mTLS)", remote_pool[1])};
      last_echo.assign(rows.begin(), rows.begin() + 2);
    }
    // Many waiting vCPUs: the policy path, then one handler over the UNIX socket.
    struct Throughput {
      Row policy, remote, batched;
    };
    std::vector<Throughput> throughput;
    for (uint32_t vcpus : vcpu_counts) {
      Throughput pair;
      {
        auto daemon = start_kvmid(dir + "/kvmi-local.sock", /*policy=*/true);
        if (!daemon) return 1;
        pair.policy = MeasureGuest(daemon.get(), "policy", dir + "/kvmi-local.sock", "", seconds,
                                   tls, vcpus, /*detail=*/false);
        daemon->Shutdown(std::chrono::milliseconds(0));
      }
      {
        auto daemon = start_kvmid(dir + "/kvmi.sock", /*policy=*/false);
        if (!daemon) return 1;
        auto api = start_api(daemon.get());
        if (!api) return 1;
        pair.remote =
            MeasureGuest(daemon.get(), "remote, one Attach stream (unix)", dir + "/kvmi.sock",
                         "unix:" + dir + "/api.sock", seconds, tls, vcpus, /*detail=*/false);
        pair.batched = MeasureGuest(daemon.get(), "remote, batched (unix)", dir + "/kvmi.sock",
                                    "unix:" + dir + "/api.sock", seconds, tls, vcpus,
                                    /*detail=*/false, absl::GetFlag(FLAGS_max_batch));
        api->Shutdown();
        daemon->Shutdown(std::chrono::milliseconds(0));
      }
      throughput.push_back(pair);
    }

    // Two views of each row: the guest's round trip (p50/p99, the simulator's histogram: KVMI
    // event out -> reply in, which includes the simulator's and kvmid's loop wake-ups), and
    // kvmid's own verdict time (event received -> reply written, exact): for a remote verdict
    // that is the gRPC round trip to the handler plus kvmid's dispatch, the part a bare echo is
    // the floor for.
    std::printf("\nround %d of %d (load average before: %s; after: %s)\n", round, rounds,
                load_before.c_str(), LoadAverage().c_str());
    if (!rows.empty()) {
      std::printf(
          "| path | round trips/s | guest p50 (us) | guest p99 (us) | p50 vs echo | verdict in "
          "kvmid p50 (us) | verdict vs echo | kvmid -> handler p50 (us) | handler -> reply p50 "
          "(us) |\n");
      std::printf("|---|---:|---:|---:|---:|---:|---:|---:|---:|\n");
      std::printf("| %s | %.0f | %.0f | %.0f | | %.1f | | | |\n", local.what.c_str(),
                  local.per_second, local.p50_us, local.p99_us, local.verdict_p50_us);
      auto print_echo = [&](const Row& r, const Row& bare) {
        std::printf("| %s | %.0f | %.0f | %.0f | %.2fx | %.1f | %.2fx | | |\n", r.what.c_str(),
                    r.per_second, r.p50_us, r.p99_us, bare.p50_us > 0 ? r.p50_us / bare.p50_us : 0,
                    r.p50_us, bare.p50_us > 0 ? r.p50_us / bare.p50_us : 0);
      };
      for (int t = 0; t < 2; ++t) print_echo(rows[t], rows[t]);
      for (int t = 0; t < 2; ++t) {
        const Row& r = rows[2 + t];
        const Row& echo_row = rows[t];  // unix rows pair with unix echo, tcp with tcp
        double guest_vs_echo = echo_row.p50_us > 0 ? r.p50_us / echo_row.p50_us : 0.0;
        double verdict_vs_echo = echo_row.p50_us > 0 ? r.verdict_p50_us / echo_row.p50_us : 0.0;
        std::printf("| %s | %.0f | %.0f | %.0f | %.2fx | %.1f | %.2fx | %.1f | %.1f |\n",
                    r.what.c_str(), r.per_second, r.p50_us, r.p99_us, guest_vs_echo,
                    r.verdict_p50_us, verdict_vs_echo, r.out_p50_us, r.back_p50_us);
        if (r.not_by_handler != 0) {
          // A deadline's fallback answered instead of the handler: the round fails its target.
          std::printf("(%s: %llu verdicts not by the handler: the round counts as over target)\n",
                      r.what.c_str(), static_cast<unsigned long long>(r.not_by_handler));
          verdict_vs_echo = guest_vs_echo = std::numeric_limits<double>::infinity();
        }
        verdict_ratio[t].push_back(verdict_vs_echo);
        guest_ratio[t].push_back(guest_vs_echo);
      }
    }
    if (!throughput.empty()) {
      std::printf(
          "\n| waiting vCPUs | policy verdicts/s | remote verdicts/s | remote vs policy | "
          "batched verdicts/s (max_batch %u) | batched vs policy | events per message, batched | "
          "policy guest p50/p99 (us) | remote guest p50/p99 (us) | batched guest p50/p99 (us) | "
          "kvmid CPU per verdict, policy / remote / batched (us) | kvmid threads put on a CPU per "
          "verdict, policy / remote / batched | remote verdicts not by the handler |\n",
          absl::GetFlag(FLAGS_max_batch));
      std::printf("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    }
    for (size_t i = 0; i < throughput.size(); ++i) {
      const Throughput& t = throughput[i];
      double ratio = t.policy.per_second > 0 ? t.remote.per_second / t.policy.per_second : 0.0;
      if (t.remote.not_by_handler != 0) ratio = 0;  // fallbacks are not remote verdicts
      double batched = t.policy.per_second > 0 ? t.batched.per_second / t.policy.per_second : 0.0;
      if (t.batched.not_by_handler != 0) batched = 0;
      throughput_ratio[i].push_back(ratio);
      batched_ratio[i].push_back(batched);
      std::printf(
          "| %u | %.0f | %.0f | %.2fx | %.0f | %.2fx | %.1f | %.0f/%.0f | %.0f/%.0f | %.0f/%.0f | "
          "%.1f / %.1f / %.1f | %.2f / %.2f / %.2f | %llu |\n",
          vcpu_counts[i], t.policy.per_second, t.remote.per_second, ratio, t.batched.per_second,
          batched, t.batched.events_per_message, t.policy.p50_us, t.policy.p99_us, t.remote.p50_us,
          t.remote.p99_us, t.batched.p50_us, t.batched.p99_us, t.policy.kvmid_cpu_us,
          t.remote.kvmid_cpu_us, t.batched.kvmid_cpu_us, t.policy.kvmid_slices,
          t.remote.kvmid_slices, t.batched.kvmid_slices,
          static_cast<unsigned long long>(t.remote.not_by_handler + t.batched.not_by_handler));
    }
    if (!throughput.empty()) {
      // Where each verdict's CPU went, every thread of the process counted: with the machine's
      // CPUs busy, verdicts/s is about the CPUs over the sum of these.
      std::printf(
          "\n| waiting vCPUs | row | CPU per verdict (us): kvmid | handler | host side (simulated "
          "vCPUs and KVMI receive threads) | rest of the process | all |\n");
      std::printf("|---:|---|---:|---:|---:|---:|---:|\n");
      for (size_t i = 0; i < throughput.size(); ++i) {
        for (const Row* r :
             {&throughput[i].policy, &throughput[i].remote, &throughput[i].batched}) {
          std::printf("| %u | %s | %.1f | %.1f | %.1f | %.1f | %.1f |\n", vcpu_counts[i],
                      r->what.c_str(), r->kvmid_cpu_us, r->handler_cpu_us, r->host_cpu_us,
                      r->other_cpu_us,
                      r->kvmid_cpu_us + r->handler_cpu_us + r->host_cpu_us + r->other_cpu_us);
        }
      }
    }
    std::fflush(stdout);
  }
  std::printf(
      "\n(echo: exact per-message timings; guest: the simulator's histogram, bucket upper "
      "bounds ~19%% wide)\n");
  std::printf(
      "\n| median over %d rounds | verdict in kvmid vs bare echo (target <= 1.20x) | guest p50 "
      "vs bare echo | target met (exact ratio) |\n",
      rounds);
  std::printf("|---|---:|---:|---|\n");
  // The verdict: on the unrounded medians (a printed 0.50x may be 0.497).
  auto met = [](bool ok) { return ok ? "yes" : "**no**"; };
  const char* transports[2] = {"unix", "tcp (mTLS)"};
  for (int t = 0; t < 2 && !verdict_ratio[t].empty(); ++t) {
    const double ratio = Percentile(verdict_ratio[t], 0.5);
    std::printf("| remote verdict, %s | %.2fx | %.2fx | %s (%.3f) |\n", transports[t], ratio,
                Percentile(guest_ratio[t], 0.5), met(ratio <= 1.2), ratio);
  }
  for (size_t i = 0; i < vcpu_counts.size(); ++i) {
    std::printf(
        "| %u waiting vCPUs: remote throughput, one event per message, vs policy | %.2fx | | "
        "|\n",
        vcpu_counts[i], Percentile(throughput_ratio[i], 0.5));
    const double batched = Percentile(batched_ratio[i], 0.5);
    std::printf(
        "| %u waiting vCPUs: remote throughput, batched, vs policy (target >= 0.50x) | %.2fx | | "
        "%s (%.3f) |\n",
        vcpu_counts[i], batched, met(batched >= 0.5), batched);
  }
  if (absl::GetFlag(FLAGS_beside_callback) && !last_echo.empty()) {
    // Last: it starts gRPC's callback threads, which stay for the rest of the process.
    LatencySamples beside_pool[2];
    sample_echo(true, seconds, beside_pool);
    const std::vector<Row> beside = {
        EchoRow("gRPC bidi echo beside a callback service, unix", beside_pool[0]),
        EchoRow("gRPC bidi echo beside a callback service, tcp (mTLS)", beside_pool[1])};
    std::printf(
        "\nWhat a callback-API service in the process costs (measured once, after the rounds; "
        "vs the last round's bare echo):\n\n| path | p50 (us) | p99 (us) | vs bare echo |\n"
        "|---|---:|---:|---:|\n");
    for (int t = 0; t < 2; ++t) {
      std::printf("| %s | %.1f | %.0f | %.2fx |\n", beside[t].what.c_str(), beside[t].p50_us,
                  beside[t].p99_us,
                  last_echo[t].p50_us > 0 ? beside[t].p50_us / last_echo[t].p50_us : 0.0);
    }
  }
  ::rmdir(dir.c_str());
  std::printf("\nload average at the end: %s\n", LoadAverage().c_str());
  return 0;
}
