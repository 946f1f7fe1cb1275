#include "daemon/api/guest_commands.h"

#include <string>
#include <vector>

#include "daemon/config/policy_convert.h"
#include "kernel/abi/protocol.h"

namespace kvmid::api {

using grpc::Status;

Status GuestCommands::GetRegisters(Context* context, const kvmi::v1::GetRegistersRequest& request,
                                   kvmi::v1::GetRegistersResponse* response) {
  Target target;
  Status s = guests_.FindVcpu(request.vm(), request.vcpu(), &target);
  if (!s.ok()) return s;
  if (static_cast<size_t>(request.msrs_size()) > kvmi::kMaxGetRegistersMsrs) {
    return InvalidArgument(
        "msrs", "at most " + std::to_string(kvmi::kMaxGetRegistersMsrs) + " MSRs fit one reply");
  }
  kvmi::GetRegistersRequest command;
  command.vcpu = static_cast<uint16_t>(request.vcpu());
  command.msrs.assign(request.msrs().begin(), request.msrs().end());
  std::vector<uint8_t> data;
  if (!(s = Call(context, *target.session, command, "GetRegisters", &data)).ok()) return s;
  kvmi::RegistersReply reply;
  if (!(s = DecodeReply(data, "GetRegisters", &reply, command.msrs.size())).ok()) return s;
  response->set_mode(reply.mode);
  *response->mutable_registers() = RegistersToProto(reply.regs, reply.sregs);
  for (const kvm_msr_entry& e : reply.msrs) {
    kvmi::v1::MsrValue* msr = response->add_msrs();
    msr->set_index(e.index);
    msr->set_value(e.data);
  }
  return Status::OK;
}

Status GuestCommands::SetRegisters(Context* context, const kvmi::v1::SetRegistersRequest& request,
                                   kvmi::v1::SetRegistersResponse*) {
  Target target;
  Status s = guests_.FindVcpu(request.vm(), request.vcpu(), &target);
  if (!s.ok()) return s;
  if (!request.has_registers()) return InvalidArgument("registers", "required");
  kvmi::SetRegistersRequest command;
  command.vcpu = static_cast<uint16_t>(request.vcpu());
  command.regs = RegistersFromProto(request.registers());
  // The v6 kernel keeps SET_REGISTERS only while the vCPU waits for an event reply and silently
  // drops it otherwise (§5.13): the session sends it only then (and, with event_id, only while
  // that is the event it waits for), and says so otherwise.
  Waiter<CommandResult> waiter;
  target.session->SendWhileVcpuWaits(command.vcpu, command, waiter.callback(), request.event_id());
  CommandResult result;
  if (!(s = Await(context, &waiter, &result)).ok()) return s;
  if (result.status == CommandResult::Status::kNotWaiting) {
    result.message += request.event_id() != 0
                          ? "; nothing was set (event_id names the event the registers are for)"
                          : "; registers can only be set while it waits for a verdict (pause it "
                            "first)";
  }
  return ToStatus(result, "SetRegisters");
}

Status GuestCommands::ReadPhysical(Context* context, const kvmi::v1::ReadPhysicalRequest& request,
                                   kvmi::v1::ReadPhysicalResponse* response) {
  Target target;
  Status s = guests_.Find(request.vm(), &target);
  if (!s.ok()) return s;
  if (request.size() == 0 || request.size() > kMaxTransferBytes) {
    return InvalidArgument("size", std::string("1 .. ") + kMaxTransferText);
  }
  if (request.gpa() + request.size() < request.gpa()) return InvalidArgument("gpa", "range wraps");
  Waiter<CommandResult> waiter;
  target.session->ReadPhysical(request.gpa(), request.size(), waiter.callback());
  CommandResult result;
  if (!(s = Await(context, &waiter, &result)).ok()) return s;
  if (!result.ok()) return ToStatus(result, "ReadPhysical");
  response->set_data(result.data.data(), result.data.size());
  return Status::OK;
}

Status GuestCommands::WritePhysical(Context* context, const kvmi::v1::WritePhysicalRequest& request,
                                    kvmi::v1::WritePhysicalResponse*) {
  Target target;
  Status s = guests_.Find(request.vm(), &target);
  if (!s.ok()) return s;
  if (request.data().empty() || request.data().size() > kMaxTransferBytes) {
    return InvalidArgument("data", std::string("1 byte .. ") + kMaxTransferText);
  }
  if (request.gpa() + request.data().size() < request.gpa()) {
    return InvalidArgument("gpa", "range wraps");
  }
  Waiter<CommandResult> waiter;
  target.session->WritePhysical(request.gpa(),
                                std::vector<uint8_t>(request.data().begin(), request.data().end()),
                                waiter.callback());
  CommandResult result;
  if (!(s = Await(context, &waiter, &result)).ok()) return s;
  // Even a failed write may have written some pages: cached translations through them go.
  translation_.OnPhysicalWrite(*target.guest, request.gpa(), request.data().size());
  return ToStatus(result, "WritePhysical");
}

Status GuestCommands::GetCPUID(Context* context, const kvmi::v1::GetCPUIDRequest& request,
                               kvmi::v1::GetCPUIDResponse* response) {
  Target target;
  Status s = guests_.FindVcpu(request.vm(), request.vcpu(), &target);
  if (!s.ok()) return s;
  kvmi::GetCpuidRequest command;
  command.vcpu = static_cast<uint16_t>(request.vcpu());
  command.function = request.function();
  command.index = request.index();
  std::vector<uint8_t> data;
  if (!(s = Call(context, *target.session, command, "GetCPUID", &data)).ok()) return s;
  kvmi::CpuidReply reply;
  if (!(s = DecodeReply(data, "GetCPUID", &reply)).ok()) return s;
  response->set_eax(reply.eax);
  response->set_ebx(reply.ebx);
  response->set_ecx(reply.ecx);
  response->set_edx(reply.edx);
  return Status::OK;
}

Status GuestCommands::GetXSAVE(Context* context, const kvmi::v1::GetXSAVERequest& request,
                               kvmi::v1::GetXSAVEResponse* response) {
  Target target;
  Status s = guests_.FindVcpu(request.vm(), request.vcpu(), &target);
  if (!s.ok()) return s;
  kvmi::GetXsaveRequest command;
  command.vcpu = static_cast<uint16_t>(request.vcpu());
  std::vector<uint8_t> data;
  if (!(s = Call(context, *target.session, command, "GetXSAVE", &data)).ok()) return s;
  kvmi::XsaveReply reply;
  if (!(s = DecodeReply(data, "GetXSAVE", &reply)).ok()) return s;
  response->set_region(reply.region.data(), reply.region.size());
  return Status::OK;
}

Status GuestCommands::GetMTRRType(Context* context, const kvmi::v1::GetMTRRTypeRequest& request,
                                  kvmi::v1::GetMTRRTypeResponse* response) {
  Target target;
  Status s = guests_.FindVcpu(request.vm(), request.vcpu(), &target);
  if (!s.ok()) return s;
  kvmi::GetMtrrTypeRequest command;
  command.vcpu = static_cast<uint16_t>(request.vcpu());
  command.gpa = request.gpa();
  std::vector<uint8_t> data;
  if (!(s = Call(context, *target.session, command, "GetMTRRType", &data)).ok()) return s;
  kvmi::MtrrTypeReply reply;
  if (!(s = DecodeReply(data, "GetMTRRType", &reply)).ok()) return s;
  response->set_type(reply.type);
  return Status::OK;
}

Status GuestCommands::InjectException(Context* context,
                                      const kvmi::v1::InjectExceptionRequest& request,
                                      kvmi::v1::InjectExceptionResponse*) {
  Target target;
  Status s = guests_.FindVcpu(request.vm(), request.vcpu(), &target);
  if (!s.ok()) return s;
  // The v6 kernel does not check the vector (§5.18); anything but an exception vector would
  // reach the guest as garbage, so it is refused here.
  if (request.vector() > kMaxExceptionVector) {
    return InvalidArgument("vector",
                           "an exception vector is 0.." + std::to_string(kMaxExceptionVector));
  }
  kvmi::InjectExceptionRequest command;
  command.vcpu = static_cast<uint16_t>(request.vcpu());
  command.nr = static_cast<uint8_t>(request.vector());
  command.has_error = request.has_error_code();
  command.error_code = request.error_code();
  command.address = request.address();
  std::vector<uint8_t> data;
  return Call(context, *target.session, command, "InjectException", &data);
}

Status GuestCommands::GetPageAccess(Context* context, const kvmi::v1::GetPageAccessRequest& request,
                                    kvmi::v1::GetPageAccessResponse* response) {
  Target target;
  Status s = guests_.Find(request.vm(), &target);
  if (!s.ok()) return s;
  if (request.gpas_size() == 0 || request.gpas_size() > kMaxPagesPerCall) {
    return InvalidArgument("gpas", "1 .. " + std::to_string(kMaxPagesPerCall) + " addresses");
  }
  struct Outcome {
    CommandResult result;
    std::vector<uint8_t> access;
  };
  Waiter<Outcome> waiter;
  target.session->GetPageAccess(
      std::vector<uint64_t>(request.gpas().begin(), request.gpas().end()),
      [done = waiter.callback()](CommandResult result, std::vector<uint8_t> access) {
        done(Outcome{std::move(result), std::move(access)});
      });
  Outcome outcome;
  if (!(s = Await(context, &waiter, &outcome)).ok()) return s;
  if (!outcome.result.ok()) return ToStatus(outcome.result, "GetPageAccess");
  for (size_t i = 0; i < outcome.access.size(); ++i) {
    kvmi::v1::PageRights* page = response->add_pages();
    page->set_gpa(request.gpas(static_cast<int>(i)));
    page->set_access(AccessLetters(outcome.access[i]));
  }
  return Status::OK;
}

Status GuestCommands::ControlSPP(Context* context, const kvmi::v1::ControlSPPRequest& request,
                                 kvmi::v1::ControlSPPResponse*) {
  Target target;
  Status s = guests_.Find(request.vm(), &target);
  if (!s.ok()) return s;
  kvmi::ControlSppRequest command;
  command.enable = true;
  std::vector<uint8_t> data;
  return Call(context, *target.session, command, "ControlSPP", &data);
}

Status GuestCommands::GetPageWriteBitmap(Context* context,
                                         const kvmi::v1::GetPageWriteBitmapRequest& request,
                                         kvmi::v1::GetPageWriteBitmapResponse* response) {
  Target target;
  Status s = guests_.Find(request.vm(), &target);
  if (!s.ok()) return s;
  if (request.gpas_size() == 0 ||
      static_cast<size_t>(request.gpas_size()) > kvmi::kMaxGetPageAccessGpas) {
    return InvalidArgument("gpas",
                           "1 .. " + std::to_string(kvmi::kMaxGetPageAccessGpas) + " addresses");
  }
  kvmi::GetPageWriteBitmapRequest command;
  command.gpas.assign(request.gpas().begin(), request.gpas().end());
  std::vector<uint8_t> data;
  if (!(s = Call(context, *target.session, command, "GetPageWriteBitmap", &data)).ok()) return s;
  kvmi::PageWriteBitmapReply reply;
  if (!(s = DecodeReply(data, "GetPageWriteBitmap", &reply, command.gpas.size())).ok()) return s;
  for (size_t i = 0; i < reply.bitmaps.size(); ++i) {
    kvmi::v1::PageWriteBitmap* page = response->add_pages();
    page->set_gpa(command.gpas[i]);
    page->set_bitmap(reply.bitmaps[i]);
  }
  return Status::OK;
}

Status GuestCommands::SetPageWriteBitmap(Context* context,
                                         const kvmi::v1::SetPageWriteBitmapRequest& request,
                                         kvmi::v1::SetPageWriteBitmapResponse*) {
  Target target;
  Status s = guests_.Find(request.vm(), &target);
  if (!s.ok()) return s;
  if (request.pages_size() == 0 ||
      static_cast<size_t>(request.pages_size()) > kvmi::kMaxSetPageAccessEntries) {
    return InvalidArgument("pages",
                           "1 .. " + std::to_string(kvmi::kMaxSetPageAccessEntries) + " pages");
  }
  kvmi::SetPageWriteBitmapRequest command;
  for (const auto& page : request.pages()) command.entries.push_back({page.gpa(), page.bitmap()});
  std::vector<uint8_t> data;
  return Call(context, *target.session, command, "SetPageWriteBitmap", &data);
}

Status GuestCommands::UnhookVM(Context* context, const kvmi::v1::UnhookVMRequest& request,
                               kvmi::v1::UnhookVMResponse*) {
  Target target;
  Status s = guests_.Find(request.vm(), &target);
  if (!s.ok()) return s;
  Waiter<bool> unhooked;
  target.guest->Unhook("requested through the API", [done = unhooked.callback()] { done(true); });
  bool ignored = false;
  return Await(context, &unhooked, &ignored);
}

kvmi::v1::AttachResponse CommandResultMessage(uint64_t id, const Status& status) {
  kvmi::v1::AttachResponse response;
  kvmi::v1::CommandResult* result = response.mutable_command_result();
  result->set_id(id);
  result->set_code(static_cast<int32_t>(status.error_code()));
  result->set_message(status.error_message());
  return response;
}

kvmi::v1::AttachResponse GuestCommands::Run(Context* context, const OwnerId& owner,
                                            const kvmi::v1::Command& command) {
  kvmi::v1::AttachResponse response;
  kvmi::v1::CommandResult* result = response.mutable_command_result();
  Status status;
  using R = kvmi::v1::Command;
  switch (command.request_case()) {
    case R::kGetRegisters:
      status = GetRegisters(context, command.get_registers(), result->mutable_get_registers());
      break;
    case R::kSetRegisters:
      status = SetRegisters(context, command.set_registers(), result->mutable_set_registers());
      break;
    case R::kReadPhysical:
      status = ReadPhysical(context, command.read_physical(), result->mutable_read_physical());
      break;
    case R::kWritePhysical:
      status = WritePhysical(context, command.write_physical(), result->mutable_write_physical());
      break;
    case R::kGetPageAccess:
      status = GetPageAccess(context, command.get_page_access(), result->mutable_get_page_access());
      break;
    case R::kSetPageAccess:
      status = SetPageAccess(owner, context, command.set_page_access(),
                             result->mutable_set_page_access());
      break;
    case R::kPauseVcpu:
      status = PauseVCPU(owner, context, command.pause_vcpu(), result->mutable_pause_vcpu());
      break;
    case R::kResumeVcpu:
      status = ResumeVCPU(owner, context, command.resume_vcpu(), result->mutable_resume_vcpu());
      break;
    case R::kInjectException:
      status =
          InjectException(context, command.inject_exception(), result->mutable_inject_exception());
      break;
    case R::kControlEvents:
      status =
          ControlEvents(owner, context, command.control_events(), result->mutable_control_events());
      break;
    case R::kGetCpuid:
      status = GetCPUID(context, command.get_cpuid(), result->mutable_get_cpuid());
      break;
    case R::kGetMtrrType:
      status = GetMTRRType(context, command.get_mtrr_type(), result->mutable_get_mtrr_type());
      break;
    case R::kTranslateAddress:
      status = TranslateAddress(context, command.translate_address(),
                                result->mutable_translate_address());
      break;
    case R::kReadVirtual:
      status = ReadVirtual(context, command.read_virtual(), result->mutable_read_virtual());
      break;
    case R::kWriteVirtual:
      status = WriteVirtual(context, command.write_virtual(), result->mutable_write_virtual());
      break;
    case R::REQUEST_NOT_SET:
      status = InvalidArgument("command.request", "no command given");
      break;
  }
  if (!status.ok()) return CommandResultMessage(command.id(), status);
  result->set_id(command.id());
  return response;
}

}  // namespace kvmid::api
