#include "daemon/api/server.h"

#include <absl/strings/str_cat.h>
#include <grpc/grpc.h>
#include <grpcpp/ext/health_check_service_server_builder_option.h>
#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <spdlog/spdlog.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <string>

#include "daemon/api/limits.h"
#include "daemon/base/tsan.h"
#include "daemon/metrics/api_interceptor.h"

namespace kvmid {

namespace {

// "/grpc.health.v1.Health/Watch", as ServerRpcInfo::method() names it.
const std::string& HealthWatchMethod() {
  static const std::string* const method =
      new std::string(absl::StrCat("/", grpc::health::v1::Health::service_full_name(), "/Watch"));
  return *method;
}

// One per streaming call: registers it with OpenStreams when its first hook runs (its grpc_call
// is set by then) and removes it when gRPC deletes the interceptor (the call is done).
class OpenStreamInterceptor final : public grpc::experimental::Interceptor {
 public:
  OpenStreamInterceptor(OpenStreams* streams, grpc::experimental::ServerRpcInfo* info)
      : streams_(streams), info_(info) {}
  ~OpenStreamInterceptor() override {
    const TsanChecked ours;  // gRPC may run this inside a TsanIgnored scope (daemon/base/tsan.h)
    if (added_) streams_->Remove(this);
  }
  void Intercept(grpc::experimental::InterceptorBatchMethods* methods) override {
    {
      const TsanChecked ours;  // not around Proceed: gRPC's own code runs on in it
      if (!added_ && info_->server_context() != nullptr &&
          info_->server_context()->c_call() != nullptr) {
        added_ = true;
        streams_->Add(this, info_->server_context()->c_call());
      }
    }
    methods->Proceed();
  }

 private:
  OpenStreams* const streams_;
  grpc::experimental::ServerRpcInfo* const info_;
  // Hooks of one call never run concurrently, but they run on the threads that start the call's
  // operations, and the destructor on the one that deletes it; gRPC orders them, TSan cannot see
  // it (daemon/base/tsan.h), and an atomic costs nothing here.
  std::atomic<bool> added_{false};
};

class OpenStreamsFactory final : public grpc::experimental::ServerInterceptorFactoryInterface {
 public:
  explicit OpenStreamsFactory(OpenStreams* streams) : streams_(streams) {}
  grpc::experimental::Interceptor* CreateServerInterceptor(
      grpc::experimental::ServerRpcInfo* info) override {
    const TsanChecked ours;
    using Type = grpc::experimental::ServerRpcInfo::Type;
    if (info->type() == Type::UNARY) return nullptr;  // unary calls get the grace
    // A health Watch ends itself at shutdown, after writing NOT_SERVING
    // (HealthService::EndWatches): cancelled here, its last status could be lost.
    if (info->method() == HealthWatchMethod()) return nullptr;
    return new OpenStreamInterceptor(streams_, info);
  }

 private:
  OpenStreams* const streams_;
};

void EndCall(grpc_call* call) {
  grpc_call_cancel_with_status(call, GRPC_STATUS_UNAVAILABLE, kShuttingDownMessage, nullptr);
}

}  // namespace

std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface>
OpenStreams::NewInterceptorFactory() {
  return std::make_unique<OpenStreamsFactory>(this);
}

void OpenStreams::Add(const void* id, grpc_call* call) {
  grpc_call_ref(call);
  bool ended = false;
  {
    MutexLock lock(&mu_);
    calls_[id] = call;
    ended = ended_;
  }
  if (ended) EndCall(call);  // started after EndAll: ended as it starts (our ref keeps it)
}

void OpenStreams::Remove(const void* id) {
  grpc_call* call = nullptr;
  {
    MutexLock lock(&mu_);
    auto it = calls_.find(id);
    if (it == calls_.end()) return;
    call = it->second;
    calls_.erase(it);
  }
  grpc_call_unref(call);
}

size_t OpenStreams::EndAll() {
  std::vector<grpc_call*> calls;
  {
    MutexLock lock(&mu_);
    ended_ = true;
    calls.reserve(calls_.size());
    for (const auto& [id, call] : calls_) {
      grpc_call_ref(call);  // cancelled outside the lock: gRPC may finish the call inline
      calls.push_back(call);
    }
  }
  for (grpc_call* call : calls) {
    EndCall(call);
    grpc_call_unref(call);
  }
  return calls.size();
}

size_t OpenStreams::open() const {
  MutexLock lock(&mu_);
  return calls_.size();
}

ApiServer::ApiServer(Daemon* daemon, size_t history, security::AuditLog* audit)
    : history_(std::make_unique<EventHistory>(&daemon->pipeline(), history)),
      service_(std::make_unique<IntrospectionService>(daemon, history_.get(), audit)),
      health_(std::make_unique<api::HealthService>()) {}

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
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  // Not gRPC's default health service, a callback-API service (async_reactor.h says why): ours.
  builder.SetOption(std::make_unique<grpc::HealthCheckServiceServerBuilderOption>(nullptr));
  absl::Status listening = AddListeners(&builder, options);
  if (!listening.ok()) return listening;
  builder.RegisterService(service_.get());
  builder.RegisterService(health_.get());
  async_ = std::make_unique<api::AsyncServer>(&builder, api::kAsyncThreads);
  service_->ServeAsync(async_.get());
  health_->ServeAsync(async_.get());
  auto interceptors = ApiMetricsInterceptors();  // kvmid_api_calls_total
  interceptors.push_back(open_streams_.NewInterceptorFactory());
  builder.experimental().SetInterceptorCreators(std::move(interceptors));
  server_ = builder.BuildAndStart();
  const std::string where =
      (options.unix_socket.empty() ? "" : "unix:" + options.unix_socket + " ") + options.tcp;
  if (!server_) {
    async_.reset();
    return absl::UnavailableError("cannot serve the API on " + where);
  }
  async_->Start();
  if (!options.tcp.empty() && tcp_port_ == 0) {
    return absl::UnavailableError("cannot listen on " + options.tcp);
  }
  if (unix_listener_) unix_listener_->Start(server_.get());
  // grpc.health.v1 answers for the service by name too ("" alone is the server as a whole).
  health_->SetServing("", true);
  health_->SetServing(kvmi::v1::Introspection::service_full_name(), true);
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
  health_->Shutdown();  // NOT_SERVING for every name from now on
  // Health watchers read that NOT_SERVING, then their calls end as the other streams' do.
  health_->EndWatches(grpc::Status(grpc::StatusCode::UNAVAILABLE, kShuttingDownMessage));
  service_->Drain();  // refusals held by the tarpit are answered now
  // Streams would never end by themselves: they end now, told why. Unary calls get the grace.
  const size_t ended = open_streams_.EndAll();
  if (ended > 0) spdlog::info("API: {} open streams ended ({})", ended, kShuttingDownMessage);
  server_->Shutdown(std::chrono::system_clock::now() + api::kShutdownGrace);
  // The calls have ended; their reactors finish on the async threads, which stop then.
  async_->Stop();
  server_.reset();
  async_.reset();
}

}  // namespace kvmid
