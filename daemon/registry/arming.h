// What the daemon has armed on a guest, and for whom. Every policy or client that needs an
// intercept takes a lease on it under its owner id; the guest's effective arming is the union of
// all leases (for page access: the most restrictive mask). When an owner goes away its lease is
// released and whatever nobody else needs is disarmed, so a crashed analysis service leaves no
// guest locked down (DRAKVUF's libhook habit: a hook's owner going away unregisters it).
#ifndef KVMID_DAEMON_REGISTRY_ARMING_H_
#define KVMID_DAEMON_REGISTRY_ARMING_H_

#include <cstdint>
#include <map>
#include <set>
#include <string>
#include <vector>

namespace kvmid {

using OwnerId = std::string;  // "policy:<name>", "client:<id>", "daemon"

struct Arming {
  std::set<uint8_t> vcpu_events;            // KVMI_EVENT_* enabled on every vCPU (CONTROL_EVENTS)
  std::set<uint8_t> vm_events;              // UNHOOK / CREATE_VCPU (CONTROL_VM_EVENTS)
  std::set<uint32_t> crs;                   // CONTROL_CR
  std::set<uint32_t> msrs;                  // CONTROL_MSR
  std::map<uint64_t, uint8_t> page_access;  // gfn -> allowed KVMI_PAGE_ACCESS_* (absent = rwx)

  bool empty() const {
    return vcpu_events.empty() && vm_events.empty() && crs.empty() && msrs.empty() &&
           page_access.empty();
  }
  // Union of intercepts, intersection of page rights.
  void MergeFrom(const Arming& other);
};

// The commands that take a guest from `applied` to `wanted`.
struct ArmingDelta {
  std::vector<std::pair<uint8_t, bool>> vcpu_events;  // event, enable
  std::vector<std::pair<uint8_t, bool>> vm_events;
  std::vector<std::pair<uint32_t, bool>> crs;
  std::vector<std::pair<uint32_t, bool>> msrs;
  std::vector<std::pair<uint64_t, uint8_t>> page_access;  // gfn, access (7 = restore)

  bool empty() const {
    return vcpu_events.empty() && vm_events.empty() && crs.empty() && msrs.empty() &&
           page_access.empty();
  }
};
ArmingDelta Diff(const Arming& applied, const Arming& wanted);

class Leases {
 public:
  // Replaces the owner's lease.
  void Set(const OwnerId& owner, Arming arming);
  // Adds to the owner's lease.
  void Add(const OwnerId& owner, const Arming& arming);
  // Drops the owner's lease; true if it had one.
  bool Release(const OwnerId& owner);
  Arming Effective() const;
  const std::map<OwnerId, Arming>& by_owner() const { return leases_; }

 private:
  std::map<OwnerId, Arming> leases_;
};

}  // namespace kvmid

#endif  // KVMID_DAEMON_REGISTRY_ARMING_H_
