// The context capture against a fake guest memory with real 4-level page tables
// (kernel/sim's builder): complete blocks across a page boundary, a block that runs into a
// page that is not present (a prefix, incomplete, the level named), a read error, the time
// budget running out while reads are in flight (incomplete, never a hold), the cache making the
// second capture of the same page a hit, and nothing asked: nothing read.
#include "daemon/vmem/context_capture.h"

#include <deque>
#include <map>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kernel/sim/page_tables.h"

namespace kvmid::vmem {
namespace {

using ::testing::HasSubstr;
namespace sim = ::kvmi::sim;

// Guest RAM below `limit`, byte-addressed; reads beyond it or on a `failing` page fail as
// READ_PHYSICAL would. Deferred mode queues every read until Drain.
class FakeMemory : public PhysicalMemory {
 public:
  explicit FakeMemory(uint64_t limit) : limit_(limit) {}
  bool Write(uint64_t gpa, const void* data, size_t size) {
    for (size_t i = 0; i < size; ++i) bytes_[gpa + i] = static_cast<const uint8_t*>(data)[i];
    return true;
  }
  void Read(uint64_t gpa, uint32_t size,
            std::function<void(absl::StatusOr<std::vector<uint8_t>>)> done) override {
    ++reads_;
    if (deferred_) {
      queue_.push_back([this, gpa, size, done] { done(ReadNow(gpa, size)); });
      return;
    }
    done(ReadNow(gpa, size));
  }
  void Drain() {
    while (!queue_.empty()) {
      auto next = std::move(queue_.front());
      queue_.pop_front();
      next();
    }
  }
  void set_deferred(bool d) { deferred_ = d; }
  void set_failing_page(uint64_t gpa) { failing_page_ = gpa & ~(kPageSize - 1); }
  size_t reads() const { return reads_; }
  size_t queued() const { return queue_.size(); }
  sim::PageTableBuilder::Writer writer() {
    return [this](uint64_t gpa, const void* d, size_t n) { return Write(gpa, d, n); };
  }

