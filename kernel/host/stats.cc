#include "kernel/host/stats.h"

#include <cstdio>

#include "kernel/abi/protocol.h"

namespace kvmi::host {

int LatencyHistogram::BucketOf(uint64_t micros) {
  if (micros < kSubBuckets) return static_cast<int>(micros);
  int exp = 63 - __builtin_clzll(micros);  // >= 2
  int sub = static_cast<int>((micros >> (exp - 2)) & (kSubBuckets - 1));
  int bucket = (exp - 1) * kSubBuckets + sub;
  return bucket < kBuckets ? bucket : kBuckets - 1;
}

uint64_t LatencyHistogram::BucketUpperBound(int bucket) {
  if (bucket < kSubBuckets) return static_cast<uint64_t>(bucket);
  int exp = bucket / kSubBuckets + 1;
  uint64_t sub = static_cast<uint64_t>(bucket % kSubBuckets);
  return ((uint64_t{kSubBuckets} + sub + 1) << (exp - 2)) - 1;
}

void LatencyHistogram::Record(uint64_t micros) {
  buckets_[BucketOf(micros)].fetch_add(1, std::memory_order_relaxed);
  uint64_t prev = max_.load(std::memory_order_relaxed);
  while (micros > prev && !max_.compare_exchange_weak(prev, micros, std::memory_order_relaxed)) {
  }
}

void LatencyHistogram::MergeFrom(const LatencyHistogram& other) {
  for (int i = 0; i < kBuckets; ++i) {
    buckets_[i].fetch_add(other.buckets_[i].load(std::memory_order_relaxed),
                          std::memory_order_relaxed);
  }
  uint64_t m = other.max_micros();
  uint64_t prev = max_.load(std::memory_order_relaxed);
  while (m > prev && !max_.compare_exchange_weak(prev, m, std::memory_order_relaxed)) {
  }
}

uint64_t LatencyHistogram::count() const {
  uint64_t n = 0;
  for (const auto& b : buckets_) n += b.load(std::memory_order_relaxed);
  return n;
}

uint64_t LatencyHistogram::PercentileMicros(double q) const {
  uint64_t total = count();
  if (total == 0) return 0;
  auto rank = static_cast<uint64_t>(q * static_cast<double>(total));
  if (rank == 0) rank = 1;
  uint64_t seen = 0;
  for (int i = 0; i < kBuckets; ++i) {
    seen += buckets_[i].load(std::memory_order_relaxed);
    if (seen >= rank) {
      uint64_t bound = BucketUpperBound(i);
      return bound < max_micros() ? bound : max_micros();
    }
  }
  return max_micros();
}

void EngineStats::MergeFrom(const EngineStats& other) {
  for (size_t i = 0; i < events_sent.size(); ++i) {
    events_sent[i].fetch_add(other.events_sent[i].load(), std::memory_order_relaxed);
  }
  for (size_t i = 0; i < replies_by_action.size(); ++i) {
    replies_by_action[i].fetch_add(other.replies_by_action[i].load(), std::memory_order_relaxed);
  }
  commands.fetch_add(other.commands.load(), std::memory_order_relaxed);
  sessions.fetch_add(other.sessions.load(), std::memory_order_relaxed);
  sessions_closed_by_violation.fetch_add(other.sessions_closed_by_violation.load(),
                                         std::memory_order_relaxed);
  round_trip.MergeFrom(other.round_trip);
}

std::string EngineStats::Summary() const {
  std::string out;
  char line[160];
  uint64_t total = 0;
  out += "events sent:\n";
  for (int id = 0; id < KVMI_NUM_EVENTS; ++id) {
    uint64_t n = events_sent[id].load();
    total += n;
    std::snprintf(line, sizeof(line), "  %-24s %12llu\n", EventName(static_cast<uint8_t>(id)),
                  static_cast<unsigned long long>(n));
    out += line;
  }
  std::snprintf(line, sizeof(line), "  %-24s %12llu\n", "total",
                static_cast<unsigned long long>(total));
  out += line;
  out += "event replies by action:\n";
  const char* names[] = {"CONTINUE", "RETRY", "CRASH", "other (unsupported)"};
  for (int a = 0; a < 4; ++a) {
    std::snprintf(line, sizeof(line), "  %-24s %12llu\n", names[a],
                  static_cast<unsigned long long>(replies_by_action[a].load()));
    out += line;
  }
  std::snprintf(line, sizeof(line),
                "event round trip (us): n=%llu p50=%llu p90=%llu p99=%llu p99.9=%llu max=%llu\n",
                static_cast<unsigned long long>(round_trip.count()),
                static_cast<unsigned long long>(round_trip.PercentileMicros(0.5)),
                static_cast<unsigned long long>(round_trip.PercentileMicros(0.9)),
                static_cast<unsigned long long>(round_trip.PercentileMicros(0.99)),
                static_cast<unsigned long long>(round_trip.PercentileMicros(0.999)),
                static_cast<unsigned long long>(round_trip.max_micros()));
  out += line;
  std::snprintf(line, sizeof(line),
                "commands handled: %llu, sessions: %llu (%llu closed for a "
                "protocol violation)\n",
                static_cast<unsigned long long>(commands.load()),
                static_cast<unsigned long long>(sessions.load()),
                static_cast<unsigned long long>(sessions_closed_by_violation.load()));
  out += line;
  return out;
}

}  // namespace kvmi::host
