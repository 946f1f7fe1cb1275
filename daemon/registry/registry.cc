#include "daemon/registry/registry.h"

#include <spdlog/spdlog.h>

namespace kvmid {

std::string Registry::KeyFor(const GuestIdentity& identity) {
  bool zero_uuid = true;
  for (uint8_t b : identity.uuid) zero_uuid = zero_uuid && b == 0;
  if (!zero_uuid) return kvmi::UuidToString(identity.uuid);
  if (!identity.name.empty()) return "name:" + identity.name;
  MutexLock lock(&mutex_);
  return "anonymous:" + std::to_string(++anonymous_);
}

std::shared_ptr<Guest> Registry::FindOrCreate(const GuestIdentity& identity) {
  std::string key = KeyFor(identity);
  std::vector<std::shared_ptr<Guest>> dropped;  // freed after the lock
  MutexLock lock(&mutex_);
  ForgetLocked(Clock::now(), &dropped);
  auto it = guests_.find(key);
  if (it == guests_.end()) {
    it = guests_.emplace(key, std::make_shared<Guest>(key, identity, router_, this)).first;
  }
  return it->second;
}

bool Registry::Attach(const std::shared_ptr<Guest>& guest,
                      const std::shared_ptr<GuestSession>& session) {
  if (guest->Attach(session)) {
    MutexLock lock(&mutex_);
    UnmarkGoneLocked(guest->key());
    // Forgotten between FindOrCreate and now: it is live, so it is remembered again (unless a
    // newer object took its key meanwhile, which keeps it).
    guests_.emplace(guest->key(), guest);
    return true;
  }
  duplicate_rejections_++;
  spdlog::error("{}: a second live connection ({}) claims this guest; refused", session->log_name(),
                session->identity().transport);
  return false;
}

void Registry::SetGoneGuestBounds(Clock::duration retention, size_t max_gone) {
  std::vector<std::shared_ptr<Guest>> dropped;
  MutexLock lock(&mutex_);
  retention_ = retention;
  max_gone_ = max_gone;
  ForgetLocked(Clock::now(), &dropped);
}

size_t Registry::gone_guests() const {
  MutexLock lock(&mutex_);
  return gone_since_.size();
}

void Registry::UnmarkGoneLocked(const std::string& key) const {
  auto it = gone_since_.find(key);
  if (it == gone_since_.end()) return;
  gone_order_.erase({it->second, key});
  gone_since_.erase(it);
}

void Registry::ForgetLocked(Clock::time_point now,
                            std::vector<std::shared_ptr<Guest>>* dropped) const {
  while (!gone_order_.empty()) {
    const auto& [since, key] = *gone_order_.begin();
    if (now - since < retention_ && gone_since_.size() <= max_gone_) break;
    const std::string forget = key;
    UnmarkGoneLocked(forget);
    auto it = guests_.find(forget);
    if (it == guests_.end()) continue;
    // Marked gone by its last notification; a guest that reconnected since is kept.
    if (it->second->state() != GuestState::kGone || it->second->session() != nullptr) continue;
    dropped->push_back(std::move(it->second));
    guests_.erase(it);
    forgotten_.fetch_add(1, std::memory_order_relaxed);
  }
}

void Registry::Forget() const {
  std::vector<std::shared_ptr<Guest>> dropped;
  MutexLock lock(&mutex_);
  ForgetLocked(Clock::now(), &dropped);
}

std::shared_ptr<Guest> Registry::Find(const std::string& key) const {
  MutexLock lock(&mutex_);
  auto it = guests_.find(key);
  return it == guests_.end() ? nullptr : it->second;
}

std::shared_ptr<Guest> Registry::Lookup(const std::string& uuid_or_name) const {
  Forget();
  if (auto guest = Find(uuid_or_name)) return guest;
  kvmi::Uuid uuid;
  if (kvmi::ParseUuid(uuid_or_name, &uuid)) {
    if (auto guest = Find(kvmi::UuidToString(uuid))) return guest;  // case-insensitive input
  }
  MutexLock lock(&mutex_);
  for (const auto& [key, guest] : guests_) {
    if (guest->Snapshot().identity.name == uuid_or_name) return guest;
  }
  return nullptr;
}

std::vector<std::shared_ptr<Guest>> Registry::List() const {
  Forget();
  MutexLock lock(&mutex_);
  std::vector<std::shared_ptr<Guest>> out;
  out.reserve(guests_.size());
  for (const auto& [key, guest] : guests_) out.push_back(guest);
  return out;
}

}  // namespace kvmid

namespace kvmid {

uint64_t Registry::AddStateWatcher(StateWatcher watcher) {
  MutexLock lock(&watchers_mutex_);
  uint64_t id = next_watcher_++;
  watchers_.emplace(id, std::move(watcher));
  return id;
}

void Registry::RemoveStateWatcher(uint64_t id) {
  MutexLock lock(&watchers_mutex_);
  watchers_.erase(id);
}

void Registry::GuestStateChanged(const std::shared_ptr<Guest>& guest) {
  {
    // Remembered as gone from now on (ForgetLocked checks the state again before it forgets).
    const bool gone = guest->state() == GuestState::kGone;
    MutexLock lock(&mutex_);
    auto it = guests_.find(guest->key());
    if (it != guests_.end() && it->second == guest) {
      if (!gone) {
        UnmarkGoneLocked(guest->key());
      } else if (gone_since_.count(guest->key()) == 0) {
        const Clock::time_point now = Clock::now();
        gone_since_.emplace(guest->key(), now);
        gone_order_.emplace(now, guest->key());
      }
    }
  }
  MutexLock lock(&watchers_mutex_);  // watchers only queue: never long
  for (const auto& [id, watcher] : watchers_) watcher(guest);
}

}  // namespace kvmid
