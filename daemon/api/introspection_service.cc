#include "daemon/api/introspection_service.h"

#include <spdlog/spdlog.h>

#include "daemon/api/attach.h"
#include "daemon/security/identity.h"

namespace kvmid {

using api::kApiOwner;
using grpc::ServerContext;
using grpc::Status;

namespace {

// The streams' CallContext until Admit hands one over: every guest visible (no authorizer), the
// caller as the transport identifies it (the key of streams_per_identity); anonymous when it
// cannot be identified.
api::CallContext StreamCallContext(const grpc::ServerContextBase& context) {
  api::CallContext call = api::CallContext::Unrestricted(context.peer());
  absl::StatusOr<security::CallerIdentity> identity = security::IdentifyCaller(context);
  if (!identity.ok()) return call;
  switch (identity->kind) {
    case security::CallerIdentity::Kind::kTls:
      call.caller = security::Caller::Tls(identity->principal, identity->peer);
      break;
    case security::CallerIdentity::Kind::kUnix:
      call.caller = security::Caller::Unix(identity->unix.uid, identity->unix.gid,
                                           identity->unix.pid, identity->peer);
      break;
    case security::CallerIdentity::Kind::kAnonymous:
      break;
  }
  return call;
}

}  // namespace

IntrospectionService::IntrospectionService(Daemon* daemon, const EventHistory* history)
    : daemon_(daemon),
      stream_limits_(daemon->limits()),
      inventory_(daemon),
      streams_(daemon, history, &stream_limits_),
      commands_(&daemon->registry()) {}

Status IntrospectionService::Admit(grpc::ServerContextBase* context, const std::string& method) {
  if (spdlog::should_log(spdlog::level::debug)) {
    spdlog::debug("API {} from {}", method, context->peer());
  }
  return Status::OK;
}

kvmi::v1::AttachResponse IntrospectionService::RunAttachCommand(grpc::ServerContextBase* context,
                                                                const OwnerId& owner,
                                                                const kvmi::v1::Command& command) {
  const google::protobuf::FieldDescriptor* field =
      command.GetDescriptor()->FindFieldByNumber(command.request_case());
  Status admitted = Admit(context, "Attach/" + (field ? field->name() : std::string("none")));
  if (!admitted.ok()) return api::CommandResultMessage(command.id(), admitted);
  return commands_.Run(context, owner, command);
}

grpc::ServerBidiReactor<kvmi::v1::AttachRequest, kvmi::v1::AttachResponse>*
IntrospectionService::Attach(grpc::CallbackServerContext* context) {
  const api::CallContext call = StreamCallContext(*context);
  return api::StartAttach(
      daemon_, context, &next_stream_,
      [this](grpc::ServerContextBase* ctx, const OwnerId& owner, const kvmi::v1::Command& c) {
        return RunAttachCommand(ctx, owner, c);
      },
      Admit(context, "Attach"), &stream_limits_, &call);
}

// ---- inventory ---------------------------------------------------------------------------------

Status IntrospectionService::ListVMs(ServerContext* context,
                                     const kvmi::v1::ListVMsRequest* request,
                                     kvmi::v1::ListVMsResponse* response) {
  return Serve(context, "ListVMs", [&] { return inventory_.ListVMs(*request, response); });
}

Status IntrospectionService::GetVM(ServerContext* context, const kvmi::v1::GetVMRequest* request,
                                   kvmi::v1::VM* response) {
  return Serve(context, "GetVM", [&] { return inventory_.GetVM(*request, response); });
}

Status IntrospectionService::ApplyPolicy(ServerContext* context,
                                         const kvmi::v1::ApplyPolicyRequest* request,
                                         kvmi::v1::ApplyPolicyResponse* response) {
  return Serve(context, "ApplyPolicy", [&] { return inventory_.ApplyPolicy(*request, response); });
}

Status IntrospectionService::ListPolicies(ServerContext* context,
                                          const kvmi::v1::ListPoliciesRequest* request,
                                          kvmi::v1::ListPoliciesResponse* response) {
  return Serve(context, "ListPolicies",
               [&] { return inventory_.ListPolicies(*request, response); });
}

Status IntrospectionService::DeletePolicy(ServerContext* context,
                                          const kvmi::v1::DeletePolicyRequest* request,
                                          kvmi::v1::DeletePolicyResponse* response) {
  return Serve(context, "DeletePolicy",
               [&] { return inventory_.DeletePolicy(*request, response); });
}

// ---- streams -----------------------------------------------------------------------------------

grpc::ServerWriteReactor<kvmi::v1::EventMessage>* IntrospectionService::StreamEvents(
    grpc::CallbackServerContext* context, const kvmi::v1::StreamEventsRequest* request) {
  Status admitted = Admit(context, "StreamEvents");
  if (!admitted.ok()) return api::FinishedStream<kvmi::v1::EventMessage>(admitted);
  return streams_.StreamEvents(StreamCallContext(*context), *request);
}

grpc::ServerWriteReactor<kvmi::v1::VMChange>* IntrospectionService::WatchVMs(
    grpc::CallbackServerContext* context, const kvmi::v1::WatchVMsRequest* request) {
  Status admitted = Admit(context, "WatchVMs");
  if (!admitted.ok()) return api::FinishedStream<kvmi::v1::VMChange>(admitted);
  return streams_.WatchVMs(StreamCallContext(*context), *request);
}

// ---- control RPCs on one guest -----------------------------------------------------------------

Status IntrospectionService::GetRegisters(ServerContext* context,
                                          const kvmi::v1::GetRegistersRequest* request,
                                          kvmi::v1::GetRegistersResponse* response) {
  return Serve(context, "GetRegisters",
               [&] { return commands_.GetRegisters(context, *request, response); });
}

Status IntrospectionService::SetRegisters(ServerContext* context,
                                          const kvmi::v1::SetRegistersRequest* request,
                                          kvmi::v1::SetRegistersResponse* response) {
  return Serve(context, "SetRegisters",
               [&] { return commands_.SetRegisters(context, *request, response); });
}

Status IntrospectionService::ReadPhysical(ServerContext* context,
                                          const kvmi::v1::ReadPhysicalRequest* request,
                                          kvmi::v1::ReadPhysicalResponse* response) {
  return Serve(context, "ReadPhysical",
               [&] { return commands_.ReadPhysical(context, *request, response); });
}

Status IntrospectionService::WritePhysical(ServerContext* context,
                                           const kvmi::v1::WritePhysicalRequest* request,
                                           kvmi::v1::WritePhysicalResponse* response) {
  return Serve(context, "WritePhysical",
               [&] { return commands_.WritePhysical(context, *request, response); });
}

Status IntrospectionService::GetCPUID(ServerContext* context,
                                      const kvmi::v1::GetCPUIDRequest* request,
                                      kvmi::v1::GetCPUIDResponse* response) {
  return Serve(context, "GetCPUID",
               [&] { return commands_.GetCPUID(context, *request, response); });
}

Status IntrospectionService::GetXSAVE(ServerContext* context,
                                      const kvmi::v1::GetXSAVERequest* request,
                                      kvmi::v1::GetXSAVEResponse* response) {
  return Serve(context, "GetXSAVE",
               [&] { return commands_.GetXSAVE(context, *request, response); });
}

Status IntrospectionService::GetMTRRType(ServerContext* context,
                                         const kvmi::v1::GetMTRRTypeRequest* request,
                                         kvmi::v1::GetMTRRTypeResponse* response) {
  return Serve(context, "GetMTRRType",
               [&] { return commands_.GetMTRRType(context, *request, response); });
}

Status IntrospectionService::InjectException(ServerContext* context,
                                             const kvmi::v1::InjectExceptionRequest* request,
                                             kvmi::v1::InjectExceptionResponse* response) {
  return Serve(context, "InjectException",
               [&] { return commands_.InjectException(context, *request, response); });
}

Status IntrospectionService::GetPageAccess(ServerContext* context,
                                           const kvmi::v1::GetPageAccessRequest* request,
                                           kvmi::v1::GetPageAccessResponse* response) {
  return Serve(context, "GetPageAccess",
               [&] { return commands_.GetPageAccess(context, *request, response); });
}

Status IntrospectionService::ControlSPP(ServerContext* context,
                                        const kvmi::v1::ControlSPPRequest* request,
                                        kvmi::v1::ControlSPPResponse* response) {
  return Serve(context, "ControlSPP",
               [&] { return commands_.ControlSPP(context, *request, response); });
}

Status IntrospectionService::GetPageWriteBitmap(ServerContext* context,
                                                const kvmi::v1::GetPageWriteBitmapRequest* request,
                                                kvmi::v1::GetPageWriteBitmapResponse* response) {
  return Serve(context, "GetPageWriteBitmap",
               [&] { return commands_.GetPageWriteBitmap(context, *request, response); });
}

Status IntrospectionService::SetPageWriteBitmap(ServerContext* context,
                                                const kvmi::v1::SetPageWriteBitmapRequest* request,
                                                kvmi::v1::SetPageWriteBitmapResponse* response) {
  return Serve(context, "SetPageWriteBitmap",
               [&] { return commands_.SetPageWriteBitmap(context, *request, response); });
}

Status IntrospectionService::UnhookVM(ServerContext* context,
                                      const kvmi::v1::UnhookVMRequest* request,
                                      kvmi::v1::UnhookVMResponse* response) {
  return Serve(context, "UnhookVM",
               [&] { return commands_.UnhookVM(context, *request, response); });
}

// What the unary RPCs pause, restrict or arm belongs to the API's own lease owner.

Status IntrospectionService::PauseVCPU(ServerContext* context,
                                       const kvmi::v1::PauseVCPURequest* request,
                                       kvmi::v1::PauseVCPUResponse* response) {
  return Serve(context, "PauseVCPU",
               [&] { return commands_.PauseVCPU(kApiOwner, context, *request, response); });
}

Status IntrospectionService::ResumeVCPU(ServerContext* context,
                                        const kvmi::v1::ResumeVCPURequest* request,
                                        kvmi::v1::ResumeVCPUResponse* response) {
  return Serve(context, "ResumeVCPU",
               [&] { return commands_.ResumeVCPU(kApiOwner, context, *request, response); });
}

Status IntrospectionService::SetPageAccess(ServerContext* context,
                                           const kvmi::v1::SetPageAccessRequest* request,
                                           kvmi::v1::SetPageAccessResponse* response) {
  return Serve(context, "SetPageAccess",
               [&] { return commands_.SetPageAccess(kApiOwner, context, *request, response); });
}

Status IntrospectionService::ControlEvents(ServerContext* context,
                                           const kvmi::v1::ControlEventsRequest* request,
                                           kvmi::v1::ControlEventsResponse* response) {
  return Serve(context, "ControlEvents",
               [&] { return commands_.ControlEvents(kApiOwner, context, *request, response); });
}

}  // namespace kvmid
