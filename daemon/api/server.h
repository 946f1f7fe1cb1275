// The API server's assembly: kvmi.v1.Introspection plus gRPC reflection and grpc.health.v1, on a
// UNIX socket and/or TCP, with the event history StreamEvents resumes from. Listeners and their
// credentials are set up in one place each (AddListeners, ListenerCredentials).
#ifndef KVMID_DAEMON_API_SERVER_H_
#define KVMID_DAEMON_API_SERVER_H_

#include <absl/status/status.h>
#include <grpcpp/grpcpp.h>

#include <cstddef>
#include <memory>
#include <string>

#include "daemon/api/event_history.h"
#include "daemon/api/introspection_service.h"
#include "daemon/kvmid.h"
#include "daemon/security/audit.h"
#include "daemon/security/credentials.h"
#include "daemon/security/unix_listener.h"

namespace kvmid {

class ApiServer {
 public:
  // The last `history` events are remembered for StreamEvents' resume cursor. `audit` (may be
  // null: no audit log; else it outlives the server) gets a record of every mutating and every
  // denied call.
  explicit ApiServer(Daemon* daemon, size_t history = 8192, security::AuditLog* audit = nullptr);
  ~ApiServer();
  ApiServer(const ApiServer&) = delete;
  ApiServer& operator=(const ApiServer&) = delete;

  // Listeners from `options` (daemon/security/credentials.h): the UNIX socket accepted by kvmid
  // itself (exact mode and group, peer credentials), TCP with mutual TLS or, named, plaintext on
  // loopback. The error names the address or the option it could not use.
  absl::Status Start(const security::ApiListenOptions& options);
  void Shutdown();
  int tcp_port() const { return tcp_port_; }
  const EventHistory& history() const { return *history_; }

 private:
  absl::Status AddListeners(grpc::ServerBuilder* builder,
                            const security::ApiListenOptions& options);

  std::unique_ptr<EventHistory> history_;
  std::unique_ptr<IntrospectionService> service_;
  std::unique_ptr<grpc::Server> server_;
  std::unique_ptr<security::UnixApiListener> unix_listener_;
  int tcp_port_ = 0;
};

}  // namespace kvmid

#endif  // KVMID_DAEMON_API_SERVER_H_
