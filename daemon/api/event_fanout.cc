#include "daemon/api/event_fanout.h"

#include <algorithm>
#include <utility>

#include "daemon/api/convert.h"
#include "daemon/api/limits.h"
#include "daemon/config/policy_convert.h"
#include "daemon/metrics/hooks.h"

namespace kvmid::api {
namespace {

uint32_t TypeBit(uint8_t type) { return 1u << std::min<uint8_t>(type, 31); }

}  // namespace

using grpc::Status;

bool CompiledFilter::Matches(const ObservedEvent& o) const {
  if (empty) return false;
  const kvmi::Event& e = o.event;
  if (!vms.empty()) {
    std::shared_ptr<const GuestView> view = o.guest->cached_view();
    std::string uuid = view ? kvmi::UuidToString(view->uuid) : o.guest->key();
    std::string name = view ? view->name : "";
    bool hit = false;
    for (const std::string& vm : vms) hit = hit || vm == uuid || vm == name || vm == o.guest->key();
    if (!hit) return false;
  }
  if (!events.empty() && events.count(e.id()) == 0) return false;
  if (!vcpus.empty() && vcpus.count(e.vcpu()) == 0) return false;
  if (!crs.empty() && (e.id() != KVMI_EVENT_CR || crs.count(e.specific.cr.cr) == 0)) return false;
  if (!msrs.empty() && (e.id() != KVMI_EVENT_MSR || msrs.count(e.specific.msr.msr) == 0)) {
    return false;
  }
  if (gpa_first || gpa_last || access != 0) {
    if (e.id() != KVMI_EVENT_PF) return false;
    if (gpa_first && e.specific.pf.gpa < *gpa_first) return false;
    if (gpa_last && e.specific.pf.gpa > *gpa_last) return false;
    if (access != 0 && (e.specific.pf.access & access) == 0) return false;
  }
  return true;
}

uint32_t CompiledFilter::Types() const {
  if (empty) return 0;
  uint32_t types = ~0u;
  if (!events.empty()) {
    types = 0;
    for (uint8_t id : events) types |= TypeBit(id);
  }
  if (!crs.empty()) types &= TypeBit(KVMI_EVENT_CR);
  if (!msrs.empty()) types &= TypeBit(KVMI_EVENT_MSR);
  if (gpa_first || gpa_last || access != 0) types &= TypeBit(KVMI_EVENT_PF);
  return types;
}

Status CompileFilter(const kvmi::v1::EventFilter& f, const std::string& field,
                     CompiledFilter* out) {
  constexpr uint32_t kMaxVcpu = 0xffff;  // a vCPU index is 16 bits on the wire
  const std::pair<const char*, int> sizes[] = {{"vms", f.vms_size()},
                                               {"events", f.events_size()},
                                               {"vcpus", f.vcpus_size()},
                                               {"crs", f.crs_size()},
                                               {"msrs", f.msrs_size()}};
  for (const auto& [name, size] : sizes) {
    if (static_cast<size_t>(size) > kMaxFilterEntries) {
      return InvalidArgument(field + "." + name, std::to_string(size) + " entries, at most " +
                                                     std::to_string(kMaxFilterEntries));
    }
  }
  out->vms.assign(f.vms().begin(), f.vms().end());
  for (int i = 0; i < f.events_size(); ++i) {
    uint8_t id;
    if (!FromEventType(f.events(i), &id)) {
      return InvalidArgument(field + ".events[" + std::to_string(i) + "]", "unknown event type");
    }
    out->events.insert(id);
  }
  for (uint32_t v : f.vcpus()) {
    if (v > kMaxVcpu) {
      return InvalidArgument(field + ".vcpus", std::to_string(v) + " is not a vCPU index");
    }
    out->vcpus.insert(v);
  }
  out->crs.insert(f.crs().begin(), f.crs().end());
  out->msrs.insert(f.msrs().begin(), f.msrs().end());
  if (f.has_gpa_first()) out->gpa_first = f.gpa_first();
  if (f.has_gpa_last()) out->gpa_last = f.gpa_last();
  if (out->gpa_first && out->gpa_last && *out->gpa_first > *out->gpa_last) {
    return InvalidArgument(field + ".gpa_first", "is above gpa_last");
  }
  if (!ParseAccess(f.access(), &out->access)) {
    return InvalidArgument(field + ".access", "'" + f.access() + "' is not made of r, w, x");
  }
  out->empty = false;
  return Status::OK;
}

bool StreamFilter::Matches(const ObservedEvent& o) const {
  bool allowed = allow.empty();
  for (const CompiledFilter& f : allow) {
    if (f.Matches(o)) {
      allowed = true;
      break;
    }
  }
  if (!allowed) return false;
  for (const CompiledFilter& f : deny) {
    if (f.Matches(o)) return false;
  }
  return true;
}

uint32_t StreamFilter::Types() const {
  if (allow.empty()) return ~0u;
  uint32_t types = 0;
  for (const CompiledFilter& f : allow) types |= f.Types();
  return types;
}

std::vector<std::string> StreamFilter::NamedGuests() const {
  std::set<std::string> names;
  for (const auto* list : {&allow, &deny}) {
    for (const CompiledFilter& f : *list) names.insert(f.vms.begin(), f.vms.end());
  }
  return {names.begin(), names.end()};
}

Status CompileStreamFilter(const kvmi::v1::StreamEventsRequest& request, StreamFilter* out) {
  using Filters = google::protobuf::RepeatedPtrField<kvmi::v1::EventFilter>;
  struct Kind {
    const char* name;
    const Filters* filters;
    std::vector<CompiledFilter>* compiled;
  };
  const Kind kinds[] = {{"allow", &request.allow(), &out->allow},
                        {"deny", &request.deny(), &out->deny}};
  for (const auto& [name, filters, compiled] : kinds) {
    if (static_cast<size_t>(filters->size()) > kMaxStreamFilters) {
      return InvalidArgument(name, std::to_string(filters->size()) + " filters, at most " +
                                       std::to_string(kMaxStreamFilters));
    }
    compiled->assign(filters->size(), CompiledFilter{});
    for (int i = 0; i < filters->size(); ++i) {
      Status s = CompileFilter(filters->Get(i), std::string(name) + "[" + std::to_string(i) + "]",
                               &(*compiled)[i]);
      if (!s.ok()) return s;
    }
  }
  return Status::OK;
}

// ---- VisibleGuests ------------------------------------------------------------------------------

VisibleGuests::VisibleGuests(CallContext call, VerdictPipeline* pipeline,
                             const security::AuthorizerHolder* holder)
    : pipeline_(pipeline),
      holder_(holder),
      restricted_(call.authorizer != nullptr),
      caller_(std::move(call.caller)) {
  MutexLock lock(&mu_);
  // The call's snapshot until the next reload (one that came between the call's admission and
  // this moment applies at the following reload).
  if (holder_ != nullptr) generation_ = holder_->generation();
  authorizer_ = std::move(call.authorizer);
}

security::Role VisibleGuests::RoleOf(const std::shared_ptr<Guest>& guest) {
  if (!restricted_) return security::Role::kAdmin;                    // unrestricted: every guest
  std::shared_ptr<const GuestView> view = pipeline_->ViewOf(*guest);  // cached on the guest
  std::shared_ptr<const security::Authorizer> authorizer;
  uint64_t generation;
  {
    MutexLock lock(&mu_);
    if (holder_ != nullptr && holder_->generation() != generation_) {
      // The authorization was reloaded: the new rules decide for this stream from now on.
      generation_ = holder_->generation();
      authorizer_ = holder_->Get();
      cache_.clear();
    }
    auto it = cache_.find(guest.get());
    if (it != cache_.end() && it->second.generation == generation_ &&
        it->second.view == view.get() && !it->second.view_alive.expired() &&
        !it->second.guest.expired()) {
      return it->second.role;
    }
    authorizer = authorizer_;
    generation = generation_;
  }
  // Outside the lock: builds a GuestRef.
  const security::GuestRef ref = GuestRefOf(*view);
  const security::Role role =
      authorizer == nullptr ? security::Role::kAdmin : authorizer->RoleOn(caller_, &ref);
  MutexLock lock(&mu_);
  if (cache_.size() >= kPurgeAbove) {
    for (auto it = cache_.begin(); it != cache_.end();) {
      it = it->second.guest.expired() ? cache_.erase(it) : std::next(it);
    }
  }
  // A decision made with rules a reload replaced meanwhile is not kept.
  if (generation == generation_)
    cache_[guest.get()] = Entry{guest, view.get(), view, role, generation};
  return role;
}

std::atomic<size_t> EventFanout::live_{0};

// ---- EventFanout --------------------------------------------------------------------------------

EventFanout::Subscription::Subscription(EventFanout* fanout, Sink* sink, StreamFilter filter,
                                        std::unique_ptr<VisibleGuests> visible, uint64_t max_behind,
                                        uint64_t cursor, uint64_t lost,
                                        std::chrono::nanoseconds heartbeat)
    : fanout_(fanout),
      sink_(sink),
      filter_(std::move(filter)),
      visible_(std::move(visible)),
      types_(filter_.Types()),
      max_behind_(max_behind),
      cursor_(cursor),
      pending_lost_(lost),
      heartbeat_(heartbeat),
      last_write_(std::chrono::steady_clock::now()) {
  fanout_->subscriptions_.fetch_add(1, std::memory_order_relaxed);
  live_.fetch_add(1, std::memory_order_relaxed);
}

EventFanout::Subscription::~Subscription() {
  fanout_->subscriptions_.fetch_sub(1, std::memory_order_relaxed);
  live_.fetch_sub(1, std::memory_order_relaxed);
}

bool EventFanout::Subscription::Wants(const ObservedEvent& o) {
  fanout_->evaluations_.fetch_add(1, std::memory_order_relaxed);
  return filter_.Matches(o) && (visible_ == nullptr || visible_->Visible(o.guest));
}

EventFanout::EventFanout(EventHistory* ring) : ring_(ring) {
  ring_->SetListener(this);
  // From here on every event is looked at (a stream may subscribe before the thread runs), with
  // the per-type counts there (what losses are counted from if the thread falls behind).
  uint64_t start;
  EventHistory::TypeCounts counts;
  do {
    start = ring_->head();
  } while (!ring_->CountsAt(start, &counts));
  thread_ = std::thread([this, start, counts] { Run(start, counts); });
}

EventFanout::~EventFanout() {
  ring_->SetListener(nullptr);
  {
    MutexLock lock(&wake_mu_);
    stop_ = true;
  }
  wake_cv_.Signal();
  thread_.join();
}

std::unique_ptr<EventFanout::Subscription> EventFanout::Subscribe(
    Sink* sink, StreamFilter filter, std::unique_ptr<VisibleGuests> visible, uint64_t max_behind,
    uint64_t cursor, uint64_t lost, std::chrono::nanoseconds heartbeat) {
  return std::unique_ptr<Subscription>(new Subscription(
      this, sink, std::move(filter), std::move(visible), max_behind, cursor, lost, heartbeat));
}

void EventFanout::Appended(uint8_t type) {
  // The loop thread's whole share of the fan-out: one load (a plain load on x86 even though it is
  // sequentially consistent), and a wake-up only for a type someone waits for.
  if ((mask_.load(std::memory_order_seq_cst) & TypeBit(type)) == 0) return;
  if (!sleeping_.load(std::memory_order_seq_cst) || !sleeping_.exchange(false)) return;
  MutexLock lock(&wake_mu_);
  wake_cv_.Signal();
}

void EventFanout::Continue(Subscription* sub) {
  if (sub->pending_lost_ > 0) {
    const uint64_t lost = sub->pending_lost_;
    sub->pending_lost_ = 0;
    Metrics::StreamEventsDropped(lost);  // a resume after events the ring no longer holds
    Deliver(sub, nullptr, lost);
    return;
  }
  while (true) {
    ObservedEvent event;
    uint64_t lost = 0;
    switch (ring_->Next(&sub->cursor_, sub->types_, sub->max_behind_, kMaxScan, &event, &lost)) {
      case EventHistory::Found::kLost:
        Metrics::StreamEventsDropped(lost);  // kvmid_stream_events_dropped_total
        Deliver(sub, nullptr, lost);
        return;
      case EventHistory::Found::kEvent:
        if (sub->Wants(event)) {
          Deliver(sub, &event, 0);
          return;
        }
        break;
      case EventHistory::Found::kMore:
        break;
      case EventHistory::Found::kCaughtUp:
        switch (Park(sub)) {
          case Parked::kParked:
            return;
          case Parked::kFinish:
            sub->sink_->Finish();
            return;
          case Parked::kRetry:
            break;
        }
        break;
    }
  }
}

void EventFanout::Deliver(Subscription* sub, const ObservedEvent* event, uint64_t dropped) {
  if (sub->cancelled_.load()) {
    sub->sink_->Finish();
    return;
  }
  if (sub->heartbeat_.count() > 0) sub->last_write_ = std::chrono::steady_clock::now();
  sub->sink_->StartWrite(event, dropped);
}

void EventFanout::WriteDone(Subscription* sub, bool ok) {
  if (!ok || sub->cancelled_.load()) {
    sub->sink_->Finish();
    return;
  }
  Continue(sub);
}

void EventFanout::Cancel(Subscription* sub) {
  sub->cancelled_.store(true);
  {
    MutexLock lock(&mu_);
    if (!WaitingOf(sub).parked) return;  // its owner (or gRPC's write) ends it
    RemoveWaitingLocked(sub);
  }
  sub->sink_->Finish();
}

EventFanout::Parked EventFanout::Park(Subscription* sub) {
  MutexLock lock(&mu_);
  // After Cancel's store: Cancel either saw the stream parked or this sees the cancel.
  if (sub->cancelled_.load()) return Parked::kFinish;
  AddWaitingLocked(sub);
  if (sub->types_ == 0) return Parked::kParked;  // matches nothing: waits for its cancel only
  // The mask is published (seq_cst) before the head is read: an event appended after this read
  // sees the stream's types in the mask and wakes the delivery thread.
  EventHistory::TypeCounts counts;
  if (ring_->head() > sub->cursor_ || !ring_->CountsAt(sub->cursor_, &counts)) {
    RemoveWaitingLocked(sub);
    return Parked::kRetry;
  }
  uint64_t counted = 0;
  for (uint32_t t = 0; t < 32; ++t) {
    if ((sub->types_ & (1u << t)) != 0) counted += counts[t];
  }
  WaitingOf(sub).counted = counted;
  return Parked::kParked;
}

void EventFanout::AddWaitingLocked(Subscription* sub) {
  Subscription::Waiting& w = WaitingOf(sub);
  w.parked = true;
  for (uint32_t t = 0; t < 32; ++t) {
    if ((sub->types_ & (1u << t)) == 0) continue;
    w.index[t] = static_cast<uint32_t>(waiting_[t].size());
    waiting_[t].push_back(sub);
  }
  ++waiting_count_;
  PublishMaskLocked();
  if (sub->heartbeat_.count() > 0) {
    w.heartbeat_due = sub->last_write_ + sub->heartbeat_;
    w.beat_index = static_cast<uint32_t>(beating_.size());
    beating_.push_back(sub);
    // Stored before sleeping_ is loaded; the delivery thread stores sleeping_ before it loads
    // next_heartbeat_: either it sees the earlier due or this sees it asleep and wakes it.
    const int64_t due = Ns(w.heartbeat_due);
    if (due < next_heartbeat_.load(std::memory_order_seq_cst)) {
      next_heartbeat_.store(due, std::memory_order_seq_cst);
      if (sleeping_.load(std::memory_order_seq_cst) && sleeping_.exchange(false)) {
        MutexLock lock(&wake_mu_);
        wake_cv_.Signal();
      }
    }
  }
}

void EventFanout::RemoveWaitingLocked(Subscription* sub) {
  Subscription::Waiting& w = WaitingOf(sub);
  w.parked = false;
  for (uint32_t t = 0; t < 32; ++t) {
    if ((sub->types_ & (1u << t)) == 0) continue;
    std::vector<Subscription*>& list = waiting_[t];
    const uint32_t i = w.index[t];
    Subscription* moved = list.back();
    list[i] = moved;
    WaitingOf(moved).index[t] = i;
    list.pop_back();
  }
  --waiting_count_;
  PublishMaskLocked();
  if (sub->heartbeat_.count() > 0) {
    // next_heartbeat_ may stay earlier than any due left: the walk then finds nothing and
    // recomputes it.
    Subscription* moved = beating_.back();
    beating_[w.beat_index] = moved;
    WaitingOf(moved).beat_index = w.beat_index;
    beating_.pop_back();
  }
}

void EventFanout::PublishMaskLocked() {
  uint32_t mask = 0;
  for (uint32_t t = 0; t < 32; ++t) {
    if (!waiting_[t].empty()) mask |= 1u << t;
  }
  mask_.store(mask, std::memory_order_seq_cst);
}

void EventFanout::Run(uint64_t start, EventHistory::TypeCounts counts) {
  // `done`: the events before it were looked at, or wanted by nobody. `counts`: the events of
  // each type before `base` (<= done), to count by type what waiting streams lose if this thread
  // ever falls behind the ring.
  uint64_t done = start, base = start;
  while (true) {
    bool behind = false;
    {
      MutexLock lock(&wake_mu_);
      while (true) {
        if (stop_) return;
        sleeping_.store(true, std::memory_order_seq_cst);
        const uint64_t head = ring_->head();
        if (done < ring_->tail()) {
          behind = true;
          break;
        }
        // What came since `done` arrived before `sleeping_` was set: look at it unless nobody
        // waits for its types (the mask is read after the head: a stream waiting for an event
        // in [done, head) published its types before).
        if (head != done && ring_->AnyOfTypes(done, head, mask_.load())) break;
        done = head;
        if (ring_->CountsAt(done, &counts)) base = done;
        // Read after sleeping_ is set (a stream parking with an earlier due wakes this thread).
        const int64_t due = next_heartbeat_.load(std::memory_order_seq_cst);
        if (due == kNever) {
          wake_cv_.Wait(&wake_mu_);
        } else if (due <= Ns(std::chrono::steady_clock::now()) ||
                   !wake_cv_.WaitUntil(&wake_mu_, std::chrono::steady_clock::time_point(
                                                      std::chrono::nanoseconds(due)))) {
          break;  // a heartbeat is due
        }
      }
      sleeping_.store(false, std::memory_order_seq_cst);
    }
    if (behind) done = CatchUp(&base, &counts);
    done = Dispatch(done);
    if (ring_->CountsAt(done, &counts)) base = done;
    Heartbeats(done);
  }
}

void EventFanout::Heartbeats(uint64_t done) {
  const auto now = std::chrono::steady_clock::now();
  if (next_heartbeat_.load(std::memory_order_seq_cst) > Ns(now)) return;
  heartbeat_walks_.fetch_add(1, std::memory_order_relaxed);
  std::vector<Delivery> deliveries;
  {
    MutexLock lock(&mu_);
    int64_t next = kNever;
    const auto horizon = now + kHeartbeatCoalesce;
    // Going down: removal swaps the last one into the removed place, already passed.
    for (size_t i = beating_.size(); i-- > 0;) {
      Subscription* sub = beating_[i];
      const auto due = WaitingOf(sub).heartbeat_due;
      if (due > horizon) {
        next = std::min(next, Ns(due));
        continue;
      }
      RemoveWaitingLocked(sub);
      // The events before `done` were looked at for it (Dispatch) and not wanted.
      if (sub->cursor_ < done) sub->cursor_ = done;
      deliveries.push_back(Delivery{sub, nullptr, 0, /*heartbeat=*/true});
    }
    next_heartbeat_.store(next, std::memory_order_seq_cst);
  }
  // The streams taken out are this thread's until their write completes.
  for (const Delivery& d : deliveries) {
    Subscription* sub = d.sub;
    if (sub->cancelled_.load()) {
      sub->sink_->Finish();
      continue;
    }
    ObservedEvent last;
    const uint64_t last_id =
        sub->cursor_ > 1 && ring_->CopyAt(sub->cursor_ - 1, &last) ? last.event_id : 0;
    heartbeats_.fetch_add(1, std::memory_order_relaxed);
    sub->last_write_ = now;
    sub->sink_->StartHeartbeat(last_id);
  }
}

uint64_t EventFanout::CatchUp(uint64_t* base, EventHistory::TypeCounts* counts) {
  EventHistory::TypeCounts tail_counts;
  const uint64_t tail = ring_->TailCounts(&tail_counts);
  std::vector<Delivery> deliveries;
  {
    MutexLock lock(&mu_);
    for (uint32_t t = 0; t < 32; ++t) {
      for (size_t i = waiting_[t].size(); i-- > 0;) {
        Subscription* sub = waiting_[t][i];
        if (sub->cursor_ >= tail) continue;
        // The events of its types overwritten before anyone looked at them for it: from its
        // own cursor if it parked after `base` (it had walked the events before itself), else
        // from `base` (this thread had looked at the events before it).
        uint64_t lost = 0;
        for (uint32_t type = 0; type < 32; ++type) {
          if ((sub->types_ & (1u << type)) == 0) continue;
          lost += tail_counts[type];
          if (sub->cursor_ < *base) lost -= (*counts)[type];
        }
        if (sub->cursor_ >= *base) lost -= WaitingOf(sub).counted;
        if (lost == 0) continue;
        RemoveWaitingLocked(sub);
        sub->cursor_ = tail;
        Metrics::StreamEventsDropped(lost);
        deliveries.push_back(Delivery{sub, nullptr, lost});
      }
    }
  }
  for (const Delivery& d : deliveries) Deliver(d.sub, nullptr, d.dropped);
  *base = tail;
  *counts = tail_counts;
  return tail;
}

uint64_t EventFanout::Dispatch(uint64_t from) {
  std::vector<Delivery> deliveries;
  uint64_t seq = from;
  {
    MutexLock lock(&mu_);
    while (deliveries.size() < kMaxBatch) {
      const uint64_t before = seq;
      ObservedEvent event;
      uint64_t lost = 0;
      const uint32_t mask = mask_.load(std::memory_order_relaxed);
      const EventHistory::Found found = ring_->Next(&seq, mask, 0, kMaxScan, &event, &lost);
      if (found == EventHistory::Found::kCaughtUp) break;
      if (found == EventHistory::Found::kMore) continue;
      if (found == EventHistory::Found::kLost) {
        seq = before;  // fell behind the ring: Run catches up (CatchUp counts the losses)
        break;
      }
      // kEvent at seq - 1: the streams waiting for its type (removal swaps the last one into the
      // place of the removed, which this loop, going down, has already passed).
      std::shared_ptr<const ObservedEvent> shared;
      std::vector<Subscription*>& list = waiting_[std::min<uint8_t>(event.event.id(), 31)];
      for (size_t i = list.size(); i-- > 0;) {
        Subscription* sub = list[i];
        if (sub->cursor_ >= seq) continue;  // parked after this event: it walked it itself
        if (!sub->Wants(event)) continue;
        if (!shared) shared = std::make_shared<const ObservedEvent>(event);
        RemoveWaitingLocked(sub);
        sub->cursor_ = seq;
        deliveries.push_back(Delivery{sub, shared, 0});
      }
    }
  }
  // The streams taken out are this thread's: convert and start their writes without the lock.
  for (const Delivery& d : deliveries) Deliver(d.sub, d.event.get(), d.dropped);
  return seq;
}

}  // namespace kvmid::api
