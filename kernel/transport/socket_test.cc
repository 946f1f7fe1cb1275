#include "kernel/transport/socket.h"

#include <linux/sockios.h>
#include <stdlib.h>
#include <sys/ioctl.h>
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
  auto unix_ep = ParseEndpoint("unix:/tmp/x.sock");
  ASSERT_TRUE(unix_ep.ok()) << unix_ep.status();
  EXPECT_EQ(unix_ep->family, Endpoint::Family::kUnix);
  EXPECT_EQ(unix_ep->path, "/tmp/x.sock");
  auto vsock_ep = ParseEndpoint("vsock:2:1234");
  ASSERT_TRUE(vsock_ep.ok()) << vsock_ep.status();
  EXPECT_EQ(vsock_ep->cid, 2u);
  EXPECT_EQ(vsock_ep->port, 1234u);
  EXPECT_EQ(vsock_ep->ToString(), "vsock:2:1234");
}

TEST(EndpointTest, RejectsMalformedWithAReason) {
  for (const char* bad : {"", "tcp:1.2.3.4:5", "unix:", "vsock:2", "vsock:x:1",
                          "vsock:1:99999999999", "vsock:-1:2"}) {
    auto ep = ParseEndpoint(bad);
    EXPECT_EQ(ep.status().code(), absl::StatusCode::kInvalidArgument) << bad;
    EXPECT_FALSE(ep.status().message().empty()) << bad;
  }
  auto long_path = ParseEndpoint("unix:/" + std::string(200, 'a'));
  EXPECT_FALSE(long_path.ok());
  EXPECT_NE(long_path.status().message().find("bytes long"), std::string::npos);
}

TEST(SocketTest, UnixRoundTripAcrossPartialWrites) {
  std::string path = TempSocketPath();
  auto listener = ListenUnix(path);
  ASSERT_TRUE(listener.ok()) << listener.status();
  std::vector<uint8_t> sent(256 * 1024);
  for (size_t i = 0; i < sent.size(); ++i) sent[i] = static_cast<uint8_t>(i * 7);
  std::thread writer([&] {
    auto c = ConnectUnix(path);
    ASSERT_TRUE(c.ok()) << c.status();
    // Larger than the socket buffer: WriteAll must wait for POLLOUT and continue.
    EXPECT_TRUE(WriteAll(c->get(), sent.data(), sent.size()).ok());
  });
  UniqueFd server;
  ASSERT_TRUE(Accept(listener->get(), Clock::now() + std::chrono::seconds(10), &server).ok());
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
  auto listener = ListenUnix(TempSocketPath());
  ASSERT_TRUE(listener.ok()) << listener.status();
  EXPECT_EQ(Accept(listener->get(), Clock::now() + std::chrono::milliseconds(20), &none).kind,
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
  auto u = ConnectUnix("/nonexistent/dir/sock");
  EXPECT_EQ(u.status().code(), absl::StatusCode::kNotFound);
  EXPECT_NE(u.status().message().find("/nonexistent/dir/sock"), std::string::npos);
  auto v = ConnectVsock(1, 1);  // local CID 1 port 1: nobody listens, or no vsock
  EXPECT_FALSE(v.ok());
  EXPECT_FALSE(v.status().message().empty());
}

TEST(SocketTest, TryReadAndTryWriteNeverWait) {
  int sv[2];
  ASSERT_EQ(::socketpair(AF_UNIX, SOCK_STREAM, 0, sv), 0);
  UniqueFd a(sv[0]), b(sv[1]);
  uint8_t buf[64];
  size_t got = 99;
  // Nothing there yet: ok, zero bytes, no wait.
  IoResult r = TryRead(a.get(), buf, sizeof(buf), &got);
  EXPECT_TRUE(r.ok());
  EXPECT_EQ(got, 0u);
  // Fill b's send buffer: TryWrite stops short and reports what it wrote.
  std::vector<uint8_t> big(8 << 20, 0x5a);
  size_t sent = 0;
  r = TryWrite(b.get(), big.data(), big.size(), &sent);
  EXPECT_TRUE(r.ok());
  EXPECT_GT(sent, 0u);
  EXPECT_LT(sent, big.size());
  size_t more = 99;
  EXPECT_TRUE(TryWrite(b.get(), big.data(), big.size(), &more).ok());
  EXPECT_EQ(more, 0u);  // full: the caller waits for EPOLLOUT
  // The reader sees the bytes in order, as many as asked at most.
  r = TryRead(a.get(), buf, sizeof(buf), &got);
  EXPECT_TRUE(r.ok());
  EXPECT_EQ(got, sizeof(buf));
  EXPECT_EQ(buf[0], 0x5a);
  // A closed peer: kClosed both ways (no SIGPIPE on write).
  b.Reset();
  size_t drained = 0;
  do {
    r = TryRead(a.get(), buf, sizeof(buf), &got);
    drained += got;
  } while (r.ok() && got > 0);
  EXPECT_EQ(r.kind, IoResult::kClosed);
  EXPECT_EQ(drained + sizeof(buf), sent);
  EXPECT_EQ(TryWrite(a.get(), "x", 1, &sent).kind, IoResult::kClosed);
}

TEST(SocketTest, PeekedBytesStayUntilConsumedAndPeeksContinue) {
  int sv[2];
  ASSERT_EQ(::socketpair(AF_UNIX, SOCK_STREAM, 0, sv), 0);
  UniqueFd a(sv[0]), b(sv[1]);
  ASSERT_TRUE(EnablePeekOffset(a.get()));
  auto queued = [&] {  // b's send-buffer use: what a has not taken yet (with the kernel's overhead)
    int n = -1;
    EXPECT_EQ(::ioctl(b.get(), SIOCOUTQ, &n), 0);
    return n;
  };
  size_t sent = 0;
  ASSERT_TRUE(TryWrite(b.get(), "abc", 3, &sent).ok());
  char buf[16];
  size_t got = 0;
  ASSERT_TRUE(TryPeek(a.get(), buf, sizeof(buf), &got).ok());
  EXPECT_EQ(std::string(buf, got), "abc");
  const int held = queued();
  EXPECT_GT(held, 0);  // still the peer's
  // A second peek continues after the first: nothing new yet, no wait.
  ASSERT_TRUE(TryPeek(a.get(), buf, sizeof(buf), &got).ok());
  EXPECT_EQ(got, 0u);
  ASSERT_TRUE(TryWrite(b.get(), "de", 2, &sent).ok());
  ASSERT_TRUE(TryPeek(a.get(), buf, sizeof(buf), &got).ok());
  EXPECT_EQ(std::string(buf, got), "de");
  // Consuming part of what was peeked frees it for the peer; the next peek still starts after
  // everything peeked.
  ASSERT_TRUE(Consume(a.get(), 3).ok());
  EXPECT_GT(queued(), 0);  // "de" is still there
  EXPECT_LE(queued(), held);
  ASSERT_TRUE(TryWrite(b.get(), "f", 1, &sent).ok());
  ASSERT_TRUE(TryPeek(a.get(), buf, sizeof(buf), &got).ok());
  EXPECT_EQ(std::string(buf, got), "f");
  ASSERT_TRUE(Consume(a.get(), 3).ok());
  EXPECT_EQ(queued(), 0);
  // Consuming more than is there is the caller's bookkeeping error, said as such, not a wait.
  IoResult r = Consume(a.get(), 1);
  EXPECT_EQ(r.kind, IoResult::kError);
  EXPECT_EQ(r.error, EPROTO);
}

}  // namespace
}  // namespace kvmi
