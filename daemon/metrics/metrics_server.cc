#include "daemon/metrics/metrics_server.h"

#include <CivetServer.h>
#include <absl/strings/numbers.h>
#include <absl/strings/str_cat.h>
#include <absl/strings/strip.h>
#include <civetweb.h>
#include <prometheus/counter.h>
#include <prometheus/exposer.h>
#include <prometheus/family.h>
#include <prometheus/histogram.h>
#include <prometheus/registry.h>
#include <spdlog/spdlog.h>

#include <array>
#include <cctype>
#include <cstring>
#include <exception>
#include <map>

#include "daemon/base/mutex.h"
#include "daemon/metrics/event_metrics.h"
#include "daemon/metrics/hooks.h"
#include "daemon/metrics/process_metrics.h"
#include "kernel/abi/protocol.h"

namespace kvmid {

// ---- read at scrape time -----------------------------------------------------------------------

namespace {

using prometheus::ClientMetric;
using prometheus::MetricFamily;
using prometheus::MetricType;

MetricFamily NewFamily(const char* name, const char* help, MetricType type) {
  MetricFamily family;
  family.name = name;
  family.help = help;
  family.type = type;
  return family;
}

void AddSample(MetricFamily* family, std::vector<ClientMetric::Label> labels, double value) {
  ClientMetric metric;
  metric.label = std::move(labels);
  if (family->type == MetricType::Counter) {
    metric.counter.value = value;
  } else {
    metric.gauge.value = value;
  }
  family->metric.push_back(std::move(metric));
}

const char* StatusCodeName(int code) {
  static constexpr std::array<const char*, Metrics::kStatusCodes> kNames = {"OK",
                                                                            "CANCELLED",
                                                                            "UNKNOWN",
                                                                            "INVALID_ARGUMENT",
                                                                            "DEADLINE_EXCEEDED",
                                                                            "NOT_FOUND",
                                                                            "ALREADY_EXISTS",
                                                                            "PERMISSION_DENIED",
                                                                            "RESOURCE_EXHAUSTED",
                                                                            "FAILED_PRECONDITION",
                                                                            "ABORTED",
                                                                            "OUT_OF_RANGE",
                                                                            "UNIMPLEMENTED",
                                                                            "INTERNAL",
                                                                            "UNAVAILABLE",
                                                                            "DATA_LOSS",
                                                                            "UNAUTHENTICATED"};
  return code >= 0 && code < static_cast<int>(kNames.size()) ? kNames[code] : "UNKNOWN";
}

// The daemon's state (registry, pipeline) and the process-wide hook counters.
class DaemonCollector : public prometheus::Collectable {
 public:
  explicit DaemonCollector(Daemon* daemon) : daemon_(daemon) {}

