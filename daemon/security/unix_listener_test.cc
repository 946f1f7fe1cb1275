#include "daemon/security/unix_listener.h"

#include <dirent.h>
#include <fcntl.h>
#include <gmock/gmock.h>
#include <grpcpp/create_channel.h>
#include <grpcpp/create_channel_posix.h>
#include <grpcpp/generic/async_generic_service.h>
#include <grpcpp/server_builder.h>
#include <gtest/gtest.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <fstream>

#include "daemon/base/mutex.h"
#include "daemon/security/identity.h"
#include "daemon/testing/wait.h"
#include "proto/kvmi/v1/introspection.grpc.pb.h"

namespace kvmid::security {
namespace {

using kvmid::testing::WaitUntil;
using ::testing::HasSubstr;
using ::testing::StartsWith;

class UnixListenerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char dir_template[] = "/tmp/kvmid-ul-XXXXXX";
    dir_ = ::mkdtemp(dir_template);
    path_ = dir_ + "/api.sock";
  }
  void TearDown() override {
    ::umask(saved_umask_);
    ::unlink(path_.c_str());
    ::unlink((dir_ + "/file").c_str());
    ::rmdir(dir_.c_str());
  }
  // Entries of the directory other than the socket: the private bind directories must be gone.
  std::vector<std::string> Leftovers() const {
    std::vector<std::string> names;
    DIR* dir = ::opendir(dir_.c_str());
    while (dirent* entry = ::readdir(dir)) {
      std::string name = entry->d_name;
      if (name != "." && name != ".." && name != "api.sock") names.push_back(name);
    }
    ::closedir(dir);
    return names;
  }
  mode_t saved_umask_ = ::umask(022);
  std::string dir_;
  std::string path_;
};

