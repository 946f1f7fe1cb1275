#include "daemon/security/audit.h"

#include <absl/strings/match.h>
#include <absl/strings/str_cat.h>
#include <absl/strings/str_split.h>
#include <gmock/gmock.h>
#include <google/protobuf/struct.pb.h>
#include <google/protobuf/util/json_util.h>
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <fstream>
#include <set>
#include <sstream>
#include <thread>

namespace kvmid {
namespace security {
namespace {

using ::testing::HasSubstr;
using ::testing::MatchesRegex;
using ::testing::Not;

std::string Json(absl::string_view s) {
  std::string out;
  AppendJsonString(s, &out);
  return out;
}

// Parses a JSON value with protobuf's parser (strict JSON, valid UTF-8 required).
google::protobuf::Struct ParseObject(const std::string& json) {
  google::protobuf::Struct st;
  auto status = google::protobuf::util::JsonStringToMessage(json, &st);
  EXPECT_TRUE(status.ok()) << status.ToString() << "\n" << json;
  return st;
}

std::string RoundTrip(absl::string_view s) {
  google::protobuf::Struct st = ParseObject("{\"v\":" + Json(s) + "}");
  return st.fields().at("v").string_value();
}

TEST(JsonStringTest, EscapesWhatJsonRequires) {
  EXPECT_EQ(Json(""), R"("")");
  EXPECT_EQ(Json("plain spiffe://corp/ns/x"), R"("plain spiffe://corp/ns/x")");
  EXPECT_EQ(Json("a\"b\\c"), R"("a\"b\\c")");
  EXPECT_EQ(Json("l1\nl2\r\t"), R"("l1\nl2\r\t")");
  EXPECT_EQ(Json(std::string("\x00\x01\x1f\x7f", 4)), R"("\u0000\u0001\u001f\u007f")");
  EXPECT_EQ(Json("\"},\"kind\":\"admin"), R"("\"},\"kind\":\"admin")");
  EXPECT_EQ(RoundTrip("a\"b\\c\nd\x01"), "a\"b\\c\nd\x01");
}

TEST(JsonStringTest, KeepsValidUtf8) {
  const std::string s = "caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80";  // café € 😀
  EXPECT_EQ(Json(s), "\"" + s + "\"");
  EXPECT_EQ(RoundTrip(s), s);
  // Line separators are escaped.
  EXPECT_EQ(Json("a\xe2\x80\xa8z\xe2\x80\xa9"), R"("a\u2028z\u2029")");
}

TEST(JsonStringTest, ReplacesInvalidUtf8) {
  struct Case {
    std::string in;
    std::string out;
  };
  const Case cases[] = {
      {"\xff", R"("\ufffd")"},
      {"a\x80z", R"("a\ufffdz")"},                            // lone continuation byte
      {"\xc0\x80", R"("\ufffd\ufffd")"},                      // overlong NUL
      {"\xe0\x80\xaf", R"("\ufffd\ufffd\ufffd")"},            // overlong '/'
      {"\xed\xa0\x80", R"("\ufffd\ufffd\ufffd")"},            // surrogate
      {"\xf4\x90\x80\x80", R"("\ufffd\ufffd\ufffd\ufffd")"},  // above U+10FFFF
      {"\xe2\x82", R"("\ufffd\ufffd")"},                      // truncated
      {"\xe2\x82z", R"("\ufffd\ufffdz")"},
      {"\xf8\x88\x80\x80\x80", R"("\ufffd\ufffd\ufffd\ufffd\ufffd")"},
  };
  for (const Case& c : cases) {
    EXPECT_EQ(Json(c.in), c.out);
    RoundTrip(c.in);  // valid JSON and UTF-8
  }
  // Every byte value, in every position, yields a parseable string.
  std::string all;
  for (int i = 0; i < 256; ++i) all.push_back(static_cast<char>(i));
  RoundTrip(all);
  RoundTrip(all.substr(128) + all.substr(0, 128));
}

TEST(AuditArgsTest, ScalarsAndLimits) {
  AuditArgs a;
  a.Uint("size", 16).Hex("gpa", 0x1000).Bool("ok", true).Text("name", "web\"1");
  std::string out;
  a.AppendJson(&out);
  EXPECT_EQ(out, R"({"size":16,"gpa":"0x1000","ok":true,"name":"web\"1"})");

  AuditArgs twice;
  twice.Uint("n", 1).Text("n", "two");
  out.clear();
  twice.AppendJson(&out);
  EXPECT_EQ(out, R"({"n":"two"})");

  AuditArgs many;
  many.Uint("a", 1).Uint("b", 1).Uint("c", 1).Uint("d", 1).Uint("e", 1).Uint("f", 1);
  many.Uint("g", 1).Uint("h", 1).Uint("i", 1).Uint("j", 1).Uint("k", 1).Uint("l", 1);
  many.Uint("m", 1).Uint("n", 1).Uint("o", 1).Uint("p", 1).Uint("q", 1).Uint("r", 1);
  static_assert(AuditArgs::kMaxEntries == 16, "the test adds 18 keys");
  EXPECT_EQ(many.size(), AuditArgs::kMaxEntries);
  EXPECT_TRUE(many.truncated());
  out.clear();
  many.AppendJson(&out);
  EXPECT_THAT(out, HasSubstr("\"truncated\":true"));
  ParseObject(out);

  AuditArgs big;
  big.Text("name", std::string(10000, 'x'));
  out.clear();
  big.AppendJson(&out);
  EXPECT_EQ(out.size(), AuditArgs::kMaxTextBytes + std::string(R"({"name":""})").size());
  // Clipping never cuts a UTF-8 sequence in two.
  AuditArgs euro;
  std::string euros;
  for (int i = 0; i < 200; ++i) euros += "\xe2\x82\xac";
  euro.Text("name", euros);
  out.clear();
  euro.AppendJson(&out);
  EXPECT_THAT(out, Not(HasSubstr("ufffd")));
  ParseObject(out);
}

std::string ArgsJson(const AuditArgs& a) {
  std::string out;
  a.AppendJson(&out);
  ParseObject(out);
  return out;
}

TEST(SummaryTest, NeverCarriesDataOrRegisterValues) {
  constexpr uint64_t kSecret = 0x4142434445464748;
  const std::string secret_dec = absl::StrCat(kSecret);
  auto expect_clean = [&](const std::string& json) {
    EXPECT_THAT(json, Not(HasSubstr("4142434445464748")));
    EXPECT_THAT(json, Not(HasSubstr(secret_dec)));
    EXPECT_THAT(json, Not(HasSubstr("ABCDEFGH")));
    EXPECT_THAT(json, Not(HasSubstr("HGFEDCBA")));
  };

  kvmi::v1::WritePhysicalRequest w;
  w.set_vm("web-1");
  w.set_gpa(0x7000);
  w.set_data("ABCDEFGH-secret");
  std::string json = ArgsJson(SummarizeRequest(w));
  EXPECT_EQ(json, R"({"vm":"web-1","gpa":"0x7000","size":15})");
  expect_clean(json);

  kvmi::v1::SetRegistersRequest sr;
  sr.set_vm("web-1");
  sr.set_vcpu(3);
  sr.mutable_registers()->set_rip(kSecret);
  sr.mutable_registers()->set_rax(kSecret);
  json = ArgsJson(SummarizeRequest(sr));
  EXPECT_EQ(json, R"({"vm":"web-1","vcpu":3})");
  expect_clean(json);
  sr.set_event_id(700);  // the event the registers are for
  json = ArgsJson(SummarizeRequest(sr));
  EXPECT_EQ(json, R"({"vm":"web-1","vcpu":3,"event_id":700})");
  expect_clean(json);

  kvmi::v1::Verdict v;
  v.set_event_id(9);
  v.set_action(kvmi::v1::ACTION_CRASH);
  v.set_new_value(kSecret);
  v.mutable_set_registers()->set_rsp(kSecret);
  v.mutable_pf()->set_ctx_data("ABCDEFGH");
  json = ArgsJson(SummarizeRequest(v));
  EXPECT_THAT(json, HasSubstr(R"("action":"ACTION_CRASH")"));
  EXPECT_THAT(json, HasSubstr(R"("new_value":true)"));
  expect_clean(json);

  // Every inline command, filled with the secret wherever a value fits.
  const auto* oneof = kvmi::v1::Command::descriptor()->FindOneofByName("request");
  for (int i = 0; i < oneof->field_count(); ++i) {
    kvmi::v1::Command c;
    c.set_id(77);
    auto* m = c.GetReflection()->MutableMessage(&c, oneof->field(i));
    const auto* d = m->GetDescriptor();
    for (int f = 0; f < d->field_count(); ++f) {
      const auto* field = d->field(f);
      if (field->is_repeated()) continue;
      if (field->name() == "vm") {
        m->GetReflection()->SetString(m, field, "web-1");
      } else if (field->type() == google::protobuf::FieldDescriptor::TYPE_BYTES) {
        m->GetReflection()->SetString(m, field, "ABCDEFGH");
      } else if (field->message_type() == kvmi::v1::Registers::descriptor()) {
        static_cast<kvmi::v1::Registers*>(m->GetReflection()->MutableMessage(m, field))
            ->set_rip(kSecret);
      }
    }
    json = ArgsJson(SummarizeCommand(c));
    EXPECT_THAT(json, HasSubstr(R"("command_id":77)")) << oneof->field(i)->name();
    EXPECT_THAT(json, HasSubstr(R"("vm":"web-1")")) << oneof->field(i)->name();
    expect_clean(json);
  }

  kvmi::v1::ApplyPolicyRequest ap;
  ap.mutable_policy()->set_name("lstar-locked");
  ap.mutable_policy()->set_description(std::string(5000, 'd'));
  ap.mutable_policy()->mutable_lock_msr()->set_msr(0xc0000082);
  json = ArgsJson(SummarizeRequest(ap));
  EXPECT_THAT(json, HasSubstr(R"("policy":"lstar-locked")"));
  EXPECT_THAT(json, HasSubstr(R"("msr":"0xc0000082")"));
  EXPECT_THAT(json, HasSubstr(R"("description_bytes":5000)"));
  EXPECT_THAT(json, Not(HasSubstr("ddddd")));

  kvmi::v1::Claim claim;
  claim.set_handler_id("h1");
  claim.add_vms("web-1");
  claim.set_deadline_ms(60000);
  claim.set_fallback(kvmi::v1::ACTION_CRASH);
  json = ArgsJson(SummarizeRequest(claim));
  EXPECT_THAT(json, HasSubstr(R"("deadline_ms":60000)"));
  EXPECT_THAT(json, HasSubstr(R"("fallback":"ACTION_CRASH")"));
}

google::protobuf::Struct RecordFields(const AuditRecord& r) {
  const std::string line = r.ToJson();
  EXPECT_EQ(line.back(), '\n');
  EXPECT_EQ(line.find('\n'), line.size() - 1) << "one line per record";
  return ParseObject(line.substr(0, line.size() - 1));
}

TEST(AuditRecordTest, FieldByField) {
  AuditRecord r;
  r.time = absl::FromUnixNanos(1764922336123456789);
  r.caller = Caller::Tls("spiffe://corp/ns/sec/sa/ir", "ipv4:10.0.0.7:41234");
  r.rpc = InfoOf(Rpc::kWritePhysical).name;
  r.guest_uuid = "11111111-1111-1111-1111-111111111111";
  r.guest_name = "web-1";
  r.args.Hex("gpa", 0x1000).Uint("size", 16);
  r.code = absl::StatusCode::kOk;
  r.duration = absl::Microseconds(183);
  const std::string line = r.ToJson();
  EXPECT_EQ(line, R"({"time":"2025-12-05T08:12:16.123456789Z",)"
                  R"("identity":{"kind":"tls","principal":"spiffe://corp/ns/sec/sa/ir"},)"
                  R"("peer":"ipv4:10.0.0.7:41234","rpc":"WritePhysical",)"
                  R"("guest":{"uuid":"11111111-1111-1111-1111-111111111111","name":"web-1"},)"
                  R"("args":{"gpa":"0x1000","size":16},"code":"OK","message":"",)"
                  R"("duration_ns":183000})"
                  "\n");
  auto st = RecordFields(r);
  EXPECT_EQ(st.fields().at("rpc").string_value(), "WritePhysical");

  // Whole seconds still carry nine digits.
  r.time = absl::FromUnixSeconds(1764922336);
  EXPECT_THAT(r.ToJson(), HasSubstr(R"("time":"2025-12-05T08:12:16.000000000Z")"));
}

TEST(AuditRecordTest, DeniedUnixAndAnonymous) {
  AuditRecord r;
  r.caller = Caller::Unix(1000, 1000, 4242, "unix:");
  r.rpc = "UnhookVM";
  r.code = absl::StatusCode::kPermissionDenied;
  r.message = "UnhookVM on guest web-1: needs role \"admin\"";
  auto st = RecordFields(r);
  const auto& id = st.fields().at("identity").struct_value().fields();
  EXPECT_EQ(id.at("kind").string_value(), "unix");
  EXPECT_EQ(id.at("uid").number_value(), 1000);
  EXPECT_EQ(id.at("gid").number_value(), 1000);
  EXPECT_EQ(id.at("pid").number_value(), 4242);
  EXPECT_EQ(st.fields().at("code").string_value(), "PERMISSION_DENIED");
  EXPECT_EQ(st.fields().at("message").string_value(), r.message);
  EXPECT_THAT(st.fields().at("time").string_value(),
              MatchesRegex("[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\\.[0-9]{9}Z"));

  r.caller = Caller::None("ipv6:[::1]:5");
  r.code = absl::StatusCode::kUnauthenticated;
  st = RecordFields(r);
  EXPECT_EQ(st.fields().at("identity").struct_value().fields().at("kind").string_value(), "none");
  EXPECT_EQ(st.fields().at("code").string_value(), "UNAUTHENTICATED");
}

TEST(AuditRecordTest, HostileIdentityStaysOneValidLine) {
  AuditRecord r;
  const std::string forged = "spiffe://x/\"},\"code\":\"OK\"\n{\"forged\":1\x01\x1b[31m";
  const std::string principal = forged + "\xff\xfe" + std::string(1, '\0') + "z";
  r.caller = Caller::Tls(principal, "ipv4:1.2.3.4:5\n");
  r.rpc = "ApplyPolicy";
  r.guest_name = "g\"\n";
  r.code = absl::StatusCode::kPermissionDenied;
  auto st = RecordFields(r);
  EXPECT_EQ(st.fields().size(), 9u);  // nothing forged
  EXPECT_EQ(st.fields().at("code").string_value(), "PERMISSION_DENIED");
  const std::string got =
      st.fields().at("identity").struct_value().fields().at("principal").string_value();
  EXPECT_EQ(got, forged + "\xef\xbf\xbd\xef\xbf\xbd" + std::string(1, '\0') + "z");
  EXPECT_EQ(st.fields().at("guest").struct_value().fields().at("name").string_value(), "g\"\n");
  EXPECT_EQ(st.fields().at("peer").string_value(), "ipv4:1.2.3.4:5\n");
}

class AuditLogTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const char* tmp = std::getenv("TEST_TMPDIR");
    dir_ = absl::StrCat(tmp ? tmp : "/tmp", "/audit_", ::getpid(), "_",
                        ::testing::UnitTest::GetInstance()->current_test_info()->name());
    ASSERT_EQ(::mkdir(dir_.c_str(), 0700), 0) << dir_;
    path_ = dir_ + "/audit.log";
  }
  void TearDown() override { (void)!std::system(("rm -rf '" + dir_ + "'").c_str()); }

