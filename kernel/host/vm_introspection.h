// The KVMI v6 kernel subsystem for one VM (KVMI-V6-ABI.md §5-§8), independent of how the guest is
// implemented: state lives behind GuestBackend, the protocol lives here.
//
// Threads, as in the kernel:
//   * the receive thread runs RunSession(): reads messages, does the pre-dispatch checks (§5, in
//     order), answers VM commands at once and queues vCPU commands and event replies to the
//     target vCPU's job list;
//   * each vCPU thread (owned by the backend) calls RunJobs() before every guest entry and
//     WaitForWork() while idle, and calls the event hooks (OnCrWrite, OnPageFault, ...) from the
//     instructions it emulates. An event blocks its vCPU until the reply while the vCPU keeps
//     executing the commands queued to it.
// Session end (tool closes, socket error, protocol violation, Shutdown) restores everything the
// tool changed and releases blocked vCPUs as if CONTINUE had been received (§7.6).
#ifndef KVMID_KERNEL_HOST_VM_INTROSPECTION_H_
#define KVMID_KERNEL_HOST_VM_INTROSPECTION_H_

#include <array>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <random>
#include <string>
#include <unordered_map>
#include <vector>

#include "kernel/abi/events.h"
#include "kernel/abi/messages.h"
#include "kernel/host/guest_backend.h"
#include "kernel/host/stats.h"
#include "kernel/transport/unique_fd.h"

namespace kvmi::host {

using Clock = std::chrono::steady_clock;

// ---- what the event hooks tell the vCPU to do ---------------------------------------------------

// CR / MSR writes: whether the write happens, and with which value (CONTINUE may change it).
struct WriteOutcome {
  bool allowed = true;  // false: the guest write fails (#GP)
  uint64_t value = 0;
};

enum class BreakpointOutcome : uint8_t {
  kReinject,  // no event, or CONTINUE: the guest gets its #BP
  kRetry,     // RETRY (or an unsupported action): re-enter the guest, nothing injected
};

enum class DescriptorOutcome : uint8_t {
  kEmulate,  // no event, or CONTINUE
  kRetry,    // RETRY / unsupported action: back to the guest without emulating
};

struct PageFaultOutcome {
  enum Kind : uint8_t {
    kEmulate,     // no event, PF disabled, or CONTINUE: perform the access
    kRetry,       // RETRY (or unsupported action): re-enter the guest without the access
    kSingleStep,  // RETRY + singlestep: relax the access for one step, then SINGLESTEP (code)
  };
  Kind kind = kEmulate;
  // CONTINUE / single-step: reads inside [ctx_addr, ctx_addr + ctx_size) come from ctx_data.
  uint64_t ctx_addr = 0;
  uint32_t ctx_size = 0;
  std::array<uint8_t, KVMI_CTX_DATA_SIZE> ctx_data{};
  bool rep_complete = false;
};

// An exception or interrupt the guest's own path is injecting at the next entry (TRAP data).
struct GuestInjection {
  uint32_t vector = 0;
  uint32_t type = KVMI_TRAP_TYPE_HARD_EXCEPTION;  // KVMI_TRAP_TYPE_*
  uint32_t error_code = 0;
  uint64_t cr2 = 0;
};

// What INJECT_EXCEPTION asked for, as delivered to the guest.
struct ToolException {
  uint8_t vector = 0;
  bool has_error = false;
  uint32_t error_code = 0;
  uint64_t address = 0;  // CR2 for #PF
};

// Values of the KVM_INTROSPECTION_COMMAND / _EVENT ioctls (§8.1).
inline constexpr int32_t kAllIds = -1;

struct EngineOptions {
  std::string vm_name = "vm";  // for log lines
  // Test hook: called on the receive thread for every message before dispatch.
  std::function<void(const kvmi_msg_hdr&)> on_message;
};

class VmIntrospection {
 public:
  VmIntrospection(GuestBackend* backend, EngineOptions options);
  ~VmIntrospection();
  VmIntrospection(const VmIntrospection&) = delete;
  VmIntrospection& operator=(const VmIntrospection&) = delete;

  // ---- userspace (QEMU) side ----
  // KVM_INTROSPECTION_HOOK + receive loop on the calling thread, until the session ends. The
  // allow masks start empty (only the always-allowed commands pass) until SetCommandAllowed /
  // SetEventAllowed are called (from `after_hook`, which runs once the session is live, as QEMU
  // issues the ioctls right after HOOK). Returns why the session ended.
  std::string RunSession(UniqueFd socket, const std::function<void()>& after_hook = nullptr);
  // KVM_INTROSPECTION_COMMAND / _EVENT: 0, -EFAULT (not hooked), -EINVAL, -EPERM (§8.1).
  int SetCommandAllowed(int32_t id, bool allow);
  int SetEventAllowed(int32_t id, bool allow);
  // KVM_INTROSPECTION_UNHOOK(force_reset = 0): sends KVMI_EVENT_UNHOOK if enabled. 0 if sent,
  // -EFAULT if not hooked, -ENOENT if the event is not enabled.
  int RequestUnhook();
  // Ends the current session (VM destroy / QEMU detach) and wakes every waiter. Idempotent.
  void EndSession(const std::string& reason);
  bool hooked() const;
  // Blocks until no session is live or the deadline passes; true if not hooked.
  bool WaitUnhooked(Clock::time_point deadline);

