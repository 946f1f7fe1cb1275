#include "kernel/host/vm_introspection.h"

#include <errno.h>
#include <sys/socket.h>

#include <random>

#include "kernel/abi/framing.h"
#include "kernel/abi/kernel_v6_quirks.h"
#include "kernel/abi/protocol.h"
#include "kernel/transport/socket.h"
#include "spdlog/spdlog.h"

namespace kvmi::host {
namespace {

constexpr uint64_t Bit(unsigned n) { return n < 64 ? uint64_t{1} << n : 0; }

// GET_VERSION, CHECK_COMMAND, CHECK_EVENT: always in the command allow mask (§5.1, §8.1).
constexpr uint64_t kAlwaysAllowedCommands =
    Bit(KVMI_GET_VERSION) | Bit(KVMI_CHECK_COMMAND) | Bit(KVMI_CHECK_EVENT);

uint64_t KnownCommandMask() {
  uint64_t mask = 0;
  for (unsigned id = KVMI_FIRST_COMMAND; id < KVMI_NEXT_AVAILABLE_COMMAND; ++id) mask |= Bit(id);
  return mask;
}
constexpr uint64_t kKnownEventMask = Bit(KVMI_NUM_EVENTS) - 1;

constexpr uint64_t kPageShift = 12;
constexpr uint64_t kPageSize = uint64_t{1} << kPageShift;
constexpr uint32_t kSppSubPageSize = KVMI_PAGE_SIZE / KVMI_SPP_SUBPAGES;  // 128
constexpr uint32_t kSppAllWritable = 0xffffffffu;
// GET_MAP_TOKEN tokens expire after ~3 s when unused (§3.3).
constexpr auto kMapTokenLifetime = std::chrono::seconds(3);

}  // namespace

VmIntrospection::VmIntrospection(GuestBackend* backend, EngineOptions options)
    : backend_(backend), options_(std::move(options)) {
  std::lock_guard<std::mutex> lock(mu_);
  for (uint32_t i = 0; i < backend_->VcpuCount(); ++i) Vcpu(static_cast<uint16_t>(i));
}

VmIntrospection::~VmIntrospection() { EndSession("engine destroyed"); }

VmIntrospection::VcpuState* VmIntrospection::Vcpu(uint16_t vcpu) {
  while (vcpus_.size() <= vcpu) vcpus_.push_back(std::make_unique<VcpuState>());
  return vcpus_[vcpu].get();
}

bool VmIntrospection::SessionLive() const { return hooked_ && !ending_; }

bool VmIntrospection::hooked() const {
  std::lock_guard<std::mutex> lock(mu_);
  return hooked_;
}

bool VmIntrospection::WaitUnhooked(Clock::time_point deadline) {
  std::unique_lock<std::mutex> lock(mu_);
  return session_cv_.wait_until(lock, deadline, [&] { return !hooked_; });
}

// ---- session lifetime ---------------------------------------------------------------------------

void VmIntrospection::ResetIntrospectionStateLocked() {
  // §7.6: "removes all page-access restrictions, unregisters page tracking". SPP stays enabled:
  // in KVM it is a per-VM hardware mode that CONTROL_SPP cannot turn off; only the bitmaps go.
  for (const auto& [gfn, access] : page_access_) {
    backend_->OnPageAccessChanged(gfn, KVMI_PAGE_ACCESS_RWX);
  }
  page_access_.clear();
  spp_bitmap_.clear();
  map_tokens_.clear();
  for (size_t i = 0; i < vcpus_.size(); ++i) {
    VcpuState& s = *vcpus_[i];
    auto index = static_cast<uint16_t>(i);
    if (s.event_mask & Bit(KVMI_EVENT_BREAKPOINT))
      backend_->SetBreakpointInterception(index, false);
    if (s.event_mask & Bit(KVMI_EVENT_DESCRIPTOR))
      backend_->SetDescriptorInterception(index, false);
    if (s.cr_selected[3]) backend_->SetCr3LoadExiting(index, false);
    for (const auto& [msr, on] : s.msr_selected) {
      if (on) backend_->SetMsrWriteInterception(index, msr, false);
    }
    s.jobs.clear();
    s.create_vcpu_job = false;
    s.pause_requests = 0;
    s.event_mask = 0;
    for (bool& c : s.cr_selected) c = false;
    s.msr_selected.clear();
    s.waiting = false;
    s.reply_ready = false;
    s.regs_after_reply.reset();
    s.tool_exception.reset();
    s.cv.notify_all();
  }
  vm_event_mask_ = 0;
  command_mask_ = kAlwaysAllowedCommands;  // §7.7 defaults after hook
  event_allow_mask_ = 0;
  replies_enabled_ = true;
}

std::string VmIntrospection::RunSession(UniqueFd socket, const std::function<void()>& after_hook) {
  {
    std::lock_guard<std::mutex> send_lock(send_mu_);
    std::lock_guard<std::mutex> lock(mu_);
    ResetIntrospectionStateLocked();
    hooked_ = true;
    ending_ = false;
    end_reason_.clear();
    ++session_id_;
    socket_fd_ = socket.get();
    event_seq_ = 0;  // per-session counter, pre-incremented: the first event has seq 1 (§1)
    // §6.2: a CREATE_VCPU job for every existing vCPU, sent only if the event is enabled when
    // the vCPU gets to it (normally too early).
    for (uint32_t i = 0; i < backend_->VcpuCount(); ++i) {
      VcpuState* s = Vcpu(static_cast<uint16_t>(i));
      s->create_vcpu_job = true;
      s->kicked = true;
      s->cv.notify_all();
      backend_->KickVcpu(static_cast<uint16_t>(i));
    }
  }
  stats_.sessions.fetch_add(1, std::memory_order_relaxed);
  spdlog::info("[{}] introspection hooked", name());
  if (after_hook) after_hook();

  MessageFramer framer(kMaxCommandPayload);
  std::string reason;
  for (;;) {
    Frame frame;
    DecodeStatus status;
    MessageFramer::Result result;
    bool closed = false;
    while ((result = framer.Next(&frame, &status)) == MessageFramer::Result::kMessage) {
      if (Dispatch(frame.hdr, frame.payload) == Verdict::kClose) {
        closed = true;
        break;
      }
    }
    if (closed) break;
    if (result == MessageFramer::Result::kError) {
      // §1: hdr.size > 4088 -> CLOSE, checked on the header alone.
      stats_.sessions_closed_by_violation.fetch_add(1, std::memory_order_relaxed);
      EndSession("protocol violation: " + status.ToString());
      break;
    }
    constexpr size_t kReadChunk = 16 * 1024;
    size_t got = 0;
    IoResult io = ReadSome(socket.get(), framer.WritableTail(kReadChunk), kReadChunk, &got);
    if (!io.ok()) {
      // A short read / EOF in the middle of a message ends the session like any other EOF.
      EndSession(framer.buffered() > 0 ? "tool closed in the middle of a message"
                                       : "tool closed the socket (" + io.ToString() + ")");
      break;
    }
    framer.Commit(got);
  }
  // Close the socket only once no vCPU can be writing to it (writers hold send_mu_).
  {
    std::lock_guard<std::mutex> send_lock(send_mu_);
    std::lock_guard<std::mutex> lock(mu_);
    socket_fd_ = -1;
    socket.Reset();
    hooked_ = false;
    ending_ = false;
    reason = end_reason_;
    session_cv_.notify_all();
  }
  return reason;
}

void VmIntrospection::EndSession(const std::string& reason) {
  std::lock_guard<std::mutex> lock(mu_);
  if (!hooked_ || ending_) return;
  ending_ = true;
  end_reason_ = reason;
  // SHUT_RDWR wakes the receive thread and any vCPU blocked in a write; the fd is closed later
  // by RunSession, when nobody uses it any more.
  if (socket_fd_ >= 0) ::shutdown(socket_fd_, SHUT_RDWR);
  // §7.6: drop queued jobs, restore page access and intercepts, let blocked vCPUs continue as if
  // CONTINUE had been received (their waits see ending_).
  ResetIntrospectionStateLocked();
  session_cv_.notify_all();
  spdlog::info("[{}] introspection session ended: {}", name(), reason);
}

int VmIntrospection::SetCommandAllowed(int32_t id, bool allow) {
  std::lock_guard<std::mutex> lock(mu_);
  if (!hooked_) return -EFAULT;
  if (id == kAllIds) {
    // With id = -1 the always-allowed commands are silently kept (§5.1).
    command_mask_ = allow ? KnownCommandMask() : kAlwaysAllowedCommands;
    return 0;
  }
  if (id < kAllIds || id > 0xffff || !IsKnownCommand(static_cast<uint16_t>(id))) return -EINVAL;
  if (!allow && (Bit(static_cast<unsigned>(id)) & kAlwaysAllowedCommands)) return -EPERM;
  if (allow) {
    command_mask_ |= Bit(static_cast<unsigned>(id));
  } else {
    command_mask_ &= ~Bit(static_cast<unsigned>(id));
  }
  return 0;
}

int VmIntrospection::SetEventAllowed(int32_t id, bool allow) {
  std::lock_guard<std::mutex> lock(mu_);
  if (!hooked_) return -EFAULT;
  if (id == kAllIds) {
    event_allow_mask_ = allow ? kKnownEventMask : 0;
    return 0;
  }
  if (id < 0 || id >= KVMI_NUM_EVENTS) return -EINVAL;
  if (allow) {
    event_allow_mask_ |= Bit(static_cast<unsigned>(id));
  } else {
    event_allow_mask_ &= ~Bit(static_cast<unsigned>(id));
  }
  return 0;
}

int VmIntrospection::RequestUnhook() {
  Event event;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!SessionLive()) return -EFAULT;
    if (!(vm_event_mask_ & Bit(KVMI_EVENT_UNHOOK))) return -ENOENT;
    // Shares the per-VM seq counter with the vCPU events (§1); vcpu 0, arch all zero (§6.1).
    event.seq = ++event_seq_;
  }
  event.common.event = KVMI_EVENT_UNHOOK;
  std::vector<uint8_t> message;
  EncodeEvent(event, &message);
  if (!Send(message)) return -EFAULT;
  stats_.events_sent[KVMI_EVENT_UNHOOK].fetch_add(1, std::memory_order_relaxed);
  spdlog::info("[{}] sent KVMI_EVENT_UNHOOK (seq {})", name(), event.seq);
  return 0;
}

