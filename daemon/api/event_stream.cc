#include "daemon/api/event_stream.h"

#include <chrono>
#include <memory>
#include <optional>
#include <utility>

#include "daemon/api/convert.h"
#include "daemon/api/limits.h"
#include "daemon/api/stream_outbox.h"
#include "daemon/config/policy_convert.h"
#include "daemon/metrics/hooks.h"

namespace kvmid::api {

using grpc::Status;

EventStreams::EventStreams(Daemon* daemon, EventHistory* history, StreamLimits* limits)
    : daemon_(daemon),
      own_history_(history != nullptr
                       ? nullptr
                       : std::make_unique<EventHistory>(&daemon->pipeline(),
                                                        daemon->limits().stream_event_ring_events)),
      history_(history != nullptr ? history : own_history_.get()),
      limits_(limits),
      fanout_(std::make_unique<EventFanout>(history_)) {}

EventStreams::~EventStreams() = default;

namespace {

// A queue that held at least this much and drained is worth handing back (StreamLimits::Freed).
constexpr uint64_t kLargeQueueBytes = 1u << 20;

// The request's heartbeat_interval, if set, in *interval: 0 or within the bounds.
Status HeartbeatInterval(const kvmi::v1::StreamEventsRequest& request,
                         std::chrono::nanoseconds* interval) {
  if (!request.has_heartbeat_interval()) return Status::OK;
  const google::protobuf::Duration& d = request.heartbeat_interval();
  const bool well_formed =
      d.seconds() >= 0 && d.nanos() >= 0 && d.nanos() <= 999999999 &&
      d.seconds() <= std::chrono::duration_cast<std::chrono::seconds>(kMaxStreamHeartbeat).count();
  const std::chrono::nanoseconds value =
      std::chrono::seconds(d.seconds()) + std::chrono::nanoseconds(d.nanos());
  if (!well_formed ||
      (value.count() != 0 && (value < kMinStreamHeartbeat || value > kMaxStreamHeartbeat))) {
    return InvalidArgument("heartbeat_interval",
                           "0 (none) or " + std::to_string(kMinStreamHeartbeat.count()) +
                               " ms to " + std::to_string(kMaxStreamHeartbeat.count()) + " ms");
  }
  *interval = value;
  return Status::OK;
}

// One StreamEvents call: a subscription of the fan-out and its one message in flight.
class EventStreamReactor final : public WriteReactor<kvmi::v1::StreamEventsResponse>,
                                 public EventFanout::Sink {
 public:
  EventStreamReactor(EventFanout* fanout, StreamLimits* limits, StreamLimits::Admission admission,
                     bool include_registers, EventFields fields)
      : fanout_(fanout),
        limits_(limits),
        admission_(std::move(admission)),
        include_registers_(include_registers),
        fields_(fields),
        fields_without_context_(fields.Without(kvmi::v1::Event::kContextFieldNumber)) {}

  // What the stream asked kvmid to read with events (issue 15), until the stream is done, and
  // who decides per guest whether the caller may see those bytes (guest memory: operator, as
  // ReadVirtual). Without this, events go out without their context: a stream sees no bytes it
  // did not ask for.
  void HoldContextDemand(VerdictPipeline::ContextDemandLease lease, VisibleGuests* guests) {
    context_demand_ = std::move(lease);
    context_guests_ = guests;
  }

  void Start(std::unique_ptr<EventFanout::Subscription> subscription) {
    subscription_ = std::move(subscription);
    fanout_->Start(subscription_.get());
  }

  // Sink: called by whoever holds the stream (one at a time): message_ and dropped_total_ are
  // only its.
  void StartWrite(const ObservedEvent* event, uint64_t dropped) override {
    message_.Clear();
    if (event != nullptr) {
      const bool context = event->context != nullptr && context_guests_ != nullptr &&
                           context_guests_->Allows(event->guest, security::Role::kOperator);
      *message_.mutable_event() = ToProto(
          *event, include_registers_,
          context ? fields_.With(kvmi::v1::Event::kContextFieldNumber) : fields_without_context_);
    } else {
      dropped_total_ += dropped;
      message_.mutable_dropped()->set_dropped(dropped);
      message_.mutable_dropped()->set_dropped_total(dropped_total_);
    }
    WriteReactor<kvmi::v1::StreamEventsResponse>::StartWrite(&message_);
  }
  void StartHeartbeat(uint64_t last_event_id) override {
    message_.Clear();
    kvmi::v1::Heartbeat* beat = message_.mutable_heartbeat();
    const auto ns = std::chrono::duration_cast<std::chrono::nanoseconds>(
                        std::chrono::system_clock::now().time_since_epoch())
                        .count();
    beat->mutable_time()->set_seconds(ns / 1000000000);
    beat->mutable_time()->set_nanos(static_cast<int32_t>(ns % 1000000000));
    beat->set_last_event_id(last_event_id);
    WriteReactor<kvmi::v1::StreamEventsResponse>::StartWrite(&message_);
  }
  void Finish() override { WriteReactor<kvmi::v1::StreamEventsResponse>::Finish(Status::OK); }

  void OnWriteDone(bool ok) override { fanout_->WriteDone(subscription_.get(), ok); }
  void OnCancel() override { fanout_->Cancel(subscription_.get()); }

  // Exactly once, after Finish: the fan-out no longer knows the stream.
  void OnDone() override {
    admission_.Release();
    context_demand_.Reset();
    subscription_.reset();
    limits_->Freed(kStreamBaseBytes);
    delete this;
  }

 private:
  EventFanout* const fanout_;
  StreamLimits* const limits_;
  StreamLimits::Admission admission_;
  const bool include_registers_;
  const EventFields fields_;  // the request's field_mask, compiled once
  const EventFields fields_without_context_;
  VisibleGuests* context_guests_ = nullptr;  // the subscription's; set when context was asked
  std::unique_ptr<EventFanout::Subscription> subscription_;
  VerdictPipeline::ContextDemandLease context_demand_;
  kvmi::v1::StreamEventsResponse message_;
  uint64_t dropped_total_ = 0;
};

// One WatchVMs item: a guest's state as it was at the change (its name, labels and state are
// the ones its visibility was decided on: a guest renamed out of the caller's scope afterwards
// is never shown under its new name). Lifecycle changes are rare (connect, hook, gone), so the
// conversion on the changing thread is not on the event path.
struct GuestChange {
  kvmi::v1::WatchVMsResponse::Kind kind;
  kvmi::v1::VM vm;
};
using WatchOutbox = StreamOutbox<GuestChange>;

struct WatchTap {
  WatchTap(CallContext call, VerdictPipeline* pipeline, const security::AuthorizerHolder* holder)
      : visible(std::move(call), pipeline, holder), pipeline(pipeline) {}
  VisibleGuests visible;
  VerdictPipeline* const pipeline;
  std::shared_ptr<WatchOutbox> outbox;  // set before the watcher is added, then constant

