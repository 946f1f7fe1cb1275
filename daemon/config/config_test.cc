#include "daemon/config/config.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <fstream>
#include <sstream>

#include "daemon/config/policy_convert.h"

namespace kvmid {
namespace {

using ::testing::AllOf;
using ::testing::HasSubstr;

// The error's message for `text`, or "ok" when it parses.
std::string ErrorOf(const std::string& text) {
  absl::StatusOr<LoadedConfig> parsed = ParseConfig(text, "k.conf");
  if (parsed.ok()) return "ok";
  EXPECT_EQ(parsed.status().code(), absl::StatusCode::kInvalidArgument);
  return std::string(parsed.status().message());
}

TEST(ConfigTest, FullExampleParses) {
  const char* text = R"(
    # Hypervisor node defaults.
    listen { unix_socket: "/tmp/k.sock" socket_mode: 0600 vsock_port: 5555 allowed_uids: [64055] }
    cookie_file: "/etc/kvmid/cookie"
    io_threads: 4
    verdicts {
      default_deadline_ms: 250
      default_fallback: ACTION_CONTINUE
      per_event { event: EVENT_TYPE_PF deadline_ms: 50 fallback: ACTION_CRASH }
    }
    guest_labels { name: "web-1" labels { key: "tier" value: "prod" } }
    policies {
      name: "kernel-text"
      protect_pages { gpa_first: 0x1000000 gpa_last: 0x1ffffff allowed: "rx" }
      mode: MODE_ENFORCE
    }
    policies { name: "wp" forbid_cr_bits_clear { cr: 0 bits: 0x10000 } mode: MODE_MONITOR }
    policies { name: "lstar" lock_msr { msr: 0xc0000082 } guests { labels { key: "tier" value: "prod" } } mode: MODE_ENFORCE }
    policies {
      name: "no-int3"
      match { events: [EVENT_TYPE_BREAKPOINT] vcpus: [0] }
      action: ACTION_CRASH
      mode: MODE_ENFORCE
    }
  )";
  absl::StatusOr<LoadedConfig> parsed = ParseConfig(text, "kvmid.conf");
  ASSERT_TRUE(parsed.ok()) << parsed.status();
  LoadedConfig& c = *parsed;
  EXPECT_EQ(c.daemon.unix_socket, "/tmp/k.sock");
  EXPECT_EQ(c.daemon.unix_socket_mode, 0600u);
  EXPECT_EQ(c.daemon.vsock_port, 5555u);
  EXPECT_THAT(c.daemon.allowed_uids, ::testing::ElementsAre(64055u));
  EXPECT_EQ(c.daemon.io_threads, 4);
  EXPECT_EQ(c.daemon.io_nice, kDefaultIoNice);  // unset
  EXPECT_EQ(c.daemon.verdicts.deadlines[KVMI_EVENT_CR].deadline.count(), 250);
  EXPECT_EQ(c.daemon.verdicts.deadlines[KVMI_EVENT_PF].deadline.count(), 50);
  EXPECT_EQ(c.daemon.verdicts.deadlines[KVMI_EVENT_PF].fallback_action, KVMI_EVENT_ACTION_CRASH);
  EXPECT_EQ(c.guest_labels["web-1"]["tier"], "prod");
  ASSERT_EQ(c.rules.size(), 4u);
  EXPECT_EQ(c.rules[0]->arms.page_access.size(), 4096u);
  EXPECT_EQ(c.rules[0]->action, RuleAction::kRetry);
  EXPECT_EQ(c.rules[1]->mode, RuleMode::kMonitor);
  EXPECT_EQ(c.rules[1]->action, RuleAction::kKeepOld);
  EXPECT_EQ(c.rules[2]->match.labels.at("tier"), "prod");
  EXPECT_THAT(c.rules[3]->arms.vcpu_events, ::testing::ElementsAre(KVMI_EVENT_BREAKPOINT));
  EXPECT_EQ(c.rules[3]->action, RuleAction::kCrash);
  // Listing gives back what was applied.
  EXPECT_EQ(RuleToPolicy(*c.rules[0]).protect_pages().allowed(), "rx");
}

TEST(ConfigTest, RipBytesPrefixPolicies) {
  std::ifstream in("daemon/config/examples/wrmsr_context.textproto");
  ASSERT_TRUE(in) << "the example is a data dependency";
  std::stringstream text;
  text << in.rdbuf();
  absl::StatusOr<LoadedConfig> parsed = ParseConfig(text.str(), "wrmsr_context.textproto");
  ASSERT_TRUE(parsed.ok()) << parsed.status();
  ASSERT_EQ(parsed->rules.size(), 3u);
  EXPECT_EQ(parsed->rules[0]->match.rip_bytes_prefix, (std::vector<uint8_t>{0x0f, 0x30}));
  EXPECT_EQ(parsed->rules[0]->mode, RuleMode::kMonitor);
  EXPECT_EQ(*parsed->rules[1]->match.msr, 0xc0000082u);
  EXPECT_TRUE(parsed->rules[2]->match.rip_bytes_prefix.empty());
  // Listing gives the bytes back.
  Rule copy;
  copy.name = "x";
  copy.match.rip_bytes_prefix = {0x0f, 0x30};
  EXPECT_EQ(RuleToPolicy(copy).match().rip_bytes_prefix(), std::string("\x0f\x30", 2));
  // Bounded: 17 bytes name the field and the limit.
  EXPECT_THAT(
      ErrorOf(R"(policies { name: "long" match { rip_bytes_prefix: "0123456789abcdefg" } })"),
      AllOf(HasSubstr("match.rip_bytes_prefix"), HasSubstr("limit of 16")));
}

TEST(ConfigTest, ApiTransportSecurity) {
  LoadedConfig defaults;
  EXPECT_EQ(defaults.api_socket_mode, 0660u);
  EXPECT_FALSE(defaults.api_tcp_insecure_plaintext);
  EXPECT_EQ(defaults.api_tls_refresh_seconds, 60u);
  absl::StatusOr<LoadedConfig> c = ParseConfig(R"(
    listen { api_tcp: "0.0.0.0:50051" api_socket_mode: 0640 api_socket_group: "kvmi" }
    api_tls { cert: "/t/tls.crt" key: "/t/tls.key" client_ca: "/t/ca.crt" refresh_seconds: 5 }
  )",
                                               "kvmid.conf");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->api_socket_mode, 0640u);
  EXPECT_EQ(c->api_socket_group, "kvmi");
  EXPECT_EQ(c->api_tls_cert, "/t/tls.crt");
  EXPECT_EQ(c->api_tls_key, "/t/tls.key");
  EXPECT_EQ(c->api_tls_client_ca, "/t/ca.crt");
  EXPECT_EQ(c->api_tls_refresh_seconds, 5u);
  absl::StatusOr<LoadedConfig> plain = ParseConfig(
      "listen { api_tcp: \"127.0.0.1:1\" api_tcp_insecure_plaintext: true }", "kvmid.conf");
  ASSERT_TRUE(plain.ok()) << plain.status();
  EXPECT_TRUE(plain->api_tcp_insecure_plaintext);
  EXPECT_THAT(ErrorOf("listen { api_socket_mode: 01777 }"), HasSubstr("listen.api_socket_mode"));
}

