// A planted locking mistake, never built: scripts/test.sh's `tsa` step runs clang-tidy (the
// project's .clang-tidy, whose ExtraArgs turn on -Wthread-safety, as scripts/tidy.sh does) over
// this file alone and passes only if the analysis reports the unlocked write below. That proves the
// thread-safety analysis inside the tidy step is live: the tidy step itself fails on any finding in
// the project's real sources, so a dead analysis would pass there unnoticed.
#include "daemon/base/mutex.h"

namespace kvmid {
namespace {

class Counter {
 public:
  void Locked() {
    MutexLock lock(&mu_);
    ++count_;
  }
  void Planted() { ++count_; }  // the mistake: count_ is written without mu_

 private:
  Mutex mu_;
  int count_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace
}  // namespace kvmid
