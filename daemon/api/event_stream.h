// The server-streaming RPCs: StreamEvents (every decided event that passes a client's filters,
// with drop notices and a resume cursor) and WatchVMs (the guests, then every change). Events are
// matched on the guests' loop threads and queued; gRPC's callback API writes them, one at a time
// (no thread per stream; see EventStreams).
#ifndef KVMID_DAEMON_API_EVENT_STREAM_H_
#define KVMID_DAEMON_API_EVENT_STREAM_H_

#include <absl/base/thread_annotations.h>
#include <grpcpp/grpcpp.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "daemon/api/call_context.h"
#include "daemon/api/event_history.h"
#include "daemon/api/stream_limits.h"
#include "daemon/api/stream_outbox.h"
#include "daemon/base/mutex.h"
#include "daemon/kvmid.h"
#include "proto/kvmi/v1/introspection.pb.h"

namespace kvmid::api {

// An EventFilter, validated once and matched on the loop thread.
struct CompiledFilter {
  std::vector<std::string> vms;
  std::set<uint8_t> events;
  std::set<uint32_t> vcpus, crs, msrs;
  std::optional<uint64_t> gpa_first, gpa_last;
  uint8_t access = 0;
  bool empty = true;  // matches nothing (no filter given)

  bool Matches(const ObservedEvent& observed) const;
};

// `filter` compiled; INVALID_ARGUMENT naming "<field>.<what>" if it is malformed.
grpc::Status CompileFilter(const kvmi::v1::EventFilter& filter, const std::string& field,
                           CompiledFilter* out);

// Which guests a stream's caller sees (CallContext::Visible), decided once per guest and again
// only when its labels change (the GuestView's generation): the event path does not build a
// GuestRef per event. The authorizer snapshot is the stream's, fixed for its life. Thread-safe
// (loop threads of different guests ask at once).
class VisibleGuests {
 public:
  VisibleGuests(CallContext call, VerdictPipeline* pipeline)
      : call_(std::move(call)), pipeline_(pipeline) {}
  bool Visible(const std::shared_ptr<Guest>& guest);
  const CallContext& call() const { return call_; }

 private:
  // Entries whose guest is gone are purged once the cache holds this many.
  static constexpr size_t kPurgeAbove = 4096;
  struct Entry {
    std::weak_ptr<Guest> guest;  // the address is only this guest's while it lives
    // The view the decision was made on: a new view (labels reloaded, or the guest reconnected
    // under another name) means a new decision. The address is only that view's while it lives.
    const GuestView* view;
    std::weak_ptr<const GuestView> view_alive;
    bool visible;
  };
  const CallContext call_;
  VerdictPipeline* const pipeline_;
  Mutex mu_;
  std::unordered_map<const Guest*, Entry> cache_ ABSL_GUARDED_BY(mu_);
};

// What a StreamEvents queue item is charged to the stream budget (the event, its deque slot and
// the monitor hits it carries).
uint64_t QueuedBytes(const ObservedEvent& observed);

// StreamEvents and WatchVMs on gRPC's callback API: no thread per stream. Events are matched on
// the guests' loop threads (filters, then visibility) and queued in the stream's StreamOutbox;
// the reactor writes one message at a time, the next one started from OnWriteDone, the first
// after an idle spell by the StreamPump. Every stream holds an admission of `limits` (a place
// among its identity's streams, a base charge of the queue budget) until gRPC's OnDone, which
// also removes its subscription and returns what it had queued.
class EventStreams {
 public:
  // `history` (may be null) lets StreamEvents resume after a cursor. `limits` outlives every
  // stream (the service owns both).
  EventStreams(Daemon* daemon, const EventHistory* history, StreamLimits* limits)
      : daemon_(daemon), history_(history), limits_(limits) {}

  // The reactor of a new call (it deletes itself when gRPC is done with it). A malformed request
  // or a limit ends it at once with the status naming the field or the limit.
  grpc::ServerWriteReactor<kvmi::v1::EventMessage>* StreamEvents(
      const CallContext& call, const kvmi::v1::StreamEventsRequest& request);
  grpc::ServerWriteReactor<kvmi::v1::VMChange>* WatchVMs(const CallContext& call,
                                                         const kvmi::v1::WatchVMsRequest& request);

  StreamLimits* limits() { return limits_; }

 private:
  Daemon* const daemon_;
  const EventHistory* const history_;
  StreamLimits* const limits_;
  // Starts the writes of idle streams (one thread for all of them): a guest's loop thread only
  // queues.
  StreamPump pump_;
};

// A call that ends at once with `status` (a refusal before any stream state exists).
template <typename Message>
grpc::ServerWriteReactor<Message>* FinishedStream(const grpc::Status& status) {
  class Finished final : public grpc::ServerWriteReactor<Message> {
   public:
    explicit Finished(const grpc::Status& status) { this->Finish(status); }
    void OnDone() override { delete this; }
  };
  return new Finished(status);
}

}  // namespace kvmid::api

#endif  // KVMID_DAEMON_API_EVENT_STREAM_H_
