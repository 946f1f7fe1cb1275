// gRPC's async API behind the callback API's reactor interface.
//
// Why: gRPC 1.51 (Debian 12) serves every callback-API method of a process from one process-wide
// completion queue drained by its own "nexting" threads, and those threads poll the same epoll
// set as everything else: they take the reads of every call, then hand them over, one more thread
// wake-up per message (docs/PERFORMANCE.md, issue 14, design 1). With no callback-API method in
// the process, the async API on completion-queue threads of kvmid's own costs one wake-up less per
// message each way.
//
// How: the streams keep their reactors (StartWrite/StartRead/Finish, OnWriteDone/OnReadDone/
// OnCancel/OnDone, with the callback API's rules: one read and one write in flight at a time,
// OnDone once, after Finish completed and every operation ended, and nothing after it), but derive
// from api::WriteReactor / ReadReactor / BidiReactor instead of gRPC's. An AsyncServer owns the
// completion queue and its threads; each method is registered with the generated service's
// Request<Method> and a handler that returns the reactor, as the callback service's method did.
//
// A reactor is created by its handler, on a completion-queue thread, and may start operations in
// its constructor (a thread-local binds it to its call while the handler runs). Completions that
// arrive before the handler returned are held and delivered right after, so no reaction runs on a
// reactor still being constructed.
#ifndef KVMID_DAEMON_API_ASYNC_REACTOR_H_
#define KVMID_DAEMON_API_ASYNC_REACTOR_H_

#include <grpcpp/alarm.h>
#include <grpcpp/grpcpp.h>

#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "daemon/base/mutex.h"
#include "daemon/base/tsan.h"

namespace kvmid::api {

// A completion-queue tag: the function run when its operation completes.
class AsyncTag {
 public:
  using Fn = void (*)(void* self, bool ok);
  AsyncTag(void* self, Fn fn) : self_(self), fn_(fn) {}
  void Run(bool ok) { fn_(self_, ok); }

 private:
  void* const self_;
  const Fn fn_;
};

namespace internal {

// The operations a reactor starts; implemented by its call.
template <typename Response>
class WriteOps {
 public:
  virtual void Write(const Response* message) = 0;
  virtual void Finish(const grpc::Status& status) = 0;

 protected:
  ~WriteOps() = default;
};

template <typename Request>
class ReadOps {
 public:
  virtual void Read(Request* message) = 0;
  virtual void Finish(const grpc::Status& status) = 0;

 protected:
  ~ReadOps() = default;
};

template <typename Request, typename Response>
class BidiOps {
 public:
  virtual void Read(Request* message) = 0;
  virtual void Write(const Response* message) = 0;
  virtual void WriteThenRead(const Response* message, Request* request) = 0;
  virtual void Alarm(std::chrono::steady_clock::duration after) = 0;
  virtual void Finish(const grpc::Status& status) = 0;
  virtual std::function<void()> DeferEnd() = 0;

 protected:
  ~BidiOps() = default;
};

// The call whose handler runs on this thread, for the reactor's constructor to bind to.
template <typename Ops>
struct Binding {
  static inline thread_local Ops* current = nullptr;
};

// Aborts with a message: a reactor created outside its handler has no call to run on.
[[noreturn]] void ReactorWithoutCall();

template <typename Ops>
Ops* TakeBinding() {
  Ops* ops = std::exchange(Binding<Ops>::current, nullptr);
  if (ops == nullptr) ReactorWithoutCall();
  return ops;
}

// Runs `make` (a handler creating its reactor) with `ops` bound for the reactor's constructor.
template <typename Ops, typename Make>
auto MakeBound(Ops* ops, Make make) {
  Binding<Ops>::current = ops;
  auto* reactor = make();
  Binding<Ops>::current = nullptr;
  return reactor;
}

}  // namespace internal

// A server-streaming call's reactor (as grpc::ServerWriteReactor).
template <typename Response>
class WriteReactor {
 public:
  using Ops = internal::WriteOps<Response>;
  WriteReactor() : ops_(internal::TakeBinding<Ops>()) {}
  virtual ~WriteReactor() = default;
  WriteReactor(const WriteReactor&) = delete;
  WriteReactor& operator=(const WriteReactor&) = delete;

