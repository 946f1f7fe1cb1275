// A server-streaming call refused before any stream state exists: a reactor that finishes at once
// with the refusal's status (StreamEvents, WatchVMs, ReadPhysicalStream, ReadVirtualStream).
#ifndef KVMID_DAEMON_API_FINISHED_STREAM_H_
#define KVMID_DAEMON_API_FINISHED_STREAM_H_

#include <grpcpp/grpcpp.h>

#include "daemon/api/async_reactor.h"

namespace kvmid::api {

// A call that ends at once with `status`; the reactor deletes itself when its call is done.
template <typename Message>
WriteReactor<Message>* FinishedStream(const grpc::Status& status) {
  class Finished final : public WriteReactor<Message> {
   public:
    explicit Finished(const grpc::Status& status) { this->Finish(status); }
    void OnDone() override { delete this; }
  };
  return new Finished(status);
}

}  // namespace kvmid::api

#endif  // KVMID_DAEMON_API_FINISHED_STREAM_H_
