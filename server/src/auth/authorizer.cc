#include "server/src/auth/authorizer.h"

#include <fnmatch.h>

#include <utility>

#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"

namespace tb::auth {

namespace {

constexpr struct {
  Permission p;
  absl::string_view name;
} kPermissions[] = {
    {Permission::kGetToken, "GetToken"},
    {Permission::kRefresh, "Refresh"},
    {Permission::kRevoke, "Revoke"},
    {Permission::kAdmin, "Admin"},
};

uint32_t Bit(Permission p) { return 1u << static_cast<int>(p); }

std::atomic<uint64_t> next_instance{1};

}  // namespace

std::optional<Permission> ParsePermission(absl::string_view name) {
  if (name == "WatchToken") {
    return Permission::kGetToken;
  }
  for (const auto& [p, n] : kPermissions) {
    if (name == n) {
      return p;
    }
  }
  return std::nullopt;
}

absl::string_view PermissionName(Permission p) {
  for (const auto& [q, n] : kPermissions) {
    if (q == p) {
      return n;
    }
  }
  return "?";
}

bool IsSha256Hex(absl::string_view s) {
  if (s.size() != 64) {
    return false;
  }
  for (const char c : s) {
    if (!absl::ascii_isdigit(c) && !(c >= 'a' && c <= 'f')) {
      return false;
    }
  }
  return true;
}

struct Authorizer::Table {
  absl::flat_hash_map<std::string, std::shared_ptr<const Caller>> by_uri_san;
  absl::flat_hash_map<std::string, std::shared_ptr<const Caller>> by_common_name;
  absl::flat_hash_map<std::string, std::shared_ptr<const Caller>> by_key_hash;
  size_t callers = 0;
};

absl::Status ValidateRules(const std::vector<CallerRule>& rules) {
  absl::flat_hash_set<std::string> names;
  absl::flat_hash_map<std::string, std::string> claimed;  // identity -> caller
  for (const CallerRule& r : rules) {
    const std::string who =
        r.name.empty() ? "a caller without a name" : absl::StrCat("caller '", r.name, "'");
    if (r.name.empty()) {
      return absl::InvalidArgumentError("every caller needs a name");
    }
    if (!names.insert(r.name).second) {
      return absl::InvalidArgumentError(absl::StrCat(who, " is listed twice"));
    }
    if (r.uri_sans.empty() && r.common_names.empty() && r.api_key_sha256.empty()) {
      return absl::InvalidArgumentError(absl::StrCat(
          who, " has no way to authenticate (uri_sans, common_names or api_key_sha256)"));
    }
    for (const std::string& h : r.api_key_sha256) {
      if (!IsSha256Hex(h)) {
        return absl::InvalidArgumentError(absl::StrCat(
            who,
            ": api_key_sha256 entries must be 64 lowercase hex digits (sha256sum of the key)"));
      }
    }
    const auto claim = [&](absl::string_view kind, const std::string& id) -> absl::Status {
      const std::string key = absl::StrCat(kind, ":", id);
      auto [it, inserted] = claimed.emplace(key, r.name);
      if (!inserted) {
        return absl::InvalidArgumentError(
            absl::StrCat(who, " and caller '", it->second, "' claim the same ", kind));
      }
      return absl::OkStatus();
    };
    for (const std::string& s : r.uri_sans) {
      if (absl::Status st = claim("URI SAN", s); !st.ok()) {
        return st;
      }
    }
    for (const std::string& s : r.common_names) {
      if (absl::Status st = claim("common name", s); !st.ok()) {
        return st;
      }
    }
    for (const std::string& s : r.api_key_sha256) {
      if (absl::Status st = claim("API key", s); !st.ok()) {
        return st;
      }
    }
  }
  return absl::OkStatus();
}

namespace {

std::shared_ptr<const Authorizer::Table> BuildTable(const std::vector<CallerRule>& rules) {
  auto t = std::make_shared<Authorizer::Table>();
  for (const CallerRule& r : rules) {
    auto c = std::make_shared<Caller>();
    c->name = r.name;
    for (const std::string& pattern : r.connections) {
      if (pattern.find_first_of("*?[") == std::string::npos) {
        c->exact.push_back(pattern);
      } else {
        c->globs.push_back(pattern);
      }
    }
    for (const Permission p : r.permissions) {
      c->permissions |= Bit(p);
    }
    for (const std::string& s : r.uri_sans) {
      t->by_uri_san.emplace(s, c);
    }
    for (const std::string& s : r.common_names) {
      t->by_common_name.emplace(s, c);
    }
    for (const std::string& s : r.api_key_sha256) {
      t->by_key_hash.emplace(s, c);
    }
    ++t->callers;
  }
  return t;
}

}  // namespace

absl::StatusOr<std::unique_ptr<Authorizer>> Authorizer::Create(std::vector<CallerRule> rules) {
  if (absl::Status s = ValidateRules(rules); !s.ok()) {
    return s;
  }
  return std::unique_ptr<Authorizer>(new Authorizer(false, BuildTable(rules)));
}

Authorizer::Authorizer(bool allow_all, std::shared_ptr<const Table> table)
    : allow_all_(allow_all), table_(std::move(table)), instance_(next_instance.fetch_add(1)) {}

std::unique_ptr<Authorizer> Authorizer::AllowAll() {
  return std::unique_ptr<Authorizer>(new Authorizer(true, BuildTable({})));
}

size_t Authorizer::callers() const { return Current()->callers; }

std::shared_ptr<const Authorizer::Table> Authorizer::Current() const {
  // Each thread keeps the table it last saw and the version it had then; only a Replace()
  // (rare) sends it to the mutex again. So concurrent GetTokens never meet on one lock.
  struct Cached {
    uint64_t instance = 0;
    uint64_t version = 0;
    std::shared_ptr<const Table> table;
  };
  thread_local Cached cached;
  const uint64_t v = version_.load(std::memory_order_acquire);
  if (cached.instance != instance_ || cached.version != v) {
    MutexLock lock(&mu_);
    cached.instance = instance_;
    cached.version = version_.load(std::memory_order_acquire);
    cached.table = table_;
  }
  return cached.table;
}

absl::StatusOr<std::shared_ptr<const Caller>> Authorizer::Authenticate(
    const Identity& identity) const {
  if (allow_all_) {
    static const std::shared_ptr<const Caller> kInsecure = [] {
      auto c = std::make_shared<Caller>();
      c->name = "insecure";
      c->everything = true;
      return std::shared_ptr<const Caller>(std::move(c));
    }();
    return kInsecure;
  }
  const std::shared_ptr<const Table> t = Current();
  if (identity.certificate) {
    for (const std::string& san : identity.uri_sans) {
      if (const auto it = t->by_uri_san.find(san); it != t->by_uri_san.end()) {
        return it->second;
      }
    }
    if (!identity.common_name.empty()) {
      if (const auto it = t->by_common_name.find(identity.common_name);
          it != t->by_common_name.end()) {
        return it->second;
      }
    }
  }
  if (!identity.api_key_sha256.empty()) {
    if (const auto it = t->by_key_hash.find(identity.api_key_sha256); it != t->by_key_hash.end()) {
      return it->second;
    }
  }
  if (!identity.certificate && identity.api_key_sha256.empty()) {
    return absl::UnauthenticatedError(
        "no credentials: present a client certificate or an API key (authorization: Bearer)");
  }
  return absl::UnauthenticatedError("unknown caller: its credentials are not configured");
}

absl::Status Authorizer::Authorize(const Caller& caller, Permission p,
                                   absl::string_view connection_id) {
  if (caller.everything) {
    return absl::OkStatus();
  }
  if ((caller.permissions & Bit(p)) == 0) {
    return absl::PermissionDeniedError(
        absl::StrCat("caller '", caller.name, "' may not call ", PermissionName(p)));
  }
  if (p == Permission::kAdmin) {
    return absl::OkStatus();  // the admin service is not per connection
  }
  for (const std::string& id : caller.exact) {
    if (id == connection_id) {
      return absl::OkStatus();
    }
  }
  if (!caller.globs.empty()) {
    // fnmatch wants a NUL-terminated string; ids are at most 128 characters.
    const std::string id(connection_id);
    for (const std::string& g : caller.globs) {
      if (fnmatch(g.c_str(), id.c_str(), 0) == 0) {
        return absl::OkStatus();
      }
    }
  }
  return absl::PermissionDeniedError(
      absl::StrCat("caller '", caller.name, "' may not use this connection"));
}

absl::Status Authorizer::Replace(std::vector<CallerRule> rules) {
  if (allow_all_) {
    return absl::FailedPreconditionError("insecure mode has no callers to replace");
  }
  if (absl::Status s = ValidateRules(rules); !s.ok()) {
    return s;
  }
  std::shared_ptr<const Table> next = BuildTable(rules);
  {
    MutexLock lock(&mu_);
    table_ = std::move(next);
    version_.fetch_add(1, std::memory_order_acq_rel);
  }
  if (on_replace_) {
    on_replace_();
  }
  return absl::OkStatus();
}

}  // namespace tb::auth
