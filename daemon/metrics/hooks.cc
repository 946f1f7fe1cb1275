#include "daemon/metrics/hooks.h"

#include <atomic>
#include <map>

#include "daemon/base/mutex.h"

namespace kvmid {
namespace {

// A counter family with one string label (bounded) or a (string, int) pair.
template <typename Key>
class LabelledCounts {
 public:
  explicit LabelledCounts(size_t max_distinct) : max_distinct_(max_distinct) {}
  void Add(Key key, uint64_t n, Key other) {
    MutexLock lock(&mu_);
    auto it = counts_.find(key);
    if (it == counts_.end()) {
      if (distinct_ >= max_distinct_) {
        it = counts_.emplace(std::move(other), 0).first;
      } else {
        ++distinct_;
        it = counts_.emplace(std::move(key), 0).first;
      }
    }
    it->second += n;
  }
  std::map<Key, uint64_t> Read() const {
    MutexLock lock(&mu_);
    return counts_;
  }

 private:
  const size_t max_distinct_;
  mutable Mutex mu_;
  std::map<Key, uint64_t> counts_ ABSL_GUARDED_BY(mu_);
  size_t distinct_ ABSL_GUARDED_BY(mu_) = 0;  // values other than the overflow label
};

struct Table {
  std::array<std::atomic<uint64_t>, kHandshakeResults> handshakes{};
  std::atomic<uint64_t> stream_events_dropped{0};
  LabelledCounts<std::string> authz_denied{Metrics::kMaxLabelValues};
  LabelledCounts<std::string> limit_refused{Metrics::kMaxLabelValues};
  // kMaxLabelValues methods with every status code each.
  LabelledCounts<std::pair<std::string, int>> api_calls{Metrics::kMaxLabelValues *
                                                        Metrics::kStatusCodes};
};

Table& Counters() {
  static Table* table = new Table();  // never destroyed: threads may count during exit
  return *table;
}

std::vector<std::pair<std::string, uint64_t>> Flatten(std::map<std::string, uint64_t> counts) {
  return {counts.begin(), counts.end()};
}

}  // namespace

const char* HandshakeResultName(HandshakeResult result) {
  switch (result) {
    case HandshakeResult::kCompleted:
      return "completed";
    case HandshakeResult::kBusy:
      return "busy";
    case HandshakeResult::kUnauthorized:
      return "unauthorized";
    case HandshakeResult::kTimeout:
      return "timeout";
    case HandshakeResult::kFailed:
      return "failed";
  }
  return "failed";
}

void Metrics::CountHandshake(HandshakeResult result) {
  size_t index = static_cast<size_t>(result);
  if (index >= kHandshakeResults) index = static_cast<size_t>(HandshakeResult::kFailed);
  Counters().handshakes[index].fetch_add(1, std::memory_order_relaxed);
}

void Metrics::StreamEventsDropped(uint64_t events) {
  Counters().stream_events_dropped.fetch_add(events, std::memory_order_relaxed);
}

void Metrics::AuthzDenied(absl::string_view method) {
  Counters().authz_denied.Add(std::string(method), 1, kOtherLabel);
}

void Metrics::LimitRefused(absl::string_view limit) {
  Counters().limit_refused.Add(std::string(limit), 1, kOtherLabel);
}

void Metrics::ApiCall(absl::string_view method, int code) {
  if (!method.empty() && method.front() == '/') method.remove_prefix(1);
  if (code < 0 || code >= static_cast<int>(kStatusCodes)) code = 2;  // UNKNOWN
  Counters().api_calls.Add({std::string(method), code}, 1, {kOtherLabel, code});
}

Metrics::Counts Metrics::Read() {
  Table& table = Counters();
  Counts counts;
  for (size_t i = 0; i < kHandshakeResults; ++i) {
    counts.handshakes[i] = table.handshakes[i].load(std::memory_order_relaxed);
  }
  counts.stream_events_dropped = table.stream_events_dropped.load(std::memory_order_relaxed);
  counts.authz_denied = Flatten(table.authz_denied.Read());
  counts.limit_refused = Flatten(table.limit_refused.Read());
  for (const auto& [key, n] : table.api_calls.Read()) {
    counts.api_calls.push_back(ApiCallCount{key.first, key.second, n});
  }
  return counts;
}

}  // namespace kvmid
