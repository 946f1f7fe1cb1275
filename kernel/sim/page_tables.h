// Real x86 paging structures for simulated guests: a builder that writes them into a guest's
// physical memory (through a writer callback, e.g. SimGuest::WritePhysical), and remembers what
// it mapped, so that tests can ask what a guest-virtual address should translate to (the oracle)
// and compare it with what a page walker finds in memory.
//
// Address spaces are laid out as an OS does: a kernel half shared by every process (the upper
// half of the top-level table in 4/5-level paging, the top quarter -- 3 GiB and up -- in 32-bit
// and PAE paging) and a user half per process. Kernel mappings made after processes exist are
// propagated to every process's top-level table, as Linux's pgd sync does.
//
// The oracle never walks the tables: it answers from the list of mappings made, so a walker that
// misreads the tables disagrees with it.
#ifndef KVMID_KERNEL_SIM_PAGE_TABLES_H_
#define KVMID_KERNEL_SIM_PAGE_TABLES_H_

#include <cstdint>
#include <functional>
#include <map>
#include <optional>
#include <string>
#include <vector>

namespace kvmi::sim {

enum class PagingMode : uint8_t {
  k32Bit,   // CR0.PG, no CR4.PAE: 2 levels of 4-byte entries, 4 KiB and 4 MiB (CR4.PSE) pages
  kPae,     // CR4.PAE without long mode: PDPT (4 entries), PD, PT; 4 KiB and 2 MiB pages, NX
  k4Level,  // long mode: PML4, PDPT, PD, PT; 4 KiB, 2 MiB and 1 GiB pages, NX
  k5Level,  // long mode with CR4.LA57: PML5 above PML4
};
const char* PagingModeName(PagingMode mode);  // "32bit", "pae", "4level", "5level"
bool ParsePagingMode(const std::string& name, PagingMode* mode);

// Entry bits (the same positions in every mode; NX only with 8-byte entries).
inline constexpr uint64_t kPtePresent = 1ull << 0;
inline constexpr uint64_t kPteWritable = 1ull << 1;
inline constexpr uint64_t kPteUser = 1ull << 2;
inline constexpr uint64_t kPteAccessed = 1ull << 5;
inline constexpr uint64_t kPteDirty = 1ull << 6;
inline constexpr uint64_t kPteLarge = 1ull << 7;  // PS: this entry maps a page
inline constexpr uint64_t kPteNx = 1ull << 63;

// Control-register bits a guest needs for a mode.
inline constexpr uint64_t kCr0Pe = 1ull << 0;
inline constexpr uint64_t kCr0Wp = 1ull << 16;
inline constexpr uint64_t kCr0Pg = 1ull << 31;
inline constexpr uint64_t kCr4Pse = 1ull << 4;
inline constexpr uint64_t kCr4Pae = 1ull << 5;
inline constexpr uint64_t kCr4La57 = 1ull << 12;
inline constexpr uint64_t kEferLme = 1ull << 8;
inline constexpr uint64_t kEferLma = 1ull << 10;
inline constexpr uint64_t kEferNxe = 1ull << 11;

inline constexpr uint64_t k4KiB = 4096;
inline constexpr uint64_t k2MiB = 2ull << 20;
inline constexpr uint64_t k4MiB = 4ull << 20;
inline constexpr uint64_t k1GiB = 1ull << 30;

// CR0/CR4/EFER for `mode`, from a starting value (other bits kept).
struct PagingRegisters {
  uint64_t cr0 = 0;
  uint64_t cr4 = 0;
  uint64_t efer = 0;
};
PagingRegisters RegistersFor(PagingMode mode, PagingRegisters base);

// Where the kernel half begins.
uint64_t KernelHalfStart(PagingMode mode);
// The page sizes a mode supports, smallest first.
std::vector<uint64_t> PageSizes(PagingMode mode);

struct MapOptions {
  bool writable = true;
  bool user = false;
  bool executable = true;  // false sets NX (ignored in 32-bit paging, which has none)
};

// What a translation should give (the oracle's answer).
struct ExpectedTranslation {
  bool present = false;
  uint64_t gpa = 0;
  uint64_t page_size = 0;
  bool writable = false;
  bool user = false;
  bool executable = false;
};

class PageTableBuilder {
 public:
  // Writes `size` bytes at guest-physical `gpa`; false on failure.
  using Writer = std::function<bool(uint64_t gpa, const void* data, size_t size)>;

