#include "daemon/export/node_name.h"

#include <gtest/gtest.h>
#include <stdlib.h>
#include <unistd.h>

namespace kvmid {
namespace {

TEST(NodeNameTest, EnvironmentWinsOverHostname) {
  ASSERT_EQ(::setenv("NODE_NAME", "worker-7", 1), 0);
  EXPECT_EQ(DefaultNodeName(), "worker-7");
  ASSERT_EQ(::setenv("NODE_NAME", "bad name", 1), 0);  // not a node name: the host name
  char host[256] = {};
  ASSERT_EQ(::gethostname(host, sizeof(host) - 1), 0);
  EXPECT_EQ(DefaultNodeName(), host);
  ASSERT_EQ(::unsetenv("NODE_NAME"), 0);
  EXPECT_EQ(DefaultNodeName(), host);
}

TEST(NodeNameTest, SetChecksAndSets) {
  EXPECT_TRUE(SetNodeName("node-a.example").ok());
  EXPECT_EQ(NodeName(), "node-a.example");
  EXPECT_FALSE(SetNodeName("").ok());
  EXPECT_FALSE(SetNodeName("with space").ok());
  EXPECT_FALSE(SetNodeName("quote\"").ok());
  EXPECT_FALSE(SetNodeName(std::string(kMaxNodeNameBytes + 1, 'a')).ok());
  EXPECT_EQ(NodeName(), "node-a.example") << "a refused name changes nothing";
}

}  // namespace
}  // namespace kvmid
