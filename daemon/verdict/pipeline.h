// The verdict pipeline: every blocking event is answered by, in order,
//   1. an in-daemon policy rule that enforces on it (no network hop), else
//   2. the registered handler that claims the guest and event type, within its deadline, else
//   3. the event type's fallback action -- at once when no handler claims the event (counted as
//      "default", not as a fallback), or when the handler misses its deadline, or the moment the
//      handler goes away.
// No guest ever waits forever. Every fallback is counted and logged with the guest and event.
// Observers get a copy of every event with its verdict, off the hot path.
#ifndef KVMID_DAEMON_VERDICT_PIPELINE_H_
#define KVMID_DAEMON_VERDICT_PIPELINE_H_

#include <array>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "daemon/base/mutex.h"
#include "daemon/guest/guest.h"
#include "daemon/session/guest_session.h"
#include "daemon/verdict/policy.h"
#include "daemon/verdict/verdict.h"
#include "daemon/vmem/context_capture.h"
#include "daemon/vmem/event_context.h"
#include "kernel/abi/events.h"

namespace kvmid {

// What a handler is given for one blocking event.
struct EventContext {
  std::shared_ptr<Guest> guest;
  kvmi::Event event;
  Clock::time_point deadline;
  uint64_t event_id = 0;  // daemon-wide unique id of this event (for replies over the network)
  std::chrono::system_clock::time_point time;  // wall clock when the event arrived
  // The bytes kvmid read with the event (issue 15: the claim's ContextDemand, or a stream's or a
  // policy's); null when nobody asked for any.
  std::shared_ptr<const vmem::CapturedContext> context;
};

// Answers one event exactly once. Destroying an unanswered promise answers with the fallback at
// once: a handler that goes away (client died, stream ended) never leaves a vCPU waiting for
// the deadline.
class VerdictPromise {
 public:
  VerdictPromise() = default;
  VerdictPromise(VerdictPromise&&) noexcept = default;
  VerdictPromise& operator=(VerdictPromise&&) noexcept;
  VerdictPromise(const VerdictPromise&) = delete;
  VerdictPromise& operator=(const VerdictPromise&) = delete;
  ~VerdictPromise();

  // Any thread. False if the event was already answered (deadline passed, session gone).
  bool Answer(const Verdict& verdict);
  bool valid() const { return state_ != nullptr; }

  struct State;  // shared with the pipeline's deadline timer

 private:
  friend class VerdictPipeline;
  explicit VerdictPromise(std::shared_ptr<State> state) : state_(std::move(state)) {}
  std::shared_ptr<State> state_;
};

class VerdictHandler {
 public:
  virtual ~VerdictHandler() = default;
  virtual std::string id() const = 0;
  // Called on the guest's loop thread; must not block. Keep the promise and answer it from any
  // thread before ctx.deadline.
  virtual void OnBlockingEvent(const EventContext& ctx, VerdictPromise promise) = 0;
};

struct HandlerClaim {
  std::set<uint8_t> events;                // event ids; empty = every blocking event
  std::vector<kvmi::Uuid> guests;          // empty = every guest (see also `vms`)
  std::vector<std::string> vms;            // UUID text or names; empty = every guest
  std::chrono::milliseconds deadline{0};   // 0 = the event type's default
  std::optional<uint8_t> fallback_action;  // unset = the event type's default
  // Events the handler may hold unanswered at once; past it, the next events get the fallback at
  // once instead of waiting for their deadline (counted, logged rate-limited, and counted as
  // refused by limits.max_held_events_per_handler). 0 = no cap.
  uint32_t max_held = 0;
  // Bytes kvmid reads with each claimed event before handing it over (at RIP, RSP, around a PF's
  // GVA), so that the handler needs no read of its own; empty = none.
  vmem::ContextDemand context;
};

// What observers see.
struct ObservedEvent {
  std::shared_ptr<Guest> guest;
  kvmi::Event event;
  Verdict verdict;  // decided_by tells who (monitor rules listed in `monitor_hits`)
  std::vector<std::string> monitor_hits;
  uint64_t event_id = 0;
  std::chrono::nanoseconds latency{0};  // event received -> reply written
  // Wall clock (CLOCK_REALTIME, a vDSO read) when the event arrived: for timestamps, not for
  // measuring (`latency` is from the monotonic clock).
  std::chrono::system_clock::time_point time;
  // The event's context, when some handler, stream or policy asked for it (else null): the ring
  // keeps it with the event.
  std::shared_ptr<const vmem::CapturedContext> context;
};
using EventObserver = std::function<void(const ObservedEvent&)>;

class VerdictPipeline : public GuestEventRouter {
 public:
  struct Options {
    std::array<EventDeadline, KVMI_NUM_EVENTS> deadlines{};  // per event id
    // The longest a vCPU stays paused for a client before kvmid lets it go.
    std::chrono::milliseconds max_pause{60000};
  };
  VerdictPipeline(PolicySet* policies, Options options);
  ~VerdictPipeline() override;

