#include "daemon/api/virtual_stream.h"

#include <absl/strings/str_cat.h>

#include <deque>
#include <map>
#include <memory>
#include <utility>

#include "daemon/api/convert.h"
#include "daemon/api/finished_stream.h"
#include "daemon/api/memory_stream.h"
#include "daemon/base/mutex.h"

namespace kvmid::api {

using grpc::Status;

namespace {

std::string Hex(uint64_t value) { return absl::StrCat("0x", absl::Hex(value)); }

// What each chunk read found, by the chunk's first GVA, until the reactor takes the chunk
// (ChunkedReader carries only the bytes). Chunk reads complete on the guest's loop thread.
class PageLog {
 public:
  void Put(uint64_t gva, absl::StatusOr<std::vector<vmem::PageOutcome>> pages)
      ABSL_LOCKS_EXCLUDED(mu_) {
    MutexLock lock(&mu_);
    chunks_.insert_or_assign(gva, std::move(pages));
  }
  absl::StatusOr<std::vector<vmem::PageOutcome>> Take(uint64_t gva) ABSL_LOCKS_EXCLUDED(mu_) {
    MutexLock lock(&mu_);
    auto it = chunks_.find(gva);
    if (it == chunks_.end()) return absl::InternalError("no page report for the chunk");
    absl::StatusOr<std::vector<vmem::PageOutcome>> pages = std::move(it->second);
    chunks_.erase(it);
    return pages;
  }

 private:
  Mutex mu_;
  std::map<uint64_t, absl::StatusOr<std::vector<vmem::PageOutcome>>> chunks_ ABSL_GUARDED_BY(mu_);
};

// What a stream reads: the guest's session, the address space, the cache bucket.
struct Space {
  Target target;
  uint32_t bucket = vmem::kNoVcpu;
  bool use_cache = true;
  vmem::PagingContext paging;
};

// One stream. Its state is guarded by the Link's mutex, which the reader's `on_ready` and the
// paging-context answer also take: the reactor is only reached through the Link, and OnDone
// unlinks it before it goes. Reads are issued (ChunkedReader::Fill) with that mutex released:
// one may complete inline.
class VirtualReadReactor final : public WriteReactor<kvmi::v1::ReadVirtualStreamResponse> {
 public:
  VirtualReadReactor(AddressTranslation* translation, const kvmi::v1::ReadVirtualStreamRequest& r,
                     Space space, ChunkedReader::Options options, StreamLimits::Admission admission)
      : admission_(std::move(admission)), link_(std::make_shared<Link>()) {
    {
      MutexLock lock(&link_->mu);
      link_->reactor = this;
    }
    // The address space first (a vCPU's: one GET_REGISTERS, answered on the loop thread).
    translation->ContextAsync(
        r, space.target,
        [link = link_, translation, space, options, gva = r.gva(),
         size = r.size()](absl::StatusOr<vmem::PagingContext> paging) mutable {
          if (!paging.ok()) return Fail(link, ToStatus(paging.status()));
          space.paging = *paging;
          Start(link, translation, space, options, gva, size);
        });
  }

  void OnWriteDone(bool ok) override {
    std::shared_ptr<ChunkedReader> fill;
    {
      MutexLock lock(&link_->mu);
      writing_ = false;
      if (!ok) cancelled_ = true;
      if (PumpLocked()) fill = link_->reader;
    }
    if (fill) fill->Fill();
  }
  void OnCancel() override {
    MutexLock lock(&link_->mu);
    cancelled_ = true;
    PumpLocked();
  }
  void OnDone() override {
    std::shared_ptr<ChunkedReader> reader;
    {
      MutexLock lock(&link_->mu);
      link_->reactor = nullptr;
      reader = link_->reader;
    }
    if (reader) reader->Cancel();
    admission_.Release();  // its place and its window's charge
    delete this;
  }

