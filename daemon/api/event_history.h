// The shared event ring: every event kvmid decided, appended once by one pipeline observer into a
// fixed ring of slots with consecutive sequence numbers (1, 2, ...). Every StreamEvents stream
// reads it from its own cursor (EventFanout, event_fanout.h), so that an event is copied once
// whatever the number of streams, and a reader that reconnects resumes after the last event it
// saw (CursorAfter). Slots are reused: once full, appending costs a copy and no allocation.
//
// Threads: loop threads append (one lock, one copy); readers (the fan-out's delivery thread,
// gRPC's callback threads) copy a slot out under the same lock, so a slot is never read while it
// is overwritten. After the append, outside the lock, the Listener (the fan-out) is told the
// event's type: it decides with one atomic load whether anyone waits for it.
#ifndef KVMID_DAEMON_API_EVENT_HISTORY_H_
#define KVMID_DAEMON_API_EVENT_HISTORY_H_

#include <absl/base/thread_annotations.h>

#include <array>
#include <atomic>
#include <cstdint>
#include <vector>

#include "daemon/base/mutex.h"
#include "daemon/verdict/pipeline.h"

namespace kvmid {

class EventHistory {
 public:
  // Told of every append (after it, on the appending loop thread): must be cheap and not block.
  class Listener {
   public:
    virtual ~Listener() = default;
    virtual void Appended(uint8_t type) = 0;
  };

  // What Next found.
  enum class Found {
    kEvent,     // *out is the next event of the wanted types (cursor is past it)
    kLost,      // the cursor had fallen behind the ring (or max_behind): *lost events skipped
    kMore,      // scanned max_scan slots without a wanted one; call again
    kCaughtUp,  // the cursor is at the head: nothing more for now
  };

  EventHistory(VerdictPipeline* pipeline, size_t capacity);
  ~EventHistory();
  EventHistory(const EventHistory&) = delete;
  EventHistory& operator=(const EventHistory&) = delete;

  // What the pipeline observer does with every decided event (public for tests).
  void Append(const ObservedEvent& observed);

  // At most one; set before events flow to it, cleared (nullptr) before it goes: clearing waits
  // for the calls in flight.
  void SetListener(Listener* listener);

  // The sequence number the next event gets (1 when none yet). Sequentially consistent: the
  // fan-out's wake-up protocol relies on it (event_fanout.h).
  uint64_t head() const { return head_.load(std::memory_order_seq_cst); }
  size_t capacity() const { return capacity_; }
  // The oldest sequence number still held.
  uint64_t tail() const {
    MutexLock lock(&mu_);
    return TailLocked();
  }

  // From *cursor: the first event whose type is in `types` (bit per event id), copied to *out,
  // with *cursor moved past it. Events older than the ring holds, or more than `max_behind`
  // behind the head, are skipped and counted in *lost (kLost; the cursor then points half a
  // window, max_behind or the ring, behind the head, so that the reader gets the newest events
  // rather than losing again what is overwritten while it writes its notice). At most `max_scan`
  // slots are looked at per call (the lock is held that long).
  Found Next(uint64_t* cursor, uint32_t types, uint64_t max_behind, size_t max_scan,
             ObservedEvent* out, uint64_t* lost) const;
  // The type of the event at `seq`, or -1 when it is no longer (or not yet) held.
  int TypeAt(uint64_t seq) const;
  // Copies the event at `seq` to *out; false when it is no longer (or not yet) held.
  bool CopyAt(uint64_t seq, ObservedEvent* out) const;
  // Events of each type appended before `seq` (counts[t]: type t), for a `seq` still held or the
  // head; false when it is no longer held. Lets a reader that fell behind count what it lost by
  // type without the lost events (the difference of two such counts).
  using TypeCounts = std::array<uint64_t, 32>;
  bool CountsAt(uint64_t seq, TypeCounts* counts) const;
  // The oldest sequence number held, with CountsAt it (one step, no walk).
  uint64_t TailCounts(TypeCounts* counts) const;
  // Whether an event in [from, to) has its type in `types` (false for what is no longer held).
  bool AnyOfTypes(uint64_t from, uint64_t to, uint32_t types) const;

  // Resume: the cursor just after the event whose event_id is `after` (its slot, so exactly the
  // events a stream reading in ring order had not seen yet). When that event is no longer held,
  // the first held event with a larger id, and *lost = the ids after `after` not held (an upper
  // bound: ids of events not yet or never appended count too). A cursor from the future (after >
  // every id) starts at the head. Walks the ring's ids a chunk per hold of the lock, so the loop
  // threads' appends wait for one chunk at most, never for the whole ring.
  uint64_t CursorAfter(uint64_t after, uint64_t* lost) const;
  // The largest event id appended (0 when none).
  uint64_t latest_id() const;

 private:
  uint64_t TailLocked() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    const uint64_t h = head_.load(std::memory_order_relaxed);
    return h > capacity_ ? h - capacity_ : 1;
  }

  VerdictPipeline* const pipeline_;
  const size_t capacity_;
  uint64_t observer_ = 0;
  std::atomic<Listener*> listener_{nullptr};
  std::atomic<int> listener_calls_{0};
  mutable Mutex mu_;
  // Slot of seq s: s % capacity_. types_ is the events' types, scanned without touching events_.
  std::vector<ObservedEvent> events_ ABSL_GUARDED_BY(mu_);
  std::vector<uint8_t> types_ ABSL_GUARDED_BY(mu_);
  // The events' ids, beside the events: CursorAfter walks 8 bytes a slot, not an event's.
  std::vector<uint64_t> ids_ ABSL_GUARDED_BY(mu_);
  // Written under mu_; read without it by head().
  std::atomic<uint64_t> head_{1};
  uint64_t latest_id_ ABSL_GUARDED_BY(mu_) = 0;
  TypeCounts type_counts_ ABSL_GUARDED_BY(mu_){};     // every event appended, by type
  TypeCounts evicted_counts_ ABSL_GUARDED_BY(mu_){};  // those before the tail (overwritten)
};

}  // namespace kvmid

#endif  // KVMID_DAEMON_API_EVENT_HISTORY_H_
