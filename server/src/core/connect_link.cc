#include "server/src/core/connect_link.h"

#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/escaping.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "server/src/core/errors.h"
#include "server/src/core/oauth_state.h"

namespace tb::core {

namespace {

constexpr absl::string_view kVersion = "tblink1";

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
  return absl::StrJoin({std::string(kVersion), B64(l.id), B64(l.connection_id), B64(l.provider),
                        absl::StrCat(absl::ToUnixSeconds(l.expires_at)),
                        std::string(l.reconnect ? "1" : "0"), absl::StrJoin(params, ",")},
                       ".");
}

absl::Status Invalid() {
  return FlowError(absl::StatusCode::kInvalidArgument, FlowErrorKind::kLinkInvalid,
                   "connect link is not valid");
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
  if (f.size() != 7 || f[0] != kVersion || !UnB64(f[1], &link.id) ||
      !UnB64(f[2], &link.connection_id) || !UnB64(f[3], &link.provider) ||
      !absl::SimpleAtoi(f[4], &expires) || (f[5] != "0" && f[5] != "1")) {
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

}  // namespace tb::core
