#include "server/src/provider/internal/oauth_wire.h"

#include <string>

#include "absl/strings/cord.h"
#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "server/src/core/errors.h"
#include "tests/support/test_secrets.h"

namespace tb::provider::internal {
namespace {

const absl::Time kNow = absl::FromUnixSeconds(1'700'000'000);
const std::vector<std::string> kDefaultScopes = {"read", "write"};

TEST(FormUrlEncodeTest, KeepsUnreservedAndEncodesTheRest) {
  EXPECT_EQ(FormUrlEncode("AZaz09*-._"), "AZaz09*-._");
  EXPECT_EQ(FormUrlEncode("a b"), "a+b");
  EXPECT_EQ(FormUrlEncode("a+b/c=d&e:f~"), "a%2Bb%2Fc%3Dd%26e%3Af%7E");
  EXPECT_EQ(FormUrlEncode("\xc3\xa9"), "%C3%A9");
  EXPECT_EQ(FormUrlEncode(std::string("\0\n", 2)), "%00%0A");
  EXPECT_EQ(FormUrlEncode(""), "");
}

TEST(FormBodyTest, JoinsParamsInOrder) {
  EXPECT_EQ(FormBody({{"grant_type", "authorization_code"},
                      {"redirect_uri", "https://broker.example/oauth/callback?x=1"},
                      {"expires_in", "1800", true}}),
            "grant_type=authorization_code&redirect_uri=https%3A%2F%2Fbroker.example%2Foauth%"
            "2Fcallback%3Fx%3D1&expires_in=1800");
  EXPECT_EQ(FormBody({}), "");
}

TEST(JsonBodyTest, SendsNumbersAsNumbersAndEscapesStrings) {
  EXPECT_EQ(JsonBody({{"grant_type", "refresh_token"},
                      {"refresh_token", "a\"b\\c/d"},
                      {"expires_in", "1800", true},
                      {"odd", "12x", true}}),
            R"({"grant_type":"refresh_token","refresh_token":"a\"b\\c/d","expires_in":1800,)"
            R"("odd":"12x"})");
}

TEST(BasicAuthorizationTest, MatchesRfc6749Example) {
  // RFC 6749 2.3.1's example credentials.
  EXPECT_EQ(BasicAuthorization("s6BhdRkqt3", "7Fjfp0ZBr1KtDRbnfVdmIw"),
            "Basic czZCaGRSa3F0Mzo3RmpmcDBaQnIxS3REUmJuZlZkbUl3");
}

TEST(BasicAuthorizationTest, FormEncodesIdAndSecretBeforeBase64) {
  const std::string secret = tb::testing::NewTestSecret("client-secret");
  std::string decoded;
  const std::string header = BasicAuthorization("my:client id", secret);
  ASSERT_EQ(header.rfind("Basic ", 0), 0u);
  ASSERT_TRUE(absl::Base64Unescape(header.substr(6), &decoded));
  // ':' in the id is encoded so that the first ':' separates id and secret.
  EXPECT_EQ(decoded, absl::StrCat("my%3Aclient+id:", FormUrlEncode(secret)));
}

TEST(ParseTokenResponseTest, ParsesFullZendeskAnswer) {
  const std::string access = tb::testing::NewTestSecret("access");
  const std::string refresh = tb::testing::NewTestSecret("refresh");
  const std::string body = absl::StrCat(R"({"access_token":")", access,
                                        R"(","token_type":"bearer","scope":"read tickets:write",)",
                                        R"("expires_in":1800,"refresh_token":")", refresh,
                                        R"(","refresh_token_expires_in":2592000})");
  absl::StatusOr<core::Grant> g = ParseTokenResponse(body, kDefaultScopes, kNow);
  ASSERT_TRUE(g.ok()) << g.status().code();
  EXPECT_EQ(g->access_token.Reveal(), access);
  EXPECT_EQ(g->token_type, "Bearer");
  EXPECT_EQ(g->scopes, (std::vector<std::string>{"read", "tickets:write"}));
  EXPECT_EQ(g->issued_at, kNow);
  EXPECT_EQ(g->expires_at, kNow + absl::Seconds(1800));
  ASSERT_TRUE(g->refresh_token.has_value());
  EXPECT_EQ(g->refresh_token->Reveal(), refresh);
  EXPECT_EQ(g->generation, 0u);
  EXPECT_FALSE(g->refresh_at.has_value());
  EXPECT_TRUE(g->provider_token_id.empty());
  EXPECT_EQ(g->refresh_token_expires_at, kNow + absl::Seconds(2592000));
}