// ---- sending ------------------------------------------------------------------------------------

bool VmIntrospection::Send(const std::vector<uint8_t>& message) {
  std::lock_guard<std::mutex> send_lock(send_mu_);
  int fd;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!SessionLive()) return false;
    fd = socket_fd_;
  }
  // One whole message per write, under send_mu_, as the kernel's one sendmsg() per message.
  IoResult io = WriteAll(fd, message.data(), message.size());
  if (!io.ok()) {
    spdlog::warn("[{}] write to the tool failed: {}", name(), io.ToString());
    return false;
  }
  return true;
}

VmIntrospection::Verdict VmIntrospection::Reply(const kvmi_msg_hdr& hdr, int32_t err, ByteView data,
                                                ReplyMode mode) {
  bool enabled = mode == ReplyMode::kSend || mode == ReplyMode::kAlways;
  if (mode == ReplyMode::kAsNow) {
    std::lock_guard<std::mutex> lock(mu_);
    enabled = replies_enabled_;
  }
  if (!enabled) {
    // §5.2: with replies disabled a successful reply that carries data is fatal; an error is
    // dropped (the kernel only logs it).
    if (err == 0 && !data.empty()) {
      stats_.sessions_closed_by_violation.fetch_add(1, std::memory_order_relaxed);
      EndSession(std::string("protocol violation: ") + CommandName(hdr.id) +
                 " needs a reply with data while command replies are disabled");
      return Verdict::kClose;
    }
    if (err != 0) {
      spdlog::debug("[{}] {} seq {} failed with {} (reply suppressed)", name(), CommandName(hdr.id),
                    hdr.seq, ErrorName(err));
    }
    return Verdict::kContinue;
  }
  std::vector<uint8_t> message;
  EncodeReply(hdr.id, hdr.seq, err, data, &message);
  if (!Send(message)) {
    EndSession("write to the tool failed");
    return Verdict::kClose;
  }
  return Verdict::kContinue;
}

template <typename ReplyData>
VmIntrospection::Verdict VmIntrospection::ReplyWith(const kvmi_msg_hdr& hdr, const ReplyData& data,
                                                    ReplyMode mode) {
  std::vector<uint8_t> bytes;
  ByteWriter writer(&bytes);
  EncodeReplyData(data, writer);
  return Reply(hdr, 0, ByteView(bytes), mode);
}

// ---- receive thread -----------------------------------------------------------------------------

