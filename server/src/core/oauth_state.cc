#include "server/src/core/oauth_state.h"

#include <vector>

#include "absl/strings/escaping.h"

namespace tb::core {

std::string Base64UrlNoPad(absl::string_view bytes) {
  // absl's WebSafeBase64Escape is base64url without padding.
  return absl::WebSafeBase64Escape(bytes);
}

std::string RandomToken(Random& random, size_t bytes) {
  std::vector<uint8_t> buf(bytes);
  random.Fill(absl::MakeSpan(buf));
  return Base64UrlNoPad(absl::string_view(reinterpret_cast<const char*>(buf.data()), buf.size()));
}

OAuthState NewState(Random& random) { return OAuthState(RandomToken(random, 32)); }

PkceVerifier NewPkceVerifier(Random& random) { return PkceVerifier(RandomToken(random, 32)); }

std::string PkceChallengeS256(const Digest& digest, const PkceVerifier& verifier) {
  return Base64UrlNoPad(digest.Sha256(verifier.Reveal()));
}

bool ConstantTimeEquals(absl::string_view a, absl::string_view b) {
  if (a.size() != b.size()) {
    return false;
  }
  unsigned char diff = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    diff |= static_cast<unsigned char>(a[i] ^ b[i]);
  }
  return diff == 0;
}

}  // namespace tb::core
