#include "daemon/api/introspection_service.h"

#include <memory>
#include <optional>
#include <string>

#include "daemon/api/attach.h"
#include "daemon/api/convert.h"

namespace kvmid {

using api::kApiOwner;
using grpc::ServerContext;
using grpc::Status;
using security::Rpc;

namespace {

api::CallTarget OnGuest(const std::string& vm) {
  api::CallTarget target;
  target.vm = &vm;
  return target;
}

// The guest selector (`vm`) of an inline command's request; nullopt if it has none.
std::optional<std::string> GuestOfCommand(const kvmi::v1::Command& command) {
  const google::protobuf::FieldDescriptor* field =
      command.GetDescriptor()->FindFieldByNumber(command.request_case());
  if (field == nullptr || field->message_type() == nullptr) return std::nullopt;
  const google::protobuf::Message& request = command.GetReflection()->GetMessage(command, field);
  const google::protobuf::FieldDescriptor* vm = request.GetDescriptor()->FindFieldByName("vm");
  if (vm == nullptr || vm->type() != google::protobuf::FieldDescriptor::TYPE_STRING) {
    return std::nullopt;
  }
  return request.GetReflection()->GetString(request, vm);
}

// What one Attach stream was admitted as: its claim and its CRASH verdicts go through the
// service's Admission with the stream's caller.
class AttachAdmission final : public api::AttachGuard {
 public:
  explicit AttachAdmission(api::Admission* admission) : admission_(admission) {}
  Status AdmitClaim(const kvmi::v1::Claim& claim) override {
    return admission_->AdmitClaim(context, claim);
  }
  Status AdmitCrashVerdict(const kvmi::v1::Verdict& verdict, const Guest& guest) override {
    return admission_->AdmitCrashVerdict(context, verdict, guest);
  }
  api::CallContext context;  // set once, before the stream starts

