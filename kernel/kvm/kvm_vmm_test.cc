// kvmi-vmm's host side on a real VM: the repository's guest on /dev/kvm, hooked by the minimal
// test tool over a real socket. Every check compares what the tool reads or is told with what the
// guest itself prints on its console. Skipped where /dev/kvm cannot be opened.
#include "kernel/kvm/kvm_vmm.h"

#include <cpuid.h>
#include <fcntl.h>
#include <unistd.h>

#include <chrono>
#include <condition_variable>
#include <cstring>
#include <map>
#include <mutex>
#include <regex>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "kernel/abi/events.h"
#include "kernel/abi/messages.h"
#include "kernel/kvm/guest/layout.h"
#include "kernel/kvm/guest_image.h"
#include "kernel/sim/test_tool.h"

namespace kvmi::kvm {
namespace {

using namespace std::chrono_literals;
using sim::ToolConnection;
using sim::ToolListener;

constexpr uint32_t kLstar = 0xc0000082;
constexpr uint8_t kRX = KVMI_PAGE_ACCESS_R | KVMI_PAGE_ACCESS_X;

bool InKernelText(uint64_t address) {
  return address >= GUEST_KTEXT_FIRST && address <= GUEST_KTEXT_LAST;
}

class KvmVmmTest : public ::testing::Test {
 protected:
  void SetUp() override {
    int fd = ::open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (fd < 0) GTEST_SKIP() << "/dev/kvm cannot be opened (" << std::strerror(errno) << ")";
    ::close(fd);
  }
  void TearDown() override {
    if (vmm_) vmm_->Stop();
  }

  // Boots the guest with `args`, accepts its connection and waits for the layout line.
  void Start(const std::string& args, uint32_t vcpus = 1, int64_t hotplug_vcpu_after_ms = -1,
             bool enforce_execute = false) {
    ASSERT_TRUE(listener_.ok());
    VmmConfig config;
    config.name = "kvm-test";
    config.image = GuestImage();
    config.cmdline = args;
    config.vcpus = vcpus;
    config.hotplug_vcpu_after_ms = hotplug_vcpu_after_ms;
    config.enforce_execute = enforce_execute;
    config.connector.endpoint = listener_.endpoint();
    config.connector.reconnect_seconds = 0;
    config.on_console_line = [this](const std::string& line) {
      std::lock_guard<std::mutex> lock(mu_);
      lines_.push_back(line);
      cv_.notify_all();
    };
    std::string error;
    vmm_ = KvmVmm::Create(std::move(config), &error);
    ASSERT_NE(vmm_, nullptr) << error;
    vmm_->Start();
    tool_ = listener_.AcceptAndHandshake(20s);
    ASSERT_NE(tool_, nullptr);
    ASSERT_EQ(ToolConnection::ErrorOf(tool_->Call(GetVersionRequest{})), 0);
    std::string layout = WaitLine("^layout: ").second;
    std::regex pair(R"((\w+)=(0x[0-9a-f]+))");
    for (std::sregex_iterator it(layout.begin(), layout.end(), pair), end; it != end; ++it) {
      layout_[(*it)[1]] = std::stoull((*it)[2], nullptr, 16);
    }
    ASSERT_TRUE(layout_.count("lstar") && layout_.count("marker") && layout_.count("r15"));
  }

