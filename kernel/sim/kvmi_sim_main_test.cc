// The kvmi-sim binary end to end: `--scenario=all-events` against a tool that enables everything
// raises each of the 12 v6 events within 5 s (TRAP, CREATE_VCPU and UNHOOK included), and at the
// end of `--duration` the simulator sends UNHOOK as QEMU does at shutdown.
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <array>
#include <bitset>
#include <chrono>
#include <future>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "kernel/abi/events.h"
#include "kernel/abi/messages.h"
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
  for (uint16_t v = 0; v < guest.vcpu_count; ++v) EnableVcpuEvents(tool.get(), v);
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

TEST(KvmiSimMainTest, UnknownScenarioIsRefusedWithTheList) {
  pid_t pid = Spawn({"--connect=unix:/nonexistent", "--scenario=everything"});
  ASSERT_GT(pid, 0);
  EXPECT_EQ(Reap(pid, 30s), 2);
}

}  // namespace
}  // namespace kvmi::sim
