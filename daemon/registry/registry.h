// All guests the daemon has seen, by UUID. A reconnecting guest gets its Guest object (and its
// leases) back; a second live connection claiming a UUID that is already hooked is refused and
// reported, never merged.
//
// Guests that are gone (no connection) are remembered for a while only (SetGoneGuestBounds:
// limits.gone_guest_retention_seconds, limits.max_gone_guests): after the retention, or past the
// count with the oldest gone first, a guest is forgotten -- dropped from the registry with
// everything it holds (leases, its cached view), so ListVMs and GetVM answer as for a guest never
// seen. A KVMI peer that connects with new UUIDs over and over cannot grow kvmid. Forgetting
// happens when a guest is created and on List/Lookup (never on a guest's loop thread).
#ifndef KVMID_DAEMON_REGISTRY_REGISTRY_H_
#define KVMID_DAEMON_REGISTRY_REGISTRY_H_

#include <atomic>
#include <chrono>
#include <cstddef>
#include <functional>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "daemon/base/mutex.h"
#include "daemon/guest/guest.h"

namespace kvmid {

class Registry : public GuestStateListener {
 public:
  explicit Registry(GuestEventRouter* router) : router_(router) {}

  // Watchers see every lifecycle change of every guest (on the thread that made it).
  using StateWatcher = std::function<void(const std::shared_ptr<Guest>&)>;
  uint64_t AddStateWatcher(StateWatcher watcher);
  void RemoveStateWatcher(uint64_t id);
  void GuestStateChanged(const std::shared_ptr<Guest>& guest) override;

  // The registry key of a guest: its UUID; for QEMU without -uuid (all-zero UUID, as v6 QEMU
  // sends by default) the name, and for a guest with neither a fresh anonymous key (such a
  // guest cannot be recognised when it reconnects).
  std::string KeyFor(const GuestIdentity& identity);

  // The guest a new connection belongs to (created on first sight).
  std::shared_ptr<Guest> FindOrCreate(const GuestIdentity& identity);
  // Attaches `session` to `guest`. False if another live session holds it (the caller closes
  // `session`); the refusal is counted and logged. A guest forgotten since FindOrCreate returned
  // it is remembered again.
  bool Attach(const std::shared_ptr<Guest>& guest, const std::shared_ptr<GuestSession>& session);

  std::shared_ptr<Guest> Find(const std::string& key) const;
  // By UUID text, name or key: what a user types.
  std::shared_ptr<Guest> Lookup(const std::string& uuid_or_name) const;
  std::vector<std::shared_ptr<Guest>> List() const;

  uint64_t duplicate_rejections() const { return duplicate_rejections_.load(); }

  // How long a gone guest is remembered and how many at most (Daemon: at start and on reload).
  using Clock = std::chrono::steady_clock;
  void SetGoneGuestBounds(Clock::duration retention, size_t max_gone);
  // Gone guests remembered now, and those forgotten so far.
  size_t gone_guests() const;
  uint64_t forgotten_guests() const { return forgotten_.load(); }

 private:
  // Forgets the gone guests past the bounds at `now`; the guests dropped go to `dropped` (freed
  // by the caller, after the lock).
  void ForgetLocked(Clock::time_point now, std::vector<std::shared_ptr<Guest>>* dropped) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mutex_);
  void UnmarkGoneLocked(const std::string& key) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mutex_);
  // ForgetLocked with the lock taken here (List, Lookup: the caller holds no lock).
  void Forget() const;

  GuestEventRouter* const router_;
  mutable Mutex mutex_;
  mutable std::map<std::string, std::shared_ptr<Guest>> guests_ ABSL_GUARDED_BY(mutex_);
  // Gone guests by key (when they went) and in the order they went.
  mutable std::map<std::string, Clock::time_point> gone_since_ ABSL_GUARDED_BY(mutex_);
  mutable std::set<std::pair<Clock::time_point, std::string>> gone_order_ ABSL_GUARDED_BY(mutex_);
  Clock::duration retention_ ABSL_GUARDED_BY(mutex_) = std::chrono::minutes(10);
  size_t max_gone_ ABSL_GUARDED_BY(mutex_) = 4096;
  mutable std::atomic<uint64_t> forgotten_{0};
  uint64_t anonymous_ ABSL_GUARDED_BY(mutex_) = 0;
  std::atomic<uint64_t> duplicate_rejections_{0};
  // Never held with mutex_ (watchers are called from any thread a guest changes state on).
  Mutex watchers_mutex_;
  uint64_t next_watcher_ ABSL_GUARDED_BY(watchers_mutex_) = 1;
  std::map<uint64_t, StateWatcher> watchers_ ABSL_GUARDED_BY(watchers_mutex_);
};

}  // namespace kvmid

#endif  // KVMID_DAEMON_REGISTRY_REGISTRY_H_