  size_t LineCount() {
    std::lock_guard<std::mutex> lock(mu_);
    return lines_.size();
  }
  // The first console line at index >= from matching `pattern` (index, line); fails after 20 s.
  std::pair<size_t, std::string> WaitLine(const std::string& pattern, size_t from = 0) {
    std::regex re(pattern);
    std::unique_lock<std::mutex> lock(mu_);
    auto deadline = std::chrono::steady_clock::now() + 20s;
    for (;;) {
      for (size_t i = from; i < lines_.size(); ++i) {
        if (std::regex_search(lines_[i], re)) return {i, lines_[i]};
      }
      if (cv_.wait_until(lock, deadline) == std::cv_status::timeout) {
        ADD_FAILURE() << "no console line /" << pattern
                      << "/; last: " << (lines_.empty() ? "" : lines_.back());
        return {lines_.size(), ""};
      }
    }
  }
  template <typename Request>
  int32_t Call(const Request& request) {
    return ToolConnection::ErrorOf(tool_->Call(request));
  }
  void Enable(uint16_t event) {
    ControlEventsRequest request;
    request.event_id = event;
    request.enable = true;
    ASSERT_EQ(Call(request), 0) << "CONTROL_EVENTS " << event;
  }
  void Restrict(uint64_t gpa, uint8_t access) {
    SetPageAccessRequest request;
    request.entries.push_back(PageAccess{gpa, access});
    ASSERT_EQ(Call(request), 0);
  }
  // The next event with this id; others that arrive first are answered CONTINUE.
  Event WaitEventOf(uint8_t id) {
    for (;;) {
      std::optional<Event> event = tool_->WaitEvent(20s);
      if (!event) {
        ADD_FAILURE() << "no event " << int{id};
        return Event{};
      }
      if (event->id() == id) return *event;
      tool_->Continue(*event);
    }
  }
  void Reply(const Event& event, uint8_t action) {
    ASSERT_TRUE(tool_->ReplyEvent(MakeEventReply(event, action)));
  }