VmIntrospection::Verdict VmIntrospection::Dispatch(const kvmi_msg_hdr& hdr, ByteView payload) {
  if (options_.on_message) options_.on_message(hdr);
  stats_.commands.fetch_add(1, std::memory_order_relaxed);
  const CommandInfo* info = nullptr;
  if (hdr.id != KVMI_EVENT_REPLY) {
    info = FindCommand(hdr.id);
    // Pre-dispatch (2): unknown or handler-less id -> payload discarded, -KVM_EOPNOTSUPP, even
    // with replies disabled. KVMI_EVENT (1) from the tool and KVMI_CONTROL_VE (12) land here.
    if (info == nullptr || info->scope == CommandScope::kUnsupported) {
      return Reply(hdr, -KVM_EOPNOTSUPP, {}, ReplyMode::kAlways);
    }
    // Pre-dispatch (3): not allowed by userspace -> -KVM_EPERM, even with replies disabled.
    bool allowed;
    {
      std::lock_guard<std::mutex> lock(mu_);
      allowed = (command_mask_ & Bit(hdr.id)) != 0;
    }
    if (!allowed) return Reply(hdr, -KVM_EPERM, {}, ReplyMode::kAlways);
    if (info->scope == CommandScope::kVm) return HandleVmCommand(*info, hdr, payload);
    if (info->scope == CommandScope::kPauseVcpu) return HandlePauseVcpu(hdr, payload);
  }
  // Generic vCPU dispatch (vCPU commands and event replies, §5 and §6 "Reply validation").
  uint16_t vcpu = 0;
  DecodeStatus status = DecodeVcpuHdr(payload, &vcpu);
  if (!status.ok()) {
    // (code) non-zero vcpu-hdr padding -> CLOSE (the doc says -KVM_EINVAL).
    stats_.sessions_closed_by_violation.fetch_add(1, std::memory_order_relaxed);
    EndSession("protocol violation: " + status.ToString());
    return Verdict::kClose;
  }
  if (vcpu >= backend_->VcpuCount()) return Reply(hdr, -KVM_EINVAL, {});
  if (!backend_->VcpuInitialized(vcpu)) return Reply(hdr, -KVM_EAGAIN, {});
  // Copy the payload before taking mu_: the vCPUs of this VM contend for it.
  Job job{hdr, payload.ToVector()};
  VcpuState* s;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!SessionLive()) return Verdict::kClose;
    // §5.2 (code): the reply is decided here, when the command is accepted, not when the vCPU
    // runs it -- a later CONTROL_CMD_RESPONSE in the same batch must not change it.
    job.reply = replies_enabled_ ? ReplyMode::kSend : ReplyMode::kDrop;
    s = Vcpu(vcpu);
    s->jobs.push_back(std::move(job));
  }
  // The kick, after unlocking: a vCPU woken while we still held mu_ would run at once (wake-up
  // preemption on a busy core), block on mu_ and cost two more context switches. Only the vCPU's
  // own thread waits on its cv, and VcpuState is never freed, so this is safe without mu_.
  s->cv.notify_one();
  backend_->KickVcpu(vcpu);
  return Verdict::kContinue;
}

VmIntrospection::Verdict VmIntrospection::HandleVmCommand(const CommandInfo& info,
                                                          const kvmi_msg_hdr& hdr,
                                                          ByteView payload) {
  constexpr SizeRule kRule = SizeRule::kKernelZeroFill;  // fixed-size requests: zero-filled (code)
  switch (hdr.id) {
    case KVMI_GET_VERSION:
      return ReplyWith(hdr, GetVersionReply{KVMI_VERSION});

    case KVMI_CHECK_COMMAND: {
      CheckCommandRequest req;
      if (!DecodePayload(payload, &req, kRule).ok()) return Reply(hdr, -KVM_EINVAL, {});
      // (code) only the allow mask is tested, not whether a handler exists (CONTROL_VE -> 0).
      bool allowed;
      {
        std::lock_guard<std::mutex> lock(mu_);
        allowed = IsKnownCommand(req.id) && (command_mask_ & Bit(req.id)) != 0;
      }
      return Reply(hdr, allowed ? 0 : -KVM_EPERM, {});
    }
    case KVMI_CHECK_EVENT: {
      CheckEventRequest req;
      if (!DecodePayload(payload, &req, kRule).ok()) return Reply(hdr, -KVM_EINVAL, {});
      bool allowed;
      {
        std::lock_guard<std::mutex> lock(mu_);
        allowed = req.id < KVMI_NUM_EVENTS && (event_allow_mask_ & Bit(req.id));
      }
      return Reply(hdr, allowed ? 0 : -KVM_EPERM, {});
    }
    case KVMI_GET_GUEST_INFO:
      return ReplyWith(hdr, GuestInfoReply{backend_->VcpuCount()});

    case KVMI_CONTROL_VM_EVENTS: {
      ControlVmEventsRequest req;
      if (!DecodePayload(payload, &req, kRule).ok()) return Reply(hdr, -KVM_EINVAL, {});
      if (req.event_id != KVMI_EVENT_UNHOOK && req.event_id != KVMI_EVENT_CREATE_VCPU) {
        return Reply(hdr, -KVM_EINVAL, {});
      }
      int32_t err = 0;
      {
        std::lock_guard<std::mutex> lock(mu_);
        if (!(event_allow_mask_ & Bit(req.event_id))) {
          err = -KVM_EPERM;
        } else if (req.enable) {
          vm_event_mask_ |= Bit(req.event_id);
        } else {
          vm_event_mask_ &= ~Bit(req.event_id);
        }
      }
      return Reply(hdr, err, {});
    }
    case KVMI_READ_PHYSICAL:
      return HandleReadPhysical(hdr, payload);
    case KVMI_WRITE_PHYSICAL:
      return HandleWritePhysical(hdr, payload);

    case KVMI_GET_PAGE_ACCESS: {
      GetPageAccessRequest req;
      if (!DecodePayload(payload, &req, kRule).ok()) return Reply(hdr, -KVM_EINVAL, {});
      if (req.view != 0) return Reply(hdr, -KVM_EOPNOTSUPP, {});
      // 8 + count <= 4096 always holds for count <= 510, so -KVM_ENOMEM cannot happen here.
      PageAccessReply reply;
      reply.access.reserve(req.gpas.size());
      for (uint64_t gpa : req.gpas) reply.access.push_back(AllowedAccess(gpa));
      return ReplyWith(hdr, reply);
    }
    case KVMI_SET_PAGE_ACCESS:
      return HandleSetPageAccess(hdr, payload);

    case KVMI_GET_MAP_TOKEN: {
      MapTokenReply reply;
      int32_t err = 0;
      {
        std::lock_guard<std::mutex> lock(mu_);
        auto now = Clock::now();
        while (!map_tokens_.empty() && now - map_tokens_.front() > kMapTokenLifetime) {
          map_tokens_.pop_front();
        }
        // The simulator has no KVM_HC_MEM_MAP, so tokens are never consumed: they only expire.
        // (Reply() takes mu_, so the error is decided here and sent below.)
        if (map_tokens_.size() >= KVMI_MEM_MAX_TOKENS) {
          err = -KVM_EAGAIN;
        } else {
          map_tokens_.push_back(now);
          for (auto& word : reply.token.token) word = token_rng_();
        }
      }
      return err != 0 ? Reply(hdr, err, {}) : ReplyWith(hdr, reply);
    }
    case KVMI_CONTROL_SPP: {
      ControlSppRequest req;
      if (!DecodePayload(payload, &req, kRule).ok()) return Reply(hdr, -KVM_EINVAL, {});
      // enable == 0 is always -KVM_EOPNOTSUPP: SPP cannot be turned off once on (§5.23).
      if (!req.enable || !backend_->SppSupported()) return Reply(hdr, -KVM_EOPNOTSUPP, {});
      {
        std::lock_guard<std::mutex> lock(mu_);
        spp_enabled_ = true;
      }
      return Reply(hdr, 0, {});
    }
    case KVMI_GET_PAGE_WRITE_BITMAP: {
      GetPageWriteBitmapRequest req;
      if (!DecodePayload(payload, &req, kRule).ok()) return Reply(hdr, -KVM_EINVAL, {});
      if (req.view != 0) return Reply(hdr, -KVM_EOPNOTSUPP, {});
      PageWriteBitmapReply reply;
      bool spp_enabled;
      {
        std::lock_guard<std::mutex> lock(mu_);
        spp_enabled = spp_enabled_;
        for (uint64_t gpa : req.gpas) {
          auto it = spp_bitmap_.find(gpa >> kPageShift);
          reply.bitmaps.push_back(it == spp_bitmap_.end() ? 0 : it->second);  // default 0
        }
      }
      if (!spp_enabled) return Reply(hdr, -KVM_EOPNOTSUPP, {});
      return ReplyWith(hdr, reply);
    }
    case KVMI_SET_PAGE_WRITE_BITMAP:
      return HandleSetPageWriteBitmap(hdr, payload);

    case KVMI_CONTROL_CMD_RESPONSE: {
      ControlCmdResponseRequest req;
      if (!DecodePayload(payload, &req, kRule).ok()) {
        // (code) the handler returns an error instead of replying: CLOSE.
        stats_.sessions_closed_by_violation.fetch_add(1, std::memory_order_relaxed);
        EndSession("protocol violation: KVMI_CONTROL_CMD_RESPONSE with non-zero padding");
        return Verdict::kClose;
      }
      if (req.now) {
        // now == 1: the new state already applies to this command's own reply.
        {
          std::lock_guard<std::mutex> lock(mu_);
          replies_enabled_ = req.enable;
        }
        return Reply(hdr, 0, {});
      }
      Verdict verdict = Reply(hdr, 0, {});  // answered under the old state
      std::lock_guard<std::mutex> lock(mu_);
      replies_enabled_ = req.enable;
      return verdict;
    }
    default:
      spdlog::error("[{}] no VM handler for {}", name(), info.name);
      return Reply(hdr, -KVM_EOPNOTSUPP, {});
  }
}

