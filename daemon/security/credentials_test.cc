#include "daemon/security/credentials.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "daemon/security/testing/test_certs.h"

namespace kvmid::security {
namespace {

using ::testing::HasSubstr;

ApiListenOptions Tcp(const std::string& address) {
  ApiListenOptions options;
  options.tcp = address;
  return options;
}

TEST(LoopbackTest, LiteralLoopbackAddressesOnly) {
  EXPECT_TRUE(IsLoopbackHost("127.0.0.1"));
  EXPECT_TRUE(IsLoopbackHost("127.1.2.3"));
  EXPECT_TRUE(IsLoopbackHost("::1"));
  EXPECT_TRUE(IsLoopbackHost("[::1]"));
  EXPECT_TRUE(IsLoopbackHost("::ffff:127.0.0.1"));
  EXPECT_FALSE(IsLoopbackHost("0.0.0.0"));
  EXPECT_FALSE(IsLoopbackHost("::"));
  EXPECT_FALSE(IsLoopbackHost("10.0.0.1"));
  EXPECT_FALSE(IsLoopbackHost("128.0.0.1"));
  EXPECT_FALSE(IsLoopbackHost("::ffff:10.0.0.1"));
  EXPECT_FALSE(IsLoopbackHost("localhost"));  // a name may resolve to anything
  EXPECT_FALSE(IsLoopbackHost(""));
}

TEST(SplitHostPortTest, ParsesAndNamesTheField) {
  auto v4 = SplitHostPort("127.0.0.1:50051", "api_tcp");
  ASSERT_TRUE(v4.ok());
  EXPECT_EQ(v4->first, "127.0.0.1");
  EXPECT_EQ(v4->second, 50051);
  auto v6 = SplitHostPort("[::1]:0", "api_tcp");
  ASSERT_TRUE(v6.ok());
  EXPECT_EQ(v6->first, "::1");
  EXPECT_THAT(SplitHostPort("localhost", "api_tcp").status().message(), HasSubstr("api_tcp"));
  EXPECT_FALSE(SplitHostPort("1.2.3.4:70000", "api_tcp").ok());
  EXPECT_FALSE(SplitHostPort(":50051", "api_tcp").ok());
}

TEST(ValidateTest, TcpNeedsAllThreeTlsFiles) {
  absl::Status status = ValidateListenOptions(Tcp("0.0.0.0:50051"));
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(status.message(), HasSubstr("mutual TLS only"));
  EXPECT_THAT(status.message(), HasSubstr("api_tls_cert, api_tls_key, api_tls_client_ca"));
  ApiListenOptions partial = Tcp("0.0.0.0:50051");
  partial.tls.cert = "/c";
  partial.tls.key = "/k";
  status = ValidateListenOptions(partial);
  EXPECT_THAT(status.message(), HasSubstr("missing api_tls_client_ca"));
  partial.tls.client_ca = "/ca";
  EXPECT_TRUE(ValidateListenOptions(partial).ok());
}

TEST(ValidateTest, PlaintextOnlyOnLoopbackAndOnlyWhenNamed) {
  ApiListenOptions plain = Tcp("127.0.0.1:0");
  plain.tcp_insecure_plaintext = true;
  EXPECT_TRUE(ValidateListenOptions(plain).ok());
  plain.tcp = "[::1]:0";
  EXPECT_TRUE(ValidateListenOptions(plain).ok());
  for (const char* address : {"0.0.0.0:50051", "10.1.2.3:50051", "[::]:50051", "localhost:1"}) {
    plain.tcp = address;
    absl::Status status = ValidateListenOptions(plain);
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << address;
    EXPECT_THAT(status.message(), HasSubstr("only on a loopback address")) << address;
  }
  plain.tcp = "127.0.0.1:0";
  plain.tls.cert = "/c";
  EXPECT_THAT(ValidateListenOptions(plain).message(), HasSubstr("cannot be combined"));
  ApiListenOptions no_tcp;
  no_tcp.unix_socket = "/run/x.sock";
  no_tcp.tcp_insecure_plaintext = true;
  EXPECT_THAT(ValidateListenOptions(no_tcp).message(), HasSubstr("there is no api_tcp"));
  EXPECT_FALSE(ValidateListenOptions(ApiListenOptions()).ok());  // no address at all
}

TEST(ValidateTest, RefreshIntervalIsBounded) {
  ApiListenOptions options;
  options.unix_socket = "/run/x.sock";
  options.tls.refresh_seconds = 0;
  EXPECT_THAT(ValidateListenOptions(options).message(), HasSubstr("api_tls_refresh_seconds"));
  options.tls.refresh_seconds = kMaxTlsRefreshSeconds + 1;
  EXPECT_FALSE(ValidateListenOptions(options).ok());
}

TEST(SocketModeTest, OctalPermissionModesOnly) {
  EXPECT_EQ(*ParseSocketMode("0660", "m"), 0660u);
  EXPECT_EQ(*ParseSocketMode("600", "m"), 0600u);
  EXPECT_FALSE(ParseSocketMode("0888", "m").ok());
  EXPECT_FALSE(ParseSocketMode("01777", "m").ok());
  EXPECT_FALSE(ParseSocketMode("", "m").ok());
  EXPECT_THAT(ParseSocketMode("rw", "api_socket_mode").status().message(),
              HasSubstr("api_socket_mode"));
}

TEST(GroupTest, NamesAndNumbers) {
  EXPECT_EQ(*LookUpGroup("root"), 0u);
  EXPECT_EQ(*LookUpGroup("4242"), 4242u);
  EXPECT_EQ(LookUpGroup("no-such-group-kvmid").status().code(), absl::StatusCode::kNotFound);
}

class TlsFilesTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_TRUE(certs_.Ca("ca").ok());
    ASSERT_TRUE(certs_.Leaf("server", "ca", "kvmid", "DNS:localhost,IP:127.0.0.1", true).ok());
    ASSERT_TRUE(certs_.Leaf("other", "ca", "other", "DNS:other", true).ok());
    files_.cert = certs_.pem("server");
    files_.key = certs_.key("server");
    files_.client_ca = certs_.pem("ca");
  }
  testing::TestCerts certs_;
  TlsFiles files_;
};