  static std::vector<std::string> Lines(const std::string& path) {
    std::ifstream in(path);
    std::stringstream b;
    b << in.rdbuf();
    std::vector<std::string> lines = absl::StrSplit(b.str(), '\n');
    EXPECT_FALSE(lines.empty());
    EXPECT_EQ(lines.back(), "") << "the file ends with a newline";
    lines.pop_back();
    return lines;
  }

  static AuditRecord Record(const char* rpc, uint64_t n) {
    AuditRecord r;
    r.caller = Caller::Unix(0, 0, 1);
    r.rpc = rpc;
    r.args.Uint("n", n);
    return r;
  }

  std::string dir_;
  std::string path_;
};

TEST_F(AuditLogTest, AppendsOneLinePerRecord) {
  {
    auto log = AuditLog::Open(path_);
    ASSERT_TRUE(log.ok()) << log.status();
    EXPECT_TRUE((*log)->Healthy());
    EXPECT_TRUE((*log)->UnavailableStatus().ok());
    ASSERT_TRUE((*log)->Write(Record("PauseVCPU", 1)).ok());
    ASSERT_TRUE((*log)->Write(Record("ResumeVCPU", 2)).ok());
  }
  struct stat st;
  ASSERT_EQ(::stat(path_.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0600u);
  // Reopening appends; it never truncates.
  auto log = AuditLog::Open(path_);
  ASSERT_TRUE(log.ok());
  ASSERT_TRUE((*log)->Write(Record("UnhookVM", 3)).ok());
  auto lines = Lines(path_);
  ASSERT_EQ(lines.size(), 3u);
  EXPECT_EQ(ParseObject(lines[0]).fields().at("rpc").string_value(), "PauseVCPU");
  EXPECT_EQ(ParseObject(lines[2]).fields().at("rpc").string_value(), "UnhookVM");
}

TEST_F(AuditLogTest, ConcurrentWritersNeverInterleave) {
  auto log = AuditLog::Open(path_);
  ASSERT_TRUE(log.ok());
  constexpr int kThreads = 4, kEach = 250;
  std::vector<std::thread> threads;
  threads.reserve(kThreads);
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < kEach; ++i) {
        AuditRecord r = Record("SetPageAccess", t * kEach + i);
        r.guest_name = std::string(100 + i, 'g');
        EXPECT_TRUE((*log)->Write(r).ok());
      }
    });
  }
  for (int i = 0; i < 20; ++i) EXPECT_TRUE((*log)->Reopen().ok());
  for (auto& t : threads) t.join();
  auto lines = Lines(path_);
  ASSERT_EQ(lines.size(), static_cast<size_t>(kThreads * kEach));
  // Each line whole.
  std::set<int> seen;
  for (const auto& l : lines) {
    ASSERT_TRUE(absl::StartsWith(l, R"({"time":")")) << l;
    ASSERT_TRUE(absl::EndsWith(l, "}")) << l;
    const size_t at = l.find(R"("args":{"n":)");
    ASSERT_NE(at, std::string::npos) << l;
    seen.insert(std::atoi(l.c_str() + at + std::strlen(R"("args":{"n":)")));
  }
  EXPECT_EQ(seen.size(), static_cast<size_t>(kThreads * kEach));
}

