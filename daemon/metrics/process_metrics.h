// The standard process_* series (as every Prometheus client library exports them), read from
// /proc/self at scrape time: CPU seconds, resident and virtual memory, open and maximum file
// descriptors, threads, start time.
#ifndef KVMID_DAEMON_METRICS_PROCESS_METRICS_H_
#define KVMID_DAEMON_METRICS_PROCESS_METRICS_H_

#include <absl/status/statusor.h>
#include <prometheus/collectable.h>
#include <prometheus/metric_family.h>

#include <cstdint>
#include <string>
#include <vector>

namespace kvmid {

struct ProcessStats {
  double cpu_seconds = 0;  // user + system
  uint64_t resident_bytes = 0;
  uint64_t virtual_bytes = 0;
  uint64_t open_fds = 0;
  uint64_t max_fds = 0;  // RLIMIT_NOFILE soft limit
  uint64_t threads = 0;
  double start_time_seconds = 0;  // since the Unix epoch
};

// Parses the content of /proc/<pid>/stat; `ticks_per_second` (sysconf(_SC_CLK_TCK)),
// `page_size` and `boot_time_seconds` (/proc/stat's btime) convert its units. Fills the fields
// /proc/<pid>/stat has (cpu, memory, threads, start time).
absl::Status ParseProcStat(const std::string& stat, long ticks_per_second, long page_size,
                           uint64_t boot_time_seconds, ProcessStats* out);
// The boot time from the content of /proc/stat ("btime N").
absl::StatusOr<uint64_t> ParseBootTime(const std::string& proc_stat);

// This process, now.
absl::StatusOr<ProcessStats> ReadProcessStats();

class ProcessCollector : public prometheus::Collectable {
 public:
  // Empty (nothing exported) if /proc cannot be read; the scrape still succeeds.
  std::vector<prometheus::MetricFamily> Collect() const override;
};

}  // namespace kvmid

#endif  // KVMID_DAEMON_METRICS_PROCESS_METRICS_H_