  // A handler registration lives as long as the returned object (move-only lease).
  class Registration {
   public:
    Registration() = default;
    Registration(Registration&& other) noexcept;
    Registration& operator=(Registration&& other) noexcept;
    ~Registration();
    void Reset();

   private:
    friend class VerdictPipeline;
    Registration(VerdictPipeline* pipeline, uint64_t id) : pipeline_(pipeline), id_(id) {}
    VerdictPipeline* pipeline_ = nullptr;
    uint64_t id_ = 0;
  };
  Registration RegisterHandler(std::shared_ptr<VerdictHandler> handler, const HandlerClaim& claim);

  // Observers: called after the reply went out, on the guest's loop thread, or for a verdict
  // answered elsewhere (a remote handler) on the answering thread while the guest's session
  // holds its write lock; either way one vCPU's events are observed in order. Must be quick
  // (copy and hand off) and must not call into guest sessions. Returns an id for
  // RemoveObserver.
  uint64_t AddObserver(EventObserver observer);
  void RemoveObserver(uint64_t id);
  size_t observer_count() const { return observer_count_.load(); }

  // Guest labels (from configuration), used by policy guest selectors.
  void SetGuestLabels(const std::string& guest_name, std::map<std::string, std::string> labels);
  // Replaces every guest's labels at once (a configuration reload).
  void ReplaceGuestLabels(std::map<std::string, std::map<std::string, std::string>> by_name);
  std::shared_ptr<const GuestView> ViewOf(const Guest& guest) const;

  struct Stats {
    std::atomic<uint64_t> events{0};
    std::atomic<uint64_t> by_policy{0};
    std::atomic<uint64_t> by_handler{0};
    std::atomic<uint64_t> fallbacks{0};
    std::atomic<uint64_t> fallback_no_handler{0};
    std::atomic<uint64_t> fallback_deadline{0};
    std::atomic<uint64_t> fallback_handler_gone{0};
    std::atomic<uint64_t> fallback_held_cap{0};   // HandlerClaim::max_held reached
    std::atomic<uint64_t> context_captures{0};    // events whose context kvmid read
    std::atomic<uint64_t> context_incomplete{0};  // ... with a block incomplete
    std::atomic<uint64_t> context_expired{0};     // ... cut short by the event's budget
  };
  const Stats& stats() const { return stats_; }
  EventDeadline deadline_for(uint8_t event) const {
    return EventDeadline{
        std::chrono::milliseconds(deadline_ms_[event].load(std::memory_order_relaxed)),
        fallback_action_[event].load(std::memory_order_relaxed)};
  }
  // New deadlines and fallbacks for events that arrive from now on (a configuration reload).
  void SetDeadlines(const std::array<EventDeadline, KVMI_NUM_EVENTS>& deadlines);

