// The server-streaming RPCs: StreamEvents (every decided event that passes a client's filters,
// with drop notices and a resume cursor) and WatchVMs (the guests, then every change). Events are
// matched on the guests' loop threads and queued; the RPC thread drains the queue.
#ifndef KVMID_DAEMON_API_EVENT_STREAM_H_
#define KVMID_DAEMON_API_EVENT_STREAM_H_

#include <absl/base/thread_annotations.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/support/sync_stream.h>

#include <chrono>
#include <cstdint>
#include <deque>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "daemon/api/event_history.h"
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

// One StreamEvents call's buffer: filled on the guests' loop threads, drained by the RPC.
// Bounded; what does not fit is counted, never waited for.
class StreamQueue {
 public:
  explicit StreamQueue(size_t capacity) : capacity_(capacity) {}

  void Push(const ObservedEvent& observed);
  // Waits up to `wait` for events; returns them and the drops since the last call.
  std::deque<ObservedEvent> Take(std::chrono::milliseconds wait, uint64_t* dropped);

 private:
  const size_t capacity_;
  Mutex mu_;
  CondVar cv_;
  std::deque<ObservedEvent> queue_ ABSL_GUARDED_BY(mu_);
  uint64_t dropped_pending_ ABSL_GUARDED_BY(mu_) = 0;
};

class EventStreams {
 public:
  // `history` (may be null) lets StreamEvents resume after a cursor.
  EventStreams(Daemon* daemon, const EventHistory* history) : daemon_(daemon), history_(history) {}

  grpc::Status StreamEvents(grpc::ServerContextBase* context,
                            const kvmi::v1::StreamEventsRequest& request,
                            grpc::ServerWriterInterface<kvmi::v1::EventMessage>* writer);
  grpc::Status WatchVMs(grpc::ServerContextBase* context, const kvmi::v1::WatchVMsRequest& request,
                        grpc::ServerWriterInterface<kvmi::v1::VMChange>* writer);

 private:
  kvmi::v1::VM Describe(const Guest& guest);

  Daemon* const daemon_;
  const EventHistory* const history_;
};

}  // namespace kvmid::api

#endif  // KVMID_DAEMON_API_EVENT_STREAM_H_