  // ---- vCPU side (called on the vCPU's own thread) ----
  // Before guest entry: executes queued jobs, the CREATE_VCPU job, then one PAUSE_VCPU event per
  // pending pause request (low priority, §6.4).
  void RunJobs(uint16_t vcpu);
  // Idle vCPU (halted in KVM): returns when a job/pause is queued, Kick() is called or the
  // deadline passes. Does not run the jobs.
  void WaitForWork(uint16_t vcpu, Clock::time_point deadline);
  // Wakes WaitForWork (any thread).
  void Kick(uint16_t vcpu);
  // A vCPU created after the hook runs for the first time: CREATE_VCPU if enabled (§6.2).
  void OnVcpuFirstRun(uint16_t vcpu);

  WriteOutcome OnCrWrite(uint16_t vcpu, uint32_t cr, uint64_t old_value, uint64_t new_value);
  WriteOutcome OnMsrWrite(uint16_t vcpu, uint32_t msr, uint64_t old_value, uint64_t new_value);
  void OnXsetbv(uint16_t vcpu);
  BreakpointOutcome OnBreakpoint(uint16_t vcpu, uint64_t gpa, uint8_t insn_len);
  // VMCALL with the KVMI arguments (RAX=34, RDI=24, RSI=0): true if the event was sent (guest
  // RAX = 0), false otherwise (guest RAX = -KVM_ENOSYS).
  bool OnHypercall(uint16_t vcpu);
  DescriptorOutcome OnDescriptor(uint16_t vcpu, uint8_t descriptor, bool write);
  // A single-step requested by a PF reply completed.
  void OnSingleStep(uint16_t vcpu);

  // The tool's allowed access for the page of gpa (RWX when untracked or not hooked).
  uint8_t AllowedAccess(uint64_t gpa) const;
  // True if `access` (one KVMI_PAGE_ACCESS_* bit) at gpa passes the tool's restrictions,
  // including the SPP write bitmap for writes.
  bool AccessAllowed(uint64_t gpa, uint8_t access) const;
  // Called when AccessAllowed was false: sends PF if enabled on this vCPU.
  PageFaultOutcome OnPageFault(uint16_t vcpu, uint64_t gpa, uint64_t gva, uint8_t access);

  // At guest entry: the exception the tool asked for, if it can be injected now. When the guest
  // is already injecting `busy`, the tool's request is dropped and TRAP is sent (if enabled).
  std::optional<ToolException> TakeToolException(uint16_t vcpu,
                                                 const std::optional<GuestInjection>& busy);

  // Whether CR3 load exiting / an MSR's write interception is on (tests, backends).
  bool CrInterceptEnabled(uint16_t vcpu, uint32_t cr) const;
  bool MsrInterceptEnabled(uint16_t vcpu, uint32_t msr) const;
  bool EventEnabled(uint16_t vcpu, uint8_t event) const;
  uint32_t PendingPauses(uint16_t vcpu) const;

  const EngineStats& stats() const { return stats_; }
  const std::string& name() const { return options_.vm_name; }

 private:
  // Whether a command gets its reply. Decided on the receive thread when the command is
  // accepted, as v6's kvmi_msg_dispatch_vcpu_msg sets job_msg->reply_cb from cmd_reply_disabled
  // (§5.2): a vCPU command carries the decision in its Job, so a CONTROL_CMD_RESPONSE processed
  // after it cannot change whether it is answered.
  enum class ReplyMode : uint8_t {
    kAsNow,   // receive thread: the current setting (VM commands, pre-dispatch vCPU errors)
    kSend,    // replies were on when the command was accepted
    kDrop,    // replies were off when the command was accepted
    kAlways,  // sent even with replies disabled (pre-dispatch errors, PAUSE EPERM)
  };
  struct Job {
    kvmi_msg_hdr hdr{};
    std::vector<uint8_t> payload;
    ReplyMode reply = ReplyMode::kSend;  // vCPU commands: decided at receive time
  };
  struct VcpuState {
    std::condition_variable cv;
    std::deque<Job> jobs;
    bool kicked = false;
    bool create_vcpu_job = false;
    uint32_t pause_requests = 0;
    uint64_t event_mask = 0;                          // bit per event id (CONTROL_EVENTS)
    bool cr_selected[5] = {};                         // 0, 3, 4 used (CONTROL_CR)
    std::unordered_map<uint32_t, bool> msr_selected;  // CONTROL_MSR
    // The outstanding event (at most one).
    bool waiting = false;
    bool reply_ready = false;
    uint32_t expected_seq = 0;
    uint8_t pending_event = 0;
    EventReply reply;
    Clock::time_point sent_at;
    std::optional<kvm_regs> regs_after_reply;     // SET_REGISTERS during an event
    std::optional<ToolException> tool_exception;  // INJECT_EXCEPTION
    std::vector<uint8_t> event_message;           // vCPU thread only: reused encode buffer
  };

