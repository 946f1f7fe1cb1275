#include "daemon/config/config.h"

#include <google/protobuf/io/tokenizer.h>
#include <google/protobuf/text_format.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <set>
#include <sstream>

#include "daemon/config/policy_convert.h"

namespace kvmid {
namespace {

class ErrorCollector : public google::protobuf::io::ErrorCollector {
 public:
  explicit ErrorCollector(std::string origin) : origin_(std::move(origin)) {}
  void AddError(int line, google::protobuf::io::ColumnNumber column,
                const std::string& message) override {
    if (first_.empty()) {
      first_ = origin_ + ":" + std::to_string(line + 1) + ":" + std::to_string(column + 1) + ": " +
               message;
    }
  }
  const std::string& first() const { return first_; }

 private:
  std::string origin_;
  std::string first_;
};

absl::Status FallbackAction(kvmi::v1::Action action, const std::string& field, uint8_t* out) {
  switch (action) {
    case kvmi::v1::ACTION_UNSPECIFIED:
    case kvmi::v1::ACTION_CONTINUE:
      *out = KVMI_EVENT_ACTION_CONTINUE;
      return absl::OkStatus();
    case kvmi::v1::ACTION_CRASH:
      *out = KVMI_EVENT_ACTION_CRASH;
      return absl::OkStatus();
    default:
      // RETRY as a blind fallback would re-run a faulting access forever; KEEP_OLD is not an
      // action of every event.
      return absl::InvalidArgumentError(field +
                                        ": a fallback must be ACTION_CONTINUE or ACTION_CRASH");
  }
}

}  // namespace

absl::StatusOr<LoadedConfig> ParseConfig(const std::string& text, const std::string& origin) {
  config::KvmidConfig file;
  google::protobuf::TextFormat::Parser parser;
  ErrorCollector errors(origin);
  parser.RecordErrorsTo(&errors);
  if (!parser.ParseFromString(text, &file)) {
    return absl::InvalidArgumentError(errors.first().empty() ? origin + ": cannot parse"
                                                             : errors.first());
  }
  auto invalid = [&origin](const std::string& what) {
    return absl::InvalidArgumentError(origin + ": " + what);
  };
  LoadedConfig out;
  absl::StatusOr<security::SecurityConfig> security = security::SecurityFromConfig(file);
  if (!security.ok()) return invalid(std::string(security.status().message()));
  out.security = *std::move(security);
  DaemonConfig& d = out.daemon;
  if (file.has_listen()) {
    const auto& l = file.listen();
    if (!l.unix_socket().empty()) d.unix_socket = l.unix_socket();
    if (l.socket_mode() != 0) {
      if (l.socket_mode() > kMaxSocketMode) {
        return invalid("listen.socket_mode: not a permission mode (at most " +
                       OctalMode(kMaxSocketMode) + ")");
      }
      d.unix_socket_mode = l.socket_mode();
    }
    d.unix_socket_group = l.socket_group();
    if (l.has_vsock_port()) d.vsock_port = l.vsock_port();
    d.allowed_uids.assign(l.allowed_uids().begin(), l.allowed_uids().end());
    d.allowed_cids.assign(l.allowed_cids().begin(), l.allowed_cids().end());
    if (!l.api_socket().empty()) out.api_socket = l.api_socket();
    out.api_tcp = l.api_tcp();
    if (l.api_socket_mode() != 0) {
      if (l.api_socket_mode() > kMaxSocketMode) {
        return invalid("listen.api_socket_mode: not a permission mode (at most " +
                       OctalMode(kMaxSocketMode) + ")");
      }
      out.api_socket_mode = l.api_socket_mode();
    }
    out.api_socket_group = l.api_socket_group();
    out.api_tcp_insecure_plaintext = l.api_tcp_insecure_plaintext();
  }
  if (file.has_api_tls()) {
    out.api_tls_cert = file.api_tls().cert();
    out.api_tls_key = file.api_tls().key();
    out.api_tls_client_ca = file.api_tls().client_ca();
    if (file.api_tls().refresh_seconds() != 0) {
      out.api_tls_refresh_seconds = file.api_tls().refresh_seconds();
    }
  }
  if (file.has_metrics_address()) out.metrics_address = file.metrics_address();
  if (!file.cookie_file().empty()) d.cookie_file = file.cookie_file();
  if (file.io_threads() != 0) {
    if (file.io_threads() > static_cast<uint32_t>(kMaxIoThreads)) {
      return invalid("io_threads: at most " + std::to_string(kMaxIoThreads));
    }
    d.io_threads = static_cast<int>(file.io_threads());
  }
  if (file.has_io_nice()) {
    if (file.io_nice() < kMinNice || file.io_nice() > kMaxNice) {
      return invalid("io_nice: " + std::to_string(kMinNice) + " to " + std::to_string(kMaxNice));
    }
    d.io_nice = file.io_nice();
  }
  if (file.has_io_idle_yields()) {
    if (file.io_idle_yields() > static_cast<uint32_t>(kMaxIdleYields)) {
      return invalid("io_idle_yields: at most " + std::to_string(kMaxIdleYields));
    }
    d.io_idle_yields = static_cast<int>(file.io_idle_yields());
  }
  if (file.handshake_timeout_ms() != 0) {
    d.handshake_timeout = std::chrono::milliseconds(file.handshake_timeout_ms());
  }
  if (file.command_timeout_ms() != 0) {
    d.command_timeout = std::chrono::milliseconds(file.command_timeout_ms());
  }
  if (file.has_stream_heartbeat_ms()) {
    const std::chrono::milliseconds beat(file.stream_heartbeat_ms());
    if (beat.count() != 0 && (beat < kMinStreamHeartbeat || beat > kMaxStreamHeartbeat)) {
      return invalid("stream_heartbeat_ms: 0 (none) or " +
                     std::to_string(kMinStreamHeartbeat.count()) + " to " +
                     std::to_string(kMaxStreamHeartbeat.count()));
    }
    d.stream_heartbeat = beat;
  }
  if (file.has_verdicts()) {
    const auto& v = file.verdicts();
    uint8_t fallback;
    absl::Status status =
        FallbackAction(v.default_fallback(), "verdicts.default_fallback", &fallback);
    if (!status.ok()) return invalid(std::string(status.message()));
    for (EventDeadline& deadline : d.verdicts.deadlines) {
      if (v.default_deadline_ms() != 0) {
        deadline.deadline = std::chrono::milliseconds(v.default_deadline_ms());
      }
      deadline.fallback_action = fallback;
    }
    for (int i = 0; i < v.per_event_size(); ++i) {
      const auto& e = v.per_event(i);
      std::string field = "verdicts.per_event[" + std::to_string(i) + "]";
      uint8_t id;
      if (!FromEventType(e.event(), &id)) return invalid(field + ".event: required");
      if (e.deadline_ms() != 0) {
        d.verdicts.deadlines[id].deadline = std::chrono::milliseconds(e.deadline_ms());
      }
      if (e.fallback() != kvmi::v1::ACTION_UNSPECIFIED) {
        status = FallbackAction(e.fallback(), field + ".fallback",
                                &d.verdicts.deadlines[id].fallback_action);
        if (!status.ok()) return invalid(std::string(status.message()));
      }
    }
  }
  for (const auto& g : file.guest_labels()) {
    if (g.name().empty()) return invalid("guest_labels.name: required");
    out.guest_labels[g.name()].insert(g.labels().begin(), g.labels().end());
  }
  std::set<std::string> names;
  for (int i = 0; i < file.policies_size(); ++i) {
    std::string where = "policies[" + std::to_string(i) + "]";
    if (!file.policies(i).name().empty()) where += " (" + file.policies(i).name() + ")";
    absl::StatusOr<std::shared_ptr<Rule>> rule = PolicyToRule(file.policies(i));
    if (!rule.ok()) return invalid(where + ": " + std::string(rule.status().message()));
    if (!names.insert((*rule)->name).second) return invalid(where + ": name: used twice");
    out.rules.push_back(*std::move(rule));
  }
  return out;
}

absl::StatusOr<LoadedConfig> LoadConfigFile(const std::string& path) {
  std::ifstream in(path);
  if (!in) return absl::ErrnoToStatus(errno, "cannot read " + path);
  std::stringstream buffer;
  buffer << in.rdbuf();
  return ParseConfig(buffer.str(), path);
}

}  // namespace kvmid
