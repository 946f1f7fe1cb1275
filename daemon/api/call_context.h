// What Admit established about one API call (or one stream), handed to the logic below the gRPC
// handlers so that it never looks at a grpc::ServerContext for identity or authorization:
// who is calling, and the authorization snapshot the call was admitted with.
#ifndef KVMID_DAEMON_API_CALL_CONTEXT_H_
#define KVMID_DAEMON_API_CALL_CONTEXT_H_

#include <grpcpp/support/status.h>

#include <memory>
#include <string>

#include "daemon/guest/guest.h"
#include "daemon/security/authz.h"

namespace kvmid::api {

struct CallContext;

// Where a refusal by a limit below the RPC's handler is audited (a stream's per-identity cap or
// queue budget: StreamLimits::Admit's refusals): api::Admission, for the calls it admitted.
class LimitRefusalSink {
 public:
  virtual ~LimitRefusalSink() = default;
  // `status`: the RESOURCE_EXHAUSTED answer that names the limit (security::Exhausted).
  virtual void RefusedByLimit(const CallContext& call, const grpc::Status& status) const = 0;
};

struct CallContext {
  security::Caller caller;
  // The RPC the call was admitted as, and where its limit refusals are audited (null: nowhere,
  // e.g. the logic's unit tests).
  security::Rpc rpc = security::Rpc::kListVMs;
  const LimitRefusalSink* refusals = nullptr;
  // The rules the call was admitted with (one snapshot per call or stream). Null: no
  // authorization (unit tests of the logic alone): every guest is visible.
  std::shared_ptr<const security::Authorizer> authorizer;

  // The key of per-identity limits (streams per identity): "spiffe://...", "uid=1000,gid=1000",
  // "anonymous".
  std::string IdentityKey() const { return caller.Describe(); }
  // Lists and streams: whether `guest` is shown to the caller (viewer on it).
  bool Visible(const GuestView& guest) const;

  // The call was refused by a limit (`status`, RESOURCE_EXHAUSTED): one audit record, rate
  // limited (docs/SECURITY.md "Audit log"). Streams call it at their refusal sites.
  void AuditLimitRefusal(const grpc::Status& status) const {
    if (refusals != nullptr) refusals->RefusedByLimit(*this, status);
  }
  // A context that sees every guest (tests, in-process callers).
  static CallContext Unrestricted(std::string peer = "in-process");
};

// What authorization knows about a guest, from the pipeline's cached view of it.
security::GuestRef GuestRefOf(const GuestView& guest);

}  // namespace kvmid::api

#endif  // KVMID_DAEMON_API_CALL_CONTEXT_H_
