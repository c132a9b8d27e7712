#include "tests/fake_provider/fake_provider.h"

#include <openssl/sha.h>

#include <atomic>
#include <chrono>
#include <fstream>
#include <map>
#include <memory>
#include <optional>
#include <sstream>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include <boost/asio/connect.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/ssl.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <boost/json.hpp>
#include <boost/url/parse.hpp>

#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/fake_provider/test_ca.h"
#include "tests/support/test_secrets.h"

namespace tb::testing {
namespace {

namespace beast = boost::beast;
namespace bhttp = boost::beast::http;
namespace net = boost::asio;
namespace ssl = boost::asio::ssl;
namespace json = boost::json;
using tcp = net::ip::tcp;
using ::testing::HasSubstr;
using ::testing::Not;

constexpr char kClientId[] = "broker-client";
constexpr char kRedirectUri[] = "https://broker.example/oauth/callback";

struct HttpResult {
  int status = 0;
  std::map<std::string, std::string> headers;  // names lower-cased
  std::string body;

  std::string header(const std::string& name) const {
    const auto it = headers.find(name);
    return it == headers.end() ? "" : it->second;
  }
  json::value Json() const {
    json::error_code ec;
    json::value v = json::parse(body, ec);
    return ec ? json::value() : v;
  }
  std::string JsonString(const char* key) const {
    const json::value v = Json();
    if (!v.is_object() || !v.as_object().contains(key) || !v.as_object().at(key).is_string()) {
      return "";
    }
    const json::string& s = v.as_object().at(key).get_string();
    return std::string(s.data(), s.size());
  }
  bool Has(const char* key) const { return Json().is_object() && Json().as_object().contains(key); }
};

// A small synchronous HTTPS/1.1 client that verifies the server against the test CA and the
// host name, and keeps its connection open between requests (keep-alive), reconnecting only when
// the server closed it. Test-only: the production client lives in server/src/provider.
class HttpsClient {
 public:
  HttpsClient(std::string ca_file, int port, std::string verify_host = "127.0.0.1")
      : ca_file_(std::move(ca_file)), port_(port), verify_host_(std::move(verify_host)) {}

  ~HttpsClient() { Disconnect(); }

  // Transport failures come back as status -1 with the error in `body`.
  HttpResult Send(bhttp::verb method, const std::string& target,
                  const std::vector<std::pair<std::string, std::string>>& headers = {},
                  const std::string& body = "") {
    HttpResult out;
    beast::error_code ec;
    if (stream_ == nullptr) {
      if (ec = Connect(); ec) {
        out.status = -1;
        out.body = absl::StrCat("connect: ", ec.message());
        return out;
      }
    }
    bhttp::request<bhttp::string_body> req(method, target, 11);
    req.set(bhttp::field::host, absl::StrCat(verify_host_, ":", port_));
    for (const auto& [name, value] : headers) {
      req.set(name, value);
    }
    if (!body.empty() || method == bhttp::verb::post) {
      req.body() = body;
      req.prepare_payload();
    }
    req.keep_alive(true);
    bhttp::write(*stream_, req, ec);
    bhttp::response<bhttp::string_body> res;
    if (!ec) {
      bhttp::read(*stream_, buffer_, res, ec);
    }
    if (ec) {
      Disconnect();
      out.status = -1;
      out.body = ec.message();
      return out;
    }
    out.status = static_cast<int>(res.result_int());
    for (const auto& field : res) {
      std::string name(field.name_string().data(), field.name_string().size());
      for (char& c : name) {
        c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
      }
      out.headers[name] = std::string(field.value().data(), field.value().size());
    }
    out.body = res.body();
    if (!res.keep_alive()) {
      Disconnect();
    }
    return out;
  }

  int connects() const { return connects_; }

  // Disconnects without TLS close_notify (the server copes with either).
  void Disconnect() {
    if (stream_ != nullptr) {
      beast::error_code ignored;
      stream_->next_layer().close(ignored);
      stream_.reset();
    }
    buffer_.clear();
  }

 private:
  beast::error_code Connect() {
    beast::error_code ec;
    ctx_.load_verify_file(ca_file_, ec);
    if (ec) {
      return ec;
    }
    ctx_.set_verify_mode(ssl::verify_peer, ec);
    if (ec) {
      return ec;
    }
    stream_ = std::make_unique<ssl::stream<tcp::socket>>(ioc_, ctx_);
    // SNI carries host names only, never IP literals (RFC 6066 3).
    if (verify_host_ != "127.0.0.1" &&
        !SSL_set_tlsext_host_name(stream_->native_handle(), verify_host_.c_str())) {
      return net::error::invalid_argument;
    }
    stream_->set_verify_callback(ssl::host_name_verification(verify_host_), ec);
    if (ec) {
      return ec;
    }
    const tcp::endpoint ep(net::ip::make_address("127.0.0.1"), static_cast<uint16_t>(port_));
    stream_->next_layer().connect(ep, ec);
    if (!ec) {
      stream_->handshake(ssl::stream_base::client, ec);
    }
    if (ec) {
      Disconnect();
      return ec;
    }
    ++connects_;
    return ec;
  }

