// kvmi-test-tool: a minimal tool that serves any number of simulated VMs (kvmi-sim) and answers
// every event CONTINUE -- the peer for benchmarking the simulator itself.
//   kvmi-test-tool /tmp/tool.sock [seconds]
#include <sys/resource.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <thread>

#include "kernel/sim/test_tool.h"

int main(int argc, char** argv) {
  if (argc < 2 || argc > 3) {
    std::fprintf(stderr, "usage: kvmi-test-tool SOCKET_PATH [SECONDS]\n");
    return 2;
  }
  double seconds = argc == 3 ? std::atof(argv[2]) : 3600;
  kvmi::sim::AutoTool tool(argv[1], kvmi::sim::AutoToolOptions{});
  std::string error;
  if (!tool.Start(&error)) {
    std::fprintf(stderr, "kvmi-test-tool: %s\n", error.c_str());
    return 1;
  }
  std::this_thread::sleep_for(std::chrono::duration<double>(seconds));  // a program, not a test
  tool.Stop();
  rusage ru{};
  getrusage(RUSAGE_SELF, &ru);
  std::printf(
      "kvmi-test-tool: %llu connections, %llu events answered, %llu errors, cpu %.2f s\n",
      static_cast<unsigned long long>(tool.connections()),
      static_cast<unsigned long long>(tool.events_handled()),
      static_cast<unsigned long long>(tool.errors()),
      ru.ru_utime.tv_sec + ru.ru_stime.tv_sec + (ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e6);
  return 0;
}
