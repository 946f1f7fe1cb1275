// How fast gRPC's three C++ server APIs answer one bidirectional-stream message on this host,
// with the same synchronous client: the sync API (a thread blocked in Read), the callback API
// (reactions; what kvmid's Attach uses) and the async API (a thread polling its completion
// queue). Run three times: alone; beside callback-API services only (grpc.health.v1, which is on
// the callback API in gRPC 1.51, and a callback unary service); beside synchronous services only
// (reflection and a sync unary service, no health). gRPC serves the callback API from one
// process-wide completion queue whose own "nexting" threads poll the same epoll set as every
// other poller. Explains the design notes on Attach in docs/PERFORMANCE.md.
//
//   bazel run -c opt //tests/bench:grpc_flavors_bench -- --seconds=3
#include <absl/flags/flag.h>
#include <absl/flags/parse.h>
#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/grpcpp.h>
#include <stdlib.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <thread>
#include <vector>

#include "common/program.h"
#include "tests/bench/echo.grpc.pb.h"
#include "tests/bench/echo_client.h"

ABSL_FLAG(double, seconds, 3.0, "measurement window per server");

namespace {

using kvmid::bench::Echo;
using kvmid::bench::EchoMessage;

class SyncEcho final : public Echo::Service {
  grpc::Status Chat(grpc::ServerContext*,
                    grpc::ServerReaderWriter<EchoMessage, EchoMessage>* stream) override {
    EchoMessage m;
    while (stream->Read(&m)) {
      if (!stream->Write(m)) break;
    }
    return grpc::Status::OK;
  }
};

class CallbackEcho final : public Echo::CallbackService {
  class Reactor : public grpc::ServerBidiReactor<EchoMessage, EchoMessage> {
   public:
    Reactor() { StartRead(&message_); }
    void OnReadDone(bool ok) override { ok ? StartWrite(&message_) : Finish(grpc::Status::OK); }
    void OnWriteDone(bool ok) override { ok ? StartRead(&message_) : Finish(grpc::Status::OK); }
    void OnDone() override { delete this; }

   private:
    EchoMessage message_;
  };
  grpc::ServerBidiReactor<EchoMessage, EchoMessage>* Chat(grpc::CallbackServerContext*) override {
    return new Reactor;
  }
};

// One stream at a time, served by one thread polling the queue: accept, then read/write turns.
void ServeAsync(Echo::AsyncService* service, grpc::ServerCompletionQueue* cq) {
  enum Tag : intptr_t { kAccepted = 1, kRead, kWritten, kFinished };
  grpc::ServerContext context;
  grpc::ServerAsyncReaderWriter<EchoMessage, EchoMessage> stream(&context);
  EchoMessage message;
  service->RequestChat(&context, &stream, cq, cq, reinterpret_cast<void*>(kAccepted));
  void* tag;
  bool ok;
  while (cq->Next(&tag, &ok)) {
    switch (reinterpret_cast<intptr_t>(tag)) {
      case kAccepted:
      case kWritten:
        if (ok) stream.Read(&message, reinterpret_cast<void*>(kRead));
        break;
      case kRead:
        if (ok) {
          stream.Write(message, reinterpret_cast<void*>(kWritten));
        } else {
          stream.Finish(grpc::Status::OK, reinterpret_cast<void*>(kFinished));
        }
        break;
      default:
        break;
    }
  }
}

// A unary service on the callback API (kvmid's unary RPCs, grpc.health.v1 in gRPC 1.51).
class CallbackSide final : public kvmid::bench::Side::CallbackService {
  grpc::ServerUnaryReactor* Ping(grpc::CallbackServerContext* context, const EchoMessage* request,
                                 EchoMessage* response) override {
    *response = *request;
    auto* reactor = context->DefaultReactor();
    reactor->Finish(grpc::Status::OK);
    return reactor;
  }
};

// The same unary service on the synchronous API (kvmid's unary RPCs before issue 14).
class SyncSide final : public kvmid::bench::Side::Service {
  grpc::Status Ping(grpc::ServerContext*, const EchoMessage* request,
                    EchoMessage* response) override {
    *response = *request;
    return grpc::Status::OK;
  }
};

enum class Beside { kNothing, kCallback, kSync };

double MeasureP50(const std::string& target, double seconds) {
  std::vector<double> rtts = kvmid::bench::EchoRoundTrips(target, seconds);
  if (rtts.empty()) return 0;
  std::sort(rtts.begin(), rtts.end());
  return rtts[rtts.size() / 2];
}

enum class Flavor { kSync, kCallback, kAsync };

double Measure(Flavor flavor, const std::string& socket, double seconds, Beside beside) {
  CallbackSide callback_side;
  SyncSide sync_side;
  SyncEcho sync_service;
  CallbackEcho callback_service;
  Echo::AsyncService async_service;
  grpc::ServerBuilder builder;
  builder.AddListeningPort("unix:" + socket, grpc::InsecureServerCredentials());
  std::unique_ptr<grpc::ServerCompletionQueue> cq;
  switch (flavor) {
    case Flavor::kSync:
      builder.RegisterService(&sync_service);
      break;
    case Flavor::kCallback:
      builder.RegisterService(&callback_service);
      break;
    case Flavor::kAsync:
      builder.RegisterService(&async_service);
      cq = builder.AddCompletionQueue();
      break;
  }
  if (beside == Beside::kCallback) builder.RegisterService(&callback_side);
  if (beside == Beside::kSync) builder.RegisterService(&sync_side);
  auto server = builder.BuildAndStart();
  std::thread async_thread;
  if (cq) async_thread = std::thread(ServeAsync, &async_service, cq.get());
  double p50 = MeasureP50("unix:" + socket, seconds);
  server->Shutdown();
  if (cq) {
    cq->Shutdown();
    async_thread.join();
  }
  ::unlink(socket.c_str());
  return p50;
}

}  // namespace

