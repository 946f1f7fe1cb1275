#include "daemon/startup/steps.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <string>
#include <vector>

namespace kvmid {
namespace {

using ::testing::ElementsAre;

TEST(StepsTest, RunsInOrderAndTearsDownInReverseOnce) {
  std::vector<std::string> log;
  {
    Steps steps;
    for (std::string name : {"a", "b", "c"}) {
      steps.Add(
          name,
          [&log, name] {
            log.push_back("start " + name);
            return absl::OkStatus();
          },
          [&log, name] { log.push_back("stop " + name); });
    }
    ASSERT_TRUE(steps.Run().ok());
    EXPECT_THAT(steps.running(), ElementsAre("a", "b", "c"));
    steps.Teardown();
    steps.Teardown();  // once
    EXPECT_TRUE(steps.running().empty());
  }  // the destructor has nothing left to stop
  EXPECT_THAT(log, ElementsAre("start a", "start b", "start c", "stop c", "stop b", "stop a"));
}

TEST(StepsTest, AFailedStepUndoesWhatRanAndNamesItself) {
  std::vector<std::string> log;
  Steps steps;
  steps.Add(
      "config",
      [&] {
        log.push_back("start config");
        return absl::OkStatus();
      },
      [&] { log.push_back("stop config"); });
  steps.Add("no stop", [&] {
    log.push_back("start no stop");
    return absl::OkStatus();
  });
  steps.Add(
      "listeners", [&] { return absl::UnavailableError("cannot listen on /x"); },
      [&] { log.push_back("stop listeners"); });  // never started: never stopped
  steps.Add("api", [&] {
    log.push_back("start api");
    return absl::OkStatus();
  });
  absl::Status status = steps.Run();
  EXPECT_EQ(status.code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ(status.message(), "listeners: cannot listen on /x");
  EXPECT_THAT(log, ElementsAre("start config", "start no stop", "stop config"));
  EXPECT_TRUE(steps.running().empty());
}

TEST(StepsTest, TheDestructorTearsDown) {
  std::vector<std::string> log;
  {
    Steps steps;
    steps.Add(
        "one", [] { return absl::OkStatus(); }, [&] { log.push_back("stop one"); });
    ASSERT_TRUE(steps.Run().ok());
  }
  EXPECT_THAT(log, ElementsAre("stop one"));
}

}  // namespace
}  // namespace kvmid
