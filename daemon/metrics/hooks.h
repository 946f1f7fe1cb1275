// Process-wide counters that code outside daemon/metrics bumps: one line at the place where the
// thing happens, no plumbing, no Prometheus types. daemon/metrics exports them at scrape time
// (docs/METRICS.md); until then they only count. Every call is cheap (an atomic add, or a short
// lock for the labelled ones, which are rare events), and every label is bounded: past
// kMaxLabelValues distinct values per counter, new values are counted under "other".
//
//   Metrics::CountHandshake(HandshakeResult::kTimeout);   // daemon/transport/acceptor.cc
//   Metrics::StreamEventsDropped(n);                       // StreamEvents' bounded queue
//   Metrics::AuthzDenied("kvmi.v1.Introspection/SetRegisters");  // the authorization work
//   Metrics::LimitRefused("max_streams");                  // a named limit that refused a request
#ifndef KVMID_DAEMON_METRICS_HOOKS_H_
#define KVMID_DAEMON_METRICS_HOOKS_H_

#include <absl/strings/string_view.h>

#include <array>
#include <cstddef>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace kvmid {

// How one QEMU handshake on a KVMI listener ended.
enum class HandshakeResult : uint8_t {
  kCompleted,     // authenticated, hello exchanged: the guest was handed to the daemon
  kBusy,          // refused: too many handshakes in progress
  kUnauthorized,  // refused: peer uid / cid not allowed, or its credentials unreadable
  kTimeout,       // no complete hello within the handshake timeout
  kFailed,        // the peer closed, sent an invalid hello, or a read/write failed
};
inline constexpr size_t kHandshakeResults = 5;
// "completed", "busy", "unauthorized", "timeout", "failed" (the metric's label values).
const char* HandshakeResultName(HandshakeResult result);

class Metrics {
 public:
  // Past this many distinct values, a labelled counter counts new values under "other".
  static constexpr size_t kMaxLabelValues = 64;
  static constexpr const char* kOtherLabel = "other";
  static constexpr size_t kStatusCodes = 17;  // gRPC status codes 0..16

  static void CountHandshake(HandshakeResult result);
  // Events a StreamEvents client lost because its bounded queue was full.
  static void StreamEventsDropped(uint64_t events);
  // A call refused by authorization; `method` is "package.Service/Method".
  static void AuthzDenied(absl::string_view method);
  // A request refused by a named limit (the constant's name, e.g. "max_streams").
  static void LimitRefused(absl::string_view limit);
  // One finished API call: `method` as gRPC names it ("/package.Service/Method"), its status code
  // (grpc::StatusCode as an int, 0..16).
  static void ApiCall(absl::string_view method, int code);

  // Read side (the exporter, tests). Values only grow.
  struct ApiCallCount {
    std::string method;  // "package.Service/Method" (no leading slash), or "other"
    int code = 0;
    uint64_t count = 0;
  };
  struct Counts {
    std::array<uint64_t, kHandshakeResults> handshakes{};
    uint64_t stream_events_dropped = 0;
    std::vector<std::pair<std::string, uint64_t>> authz_denied;   // by method
    std::vector<std::pair<std::string, uint64_t>> limit_refused;  // by limit
    std::vector<ApiCallCount> api_calls;
  };
  static Counts Read();
};

}  // namespace kvmid

#endif  // KVMID_DAEMON_METRICS_HOOKS_H_
