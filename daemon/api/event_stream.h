// The server-streaming RPCs: StreamEvents (every decided event that passes a client's filters,
// with drop notices and a resume cursor) and WatchVMs (the guests, then every change). Events are
// appended once to the shared ring and delivered off the loop threads (EventFanout); gRPC's
// async API (async_reactor.h) writes them, one at a time (no thread per stream; see EventStreams).
#ifndef KVMID_DAEMON_API_EVENT_STREAM_H_
#define KVMID_DAEMON_API_EVENT_STREAM_H_

#include <absl/base/thread_annotations.h>
#include <grpcpp/grpcpp.h>

#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "daemon/api/async_reactor.h"
#include "daemon/api/call_context.h"
#include "daemon/api/event_fanout.h"
#include "daemon/api/event_history.h"
#include "daemon/api/finished_stream.h"
#include "daemon/api/stream_limits.h"
#include "daemon/api/stream_outbox.h"
#include "daemon/base/mutex.h"
#include "daemon/kvmid.h"
#include "proto/kvmi/v1/introspection.pb.h"

namespace kvmid::api {

// StreamEvents and WatchVMs on gRPC's async API (async_reactor.h): no thread per stream.
//
// StreamEvents: every event is appended once to the shared ring (EventHistory); each stream is a
// subscription of the EventFanout holding only its cursor and its one message in flight. Its
// filters and visibility are applied off the loop threads (the fan-out's delivery thread, or
// a completion-queue thread in OnWriteDone), and a stream that is behind or does not read costs the
// loop threads nothing. A stream that falls more than max_queue events (default and at most: the
// ring) behind the newest gets a DropNotice.
//
// WatchVMs: guest changes are queued in the stream's StreamOutbox on the thread that made them,
// written one at a time (the first after an idle spell by the StreamPump).
//
// Every stream holds an admission of `limits` (a place among its identity's streams, a base
// charge of the budget, which is what bounds idle streams) until gRPC's OnDone.
class EventStreams {
 public:
  // `history` is the ring StreamEvents reads and resumes from (null: the streams get a ring of
  // their own of limits().stream_event_ring_events). `limits` outlives every stream (the service
  // owns both).
  EventStreams(Daemon* daemon, EventHistory* history, StreamLimits* limits);
  ~EventStreams();

  // The reactor of a new call (it deletes itself when gRPC is done with it). A malformed request
  // or a limit ends it at once with the status naming the field or the limit.
  WriteReactor<kvmi::v1::StreamEventsResponse>* StreamEvents(
      const CallContext& call, const kvmi::v1::StreamEventsRequest& request);
  WriteReactor<kvmi::v1::WatchVMsResponse>* WatchVMs(const CallContext& call,
                                                     const kvmi::v1::WatchVMsRequest& request);

  StreamLimits* limits() { return limits_; }
  // NOT_FOUND naming the first of `vms` (filter selectors) that is no guest kvmid knows or one
  // the caller may not see (the same answer for both).
  grpc::Status CheckNamedGuests(const CallContext& call, const std::vector<std::string>& vms) const;
  EventFanout& fanout() { return *fanout_; }

 private:
  Daemon* const daemon_;
  std::unique_ptr<EventHistory> own_history_;  // when none was given
  EventHistory* const history_;
  StreamLimits* const limits_;
  // StreamEvents' delivery (one thread for every stream).
  std::unique_ptr<EventFanout> fanout_;
  // Starts the writes of idle WatchVMs streams (one thread for all of them).
  StreamPump pump_;
};

}  // namespace kvmid::api

#endif  // KVMID_DAEMON_API_EVENT_STREAM_H_
