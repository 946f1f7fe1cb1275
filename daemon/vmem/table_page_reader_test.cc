// TablePageReader: walks through it answer exactly as the builder's oracle says (many walks in
// flight at once, reads deferred), each table page is read once however many entries are asked
// of it, and a failed page read fails every entry waiting on it.
#include "daemon/vmem/table_page_reader.h"

#include <deque>
#include <map>
#include <random>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kernel/sim/page_tables.h"

namespace kvmid::vmem {
namespace {

namespace sim = ::kvmi::sim;
using ::testing::HasSubstr;

// Guest RAM below `limit` as a byte map; page reads are queued until Drain (deferred) so that
// many walks share them.
class FakeRam {
 public:
  explicit FakeRam(uint64_t limit) : limit_(limit) {}
  bool Write(uint64_t gpa, const void* data, size_t size) {
    for (size_t i = 0; i < size; ++i) bytes_[gpa + i] = static_cast<const uint8_t*>(data)[i];
    return true;
  }
  TablePageReader::PhysicalRead reader() {
    return [this](uint64_t gpa, uint64_t size,
                  const std::function<void(absl::StatusOr<std::vector<uint8_t>>)>& done) {
      ++reads_;
      queue_.push_back([this, gpa, size, done] { done(Read(gpa, size)); });
    };
  }
  void Drain() {
    while (!queue_.empty()) {
      auto next = std::move(queue_.front());
      queue_.pop_front();
      next();
    }
  }
  size_t reads() const { return reads_; }

 private:
  absl::StatusOr<std::vector<uint8_t>> Read(uint64_t gpa, uint64_t size) const {
    if (gpa + size > limit_) return absl::FailedPreconditionError("-KVM_EINVAL");
    std::vector<uint8_t> out(size);
    for (uint64_t i = 0; i < size; ++i) {
      auto it = bytes_.find(gpa + i);
      out[i] = it == bytes_.end() ? 0 : it->second;
    }
    return out;
  }
  uint64_t limit_;
  std::map<uint64_t, uint8_t> bytes_;
  std::deque<std::function<void()>> queue_;
  size_t reads_ = 0;
};

TEST(TablePageReaderTest, WalksThroughItMatchTheOracleInEveryMode) {
  for (sim::PagingMode mode : {sim::PagingMode::k32Bit, sim::PagingMode::kPae,
                               sim::PagingMode::k4Level, sim::PagingMode::k5Level}) {
    FakeRam ram(256ull << 20);
    sim::PageTableBuilder builder(
        mode, [&](uint64_t gpa, const void* d, size_t n) { return ram.Write(gpa, d, n); }, 0x800000,
        0xc00000);
    const uint64_t cr3 = builder.NewProcess();
    ASSERT_TRUE(builder.Map(cr3, 0x400000, 0xc00000, 0x40000, sim::k4KiB, {true, true, true}))
        << builder.error();
    ASSERT_TRUE(builder.MapNotPresent(cr3, 0x440000, 0x5));
    sim::PagingRegisters r = sim::RegistersFor(mode, {0x11, 0, 0x1});
    PagingContext context = ContextFromRegisters(r.cr0, cr3, r.cr4, r.efer);

    // 65 consecutive pages (the last not present) and some random mapped addresses, all at once.
    std::vector<uint64_t> gvas;
    for (uint64_t i = 0; i <= 0x40; ++i) gvas.push_back(0x400000 + i * kPageSize + 0x10);
    std::mt19937_64 rng(static_cast<uint64_t>(mode));
    for (int i = 0; i < 200; ++i) gvas.push_back(builder.MappedAddress(cr3, rng()));
    auto reader = std::make_shared<TablePageReader>(ram.reader());
    std::vector<absl::StatusOr<Translation>> got;
    WalkMany(reader, context, gvas,
             [&](std::vector<absl::StatusOr<Translation>> results) { got = std::move(results); });
    ram.Drain();
    ASSERT_EQ(got.size(), gvas.size()) << sim::PagingModeName(mode);
    for (size_t i = 0; i < gvas.size(); ++i) {
      ASSERT_TRUE(got[i].ok()) << got[i].status();
      sim::ExpectedTranslation want = builder.Expect(cr3, gvas[i]);
      ASSERT_EQ(got[i]->present, want.present) << std::hex << gvas[i];
      if (want.present) {
        EXPECT_EQ(got[i]->gpa, want.gpa) << std::hex << gvas[i];
      }
    }
    EXPECT_FALSE(got[0x40]->present);
    // Each table page once: far fewer reads than entries (a direct reader reads one per level
    // per walk: 65 walks of 2..5 levels).
    EXPECT_EQ(reader->pages_read(), ram.reads());
    EXPECT_LE(ram.reads(), builder.table_pages().size()) << sim::PagingModeName(mode);
  }
}

TEST(TablePageReaderTest, EntriesOfOnePageShareOneRead) {
  FakeRam ram(1 << 20);
  uint64_t a = 0x1122334455667788ull, b = 0x99;
  ram.Write(0x3008, &a, 8);
  ram.Write(0x3ff8, &b, 8);
  auto reader = std::make_shared<TablePageReader>(ram.reader());
  std::vector<uint64_t> values;
  for (uint64_t gpa : {0x3008ull, 0x3ff8ull, 0x3008ull}) {
    reader->ReadEntry(gpa, 8, [&](absl::StatusOr<uint64_t> v) {
      ASSERT_TRUE(v.ok());
      values.push_back(*v);
    });
  }
  ram.Drain();
  // And one asked after the page arrived: answered inline from it.
  reader->ReadEntry(0x300c, 4, [&](absl::StatusOr<uint64_t> v) { values.push_back(*v); });
  EXPECT_EQ(ram.reads(), 1u);
  EXPECT_THAT(values, ::testing::ElementsAre(a, b, a, a >> 32));
}

TEST(TablePageReaderTest, AFailedPageFailsEveryEntryWaitingOnIt) {
  FakeRam ram(0x2000);
  auto reader = std::make_shared<TablePageReader>(ram.reader());
  int failed = 0;
  for (uint64_t gpa : {0x5000ull, 0x5008ull}) {
    reader->ReadEntry(gpa, 8, [&](const absl::StatusOr<uint64_t>& v) {
      EXPECT_THAT(v.status().message(), HasSubstr("KVM_EINVAL"));
      ++failed;
    });
  }
  ram.Drain();
  EXPECT_EQ(failed, 2);
  EXPECT_EQ(ram.reads(), 1u);
  // An entry that would cross its page is refused without a read.
  reader->ReadEntry(0x1ffc, 8, [&](const absl::StatusOr<uint64_t>& v) {
    EXPECT_EQ(v.status().code(), absl::StatusCode::kInvalidArgument);
  });
  EXPECT_EQ(ram.reads(), 1u);
}

}  // namespace
}  // namespace kvmid::vmem