VmIntrospection::Verdict VmIntrospection::HandlePauseVcpu(const kvmi_msg_hdr& hdr,
                                                          ByteView payload) {
  // (code, v6 as posted) the handler reads the vcpu hdr and kvmi_pause_vcpu from the same bytes:
  // wait = low byte of the index, any vCPU >= 256 fails the "padding" check, and the documented
  // second 8 bytes are ignored (§5.6). This handler checks the vcpu hdr itself, so padding is a
  // replied -KVM_EINVAL rather than the generic CLOSE. Check order as in the code: pause-struct
  // padding, vcpu-hdr padding, event allowed, vcpu index, pause counter.
  PauseVcpuAsV6Kernel req = DecodePauseVcpuAsV6Kernel(payload);
  if (!req.pause_padding_ok || !req.vcpu_hdr_padding_ok) return Reply(hdr, -KVM_EINVAL, {});
  bool allowed;
  {
    std::lock_guard<std::mutex> lock(mu_);
    allowed = (event_allow_mask_ & Bit(KVMI_EVENT_PAUSE_VCPU)) != 0;
  }
  // -KVM_EPERM for a disallowed pause event is replied even with replies disabled (§5.2).
  if (!allowed) return Reply(hdr, -KVM_EPERM, {}, ReplyMode::kAlways);
  // (code) no -KVM_EAGAIN check for uninitialised vCPUs in this handler.
  if (req.vcpu >= backend_->VcpuCount()) return Reply(hdr, -KVM_EINVAL, {});
  int32_t err = 0;
  {
    std::lock_guard<std::mutex> lock(mu_);
    VcpuState* s = Vcpu(req.vcpu);
    if (s->pause_requests > KVMI_MAX_PAUSE_REQUESTS) {
      err = -KVM_EBUSY;
    } else {
      ++s->pause_requests;
      // wait == 1 means "kick and wait for the IPI acknowledgement"; simulated vCPUs take the
      // kick through their condition variable at once, a real vCPU is forced out of KVM_RUN
      // (KickVcpu), so there is nothing to wait for.
      s->kicked = true;
      s->cv.notify_all();
      backend_->KickVcpu(req.vcpu);
    }
  }
  return Reply(hdr, err, {});
}

VmIntrospection::Verdict VmIntrospection::HandleReadPhysical(const kvmi_msg_hdr& hdr,
                                                             ByteView payload) {
  ReadPhysicalRequest req;
  DecodePayload(payload, &req, SizeRule::kKernelZeroFill);  // fixed size: cannot fail
  // (code) size 0, > 4096 or crossing a page: the handler fails without replying -> CLOSE.
  if (req.size == 0 || req.size > kMaxReadPhysical ||
      (req.gpa & (kPageSize - 1)) + req.size > kPageSize) {
    stats_.sessions_closed_by_violation.fetch_add(1, std::memory_order_relaxed);
    EndSession("protocol violation: KVMI_READ_PHYSICAL size " + std::to_string(req.size) +
               " at gpa " + std::to_string(req.gpa) + " is empty, too big or crosses a page");
    return Verdict::kClose;
  }
  std::vector<uint8_t> data(static_cast<size_t>(req.size));
  if (!backend_->ReadPhysical(req.gpa, data.data(), data.size())) {
    return Reply(hdr, -KVM_EINVAL, {});
  }
  return ReplyWith(hdr, ReadPhysicalReply{ByteView(data)});
}

VmIntrospection::Verdict VmIntrospection::HandleWritePhysical(const kvmi_msg_hdr& hdr,
                                                              ByteView payload) {
  WritePhysicalRequest req;
  DecodeStatus status = DecodePayload(payload, &req, SizeRule::kKernelZeroFill);
  // (code) hdr.size < 16 + size, or a bad size/page crossing: CLOSE.
  if (!status.ok() || req.size == 0 || req.size > kMaxReadPhysical ||
      (req.gpa & (kPageSize - 1)) + req.size > kPageSize) {
    stats_.sessions_closed_by_violation.fetch_add(1, std::memory_order_relaxed);
    EndSession("protocol violation: KVMI_WRITE_PHYSICAL size " + std::to_string(req.size) +
               (status.ok() ? " is empty, too big or crosses a page" : ": " + status.ToString()));
    return Verdict::kClose;
  }
  if (!backend_->WritePhysical(req.gpa, req.data.data(), static_cast<size_t>(req.size))) {
    return Reply(hdr, -KVM_EINVAL, {});
  }
  return Reply(hdr, 0, {});
}

bool VmIntrospection::ApplyPageAccessLocked(uint64_t gpa, uint8_t access) {
  if (!backend_->IsGuestPhysical(gpa)) return false;
  uint64_t gfn = gpa >> kPageShift;
  if (access == KVMI_PAGE_ACCESS_RWX) {
    // Setting rwx forgets the page (§5.20).
    if (page_access_.erase(gfn) == 0) return true;
  } else {
    auto [it, inserted] = page_access_.emplace(gfn, access);
    if (!inserted && it->second == access) return true;
    it->second = access;
  }
  backend_->OnPageAccessChanged(gfn, access);
  return true;
}

