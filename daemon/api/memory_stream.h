// Bulk guest memory over the API: ReadPhysicalStream (server streaming) and WritePhysicalStream
// (client streaming), on gRPC's async API (async_reactor.h; no thread per stream).
//
// The read side is built on ChunkedReader, a reusable "chunked pipelined reader": a list of
// guest-physical ranges in, chunks out in order, with a bounded number of chunk reads in flight
// (each chunk read is itself split into pipelined page-sized KVMI reads by
// GuestSession::ReadPhysical). A chunk's slot is freed only when the consumer takes it, so a
// stream never holds more than its window, and a client that reads slowly slows the KVMI reads
// down instead of piling up memory in kvmid.
#ifndef KVMID_DAEMON_API_MEMORY_STREAM_H_
#define KVMID_DAEMON_API_MEMORY_STREAM_H_

#include <absl/base/thread_annotations.h>
#include <absl/status/statusor.h>
#include <grpcpp/grpcpp.h>

#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "daemon/api/admission.h"
#include "daemon/api/async_reactor.h"
#include "daemon/api/guest_call.h"
#include "daemon/api/stream_limits.h"
#include "daemon/base/mutex.h"
#include "daemon/kvmid.h"
#include "daemon/session/guest_session.h"
#include "proto/kvmi/v1/introspection.pb.h"

namespace kvmid::api {

// The streams' limits (error messages are built from them).
// Chunk size when the request leaves chunk_bytes at 0, and the range allowed otherwise. The
// largest stays far below gRPC's default 4 MiB receive limit, so stock clients work.
inline constexpr uint64_t kDefaultStreamChunkBytes = uint64_t{256} << 10;
inline constexpr uint64_t kMinStreamChunkBytes = uint64_t{4} << 10;
inline constexpr uint64_t kMaxStreamChunkBytes = uint64_t{1} << 20;
// Bytes of guest memory one read stream has in flight or waiting to be sent, at most; the
// window in chunks is this over the chunk size, and never below kMinStreamChunksInFlight.
inline constexpr uint64_t kMaxStreamBytesInFlight = uint64_t{4} << 20;
inline constexpr size_t kMinStreamChunksInFlight = 2;
// Guest-physical addresses have at most 52 bits (x86-64): a range must end at or below this.
inline constexpr uint64_t kPhysicalAddressLimit = uint64_t{1} << 52;
// WritePhysicalStream: bytes per message at most, and messages whose writes may be in flight
// at once (the stream stops reading beyond that).
inline constexpr uint64_t kMaxWriteStreamMessageBytes = uint64_t{1} << 20;
inline constexpr size_t kWriteStreamMessagesInFlight = 4;
// Pages are classified as zero at this granularity (the KVMI page).
inline constexpr uint64_t kStreamPageBytes = 4096;

// Reads ranges of guest memory in chunks, several in flight, handing them out in order.
// Thread-safe. Reads complete on any thread (the guest's loop thread for a session), possibly
// inline in Fill; `on_ready` is called with no lock of the reader held.
class ChunkedReader : public std::enable_shared_from_this<ChunkedReader> {
 public:
  struct Range {
    uint64_t gpa = 0;
    uint64_t size = 0;
  };
  struct Chunk {
    uint64_t gpa = 0;
    uint64_t size = 0;
    CommandResult result;  // Ok: result.data holds exactly `size` bytes
  };
  // Reads [gpa, gpa + size) and calls `done` exactly once, on any thread (possibly inline).
  using ReadFn = std::function<void(uint64_t gpa, uint64_t size, CommandCallback done)>;
  struct Options {
    uint64_t chunk_bytes = kDefaultStreamChunkBytes;
    size_t window = kMinStreamChunksInFlight;  // chunks in flight or waiting to be taken
  };
  enum class Poll { kChunk, kNotReady, kEnd };

  // INVALID_ARGUMENT for an empty range, a range that wraps, a zero chunk size or window.
  static absl::StatusOr<std::shared_ptr<ChunkedReader>> Create(std::vector<Range> ranges,
                                                               Options options, ReadFn read);

