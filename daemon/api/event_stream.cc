#include "daemon/api/event_stream.h"

#include <memory>
#include <unordered_set>
#include <utility>

#include "daemon/api/convert.h"
#include "daemon/api/limits.h"
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

void StreamQueue::Push(const ObservedEvent& o) {
  MutexLock lock(&mu_);
  if (queue_.size() >= capacity_) {
    ++dropped_pending_;
    Metrics::StreamEventsDropped(1);  // kvmid_stream_events_dropped_total
    return;
  }
  queue_.push_back(o);
  cv_.Signal();
}

std::deque<ObservedEvent> StreamQueue::Take(std::chrono::milliseconds wait, uint64_t* dropped) {
  const auto deadline = std::chrono::steady_clock::now() + wait;
  MutexLock lock(&mu_);
  while (queue_.empty() && dropped_pending_ == 0) {
    if (!cv_.WaitUntil(&mu_, deadline)) break;
  }
  std::deque<ObservedEvent> out;
  out.swap(queue_);
  *dropped = dropped_pending_;
  dropped_pending_ = 0;
  return out;
}

kvmi::v1::VM EventStreams::Describe(const Guest& guest) {
  return ToProto(guest.Snapshot(), daemon_->pipeline().ViewOf(guest)->labels);
}

Status EventStreams::StreamEvents(grpc::ServerContextBase* context,
                                  const kvmi::v1::StreamEventsRequest& request,
                                  grpc::ServerWriterInterface<kvmi::v1::EventMessage>* writer) {
  CompiledFilter allow, deny;
  if (request.has_allow()) {
    Status s = CompileFilter(request.allow(), "allow", &allow);
    if (!s.ok()) return s;
  } else {
    allow.empty = false;  // no allow filter: everything
  }
  if (request.has_deny()) {
    Status s = CompileFilter(request.deny(), "deny", &deny);
    if (!s.ok()) return s;
  }
  uint32_t capacity = request.max_queue() == 0 ? kDefaultStreamQueue : request.max_queue();
  if (capacity > kMaxStreamQueue) {
    return InvalidArgument("max_queue", "at most " + std::to_string(kMaxStreamQueue));
  }
  auto queue = std::make_shared<StreamQueue>(capacity);
  uint64_t observer = daemon_->pipeline().AddObserver([queue, allow, deny](const ObservedEvent& o) {
    if (allow.Matches(o) && !deny.Matches(o)) queue->Push(o);
  });
  uint64_t dropped_total = 0;
  bool open = true;
  auto write_drops = [&](uint64_t dropped) {
    dropped_total += dropped;
    kvmi::v1::EventMessage notice;
    notice.mutable_dropped()->set_dropped(dropped);
    notice.mutable_dropped()->set_dropped_total(dropped_total);
    return writer->Write(notice);
  };
  auto write_event = [&](const ObservedEvent& o) {
    kvmi::v1::EventMessage message;
    *message.mutable_event() = ToProto(o, request.include_registers());
    return writer->Write(message);
  };
  // Resuming: the live observer is already queueing, so nothing falls between the replay and the
  // live part; what both saw is sent once.
  std::unordered_set<uint64_t> replayed;
  if (request.resume_after() != 0 && history_ != nullptr) {
    std::vector<ObservedEvent> past;
    uint64_t lost = history_->Replay(request.resume_after(), &past);
    if (lost > 0) open = write_drops(lost);
    for (const ObservedEvent& o : past) {
      if (!open) break;
      if (!allow.Matches(o) || deny.Matches(o)) continue;
      replayed.insert(o.event_id);
      open = write_event(o);
    }
  }
  while (open && !context->IsCancelled()) {
    uint64_t dropped = 0;
    std::deque<ObservedEvent> batch = queue->Take(kStreamPoll, &dropped);
    if (dropped > 0) open = write_drops(dropped);
    for (const ObservedEvent& o : batch) {
      if (!open) break;
      if (!replayed.empty() && replayed.erase(o.event_id) > 0) continue;
      open = write_event(o);
    }
  }
  daemon_->pipeline().RemoveObserver(observer);
  return Status::OK;
}

Status EventStreams::WatchVMs(grpc::ServerContextBase* context, const kvmi::v1::WatchVMsRequest&,
                              grpc::ServerWriterInterface<kvmi::v1::VMChange>* writer) {
  struct Changes {
    Mutex mu;
    CondVar cv;
    std::deque<std::shared_ptr<Guest>> guests ABSL_GUARDED_BY(mu);
  };
  auto changes = std::make_shared<Changes>();
  uint64_t watcher =
      daemon_->registry().AddStateWatcher([changes](const std::shared_ptr<Guest>& g) {
        MutexLock lock(&changes->mu);
        // Bounded: a stuck reader does not grow kvmid's memory.
        if (changes->guests.size() < kMaxWatchBacklog) changes->guests.push_back(g);
        changes->cv.Signal();
      });
  auto write = [&](kvmi::v1::VMChange::Kind kind, const Guest& guest) {
    kvmi::v1::VMChange change;
    change.set_kind(kind);
    *change.mutable_vm() = Describe(guest);
    return writer->Write(change);
  };
  bool open = true;
  for (const auto& guest : daemon_->registry().List()) {
    if (!(open = write(kvmi::v1::VMChange::KIND_EXISTING, *guest))) break;
  }
  while (open && !context->IsCancelled()) {
    std::deque<std::shared_ptr<Guest>> batch;
    {
      const auto deadline = std::chrono::steady_clock::now() + kStreamPoll;
      MutexLock lock(&changes->mu);
      while (changes->guests.empty()) {
        if (!changes->cv.WaitUntil(&changes->mu, deadline)) break;
      }
      batch.swap(changes->guests);
    }
    for (const auto& guest : batch) {
      if (!(open = write(kvmi::v1::VMChange::KIND_CHANGED, *guest))) break;
    }
  }
  daemon_->registry().RemoveStateWatcher(watcher);
  return Status::OK;
}

}  // namespace kvmid::api