TEST(ParseTokenResponseTest, RefreshTokenLifetimeNeedsARefreshTokenAndANumber) {
  absl::StatusOr<core::Grant> none = ParseTokenResponse(
      R"({"access_token":"at","refresh_token_expires_in":600})", kDefaultScopes, kNow);
  ASSERT_TRUE(none.ok());
  EXPECT_FALSE(none->refresh_token_expires_at.has_value());  // nothing it could apply to
  EXPECT_EQ(ParseTokenResponse(R"({"access_token":"at","refresh_token":"rt",)"
                               R"("refresh_token_expires_in":"soon"})",
                               kDefaultScopes, kNow)
                .status()
                .code(),
            absl::StatusCode::kUnavailable);
}

TEST(ParseTokenResponseTest, MinimalAnswerUsesDefaults) {
  absl::StatusOr<core::Grant> g =
      ParseTokenResponse(R"({"access_token":"at"})", kDefaultScopes, kNow);
  ASSERT_TRUE(g.ok());
  EXPECT_EQ(g->token_type, "Bearer");
  EXPECT_EQ(g->scopes, kDefaultScopes);
  EXPECT_FALSE(g->expires_at.has_value());
  EXPECT_FALSE(g->refresh_token.has_value());
}

TEST(ParseTokenResponseTest, NullAndEmptyOptionalMembersAreAbsent) {
  absl::StatusOr<core::Grant> g =
      ParseTokenResponse(R"({"access_token":"at","token_type":null,"scope":"","expires_in":null,)"
                         R"("refresh_token":""})",
                         kDefaultScopes, kNow);
  ASSERT_TRUE(g.ok());
  EXPECT_EQ(g->token_type, "Bearer");
  EXPECT_EQ(g->scopes, kDefaultScopes);
  EXPECT_FALSE(g->expires_at.has_value());
  EXPECT_FALSE(g->refresh_token.has_value());
}

TEST(ParseTokenResponseTest, AcceptsExpiresInAsStringOrDouble) {
  absl::StatusOr<core::Grant> g =
      ParseTokenResponse(R"({"access_token":"at","expires_in":"3600"})", {}, kNow);
  ASSERT_TRUE(g.ok());
  EXPECT_EQ(g->expires_at, kNow + absl::Hours(1));
  g = ParseTokenResponse(R"({"access_token":"at","expires_in":60.0})", {}, kNow);
  ASSERT_TRUE(g.ok());
  EXPECT_EQ(g->expires_at, kNow + absl::Minutes(1));
}

TEST(ParseTokenResponseTest, ZeroExpiresInMeansNoExpiry) {
  absl::StatusOr<core::Grant> g =
      ParseTokenResponse(R"({"access_token":"at","expires_in":0})", {}, kNow);
  ASSERT_TRUE(g.ok());
  EXPECT_FALSE(g->expires_at.has_value());
}

TEST(ParseTokenResponseTest, KeepsOtherTokenTypes) {
  absl::StatusOr<core::Grant> g =
      ParseTokenResponse(R"({"access_token":"at","token_type":"BEARER"})", {}, kNow);
  ASSERT_TRUE(g.ok());
  EXPECT_EQ(g->token_type, "Bearer");
  g = ParseTokenResponse(R"({"access_token":"at","token_type":"mac"})", {}, kNow);
  ASSERT_TRUE(g.ok());
  EXPECT_EQ(g->token_type, "mac");
}

TEST(ParseTokenResponseTest, GarbageIsUnavailableWithoutBodyContent) {
  const std::string secret = tb::testing::NewTestSecret("leaky");
  const std::vector<std::string> garbage = {
      "",
      "<html>oops</html>",
      absl::StrCat("not json ", secret),
      R"(["access_token"])",
      R"("at")",
      R"({})",
      R"({"access_token":""})",
      R"({"access_token":42})",
      absl::StrCat(R"({"access_token":")", secret, R"(","expires_in":-5})"),
      absl::StrCat(R"({"access_token":")", secret, R"(","expires_in":"soon"})"),
      absl::StrCat(R"({"access_token":")", secret, R"(","expires_in":true})"),
      absl::StrCat(R"({"access_token":")", secret, R"(","scope":["read"]})"),
      absl::StrCat(R"({"access_token":")", secret, R"(","token_type":7})"),
      absl::StrCat(R"({"access_token":")", secret, R"(","refresh_token":{"x":1}})"),
      absl::StrCat(R"({"access_token":")", secret, R"(",)"),
  };
  for (const std::string& body : garbage) {
    absl::StatusOr<core::Grant> g = ParseTokenResponse(body, kDefaultScopes, kNow);
    ASSERT_FALSE(g.ok()) << "case " << &body - garbage.data();
    EXPECT_EQ(g.status().code(), absl::StatusCode::kUnavailable);
    EXPECT_EQ(std::string(g.status().message()).find("leaky"), std::string::npos);
  }
}

