// The client side of the bare gRPC bidirectional echo that the remote-verdict benchmarks compare
// against: one stream, a message about the size of an Event with registers, one message in
// flight (closed loop), after a warm-up.
#ifndef KVMID_TESTS_BENCH_ECHO_CLIENT_H_
#define KVMID_TESTS_BENCH_ECHO_CLIENT_H_

#include <grpcpp/grpcpp.h>

#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include "tests/bench/echo.grpc.pb.h"

namespace kvmid::bench {

// Round trips (microseconds) measured for `seconds` against the Echo service at `target`.
inline std::vector<double> EchoRoundTrips(
    const std::string& target, double seconds,
    std::shared_ptr<grpc::ChannelCredentials> credentials = grpc::InsecureChannelCredentials()) {
  using Clock = std::chrono::steady_clock;
  auto stub = Echo::NewStub(grpc::CreateChannel(target, credentials));
  grpc::ClientContext context;
  auto stream = stub->Chat(&context);
  EchoMessage m;
  m.set_payload(std::string(320, 'e'));
  for (int warm = 0; warm < 200; ++warm) {
    stream->Write(m);
    stream->Read(&m);
  }
  std::vector<double> rtts;
  auto end = Clock::now() + std::chrono::duration<double>(seconds);
  while (Clock::now() < end) {
    auto t0 = Clock::now();
    if (!stream->Write(m) || !stream->Read(&m)) break;
    rtts.push_back(std::chrono::duration<double, std::micro>(Clock::now() - t0).count());
  }
  stream->WritesDone();
  stream->Finish();
  return rtts;
}

}  // namespace kvmid::bench

#endif  // KVMID_TESTS_BENCH_ECHO_CLIENT_H_
