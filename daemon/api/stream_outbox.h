// What one WatchVMs call still has to send (StreamEvents reads the shared event ring instead,
// event_fanout.h): a bounded queue, filled from any thread (registry watchers) and drained by one
// write at a time. No thread waits on it, so an open stream costs no thread of its own: gRPC's
// callback thread starts the next write from OnWriteDone; a stream that was idle is started by the
// StreamPump (one thread for every stream), so that a guest's loop thread only queues (a lock
// and a push) and never converts a message or enters gRPC, however many streams are open. Without
// a pump (tests), the thread that queued into an idle stream starts its write itself.
//
// Memory: every queued item is charged to a ByteBudget shared by all streams (released when the
// item is taken for writing, or dropped). An item that does not fit (the stream's own capacity,
// or the global budget) is dropped and counted, never waited for: a loop thread never blocks on
// a client. The count goes out as a drop notice before the next item (when notices are on).
//
// Ending: Close() drops what is queued (returning its bytes) and calls Finish exactly once, as
// soon as no write is in flight; the writer it calls back is never called after that, so the
// object behind the callbacks (the reactor) may go once Finish has run and gRPC says OnDone.
#ifndef KVMID_DAEMON_API_STREAM_OUTBOX_H_
#define KVMID_DAEMON_API_STREAM_OUTBOX_H_

#include <absl/base/thread_annotations.h>

#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <optional>
#include <thread>
#include <utility>
#include <vector>

#include "daemon/base/mutex.h"
#include "daemon/security/limits.h"

namespace kvmid::api {

// What the pump starts: an idle stream with something to write.
class PumpTarget {
 public:
  virtual ~PumpTarget() = default;
  virtual void Pump() = 0;
};

// One thread that starts the first write of streams that were idle (StreamOutbox). Scheduling is
// a lock, a push and, only when the pump was idle, one wake-up.
class StreamPump {
 public:
  StreamPump() : thread_([this] { Run(); }) {}
  ~StreamPump() {
    {
      MutexLock lock(&mu_);
      stop_ = true;
    }
    cv_.Signal();
    thread_.join();
  }
  StreamPump(const StreamPump&) = delete;
  StreamPump& operator=(const StreamPump&) = delete;

  void Schedule(std::shared_ptr<PumpTarget> target) {
    bool wake;
    {
      MutexLock lock(&mu_);
      wake = ready_.empty();
      ready_.push_back(std::move(target));
    }
    if (wake) cv_.Signal();
  }

 private:
  void Run() {
    while (true) {
      std::deque<std::shared_ptr<PumpTarget>> batch;
      {
        MutexLock lock(&mu_);
        while (!stop_ && ready_.empty()) cv_.Wait(&mu_);
        if (stop_) return;  // the streams are ending with the server
        batch.swap(ready_);
      }
      for (const auto& target : batch) target->Pump();
    }
  }

