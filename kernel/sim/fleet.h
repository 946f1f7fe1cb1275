// Many simulated VMs in one process, each with its own engine, vCPU threads and connector: the
// in-process API that kvmi-sim, the tests and (later) kvmid's end-to-end tests drive.
#ifndef KVMID_KERNEL_SIM_FLEET_H_
#define KVMID_KERNEL_SIM_FLEET_H_

#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "kernel/host/stats.h"
#include "kernel/sim/sim_vm.h"

namespace kvmi::sim {

struct FleetConfig {
  uint32_t vms = 1;
  GuestConfig guest;  // vcpus, memory, ... (seed is varied per VM)
  ConnectorConfig connector;
  std::optional<Scenario> workload;
  std::string name_prefix = "sim-vm-";
  uint64_t seed = 1;
};

class Fleet {
 public:
  explicit Fleet(FleetConfig config);
  ~Fleet();

  void Start();
  void Stop();
  // What QEMU does at shutdown (KVM_INTROSPECTION_UNHOOK): every hooked VM sends UNHOOK (if the
  // tool enabled it) at once, then all wait together up to `grace` for the tool to close before
  // their sessions end; no reconnect afterwards. Returns how many VMs sent UNHOOK.
  size_t DetachAll(std::chrono::milliseconds grace);
  size_t size() const { return vms_.size(); }
  SimVm& vm(size_t i) { return *vms_[i]; }
  // Sum over every VM's engine counters.
  void AggregateStats(host::EngineStats* out) const;
  uint64_t ops_executed() const;
  uint64_t handshake_failures() const;
  // Hooked VMs right now.
  size_t hooked_count() const;

  // Deterministic per-VM identity (UUID v4 layout) so runs are comparable.
  static Uuid MakeUuid(uint64_t seed, uint32_t index);

 private:
  FleetConfig config_;
  std::vector<std::unique_ptr<SimVm>> vms_;
};

}  // namespace kvmi::sim

#endif  // KVMID_KERNEL_SIM_FLEET_H_
