#include "daemon/startup/json_log.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <spdlog/logger.h>
#include <spdlog/sinks/ostream_sink.h>

#include <sstream>

namespace kvmid {
namespace {

using ::testing::HasSubstr;
using ::testing::MatchesRegex;

TEST(JsonLogTest, EscapesWhatJsonNeedsEscaped) {
  EXPECT_EQ(JsonEscape(R"(a "b" \c)"), R"(a \"b\" \\c)");
  EXPECT_EQ(JsonEscape("x\ny\tz\x01"), "x\\ny\\tz\\u0001");
  EXPECT_EQ(JsonEscape("plain"), "plain");
}

TEST(JsonLogTest, FindsTheGuestAWordVmNames) {
  std::string name, uuid;
  ASSERT_TRUE(
      FindGuestInLine("vm web-1 1b4e28ba-2fa1-11d2-883f-0016d3cca427: hooked", &name, &uuid));
  EXPECT_EQ(name, "web-1");
  EXPECT_EQ(uuid, "1b4e28ba-2fa1-11d2-883f-0016d3cca427");
  ASSERT_TRUE(FindGuestInLine(
      "unix handshake from uid 0 pid 7: vm (unnamed) 00000000-0000-0000-0000-000000000000", &name,
      &uuid));
  EXPECT_EQ(name, "(unnamed)");
  EXPECT_FALSE(FindGuestInLine("kvmid listening on /run/kvmid/kvmi.sock", &name, &uuid));
  EXPECT_FALSE(FindGuestInLine("kvm vm web-1 not-a-uuid", &name, &uuid));
  EXPECT_FALSE(FindGuestInLine("fsvm web-1 1b4e28ba-2fa1-11d2-883f-0016d3cca427", &name, &uuid));
}

TEST(JsonLogTest, OneObjectPerLineWithTheGuestsFields) {
  std::ostringstream out;
  auto sink = std::make_shared<spdlog::sinks::ostream_sink_mt>(out);
  sink->set_formatter(JsonLogFormatter());
  spdlog::logger logger("test", sink);
  logger.info("vm web-1 1b4e28ba-2fa1-11d2-883f-0016d3cca427: session closed: \"bye\"");
  logger.warn("stats: 3 events");
  std::string first, second;
  std::istringstream lines(out.str());
  std::getline(lines, first);
  std::getline(lines, second);
  EXPECT_THAT(first, MatchesRegex(R"(\{"time":"[0-9T:.+-]+","level":"info",.*\})"));
  EXPECT_THAT(first, HasSubstr(R"("msg":"vm web-1 1b4e28ba-2fa1-11d2-883f-0016d3cca427: )"
                               R"(session closed: \"bye\"")"));
  EXPECT_THAT(first,
              HasSubstr(R"("vm_name":"web-1","vm_uuid":"1b4e28ba-2fa1-11d2-883f-0016d3cca427"})"));
  EXPECT_THAT(second, HasSubstr(R"("level":"warning","msg":"stats: 3 events"})"));
  EXPECT_THAT(second, ::testing::Not(HasSubstr("vm_uuid")));
}

}  // namespace
}  // namespace kvmid
