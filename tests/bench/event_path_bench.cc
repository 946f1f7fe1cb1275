// The event path, measured: simulated guest vCPU exits (CR3 writes) -> KVMI event -> a tool's
// verdict -> reply -> the vCPU resumes. Two tools answer, in the same run on the same machine:
//   direct-loop  the least work any tool can do: one epoll thread that reads each event and writes
//                CONTINUE (decoded and encoded with the project's codec, nothing else);
//   kvmid        the real daemon core, one I/O thread, the event answered by an in-daemon policy;
//   kvmid policy + metrics  the same with Prometheus metrics on (daemon/metrics: the pipeline
//                observer counting every event and its verdict latency, the HTTP exposer up),
//                `--metrics` (default on); `--rounds=N` alternates the two N times and the summary
//                compares their median throughputs (the machine is shared: one pair is noisy).
// Closed loop: each guest has one vCPU that writes CR3 as fast as its events are answered, so
// throughput = guests / round trip. Prints a table (docs/PERFORMANCE.md has the figures).
//
//   bazel run -c opt //tests/bench:event_path_bench -- --guests=1,16,256 --seconds=3
//   bazel run -c opt //tests/bench:event_path_bench -- --guests=16 --rounds=5   (metrics cost)
#include <absl/flags/flag.h>
#include <absl/flags/parse.h>
#include <absl/strings/numbers.h>
#include <absl/strings/str_split.h>
#include <pthread.h>
#include <spdlog/spdlog.h>
#include <stdlib.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdio>
#include <map>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "common/program.h"
#include "daemon/event_log.h"
#include "daemon/kvmid.h"
#include "daemon/metrics/event_metrics.h"
#include "daemon/metrics/metrics_server.h"
#include "daemon/testing/threads.h"
#include "kernel/abi/events.h"
#include "kernel/abi/framing.h"
#include "kernel/abi/handshake.h"
#include "kernel/abi/messages.h"
#include "kernel/sim/fleet.h"
#include "kernel/transport/socket.h"
#include "tests/bench/bench_policies.h"

ABSL_FLAG(std::string, guests, "1,16,256", "guest counts to measure (one vCPU each)");
ABSL_FLAG(double, seconds, 3.0, "measurement window per row");
ABSL_FLAG(double, warmup_seconds, 0.5, "run before the window opens");
ABSL_FLAG(bool, metrics, true, "also measure kvmid with Prometheus metrics on");
ABSL_FLAG(int, rounds, 1, "kvmid rows (with and without metrics) per guest count, alternated");
ABSL_FLAG(int, toggle_pairs, 0,
          "metrics cost, interleaved: ONE daemon (with the binary's event log) and one fleet; the "
          "metrics observer (EventMetrics::Observe, what --metrics_address adds to each event) is "
          "added and removed every --toggle_seconds, this many on/off pairs per guest count, the "
          "order flipped every pair; medians of the per-pair ratios. 0 = off");
ABSL_FLAG(double, toggle_seconds, 0.25, "window of --toggle_pairs");
ABSL_FLAG(int, paired_windows, 0,
          "metrics cost, paired: two daemons (both with the binary's event log, one with metrics) "
          "serve two fleets AT THE SAME TIME for this many --seconds windows per guest count, "
          "twice with the sides swapped; the medians of the per-window ratios are printed. "
          "0 = off");

namespace {

using Clock = std::chrono::steady_clock;

// ---- the direct-loop responder -------------------------------------------------------------

class DirectLoopResponder {
 public:
  explicit DirectLoopResponder(std::string path) : path_(std::move(path)) {}
  ~DirectLoopResponder() { Stop(); }

