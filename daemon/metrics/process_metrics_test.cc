#include "daemon/metrics/process_metrics.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <thread>

namespace kvmid {
namespace {

using ::testing::HasSubstr;

// proc(5): pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt
// utime stime cutime cstime priority nice num_threads itrealvalue starttime vsize rss ...
constexpr char kStat[] =
    "4242 (kvm id (x)) S 1 4242 4242 0 -1 4194560 900 0 0 0 250 150 0 0 20 0 7 0 12000 "
    "123456789 2048 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0";

TEST(ProcessMetricsTest, ParsesProcStat) {
  ProcessStats stats;
  ASSERT_TRUE(ParseProcStat(kStat, 100, 4096, 1700000000, &stats).ok());
  EXPECT_DOUBLE_EQ(stats.cpu_seconds, 4.0);  // (250 + 150) / 100
  EXPECT_EQ(stats.threads, 7u);
  EXPECT_DOUBLE_EQ(stats.start_time_seconds, 1700000120.0);  // btime + 12000 / 100
  EXPECT_EQ(stats.virtual_bytes, 123456789u);
  EXPECT_EQ(stats.resident_bytes, 2048u * 4096u);
}

TEST(ProcessMetricsTest, RefusesMalformedStat) {
  ProcessStats stats;
  EXPECT_FALSE(ParseProcStat("4242 kvmid S 1", 100, 4096, 0, &stats).ok());
  absl::Status short_stat = ParseProcStat("4242 (kvmid) S 1 2 3", 100, 4096, 0, &stats);
  EXPECT_EQ(short_stat.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(short_stat.message()), HasSubstr("fields"));
  std::string bad = kStat;
  bad.replace(bad.find(" 250 "), 5, " x50 ");
  absl::Status not_number = ParseProcStat(bad, 100, 4096, 0, &stats);
  EXPECT_THAT(std::string(not_number.message()), HasSubstr("field 14"));
  EXPECT_FALSE(ParseProcStat(kStat, 0, 4096, 0, &stats).ok());
}

TEST(ProcessMetricsTest, ParsesBootTime) {
  absl::StatusOr<uint64_t> btime = ParseBootTime("cpu  1 2 3\nintr 5\nbtime 1700000000\n");
  ASSERT_TRUE(btime.ok());
  EXPECT_EQ(*btime, 1700000000u);
  EXPECT_EQ(ParseBootTime("cpu 1\n").status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(ParseBootTime("btime soon\n").status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(ProcessMetricsTest, ReadsThisProcess) {
  absl::StatusOr<ProcessStats> before = ReadProcessStats();
  ASSERT_TRUE(before.ok()) << before.status();
  EXPECT_GT(before->resident_bytes, 0u);
  EXPECT_GE(before->threads, 1u);
  EXPECT_GT(before->max_fds, 0u);
  EXPECT_GT(before->start_time_seconds, 1.6e9);
  EXPECT_LE(before->start_time_seconds, static_cast<double>(::time(nullptr)) + 1);

  // Open descriptors and threads are counted as they are now.
  int fds[2];
  ASSERT_EQ(::pipe(fds), 0);
  absl::StatusOr<ProcessStats> after = ReadProcessStats();
  ASSERT_TRUE(after.ok());
  EXPECT_EQ(after->open_fds, before->open_fds + 2);
  ::close(fds[0]);
  ::close(fds[1]);
}

TEST(ProcessMetricsTest, CollectsTheStandardFamilies) {
  std::vector<prometheus::MetricFamily> families = ProcessCollector().Collect();
  std::vector<std::string> names;
  for (const auto& f : families) {
    names.push_back(f.name);
    EXPECT_FALSE(f.help.empty()) << f.name;
    ASSERT_EQ(f.metric.size(), 1u) << f.name;
  }
  EXPECT_THAT(names, ::testing::UnorderedElementsAre(
                         "process_cpu_seconds_total", "process_resident_memory_bytes",
                         "process_virtual_memory_bytes", "process_open_fds", "process_max_fds",
                         "process_threads", "process_start_time_seconds"));
}

}  // namespace
}  // namespace kvmid
