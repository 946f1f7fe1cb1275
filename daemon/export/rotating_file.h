// Where the exporter's JSON lines go: a file rotated by size, with bounded disk use.
//
// PATH is the live file; when the next record would take it past max_bytes, it is renamed to
// PATH.1 (PATH.1 to PATH.2, ...; the oldest, PATH.<max_files-1>, is deleted) and a new PATH is
// started. At most max_files files exist, each at most max_bytes: disk use stays within
// max_files * max_bytes. This is the rename-and-create scheme Fluent Bit's tail input, Vector's
// file source and Filebeat's filestream follow (by inode) without losing lines.
#ifndef KVMID_DAEMON_EXPORT_ROTATING_FILE_H_
#define KVMID_DAEMON_EXPORT_ROTATING_FILE_H_

#include <absl/status/status.h>
#include <absl/status/statusor.h>
#include <absl/strings/string_view.h>

#include <cstdint>
#include <memory>
#include <string>

namespace kvmid {

// The limits of the export files, in one place.
inline constexpr uint64_t kMinExportFileBytes = 4096;        // room for any one record
inline constexpr uint64_t kMaxExportFileBytes = 1ull << 40;  // 1 TiB
inline constexpr uint32_t kMaxExportFiles = 1000;
inline constexpr size_t kExportWriteBufferBytes = 64 * 1024;  // written in chunks of this

// One JSON record per line; the writer thread is the only caller.
class RecordSink {
 public:
  virtual ~RecordSink() = default;
  // `record` ends with '\n'. May buffer.
  virtual absl::Status Append(absl::string_view record) = 0;
  // Writes what is buffered.
  virtual absl::Status Flush() = 0;
};

class RotatingFile : public RecordSink {
 public:
  struct Options {
    std::string path;
    uint64_t max_bytes = 100ull << 20;  // per file
    uint32_t max_files = 5;             // kept, the live one included (>= 1)
  };
  // Checks the options and opens (appends to) PATH. Errors name the flag or the file.
  static absl::StatusOr<std::unique_ptr<RotatingFile>> Open(Options options);
  ~RotatingFile() override;

  absl::Status Append(absl::string_view record) override;
  absl::Status Flush() override;

  // PATH.<n> (n = 1 .. max_files - 1); PATH for 0.
  std::string FileName(uint32_t n) const;
  uint64_t rotations() const { return rotations_; }
  // A record longer than max_bytes cannot be kept within the bound: refused (and counted).
  uint64_t oversized() const { return oversized_; }

 private:
  explicit RotatingFile(Options options) : options_(std::move(options)) {}
  absl::Status OpenLive();
  absl::Status Rotate();

  const Options options_;
  int fd_ = -1;
  uint64_t size_ = 0;  // of the live file, buffered bytes included
  std::string buffer_;
  uint64_t rotations_ = 0;
  uint64_t oversized_ = 0;
};

}  // namespace kvmid

#endif  // KVMID_DAEMON_EXPORT_ROTATING_FILE_H_
