#include "daemon/api/introspection_service.h"

#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/health_check_service_interface.h>
#include <spdlog/spdlog.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <map>
#include <mutex>
#include <optional>
#include <set>
#include <thread>
#include <unordered_set>

#include "daemon/config/policy_convert.h"
#include "kernel/abi/protocol.h"

namespace kvmid {
namespace {

using grpc::Status;
using grpc::StatusCode;

Status Invalid(const std::string& field, const std::string& why) {
  return Status(StatusCode::INVALID_ARGUMENT, field + ": " + why);
}

kvmi::v1::VMState ToProto(GuestState state, bool all_paused) {
  switch (state) {
    case GuestState::kHandshaking:
      return kvmi::v1::VM_STATE_HANDSHAKING;
    case GuestState::kHooked:
      return all_paused ? kvmi::v1::VM_STATE_PAUSED : kvmi::v1::VM_STATE_HOOKED;
    case GuestState::kUnhooking:
      return kvmi::v1::VM_STATE_UNHOOKING;
    case GuestState::kGone:
      return kvmi::v1::VM_STATE_GONE;
  }
  return kvmi::v1::VM_STATE_UNSPECIFIED;
}

// An EventFilter, validated once and matched on the loop thread.
struct CompiledFilter {
  std::vector<std::string> vms;
  std::set<uint8_t> events;
  std::set<uint32_t> vcpus, crs, msrs;
  std::optional<uint64_t> gpa_first, gpa_last;
  uint8_t access = 0;
  bool empty = true;

  bool Matches(const ObservedEvent& o) const {
    if (empty) return false;
    const kvmi::Event& e = o.event;
    if (!vms.empty()) {
      std::shared_ptr<const GuestView> view = o.guest->cached_view();
      std::string uuid = view ? kvmi::UuidToString(view->uuid) : o.guest->key();
      std::string name = view ? view->name : "";
      bool hit = false;
      for (const std::string& vm : vms)
        hit = hit || vm == uuid || vm == name || vm == o.guest->key();
      if (!hit) return false;
    }
    if (!events.empty() && events.count(e.id()) == 0) return false;
    if (!vcpus.empty() && vcpus.count(e.vcpu()) == 0) return false;
    if (!crs.empty() && (e.id() != KVMI_EVENT_CR || crs.count(e.specific.cr.cr) == 0)) return false;
    if (!msrs.empty() && (e.id() != KVMI_EVENT_MSR || msrs.count(e.specific.msr.msr) == 0)) {
      return false;
    }
    if (gpa_first || gpa_last || access != 0) {
      if (e.id() != KVMI_EVENT_PF) return false;
      if (gpa_first && e.specific.pf.gpa < *gpa_first) return false;
      if (gpa_last && e.specific.pf.gpa > *gpa_last) return false;
      if (access != 0 && (e.specific.pf.access & access) == 0) return false;
    }
    return true;
  }
};

Status Compile(const kvmi::v1::EventFilter& f, const std::string& field, CompiledFilter* out) {
  out->vms.assign(f.vms().begin(), f.vms().end());
  for (int i = 0; i < f.events_size(); ++i) {
    uint8_t id;
    if (!FromEventType(f.events(i), &id)) {
      return Invalid(field + ".events[" + std::to_string(i) + "]", "unknown event type");
    }
    out->events.insert(id);
  }
  for (uint32_t v : f.vcpus()) {
    if (v > 0xffff) return Invalid(field + ".vcpus", std::to_string(v) + " is not a vCPU index");
    out->vcpus.insert(v);
  }
  out->crs.insert(f.crs().begin(), f.crs().end());
  out->msrs.insert(f.msrs().begin(), f.msrs().end());
  if (f.has_gpa_first()) out->gpa_first = f.gpa_first();
  if (f.has_gpa_last()) out->gpa_last = f.gpa_last();
  if (out->gpa_first && out->gpa_last && *out->gpa_first > *out->gpa_last) {
    return Invalid(field + ".gpa_first", "is above gpa_last");
  }
  if (!ParseAccess(f.access(), &out->access)) {
    return Invalid(field + ".access", "'" + f.access() + "' is not made of r, w, x");
  }
  out->empty = false;
  return Status::OK;
}

// One StreamEvents call's buffer: filled on the guests' loop threads, drained by the RPC.
// Bounded; what does not fit is counted, never waited for.
class StreamQueue {
 public:
  explicit StreamQueue(size_t capacity) : capacity_(capacity) {}

  void Push(const ObservedEvent& o) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (queue_.size() >= capacity_) {
      ++dropped_pending_;
      return;
    }
    queue_.push_back(o);
    cv_.notify_one();
  }
  // Waits up to `wait` for events; returns them and the drops since the last call.
  std::deque<ObservedEvent> Take(std::chrono::milliseconds wait, uint64_t* dropped) {
    std::unique_lock<std::mutex> lock(mutex_);
    cv_.wait_for(lock, wait, [&] { return !queue_.empty() || dropped_pending_ > 0; });
    std::deque<ObservedEvent> out;
    out.swap(queue_);
    *dropped = dropped_pending_;
    dropped_pending_ = 0;
    return out;
  }

 private:
  const size_t capacity_;
  std::mutex mutex_;
  std::condition_variable cv_;
  std::deque<ObservedEvent> queue_;
  uint64_t dropped_pending_ = 0;
};

kvmi::v1::Action ActionOf(const Verdict& v) {
  if (v.keep_old) return kvmi::v1::ACTION_KEEP_OLD;
  switch (v.action) {
    case KVMI_EVENT_ACTION_CONTINUE:
      return kvmi::v1::ACTION_CONTINUE;
    case KVMI_EVENT_ACTION_RETRY:
      return kvmi::v1::ACTION_RETRY;
    case KVMI_EVENT_ACTION_CRASH:
      return kvmi::v1::ACTION_CRASH;
    default:
      return kvmi::v1::ACTION_UNSPECIFIED;
  }
}

}  // namespace

kvmi::v1::VcpuLease ToProto(uint16_t vcpu, const VcpuArming& arming) {
  kvmi::v1::VcpuLease out;
  out.set_vcpu(vcpu);
  for (uint8_t e : arming.events) out.add_events(ToEventType(e));
  for (uint32_t cr : arming.crs) out.add_crs(cr);
  for (uint32_t msr : arming.msrs) out.add_msrs(msr);
  return out;
}

kvmi::v1::Lease ToProto(const OwnerId& owner, const Arming& arming) {
  kvmi::v1::Lease lease;
  lease.set_owner(owner);
  for (uint8_t e : arming.vcpu_events) lease.add_vcpu_events(ToEventType(e));
  for (uint8_t e : arming.vm_events) lease.add_vm_events(ToEventType(e));
  for (uint32_t cr : arming.crs) lease.add_crs(cr);
  for (uint32_t msr : arming.msrs) lease.add_msrs(msr);
  lease.set_restricted_pages(static_cast<uint32_t>(arming.page_access.size()));
  for (const auto& [vcpu, own] : arming.vcpu_only) *lease.add_vcpu_only() = ToProto(vcpu, own);
  return lease;
}

kvmi::v1::VM ToProto(const GuestSnapshot& s, const std::map<std::string, std::string>& labels) {
  kvmi::v1::VM vm;
  bool zero = true;
  for (uint8_t b : s.identity.uuid) zero = zero && b == 0;
  vm.set_uuid(zero ? "" : kvmi::UuidToString(s.identity.uuid));
  vm.set_name(s.identity.name);
  vm.set_start_time(s.identity.start_time);
  vm.set_transport(s.identity.transport);
  vm.set_state(ToProto(s.state, s.vcpu_count > 0 && s.paused_vcpus.size() == s.vcpu_count));
  vm.set_vcpu_count(s.vcpu_count);
  vm.set_kvmi_version(s.kvmi_version);
  for (uint16_t id = KVMI_FIRST_COMMAND; id < KVMI_NEXT_AVAILABLE_COMMAND; ++id) {
    if (s.allowed_commands & (1u << id)) vm.add_allowed_commands(kvmi::CommandName(id));
  }
  for (uint8_t id = 0; id < KVMI_NUM_EVENTS; ++id) {
    if (s.allowed_events & (1u << id)) vm.add_allowed_events(ToEventType(id));
  }
  vm.set_connections(s.connections);
  vm.set_events(s.events);
  vm.set_fallbacks(s.fallbacks);
  for (const auto& [owner, arming] : s.leases) *vm.add_leases() = ToProto(owner, arming);
  vm.mutable_labels()->insert(labels.begin(), labels.end());
  for (const std::string& e : s.arm_errors) vm.add_arm_errors(e);
  vm.set_arming_in_flight(s.arming_in_flight);
  return vm;
}