  // Called once each time the next chunk arrives after Next answered kNotReady. Set it before
  // the first Fill.
  void SetOnReady(std::function<void()> on_ready);
  // Issues reads until the window is full or every range is issued. Call it holding no lock
  // that `on_ready` takes: a read may complete inline.
  void Fill();
  // The next chunk in order, if it has arrived (its slot is freed: call Fill afterwards).
  // kNotReady: `on_ready` follows when it arrives. kEnd: every chunk was taken.
  Poll Next(Chunk* out);
  // Stops issuing reads and forgets `on_ready`; reads in flight complete into nothing.
  void Cancel();

  // Chunks issued and not yet taken (tests: never above the window).
  size_t outstanding() const;
  // The most that were ever outstanding at once.
  size_t max_outstanding() const;

  ChunkedReader(std::vector<Range> ranges, Options options, ReadFn read);  // use Create

 private:
  struct Slot {
    uint64_t gpa = 0;
    uint64_t size = 0;
    bool done = false;
    CommandResult result;
  };
  void Complete(uint64_t seq, CommandResult result);

  const std::vector<Range> ranges_;
  const Options options_;
  const ReadFn read_;

  mutable Mutex mu_;
  std::deque<Slot> slots_ ABSL_GUARDED_BY(mu_);  // issued, not yet taken, in order
  uint64_t front_seq_ ABSL_GUARDED_BY(mu_) = 0;  // the sequence number of slots_.front()
  size_t range_index_ ABSL_GUARDED_BY(mu_) = 0;  // the next range to cut
  uint64_t range_offset_ ABSL_GUARDED_BY(mu_) = 0;
  bool waiting_ ABSL_GUARDED_BY(mu_) = false;  // Next answered kNotReady
  bool cancelled_ ABSL_GUARDED_BY(mu_) = false;
  size_t max_outstanding_ ABSL_GUARDED_BY(mu_) = 0;
  std::function<void()> on_ready_ ABSL_GUARDED_BY(mu_);
};

// The window (chunks) of a read stream with chunks of `chunk_bytes`.
size_t StreamWindow(uint64_t chunk_bytes);

// `chunk` as the ReadPhysicalStreamResponse messages a reader gets: one with the data, or with
// `skip_zero_pages` runs of whole zero pages as `zero` messages and the rest as data.
void AppendChunkMessages(const ChunkedReader::Chunk& chunk, bool skip_zero_pages,
                         std::deque<kvmi::v1::ReadPhysicalStreamResponse>* out);

// The two streams. Thread-safe; one per service.
class MemoryStreams {
 public:
  // Every stream is admitted by `limits` (a place among its identity's streams, and its window
  // charged to the stream budget for its life) under the daemon's current limits.
  MemoryStreams(Daemon* daemon, Admission* admission, StreamLimits* limits)
      : daemon_(daemon), guests_(&daemon->registry()), admission_(admission), limits_(limits) {}

  // The reactor of an admitted ReadPhysicalStream call (it deletes itself when gRPC is done).
  // A malformed request ends it at once with the status naming the field.
  WriteReactor<kvmi::v1::ReadPhysicalStreamResponse>* Read(
      const CallContext& call, const kvmi::v1::ReadPhysicalStreamRequest& request);
  // The reactor of a WritePhysicalStream call: admitted (as WritePhysicalStream on the first
  // message's guest) when the first message arrives, audited when it ends.
  ReadReactor<kvmi::v1::WritePhysicalStreamRequest>* Write(
      grpc::ServerContextBase* context, kvmi::v1::WritePhysicalStreamResponse* response);

 private:
  Daemon* const daemon_;
  GuestFinder guests_;
  Admission* const admission_;
  StreamLimits* const limits_;
};

}  // namespace kvmid::api

#endif  // KVMID_DAEMON_API_MEMORY_STREAM_H_
