#include "daemon/api/attach_outbox.h"

#include <algorithm>
#include <iterator>
#include <utility>

#include "daemon/api/convert.h"
#include "daemon/io/event_loop.h"

namespace kvmid::api {

using grpc::Status;

void AttachOutbox::Send(kvmi::v1::AttachResponse message) {
  const bool event = message.has_event();
  EventLoop* const current = EventLoop::Current();
  // A guest's event, from its loop: its verdict comes back from another thread. Before the loop
  // sleeps, it lets the guests it woke run, and takes their events in one wake-up.
  if (event && current != nullptr) current->YieldBeforeSleep();
  EventLoop* cork = nullptr;
  bool start = false;
  {
    MutexLock lock(&mu_);
    if (closed_) return;
    const size_t bytes = message.ByteSizeLong();
    backlog_bytes_ += bytes;
    queue_.push_back(Queued{std::move(message), bytes});
    if (writing_ || held_) return;
    if (event && current != nullptr && current == flush_loop_) return;  // goes with that flush
    // Corked: an event from a guest's loop thread waits for the end of the loop's iteration (a
    // few microseconds: the other ready guests' events), then they go as one message. Anything
    // else, or from another thread, is written now (a pending flush then finds a write in
    // flight and leaves the rest to OnWriteDone).
    if (flush_loop_ == nullptr && max_batch_ > 1 && event && current != nullptr &&
        !weak_from_this().expired()) {
      flush_loop_ = cork = current;
    } else {
      start = StartWriteLocked();
    }
  }
  if (cork != nullptr) {
    cork->RunAtEndOfIteration([self = shared_from_this()] { self->Flush(); });
  } else if (start) {
    start_write_(&current_);
  }
}

void AttachOutbox::Flush() {
  bool start;
  {
    MutexLock lock(&mu_);
    flush_loop_ = nullptr;
    start = StartWriteLocked();
  }
  if (start) start_write_(&current_);
}

bool AttachOutbox::StartWriteLocked() {
  if (writing_ || held_ || closed_ || queue_.empty()) return false;
  writing_ = true;
  TakeNextLocked();
  return true;
}

void AttachOutbox::SetMaxBatch(uint32_t max_batch) {
  MutexLock lock(&mu_);
  max_batch_ = std::max<uint32_t>(1, max_batch);
}

void AttachOutbox::Release() {
  bool start;
  {
    MutexLock lock(&mu_);
    held_ = false;
    start = StartWriteLocked();
  }
  if (start) start_write_(&current_);
}

void AttachOutbox::OnWriteDone(bool ok) {
  bool next = false;  // this thread keeps the write token and sends current_
  bool finish = false;
  Status status;
  {
    MutexLock lock(&mu_);
    if (!ok) CloseLocked();  // the stream is broken: nothing more goes out
    if (!queue_.empty()) {
      TakeNextLocked();
      next = true;
    } else {
      writing_ = false;
      finish = FinishDueLocked(&status);
    }
    room_cv_.SignalAll();
  }
  if (finish) {
    finish_(status);
  } else if (next) {
    start_write_(&current_);
  }
}

void AttachOutbox::RequestFinish(const Status& status, bool drain) {
  bool finish = false;
  Status final_status;
  {
    MutexLock lock(&mu_);
    if (!finish_requested_) finish_status_ = status;
    finish_requested_ = true;
    if (!drain) CloseLocked();
    finish = !writing_ && FinishDueLocked(&final_status);
    room_cv_.SignalAll();
  }
  if (finish) finish_(final_status);
}

bool AttachOutbox::Congested() const {
  MutexLock lock(&mu_);
  return CongestedLocked();
}

bool AttachOutbox::WaitForRoom() {
  MutexLock lock(&mu_);
  while (!closed_ && CongestedLocked()) room_cv_.Wait(&mu_);
  return !closed_;
}

void AttachOutbox::CloseLocked() {
  closed_ = true;
  queue_.clear();
  backlog_bytes_ = 0;
}

void AttachOutbox::TakeNextLocked() {
  auto take = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    Queued& front = queue_.front();
    backlog_bytes_ -= std::min(backlog_bytes_, front.bytes);
    kvmi::v1::AttachResponse message = std::move(front.message);
    queue_.pop_front();
    return message;
  };
  const bool batch = max_batch_ > 1 && queue_.size() > 1 && queue_[0].message.has_event() &&
                     queue_[1].message.has_event();
  if (!batch) {
    current_ = take();
    return;
  }
  current_.Clear();
  auto* events = current_.mutable_events()->mutable_events();
  events->Reserve(static_cast<int>(std::min<size_t>(max_batch_, queue_.size())));
  while (!queue_.empty() && queue_.front().message.has_event() &&
         static_cast<uint32_t>(events->size()) < max_batch_) {
    kvmi::v1::AttachResponse message = take();
    events->Add(std::move(*message.mutable_event()));
  }
}