  bool Start() {
    absl::StatusOr<kvmi::UniqueFd> listening = kvmi::ListenUnix(path_);
    if (!listening.ok()) {
      std::fprintf(stderr, "direct loop: %s\n", listening.status().ToString().c_str());
      return false;
    }
    listen_ = *std::move(listening);
    epoll_ = kvmi::UniqueFd(::epoll_create1(EPOLL_CLOEXEC));
    epoll_event ev{};
    ev.events = EPOLLIN;
    ev.data.fd = listen_.get();
    ::epoll_ctl(epoll_.get(), EPOLL_CTL_ADD, listen_.get(), &ev);
    thread_ = std::thread([this] {
      pthread_setname_np(pthread_self(), "direct-loop");
      Loop();
    });
    return true;
  }
  void Stop() {
    stop_ = true;
    if (thread_.joinable()) thread_.join();
    ::unlink(path_.c_str());
  }

 private:
  struct Conn {
    kvmi::UniqueFd fd;
    kvmi::MessageFramer framer{kvmi::kMaxReplyPayload};
    std::vector<uint8_t> out;
  };

  // Handshake and arming are done blocking, before the guest joins the loop: only the event
  // path is measured.
  void Admit(kvmi::UniqueFd fd) {
    auto deadline = Clock::now() + std::chrono::seconds(10);
    std::vector<uint8_t> hello(kvmi::kQemuHelloSize);
    if (!kvmi::ReadExact(fd.get(), hello.data(), hello.size(), deadline).ok()) return;
    std::vector<uint8_t> answer;
    kvmi::EncodeIntrospectorHello(kvmi::IntrospectorHello{}, &answer);
    if (!kvmi::WriteAll(fd.get(), answer.data(), answer.size(), deadline).ok()) return;
    auto conn = std::make_unique<Conn>();
    kvmi::MessageFramer& framer = conn->framer;  // bytes read past the last reply stay in it
    uint32_t seq = 1;
    auto call = [&](auto request) -> int32_t {
      std::vector<uint8_t> wire;
      kvmi::EncodeCommand(request, seq, &wire);
      kvmi::WriteAll(fd.get(), wire.data(), wire.size(), deadline);
      while (true) {
        kvmi::Frame frame;
        kvmi::DecodeStatus status;
        if (framer.Next(&frame, &status) == kvmi::MessageFramer::Result::kMessage) {
          kvmi::Reply reply;
          if (frame.hdr.seq == seq && kvmi::DecodeReply(frame.hdr, frame.payload, &reply).ok()) {
            ++seq;
            return reply.err;
          }
          continue;
        }
        size_t got = 0;
        uint8_t* tail = framer.WritableTail(4096);
        if (!kvmi::ReadSome(fd.get(), tail, framer.writable_size(), &got, deadline).ok()) {
          return INT32_MIN;
        }
        framer.Commit(got);
      }
    };
    kvmi::ControlEventsRequest events;
    events.event_id = KVMI_EVENT_CR;
    events.enable = true;
    // QEMU allows commands only after it hooked the fd (§9 race): retry while -KVM_EPERM.
    while (call(events) == -KVM_EPERM) std::this_thread::sleep_for(std::chrono::milliseconds(1));
    kvmi::ControlCrRequest cr;
    cr.cr = 3;
    cr.enable = true;
    call(cr);
    int raw = fd.get();
    conn->fd = std::move(fd);
    epoll_event ev{};
    ev.events = EPOLLIN;
    ev.data.fd = raw;
    ::epoll_ctl(epoll_.get(), EPOLL_CTL_ADD, raw, &ev);
    Conn& admitted = *conn;
    conns_[raw] = std::move(conn);
    Answer(admitted);  // an event may already be buffered behind the last reply
  }

  void Answer(Conn& c) {
    kvmi::Frame frame;
    kvmi::DecodeStatus status;
    c.out.clear();
    while (c.framer.Next(&frame, &status) == kvmi::MessageFramer::Result::kMessage) {
      if (frame.hdr.id != KVMI_EVENT) continue;
      kvmi::Event event;
      if (!kvmi::DecodeEvent(frame.hdr, frame.payload, &event).ok()) continue;
      kvmi::EncodeEventReply(kvmi::MakeEventReply(event, KVMI_EVENT_ACTION_CONTINUE), &c.out);
    }
    if (!c.out.empty()) ::send(c.fd.get(), c.out.data(), c.out.size(), MSG_NOSIGNAL);
  }

