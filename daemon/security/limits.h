// kvmid's resource limits in one place: each with its default, its configuration knob
// (`limits { ... }` in kvmid_config.proto) and the RESOURCE_EXHAUSTED status that names it when
// a call is refused (docs/SECURITY.md "Limits", checked against this table by a test).
//
// Integration:
//   Limits limits = *LimitsFromConfig(config);                      // at load and reload
//   ApplyPolicy:   CheckPolicyLimits(policy, limits, count_without_same_name)
//   ListPolicies:  PolicyPageEnd(sizes, start, limits)
//   streams:       KeyedSlots per identity (Limit::kStreamsPerIdentity), ByteBudget for queues
//   KVMI accept:   KeyedSlots per uid/CID (Limit::kHandshakeSlotsPerPeer)
//   Attach:        Claim.deadline_ms > max_attach_deadline_ms -> Exhausted(...)
// None of these is on a guest's event path except ByteBudget::TryCharge (one atomic).
#ifndef KVMID_DAEMON_SECURITY_LIMITS_H_
#define KVMID_DAEMON_SECURITY_LIMITS_H_

#include <absl/status/status.h>
#include <absl/status/statusor.h>
#include <absl/strings/string_view.h>
#include <absl/types/span.h>

#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <string>

#include "daemon/base/mutex.h"
#include "daemon/config/kvmid_config.pb.h"
#include "proto/kvmi/v1/policy.pb.h"

namespace kvmid {
namespace security {

// The largest message a client accepts by default (gRPC's default receive limit).
inline constexpr uint64_t kClientDefaultMaxMessageBytes = 4u << 20;
// What a ListPolicies response adds per policy on top of the policy (PolicyStatus framing and
// its counters: name + three varints), bounded generously.
inline constexpr uint64_t kListPoliciesEntryOverheadBytes = 64;

enum class Limit : uint8_t {
  kStreamQueueBudgetBytes,
  kStreamsPerIdentity,
  kMaxPolicies,
  kMaxPolicyBytes,
  kMaxPolicyDescriptionBytes,
  kMaxPolicyNameBytes,
  kListPoliciesPageSize,
  kListPoliciesMaxBytes,
  kMaxAttachDeadlineMs,
  kMaxHeldEventsPerHandler,
  kHandshakeSlotsPerPeer,
  kGoneGuestRetentionSeconds,
  kMaxGoneGuests,
  kStreamEventRingEvents,
  kRefusalDelayMaxMs,
  kStreamOpensPerSecond,
};

struct Limits {
  uint64_t stream_queue_budget_bytes = 128u << 20;  // every stream queue together
  uint64_t streams_per_identity = 64;               // StreamEvents + WatchVMs + Attach
  uint64_t max_policies = 1024;
  uint64_t max_policy_bytes = 64u << 10;  // one policy, serialized, description included
  uint64_t max_policy_description_bytes = 4u << 10;
  uint64_t max_policy_name_bytes = 128;
  uint64_t list_policies_page_size = 256;
  uint64_t list_policies_max_bytes = 3u << 20;
  uint64_t max_attach_deadline_ms = 5000;
  uint64_t max_held_events_per_handler = 128;
  uint64_t handshake_slots_per_peer = 256;
  uint64_t gone_guest_retention_seconds = 600;  // a disconnected guest is forgotten after it
  uint64_t max_gone_guests = 4096;              // disconnected guests remembered at once
  uint64_t stream_event_ring_events = 65536;    // the ring every StreamEvents stream reads
  uint64_t refusal_delay_max_ms = 500;          // the tarpit's longest delay (api::Tarpit)
  uint64_t stream_opens_per_second = 20;  // per identity, on average (api::OpensBurst at once)