  Mutex mu_;
  CondVar cv_;
  std::deque<std::shared_ptr<PumpTarget>> ready_ ABSL_GUARDED_BY(mu_);
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  std::thread thread_;
};

template <typename Item>
class StreamOutbox final : public PumpTarget,
                           public std::enable_shared_from_this<StreamOutbox<Item>> {
 public:
  // What the token holder writes next: a drop notice (dropped > 0, no item) or an item.
  struct Next {
    std::optional<Item> item;
    uint64_t dropped = 0;
  };
  // Starts the write of `next` (the write token is the caller's until OnWriteDone).
  using Write = std::function<void(Next next)>;
  // Ends the call (exactly once, with no write in flight).
  using Finish = std::function<void()>;
  // Items already sent another way (a replay): skipped when queued.
  using Duplicate = std::function<bool(const Item&)>;
  struct Charged {
    Item item;
    uint64_t bytes;
  };
  enum class Offered { kQueued, kDropped, kClosed };

  // `budget` must outlive the queue's items (Close() returns them). notices: drops are reported
  // as Next::dropped; else only counted. `pump` (may be null; then the outbox must be owned by a
  // shared_ptr) starts idle streams.
  StreamOutbox(size_t capacity, security::ByteBudget* budget, bool notices, Write write,
               Finish finish, StreamPump* pump = nullptr)
      : capacity_(capacity),
        budget_(budget),
        notices_(notices),
        write_(std::move(write)),
        finish_(std::move(finish)),
        pump_(pump) {}
  StreamOutbox(const StreamOutbox&) = delete;
  StreamOutbox& operator=(const StreamOutbox&) = delete;
  ~StreamOutbox() override {
    MutexLock lock(&mu_);
    CloseLocked();  // returns the bytes; Finish is not called from here
  }

  // Queues `item`, charged `bytes`. kDropped: it did not fit (counted); kClosed: the call ended.
  Offered Offer(Item item, uint64_t bytes) {
    if (pump_ != nullptr) return OfferToPump(std::move(item), bytes);
    Next next;
    Offered result = Offered::kQueued;
    {
      MutexLock lock(&mu_);
      if (closed_) return Offered::kClosed;
      if (duplicate_ && duplicate_(item)) return Offered::kQueued;
      if (!writing_ && !held_ && queue_.empty() && dropped_pending_ == 0) {
        // An idle stream: written now, never queued (nor charged).
        writing_ = true;
        next.item.emplace(std::move(item));
      } else if (queue_.size() >= capacity_ || !budget_->TryCharge(bytes)) {
        CountDropsLocked(1);
        if (!TakeTokenLocked(&next)) return Offered::kDropped;
        result = Offered::kDropped;
      } else {
        queued_bytes_ += bytes;
        if (queued_bytes_ > peak_bytes_) peak_bytes_ = queued_bytes_;
        queue_.push_back(Charged{std::move(item), bytes});
        if (!TakeTokenLocked(&next)) return Offered::kQueued;
      }
    }
    write_(std::move(next));
    return result;
  }

  // With a pump: queued (or dropped), and the pump told if the stream is idle.
  Offered OfferToPump(Item item, uint64_t bytes) {
    bool schedule = false;
    Offered result;
    {
      MutexLock lock(&mu_);
      if (closed_) return Offered::kClosed;
      if (duplicate_ && duplicate_(item)) return Offered::kQueued;
      result = QueueLocked(std::move(item), bytes, &schedule);
    }
    // Outside the lock: the pump may run it at once.
    if (schedule) pump_->Schedule(this->shared_from_this());
    return result;
  }

  // The pump's turn: starts the next write if the stream is still idle.
  void Pump() override {
    Next next;
    {
      MutexLock lock(&mu_);
      pump_scheduled_ = false;
      if (!TakeTokenLocked(&next)) return;
    }
    write_(std::move(next));
  }

  // Until this is called nothing is written, only queued. `front` goes out before what was
  // queued meanwhile, after a drop notice of `lost` (items that could not be had); queued items
  // that `duplicate` names are skipped, now and later.
  void Release(std::vector<Charged> front, uint64_t lost, Duplicate duplicate) {
    Next next;
    {
      MutexLock lock(&mu_);
      held_ = false;
      if (closed_) return;
      duplicate_ = std::move(duplicate);
      if (duplicate_) {
        for (auto it = queue_.begin(); it != queue_.end();) {
          if (!duplicate_(it->item)) {
            ++it;
            continue;
          }
          ReturnLocked(it->bytes);
          it = queue_.erase(it);
        }
      }
      CountDropsLocked(lost);
      for (auto it = front.rbegin(); it != front.rend(); ++it) {
        if (!budget_->TryCharge(it->bytes)) {
          CountDropsLocked(1);
          continue;
        }
        queued_bytes_ += it->bytes;
        queue_.push_front(std::move(*it));
      }
      if (queued_bytes_ > peak_bytes_) peak_bytes_ = queued_bytes_;
      if (!TakeTokenLocked(&next)) return;
    }
    write_(std::move(next));
  }

  // The write started by Write completed (ok: it reached the stream). Returns the peak of the
  // queue's bytes when this drained it (0 otherwise): memory the caller may hand back.
  uint64_t OnWriteDone(bool ok) {
    Next next;
    bool finish = false;
    uint64_t drained_peak = 0;
    {
      MutexLock lock(&mu_);
      writing_ = false;
      if (!ok) CloseLocked();
      if (!closed_ && queue_.empty() && dropped_pending_ == 0) {
        drained_peak = peak_bytes_;
        peak_bytes_ = 0;
      }
      if (!TakeTokenLocked(&next)) finish = FinishDueLocked();
    }
    if (finish) {
      finish_();
    } else if (next.item || next.dropped > 0) {
      write_(std::move(next));
    }
    return drained_peak;
  }

  // Ends the call: what is queued is dropped (its bytes go back to the budget); Finish follows
  // once no write is in flight. Idempotent. Returns the bytes this call returned.
  uint64_t Close() {
    bool finish = false;
    uint64_t returned = 0;
    {
      MutexLock lock(&mu_);
      returned = CloseLocked();
      finish = !writing_ && FinishDueLocked();
    }
    if (finish) finish_();
    return returned;
  }

  uint64_t queued_bytes() const {
    MutexLock lock(&mu_);
    return queued_bytes_;
  }
  size_t size() const {
    MutexLock lock(&mu_);
    return queue_.size();
  }
  // The most the queue held since it last drained (what its end gives back, at most).
  uint64_t peak_bytes() const {
    MutexLock lock(&mu_);
    return peak_bytes_;
  }
  uint64_t dropped_total() const {
    MutexLock lock(&mu_);
    return dropped_total_;
  }

 private:
  // Takes the write token with what is to be written next, if the token is free and there is
  // something to write.
  bool TakeTokenLocked(Next* next) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (writing_ || held_ || closed_) return false;
    if (notices_ && dropped_pending_ > 0) {
      next->dropped = dropped_pending_;
      dropped_pending_ = 0;
    } else if (!queue_.empty()) {
      Charged& front = queue_.front();
      ReturnLocked(front.bytes);
      next->item.emplace(std::move(front.item));
      queue_.pop_front();
    } else {
      return false;
    }
    writing_ = true;
    return true;
  }

