// The interceptor on a real gRPC server (the standard health service as the API): every
// finished call is counted by method and status code, with no change to the handlers.
#include "daemon/metrics/api_interceptor.h"

#include <gmock/gmock.h>
#include <grpcpp/generic/async_generic_service.h>
#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/health_check_service_interface.h>
#include <gtest/gtest.h>

#include <condition_variable>
#include <mutex>
#include <utility>

#include "daemon/metrics/hooks.h"

namespace kvmid {
namespace {

constexpr char kCheck[] = "grpc.health.v1.Health/Check";

uint64_t Calls(const std::string& method, grpc::StatusCode code) {
  for (const Metrics::ApiCallCount& c : Metrics::Read().api_calls) {
    if (c.method == method && c.code == code) return c.count;
  }
  return 0;
}

// grpc.health.v1.HealthCheckRequest { service = 1 } encoded by hand: the test needs no health
// proto stubs, only the wire.
grpc::ByteBuffer HealthRequest(const std::string& service) {
  std::string wire;
  wire.push_back(0x0a);
  wire.push_back(static_cast<char>(service.size()));
  wire += service;
  grpc::Slice slice(wire);
  return grpc::ByteBuffer(&slice, 1);
}

grpc::Status Call(grpc::GenericStub* stub, const std::string& method, const std::string& service) {
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
  grpc::ByteBuffer request = HealthRequest(service);
  grpc::ByteBuffer response;
  grpc::Status status;
  std::mutex mu;
  std::condition_variable cv;
  bool done = false;
  stub->UnaryCall(&context, method, grpc::StubOptions(), &request, &response, [&](grpc::Status s) {
    std::lock_guard<std::mutex> lock(mu);
    status = std::move(s);
    done = true;
    cv.notify_all();
  });
  std::unique_lock<std::mutex> lock(mu);
  cv.wait(lock, [&] { return done; });
  return status;
}

// Answers every other method with ABORTED.
class AbortingService : public grpc::CallbackGenericService {
 public:
  grpc::ServerGenericBidiReactor* CreateReactor(grpc::GenericCallbackServerContext*) override {
    class Reactor : public grpc::ServerGenericBidiReactor {
     public:
      Reactor() { Finish(grpc::Status(grpc::StatusCode::ABORTED, "always")); }
      void OnDone() override { delete this; }
    };
    return new Reactor();
  }
};

grpc::Status Check(grpc::GenericStub* stub, const std::string& service) {
  return Call(stub, std::string("/") + kCheck, service);
}

TEST(ApiInterceptorTest, CountsCallsByMethodAndCode) {
  grpc::EnableDefaultHealthCheckService(true);
  AbortingService aborting;
  grpc::ServerBuilder builder;
  builder.RegisterCallbackGenericService(&aborting);
  int port = 0;
  builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
  builder.experimental().SetInterceptorCreators(ApiMetricsInterceptors());
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  ASSERT_NE(server, nullptr);
  server->GetHealthCheckService()->SetServingStatus("known", true);

  const uint64_t ok_before = Calls(kCheck, grpc::StatusCode::OK);
  const uint64_t not_found_before = Calls(kCheck, grpc::StatusCode::NOT_FOUND);
  const uint64_t aborted_before = Calls("test.Other/Call", grpc::StatusCode::ABORTED);
  auto channel =
      grpc::CreateChannel("127.0.0.1:" + std::to_string(port), grpc::InsecureChannelCredentials());
  grpc::GenericStub stub(channel);
  EXPECT_TRUE(Check(&stub, "").ok());
  EXPECT_TRUE(Check(&stub, "known").ok());
  EXPECT_EQ(Check(&stub, "unknown").error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_EQ(Call(&stub, "/test.Other/Call", "").error_code(), grpc::StatusCode::ABORTED);

  server->Shutdown();
  EXPECT_EQ(Calls(kCheck, grpc::StatusCode::OK) - ok_before, 2u);
  EXPECT_EQ(Calls(kCheck, grpc::StatusCode::NOT_FOUND) - not_found_before, 1u);
  EXPECT_EQ(Calls("test.Other/Call", grpc::StatusCode::ABORTED) - aborted_before, 1u);
}

}  // namespace
}  // namespace kvmid
