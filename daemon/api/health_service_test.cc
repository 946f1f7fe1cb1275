// grpc.health.v1 as kvmid serves it (Check synchronous, Watch on the AsyncServer), over a real
// server with the generated client.
#include "daemon/api/health_service.h"

#include <gtest/gtest.h>
#include <stdlib.h>
#include <unistd.h>

#include <chrono>
#include <memory>
#include <string>
#include <thread>
#include <vector>

namespace kvmid::api {
namespace {

using grpc::health::v1::Health;
using grpc::health::v1::HealthCheckRequest;
using grpc::health::v1::HealthCheckResponse;

class HealthServiceTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char dir[] = "/tmp/health_service_test.XXXXXX";
    ASSERT_NE(mkdtemp(dir), nullptr);
    dir_ = dir;
    grpc::ServerBuilder builder;
    builder.AddListeningPort("unix:" + dir_ + "/api.sock", grpc::InsecureServerCredentials());
    builder.RegisterService(&health_);
    async_ = std::make_unique<AsyncServer>(&builder, 1);
    health_.ServeAsync(async_.get());
    server_ = builder.BuildAndStart();
    ASSERT_NE(server_, nullptr);
    async_->Start();
    stub_ = Health::NewStub(
        grpc::CreateChannel("unix:" + dir_ + "/api.sock", grpc::InsecureChannelCredentials()));
  }
  void TearDown() override {
    server_->Shutdown(std::chrono::system_clock::now() + std::chrono::milliseconds(200));
    async_->Stop();
    unlink((dir_ + "/api.sock").c_str());
    rmdir(dir_.c_str());
  }
  grpc::Status Check(const std::string& service, HealthCheckResponse* response) {
    grpc::ClientContext ctx;
    HealthCheckRequest request;
    request.set_service(service);
    return stub_->Check(&ctx, request, response);
  }

  std::string dir_;
  HealthService health_;
  std::unique_ptr<AsyncServer> async_;
  std::unique_ptr<grpc::Server> server_;
  std::unique_ptr<Health::Stub> stub_;
};

TEST_F(HealthServiceTest, CheckAnswersWhatWasSet) {
  HealthCheckResponse response;
  grpc::Status unknown = Check("", &response);
  EXPECT_EQ(unknown.error_code(), grpc::StatusCode::NOT_FOUND);
  health_.SetServing("", true);
  health_.SetServing("kvmi.v1.Introspection", false);
  ASSERT_TRUE(Check("", &response).ok());
  EXPECT_EQ(response.status(), HealthCheckResponse::SERVING);
  ASSERT_TRUE(Check("kvmi.v1.Introspection", &response).ok());
  EXPECT_EQ(response.status(), HealthCheckResponse::NOT_SERVING);
  health_.SetServing("kvmi.v1.Introspection", true);
  ASSERT_TRUE(Check("kvmi.v1.Introspection", &response).ok());
  EXPECT_EQ(response.status(), HealthCheckResponse::SERVING);
  health_.Shutdown();  // NOT_SERVING for every name, and for names set afterwards
  health_.SetServing("later", true);
  for (const char* name : {"", "kvmi.v1.Introspection", "later"}) {
    ASSERT_TRUE(Check(name, &response).ok()) << name;
    EXPECT_EQ(response.status(), HealthCheckResponse::NOT_SERVING) << name;
  }
}

TEST_F(HealthServiceTest, WatchFollowsChangesAndEndsWithTheServer) {
  health_.SetServing("svc", true);
  grpc::ClientContext ctx;
  HealthCheckRequest request;
  request.set_service("svc");
  auto reader = stub_->Watch(&ctx, request);
  HealthCheckResponse response;
  ASSERT_TRUE(reader->Read(&response));
  EXPECT_EQ(response.status(), HealthCheckResponse::SERVING);
  health_.SetServing("svc", false);
  ASSERT_TRUE(reader->Read(&response));
  EXPECT_EQ(response.status(), HealthCheckResponse::NOT_SERVING);
  health_.SetServing("other", true);  // not this watcher's name
  health_.SetServing("svc", true);
  ASSERT_TRUE(reader->Read(&response));
  EXPECT_EQ(response.status(), HealthCheckResponse::SERVING);
  health_.Shutdown();
  ASSERT_TRUE(reader->Read(&response));
  EXPECT_EQ(response.status(), HealthCheckResponse::NOT_SERVING);
  server_->Shutdown(std::chrono::system_clock::now());  // ends the watch
  EXPECT_FALSE(reader->Read(&response));
  EXPECT_FALSE(reader->Finish().ok());
}

TEST_F(HealthServiceTest, WatchOfAnUnknownNameWaitsForIt) {
  grpc::ClientContext ctx;
  HealthCheckRequest request;
  request.set_service("not-yet");
  auto reader = stub_->Watch(&ctx, request);
  HealthCheckResponse response;
  ASSERT_TRUE(reader->Read(&response));
  EXPECT_EQ(response.status(), HealthCheckResponse::SERVICE_UNKNOWN);
  health_.SetServing("not-yet", true);
  ASSERT_TRUE(reader->Read(&response));
  EXPECT_EQ(response.status(), HealthCheckResponse::SERVING);
  ctx.TryCancel();
  EXPECT_EQ(reader->Finish().error_code(), grpc::StatusCode::CANCELLED);
}

// EndWatches: every watcher reads what it was sent (here the shutdown's NOT_SERVING, written
// behind the SERVING changes still in flight), then its call ends with the status given; a Watch
// that starts afterwards gets its status and ends the same way.
TEST_F(HealthServiceTest, EndWatchesEndsEachWatchAfterItsLastStatus) {
  health_.SetServing("svc", true);
  constexpr int kWatchers = 6;
  std::vector<std::unique_ptr<grpc::ClientContext>> contexts;
  std::vector<std::unique_ptr<grpc::ClientReader<HealthCheckResponse>>> readers;
  HealthCheckRequest request;
  request.set_service("svc");
  for (int i = 0; i < kWatchers; ++i) {
    contexts.push_back(std::make_unique<grpc::ClientContext>());
    readers.push_back(stub_->Watch(contexts.back().get(), request));
    HealthCheckResponse first;
    ASSERT_TRUE(readers.back()->Read(&first));
  }
  // Changes racing the end, from another thread.
  std::thread flapping([&] {
    for (int i = 0; i < 50; ++i) health_.SetServing("svc", i % 2 == 0);
  });
  health_.Shutdown();
  const grpc::Status end(grpc::StatusCode::UNAVAILABLE, "going away");
  health_.EndWatches(end);
  flapping.join();
  for (auto& reader : readers) {
    HealthCheckResponse response, last;
    while (reader->Read(&response)) last = response;
    EXPECT_EQ(last.status(), HealthCheckResponse::NOT_SERVING);
    const grpc::Status ended = reader->Finish();
    EXPECT_EQ(ended.error_code(), grpc::StatusCode::UNAVAILABLE);
    EXPECT_EQ(ended.error_message(), "going away");
  }
  grpc::ClientContext late_ctx;
  auto late = stub_->Watch(&late_ctx, request);
  HealthCheckResponse response;
  ASSERT_TRUE(late->Read(&response));
  EXPECT_EQ(response.status(), HealthCheckResponse::NOT_SERVING);
  EXPECT_FALSE(late->Read(&response));
  EXPECT_EQ(late->Finish().error_message(), "going away");
}

}  // namespace
}  // namespace kvmid::api