  void Serve(Conn& c) {
    uint8_t* tail = c.framer.WritableTail(16384);
    ssize_t n = ::recv(c.fd.get(), tail, c.framer.writable_size(), MSG_DONTWAIT);
    if (n <= 0) {
      if (n == 0 || (errno != EAGAIN && errno != EINTR)) {
        ::epoll_ctl(epoll_.get(), EPOLL_CTL_DEL, c.fd.get(), nullptr);
        conns_.erase(c.fd.get());
      }
      return;
    }
    c.framer.Commit(static_cast<size_t>(n));
    Answer(c);
  }

  void Loop() {
    epoll_event events[64];
    while (!stop_) {
      int n = ::epoll_wait(epoll_.get(), events, 64, 50);
      for (int i = 0; i < n; ++i) {
        if (events[i].data.fd == listen_.get()) {
          kvmi::UniqueFd accepted;
          if (kvmi::Accept(listen_.get(), Clock::now(), &accepted).ok()) {
            Admit(std::move(accepted));
          }
          continue;
        }
        auto it = conns_.find(events[i].data.fd);
        if (it != conns_.end()) Serve(*it->second);
      }
    }
  }

  std::string path_;
  kvmi::UniqueFd listen_;
  kvmi::UniqueFd epoll_;
  std::thread thread_;
  std::atomic<bool> stop_{false};
  std::map<int, std::unique_ptr<Conn>> conns_;
};

// ---- one measurement -------------------------------------------------------------------------

struct Row {
  std::string tool;
  uint32_t guests = 0;
  double events_per_second = 0;
  double mean_us = 0;
  uint64_t p50_us = 0;
  uint64_t p99_us = 0;
  // CPU time the tool's event thread spent per event (/proc/self/task/TID/schedstat, ns): what
  // the tool itself costs, much less sensitive than throughput to a loaded machine.
  double cpu_ns_per_event = 0;
};

// The threads named `name` in this process.
std::set<int> ThreadsNamed(const std::string& name) {
  std::set<int> found;
  for (const kvmid::testing::ThreadEntry& thread : kvmid::testing::ListThreads()) {
    if (thread.name == name) found.insert(thread.tid);
  }
  return found;
}

// The newest thread named `name` in this process, or 0 (a stopped daemon's thread of the same
// name may not be reaped yet).
int FindThread(const std::string& name) {
  std::set<int> threads = ThreadsNamed(name);
  return threads.empty() ? 0 : *threads.rbegin();
}

// Nanoseconds thread `tid` has run on a CPU, or 0 (no such thread, e.g. 0).
uint64_t ThreadCpuNs(int tid) { return kvmid::testing::ReadSchedStat(tid).cpu_ns; }

uint64_t CrEvents(kvmi::sim::Fleet& fleet) {
  kvmi::host::EngineStats stats;
  fleet.AggregateStats(&stats);
  return stats.events_sent[KVMI_EVENT_CR].load();
}

kvmi::sim::FleetConfig Cr3FleetConfig(const std::string& socket, uint32_t guests) {
  kvmi::sim::FleetConfig config;
  config.vms = guests;
  config.guest.vcpus = 1;
  config.connector.endpoint.family = kvmi::Endpoint::Family::kUnix;
  config.connector.endpoint.path = socket;
  config.connector.reconnect_seconds = 0.05;
  kvmi::sim::Scenario cr3_only;
  cr3_only.name = "cr3";
  cr3_only.weights[static_cast<size_t>(kvmi::sim::OpKind::kWriteCr3)] = 1;
  cr3_only.ops_per_second = 0;  // as fast as the tool answers
  config.workload = cr3_only;
  return config;
}

// `thread`: the name of the tool's event thread, whose CPU time is measured.
Row Measure(const std::string& tool, const std::string& thread, const std::string& socket,
            uint32_t guests) {
  kvmi::sim::Fleet fleet(Cr3FleetConfig(socket, guests));
  fleet.Start();
  auto ready_deadline = Clock::now() + std::chrono::seconds(60);
  // Every guest hooked and producing events.
  while (Clock::now() < ready_deadline && fleet.hooked_count() < guests) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  std::this_thread::sleep_for(std::chrono::duration<double>(absl::GetFlag(FLAGS_warmup_seconds)));
  const int tid = FindThread(thread);
  uint64_t cpu_before = ThreadCpuNs(tid);
  uint64_t before = CrEvents(fleet);
  auto start = Clock::now();
  std::this_thread::sleep_for(std::chrono::duration<double>(absl::GetFlag(FLAGS_seconds)));
  uint64_t after = CrEvents(fleet);
  uint64_t cpu_after = ThreadCpuNs(tid);
  double elapsed = std::chrono::duration<double>(Clock::now() - start).count();
  kvmi::host::EngineStats stats;
  fleet.AggregateStats(&stats);
  fleet.Stop();
  Row row;
  row.tool = tool;
  row.guests = guests;
  row.events_per_second = static_cast<double>(after - before) / elapsed;
  // Closed loop with one vCPU per guest: mean round trip = guests / throughput.
  row.mean_us = row.events_per_second > 0 ? guests * 1e6 / row.events_per_second : 0;
  row.p50_us = stats.round_trip.PercentileMicros(0.50);
  row.p99_us = stats.round_trip.PercentileMicros(0.99);
  // 0 if the thread could not be read at both ends (printed as "-", left out of medians).
  row.cpu_ns_per_event =
      after > before && cpu_before > 0 && cpu_after > cpu_before
          ? static_cast<double>(cpu_after - cpu_before) / static_cast<double>(after - before)
          : 0;
  return row;
}

// One side of the paired measurement: a daemon core as the kvmid binary runs it (one I/O
// thread, the allow-CR3 policy, the event log's observer), with or without metrics, and its own
// fleet of simulated guests.
class PairedSide {
 public:
  PairedSide(std::string socket, bool with_metrics)
      : socket_(std::move(socket)), with_metrics_(with_metrics) {}
  ~PairedSide() { Stop(); }

