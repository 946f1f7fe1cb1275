#include "daemon/api/event_history.h"

#include <algorithm>
#include <cstdint>

namespace kvmid {

EventHistory::EventHistory(VerdictPipeline* pipeline, size_t capacity)
    : pipeline_(pipeline), ring_(std::max<size_t>(capacity, 1)) {
  observer_ = pipeline_->AddObserver([this](const ObservedEvent& o) { Record(o); });
}

EventHistory::~EventHistory() { pipeline_->RemoveObserver(observer_); }

void EventHistory::Record(const ObservedEvent& observed) {
  MutexLock lock(&mu_);
  ring_[next_] = observed;
  next_ = (next_ + 1) % ring_.size();
  size_ = std::min(size_ + 1, ring_.size());
  latest_id_ = std::max(latest_id_, observed.event_id);
}

uint64_t EventHistory::latest_id() const {
  MutexLock lock(&mu_);
  return latest_id_;
}

uint64_t EventHistory::Replay(uint64_t after, std::vector<ObservedEvent>* out) const {
  uint64_t oldest = UINT64_MAX;
  size_t remembered;
  {
    MutexLock lock(&mu_);
    remembered = size_;
    size_t first = (next_ + ring_.size() - size_) % ring_.size();
    for (size_t i = 0; i < size_; ++i) {
      const ObservedEvent& o = ring_[(first + i) % ring_.size()];
      oldest = std::min(oldest, o.event_id);
      if (o.event_id > after) out->push_back(o);
    }
  }
  // Events reach observers after their replies, so across I/O threads ids can be slightly out
  // of order: replay in id order.
  std::sort(out->begin(), out->end(),
            [](const ObservedEvent& a, const ObservedEvent& b) { return a.event_id < b.event_id; });
  // Ids are consecutive from 1: what lies between the cursor and the oldest remembered is lost.
  return remembered != 0 && oldest > after + 1 ? oldest - after - 1 : 0;
}

}  // namespace kvmid
