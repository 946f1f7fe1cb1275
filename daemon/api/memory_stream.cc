#include "daemon/api/memory_stream.h"

#include <absl/strings/str_cat.h>

#include <algorithm>
#include <cstring>
#include <utility>

#include "daemon/api/convert.h"
#include "daemon/api/finished_stream.h"

namespace kvmid::api {

using grpc::Status;

namespace {

std::string Hex(uint64_t value) { return absl::StrCat("0x", absl::Hex(value)); }

std::string KiB(uint64_t bytes) { return absl::StrCat(bytes >> 10, " KiB"); }

bool AllZero(const uint8_t* p, size_t n) {
  if (n == 0) return true;
  return p[0] == 0 && std::memcmp(p, p + 1, n - 1) == 0;
}

}  // namespace

// ---- ChunkedReader -----------------------------------------------------------------------------

ChunkedReader::ChunkedReader(std::vector<Range> ranges, Options options, ReadFn read)
    : ranges_(std::move(ranges)), options_(options), read_(std::move(read)) {}

absl::StatusOr<std::shared_ptr<ChunkedReader>> ChunkedReader::Create(std::vector<Range> ranges,
                                                                     Options options, ReadFn read) {
  if (options.chunk_bytes == 0) return absl::InvalidArgumentError("chunk_bytes: must be above 0");
  if (options.window == 0) return absl::InvalidArgumentError("window: must be above 0");
  for (size_t i = 0; i < ranges.size(); ++i) {
    if (ranges[i].size == 0 || ranges[i].gpa + ranges[i].size < ranges[i].gpa) {
      return absl::InvalidArgumentError(absl::StrCat("ranges[", i, "]: empty or wraps (gpa ",
                                                     Hex(ranges[i].gpa), ", size ", ranges[i].size,
                                                     ")"));
    }
  }
  return std::make_shared<ChunkedReader>(std::move(ranges), options, std::move(read));
}

void ChunkedReader::SetOnReady(std::function<void()> on_ready) {
  MutexLock lock(&mu_);
  on_ready_ = std::move(on_ready);
}

void ChunkedReader::Fill() {
  struct Issue {
    uint64_t seq, gpa, size;
  };
  std::vector<Issue> issue;
  {
    MutexLock lock(&mu_);
    while (!cancelled_ && slots_.size() < options_.window && range_index_ < ranges_.size()) {
      const Range& range = ranges_[range_index_];
      const uint64_t gpa = range.gpa + range_offset_;
      const uint64_t size = std::min(options_.chunk_bytes, range.size - range_offset_);
      range_offset_ += size;
      if (range_offset_ == range.size) {
        ++range_index_;
        range_offset_ = 0;
      }
      issue.push_back({front_seq_ + slots_.size(), gpa, size});
      Slot slot;
      slot.gpa = gpa;
      slot.size = size;
      slots_.push_back(std::move(slot));
    }
    max_outstanding_ = std::max(max_outstanding_, slots_.size());
  }
  if (issue.empty()) return;
  auto self = shared_from_this();
  for (const Issue& i : issue) {
    read_(i.gpa, i.size,
          [self, seq = i.seq](CommandResult r) { self->Complete(seq, std::move(r)); });
  }
}

void ChunkedReader::Complete(uint64_t seq, CommandResult result) {
  std::function<void()> notify;
  {
    MutexLock lock(&mu_);
    if (seq < front_seq_ || seq - front_seq_ >= slots_.size()) return;  // cannot happen
    Slot& slot = slots_[seq - front_seq_];
    if (result.ok() && result.data.size() != slot.size) {
      result = CommandResult::ProtocolError(absl::StrCat(
          "read of ", slot.size, " bytes at ", Hex(slot.gpa), " returned ", result.data.size()));
    }
    slot.done = true;
    slot.result = std::move(result);
    if (waiting_ && seq == front_seq_ && !cancelled_) {
      waiting_ = false;
      notify = on_ready_;
    }
  }
  if (notify) notify();
}

ChunkedReader::Poll ChunkedReader::Next(Chunk* out) {
  MutexLock lock(&mu_);
  if (slots_.empty() && range_index_ >= ranges_.size()) return Poll::kEnd;
  if (slots_.empty() || !slots_.front().done) {
    waiting_ = true;
    return Poll::kNotReady;
  }
  Slot& slot = slots_.front();
  out->gpa = slot.gpa;
  out->size = slot.size;
  out->result = std::move(slot.result);
  slots_.pop_front();
  ++front_seq_;
  return Poll::kChunk;
}

void ChunkedReader::Cancel() {
  std::function<void()> drop;
  {
    MutexLock lock(&mu_);
    cancelled_ = true;
    waiting_ = false;
    drop = std::move(on_ready_);
    on_ready_ = nullptr;
  }
  // `drop` (which may own the consumer's state) goes here, outside the lock.
}

size_t ChunkedReader::outstanding() const {
  MutexLock lock(&mu_);
  return slots_.size();
}

size_t ChunkedReader::max_outstanding() const {
  MutexLock lock(&mu_);
  return max_outstanding_;
}

size_t StreamWindow(uint64_t chunk_bytes) {
  return std::max<size_t>(kMinStreamChunksInFlight, kMaxStreamBytesInFlight / chunk_bytes);
}

void AppendChunkMessages(const ChunkedReader::Chunk& chunk, bool skip_zero_pages,
                         std::deque<kvmi::v1::ReadPhysicalStreamResponse>* out) {
  const std::vector<uint8_t>& data = chunk.result.data;
  auto emit = [&](uint64_t from, uint64_t to, bool zero) {  // offsets into the chunk
    kvmi::v1::ReadPhysicalStreamResponse& m = out->emplace_back();
    m.set_gpa(chunk.gpa + from);
    m.set_size(to - from);
    if (zero) {
      m.set_zero(true);
    } else {
      m.set_data(reinterpret_cast<const char*>(data.data()) + from, to - from);
    }
  };
  if (!skip_zero_pages) {
    emit(0, chunk.size, false);
    return;
  }
  // Runs of whole aligned zero pages, and everything else as data.
  uint64_t run_start = 0;
  bool run_zero = false;
  uint64_t at = 0;
  while (at < chunk.size) {
    const uint64_t gpa = chunk.gpa + at;
    const uint64_t page_end =
        std::min(chunk.size, at + (kStreamPageBytes - gpa % kStreamPageBytes));
    const bool whole = gpa % kStreamPageBytes == 0 && page_end - at == kStreamPageBytes;
    const bool zero = whole && AllZero(data.data() + at, kStreamPageBytes);
    if (at > run_start && zero != run_zero) {
      emit(run_start, at, run_zero);
      run_start = at;
    }
    run_zero = zero;
    at = page_end;
  }
  emit(run_start, chunk.size, run_zero);
}

// ---- ReadPhysicalStream ------------------------------------------------------------------------

namespace {

// One read stream. Its state is guarded by the Link's mutex, which the reader's `on_ready` also
// takes: the reactor is only reached through the Link, and OnDone unlinks it before it goes.
// Reads are issued (ChunkedReader::Fill) with that mutex released: one may complete inline.
class PhysicalReadReactor final : public WriteReactor<kvmi::v1::ReadPhysicalStreamResponse> {
 public:
  PhysicalReadReactor(std::shared_ptr<ChunkedReader> reader, bool skip_zero_pages,
                      bool continue_on_error, StreamLimits::Admission admission)
      : admission_(std::move(admission)),
        link_(std::make_shared<Link>()),
        skip_zero_pages_(skip_zero_pages),
        continue_on_error_(continue_on_error) {
    link_->reader = std::move(reader);
    {
      MutexLock lock(&link_->mu);
      link_->reactor = this;
    }
    link_->reader->SetOnReady([link = link_] { Wake(link); });
    link_->reader->Fill();  // the first reads (they may complete, and Wake, inline)
    Wake(link_);
  }

