// api::AsyncServer and its reactors on a real gRPC server over a UNIX socket, with the stock
// client: every call kind, the callback API's rules (OnCancel before OnDone, OnDone once and
// last, operations from other threads, completions before the handler returned), shutdown with
// calls open, and a reactor created outside its handler.
#include "daemon/api/async_reactor.h"

#include <grpcpp/support/server_interceptor.h>
#include <gtest/gtest.h>
#include <stdlib.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "proto/kvmi/v1/introspection.grpc.pb.h"

namespace kvmid::api {
namespace {

namespace v1 = kvmi::v1;
using std::chrono::milliseconds;

// What the reactors tell the test.
struct Counters {
  std::atomic<int> cancelled{0};
  std::atomic<int> done{0};
  std::atomic<int> reads{0};
  std::atomic<int> alarms{0};
  std::atomic<int> alarms_at_done{-1};  // alarms when OnDone ran
  std::atomic<int> alarm_ms{0};         // how long after StartAlarm OnAlarm ran
  // Echo's call ends on a thread of its own (KeepCallAfterDone), as Attach's does.
  std::atomic<bool> echo_ends_elsewhere{false};
};

// Every call's context holds one of these: it counts the contexts destroyed, each after a pause
// (the context's destructor runs it, on whatever thread deletes the call).
struct ContextEnds {
  std::atomic<int> begun{0};
  std::atomic<int> ended{0};
  std::atomic<int> pause_ms{0};
};

class ContextEndCounter final : public grpc::experimental::Interceptor {
 public:
  explicit ContextEndCounter(ContextEnds* ends) : ends_(ends) { ++ends_->begun; }
  ~ContextEndCounter() override {
    std::this_thread::sleep_for(milliseconds(ends_->pause_ms.load()));
    ++ends_->ended;
  }
  void Intercept(grpc::experimental::InterceptorBatchMethods* methods) override {
    methods->Proceed();
  }

 private:
  ContextEnds* const ends_;
};

class ContextEndCounterFactory final
    : public grpc::experimental::ServerInterceptorFactoryInterface {
 public:
  explicit ContextEndCounterFactory(ContextEnds* ends) : ends_(ends) {}
  grpc::experimental::Interceptor* CreateServerInterceptor(
      grpc::experimental::ServerRpcInfo* /*info*/) override {
    return new ContextEndCounter(ends_);
  }

 private:
  ContextEnds* const ends_;
};

bool WaitUntil(const std::function<bool()>& predicate, milliseconds timeout = milliseconds(5000)) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  while (!predicate()) {
    if (std::chrono::steady_clock::now() > deadline) return false;
    std::this_thread::sleep_for(milliseconds(1));
  }
  return true;
}

// StreamEvents: writes `count` events (ids 1..count), from another thread when asked, then OK; a
// negative count writes nothing and waits for its cancellation (then finishes CANCELLED).
class Writer final : public WriteReactor<v1::StreamEventsResponse> {
 public:
  Writer(Counters* counters, int count, bool from_thread)
      : counters_(counters), count_(count), from_thread_(from_thread) {
    if (count_ == 0) {
      Finish(grpc::Status(grpc::StatusCode::FAILED_PRECONDITION, "refused in the constructor"));
    } else if (count_ > 0) {
      Next();
    }
  }
  void OnWriteDone(bool ok) override {
    if (!ok) return Finish(grpc::Status::CANCELLED);
    if (sent_ == count_) return Finish(grpc::Status::OK);
    Next();
  }
  void OnCancel() override {
    ++counters_->cancelled;
    if (count_ < 0) Finish(grpc::Status::CANCELLED);
  }
  void OnDone() override {
    ++counters_->done;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (thread_.joinable()) thread_.join();
    }
    delete this;
  }

 private:
  void Next() {
    message_.mutable_event()->set_id(++sent_);
    if (!from_thread_) return StartWrite(&message_);
    // The write may complete (and the next Next run) before this assignment is over.
    std::lock_guard<std::mutex> lock(mu_);
    if (thread_.joinable()) thread_.join();
    thread_ = std::thread([this] { StartWrite(&message_); });
  }
  Counters* const counters_;
  const int count_;
  const bool from_thread_;
  int sent_ = 0;
  v1::StreamEventsResponse message_;
  std::mutex mu_;
  std::thread thread_;
};