  // The guest's change now, if the caller sees it: queued with what it is charged.
  std::optional<WatchOutbox::Charged> Change(kvmi::v1::WatchVMsResponse::Kind kind,
                                             const std::shared_ptr<Guest>& guest) {
    if (!visible.Visible(guest)) return std::nullopt;
    GuestChange change{kind, ToProto(guest->Snapshot(), pipeline->ViewOf(*guest)->labels)};
    const uint64_t bytes = sizeof(WatchOutbox::Charged) + change.vm.SpaceUsedLong();
    return WatchOutbox::Charged{std::move(change), bytes};
  }
};

class WatchReactor final : public WriteReactor<kvmi::v1::WatchVMsResponse> {
 public:
  WatchReactor(Daemon* daemon, StreamLimits* limits, StreamLimits::Admission admission)
      : daemon_(daemon), limits_(limits), admission_(std::move(admission)) {}

  // Subscribes, then queues the current guests in front of the changes that came meanwhile.
  void Start(const std::shared_ptr<WatchTap>& tap, StreamPump* pump) {
    // A reader that does not keep up loses changes (bounded), as before: no drop notice in
    // WatchVMs' protocol; the next change of a guest carries its whole state.
    tap->outbox = std::make_shared<WatchOutbox>(
        kMaxWatchBacklog, limits_->budget(), /*notices=*/false,
        [this](WatchOutbox::Next next) { Write(std::move(next)); }, [this] { Finish(Status::OK); },
        pump);
    outbox_ = tap->outbox;
    watcher_ = daemon_->registry().AddStateWatcher([tap](const std::shared_ptr<Guest>& g) {
      std::optional<WatchOutbox::Charged> change =
          tap->Change(kvmi::v1::WatchVMsResponse::KIND_CHANGED, g);
      if (change) tap->outbox->Offer(std::move(change->item), change->bytes);
    });
    std::vector<WatchOutbox::Charged> existing;
    for (const auto& guest : daemon_->registry().List()) {
      std::optional<WatchOutbox::Charged> change =
          tap->Change(kvmi::v1::WatchVMsResponse::KIND_EXISTING, guest);
      if (change) existing.push_back(std::move(*change));
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
    *message_.mutable_vm() = std::move(next.item->vm);
    StartWrite(&message_);
  }

  Daemon* const daemon_;
  StreamLimits* const limits_;
  StreamLimits::Admission admission_;
  std::shared_ptr<WatchOutbox> outbox_;
  uint64_t watcher_ = 0;
  kvmi::v1::WatchVMsResponse message_;
};

}  // namespace

Status EventStreams::CheckNamedGuests(const CallContext& call,
                                      const std::vector<std::string>& vms) const {
  for (const std::string& vm : vms) {
    // Known: connected, or gone and still remembered (its events may still be in the ring, and it
    // may come back under the same UUID or name). A guest the caller may not see gets the same
    // answer as one that does not exist.
    std::shared_ptr<Guest> guest = daemon_->registry().Lookup(vm);
    if (guest == nullptr || !call.Visible(*daemon_->pipeline().ViewOf(*guest))) {
      return Status(grpc::StatusCode::NOT_FOUND,
                    "no guest '" + vm.substr(0, kMaxGuestNameInError) + "' (in a filter's vms)");
    }
  }
  return Status::OK;
}

WriteReactor<kvmi::v1::StreamEventsResponse>* EventStreams::StreamEvents(
    const CallContext& call, const kvmi::v1::StreamEventsRequest& request) {
  using Finished = kvmi::v1::StreamEventsResponse;
  StreamFilter filter;
  Status s = CompileStreamFilter(request, &filter);
  if (!s.ok()) return FinishedStream<Finished>(s);
  s = CheckNamedGuests(call, filter.NamedGuests());
  if (!s.ok()) return FinishedStream<Finished>(s);
  absl::StatusOr<EventFields> fields = CompileEventMask(request.field_mask(), "field_mask");
  if (!fields.ok()) return FinishedStream<Finished>(ToStatus(fields.status()));
  std::chrono::nanoseconds heartbeat = daemon_->stream_heartbeat();
  s = HeartbeatInterval(request, &heartbeat);
  if (!s.ok()) return FinishedStream<Finished>(s);
  // max_queue: how far (in events of every type) the stream may fall behind the newest before
  // the oldest it has not looked at count as dropped; 0 and anything above: the whole ring.
  if (request.max_queue() > kMaxStreamQueue) {
    return FinishedStream<Finished>(
        InvalidArgument("max_queue", "at most " + std::to_string(kMaxStreamQueue)));
  }
  vmem::ContextDemand context;
  if (request.has_context()) {
    Status s = ContextDemandFromProto(request.context(), "context", &context);
    if (!s.ok()) return FinishedStream<Finished>(s);
  }
  StreamLimits::Admission admission;
  Status admitted = limits_->Admit(call, daemon_->limits(), /*charge_budget=*/true, &admission);
  if (!admitted.ok()) call.AuditLimitRefusal(admitted);
  if (!admitted.ok()) return FinishedStream<Finished>(admitted);
  // Resume: right after the event the reader saw last, in the same ring (what the ring no longer
  // holds comes first as a drop notice); else live from the newest.
  uint64_t cursor = history_->head(), lost = 0;
  if (request.resume_after() != 0) cursor = history_->CursorAfter(request.resume_after(), &lost);
  auto* reactor = new EventStreamReactor(fanout_.get(), limits_, std::move(admission),
                                         request.include_registers(), *fields);
  auto visible =
      std::make_unique<VisibleGuests>(call, &daemon_->pipeline(), &daemon_->authorizer());
  if (!context.empty()) {
    // Only for the types the allow filters let through (one that names none, or no allow
    // filter at all: every type, 0).
    uint32_t types = 0;
    bool every_type = request.allow_size() == 0;
    for (const kvmi::v1::EventFilter& allow : request.allow()) {
      if (allow.events_size() == 0) every_type = true;
      for (int i = 0; i < allow.events_size(); ++i) {
        uint8_t id;
        if (FromEventType(allow.events(i), &id)) types |= 1u << id;
      }
    }
    if (every_type) types = 0;
    reactor->HoldContextDemand(daemon_->pipeline().AddContextDemand(types, context), visible.get());
  }
  reactor->Start(fanout_->Subscribe(reactor, std::move(filter), std::move(visible),
                                    request.max_queue(), cursor, lost, heartbeat));
  return reactor;
}

WriteReactor<kvmi::v1::WatchVMsResponse>* EventStreams::WatchVMs(const CallContext& call,
                                                                 const kvmi::v1::WatchVMsRequest&) {
  StreamLimits::Admission admission;
  Status admitted = limits_->Admit(call, daemon_->limits(), /*charge_budget=*/true, &admission);
  if (!admitted.ok()) call.AuditLimitRefusal(admitted);
  if (!admitted.ok()) return FinishedStream<kvmi::v1::WatchVMsResponse>(admitted);
  auto* reactor = new WatchReactor(daemon_, limits_, std::move(admission));
  reactor->Start(std::make_shared<WatchTap>(call, &daemon_->pipeline(), &daemon_->authorizer()),
                 &pump_);
  return reactor;
}

}  // namespace kvmid::api
