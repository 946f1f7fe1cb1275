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

#include <memory>
#include <optional>
#include <unordered_map>

#include "absl/base/thread_annotations.h"
#include "daemon/api/guest_call.h"
#include "daemon/base/mutex.h"
#include "daemon/kvmid.h"
#include "daemon/vmem/page_walker.h"
#include "daemon/vmem/translation_cache.h"
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
  };
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