kvmi::v1::Event ToProto(const ObservedEvent& o, bool include_registers) {
  kvmi::v1::Event out;
  const kvmi::Event& e = o.event;
  out.set_id(o.event_id);
  std::shared_ptr<const GuestView> view = o.guest->cached_view();
  if (view) {
    out.set_vm_uuid(kvmi::UuidToString(view->uuid));
    out.set_vm_name(view->name);
  }
  out.set_vcpu(e.vcpu());
  out.set_type(ToEventType(e.id()));
  out.set_mode(e.common.arch.mode);
  out.set_rip(e.common.arch.regs.rip);
  switch (e.id()) {
    case KVMI_EVENT_CR:
      out.mutable_cr()->set_cr(e.specific.cr.cr);
      out.mutable_cr()->set_old_value(e.specific.cr.old_value);
      out.mutable_cr()->set_new_value(e.specific.cr.new_value);
      break;
    case KVMI_EVENT_MSR:
      out.mutable_msr()->set_msr(e.specific.msr.msr);
      out.mutable_msr()->set_old_value(e.specific.msr.old_value);
      out.mutable_msr()->set_new_value(e.specific.msr.new_value);
      break;
    case KVMI_EVENT_PF:
      out.mutable_pf()->set_gva(e.specific.pf.gva);
      out.mutable_pf()->set_gpa(e.specific.pf.gpa);
      out.mutable_pf()->set_access(AccessLetters(e.specific.pf.access));
      break;
    case KVMI_EVENT_BREAKPOINT:
      out.mutable_breakpoint()->set_gpa(e.specific.breakpoint.gpa);
      out.mutable_breakpoint()->set_insn_len(e.specific.breakpoint.insn_len);
      break;
    case KVMI_EVENT_TRAP:
      out.mutable_trap()->set_vector(e.specific.trap.vector);
      out.mutable_trap()->set_type(e.specific.trap.type);
      out.mutable_trap()->set_error_code(e.specific.trap.error_code);
      out.mutable_trap()->set_cr2(e.specific.trap.cr2);
      break;
    case KVMI_EVENT_DESCRIPTOR:
      out.mutable_descriptor_table()->set_table(e.specific.descriptor.descriptor);
      out.mutable_descriptor_table()->set_write(e.specific.descriptor.write != 0);
      break;
    default:
      break;
  }
  if (kvmi::FindEvent(e.id())->has_reply) {
    out.set_action(ActionOf(o.verdict));
    out.set_kept_old_value(o.verdict.keep_old);
  }
  out.set_decided_by(o.verdict.decided_by);
  for (const std::string& rule : o.monitor_hits) out.add_monitor_hits(rule);
  out.set_latency_ns(static_cast<uint64_t>(o.latency.count()));
  if (include_registers) {
    const kvm_regs& r = e.common.arch.regs;
    const kvm_sregs& sr = e.common.arch.sregs;
    kvmi::v1::Registers* regs = out.mutable_registers();
    regs->set_rax(r.rax), regs->set_rbx(r.rbx), regs->set_rcx(r.rcx), regs->set_rdx(r.rdx);
    regs->set_rsi(r.rsi), regs->set_rdi(r.rdi), regs->set_rsp(r.rsp), regs->set_rbp(r.rbp);
    regs->set_r8(r.r8), regs->set_r9(r.r9), regs->set_r10(r.r10), regs->set_r11(r.r11);
    regs->set_r12(r.r12), regs->set_r13(r.r13), regs->set_r14(r.r14), regs->set_r15(r.r15);
    regs->set_rip(r.rip), regs->set_rflags(r.rflags);
    regs->set_cr0(sr.cr0), regs->set_cr3(sr.cr3), regs->set_cr4(sr.cr4), regs->set_efer(sr.efer);
  }
  return out;
}

Status IntrospectionService::ListVMs(grpc::ServerContext*, const kvmi::v1::ListVMsRequest*,
                                     kvmi::v1::ListVMsResponse* response) {
  for (const auto& guest : daemon_->registry().List()) {
    *response->add_vms() = ToProto(guest->Snapshot(), daemon_->pipeline().ViewOf(*guest)->labels);
  }
  return Status::OK;
}

Status IntrospectionService::GetVM(grpc::ServerContext*, const kvmi::v1::GetVMRequest* request,
                                   kvmi::v1::VM* response) {
  if (request->vm().empty()) return Invalid("vm", "a UUID or name is required");
  std::shared_ptr<Guest> guest = daemon_->registry().Lookup(request->vm());
  if (!guest) return Status(StatusCode::NOT_FOUND, "no guest '" + request->vm() + "'");
  *response = ToProto(guest->Snapshot(), daemon_->pipeline().ViewOf(*guest)->labels);
  return Status::OK;
}

Status IntrospectionService::StreamEvents(grpc::ServerContext* context,
                                          const kvmi::v1::StreamEventsRequest* request,
                                          grpc::ServerWriter<kvmi::v1::EventMessage>* writer) {
  CompiledFilter allow, deny;
  if (request->has_allow()) {
    Status s = Compile(request->allow(), "allow", &allow);
    if (!s.ok()) return s;
  } else {
    allow.empty = false;  // no allow filter: everything
  }
  if (request->has_deny()) {
    Status s = Compile(request->deny(), "deny", &deny);
    if (!s.ok()) return s;
  }
  uint32_t capacity = request->max_queue() == 0 ? 1024 : request->max_queue();
  if (capacity > 65536) return Invalid("max_queue", "at most 65536");
  auto queue = std::make_shared<StreamQueue>(capacity);
  uint64_t observer = daemon_->pipeline().AddObserver([queue, allow, deny](const ObservedEvent& o) {
    if (allow.Matches(o) && !deny.Matches(o)) queue->Push(o);
  });
  uint64_t dropped_total = 0;
  bool open = true;
  auto write_drops = [&](uint64_t dropped) {
    dropped_total += dropped;
    kvmi::v1::EventMessage notice;
    notice.mutable_dropped()->set_dropped(dropped);
    notice.mutable_dropped()->set_dropped_total(dropped_total);
    return writer->Write(notice);
  };
  // Resuming: the live observer is already queueing, so nothing falls between the replay and the
  // live part; what both saw is sent once.
  std::unordered_set<uint64_t> replayed;
  if (request->resume_after() != 0 && history_ != nullptr) {
    std::vector<ObservedEvent> past;
    uint64_t lost = history_->Replay(request->resume_after(), &past);
    if (lost > 0) open = write_drops(lost);
    for (const ObservedEvent& o : past) {
      if (!open) break;
      if (!allow.Matches(o) || deny.Matches(o)) continue;
      replayed.insert(o.event_id);
      kvmi::v1::EventMessage message;
      *message.mutable_event() = ToProto(o, request->include_registers());
      open = writer->Write(message);
    }
  }
  while (open && !context->IsCancelled()) {
    uint64_t dropped = 0;
    std::deque<ObservedEvent> batch = queue->Take(std::chrono::milliseconds(200), &dropped);
    if (dropped > 0) open = write_drops(dropped);
    for (const ObservedEvent& o : batch) {
      if (!open) break;
      if (!replayed.empty() && replayed.erase(o.event_id) > 0) continue;
      kvmi::v1::EventMessage message;
      *message.mutable_event() = ToProto(o, request->include_registers());
      open = writer->Write(message);
    }
  }
  daemon_->pipeline().RemoveObserver(observer);
  return Status::OK;
}

Status IntrospectionService::ApplyPolicy(grpc::ServerContext*,
                                         const kvmi::v1::ApplyPolicyRequest* request,
                                         kvmi::v1::ApplyPolicyResponse* response) {
  if (!request->has_policy()) return Invalid("policy", "required");
  std::shared_ptr<Rule> rule;
  std::string error = PolicyToRule(request->policy(), &rule);
  if (!error.empty()) return Status(StatusCode::INVALID_ARGUMENT, "policy." + error);
  bool existed = false;
  for (const auto& r : *daemon_->policies().rules()) existed = existed || r->name == rule->name;
  error = daemon_->ApplyPolicy(rule);
  if (!error.empty()) return Status(StatusCode::INVALID_ARGUMENT, "policy: " + error);
  response->set_replaced(existed);
  spdlog::info("policy {} {} through the API", rule->name, existed ? "replaced" : "applied");
  return Status::OK;
}

Status IntrospectionService::ListPolicies(grpc::ServerContext*,
                                          const kvmi::v1::ListPoliciesRequest*,
                                          kvmi::v1::ListPoliciesResponse* response) {
  for (const auto& rule : *daemon_->policies().rules()) {
    kvmi::v1::PolicyStatus* status = response->add_policies();
    *status->mutable_policy() = RuleToPolicy(*rule);
    status->mutable_counters()->set_name(rule->name);
    status->mutable_counters()->set_hits(rule->hits.load());
    status->mutable_counters()->set_enforced(rule->enforced.load());
  }
  return Status::OK;
}

Status IntrospectionService::DeletePolicy(grpc::ServerContext*,
                                          const kvmi::v1::DeletePolicyRequest* request,
                                          kvmi::v1::DeletePolicyResponse*) {
  if (request->name().empty()) return Invalid("name", "required");
  if (!daemon_->RemovePolicy(request->name())) {
    return Status(StatusCode::NOT_FOUND, "no policy '" + request->name() + "'");
  }
  spdlog::info("policy {} deleted through the API", request->name());
  return Status::OK;
}

// ---- verdicts, statuses ------------------------------------------------------------------------

kvm_regs RegistersFromProto(const kvmi::v1::Registers& r) {
  kvm_regs regs{};
  regs.rax = r.rax(), regs.rbx = r.rbx(), regs.rcx = r.rcx(), regs.rdx = r.rdx();
  regs.rsi = r.rsi(), regs.rdi = r.rdi(), regs.rsp = r.rsp(), regs.rbp = r.rbp();
  regs.r8 = r.r8(), regs.r9 = r.r9(), regs.r10 = r.r10(), regs.r11 = r.r11();
  regs.r12 = r.r12(), regs.r13 = r.r13(), regs.r14 = r.r14(), regs.r15 = r.r15();
  regs.rip = r.rip(), regs.rflags = r.rflags();
  return regs;
}

