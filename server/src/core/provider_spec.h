#ifndef TB_CORE_PROVIDER_SPEC_H_
#define TB_CORE_PROVIDER_SPEC_H_

// A provider: an OAuth 2.0 authorization server and our client registration at it
// (DESIGN.md, "Words"). Presets fill these fields; config may override every one.

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "server/src/common/mutex.h"
#include "server/src/common/secret.h"

namespace tb::core {

enum class BodyEncoding { kJson, kForm };             // token and revoke request bodies
enum class ClientAuth { kSecretPost, kSecretBasic };  // RFC 6749 section 2.3.1
enum class Revocation { kNone, kZendeskTokenId, kRfc7009 };

struct ProviderSpec {
  std::string name;    // what connections name, e.g. "zendesk"
  std::string preset;  // "zendesk", "zendesk-chat" or "generic"

  // URL templates: "{name}" is replaced by the connection's parameter `name` (validated first,
  // see ExpandUrl). revoke_url and token_info_url may be empty.
  std::string authorize_url;
  std::string token_url;
  std::string revoke_url;      // Zendesk: ".../api/v2/oauth/tokens/{token_id}.json"; RFC 7009
  std::string token_info_url;  // Zendesk: ".../api/v2/oauth/tokens/current.json"; else empty

  std::vector<std::string> scopes;
  std::string client_id;
  ClientSecret client_secret;
  BodyEncoding body_encoding = BodyEncoding::kForm;
  ClientAuth client_auth = ClientAuth::kSecretPost;
  Revocation revocation = Revocation::kRfc7009;
  bool pkce = true;  // S256

  // Parameters every connection of this provider must have (e.g. "subdomain"), and the subset
  // also sent as authorize-request parameters (zendesk-chat sends `subdomain`).
  std::vector<std::string> required_params;
  std::vector<std::string> authorize_params_from_connection;
  std::map<std::string, std::string> extra_authorize_params;
  std::map<std::string, std::string> extra_token_params;

  // Zendesk: requested lifetimes, sent on code exchange and refresh. nullopt: not sent.
  std::optional<int64_t> expires_in;
  std::optional<int64_t> refresh_token_expires_in;

  // Outbound HTTP to this provider.
  std::string ca_file;  // empty: the system trust store
  absl::Duration connect_timeout = absl::Seconds(5);
  absl::Duration request_timeout = absl::Seconds(30);

  // Every field equal (a reload tells changed providers by this).
  friend bool operator==(const ProviderSpec&, const ProviderSpec&) = default;
};

// Configured providers by name.
using ProviderRegistry = std::map<std::string, ProviderSpec>;

// The providers in force, replaced as a whole when the configuration is reloaded (SIGHUP).
// Readers take a snapshot and keep it for the whole operation, so a refresh or a code exchange
// that started under the old definitions finishes under them (nothing is cancelled), and the
// next one sees the new. Thread-safe; provider lookups happen per flow or refresh, never per
// GetToken.
class ProviderDirectory {
 public:
  ProviderDirectory() : current_(std::make_shared<const ProviderRegistry>()) {}
  explicit ProviderDirectory(ProviderRegistry initial)
      : current_(std::make_shared<const ProviderRegistry>(std::move(initial))) {}
  ProviderDirectory(const ProviderDirectory&) = delete;
  ProviderDirectory& operator=(const ProviderDirectory&) = delete;

  // Every provider as of now (never null).
  std::shared_ptr<const ProviderRegistry> Snapshot() const ABSL_LOCKS_EXCLUDED(mu_) {
    MutexLock lock(&mu_);
    return current_;
  }
  // The named provider as of now, kept alive by the pointer; null when none has that name.
  std::shared_ptr<const ProviderSpec> Find(const std::string& name) const ABSL_LOCKS_EXCLUDED(mu_);

  // Replaces every provider at once. Returns the names whose definition changed, was added or
  // was removed (sorted).
  std::vector<std::string> Replace(ProviderRegistry next) ABSL_LOCKS_EXCLUDED(mu_);
  // Adds or replaces one provider under `name` (tests and tools; Replace for reloads).
  void Put(const std::string& name, ProviderSpec spec) ABSL_LOCKS_EXCLUDED(mu_);

 private:
  mutable Mutex mu_;
  std::shared_ptr<const ProviderRegistry> current_ ABSL_GUARDED_BY(mu_);
};

// Checks a Zendesk subdomain: ^[a-z0-9][a-z0-9-]{0,62}$. Errors: INVALID_ARGUMENT.
absl::Status ValidateSubdomain(absl::string_view subdomain);

// Checks that `params` has every parameter `spec` requires, with valid values (a subdomain
// per ValidateSubdomain, other values 1..256 printable ASCII without spaces), and no unknown
// ones. Errors: INVALID_ARGUMENT naming the parameter.
absl::Status ValidateConnectionParams(const ProviderSpec& spec,
                                      const std::map<std::string, std::string>& params);

// Replaces every "{name}" in `url_template` by params[name] (or `extra`[name]); a placeholder
// with no value is INVALID_ARGUMENT. Values are validated by ValidateConnectionParams first.
absl::StatusOr<std::string> ExpandUrl(absl::string_view url_template,
                                      const std::map<std::string, std::string>& params,
                                      const std::map<std::string, std::string>& extra = {});

}  // namespace tb::core

#endif  // TB_CORE_PROVIDER_SPEC_H_
