#ifndef TB_OAUTH_AUTHORIZATION_FLOW_H_
#define TB_OAUTH_AUTHORIZATION_FLOW_H_

#include <functional>
#include <map>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "server/src/common/clock.h"
#include "server/src/common/secret.h"
#include "server/src/core/digest.h"
#include "server/src/core/flow_store.h"
#include "server/src/core/provider_client.h"
#include "server/src/core/provider_spec.h"
#include "server/src/core/random.h"
#include "server/src/oauth/broker.h"
#include "server/src/oauth/events.h"
#include "server/src/oauth/revoker.h"

namespace tb::oauth {

struct FlowOptions {
  // The broker's public origin as browsers reach it, e.g. "https://broker.example.com".
  // redirect_uri and link URLs are built from it, never from a request's Host header.
  std::string public_base_url = "http://127.0.0.1:8080";
  KeyMaterial link_key;  // HMAC key for connect links
  absl::Duration default_link_ttl = absl::Hours(72);
  absl::Duration max_link_ttl = absl::Hours(24 * 30);
  absl::Duration state_ttl = absl::Minutes(10);
  absl::Duration exchange_timeout = absl::Seconds(30);
  // Where a link may send the account admin after the flow (core::CheckReturnUrl: origin equal,
  // path prefix at a segment boundary). Empty: links carry no return URL.
  std::vector<std::string> return_url_allowlist;
};

// Things that happened, for the log and metrics; never carries a secret. Optional.
using FlowEventSink = EventSink;

// The authorization-code flow (RFC 6749 4.1 with PKCE, as RFC 9700 asks): connect links,
// /oauth/start and /oauth/callback, in words of the domain.
//
// Thread-safe. Complete() blocks on the provider (up to exchange_timeout): call it off the io
// and gRPC threads. Everything passed to the constructor must outlive the flow.
class AuthorizationFlow {
 public:
  AuthorizationFlow(FlowOptions options, const core::ProviderDirectory& providers,
                    const Clock& clock, core::Random& random, const core::Digest& digest,
                    core::FlowStore& store, core::ProviderClient& provider_client, Broker& broker,
                    Revoker& revoker, FlowEventSink events = nullptr);

  // For main, before constructing a flow: the options a flow would silently misuse.
  // Errors: INVALID_ARGUMENT naming the bad return_url_allowlist entry (an invalid entry would
  // otherwise just allow nothing).
  static absl::Status ValidateOptions(const FlowOptions& options);

  struct MintedLink {
    std::string url;  // <public_base_url>/oauth/start?link=<signed token>
    std::string link_id;
    absl::Time expires_at;
  };
  // Mints a signed link, creating the connection (pending) if it does not exist. A non-empty
  // `return_url` is signed into the link; the result page then offers a "Continue" link to it.
  // Errors: INVALID_ARGUMENT (bad id, unknown provider, bad params, ttl out of range, params or
  // provider differing from the existing connection's, a return_url that is malformed or not on
  // return_url_allowlist), FAILED_PRECONDITION with flow error kAlreadyConnected (active
  // connection, reconnect not set), store errors. Nothing is stored on INVALID_ARGUMENT.
  absl::StatusOr<MintedLink> CreateLink(const core::ConnectionId& id, const std::string& provider,
                                        const std::map<std::string, std::string>& params,
                                        absl::Duration ttl, bool reconnect,
                                        const std::string& return_url = "");

  // Errors: NOT_FOUND.
  absl::Status RevokeLink(const std::string& link_id);

  struct Started {
    std::string authorize_url;   // where to send the browser (302)
    OAuthState browser_binding;  // the cookie value to set with it
  };
  // /oauth/start: checks the link (valid, unexpired, unrevoked, unused, parameters valid; it
  // stays usable, since mail scanners prefetch links), creates state + PKCE verifier. A return
  // URL no longer on the allow-list is dropped (event "return_url_dropped"), not followed.
  // Errors carry a FlowErrorKind (kLinkInvalid/Expired/Revoked/Used, kAlreadyConnected).
  absl::StatusOr<Started> Start(absl::string_view link_token);

  struct Callback {
    std::string state;
    std::string code;
    std::string error;              // the provider's `error`, if any
    std::string error_description;  // shown HTML-escaped; never trusted
    std::string browser_binding;    // the cookie, empty if the browser sent none
  };
  // /oauth/callback: consumes the state, checks its cookie, exchanges the code, stores the
  // token set (a reconnect's previous grant joins to_revoke in the same write), marks the link
  // used, then revokes the previous grant (the refresher retries if the provider is down).
  // Returns the connection now active. Errors carry a FlowErrorKind; nothing is stored then.
  absl::StatusOr<core::ConnectionId> Complete(const Callback& callback);
  // The same, and `return_url` (not null) is set to the authorization's return URL whenever the
  // state was known, success or failure, if it is still on the allow-list; else cleared.
  absl::StatusOr<core::ConnectionId> Complete(const Callback& callback, std::string* return_url);

  // DeleteConnection: stops serving, revokes every grant of the connection at the provider
  // (one attempt, refreshing first where the provider needs it; a provider that is down must
  // not keep an operator from removing a connection, so a failure is reported as an event and
  // the connection is removed all the same), then removes the connection. Blocks on the
  // provider. Errors: NOT_FOUND, store errors.
  absl::Status DeleteConnection(const core::ConnectionId& id);

  const std::string& redirect_uri() const { return redirect_uri_; }

 private:
  // The provider as of now, kept alive for the whole operation (a reload may replace it).
  absl::StatusOr<std::shared_ptr<const core::ProviderSpec>> Spec(const std::string& provider) const;
  absl::StatusOr<std::string> AuthorizeUrl(const core::ProviderSpec& spec,
                                           const core::PendingAuthorization& auth) const;
  absl::Status CheckLinkUsable(const core::LinkRecord& record) const;
  bool ReturnUrlAllowed(const std::string& url) const;
  void Event(absl::string_view event, const core::ConnectionId& id, const absl::Status& s) const;

  const FlowOptions options_;
  const std::string redirect_uri_;
  const core::ProviderDirectory& providers_;
  const Clock& clock_;
  core::Random& random_;
  const core::Digest& digest_;
  core::FlowStore& store_;
  core::ProviderClient& provider_client_;
  Broker& broker_;
  Revoker& revoker_;
  const FlowEventSink events_;
};

// RFC 3986 percent-encoding of everything but unreserved characters, for query parameters.
// Written here because the domain links no URL library.
std::string PercentEncode(absl::string_view s);

}  // namespace tb::oauth

#endif  // TB_OAUTH_AUTHORIZATION_FLOW_H_