VmIntrospection::Verdict VmIntrospection::HandleSetPageAccess(const kvmi_msg_hdr& hdr,
                                                              ByteView payload) {
  SetPageAccessRequest req;
  if (!DecodePayload(payload, &req, SizeRule::kKernelZeroFill).ok()) {
    return Reply(hdr, -KVM_EINVAL, {});
  }
  if (req.view != 0) return Reply(hdr, -KVM_EOPNOTSUPP, {});
  int32_t err = 0;
  {
    std::lock_guard<std::mutex> lock(mu_);
    // (code) the loop does not stop at a bad entry: every entry is tried and the reply carries
    // the result of the *last* one (the doc says it stops at the first failure).
    for (const PageAccess& entry : req.entries) {
      if (!entry.padding_ok || (entry.access & ~KVMI_PAGE_ACCESS_RWX) != 0) {
        err = -KVM_EINVAL;
      } else {
        err = ApplyPageAccessLocked(entry.gpa, entry.access) ? 0 : -KVM_EINVAL;
      }
    }
    for (auto& s : vcpus_) s->cv.notify_all();
  }
  return Reply(hdr, err, {});
}

VmIntrospection::Verdict VmIntrospection::HandleSetPageWriteBitmap(const kvmi_msg_hdr& hdr,
                                                                   ByteView payload) {
  SetPageWriteBitmapRequest req;
  // (code) entry padding is not checked by this command: the decoder records it and we ignore it.
  if (!DecodePayload(payload, &req, SizeRule::kKernelZeroFill).ok()) {
    return Reply(hdr, -KVM_EINVAL, {});
  }
  int32_t err = 0;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!spp_enabled_ || req.view != 0) {
      err = -KVM_EOPNOTSUPP;
    } else {
      for (const PageWriteBitmap& entry : req.entries) {  // stops at the first error (code)
        if (!backend_->IsGuestPhysical(entry.gpa)) {
          err = -KVM_EINVAL;
          break;
        }
        uint64_t gfn = entry.gpa >> kPageShift;
        auto it = page_access_.find(gfn);
        uint8_t access = it == page_access_.end() ? KVMI_PAGE_ACCESS_RWX : it->second;
        // All-ones: the whole page is writable (W added); anything else write-protects the page
        // except the sub-pages whose bit is set.
        if (entry.bitmap == kSppAllWritable) {
          spp_bitmap_.erase(gfn);
          access |= KVMI_PAGE_ACCESS_W;
        } else {
          spp_bitmap_[gfn] = entry.bitmap;
          access &= static_cast<uint8_t>(~KVMI_PAGE_ACCESS_W);
        }
        ApplyPageAccessLocked(entry.gpa, access);
      }
    }
  }
  return Reply(hdr, err, {});
}

// ---- page access checks (vCPU threads)
// -----------------------------------------------------------

uint8_t VmIntrospection::AllowedAccess(uint64_t gpa) const {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = page_access_.find(gpa >> kPageShift);
  return it == page_access_.end() ? KVMI_PAGE_ACCESS_RWX : it->second;
}

bool VmIntrospection::AccessAllowed(uint64_t gpa, uint8_t access) const {
  std::lock_guard<std::mutex> lock(mu_);
  if (page_access_.empty()) return true;
  uint64_t gfn = gpa >> kPageShift;
  auto it = page_access_.find(gfn);
  if (it == page_access_.end() || (it->second & access) == access) return true;
  if (access == KVMI_PAGE_ACCESS_W && spp_enabled_) {
    auto bm = spp_bitmap_.find(gfn);
    if (bm != spp_bitmap_.end()) {
      uint32_t sub = static_cast<uint32_t>(gpa & (kPageSize - 1)) / kSppSubPageSize;
      return (bm->second >> sub) & 1;
    }
  }
  return false;
}

// ---- vCPU side ----------------------------------------------------------------------------------

void VmIntrospection::Kick(uint16_t vcpu) {
  std::lock_guard<std::mutex> lock(mu_);
  VcpuState* s = Vcpu(vcpu);
  s->kicked = true;
  s->cv.notify_all();
  backend_->KickVcpu(vcpu);
}

void VmIntrospection::WaitForWork(uint16_t vcpu, Clock::time_point deadline) {
  std::unique_lock<std::mutex> lock(mu_);
  VcpuState* s = Vcpu(vcpu);
  s->cv.wait_until(lock, deadline, [&] {
    return s->kicked || !s->jobs.empty() ||
           (SessionLive() && (s->pause_requests > 0 || s->create_vcpu_job));
  });
  s->kicked = false;
}

void VmIntrospection::RunJobs(uint16_t vcpu) {
  std::unique_lock<std::mutex> lock(mu_);
  for (;;) {
    if (!SessionLive()) return;
    VcpuState* s = Vcpu(vcpu);
    if (!s->jobs.empty()) {
      Job job = std::move(s->jobs.front());
      s->jobs.pop_front();
      lock.unlock();
      RunOneJob(vcpu, job);
      lock.lock();
      continue;
    }
    if (s->create_vcpu_job) {
      s->create_vcpu_job = false;
      bool enabled = (vm_event_mask_ & Bit(KVMI_EVENT_CREATE_VCPU)) != 0;
      if (enabled) {
        lock.unlock();
        Event event;
        event.common.event = KVMI_EVENT_CREATE_VCPU;
        if (auto reply = SendEventAndWait(vcpu, &event)) ConsumeAction(*reply);
        lock.lock();
      }
      continue;
    }
    // §7.5: after all other jobs, one PAUSE_VCPU event per pending request.
    if (s->pause_requests > 0) {
      --s->pause_requests;
      lock.unlock();
      Event event;
      event.common.event = KVMI_EVENT_PAUSE_VCPU;
      if (auto reply = SendEventAndWait(vcpu, &event)) ConsumeAction(*reply);
      lock.lock();
      continue;
    }
    return;
  }
}

void VmIntrospection::OnVcpuFirstRun(uint16_t vcpu) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!SessionLive() || !(vm_event_mask_ & Bit(KVMI_EVENT_CREATE_VCPU))) return;
  }
  Event event;
  event.common.event = KVMI_EVENT_CREATE_VCPU;
  if (auto reply = SendEventAndWait(vcpu, &event)) ConsumeAction(*reply);
}

void VmIntrospection::RunOneJob(uint16_t vcpu, Job& job) {
  ByteView payload(job.payload);
  if (job.hdr.id == KVMI_EVENT_REPLY) {
    HandleEventReply(vcpu, job.hdr, payload);
  } else {
    ExecuteVcpuCommand(vcpu, job.hdr, payload, job.reply);
  }
}