std::string FromProto(const kvmi::v1::Verdict& in, const kvmi::Event& event, Verdict* out) {
  const kvmi::EventInfo* info = kvmi::FindEvent(event.id());
  *out = Verdict();
  switch (in.action()) {
    case kvmi::v1::ACTION_CONTINUE:
      out->action = KVMI_EVENT_ACTION_CONTINUE;
      break;
    case kvmi::v1::ACTION_RETRY:
      out->action = KVMI_EVENT_ACTION_RETRY;
      break;
    case kvmi::v1::ACTION_CRASH:
      out->action = KVMI_EVENT_ACTION_CRASH;
      break;
    case kvmi::v1::ACTION_KEEP_OLD:
      if (event.id() != KVMI_EVENT_CR && event.id() != KVMI_EVENT_MSR) {
        return "action: ACTION_KEEP_OLD applies to CR and MSR events only";
      }
      out->action = KVMI_EVENT_ACTION_CONTINUE;
      out->keep_old = true;
      break;
    default:
      return "action: required (CONTINUE, RETRY, CRASH or KEEP_OLD)";
  }
  // Nothing the event cannot take reaches the guest: RETRY on a CR write would make it #GP.
  if ((info->allowed_actions & (1u << out->action)) == 0) {
    return std::string("action: ") + kvmi::ActionName(out->action) + " is not an action of " +
           kvmi::EventName(event.id());
  }
  if (in.has_new_value()) {
    if (event.id() != KVMI_EVENT_CR && event.id() != KVMI_EVENT_MSR) {
      return "new_value: only CR and MSR events take a new value";
    }
    if (out->keep_old) return "new_value: conflicts with ACTION_KEEP_OLD";
    out->new_value = in.new_value();
  }
  if (in.has_pf()) {
    if (event.id() != KVMI_EVENT_PF) return "pf: only PF events take PF reply data";
    if (in.pf().ctx_data().size() > KVMI_CTX_DATA_SIZE) return "pf.ctx_data: at most 256 bytes";
    kvmi_event_pf_reply pf{};
    pf.ctx_addr = in.pf().ctx_addr();
    pf.ctx_size = static_cast<uint32_t>(in.pf().ctx_data().size());
    std::memcpy(pf.ctx_data, in.pf().ctx_data().data(), in.pf().ctx_data().size());
    pf.singlestep = in.pf().singlestep() ? 1 : 0;
    pf.rep_complete = in.pf().rep_complete() ? 1 : 0;
    out->pf = pf;
  }
  if (in.has_set_registers()) out->registers = RegistersFromProto(in.set_registers());
  return "";
}

Status ToStatus(const CommandResult& r, const std::string& what) {
  switch (r.status) {
    case CommandResult::Status::kOk:
      return Status::OK;
    case CommandResult::Status::kKvmiError: {
      StatusCode code = StatusCode::UNKNOWN;
      switch (-r.err) {
        case KVM_EINVAL:
          code = StatusCode::INVALID_ARGUMENT;
          break;
        case KVM_EPERM:
          code = StatusCode::PERMISSION_DENIED;
          break;
        case KVM_ENOENT:
          code = StatusCode::NOT_FOUND;
          break;
        case KVM_EAGAIN:
        case KVM_EBUSY:
          code = StatusCode::UNAVAILABLE;
          break;
        case KVM_EOPNOTSUPP:
          code = StatusCode::UNIMPLEMENTED;
          break;
        case KVM_ENOMEM:
          code = StatusCode::RESOURCE_EXHAUSTED;
          break;
        default:
          break;
      }
      return Status(code, what + ": the host answered " + kvmi::ErrorName(r.err));
    }
    case CommandResult::Status::kInvalid:
      return Status(StatusCode::INVALID_ARGUMENT, what + ": " + r.message);
    case CommandResult::Status::kClosed:
      return Status(StatusCode::UNAVAILABLE, what + ": the guest is gone (" + r.message + ")");
    case CommandResult::Status::kTimeout:
      return Status(StatusCode::DEADLINE_EXCEEDED, what + ": the guest did not answer in time");
    case CommandResult::Status::kNotWaiting:
      return Status(StatusCode::FAILED_PRECONDITION, what + ": " + r.message);
    case CommandResult::Status::kProtocolError:
      return Status(StatusCode::INTERNAL, what + ": " + r.message);
  }
  return Status(StatusCode::UNKNOWN, what);
}

namespace {

// Waits for an asynchronous command on the RPC thread, within the client's deadline.
template <typename T>
class Waiter {
 public:
  std::function<void(T)> callback() {
    auto state = state_;
    return [state](T value) {
      std::lock_guard<std::mutex> lock(state->mutex);
      state->value = std::move(value);
      state->cv.notify_all();
    };
  }
  // False if the call was cancelled or its deadline passed first.
  bool Wait(grpc::ServerContextBase* context, T* out) {
    std::unique_lock<std::mutex> lock(state_->mutex);
    while (!state_->value) {
      if (context->IsCancelled()) return false;
      state_->cv.wait_for(lock, std::chrono::milliseconds(50));
    }
    *out = std::move(*state_->value);
    return true;
  }

 private:
  struct State {
    std::mutex mutex;
    std::condition_variable cv;
    std::optional<T> value;
  };
  std::shared_ptr<State> state_ = std::make_shared<State>();
};

// What one Attach stream sends to its client: a queue drained by one write at a time. Messages
// are queued from any thread (the guest's loop thread for events, gRPC's for verdict errors, the
// command runner for results); whoever finds no write in flight starts the next one, so an event
// goes on the wire from the loop thread with no hand-off.
class AttachOutbox {
 public:
  using StartWrite = std::function<void(const kvmi::v1::AttachResponse*)>;
  using Finish = std::function<void(const Status&)>;
  // Above this backlog the stream stops reading requests (and the command runner waits) until
  // the client has taken some: a client that never reads cannot grow kvmid's memory.
  static constexpr size_t kMaxBacklogMessages = 1024;
  static constexpr size_t kMaxBacklogBytes = 64u << 20;

  AttachOutbox(StartWrite start_write, Finish finish)
      : start_write_(std::move(start_write)), finish_(std::move(finish)) {}

  void Send(kvmi::v1::AttachResponse message) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (closed_) return;
      backlog_bytes_ += message.ByteSizeLong();
      queue_.push_back(std::move(message));
      if (writing_ || held_) return;
      writing_ = true;
      TakeNextLocked();
    }
    start_write_(&current_);
  }

  // Until this is called nothing is written, only queued: the stream's first message (Claimed)
  // must not reach the client before the handler it announces is registered.
  void Release() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      held_ = false;
      if (writing_ || closed_ || queue_.empty()) return;
      writing_ = true;
      TakeNextLocked();
    }
    start_write_(&current_);
  }

  // The write of current_ completed.
  void OnWriteDone(bool ok) {
    bool next = false;  // this thread keeps the write token and sends current_
    bool finish = false;
    Status status;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (!ok) Close();  // the stream is broken: nothing more goes out
      if (!queue_.empty()) {
        TakeNextLocked();
        next = true;
      } else {
        writing_ = false;
        finish = FinishDueLocked(&status);
      }
      room_cv_.notify_all();
    }
    if (finish) {
      finish_(status);
    } else if (next) {
      start_write_(&current_);
    }
  }

  // Ends the stream with `status`. drain: what is queued still goes out first (the client
  // half-closed and waits for its results); else it is dropped (cancelled, or a failure).
  void RequestFinish(const Status& status, bool drain) {
    bool finish = false;
    Status final_status;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (!finish_requested_) finish_status_ = status;
      finish_requested_ = true;
      if (!drain) Close();
      finish = !writing_ && FinishDueLocked(&final_status);
      room_cv_.notify_all();
    }
    if (finish) finish_(final_status);
  }

  bool Congested() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return CongestedLocked();
  }

  // Blocks while the backlog is over its limit; false if the stream ended meanwhile.
  bool WaitForRoom() {
    std::unique_lock<std::mutex> lock(mutex_);
    room_cv_.wait(lock, [&] { return closed_ || !CongestedLocked(); });
    return !closed_;
  }

 private:
  void Close() {
    closed_ = true;
    queue_.clear();
    backlog_bytes_ = 0;
  }
  void TakeNextLocked() {
    current_ = std::move(queue_.front());
    queue_.pop_front();
    size_t size = current_.ByteSizeLong();
    backlog_bytes_ -= std::min(backlog_bytes_, size);
  }
  bool CongestedLocked() const {
    return queue_.size() >= kMaxBacklogMessages || backlog_bytes_ >= kMaxBacklogBytes;
  }
  // mutex_ held, no write in flight: true once (Finish is called exactly once).
  bool FinishDueLocked(Status* status) {
    if (!finish_requested_ || finished_ || !queue_.empty()) return false;
    finished_ = true;
    closed_ = true;
    *status = finish_status_;
    return true;
  }

  const StartWrite start_write_;
  const Finish finish_;
  mutable std::mutex mutex_;
  std::condition_variable room_cv_;
  std::deque<kvmi::v1::AttachResponse> queue_;
  size_t backlog_bytes_ = 0;
  kvmi::v1::AttachResponse current_;  // owned by the write in flight
  bool writing_ = false;
  bool held_ = true;  // see Release()
  bool closed_ = false;
  bool finish_requested_ = false;
  bool finished_ = false;
  Status finish_status_;
};

// A remote handler behind one Attach stream: keeps the promises of the events it sent.
class StreamHandler : public VerdictHandler {
 public:
  StreamHandler(std::string id, std::shared_ptr<AttachOutbox> outbox)
      : id_(std::move(id)), outbox_(std::move(outbox)) {}
  std::string id() const override { return id_; }

