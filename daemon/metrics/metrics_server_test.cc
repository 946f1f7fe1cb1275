// The metrics endpoint against the real daemon core and simulated guests over real sockets:
// what /metrics, /healthz and /readyz answer over HTTP.
#include "daemon/metrics/metrics_server.h"

#include <arpa/inet.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <unistd.h>

#include <regex>
#include <string>

#include "daemon/kvmid.h"
#include "daemon/metrics/hooks.h"
#include "daemon/testing/wait.h"
#include "kernel/sim/fleet.h"

namespace kvmid {
namespace {

using ::testing::HasSubstr;
using ::testing::StartsWith;
using testing::WaitUntil;

struct HttpResponse {
  int status = 0;
  std::string body;
};

// One HTTP/1.0 request to 127.0.0.1:`port`; status 0 if the connection failed.
HttpResponse Http(int port, const std::string& method, const std::string& path) {
  HttpResponse response;
  int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  timeval timeout{5, 0};
  ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof(timeout));
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(port));
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
    ::close(fd);
    return response;
  }
  std::string request = method + " " + path + " HTTP/1.0\r\nHost: localhost\r\n\r\n";
  ::send(fd, request.data(), request.size(), MSG_NOSIGNAL);
  std::string raw;
  char buffer[65536];
  ssize_t n;
  while ((n = ::recv(fd, buffer, sizeof(buffer), 0)) > 0) raw.append(buffer, n);
  ::close(fd);
  if (raw.rfind("HTTP/1.", 0) != 0 || raw.size() < 12) return response;
  response.status = std::stoi(raw.substr(9, 3));
  size_t body = raw.find("\r\n\r\n");
  if (body != std::string::npos) response.body = raw.substr(body + 4);
  return response;
}

// The value of the sample `series` (name and labels exactly as exposed), or -1.
double Sample(const std::string& text, const std::string& series) {
  size_t at = 0;
  while ((at = text.find(series + " ", at)) != std::string::npos) {
    if (at == 0 || text[at - 1] == '\n') {
      return std::stod(text.substr(at + series.size() + 1));
    }
    at += series.size();
  }
  return -1;
}

int FreePort() {
  int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof(addr);
  const bool bound = ::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0 &&
                     ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) == 0;
  ::close(fd);
  return bound ? ntohs(addr.sin_port) : 0;
}

class MetricsServerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char dir_template[] = "/tmp/kvmid-metrics-XXXXXX";
    dir_ = mkdtemp(dir_template);
    config_.unix_socket = dir_ + "/kvmi.sock";
    daemon_ = std::make_unique<Daemon>(config_);
  }
  void TearDown() override {
    if (fleet_) fleet_->Stop();
    metrics_.reset();
    daemon_.reset();
    ::rmdir(dir_.c_str());
  }

  void StartMetricsOn(const std::string& address) {
    MetricsOptions options;
    options.address = address;
    absl::StatusOr<std::unique_ptr<MetricsServer>> started = StartMetrics(daemon_.get(), options);
    ASSERT_TRUE(started.ok()) << started.status();
    metrics_ = std::move(*started);
  }

  std::string dir_;
  DaemonConfig config_;
  std::unique_ptr<Daemon> daemon_;
  std::unique_ptr<MetricsServer> metrics_;
  std::unique_ptr<kvmi::sim::Fleet> fleet_;
};

TEST(MetricsAddressTest, RefusesWhatIsNotHostPort) {
  EXPECT_TRUE(ValidateMetricsAddress("127.0.0.1:9464").ok());
  EXPECT_TRUE(ValidateMetricsAddress("[::1]:0").ok());
  for (const char* bad : {"127.0.0.1", ":9464", "127.0.0.1:", "127.0.0.1:65536", "127.0.0.1:http",
                          "127.0.0.1:-1", "[::1:9464"}) {
    absl::Status s = ValidateMetricsAddress(bad);
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << bad;
    EXPECT_THAT(std::string(s.message()), HasSubstr("metrics_address")) << bad;
  }
}