  // One write in flight at a time; `message` must stay valid until OnWriteDone.
  void StartWrite(const Response* message) { ops_->Write(message); }
  // Once; every call ends with it, cancelled or not.
  void Finish(const grpc::Status& status) { ops_->Finish(status); }

  virtual void OnWriteDone(bool /*ok*/) {}
  // The client cancelled, the deadline passed or the server is ending the call (before OnDone).
  virtual void OnCancel() {}
  // Last: every operation ended and Finish completed. The reactor may delete itself here.
  virtual void OnDone() = 0;

 private:
  Ops* const ops_;
};

// A client-streaming call's reactor (as grpc::ServerReadReactor). Finish sends the response the
// handler was given, if the status is OK.
template <typename Request>
class ReadReactor {
 public:
  using Ops = internal::ReadOps<Request>;
  ReadReactor() : ops_(internal::TakeBinding<Ops>()) {}
  virtual ~ReadReactor() = default;
  ReadReactor(const ReadReactor&) = delete;
  ReadReactor& operator=(const ReadReactor&) = delete;

  void StartRead(Request* message) { ops_->Read(message); }
  void Finish(const grpc::Status& status) { ops_->Finish(status); }

  // Not ok: the client half-closed (or the call broke).
  virtual void OnReadDone(bool /*ok*/) {}
  virtual void OnCancel() {}
  virtual void OnDone() = 0;

 private:
  Ops* const ops_;
};

// A bidirectional call's reactor (as grpc::ServerBidiReactor). A read and a write may be in flight
// at once, and their reactions may run at once on different threads.
template <typename Request, typename Response>
class BidiReactor {
 public:
  using Ops = internal::BidiOps<Request, Response>;
  BidiReactor() : ops_(internal::TakeBinding<Ops>()) {}
  virtual ~BidiReactor() = default;
  BidiReactor(const BidiReactor&) = delete;
  BidiReactor& operator=(const BidiReactor&) = delete;

  void StartRead(Request* message) { ops_->Read(message); }
  void StartWrite(const Response* message) { ops_->Write(message); }
  // StartWrite, then StartRead, both counted as in flight before the write starts (the call
  // cannot end between them). The read's flow-control update goes out with the write's bytes
  // instead of alone (gRPC 1.51 announces a stream's window at once when a read starts on a
  // stream whose window was used: docs/PERFORMANCE.md, design 8).
  void StartWriteThenRead(const Response* message, Request* request) {
    ops_->WriteThenRead(message, request);
  }
  // OnAlarm runs `after` from now (gRPC rounds up to its millisecond). One alarm at a time: start
  // the next from OnAlarm or after it. It counts as an operation: OnDone waits for it.
  void StartAlarm(std::chrono::steady_clock::duration after) { ops_->Alarm(after); }
  void Finish(const grpc::Status& status) { ops_->Finish(status); }

  virtual void OnReadDone(bool /*ok*/) {}
  virtual void OnWriteDone(bool /*ok*/) {}
  // May run while OnReadDone/OnWriteDone run, like those two with each other.
  virtual void OnAlarm() {}
  virtual void OnCancel() {}
  virtual void OnDone() = 0;

 protected:
  // Only inside OnDone: the call (its context included) is not deleted when OnDone returns but
  // when the returned function runs (once, from any thread), so that work still reading the
  // context may end elsewhere. AsyncServer::Stop waits for it.
  std::function<void()> KeepCallAfterDone() { return ops_->DeferEnd(); }

 private:
  Ops* const ops_;
};

// A unary call answered later (as the callback API's DefaultReactor): Finish once, from any
// thread; the call ends with it.
class UnaryResponder {
 public:
  virtual void Finish(const grpc::Status& status) = 0;

