#ifndef TB_CORE_CONNECT_LINK_H_
#define TB_CORE_CONNECT_LINK_H_

// Connect links: what an operator mints (CreateConnectLink) and hands to an account admin.
// The link's token carries its fields and an HMAC-SHA-256 over them, so /oauth/start can check
// it before touching any state; revocation and use are tracked in the store by link id.

#include <map>
#include <optional>
#include <string>

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
};

// What the store keeps about a link besides its signed fields.
struct LinkRecord {
  ConnectLink link;
  bool revoked = false;
  std::optional<absl::Time> used_at;  // set when a callback completed through it
};

// "<base64url(payload)>.<base64url(hmac)>". The payload is a versioned, unambiguous encoding
// of every field, so no two links sign the same bytes.
std::string SignLink(const ConnectLink& link, const KeyMaterial& key, const Digest& digest);

// Checks the signature (constant time) and the expiry. Errors: INVALID_ARGUMENT with flow
// error kLinkInvalid (malformed, tampered, other key), FAILED_PRECONDITION with kLinkExpired.
absl::StatusOr<ConnectLink> VerifyLink(absl::string_view token, const KeyMaterial& key,
                                       const Digest& digest, absl::Time now);

}  // namespace tb::core

#endif  // TB_CORE_CONNECT_LINK_H_
