// kvmid under abuse, measured in one run against the real kvmid binary (a child process):
//   quiet  a fleet of simulated guests (in-process kvmi::sim::Fleet, one vCPU each) writing CR3
//          as fast as kvmid answers, each event decided by an in-daemon policy (allow-cr3 in the
//          config file): the guest event rate, counted as the replies the guests received
//          (every reply is a decided event);
//   abuse  the same guests while, at the same time:
//          - `--streams` open idle StreamEvents streams (a filter no event of the workload
//            matches; they read), spread over `--channels` channels;
//          - `--silent_streams` StreamEvents streams that never read (callback reactors that
//            never call StartRead, every event with registers, on channels with a small HTTP/2
//            lookahead and no BDP probe), over `--silent_channels` channels;
//          - a policy flood: ApplyPolicy in a loop, `--policy_names` names in turn, each with a
//            `--policy_description_bytes` description;
//          - a silent Attach claiming every guest and every blocking event with the largest
//            deadline kvmid accepts (`--attach_deadline_ms`, lowered to the limit kvmid names
//            when it refuses), arming CR4 writes, reading and never answering, re-claiming when
//            refused or cut. Policies decide before handlers: it gets no event of the CR3
//            workload, only the CR4 writes of `--cr4_per_mille` (default none);
//          - a KVMI connection flood from a forked child running as `--flood_uid` (setuid, so
//            per-peer handshake slots apply to it and not to the guests, which connect as root):
//            a new connection every `--flood_interval_ms`, never a byte of handshake, each held
//            `--flood_hold_seconds` unless kvmid closes it first;
//          - legitimate new guests (and the same in the quiet phase, for comparison): one new
//            guest every `--hook_interval_seconds`, timed from its connect to kvmid's GetVM
//            showing it VM_STATE_HOOKED.
//   control  (with kvmi_flood, unless --nowakeup_control) between quiet and abuse: a child
//          process wakes as often as the flood's and connects nowhere: what those wake-ups alone
//          cost the guests on this machine, kvmid doing nothing for them;
//   quiet again  once the abusers are gone, the quiet window once more; then abuse and quiet
//          again `--rounds` times in all (default 3). Each abuse window is compared with the mean
//          of the quiet windows on both sides of it, so that the machine's own drift (10-20%
//          between minutes on this kind) cancels instead of passing for a cost of the abuse, and
//          the result is the median over the rounds. Every quiet window hooks new guests too.
// kvmid's RSS (VmRSS, VmHWM) and thread count (/proc/<pid>/status) are sampled every 100 ms.
// Nothing is asserted: refusals (RESOURCE_EXHAUSTED, ...) are results, counted and printed.
// Every abusive client is bounded in time; kvmid and the flood child die with the bench.
//
//   bazel run -c opt //tests/bench:abuse_bench -- --seconds=10
//   bazel run -c opt //tests/bench:abuse_bench -- --streams=200 --silent_streams=20 --seconds=3
#include <absl/flags/flag.h>
#include <absl/flags/parse.h>
#include <absl/strings/str_format.h>
#include <dirent.h>
#include <fcntl.h>
#include <grp.h>
#include <grpcpp/grpcpp.h>
#include <poll.h>
#include <signal.h>
#include <spdlog/spdlog.h>
#include <stdlib.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iterator>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <sstream>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "kernel/sim/fleet.h"
#include "proto/kvmi/v1/introspection.grpc.pb.h"

ABSL_FLAG(std::string, kvmid, "daemon/kvmid", "the kvmid binary (default: from the runfiles)");
ABSL_FLAG(int, guests, 16, "simulated guests producing events (one vCPU each, CR3 writes)");
ABSL_FLAG(double, seconds, 10.0, "measurement window of each phase");
ABSL_FLAG(int, rounds, 3,
          "abuse windows, each followed by a quiet one (the result: the median over the rounds of "
          "each abuse window against the mean of the quiet windows on both sides of it)");
ABSL_FLAG(int, streams, 2000, "open idle StreamEvents streams during the abuse phase");
ABSL_FLAG(int, channels, 20, "channels the idle streams are spread over");
ABSL_FLAG(bool, open_streams_first, true,
          "open the streams before the abuse window starts (the window measures guests with the "
          "streams open; opening them is timed apart); false: open them inside the window");
ABSL_FLAG(double, settle_seconds, 3.0,
          "with --open_streams_first: time given to kvmid to set the streams up before the "
          "window starts");
ABSL_FLAG(int, idle_heartbeat_ms, -1,
          "heartbeat_interval the idle streams ask for (-1: kvmid's default; 0: none)");
ABSL_FLAG(int, silent_streams, 200, "StreamEvents streams that never read");
ABSL_FLAG(int, silent_channels, 10, "channels the non-reading streams are spread over");
ABSL_FLAG(int, policy_names, 300, "policy flood: distinct policy names, applied in turn");
ABSL_FLAG(int, policy_description_bytes, 1 << 20, "policy flood: description size");
ABSL_FLAG(int, attach_deadline_ms, 60000,
          "silent Attach: the deadline claimed first (lowered to the limit kvmid names)");
ABSL_FLAG(double, flood_interval_ms, 1.0, "KVMI flood: one new connection per interval");
ABSL_FLAG(double, flood_hold_seconds, 10.0, "KVMI flood: how long each connection is held");
ABSL_FLAG(int, flood_uid, 65534, "KVMI flood: the uid (and gid) of the flooding child");
ABSL_FLAG(double, hook_interval_seconds, 0.5, "a legitimate new guest connects this often");
ABSL_FLAG(int, io_threads, 2, "kvmid's --io_threads");
ABSL_FLAG(int, max_rss_mib, 4096,
          "guard for a shared machine: the abuse window ends early when kvmid's RSS passes this");
ABSL_FLAG(std::vector<std::string>, abusers,
          std::vector<std::string>({"streams", "silent_streams", "policy_flood", "silent_attach",
                                    "kvmi_flood"}),
          "which abusers run in the abuse phase (to see what costs what); the new guests always "
          "connect. Not in the default: resume_flood (StreamEvents resuming after a long "
          "overwritten event id, cancelled after its first message, in a loop)");
ABSL_FLAG(bool, wakeup_control, true,
          "with kvmi_flood: a control window between quiet and abuse, the guests while a child "
          "process wakes as often as the flood's and connects nowhere (what the wake-ups alone "
          "cost on this machine)");
ABSL_FLAG(uint64_t, resume_after, 1,
          "resume_flood: the event id its streams resume after (0: no resume, the churn alone)");
ABSL_FLAG(bool, thread_cpu, false,
          "per round, kvmid's and the bench's CPU by thread kind in the quiet window before and "
          "in the abuse window (the kinds whose share moved most first)");
ABSL_FLAG(bool, keep, false, "keep the temporary directory (kvmid's config and log)");
ABSL_FLAG(int, cr4_per_mille, 0,
          "guest operations that are CR4 writes instead of CR3, per 1000: no policy decides them, "
          "the silent Attach arms and claims them (0: it gets no event, every event is decided "
          "by the policy first)");

namespace {

using Clock = std::chrono::steady_clock;
using kvmi::v1::Introspection;

constexpr auto kSamplePeriod = std::chrono::milliseconds(100);
constexpr auto kHookTimeout = std::chrono::seconds(10);   // a probe guest not hooked by then
constexpr auto kStartTimeout = std::chrono::seconds(60);  // kvmid up, the fleet hooked
constexpr auto kTeardownTimeout = std::chrono::seconds(10);
constexpr int kFloodMaxHeld = 1 << 16;  // connections the flood child holds at once

double Seconds(Clock::duration d) { return std::chrono::duration<double>(d).count(); }

// gRPC deadlines are on the system clock.
std::chrono::system_clock::time_point ToSystem(Clock::time_point t) {
  return std::chrono::system_clock::now() +
         std::chrono::duration_cast<std::chrono::system_clock::duration>(t - Clock::now());
}

std::string CpuModel() {
  std::ifstream in("/proc/cpuinfo");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("model name", 0) == 0) return line.substr(line.find(':') + 2);
  }
  return "unknown";
}

// ---- kvmid's /proc/<pid>/status, sampled per phase -----------------------------------------