 protected:
  ~UnaryResponder() = default;
};

class AsyncServer;

namespace internal {

// A registered method: arms one call at a time (a new one as soon as the last one started).
class AsyncMethod {
 public:
  virtual ~AsyncMethod() = default;
  virtual void Arm(AsyncServer* server) = 0;
};

// What every call shares: its context, the count of operations in flight, the hold of
// completions that arrive before the reactor exists, OnCancel and OnDone at the right time.
class AsyncCall {
  // Counts the call among its server's live calls (AsyncServer::Stop waits for none) from before
  // its context exists until after the context is destroyed: declared first, destroyed last. The
  // context's destructor runs its interceptors' destructors, on whatever thread deletes the call.
  class Live {
   public:
    explicit Live(AsyncServer* server);
    ~Live();
    Live(const Live&) = delete;
    Live& operator=(const Live&) = delete;

   private:
    AsyncServer* const server_;
  };
  Live live_;

 public:
  AsyncCall(const AsyncCall&) = delete;
  AsyncCall& operator=(const AsyncCall&) = delete;

 protected:
  enum class Op : uint8_t { kRead, kWrite, kFinish, kClosed, kAlarm };
  // `closed`: no "done" notification is asked for (unary calls).
  AsyncCall(AsyncServer* server, AsyncMethod* method, bool closed);
  virtual ~AsyncCall();

  // Arms the call: `request` asks gRPC for the method's next call, with start_tag().
  void RequestCall(const std::function<void(grpc::ServerCompletionQueue*, void*)>& request);
  // Before starting an operation (it is counted until its completion).
  void Began();
  // The handler returned: completions held so far are delivered.
  void Bound();
  // Inside OnAllDone: the call is deleted by the returned function instead of after it.
  std::function<void()> DeferEnd();

  // The reactor's side, on completion-queue threads.
  virtual void Started() = 0;  // the handler's turn; ends with Bound()
  virtual void OnRead(bool /*ok*/) {}
  virtual void OnWrite(bool /*ok*/) {}
  virtual void OnCancelled() {}
  virtual void OnAlarmFired() {}
  virtual void OnAllDone() {}

  void* start_tag() { return &start_tag_; }
  void* read_tag() { return &read_tag_; }
  void* write_tag() { return &write_tag_; }
  void* finish_tag() { return &finish_tag_; }
  // An alarm on the server's completion queue, `after` from now, counted like an operation
  // (Began first). The previous one must have been delivered (its tag back from the queue).
  void SetAlarm(std::chrono::steady_clock::duration after);

  // Calls `start(tag)`, which gives gRPC an operation with `tag`. Under TSan (daemon/base/tsan.h)
  // the tag is handed off first, and the library's accesses inside `start` (FillOps; serializing
  // the message, which the callers below read beforehand) are not checked. Nothing more elsewhere.
  template <typename Start>
  static void StartOp(void* tag, Start start) {
    TsanHandOff(tag);
    TsanIgnored library;
    start(tag);
  }
  // The operations of the call kinds below, on their gRPC stream or responder.
  template <typename Stream, typename Message>
  void GrpcRead(Stream* stream, Message* message) {
    StartOp(read_tag(), [&](void* tag) { stream->Read(message, tag); });
  }
  template <typename Stream, typename Message>
  void GrpcWrite(Stream* stream, const Message& message) {
    TsanReadMessage(message);
    StartOp(write_tag(), [&](void* tag) { stream->Write(message, tag); });
  }
  template <typename Stream>
  void GrpcFinish(Stream* stream, const grpc::Status& status) {
    StartOp(finish_tag(), [&](void* tag) { stream->Finish(status, tag); });
  }
  // For a call that answers one message: it goes with an OK status, none with an error.
  template <typename Responder, typename Message>
  void GrpcFinish(Responder* responder, const Message& response, const grpc::Status& status) {
    if (status.ok()) TsanReadMessage(response);
    StartOp(finish_tag(), [&](void* tag) {
      if (status.ok()) {
        responder->Finish(response, status, tag);
      } else {
        responder->FinishWithError(status, tag);
      }
    });
  }

  grpc::ServerContext context_;

 private:
  void Completed(Op op, bool ok);
  // Runs the reaction to `op`; true if the call ended with it (the caller then calls End).
  bool Deliver(Op op, bool ok);
  void End();  // OnAllDone, then the call is deleted

