#include "daemon/api/async_reactor.h"

#include <pthread.h>
#include <spdlog/spdlog.h>

#include <cstdio>
#include <cstdlib>
#include <string>

namespace kvmid::api {

namespace internal {

void ReactorWithoutCall() {
  std::fputs("kvmid: an api:: reactor was created outside its AsyncServer handler\n", stderr);
  std::abort();
}

AsyncCall::AsyncCall(AsyncServer* server, AsyncMethod* method, bool closed)
    : live_(server),
      server_(server),
      method_(method),
      start_tag_(this,
                 [](void* self, bool ok) {
                   auto* call = static_cast<AsyncCall*>(self);
                   if (!ok) {  // the server is shutting down: this call never started
                     delete call;
                     return;
                   }
                   call->server_->Rearm(call->method_);
                   call->Started();
                 }),
      read_tag_(this, [](void* self,
                         bool ok) { static_cast<AsyncCall*>(self)->Completed(Op::kRead, ok); }),
      write_tag_(this, [](void* self,
                          bool ok) { static_cast<AsyncCall*>(self)->Completed(Op::kWrite, ok); }),
      finish_tag_(this, [](void* self,
                           bool ok) { static_cast<AsyncCall*>(self)->Completed(Op::kFinish, ok); }),
      closed_tag_(this, [](void* self,
                           bool ok) { static_cast<AsyncCall*>(self)->Completed(Op::kClosed, ok); }),
      alarm_tag_(this, [](void* self,
                          bool ok) { static_cast<AsyncCall*>(self)->Completed(Op::kAlarm, ok); }),
      closed_(closed) {}

AsyncCall::~AsyncCall() = default;

AsyncCall::Live::Live(AsyncServer* server) : server_(server) { server_->CallCreated(); }

AsyncCall::Live::~Live() { server_->CallDeleted(); }

void AsyncCall::RequestCall(
    const std::function<void(grpc::ServerCompletionQueue*, void*)>& request) {
  bool closed = false;
  {
    MutexLock lock(&mu_);
    closed = closed_;
  }
  // The "done" notification must be asked for before the call is requested; gRPC delivers it
  // only for a call that started.
  if (!closed) StartOp(&closed_tag_, [&](void* tag) { context_.AsyncNotifyWhenDone(tag); });
  StartOp(start_tag(), [&](void* tag) { request(server_->cq_.get(), tag); });
}

void AsyncCall::SetAlarm(std::chrono::steady_clock::duration after) {
  // grpc::Alarm takes system_clock deadlines; the duration is what matters.
  const auto deadline = std::chrono::system_clock::now() +
                        std::chrono::duration_cast<std::chrono::system_clock::duration>(after);
  StartOp(&alarm_tag_, [&](void* tag) { alarm_.Set(server_->cq_.get(), deadline, tag); });
}

void AsyncCall::Began() {
  MutexLock lock(&mu_);
  ++in_flight_;
}

void AsyncCall::Bound() {
  std::vector<std::pair<Op, bool>> held;
  {
    MutexLock lock(&mu_);
    bound_ = true;
    held.swap(held_);
  }
  // A call that ends among these (its reactor finished inside the handler and every completion
  // came in before it returned) has none left after the last.
  for (const auto& [op, ok] : held) {
    if (Deliver(op, ok)) return End();
  }
}

void AsyncCall::Completed(Op op, bool ok) {
  {
    MutexLock lock(&mu_);
    if (!bound_) {
      held_.emplace_back(op, ok);
      return;
    }
  }
  if (Deliver(op, ok)) End();
}

void AsyncCall::End() {
  // A reactor that defers (DeferEnd, inside OnAllDone) may have the call deleted on another
  // thread before OnAllDone returns: the flag lives on this frame, and `this` is not touched
  // after OnAllDone unless nothing deferred.
  bool deferred = false;
  end_deferred_ = &deferred;
  OnAllDone();
  if (!deferred) delete this;
}

std::function<void()> AsyncCall::DeferEnd() {
  *end_deferred_ = true;
  return [this] { delete this; };
}

bool AsyncCall::Deliver(Op op, bool ok) {
  switch (op) {
    case Op::kRead:
      OnRead(ok);
      break;
    case Op::kWrite:
      OnWrite(ok);
      break;
    case Op::kFinish:
      break;
    case Op::kClosed:
      if (context_.IsCancelled()) OnCancelled();
      break;
    case Op::kAlarm:
      OnAlarmFired();  // never cancelled: AsyncServer::Stop waits for the calls first
      break;
  }
  bool done = false;
  {
    MutexLock lock(&mu_);
    if (op == Op::kClosed) {
      closed_ = true;
    } else {
      --in_flight_;
      if (op == Op::kFinish) finished_ = true;
    }
    done = !done_ && bound_ && finished_ && closed_ && in_flight_ == 0;
    if (done) done_ = true;
  }
  return done;
}

}  // namespace internal

AsyncServer::AsyncServer(grpc::ServerBuilder* builder, int threads)
    : cq_(builder->AddCompletionQueue()), threads_(threads < 1 ? 1 : threads) {}

AsyncServer::~AsyncServer() { Stop(); }

void AsyncServer::Add(std::unique_ptr<internal::AsyncMethod> method) {
  methods_.push_back(std::move(method));
}

void AsyncServer::Start() {
  {
    MutexLock lock(&mu_);
    if (started_) return;
    started_ = true;
    for (const auto& method : methods_) method->Arm(this);
  }
  for (int i = 0; i < threads_; ++i) {
    runners_.emplace_back([this, i] {
      const std::string name = "kvmid-grpc-" + std::to_string(i);
      pthread_setname_np(pthread_self(), name.c_str());
      Run();
    });
  }
}

void AsyncServer::Run() {
  void* tag = nullptr;
  bool ok = false;
  for (;;) {
    bool got = false;
    {
      // Next runs gRPC's completion of the operation (daemon/base/tsan.h: why TSan skips it).
      TsanIgnored library;
      got = cq_->Next(&tag, &ok);
    }
    if (!got) return;
    TsanTakeOver(tag);
    static_cast<AsyncTag*>(tag)->Run(ok);
  }
}

void AsyncServer::Rearm(internal::AsyncMethod* method) {
  MutexLock lock(&mu_);
  if (!stopping_) method->Arm(this);
}

void AsyncServer::CallCreated() {
  MutexLock lock(&calls_mu_);
  ++live_calls_;
}

void AsyncServer::CallDeleted() {
  MutexLock lock(&calls_mu_);
  if (--live_calls_ == 0) calls_cv_.SignalAll();
}

size_t AsyncServer::live_calls() const {
  MutexLock lock(&calls_mu_);
  return live_calls_;
}

void AsyncServer::Stop() {
  bool started = false;
  {
    MutexLock lock(&mu_);
    if (stopped_) return;
    stopped_ = true;
    stopping_ = true;
    started = started_;
  }
  if (started) {
    // No limit: an operation on a queue shut down aborts the process (gRPC asserts), and a live
    // call may still start one. Every reactor finishes on its cancellation; one that does not is a
    // bug, named here every kStopReport until it does.
    MutexLock lock(&calls_mu_);
    auto report = std::chrono::steady_clock::now() + kStopReport;
    while (live_calls_ > 0) {
      if (!calls_cv_.WaitUntil(&calls_mu_, report)) {
        spdlog::error("API: {} async calls still open; waiting for them to end", live_calls_);
        report = std::chrono::steady_clock::now() + kStopReport;
      }
    }
  }
  cq_->Shutdown();
  if (started) {
    for (std::thread& runner : runners_) runner.join();
  } else {
    void* tag = nullptr;
    bool ok = false;
    while (cq_->Next(&tag, &ok)) {
    }
  }
  runners_.clear();
}

}  // namespace kvmid::api
