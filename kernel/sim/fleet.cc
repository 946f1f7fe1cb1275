#include "kernel/sim/fleet.h"

#include <cstdio>
#include <thread>

namespace kvmi::sim {

Uuid Fleet::MakeUuid(uint64_t seed, uint32_t index) {
  Uuid uuid{};
  uint64_t a = seed * 0x9e3779b97f4a7c15ull ^ 0x6b766d6964ull;
  uint64_t b = (uint64_t{index} + 1) * 0xbf58476d1ce4e5b9ull;
  for (int i = 0; i < 8; ++i) {
    uuid[i] = static_cast<uint8_t>(a >> (8 * i));
    uuid[8 + i] = static_cast<uint8_t>(b >> (8 * i));
  }
  uuid[6] = static_cast<uint8_t>((uuid[6] & 0x0f) | 0x40);  // version 4
  uuid[8] = static_cast<uint8_t>((uuid[8] & 0x3f) | 0x80);  // RFC 4122 variant
  return uuid;
}

Fleet::Fleet(FleetConfig config) : config_(std::move(config)) {
  vms_.reserve(config_.vms);
  for (uint32_t i = 0; i < config_.vms; ++i) {
    VmConfig vm;
    char name[64];
    std::snprintf(name, sizeof(name), "%s%04u", config_.name_prefix.c_str(), i);
    vm.name = name;
    vm.uuid = MakeUuid(config_.seed, i);
    vm.guest = config_.guest;
    vm.guest.seed = config_.seed * 1000003 + i;
    vm.connector = config_.connector;
    vm.workload = config_.workload;
    vms_.push_back(std::make_unique<SimVm>(std::move(vm)));
  }
}

Fleet::~Fleet() { Stop(); }

void Fleet::Start() {
  for (auto& vm : vms_) vm->Start();
}

void Fleet::Stop() {
  // Stopping is mostly waiting for threads to notice; do the VMs in parallel batches.
  std::vector<std::thread> stoppers;
  constexpr size_t kBatches = 8;
  for (size_t b = 0; b < kBatches && b < vms_.size(); ++b) {
    stoppers.emplace_back([this, b] {
      for (size_t i = b; i < vms_.size(); i += kBatches) vms_[i]->Stop();
    });
  }
  for (auto& t : stoppers) t.join();
}

size_t Fleet::DetachAll(std::chrono::milliseconds grace) {
  size_t sent = 0;
  for (auto& vm : vms_) sent += vm->BeginDetach() == 0 ? 1 : 0;
  auto deadline = Clock::now() + (sent > 0 ? grace : std::chrono::milliseconds(0));
  for (auto& vm : vms_) vm->FinishDetach(deadline);
  return sent;
}

void Fleet::AggregateStats(host::EngineStats* out) const {
  for (const auto& vm : vms_) out->MergeFrom(vm->engine().stats());
}

uint64_t Fleet::ops_executed() const {
  uint64_t n = 0;
  for (const auto& vm : vms_) n += vm->ops_executed();
  return n;
}

uint64_t Fleet::handshake_failures() const {
  uint64_t n = 0;
  for (const auto& vm : vms_) n += vm->handshake_failures();
  return n;
}

size_t Fleet::hooked_count() const {
  size_t n = 0;
  for (const auto& vm : vms_) n += vm->engine().hooked() ? 1 : 0;
  return n;
}

}  // namespace kvmi::sim
