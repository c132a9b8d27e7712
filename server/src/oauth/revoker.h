#ifndef TB_OAUTH_REVOKER_H_
#define TB_OAUTH_REVOKER_H_

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "server/src/common/clock.h"
#include "server/src/core/connection.h"
#include "server/src/core/provider_client.h"
#include "server/src/core/provider_spec.h"
#include "server/src/oauth/broker.h"
#include "server/src/oauth/events.h"

namespace tb::oauth {

struct RevokerOptions {
  // Bound on each provider call.
  absl::Duration provider_timeout = absl::Seconds(30);
  // A Zendesk access token this close to its expiry is refreshed before it authorizes the
  // revocation of itself (Zendesk revokes by id with the token as Bearer).
  absl::Duration expiry_margin = absl::Seconds(10);
};

// Revokes grants at their provider: Zendesk by token id (DELETE .../tokens/{id}.json with the
// grant's own access token; an expired or rejected one is refreshed first, since a dead access
// token cannot authorize its own revocation but its refresh token still lives), RFC 7009
// otherwise. What is still owed lives in Connection::to_revoke, durably, until the provider
// confirms; a refresh done to revoke is stored there before the revoke is sent.
//
// Thread-safe. Blocks on the provider: call it on the work pool. Everything passed to the
// constructor must outlive it.
class Revoker {
 public:
  Revoker(RevokerOptions options, const core::ProviderDirectory& providers, const Clock& clock,
          Broker& broker, core::ProviderClient& provider_client, EventSink events = nullptr);

  // Tries every revocation `id` still owes, once. Returns true when none is left (confirmed,
  // already gone at the provider, or refused for good: logged through `events`), false when
  // some must be retried later (provider down, rate limited, client credentials rejected).
  // Errors: NOT_FOUND (connection gone).
  absl::StatusOr<bool> RevokePending(const core::ConnectionId& id);

  // Revokes `grant` of `connection` (which need not be stored any more) once, recording
  // nothing. OK when confirmed or already gone.
  absl::Status RevokeDetached(const core::Connection& connection, const core::Grant& grant);

 private:
  enum class Outcome { kDone, kRetry };
  // One grant: refresh first when needed, then revoke. `recorded`: the grant is in the stored
  // connection's to_revoke, so a refreshed replacement is stored before use.
  Outcome RevokeOne(const core::ProviderSpec& spec, const core::Connection& connection,
                    core::Grant grant, bool recorded);

  const RevokerOptions options_;
  const core::ProviderDirectory& providers_;
  const Clock& clock_;
  Broker& broker_;
  core::ProviderClient& provider_client_;
  const EventSink events_;
};

}  // namespace tb::oauth

#endif  // TB_OAUTH_REVOKER_H_