TEST(ConfigTest, SyntaxErrorsNameTheLine) {
  EXPECT_THAT(ErrorOf("io_threads: 2\nbogus_field: 1\n"), HasSubstr("k.conf:2:"));
}

TEST(ConfigTest, BadPoliciesNameTheirFieldAndIndex) {
  EXPECT_THAT(
      ErrorOf(
          R"(policies { name: "p" protect_pages { gpa_first: 0 gpa_last: 4095 allowed: "rq" } mode: MODE_ENFORCE })"),
      HasSubstr("policies[0] (p): protect_pages.allowed"));
  EXPECT_THAT(ErrorOf(R"(policies { name: "p" mode: MODE_ENFORCE })"), HasSubstr("rule: one of"));
  EXPECT_THAT(ErrorOf(R"(policies { name: "m" lock_msr { msr: 0x40000000 } mode: MODE_ENFORCE })"),
              HasSubstr("lock_msr.msr"));
  EXPECT_THAT(
      ErrorOf(
          R"(policies { name: "c" forbid_cr_bits_clear { cr: 2 bits: 1 } mode: MODE_ENFORCE })"),
      HasSubstr("forbid_cr_bits_clear.cr"));
  EXPECT_THAT(
      ErrorOf(
          R"(policies { name: "u" lock_msr { msr: 0x176 } guests { uuids: "nope" } mode: MODE_ENFORCE })"),
      HasSubstr("guests.uuids[0]"));
  EXPECT_THAT(ErrorOf(R"(policies { name: "a" lock_msr { msr: 0x176 } mode: MODE_ENFORCE }
                             policies { name: "a" lock_msr { msr: 0x175 } mode: MODE_ENFORCE })"),
              HasSubstr("used twice"));
}

