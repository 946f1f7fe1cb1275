// This process's threads as /proc/self/task lists them: what tests and benches read to find a
// thread by name (its CPU time, its nice value) or to count them, and what the scheduler counted
// for one.
#ifndef KVMID_DAEMON_TESTING_THREADS_H_
#define KVMID_DAEMON_TESTING_THREADS_H_

#include <sys/types.h>

#include <cstdint>
#include <string>
#include <vector>

namespace kvmid::testing {

struct ThreadEntry {
  pid_t tid = 0;
  std::string name;  // /proc/self/task/TID/comm, without the newline
};

// Every thread of this process, by ascending thread id; empty if /proc cannot be read. A thread
// that ends while the list is read may be missing or have an empty name.
std::vector<ThreadEntry> ListThreads();

// What the scheduler counted for one thread (/proc/self/task/TID/schedstat): nanoseconds on a CPU
// and the number of times it was put on one (a wake-up, or a return after preemption). Zeros if
// the thread is gone or the kernel keeps no schedstats.
struct SchedStat {
  uint64_t cpu_ns = 0;
  uint64_t timeslices = 0;
};
SchedStat ReadSchedStat(pid_t tid);

}  // namespace kvmid::testing

#endif  // KVMID_DAEMON_TESTING_THREADS_H_
