#include "daemon/security/security_config.h"

#include <gmock/gmock.h>
#include <google/protobuf/text_format.h>
#include <gtest/gtest.h>

namespace kvmid {
namespace security {
namespace {

using ::testing::HasSubstr;

absl::StatusOr<SecurityConfig> FromText(const std::string& text) {
  config::KvmidConfig c;
  EXPECT_TRUE(google::protobuf::TextFormat::ParseFromString(text, &c)) << text;
  return SecurityFromConfig(c);
}

TEST(SecurityConfigTest, Defaults) {
  auto s = FromText("");
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_TRUE(s->audit_log.empty());
  EXPECT_EQ(s->limits.max_policies, Limits().max_policies);
  EXPECT_TRUE(s->authorizer->Check(Caller::Unix(0, 0), Rpc::kListVMs, nullptr).ok());
  EXPECT_FALSE(s->authorizer->Check(Caller::Unix(1, 1), Rpc::kListVMs, nullptr).ok());
}

TEST(SecurityConfigTest, AllSections) {
  auto s = FromText(R"(
    audit_log: "/var/log/kvmid/audit.log"
    limits { max_policies: 2 max_attach_deadline_ms: 3000 }
    authz { bindings { gid: 990 role: "operator" } }
    policies { name: "a" lock_msr { msr: 0xc0000082 } mode: MODE_ENFORCE }
    policies { name: "b" lock_msr { msr: 0x176 } mode: MODE_ENFORCE }
  )");
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_EQ(s->audit_log, "/var/log/kvmid/audit.log");
  EXPECT_EQ(s->limits.max_attach_deadline_ms, 3000u);
  const GuestRef g{"web-1", "u", {}};
  EXPECT_TRUE(s->authorizer->Check(Caller::Unix(5, 990), Rpc::kPauseVCPU, &g).ok());
}

TEST(SecurityConfigTest, ErrorsNameTheField) {
  auto s =
      FromText(R"(authz { bindings { uid: 1 role: "viewer" } bindings { uid: 2 role: "root" } })");
  ASSERT_FALSE(s.ok());
  EXPECT_THAT(std::string(s.status().message()),
              HasSubstr("authz.bindings[1].role: unknown role \"root\""));

  s = FromText("limits { max_attach_deadline_ms: 120000 }");
  ASSERT_FALSE(s.ok());
  EXPECT_THAT(std::string(s.status().message()), HasSubstr("limits.max_attach_deadline_ms"));

  s = FromText(R"(
    limits { max_policies: 1 }
    policies { name: "a" lock_msr { msr: 0xc0000082 } mode: MODE_ENFORCE }
    policies { name: "b" lock_msr { msr: 0x176 } mode: MODE_ENFORCE }
  )");
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(std::string(s.status().message()), HasSubstr("policies[1] (b): "));
  EXPECT_THAT(std::string(s.status().message()), HasSubstr("limits.max_policies"));

  s = FromText(R"(policies { name: "d" description: ")" + std::string(5000, 'x') +
               R"(" lock_msr { msr: 0x176 } mode: MODE_ENFORCE })");
  ASSERT_FALSE(s.ok());
  EXPECT_THAT(std::string(s.status().message()),
              HasSubstr("policies[0] (d): policy.description is 5000 bytes"));
}

}  // namespace
}  // namespace security
}  // namespace kvmid
