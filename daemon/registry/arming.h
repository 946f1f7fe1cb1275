// What the daemon has armed on a guest, and for whom. Every policy or client that needs an
// intercept takes a lease on it under its owner id; the guest's effective arming is the union of
// all leases (for page access: the most restrictive mask). When an owner goes away its lease is
// released and whatever nobody else needs is disarmed, so a crashed analysis service leaves no
// guest locked down (DRAKVUF's libhook habit: a hook's owner going away unregisters it).
#ifndef KVMID_DAEMON_REGISTRY_ARMING_H_
#define KVMID_DAEMON_REGISTRY_ARMING_H_

#include <cstdint>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <vector>

namespace kvmid {

using OwnerId = std::string;  // "policy:<name>", "client:<id>", "daemon"

// Intercepts of one vCPU (CONTROL_EVENTS, CONTROL_CR, CONTROL_MSR for that vCPU only).
struct VcpuArming {
  std::set<uint8_t> events;
  std::set<uint32_t> crs;
  std::set<uint32_t> msrs;

  bool empty() const { return events.empty() && crs.empty() && msrs.empty(); }
  void MergeFrom(const VcpuArming& other);
};

// One CONTROL_EVENTS-style change to an owner's lease: turns intercepts on or off, for every
// vCPU alike or for one vCPU.
struct ArmingEdit {
  bool enable = true;
  std::optional<uint16_t> vcpu;  // unset: every vCPU
  std::set<uint8_t> vm_events;   // UNHOOK / CREATE_VCPU; only without `vcpu`
  VcpuArming intercepts;         // per-vCPU events, CRs, MSRs
};

struct Arming {
  std::set<uint8_t> vcpu_events;            // KVMI_EVENT_* enabled on every vCPU (CONTROL_EVENTS)
  std::set<uint8_t> vm_events;              // UNHOOK / CREATE_VCPU (CONTROL_VM_EVENTS)
  std::set<uint32_t> crs;                   // CONTROL_CR
  std::set<uint32_t> msrs;                  // CONTROL_MSR
  std::map<uint64_t, uint8_t> page_access;  // gfn -> allowed KVMI_PAGE_ACCESS_* (absent = rwx)
  // What single vCPUs get on top of the above (a vCPU that does not exist yet gets it when it
  // appears). Never holds an empty VcpuArming.
  std::map<uint16_t, VcpuArming> vcpu_only;

  bool empty() const {
    return vcpu_events.empty() && vm_events.empty() && crs.empty() && msrs.empty() &&
           page_access.empty() && vcpu_only.empty();
  }
  // Union of intercepts, intersection of page rights.
  void MergeFrom(const Arming& other);
  // Everything `vcpu` has armed: the intercepts of every vCPU plus its own.
  VcpuArming ForVcpu(uint16_t vcpu) const;
  // Applies `edit` to this lease. Turning something off for every vCPU also turns it off where
  // this lease had it on single vCPUs; a vCPU left with nothing of its own is dropped from
  // vcpu_only. Page rights are not touched.
  void Apply(const ArmingEdit& edit);
};

// CONTROL_EVENTS / CONTROL_CR / CONTROL_MSR changes for one vCPU (or for every vCPU alike).
struct VcpuArmingDelta {
  std::vector<std::pair<uint8_t, bool>> events;  // event, enable
  std::vector<std::pair<uint32_t, bool>> crs;
  std::vector<std::pair<uint32_t, bool>> msrs;

  bool empty() const { return events.empty() && crs.empty() && msrs.empty(); }
  size_t size() const { return events.size() + crs.size() + msrs.size(); }
};

// The commands that take a guest from `applied` to `wanted`.
struct ArmingDelta {
  std::vector<std::pair<uint8_t, bool>> vcpu_events;  // event, enable
  std::vector<std::pair<uint8_t, bool>> vm_events;
  std::vector<std::pair<uint32_t, bool>> crs;
  std::vector<std::pair<uint32_t, bool>> msrs;
  std::vector<std::pair<uint64_t, uint8_t>> page_access;  // gfn, access (7 = restore)
  // vCPUs with their own selection (before or after): what they need instead of the lists
  // above, which are for every other vCPU. An empty entry means "nothing for this vCPU".
  std::map<uint16_t, VcpuArmingDelta> vcpu_only;

  bool empty() const {
    if (!vcpu_events.empty() || !vm_events.empty() || !crs.empty() || !msrs.empty() ||
        !page_access.empty()) {
      return false;
    }
    for (const auto& [vcpu, delta] : vcpu_only) {
      if (!delta.empty()) return false;
    }
    return true;
  }
  // The per-vCPU commands `vcpu` needs.
  VcpuArmingDelta ForVcpu(uint16_t vcpu) const;
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
