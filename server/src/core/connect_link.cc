#include "server/src/core/connect_link.h"

#include <algorithm>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_replace.h"
#include "absl/strings/str_split.h"
#include "server/src/common/status_macros.h"
#include "server/src/core/errors.h"
#include "server/src/core/oauth_state.h"

namespace tb::core {

namespace {

constexpr absl::string_view kVersion1 = "tblink1";
constexpr absl::string_view kVersion2 = "tblink2";  // tblink1's fields, then return_url
constexpr size_t kMaxReturnUrl = 2048;

std::string B64(absl::string_view s) { return absl::WebSafeBase64Escape(s); }

bool UnB64(absl::string_view s, std::string* out) {
  // Only the canonical encoding: absl's decoder tolerates padding and stray low bits in the
  // last character, which would let several strings stand for one link.
  return absl::WebSafeBase64Unescape(s, out) && absl::WebSafeBase64Escape(*out) == s;
}

// Fields, each base64url, joined by '.'; params as "k:v" pairs (each base64url) joined by ','.
std::string Payload(const ConnectLink& l) {
  std::vector<std::string> params;
  for (const auto& [k, v] : l.params) {
    params.push_back(absl::StrCat(B64(k), ":", B64(v)));
  }
  std::vector<std::string> fields = {std::string(l.return_url.empty() ? kVersion1 : kVersion2),
                                     B64(l.id),
                                     B64(l.connection_id),
                                     B64(l.provider),
                                     absl::StrCat(absl::ToUnixSeconds(l.expires_at)),
                                     std::string(l.reconnect ? "1" : "0"),
                                     absl::StrJoin(params, ",")};
  if (!l.return_url.empty()) {
    fields.push_back(B64(l.return_url));
  }
  return absl::StrJoin(fields, ".");
}

absl::Status Invalid() {
  return FlowError(absl::StatusCode::kInvalidArgument, FlowErrorKind::kLinkInvalid,
                   "connect link is not valid");
}

// A return URL (or allow-list entry) taken apart; see CheckReturnUrl for the accepted form.
struct ReturnUrlParts {
  std::string scheme;  // "http" or "https"
  std::string host;    // lower case; an IPv6 literal keeps its brackets
  int port = 0;        // explicit, or the scheme's default
  std::string path;    // "/" when absent
  bool has_query_or_fragment = false;
};

absl::Status BadUrl(absl::string_view why) {
  return absl::InvalidArgumentError(absl::StrCat("return URL ", why));
}

bool IsHex(char c) { return absl::ascii_isxdigit(static_cast<unsigned char>(c)); }

// Checks percent-escapes in `s` and returns false if one is malformed.
bool EscapesWellFormed(absl::string_view s) {
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] == '%' && (i + 2 >= s.size() || !IsHex(s[i + 1]) || !IsHex(s[i + 2]))) {
      return false;
    }
  }
  return true;
}

