// "Find the guest (or vCPU) a request names and call it": the one helper every control RPC uses,
// so that the error texts, the session hand-over and the wait within the client's deadline exist
// once.
#ifndef KVMID_DAEMON_API_GUEST_CALL_H_
#define KVMID_DAEMON_API_GUEST_CALL_H_

#include <absl/base/thread_annotations.h>
#include <grpcpp/grpcpp.h>

#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "daemon/api/convert.h"
#include "daemon/api/limits.h"
#include "daemon/base/mutex.h"
#include "daemon/kvmid.h"

namespace kvmid::api {

// Waits on an RPC thread for an asynchronous result (a guest's reply), giving up when the call
// is cancelled or its deadline passes. The callback may run on any thread, at most once.
template <typename T>
class Waiter {
 public:
  std::function<void(T)> callback() {
    return [state = state_](T value) {
      MutexLock lock(&state->mu);
      state->value = std::move(value);
      state->cv.SignalAll();
    };
  }
  // False if the call was cancelled (or its deadline passed) first.
  bool Wait(grpc::ServerContextBase* context, T* out) {
    MutexLock lock(&state_->mu);
    while (!state_->value) {
      if (context->IsCancelled()) return false;
      state_->cv.WaitFor(&state_->mu, kWaitPoll);
    }
    *out = std::move(*state_->value);
    return true;
  }

 private:
  struct State {
    Mutex mu;
    CondVar cv;
    std::optional<T> value ABSL_GUARDED_BY(mu);
  };
  std::shared_ptr<State> state_ = std::make_shared<State>();
};

// Waits for `waiter`; CANCELLED if the client went away first.
template <typename T>
grpc::Status Await(grpc::ServerContextBase* context, Waiter<T>* waiter, T* out) {
  return waiter->Wait(context, out) ? grpc::Status::OK : Cancelled();
}

// What a control RPC works on: the guest a request names and its session. The session is kept
// for the whole call: one that closes meanwhile fails its commands (kClosed) instead of
// vanishing under the call.
struct Target {
  std::shared_ptr<Guest> guest;
  std::shared_ptr<GuestSession> session;
};

class GuestFinder {
 public:
  explicit GuestFinder(Registry* registry) : registry_(registry) {}

  // The guest `vm` (UUID or name) names, in any state: INVALID_ARGUMENT or NOT_FOUND otherwise.
  grpc::Status Lookup(const std::string& vm, std::shared_ptr<Guest>* guest) const;
  // The hooked guest `vm` names, with its live session; UNAVAILABLE if it is not hooked.
  grpc::Status Find(const std::string& vm, Target* target) const;
  // Find, plus a check that `vcpu` is one of the guest's vCPUs.
  grpc::Status FindVcpu(const std::string& vm, uint32_t vcpu, Target* target) const;

 private:
  Registry* const registry_;
};

// INVALID_ARGUMENT unless `vcpu` is below the guest's vCPU count.
grpc::Status CheckVcpu(const Guest& guest, uint32_t vcpu);

// Sends one command on `session` and waits for its reply data within the call; `what` names the
// RPC in errors.
template <typename Request>
grpc::Status Call(grpc::ServerContextBase* context, GuestSession& session, const Request& request,
                  const std::string& what, std::vector<uint8_t>* data) {
  Waiter<CommandResult> waiter;
  session.Send(request, waiter.callback());
  CommandResult result;
  if (!waiter.Wait(context, &result)) return Cancelled();
  if (!result.ok()) return ToStatus(result, what);
  *data = std::move(result.data);
  return grpc::Status::OK;
}

// Decodes reply data: INTERNAL "<what> reply: ..." if the guest's reply is malformed.
template <typename Reply, typename... Expected>
grpc::Status DecodeReply(const std::vector<uint8_t>& data, const std::string& what, Reply* reply,
                         Expected... expected) {
  kvmi::DecodeStatus decoded = kvmi::DecodeReplyData(kvmi::ByteView(data), expected..., reply);
  if (decoded.ok()) return grpc::Status::OK;
  return grpc::Status(grpc::StatusCode::INTERNAL, what + " reply: " + decoded.ToString());
}

}  // namespace kvmid::api

#endif  // KVMID_DAEMON_API_GUEST_CALL_H_
