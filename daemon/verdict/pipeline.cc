#include "daemon/verdict/pipeline.h"

#include <spdlog/spdlog.h>

#include <algorithm>

#include "daemon/metrics/hooks.h"
#include "daemon/security/limits.h"
#include "kernel/abi/messages.h"
#include "kernel/abi/protocol.h"

namespace kvmid {

struct VerdictPromise::State {
  VerdictPipeline* pipeline = nullptr;
  std::shared_ptr<Guest> guest;
  std::shared_ptr<GuestSession> session;
  kvmi::Event event;
  uint64_t event_id = 0;
  Clock::time_point received;
  std::chrono::system_clock::time_point arrived;
  std::vector<std::string> monitor_hits;
  std::string handler_id;
  uint8_t fallback_action = KVMI_EVENT_ACTION_CONTINUE;
  std::atomic<bool> answered{false};
  EventLoop::TimerId timer = 0;  // loop thread only
  // The handler's count of held events (HandlerEntry::held), released when this one is answered.
  std::shared_ptr<std::atomic<uint32_t>> held;
  std::shared_ptr<const vmem::CapturedContext> context;  // null: none asked
};

namespace {

// A context capture may take this share of the event's deadline (1 / kContextBudgetDivisor);
// the rest is the handler's. Past it, the event goes on with its blocks marked incomplete.
constexpr int kContextBudgetDivisor = 2;

Verdict FallbackVerdict(uint8_t action, const char* why) {
  Verdict v;
  v.action = action;
  v.decided_by = std::string("fallback:") + why;
  return v;
}

}  // namespace

// ---- VerdictPromise ---------------------------------------------------------------------------

VerdictPromise& VerdictPromise::operator=(VerdictPromise&& other) noexcept {
  if (this != &other) {
    VerdictPromise dying(std::move(*this));  // an unanswered promise falls back
    state_ = std::move(other.state_);
  }
  return *this;
}

VerdictPromise::~VerdictPromise() {
  if (!state_ || state_->answered.exchange(true)) return;
  auto state = state_;
  state->session->loop()->RunInLoop([state] {
    state->pipeline->stats_.fallback_handler_gone++;
    state->pipeline->Deliver(state, FallbackVerdict(state->fallback_action, "handler gone"),
                             "handler gone");
  });
}

bool VerdictPromise::Answer(const Verdict& verdict) {
  if (!state_ || state_->answered.exchange(true)) return false;
  auto state = std::move(state_);
  // Delivered from the answering thread: a remote verdict is written to the guest by the gRPC
  // thread that received it (GuestSession::ReplyToEvent) while the guest's loop sleeps, with no
  // hand-off to the loop; by the loop if it is awake anyway, or if several came in one message
  // (attach.cc opens an EventLoop::HandOff for them).
  state->pipeline->stats_.by_handler++;
  state->pipeline->Deliver(state, verdict, nullptr);
  return true;
}

// ---- Registration -----------------------------------------------------------------------------

VerdictPipeline::Registration::Registration(Registration&& other) noexcept
    : pipeline_(std::exchange(other.pipeline_, nullptr)), id_(std::exchange(other.id_, 0)) {}

VerdictPipeline::Registration& VerdictPipeline::Registration::operator=(
    Registration&& other) noexcept {
  if (this != &other) {
    Reset();
    pipeline_ = std::exchange(other.pipeline_, nullptr);
    id_ = std::exchange(other.id_, 0);
  }
  return *this;
}

VerdictPipeline::Registration::~Registration() { Reset(); }

void VerdictPipeline::Registration::Reset() {
  if (pipeline_ != nullptr) pipeline_->Unregister(id_);
  pipeline_ = nullptr;
}

// ---- VerdictPipeline --------------------------------------------------------------------------

VerdictPipeline::VerdictPipeline(PolicySet* policies, Options options)
    : policies_(policies), options_(options) {
  SetDeadlines(options_.deadlines);
}

void VerdictPipeline::SetDeadlines(const std::array<EventDeadline, KVMI_NUM_EVENTS>& deadlines) {
  for (size_t i = 0; i < deadlines.size(); ++i) {
    deadline_ms_[i].store(deadlines[i].deadline.count(), std::memory_order_relaxed);
    fallback_action_[i].store(deadlines[i].fallback_action, std::memory_order_relaxed);
  }
}

VerdictPipeline::~VerdictPipeline() = default;

VerdictPipeline::Registration VerdictPipeline::RegisterHandler(
    std::shared_ptr<VerdictHandler> handler, const HandlerClaim& claim) {
  MutexLock lock(&mutex_);
  uint64_t id = next_handler_id_++;
  const bool wants_context = !claim.context.empty();
  handlers_.push_back(std::make_shared<HandlerEntry>(HandlerEntry{id, std::move(handler), claim}));
  if (wants_context) RecomputeDemandLocked();
  return Registration(this, id);
}

void VerdictPipeline::Unregister(uint64_t id) {
  std::shared_ptr<HandlerEntry> gone;
  {
    MutexLock lock(&mutex_);
    auto it = std::find_if(handlers_.begin(), handlers_.end(),
                           [id](const auto& h) { return h->id == id; });
    if (it == handlers_.end()) return;
    gone = std::move(*it);
    handlers_.erase(it);
    if (!gone->claim.context.empty()) RecomputeDemandLocked();
  }
  // `gone` is released outside the lock; promises it still holds fall back as they die.
}

uint64_t VerdictPipeline::AddObserver(EventObserver observer) {
  MutexLock lock(&mutex_);
  auto next = std::make_shared<std::vector<std::pair<uint64_t, EventObserver>>>(*observers_);
  uint64_t id = next_observer_id_++;
  next->emplace_back(id, std::move(observer));
  observer_count_ = next->size();
  std::atomic_store(
      &observers_,
      std::shared_ptr<const std::vector<std::pair<uint64_t, EventObserver>>>(std::move(next)));
  return id;
}

void VerdictPipeline::RemoveObserver(uint64_t id) {
  MutexLock lock(&mutex_);
  auto next = std::make_shared<std::vector<std::pair<uint64_t, EventObserver>>>(*observers_);
  next->erase(
      std::remove_if(next->begin(), next->end(), [id](const auto& o) { return o.first == id; }),
      next->end());
  observer_count_ = next->size();
  std::atomic_store(
      &observers_,
      std::shared_ptr<const std::vector<std::pair<uint64_t, EventObserver>>>(std::move(next)));
}

void VerdictPipeline::SetGuestLabels(const std::string& guest_name,
                                     std::map<std::string, std::string> labels) {
  MutexLock lock(&mutex_);
  labels_by_name_[guest_name] = std::move(labels);
  labels_generation_++;  // every cached view is stale now
}

void VerdictPipeline::ReplaceGuestLabels(
    std::map<std::string, std::map<std::string, std::string>> by_name) {
  MutexLock lock(&mutex_);
  labels_by_name_ = std::move(by_name);
  labels_generation_++;
}

std::shared_ptr<const GuestView> VerdictPipeline::ViewOf(const Guest& guest) const {
  uint64_t generation = labels_generation_.load();
  std::shared_ptr<const GuestView> cached = guest.cached_view();
  if (cached && cached->generation == generation) return cached;
  GuestIdentity identity = guest.identity();
  auto view = std::make_shared<GuestView>();
  view->uuid = identity.uuid;
  view->name = identity.name;
  view->generation = generation;
  {
    MutexLock lock(&mutex_);
    auto it = labels_by_name_.find(view->name);
    if (it != labels_by_name_.end()) view->labels = it->second;
  }
  const_cast<Guest&>(guest).set_cached_view(view);
  return view;
}

std::shared_ptr<VerdictPipeline::HandlerEntry> VerdictPipeline::FindHandler(const GuestView& guest,
                                                                            uint8_t event) const {
  const kvmi::Uuid& uuid = guest.uuid;
  MutexLock lock(&mutex_);
  for (const auto& entry : handlers_) {
    const HandlerClaim& claim = entry->claim;
    if (!claim.events.empty() && claim.events.count(event) == 0) continue;
    if (!claim.guests.empty() &&
        std::find(claim.guests.begin(), claim.guests.end(), uuid) == claim.guests.end()) {
      continue;
    }
    if (!claim.vms.empty()) {
      std::string uuid_text = kvmi::UuidToString(uuid);
      bool named = std::any_of(claim.vms.begin(), claim.vms.end(), [&](const std::string& vm) {
        return vm == guest.name || vm == uuid_text;
      });
      if (!named) continue;
    }
    return entry;
  }
  return nullptr;
}

void VerdictPipeline::RouteEvent(const std::shared_ptr<Guest>& guest,
                                 const std::shared_ptr<GuestSession>& session,
                                 const kvmi::Event& event) {
  stats_.events++;
  const Clock::time_point received = Clock::now();
  const std::chrono::system_clock::time_point arrived = std::chrono::system_clock::now();
  const uint64_t event_id = next_event_id_++;

  const kvmi::EventInfo* info = kvmi::FindEvent(event.id());
  if (!info->has_reply) {  // UNHOOK: nothing to answer; observers still see it
    if (HasObservers()) {
      Notify(ObservedEvent{
          guest, event, Verdict::Continue("none"), {}, event_id, {}, arrived, nullptr});
    }
    return;
  }
  if (event.id() == KVMI_EVENT_CREATE_VCPU ||
      (event.id() == KVMI_EVENT_PAUSE_VCPU && !guest->HasPauseRequest(event.vcpu()))) {
    // The daemon's own business: it armed the new vCPU; a pause nobody asked for (e.g. asked
    // before a restart) has nothing to hold.
    static const Verdict kDaemonContinue = Verdict::Continue("daemon");
    Reply(guest, session, event, kDaemonContinue, {}, event_id, received, arrived);
    return;
  }
  // Before any handler (or client) learns the id: a command bound to this event (SetRegisters
  // with event_id) goes out only while the vCPU still waits with it.
  session->NoteEventId(event.vcpu(), event.seq, event_id);

  // Event context: one relaxed load each (the claims' and streams' demand, the policies'); zero
  // when nobody asked, and then nothing else is done for it.
  const uint64_t wanted = demand_[event.id()].load(std::memory_order_relaxed);
  const uint64_t wanted_by_policies = policies_->packed_context_demand(event.id());
  if ((wanted | wanted_by_policies) != 0 && event.id() != KVMI_EVENT_PAUSE_VCPU) {
    vmem::ContextDemand demand = vmem::ContextDemand::Unpack(wanted);
    demand.Add(vmem::ContextDemand::Unpack(wanted_by_policies));
    CaptureThenDecide(guest, session, event, event_id, received, arrived, demand);
    return;
  }
  Decide(guest, session, event, event_id, received, arrived, nullptr);
}

void VerdictPipeline::CaptureThenDecide(const std::shared_ptr<Guest>& guest,
                                        const std::shared_ptr<GuestSession>& session,
                                        const kvmi::Event& event, uint64_t event_id,
                                        Clock::time_point received,
                                        std::chrono::system_clock::time_point arrived,
                                        const vmem::ContextDemand& demand) {
  stats_.context_captures++;
  // The budget: a share of the deadline the event will have (its handler's, else the type's).
  std::chrono::milliseconds deadline = deadline_for(event.id()).deadline;
  if (std::shared_ptr<HandlerEntry> entry = FindHandler(*ViewOf(*guest), event.id());
      entry && entry->claim.deadline.count() > 0) {
    deadline = entry->claim.deadline;
  }
  const std::chrono::milliseconds budget =
      std::max(std::chrono::milliseconds(1), deadline / kContextBudgetDivisor);
  ContextCapturer capturer;
  {
    MutexLock lock(&mutex_);
    capturer = capturer_;
  }
  // Loop thread only: the budget's timer and the capture it expires.
  struct Pending {
    EventLoop::TimerId timer = 0;
    std::weak_ptr<vmem::ContextCapture> capture;
  };
  auto pending = std::make_shared<Pending>();
  EventLoop* loop = session->loop();
  pending->timer = loop->RunAt(received + budget, [this, pending, budget] {
    pending->timer = 0;
    if (std::shared_ptr<vmem::ContextCapture> capture = pending->capture.lock()) {
      stats_.context_expired++;
      capture->Expire("the read did not finish within " + std::to_string(budget.count()) +
                      " ms (1/" + std::to_string(kContextBudgetDivisor) +
                      " of the event's deadline)");
    }
  });
  vmem::ContextCapture::Done done = [this, guest, session, event, event_id, received, arrived,
                                     pending,
                                     loop](std::shared_ptr<const vmem::CapturedContext> context) {
    loop->RunInLoop([this, guest, session, event, event_id, received, arrived, pending, loop,
                     context = std::move(context)]() mutable {
      if (pending->timer != 0) {
        loop->Cancel(pending->timer);
        pending->timer = 0;
      }
      for (const vmem::ContextBlock& block : context->blocks) {
        if (!block.complete) {
          stats_.context_incomplete++;
          break;
        }
      }
      Decide(guest, session, event, event_id, received, arrived, std::move(context));
    });
  };
  pending->capture =
      capturer ? capturer(guest, session, event, demand, std::move(done))
               : vmem::ContextCapture::Start(std::make_shared<vmem::SessionMemory>(session),
                                             nullptr, event, demand, std::move(done));
}

void VerdictPipeline::Decide(const std::shared_ptr<Guest>& guest,
                             const std::shared_ptr<GuestSession>& session, const kvmi::Event& event,
                             uint64_t event_id, Clock::time_point received,
                             std::chrono::system_clock::time_point arrived,
                             std::shared_ptr<const vmem::CapturedContext> context) {
  const EventDeadline defaults = deadline_for(event.id());
  // The fast path: policies decide on the loop thread, nothing allocated unless someone
  // observes.
  std::shared_ptr<const GuestView> view = ViewOf(*guest);
  PolicyDecision decision = policies_->Evaluate(*view, event, context.get());
  std::vector<std::string> monitor_hits;
  for (const auto& rule : decision.monitoring) monitor_hits.push_back(rule->name);
  if (decision.enforcing) {
    stats_.by_policy++;
    Reply(guest, session, event, decision.enforcing->verdict, monitor_hits, event_id, received,
          arrived, std::move(context));
    return;
  }

  auto state = std::make_shared<VerdictPromise::State>();
  state->pipeline = this;
  state->guest = guest;
  state->session = session;
  state->event = event;
  state->event_id = event_id;
  state->received = received;
  state->arrived = arrived;
  state->monitor_hits = std::move(monitor_hits);
  state->fallback_action = defaults.fallback_action;
  state->context = context;

  if (event.id() == KVMI_EVENT_PAUSE_VCPU) {
    // Held while the client that asked for the pause wants it, but never past the pause
    // deadline: a forgotten pause must not freeze a vCPU for good.
    class PausedVcpu : public HeldEvent {
     public:
      explicit PausedVcpu(VerdictPromise promise) : promise_(std::move(promise)) {}
      void Release(const std::string& by) override { promise_.Answer(Verdict::Continue(by)); }

     private:
      VerdictPromise promise_;
    };
    state->handler_id = "pause";
    state->fallback_action = KVMI_EVENT_ACTION_CONTINUE;
    state->timer = session->loop()->RunAt(received + options_.max_pause, [state] {
      if (state->answered.exchange(true)) return;
      state->pipeline->stats_.fallback_deadline++;
      state->pipeline->Deliver(state, FallbackVerdict(KVMI_EVENT_ACTION_CONTINUE, "pause deadline"),
                               "pause deadline");
    });
    // If the request vanished meanwhile, the hold dies unanswered and the vCPU continues.
    guest->HoldPause(event.vcpu(), std::make_unique<PausedVcpu>(VerdictPromise(state)), event_id);
    return;
  }

  std::shared_ptr<HandlerEntry> entry = FindHandler(*view, event.id());
  if (!entry) {
    // No handler claims it: the event type's default action, at once. Not a missed deadline,
    // so counted apart from the fallbacks.
    stats_.fallback_no_handler++;
    state->answered = true;
    Verdict by_default;
    by_default.action = defaults.fallback_action;
    by_default.decided_by = "default";
    Deliver(state, by_default, nullptr);
    return;
  }
  if (entry->claim.fallback_action) state->fallback_action = *entry->claim.fallback_action;
  // The held cap: one atomic add (and one subtract when answered, in Deliver).
  if (entry->claim.max_held != 0) {
    if (entry->held->fetch_add(1, std::memory_order_relaxed) >= entry->claim.max_held) {
      entry->held->fetch_sub(1, std::memory_order_relaxed);
      NoteHeldCap(*session, *entry);
      guest->CountFallback();
      state->handler_id = entry->handler->id();
      state->answered = true;
      Deliver(state, FallbackVerdict(state->fallback_action, "held events cap"), nullptr);
      return;
    }
    state->held = entry->held;
  }
  auto deadline = entry->claim.deadline.count() > 0 ? entry->claim.deadline : defaults.deadline;
  state->handler_id = entry->handler->id();
  EventContext ctx{guest, event, received + deadline, event_id, arrived, std::move(context)};
  state->timer = session->loop()->RunAt(ctx.deadline, [state] {
    if (state->answered.exchange(true)) return;
    state->pipeline->stats_.fallback_deadline++;
    state->pipeline->Deliver(state, FallbackVerdict(state->fallback_action, "deadline"),
                             "deadline");
  });
  entry->handler->OnBlockingEvent(ctx, VerdictPromise(state));
}

void VerdictPipeline::NoteHeldCap(const GuestSession& session, const HandlerEntry& entry) {
  stats_.fallbacks++;
  stats_.fallback_held_cap++;
  const security::LimitInfo& limit = security::InfoOf(security::Limit::kMaxHeldEventsPerHandler);
  Metrics::LimitRefused(limit.name);
  held_cap_unlogged_.fetch_add(1, std::memory_order_relaxed);
  const int64_t now = std::chrono::duration_cast<std::chrono::nanoseconds>(
                          std::chrono::steady_clock::now().time_since_epoch())
                          .count();
  int64_t last = held_cap_logged_ns_.load(std::memory_order_relaxed);
  if (last != 0 && now - last < std::chrono::nanoseconds(std::chrono::seconds(1)).count()) return;
  if (!held_cap_logged_ns_.compare_exchange_strong(last, now)) return;  // another thread logs
  spdlog::warn(
      "{}: handler {} holds {} unanswered events, the limit {} ({}): {} event(s) got the "
      "fallback at once since the last report",
      session.log_name(), entry.handler->id(), entry.claim.max_held, limit.name,
      security::KnobOf(limit.limit), held_cap_unlogged_.exchange(0, std::memory_order_relaxed));
}

void VerdictPipeline::Deliver(const std::shared_ptr<VerdictPromise::State>& state,
                              const Verdict& verdict, const char* fallback_reason) {
  if (state->held) state->held->fetch_sub(1, std::memory_order_relaxed);
  EventLoop* loop = state->session->loop();
  auto cancel_deadline = [state, loop] {  // the timer is loop business
    if (state->timer != 0) {
      loop->Cancel(state->timer);
      state->timer = 0;
    }
  };
  if (loop->InLoopThread()) {
    cancel_deadline();
  } else {
    // Nobody waits for this: it can ride on the loop's next wake-up. A deadline firing first
    // finds the event answered and does nothing.
    loop->PostQuietly(std::move(cancel_deadline));
  }
  if (fallback_reason != nullptr) {
    stats_.fallbacks++;
    state->guest->CountFallback();
    spdlog::warn("{}: {} on vCPU {} (seq {}): handler {} {}; answering {}",
                 state->session->log_name(), kvmi::EventName(state->event.id()),
                 state->event.vcpu(), state->event.seq, state->handler_id, fallback_reason,
                 kvmi::ActionName(verdict.action));
  }
  Reply(state->guest, state->session, state->event, verdict, state->monitor_hits, state->event_id,
        state->received, state->arrived, state->context);
}

void VerdictPipeline::Reply(const std::shared_ptr<Guest>& guest,
                            const std::shared_ptr<GuestSession>& session, const kvmi::Event& event,
                            const Verdict& verdict, const std::vector<std::string>& monitor_hits,
                            uint64_t event_id, Clock::time_point received,
                            std::chrono::system_clock::time_point arrived,
                            std::shared_ptr<const vmem::CapturedContext> context) {
  std::vector<std::vector<uint8_t>> batched;
  if (verdict.registers) {
    kvmi::SetRegistersRequest set_registers;
    set_registers.vcpu = event.vcpu();
    set_registers.regs = *verdict.registers;
    batched.emplace_back();
    kvmi::EncodeCommand(set_registers, 0, &batched.back());
  }
  kvmi::EventReply reply = MakeReply(event, verdict);
  if (!HasObservers()) {
    session->ReplyToEvent(reply, std::move(batched));
    return;
  }
  auto observed = std::make_shared<ObservedEvent>();
  observed->guest = guest;
  observed->event = event;
  observed->verdict = verdict;
  observed->monitor_hits = monitor_hits;
  observed->event_id = event_id;
  observed->time = arrived;
  observed->context = std::move(context);
  VerdictPipeline* self = this;
  session->ReplyToEvent(reply, std::move(batched), [self, observed, received](bool sent) {
    if (!sent) return;
    observed->latency = Clock::now() - received;
    self->Notify(*observed);
  });
}

// ---- Event context ---------------------------------------------------------------------------

VerdictPipeline::ContextDemandLease::ContextDemandLease(ContextDemandLease&& other) noexcept
    : pipeline_(std::exchange(other.pipeline_, nullptr)), id_(std::exchange(other.id_, 0)) {}

VerdictPipeline::ContextDemandLease& VerdictPipeline::ContextDemandLease::operator=(
    ContextDemandLease&& other) noexcept {
  if (this != &other) {
    Reset();
    pipeline_ = std::exchange(other.pipeline_, nullptr);
    id_ = std::exchange(other.id_, 0);
  }
  return *this;
}

VerdictPipeline::ContextDemandLease::~ContextDemandLease() { Reset(); }

void VerdictPipeline::ContextDemandLease::Reset() {
  if (pipeline_ != nullptr) pipeline_->RemoveContextDemand(id_);
  pipeline_ = nullptr;
}

VerdictPipeline::ContextDemandLease VerdictPipeline::AddContextDemand(uint32_t events,
                                                                      vmem::ContextDemand demand) {
  if (demand.empty()) return ContextDemandLease();
  MutexLock lock(&mutex_);
  const uint64_t id = next_demand_id_++;
  stream_demands_[id] = StreamDemand{events, demand};
  RecomputeDemandLocked();
  return ContextDemandLease(this, id);
}

void VerdictPipeline::RemoveContextDemand(uint64_t id) {
  MutexLock lock(&mutex_);
  if (stream_demands_.erase(id) != 0) RecomputeDemandLocked();
}

void VerdictPipeline::RecomputeDemandLocked() {
  std::array<vmem::ContextDemand, KVMI_NUM_EVENTS> by_event{};
  auto add = [&by_event](uint32_t events, const vmem::ContextDemand& demand) {
    for (size_t id = 0; id < by_event.size(); ++id) {
      if (events == 0 || (events & (1u << id)) != 0) by_event[id].Add(demand);
    }
  };
  for (const auto& entry : handlers_) {
    if (entry->claim.context.empty()) continue;
    uint32_t events = 0;
    for (uint8_t id : entry->claim.events) events |= 1u << id;
    add(events, entry->claim.context);
  }
  for (const auto& [id, stream] : stream_demands_) add(stream.events, stream.demand);
  for (size_t id = 0; id < by_event.size(); ++id) {
    demand_[id].store(by_event[id].Pack(), std::memory_order_relaxed);
  }
}

vmem::ContextDemand VerdictPipeline::context_demand(uint8_t event) const {
  vmem::ContextDemand demand =
      vmem::ContextDemand::Unpack(demand_[event].load(std::memory_order_relaxed));
  demand.Add(vmem::ContextDemand::Unpack(policies_->packed_context_demand(event)));
  return demand;
}

void VerdictPipeline::set_context_capturer(ContextCapturer capturer) {
  MutexLock lock(&mutex_);
  capturer_ = std::move(capturer);
}

bool VerdictPipeline::HasObservers() const { return !std::atomic_load(&observers_)->empty(); }

void VerdictPipeline::Notify(const ObservedEvent& observed) {
  auto observers = std::atomic_load(&observers_);
  for (const auto& [id, observer] : *observers) observer(observed);
}

void VerdictPipeline::SessionEnded(const std::shared_ptr<Guest>& guest,
                                   const std::shared_ptr<GuestSession>& session) {
  // Pending promises of this session stay valid objects; their replies are dropped by the
  // closed session, and the kernel has already let the vCPUs continue (§7.6).
}

void VerdictPipeline::GuestHooked(const std::shared_ptr<Guest>& guest) {
  ArmPolicies(guest);
  if (on_guest_hooked_) on_guest_hooked_(guest);
}

void VerdictPipeline::ArmPolicies(const std::shared_ptr<Guest>& guest) {
  std::map<std::string, Arming> wanted = policies_->ArmsFor(*ViewOf(*guest));
  GuestSnapshot snapshot = guest->Snapshot();
  for (const auto& [owner, arming] : snapshot.leases) {
    if (owner.rfind("policy:", 0) == 0 && wanted.count(owner) == 0) guest->ReleaseLease(owner);
  }
  for (auto& [owner, arming] : wanted) guest->SetLease(owner, std::move(arming));
}

}  // namespace kvmid
