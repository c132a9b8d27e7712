#include "server/src/provider/internal/oauth_wire.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <exception>
#include <limits>

#include <boost/json/object.hpp>
#include <boost/json/parse.hpp>
#include <boost/json/serialize.hpp>
#include <boost/json/value.hpp>

#include "absl/strings/ascii.h"
#include "absl/strings/cord.h"
#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "server/src/core/errors.h"

namespace tb::provider::internal {
namespace {

namespace json = boost::json;

json::string_view ToJson(absl::string_view s) { return json::string_view(s.data(), s.size()); }
std::string ToString(json::string_view s) { return std::string(s.data(), s.size()); }

absl::Status Unusable(absl::string_view why) { return absl::UnavailableError(why); }

// Parses `body` as a JSON value; never throws (Boost.JSON's error_code overload, plus a guard
// for allocation failures and its length limits).
absl::StatusOr<json::value> ParseJson(absl::string_view body) {
  try {
    boost::system::error_code ec;
    json::value v = json::parse(ToJson(body), ec);
    if (ec) {
      return Unusable("not JSON");
    }
    return v;
  } catch (const std::exception&) {
    return Unusable("not JSON");
  }
}

// The member `name` of `o`, or nullptr when absent or null.
const json::value* Member(const json::object& o, absl::string_view name) {
  const auto it = o.find(ToJson(name));
  if (it == o.end() || it->value().is_null()) {
    return nullptr;
  }
  return &it->value();
}

// A non-negative integer number of seconds, from a JSON number or a string of digits.
absl::StatusOr<int64_t> ReadSeconds(const json::value& v, absl::string_view name) {
  int64_t n = 0;
  if (const int64_t* i = v.if_int64()) {
    n = *i;
  } else if (const uint64_t* u = v.if_uint64()) {
    n = *u > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())
            ? std::numeric_limits<int64_t>::max()
            : static_cast<int64_t>(*u);
  } else if (const double* d = v.if_double()) {
    if (!std::isfinite(*d)) {
      return Unusable(absl::StrCat(name, " is not a finite number"));
    }
    // Negative values are refused below; converting one below INT64_MIN would be undefined
    // (found by fuzz_provider_response).
    n = *d < 0 ? -1 : *d >= 9.2e18 ? std::numeric_limits<int64_t>::max() : static_cast<int64_t>(*d);
  } else if (const json::string* s = v.if_string()) {
    if (!absl::SimpleAtoi(absl::string_view(s->data(), s->size()), &n)) {
      return Unusable(absl::StrCat(name, " is a string that is not a number"));
    }
  } else {
    return Unusable(absl::StrCat(name, " is not a number"));
  }
  if (n < 0) {
    return Unusable(absl::StrCat(name, " is negative"));
  }
  return n;
}

bool IsCodeChar(char c) {
  return absl::ascii_isalnum(static_cast<unsigned char>(c)) || c == '_' || c == '.' || c == '-';
}

absl::Status WithRetryAfter(absl::Status s, absl::string_view retry_after) {
  if (!retry_after.empty()) {
    s.SetPayload(kRetryAfterPayloadUrl, absl::Cord(retry_after));
  }
  return s;
}

}  // namespace

std::string FormUrlEncode(absl::string_view s) {
  static constexpr char kHex[] = "0123456789ABCDEF";
  std::string out;
  out.reserve(s.size() * 3);
  for (const char c : s) {
    const unsigned char u = static_cast<unsigned char>(c);
    if (absl::ascii_isalnum(u) || c == '*' || c == '-' || c == '.' || c == '_') {
      out.push_back(c);
    } else if (c == ' ') {
      out.push_back('+');
    } else {
      out.push_back('%');
      out.push_back(kHex[u >> 4]);
      out.push_back(kHex[u & 0xf]);
    }
  }
  return out;
}

