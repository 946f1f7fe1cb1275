// What every binary of the project sets before parsing its flags: the usage line, which flags
// --help lists (the ones defined under `flag_dirs`; Abseil's default only lists flags of a file
// named like the binary, so kvmid's printed "No flags matched"), and the --version text.
#ifndef KVMID_COMMON_PROGRAM_H_
#define KVMID_COMMON_PROGRAM_H_

#include <string>
#include <vector>

namespace kvmid {

// "kvmid 0.9.0 (KVMI v6)".
std::string VersionText(const std::string& program);

// Abseil's Mutex as a release build of Abseil has it: no deadlock detection. Debian 12 builds
// its Abseil without NDEBUG, so every absl::Mutex lock (gRPC's own locks are absl::Mutex) also
// takes a process-wide spinlock and looks the mutex up in a global lock graph: 105 ns instead of
// 28 ns for a nested lock pair, measured (docs/PERFORMANCE.md). kvmid's own locks are std::mutex
// (daemon/base/mutex.h) and are not affected. Process-wide; for binaries and benches that host
// kvmid's daemon.
void UseReleaseAbslMutexes();

// gRPC's "poll" polling engine instead of its default "epoll1", unless the environment already
// names one in GRPC_POLL_STRATEGY (an operator's choice wins). Call before gRPC is first used
// (gRPC reads the variable when it initializes). Measured with remote_verdict_bench
// (docs/PERFORMANCE.md, issue 14, "Design 4"): under epoll1 every thread of the process that
// waits on gRPC shares one epoll set, and a remote verdict's event reached the handler in about a
// whole echo round trip; under "poll" (with one completion-queue thread, api::kAsyncThreads) each
// half of a remote verdict costs what half an echo costs. Process-wide; for binaries and benches
// that host kvmid's daemon.
void UseGrpcPollEngine();

// Call once, before absl::ParseCommandLine. `flag_dirs`: source directories (as Bazel names
// them, e.g. "daemon/") whose flags --help and --helpfull list. Calls UseReleaseAbslMutexes and
// UseGrpcPollEngine.
void SetUpProgram(const std::string& program, const std::string& usage,
                  const std::vector<std::string>& flag_dirs);

}  // namespace kvmid

#endif  // KVMID_COMMON_PROGRAM_H_
