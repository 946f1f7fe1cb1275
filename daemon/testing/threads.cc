#include "daemon/testing/threads.h"

#include <dirent.h>

#include <algorithm>
#include <cstdlib>
#include <fstream>
#include <string>

namespace kvmid::testing {

std::vector<ThreadEntry> ListThreads() {
  std::vector<ThreadEntry> threads;
  DIR* dir = ::opendir("/proc/self/task");
  if (dir == nullptr) return threads;
  while (const dirent* entry = ::readdir(dir)) {
    if (entry->d_name[0] == '.') continue;
    ThreadEntry thread;
    thread.tid = static_cast<pid_t>(std::atoi(entry->d_name));
    std::ifstream comm(std::string("/proc/self/task/") + entry->d_name + "/comm");
    std::getline(comm, thread.name);
    threads.push_back(std::move(thread));
  }
  ::closedir(dir);
  std::sort(threads.begin(), threads.end(),
            [](const ThreadEntry& a, const ThreadEntry& b) { return a.tid < b.tid; });
  return threads;
}

SchedStat ReadSchedStat(pid_t tid) {
  SchedStat stat;
  std::ifstream in("/proc/self/task/" + std::to_string(tid) + "/schedstat");
  uint64_t wait_ns = 0;  // the second field: time spent runnable, waiting for a CPU
  if (!(in >> stat.cpu_ns >> wait_ns >> stat.timeslices)) return SchedStat();
  return stat;
}

}  // namespace kvmid::testing