TEST(ConfigTest, APolicyWithoutAModeIsALoadErrorNamingIt) {
  const std::string error =
      ErrorOf(R"(policies { name: "ok" lock_msr { msr: 0x176 } mode: MODE_MONITOR }
                                        policies { name: "lstar-locked" lock_msr { msr: 0xc0000082 } })");
  EXPECT_THAT(error, HasSubstr("policies[1] (lstar-locked)"));
  EXPECT_THAT(error, HasSubstr("mode"));
  EXPECT_THAT(error, HasSubstr("MODE_UNSPECIFIED"));
  EXPECT_THAT(ErrorOf(R"(policies { name: "u" mode: MODE_UNSPECIFIED lock_msr { msr: 0x176 } })"),
              HasSubstr("policies[0] (u): mode"));
}

TEST(ConfigTest, FallbacksMayOnlyContinueOrCrash) {
  EXPECT_THAT(ErrorOf("verdicts { default_fallback: ACTION_RETRY }"),
              HasSubstr("ACTION_CONTINUE or ACTION_CRASH"));
}

TEST(ConfigTest, LimitsComeFromTheirConstants) {
  EXPECT_THAT(ErrorOf("io_threads: 65"), HasSubstr("at most " + std::to_string(kMaxIoThreads)));
  EXPECT_EQ(ErrorOf("io_threads: 64"), "ok");
  EXPECT_THAT(ErrorOf("io_nice: -21"), HasSubstr("io_nice: -20 to 19"));
  EXPECT_THAT(ErrorOf("io_nice: 20"), HasSubstr("io_nice: -20 to 19"));
  EXPECT_EQ(ErrorOf("io_nice: 19"), "ok");
  absl::StatusOr<LoadedConfig> zero = ParseConfig("io_nice: 0", "k.conf");
  ASSERT_TRUE(zero.ok()) << zero.status();
  EXPECT_EQ(zero->daemon.io_nice, 0);  // set to 0 is not unset
  EXPECT_THAT(ErrorOf("io_idle_yields: 65"),
              HasSubstr("io_idle_yields: at most " + std::to_string(kMaxIdleYields)));
  absl::StatusOr<LoadedConfig> no_yields = ParseConfig("io_idle_yields: 0", "k.conf");
  ASSERT_TRUE(no_yields.ok()) << no_yields.status();
  EXPECT_EQ(no_yields->daemon.io_idle_yields, 0);  // set to 0 is not unset
  absl::StatusOr<LoadedConfig> unset = ParseConfig("", "k.conf");
  ASSERT_TRUE(unset.ok()) << unset.status();
  EXPECT_EQ(unset->daemon.io_idle_yields, kDefaultIdleYields);
  EXPECT_THAT(ErrorOf("listen { socket_mode: 01777 }"), HasSubstr("at most 0777"));
  EXPECT_THAT(
      ErrorOf(
          R"(policies { name: "big" protect_pages { gpa_first: 0 gpa_last: 0x100000000 allowed: "r" } mode: MODE_ENFORCE })"),
      HasSubstr("more than 4 GiB"));
}

TEST(ConfigTest, AnUnreadableFileNamesItsPath) {
  absl::StatusOr<LoadedConfig> loaded = LoadConfigFile("/nonexistent/kvmid.textproto");
  EXPECT_EQ(loaded.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(loaded.status().message()), HasSubstr("/nonexistent/kvmid.textproto"));
}

TEST(PolicyConvertTest, EventTypesAreKvmiIdsPlusOne) {
  EXPECT_EQ(ToEventType(KVMI_EVENT_CR), kvmi::v1::EVENT_TYPE_CR);
  uint8_t id;
  ASSERT_TRUE(FromEventType(kvmi::v1::EVENT_TYPE_SINGLESTEP, &id));
  EXPECT_EQ(id, KVMI_EVENT_SINGLESTEP);
  EXPECT_FALSE(FromEventType(kvmi::v1::EVENT_TYPE_UNSPECIFIED, &id));
  for (uint8_t e = 0; e < KVMI_NUM_EVENTS; ++e) {
    ASSERT_TRUE(FromEventType(ToEventType(e), &id));
    EXPECT_EQ(id, e);
  }
}

}  // namespace
}  // namespace kvmid
