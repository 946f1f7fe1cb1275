#include "daemon/state/policy_store.h"

#include <absl/strings/str_format.h>
#include <dirent.h>
#include <gmock/gmock.h>
#include <google/protobuf/text_format.h>
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <fstream>
#include <sstream>

#include "daemon/config/policy_convert.h"

namespace kvmid {
namespace {

using ::testing::HasSubstr;
using ::testing::SizeIs;

kvmi::v1::Policy ParsePolicy(const std::string& text) {
  kvmi::v1::Policy policy;
  EXPECT_TRUE(google::protobuf::TextFormat::ParseFromString(text, &policy)) << text;
  return policy;
}

kvmi::v1::Policy Ktext() {
  return ParsePolicy(
      R"(name: "ktext" protect_pages { gpa_first: 0x1000000 gpa_last: 0x1ffffff allowed: "rx" } mode: MODE_ENFORCE)");
}

kvmi::v1::Policy Lstar() {
  return ParsePolicy(R"(name: "lstar" lock_msr { msr: 0xC0000082 } mode: MODE_ENFORCE)");
}

std::string ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

void WriteFile(const std::string& path, const std::string& content) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << content;
}

std::vector<std::string> ListDir(const std::string& dir) {
  std::vector<std::string> names;
  DIR* d = ::opendir(dir.c_str());
  if (d == nullptr) return names;
  while (dirent* e = ::readdir(d)) {
    std::string name = e->d_name;
    if (name != "." && name != "..") names.push_back(name);
  }
  ::closedir(d);
  std::sort(names.begin(), names.end());
  return names;
}

class PolicyStoreTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string tmpl =
        std::string(std::getenv("TEST_TMPDIR") ? std::getenv("TEST_TMPDIR") : "/tmp") +
        "/state-XXXXXX";
    ASSERT_NE(::mkdtemp(tmpl.data()), nullptr);
    dir_ = tmpl + "/nested/state";  // Save creates what is missing
  }
  std::string dir_;
};

TEST_F(PolicyStoreTest, MissingDirectoryIsAnEmptyFirstStart) {
  PolicyStore store(dir_);
  auto loaded = store.Load();
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  EXPECT_THAT(*loaded, SizeIs(0));
}

