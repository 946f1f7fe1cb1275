// A short-lived cache of one guest's translations, per vCPU (plus one bucket for explicit CR3s),
// keyed by the paging context and the 4 KiB page of the address. Only present translations are
// kept. An entry goes when:
//   - it is older than the time to live (the guest may change its tables unseen);
//   - its vCPU changes CR3 (InvalidateVcpu: a CR3-write event kvmid saw);
//   - something writes a page that held one of the entries its walk read (InvalidatePhysical:
//     kvmid's own WritePhysical, a PF write event on a page-table page) -- then the whole cache
//     goes, which is simple and always correct.
// Lookup and Insert are any-thread; all state is under one lock.
#ifndef KVMID_DAEMON_VMEM_TRANSLATION_CACHE_H_
#define KVMID_DAEMON_VMEM_TRANSLATION_CACHE_H_

#include <chrono>
#include <cstdint>
#include <map>
#include <optional>
#include <unordered_map>

#include "absl/base/thread_annotations.h"
#include "daemon/base/mutex.h"
#include "daemon/vmem/page_walker.h"

namespace kvmid::vmem {

// The cache's limits (defaults; the API can pass others).
inline constexpr std::chrono::milliseconds kDefaultCacheTtl{250};
inline constexpr size_t kDefaultMaxEntriesPerVcpu = 4096;
// The bucket of translations made with an explicit CR3 rather than a vCPU's.
inline constexpr uint32_t kNoVcpu = UINT32_MAX;

struct CacheOptions {
  std::chrono::milliseconds ttl = kDefaultCacheTtl;
  size_t max_entries_per_vcpu = kDefaultMaxEntriesPerVcpu;  // a full bucket is emptied
};

struct CacheStats {
  uint64_t hits = 0;
  uint64_t misses = 0;
  uint64_t inserts = 0;
  uint64_t vcpu_invalidations = 0;      // buckets emptied by a CR3 change
  uint64_t physical_invalidations = 0;  // whole-cache flushes by a write to a table page
  size_t entries = 0;
};

class TranslationCache {
 public:
  using Clock = std::chrono::steady_clock;
  explicit TranslationCache(CacheOptions options = {}) : options_(options) {}

  // The cached translation of `gva` (its gpa adjusted to gva's offset in the page), if fresh.
  std::optional<Translation> Lookup(uint32_t vcpu, const PagingContext& context, uint64_t gva,
                                    Clock::time_point now) ABSL_LOCKS_EXCLUDED(mu_);
  // Keeps `translation` of `gva` (ignored unless present).
  void Insert(uint32_t vcpu, const PagingContext& context, uint64_t gva,
              const Translation& translation, Clock::time_point now) ABSL_LOCKS_EXCLUDED(mu_);
  // The vCPU's CR3 changed (or is about to): its bucket goes.
  void InvalidateVcpu(uint32_t vcpu) ABSL_LOCKS_EXCLUDED(mu_);
  // [gpa, gpa + size) was written: if it holds an entry some cached walk read, everything goes.
  // True if it did.
  bool InvalidatePhysical(uint64_t gpa, uint64_t size) ABSL_LOCKS_EXCLUDED(mu_);
  void Clear() ABSL_LOCKS_EXCLUDED(mu_);
  CacheStats stats() const ABSL_LOCKS_EXCLUDED(mu_);

 private:
  struct Key {
    PagingContext context;
    uint64_t page = 0;
    bool operator<(const Key& o) const;
  };
  struct Entry {
    Translation translation;  // gpa is the page's base (gva's offset removed)
    Clock::time_point expires;
  };
  using Bucket = std::map<Key, Entry>;

  void ForgetTablesLocked(const Translation& t) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void ClearLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const CacheOptions options_;
  mutable Mutex mu_;
  std::unordered_map<uint32_t, Bucket> buckets_ ABSL_GUARDED_BY(mu_);
  // Pages (gfn) holding entries that cached walks read, with how many cached walks read them.
  std::unordered_map<uint64_t, uint32_t> table_pages_ ABSL_GUARDED_BY(mu_);
  CacheStats stats_ ABSL_GUARDED_BY(mu_);
};

}  // namespace kvmid::vmem

#endif  // KVMID_DAEMON_VMEM_TRANSLATION_CACHE_H_
