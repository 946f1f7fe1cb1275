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
  MutexLock lock(&mutex_);
  auto it = guests_.find(key);
  if (it == guests_.end()) {
    it = guests_.emplace(key, std::make_shared<Guest>(key, identity, router_, this)).first;
  }
  return it->second;
}

bool Registry::Attach(const std::shared_ptr<Guest>& guest,
                      const std::shared_ptr<GuestSession>& session) {
  if (guest->Attach(session)) return true;
  duplicate_rejections_++;
  spdlog::error("{}: a second live connection ({}) claims this guest; refused", session->log_name(),
                session->identity().transport);
  return false;
}

std::shared_ptr<Guest> Registry::Find(const std::string& key) const {
  MutexLock lock(&mutex_);
  auto it = guests_.find(key);
  return it == guests_.end() ? nullptr : it->second;
}

std::shared_ptr<Guest> Registry::Lookup(const std::string& uuid_or_name) const {
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
  MutexLock lock(&watchers_mutex_);  // watchers only queue: never long
  for (const auto& [id, watcher] : watchers_) watcher(guest);
}

}  // namespace kvmid
