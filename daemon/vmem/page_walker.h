// Guest-virtual to guest-physical translation: the x86 page walk (Intel SDM vol. 3A ch. 4) over
// the guest's own page tables, read through an asynchronous physical reader (in kvmid, the
// guest's READ_PHYSICAL commands). Covers paging off, 32-bit paging (4 KiB and, with CR4.PSE,
// 4 MiB pages, PSE-36), PAE (2 MiB pages, NX), and 4- and 5-level long-mode paging (2 MiB and
// 1 GiB pages, NX when EFER.NXE).
//
// The tables are guest-controlled, so the walk trusts nothing: it reads at most one entry per
// level (at most 5 reads: a loop in the tables cannot make it work longer), an entry that points
// outside guest RAM ends it with the reader's error naming the level, and an entry with reserved
// bits set ends it as the CPU would (a page fault with RSVD): a result that says so, not a crash.
#ifndef KVMID_DAEMON_VMEM_PAGE_WALKER_H_
#define KVMID_DAEMON_VMEM_PAGE_WALKER_H_

#include <array>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace kvmid::vmem {

// The walker's limits and constants (error messages are built from them).
inline constexpr int kMaxLevels = 5;
inline constexpr uint64_t kPageSize = 4096;
// The architectural maximum physical-address width (reserved-bit checks start above it).
inline constexpr unsigned kMaxPhysBits = 52;

enum class PagingMode : uint8_t {
  kOff,     // CR0.PG clear: guest-virtual is guest-physical
  k32Bit,   // 2 levels of 4-byte entries
  kPae,     // PDPT (4 entries) -> PD -> PT
  k4Level,  // PML4 -> PDPT -> PD -> PT
  k5Level,  // PML5 -> PML4 -> PDPT -> PD -> PT (CR4.LA57)
};
const char* PagingModeName(PagingMode mode);  // "off", "32-bit", "PAE", "4-level", "5-level"

// What the walk needs from the vCPU.
struct PagingContext {
  PagingMode mode = PagingMode::kOff;
  uint64_t cr3 = 0;  // as the vCPU holds it; flag/PCID bits are ignored
  bool nxe = false;  // EFER.NXE: bit 63 of an entry is NX (else it is reserved)
  bool pse = false;  // CR4.PSE: 4 MiB pages in 32-bit paging
  unsigned max_phys_bits = kMaxPhysBits;  // MAXPHYADDR (CPUID 0x80000008 EAX[7:0])

  bool operator==(const PagingContext& o) const {
    return mode == o.mode && cr3 == o.cr3 && nxe == o.nxe && pse == o.pse &&
           max_phys_bits == o.max_phys_bits;
  }
};

// The mode the registers select: CR0.PG, CR4.PAE, EFER.LMA, CR4.LA57 (and CR4.PSE, EFER.NXE).
PagingContext ContextFromRegisters(uint64_t cr0, uint64_t cr3, uint64_t cr4, uint64_t efer);

// The table level an entry belongs to (5 = PML5 .. 1 = PT), for messages: "PML4E", "PDE", ...
std::string LevelName(PagingMode mode, int level);

struct Translation {
  bool present = false;
  // Present: where `gva` is, the size of the page that maps it, and the access the entries of
  // every level grant together (R is implied; NX only counts with EFER.NXE).
  uint64_t gpa = 0;
  uint64_t page_size = 0;
  bool writable = false;
  bool user = false;
  bool executable = false;
  // The level of the leaf entry (present) or of the entry that stopped the walk (not present or
  // reserved bits), and that entry's raw value (0 when paging is off).
  int level = 0;
  uint64_t entry = 0;
  bool reserved_bits = false;  // the stopping entry has reserved bits set (would be #PF RSVD)
  // The physical address of every entry read, top level first (for cache invalidation).
  std::array<uint64_t, kMaxLevels> entry_gpas{};
  int entries_read = 0;
};

// Reads one page-table entry. Implementations may answer inline or later, on any thread.
class EntryReader {
 public:
  virtual ~EntryReader() = default;
  // `size` is 4 or 8; `done` gets the little-endian value, or the failure.
  virtual void ReadEntry(uint64_t gpa, unsigned size,
                         std::function<void(absl::StatusOr<uint64_t>)> done) = 0;
};

using WalkCallback = std::function<void(absl::StatusOr<Translation>)>;

// Translates `gva`. `done` runs once: with the Translation (present or not), or an error:
// INVALID_ARGUMENT for a non-canonical address (or one beyond 4 GiB outside long mode), or the
// reader's failure with the level and the entry's address added. The walk keeps `reader` alive
// until `done` ran.
void Walk(std::shared_ptr<EntryReader> reader, const PagingContext& context, uint64_t gva,
          WalkCallback done);

// Many walks at once (their reads pipelined); `done` gets one result per address, in order.
void WalkMany(const std::shared_ptr<EntryReader>& reader, const PagingContext& context,
              std::vector<uint64_t> gvas,
              std::function<void(std::vector<absl::StatusOr<Translation>>)> done);

}  // namespace kvmid::vmem

#endif  // KVMID_DAEMON_VMEM_PAGE_WALKER_H_
