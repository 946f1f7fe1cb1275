#include "daemon/registry/arming.h"

#include <algorithm>

namespace kvmid {

void VcpuArming::MergeFrom(const VcpuArming& other) {
  events.insert(other.events.begin(), other.events.end());
  crs.insert(other.crs.begin(), other.crs.end());
  msrs.insert(other.msrs.begin(), other.msrs.end());
}

VcpuArming Arming::ForVcpu(uint16_t vcpu) const {
  VcpuArming all{vcpu_events, crs, msrs};
  auto own = vcpu_only.find(vcpu);
  if (own != vcpu_only.end()) all.MergeFrom(own->second);
  return all;
}

void Arming::MergeFrom(const Arming& other) {
  vcpu_events.insert(other.vcpu_events.begin(), other.vcpu_events.end());
  vm_events.insert(other.vm_events.begin(), other.vm_events.end());
  crs.insert(other.crs.begin(), other.crs.end());
  msrs.insert(other.msrs.begin(), other.msrs.end());
  for (const auto& [gfn, access] : other.page_access) {
    auto [it, inserted] = page_access.emplace(gfn, access);
    if (!inserted) it->second &= access;
  }
  for (const auto& [vcpu, own] : other.vcpu_only) vcpu_only[vcpu].MergeFrom(own);
}

namespace {

template <typename T>
void Switch(const std::set<T>& what, bool enable, std::set<T>* into) {
  for (const T& x : what) {
    if (enable) {
      into->insert(x);
    } else {
      into->erase(x);
    }
  }
}

void Switch(const VcpuArming& what, bool enable, VcpuArming* into) {
  Switch(what.events, enable, &into->events);
  Switch(what.crs, enable, &into->crs);
  Switch(what.msrs, enable, &into->msrs);
}

}  // namespace

void Arming::Apply(const ArmingEdit& edit) {
  Switch(edit.vm_events, edit.enable, &vm_events);
  if (edit.vcpu) {
    Switch(edit.intercepts, edit.enable, &vcpu_only[*edit.vcpu]);
  } else {
    Switch(edit.intercepts.events, edit.enable, &vcpu_events);
    Switch(edit.intercepts.crs, edit.enable, &crs);
    Switch(edit.intercepts.msrs, edit.enable, &msrs);
    if (!edit.enable) {
      for (auto& [vcpu, own] : vcpu_only) Switch(edit.intercepts, false, &own);
    }
  }
  for (auto it = vcpu_only.begin(); it != vcpu_only.end();) {
    it = it->second.empty() ? vcpu_only.erase(it) : std::next(it);
  }
}

namespace {

template <typename T>
void DiffSets(const std::set<T>& applied, const std::set<T>& wanted,
              std::vector<std::pair<T, bool>>* out) {
  for (const T& x : wanted) {
    if (applied.count(x) == 0) out->emplace_back(x, true);
  }
  for (const T& x : applied) {
    if (wanted.count(x) == 0) out->emplace_back(x, false);
  }
}

}  // namespace

ArmingDelta Diff(const Arming& applied, const Arming& wanted) {
  constexpr uint8_t kAll = 7;  // KVMI_PAGE_ACCESS_R | W | X
  ArmingDelta delta;
  DiffSets(applied.vcpu_events, wanted.vcpu_events, &delta.vcpu_events);
  DiffSets(applied.vm_events, wanted.vm_events, &delta.vm_events);
  DiffSets(applied.crs, wanted.crs, &delta.crs);
  DiffSets(applied.msrs, wanted.msrs, &delta.msrs);
  for (const auto& [gfn, access] : wanted.page_access) {
    auto it = applied.page_access.find(gfn);
    if (it == applied.page_access.end() || it->second != access) {
      delta.page_access.emplace_back(gfn, access);
    }
  }
  for (const auto& [gfn, access] : applied.page_access) {
    if (wanted.page_access.count(gfn) == 0) delta.page_access.emplace_back(gfn, kAll);
  }
  // A vCPU with its own selection on either side: its whole state before and after decides.
  std::set<uint16_t> own;
  for (const auto& [vcpu, unused] : applied.vcpu_only) own.insert(vcpu);
  for (const auto& [vcpu, unused] : wanted.vcpu_only) own.insert(vcpu);
  for (uint16_t vcpu : own) {
    VcpuArming before = applied.ForVcpu(vcpu);
    VcpuArming after = wanted.ForVcpu(vcpu);
    VcpuArmingDelta& d = delta.vcpu_only[vcpu];
    DiffSets(before.events, after.events, &d.events);
    DiffSets(before.crs, after.crs, &d.crs);
    DiffSets(before.msrs, after.msrs, &d.msrs);
  }
  return delta;
}

VcpuArmingDelta ArmingDelta::ForVcpu(uint16_t vcpu) const {
  auto own = vcpu_only.find(vcpu);
  if (own != vcpu_only.end()) return own->second;
  return VcpuArmingDelta{vcpu_events, crs, msrs};
}

void Leases::Set(const OwnerId& owner, Arming arming) {
  if (arming.empty()) {
    leases_.erase(owner);
  } else {
    leases_[owner] = std::move(arming);
  }
}

void Leases::Add(const OwnerId& owner, const Arming& arming) { leases_[owner].MergeFrom(arming); }

bool Leases::Release(const OwnerId& owner) { return leases_.erase(owner) > 0; }

Arming Leases::Effective() const {
  constexpr uint8_t kAll = 7;  // rwx: no restriction, the kernel forgets such a page
  Arming all;
  for (const auto& [owner, arming] : leases_) all.MergeFrom(arming);
  for (auto it = all.page_access.begin(); it != all.page_access.end();) {
    it = it->second == kAll ? all.page_access.erase(it) : std::next(it);
  }
  return all;
}

}  // namespace kvmid
