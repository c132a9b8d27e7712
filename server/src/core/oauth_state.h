#ifndef TB_CORE_OAUTH_STATE_H_
#define TB_CORE_OAUTH_STATE_H_

// The per-authorization secrets of the authorization-code flow (RFC 6749, RFC 7636, RFC 9700):
// `state`, the PKCE verifier and challenge, and the browser binding.

#include <string>

#include "absl/strings/string_view.h"
#include "server/src/common/secret.h"
#include "server/src/core/digest.h"
#include "server/src/core/random.h"

namespace tb::core {

// base64url without padding (RFC 4648 section 5), as PKCE and our tokens use.
std::string Base64UrlNoPad(absl::string_view bytes);

// A fresh random token of `bytes` random bytes, base64url without padding.
std::string RandomToken(Random& random, size_t bytes);

// `state`: 32 random bytes (256 bits; RFC 9700 asks for at least 128).
OAuthState NewState(Random& random);

// A PKCE code verifier: 32 random bytes -> 43 characters of [A-Za-z0-9-_] (RFC 7636 4.1).
PkceVerifier NewPkceVerifier(Random& random);

// S256 challenge: BASE64URL(SHA256(ASCII(verifier))) (RFC 7636 4.2).
std::string PkceChallengeS256(const Digest& digest, const PkceVerifier& verifier);

// Constant-time equality for secrets compared against attacker input.
bool ConstantTimeEquals(absl::string_view a, absl::string_view b);

}  // namespace tb::core

#endif  // TB_CORE_OAUTH_STATE_H_