 private:
  StreamLimits::Admission admission_;  // released in OnDone
  struct Link {
    Mutex mu;
    VirtualReadReactor* reactor ABSL_GUARDED_BY(mu) = nullptr;
    std::shared_ptr<ChunkedReader> reader ABSL_GUARDED_BY(mu);  // once the context is known
    std::shared_ptr<PageLog> log = std::make_shared<PageLog>();
    kvmi::v1::PagingMode mode ABSL_GUARDED_BY(mu) = kvmi::v1::PAGING_MODE_UNSPECIFIED;
    uint64_t cr3 ABSL_GUARDED_BY(mu) = 0;
  };

  // The paging context could not be had: the stream ends with that.
  static void Fail(const std::shared_ptr<Link>& link, const Status& status) {
    MutexLock lock(&link->mu);
    VirtualReadReactor* self = link->reactor;
    if (self == nullptr) return;
    self->link_->mu.AssertHeld();  // the same mutex (self->link_ == link), for the analysis
    if (!self->finished_) self->FinishLocked(status);
  }

  // The paging context is known: the reader starts.
  static void Start(const std::shared_ptr<Link>& link, AddressTranslation* translation,
                    const Space& space, ChunkedReader::Options options, uint64_t gva,
                    uint64_t size) {
    std::shared_ptr<PageLog> log = link->log;
    auto read = [translation, space, log](uint64_t at, uint64_t bytes,
                                          const CommandCallback& done) {
      translation->ReadRange(
          space.target, space.bucket, space.paging, space.use_cache, at, bytes,
          [log, at, done](absl::StatusOr<AddressTranslation::VirtualRead> r) {
            if (!r.ok()) {
              log->Put(at, r.status());
              return done(CommandResult::Invalid(std::string(r.status().message())));
            }
            log->Put(at, std::move(r->pages));
            done(CommandResult::Ok(std::move(r->data)));
          });
    };
    absl::StatusOr<std::shared_ptr<ChunkedReader>> reader =
        ChunkedReader::Create({{gva, size}}, options, std::move(read));
    if (!reader.ok()) return Fail(link, ToStatus(reader.status()));
    {
      MutexLock lock(&link->mu);
      if (link->reactor == nullptr) return;  // gone meanwhile
      link->reader = *reader;
      link->mode = PagingModeToProto(space.paging.mode);
      link->cr3 = space.paging.cr3;
    }
    (*reader)->SetOnReady([link] { Wake(link); });
    (*reader)->Fill();  // the first reads (they may complete, and Wake, inline)
    Wake(link);
  }

  static void Wake(const std::shared_ptr<Link>& link) {
    std::shared_ptr<ChunkedReader> fill;
    {
      MutexLock lock(&link->mu);
      VirtualReadReactor* self = link->reactor;
      if (self == nullptr) return;
      self->link_->mu.AssertHeld();  // the same mutex (self->link_ == link), for the analysis
      if (self->PumpLocked()) fill = link->reader;
    }
    if (fill) fill->Fill();
  }

