// The daemon's live view of events for an operator: one line per event (rate-limited, never
// blocking the event path), a stats line every few seconds, and a summary at exit.
#ifndef KVMID_DAEMON_EVENT_LOG_H_
#define KVMID_DAEMON_EVENT_LOG_H_

#include <array>
#include <atomic>
#include <cstdint>
#include <string>
#include <thread>

#include "daemon/base/mutex.h"
#include "daemon/verdict/pipeline.h"

namespace kvmid {

enum class EventLogMode : uint8_t { kNone, kBlocked, kAll };
bool ParseEventLogMode(const std::string& text, EventLogMode* mode);

struct EventLogOptions {
  EventLogMode mode = EventLogMode::kBlocked;
  int max_lines_per_second = 20;
  std::chrono::seconds stats_period{5};
};

// One line describing an observed event ("vm web-1 vCPU 2 KVMI_EVENT_CR cr3 0x1000->0x2000 ...").
std::string DescribeEvent(const ObservedEvent& observed);

class EventLog {
 public:
  EventLog(VerdictPipeline* pipeline, EventLogOptions options);
  ~EventLog();
  void Stop();
  void PrintSummary() const;

 private:
  void OnEvent(const ObservedEvent& observed);
  void StatsLoop();

  VerdictPipeline* pipeline_;
  EventLogOptions options_;
  uint64_t observer_id_;

  std::array<std::atomic<uint64_t>, KVMI_NUM_EVENTS> by_event_{};
  std::atomic<uint64_t> by_policy_{0}, by_handler_{0}, by_fallback_{0}, by_default_{0}, other_{0};
  // Latency histogram, power-of-two microsecond buckets.
  std::array<std::atomic<uint64_t>, 32> latency_us_{};
  std::atomic<int64_t> window_start_s_{0};
  std::atomic<int> lines_in_window_{0};
  std::atomic<uint64_t> suppressed_{0};

  Mutex mutex_;
  CondVar cv_;
  bool stopping_ ABSL_GUARDED_BY(mutex_) = false;
  std::thread stats_thread_;
};

}  // namespace kvmid

#endif  // KVMID_DAEMON_EVENT_LOG_H_
