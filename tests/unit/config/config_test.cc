#include "server/src/config/config.h"

#include <fstream>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "tests/support/test_secrets.h"

namespace tb::config {
namespace {

TEST(ConfigTest, EmptyConfigGivesEmbeddedDefaults) {
  absl::StatusOr<Config> c = ParseConfig("");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->grpc.listen, "127.0.0.1:8443");
  EXPECT_EQ(c->store.url, "sqlite:///var/lib/token-broker/tokens.db");
  // Durable stores hold tokens encrypted: without a key the broker refuses to start.
  EXPECT_EQ(Validate(*c).code(), absl::StatusCode::kInvalidArgument);
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

TEST(ConfigTest, ParsesRefreshSettingsAndRejectsNonsense) {
  absl::StatusOr<Config> c = ParseConfig(R"(
store: {url: "memory:"}
grpc: {max_watch_streams: 50, max_watch_streams_per_caller: 5}
refresh: {margin: 2m, max_jitter: 10s, hot_window: 15m, provider_timeout: 20s,
          caller_refresh_interval: 5s, retry_delay: 10s, max_concurrent: 8, max_min_ttl: 30m,
          max_wait: 20s}
)");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->refresh.hot_window, absl::Minutes(15));
  EXPECT_EQ(c->refresh.max_min_ttl, absl::Minutes(30));
  EXPECT_EQ(c->refresh.max_concurrent, 8);
  EXPECT_EQ(c->grpc.max_watch_streams_per_caller, 5);
  EXPECT_TRUE(Validate(*c).ok());
  EXPECT_EQ(ParseConfig("refresh: {hot_window: soon}").status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ParseConfig("refresh: {max_wiat: 1s}").status().code(),
            absl::StatusCode::kInvalidArgument);
  for (const char* bad : {"{store: {url: 'memory:'}, refresh: {max_concurrent: 0}}",
                          "{store: {url: 'memory:'}, refresh: {max_concurrent: 1001}}",
                          "{store: {url: 'memory:'}, refresh: {provider_timeout: 0s}}",
                          "{store: {url: 'memory:'}, grpc: {max_watch_streams: 5, "
                          "max_watch_streams_per_caller: 6}}"}) {
    absl::StatusOr<Config> parsed = ParseConfig(bad);
    const absl::Status s = parsed.ok() ? Validate(*parsed) : parsed.status();
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << bad;
  }
}

TEST(ConfigTest, StoreUrlAndEncryptionKeys) {
  const std::string keys = testing::NewTestSecret("key-ring");
  absl::StatusOr<Config> c = ParseConfig(
      R"(store: {url: "sqlite:///var/lib/tb/tokens.db", encryption_keys_env: TB_KEYS,
                 pool_size: 8, statement_timeout: 2s})",
      [&](const std::string& name) -> std::optional<std::string> {
        return name == "TB_KEYS" ? std::optional<std::string>(keys) : std::nullopt;
      });
  ASSERT_TRUE(c.ok()) << c.status();
  ASSERT_TRUE(c->store.encryption_keys.has_value());
  EXPECT_EQ(c->store.encryption_keys->Reveal(), keys);
  EXPECT_EQ(c->store.encryption_keys_source, "env TB_KEYS");
  EXPECT_EQ(c->store.pool_size, 8);
  EXPECT_TRUE(Validate(*c).ok());
  for (const char* bad : {"store: {url: 'mysql://x'}", "store: {url: 'sqlite://relative.db'}",
                          "store: {url: 'postgres://db/tb'}"}) {  // the last: no key
    absl::StatusOr<Config> parsed = ParseConfig(bad);
    const absl::Status s = parsed.ok() ? Validate(*parsed) : parsed.status();
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << bad;
  }
  EXPECT_EQ(ParseConfig("store: {encryption_keys_env: NOPE}",
                        [](const std::string&) { return std::nullopt; })
                .status()
                .code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(ConfigTest, RejectsUnknownKeysNamingThem) {
  absl::StatusOr<Config> c = ParseConfig("grpc: {listne: 1.2.3.4:5}");
  ASSERT_EQ(c.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(c.status().message().find("grpc.listne"), std::string::npos);
}

TEST(ConfigTest, RejectsGarbage) {
  for (const char* bad :
       {"grpc: [1, 2", "grpc: 5", "grpc: {threads: many}", "grpc: {listen: nohostport}",
        "http: {threads: 0}", "log: {level: loud}", "store: {url: 'redis://x'}", "- a\n- b",
        "grpc: {listen: 'host:99999'}"}) {
    // Refused when parsed, or at the latest by Validate (which main runs after its flags).
    absl::StatusOr<Config> c = ParseConfig(bad);
    const absl::Status s = c.ok() ? Validate(*c) : c.status();
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << bad;
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

namespace tb::config {
namespace {

EnvLookup Env(std::map<std::string, std::string> vars) {
  return [vars = std::move(vars)](const std::string& name) -> std::optional<std::string> {
    const auto it = vars.find(name);
    return it == vars.end() ? std::nullopt : std::optional<std::string>(it->second);
  };
}

TEST(ConfigProvidersTest, ZendeskPresetWithSecretFromEnvironment) {
  const std::string secret = testing::NewTestSecret("client-secret");
  absl::StatusOr<Config> c = ParseConfig(R"(
public_base_url: https://broker.example.com
providers:
  zendesk:
    preset: zendesk
    client_id: broker
    client_secret_env: ZD_SECRET
    expires_in: 3600
)",
                                         Env({{"ZD_SECRET", secret + "\n"}}));
  ASSERT_TRUE(c.ok()) << c.status();
  const core::ProviderSpec& z = c->providers.at("zendesk");
  EXPECT_EQ(z.client_secret.Reveal(), secret);  // trailing newline trimmed
  EXPECT_EQ(z.expires_in, 3600);
  EXPECT_EQ(z.token_url, "https://{subdomain}.zendesk.com/oauth/tokens");
  EXPECT_EQ(z.body_encoding, core::BodyEncoding::kJson);
}

TEST(ConfigProvidersTest, GenericPresetWithOverridesAndSecretFile) {
  const std::string path = ::testing::TempDir() + "/client_secret";
  const std::string secret = testing::NewTestSecret("client-secret");
  std::ofstream(path) << secret << "\n";
  absl::StatusOr<Config> c = ParseConfig(absl::StrCat(R"(
providers:
  idp:
    preset: generic
    client_id: broker
    client_secret_file: )",
                                                      path, R"(
    authorize_url: https://idp.example/authorize
    token_url: https://idp.example/token
    revoke_url: https://idp.example/revoke
    scopes: [openid, offline_access]
    client_auth: client_secret_post
    pkce: false
    extra_authorize_params: {prompt: consent}
    request_timeout: 10s
)"));
  ASSERT_TRUE(c.ok()) << c.status();
  const core::ProviderSpec& p = c->providers.at("idp");
  EXPECT_EQ(p.client_secret.Reveal(), secret);
  EXPECT_EQ(p.scopes, (std::vector<std::string>{"openid", "offline_access"}));
  EXPECT_EQ(p.client_auth, core::ClientAuth::kSecretPost);
  EXPECT_FALSE(p.pkce);
  EXPECT_EQ(p.extra_authorize_params.at("prompt"), "consent");
  EXPECT_EQ(p.request_timeout, absl::Seconds(10));
}

TEST(ConfigProvidersTest, BadProvidersAreRefusedNamingTheProblem) {
  const auto env = Env({{"S", "secret-value"}});
  const struct {
    const char* yaml;
    const char* mentions;
  } cases[] = {
      {"providers: {z: {preset: zendesk, client_id: a, client_secret_env: S, expires_in: 100}}",
       "expires_in"},
      {"providers: {z: {preset: zendesk, client_id: a, client_secret_env: S, "
       "refresh_token_expires_in: 600}}",
       "refresh_token_expires_in"},
      {"providers: {z: {preset: zendesk, client_id: a, client_secret_env: NOPE}}", "NOPE"},
      {"providers: {z: {preset: zendesk, client_id: a}}", "client secret"},
      {"providers: {z: {preset: okta, client_id: a, client_secret_env: S}}", "preset"},
      {"providers: {z: {preset: zendesk, client_id: a, client_secret_env: S, colour: red}}",
       "providers.z.colour"},
      {"providers: {z: {preset: generic, client_id: a, client_secret_env: S}}", "authorize_url"},
      {"providers: {z: {preset: zendesk, client_id: a, client_secret_env: S, "
       "token_url: 'http://evil.example/t'}}",
       "https"},
      {"providers: {z: {preset: zendesk, client_id: a, client_secret_env: S, "
       "body_encoding: xml}}",
       "body_encoding"},
      {"links: {signing_key_env: S}", "32 bytes"},
      {"public_base_url: ftp://x", "public_base_url"},
  };
  for (const auto& c : cases) {
    absl::StatusOr<Config> r = ParseConfig(c.yaml, env);
    ASSERT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << c.yaml;
    EXPECT_NE(r.status().message().find(c.mentions), std::string::npos)
        << c.yaml << " -> " << r.status().message();
    EXPECT_EQ(r.status().message().find("secret-value"), std::string::npos);
  }
}

TEST(ConfigProvidersTest, LinkSigningKeyFromEnvironment) {
  const std::string key = testing::NewTestSecret("link-key-long-enough-to-be-accepted");
  absl::StatusOr<Config> c =
      ParseConfig("links: {signing_key_env: K, default_ttl: 24h}", Env({{"K", key}}));
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->links.signing_key->Reveal(), key);
  EXPECT_EQ(c->links.default_ttl, absl::Hours(24));
}

}  // namespace
}  // namespace tb::config