TEST_F(TlsFilesTest, GoodFilesMakeCredentials) {
  auto credentials = MutualTlsServerCredentials(files_);
  ASSERT_TRUE(credentials.ok()) << credentials.status();
  EXPECT_NE(*credentials, nullptr);
}

TEST_F(TlsFilesTest, MissingFileIsNamed) {
  files_.client_ca = certs_.dir() + "/nope.pem";
  absl::Status status = MutualTlsServerCredentials(files_).status();
  EXPECT_EQ(status.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(status.message(), HasSubstr("api_tls_client_ca"));
  EXPECT_THAT(status.message(), HasSubstr("nope.pem"));
}

TEST_F(TlsFilesTest, KeyOfAnotherCertificateIsRefused) {
  files_.key = certs_.key("other");
  absl::Status status = MutualTlsServerCredentials(files_).status();
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(status.message(), HasSubstr("does not match the certificate"));
}

TEST_F(TlsFilesTest, NotPemIsRefused) {
  files_.cert = certs_.key("server");  // a key where a certificate belongs
  EXPECT_THAT(MutualTlsServerCredentials(files_).status().message(),
              HasSubstr("no PEM certificate"));
  files_.cert = certs_.pem("server");
  files_.key = certs_.pem("server");
  EXPECT_THAT(MutualTlsServerCredentials(files_).status().message(),
              HasSubstr("no PEM private key"));
}

TEST_F(TlsFilesTest, TcpCredentialsFollowTheOptions) {
  ApiListenOptions options = Tcp("127.0.0.1:0");
  EXPECT_FALSE(TcpServerCredentials(options).ok());
  options.tls = files_;
  EXPECT_TRUE(TcpServerCredentials(options).ok());
  options.tls = TlsFiles();
  options.tcp_insecure_plaintext = true;
  EXPECT_TRUE(TcpServerCredentials(options).ok());
  options.tcp = "0.0.0.0:0";
  EXPECT_FALSE(TcpServerCredentials(options).ok());
}

}  // namespace
}  // namespace kvmid::security