std::string FormBody(const std::vector<Param>& params) {
  std::string out;
  for (const Param& p : params) {
    if (!out.empty()) {
      out.push_back('&');
    }
    absl::StrAppend(&out, FormUrlEncode(p.name), "=", FormUrlEncode(p.value));
  }
  return out;
}

std::string JsonBody(const std::vector<Param>& params) {
  json::object o;
  for (const Param& p : params) {
    int64_t n = 0;
    if (p.number && absl::SimpleAtoi(p.value, &n)) {
      o[ToJson(p.name)] = n;
    } else {
      o[ToJson(p.name)] = ToJson(p.value);
    }
  }
  return json::serialize(o);
}

std::string BasicAuthorization(absl::string_view client_id, absl::string_view client_secret) {
  return absl::StrCat("Basic ", absl::Base64Escape(absl::StrCat(FormUrlEncode(client_id), ":",
                                                                FormUrlEncode(client_secret))));
}

absl::StatusOr<core::Grant> ParseTokenResponse(absl::string_view body,
                                               const std::vector<std::string>& default_scopes,
                                               absl::Time issued_at) {
  absl::StatusOr<json::value> parsed = ParseJson(body);
  if (!parsed.ok()) {
    return parsed.status();
  }
  const json::object* o = parsed->if_object();
  if (o == nullptr) {
    return Unusable("not a JSON object");
  }
  core::Grant grant;
  grant.issued_at = issued_at;

  const json::value* access = Member(*o, "access_token");
  if (access == nullptr) {
    return Unusable("missing access_token");
  }
  const json::string* access_s = access->if_string();
  if (access_s == nullptr) {
    return Unusable("access_token is not a string");
  }
  if (access_s->empty()) {
    return Unusable("access_token is empty");
  }
  grant.access_token = AccessToken(ToString(*access_s));

  if (const json::value* type = Member(*o, "token_type")) {
    const json::string* s = type->if_string();
    if (s == nullptr || s->empty()) {
      return Unusable("token_type is not a non-empty string");
    }
    grant.token_type = ToString(*s);
    if (absl::EqualsIgnoreCase(grant.token_type, "bearer")) {
      grant.token_type = "Bearer";
    }
  }

  grant.scopes = default_scopes;
  if (const json::value* scope = Member(*o, "scope")) {
    const json::string* s = scope->if_string();
    if (s == nullptr) {
      return Unusable("scope is not a string");
    }
    std::vector<std::string> scopes =
        absl::StrSplit(absl::string_view(s->data(), s->size()), ' ', absl::SkipEmpty());
    if (!scopes.empty()) {
      grant.scopes = std::move(scopes);
    }
  }

  if (const json::value* expires = Member(*o, "expires_in")) {
    absl::StatusOr<int64_t> seconds = ReadSeconds(*expires, "expires_in");
    if (!seconds.ok()) {
      return seconds.status();
    }
    if (*seconds > 0) {
      grant.expires_at = issued_at + absl::Seconds(*seconds);
    }
  }

  if (const json::value* refresh = Member(*o, "refresh_token")) {
    const json::string* s = refresh->if_string();
    if (s == nullptr) {
      return Unusable("refresh_token is not a string");
    }
    if (!s->empty()) {
      grant.refresh_token = RefreshToken(ToString(*s));
    }
  }

  if (const json::value* expires = Member(*o, "refresh_token_expires_in")) {
    absl::StatusOr<int64_t> seconds = ReadSeconds(*expires, "refresh_token_expires_in");
    if (!seconds.ok()) {
      return seconds.status();
    }
    if (*seconds > 0 && grant.refresh_token) {
      grant.refresh_token_expires_at = issued_at + absl::Seconds(*seconds);
    }
  }
  return grant;
}

bool IsValidTokenId(absl::string_view id) {
  if (id.empty() || id.size() > 64) {
    return false;
  }
  for (const char c : id) {
    if (!absl::ascii_isalnum(static_cast<unsigned char>(c)) && c != '_' && c != '-') {
      return false;
    }
  }
  return true;
}

