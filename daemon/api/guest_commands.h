// The control RPCs on one guest: registers, memory, CPU state, page access and sub-page
// protection, pausing, arming and unhooking. Each checks its request (errors name the field and
// the limit), finds the guest through GuestFinder, asks the guest or its session, and answers
// with the status codes the proto documents. The unary RPCs and an Attach stream's inline
// commands both run here; what a call pauses, restricts or arms goes to `owner`'s lease.
#ifndef KVMID_DAEMON_API_GUEST_COMMANDS_H_
#define KVMID_DAEMON_API_GUEST_COMMANDS_H_

#include <grpcpp/grpcpp.h>

#include "daemon/api/address_translation.h"
#include "daemon/api/guest_call.h"
#include "daemon/kvmid.h"
#include "proto/kvmi/v1/introspection.pb.h"

namespace kvmid::api {

// Who owns what the unary RPCs pause, restrict or arm (any client may resume or change it); an
// Attach stream's inline commands use the stream's owner instead, released when it ends.
inline constexpr const char* kApiOwner = "api";

class GuestCommands {
 public:
  using Context = grpc::ServerContextBase;
  // `pipeline` (may be null) lets TranslateAddress's cache see CR3 and PF write events.
  explicit GuestCommands(Registry* registry, VerdictPipeline* pipeline = nullptr)
      : guests_(registry), translation_(registry, pipeline) {}

  // guest_commands.cc: what reads or writes guest state.
  grpc::Status GetRegisters(Context* context, const kvmi::v1::GetRegistersRequest& request,
                            kvmi::v1::GetRegistersResponse* response);
  grpc::Status SetRegisters(Context* context, const kvmi::v1::SetRegistersRequest& request,
                            kvmi::v1::SetRegistersResponse* response);
  grpc::Status ReadPhysical(Context* context, const kvmi::v1::ReadPhysicalRequest& request,
                            kvmi::v1::ReadPhysicalResponse* response);
  grpc::Status WritePhysical(Context* context, const kvmi::v1::WritePhysicalRequest& request,
                             kvmi::v1::WritePhysicalResponse* response);
  grpc::Status GetCPUID(Context* context, const kvmi::v1::GetCPUIDRequest& request,
                        kvmi::v1::GetCPUIDResponse* response);
  grpc::Status GetXSAVE(Context* context, const kvmi::v1::GetXSAVERequest& request,
                        kvmi::v1::GetXSAVEResponse* response);
  grpc::Status GetMTRRType(Context* context, const kvmi::v1::GetMTRRTypeRequest& request,
                           kvmi::v1::GetMTRRTypeResponse* response);
  grpc::Status InjectException(Context* context, const kvmi::v1::InjectExceptionRequest& request,
                               kvmi::v1::InjectExceptionResponse* response);
  grpc::Status GetPageAccess(Context* context, const kvmi::v1::GetPageAccessRequest& request,
                             kvmi::v1::GetPageAccessResponse* response);
  grpc::Status ControlSPP(Context* context, const kvmi::v1::ControlSPPRequest& request,
                          kvmi::v1::ControlSPPResponse* response);
  grpc::Status GetPageWriteBitmap(Context* context,
                                  const kvmi::v1::GetPageWriteBitmapRequest& request,
                                  kvmi::v1::GetPageWriteBitmapResponse* response);
  grpc::Status SetPageWriteBitmap(Context* context,
                                  const kvmi::v1::SetPageWriteBitmapRequest& request,
                                  kvmi::v1::SetPageWriteBitmapResponse* response);
  grpc::Status UnhookVM(Context* context, const kvmi::v1::UnhookVMRequest& request,
                        kvmi::v1::UnhookVMResponse* response);

  // address_translation.h: guest-virtual addresses (issue 15).
  grpc::Status TranslateAddress(Context* context, const kvmi::v1::TranslateAddressRequest& request,
                                kvmi::v1::TranslateAddressResponse* response) {
    return translation_.TranslateAddress(context, request, response);
  }
  grpc::Status ReadVirtual(Context* context, const kvmi::v1::ReadVirtualRequest& request,
                           kvmi::v1::ReadVirtualResponse* response) {
    return translation_.ReadVirtual(context, request, response);
  }
  grpc::Status WriteVirtual(Context* context, const kvmi::v1::WriteVirtualRequest& request,
                            kvmi::v1::WriteVirtualResponse* response) {
    return translation_.WriteVirtual(context, request, response);
  }
  AddressTranslation& translation() { return translation_; }

  // lease_commands.cc: what a lease owns (pauses, page restrictions, arming).
  grpc::Status PauseVCPU(const OwnerId& owner, Context* context,
                         const kvmi::v1::PauseVCPURequest& request,
                         kvmi::v1::PauseVCPUResponse* response);
  grpc::Status ResumeVCPU(const OwnerId& owner, Context* context,
                          const kvmi::v1::ResumeVCPURequest& request,
                          kvmi::v1::ResumeVCPUResponse* response);
  grpc::Status SetPageAccess(const OwnerId& owner, Context* context,
                             const kvmi::v1::SetPageAccessRequest& request,
                             kvmi::v1::SetPageAccessResponse* response);
  grpc::Status ControlEvents(const OwnerId& owner, Context* context,
                             const kvmi::v1::ControlEventsRequest& request,
                             kvmi::v1::ControlEventsResponse* response);

  // One inline command of an Attach stream for `owner`, answered as the unary RPC would be.
  kvmi::v1::AttachResponse Run(Context* context, const OwnerId& owner,
                               const kvmi::v1::Command& command);

 private:
  GuestFinder guests_;
  AddressTranslation translation_;
};

// An Attach stream's answer to command `id` that failed with `status`.
kvmi::v1::AttachResponse CommandResultMessage(uint64_t id, const grpc::Status& status);

}  // namespace kvmid::api

#endif  // KVMID_DAEMON_API_GUEST_COMMANDS_H_
