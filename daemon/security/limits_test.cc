#include "daemon/security/limits.h"

#include <gmock/gmock.h>
#include <google/protobuf/descriptor.h>
#include <google/protobuf/text_format.h>
#include <gtest/gtest.h>

#include <set>
#include <thread>
#include <vector>

namespace kvmid {
namespace security {
namespace {

using ::testing::AllOf;
using ::testing::HasSubstr;

absl::StatusOr<Limits> FromText(const std::string& text) {
  config::KvmidConfig c;
  EXPECT_TRUE(google::protobuf::TextFormat::ParseFromString(text, &c)) << text;
  return LimitsFromConfig(c);
}

// The table, the struct and the proto's Limits message list the same limits.
TEST(LimitTableTest, MatchesTheConfigSchema) {
  const google::protobuf::Descriptor* d = config::Limits::descriptor();
  ASSERT_EQ(static_cast<size_t>(d->field_count()), LimitTable().size());
  EXPECT_EQ(sizeof(Limits), LimitTable().size() * sizeof(uint64_t));
  std::set<const void*> members;
  const Limits defaults;
  for (const LimitInfo& info : LimitTable()) {
    EXPECT_NE(d->FindFieldByName(info.name), nullptr) << info.name;
    EXPECT_EQ(&InfoOf(info.limit), &info);
    members.insert(&(defaults.*(info.member)));
    EXPECT_EQ(defaults.Get(info.limit), defaults.*(info.member));
    EXPECT_GE(defaults.*(info.member), info.min) << info.name;
    EXPECT_LE(defaults.*(info.member), info.max) << info.name;
    EXPECT_EQ(KnobOf(info.limit), std::string("limits.") + info.name);
  }
  EXPECT_EQ(members.size(), LimitTable().size()) << "each limit has its own member";
  EXPECT_TRUE(ValidateLimits(defaults).ok());
}

TEST(LimitTableTest, DefaultsAreTheDocumentedOnes) {
  const Limits l;
  EXPECT_EQ(l.max_attach_deadline_ms, 5000u);  // seconds, not minutes
  EXPECT_LT(l.list_policies_max_bytes, kClientDefaultMaxMessageBytes);
  EXPECT_LE(l.max_policy_bytes + kListPoliciesEntryOverheadBytes, l.list_policies_max_bytes);
}

TEST(LimitsFromConfigTest, DefaultsOverridesAndErrors) {
  auto l = FromText("");
  ASSERT_TRUE(l.ok());
  EXPECT_EQ(l->max_policies, Limits().max_policies);

  l = FromText(R"(limits { max_policies: 10 stream_queue_budget_bytes: 0x4000000
                           max_attach_deadline_ms: 2000 handshake_slots_per_peer: 4 })");
  ASSERT_TRUE(l.ok()) << l.status();
  EXPECT_EQ(l->max_policies, 10u);
  EXPECT_EQ(l->stream_queue_budget_bytes, 64u << 20);
  EXPECT_EQ(l->max_attach_deadline_ms, 2000u);
  EXPECT_EQ(l->handshake_slots_per_peer, 4u);
  EXPECT_EQ(l->streams_per_identity, Limits().streams_per_identity);

  // Every knob is read: set each to its minimum in turn.
  for (const LimitInfo& info : LimitTable()) {
    config::KvmidConfig c;
    const auto* f = config::Limits::descriptor()->FindFieldByName(info.name);
    auto* section = c.mutable_limits();
    // The smallest value the cross-checks allow.
    uint64_t v = info.min;
    if (info.limit == Limit::kListPoliciesMaxBytes) v = Limits().max_policy_bytes + 64;
    if (info.limit == Limit::kMaxPolicyBytes) v = Limits().max_policy_description_bytes;
    if (f->cpp_type() == google::protobuf::FieldDescriptor::CPPTYPE_UINT32) {
      section->GetReflection()->SetUInt32(section, f, static_cast<uint32_t>(v));
    } else {
      section->GetReflection()->SetUInt64(section, f, v);
    }
    auto got = LimitsFromConfig(c);
    ASSERT_TRUE(got.ok()) << info.name << ": " << got.status();
    EXPECT_EQ(got->Get(info.limit), v) << info.name;
  }

