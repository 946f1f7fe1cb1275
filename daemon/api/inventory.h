// The RPCs about what kvmid holds rather than about one guest's state: the guests (ListVMs,
// GetVM) and the policies (ApplyPolicy, ListPolicies, DeletePolicy).
#ifndef KVMID_DAEMON_API_INVENTORY_H_
#define KVMID_DAEMON_API_INVENTORY_H_

#include <grpcpp/grpcpp.h>

#include "daemon/api/call_context.h"
#include "daemon/api/guest_call.h"
#include "daemon/kvmid.h"
#include "proto/kvmi/v1/introspection.pb.h"

namespace kvmid::api {

class Inventory {
 public:
  explicit Inventory(Daemon* daemon) : daemon_(daemon), guests_(&daemon->registry()) {}

  // Only the guests `call` may see (CallContext::Visible): the others are not listed, and GetVM
  // answers NOT_FOUND for them.
  grpc::Status ListVMs(const CallContext& call, const kvmi::v1::ListVMsRequest& request,
                       kvmi::v1::ListVMsResponse* response);
  grpc::Status GetVM(const CallContext& call, const kvmi::v1::GetVMRequest& request,
                     kvmi::v1::VM* response);
  // Guests sorted by UUID, paged (kListVMsDefaultPageSize, kListVMsMaxPageSize,
  // kListVMsMaxPageBytes); the token resumes after the last UUID listed.
  // Policies: create vs replace (etag, allow_replace) and the configuration's protection
  // (override_config) as PolicyPrecondition says; ListPolicies pages in evaluation order and
  // resumes after the last policy's Rule::position.
  grpc::Status ApplyPolicy(const kvmi::v1::ApplyPolicyRequest& request,
                           kvmi::v1::ApplyPolicyResponse* response);
  grpc::Status ListPolicies(const kvmi::v1::ListPoliciesRequest& request,
                            kvmi::v1::ListPoliciesResponse* response);
  grpc::Status DeletePolicy(const kvmi::v1::DeletePolicyRequest& request,
                            kvmi::v1::DeletePolicyResponse* response);

 private:
  kvmi::v1::VM Describe(const Guest& guest);

  Daemon* const daemon_;
  GuestFinder guests_;
};

}  // namespace kvmid::api

#endif  // KVMID_DAEMON_API_INVENTORY_H_