  void OnBlockingEvent(const EventContext& ctx, VerdictPromise promise) override {
    kvmi::v1::AttachResponse message;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (closed_) return;  // the promise dies here: fallback at once
      // Promises of events whose deadline passed long ago are dead weight.
      auto stale = Clock::now() - std::chrono::seconds(1);
      for (auto it = pending_.begin(); it != pending_.end();) {
        it = it->second.ctx.deadline < stale ? pending_.erase(it) : std::next(it);
      }
      pending_.emplace(ctx.event_id, Pending{ctx, std::move(promise)});
    }
    ObservedEvent observed{ctx.guest, ctx.event, Verdict(), {}, ctx.event_id, {}};
    *message.mutable_event() = ToProto(observed, /*include_registers=*/true);
    message.mutable_event()->clear_action();
    message.mutable_event()->clear_decided_by();
    outbox_->Send(std::move(message));
  }

  // A verdict from the client; errors go back on the stream.
  void Answer(const kvmi::v1::Verdict& verdict) {
    std::string error;
    VerdictPromise promise;
    Verdict v;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto it = pending_.find(verdict.event_id());
      if (it == pending_.end()) {
        error = "event " + std::to_string(verdict.event_id()) +
                " is not pending (answered, past its deadline, or never sent)";
      } else {
        error = FromProto(verdict, it->second.ctx.event, &v);
        if (error.empty()) {
          promise = std::move(it->second.promise);
          pending_.erase(it);
        }
      }
    }
    // Outside the lock: answering writes the reply and runs the observers, and the guest's loop
    // must not wait for that to hand this stream its next event.
    if (promise.valid()) {
      v.decided_by = "handler:" + id_;
      if (!promise.Answer(std::move(v))) error = "event already answered (deadline)";
    }
    if (!error.empty()) {
      kvmi::v1::AttachResponse message;
      message.mutable_error()->set_event_id(verdict.event_id());
      message.mutable_error()->set_message(error);
      outbox_->Send(std::move(message));
    }
  }

  // The stream is over: every unanswered event falls back now (the promises die outside the
  // lock, their fallback runs on the guests' loops).
  void Close() {
    std::map<uint64_t, Pending> dying;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      closed_ = true;
      dying.swap(pending_);
    }
  }

 private:
  struct Pending {
    EventContext ctx;
    VerdictPromise promise;
  };
  const std::string id_;
  const std::shared_ptr<AttachOutbox> outbox_;
  std::mutex mutex_;
  bool closed_ = false;
  std::map<uint64_t, Pending> pending_;
};

// What CONTROL_CR and CONTROL_MSR accept (the v6 kernel answers -KVM_EINVAL to the rest).
constexpr const char* kControllableCrs = "0, 3 or 4";
bool ControllableCr(uint32_t cr) { return cr == 0 || cr == 3 || cr == 4; }
constexpr const char* kControllableMsrs = "0-0x1fff or 0xc0000000-0xc0001fff";
bool ControllableMsr(uint32_t msr) {
  return msr <= KVMI_MSR_LOW_LAST || (msr >= KVMI_MSR_HIGH_FIRST && msr <= KVMI_MSR_HIGH_LAST);
}

kvmi::v1::AttachResponse CommandResultMessage(uint64_t id, const Status& status) {
  kvmi::v1::AttachResponse response;
  kvmi::v1::CommandResult* result = response.mutable_command_result();
  result->set_id(id);
  result->set_code(static_cast<int32_t>(status.error_code()));
  result->set_message(status.error_message());
  return response;
}

bool ValidHandlerId(const std::string& id) {
  if (id.empty() || id.size() > 64) return false;
  for (char c : id) {
    if (!std::isalnum(static_cast<unsigned char>(c)) && c != '-' && c != '_' && c != '.') {
      return false;
    }
  }
  return true;
}

}  // namespace

Status IntrospectionService::FindGuest(const std::string& vm, std::shared_ptr<Guest>* guest,
                                       std::shared_ptr<GuestSession>* session) {
  if (vm.empty()) return Invalid("vm", "a UUID or name is required");
  *guest = daemon_->registry().Lookup(vm);
  if (!*guest) return Status(StatusCode::NOT_FOUND, "no guest '" + vm + "'");
  // Kept by the caller: a session that closes later fails its commands (kClosed) instead of
  // vanishing under the call.
  std::shared_ptr<GuestSession> live = (*guest)->session();
  if ((*guest)->state() != GuestState::kHooked || !live) {
    return Status(StatusCode::UNAVAILABLE,
                  "guest '" + vm + "' is " + GuestStateName((*guest)->state()));
  }
  if (session != nullptr) *session = std::move(live);
  return Status::OK;
}

Status IntrospectionService::ParseClaim(const kvmi::v1::Claim& claim, HandlerClaim* handler_claim,
                                        Arming* arming) {
  if (!ValidHandlerId(claim.handler_id())) {
    return Invalid("claim.handler_id", "1-64 characters from [A-Za-z0-9._-]");
  }
  handler_claim->vms.assign(claim.vms().begin(), claim.vms().end());
  for (int i = 0; i < claim.events_size(); ++i) {
    uint8_t id;
    if (!FromEventType(claim.events(i), &id) || !kvmi::FindEvent(id)->has_reply) {
      return Invalid("claim.events[" + std::to_string(i) + "]", "not a blocking event type");
    }
    handler_claim->events.insert(id);
  }
  if (claim.deadline_ms() > 60000) return Invalid("claim.deadline_ms", "at most 60000");
  handler_claim->deadline = std::chrono::milliseconds(claim.deadline_ms());
  switch (claim.fallback()) {
    case kvmi::v1::ACTION_UNSPECIFIED:
      break;
    case kvmi::v1::ACTION_CONTINUE:
      handler_claim->fallback_action = KVMI_EVENT_ACTION_CONTINUE;
      break;
    case kvmi::v1::ACTION_CRASH:
      handler_claim->fallback_action = KVMI_EVENT_ACTION_CRASH;
      break;
    default:
      return Invalid("claim.fallback", "CONTINUE or CRASH");
  }
  for (int i = 0; i < claim.arm_events_size(); ++i) {
    uint8_t id;
    if (!FromEventType(claim.arm_events(i), &id) || kvmi::FindEvent(id)->vm_event ||
        id == KVMI_EVENT_PAUSE_VCPU) {
      return Invalid("claim.arm_events[" + std::to_string(i) + "]",
                     "not an event enabled per vCPU");
    }
    arming->vcpu_events.insert(id);
  }
  for (uint32_t cr : claim.arm_crs()) {
    if (!ControllableCr(cr)) return Invalid("claim.arm_crs", kControllableCrs);
    arming->crs.insert(cr);
  }
  for (uint32_t msr : claim.arm_msrs()) {
    if (!ControllableMsr(msr)) return Invalid("claim.arm_msrs", kControllableMsrs);
    arming->msrs.insert(msr);
  }
  return Status::OK;
}