  bool Start(uint32_t guests) {
    kvmid::DaemonConfig config;
    config.unix_socket = socket_;
    config.io_threads = 1;
    daemon_ = std::make_unique<kvmid::Daemon>(config);
    if (!daemon_->ApplyPolicy(kvmid::bench::AllowCr3Rule()).ok()) return false;
    kvmid::EventLogOptions log_options;  // the binary's default (blocked events, rate-limited)
    log_ = std::make_unique<kvmid::EventLog>(&daemon_->pipeline(), log_options);
    if (with_metrics_) {
      kvmid::MetricsOptions options;
      options.address = "127.0.0.1:0";
      auto started = kvmid::StartMetrics(daemon_.get(), options);
      if (!started.ok()) {
        std::fprintf(stderr, "metrics: %s\n", started.status().ToString().c_str());
        return false;
      }
      metrics_ = std::move(*started);
    }
    const std::set<int> before = ThreadsNamed("kvmid-io-0");
    absl::Status started = daemon_->Start();
    if (!started.ok()) {
      std::fprintf(stderr, "kvmid: %s\n", started.ToString().c_str());
      return false;
    }
    for (int tid : ThreadsNamed("kvmid-io-0")) {
      if (before.count(tid) == 0) tid_ = tid;  // this daemon's loop thread
    }
    fleet_ = std::make_unique<kvmi::sim::Fleet>(Cr3FleetConfig(socket_, guests));
    fleet_->Start();
    return tid_ != 0;
  }
  bool hooked(uint32_t guests) const { return fleet_->hooked_count() >= guests; }
  uint64_t events() { return CrEvents(*fleet_); }
  uint64_t cpu_ns() const { return ThreadCpuNs(tid_); }
  bool with_metrics() const { return with_metrics_; }
  kvmid::VerdictPipeline& pipeline() { return daemon_->pipeline(); }
  void Stop() {
    if (fleet_) fleet_->Stop();
    fleet_.reset();
    if (daemon_) daemon_->Shutdown(std::chrono::milliseconds(0));
    if (log_) log_->Stop();
    metrics_.reset();
    log_.reset();
    daemon_.reset();
  }

