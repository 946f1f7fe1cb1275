// One guest, identified by its UUID, across connections: its identity, lifecycle state, what
// the host allows (probed with CHECK_COMMAND/CHECK_EVENT: probe.h), what the daemon armed on it
// and for whom, and its current KVMI session. A guest that reconnects (QEMU's reconnect=N) gets
// this object back and everything armed is armed again on the new session. Its events go to the
// verdict pipeline (Guest::OnEvent, the hot path); page-access changes are their own objects
// (page_access_change.h). The registry (daemon/registry) finds guests by UUID.
#ifndef KVMID_DAEMON_GUEST_GUEST_H_
#define KVMID_DAEMON_GUEST_GUEST_H_

#include <array>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "daemon/base/mutex.h"
#include "daemon/guest/page_access_change.h"
#include "daemon/guest/probe.h"
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

// What policies and handlers need to know about a guest, cached on the guest so that the event
// path reads one pointer instead of copying the guest's state.
struct GuestView {
  kvmi::Uuid uuid{};
  std::string name;
  std::map<std::string, std::string> labels;
  uint64_t generation = 0;  // of the label table it was built from
};

// A blocking event the daemon holds on purpose (a vCPU paused for a client). Destroying it
// without Release lets the vCPU go as well, with the pipeline's fallback: a hold never outlives
// its owner.
class HeldEvent {
 public:
  virtual ~HeldEvent() = default;
  virtual void Release(const std::string& by) = 0;
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
  std::vector<std::string> arm_errors;       // recent failures arming this guest
  std::map<uint16_t, OwnerId> paused_vcpus;  // vCPUs held paused, and for whom
  // Lease changes not yet sent, plus arming commands sent and not yet answered: 0 means what
  // the leases say is in effect on the host (or failed, see arm_errors).
  uint64_t arming_in_flight = 0;
};

// Told about every lifecycle change of a guest (the registry, for WatchVMs).
class GuestStateListener {
 public:
  virtual ~GuestStateListener() = default;
  // Any thread, no guest lock held. Must be quick.
  virtual void GuestStateChanged(const std::shared_ptr<Guest>& guest) = 0;
};

class Guest : public GuestSession::Listener, public std::enable_shared_from_this<Guest> {
 public:
  Guest(std::string key, GuestIdentity identity, GuestEventRouter* router,
        GuestStateListener* state_listener = nullptr);

  // A new connection for this guest. False (and the session is left alone) if another live
  // session already holds it: two live connections claiming one UUID is an error.
  bool Attach(const std::shared_ptr<GuestSession>& session) ABSL_LOCKS_EXCLUDED(mutex_);

  std::shared_ptr<GuestSession> session() const ABSL_LOCKS_EXCLUDED(mutex_);
  GuestState state() const ABSL_LOCKS_EXCLUDED(mutex_);
  GuestSnapshot Snapshot() const ABSL_LOCKS_EXCLUDED(mutex_);
  const std::string& key() const { return key_; }
  GuestIdentity identity() const ABSL_LOCKS_EXCLUDED(mutex_);
  // Null until built (and after the identity changed).
  std::shared_ptr<const GuestView> cached_view() const { return std::atomic_load(&view_); }
  void set_cached_view(std::shared_ptr<const GuestView> view) {
    std::atomic_store(&view_, std::move(view));
  }
  std::string log_name() const ABSL_LOCKS_EXCLUDED(mutex_);
  uint32_t vcpu_count() const ABSL_LOCKS_EXCLUDED(mutex_);
  bool EventAllowed(uint8_t event) const ABSL_LOCKS_EXCLUDED(mutex_);

  // Leases (any thread): arming follows the union of all leases.
  void SetLease(const OwnerId& owner, Arming arming) ABSL_LOCKS_EXCLUDED(mutex_);
  void AddLease(const OwnerId& owner, const Arming& arming) ABSL_LOCKS_EXCLUDED(mutex_);
  void ReleaseLease(const OwnerId& owner) ABSL_LOCKS_EXCLUDED(mutex_);
  // Runs once the host answered every command one arming change sent (at once if it sent none),
  // with the failures among them.
  using ArmedCallback = std::function<void(std::vector<std::string> errors)>;
  // Changes the owner's lease in place (read, `change`, write back under one lock) and applies
  // the result; returns the lease after the change. `armed` (optional): see ArmedCallback.
  Arming UpdateLease(const OwnerId& owner, const std::function<void(Arming*)>& change,
                     ArmedCallback armed = nullptr) ABSL_LOCKS_EXCLUDED(mutex_);

  // Pauses a vCPU for `owner` (KVMI_PAUSE_VCPU). `paused` runs once the vCPU has stopped (its
  // PAUSE_VCPU event is held), or with the failure. The vCPU stays paused until Resume, until the
  // owner is released, or until the pause deadline of the verdict pipeline.
  void Pause(const OwnerId& owner, uint16_t vcpu, const std::function<void(CommandResult)>& paused)
      ABSL_LOCKS_EXCLUDED(mutex_);
  // False if `owner` has no pause on that vCPU.
  bool Resume(const OwnerId& owner, uint16_t vcpu) ABSL_LOCKS_EXCLUDED(mutex_);
  // Everything `owner` holds: its leases and its paused vCPUs (a client went away).
  void ReleaseOwner(const OwnerId& owner) ABSL_LOCKS_EXCLUDED(mutex_);
  // Pipeline: the PAUSE_VCPU event of `vcpu` (daemon-wide id `event_id`) arrived. Takes the hold
  // if someone asked for this pause (true), else the caller answers CONTINUE at once (false).
  bool HoldPause(uint16_t vcpu, std::unique_ptr<HeldEvent> hold, uint64_t event_id = 0)
      ABSL_LOCKS_EXCLUDED(mutex_);
  // The id of the PAUSE_VCPU event `vcpu` is held paused with (a command bound to it, such as
  // SetRegisters with event_id, reaches only that pause); 0 when none is held. After the pause
  // deadline let the vCPU go it is that pause's id until the next pause (a call bound to it is
  // refused: the vCPU no longer waits with it).
  uint64_t PausedEventId(uint16_t vcpu) const ABSL_LOCKS_EXCLUDED(mutex_);
  bool HasPauseRequest(uint16_t vcpu) const ABSL_LOCKS_EXCLUDED(mutex_);

