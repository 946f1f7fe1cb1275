#include "daemon/startup/instance_lock.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

#include <fstream>
#include <sstream>
#include <string>

namespace kvmid {
namespace {

using ::testing::HasSubstr;

std::string TempDir() {
  char dir[] = "/tmp/kvmid-lock-XXXXXX";
  EXPECT_NE(::mkdtemp(dir), nullptr);
  return dir;
}

std::string Contents(const std::string& path) {
  std::ifstream in(path);
  std::stringstream text;
  text << in.rdbuf();
  return text.str();
}

TEST(InstanceLockTest, LockPathIsBesideTheSocket) {
  EXPECT_EQ(LockPathFor("/run/kvmid/kvmi.sock"), "/run/kvmid/kvmid.lock");
  EXPECT_EQ(LockPathFor("kvmi.sock"), "./kvmid.lock");
  EXPECT_EQ(LockPathFor("/kvmi.sock"), "/kvmid.lock");
}

TEST(InstanceLockTest, ASecondHolderIsRefusedWithTheFirstOnesPid) {
  std::string path = TempDir() + "/sub/kvmid.lock";  // the directory is created
  absl::StatusOr<InstanceLock> first = InstanceLock::Acquire(path);
  ASSERT_TRUE(first.ok()) << first.status();
  EXPECT_EQ(Contents(path), std::to_string(::getpid()) + "\n");
  // flock conflicts between open file descriptions, even within one process.
  absl::StatusOr<InstanceLock> second = InstanceLock::Acquire(path);
  ASSERT_FALSE(second.ok());
  EXPECT_EQ(second.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(second.status().message()),
              HasSubstr("pid " + std::to_string(::getpid())));
  EXPECT_EQ(Contents(path), std::to_string(::getpid()) + "\n");  // the loser wrote nothing
}

TEST(InstanceLockTest, ADeadHoldersLockIsTakenOver) {
  std::string path = TempDir() + "/kvmid.lock";
  pid_t child = ::fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    auto lock = InstanceLock::Acquire(path);
    ::_exit(lock.ok() ? 0 : 1);  // exits holding it: the kernel releases it
  }
  int status = 0;
  ASSERT_EQ(::waitpid(child, &status, 0), child);
  ASSERT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0);
  EXPECT_EQ(Contents(path), std::to_string(child) + "\n");
  absl::StatusOr<InstanceLock> mine = InstanceLock::Acquire(path);
  ASSERT_TRUE(mine.ok()) << mine.status();
  EXPECT_EQ(Contents(path), std::to_string(::getpid()) + "\n");
}

TEST(InstanceLockTest, MovingKeepsTheLockAndDestroyingReleasesIt) {
  std::string path = TempDir() + "/kvmid.lock";
  {
    absl::StatusOr<InstanceLock> lock = InstanceLock::Acquire(path);
    ASSERT_TRUE(lock.ok());
    InstanceLock moved = *std::move(lock);
    EXPECT_FALSE(InstanceLock::Acquire(path).ok());
  }
  EXPECT_TRUE(InstanceLock::Acquire(path).ok());
}

}  // namespace
}  // namespace kvmid
