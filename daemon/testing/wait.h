// Waiting on a condition that has no notification of its own (registry state, a guest's
// registers), with a deadline: the tests' alternative to sleeping a fixed time.
#ifndef KVMID_DAEMON_TESTING_WAIT_H_
#define KVMID_DAEMON_TESTING_WAIT_H_

#include <chrono>
#include <thread>

namespace kvmid::testing {

template <typename Pred>
bool WaitUntil(Pred pred, std::chrono::milliseconds timeout = std::chrono::seconds(10)) {
  auto deadline = std::chrono::steady_clock::now() + timeout;
  while (std::chrono::steady_clock::now() < deadline) {
    if (pred()) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
  return pred();
}

}  // namespace kvmid::testing

#endif  // KVMID_DAEMON_TESTING_WAIT_H_
