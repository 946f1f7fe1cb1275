#include "daemon/io/event_loop.h"

#include <pthread.h>
#include <sched.h>
#include <spdlog/spdlog.h>
#include <sys/eventfd.h>
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <string>

namespace kvmid {
namespace {
thread_local EventLoop* current_loop = nullptr;
thread_local EventLoop::HandOff* current_hand_off = nullptr;
}  // namespace

EventLoop* EventLoop::Current() { return current_loop; }

EventLoop::EventLoop()
    : epoll_fd_(::epoll_create1(EPOLL_CLOEXEC)),
      wake_fd_(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)) {
  if (!epoll_fd_ || !wake_fd_) {
    spdlog::critical("event loop: epoll/eventfd: {}", std::strerror(errno));
    std::abort();
  }
  epoll_event ev{};
  ev.events = EPOLLIN;
  ev.data.fd = wake_fd_.get();
  ::epoll_ctl(epoll_fd_.get(), EPOLL_CTL_ADD, wake_fd_.get(), &ev);
}

EventLoop::~EventLoop() { Stop(); }

void EventLoop::Start(const char* name) {
  // The name is copied: callers pass a temporary's c_str(). It is set before the thread announces
  // itself, so that Start() returns with the thread named (tests and operators look it up by name).
  thread_ = std::thread([this, name = std::string(name)] {
    pthread_setname_np(pthread_self(), name.c_str());
    loop_tid_ = ::gettid();
    current_loop = this;
    loop_thread_id_ = std::this_thread::get_id();
    Loop();
  });
  // Watch()/RunAt() callers may check InLoopThread() right away.
  while (loop_thread_id_.load() == std::thread::id()) std::this_thread::yield();
}

absl::Status EventLoop::SetNice(int nice) {
  const pid_t tid = loop_tid_.load();
  if (tid == 0) return absl::FailedPreconditionError("the event loop has not started");
  if (::setpriority(PRIO_PROCESS, static_cast<id_t>(tid), nice) != 0) {
    const int error = errno;
    std::string message = "setpriority(nice " + std::to_string(nice) + "): " + std::strerror(error);
    if (error == EACCES || error == EPERM) {
      message += " (raising a thread's priority needs CAP_SYS_NICE or a high enough RLIMIT_NICE)";
      return absl::PermissionDeniedError(message);
    }
    return absl::InternalError(message);
  }
  return absl::OkStatus();
}

absl::StatusOr<int> EventLoop::Nice() const {
  const pid_t tid = loop_tid_.load();
  if (tid == 0) return absl::FailedPreconditionError("the event loop has not started");
  errno = 0;  // -1 is a valid nice value: errno tells an error apart
  const int nice = ::getpriority(PRIO_PROCESS, static_cast<id_t>(tid));
  if (nice == -1 && errno != 0) {
    return absl::InternalError(std::string("getpriority: ") + std::strerror(errno));
  }
  return nice;
}

void EventLoop::Stop() {
  if (!thread_.joinable()) return;
  {
    // Under the mutex, as a posted task is: the loop's check before it blocks then sees it.
    MutexLock lock(&posted_mutex_);
    stopping_ = true;
  }
  Wake();
  thread_.join();
  loop_tid_ = 0;  // the id may be reused by another thread: SetNice must not reach it
}

void EventLoop::Watch(int fd, uint32_t events, FdCallback callback) {
  epoll_event ev{};
  ev.events = events;
  ev.data.fd = fd;
  if (::epoll_ctl(epoll_fd_.get(), EPOLL_CTL_ADD, fd, &ev) != 0) {
    spdlog::error("event loop: watch fd {}: {}", fd, std::strerror(errno));
    return;
  }
  watched_[fd] = std::make_shared<FdCallback>(std::move(callback));
}

void EventLoop::Modify(int fd, uint32_t events) {
  epoll_event ev{};
  ev.events = events;
  ev.data.fd = fd;
  ::epoll_ctl(epoll_fd_.get(), EPOLL_CTL_MOD, fd, &ev);
}

void EventLoop::Unwatch(int fd) {
  ::epoll_ctl(epoll_fd_.get(), EPOLL_CTL_DEL, fd, nullptr);
  watched_.erase(fd);
}

EventLoop::TimerId EventLoop::RunAt(Clock::time_point when, Task task) {
  TimerId id = next_timer_id_++;
  timers_.emplace(std::make_pair(when, id), std::move(task));
  timer_index_.emplace(id, when);
  return id;
}

void EventLoop::Cancel(TimerId id) {
  auto it = timer_index_.find(id);
  if (it == timer_index_.end()) return;
  timers_.erase(std::make_pair(it->second, id));
  timer_index_.erase(it);
}

void EventLoop::Post(Task task) {
  PostQuietly(std::move(task));
  Wake();
}

void EventLoop::PostHandedOff(Task task) {
  Push(std::move(task), /*handed_off=*/true);
  if (current_hand_off == nullptr) {
    Wake();
    return;
  }
  std::vector<EventLoop*>& to_wake = current_hand_off->to_wake_;
  if (std::find(to_wake.begin(), to_wake.end(), this) == to_wake.end()) to_wake.push_back(this);
}

EventLoop::HandOff::HandOff() : outer_(current_hand_off) {
  if (outer_ == nullptr) current_hand_off = this;
}

EventLoop::HandOff::~HandOff() {
  if (outer_ != nullptr) return;
  current_hand_off = nullptr;
  for (EventLoop* loop : to_wake_) loop->Wake();
}