 private:
  api::Admission* const admission_;
};

}  // namespace

IntrospectionService::IntrospectionService(Daemon* daemon, EventHistory* history,
                                           security::AuditLog* audit)
    : daemon_(daemon),
      admission_(daemon, audit),
      stream_limits_(daemon->limits(), &daemon->memory_trimmer()),
      inventory_(daemon),
      streams_(daemon, history, &stream_limits_),
      commands_(&daemon->registry(), &daemon->pipeline()),
      memory_(daemon, &admission_, &stream_limits_),
      virtual_(daemon, &stream_limits_, &commands_.translation()) {}

void IntrospectionService::ServeAsync(api::AsyncServer* async) {
  using grpc::ServerCompletionQueue;
  namespace v1 = kvmi::v1;
  async->BidiStreaming<v1::AttachRequest, v1::AttachResponse>(
      [this](ServerContext* ctx,
             grpc::ServerAsyncReaderWriter<v1::AttachResponse, v1::AttachRequest>* stream,
             ServerCompletionQueue* cq, void* tag) { RequestAttach(ctx, stream, cq, cq, tag); },
      [this](ServerContext* ctx) { return StartAttach(ctx); });
  async->ServerStreaming<v1::StreamEventsRequest, v1::StreamEventsResponse>(
      [this](ServerContext* ctx, v1::StreamEventsRequest* request,
             grpc::ServerAsyncWriter<v1::StreamEventsResponse>* writer, ServerCompletionQueue* cq,
             void* tag) { RequestStreamEvents(ctx, request, writer, cq, cq, tag); },
      [this](ServerContext* ctx, const v1::StreamEventsRequest* request) {
        return StartStreamEvents(ctx, request);
      });
  async->ServerStreaming<v1::WatchVMsRequest, v1::WatchVMsResponse>(
      [this](ServerContext* ctx, v1::WatchVMsRequest* request,
             grpc::ServerAsyncWriter<v1::WatchVMsResponse>* writer, ServerCompletionQueue* cq,
             void* tag) { RequestWatchVMs(ctx, request, writer, cq, cq, tag); },
      [this](ServerContext* ctx, const v1::WatchVMsRequest* request) {
        return StartWatchVMs(ctx, request);
      });
  async->ServerStreaming<v1::ReadPhysicalStreamRequest, v1::ReadPhysicalStreamResponse>(
      [this](ServerContext* ctx, v1::ReadPhysicalStreamRequest* request,
             grpc::ServerAsyncWriter<v1::ReadPhysicalStreamResponse>* writer,
             ServerCompletionQueue* cq,
             void* tag) { RequestReadPhysicalStream(ctx, request, writer, cq, cq, tag); },
      [this](ServerContext* ctx, const v1::ReadPhysicalStreamRequest* request) {
        return StartReadPhysicalStream(ctx, request);
      });
  async->ClientStreaming<v1::WritePhysicalStreamRequest, v1::WritePhysicalStreamResponse>(
      [this](ServerContext* ctx,
             grpc::ServerAsyncReader<v1::WritePhysicalStreamResponse,
                                     v1::WritePhysicalStreamRequest>* reader,
             ServerCompletionQueue* cq,
             void* tag) { RequestWritePhysicalStream(ctx, reader, cq, cq, tag); },
      [this](ServerContext* ctx, v1::WritePhysicalStreamResponse* response) {
        return StartWritePhysicalStream(ctx, response);
      });
  async->ServerStreaming<v1::ReadVirtualStreamRequest, v1::ReadVirtualStreamResponse>(
      [this](ServerContext* ctx, v1::ReadVirtualStreamRequest* request,
             grpc::ServerAsyncWriter<v1::ReadVirtualStreamResponse>* writer,
             ServerCompletionQueue* cq,
             void* tag) { RequestReadVirtualStream(ctx, request, writer, cq, cq, tag); },
      [this](ServerContext* ctx, const v1::ReadVirtualStreamRequest* request) {
        return StartReadVirtualStream(ctx, request);
      });
  async->Unary<v1::ApplyPolicyRequest, v1::ApplyPolicyResponse>(
      [this](ServerContext* ctx, v1::ApplyPolicyRequest* request,
             grpc::ServerAsyncResponseWriter<v1::ApplyPolicyResponse>* responder,
             ServerCompletionQueue* cq,
             void* tag) { RequestApplyPolicy(ctx, request, responder, cq, cq, tag); },
      [this](ServerContext* ctx, const v1::ApplyPolicyRequest* request,
             v1::ApplyPolicyResponse* response, api::UnaryResponder* responder) {
        StartApplyPolicy(ctx, request, response, responder);
      });
}

kvmi::v1::AttachResponse IntrospectionService::RunAttachCommand(const api::CallContext& stream,
                                                                grpc::ServerContextBase* context,
                                                                const OwnerId& owner,
                                                                const kvmi::v1::Command& command) {
  absl::StatusOr<Rpc> rpc = security::RpcOfCommand(command);
  if (!rpc.ok()) return api::CommandResultMessage(command.id(), ToStatus(rpc.status()));
  const std::optional<std::string> vm = GuestOfCommand(command);
  api::CallTarget target;
  if (vm) target.vm = &*vm;
  api::AdmittedCall call;
  Status admitted = admission_.Admit(
      stream.caller, *rpc, target, [&] { return security::SummarizeCommand(command); }, &call);
  if (!admitted.ok()) return api::CommandResultMessage(command.id(), admitted);
  kvmi::v1::AttachResponse response = commands_.Run(context, owner, command);
  // Finish audits what a mutating command did, and a refusal by a limit of any command.
  const kvmi::v1::CommandResult& result = response.command_result();
  Status finished = admission_.Finish(
      call, Status(static_cast<grpc::StatusCode>(result.code()), result.message()));
  if (finished.error_code() != result.code()) {
    response.mutable_command_result()->set_code(finished.error_code());
    response.mutable_command_result()->set_message(finished.error_message());
  }
  return response;
}

api::AttachStream* IntrospectionService::StartAttach(grpc::ServerContext* context) {
  // The RPC's own check (responder on some guest); the claim, the inline commands and CRASH
  // verdicts are checked as they come, with the caller identified here.
  api::AdmittedCall call;
  Status admitted = admission_.Admit(
      *context, Rpc::kAttach, api::CallTarget(), [] { return security::AuditArgs(); }, &call);
  auto guard = std::make_shared<AttachAdmission>(&admission_);
  guard->context = call.context();
  return api::StartAttach(
      daemon_, context, &next_stream_,
      [this, guard](grpc::ServerContextBase* ctx, const OwnerId& owner,
                    const kvmi::v1::Command& c) {
        return RunAttachCommand(guard->context, ctx, owner, c);
      },
      admitted, guard, &stream_limits_, &guard->context);
}

// ---- inventory ---------------------------------------------------------------------------------

Status IntrospectionService::ListVMs(ServerContext* context,
                                     const kvmi::v1::ListVMsRequest* request,
                                     kvmi::v1::ListVMsResponse* response) {
  return Serve(
      context, Rpc::kListVMs, *request, api::CallTarget(),
      [&](const api::CallContext& call) { return inventory_.ListVMs(call, *request, response); });
}

Status IntrospectionService::GetVM(ServerContext* context, const kvmi::v1::GetVMRequest* request,
                                   kvmi::v1::VM* response) {
  return Serve(
      context, Rpc::kGetVM, *request, OnGuest(request->vm()),
      [&](const api::CallContext& call) { return inventory_.GetVM(call, *request, response); });
}

void IntrospectionService::StartApplyPolicy(grpc::ServerContext* context,
                                            const kvmi::v1::ApplyPolicyRequest* request,
                                            kvmi::v1::ApplyPolicyResponse* response,
                                            api::UnaryResponder* responder) {
  // A policy that can CRASH guests needs admin on them (on every guest: policies select guests
  // by themselves).
  api::CallTarget target;
  target.crash = request->has_policy() && security::CanCrash(request->policy());
  std::string identity;
  Status status = ServeNoting(context, Rpc::kApplyPolicy, *request, target,
                              [&](const api::CallContext& call, security::AuditArgs* audit) {
                                identity = call.IdentityKey();
                                Status applied = inventory_.ApplyPolicy(*request, response);
                                // The record says when the call overrode a configured policy.
                                if (applied.ok() && response->overrode_config()) {
                                  audit->Bool("overrode_config", true);
                                }
                                return applied;
                              });
  // A refusal by a limit (policy size or count) is answered after the caller's delay: a client
  // that floods ApplyPolicy with refused requests is held to a few calls per second.
  tarpit_.Finish(
      identity, status, request->ByteSizeLong(), [responder, status] { responder->Finish(status); },
      std::chrono::milliseconds(daemon_->limits().refusal_delay_max_ms));
}

Status IntrospectionService::ListPolicies(ServerContext* context,
                                          const kvmi::v1::ListPoliciesRequest* request,
                                          kvmi::v1::ListPoliciesResponse* response) {
  return Serve(
      context, Rpc::kListPolicies, *request, api::CallTarget(),
      [&](const api::CallContext&) { return inventory_.ListPolicies(*request, response); });
}

Status IntrospectionService::DeletePolicy(ServerContext* context,
                                          const kvmi::v1::DeletePolicyRequest* request,
                                          kvmi::v1::DeletePolicyResponse* response) {
  return ServeNoting(context, Rpc::kDeletePolicy, *request, api::CallTarget(),
                     [&](const api::CallContext&, security::AuditArgs* audit) {
                       Status deleted = inventory_.DeletePolicy(*request, response);
                       if (deleted.ok() && response->overrode_config()) {
                         audit->Bool("overrode_config", true);
                       }
                       return deleted;
                     });
}

// ---- streams -----------------------------------------------------------------------------------

api::WriteReactor<kvmi::v1::StreamEventsResponse>* IntrospectionService::StartStreamEvents(
    grpc::ServerContext* context, const kvmi::v1::StreamEventsRequest* request) {
  api::AdmittedCall call;
  Status admitted = admission_.Admit(
      *context, Rpc::kStreamEvents, api::CallTarget(), [] { return security::AuditArgs(); }, &call);
  if (!admitted.ok()) return api::FinishedStream<kvmi::v1::StreamEventsResponse>(admitted);
  return streams_.StreamEvents(call.context(), *request);
}

api::WriteReactor<kvmi::v1::WatchVMsResponse>* IntrospectionService::StartWatchVMs(
    grpc::ServerContext* context, const kvmi::v1::WatchVMsRequest* request) {
  api::AdmittedCall call;
  Status admitted = admission_.Admit(
      *context, Rpc::kWatchVMs, api::CallTarget(), [] { return security::AuditArgs(); }, &call);
  if (!admitted.ok()) return api::FinishedStream<kvmi::v1::WatchVMsResponse>(admitted);
  return streams_.WatchVMs(call.context(), *request);
}

// ---- bulk memory
// ---------------------------------------------------------------------------------

api::WriteReactor<kvmi::v1::ReadPhysicalStreamResponse>*
IntrospectionService::StartReadPhysicalStream(grpc::ServerContext* context,
                                              const kvmi::v1::ReadPhysicalStreamRequest* request) {
  api::AdmittedCall call;
  Status admitted = admission_.Admit(
      *context, Rpc::kReadPhysicalStream, OnGuest(request->vm()),
      [&] {
        security::AuditArgs args;
        args.Text("vm", request->vm()).Hex("gpa", request->gpa()).Uint("size", request->size());
        return args;
      },
      &call);
  if (!admitted.ok()) return api::FinishedStream<kvmi::v1::ReadPhysicalStreamResponse>(admitted);
  return memory_.Read(call.context(), *request);
}

// Admitted on its first message, which names the guest (memory_stream.cc).
api::ReadReactor<kvmi::v1::WritePhysicalStreamRequest>*
IntrospectionService::StartWritePhysicalStream(grpc::ServerContext* context,
                                               kvmi::v1::WritePhysicalStreamResponse* response) {
  return memory_.Write(context, response);
}

// ---- control RPCs on one guest -----------------------------------------------------------------

Status IntrospectionService::GetRegisters(ServerContext* context,
                                          const kvmi::v1::GetRegistersRequest* request,
                                          kvmi::v1::GetRegistersResponse* response) {
  return Serve(
      context, Rpc::kGetRegisters, *request, OnGuest(request->vm()),
      [&](const api::CallContext&) { return commands_.GetRegisters(context, *request, response); });
}

Status IntrospectionService::TranslateAddress(ServerContext* context,
                                              const kvmi::v1::TranslateAddressRequest* request,
                                              kvmi::v1::TranslateAddressResponse* response) {
  return Serve(context, Rpc::kTranslateAddress, *request, OnGuest(request->vm()),
               [&](const api::CallContext&) {
                 return commands_.TranslateAddress(context, *request, response);
               });
}

Status IntrospectionService::ReadVirtual(ServerContext* context,
                                         const kvmi::v1::ReadVirtualRequest* request,
                                         kvmi::v1::ReadVirtualResponse* response) {
  return Serve(
      context, Rpc::kReadVirtual, *request, OnGuest(request->vm()),
      [&](const api::CallContext&) { return commands_.ReadVirtual(context, *request, response); });
}

api::WriteReactor<kvmi::v1::ReadVirtualStreamResponse>*
IntrospectionService::StartReadVirtualStream(grpc::ServerContext* context,
                                             const kvmi::v1::ReadVirtualStreamRequest* request) {
  api::AdmittedCall call;
  Status admitted = admission_.Admit(
      *context, Rpc::kReadVirtualStream, OnGuest(request->vm()),
      [&] { return security::SummarizeRequest(*request); }, &call);
  if (!admitted.ok()) return api::FinishedStream<kvmi::v1::ReadVirtualStreamResponse>(admitted);
  return virtual_.Read(call.context(), *request);
}

Status IntrospectionService::WriteVirtual(ServerContext* context,
                                          const kvmi::v1::WriteVirtualRequest* request,
                                          kvmi::v1::WriteVirtualResponse* response) {
  return Serve(
      context, Rpc::kWriteVirtual, *request, OnGuest(request->vm()),
      [&](const api::CallContext&) { return commands_.WriteVirtual(context, *request, response); });
}

Status IntrospectionService::SetRegisters(ServerContext* context,
                                          const kvmi::v1::SetRegistersRequest* request,
                                          kvmi::v1::SetRegistersResponse* response) {
  return Serve(
      context, Rpc::kSetRegisters, *request, OnGuest(request->vm()),
      [&](const api::CallContext&) { return commands_.SetRegisters(context, *request, response); });
}

Status IntrospectionService::ReadPhysical(ServerContext* context,
                                          const kvmi::v1::ReadPhysicalRequest* request,
                                          kvmi::v1::ReadPhysicalResponse* response) {
  return Serve(
      context, Rpc::kReadPhysical, *request, OnGuest(request->vm()),
      [&](const api::CallContext&) { return commands_.ReadPhysical(context, *request, response); });
}

Status IntrospectionService::WritePhysical(ServerContext* context,
                                           const kvmi::v1::WritePhysicalRequest* request,
                                           kvmi::v1::WritePhysicalResponse* response) {
  return Serve(context, Rpc::kWritePhysical, *request, OnGuest(request->vm()),
               [&](const api::CallContext&) {
                 return commands_.WritePhysical(context, *request, response);
               });
}

Status IntrospectionService::GetCPUID(ServerContext* context,
                                      const kvmi::v1::GetCPUIDRequest* request,
                                      kvmi::v1::GetCPUIDResponse* response) {
  return Serve(
      context, Rpc::kGetCPUID, *request, OnGuest(request->vm()),
      [&](const api::CallContext&) { return commands_.GetCPUID(context, *request, response); });
}

Status IntrospectionService::GetXSAVE(ServerContext* context,
                                      const kvmi::v1::GetXSAVERequest* request,
                                      kvmi::v1::GetXSAVEResponse* response) {
  return Serve(
      context, Rpc::kGetXSAVE, *request, OnGuest(request->vm()),
      [&](const api::CallContext&) { return commands_.GetXSAVE(context, *request, response); });
}

Status IntrospectionService::GetMTRRType(ServerContext* context,
                                         const kvmi::v1::GetMTRRTypeRequest* request,
                                         kvmi::v1::GetMTRRTypeResponse* response) {
  return Serve(
      context, Rpc::kGetMTRRType, *request, OnGuest(request->vm()),
      [&](const api::CallContext&) { return commands_.GetMTRRType(context, *request, response); });
}

Status IntrospectionService::InjectException(ServerContext* context,
                                             const kvmi::v1::InjectExceptionRequest* request,
                                             kvmi::v1::InjectExceptionResponse* response) {
  return Serve(context, Rpc::kInjectException, *request, OnGuest(request->vm()),
               [&](const api::CallContext&) {
                 return commands_.InjectException(context, *request, response);
               });
}

Status IntrospectionService::GetPageAccess(ServerContext* context,
                                           const kvmi::v1::GetPageAccessRequest* request,
                                           kvmi::v1::GetPageAccessResponse* response) {
  return Serve(context, Rpc::kGetPageAccess, *request, OnGuest(request->vm()),
               [&](const api::CallContext&) {
                 return commands_.GetPageAccess(context, *request, response);
               });
}

Status IntrospectionService::ControlSPP(ServerContext* context,
                                        const kvmi::v1::ControlSPPRequest* request,
                                        kvmi::v1::ControlSPPResponse* response) {
  return Serve(
      context, Rpc::kControlSPP, *request, OnGuest(request->vm()),
      [&](const api::CallContext&) { return commands_.ControlSPP(context, *request, response); });
}

Status IntrospectionService::GetPageWriteBitmap(ServerContext* context,
                                                const kvmi::v1::GetPageWriteBitmapRequest* request,
                                                kvmi::v1::GetPageWriteBitmapResponse* response) {
  return Serve(context, Rpc::kGetPageWriteBitmap, *request, OnGuest(request->vm()),
               [&](const api::CallContext&) {
                 return commands_.GetPageWriteBitmap(context, *request, response);
               });
}

Status IntrospectionService::SetPageWriteBitmap(ServerContext* context,
                                                const kvmi::v1::SetPageWriteBitmapRequest* request,
                                                kvmi::v1::SetPageWriteBitmapResponse* response) {
  return Serve(context, Rpc::kSetPageWriteBitmap, *request, OnGuest(request->vm()),
               [&](const api::CallContext&) {
                 return commands_.SetPageWriteBitmap(context, *request, response);
               });
}

Status IntrospectionService::UnhookVM(ServerContext* context,
                                      const kvmi::v1::UnhookVMRequest* request,
                                      kvmi::v1::UnhookVMResponse* response) {
  return Serve(
      context, Rpc::kUnhookVM, *request, OnGuest(request->vm()),
      [&](const api::CallContext&) { return commands_.UnhookVM(context, *request, response); });
}

// What the unary RPCs pause, restrict or arm belongs to the API's own lease owner.

Status IntrospectionService::PauseVCPU(ServerContext* context,
                                       const kvmi::v1::PauseVCPURequest* request,
                                       kvmi::v1::PauseVCPUResponse* response) {
  return Serve(context, Rpc::kPauseVCPU, *request, OnGuest(request->vm()),
               [&](const api::CallContext&) {
                 return commands_.PauseVCPU(kApiOwner, context, *request, response);
               });
}

Status IntrospectionService::ResumeVCPU(ServerContext* context,
                                        const kvmi::v1::ResumeVCPURequest* request,
                                        kvmi::v1::ResumeVCPUResponse* response) {
  return Serve(context, Rpc::kResumeVCPU, *request, OnGuest(request->vm()),
               [&](const api::CallContext&) {
                 return commands_.ResumeVCPU(kApiOwner, context, *request, response);
               });
}

Status IntrospectionService::SetPageAccess(ServerContext* context,
                                           const kvmi::v1::SetPageAccessRequest* request,
                                           kvmi::v1::SetPageAccessResponse* response) {
  return Serve(context, Rpc::kSetPageAccess, *request, OnGuest(request->vm()),
               [&](const api::CallContext&) {
                 return commands_.SetPageAccess(kApiOwner, context, *request, response);
               });
}

Status IntrospectionService::ControlEvents(ServerContext* context,
                                           const kvmi::v1::ControlEventsRequest* request,
                                           kvmi::v1::ControlEventsResponse* response) {
  return Serve(context, Rpc::kControlEvents, *request, OnGuest(request->vm()),
               [&](const api::CallContext&) {
                 return commands_.ControlEvents(kApiOwner, context, *request, response);
               });
}

}  // namespace kvmid