  // Queues (or drops) for the pump; `schedule`: the stream is idle and not yet scheduled.
  Offered QueueLocked(Item item, uint64_t bytes, bool* schedule)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    Offered result = Offered::kQueued;
    if (!writing_ && !held_ && queue_.empty() && dropped_pending_ == 0) {
      // An idle stream's next message: not charged (the stream's base charge covers its one
      // message in flight), so a stream that keeps up gets events even when others filled the
      // budget.
      queue_.push_back(Charged{std::move(item), 0});
    } else if (queue_.size() >= capacity_ || !budget_->TryCharge(bytes)) {
      CountDropsLocked(1);
      result = Offered::kDropped;
      if (!notices_) return result;  // nothing to tell
    } else {
      queued_bytes_ += bytes;
      if (queued_bytes_ > peak_bytes_) peak_bytes_ = queued_bytes_;
      queue_.push_back(Charged{std::move(item), bytes});
    }
    if (!writing_ && !held_ && !pump_scheduled_) {
      pump_scheduled_ = true;
      *schedule = true;
    }
    return result;
  }

  void CountDropsLocked(uint64_t n) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    dropped_total_ += n;
    if (notices_) dropped_pending_ += n;
  }

  void ReturnLocked(uint64_t bytes) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    queued_bytes_ -= bytes;
    budget_->Release(bytes);
  }

  uint64_t CloseLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    closed_ = true;
    const uint64_t returned = queued_bytes_;
    if (returned > 0) budget_->Release(returned);
    queued_bytes_ = 0;
    std::deque<Charged>().swap(queue_);  // the memory itself, not just the elements
    duplicate_ = nullptr;
    return returned;
  }

  // True once, when the call may finish (closed, no write in flight).
  bool FinishDueLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (!closed_ || writing_ || finished_) return false;
    finished_ = true;
    return true;
  }

  const size_t capacity_;
  security::ByteBudget* const budget_;
  const bool notices_;
  const Write write_;
  const Finish finish_;
  StreamPump* const pump_;
  mutable Mutex mu_;
  std::deque<Charged> queue_ ABSL_GUARDED_BY(mu_);
  uint64_t queued_bytes_ ABSL_GUARDED_BY(mu_) = 0;  // charged to budget_
  uint64_t peak_bytes_ ABSL_GUARDED_BY(mu_) = 0;    // since the queue last drained
  uint64_t dropped_pending_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t dropped_total_ ABSL_GUARDED_BY(mu_) = 0;
  Duplicate duplicate_ ABSL_GUARDED_BY(mu_);
  bool writing_ ABSL_GUARDED_BY(mu_) = false;  // the write token
  bool held_ ABSL_GUARDED_BY(mu_) = true;      // see Release()
  bool pump_scheduled_ ABSL_GUARDED_BY(mu_) = false;
  bool closed_ ABSL_GUARDED_BY(mu_) = false;
  bool finished_ ABSL_GUARDED_BY(mu_) = false;
};

}  // namespace kvmid::api

#endif  // KVMID_DAEMON_API_STREAM_OUTBOX_H_