 private:
  const std::string socket_;
  const bool with_metrics_;
  std::unique_ptr<kvmid::Daemon> daemon_;
  std::unique_ptr<kvmid::EventLog> log_;
  std::unique_ptr<kvmid::MetricsServer> metrics_;
  std::unique_ptr<kvmi::sim::Fleet> fleet_;
  int tid_ = 0;
};

struct PairedResult {
  std::vector<double> throughput_ratios;        // metrics side / plain side, per window
  std::vector<double> cpu_ratios;               // loop-thread CPU ns/event, metrics / plain
  double plain_events = 0, metrics_events = 0;  // totals
};

// Two daemons at once, so that whatever else loads the machine loads both in the same window.
// Run twice with the sides swapped (socket, start order), so that no side keeps an advantage.
bool MeasurePaired(const std::string& dir, uint32_t guests, int windows, PairedResult* result) {
  for (int swap = 0; swap < 2; ++swap) {
    PairedSide a(dir + "/paired-a.sock", swap == 1);
    PairedSide b(dir + "/paired-b.sock", swap == 0);
    if (!a.Start(guests) || !b.Start(guests)) return false;
    auto ready_deadline = Clock::now() + std::chrono::seconds(60);
    while (Clock::now() < ready_deadline && !(a.hooked(guests) && b.hooked(guests))) {
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    std::this_thread::sleep_for(std::chrono::duration<double>(absl::GetFlag(FLAGS_warmup_seconds)));
    PairedSide* plain = a.with_metrics() ? &b : &a;
    PairedSide* metered = a.with_metrics() ? &a : &b;
    for (int w = 0; w < windows; ++w) {
      uint64_t p0 = plain->events(), m0 = metered->events();
      uint64_t pc0 = plain->cpu_ns(), mc0 = metered->cpu_ns();
      std::this_thread::sleep_for(std::chrono::duration<double>(absl::GetFlag(FLAGS_seconds)));
      uint64_t p1 = plain->events(), m1 = metered->events();
      uint64_t pc1 = plain->cpu_ns(), mc1 = metered->cpu_ns();
      if (p1 <= p0 || m1 <= m0) continue;
      result->plain_events += static_cast<double>(p1 - p0);
      result->metrics_events += static_cast<double>(m1 - m0);
      result->throughput_ratios.push_back(static_cast<double>(m1 - m0) /
                                          static_cast<double>(p1 - p0));
      if (pc1 > pc0 && mc1 > mc0) {
        double plain_cpu = static_cast<double>(pc1 - pc0) / static_cast<double>(p1 - p0);
        double metered_cpu = static_cast<double>(mc1 - mc0) / static_cast<double>(m1 - m0);
        result->cpu_ratios.push_back(metered_cpu / plain_cpu);
      }
    }
  }
  return true;
}

// One daemon, one fleet, the metrics observer switched on and off between adjacent windows:
// whatever loads the machine changes little between two windows a quarter second apart.
bool MeasureToggled(const std::string& dir, uint32_t guests, int pairs, PairedResult* result) {
  PairedSide side(dir + "/toggled.sock", /*with_metrics=*/false);
  if (!side.Start(guests)) return false;
  auto ready_deadline = Clock::now() + std::chrono::seconds(60);
  while (Clock::now() < ready_deadline && !side.hooked(guests)) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  std::this_thread::sleep_for(std::chrono::duration<double>(absl::GetFlag(FLAGS_warmup_seconds)));
  kvmid::EventMetrics metrics(std::make_shared<prometheus::Registry>());
  kvmid::VerdictPipeline& pipeline = side.pipeline();
  const auto window = std::chrono::duration<double>(absl::GetFlag(FLAGS_toggle_seconds));
  struct Sample {
    uint64_t events = 0, cpu = 0;
  };
  auto measure = [&](bool with_metrics) {
    uint64_t id = 0;
    if (with_metrics) {
      id = pipeline.AddObserver([&metrics](const kvmid::ObservedEvent& o) { metrics.Observe(o); });
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));  // the switch settles
    uint64_t e0 = side.events(), c0 = side.cpu_ns();
    std::this_thread::sleep_for(window);
    uint64_t e1 = side.events(), c1 = side.cpu_ns();
    if (with_metrics) pipeline.RemoveObserver(id);
    return Sample{e1 - e0, c1 - c0};
  };
  for (int pair = 0; pair < pairs; ++pair) {
    Sample plain, metered;
    if (pair % 2 == 0) {
      plain = measure(false);
      metered = measure(true);
    } else {
      metered = measure(true);
      plain = measure(false);
    }
    if (plain.events == 0 || metered.events == 0) continue;
    result->plain_events += static_cast<double>(plain.events);
    result->metrics_events += static_cast<double>(metered.events);
    result->throughput_ratios.push_back(static_cast<double>(metered.events) /
                                        static_cast<double>(plain.events));
    if (plain.cpu > 0 && metered.cpu > 0) {
      result->cpu_ratios.push_back((static_cast<double>(metered.cpu) / metered.events) /
                                   (static_cast<double>(plain.cpu) / plain.events));
    }
  }
  return true;
}

// CPU time of one EventMetrics::Observe (what metrics adds to each event on the loop thread,
// after the reply went out), on this thread, for a policy-decided CR event.
double ObserveNs() {
  kvmid::EventMetrics metrics(std::make_shared<prometheus::Registry>());
  kvmid::ObservedEvent observed;
  observed.event.common.event = KVMI_EVENT_CR;
  observed.event.specific.cr.cr = 3;
  observed.verdict = kvmid::Verdict::Continue("policy:allow-cr3");
  observed.latency = std::chrono::microseconds(20);
  constexpr int kCalls = 2000000;
  for (int i = 0; i < 1000; ++i) metrics.Observe(observed);  // series created, caches warm
  timespec start{}, end{};
  ::clock_gettime(CLOCK_THREAD_CPUTIME_ID, &start);
  for (int i = 0; i < kCalls; ++i) metrics.Observe(observed);
  ::clock_gettime(CLOCK_THREAD_CPUTIME_ID, &end);
  double ns = (end.tv_sec - start.tv_sec) * 1e9 + (end.tv_nsec - start.tv_nsec);
  return ns / kCalls;
}

}  // namespace

