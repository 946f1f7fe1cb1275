// The most recent events kvmid decided, so that a StreamEvents reader that reconnects can resume
// after the last event it saw. A fixed ring filled by a pipeline observer: the slots are reused,
// so remembering costs a copy per event and no allocation once the ring is full.
#ifndef KVMID_DAEMON_API_EVENT_HISTORY_H_
#define KVMID_DAEMON_API_EVENT_HISTORY_H_

#include <absl/base/thread_annotations.h>

#include <cstdint>
#include <functional>
#include <vector>

#include "daemon/base/mutex.h"
#include "daemon/verdict/pipeline.h"

namespace kvmid {

class EventHistory {
 public:
  EventHistory(VerdictPipeline* pipeline, size_t capacity);
  ~EventHistory();
  EventHistory(const EventHistory&) = delete;
  EventHistory& operator=(const EventHistory&) = delete;

  // The remembered events with id > `after`, in id order, in *out; returns how many events after
  // `after` are no longer remembered (0 when nothing was lost).
  uint64_t Replay(uint64_t after, std::vector<ObservedEvent>* out) const;
  // The largest id remembered (0 when empty).
  uint64_t latest_id() const;

 private:
  void Record(const ObservedEvent& observed);

  VerdictPipeline* pipeline_;
  uint64_t observer_;
  mutable Mutex mu_;
  std::vector<ObservedEvent> ring_ ABSL_GUARDED_BY(mu_);
  size_t next_ ABSL_GUARDED_BY(mu_) = 0;  // slot the next event goes to
  size_t size_ ABSL_GUARDED_BY(mu_) = 0;  // slots in use
  uint64_t latest_id_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace kvmid

#endif  // KVMID_DAEMON_API_EVENT_HISTORY_H_
