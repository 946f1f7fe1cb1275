// Counters one VM's introspection engine keeps: events sent per type, replies per action, and the
// event round-trip time (event written -> reply executed by the vCPU). Lock-free so that the hot
// path of 800 vCPUs does not serialise on them; a fleet sums them at exit.
#ifndef KVMID_KERNEL_HOST_STATS_H_
#define KVMID_KERNEL_HOST_STATS_H_

#include <array>
#include <atomic>
#include <cstdint>
#include <string>

#include "kernel/uapi/kvmi.h"

namespace kvmi::host {

// Log-linear histogram of microseconds: 4 sub-buckets per power of two, up to ~2^40 us.
class LatencyHistogram {
 public:
  static constexpr int kSubBuckets = 4;
  static constexpr int kBuckets = 41 * kSubBuckets;

  void Record(uint64_t micros);
  void MergeFrom(const LatencyHistogram& other);
  uint64_t count() const;
  // Upper bound of the bucket holding the q-quantile (0 < q <= 1); 0 when empty.
  uint64_t PercentileMicros(double q) const;
  uint64_t max_micros() const { return max_.load(std::memory_order_relaxed); }

 private:
  static int BucketOf(uint64_t micros);
  static uint64_t BucketUpperBound(int bucket);

  std::array<std::atomic<uint64_t>, kBuckets> buckets_{};
  std::atomic<uint64_t> max_{0};
};

struct EngineStats {
  std::array<std::atomic<uint64_t>, KVMI_NUM_EVENTS> events_sent{};
  // Index = action (0 CONTINUE, 1 RETRY, 2 CRASH), 3 = anything else.
  std::array<std::atomic<uint64_t>, 4> replies_by_action{};
  std::atomic<uint64_t> commands{0};
  std::atomic<uint64_t> sessions{0};
  std::atomic<uint64_t> sessions_closed_by_violation{0};
  LatencyHistogram round_trip;

  void MergeFrom(const EngineStats& other);
  // Multi-line human summary ("events sent: KVMI_EVENT_CR 12 ...").
  std::string Summary() const;
};

}  // namespace kvmi::host

#endif  // KVMID_KERNEL_HOST_STATS_H_
