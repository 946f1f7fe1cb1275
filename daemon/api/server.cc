#include "daemon/api/server.h"

#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/health_check_service_interface.h>
#include <spdlog/spdlog.h>
#include <sys/stat.h>
#include <unistd.h>

#include "daemon/api/limits.h"
#include "daemon/metrics/api_interceptor.h"

namespace kvmid {

ApiServer::ApiServer(Daemon* daemon, size_t history, security::AuditLog* audit)
    : history_(std::make_unique<EventHistory>(&daemon->pipeline(), history)),
      service_(std::make_unique<IntrospectionService>(daemon, history_.get(), audit)) {}

ApiServer::~ApiServer() { Shutdown(); }

// The UNIX socket is bound (mode, group) and accepted by kvmid, which records each peer's
// credentials before handing the connection to gRPC; TCP has gRPC's mTLS credentials.
absl::Status ApiServer::AddListeners(grpc::ServerBuilder* builder,
                                     const security::ApiListenOptions& options) {
  if (!options.unix_socket.empty()) {
    auto listener = security::UnixApiListener::Bind(options.unix_socket, options.unix_socket_mode,
                                                    options.unix_socket_group);
    if (!listener.ok()) return listener.status();
    unix_listener_ = *std::move(listener);
  }
  if (!options.tcp.empty()) {
    auto credentials = security::TcpServerCredentials(options);
    if (!credentials.ok()) return credentials.status();
    builder->AddListeningPort(options.tcp, *credentials, &tcp_port_);
  }
  return absl::OkStatus();
}

absl::Status ApiServer::Start(const security::ApiListenOptions& options) {
  if (options.unix_socket.empty() && options.tcp.empty()) {
    return absl::InvalidArgumentError("no API address (api_socket or api_tcp)");
  }
  absl::Status valid = security::ValidateListenOptions(options);
  if (!valid.ok()) return valid;
  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  absl::Status listening = AddListeners(&builder, options);
  if (!listening.ok()) return listening;
  builder.RegisterService(service_.get());
  builder.experimental().SetInterceptorCreators(ApiMetricsInterceptors());  // kvmid_api_calls_total
  server_ = builder.BuildAndStart();
  const std::string where =
      (options.unix_socket.empty() ? "" : "unix:" + options.unix_socket + " ") + options.tcp;
  if (!server_) return absl::UnavailableError("cannot serve the API on " + where);
  if (!options.tcp.empty() && tcp_port_ == 0) {
    return absl::UnavailableError("cannot listen on " + options.tcp);
  }
  if (unix_listener_) unix_listener_->Start(server_.get());
  // grpc.health.v1 answers for the service by name too ("" alone is the server as a whole).
  server_->GetHealthCheckService()->SetServingStatus(kvmi::v1::Introspection::service_full_name(),
                                                     true);
  spdlog::info("API (kvmi.v1.Introspection, reflection, health) on {}{}", where,
               options.tcp.empty()              ? ""
               : options.tcp_insecure_plaintext ? " (PLAINTEXT, loopback)"
                                                : " (mutual TLS)");
  return absl::OkStatus();
}

void ApiServer::Shutdown() {
  // No new UNIX connections for a server going away; then the server (which closes the ones it
  // has).
  if (unix_listener_) unix_listener_->Stop();
  if (!server_) return;
  server_->GetHealthCheckService()->Shutdown();  // NOT_SERVING for every name from now on
  // Streams end within their poll interval; give them a moment, then cut.
  server_->Shutdown(std::chrono::system_clock::now() + api::kShutdownGrace);
  server_.reset();
}

}  // namespace kvmid
