// StreamEvents' delivery: every stream reads the one shared EventHistory ring from its own cursor,
// so that a guest's loop thread pays for an event the same whatever the number of open streams.
//
// The loop thread appends the event to the ring (one lock, one copy) and then, in Appended, does
// one atomic load of the "interested types" mask (the union of the types of the streams that are
// caught up and waiting) and, only if the event's type is in it and the delivery thread sleeps,
// one wake-up. A stream whose filter cannot match the type costs nothing; a stream with a write in
// flight (a client that does not read) is not waiting and costs nothing either.
//
// A stream's filters (StreamFilter): an event passes when ANY allow filter matches it (none: every
// event) and NO deny filter matches it (Tetragon's allow and deny lists). The types a stream
// waits for are the union of its allow filters' types: deny filters cannot widen them.
//
// Heartbeats: a stream with a heartbeat interval that has been parked (caught up, nothing
// written) that long is taken out of the waiting set by the delivery thread and writes a
// heartbeat (Sink::StartHeartbeat) instead of an event; its cursor first moves to where the
// delivery thread has looked (the events in between were looked at for it and rejected). No timer
// per stream: the delivery thread sleeps until the earliest heartbeat due (next_heartbeat_) and
// then walks the streams that have heartbeats once, taking every one due within
// kHeartbeatCoalesce (so that N streams with staggered deadlines cost at most one walk per
// kHeartbeatCoalesce). A stream parking with a due earlier than the one the thread sleeps for
// wakes it (the same store-then-load protocol as an append).
//
// A stream (Subscription) is, at any time, in one of three hands:
//   - its owner: the thread that walks the ring from its cursor (Next), applies its allow/deny
//     filters and visibility and starts its write (Sink::StartWrite): the thread that opened it,
//     gRPC's callback thread in OnWriteDone (WriteDone), or the delivery thread;
//   - gRPC, while a write is in flight;
//   - the waiting set (parked, caught up): indexed by event type; the delivery thread, woken by
//     an event of a waiting type, walks the new events once, evaluates only the streams waiting
//     for each event's type, and takes the streams that match out of the set (their owner from
//     then on). It drains everything available before sleeping again.
//
// Wake-ups cannot be lost: a stream that parks stores the mask, then loads the ring's head; an
// appender stores the head, then loads the mask (all sequentially consistent). Either the parking
// stream sees the new event (and walks it itself instead of parking), or the appender sees its
// type in the mask and wakes the delivery thread. The delivery thread likewise sets `sleeping_`
// and then looks at the head once more before it waits.
//
// Losses: a stream whose cursor falls behind the ring's tail (or more than its max_behind behind
// the head) skips to half a window behind the head and writes a DropNotice first. Its count is the
// number of events of ALL types that were overwritten before the stream looked at them: an upper
// bound of what its filter would have let through (a stream that does not read is not looked at, so
// the types of what it missed are not known). A waiting stream loses events only if the delivery
// thread itself falls a whole ring behind; its count is then the overwritten events of the types
// it waits for (from the ring's per-type counts; at most: events of those types that the delivery
// thread had already looked at and rejected for it count too). Both are counted in
// kvmid_stream_events_dropped_total.
//
// Ending: Cancel (gRPC's OnCancel) ends a waiting stream at once; any other stream ends at its
// owner's next step (before a write or at the write's completion). Sink::Finish is called exactly
// once, with no write in flight, and the fan-out never touches the stream after it.
#ifndef KVMID_DAEMON_API_EVENT_FANOUT_H_
#define KVMID_DAEMON_API_EVENT_FANOUT_H_

#include <absl/base/thread_annotations.h>
#include <grpcpp/grpcpp.h>

#include <array>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <unordered_map>
#include <utility>
#include <vector>

#include "daemon/api/call_context.h"
#include "daemon/api/event_history.h"
#include "daemon/base/mutex.h"
#include "daemon/kvmid.h"