  // ---- Event context (issue 15) ----
  // A demand for context from something other than a handler (a StreamEvents stream): for events
  // whose type bit (1 << event id) is in `events` (0 = every type). Lives as long as the lease.
  class ContextDemandLease {
   public:
    ContextDemandLease() = default;
    ContextDemandLease(ContextDemandLease&& other) noexcept;
    ContextDemandLease& operator=(ContextDemandLease&& other) noexcept;
    ~ContextDemandLease();
    void Reset();

   private:
    friend class VerdictPipeline;
    ContextDemandLease(VerdictPipeline* pipeline, uint64_t id) : pipeline_(pipeline), id_(id) {}
    VerdictPipeline* pipeline_ = nullptr;
    uint64_t id_ = 0;
  };
  ContextDemandLease AddContextDemand(uint32_t events, vmem::ContextDemand demand)
      ABSL_LOCKS_EXCLUDED(mutex_);
  // What kvmid reads with an event of type `event` now: the union of the claims, the streams and
  // the policies that want bytes.
  vmem::ContextDemand context_demand(uint8_t event) const;
  // Starts a context capture. Set by whoever owns the guests' translation caches (the API's
  // AddressTranslation), so that the RIP page is a cache hit after the first event; unset: the
  // guest's session, no cache.
  using ContextCapturer = std::function<std::shared_ptr<vmem::ContextCapture>(
      const std::shared_ptr<Guest>& guest, const std::shared_ptr<GuestSession>& session,
      const kvmi::Event& event, const vmem::ContextDemand& demand,
      vmem::ContextCapture::Done done)>;
  void set_context_capturer(ContextCapturer capturer) ABSL_LOCKS_EXCLUDED(mutex_);

  // GuestEventRouter
  void RouteEvent(const std::shared_ptr<Guest>& guest, const std::shared_ptr<GuestSession>& session,
                  const kvmi::Event& event) override;
  void SessionEnded(const std::shared_ptr<Guest>& guest,
                    const std::shared_ptr<GuestSession>& session) override;
  void GuestHooked(const std::shared_ptr<Guest>& guest) override;

  // Arms (as leases) what every policy needs on `guest`; call after policy changes too.
  void ArmPolicies(const std::shared_ptr<Guest>& guest);
  // Also called when a guest is hooked (after the policies are armed): the daemon arms what
  // clients asked for. Set before guests connect.
  void set_on_guest_hooked(std::function<void(const std::shared_ptr<Guest>&)> hook) {
    on_guest_hooked_ = std::move(hook);
  }

 private:
  friend class VerdictPromise;
  struct HandlerEntry {
    uint64_t id;
    std::shared_ptr<VerdictHandler> handler;
    HandlerClaim claim;
    // Events given to the handler and not answered yet (by it, its deadline or its end). Apart
    // from the entry, so that an event's state does not keep the handler alive.
    std::shared_ptr<std::atomic<uint32_t>> held = std::make_shared<std::atomic<uint32_t>>(0);
  };

