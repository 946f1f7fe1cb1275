#include "daemon/api/event_history.h"

#include <algorithm>
#include <cstdint>
#include <thread>

namespace kvmid {
namespace {

// An event type's place in a TypeCounts and in a type mask (ids above 31 share the last one).
size_t TypeIndex(uint8_t type) { return std::min<uint8_t>(type, 31); }
uint32_t TypeBit(uint8_t type) { return 1u << TypeIndex(type); }

// CursorAfter looks at this many slots per hold of the lock the loop threads append under: a
// resume never stalls the guests' events for a walk of the whole ring.
constexpr uint64_t kScanChunk = 4096;

}  // namespace

EventHistory::EventHistory(VerdictPipeline* pipeline, size_t capacity)
    : pipeline_(pipeline),
      capacity_(std::max<size_t>(capacity, 1)),
      events_(capacity_),
      types_(capacity_, 0),
      ids_(capacity_, 0) {
  observer_ = pipeline_->AddObserver([this](const ObservedEvent& o) { Append(o); });
}

EventHistory::~EventHistory() { pipeline_->RemoveObserver(observer_); }

void EventHistory::Append(const ObservedEvent& observed) {
  const uint8_t type = observed.event.id();
  {
    MutexLock lock(&mu_);
    const uint64_t seq = head_.load(std::memory_order_relaxed);
    const size_t slot = seq % capacity_;
    if (seq > capacity_) ++evicted_counts_[TypeIndex(types_[slot])];
    events_[slot] = observed;
    types_[slot] = type;
    ids_[slot] = observed.event_id;
    ++type_counts_[TypeIndex(type)];
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
  const uint64_t tail = TailLocked();
  if (seq < tail || seq > head) return false;
  // From whichever end is nearer: the counts at the tail plus [tail, seq), or the counts at the
  // head minus [seq, head).
  if (seq - tail < head - seq) {
    *counts = evicted_counts_;
    for (uint64_t s = tail; s < seq; ++s) ++(*counts)[TypeIndex(types_[s % capacity_])];
  } else {
    *counts = type_counts_;
    for (uint64_t s = seq; s < head; ++s) --(*counts)[TypeIndex(types_[s % capacity_])];
  }
  return true;
}

uint64_t EventHistory::TailCounts(TypeCounts* counts) const {
  MutexLock lock(&mu_);
  *counts = evicted_counts_;
  return TailLocked();
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
  uint64_t head = 0, latest = 0;
  {
    MutexLock lock(&mu_);
    head = head_.load(std::memory_order_relaxed);
    latest = latest_id_;
    if (head == TailLocked() || after > latest) return head;
  }
  // Newest first (a reader resumes near the head), kScanChunk slots per hold of the lock: the ring
  // may move between two holds; what it overwrote meanwhile was not held anyway, and what it
  // appended came after this call. On the way: the ids after the cursor that are held, and the
  // oldest slot holding one (ids are given to events before they are decided and events reach
  // observers after their replies, so ids can be out of ring order).
  uint64_t held_after = 0;
  uint64_t first_after = head;  // the oldest held slot with an id past the cursor
  uint64_t seq = head;
  while (true) {
    MutexLock lock(&mu_);
    const uint64_t tail = TailLocked();
    if (seq <= tail) break;
    const uint64_t stop = std::max(tail, seq > kScanChunk ? seq - kScanChunk : 0);
    for (; seq > stop; --seq) {
      const uint64_t id = ids_[(seq - 1) % capacity_];
      if (id == after) return seq;
      if (id > after) {
        ++held_after;
        first_after = seq - 1;
      }
    }
  }
  // Not held: the ids after the cursor that the ring does not hold are lost. An upper bound: an
  // event that never reached the ring (or reaches it later, held by a handler) counts too.
  *lost = latest - after - std::min(held_after, latest - after);
  // Resume at the oldest held event past the cursor, or where the ring now starts if the ring
  // moved past it during the walk.
  MutexLock lock(&mu_);
  return std::max(first_after, TailLocked());
}

}  // namespace kvmid