TEST_F(PolicyStoreTest, RoundTripKeepsPoliciesAndOrder) {
  PolicyStore store(dir_);
  ASSERT_TRUE(store.Save({Lstar(), Ktext()}).ok());
  auto loaded = PolicyStore(dir_).Load();
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  ASSERT_THAT(*loaded, SizeIs(2));
  EXPECT_EQ((*loaded)[0].SerializeAsString(), Lstar().SerializeAsString());
  EXPECT_EQ((*loaded)[1].SerializeAsString(), Ktext().SerializeAsString());
  // Readable by an operator: a header, then text format.
  std::string text = ReadFile(store.path());
  EXPECT_THAT(text, HasSubstr("# kvmid policy state: format 1, crc32c 0x"));
  EXPECT_THAT(text, HasSubstr("name: \"ktext\""));
  struct stat st;
  ASSERT_EQ(::stat(dir_.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0700u);
}

TEST_F(PolicyStoreTest, SaveReplacesByRenameAndLeavesNoTemporary) {
  PolicyStore store(dir_);
  ASSERT_TRUE(store.Save({Ktext()}).ok());
  struct stat before;
  ASSERT_EQ(::stat(store.path().c_str(), &before), 0);
  // A temporary file left by a crash mid-save changes nothing and is replaced.
  WriteFile(store.path() + ".tmp", "half a file");
  ASSERT_TRUE(PolicyStore(dir_).Load().ok());
  ASSERT_TRUE(store.Save({Ktext(), Lstar()}).ok());
  struct stat after;
  ASSERT_EQ(::stat(store.path().c_str(), &after), 0);
  EXPECT_NE(before.st_ino, after.st_ino) << "a new file renamed over the old one, not rewritten";
  EXPECT_THAT(ListDir(dir_), ::testing::ElementsAre("policies.txtpb"));
  auto loaded = store.Load();
  ASSERT_TRUE(loaded.ok());
  EXPECT_THAT(*loaded, SizeIs(2));
  ASSERT_TRUE(store.Save({}).ok());
  loaded = store.Load();
  ASSERT_TRUE(loaded.ok());
  EXPECT_THAT(*loaded, SizeIs(0));
}

TEST_F(PolicyStoreTest, FailedSaveKeepsTheOldState) {
  PolicyStore store(dir_);
  ASSERT_TRUE(store.Save({Ktext()}).ok());
  const std::string old_content = ReadFile(store.path());
  ASSERT_EQ(::mkdir((store.path() + ".tmp").c_str(), 0700), 0);  // the temporary cannot be made
  absl::Status s = store.Save({Ktext(), Lstar()});
  ASSERT_FALSE(s.ok());
  EXPECT_THAT(std::string(s.message()), HasSubstr(store.path() + ".tmp"));
  EXPECT_EQ(ReadFile(store.path()), old_content);
}

TEST_F(PolicyStoreTest, ChangedByteFailsTheChecksum) {
  PolicyStore store(dir_);
  ASSERT_TRUE(store.Save({Ktext()}).ok());
  std::string content = ReadFile(store.path());
  size_t at = content.find("allowed: \"rx\"");
  ASSERT_NE(at, std::string::npos) << content;
  content[at + 11] = 'w';  // "rw": same length, a different (still valid) policy
  WriteFile(store.path(), content);
  auto loaded = store.Load();
  ASSERT_FALSE(loaded.ok());
  EXPECT_EQ(loaded.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(std::string(loaded.status().message()), HasSubstr(store.path()));
  EXPECT_THAT(std::string(loaded.status().message()), HasSubstr("checksum mismatch"));
}

TEST_F(PolicyStoreTest, TornFileNamesTheLength) {
  PolicyStore store(dir_);
  ASSERT_TRUE(store.Save({Ktext(), Lstar()}).ok());
  std::string content = ReadFile(store.path());
  WriteFile(store.path(), content.substr(0, content.size() - 10));
  auto loaded = store.Load();
  ASSERT_FALSE(loaded.ok());
  EXPECT_THAT(std::string(loaded.status().message()), HasSubstr("torn or edited"));
}

TEST_F(PolicyStoreTest, GarbageAndEmptyFilesAreErrorsNamingTheFile) {
  PolicyStore store(dir_);
  ASSERT_TRUE(store.Save({}).ok());
  for (const std::string& garbage :
       {std::string(""), std::string("\x01\x02\x03"), std::string("policies { name: \"x\" }\n")}) {
    WriteFile(store.path(), garbage);
    auto loaded = store.Load();
    ASSERT_FALSE(loaded.ok()) << garbage;
    EXPECT_THAT(std::string(loaded.status().message()), HasSubstr("state file " + store.path()));
  }
}

TEST_F(PolicyStoreTest, UnknownFormatVersionIsRefused) {
  PolicyStore store(dir_);
  ASSERT_TRUE(store.Save({}).ok());
  std::string content = ReadFile(store.path());
  content.replace(content.find("format 1"), 8, "format 9");
  WriteFile(store.path(), content);
  auto loaded = store.Load();
  ASSERT_FALSE(loaded.ok());
  EXPECT_THAT(std::string(loaded.status().message()), HasSubstr("format 9"));
}

// A well-formed file (valid checksum) holding a policy that does not validate, or the same name
// twice: refused with the index and name.
TEST_F(PolicyStoreTest, InvalidPolicyWithAValidChecksumIsRefused) {
  PolicyStore store(dir_);
  kvmi::v1::Policy bad = ParsePolicy(
      R"(name: "bad" protect_pages { gpa_first: 0x2000 gpa_last: 0x1000 allowed: "rx" })");
  WriteFile(store.path(), "");
  ASSERT_TRUE(store.Save({}).ok());
  WriteFile(store.path(), EncodePolicyState({Ktext(), bad}));
  auto loaded = store.Load();
  ASSERT_FALSE(loaded.ok());
  EXPECT_THAT(std::string(loaded.status().message()), HasSubstr("policies[1] (bad)"));
  WriteFile(store.path(), EncodePolicyState({Ktext(), Ktext()}));
  loaded = store.Load();
  ASSERT_FALSE(loaded.ok());
  EXPECT_THAT(std::string(loaded.status().message()), HasSubstr("appears twice"));
}

TEST_F(PolicyStoreTest, TextFormatErrorNamesTheLine) {
  PolicyStore store(dir_);
  ASSERT_TRUE(store.Save({}).ok());
  std::string body = "policies {\n  nme: \"x\"\n}\n";
  WriteFile(store.path(), "# kvmid policy state: format 1, crc32c 0x" +
                              absl::StrFormat("%08x", Crc32c(body)) + ", " +
                              std::to_string(body.size()) + " bytes\n" + body);
  auto loaded = store.Load();
  ASSERT_FALSE(loaded.ok());
  EXPECT_THAT(std::string(loaded.status().message()), HasSubstr("line 3:"));
}

TEST(Crc32cTest, KnownVector) {
  EXPECT_EQ(Crc32c("123456789"), 0xE3069283u);  // the CRC-32C check value
}

TEST(StateRecoveryTest, Parses) {
  EXPECT_EQ(*ParseStateRecovery(""), StateRecovery::kFail);
  EXPECT_EQ(*ParseStateRecovery("fail"), StateRecovery::kFail);
  EXPECT_EQ(*ParseStateRecovery("quarantine"), StateRecovery::kQuarantine);
  EXPECT_FALSE(ParseStateRecovery("reset").ok());
}

// ---- RestorePolicies with a Daemon (no listeners: policies only) ------------------------------

std::shared_ptr<Rule> RuleOf(const kvmi::v1::Policy& policy) {
  absl::StatusOr<std::shared_ptr<Rule>> converted = PolicyToRule(policy);
  EXPECT_TRUE(converted.ok()) << converted.status();
  std::shared_ptr<Rule> rule = *converted;
  rule->origin = policy.SerializeAsString();
  return rule;
}

std::vector<std::string> Names(Daemon* daemon) {
  std::vector<std::string> names;
  for (const auto& r : *daemon->policies().rules()) names.push_back(r->name);
  return names;
}

TEST_F(PolicyStoreTest, ApiPoliciesArePersistedAndRestored) {
  {
    Daemon daemon(DaemonConfig{});
    ASSERT_TRUE(daemon.ApplyPolicy(ForbidClearCr0WpRule("config-wp", RuleMode::kEnforce)).ok());
    PolicyStore store(dir_);
    ASSERT_TRUE(RestorePolicies(&daemon, &store, StateRecovery::kFail).ok());
    ASSERT_TRUE(daemon.ApplyApiPolicy(RuleOf(Ktext()), PolicyPrecondition{}).ok());
    ASSERT_TRUE(daemon.ApplyApiPolicy(RuleOf(Lstar()), PolicyPrecondition{}).ok());
    ASSERT_TRUE(daemon.RemoveApiPolicy("ktext", PolicyPrecondition{}).ok());
    // Removing a configured policy is not persisted (the config is its source).
    ASSERT_TRUE(daemon.RemoveApiPolicy("config-wp", PolicyPrecondition{}).ok());
    EXPECT_EQ(daemon.RemoveApiPolicy("nope", PolicyPrecondition{}).status().code(),
              absl::StatusCode::kNotFound);
    EXPECT_THAT(Names(&daemon), ::testing::ElementsAre("lstar"));
  }
  // "Restart": a new daemon with the configured policy, then the saved ones.
  Daemon daemon(DaemonConfig{});
  ASSERT_TRUE(daemon.ApplyPolicy(ForbidClearCr0WpRule("config-wp", RuleMode::kEnforce)).ok());
  PolicyStore store(dir_);
  ASSERT_TRUE(RestorePolicies(&daemon, &store, StateRecovery::kFail).ok());
  EXPECT_THAT(Names(&daemon), ::testing::ElementsAre("config-wp", "lstar"));
  ASSERT_THAT(daemon.api_policies(), SizeIs(1));
  EXPECT_EQ(daemon.api_policies()[0]->name, "lstar");
  // Only API policies are in the file.
  auto loaded = store.Load();
  ASSERT_TRUE(loaded.ok());
  ASSERT_THAT(*loaded, SizeIs(1));
  EXPECT_EQ((*loaded)[0].SerializeAsString(), Lstar().SerializeAsString());
}

TEST_F(PolicyStoreTest, ASavedPolicyTheConfigurationDefinesIsNotRestored) {
  PolicyStore store(dir_);
  ASSERT_TRUE(store.Save({Ktext(), Lstar()}).ok());
  Daemon daemon(DaemonConfig{});
  LoadedConfig config;
  config.rules = {RuleOf(Lstar())};
  ASSERT_TRUE(daemon.Reload(config).ok());
  ASSERT_TRUE(RestorePolicies(&daemon, &store, StateRecovery::kFail).ok());
  EXPECT_THAT(Names(&daemon), ::testing::ElementsAre("lstar", "ktext"));
  EXPECT_EQ(daemon.policies().Find("lstar")->source, PolicySource::kConfig);
  ASSERT_THAT(daemon.api_policies(), SizeIs(1));
  EXPECT_EQ(daemon.api_policies()[0]->name, "ktext");
}

TEST_F(PolicyStoreTest, FailedPersistChangesNothing) {
  Daemon daemon(DaemonConfig{});
  PolicyStore store(dir_);
  ASSERT_TRUE(RestorePolicies(&daemon, &store, StateRecovery::kFail).ok());
  ASSERT_TRUE(daemon.ApplyApiPolicy(RuleOf(Ktext()), PolicyPrecondition{}).ok());
  ASSERT_EQ(::mkdir((store.path() + ".tmp").c_str(), 0700), 0);  // every save fails now
  absl::Status s = daemon.ApplyApiPolicy(RuleOf(Lstar()), PolicyPrecondition{}).status();
  ASSERT_FALSE(s.ok());
  EXPECT_THAT(std::string(s.message()), HasSubstr("lstar not applied"));
  s = daemon.RemoveApiPolicy("ktext", PolicyPrecondition{}).status();
  ASSERT_FALSE(s.ok());
  EXPECT_THAT(std::string(s.message()), HasSubstr("ktext not deleted"));
  EXPECT_THAT(Names(&daemon), ::testing::ElementsAre("ktext"));
  ASSERT_EQ(::rmdir((store.path() + ".tmp").c_str()), 0);
  auto loaded = store.Load();
  ASSERT_TRUE(loaded.ok());
  EXPECT_THAT(*loaded, SizeIs(1));
}

TEST_F(PolicyStoreTest, InvalidRuleIsNeverPersisted) {
  Daemon daemon(DaemonConfig{});
  PolicyStore store(dir_);
  ASSERT_TRUE(RestorePolicies(&daemon, &store, StateRecovery::kFail).ok());
  auto rule = std::make_shared<Rule>();  // no name
  EXPECT_EQ(daemon.ApplyApiPolicy(rule, PolicyPrecondition{}).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(::access(store.path().c_str(), F_OK), -1) << "nothing was saved";
}

TEST_F(PolicyStoreTest, CorruptFileStopsRestoreUnlessQuarantined) {
  PolicyStore store(dir_);
  ASSERT_TRUE(store.Save({Ktext()}).ok());
  WriteFile(store.path(), ReadFile(store.path()) + "junk");
  {
    Daemon daemon(DaemonConfig{});
    absl::Status s = RestorePolicies(&daemon, &store, StateRecovery::kFail);
    ASSERT_FALSE(s.ok());
    EXPECT_THAT(std::string(s.message()), HasSubstr(store.path()));
    EXPECT_THAT(std::string(s.message()), HasSubstr("--state_recover=quarantine"));
    EXPECT_THAT(Names(&daemon), SizeIs(0));
  }
  Daemon daemon(DaemonConfig{});
  ASSERT_TRUE(RestorePolicies(&daemon, &store, StateRecovery::kQuarantine).ok());
  EXPECT_THAT(Names(&daemon), SizeIs(0));
  std::vector<std::string> files = ListDir(dir_);
  ASSERT_THAT(files, SizeIs(1));
  EXPECT_THAT(files[0], ::testing::StartsWith("policies.txtpb.corrupt-"));
  EXPECT_THAT(ReadFile(dir_ + "/" + files[0]), ::testing::EndsWith("junk")) << "kept as it was";
  // And the store works again from there.
  ASSERT_TRUE(daemon.ApplyApiPolicy(RuleOf(Lstar()), PolicyPrecondition{}).ok());
  auto loaded = store.Load();
  ASSERT_TRUE(loaded.ok());
  EXPECT_THAT(*loaded, SizeIs(1));
}

}  // namespace
}  // namespace kvmid
