#ifndef TB_AUTH_AUTHORIZER_H_
#define TB_AUTH_AUTHORIZER_H_

// Who may call the gRPC API, and what for (issue 'Lock both doors'). Pure logic over plain
// values: the gRPC adapter extracts an Identity from the transport and the metadata, this
// decides. Standard library and Abseil only.

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "server/src/common/mutex.h"

namespace tb::auth {

// What a caller may do. kGetToken also covers WatchToken; kAdmin is the whole ConnectionAdmin
// service.
enum class Permission { kGetToken, kRefresh, kRevoke, kAdmin };
// "GetToken" (or "WatchToken"), "Refresh", "Revoke", "Admin". nullopt otherwise.
std::optional<Permission> ParsePermission(absl::string_view name);
absl::string_view PermissionName(Permission p);

// One configured caller: how it proves who it is, and what it may do.
struct CallerRule {
  std::string name;  // for audit lines; unique
  // mTLS: a client certificate verified against the client CA whose URI SAN (a SPIFFE id, say)
  // or, failing that, whose subject CN is one of these (exact match).
  std::vector<std::string> uri_sans;
  std::vector<std::string> common_names;
  // API keys (`authorization: Bearer <key>`): only their SHA-256, lowercase hex. The config
  // never holds a key.
  std::vector<std::string> api_key_sha256;
  // Connections it may use: exact ids or globs with * and ? ("zd-*"). Empty: none.
  std::vector<std::string> connections;
  std::vector<Permission> permissions;
};

// Checks a rule set: names present and unique, every hash 64 hex digits, no identity claimed by
// two callers, at least one way to authenticate. Errors: INVALID_ARGUMENT naming the caller.
absl::Status ValidateRules(const std::vector<CallerRule>& rules);

// What the transport and the request metadata say about a caller.
struct Identity {
  bool certificate = false;           // a client certificate verified against the client CA
  std::vector<std::string> uri_sans;  // from that certificate
  std::string common_name;            // from that certificate
  std::string api_key_sha256;         // lowercase hex; empty: no API key presented
};

// An authenticated caller.
struct Caller {
  std::string name;
  bool everything = false;         // insecure mode: every permission on every connection
  std::vector<std::string> exact;  // connection ids
  std::vector<std::string> globs;  // connection id patterns
  uint32_t permissions = 0;        // bit per Permission
};

// Thread-safe. Reads (Authenticate, Authorize) take no lock shared by all callers: each thread
// keeps the current rule table and refreshes it only when Replace() has published a new one.
class Authorizer {
 public:
  // Deny by default: a caller no rule names is UNAUTHENTICATED. Errors: ValidateRules'.
  static absl::StatusOr<std::unique_ptr<Authorizer>> Create(std::vector<CallerRule> rules);
  // Insecure mode (development only): every call is the caller "insecure", allowed everything.
  static std::unique_ptr<Authorizer> AllowAll();

  // Which configured caller presented `identity`: the certificate's URI SANs, then its CN, then
  // the API key. Errors: UNAUTHENTICATED (no credential, or none that a rule names).
  absl::StatusOr<std::shared_ptr<const Caller>> Authenticate(const Identity& identity) const;
  // Errors: PERMISSION_DENIED (the caller may not do `p`, or not on `connection_id`).
  static absl::Status Authorize(const Caller& caller, Permission p,
                                absl::string_view connection_id);

  // Swaps in a new rule set (a reload). Callers authenticated before keep their old Caller;
  // open streams recheck through `on_replace`. Errors: ValidateRules'; nothing changes then.
  absl::Status Replace(std::vector<CallerRule> rules) ABSL_LOCKS_EXCLUDED(mu_);
  // Called (outside any lock) after every successful Replace. Set once, before serving.
  void set_on_replace(std::function<void()> f) { on_replace_ = std::move(f); }
  uint64_t version() const { return version_.load(std::memory_order_acquire); }
  bool allows_all() const { return allow_all_; }
  size_t callers() const ABSL_LOCKS_EXCLUDED(mu_);

  struct Table;

 private:
  Authorizer(bool allow_all, std::shared_ptr<const Table> table);
  std::shared_ptr<const Table> Current() const ABSL_LOCKS_EXCLUDED(mu_);

  const bool allow_all_;
  mutable Mutex mu_;
  std::shared_ptr<const Table> table_ ABSL_GUARDED_BY(mu_);
  std::atomic<uint64_t> version_{1};
  const uint64_t instance_;  // tells this authorizer's per-thread copies from another's
  std::function<void()> on_replace_;
};

// Whether `s` is the form api_key_sha256 takes: 64 lowercase hex digits. (The adapter computes
// the digest of a presented key; crypto lives outside the domain.)
bool IsSha256Hex(absl::string_view s);

}  // namespace tb::auth

#endif  // TB_AUTH_AUTHORIZER_H_