TEST_F(MetricsServerTest, RefusesBadOptionsAndABusyPort) {
  MetricsOptions options;
  options.address = "localhost";
  EXPECT_EQ(StartMetrics(daemon_.get(), options).status().code(),
            absl::StatusCode::kInvalidArgument);
  options.address = "127.0.0.1:0";
  options.http_threads = 0;
  EXPECT_EQ(StartMetrics(daemon_.get(), options).status().code(),
            absl::StatusCode::kInvalidArgument);

  StartMetricsOn("127.0.0.1:0");
  options.address = "127.0.0.1:" + std::to_string(metrics_->port());
  options.http_threads = 2;
  absl::StatusOr<std::unique_ptr<MetricsServer>> second = StartMetrics(daemon_.get(), options);
  EXPECT_EQ(second.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(std::string(second.status().message()), HasSubstr(options.address));
  // The first one still serves.
  EXPECT_EQ(Http(metrics_->port(), "GET", "/healthz").status, 200);
}

TEST_F(MetricsServerTest, HealthAndReadiness) {
  const int port = FreePort();
  ASSERT_NE(port, 0) << "no free loopback port";
  StartMetricsOn("127.0.0.1:" + std::to_string(port));
  EXPECT_EQ(metrics_->port(), port);
  EXPECT_EQ(metrics_->url(), "http://127.0.0.1:" + std::to_string(port));

  HttpResponse healthz = Http(port, "GET", "/healthz");
  EXPECT_EQ(healthz.status, 200);
  EXPECT_EQ(healthz.body, "ok\n");
  HttpResponse readyz = Http(port, "GET", "/readyz");
  EXPECT_EQ(readyz.status, 503);
  EXPECT_THAT(readyz.body, StartsWith("not ready"));

  metrics_->SetReady(true);
  EXPECT_EQ(Http(port, "GET", "/readyz").status, 200);
  EXPECT_EQ(Http(port, "HEAD", "/readyz").status, 200);
  EXPECT_EQ(Http(port, "POST", "/readyz").status, 405);
  metrics_->SetReady(false);  // shutting down
  EXPECT_EQ(Http(port, "GET", "/readyz").status, 503);
  EXPECT_EQ(Http(port, "GET", "/healthz").status, 200);

  // Other paths are the exposer's: /metrics serves, the rest is not found.
  EXPECT_EQ(Http(port, "GET", "/metrics").status, 200);
  EXPECT_EQ(Http(port, "GET", "/nothing").status, 404);

  metrics_.reset();
  EXPECT_EQ(Http(port, "GET", "/healthz").status, 0);  // nobody listens any more
}

TEST_F(MetricsServerTest, ExportsTheDaemonsEventsGuestsAndProcess) {
  StartMetricsOn("127.0.0.1:0");
  // Enforce on CR3 writes (CONTINUE) and on CR0.WP being cleared (the old value kept).
  auto cr3 = std::make_shared<Rule>();
  cr3->name = "allow-cr3";
  cr3->match.events = {KVMI_EVENT_CR};
  cr3->match.cr = 3;
  cr3->action = RuleAction::kContinue;
  cr3->arms.vcpu_events = {KVMI_EVENT_CR};
  cr3->arms.crs = {3};
  ASSERT_TRUE(daemon_->ApplyPolicy(cr3).ok());
  ASSERT_TRUE(daemon_->ApplyPolicy(ForbidClearCr0WpRule("cr0-wp", RuleMode::kEnforce)).ok());
  const uint64_t handshakes_before =
      Metrics::Read().handshakes[static_cast<size_t>(HandshakeResult::kCompleted)];
  ASSERT_TRUE(daemon_->Start().ok());

  kvmi::sim::FleetConfig fleet;
  fleet.vms = 3;
  fleet.guest.vcpus = 1;
  fleet.connector.endpoint.family = kvmi::Endpoint::Family::kUnix;
  fleet.connector.endpoint.path = config_.unix_socket;
  fleet.connector.reconnect_seconds = 0.2;
  kvmi::sim::Scenario scenario;
  scenario.name = "cr";
  scenario.weights[static_cast<size_t>(kvmi::sim::OpKind::kWriteCr3)] = 1;
  scenario.weights[static_cast<size_t>(kvmi::sim::OpKind::kWriteCr0)] = 1;
  scenario.ops_per_second = 500;
  fleet.workload = scenario;
  fleet_ = std::make_unique<kvmi::sim::Fleet>(fleet);
  fleet_->Start();

  const std::string cr3_series =
      "kvmid_events_total{action=\"continue\",decided_by=\"policy\",type=\"cr\"}";
  const std::string keep_old_series =
      "kvmid_events_total{action=\"keep_old\",decided_by=\"policy\",type=\"cr\"}";
  std::string text;
  ASSERT_TRUE(WaitUntil(
      [&] {
        text = Http(metrics_->port(), "GET", "/metrics").body;
        return Sample(text, cr3_series) >= 20 && Sample(text, keep_old_series) >= 1 &&
               Sample(text, "kvmid_guests{state=\"hooked\"}") == 3;
      },
      std::chrono::seconds(20)))
      << text;
  const double first = Sample(text, cr3_series);
  ASSERT_TRUE(WaitUntil([&] {
    text = Http(metrics_->port(), "GET", "/metrics").body;
    return Sample(text, cr3_series) > first;
  })) << "the counter does not rise";

  // Every event a policy answered is in the policy latency histogram; they are fast.
  const double policy_count =
      Sample(text, "kvmid_verdict_latency_seconds_count{decided_by=\"policy\"}");
  EXPECT_GE(policy_count, Sample(text, cr3_series));
  EXPECT_EQ(Sample(text, "kvmid_verdict_latency_seconds_bucket{decided_by=\"policy\",le=\"+Inf\"}"),
            policy_count);
  EXPECT_GT(Sample(text, "kvmid_verdict_latency_seconds_bucket{decided_by=\"policy\",le=\"1\"}"),
            0);
  EXPECT_THAT(text, HasSubstr("# TYPE kvmid_verdict_latency_seconds histogram"));
  EXPECT_THAT(text, HasSubstr("# TYPE kvmid_events_total counter"));

  // Scrape-time series.
  EXPECT_EQ(Sample(text, "kvmid_guests{state=\"gone\"}"), 0);
  EXPECT_GE(Sample(text, "kvmid_arming_in_flight"), 0);
  EXPECT_EQ(Sample(text, "kvmid_arming_errors"), 0);
  EXPECT_EQ(Sample(text, "kvmid_fallbacks_total{reason=\"deadline\"}"), 0);
  EXPECT_GE(Sample(text, "kvmid_handshakes_total{result=\"completed\"}"), handshakes_before + 3);
  EXPECT_GE(Sample(text, "kvmid_stream_events_dropped_total"), 0);
  EXPECT_THAT(text, HasSubstr("# TYPE kvmid_api_calls_total counter"));
  EXPECT_THAT(text, HasSubstr("# TYPE kvmid_api_authz_denied_total counter"));
  EXPECT_THAT(text, HasSubstr("# TYPE kvmid_limit_refusals_total counter"));
  EXPECT_GT(Sample(text, "process_cpu_seconds_total"), 0);
  EXPECT_GT(Sample(text, "process_resident_memory_bytes"), 1 << 20);
  EXPECT_GT(Sample(text, "process_open_fds"), 3);
  EXPECT_GT(Sample(text, "process_threads"), 2);
  EXPECT_GT(Sample(text, "process_start_time_seconds"), 1.6e9);

  // The guests go away: the state gauge follows at the next scrape.
  fleet_->Stop();
  fleet_.reset();
  ASSERT_TRUE(WaitUntil([&] {
    text = Http(metrics_->port(), "GET", "/metrics").body;
    return Sample(text, "kvmid_guests{state=\"gone\"}") == 3 &&
           Sample(text, "kvmid_guests{state=\"hooked\"}") == 0;
  })) << text;
  daemon_->Shutdown(std::chrono::milliseconds(0));
}

}  // namespace
}  // namespace kvmid
