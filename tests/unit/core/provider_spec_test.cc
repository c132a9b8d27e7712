#include "server/src/core/provider_spec.h"

#include "gtest/gtest.h"
#include "server/src/core/provider_presets.h"

namespace tb::core {
namespace {

TEST(ProviderSpecTest, SubdomainValidation) {
  for (const std::string& good :
       std::vector<std::string>{"acme", "a", "acme-eu", "0day", std::string(63, 'a')}) {
    EXPECT_TRUE(ValidateSubdomain(good).ok()) << good;
  }
  for (const std::string& bad :
       std::vector<std::string>{"", "-acme", "Acme", "acme.evil.com", "acme/x", "acme_eu", "a b",
                                "evil.com#", "acme:443", std::string(64, 'a')}) {
    EXPECT_EQ(ValidateSubdomain(bad).code(), absl::StatusCode::kInvalidArgument) << bad;
  }
}

TEST(ProviderSpecTest, ExpandUrlFillsPlaceholders) {
  EXPECT_EQ(*ExpandUrl("https://{subdomain}.zendesk.com/oauth/tokens", {{"subdomain", "acme"}}),
            "https://acme.zendesk.com/oauth/tokens");
  EXPECT_EQ(*ExpandUrl("https://{subdomain}.zendesk.com/api/v2/oauth/tokens/{token_id}.json",
                       {{"subdomain", "acme"}}, {{"token_id", "42"}}),
            "https://acme.zendesk.com/api/v2/oauth/tokens/42.json");
  EXPECT_EQ(*ExpandUrl("https://www.zopim.com/oauth2/token", {}),
            "https://www.zopim.com/oauth2/token");
  EXPECT_EQ(ExpandUrl("https://{subdomain}.zendesk.com/", {}).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ExpandUrl("https://{subdomain.zendesk.com/", {{"subdomain", "a"}}).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(ProviderSpecTest, ConnectionParamsAreCheckedAgainstTheSpec) {
  ProviderSpec zendesk = *PresetSpec("zendesk");
  zendesk.name = "zendesk";
  EXPECT_TRUE(ValidateConnectionParams(zendesk, {{"subdomain", "acme"}}).ok());
  EXPECT_EQ(ValidateConnectionParams(zendesk, {}).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ValidateConnectionParams(zendesk, {{"subdomain", "evil.com/x"}}).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ValidateConnectionParams(zendesk, {{"subdomain", "acme"}, {"host", "x"}}).code(),
            absl::StatusCode::kInvalidArgument);
  ProviderSpec generic = *PresetSpec("generic");
  EXPECT_TRUE(ValidateConnectionParams(generic, {}).ok());
}

ProviderSpec Complete(absl::string_view preset) {
  ProviderSpec s = *PresetSpec(preset);
  s.name = std::string(preset);
  s.client_id = "id";
  s.client_secret = ClientSecret("secret");
  if (preset == "generic") {
    s.authorize_url = "https://idp.example/authorize";
    s.token_url = "https://idp.example/token";
    s.revoke_url = "https://idp.example/revoke";
  }
  return s;
}

TEST(ProviderSpecTest, PresetsAreValidOnceCredentialsAreSet) {
  for (const char* p : {"zendesk", "zendesk-chat", "generic"}) {
    EXPECT_TRUE(ValidateSpec(Complete(p)).ok()) << p << ": " << ValidateSpec(Complete(p));
  }
  EXPECT_EQ(PresetSpec("okta").status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_FALSE(PresetSpec("zendesk-chat")->pkce);
  EXPECT_EQ(PresetSpec("zendesk")->body_encoding, BodyEncoding::kJson);
  EXPECT_EQ(PresetSpec("generic")->client_auth, ClientAuth::kSecretBasic);
}

TEST(ProviderSpecTest, ZendeskLifetimesAreCheckedAgainstZendeskRanges) {
  struct Case {
    int64_t expires_in;
    int64_t refresh_expires_in;
    bool ok;
  };
  for (const Case& c :
       {Case{1800, 2592000, true}, Case{300, 2592000, false}, Case{301, 2592000, true},
        Case{172800, 2592000, false}, Case{172799, 2592000, true}, Case{1800, 604800, false},
        Case{1800, 604801, true}, Case{1800, 7776000, false}, Case{1800, 7775999, true}}) {
    ProviderSpec s = Complete("zendesk");
    s.expires_in = c.expires_in;
    s.refresh_token_expires_in = c.refresh_expires_in;
    EXPECT_EQ(ValidateSpec(s).ok(), c.ok) << c.expires_in << " " << c.refresh_expires_in;
  }
}

TEST(ProviderSpecTest, MissingCredentialsOrPlainHttpAreRejected) {
  ProviderSpec s = Complete("generic");
  s.client_secret = ClientSecret();
  EXPECT_EQ(ValidateSpec(s).code(), absl::StatusCode::kInvalidArgument);
  s = Complete("generic");
  s.token_url = "http://idp.example/token";
  EXPECT_EQ(ValidateSpec(s).code(), absl::StatusCode::kInvalidArgument);
  s.token_url = "http://127.0.0.1:8444/oauth/tokens";  // loopback development provider
  EXPECT_TRUE(ValidateSpec(s).ok());
  s = Complete("generic");
  s.revoke_url.clear();
  EXPECT_EQ(ValidateSpec(s).code(), absl::StatusCode::kInvalidArgument);
}

TEST(ProviderDirectoryTest, ReplaceNamesWhatChangedAndKeepsOldSnapshotsIntact) {
  ProviderSpec zendesk = *PresetSpec("zendesk");
  zendesk.name = "zendesk";
  zendesk.client_id = "one";
  ProviderSpec idp = *PresetSpec("generic");
  idp.name = "idp";
  ProviderDirectory dir({{"zendesk", zendesk}, {"idp", idp}});
  const std::shared_ptr<const ProviderSpec> held = dir.Find("zendesk");  // a flow in progress
  const std::shared_ptr<const ProviderRegistry> before = dir.Snapshot();
  ASSERT_NE(held, nullptr);
  EXPECT_EQ(dir.Find("nope"), nullptr);

  EXPECT_TRUE(dir.Replace({{"zendesk", zendesk}, {"idp", idp}}).empty());  // same definitions
  ProviderSpec rotated = zendesk;
  rotated.client_secret = ClientSecret("new-secret");
  ProviderSpec chat = *PresetSpec("zendesk-chat");
  chat.name = "chat";
  EXPECT_EQ(dir.Replace({{"zendesk", rotated}, {"chat", chat}}),
            (std::vector<std::string>{"chat", "idp", "zendesk"}));  // added, removed, changed
  EXPECT_EQ(dir.Find("zendesk")->client_secret, ClientSecret("new-secret"));
  EXPECT_EQ(dir.Find("idp"), nullptr);
  EXPECT_EQ(held->client_id, "one");  // what was held is untouched
  EXPECT_EQ(held->client_secret, zendesk.client_secret);
  EXPECT_EQ(before->size(), 2u);
  EXPECT_TRUE(before->contains("idp"));
}

TEST(ProviderDirectoryTest, EveryFieldCountsAsAChange) {
  ProviderSpec a = *PresetSpec("generic");
  ProviderSpec b = a;
  EXPECT_TRUE(a == b);
  b.request_timeout += absl::Seconds(1);
  EXPECT_FALSE(a == b);
  b = a;
  b.extra_token_params["audience"] = "x";
  EXPECT_FALSE(a == b);
  b = a;
  b.ca_file = "/etc/other.pem";
  EXPECT_FALSE(a == b);
}

}  // namespace
}  // namespace tb::core
