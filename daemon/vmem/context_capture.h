// Reads an event's context (event_context.h) through the guest's own page tables, in the paging
// mode of the registers the event carries (no GET_REGISTERS): every block's pages are translated
// (the translation cache first, else a page walk), then read, every read in flight at once
// (pipelined READ_PHYSICAL on the guest's session). Nothing blocks: the capture answers from the
// reads' callbacks, once, when the last read answered or when Expire() is called (the event's
// time budget ran out), whichever comes first; blocks not finished then are marked incomplete
// with the reason.
#ifndef KVMID_DAEMON_VMEM_CONTEXT_CAPTURE_H_
#define KVMID_DAEMON_VMEM_CONTEXT_CAPTURE_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "daemon/base/mutex.h"
#include "daemon/session/guest_session.h"
#include "daemon/vmem/event_context.h"
#include "daemon/vmem/page_walker.h"
#include "daemon/vmem/translation_cache.h"
#include "kernel/abi/events.h"

namespace kvmid::vmem {

// Reads guest-physical memory. Implementations may answer inline or later, on any thread.
class PhysicalMemory {
 public:
  virtual ~PhysicalMemory() = default;
  // [gpa, gpa + size) lies in one 4 KiB page. `done` gets exactly `size` bytes, or the failure.
  virtual void Read(uint64_t gpa, uint32_t size,
                    std::function<void(absl::StatusOr<std::vector<uint8_t>>)> done) = 0;
};

// The guest's session as PhysicalMemory: one READ_PHYSICAL per read (answered on its loop thread).
class SessionMemory final : public PhysicalMemory {
 public:
  explicit SessionMemory(std::shared_ptr<GuestSession> session) : session_(std::move(session)) {}
  void Read(uint64_t gpa, uint32_t size,
            std::function<void(absl::StatusOr<std::vector<uint8_t>>)> done) override;

 private:
  std::shared_ptr<GuestSession> session_;
};

// The blocks `demand` asks of `event`, in the order they are captured (RIP, RSP, PF), with their
// ranges; a PF block only for a PF event. Empty blocks (0 bytes) are left out.
std::vector<ContextBlock> PlanBlocks(const kvmi::Event& event, const ContextDemand& demand);

class ContextCapture : public std::enable_shared_from_this<ContextCapture> {
 public:
  using Done = std::function<void(std::shared_ptr<const CapturedContext>)>;

  // Starts capturing `demand` for `event` from `memory` (the page walks read their entries from it
  // too). `cache` (may be null) is the guest's translation cache: looked up first (the vCPU's
  // bucket, the event's paging context), fed with what the walks find. `done` runs exactly once,
  // on the thread of the last read's answer or of Expire(); it may run before Start returns.
  static std::shared_ptr<ContextCapture> Start(std::shared_ptr<PhysicalMemory> memory,
                                               std::shared_ptr<TranslationCache> cache,
                                               const kvmi::Event& event,
                                               const ContextDemand& demand, Done done);

  // Answers now (if not yet) with what was read; pieces still in flight make their blocks
  // incomplete with `why`. Their reads still answer later, into nothing.
  void Expire(const std::string& why) ABSL_LOCKS_EXCLUDED(mu_);
  bool finished() const ABSL_LOCKS_EXCLUDED(mu_);

 private:
  // One page's part of one block.
  struct Piece {
    size_t block = 0;
    uint32_t offset = 0;  // in the block
    uint64_t gva = 0;
    uint32_t length = 0;
    bool done = false;
    bool read = false;
    std::string why;  // not read: why
  };

  ContextCapture(std::shared_ptr<PhysicalMemory> memory, std::shared_ptr<TranslationCache> cache,
                 const kvmi::Event& event, Done done);
  void Begin(const kvmi::Event& event, const ContextDemand& demand) ABSL_LOCKS_EXCLUDED(mu_);
  void Translated(size_t piece, absl::StatusOr<Translation> translation) ABSL_LOCKS_EXCLUDED(mu_);
  void ReadDone(size_t piece, absl::StatusOr<std::vector<uint8_t>> bytes) ABSL_LOCKS_EXCLUDED(mu_);
  // Marks `piece` done; answers when it was the last one.
  void PieceDone(size_t piece, bool read, std::string why) ABSL_LOCKS_EXCLUDED(mu_);
  // Builds the answer (once); the caller runs done_ with it outside the lock.
  std::shared_ptr<const CapturedContext> FinishLocked(const std::string& pending_why)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const std::shared_ptr<PhysicalMemory> memory_;
  const std::shared_ptr<TranslationCache> cache_;
  const uint16_t vcpu_;
  const PagingContext paging_;
  Done done_;  // moved out by whoever finishes
  mutable Mutex mu_;
  std::vector<ContextBlock> blocks_ ABSL_GUARDED_BY(mu_);
  std::vector<Piece> pieces_ ABSL_GUARDED_BY(mu_);
  size_t left_ ABSL_GUARDED_BY(mu_) = 0;
  bool finished_ ABSL_GUARDED_BY(mu_) = false;
};

}  // namespace kvmid::vmem

#endif  // KVMID_DAEMON_VMEM_CONTEXT_CAPTURE_H_
