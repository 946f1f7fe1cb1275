#include "daemon/api/address_translation.h"

#include <absl/strings/str_cat.h>

#include <utility>

#include "daemon/vmem/context_capture.h"
#include "daemon/vmem/session_reader.h"
#include "daemon/vmem/table_page_reader.h"
#include "daemon/vmem/virtual_read.h"
#include "kernel/abi/protocol.h"

namespace kvmid::api {

using grpc::Status;

namespace {

// Caches of guests whose session ended are dropped once this many are held.
constexpr size_t kPruneCachesAbove = 64;
// CPUID leaf whose EAX[7:0] is MAXPHYADDR, and the smallest width believed (the 36 bits of the
// first PAE processors; a smaller answer is a broken or hostile host: the maximum is used).
constexpr uint32_t kMaxPhysAddrLeaf = 0x80000008;
constexpr unsigned kMinMaxPhysBits = 36;
// WriteVirtual: why a present page was not written when another page stopped the write.
constexpr const char* kNotWrittenBecauseOfOthers =
    "not written: another page of the range stopped the write";

}  // namespace

kvmi::v1::PagingMode PagingModeToProto(vmem::PagingMode mode) {
  switch (mode) {
    case vmem::PagingMode::kOff:
      return kvmi::v1::PAGING_MODE_OFF;
    case vmem::PagingMode::k32Bit:
      return kvmi::v1::PAGING_MODE_32BIT;
    case vmem::PagingMode::kPae:
      return kvmi::v1::PAGING_MODE_PAE;
    case vmem::PagingMode::k4Level:
      return kvmi::v1::PAGING_MODE_4LEVEL;
    case vmem::PagingMode::k5Level:
      return kvmi::v1::PAGING_MODE_5LEVEL;
  }
  return kvmi::v1::PAGING_MODE_UNSPECIFIED;
}

std::optional<vmem::PagingMode> PagingModeFromProto(kvmi::v1::PagingMode mode) {
  switch (mode) {
    case kvmi::v1::PAGING_MODE_OFF:
      return vmem::PagingMode::kOff;
    case kvmi::v1::PAGING_MODE_32BIT:
      return vmem::PagingMode::k32Bit;
    case kvmi::v1::PAGING_MODE_PAE:
      return vmem::PagingMode::kPae;
    case kvmi::v1::PAGING_MODE_4LEVEL:
      return vmem::PagingMode::k4Level;
    case kvmi::v1::PAGING_MODE_5LEVEL:
      return vmem::PagingMode::k5Level;
    default:
      return std::nullopt;
  }
}

AddressTranslation::AddressTranslation(Registry* registry, VerdictPipeline* pipeline,
                                       vmem::CacheOptions options)
    : guests_(registry), pipeline_(pipeline), options_(options) {
  // Event context (issue 15) reads through the same caches: the RIP page of a vCPU is a cache
  // hit after its first event.
  if (pipeline_ == nullptr) return;
  pipeline_->set_context_capturer(
      [this](const std::shared_ptr<Guest>& guest, const std::shared_ptr<GuestSession>& session,
             const kvmi::Event& event, const vmem::ContextDemand& demand,
             vmem::ContextCapture::Done done) {
        return vmem::ContextCapture::Start(std::make_shared<vmem::SessionMemory>(session),
                                           CacheFor(Target{guest, session}), event, demand,
                                           std::move(done));
      });
}

AddressTranslation::~AddressTranslation() {
  if (pipeline_ != nullptr) pipeline_->set_context_capturer(nullptr);
  std::optional<uint64_t> observer;
  {
    MutexLock lock(&mu_);
    observer = observer_;
  }
  if (observer && pipeline_) pipeline_->RemoveObserver(*observer);
}

AddressTranslation::PerGuest& AddressTranslation::EntryLocked(const Target& target) {
  if (caches_.size() > kPruneCachesAbove) {
    for (auto it = caches_.begin(); it != caches_.end();) {
      it = it->second.session.expired() ? caches_.erase(it) : std::next(it);
    }
  }
  PerGuest& entry = caches_[target.guest.get()];
  if (entry.guest.lock() != target.guest || entry.session.lock() != target.session) {
    entry = PerGuest{target.guest, target.session, nullptr, nullptr};  // a new session
  }
  return entry;
}

std::shared_ptr<vmem::TranslationCache> AddressTranslation::CacheFor(const Target& target) {
  bool add_observer = false;
  std::shared_ptr<vmem::TranslationCache> cache;
  {
    MutexLock lock(&mu_);
    PerGuest& entry = EntryLocked(target);
    if (!entry.cache) entry.cache = std::make_shared<vmem::TranslationCache>(options_);
    cache = entry.cache;
    if (!observer_ && pipeline_) {
      add_observer = true;
      observer_ = 0;  // reserved: set below, outside the lock (the pipeline has its own)
    }
  }
  if (add_observer) {
    uint64_t id = pipeline_->AddObserver([this](const ObservedEvent& o) { Observe(o); });
    MutexLock lock(&mu_);
    observer_ = id;
  }
  return cache;
}

std::shared_ptr<vmem::TranslationCache> AddressTranslation::CacheOf(const Guest& guest) const {
  MutexLock lock(&mu_);
  auto it = caches_.find(&guest);
  if (it == caches_.end() || it->second.session.lock() != guest.session()) return nullptr;
  return it->second.cache;
}

void AddressTranslation::Observe(const ObservedEvent& observed) {
  const kvmi::Event& event = observed.event;
  const bool cr3 = event.id() == KVMI_EVENT_CR && event.specific.cr.cr == 3;
  const bool pf_write =
      event.id() == KVMI_EVENT_PF && (event.specific.pf.access & KVMI_PAGE_ACCESS_W) != 0;
  if (!cr3 && !pf_write) return;  // every other event: two compares, no lock
  std::shared_ptr<vmem::TranslationCache> cache;
  {
    MutexLock lock(&mu_);
    auto it = caches_.find(observed.guest.get());
    if (it == caches_.end() || !it->second.cache) return;
    cache = it->second.cache;
  }
  if (cr3) cache->InvalidateVcpu(event.vcpu());
  if (pf_write)
    cache->InvalidatePhysical(event.specific.pf.gpa & ~(vmem::kPageSize - 1), vmem::kPageSize);
}

void AddressTranslation::OnPhysicalWrite(const Guest& guest, uint64_t gpa, uint64_t size) {
  std::shared_ptr<vmem::TranslationCache> cache;
  {
    MutexLock lock(&mu_);
    auto it = caches_.find(&guest);
    if (it == caches_.end() || !it->second.cache) return;
    cache = it->second.cache;
  }
  cache->InvalidatePhysical(gpa, size);
}

std::shared_ptr<std::atomic<unsigned>> AddressTranslation::PhysBitsSlot(const Target& target) {
  MutexLock lock(&mu_);
  PerGuest& entry = EntryLocked(target);  // no cache, no observer: nothing was cached yet
  if (!entry.max_phys_bits) entry.max_phys_bits = std::make_shared<std::atomic<unsigned>>(0);
  return entry.max_phys_bits;
}

// `done` is moved into the gather below; clang-tidy 14 misses the move in this template.
template <typename Request>
void AddressTranslation::ContextAsync(
    const Request& request, const Target& target,
    ContextCallback done) {  // NOLINT(performance-unnecessary-value-param)
  std::shared_ptr<std::atomic<unsigned>> bits_slot = PhysBitsSlot(target);
  const unsigned known_bits = bits_slot->load();
  if (request.space_case() == Request::kAddressSpace) {
    const kvmi::v1::AddressSpace& space = request.address_space();
    std::optional<vmem::PagingMode> mode = PagingModeFromProto(space.mode());
    if (!mode) {
      return done(absl::InvalidArgumentError("address_space.mode: a PAGING_MODE_* is required"));
    }
    vmem::PagingContext out;
    out.mode = *mode;
    out.cr3 = space.cr3();
    out.nxe = space.nxe() && *mode != vmem::PagingMode::k32Bit;
    out.pse = space.pse();
    if (known_bits != 0) out.max_phys_bits = known_bits;
    return done(out);
  }
  // GET_REGISTERS, and (once per session) GET_CPUID 0x80000008 for MAXPHYADDR, both in flight.
  struct Gather {
    Mutex mu;
    int left ABSL_GUARDED_BY(mu) = 0;
    absl::StatusOr<vmem::PagingContext> context ABSL_GUARDED_BY(mu) =
        absl::UnknownError("no answer");
    unsigned bits ABSL_GUARDED_BY(mu) = 0;
    ContextCallback done;
  };
  auto gather = std::make_shared<Gather>();
  gather->done = std::move(done);
  {
    MutexLock lock(&gather->mu);
    gather->left = known_bits != 0 ? 1 : 2;
    gather->bits = known_bits;
  }
  // The last answer completes it.
  auto finish = [gather]() {
    absl::StatusOr<vmem::PagingContext> context = absl::UnknownError("no answer");
    {
      MutexLock lock(&gather->mu);
      if (--gather->left != 0) return;
      context = gather->context;
      if (context.ok() && gather->bits != 0) context->max_phys_bits = gather->bits;
    }
    gather->done(std::move(context));
  };
  kvmi::GetRegistersRequest registers;
  registers.vcpu = static_cast<uint16_t>(request.vcpu());
  target.session->Send(registers, [gather, finish](const CommandResult& result) {
    absl::StatusOr<vmem::PagingContext> context = absl::UnknownError("no answer");
    kvmi::RegistersReply reply;
    kvmi::DecodeStatus decoded;
    if (!result.ok()) {
      // The codes and text the unary RPCs give a failed command.
      grpc::Status failed = ToStatus(result, "GetRegisters (paging mode)");
      context =
          absl::Status(static_cast<absl::StatusCode>(failed.error_code()), failed.error_message());
    } else if (!(decoded = kvmi::DecodeReplyData(kvmi::ByteView(result.data), size_t{0}, &reply))
                    .ok()) {
      context = absl::InternalError("GetRegisters (paging mode) reply: " + decoded.ToString());
    } else {
      context = vmem::ContextFromRegisters(reply.sregs.cr0, reply.sregs.cr3, reply.sregs.cr4,
                                           reply.sregs.efer);
    }
    {
      MutexLock lock(&gather->mu);
      gather->context = std::move(context);
    }
    finish();
  });
  if (known_bits != 0) return;
  kvmi::GetCpuidRequest cpuid;
  cpuid.vcpu = static_cast<uint16_t>(request.vcpu());
  cpuid.function = kMaxPhysAddrLeaf;
  cpuid.index = 0;
  target.session->Send(cpuid, [gather, finish, bits_slot](const CommandResult& result) {
    kvmi::CpuidReply reply;
    // A host that refuses the leaf (or a zero/oversized answer): the architectural maximum.
    unsigned bits = vmem::kMaxPhysBits;
    if (result.ok() && kvmi::DecodeReplyData(kvmi::ByteView(result.data), &reply).ok()) {
      const unsigned reported = reply.eax & 0xff;
      if (reported >= kMinMaxPhysBits && reported <= vmem::kMaxPhysBits) bits = reported;
    }
    {
      MutexLock lock(&gather->mu);
      gather->bits = bits;
    }
    bits_slot->store(bits);
    finish();
  });
}

template <typename Request>
Status AddressTranslation::ContextOf(grpc::ServerContextBase* context, const Request& request,
                                     const Target& target, vmem::PagingContext* out) {
  Waiter<absl::StatusOr<vmem::PagingContext>> waiter;
  ContextAsync(request, target, waiter.callback());
  absl::StatusOr<vmem::PagingContext> got = absl::UnknownError("no answer");
  Status s = Await(context, &waiter, &got);
  if (!s.ok()) return s;
  if (!got.ok()) return ToStatus(got.status());
  *out = *got;
  return Status::OK;
}

template <typename Request>
Status AddressTranslation::FindSpace(const Request& request, Target* target,
                                     uint32_t* bucket) const {
  switch (request.space_case()) {
    case Request::kVcpu:
      *bucket = request.vcpu();
      return guests_.FindVcpu(request.vm(), request.vcpu(), target);
    case Request::kAddressSpace:
      *bucket = vmem::kNoVcpu;
      return guests_.Find(request.vm(), target);
    case Request::SPACE_NOT_SET:
      break;
  }
  return InvalidArgument("space", "a vcpu or an address_space is required");
}

Status AddressTranslation::TranslateAddress(grpc::ServerContextBase* context,
                                            const kvmi::v1::TranslateAddressRequest& request,
                                            kvmi::v1::TranslateAddressResponse* response) {
  Target target;
  uint32_t bucket = vmem::kNoVcpu;
  Status s = FindSpace(request, &target, &bucket);
  if (!s.ok()) return s;
  vmem::PagingContext paging;
  if (!(s = ContextOf(context, request, target, &paging)).ok()) return s;
  response->set_mode(PagingModeToProto(paging.mode));
  response->set_cr3(paging.cr3);

  std::shared_ptr<vmem::TranslationCache> cache;
  std::optional<vmem::Translation> translation;
  if (!request.no_cache()) {
    cache = CacheFor(target);
    translation =
        cache->Lookup(bucket, paging, request.gva(), vmem::TranslationCache::Clock::now());
    response->set_cached(translation.has_value());
  }
  if (!translation) {
    Waiter<absl::StatusOr<vmem::Translation>> waiter;
    vmem::Walk(std::make_shared<vmem::SessionReader>(target.session), paging, request.gva(),
               waiter.callback());
    absl::StatusOr<vmem::Translation> walked = absl::UnknownError("no answer");
    if (!(s = Await(context, &waiter, &walked)).ok()) return s;
    if (!walked.ok()) return ToStatus(walked.status());
    translation = *walked;
    if (cache) {
      cache->Insert(bucket, paging, request.gva(), *translation,
                    vmem::TranslationCache::Clock::now());
    }
  }
  const vmem::Translation& t = *translation;
  response->set_present(t.present);
  if (t.present) {
    response->set_gpa(t.gpa);
    response->set_page_size(t.page_size);
    response->set_writable(t.writable);
    response->set_user(t.user);
    response->set_executable(t.executable);
  }
  response->set_level(static_cast<uint32_t>(t.level));
  response->set_level_name(vmem::LevelName(paging.mode, t.level));
  response->set_entry(t.entry);
  response->set_reserved_bits(t.reserved_bits);
  for (int i = 0; i < t.entries_read; ++i) response->add_entry_addresses(t.entry_gpas[i]);
  return Status::OK;
}

}  // namespace kvmid::api

