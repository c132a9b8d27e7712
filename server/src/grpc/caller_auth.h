#ifndef TB_GRPC_CALLER_AUTH_H_
#define TB_GRPC_CALLER_AUTH_H_

#include <grpcpp/grpcpp.h>

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "server/src/auth/authorizer.h"

namespace tb::grpc_api {

// What a call presents: a verified client certificate's URI SANs and CN (from the TLS auth
// context; the TLS handshake already checked the chain against the client CA), and an API key
// from `authorization: Bearer <key>`, whose SHA-256 is what the rules hold. Never keeps or logs
// the key itself.
auth::Identity IdentityOf(const grpc::ServerContextBase& ctx);

// Authenticates the call and checks `permission` on `connection_id` (ignored for kAdmin).
// Denials (UNAUTHENTICATED, PERMISSION_DENIED) are written to the audit log with the caller,
// the RPC and the connection. Returns the caller.
absl::StatusOr<std::shared_ptr<const auth::Caller>> Authorize(const grpc::ServerContextBase& ctx,
                                                              const auth::Authorizer& authorizer,
                                                              auth::Permission permission,
                                                              absl::string_view rpc,
                                                              absl::string_view connection_id);

}  // namespace tb::grpc_api

#endif  // TB_GRPC_CALLER_AUTH_H_
