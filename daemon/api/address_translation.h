// TranslateAddress: a guest-virtual address to guest-physical through the guest's own page tables
// (daemon/vmem: the walk over pipelined READ_PHYSICAL commands), in a vCPU's paging mode or an
// explicit address space, with a short-lived per-guest, per-vCPU translation cache.
//
// The cache is invalidated by what kvmid sees: a CR3-write event of a vCPU empties that vCPU's
// entries; a PF write event on a page, or kvmid's own WritePhysical, that touches a page the
// cached walks read entries from empties the guest's cache. Events are seen through a pipeline
// observer that exists only once some translation was cached (a daemon that never translates
// pays nothing on its event path); entries also expire (vmem::kDefaultCacheTtl), since the guest
// may change its tables without an event.
#ifndef KVMID_DAEMON_API_ADDRESS_TRANSLATION_H_
#define KVMID_DAEMON_API_ADDRESS_TRANSLATION_H_

#include <grpcpp/grpcpp.h>

#include <atomic>
#include <functional>
#include <memory>
#include <optional>
#include <unordered_map>

#include "absl/base/thread_annotations.h"
#include "daemon/api/guest_call.h"
#include "daemon/base/mutex.h"
#include "daemon/kvmid.h"
#include "daemon/vmem/page_walker.h"
#include "daemon/vmem/translation_cache.h"
#include "daemon/vmem/virtual_read.h"
#include "proto/kvmi/v1/introspection.pb.h"

namespace kvmid::api {

class AddressTranslation {
 public:
  // `pipeline` (may be null: no event-driven invalidation, only the time to live) is where the
  // observer goes; it must outlive this object.
  AddressTranslation(Registry* registry, VerdictPipeline* pipeline,
                     vmem::CacheOptions options = {});
  ~AddressTranslation();
  AddressTranslation(const AddressTranslation&) = delete;
  AddressTranslation& operator=(const AddressTranslation&) = delete;

  grpc::Status TranslateAddress(grpc::ServerContextBase* context,
                                const kvmi::v1::TranslateAddressRequest& request,
                                kvmi::v1::TranslateAddressResponse* response)
      ABSL_LOCKS_EXCLUDED(mu_);

  // Every page of the range translated (walks pipelined, the cache as above), then read
  // (vmem::ReadPages).
  grpc::Status ReadVirtual(grpc::ServerContextBase* context,
                           const kvmi::v1::ReadVirtualRequest& request,
                           kvmi::v1::ReadVirtualResponse* response) ABSL_LOCKS_EXCLUDED(mu_);

  // Translates every page of the range with a fresh walk (never the cache), then writes the
  // present ones -- only if every page is present (and writable, with require_writable).
  grpc::Status WriteVirtual(grpc::ServerContextBase* context,
                            const kvmi::v1::WriteVirtualRequest& request,
                            kvmi::v1::WriteVirtualResponse* response) ABSL_LOCKS_EXCLUDED(mu_);

  // The asynchronous pieces the streamed read is built from (`done` runs once, on any thread,
  // possibly inline; it never touches this object, so it may outlive a stream's call).
  using ContextCallback = std::function<void(absl::StatusOr<vmem::PagingContext>)>;
  // The paging context the request names (vcpu: one GET_REGISTERS, plus one GET_CPUID for
  // MAXPHYADDR the first time on a session; address_space: none).
  template <typename Request>
  void ContextAsync(const Request& request, const Target& target, ContextCallback done)
      ABSL_LOCKS_EXCLUDED(mu_);
  struct VirtualRead {
    std::vector<uint8_t> data;             // the whole range; pages not read are zeros
    std::vector<vmem::PageOutcome> pages;  // one per page piece, in order
  };
  using ReadCallback = std::function<void(absl::StatusOr<VirtualRead>)>;
  // Translates [gva, gva + size) page by page (the cache of `bucket` unless !use_cache; the
  // walks pipelined through one TablePageReader) and reads the present pages. An error only for
  // what is the request's fault or ends the read (a non-canonical address: INVALID_ARGUMENT);
  // a page that cannot be read is reported in its outcome.
  void ReadRange(const Target& target, uint32_t bucket, const vmem::PagingContext& paging,
                 bool use_cache, uint64_t gva, uint64_t size, const ReadCallback& done)
      ABSL_LOCKS_EXCLUDED(mu_);

  // kvmid wrote [gpa, gpa + size) of `guest` (WritePhysical).
  void OnPhysicalWrite(const Guest& guest, uint64_t gpa, uint64_t size) ABSL_LOCKS_EXCLUDED(mu_);
  // The cache of `guest`'s current session; null until something was translated on it.
  std::shared_ptr<vmem::TranslationCache> CacheOf(const Guest& guest) const
      ABSL_LOCKS_EXCLUDED(mu_);

  // The paging context the request names (vcpu: one GET_REGISTERS; address_space: none).
  template <typename Request>
  grpc::Status ContextOf(grpc::ServerContextBase* context, const Request& request,
                         const Target& target, vmem::PagingContext* out);
  // The guest and vCPU bucket a request with a vcpu/address_space oneof names.
  template <typename Request>
  grpc::Status FindSpace(const Request& request, Target* target, uint32_t* bucket) const;

 private:
  struct PerGuest {
    std::weak_ptr<Guest> guest;
    std::weak_ptr<GuestSession> session;
    std::shared_ptr<vmem::TranslationCache> cache;
    // MAXPHYADDR from the session's CPUID 0x80000008 (0 until asked); shared with the answer's
    // callback, which never touches this object.
    std::shared_ptr<std::atomic<unsigned>> max_phys_bits;
  };
  // The entry of the target's guest for its current session (a new session: a new, empty one);
  // drops the entries of ended sessions once there are many.
  PerGuest& EntryLocked(const Target& target) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The MAXPHYADDR slot of the target's session (its PerGuest entry made if needed).
  std::shared_ptr<std::atomic<unsigned>> PhysBitsSlot(const Target& target)
      ABSL_LOCKS_EXCLUDED(mu_);
  // The cache of the target's session (a new one for a new session); adds the observer.
  std::shared_ptr<vmem::TranslationCache> CacheFor(const Target& target) ABSL_LOCKS_EXCLUDED(mu_);
  void Observe(const ObservedEvent& observed) ABSL_LOCKS_EXCLUDED(mu_);

  GuestFinder guests_;
  VerdictPipeline* const pipeline_;
  const vmem::CacheOptions options_;
  mutable Mutex mu_;
  std::unordered_map<const Guest*, PerGuest> caches_ ABSL_GUARDED_BY(mu_);
  std::optional<uint64_t> observer_ ABSL_GUARDED_BY(mu_);
};

// The proto's names for the walker's modes (and back: UNSPECIFIED has none).
kvmi::v1::PagingMode PagingModeToProto(vmem::PagingMode mode);
std::optional<vmem::PagingMode> PagingModeFromProto(kvmi::v1::PagingMode mode);

}  // namespace kvmid::api

#endif  // KVMID_DAEMON_API_ADDRESS_TRANSLATION_H_
