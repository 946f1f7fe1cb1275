// QEMU's side of the introspection channel, for any backend (simulated guests, the /dev/kvm VMM):
// connects to the tool, runs the kvmi-v6 handshake, hooks the engine (whose receive loop then runs
// on the connector's thread), makes the KVM_INTROSPECTION_COMMAND / _EVENT calls, and reconnects
// after `reconnect_seconds` when the tool goes away (QEMU's `reconnect=N`).
#ifndef KVMID_KERNEL_HOST_QEMU_CONNECTOR_H_
#define KVMID_KERNEL_HOST_QEMU_CONNECTOR_H_

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "kernel/abi/handshake.h"
#include "kernel/host/vm_introspection.h"
#include "kernel/transport/socket.h"

namespace kvmi::host {

struct ConnectorConfig {
  Endpoint endpoint;
  // Seconds before reconnecting after the tool went away or refused us; 0 = never reconnect.
  double reconnect_seconds = 1.0;
  // Fill uuid, name and start_time in qemu2introspector (v6 QEMU leaves name/start_time zero).
  bool fill_identity = true;
  // When set, refuse a tool whose cookie_hash is not SHA-1(cookie) (kvmi-v7 QEMU behaviour).
  std::optional<std::string> cookie;
  // KVM_INTROSPECTION_COMMAND / _EVENT calls QEMU makes after HOOK ({-1} = allow all, as v6).
  std::vector<int32_t> allowed_commands = {kAllIds};
  std::vector<int32_t> allowed_events = {kAllIds};
  std::chrono::milliseconds handshake_timeout{30000};
};

// Who the guest is, as told in qemu2introspector.
struct GuestIdentity {
  std::string name;
  Uuid uuid{};
};

class QemuConnector {
 public:
  // `guest_dead` (any thread) tells the loop to stop reconnecting: the guest crashed or exited.
  QemuConnector(VmIntrospection* engine, ConnectorConfig config, GuestIdentity identity,
                std::function<bool()> guest_dead);
  ~QemuConnector();
  QemuConnector(const QemuConnector&) = delete;
  QemuConnector& operator=(const QemuConnector&) = delete;

  // Starts the connector thread (nothing happens without an endpoint).
  void Start();
  // Ends the session and joins the thread. Idempotent.
  void Stop();
  // KVM_INTROSPECTION_UNHOOK: sends UNHOOK (if enabled), waits up to `grace` for the tool to
  // close, then ends the session and returns once the connector thread has counted its end
  // (sessions_ended() includes it); no reconnect afterwards.
  int Detach(std::chrono::milliseconds grace);
  // Detach in two halves, so that many VMs can send UNHOOK at once and share one grace period
  // (QEMU shutting down a fleet): BeginDetach sends UNHOOK (returns as Detach), FinishDetach waits
  // until `deadline` for the tool to close and then ends the session.
  int BeginDetach();
  void FinishDetach(Clock::time_point deadline);
  // Wakes threads blocked in the Wait* calls (the guest's state changed).
  void WakeWaiters();

  // Blocks until a session is hooked (or the deadline); true if hooked.
  bool WaitHooked(Clock::time_point deadline);
  // Blocks until `count` sessions have ended.
  bool WaitSessionsEnded(uint64_t count, Clock::time_point deadline);
  uint64_t sessions_started() const;
  uint64_t sessions_ended() const;
  std::string last_end_reason() const;
  // Handshakes refused (cookie mismatch, bad answer) and failed connects.
  uint64_t handshake_failures() const { return handshake_failures_.load(); }

 private:
  void Loop();
  // Returns the socket after a successful handshake, or an invalid fd.
  UniqueFd ConnectAndHandshake(std::string* error);
  void SleepInterruptibly(std::chrono::milliseconds duration);
  bool stopping() const { return stop_.load(std::memory_order_acquire); }

  VmIntrospection* const engine_;
  const ConnectorConfig config_;
  const GuestIdentity identity_;
  const std::function<bool()> guest_dead_;
  std::thread thread_;
  std::atomic<bool> stop_{false};
  std::atomic<bool> detached_{false};
  std::atomic<uint64_t> handshake_failures_{0};

  mutable std::mutex mu_;
  std::condition_variable cv_;
  uint64_t sessions_started_ = 0;
  uint64_t sessions_ended_ = 0;
  std::string last_end_reason_;
  int handshake_fd_ = -1;  // shut down by Stop() to interrupt a handshake
  bool done_ = false;
};

}  // namespace kvmi::host

#endif  // KVMID_KERNEL_HOST_QEMU_CONNECTOR_H_
