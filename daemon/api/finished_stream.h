// A server-streaming call refused before any stream state exists: a reactor that finishes at once
// with the refusal's status (StreamEvents, WatchVMs, ReadPhysicalStream, ReadVirtualStream).
#ifndef KVMID_DAEMON_API_FINISHED_STREAM_H_
#define KVMID_DAEMON_API_FINISHED_STREAM_H_

#include <grpcpp/grpcpp.h>

namespace kvmid::api {

// A call that ends at once with `status`; the reactor deletes itself when gRPC is done with it.
template <typename Message>
grpc::ServerWriteReactor<Message>* FinishedStream(const grpc::Status& status) {
  class Finished final : public grpc::ServerWriteReactor<Message> {
   public:
    explicit Finished(const grpc::Status& status) { this->Finish(status); }
    void OnDone() override { delete this; }
  };
  return new Finished(status);
}

}  // namespace kvmid::api

#endif  // KVMID_DAEMON_API_FINISHED_STREAM_H_