  // Sets the rights `owner` wants on pages (gfn -> KVMI_PAGE_ACCESS_* bits; rwx = none) and
  // applies the effective result now. `done` gets one error per page (the v6 kernel reports one
  // error per message: every page of a failed message carries it) and whether the call was
  // rolled back (all_or_nothing and a failure: host and lease are as before the call).
  using PagesCallback = std::function<void(std::vector<int32_t> errors, bool rolled_back)>;
  void SetPages(const OwnerId& owner, std::vector<std::pair<uint64_t, uint8_t>> pages,
                bool all_or_nothing, PagesCallback done) ABSL_LOCKS_EXCLUDED(mutex_);

  // Releases every hook and closes the session promptly (UNHOOK, shutdown).
  void Unhook(const std::string& why, const std::function<void()>& done = nullptr)
      ABSL_LOCKS_EXCLUDED(mutex_);

  void CountFallback() { fallbacks_++; }

  // GuestSession::Listener
  void OnEvent(const std::shared_ptr<GuestSession>& session, const kvmi::Event& event) override;
  void OnClosed(const std::shared_ptr<GuestSession>& session, const std::string& reason) override;

 private:
  struct PauseRequest {
    OwnerId owner;
    std::function<void(CommandResult)> paused;
  };
  struct Hold {
    OwnerId owner;
    std::unique_ptr<HeldEvent> event;
    uint64_t event_id = 0;
  };

  // Probing is done (loop thread of `session`): hooks the guest, or closes the session.
  void OnProbed(const std::shared_ptr<GuestSession>& session,
                absl::StatusOr<HostCapabilities> probed);
  // Runs `change` on the leases under mutex_; if it changed them (returns true), counts the
  // decision as arming in flight and applies it. Every lease change goes through here.
  void ChangeLeases(const std::function<bool(Leases*)>& change, ArmedCallback armed = nullptr)
      ABSL_LOCKS_EXCLUDED(mutex_);
  // Sends what takes the guest from applied_ to the leases' union. Never holds mutex_ while
  // sending. Consumes one count of arming_in_flight_ that the caller took, under mutex_, with
  // its lease change (so a snapshot never shows a changed lease with nothing in flight).
  void ApplyArming(ArmedCallback armed = nullptr) ABSL_LOCKS_EXCLUDED(mutex_);
  void ApplyArmingInLoop(const std::shared_ptr<GuestSession>& session, const ArmedCallback& armed)
      ABSL_LOCKS_EXCLUDED(mutex_);
  // SetPages' steps after the call was counted in flight (loop thread of `session`).
  void SetPagesInLoop(const std::shared_ptr<GuestSession>& session,
                      const std::shared_ptr<PageAccessChange>& change, const PagesCallback& done)
      ABSL_LOCKS_EXCLUDED(mutex_);
  void OnPagesAnswered(const std::shared_ptr<GuestSession>& session,
                       const std::shared_ptr<PageAccessChange>& change, const PagesCallback& done)
      ABSL_LOCKS_EXCLUDED(mutex_);
  void OnPauseFailed(const OwnerId& owner, uint16_t vcpu, CommandResult result)
      ABSL_LOCKS_EXCLUDED(mutex_);
  void ArmNewVcpu(uint16_t vcpu) ABSL_LOCKS_EXCLUDED(mutex_);
  void RecordArmError(const std::string& what) ABSL_LOCKS_EXCLUDED(mutex_);
  std::string LogNameLocked() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mutex_);

  void NotifyStateChanged();

  const std::string key_;
  GuestEventRouter* const router_;
  GuestStateListener* const state_listener_;

  mutable Mutex mutex_;
  GuestIdentity identity_ ABSL_GUARDED_BY(mutex_);
  GuestState state_ ABSL_GUARDED_BY(mutex_) = GuestState::kHandshaking;
  std::shared_ptr<GuestSession> session_ ABSL_GUARDED_BY(mutex_);
  HostCapabilities host_ ABSL_GUARDED_BY(mutex_);  // vcpu_count grows with CREATE_VCPU
  uint64_t connections_ ABSL_GUARDED_BY(mutex_) = 0;
  Leases leases_ ABSL_GUARDED_BY(mutex_);
  Arming applied_ ABSL_GUARDED_BY(mutex_);
  std::vector<std::string> arm_errors_ ABSL_GUARDED_BY(mutex_);
  // Pauses asked for whose event is not here yet, and vCPUs paused now.
  std::map<uint16_t, std::deque<PauseRequest>> pause_requests_ ABSL_GUARDED_BY(mutex_);
  std::map<uint16_t, Hold> held_ ABSL_GUARDED_BY(mutex_);

  std::shared_ptr<const GuestView> view_;  // atomic_load/atomic_store only
  std::atomic<uint64_t> arming_in_flight_{0};
  std::atomic<uint64_t> events_{0};
  std::atomic<uint64_t> fallbacks_{0};
};

}  // namespace kvmid

#endif  // KVMID_DAEMON_GUEST_GUEST_H_
