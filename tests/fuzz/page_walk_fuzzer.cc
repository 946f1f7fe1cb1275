// libFuzzer target: the page walker (daemon/vmem) over guest-controlled page tables. The input is
// a paging context, an address and an image of guest RAM from GPA 0 (reads beyond it fail, as
// READ_PHYSICAL outside guest RAM does). Besides "no crash" (ASan/UBSan), every walk must answer
// exactly once, read at most one entry per level, and a present answer must be self-consistent
// (a real page size, the address's offset kept, a leaf level).
//
// Input layout: byte 0 = mode (% 5: off, 32-bit, PAE, 4-level, 5-level), byte 1 = bit 0 NXE,
// bit 1 PSE, byte 2 = MAXPHYADDR - 36 (% 17), bytes 3..10 = CR3, 11..18 = GVA (little-endian),
// the rest = guest RAM.
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>

#include "daemon/vmem/page_walker.h"

namespace kvmid::vmem {
namespace {

constexpr size_t kHeader = 19;

[[noreturn]] void Fail(const char* what) {
  std::fprintf(stderr, "page_walk_fuzzer: %s\n", what);
  std::abort();
}

class ImageReader : public EntryReader {
 public:
  ImageReader(const uint8_t* data, size_t size) : data_(data), size_(size) {}
  void ReadEntry(uint64_t gpa, unsigned size,
                 std::function<void(absl::StatusOr<uint64_t>)> done) override {
    ++reads;
    if (size != 4 && size != 8) Fail("entry size is not 4 or 8");
    if (gpa % size != 0) Fail("unaligned entry");
    if (gpa >= size_ || size_ - gpa < size) {
      done(absl::InvalidArgumentError("outside guest RAM"));
      return;
    }
    uint64_t v = 0;
    std::memcpy(&v, data_ + gpa, size);
    done(v);
  }
  int reads = 0;

 private:
  const uint8_t* data_;
  size_t size_;
};

uint64_t Load64(const uint8_t* p) {
  uint64_t v;
  std::memcpy(&v, p, 8);
  return v;
}

}  // namespace
}  // namespace kvmid::vmem

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace kvmid::vmem;
  if (size < kHeader) return 0;
  PagingContext context;
  context.mode = static_cast<PagingMode>(data[0] % 5);
  context.nxe = data[1] & 1;
  context.pse = data[1] & 2;
  context.max_phys_bits = 36 + data[2] % 17;
  context.cr3 = Load64(data + 3);
  const uint64_t gva = Load64(data + 11);
  auto reader = std::make_shared<ImageReader>(data + kHeader, size - kHeader);
  int answers = 0;
  absl::StatusOr<Translation> result = absl::UnknownError("none");
  Walk(reader, context, gva, [&](absl::StatusOr<Translation> t) {
    ++answers;
    result = std::move(t);
  });
  if (answers != 1) Fail("the walk did not answer exactly once");
  if (reader->reads > kMaxLevels) Fail("more reads than levels");
  if (result.ok()) {
    const Translation& t = *result;
    if (t.entries_read != reader->reads) Fail("entries_read differs from the reads made");
    if (t.present) {
      uint64_t s = t.page_size;
      if (s != 4096 && s != (2ull << 20) && s != (4ull << 20) && s != (1ull << 30)) {
        Fail("present with an impossible page size");
      }
      if ((t.gpa & (s - 1)) != (gva & (s - 1))) Fail("the offset in the page was not kept");
      if (context.mode != PagingMode::kOff && (t.level < 1 || t.level > kMaxLevels)) {
        Fail("present at no level");
      }
      if (t.reserved_bits) Fail("present with reserved bits");
    }
  }
  return 0;
}
