// kvmid_events_total and kvmid_verdict_latency_seconds from the verdict pipeline's observer
// (daemon/verdict/pipeline.h, ObservedEvent): every (event type, decider, action) counter is
// created on the first event that needs it and kept in a fixed array, so an event costs an index,
// an atomic load and an atomic add, plus one histogram observation; no map lookup, no string.
#ifndef KVMID_DAEMON_METRICS_EVENT_METRICS_H_
#define KVMID_DAEMON_METRICS_EVENT_METRICS_H_

#include <prometheus/counter.h>
#include <prometheus/family.h>
#include <prometheus/histogram.h>
#include <prometheus/registry.h>

#include <array>
#include <atomic>
#include <memory>
#include <string>

#include "daemon/base/mutex.h"
#include "daemon/verdict/pipeline.h"

namespace kvmid {

class EventMetrics {
 public:
  // Registers the two families in `registry` (kept alive by this object).
  explicit EventMetrics(std::shared_ptr<prometheus::Registry> registry);
  EventMetrics(const EventMetrics&) = delete;
  EventMetrics& operator=(const EventMetrics&) = delete;

  // The observer: any thread that observes (a guest's loop thread, a gRPC thread).
  void Observe(const ObservedEvent& o);

  // Label values, in the order of the arrays' indexes.
  static constexpr size_t kDeciders = 8;  // policy handler fallback default daemon pause none other
  static constexpr size_t kActions = 5;   // continue retry crash keep_old none

 private:
  // First event of a label combination: creates its series (once; later events load the
  // pointer).
  prometheus::Counter* Resolve(uint8_t id, uint8_t decider, uint8_t action);

  std::shared_ptr<prometheus::Registry> registry_;  // owns the families below
  prometheus::Family<prometheus::Counter>& events_;
  prometheus::Family<prometheus::Histogram>& latency_;
  std::array<prometheus::Histogram*, kDeciders> latency_by_decider_{};
  std::array<std::string, KVMI_NUM_EVENTS> event_labels_;
  Mutex mu_;  // serializes Resolve (the slots themselves are atomic)
  std::array<std::array<std::array<std::atomic<prometheus::Counter*>, kActions>, kDeciders>,
             KVMI_NUM_EVENTS>
      counters_;
};

}  // namespace kvmid

#endif  // KVMID_DAEMON_METRICS_EVENT_METRICS_H_