  ToolListener listener_;
  std::unique_ptr<KvmVmm> vmm_;
  std::unique_ptr<ToolConnection> tool_;
  std::map<std::string, uint64_t> layout_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<std::string> lines_;
};

TEST_F(KvmVmmTest, StateReadAndWrittenThroughKvmiMatchesTheGuest) {
  Start("period_ms=20");
  // What stock KVM cannot report to user space is not allowed for this guest.
  for (uint16_t id :
       {KVMI_EVENT_CR, KVMI_EVENT_XSETBV, KVMI_EVENT_DESCRIPTOR, KVMI_EVENT_HYPERCALL}) {
    EXPECT_EQ(Call(CheckEventRequest{id}), -KVM_EPERM) << "event " << id;
  }
  for (uint16_t id : {KVMI_EVENT_MSR, KVMI_EVENT_PF, KVMI_EVENT_BREAKPOINT, KVMI_EVENT_SINGLESTEP,
                      KVMI_EVENT_PAUSE_VCPU, KVMI_EVENT_TRAP}) {
    EXPECT_EQ(Call(CheckEventRequest{id}), 0) << "event " << id;
  }

  GetRegistersRequest get_registers;
  get_registers.msrs = {kLstar};
  auto reply = tool_->Call(get_registers);
  ASSERT_EQ(ToolConnection::ErrorOf(reply), 0);
  RegistersReply registers;
  ASSERT_TRUE(DecodeReplyData(ToolConnection::DataOf(*reply), 1, &registers).ok());
  EXPECT_EQ(registers.mode, 8u);
  EXPECT_EQ(registers.regs.r15, layout_["r15"]);  // reserved in the guest for this marker
  EXPECT_TRUE(registers.sregs.cr0 & 0x80000000u);
  EXPECT_EQ(registers.sregs.efer & 0x500, 0x500u);  // LME | LMA
  ASSERT_EQ(registers.msrs.size(), 1u);
  EXPECT_EQ(registers.msrs[0].index, kLstar);
  EXPECT_EQ(registers.msrs[0].data, layout_["lstar"]);

  // CPUID is the host's as KVM supports it: the vendor string matches.
  auto cpuid = tool_->Call(GetCpuidRequest{0, 0, 0});
  ASSERT_EQ(ToolConnection::ErrorOf(cpuid), 0);
  CpuidReply leaf0;
  ASSERT_TRUE(DecodeReplyData(ToolConnection::DataOf(*cpuid), &leaf0).ok());
  unsigned eax, ebx, ecx, edx;
  __cpuid(0, eax, ebx, ecx, edx);
  EXPECT_EQ(leaf0.ebx, ebx);
  EXPECT_EQ(leaf0.ecx, ecx);
  EXPECT_EQ(leaf0.edx, edx);

  auto xsave = tool_->Call(GetXsaveRequest{0});
  ASSERT_EQ(ToolConnection::ErrorOf(xsave), 0);
  XsaveReply region;
  ASSERT_TRUE(DecodeReplyData(ToolConnection::DataOf(*xsave), &region).ok());
  ASSERT_EQ(region.region.size(), 4096u);
  uint32_t mxcsr;
  std::memcpy(&mxcsr, &region.region[24], sizeof(mxcsr));
  EXPECT_EQ(mxcsr, 0x1f80u);  // the reset value: the guest never touches SSE

  EXPECT_EQ(Call(GetMtrrTypeRequest{0, layout_["marker"]}), 0);

  // Guest memory: the marker page as the guest filled it, then a write the guest reads back.
  const uint64_t marker = layout_["marker"];
  auto page = tool_->Call(ReadPhysicalRequest{marker, 4096});
  ASSERT_EQ(ToolConnection::ErrorOf(page), 0);
  ByteView data = ToolConnection::DataOf(*page);
  ASSERT_EQ(data.size(), 4096u);
  for (uint64_t i = 0; i < 512; ++i) {
    uint64_t word;
    std::memcpy(&word, data.data() + i * 8, 8);
    ASSERT_EQ(word, layout_["r15"] ^ (i * 0x9e3779b97f4a7c15ull)) << "marker word " << i;
  }
  const uint64_t written = 0x5eed0000c0ffee00ull;
  WritePhysicalRequest write;
  write.gpa = marker;
  write.size = 8;
  write.data = ByteView(reinterpret_cast<const uint8_t*>(&written), 8);
  ASSERT_EQ(Call(write), 0);
  WaitLine("marker0=0x5eed0000c0ffee00 ", LineCount());
}

TEST_F(KvmVmmTest, MsrWriteEventAndEachVerdict) {
  Start("rootkit period_ms=20");
  Enable(KVMI_EVENT_MSR);
  ASSERT_EQ(Call(ControlMsrRequest{0, kLstar, true}), 0);
  const uint64_t lstar = layout_["lstar"];

  // CONTINUE with the old value: the write has no effect.
  Event event = WaitEventOf(KVMI_EVENT_MSR);
  size_t from = LineCount();
  EXPECT_EQ(event.specific.msr.msr, kLstar);
  EXPECT_EQ(event.specific.msr.old_value, lstar);
  const uint64_t hook = event.specific.msr.new_value;
  EXPECT_NE(hook, lstar);
  EXPECT_TRUE(InKernelText(event.common.arch.regs.rip));
  EXPECT_EQ(event.common.arch.regs.r15, layout_["r15"]);
  EventReply keep = MakeEventReply(event, KVMI_EVENT_ACTION_CONTINUE);
  keep.specific.msr.new_val = lstar;
  ASSERT_TRUE(tool_->ReplyEvent(keep));
  auto line = WaitLine("^rootkit: attempt \\d+ lstar", from).second;
  EXPECT_NE(line.find(": blocked"), std::string::npos) << line;
  EXPECT_NE(line.find("syscalls through the hook: 0"), std::string::npos) << line;

  // RETRY (anything but CONTINUE): the WRMSR faults; the guest's #GP handler reports it.
  event = WaitEventOf(KVMI_EVENT_MSR);
  from = LineCount();
  Reply(event, KVMI_EVENT_ACTION_RETRY);
  WaitLine("^trap: #GP on wrmsr ecx=0xc0000082", from);
  line = WaitLine("^rootkit: attempt \\d+ lstar", from).second;
  EXPECT_NE(line.find(": blocked"), std::string::npos) << line;
  WaitLine("^round \\d+: .* gp_on_wrmsr=1$", from);

  // CONTINUE with the new value: the hijack works; the rootkit's own undo is an event too.
  event = WaitEventOf(KVMI_EVENT_MSR);
  from = LineCount();
  EXPECT_EQ(event.specific.msr.new_value, hook);
  Reply(event, KVMI_EVENT_ACTION_CONTINUE);
  Event undo = WaitEventOf(KVMI_EVENT_MSR);
  EXPECT_EQ(undo.specific.msr.old_value, hook);
  EXPECT_EQ(undo.specific.msr.new_value, lstar);
  Reply(undo, KVMI_EVENT_ACTION_CONTINUE);
  line = WaitLine("^rootkit: attempt \\d+ lstar", from).second;
  EXPECT_NE(line.find(": HIJACKED"), std::string::npos) << line;
  EXPECT_NE(line.find("syscalls through the hook: 1"), std::string::npos) << line;
}

TEST_F(KvmVmmTest, WriteToProtectedKernelTextRetryThenContinueThenUnrestricted) {
  Start("rootkit period_ms=20");
  const uint64_t target = layout_["sys_getpid"];
  ASSERT_TRUE(InKernelText(target));
  Enable(KVMI_EVENT_PF);
  Restrict(target & ~0xfffull, kRX);
  EXPECT_GT(vmm_->backend().memslot_count(), 1u);  // RAM split around a read-only page

  Event event = WaitEventOf(KVMI_EVENT_PF);
  size_t from = LineCount();
  EXPECT_EQ(event.specific.pf.gpa, target);
  EXPECT_EQ(event.specific.pf.gva, target);  // identity-mapped kernel
  EXPECT_EQ(event.specific.pf.access, KVMI_PAGE_ACCESS_W);
  EXPECT_TRUE(InKernelText(event.common.arch.regs.rip));
  Reply(event, KVMI_EVENT_ACTION_RETRY);
  auto line = WaitLine("^rootkit: attempt \\d+ ktext patch", from).second;
  EXPECT_NE(line.find(": blocked"), std::string::npos) << line;
  WaitLine("\\(unchanged\\)", from);

  event = WaitEventOf(KVMI_EVENT_PF);
  from = LineCount();
  Reply(event, KVMI_EVENT_ACTION_CONTINUE);  // the patch is written
  Event undo = WaitEventOf(KVMI_EVENT_PF);   // and so is the rootkit's undo
  EXPECT_EQ(undo.specific.pf.gpa, target);
  Reply(undo, KVMI_EVENT_ACTION_CONTINUE);
  line = WaitLine("^rootkit: attempt \\d+ ktext patch", from).second;
  EXPECT_NE(line.find(": PATCHED (getpid=0x1337)"), std::string::npos) << line;

  // Lifting the restriction merges the memslots back; the guest writes without events.
  Restrict(target & ~0xfffull, KVMI_PAGE_ACCESS_RWX);
  EXPECT_EQ(vmm_->backend().memslot_count(), 1u);
  from = LineCount();
  line = WaitLine("^rootkit: attempt \\d+ ktext patch", from).second;
  EXPECT_NE(line.find(": PATCHED"), std::string::npos) << line;
  EXPECT_TRUE(tool_->ExpectSilence(100ms));
}

TEST_F(KvmVmmTest, ReadOfUnmappedPageCustomInputRetryAndSingleStep) {
  Start("period_ms=20");
  const uint64_t marker = layout_["marker"];
  Enable(KVMI_EVENT_PF);
  Enable(KVMI_EVENT_SINGLESTEP);
  Restrict(marker, 0);  // no access at all: the page has no memslot

  // CONTINUE with custom input: the guest reads the tool's bytes.
  Event event = WaitEventOf(KVMI_EVENT_PF);
  size_t from = LineCount();
  EXPECT_EQ(event.specific.pf.gpa, marker);
  EXPECT_EQ(event.specific.pf.access, KVMI_PAGE_ACCESS_R);
  EventReply custom = MakeEventReply(event, KVMI_EVENT_ACTION_CONTINUE);
  const uint64_t fake = 0x1122334455667788ull;
  custom.specific.pf.ctx_addr = event.specific.pf.gva;
  custom.specific.pf.ctx_size = 8;
  std::memcpy(custom.specific.pf.ctx_data, &fake, 8);
  ASSERT_TRUE(tool_->ReplyEvent(custom));
  WaitLine("marker0=0x1122334455667788 ", from);

  // RETRY: the read does not happen (the instruction still retires, reading zeros).
  event = WaitEventOf(KVMI_EVENT_PF);
  from = LineCount();
  Reply(event, KVMI_EVENT_ACTION_RETRY);
  WaitLine("marker0=0x0 ", from);

  // RETRY + singlestep: the access is allowed for one instruction, then SINGLESTEP.
  event = WaitEventOf(KVMI_EVENT_PF);
  from = LineCount();
  const uint64_t fault_rip = event.common.arch.regs.rip;
  EventReply step = MakeEventReply(event, KVMI_EVENT_ACTION_RETRY);
  step.specific.pf.singlestep = 1;
  ASSERT_TRUE(tool_->ReplyEvent(step));
  Event stepped = WaitEventOf(KVMI_EVENT_SINGLESTEP);
  EXPECT_NE(stepped.common.arch.regs.rip, fault_rip);  // past the faulting instruction
  EXPECT_TRUE(InKernelText(stepped.common.arch.regs.rip));
  Reply(stepped, KVMI_EVENT_ACTION_CONTINUE);
  char expected[64];
  std::snprintf(expected, sizeof(expected), "marker0=%#llx ",
                static_cast<unsigned long long>(layout_["marker0"]));
  WaitLine(expected, from);
}

TEST_F(KvmVmmTest, PauseVcpuKicksTheRunningVcpu) {
  Start("period_ms=10");
  Enable(KVMI_EVENT_PAUSE_VCPU);
  ASSERT_EQ(Call(PauseVcpuRequest{0, false}), 0);
  Event event = WaitEventOf(KVMI_EVENT_PAUSE_VCPU);
  EXPECT_EQ(event.common.arch.regs.r15, layout_["r15"]);
  size_t paused_at = LineCount();
  std::this_thread::sleep_for(300ms);
  EXPECT_EQ(LineCount(), paused_at) << "the guest ran while its vCPU was paused";
  Reply(event, KVMI_EVENT_ACTION_CONTINUE);
  WaitLine("^round ", paused_at);
}

// The guest executes an INT3 (int3_site) every round. Where KVM cannot deliver it (this
// project's host, docs/KVM.md), the VMM does; with BREAKPOINT enabled the tool sees it first.
TEST_F(KvmVmmTest, BreakpointEventContinueReinjectsRetryReexecutes) {
  Start("int3=1 period_ms=20");
  const uint64_t site = layout_["int3_site"];
  ASSERT_TRUE(InKernelText(site));
  char trap_line[64];
  std::snprintf(trap_line, sizeof(trap_line), "^trap: #BP at rip=%#llx$",
                static_cast<unsigned long long>(site));
  // Not intercepted: the guest's own #BP handler runs, and the round goes on.
  size_t from = WaitLine(trap_line).first;
  WaitLine("^int3: done$", from);

  Enable(KVMI_EVENT_BREAKPOINT);
  // CONTINUE: the guest gets its #BP, with RIP past the INT3.
  Event event = WaitEventOf(KVMI_EVENT_BREAKPOINT);
  from = LineCount();
  EXPECT_EQ(event.specific.breakpoint.gpa, site);  // identity-mapped kernel
  EXPECT_EQ(event.specific.breakpoint.insn_len, 1);
  EXPECT_EQ(event.common.arch.regs.rip, site);
  EXPECT_EQ(event.common.arch.regs.r15, layout_["r15"]);
  Reply(event, KVMI_EVENT_ACTION_CONTINUE);
  WaitLine(trap_line, from);
  WaitLine("^int3: done$", from);

  // RETRY with the INT3 still there: the vCPU re-executes it, so the event comes again at once,
  // and the guest has printed nothing in between.
  event = WaitEventOf(KVMI_EVENT_BREAKPOINT);
  from = LineCount();
  Reply(event, KVMI_EVENT_ACTION_RETRY);
  event = WaitEventOf(KVMI_EVENT_BREAKPOINT);
  EXPECT_EQ(event.common.arch.regs.rip, site);
  EXPECT_EQ(LineCount(), from);
  // RETRY after the tool replaced the INT3 (with a NOP): the guest runs on without a #BP.
  const uint8_t nop = 0x90;
  WritePhysicalRequest write;
  write.gpa = site;
  write.size = 1;
  write.data = ByteView(&nop, 1);
  ASSERT_EQ(Call(write), 0);
  Reply(event, KVMI_EVENT_ACTION_RETRY);
  size_t done = WaitLine("^int3: done$", from).first;
  WaitLine("^round ", done);
  for (size_t i = from; i < done; ++i) {
    std::lock_guard<std::mutex> lock(mu_);
    EXPECT_EQ(lines_[i].find("trap: #BP"), std::string::npos) << lines_[i];
  }
  EXPECT_TRUE(tool_->ExpectSilence(100ms));
}

// INJECT_EXCEPTION while the vCPU already has an exception to deliver (the guest's #BP, after a
// BREAKPOINT answered CONTINUE): the tool's #GP is dropped and TRAP describes the #BP.
TEST_F(KvmVmmTest, InjectWhileTheGuestHasAnExceptionPendingSendsTrap) {
  Start("int3=1 period_ms=20");
  const uint64_t site = layout_["int3_site"];
  Enable(KVMI_EVENT_BREAKPOINT);
  Enable(KVMI_EVENT_TRAP);
  Event breakpoint = WaitEventOf(KVMI_EVENT_BREAKPOINT);
  ASSERT_EQ(breakpoint.common.arch.regs.rip, site);
  size_t from = LineCount();
  InjectExceptionRequest inject;
  inject.nr = 13;
  inject.has_error = true;
  inject.error_code = 0x2a;
  ASSERT_EQ(Call(inject), 0);
  Reply(breakpoint, KVMI_EVENT_ACTION_CONTINUE);

  Event trap = WaitEventOf(KVMI_EVENT_TRAP);
  EXPECT_EQ(trap.specific.trap.vector, 3u);
  EXPECT_EQ(trap.specific.trap.type, static_cast<uint32_t>(KVMI_TRAP_TYPE_SOFT_EXCEPTION));
  EXPECT_EQ(trap.specific.trap.error_code, 0u);
  EXPECT_EQ(trap.common.arch.regs.rip, site + 1);  // #BP is a trap: delivered past the INT3
  Reply(trap, KVMI_EVENT_ACTION_CONTINUE);

  // The guest got its #BP and never the tool's #GP.
  char trap_line[64];
  std::snprintf(trap_line, sizeof(trap_line), "^trap: #BP at rip=%#llx$",
                static_cast<unsigned long long>(site));
  WaitLine(trap_line, from);
  size_t round = WaitLine("^round ", from).first;
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (size_t i = from; i <= round; ++i) {
      EXPECT_EQ(lines_[i].find("unexpected vector"), std::string::npos) << lines_[i];
    }
  }
  EXPECT_FALSE(vmm_->guest_stopped()) << vmm_->stop_reason();
  // The request was dropped, not deferred: the next BREAKPOINT brings no #GP either.
  Reply(WaitEventOf(KVMI_EVENT_BREAKPOINT), KVMI_EVENT_ACTION_CONTINUE);
  WaitLine("^round ", round + 1);
  EXPECT_FALSE(vmm_->guest_stopped()) << vmm_->stop_reason();
}

// With execute enforcement, the first kernel text page (the syscall entry, LSTAR, and more)
// restricted to RW: each instruction fetched from it is a PF with access X, until lifted.
TEST_F(KvmVmmTest, FetchFromNonExecutablePageRetryContinueSingleStep) {
  Start("period_ms=20", 1, -1, /*enforce_execute=*/true);
  const uint64_t page = layout_["lstar"] & ~0xfffull;
  Enable(KVMI_EVENT_PF);
  Enable(KVMI_EVENT_SINGLESTEP);
  Restrict(page, KVMI_PAGE_ACCESS_R | KVMI_PAGE_ACCESS_W);

  // The next fetch from the page (the syscall entry or other kernel code there), at RIP.
  Event event = WaitEventOf(KVMI_EVENT_PF);
  const uint64_t first = event.common.arch.regs.rip;
  EXPECT_EQ(first & ~0xfffull, page);
  EXPECT_EQ(event.specific.pf.access, KVMI_PAGE_ACCESS_X);
  EXPECT_EQ(event.specific.pf.gpa, first);
  EXPECT_EQ(event.specific.pf.gva, first);  // identity-mapped kernel
  // RETRY: nothing executed; the same fetch faults again.
  Reply(event, KVMI_EVENT_ACTION_RETRY);
  event = WaitEventOf(KVMI_EVENT_PF);
  EXPECT_EQ(event.common.arch.regs.rip, first);
  // CONTINUE: that one instruction runs; the next fetch from the page faults in turn.
  Reply(event, KVMI_EVENT_ACTION_CONTINUE);
  event = WaitEventOf(KVMI_EVENT_PF);
  const uint64_t second = event.common.arch.regs.rip;
  EXPECT_NE(second, first);
  EXPECT_EQ(second & ~0xfffull, page);
  EXPECT_EQ(event.specific.pf.gpa, second);
  // RETRY + singlestep: it runs, then SINGLESTEP past it.
  EventReply step = MakeEventReply(event, KVMI_EVENT_ACTION_RETRY);
  step.specific.pf.singlestep = 1;
  ASSERT_TRUE(tool_->ReplyEvent(step));
  Event stepped = WaitEventOf(KVMI_EVENT_SINGLESTEP);
  EXPECT_NE(stepped.common.arch.regs.rip, second);
  Reply(stepped, KVMI_EVENT_ACTION_CONTINUE);
  event = WaitEventOf(KVMI_EVENT_PF);
  EXPECT_EQ(event.specific.pf.access, KVMI_PAGE_ACCESS_X);

  // Lifted while the vCPU waits: the page gets its slot back, and the guest runs on silently.
  Restrict(page, KVMI_PAGE_ACCESS_RWX);
  Reply(event, KVMI_EVENT_ACTION_CONTINUE);
  size_t from = LineCount();
  WaitLine("^round ", WaitLine("^round ", from).first + 1);
  EXPECT_EQ(vmm_->backend().memslot_count(), 1u);
  EXPECT_TRUE(tool_->ExpectSilence(100ms));
  EXPECT_FALSE(vmm_->guest_stopped()) << vmm_->stop_reason();
}

uint32_t GuestVcpuCount(ToolConnection* tool) {
  auto reply = tool->Call(GetGuestInfoRequest{});
  GuestInfoReply info;
  if (ToolConnection::ErrorOf(reply) != 0 ||
      !DecodeReplyData(ToolConnection::DataOf(*reply), &info).ok()) {
    return 0;
  }
  return info.vcpu_count;
}

// Two vCPUs at start (the second an AP the VMM starts on the kernel's tables), a third hot-added
// later: per-vCPU commands and events address each, and the hot-added one is announced.
TEST_F(KvmVmmTest, SecondVcpuAndAHotAddedOneAreIntrospectedOnTheirOwn) {
  Start("period_ms=20", /*vcpus=*/2, /*hotplug_vcpu_after_ms=*/2500);
  EXPECT_EQ(GuestVcpuCount(tool_.get()), 2u);
  EXPECT_EQ(Call(GetVcpuInfoRequest{2}), -KVM_EINVAL);  // not created yet
  WaitLine("^ap 1: tick 2$");
  // Enabled once vCPUs 0 and 1 are past their hook-time CREATE_VCPU jobs (a race the kernel has
  // too: those events would be sent if the tool enabled the event before), well before the
  // hot-add.
  ASSERT_EQ(Call(ControlVmEventsRequest{KVMI_EVENT_CREATE_VCPU, true}), 0);

  // vCPU 1's registers are its own (its stack, ap_main), with the kernel's page tables.
  GetRegistersRequest get;
  get.vcpu = 1;
  auto reply = tool_->Call(get);
  ASSERT_EQ(ToolConnection::ErrorOf(reply), 0);
  RegistersReply ap;
  ASSERT_TRUE(DecodeReplyData(ToolConnection::DataOf(*reply), 0, &ap).ok());
  get.vcpu = 0;
  reply = tool_->Call(get);
  ASSERT_EQ(ToolConnection::ErrorOf(reply), 0);
  RegistersReply bsp;
  ASSERT_TRUE(DecodeReplyData(ToolConnection::DataOf(*reply), 0, &bsp).ok());
  EXPECT_EQ(ap.mode, 8u);
  EXPECT_TRUE(InKernelText(ap.regs.rip)) << std::hex << ap.regs.rip;
  EXPECT_EQ(ap.regs.r15, layout_["r15"]);
  EXPECT_EQ(ap.sregs.cr3, layout_["cr3"]);
  EXPECT_NE(ap.regs.rsp >> 12, bsp.regs.rsp >> 12);

  // PAUSE_VCPU on vCPU 1 stops its ticks, not vCPU 0's rounds.
  Enable(KVMI_EVENT_PAUSE_VCPU);  // vCPU 0 (Enable's default) ...
  ControlEventsRequest enable1;
  enable1.vcpu = 1;
  enable1.event_id = KVMI_EVENT_PAUSE_VCPU;
  enable1.enable = true;
  ASSERT_EQ(Call(enable1), 0);  // ... and vCPU 1
  ASSERT_EQ(Call(PauseVcpuRequest{1, false}), 0);
  Event paused = WaitEventOf(KVMI_EVENT_PAUSE_VCPU);
  EXPECT_EQ(paused.vcpu(), 1);
  EXPECT_EQ(paused.common.arch.regs.r15, layout_["r15"]);
  size_t from = LineCount();
  WaitLine("^round ", from);
  size_t round = WaitLine("^round ", WaitLine("^round ", from).first + 1).first;
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (size_t i = from; i <= round; ++i) {
      EXPECT_EQ(lines_[i].find("ap 1: tick"), std::string::npos) << "vCPU 1 ran while paused";
    }
  }
  Reply(paused, KVMI_EVENT_ACTION_CONTINUE);
  WaitLine("^ap 1: tick ", round);

