// This process's threads as /proc/self/task lists them: what tests and benches read to find a
// thread by name (its CPU time, its nice value) or to count them.
#ifndef KVMID_DAEMON_TESTING_THREADS_H_
#define KVMID_DAEMON_TESTING_THREADS_H_

#include <sys/types.h>

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

}  // namespace kvmid::testing

#endif  // KVMID_DAEMON_TESTING_THREADS_H_
