#include "daemon/event_log.h"

#include <spdlog/spdlog.h>

#include <cinttypes>
#include <cstdio>
#include <cstring>

#include "kernel/abi/protocol.h"

namespace kvmid {
namespace {

const char* AccessName(uint8_t access) {
  switch (access) {
    case KVMI_PAGE_ACCESS_R:
      return "read";
    case KVMI_PAGE_ACCESS_W:
      return "write";
    case KVMI_PAGE_ACCESS_X:
      return "exec";
    default:
      return "access";
  }
}

// "KVMI_EVENT_CR" -> "CR".
const char* ShortEventName(uint8_t id) {
  const char* name = kvmi::EventName(id);
  return std::strncmp(name, "KVMI_EVENT_", 11) == 0 ? name + 11 : name;
}

const char* ShortActionName(uint8_t action) {
  const char* name = kvmi::ActionName(action);
  return std::strncmp(name, "KVMI_EVENT_ACTION_", 18) == 0 ? name + 18 : name;
}

double Percentile(const std::array<std::atomic<uint64_t>, 32>& histogram, double q) {
  uint64_t total = 0;
  for (const auto& b : histogram) total += b.load();
  if (total == 0) return 0;
  uint64_t target = static_cast<uint64_t>(q * static_cast<double>(total - 1)) + 1, seen = 0;
  for (size_t i = 0; i < histogram.size(); ++i) {
    seen += histogram[i].load();
    if (seen >= target) return static_cast<double>(1ull << i);  // bucket upper bound, us
  }
  return 0;
}

}  // namespace

bool ParseEventLogMode(const std::string& text, EventLogMode* mode) {
  if (text == "none")
    *mode = EventLogMode::kNone;
  else if (text == "blocked")
    *mode = EventLogMode::kBlocked;
  else if (text == "all")
    *mode = EventLogMode::kAll;
  else
    return false;
  return true;
}

std::string DescribeEvent(const ObservedEvent& o) {
  char detail[160] = "";
  const kvmi::Event& e = o.event;
  switch (e.id()) {
    case KVMI_EVENT_CR:
      std::snprintf(detail, sizeof(detail), " cr%u 0x%" PRIx64 " -> 0x%" PRIx64, e.specific.cr.cr,
                    static_cast<uint64_t>(e.specific.cr.old_value),
                    static_cast<uint64_t>(e.specific.cr.new_value));
      break;
    case KVMI_EVENT_MSR:
      std::snprintf(detail, sizeof(detail), " msr 0x%x 0x%" PRIx64 " -> 0x%" PRIx64,
                    e.specific.msr.msr, static_cast<uint64_t>(e.specific.msr.old_value),
                    static_cast<uint64_t>(e.specific.msr.new_value));
      break;
    case KVMI_EVENT_PF:
      std::snprintf(detail, sizeof(detail), " %s gpa 0x%" PRIx64 " gva 0x%" PRIx64,
                    AccessName(e.specific.pf.access), static_cast<uint64_t>(e.specific.pf.gpa),
                    static_cast<uint64_t>(e.specific.pf.gva));
      break;
    case KVMI_EVENT_BREAKPOINT:
      std::snprintf(detail, sizeof(detail), " gpa 0x%" PRIx64,
                    static_cast<uint64_t>(e.specific.breakpoint.gpa));
      break;
    case KVMI_EVENT_DESCRIPTOR:
      std::snprintf(detail, sizeof(detail), " descriptor %u %s", e.specific.descriptor.descriptor,
                    e.specific.descriptor.write ? "write" : "read");
      break;
    case KVMI_EVENT_TRAP:
      std::snprintf(detail, sizeof(detail), " vector %u", e.specific.trap.vector);
      break;
    default:
      break;
  }
  GuestSnapshot g = o.guest->Snapshot();
  std::string line = "vm " + (g.identity.name.empty() ? g.key : g.identity.name) + " vCPU " +
                     std::to_string(e.vcpu()) + " " + ShortEventName(e.id()) + detail;
  char rip[40];
  std::snprintf(rip, sizeof(rip), " rip 0x%" PRIx64, static_cast<uint64_t>(e.common.arch.regs.rip));
  line += rip;
  if (kvmi::FindEvent(e.id())->has_reply) {
    line += std::string(" => ") + ShortActionName(o.verdict.action);
    if (o.verdict.keep_old) line += " (old value kept)";
    line += " by " + o.verdict.decided_by;
  }
  for (const std::string& rule : o.monitor_hits) line += " [monitor:" + rule + "]";
  line += " " + std::to_string(o.latency.count() / 1000) + "us";
  return line;
}

EventLog::EventLog(VerdictPipeline* pipeline, EventLogOptions options)
    : pipeline_(pipeline), options_(options) {
  observer_id_ = pipeline_->AddObserver([this](const ObservedEvent& o) { OnEvent(o); });
  stats_thread_ = std::thread([this] { StatsLoop(); });
}

EventLog::~EventLog() { Stop(); }

void EventLog::Stop() {
  {
    MutexLock lock(&mutex_);
    if (stopping_) return;
    stopping_ = true;
  }
  cv_.SignalAll();
  if (stats_thread_.joinable()) stats_thread_.join();
  pipeline_->RemoveObserver(observer_id_);
}

void EventLog::OnEvent(const ObservedEvent& o) {
  by_event_[o.event.id()]++;
  const std::string& by = o.verdict.decided_by;
  bool blocked_path = by.rfind("policy:", 0) == 0 || by.rfind("fallback:deadline", 0) == 0 ||
                      by.rfind("fallback:handler", 0) == 0 || !o.monitor_hits.empty();
  if (by.rfind("policy:", 0) == 0) {
    by_policy_++;
  } else if (by.rfind("handler:", 0) == 0) {
    by_handler_++;
  } else if (by.rfind("fallback:", 0) == 0) {
    by_fallback_++;
  } else if (by == "default") {
    by_default_++;
  } else {
    other_++;
  }
  uint64_t us = static_cast<uint64_t>(o.latency.count() / 1000);
  size_t bucket = 0;
  while (bucket + 1 < latency_us_.size() && (1ull << bucket) < us) ++bucket;
  latency_us_[bucket]++;

  if (options_.mode == EventLogMode::kNone) return;
  if (options_.mode == EventLogMode::kBlocked && !blocked_path) return;
  // Token window of one second: the log must never become the bottleneck of the event path.
  int64_t now_s =
      std::chrono::duration_cast<std::chrono::seconds>(Clock::now().time_since_epoch()).count();
  int64_t window = window_start_s_.load();
  if (now_s != window && window_start_s_.compare_exchange_strong(window, now_s)) {
    lines_in_window_ = 0;
  }
  if (lines_in_window_++ >= options_.max_lines_per_second) {
    suppressed_++;
    return;
  }
  spdlog::info("event {}", DescribeEvent(o));
}

void EventLog::StatsLoop() {
  MutexLock lock(&mutex_);
  uint64_t last_total = 0;
  auto next = Clock::now() + options_.stats_period;
  while (!stopping_) {
    if (cv_.WaitUntil(&mutex_, next) || stopping_) continue;  // woken early: check again
    next += options_.stats_period;
    const auto& s = pipeline_->stats();
    uint64_t total = s.events.load();
    if (total == last_total) continue;
    spdlog::info(
        "stats: {} events (+{}/s) | policy {} handler {} fallback {} default {} | latency p50 "
        "<={}us p99 <={}us | {} log lines suppressed",
        total, (total - last_total) / static_cast<uint64_t>(options_.stats_period.count()),
        s.by_policy.load(), s.by_handler.load(), s.fallbacks.load(), s.fallback_no_handler.load(),
        Percentile(latency_us_, 0.50), Percentile(latency_us_, 0.99), suppressed_.load());
    last_total = total;
  }
}

void EventLog::PrintSummary() const {
  std::string per_event;
  for (uint8_t id = 0; id < KVMI_NUM_EVENTS; ++id) {
    if (by_event_[id] == 0) continue;
    per_event += std::string(" ") + ShortEventName(id) + "=" + std::to_string(by_event_[id]);
  }
  spdlog::info(
      "summary: events{} | policy {} handler {} fallback {} default {} | p50 <={}us p99 <={}us",
      per_event.empty() ? " none" : per_event, by_policy_.load(), by_handler_.load(),
      by_fallback_.load(), by_default_.load(), Percentile(latency_us_, 0.5),
      Percentile(latency_us_, 0.99));
}

}  // namespace kvmid