  // The hot-added vCPU: CREATE_VCPU when it first runs, then it is a vCPU like the others.
  Event created = WaitEventOf(KVMI_EVENT_CREATE_VCPU);
  EXPECT_EQ(created.vcpu(), 2);
  Reply(created, KVMI_EVENT_ACTION_CONTINUE);
  EXPECT_EQ(GuestVcpuCount(tool_.get()), 3u);
  WaitLine("^ap 2: tick 1$");
  EXPECT_EQ(Call(GetVcpuInfoRequest{2}), 0);
  get.vcpu = 2;
  reply = tool_->Call(get);
  ASSERT_EQ(ToolConnection::ErrorOf(reply), 0);
  RegistersReply hot;
  ASSERT_TRUE(DecodeReplyData(ToolConnection::DataOf(*reply), 0, &hot).ok());
  EXPECT_EQ(hot.sregs.cr3, layout_["cr3"]);
  EXPECT_EQ(hot.regs.r15, layout_["r15"]);
  EXPECT_FALSE(vmm_->guest_stopped()) << vmm_->stop_reason();
}

TEST_F(KvmVmmTest, InjectedExceptionReachesTheGuest) {
  Start("period_ms=10");
  InjectExceptionRequest inject;
  inject.nr = 13;
  inject.has_error = true;
  inject.error_code = 0x2a;
  ASSERT_EQ(Call(inject), 0);
  // The guest's handler reports any #GP but a refused WRMSR as unexpected, and halts.
  WaitLine("trap: unexpected vector 13 error 0x2a ");
  auto deadline = std::chrono::steady_clock::now() + 10s;
  while (!vmm_->guest_stopped() && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(10ms);
  }
  EXPECT_EQ(vmm_->stop_reason(), "guest halted");
}

}  // namespace
}  // namespace kvmi::kvm
