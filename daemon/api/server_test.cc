// The server assembly: reflection and health are on, TCP as well as UNIX, and Start's errors.

#include <atomic>
#include <chrono>
#include <memory>
#include <thread>
#include <vector>

#include "daemon/api/api_test_fixture.h"
#include "daemon/api/limits.h"
#include "daemon/testing/wait.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "src/proto/grpc/reflection/v1alpha/reflection.grpc.pb.h"

namespace kvmid {
namespace {

using ::testing::HasSubstr;

// A stream ended by kvmid's shutdown: UNAVAILABLE with kvmid's message. Or, rarely, with the
// client transport's own error: the server closes its end right after the calls' last frames,
// and a client whose write (an acknowledgement) meets the closed socket first fails the streams
// whose trailers it had not yet parsed ("Broken pipe": 1 run in about 60 under ASan, all eight
// health watchers at once, 30 ms into a 1 s grace). The code is the same; the message is gRPC's.
::testing::AssertionResult EndedByShutdown(const grpc::Status& status) {
  if (status.error_code() != grpc::StatusCode::UNAVAILABLE) {
    return ::testing::AssertionFailure()
           << "code " << status.error_code() << ": " << status.error_message();
  }
  for (const char* transport : {"Broken pipe", "Connection reset by peer", "Socket closed"}) {
    if (status.error_message() == transport) return ::testing::AssertionSuccess();
  }
  if (status.error_message() != kShuttingDownMessage) {
    return ::testing::AssertionFailure() << "message \"" << status.error_message() << "\"";
  }
  return ::testing::AssertionSuccess();
}

TEST_F(ApiTest, ReflectionAndHealthAreOn) {
  auto reflection = grpc::reflection::v1alpha::ServerReflection::NewStub(channel_);
  grpc::ClientContext ctx;
  auto stream = reflection->ServerReflectionInfo(&ctx);
  grpc::reflection::v1alpha::ServerReflectionRequest request;
  request.set_list_services("");
  ASSERT_TRUE(stream->Write(request));
  grpc::reflection::v1alpha::ServerReflectionResponse response;
  ASSERT_TRUE(stream->Read(&response));
  std::vector<std::string> services;
  for (const auto& s : response.list_services_response().service()) services.push_back(s.name());
  EXPECT_THAT(services,
              ::testing::IsSupersetOf({"kvmi.v1.Introspection", "grpc.health.v1.Health"}));
  stream->WritesDone();
  stream->Finish();

  // grpc.health.v1.Health/Check for the whole server ("").
  auto health = grpc::health::v1::Health::NewStub(channel_);
  grpc::ClientContext health_ctx;
  grpc::health::v1::HealthCheckResponse checked;
  grpc::Status status = health->Check(&health_ctx, {}, &checked);
  ASSERT_TRUE(status.ok()) << status.error_message();
  EXPECT_EQ(checked.status(), grpc::health::v1::HealthCheckResponse::SERVING);
}

TEST_F(ApiTest, TheApiIsAlsoServedOverTcp) {
  ASSERT_GT(api_->tcp_port(), 0);
  auto tcp = kvmi::v1::Introspection::NewStub(grpc::CreateChannel(
      "127.0.0.1:" + std::to_string(api_->tcp_port()), grpc::InsecureChannelCredentials()));
  grpc::ClientContext ctx;
  kvmi::v1::ListVMsResponse list;
  // Served, but plaintext TCP carries no identity: the call is refused as unauthenticated.
  grpc::Status status = tcp->ListVMs(&ctx, {}, &list);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::UNAUTHENTICATED);
  EXPECT_THAT(status.error_message(), HasSubstr("ListVMs"));
}

TEST_F(ApiTest, StartNamesWhatItCannotServe) {
  ApiServer second(daemon_.get());
  absl::Status none = second.Start(security::ApiListenOptions{});
  EXPECT_EQ(none.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(none.message()), HasSubstr("api_socket or api_tcp"));
  // A socket path nobody can create.
  const std::string unusable = "/proc/kvmid-no-such-dir/api.sock";
  security::ApiListenOptions options;
  options.unix_socket = unusable;
  absl::Status bad = second.Start(options);
  EXPECT_FALSE(bad.ok());
  EXPECT_THAT(std::string(bad.message()), HasSubstr("/proc/kvmid-no-such-dir"));
}

// A shutdown ends the open streams at once, telling them why, instead of waiting its grace for
// streams that would never end by themselves.
TEST_F(ApiTest, ShutdownEndsOpenStreamsAtOnceWithUnavailable) {
  constexpr int kWatches = 40, kEventStreams = 10;
  std::vector<std::unique_ptr<grpc::ClientContext>> contexts;
  std::vector<std::unique_ptr<grpc::ClientReader<kvmi::v1::WatchVMsResponse>>> watches;
  std::vector<std::unique_ptr<grpc::ClientReader<kvmi::v1::StreamEventsResponse>>> streams;
  for (int i = 0; i < kWatches; ++i) {
    contexts.push_back(std::make_unique<grpc::ClientContext>());
    watches.push_back(stub_->WatchVMs(contexts.back().get(), kvmi::v1::WatchVMsRequest()));
  }
  for (int i = 0; i < kEventStreams; ++i) {
    contexts.push_back(std::make_unique<grpc::ClientContext>());
    streams.push_back(stub_->StreamEvents(contexts.back().get(), kvmi::v1::StreamEventsRequest()));
  }
  ASSERT_TRUE(testing::WaitUntil(
      [&] { return api_->open_streams().open() == size_t{kWatches + kEventStreams}; }));
  // Every client waits in Read, as a streaming client does (it also keeps this process's client
  // connection polled: under gRPC's "poll" engine, as in kvmid, nobody else polls it, and the
  // server's graceful GOAWAY waits for the client's answer).
  std::vector<grpc::Status> ended(contexts.size());
  std::vector<std::thread> readers;
  for (size_t i = 0; i < watches.size(); ++i) {
    readers.emplace_back([&, i] {
      kvmi::v1::WatchVMsResponse change;
      while (watches[i]->Read(&change)) {
      }
      ended[i] = watches[i]->Finish();
    });
  }
  for (size_t i = 0; i < streams.size(); ++i) {
    readers.emplace_back([&, i] {
      kvmi::v1::StreamEventsResponse message;
      while (streams[i]->Read(&message)) {
      }
      ended[watches.size() + i] = streams[i]->Finish();
    });
  }
  // The readers end as soon as their streams do, before the server's GOAWAY: from then on this
  // thread keeps the connection polled (a connectivity watch puts its completion queue among the
  // channel's pollers), as a client process with any other call in flight would. Without it the
  // shutdown waited its grace in 2 of 20 runs under ASan on a busy machine.
  std::atomic<bool> shut_down{false};
  std::thread poller([&] {
    grpc::CompletionQueue cq;
    while (!shut_down) {
      channel_->NotifyOnStateChange(
          channel_->GetState(false),
          std::chrono::system_clock::now() + std::chrono::milliseconds(20), &cq, nullptr);
      void* tag = nullptr;
      bool ok = false;
      cq.Next(&tag, &ok);
    }
    cq.Shutdown();
    void* tag = nullptr;
    bool ok = false;
    while (cq.Next(&tag, &ok)) {
    }
  });
  const auto start = std::chrono::steady_clock::now();
  api_->Shutdown();
  const auto took = std::chrono::steady_clock::now() - start;
  shut_down = true;
  poller.join();
  EXPECT_LT(took, api::kShutdownGrace) << "the shutdown waited for the streams";
  for (std::thread& reader : readers) reader.join();
  for (const grpc::Status& status : ended) EXPECT_TRUE(EndedByShutdown(status));
  EXPECT_EQ(api_->open_streams().open(), 0u);
}

// A health watcher of a kvmid going away reads NOT_SERVING, then its call ends as the other
// streams' do (UNAVAILABLE, kShuttingDownMessage).
TEST_F(ApiTest, ShutdownTellsHealthWatchersNotServingBeforeEndingThem) {
  using grpc::health::v1::HealthCheckRequest;
  using grpc::health::v1::HealthCheckResponse;
  auto health = grpc::health::v1::Health::NewStub(channel_);
  constexpr int kWatchers = 8;
  std::vector<std::unique_ptr<grpc::ClientContext>> contexts;
  std::vector<std::unique_ptr<grpc::ClientReader<HealthCheckResponse>>> watches;
  for (int i = 0; i < kWatchers; ++i) {
    contexts.push_back(std::make_unique<grpc::ClientContext>());
    HealthCheckRequest request;
    if (i % 2 == 1) request.set_service(kvmi::v1::Introspection::service_full_name());
    watches.push_back(health->Watch(contexts.back().get(), request));
    HealthCheckResponse first;
    ASSERT_TRUE(watches.back()->Read(&first));
    EXPECT_EQ(first.status(), HealthCheckResponse::SERVING);
  }
  // Beside them, one stream that a shutdown cancels: it is the only one OpenStreams holds (the
  // watchers end themselves).
  grpc::ClientContext vms_ctx;
  auto vms = stub_->WatchVMs(&vms_ctx, kvmi::v1::WatchVMsRequest());
  ASSERT_TRUE(testing::WaitUntil([&] { return api_->open_streams().open() == 1u; }));
  std::thread vms_reader([&] {
    kvmi::v1::WatchVMsResponse change;
    while (vms->Read(&change)) {
    }
    EXPECT_TRUE(EndedByShutdown(vms->Finish()));
  });
  // Each watcher reads until its call ends; what it read last and how it ended.
  std::vector<HealthCheckResponse::ServingStatus> last(kWatchers, HealthCheckResponse::SERVING);
  std::vector<grpc::Status> ended(kWatchers);
  std::vector<std::thread> readers;
  readers.reserve(kWatchers);
  for (int i = 0; i < kWatchers; ++i) {
    readers.emplace_back([&, i] {
      HealthCheckResponse response;
      while (watches[i]->Read(&response)) last[i] = response.status();
      ended[i] = watches[i]->Finish();
    });
  }
  // (How long the shutdown takes is not checked here: once the watchers have ended, nothing
  // polls this process's client connection, and under the "poll" engine the server's GOAWAY
  // then waits its grace for the answer; see ShutdownEndsOpenStreamsAtOnceWithUnavailable.
  // Ended by kvmid's shutdown, not by that grace, the calls carry its message.)
  api_->Shutdown();
  for (std::thread& reader : readers) reader.join();
  vms_reader.join();
  for (int i = 0; i < kWatchers; ++i) {
    EXPECT_EQ(last[i], HealthCheckResponse::NOT_SERVING) << "watcher " << i;
    EXPECT_TRUE(EndedByShutdown(ended[i])) << "watcher " << i;
  }
}

}  // namespace
}  // namespace kvmid