absl::StatusOr<std::string> ParseTokenId(absl::string_view body) {
  absl::StatusOr<json::value> parsed = ParseJson(body);
  if (!parsed.ok()) {
    return parsed.status();
  }
  const json::object* o = parsed->if_object();
  const json::value* token = o == nullptr ? nullptr : Member(*o, "token");
  const json::object* t = token == nullptr ? nullptr : token->if_object();
  if (t == nullptr) {
    return Unusable("missing token object");
  }
  const json::value* id = Member(*t, "id");
  if (id == nullptr) {
    return Unusable("missing token.id");
  }
  if (const int64_t* i = id->if_int64(); i != nullptr && *i >= 0) {
    return absl::StrCat(*i);
  }
  if (const uint64_t* u = id->if_uint64()) {
    return absl::StrCat(*u);
  }
  if (const json::string* s = id->if_string()) {
    std::string value = ToString(*s);
    if (IsValidTokenId(value)) {
      return value;
    }
  }
  return Unusable("token.id is not a usable id");
}

std::string OAuthErrorCode(absl::string_view body) {
  absl::StatusOr<json::value> parsed = ParseJson(body);
  if (!parsed.ok()) {
    return "";
  }
  const json::object* o = parsed->if_object();
  const json::value* error = o == nullptr ? nullptr : Member(*o, "error");
  const json::string* s = error == nullptr ? nullptr : error->if_string();
  if (s == nullptr || s->empty() || s->size() > 64 ||
      !std::all_of(s->begin(), s->end(), IsCodeChar)) {
    return "";
  }
  return ToString(*s);
}

absl::Status ErrorForResponse(absl::string_view what, Endpoint endpoint, int http_status,
                              absl::string_view body, absl::string_view retry_after) {
  if (http_status == 429) {
    return WithRetryAfter(
        absl::ResourceExhaustedError(absl::StrCat(what, ": rate limited (HTTP 429)")), retry_after);
  }
  if (http_status == 408 || (http_status >= 500 && http_status <= 599)) {
    absl::Status s = absl::UnavailableError(absl::StrCat(what, ": HTTP ", http_status));
    return http_status == 503 ? WithRetryAfter(std::move(s), retry_after) : s;
  }
  if (http_status >= 400 && http_status <= 499) {
    const std::string code = OAuthErrorCode(body);
    const std::string detail = code.empty() ? absl::StrCat("HTTP ", http_status)
                                            : absl::StrCat("HTTP ", http_status, " error=", code);
    if (code == "invalid_grant") {
      return core::ReasonError(
          absl::StatusCode::kFailedPrecondition, core::Reason::kNeedsReauth,
          absl::StrCat(what, ": ", detail, ": the grant was rejected; re-authorize the account"));
    }
    if (http_status == 401 && endpoint == Endpoint::kBearer) {
      // An API call authorized by the grant's own access token: that token was rejected.
      return absl::UnauthenticatedError(
          absl::StrCat(what, ": ", detail, ": the access token was rejected"));
    }
    if (code == "invalid_client" || code == "unauthorized_client" ||
        (http_status == 401 && code.empty() && endpoint == Endpoint::kClientAuthenticated)) {
      return core::ReasonError(
          absl::StatusCode::kFailedPrecondition, core::Reason::kProviderMisconfigured,
          absl::StrCat(what, ": ", detail,
                       ": the provider rejected our client credentials; check client id and "
                       "secret"));
    }
    return absl::FailedPreconditionError(absl::StrCat(what, ": ", detail));
  }
  if (http_status >= 300 && http_status <= 399) {
    return absl::FailedPreconditionError(
        absl::StrCat(what, ": HTTP ", http_status, " (a redirect): check the provider's URLs"));
  }
  return absl::UnavailableError(absl::StrCat(what, ": unexpected HTTP ", http_status));
}

}  // namespace tb::provider::internal
