// IdentifyCaller on real connections: a gRPC server whose only service answers every call with
// the caller's identity (as the status message), reached over mutual TLS with client
// certificates made by openssl (SPIFFE, DNS-only, CN-only subjects), over plaintext loopback,
// and over the API's UNIX socket (peer credentials).
#include "daemon/security/identity.h"

#include <gmock/gmock.h>
#include <grpcpp/create_channel.h>
#include <grpcpp/generic/async_generic_service.h>
#include <grpcpp/security/credentials.h>
#include <grpcpp/server_builder.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include "daemon/security/credentials.h"
#include "daemon/security/testing/test_certs.h"
#include "daemon/security/unix_listener.h"
#include "proto/kvmi/v1/introspection.grpc.pb.h"

namespace kvmid::security {
namespace {

using ::testing::MatchesRegex;
using ::testing::StartsWith;

// Answers any method with FAILED_PRECONDITION and the caller's identity (or the error).
class WhoAmI : public grpc::CallbackGenericService {
 public:
  grpc::ServerGenericBidiReactor* CreateReactor(
      grpc::GenericCallbackServerContext* context) override {
    class Reactor : public grpc::ServerGenericBidiReactor {
     public:
      explicit Reactor(grpc::GenericCallbackServerContext* context) {
        absl::StatusOr<CallerIdentity> identity = IdentifyCaller(*context);
        Finish(identity.ok()
                   ? grpc::Status(grpc::StatusCode::FAILED_PRECONDITION, identity->ToString())
                   : grpc::Status(grpc::StatusCode::UNAUTHENTICATED,
                                  std::string(identity.status().message())));
      }
      void OnDone() override { delete this; }
    };
    return new Reactor(context);
  }
};

class IdentityTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_TRUE(certs_.Ca("ca").ok());
    ASSERT_TRUE(certs_.Ca("other-ca").ok());
    ASSERT_TRUE(certs_.Leaf("server", "ca", "kvmid", "DNS:localhost,IP:127.0.0.1", true).ok());
    TlsFiles files{certs_.pem("server"), certs_.key("server"), certs_.pem("ca")};
    auto tls = MutualTlsServerCredentials(files);
    ASSERT_TRUE(tls.ok()) << tls.status();
    char dir_template[] = "/tmp/kvmid-id-XXXXXX";
    dir_ = ::mkdtemp(dir_template);
    auto listener = UnixApiListener::Bind(dir_ + "/api.sock", 0660, "");
    ASSERT_TRUE(listener.ok()) << listener.status();
    listener_ = std::move(*listener);

    grpc::ServerBuilder builder;
    builder.AddListeningPort("127.0.0.1:0", *tls, &tls_port_);
    builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &plain_port_);
    builder.RegisterCallbackGenericService(&service_);
    server_ = builder.BuildAndStart();
    ASSERT_NE(server_, nullptr);
    listener_->Start(server_.get());
  }
  void TearDown() override {
    if (listener_) listener_->Stop();
    if (server_) server_->Shutdown();
    ::rmdir(dir_.c_str());
  }

  // The status of one call over `channel`.
  static grpc::Status Call(const std::shared_ptr<grpc::Channel>& channel) {
    auto stub = kvmi::v1::Introspection::NewStub(channel);
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
    kvmi::v1::ListVMsResponse response;
    return stub->ListVMs(&context, {}, &response);
  }

  grpc::Status CallWithCertificate(const std::string& name, const std::string& ca = "ca") {
    grpc::SslCredentialsOptions options;
    options.pem_root_certs = testing::TestCerts::ReadFile(certs_.pem(ca));
    if (!name.empty()) {
      options.pem_private_key = testing::TestCerts::ReadFile(certs_.key(name));
      options.pem_cert_chain = testing::TestCerts::ReadFile(certs_.pem(name));
    }
    return Call(grpc::CreateChannel("127.0.0.1:" + std::to_string(tls_port_),
                                    grpc::SslCredentials(options)));
  }

  testing::TestCerts certs_;
  std::string dir_;
  WhoAmI service_;
  std::unique_ptr<UnixApiListener> listener_;
  std::unique_ptr<grpc::Server> server_;
  int tls_port_ = 0;
  int plain_port_ = 0;
};

TEST_F(IdentityTest, SpiffeIdWinsOverDnsAndCn) {
  ASSERT_TRUE(certs_
                  .Leaf("admin", "ca", "admin-cn",
                        "URI:spiffe://kvmid.test/role/admin,DNS:admin.kvmid.test")
                  .ok());
  grpc::Status status = CallWithCertificate("admin");
  EXPECT_EQ(status.error_code(), grpc::StatusCode::FAILED_PRECONDITION) << status.error_message();
  EXPECT_THAT(status.error_message(),
              MatchesRegex("tls spiffe=spiffe://kvmid.test/role/admin peer=ipv4:127.0.0.1:[0-9]+"));
}

