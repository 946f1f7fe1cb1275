// The two halves of an Attach stream that do not need gRPC's reactor, so that they can be tested
// alone: AttachOutbox (what the stream sends, one write at a time, bounded) and StreamHandler
// (the remote verdict handler that keeps the promises of the events it sent).
#ifndef KVMID_DAEMON_API_ATTACH_OUTBOX_H_
#define KVMID_DAEMON_API_ATTACH_OUTBOX_H_

#include <absl/base/thread_annotations.h>
#include <grpcpp/grpcpp.h>

#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <string>

#include "daemon/api/convert.h"
#include "daemon/api/limits.h"
#include "daemon/base/mutex.h"
#include "daemon/kvmid.h"
#include "proto/kvmi/v1/introspection.pb.h"

namespace kvmid {
class EventLoop;
}  // namespace kvmid

namespace kvmid::api {

// What one Attach stream sends to its client: a queue drained by one write at a time. Messages
// are queued from any thread (the guest's loop thread for events, gRPC's for verdict errors, the
// command runner for results); whoever finds no write in flight starts the next one, so an event
// goes on the wire from the loop thread with no hand-off.
class AttachOutbox : public std::enable_shared_from_this<AttachOutbox> {
 public:
  // Starts the write of one message (it stays valid until OnWriteDone); ends the stream.
  using StartWrite = std::function<void(const kvmi::v1::AttachResponse*)>;
  using Finish = std::function<void(const grpc::Status&)>;
  // Above this backlog the stream stops reading requests (and the command runner waits) until
  // the client has taken some: a client that never reads cannot grow kvmid's memory.
  static constexpr size_t kMaxBacklogMessages = api::kMaxBacklogMessages;
  static constexpr size_t kMaxBacklogBytes = api::kMaxBacklogBytes;

  AttachOutbox(StartWrite start_write, Finish finish)
      : start_write_(std::move(start_write)), finish_(std::move(finish)) {}

  void Send(kvmi::v1::AttachResponse message);
  // Events per message from now on (Claim.max_batch): when the next message to write is an event
  // and more events wait behind it, up to `max_batch` of them go as one AttachResponse.events.
  // And an event sent from a guest's loop thread with no write in flight is written at the end
  // of that loop's iteration (EventLoop::RunAtEndOfIteration), with the events of every other
  // guest that the same wake-up brought: it waits those few microseconds. Other messages, and
  // events from other threads, are written at once. 0 or 1: one event per message, each written
  // at once. Corking needs the outbox to be held by a shared_ptr (else it writes at once).
  void SetMaxBatch(uint32_t max_batch);
  // Until this is called nothing is written, only queued: the stream's first message (Claimed)
  // must not reach the client before the handler it announces is registered.
  void Release();
  // The write StartWrite began completed (ok: it reached the stream).
  void OnWriteDone(bool ok);
  // Ends the stream with `status`, calling Finish exactly once. drain: what is queued still goes
  // out first (the client half-closed and waits for its results); else it is dropped
  // (cancelled, or a failure).
  void RequestFinish(const grpc::Status& status, bool drain);
  bool Congested() const;
  // Blocks while the backlog is over its limit; false if the stream ended meanwhile.
  bool WaitForRoom();

 private:
  void CloseLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The end of a loop iteration that queued events: writes them if no write is in flight.
  void Flush();
  // Takes the write token and the next message into current_ if the stream may write now (the
  // caller then calls start_write_ outside the lock); false if not.
  bool StartWriteLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void TakeNextLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  bool CongestedLocked() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // No write in flight: true once (Finish is called exactly once).
  bool FinishDueLocked(grpc::Status* status) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const StartWrite start_write_;
  const Finish finish_;
  mutable Mutex mu_;
  CondVar room_cv_;
  struct Queued {
    kvmi::v1::AttachResponse message;
    size_t bytes;  // its serialized size, counted in backlog_bytes_
  };
  std::deque<Queued> queue_ ABSL_GUARDED_BY(mu_);
  uint32_t max_batch_ ABSL_GUARDED_BY(mu_) = 1;
  // The loop that will call Flush at the end of its iteration (null: no flush pending).
  EventLoop* flush_loop_ ABSL_GUARDED_BY(mu_) = nullptr;
  size_t backlog_bytes_ ABSL_GUARDED_BY(mu_) = 0;
  // The message being written. Filled under mu_ by whoever takes the write token (writing_) and
  // read by gRPC until OnWriteDone: only the token holder touches it.
  kvmi::v1::AttachResponse current_;
  bool writing_ ABSL_GUARDED_BY(mu_) = false;  // the write token
  bool held_ ABSL_GUARDED_BY(mu_) = true;      // see Release()
  bool closed_ ABSL_GUARDED_BY(mu_) = false;
  bool finish_requested_ ABSL_GUARDED_BY(mu_) = false;
  bool finished_ ABSL_GUARDED_BY(mu_) = false;
  grpc::Status finish_status_ ABSL_GUARDED_BY(mu_);
};

// A remote handler behind one Attach stream: sends each blocking event it is given to the client
// and keeps its promise until the client's verdict (or the stream's end) answers it.
class StreamHandler : public VerdictHandler {
 public:
  // `fields`: the Event fields the client asked for (Claim.field_mask, compiled once).
  StreamHandler(std::string id, std::shared_ptr<AttachOutbox> outbox,
                EventFields fields = EventFields())
      : id_(std::move(id)), outbox_(std::move(outbox)), fields_(fields) {}
  std::string id() const override { return id_; }

  void OnBlockingEvent(const EventContext& ctx, VerdictPromise promise) override;
  // A verdict from the client; errors go back on the stream. Returns whether the handler holds no
  // event now (it has no verdict left to give).
  bool Answer(const kvmi::v1::Verdict& verdict);
  // The guest of pending event `event_id` (authorization of a verdict); null if not pending.
  std::shared_ptr<Guest> GuestOf(uint64_t event_id);
  // The stream is over: every unanswered event falls back now (the promises die outside the
  // lock, their fallback runs on the guests' loops), and later events are refused at once.
  void Close();

 private:
  struct Pending {
    EventContext ctx;
    VerdictPromise promise;
  };
  const std::string id_;
  const std::shared_ptr<AttachOutbox> outbox_;
  const EventFields fields_;
  Mutex mu_;
  bool closed_ ABSL_GUARDED_BY(mu_) = false;
  // When the table is next searched for stale promises (not with every event: it holds every
  // event the handler has not answered).
  Clock::time_point next_purge_ ABSL_GUARDED_BY(mu_){};
  std::map<uint64_t, Pending> pending_ ABSL_GUARDED_BY(mu_);
};

}  // namespace kvmid::api

#endif  // KVMID_DAEMON_API_ATTACH_OUTBOX_H_
