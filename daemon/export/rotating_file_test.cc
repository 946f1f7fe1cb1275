#include "daemon/export/rotating_file.h"

#include <dirent.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdlib>
#include <fstream>
#include <sstream>

namespace kvmid {
namespace {

using ::testing::HasSubstr;

class RotatingFileTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string tmpl =
        std::string(std::getenv("TEST_TMPDIR") ? std::getenv("TEST_TMPDIR") : "/tmp") +
        "/export-XXXXXX";
    ASSERT_NE(::mkdtemp(tmpl.data()), nullptr);
    dir_ = tmpl;
    path_ = dir_ + "/events.jsonl";
  }

  // Every file in the directory: name -> size.
  std::map<std::string, uint64_t> Files() const {
    std::map<std::string, uint64_t> files;
    DIR* d = ::opendir(dir_.c_str());
    while (dirent* e = ::readdir(d)) {
      std::string name = e->d_name;
      if (name == "." || name == "..") continue;
      struct stat st;
      ::stat((dir_ + "/" + name).c_str(), &st);
      files[name] = static_cast<uint64_t>(st.st_size);
    }
    ::closedir(d);
    return files;
  }

  std::string Read(const std::string& name) const {
    std::ifstream in(dir_ + "/" + name);
    std::stringstream s;
    s << in.rdbuf();
    return s.str();
  }

  std::string dir_, path_;
};

std::string Record(int i) {
  std::string r = "{\"n\":" + std::to_string(i) + ",\"pad\":\"";
  r.append(100, 'x');
  return r + "\"}\n";
}

TEST_F(RotatingFileTest, StaysWithinMaxFilesTimesMaxBytes) {
  auto file = RotatingFile::Open({path_, 4096, 3});
  ASSERT_TRUE(file.ok()) << file.status();
  const int kRecords = 1000;  // ~115 KB: many rotations
  for (int i = 0; i < kRecords; ++i) ASSERT_TRUE((*file)->Append(Record(i)).ok());
  ASSERT_TRUE((*file)->Flush().ok());
  auto files = Files();
  EXPECT_EQ(files.size(), 3u);
  uint64_t total = 0;
  for (const auto& [name, size] : files) {
    EXPECT_LE(size, 4096u) << name;
    total += size;
  }
  EXPECT_LE(total, 3u * 4096u);
  EXPECT_GT((*file)->rotations(), 20u);
  EXPECT_TRUE(files.count("events.jsonl") && files.count("events.jsonl.1") &&
              files.count("events.jsonl.2"));
  // Newest in the live file, older ones in .1 then .2, each file whole lines, no gap between.
  std::string all = Read("events.jsonl.2") + Read("events.jsonl.1") + Read("events.jsonl");
  std::istringstream lines(all);
  std::string line;
  int expected = -1;
  while (std::getline(lines, line)) {
    int n = std::stoi(line.substr(5));
    if (expected >= 0) {
      EXPECT_EQ(n, expected) << "records in order, none lost between files";
    }
    expected = n + 1;
    EXPECT_EQ(line.back(), '}');
  }
  EXPECT_EQ(expected, kRecords) << "the newest record is last";
}

TEST_F(RotatingFileTest, AppendsToAnExistingFileAndRotatesIt) {
  {
    std::ofstream out(path_);
    out << "{\"old\":1}\n";
  }
  auto file = RotatingFile::Open({path_, 4096, 2});
  ASSERT_TRUE(file.ok());
  for (int i = 0; i < 40; ++i) ASSERT_TRUE((*file)->Append(Record(i)).ok());
  ASSERT_TRUE((*file)->Flush().ok());
  EXPECT_THAT(Read("events.jsonl.1"), ::testing::StartsWith("{\"old\":1}\n{\"n\":0,"));
}

TEST_F(RotatingFileTest, OneFileOnlyKeepsOnlyTheLiveOne) {
  auto file = RotatingFile::Open({path_, 4096, 1});
  ASSERT_TRUE(file.ok());
  for (int i = 0; i < 200; ++i) ASSERT_TRUE((*file)->Append(Record(i)).ok());
  ASSERT_TRUE((*file)->Flush().ok());
  auto files = Files();
  ASSERT_EQ(files.size(), 1u);
  EXPECT_LE(files["events.jsonl"], 4096u);
}

TEST_F(RotatingFileTest, OversizedRecordIsRefused) {
  auto file = RotatingFile::Open({path_, 4096, 2});
  ASSERT_TRUE(file.ok());
  absl::Status s = (*file)->Append(std::string(5000, 'x') + "\n");
  EXPECT_EQ(s.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ((*file)->oversized(), 1u);
  ASSERT_TRUE((*file)->Flush().ok());
  EXPECT_EQ(Files()["events.jsonl"], 0u);
}

TEST_F(RotatingFileTest, BadOptionsNameTheFlag) {
  auto small = RotatingFile::Open({path_, 100, 2});
  ASSERT_FALSE(small.ok());
  EXPECT_THAT(std::string(small.status().message()), HasSubstr("--export_max_bytes"));
  auto none = RotatingFile::Open({path_, 4096, 0});
  ASSERT_FALSE(none.ok());
  EXPECT_THAT(std::string(none.status().message()), HasSubstr("--export_max_files"));
  auto nowhere = RotatingFile::Open({dir_ + "/no/such/dir/e.jsonl", 4096, 2});
  ASSERT_FALSE(nowhere.ok());
  EXPECT_THAT(std::string(nowhere.status().message()), HasSubstr("/no/such/dir/e.jsonl"));
}

}  // namespace
}  // namespace kvmid