TEST_F(IdentityTest, DnsSanWithoutSpiffeId) {
  ASSERT_TRUE(
      certs_.Leaf("dns", "ca", "dns-cn", "DNS:agent.kvmid.test,URI:https://not.spiffe").ok());
  grpc::Status status = CallWithCertificate("dns");
  EXPECT_THAT(status.error_message(), StartsWith("tls dns=agent.kvmid.test peer=ipv4:"));
}

TEST_F(IdentityTest, CommonNameOnly) {
  ASSERT_TRUE(certs_.Leaf("cn", "ca", "alice", "").ok());
  grpc::Status status = CallWithCertificate("cn");
  EXPECT_THAT(status.error_message(), StartsWith("tls cn=alice peer=ipv4:"));
}

TEST_F(IdentityTest, TwoSpiffeIdsAreNotAnIdentity) {
  // gRPC accepts no SPIFFE ID from a certificate with two; the CN is what is left.
  ASSERT_TRUE(certs_
                  .Leaf("two", "ca", "two-cn",
                        "URI:spiffe://kvmid.test/role/viewer,URI:spiffe://kvmid.test/role/admin")
                  .ok());
  grpc::Status status = CallWithCertificate("two");
  EXPECT_THAT(status.error_message(), StartsWith("tls cn=two-cn peer="));
}

TEST_F(IdentityTest, NoClientCertificateWrongCaOrExpiredNeverReachTheService) {
  ASSERT_TRUE(
      certs_.Leaf("stranger", "other-ca", "stranger", "URI:spiffe://kvmid.test/role/admin").ok());
  ASSERT_TRUE(certs_
                  .Leaf("old", "ca", "old", "URI:spiffe://kvmid.test/role/admin", false,
                        /*expired=*/true)
                  .ok());
  EXPECT_EQ(CallWithCertificate("").error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_EQ(CallWithCertificate("stranger").error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_EQ(CallWithCertificate("old").error_code(), grpc::StatusCode::UNAVAILABLE);
}

TEST_F(IdentityTest, PlaintextIsAnonymous) {
  grpc::Status status = Call(grpc::CreateChannel("127.0.0.1:" + std::to_string(plain_port_),
                                                 grpc::InsecureChannelCredentials()));
  EXPECT_EQ(status.error_code(), grpc::StatusCode::FAILED_PRECONDITION) << status.error_message();
  EXPECT_THAT(status.error_message(), StartsWith("anonymous peer=ipv4:127.0.0.1:"));
}

TEST_F(IdentityTest, UnixCallerIsItsPeerCredentials) {
  grpc::Status status =
      Call(grpc::CreateChannel("unix:" + dir_ + "/api.sock", grpc::InsecureChannelCredentials()));
  EXPECT_EQ(status.error_code(), grpc::StatusCode::FAILED_PRECONDITION) << status.error_message();
  const std::string uid = std::to_string(::getuid()), gid = std::to_string(::getgid()),
                    pid = std::to_string(::getpid());
  // The peer is the socket's path and the credentials, not gRPC's "fd:N".
  EXPECT_EQ(status.error_message(), "unix uid=" + uid + " gid=" + gid + " pid=" + pid +
                                        " peer=unix:" + dir_ + "/api.sock pid=" + pid +
                                        " uid=" + uid + " gid=" + gid);
  EXPECT_EQ(listener_->accepted(), 1u);
}

TEST(UnixPeerTableTest, SetGetEraseByDescriptor) {
  UnixPeerTable& table = UnixPeerTable::Global();
  table.Set(100000, UnixPeer{1, 2, 3, ""});
  ASSERT_TRUE(table.Get(100000).has_value());
  EXPECT_EQ(table.Get(100000)->uid, 1u);
  table.Set(100000, UnixPeer{4, 5, 6, ""});  // a new connection on a reused number
  EXPECT_EQ(table.Get(100000)->pid, 6);
  table.Erase(100000);
  EXPECT_FALSE(table.Get(100000).has_value());
}

TEST(CallerIdentityTest, ToStringNamesIdentityAndPeer) {
  CallerIdentity tls;
  tls.kind = CallerIdentity::Kind::kTls;
  tls.source = CallerIdentity::Source::kDnsSan;
  tls.principal = "a.example";
  tls.peer = "ipv6:[::1]:5";
  EXPECT_EQ(tls.ToString(), "tls dns=a.example peer=ipv6:[::1]:5");
  CallerIdentity unix;
  unix.kind = CallerIdentity::Kind::kUnix;
  unix.unix = UnixPeer{1000, 100, 42, "/run/kvmid/api.sock"};
  unix.peer = UnixPeerName(unix.unix);
  EXPECT_EQ(unix.ToString(),
            "unix uid=1000 gid=100 pid=42 peer=unix:/run/kvmid/api.sock pid=42 uid=1000 gid=100");
  CallerIdentity anonymous;
  anonymous.peer = "ipv4:127.0.0.1:9";
  EXPECT_EQ(anonymous.ToString(), "anonymous peer=ipv4:127.0.0.1:9");
}

}  // namespace
}  // namespace kvmid::security
