// What a lock costs in this build: Abseil's Mutex as Debian 12 ships it (built without NDEBUG:
// every lock also goes through a process-wide deadlock graph), the same after
// kvmid::UseReleaseAbslMutexes() (what kvmid's binaries run, common/program.h), and kvmid::Mutex
// (std::mutex underneath, daemon/base/mutex.h). One thread, a nested pair of locks per iteration
// (as gRPC takes them), best of --rounds. gRPC's own locks are absl::Mutex.
//
//   bazel run -c opt //tests/bench:mutex_bench
#include <absl/flags/flag.h>
#include <absl/flags/parse.h>
#include <absl/synchronization/mutex.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <functional>

#include "common/program.h"
#include "daemon/base/mutex.h"

ABSL_FLAG(int, iterations, 2000000, "nested lock pairs per round");
ABSL_FLAG(int, rounds, 5, "rounds per row (the best is printed)");

namespace {

double BestNsPerPair(const std::function<void()>& pair) {
  const int iterations = std::max(1, absl::GetFlag(FLAGS_iterations));
  double best = 1e300;
  for (int r = 0; r < std::max(1, absl::GetFlag(FLAGS_rounds)); ++r) {
    const auto start = std::chrono::steady_clock::now();
    for (int i = 0; i < iterations; ++i) pair();
    const double ns =
        std::chrono::duration<double, std::nano>(std::chrono::steady_clock::now() - start).count() /
        iterations;
    best = std::min(best, ns);
  }
  return best;
}

}  // namespace

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  absl::Mutex a, b;
  auto absl_pair = [&] {
    a.Lock();
    b.Lock();
    b.Unlock();
    a.Unlock();
  };
  // Debian's default first: UseReleaseAbslMutexes is process-wide and not undone.
  const double debian = BestNsPerPair(absl_pair);
  kvmid::UseReleaseAbslMutexes();
  const double release = BestNsPerPair(absl_pair);
  kvmid::Mutex c, d;
  const double ours = BestNsPerPair([&] {
    kvmid::MutexLock lc(&c);
    kvmid::MutexLock ld(&d);
  });
  std::printf("| lock | ns per nested pair (best of %d) | vs release absl::Mutex |\n",
              absl::GetFlag(FLAGS_rounds));
  std::printf("|---|---:|---:|\n");
  std::printf("| absl::Mutex, Debian's default (deadlock graph on) | %.1f | %.2fx |\n", debian,
              debian / release);
  std::printf("| absl::Mutex after UseReleaseAbslMutexes (kvmid) | %.1f | 1.00x |\n", release);
  std::printf("| kvmid::Mutex (std::mutex) | %.1f | %.2fx |\n", ours, ours / release);
  return 0;
}
