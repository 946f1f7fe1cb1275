// kvmid's Prometheus endpoint: one HTTP server (prometheus-cpp's exposer, civetweb inside) on
// --metrics_address serving
//   /metrics  the kvmid_* and process_* series (docs/METRICS.md lists them with their labels);
//   /healthz  200 while the process serves HTTP (liveness);
//   /readyz   200 once SetReady(true) (listeners up, configuration applied), 503 before/after.
// Where the numbers come from, without touching the event path's code:
//   - events, verdict latencies: an observer of the verdict pipeline whose counters and
//     histograms are resolved once per label combination (an array index per event, no map
//     lookup, no string built);
//   - guests by state, arming in flight and errors, fallbacks: read from the registry's
//     snapshots and the pipeline's counters at scrape time;
//   - handshakes, stream drops, API calls, authorization denials, limit refusals: the
//     process-wide counters of daemon/metrics/hooks.h;
//   - process_*: /proc/self at scrape time.
//
//   absl::StatusOr<std::unique_ptr<MetricsServer>> metrics = StartMetrics(&daemon, options);
//   ... daemon.Start(); api.Start(...); (*metrics)->SetReady(true);
#ifndef KVMID_DAEMON_METRICS_METRICS_SERVER_H_
#define KVMID_DAEMON_METRICS_METRICS_SERVER_H_

#include <absl/status/statusor.h>

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "daemon/kvmid.h"

namespace prometheus {
class Collectable;
class Exposer;
class Registry;
}  // namespace prometheus

namespace kvmid {

struct MetricsOptions {
  // HOST:PORT (IPv6 as [ADDR]:PORT); port 0 = any free port (see MetricsServer::port()).
  std::string address = "127.0.0.1:9464";
  int http_threads = 2;
};
// Limits of MetricsOptions.
inline constexpr int kMaxMetricsHttpThreads = 16;

// Checks `address` (HOST:PORT, port 0..65535): OK or INVALID_ARGUMENT naming what is wrong.
absl::Status ValidateMetricsAddress(const std::string& address);

class EventMetrics;  // event_metrics.h
struct HealthState;

class MetricsServer {
 public:
  ~MetricsServer();  // stops serving and stops observing the daemon
  MetricsServer(const MetricsServer&) = delete;
  MetricsServer& operator=(const MetricsServer&) = delete;

  int port() const { return port_; }
  // "http://HOST:PORT" (the port actually bound).
  const std::string& url() const { return url_; }
  // /readyz: 200 when true. kvmid sets it once its listeners are up and its configuration is
  // applied, and clears it when it starts shutting down.
  void SetReady(bool ready);

 private:
  friend absl::StatusOr<std::unique_ptr<MetricsServer>> StartMetrics(Daemon*,
                                                                     const MetricsOptions&);
  MetricsServer() = default;

  Daemon* daemon_ = nullptr;
  std::shared_ptr<prometheus::Registry> registry_;
  std::shared_ptr<EventMetrics> events_;
  uint64_t observer_id_ = 0;
  std::vector<std::shared_ptr<prometheus::Collectable>> collectables_;  // read at scrape time
  std::shared_ptr<HealthState> health_;
  std::unique_ptr<prometheus::Exposer> exposer_;
  int port_ = 0;
  std::string url_;
};

// Starts serving metrics for `daemon` (which must outlive the server). Call it before
// daemon->Start() so that the first events are counted. Errors: INVALID_ARGUMENT (address,
// options), UNAVAILABLE (cannot bind).
absl::StatusOr<std::unique_ptr<MetricsServer>> StartMetrics(Daemon* daemon,
                                                            const MetricsOptions& options);

}  // namespace kvmid

#endif  // KVMID_DAEMON_METRICS_METRICS_SERVER_H_