// Attach as an echo: every Command comes back as a CommandResult with its id, written by a
// thread of its own while the next read is in flight; half-close ends the call OK once no write
// is in flight. Command ids from kWriteThenRead: the result is written with StartWriteThenRead
// (no read in flight until then). From kAfterAlarm: no result; an alarm of kAlarm, with the next
// read in flight meanwhile (a half-close then finishes the call before the alarm fires).
constexpr uint64_t kWriteThenRead = 1000;
constexpr uint64_t kAfterAlarm = 2000;
constexpr auto kAlarm = std::chrono::milliseconds(20);

class Echo final : public BidiReactor<v1::AttachRequest, v1::AttachResponse> {
 public:
  explicit Echo(Counters* counters) : counters_(counters) { StartRead(&request_); }
  void OnReadDone(bool ok) override {
    std::lock_guard<std::mutex> lock(mu_);
    if (!ok) {
      half_closed_ = true;
      if (writes_ == 0) Finish(grpc::Status::OK);
      return;
    }
    ++counters_->reads;
    const uint64_t id = request_.command().id();
    if (id >= kAfterAlarm) {
      alarm_set_ = std::chrono::steady_clock::now();
      StartAlarm(kAlarm);
      StartRead(&request_);
      return;
    }
    ++writes_;
    if (id >= kWriteThenRead) {
      response_.mutable_command_result()->set_id(id);
      StartWriteThenRead(&response_, &request_);
      return;
    }
    if (thread_.joinable()) thread_.join();
    thread_ = std::thread([this, id] {
      response_.mutable_command_result()->set_id(id);
      StartWrite(&response_);
    });
  }
  void OnWriteDone(bool ok) override {
    std::lock_guard<std::mutex> lock(mu_);
    --writes_;
    if (!ok) return;
    if (half_closed_) {
      if (writes_ == 0) Finish(grpc::Status::OK);
    } else if (response_.command_result().id() < kWriteThenRead) {
      StartRead(&request_);  // the next command once this one was answered
    }
  }
  void OnAlarm() override {
    std::lock_guard<std::mutex> lock(mu_);
    counters_->alarm_ms = static_cast<int>(std::chrono::duration_cast<std::chrono::milliseconds>(
                                               std::chrono::steady_clock::now() - alarm_set_)
                                               .count());
    ++counters_->alarms;
  }
  void OnCancel() override { ++counters_->cancelled; }
  void OnDone() override {
    counters_->alarms_at_done = counters_->alarms.load();
    ++counters_->done;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (thread_.joinable()) thread_.join();
    }
    if (counters_->echo_ends_elsewhere) std::thread(KeepCallAfterDone()).detach();
    delete this;
  }

 private:
  Counters* const counters_;
  v1::AttachRequest request_;
  v1::AttachResponse response_;
  std::mutex mu_;
  int writes_ = 0;  // in flight
  bool half_closed_ = false;
  std::chrono::steady_clock::time_point alarm_set_;
  std::thread thread_;
};

// WritePhysicalStream: sums the sizes of the messages into bytes_written.
class Summer final : public ReadReactor<v1::WritePhysicalStreamRequest> {
 public:
  Summer(Counters* counters, v1::WritePhysicalStreamResponse* response)
      : counters_(counters), response_(response) {
    StartRead(&request_);
  }
  void OnReadDone(bool ok) override {
    if (!ok) return Finish(grpc::Status::OK);
    ++counters_->reads;
    response_->set_bytes_written(response_->bytes_written() + request_.size());
    StartRead(&request_);
  }
  void OnCancel() override { ++counters_->cancelled; }
  void OnDone() override {
    ++counters_->done;
    delete this;
  }

 private:
  Counters* const counters_;
  v1::WritePhysicalStreamResponse* const response_;
  v1::WritePhysicalStreamRequest request_;
};