// One Attach stream on gRPC's callback API: events are written from the guest's loop thread and
// verdicts applied from gRPC's read callback, so a remote verdict costs no thread hand-offs
// inside kvmid beyond the loop's own wake-up. Inline commands block (they wait for the guest),
// so they run in order on a thread of their own, started with the first command.
//
// Ending: a client that half-closes gets the results of the commands it sent, then OK; a
// cancelled or broken stream drops what is queued and runs no further command. Either way the
// handler stops at once (its events fall back) and OnDone releases everything the stream owned.
class AttachReactor final
    : public grpc::ServerBidiReactor<kvmi::v1::AttachRequest, kvmi::v1::AttachResponse> {
 public:
  AttachReactor(IntrospectionService* service, grpc::CallbackServerContext* context)
      : service_(service), context_(context) {
    outbox_ = std::make_shared<AttachOutbox>(
        [this](const kvmi::v1::AttachResponse* message) { StartWrite(message); },
        [this](const Status& status) { Finish(status); });
    StartRead(&request_);
  }

  void OnReadDone(bool ok) override {
    if (!ok) {  // the client half-closed (or the stream broke: OnCancel follows)
      StopHandler();
      FinishAfterCommands();
      return;
    }
    if (stopping_) return;
    if (!handler_) {
      if (!request_.has_claim()) return Fail(Invalid("claim", "the first message must be a Claim"));
      Status s = Claim(request_.claim());
      if (!s.ok()) return Fail(s);
    } else if (request_.has_verdict()) {
      handler_->Answer(request_.verdict());
    } else if (request_.has_command()) {
      QueueCommand(std::move(*request_.mutable_command()));
    } else if (request_.has_claim()) {
      return Fail(Invalid("claim", "a stream claims once, in its first message"));
    }
    ReadMore();
  }

  void OnWriteDone(bool ok) override {
    outbox_->OnWriteDone(ok);
    if (!ok) {  // the stream broke: end it as if cancelled
      Stop(Status::CANCELLED);
      return;
    }
    // Reads paused on a full backlog resume once the client took some of it.
    if (!stopping_ && read_paused_ && !outbox_->Congested() && read_paused_.exchange(false)) {
      StartRead(&request_);
    }
  }

  void OnCancel() override { Stop(Status::CANCELLED); }

  void OnDone() override {
    StopHandler();
    if (!owner_.empty()) service_->daemon_->ReleaseOwner(owner_);
    StopCommands();
    if (command_runner_.joinable()) {
      // Bounded: the command in progress ends with its guest reply or kvmid's command timeout.
      command_runner_.join();
      // It may have armed, restricted or paused for the stream after the release above.
      service_->daemon_->ReleaseOwner(owner_);
    }
    if (!owner_.empty()) spdlog::info("{} detached", owner_);
    delete this;
  }

 private:
  static constexpr size_t kMaxQueuedCommands = 256;

  Status Claim(const kvmi::v1::Claim& claim) {
    HandlerClaim handler_claim;
    Arming arming;
    Status s = IntrospectionService::ParseClaim(claim, &handler_claim, &arming);
    if (!s.ok()) return s;
    owner_ = "client:" + claim.handler_id() + "#" + std::to_string(service_->next_stream_++);
    // Claimed is queued first (events of the new registration queue behind it) and written once
    // the handler is registered and its arming requested: a client that has read Claimed gets
    // every event it claimed from then on.
    kvmi::v1::AttachResponse claimed;
    claimed.mutable_claimed()->set_owner(owner_);
    outbox_->Send(std::move(claimed));
    {
      std::lock_guard<std::mutex> lock(handler_mutex_);
      handler_ = std::make_shared<StreamHandler>(claim.handler_id(), outbox_);
      registration_ = service_->daemon_->pipeline().RegisterHandler(handler_, handler_claim);
    }
    service_->daemon_->SetClientArming(owner_, handler_claim.vms, arming);
    outbox_->Release();
    spdlog::info(
        "{} attached: {} event types, {} guests selected", owner_, handler_claim.events.size(),
        handler_claim.vms.empty() ? std::string("all") : std::to_string(handler_claim.vms.size()));
    return Status::OK;
  }

  void ReadMore() {
    if (outbox_->Congested()) {
      read_paused_ = true;
      // The backlog may have drained between the check and the flag: re-check.
      if (outbox_->Congested() || !read_paused_.exchange(false)) return;
    }
    StartRead(&request_);
  }

  void Fail(const Status& status) { Stop(status); }

  // Ends the stream now: no more events or commands, what is queued is dropped.
  void Stop(const Status& status) {
    stopping_ = true;
    StopHandler();
    StopCommands();
    outbox_->RequestFinish(status, /*drain=*/false);
  }

  // No more events for this stream: unanswered ones fall back now.
  void StopHandler() {
    std::shared_ptr<StreamHandler> handler;
    {
      std::lock_guard<std::mutex> lock(handler_mutex_);
      registration_.Reset();
      handler = handler_;
    }
    if (handler) handler->Close();
  }

  void QueueCommand(kvmi::v1::Command command) {
    {
      std::lock_guard<std::mutex> lock(commands_mutex_);
      if (commands_.size() < kMaxQueuedCommands) {
        commands_.push_back(std::move(command));
        if (!command_runner_.joinable()) command_runner_ = std::thread([this] { RunCommands(); });
        commands_cv_.notify_one();
        return;
      }
    }
    outbox_->Send(CommandResultMessage(
        command.id(),
        Status(StatusCode::RESOURCE_EXHAUSTED, "more than " + std::to_string(kMaxQueuedCommands) +
                                                   " commands waiting on this stream")));
  }

  // Half-close: finish once every command read so far has its result queued.
  void FinishAfterCommands() {
    {
      std::lock_guard<std::mutex> lock(commands_mutex_);
      if (command_runner_.joinable()) {
        finish_when_idle_ = true;
        commands_cv_.notify_all();
        return;
      }
    }
    outbox_->RequestFinish(Status::OK, /*drain=*/true);
  }

  void StopCommands() {
    std::lock_guard<std::mutex> lock(commands_mutex_);
    commands_stopped_ = true;
    commands_.clear();
    commands_cv_.notify_all();
  }

  void RunCommands() {
    while (true) {
      kvmi::v1::Command command;
      {
        std::unique_lock<std::mutex> lock(commands_mutex_);
        commands_cv_.wait(
            lock, [&] { return commands_stopped_ || finish_when_idle_ || !commands_.empty(); });
        if (commands_stopped_) return;
        if (commands_.empty()) {  // half-closed and every command answered
          lock.unlock();
          outbox_->RequestFinish(Status::OK, /*drain=*/true);
          return;
        }
        command = std::move(commands_.front());
        commands_.pop_front();
      }
      // A client that does not read its results holds the next command back.
      if (!outbox_->WaitForRoom()) return;
      outbox_->Send(service_->RunCommand(context_, owner_, command));
    }
  }

  IntrospectionService* const service_;
  grpc::CallbackServerContext* const context_;
  kvmi::v1::AttachRequest request_;  // the read in flight (one at a time)
  std::shared_ptr<AttachOutbox> outbox_;
  std::atomic<bool> stopping_{false};
  std::atomic<bool> read_paused_{false};
  std::mutex handler_mutex_;                // handler_ and registration_ (reads vs OnCancel)
  std::shared_ptr<StreamHandler> handler_;  // set by the claim
  VerdictPipeline::Registration registration_;
  OwnerId owner_;  // set by the claim, before any command can run
  std::mutex commands_mutex_;
  std::condition_variable commands_cv_;
  std::deque<kvmi::v1::Command> commands_;
  bool commands_stopped_ = false;
  bool finish_when_idle_ = false;
  std::thread command_runner_;
};

grpc::ServerBidiReactor<kvmi::v1::AttachRequest, kvmi::v1::AttachResponse>*
IntrospectionService::Attach(grpc::CallbackServerContext* context) {
  return new AttachReactor(this, context);
}

kvmi::v1::AttachResponse IntrospectionService::RunCommand(grpc::ServerContextBase* context,
                                                          const OwnerId& owner,
                                                          const kvmi::v1::Command& command) {
  kvmi::v1::AttachResponse response;
  kvmi::v1::CommandResult* result = response.mutable_command_result();
  Status status;
  using R = kvmi::v1::Command;
  switch (command.request_case()) {
    case R::kGetRegisters:
      status = GetRegistersImpl(context, &command.get_registers(), result->mutable_get_registers());
      break;
    case R::kSetRegisters:
      status = SetRegistersImpl(context, &command.set_registers(), result->mutable_set_registers());
      break;
    case R::kReadPhysical:
      status = ReadPhysicalImpl(context, &command.read_physical(), result->mutable_read_physical());
      break;
    case R::kWritePhysical:
      status =
          WritePhysicalImpl(context, &command.write_physical(), result->mutable_write_physical());
      break;
    case R::kGetPageAccess:
      status =
          GetPageAccessImpl(context, &command.get_page_access(), result->mutable_get_page_access());
      break;
    case R::kSetPageAccess:
      status = SetPagesFor(owner, context, &command.set_page_access(),
                           result->mutable_set_page_access());
      break;
    case R::kPauseVcpu:
      status = PauseFor(owner, context, &command.pause_vcpu(), result->mutable_pause_vcpu());
      break;
    case R::kResumeVcpu:
      status = ResumeFor(owner, context, &command.resume_vcpu(), result->mutable_resume_vcpu());
      break;
    case R::kInjectException:
      status = InjectExceptionImpl(context, &command.inject_exception(),
                                   result->mutable_inject_exception());
      break;
    case R::kControlEvents:
      status = ControlEventsFor(owner, context, &command.control_events(),
                                result->mutable_control_events());
      break;
    case R::kGetCpuid:
      status = GetCPUIDImpl(context, &command.get_cpuid(), result->mutable_get_cpuid());
      break;
    case R::kGetMtrrType:
      status = GetMTRRTypeImpl(context, &command.get_mtrr_type(), result->mutable_get_mtrr_type());
      break;
    case R::REQUEST_NOT_SET:
      status = Invalid("command.request", "no command given");
      break;
  }
  if (!status.ok()) return CommandResultMessage(command.id(), status);
  result->set_id(command.id());
  return response;
}

Status IntrospectionService::GetRegisters(grpc::ServerContext* context,
                                          const kvmi::v1::GetRegistersRequest* request,
                                          kvmi::v1::GetRegistersResponse* response) {
  return GetRegistersImpl(context, request, response);
}

Status IntrospectionService::GetRegistersImpl(grpc::ServerContextBase* context,
                                              const kvmi::v1::GetRegistersRequest* request,
                                              kvmi::v1::GetRegistersResponse* response) {
  std::shared_ptr<Guest> guest;
  std::shared_ptr<GuestSession> session;
  Status s = FindGuest(request->vm(), &guest, &session);
  if (!s.ok()) return s;
  if (request->vcpu() >= guest->vcpu_count()) {
    return Invalid("vcpu", std::to_string(request->vcpu()) + " is not below the guest's " +
                               std::to_string(guest->vcpu_count()) + " vCPUs");
  }
  if (static_cast<size_t>(request->msrs_size()) > kvmi::kMaxGetRegistersMsrs) {
    return Invalid("msrs", "at most 226 MSRs fit one reply");
  }
  kvmi::GetRegistersRequest command;
  command.vcpu = static_cast<uint16_t>(request->vcpu());
  command.msrs.assign(request->msrs().begin(), request->msrs().end());
  Waiter<CommandResult> waiter;
  session->Send(command, waiter.callback());
  CommandResult result;
  if (!waiter.Wait(context, &result)) return Status(StatusCode::CANCELLED, "cancelled");
  if (!result.ok()) return ToStatus(result, "GetRegisters");
  kvmi::RegistersReply reply;
  kvmi::DecodeStatus decoded =
      kvmi::DecodeReplyData(kvmi::ByteView(result.data), command.msrs.size(), &reply);
  if (!decoded.ok())
    return Status(StatusCode::INTERNAL, "GetRegisters reply: " + decoded.ToString());
  response->set_mode(reply.mode);
  kvmi::Event as_event;  // reuse the event converter for the register block
  as_event.common.arch.regs = reply.regs;
  as_event.common.arch.sregs = reply.sregs;
  ObservedEvent observed{guest, as_event, Verdict(), {}, 0, {}};
  *response->mutable_registers() = ToProto(observed, true).registers();
  for (const kvm_msr_entry& e : reply.msrs) {
    kvmi::v1::MsrValue* msr = response->add_msrs();
    msr->set_index(e.index);
    msr->set_value(e.data);
  }
  return Status::OK;
}

constexpr uint64_t kMaxApiTransfer = 16ull << 20;

Status IntrospectionService::ReadPhysical(grpc::ServerContext* context,
                                          const kvmi::v1::ReadPhysicalRequest* request,
                                          kvmi::v1::ReadPhysicalResponse* response) {
  return ReadPhysicalImpl(context, request, response);
}

