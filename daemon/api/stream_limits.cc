#include "daemon/api/stream_limits.h"

#include <utility>

#include "daemon/api/convert.h"
#include "daemon/metrics/hooks.h"

namespace kvmid::api {

using security::InfoOf;
using security::Limit;

StreamLimits::StreamLimits(const security::Limits& limits, MemoryTrimmer* trimmer)
    : budget_(limits.stream_queue_budget_bytes),
      opens_(Limit::kStreamOpensPerSecond, limits.stream_opens_per_second, OpensBurst(limits)),
      slots_(Limit::kStreamsPerIdentity, limits.streams_per_identity),
      trimmer_(trimmer) {}

StreamLimits::Admission::Admission(Admission&& other) noexcept
    : slot_(std::move(other.slot_)),
      budget_(std::exchange(other.budget_, nullptr)),
      bytes_(std::exchange(other.bytes_, 0)) {}

StreamLimits::Admission& StreamLimits::Admission::operator=(Admission&& other) noexcept {
  if (this != &other) {
    Release();
    slot_ = std::move(other.slot_);
    budget_ = std::exchange(other.budget_, nullptr);
    bytes_ = std::exchange(other.bytes_, 0);
  }
  return *this;
}

void StreamLimits::Admission::Release() {
  slot_.Release();
  if (budget_ != nullptr && bytes_ > 0) budget_->Release(bytes_);
  budget_ = nullptr;
  bytes_ = 0;
}

grpc::Status StreamLimits::Admit(const CallContext& call, const security::Limits& limits,
                                 bool charge_budget, Admission* admission, uint64_t extra_bytes) {
  budget_.SetBudget(limits.stream_queue_budget_bytes);
  slots_.SetMax(limits.streams_per_identity);
  opens_.Set(limits.stream_opens_per_second, OpensBurst(limits));
  absl::StatusOr<security::KeyedSlots::Slot> slot = slots_.Acquire(call.IdentityKey(), "identity");
  if (!slot.ok()) {
    Metrics::LimitRefused(InfoOf(Limit::kStreamsPerIdentity).name);
    return ToStatus(slot.status());
  }
  // Then how fast: a client opening and cancelling streams in a loop holds no place for long,
  // but spends one open each time (a refusal by the cap above spends none).
  if (absl::Status fast = opens_.Take(call.IdentityKey(), "identity"); !fast.ok()) {
    Metrics::LimitRefused(InfoOf(Limit::kStreamOpensPerSecond).name);
    return ToStatus(fast);
  }
  Admission admitted;
  admitted.slot_ = std::move(*slot);
  if (charge_budget) {
    if (!budget_.TryCharge(kStreamBaseBytes + extra_bytes)) {
      Metrics::LimitRefused(InfoOf(Limit::kStreamQueueBudgetBytes).name);
      return ToStatus(budget_.ExhaustedStatus("new stream refused"));
    }
    admitted.budget_ = &budget_;
    admitted.bytes_ = kStreamBaseBytes + extra_bytes;
  }
  *admission = std::move(admitted);
  return grpc::Status::OK;
}

void StreamLimits::Freed(uint64_t bytes) {
  if (trimmer_ != nullptr) trimmer_->Freed(bytes);
}

}  // namespace kvmid::api