bool EventLoop::HandingOff() { return current_hand_off != nullptr; }

void EventLoop::PostQuietly(Task task) { Push(std::move(task), /*handed_off=*/false); }

void EventLoop::Push(Task task, bool handed_off) {
  MutexLock lock(&posted_mutex_);
  posted_.push_back(std::move(task));
  if (handed_off) handed_off_posted_ = true;
}

void EventLoop::RunInLoop(Task task) {
  if (InLoopThread()) {
    task();
  } else {
    Post(std::move(task));
  }
}

void EventLoop::RunAtEndOfIteration(Task task) { end_of_iteration_.push_back(std::move(task)); }

void EventLoop::RunEndOfIteration() {
  // A task may add more (they run in this same pass).
  while (!end_of_iteration_.empty()) {
    std::vector<Task> tasks;
    tasks.swap(end_of_iteration_);
    for (Task& task : tasks) task();
  }
}

void EventLoop::Wake() {
  // Set: the loop is awake, or another Wake wrote. A task posted before the loop clears the flag
  // (about to block) is seen by its check after the clear; one posted after it finds the flag
  // clear and writes (a Stop's stopping_, set under the same mutex, is checked the same way).
  if (wake_pending_.exchange(true)) return;
  wake_writes_.fetch_add(1, std::memory_order_relaxed);
  uint64_t one = 1;
  ssize_t n = ::write(wake_fd_.get(), &one, sizeof(one));
  (void)n;  // EAGAIN means a wake-up is already pending: good enough
}

bool EventLoop::HasPosted() {
  MutexLock lock(&posted_mutex_);
  return stopping_ || !posted_.empty();
}

void EventLoop::RunPosted() {
  std::vector<Task> tasks;
  {
    MutexLock lock(&posted_mutex_);
    tasks.swap(posted_);
    if (handed_off_posted_) {
      handed_off_posted_ = false;
      yield_requested_ = true;
    }
  }
  for (Task& task : tasks) task();
}

int EventLoop::NextTimeoutMs() {
  if (timers_.empty()) return -1;
  auto delta = timers_.begin()->first.first - Clock::now();
  if (delta <= Clock::duration::zero()) return 0;
  // Round up so a timer never fires a little early and spins.
  auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(delta).count() + 1;
  return ms > 60000 ? 60000 : static_cast<int>(ms);
}

void EventLoop::RunDueTimers() {
  Clock::time_point now = Clock::now();
  while (!timers_.empty() && timers_.begin()->first.first <= now) {
    auto node = timers_.extract(timers_.begin());
    timer_index_.erase(node.key().second);
    node.mapped()();
  }
}

bool EventLoop::YieldForWork(epoll_event* events, int max_events, int* n) {
  const int yields = idle_yields_.load(std::memory_order_relaxed);
  if (yields <= 0) return false;
  for (int i = 0;; ++i) {
    // Before each yield and after the last: work that needs no wait (`*n` stays 0).
    if (stopping_ || HasPosted() || NextTimeoutMs() == 0) return true;
    if (i == yields) return false;
    ::sched_yield();
    idle_yields_taken_.fetch_add(1, std::memory_order_relaxed);
    *n = ::epoll_wait(epoll_fd_.get(), events, max_events, 0);
    if (*n != 0) return true;  // ready file descriptors (or an error, handled by the caller)
  }
}

void EventLoop::Loop() {
  constexpr int kMaxEvents = 64;
  epoll_event events[kMaxEvents];
  while (!stopping_) {
    int n = 0;
    const bool yield = yield_requested_;
    yield_requested_ = false;
    if (!yield || !YieldForWork(events, kMaxEvents, &n)) {
      // About to block: from here a Post writes the eventfd. What was posted (or a Stop) while
      // the flag was still set wrote nothing, so it is looked for after the clear, under the
      // mutex it was pushed (or stopping_ set) under: if that came after this look, its Wake's
      // exchange came after the clear, saw it (or a later Wake's write), and the eventfd has a
      // count.
      wake_pending_.store(false);
      const bool ready = HasPosted();
      n = ::epoll_wait(epoll_fd_.get(), events, kMaxEvents, ready ? 0 : NextTimeoutMs());
      wake_pending_.store(true);  // awake: Posts from now on are run before the loop blocks again
    }
    if (n < 0 && errno != EINTR) {
      spdlog::critical("event loop: epoll_wait: {}", std::strerror(errno));
      std::abort();
    }
    for (int i = 0; i < n; ++i) {
      int fd = events[i].data.fd;
      if (fd == wake_fd_.get()) {
        uint64_t count;  // one read takes the whole count (not EFD_SEMAPHORE)
        ssize_t got = ::read(wake_fd_.get(), &count, sizeof(count));
        (void)got;  // EAGAIN: nothing to take (a spurious wake-up)
        continue;
      }
      auto it = watched_.find(fd);
      if (it == watched_.end()) continue;  // unwatched by an earlier callback in this batch
      std::shared_ptr<FdCallback> callback = it->second;  // keeps it alive if it unwatches itself
      (*callback)(events[i].events);
    }
    RunPosted();
    RunDueTimers();
    RunEndOfIteration();
  }
  RunPosted();  // tasks posted during shutdown still run (they release resources)
  RunEndOfIteration();
  wake_pending_.store(false);  // not awake any more: Awake() is false from now on
}

}  // namespace kvmid
