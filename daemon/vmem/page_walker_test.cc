// The walker against kernel/sim's page-table builder: thousands of random addresses per paging
// mode must translate as the builder's oracle says (from the mappings it made, not from a walk),
// with reads answered inline and deferred (all walks in flight at once). Hostile tables: loops,
// entries outside RAM, reserved bits, garbage -- bounded work and a clear answer.
#include "daemon/vmem/page_walker.h"

#include <deque>
#include <map>
#include <random>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kernel/sim/page_tables.h"

namespace kvmid::vmem {
namespace {

using ::testing::HasSubstr;
namespace sim = ::kvmi::sim;

// Guest RAM below `limit`; reads beyond it fail as READ_PHYSICAL would. Deferred mode queues
// every read until Drain, so that many walks are in flight at once.
class FakeMemory : public EntryReader {
 public:
  explicit FakeMemory(uint64_t limit) : limit_(limit) {}
  bool Write(uint64_t gpa, const void* data, size_t size) {
    for (size_t i = 0; i < size; ++i) bytes_[gpa + i] = static_cast<const uint8_t*>(data)[i];
    return true;
  }
  void Write64(uint64_t gpa, uint64_t v) { Write(gpa, &v, 8); }
  void ReadEntry(uint64_t gpa, unsigned size,
                 std::function<void(absl::StatusOr<uint64_t>)> done) override {
    ++reads_;
    if (deferred_) {
      queue_.push_back([this, gpa, size, done] { done(Read(gpa, size)); });
      max_queued_ = std::max(max_queued_, queue_.size());
      return;
    }
    done(Read(gpa, size));
  }
  void Drain() {
    while (!queue_.empty()) {
      auto next = std::move(queue_.front());
      queue_.pop_front();
      next();
    }
  }
  void set_deferred(bool d) { deferred_ = d; }
  size_t reads() const { return reads_; }
  size_t max_queued() const { return max_queued_; }
  sim::PageTableBuilder::Writer writer() {
    return [this](uint64_t gpa, const void* d, size_t n) { return Write(gpa, d, n); };
  }