namespace kvmid::api {

// An EventFilter, validated once and matched off the loop threads.
struct CompiledFilter {
  std::vector<std::string> vms;
  std::set<uint8_t> events;
  std::set<uint32_t> vcpus, crs, msrs;
  std::optional<uint64_t> gpa_first, gpa_last;
  uint8_t access = 0;
  bool empty = true;  // matches nothing (no filter given)

  bool Matches(const ObservedEvent& observed) const;
  // The event types (bit per event id) this filter can match: a stream that allows only these
  // is never looked at for another type.
  uint32_t Types() const;
};

// `filter` compiled; INVALID_ARGUMENT naming "<field>.<what>" if it is malformed or a field
// lists more than kMaxFilterEntries.
grpc::Status CompileFilter(const kvmi::v1::EventFilter& filter, const std::string& field,
                           CompiledFilter* out);

// A stream's filters: an event passes when any allow filter matches (no allow filter: every
// event) and no deny filter matches.
struct StreamFilter {
  std::vector<CompiledFilter> allow, deny;

  bool Matches(const ObservedEvent& observed) const;
  // The types the allow filters can match (their union; every type without allow filters).
  uint32_t Types() const;
  // The guest selectors (vms) the filters name, allow and deny, once each.
  std::vector<std::string> NamedGuests() const;
};

// A StreamEventsRequest's allow and deny filters compiled: INVALID_ARGUMENT naming the field
// ("allow", "deny[2].vcpus") when there are more than kMaxStreamFilters of a kind or one is
// malformed.
grpc::Status CompileStreamFilter(const kvmi::v1::StreamEventsRequest& request, StreamFilter* out);

// Which guests a stream's caller sees (CallContext::Visible), decided once per guest and again
// only when its labels change (the GuestView's generation) or the daemon's authorization is
// reloaded (SIGHUP: `holder`'s generation; the stream then decides with the new rules). Thread-
// safe.
class VisibleGuests {
 public:
  // `holder` (may be null: the call's snapshot for the stream's life) is the daemon's.
  VisibleGuests(CallContext call, VerdictPipeline* pipeline,
                const security::AuthorizerHolder* holder = nullptr);
  // The caller is a viewer of `guest` (lists and streams show it).
  bool Visible(const std::shared_ptr<Guest>& guest) {
    return RoleOf(guest) >= security::Role::kViewer;
  }
  // The caller has at least `role` on `guest` (e.g. operator: may see guest memory read with its
  // events, the event context).
  bool Allows(const std::shared_ptr<Guest>& guest, security::Role role) {
    return RoleOf(guest) >= role;
  }

 private:
  // The caller's highest role on `guest` (every role when the call had no authorizer), cached
  // per guest and view until the next authorization reload.
  security::Role RoleOf(const std::shared_ptr<Guest>& guest);
  // Entries whose guest is gone are purged once the cache holds this many.
  static constexpr size_t kPurgeAbove = 4096;
  struct Entry {
    std::weak_ptr<Guest> guest;  // the address is only this guest's while it lives
    // The view the decision was made on: a new view (labels reloaded, or the guest reconnected
    // under another name) means a new decision. The address is only that view's while it lives.
    const GuestView* view;
    std::weak_ptr<const GuestView> view_alive;
    security::Role role;
    uint64_t generation;  // of the rules it was decided with
  };
  VerdictPipeline* const pipeline_;
  const security::AuthorizerHolder* const holder_;
  const bool restricted_;  // the call had an authorizer (else: every guest)
  Mutex mu_;
  const security::Caller caller_;
  std::shared_ptr<const security::Authorizer> authorizer_ ABSL_GUARDED_BY(mu_);
  uint64_t generation_ ABSL_GUARDED_BY(mu_) = 0;
  std::unordered_map<const Guest*, Entry> cache_ ABSL_GUARDED_BY(mu_);
};

class EventFanout : public EventHistory::Listener {
 public:
  // The stream's side (the gRPC reactor, or a test's fake).
  class Sink {
   public:
    virtual ~Sink() = default;
    // Starts the write of `event`, or (event null) of a drop notice of `dropped` events. The
    // fan-out's WriteDone must follow when it completes.
    virtual void StartWrite(const ObservedEvent* event, uint64_t dropped) = 0;
    // Starts the write of a heartbeat: the stream was quiet for its interval; last_event_id is
    // the id of the newest event it looked at (0: none). WriteDone follows as for StartWrite.
    virtual void StartHeartbeat(uint64_t last_event_id) = 0;
    // Ends the call (once, no write in flight). The fan-out never touches the stream again.
    virtual void Finish() = 0;
  };