Status IntrospectionService::ReadPhysicalImpl(grpc::ServerContextBase* context,
                                              const kvmi::v1::ReadPhysicalRequest* request,
                                              kvmi::v1::ReadPhysicalResponse* response) {
  std::shared_ptr<Guest> guest;
  std::shared_ptr<GuestSession> session;
  Status s = FindGuest(request->vm(), &guest, &session);
  if (!s.ok()) return s;
  if (request->size() == 0 || request->size() > kMaxApiTransfer) {
    return Invalid("size", "1 .. 16 MiB");
  }
  if (request->gpa() + request->size() < request->gpa()) return Invalid("gpa", "range wraps");
  Waiter<CommandResult> waiter;
  session->ReadPhysical(request->gpa(), request->size(), waiter.callback());
  CommandResult result;
  if (!waiter.Wait(context, &result)) return Status(StatusCode::CANCELLED, "cancelled");
  if (!result.ok()) return ToStatus(result, "ReadPhysical");
  response->set_data(result.data.data(), result.data.size());
  return Status::OK;
}

Status IntrospectionService::WritePhysical(grpc::ServerContext* context,
                                           const kvmi::v1::WritePhysicalRequest* request,
                                           kvmi::v1::WritePhysicalResponse* response) {
  return WritePhysicalImpl(context, request, response);
}

Status IntrospectionService::WritePhysicalImpl(grpc::ServerContextBase* context,
                                               const kvmi::v1::WritePhysicalRequest* request,
                                               kvmi::v1::WritePhysicalResponse*) {
  std::shared_ptr<Guest> guest;
  std::shared_ptr<GuestSession> session;
  Status s = FindGuest(request->vm(), &guest, &session);
  if (!s.ok()) return s;
  if (request->data().empty() || request->data().size() > kMaxApiTransfer) {
    return Invalid("data", "1 byte .. 16 MiB");
  }
  if (request->gpa() + request->data().size() < request->gpa()) {
    return Invalid("gpa", "range wraps");
  }
  Waiter<CommandResult> waiter;
  session->WritePhysical(request->gpa(),
                         std::vector<uint8_t>(request->data().begin(), request->data().end()),
                         waiter.callback());
  CommandResult result;
  if (!waiter.Wait(context, &result)) return Status(StatusCode::CANCELLED, "cancelled");
  return ToStatus(result, "WritePhysical");
}

// Pauses taken through the unary API belong to one owner: any client may resume them.
// What the unary control RPCs pause, restrict or arm belongs to this lease owner; an Attach
// stream's inline commands use the stream's owner instead (released when the stream ends).
const char* const kApiOwner = "api";

Status IntrospectionService::PauseVCPU(grpc::ServerContext* context,
                                       const kvmi::v1::PauseVCPURequest* request,
                                       kvmi::v1::PauseVCPUResponse* response) {
  return PauseFor(kApiOwner, context, request, response);
}

Status IntrospectionService::ResumeVCPU(grpc::ServerContext* context,
                                        const kvmi::v1::ResumeVCPURequest* request,
                                        kvmi::v1::ResumeVCPUResponse* response) {
  return ResumeFor(kApiOwner, context, request, response);
}

Status IntrospectionService::SetPageAccess(grpc::ServerContext* context,
                                           const kvmi::v1::SetPageAccessRequest* request,
                                           kvmi::v1::SetPageAccessResponse* response) {
  return SetPagesFor(kApiOwner, context, request, response);
}

Status IntrospectionService::ControlEvents(grpc::ServerContext* context,
                                           const kvmi::v1::ControlEventsRequest* request,
                                           kvmi::v1::ControlEventsResponse* response) {
  return ControlEventsFor(kApiOwner, context, request, response);
}

Status IntrospectionService::PauseFor(const OwnerId& owner, grpc::ServerContextBase* context,
                                      const kvmi::v1::PauseVCPURequest* request,
                                      kvmi::v1::PauseVCPUResponse* response) {
  std::shared_ptr<Guest> guest;
  Status s = FindGuest(request->vm(), &guest);
  if (!s.ok()) return s;
  uint32_t count = guest->vcpu_count();
  std::vector<uint16_t> vcpus;
  if (request->has_vcpu()) {
    if (request->vcpu() >= count) {
      return Invalid("vcpu", std::to_string(request->vcpu()) + " is not below the guest's " +
                                 std::to_string(count) + " vCPUs");
    }
    vcpus.push_back(static_cast<uint16_t>(request->vcpu()));
  } else {
    for (uint32_t v = 0; v < count; ++v) vcpus.push_back(static_cast<uint16_t>(v));
  }
  std::vector<Waiter<CommandResult>> waiters(vcpus.size());
  for (size_t i = 0; i < vcpus.size(); ++i) {
    guest->Pause(owner, vcpus[i], waiters[i].callback());
  }
  for (size_t i = 0; i < vcpus.size(); ++i) {
    CommandResult result;
    if (!waiters[i].Wait(context, &result)) return Status(StatusCode::CANCELLED, "cancelled");
    if (!result.ok()) return ToStatus(result, "PauseVCPU " + std::to_string(vcpus[i]));
    response->add_paused(vcpus[i]);
  }
  return Status::OK;
}

Status IntrospectionService::ResumeFor(const OwnerId& owner, grpc::ServerContextBase*,
                                       const kvmi::v1::ResumeVCPURequest* request,
                                       kvmi::v1::ResumeVCPUResponse* response) {
  if (request->vm().empty()) return Invalid("vm", "a UUID or name is required");
  std::shared_ptr<Guest> guest = daemon_->registry().Lookup(request->vm());
  if (!guest) return Status(StatusCode::NOT_FOUND, "no guest '" + request->vm() + "'");
  GuestSnapshot snapshot = guest->Snapshot();
  for (const auto& [vcpu, holder] : snapshot.paused_vcpus) {
    if (holder != owner) continue;
    if (request->has_vcpu() && vcpu != request->vcpu()) continue;
    if (guest->Resume(owner, vcpu)) response->add_resumed(vcpu);
  }
  if (request->has_vcpu() && response->resumed_size() == 0) {
    return Status(StatusCode::FAILED_PRECONDITION,
                  "vCPU " + std::to_string(request->vcpu()) + " is not paused by " + owner);
  }
  return Status::OK;
}

Status IntrospectionService::FindVcpu(const std::string& vm, uint32_t vcpu,
                                      std::shared_ptr<Guest>* guest) {
  Status s = FindGuest(vm, guest);
  if (!s.ok()) return s;
  uint32_t count = (*guest)->vcpu_count();
  if (vcpu >= count) {
    return Invalid("vcpu", std::to_string(vcpu) + " is not below the guest's " +
                               std::to_string(count) + " vCPUs");
  }
  return Status::OK;
}

template <typename Request>
Status IntrospectionService::Call(grpc::ServerContextBase* context, Guest& guest,
                                  const Request& request, const char* what,
                                  std::vector<uint8_t>* data) {
  std::shared_ptr<GuestSession> session = guest.session();
  if (!session) return Status(StatusCode::UNAVAILABLE, std::string(what) + ": the guest is gone");
  Waiter<CommandResult> waiter;
  session->Send(request, waiter.callback());
  CommandResult result;
  if (!waiter.Wait(context, &result)) return Status(StatusCode::CANCELLED, "cancelled");
  if (!result.ok()) return ToStatus(result, what);
  *data = std::move(result.data);
  return Status::OK;
}

Status IntrospectionService::GetCPUID(grpc::ServerContext* context,
                                      const kvmi::v1::GetCPUIDRequest* request,
                                      kvmi::v1::GetCPUIDResponse* response) {
  return GetCPUIDImpl(context, request, response);
}

Status IntrospectionService::GetCPUIDImpl(grpc::ServerContextBase* context,
                                          const kvmi::v1::GetCPUIDRequest* request,
                                          kvmi::v1::GetCPUIDResponse* response) {
  std::shared_ptr<Guest> guest;
  Status s = FindVcpu(request->vm(), request->vcpu(), &guest);
  if (!s.ok()) return s;
  kvmi::GetCpuidRequest command;
  command.vcpu = static_cast<uint16_t>(request->vcpu());
  command.function = request->function();
  command.index = request->index();
  std::vector<uint8_t> data;
  if (!(s = Call(context, *guest, command, "GetCPUID", &data)).ok()) return s;
  kvmi::CpuidReply reply;
  kvmi::DecodeStatus decoded = kvmi::DecodeReplyData(kvmi::ByteView(data), &reply);
  if (!decoded.ok()) return Status(StatusCode::INTERNAL, "GetCPUID reply: " + decoded.ToString());
  response->set_eax(reply.eax);
  response->set_ebx(reply.ebx);
  response->set_ecx(reply.ecx);
  response->set_edx(reply.edx);
  return Status::OK;
}

Status IntrospectionService::GetXSAVE(grpc::ServerContext* context,
                                      const kvmi::v1::GetXSAVERequest* request,
                                      kvmi::v1::GetXSAVEResponse* response) {
  std::shared_ptr<Guest> guest;
  Status s = FindVcpu(request->vm(), request->vcpu(), &guest);
  if (!s.ok()) return s;
  kvmi::GetXsaveRequest command;
  command.vcpu = static_cast<uint16_t>(request->vcpu());
  std::vector<uint8_t> data;
  if (!(s = Call(context, *guest, command, "GetXSAVE", &data)).ok()) return s;
  kvmi::XsaveReply reply;
  kvmi::DecodeStatus decoded = kvmi::DecodeReplyData(kvmi::ByteView(data), &reply);
  if (!decoded.ok()) return Status(StatusCode::INTERNAL, "GetXSAVE reply: " + decoded.ToString());
  response->set_region(reply.region.data(), reply.region.size());
  return Status::OK;
}

Status IntrospectionService::GetMTRRType(grpc::ServerContext* context,
                                         const kvmi::v1::GetMTRRTypeRequest* request,
                                         kvmi::v1::GetMTRRTypeResponse* response) {
  return GetMTRRTypeImpl(context, request, response);
}