  void OnWriteDone(bool ok) override {
    bool fill;
    {
      MutexLock lock(&link_->mu);
      writing_ = false;
      if (!ok) cancelled_ = true;
      fill = PumpLocked();
    }
    if (fill) link_->reader->Fill();
  }
  void OnCancel() override {
    MutexLock lock(&link_->mu);
    cancelled_ = true;
    PumpLocked();
  }
  void OnDone() override {
    {
      MutexLock lock(&link_->mu);
      link_->reactor = nullptr;
    }
    link_->reader->Cancel();
    admission_.Release();  // its place and its window's charge
    delete this;
  }

 private:
  StreamLimits::Admission admission_;  // released in OnDone
  struct Link {
    Mutex mu;
    PhysicalReadReactor* reactor ABSL_GUARDED_BY(mu) = nullptr;
    std::shared_ptr<ChunkedReader> reader;  // set once, before any callback
  };

  static void Wake(const std::shared_ptr<Link>& link) {
    bool fill = false;
    {
      MutexLock lock(&link->mu);
      PhysicalReadReactor* self = link->reactor;
      if (self == nullptr) return;
      self->link_->mu.AssertHeld();  // the same mutex (self->link_ == link), for the analysis
      fill = self->PumpLocked();
    }
    if (fill) link->reader->Fill();
  }

