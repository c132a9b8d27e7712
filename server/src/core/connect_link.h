#ifndef TB_CORE_CONNECT_LINK_H_
#define TB_CORE_CONNECT_LINK_H_

// Connect links: what an operator mints (CreateConnectLink) and hands to an account admin.
// The link's token carries its fields and an HMAC-SHA-256 over them, so /oauth/start can check
// it before touching any state; revocation and use are tracked in the store by link id.

#include <map>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "server/src/common/secret.h"
#include "server/src/core/connection.h"
#include "server/src/core/digest.h"

namespace tb::core {

struct ConnectLink {
  std::string id;  // random, base64url; names the link for revocation
  ConnectionId connection_id;
  std::string provider;
  std::map<std::string, std::string> params;
  absl::Time expires_at;
  bool reconnect = false;  // may replace an active grant
  // Where the result page's "Continue" link points; empty: no such link. Checked against the
  // allow-list when minted, and again whenever it is about to be shown.
  std::string return_url;
};

// What the store keeps about a link besides its signed fields.
struct LinkRecord {
  ConnectLink link;
  bool revoked = false;
  std::optional<absl::Time> used_at;  // set when a callback completed through it
};

// "<base64url(payload)>.<base64url(hmac)>". The payload is a versioned, unambiguous encoding
// of every field, so no two links sign the same bytes. A link without a return_url is signed in
// the first version ("tblink1", byte for byte what earlier releases signed, so a rollback still
// verifies it); one with a return_url in the second ("tblink2", the same fields plus it).
std::string SignLink(const ConnectLink& link, const KeyMaterial& key, const Digest& digest);

// Checks the signature (constant time) and the expiry; takes both versions. Errors:
// INVALID_ARGUMENT with flow error kLinkInvalid (malformed, tampered, other key),
// FAILED_PRECONDITION with kLinkExpired.
absl::StatusOr<ConnectLink> VerifyLink(absl::string_view token, const KeyMaterial& key,
                                       const Digest& digest, absl::Time now);

// Return URLs. The one form accepted, for allow-list entries and for URLs alike:
//   http[s]://host[:port][/path][?query][#fragment]
// in printable ASCII (no spaces, control characters, backslashes, `"<>^`{|}`, non-ASCII: a
// Unicode URL must come percent-encoded and its host in punycode), no userinfo (`@` in the
// authority), a host of letters, digits, dots and dashes (or a bracketed IPv6 literal), a port of
// 1..65535, well-formed percent-escapes, and no "." or ".." path segment nor an encoded `/` or `\`
// in the path (a browser would resolve them past the allow-listed prefix). Scheme and host compare
// case-insensitively; an absent port is the scheme's default. Entries take no query or fragment.
//
// A URL is allowed when its scheme, host and port equal an entry's and its path starts with the
// entry's path at a segment boundary: the entry "https://app.example/done" allows ".../done",
// ".../done/x" and ".../done?x", not ".../donex"; "https://app.example/" allows the whole origin.
// Errors: INVALID_ARGUMENT saying what is wrong (the URL is an operator's input, not a secret).
absl::Status CheckReturnUrl(absl::string_view url, const std::vector<std::string>& allowlist);

// Errors: INVALID_ARGUMENT naming the first entry that is not a valid allow-list entry.
absl::Status ValidateReturnUrlAllowlist(const std::vector<std::string>& allowlist);

}  // namespace tb::core

#endif  // TB_CORE_CONNECT_LINK_H_
