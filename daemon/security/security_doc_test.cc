// docs/SECURITY.md's tables cannot drift from the code: the role of every RPC, the limits with
// their defaults, and the audit record's fields.
#include <absl/strings/numbers.h>
#include <absl/strings/str_cat.h>
#include <absl/strings/str_split.h>
#include <absl/strings/strip.h>
#include <gmock/gmock.h>
#include <google/protobuf/struct.pb.h>
#include <google/protobuf/util/json_util.h>
#include <gtest/gtest.h>

#include <cstdlib>
#include <fstream>
#include <map>
#include <set>
#include <sstream>

#include "daemon/security/audit.h"
#include "daemon/security/authz.h"
#include "daemon/security/limits.h"

namespace kvmid {
namespace security {
namespace {

std::string ReadDoc() {
  const char* srcdir = std::getenv("TEST_SRCDIR");
  const std::string path = absl::StrCat(srcdir ? srcdir : ".", "/kvmid/docs/SECURITY.md");
  std::ifstream in(path);
  EXPECT_TRUE(in.good()) << path;
  std::stringstream b;
  b << in.rdbuf();
  return b.str();
}

// The lines of the section under "## <heading>".
std::vector<std::string> Section(const std::string& doc, const std::string& heading) {
  std::vector<std::string> out;
  bool in = false;
  for (absl::string_view line : absl::StrSplit(doc, '\n')) {
    if (absl::StartsWith(line, "## ")) {
      in = line == "## " + heading;
      continue;
    }
    if (in) out.emplace_back(line);
  }
  EXPECT_FALSE(out.empty()) << "no section " << heading;
  return out;
}

// Cells of a table row "| a | b |", trimmed; empty if not a row.
std::vector<std::string> Cells(absl::string_view line) {
  std::vector<std::string> cells;
  if (!absl::ConsumePrefix(&line, "|") || !absl::ConsumeSuffix(&line, "|")) return cells;
  for (absl::string_view c : absl::StrSplit(line, '|')) {
    cells.emplace_back(absl::StripAsciiWhitespace(c));
  }
  return cells;
}

absl::string_view ScopeName(RpcScope s) {
  switch (s) {
    case RpcScope::kGuest:
      return "guest";
    case RpcScope::kList:
      return "list";
    case RpcScope::kDaemon:
      return "daemon";
  }
  return "?";
}

TEST(SecurityDocTest, RoleTableMatchesTheCode) {
  std::map<std::string, std::vector<std::string>> rows;
  for (const std::string& line : Section(ReadDoc(), "Roles and scopes")) {
    std::vector<std::string> c = Cells(line);
    if (c.size() != 4 || !absl::StartsWith(c[0], "`")) continue;
    std::string name(absl::StripSuffix(absl::StripPrefix(c[0], "`"), "`"));
    EXPECT_TRUE(rows.emplace(name, c).second) << "twice: " << name;
  }
  EXPECT_EQ(rows.size(), RpcTable().size());
  for (const RpcInfo& info : RpcTable()) {
    auto it = rows.find(info.name);
    ASSERT_NE(it, rows.end()) << "docs/SECURITY.md lacks " << info.name;
    EXPECT_EQ(it->second[1], RoleName(info.role)) << info.name;
    EXPECT_EQ(it->second[2], ScopeName(info.scope)) << info.name;
    EXPECT_EQ(it->second[3], info.mutating ? "yes" : "no") << info.name;
  }
}

TEST(SecurityDocTest, LimitTableMatchesTheCode) {
  std::map<std::string, std::vector<std::string>> rows;
  for (const std::string& line : Section(ReadDoc(), "Limits")) {
    std::vector<std::string> c = Cells(line);
    if (c.size() != 4 || !absl::StartsWith(c[0], "`limits.")) continue;
    std::string knob(absl::StripSuffix(absl::StripPrefix(c[0], "`"), "`"));
    EXPECT_TRUE(rows.emplace(knob, c).second) << "twice: " << knob;
  }
  EXPECT_EQ(rows.size(), LimitTable().size());
  const Limits defaults;
  for (const LimitInfo& info : LimitTable()) {
    auto it = rows.find(KnobOf(info.limit));
    ASSERT_NE(it, rows.end()) << "docs/SECURITY.md lacks " << KnobOf(info.limit);
    // "134217728 (128 MiB)": the number first.
    const std::string first = it->second[1].substr(0, it->second[1].find(' '));
    uint64_t documented = 0;
    ASSERT_TRUE(absl::SimpleAtoi(first, &documented)) << it->second[1];
    EXPECT_EQ(documented, defaults.Get(info.limit)) << info.name;
    EXPECT_EQ(it->second[3], info.what) << info.name;
  }
}

TEST(SecurityDocTest, AuditExampleHasTheRecordsFields) {
  const std::vector<std::string> lines = Section(ReadDoc(), "Audit log");
  std::string example;
  for (size_t i = 0; i + 1 < lines.size(); ++i) {
    if (lines[i] == "```json") example = lines[i + 1];
  }
  ASSERT_FALSE(example.empty());
  google::protobuf::Struct doc, code;
  ASSERT_TRUE(google::protobuf::util::JsonStringToMessage(example, &doc).ok()) << example;
  AuditRecord r;
  std::string line = r.ToJson();
  line.pop_back();
  ASSERT_TRUE(google::protobuf::util::JsonStringToMessage(line, &code).ok());
  std::set<std::string> doc_keys, code_keys;
  for (const auto& [k, v] : doc.fields()) doc_keys.insert(k);
  for (const auto& [k, v] : code.fields()) code_keys.insert(k);
  EXPECT_EQ(doc_keys, code_keys);
  // And the field table lists each of them.
  std::set<std::string> table;
  for (const std::string& l : lines) {
    std::vector<std::string> c = Cells(l);
    if (c.size() == 2 && absl::StartsWith(c[0], "`")) {
      table.emplace(absl::StripSuffix(absl::StripPrefix(c[0], "`"), "`"));
    }
  }
  EXPECT_EQ(table, code_keys);
}

}  // namespace
}  // namespace security
}  // namespace kvmid
