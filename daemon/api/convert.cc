#include "daemon/api/convert.h"

#include <cstring>

#include "daemon/config/policy_convert.h"
#include "daemon/export/node_name.h"
#include "kernel/abi/protocol.h"

namespace kvmid {
namespace {

using grpc::Status;
using grpc::StatusCode;

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

StatusCode CodeOfKvmiError(int32_t err) {
  switch (-err) {
    case KVM_EINVAL:
      return StatusCode::INVALID_ARGUMENT;
    case KVM_EPERM:
      return StatusCode::PERMISSION_DENIED;
    case KVM_ENOENT:
      return StatusCode::NOT_FOUND;
    case KVM_EAGAIN:
    case KVM_EBUSY:
      return StatusCode::UNAVAILABLE;
    case KVM_EOPNOTSUPP:
      return StatusCode::UNIMPLEMENTED;
    case KVM_ENOMEM:
      return StatusCode::RESOURCE_EXHAUSTED;
    default:
      return StatusCode::UNKNOWN;
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
  // QEMU reports whole seconds since the epoch; 0 means it sent none (left unset).
  if (s.identity.start_time != 0) vm.mutable_start_time()->set_seconds(s.identity.start_time);
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

kvmi::v1::Registers RegistersToProto(const kvm_regs& r, const kvm_sregs& sr) {
  kvmi::v1::Registers regs;
  regs.set_rax(r.rax), regs.set_rbx(r.rbx), regs.set_rcx(r.rcx), regs.set_rdx(r.rdx);
  regs.set_rsi(r.rsi), regs.set_rdi(r.rdi), regs.set_rsp(r.rsp), regs.set_rbp(r.rbp);
  regs.set_r8(r.r8), regs.set_r9(r.r9), regs.set_r10(r.r10), regs.set_r11(r.r11);
  regs.set_r12(r.r12), regs.set_r13(r.r13), regs.set_r14(r.r14), regs.set_r15(r.r15);
  regs.set_rip(r.rip), regs.set_rflags(r.rflags);
  regs.set_cr0(sr.cr0), regs.set_cr3(sr.cr3), regs.set_cr4(sr.cr4), regs.set_efer(sr.efer);
  return regs;
}

absl::StatusOr<EventFields> CompileEventMask(const google::protobuf::FieldMask& mask,
                                             const std::string& field) {
  EventFields out;
  if (mask.paths_size() == 0) return out;
  const google::protobuf::Descriptor* event = kvmi::v1::Event::descriptor();
  uint64_t bits = uint64_t{1} << kvmi::v1::Event::kIdFieldNumber;  // always sent
  for (int i = 0; i < mask.paths_size(); ++i) {
    const std::string& path = mask.paths(i);
    if (const google::protobuf::OneofDescriptor* oneof = event->FindOneofByName(path)) {
      for (int f = 0; f < oneof->field_count(); ++f)
        bits |= uint64_t{1} << oneof->field(f)->number();
      continue;
    }
    const google::protobuf::FieldDescriptor* fd = event->FindFieldByName(path);
    if (fd == nullptr || fd->number() >= 64) {
      return absl::InvalidArgumentError(
          field + ".paths[" + std::to_string(i) + "]: '" + path.substr(0, 64) +
          "' is not a field of kvmi.v1.Event (top-level field names, or \"detail\")");
    }
    bits |= uint64_t{1} << fd->number();
  }
  out.bits_ = bits;
  return out;
}

kvmi::v1::Event ToProto(const ObservedEvent& o, bool include_registers, const EventFields& want) {
  using E = kvmi::v1::Event;
  kvmi::v1::Event out;
  const kvmi::Event& e = o.event;
  out.set_id(o.event_id);
  if (want.Has(E::kVmUuidFieldNumber) || want.Has(E::kVmNameFieldNumber) ||
      want.Has(E::kVmLabelsFieldNumber)) {
    if (std::shared_ptr<const GuestView> view = o.guest->cached_view()) {
      if (want.Has(E::kVmUuidFieldNumber)) out.set_vm_uuid(kvmi::UuidToString(view->uuid));
      if (want.Has(E::kVmNameFieldNumber)) out.set_vm_name(view->name);
      if (want.Has(E::kVmLabelsFieldNumber)) {
        out.mutable_vm_labels()->insert(view->labels.begin(), view->labels.end());
      }
    }
  }
  if (want.Has(E::kVcpuFieldNumber)) out.set_vcpu(e.vcpu());
  if (want.Has(E::kTypeFieldNumber)) out.set_type(ToEventType(e.id()));
  if (want.Has(E::kModeFieldNumber)) out.set_mode(e.common.arch.mode);
  if (want.Has(E::kRipFieldNumber)) out.set_rip(e.common.arch.regs.rip);
  switch (e.id()) {  // each detail only if asked for
    case KVMI_EVENT_CR:
      if (!want.Has(E::kCrFieldNumber)) break;
      out.mutable_cr()->set_cr(e.specific.cr.cr);
      out.mutable_cr()->set_old_value(e.specific.cr.old_value);
      out.mutable_cr()->set_new_value(e.specific.cr.new_value);
      break;
    case KVMI_EVENT_MSR:
      if (!want.Has(E::kMsrFieldNumber)) break;
      out.mutable_msr()->set_msr(e.specific.msr.msr);
      out.mutable_msr()->set_old_value(e.specific.msr.old_value);
      out.mutable_msr()->set_new_value(e.specific.msr.new_value);
      break;
    case KVMI_EVENT_PF:
      if (!want.Has(E::kPfFieldNumber)) break;
      out.mutable_pf()->set_gva(e.specific.pf.gva);
      out.mutable_pf()->set_gpa(e.specific.pf.gpa);
      out.mutable_pf()->set_access(AccessLetters(e.specific.pf.access));
      break;
    case KVMI_EVENT_BREAKPOINT:
      if (!want.Has(E::kBreakpointFieldNumber)) break;
      out.mutable_breakpoint()->set_gpa(e.specific.breakpoint.gpa);
      out.mutable_breakpoint()->set_insn_len(e.specific.breakpoint.insn_len);
      break;
    case KVMI_EVENT_TRAP:
      if (!want.Has(E::kTrapFieldNumber)) break;
      out.mutable_trap()->set_vector(e.specific.trap.vector);
      out.mutable_trap()->set_type(e.specific.trap.type);
      out.mutable_trap()->set_error_code(e.specific.trap.error_code);
      out.mutable_trap()->set_cr2(e.specific.trap.cr2);
      break;
    case KVMI_EVENT_DESCRIPTOR:
      if (!want.Has(E::kDescriptorTableFieldNumber)) break;
      out.mutable_descriptor_table()->set_table(e.specific.descriptor.descriptor);
      out.mutable_descriptor_table()->set_write(e.specific.descriptor.write != 0);
      break;
    default:
      break;
  }
  if (kvmi::FindEvent(e.id())->has_reply) {
    if (want.Has(E::kActionFieldNumber)) out.set_action(ActionOf(o.verdict));
    if (want.Has(E::kKeptOldValueFieldNumber)) out.set_kept_old_value(o.verdict.keep_old);
  }
  if (want.Has(E::kDecidedByFieldNumber)) out.set_decided_by(o.verdict.decided_by);
  if (want.Has(E::kMonitorHitsFieldNumber)) {
    for (const std::string& rule : o.monitor_hits) out.add_monitor_hits(rule);
  }
  if (want.Has(E::kLatencyFieldNumber)) {
    const int64_t latency_ns = std::chrono::nanoseconds(o.latency).count();
    out.mutable_latency()->set_seconds(latency_ns / 1000000000);
    out.mutable_latency()->set_nanos(static_cast<int32_t>(latency_ns % 1000000000));
  }
  if (want.Has(E::kTimeFieldNumber) && o.time.time_since_epoch().count() != 0) {
    const auto ns = std::chrono::duration_cast<std::chrono::nanoseconds>(o.time.time_since_epoch());
    out.mutable_time()->set_seconds(ns.count() / 1000000000);
    out.mutable_time()->set_nanos(static_cast<int32_t>(ns.count() % 1000000000));
  }
  if (want.Has(E::kNodeFieldNumber)) out.set_node(NodeName());
  if (include_registers && want.Has(E::kRegistersFieldNumber)) {
    *out.mutable_registers() = RegistersToProto(e.common.arch.regs, e.common.arch.sregs);
  }
  if (o.context && want.Has(E::kContextFieldNumber))
    ContextToProto(*o.context, out.mutable_context());
  return out;
}

grpc::Status ContextDemandFromProto(const kvmi::v1::ContextRequest& request,
                                    const std::string& field, vmem::ContextDemand* out) {
  const std::pair<const char*, uint32_t> fields[] = {
      {"rip_bytes", request.rip_bytes()},
      {"rsp_bytes", request.rsp_bytes()},
      {"pf_bytes", request.pf_bytes()},
  };
  for (const auto& [name, bytes] : fields) {
    if (bytes > vmem::kMaxContextBytes) {
      return InvalidArgument(field + "." + name, std::to_string(bytes) +
                                                     " bytes, above the limit of " +
                                                     std::to_string(vmem::kMaxContextBytes));
    }
  }
  *out = vmem::ContextDemand{request.rip_bytes(), request.rsp_bytes(), request.pf_bytes()};
  return grpc::Status::OK;
}

void ContextToProto(const vmem::CapturedContext& context, kvmi::v1::EventContext* out) {
  for (const vmem::ContextBlock& block : context.blocks) {
    kvmi::v1::ContextBlock* b = nullptr;
    switch (block.kind) {
      case vmem::ContextKind::kRip:
        b = out->mutable_rip();
        break;
      case vmem::ContextKind::kRsp:
        b = out->mutable_rsp();
        break;
      case vmem::ContextKind::kPf:
        b = out->mutable_pf();
        break;
    }
    b->set_gva(block.gva);
    b->set_size(block.size);
    b->set_data(block.data.data(), block.data.size());
    b->set_complete(block.complete);
    b->set_why(block.why);
  }
}

kvm_regs RegistersFromProto(const kvmi::v1::Registers& r) {
  kvm_regs regs{};
  regs.rax = r.rax(), regs.rbx = r.rbx(), regs.rcx = r.rcx(), regs.rdx = r.rdx();
  regs.rsi = r.rsi(), regs.rdi = r.rdi(), regs.rsp = r.rsp(), regs.rbp = r.rbp();
  regs.r8 = r.r8(), regs.r9 = r.r9(), regs.r10 = r.r10(), regs.r11 = r.r11();
  regs.r12 = r.r12(), regs.r13 = r.r13(), regs.r14 = r.r14(), regs.r15 = r.r15();
  regs.rip = r.rip(), regs.rflags = r.rflags();
  return regs;
}

absl::Status FromProto(const kvmi::v1::Verdict& in, const kvmi::Event& event, Verdict* out) {
  const kvmi::EventInfo* info = kvmi::FindEvent(event.id());
  const bool cr_or_msr = event.id() == KVMI_EVENT_CR || event.id() == KVMI_EVENT_MSR;
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
      if (!cr_or_msr) {
        return absl::InvalidArgumentError(
            "action: ACTION_KEEP_OLD applies to CR and MSR events only");
      }
      out->action = KVMI_EVENT_ACTION_CONTINUE;
      out->keep_old = true;
      break;
    default:
      return absl::InvalidArgumentError("action: required (CONTINUE, RETRY, CRASH or KEEP_OLD)");
  }
  // Nothing the event cannot take reaches the guest: RETRY on a CR write would make it #GP.
  if ((info->allowed_actions & (1u << out->action)) == 0) {
    return absl::InvalidArgumentError(std::string("action: ") + kvmi::ActionName(out->action) +
                                      " is not an action of " + kvmi::EventName(event.id()));
  }
  if (in.has_new_value()) {
    if (!cr_or_msr) {
      return absl::InvalidArgumentError("new_value: only CR and MSR events take a new value");
    }
    if (out->keep_old)
      return absl::InvalidArgumentError("new_value: conflicts with ACTION_KEEP_OLD");
    out->new_value = in.new_value();
  }
  if (in.has_pf()) {
    if (event.id() != KVMI_EVENT_PF) {
      return absl::InvalidArgumentError("pf: only PF events take PF reply data");
    }
    if (in.pf().ctx_data().size() > KVMI_CTX_DATA_SIZE) {
      return absl::InvalidArgumentError("pf.ctx_data: at most " +
                                        std::to_string(KVMI_CTX_DATA_SIZE) + " bytes");
    }
    kvmi_event_pf_reply pf{};
    pf.ctx_addr = in.pf().ctx_addr();
    pf.ctx_size = static_cast<uint32_t>(in.pf().ctx_data().size());
    std::memcpy(pf.ctx_data, in.pf().ctx_data().data(), in.pf().ctx_data().size());
    pf.singlestep = in.pf().singlestep() ? 1 : 0;
    pf.rep_complete = in.pf().rep_complete() ? 1 : 0;
    out->pf = pf;
  }
  if (in.has_set_registers()) out->registers = RegistersFromProto(in.set_registers());
  return absl::OkStatus();
}

Status InvalidArgument(const std::string& field, const std::string& why) {
  return Status(StatusCode::INVALID_ARGUMENT, field + ": " + why);
}

Status Cancelled() { return Status(StatusCode::CANCELLED, "cancelled"); }

Status ToStatus(const CommandResult& r, const std::string& what) {
  switch (r.status) {
    case CommandResult::Status::kOk:
      return Status::OK;
    case CommandResult::Status::kKvmiError:
      return Status(CodeOfKvmiError(r.err), what + ": the host answered " + kvmi::ErrorName(r.err));
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

Status ToStatus(const absl::Status& status) {
  if (status.ok()) return Status::OK;
  // absl::StatusCode and grpc::StatusCode share their numbering (both follow google.rpc.Code).
  return Status(static_cast<StatusCode>(status.code()), std::string(status.message()));
}

}  // namespace kvmid
