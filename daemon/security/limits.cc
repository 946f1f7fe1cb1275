#include "daemon/security/limits.h"

#include <absl/strings/str_cat.h>
#include <google/protobuf/descriptor.h>
#include <google/protobuf/message.h>

#include <algorithm>
#include <cmath>
#include <iterator>
#include <utility>

namespace kvmid {
namespace security {
namespace {

constexpr uint64_t kKiB = 1024, kMiB = 1024 * 1024, kGiB = 1024 * kMiB;

constexpr LimitInfo kLimits[] = {
    {Limit::kStreamQueueBudgetBytes, "stream_queue_budget_bytes",
     &Limits::stream_queue_budget_bytes, kMiB, 16 * kGiB, "bytes",
     "16 KiB per open StreamEvents/WatchVMs stream plus the guest changes WatchVMs streams "
     "buffer, together (StreamEvents streams read the shared ring, stream_event_ring_events); a "
     "WatchVMs stream that would exceed it loses changes, a new stream is refused"},
    {Limit::kStreamsPerIdentity, "streams_per_identity", &Limits::streams_per_identity, 1, 100000,
     "streams", "concurrent StreamEvents, WatchVMs and Attach streams of one caller identity"},
    {Limit::kMaxPolicies, "max_policies", &Limits::max_policies, 1, 65536, "policies",
     "policies held at once (configuration file and ApplyPolicy); past it ApplyPolicy of a new "
     "name is refused, a replacement is not"},
    {Limit::kMaxPolicyBytes, "max_policy_bytes", &Limits::max_policy_bytes, 256, kMiB, "bytes",
     "one policy, serialized, description included; a bigger one is refused (ApplyPolicy, the "
     "configuration file, saved policies)"},
    {Limit::kMaxPolicyDescriptionBytes, "max_policy_description_bytes",
     &Limits::max_policy_description_bytes, 1, kMiB, "bytes",
     "one policy's description; a longer one is refused like a bigger policy"},
    {Limit::kMaxPolicyNameBytes, "max_policy_name_bytes", &Limits::max_policy_name_bytes, 1, 1024,
     "bytes", "one policy's name; a longer one is refused like a bigger policy"},
    {Limit::kListPoliciesPageSize, "list_policies_page_size", &Limits::list_policies_page_size, 1,
     100000, "policies",
     "policies in one ListPolicies response (a smaller page_size is honoured); the rest follow "
     "through next_page_token"},
    {Limit::kListPoliciesMaxBytes, "list_policies_max_bytes", &Limits::list_policies_max_bytes,
     64 * kKiB, kClientDefaultMaxMessageBytes - 64 * kKiB, "bytes",
     "bytes of one ListPolicies response (below a client's default 4 MiB); the rest follow through "
     "next_page_token"},
    {Limit::kMaxAttachDeadlineMs, "max_attach_deadline_ms", &Limits::max_attach_deadline_ms, 1,
     60000, "ms",
     "the largest Claim.deadline_ms: how long one silent handler can hold a vCPU; a claim above it "
     "is refused (0: the daemon's deadline for the event type)"},
    {Limit::kMaxHeldEventsPerHandler, "max_held_events_per_handler",
     &Limits::max_held_events_per_handler, 1, 65536, "events",
     "events one Attach handler holds unanswered at once; past it, its events get their fallback "
     "at once (counted, logged, kvmid_limit_refusals_total)"},
    {Limit::kHandshakeSlotsPerPeer, "handshake_slots_per_peer", &Limits::handshake_slots_per_peer,
     1, 1024, "handshakes",
     "concurrent KVMI handshakes of one peer (UNIX uid or vsock CID), within the 1024 of every "
     "peer together"},
    {Limit::kGoneGuestRetentionSeconds, "gone_guest_retention_seconds",
     &Limits::gone_guest_retention_seconds, 1, 30 * 24 * 3600, "s",
     "how long a disconnected guest is remembered (its leases, its state in ListVMs and GetVM); "
     "then it is forgotten, as if never seen"},
    {Limit::kMaxGoneGuests, "max_gone_guests", &Limits::max_gone_guests, 1, 1u << 20, "guests",
     "disconnected guests remembered at once; past it the oldest gone one is forgotten first (a "
     "peer that connects with new UUIDs over and over cannot grow kvmid)"},
    {Limit::kStreamEventRingEvents, "stream_event_ring_events", &Limits::stream_event_ring_events,
     1024, 1u << 20, "events",
     "the newest events kept for every StreamEvents stream together (one shared ring, read from "
     "each stream's cursor, and what resume_after can go back to); a stream that falls further "
     "behind gets a DropNotice. Read at start"},
    {Limit::kRefusalDelayMaxMs, "refusal_delay_max_ms", &Limits::refusal_delay_max_ms, 1, 10000,
     "ms",
     "the longest delay before a refusal by a limit is answered to a caller refused again and "
     "again (ApplyPolicy's; it starts at 20 ms, or this if lower, and doubles per refusal)"},
    {Limit::kStreamOpensPerSecond, "stream_opens_per_second", &Limits::stream_opens_per_second, 1,
     100000, "streams/s",
     "StreamEvents, WatchVMs, Attach, ReadPhysicalStream and ReadVirtualStream calls one caller "
     "identity may open per second on average, after a burst of twice streams_per_identity; a "
     "call over it is refused (opening and cancelling streams in a loop costs kvmid's gRPC "
     "threads, and the guests, the same CPU whatever the streams do)"},
};

constexpr bool TableInEnumOrder() {
  for (size_t i = 0; i < sizeof(kLimits) / sizeof(kLimits[0]); ++i) {
    if (static_cast<size_t>(kLimits[i].limit) != i) return false;
  }
  return true;
}
static_assert(TableInEnumOrder(), "kLimits must list the limits in the order of enum Limit");
static_assert(sizeof(kLimits) / sizeof(kLimits[0]) ==
                  static_cast<size_t>(Limit::kStreamOpensPerSecond) + 1,
              "kLimits must list every limit");

}  // namespace

uint64_t Limits::Get(Limit limit) const { return this->*(InfoOf(limit).member); }

absl::Span<const LimitInfo> LimitTable() { return kLimits; }

const LimitInfo& InfoOf(Limit limit) { return kLimits[static_cast<size_t>(limit)]; }

std::string KnobOf(Limit limit) { return absl::StrCat("limits.", InfoOf(limit).name); }

absl::Status ValidateLimits(const Limits& limits) {
  for (const LimitInfo& info : kLimits) {
    const uint64_t v = limits.*(info.member);
    if (v < info.min) {
      return absl::InvalidArgumentError(
          absl::StrCat("limits.", info.name, ": ", v, " is below the minimum ", info.min));
    }
    if (v > info.max) {
      return absl::InvalidArgumentError(
          absl::StrCat("limits.", info.name, ": ", v, " is above the maximum ", info.max));
    }
  }
  if (limits.max_policy_bytes + kListPoliciesEntryOverheadBytes > limits.list_policies_max_bytes) {
    return absl::InvalidArgumentError(
        absl::StrCat("limits.max_policy_bytes: ", limits.max_policy_bytes,
                     " does not fit one ListPolicies response (limits.list_policies_max_bytes = ",
                     limits.list_policies_max_bytes, ")"));
  }
  if (limits.max_policy_description_bytes > limits.max_policy_bytes) {
    return absl::InvalidArgumentError(
        absl::StrCat("limits.max_policy_description_bytes: ", limits.max_policy_description_bytes,
                     " is above limits.max_policy_bytes = ", limits.max_policy_bytes));
  }
  if (limits.max_policy_name_bytes > limits.max_policy_bytes) {
    return absl::InvalidArgumentError(
        absl::StrCat("limits.max_policy_name_bytes: ", limits.max_policy_name_bytes,
                     " is above limits.max_policy_bytes = ", limits.max_policy_bytes));
  }
  return absl::OkStatus();
}

absl::StatusOr<Limits> LimitsFromConfig(const config::KvmidConfig& config) {
  Limits limits;
  const config::Limits& section = config.limits();
  const google::protobuf::Descriptor* d = section.GetDescriptor();
  const google::protobuf::Reflection* r = section.GetReflection();
  for (const LimitInfo& info : kLimits) {
    const google::protobuf::FieldDescriptor* f = d->FindFieldByName(info.name);
    if (f == nullptr) {
      return absl::InternalError(absl::StrCat("limits.", info.name, ": not in the schema"));
    }
    uint64_t v;
    switch (f->cpp_type()) {
      case google::protobuf::FieldDescriptor::CPPTYPE_UINT32:
        v = r->GetUInt32(section, f);
        break;
      case google::protobuf::FieldDescriptor::CPPTYPE_UINT64:
        v = r->GetUInt64(section, f);
        break;
      default:
        return absl::InternalError(absl::StrCat("limits.", info.name, ": not an unsigned field"));
    }
    if (v != 0) limits.*(info.member) = v;  // 0: the default
  }
  absl::Status s = ValidateLimits(limits);
  if (!s.ok()) return s;
  return limits;
}

absl::Status Exhausted(Limit limit, uint64_t value, absl::string_view what) {
  const LimitInfo& info = InfoOf(limit);
  return absl::ResourceExhaustedError(absl::StrCat(what, ": over the limit ", info.name, " = ",
                                                   value, " ", info.unit, " (", KnobOf(limit),
                                                   ")"));
}

absl::Status CheckPolicySizes(absl::string_view name, size_t description_bytes,
                              size_t serialized_bytes, const Limits& limits) {
  if (name.size() > limits.max_policy_name_bytes) {
    return Exhausted(Limit::kMaxPolicyNameBytes, limits,
                     absl::StrCat("policy.name is ", name.size(), " bytes"));
  }
  if (description_bytes > limits.max_policy_description_bytes) {
    return Exhausted(Limit::kMaxPolicyDescriptionBytes, limits,
                     absl::StrCat("policy.description is ", description_bytes, " bytes"));
  }
  if (serialized_bytes > limits.max_policy_bytes) {
    return Exhausted(Limit::kMaxPolicyBytes, limits,
                     absl::StrCat("policy ", name, " is ", serialized_bytes, " bytes serialized"));
  }
  return absl::OkStatus();
}

absl::Status CheckPolicyCount(absl::string_view name, const Limits& limits,
                              size_t count_without_it) {
  if (count_without_it >= limits.max_policies) {
    return Exhausted(Limit::kMaxPolicies, limits,
                     absl::StrCat("policy ", name, ": ", count_without_it,
                                  " policies are applied already (delete one first)"));
  }
  return absl::OkStatus();
}

absl::Status CheckPolicyLimits(const kvmi::v1::Policy& policy, const Limits& limits,
                               size_t count_without_it) {
  absl::Status s =
      CheckPolicySizes(policy.name(), policy.description().size(), policy.ByteSizeLong(), limits);
  if (!s.ok()) return s;
  return CheckPolicyCount(policy.name(), limits, count_without_it);
}

size_t PolicyPageEnd(absl::Span<const size_t> sizes, size_t start, const Limits& limits) {
  if (start >= sizes.size()) return sizes.size();
  size_t end = start;
  uint64_t bytes = 0;
  while (end < sizes.size() && end - start < limits.list_policies_page_size) {
    const uint64_t next = bytes + sizes[end] + kListPoliciesEntryOverheadBytes;
    if (next > limits.list_policies_max_bytes && end > start) break;
    bytes = next;
    ++end;
  }
  return end;
}

// ---- KeyedSlots ----

struct KeyedSlots::Slot::State {
  explicit State(Limit l, uint64_t m) : limit(l), max(m) {}
  const Limit limit;
  Mutex mu;
  uint64_t max ABSL_GUARDED_BY(mu);
  std::map<std::string, uint64_t, std::less<>> in_use ABSL_GUARDED_BY(mu);
};

KeyedSlots::KeyedSlots(Limit limit, uint64_t max_per_key)
    : state_(std::make_shared<Slot::State>(limit, max_per_key)) {}

KeyedSlots::Slot::Slot(std::shared_ptr<State> state, std::string key)
    : state_(std::move(state)), key_(std::move(key)) {}

KeyedSlots::Slot::Slot(Slot&& other) noexcept
    : state_(std::move(other.state_)), key_(std::move(other.key_)) {
  other.state_ = nullptr;
}

KeyedSlots::Slot& KeyedSlots::Slot::operator=(Slot&& other) noexcept {
  if (this != &other) {
    Release();
    state_ = std::move(other.state_);
    key_ = std::move(other.key_);
    other.state_ = nullptr;
  }
  return *this;
}

KeyedSlots::Slot::~Slot() { Release(); }

void KeyedSlots::Slot::Release() {
  if (state_ == nullptr) return;
  {
    MutexLock lock(&state_->mu);
    auto it = state_->in_use.find(key_);
    if (it != state_->in_use.end() && --it->second == 0) state_->in_use.erase(it);
  }
  state_ = nullptr;
}

absl::StatusOr<KeyedSlots::Slot> KeyedSlots::Acquire(absl::string_view key,
                                                     absl::string_view key_description) {
  MutexLock lock(&state_->mu);
  auto it = state_->in_use.find(key);
  const uint64_t held = it == state_->in_use.end() ? 0 : it->second;
  if (held >= state_->max) {
    return Exhausted(state_->limit, state_->max,
                     absl::StrCat(key_description, " ", key, " holds ", held));
  }
  if (it == state_->in_use.end()) it = state_->in_use.emplace(std::string(key), 0).first;
  ++it->second;
  return Slot(state_, std::string(key));
}

uint64_t KeyedSlots::InUse(absl::string_view key) const {
  MutexLock lock(&state_->mu);
  auto it = state_->in_use.find(key);
  return it == state_->in_use.end() ? 0 : it->second;
}

void KeyedSlots::SetMax(uint64_t max_per_key) {
  MutexLock lock(&state_->mu);
  state_->max = max_per_key;
}

// ---- KeyedRate ----

KeyedRate::KeyedRate(Limit limit, uint64_t per_second, uint64_t burst)
    : limit_(limit),
      per_second_(static_cast<double>(std::max<uint64_t>(per_second, 1))),
      burst_(static_cast<double>(std::max<uint64_t>(burst, 1))) {}

void KeyedRate::Set(uint64_t per_second, uint64_t burst) {
  MutexLock lock(&mu_);
  per_second_ = static_cast<double>(std::max<uint64_t>(per_second, 1));
  burst_ = static_cast<double>(std::max<uint64_t>(burst, 1));
}

double KeyedRate::Refilled(const Bucket& b, Clock::time_point now) const {
  const double elapsed = std::chrono::duration<double>(now - b.last).count();
  return std::min(burst_, b.tokens + std::max(0.0, elapsed) * per_second_);
}

absl::Status KeyedRate::Take(absl::string_view key, absl::string_view key_description,
                             Clock::time_point now) {
  MutexLock lock(&mu_);
  auto it = buckets_.find(key);
  if (it == buckets_.end()) {
    if (buckets_.size() >= kMaxKeys) {
      for (auto j = buckets_.begin(); j != buckets_.end();) {
        j = Refilled(j->second, now) >= burst_ ? buckets_.erase(j) : std::next(j);
      }
    }
    it = buckets_.emplace(std::string(key), Bucket{burst_, now}).first;
  }
  Bucket& b = it->second;
  b.tokens = Refilled(b, now);
  b.last = now;
  if (b.tokens < 1.0) {
    const int64_t wait_ms = static_cast<int64_t>(std::ceil((1.0 - b.tokens) / per_second_ * 1000));
    return Exhausted(limit_, static_cast<uint64_t>(per_second_),
                     absl::StrCat(key_description, " ", key,
                                  " opens streams too fast (the next in ", wait_ms, " ms)"));
  }
  b.tokens -= 1.0;
  return absl::OkStatus();
}

size_t KeyedRate::keys() const {
  MutexLock lock(&mu_);
  return buckets_.size();
}

// ---- ByteBudget ----

bool ByteBudget::TryCharge(uint64_t bytes) {
  const uint64_t budget = budget_.load(std::memory_order_relaxed);
  uint64_t used = used_.load(std::memory_order_relaxed);
  do {
    if (bytes > budget || used > budget - bytes) return false;
  } while (!used_.compare_exchange_weak(used, used + bytes, std::memory_order_relaxed));
  return true;
}

void ByteBudget::Release(uint64_t bytes) { used_.fetch_sub(bytes, std::memory_order_relaxed); }

absl::Status ByteBudget::ExhaustedStatus(absl::string_view what) const {
  return Exhausted(Limit::kStreamQueueBudgetBytes, budget(),
                   absl::StrCat(what, ": stream queues hold ", used(), " bytes"));
}

}  // namespace security
}  // namespace kvmid
