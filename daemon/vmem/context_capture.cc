#include "daemon/vmem/context_capture.h"

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <optional>
#include <utility>

#include "daemon/vmem/session_reader.h"

namespace kvmid::vmem {
namespace {

// The page walker's entries, read through the same PhysicalMemory as the blocks.
class MemoryEntryReader final : public EntryReader {
 public:
  explicit MemoryEntryReader(std::shared_ptr<PhysicalMemory> memory) : memory_(std::move(memory)) {}
  void ReadEntry(uint64_t gpa, unsigned size,
                 std::function<void(absl::StatusOr<uint64_t>)> done) override {
    memory_->Read(gpa, size,
                  [size, done = std::move(done)](absl::StatusOr<std::vector<uint8_t>> bytes) {
                    if (!bytes.ok()) return done(bytes.status());
                    uint64_t value = 0;
                    std::memcpy(&value, bytes->data(), size);  // x86: little-endian, as the host
                    done(value);
                  });
  }

 private:
  std::shared_ptr<PhysicalMemory> memory_;
};

std::string Hex(uint64_t v) {
  char text[24];
  std::snprintf(text, sizeof(text), "0x%llx", static_cast<unsigned long long>(v));
  return text;
}

}  // namespace

void SessionMemory::Read(uint64_t gpa, uint32_t size,
                         std::function<void(absl::StatusOr<std::vector<uint8_t>>)> done) {
  session_->ReadPhysical(gpa, size, [size, done = std::move(done)](CommandResult result) {
    if (!result.ok()) return done(StatusOf(result, "READ_PHYSICAL"));
    if (result.data.size() != size) {
      return done(absl::InternalError("READ_PHYSICAL returned " +
                                      std::to_string(result.data.size()) + " bytes for " +
                                      std::to_string(size)));
    }
    done(std::move(result.data));
  });
}

std::vector<ContextBlock> PlanBlocks(const kvmi::Event& event, const ContextDemand& demand) {
  std::vector<ContextBlock> blocks;
  auto add = [&blocks](ContextKind kind, uint64_t gva, uint32_t size) {
    if (size == 0) return;
    ContextBlock block;
    block.kind = kind;
    block.gva = gva;
    block.size = size;
    blocks.push_back(std::move(block));
  };
  const kvm_regs& regs = event.common.arch.regs;
  add(ContextKind::kRip, regs.rip, demand.rip);
  add(ContextKind::kRsp, regs.rsp, demand.rsp);
  if (event.id() == KVMI_EVENT_PF) {
    const uint64_t gva = event.specific.pf.gva;
    const uint64_t half = demand.pf / 2;
    add(ContextKind::kPf, gva >= half ? gva - half : 0, demand.pf);
  }
  return blocks;
}

ContextCapture::ContextCapture(std::shared_ptr<PhysicalMemory> memory,
                               std::shared_ptr<TranslationCache> cache, const kvmi::Event& event,
                               Done done)
    : memory_(std::move(memory)),
      cache_(std::move(cache)),
      vcpu_(event.vcpu()),
      paging_(ContextFromRegisters(event.common.arch.sregs.cr0, event.common.arch.sregs.cr3,
                                   event.common.arch.sregs.cr4, event.common.arch.sregs.efer)),
      done_(std::move(done)) {}

std::shared_ptr<ContextCapture> ContextCapture::Start(std::shared_ptr<PhysicalMemory> memory,
                                                      std::shared_ptr<TranslationCache> cache,
                                                      const kvmi::Event& event,
                                                      const ContextDemand& demand, Done done) {
  std::shared_ptr<ContextCapture> capture(
      new ContextCapture(std::move(memory), std::move(cache), event, std::move(done)));
  capture->Begin(event, demand);
  return capture;
}

void ContextCapture::Begin(const kvmi::Event& event, const ContextDemand& demand) {
  // Set up every piece first (under the lock), then start the walks and reads outside it: they
  // may answer inline.
  struct Pending {
    size_t index;
    uint64_t gva;
    std::optional<Translation> hit;
  };
  std::vector<Pending> to_translate;
  std::shared_ptr<const CapturedContext> answer;
  Done done;
  {
    MutexLock lock(&mu_);
    blocks_ = PlanBlocks(event, demand);
    const auto now = TranslationCache::Clock::now();
    for (size_t b = 0; b < blocks_.size(); ++b) {
      ContextBlock& block = blocks_[b];
      block.data.assign(block.size, 0);
      // Bytes up to the end of the address space (0 - gva, or all of them from 0).
      const uint64_t room = block.gva == 0 ? UINT64_MAX : 0 - block.gva;
      const uint32_t usable = static_cast<uint32_t>(std::min<uint64_t>(block.size, room));
      uint64_t at = block.gva;
      uint32_t offset = 0;
      while (offset < usable) {
        Piece piece;
        piece.block = b;
        piece.offset = offset;
        piece.gva = at;
        const uint64_t in_page = kPageSize - (at & (kPageSize - 1));
        piece.length = static_cast<uint32_t>(std::min<uint64_t>(in_page, usable - offset));
        std::optional<Translation> hit;
        if (cache_) hit = cache_->Lookup(vcpu_, paging_, at, now);
        to_translate.push_back(Pending{pieces_.size(), at, hit});
        pieces_.push_back(piece);
        offset += piece.length;
        at += piece.length;
      }
      if (usable < block.size) {
        Piece beyond;
        beyond.block = b;
        beyond.offset = usable;
        beyond.gva = at;
        beyond.length = block.size - usable;
        beyond.done = true;
        beyond.why = "beyond the end of the address space";
        pieces_.push_back(std::move(beyond));
      }
    }
    left_ = to_translate.size();
    if (left_ == 0) {
      answer = FinishLocked("");
      done = std::move(done_);
    }
  }
  if (done) {
    done(std::move(answer));
    return;
  }
  std::shared_ptr<EntryReader> reader;
  for (Pending& start : to_translate) {
    if (start.hit) {
      Translated(start.index, *start.hit);
      continue;
    }
    if (!reader) reader = std::make_shared<MemoryEntryReader>(memory_);
    auto self = shared_from_this();
    Walk(reader, paging_, start.gva,
         [self, index = start.index, gva = start.gva](absl::StatusOr<Translation> t) {
           if (t.ok() && t->present && self->cache_) {
             self->cache_->Insert(self->vcpu_, self->paging_, gva, *t,
                                  TranslationCache::Clock::now());
           }
           self->Translated(index, std::move(t));
         });
  }
}

void ContextCapture::Translated(size_t index, absl::StatusOr<Translation> translation) {
  if (!translation.ok())
    return PieceDone(index, false, std::string(translation.status().message()));
  const Translation& t = *translation;
  if (!t.present) {
    return PieceDone(index, false,
                     std::string(t.reserved_bits ? "reserved bits set in " : "not present at ") +
                         LevelName(paging_.mode, t.level));
  }
  uint32_t length;
  {
    MutexLock lock(&mu_);
    if (finished_) return;
    length = pieces_[index].length;
  }
  auto self = shared_from_this();
  memory_->Read(t.gpa, length, [self, index](absl::StatusOr<std::vector<uint8_t>> bytes) {
    self->ReadDone(index, std::move(bytes));
  });
}

void ContextCapture::ReadDone(size_t index, absl::StatusOr<std::vector<uint8_t>> bytes) {
  if (!bytes.ok()) return PieceDone(index, false, std::string(bytes.status().message()));
  {
    MutexLock lock(&mu_);
    if (finished_) return;
    const Piece& piece = pieces_[index];
    if (bytes->size() != piece.length) {
      MutexUnlock unlock(&mu_);
      return PieceDone(index, false, "short read");
    }
    std::memcpy(blocks_[piece.block].data.data() + piece.offset, bytes->data(), piece.length);
  }
  PieceDone(index, true, "");
}

void ContextCapture::PieceDone(size_t index, bool read, std::string why) {
  std::shared_ptr<const CapturedContext> answer;
  Done done;
  {
    MutexLock lock(&mu_);
    if (finished_) return;
    Piece& piece = pieces_[index];
    piece.done = true;
    piece.read = read;
    piece.why = std::move(why);
    if (--left_ != 0) return;
    answer = FinishLocked("");
    done = std::move(done_);
  }
  done(std::move(answer));
}

void ContextCapture::Expire(const std::string& why) {
  std::shared_ptr<const CapturedContext> answer;
  Done done;
  {
    MutexLock lock(&mu_);
    if (finished_) return;
    answer = FinishLocked(why);
    done = std::move(done_);
  }
  done(std::move(answer));
}

bool ContextCapture::finished() const {
  MutexLock lock(&mu_);
  return finished_;
}

std::shared_ptr<const CapturedContext> ContextCapture::FinishLocked(
    const std::string& pending_why) {
  finished_ = true;
  auto context = std::make_shared<CapturedContext>();
  std::vector<bool> stopped(blocks_.size(), false);
  std::vector<uint32_t> prefix(blocks_.size(), 0);
  std::vector<std::string> why(blocks_.size());
  for (const Piece& piece : pieces_) {  // in block order, then address order
    if (stopped[piece.block]) continue;
    if (piece.read) {
      prefix[piece.block] = piece.offset + piece.length;
      continue;
    }
    stopped[piece.block] = true;
    why[piece.block] = "gva " + Hex(piece.gva) + ": " + (piece.done ? piece.why : pending_why);
  }
  for (size_t b = 0; b < blocks_.size(); ++b) {
    ContextBlock block = std::move(blocks_[b]);
    block.data.resize(prefix[b]);
    block.complete = !stopped[b];
    block.why = std::move(why[b]);
    context->blocks.push_back(std::move(block));
  }
  return context;
}

}  // namespace kvmid::vmem
