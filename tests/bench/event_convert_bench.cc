// StreamEvents' per-event conversion (ObservedEvent -> kvmi.v1.Event -> wire bytes), with and
// without a field mask: what a stream asking for a few fields saves kvmid per event it sends.
// The mask is compiled once (as a stream does at its start); each event only tests bits.
//
//   bazel run -c opt //tests/bench:event_convert_bench -- --events=2000000
#include <absl/flags/flag.h>
#include <absl/flags/parse.h>

#include <chrono>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "common/program.h"
#include "daemon/api/convert.h"
#include "daemon/kvmid.h"

ABSL_FLAG(int, events, 1000000, "events converted per row");
ABSL_FLAG(int, rounds, 3, "rows per mask (alternated; the best of each is printed)");

namespace kvmid {
namespace {

ObservedEvent MakeEvent() {
  GuestIdentity identity;
  identity.name = "sim-vm-0000";
  identity.uuid[15] = 1;
  auto guest = std::make_shared<Guest>("k", identity, nullptr);
  auto view = std::make_shared<GuestView>();
  view->uuid = identity.uuid;
  view->name = identity.name;
  view->labels = {{"tier", "prod"}, {"team", "sec"}};
  guest->set_cached_view(view);
  ObservedEvent o;
  o.guest = guest;
  o.event_id = 1;
  o.event.common.event = KVMI_EVENT_CR;
  o.event.common.vcpu = 1;
  o.event.common.arch.mode = 8;
  o.event.common.arch.regs.rip = 0xffffffff81000000;
  o.event.specific.cr.cr = 3;
  o.event.specific.cr.new_value = 0x1234000;
  o.verdict.decided_by = "policy:cr3-watch";
  o.latency = std::chrono::microseconds(12);
  o.time = std::chrono::system_clock::now();
  return o;
}

struct Row {
  const char* name;
  std::vector<std::string> paths;  // empty: no mask
  bool registers;
};

// ns per event (conversion + serialization) and bytes per event.
std::pair<double, size_t> Measure(const ObservedEvent& o, const EventFields& fields, bool registers,
                                  int n) {
  kvmi::v1::StreamEventsResponse message;
  std::string wire;
  size_t bytes = 0;
  const auto start = std::chrono::steady_clock::now();
  for (int i = 0; i < n; ++i) {
    message.Clear();
    *message.mutable_event() = ToProto(o, registers, fields);
    wire.clear();
    message.SerializeToString(&wire);
    bytes = wire.size();
  }
  const double ns =
      std::chrono::duration<double, std::nano>(std::chrono::steady_clock::now() - start).count();
  return {ns / n, bytes};
}

int Main() {
  const int n = absl::GetFlag(FLAGS_events);
  const ObservedEvent o = MakeEvent();
  const std::vector<Row> rows = {
      {"no mask", {}, false},
      {"no mask + registers", {}, true},
      {"mask: id,vm_name,type,detail", {"vm_name", "type", "detail"}, false},
      {"mask: id,type", {"type"}, false},
      {"mask: id,vm_name,type,detail + registers",
       {"vm_name", "type", "detail", "registers"},
       true},
  };
  std::vector<double> best(rows.size(), 1e18);
  std::vector<size_t> bytes(rows.size());
  for (int round = 0; round < absl::GetFlag(FLAGS_rounds); ++round) {
    for (size_t r = 0; r < rows.size(); ++r) {
      google::protobuf::FieldMask mask;
      for (const std::string& p : rows[r].paths) mask.add_paths(p);
      absl::StatusOr<EventFields> fields = CompileEventMask(mask, "field_mask");
      if (!fields.ok()) {
        std::fprintf(stderr, "%s\n", std::string(fields.status().message()).c_str());
        return 1;
      }
      auto [ns, size] = Measure(o, *fields, rows[r].registers, n);
      best[r] = std::min(best[r], ns);
      bytes[r] = size;
    }
  }
  std::printf("%-44s %12s %12s\n", "StreamEvents conversion", "ns/event", "bytes/event");
  for (size_t r = 0; r < rows.size(); ++r) {
    std::printf("%-44s %12.1f %12zu\n", rows[r].name, best[r], bytes[r]);
  }
  return 0;
}

}  // namespace
}  // namespace kvmid

int main(int argc, char** argv) {
  kvmid::UseReleaseAbslMutexes();  // as kvmid's main (common/program.h)
  absl::ParseCommandLine(argc, argv);
  return kvmid::Main();
}
