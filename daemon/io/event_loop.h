// One epoll loop thread: owns a set of sockets, a timer queue and a queue of posted tasks.
// Guests are spread over a few loops (not a thread per guest, never a thread per vCPU); all of
// one guest's socket I/O happens on its loop, so the hot event path needs no lock and no wakeup.
#ifndef KVMID_DAEMON_IO_EVENT_LOOP_H_
#define KVMID_DAEMON_IO_EVENT_LOOP_H_

#include <absl/status/status.h>
#include <absl/status/statusor.h>
#include <sys/epoll.h>
#include <sys/types.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <thread>
#include <unordered_map>
#include <utility>
#include <vector>

#include "daemon/base/mutex.h"
#include "kernel/transport/unique_fd.h"

namespace kvmid {

using Clock = std::chrono::steady_clock;

class EventLoop {
 public:
  using FdCallback = std::function<void(uint32_t epoll_events)>;
  using Task = std::function<void()>;
  using TimerId = uint64_t;

  EventLoop();
  ~EventLoop();
  EventLoop(const EventLoop&) = delete;
  EventLoop& operator=(const EventLoop&) = delete;

  // Starts the loop on its own thread (named `name`); Stop() ends it and joins.
  void Start(const char* name);
  void Stop();

  // Any thread, once started. Sets the loop thread's nice value (Linux schedules threads, not
  // processes: the process's other threads keep theirs). Raising the priority (a value below the
  // thread's) needs CAP_SYS_NICE or RLIMIT_NICE; the error says so.
  absl::Status SetNice(int nice);
  // The loop thread's nice value (getpriority), or an error.
  absl::StatusOr<int> Nice() const;

  // Any thread. When asked (YieldBeforeSleep), a loop with nothing to do gives up its CPU to other
  // runnable threads (sched_yield) up to `yields` times, and looks for I/O, posted tasks and due
  // timers before each and after the last, before it waits in epoll_wait. The threads it lets run
  // are mostly the guests' vCPUs and the KVMI receive threads its replies just woke: their next
  // events are then taken in one wake-up, and those threads do not pay to wake a sleeping loop
  // (DaemonConfig::io_idle_yields, docs/PERFORMANCE.md). On an idle host each yield returns at
  // once: a few microseconds before the loop sleeps. While it yields, the loop counts as awake
  // (Awake(): a Post costs no wake-up). EventLoop's default, 0: it never yields.
  void SetIdleYields(int yields) { idle_yields_.store(yields, std::memory_order_relaxed); }
  // Loop thread only. Asks for those yields before the loop's next wait; the request is used up
  // there (also when work is found at once). Work that another thread will answer (an event sent
  // to a remote handler) asks; so does a task handed off by a thread that answers the guests
  // (PostHandedOff: a remote handler's verdicts), whose guests' next events then come in one
  // wake-up. Other iterations wait at once, as without yields.
  void YieldBeforeSleep() { yield_requested_ = true; }
  // Any thread: yields taken so far (for tests and benches).
  uint64_t idle_yields_taken() const { return idle_yields_taken_.load(std::memory_order_relaxed); }

  // Loop thread only. The callback runs on the loop thread; Unwatch before closing the fd.
  void Watch(int fd, uint32_t events, FdCallback callback);
  void Modify(int fd, uint32_t events);
  void Unwatch(int fd);

  // Loop thread only. Runs `task` once at `when`; Cancel is a no-op for a timer that already ran.
  TimerId RunAt(Clock::time_point when, Task task);
  void Cancel(TimerId id);

  // Any thread. Runs `task` on the loop thread, in posting order.
  void Post(Task task);
  // Any thread. Like Post, but without waking a sleeping loop: `task` runs at its next wake-up
  // (I/O, a timer or a Post), or before it sleeps if it is awake, still in posting order. For
  // housekeeping nobody waits for (a task that re-posts itself this way keeps the loop awake).
  void PostQuietly(Task task);
  // Any thread. Like Post, but inside a HandOff scope the wake-up waits for the scope's end.
  void PostHandedOff(Task task);
  // Runs now if called on the loop thread, else posts.
  void RunInLoop(Task task);
  // Loop thread only. Runs `task` at the end of this iteration of the loop, once everything this
  // wake-up brought has run (the ready file descriptors' callbacks, posted tasks, due timers):
  // work that pays to do once for all of it, such as one stream write for the events of several
  // guests.
  void RunAtEndOfIteration(Task task);

