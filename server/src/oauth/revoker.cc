#include "server/src/oauth/revoker.h"

#include <string>
#include <utility>

#include "server/src/core/errors.h"

namespace tb::oauth {

namespace {

bool Retryable(const absl::Status& s) {
  switch (s.code()) {
    case absl::StatusCode::kUnavailable:
    case absl::StatusCode::kDeadlineExceeded:
    case absl::StatusCode::kResourceExhausted:
    case absl::StatusCode::kAborted:
    case absl::StatusCode::kInternal:
      return true;
    case absl::StatusCode::kFailedPrecondition:
      // Our client credentials were rejected: an operator fixes the configuration, then the
      // revocation must still happen.
      return core::ReasonOf(s) == core::Reason::kProviderMisconfigured;
    default:
      return false;
  }
}

bool HasRefreshToken(const core::Grant& g) { return g.refresh_token && !g.refresh_token->empty(); }

}  // namespace

Revoker::Revoker(RevokerOptions options, const core::ProviderDirectory& providers,
                 const Clock& clock, Broker& broker, core::ProviderClient& provider_client,
                 EventSink events)
    : options_(options),
      providers_(providers),
      clock_(clock),
      broker_(broker),
      provider_client_(provider_client),
      events_(std::move(events)) {}

absl::StatusOr<bool> Revoker::RevokePending(const core::ConnectionId& id) {
  absl::StatusOr<std::shared_ptr<const core::Connection>> got = broker_.GetConnection(id);
  if (!got.ok()) {
    return got.status();
  }
  const std::shared_ptr<const core::Connection> c = *got;
  if (c->to_revoke.empty()) {
    return true;
  }
  const std::shared_ptr<const core::ProviderSpec> spec = providers_.Find(c->provider);
  if (spec == nullptr) {
    // The provider was removed from the configuration: nothing can be revoked until it is back.
    if (events_) {
      events_("revoke_deferred", id,
              absl::FailedPreconditionError("the connection's provider is not configured"));
    }
    return false;
  }
  bool all_done = true;
  for (const core::Grant& g : c->to_revoke) {
    if (RevokeOne(*spec, *c, g, /*recorded=*/true) == Outcome::kRetry) {
      all_done = false;
    }
  }
  return all_done;
}

absl::Status Revoker::RevokeDetached(const core::Connection& connection, const core::Grant& grant) {
  const std::shared_ptr<const core::ProviderSpec> spec = providers_.Find(connection.provider);
  if (spec == nullptr) {
    return absl::FailedPreconditionError("the connection's provider is not configured");
  }
  return RevokeOne(*spec, connection, grant, /*recorded=*/false) == Outcome::kDone
             ? absl::OkStatus()
             : absl::UnavailableError("the provider did not confirm the revocation");
}

Revoker::Outcome Revoker::RevokeOne(const core::ProviderSpec& spec,
                                    const core::Connection& connection, core::Grant grant,
                                    bool recorded) {
  const core::ConnectionId& id = connection.id;
  const core::Grant original = grant;
  core::Connection view = connection;
  const auto finish = [&](Outcome outcome, const absl::Status& s) {
    if (outcome == Outcome::kDone && recorded) {
      // Whatever the entry is now (the original or its refreshed replacement), it is settled.
      (void)broker_.ResolveRevocation(id, grant);
      (void)broker_.ResolveRevocation(id, original);
    }
    if (events_) {
      events_(outcome == Outcome::kDone ? (s.ok() ? "revoked_at_provider" : "revoke_abandoned")
                                        : "revoke_retry",
              id, s);
    }
    return outcome;
  };
  // Zendesk authorizes a revocation with the token itself: a dead access token must be
  // refreshed first (and the refreshed grant, the only live one now, stored to be revoked).
  const bool bearer = spec.revocation == core::Revocation::kZendeskTokenId;
  bool refreshed = false;
  const auto refresh_first = [&]() -> std::optional<Outcome> {
    view.grant = grant;
    absl::StatusOr<core::Grant> next =
        provider_client_.Refresh(spec, view, clock_.Now() + options_.provider_timeout);
    if (!next.ok()) {
      if (core::ReasonOf(next.status()) == core::Reason::kNeedsReauth) {
        // The refresh token is dead and the access token expired: nothing of this grant lives.
        return finish(Outcome::kDone, absl::OkStatus());
      }
      return finish(Retryable(next.status()) ? Outcome::kRetry : Outcome::kDone, next.status());
    }
    if (!HasRefreshToken(*next)) {
      next->refresh_token = grant.refresh_token;
    }
    next->generation = grant.generation;
    if (recorded) {
      // Stored before it is used: if we die now, the next attempt revokes this one.
      (void)broker_.ReplaceRevocation(id, grant, *next);
    }
    grant = *std::move(next);
    refreshed = true;
    return std::nullopt;
  };
  if (bearer && grant.expires_at && *grant.expires_at <= clock_.Now() + options_.expiry_margin) {
    if (!HasRefreshToken(grant)) {
      return finish(Outcome::kDone, absl::OkStatus());  // expired, not refreshable: dead
    }
    if (std::optional<Outcome> o = refresh_first()) {
      return *o;
    }
  }
  view.grant = grant;
  absl::Status s = provider_client_.Revoke(spec, view, clock_.Now() + options_.provider_timeout);
  if (s.code() == absl::StatusCode::kUnauthenticated && bearer && !refreshed) {
    // The provider no longer takes this access token (expired early, or killed by a refresh
    // whose answer we never stored): only its refresh token can still be alive.
    if (!HasRefreshToken(grant)) {
      return finish(Outcome::kDone, absl::OkStatus());
    }
    if (std::optional<Outcome> o = refresh_first()) {
      return *o;
    }
    view.grant = grant;
    s = provider_client_.Revoke(spec, view, clock_.Now() + options_.provider_timeout);
  }
  if (s.ok()) {
    return finish(Outcome::kDone, s);
  }
  return finish(Retryable(s) ? Outcome::kRetry : Outcome::kDone, s);
}

}  // namespace tb::oauth
