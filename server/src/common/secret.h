#ifndef TB_COMMON_SECRET_H_
#define TB_COMMON_SECRET_H_

// Secret<Tag>: a value that must never reach a log, an error message or a metric label.
// It has no implicit conversion to a string; streaming or formatting it prints only
// "<kind>:<fingerprint>", where the fingerprint is the first 8 hex digits of SHA-256 of the value
// (enough to correlate log lines, far too little to recover anything). The raw value is reachable
// only through Reveal(), which is the one call a security review has to grep for.

#include <ostream>
#include <string>
#include <utility>

#include "absl/strings/string_view.h"

namespace tb {

// Short SHA-256 fingerprint ("1a2b3c4d") of `value`. Thread-safe.
std::string Fingerprint(absl::string_view value);

template <typename Tag>
class Secret {
 public:
  Secret() = default;
  explicit Secret(std::string value) : value_(std::move(value)) {}

  // The raw value. Call only where the secret must leave the process (wire, store, cipher).
  absl::string_view Reveal() const { return value_; }
  bool empty() const { return value_.empty(); }

  // "<kind>:<fingerprint>", or "<kind>:<empty>". Safe to log.
  std::string Redacted() const {
    return std::string(Tag::kKind) + ":" + (value_.empty() ? "<empty>" : Fingerprint(value_));
  }

  friend bool operator==(const Secret& a, const Secret& b) { return a.value_ == b.value_; }
  friend std::ostream& operator<<(std::ostream& os, const Secret& s) { return os << s.Redacted(); }

 private:
  std::string value_;
};

struct AccessTokenTag {
  static constexpr absl::string_view kKind = "access_token";
};
struct RefreshTokenTag {
  static constexpr absl::string_view kKind = "refresh_token";
};
struct AuthCodeTag {
  static constexpr absl::string_view kKind = "auth_code";
};
struct ClientSecretTag {
  static constexpr absl::string_view kKind = "client_secret";
};
struct StateTag {
  static constexpr absl::string_view kKind = "state";
};
struct PkceVerifierTag {
  static constexpr absl::string_view kKind = "pkce_verifier";
};
struct KeyMaterialTag {
  static constexpr absl::string_view kKind = "key";
};
struct ApiKeyTag {
  static constexpr absl::string_view kKind = "api_key";
};

using AccessToken = Secret<AccessTokenTag>;
using RefreshToken = Secret<RefreshTokenTag>;
using AuthCode = Secret<AuthCodeTag>;
using ClientSecret = Secret<ClientSecretTag>;
using OAuthState = Secret<StateTag>;
using PkceVerifier = Secret<PkceVerifierTag>;
using KeyMaterial = Secret<KeyMaterialTag>;
using ApiKey = Secret<ApiKeyTag>;

}  // namespace tb

#endif  // TB_COMMON_SECRET_H_