 private:
  absl::StatusOr<std::vector<uint8_t>> ReadNow(uint64_t gpa, uint32_t size) const {
    if (gpa + size > limit_) return absl::FailedPreconditionError("-KVM_EINVAL");
    if (failing_page_ && (gpa & ~(kPageSize - 1)) == *failing_page_) {
      return absl::FailedPreconditionError("READ_PHYSICAL: -KVM_EFAULT");
    }
    std::vector<uint8_t> out(size);
    for (uint32_t i = 0; i < size; ++i) {
      auto it = bytes_.find(gpa + i);
      out[i] = it == bytes_.end() ? 0 : it->second;
    }
    return out;
  }
  uint64_t limit_;
  std::map<uint64_t, uint8_t> bytes_;
  bool deferred_ = false;
  std::optional<uint64_t> failing_page_;
  std::deque<std::function<void()>> queue_;
  size_t reads_ = 0;
};

constexpr uint64_t kCode = 0x400000;   // two pages of code at 0x10000, 0x11000
constexpr uint64_t kStack = 0x7ff000;  // one stack page; the page above it is not present
constexpr uint64_t kData = 0x600000;   // a data page

struct Guest {
  Guest()
      : memory(std::make_shared<FakeMemory>(64ull << 20)),
        builder(sim::PagingMode::k4Level, memory->writer(), 0x800000, 0xc00000) {
    cr3 = builder.NewProcess();
    bool ok = builder.Map(cr3, kCode, 0x10000, 0x2000, sim::k4KiB, {false, true, true});
    ok &= builder.Map(cr3, kStack, 0x20000, 0x1000, sim::k4KiB, {true, true, false});
    ok &= builder.MapNotPresent(cr3, kStack + 0x1000, 0x7);
    ok &= builder.Map(cr3, kData, 0x30000, 0x1000, sim::k4KiB, {true, true, false});
    EXPECT_TRUE(ok) << builder.error();
    for (uint64_t i = 0; i < 0x2000; ++i) {
      uint8_t b = static_cast<uint8_t>(i * 7 + 1);
      memory->Write(0x10000 + i, &b, 1);
    }
  }
  // An event of vCPU 1 in this address space (4-level paging, as RegistersFor gives).
  kvmi::Event EventAt(uint64_t rip, uint64_t rsp, uint8_t id = KVMI_EVENT_MSR) const {
    kvmi::Event e;
    e.common.event = id;
    e.common.vcpu = 1;
    sim::PagingRegisters r = sim::RegistersFor(sim::PagingMode::k4Level, {0x11, 0, 0x1});
    e.common.arch.sregs.cr0 = r.cr0;
    e.common.arch.sregs.cr4 = r.cr4;
    e.common.arch.sregs.efer = r.efer;
    e.common.arch.sregs.cr3 = cr3;
    e.common.arch.regs.rip = rip;
    e.common.arch.regs.rsp = rsp;
    return e;
  }
  std::vector<uint8_t> CodeAt(uint64_t gva, size_t n) const {
    std::vector<uint8_t> out;
    for (size_t i = 0; i < n; ++i) out.push_back(static_cast<uint8_t>((gva - kCode + i) * 7 + 1));
    return out;
  }
  std::shared_ptr<FakeMemory> memory;
  sim::PageTableBuilder builder;
  uint64_t cr3 = 0;
};

struct Result {
  int calls = 0;
  std::shared_ptr<const CapturedContext> context;
  ContextCapture::Done done() {
    return [this](std::shared_ptr<const CapturedContext> c) {
      ++calls;
      context = std::move(c);
    };
  }
};

TEST(ContextCaptureTest, CompleteBlocksAcrossAPageBoundary) {
  Guest g;
  Result r;
  const uint64_t rip = kCode + 0xff8;  // 16 bytes: 8 in each code page
  ContextCapture::Start(g.memory, nullptr, g.EventAt(rip, kStack + 0x100), ContextDemand{16, 32, 0},
                        r.done());
  ASSERT_EQ(r.calls, 1);
  ASSERT_EQ(r.context->blocks.size(), 2u);
  const ContextBlock* code = r.context->Find(ContextKind::kRip);
  ASSERT_NE(code, nullptr);
  EXPECT_TRUE(code->complete) << code->why;
  EXPECT_EQ(code->gva, rip);
  EXPECT_EQ(code->size, 16u);
  EXPECT_EQ(code->data, g.CodeAt(rip, 16));
  const ContextBlock* stack = r.context->Find(ContextKind::kRsp);
  ASSERT_NE(stack, nullptr);
  EXPECT_TRUE(stack->complete);
  EXPECT_EQ(stack->data, std::vector<uint8_t>(32, 0));
  EXPECT_EQ(r.context->Find(ContextKind::kPf), nullptr);  // not a PF event
}

TEST(ContextCaptureTest, ANotPresentPageEndsTheBlockWithThePrefixAndTheLevel) {
  Guest g;
  Result r;
  // 64 bytes from 16 below the top of the stack page: the page above is swapped out.
  ContextCapture::Start(g.memory, nullptr, g.EventAt(kCode, kStack + 0xff0),
                        ContextDemand{0, 64, 0}, r.done());
  ASSERT_EQ(r.calls, 1);
  const ContextBlock* stack = r.context->Find(ContextKind::kRsp);
  ASSERT_NE(stack, nullptr);
  EXPECT_FALSE(stack->complete);
  EXPECT_EQ(stack->data.size(), 16u);  // what the present page held
  EXPECT_THAT(stack->why, HasSubstr("not present at PTE"));
  EXPECT_THAT(stack->why, HasSubstr("0x800000"));  // where the block stopped
}

TEST(ContextCaptureTest, AReadErrorMakesTheBlockIncompleteWithTheGuestsError) {
  Guest g;
  g.memory->set_failing_page(0x11000);  // the second code page
  Result r;
  ContextCapture::Start(g.memory, nullptr, g.EventAt(kCode + 0xffc, kStack), ContextDemand{8, 0, 0},
                        r.done());
  ASSERT_EQ(r.calls, 1);
  const ContextBlock* code = r.context->Find(ContextKind::kRip);
  EXPECT_FALSE(code->complete);
  EXPECT_EQ(code->data, g.CodeAt(kCode + 0xffc, 4));
  EXPECT_THAT(code->why, HasSubstr("KVM_EFAULT"));
}

TEST(ContextCaptureTest, PfBytesAreCentredOnTheFaultingAddress) {
  Guest g;
  kvmi::Event e = g.EventAt(kCode, kStack, KVMI_EVENT_PF);
  e.specific.pf.gva = kCode + 0x20;
  Result r;
  ContextCapture::Start(g.memory, nullptr, e, ContextDemand{0, 0, 16}, r.done());
  ASSERT_EQ(r.calls, 1);
  const ContextBlock* pf = r.context->Find(ContextKind::kPf);
  ASSERT_NE(pf, nullptr);
  EXPECT_EQ(pf->gva, kCode + 0x18);
  EXPECT_TRUE(pf->complete);
  EXPECT_EQ(pf->data, g.CodeAt(kCode + 0x18, 16));
}

TEST(ContextCaptureTest, ExpiryAnswersAtOnceWithTheBlocksIncomplete) {
  Guest g;
  g.memory->set_deferred(true);  // nothing answers until Drain
  Result r;
  auto capture = ContextCapture::Start(g.memory, nullptr, g.EventAt(kCode, kStack),
                                       ContextDemand{16, 16, 0}, r.done());
  EXPECT_EQ(r.calls, 0);
  EXPECT_EQ(g.memory->queued(), 2u);  // both walks' first reads in flight at once
  capture->Expire("context read did not finish within 5 ms");
  ASSERT_EQ(r.calls, 1);
  for (const ContextBlock& b : r.context->blocks) {
    EXPECT_FALSE(b.complete);
    EXPECT_TRUE(b.data.empty());
    EXPECT_THAT(b.why, HasSubstr("did not finish within 5 ms"));
  }
  g.memory->Drain();  // late answers go nowhere
  EXPECT_EQ(r.calls, 1);
  capture->Expire("again");
  EXPECT_EQ(r.calls, 1);
}

TEST(ContextCaptureTest, TheCacheMakesTheSecondCaptureOfAPageAHit) {
  Guest g;
  auto cache = std::make_shared<TranslationCache>();
  Result first, second;
  ContextCapture::Start(g.memory, cache, g.EventAt(kCode + 0x40, kStack), ContextDemand{16, 0, 0},
                        first.done());
  const size_t reads_cold = g.memory->reads();
  EXPECT_EQ(reads_cold, 5u);  // 4 entries + the bytes
  ContextCapture::Start(g.memory, cache, g.EventAt(kCode + 0x80, kStack), ContextDemand{16, 0, 0},
                        second.done());
  EXPECT_EQ(g.memory->reads() - reads_cold, 1u);  // the bytes only
  EXPECT_EQ(cache->stats().hits, 1u);
  ASSERT_EQ(second.calls, 1);
  EXPECT_EQ(second.context->Find(ContextKind::kRip)->data, g.CodeAt(kCode + 0x80, 16));
}

TEST(ContextCaptureTest, NothingAskedReadsNothing) {
  Guest g;
  Result r;
  ContextCapture::Start(g.memory, nullptr, g.EventAt(kCode, kStack), ContextDemand{0, 0, 16},
                        r.done());  // PF bytes of an MSR event: no block
  ASSERT_EQ(r.calls, 1);
  EXPECT_TRUE(r.context->blocks.empty());
  EXPECT_EQ(g.memory->reads(), 0u);
}

TEST(ContextCaptureTest, ABlockPastTheEndOfTheAddressSpaceSaysSo) {
  Guest g;
  Result r;
  ContextCapture::Start(g.memory, nullptr, g.EventAt(0xfffffffffffffff8ull, kStack),
                        ContextDemand{16, 0, 0}, r.done());
  ASSERT_EQ(r.calls, 1);
  const ContextBlock* code = r.context->Find(ContextKind::kRip);
  EXPECT_FALSE(code->complete);
  EXPECT_FALSE(code->why.empty());
}

TEST(ContextDemandTest, PacksAndTakesTheLargest) {
  ContextDemand a{16, 0, 256};
  a.Add(ContextDemand{8, 32, 0});
  EXPECT_EQ(a, (ContextDemand{16, 32, 256}));
  EXPECT_EQ(ContextDemand::Unpack(a.Pack()), a);
  EXPECT_TRUE(ContextDemand::Unpack(0).empty());
}

}  // namespace
}  // namespace kvmid::vmem
