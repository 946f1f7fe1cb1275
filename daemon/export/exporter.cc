#include "daemon/export/exporter.h"

#include <absl/strings/match.h>
#include <absl/strings/str_cat.h>
#include <absl/strings/str_format.h>
#include <absl/strings/strip.h>
#include <absl/time/time.h>
#include <spdlog/spdlog.h>

#include "daemon/config/policy_convert.h"
#include "kernel/abi/protocol.h"

namespace kvmid {
namespace {

// Strings from guests (names) are hostile: quotes, control bytes and bytes >= 0x80 are escaped,
// so every line is valid JSON in ASCII (a byte >= 0x80 reads as U+0080..U+00FF).
void AppendJsonString(std::string* out, absl::string_view s) {
  out->push_back('"');
  for (unsigned char c : s) {
    if (c == '"' || c == '\\') {
      out->push_back('\\');
      out->push_back(static_cast<char>(c));
    } else if (c == '\n') {
      out->append("\\n");
    } else if (c < 0x20 || c >= 0x7f) {
      absl::StrAppendFormat(out, "\\u%04x", c);
    } else {
      out->push_back(static_cast<char>(c));
    }
  }
  out->push_back('"');
}

void Field(std::string* out, absl::string_view name, absl::string_view value) {
  absl::StrAppend(out, ",\"", name, "\":");
  AppendJsonString(out, value);
}

void Number(std::string* out, absl::string_view name, uint64_t value) {
  absl::StrAppend(out, ",\"", name, "\":", value);
}

// 64-bit addresses and register values as "0x..." strings: JSON numbers above 2^53 lose bits in
// most log pipelines.
void Hex(std::string* out, absl::string_view name, uint64_t value) {
  absl::StrAppendFormat(out, ",\"%s\":\"0x%x\"", name, value);
}

std::string Head(absl::string_view type, std::chrono::system_clock::time_point time,
                 const std::string& node) {
  std::string out = absl::StrCat("{\"type\":\"", type, "\"");
  Field(&out, "time", Rfc3339(time));
  Field(&out, "node", node);
  return out;
}

absl::string_view WithoutPrefix(absl::string_view name, absl::string_view prefix) {
  absl::ConsumePrefix(&name, prefix);
  return name;
}

void Identity(std::string* out, const Guest& guest) {
  GuestIdentity identity = guest.identity();
  Field(out, "vm_uuid", kvmi::UuidToString(identity.uuid));
  Field(out, "vm_name", identity.name);
}

}  // namespace

std::string Rfc3339(std::chrono::system_clock::time_point time) {
  return absl::FormatTime("%Y-%m-%dT%H:%M:%E9SZ", absl::FromChrono(time), absl::UTCTimeZone());
}

std::string EventRecord(const ObservedEvent& o, const std::string& node) {
  const kvmi::Event& e = o.event;
  std::string out = Head("event", o.time, node);
  Number(&out, "id", o.event_id);
  if (o.guest) Identity(&out, *o.guest);
  Number(&out, "vcpu", e.vcpu());
  Field(&out, "event", WithoutPrefix(kvmi::EventName(e.id()), "KVMI_EVENT_"));
  Hex(&out, "rip", e.common.arch.regs.rip);
  switch (e.id()) {
    case KVMI_EVENT_CR:
      Number(&out, "cr", e.specific.cr.cr);
      Hex(&out, "old_value", e.specific.cr.old_value);
      Hex(&out, "new_value", e.specific.cr.new_value);
      break;
    case KVMI_EVENT_MSR:
      Hex(&out, "msr", e.specific.msr.msr);
      Hex(&out, "old_value", e.specific.msr.old_value);
      Hex(&out, "new_value", e.specific.msr.new_value);
      break;
    case KVMI_EVENT_PF: {
      Hex(&out, "gpa", e.specific.pf.gpa);
      Hex(&out, "gva", e.specific.pf.gva);
      Field(&out, "access", AccessLetters(e.specific.pf.access));
      break;
    }
    case KVMI_EVENT_BREAKPOINT:
      Hex(&out, "gpa", e.specific.breakpoint.gpa);
      break;
    case KVMI_EVENT_TRAP:
      Number(&out, "vector", e.specific.trap.vector);
      Number(&out, "error_code", e.specific.trap.error_code);
      Hex(&out, "cr2", e.specific.trap.cr2);
      break;
    case KVMI_EVENT_DESCRIPTOR:
      Number(&out, "descriptor", e.specific.descriptor.descriptor);
      absl::StrAppend(&out, ",\"write\":", e.specific.descriptor.write != 0 ? "true" : "false");
      break;
    default:
      break;
  }
  const kvmi::EventInfo* info = kvmi::FindEvent(e.id());
  if (info != nullptr && info->has_reply) {
    Field(&out, "action",
          o.verdict.keep_old
              ? absl::string_view("KEEP_OLD")
              : WithoutPrefix(kvmi::ActionName(o.verdict.action), "KVMI_EVENT_ACTION_"));
  }
  Field(&out, "decided_by", o.verdict.decided_by);
  if (!o.monitor_hits.empty()) {
    out.append(",\"monitor_hits\":[");
    for (size_t i = 0; i < o.monitor_hits.size(); ++i) {
      if (i > 0) out.push_back(',');
      AppendJsonString(&out, o.monitor_hits[i]);
    }
    out.push_back(']');
  }
  Number(&out, "latency_ns", static_cast<uint64_t>(o.latency.count()));
  out.append("}\n");
  return out;
}

std::string GuestRecord(const GuestChange& change, const std::string& node) {
  std::string out = Head("guest", change.time, node);
  if (change.guest) {
    Identity(&out, *change.guest);
    Field(&out, "key", change.guest->key());
    Number(&out, "vcpus", change.guest->vcpu_count());
  }
  Field(&out, "state", GuestStateName(change.state));
  out.append("}\n");
  return out;
}

std::string DropsRecord(uint64_t dropped, uint64_t dropped_total,
                        std::chrono::system_clock::time_point time, const std::string& node) {
  std::string out = Head("drops", time, node);
  Number(&out, "dropped", dropped);
  Number(&out, "dropped_total", dropped_total);
  out.append("}\n");
  return out;
}

// ---- Exporter ---------------------------------------------------------------------------------

Exporter::Exporter(std::unique_ptr<RecordSink> sink, Options options)
    : sink_(std::move(sink)), options_(std::move(options)) {}

Exporter::~Exporter() { Stop(); }

void Exporter::StartWriter() {
  MutexLock lock(&mu_);
  if (running_ || stopping_) return;
  running_ = true;
  writer_ = std::thread([this] { WriterLoop(); });
}

void Exporter::Attach(VerdictPipeline* pipeline, Registry* registry) {
  StartWriter();
  pipeline_ = pipeline;
  registry_ = registry;
  observer_id_ = pipeline_->AddObserver([this](const ObservedEvent& o) { Offer(o); });
  watcher_id_ = registry_->AddStateWatcher([this](const std::shared_ptr<Guest>& guest) {
    Offer(GuestChange{guest, guest->state(), std::chrono::system_clock::now()});
  });
}

void Exporter::Stop() {
  if (pipeline_ != nullptr) pipeline_->RemoveObserver(observer_id_);
  if (registry_ != nullptr) registry_->RemoveStateWatcher(watcher_id_);
  pipeline_ = nullptr;
  registry_ = nullptr;
  {
    MutexLock lock(&mu_);
    stopping_ = true;
    wake_.SignalAll();
  }
  if (writer_.joinable()) writer_.join();
}

bool Exporter::Offer(const ObservedEvent& event) { return Push(event); }

bool Exporter::Offer(GuestChange change) { return Push(std::move(change)); }

bool Exporter::Push(Item item) {
  MutexLock lock(&mu_);
  if (stopping_ || queue_.size() >= options_.queue_capacity) {
    ++unreported_drops_;
    dropped_.fetch_add(1, std::memory_order_relaxed);
    return false;
  }
  const bool was_empty = queue_.empty();
  queue_.push_back(std::move(item));
  if (was_empty) wake_.Signal();
  return true;
}

void Exporter::WriterLoop() {
  for (;;) {
    std::deque<Item> batch;
    uint64_t drops = 0;
    bool stopping = false;
    {
      MutexLock lock(&mu_);
      while (queue_.empty() && !stopping_) {
        if (!wake_.WaitFor(&mu_, options_.report_period)) break;  // time to report drops
      }
      batch.swap(queue_);
      // Drops are written ahead of the records that follow them, once records flow again.
      if (!batch.empty() || stopping_) drops = std::exchange(unreported_drops_, 0);
      stopping = stopping_;
    }
    WriteBatch(&batch, drops);
    MaybeReportDrops(stopping);
    if (stopping) {
      MutexLock lock(&mu_);
      if (queue_.empty()) return;
    }
  }
}

void Exporter::WriteBatch(std::deque<Item>* batch, uint64_t drops) {
  if (batch->empty() && drops == 0) return;
  uint64_t written = 0, failed = 0;
  auto append = [&](const std::string& record) {
    if (sink_->Append(record).ok()) {
      ++written;
    } else {
      ++failed;
    }
  };
  if (drops > 0)
    append(DropsRecord(drops, dropped(), std::chrono::system_clock::now(), options_.node));
  for (const Item& item : *batch) {
    if (const auto* event = std::get_if<ObservedEvent>(&item)) {
      append(EventRecord(*event, options_.node));
    } else {
      append(GuestRecord(std::get<GuestChange>(item), options_.node));
    }
  }
  absl::Status flushed = sink_->Flush();
  if (!flushed.ok()) {
    // Buffered records are lost with the failed write; count the whole batch as failed.
    failed += written;
    written = 0;
    spdlog::warn("export: {}", std::string(flushed.message()));
  }
  written_.fetch_add(written, std::memory_order_relaxed);
  write_errors_.fetch_add(failed, std::memory_order_relaxed);
}

void Exporter::MaybeReportDrops(bool force) {
  const uint64_t dropped_now = dropped(), errors_now = write_errors();
  if (dropped_now == reported_dropped_ && errors_now == reported_errors_) return;
  const auto now = std::chrono::steady_clock::now();
  if (!force && now - last_report_ < options_.report_period) return;
  spdlog::warn(
      "export: {} records dropped (queue of {} full: the writer or the disk is slow) and {} lost "
      "to write errors since the last report; {} dropped and {} lost in total",
      dropped_now - reported_dropped_, options_.queue_capacity, errors_now - reported_errors_,
      dropped_now, errors_now);
  reported_dropped_ = dropped_now;
  reported_errors_ = errors_now;
  last_report_ = now;
}

}  // namespace kvmid