  // Starts the next write (or Finish) if none is in flight. True: a chunk was taken, so the
  // caller must Fill once it released the lock.
  bool PumpLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(link_->mu) {
    if (finished_ || writing_) return false;
    if (cancelled_) {
      FinishLocked(Cancelled());
      return false;
    }
    bool took = false;
    while (pending_.empty()) {
      ChunkedReader::Chunk chunk;
      switch (link_->reader->Next(&chunk)) {
        case ChunkedReader::Poll::kNotReady:
          return took;
        case ChunkedReader::Poll::kEnd:
          FinishLocked(Status::OK);
          return took;
        case ChunkedReader::Poll::kChunk:
          break;
      }
      took = true;
      if (!chunk.result.ok()) {
        Status failed = ToStatus(chunk.result, absl::StrCat("ReadPhysicalStream: ", chunk.size,
                                                            " bytes at gpa ", Hex(chunk.gpa)));
        // Only an error the host answered (KVM_E*: a hole, the end of memory) is skipped over;
        // a guest that is gone or does not answer ends the stream either way.
        if (!continue_on_error_ || chunk.result.status != CommandResult::Status::kKvmiError) {
          FinishLocked(failed);
          return took;
        }
        kvmi::v1::ReadPhysicalStreamResponse& m = pending_.emplace_back();
        m.set_gpa(chunk.gpa);
        m.set_size(chunk.size);
        m.set_error(failed.error_message());
        continue;
      }
      AppendChunkMessages(chunk, skip_zero_pages_, &pending_);
    }
    message_ = std::move(pending_.front());
    pending_.pop_front();
    writing_ = true;
    StartWrite(&message_);
    return took;
  }

  void FinishLocked(const Status& status) ABSL_EXCLUSIVE_LOCKS_REQUIRED(link_->mu) {
    finished_ = true;
    pending_.clear();
    Finish(status);
  }

  const std::shared_ptr<Link> link_;
  const bool skip_zero_pages_;
  const bool continue_on_error_;
  bool writing_ ABSL_GUARDED_BY(link_->mu) = false;
  bool finished_ ABSL_GUARDED_BY(link_->mu) = false;
  bool cancelled_ ABSL_GUARDED_BY(link_->mu) = false;
  std::deque<kvmi::v1::ReadPhysicalStreamResponse> pending_
      ABSL_GUARDED_BY(link_->mu);  // one chunk's messages
  kvmi::v1::ReadPhysicalStreamResponse message_
      ABSL_GUARDED_BY(link_->mu);  // the one being written
};

}  // namespace

WriteReactor<kvmi::v1::ReadPhysicalStreamResponse>* MemoryStreams::Read(
    const CallContext& call, const kvmi::v1::ReadPhysicalStreamRequest& request) {
  Target target;
  Status s = guests_.Find(request.vm(), &target);
  if (!s.ok()) return FinishedStream<kvmi::v1::ReadPhysicalStreamResponse>(s);
  if (request.size() == 0)
    return FinishedStream<kvmi::v1::ReadPhysicalStreamResponse>(
        InvalidArgument("size", "must be at least 1"));
  if (request.gpa() >= kPhysicalAddressLimit ||
      request.size() > kPhysicalAddressLimit - request.gpa()) {
    return FinishedStream<kvmi::v1::ReadPhysicalStreamResponse>(
        InvalidArgument("size", absl::StrCat("gpa ", Hex(request.gpa()), " + size ", request.size(),
                                             " goes beyond the physical address space (",
                                             Hex(kPhysicalAddressLimit), ") or wraps")));
  }
  uint64_t chunk_bytes =
      request.chunk_bytes() == 0 ? kDefaultStreamChunkBytes : request.chunk_bytes();
  if (chunk_bytes < kMinStreamChunkBytes || chunk_bytes > kMaxStreamChunkBytes) {
    return FinishedStream<kvmi::v1::ReadPhysicalStreamResponse>(InvalidArgument(
        "chunk_bytes", absl::StrCat("0 (", KiB(kDefaultStreamChunkBytes), ") or ",
                                    KiB(kMinStreamChunkBytes), " .. ", KiB(kMaxStreamChunkBytes))));
  }
  ChunkedReader::Options options;
  options.chunk_bytes = chunk_bytes;
  options.window = StreamWindow(chunk_bytes);
  std::shared_ptr<GuestSession> session = target.session;
  auto reader = ChunkedReader::Create({{request.gpa(), request.size()}}, options,
                                      [session](uint64_t gpa, uint64_t size, CommandCallback done) {
                                        session->ReadPhysical(gpa, size, std::move(done));
                                      });
  if (!reader.ok())
    return FinishedStream<kvmi::v1::ReadPhysicalStreamResponse>(ToStatus(reader.status()));
  // A place among the caller's streams, and the window's bytes charged to the stream budget.
  StreamLimits::Admission admission;
  Status admitted = limits_->Admit(call, daemon_->limits(), /*charge_budget=*/true, &admission,
                                   options.window * chunk_bytes);
  if (!admitted.ok()) {
    call.AuditLimitRefusal(admitted);
    return FinishedStream<kvmi::v1::ReadPhysicalStreamResponse>(admitted);
  }
  return new PhysicalReadReactor(*std::move(reader), request.skip_zero_pages(),
                                 request.continue_on_error(), std::move(admission));
}

// ---- WritePhysicalStream -----------------------------------------------------------------------

namespace {

class PhysicalWriteReactor final : public ReadReactor<kvmi::v1::WritePhysicalStreamRequest> {
 public:
  PhysicalWriteReactor(grpc::ServerContextBase* context, Daemon* daemon, const GuestFinder* guests,
                       Admission* admission, StreamLimits* limits,
                       kvmi::v1::WritePhysicalStreamResponse* response)
      : daemon_(daemon),
        limits_(limits),
        context_(context),
        guests_(guests),
        admission_(admission),
        response_(response),
        link_(std::make_shared<Link>()) {
    MutexLock lock(&link_->mu);
    link_->reactor = this;
    StartRead(&request_);
  }

