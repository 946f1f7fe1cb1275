// Slows down a caller that keeps being refused by a limit (issue 10, "one abusive client"): a
// flood of calls that each end in RESOURCE_EXHAUSTED costs kvmid (and the guests that share its
// CPUs) the calls themselves, however early they are refused. The refusal is still the answer,
// only given later: after a delay per identity that doubles with each refusal that follows the
// last one within kForget (kFirstDelay, 2x, 4x ... up to kMaxDelay), and starts again from
// kFirstDelay once the identity stayed out of trouble for kForget. A client that calls one at a
// time (the usual loop) is held to about 1/kMaxDelay refusals per second.
//
// No thread waits per call: held calls are finished by one timer thread (started by the first
// held call). What is held is bounded: at most kMaxHeldPerKey calls of one identity and
// kMaxHeldBytes of their requests in all; beyond that a refusal is answered at once. Calls that
// are not refused by a limit are never held.
#ifndef KVMID_DAEMON_API_TARPIT_H_
#define KVMID_DAEMON_API_TARPIT_H_

#include <absl/base/thread_annotations.h>
#include <absl/container/flat_hash_map.h>
#include <grpcpp/grpcpp.h>

#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <thread>
#include <utility>

#include "daemon/base/mutex.h"

namespace kvmid::api {

class Tarpit {
 public:
  using Clock = std::chrono::steady_clock;
  static constexpr std::chrono::milliseconds kFirstDelay{20};
  static constexpr std::chrono::milliseconds kMaxDelay{500};
  static constexpr std::chrono::milliseconds kForget{2000};
  static constexpr size_t kMaxHeldPerKey = 16;
  static constexpr uint64_t kMaxHeldBytes = uint64_t{64} << 20;
  // Identities remembered; beyond it, the ones with nothing held and quiet for kForget go.
  static constexpr size_t kMaxKeys = 4096;

  Tarpit() = default;
  ~Tarpit();  // Drain()
  // Finishes every held call at once and every later refusal too, joining the thread (a server
  // shutting down answers its held calls before it stops serving). Idempotent.
  void Drain();
  Tarpit(const Tarpit&) = delete;
  Tarpit& operator=(const Tarpit&) = delete;

  // True for a refusal by one of kvmid's limits (RESOURCE_EXHAUSTED naming a limit).
  static bool IsLimitRefusal(const grpc::Status& status);

  // Calls `finish` (which answers the call with `status`) at once, unless `status` is a limit
  // refusal: then after `key`'s delay, if the bounds allow (else at once). `bytes`: what the held
  // call keeps alive (its request). Returns the delay applied (zero: finished at once).
  // `max_delay` (default kMaxDelay; limits.refusal_delay_max_ms) caps the delay, the first
  // included.
  Clock::duration Finish(const std::string& key, const grpc::Status& status, uint64_t bytes,
                         std::function<void()> finish, Clock::duration max_delay = kMaxDelay);

  // Calls held now, and calls held since the start.
  size_t held() const;
  uint64_t held_total() const;

 private:
  struct KeyState {
    Clock::duration delay{0};
    Clock::time_point last_refusal;
    size_t held = 0;
  };
  struct Held {
    std::string key;
    uint64_t bytes;
    std::function<void()> finish;
  };
  void Run();
  void PurgeKeysLocked(Clock::time_point now) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  mutable Mutex mu_;
  CondVar cv_;
  absl::flat_hash_map<std::string, KeyState> keys_ ABSL_GUARDED_BY(mu_);
  // By due time (then arrival order).
  std::multimap<Clock::time_point, Held> due_ ABSL_GUARDED_BY(mu_);
  uint64_t held_bytes_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t held_total_ ABSL_GUARDED_BY(mu_) = 0;
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::thread thread_ ABSL_GUARDED_BY(mu_);  // started by the first held call
};

}  // namespace kvmid::api

#endif  // KVMID_DAEMON_API_TARPIT_H_
