#include "daemon/vmem/translation_cache.h"

#include <tuple>

namespace kvmid::vmem {

bool TranslationCache::Key::operator<(const Key& o) const {
  return std::make_tuple(page, context.cr3, static_cast<int>(context.mode), context.nxe,
                         context.pse, context.max_phys_bits) <
         std::make_tuple(o.page, o.context.cr3, static_cast<int>(o.context.mode), o.context.nxe,
                         o.context.pse, o.context.max_phys_bits);
}

std::optional<Translation> TranslationCache::Lookup(uint32_t vcpu, const PagingContext& context,
                                                    uint64_t gva, Clock::time_point now) {
  MutexLock lock(&mu_);
  auto bucket = buckets_.find(vcpu);
  if (bucket != buckets_.end()) {
    auto it = bucket->second.find(Key{context, gva / kPageSize});
    if (it != bucket->second.end()) {
      if (it->second.expires > now) {
        ++stats_.hits;
        Translation t = it->second.translation;
        t.gpa += gva & (t.page_size - 1);
        return t;
      }
      ForgetTablesLocked(it->second.translation);
      bucket->second.erase(it);
      --stats_.entries;
    }
  }
  ++stats_.misses;
  return std::nullopt;
}

void TranslationCache::Insert(uint32_t vcpu, const PagingContext& context, uint64_t gva,
                              const Translation& translation, Clock::time_point now) {
  if (!translation.present || translation.page_size == 0) return;
  MutexLock lock(&mu_);
  Bucket& bucket = buckets_[vcpu];
  if (bucket.size() >= options_.max_entries_per_vcpu) {
    for (const auto& [key, entry] : bucket) ForgetTablesLocked(entry.translation);
    stats_.entries -= bucket.size();
    bucket.clear();
  }
  Entry entry{translation, now + options_.ttl};
  entry.translation.gpa -= gva & (translation.page_size - 1);
  Key key{context, gva / kPageSize};
  auto old = bucket.find(key);
  if (old != bucket.end()) {
    ForgetTablesLocked(old->second.translation);  // replaced: its walk's pages no longer count
    old->second = entry;
  } else {
    bucket.emplace(key, entry);
    ++stats_.entries;
  }
  for (int i = 0; i < translation.entries_read; ++i) {
    ++table_pages_[translation.entry_gpas[i] / kPageSize];
  }
  ++stats_.inserts;
}

void TranslationCache::ForgetTablesLocked(const Translation& t) {
  for (int i = 0; i < t.entries_read; ++i) {
    auto it = table_pages_.find(t.entry_gpas[i] / kPageSize);
    if (it != table_pages_.end() && --it->second == 0) table_pages_.erase(it);
  }
}

void TranslationCache::InvalidateVcpu(uint32_t vcpu) {
  MutexLock lock(&mu_);
  auto bucket = buckets_.find(vcpu);
  if (bucket == buckets_.end()) return;
  for (const auto& [key, entry] : bucket->second) ForgetTablesLocked(entry.translation);
  stats_.entries -= bucket->second.size();
  buckets_.erase(bucket);
  ++stats_.vcpu_invalidations;
}

bool TranslationCache::InvalidatePhysical(uint64_t gpa, uint64_t size) {
  if (size == 0) return false;
  MutexLock lock(&mu_);
  if (table_pages_.empty()) return false;
  uint64_t last = (gpa + size - 1) / kPageSize;
  if (last < gpa / kPageSize) last = UINT64_MAX / kPageSize;  // wraps: to the end
  bool hit = false;
  if (last - gpa / kPageSize < table_pages_.size()) {
    for (uint64_t gfn = gpa / kPageSize; gfn <= last && !hit; ++gfn) {
      hit = table_pages_.count(gfn) != 0;
    }
  } else {
    for (const auto& [gfn, count] : table_pages_) {
      hit |= gfn >= gpa / kPageSize && gfn <= last;
    }
  }
  if (!hit) return false;
  ClearLocked();
  ++stats_.physical_invalidations;
  return true;
}

void TranslationCache::Clear() {
  MutexLock lock(&mu_);
  ClearLocked();
}

void TranslationCache::ClearLocked() {
  buckets_.clear();
  table_pages_.clear();
  stats_.entries = 0;
}

CacheStats TranslationCache::stats() const {
  MutexLock lock(&mu_);
  return stats_;
}

}  // namespace kvmid::vmem
