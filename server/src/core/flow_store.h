#ifndef TB_CORE_FLOW_STORE_H_
#define TB_CORE_FLOW_STORE_H_

#include <map>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "server/src/common/secret.h"
#include "server/src/core/connect_link.h"

namespace tb::core {

// An authorization between /oauth/start and /oauth/callback.
struct PendingAuthorization {
  OAuthState state;            // the `state` parameter (the key)
  OAuthState browser_binding;  // the cookie value set with it
  PkceVerifier verifier;       // empty when the provider takes no PKCE
  std::string link_id;
  ConnectionId connection_id;
  std::string provider;
  std::map<std::string, std::string> params;
  bool reconnect = false;
  std::string redirect_uri;  // exactly as sent to the authorize endpoint
  absl::Time expires_at;
  // The link's return URL, if it was on the allow-list at /oauth/start; empty otherwise.
  std::string return_url;
};

// Links and in-flight authorizations. Thread-safe.
// Errors: kNotFound, kResourceExhausted (too many in-flight authorizations), kUnavailable.
class FlowStore {
 public:
  virtual ~FlowStore() = default;

  virtual absl::Status PutLink(const LinkRecord& record) = 0;
  virtual absl::StatusOr<LinkRecord> GetLink(const std::string& link_id) = 0;
  virtual absl::Status RevokeLink(const std::string& link_id) = 0;
  virtual absl::Status MarkLinkUsed(const std::string& link_id, absl::Time when) = 0;

  virtual absl::Status PutAuthorization(const PendingAuthorization& auth, absl::Time now) = 0;
  // Removes and returns the authorization of `state`: a state works exactly once, whatever
  // happens next. Expired ones are NOT_FOUND.
  virtual absl::StatusOr<PendingAuthorization> TakeAuthorization(absl::string_view state,
                                                                 absl::Time now) = 0;
};

}  // namespace tb::core

#endif  // TB_CORE_FLOW_STORE_H_
