// The page-table builder: what it writes is what the hardware would walk (checked with a small
// walker of this test's own, written from the SDM, independent of kvmid's), the oracle answers
// from the mappings made, the kernel half is shared, and bad requests are refused.
#include "kernel/sim/page_tables.h"

#include <cstring>
#include <map>
#include <random>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace kvmi::sim {
namespace {

class Memory {
 public:
  bool Write(uint64_t gpa, const void* data, size_t size) {
    for (size_t i = 0; i < size; ++i) bytes_[gpa + i] = static_cast<const uint8_t*>(data)[i];
    return true;
  }
  uint64_t Read(uint64_t gpa, unsigned size) const {
    uint64_t v = 0;
    for (unsigned i = 0; i < size; ++i) {
      auto it = bytes_.find(gpa + i);
      v |= uint64_t{it == bytes_.end() ? uint8_t{0} : it->second} << (8 * i);
    }
    return v;
  }
  PageTableBuilder::Writer writer() {
    return [this](uint64_t gpa, const void* d, size_t n) { return Write(gpa, d, n); };
  }

 private:
  std::map<uint64_t, uint8_t> bytes_;
};

// The SDM's walk, minimal: present/large/leaf, W/U/NX accumulated.
ExpectedTranslation Walk(const Memory& m, PagingMode mode, uint64_t cr3, uint64_t gva) {
  ExpectedTranslation out;
  struct Level {
    unsigned shift, bits;
  };
  std::vector<Level> levels;
  unsigned entry = 8;
  switch (mode) {
    case PagingMode::k32Bit:
      levels = {{22, 10}, {12, 10}};
      entry = 4;
      break;
    case PagingMode::kPae:
      levels = {{30, 2}, {21, 9}, {12, 9}};
      break;
    case PagingMode::k4Level:
      levels = {{39, 9}, {30, 9}, {21, 9}, {12, 9}};
      break;
    case PagingMode::k5Level:
      levels = {{48, 9}, {39, 9}, {30, 9}, {21, 9}, {12, 9}};
      break;
  }
  uint64_t table = cr3 & ~0xfffull;
  bool w = true, u = true, x = true;
  for (size_t i = 0; i < levels.size(); ++i) {
    uint64_t index = (gva >> levels[i].shift) & ((1ull << levels[i].bits) - 1);
    uint64_t e = m.Read(table + index * entry, entry);
    if (!(e & kPtePresent)) return out;
    bool pdpte = mode == PagingMode::kPae && i == 0;
    if (!pdpte) {
      w &= (e & kPteWritable) != 0;
      u &= (e & kPteUser) != 0;
      x &= !(e & kPteNx);
    }
    bool leaf = i + 1 == levels.size() || (!pdpte && (e & kPteLarge));
    uint64_t addr = e & (entry == 4 ? 0xfffff000ull : 0x000ffffffffff000ull);
    if (leaf) {
      uint64_t size = 1ull << levels[i].shift;
      out = {true, (addr & ~(size - 1)) | (gva & (size - 1)), size, w, u, x};
      return out;
    }
    table = addr;
  }
  return out;
}

void Build(PageTableBuilder* b, std::vector<uint64_t>* roots) {
  PagingMode mode = b->mode();
  bool wide = mode == PagingMode::k4Level || mode == PagingMode::k5Level;
  uint64_t big = PageSizes(mode)[1];
  uint64_t k = KernelHalfStart(mode);
  ASSERT_TRUE(b->Map(0, k, 0, 4 * big, big, {true, false, false})) << b->error();
  ASSERT_TRUE(b->Map(0, k + 8 * big, 0x100000, 0x10000, k4KiB, {false, true, true})) << b->error();
  ASSERT_TRUE(b->MapNotPresent(0, k + 8 * big + 0x10000, 0x77)) << b->error();
  for (int p = 0; p < 3; ++p) {
    uint64_t cr3 = b->NewProcess();
    ASSERT_NE(cr3, 0u) << b->error();
    roots->push_back(cr3);
    uint64_t frames = 0x2000000 + p * 0x100000;
    ASSERT_TRUE(b->Map(cr3, 0x400000, frames, 0x4000, k4KiB, {false, true, true}));
    ASSERT_TRUE(b->Map(cr3, 0x600000, frames + 0x10000, 0x8000, k4KiB, {true, true, false}));
    ASSERT_TRUE(b->MapNotPresent(cr3, 0x5ff000, 0x1000 + p));
    ASSERT_TRUE(b->Map(cr3, 0x40000000, 2 * big, big, big, {true, true, false})) << b->error();
    if (wide) {
      ASSERT_TRUE(b->Map(cr3, 0x7f0000000000ull, 0, k1GiB, k1GiB, {false, true, false}));
    }
  }
  // A kernel mapping made after the processes exist reaches all of them.
  ASSERT_TRUE(b->Map(0, k + 64 * big, 6 * big, big, big, {true, false, false})) << b->error();
}

class PageTablesTest : public ::testing::TestWithParam<PagingMode> {};

TEST_P(PageTablesTest, TheTablesInMemoryWalkToTheOraclesAnswer) {
  Memory memory;
  PageTableBuilder b(GetParam(), memory.writer(), 0x1000000, 0x1400000);
  std::vector<uint64_t> roots;
  Build(&b, &roots);
  std::mt19937_64 rng(7);
  int present = 0, absent = 0;
  for (uint64_t cr3 : roots) {
    for (int i = 0; i < 3000; ++i) {
      uint64_t gva = (i % 3 == 0) ? rng() : b.MappedAddress(cr3, rng());
      if (GetParam() == PagingMode::k32Bit || GetParam() == PagingMode::kPae) gva &= 0xffffffff;
      ExpectedTranslation want = b.Expect(cr3, gva);
      ExpectedTranslation got = Walk(memory, GetParam(), cr3, gva);
      ASSERT_EQ(got.present, want.present) << std::hex << gva;
      want.present ? ++present : ++absent;
      if (!want.present) continue;
      EXPECT_EQ(got.gpa, want.gpa) << std::hex << gva;
      EXPECT_EQ(got.page_size, want.page_size) << std::hex << gva;
      EXPECT_EQ(got.writable, want.writable) << std::hex << gva;
      EXPECT_EQ(got.user, want.user) << std::hex << gva;
      EXPECT_EQ(got.executable, want.executable) << std::hex << gva;
    }
  }
  EXPECT_GT(present, 3000);
  EXPECT_GT(absent, 1000);
}

TEST_P(PageTablesTest, KernelHalfIsSharedAndUserHalvesAreNot) {
  Memory memory;
  PageTableBuilder b(GetParam(), memory.writer(), 0x1000000, 0x1400000);
  std::vector<uint64_t> roots;
  Build(&b, &roots);
  uint64_t big = PageSizes(GetParam())[1];
  uint64_t late = KernelHalfStart(GetParam()) + 64 * big;
  for (uint64_t cr3 : roots) {
    ExpectedTranslation k = Walk(memory, GetParam(), cr3, late + 5);
    EXPECT_TRUE(k.present);
    EXPECT_EQ(k.gpa, 6 * big + 5);
    EXPECT_FALSE(k.user);
  }
  // The same user address lands on each process's own frames.
  EXPECT_NE(Walk(memory, GetParam(), roots[0], 0x400000).gpa,
            Walk(memory, GetParam(), roots[1], 0x400000).gpa);
  // A kernel leaf asked to be user-accessible is not: the kernel's upper entries are not.
  uint64_t text = KernelHalfStart(GetParam()) + 8 * big;
  EXPECT_FALSE(b.Expect(roots[0], text).user);
  EXPECT_FALSE(Walk(memory, GetParam(), roots[0], text).user);
}

TEST_P(PageTablesTest, NotPresentEntriesAreNonZeroAndNxMarksData) {
  Memory memory;
  PageTableBuilder b(GetParam(), memory.writer(), 0x1000000, 0x1400000);
  std::vector<uint64_t> roots;
  Build(&b, &roots);
  EXPECT_FALSE(b.Expect(roots[0], 0x5ff000).present);
  EXPECT_FALSE(Walk(memory, GetParam(), roots[0], 0x5ff000).present);
  bool has_nx = GetParam() != PagingMode::k32Bit;
  EXPECT_EQ(Walk(memory, GetParam(), roots[0], 0x600000).executable, !has_nx);
  EXPECT_TRUE(Walk(memory, GetParam(), roots[0], 0x400000).executable);
  EXPECT_FALSE(Walk(memory, GetParam(), roots[0], 0x400000).writable);
}

TEST_P(PageTablesTest, RefusesOverlapsMisalignmentAndUnsupportedSizes) {
  Memory memory;
  PageTableBuilder b(GetParam(), memory.writer(), 0x1000000, 0x1400000);
  uint64_t cr3 = b.NewProcess();
  ASSERT_TRUE(b.Map(cr3, 0x400000, 0x2000000, 0x2000, k4KiB, {}));
  EXPECT_FALSE(b.Map(cr3, 0x401000, 0x3000000, 0x1000, k4KiB, {}));
  EXPECT_THAT(b.error(), ::testing::HasSubstr("overlaps"));
  EXPECT_FALSE(b.Map(cr3, 0x500800, 0x3000000, 0x1000, k4KiB, {}));
  EXPECT_THAT(b.error(), ::testing::HasSubstr("unaligned"));
  EXPECT_FALSE(b.Map(cr3, 0x40000000, 0, k1GiB, k1GiB, {}) &&
               (GetParam() == PagingMode::k32Bit || GetParam() == PagingMode::kPae));
  EXPECT_FALSE(b.Map(cr3 + 0x1000, 0x800000, 0x3000000, 0x1000, k4KiB, {}));
  EXPECT_FALSE(b.MapNotPresent(cr3, 0x400000, 1));
}

TEST(PageTablesAreaTest, AFullTableAreaIsAnError) {
  Memory memory;
  PageTableBuilder b(PagingMode::k4Level, memory.writer(), 0x1000000, 0x1003000);
  uint64_t cr3 = b.NewProcess();
  ASSERT_NE(cr3, 0u);
  // One table left: a 4 KiB mapping needs three more.
  EXPECT_FALSE(b.Map(cr3, 0x400000, 0x2000000, 0x1000, k4KiB, {}));
  EXPECT_THAT(b.error(), ::testing::HasSubstr("full"));
}

TEST(PagingRegistersTest, EachModeSetsItsControlBits) {
  PagingRegisters r = RegistersFor(PagingMode::k5Level, {0, kCr4Pse, 0});
  EXPECT_TRUE(r.cr0 & kCr0Pg);
  EXPECT_TRUE(r.cr4 & kCr4La57);
  EXPECT_TRUE(r.efer & kEferLma);
  r = RegistersFor(PagingMode::k32Bit, r);
  EXPECT_FALSE(r.cr4 & (kCr4Pae | kCr4La57));
  EXPECT_FALSE(r.efer & (kEferLma | kEferNxe));
  r = RegistersFor(PagingMode::kPae, r);
  EXPECT_TRUE(r.cr4 & kCr4Pae);
  EXPECT_TRUE(r.efer & kEferNxe);
  EXPECT_FALSE(r.efer & kEferLma);
  PagingMode m;
  EXPECT_TRUE(ParsePagingMode("pae", &m));
  EXPECT_EQ(m, PagingMode::kPae);
  EXPECT_FALSE(ParsePagingMode("6level", &m));
}

INSTANTIATE_TEST_SUITE_P(Modes, PageTablesTest,
                         ::testing::Values(PagingMode::k32Bit, PagingMode::kPae,
                                           PagingMode::k4Level, PagingMode::k5Level),
                         [](const auto& info) { return std::string(PagingModeName(info.param)); });

}  // namespace
}  // namespace kvmi::sim