  struct Case {
    const char* text;
    const char* error;
  };
  const Case cases[] = {
      {"limits { max_attach_deadline_ms: 600000 }",
       "limits.max_attach_deadline_ms: 600000 is above the maximum 60000"},
      {"limits { list_policies_max_bytes: 4194304 }",
       "limits.list_policies_max_bytes: 4194304 is above the maximum"},
      {"limits { stream_queue_budget_bytes: 1000 }",
       "limits.stream_queue_budget_bytes: 1000 is below the minimum 1048576"},
      {"limits { handshake_slots_per_peer: 5000 }", "limits.handshake_slots_per_peer"},
      {"limits { max_policy_bytes: 1048576 list_policies_max_bytes: 1000000 }",
       "limits.max_policy_bytes: 1048576 does not fit one ListPolicies response"},
      {"limits { max_policy_bytes: 1000 }",
       "limits.max_policy_description_bytes: 4096 is above limits.max_policy_bytes = 1000"},
  };
  for (const Case& c : cases) {
    auto got = FromText(c.text);
    ASSERT_FALSE(got.ok()) << c.text;
    EXPECT_EQ(got.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(std::string(got.status().message()), HasSubstr(c.error));
  }
}

TEST(ExhaustedTest, NamesTheLimit) {
  absl::Status s = Exhausted(Limit::kStreamsPerIdentity, 64, "identity spiffe://x holds 64");
  EXPECT_EQ(s.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(s.message(),
            "identity spiffe://x holds 64: over the limit streams_per_identity = 64 streams "
            "(limits.streams_per_identity)");
  Limits l;
  l.max_attach_deadline_ms = 3000;
  s = Exhausted(Limit::kMaxAttachDeadlineMs, l, "Claim.deadline_ms is 60000");
  EXPECT_THAT(s.message(), HasSubstr("max_attach_deadline_ms = 3000 ms"));
}

kvmi::v1::Policy SmallPolicy() {
  kvmi::v1::Policy p;
  p.set_name("lstar-locked");
  p.set_description("LSTAR set once at boot");
  p.mutable_lock_msr()->set_msr(0xc0000082);
  return p;
}

TEST(PolicyLimitsTest, EachBound) {
  Limits l;
  EXPECT_TRUE(CheckPolicyLimits(SmallPolicy(), l, 0).ok());
  EXPECT_TRUE(CheckPolicyLimits(SmallPolicy(), l, l.max_policies - 1).ok());

  absl::Status s = CheckPolicyLimits(SmallPolicy(), l, l.max_policies);
  EXPECT_EQ(s.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(s.message(), AllOf(HasSubstr("max_policies = 1024"), HasSubstr("lstar-locked"),
                                 HasSubstr("limits.max_policies")));

  kvmi::v1::Policy p = SmallPolicy();
  p.set_description(std::string(l.max_policy_description_bytes, 'd'));
  EXPECT_TRUE(CheckPolicyLimits(p, l, 0).ok());
  p.set_description(std::string(l.max_policy_description_bytes + 1, 'd'));
  s = CheckPolicyLimits(p, l, 0);
  EXPECT_EQ(s.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(s.message(), AllOf(HasSubstr("policy.description is 4097 bytes"),
                                 HasSubstr("limits.max_policy_description_bytes")));
  // The 3.9 MB description of the issue.
  p.set_description(std::string(3900000, 'd'));
  EXPECT_EQ(CheckPolicyLimits(p, l, 0).code(), absl::StatusCode::kResourceExhausted);

  p = SmallPolicy();
  p.set_name(std::string(l.max_policy_name_bytes + 1, 'n'));
  s = CheckPolicyLimits(p, l, 0);
  EXPECT_THAT(s.message(), HasSubstr("limits.max_policy_name_bytes"));

  // Size counts everything: many guest names with a short description.
  p = SmallPolicy();
  for (int i = 0; i < 5000; ++i) p.mutable_guests()->add_names("guest-name-" + std::to_string(i));
  ASSERT_GT(p.ByteSizeLong(), l.max_policy_bytes);
  s = CheckPolicyLimits(p, l, 0);
  EXPECT_EQ(s.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(s.message(), HasSubstr("limits.max_policy_bytes"));
}

TEST(PolicyPageTest, BoundsCountAndBytes) {
  Limits l;
  l.list_policies_page_size = 3;
  l.list_policies_max_bytes = 1000;
  const std::vector<size_t> sizes = {100, 100, 100, 100, 700, 900, 2000, 10};
  EXPECT_EQ(PolicyPageEnd(sizes, 0, l), 3u);  // count
  EXPECT_EQ(PolicyPageEnd(sizes, 3, l), 5u);  // 164 + 764 = 928 fits, + 964 does not
  EXPECT_EQ(PolicyPageEnd(sizes, 5, l), 6u);
  EXPECT_EQ(PolicyPageEnd(sizes, 6, l), 7u);  // one oversized policy still makes a page
  EXPECT_EQ(PolicyPageEnd(sizes, 7, l), 8u);
  EXPECT_EQ(PolicyPageEnd(sizes, 8, l), 8u);
  EXPECT_EQ(PolicyPageEnd(sizes, 100, l), 8u);

  // With the defaults, pages of the largest policies stay under 4 MiB.
  Limits d;
  std::vector<size_t> big(d.max_policies, d.max_policy_bytes);
  size_t start = 0, pages = 0;
  while (start < big.size()) {
    size_t end = PolicyPageEnd(big, start, d);
    ASSERT_GT(end, start);
    EXPECT_LE((end - start) * (d.max_policy_bytes + kListPoliciesEntryOverheadBytes),
              d.list_policies_max_bytes);
    start = end;
    ++pages;
  }
  EXPECT_GT(pages, 1u);
}

TEST(KeyedSlotsTest, CapsPerKeyAndReleases) {
  KeyedSlots slots(Limit::kStreamsPerIdentity, 2);
  auto a = slots.Acquire("spiffe://x", "identity");
  auto b = slots.Acquire("spiffe://x", "identity");
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_EQ(slots.InUse("spiffe://x"), 2u);
  auto c = slots.Acquire("spiffe://x", "identity");
  ASSERT_FALSE(c.ok());
  EXPECT_EQ(c.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(c.status().message(),
              AllOf(HasSubstr("identity spiffe://x holds 2"), HasSubstr("streams_per_identity = 2"),
                    HasSubstr("limits.streams_per_identity")));
  // Another key is not affected.
  auto other = slots.Acquire("uid=1000", "identity");
  EXPECT_TRUE(other.ok());
  // Releasing (destroying, moving, Release) gives the place back.
  { KeyedSlots::Slot gone = std::move(*a); }
  EXPECT_EQ(slots.InUse("spiffe://x"), 1u);
  EXPECT_TRUE(slots.Acquire("spiffe://x", "identity").ok());  // acquired and released at once
  KeyedSlots::Slot kept = std::move(*b);
  EXPECT_TRUE(kept.held());
  kept.Release();
  EXPECT_FALSE(kept.held());
  EXPECT_EQ(slots.InUse("spiffe://x"), 0u);
  // A lower maximum applies to the next acquisition.
  slots.SetMax(1);
  auto d = slots.Acquire("uid=1000", "peer");
  EXPECT_FALSE(d.ok());
  EXPECT_THAT(d.status().message(), HasSubstr("peer uid=1000 holds 1"));
}

TEST(KeyedSlotsTest, SlotOutlivesTheCounter) {
  KeyedSlots::Slot slot;
  {
    KeyedSlots slots(Limit::kHandshakeSlotsPerPeer, 1);
    auto s = slots.Acquire("cid:5", "peer");
    ASSERT_TRUE(s.ok());
    slot = std::move(*s);
  }
  slot.Release();  // no use after free (ASan)
}

TEST(KeyedSlotsTest, ConcurrentAcquireNeverExceeds) {
  KeyedSlots slots(Limit::kHandshakeSlotsPerPeer, 3);
  std::atomic<int> held{0}, max_held{0};
  std::vector<std::thread> threads;
  threads.reserve(4);
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&] {
      for (int i = 0; i < 2000; ++i) {
        auto s = slots.Acquire("uid=7", "peer");
        if (!s.ok()) continue;
        int now = ++held;
        int prev = max_held.load();
        while (now > prev && !max_held.compare_exchange_weak(prev, now)) {
        }
        --held;
      }
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_LE(max_held.load(), 3);
  EXPECT_EQ(slots.InUse("uid=7"), 0u);
}

TEST(KeyedRateTest, ABurstThenTheRateAndEachKeyApart) {
  using Clock = KeyedRate::Clock;
  const Clock::time_point t0 = Clock::now();
  KeyedRate rate(Limit::kStreamOpensPerSecond, /*per_second=*/10, /*burst=*/3);
  for (int i = 0; i < 3; ++i) EXPECT_TRUE(rate.Take("alice", "identity", t0).ok()) << i;
  absl::Status refused = rate.Take("alice", "identity", t0);
  EXPECT_EQ(refused.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(refused.message(), HasSubstr("identity alice opens streams too fast"));
  EXPECT_THAT(refused.message(), HasSubstr("(the next in 100 ms)"));
  EXPECT_THAT(refused.message(), HasSubstr("stream_opens_per_second = 10 streams/s"));
  EXPECT_THAT(refused.message(), HasSubstr("(limits.stream_opens_per_second)"));
  EXPECT_TRUE(rate.Take("bob", "identity", t0).ok()) << "another identity has its own bucket";
  // 10 per second: one more after 100 ms, not before; a refusal spends nothing.
  EXPECT_FALSE(rate.Take("alice", "identity", t0 + std::chrono::milliseconds(99)).ok());
  EXPECT_TRUE(rate.Take("alice", "identity", t0 + std::chrono::milliseconds(100)).ok());
  EXPECT_FALSE(rate.Take("alice", "identity", t0 + std::chrono::milliseconds(101)).ok());
  // Idle long enough, the burst again, never more.
  const Clock::time_point later = t0 + std::chrono::seconds(60);
  for (int i = 0; i < 3; ++i) EXPECT_TRUE(rate.Take("alice", "identity", later).ok()) << i;
  EXPECT_FALSE(rate.Take("alice", "identity", later).ok());
  // A reload: a lower burst caps what is left, a higher rate refills faster.
  rate.Set(/*per_second=*/1000, /*burst=*/1);
  EXPECT_TRUE(rate.Take("alice", "identity", later + std::chrono::milliseconds(1)).ok());
  EXPECT_FALSE(rate.Take("alice", "identity", later + std::chrono::milliseconds(1)).ok());
}

TEST(KeyedRateTest, RemembersOnlyKeysWhoseBucketIsNotFullAgain) {
  using Clock = KeyedRate::Clock;
  const Clock::time_point t0 = Clock::now();
  KeyedRate rate(Limit::kStreamOpensPerSecond, /*per_second=*/1, /*burst=*/2);
  ASSERT_TRUE(rate.Take("busy", "identity", t0).ok());
  ASSERT_TRUE(rate.Take("busy", "identity", t0).ok());  // empty now
  for (size_t i = 1; i < KeyedRate::kMaxKeys; ++i) {
    ASSERT_TRUE(rate.Take("idle-" + std::to_string(i), "identity", t0).ok());  // one of two
  }
  EXPECT_EQ(rate.keys(), KeyedRate::kMaxKeys);
  // 1.2 s on, every idle key's bucket is full again (1 + 1.2, at most 2): the next new key
  // forgets them, not the busy one (1.2 tokens), which keeps its state.
  const Clock::time_point t1 = t0 + std::chrono::milliseconds(1200);
  ASSERT_TRUE(rate.Take("new", "identity", t1).ok());
  EXPECT_EQ(rate.keys(), 2u);
  EXPECT_TRUE(rate.Take("busy", "identity", t1).ok());
  EXPECT_FALSE(rate.Take("busy", "identity", t1).ok()) << "0.2 tokens left, not a new burst";
}

TEST(ByteBudgetTest, ChargesWithinBudget) {
  ByteBudget budget(1000);
  EXPECT_TRUE(budget.TryCharge(600));
  EXPECT_FALSE(budget.TryCharge(401));
  EXPECT_TRUE(budget.TryCharge(400));
  EXPECT_FALSE(budget.TryCharge(1));
  EXPECT_FALSE(budget.TryCharge(UINT64_MAX));
  budget.Release(1000);
  EXPECT_EQ(budget.used(), 0u);
  EXPECT_FALSE(budget.TryCharge(1001));
  absl::Status s = budget.ExhaustedStatus("StreamEvents");
  EXPECT_EQ(s.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(s.message(), HasSubstr("limits.stream_queue_budget_bytes"));
}

TEST(ByteBudgetTest, ConcurrentChargesNeverExceed) {
  ByteBudget budget(10000);
  std::vector<std::thread> threads;
  std::atomic<bool> over{false};
  threads.reserve(4);
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&] {
      for (int i = 0; i < 5000; ++i) {
        if (budget.TryCharge(300)) {
          if (budget.used() > 10000) over = true;
          budget.Release(300);
        }
      }
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_FALSE(over.load());
  EXPECT_EQ(budget.used(), 0u);
}

}  // namespace
}  // namespace security
}  // namespace kvmid
