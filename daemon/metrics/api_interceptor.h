// A gRPC server interceptor that counts every finished API call by method and status code
// (Metrics::ApiCall, exported as kvmid_api_calls_total). Installed on the API server's builder;
// the RPC handlers know nothing of it.
//
//   builder.experimental().SetInterceptorCreators(ApiMetricsInterceptors());
#ifndef KVMID_DAEMON_METRICS_API_INTERCEPTOR_H_
#define KVMID_DAEMON_METRICS_API_INTERCEPTOR_H_

#include <grpcpp/support/server_interceptor.h>

#include <memory>
#include <vector>

namespace kvmid {

std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface>
NewApiMetricsInterceptorFactory();

// The factories to give ServerBuilder::experimental().SetInterceptorCreators (just the one).
std::vector<std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface>>
ApiMetricsInterceptors();

}  // namespace kvmid

#endif  // KVMID_DAEMON_METRICS_API_INTERCEPTOR_H_
