#include "daemon/export/exporter.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <vector>

#include "daemon/base/mutex.h"
#include "daemon/testing/wait.h"

namespace kvmid {
namespace {

using ::kvmid::testing::WaitUntil;
using ::testing::HasSubstr;
using ::testing::StartsWith;

// A sink the test controls: records what it gets; while closed, Append blocks (a stalled disk).
class GateSink : public RecordSink {
 public:
  absl::Status Append(absl::string_view record) override {
    MutexLock lock(&mu_);
    ++entered_;
    while (!open_) cv_.Wait(&mu_);
    records_.emplace_back(record);
    return absl::OkStatus();
  }
  absl::Status Flush() override { return absl::OkStatus(); }

  void Open() {
    MutexLock lock(&mu_);
    open_ = true;
    cv_.SignalAll();
  }
  int entered() {
    MutexLock lock(&mu_);
    return entered_;
  }
  std::vector<std::string> records() {
    MutexLock lock(&mu_);
    return records_;
  }

 private:
  Mutex mu_;
  CondVar cv_;
  bool open_ ABSL_GUARDED_BY(mu_) = false;
  int entered_ ABSL_GUARDED_BY(mu_) = 0;
  std::vector<std::string> records_ ABSL_GUARDED_BY(mu_);
};

std::shared_ptr<Guest> MakeGuest(const std::string& name) {
  GuestIdentity identity;
  identity.name = name;
  identity.uuid[0] = 0xab;
  return std::make_shared<Guest>("key-" + name, identity, nullptr);
}

GuestChange Change(int i) {
  return GuestChange{MakeGuest("vm-" + std::to_string(i)), GuestState::kHooked,
                     std::chrono::system_clock::time_point(std::chrono::seconds(i))};
}

TEST(ExporterTest, StalledWriterDropsCountsAndReportsWhenItRecovers) {
  auto sink = std::make_unique<GateSink>();
  GateSink* gate = sink.get();
  Exporter::Options options;
  options.queue_capacity = 4;
  options.node = "node-1";
  Exporter exporter(std::move(sink), options);
  exporter.StartWriter();
  ASSERT_TRUE(exporter.Offer(Change(0)));
  ASSERT_TRUE(WaitUntil([&] { return gate->entered() == 1; }));  // the writer is stuck in it
  int accepted = 0;
  for (int i = 1; i <= 10; ++i) accepted += exporter.Offer(Change(i)) ? 1 : 0;
  EXPECT_EQ(accepted, 4) << "the queue holds 4";
  EXPECT_EQ(exporter.dropped(), 6u);
  gate->Open();
  ASSERT_TRUE(WaitUntil([&] { return exporter.written() == 6; })) << exporter.written();
  std::vector<std::string> records = gate->records();
  ASSERT_EQ(records.size(), 6u);
  EXPECT_THAT(records[0], HasSubstr("\"vm_name\":\"vm-0\""));
  EXPECT_THAT(records[1], StartsWith("{\"type\":\"drops\""));
  EXPECT_THAT(records[1], HasSubstr("\"dropped\":6,\"dropped_total\":6"));
  EXPECT_THAT(records[1], HasSubstr("\"node\":\"node-1\""));
  for (int i = 2; i < 6; ++i) EXPECT_THAT(records[i], HasSubstr("vm-" + std::to_string(i - 1)));
  // Nothing more dropped: no further drops record.
  ASSERT_TRUE(exporter.Offer(Change(11)));
  ASSERT_TRUE(WaitUntil([&] { return exporter.written() == 7; }));
  EXPECT_THAT(gate->records().back(), HasSubstr("vm-11"));
}

TEST(ExporterTest, OfferNeverWaitsForTheWriter) {
  auto sink = std::make_unique<GateSink>();
  GateSink* gate = sink.get();
  Exporter::Options options;
  options.queue_capacity = 100;
  Exporter exporter(std::move(sink), options);
  exporter.StartWriter();
  ASSERT_TRUE(exporter.Offer(Change(0)));
  ASSERT_TRUE(WaitUntil([&] { return gate->entered() == 1; }));
  // The sink is stalled for good; offering returns at once either way (a hang fails by timeout).
  for (int i = 0; i < 10000; ++i) exporter.Offer(Change(i));
  EXPECT_EQ(exporter.dropped(), 10000u - 100u);
  gate->Open();
  exporter.Stop();  // drains
  EXPECT_EQ(exporter.written(), 1u + 1u + 100u);
}

TEST(ExporterTest, StopWritesWhatIsQueued) {
  auto sink = std::make_unique<GateSink>();
  GateSink* gate = sink.get();
  gate->Open();
  Exporter exporter(std::move(sink), Exporter::Options{});
  exporter.StartWriter();
  for (int i = 0; i < 500; ++i) ASSERT_TRUE(exporter.Offer(Change(i)));
  exporter.Stop();
  EXPECT_EQ(exporter.written(), 500u);
  EXPECT_EQ(gate->records().size(), 500u);
  EXPECT_FALSE(exporter.Offer(Change(1))) << "stopped: counted, not queued";
}

TEST(ExporterTest, AttachFollowsRegistryChangesAndDetaches) {
  PolicySet policies;
  VerdictPipeline pipeline(&policies, VerdictPipeline::Options{});
  Registry registry(&pipeline);
  auto sink = std::make_unique<GateSink>();
  GateSink* gate = sink.get();
  gate->Open();
  Exporter exporter(std::move(sink), Exporter::Options{});
  exporter.Attach(&pipeline, &registry);
  EXPECT_EQ(pipeline.observer_count(), 1u);
  registry.GuestStateChanged(MakeGuest("watched"));
  ASSERT_TRUE(WaitUntil([&] { return exporter.written() == 1; }));
  EXPECT_THAT(gate->records()[0], HasSubstr("\"type\":\"guest\""));
  EXPECT_THAT(gate->records()[0], HasSubstr("\"vm_name\":\"watched\""));
  EXPECT_THAT(gate->records()[0], HasSubstr("\"state\":\"handshaking\""));
  exporter.Stop();
  EXPECT_EQ(pipeline.observer_count(), 0u);
  registry.GuestStateChanged(MakeGuest("after"));
  EXPECT_EQ(exporter.written(), 1u);
  EXPECT_EQ(exporter.dropped(), 0u) << "no longer watching";
}

TEST(ExportRecordTest, EventRecordIsOneEscapedJsonLine) {
  ObservedEvent o;
  o.guest = MakeGuest("we\"ird\n\x01\xff");
  o.event.common.event = KVMI_EVENT_CR;
  o.event.common.vcpu = 1;
  o.event.common.arch.regs.rip = 0xffffffff81000034ull;
  o.event.specific.cr.cr = 0;
  o.event.specific.cr.old_value = 0x80050033;
  o.event.specific.cr.new_value = 0x80040033;
  o.verdict.keep_old = true;
  o.verdict.decided_by = "policy:cr0-wp";
  o.monitor_hits = {"watch"};
  o.event_id = 89;
  o.latency = std::chrono::nanoseconds(1234);
  o.time = std::chrono::system_clock::time_point(std::chrono::seconds(1764922310) +
                                                 std::chrono::nanoseconds(123456789));
  std::string line = EventRecord(o, "hv-1");
  EXPECT_EQ(line,
            "{\"type\":\"event\",\"time\":\"2025-12-05T08:11:50.123456789Z\",\"node\":\"hv-1\","
            "\"id\":89,\"vm_uuid\":\"ab000000-0000-0000-0000-000000000000\","
            "\"vm_name\":\"we\\\"ird\\n\\u0001\\u00ff\",\"vcpu\":1,\"event\":\"CR\","
            "\"rip\":\"0xffffffff81000034\",\"cr\":0,\"old_value\":\"0x80050033\","
            "\"new_value\":\"0x80040033\",\"action\":\"KEEP_OLD\",\"decided_by\":\"policy:cr0-wp\","
            "\"monitor_hits\":[\"watch\"],\"latency_ns\":1234}\n");
  EXPECT_EQ(line.find('\n'), line.size() - 1);
}

TEST(ExportRecordTest, Rfc3339) {
  EXPECT_EQ(Rfc3339(std::chrono::system_clock::time_point(std::chrono::milliseconds(1500))),
            "1970-01-01T00:00:01.500000000Z");
}

}  // namespace
}  // namespace kvmid