void VmIntrospection::FillEventArch(uint16_t vcpu, kvmi_event* common) {
  common->vcpu = vcpu;
  kvmi_event_arch& arch = common->arch;
  backend_->GetRegs(vcpu, &arch.regs);
  backend_->GetSregs(vcpu, &arch.sregs);
  arch.mode = CpuModeFromSregs(arch.sregs);
  auto msr = [&](uint32_t index) -> __u64 {
    uint64_t value = 0;
    backend_->GetMsr(vcpu, index, &value);
    return value;
  };
  arch.msrs.sysenter_cs = msr(0x174);
  arch.msrs.sysenter_esp = msr(0x175);
  arch.msrs.sysenter_eip = msr(0x176);
  arch.msrs.efer = msr(0xc0000080);
  arch.msrs.star = msr(0xc0000081);
  arch.msrs.lstar = msr(0xc0000082);
  arch.msrs.cstar = msr(0xc0000083);
  arch.msrs.pat = msr(0x277);
  arch.msrs.shadow_gs = msr(0xc0000102);
}

std::optional<EventReply> VmIntrospection::SendEventAndWait(uint16_t vcpu, Event* event) {
  FillEventArch(vcpu, &event->common);
  uint8_t id = event->common.event;
  std::unique_lock<std::mutex> lock(mu_);
  if (!SessionLive()) return std::nullopt;
  VcpuState* s = Vcpu(vcpu);
  uint64_t session = session_id_;
  event->seq = ++event_seq_;
  s->waiting = true;
  s->reply_ready = false;
  s->expected_seq = event->seq;
  s->pending_event = id;
  s->regs_after_reply.reset();
  lock.unlock();

  // Only this vCPU's thread encodes into its buffer: no allocation per event once it has grown.
  std::vector<uint8_t>& message = s->event_message;
  message.clear();
  EncodeEvent(*event, &message);
  auto sent_at = Clock::now();
  if (!Send(message)) {
    EndSession("write to the tool failed");
    return std::nullopt;
  }
  stats_.events_sent[id].fetch_add(1, std::memory_order_relaxed);

  // §7.3: block until the reply, but keep executing the commands queued to this vCPU.
  lock.lock();
  for (;;) {
    if (session_id_ != session || !SessionLive()) return std::nullopt;  // aborted: as CONTINUE
    if (s->reply_ready) break;
    if (!s->jobs.empty()) {
      Job job = std::move(s->jobs.front());
      s->jobs.pop_front();
      lock.unlock();
      RunOneJob(vcpu, job);
      lock.lock();
      continue;
    }
    s->cv.wait(lock);
  }
  EventReply reply = s->reply;
  s->reply_ready = false;
  std::optional<kvm_regs> regs = s->regs_after_reply;
  s->regs_after_reply.reset();
  lock.unlock();

  stats_.round_trip.Record(static_cast<uint64_t>(
      std::chrono::duration_cast<std::chrono::microseconds>(Clock::now() - sent_at).count()));
  // §5.13: registers set during the event are applied after the reply, before the action.
  if (regs) backend_->SetRegs(vcpu, *regs);
  return reply;
}

uint8_t VmIntrospection::ConsumeAction(const EventReply& reply) {
  uint8_t action = reply.action;
  stats_.replies_by_action[action <= KVMI_EVENT_ACTION_CRASH ? action : 3].fetch_add(
      1, std::memory_order_relaxed);
  if (action == KVMI_EVENT_ACTION_CRASH) {
    spdlog::warn("[{}] tool replied CRASH to {} on vCPU {}: killing the guest", name(),
                 EventName(reply.event), reply.vcpu);
    backend_->Crash();
  } else if (action > KVMI_EVENT_ACTION_CRASH) {
    spdlog::warn("[{}] unsupported action {} for an event on vCPU {}", name(), action, reply.vcpu);
  }
  return action;
}

VmIntrospection::Verdict VmIntrospection::HandleEventReply(uint16_t vcpu, const kvmi_msg_hdr& hdr,
                                                           ByteView payload) {
  uint8_t pending_event;
  uint32_t expected_seq;
  {
    std::lock_guard<std::mutex> lock(mu_);
    VcpuState* s = Vcpu(vcpu);
    // A reply to a vCPU that is not waiting is ignored (its previous event completed normally;
    // had it not, the session would already be over).
    if (!s->waiting) {
      spdlog::debug("[{}] ignoring event reply seq {} for idle vCPU {}", name(), hdr.seq, vcpu);
      return Verdict::kContinue;
    }
    pending_event = s->pending_event;
    expected_seq = s->expected_seq;
  }
  // §6 "Reply validation (code)": any violation while the vCPU waits ends the session.
  std::string violation;
  EventReply reply;
  if (hdr.seq != expected_seq) {
    violation = "event reply seq " + std::to_string(hdr.seq) + " on vCPU " + std::to_string(vcpu) +
                ", expected " + std::to_string(expected_seq);
  } else if (DecodeStatus status = DecodeEventReply(payload, pending_event, &reply); !status.ok()) {
    violation = "bad reply to " + std::string(EventName(pending_event)) + ": " + status.ToString();
  } else if (pending_event == KVMI_EVENT_PF && reply.specific.pf.ctx_size > KVMI_CTX_DATA_SIZE) {
    violation = "PF reply ctx_size " + std::to_string(reply.specific.pf.ctx_size) + " > 256";
  }
  if (!violation.empty()) {
    stats_.sessions_closed_by_violation.fetch_add(1, std::memory_order_relaxed);
    EndSession("protocol violation: " + violation);
    return Verdict::kClose;
  }
  reply.seq = hdr.seq;
  std::lock_guard<std::mutex> lock(mu_);
  VcpuState* s = Vcpu(vcpu);
  s->reply = reply;
  s->reply_ready = true;
  s->waiting = false;
  return Verdict::kContinue;
}

