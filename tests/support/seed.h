#ifndef TB_TESTS_SUPPORT_SEED_H_
#define TB_TESTS_SUPPORT_SEED_H_

#include <string>

#include "absl/status/status.h"
#include "absl/time/time.h"
#include "server/src/oauth/broker.h"

namespace tb::testing {

// Ids of the connections SeedEveryStatus creates, one per lifecycle state.
inline constexpr char kActiveId[] = "active-co";       // active, 1 h token, refreshable
inline constexpr char kForeverId[] = "forever-co";     // active, no expiry (classic token)
inline constexpr char kExpiredId[] = "expired-co";     // active but its token has expired
inline constexpr char kPendingId[] = "pending-co";     // pending: NOT_CONNECTED
inline constexpr char kNeedsReauthId[] = "reauth-co";  // needs_reauth: NEEDS_REAUTH
inline constexpr char kRotationLostId[] = "lost-co";   // needs_reauth: ROTATION_LOST
inline constexpr char kRevokedId[] = "revoked-co";     // revoked: REVOKED
inline constexpr char kDeletedId[] = "deleted-co";     // created, then deleted: NOT_FOUND

// Creates the connections above through the broker's own lifecycle calls, with tokens from
// NewTestSecret. `now` is the broker's clock reading.
absl::Status SeedEveryStatus(oauth::Broker& broker, absl::Time now);

// Creates `count` active connections "bulk-000000".."bulk-<count-1>" (provider "zendesk" for
// even numbers, "zendesk-chat" for odd ones).
absl::Status SeedBulk(oauth::Broker& broker, absl::Time now, int count);

}  // namespace tb::testing

#endif  // TB_TESTS_SUPPORT_SEED_H_