  void OnReadDone(bool ok) override {
    MutexLock lock(&link_->mu);
    reading_ = false;
    if (finished_) return;
    if (!ok) {
      client_done_ = true;
      if (!started_) {
        // An empty stream: still admitted (an unauthorized caller learns nothing more).
        const std::string none;
        Status s = Begin(none, 0, 0);
        if (!s.ok()) return FinishLocked(s);
        return FinishLocked(InvalidArgument("vm", "the first message names the guest"));
      }
      return MaybeFinishLocked();
    }
    if (!started_) {
      Status s = Begin(request_.vm(), request_.gpa(), request_.size());
      if (!s.ok()) return FinishLocked(s);
    } else if (!request_.vm().empty() || request_.gpa() != 0 || request_.size() != 0) {
      return Fail(InvalidArgument("vm", "vm, gpa and size belong in the first message only"));
    }
    const std::string& data = request_.data();
    if (data.size() > kMaxWriteStreamMessageBytes) {
      return Fail(
          InvalidArgument("data", absl::StrCat(data.size(), " bytes in one message; at most ",
                                               KiB(kMaxWriteStreamMessageBytes))));
    }
    if (data.size() > size_ - offset_) {
      return Fail(InvalidArgument(
          "data", absl::StrCat("the stream carries more than size (", size_, " bytes)")));
    }
    if (!data.empty()) {
      const uint64_t at = gpa_ + offset_;
      offset_ += data.size();
      ++in_flight_;
      target_.session->WritePhysical(
          at, std::vector<uint8_t>(data.begin(), data.end()),
          [link = link_, at](const CommandResult& r) { Written(link, at, r); });
    }
    ReadMoreLocked();
  }

  void OnCancel() override {
    MutexLock lock(&link_->mu);
    if (!finished_) FinishLocked(Cancelled());
  }

  void OnDone() override {
    {
      MutexLock lock(&link_->mu);
      link_->reactor = nullptr;
      limit_.Release();
    }
    delete this;
  }

 private:
  Daemon* const daemon_;
  StreamLimits* const limits_;
  struct Link {
    Mutex mu;
    PhysicalWriteReactor* reactor ABSL_GUARDED_BY(mu) = nullptr;
  };

  // The loop thread: one message's write finished.
  static void Written(const std::shared_ptr<Link>& link, uint64_t at, const CommandResult& r) {
    MutexLock lock(&link->mu);
    PhysicalWriteReactor* self = link->reactor;
    if (self == nullptr) return;
    self->link_->mu.AssertHeld();  // the same mutex (self->link_ == link), for the analysis
    --self->in_flight_;
    if (!r.ok() && self->first_error_.ok()) {
      self->first_error_ = ToStatus(r, absl::StrCat("WritePhysicalStream at gpa ", Hex(at)));
    }
    if (self->finished_) return;
    if (!self->first_error_.ok()) return self->MaybeFinishLocked();
    self->ReadMoreLocked();
    self->MaybeFinishLocked();
  }