int main(int argc, char** argv) {
  kvmid::UseReleaseAbslMutexes();  // as kvmid's main (common/program.h)
  absl::ParseCommandLine(argc, argv);
  spdlog::set_level(spdlog::level::err);
  std::vector<uint32_t> counts;
  std::vector<std::string> parts = absl::StrSplit(absl::GetFlag(FLAGS_guests), ',');
  for (const std::string& part : parts) {
    uint32_t n;
    if (!absl::SimpleAtoi(part, &n) || n == 0 || n > 1000) {
      std::fprintf(stderr, "--guests: '%s' is not a count in 1..1000\n", part.c_str());
      return 2;
    }
    counts.push_back(n);
  }
  char dir_template[] = "/tmp/kvmid-bench-XXXXXX";
  std::string dir = mkdtemp(dir_template);

  const int rounds = absl::GetFlag(FLAGS_rounds);
  if (rounds < 1 || rounds > 100) {
    std::fprintf(stderr, "--rounds must be 1..100\n");
    return 2;
  }
  // One kvmid row: the daemon core with one I/O thread and the policy, metrics on or off.
  auto measure_kvmid = [&](uint32_t guests, bool with_metrics, Row* row) {
    kvmid::DaemonConfig config;
    config.unix_socket = dir + "/kvmid.sock";
    config.io_threads = 1;  // same thread budget as the direct loop
    kvmid::Daemon daemon(config);
    if (!daemon.ApplyPolicy(kvmid::bench::AllowCr3Rule()).ok()) return false;
    std::unique_ptr<kvmid::MetricsServer> metrics;
    if (with_metrics) {
      kvmid::MetricsOptions options;
      options.address = "127.0.0.1:0";
      auto started = kvmid::StartMetrics(&daemon, options);
      if (!started.ok()) {
        std::fprintf(stderr, "metrics: %s\n", started.status().ToString().c_str());
        return false;
      }
      metrics = std::move(*started);
    }
    absl::Status started = daemon.Start();
    if (!started.ok()) {
      std::fprintf(stderr, "kvmid: %s\n", started.ToString().c_str());
      return false;
    }
    *row = Measure(with_metrics ? "kvmid policy + metrics" : "kvmid policy", "kvmid-io-0",
                   config.unix_socket, guests);
    daemon.Shutdown(std::chrono::milliseconds(0));
    metrics.reset();
    return true;
  };

  struct Group {
    uint32_t guests = 0;
    std::vector<Row> rows;                            // direct first
    std::vector<double> plain, with_metrics;          // events/s of each kvmid row
    std::vector<double> plain_cpu, with_metrics_cpu;  // CPU ns/event of each kvmid row
  };
  std::vector<Group> groups;
  for (uint32_t guests : counts) {
    Group group;
    group.guests = guests;
    {
      DirectLoopResponder direct(dir + "/direct.sock");
      if (!direct.Start()) return 1;
      group.rows.push_back(Measure("direct-loop", "direct-loop", dir + "/direct.sock", guests));
    }
    for (int round = 0; round < rounds; ++round) {
      // Alternate which one goes first, so that a drift in the machine's load hits both.
      for (int i = 0; i < 2; ++i) {
        bool with_metrics = (i == 1) != (round % 2 == 1);
        if (with_metrics && !absl::GetFlag(FLAGS_metrics)) continue;
        Row row;
        if (!measure_kvmid(guests, with_metrics, &row)) return 1;
        (with_metrics ? group.with_metrics : group.plain).push_back(row.events_per_second);
        if (row.cpu_ns_per_event > 0) {
          (with_metrics ? group.with_metrics_cpu : group.plain_cpu).push_back(row.cpu_ns_per_event);
        }
        group.rows.push_back(row);
      }
    }
    groups.push_back(std::move(group));
  }
  const int toggle_pairs = absl::GetFlag(FLAGS_toggle_pairs);
  std::vector<std::pair<uint32_t, PairedResult>> toggled;
  if (toggle_pairs > 0) {
    for (uint32_t guests : counts) {
      PairedResult result;
      if (!MeasureToggled(dir, guests, toggle_pairs, &result)) {
        std::fprintf(stderr, "toggled measurement failed at %u guests\n", guests);
        return 1;
      }
      toggled.emplace_back(guests, std::move(result));
    }
  }
  const int paired_windows = absl::GetFlag(FLAGS_paired_windows);
  std::vector<std::pair<uint32_t, PairedResult>> paired;
  if (paired_windows > 0) {
    for (uint32_t guests : counts) {
      PairedResult result;
      if (!MeasurePaired(dir, guests, paired_windows, &result)) {
        std::fprintf(stderr, "paired measurement failed at %u guests\n", guests);
        return 1;
      }
      paired.emplace_back(guests, std::move(result));
    }
  }
  ::rmdir(dir.c_str());

  std::printf(
      "\n| guests | tool | events/s | mean RTT (us) | p50 (us) | p99 (us) | mean vs direct | "
      "tool CPU ns/event |\n");
  std::printf("|---:|---|---:|---:|---:|---:|---:|---:|\n");
  for (const Group& group : groups) {
    const Row& direct = group.rows.front();
    for (const Row& r : group.rows) {
      std::string cpu =
          r.cpu_ns_per_event > 0 ? std::to_string(std::lround(r.cpu_ns_per_event)) : "-";
      std::printf("| %u | %s | %.0f | %.1f | %llu | %llu | %.2fx | %s |\n", r.guests,
                  r.tool.c_str(), r.events_per_second, r.mean_us,
                  static_cast<unsigned long long>(r.p50_us),
                  static_cast<unsigned long long>(r.p99_us),
                  direct.mean_us > 0 ? r.mean_us / direct.mean_us : 0.0, cpu.c_str());
    }
  }
  std::printf(
      "\n(p50/p99: the simulator's log-linear histogram, bucket upper bounds, ~19%% wide; "
      "the ratio column compares mean round trips)\n");
  auto median = [](std::vector<double> v) {
    std::sort(v.begin(), v.end());
    size_t n = v.size();
    return n == 0 ? 0.0 : (n % 2 == 1 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2);
  };
  if (absl::GetFlag(FLAGS_metrics)) {
    double observe_ns = ObserveNs();
    std::printf("\nmetrics cost (medians of %d round(s) each):\n", rounds);
    std::printf("  EventMetrics::Observe alone: %.1f ns per event (thread CPU time, 2M calls)\n",
                observe_ns);
    for (const Group& group : groups) {
      double plain = median(group.plain), with_metrics = median(group.with_metrics);
      double plain_cpu = median(group.plain_cpu), with_metrics_cpu = median(group.with_metrics_cpu);
      std::printf(
          "  %u guests: %.0f -> %.0f events/s (%+.2f%%); kvmid-io-0 CPU %.0f -> %.0f ns/event "
          "(%+.2f%%)\n",
          group.guests, plain, with_metrics,
          plain > 0 ? (with_metrics - plain) * 100.0 / plain : 0.0, plain_cpu, with_metrics_cpu,
          plain_cpu > 0 ? (with_metrics_cpu - plain_cpu) * 100.0 / plain_cpu : 0.0);
    }
  }
  auto print_ratios = [&](const std::vector<std::pair<uint32_t, PairedResult>>& results,
                          const char* title) {
    if (results.empty()) return;
    auto percentile = [](std::vector<double> v, double q) {
      if (v.empty()) return 0.0;
      std::sort(v.begin(), v.end());
      return v[static_cast<size_t>(q * static_cast<double>(v.size() - 1) + 0.5)];
    };
    std::printf("\n%s\n", title);
    std::printf(
        "| guests | pairs | throughput metrics/plain: median [p25, p75] | loop CPU per event "
        "metrics/plain: median [p25, p75] | events plain / metrics | all events metrics/plain "
        "|\n");
    std::printf("|---:|---:|---:|---:|---:|---:|\n");
    for (const auto& [guests, r] : results) {
      std::printf("| %u | %zu | %.4f [%.4f, %.4f] | %.4f [%.4f, %.4f] | %.0f / %.0f | %.4f |\n",
                  guests, r.throughput_ratios.size(), median(r.throughput_ratios),
                  percentile(r.throughput_ratios, 0.25), percentile(r.throughput_ratios, 0.75),
                  median(r.cpu_ratios), percentile(r.cpu_ratios, 0.25),
                  percentile(r.cpu_ratios, 0.75), r.plain_events, r.metrics_events,
                  r.plain_events > 0 ? r.metrics_events / r.plain_events : 0.0);
    }
  };
  print_ratios(toggled,
               "metrics cost, interleaved (one daemon with the event log; the metrics observer "
               "switched on and off between adjacent windows, order flipped every pair):");
  print_ratios(paired,
               "metrics cost, paired (both daemons with the event log; one with metrics; the "
               "windows of --seconds, sides swapped halfway; \"pairs\" counts windows):");
  return 0;
}