absl::StatusOr<ReturnUrlParts> ParseReturnUrl(absl::string_view url) {
  if (url.empty() || url.size() > kMaxReturnUrl) {
    return BadUrl("must be 1 to 2048 characters");
  }
  for (char c : url) {
    const auto u = static_cast<unsigned char>(c);
    // Browsers silently drop tabs and newlines and turn backslashes into slashes: a URL that
    // means one thing here and another there is refused outright.
    if (u <= 0x20 || u >= 0x7f) {
      return BadUrl("may contain only printable ASCII (no spaces or control characters)");
    }
    if (absl::string_view("\\\"<>^`{|}").find(c) != absl::string_view::npos) {
      return BadUrl("contains a character URLs may not contain");
    }
  }
  ReturnUrlParts p;
  const size_t sep = url.find("://");
  if (sep == absl::string_view::npos) {
    return BadUrl("must be an absolute http or https URL");
  }
  p.scheme = absl::AsciiStrToLower(url.substr(0, sep));
  if (p.scheme != "http" && p.scheme != "https") {
    return BadUrl("must use http or https");
  }
  absl::string_view rest = url.substr(sep + 3);
  const size_t authority_end = rest.find_first_of("/?#");
  const absl::string_view authority = rest.substr(0, authority_end);
  rest =
      authority_end == absl::string_view::npos ? absl::string_view() : rest.substr(authority_end);
  if (authority.find('@') != absl::string_view::npos) {
    return BadUrl("may not contain user information");
  }
  absl::string_view host = authority;
  absl::string_view port;
  if (absl::StartsWith(authority, "[")) {
    const size_t close = authority.find(']');
    if (close == absl::string_view::npos || close < 3) {
      return BadUrl("has a malformed IPv6 host");
    }
    host = authority.substr(0, close + 1);
    for (char c : host.substr(1, host.size() - 2)) {
      if (!IsHex(c) && c != ':' && c != '.') {
        return BadUrl("has a malformed IPv6 host");
      }
    }
    const absl::string_view after = authority.substr(close + 1);
    if (!after.empty()) {
      if (after[0] != ':') {
        return BadUrl("has a malformed IPv6 host");
      }
      port = after.substr(1);
      if (port.empty()) {
        return BadUrl("has an empty port");
      }
    }
  } else {
    if (const size_t colon = authority.rfind(':'); colon != absl::string_view::npos) {
      host = authority.substr(0, colon);
      port = authority.substr(colon + 1);
      if (port.empty()) {
        return BadUrl("has an empty port");
      }
    }
    if (host.empty()) {
      return BadUrl("has no host");
    }
    for (absl::string_view label : absl::StrSplit(host, '.')) {
      if (label.empty()) {
        return BadUrl("has an empty host label");
      }
      for (char c : label) {
        if (!absl::ascii_isalnum(static_cast<unsigned char>(c)) && c != '-') {
          return BadUrl("host may contain only letters, digits, dots and dashes");
        }
      }
    }
  }
  p.host = absl::AsciiStrToLower(host);
  p.port = p.scheme == "https" ? 443 : 80;
  if (!port.empty()) {
    if (port.size() > 5 ||
        !std::all_of(port.begin(), port.end(),
                     [](char c) { return absl::ascii_isdigit(static_cast<unsigned char>(c)); }) ||
        !absl::SimpleAtoi(port, &p.port) || p.port < 1 || p.port > 65535) {
      return BadUrl("has a port outside 1..65535");
    }
  }
  const size_t path_end = rest.find_first_of("?#");
  const absl::string_view path = rest.substr(0, path_end);
  p.path = path.empty() ? std::string(1, '/') : std::string(path);
  p.has_query_or_fragment = path_end != absl::string_view::npos;
  if (!EscapesWellFormed(rest)) {
    return BadUrl("has a malformed percent-escape");
  }
  const std::string lower_path = absl::AsciiStrToLower(p.path);
  if (absl::StrContains(lower_path, "%2f") || absl::StrContains(lower_path, "%5c")) {
    return BadUrl("path may not contain an encoded slash or backslash");
  }
  for (absl::string_view segment : absl::StrSplit(lower_path, '/')) {
    const std::string decoded = absl::StrReplaceAll(segment, {{"%2e", "."}});
    if (decoded == "." || decoded == "..") {
      return BadUrl("path may not contain '.' or '..' segments");
    }
  }
  return p;
}

bool PathHasPrefix(absl::string_view path, absl::string_view prefix) {
  if (!absl::StartsWith(path, prefix)) {
    return false;
  }
  return absl::EndsWith(prefix, "/") || path.size() == prefix.size() || path[prefix.size()] == '/';
}

}  // namespace

std::string SignLink(const ConnectLink& link, const KeyMaterial& key, const Digest& digest) {
  const std::string payload = Payload(link);
  return absl::StrCat(B64(payload), ".", B64(digest.HmacSha256(key.Reveal(), payload)));
}