  // Starts the next write (or Finish) if none is in flight. True: a chunk was taken, so the
  // caller must Fill once it released the lock.
  bool PumpLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(link_->mu) {
    if (finished_ || writing_) return false;
    if (cancelled_) {
      FinishLocked(Cancelled());
      return false;
    }
    if (!link_->reader) return false;  // the paging context is not known yet
    ChunkedReader::Chunk chunk;
    switch (link_->reader->Next(&chunk)) {
      case ChunkedReader::Poll::kNotReady:
        return false;
      case ChunkedReader::Poll::kEnd:
        FinishLocked(Status::OK);
        return false;
      case ChunkedReader::Poll::kChunk:
        break;
    }
    absl::StatusOr<std::vector<vmem::PageOutcome>> pages = link_->log->Take(chunk.gpa);
    if (!chunk.result.ok() || !pages.ok()) {
      const std::string what =
          absl::StrCat("ReadVirtualStream: ", chunk.size, " bytes at gva ", Hex(chunk.gpa));
      FinishLocked(
          pages.ok() ? ToStatus(chunk.result, what)
                     : ToStatus(absl::Status(pages.status().code(),
                                             absl::StrCat(what, ": ", pages.status().message()))));
      return false;
    }
    message_.Clear();
    message_.set_gva(chunk.gpa);
    message_.set_size(chunk.size);
    message_.set_data(reinterpret_cast<const char*>(chunk.result.data.data()),
                      chunk.result.data.size());
    message_.set_mode(link_->mode);
    message_.set_cr3(link_->cr3);
    bool complete = true;
    for (const vmem::PageOutcome& p : *pages) {
      if (p.read) continue;
      complete = false;
      kvmi::v1::VirtualPage* page = message_.add_unread();
      page->set_gva(p.gva);
      page->set_size(p.length);
      page->set_gpa(p.gpa);
      page->set_why(p.why);
    }
    message_.set_complete(complete);
    writing_ = true;
    StartWrite(&message_);
    return true;
  }

  void FinishLocked(const Status& status) ABSL_EXCLUSIVE_LOCKS_REQUIRED(link_->mu) {
    finished_ = true;
    Finish(status);
  }

  const std::shared_ptr<Link> link_;
  bool writing_ ABSL_GUARDED_BY(link_->mu) = false;
  bool finished_ ABSL_GUARDED_BY(link_->mu) = false;
  bool cancelled_ ABSL_GUARDED_BY(link_->mu) = false;
  kvmi::v1::ReadVirtualStreamResponse message_ ABSL_GUARDED_BY(link_->mu);  // the one being written
};

}  // namespace

WriteReactor<kvmi::v1::ReadVirtualStreamResponse>* VirtualStreams::Read(
    const CallContext& call, const kvmi::v1::ReadVirtualStreamRequest& request) {
  Space space;
  Status s = translation_->FindSpace(request, &space.target, &space.bucket);
  if (!s.ok()) return FinishedStream<kvmi::v1::ReadVirtualStreamResponse>(s);
  if (request.size() == 0)
    return FinishedStream<kvmi::v1::ReadVirtualStreamResponse>(
        InvalidArgument("size", "must be at least 1"));
  if (request.gva() + request.size() < request.gva()) {
    return FinishedStream<kvmi::v1::ReadVirtualStreamResponse>(InvalidArgument(
        "size", absl::StrCat("gva ", Hex(request.gva()), " + size ", request.size(), " wraps")));
  }
  const uint64_t chunk_bytes =
      request.chunk_bytes() == 0 ? kDefaultStreamChunkBytes : request.chunk_bytes();
  if (chunk_bytes < kMinStreamChunkBytes || chunk_bytes > kMaxStreamChunkBytes) {
    return FinishedStream<kvmi::v1::ReadVirtualStreamResponse>(InvalidArgument(
        "chunk_bytes",
        absl::StrCat("0 (", kDefaultStreamChunkBytes >> 10, " KiB) or ", kMinStreamChunkBytes >> 10,
                     " .. ", kMaxStreamChunkBytes >> 10, " KiB")));
  }
  space.use_cache = !request.no_cache();
  ChunkedReader::Options options;
  options.chunk_bytes = chunk_bytes;
  options.window = StreamWindow(chunk_bytes);
  // A place among the caller's streams, and the window's bytes charged to the stream budget.
  StreamLimits::Admission admission;
  Status admitted = limits_->Admit(call, daemon_->limits(), /*charge_budget=*/true, &admission,
                                   options.window * chunk_bytes);
  if (!admitted.ok()) {
    call.AuditLimitRefusal(admitted);
    return FinishedStream<kvmi::v1::ReadVirtualStreamResponse>(admitted);
  }
  return new VirtualReadReactor(translation_, request, std::move(space), options,
                                std::move(admission));
}

}  // namespace kvmid::api
