// All guests the daemon has seen, by UUID. A reconnecting guest gets its Guest object (and its
// leases) back; a second live connection claiming a UUID that is already hooked is refused and
// reported, never merged.
#ifndef KVMID_DAEMON_REGISTRY_REGISTRY_H_
#define KVMID_DAEMON_REGISTRY_REGISTRY_H_

#include <atomic>
#include <functional>
#include <map>
#include <memory>
#include <string>
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
  // `session`); the refusal is counted and logged.
  bool Attach(const std::shared_ptr<Guest>& guest, const std::shared_ptr<GuestSession>& session);

  std::shared_ptr<Guest> Find(const std::string& key) const;
  // By UUID text, name or key: what a user types.
  std::shared_ptr<Guest> Lookup(const std::string& uuid_or_name) const;
  std::vector<std::shared_ptr<Guest>> List() const;

  uint64_t duplicate_rejections() const { return duplicate_rejections_.load(); }

 private:
  GuestEventRouter* const router_;
  mutable Mutex mutex_;
  std::map<std::string, std::shared_ptr<Guest>> guests_ ABSL_GUARDED_BY(mutex_);
  uint64_t anonymous_ ABSL_GUARDED_BY(mutex_) = 0;
  std::atomic<uint64_t> duplicate_rejections_{0};
  // Never held with mutex_ (watchers are called from any thread a guest changes state on).
  Mutex watchers_mutex_;
  uint64_t next_watcher_ ABSL_GUARDED_BY(watchers_mutex_) = 1;
  std::map<uint64_t, StateWatcher> watchers_ ABSL_GUARDED_BY(watchers_mutex_);
};

}  // namespace kvmid

#endif  // KVMID_DAEMON_REGISTRY_REGISTRY_H_
