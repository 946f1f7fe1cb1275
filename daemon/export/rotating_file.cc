#include "daemon/export/rotating_file.h"

#include <absl/strings/str_cat.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

namespace kvmid {

absl::StatusOr<std::unique_ptr<RotatingFile>> RotatingFile::Open(Options options) {
  if (options.path.empty()) return absl::InvalidArgumentError("--export_file: a path is required");
  if (options.max_bytes < kMinExportFileBytes || options.max_bytes > kMaxExportFileBytes) {
    return absl::InvalidArgumentError(absl::StrCat("--export_max_bytes: ", kMinExportFileBytes,
                                                   " to ", kMaxExportFileBytes, ", not ",
                                                   options.max_bytes));
  }
  if (options.max_files < 1 || options.max_files > kMaxExportFiles) {
    return absl::InvalidArgumentError(
        absl::StrCat("--export_max_files: 1 to ", kMaxExportFiles, ", not ", options.max_files));
  }
  std::unique_ptr<RotatingFile> file(new RotatingFile(std::move(options)));
  absl::Status opened = file->OpenLive();
  if (!opened.ok()) return opened;
  return file;
}

RotatingFile::~RotatingFile() {
  Flush().IgnoreError();
  if (fd_ >= 0) ::close(fd_);
}

std::string RotatingFile::FileName(uint32_t n) const {
  return n == 0 ? options_.path : absl::StrCat(options_.path, ".", n);
}

absl::Status RotatingFile::OpenLive() {
  fd_ = ::open(options_.path.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0640);
  if (fd_ < 0) {
    return absl::UnavailableError(
        absl::StrCat("cannot open export file ", options_.path, ": ", std::strerror(errno)));
  }
  struct stat st;
  size_ = ::fstat(fd_, &st) == 0 ? static_cast<uint64_t>(st.st_size) : 0;
  return absl::OkStatus();
}

absl::Status RotatingFile::Flush() {
  if (fd_ < 0) return absl::UnavailableError("export file " + options_.path + " is not open");
  absl::string_view data = buffer_;
  while (!data.empty()) {
    ssize_t n = ::write(fd_, data.data(), data.size());
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      // What was not written is lost (counted by the caller); the size follows the file.
      std::string error = std::strerror(errno);
      size_ -= data.size();
      buffer_.clear();
      return absl::UnavailableError(absl::StrCat("cannot write ", options_.path, ": ", error));
    }
    data.remove_prefix(static_cast<size_t>(n));
  }
  buffer_.clear();
  return absl::OkStatus();
}

absl::Status RotatingFile::Rotate() {
  absl::Status flushed = Flush();
  ::close(fd_);
  fd_ = -1;
  ++rotations_;
  if (options_.max_files == 1) {
    ::unlink(options_.path.c_str());  // keep nothing but the live file
  } else {
    ::unlink(FileName(options_.max_files - 1).c_str());
    for (uint32_t n = options_.max_files - 1; n >= 1; --n) {
      ::rename(FileName(n - 1).c_str(), FileName(n).c_str());  // missing ones are fine
    }
  }
  absl::Status opened = OpenLive();
  return opened.ok() ? flushed : opened;
}

absl::Status RotatingFile::Append(absl::string_view record) {
  if (record.size() > options_.max_bytes) {
    ++oversized_;
    return absl::ResourceExhaustedError(
        absl::StrCat("a record of ", record.size(), " bytes exceeds --export_max_bytes"));
  }
  absl::Status status = absl::OkStatus();
  if (size_ + record.size() > options_.max_bytes || fd_ < 0) {
    status = fd_ < 0 ? OpenLive() : Rotate();
    if (fd_ < 0) return status;
  }
  buffer_.append(record.data(), record.size());
  size_ += record.size();
  if (buffer_.size() >= kExportWriteBufferBytes) {
    absl::Status flushed = Flush();
    if (status.ok()) status = flushed;
  }
  return status;
}

}  // namespace kvmid