Status IntrospectionService::GetMTRRTypeImpl(grpc::ServerContextBase* context,
                                             const kvmi::v1::GetMTRRTypeRequest* request,
                                             kvmi::v1::GetMTRRTypeResponse* response) {
  std::shared_ptr<Guest> guest;
  Status s = FindVcpu(request->vm(), request->vcpu(), &guest);
  if (!s.ok()) return s;
  kvmi::GetMtrrTypeRequest command;
  command.vcpu = static_cast<uint16_t>(request->vcpu());
  command.gpa = request->gpa();
  std::vector<uint8_t> data;
  if (!(s = Call(context, *guest, command, "GetMTRRType", &data)).ok()) return s;
  kvmi::MtrrTypeReply reply;
  kvmi::DecodeStatus decoded = kvmi::DecodeReplyData(kvmi::ByteView(data), &reply);
  if (!decoded.ok()) {
    return Status(StatusCode::INTERNAL, "GetMTRRType reply: " + decoded.ToString());
  }
  response->set_type(reply.type);
  return Status::OK;
}

Status IntrospectionService::InjectException(grpc::ServerContext* context,
                                             const kvmi::v1::InjectExceptionRequest* request,
                                             kvmi::v1::InjectExceptionResponse* response) {
  return InjectExceptionImpl(context, request, response);
}

Status IntrospectionService::InjectExceptionImpl(grpc::ServerContextBase* context,
                                                 const kvmi::v1::InjectExceptionRequest* request,
                                                 kvmi::v1::InjectExceptionResponse*) {
  std::shared_ptr<Guest> guest;
  Status s = FindVcpu(request->vm(), request->vcpu(), &guest);
  if (!s.ok()) return s;
  // The v6 kernel does not check the vector (§5.18); anything but an exception vector would
  // reach the guest as garbage, so it is refused here.
  if (request->vector() > 31) return Invalid("vector", "an exception vector is 0..31");
  kvmi::InjectExceptionRequest command;
  command.vcpu = static_cast<uint16_t>(request->vcpu());
  command.nr = static_cast<uint8_t>(request->vector());
  command.has_error = request->has_error_code();
  command.error_code = request->error_code();
  command.address = request->address();
  std::vector<uint8_t> data;
  return Call(context, *guest, command, "InjectException", &data);
}

constexpr int kMaxPagesPerCall = 65536;

Status IntrospectionService::GetPageAccess(grpc::ServerContext* context,
                                           const kvmi::v1::GetPageAccessRequest* request,
                                           kvmi::v1::GetPageAccessResponse* response) {
  return GetPageAccessImpl(context, request, response);
}

Status IntrospectionService::GetPageAccessImpl(grpc::ServerContextBase* context,
                                               const kvmi::v1::GetPageAccessRequest* request,
                                               kvmi::v1::GetPageAccessResponse* response) {
  std::shared_ptr<Guest> guest;
  Status s = FindGuest(request->vm(), &guest);
  if (!s.ok()) return s;
  if (request->gpas_size() == 0 || request->gpas_size() > kMaxPagesPerCall) {
    return Invalid("gpas", "1 .. 65536 addresses");
  }
  std::shared_ptr<GuestSession> session = guest->session();
  if (!session) return Status(StatusCode::UNAVAILABLE, "GetPageAccess: the guest is gone");
  // At most 510 addresses fit one GET_PAGE_ACCESS: pipelined pieces, answered in order.
  std::vector<Waiter<CommandResult>> waiters;
  std::vector<size_t> counts;
  for (int first = 0; first < request->gpas_size();
       first += static_cast<int>(kvmi::kMaxGetPageAccessGpas)) {
    int last =
        std::min(request->gpas_size(), first + static_cast<int>(kvmi::kMaxGetPageAccessGpas));
    kvmi::GetPageAccessRequest command;
    command.gpas.assign(request->gpas().begin() + first, request->gpas().begin() + last);
    counts.push_back(command.gpas.size());
    waiters.emplace_back();
    session->Send(command, waiters.back().callback());
  }
  int index = 0;
  for (size_t i = 0; i < waiters.size(); ++i) {
    CommandResult result;
    if (!waiters[i].Wait(context, &result)) return Status(StatusCode::CANCELLED, "cancelled");
    if (!result.ok()) return ToStatus(result, "GetPageAccess");
    kvmi::PageAccessReply reply;
    kvmi::DecodeStatus decoded =
        kvmi::DecodeReplyData(kvmi::ByteView(result.data), counts[i], &reply);
    if (!decoded.ok()) {
      return Status(StatusCode::INTERNAL, "GetPageAccess reply: " + decoded.ToString());
    }
    for (uint8_t access : reply.access) {
      kvmi::v1::PageRights* page = response->add_pages();
      page->set_gpa(request->gpas(index++));
      page->set_access(AccessLetters(access));
    }
  }
  return Status::OK;
}

// Pages set through the API belong to the caller's lease (restore them with "rwx").
Status IntrospectionService::SetPagesFor(const OwnerId& owner, grpc::ServerContextBase* context,
                                         const kvmi::v1::SetPageAccessRequest* request,
                                         kvmi::v1::SetPageAccessResponse* response) {
  std::shared_ptr<Guest> guest;
  Status s = FindGuest(request->vm(), &guest);
  if (!s.ok()) return s;
  if (request->pages_size() == 0 || request->pages_size() > kMaxPagesPerCall) {
    return Invalid("pages", "1 .. 65536 pages");
  }
  std::vector<std::pair<uint64_t, uint8_t>> pages;
  for (int i = 0; i < request->pages_size(); ++i) {
    uint8_t access;
    if (!ParseAccess(request->pages(i).access(), &access)) {
      return Invalid("pages[" + std::to_string(i) + "].access",
                     "'" + request->pages(i).access() + "' is not made of r, w, x");
    }
    pages.emplace_back(request->pages(i).gpa() / KVMI_PAGE_SIZE, access);
  }
  struct Outcome {
    std::vector<int32_t> errors;
    bool rolled_back = false;
  };
  Waiter<Outcome> waiter;
  auto callback = waiter.callback();
  guest->SetPages(owner, std::move(pages), request->all_or_nothing(),
                  [callback](std::vector<int32_t> errors, bool rolled_back) {
                    callback(Outcome{std::move(errors), rolled_back});
                  });
  Outcome outcome;
  if (!waiter.Wait(context, &outcome)) return Status(StatusCode::CANCELLED, "cancelled");
  for (int i = 0; i < request->pages_size(); ++i) {
    kvmi::v1::PageResult* result = response->add_results();
    result->set_gpa(request->pages(i).gpa());
    if (outcome.errors[i] != 0) result->set_error(kvmi::ErrorName(outcome.errors[i]));
  }
  response->set_rolled_back(outcome.rolled_back);
  return Status::OK;
}

Status IntrospectionService::SetRegisters(grpc::ServerContext* context,
                                          const kvmi::v1::SetRegistersRequest* request,
                                          kvmi::v1::SetRegistersResponse* response) {
  return SetRegistersImpl(context, request, response);
}

Status IntrospectionService::SetRegistersImpl(grpc::ServerContextBase* context,
                                              const kvmi::v1::SetRegistersRequest* request,
                                              kvmi::v1::SetRegistersResponse*) {
  std::shared_ptr<Guest> guest;
  Status s = FindVcpu(request->vm(), request->vcpu(), &guest);
  if (!s.ok()) return s;
  if (!request->has_registers()) return Invalid("registers", "required");
  kvmi::SetRegistersRequest command;
  command.vcpu = static_cast<uint16_t>(request->vcpu());
  command.regs = RegistersFromProto(request->registers());
  // The v6 kernel keeps SET_REGISTERS only while the vCPU waits for an event reply and silently
  // drops it otherwise (§5.13): the session sends it only then, and says so otherwise.
  std::shared_ptr<GuestSession> session = guest->session();
  if (!session) return Status(StatusCode::UNAVAILABLE, "SetRegisters: the guest is gone");
  Waiter<CommandResult> waiter;
  session->SendWhileVcpuWaits(command.vcpu, command, waiter.callback());
  CommandResult result;
  if (!waiter.Wait(context, &result)) return Status(StatusCode::CANCELLED, "cancelled");
  if (result.status == CommandResult::Status::kNotWaiting) {
    result.message += "; registers can only be set while it waits for a verdict (pause it first)";
  }
  return ToStatus(result, "SetRegisters");
}

Status IntrospectionService::ControlSPP(grpc::ServerContext* context,
                                        const kvmi::v1::ControlSPPRequest* request,
                                        kvmi::v1::ControlSPPResponse*) {
  std::shared_ptr<Guest> guest;
  Status s = FindGuest(request->vm(), &guest);
  if (!s.ok()) return s;
  kvmi::ControlSppRequest command;
  command.enable = true;
  std::vector<uint8_t> data;
  return Call(context, *guest, command, "ControlSPP", &data);
}

Status IntrospectionService::GetPageWriteBitmap(grpc::ServerContext* context,
                                                const kvmi::v1::GetPageWriteBitmapRequest* request,
                                                kvmi::v1::GetPageWriteBitmapResponse* response) {
  std::shared_ptr<Guest> guest;
  Status s = FindGuest(request->vm(), &guest);
  if (!s.ok()) return s;
  if (request->gpas_size() == 0 ||
      static_cast<size_t>(request->gpas_size()) > kvmi::kMaxGetPageAccessGpas) {
    return Invalid("gpas", "1 .. 510 addresses");
  }
  kvmi::GetPageWriteBitmapRequest command;
  command.gpas.assign(request->gpas().begin(), request->gpas().end());
  std::vector<uint8_t> data;
  if (!(s = Call(context, *guest, command, "GetPageWriteBitmap", &data)).ok()) return s;
  kvmi::PageWriteBitmapReply reply;
  kvmi::DecodeStatus decoded =
      kvmi::DecodeReplyData(kvmi::ByteView(data), command.gpas.size(), &reply);
  if (!decoded.ok()) {
    return Status(StatusCode::INTERNAL, "GetPageWriteBitmap reply: " + decoded.ToString());
  }
  for (size_t i = 0; i < reply.bitmaps.size(); ++i) {
    kvmi::v1::PageWriteBitmap* page = response->add_pages();
    page->set_gpa(command.gpas[i]);
    page->set_bitmap(reply.bitmaps[i]);
  }
  return Status::OK;
}

