#include "daemon/metrics/event_metrics.h"

#include <absl/strings/strip.h>
#include <prometheus/registry.h>

#include <cctype>
#include <cstring>

#include "kernel/abi/protocol.h"

namespace kvmid {

namespace {

// Who decided, as the decided_by label (Verdict::decided_by without its detail).
enum Decider : uint8_t {
  kPolicy,    // "policy:<rule>"
  kHandler,   // "handler:<id>" (a client's verdict)
  kFallback,  // "fallback:<why>" (deadline, handler gone, pause deadline)
  kDefault,   // "default" (no handler claims the event: the event type's default action)
  kDaemon,    // "daemon" (CREATE_VCPU, a pause nobody asked for)
  kPause,     // "resume:<owner>", "owner gone:<owner>" (a paused vCPU let go)
  kNone,      // "none" (UNHOOK: nothing to answer)
  kOther,     // anything else
};
constexpr size_t kDeciders = EventMetrics::kDeciders;
constexpr std::array<const char*, kDeciders> kDeciderNames = {
    "policy", "handler", "fallback", "default", "daemon", "pause", "none", "other"};

enum ActionLabel : uint8_t { kContinue, kRetry, kCrash, kKeepOld, kNoAction };
constexpr size_t kActions = EventMetrics::kActions;
constexpr std::array<const char*, kActions> kActionNames = {"continue", "retry", "crash",
                                                            "keep_old", "none"};

bool StartsWith(const std::string& s, const char* prefix, size_t n) {
  return s.size() >= n && std::memcmp(s.data(), prefix, n) == 0;
}

Decider Classify(const std::string& by) {
  if (by.empty()) return kOther;
  switch (by[0]) {
    case 'p':
      if (StartsWith(by, "policy:", 7)) return kPolicy;
      break;
    case 'h':
      if (StartsWith(by, "handler:", 8)) return kHandler;
      break;
    case 'f':
      if (StartsWith(by, "fallback:", 9)) return kFallback;
      break;
    case 'd':
      if (by == "default") return kDefault;
      if (by == "daemon") return kDaemon;
      break;
    case 'r':
      if (StartsWith(by, "resume:", 7)) return kPause;
      break;
    case 'o':
      if (StartsWith(by, "owner gone:", 11)) return kPause;
      break;
    case 'n':
      if (by == "none") return kNone;
      break;
  }
  return kOther;
}

// "KVMI_EVENT_PF" -> "pf".
std::string EventLabel(uint8_t id) {
  std::string name = kvmi::EventName(id);
  absl::string_view view(name);
  absl::ConsumePrefix(&view, "KVMI_EVENT_");
  std::string label(view);
  for (char& c : label) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return label;
}

// Event round trip in the daemon (event read -> reply written): from about a microsecond (an
// in-daemon policy) to a handler's deadline (a second by default) and beyond.
const prometheus::Histogram::BucketBoundaries& LatencyBuckets() {
  static const auto* buckets = new prometheus::Histogram::BucketBoundaries{
      1e-6, 2.5e-6, 5e-6,   1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3,
      5e-3, 1e-2,   2.5e-2, 5e-2, 0.1,    0.25, 0.5,  1,      2.5,  5,    10};
  return *buckets;
}

}  // namespace

EventMetrics::EventMetrics(std::shared_ptr<prometheus::Registry> registry)
    : registry_(std::move(registry)),
      events_(prometheus::BuildCounter()
                  .Name("kvmid_events_total")
                  .Help("KVMI events answered (or, for UNHOOK, received), by event type, by "
                        "who decided the verdict and by the verdict's action.")
                  .Register(*registry_)),
      latency_(prometheus::BuildHistogram()
                   .Name("kvmid_verdict_latency_seconds")
                   .Help("Time from reading a KVMI event to writing its reply, by who decided "
                         "the verdict.")
                   .Register(*registry_)) {
  for (size_t d = 0; d < kDeciders; ++d) {
    if (d == kNone) continue;  // never answered
    latency_by_decider_[d] = &latency_.Add({{"decided_by", kDeciderNames[d]}}, LatencyBuckets());
  }
  for (uint8_t id = 0; id < KVMI_NUM_EVENTS; ++id) event_labels_[id] = EventLabel(id);
  for (auto& by_event : counters_) {
    for (auto& by_decider : by_event) {
      for (auto& counter : by_decider) counter.store(nullptr, std::memory_order_relaxed);
    }
  }
}

void EventMetrics::Observe(const ObservedEvent& o) {
  const uint8_t id = o.event.id();
  if (id >= KVMI_NUM_EVENTS) return;  // the codec admits no such event
  const Decider decider = Classify(o.verdict.decided_by);
  ActionLabel action = kNoAction;
  if (decider != kNone) {
    action = o.verdict.keep_old                            ? kKeepOld
             : o.verdict.action == KVMI_EVENT_ACTION_RETRY ? kRetry
             : o.verdict.action == KVMI_EVENT_ACTION_CRASH ? kCrash
                                                           : kContinue;
  }
  std::atomic<prometheus::Counter*>& slot = counters_[id][decider][action];
  prometheus::Counter* counter = slot.load(std::memory_order_acquire);
  if (counter == nullptr) counter = Resolve(id, decider, action);
  counter->Increment();
  if (decider != kNone && latency_by_decider_[decider] != nullptr) {
    latency_by_decider_[decider]->Observe(std::chrono::duration<double>(o.latency).count());
  }
}

prometheus::Counter* EventMetrics::Resolve(uint8_t id, uint8_t decider, uint8_t action) {
  MutexLock lock(&mu_);
  std::atomic<prometheus::Counter*>& slot = counters_[id][decider][action];
  prometheus::Counter* counter = slot.load(std::memory_order_relaxed);
  if (counter == nullptr) {
    counter = &events_.Add({{"type", event_labels_[id]},
                            {"decided_by", kDeciderNames[decider]},
                            {"action", kActionNames[action]}});
    slot.store(counter, std::memory_order_release);
  }
  return counter;
}

}  // namespace kvmid
