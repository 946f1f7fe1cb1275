// Reading guest-virtual memory page by page, once the pages are translated: the part of a
// virtual read that does not care where the translations came from (the unary ReadVirtual and
// each chunk of ReadVirtualStream). Every page of the range is reported: read, not present (with
// the level the walk stopped at), or failed -- never a silent short read.
#ifndef KVMID_DAEMON_VMEM_VIRTUAL_READ_H_
#define KVMID_DAEMON_VMEM_VIRTUAL_READ_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "daemon/session/guest_session.h"
#include "daemon/vmem/page_walker.h"

namespace kvmid::vmem {

// One page's piece of the range: [gva, gva + length) lies in one guest page.
struct PagePlan {
  uint64_t gva = 0;
  uint64_t length = 0;
  absl::StatusOr<Translation> translation = absl::UnknownError("not translated");
};

// The pieces of [gva, gva + size), split at page boundaries (4 KiB: a large page is read in 4 KiB
// pieces too, as READ_PHYSICAL allows). size > 0; the range must not wrap.
std::vector<PagePlan> SplitIntoPages(uint64_t gva, uint64_t size);

struct PageOutcome {
  uint64_t gva = 0;
  uint64_t length = 0;
  bool read = false;  // the bytes are in the data
  uint64_t gpa = 0;   // translated pages
  // Not read: why ("not present at PDE", "reserved bits set in PTE", the walk's or the read's
  // error).
  std::string why;
};

using VirtualReadCallback =
    std::function<void(std::vector<uint8_t> data, std::vector<PageOutcome> pages)>;

// Reads every translated, present piece with READ_PHYSICAL (all in flight at once) and answers
// once, on any thread: `data` holds the whole range (pieces not read are zeros) and `pages` one
// outcome per piece, in order.
// `mode` names the levels in the outcomes ("not present at PDE").
void ReadPages(const std::shared_ptr<GuestSession>& session, std::vector<PagePlan> plan,
               PagingMode mode, VirtualReadCallback done);

}  // namespace kvmid::vmem

#endif  // KVMID_DAEMON_VMEM_VIRTUAL_READ_H_
