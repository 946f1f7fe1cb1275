// Event context (issue 15): bytes of guest memory kvmid reads with an event, in the daemon, while
// the vCPU is already stopped -- the instruction at RIP, the top of the stack, the bytes around a
// faulting address -- so that a handler or a policy decides without a round trip of its own.
// These are the plain types every part shares: what is asked (ContextDemand), what was read
// (CapturedContext, one ContextBlock per request). The capture is context_capture.h.
#ifndef KVMID_DAEMON_VMEM_EVENT_CONTEXT_H_
#define KVMID_DAEMON_VMEM_EVENT_CONTEXT_H_

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

namespace kvmid::vmem {

// The most bytes one block may ask for (rip_bytes, rsp_bytes, pf_bytes each): a few instructions,
// a few stack slots. Requests above it are INVALID_ARGUMENT naming the field and this limit.
inline constexpr uint32_t kMaxContextBytes = 256;
// The most bytes a policy's rip_bytes_prefix may hold (the longest x86 instruction is 15).
inline constexpr uint32_t kMaxRipPrefixBytes = 16;

enum class ContextKind : uint8_t {
  kRip,  // [RIP, RIP + rip_bytes): the instruction(s) at RIP
  kRsp,  // [RSP, RSP + rsp_bytes): the top of the stack
  kPf,   // PF events: pf_bytes centred on the faulting GVA ([gva - n/2, gva + n/2))
};
inline const char* ContextKindName(ContextKind kind) {
  switch (kind) {
    case ContextKind::kRip:
      return "rip";
    case ContextKind::kRsp:
      return "rsp";
    case ContextKind::kPf:
      return "pf";
  }
  return "?";
}

// What is asked for one event type: bytes per block, 0 = none. The union of several demands takes
// the largest of each. Packs into 64 bits, so that the event path reads a demand with one load.
struct ContextDemand {
  uint32_t rip = 0;
  uint32_t rsp = 0;
  uint32_t pf = 0;

  bool empty() const { return rip == 0 && rsp == 0 && pf == 0; }
  void Add(const ContextDemand& o) {
    rip = std::max(rip, o.rip);
    rsp = std::max(rsp, o.rsp);
    pf = std::max(pf, o.pf);
  }
  bool operator==(const ContextDemand& o) const {
    return rip == o.rip && rsp == o.rsp && pf == o.pf;
  }
  // 16 bits each (every field is at most kMaxContextBytes).
  uint64_t Pack() const {
    return uint64_t{std::min<uint32_t>(rip, 0xffff)} |
           uint64_t{std::min<uint32_t>(rsp, 0xffff)} << 16 |
           uint64_t{std::min<uint32_t>(pf, 0xffff)} << 32;
  }
  static ContextDemand Unpack(uint64_t packed) {
    return ContextDemand{static_cast<uint32_t>(packed & 0xffff),
                         static_cast<uint32_t>((packed >> 16) & 0xffff),
                         static_cast<uint32_t>((packed >> 32) & 0xffff)};
  }
};

// One block as read. Never a silent short block: `data` is the part of [gva, gva + size) that was
// read, from its start (a prefix: a page that is not present ends it); `complete` says whether it
// is all of it, and `why` says why not (the page not present and the level the walk stopped at,
// the guest's read error, or the capture's time running out).
struct ContextBlock {
  ContextKind kind = ContextKind::kRip;
  uint64_t gva = 0;
  uint32_t size = 0;  // asked for
  std::vector<uint8_t> data;
  bool complete = false;
  std::string why;
};

// Every block captured for one event (shared, immutable once made: the event ring, the handler's
// copy and the policies all read the same one).
struct CapturedContext {
  std::vector<ContextBlock> blocks;

  const ContextBlock* Find(ContextKind kind) const {
    for (const ContextBlock& b : blocks) {
      if (b.kind == kind) return &b;
    }
    return nullptr;
  }
};

}  // namespace kvmid::vmem

#endif  // KVMID_DAEMON_VMEM_EVENT_CONTEXT_H_