class Service final
    : public v1::Introspection::WithAsyncMethod_StreamEvents<
          v1::Introspection::WithAsyncMethod_Attach<
              v1::Introspection::WithAsyncMethod_WritePhysicalStream<
                  v1::Introspection::WithAsyncMethod_ApplyPolicy<v1::Introspection::Service>>>> {
 public:
  void Serve(AsyncServer* async, Counters* counters) {
    async->ServerStreaming<v1::StreamEventsRequest, v1::StreamEventsResponse>(
        [this](grpc::ServerContext* ctx, v1::StreamEventsRequest* request,
               grpc::ServerAsyncWriter<v1::StreamEventsResponse>* writer,
               grpc::ServerCompletionQueue* cq,
               void* tag) { RequestStreamEvents(ctx, request, writer, cq, cq, tag); },
        [counters](grpc::ServerContext*, const v1::StreamEventsRequest* request) {
          // max_queue: how many events; resume_after 1: written from another thread.
          return new Writer(counters, static_cast<int>(request->max_queue()) - 1,
                            request->resume_after() == 1);
        });
    async->BidiStreaming<v1::AttachRequest, v1::AttachResponse>(
        [this](grpc::ServerContext* ctx,
               grpc::ServerAsyncReaderWriter<v1::AttachResponse, v1::AttachRequest>* stream,
               grpc::ServerCompletionQueue* cq,
               void* tag) { RequestAttach(ctx, stream, cq, cq, tag); },
        [counters](grpc::ServerContext*) { return new Echo(counters); });
    async->ClientStreaming<v1::WritePhysicalStreamRequest, v1::WritePhysicalStreamResponse>(
        [this](grpc::ServerContext* ctx,
               grpc::ServerAsyncReader<v1::WritePhysicalStreamResponse,
                                       v1::WritePhysicalStreamRequest>* reader,
               grpc::ServerCompletionQueue* cq,
               void* tag) { RequestWritePhysicalStream(ctx, reader, cq, cq, tag); },
        [counters](grpc::ServerContext*, v1::WritePhysicalStreamResponse* response) {
          return new Summer(counters, response);
        });
    // ApplyPolicy: answered 20 ms later from another thread; a policy named "refuse" is refused.
    async->Unary<v1::ApplyPolicyRequest, v1::ApplyPolicyResponse>(
        [this](grpc::ServerContext* ctx, v1::ApplyPolicyRequest* request,
               grpc::ServerAsyncResponseWriter<v1::ApplyPolicyResponse>* responder,
               grpc::ServerCompletionQueue* cq,
               void* tag) { RequestApplyPolicy(ctx, request, responder, cq, cq, tag); },
        [](grpc::ServerContext*, const v1::ApplyPolicyRequest* request,
           v1::ApplyPolicyResponse* response, UnaryResponder* responder) {
          const bool refuse = request->policy().name() == "refuse";
          response->set_etag("e-" + request->policy().name());
          std::thread([responder, refuse] {
            std::this_thread::sleep_for(milliseconds(20));
            responder->Finish(refuse ? grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED, "no")
                                     : grpc::Status::OK);
          }).detach();
        });
  }
};

class AsyncReactorTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char dir[] = "/tmp/async_reactor_test.XXXXXX";  // short: a UNIX socket path is < 108 bytes
    ASSERT_NE(mkdtemp(dir), nullptr);
    dir_ = dir;
    socket_ = dir_ + "/api.sock";
    grpc::ServerBuilder builder;
    builder.AddListeningPort("unix:" + socket_, grpc::InsecureServerCredentials());
    builder.RegisterService(&service_);
    std::vector<std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface>> factories;
    factories.push_back(std::make_unique<ContextEndCounterFactory>(&context_ends_));
    builder.experimental().SetInterceptorCreators(std::move(factories));
    async_ = std::make_unique<AsyncServer>(&builder, 2);
    service_.Serve(async_.get(), &counters_);
    server_ = builder.BuildAndStart();
    ASSERT_NE(server_, nullptr);
    async_->Start();
    stub_ = v1::Introspection::NewStub(
        grpc::CreateChannel("unix:" + socket_, grpc::InsecureChannelCredentials()));
  }
  void TearDown() override {
    StopServer();
    unlink(socket_.c_str());
    rmdir(dir_.c_str());
  }
  void StopServer() {
    if (server_ == nullptr) return;
    server_->Shutdown(std::chrono::system_clock::now() + milliseconds(200));
    async_->Stop();
    server_.reset();
  }
  // One call armed per method (4) while idle.
  static constexpr size_t kArmed = 4;

  std::string dir_;
  std::string socket_;
  Counters counters_;
  ContextEnds context_ends_;
  Service service_;
  std::unique_ptr<AsyncServer> async_;
  std::unique_ptr<grpc::Server> server_;
  std::unique_ptr<v1::Introspection::Stub> stub_;
};

std::vector<uint64_t> ReadAll(grpc::ClientReader<v1::StreamEventsResponse>* reader) {
  std::vector<uint64_t> ids;
  v1::StreamEventsResponse message;
  while (reader->Read(&message)) ids.push_back(message.event().id());
  return ids;
}