bool AttachOutbox::CongestedLocked() const {
  return queue_.size() >= kMaxBacklogMessages || backlog_bytes_ >= kMaxBacklogBytes;
}

bool AttachOutbox::FinishDueLocked(Status* status) {
  if (!finish_requested_ || finished_ || !queue_.empty()) return false;
  finished_ = true;
  closed_ = true;
  *status = finish_status_;
  return true;
}

void StreamHandler::OnBlockingEvent(const EventContext& ctx, VerdictPromise promise) {
  {
    MutexLock lock(&mu_);
    if (closed_) return;  // the promise dies here: fallback at once
    // Promises of events whose deadline passed long ago are dead weight: looked for at most
    // every kStalePromiseAge, not with every event (the table holds every unanswered event), so
    // one stays up to twice that past its deadline.
    const Clock::time_point now = Clock::now();
    if (now >= next_purge_) {
      next_purge_ = now + kStalePromiseAge;
      const Clock::time_point stale = now - kStalePromiseAge;
      for (auto it = pending_.begin(); it != pending_.end();) {
        it = it->second.ctx.deadline < stale ? pending_.erase(it) : std::next(it);
      }
    }
    pending_.emplace(ctx.event_id, Pending{ctx, std::move(promise)});
  }
  ObservedEvent observed{ctx.guest,    ctx.event, Verdict(), {},
                         ctx.event_id, {},        ctx.time,  ctx.context};
  kvmi::v1::AttachResponse message;
  *message.mutable_event() = ToProto(observed, /*include_registers=*/true, fields_);
  message.mutable_event()->clear_action();
  message.mutable_event()->clear_decided_by();
  outbox_->Send(std::move(message));
}

bool StreamHandler::Answer(const kvmi::v1::Verdict& verdict) {
  std::string error;
  VerdictPromise promise;
  Verdict v;
  bool holds_none = false;
  {
    MutexLock lock(&mu_);
    auto it = pending_.find(verdict.event_id());
    if (it == pending_.end()) {
      error = "event " + std::to_string(verdict.event_id()) +
              " is not pending (answered, past its deadline, or never sent)";
    } else if (absl::Status s = FromProto(verdict, it->second.ctx.event, &v); !s.ok()) {
      error = std::string(s.message());
    } else {
      promise = std::move(it->second.promise);
      pending_.erase(it);
    }
    holds_none = pending_.empty();
  }
  // Outside the lock: answering writes the reply and runs the observers, and the guest's loop
  // must not wait for that to hand this stream its next event.
  if (promise.valid()) {
    v.decided_by = "handler:" + id_;
    if (!promise.Answer(v)) error = "event already answered (deadline)";
  }
  if (!error.empty()) {
    kvmi::v1::AttachResponse message;
    message.mutable_error()->set_event_id(verdict.event_id());
    message.mutable_error()->set_message(error);
    outbox_->Send(std::move(message));
  }
  return holds_none;
}

std::shared_ptr<Guest> StreamHandler::GuestOf(uint64_t event_id) {
  MutexLock lock(&mu_);
  auto it = pending_.find(event_id);
  return it == pending_.end() ? nullptr : it->second.ctx.guest;
}

void StreamHandler::Close() {
  std::map<uint64_t, Pending> dying;
  {
    MutexLock lock(&mu_);
    closed_ = true;
    dying.swap(pending_);
  }
}

}  // namespace kvmid::api