Status IntrospectionService::SetPageWriteBitmap(grpc::ServerContext* context,
                                                const kvmi::v1::SetPageWriteBitmapRequest* request,
                                                kvmi::v1::SetPageWriteBitmapResponse*) {
  std::shared_ptr<Guest> guest;
  Status s = FindGuest(request->vm(), &guest);
  if (!s.ok()) return s;
  if (request->pages_size() == 0 ||
      static_cast<size_t>(request->pages_size()) > kvmi::kMaxSetPageAccessEntries) {
    return Invalid("pages", "1 .. 255 pages");
  }
  kvmi::SetPageWriteBitmapRequest command;
  for (const auto& page : request->pages()) command.entries.push_back({page.gpa(), page.bitmap()});
  std::vector<uint8_t> data;
  return Call(context, *guest, command, "SetPageWriteBitmap", &data);
}

Status IntrospectionService::UnhookVM(grpc::ServerContext* context,
                                      const kvmi::v1::UnhookVMRequest* request,
                                      kvmi::v1::UnhookVMResponse*) {
  std::shared_ptr<Guest> guest;
  Status s = FindGuest(request->vm(), &guest);
  if (!s.ok()) return s;
  Waiter<bool> unhooked;
  auto callback = unhooked.callback();
  guest->Unhook("requested through the API", [callback] { callback(true); });
  bool done = false;
  if (!unhooked.Wait(context, &done)) return Status(StatusCode::CANCELLED, "cancelled");
  return Status::OK;
}

Status IntrospectionService::ControlEventsFor(const OwnerId& owner,
                                              grpc::ServerContextBase* context,
                                              const kvmi::v1::ControlEventsRequest* request,
                                              kvmi::v1::ControlEventsResponse* response) {
  std::shared_ptr<Guest> guest;
  Status s = request->has_vcpu() ? FindVcpu(request->vm(), request->vcpu(), &guest)
                                 : FindGuest(request->vm(), &guest);
  if (!s.ok()) return s;
  if (request->events_size() == 0 && request->crs_size() == 0 && request->msrs_size() == 0) {
    return Invalid("events", "name at least one event, CR or MSR");
  }
  VcpuArming change;
  std::set<uint8_t> vm_events;
  for (int i = 0; i < request->events_size(); ++i) {
    const std::string field = "events[" + std::to_string(i) + "]";
    uint8_t id;
    if (!FromEventType(request->events(i), &id) || id == KVMI_EVENT_PAUSE_VCPU) {
      return Invalid(field, "not an event that can be enabled (PAUSE_VCPU is always on)");
    }
    if (!guest->EventAllowed(id)) {
      return Status(StatusCode::PERMISSION_DENIED,
                    field + ": the host does not allow " + kvmi::EventName(id) + " for this guest");
    }
    if (kvmi::FindEvent(id)->vm_event) {
      if (request->has_vcpu()) return Invalid(field, "a VM event cannot be set for one vCPU");
      vm_events.insert(id);
    } else {
      change.events.insert(id);
    }
  }
  for (int i = 0; i < request->crs_size(); ++i) {
    if (!ControllableCr(request->crs(i))) {
      return Invalid("crs[" + std::to_string(i) + "]", kControllableCrs);
    }
    change.crs.insert(request->crs(i));
  }
  for (int i = 0; i < request->msrs_size(); ++i) {
    if (!ControllableMsr(request->msrs(i))) {
      return Invalid("msrs[" + std::to_string(i) + "]", kControllableMsrs);
    }
    change.msrs.insert(request->msrs(i));
  }

  const bool enable = request->enable();
  const std::optional<uint16_t> vcpu =
      request->has_vcpu() ? std::optional<uint16_t>(static_cast<uint16_t>(request->vcpu()))
                          : std::nullopt;
  Waiter<std::vector<std::string>> armed;
  auto change_lease = [&](Arming* arming) {
    auto apply = [enable](const auto& what, auto* into) {
      for (const auto& x : what) {
        if (enable) {
          into->insert(x);
        } else {
          into->erase(x);
        }
      }
    };
    apply(vm_events, &arming->vm_events);
    if (!vcpu) {
      apply(change.events, &arming->vcpu_events);
      apply(change.crs, &arming->crs);
      apply(change.msrs, &arming->msrs);
      // "every vCPU" off also turns off what this owner had on single vCPUs.
      if (!enable) {
        for (auto& [unused, own] : arming->vcpu_only) {
          apply(change.events, &own.events);
          apply(change.crs, &own.crs);
          apply(change.msrs, &own.msrs);
        }
      }
    } else {
      VcpuArming& own = arming->vcpu_only[*vcpu];
      apply(change.events, &own.events);
      apply(change.crs, &own.crs);
      apply(change.msrs, &own.msrs);
    }
    for (auto it = arming->vcpu_only.begin(); it != arming->vcpu_only.end();) {
      it = it->second.empty() ? arming->vcpu_only.erase(it) : std::next(it);
    }
  };
  Arming lease = guest->UpdateLease(owner, change_lease, armed.callback());
  *response->mutable_lease() = ToProto(owner, lease);
  // Answer once the host has acknowledged what this change sent (bounded by kvmid's command
  // timeout), with the commands it refused.
  std::vector<std::string> errors;
  if (!armed.Wait(context, &errors)) return Status(StatusCode::CANCELLED, "cancelled");
  for (std::string& e : errors) response->add_arm_errors(std::move(e));
  return Status::OK;
}

Status IntrospectionService::WatchVMs(grpc::ServerContext* context,
                                      const kvmi::v1::WatchVMsRequest*,
                                      grpc::ServerWriter<kvmi::v1::VMChange>* writer) {
  struct Changes {
    std::mutex mutex;
    std::condition_variable cv;
    std::deque<std::shared_ptr<Guest>> guests;
  };
  auto changes = std::make_shared<Changes>();
  uint64_t watcher =
      daemon_->registry().AddStateWatcher([changes](const std::shared_ptr<Guest>& g) {
        std::lock_guard<std::mutex> lock(changes->mutex);
        if (changes->guests.size() < 65536)
          changes->guests.push_back(g);  // bounded: a stuck reader
        changes->cv.notify_one();
      });
  bool open = true;
  for (const auto& guest : daemon_->registry().List()) {
    kvmi::v1::VMChange change;
    change.set_kind(kvmi::v1::VMChange::KIND_EXISTING);
    *change.mutable_vm() = ToProto(guest->Snapshot(), daemon_->pipeline().ViewOf(*guest)->labels);
    if (!(open = writer->Write(change))) break;
  }
  while (open && !context->IsCancelled()) {
    std::deque<std::shared_ptr<Guest>> batch;
    {
      std::unique_lock<std::mutex> lock(changes->mutex);
      changes->cv.wait_for(lock, std::chrono::milliseconds(200),
                           [&] { return !changes->guests.empty(); });
      batch.swap(changes->guests);
    }
    for (const auto& guest : batch) {
      kvmi::v1::VMChange change;
      change.set_kind(kvmi::v1::VMChange::KIND_CHANGED);
      *change.mutable_vm() = ToProto(guest->Snapshot(), daemon_->pipeline().ViewOf(*guest)->labels);
      if (!(open = writer->Write(change))) break;
    }
  }
  daemon_->registry().RemoveStateWatcher(watcher);
  return Status::OK;
}

// ---- ApiServer --------------------------------------------------------------------------------

ApiServer::ApiServer(Daemon* daemon, size_t history)
    : history_(std::make_unique<EventHistory>(&daemon->pipeline(), history)),
      service_(std::make_unique<IntrospectionService>(daemon, history_.get())) {}

ApiServer::~ApiServer() { Shutdown(); }

std::string ApiServer::Start(const security::ApiListenOptions& options) {
  absl::Status valid = security::ValidateListenOptions(options);
  if (!valid.ok()) return std::string(valid.message());
  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  if (!options.unix_socket.empty()) {
    auto listener = security::UnixApiListener::Bind(options.unix_socket, options.unix_socket_mode,
                                                    options.unix_socket_group);
    if (!listener.ok()) return std::string(listener.status().message());
    unix_listener_ = std::move(*listener);
  }
  if (!options.tcp.empty()) {
    auto credentials = security::TcpServerCredentials(options);
    if (!credentials.ok()) return std::string(credentials.status().message());
    builder.AddListeningPort(options.tcp, *credentials, &tcp_port_);
  }
  builder.RegisterService(service_.get());
  server_ = builder.BuildAndStart();
  if (!server_) return "cannot serve the API on " + options.tcp;
  if (!options.tcp.empty() && tcp_port_ == 0) return "cannot listen on " + options.tcp;
  if (unix_listener_) unix_listener_->Start(server_.get());
  spdlog::info("API (kvmi.v1.Introspection, reflection, health) on {}{}{}",
               options.unix_socket.empty() ? "" : "unix:" + options.unix_socket + " ", options.tcp,
               options.tcp.empty()              ? ""
               : options.tcp_insecure_plaintext ? " (PLAINTEXT, loopback)"
                                                : " (mutual TLS)");
  return "";
}

void ApiServer::Shutdown() {
  // No new UNIX connections for a server going away; then the server (which closes the ones it
  // has).
  if (unix_listener_) unix_listener_->Stop();
  if (!server_) return;
  // Streams end within their 200 ms poll; give them a moment, then cut.
  server_->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(1));
  server_.reset();
}

}  // namespace kvmid
