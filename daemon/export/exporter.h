// Event export for log pipelines (Fluent Bit, Vector, Filebeat): every event with its verdict
// and every guest state change, as one JSON object per line (docs/OPERATING.md has the fields).
//
//   {"type":"event","time":"2026-12-05T08:11:50.123456789Z","node":"hv-1","id":42,...}
//   {"type":"guest","time":"...","node":"hv-1","vm_uuid":"...","vm_name":"web-1","state":"hooked"}
//   {"type":"drops","time":"...","node":"hv-1","dropped":17,"dropped_total":17}
//
// It never blocks a guest. A pipeline observer and a registry state watcher copy what they see
// into a bounded queue (a short lock, no I/O); one writer thread formats and writes. When the
// queue is full (the disk is slow, or the writer is stalled) records are dropped and counted:
// the count is logged at most once per report period and, once records flow again, written as
// a "drops" record ahead of them.
#ifndef KVMID_DAEMON_EXPORT_EXPORTER_H_
#define KVMID_DAEMON_EXPORT_EXPORTER_H_

#include <absl/base/thread_annotations.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <deque>
#include <memory>
#include <string>
#include <thread>
#include <variant>

#include "daemon/base/mutex.h"
#include "daemon/export/rotating_file.h"
#include "daemon/registry/registry.h"
#include "daemon/verdict/pipeline.h"

namespace kvmid {

inline constexpr size_t kDefaultExportQueue = 16384;
inline constexpr size_t kMaxExportQueue = 1u << 20;

// A guest's lifecycle change, as seen when it happened.
struct GuestChange {
  std::shared_ptr<Guest> guest;
  GuestState state = GuestState::kGone;
  std::chrono::system_clock::time_point time;
};

// The JSON lines (each ends with '\n'). `node` is the node name.
std::string EventRecord(const ObservedEvent& event, const std::string& node);
std::string GuestRecord(const GuestChange& change, const std::string& node);
std::string DropsRecord(uint64_t dropped, uint64_t dropped_total,
                        std::chrono::system_clock::time_point time, const std::string& node);
// RFC 3339 in UTC with nanoseconds: 2026-12-05T08:11:50.123456789Z.
std::string Rfc3339(std::chrono::system_clock::time_point time);

class Exporter {
 public:
  struct Options {
    size_t queue_capacity = kDefaultExportQueue;     // records waiting for the writer
    std::chrono::milliseconds report_period{10000};  // drop log lines at most this often
    std::string node;                                // stamped on every record
  };
  Exporter(std::unique_ptr<RecordSink> sink, Options options);
  ~Exporter();  // Stop()

  // Observes `pipeline` and `registry` and starts the writer. Both must outlive Stop().
  void Attach(VerdictPipeline* pipeline, Registry* registry);
  // Stops observing, writes what is queued, stops the writer. Idempotent. Call it once nothing
  // delivers events any more (after Daemon::Shutdown and the API server's shutdown): an
  // observer call already under way when it starts may still reach this object.
  void Stop();

  // Any thread; never blocks on I/O. False if the queue was full (the record is counted).
  bool Offer(const ObservedEvent& event);
  bool Offer(GuestChange change);

  // For the metrics: records dropped (queue full), written, and lost to write errors.
  uint64_t dropped() const { return dropped_.load(std::memory_order_relaxed); }
  uint64_t written() const { return written_.load(std::memory_order_relaxed); }
  uint64_t write_errors() const { return write_errors_.load(std::memory_order_relaxed); }

  // Starts the writer without attaching to anything (tests offer records themselves).
  void StartWriter();

 private:
  using Item = std::variant<ObservedEvent, GuestChange>;
  bool Push(Item item);
  void WriterLoop();
  void WriteBatch(std::deque<Item>* batch, uint64_t drops);
  void MaybeReportDrops(bool force);

  const std::unique_ptr<RecordSink> sink_;  // writer thread only
  const Options options_;
  VerdictPipeline* pipeline_ = nullptr;
  Registry* registry_ = nullptr;
  uint64_t observer_id_ = 0;
  uint64_t watcher_id_ = 0;
  std::thread writer_;

  Mutex mu_;
  CondVar wake_;
  std::deque<Item> queue_ ABSL_GUARDED_BY(mu_);
  uint64_t unreported_drops_ ABSL_GUARDED_BY(mu_) = 0;  // since the last "drops" record
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  bool running_ ABSL_GUARDED_BY(mu_) = false;

  std::atomic<uint64_t> dropped_{0};
  std::atomic<uint64_t> written_{0};
  std::atomic<uint64_t> write_errors_{0};
  // Writer thread only: the drop log line's rate limit.
  std::chrono::steady_clock::time_point last_report_{};
  uint64_t reported_dropped_ = 0;
  uint64_t reported_errors_ = 0;
};

}  // namespace kvmid

#endif  // KVMID_DAEMON_EXPORT_EXPORTER_H_