VmIntrospection::Verdict VmIntrospection::ExecuteVcpuCommand(uint16_t vcpu, const kvmi_msg_hdr& hdr,
                                                             ByteView payload, ReplyMode mode) {
  constexpr SizeRule kRule = SizeRule::kKernelZeroFill;
  switch (hdr.id) {
    case KVMI_GET_VCPU_INFO:
      return ReplyWith(hdr, VcpuInfoReply{backend_->TscSpeedHz(vcpu)}, mode);

    case KVMI_CONTROL_EVENTS: {
      ControlEventsRequest req;
      if (!DecodePayload(payload, &req, kRule).ok()) return Reply(hdr, -KVM_EINVAL, {}, mode);
      const EventInfo* info =
          req.event_id < KVMI_NUM_EVENTS ? FindEvent(static_cast<uint8_t>(req.event_id)) : nullptr;
      if (info == nullptr || !info->vcpu_event) return Reply(hdr, -KVM_EINVAL, {}, mode);
      bool allowed;
      {
        std::lock_guard<std::mutex> lock(mu_);
        allowed = (event_allow_mask_ & Bit(req.event_id)) != 0;
      }
      if (!allowed) return Reply(hdr, -KVM_EPERM, {}, mode);
      // Side effects (code): guest-debug breakpoints and descriptor-table exiting.
      if (req.event_id == KVMI_EVENT_BREAKPOINT) {
        if (int err = backend_->SetBreakpointInterception(vcpu, req.enable)) {
          return Reply(hdr, err, {}, mode);
        }
      } else if (req.event_id == KVMI_EVENT_DESCRIPTOR) {
        if (int err = backend_->SetDescriptorInterception(vcpu, req.enable)) {
          return Reply(hdr, err, {}, mode);
        }
      }
      {
        std::lock_guard<std::mutex> lock(mu_);
        VcpuState* s = Vcpu(vcpu);
        if (req.enable) {
          s->event_mask |= Bit(req.event_id);
        } else {
          s->event_mask &= ~Bit(req.event_id);
        }
      }
      return Reply(hdr, 0, {}, mode);
    }
    case KVMI_CONTROL_CR: {
      ControlCrRequest req;
      if (!DecodePayload(payload, &req, kRule).ok() || !kvmi::IsControllableCr(req.cr)) {
        return Reply(hdr, -KVM_EINVAL, {}, mode);
      }
      {
        std::lock_guard<std::mutex> lock(mu_);
        Vcpu(vcpu)->cr_selected[req.cr] = req.enable;
      }
      if (req.cr == 3) backend_->SetCr3LoadExiting(vcpu, req.enable);
      return Reply(hdr, 0, {}, mode);
    }
    case KVMI_CONTROL_MSR: {
      ControlMsrRequest req;
      if (!DecodePayload(payload, &req, kRule).ok() || !kvmi::IsControllableMsr(req.msr)) {
        return Reply(hdr, -KVM_EINVAL, {}, mode);
      }
      {
        std::lock_guard<std::mutex> lock(mu_);
        Vcpu(vcpu)->msr_selected[req.msr] = req.enable;
      }
      // Enabling forces write interception; disabling only clears the tracking bit (§5.10).
      if (req.enable) backend_->SetMsrWriteInterception(vcpu, req.msr, true);
      return Reply(hdr, 0, {}, mode);
    }
    case KVMI_GET_REGISTERS: {
      GetRegistersRequest req;
      // Padding, or hdr.size < 8 + 8 + 4 * nmsrs: -KVM_EINVAL.
      if (!DecodePayload(payload, &req, kRule).ok()) return Reply(hdr, -KVM_EINVAL, {}, mode);
      // The reply must fit a page: 472 + 16 * n <= 4096.
      if (req.msrs.size() > kMaxGetRegistersMsrs) return Reply(hdr, -KVM_ENOMEM, {}, mode);
      RegistersReply reply;
      backend_->GetRegs(vcpu, &reply.regs);
      backend_->GetSregs(vcpu, &reply.sregs);
      reply.mode = CpuModeFromSregs(reply.sregs);
      reply.msrs.resize(req.msrs.size());
      for (size_t i = 0; i < req.msrs.size(); ++i) {
        uint64_t value = 0;
        if (!backend_->GetMsr(vcpu, req.msrs[i], &value)) return Reply(hdr, -KVM_EINVAL, {}, mode);
        reply.msrs[i].index = req.msrs[i];
        reply.msrs[i].data = value;
      }
      return ReplyWith(hdr, reply, mode);
    }
    case KVMI_SET_REGISTERS: {
      SetRegistersRequest req;
      DecodePayload(payload, &req, kRule);  // zero-filled fixed size: cannot fail here
      std::lock_guard<std::mutex> lock(mu_);
      VcpuState* s = Vcpu(vcpu);
      if (s->waiting) {
        req.regs.rflags |= 2;  // RFLAGS bit 1 is forced on
        s->regs_after_reply = req.regs;
      } else {
        // (code) outside an event the registers are dropped, yet the command is answered 0.
        spdlog::debug("[{}] SET_REGISTERS on vCPU {} outside an event: dropped", name(), vcpu);
      }
    }
      return Reply(hdr, 0, {}, mode);

    case KVMI_GET_CPUID: {
      GetCpuidRequest req;
      DecodePayload(payload, &req, kRule);
      std::optional<CpuidLeaf> leaf = backend_->GetCpuid(vcpu, req.function, req.index);
      if (!leaf) return Reply(hdr, -KVM_ENOENT, {}, mode);
      return ReplyWith(hdr, CpuidReply{leaf->eax, leaf->ebx, leaf->ecx, leaf->edx}, mode);
    }
    case KVMI_GET_XSAVE: {
      XsaveReply reply;
      backend_->GetXsave(vcpu, &reply.region);
      return ReplyWith(hdr, reply, mode);
    }
    case KVMI_INJECT_EXCEPTION: {
      InjectExceptionRequest req;
      if (!DecodePayload(payload, &req, kRule).ok()) return Reply(hdr, -KVM_EINVAL, {}, mode);
      {
        // Vector and address are not validated in v6; a second request before the next guest
        // entry overwrites the first.
        std::lock_guard<std::mutex> lock(mu_);
        Vcpu(vcpu)->tool_exception =
            ToolException{req.nr, req.has_error, req.error_code, req.address};
      }
      return Reply(hdr, 0, {}, mode);
    }
    case KVMI_GET_MTRR_TYPE: {
      GetMtrrTypeRequest req;
      DecodePayload(payload, &req, kRule);
      return ReplyWith(hdr, MtrrTypeReply{backend_->MtrrType(vcpu, req.gpa)}, mode);
    }
    default:
      spdlog::error("[{}] no vCPU handler for {}", name(), CommandName(hdr.id));
      return Reply(hdr, -KVM_EOPNOTSUPP, {}, mode);
  }
}

// ---- event hooks
// ----------------------------------------------------------------------------------

bool VmIntrospection::EventEnabled(uint16_t vcpu, uint8_t event) const {
  std::lock_guard<std::mutex> lock(mu_);
  if (!SessionLive() || vcpu >= vcpus_.size()) return false;
  return (vcpus_[vcpu]->event_mask & Bit(event)) != 0;
}

bool VmIntrospection::CrInterceptEnabled(uint16_t vcpu, uint32_t cr) const {
  std::lock_guard<std::mutex> lock(mu_);
  if (!SessionLive() || vcpu >= vcpus_.size() || cr >= 5) return false;
  return vcpus_[vcpu]->cr_selected[cr];
}

bool VmIntrospection::MsrInterceptEnabled(uint16_t vcpu, uint32_t msr) const {
  std::lock_guard<std::mutex> lock(mu_);
  if (!SessionLive() || vcpu >= vcpus_.size()) return false;
  auto it = vcpus_[vcpu]->msr_selected.find(msr);
  return it != vcpus_[vcpu]->msr_selected.end() && it->second;
}

uint32_t VmIntrospection::PendingPauses(uint16_t vcpu) const {
  std::lock_guard<std::mutex> lock(mu_);
  return vcpu < vcpus_.size() ? vcpus_[vcpu]->pause_requests : 0;
}