struct ProcStatus {
  uint64_t rss_kib = 0;
  uint64_t hwm_kib = 0;
  uint64_t threads = 0;
  bool ok = false;
};

ProcStatus ReadStatus(pid_t pid) {
  ProcStatus s;
  std::ifstream in("/proc/" + std::to_string(pid) + "/status");
  std::string key;
  while (in >> key) {
    uint64_t value = 0;
    if (key == "VmRSS:" && in >> value) s.rss_kib = value;
    if (key == "VmHWM:" && in >> value) s.hwm_kib = value;
    if (key == "Threads:" && in >> value) s.threads = value;
    in.ignore(1 << 20, '\n');
  }
  s.ok = s.threads > 0;
  return s;
}

// One /proc/<pid>/stat or /proc/<pid>/task/<tid>/stat: the name between its parentheses and
// utime + stime in seconds; nullopt if it cannot be read (the process or thread is gone).
std::optional<std::pair<std::string, double>> ReadStat(const std::string& path) {
  std::ifstream in(path);
  std::string stat((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  size_t open = stat.find('('), paren = stat.rfind(')');
  if (open == std::string::npos || paren == std::string::npos || paren < open) return std::nullopt;
  std::istringstream fields(stat.substr(paren + 2));
  std::string field;
  uint64_t utime = 0, stime = 0;
  for (int i = 3; i <= 15 && fields >> field; ++i) {  // field 3 is the state
    if (i == 14) utime = std::strtoull(field.c_str(), nullptr, 10);
    if (i == 15) stime = std::strtoull(field.c_str(), nullptr, 10);
  }
  return std::make_pair(
      stat.substr(open + 1, paren - open - 1),
      static_cast<double>(utime + stime) / static_cast<double>(::sysconf(_SC_CLK_TCK)));
}

// kvmid's CPU time so far (utime + stime of /proc/<pid>/stat), seconds.
double CpuSeconds(pid_t pid) {
  auto stat = ReadStat("/proc/" + std::to_string(pid) + "/stat");
  return stat ? stat->second : 0;
}

// The threads of `pid` alive now: tid -> (name with digits folded into '#', so that "kvmid-io-1"
// and "kvmid-io-0" are one kind "kvmid-io-#"; CPU seconds so far).
using ThreadTimes = std::map<std::string, std::pair<std::string, double>>;
ThreadTimes ThreadCpu(pid_t pid) {
  ThreadTimes threads;
  const std::string task_dir = "/proc/" + std::to_string(pid) + "/task";
  DIR* dir = ::opendir(task_dir.c_str());
  if (dir == nullptr) return threads;
  while (dirent* entry = ::readdir(dir)) {
    if (entry->d_name[0] == '.') continue;
    auto stat = ReadStat(task_dir + "/" + entry->d_name + "/stat");
    if (!stat) continue;
    std::string kind;
    for (char c : stat->first) {
      if (c >= '0' && c <= '9') {
        if (kind.empty() || kind.back() != '#') kind += '#';
      } else {
        kind += c;
      }
    }
    threads[entry->d_name] = {kind, stat->second};
  }
  ::closedir(dir);
  return threads;
}

// This process's CPU time so far (every thread: the guests and the clients), seconds.
double SelfCpuSeconds() {
  rusage usage{};
  ::getrusage(RUSAGE_SELF, &usage);
  return usage.ru_utime.tv_sec + usage.ru_stime.tv_sec +
         (usage.ru_utime.tv_usec + usage.ru_stime.tv_usec) / 1e6;
}

// The whole machine's busy CPU time so far (every CPU, every process: /proc/stat's user, nice,
// system, irq, softirq and steal), seconds.
double MachineBusySeconds() {
  std::ifstream in("/proc/stat");
  std::string cpu;
  uint64_t user = 0, nice = 0, system = 0, idle = 0, iowait = 0, irq = 0, softirq = 0, steal = 0;
  in >> cpu >> user >> nice >> system >> idle >> iowait >> irq >> softirq >> steal;
  return static_cast<double>(user + nice + system + irq + softirq + steal) /
         static_cast<double>(::sysconf(_SC_CLK_TCK));
}

std::string LoadAverage() {
  std::ifstream in("/proc/loadavg");
  std::string one, five;
  in >> one >> five;
  return one + " " + five;
}

enum Phase { kQuiet = 0, kAbuse = 1, kAfter = 2, kPhases = 3 };

class Sampler {
 public:
  Sampler(pid_t pid, uint64_t guard_kib) : pid_(pid), guard_kib_(guard_kib) {
    thread_ = std::thread([this] {
      while (!stop_) {
        ProcStatus s = ReadStatus(pid_);
        if (s.ok) {
          std::lock_guard<std::mutex> lock(mu_);
          Max& m = max_[phase_];
          m.rss_kib = std::max(m.rss_kib, s.rss_kib);
          m.threads = std::max(m.threads, s.threads);
          m.min_threads = m.min_threads == 0 ? s.threads : std::min(m.min_threads, s.threads);
          last_ = s;
          if (s.rss_kib > guard_kib_) over_guard_ = true;
        }
        std::this_thread::sleep_for(kSamplePeriod);
      }
    });
  }
  ~Sampler() { Stop(); }
  void Stop() {
    stop_ = true;
    if (thread_.joinable()) thread_.join();
  }
  void SetPhase(Phase p) {
    std::lock_guard<std::mutex> lock(mu_);
    phase_ = p;
  }
  struct Max {
    uint64_t rss_kib = 0;
    uint64_t threads = 0;
    uint64_t min_threads = 0;
  };
  Max max(Phase p) {
    std::lock_guard<std::mutex> lock(mu_);
    return max_[p];
  }
  bool over_guard() const { return over_guard_; }
  ProcStatus last() {
    std::lock_guard<std::mutex> lock(mu_);
    return last_;
  }

 private:
  pid_t pid_;
  uint64_t guard_kib_;
  std::atomic<bool> over_guard_{false};
  std::mutex mu_;
  Phase phase_ = kQuiet;
  Max max_[kPhases];
  ProcStatus last_;
  std::atomic<bool> stop_{false};
  std::thread thread_;
};

// ---- child processes -------------------------------------------------------------------------

// kvmid, with its output in `log`. Dies with the bench (PR_SET_PDEATHSIG).
pid_t StartKvmid(const std::string& binary, const std::vector<std::string>& args,
                 const std::string& log) {
  std::vector<char*> argv;
  argv.push_back(const_cast<char*>(binary.c_str()));
  for (const std::string& a : args) argv.push_back(const_cast<char*>(a.c_str()));
  argv.push_back(nullptr);
  pid_t pid = ::fork();
  if (pid == 0) {
    ::prctl(PR_SET_PDEATHSIG, SIGKILL);
    int fd = ::open(log.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd >= 0) {
      ::dup2(fd, 1);
      ::dup2(fd, 2);
    }
    ::execv(binary.c_str(), argv.data());
    ::_exit(127);
  }
  return pid;
}

void KillAndReap(pid_t pid, int first_signal) {
  if (pid <= 0) return;
  ::kill(pid, first_signal);
  auto deadline = Clock::now() + std::chrono::seconds(5);
  while (Clock::now() < deadline) {
    if (::waitpid(pid, nullptr, WNOHANG) == pid) return;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  ::kill(pid, SIGKILL);
  ::waitpid(pid, nullptr, 0);
}

// What the KVMI flood child reports back through its pipe.
struct FloodResult {
  uint64_t connected = 0;  // connect() accepted (kvmid's backlog had room)
  uint64_t refused = 0;    // connect() failed (EAGAIN: backlog full; EACCES: socket mode; ...)
  int last_errno = 0;
  int uid = -1;  // the uid it ran as
  uint64_t closed_by_kvmid = 0;
};

int64_t NowNs() {
  timespec t{};
  ::clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec * 1000000000ll + t.tv_nsec;
}

// The flood child, forked before any thread exists. For every "go" (the duration, as a double, on
// `go_fd`) it connects to `socket` every interval and never writes, holding each connection for
// `hold_ns` (or until kvmid closes it), then lets every connection still held go and writes that
// run's FloodResult to `result_fd`. It ends when `go_fd` is closed.
[[noreturn]] void FloodChild(int go_fd, int result_fd, const std::string& socket, int uid,
                             int64_t interval_ns, int64_t hold_ns, bool connect) {
  ::prctl(PR_SET_PDEATHSIG, SIGKILL);
  static int held_fd[kFloodMaxHeld];
  static int64_t held_at[kFloodMaxHeld];
  rlimit nofile{kFloodMaxHeld + 64, kFloodMaxHeld + 64};
  ::setrlimit(RLIMIT_NOFILE, &nofile);
  int ran_as = -1;
  if (::setgroups(0, nullptr) == 0 && ::setgid(uid) == 0 && ::setuid(uid) == 0) ran_as = uid;
  if (ran_as < 0) ran_as = static_cast<int>(::getuid());
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::strncpy(addr.sun_path, socket.c_str(), sizeof(addr.sun_path) - 1);
  double seconds = 0;
  while (::read(go_fd, &seconds, sizeof(seconds)) == sizeof(seconds)) {
    FloodResult r;
    r.uid = ran_as;
    const int64_t start = NowNs();
    const int64_t end = start + static_cast<int64_t>(seconds * 1e9);
    size_t head = 0, tail = 0;  // ring of held connections, oldest at tail
    char probe[64];
    for (int64_t next = start; next < end; next += interval_ns) {
      int64_t now = NowNs();
      while (tail != head && (now - held_at[tail % kFloodMaxHeld] > hold_ns)) {
        ::close(held_fd[tail++ % kFloodMaxHeld]);
      }
      // Every 100 connections, those kvmid closed (EOF) are let go and the ring compacted.
      if ((r.connected + r.refused) % 100 == 0) {
        size_t kept = tail;
        for (size_t i = tail; i != head; ++i) {
          int held = held_fd[i % kFloodMaxHeld];
          if (::recv(held, probe, sizeof(probe), MSG_DONTWAIT) == 0) {
            ++r.closed_by_kvmid;
            ::close(held);
            continue;
          }
          held_fd[kept % kFloodMaxHeld] = held;
          held_at[kept++ % kFloodMaxHeld] = held_at[i % kFloodMaxHeld];
        }
        head = kept;
      }
      if (connect) {  // else the control: the same wake-ups, nothing sent to kvmid
        int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        if (fd >= 0 && ::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0) {
          ++r.connected;
          if (head - tail == kFloodMaxHeld) ::close(held_fd[tail++ % kFloodMaxHeld]);
          held_fd[head % kFloodMaxHeld] = fd;
          held_at[head++ % kFloodMaxHeld] = now;
        } else {
          ++r.refused;
          r.last_errno = errno;
          if (fd >= 0) ::close(fd);
        }
      }
      timespec until{static_cast<time_t>(next / 1000000000), static_cast<long>(next % 1000000000)};
      ::clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &until, nullptr);
    }
    while (tail != head) ::close(held_fd[tail++ % kFloodMaxHeld]);  // the next phase starts clean
    if (result_fd >= 0) {
      ssize_t written = ::write(result_fd, &r, sizeof(r));
      (void)written;
    }
  }
  ::_exit(0);
}

// ---- status tallies ---------------------------------------------------------------------------

// Outcomes of calls or streams by status code, with the first message of each code.
class Tally {
 public:
  void Add(const grpc::Status& status) {
    std::lock_guard<std::mutex> lock(mu_);
    auto& entry = by_code_[status.error_code()];
    if (entry.first++ == 0) entry.second = status.error_message();
  }
  uint64_t Count(grpc::StatusCode code) {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = by_code_.find(code);
    return it == by_code_.end() ? 0 : it->second.first;
  }
  uint64_t Total() {
    std::lock_guard<std::mutex> lock(mu_);
    uint64_t n = 0;
    for (const auto& [code, entry] : by_code_) n += entry.first;
    return n;
  }
  // "OK 12, RESOURCE_EXHAUSTED 3 ("streams: ... limit ...")".
  std::string Describe() {
    static const std::map<int, const char*> kNames = {{0, "OK"},
                                                      {1, "CANCELLED"},
                                                      {2, "UNKNOWN"},
                                                      {3, "INVALID_ARGUMENT"},
                                                      {4, "DEADLINE_EXCEEDED"},
                                                      {5, "NOT_FOUND"},
                                                      {7, "PERMISSION_DENIED"},
                                                      {8, "RESOURCE_EXHAUSTED"},
                                                      {9, "FAILED_PRECONDITION"},
                                                      {13, "INTERNAL"},
                                                      {14, "UNAVAILABLE"},
                                                      {16, "UNAUTHENTICATED"}};
    std::lock_guard<std::mutex> lock(mu_);
    std::string out;
    for (const auto& [code, entry] : by_code_) {
      auto name = kNames.find(code);
      if (!out.empty()) out += ", ";
      out += (name != kNames.end() ? name->second : std::to_string(code)) + " " +
             std::to_string(entry.first);
      if (code != grpc::StatusCode::OK && code != grpc::StatusCode::CANCELLED &&
          !entry.second.empty()) {
        out += " (\"" + entry.second.substr(0, 120) + "\")";
      }
    }
    return out.empty() ? "none" : out;
  }

 private:
  std::mutex mu_;
  std::map<int, std::pair<uint64_t, std::string>> by_code_;
};

// ---- streams (callback API: no client thread per stream) -------------------------------------

class StreamClient : public grpc::ClientReadReactor<kvmi::v1::StreamEventsResponse> {
 public:
  StreamClient(Introspection::Stub* stub, const kvmi::v1::StreamEventsRequest& request, bool read,
               Clock::time_point deadline, Tally* tally, std::atomic<uint64_t>* messages)
      : read_(read), tally_(tally), messages_(messages) {
    ctx_.set_deadline(ToSystem(deadline));
    stub->async()->StreamEvents(&ctx_, &request, this);
    if (read_) StartRead(&message_);
    StartCall();
  }
  void OnReadDone(bool ok) override {
    if (!ok) return;
    messages_->fetch_add(1, std::memory_order_relaxed);
    StartRead(&message_);
  }
  void OnDone(const grpc::Status& status) override {
    tally_->Add(status);
    std::lock_guard<std::mutex> lock(mu_);
    done_ = true;
    cv_.notify_all();
  }
  bool done() {
    std::lock_guard<std::mutex> lock(mu_);
    return done_;
  }
  void Cancel() { ctx_.TryCancel(); }
  bool WaitDone(Clock::time_point deadline) {
    std::unique_lock<std::mutex> lock(mu_);
    while (!done_) {
      if (cv_.wait_until(lock, deadline) == std::cv_status::timeout) return done_;
    }
    return true;
  }

 private:
  grpc::ClientContext ctx_;
  kvmi::v1::StreamEventsResponse message_;
  bool read_;
  Tally* tally_;
  std::atomic<uint64_t>* messages_;
  std::mutex mu_;
  std::condition_variable cv_;
  bool done_ = false;
};

std::shared_ptr<grpc::Channel> NewChannel(const std::string& target, int index, bool small_window) {
  grpc::ChannelArguments args;
  args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);  // a connection of its own
  args.SetInt("kvmid.abuse_bench.channel", index);
  if (small_window) {
    args.SetInt(GRPC_ARG_HTTP2_BDP_PROBE, 0);
    args.SetInt(GRPC_ARG_HTTP2_STREAM_LOOKAHEAD_BYTES, 1024);
  }
  return grpc::CreateCustomChannel(target, grpc::InsecureChannelCredentials(), args);
}

// A set of streams over `channels` channels.
class StreamFleet {
 public:
  StreamFleet(const std::string& target, int streams, int channels, bool read,
              const kvmi::v1::StreamEventsRequest& request, Clock::time_point deadline) {
    channels = std::max(1, std::min(channels, std::max(1, streams)));
    for (int c = 0; c < channels; ++c) {
      stubs_.push_back(Introspection::NewStub(NewChannel(target, c + (read ? 0 : 100000), !read)));
    }
    for (int i = 0; i < streams; ++i) {
      clients_.push_back(std::make_unique<StreamClient>(stubs_[i % channels].get(), request, read,
                                                        deadline, &tally_, &messages_));
    }
  }
  size_t open() {
    size_t n = 0;
    for (auto& c : clients_) n += c->done() ? 0 : 1;
    return n;
  }
  // Cancels every stream; false if some did not finish by the deadline.
  bool Close(Clock::time_point deadline) {
    for (auto& c : clients_) c->Cancel();
    bool all = true;
    for (auto& c : clients_) all = c->WaitDone(deadline) && all;
    if (!all) {
      // Reactors still referenced by gRPC must outlive it: leak them (the process ends soon).
      for (auto& c : clients_) c.release();
    }
    return all;
  }
  size_t size() const { return clients_.size(); }
  Tally& tally() { return tally_; }
  uint64_t messages() const { return messages_.load(); }

 private:
  std::vector<std::unique_ptr<Introspection::Stub>> stubs_;
  std::vector<std::unique_ptr<StreamClient>> clients_;
  Tally tally_;
  std::atomic<uint64_t> messages_{0};
};

// ---- the policy flood and the silent Attach ---------------------------------------------------

// Opens StreamEvents streams resuming after event id 1 (long overwritten: kvmid walks its whole
// ring to find where to resume), reads the first message (the DropNotice), cancels, again.
struct ResumeFlood {
  Tally streams;
  std::atomic<uint64_t> first_messages{0};

  void Run(Introspection::Stub* stub, const std::atomic<bool>* stop, Clock::time_point end) {
    kvmi::v1::StreamEventsRequest request;
    request.set_resume_after(absl::GetFlag(FLAGS_resume_after));
    while (!*stop && Clock::now() < end) {
      grpc::ClientContext ctx;
      ctx.set_deadline(ToSystem(Clock::now() + std::chrono::seconds(2)));
      auto reader = stub->StreamEvents(&ctx, request);
      kvmi::v1::StreamEventsResponse message;
      if (reader->Read(&message)) ++first_messages;
      ctx.TryCancel();
      while (reader->Read(&message)) {
      }
      streams.Add(reader->Finish());
    }
  }
};

struct PolicyFlood {
  Tally applied;
  Tally deleted;
  std::atomic<uint64_t> bytes{0};
  std::atomic<int> names_used{0};  // flood-0 .. flood-<names_used - 1> may exist

  void Run(Introspection::Stub* stub, const std::atomic<bool>* stop, Clock::time_point end) {
    kvmi::v1::ApplyPolicyRequest request;
    request.set_allow_replace(true);  // the flood rewrites its names: replaced, not refused
    kvmi::v1::Policy* policy = request.mutable_policy();
    policy->set_description(std::string(absl::GetFlag(FLAGS_policy_description_bytes), 'd'));
    policy->set_mode(kvmi::v1::MODE_MONITOR);
    policy->set_action(kvmi::v1::ACTION_CONTINUE);
    policy->mutable_match()->add_events(kvmi::v1::EVENT_TYPE_BREAKPOINT);  // not in the workload
    const int names = std::max(1, absl::GetFlag(FLAGS_policy_names));
    for (int i = 0; !*stop && Clock::now() < end; ++i) {
      policy->set_name("flood-" + std::to_string(i % names));
      grpc::ClientContext ctx;
      ctx.set_deadline(ToSystem(Clock::now() + std::chrono::seconds(5)));
      kvmi::v1::ApplyPolicyResponse response;
      grpc::Status status = stub->ApplyPolicy(&ctx, request, &response);
      applied.Add(status);
      if (status.ok()) bytes += request.ByteSizeLong();
      names_used = std::max(names_used.load(), std::min(i + 1, names));
    }
  }
  // Deletes every name the flood may have applied (memory should go back).
  void Clean(Introspection::Stub* stub, Clock::time_point end) {
    // A timed-out ApplyPolicy may still have been applied: its name is tried too.
    const int names = std::min(std::max(1, absl::GetFlag(FLAGS_policy_names)), names_used + 1);
    for (int i = 0; i < names && Clock::now() < end; ++i) {
      grpc::ClientContext ctx;
      ctx.set_deadline(ToSystem(std::min(end, Clock::now() + std::chrono::seconds(2))));
      kvmi::v1::DeletePolicyRequest request;
      request.set_name("flood-" + std::to_string(i));
      kvmi::v1::DeletePolicyResponse response;
      deleted.Add(stub->DeletePolicy(&ctx, request, &response));
    }
  }
};

// The deadline kvmid names in a refusal ("... max_attach_deadline_ms = 5000 ..."), or 0.
uint32_t NamedMaxDeadline(const std::string& message) {
  static const std::string kKnob = "max_attach_deadline_ms = ";
  size_t at = message.find(kKnob);
  if (at == std::string::npos) return 0;
  return static_cast<uint32_t>(std::strtoul(message.c_str() + at + kKnob.size(), nullptr, 10));
}

struct SilentAttach {
  Tally streams;  // how each Attach stream ended
  std::atomic<uint64_t> claimed{0};
  std::atomic<uint64_t> events_held{0};
  std::atomic<uint32_t> deadline_ms{0};
  std::mutex mu;
  grpc::ClientContext* current = nullptr;

  void Run(Introspection::Stub* stub, const std::atomic<bool>* stop, Clock::time_point end) {
    uint32_t deadline = static_cast<uint32_t>(absl::GetFlag(FLAGS_attach_deadline_ms));
    while (!*stop && Clock::now() < end) {
      grpc::ClientContext ctx;
      ctx.set_deadline(ToSystem(end));
      {
        std::lock_guard<std::mutex> lock(mu);
        if (*stop) break;
        current = &ctx;
      }
      auto stream = stub->Attach(&ctx);
      kvmi::v1::AttachRequest claim;
      claim.mutable_claim()->set_handler_id("silent-abuser");  // every guest, every event
      claim.mutable_claim()->set_deadline_ms(deadline);
      claim.mutable_claim()->set_fallback(kvmi::v1::ACTION_CONTINUE);
      claim.mutable_claim()->add_arm_events(
          kvmi::v1::EVENT_TYPE_CR);  // CR4 writes (--cr4_per_mille)
      claim.mutable_claim()->add_arm_crs(4);
      stream->Write(claim);
      bool got_claim = false;
      kvmi::v1::AttachResponse response;
      while (stream->Read(&response)) {  // reads, never answers
        if (response.has_claimed()) {
          got_claim = true;
          ++claimed;
          deadline_ms = deadline;
        }
        if (response.has_event()) ++events_held;
      }
      grpc::Status status = stream->Finish();
      {
        std::lock_guard<std::mutex> lock(mu);
        current = nullptr;
      }
      streams.Add(status);
      if (!got_claim) {
        uint32_t named = NamedMaxDeadline(status.error_message());
        if (named > 0 && named < deadline) {
          deadline = named;
        } else if (status.error_code() == grpc::StatusCode::RESOURCE_EXHAUSTED ||
                   status.error_code() == grpc::StatusCode::INVALID_ARGUMENT) {
          deadline = std::max(1u, deadline / 2);
        }
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
  }
  void Cancel() {
    std::lock_guard<std::mutex> lock(mu);
    if (current != nullptr) current->TryCancel();
  }
};

// ---- legitimate guests hooking ----------------------------------------------------------------

kvmi::sim::FleetConfig GuestFleetConfig(const std::string& socket, uint32_t vms,
                                        const std::string& prefix, uint64_t seed, bool busy) {
  kvmi::sim::FleetConfig config;
  config.vms = vms;
  config.guest.vcpus = 1;
  config.connector.endpoint.family = kvmi::Endpoint::Family::kUnix;
  config.connector.endpoint.path = socket;
  config.connector.reconnect_seconds = 0.05;
  config.name_prefix = prefix;
  config.seed = seed;
  if (busy) {
    kvmi::sim::Scenario cr3_only;
    cr3_only.name = "cr3";
    const uint32_t cr4 =
        static_cast<uint32_t>(std::clamp(absl::GetFlag(FLAGS_cr4_per_mille), 0, 1000));
    cr3_only.weights[static_cast<size_t>(kvmi::sim::OpKind::kWriteCr3)] = 1000 - cr4;
    cr3_only.weights[static_cast<size_t>(kvmi::sim::OpKind::kWriteCr4)] = cr4;
    cr3_only.ops_per_second = 0;  // as fast as kvmid answers
    config.workload = cr3_only;
  }
  return config;
}

// True when GetVM(name) answers VM_STATE_HOOKED.
bool Hooked(Introspection::Stub* stub, const std::string& name) {
  grpc::ClientContext ctx;
  ctx.set_deadline(ToSystem(Clock::now() + std::chrono::seconds(1)));
  kvmi::v1::GetVMRequest request;
  request.set_vm(name);
  kvmi::v1::VM vm;
  return stub->GetVM(&ctx, request, &vm).ok() && vm.state() == kvmi::v1::VM_STATE_HOOKED;
}

// One new guest every interval until `stop`; each timed from its connect to kvmid showing it
// hooked (or kHookTimeout: a miss).
class HookProbe {
 public:
  HookProbe(const std::string& socket, Introspection::Stub* stub, int phase)
      : socket_(socket), stub_(stub), phase_(phase) {}
  void Run(const std::atomic<bool>* stop) {
    const auto interval = std::chrono::duration<double>(absl::GetFlag(FLAGS_hook_interval_seconds));
    for (int k = 0; !*stop; ++k) {
      auto next = Clock::now() + interval;
      std::string prefix = "legit-" + std::to_string(phase_) + "-" + std::to_string(k) + "-";
      auto fleet = std::make_unique<kvmi::sim::Fleet>(
          GuestFleetConfig(socket_, 1, prefix, 1000 * (phase_ + 1) + k, false));
      const std::string name = fleet->vm(0).config().name;
      auto t0 = Clock::now();
      fleet->Start();
      bool hooked = false;
      while (Clock::now() - t0 < kHookTimeout) {
        if (Hooked(stub_, name)) {
          hooked = true;
          break;
        }
        std::this_thread::sleep_for(std::chrono::milliseconds(2));
      }
      {
        std::lock_guard<std::mutex> lock(mu_);
        if (hooked) {
          latencies_ms_.push_back(Seconds(Clock::now() - t0) * 1000);
        } else {
          ++misses_;
        }
      }
      fleets_.push_back(std::move(fleet));
      while (!*stop && Clock::now() < next) {
        std::this_thread::sleep_for(std::chrono::milliseconds(10));
      }
    }
  }
  void StopGuests() {
    for (auto& f : fleets_) f->Stop();
  }
  std::vector<double> latencies() {
    std::lock_guard<std::mutex> lock(mu_);
    std::vector<double> v = latencies_ms_;
    std::sort(v.begin(), v.end());
    return v;
  }
  int misses() {
    std::lock_guard<std::mutex> lock(mu_);
    return misses_;
  }

 private:
  std::string socket_;
  Introspection::Stub* stub_;
  int phase_;
  std::mutex mu_;
  std::vector<double> latencies_ms_;
  int misses_ = 0;
  std::vector<std::unique_ptr<kvmi::sim::Fleet>> fleets_;
};

uint64_t Replies(kvmi::sim::Fleet& fleet) {
  kvmi::host::EngineStats stats;
  fleet.AggregateStats(&stats);
  uint64_t n = 0;
  for (const auto& by_action : stats.replies_by_action) n += by_action.load();
  return n;
}

// One measurement window: the counters at its start, and per second of it at End(): the replies
// the guests got, kvmid's CPU, this process's, the machine's, and a child's (0: none).
class Window {
 public:
  struct Rates {
    double seconds = 0, events = 0, kvmid_cpu = 0, self_cpu = 0, machine = 0, child_cpu = 0;
    // With --thread_cpu, CPU per second by thread kind ("kvmid kvmid-io-#", "bench
    // grpcpp_sync_ser"): each thread alive at the window's end, from the window's start or its own
    // (a thread that ended inside the window is not counted).
    std::map<std::string, double> threads;
  };
  Window(kvmi::sim::Fleet& fleet, pid_t kvmid, pid_t child = 0)
      : fleet_(fleet),
        kvmid_(kvmid),
        child_(child),
        replies_(Replies(fleet)),
        kvmid_cpu_(CpuSeconds(kvmid)),
        self_cpu_(SelfCpuSeconds()),
        machine_(MachineBusySeconds()),
        child_cpu_(child > 0 ? CpuSeconds(child) : 0),
        by_thread_(absl::GetFlag(FLAGS_thread_cpu)),
        kvmid_threads_(by_thread_ ? ThreadCpu(kvmid) : ThreadTimes{}),
        self_threads_(by_thread_ ? ThreadCpu(::getpid()) : ThreadTimes{}),
        start_(Clock::now()) {}
  Rates End() const {
    Rates r;
    r.seconds = Seconds(Clock::now() - start_);
    r.events = (Replies(fleet_) - replies_) / r.seconds;
    r.kvmid_cpu = (CpuSeconds(kvmid_) - kvmid_cpu_) / r.seconds;
    r.self_cpu = (SelfCpuSeconds() - self_cpu_) / r.seconds;
    r.machine = (MachineBusySeconds() - machine_) / r.seconds;
    if (child_ > 0) r.child_cpu = (CpuSeconds(child_) - child_cpu_) / r.seconds;
    for (const auto& [prefix, pid, before] : {std::tuple("kvmid ", kvmid_, &kvmid_threads_),
                                              std::tuple("bench ", ::getpid(), &self_threads_)}) {
      if (!by_thread_) break;
      for (const auto& [tid, now] : ThreadCpu(pid)) {
        auto it = before->find(tid);
        const bool same = it != before->end() && it->second.first == now.first;
        r.threads[prefix + now.first] +=
            (now.second - (same ? it->second.second : 0.0)) / r.seconds;
      }
    }
    return r;
  }
  Clock::time_point start() const { return start_; }

 private:
  kvmi::sim::Fleet& fleet_;
  const pid_t kvmid_, child_;
  const uint64_t replies_;
  const double kvmid_cpu_, self_cpu_, machine_, child_cpu_;
  const bool by_thread_;  // --thread_cpu: the /proc walks below only then
  const ThreadTimes kvmid_threads_, self_threads_;
  const Clock::time_point start_;
};

std::string HookCell(HookProbe& probe) {
  std::vector<double> v = probe.latencies();
  char buf[160];
  if (v.empty()) {
    std::snprintf(buf, sizeof(buf), "none hooked (%d missed %lds)", probe.misses(),
                  static_cast<long>(kHookTimeout.count()));
  } else {
    std::snprintf(buf, sizeof(buf), "%.0f / %.0f ms (%zu hooked, %d missed)", v[v.size() / 2],
                  v.back(), v.size(), probe.misses());
  }
  return buf;
}

std::string Mib(uint64_t kib) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%.0f MiB", kib / 1024.0);
  return buf;
}

}  // namespace

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  spdlog::set_level(spdlog::level::err);  // the simulated guests' own logging
  ::signal(SIGPIPE, SIG_IGN);
  const double seconds = absl::GetFlag(FLAGS_seconds);
  const int guests = std::max(1, absl::GetFlag(FLAGS_guests));
  const std::vector<std::string> abusers = absl::GetFlag(FLAGS_abusers);
  for (const std::string& a : abusers) {
    if (a != "streams" && a != "silent_streams" && a != "policy_flood" && a != "silent_attach" &&
        a != "kvmi_flood" && a != "resume_flood") {
      std::fprintf(stderr, "--abusers: unknown '%s'\n", a.c_str());
      return 2;
    }
  }
  auto runs = [&](const char* abuser) {
    return std::find(abusers.begin(), abusers.end(), abuser) != abusers.end();
  };
  const int streams = runs("streams") ? std::max(0, absl::GetFlag(FLAGS_streams)) : 0;
  const int silent_streams =
      runs("silent_streams") ? std::max(0, absl::GetFlag(FLAGS_silent_streams)) : 0;
  std::string kvmid_binary = absl::GetFlag(FLAGS_kvmid);
  if (::access(kvmid_binary.c_str(), X_OK) != 0) {
    std::fprintf(stderr, "--kvmid: %s is not executable\n", kvmid_binary.c_str());
    return 2;
  }
  char dir_template[] = "/tmp/kvmid-abuse-XXXXXX";
  const std::string dir = ::mkdtemp(dir_template);
  ::chmod(dir.c_str(), 0755);  // the flood child (another uid) reaches the KVMI socket
  const std::string kvmi_socket = dir + "/kvmi.sock";
  const std::string api_socket = dir + "/api.sock";
  const std::string api_target = "unix:" + api_socket;
  // The bench opens every stream again each round: kvmid's default opening rate (20 a second
  // after a burst of twice streams_per_identity) would refuse the third round's. Not with the
  // resume flood, whose churn that rate is there to bound.
  const std::string opens_limit =
      runs("resume_flood")
          ? ""
          : " stream_opens_per_second: " + std::to_string(2 * (streams + silent_streams) + 20);
  {
    std::ofstream config(dir + "/kvmid.textproto");
    config << "listen { unix_socket: \"" << kvmi_socket << "\" api_socket: \"" << api_socket
           << "\" }\n"
           << "io_threads: " << absl::GetFlag(FLAGS_io_threads) << "\n"
           << "verdicts { default_deadline_ms: 1000 default_fallback: ACTION_CONTINUE }\n"
           << "limits { streams_per_identity: " << streams + silent_streams + 64 << opens_limit
           << " }\n"
           << "policies { name: \"allow-cr3\" match { events: [EVENT_TYPE_CR] cr: 3 } "
              "action: ACTION_CONTINUE mode: MODE_ENFORCE }\n";
  }

  // Children first, before any thread: the flood child is forked and waits for its "go".
  int go_pipe[2], result_pipe[2];
  if (::pipe2(go_pipe, O_CLOEXEC) != 0 || ::pipe2(result_pipe, O_CLOEXEC) != 0) return 1;
  std::atomic<pid_t> flood = ::fork();
  if (flood == 0) {
    ::close(go_pipe[1]);
    ::close(result_pipe[0]);
    FloodChild(go_pipe[0], result_pipe[1], kvmi_socket, absl::GetFlag(FLAGS_flood_uid),
               static_cast<int64_t>(absl::GetFlag(FLAGS_flood_interval_ms) * 1e6),
               static_cast<int64_t>(absl::GetFlag(FLAGS_flood_hold_seconds) * 1e9), true);
  }
  ::close(go_pipe[0]);
  ::close(result_pipe[1]);
  const bool wakeup_control = runs("kvmi_flood") && absl::GetFlag(FLAGS_wakeup_control);
  int ticker_go[2] = {-1, -1};
  std::atomic<pid_t> ticker = 0;
  if (wakeup_control) {
    if (::pipe2(ticker_go, O_CLOEXEC) != 0) return 1;
    ticker = ::fork();
    if (ticker == 0) {
      ::close(ticker_go[1]);
      FloodChild(ticker_go[0], -1, kvmi_socket, absl::GetFlag(FLAGS_flood_uid),
                 static_cast<int64_t>(absl::GetFlag(FLAGS_flood_interval_ms) * 1e6), 0, false);
    }
    ::close(ticker_go[0]);
  }
  std::atomic<pid_t> kvmid =
      StartKvmid(kvmid_binary,
                 {"--config=" + dir + "/kvmid.textproto", "--kvmi_socket_mode=0666",
                  "--metrics_address=", "--state_dir=" + dir + "/state", "--log_level=warn"},
                 dir + "/kvmid.log");
  auto cleanup = [&] {
    KillAndReap(flood, SIGKILL);
    KillAndReap(ticker, SIGKILL);
    KillAndReap(kvmid, SIGTERM);
    if (absl::GetFlag(FLAGS_keep)) {
      std::fprintf(stderr, "kept %s\n", dir.c_str());
      return;
    }
    std::string rm = "rm -rf '" + dir + "'";
    if (std::system(rm.c_str()) != 0) std::fprintf(stderr, "could not remove %s\n", dir.c_str());
  };
  // Whatever happens below, the bench ends: a watchdog kills the children and exits.
  std::thread([&, limit = (2 * std::max(1, absl::GetFlag(FLAGS_rounds)) + 3) * seconds +
                          std::max(1, absl::GetFlag(FLAGS_rounds)) *
                              (60 + std::max(0.0, absl::GetFlag(FLAGS_settle_seconds))) +
                          120] {
    std::this_thread::sleep_for(std::chrono::duration<double>(limit));
    std::fprintf(stderr, "abuse_bench: watchdog after %.0f s, killing kvmid and the flood\n",
                 limit);
    if (flood > 0) ::kill(flood, SIGKILL);
    if (ticker > 0) ::kill(ticker, SIGKILL);
    if (kvmid > 0) ::kill(kvmid, SIGKILL);
    ::_exit(3);
  }).detach();

  auto fail = [&](const std::string& what) {
    std::fprintf(stderr, "abuse_bench: %s (kvmid log: %s/kvmid.log)\n", what.c_str(), dir.c_str());
    std::string tail = "tail -n 20 '" + dir + "/kvmid.log' >&2";
    if (std::system(tail.c_str()) != 0) std::fprintf(stderr, "(no log)\n");
    cleanup();
    return 1;
  };

  auto control = Introspection::NewStub(NewChannel(api_target, -1, false));
  auto start_deadline = Clock::now() + kStartTimeout;
  while (true) {
    if (::waitpid(kvmid, nullptr, WNOHANG) == kvmid) {
      kvmid = 0;
      return fail("kvmid exited at start");
    }
    grpc::ClientContext ctx;
    ctx.set_deadline(ToSystem(Clock::now() + std::chrono::seconds(1)));
    kvmi::v1::ListVMsResponse list;
    if (control->ListVMs(&ctx, kvmi::v1::ListVMsRequest(), &list).ok()) break;
    if (Clock::now() > start_deadline) return fail("kvmid's API did not come up");
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  Sampler sampler(kvmid, static_cast<uint64_t>(absl::GetFlag(FLAGS_max_rss_mib)) * 1024);
  kvmi::sim::Fleet fleet(GuestFleetConfig(kvmi_socket, guests, "guest-", 1, true));
  fleet.Start();
  while (fleet.hooked_count() < static_cast<size_t>(guests) || Replies(fleet) < 100u * guests) {
    if (Clock::now() > start_deadline) {
      fleet.Stop();
      return fail("the fleet did not hook (" + std::to_string(fleet.hooked_count()) + " of " +
                  std::to_string(guests) + ")");
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  std::this_thread::sleep_for(std::chrono::milliseconds(500));  // warm-up

  // ---- the windows: quiet, [control,] then `rounds` times abuse and quiet again ----
  // Every abuse window is compared with the quiet windows on both sides of it (this kind's
  // throughput drifts by 10-20% between minutes: a single quiet window is a poor baseline), and
  // the result is the median over the rounds.
  const int rounds = std::max(1, absl::GetFlag(FLAGS_rounds));
  const std::string load_at_start = LoadAverage();
  int probe_phase = 0;                             // names the probes' guests apart
  std::vector<std::unique_ptr<HookProbe>> probes;  // their guests stay connected until the end
  auto new_probe = [&] {
    probes.push_back(std::make_unique<HookProbe>(kvmi_socket, control.get(), probe_phase++));
    return probes.back().get();
  };
  // A quiet window (with a probe hooking new guests, as in the abuse windows).
  auto quiet_window = [&]() {
    std::atomic<bool> stop{false};
    HookProbe* probe = new_probe();
    std::thread probe_thread([&] { probe->Run(&stop); });
    const Window window(fleet, kvmid);
    std::this_thread::sleep_for(std::chrono::duration<double>(seconds));
    const Window::Rates rates = window.End();
    stop = true;
    probe_thread.join();
    return rates;
  };
  sampler.SetPhase(kQuiet);
  std::vector<Window::Rates> quiet;  // rounds + 1 windows
  quiet.push_back(quiet_window());
  HookProbe* quiet_probe = probes.back().get();
  const Sampler::Max quiet_max = sampler.max(kQuiet);

  // ---- control: only the flood's wake-ups (same interval, same uid), nothing sent to kvmid ----
  Window::Rates wakeups;
  if (wakeup_control) {
    const Window control_window(fleet, kvmid, ticker);
    double ticker_seconds = seconds;
    ssize_t go = ::write(ticker_go[1], &ticker_seconds, sizeof(ticker_seconds));
    (void)go;
    std::this_thread::sleep_for(std::chrono::duration<double>(seconds));
    wakeups = control_window.End();
    KillAndReap(ticker, SIGKILL);
    ticker = 0;
  }

  kvmi::v1::StreamEventsRequest idle_request;
  idle_request.add_allow()->add_events(kvmi::v1::EVENT_TYPE_BREAKPOINT);  // not in the workload
  if (const int beat_ms = absl::GetFlag(FLAGS_idle_heartbeat_ms); beat_ms >= 0) {
    idle_request.mutable_heartbeat_interval()->set_seconds(beat_ms / 1000);
    idle_request.mutable_heartbeat_interval()->set_nanos((beat_ms % 1000) * 1000000);
  }
  kvmi::v1::StreamEventsRequest silent_request;
  silent_request.set_include_registers(true);  // every event, as big as they come
  const bool open_first = absl::GetFlag(FLAGS_open_streams_first);
  const double settle = open_first ? std::max(0.0, absl::GetFlag(FLAGS_settle_seconds)) : 0.0;
  // The abusers keep their tallies over every round.
  PolicyFlood policy_flood;
  ResumeFlood resume_flood;
  SilentAttach silent_attach;
  auto policy_stub = Introspection::NewStub(NewChannel(api_target, -2, false));
  auto resume_stub = Introspection::NewStub(NewChannel(api_target, -4, false));
  auto attach_stub = Introspection::NewStub(NewChannel(api_target, -3, false));
  const std::atomic<bool> not_running{true};  // the stop flag of an abuser left out
  struct Round {
    Window::Rates abuse;
    HookProbe* probe = nullptr;
    std::unique_ptr<StreamFleet> idle, silent;
    size_t idle_open = 0, silent_open = 0;
    bool idle_closed = true, silent_closed = true;
    double streams_started_s = 0;
    FloodResult flood;
  };
  std::vector<Round> done;
  bool guard_cut = false;
  bool flood_lost = false;  // the flood child did not report a round: stopped, no more rounds
  for (int r = 0; r < rounds && !guard_cut && !flood_lost; ++r) {
    // ---- abuse ----
    Round round;
    sampler.SetPhase(kAbuse);
    std::atomic<bool> abuse_stop{false};
    // Cancelled before that.
    const auto stream_deadline =
        Clock::now() + std::chrono::duration_cast<Clock::duration>(
                           std::chrono::duration<double>(settle + seconds + 30));
    const auto open_streams = [&] {  // `streams` is 0 for an abuser left out
      round.idle = std::make_unique<StreamFleet>(api_target, streams, absl::GetFlag(FLAGS_channels),
                                                 true, idle_request, stream_deadline);
      round.silent = std::make_unique<StreamFleet>(api_target, silent_streams,
                                                   absl::GetFlag(FLAGS_silent_channels), false,
                                                   silent_request, stream_deadline);
    };
    if (open_first) {
      const auto open_start = Clock::now();
      open_streams();
      round.streams_started_s = Seconds(Clock::now() - open_start);
      std::this_thread::sleep_for(std::chrono::duration<double>(settle));
    }
    const Clock::time_point abuse_end = Clock::now() + std::chrono::duration_cast<Clock::duration>(
                                                           std::chrono::duration<double>(seconds));
    const Window abuse_window(fleet, kvmid, flood);
    double flood_seconds = seconds;
    if (runs("kvmi_flood")) {
      ssize_t go = ::write(go_pipe[1], &flood_seconds, sizeof(flood_seconds));
      (void)go;
    }
    std::thread policy_thread([&] {
      policy_flood.Run(policy_stub.get(), runs("policy_flood") ? &abuse_stop : &not_running,
                       abuse_end);
    });
    std::thread resume_thread([&] {
      resume_flood.Run(resume_stub.get(), runs("resume_flood") ? &abuse_stop : &not_running,
                       abuse_end);
    });
    std::thread attach_thread([&] {
      silent_attach.Run(attach_stub.get(), runs("silent_attach") ? &abuse_stop : &not_running,
                        abuse_end);
    });
    round.probe = new_probe();
    std::thread abuse_probe_thread([&] { round.probe->Run(&abuse_stop); });
    if (!open_first) {
      open_streams();
      round.streams_started_s = Seconds(Clock::now() - abuse_window.start());
    }
    while (Clock::now() < abuse_end && !sampler.over_guard()) {
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    guard_cut = sampler.over_guard();
    round.abuse = abuse_window.End();
    round.idle_open = round.idle->open();
    round.silent_open = round.silent->open();

    // ---- teardown of the abuse, then quiet again ----
    abuse_stop = true;
    silent_attach.Cancel();
    const auto close_deadline = Clock::now() + kTeardownTimeout;
    round.idle_closed = round.idle->Close(close_deadline);
    round.silent_closed = round.silent->Close(close_deadline);
    policy_thread.join();
    resume_thread.join();
    attach_thread.join();
    abuse_probe_thread.join();
    if (runs("kvmi_flood")) {
      // A cut window ends before the child's run does, and a result that does not come would
      // come later, as the next round's: either way the child is stopped and the rounds end.
      pollfd p{result_pipe[0], POLLIN, 0};
      bool reported = !guard_cut && ::poll(&p, 1, 5000) == 1 &&
                      ::read(result_pipe[0], &round.flood, sizeof(round.flood)) ==
                          static_cast<ssize_t>(sizeof(round.flood));
      if (!reported) {
        round.flood = FloodResult{};
        KillAndReap(flood, SIGKILL);
        flood = 0;
        flood_lost = !guard_cut;
      }
    }
    sampler.SetPhase(kAfter);
    policy_flood.Clean(control.get(), Clock::now() + kTeardownTimeout);
    std::this_thread::sleep_for(std::chrono::seconds(2));
    done.push_back(std::move(round));
    // The quiet window on the far side of this abuse (and the near side of the next one).
    quiet.push_back(quiet_window());
  }
  KillAndReap(flood, SIGKILL);
  flood = 0;
  const ProcStatus after = sampler.last();
  const Sampler::Max abuse_max = sampler.max(kAbuse);
  const Sampler::Max after_max = sampler.max(kAfter);
  const bool kvmid_alive = ::waitpid(kvmid, nullptr, WNOHANG) == 0;
  sampler.Stop();
  struct stat log_stat {};
  ::stat((dir + "/kvmid.log").c_str(), &log_stat);

  // ---- the tables ----
  std::printf(
      "\nkvmid under abuse: %d guests (1 vCPU, CR3 writes decided by an in-daemon policy; "
      "CR4 writes for the silent Attach: %d per mille), %.1f s per window, %zu rounds\n",
      guests, absl::GetFlag(FLAGS_cr4_per_mille), seconds, done.size());
  std::string abuser_list;
  for (const std::string& a : abusers) abuser_list += (abuser_list.empty() ? "" : ",") + a;
  std::printf("abusers: %s\n", abuser_list.empty() ? "none" : abuser_list.c_str());
  std::printf("machine: %s, %u CPUs online, load average %s at the start\n\n", CpuModel().c_str(),
              std::thread::hardware_concurrency(), load_at_start.c_str());
  std::printf(
      "| round | quiet before (events/s) | abuse (events/s) | quiet after (events/s) | abuse / "
      "quiet before | **abuse / mean of both quiet windows** | kvmid CPU quiet / abuse | bench "
      "CPU quiet / abuse | flood child CPU | machine busy quiet / abuse (of %u) | new guest "
      "connect -> hooked during the abuse, p50 / max |\n"
      "|---:|---:|---:|---:|---:|---:|---|---|---:|---|---|\n",
      std::thread::hardware_concurrency());
  std::vector<double> both_ratios;
  for (size_t i = 0; i < done.size(); ++i) {
    const Window::Rates& before = quiet[i];
    const Window::Rates& a = done[i].abuse;
    const Window::Rates& again = quiet[i + 1];
    const double both =
        before.events + again.events > 0 ? a.events / ((before.events + again.events) / 2) : 0;
    both_ratios.push_back(both);
    std::printf(
        "| %zu | %.0f | %.0f | %.0f | %.2fx | **%.2fx** | %.2f / %.2f | %.2f / %.2f | %.2f | "
        "%.2f / %.2f | %s |\n",
        i + 1, before.events, a.events, again.events,
        before.events > 0 ? a.events / before.events : 0, both, before.kvmid_cpu, a.kvmid_cpu,
        before.self_cpu, a.self_cpu, a.child_cpu, before.machine, a.machine,
        HookCell(*done[i].probe).c_str());
  }
  if (absl::GetFlag(FLAGS_thread_cpu)) {
    for (size_t i = 0; i < done.size(); ++i) {
      std::map<std::string, std::pair<double, double>> kinds;  // quiet before, abuse
      for (const auto& [name, cpu] : quiet[i].threads) kinds[name].first = cpu;
      for (const auto& [name, cpu] : done[i].abuse.threads) kinds[name].second = cpu;
      std::vector<std::pair<std::string, std::pair<double, double>>> rows(kinds.begin(),
                                                                          kinds.end());
      std::sort(rows.begin(), rows.end(), [](const auto& a, const auto& b) {
        return std::abs(a.second.second - a.second.first) >
               std::abs(b.second.second - b.second.first);
      });
      std::printf(
          "\nround %zu, CPU per second by thread kind | quiet before | abuse |\n|---|---:|---:|\n",
          i + 1);
      for (size_t k = 0; k < rows.size(); ++k) {
        if (rows[k].second.first < 0.0005 && rows[k].second.second < 0.0005) continue;
        std::printf("| %s | %.3f | %.3f |\n", rows[k].first.c_str(), rows[k].second.first,
                    rows[k].second.second);
      }
    }
  }
  std::vector<double> sorted = both_ratios;
  std::sort(sorted.begin(), sorted.end());
  const size_t n = sorted.size();
  const double median =
      n == 0 ? 0 : (n % 2 == 1 ? sorted[n / 2] : (sorted[n / 2 - 1] + sorted[n / 2]) / 2);
  std::printf("\n| measure | value | target |\n|---|---:|---|\n");
  std::printf(
      "| guest events/s under abuse / mean of the quiet windows on both sides, median of %zu "
      "rounds | **%.2fx** | >= 0.9x |\n",
      done.size(), median);
  if (wakeup_control) {
    std::printf(
        "| control: guest events/s while a process only wakes every %.1f ms (no kvmid work), "
        "against the first quiet window | %.0f (%.2fx; kvmid CPU %.2f, its CPU %.2f) | |\n",
        absl::GetFlag(FLAGS_flood_interval_ms), wakeups.events,
        quiet[0].events > 0 ? wakeups.events / quiet[0].events : 0, wakeups.kvmid_cpu,
        wakeups.child_cpu);
  }
  std::printf("| kvmid RSS peak (VmRSS, sampled): quiet / abuse | %s / %s | < 512 MiB |\n",
              Mib(quiet_max.rss_kib).c_str(), Mib(abuse_max.rss_kib).c_str());
  std::printf(
      "| kvmid threads (min-max): first quiet / abuse / after | %llu-%llu / %llu-%llu / "
      "%llu-%llu | flat |\n",
      static_cast<unsigned long long>(quiet_max.min_threads),
      static_cast<unsigned long long>(quiet_max.threads),
      static_cast<unsigned long long>(abuse_max.min_threads),
      static_cast<unsigned long long>(abuse_max.threads),
      static_cast<unsigned long long>(after_max.min_threads),
      static_cast<unsigned long long>(after_max.threads));
  std::printf("| new guest connect -> hooked (GetVM), first quiet window | %s | < 2 s |\n",
              HookCell(*quiet_probe).c_str());
  if (flood_lost) {
    std::printf("\nTHE KVMI FLOOD CHILD DID NOT REPORT round %zu: stopped, no further rounds\n",
                done.size());
  }
  if (guard_cut) {
    std::printf("\nTHE ABUSE WINDOW WAS CUT after %.1f s: kvmid's RSS passed --max_rss_mib=%d\n",
                done.back().abuse.seconds, absl::GetFlag(FLAGS_max_rss_mib));
  }
  std::printf(
      "\nat the end (clients gone, flood policies deleted, a last quiet window): RSS %s, VmHWM %s, "
      "threads %llu (max %llu after the first abuse); kvmid %s; kvmid log %lld bytes\n",
      Mib(after.rss_kib).c_str(), Mib(after.hwm_kib).c_str(),
      static_cast<unsigned long long>(after.threads),
      static_cast<unsigned long long>(after_max.threads), kvmid_alive ? "alive" : "DEAD",
      static_cast<long long>(log_stat.st_size));
  std::printf("\nabusers, per round (%.1f s each; streams opened %s):\n", seconds,
              open_first
                  ? absl::StrFormat("before the window, then %.1f s to settle", settle).c_str()
                  : "inside the window");
  for (size_t i = 0; i < done.size(); ++i) {
    const Round& round = done[i];
    std::printf(
        "  round %zu: idle streams: %zu started in %.2f s, %zu open at the end of the window, "
        "%llu messages read; ended: %s%s\n",
        i + 1, round.idle->size(), round.streams_started_s, round.idle_open,
        static_cast<unsigned long long>(round.idle->messages()),
        round.idle->tally().Describe().c_str(), round.idle_closed ? "" : " (some never finished)");
    std::printf(
        "           non-reading streams: %zu started, %zu open at the end of the window; ended: "
        "%s%s\n",
        round.silent->size(), round.silent_open, round.silent->tally().Describe().c_str(),
        round.silent_closed ? "" : " (some never finished)");
    std::printf("           streams refused: %llu (RESOURCE_EXHAUSTED: the limit)\n",
                static_cast<unsigned long long>(
                    round.idle->tally().Count(grpc::StatusCode::RESOURCE_EXHAUSTED) +
                    round.silent->tally().Count(grpc::StatusCode::RESOURCE_EXHAUSTED)));
    std::printf(
        "           KVMI flood (uid %d, every %.1f ms, held %.0f s): %llu connected, %llu refused "
        "(last errno: %s), %llu closed by kvmid before the client let go\n",
        round.flood.uid, absl::GetFlag(FLAGS_flood_interval_ms),
        absl::GetFlag(FLAGS_flood_hold_seconds),
        static_cast<unsigned long long>(round.flood.connected),
        static_cast<unsigned long long>(round.flood.refused),
        round.flood.last_errno != 0 ? std::strerror(round.flood.last_errno) : "-",
        static_cast<unsigned long long>(round.flood.closed_by_kvmid));
  }
  std::printf("  every round together:\n");
  std::printf(
      "  policy flood (%d names, %d-byte descriptions): %llu calls: %s; %.1f MiB accepted\n",
      absl::GetFlag(FLAGS_policy_names), absl::GetFlag(FLAGS_policy_description_bytes),
      static_cast<unsigned long long>(policy_flood.applied.Total()),
      policy_flood.applied.Describe().c_str(), policy_flood.bytes.load() / 1048576.0);
  std::printf("  flood policies deleted after each round: %s\n",
              policy_flood.deleted.Describe().c_str());
  if (runs("resume_flood")) {
    std::printf(
        "  resume flood (resume_after %llu): %llu streams, %llu first messages; ended: %s\n",
        static_cast<unsigned long long>(absl::GetFlag(FLAGS_resume_after)),
        static_cast<unsigned long long>(resume_flood.streams.Total()),
        static_cast<unsigned long long>(resume_flood.first_messages.load()),
        resume_flood.streams.Describe().c_str());
  }
  std::printf(
      "  silent Attach: %llu claims held (deadline_ms %u), %llu events held unanswered; "
      "streams ended: %s\n",
      static_cast<unsigned long long>(silent_attach.claimed.load()),
      silent_attach.deadline_ms.load(),
      static_cast<unsigned long long>(silent_attach.events_held.load()),
      silent_attach.streams.Describe().c_str());
  std::fflush(stdout);

  for (auto& probe : probes) probe->StopGuests();
  fleet.Stop();
  cleanup();
  for (Round& round : done) {  // reactors gRPC may still reference; the process ends here
    round.idle.release();
    round.silent.release();
  }
  return 0;
}