namespace kvmid::api {

namespace {

// Calls `done` once every one of `count` results arrived (count > 0), with them in order.
template <typename T>
class Gather {
 public:
  using Done = std::function<void(std::vector<T>)>;
  Gather(size_t count, Done done) : left_(count), results_(count), done_(std::move(done)) {}
  void Put(size_t i, T value) ABSL_LOCKS_EXCLUDED(mu_) {
    std::vector<T> all;
    {
      MutexLock lock(&mu_);
      results_[i] = std::move(value);
      if (--left_ != 0) return;
      all = std::move(results_);
    }
    done_(std::move(all));
  }

 private:
  Mutex mu_;
  size_t left_ ABSL_GUARDED_BY(mu_);
  std::vector<T> results_ ABSL_GUARDED_BY(mu_);
  const Done done_;
};

std::string Hex(uint64_t value) { return absl::StrCat("0x", absl::Hex(value)); }

}  // namespace

void AddressTranslation::ReadRange(const Target& target, uint32_t bucket,
                                   const vmem::PagingContext& paging, bool use_cache, uint64_t gva,
                                   uint64_t size, const ReadCallback& done) {
  std::vector<vmem::PagePlan> plan = vmem::SplitIntoPages(gva, size);
  std::shared_ptr<vmem::TranslationCache> cache;
  if (use_cache) cache = CacheFor(target);
  const auto now = vmem::TranslationCache::Clock::now();
  std::vector<uint64_t> to_walk;
  std::vector<size_t> walk_index;
  for (size_t i = 0; i < plan.size(); ++i) {
    std::optional<vmem::Translation> hit;
    if (cache) hit = cache->Lookup(bucket, paging, plan[i].gva, now);
    if (hit) {
      plan[i].translation = *hit;
    } else {
      to_walk.push_back(plan[i].gva);
      walk_index.push_back(i);
    }
  }
  std::shared_ptr<GuestSession> session = target.session;
  auto read = [session, paging, done](std::vector<vmem::PagePlan> plan) {
    vmem::ReadPages(session, std::move(plan), paging.mode,
                    [done](std::vector<uint8_t> data, std::vector<vmem::PageOutcome> pages) {
                      done(VirtualRead{std::move(data), std::move(pages)});
                    });
  };
  if (to_walk.empty()) return read(std::move(plan));
  // The walks share one reader: each table page is read once for all of them.
  auto shared_plan = std::make_shared<std::vector<vmem::PagePlan>>(std::move(plan));
  vmem::WalkMany(vmem::TablePageReader::ForSession(session), paging, to_walk,
                 [shared_plan, to_walk, walk_index, cache, bucket, paging, now, read,
                  done](std::vector<absl::StatusOr<vmem::Translation>> results) {
                   for (size_t j = 0; j < results.size(); ++j) {
                     // A non-canonical address is the request's fault, not a page's.
                     if (!results[j].ok() &&
                         results[j].status().code() == absl::StatusCode::kInvalidArgument) {
                       return done(results[j].status());
                     }
                     if (cache && results[j].ok())
                       cache->Insert(bucket, paging, to_walk[j], *results[j], now);
                     (*shared_plan)[walk_index[j]].translation = std::move(results[j]);
                   }
                   read(std::move(*shared_plan));
                 });
}

Status AddressTranslation::ReadVirtual(grpc::ServerContextBase* context,
                                       const kvmi::v1::ReadVirtualRequest& request,
                                       kvmi::v1::ReadVirtualResponse* response) {
  Target target;
  uint32_t bucket = vmem::kNoVcpu;
  Status s = FindSpace(request, &target, &bucket);
  if (!s.ok()) return s;
  if (request.size() == 0 || request.size() > kMaxTransferBytes) {
    return InvalidArgument("size", std::string("1 .. ") + kMaxTransferText);
  }
  if (request.gva() + request.size() < request.gva()) return InvalidArgument("gva", "range wraps");
  vmem::PagingContext paging;
  if (!(s = ContextOf(context, request, target, &paging)).ok()) return s;
  response->set_mode(PagingModeToProto(paging.mode));
  response->set_cr3(paging.cr3);

  Waiter<absl::StatusOr<VirtualRead>> waiter;
  ReadRange(target, bucket, paging, !request.no_cache(), request.gva(), request.size(),
            waiter.callback());
  absl::StatusOr<VirtualRead> outcome = absl::UnknownError("no answer");
  if (!(s = Await(context, &waiter, &outcome)).ok()) return s;
  if (!outcome.ok()) return ToStatus(outcome.status());
  bool complete = true;
  for (const vmem::PageOutcome& p : outcome->pages) {
    kvmi::v1::VirtualPage* page = response->add_pages();
    page->set_gva(p.gva);
    page->set_size(p.length);
    page->set_read(p.read);
    page->set_gpa(p.gpa);
    page->set_why(p.why);
    complete &= p.read;
  }
  response->set_complete(complete);
  response->set_data(outcome->data.data(), outcome->data.size());
  return Status::OK;
}

Status AddressTranslation::WriteVirtual(grpc::ServerContextBase* context,
                                        const kvmi::v1::WriteVirtualRequest& request,
                                        kvmi::v1::WriteVirtualResponse* response) {
  Target target;
  uint32_t bucket = vmem::kNoVcpu;
  Status s = FindSpace(request, &target, &bucket);
  if (!s.ok()) return s;
  const std::string& bytes = request.data();
  if (bytes.empty() || bytes.size() > kMaxTransferBytes) {
    return InvalidArgument("data", std::string("1 byte .. ") + kMaxTransferText);
  }
  if (request.gva() + bytes.size() < request.gva()) return InvalidArgument("gva", "range wraps");
  vmem::PagingContext paging;
  if (!(s = ContextOf(context, request, target, &paging)).ok()) return s;
  response->set_mode(PagingModeToProto(paging.mode));
  response->set_cr3(paging.cr3);

  // Fresh walks only: a stale cached translation would send the bytes to another page.
  std::vector<vmem::PagePlan> plan = vmem::SplitIntoPages(request.gva(), bytes.size());
  std::vector<uint64_t> gvas;
  gvas.reserve(plan.size());
  for (const vmem::PagePlan& p : plan) gvas.push_back(p.gva);
  Waiter<std::vector<absl::StatusOr<vmem::Translation>>> walked;
  vmem::WalkMany(vmem::TablePageReader::ForSession(target.session), paging, gvas,
                 walked.callback());
  std::vector<absl::StatusOr<vmem::Translation>> results;
  if (!(s = Await(context, &walked, &results)).ok()) return s;

  bool blocked = false;
  for (size_t i = 0; i < plan.size(); ++i) {
    const absl::StatusOr<vmem::Translation>& t = results[i];
    if (!t.ok() && t.status().code() == absl::StatusCode::kInvalidArgument) {
      return ToStatus(t.status());  // non-canonical: the request's fault
    }
    kvmi::v1::VirtualWritePage* page = response->add_pages();
    page->set_gva(plan[i].gva);
    page->set_size(plan[i].length);
    if (!t.ok()) {
      page->set_why(std::string(t.status().message()));
    } else if (!t->present) {
      page->set_why(std::string(t->reserved_bits ? "reserved bits set in " : "not present at ") +
                    vmem::LevelName(paging.mode, t->level));
    } else {
      page->set_gpa(t->gpa);
      page->set_writable(t->writable);
      if (!t->writable && request.require_writable()) page->set_why("read-only");
    }
    blocked |= !page->why().empty();
  }
  if (blocked) {
    for (kvmi::v1::VirtualWritePage& page : *response->mutable_pages()) {
      if (page.why().empty()) page.set_why(kNotWrittenBecauseOfOthers);
    }
    response->set_written(false);
    response->set_bytes_written(0);
    return Status::OK;
  }

  // Every page present: the writes, all in flight at once.
  Waiter<std::vector<CommandResult>> wrote;
  auto gather = std::make_shared<Gather<CommandResult>>(plan.size(), wrote.callback());
  size_t offset = 0;
  for (size_t i = 0; i < plan.size(); ++i) {
    std::vector<uint8_t> piece(bytes.begin() + offset, bytes.begin() + offset + plan[i].length);
    offset += plan[i].length;
    target.session->WritePhysical(results[i]->gpa, std::move(piece),
                                  [gather, i](CommandResult r) { gather->Put(i, std::move(r)); });
  }
  std::vector<CommandResult> written;
  if (!(s = Await(context, &wrote, &written)).ok()) return s;
  uint64_t total = 0;
  bool all = true;
  for (size_t i = 0; i < plan.size(); ++i) {
    kvmi::v1::VirtualWritePage* page = response->mutable_pages(static_cast<int>(i));
    // Even a failed write may have changed the page: cached walks through it go.
    OnPhysicalWrite(*target.guest, results[i]->gpa, plan[i].length);
    if (written[i].ok()) {
      page->set_written(true);
      total += plan[i].length;
    } else {
      page->set_why(
          ToStatus(written[i], "WRITE_PHYSICAL at gpa " + Hex(results[i]->gpa)).error_message());
      all = false;
    }
  }
  response->set_written(all);
  response->set_bytes_written(total);
  return Status::OK;
}

// The streamed read (virtual_stream.cc) resolves its address space with these.
template void AddressTranslation::ContextAsync(const kvmi::v1::ReadVirtualStreamRequest&,
                                               const Target&, ContextCallback);
template Status AddressTranslation::FindSpace(const kvmi::v1::ReadVirtualStreamRequest&, Target*,
                                              uint32_t*) const;

}  // namespace kvmid::api
