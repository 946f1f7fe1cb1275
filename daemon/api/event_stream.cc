#include "daemon/api/event_stream.h"

#include <memory>
#include <unordered_set>
#include <utility>

#include "daemon/api/convert.h"
#include "daemon/api/limits.h"
#include "daemon/api/stream_outbox.h"
#include "daemon/config/policy_convert.h"
#include "daemon/metrics/hooks.h"

namespace kvmid::api {

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

Status CompileFilter(const kvmi::v1::EventFilter& f, const std::string& field,
                     CompiledFilter* out) {
  constexpr uint32_t kMaxVcpu = 0xffff;  // a vCPU index is 16 bits on the wire
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

bool VisibleGuests::Visible(const std::shared_ptr<Guest>& guest) {
  if (!call_.authorizer) return true;                                 // unrestricted: every guest
  std::shared_ptr<const GuestView> view = pipeline_->ViewOf(*guest);  // cached on the guest
  {
    MutexLock lock(&mu_);
    auto it = cache_.find(guest.get());
    if (it != cache_.end() && it->second.view == view.get() && !it->second.view_alive.expired() &&
        !it->second.guest.expired()) {
      return it->second.visible;
    }
  }
  const bool visible = call_.Visible(*view);  // outside the lock: builds a GuestRef
  MutexLock lock(&mu_);
  if (cache_.size() >= kPurgeAbove) {
    for (auto it = cache_.begin(); it != cache_.end();) {
      it = it->second.guest.expired() ? cache_.erase(it) : std::next(it);
    }
  }
  cache_[guest.get()] = Entry{guest, view.get(), view, visible};
  return visible;
}

uint64_t QueuedBytes(const ObservedEvent& o) {
  uint64_t bytes = sizeof(StreamOutbox<ObservedEvent>::Charged);
  for (const std::string& hit : o.monitor_hits) bytes += sizeof(std::string) + hit.capacity();
  return bytes;
}

namespace {

using EventOutbox = StreamOutbox<ObservedEvent>;

// A queue that held at least this much and drained is worth handing back (StreamLimits::Freed).
constexpr uint64_t kLargeQueueBytes = 1u << 20;

// What the observer shares with the reactor. The pipeline may still call an observer just after
// RemoveObserver (a loop thread holds the old list), so the observer owns this, never the
// reactor: once the outbox is closed such a late call queues nothing and writes nothing.
struct EventTap {
  EventTap(CompiledFilter allow_filter, CompiledFilter deny_filter, CallContext call,
           VerdictPipeline* pipeline)
      : allow(std::move(allow_filter)),
        deny(std::move(deny_filter)),
        visible(std::move(call), pipeline) {}
  const CompiledFilter allow, deny;
  VisibleGuests visible;
  std::shared_ptr<EventOutbox> outbox;  // set before the observer is added, then constant

  bool Wants(const ObservedEvent& o) {
    return allow.Matches(o) && !deny.Matches(o) && visible.Visible(o.guest);
  }
};

class EventStreamReactor final : public grpc::ServerWriteReactor<kvmi::v1::EventMessage> {
 public:
  EventStreamReactor(Daemon* daemon, StreamLimits* limits, StreamLimits::Admission admission,
                     bool include_registers)
      : daemon_(daemon),
        limits_(limits),
        admission_(std::move(admission)),
        include_registers_(include_registers) {}

  // Subscribes (on the loop threads from now on), then queues the replay in front of what came
  // meanwhile: nothing falls between the replay and the live part, and what both saw is sent
  // once.
  void Start(std::shared_ptr<EventTap> tap, size_t capacity, const EventHistory* history,
             uint64_t resume_after, StreamPump* pump) {
    tap->outbox = std::make_shared<EventOutbox>(
        capacity, limits_->budget(), /*notices=*/true,
        [this](EventOutbox::Next next) { Write(std::move(next)); }, [this] { Finish(Status::OK); },
        pump);
    outbox_ = tap->outbox;
    observer_ = daemon_->pipeline().AddObserver([tap](const ObservedEvent& o) {
      if (!tap->Wants(o)) return;
      if (tap->outbox->Offer(o, QueuedBytes(o)) == EventOutbox::Offered::kDropped) {
        Metrics::StreamEventsDropped(1);  // kvmid_stream_events_dropped_total
      }
    });
    std::vector<EventOutbox::Charged> replay;
    uint64_t lost = 0;
    EventOutbox::Duplicate duplicate;
    if (resume_after != 0 && history != nullptr) {
      std::vector<ObservedEvent> past;
      lost = history->Replay(resume_after, &past);
      auto ids = std::make_shared<std::unordered_set<uint64_t>>();
      for (ObservedEvent& o : past) {
        if (!tap->Wants(o)) continue;
        ids->insert(o.event_id);
        const uint64_t bytes = QueuedBytes(o);
        replay.push_back(EventOutbox::Charged{std::move(o), bytes});
      }
      if (!ids->empty()) {
        duplicate = [ids](const ObservedEvent& o) { return ids->count(o.event_id) > 0; };
      }
    }
    outbox_->Release(std::move(replay), lost, std::move(duplicate));
  }

  void OnWriteDone(bool ok) override {
    // A broken stream (!ok) is closed by the outbox, which then finishes it.
    const uint64_t drained = outbox_->OnWriteDone(ok);
    if (drained >= kLargeQueueBytes) limits_->Freed(drained);
  }

  void OnCancel() override { outbox_->Close(); }

  // Exactly once, after Finish and with no write in flight: releases everything the stream held.
  void OnDone() override {
    // The admission first: once the subscription is gone, the place and charge are free too.
    admission_.Release();
    daemon_->pipeline().RemoveObserver(observer_);
    outbox_->Close();  // already closed; a late observer call queues nothing from now on
    limits_->Freed(kStreamBaseBytes + outbox_->peak_bytes());
    delete this;
  }

 private:
  // The write token's holder (one at a time): message_ and dropped_total_ are only its.
  void Write(EventOutbox::Next next) {
    message_.Clear();
    if (next.item) {
      *message_.mutable_event() = ToProto(*next.item, include_registers_);
    } else {
      dropped_total_ += next.dropped;
      message_.mutable_dropped()->set_dropped(next.dropped);
      message_.mutable_dropped()->set_dropped_total(dropped_total_);
    }
    StartWrite(&message_);
  }

  Daemon* const daemon_;
  StreamLimits* const limits_;
  StreamLimits::Admission admission_;
  const bool include_registers_;
  std::shared_ptr<EventOutbox> outbox_;
  uint64_t observer_ = 0;
  kvmi::v1::EventMessage message_;
  uint64_t dropped_total_ = 0;
};

// One WatchVMs item: a guest (its state is read when the message is written).
struct GuestChange {
  kvmi::v1::VMChange::Kind kind;
  std::shared_ptr<Guest> guest;
};
using WatchOutbox = StreamOutbox<GuestChange>;
constexpr uint64_t kGuestChangeBytes = sizeof(WatchOutbox::Charged);

struct WatchTap {
  WatchTap(CallContext call, VerdictPipeline* pipeline) : visible(std::move(call), pipeline) {}
  VisibleGuests visible;
  std::shared_ptr<WatchOutbox> outbox;  // set before the watcher is added, then constant
};

class WatchReactor final : public grpc::ServerWriteReactor<kvmi::v1::VMChange> {
 public:
  WatchReactor(Daemon* daemon, StreamLimits* limits, StreamLimits::Admission admission)
      : daemon_(daemon), limits_(limits), admission_(std::move(admission)) {}

  // Subscribes, then queues the current guests in front of the changes that came meanwhile.
  void Start(std::shared_ptr<WatchTap> tap, StreamPump* pump) {
    // A reader that does not keep up loses changes (bounded), as before: no drop notice in
    // WatchVMs' protocol; the next change of a guest carries its whole state.
    tap->outbox = std::make_shared<WatchOutbox>(
        kMaxWatchBacklog, limits_->budget(), /*notices=*/false,
        [this](WatchOutbox::Next next) { Write(std::move(next)); }, [this] { Finish(Status::OK); },
        pump);
    outbox_ = tap->outbox;
    watcher_ = daemon_->registry().AddStateWatcher([tap](const std::shared_ptr<Guest>& g) {
      if (!tap->visible.Visible(g)) return;
      tap->outbox->Offer(GuestChange{kvmi::v1::VMChange::KIND_CHANGED, g}, kGuestChangeBytes);
    });
    std::vector<WatchOutbox::Charged> existing;
    for (const auto& guest : daemon_->registry().List()) {
      if (!tap->visible.Visible(guest)) continue;
      existing.push_back(WatchOutbox::Charged{GuestChange{kvmi::v1::VMChange::KIND_EXISTING, guest},
                                              kGuestChangeBytes});
    }
    outbox_->Release(std::move(existing), 0, nullptr);
  }

  void OnWriteDone(bool ok) override {
    const uint64_t drained = outbox_->OnWriteDone(ok);
    if (drained >= kLargeQueueBytes) limits_->Freed(drained);
  }
  void OnCancel() override { outbox_->Close(); }
  void OnDone() override {
    admission_.Release();
    daemon_->registry().RemoveStateWatcher(watcher_);
    outbox_->Close();
    limits_->Freed(kStreamBaseBytes + outbox_->peak_bytes());
    delete this;
  }

 private:
  void Write(WatchOutbox::Next next) {
    message_.Clear();
    // notices are off: every turn carries an item.
    message_.set_kind(next.item->kind);
    const Guest& guest = *next.item->guest;
    *message_.mutable_vm() = ToProto(guest.Snapshot(), daemon_->pipeline().ViewOf(guest)->labels);
    StartWrite(&message_);
  }

  Daemon* const daemon_;
  StreamLimits* const limits_;
  StreamLimits::Admission admission_;
  std::shared_ptr<WatchOutbox> outbox_;
  uint64_t watcher_ = 0;
  kvmi::v1::VMChange message_;
};

}  // namespace

grpc::ServerWriteReactor<kvmi::v1::EventMessage>* EventStreams::StreamEvents(
    const CallContext& call, const kvmi::v1::StreamEventsRequest& request) {
  using Finished = kvmi::v1::EventMessage;
  CompiledFilter allow, deny;
  if (request.has_allow()) {
    Status s = CompileFilter(request.allow(), "allow", &allow);
    if (!s.ok()) return FinishedStream<Finished>(s);
  } else {
    allow.empty = false;  // no allow filter: everything
  }
  if (request.has_deny()) {
    Status s = CompileFilter(request.deny(), "deny", &deny);
    if (!s.ok()) return FinishedStream<Finished>(s);
  }
  uint32_t capacity = request.max_queue() == 0 ? kDefaultStreamQueue : request.max_queue();
  if (capacity > kMaxStreamQueue) {
    return FinishedStream<Finished>(
        InvalidArgument("max_queue", "at most " + std::to_string(kMaxStreamQueue)));
  }
  StreamLimits::Admission admission;
  Status admitted = limits_->Admit(call, daemon_->limits(), /*charge_budget=*/true, &admission);
  if (!admitted.ok()) call.AuditLimitRefusal(admitted);
  if (!admitted.ok()) return FinishedStream<Finished>(admitted);
  auto tap =
      std::make_shared<EventTap>(std::move(allow), std::move(deny), call, &daemon_->pipeline());
  auto* reactor =
      new EventStreamReactor(daemon_, limits_, std::move(admission), request.include_registers());
  reactor->Start(std::move(tap), capacity, history_, request.resume_after(), &pump_);
  return reactor;
}

grpc::ServerWriteReactor<kvmi::v1::VMChange>* EventStreams::WatchVMs(
    const CallContext& call, const kvmi::v1::WatchVMsRequest&) {
  StreamLimits::Admission admission;
  Status admitted = limits_->Admit(call, daemon_->limits(), /*charge_budget=*/true, &admission);
  if (!admitted.ok()) call.AuditLimitRefusal(admitted);
  if (!admitted.ok()) return FinishedStream<kvmi::v1::VMChange>(admitted);
  auto* reactor = new WatchReactor(daemon_, limits_, std::move(admission));
  reactor->Start(std::make_shared<WatchTap>(call, &daemon_->pipeline()), &pump_);
  return reactor;
}

}  // namespace kvmid::api
