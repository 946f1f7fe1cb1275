// The Attach stream: a client claims blocking events as a remote handler, answers them with
// verdicts, and may run control commands inline (owned by the stream, released when it ends).
// Runs on gRPC's async API (async_reactor.h): events are written from the guest's loop thread
// and verdicts applied from the read's completion, so a remote verdict costs no thread hand-off
// inside kvmid beyond the loop's own wake-up.
#ifndef KVMID_DAEMON_API_ATTACH_H_
#define KVMID_DAEMON_API_ATTACH_H_

#include <grpcpp/grpcpp.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>

#include "daemon/api/async_reactor.h"
#include "daemon/api/call_context.h"
#include "daemon/api/stream_limits.h"
#include "daemon/kvmid.h"
#include "proto/kvmi/v1/introspection.pb.h"

namespace kvmid::api {

// A Claim as the pipeline's HandlerClaim and the arming it asks for, or INVALID_ARGUMENT naming
// the field. `limits`: a deadline_ms above max_attach_deadline_ms is RESOURCE_EXHAUSTED naming
// the limit (0 = the daemon's deadline for the event type, --deadline_ms or the configuration's,
// which the operator chose); the handler may hold max_held_events_per_handler events at once.
grpc::Status ParseClaim(const kvmi::v1::Claim& claim, const security::Limits& limits,
                        HandlerClaim* handler_claim, Arming* arming);

// Runs one inline command for the stream's owner (blocking: it waits for the guest), answered
// as the unary RPC would be.
using AttachCommandRunner = std::function<kvmi::v1::AttachResponse(
    grpc::ServerContextBase* context, const OwnerId& owner, const kvmi::v1::Command& command)>;

using AttachStream = BidiReactor<kvmi::v1::AttachRequest, kvmi::v1::AttachResponse>;

// The authorization a stream needs past its RPC's own check (api::Admission does it for the
// service): the claim's scope and fallback, and verdicts that CRASH a guest.
class AttachGuard {
 public:
  virtual ~AttachGuard() = default;
  // After the claim parsed; not OK ends the stream with it.
  virtual grpc::Status AdmitClaim(const kvmi::v1::Claim& claim) = 0;
  // A verdict with ACTION_CRASH for an event of `guest`; not OK refuses the verdict (a
  // VerdictError to the client) and the event keeps waiting for another one or its deadline.
  virtual grpc::Status AdmitCrashVerdict(const kvmi::v1::Verdict& verdict, const Guest& guest) = 0;
};

// A new stream on `context` (it deletes itself when gRPC is done with it). Owners are numbered
// from `next_stream`. A stream whose `admitted` is not OK ends with it at once. `guard` may be
// null (no authorization past the RPC's: in-process tests). With `limits`, the stream takes a
// place among `call`'s identity's streams (streams_per_identity) until it ends, or ends at once
// with RESOURCE_EXHAUSTED.
AttachStream* StartAttach(Daemon* daemon, grpc::ServerContextBase* context,
                          std::atomic<uint64_t>* next_stream, AttachCommandRunner run_command,
                          const grpc::Status& admitted,
                          std::shared_ptr<AttachGuard> guard = nullptr,
                          StreamLimits* limits = nullptr, const CallContext* call = nullptr);

// Tests only: how long a read deferred after a handler's last verdict waits for the stream's next
// write (1 ms in kvmid).
void SetAttachReadDeferralForTesting(std::chrono::microseconds deferral);

}  // namespace kvmid::api

#endif  // KVMID_DAEMON_API_ATTACH_H_
