#include "daemon/metrics/api_interceptor.h"

#include <grpcpp/support/status.h>

#include <atomic>
#include <string>

#include "daemon/base/tsan.h"
#include "daemon/metrics/hooks.h"

namespace kvmid {
namespace {

using grpc::experimental::InterceptionHookPoints;

// One per call (gRPC creates it with the call and deletes it when the call is done).
class ApiMetricsInterceptor : public grpc::experimental::Interceptor {
 public:
  explicit ApiMetricsInterceptor(const char* method) : method_(method != nullptr ? method : "") {}

  ~ApiMetricsInterceptor() override {
    const TsanChecked ours;  // gRPC may run this inside a TsanIgnored scope (daemon/base/tsan.h)
    // A call that ended without a status being sent (the client went away first).
    if (!counted_) Metrics::ApiCall(method_, grpc::StatusCode::CANCELLED);
  }

  void Intercept(grpc::experimental::InterceptorBatchMethods* methods) override {
    if (methods->QueryInterceptionHookPoint(InterceptionHookPoints::PRE_SEND_STATUS)) {
      const grpc::StatusCode code = methods->GetSendStatus().error_code();
      const TsanChecked ours;  // not around gRPC's calls: its own code runs on in them
      if (!counted_) {
        counted_ = true;
        Metrics::ApiCall(method_, code);
      }
    }
    methods->Proceed();
  }

 private:
  const std::string method_;
  // Set by a hook (on the thread that starts the call's last operation), read by the destructor
  // (on the thread that deletes the call): gRPC orders them, TSan cannot see it
  // (daemon/base/tsan.h), and an atomic costs nothing here.
  std::atomic<bool> counted_{false};
};

class ApiMetricsInterceptorFactory : public grpc::experimental::ServerInterceptorFactoryInterface {
 public:
  grpc::experimental::Interceptor* CreateServerInterceptor(
      grpc::experimental::ServerRpcInfo* info) override {
    const TsanChecked ours;
    return new ApiMetricsInterceptor(info->method());
  }
};

}  // namespace

std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface>
NewApiMetricsInterceptorFactory() {
  return std::make_unique<ApiMetricsInterceptorFactory>();
}

std::vector<std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface>>
ApiMetricsInterceptors() {
  std::vector<std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface>> factories;
  factories.push_back(NewApiMetricsInterceptorFactory());
  return factories;
}

}  // namespace kvmid
