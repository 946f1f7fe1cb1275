#include "daemon/metrics/hooks.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <thread>
#include <vector>

namespace kvmid {
namespace {

using ::testing::Contains;
using ::testing::Pair;

uint64_t Find(const std::vector<std::pair<std::string, uint64_t>>& counts, const std::string& key) {
  for (const auto& [k, n] : counts) {
    if (k == key) return n;
  }
  return 0;
}

uint64_t ApiCalls(const std::string& method, int code) {
  for (const Metrics::ApiCallCount& c : Metrics::Read().api_calls) {
    if (c.method == method && c.code == code) return c.count;
  }
  return 0;
}

TEST(HooksTest, HandshakesByResult) {
  const Metrics::Counts before = Metrics::Read();
  Metrics::CountHandshake(HandshakeResult::kCompleted);
  Metrics::CountHandshake(HandshakeResult::kTimeout);
  Metrics::CountHandshake(HandshakeResult::kTimeout);
  const Metrics::Counts after = Metrics::Read();
  auto delta = [&](HandshakeResult r) {
    size_t i = static_cast<size_t>(r);
    return after.handshakes[i] - before.handshakes[i];
  };
  EXPECT_EQ(delta(HandshakeResult::kCompleted), 1u);
  EXPECT_EQ(delta(HandshakeResult::kTimeout), 2u);
  EXPECT_EQ(delta(HandshakeResult::kBusy), 0u);
  EXPECT_STREQ(HandshakeResultName(HandshakeResult::kUnauthorized), "unauthorized");
  EXPECT_STREQ(HandshakeResultName(HandshakeResult::kFailed), "failed");
}

TEST(HooksTest, StreamDropsAddUp) {
  const uint64_t before = Metrics::Read().stream_events_dropped;
  Metrics::StreamEventsDropped(5);
  Metrics::StreamEventsDropped(7);
  EXPECT_EQ(Metrics::Read().stream_events_dropped - before, 12u);
}

TEST(HooksTest, ApiCallsByMethodAndCode) {
  const uint64_t ok = ApiCalls("test.Service/A", 0);
  const uint64_t not_found = ApiCalls("test.Service/A", 5);
  Metrics::ApiCall("/test.Service/A", 0);
  Metrics::ApiCall("/test.Service/A", 0);
  Metrics::ApiCall("/test.Service/A", 5);
  Metrics::ApiCall("/test.Service/A", 99);  // not a status code: UNKNOWN
  EXPECT_EQ(ApiCalls("test.Service/A", 0) - ok, 2u);
  EXPECT_EQ(ApiCalls("test.Service/A", 5) - not_found, 1u);
  EXPECT_GE(ApiCalls("test.Service/A", 2), 1u);
}

// Authorization denials and limit refusals count per label, from many threads, and a flood of
// distinct labels cannot grow the table past its bound.
TEST(HooksTest, LabelledCountersAreExactAndBounded) {
  std::vector<std::thread> threads;
  threads.reserve(4);
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([] {
      for (int i = 0; i < 1000; ++i) {
        Metrics::AuthzDenied("kvmi.v1.Introspection/SetRegisters");
        Metrics::LimitRefused("max_streams");
      }
    });
  }
  for (auto& t : threads) t.join();
  Metrics::Counts counts = Metrics::Read();
  EXPECT_EQ(Find(counts.authz_denied, "kvmi.v1.Introspection/SetRegisters"), 4000u);
  EXPECT_EQ(Find(counts.limit_refused, "max_streams"), 4000u);

  for (size_t i = 0; i < 3 * Metrics::kMaxLabelValues; ++i) {
    Metrics::LimitRefused("limit-" + std::to_string(i));
  }
  counts = Metrics::Read();
  EXPECT_EQ(counts.limit_refused.size(), Metrics::kMaxLabelValues + 1);  // + "other"
  EXPECT_THAT(counts.limit_refused, Contains(Pair(Metrics::kOtherLabel, ::testing::Gt(0u))));
  EXPECT_EQ(Find(counts.limit_refused, "max_streams"), 4000u);
}

}  // namespace
}  // namespace kvmid
