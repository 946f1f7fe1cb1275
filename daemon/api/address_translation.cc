#include "daemon/api/address_translation.h"

#include <utility>

#include "daemon/vmem/context_capture.h"
#include "daemon/vmem/session_reader.h"
#include "daemon/vmem/virtual_read.h"
#include "kernel/abi/protocol.h"

namespace kvmid::api {

using grpc::Status;

namespace {

// Caches of guests whose session ended are dropped once this many are held.
constexpr size_t kPruneCachesAbove = 64;

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

std::shared_ptr<vmem::TranslationCache> AddressTranslation::CacheFor(const Target& target) {
  bool add_observer = false;
  std::shared_ptr<vmem::TranslationCache> cache;
  {
    MutexLock lock(&mu_);
    PerGuest& entry = caches_[target.guest.get()];
    if (!entry.cache || entry.guest.lock() != target.guest ||
        entry.session.lock() != target.session) {
      entry = PerGuest{target.guest, target.session,
                       std::make_shared<vmem::TranslationCache>(options_)};
    }
    cache = entry.cache;
    if (caches_.size() > kPruneCachesAbove) {
      for (auto it = caches_.begin(); it != caches_.end();) {
        it = it->second.session.expired() ? caches_.erase(it) : std::next(it);
      }
    }
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
    if (it == caches_.end()) return;
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
    if (it == caches_.end()) return;
    cache = it->second.cache;
  }
  cache->InvalidatePhysical(gpa, size);
}

template <typename Request>
Status AddressTranslation::ContextOf(grpc::ServerContextBase* context, const Request& request,
                                     const Target& target, vmem::PagingContext* out) {
  if (request.space_case() == Request::kAddressSpace) {
    const kvmi::v1::AddressSpace& space = request.address_space();
    std::optional<vmem::PagingMode> mode = PagingModeFromProto(space.mode());
    if (!mode) return InvalidArgument("address_space.mode", "a PAGING_MODE_* is required");
    out->mode = *mode;
    out->cr3 = space.cr3();
    out->nxe = space.nxe() && *mode != vmem::PagingMode::k32Bit;
    out->pse = space.pse();
    return Status::OK;
  }
  kvmi::GetRegistersRequest command;
  command.vcpu = static_cast<uint16_t>(request.vcpu());
  std::vector<uint8_t> data;
  Status s = Call(context, *target.session, command, "GetRegisters (paging mode)", &data);
  if (!s.ok()) return s;
  kvmi::RegistersReply reply;
  if (!(s = DecodeReply(data, "GetRegisters (paging mode)", &reply, size_t{0})).ok()) return s;
  *out = vmem::ContextFromRegisters(reply.sregs.cr0, reply.sregs.cr3, reply.sregs.cr4,
                                    reply.sregs.efer);
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

  std::vector<vmem::PagePlan> plan = vmem::SplitIntoPages(request.gva(), request.size());
  std::shared_ptr<vmem::TranslationCache> cache;
  if (!request.no_cache()) cache = CacheFor(target);
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
  if (!to_walk.empty()) {
    Waiter<std::vector<absl::StatusOr<vmem::Translation>>> walked;
    vmem::WalkMany(std::make_shared<vmem::SessionReader>(target.session), paging, to_walk,
                   walked.callback());
    std::vector<absl::StatusOr<vmem::Translation>> results;
    if (!(s = Await(context, &walked, &results)).ok()) return s;
    for (size_t j = 0; j < results.size(); ++j) {
      // A non-canonical address is the request's fault, not a page's.
      if (!results[j].ok() && results[j].status().code() == absl::StatusCode::kInvalidArgument) {
        return ToStatus(results[j].status());
      }
      if (cache && results[j].ok()) cache->Insert(bucket, paging, to_walk[j], *results[j], now);
      plan[walk_index[j]].translation = std::move(results[j]);
    }
  }
  struct Outcome {
    std::vector<uint8_t> data;
    std::vector<vmem::PageOutcome> pages;
  };
  Waiter<Outcome> read;
  vmem::ReadPages(
      target.session, std::move(plan),
      [done = read.callback()](std::vector<uint8_t> data, std::vector<vmem::PageOutcome> pages) {
        done(Outcome{std::move(data), std::move(pages)});
      });
  Outcome outcome;
  if (!(s = Await(context, &read, &outcome)).ok()) return s;
  bool complete = true;
  for (const vmem::PageOutcome& p : outcome.pages) {
    kvmi::v1::VirtualPage* page = response->add_pages();
    page->set_gva(p.gva);
    page->set_size(p.length);
    page->set_read(p.read);
    page->set_gpa(p.gpa);
    page->set_why(p.why);
    complete &= p.read;
  }
  response->set_complete(complete);
  response->set_data(outcome.data.data(), outcome.data.size());
  return Status::OK;
}

}  // namespace kvmid::api
