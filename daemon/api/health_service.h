// grpc.health.v1.Health, served by kvmid itself: Check on the synchronous server, Watch on the
// AsyncServer (gRPC's default health service is a callback-API service, which would bring gRPC's
// callback threads into the process: daemon/api/async_reactor.h).
//
// A name is SERVING once SetServing said so, NOT_SERVING after Shutdown; "" is the server as a
// whole. Check of a name never set is NOT_FOUND; Watch of it answers SERVICE_UNKNOWN and keeps
// watching (as the protocol says). Every watcher gets each change of its name, the latest one
// if several came while a write was in flight.
#ifndef KVMID_DAEMON_API_HEALTH_SERVICE_H_
#define KVMID_DAEMON_API_HEALTH_SERVICE_H_

#include <grpcpp/grpcpp.h>

#include <map>
#include <optional>
#include <set>
#include <string>

#include "daemon/api/async_reactor.h"
#include "daemon/base/mutex.h"
#include "grpc/health/v1/health.grpc.pb.h"

namespace kvmid::api {

class HealthService final
    : public grpc::health::v1::Health::WithAsyncMethod_Watch<grpc::health::v1::Health::Service> {
 public:
  using ServingStatus = grpc::health::v1::HealthCheckResponse::ServingStatus;

  HealthService() = default;
  ~HealthService() override;
  HealthService(const HealthService&) = delete;
  HealthService& operator=(const HealthService&) = delete;

  // Registers Watch on `async` (before the server starts).
  void ServeAsync(AsyncServer* async);
  void SetServing(const std::string& service, bool serving);
  // NOT_SERVING for every name, now and after (a server going away).
  void Shutdown();
  // Ends every Watch with `status`, each once the statuses it was sent are written (so that a
  // watcher of a server going away reads NOT_SERVING before its call ends); later Watch calls
  // are ended as they start.
  void EndWatches(const grpc::Status& status);

  grpc::Status Check(grpc::ServerContext* context,
                     const grpc::health::v1::HealthCheckRequest* request,
                     grpc::health::v1::HealthCheckResponse* response) override;

 private:
  class Watcher;
  ServingStatus StatusOf(const std::string& service) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void Remove(Watcher* watcher);

  mutable Mutex mu_;
  std::map<std::string, bool> serving_ ABSL_GUARDED_BY(mu_);
  bool shut_down_ ABSL_GUARDED_BY(mu_) = false;
  std::optional<grpc::Status> end_watches_ ABSL_GUARDED_BY(mu_);
  std::set<Watcher*> watchers_ ABSL_GUARDED_BY(mu_);
};

}  // namespace kvmid::api

#endif  // KVMID_DAEMON_API_HEALTH_SERVICE_H_