TEST_F(UnixListenerTest, ModeIsExactWhateverTheUmask) {
  ::umask(0);
  auto listener = UnixApiListener::Bind(path_, 0660, "");
  ASSERT_TRUE(listener.ok()) << listener.status();
  struct stat st;
  ASSERT_EQ(::stat(path_.c_str(), &st), 0);
  EXPECT_TRUE(S_ISSOCK(st.st_mode));
  EXPECT_EQ(st.st_mode & 07777, 0660u);  // not world-accessible under umask 000
  EXPECT_THAT(Leftovers(), ::testing::IsEmpty());
  (*listener)->Stop();
  EXPECT_NE(::stat(path_.c_str(), &st), 0);  // removed on stop

  ::umask(0077);  // a stricter umask does not take bits away either
  listener = UnixApiListener::Bind(path_, 0660, "");
  ASSERT_TRUE(listener.ok());
  ASSERT_EQ(::stat(path_.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 07777, 0660u);
}

// The KVMI socket goes through the same helper (kvmid.cc): final mode from the start, a stale
// socket replaced, errors naming its own knobs.
TEST_F(UnixListenerTest, TheSharedHelperBindsTheKvmiSocketWithItsFinalMode) {
  ::umask(0);
  {
    auto stale = BindUnixSocketWithFinalMode(path_, 0600, "", "unix_socket", 16);
    ASSERT_TRUE(stale.ok()) << stale.status();
  }  // closed, the file stays: a previous run's socket
  auto bound = BindUnixSocketWithFinalMode(path_, 0660, "", "unix_socket", SOMAXCONN);
  ASSERT_TRUE(bound.ok()) << bound.status();
  struct stat st;
  ASSERT_EQ(::stat(path_.c_str(), &st), 0);
  EXPECT_TRUE(S_ISSOCK(st.st_mode));
  EXPECT_EQ(st.st_mode & 07777, 0660u);
  EXPECT_EQ(st.st_ino, bound->inode);
  EXPECT_THAT(Leftovers(), ::testing::IsEmpty());
  absl::Status no_group =
      BindUnixSocketWithFinalMode(path_, 0660, "no-such-group-kvmid", "unix_socket", 16).status();
  EXPECT_THAT(std::string(no_group.message()), StartsWith("unix_socket_group: "));
}

TEST_F(UnixListenerTest, OtherModesAndGroup) {
  ::umask(0);
  // A group of ours other than the primary one if there is one (Bazel's sandbox maps few).
  gid_t group = ::getegid();
  gid_t groups[64];
  int count = ::getgroups(64, groups);
  for (int i = 0; i < count; ++i) {
    if (groups[i] != group) group = groups[i];
  }
  auto listener = UnixApiListener::Bind(path_, 0600, std::to_string(group));
  ASSERT_TRUE(listener.ok()) << listener.status();
  struct stat st;
  ASSERT_EQ(::stat(path_.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 07777, 0600u);
  EXPECT_EQ(st.st_gid, group);
}

TEST_F(UnixListenerTest, RefusesBadInputs) {
  EXPECT_EQ(UnixApiListener::Bind(path_, 0660, "no-such-group-kvmid").status().code(),
            absl::StatusCode::kNotFound);
  EXPECT_FALSE(UnixApiListener::Bind(path_, 01777, "").ok());
  EXPECT_FALSE(UnixApiListener::Bind(dir_ + "/", 0660, "").ok());
  std::string long_path = dir_ + "/" + std::string(100, 'x');
  EXPECT_THAT(UnixApiListener::Bind(long_path, 0660, "").status().message(), HasSubstr("too long"));
  std::ofstream(dir_ + "/file") << "data";
  auto status = UnixApiListener::Bind(dir_ + "/file", 0660, "").status();
  EXPECT_THAT(status.message(), HasSubstr("not a socket"));
  std::ifstream kept(dir_ + "/file");
  std::string content;
  kept >> content;
  EXPECT_EQ(content, "data");  // never replaced
  EXPECT_THAT(Leftovers(), ::testing::ElementsAre("file"));
}

TEST_F(UnixListenerTest, StaleSocketIsReplacedAndStopLeavesANewerOne) {
  auto first = UnixApiListener::Bind(path_, 0660, "");
  ASSERT_TRUE(first.ok());
  auto second = UnixApiListener::Bind(path_, 0640, "");  // a restart over a stale socket
  ASSERT_TRUE(second.ok()) << second.status();
  (*first)->Stop();  // the old one must not remove the new socket
  struct stat st;
  ASSERT_EQ(::stat(path_.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 07777, 0640u);
}

// Holds every call open until released; records the descriptor behind each.
class HoldingService : public grpc::CallbackGenericService {
 public:
  grpc::ServerGenericBidiReactor* CreateReactor(
      grpc::GenericCallbackServerContext* context) override {
    auto* reactor = new Reactor(this, context);
    return reactor;
  }

  class Reactor : public grpc::ServerGenericBidiReactor {
   public:
    Reactor(HoldingService* owner, grpc::GenericCallbackServerContext* context) : owner_(owner) {
      MutexLock lock(&owner_->mu_);
      owner_->peers_.push_back(context->peer());
      owner_->reactors_.push_back(this);
    }
    void OnCancel() override { owner_->cancelled_.fetch_add(1); }
    void OnDone() override { delete this; }
    void Release() { Finish(grpc::Status::OK); }

   private:
    HoldingService* owner_;
  };

  std::vector<std::string> peers() {
    MutexLock lock(&mu_);
    return peers_;
  }
  void ReleaseAll() {
    MutexLock lock(&mu_);
    for (Reactor* reactor : reactors_) reactor->Release();
    reactors_.clear();
  }
  std::atomic<int> cancelled_{0};

 private:
  Mutex mu_;
  std::vector<std::string> peers_ ABSL_GUARDED_BY(mu_);
  std::vector<Reactor*> reactors_ ABSL_GUARDED_BY(mu_);
};

int FdOfPeer(const std::string& peer) { return std::stoi(peer.substr(3)); }

// The identity of a UNIX call rests on this: gRPC keeps an adopted descriptor open as long as a
// call of its connection is alive, even after the peer went away, so its number cannot be
// reused (and re-recorded for another peer) under a call that still runs.
TEST_F(UnixListenerTest, DescriptorOutlivesItsCalls) {
  HoldingService service;
  grpc::ServerBuilder builder;
  builder.RegisterCallbackGenericService(&service);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  ASSERT_NE(server, nullptr);
  auto listener = UnixApiListener::Bind(path_, 0660, "");
  ASSERT_TRUE(listener.ok());
  (*listener)->Start(server.get());

  // A client on its own socket, so that the test can cut the connection under the call.
  int client_fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::strcpy(addr.sun_path, path_.c_str());
  ASSERT_EQ(::connect(client_fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0);
  int cut = ::dup(client_fd);
  ::fcntl(client_fd, F_SETFL, ::fcntl(client_fd, F_GETFL) | O_NONBLOCK);
  auto channel = grpc::CreateInsecureChannelFromFd("held", client_fd);
  auto stub = kvmi::v1::Introspection::NewStub(channel);
  grpc::ClientContext context;
  kvmi::v1::ListVMsRequest request;  // both requests outlive their calls (waited for below)
  kvmi::v1::ListVMsResponse response;
  std::atomic<bool> returned{false};
  stub->async()->ListVMs(&context, &request, &response,
                         [&](const grpc::Status&) { returned = true; });
  ASSERT_TRUE(WaitUntil([&] { return service.peers().size() == 1; }));
  std::string peer = service.peers()[0];
  ASSERT_THAT(peer, StartsWith("fd:"));
  int fd = FdOfPeer(peer);
  struct stat before;
  ASSERT_EQ(::fstat(fd, &before), 0);

  ::shutdown(cut, SHUT_RDWR);  // the peer goes away; the server call is cancelled
  ::close(cut);
  ASSERT_TRUE(WaitUntil([&] { return service.cancelled_.load() == 1; }));
  // A new connection now: had the old descriptor been closed, it would take its number.
  auto other = kvmi::v1::Introspection::NewStub(
      grpc::CreateChannel("unix:" + path_, grpc::InsecureChannelCredentials()));
  grpc::ClientContext other_context;
  kvmi::v1::ListVMsResponse other_response;
  std::atomic<bool> other_returned{false};
  other->async()->ListVMs(&other_context, &request, &other_response,
                          [&](const grpc::Status&) { other_returned = true; });
  ASSERT_TRUE(WaitUntil([&] { return service.peers().size() == 2; }));
  EXPECT_NE(service.peers()[1], peer);
  struct stat during;
  ASSERT_EQ(::fstat(fd, &during), 0) << "the call's descriptor was closed under it";
  EXPECT_EQ(during.st_ino, before.st_ino);

  service.ReleaseAll();
  EXPECT_TRUE(WaitUntil([&] { return returned.load() && other_returned.load(); }));
  (*listener)->Stop();
  server->Shutdown();
}

}  // namespace
}  // namespace kvmid::security
