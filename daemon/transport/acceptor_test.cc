#include "daemon/transport/acceptor.h"

#include <fcntl.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <poll.h>
#include <spdlog/sinks/ringbuffer_sink.h>
#include <spdlog/spdlog.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <future>
#include <thread>

#include "daemon/base/mutex.h"
#include "daemon/testing/scripted_host.h"
#include "daemon/testing/wait.h"

namespace kvmid {
namespace {

using testing::WaitUntil;

// A new path in this process's own directory: a pid alone may repeat in a sandbox (runs side by
// side share /tmp), and a socket path must stay short (sun_path), so not under TEST_TMPDIR.
std::string SocketPath() {
  static char dir_template[] = "/tmp/kvmid-acceptor-test.XXXXXX";  // outlives every atexit call
  static const std::string dir = [] {
    if (::mkdtemp(dir_template) == nullptr) return std::string("/tmp");
    std::atexit([] { std::filesystem::remove_all(dir_template); });
    return std::string(dir_template);
  }();
  static int next = 0;
  return dir + "/" + std::to_string(next++) + ".sock";
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

// A client bound to an abstract UNIX address first, so that the acceptor can tell peers apart by
// getpeername (the tests all run as one uid; see PeerKeyByAddress).
kvmi::UniqueFd DialFrom(const std::string& path, const std::string& abstract_name) {
  kvmi::UniqueFd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  sockaddr_un local{};
  local.sun_family = AF_UNIX;
  std::memcpy(local.sun_path + 1, abstract_name.data(), abstract_name.size());
  socklen_t local_len = offsetof(sockaddr_un, sun_path) + 1 + abstract_name.size();
  if (::bind(fd.get(), reinterpret_cast<sockaddr*>(&local), local_len) != 0) return {};
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::strncpy(addr.sun_path, path.c_str(), sizeof(addr.sun_path) - 1);
  if (::connect(fd.get(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) return {};
  return fd;
}

// The injected peer key: "flood" for clients bound to "\0flood-...", "other" for the rest.
std::string PeerKeyByAddress(int fd) {
  sockaddr_un peer{};
  socklen_t len = sizeof(peer);
  if (::getpeername(fd, reinterpret_cast<sockaddr*>(&peer), &len) != 0) return "other";
  size_t path_len =
      len > offsetof(sockaddr_un, sun_path) ? len - offsetof(sockaddr_un, sun_path) : 0;
  std::string name(peer.sun_path, path_len);
  return name.rfind(std::string("\0flood-", 7), 0) == 0 ? "flood" : "other";
}

// Swaps spdlog's default logger for a ring buffer while alive; counts lines containing a text.
// Stop what logs (StopAcceptor) before it goes: the swap back must not race with a log call.
class CapturedLog {
 public:
  CapturedLog()
      : ring_(std::make_shared<spdlog::sinks::ringbuffer_sink_mt>(4096)),
        previous_(spdlog::default_logger()) {
    spdlog::set_default_logger(std::make_shared<spdlog::logger>("captured", ring_));
  }
  ~CapturedLog() { spdlog::set_default_logger(previous_); }
  size_t Count(const std::string& text) const {
    size_t n = 0;
    for (const std::string& line : ring_->last_formatted()) {
      if (line.find(text) != std::string::npos) ++n;
    }
    return n;
  }

 private:
  std::shared_ptr<spdlog::sinks::ringbuffer_sink_mt> ring_;
  std::shared_ptr<spdlog::logger> previous_;
};

double ProcessCpuSeconds() {
  rusage ru{};
  ::getrusage(RUSAGE_SELF, &ru);
  return ru.ru_utime.tv_sec + ru.ru_stime.tv_sec +
         (ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e6;
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
    StopAcceptor();
    loop_.Stop();
    ::unlink(path_.c_str());
  }

  // Stops the acceptor on its loop and waits: nothing of it logs afterwards.
  void StopAcceptor() {
    if (!acceptor_) return;
    std::promise<void> stopped;
    loop_.RunInLoop([&] {
      acceptor_->Stop();
      stopped.set_value();
    });
    stopped.get_future().wait();
    acceptor_.reset();
  }

  void StartAcceptor(const AcceptorOptions& options) {
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

// Issue 10: one peer opening a connection every millisecond and never finishing its handshake
// holds at most its share of the slots; the rest of its connections are closed at once (with one
// log line per interval), and a guest of another peer still hooks promptly.
TEST_F(AcceptorTest, AFloodFromOnePeerIsCappedAndAnotherPeersGuestStillHooks) {
  constexpr uint64_t kPerPeer = 4;
  constexpr int kFlood = 200;
  CapturedLog log;
  AcceptorOptions options;
  options.max_concurrent_handshakes = 8;  // without per-peer slots the flood would take all 8
  options.handshake_slots_per_peer = kPerPeer;
  options.peer_key_for_test = PeerKeyByAddress;
  StartAcceptor(options);

  std::vector<kvmi::UniqueFd> flood;
  std::atomic<bool> flooding{true};
  // Abstract names are shared by every process of the network namespace: named after this run's
  // socket path (its own directory, see SocketPath), they are this run's own.
  std::thread flooder([&] {
    for (int i = 0; i < kFlood; ++i) {
      kvmi::UniqueFd fd = DialFrom(path_, "flood-" + path_ + "-" + std::to_string(i));
      if (fd) flood.push_back(std::move(fd));
      std::this_thread::sleep_for(std::chrono::milliseconds(1));  // the attacker's pace
    }
    flooding = false;
  });
  // Once the flood holds its slots, a guest from another peer hooks, promptly.
  if (!WaitUntil([&] { return Stats().accepted > 2 * kPerPeer; })) {
    flooder.join();
    FAIL() << "the flood's connections were not accepted (" << flood.size() << " dialled)";
  }
  auto started = std::chrono::steady_clock::now();
  kvmi::IntrospectorHello answer;
  kvmi::UniqueFd guest = testing::ConnectAsQemu(path_, Hello("victim"), &answer);
  EXPECT_TRUE(guest);
  EXPECT_TRUE(WaitUntil([&] { return accepted_count() == 1; }));
  EXPECT_LT(std::chrono::steady_clock::now() - started, std::chrono::seconds(1));
  EXPECT_TRUE(flooding.load()) << "the guest should have hooked during the flood";
  flooder.join();

  ASSERT_EQ(flood.size(), static_cast<size_t>(kFlood));
  ASSERT_TRUE(WaitUntil([&] { return Stats().accepted == kFlood + 1u; }));
  Acceptor::Stats stats = Stats();
  EXPECT_EQ(stats.over_peer_limit, kFlood - kPerPeer);
  EXPECT_EQ(stats.completed, 1u);
  // The first kPerPeer connections still wait in their handshake; the others were closed.
  for (int i = 0; i < kFlood; ++i) {
    pollfd p{flood[i].get(), POLLIN, 0};
    bool closed = ::poll(&p, 1, 0) == 1;
    EXPECT_EQ(closed, i >= static_cast<int>(kPerPeer)) << "flood connection " << i;
  }
  // Rate-limited: one line for the whole flood, naming the peer and the limit.
  EXPECT_EQ(log.Count("handshake_slots_per_peer"), 1u);
  EXPECT_EQ(log.Count("closed: "), 1u);
  StopAcceptor();
}

// Issue 10: at the descriptor limit the listener stays readable; the acceptor must not spin on
// it (CPU, log), and it must accept again once descriptors are free.
TEST_F(AcceptorTest, AtTheDescriptorLimitTheLoopPausesInsteadOfSpinningAndRecovers) {
  CapturedLog log;
  StartAcceptor(AcceptorOptions{});
  // The clients' own sockets first: connect() needs no new descriptor.
  constexpr int kClients = 3;
  std::vector<kvmi::UniqueFd> clients;
  for (int i = 0; i < kClients; ++i) {
    clients.emplace_back(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
    ASSERT_TRUE(clients.back());
  }
  rlimit saved{};
  ASSERT_EQ(::getrlimit(RLIMIT_NOFILE, &saved), 0);
  rlimit low = saved;
  low.rlim_cur = 256;
  ASSERT_EQ(::setrlimit(RLIMIT_NOFILE, &low), 0);
  std::vector<kvmi::UniqueFd> filler;
  for (;;) {
    int fd = ::open("/dev/null", O_RDONLY | O_CLOEXEC);
    if (fd < 0) break;
    filler.emplace_back(fd);
  }
  ASSERT_EQ(errno, EMFILE);

  const double cpu_before = ProcessCpuSeconds();
  const auto wall_before = std::chrono::steady_clock::now();
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::strncpy(addr.sun_path, path_.c_str(), sizeof(addr.sun_path) - 1);
  for (kvmi::UniqueFd& c : clients) {
    ASSERT_EQ(::connect(c.get(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0);
  }
  // Each waiting connection is shed (its peer sees the close), one per pause.
  for (kvmi::UniqueFd& c : clients) EXPECT_TRUE(ClosedWithoutAnswer(c.get()));
  // Then a quiet half second at the limit: ~5 pauses at most, a few ms of CPU.
  std::this_thread::sleep_for(std::chrono::milliseconds(500));  // measuring idleness itself
  const double cpu = ProcessCpuSeconds() - cpu_before;
  const double wall =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - wall_before).count();
  Acceptor::Stats stats = Stats();
  EXPECT_LE(stats.fd_limit_pauses, static_cast<uint64_t>(kClients + 1));
  EXPECT_LT(cpu, 0.25 * wall) << "CPU " << cpu << " s over " << wall << " s";
  EXPECT_LE(log.Count("shedding connections"), 1u);

  // Descriptors freed: the next guest hooks.
  filler.clear();
  ASSERT_EQ(::setrlimit(RLIMIT_NOFILE, &saved), 0);
  kvmi::IntrospectorHello answer;
  EXPECT_TRUE(testing::ConnectAsQemu(path_, Hello("after"), &answer));
  EXPECT_TRUE(WaitUntil([&] { return accepted_count() == 1; }));
  StopAcceptor();
}

}  // namespace
}  // namespace kvmid
