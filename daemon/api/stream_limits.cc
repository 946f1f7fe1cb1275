#include "daemon/api/stream_limits.h"

#include <malloc.h>

#include <utility>

#include "daemon/api/convert.h"
#include "daemon/metrics/hooks.h"

namespace kvmid::api {

using security::InfoOf;
using security::Limit;

StreamLimits::StreamLimits(const security::Limits& limits)
    : budget_(limits.stream_queue_budget_bytes),
      slots_(Limit::kStreamsPerIdentity, limits.streams_per_identity) {}

StreamLimits::~StreamLimits() {
  std::unique_ptr<grpc::Alarm> alarm;
  {
    MutexLock lock(&trim_->mu);
    alarm = std::move(trim_->alarm);
  }
  // Destroying it cancels a pending trim (its callback runs with ok = false, on gRPC's thread).
}

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
                                 bool charge_budget, Admission* admission) {
  budget_.SetBudget(limits.stream_queue_budget_bytes);
  slots_.SetMax(limits.streams_per_identity);
  absl::StatusOr<security::KeyedSlots::Slot> slot = slots_.Acquire(call.IdentityKey(), "identity");
  if (!slot.ok()) {
    Metrics::LimitRefused(InfoOf(Limit::kStreamsPerIdentity).name);
    return ToStatus(slot.status());
  }
  Admission admitted;
  admitted.slot_ = std::move(*slot);
  if (charge_budget) {
    if (!budget_.TryCharge(kStreamBaseBytes)) {
      Metrics::LimitRefused(InfoOf(Limit::kStreamQueueBudgetBytes).name);
      return ToStatus(budget_.ExhaustedStatus("new stream refused"));
    }
    admitted.budget_ = &budget_;
    admitted.bytes_ = kStreamBaseBytes;
  }
  *admission = std::move(admitted);
  return grpc::Status::OK;
}

void StreamLimits::Freed(uint64_t bytes) {
  MutexLock lock(&trim_->mu);
  trim_->freed += bytes;
  if (trim_->freed < kTrimAfterFreedBytes || trim_->scheduled) return;
  trim_->scheduled = true;
  const auto now = std::chrono::steady_clock::now();
  const auto at = std::max(now, trim_->last + kTrimInterval);
  // The alarm's callback runs on a gRPC thread (never inline from Set), after `at`; the previous
  // alarm has fired (scheduled was false), so replacing it cancels nothing.
  trim_->alarm = std::make_unique<grpc::Alarm>();
  std::shared_ptr<Trim> trim = trim_;
  trim_->alarm->Set(std::chrono::system_clock::now() + (at - now), [trim](bool ok) {
    if (ok) RunTrim(trim);
  });
}

void StreamLimits::RunTrim(const std::shared_ptr<Trim>& trim) {
  malloc_trim(0);
  MutexLock lock(&trim->mu);
  trim->freed = 0;
  trim->scheduled = false;
  trim->last = std::chrono::steady_clock::now();
  ++trim->count;
}

uint64_t StreamLimits::trims() const {
  MutexLock lock(&trim_->mu);
  return trim_->count;
}

}  // namespace kvmid::api
