// Start-up as an ordered list of small named steps, each with its teardown (Falco's style):
//
//   Steps steps;
//   steps.Add("configuration", [&] { return LoadSettings(); });
//   steps.Add("listeners", [&] { return daemon->Start(); }, [&] { daemon->Shutdown(); });
//   absl::Status started = steps.Run();   // stops at the first failure, undoing what ran
//   ...
//   steps.Teardown();                     // reverse order; also run by the destructor
#ifndef KVMID_DAEMON_STARTUP_STEPS_H_
#define KVMID_DAEMON_STARTUP_STEPS_H_

#include <absl/status/status.h>

#include <functional>
#include <string>
#include <vector>

namespace kvmid {

class Steps {
 public:
  using StartFn = std::function<absl::Status()>;
  using StopFn = std::function<void()>;

  Steps() = default;
  Steps(const Steps&) = delete;
  Steps& operator=(const Steps&) = delete;
  ~Steps() { Teardown(); }

  // `stop` (may be empty) runs at teardown if `start` succeeded.
  void Add(std::string name, StartFn start, StopFn stop = nullptr);

  // Runs the steps in order. On the first failure, tears down the steps that ran (in reverse)
  // and returns the error with the step's name in front ("listeners: cannot listen on ...").
  absl::Status Run();

  // Stops every step that ran, last first, once.
  void Teardown();

  // Names of the steps that ran and are not torn down yet, in order (for logs and tests).
  std::vector<std::string> running() const;

 private:
  struct Step {
    std::string name;
    StartFn start;
    StopFn stop;
  };
  std::vector<Step> steps_;
  size_t started_ = 0;  // steps_[0, started_) ran and are not torn down
};

}  // namespace kvmid

#endif  // KVMID_DAEMON_STARTUP_STEPS_H_
