#include "kernel/sim/workload.h"

#include <cerrno>
#include <cstdlib>
#include <sstream>

namespace kvmi::sim {
namespace {

constexpr const char* kOpNames[kOpKinds] = {"cr0",       "cr3",        "cr4",    "msr",
                                            "read",      "write",      "exec",   "int3",
                                            "hypercall", "descriptor", "xsetbv", "interrupt"};

void SetWeight(Scenario* s, OpKind kind, uint32_t weight) {
  s->weights[static_cast<size_t>(kind)] = weight;
}

}  // namespace

const char* OpKindName(OpKind kind) {
  auto i = static_cast<size_t>(kind);
  return i < kOpKinds ? kOpNames[i] : "?";
}

bool ParseOpKind(const std::string& name, OpKind* kind) {
  for (size_t i = 0; i < kOpKinds; ++i) {
    if (name == kOpNames[i]) {
      *kind = static_cast<OpKind>(i);
      return true;
    }
  }
  return false;
}

std::vector<std::string> ScenarioNames() {
  return {"idle",   "mixed",       "process-switch", "syscalls",
          "memory", "breakpoints", "all-events",     "processes"};
}

bool NamedScenario(const std::string& name, Scenario* out) {
  Scenario s;
  s.name = name;
  if (name == "idle") {
    // no weights: vCPUs only serve commands
  } else if (name == "mixed") {
    SetWeight(&s, OpKind::kWriteCr3, 30);
    SetWeight(&s, OpKind::kWriteCr0, 2);
    SetWeight(&s, OpKind::kWriteCr4, 2);
    SetWeight(&s, OpKind::kWriteMsr, 10);
    SetWeight(&s, OpKind::kRead, 15);
    SetWeight(&s, OpKind::kWrite, 15);
    SetWeight(&s, OpKind::kExecute, 5);
    SetWeight(&s, OpKind::kInt3, 5);
    SetWeight(&s, OpKind::kHypercall, 5);
    SetWeight(&s, OpKind::kDescriptor, 3);
    SetWeight(&s, OpKind::kXsetbv, 2);
    SetWeight(&s, OpKind::kInterrupt, 6);
  } else if (name == "process-switch") {
    SetWeight(&s, OpKind::kWriteCr3, 90);
    SetWeight(&s, OpKind::kWriteCr4, 5);
    SetWeight(&s, OpKind::kWriteCr0, 5);
  } else if (name == "processes") {
    // Process switches between real address spaces (kvmi-sim gives the guests page tables, 4-level
    // unless --paging says otherwise), with memory traffic in between.
    SetWeight(&s, OpKind::kWriteCr3, 60);
    SetWeight(&s, OpKind::kRead, 20);
    SetWeight(&s, OpKind::kWrite, 20);
    s.needs_paging = true;
  } else if (name == "syscalls") {
    SetWeight(&s, OpKind::kWriteMsr, 60);
    SetWeight(&s, OpKind::kHypercall, 40);
  } else if (name == "memory") {
    SetWeight(&s, OpKind::kRead, 45);
    SetWeight(&s, OpKind::kWrite, 45);
    SetWeight(&s, OpKind::kExecute, 10);
  } else if (name == "breakpoints") {
    SetWeight(&s, OpKind::kInt3, 100);
  } else if (name == "all-events") {
    for (size_t i = 0; i < kOpKinds; ++i) s.weights[i] = 1;
    s.hotplug_vcpus = 2;  // CREATE_VCPU at 1 s and 2 s of hooked time
    s.hotplug_period_ms = 1000;
  } else {
    return false;
  }
  *out = s;
  return true;
}

bool ParseScenarioText(const std::string& text, Scenario* inout, std::string* error) {
  Scenario s = *inout;
  std::istringstream lines(text);
  std::string line;
  int number = 0;
  auto fail = [&](const std::string& why) {
    *error = "scenario line " + std::to_string(number) + ": " + why;
    return false;
  };
  auto parse_u64 = [](const std::string& t, uint64_t* v) {
    if (t.empty()) return false;
    char* end = nullptr;
    errno = 0;
    unsigned long long x = std::strtoull(t.c_str(), &end, 0);
    if (errno != 0 || *end != '\0' || t[0] == '-') return false;
    *v = x;
    return true;
  };
  while (std::getline(lines, line)) {
    ++number;
    size_t hash = line.find('#');
    if (hash != std::string::npos) line.resize(hash);
    std::istringstream words(line);
    std::string key, a, b, extra;
    if (!(words >> key)) continue;
    words >> a >> b >> extra;
    if (!extra.empty()) return fail("too many words");
    uint64_t v = 0;
    if (key == "name") {
      if (a.empty() || !b.empty()) return fail("usage: name NAME");
      s.name = a;
    } else if (key == "rate") {
      char* end = nullptr;
      double rate = a.empty() ? -1 : std::strtod(a.c_str(), &end);
      if (a.empty() || *end != '\0' || !(rate >= 0) || !b.empty()) {
        return fail("usage: rate OPS_PER_SECOND_PER_VCPU (>= 0, 0 = unlimited)");
      }
      s.ops_per_second = rate;
    } else if (key == "data_gpa") {
      if (!parse_u64(a, &v) || (v & 0xfff) != 0 || !b.empty()) {
        return fail("usage: data_gpa PAGE_ALIGNED_ADDRESS");
      }
      s.data_gpa = v;
    } else if (key == "data_pages") {
      if (!parse_u64(a, &v) || v == 0 || v > (1u << 20) || !b.empty()) {
        return fail("usage: data_pages N (1..1048576)");
      }
      s.data_pages = static_cast<uint32_t>(v);
    } else if (key == "hotplug") {
      uint64_t period = 0;
      if (!parse_u64(a, &v) || v > kMaxHotplugVcpus || !parse_u64(b, &period) ||
          period < kMinHotplugPeriodMs || period > 86400000) {
        return fail("usage: hotplug VCPUS PERIOD_MS (VCPUS 0.." + std::to_string(kMaxHotplugVcpus) +
                    ", PERIOD_MS " + std::to_string(kMinHotplugPeriodMs) + "..86400000)");
      }
      s.hotplug_vcpus = static_cast<uint32_t>(v);
      s.hotplug_period_ms = static_cast<uint32_t>(period);
    } else if (key == "weight") {
      OpKind kind;
      if (!ParseOpKind(a, &kind)) {
        std::string message = "unknown operation '" + a + "' (one of: ";
        for (size_t i = 0; i < kOpKinds; ++i) {
          if (i != 0) message += ", ";
          message += kOpNames[i];
        }
        return fail(message + ")");
      }
      if (!parse_u64(b, &v) || v > 1000000) return fail("usage: weight KIND N (0..1000000)");
      s.weights[static_cast<size_t>(kind)] = static_cast<uint32_t>(v);
    } else {
      return fail("unknown key '" + key + "' (name, rate, data_gpa, data_pages, weight)");
    }
  }
  *inout = s;
  return true;
}

OpGenerator::OpGenerator(const Scenario& scenario, uint64_t seed)
    : scenario_(scenario), rng_(seed) {
  uint64_t total = 0;
  for (uint32_t w : scenario_.weights) total += w;
  empty_ = total == 0;
  if (!empty_)
    pick_ = std::discrete_distribution<size_t>(scenario_.weights.begin(), scenario_.weights.end());
}

std::optional<Op> OpGenerator::Next() {
  if (empty_) return std::nullopt;
  Op op;
  op.kind = static_cast<OpKind>(pick_(rng_));
  uint64_t page = rng_() % scenario_.data_pages;
  uint64_t offset = (rng_() % (4096 / 8)) * 8;
  op.gpa = scenario_.data_gpa + page * 4096 + offset;
  switch (op.kind) {
    case OpKind::kWriteMsr: {
      static constexpr uint32_t kMsrs[] = {0xc0000082, 0x174, 0x175, 0x176, 0xc0000081};
      op.index = kMsrs[rng_() % 5];
      break;
    }
    case OpKind::kDescriptor:
      op.index = static_cast<uint32_t>(rng_() % 8);
      break;
    case OpKind::kInterrupt:
      op.index = 0x20 + static_cast<uint32_t>(rng_() % 0xd0);
      break;
    case OpKind::kWrite:
      op.value = rng_();
      op.explicit_value = true;
      break;
    default:
      break;
  }
  return op;
}

}  // namespace kvmi::sim
