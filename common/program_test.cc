// SetUpProgram: the version text, and Abseil's mutexes without the debug build's deadlock graph.
#include "common/program.h"

#include <absl/synchronization/mutex.h>
#include <gtest/gtest.h>

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
  SetUpProgram("program_test", "test", {"common/"});
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

}  // namespace
}  // namespace kvmid
