// StreamLimits alone: admissions refused by each limit with its name and knob, places and charges
// given back exactly once, and memory handed back to the OS (malloc_trim) after a burst, rate-
// limited.
#include "daemon/api/stream_limits.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <vector>

#include "daemon/testing/wait.h"

namespace kvmid::api {
namespace {

using ::testing::HasSubstr;

CallContext CallerNamed(const std::string& principal) {
  CallContext call;
  call.caller = security::Caller::Tls(principal, "test");
  return call;
}

TEST(StreamLimitsTest, EachIdentityHasItsOwnCapAndAnEndedStreamFreesItsPlace) {
  security::Limits limits;
  limits.streams_per_identity = 2;
  StreamLimits streams(limits, nullptr);
  std::vector<StreamLimits::Admission> held(3);
  ASSERT_TRUE(streams.Admit(CallerNamed("a"), limits, true, &held[0]).ok());
  ASSERT_TRUE(streams.Admit(CallerNamed("a"), limits, false, &held[1]).ok());  // Attach
  StreamLimits::Admission refused;
  grpc::Status s = streams.Admit(CallerNamed("a"), limits, true, &refused);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_THAT(s.error_message(), HasSubstr("streams_per_identity = 2"));
  EXPECT_THAT(s.error_message(), HasSubstr("(limits.streams_per_identity)"));
  EXPECT_FALSE(refused.held());
  EXPECT_EQ(streams.budget()->used(), kStreamBaseBytes);  // the refused one charged nothing
  ASSERT_TRUE(streams.Admit(CallerNamed("b"), limits, true, &held[2]).ok());  // another identity
  held[0].Release();
  held[0].Release();  // once only
  EXPECT_EQ(streams.streams_of(CallerNamed("a")), 1u);
  EXPECT_EQ(streams.budget()->used(), kStreamBaseBytes);  // b's
  EXPECT_TRUE(streams.Admit(CallerNamed("a"), limits, true, &held[0]).ok());
  held.clear();  // destruction releases too
  EXPECT_EQ(streams.budget()->used(), 0u);
  EXPECT_EQ(streams.streams_of(CallerNamed("a")), 0u);
}

TEST(StreamLimitsTest, AnExhaustedBudgetRefusesNewStreamsButNotAttach) {
  security::Limits limits;
  limits.stream_queue_budget_bytes = 3 * kStreamBaseBytes;
  limits.streams_per_identity = 100;
  StreamLimits streams(limits, nullptr);
  std::vector<StreamLimits::Admission> held(5);
  for (int i = 0; i < 3; ++i)
    ASSERT_TRUE(streams.Admit(CallerNamed("a"), limits, true, &held[i]).ok());
  grpc::Status s = streams.Admit(CallerNamed("b"), limits, true, &held[3]);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_THAT(s.error_message(), HasSubstr("stream_queue_budget_bytes"));
  EXPECT_THAT(s.error_message(), HasSubstr("(limits.stream_queue_budget_bytes)"));
  EXPECT_EQ(streams.streams_of(CallerNamed("b")), 0u);  // its place was given back
  EXPECT_TRUE(streams.Admit(CallerNamed("b"), limits, false, &held[4]).ok());
  // A reload's larger budget applies to the next stream.
  limits.stream_queue_budget_bytes = 4 * kStreamBaseBytes;
  EXPECT_TRUE(streams.Admit(CallerNamed("b"), limits, true, &held[3]).ok());
}

TEST(StreamLimitsTest, AnIdentityOpeningStreamsTooFastIsRefusedOthersAreNot) {
  security::Limits limits;
  limits.streams_per_identity = 4;
  limits.stream_opens_per_second = 1;
  StreamLimits streams(limits, nullptr);
  ASSERT_EQ(OpensBurst(limits), 8u);
  // Open and close, as a client churning streams does: the places come back, the opens do not.
  for (int i = 0; i < 8; ++i) {
    StreamLimits::Admission admission;
    ASSERT_TRUE(streams.Admit(CallerNamed("a"), limits, true, &admission).ok()) << i;
  }
  StreamLimits::Admission refused;
  grpc::Status s = streams.Admit(CallerNamed("a"), limits, true, &refused);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_THAT(s.error_message(), HasSubstr("identity a opens streams too fast"));
  EXPECT_THAT(s.error_message(), HasSubstr("(limits.stream_opens_per_second)"));
  EXPECT_FALSE(refused.held());
  EXPECT_EQ(streams.streams_of(CallerNamed("a")), 0u);
  EXPECT_EQ(streams.budget()->used(), 0u) << "a refused open charges nothing";
  StreamLimits::Admission other;
  EXPECT_TRUE(streams.Admit(CallerNamed("b"), limits, false, &other).ok());
  // A reload with a faster rate applies to the next open.
  limits.stream_opens_per_second = 100000;
  limits.streams_per_identity = 100000;
  ASSERT_TRUE(testing::WaitUntil([&] {
    StreamLimits::Admission again;
    return streams.Admit(CallerNamed("a"), limits, true, &again).ok();
  }));
}

TEST(StreamLimitsTest, WhatStreamsFreeGoesToTheDaemonsTrimmer) {
  MemoryTrimmer trimmer;
  StreamLimits streams(security::Limits{}, &trimmer);
  streams.Freed(MemoryTrimmer::kMinBytes - 1);
  EXPECT_EQ(trimmer.trims(), 0u);
  streams.Freed(1);  // enough: the trimmer's thread trims
  ASSERT_TRUE(testing::WaitUntil([&] { return trimmer.trims() == 1; }));
}

}  // namespace
}  // namespace kvmid::api
