// The limits every stream of the API shares (issue 10, "Limits"): one ByteBudget for the queues
// of every StreamEvents and WatchVMs call, a cap on the concurrent streams (StreamEvents +
// WatchVMs + Attach) of one identity, and handing memory back to the OS after a burst.
//
//   StreamLimits::Admission admission;
//   grpc::Status s = limits->Admit(call, daemon->limits(), /*charge_budget=*/true, &admission);
//   if (!s.ok()) ... refuse the stream with s (RESOURCE_EXHAUSTED naming the limit) ...
//   ... the stream's queue charges limits->budget() per item ...
//   OnDone: admission.Release(); limits->Freed(bytes the stream held);
#ifndef KVMID_DAEMON_API_STREAM_LIMITS_H_
#define KVMID_DAEMON_API_STREAM_LIMITS_H_

#include <absl/base/thread_annotations.h>
#include <grpcpp/alarm.h>
#include <grpcpp/grpcpp.h>

#include <chrono>
#include <cstdint>
#include <memory>

#include "daemon/api/call_context.h"
#include "daemon/base/mutex.h"
#include "daemon/security/limits.h"

namespace kvmid::api {

// What an open StreamEvents/WatchVMs call is charged to the budget besides its queued items (its
// reactor, its one message in flight, gRPC's call state), so that a budget also bounds the number
// of idle streams; returned when the call ends.
inline constexpr uint64_t kStreamBaseBytes = 16u << 10;
// Freed memory (ended streams, drained queues) after which kvmid returns memory to the OS, and
// how often it does at most.
inline constexpr uint64_t kTrimAfterFreedBytes = 4u << 20;
inline constexpr std::chrono::milliseconds kTrimInterval{1000};

class StreamLimits {
 public:
  explicit StreamLimits(const security::Limits& limits);
  ~StreamLimits();
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
  grpc::Status Admit(const CallContext& call, const security::Limits& limits, bool charge_budget,
                     Admission* admission);

  security::ByteBudget* budget() { return &budget_; }
  uint64_t streams_of(const CallContext& call) const { return slots_.InUse(call.IdentityKey()); }

  // Memory a stream gave back (its queue and base when it ended, or a large queue that drained).
  // Once kTrimAfterFreedBytes accumulated, glibc's malloc_trim(0) runs, at most every
  // kTrimInterval, on a gRPC alarm (callback) thread, never a guest's loop thread: glibc keeps
  // freed memory in its arenas (one per thread that allocated, so loop threads and gRPC threads
  // each hold some) and, without a trim, RSS stays at its peak after a burst of streams.
  void Freed(uint64_t bytes);
  uint64_t trims() const;

 private:
  struct Trim {
    Mutex mu;
    uint64_t freed ABSL_GUARDED_BY(mu) = 0;
    bool scheduled ABSL_GUARDED_BY(mu) = false;
    std::chrono::steady_clock::time_point last ABSL_GUARDED_BY(mu);
    uint64_t count ABSL_GUARDED_BY(mu) = 0;
    std::unique_ptr<grpc::Alarm> alarm ABSL_GUARDED_BY(mu);
  };
  static void RunTrim(const std::shared_ptr<Trim>& trim);

  security::ByteBudget budget_;
  security::KeyedSlots slots_;
  const std::shared_ptr<Trim> trim_ = std::make_shared<Trim>();
};

}  // namespace kvmid::api

#endif  // KVMID_DAEMON_API_STREAM_LIMITS_H_