TEST_F(AuditLogTest, ReopenAfterRotation) {
  auto log = AuditLog::Open(path_);
  ASSERT_TRUE(log.ok());
  ASSERT_TRUE((*log)->Write(Record("PauseVCPU", 1)).ok());
  ASSERT_EQ(::rename(path_.c_str(), (path_ + ".1").c_str()), 0);  // logrotate
  ASSERT_TRUE((*log)->Write(Record("PauseVCPU", 2)).ok());        // still the old file
  ASSERT_TRUE((*log)->Reopen().ok());                             // SIGHUP
  ASSERT_TRUE((*log)->Write(Record("PauseVCPU", 3)).ok());
  EXPECT_EQ(Lines(path_ + ".1").size(), 2u);
  ASSERT_EQ(Lines(path_).size(), 1u);
  EXPECT_THAT(Lines(path_)[0], HasSubstr(R"("n":3)"));
}

TEST_F(AuditLogTest, RemovedFileIsRecreated) {
  auto log = AuditLog::Open(path_);
  ASSERT_TRUE(log.ok());
  ASSERT_EQ(::unlink(path_.c_str()), 0);
  ASSERT_TRUE((*log)->Write(Record("PauseVCPU", 1)).ok());
  EXPECT_EQ(Lines(path_).size(), 1u);
}

