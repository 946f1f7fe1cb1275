#include "daemon/api/tarpit.h"

#include <algorithm>
#include <vector>

#include "daemon/api/admission.h"

namespace kvmid::api {

Tarpit::~Tarpit() { Drain(); }

void Tarpit::Drain() {
  std::thread thread;
  {
    MutexLock lock(&mu_);
    stopping_ = true;
    thread = std::move(thread_);
  }
  cv_.SignalAll();
  if (thread.joinable()) thread.join();
  // The thread finished what was held when it saw stopping_; anything left (no thread) now.
  std::multimap<Clock::time_point, Held> left;
  {
    MutexLock lock(&mu_);
    left.swap(due_);
  }
  for (auto& [due, held] : left) held.finish();
}

bool Tarpit::IsLimitRefusal(const grpc::Status& status) {
  return status.error_code() == grpc::StatusCode::RESOURCE_EXHAUSTED &&
         LimitNameOf(status.error_message()) != kUnknownLimit;
}

Tarpit::Clock::duration Tarpit::Finish(const std::string& key, const grpc::Status& status,
                                       uint64_t bytes, std::function<void()> finish,
                                       Clock::duration max_delay) {
  if (!IsLimitRefusal(status)) {
    finish();
    return Clock::duration::zero();
  }
  const Clock::time_point now = Clock::now();
  Clock::duration delay;
  bool wake = false;
  {
    MutexLock lock(&mu_);
    if (keys_.size() >= kMaxKeys && keys_.count(key) == 0) PurgeKeysLocked(now);
    KeyState& state = keys_[key];
    if (state.delay == Clock::duration::zero() || now - state.last_refusal > kForget) {
      state.delay = kFirstDelay;
    } else {
      state.delay *= 2;
    }
    state.delay = std::min<Clock::duration>(state.delay, max_delay);
    state.last_refusal = now;
    delay = state.delay;
    // Held only with a delay to wait (a zero maximum holds nothing) and within the bounds.
    if (delay == Clock::duration::zero() || stopping_ || state.held >= kMaxHeldPerKey ||
        held_bytes_ + bytes > kMaxHeldBytes) {
      delay = Clock::duration::zero();
    } else {
      ++state.held;
      held_bytes_ += bytes;
      ++held_total_;
      const Clock::time_point due = now + delay;
      wake = due_.empty() || due < due_.begin()->first;
      due_.emplace(due, Held{key, bytes, std::move(finish)});
      if (!thread_.joinable()) thread_ = std::thread([this] { Run(); });
    }
  }
  if (delay == Clock::duration::zero()) {
    // Not held, so `finish` was not moved (clang-tidy cannot tell the branches apart).
    finish();  // NOLINT(bugprone-use-after-move): over a bound, answered at once
    return delay;
  }
  if (wake) cv_.SignalAll();
  return delay;
}

void Tarpit::Run() {
  while (true) {
    std::vector<std::function<void()>> ready;
    bool stopping = false;
    {
      MutexLock lock(&mu_);
      while (!stopping_ && (due_.empty() || Clock::now() < due_.begin()->first)) {
        if (due_.empty()) {
          cv_.Wait(&mu_);
        } else {
          cv_.WaitUntil(&mu_, due_.begin()->first);
        }
      }
      stopping = stopping_;
      const Clock::time_point now = Clock::now();
      // Stopping: every held call is answered now.
      while (!due_.empty() && (stopping || due_.begin()->first <= now)) {
        Held& held = due_.begin()->second;
        auto it = keys_.find(held.key);
        if (it != keys_.end() && it->second.held > 0) --it->second.held;
        held_bytes_ -= held.bytes;
        ready.push_back(std::move(held.finish));
        due_.erase(due_.begin());
      }
    }
    for (auto& finish : ready) finish();  // into gRPC, without the lock
    if (stopping) return;
  }
}

void Tarpit::PurgeKeysLocked(Clock::time_point now) {
  for (auto it = keys_.begin(); it != keys_.end();) {
    if (it->second.held == 0 && now - it->second.last_refusal > kForget) {
      keys_.erase(it++);
    } else {
      ++it;
    }
  }
}

size_t Tarpit::held() const {
  MutexLock lock(&mu_);
  return due_.size();
}

uint64_t Tarpit::held_total() const {
  MutexLock lock(&mu_);
  return held_total_;
}

}  // namespace kvmid::api
