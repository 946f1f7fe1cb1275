// The gRPC surface of kvmid: a thin adapter from kvmi.v1.Introspection to the daemon's internal
// API (registry, policies, verdict pipeline). No business logic lives here: requests are
// validated, translated, and answered with the status codes the proto documents.
#ifndef KVMID_DAEMON_API_INTROSPECTION_SERVICE_H_
#define KVMID_DAEMON_API_INTROSPECTION_SERVICE_H_

#include <grpcpp/grpcpp.h>

#include <atomic>
#include <memory>
#include <string>
#include <vector>

#include "daemon/api/event_history.h"
#include "daemon/kvmid.h"
#include "daemon/security/credentials.h"
#include "daemon/security/unix_listener.h"
#include "proto/kvmi/v1/introspection.grpc.pb.h"

namespace kvmid {

class AttachReactor;

// Attach runs on gRPC's callback API (events written from the guest's loop thread, verdicts
// applied from gRPC's read callback); every other method is synchronous.
class IntrospectionService final
    : public kvmi::v1::Introspection::WithCallbackMethod_Attach<kvmi::v1::Introspection::Service> {
 public:
  // `history` (may be null) lets StreamEvents resume after a cursor.
  IntrospectionService(Daemon* daemon, const EventHistory* history)
      : daemon_(daemon), history_(history) {}

  grpc::Status ListVMs(grpc::ServerContext* context, const kvmi::v1::ListVMsRequest* request,
                       kvmi::v1::ListVMsResponse* response) override;
  grpc::Status GetVM(grpc::ServerContext* context, const kvmi::v1::GetVMRequest* request,
                     kvmi::v1::VM* response) override;
  grpc::Status StreamEvents(grpc::ServerContext* context,
                            const kvmi::v1::StreamEventsRequest* request,
                            grpc::ServerWriter<kvmi::v1::EventMessage>* writer) override;
  grpc::Status ApplyPolicy(grpc::ServerContext* context,
                           const kvmi::v1::ApplyPolicyRequest* request,
                           kvmi::v1::ApplyPolicyResponse* response) override;
  grpc::Status ListPolicies(grpc::ServerContext* context,
                            const kvmi::v1::ListPoliciesRequest* request,
                            kvmi::v1::ListPoliciesResponse* response) override;
  grpc::Status DeletePolicy(grpc::ServerContext* context,
                            const kvmi::v1::DeletePolicyRequest* request,
                            kvmi::v1::DeletePolicyResponse* response) override;
  grpc::ServerBidiReactor<kvmi::v1::AttachRequest, kvmi::v1::AttachResponse>* Attach(
      grpc::CallbackServerContext* context) override;
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
  grpc::Status WatchVMs(grpc::ServerContext* context, const kvmi::v1::WatchVMsRequest* request,
                        grpc::ServerWriter<kvmi::v1::VMChange>* writer) override;

 private:
  friend class AttachReactor;
  // A Claim as the pipeline's HandlerClaim and the arming it asks for, or INVALID_ARGUMENT.
  static grpc::Status ParseClaim(const kvmi::v1::Claim& claim, HandlerClaim* handler_claim,
                                 Arming* arming);
  // The unary methods that an Attach stream's inline commands run too (any server context).
  grpc::Status GetRegistersImpl(grpc::ServerContextBase* context,
                                const kvmi::v1::GetRegistersRequest* request,
                                kvmi::v1::GetRegistersResponse* response);
  grpc::Status SetRegistersImpl(grpc::ServerContextBase* context,
                                const kvmi::v1::SetRegistersRequest* request,
                                kvmi::v1::SetRegistersResponse* response);
  grpc::Status ReadPhysicalImpl(grpc::ServerContextBase* context,
                                const kvmi::v1::ReadPhysicalRequest* request,
                                kvmi::v1::ReadPhysicalResponse* response);
  grpc::Status WritePhysicalImpl(grpc::ServerContextBase* context,
                                 const kvmi::v1::WritePhysicalRequest* request,
                                 kvmi::v1::WritePhysicalResponse* response);
  grpc::Status GetPageAccessImpl(grpc::ServerContextBase* context,
                                 const kvmi::v1::GetPageAccessRequest* request,
                                 kvmi::v1::GetPageAccessResponse* response);
  grpc::Status InjectExceptionImpl(grpc::ServerContextBase* context,
                                   const kvmi::v1::InjectExceptionRequest* request,
                                   kvmi::v1::InjectExceptionResponse* response);
  grpc::Status GetCPUIDImpl(grpc::ServerContextBase* context,
                            const kvmi::v1::GetCPUIDRequest* request,
                            kvmi::v1::GetCPUIDResponse* response);
  grpc::Status GetMTRRTypeImpl(grpc::ServerContextBase* context,
                               const kvmi::v1::GetMTRRTypeRequest* request,
                               kvmi::v1::GetMTRRTypeResponse* response);
  // The guest a request names, or the status to return.
  grpc::Status FindGuest(const std::string& vm, std::shared_ptr<Guest>* guest,
                         std::shared_ptr<GuestSession>* session = nullptr);
  // FindGuest plus a vCPU index check.
  grpc::Status FindVcpu(const std::string& vm, uint32_t vcpu, std::shared_ptr<Guest>* guest);
  // The RPCs that pause, restrict or arm something, for `owner`: the API's own lease for unary
  // calls, the stream's for an Attach stream's inline commands.
  grpc::Status PauseFor(const OwnerId& owner, grpc::ServerContextBase* context,
                        const kvmi::v1::PauseVCPURequest* request,
                        kvmi::v1::PauseVCPUResponse* response);
  grpc::Status ResumeFor(const OwnerId& owner, grpc::ServerContextBase* context,
                         const kvmi::v1::ResumeVCPURequest* request,
                         kvmi::v1::ResumeVCPUResponse* response);
  grpc::Status SetPagesFor(const OwnerId& owner, grpc::ServerContextBase* context,
                           const kvmi::v1::SetPageAccessRequest* request,
                           kvmi::v1::SetPageAccessResponse* response);
  grpc::Status ControlEventsFor(const OwnerId& owner, grpc::ServerContextBase* context,
                                const kvmi::v1::ControlEventsRequest* request,
                                kvmi::v1::ControlEventsResponse* response);
  // One inline command of an Attach stream, answered as the unary RPC would be.
  kvmi::v1::AttachResponse RunCommand(grpc::ServerContextBase* context, const OwnerId& owner,
                                      const kvmi::v1::Command& command);
  // Sends one vCPU command and waits for its reply data (within the call's deadline).
  template <typename Request>
  grpc::Status Call(grpc::ServerContextBase* context, Guest& guest, const Request& request,
                    const char* what, std::vector<uint8_t>* data);

  Daemon* daemon_;
  const EventHistory* history_;
  std::atomic<uint64_t> next_stream_{1};
};

// Server lifecycle: reflection and grpc.health.v1 on; UNIX socket and/or TCP.
class ApiServer {
 public:
  // `history` recent events are remembered for StreamEvents' resume cursor.
  explicit ApiServer(Daemon* daemon, size_t history = 8192);
  ~ApiServer();
  // Listeners from `options` (daemon/security/credentials.h): the UNIX socket accepted by kvmid
  // (mode, group, peer credentials), TCP with mutual TLS or, named, plaintext on loopback.
  // Returns "" or an error naming the address or the option.
  std::string Start(const security::ApiListenOptions& options);
  void Shutdown();
  int tcp_port() const { return tcp_port_; }
  const EventHistory& history() const { return *history_; }

 private:
  std::unique_ptr<EventHistory> history_;
  std::unique_ptr<IntrospectionService> service_;
  std::unique_ptr<grpc::Server> server_;
  std::unique_ptr<security::UnixApiListener> unix_listener_;
  int tcp_port_ = 0;
};

// Conversions, exposed for tests.
kvmi::v1::VM ToProto(const GuestSnapshot& snapshot,
                     const std::map<std::string, std::string>& labels);
kvmi::v1::Event ToProto(const ObservedEvent& observed, bool include_registers);
kvmi::v1::Lease ToProto(const OwnerId& owner, const Arming& arming);
// The general registers of a Registers message (control-register fields are not settable).
kvm_regs RegistersFromProto(const kvmi::v1::Registers& registers);
// A client's verdict for `event`, checked against what the event accepts; "" or the error.
std::string FromProto(const kvmi::v1::Verdict& in, const kvmi::Event& event, Verdict* out);
// A command result as a gRPC status; KVMI errors keep their name ("KVM_EPERM").
grpc::Status ToStatus(const CommandResult& result, const std::string& what);

}  // namespace kvmid

#endif  // KVMID_DAEMON_API_INTROSPECTION_SERVICE_H_
