#include "daemon/vmem/virtual_read.h"

#include <cstring>
#include <utility>

#include "absl/base/thread_annotations.h"
#include "daemon/base/mutex.h"
#include "daemon/vmem/session_reader.h"

namespace kvmid::vmem {

std::vector<PagePlan> SplitIntoPages(uint64_t gva, uint64_t size) {
  std::vector<PagePlan> plan;
  uint64_t at = gva;
  uint64_t left = size;
  while (left > 0) {
    uint64_t in_page = kPageSize - (at & (kPageSize - 1));
    PagePlan piece;
    piece.gva = at;
    piece.length = in_page < left ? in_page : left;
    plan.push_back(std::move(piece));
    at += plan.back().length;
    left -= plan.back().length;
  }
  return plan;
}

void ReadPages(const std::shared_ptr<GuestSession>& session, std::vector<PagePlan> plan,
               PagingMode mode, VirtualReadCallback done) {
  struct Gather {
    Mutex mu;
    std::vector<uint8_t> data ABSL_GUARDED_BY(mu);
    std::vector<PageOutcome> pages ABSL_GUARDED_BY(mu);
    size_t left ABSL_GUARDED_BY(mu) = 0;
    VirtualReadCallback done;
  };
  auto gather = std::make_shared<Gather>();
  gather->done = std::move(done);
  std::vector<size_t> offsets;
  std::vector<size_t> to_read;
  {
    MutexLock lock(&gather->mu);
    size_t total = 0;
    for (size_t i = 0; i < plan.size(); ++i) {
      const PagePlan& p = plan[i];
      offsets.push_back(total);
      total += p.length;
      PageOutcome outcome;
      outcome.gva = p.gva;
      outcome.length = p.length;
      if (!p.translation.ok()) {
        outcome.why = std::string(p.translation.status().message());
      } else if (!p.translation->present) {
        const Translation& t = *p.translation;
        outcome.why = std::string(t.reserved_bits ? "reserved bits set in " : "not present at ") +
                      LevelName(mode, t.level);
      } else {
        outcome.gpa = p.translation->gpa;
        to_read.push_back(i);
      }
      gather->pages.push_back(std::move(outcome));
    }
    gather->data.assign(total, 0);
    gather->left = to_read.size();
  }
  if (to_read.empty()) {
    std::vector<uint8_t> data;
    std::vector<PageOutcome> pages;
    {
      MutexLock lock(&gather->mu);
      data = std::move(gather->data);
      pages = std::move(gather->pages);
    }
    gather->done(std::move(data), std::move(pages));
    return;
  }
  for (size_t i : to_read) {
    const size_t offset = offsets[i];
    session->ReadPhysical(
        plan[i].translation->gpa, plan[i].length, [gather, i, offset](CommandResult result) {
          std::vector<uint8_t> data;
          std::vector<PageOutcome> pages;
          {
            MutexLock lock(&gather->mu);
            PageOutcome& outcome = gather->pages[i];
            if (result.ok() && result.data.size() == outcome.length) {
              std::memcpy(gather->data.data() + offset, result.data.data(), outcome.length);
              outcome.read = true;
            } else {
              outcome.why = result.ok() ? "short READ_PHYSICAL reply"
                                        : std::string(StatusOf(result, "READ_PHYSICAL").message());
            }
            if (--gather->left != 0) return;
            data = std::move(gather->data);
            pages = std::move(gather->pages);
          }
          gather->done(std::move(data), std::move(pages));
        });
  }
}

}  // namespace kvmid::vmem