TEST_F(AuditLogTest, RemovedAndNotRecreatableFailsLoudlyThenRecovers) {
  const std::string sub = dir_ + "/sub";
  ASSERT_EQ(::mkdir(sub.c_str(), 0700), 0);
  const std::string path = sub + "/audit.log";
  auto log = AuditLog::Open(path);
  ASSERT_TRUE(log.ok());
  ASSERT_EQ(::unlink(path.c_str()), 0);
  ASSERT_EQ(::rmdir(sub.c_str()), 0);
  absl::Status s = (*log)->Write(Record("WritePhysical", 1));
  EXPECT_EQ(s.code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(s.message(), HasSubstr(path));
  EXPECT_THAT(s.message(), HasSubstr("cannot be recreated"));
  EXPECT_FALSE((*log)->Healthy());
  absl::Status refuse = (*log)->UnavailableStatus();
  EXPECT_EQ(refuse.code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(refuse.message(), HasSubstr("cannot be recreated"));
  EXPECT_EQ((*log)->Reopen().code(), absl::StatusCode::kUnavailable);
  EXPECT_FALSE((*log)->Healthy());
  // The directory comes back: the next write (the refusal's own record) heals it.
  ASSERT_EQ(::mkdir(sub.c_str(), 0700), 0);
  EXPECT_TRUE((*log)->Write(Record("WritePhysical", 2)).ok());
  EXPECT_TRUE((*log)->Healthy());
  EXPECT_EQ(Lines(path).size(), 1u);
}

TEST_F(AuditLogTest, FullDiskFailsWithUnavailable) {
  auto log = AuditLog::Open("/dev/full");
  ASSERT_TRUE(log.ok()) << log.status();
  EXPECT_TRUE((*log)->Healthy());
  absl::Status s = (*log)->Write(Record("ApplyPolicy", 1));
  EXPECT_EQ(s.code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(s.message(), HasSubstr("/dev/full"));
  EXPECT_THAT(s.message(), HasSubstr("No space left"));
  EXPECT_FALSE((*log)->Healthy());
  EXPECT_THAT((*log)->UnavailableStatus().message(), HasSubstr("No space left"));
  // Still failing: every record is refused, none is dropped silently.
  EXPECT_FALSE((*log)->Write(Record("ApplyPolicy", 2)).ok());
  // A reopen clears the state, the next failing write sets it again.
  EXPECT_TRUE((*log)->Reopen().ok());
  EXPECT_FALSE((*log)->Write(Record("ApplyPolicy", 3)).ok());
  EXPECT_FALSE((*log)->Healthy());
}

TEST_F(AuditLogTest, OpenErrors) {
  EXPECT_EQ(AuditLog::Open("").status().code(), absl::StatusCode::kInvalidArgument);
  auto s = AuditLog::Open(dir_ + "/missing/audit.log").status();
  EXPECT_EQ(s.code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(s.message(), HasSubstr("missing/audit.log"));
}

}  // namespace
}  // namespace security
}  // namespace kvmid
