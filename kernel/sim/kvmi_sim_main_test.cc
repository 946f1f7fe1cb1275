// The kvmi-sim binary end to end: `--scenario=all-events` against a tool that enables everything
// raises each of the 12 v6 events within 5 s (TRAP, CREATE_VCPU and UNHOOK included), and at the
// end of `--duration` the simulator sends UNHOOK as QEMU does at shutdown.
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <array>
#include <bitset>
#include <chrono>
#include <cstring>
#include <future>
#include <set>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "kernel/abi/events.h"
#include "kernel/abi/messages.h"
#include "kernel/sim/sim_guest.h"
#include "kernel/sim/test_tool.h"

namespace kvmi::sim {
namespace {

using namespace std::chrono_literals;

constexpr char kSimBinary[] = "kernel/sim/kvmi-sim";
constexpr uint64_t kDataGpa = 0x200000;  // the all-events scenario's data pages
constexpr uint32_t kDataPages = 16;

// Starts kvmi-sim with `args`; returns its pid.
pid_t Spawn(const std::vector<std::string>& args) {
  std::vector<char*> argv;
  argv.push_back(const_cast<char*>(kSimBinary));
  for (const std::string& a : args) argv.push_back(const_cast<char*>(a.c_str()));
  argv.push_back(nullptr);
  pid_t pid = fork();
  if (pid == 0) {
    execv(kSimBinary, argv.data());
    _exit(127);
  }
  return pid;
}

// Waits for the child up to `timeout`; kills it after that. Returns the exit status or -1.
int Reap(pid_t pid, std::chrono::milliseconds timeout) {
  auto exited = std::async(std::launch::async, [pid] {
    int status = 0;
    return waitpid(pid, &status, 0) == pid && WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  });
  if (exited.wait_for(timeout) != std::future_status::ready) {
    kill(pid, SIGKILL);
    exited.wait();
    return -1;
  }
  return exited.get();
}

// The tool's side: enable every event the VM can raise on vCPU `v`.
void EnableVcpuEvents(ToolConnection* tool, uint16_t v) {
  for (uint16_t e : {KVMI_EVENT_CR, KVMI_EVENT_MSR, KVMI_EVENT_XSETBV, KVMI_EVENT_BREAKPOINT,
                     KVMI_EVENT_HYPERCALL, KVMI_EVENT_PF, KVMI_EVENT_TRAP, KVMI_EVENT_DESCRIPTOR,
                     KVMI_EVENT_PAUSE_VCPU, KVMI_EVENT_SINGLESTEP}) {
    ASSERT_EQ(ToolConnection::ErrorOf(tool->Call(ControlEventsRequest{v, e, true})), 0)
        << EventName(static_cast<uint8_t>(e)) << " on vCPU " << v;
  }
  for (uint32_t cr : {0u, 3u, 4u}) {
    ASSERT_EQ(ToolConnection::ErrorOf(tool->Call(ControlCrRequest{v, cr, true})), 0);
  }
  for (uint32_t msr : {0xc0000082u, 0x174u, 0x175u, 0x176u, 0xc0000081u}) {
    ASSERT_EQ(ToolConnection::ErrorOf(tool->Call(ControlMsrRequest{v, msr, true})), 0);
  }
}

TEST(KvmiSimMainTest, AllEventsScenarioRaisesAllTwelveEventsAndUnhooksAtTheEnd) {
  ToolListener listener;
  ASSERT_TRUE(listener.ok());
  pid_t pid = Spawn({"--connect=unix:" + listener.path(), "--scenario=all-events", "--vms=1",
                     "--vcpus=2", "--rate=200", "--duration=3", "--unhook_grace=10",
                     "--reconnect=0", "--log_level=warn"});
  ASSERT_GT(pid, 0);
  QemuHello hello;
  std::unique_ptr<ToolConnection> tool = listener.AcceptAndHandshake(10s, &hello);
  ASSERT_NE(tool, nullptr);
  const auto hooked_at = std::chrono::steady_clock::now();

  auto info = tool->Call(GetGuestInfoRequest{});
  GuestInfoReply guest;
  ASSERT_TRUE(DecodeReplyData(ToolConnection::DataOf(*info), &guest).ok());
  ASSERT_EQ(guest.vcpu_count, 2u);
  for (uint16_t e : {KVMI_EVENT_CREATE_VCPU, KVMI_EVENT_UNHOOK}) {
    ASSERT_EQ(ToolConnection::ErrorOf(tool->Call(ControlVmEventsRequest{e, true})), 0);
  }
  for (uint32_t v = 0; v < guest.vcpu_count; ++v) {
    EnableVcpuEvents(tool.get(), static_cast<uint16_t>(v));
  }
  SetPageAccessRequest restrict;
  for (uint32_t p = 0; p < kDataPages; ++p) {
    restrict.entries.push_back(PageAccess{kDataGpa + p * uint64_t{4096}, KVMI_PAGE_ACCESS_R});
  }
  ASSERT_EQ(ToolConnection::ErrorOf(tool->Call(restrict)), 0);
  ASSERT_EQ(ToolConnection::ErrorOf(tool->Call(PauseVcpuRequest{1, false})), 0);

  std::array<std::chrono::steady_clock::duration, KVMI_NUM_EVENTS> first_seen{};
  std::bitset<KVMI_NUM_EVENTS> seen;
  bool unhooked = false;
  while (!unhooked) {
    std::optional<Event> event = tool->WaitEvent(10s);
    ASSERT_TRUE(event) << "missing events: " << (~seen).to_string() << " (bit = event id)";
    const uint8_t id = event->id();
    ASSERT_LT(id, KVMI_NUM_EVENTS);
    if (!seen[id]) {
      seen.set(id);
      first_seen[id] = std::chrono::steady_clock::now() - hooked_at;
    }
    EventReply reply = MakeEventReply(*event, KVMI_EVENT_ACTION_CONTINUE);
    switch (id) {
      case KVMI_EVENT_UNHOOK:
        unhooked = true;  // the tool unhooks by closing the socket (below)
        continue;
      case KVMI_EVENT_CREATE_VCPU:
        // A hot-plugged vCPU: introspect it like the others.
        EnableVcpuEvents(tool.get(), event->vcpu());
        break;
      case KVMI_EVENT_CR:
        if (!seen[KVMI_EVENT_TRAP]) {
          // TRAP: inject #UD while the guest's own #GP (the refused CR write) is pending.
          InjectExceptionRequest inject;
          inject.vcpu = event->vcpu();
          inject.nr = 6;
          ASSERT_EQ(ToolConnection::ErrorOf(tool->Call(inject)), 0);
          reply.action = KVMI_EVENT_ACTION_RETRY;
        }
        break;
      case KVMI_EVENT_PF:
        if (!seen[KVMI_EVENT_SINGLESTEP]) {
          reply.action = KVMI_EVENT_ACTION_RETRY;
          reply.specific.pf.singlestep = 1;  // (code) RETRY + singlestep: SINGLESTEP follows
        }
        break;
      default:
        break;
    }
    ASSERT_TRUE(tool->ReplyEvent(reply));
  }
  tool->Close();
  EXPECT_EQ(Reap(pid, 30s), 0);
  for (int id = 0; id < KVMI_NUM_EVENTS; ++id) {
    EXPECT_TRUE(seen[id]) << EventName(static_cast<uint8_t>(id)) << " never raised";
    EXPECT_LT(first_seen[id], 5s) << EventName(static_cast<uint8_t>(id)) << " raised after "
                                  << std::chrono::duration<double>(first_seen[id]).count() << " s";
  }
}

// --scenario=processes: guests with real 4-level page tables whose CR3 writes switch between
// their processes' top-level tables, each holding the shared kernel half.
TEST(KvmiSimMainTest, ProcessesScenarioSwitchesBetweenRealAddressSpaces) {
  ToolListener listener;
  ASSERT_TRUE(listener.ok());
  pid_t pid =
      Spawn({"--connect=unix:" + listener.path(), "--scenario=processes", "--vms=1",
             "--processes=3", "--rate=200", "--duration=3", "--reconnect=0", "--unhook_grace=0"});
  ASSERT_GT(pid, 0);
  QemuHello hello;
  std::unique_ptr<ToolConnection> tool = listener.AcceptAndHandshake(10s, &hello);
  ASSERT_NE(tool, nullptr);
  ASSERT_EQ(ToolConnection::ErrorOf(tool->Call(ControlEventsRequest{0, KVMI_EVENT_CR, true})), 0);
  ASSERT_EQ(ToolConnection::ErrorOf(tool->Call(ControlCrRequest{0, 3, true})), 0);
  std::set<uint64_t> roots;
  for (int i = 0; i < 40 && roots.size() < 3; ++i) {
    std::optional<Event> event = tool->WaitEvent(10s);
    ASSERT_TRUE(event);
    if (event->id() == KVMI_EVENT_CR) {
      const uint64_t cr3 = event->specific.cr.new_value;
      EXPECT_GE(cr3, kPageTableArea);
      EXPECT_LT(cr3, kPageTableAreaEnd);
      EXPECT_TRUE(event->common.arch.sregs.cr4 & kCr4Pae);
      EXPECT_TRUE(event->common.arch.sregs.efer & kEferLma);
      roots.insert(cr3);
      // The top-level table's kernel half is filled in (the direct map's PML4E).
      ReadPhysicalRequest read{cr3 + 8 * ((kDirectMapGva >> 39) & 511), 8};
      auto reply = tool->Call(read);
      ASSERT_EQ(ToolConnection::ErrorOf(reply), 0);
      uint64_t pml4e = 0;
      ASSERT_EQ(ToolConnection::DataOf(*reply).size(), 8u);
      std::memcpy(&pml4e, ToolConnection::DataOf(*reply).data(), 8);
      EXPECT_TRUE(pml4e & kPtePresent) << std::hex << cr3;
      EXPECT_FALSE(pml4e & kPteUser);
    }
    ASSERT_TRUE(tool->ReplyEvent(MakeEventReply(*event, KVMI_EVENT_ACTION_CONTINUE)));
  }
  EXPECT_EQ(roots.size(), 3u);
  tool->Close();
  EXPECT_EQ(Reap(pid, 30s), 0);
}

TEST(KvmiSimMainTest, BadPagingFlagsAreRefused) {
  for (const std::vector<std::string>& args :
       {std::vector<std::string>{"--connect=unix:/nonexistent", "--paging=6level"},
        std::vector<std::string>{"--connect=unix:/nonexistent", "--paging=pae", "--processes=17"},
        std::vector<std::string>{"--connect=unix:/nonexistent", "--paging=4level",
                                 "--memory_mib=8"}}) {
    pid_t pid = Spawn(args);
    ASSERT_GT(pid, 0);
    EXPECT_EQ(Reap(pid, 30s), 2) << args[1];
  }
}

TEST(KvmiSimMainTest, UnknownScenarioIsRefusedWithTheList) {
  pid_t pid = Spawn({"--connect=unix:/nonexistent", "--scenario=everything"});
  ASSERT_GT(pid, 0);
  EXPECT_EQ(Reap(pid, 30s), 2);
}

}  // namespace
}  // namespace kvmi::sim