  class Subscription {
   public:
    ~Subscription();
    Subscription(const Subscription&) = delete;
    Subscription& operator=(const Subscription&) = delete;

   private:
    friend class EventFanout;
    Subscription(EventFanout* fanout, Sink* sink, StreamFilter filter,
                 std::unique_ptr<VisibleGuests> visible, uint64_t max_behind, uint64_t cursor,
                 uint64_t lost, std::chrono::nanoseconds heartbeat);
    bool Wants(const ObservedEvent& o);

    EventFanout* const fanout_;
    Sink* const sink_;
    const StreamFilter filter_;
    const std::unique_ptr<VisibleGuests> visible_;  // null: every guest
    const uint32_t types_;
    const uint64_t max_behind_;  // 0: the ring's capacity
    // The next ring sequence number to look at: its holder's (owner, or the fan-out under mu_
    // while it waits); thread confinement clang cannot express.
    uint64_t cursor_;
    uint64_t pending_lost_;  // a drop notice to write first (resume): the owner's
    const std::chrono::nanoseconds heartbeat_;  // 0: none
    // When its last write started (or it subscribed): the owner's, read by the fan-out under mu_
    // when it parks (AddWaitingLocked runs on the owner's thread).
    std::chrono::steady_clock::time_point last_write_;
    std::atomic<bool> cancelled_{false};
    // Only through EventFanout::WaitingOf (EventFanout::mu_).
    struct Waiting {
      bool parked = false;
      // Events of its types appended before its cursor when it parked (what CatchUp counts its
      // losses from).
      uint64_t counted = 0;
      std::array<uint32_t, 32> index{};  // its place in waiting_[type] for each of its types
      // Streams with heartbeats: when the next one is due, and its place in beating_.
      std::chrono::steady_clock::time_point heartbeat_due{};
      uint32_t beat_index = 0;
    } waiting_;
  };

  // `ring` outlives the fan-out; the fan-out listens to it from now on.
  explicit EventFanout(EventHistory* ring);
  ~EventFanout() override;
  EventFanout(const EventFanout&) = delete;
  EventFanout& operator=(const EventFanout&) = delete;

  // A new stream reading from `cursor` (ring sequence number; ring().head(): live only). Nothing
  // happens until Start. `visible` null: every guest. max_behind: how many events the stream may
  // fall behind the head before the oldest it has not looked at count as dropped (0: the ring).
  // lost > 0: the stream starts with a drop notice of that many (a resume cursor the ring no
  // longer holds). heartbeat > 0: a heartbeat after that long parked without a write.
  std::unique_ptr<Subscription> Subscribe(Sink* sink, StreamFilter filter,
                                          std::unique_ptr<VisibleGuests> visible,
                                          uint64_t max_behind, uint64_t cursor, uint64_t lost = 0,
                                          std::chrono::nanoseconds heartbeat = {});
  // The caller owns `sub` (it just subscribed): writes its first event or parks it.
  void Start(Subscription* sub) { Continue(sub); }
  // The write started by Sink::StartWrite completed (ok: it reached the stream).
  void WriteDone(Subscription* sub, bool ok);
  // The call was cancelled: ends a waiting stream now, any other at its owner's next step.
  void Cancel(Subscription* sub);

  const EventHistory& ring() const { return *ring_; }

  // EventHistory::Listener: on the appending loop thread.
  void Appended(uint8_t type) override;

