#include "daemon/metrics/process_metrics.h"

#include <absl/strings/numbers.h>
#include <absl/strings/str_cat.h>
#include <absl/strings/str_split.h>
#include <dirent.h>
#include <sys/resource.h>
#include <unistd.h>

#include <fstream>
#include <sstream>

namespace kvmid {
namespace {

absl::StatusOr<std::string> ReadFile(const std::string& path) {
  std::ifstream in(path);
  if (!in) return absl::UnavailableError(absl::StrCat("cannot read ", path));
  std::stringstream buffer;
  buffer << in.rdbuf();
  return buffer.str();
}

prometheus::MetricFamily Family(const char* name, const char* help, prometheus::MetricType type,
                                double value) {
  prometheus::MetricFamily family;
  family.name = name;
  family.help = help;
  family.type = type;
  prometheus::ClientMetric metric;
  if (type == prometheus::MetricType::Counter) {
    metric.counter.value = value;
  } else {
    metric.gauge.value = value;
  }
  family.metric.push_back(metric);
  return family;
}

}  // namespace

absl::Status ParseProcStat(const std::string& stat, long ticks_per_second, long page_size,
                           uint64_t boot_time_seconds, ProcessStats* out) {
  // "pid (comm) state ppid ...": comm may hold spaces and parentheses, so fields are counted
  // from the last ')'.
  size_t close = stat.rfind(')');
  if (close == std::string::npos) return absl::InvalidArgumentError("/proc stat: no ')'");
  std::vector<absl::string_view> fields =
      absl::StrSplit(absl::string_view(stat).substr(close + 1), ' ', absl::SkipWhitespace());
  // fields[0] is field 3 (state) of proc(5); field N is fields[N - 3].
  constexpr size_t kUtime = 14, kStime = 15, kThreads = 20, kStart = 22, kVsize = 23, kRss = 24;
  if (fields.size() < kRss - 2) {
    return absl::InvalidArgumentError(
        absl::StrCat("/proc stat: ", fields.size() + 2, " fields, expected at least ", kRss));
  }
  auto field = [&](size_t n, uint64_t* value) -> absl::Status {
    if (!absl::SimpleAtoi(fields[n - 3], value)) {
      return absl::InvalidArgumentError(
          absl::StrCat("/proc stat: field ", n, " '", fields[n - 3], "' is not a number"));
    }
    return absl::OkStatus();
  };
  uint64_t utime = 0, stime = 0, threads = 0, start = 0, vsize = 0, rss = 0;
  for (auto [n, value] : {std::pair<size_t, uint64_t*>{kUtime, &utime},
                          {kStime, &stime},
                          {kThreads, &threads},
                          {kStart, &start},
                          {kVsize, &vsize},
                          {kRss, &rss}}) {
    absl::Status s = field(n, value);
    if (!s.ok()) return s;
  }
  if (ticks_per_second <= 0 || page_size <= 0) {
    return absl::InvalidArgumentError("ticks per second and page size must be positive");
  }
  out->cpu_seconds = static_cast<double>(utime + stime) / static_cast<double>(ticks_per_second);
  out->threads = threads;
  out->start_time_seconds = static_cast<double>(boot_time_seconds) +
                            static_cast<double>(start) / static_cast<double>(ticks_per_second);
  out->virtual_bytes = vsize;
  out->resident_bytes = rss * static_cast<uint64_t>(page_size);
  return absl::OkStatus();
}

absl::StatusOr<uint64_t> ParseBootTime(const std::string& proc_stat) {
  for (absl::string_view line : absl::StrSplit(proc_stat, '\n')) {
    if (!absl::ConsumePrefix(&line, "btime ")) continue;
    uint64_t btime = 0;
    if (!absl::SimpleAtoi(line, &btime)) {
      return absl::InvalidArgumentError(absl::StrCat("/proc/stat: btime '", line, "'"));
    }
    return btime;
  }
  return absl::NotFoundError("/proc/stat: no btime line");
}

absl::StatusOr<ProcessStats> ReadProcessStats() {
  absl::StatusOr<std::string> stat = ReadFile("/proc/self/stat");
  if (!stat.ok()) return stat.status();
  absl::StatusOr<std::string> system_stat = ReadFile("/proc/stat");
  if (!system_stat.ok()) return system_stat.status();
  absl::StatusOr<uint64_t> boot_time = ParseBootTime(*system_stat);
  if (!boot_time.ok()) return boot_time.status();
  ProcessStats stats;
  absl::Status s =
      ParseProcStat(*stat, ::sysconf(_SC_CLK_TCK), ::sysconf(_SC_PAGESIZE), *boot_time, &stats);
  if (!s.ok()) return s;
  DIR* fds = ::opendir("/proc/self/fd");
  if (fds == nullptr) return absl::UnavailableError("cannot list /proc/self/fd");
  while (dirent* entry = ::readdir(fds)) {
    if (entry->d_name[0] != '.') ++stats.open_fds;
  }
  ::closedir(fds);
  if (stats.open_fds > 0) --stats.open_fds;  // the directory stream's own descriptor
  rlimit limit{};
  if (::getrlimit(RLIMIT_NOFILE, &limit) == 0) stats.max_fds = limit.rlim_cur;
  return stats;
}

std::vector<prometheus::MetricFamily> ProcessCollector::Collect() const {
  absl::StatusOr<ProcessStats> stats = ReadProcessStats();
  if (!stats.ok()) return {};
  using prometheus::MetricType;
  return {
      Family("process_cpu_seconds_total", "Total user and system CPU time spent in seconds.",
             MetricType::Counter, stats->cpu_seconds),
      Family("process_resident_memory_bytes", "Resident memory size in bytes.", MetricType::Gauge,
             static_cast<double>(stats->resident_bytes)),
      Family("process_virtual_memory_bytes", "Virtual memory size in bytes.", MetricType::Gauge,
             static_cast<double>(stats->virtual_bytes)),
      Family("process_open_fds", "Number of open file descriptors.", MetricType::Gauge,
             static_cast<double>(stats->open_fds)),
      Family("process_max_fds", "Maximum number of open file descriptors.", MetricType::Gauge,
             static_cast<double>(stats->max_fds)),
      Family("process_threads", "Number of OS threads in the process.", MetricType::Gauge,
             static_cast<double>(stats->threads)),
      Family("process_start_time_seconds", "Start time of the process since unix epoch in seconds.",
             MetricType::Gauge, stats->start_time_seconds),
  };
}

}  // namespace kvmid