  std::vector<MetricFamily> Collect() const override {
    std::vector<MetricFamily> out;

    // Guests and arming, from the registry's snapshots.
    std::array<uint64_t, 4> by_state{};
    uint64_t in_flight = 0, arm_errors = 0;
    for (const auto& guest : daemon_->registry().List()) {
      GuestSnapshot s = guest->Snapshot();
      size_t state = static_cast<size_t>(s.state);
      if (state < by_state.size()) by_state[state]++;
      in_flight += s.arming_in_flight;
      arm_errors += s.arm_errors.size();
    }
    MetricFamily guests =
        NewFamily("kvmid_guests", "Guests known to kvmid, by lifecycle state.", MetricType::Gauge);
    for (GuestState state : {GuestState::kHandshaking, GuestState::kHooked, GuestState::kUnhooking,
                             GuestState::kGone}) {
      AddSample(&guests, {{"state", GuestStateName(state)}},
                static_cast<double>(by_state[static_cast<size_t>(state)]));
    }
    out.push_back(std::move(guests));
    MetricFamily arming =
        NewFamily("kvmid_arming_in_flight",
                  "Arming changes (lease changes and their commands) not yet answered by the host, "
                  "summed over guests.",
                  MetricType::Gauge);
    AddSample(&arming, {}, static_cast<double>(in_flight));
    out.push_back(std::move(arming));
    MetricFamily errors = NewFamily(
        "kvmid_arming_errors",
        "Recent arming failures retained per guest (at most 16 each), summed over guests.",
        MetricType::Gauge);
    AddSample(&errors, {}, static_cast<double>(arm_errors));
    out.push_back(std::move(errors));
    MetricFamily duplicates =
        NewFamily("kvmid_guest_duplicate_connections_total",
                  "Connections refused because another live connection holds the same guest.",
                  MetricType::Counter);
    AddSample(&duplicates, {}, static_cast<double>(daemon_->registry().duplicate_rejections()));
    out.push_back(std::move(duplicates));

    // Fallbacks, from the pipeline's own counters (also those whose reply found the guest gone).
    const VerdictPipeline::Stats& stats = daemon_->pipeline().stats();
    MetricFamily fallbacks =
        NewFamily("kvmid_fallbacks_total",
                  "Verdicts taken from the fallback action because the handler missed its deadline "
                  "(reason=deadline, including a pause held past its deadline) or went away "
                  "(reason=handler_gone).",
                  MetricType::Counter);
    AddSample(&fallbacks, {{"reason", "deadline"}},
              static_cast<double>(stats.fallback_deadline.load()));
    AddSample(&fallbacks, {{"reason", "handler_gone"}},
              static_cast<double>(stats.fallback_handler_gone.load()));
    out.push_back(std::move(fallbacks));

    // Process-wide hooks.
    Metrics::Counts counts = Metrics::Read();
    MetricFamily handshakes =
        NewFamily("kvmid_handshakes_total", "QEMU handshakes on the KVMI listeners, by result.",
                  MetricType::Counter);
    for (size_t i = 0; i < kHandshakeResults; ++i) {
      AddSample(&handshakes, {{"result", HandshakeResultName(static_cast<HandshakeResult>(i))}},
                static_cast<double>(counts.handshakes[i]));
    }
    out.push_back(std::move(handshakes));
    MetricFamily drops =
        NewFamily("kvmid_stream_events_dropped_total",
                  "Events StreamEvents clients lost because their bounded queue was full.",
                  MetricType::Counter);
    AddSample(&drops, {}, static_cast<double>(counts.stream_events_dropped));
    out.push_back(std::move(drops));
    MetricFamily calls = NewFamily("kvmid_api_calls_total",
                                   "Finished gRPC API calls, by service, method and status code.",
                                   MetricType::Counter);
    for (const Metrics::ApiCallCount& call : counts.api_calls) {
      absl::string_view service = call.method, method = call.method;
      size_t slash = call.method.find('/');
      if (slash != std::string::npos) {
        service = service.substr(0, slash);
        method = method.substr(slash + 1);
      }
      AddSample(&calls,
                {{"service", std::string(service)},
                 {"method", std::string(method)},
                 {"code", StatusCodeName(call.code)}},
                static_cast<double>(call.count));
    }
    out.push_back(std::move(calls));
    MetricFamily denied =
        NewFamily("kvmid_api_authz_denied_total", "API calls refused by authorization, by method.",
                  MetricType::Counter);
    for (const auto& [method, n] : counts.authz_denied) {
      AddSample(&denied, {{"method", method}}, static_cast<double>(n));
    }
    out.push_back(std::move(denied));
    MetricFamily refused =
        NewFamily("kvmid_limit_refusals_total", "Requests refused by a named limit, by limit.",
                  MetricType::Counter);
    for (const auto& [limit, n] : counts.limit_refused) {
      AddSample(&refused, {{"limit", limit}}, static_cast<double>(n));
    }
    out.push_back(std::move(refused));
    return out;
  }

 private:
  Daemon* const daemon_;
};

}  // namespace

// ---- /healthz and /readyz
// ------------------------------------------------------------------------

struct HealthState {
  std::atomic<bool> ready{false};
};

namespace {

// civetweb's begin_request callback has no user pointer of its own (the exposer's CivetServer
// takes the context's), so the health state is found by the port the request came in on.
class HealthTable {
 public:
  void Set(int port, std::shared_ptr<HealthState> state) {
    MutexLock lock(&mu_);
    by_port_[port] = std::move(state);
  }
  void Remove(int port, const HealthState* state) {
    MutexLock lock(&mu_);
    auto it = by_port_.find(port);
    if (it != by_port_.end() && it->second.get() == state) by_port_.erase(it);
  }
  std::shared_ptr<HealthState> Find(int port) {
    MutexLock lock(&mu_);
    auto it = by_port_.find(port);
    return it == by_port_.end() ? nullptr : it->second;
  }

