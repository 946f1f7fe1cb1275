#include "daemon/api/event_history.h"

#include <algorithm>
#include <cstdint>
#include <thread>

namespace kvmid {
namespace {

uint32_t TypeBit(uint8_t type) { return 1u << std::min<uint8_t>(type, 31); }

}  // namespace

EventHistory::EventHistory(VerdictPipeline* pipeline, size_t capacity)
    : pipeline_(pipeline),
      capacity_(std::max<size_t>(capacity, 1)),
      events_(capacity_),
      types_(capacity_, 0) {
  observer_ = pipeline_->AddObserver([this](const ObservedEvent& o) { Append(o); });
}

EventHistory::~EventHistory() { pipeline_->RemoveObserver(observer_); }

void EventHistory::Append(const ObservedEvent& observed) {
  const uint8_t type = observed.event.id();
  {
    MutexLock lock(&mu_);
    const uint64_t seq = head_.load(std::memory_order_relaxed);
    const size_t slot = seq % capacity_;
    events_[slot] = observed;
    types_[slot] = type;
    ++type_counts_[std::min<uint8_t>(type, 31)];
    latest_id_ = std::max(latest_id_, observed.event_id);
    head_.store(seq + 1, std::memory_order_seq_cst);
  }
  // Counted in flight, so that SetListener(nullptr) can wait for a call that already loaded it.
  listener_calls_.fetch_add(1, std::memory_order_seq_cst);
  Listener* listener = listener_.load(std::memory_order_seq_cst);
  if (listener != nullptr) listener->Appended(type);
  listener_calls_.fetch_sub(1, std::memory_order_release);
}

void EventHistory::SetListener(Listener* listener) {
  listener_.store(listener, std::memory_order_seq_cst);
  if (listener != nullptr) return;
  while (listener_calls_.load(std::memory_order_acquire) != 0) std::this_thread::yield();
}

uint64_t EventHistory::latest_id() const {
  MutexLock lock(&mu_);
  return latest_id_;
}

EventHistory::Found EventHistory::Next(uint64_t* cursor, uint32_t types, uint64_t max_behind,
                                       size_t max_scan, ObservedEvent* out, uint64_t* lost) const {
  MutexLock lock(&mu_);
  const uint64_t head = head_.load(std::memory_order_relaxed);
  uint64_t oldest = TailLocked();
  if (max_behind != 0 && head - oldest > max_behind) oldest = head - max_behind;
  if (*cursor < oldest) {
    // Not to the oldest slot (the next to be overwritten, lost again while the notice is
    // written) but half a window behind the head: a notice, then the newest events.
    const uint64_t window = max_behind != 0 ? std::min<uint64_t>(max_behind, capacity_) : capacity_;
    const uint64_t target = std::max(oldest, head - std::min(head - 1, window / 2));
    *lost = target - *cursor;
    *cursor = target;
    return Found::kLost;
  }
  for (size_t scanned = 0; *cursor < head; ++scanned) {
    if (scanned == max_scan) return Found::kMore;
    const size_t slot = *cursor % capacity_;
    ++*cursor;
    if ((TypeBit(types_[slot]) & types) != 0) {
      *out = events_[slot];
      return Found::kEvent;
    }
  }
  return Found::kCaughtUp;
}

int EventHistory::TypeAt(uint64_t seq) const {
  MutexLock lock(&mu_);
  if (seq < TailLocked() || seq >= head_.load(std::memory_order_relaxed)) return -1;
  return types_[seq % capacity_];
}

bool EventHistory::CopyAt(uint64_t seq, ObservedEvent* out) const {
  MutexLock lock(&mu_);
  if (seq < TailLocked() || seq >= head_.load(std::memory_order_relaxed)) return false;
  *out = events_[seq % capacity_];
  return true;
}

bool EventHistory::CountsAt(uint64_t seq, TypeCounts* counts) const {
  MutexLock lock(&mu_);
  const uint64_t head = head_.load(std::memory_order_relaxed);
  if (seq < TailLocked() || seq > head) return false;
  *counts = type_counts_;
  for (uint64_t s = seq; s < head; ++s) --(*counts)[std::min<uint8_t>(types_[s % capacity_], 31)];
  return true;
}

uint64_t EventHistory::TailCounts(TypeCounts* counts) const {
  MutexLock lock(&mu_);
  const uint64_t head = head_.load(std::memory_order_relaxed);
  const uint64_t tail = TailLocked();
  *counts = type_counts_;
  for (uint64_t s = tail; s < head; ++s) --(*counts)[std::min<uint8_t>(types_[s % capacity_], 31)];
  return tail;
}

bool EventHistory::AnyOfTypes(uint64_t from, uint64_t to, uint32_t types) const {
  MutexLock lock(&mu_);
  from = std::max(from, TailLocked());
  to = std::min(to, head_.load(std::memory_order_relaxed));
  for (uint64_t seq = from; seq < to; ++seq) {
    if ((TypeBit(types_[seq % capacity_]) & types) != 0) return true;
  }
  return false;
}

uint64_t EventHistory::CursorAfter(uint64_t after, uint64_t* lost) const {
  *lost = 0;
  MutexLock lock(&mu_);
  const uint64_t head = head_.load(std::memory_order_relaxed);
  const uint64_t tail = TailLocked();
  if (head == tail || after > latest_id_) return head;
  // Newest first: a reader resumes near the head.
  uint64_t held_after = 0;
  for (uint64_t seq = head; seq-- > tail;) {
    const uint64_t id = events_[seq % capacity_].event_id;
    if (id == after) return seq + 1;
    if (id > after) ++held_after;
  }
  // Not held: the ids after the cursor that the ring does not hold are lost. An upper bound: ids
  // are given to events before they are decided, and an event that never reached the ring (or
  // reaches it later, held by a handler) counts too. Events reach observers after their replies,
  // so ids can be out of ring order: start at the first held event past the cursor.
  *lost = latest_id_ - after - held_after;
  for (uint64_t seq = tail; seq < head; ++seq) {
    if (events_[seq % capacity_].event_id > after) return seq;
  }
  return head;
}

}  // namespace kvmid