WriteOutcome VmIntrospection::OnCrWrite(uint16_t vcpu, uint32_t cr, uint64_t old_value,
                                        uint64_t new_value) {
  // Only writes that change the value, to a register selected with CONTROL_CR, with CR events on.
  if (old_value == new_value || !EventEnabled(vcpu, KVMI_EVENT_CR) ||
      !CrInterceptEnabled(vcpu, cr)) {
    return {true, new_value};
  }
  Event event;
  event.common.event = KVMI_EVENT_CR;
  event.specific.cr.cr = static_cast<uint16_t>(cr);
  event.specific.cr.old_value = old_value;
  event.specific.cr.new_value = new_value;
  std::optional<EventReply> reply = SendEventAndWait(vcpu, &event);
  if (!reply) return {true, new_value};  // session gone: as CONTINUE with the guest's value
  // CONTINUE writes new_val (a 16-byte reply zero-fills it: §6 "Caution"); any other action
  // makes the write fail.
  if (ConsumeAction(*reply) == KVMI_EVENT_ACTION_CONTINUE)
    return {true, reply->specific.cr.new_val};
  return {false, old_value};
}

WriteOutcome VmIntrospection::OnMsrWrite(uint16_t vcpu, uint32_t msr, uint64_t old_value,
                                         uint64_t new_value) {
  if (old_value == new_value || !EventEnabled(vcpu, KVMI_EVENT_MSR) ||
      !MsrInterceptEnabled(vcpu, msr)) {
    return {true, new_value};
  }
  Event event;
  event.common.event = KVMI_EVENT_MSR;
  event.specific.msr.msr = msr;
  event.specific.msr.old_value = old_value;
  event.specific.msr.new_value = new_value;
  std::optional<EventReply> reply = SendEventAndWait(vcpu, &event);
  if (!reply) return {true, new_value};
  if (ConsumeAction(*reply) == KVMI_EVENT_ACTION_CONTINUE) {
    return {true, reply->specific.msr.new_val};
  }
  return {false, old_value};
}

void VmIntrospection::OnXsetbv(uint16_t vcpu) {
  if (!EventEnabled(vcpu, KVMI_EVENT_XSETBV)) return;
  Event event;
  event.common.event = KVMI_EVENT_XSETBV;
  if (auto reply = SendEventAndWait(vcpu, &event)) ConsumeAction(*reply);  // any action: carry on
}

BreakpointOutcome VmIntrospection::OnBreakpoint(uint16_t vcpu, uint64_t gpa, uint8_t insn_len) {
  if (!EventEnabled(vcpu, KVMI_EVENT_BREAKPOINT)) return BreakpointOutcome::kReinject;
  Event event;
  event.common.event = KVMI_EVENT_BREAKPOINT;
  event.specific.breakpoint.gpa = gpa;
  event.specific.breakpoint.insn_len = insn_len;
  std::optional<EventReply> reply = SendEventAndWait(vcpu, &event);
  if (!reply) return BreakpointOutcome::kReinject;
  // CONTINUE re-injects #BP; RETRY and unsupported actions do nothing.
  return ConsumeAction(*reply) == KVMI_EVENT_ACTION_CONTINUE ? BreakpointOutcome::kReinject
                                                             : BreakpointOutcome::kRetry;
}

bool VmIntrospection::OnHypercall(uint16_t vcpu) {
  if (!EventEnabled(vcpu, KVMI_EVENT_HYPERCALL)) return false;
  Event event;
  event.common.event = KVMI_EVENT_HYPERCALL;
  if (auto reply = SendEventAndWait(vcpu, &event)) ConsumeAction(*reply);
  return true;
}

DescriptorOutcome VmIntrospection::OnDescriptor(uint16_t vcpu, uint8_t descriptor, bool write) {
  if (!EventEnabled(vcpu, KVMI_EVENT_DESCRIPTOR)) return DescriptorOutcome::kEmulate;
  Event event;
  event.common.event = KVMI_EVENT_DESCRIPTOR;
  event.specific.descriptor.descriptor = descriptor;
  event.specific.descriptor.write = write ? 1 : 0;
  std::optional<EventReply> reply = SendEventAndWait(vcpu, &event);
  if (!reply) return DescriptorOutcome::kEmulate;
  return ConsumeAction(*reply) == KVMI_EVENT_ACTION_CONTINUE ? DescriptorOutcome::kEmulate
                                                             : DescriptorOutcome::kRetry;
}

void VmIntrospection::OnSingleStep(uint16_t vcpu) {
  if (!EventEnabled(vcpu, KVMI_EVENT_SINGLESTEP)) return;
  Event event;
  event.common.event = KVMI_EVENT_SINGLESTEP;
  if (auto reply = SendEventAndWait(vcpu, &event)) ConsumeAction(*reply);
}

PageFaultOutcome VmIntrospection::OnPageFault(uint16_t vcpu, uint64_t gpa, uint64_t gva,
                                              uint8_t access) {
  PageFaultOutcome outcome;
  if (!EventEnabled(vcpu, KVMI_EVENT_PF)) return outcome;  // no event: KVM emulates the access
  Event event;
  event.common.event = KVMI_EVENT_PF;
  event.specific.pf.gva = gva;
  event.specific.pf.gpa = gpa;
  event.specific.pf.access = access;
  std::optional<EventReply> reply = SendEventAndWait(vcpu, &event);
  if (!reply) return outcome;
  const kvmi_event_pf_reply& pf = reply->specific.pf;
  outcome.ctx_addr = pf.ctx_addr;
  outcome.ctx_size = pf.ctx_size;  // <= 256, checked when the reply was validated
  std::memcpy(outcome.ctx_data.data(), pf.ctx_data, sizeof(pf.ctx_data));
  outcome.rep_complete = pf.rep_complete != 0;
  switch (ConsumeAction(*reply)) {
    case KVMI_EVENT_ACTION_CONTINUE:
      outcome.kind = PageFaultOutcome::kEmulate;
      break;
    case KVMI_EVENT_ACTION_RETRY:
      // (code) the single-step starts on RETRY + singlestep; the doc ties it to CONTINUE.
      outcome.kind = pf.singlestep ? PageFaultOutcome::kSingleStep : PageFaultOutcome::kRetry;
      break;
    default:  // CRASH, unsupported: same as RETRY
      outcome.kind = PageFaultOutcome::kRetry;
      break;
  }
  return outcome;
}

std::optional<ToolException> VmIntrospection::TakeToolException(
    uint16_t vcpu, const std::optional<GuestInjection>& busy) {
  std::optional<ToolException> request;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!SessionLive()) return std::nullopt;
    VcpuState* s = Vcpu(vcpu);
    request = s->tool_exception;
    s->tool_exception.reset();
  }
  if (!request || !busy) return request;
  // Something else is already being injected: the request is dropped and TRAP describes the
  // other event (§5.18, §6.5).
  if (EventEnabled(vcpu, KVMI_EVENT_TRAP)) {
    Event event;
    event.common.event = KVMI_EVENT_TRAP;
    event.specific.trap.vector = busy->vector;
    event.specific.trap.type = busy->type;
    event.specific.trap.error_code = busy->error_code;
    event.specific.trap.cr2 = busy->cr2;
    if (auto reply = SendEventAndWait(vcpu, &event)) ConsumeAction(*reply);
  }
  return std::nullopt;
}

}  // namespace kvmi::host
