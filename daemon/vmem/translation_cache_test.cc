// The translation cache: hits within the time to live, per-vCPU buckets emptied on a CR3 change,
// everything dropped by a write to a page that held an entry a cached walk read, bounded size.
#include "daemon/vmem/translation_cache.h"

#include "gtest/gtest.h"

namespace kvmid::vmem {
namespace {

using namespace std::chrono_literals;

Translation Present(uint64_t gpa, uint64_t size, const std::vector<uint64_t>& tables) {
  Translation t;
  t.present = true;
  t.gpa = gpa;
  t.page_size = size;
  t.writable = true;
  t.level = size == kPageSize ? 1 : 2;
  for (uint64_t g : tables) t.entry_gpas[t.entries_read++] = g;
  return t;
}

PagingContext Ctx(uint64_t cr3) {
  PagingContext c;
  c.mode = PagingMode::k4Level;
  c.cr3 = cr3;
  c.nxe = true;
  return c;
}

TEST(TranslationCacheTest, HitsAdjustTheOffsetAndExpire) {
  TranslationCache cache(CacheOptions{100ms, 16});
  auto now = TranslationCache::Clock::now();
  cache.Insert(0, Ctx(0x1000), 0x200123, Present(0x5000123, 2 << 20, {0x1000, 0x2000, 0x3000}),
               now);
  auto hit = cache.Lookup(0, Ctx(0x1000), 0x201456, now);  // same 4 KiB? no: another page
  EXPECT_FALSE(hit.has_value());
  hit = cache.Lookup(0, Ctx(0x1000), 0x200fff, now + 50ms);
  ASSERT_TRUE(hit.has_value());
  EXPECT_EQ(hit->gpa, 0x5000fffu);
  EXPECT_FALSE(cache.Lookup(0, Ctx(0x9000), 0x200fff, now).has_value());          // another CR3
  EXPECT_FALSE(cache.Lookup(1, Ctx(0x1000), 0x200fff, now).has_value());          // another vCPU
  EXPECT_FALSE(cache.Lookup(0, Ctx(0x1000), 0x200fff, now + 100ms).has_value());  // expired
  EXPECT_EQ(cache.stats().entries, 0u);
  cache.Insert(0, Ctx(0x1000), 0x0, Translation{}, now);  // not present: not kept
  EXPECT_EQ(cache.stats().entries, 0u);
}

TEST(TranslationCacheTest, ACr3ChangeEmptiesThatVcpusBucketOnly) {
  TranslationCache cache;
  auto now = TranslationCache::Clock::now();
  cache.Insert(0, Ctx(0x1000), 0x1000, Present(0x7000, kPageSize, {0x1000}), now);
  cache.Insert(1, Ctx(0x1000), 0x1000, Present(0x7000, kPageSize, {0x1000}), now);
  cache.InvalidateVcpu(0);
  EXPECT_FALSE(cache.Lookup(0, Ctx(0x1000), 0x1000, now).has_value());
  EXPECT_TRUE(cache.Lookup(1, Ctx(0x1000), 0x1000, now).has_value());
  EXPECT_EQ(cache.stats().vcpu_invalidations, 1u);
}

TEST(TranslationCacheTest, AWriteToATablePageDropsEverythingAndOtherWritesNothing) {
  TranslationCache cache;
  auto now = TranslationCache::Clock::now();
  cache.Insert(0, Ctx(0x1000), 0x1000, Present(0x7000, kPageSize, {0x1008, 0x2010, 0x3ff8}), now);
  cache.Insert(kNoVcpu, Ctx(0x1000), 0x2000, Present(0x8000, kPageSize, {0x1008}), now);
  EXPECT_FALSE(cache.InvalidatePhysical(0x7000, 4096));  // the data page, not a table
  EXPECT_FALSE(cache.InvalidatePhysical(0x4000, 0));
  EXPECT_TRUE(cache.Lookup(0, Ctx(0x1000), 0x1000, now).has_value());
  EXPECT_TRUE(cache.InvalidatePhysical(0x2ffc, 8));  // straddles into the PD page at 0x3000
  EXPECT_FALSE(cache.Lookup(0, Ctx(0x1000), 0x1000, now).has_value());
  EXPECT_FALSE(cache.Lookup(kNoVcpu, Ctx(0x1000), 0x2000, now).has_value());
  EXPECT_EQ(cache.stats().physical_invalidations, 1u);
  // A huge range (e.g. a wrapped one) is checked against the watched pages, not page by page.
  cache.Insert(0, Ctx(0x1000), 0x1000, Present(0x7000, kPageSize, {0x1008}), now);
  EXPECT_TRUE(cache.InvalidatePhysical(0, UINT64_MAX));
}

TEST(TranslationCacheTest, AFullBucketIsEmptiedNotGrown) {
  TranslationCache cache(CacheOptions{1s, 8});
  auto now = TranslationCache::Clock::now();
  for (uint64_t i = 0; i < 20; ++i) {
    cache.Insert(0, Ctx(0x1000), i * kPageSize, Present(0x100000, kPageSize, {0x1000}), now);
    EXPECT_LE(cache.stats().entries, 8u);
  }
  // Replacing an entry does not count its tables twice: one invalidation still sees them.
  cache.Insert(0, Ctx(0x1000), 0, Present(0x100000, kPageSize, {0x1000}), now);
  cache.Insert(0, Ctx(0x1000), 0, Present(0x100000, kPageSize, {0x1000}), now);
  EXPECT_TRUE(cache.InvalidatePhysical(0x1000, 8));
  EXPECT_EQ(cache.stats().entries, 0u);
}

}  // namespace
}  // namespace kvmid::vmem
