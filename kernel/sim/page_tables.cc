#include "kernel/sim/page_tables.h"

#include <iterator>

namespace kvmi::sim {

const char* PagingModeName(PagingMode mode) {
  switch (mode) {
    case PagingMode::k32Bit:
      return "32bit";
    case PagingMode::kPae:
      return "pae";
    case PagingMode::k4Level:
      return "4level";
    case PagingMode::k5Level:
      return "5level";
  }
  return "?";
}

bool ParsePagingMode(const std::string& name, PagingMode* mode) {
  for (PagingMode m :
       {PagingMode::k32Bit, PagingMode::kPae, PagingMode::k4Level, PagingMode::k5Level}) {
    if (name == PagingModeName(m)) {
      *mode = m;
      return true;
    }
  }
  return false;
}

PagingRegisters RegistersFor(PagingMode mode, PagingRegisters base) {
  PagingRegisters r = base;
  r.cr0 |= kCr0Pg | kCr0Pe | kCr0Wp;
  r.cr4 &= ~(kCr4Pae | kCr4La57 | kCr4Pse);
  r.efer &= ~(kEferLme | kEferLma | kEferNxe);
  switch (mode) {
    case PagingMode::k32Bit:
      r.cr4 |= kCr4Pse;
      break;
    case PagingMode::kPae:
      r.cr4 |= kCr4Pae;
      r.efer |= kEferNxe;
      break;
    case PagingMode::k5Level:
      r.cr4 |= kCr4La57;
      [[fallthrough]];
    case PagingMode::k4Level:
      r.cr4 |= kCr4Pae;
      r.efer |= kEferLme | kEferLma | kEferNxe;
      break;
  }
  return r;
}

uint64_t KernelHalfStart(PagingMode mode) {
  switch (mode) {
    case PagingMode::k32Bit:
    case PagingMode::kPae:
      return 0xc0000000ull;
    case PagingMode::k4Level:
      return 0xffff800000000000ull;
    case PagingMode::k5Level:
      return 0xff00000000000000ull;
  }
  return 0;
}

std::vector<uint64_t> PageSizes(PagingMode mode) {
  switch (mode) {
    case PagingMode::k32Bit:
      return {k4KiB, k4MiB};
    case PagingMode::kPae:
      return {k4KiB, k2MiB};
    case PagingMode::k4Level:
    case PagingMode::k5Level:
      return {k4KiB, k2MiB, k1GiB};
  }
  return {};
}

PageTableBuilder::PageTableBuilder(PagingMode mode, Writer write, uint64_t table_base,
                                   uint64_t table_limit)
    : mode_(mode), write_(std::move(write)), next_table_(table_base), table_limit_(table_limit) {
  kernel_root_ = AllocTable();
}

int PageTableBuilder::Levels() const {
  switch (mode_) {
    case PagingMode::k32Bit:
      return 2;
    case PagingMode::kPae:
      return 3;
    case PagingMode::k4Level:
      return 4;
    case PagingMode::k5Level:
      return 5;
  }
  return 0;
}

unsigned PageTableBuilder::IndexBits(int level) const {
  if (mode_ == PagingMode::k32Bit) return 10;
  if (mode_ == PagingMode::kPae && level == 3) return 2;
  return 9;
}

unsigned PageTableBuilder::Shift(int level) const {
  if (mode_ == PagingMode::k32Bit) return level == 1 ? 12 : 22;
  return 12 + 9 * (level - 1);
}

bool PageTableBuilder::Canonical(uint64_t gva) const {
  switch (mode_) {
    case PagingMode::k32Bit:
    case PagingMode::kPae:
      return gva <= 0xffffffffull;
    case PagingMode::k4Level:
      return (static_cast<int64_t>(gva << 16) >> 16) == static_cast<int64_t>(gva);
    case PagingMode::k5Level:
      return (static_cast<int64_t>(gva << 7) >> 7) == static_cast<int64_t>(gva);
  }
  return false;
}

bool PageTableBuilder::Fail(const std::string& why) {
  error_ = why;
  return false;
}

uint64_t PageTableBuilder::AllocTable() {
  if (next_table_ + k4KiB > table_limit_) {
    Fail("page-table area full");
    return 0;
  }
  uint64_t gpa = next_table_;
  next_table_ += k4KiB;
  tables_[gpa].assign(k4KiB / EntryBytes(), 0);
  table_pages_.push_back(gpa);
  std::vector<uint8_t> zeros(k4KiB, 0);
  if (!write_(gpa, zeros.data(), zeros.size())) {
    Fail("cannot write the table page at " + std::to_string(gpa));
    return 0;
  }
  return gpa;
}

uint64_t PageTableBuilder::ReadEntry(uint64_t table, uint64_t index) const {
  auto it = tables_.find(table);
  return it == tables_.end() ? 0 : it->second[index];
}

bool PageTableBuilder::WriteEntry(uint64_t table, uint64_t index, uint64_t entry) {
  auto write_one = [&](uint64_t t) {
    tables_[t][index] = entry;
    if (EntryBytes() == 4) {
      uint32_t e32 = static_cast<uint32_t>(entry);
      return write_(t + index * 4, &e32, 4);
    }
    return write_(t + index * 8, &entry, 8);
  };
  if (!write_one(table)) return Fail("cannot write a page-table entry");
  // The kernel half of the top-level table is shared: every process gets the same entry.
  if (table == kernel_root_) {
    for (uint64_t root : processes_) {
      if (!write_one(root)) return Fail("cannot write a page-table entry");
    }
  }
  return true;
}

uint64_t PageTableBuilder::NewProcess() {
  uint64_t root = AllocTable();
  if (root == 0) return 0;
  const std::vector<uint64_t>& kernel = tables_[kernel_root_];
  uint64_t first = KernelHalfStart(mode_) >> Shift(Levels());
  first &= EntriesAt(Levels()) - 1;
  for (uint64_t i = first; i < kernel.size() && i < EntriesAt(Levels()); ++i) {
    if (kernel[i] == 0) continue;
    tables_[root][i] = kernel[i];
    uint64_t e = kernel[i];
    bool ok = EntryBytes() == 4 ? [&] {
      uint32_t e32 = static_cast<uint32_t>(e);
      return write_(root + i * 4, &e32, 4);
    }()
                                : write_(root + i * 8, &e, 8);
    if (!ok) {
      Fail("cannot write a page-table entry");
      return 0;
    }
  }
  processes_.push_back(root);
  user_[root];
  return root;
}

bool PageTableBuilder::SetLeaf(uint64_t root, uint64_t gva, uint64_t page_size, uint64_t entry,
                               bool kernel) {
  int leaf_level = 1;
  while (leaf_level < Levels() && (1ull << Shift(leaf_level)) != page_size) ++leaf_level;
  uint64_t table = root;
  for (int level = Levels(); level > leaf_level; --level) {
    uint64_t index = Index(gva, level);
    uint64_t e = ReadEntry(table, index);
    if (e & kPtePresent) {
      if (level > 1 && (e & kPteLarge) && !(mode_ == PagingMode::kPae && level == 3)) {
        return Fail("overlaps a large page");
      }
      table = e & 0x000ffffffffff000ull;
      if (EntryBytes() == 4) table = e & 0xfffff000ull;
      continue;
    }
    if (e != 0) return Fail("overlaps a not-present entry");
    uint64_t next = AllocTable();
    if (next == 0) return false;
    uint64_t upper = next | kPtePresent;
    // PAE's PDPTEs have no R/W, U/S or A bits (they are reserved there).
    if (!(mode_ == PagingMode::kPae && level == 3)) {
      upper |= kPteWritable | kPteAccessed;
      if (!kernel) upper |= kPteUser;
    }
    if (!WriteEntry(table, index, upper)) return false;
    table = next;
  }
  uint64_t index = Index(gva, leaf_level);
  if (ReadEntry(table, index) != 0) return Fail("overlaps an existing mapping");
  if (leaf_level > 1) entry |= kPteLarge;
  return WriteEntry(table, index, entry);
}

const PageTableBuilder::MappingList* PageTableBuilder::ListOf(uint64_t cr3, uint64_t gva) const {
  if (IsKernel(gva)) return &kernel_;
  auto it = user_.find(cr3);
  return it == user_.end() ? nullptr : &it->second;
}

bool PageTableBuilder::Map(uint64_t cr3, uint64_t gva, uint64_t gpa, uint64_t size,
                           uint64_t page_size, MapOptions options) {
  std::vector<uint64_t> sizes = PageSizes(mode_);
  bool supported = false;
  for (uint64_t s : sizes) supported |= s == page_size;
  if (!supported) return Fail("page size not supported in this mode");
  if (size == 0 || (gva | gpa | size) & (page_size - 1)) return Fail("unaligned mapping");
  if (!Canonical(gva) || !Canonical(gva + size - 1) || gva + size < gva) {
    return Fail("not a valid virtual range");
  }
  bool kernel = IsKernel(gva);
  if (kernel != IsKernel(gva + size - 1)) return Fail("crosses into the kernel half");
  if (mode_ == PagingMode::k32Bit && gpa + size > (1ull << 32)) return Fail("gpa beyond 4 GiB");
  uint64_t root = kernel ? kernel_root_ : cr3;
  if (!kernel && !user_.count(cr3)) return Fail("unknown address space");
  MappingList& list = kernel ? kernel_ : user_[cr3];
  auto next = list.lower_bound(gva);
  if (next != list.end() && next->first < gva + size) return Fail("overlaps a mapping");
  if (next != list.begin() && std::prev(next)->second.gva + std::prev(next)->second.size > gva) {
    return Fail("overlaps a mapping");
  }
  // A kernel leaf keeps U/S only if some upper entry (supervisor-only there) is above it.
  bool user_bit = options.user;
  if (kernel) {
    bool top = page_size == (1ull << Shift(Levels()));
    bool pae_2m = mode_ == PagingMode::kPae && page_size == k2MiB;
    if (top || pae_2m) user_bit = false;
  }
  for (uint64_t off = 0; off < size; off += page_size) {
    uint64_t entry = (gpa + off) | kPtePresent | kPteAccessed | kPteDirty;
    if (options.writable) entry |= kPteWritable;
    if (user_bit) entry |= kPteUser;
    if (!options.executable && mode_ != PagingMode::k32Bit) entry |= kPteNx;
    if (!SetLeaf(root, gva + off, page_size, entry, kernel)) return false;
  }
  list[gva] = Mapping{gva, gpa, size, page_size, options, true};
  return true;
}

bool PageTableBuilder::MapNotPresent(uint64_t cr3, uint64_t gva, uint64_t bits) {
  if (gva & (k4KiB - 1) || !Canonical(gva)) return Fail("not a valid page address");
  bool kernel = IsKernel(gva);
  if (!kernel && !user_.count(cr3)) return Fail("unknown address space");
  MappingList& list = kernel ? kernel_ : user_[cr3];
  auto next = list.lower_bound(gva);
  if (next != list.end() && next->first < gva + k4KiB) return Fail("overlaps a mapping");
  if (next != list.begin() && std::prev(next)->second.gva + std::prev(next)->second.size > gva) {
    return Fail("overlaps a mapping");
  }
  uint64_t entry = (bits << 1) & ~kPtePresent;
  if (EntryBytes() == 4) entry &= 0xfffffffeull;
  if (entry == 0) entry = 0x2;  // still "not zero": a swap entry
  if (!SetLeaf(kernel ? kernel_root_ : cr3, gva, k4KiB, entry, kernel)) return false;
  Mapping m;
  m.gva = gva;
  m.size = m.page_size = k4KiB;
  m.present = false;
  list[gva] = m;
  return true;
}

ExpectedTranslation PageTableBuilder::Expect(uint64_t cr3, uint64_t gva) const {
  ExpectedTranslation out;
  if (!Canonical(gva)) return out;
  const MappingList* list = ListOf(cr3, gva);
  if (!list || list->empty()) return out;
  auto it = list->upper_bound(gva);
  if (it == list->begin()) return out;
  const Mapping& m = std::prev(it)->second;
  if (gva >= m.gva + m.size || !m.present) return out;
  out.present = true;
  out.gpa = m.gpa + (gva - m.gva);
  out.page_size = m.page_size;
  out.writable = m.options.writable;
  out.user = m.options.user && !IsKernel(gva);
  out.executable = m.options.executable || mode_ == PagingMode::k32Bit;
  return out;
}

uint64_t PageTableBuilder::MappedAddress(uint64_t cr3, uint64_t random) const {
  std::vector<const Mapping*> all;
  for (const auto& [gva, m] : kernel_) all.push_back(&m);
  auto it = user_.find(cr3);
  if (it != user_.end()) {
    for (const auto& [gva, m] : it->second) all.push_back(&m);
  }
  if (all.empty()) return 0;
  const Mapping& m = *all[random % all.size()];
  uint64_t mix = random * 0x9e3779b97f4a7c15ull;
  return m.gva + ((mix ^ (mix >> 29)) % m.size);
}

}  // namespace kvmi::sim
