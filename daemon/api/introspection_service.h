// The gRPC surface of kvmid: kvmi.v1.Introspection as a thin adapter. Each method passes through
// Serve (api::Admission: the one place every RPC and every inline Attach command is
// authenticated, authorized per RPC and per guest, audited and counted) and delegates to the
// part of daemon/api that does the job:
//   inventory.h       ListVMs, GetVM, ApplyPolicy, ListPolicies, DeletePolicy
//   event_stream.h    StreamEvents, WatchVMs
//   attach.h          Attach (remote verdicts, inline commands)
//   guest_commands.h  the control RPCs on one guest
//   memory_stream.h   ReadPhysicalStream, WritePhysicalStream (bulk memory)
//   virtual_stream.h  ReadVirtualStream (bulk guest-virtual memory)
// Conversions and the mapping of internal outcomes to gRPC statuses live in convert.h.
#ifndef KVMID_DAEMON_API_INTROSPECTION_SERVICE_H_
#define KVMID_DAEMON_API_INTROSPECTION_SERVICE_H_

#include <grpcpp/grpcpp.h>

#include <atomic>
#include <cstdint>
#include <string>

#include "daemon/api/admission.h"
#include "daemon/api/async_reactor.h"
#include "daemon/api/attach.h"
#include "daemon/api/event_history.h"
#include "daemon/api/event_stream.h"
#include "daemon/api/guest_commands.h"
#include "daemon/api/inventory.h"
#include "daemon/api/memory_stream.h"
#include "daemon/api/stream_limits.h"
#include "daemon/api/tarpit.h"
#include "daemon/api/virtual_stream.h"
#include "daemon/kvmid.h"
#include "daemon/security/audit.h"
#include "daemon/security/authz.h"
#include "proto/kvmi/v1/introspection.grpc.pb.h"