absl::StatusOr<ConnectLink> VerifyLink(absl::string_view token, const KeyMaterial& key,
                                       const Digest& digest, absl::Time now) {
  if (token.size() > 4096) {
    return Invalid();
  }
  const std::vector<absl::string_view> outer = absl::StrSplit(token, '.');
  std::string payload;
  std::string mac;
  if (outer.size() != 2 || !UnB64(outer[0], &payload) || !UnB64(outer[1], &mac)) {
    return Invalid();
  }
  if (!ConstantTimeEquals(mac, digest.HmacSha256(key.Reveal(), payload))) {
    return Invalid();
  }
  // Signed by us, so well-formed unless the format changed; parse strictly all the same.
  const std::vector<absl::string_view> f = absl::StrSplit(payload, '.');
  ConnectLink link;
  int64_t expires = 0;
  const bool v1 = f.size() == 7 && f[0] == kVersion1;
  const bool v2 = f.size() == 8 && f[0] == kVersion2;
  if ((!v1 && !v2) || !UnB64(f[1], &link.id) || !UnB64(f[2], &link.connection_id) ||
      !UnB64(f[3], &link.provider) || !absl::SimpleAtoi(f[4], &expires) ||
      (f[5] != "0" && f[5] != "1")) {
    return Invalid();
  }
  // The second version exists only to carry a return URL: it is never empty there.
  if (v2 && (!UnB64(f[7], &link.return_url) || link.return_url.empty())) {
    return Invalid();
  }
  link.expires_at = absl::FromUnixSeconds(expires);
  link.reconnect = f[5] == "1";
  if (!f[6].empty()) {
    for (absl::string_view pair : absl::StrSplit(f[6], ',')) {
      const std::vector<absl::string_view> kv = absl::StrSplit(pair, ':');
      std::string k;
      std::string v;
      if (kv.size() != 2 || !UnB64(kv[0], &k) || !UnB64(kv[1], &v)) {
        return Invalid();
      }
      link.params.emplace(std::move(k), std::move(v));
    }
  }
  if (now >= link.expires_at) {
    return FlowError(absl::StatusCode::kFailedPrecondition, FlowErrorKind::kLinkExpired,
                     "connect link has expired");
  }
  return link;
}

absl::Status ValidateReturnUrlAllowlist(const std::vector<std::string>& allowlist) {
  for (const std::string& entry : allowlist) {
    absl::StatusOr<ReturnUrlParts> parsed = ParseReturnUrl(entry);
    if (!parsed.ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat("return URL allow-list entry '", entry, "': ", parsed.status().message()));
    }
    if (parsed->has_query_or_fragment) {
      return absl::InvalidArgumentError(absl::StrCat("return URL allow-list entry '", entry,
                                                     "' may not have a query or fragment"));
    }
  }
  return absl::OkStatus();
}

absl::Status CheckReturnUrl(absl::string_view url, const std::vector<std::string>& allowlist) {
  TB_ASSIGN_OR_RETURN(const ReturnUrlParts parsed, ParseReturnUrl(url));
  for (const std::string& entry : allowlist) {
    absl::StatusOr<ReturnUrlParts> allowed = ParseReturnUrl(entry);
    if (!allowed.ok() || allowed->has_query_or_fragment) {
      continue;  // an invalid entry allows nothing (ValidateReturnUrlAllowlist reports it)
    }
    if (parsed.scheme == allowed->scheme && parsed.host == allowed->host &&
        parsed.port == allowed->port && PathHasPrefix(parsed.path, allowed->path)) {
      return absl::OkStatus();
    }
  }
  return absl::InvalidArgumentError(
      allowlist.empty() ? "return URLs are not enabled (links.return_url_allowlist is empty)"
                        : "return URL is not on the allow-list");
}

}  // namespace tb::core
