// SetUpProgram: the version text, Abseil's mutexes without the debug build's deadlock graph, and
// gRPC's polling engine.
#include "common/program.h"

#include <absl/synchronization/mutex.h>
#include <gtest/gtest.h>
#include <stdlib.h>

namespace kvmid {
namespace {

TEST(ProgramTest, VersionTextNamesTheProgramAndTheAbi) {
  const std::string text = VersionText("kvmid");
  EXPECT_EQ(text.rfind("kvmid ", 0), 0u) << text;
  EXPECT_NE(text.find("KVMI v6"), std::string::npos) << text;
}

// Debian's Abseil is built without NDEBUG: its Mutex records every lock order in a global graph
// and aborts ("Potential Mutex deadlock") at the first inverted order, at a cost on every lock.
// After SetUpProgram, as in a release build, it does neither: two orders in turn are fine.
TEST(ProgramTest, AbslMutexesRunWithoutTheDeadlockGraph) {
  ASSERT_EQ(::unsetenv("GRPC_POLL_STRATEGY"), 0);
  SetUpProgram("program_test", "test", {"common/"});
  EXPECT_STREQ(::getenv("GRPC_POLL_STRATEGY"), "poll") << "SetUpProgram calls UseGrpcPollEngine";
  absl::Mutex a, b;
  {
    absl::MutexLock la(&a);
    absl::MutexLock lb(&b);
  }
  {
    absl::MutexLock lb(&b);
    absl::MutexLock la(&a);
  }
  SUCCEED();
}

// gRPC's polling engine: "poll" unless the environment names one (the operator's choice wins).
TEST(ProgramTest, GrpcPollEngineIsPollUnlessTheEnvironmentNamesOne) {
  ASSERT_EQ(::unsetenv("GRPC_POLL_STRATEGY"), 0);
  UseGrpcPollEngine();
  ASSERT_NE(::getenv("GRPC_POLL_STRATEGY"), nullptr);
  EXPECT_STREQ(::getenv("GRPC_POLL_STRATEGY"), "poll");
  ASSERT_EQ(::setenv("GRPC_POLL_STRATEGY", "epoll1", 1), 0);
  UseGrpcPollEngine();
  EXPECT_STREQ(::getenv("GRPC_POLL_STRATEGY"), "epoll1");
  ::unsetenv("GRPC_POLL_STRATEGY");
}

}  // namespace
}  // namespace kvmid