  std::string ca_file_;
  int port_;
  std::string verify_host_;
  net::io_context ioc_;
  ssl::context ctx_{ssl::context::tls_client};
  std::unique_ptr<ssl::stream<tcp::socket>> stream_;
  beast::flat_buffer buffer_;
  int connects_ = 0;
};

std::string FormEncode(const std::vector<std::pair<std::string, std::string>>& params) {
  std::string out;
  for (const auto& [name, value] : params) {
    absl::StrAppend(&out, out.empty() ? "" : "&", name, "=");
    for (const char c : value) {
      const auto u = static_cast<unsigned char>(c);
      if (std::isalnum(u) || c == '-' || c == '.' || c == '_' || c == '~') {
        out += c;
      } else if (c == ' ') {
        out += '+';
      } else {
        static constexpr char kHex[] = "0123456789ABCDEF";
        out += '%';
        out += kHex[u >> 4];
        out += kHex[u & 15];
      }
    }
  }
  return out;
}

std::string JsonBody(const std::vector<std::pair<std::string, json::value>>& fields) {
  json::object o;
  for (const auto& [name, value] : fields) {
    o[name] = value;
  }
  return json::serialize(o);
}

std::string S256(const std::string& verifier) {
  unsigned char digest[SHA256_DIGEST_LENGTH];
  SHA256(reinterpret_cast<const unsigned char*>(verifier.data()), verifier.size(), digest);
  std::string b64 = absl::WebSafeBase64Escape(
      absl::string_view(reinterpret_cast<const char*>(digest), sizeof digest));
  return b64;
}

// Query parameters of a redirect's Location.
std::map<std::string, std::string> LocationParams(const std::string& location) {
  std::map<std::string, std::string> out;
  const auto url = boost::urls::parse_uri(location);
  if (!url) {
    return out;
  }
  boost::urls::encoding_opts opt;
  opt.space_as_plus = true;
  for (const auto& p : url->params(opt)) {
    out[p.key] = p.value;
  }
  return out;
}

const std::vector<std::pair<std::string, std::string>> kJson = {
    {"Content-Type", "application/json"}};
const std::vector<std::pair<std::string, std::string>> kForm = {
    {"Content-Type", "application/x-www-form-urlencoded"}};

class FakeProviderTest : public ::testing::Test {
 protected:
  void SetUp() override { StartProvider(FakeProviderOptions()); }

  void StartProvider(FakeProviderOptions options) {
    client_.reset();
    provider_.reset();
    auto provider = FakeProvider::Start(std::move(options));
    ASSERT_TRUE(provider.ok()) << provider.status();
    provider_ = *std::move(provider);
    secret_ = NewTestSecret("client_secret");
    provider_->AddClient(kClientId, secret_);
    client_ = std::make_unique<HttpsClient>(provider_->ca_file(), provider_->port());
  }

  std::string AuthorizeTarget(const std::string& state, const std::string& challenge = "",
                              const std::string& redirect_uri = kRedirectUri,
                              const std::string& client_id = kClientId) {
    std::vector<std::pair<std::string, std::string>> q = {{"response_type", "code"},
                                                          {"client_id", client_id},
                                                          {"redirect_uri", redirect_uri},
                                                          {"scope", "read write"},
                                                          {"state", state}};
    if (!challenge.empty()) {
      q.emplace_back("code_challenge", challenge);
      q.emplace_back("code_challenge_method", "S256");
    }
    return absl::StrCat("/oauth/authorizations/new?", FormEncode(q));
  }

  // Runs the authorize step; returns the code ("" on failure, with a test failure).
  std::string GetCode(const std::string& challenge = "",
                      const std::string& redirect_uri = kRedirectUri) {
    const std::string state = NewTestSecret("state");
    const HttpResult r =
        client_->Send(bhttp::verb::get, AuthorizeTarget(state, challenge, redirect_uri));
    EXPECT_EQ(r.status, 302) << r.body;
    const auto params = LocationParams(r.header("location"));
    EXPECT_EQ(params.count("state") ? params.at("state") : "", state);
    return params.count("code") ? params.at("code") : "";
  }

  HttpResult ExchangeJson(const std::string& code, std::optional<int> expires_in = 1800,
                          const std::string& verifier = "") {
    std::vector<std::pair<std::string, json::value>> f = {{"grant_type", "authorization_code"},
                                                          {"code", json::string(code)},
                                                          {"client_id", kClientId},
                                                          {"client_secret", json::string(secret_)},
                                                          {"redirect_uri", kRedirectUri}};
    if (expires_in) {
      f.emplace_back("expires_in", *expires_in);
    }
    if (!verifier.empty()) {
      f.emplace_back("code_verifier", json::string(verifier));
    }
    return client_->Send(bhttp::verb::post, "/oauth/tokens", kJson, JsonBody(f));
  }

  HttpResult Refresh(const std::string& refresh_token, std::optional<int> expires_in = 1800) {
    std::vector<std::pair<std::string, std::string>> f = {{"grant_type", "refresh_token"},
                                                          {"refresh_token", refresh_token},
                                                          {"client_id", kClientId},
                                                          {"client_secret", secret_}};
    if (expires_in) {
      f.emplace_back("expires_in", std::to_string(*expires_in));
    }
    return client_->Send(bhttp::verb::post, "/oauth/tokens", kForm, FormEncode(f));
  }