TEST_F(AsyncReactorTest, ServerStreamingWritesInOrderThenFinishes) {
  for (bool from_thread : {false, true}) {
    grpc::ClientContext ctx;
    v1::StreamEventsRequest request;
    request.set_max_queue(1 + 50);
    request.set_resume_after(from_thread ? 1 : 0);
    auto reader = stub_->StreamEvents(&ctx, request);
    std::vector<uint64_t> ids = ReadAll(reader.get());
    ASSERT_EQ(ids.size(), 50u) << "from_thread=" << from_thread;
    for (size_t i = 0; i < ids.size(); ++i) EXPECT_EQ(ids[i], i + 1);
    EXPECT_TRUE(reader->Finish().ok());
  }
  EXPECT_TRUE(WaitUntil([&] { return counters_.done == 2; }));
  EXPECT_EQ(counters_.cancelled, 0);
  EXPECT_TRUE(WaitUntil([&] { return async_->live_calls() == kArmed; }));
}

TEST_F(AsyncReactorTest, FinishInTheConstructor) {
  grpc::ClientContext ctx;
  v1::StreamEventsRequest request;
  request.set_max_queue(1);  // 0 events: refused in the constructor
  auto reader = stub_->StreamEvents(&ctx, request);
  EXPECT_TRUE(ReadAll(reader.get()).empty());
  grpc::Status status = reader->Finish();
  EXPECT_EQ(status.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_EQ(status.error_message(), "refused in the constructor");
  EXPECT_TRUE(WaitUntil([&] { return counters_.done == 1; }));
}

TEST_F(AsyncReactorTest, ClientCancelsAStreamThatNeverWrites) {
  grpc::ClientContext ctx;
  v1::StreamEventsRequest request;  // max_queue 0: never writes
  auto reader = stub_->StreamEvents(&ctx, request);
  ASSERT_TRUE(WaitUntil([&] { return async_->live_calls() == kArmed + 1; }));
  ctx.TryCancel();
  EXPECT_EQ(reader->Finish().error_code(), grpc::StatusCode::CANCELLED);
  EXPECT_TRUE(WaitUntil([&] { return counters_.done == 1; }));
  EXPECT_EQ(counters_.cancelled, 1);
  EXPECT_TRUE(WaitUntil([&] { return async_->live_calls() == kArmed; }));
}

// Sends commands `first`..`last` on an Attach stream served by Echo, each after the last one's
// result came back with its id.
void EchoCommands(grpc::ClientReaderWriter<v1::AttachRequest, v1::AttachResponse>* stream,
                  uint64_t first, uint64_t last) {
  for (uint64_t id = first; id <= last; ++id) {
    v1::AttachRequest request;
    request.mutable_command()->set_id(id);
    ASSERT_TRUE(stream->Write(request));
    v1::AttachResponse response;
    ASSERT_TRUE(stream->Read(&response));
    EXPECT_EQ(response.command_result().id(), id);
  }
}

TEST_F(AsyncReactorTest, BidiEchoWithWritesFromAnotherThread) {
  grpc::ClientContext ctx;
  auto stream = stub_->Attach(&ctx);
  EchoCommands(stream.get(), 1, 100);
  ASSERT_TRUE(stream->WritesDone());
  EXPECT_TRUE(stream->Finish().ok());
  EXPECT_TRUE(WaitUntil([&] { return counters_.done == 1; }));
  EXPECT_EQ(counters_.reads, 100);
  EXPECT_EQ(counters_.cancelled, 0);
}

// StartWriteThenRead: the read it starts takes the next message. An alarm runs OnAlarm once, not
// before its time, and the call does not end before it: the client half-closes and the stream
// finishes while the alarm is pending, OnDone comes after OnAlarm.
TEST_F(AsyncReactorTest, WriteThenReadAndAnAlarm) {
  grpc::ClientContext ctx;
  auto stream = stub_->Attach(&ctx);
  EchoCommands(stream.get(), kWriteThenRead + 1, kWriteThenRead + 20);
  v1::AttachRequest request;
  request.mutable_command()->set_id(kAfterAlarm + 1);
  ASSERT_TRUE(stream->Write(request));
  ASSERT_TRUE(stream->WritesDone());
  v1::AttachResponse response;
  EXPECT_FALSE(stream->Read(&response));
  EXPECT_TRUE(stream->Finish().ok());
  EXPECT_TRUE(WaitUntil([&] { return counters_.done == 1; }));
  EXPECT_EQ(counters_.alarms_at_done, 1);
  EXPECT_GE(counters_.alarm_ms, kAlarm.count());
  EXPECT_EQ(counters_.reads, 21);
}

TEST_F(AsyncReactorTest, ClientStreamingFinishesWithTheResponse) {
  grpc::ClientContext ctx;
  v1::WritePhysicalStreamResponse response;
  auto writer = stub_->WritePhysicalStream(&ctx, &response);
  for (uint64_t size = 1; size <= 10; ++size) {
    v1::WritePhysicalStreamRequest request;
    request.set_size(size);
    ASSERT_TRUE(writer->Write(request));
  }
  ASSERT_TRUE(writer->WritesDone());
  ASSERT_TRUE(writer->Finish().ok());
  EXPECT_EQ(response.bytes_written(), 55u);
  EXPECT_TRUE(WaitUntil([&] { return counters_.done == 1; }));
}

TEST_F(AsyncReactorTest, UnaryAnsweredLaterFromAnotherThread) {
  for (const std::string name : {"p1", "refuse"}) {
    grpc::ClientContext ctx;
    v1::ApplyPolicyRequest request;
    request.mutable_policy()->set_name(name);
    v1::ApplyPolicyResponse response;
    grpc::Status status = stub_->ApplyPolicy(&ctx, request, &response);
    if (name == "refuse") {
      EXPECT_EQ(status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
    } else {
      ASSERT_TRUE(status.ok()) << status.error_message();
      EXPECT_EQ(response.etag(), "e-p1");
    }
  }
  EXPECT_TRUE(WaitUntil([&] { return async_->live_calls() == kArmed; }));
}

TEST_F(AsyncReactorTest, ShutdownEndsOpenCallsAndStops) {
  // Three calls that would never end by themselves.
  grpc::ClientContext events_ctx;
  auto events = stub_->StreamEvents(&events_ctx, v1::StreamEventsRequest());
  grpc::ClientContext attach_ctx;
  auto attach = stub_->Attach(&attach_ctx);
  grpc::ClientContext write_ctx;
  v1::WritePhysicalStreamResponse response;
  auto writer = stub_->WritePhysicalStream(&write_ctx, &response);
  ASSERT_TRUE(WaitUntil([&] { return async_->live_calls() == kArmed + 3; }))
      << async_->live_calls() << " calls";
  StopServer();  // returns: every reactor finished and was done
  EXPECT_EQ(counters_.done, 3);
  EXPECT_EQ(counters_.cancelled, 3);
  EXPECT_EQ(async_->live_calls(), 0u);
  EXPECT_FALSE(events->Finish().ok());
  EXPECT_FALSE(attach->Finish().ok());
}

// A call deleted off the queue's threads (KeepCallAfterDone) counts as live until its context,
// and the interceptors the context runs in its destructor, are gone: nothing of a call outlives
// Stop, which is what lets the server's owner free what those interceptors use.
TEST_F(AsyncReactorTest, StopWaitsForTheContextOfACallEndedOnAnotherThread) {
  counters_.echo_ends_elsewhere = true;
  context_ends_.pause_ms = 200;
  grpc::ClientContext ctx;
  auto stream = stub_->Attach(&ctx);
  v1::AttachRequest request;
  request.mutable_command()->set_id(1);
  ASSERT_TRUE(stream->Write(request));
  v1::AttachResponse response;
  ASSERT_TRUE(stream->Read(&response));
  StopServer();  // ends the open Attach; Echo deletes its call on a thread of its own
  EXPECT_EQ(counters_.done, 1);
  EXPECT_GE(context_ends_.begun, 1);
  EXPECT_EQ(context_ends_.ended.load(), context_ends_.begun.load());
  EXPECT_EQ(async_->live_calls(), 0u);
  stream->Finish();
}

TEST_F(AsyncReactorTest, ManyConcurrentStreams) {
  constexpr int kStreams = 32;
  std::vector<std::thread> clients;
  std::atomic<int> good{0};
  clients.reserve(kStreams);
  for (int i = 0; i < kStreams; ++i) {
    clients.emplace_back([&, i] {
      grpc::ClientContext ctx;
      v1::StreamEventsRequest request;
      request.set_max_queue(1 + 20);
      request.set_resume_after(i % 2);
      auto reader = stub_->StreamEvents(&ctx, request);
      if (ReadAll(reader.get()).size() == 20 && reader->Finish().ok()) ++good;
    });
  }
  for (std::thread& client : clients) client.join();
  EXPECT_EQ(good, kStreams);
  EXPECT_TRUE(WaitUntil([&] { return counters_.done == kStreams; }));
}

TEST(AsyncReactorDeathTest, ReactorOutsideItsHandlerAborts) {
  class Loose final : public WriteReactor<v1::StreamEventsResponse> {
   public:
    void OnDone() override {}
  };
  EXPECT_DEATH({ Loose loose; }, "outside its AsyncServer handler");
}

}  // namespace
}  // namespace kvmid::api