  // The first message: admission on its guest, then the checks.
  Status Begin(const std::string& vm, uint64_t gpa, uint64_t size)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(link_->mu) {
    started_ = true;
    CallTarget target;
    target.vm = &vm;
    Status admitted = admission_->Admit(
        *context_, security::Rpc::kWritePhysicalStream, target,
        [&] {
          security::AuditArgs a;
          a.Text("vm", vm).Hex("gpa", gpa).Uint("size", size);
          return a;
        },
        &call_);
    if (!admitted.ok()) return admitted;  // audited by Admit: not again
    admitted_ = true;
    // A place among the caller's streams; the messages it may hold charged to the budget.
    Status limited =
        limits_->Admit(call_.context(), daemon_->limits(), /*charge_budget=*/true, &limit_,
                       (kWriteStreamMessagesInFlight + 1) * kMaxWriteStreamMessageBytes);
    if (!limited.ok()) return limited;  // audited by Finish (a limit refusal)
    Status s = guests_->Find(vm, &target_);
    if (!s.ok()) return s;
    if (size == 0) return InvalidArgument("size", "must be at least 1");
    if (gpa >= kPhysicalAddressLimit || size > kPhysicalAddressLimit - gpa) {
      return InvalidArgument("size", absl::StrCat("gpa ", Hex(gpa), " + size ", size,
                                                  " goes beyond the physical address space (",
                                                  Hex(kPhysicalAddressLimit), ") or wraps"));
    }
    gpa_ = gpa;
    size_ = size;
    return Status::OK;
  }

  void ReadMoreLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(link_->mu) {
    if (finished_ || reading_ || client_done_ || in_flight_ >= kWriteStreamMessagesInFlight) {
      return;
    }
    reading_ = true;
    StartRead(&request_);
  }

  // A bad message: the writes already sent are waited for, then the stream ends with `status`.
  void Fail(const Status& status) ABSL_EXCLUSIVE_LOCKS_REQUIRED(link_->mu) {
    if (first_error_.ok()) first_error_ = status;
    MaybeFinishLocked();
  }

  void MaybeFinishLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(link_->mu) {
    if (finished_ || in_flight_ > 0) return;
    if (!first_error_.ok()) return FinishLocked(first_error_);
    if (!client_done_) return;
    if (offset_ != size_) {
      return FinishLocked(InvalidArgument(
          "size", absl::StrCat("the stream carried ", offset_, " of ", size_, " bytes")));
    }
    response_->set_bytes_written(offset_);
    FinishLocked(Status::OK);
  }

  void FinishLocked(Status status) ABSL_EXCLUSIVE_LOCKS_REQUIRED(link_->mu) {
    finished_ = true;
    if (admitted_) status = admission_->Finish(call_, status);
    Finish(status);
  }

  grpc::ServerContextBase* const context_;
  const GuestFinder* const guests_;
  Admission* const admission_;
  kvmi::v1::WritePhysicalStreamResponse* const response_;
  const std::shared_ptr<Link> link_;

  kvmi::v1::WritePhysicalStreamRequest request_ ABSL_GUARDED_BY(link_->mu);
  bool reading_ ABSL_GUARDED_BY(link_->mu) = true;  // the constructor starts the first read
  bool started_ ABSL_GUARDED_BY(link_->mu) = false;
  bool admitted_ ABSL_GUARDED_BY(link_->mu) = false;
  bool client_done_ ABSL_GUARDED_BY(link_->mu) = false;
  bool finished_ ABSL_GUARDED_BY(link_->mu) = false;
  AdmittedCall call_ ABSL_GUARDED_BY(link_->mu);
  StreamLimits::Admission limit_ ABSL_GUARDED_BY(link_->mu);  // after Begin admitted the call
  Target target_ ABSL_GUARDED_BY(link_->mu);
  uint64_t gpa_ ABSL_GUARDED_BY(link_->mu) = 0;
  uint64_t size_ ABSL_GUARDED_BY(link_->mu) = 0;
  uint64_t offset_ ABSL_GUARDED_BY(link_->mu) = 0;  // bytes received (and sent to the guest)
  size_t in_flight_ ABSL_GUARDED_BY(link_->mu) = 0;
  Status first_error_ ABSL_GUARDED_BY(link_->mu);
};

}  // namespace

ReadReactor<kvmi::v1::WritePhysicalStreamRequest>* MemoryStreams::Write(
    grpc::ServerContextBase* context, kvmi::v1::WritePhysicalStreamResponse* response) {
  return new PhysicalWriteReactor(context, daemon_, &guests_, admission_, limits_, response);
}

}  // namespace kvmid::api
