#include "daemon/startup/flags.h"

#include <absl/flags/parse.h>
#include <absl/flags/reflection.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <stdlib.h>
#include <unistd.h>

#include <fstream>
#include <string>
#include <vector>

// A bool flag of the test's own: --noflag is only defined for bools, and kvmid has none yet.
KVMID_FLAG(bool, test_switch, true, "a bool flag for the --noflag test");

namespace kvmid {
namespace {

using ::testing::HasSubstr;

// Parses `args` as kvmid's command line would be (argv[0] added), after forgetting what was
// given before.
void Parse(std::vector<std::string> args) {
  args.insert(args.begin(), "kvmid");
  std::vector<char*> argv;
  argv.reserve(args.size());
  for (std::string& a : args) argv.push_back(a.data());
  ForgetGivenFlags();
  absl::ParseCommandLine(static_cast<int>(argv.size()), argv.data());
}

std::string WriteTemp(const std::string& name, const std::string& text) {
  std::string dir = ::testing::TempDir();
  std::string path = dir + "/" + name;
  std::ofstream(path) << text;
  return path;
}

// The file's settings, where each test's flags go over.
LoadedConfig FileConfig() {
  absl::StatusOr<LoadedConfig> file = ParseConfig(R"(
    listen { unix_socket: "/file/kvmi.sock" socket_mode: 0600 api_socket: "/file/api.sock" }
    io_threads: 3
    command_timeout_ms: 777
  )",
                                                  "file");
  EXPECT_TRUE(file.ok()) << file.status();
  return *file;
}

TEST(FlagsOverlayTest, TheFileWinsOverFlagsNobodyGave) {
  absl::FlagSaver saver;
  Parse({});
  absl::StatusOr<Settings> s = OverlayFlags(FileConfig(), /*have_file=*/true);
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_EQ(s->config.daemon.unix_socket, "/file/kvmi.sock");  // not the flag's default
  EXPECT_EQ(s->config.daemon.unix_socket_mode, 0600u);
  EXPECT_EQ(s->config.daemon.io_threads, 3);
  EXPECT_EQ(s->config.api_socket, "/file/api.sock");
}

TEST(FlagsOverlayTest, FlagsFromAFlagfileAndSingleDashOverrideTheFile) {
  absl::FlagSaver saver;
  std::string flagfile = WriteTemp("kvmid.flags", "--io_threads=5\n--kvmi_socket_mode=0640\n");
  Parse({"--flagfile=" + flagfile, "-kvmi_socket=/cli/kvmi.sock", "-command_timeout_ms", "42"});
  EXPECT_TRUE(FlagGiven("io_threads"));
  EXPECT_TRUE(FlagGiven("kvmi_socket"));
  EXPECT_FALSE(FlagGiven("api_socket"));
  absl::StatusOr<Settings> s = OverlayFlags(FileConfig(), /*have_file=*/true);
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_EQ(s->config.daemon.io_threads, 5);
  EXPECT_EQ(s->config.daemon.unix_socket_mode, 0640u);
  EXPECT_EQ(s->config.daemon.unix_socket, "/cli/kvmi.sock");
  EXPECT_EQ(s->config.daemon.command_timeout.count(), 42);
  EXPECT_EQ(s->config.api_socket, "/file/api.sock");  // not given: the file's
}

TEST(FlagsOverlayTest, AFlagSetToItsDefaultStillOverridesTheFile) {
  absl::FlagSaver saver;
  Parse({"--io_threads=2", "--kvmi_socket=/run/kvmid/kvmi.sock"});  // both the defaults
  absl::StatusOr<Settings> s = OverlayFlags(FileConfig(), /*have_file=*/true);
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_EQ(s->config.daemon.io_threads, 2);
  EXPECT_EQ(s->config.daemon.unix_socket, "/run/kvmid/kvmi.sock");
}

TEST(FlagsOverlayTest, NoFlagCountsAsGiven) {
  absl::FlagSaver saver;
  Parse({"--notest_switch"});
  EXPECT_TRUE(FlagGiven("test_switch"));
  EXPECT_FALSE(absl::GetFlag(FLAGS_test_switch));
  Parse({});
  EXPECT_FALSE(FlagGiven("test_switch"));
}

TEST(FlagsOverlayTest, WithoutAFileTheSocketFlagsDefaultApplies) {
  absl::FlagSaver saver;
  Parse({});
  absl::StatusOr<Settings> s = OverlayFlags(LoadedConfig{}, /*have_file=*/false);
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_EQ(s->config.daemon.unix_socket, "/run/kvmid/kvmi.sock");
}

TEST(FlagsOverlayTest, BadValuesNameTheirFlagAndLimit) {
  struct Case {
    std::string arg;
    std::string error;
  };
  for (const Case& c : std::vector<Case>{
           {"--io_threads=65", "--io_threads must be 1..64"},
           {"--io_nice=-21", "--io_nice must be -20..19"},
           {"--io_nice=20", "--io_nice must be -20..19"},
           {"--io_idle_yields=-1", "--io_idle_yields must be 0..64"},
           {"--io_idle_yields=65", "--io_idle_yields must be 0..64"},
           {"--kvmi_socket_mode=0999", "--kvmi_socket_mode"},
           {"--kvmi_socket_mode=01777", "at most 0777"},
           {"--kvmi_vsock_port=70000", "0..65535"},
           {"--api_tcp=127.0.0.1:99999", "--api_tcp port must be 0..65535"},
           {"--api_tcp=localhost", "--api_tcp must be HOST:PORT"},
           {"--allowed_uids=1,x", "'x' is not a uid"},
           {"--deadline_ms=0", "--deadline_ms must be positive"},
           {"--fallback=retry", "--fallback must be continue or crash"},
           {"--baseline=strict", "--baseline must be off, monitor or enforce"},
           {"--protect=k:0x2000-0x1000:r", "FIRST <= LAST"},
           {"--protect=k:0-0x100000000:r", "more than 1048576 pages"},
           {"--log_events=some", "--log_events must be none, blocked or all"},
           {"--log_level=loud", "--log_level must be"},
           {"--log_format=xml", "--log_format must be text or json"},
       }) {
    absl::FlagSaver saver;
    Parse({c.arg});
    absl::StatusOr<Settings> s = OverlayFlags(LoadedConfig{}, /*have_file=*/false);
    ASSERT_FALSE(s.ok()) << c.arg;
    EXPECT_EQ(s.status().code(), absl::StatusCode::kInvalidArgument) << c.arg;
    EXPECT_THAT(std::string(s.status().message()), HasSubstr(c.error)) << c.arg;
  }
}

TEST(FlagsOverlayTest, PortZeroMeansAnyAndIsAllowed) {
  EXPECT_TRUE(CheckTcpAddress("127.0.0.1:0").ok());
  EXPECT_TRUE(CheckTcpAddress("[::1]:50051").ok());
  EXPECT_FALSE(CheckTcpAddress("127.0.0.1:65536").ok());
  EXPECT_FALSE(CheckTcpAddress(":50051").ok());
}

TEST(FlagsOverlayTest, BaselineAndProtectAddRulesAfterTheFiles) {
  absl::FlagSaver saver;
  Parse({"--baseline=monitor", "--protect=ktext:0x1000000-0x1ffffff:rx:retry"});
  LoadedConfig file =
      *ParseConfig(R"(policies { name: "f" lock_msr { msr: 0x176 } mode: MODE_ENFORCE })", "file");
  absl::StatusOr<Settings> s = OverlayFlags(file, /*have_file=*/true);
  ASSERT_TRUE(s.ok()) << s.status();
  ASSERT_EQ(s->rules.size(), 6u);
  EXPECT_EQ(s->rules[0]->name, "f");
  EXPECT_EQ(s->rules[1]->name, "cr0-wp");
  EXPECT_EQ(s->rules[1]->mode, RuleMode::kMonitor);
  EXPECT_EQ(s->rules[5]->name, "ktext");
}

TEST(FlagsOverlayTest, SettingsFromFlagsReadsTheConfigFile) {
  absl::FlagSaver saver;
  std::string config = WriteTemp("kvmid.textproto", "io_threads: 7\n");
  Parse({"--config=" + config});
  absl::StatusOr<Settings> s = SettingsFromFlags();
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_EQ(s->config_path, config);
  EXPECT_EQ(s->config.daemon.io_threads, 7);
  Parse({"--config=/nonexistent/kvmid.textproto"});
  EXPECT_THAT(std::string(SettingsFromFlags().status().message()),
              HasSubstr("/nonexistent/kvmid.textproto"));
}

}  // namespace
}  // namespace kvmid
