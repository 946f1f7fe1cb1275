// Guest "instructions" and the workloads that string them together. Each operation is something
// a real guest does that a v6 kernel can turn into an event: a process switch writes CR3, the
// kernel writes LSTAR, code touches a page whose access the tool removed, ...
#ifndef KVMID_KERNEL_SIM_WORKLOAD_H_
#define KVMID_KERNEL_SIM_WORKLOAD_H_

#include <array>
#include <cstdint>
#include <optional>
#include <random>
#include <string>
#include <vector>

namespace kvmi::sim {

enum class OpKind : uint8_t {
  kWriteCr0,    // toggles CR0.WP
  kWriteCr3,    // process switch
  kWriteCr4,    // toggles CR4.PGE
  kWriteMsr,    // LSTAR, SYSENTER_*, STAR
  kRead,        // 8-byte load through the direct map
  kWrite,       // 8-byte store
  kExecute,     // instruction fetch from a data page (e.g. JIT code)
  kInt3,        // breakpoint at RIP
  kHypercall,   // VMCALL RAX=34 RDI=24 RSI=0
  kDescriptor,  // LIDT/SIDT/LGDT/SGDT/LLDT/SLDT/LTR/STR
  kXsetbv,      // toggles XCR0.AVX
  kInterrupt,   // an external interrupt becomes pending (collides with INJECT_EXCEPTION)
  kCount,
};
inline constexpr size_t kOpKinds = static_cast<size_t>(OpKind::kCount);
const char* OpKindName(OpKind kind);  // "cr3", "msr", "read", ...
bool ParseOpKind(const std::string& name, OpKind* kind);

// Descriptor-table instructions (Op::index for kDescriptor).
enum class DescInsn : uint8_t { kLidt, kSidt, kLgdt, kSgdt, kLldt, kSldt, kLtr, kStr };

// One guest operation. Fields a kind does not use are ignored; `explicit_*` let tests pin values
// instead of letting the vCPU choose.
struct Op {
  OpKind kind = OpKind::kRead;
  uint32_t index = 0;  // MSR index, DescInsn, interrupt vector
  uint64_t value = 0;  // value to write (CR/MSR/XCR0/memory/descriptor base)
  bool explicit_value = false;
  uint64_t gpa = 0;  // memory operations
};

// The mix and pace of a workload.
struct Scenario {
  std::string name = "mixed";
  std::array<uint32_t, kOpKinds> weights{};  // relative frequency per OpKind
  double ops_per_second = 100;               // per vCPU; 0 = as fast as the tool answers
  uint64_t data_gpa = 0x200000;              // data working set (what a tool restricts)
  uint32_t data_pages = 16;
  // vCPU hot-plug while hooked: a vCPU created after the hook raises CREATE_VCPU when it first
  // runs, if the tool enabled it (§6.2). One vCPU every `hotplug_period_ms` of hooked time, at
  // most `hotplug_vcpus` per VM (and never beyond the guest's vCPU limit).
  uint32_t hotplug_vcpus = 0;
  uint32_t hotplug_period_ms = 1000;
  // The scenario is about address spaces: its guests get real page tables (GuestConfig::paging).
  bool needs_paging = false;
};
// Scenario file limits (error messages are built from them).
inline constexpr uint32_t kMaxHotplugVcpus = 64;
inline constexpr uint32_t kMinHotplugPeriodMs = 10;

// Names: "idle" (no operations), "mixed" (every kind), "process-switch" (CR3 heavy), "syscalls"
// (MSR + hypercalls), "memory" (reads/writes/fetches, for page-access tools), "breakpoints",
// "all-events" (equal weights, and a hot-plugged vCPU each second, twice, so that every one of the
// 12 events can be raised: the tool supplies its part -- enabling them, PAUSE_VCPU,
// INJECT_EXCEPTION for TRAP, a PF reply with singlestep for SINGLESTEP; UNHOOK comes when the VM
// detaches), "processes" (CR3 switches between the real address spaces of guests with page
// tables, plus reads and writes). Returns false for an unknown name.
bool NamedScenario(const std::string& name, Scenario* out);
std::vector<std::string> ScenarioNames();
// A scenario file: lines "name NAME", "rate N", "data_gpa 0x...", "data_pages N", "weight KIND N",
// "hotplug VCPUS PERIOD_MS" ('#' comments). Starts from `base`. On error returns false with a
// line-numbered message.
bool ParseScenarioText(const std::string& text, Scenario* inout, std::string* error);

// Draws operations according to a scenario (one per vCPU; not thread-safe).
class OpGenerator {
 public:
  OpGenerator(const Scenario& scenario, uint64_t seed);
  // nullopt when the scenario has no weights.
  std::optional<Op> Next();

 private:
  Scenario scenario_;
  std::mt19937_64 rng_;
  std::discrete_distribution<size_t> pick_;
  bool empty_ = true;
};

}  // namespace kvmi::sim

#endif  // KVMID_KERNEL_SIM_WORKLOAD_H_
