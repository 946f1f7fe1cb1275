#include "daemon/vmem/page_walker.h"

#include <cinttypes>
#include <cstdio>
#include <utility>

#include "absl/base/thread_annotations.h"
#include "daemon/base/mutex.h"

namespace kvmid::vmem {
namespace {

constexpr uint64_t kCr0Pg = 1ull << 31;
constexpr uint64_t kCr4Pse = 1ull << 4;
constexpr uint64_t kCr4Pae = 1ull << 5;
constexpr uint64_t kCr4La57 = 1ull << 12;
constexpr uint64_t kEferLma = 1ull << 10;
constexpr uint64_t kEferNxe = 1ull << 11;

constexpr uint64_t kPresent = 1ull << 0;
constexpr uint64_t kWritable = 1ull << 1;
constexpr uint64_t kUser = 1ull << 2;
constexpr uint64_t kLarge = 1ull << 7;
constexpr uint64_t kNx = 1ull << 63;
// PAE PDPTEs: bits 2:1 and 8:5 are reserved (and 63: no NX at this level).
constexpr uint64_t kPaePdpteReserved = 0x1e6ull | kNx;
constexpr uint64_t kLarge1GReserved = 0x3fffe000ull;  // bits 29:13 of a 1 GiB PDPTE
constexpr uint64_t kLarge2MReserved = 0x1fe000ull;    // bits 20:13 of a 2 MiB PDE

std::string Hex(uint64_t v) {
  char buf[24];
  std::snprintf(buf, sizeof(buf), "0x%" PRIx64, v);
  return buf;
}

int TopLevel(PagingMode mode) {
  switch (mode) {
    case PagingMode::kOff:
      return 0;
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

unsigned EntryBytes(PagingMode mode) { return mode == PagingMode::k32Bit ? 4 : 8; }

unsigned Shift(PagingMode mode, int level) {
  if (mode == PagingMode::k32Bit) return level == 1 ? 12 : 22;
  return 12 + 9 * static_cast<unsigned>(level - 1);
}

uint64_t IndexMask(PagingMode mode, int level) {
  if (mode == PagingMode::k32Bit) return 0x3ff;
  if (mode == PagingMode::kPae && level == 3) return 0x3;
  return 0x1ff;
}

// Physical-address bits of an 8-byte entry (51:12, cut at MAXPHYADDR).
uint64_t AddressMask(unsigned max_phys_bits) {
  unsigned bits = max_phys_bits > kMaxPhysBits ? kMaxPhysBits : max_phys_bits;
  return ((1ull << bits) - 1) & ~(kPageSize - 1);
}

// Bits 51:MAXPHYADDR: reserved in every present 8-byte entry.
uint64_t PhysReserved(unsigned max_phys_bits) {
  if (max_phys_bits >= kMaxPhysBits) return 0;
  return ((1ull << kMaxPhysBits) - 1) & ~((1ull << max_phys_bits) - 1);
}

// One walk in progress.
struct WalkState {
  std::shared_ptr<EntryReader> reader;
  PagingContext context;
  uint64_t gva = 0;
  WalkCallback done;
  int level = 0;
  uint64_t table = 0;
  bool writable = true;
  bool user = true;
  bool nx = false;
  Translation result;
};

void Step(const std::shared_ptr<WalkState>& state);

// The entry of the current level arrived.
void OnEntry(const std::shared_ptr<WalkState>& state, absl::StatusOr<uint64_t> value) {
  WalkState& s = *state;
  const PagingMode mode = s.context.mode;
  const int level = s.level;
  Translation& t = s.result;
  if (!value.ok()) {
    absl::Status failed(value.status().code(), "reading the " + LevelName(mode, level) + " of " +
                                                   Hex(s.gva) + " at " +
                                                   Hex(t.entry_gpas[t.entries_read - 1]) + ": " +
                                                   std::string(value.status().message()));
    s.done(failed);
    return;
  }
  const uint64_t e = *value;
  t.level = level;
  t.entry = e;
  if (!(e & kPresent)) {
    s.done(t);  // not present at this level
    return;
  }
  const bool wide = EntryBytes(mode) == 8;
  const bool pae_pdpte = mode == PagingMode::kPae && level == 3;
  const bool large =
      level > 1 && !pae_pdpte && (e & kLarge) && (mode != PagingMode::k32Bit || s.context.pse);
  // Reserved bits, as the CPU checks them.
  uint64_t reserved = 0;
  if (wide) {
    reserved = PhysReserved(s.context.max_phys_bits);
    if (!s.context.nxe) reserved |= kNx;
    if (pae_pdpte) reserved |= kPaePdpteReserved;
    if ((mode == PagingMode::k4Level || mode == PagingMode::k5Level) && level >= 4) {
      reserved |= kLarge;  // no pages at PML5E/PML4E level
    }
    if (large && level == 3) reserved |= kLarge1GReserved;
    if (large && level == 2) reserved |= kLarge2MReserved;
  } else if (large) {
    reserved = 1ull << 21;  // a 4 MiB PDE: bit 21; bits 20:13 hold PA bits 39:32
    unsigned high_bits = s.context.max_phys_bits > 40 ? 8 : s.context.max_phys_bits - 32;
    if (s.context.max_phys_bits <= 32) high_bits = 0;
    reserved |= (0xffull << 13) & ~(((1ull << high_bits) - 1) << 13);
  }
  if (e & reserved) {
    t.reserved_bits = true;
    s.done(t);
    return;
  }
  if (!pae_pdpte) {
    s.writable &= (e & kWritable) != 0;
    s.user &= (e & kUser) != 0;
    if (wide && s.context.nxe) s.nx |= (e & kNx) != 0;
  }
  if (level == 1 || large) {
    uint64_t size = 1ull << Shift(mode, level);
    uint64_t base;
    if (mode == PagingMode::k32Bit) {
      base =
          level == 1 ? (e & 0xfffff000ull) : ((e & 0xffc00000ull) | (((e >> 13) & 0xffull) << 32));
    } else {
      base = e & AddressMask(s.context.max_phys_bits) & ~(size - 1);
    }
    t.present = true;
    t.gpa = base + (s.gva & (size - 1));
    t.page_size = size;
    t.writable = s.writable;
    t.user = s.user;
    t.executable = !s.nx;
    s.done(t);
    return;
  }
  s.table = wide ? (e & AddressMask(s.context.max_phys_bits)) : (e & 0xfffff000ull);
  s.level = level - 1;
  Step(state);
}

void Step(const std::shared_ptr<WalkState>& state) {
  WalkState& s = *state;
  const PagingMode mode = s.context.mode;
  uint64_t index = (s.gva >> Shift(mode, s.level)) & IndexMask(mode, s.level);
  uint64_t gpa = s.table + index * EntryBytes(mode);
  s.result.entry_gpas[s.result.entries_read++] = gpa;
  s.reader->ReadEntry(gpa, EntryBytes(mode), [state](absl::StatusOr<uint64_t> value) {
    OnEntry(state, std::move(value));
  });
}

}  // namespace

const char* PagingModeName(PagingMode mode) {
  switch (mode) {
    case PagingMode::kOff:
      return "off";
    case PagingMode::k32Bit:
      return "32-bit";
    case PagingMode::kPae:
      return "PAE";
    case PagingMode::k4Level:
      return "4-level";
    case PagingMode::k5Level:
      return "5-level";
  }
  return "?";
}

PagingContext ContextFromRegisters(uint64_t cr0, uint64_t cr3, uint64_t cr4, uint64_t efer) {
  PagingContext c;
  c.cr3 = cr3;
  c.pse = (cr4 & kCr4Pse) != 0;
  if (!(cr0 & kCr0Pg)) {
    c.mode = PagingMode::kOff;
  } else if (!(cr4 & kCr4Pae)) {
    c.mode = PagingMode::k32Bit;
  } else if (!(efer & kEferLma)) {
    c.mode = PagingMode::kPae;
  } else {
    c.mode = (cr4 & kCr4La57) ? PagingMode::k5Level : PagingMode::k4Level;
  }
  c.nxe = c.mode != PagingMode::k32Bit && (efer & kEferNxe) != 0;
  return c;
}

std::string LevelName(PagingMode mode, int level) {
  switch (level) {
    case 5:
      return "PML5E";
    case 4:
      return "PML4E";
    case 3:
      return mode == PagingMode::kPae ? "PDPTE (PAE)" : "PDPTE";
    case 2:
      return "PDE";
    case 1:
      return "PTE";
    default:
      return "no entry (paging off)";
  }
}

void Walk(std::shared_ptr<EntryReader> reader, const PagingContext& context, uint64_t gva,
          WalkCallback done) {
  const PagingMode mode = context.mode;
  if (mode == PagingMode::kOff) {
    Translation t;
    t.present = true;
    t.gpa = gva;
    t.page_size = kPageSize;
    t.writable = t.user = t.executable = true;
    done(t);
    return;
  }
  if (mode == PagingMode::k32Bit || mode == PagingMode::kPae) {
    if (gva > 0xffffffffull) {
      done(absl::InvalidArgumentError("gva " + Hex(gva) + " is beyond 4 GiB in " +
                                      PagingModeName(mode) + " paging"));
      return;
    }
  } else {
    unsigned bits = mode == PagingMode::k5Level ? 57 : 48;
    int64_t extended = static_cast<int64_t>(gva << (64 - bits)) >> (64 - bits);
    if (static_cast<uint64_t>(extended) != gva) {
      done(absl::InvalidArgumentError(
          "gva " + Hex(gva) + " is not canonical in " + PagingModeName(mode) +
          " paging (bits 63:" + std::to_string(bits - 1) + " must be equal)"));
      return;
    }
  }
  auto state = std::make_shared<WalkState>();
  state->reader = std::move(reader);
  state->context = context;
  state->gva = gva;
  state->done = std::move(done);
  state->level = TopLevel(mode);
  if (mode == PagingMode::k32Bit) {
    state->table = context.cr3 & 0xfffff000ull;
  } else if (mode == PagingMode::kPae) {
    state->table = context.cr3 & 0xffffffe0ull;
  } else {
    state->table = context.cr3 & AddressMask(context.max_phys_bits);
  }
  Step(state);
}

void WalkMany(const std::shared_ptr<EntryReader>& reader, const PagingContext& context,
              std::vector<uint64_t> gvas,
              std::function<void(std::vector<absl::StatusOr<Translation>>)> done) {
  struct Gather {
    Mutex mu;
    std::vector<absl::StatusOr<Translation>> results ABSL_GUARDED_BY(mu);
    size_t left ABSL_GUARDED_BY(mu) = 0;
    std::function<void(std::vector<absl::StatusOr<Translation>>)> done;
  };
  if (gvas.empty()) {
    done({});
    return;
  }
  auto gather = std::make_shared<Gather>();
  {
    MutexLock lock(&gather->mu);
    gather->results.assign(gvas.size(), absl::UnknownError("not walked"));
    gather->left = gvas.size();
  }
  gather->done = std::move(done);
  for (size_t i = 0; i < gvas.size(); ++i) {
    Walk(reader, context, gvas[i], [gather, i](absl::StatusOr<Translation> result) {
      std::vector<absl::StatusOr<Translation>> all;
      {
        MutexLock lock(&gather->mu);
        gather->results[i] = std::move(result);
        if (--gather->left != 0) return;
        all = std::move(gather->results);
      }
      gather->done(std::move(all));
    });
  }
}

}  // namespace kvmid::vmem