  HttpResult TokenInfo(const std::string& access_token) {
    return client_->Send(bhttp::verb::get, "/api/v2/oauth/tokens/current.json",
                         {{"Authorization", absl::StrCat("Bearer ", access_token)}});
  }

  // A full code flow with expiring tokens: {access, refresh}.
  std::pair<std::string, std::string> Connect() {
    const HttpResult r = ExchangeJson(GetCode());
    EXPECT_EQ(r.status, 200) << r.body;
    return {r.JsonString("access_token"), r.JsonString("refresh_token")};
  }

  std::unique_ptr<FakeProvider> provider_;
  std::unique_ptr<HttpsClient> client_;
  std::string secret_;
};

TEST(TestCaTest, GeneratesPemsAndRejectsBadSans) {
  absl::StatusOr<TestCertificates> certs = GenerateTestCertificates();
  ASSERT_TRUE(certs.ok()) << certs.status();
  EXPECT_THAT(certs->ca_cert_pem, HasSubstr("-----BEGIN CERTIFICATE-----"));
  EXPECT_THAT(certs->server_cert_pem, HasSubstr("-----BEGIN CERTIFICATE-----"));
  EXPECT_THAT(certs->server_key_pem, HasSubstr("-----BEGIN PRIVATE KEY-----"));
  EXPECT_NE(certs->ca_cert_pem, certs->server_cert_pem);

  TestCaOptions bad;
  bad.ip_addresses = {"not-an-ip"};
  EXPECT_EQ(GenerateTestCertificates(bad).status().code(), absl::StatusCode::kInvalidArgument);
  TestCaOptions none;
  none.dns_names.clear();
  none.ip_addresses.clear();
  EXPECT_EQ(GenerateTestCertificates(none).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(WritePemFile("", "x").code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(FakeProviderTest, WritesCaFileAndServesVerifiedTlsByIpAndLocalhost) {
  std::ifstream in(provider_->ca_file());
  std::stringstream pem;
  pem << in.rdbuf();
  EXPECT_EQ(pem.str(), provider_->ca_pem());
  EXPECT_EQ(provider_->base_url(), absl::StrCat("https://127.0.0.1:", provider_->port()));

  EXPECT_EQ(client_->Send(bhttp::verb::get, "/nowhere").status, 404);
  HttpsClient by_name(provider_->ca_file(), provider_->port(), "localhost");
  EXPECT_EQ(by_name.Send(bhttp::verb::get, "/nowhere").status, 404);
  // The certificate does not name this host: the handshake must fail.
  HttpsClient wrong_name(provider_->ca_file(), provider_->port(), "broker.example");
  EXPECT_EQ(wrong_name.Send(bhttp::verb::get, "/nowhere").status, -1);
}

TEST_F(FakeProviderTest, CaFileIsRemovedWithTheProviderWhenTemporary) {
  const std::string path = provider_->ca_file();
  EXPECT_TRUE(std::ifstream(path).good());
  client_.reset();
  provider_.reset();
  EXPECT_FALSE(std::ifstream(path).good());
}

TEST_F(FakeProviderTest, AuthorizeRedirectsWithCodeAndState) {
  const std::string state = NewTestSecret("state");
  const std::string target = AuthorizeTarget(state);
  const HttpResult r = client_->Send(bhttp::verb::get, target);
  ASSERT_EQ(r.status, 302);
  EXPECT_TRUE(absl::StartsWith(r.header("location"), absl::StrCat(kRedirectUri, "?code=")));
  const auto params = LocationParams(r.header("location"));
  EXPECT_FALSE(params.at("code").empty());
  EXPECT_EQ(params.at("state"), state);
  EXPECT_EQ(provider_->last_authorize_query(), target.substr(target.find('?') + 1));
  EXPECT_EQ(provider_->calls(CallKind::kAuthorize), 1);

  // The zendesk-chat path, and a redirect URI that already has a query.
  const HttpResult chat = client_->Send(
      bhttp::verb::get,
      absl::StrCat("/oauth2/authorizations/new?response_type=code&client_id=", kClientId,
                   "&redirect_uri=https%3A%2F%2Fbroker.example%2Fcb%3Fx%3D1&state=s1&scope=read"));
  ASSERT_EQ(chat.status, 302);
  EXPECT_TRUE(absl::StartsWith(chat.header("location"), "https://broker.example/cb?x=1&code="));
  EXPECT_EQ(provider_->calls(CallKind::kAuthorize), 2);
}

TEST_F(FakeProviderTest, AuthorizeRejectsUnknownClientAndBadRedirectWithAPage) {
  HttpResult r = client_->Send(bhttp::verb::get, AuthorizeTarget("s", "", kRedirectUri, "nobody"));
  EXPECT_EQ(r.status, 400);
  EXPECT_THAT(r.header("content-type"), HasSubstr("text/html"));
  r = client_->Send(bhttp::verb::get,
                    absl::StrCat("/oauth/authorizations/new?response_type=code&client_id=",
                                 kClientId, "&state=s"));
  EXPECT_EQ(r.status, 400);
  r = client_->Send(bhttp::verb::get, AuthorizeTarget("s", "", "javascript:alert(1)"));
  EXPECT_EQ(r.status, 400);
}

TEST_F(FakeProviderTest, DeniedAuthorizeRedirectsWithAccessDenied) {
  provider_->SetAuthorizeDecision(false);
  const HttpResult r = client_->Send(bhttp::verb::get, AuthorizeTarget("xyz"));
  ASSERT_EQ(r.status, 302);
  const auto params = LocationParams(r.header("location"));
  EXPECT_EQ(params.at("error"), "access_denied");
  EXPECT_FALSE(params.at("error_description").empty());
  EXPECT_EQ(params.at("state"), "xyz");
  EXPECT_EQ(params.count("code"), 0u);
}

TEST_F(FakeProviderTest, DevModeShowsEscapedConsentPageAndDecides) {
  FakeProviderOptions options;
  options.auto_approve = false;
  StartProvider(options);
  const std::string state = "<script>alert(1)</script>";
  HttpResult page = client_->Send(bhttp::verb::get, AuthorizeTarget(state));
  ASSERT_EQ(page.status, 200);
  EXPECT_THAT(page.header("content-type"), HasSubstr("text/html"));
  EXPECT_EQ(page.header("referrer-policy"), "no-referrer");
  EXPECT_THAT(page.body, HasSubstr("Approve"));
  EXPECT_THAT(page.body, HasSubstr("Deny"));
  EXPECT_THAT(page.body, Not(HasSubstr("<script>")));
  EXPECT_THAT(page.body, HasSubstr("&lt;script&gt;"));

  // What the browser sends for the Approve and Deny forms.
  const std::string query = AuthorizeTarget(state).substr(AuthorizeTarget(state).find('?') + 1);
  HttpResult approve = client_->Send(
      bhttp::verb::get, absl::StrCat("/oauth/authorizations/decide?", query, "&decision=approve"));
  ASSERT_EQ(approve.status, 302);
  auto params = LocationParams(approve.header("location"));
  EXPECT_FALSE(params["code"].empty());
  EXPECT_EQ(params["state"], state);
  HttpResult deny = client_->Send(
      bhttp::verb::get, absl::StrCat("/oauth/authorizations/decide?", query, "&decision=deny"));
  ASSERT_EQ(deny.status, 302);
  params = LocationParams(deny.header("location"));
  EXPECT_EQ(params["error"], "access_denied");
  EXPECT_EQ(params.count("code"), 0u);
}

TEST_F(FakeProviderTest, JsonCodeExchangeWithBodyAuthIssuesExpiringTokens) {
  const std::string code = GetCode();
  const HttpResult r = ExchangeJson(code);
  ASSERT_EQ(r.status, 200) << r.body;
  EXPECT_EQ(r.header("cache-control"), "no-store");
  const std::string access = r.JsonString("access_token");
  const std::string refresh = r.JsonString("refresh_token");
  EXPECT_GT(access.size(), 900u);
  EXPECT_FALSE(refresh.empty());
  EXPECT_EQ(r.JsonString("token_type"), "bearer");
  EXPECT_EQ(r.JsonString("scope"), "read write");
  EXPECT_EQ(r.Json().at("expires_in").to_number<int64_t>(), 1800);
  EXPECT_EQ(r.Json().at("refresh_token_expires_in").to_number<int64_t>(), 2592000);
  EXPECT_TRUE(provider_->IsAccessTokenValid(access));
  EXPECT_TRUE(provider_->IsRefreshTokenValid(refresh));
  EXPECT_EQ(provider_->last_token_request_content_type(), "application/json");
  EXPECT_EQ(provider_->last_token_request_client_auth(), ClientAuth::kBody);
  EXPECT_THAT(provider_->last_token_request_fields(),
              ::testing::ElementsAre("client_id", "client_secret", "code", "expires_in",
                                     "grant_type", "redirect_uri"));
  EXPECT_EQ(provider_->calls(CallKind::kTokenCode), 1);

  // Codes are single-use.
  const HttpResult again = ExchangeJson(code);
  EXPECT_EQ(again.status, 400);
  EXPECT_EQ(again.JsonString("error"), "invalid_grant");
}

TEST_F(FakeProviderTest, FormCodeExchangeWithBasicAuthUsesFormEncodedCredentials) {
  auto basic = [](const std::string& id, const std::string& secret) {
    return absl::StrCat("Basic ", absl::Base64Escape(absl::StrCat(id, ":", secret)));
  };
  const auto exchange = [&](const std::string& code, const std::string& authorization) {
    return client_->Send(bhttp::verb::post, "/oauth/tokens",
                         {{"Content-Type", "application/x-www-form-urlencoded; charset=utf-8"},
                          {"Authorization", authorization}},
                         FormEncode({{"grant_type", "authorization_code"},
                                     {"code", code},
                                     {"redirect_uri", kRedirectUri},
                                     {"expires_in", "600"}}));
  };
  // The test secret holds '/', '+' and '=': RFC 6749 2.3.1 form-encodes it inside Basic.
  const std::string encoded_secret = FormEncode({{"s", secret_}}).substr(2);
  ASSERT_NE(encoded_secret, secret_);
  const HttpResult raw = exchange(GetCode(), basic(kClientId, secret_));
  EXPECT_EQ(raw.status, 401);
  EXPECT_EQ(raw.JsonString("error"), "invalid_client");
  EXPECT_EQ(exchange(GetCode(), basic(kClientId, "wrong")).status, 401);

  const HttpResult r = exchange(GetCode(), basic(kClientId, encoded_secret));
  ASSERT_EQ(r.status, 200) << r.body;
  EXPECT_EQ(r.Json().at("expires_in").to_number<int64_t>(), 600);
  EXPECT_EQ(provider_->last_token_request_client_auth(), ClientAuth::kBasic);
  EXPECT_EQ(provider_->last_token_request_content_type(),
            "application/x-www-form-urlencoded; charset=utf-8");

  // The oauth2 alias, with a string expires_in in JSON.
  const HttpResult chat = client_->Send(bhttp::verb::post, "/oauth2/token", kJson,
                                        JsonBody({{"grant_type", "authorization_code"},
                                                  {"code", json::string(GetCode())},
                                                  {"client_id", kClientId},
                                                  {"client_secret", json::string(secret_)},
                                                  {"redirect_uri", kRedirectUri},
                                                  {"expires_in", "900"}}));
  ASSERT_EQ(chat.status, 200) << chat.body;
  EXPECT_EQ(chat.Json().at("expires_in").to_number<int64_t>(), 900);
}

TEST_F(FakeProviderTest, WithoutExpiresInTheTokenIsClassicAndHasNoRefreshToken) {
  const HttpResult r = ExchangeJson(GetCode(), std::nullopt);
  ASSERT_EQ(r.status, 200) << r.body;
  EXPECT_FALSE(r.JsonString("access_token").empty());
  EXPECT_FALSE(r.Has("expires_in"));
  EXPECT_FALSE(r.Has("refresh_token"));
  EXPECT_FALSE(r.Has("refresh_token_expires_in"));
  const HttpResult info = TokenInfo(r.JsonString("access_token"));
  ASSERT_EQ(info.status, 200);
  EXPECT_TRUE(info.Json().at("token").at("expires_at").is_null());
}

TEST_F(FakeProviderTest, CodeExchangeChecksRedirectUriClientAndPkce) {
  // redirect_uri must match exactly.
  HttpResult r = client_->Send(bhttp::verb::post, "/oauth/tokens", kJson,
                               JsonBody({{"grant_type", "authorization_code"},
                                         {"code", json::string(GetCode())},
                                         {"client_id", kClientId},
                                         {"client_secret", json::string(secret_)},
                                         {"redirect_uri", "https://broker.example/other"}}));
  EXPECT_EQ(r.status, 400);
  EXPECT_EQ(r.JsonString("error"), "invalid_grant");

  const std::string verifier = NewTestSecret("pkce_verifier");
  const std::string challenge = S256(verifier);
  r = ExchangeJson(GetCode(challenge), 1800, NewTestSecret("pkce_verifier"));
  EXPECT_EQ(r.status, 400);
  EXPECT_EQ(r.JsonString("error"), "invalid_grant");
  r = ExchangeJson(GetCode(challenge), 1800, "");
  EXPECT_EQ(r.JsonString("error"), "invalid_grant");
  r = ExchangeJson(GetCode(challenge), 1800, verifier);
  EXPECT_EQ(r.status, 200) << r.body;
  EXPECT_EQ(provider_->calls(CallKind::kTokenCode), 4);

  // Wrong client secret.
  r = client_->Send(bhttp::verb::post, "/oauth/tokens", kJson,
                    JsonBody({{"grant_type", "authorization_code"},
                              {"code", json::string(GetCode())},
                              {"client_id", kClientId},
                              {"client_secret", "nope"},
                              {"redirect_uri", kRedirectUri}}));
  EXPECT_EQ(r.status, 401);
  EXPECT_EQ(r.JsonString("error"), "invalid_client");
}

TEST_F(FakeProviderTest, CodesExpire) {
  FakeProviderOptions options;
  options.code_lifetime = absl::Milliseconds(1);
  StartProvider(options);
  const std::string code = GetCode();
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  const HttpResult r = ExchangeJson(code);
  EXPECT_EQ(r.status, 400);
  EXPECT_EQ(r.JsonString("error"), "invalid_grant");
}

TEST_F(FakeProviderTest, MalformedAndUnsupportedTokenRequests) {
  HttpResult r = client_->Send(bhttp::verb::post, "/oauth/tokens", kJson, "{not json");
  EXPECT_EQ(r.status, 400);
  EXPECT_EQ(r.JsonString("error"), "invalid_request");
  r = client_->Send(bhttp::verb::post, "/oauth/tokens", {{"Content-Type", "text/plain"}}, "x");
  EXPECT_EQ(r.JsonString("error"), "invalid_request");
  r = client_->Send(
      bhttp::verb::post, "/oauth/tokens", kForm,
      FormEncode(
          {{"grant_type", "password"}, {"client_id", kClientId}, {"client_secret", secret_}}));
  EXPECT_EQ(r.status, 400);
  EXPECT_EQ(r.JsonString("error"), "unsupported_grant_type");
  r = client_->Send(bhttp::verb::post, "/oauth/tokens", kForm, "grant_type=a&grant_type=b");
  EXPECT_EQ(r.JsonString("error"), "invalid_request");
  EXPECT_EQ(provider_->calls(CallKind::kOther), 4);

  r = client_->Send(bhttp::verb::get, "/api/v2/tickets.json");
  EXPECT_EQ(r.status, 404);
  EXPECT_TRUE(r.Json().is_object());
}

TEST_F(FakeProviderTest, TokenInfoReportsTheIdOfTheBearerToken) {
  const auto [access, refresh] = Connect();
  const HttpResult r = TokenInfo(access);
  ASSERT_EQ(r.status, 200) << r.body;
  const json::value body = r.Json();
  const json::value& token = body.at("token");
  EXPECT_EQ(token.at("id").to_number<int64_t>(), provider_->TokenIdOf(access).value());
  EXPECT_GT(token.at("id").to_number<int64_t>(), int64_t{1} << 32);
  EXPECT_EQ(json::serialize(token.at("scopes")), R"(["read","write"])");
  EXPECT_EQ(TokenInfo("nope").status, 401);
  EXPECT_EQ(client_->Send(bhttp::verb::get, "/api/v2/oauth/tokens/current.json").status, 401);
  EXPECT_EQ(provider_->calls(CallKind::kTokenInfo), 3);
}

TEST_F(FakeProviderTest, RefreshRotatesBothTokensAndRejectsReuse) {
  const auto [access, refresh] = Connect();
  const HttpResult r = Refresh(refresh, 3600);
  ASSERT_EQ(r.status, 200) << r.body;
  const std::string access2 = r.JsonString("access_token");
  const std::string refresh2 = r.JsonString("refresh_token");
  EXPECT_NE(access2, access);
  EXPECT_NE(refresh2, refresh);
  EXPECT_EQ(r.Json().at("expires_in").to_number<int64_t>(), 3600);
  EXPECT_NE(provider_->TokenIdOf(access2), provider_->TokenIdOf(access));

  // The old pair died at once.
  EXPECT_FALSE(provider_->IsAccessTokenValid(access));
  EXPECT_FALSE(provider_->IsRefreshTokenValid(refresh));
  EXPECT_EQ(TokenInfo(access).status, 401);
  EXPECT_EQ(TokenInfo(access2).status, 200);

  const HttpResult reuse = Refresh(refresh);
  EXPECT_EQ(reuse.status, 400);
  EXPECT_EQ(reuse.JsonString("error"), "invalid_grant");
  EXPECT_EQ(provider_->refresh_token_reuse_attempts(), 1);
  EXPECT_TRUE(provider_->IsAccessTokenValid(access2));  // reuse does not kill the new pair

  // A refresh without expires_in: a non-expiring token and no new refresh token.
  const HttpResult classic = Refresh(refresh2, std::nullopt);
  ASSERT_EQ(classic.status, 200);
  EXPECT_FALSE(classic.Has("refresh_token"));
  EXPECT_FALSE(provider_->IsRefreshTokenValid(refresh2));
  EXPECT_EQ(provider_->calls(CallKind::kTokenRefresh), 3);
  EXPECT_EQ(provider_->refresh_token_reuse_attempts(), 1);

  EXPECT_EQ(Refresh("unknown").JsonString("error"), "invalid_grant");
  EXPECT_EQ(provider_->refresh_token_reuse_attempts(), 1);
}

TEST_F(FakeProviderTest, RevokeByIdKillsAccessAndRefreshToken) {
  const auto [access, refresh] = Connect();
  const int64_t id = provider_->TokenIdOf(access).value();
  const auto bearer = std::vector<std::pair<std::string, std::string>>{
      {"Authorization", absl::StrCat("Bearer ", access)}};
  EXPECT_EQ(client_->Send(bhttp::verb::delete_, "/api/v2/oauth/tokens/12345.json", bearer).status,
            404);
  const HttpResult r = client_->Send(bhttp::verb::delete_,
                                     absl::StrCat("/api/v2/oauth/tokens/", id, ".json"), bearer);
  EXPECT_EQ(r.status, 204);
  EXPECT_FALSE(provider_->IsAccessTokenValid(access));
  EXPECT_FALSE(provider_->IsRefreshTokenValid(refresh));
  EXPECT_EQ(Refresh(refresh).JsonString("error"), "invalid_grant");
  EXPECT_EQ(provider_->refresh_token_reuse_attempts(), 0);
  // The bearer itself is dead now.
  EXPECT_EQ(
      client_
          ->Send(bhttp::verb::delete_, absl::StrCat("/api/v2/oauth/tokens/", id, ".json"), bearer)
          .status,
      401);
  EXPECT_EQ(provider_->calls(CallKind::kRevokeById), 3);
}

TEST_F(FakeProviderTest, DeleteCurrentAnswers204ButRevokesNothing) {
  const auto [access, refresh] = Connect();
  const HttpResult r = client_->Send(bhttp::verb::delete_, "/api/v2/oauth/tokens/current.json",
                                     {{"Authorization", absl::StrCat("Bearer ", access)}});
  EXPECT_EQ(r.status, 204);
  EXPECT_TRUE(provider_->IsAccessTokenValid(access));
  EXPECT_TRUE(provider_->IsRefreshTokenValid(refresh));
  EXPECT_EQ(provider_->calls(CallKind::kRevokeCurrent), 1);
}

TEST_F(FakeProviderTest, Rfc7009RevokesThePairAndAcceptsUnknownTokens) {
  const auto [access, refresh] = Connect();
  const auto revoke = [&](const std::string& token, const std::string& secret) {
    return client_->Send(bhttp::verb::post, "/oauth/revoke", kForm,
                         FormEncode({{"token", token},
                                     {"token_type_hint", "refresh_token"},
                                     {"client_id", kClientId},
                                     {"client_secret", secret}}));
  };
  EXPECT_EQ(revoke(refresh, "wrong").status, 401);
  EXPECT_TRUE(provider_->IsRefreshTokenValid(refresh));
  EXPECT_EQ(revoke(refresh, secret_).status, 200);
  EXPECT_FALSE(provider_->IsRefreshTokenValid(refresh));
  EXPECT_FALSE(provider_->IsAccessTokenValid(access));
  EXPECT_EQ(revoke("never-issued", secret_).status, 200);
  EXPECT_EQ(provider_->calls(CallKind::kRevokeRfc7009), 3);
}

TEST_F(FakeProviderTest, ScriptedStatusFailuresApplyOnceToTheirKind) {
  const auto [access, refresh] = Connect();
  Failure rate_limited;
  rate_limited.http_status = 429;
  rate_limited.retry_after = "3";
  provider_->FailNext(CallKind::kTokenRefresh, rate_limited);
  Failure down;
  down.http_status = 500;
  provider_->FailNext(CallKind::kTokenRefresh, down);
  Failure client_error;
  client_error.http_status = 401;
  client_error.error = "invalid_client";
  provider_->FailNext(CallKind::kTokenRefresh, client_error);

  EXPECT_EQ(TokenInfo(access).status, 200);  // other kinds are not affected
  HttpResult r = Refresh(refresh);
  EXPECT_EQ(r.status, 429);
  EXPECT_EQ(r.header("retry-after"), "3");
  r = Refresh(refresh);
  EXPECT_EQ(r.status, 500);
  EXPECT_EQ(r.JsonString("error"), "server_error");
  r = Refresh(refresh);
  EXPECT_EQ(r.status, 401);
  EXPECT_EQ(r.JsonString("error"), "invalid_client");
  // Nothing was processed: the refresh token still works.
  EXPECT_TRUE(provider_->IsRefreshTokenValid(refresh));
  EXPECT_EQ(Refresh(refresh).status, 200);
  EXPECT_EQ(provider_->calls(CallKind::kTokenRefresh), 4);

  Failure rate_limited_default;
  rate_limited_default.http_status = 429;
  provider_->FailNext(CallKind::kTokenCode, rate_limited_default);
  r = ExchangeJson(GetCode());
  EXPECT_EQ(r.status, 429);
  EXPECT_EQ(r.header("retry-after"), "1");
}

TEST_F(FakeProviderTest, ResetWithoutProcessingLeavesTheGrantAlone) {
  const auto [access, refresh] = Connect();
  Failure reset;
  reset.reset_connection = true;
  provider_->FailNext(CallKind::kTokenRefresh, reset);
  EXPECT_EQ(Refresh(refresh).status, -1);
  EXPECT_TRUE(provider_->IsRefreshTokenValid(refresh));
  EXPECT_EQ(Refresh(refresh).status, 200);  // a retry succeeds, on a new connection
}

TEST_F(FakeProviderTest, RotatedThenLostAnswerKillsTheOldRefreshToken) {
  const auto [access, refresh] = Connect();
  Failure lost;
  lost.reset_connection = true;
  lost.process_first = true;
  provider_->FailNext(CallKind::kTokenRefresh, lost);
  EXPECT_EQ(Refresh(refresh).status, -1);
  EXPECT_FALSE(provider_->IsRefreshTokenValid(refresh));
  EXPECT_FALSE(provider_->IsAccessTokenValid(access));
  const HttpResult retry = Refresh(refresh);
  EXPECT_EQ(retry.JsonString("error"), "invalid_grant");
  EXPECT_EQ(provider_->refresh_token_reuse_attempts(), 1);
}

TEST_F(FakeProviderTest, DelaysAndGarbage) {
  const auto [access, refresh] = Connect();
  Failure slow;
  slow.delay_after = absl::Milliseconds(300);
  provider_->FailNext(CallKind::kTokenRefresh, slow);
  const auto start = std::chrono::steady_clock::now();
  const HttpResult r = Refresh(refresh);
  EXPECT_GE(std::chrono::steady_clock::now() - start, std::chrono::milliseconds(300));
  ASSERT_EQ(r.status, 200);
  EXPECT_FALSE(provider_->IsRefreshTokenValid(refresh));

  Failure garbage;
  garbage.garbage_body = "not json";
  garbage.delay_before = absl::Milliseconds(50);
  provider_->FailNext(CallKind::kTokenInfo, garbage);
  const HttpResult g = TokenInfo(r.JsonString("access_token"));
  EXPECT_EQ(g.status, 200);
  EXPECT_EQ(g.body, "not json");
}

TEST_F(FakeProviderTest, KeepsConnectionsAlive) {
  for (int i = 0; i < 5; ++i) {
    EXPECT_EQ(client_->Send(bhttp::verb::get, "/nowhere").status, 404);
  }
  const auto [access, refresh] = Connect();
  EXPECT_EQ(Refresh(refresh).status, 200);
  EXPECT_EQ(client_->connects(), 1);
}

TEST_F(FakeProviderTest, ServesConcurrentConnections) {
  constexpr int kThreads = 4;
  constexpr int kFlows = 5;
  std::atomic<int> ok{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&] {
      HttpsClient client(provider_->ca_file(), provider_->port());
      for (int i = 0; i < kFlows; ++i) {
        const HttpResult a = client.Send(bhttp::verb::get, AuthorizeTarget("s"));
        const auto params = LocationParams(a.header("location"));
        if (params.count("code") == 0) {
          continue;
        }
        const HttpResult r = client.Send(bhttp::verb::post, "/oauth/tokens", kJson,
                                         JsonBody({{"grant_type", "authorization_code"},
                                                   {"code", json::string(params.at("code"))},
                                                   {"client_id", kClientId},
                                                   {"client_secret", json::string(secret_)},
                                                   {"redirect_uri", kRedirectUri},
                                                   {"expires_in", 60}}));
        if (r.status == 200) {
          ++ok;
        }
      }
    });
  }
  // A slow call on one connection does not hold up the others.
  Failure slow;
  slow.delay_before = absl::Milliseconds(500);
  provider_->FailNext(CallKind::kRevokeCurrent, slow);
  HttpsClient slow_client(provider_->ca_file(), provider_->port());
  std::thread slow_thread(
      [&] { slow_client.Send(bhttp::verb::delete_, "/api/v2/oauth/tokens/current.json"); });
  for (std::thread& t : threads) {
    t.join();
  }
  slow_thread.join();
  EXPECT_EQ(ok.load(), kThreads * kFlows);
  EXPECT_EQ(provider_->calls(CallKind::kTokenCode), kThreads * kFlows);
}

TEST_F(FakeProviderTest, StopCancelsPendingDelaysAndJoins) {
  Failure hang;
  hang.delay_before = absl::Seconds(60);
  provider_->FailNext(CallKind::kTokenInfo, hang);
  HttpResult r;
  std::thread waiter([&] { r = TokenInfo("x"); });
  while (provider_->calls(CallKind::kTokenInfo) == 0) {
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  const auto start = std::chrono::steady_clock::now();
  provider_->Stop();
  waiter.join();
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(5));
  EXPECT_EQ(r.status, -1);
  provider_->Stop();  // idempotent
}

TEST_F(FakeProviderTest, AdminRevocationAndExpiryKnobs) {
  const auto [access, refresh] = Connect();
  provider_->ExpireAllAccessTokens();
  EXPECT_FALSE(provider_->IsAccessTokenValid(access));
  EXPECT_TRUE(provider_->IsRefreshTokenValid(refresh));
  EXPECT_EQ(TokenInfo(access).status, 401);
  const HttpResult r = Refresh(refresh);
  ASSERT_EQ(r.status, 200);
  provider_->RevokeAllTokens();
  EXPECT_FALSE(provider_->IsAccessTokenValid(r.JsonString("access_token")));
  EXPECT_EQ(Refresh(r.JsonString("refresh_token")).JsonString("error"), "invalid_grant");
}

TEST_F(FakeProviderTest, StatsEndpointOnlyWhenEnabled) {
  EXPECT_EQ(client_->Send(bhttp::verb::get, "/_fake/stats").status, 404);

  FakeProviderOptions options;
  options.stats_endpoint = true;
  StartProvider(options);
  const auto [access, refresh] = Connect();
  const HttpResult r = Refresh(refresh);
  ASSERT_EQ(r.status, 200) << r.body;
  EXPECT_EQ(Refresh(refresh).status, 400);  // reused
  EXPECT_EQ(Refresh(refresh).status, 400);  // and again
  const HttpResult stats = client_->Send(bhttp::verb::get, "/_fake/stats");
  ASSERT_EQ(stats.status, 200) << stats.body;
  const json::value parsed = stats.Json();
  ASSERT_TRUE(parsed.is_object()) << stats.body;
  const json::object& body = parsed.as_object();
  const json::object& calls = body.at("calls").as_object();
  EXPECT_EQ(calls.at("token_code").to_number<int>(), 1);
  EXPECT_EQ(calls.at("token_refresh").to_number<int>(), 3);
  EXPECT_EQ(calls.at("authorize").to_number<int>(), 1);
  EXPECT_EQ(body.at("refresh_token_reuse_attempts").to_number<int>(), 2);
  const std::optional<int64_t> id = provider_->TokenIdOf(access);
  ASSERT_TRUE(id.has_value());
  EXPECT_EQ(json::serialize(body.at("reused_token_ids")),
            absl::StrCat("[", *id, ",", *id, "]"));
  // Counters only: no token in the answer.
  EXPECT_EQ(stats.body.find(access), std::string::npos);
  EXPECT_EQ(stats.body.find(refresh), std::string::npos);
  EXPECT_EQ(provider_->refresh_token_reuse_attempts(), 2);
}

}  // namespace
}  // namespace tb::testing
