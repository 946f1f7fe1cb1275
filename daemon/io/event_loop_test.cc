#include "daemon/io/event_loop.h"

#include <gtest/gtest.h>
#include <sys/eventfd.h>
#include <sys/resource.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <functional>
#include <future>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "kernel/transport/unique_fd.h"

namespace kvmid {
namespace {

// Enough yields that a test thread gets to act while the loop still yields.
constexpr int kMaxYields = 1000000;

// Waits (up to 5 s) until the loop blocks in epoll_wait, as far as Awake() tells: its first
// iteration has run (a task posted after Start ran), then the flag is clear, then 10 ms more for
// the few instructions between the clear and epoll_wait.
bool WaitAsleep(EventLoop& loop) {
  std::promise<void> ran;
  loop.Post([&ran] { ran.set_value(); });
  if (ran.get_future().wait_for(std::chrono::seconds(5)) != std::future_status::ready) return false;
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(5);
  while (loop.Awake()) {
    if (std::chrono::steady_clock::now() > deadline) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  std::this_thread::sleep_for(std::chrono::milliseconds(10));
  return true;
}

// SetNice changes the loop thread's nice value only: the calling thread keeps its own.
TEST(EventLoopTest, SetNiceChangesOnlyTheLoopThread) {
  EventLoop loop;
  EXPECT_EQ(loop.SetNice(1).code(), absl::StatusCode::kFailedPrecondition);  // not started
  loop.Start("test-loop");
  errno = 0;
  const int mine = ::getpriority(PRIO_PROCESS, 0);
  ASSERT_EQ(errno, 0);
  absl::StatusOr<int> before = loop.Nice();
  ASSERT_TRUE(before.ok()) << before.status();
  EXPECT_EQ(*before, mine);  // a new thread inherits its creator's
  // Lowering the priority is always allowed; 19 is the lowest.
  const int lower = mine < 19 ? mine + 1 : 19;
  ASSERT_TRUE(loop.SetNice(lower).ok());
  EXPECT_EQ(*loop.Nice(), lower);
  errno = 0;
  EXPECT_EQ(::getpriority(PRIO_PROCESS, 0), mine);
  // Raising it back works with CAP_SYS_NICE (root) and is refused, saying why, without.
  absl::Status raised = loop.SetNice(mine);
  if (raised.ok()) {
    EXPECT_EQ(*loop.Nice(), mine);
  } else {
    EXPECT_EQ(raised.code(), absl::StatusCode::kPermissionDenied);
    EXPECT_NE(raised.message().find("CAP_SYS_NICE"), absl::string_view::npos) << raised;
  }
  loop.Stop();
}

// A quiet task waits for the loop's next wake-up, and keeps its place among posted tasks.
TEST(EventLoopTest, AQuietTaskRunsAtTheNextWakeUpInPostingOrder) {
  EventLoop loop;
  loop.Start("test-loop");
  ASSERT_TRUE(WaitAsleep(loop));  // an awake loop runs a quiet task before it sleeps
  Mutex mutex;
  std::vector<int> order;
  auto record = [&](int n) {
    MutexLock lock(&mutex);
    order.push_back(n);
  };
  loop.PostQuietly([&] { record(1); });
  // An idle loop with no timers sleeps in epoll_wait: nothing runs the quiet task yet.
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  {
    MutexLock lock(&mutex);
    EXPECT_TRUE(order.empty());
  }
  std::promise<void> done;
  loop.Post([&] {
    record(2);
    done.set_value();
  });
  ASSERT_EQ(done.get_future().wait_for(std::chrono::seconds(5)), std::future_status::ready);
  loop.Stop();
  EXPECT_EQ(order, (std::vector<int>{1, 2}));
}

// Under a HandOff, a PostHandedOff waits for the scope's end, which wakes each loop it posted to
// once; a plain Post still wakes at once.
TEST(EventLoopTest, PostsUnderAHandOffRunWhenTheScopeEnds) {
  EventLoop a, b;
  a.Start("test-loop-a");
  b.Start("test-loop-b");
  ASSERT_TRUE(WaitAsleep(a));
  ASSERT_TRUE(WaitAsleep(b));
  EXPECT_FALSE(EventLoop::HandingOff());
  std::atomic<int> ran{0};
  std::promise<void> a_done, b_done;
  {
    EventLoop::HandOff hand_off;
    EXPECT_TRUE(EventLoop::HandingOff());
    {
      EventLoop::HandOff nested;  // an inner scope leaves the waking to the outer one
    }
    EXPECT_TRUE(EventLoop::HandingOff());
    a.PostHandedOff([&] { ran++; });
    a.PostHandedOff([&] {
      ran++;
      a_done.set_value();
    });
    b.PostHandedOff([&] {
      ran++;
      b_done.set_value();
    });
    // Idle loops sleep in epoll_wait: nothing was woken yet.
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    EXPECT_EQ(ran.load(), 0);
    std::promise<void> plain;
    b.Post([&] { plain.set_value(); });  // wakes b, which runs what b was handed so far too
    plain.get_future().wait();
    EXPECT_EQ(ran.load(), 1);
  }
  EXPECT_FALSE(EventLoop::HandingOff());
  a_done.get_future().wait();
  b_done.get_future().wait();
  EXPECT_EQ(ran.load(), 3);
  a.Stop();
  b.Stop();
}

// RunAtEndOfIteration: after every callback of the file descriptors one wake-up found ready (and
// the posted tasks), once; Current() is the loop on its own thread only.
TEST(EventLoopTest, EndOfIterationTasksRunAfterEveryReadyCallbackOfTheWakeUp) {
  EventLoop loop;
  loop.Start("test-loop");
  EXPECT_EQ(EventLoop::Current(), nullptr);
  Mutex mutex;
  std::vector<std::string> order;
  auto record = [&](const std::string& what) {
    MutexLock lock(&mutex);
    order.push_back(what);
  };
  kvmi::UniqueFd a(::eventfd(1, EFD_CLOEXEC | EFD_NONBLOCK));  // readable from the start
  kvmi::UniqueFd b(::eventfd(1, EFD_CLOEXEC | EFD_NONBLOCK));
  std::promise<void> done;
  std::atomic<int> ends{0};
  loop.Post([&] {
    EXPECT_EQ(EventLoop::Current(), &loop);
    auto on_ready = [&](int fd, const std::string& name) {
      return [&, fd, name](uint32_t) {
        uint64_t count;
        while (::read(fd, &count, sizeof(count)) > 0) {
        }
        record(name);
        // Both callbacks ask; each asked task runs once, after both.
        loop.RunAtEndOfIteration([&, name] {
          record("end after " + name);
          if (++ends == 2) done.set_value();
        });
      };
    };
    loop.Watch(a.get(), EPOLLIN, on_ready(a.get(), "a"));
    loop.Watch(b.get(), EPOLLIN, on_ready(b.get(), "b"));
  });
  ASSERT_EQ(done.get_future().wait_for(std::chrono::seconds(5)), std::future_status::ready);
  std::promise<void> unwatched;
  loop.Post([&] {
    loop.Unwatch(a.get());
    loop.Unwatch(b.get());
    unwatched.set_value();
  });
  unwatched.get_future().wait();
  loop.Stop();
  MutexLock lock(&mutex);
  ASSERT_EQ(order.size(), 4u);
  EXPECT_EQ(order[2].rfind("end after ", 0), 0u) << order[2];
  EXPECT_EQ(order[3].rfind("end after ", 0), 0u) << order[3];
  EXPECT_NE(order[0], order[1]);
}

// Asked by a posted task or a timer, an end-of-iteration task runs in the same iteration, after
// them (not at the next wake-up, which may be far away).
TEST(EventLoopTest, EndOfIterationTasksAskedByPostedTasksAndTimersRunInTheSameIteration) {
  EventLoop loop;
  loop.Start("test-loop");
  Mutex mutex;
  std::vector<std::string> order;
  auto record = [&](const std::string& what) {
    MutexLock lock(&mutex);
    order.push_back(what);
  };
  std::promise<void> done;
  loop.Post([&] {
    record("posted");
    loop.RunAtEndOfIteration([&] { record("end after posted"); });
    loop.RunAt(Clock::now(), [&] {
      record("timer");
      loop.RunAtEndOfIteration([&] {
        record("end after timer");
        done.set_value();
      });
    });
  });
  // Nothing else wakes the loop: an end-of-iteration task left for the next wake-up would never
  // run (the timer is due at once; the loop's next epoll_wait has no timeout after it).
  ASSERT_EQ(done.get_future().wait_for(std::chrono::seconds(5)), std::future_status::ready);
  loop.Stop();
  MutexLock lock(&mutex);
  ASSERT_EQ(order.size(), 4u);
  EXPECT_EQ(order[0], "posted");
  EXPECT_EQ(order[3], "end after timer");
  EXPECT_TRUE(order[1] == "end after posted" || order[2] == "end after posted");
}

TEST(EventLoopTest, RunInLoopRunsInlineOnTheLoopThreadAndPostsFromOthers) {
  EventLoop loop;
  loop.Start("test-loop");
  std::promise<bool> inline_run;
  loop.Post([&] {
    bool ran = false;
    loop.RunInLoop([&] { ran = true; });
    inline_run.set_value(ran);  // ran before RunInLoop returned
  });
  EXPECT_TRUE(inline_run.get_future().get());
  std::promise<bool> on_loop;
  loop.RunInLoop([&] { on_loop.set_value(loop.InLoopThread()); });
  EXPECT_TRUE(on_loop.get_future().get());
  loop.Stop();
}

// A Post to a sleeping loop writes the eventfd; one to a loop that is awake (here: running a
// task) writes nothing, and its task still runs before the loop sleeps.
TEST(EventLoopTest, OnlyAPostToASleepingLoopWakesIt) {
  EventLoop loop;
  loop.Start("test-loop");
  ASSERT_TRUE(WaitAsleep(loop));
  EXPECT_FALSE(loop.Awake());
  const uint64_t before = loop.wake_writes();
  std::promise<void> running, release, second_ran;
  loop.Post([&] {
    running.set_value();
    release.get_future().wait();
  });
  running.get_future().wait();
  EXPECT_EQ(loop.wake_writes(), before + 1);  // it slept
  EXPECT_TRUE(loop.Awake());
  loop.Post([&] { second_ran.set_value(); });
  EXPECT_EQ(loop.wake_writes(), before + 1);  // awake: no write
  release.set_value();
  EXPECT_EQ(second_ran.get_future().wait_for(std::chrono::seconds(5)), std::future_status::ready);
  ASSERT_TRUE(WaitAsleep(loop));
  const uint64_t asleep = loop.wake_writes();
  std::promise<void> third_ran;
  loop.Post([&] { third_ran.set_value(); });
  EXPECT_EQ(third_ran.get_future().wait_for(std::chrono::seconds(5)), std::future_status::ready);
  EXPECT_EQ(loop.wake_writes(), asleep + 1);  // asleep again: one write
  loop.Stop();
}

// Wake() writes the eventfd only when the loop sleeps and no wake-up is pending. Each thread here
// waits for its task before posting the next, so one lost wake-up leaves a thread waiting (and
// the test failing).
TEST(EventLoopTest, EveryPostIsRunWhilePostsRaceTheLoopsWakeUps) {
  EventLoop loop;
  loop.Start("test-loop");
  constexpr int kThreads = 4, kPosts = 3000;
  std::atomic<int> lost{0};
  std::vector<std::thread> posters;
  posters.reserve(kThreads);
  for (int t = 0; t < kThreads; ++t) {
    posters.emplace_back([&] {
      for (int i = 0; i < kPosts && lost == 0; ++i) {
        auto ran = std::make_shared<std::promise<void>>();
        loop.Post([ran] { ran->set_value(); });
        if (ran->get_future().wait_for(std::chrono::seconds(5)) != std::future_status::ready) {
          lost++;
          return;
        }
      }
    });
  }
  for (std::thread& poster : posters) poster.join();
  EXPECT_EQ(lost.load(), 0);
  loop.Stop();
}

// A loop asked to yield before it sleeps (YieldBeforeSleep, or a task handed off by another
// thread) gives up its CPU SetIdleYields times, looking for work after each, then sleeps; any
// other wake-up sleeps at once. Nothing arrives here, so every yield is taken.
TEST(EventLoopTest, OnlyAnIterationThatAskedYieldsBeforeTheLoopSleeps) {
  std::promise<uint64_t> quiet_ran, readable;  // outlive the loop (its tasks and callbacks)
  kvmi::UniqueFd fd(::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC));
  ASSERT_TRUE(fd.valid());
  EventLoop loop;
  loop.SetIdleYields(3);
  loop.Start("test-loop");
  ASSERT_TRUE(WaitAsleep(loop));
  EXPECT_EQ(loop.idle_yields_taken(), 0u);  // WaitAsleep's Post did not ask

  // (Nothing is posted while the loop yields here: a Post would be work found, ending them.)
  auto taken_settles_at = [&loop](uint64_t expected) {
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(5);
    while (loop.idle_yields_taken() < expected && std::chrono::steady_clock::now() < deadline) {
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    return loop.idle_yields_taken();
  };
  loop.Post([&] { loop.YieldBeforeSleep(); });
  EXPECT_EQ(taken_settles_at(3), 3u);

  {
    EventLoop::HandOff hand_off;  // a remote handler's verdicts, written by the loop
    loop.PostHandedOff([] {});
  }
  EXPECT_EQ(taken_settles_at(6), 6u);
  ASSERT_TRUE(WaitAsleep(loop));
  EXPECT_EQ(loop.idle_yields_taken(), 6u);  // WaitAsleep's Post did not ask

  // Work that arrives during the yields ends them: each piece of work below records the yields
  // taken when it ran, fewer than the budget (had the loop not looked after each yield, it would
  // have taken them all, then found the work before sleeping).
  loop.SetIdleYields(kMaxYields);
  auto while_yielding = [&loop](const std::function<void()>& arrive) {
    const uint64_t before = loop.idle_yields_taken();
    loop.Post([&loop] { loop.YieldBeforeSleep(); });
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(5);
    while (loop.idle_yields_taken() == before && std::chrono::steady_clock::now() < deadline) {
      std::this_thread::yield();
    }
    arrive();
    return before;
  };
  // A quiet Post, which never wakes a sleeping loop.
  uint64_t before = while_yielding(
      [&] { loop.PostQuietly([&] { quiet_ran.set_value(loop.idle_yields_taken()); }); });
  std::future<uint64_t> quiet = quiet_ran.get_future();
  ASSERT_EQ(quiet.wait_for(std::chrono::seconds(5)), std::future_status::ready);
  EXPECT_LT(quiet.get(), before + kMaxYields);
  ASSERT_TRUE(WaitAsleep(loop));
  // A watched file descriptor that becomes readable.
  loop.Post([&] {
    loop.Watch(fd.get(), EPOLLIN, [&](uint32_t) {
      uint64_t count;
      if (::read(fd.get(), &count, sizeof(count)) == sizeof(count)) {
        readable.set_value(loop.idle_yields_taken());
      }
    });
  });
  ASSERT_TRUE(WaitAsleep(loop));
  before = while_yielding([&] {
    const uint64_t one = 1;
    ASSERT_EQ(::write(fd.get(), &one, sizeof(one)), static_cast<ssize_t>(sizeof(one)));
  });
  std::future<uint64_t> ready = readable.get_future();
  ASSERT_EQ(ready.wait_for(std::chrono::seconds(5)), std::future_status::ready);
  EXPECT_LT(ready.get(), before + kMaxYields);
  loop.Post([&] { loop.Unwatch(fd.get()); });
  ASSERT_TRUE(WaitAsleep(loop));
  const uint64_t after = loop.idle_yields_taken();

  loop.SetIdleYields(0);  // asked, but none allowed
  loop.Post([&] { loop.YieldBeforeSleep(); });
  ASSERT_TRUE(WaitAsleep(loop));
  EXPECT_EQ(loop.idle_yields_taken(), after);
  loop.Stop();
}

}  // namespace
}  // namespace kvmid
