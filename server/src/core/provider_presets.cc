#include "server/src/core/provider_presets.h"

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"

namespace tb::core {

absl::StatusOr<ProviderSpec> PresetSpec(absl::string_view preset) {
  ProviderSpec s;
  s.preset = std::string(preset);
  if (preset == "zendesk") {
    s.authorize_url = "https://{subdomain}.zendesk.com/oauth/authorizations/new";
    s.token_url = "https://{subdomain}.zendesk.com/oauth/tokens";
    s.token_info_url = "https://{subdomain}.zendesk.com/api/v2/oauth/tokens/current.json";
    // Revoke by id: DELETE .../current.json is reported to answer 204 and revoke nothing.
    s.revoke_url = "https://{subdomain}.zendesk.com/api/v2/oauth/tokens/{token_id}.json";
    s.revocation = Revocation::kZendeskTokenId;
    s.scopes = {"read", "write"};
    s.body_encoding = BodyEncoding::kJson;
    s.client_auth = ClientAuth::kSecretPost;
    s.pkce = true;
    s.required_params = {"subdomain"};
    s.expires_in = 1800;
    s.refresh_token_expires_in = 30 * 24 * 3600;
    return s;
  }
  if (preset == "zendesk-chat") {
    s.authorize_url = "https://www.zopim.com/oauth2/authorizations/new";
    s.token_url = "https://www.zopim.com/oauth2/token";
    s.revocation = Revocation::kNone;
    s.scopes = {"read", "write", "chat"};
    s.body_encoding = BodyEncoding::kForm;
    s.client_auth = ClientAuth::kSecretPost;
    s.pkce = false;
    s.required_params = {"subdomain"};
    s.authorize_params_from_connection = {"subdomain"};
    return s;
  }
  if (preset == "generic") {
    s.revocation = Revocation::kRfc7009;
    s.body_encoding = BodyEncoding::kForm;
    s.client_auth = ClientAuth::kSecretBasic;
    s.pkce = true;
    return s;
  }
  return absl::InvalidArgumentError(
      absl::StrCat("unknown preset '", preset, "'; presets: zendesk, zendesk-chat, generic"));
}

namespace {

absl::Status CheckUrl(const ProviderSpec& s, absl::string_view field, const std::string& url,
                      bool required) {
  if (url.empty()) {
    return required ? absl::InvalidArgumentError(
                          absl::StrCat("provider '", s.name, "': ", field, " is required"))
                    : absl::OkStatus();
  }
  if (absl::StartsWith(url, "https://")) {
    return absl::OkStatus();
  }
  // Plain http only to this machine: the development provider and tests.
  for (absl::string_view loopback : {"http://127.0.0.1", "http://localhost", "http://[::1]"}) {
    if (absl::StartsWith(url, loopback)) {
      return absl::OkStatus();
    }
  }
  return absl::InvalidArgumentError(absl::StrCat("provider '", s.name, "': ", field,
                                                 " must be an https:// URL, got '", url, "'"));
}

}  // namespace

absl::Status ValidateSpec(const ProviderSpec& s) {
  if (absl::Status st = CheckUrl(s, "authorize_url", s.authorize_url, true); !st.ok()) {
    return st;
  }
  if (absl::Status st = CheckUrl(s, "token_url", s.token_url, true); !st.ok()) {
    return st;
  }
  const bool needs_revoke_url = s.revocation != Revocation::kNone;
  if (absl::Status st = CheckUrl(s, "revoke_url", s.revoke_url, needs_revoke_url); !st.ok()) {
    return st;
  }
  if (absl::Status st = CheckUrl(s, "token_info_url", s.token_info_url,
                                 s.revocation == Revocation::kZendeskTokenId);
      !st.ok()) {
    return st;
  }
  if (s.client_id.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat("provider '", s.name, "': client_id is required"));
  }
  if (s.client_secret.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "provider '", s.name, "': client secret is required (client_secret_file or _env)"));
  }
  if (s.preset == "zendesk") {
    if (!s.expires_in || *s.expires_in <= 300 || *s.expires_in >= 172800) {
      return absl::InvalidArgumentError(absl::StrCat(
          "provider '", s.name, "': expires_in must be above 300 and below 172800 seconds"));
    }
    if (!s.refresh_token_expires_in || *s.refresh_token_expires_in <= 604800 ||
        *s.refresh_token_expires_in >= 7776000) {
      return absl::InvalidArgumentError(
          absl::StrCat("provider '", s.name,
                       "': refresh_token_expires_in must be above 604800 and below 7776000 "
                       "seconds (7 to 90 days)"));
    }
    if (*s.expires_in >= *s.refresh_token_expires_in) {
      return absl::InvalidArgumentError(absl::StrCat(
          "provider '", s.name, "': expires_in must be below refresh_token_expires_in"));
    }
  }
  if (s.connect_timeout <= absl::ZeroDuration() || s.request_timeout <= absl::ZeroDuration()) {
    return absl::InvalidArgumentError(
        absl::StrCat("provider '", s.name, "': timeouts must be positive"));
  }
  return absl::OkStatus();
}

}  // namespace tb::core