  void Unregister(uint64_t id);
  // Reads the event's context (with half its deadline as the budget), then Decide()s on the loop
  // thread. The vCPU is stopped meanwhile; the loop thread is not: the reads are asynchronous.
  void CaptureThenDecide(const std::shared_ptr<Guest>& guest,
                         const std::shared_ptr<GuestSession>& session, const kvmi::Event& event,
                         uint64_t event_id, Clock::time_point received,
                         std::chrono::system_clock::time_point arrived,
                         const vmem::ContextDemand& demand) ABSL_LOCKS_EXCLUDED(mutex_);
  // Policies, then the pause hold or the handler, else the default (RouteEvent's second half).
  void Decide(const std::shared_ptr<Guest>& guest, const std::shared_ptr<GuestSession>& session,
              const kvmi::Event& event, uint64_t event_id, Clock::time_point received,
              std::chrono::system_clock::time_point arrived,
              std::shared_ptr<const vmem::CapturedContext> context);
  void RemoveContextDemand(uint64_t id) ABSL_LOCKS_EXCLUDED(mutex_);
  // demand_ from the handlers' claims and the streams' demands.
  void RecomputeDemandLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mutex_);
  std::shared_ptr<HandlerEntry> FindHandler(const GuestView& guest, uint8_t event) const;
  // Sends the reply if the event is still pending; notifies observers. Any thread (the caller
  // won the promise's `answered` flag).
  void Deliver(const std::shared_ptr<VerdictPromise::State>& state, const Verdict& verdict,
               const char* fallback_reason);
  void Notify(const ObservedEvent& observed);
  // An event refused by its handler's held cap: counted, logged at most once a second.
  void NoteHeldCap(const GuestSession& session, const HandlerEntry& entry);
  bool HasObservers() const;
  // Encodes and sends the reply (with batched SET_REGISTERS); observers get a copy.
  void Reply(const std::shared_ptr<Guest>& guest, const std::shared_ptr<GuestSession>& session,
             const kvmi::Event& event, const Verdict& verdict,
             const std::vector<std::string>& monitor_hits, uint64_t event_id,
             Clock::time_point received, std::chrono::system_clock::time_point arrived,
             std::shared_ptr<const vmem::CapturedContext> context = nullptr);

  PolicySet* policies_;
  Options options_;
  // options_.deadlines as the event path reads them: relaxed atomics, so a reload never takes a
  // lock there (one event may see a new deadline with the old fallback for that instant).
  std::array<std::atomic<int64_t>, KVMI_NUM_EVENTS> deadline_ms_{};
  std::array<std::atomic<uint8_t>, KVMI_NUM_EVENTS> fallback_action_{};
  std::function<void(const std::shared_ptr<Guest>&)> on_guest_hooked_;
  Stats stats_;
  std::atomic<uint64_t> next_event_id_{1};
  std::atomic<int64_t> held_cap_logged_ns_{0};  // steady clock of the last held-cap log line
  std::atomic<uint64_t> held_cap_unlogged_{0};  // held-cap refusals since that line

  mutable Mutex mutex_;  // never held across I/O or a call out
  uint64_t next_handler_id_ ABSL_GUARDED_BY(mutex_) = 1;
  std::vector<std::shared_ptr<HandlerEntry>> handlers_ ABSL_GUARDED_BY(mutex_);
  uint64_t next_observer_id_ ABSL_GUARDED_BY(mutex_) = 1;
  std::atomic<size_t> observer_count_{0};  // the event path's cheap "anyone listening?"
  // Read with std::atomic_load on every event, without the lock; replaced whole (atomic_store)
  // by writers, who hold mutex_ so that two changes never lose one another.
  std::shared_ptr<const std::vector<std::pair<uint64_t, EventObserver>>> observers_ =
      std::make_shared<std::vector<std::pair<uint64_t, EventObserver>>>();
  std::map<std::string, std::map<std::string, std::string>> labels_by_name_ ABSL_GUARDED_BY(mutex_);
  std::atomic<uint64_t> labels_generation_{1};
  // Event context: what the claims and streams ask, per event id (ContextDemand::Pack), read on
  // the event path with one relaxed load (policies have their own: PolicySet::context_demand).
  std::array<std::atomic<uint64_t>, KVMI_NUM_EVENTS> demand_{};
  struct StreamDemand {
    uint32_t events = 0;  // bit per event id; 0 = every type
    vmem::ContextDemand demand;
  };
  uint64_t next_demand_id_ ABSL_GUARDED_BY(mutex_) = 1;
  std::map<uint64_t, StreamDemand> stream_demands_ ABSL_GUARDED_BY(mutex_);
  ContextCapturer capturer_ ABSL_GUARDED_BY(mutex_);
};

}  // namespace kvmid

#endif  // KVMID_DAEMON_VERDICT_PIPELINE_H_
