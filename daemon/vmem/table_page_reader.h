// A page walker's reader for walks over many neighbouring addresses (a virtual read of many
// pages): it reads each page-table page (4 KiB) once, with one physical read, and answers every
// entry of that page from it. Walks that are in flight together share the reads of their upper
// levels (a 256 KiB range under one page table: 4 table-page reads instead of 256 entry reads).
//
// The bytes are a snapshot taken when the first entry of a page is asked for; the reader lives as
// long as one batch of walks (a unary ReadVirtual, one chunk of a stream), so it holds nothing
// stale for longer than that batch.
#ifndef KVMID_DAEMON_VMEM_TABLE_PAGE_READER_H_
#define KVMID_DAEMON_VMEM_TABLE_PAGE_READER_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <unordered_map>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "daemon/base/mutex.h"
#include "daemon/session/guest_session.h"
#include "daemon/vmem/page_walker.h"

namespace kvmid::vmem {

class TablePageReader : public EntryReader, public std::enable_shared_from_this<TablePageReader> {
 public:
  // Use it through a shared_ptr (reads in flight keep it alive).
  // Reads [gpa, gpa + size) of guest-physical memory; `done` runs once, on any thread (possibly
  // inline), with exactly `size` bytes or the failure.
  using PhysicalRead = std::function<void(
      uint64_t gpa, uint64_t size, std::function<void(absl::StatusOr<std::vector<uint8_t>>)> done)>;

  explicit TablePageReader(PhysicalRead read) : read_(std::move(read)) {}
  // Reads through `session` (READ_PHYSICAL; failures keep the guest's error, as SessionReader).
  static std::shared_ptr<TablePageReader> ForSession(std::shared_ptr<GuestSession> session);

  // `size` 4 or 8, within one page (entries are aligned). A failed page read fails every entry
  // asked of it.
  void ReadEntry(uint64_t gpa, unsigned size,
                 std::function<void(absl::StatusOr<uint64_t>)> done) override
      ABSL_LOCKS_EXCLUDED(mu_);

  // Physical reads issued so far (tests).
  size_t pages_read() const ABSL_LOCKS_EXCLUDED(mu_);

 private:
  using EntryCallback = std::function<void(absl::StatusOr<uint64_t>)>;
  struct Waiting {
    uint64_t offset;
    unsigned size;
    EntryCallback done;
  };
  struct Page {
    bool done = false;
    absl::StatusOr<std::vector<uint8_t>> bytes = absl::UnknownError("not read");
    std::vector<Waiting> waiting;
  };
  void PageRead(uint64_t page, absl::StatusOr<std::vector<uint8_t>> bytes) ABSL_LOCKS_EXCLUDED(mu_);
  static absl::StatusOr<uint64_t> EntryOf(const absl::StatusOr<std::vector<uint8_t>>& bytes,
                                          uint64_t offset, unsigned size);

  const PhysicalRead read_;
  mutable Mutex mu_;
  std::unordered_map<uint64_t, Page> pages_ ABSL_GUARDED_BY(mu_);
  size_t pages_read_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace kvmid::vmem

#endif  // KVMID_DAEMON_VMEM_TABLE_PAGE_READER_H_