  // Receive side.
  enum class Verdict : uint8_t { kContinue, kClose };
  Verdict Dispatch(const kvmi_msg_hdr& hdr, ByteView payload);
  Verdict HandleVmCommand(const CommandInfo& info, const kvmi_msg_hdr& hdr, ByteView payload);
  Verdict HandlePauseVcpu(const kvmi_msg_hdr& hdr, ByteView payload);
  Verdict HandleReadPhysical(const kvmi_msg_hdr& hdr, ByteView payload);
  Verdict HandleWritePhysical(const kvmi_msg_hdr& hdr, ByteView payload);
  Verdict HandleSetPageAccess(const kvmi_msg_hdr& hdr, ByteView payload);
  Verdict HandleSetPageWriteBitmap(const kvmi_msg_hdr& hdr, ByteView payload);

  // vCPU side.
  void RunOneJob(uint16_t vcpu, Job& job);
  Verdict ExecuteVcpuCommand(uint16_t vcpu, const kvmi_msg_hdr& hdr, ByteView payload,
                             ReplyMode mode);
  Verdict HandleEventReply(uint16_t vcpu, const kvmi_msg_hdr& hdr, ByteView payload);
  // Sends the event and blocks until its reply (running jobs meanwhile). Returns the reply, or
  // nullopt if no session is live / the session ended while waiting (act as CONTINUE).
  std::optional<EventReply> SendEventAndWait(uint16_t vcpu, Event* event);
  void FillEventArch(uint16_t vcpu, kvmi_event* common);
  // Counts the reply and turns CRASH into GuestBackend::Crash().
  uint8_t ConsumeAction(const EventReply& reply);

  // Replies, sent or dropped as `mode` says (kAsNow: as replies_enabled_ says now, which is only
  // right on the receive thread).
  Verdict Reply(const kvmi_msg_hdr& hdr, int32_t err, ByteView data,
                ReplyMode mode = ReplyMode::kAsNow);
  template <typename ReplyData>
  Verdict ReplyWith(const kvmi_msg_hdr& hdr, const ReplyData& data,
                    ReplyMode mode = ReplyMode::kAsNow);
  bool Send(const std::vector<uint8_t>& message);

  void ResetIntrospectionStateLocked();
  bool SessionLive() const;        // mu_ held
  VcpuState* Vcpu(uint16_t vcpu);  // mu_ held; grows the table for hot-added vCPUs
  bool ApplyPageAccessLocked(uint64_t gpa, uint8_t access);

  GuestBackend* const backend_;
  const EngineOptions options_;
  EngineStats stats_;

  mutable std::mutex mu_;
  std::condition_variable session_cv_;
  bool hooked_ = false;
  bool ending_ = false;
  uint64_t session_id_ = 0;
  int socket_fd_ = -1;  // owned by RunSession; shut down (not closed) by EndSession
  std::string end_reason_;
  uint64_t command_mask_ = 0;  // bit per command id
  uint64_t event_allow_mask_ = 0;
  uint64_t vm_event_mask_ = 0;   // UNHOOK, CREATE_VCPU
  bool replies_enabled_ = true;  // written by the receive thread only (and session reset)
  uint32_t event_seq_ = 0;
  bool spp_enabled_ = false;
  std::unordered_map<uint64_t, uint8_t> page_access_;  // gfn -> rwx (absent = RWX)
  std::unordered_map<uint64_t, uint32_t> spp_bitmap_;  // gfn -> writable sub-pages
  std::deque<Clock::time_point> map_tokens_;           // outstanding GET_MAP_TOKEN tokens
  std::mt19937_64 token_rng_{std::random_device{}()};  // token bytes (mu_)
  std::vector<std::unique_ptr<VcpuState>> vcpus_;

  std::mutex send_mu_;  // one whole message per write, as the kernel's sendmsg
};

}  // namespace kvmi::host

#endif  // KVMID_KERNEL_HOST_VM_INTROSPECTION_H_
