#include "daemon/vmem/table_page_reader.h"

#include <cstring>
#include <string>
#include <utility>

#include "daemon/vmem/session_reader.h"

namespace kvmid::vmem {

std::shared_ptr<TablePageReader> TablePageReader::ForSession(
    std::shared_ptr<GuestSession> session) {
  return std::make_shared<TablePageReader>(
      [session = std::move(session)](
          uint64_t gpa, uint64_t size,
          std::function<void(absl::StatusOr<std::vector<uint8_t>>)> done) {
        session->ReadPhysical(gpa, size, [size, done = std::move(done)](CommandResult result) {
          if (!result.ok()) return done(StatusOf(result, "READ_PHYSICAL"));
          if (result.data.size() != size) {
            return done(absl::InternalError("READ_PHYSICAL returned " +
                                            std::to_string(result.data.size()) + " bytes for a " +
                                            std::to_string(size) + "-byte table page"));
          }
          done(std::move(result.data));
        });
      });
}

absl::StatusOr<uint64_t> TablePageReader::EntryOf(const absl::StatusOr<std::vector<uint8_t>>& bytes,
                                                  uint64_t offset, unsigned size) {
  if (!bytes.ok()) return bytes.status();
  if (bytes->size() < offset + size) return absl::InternalError("short table page");
  uint64_t value = 0;
  std::memcpy(&value, bytes->data() + offset, size);  // x86: little-endian, as the host
  return value;
}

void TablePageReader::ReadEntry(uint64_t gpa, unsigned size, EntryCallback done) {
  const uint64_t page = gpa & ~(kPageSize - 1);
  const uint64_t offset = gpa - page;
  if (size == 0 || size > 8 || offset + size > kPageSize) {
    return done(
        absl::InvalidArgumentError("entry of " + std::to_string(size) + " bytes crosses its page"));
  }
  absl::StatusOr<uint64_t> ready = absl::UnknownError("not read");
  bool answered = false;
  {
    MutexLock lock(&mu_);
    auto [it, inserted] = pages_.try_emplace(page);
    Page& p = it->second;
    if (!inserted) {
      if (!p.done) {
        p.waiting.push_back({offset, size, std::move(done)});
        return;
      }
      ready = EntryOf(p.bytes, offset, size);
      answered = true;
    } else {
      p.waiting.push_back({offset, size, std::move(done)});
      ++pages_read_;
    }
  }
  // Answered from a page read before; `done` was moved only when not (clang-tidy cannot tell).
  if (answered) return done(std::move(ready));  // NOLINT(bugprone-use-after-move)
  // The first entry of this page: read the page (the answer may come inline).
  read_(page, kPageSize,
        [self = shared_from_this(), page](absl::StatusOr<std::vector<uint8_t>> bytes) {
          self->PageRead(page, std::move(bytes));
        });
}

void TablePageReader::PageRead(uint64_t page, absl::StatusOr<std::vector<uint8_t>> bytes) {
  std::vector<Waiting> waiting;
  std::vector<absl::StatusOr<uint64_t>> values;
  {
    MutexLock lock(&mu_);
    Page& p = pages_[page];
    p.done = true;
    p.bytes = std::move(bytes);
    waiting = std::move(p.waiting);
    p.waiting.clear();
    for (const Waiting& w : waiting) values.push_back(EntryOf(p.bytes, w.offset, w.size));
  }
  for (size_t i = 0; i < waiting.size(); ++i) waiting[i].done(std::move(values[i]));
}

size_t TablePageReader::pages_read() const {
  MutexLock lock(&mu_);
  return pages_read_;
}

}  // namespace kvmid::vmem