namespace kvmid {

// The streams run on gRPC's async API through api::AsyncServer (async_reactor.h), with no thread
// of their own and no callback-API method anywhere in the process: Attach (events written from
// the guest's loop thread, verdicts applied from the read's completion), StreamEvents and
// WatchVMs (event_stream.h), the memory streams (memory_stream.h, virtual_stream.h). ApplyPolicy
// is an async unary call (its limit refusals are answered later, through the Tarpit). Every other
// method is synchronous.
class IntrospectionService final
    : public kvmi::v1::Introspection::WithAsyncMethod_Attach<
          kvmi::v1::Introspection::WithAsyncMethod_StreamEvents<
              kvmi::v1::Introspection::WithAsyncMethod_WatchVMs<
                  kvmi::v1::Introspection::WithAsyncMethod_ReadPhysicalStream<
                      kvmi::v1::Introspection::WithAsyncMethod_WritePhysicalStream<
                          kvmi::v1::Introspection::WithAsyncMethod_ApplyPolicy<
                              kvmi::v1::Introspection::WithAsyncMethod_ReadVirtualStream<
                                  kvmi::v1::Introspection::Service>>>>>>> {
 public:
  // `history` (may be null) lets StreamEvents resume after a cursor. `audit` (may be null: no
  // audit log) receives a record of every mutating and every denied call.
  IntrospectionService(Daemon* daemon, EventHistory* history, security::AuditLog* audit = nullptr);

  // Registers the async methods (the Start* below) on `async`, before the server starts.
  void ServeAsync(api::AsyncServer* async);
  // A server shutting down: the calls the tarpit holds are answered now, and later refusals at
  // once (no call may still be waiting for its answer when the async queue stops).
  void Drain() { tarpit_.Drain(); }

  // The async methods: each returns its call's reactor, as a callback service's method would.
  api::WriteReactor<kvmi::v1::StreamEventsResponse>* StartStreamEvents(
      grpc::ServerContext* context, const kvmi::v1::StreamEventsRequest* request);
  api::WriteReactor<kvmi::v1::WatchVMsResponse>* StartWatchVMs(
      grpc::ServerContext* context, const kvmi::v1::WatchVMsRequest* request);
  api::AttachStream* StartAttach(grpc::ServerContext* context);
  // Bulk memory (memory_stream.h, virtual_stream.h).
  api::WriteReactor<kvmi::v1::ReadPhysicalStreamResponse>* StartReadPhysicalStream(
      grpc::ServerContext* context, const kvmi::v1::ReadPhysicalStreamRequest* request);
  api::ReadReactor<kvmi::v1::WritePhysicalStreamRequest>* StartWritePhysicalStream(
      grpc::ServerContext* context, kvmi::v1::WritePhysicalStreamResponse* response);
  api::WriteReactor<kvmi::v1::ReadVirtualStreamResponse>* StartReadVirtualStream(
      grpc::ServerContext* context, const kvmi::v1::ReadVirtualStreamRequest* request);
  // Answered through `responder`, at once or after the caller's delay (api::Tarpit).
  void StartApplyPolicy(grpc::ServerContext* context, const kvmi::v1::ApplyPolicyRequest* request,
                        kvmi::v1::ApplyPolicyResponse* response, api::UnaryResponder* responder);

  grpc::Status ListVMs(grpc::ServerContext* context, const kvmi::v1::ListVMsRequest* request,
                       kvmi::v1::ListVMsResponse* response) override;
  grpc::Status GetVM(grpc::ServerContext* context, const kvmi::v1::GetVMRequest* request,
                     kvmi::v1::VM* response) override;
  grpc::Status ListPolicies(grpc::ServerContext* context,
                            const kvmi::v1::ListPoliciesRequest* request,
                            kvmi::v1::ListPoliciesResponse* response) override;
  grpc::Status DeletePolicy(grpc::ServerContext* context,
                            const kvmi::v1::DeletePolicyRequest* request,
                            kvmi::v1::DeletePolicyResponse* response) override;
  grpc::Status GetRegisters(grpc::ServerContext* context,
                            const kvmi::v1::GetRegistersRequest* request,
                            kvmi::v1::GetRegistersResponse* response) override;
  grpc::Status ReadPhysical(grpc::ServerContext* context,
                            const kvmi::v1::ReadPhysicalRequest* request,
                            kvmi::v1::ReadPhysicalResponse* response) override;
  grpc::Status WritePhysical(grpc::ServerContext* context,
                             const kvmi::v1::WritePhysicalRequest* request,
                             kvmi::v1::WritePhysicalResponse* response) override;
  grpc::Status PauseVCPU(grpc::ServerContext* context, const kvmi::v1::PauseVCPURequest* request,
                         kvmi::v1::PauseVCPUResponse* response) override;
  grpc::Status ResumeVCPU(grpc::ServerContext* context, const kvmi::v1::ResumeVCPURequest* request,
                          kvmi::v1::ResumeVCPUResponse* response) override;
  grpc::Status GetCPUID(grpc::ServerContext* context, const kvmi::v1::GetCPUIDRequest* request,
                        kvmi::v1::GetCPUIDResponse* response) override;
  grpc::Status GetXSAVE(grpc::ServerContext* context, const kvmi::v1::GetXSAVERequest* request,
                        kvmi::v1::GetXSAVEResponse* response) override;
  grpc::Status GetMTRRType(grpc::ServerContext* context,
                           const kvmi::v1::GetMTRRTypeRequest* request,
                           kvmi::v1::GetMTRRTypeResponse* response) override;
  grpc::Status InjectException(grpc::ServerContext* context,
                               const kvmi::v1::InjectExceptionRequest* request,
                               kvmi::v1::InjectExceptionResponse* response) override;
  grpc::Status GetPageAccess(grpc::ServerContext* context,
                             const kvmi::v1::GetPageAccessRequest* request,
                             kvmi::v1::GetPageAccessResponse* response) override;
  grpc::Status SetPageAccess(grpc::ServerContext* context,
                             const kvmi::v1::SetPageAccessRequest* request,
                             kvmi::v1::SetPageAccessResponse* response) override;
  grpc::Status SetRegisters(grpc::ServerContext* context,
                            const kvmi::v1::SetRegistersRequest* request,
                            kvmi::v1::SetRegistersResponse* response) override;
  grpc::Status ControlSPP(grpc::ServerContext* context, const kvmi::v1::ControlSPPRequest* request,
                          kvmi::v1::ControlSPPResponse* response) override;
  grpc::Status GetPageWriteBitmap(grpc::ServerContext* context,
                                  const kvmi::v1::GetPageWriteBitmapRequest* request,
                                  kvmi::v1::GetPageWriteBitmapResponse* response) override;
  grpc::Status SetPageWriteBitmap(grpc::ServerContext* context,
                                  const kvmi::v1::SetPageWriteBitmapRequest* request,
                                  kvmi::v1::SetPageWriteBitmapResponse* response) override;
  grpc::Status ControlEvents(grpc::ServerContext* context,
                             const kvmi::v1::ControlEventsRequest* request,
                             kvmi::v1::ControlEventsResponse* response) override;
  grpc::Status UnhookVM(grpc::ServerContext* context, const kvmi::v1::UnhookVMRequest* request,
                        kvmi::v1::UnhookVMResponse* response) override;
  grpc::Status TranslateAddress(grpc::ServerContext* context,
                                const kvmi::v1::TranslateAddressRequest* request,
                                kvmi::v1::TranslateAddressResponse* response) override;
  grpc::Status ReadVirtual(grpc::ServerContext* context,
                           const kvmi::v1::ReadVirtualRequest* request,
                           kvmi::v1::ReadVirtualResponse* response) override;
  grpc::Status WriteVirtual(grpc::ServerContext* context,
                            const kvmi::v1::WriteVirtualRequest* request,
                            kvmi::v1::WriteVirtualResponse* response) override;

 private:
  // Every RPC enters here before its logic: Admission identifies the caller, authorizes the
  // call (on the request's guest for guest RPCs: `target`), and audits it once the logic
  // answered. A status that is not OK is the call's answer. The logic gets the CallContext.
  template <typename Request, typename Logic>
  grpc::Status Serve(grpc::ServerContextBase* context, security::Rpc rpc, const Request& request,
                     const api::CallTarget& target, Logic&& logic) {
    api::AdmittedCall call;
    grpc::Status admitted = admission_.Admit(
        *context, rpc, target, [&] { return api::AuditSummaryOf(request); }, &call);
    if (!admitted.ok()) return admitted;
    return admission_.Finish(call, logic(call.context()));
  }
  // Serve, with `logic` also given the call's audit summary to add what its outcome tells.
  template <typename Request, typename Logic>
  grpc::Status ServeNoting(grpc::ServerContextBase* context, security::Rpc rpc,
                           const Request& request, const api::CallTarget& target, Logic&& logic) {
    api::AdmittedCall call;
    grpc::Status admitted = admission_.Admit(
        *context, rpc, target, [&] { return api::AuditSummaryOf(request); }, &call);
    if (!admitted.ok()) return admitted;
    return admission_.Finish(call, logic(call.context(), &call.audit_args()));
  }
  // One inline command of an Attach stream for `owner` (the stream's command thread).
  // Checked as its unary RPC on its guest, for the stream's caller.
  kvmi::v1::AttachResponse RunAttachCommand(const api::CallContext& stream,
                                            grpc::ServerContextBase* context, const OwnerId& owner,
                                            const kvmi::v1::Command& command);

  Daemon* const daemon_;
  api::Admission admission_;
  // Shared by every stream (queue budget, streams per identity); before streams_, which uses it.
  api::StreamLimits stream_limits_;
  api::Inventory inventory_;
  api::EventStreams streams_;
  api::GuestCommands commands_;
  api::MemoryStreams memory_;
  api::VirtualStreams virtual_;  // after commands_, whose AddressTranslation it uses
  // Holds the answers of callers that keep being refused by a limit (ApplyPolicy's).
  api::Tarpit tarpit_;
  std::atomic<uint64_t> next_stream_{1};  // numbers the owners of Attach streams
};

}  // namespace kvmid

#endif  // KVMID_DAEMON_API_INTROSPECTION_SERVICE_H_