  AsyncServer* const server_;
  AsyncMethod* const method_;
  AsyncTag start_tag_;
  AsyncTag read_tag_;
  AsyncTag write_tag_;
  AsyncTag finish_tag_;
  AsyncTag closed_tag_;
  AsyncTag alarm_tag_;
  grpc::Alarm alarm_;  // set again once delivered (gRPC allows it)
  Mutex mu_;
  bool bound_ ABSL_GUARDED_BY(mu_) = false;
  int in_flight_ ABSL_GUARDED_BY(mu_) = 0;
  bool finished_ ABSL_GUARDED_BY(mu_) = false;
  bool closed_ ABSL_GUARDED_BY(mu_);
  bool done_ ABSL_GUARDED_BY(mu_) = false;
  bool* end_deferred_ = nullptr;  // End()'s flag, set by DeferEnd while End() runs OnAllDone
  std::vector<std::pair<Op, bool>> held_ ABSL_GUARDED_BY(mu_);
};

// A registered method of call kind `Call`: gRPC's Request<Method> and the handler.
template <typename Call, typename RequestFn, typename Handler>
struct MethodOf final : AsyncMethod {
  MethodOf(RequestFn r, Handler h) : request(std::move(r)), handler(std::move(h)) {}
  void Arm(AsyncServer* server) override { Call::ArmNew(server, this); }
  const RequestFn request;
  const Handler handler;
};

template <typename Request, typename Response>
class ServerStreamingCall final : public AsyncCall, public WriteOps<Response> {
 public:
  using RequestFn =
      std::function<void(grpc::ServerContext*, Request*, grpc::ServerAsyncWriter<Response>*,
                         grpc::ServerCompletionQueue*, void*)>;
  using Handler = std::function<WriteReactor<Response>*(grpc::ServerContext*, const Request*)>;
  using Method = MethodOf<ServerStreamingCall, RequestFn, Handler>;
  static void ArmNew(AsyncServer* server, Method* method) {
    (new ServerStreamingCall(server, method))->Arm();
  }

  void Write(const Response* message) override {
    Began();
    GrpcWrite(&writer_, *message);
  }
  void Finish(const grpc::Status& status) override {
    Began();
    GrpcFinish(&writer_, status);
  }

 private:
  ServerStreamingCall(AsyncServer* server, Method* method)
      : AsyncCall(server, method, /*closed=*/false), method_(method) {}
  void Arm() {
    RequestCall([this](grpc::ServerCompletionQueue* cq, void* tag) {
      method_->request(&context_, &request_, &writer_, cq, tag);
    });
  }
  void Started() override {
    reactor_ = MakeBound<WriteOps<Response>>(
        this, [this] { return method_->handler(&context_, &request_); });
    Bound();
  }
  void OnWrite(bool ok) override { reactor_->OnWriteDone(ok); }
  void OnCancelled() override { reactor_->OnCancel(); }
  void OnAllDone() override { reactor_->OnDone(); }

  Method* const method_;
  Request request_;
  grpc::ServerAsyncWriter<Response> writer_{&context_};
  WriteReactor<Response>* reactor_ = nullptr;
};

template <typename Request, typename Response>
class ClientStreamingCall final : public AsyncCall, public ReadOps<Request> {
 public:
  using RequestFn =
      std::function<void(grpc::ServerContext*, grpc::ServerAsyncReader<Response, Request>*,
                         grpc::ServerCompletionQueue*, void*)>;
  using Handler = std::function<ReadReactor<Request>*(grpc::ServerContext*, Response*)>;
  using Method = MethodOf<ClientStreamingCall, RequestFn, Handler>;
  static void ArmNew(AsyncServer* server, Method* method) {
    (new ClientStreamingCall(server, method))->Arm();
  }

  void Read(Request* message) override {
    Began();
    GrpcRead(&reader_, message);
  }
  void Finish(const grpc::Status& status) override {
    Began();
    GrpcFinish(&reader_, response_, status);
  }