TEST(ParseTokenIdTest, AcceptsNumberOrSafeString) {
  EXPECT_EQ(ParseTokenId(R"({"token":{"id":12345,"token":"x"}})").value_or(""), "12345");
  EXPECT_EQ(ParseTokenId(R"({"token":{"id":"abc-12_3"}})").value_or(""), "abc-12_3");
  for (const char* bad :
       {"", "{}", R"({"token":{}})", R"({"token":{"id":-1}})", R"({"token":{"id":"../x"}})",
        R"({"token":{"id":1.5}})", R"({"token":[1]})"}) {
    EXPECT_EQ(ParseTokenId(bad).status().code(), absl::StatusCode::kUnavailable) << bad;
  }
}

TEST(OAuthErrorCodeTest, ReadsOnlyASafeErrorCode) {
  EXPECT_EQ(OAuthErrorCode(R"({"error":"invalid_grant","error_description":"x"})"),
            "invalid_grant");
  EXPECT_EQ(OAuthErrorCode(R"({"error":"bad code with spaces"})"), "");
  EXPECT_EQ(OAuthErrorCode(R"({"error":{"title":"x"}})"), "");
  EXPECT_EQ(OAuthErrorCode("error=invalid_grant"), "");
  EXPECT_EQ(OAuthErrorCode(""), "");
}

absl::Status Map(int status, absl::string_view body, absl::string_view retry_after = "",
                 Endpoint endpoint = Endpoint::kClientAuthenticated) {
  return ErrorForResponse("provider 'p' refresh", endpoint, status, body, retry_after);
}

TEST(ErrorForResponseTest, InvalidGrantNeedsReauth) {
  for (int status : {400, 401}) {
    const absl::Status s = Map(status, R"({"error":"invalid_grant"})");
    EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition);
    EXPECT_EQ(core::ReasonOf(s), core::Reason::kNeedsReauth);
  }
}

TEST(ErrorForResponseTest, ClientErrorsMarkProviderMisconfigured) {
  for (const char* body : {R"({"error":"invalid_client"})", R"({"error":"unauthorized_client"})"}) {
    const absl::Status s = Map(400, body);
    EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition);
    EXPECT_EQ(core::ReasonOf(s), core::Reason::kProviderMisconfigured);
  }
  // A bare 401 from the token endpoint is a client-authentication failure ...
  EXPECT_EQ(core::ReasonOf(Map(401, "")), core::Reason::kProviderMisconfigured);
  // ... but from a bearer endpoint it is about the access token.
  const absl::Status bearer = Map(401, R"({"error":"invalid_token"})", "", Endpoint::kBearer);
  EXPECT_EQ(bearer.code(), absl::StatusCode::kUnauthenticated);
  EXPECT_EQ(core::ReasonOf(bearer), std::nullopt);
}

TEST(ErrorForResponseTest, OtherClientErrorsAreFailedPreconditionWithoutReason) {
  for (int status : {400, 403, 404, 422}) {
    const absl::Status s = Map(status, R"({"error":"invalid_request"})");
    EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition) << status;
    EXPECT_EQ(core::ReasonOf(s), std::nullopt);
  }
  EXPECT_EQ(Map(302, "").code(), absl::StatusCode::kFailedPrecondition);
}

TEST(ErrorForResponseTest, RateLimitKeepsRetryAfter) {
  const absl::Status s = Map(429, "", "17");
  EXPECT_EQ(s.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(s.GetPayload(kRetryAfterPayloadUrl), absl::Cord("17"));
  EXPECT_FALSE(Map(429, "").GetPayload(kRetryAfterPayloadUrl).has_value());
}

TEST(ErrorForResponseTest, ServerErrorsAndTimeoutsAreUnavailable) {
  for (int status : {408, 500, 502, 503, 504, 100, 0, 600}) {
    EXPECT_EQ(Map(status, R"({"error":"invalid_grant"})").code(), absl::StatusCode::kUnavailable)
        << status;
  }
  EXPECT_EQ(Map(503, "", "30").GetPayload(kRetryAfterPayloadUrl), absl::Cord("30"));
}

TEST(ErrorForResponseTest, MessageCarriesNoBodyContent) {
  const std::string secret = tb::testing::NewTestSecret("description");
  const absl::Status s =
      Map(400, absl::StrCat(R"({"error":"invalid_scope","error_description":")", secret, R"("})"));
  EXPECT_EQ(std::string(s.message()).find("description/"), std::string::npos);
}

}  // namespace
}  // namespace tb::provider::internal
