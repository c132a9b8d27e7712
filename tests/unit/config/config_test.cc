#include "server/src/config/config.h"

#include <fstream>

#include "gtest/gtest.h"

namespace tb::config {
namespace {

TEST(ConfigTest, EmptyConfigGivesEmbeddedDefaults) {
  absl::StatusOr<Config> c = ParseConfig("");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->grpc.listen, "127.0.0.1:8443");
  EXPECT_EQ(c->store.url, "memory:");
}

TEST(ConfigTest, ParsesEverySection) {
  absl::StatusOr<Config> c = ParseConfig(R"(
grpc: {listen: "0.0.0.0:9443", probe_listen: "0.0.0.0:9081", threads: 4}
http: {public_listen: "0.0.0.0:80", admin_listen: "[::1]:9090", threads: 2}
store: {url: "memory:"}
log: {level: debug, format: json}
)");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->grpc.listen, "0.0.0.0:9443");
  EXPECT_EQ(c->grpc.threads, 4);
  EXPECT_EQ(c->http.admin_listen, "[::1]:9090");
  EXPECT_EQ(c->log.format, "json");
}

TEST(ConfigTest, RejectsUnknownKeysNamingThem) {
  absl::StatusOr<Config> c = ParseConfig("grpc: {listne: 1.2.3.4:5}");
  ASSERT_EQ(c.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(c.status().message().find("grpc.listne"), std::string::npos);
}

TEST(ConfigTest, RejectsGarbage) {
  for (const char* bad : {"grpc: [1, 2", "grpc: 5", "grpc: {threads: many}",
                          "grpc: {listen: nohostport}", "http: {threads: 0}",
                          "log: {level: loud}", "store: {url: 'redis://x'}", "- a\n- b",
                          "grpc: {listen: 'host:99999'}"}) {
    EXPECT_EQ(ParseConfig(bad).status().code(), absl::StatusCode::kInvalidArgument) << bad;
  }
}

TEST(ConfigTest, HostPortParsing) {
  EXPECT_EQ(ParseHostPort("127.0.0.1:0")->port, 0);
  EXPECT_EQ(ParseHostPort("[::1]:80")->host, "::1");
  EXPECT_FALSE(ParseHostPort(":80").ok());
  EXPECT_FALSE(ParseHostPort("host:").ok());
  EXPECT_FALSE(ParseHostPort("host:-1").ok());
}

TEST(ConfigTest, MissingFileIsNotFound) {
  EXPECT_EQ(LoadConfigFile("/nonexistent/tb.yaml").status().code(), absl::StatusCode::kNotFound);
}

TEST(ConfigTest, FileErrorsNameTheFile) {
  const std::string path = ::testing::TempDir() + "/bad.yaml";
  std::ofstream(path) << "log: {level: loud}\n";
  absl::StatusOr<Config> c = LoadConfigFile(path);
  ASSERT_FALSE(c.ok());
  EXPECT_NE(c.status().message().find(path), std::string::npos);
}

}  // namespace
}  // namespace tb::config