 private:
  ClientStreamingCall(AsyncServer* server, Method* method)
      : AsyncCall(server, method, /*closed=*/false), method_(method) {}
  void Arm() {
    RequestCall([this](grpc::ServerCompletionQueue* cq, void* tag) {
      method_->request(&context_, &reader_, cq, tag);
    });
  }
  void Started() override {
    reactor_ = MakeBound<ReadOps<Request>>(
        this, [this] { return method_->handler(&context_, &response_); });
    Bound();
  }
  void OnRead(bool ok) override { reactor_->OnReadDone(ok); }
  void OnCancelled() override { reactor_->OnCancel(); }
  void OnAllDone() override { reactor_->OnDone(); }

  Method* const method_;
  Response response_;
  grpc::ServerAsyncReader<Response, Request> reader_{&context_};
  ReadReactor<Request>* reactor_ = nullptr;
};

template <typename Request, typename Response>
class BidiStreamingCall final : public AsyncCall, public BidiOps<Request, Response> {
 public:
  using RequestFn =
      std::function<void(grpc::ServerContext*, grpc::ServerAsyncReaderWriter<Response, Request>*,
                         grpc::ServerCompletionQueue*, void*)>;
  using Handler = std::function<BidiReactor<Request, Response>*(grpc::ServerContext*)>;
  using Method = MethodOf<BidiStreamingCall, RequestFn, Handler>;
  static void ArmNew(AsyncServer* server, Method* method) {
    (new BidiStreamingCall(server, method))->Arm();
  }

  void Read(Request* message) override {
    Began();
    GrpcRead(&stream_, message);
  }
  void Write(const Response* message) override {
    Began();
    GrpcWrite(&stream_, *message);
  }
  void WriteThenRead(const Response* message, Request* request) override {
    Began();
    Began();
    GrpcWrite(&stream_, *message);
    GrpcRead(&stream_, request);
  }
  void Alarm(std::chrono::steady_clock::duration after) override {
    Began();
    SetAlarm(after);
  }
  void Finish(const grpc::Status& status) override {
    Began();
    GrpcFinish(&stream_, status);
  }
  std::function<void()> DeferEnd() override { return AsyncCall::DeferEnd(); }

 private:
  BidiStreamingCall(AsyncServer* server, Method* method)
      : AsyncCall(server, method, /*closed=*/false), method_(method) {}
  void Arm() {
    RequestCall([this](grpc::ServerCompletionQueue* cq, void* tag) {
      method_->request(&context_, &stream_, cq, tag);
    });
  }
  void Started() override {
    reactor_ =
        MakeBound<BidiOps<Request, Response>>(this, [this] { return method_->handler(&context_); });
    Bound();
  }
  void OnRead(bool ok) override { reactor_->OnReadDone(ok); }
  void OnWrite(bool ok) override { reactor_->OnWriteDone(ok); }
  void OnCancelled() override { reactor_->OnCancel(); }
  void OnAlarmFired() override { reactor_->OnAlarm(); }
  void OnAllDone() override { reactor_->OnDone(); }

  Method* const method_;
  grpc::ServerAsyncReaderWriter<Response, Request> stream_{&context_};
  BidiReactor<Request, Response>* reactor_ = nullptr;
};

template <typename Request, typename Response>
class UnaryCall final : public AsyncCall, public UnaryResponder {
 public:
  using RequestFn =
      std::function<void(grpc::ServerContext*, Request*, grpc::ServerAsyncResponseWriter<Response>*,
                         grpc::ServerCompletionQueue*, void*)>;
  // Answers through `responder` (now or later, from any thread); `request` and `response` live
  // until then.
  using Handler = std::function<void(grpc::ServerContext*, const Request*, Response*,
                                     UnaryResponder* responder)>;
  using Method = MethodOf<UnaryCall, RequestFn, Handler>;
  static void ArmNew(AsyncServer* server, Method* method) {
    (new UnaryCall(server, method))->Arm();
  }

  void Finish(const grpc::Status& status) override {
    Began();
    GrpcFinish(&responder_, response_, status);
  }