  // The loop whose thread calls this; null on any other thread.
  static EventLoop* Current();

  // Any thread. While one is alive on a thread, work that may run on that thread or be handed to
  // its loop goes to the loop (HandingOff() is true there: GuestSession::ReplyToEvent), and the
  // thread's PostHandedOff()s wake each loop once, when the scope ends, not once per task. Other
  // Posts wake as usual. Scopes nest (the outermost wakes).
  class HandOff {
   public:
    HandOff();
    ~HandOff();
    HandOff(const HandOff&) = delete;
    HandOff& operator=(const HandOff&) = delete;

   private:
    std::vector<EventLoop*> to_wake_;
    HandOff* outer_;
    friend class EventLoop;
  };
  static bool HandingOff();

  // Any thread. True while the loop thread is awake (or already woken): a task posted now runs
  // before it next sleeps, and the Post costs no wake-up. A hint: it may change at once.
  bool Awake() const { return wake_pending_.load(std::memory_order_relaxed); }
  // Any thread. How many times a Post (or Stop) had to write the eventfd to wake the loop.
  uint64_t wake_writes() const { return wake_writes_.load(std::memory_order_relaxed); }

  bool InLoopThread() const { return std::this_thread::get_id() == loop_thread_id_.load(); }

 private:
  void Loop();
  // Before the loop waits: the yields of SetIdleYields. True when it found work: `*n` ready
  // file descriptors (or epoll_wait's error), or 0 and posted tasks, a due timer or a Stop.
  bool YieldForWork(epoll_event* events, int max_events, int* n);
  // Queues `task` (no wake-up); `handed_off`: it came through PostHandedOff.
  void Push(Task task, bool handed_off);
  void Wake();
  void RunPosted();
  bool HasPosted();
  int NextTimeoutMs();
  void RunDueTimers();
  void RunEndOfIteration();

  kvmi::UniqueFd epoll_fd_;
  kvmi::UniqueFd wake_fd_;  // eventfd: Post() and Stop() wake epoll_wait
  // The loop is awake (set when epoll_wait returns, cleared before it blocks again), or a write to
  // wake_fd_ is pending: a Post then needs no syscall (see Loop and Wake).
  std::atomic<bool> wake_pending_{false};
  std::atomic<uint64_t> wake_writes_{0};  // eventfd writes, for tests
  std::atomic<int> idle_yields_{0};
  std::atomic<uint64_t> idle_yields_taken_{0};
  std::thread thread_;
  std::atomic<std::thread::id> loop_thread_id_{};
  std::atomic<pid_t> loop_tid_{0};  // the loop thread's kernel thread id (gettid)
  std::atomic<bool> stopping_{false};

  // shared_ptr: a callback may Unwatch (destroy) itself while it runs.
  std::unordered_map<int, std::shared_ptr<FdCallback>> watched_;  // loop thread only

  std::vector<Task> end_of_iteration_;  // loop thread only: RunAtEndOfIteration
  bool yield_requested_ = false;        // loop thread only: YieldBeforeSleep
  std::map<std::pair<Clock::time_point, TimerId>, Task> timers_;  // loop thread only
  std::unordered_map<TimerId, Clock::time_point> timer_index_;
  TimerId next_timer_id_ = 1;

  Mutex posted_mutex_;
  std::vector<Task> posted_ ABSL_GUARDED_BY(posted_mutex_);
  bool handed_off_posted_ ABSL_GUARDED_BY(posted_mutex_) = false;  // a PostHandedOff among them
};

}  // namespace kvmid

#endif  // KVMID_DAEMON_IO_EVENT_LOOP_H_
