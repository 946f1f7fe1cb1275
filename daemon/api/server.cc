#include "daemon/api/server.h"

#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/health_check_service_interface.h>
#include <spdlog/spdlog.h>
#include <sys/stat.h>
#include <unistd.h>

#include "daemon/api/limits.h"
#include "daemon/metrics/api_interceptor.h"

namespace kvmid {

ApiServer::ApiServer(Daemon* daemon, size_t history)
    : history_(std::make_unique<EventHistory>(&daemon->pipeline(), history)),
      service_(std::make_unique<IntrospectionService>(daemon, history_.get())) {}

ApiServer::~ApiServer() { Shutdown(); }

std::shared_ptr<grpc::ServerCredentials> ApiServer::ListenerCredentials() const {
  return grpc::InsecureServerCredentials();
}

void ApiServer::AddListeners(grpc::ServerBuilder* builder, const std::string& unix_socket,
                             const std::string& tcp) {
  if (!unix_socket.empty()) {
    std::string dir = unix_socket.substr(0, unix_socket.rfind('/'));
    if (!dir.empty()) ::mkdir(dir.c_str(), 0750);  // /run/kvmid on a fresh host
    ::unlink(unix_socket.c_str());                 // a stale socket from a previous run
    builder->AddListeningPort("unix:" + unix_socket, ListenerCredentials());
  }
  if (!tcp.empty()) builder->AddListeningPort(tcp, ListenerCredentials(), &tcp_port_);
}

absl::Status ApiServer::Start(const std::string& unix_socket, const std::string& tcp) {
  if (unix_socket.empty() && tcp.empty()) {
    return absl::InvalidArgumentError("no API address (api_socket or api_tcp)");
  }
  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  AddListeners(&builder, unix_socket, tcp);
  builder.RegisterService(service_.get());
  builder.experimental().SetInterceptorCreators(ApiMetricsInterceptors());  // kvmid_api_calls_total
  server_ = builder.BuildAndStart();
  const std::string where = (unix_socket.empty() ? "" : "unix:" + unix_socket + " ") + tcp;
  if (!server_) return absl::UnavailableError("cannot serve the API on " + where);
  if (!tcp.empty() && tcp_port_ == 0) return absl::UnavailableError("cannot listen on " + tcp);
  // grpc.health.v1 answers for the service by name too ("" alone is the server as a whole).
  server_->GetHealthCheckService()->SetServingStatus(kvmi::v1::Introspection::service_full_name(),
                                                     true);
  unix_socket_ = unix_socket;
  spdlog::info("API (kvmi.v1.Introspection, reflection, health) on {}", where);
  return absl::OkStatus();
}

void ApiServer::Shutdown() {
  if (!server_) return;
  server_->GetHealthCheckService()->Shutdown();  // NOT_SERVING for every name from now on
  // Streams end within their poll interval; give them a moment, then cut.
  server_->Shutdown(std::chrono::system_clock::now() + api::kShutdownGrace);
  server_.reset();
  if (!unix_socket_.empty()) ::unlink(unix_socket_.c_str());
}

}  // namespace kvmid
