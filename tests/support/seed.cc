#include "tests/support/seed.h"

#include "absl/strings/str_format.h"
#include "server/src/common/status_macros.h"
#include "tests/support/test_secrets.h"

namespace tb::testing {

namespace {

core::Grant NewGrant(absl::Time issued, std::optional<absl::Duration> lifetime) {
  core::Grant g;
  g.access_token = AccessToken(NewTestSecret("access"));
  g.refresh_token = RefreshToken(NewTestSecret("refresh"));
  g.scopes = {"read", "write"};
  g.issued_at = issued;
  if (lifetime) {
    g.expires_at = issued + *lifetime;
  }
  g.provider_token_id = "12345";
  return g;
}

absl::Status CreateActive(oauth::Broker& broker, const std::string& id, const std::string& provider,
                          core::Grant grant) {
  TB_RETURN_IF_ERROR(broker.CreatePending(id, provider, {{"subdomain", "acme"}}).status());
  return broker.Activate(id, std::move(grant)).status();
}

}  // namespace

absl::Status SeedEveryStatus(oauth::Broker& broker, absl::Time now) {
  TB_RETURN_IF_ERROR(CreateActive(broker, kActiveId, "zendesk", NewGrant(now, absl::Hours(1))));
  TB_RETURN_IF_ERROR(CreateActive(broker, kForeverId, "zendesk", NewGrant(now, std::nullopt)));
  TB_RETURN_IF_ERROR(
      CreateActive(broker, kExpiredId, "zendesk", NewGrant(now - absl::Hours(2), absl::Hours(1))));
  TB_RETURN_IF_ERROR(broker.CreatePending(kPendingId, "zendesk", {{"subdomain", "acme"}}).status());
  TB_RETURN_IF_ERROR(
      CreateActive(broker, kNeedsReauthId, "zendesk", NewGrant(now, absl::Hours(1))));
  TB_RETURN_IF_ERROR(
      broker.MarkNeedsReauth(kNeedsReauthId, core::Reason::kNeedsReauth, "invalid_grant"));
  TB_RETURN_IF_ERROR(
      CreateActive(broker, kRotationLostId, "zendesk", NewGrant(now, absl::Hours(1))));
  TB_RETURN_IF_ERROR(broker.MarkNeedsReauth(kRotationLostId, core::Reason::kRotationLost,
                                            "refresh answer lost before it was stored"));
  TB_RETURN_IF_ERROR(CreateActive(broker, kRevokedId, "zendesk", NewGrant(now, absl::Hours(1))));
  TB_RETURN_IF_ERROR(broker.MarkRevoked(kRevokedId));
  TB_RETURN_IF_ERROR(CreateActive(broker, kDeletedId, "zendesk", NewGrant(now, absl::Hours(1))));
  return broker.Delete(kDeletedId);
}

absl::Status SeedBulk(oauth::Broker& broker, absl::Time now, int count) {
  for (int i = 0; i < count; ++i) {
    TB_RETURN_IF_ERROR(CreateActive(broker, absl::StrFormat("bulk-%06d", i),
                                    i % 2 == 0 ? "zendesk" : "zendesk-chat",
                                    NewGrant(now, absl::Hours(1))));
  }
  return absl::OkStatus();
}

}  // namespace tb::testing
