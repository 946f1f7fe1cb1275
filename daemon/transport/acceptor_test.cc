#include "daemon/transport/acceptor.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cstring>
#include <future>

#include "daemon/base/mutex.h"
#include "daemon/testing/scripted_host.h"
#include "daemon/testing/wait.h"

namespace kvmid {
namespace {

using testing::WaitUntil;

// Under /tmp: Bazel's TEST_TMPDIR can be longer than sun_path.
std::string SocketPath() {
  static int next = 0;
  return "/tmp/kvmid-acceptor-test." + std::to_string(::getpid()) + "." + std::to_string(next++) +
         ".sock";
}

// Plain POSIX, so the test does not lean on the transport helpers it sits next to.
kvmi::UniqueFd Listen(const std::string& path) {
  ::unlink(path.c_str());
  kvmi::UniqueFd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::strncpy(addr.sun_path, path.c_str(), sizeof(addr.sun_path) - 1);
  if (::bind(fd.get(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0 ||
      ::listen(fd.get(), 16) != 0) {
    return {};
  }
  return fd;
}

kvmi::UniqueFd Dial(const std::string& path) {
  kvmi::UniqueFd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::strncpy(addr.sun_path, path.c_str(), sizeof(addr.sun_path) - 1);
  if (::connect(fd.get(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) return {};
  return fd;
}

void SendAll(int fd, const std::vector<uint8_t>& bytes) {
  size_t sent = 0;
  while (sent < bytes.size()) {
    ssize_t n = ::send(fd, bytes.data() + sent, bytes.size() - sent, MSG_NOSIGNAL);
    if (n <= 0) return;
    sent += static_cast<size_t>(n);
  }
}

// True once the daemon closed `fd` (EOF or reset) within `timeout`, having sent nothing.
bool ClosedWithoutAnswer(int fd, std::chrono::milliseconds timeout = std::chrono::seconds(5)) {
  pollfd p{fd, POLLIN, 0};
  if (::poll(&p, 1, static_cast<int>(timeout.count())) != 1) return false;
  uint8_t byte;
  return ::recv(fd, &byte, 1, 0) <= 0;
}

class AcceptorTest : public ::testing::Test {
 protected:
  void SetUp() override { loop_.Start("acceptor-test"); }
  void TearDown() override {
    if (acceptor_) {
      std::promise<void> stopped;
      loop_.RunInLoop([&] {
        acceptor_->Stop();
        stopped.set_value();
      });
      stopped.get_future().wait();
    }
    loop_.Stop();
    ::unlink(path_.c_str());
  }

  void StartAcceptor(AcceptorOptions options) {
    path_ = SocketPath();
    kvmi::UniqueFd listen_fd = Listen(path_);
    ASSERT_TRUE(listen_fd);
    acceptor_ = std::make_unique<Acceptor>(&loop_, std::move(listen_fd), "unix", options,
                                           [this](AcceptedGuest guest) {
                                             MutexLock lock(&mu_);
                                             accepted_.push_back(std::move(guest));
                                           });
    std::promise<void> started;
    loop_.RunInLoop([&] {
      acceptor_->Start();
      started.set_value();
    });
    started.get_future().wait();
  }
  Acceptor::Stats Stats() {
    std::promise<Acceptor::Stats> stats;
    loop_.RunInLoop([&] { stats.set_value(acceptor_->stats()); });
    return stats.get_future().get();
  }
  size_t accepted_count() {
    MutexLock lock(&mu_);
    return accepted_.size();
  }

  EventLoop loop_;
  std::string path_;
  std::unique_ptr<Acceptor> acceptor_;
  Mutex mu_;
  std::vector<AcceptedGuest> accepted_ ABSL_GUARDED_BY(mu_);
};

kvmi::QemuHello Hello(const std::string& name) {
  kvmi::QemuHello hello;
  hello.uuid[0] = 0x5a;
  hello.uuid[15] = 0xa5;
  hello.name = name;
  hello.start_time = 1234;
  return hello;
}

TEST_F(AcceptorTest, ACompletedHandshakeHandsOverTheGuestAndAnswersWithTheCookieHash) {
  AcceptorOptions options;
  std::array<uint8_t, kvmi::kCookieHashSize> hash{};
  for (size_t i = 0; i < hash.size(); ++i) hash[i] = static_cast<uint8_t>(i + 1);
  options.cookie_hash = hash;
  StartAcceptor(options);
  kvmi::IntrospectorHello answer;
  kvmi::UniqueFd fd = testing::ConnectAsQemu(path_, Hello("web-1"), &answer);
  ASSERT_TRUE(fd);
  EXPECT_EQ(answer.cookie_hash, hash);
  ASSERT_TRUE(WaitUntil([&] { return accepted_count() == 1; }));
  {
    MutexLock lock(&mu_);
    const AcceptedGuest& guest = accepted_[0];
    EXPECT_EQ(guest.identity.name, "web-1");
    EXPECT_EQ(guest.identity.uuid, Hello("").uuid);
    EXPECT_EQ(guest.identity.start_time, 1234);
    EXPECT_EQ(guest.identity.transport, "unix");
    EXPECT_TRUE(guest.fd);
  }
  Acceptor::Stats stats = Stats();
  EXPECT_EQ(stats.accepted, 1u);
  EXPECT_EQ(stats.completed, 1u);
  EXPECT_EQ(stats.rejected, 0u);
}

TEST_F(AcceptorTest, WithoutACookieTheHashIsZero) {
  StartAcceptor(AcceptorOptions{});
  kvmi::IntrospectorHello answer;
  answer.cookie_hash.fill(0xff);
  ASSERT_TRUE(testing::ConnectAsQemu(path_, Hello("web-1"), &answer));
  EXPECT_EQ(answer.cookie_hash, (std::array<uint8_t, kvmi::kCookieHashSize>{}));
}

TEST_F(AcceptorTest, KvmiBytesSentWithTheHandshakeAreKeptForTheSession) {
  StartAcceptor(AcceptorOptions{});
  kvmi::UniqueFd fd = Dial(path_);
  ASSERT_TRUE(fd);
  std::vector<uint8_t> wire;
  kvmi::EncodeQemuHello(Hello("web-1"), &wire);
  const std::vector<uint8_t> early = {1, 2, 3, 4, 5};
  wire.insert(wire.end(), early.begin(), early.end());
  SendAll(fd.get(), wire);
  ASSERT_TRUE(WaitUntil([&] { return accepted_count() == 1; }));
  // Whatever the acceptor did not read stays on the socket: together, exactly the early bytes.
  MutexLock lock(&mu_);
  std::vector<uint8_t> rest = accepted_[0].early_bytes;
  uint8_t buffer[64];
  ssize_t n;
  while ((n = ::recv(accepted_[0].fd.get(), buffer, sizeof(buffer), MSG_DONTWAIT)) > 0) {
    rest.insert(rest.end(), buffer, buffer + n);
  }
  EXPECT_EQ(rest, early);
}

TEST_F(AcceptorTest, GarbageIsRejectedAndClosed) {
  StartAcceptor(AcceptorOptions{});
  kvmi::UniqueFd fd = Dial(path_);
  ASSERT_TRUE(fd);
  // struct_size 7: below what any QEMU sends (at least up to the UUID).
  SendAll(fd.get(), {7, 0, 0, 0, 'j', 'u', 'n', 'k'});
  EXPECT_TRUE(ClosedWithoutAnswer(fd.get()));
  EXPECT_TRUE(WaitUntil([&] { return Stats().rejected == 1; }));
  EXPECT_EQ(accepted_count(), 0u);
}

TEST_F(AcceptorTest, AnOversizedHandshakeIsRejectedAndClosed) {
  StartAcceptor(AcceptorOptions{});
  kvmi::UniqueFd fd = Dial(path_);
  ASSERT_TRUE(fd);
  kvmi::QemuHello hello = Hello("web-1");
  hello.struct_size = kvmi::kQemuHelloMaxSize + 1;
  std::vector<uint8_t> wire;
  kvmi::EncodeQemuHello(hello, &wire);
  SendAll(fd.get(), wire);
  EXPECT_TRUE(ClosedWithoutAnswer(fd.get()));
  EXPECT_EQ(accepted_count(), 0u);
}

TEST_F(AcceptorTest, AStalledHandshakeTimesOut) {
  AcceptorOptions options;
  options.handshake_timeout = std::chrono::milliseconds(100);
  StartAcceptor(options);
  kvmi::UniqueFd fd = Dial(path_);
  ASSERT_TRUE(fd);
  SendAll(fd.get(), {96, 0});  // half of the size field, then nothing
  EXPECT_TRUE(ClosedWithoutAnswer(fd.get()));
  EXPECT_TRUE(WaitUntil([&] { return Stats().rejected == 1; }));
  EXPECT_EQ(accepted_count(), 0u);
}

TEST_F(AcceptorTest, APeerWhoseUidIsNotAllowedIsClosedBeforeItsHandshake) {
  AcceptorOptions options;
  options.allowed_uids = {::getuid() + 1};
  StartAcceptor(options);
  kvmi::IntrospectorHello answer;
  EXPECT_FALSE(testing::ConnectAsQemu(path_, Hello("web-1"), &answer));
  EXPECT_TRUE(WaitUntil([&] { return Stats().rejected == 1; }));
  EXPECT_EQ(accepted_count(), 0u);
}

TEST_F(AcceptorTest, APeerWhoseUidIsAllowedGetsIn) {
  AcceptorOptions options;
  options.allowed_uids = {::getuid() + 1, ::getuid()};
  StartAcceptor(options);
  kvmi::IntrospectorHello answer;
  EXPECT_TRUE(testing::ConnectAsQemu(path_, Hello("web-1"), &answer));
  EXPECT_TRUE(WaitUntil([&] { return accepted_count() == 1; }));
}

}  // namespace
}  // namespace kvmid