 private:
  UnaryCall(AsyncServer* server, Method* method)
      : AsyncCall(server, method, /*closed=*/true), method_(method) {}
  void Arm() {
    RequestCall([this](grpc::ServerCompletionQueue* cq, void* tag) {
      method_->request(&context_, &request_, &responder_, cq, tag);
    });
  }
  void Started() override {
    method_->handler(&context_, &request_, &response_, this);
    Bound();
  }

  Method* const method_;
  Request request_;
  Response response_;
  grpc::ServerAsyncResponseWriter<Response> responder_{&context_};
};

}  // namespace internal

// The async methods of one grpc::Server, served on a completion queue of their own by `threads`
// threads ("kvmid-grpc-N"). Register the methods before the server starts, Start after it
// started, Stop after it shut down. Reactions must not block: they share these threads.
class AsyncServer {
 public:
  // Adds the completion queue to `builder`.
  AsyncServer(grpc::ServerBuilder* builder, int threads);
  ~AsyncServer();  // Stop()
  AsyncServer(const AsyncServer&) = delete;
  AsyncServer& operator=(const AsyncServer&) = delete;

  // `request` is the generated AsyncService's Request<Method> (bound to the service), `handler`
  // what the callback service's method did.
  template <typename Request, typename Response>
  void ServerStreaming(typename internal::ServerStreamingCall<Request, Response>::RequestFn request,
                       typename internal::ServerStreamingCall<Request, Response>::Handler handler) {
    Add(std::make_unique<typename internal::ServerStreamingCall<Request, Response>::Method>(
        std::move(request), std::move(handler)));
  }
  template <typename Request, typename Response>
  void ClientStreaming(typename internal::ClientStreamingCall<Request, Response>::RequestFn request,
                       typename internal::ClientStreamingCall<Request, Response>::Handler handler) {
    Add(std::make_unique<typename internal::ClientStreamingCall<Request, Response>::Method>(
        std::move(request), std::move(handler)));
  }
  template <typename Request, typename Response>
  void BidiStreaming(typename internal::BidiStreamingCall<Request, Response>::RequestFn request,
                     typename internal::BidiStreamingCall<Request, Response>::Handler handler) {
    Add(std::make_unique<typename internal::BidiStreamingCall<Request, Response>::Method>(
        std::move(request), std::move(handler)));
  }
  template <typename Request, typename Response>
  void Unary(typename internal::UnaryCall<Request, Response>::RequestFn request,
             typename internal::UnaryCall<Request, Response>::Handler handler) {
    Add(std::make_unique<typename internal::UnaryCall<Request, Response>::Method>(
        std::move(request), std::move(handler)));
  }

  // After the server started: arms every method and starts the threads.
  void Start();
  // After grpc::Server::Shutdown returned (which cancelled every call): waits for the calls'
  // reactors to finish (as long as it takes, logging every kStopReport), then shuts the queue down
  // and joins its threads. Idempotent.
  void Stop();
  static constexpr std::chrono::seconds kStopReport{5};
  // Calls armed or in progress.
  size_t live_calls() const;

 private:
  friend class internal::AsyncCall;
  void Add(std::unique_ptr<internal::AsyncMethod> method);
  // A call of `method` started: the next one is armed unless the server is stopping.
  void Rearm(internal::AsyncMethod* method);
  void CallCreated();
  void CallDeleted();
  void Run();

  std::unique_ptr<grpc::ServerCompletionQueue> cq_;
  const int threads_;
  std::vector<std::unique_ptr<internal::AsyncMethod>> methods_;
  std::vector<std::thread> runners_;
  // Held while a call is armed, so that none is armed once Stop began (arming creates a call:
  // calls_mu_ is taken inside it).
  Mutex mu_;
  bool started_ ABSL_GUARDED_BY(mu_) = false;
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  bool stopped_ ABSL_GUARDED_BY(mu_) = false;
  mutable Mutex calls_mu_ ABSL_ACQUIRED_AFTER(mu_);
  CondVar calls_cv_;
  size_t live_calls_ ABSL_GUARDED_BY(calls_mu_) = 0;
};

}  // namespace kvmid::api

#endif  // KVMID_DAEMON_API_ASYNC_REACTOR_H_