  // For tests and the bench: filter evaluations (allow/deny/visibility of one stream for one
  // event), streams waiting, streams open.
  uint64_t filter_evaluations() const { return evaluations_.load(std::memory_order_relaxed); }
  size_t waiting() const {
    MutexLock lock(&mu_);
    return waiting_count_;
  }
  size_t subscriptions() const { return subscriptions_.load(std::memory_order_relaxed); }
  // Heartbeats started, and the delivery thread's walks over the streams with heartbeats.
  uint64_t heartbeats() const { return heartbeats_.load(std::memory_order_relaxed); }
  uint64_t heartbeat_walks() const { return heartbeat_walks_.load(std::memory_order_relaxed); }
  // Every fan-out's together (tests over a whole server, which cannot reach its fan-out).
  static size_t live_subscriptions() { return live_.load(std::memory_order_relaxed); }

 private:
  // Slots one ring lock covers at most while a stream looks for its next event.
  static constexpr size_t kMaxScan = 256;
  // Streams the delivery thread takes out of the waiting set before it starts their writes.
  static constexpr size_t kMaxBatch = 256;
  // A heartbeat walk takes the streams due within this much too (one walk serves them all).
  static constexpr std::chrono::milliseconds kHeartbeatCoalesce{20};
  static constexpr int64_t kNever = INT64_MAX;
  enum class Parked { kParked, kRetry, kFinish };
  struct Delivery {
    Subscription* sub;
    std::shared_ptr<const ObservedEvent> event;  // null: a drop notice (or a heartbeat)
    uint64_t dropped;
    bool heartbeat = false;
  };

  Subscription::Waiting& WaitingOf(Subscription* sub) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    return sub->waiting_;
  }
  // The owner's step: walks the ring from the cursor; writes, or parks.
  void Continue(Subscription* sub);
  void Deliver(Subscription* sub, const ObservedEvent* event, uint64_t dropped);
  // The delivery thread: heartbeats for the parked streams due by now (`done`: where it has
  // looked), and next_heartbeat_ set to the next one due.
  void Heartbeats(uint64_t done);
  static int64_t Ns(std::chrono::steady_clock::time_point t) {
    return std::chrono::duration_cast<std::chrono::nanoseconds>(t.time_since_epoch()).count();
  }
  Parked Park(Subscription* sub);
  void AddWaitingLocked(Subscription* sub) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void RemoveWaitingLocked(Subscription* sub) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void PublishMaskLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The delivery thread, looking at the events from `start` on (`counts`: CountsAt(start)).
  void Run(uint64_t start, EventHistory::TypeCounts counts);
  // Walks the events from `from` for the waiting streams; returns where it stopped.
  uint64_t Dispatch(uint64_t from);
  // The delivery thread fell behind the ring: waiting streams that lost events of their types
  // (counted from the type counts at *base) get a drop notice. Returns the tail.
  uint64_t CatchUp(uint64_t* base, EventHistory::TypeCounts* counts);

  EventHistory* const ring_;
  std::atomic<uint64_t> evaluations_{0};
  std::atomic<size_t> subscriptions_{0};
  static std::atomic<size_t> live_;
  // The union of waiting_[t] non-empty: what the loop thread checks.
  std::atomic<uint32_t> mask_{0};
  std::atomic<bool> sleeping_{false};

  mutable Mutex mu_;  // the waiting set (never taken by a loop thread)
  std::array<std::vector<Subscription*>, 32> waiting_ ABSL_GUARDED_BY(mu_);
  size_t waiting_count_ ABSL_GUARDED_BY(mu_) = 0;
  std::vector<Subscription*> beating_ ABSL_GUARDED_BY(mu_);  // the waiting with heartbeats
  // The earliest heartbeat due among beating_ (steady ns; kNever: none). Written under mu_,
  // read by the delivery thread without it (the wake-up protocol above).
  std::atomic<int64_t> next_heartbeat_{kNever};
  std::atomic<uint64_t> heartbeats_{0}, heartbeat_walks_{0};

  Mutex wake_mu_;  // the delivery thread's sleep
  CondVar wake_cv_;
  bool stop_ ABSL_GUARDED_BY(wake_mu_) = false;
  std::thread thread_;
};

}  // namespace kvmid::api

#endif  // KVMID_DAEMON_API_EVENT_FANOUT_H_
