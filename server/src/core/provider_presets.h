#ifndef TB_CORE_PROVIDER_PRESETS_H_
#define TB_CORE_PROVIDER_PRESETS_H_

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "server/src/core/provider_spec.h"

namespace tb::core {

// The defaults of a preset (DESIGN.md, "Zendesk facts"):
//   zendesk       https://{subdomain}.zendesk.com/oauth/..., JSON bodies, client secret in the
//                 body, PKCE S256, scopes "read write", expires_in 1800 s and
//                 refresh_token_expires_in 30 days, token id lookup, revocation by id
//   zendesk-chat  https://www.zopim.com/oauth2/..., `subdomain` sent on authorize, scopes
//                 "read write chat", no PKCE, form bodies
//   generic       no URLs (config must give them), form bodies, client_secret_basic, PKCE,
//                 RFC 7009 revocation
// Errors: INVALID_ARGUMENT for an unknown preset, naming the known ones.
absl::StatusOr<ProviderSpec> PresetSpec(absl::string_view preset);

// Checks a finished spec (preset plus overrides): URLs present and https (http only for
// loopback hosts, for development), client id and secret set, and for Zendesk presets the
// documented ranges 300 < expires_in < 172800, expires_in < refresh_token_expires_in,
// 604800 < refresh_token_expires_in < 7776000. Errors: INVALID_ARGUMENT naming the field.
absl::Status ValidateSpec(const ProviderSpec& spec);

}  // namespace tb::core

#endif  // TB_CORE_PROVIDER_PRESETS_H_
