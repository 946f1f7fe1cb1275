#include "kernel/transport/socket.h"

#include <stdlib.h>
#include <sys/socket.h>

#include <string>
#include <thread>
#include <vector>

#include "gtest/gtest.h"

namespace kvmi {
namespace {

std::string TempSocketPath() {
  // $TEST_TMPDIR is longer than sun_path allows; /tmp is not.
  char dir[] = "/tmp/kvmi-transport-XXXXXX";
  EXPECT_NE(::mkdtemp(dir), nullptr);
  return std::string(dir) + "/s";
}

TEST(EndpointTest, ParsesUnixAndVsock) {
  std::string error;
  auto unix_ep = ParseEndpoint("unix:/tmp/x.sock", &error);
  ASSERT_TRUE(unix_ep.has_value()) << error;
  EXPECT_EQ(unix_ep->family, Endpoint::Family::kUnix);
  EXPECT_EQ(unix_ep->path, "/tmp/x.sock");
  auto vsock_ep = ParseEndpoint("vsock:2:1234", &error);
  ASSERT_TRUE(vsock_ep.has_value()) << error;
  EXPECT_EQ(vsock_ep->cid, 2u);
  EXPECT_EQ(vsock_ep->port, 1234u);
  EXPECT_EQ(vsock_ep->ToString(), "vsock:2:1234");
}

TEST(EndpointTest, RejectsMalformedWithAReason) {
  for (const char* bad : {"", "tcp:1.2.3.4:5", "unix:", "vsock:2", "vsock:x:1",
                          "vsock:1:99999999999", "vsock:-1:2"}) {
    std::string error;
    EXPECT_FALSE(ParseEndpoint(bad, &error).has_value()) << bad;
    EXPECT_FALSE(error.empty()) << bad;
  }
  std::string error;
  EXPECT_FALSE(ParseEndpoint("unix:/" + std::string(200, 'a'), &error).has_value());
  EXPECT_NE(error.find("bytes long"), std::string::npos);
}

TEST(SocketTest, UnixRoundTripAcrossPartialWrites) {
  std::string path = TempSocketPath();
  std::string error;
  UniqueFd listener = ListenUnix(path, &error);
  ASSERT_TRUE(listener) << error;
  std::vector<uint8_t> sent(256 * 1024);
  for (size_t i = 0; i < sent.size(); ++i) sent[i] = static_cast<uint8_t>(i * 7);
  std::thread writer([&] {
    std::string e;
    UniqueFd c = ConnectUnix(path, &e);
    ASSERT_TRUE(c) << e;
    // Larger than the socket buffer: WriteAll must wait for POLLOUT and continue.
    EXPECT_TRUE(WriteAll(c.get(), sent.data(), sent.size()).ok());
  });
  UniqueFd server;
  ASSERT_TRUE(Accept(listener.get(), Clock::now() + std::chrono::seconds(10), &server).ok());
  std::vector<uint8_t> got(sent.size());
  ASSERT_TRUE(
      ReadExact(server.get(), got.data(), got.size(), Clock::now() + std::chrono::seconds(10))
          .ok());
  writer.join();
  EXPECT_EQ(got, sent);
  uint8_t byte;
  EXPECT_EQ(ReadExact(server.get(), &byte, 1).kind, IoResult::kClosed);
}

TEST(SocketTest, DeadlinesExpire) {
  int sv[2];
  ASSERT_EQ(::socketpair(AF_UNIX, SOCK_STREAM, 0, sv), 0);
  UniqueFd a(sv[0]), b(sv[1]);
  uint8_t buf[4];
  auto r = ReadExact(a.get(), buf, sizeof(buf), Clock::now() + std::chrono::milliseconds(20));
  EXPECT_EQ(r.kind, IoResult::kTimeout);
  UniqueFd none;
  std::string error;
  UniqueFd listener = ListenUnix(TempSocketPath(), &error);
  ASSERT_TRUE(listener) << error;
  EXPECT_EQ(Accept(listener.get(), Clock::now() + std::chrono::milliseconds(20), &none).kind,
            IoResult::kTimeout);
}

TEST(SocketTest, ShutdownWakesABlockedReader) {
  int sv[2];
  ASSERT_EQ(::socketpair(AF_UNIX, SOCK_STREAM, 0, sv), 0);
  UniqueFd a(sv[0]), b(sv[1]);
  std::thread reader([&] {
    uint8_t buf[8];
    EXPECT_EQ(ReadExact(a.get(), buf, sizeof(buf)).kind, IoResult::kClosed);
  });
  ::shutdown(a.get(), SHUT_RDWR);
  reader.join();
  EXPECT_EQ(WriteAll(a.get(), "x", 1).kind, IoResult::kClosed);
}

TEST(SocketTest, ConnectFailuresExplainThemselves) {
  std::string error;
  EXPECT_FALSE(ConnectUnix("/nonexistent/dir/sock", &error));
  EXPECT_NE(error.find("/nonexistent/dir/sock"), std::string::npos);
  error.clear();
  UniqueFd v = ConnectVsock(1, 1, &error);  // local CID 1 port 1: nobody listens, or no vsock
  EXPECT_FALSE(v);
  EXPECT_FALSE(error.empty());
}

}  // namespace
}  // namespace kvmi
