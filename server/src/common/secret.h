#ifndef TB_COMMON_SECRET_H_
#define TB_COMMON_SECRET_H_

// Secret<Tag>: a value that must never reach a log, an error message or a metric label.
// It has no implicit conversion to a string; streaming or formatting it prints only
// "<kind>:<fingerprint>", where the fingerprint is the first 8 hex digits of a keyed digest
// (HMAC-SHA-256) of the value: enough to correlate log lines, far too little to recover
// anything, and, being keyed, useless for checking a guessed token against a log. The raw value
// is reachable only through Reveal(), which is the one call a security review has to grep for.
// Its memory is wiped (OPENSSL_cleanse) when it is destroyed, overwritten or moved from.

#include <cstddef>
#include <ostream>
#include <string>
#include <utility>

#include "absl/strings/string_view.h"

namespace tb {

// Short keyed fingerprint ("1a2b3c4d") of `value`: HMAC-SHA-256 under the fingerprint key.
// Thread-safe.
std::string Fingerprint(absl::string_view value);

// Sets the fingerprint key. Until it is called, a random key made at first use (so fingerprints
// correlate within one process only). main derives it from a configured secret so that replicas
// and restarts agree. Call once at start, before other threads use Fingerprint.
void SetFingerprintKey(absl::string_view key);

namespace internal {
// Overwrites `n` bytes at `p` in a way the compiler may not optimize away (OPENSSL_cleanse).
void Cleanse(void* p, size_t n);
}  // namespace internal

template <typename Tag>
class Secret {
 public:
  Secret() = default;
  explicit Secret(std::string value) : value_(std::move(value)) {}
  Secret(const Secret& o) : value_(o.value_) {}
  // A moved-from string may keep its characters in its inline buffer: wipe it.
  Secret(Secret&& o) noexcept : value_(std::move(o.value_)) { o.Wipe(); }
  Secret& operator=(const Secret& o) {
    if (this != &o) {
      Wipe();
      value_ = o.value_;
    }
    return *this;
  }
  Secret& operator=(Secret&& o) noexcept {
    if (this != &o) {
      Wipe();
      value_ = std::move(o.value_);
      o.Wipe();
    }
    return *this;
  }
  ~Secret() { Wipe(); }

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
  void Wipe() noexcept {
    // The whole buffer (inline or allocated), not just size() bytes.
    internal::Cleanse(value_.data(), value_.capacity());
    value_.clear();
  }

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