  uint64_t Get(Limit limit) const;
};

struct LimitInfo {
  Limit limit;
  const char* name;  // the field in `limits { }` and in kvmid_config.proto's Limits
  uint64_t Limits::*member;
  uint64_t min;  // accepted range of the knob
  uint64_t max;
  const char* unit;  // "bytes", "streams", "ms", ...
  const char* what;  // one line for docs/SECURITY.md
};
absl::Span<const LimitInfo> LimitTable();
const LimitInfo& InfoOf(Limit limit);
// "limits.max_policies".
std::string KnobOf(Limit limit);

// The configuration's `limits` section on top of the defaults; errors name the field
// ("limits.max_attach_deadline_ms: 600000 is above the maximum 60000").
absl::StatusOr<Limits> LimitsFromConfig(const config::KvmidConfig& config);
absl::Status ValidateLimits(const Limits& limits);

// RESOURCE_EXHAUSTED naming the limit, its value and its knob:
//   "policy description: 5000 bytes, over the limit max_policy_description_bytes = 4096
//    (limits.max_policy_description_bytes)".
absl::Status Exhausted(Limit limit, uint64_t value, absl::string_view what);
inline absl::Status Exhausted(Limit limit, const Limits& limits, absl::string_view what) {
  return Exhausted(limit, limits.Get(limit), what);
}

// ApplyPolicy (and policies from the configuration file): name, description and serialized size
// bounds, and the count. `count_without_it`: the policies kvmid holds, not counting one of the
// same name (a replacement does not add one).
absl::Status CheckPolicyLimits(const kvmi::v1::Policy& policy, const Limits& limits,
                               size_t count_without_it);
// CheckPolicyLimits in its two halves: the sizes alone (a policy's name, description and
// serialized size, e.g. before converting it), and the count alone (where policies are inserted,
// under the lock that serializes insertions, so that the check and the insertion are one step).
absl::Status CheckPolicySizes(absl::string_view name, size_t description_bytes,
                              size_t serialized_bytes, const Limits& limits);
absl::Status CheckPolicyCount(absl::string_view name, const Limits& limits,
                              size_t count_without_it);

// ListPolicies paging: given the serialized sizes of the policies in list order, the end of the
// page that starts at `start`: at most list_policies_page_size policies and
// list_policies_max_bytes bytes (kListPoliciesEntryOverheadBytes counted per policy), at least
// one policy when start < sizes.size().
size_t PolicyPageEnd(absl::Span<const size_t> sizes, size_t start, const Limits& limits);

// Concurrent holders per key (streams per identity, handshakes per peer). Thread-safe; a Slot
// releases its place when destroyed and may outlive the KeyedSlots.
class KeyedSlots {
 public:
  KeyedSlots(Limit limit, uint64_t max_per_key);

  class Slot {
   public:
    Slot() = default;
    Slot(Slot&& other) noexcept;
    Slot& operator=(Slot&& other) noexcept;
    ~Slot();
    bool held() const { return state_ != nullptr; }
    void Release();

   private:
    friend class KeyedSlots;
    struct State;
    Slot(std::shared_ptr<State> state, std::string key);
    std::shared_ptr<State> state_;
    std::string key_;
  };

  // A place for `key`, or RESOURCE_EXHAUSTED naming the limit and the key (`key_description`
  // says what the key is in the message: "identity", "peer").
  absl::StatusOr<Slot> Acquire(absl::string_view key, absl::string_view key_description);
  uint64_t InUse(absl::string_view key) const;
  // For a reload: the new maximum applies to the next Acquire (held slots stay).
  void SetMax(uint64_t max_per_key);

 private:
  std::shared_ptr<Slot::State> state_;
};

// How often per key (streams opened per identity): a token bucket per key holding at most `burst`
// tokens, refilled at `per_second`; each Take spends one. Thread-safe. A key whose bucket has
// filled up again is the same as a key never seen, so such keys are forgotten once more than
// kMaxKeys are remembered: what is kept is bounded by the keys active in the last
// burst / per_second seconds.
class KeyedRate {
 public:
  using Clock = std::chrono::steady_clock;
  static constexpr size_t kMaxKeys = 4096;

  KeyedRate(Limit limit, uint64_t per_second, uint64_t burst);
  // For a reload: applies from the next Take (buckets keep their tokens, up to the new burst).
  void Set(uint64_t per_second, uint64_t burst) ABSL_LOCKS_EXCLUDED(mu_);
  // Spends one of `key`'s tokens, or RESOURCE_EXHAUSTED naming the limit, the key
  // (`key_description`: "identity") and when the next one is due.
  absl::Status Take(absl::string_view key, absl::string_view key_description,
                    Clock::time_point now = Clock::now()) ABSL_LOCKS_EXCLUDED(mu_);
  size_t keys() const ABSL_LOCKS_EXCLUDED(mu_);

 private:
  struct Bucket {
    double tokens = 0;
    Clock::time_point last;
  };
  double Refilled(const Bucket& b, Clock::time_point now) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const Limit limit_;
  mutable Mutex mu_;
  double per_second_ ABSL_GUARDED_BY(mu_);
  double burst_ ABSL_GUARDED_BY(mu_);
  std::map<std::string, Bucket, std::less<>> buckets_ ABSL_GUARDED_BY(mu_);
};

// A shared byte budget (stream queues): TryCharge before buffering, Release when the bytes go.
class ByteBudget {
 public:
  explicit ByteBudget(uint64_t budget) : budget_(budget) {}
  // True when `bytes` fit (and charges them); lock-free.
  bool TryCharge(uint64_t bytes);
  void Release(uint64_t bytes);
  uint64_t used() const { return used_.load(std::memory_order_relaxed); }
  uint64_t budget() const { return budget_.load(std::memory_order_relaxed); }
  void SetBudget(uint64_t budget) { budget_.store(budget, std::memory_order_relaxed); }
  // RESOURCE_EXHAUSTED naming stream_queue_budget_bytes, for a refused stream.
  absl::Status ExhaustedStatus(absl::string_view what) const;

 private:
  std::atomic<uint64_t> budget_;
  std::atomic<uint64_t> used_{0};
};

}  // namespace security
}  // namespace kvmid

#endif  // KVMID_DAEMON_SECURITY_LIMITS_H_
