// ReadVirtualStream: guest-virtual memory of any length as a stream of ReadVirtualStreamResponse
// messages, on gRPC's async API (async_reactor.h; no thread per stream), built on the physical
// stream's ChunkedReader: chunks in order, a bounded number in flight, a chunk's slot freed only
// when it is sent. Each chunk read translates its pages (AddressTranslation::ReadRange: the cache,
// the walks pipelined through one TablePageReader) and reads the present ones; the chunk names
// every page it could not read.
//
// The paging context is taken once, asynchronously (a vCPU's GET_REGISTERS is sent when the
// stream starts; the first reads are issued when it answers), so no gRPC thread ever waits for
// the guest.
#ifndef KVMID_DAEMON_API_VIRTUAL_STREAM_H_
#define KVMID_DAEMON_API_VIRTUAL_STREAM_H_

#include <grpcpp/grpcpp.h>

#include "daemon/api/address_translation.h"
#include "daemon/api/async_reactor.h"
#include "daemon/api/call_context.h"
#include "daemon/api/stream_limits.h"
#include "daemon/kvmid.h"
#include "proto/kvmi/v1/introspection.pb.h"

namespace kvmid::api {

class VirtualStreams {
 public:
  // `translation` (the service's: its caches and MAXPHYADDR) must outlive every stream.
  VirtualStreams(Daemon* daemon, StreamLimits* limits, AddressTranslation* translation)
      : daemon_(daemon), limits_(limits), translation_(translation) {}

  // The reactor of an admitted ReadVirtualStream call (it deletes itself when gRPC is done). A
  // malformed request ends it at once with the status naming the field; a stream over its
  // caller's limits ends with RESOURCE_EXHAUSTED naming the limit.
  WriteReactor<kvmi::v1::ReadVirtualStreamResponse>* Read(
      const CallContext& call, const kvmi::v1::ReadVirtualStreamRequest& request);

 private:
  Daemon* const daemon_;
  StreamLimits* const limits_;
  AddressTranslation* const translation_;
};

}  // namespace kvmid::api

#endif  // KVMID_DAEMON_API_VIRTUAL_STREAM_H_
