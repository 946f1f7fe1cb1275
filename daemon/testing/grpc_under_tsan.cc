// Linked into every test that runs a real gRPC server (or client) under TSan; nothing in other
// builds. Debian's gRPC, Abseil and Protobuf are not TSan-instrumented, so:
//
// - ignore_noninstrumented_modules: calls into the runtime from those libraries (their malloc,
//   free, eventfd, ...) are not checked. gRPC orders them with atomics and Abseil mutexes TSan does
//   not see, so it would report its own allocations handed between its threads. Our instrumented
//   code's accesses are still checked, on every thread, gRPC's included, except inside the
//   TsanIgnored scopes of daemon/base/tsan.h (which says what they leave out).
// - Abseil's deadlock detection is off, as in kvmid (common/program.h, UseReleaseAbslMutexes):
//   its graph of gRPC's mutexes is itself unsynchronized to TSan's eyes.
//
// The hand-off between an operation's start and its completion on the completion queue is marked
// by the async server itself (daemon/base/tsan.h).
#include "common/program.h"
#include "daemon/base/tsan.h"

#if KVMID_TSAN

// The TSan runtime's hook for default options: its name is the runtime's.
extern "C" const char* __tsan_default_options() {  // NOLINT(bugprone-reserved-identifier)
  return "ignore_noninstrumented_modules=1";
}

namespace {

const bool kReleaseMutexes = [] {
  kvmid::UseReleaseAbslMutexes();
  return true;
}();

}  // namespace

#endif  // KVMID_TSAN
