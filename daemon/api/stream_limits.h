// The limits every stream of the API shares (issue 10, "Limits"): one ByteBudget for the queues
// of every StreamEvents and WatchVMs call, a cap on the concurrent streams (StreamEvents +
// WatchVMs + Attach + the memory streams) of one identity and on how fast it opens them, and
// handing memory back to the OS after a burst.
//
//   StreamLimits::Admission admission;
//   grpc::Status s = limits->Admit(call, daemon->limits(), /*charge_budget=*/true, &admission);
//   if (!s.ok()) ... refuse the stream with s (RESOURCE_EXHAUSTED naming the limit) ...
//   ... the stream's queue charges limits->budget() per item ...
//   OnDone: admission.Release(); limits->Freed(bytes the stream held);
#ifndef KVMID_DAEMON_API_STREAM_LIMITS_H_
#define KVMID_DAEMON_API_STREAM_LIMITS_H_

#include <absl/base/thread_annotations.h>
#include <grpcpp/grpcpp.h>

#include <chrono>
#include <cstdint>
#include <memory>

#include "daemon/api/call_context.h"
#include "daemon/kvmid.h"
#include "daemon/security/limits.h"

namespace kvmid::api {

// What an open StreamEvents/WatchVMs call is charged to the budget besides its queued items (its
// reactor, its one message in flight, gRPC's call state), so that a budget also bounds the number
// of idle streams; returned when the call ends.
inline constexpr uint64_t kStreamBaseBytes = 16u << 10;

// The opens one identity may make at once before stream_opens_per_second applies: every stream
// it may hold, twice (open them all, close them all, open them all again).
inline uint64_t OpensBurst(const security::Limits& limits) {
  return 2 * limits.streams_per_identity;
}

class StreamLimits {
 public:
  // `trimmer` (the daemon's; may be null in tests) is told what ended streams give back.
  StreamLimits(const security::Limits& limits, MemoryTrimmer* trimmer);
  StreamLimits(const StreamLimits&) = delete;
  StreamLimits& operator=(const StreamLimits&) = delete;

  // What one open stream holds: its place among its identity's streams and its base charge.
  // Released once (Release or destruction).
  class Admission {
   public:
    Admission() = default;
    Admission(Admission&& other) noexcept;
    Admission& operator=(Admission&& other) noexcept;
    ~Admission() { Release(); }
    void Release();
    bool held() const { return slot_.held(); }

   private:
    friend class StreamLimits;
    security::KeyedSlots::Slot slot_;
    security::ByteBudget* budget_ = nullptr;
    uint64_t bytes_ = 0;
  };

  // Admits a new stream of `call`'s identity under `limits` (the daemon's current ones, applied
  // first: a reload takes effect with the next stream). charge_budget: the stream queues into
  // budget() (StreamEvents, WatchVMs; Attach has its own bounded outbox) and is refused when the
  // budget is exhausted. A refusal is RESOURCE_EXHAUSTED naming the limit and its knob, counted
  // by Metrics::LimitRefused.
  // extra_bytes (with charge_budget): charged on top of the base, for a stream that holds more
  // than one message (the memory streams' windows).
  grpc::Status Admit(const CallContext& call, const security::Limits& limits, bool charge_budget,
                     Admission* admission, uint64_t extra_bytes = 0);

  security::ByteBudget* budget() { return &budget_; }
  uint64_t streams_of(const CallContext& call) const { return slots_.InUse(call.IdentityKey()); }

  // Memory a stream gave back (its queue and base when it ended, or a large queue that drained),
  // handed to the daemon's MemoryTrimmer: glibc keeps freed memory in its arenas (one per thread
  // that allocated, so loop threads and gRPC threads each hold some) and, without a trim, RSS
  // stays at its peak after a burst of streams. The trim runs on the trimmer's own thread.
  void Freed(uint64_t bytes);

 private:
  security::ByteBudget budget_;
  security::KeyedRate opens_;
  security::KeyedSlots slots_;
  MemoryTrimmer* const trimmer_;
};

}  // namespace kvmid::api

#endif  // KVMID_DAEMON_API_STREAM_LIMITS_H_
