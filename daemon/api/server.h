// The API server's assembly: kvmi.v1.Introspection plus gRPC reflection and grpc.health.v1, on a
// UNIX socket and/or TCP, with the event history StreamEvents resumes from. Listeners and their
// credentials are set up in one place each (AddListeners, ListenerCredentials).
#ifndef KVMID_DAEMON_API_SERVER_H_
#define KVMID_DAEMON_API_SERVER_H_

#include <absl/status/status.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/support/server_interceptor.h>

#include <cstddef>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "daemon/api/async_reactor.h"
#include "daemon/api/event_history.h"
#include "daemon/api/health_service.h"
#include "daemon/api/introspection_service.h"
#include "daemon/base/mutex.h"
#include "daemon/kvmid.h"
#include "daemon/security/audit.h"
#include "daemon/security/credentials.h"
#include "daemon/security/unix_listener.h"

namespace kvmid {

// What a stream ended by a shutdown is told.
inline constexpr char kShuttingDownMessage[] = "kvmid is shutting down";

// The streaming calls open on a server (StreamEvents, WatchVMs, Attach, the memory streams,
// reflection), registered by a gRPC interceptor (Interceptors()) from their start to their end,
// so that a shutdown can end them at once: EndAll cancels each with UNAVAILABLE
// kShuttingDownMessage (the client sees that status; the reactor gets OnCancel and finishes), and
// streams that start afterwards are ended as they start. Unary calls are not registered: they
// get the shutdown's grace. Nor is health's Watch: it ends itself with the same status once it
// has written NOT_SERVING (HealthService::EndWatches). Thread-safe.
class OpenStreams {
 public:
  OpenStreams() = default;
  OpenStreams(const OpenStreams&) = delete;
  OpenStreams& operator=(const OpenStreams&) = delete;

  // The interceptor factory to install on the server's builder (it refers to this object, which
  // must outlive the server).
  std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface> NewInterceptorFactory();
  // Ends every open stream and every later one. Returns how many were open.
  size_t EndAll();
  size_t open() const;

  // The interceptor's side: `call` (referenced until Remove) is open under `id`.
  void Add(const void* id, grpc_call* call);
  void Remove(const void* id);

 private:
  mutable Mutex mu_;
  std::map<const void*, grpc_call*> calls_ ABSL_GUARDED_BY(mu_);  // each holds a grpc_call ref
  bool ended_ ABSL_GUARDED_BY(mu_) = false;
};

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
  // Stops accepting, ends the open streams at once (UNAVAILABLE kShuttingDownMessage; health
  // watchers once they have written NOT_SERVING) and gives the unary calls in flight
  // api::kShutdownGrace to finish (and a health watcher whose client stopped reading: cancelled
  // then). Idempotent.
  void Shutdown();
  const OpenStreams& open_streams() const { return open_streams_; }
  int tcp_port() const { return tcp_port_; }
  const EventHistory& history() const { return *history_; }

 private:
  absl::Status AddListeners(grpc::ServerBuilder* builder,
                            const security::ApiListenOptions& options);

  OpenStreams open_streams_;  // before the server, which its interceptors refer to
  std::unique_ptr<EventHistory> history_;
  std::unique_ptr<IntrospectionService> service_;
  std::unique_ptr<api::HealthService> health_;
  // The async methods' completion queue and threads: stopped after the server shut down.
  std::unique_ptr<api::AsyncServer> async_;
  std::unique_ptr<grpc::Server> server_;
  std::unique_ptr<security::UnixApiListener> unix_listener_;
  int tcp_port_ = 0;
};

}  // namespace kvmid

#endif  // KVMID_DAEMON_API_SERVER_H_