 private:
  Mutex mu_;
  std::map<int, std::shared_ptr<HealthState>> by_port_ ABSL_GUARDED_BY(mu_);
};

HealthTable& Health() {
  static HealthTable* table = new HealthTable();  // HTTP threads may ask during exit
  return *table;
}

void Reply(mg_connection* conn, int code, const char* reason, const std::string& body, bool head) {
  mg_printf(conn,
            "HTTP/1.1 %d %s\r\nContent-Type: text/plain; charset=utf-8\r\n"
            "Cache-Control: no-store\r\nContent-Length: %zu\r\nConnection: close\r\n\r\n",
            code, reason, body.size());
  if (!head) mg_write(conn, body.data(), body.size());
}

// 0 = not ours (civetweb goes on to the exposer's handlers); else the status code sent.
int BeginRequest(mg_connection* conn) {
  const mg_request_info* info = mg_get_request_info(conn);
  if (info == nullptr || info->local_uri == nullptr) return 0;
  const bool healthz = std::strcmp(info->local_uri, "/healthz") == 0;
  const bool readyz = std::strcmp(info->local_uri, "/readyz") == 0;
  if (!healthz && !readyz) return 0;
  const bool head = std::strcmp(info->request_method, "HEAD") == 0;
  if (!head && std::strcmp(info->request_method, "GET") != 0) {
    Reply(conn, 405, "Method Not Allowed", "GET or HEAD only\n", false);
    return 405;
  }
  std::shared_ptr<HealthState> state = Health().Find(info->server_port);
  if (state == nullptr) {
    Reply(conn, 503, "Service Unavailable", "starting\n", head);
    return 503;
  }
  if (healthz) {
    Reply(conn, 200, "OK", "ok\n", head);
    return 200;
  }
  if (!state->ready.load()) {
    Reply(conn, 503, "Service Unavailable",
          "not ready: listeners not up or configuration not applied, or shutting down\n", head);
    return 503;
  }
  Reply(conn, 200, "OK", "ready\n", head);
  return 200;
}

}  // namespace

// ---- the server
// ----------------------------------------------------------------------------------

absl::Status ValidateMetricsAddress(const std::string& address) {
  size_t colon = address.rfind(':');
  if (colon == std::string::npos || colon == 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("metrics_address '", address, "' must be HOST:PORT (e.g. 127.0.0.1:9464)"));
  }
  std::string host = address.substr(0, colon);
  if (host.front() == '[' && host.back() != ']') {
    return absl::InvalidArgumentError(
        absl::StrCat("metrics_address '", address, "': an IPv6 host is written [ADDR]"));
  }
  uint32_t port = 0;
  std::string port_text = address.substr(colon + 1);
  if (port_text.empty() || port_text.size() > 5 ||
      port_text.find_first_not_of("0123456789") != std::string::npos ||
      !absl::SimpleAtoi(port_text, &port) || port > 65535) {
    return absl::InvalidArgumentError(
        absl::StrCat("metrics_address '", address, "': port '", port_text, "' is not in 0..65535"));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<MetricsServer>> StartMetrics(Daemon* daemon,
                                                            const MetricsOptions& options) {
  absl::Status valid = ValidateMetricsAddress(options.address);
  if (!valid.ok()) return valid;
  if (options.http_threads < 1 || options.http_threads > kMaxMetricsHttpThreads) {
    return absl::InvalidArgumentError(
        absl::StrCat("metrics http_threads must be 1..", kMaxMetricsHttpThreads));
  }
  std::unique_ptr<MetricsServer> server(new MetricsServer());
  server->daemon_ = daemon;
  server->registry_ = std::make_shared<prometheus::Registry>();
  server->events_ = std::make_shared<EventMetrics>(server->registry_);
  server->collectables_.push_back(std::make_shared<DaemonCollector>(daemon));
  server->collectables_.push_back(std::make_shared<ProcessCollector>());
  server->health_ = std::make_shared<HealthState>();

  static const CivetCallbacks callbacks = [] {
    CivetCallbacks c;  // zero-filled
    c.begin_request = &BeginRequest;
    return c;
  }();
  try {
    server->exposer_ = std::make_unique<prometheus::Exposer>(
        std::vector<std::string>{"listening_ports", options.address, "num_threads",
                                 std::to_string(options.http_threads)},
        &callbacks);
  } catch (const std::exception& e) {
    return absl::UnavailableError(
        absl::StrCat("cannot serve metrics on ", options.address, ": ", e.what()));
  }
  std::vector<int> ports = server->exposer_->GetListeningPorts();
  if (ports.empty() || ports[0] <= 0) {
    return absl::UnavailableError(
        absl::StrCat("cannot serve metrics on ", options.address, ": no port bound"));
  }
  server->port_ = ports[0];
  server->url_ = absl::StrCat("http://", options.address.substr(0, options.address.rfind(':')), ":",
                              server->port_);
  Health().Set(server->port_, server->health_);
  server->exposer_->RegisterCollectable(server->registry_);
  for (const auto& collectable : server->collectables_) {
    server->exposer_->RegisterCollectable(collectable);
  }
  // The observer holds the metrics it writes to, not the server: a notification already under
  // way when the server goes finds them alive.
  std::shared_ptr<EventMetrics> events = server->events_;
  server->observer_id_ =
      daemon->pipeline().AddObserver([events](const ObservedEvent& o) { events->Observe(o); });
  spdlog::info("metrics on {}/metrics (health: /healthz, /readyz)", server->url_);
  return server;
}

MetricsServer::~MetricsServer() {
  if (daemon_ != nullptr && observer_id_ != 0) daemon_->pipeline().RemoveObserver(observer_id_);
  exposer_.reset();  // joins the HTTP threads: no scrape reads the daemon after this
  if (health_ != nullptr) Health().Remove(port_, health_.get());
}

void MetricsServer::SetReady(bool ready) { health_->ready.store(ready); }

}  // namespace kvmid
