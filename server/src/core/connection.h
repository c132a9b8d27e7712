#ifndef TB_CORE_CONNECTION_H_
#define TB_CORE_CONNECTION_H_

// The connection model: one authorized account at one provider and its token set (DESIGN.md,
// "Words"). Plain values; no I/O, no locking.

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "server/src/common/boxed_optional.h"
#include "server/src/common/rarely_set.h"
#include "server/src/common/secret.h"

namespace tb::core {

using ConnectionId = std::string;

// Lifecycle: kPending (link minted) -> kActive (authorized) -> kNeedsReauth / kRevoked.
// A deleted connection is gone (NOT_FOUND), so it has no status.
enum class ConnectionStatus { kPending, kActive, kNeedsReauth, kRevoked };

// Machine-readable reasons carried in google.rpc.ErrorInfo.reason (domain "tokenbroker.v1").
enum class Reason {
  kNone,
  kNotConnected,           // pending: the account was never connected
  kNeedsReauth,            // the provider rejected the refresh token (invalid_grant)
  kRotationLost,           // a refresh's answer was lost between the provider and our store
  kRevoked,                // revoked on request
  kNotRefreshable,         // no refresh token and the access token no longer serves
  kProviderMisconfigured,  // the provider rejected our client credentials (invalid_client)
};

absl::string_view ConnectionStatusName(ConnectionStatus s);  // "pending", "active", ...
std::optional<ConnectionStatus> ParseConnectionStatus(absl::string_view name);
absl::string_view ReasonName(Reason r);  // "NOT_CONNECTED", ...; "" for kNone

// The token set a provider issued, plus what we derived from it.
struct Grant {
  AccessToken access_token;
  std::string token_type = "Bearer";
  std::vector<std::string> scopes;
  std::optional<RefreshToken> refresh_token;  // absent: not refreshable
  absl::Time issued_at = absl::InfinitePast();
  std::optional<absl::Time> expires_at;  // absent: valid until revoked
  std::optional<absl::Time> refresh_at;  // absent: no refresh scheduled
  // When the refresh token dies if unused (Zendesk: refresh_token_expires_in). Absent: unknown.
  // Idle connections are refreshed before half of its lifetime has passed.
  std::optional<absl::Time> refresh_token_expires_at;
  std::string provider_token_id;  // for revocation by id (Zendesk)
  uint64_t generation = 0;        // increases with every new token

  // The promise made to callers: the earlier of expiry and the scheduled refresh.
  // InfiniteFuture() when the token never expires and no refresh is scheduled.
  absl::Time ValidUntil() const;
};

// A refresh that was sent (or was about to be) and whose outcome is not known yet: written to
// the store before the provider call, cleared when the rotated grant is stored.
struct RefreshIntent {
  uint64_t generation = 0;                // the generation being refreshed
  std::string refresh_token_fingerprint;  // Fingerprint() of the refresh token sent
  absl::Time recorded_at = absl::InfinitePast();

  friend bool operator==(const RefreshIntent&, const RefreshIntent&) = default;
};

struct Connection {
  ConnectionId id;
  std::string provider;                       // provider name from config (e.g. "zendesk")
  std::map<std::string, std::string> params;  // e.g. {"subdomain": "acme"}
  ConnectionStatus status = ConnectionStatus::kPending;
  Reason reason = Reason::kNotConnected;  // why it is not serving, kNone when active
  RarelySet<std::string> last_error;      // operator-facing detail, never a secret
  std::optional<Grant> grant;
  // A refresh of this grant was sent and its outcome is not known yet (or was lost). An
  // invalid_grant seen while it is set means the provider rotated and we lost the answer
  // (ROTATION_LOST). Boxed: empty in nearly every connection, 64 bytes inline.
  BoxedOptional<RefreshIntent> refresh_intent;
  // Grants that must still be revoked at the provider (revoke, reconnect, a refresh that lost
  // to a revoke), kept with their secrets until the provider confirms. Retried with backoff.
  // Like the two strings here, empty in nearly every connection, hence RarelySet.
  RarelySet<std::vector<Grant>> to_revoke;
  // Non-empty: the stored secrets of this record could not be read back (wrong key, corrupted
  // ciphertext); it answers DATA_LOSS until reconnected. Says why, never a secret.
  RarelySet<std::string> data_loss;
  // Increases with every stored write of this record; the store's compare-and-set key. Set by
  // the broker (current + 1) before each write.
  uint64_t revision = 0;
  absl::Time created_at = absl::InfinitePast();
  absl::Time updated_at = absl::InfinitePast();

  // Generation of the current grant, 0 when none.
  uint64_t generation() const { return grant ? grant->generation : 0; }
};

// A connection id is what an operator chose: 1 to 128 characters of [A-Za-z0-9._:-], starting
// with a letter or digit. Returns kInvalidArgument with the rule otherwise.
absl::Status ValidateConnectionId(absl::string_view id);

}  // namespace tb::core

#endif  // TB_CORE_CONNECTION_H_