  // Table pages are taken from [table_base, table_limit) (page aligned; below 4 GiB for the
  // 32-bit modes). Creates the kernel's own top-level table (kernel_root()).
  PageTableBuilder(PagingMode mode, Writer write, uint64_t table_base, uint64_t table_limit);

  PagingMode mode() const { return mode_; }
  // The CR3 of the kernel's address space (no user half).
  uint64_t kernel_root() const { return kernel_root_; }
  // A new process: a top-level table with the kernel half filled in. Returns its CR3, or 0 when
  // the table area is full (error()).
  uint64_t NewProcess();
  const std::vector<uint64_t>& processes() const { return processes_; }

  // Maps [gva, gva + size) to [gpa, gpa + size) with pages of `page_size` (one of PageSizes();
  // gva, gpa and size aligned to it). A gva in the kernel half is mapped for every process (cr3
  // is ignored then); below it, in process `cr3` only. Kernel mappings are never user-accessible
  // (their upper-level entries are supervisor-only), whatever `options.user` says. False on a bad
  // argument, an overlap with an existing mapping, or a full table area (error()).
  bool Map(uint64_t cr3, uint64_t gva, uint64_t gpa, uint64_t size, uint64_t page_size,
           MapOptions options);
  // A 4 KiB leaf entry that is not present but not zero either (a swapped-out page: `bits` << 1,
  // the present bit clear). The oracle reports it not present.
  bool MapNotPresent(uint64_t cr3, uint64_t gva, uint64_t bits);

  // What `gva` in address space `cr3` translates to, from the mappings made.
  ExpectedTranslation Expect(uint64_t cr3, uint64_t gva) const;
  // A uniformly chosen virtual address inside some mapping (present or not) of `cr3` or of the
  // kernel, from `random` (any 64-bit value).
  uint64_t MappedAddress(uint64_t cr3, uint64_t random) const;

  // Physical pages that hold tables (for tests that corrupt them).
  const std::vector<uint64_t>& table_pages() const { return table_pages_; }
  const std::string& error() const { return error_; }

 private:
  struct Mapping {
    uint64_t gva = 0;
    uint64_t gpa = 0;
    uint64_t size = 0;
    uint64_t page_size = 0;
    MapOptions options;
    bool present = true;
  };
  using MappingList = std::map<uint64_t, Mapping>;  // by gva

  int Levels() const;
  unsigned EntryBytes() const { return mode_ == PagingMode::k32Bit ? 4 : 8; }
  unsigned IndexBits(int level) const;  // bits of the index at `level` (1 = page table)
  unsigned Shift(int level) const;      // the address bit the index at `level` starts at
  uint64_t EntriesAt(int level) const { return 1ull << IndexBits(level); }
  uint64_t Index(uint64_t gva, int level) const {
    return (gva >> Shift(level)) & (EntriesAt(level) - 1);
  }
  bool IsKernel(uint64_t gva) const { return gva >= KernelHalfStart(mode_); }
  bool Canonical(uint64_t gva) const;
  uint64_t AllocTable();  // 0 when full
  uint64_t ReadEntry(uint64_t table, uint64_t index) const;
  bool WriteEntry(uint64_t table, uint64_t index, uint64_t entry);
  // Writes a leaf entry for one page, creating the tables above it.
  bool SetLeaf(uint64_t root, uint64_t gva, uint64_t page_size, uint64_t entry, bool kernel);
  bool Fail(const std::string& why);
  const MappingList* ListOf(uint64_t cr3, uint64_t gva) const;

  const PagingMode mode_;
  Writer write_;
  uint64_t next_table_;
  const uint64_t table_limit_;
  uint64_t kernel_root_ = 0;
  std::vector<uint64_t> processes_;
  std::vector<uint64_t> table_pages_;
  std::map<uint64_t, std::vector<uint64_t>> tables_;  // shadow of every table, by its gpa
  MappingList kernel_;
  std::map<uint64_t, MappingList> user_;  // by cr3
  std::string error_;
};

}  // namespace kvmi::sim

#endif  // KVMID_KERNEL_SIM_PAGE_TABLES_H_