int main(int argc, char** argv) {
  kvmid::UseReleaseAbslMutexes();  // as kvmid's main (common/program.h)
  absl::ParseCommandLine(argc, argv);
  double seconds = absl::GetFlag(FLAGS_seconds);
  char dir_template[] = "/tmp/kvmid-flavors-XXXXXX";
  std::string dir = mkdtemp(dir_template);
  std::string socket = dir + "/echo.sock";
  double alone[3], beside_callback[3], beside_sync[3];
  for (int f = 0; f < 3; ++f) {
    alone[f] = Measure(static_cast<Flavor>(f), socket, seconds, Beside::kNothing);
  }
  // Beside callback services only: grpc.health.v1 (callback API in gRPC 1.51) and a callback
  // unary service. gRPC serves the callback API from a process-wide completion queue with
  // threads of its own that poll the same epoll set.
  grpc::EnableDefaultHealthCheckService(true);
  for (int f = 0; f < 3; ++f) {
    beside_callback[f] = Measure(static_cast<Flavor>(f), socket, seconds, Beside::kCallback);
  }
  // Beside synchronous services only: reflection (Debian's plugin: synchronous; it stays on
  // for every later server in the process) and a synchronous unary service; no health.
  grpc::EnableDefaultHealthCheckService(false);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  for (int f = 0; f < 3; ++f) {
    beside_sync[f] = Measure(static_cast<Flavor>(f), socket, seconds, Beside::kSync);
  }
  ::rmdir(dir.c_str());

  const char* names[3] = {"sync (thread blocked in Read)", "callback (reactor)",
                          "async (own completion-queue thread)"};
  std::printf(
      "\n| server API, echo over unix | p50 alone (us) | p50 beside callback services: health, "
      "a unary (us) | p50 beside sync services: reflection, a unary (us) |\n");
  std::printf("|---|---:|---:|---:|\n");
  for (int f = 0; f < 3; ++f) {
    std::printf("| %s | %.1f | %.1f | %.1f |\n", names[f], alone[f], beside_callback[f],
                beside_sync[f]);
  }
  return 0;
}
