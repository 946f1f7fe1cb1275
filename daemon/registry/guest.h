// One guest, identified by its UUID, across connections: its identity, lifecycle state, what
// the host allows (probed with CHECK_COMMAND/CHECK_EVENT), what the daemon armed on it and for
// whom, and its current KVMI session. A guest that reconnects (QEMU's reconnect=N) gets this
// object back and everything armed is armed again on the new session.
#ifndef KVMID_DAEMON_REGISTRY_GUEST_H_
#define KVMID_DAEMON_REGISTRY_GUEST_H_

#include <array>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "daemon/registry/arming.h"
#include "daemon/session/guest_session.h"

namespace kvmid {

enum class GuestState : uint8_t {
  kHandshaking,  // connected, probing the host (version, allow masks, vCPUs)
  kHooked,       // probed and armed: events flow
  kUnhooking,    // the host asked us to detach (UNHOOK event); releasing hooks
  kGone,         // no connection (QEMU may reconnect)
};
const char* GuestStateName(GuestState state);

class Guest;

// The daemon's side of a guest's events (the verdict pipeline).
class GuestEventRouter {
 public:
  virtual ~GuestEventRouter() = default;
  // Loop thread of `session`. Every blocking event must be answered through the session.
  virtual void RouteEvent(const std::shared_ptr<Guest>& guest,
                          const std::shared_ptr<GuestSession>& session,
                          const kvmi::Event& event) = 0;
  // Loop thread. The session ended (pending verdicts for it are void).
  virtual void SessionEnded(const std::shared_ptr<Guest>& guest,
                            const std::shared_ptr<GuestSession>& session) = 0;
  // The guest finished probing and is hooked (arm policies now).
  virtual void GuestHooked(const std::shared_ptr<Guest>& guest) = 0;
};

struct GuestSnapshot {
  GuestIdentity identity;
  std::string key;
  GuestState state = GuestState::kGone;
  uint32_t kvmi_version = 0;
  uint32_t vcpu_count = 0;
  uint32_t allowed_commands = 0;  // bit per command id
  uint16_t allowed_events = 0;    // bit per event id
  uint64_t connections = 0;
  uint64_t events = 0;
  uint64_t fallbacks = 0;
  std::map<OwnerId, Arming> leases;
  Arming applied;
  std::vector<std::string> arm_errors;  // recent failures arming this guest
};

class Guest : public GuestSession::Listener, public std::enable_shared_from_this<Guest> {
 public:
  Guest(std::string key, GuestIdentity identity, GuestEventRouter* router);

  // A new connection for this guest. False (and the session is left alone) if another live
  // session already holds it: two live connections claiming one UUID is an error.
  bool Attach(const std::shared_ptr<GuestSession>& session);

  std::shared_ptr<GuestSession> session() const;
  GuestState state() const;
  GuestSnapshot Snapshot() const;
  const std::string& key() const { return key_; }
  std::string log_name() const;
  uint32_t vcpu_count() const;
  bool EventAllowed(uint8_t event) const;

  // Leases (any thread): arming follows the union of all leases.
  void SetLease(const OwnerId& owner, Arming arming);
  void AddLease(const OwnerId& owner, const Arming& arming);
  void ReleaseLease(const OwnerId& owner);

  // Releases every hook and closes the session promptly (UNHOOK, shutdown).
  void Unhook(const std::string& why, std::function<void()> done = nullptr);

  void CountFallback() { fallbacks_++; }

  // GuestSession::Listener
  void OnEvent(const std::shared_ptr<GuestSession>& session, const kvmi::Event& event) override;
  void OnClosed(const std::shared_ptr<GuestSession>& session, const std::string& reason) override;

 private:
  void Probe(const std::shared_ptr<GuestSession>& session, int attempt);
  void FinishProbe(const std::shared_ptr<GuestSession>& session);
  // Sends what takes the guest from applied_ to the leases' union. Never holds mutex_ while
  // sending.
  void ApplyArming();
  void ArmNewVcpu(uint16_t vcpu);
  void RecordArmError(const std::string& what);

  const std::string key_;
  GuestEventRouter* router_;

  mutable std::mutex mutex_;
  GuestIdentity identity_;
  GuestState state_ = GuestState::kHandshaking;
  std::shared_ptr<GuestSession> session_;
  uint32_t kvmi_version_ = 0;
  uint32_t vcpu_count_ = 0;
  uint32_t allowed_commands_ = 0;
  uint16_t allowed_events_ = 0;
  uint64_t connections_ = 0;
  Leases leases_;
  Arming applied_;
  std::vector<std::string> arm_errors_;

  std::atomic<uint64_t> events_{0};
  std::atomic<uint64_t> fallbacks_{0};
};

}  // namespace kvmid

#endif  // KVMID_DAEMON_REGISTRY_GUEST_H_