 private:
  absl::StatusOr<uint64_t> Read(uint64_t gpa, unsigned size) const {
    if (gpa >= limit_ || gpa + size > limit_) {
      return absl::InvalidArgumentError("-KVM_EINVAL (outside guest RAM)");
    }
    uint64_t v = 0;
    for (unsigned i = 0; i < size; ++i) {
      auto it = bytes_.find(gpa + i);
      v |= uint64_t{it == bytes_.end() ? uint8_t{0} : it->second} << (8 * i);
    }
    return v;
  }
  uint64_t limit_;
  std::map<uint64_t, uint8_t> bytes_;
  bool deferred_ = false;
  std::deque<std::function<void()>> queue_;
  size_t reads_ = 0;
  size_t max_queued_ = 0;
};

absl::StatusOr<Translation> WalkNow(std::shared_ptr<EntryReader> reader, const PagingContext& c,
                                    uint64_t gva) {
  absl::StatusOr<Translation> out = absl::UnknownError("no answer");
  int calls = 0;
  Walk(std::move(reader), c, gva, [&](absl::StatusOr<Translation> t) {
    out = std::move(t);
    ++calls;
  });
  EXPECT_EQ(calls, 1);
  return out;
}

PagingContext ContextFor(sim::PagingMode mode, uint64_t cr3) {
  sim::PagingRegisters r = sim::RegistersFor(mode, {0x11, 0, 0x1});
  return ContextFromRegisters(r.cr0, cr3, r.cr4, r.efer);
}

// A guest's worth of tables: the layout kernel/sim's guests get, plus more large pages.
struct Guest {
  explicit Guest(sim::PagingMode m)
      : mode(m),
        memory(std::make_shared<FakeMemory>(256ull << 20)),
        builder(m, memory->writer(), 0x800000, 0xc00000) {
    bool wide = m == sim::PagingMode::k4Level || m == sim::PagingMode::k5Level;
    uint64_t big = sim::PageSizes(m)[1];
    uint64_t k = sim::KernelHalfStart(m);
    bool ok = builder.Map(0, k, 0, 16 * big, big, {true, false, false});
    // Asks for a user leaf: the supervisor-only upper entries must still make it kernel-only.
    ok &= builder.Map(0, k + 32 * big, 0x100000, 0x10000, sim::k4KiB, {false, true, true});
    ok &= builder.MapNotPresent(0, k + 32 * big + 0x10000, 0x99);
    if (wide) ok &= builder.Map(0, 0xffff888000000000ull, 0, sim::k1GiB, sim::k1GiB, {});
    for (int p = 0; p < 4 && ok; ++p) {
      uint64_t cr3 = builder.NewProcess();
      roots.push_back(cr3);
      uint64_t f = 0xc00000 + p * 0x40000;
      ok &= builder.Map(cr3, 0x400000, f, 0x4000, sim::k4KiB, {false, true, true});
      ok &= builder.Map(cr3, 0x600000, f + 0x10000, 0x8000, sim::k4KiB, {true, true, false});
      ok &= builder.MapNotPresent(cr3, 0x5ff000, 0x1000 + p);
      ok &= builder.Map(cr3, 0x40000000, 2 * big, 2 * big, big, {true, true, false});
      if (wide) ok &= builder.Map(cr3, 0x7f0000000000ull, 0, sim::k1GiB, sim::k1GiB, {false, true});
    }
    EXPECT_TRUE(ok) << builder.error();
  }
  sim::PagingMode mode;
  std::shared_ptr<FakeMemory> memory;
  sim::PageTableBuilder builder;
  std::vector<uint64_t> roots;
};

void ExpectMatches(const Translation& got, const sim::ExpectedTranslation& want, uint64_t gva) {
  ASSERT_EQ(got.present, want.present) << std::hex << "gva 0x" << gva;
  if (!want.present) return;
  EXPECT_EQ(got.gpa, want.gpa) << std::hex << "gva 0x" << gva;
  EXPECT_EQ(got.page_size, want.page_size) << std::hex << "gva 0x" << gva;
  EXPECT_EQ(got.writable, want.writable) << std::hex << "gva 0x" << gva;
  EXPECT_EQ(got.user, want.user) << std::hex << "gva 0x" << gva;
  EXPECT_EQ(got.executable, want.executable) << std::hex << "gva 0x" << gva;
}

uint64_t RandomAddress(const Guest& g, uint64_t cr3, std::mt19937_64& rng, int i) {
  uint64_t gva = (i % 4 == 0) ? rng() : g.builder.MappedAddress(cr3, rng());
  switch (g.mode) {
    case sim::PagingMode::k32Bit:
    case sim::PagingMode::kPae:
      return gva & 0xffffffffull;
    case sim::PagingMode::k4Level:  // canonical: sign-extend bit 47
      return static_cast<uint64_t>(static_cast<int64_t>(gva << 16) >> 16);
    case sim::PagingMode::k5Level:
      return static_cast<uint64_t>(static_cast<int64_t>(gva << 7) >> 7);
  }
  return gva;
}

class WalkerTest : public ::testing::TestWithParam<sim::PagingMode> {};

TEST_P(WalkerTest, ThousandsOfRandomAddressesMatchTheOracle) {
  Guest g(GetParam());
  std::mt19937_64 rng(42);
  int present = 0;
  for (uint64_t cr3 : g.roots) {
    PagingContext c = ContextFor(GetParam(), cr3);
    for (int i = 0; i < 2500; ++i) {
      uint64_t gva = RandomAddress(g, cr3, rng, i);
      absl::StatusOr<Translation> t = WalkNow(g.memory, c, gva);
      ASSERT_TRUE(t.ok()) << t.status();
      ExpectMatches(*t, g.builder.Expect(cr3, gva), gva);
      present += t->present;
    }
  }
  EXPECT_GT(present, 5000);
}

TEST_P(WalkerTest, AllWalksInFlightAtOnceGiveTheSameAnswers) {
  Guest g(GetParam());
  std::mt19937_64 rng(9);
  uint64_t cr3 = g.roots[1];
  std::vector<uint64_t> gvas;
  gvas.reserve(2000);
  for (int i = 0; i < 2000; ++i) gvas.push_back(RandomAddress(g, cr3, rng, i));
  g.memory->set_deferred(true);
  std::vector<absl::StatusOr<Translation>> results;
  bool done = false;
  WalkMany(g.memory, ContextFor(GetParam(), cr3), gvas,
           [&](std::vector<absl::StatusOr<Translation>> r) {
             results = std::move(r);
             done = true;
           });
  EXPECT_FALSE(done);
  EXPECT_GE(g.memory->max_queued(), gvas.size());  // every walk's first read was out at once
  g.memory->Drain();
  ASSERT_TRUE(done);
  ASSERT_EQ(results.size(), gvas.size());
  for (size_t i = 0; i < gvas.size(); ++i) {
    ASSERT_TRUE(results[i].ok()) << results[i].status();
    ExpectMatches(*results[i], g.builder.Expect(cr3, gvas[i]), gvas[i]);
  }
}

TEST_P(WalkerTest, NotPresentNamesTheLevelAndTheEntry) {
  Guest g(GetParam());
  PagingContext c = ContextFor(GetParam(), g.roots[0]);
  absl::StatusOr<Translation> swapped = WalkNow(g.memory, c, 0x5ff123);
  ASSERT_TRUE(swapped.ok());
  EXPECT_FALSE(swapped->present);
  EXPECT_EQ(swapped->level, 1);
  EXPECT_NE(swapped->entry, 0u);  // the swap entry, not an empty slot
  // Far from anything mapped: the walk stops high up at an empty entry.
  uint64_t empty = GetParam() == sim::PagingMode::k32Bit || GetParam() == sim::PagingMode::kPae
                       ? 0x80000000ull
                       : 0x0000500000000000ull;
  absl::StatusOr<Translation> hole = WalkNow(g.memory, c, empty);
  ASSERT_TRUE(hole.ok());
  EXPECT_FALSE(hole->present);
  EXPECT_EQ(hole->entry, 0u);
  EXPECT_GT(hole->level, 1);
}

INSTANTIATE_TEST_SUITE_P(Modes, WalkerTest,
                         ::testing::Values(sim::PagingMode::k32Bit, sim::PagingMode::kPae,
                                           sim::PagingMode::k4Level, sim::PagingMode::k5Level),
                         [](const auto& info) { return sim::PagingModeName(info.param); });

TEST(WalkerModesTest, RegistersSelectTheMode) {
  EXPECT_EQ(ContextFromRegisters(0x11, 0, 0, 0).mode, PagingMode::kOff);
  EXPECT_EQ(ContextFromRegisters(0x80000011, 0, 0x10, 0).mode, PagingMode::k32Bit);
  EXPECT_FALSE(ContextFromRegisters(0x80000011, 0, 0x10, 0x800).nxe);  // no NX in 32-bit paging
  EXPECT_EQ(ContextFromRegisters(0x80000011, 0, 0x20, 0x800).mode, PagingMode::kPae);
  EXPECT_TRUE(ContextFromRegisters(0x80000011, 0, 0x20, 0x800).nxe);
  EXPECT_EQ(ContextFromRegisters(0x80000011, 0, 0x20, 0x500).mode, PagingMode::k4Level);
  EXPECT_EQ(ContextFromRegisters(0x80000011, 0, 0x1020, 0x500).mode, PagingMode::k5Level);
}

TEST(WalkerModesTest, PagingOffIsIdentity) {
  auto memory = std::make_shared<FakeMemory>(1 << 20);
  absl::StatusOr<Translation> t = WalkNow(memory, PagingContext{}, 0x12345);
  ASSERT_TRUE(t.ok());
  EXPECT_TRUE(t->present);
  EXPECT_EQ(t->gpa, 0x12345u);
  EXPECT_EQ(memory->reads(), 0u);
}

TEST(WalkerHostileTest, NonCanonicalAndOutOfRangeAddressesAreRefused) {
  Guest g(sim::PagingMode::k4Level);
  absl::StatusOr<Translation> t =
      WalkNow(g.memory, ContextFor(sim::PagingMode::k4Level, g.roots[0]), 0x0000800000000000ull);
  EXPECT_EQ(t.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(t.status().message(), HasSubstr("not canonical"));
  // The same address is canonical in 5-level paging.
  Guest g5(sim::PagingMode::k5Level);
  EXPECT_TRUE(
      WalkNow(g5.memory, ContextFor(sim::PagingMode::k5Level, g5.roots[0]), 0x0000800000000000ull)
          .ok());
  Guest g32(sim::PagingMode::kPae);
  t = WalkNow(g32.memory, ContextFor(sim::PagingMode::kPae, g32.roots[0]), 0x100000000ull);
  EXPECT_THAT(t.status().message(), HasSubstr("beyond 4 GiB"));
}

TEST(WalkerHostileTest, ALoopInTheTablesCostsAtMostOneReadPerLevel) {
  for (auto mode : {PagingMode::k4Level, PagingMode::k5Level}) {
    auto memory = std::make_shared<FakeMemory>(1 << 20);
    // Every entry of the table at 0x1000 points back at it (writable, user).
    for (uint64_t i = 0; i < 512; ++i) memory->Write64(0x1000 + 8 * i, 0x1000 | 0x7);
    PagingContext c;
    c.mode = mode;
    c.cr3 = 0x1000;
    c.nxe = true;
    absl::StatusOr<Translation> t = WalkNow(memory, c, 0x1234);
    ASSERT_TRUE(t.ok());
    EXPECT_TRUE(t->present);  // the hardware would walk the same loop to a 4 KiB page
    EXPECT_EQ(t->gpa, 0x1234u);
    EXPECT_EQ(memory->reads(), mode == PagingMode::k5Level ? 5u : 4u);
  }
}

TEST(WalkerHostileTest, AnEntryOutsideGuestRamEndsTheWalkWithAnErrorNamingTheLevel) {
  auto memory = std::make_shared<FakeMemory>(1 << 20);
  memory->Write64(0x1000, 0x7ff00000000ull | 0x7);  // PML4E -> far beyond RAM
  PagingContext c;
  c.mode = PagingMode::k4Level;
  c.cr3 = 0x1000;
  absl::StatusOr<Translation> t = WalkNow(memory, c, 0);
  ASSERT_FALSE(t.ok());
  EXPECT_THAT(t.status().message(), HasSubstr("PDPTE"));
  EXPECT_THAT(t.status().message(), HasSubstr("0x7ff00000000"));
  // And a CR3 outside RAM fails at the top level.
  c.cr3 = 0x7ff00000000ull;
  t = WalkNow(memory, c, 0);
  EXPECT_THAT(t.status().message(), HasSubstr("PML4E"));
}

TEST(WalkerHostileTest, ReservedBitsStopTheWalkAsTheCpuWould) {
  auto memory = std::make_shared<FakeMemory>(1 << 22);
  PagingContext c;
  c.mode = PagingMode::k4Level;
  c.cr3 = 0x1000;
  c.nxe = false;
  memory->Write64(0x1000, 0x2000 | 0x7);
  memory->Write64(0x2000, 0x3000 | 0x7);
  memory->Write64(0x3000, 0x4000 | 0x7);
  memory->Write64(0x4000, (1ull << 63) | 0x5000 | 0x7);  // NX without EFER.NXE: reserved
  absl::StatusOr<Translation> t = WalkNow(memory, c, 0);
  ASSERT_TRUE(t.ok());
  EXPECT_FALSE(t->present);
  EXPECT_TRUE(t->reserved_bits);
  EXPECT_EQ(t->level, 1);
  c.nxe = true;
  t = WalkNow(memory, c, 0);
  ASSERT_TRUE(t.ok());
  EXPECT_TRUE(t->present);
  EXPECT_FALSE(t->executable);
  // A 1 GiB page with bits 29:13 set, a PS bit at PML4E level, an address above MAXPHYADDR.
  memory->Write64(0x2000, 0x40002000ull | 0x87);
  t = WalkNow(memory, c, 0);
  EXPECT_TRUE(t->reserved_bits);
  EXPECT_EQ(t->level, 3);
  memory->Write64(0x1000, 0x2000 | 0x87);
  t = WalkNow(memory, c, 0);
  EXPECT_TRUE(t->reserved_bits);
  EXPECT_EQ(t->level, 4);
  memory->Write64(0x1000, (1ull << 45) | 0x2000 | 0x7);
  c.max_phys_bits = 39;
  t = WalkNow(memory, c, 0);
  EXPECT_TRUE(t->reserved_bits);
  // PAE PDPTEs have no R/W bit: setting it is reserved.
  PagingContext pae;
  pae.mode = PagingMode::kPae;
  pae.cr3 = 0x1000;
  memory->Write64(0x1000, 0x2000 | 0x3);
  t = WalkNow(memory, pae, 0);
  EXPECT_TRUE(t->reserved_bits);
  EXPECT_EQ(t->level, 3);
}

TEST(WalkerHostileTest, GarbageTablesNeverCrashAndStayBounded) {
  std::mt19937_64 rng(1);
  for (auto mode :
       {PagingMode::k32Bit, PagingMode::kPae, PagingMode::k4Level, PagingMode::k5Level}) {
    auto memory = std::make_shared<FakeMemory>(1 << 16);
    for (uint64_t a = 0; a < (1 << 16); a += 8) memory->Write64(a, rng() & rng());
    for (int i = 0; i < 2000; ++i) {
      PagingContext c;
      c.mode = mode;
      c.cr3 = rng() & 0xffff;
      c.nxe = rng() & 1;
      c.pse = rng() & 1;
      c.max_phys_bits = 36 + rng() % 17;
      size_t before = memory->reads();
      uint64_t gva = rng();
      if (mode == PagingMode::k32Bit || mode == PagingMode::kPae) gva &= 0xffffffff;
      absl::StatusOr<Translation> t = WalkNow(memory, c, gva);
      EXPECT_LE(memory->reads() - before, static_cast<size_t>(kMaxLevels));
      if (t.ok() && t->present) {
        EXPECT_NE(t->page_size, 0u);
      }
    }
  }
}

}  // namespace
}  // namespace kvmid::vmem
