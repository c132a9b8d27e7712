// libFuzzer target: config loading (config::ParseConfig, config::ParseCallers) and the caller
// rules they produce (auth::Authorizer).
//
// The input is YAML. Secrets named by `*_env` keys come from a fixed lookup (kEnv); any other
// variable is unset. Properties:
//   - every error is INVALID_ARGUMENT, and its message never holds a secret value from the
//     lookup (unless the YAML itself spells that value, as a key the message names, say);
//   - an accepted config passes ValidateFields, its link key is at least 32 bytes and, unless
//     read from a file, one of the lookup's values;
//   - accepted callers pass ValidateRules and build an Authorizer that authenticates each of
//     them by its API key and answers every Authorize with OK or PERMISSION_DENIED.
// Inputs naming /dev, /proc or /sys are skipped: `*_file` keys are read from disk, and
// /dev/zero or a FIFO would only measure the disk, not the parser.
// FUZZ_CONFIG_PRINT=1 prints what each input parses to (for keeping the seeds useful).

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/string_view.h"
#include "server/src/auth/authorizer.h"
#include "server/src/config/config.h"

namespace {

// Values nothing in the parser could make up, so finding one in a message means a leak.
const std::map<std::string, std::string>& Env() {
  static const auto* const env = new std::map<std::string, std::string>{
      {"TB_LINK_KEY", "lnk-7Qp2vX9sK4mR8tW1zY6bN3cF5hJ0gL2dA8eS4uI7oP9qTw"},
      {"TB_STORE_KEYS",
       "k1 c3RvcmUta2V5LW9uZS0zMi1ieXRlcy1sb25nLWFiY2Q=\nk2 "
       "c3RvcmUta2V5LXR3by0zMi1ieXRlcy1sb25nLWVmZ2g=\n"},
      {"ZENDESK_CLIENT_SECRET", "zdsec-Hq8Lw3Nv6Rb1Tx5Kc9Mz2Pf7Gd4Js0Ya"},
      {"CHAT_CLIENT_SECRET", "chatsec-Vn5Bq1Xk8Wc3Ze6Rt9Ym2Lp7Hs4Dg0Uf"},
      {"SHORT_KEY", "short-secret-Jk4Rw"},
  };
  return *env;
}

std::optional<std::string> Lookup(const std::string& name) {
  const auto it = Env().find(name);
  if (it == Env().end()) {
    return std::nullopt;
  }
  return it->second;
}

void Fail(const char* what, absl::string_view detail = "") {
  std::fprintf(stderr, "fuzz_config: property violated: %s %.*s\n", what,
               static_cast<int>(detail.size()), detail.data());
  std::abort();
}

std::string Trimmed(std::string v) {
  while (!v.empty() && (v.back() == '\n' || v.back() == '\r')) {
    v.pop_back();
  }
  return v;
}

void CheckError(const absl::Status& s, absl::string_view yaml) {
  if (s.code() != absl::StatusCode::kInvalidArgument) {
    Fail("a config error is not INVALID_ARGUMENT", s.ToString());
  }
  for (const auto& [name, value] : Env()) {
    // Any line of a secret (the key ring has several) counts.
    size_t start = 0;
    while (start < value.size()) {
      size_t end = value.find('\n', start);
      if (end == std::string::npos) {
        end = value.size();
      }
      const absl::string_view line = absl::string_view(value).substr(start, end - start);
      if (line.size() >= 8 && absl::StrContains(s.message(), line) &&
          !absl::StrContains(yaml, line)) {
        Fail("a config error holds a secret value", name);
      }
      start = end + 1;
    }
  }
}

void CheckCallers(const std::vector<tb::auth::CallerRule>& rules) {
  if (!tb::auth::ValidateRules(rules).ok()) {
    Fail("accepted callers do not pass ValidateRules");
  }
  for (const tb::auth::CallerRule& r : rules) {
    for (const std::string& h : r.api_key_sha256) {
      if (!tb::auth::IsSha256Hex(h)) {
        Fail("an accepted api_key_sha256 is not 64 lower-case hex digits", h);
      }
    }
  }
  absl::StatusOr<std::unique_ptr<tb::auth::Authorizer>> authorizer =
      tb::auth::Authorizer::Create(rules);
  if (!authorizer.ok()) {
    Fail("Authorizer::Create refused rules that ValidateRules accepted",
         authorizer.status().ToString());
  }
  for (const tb::auth::CallerRule& r : rules) {
    for (const std::string& h : r.api_key_sha256) {
      tb::auth::Identity id;
      id.api_key_sha256 = h;
      absl::StatusOr<std::shared_ptr<const tb::auth::Caller>> caller =
          (*authorizer)->Authenticate(id);
      if (!caller.ok() || (*caller)->name != r.name) {
        Fail("a configured API key does not authenticate its caller", r.name);
      }
      for (const tb::auth::Permission p :
           {tb::auth::Permission::kGetToken, tb::auth::Permission::kRefresh,
            tb::auth::Permission::kRevoke, tb::auth::Permission::kAdmin}) {
        for (const absl::string_view conn : {"acme", "zd-acme-prod", "", "a.b-c_d"}) {
          const absl::Status s = tb::auth::Authorizer::Authorize(**caller, p, conn);
          if (!s.ok() && s.code() != absl::StatusCode::kPermissionDenied) {
            Fail("Authorize returned neither OK nor PERMISSION_DENIED", s.ToString());
          }
        }
      }
    }
  }
}

void CheckConfig(const tb::config::Config& c) {
  if (!tb::config::ValidateFields(c).ok()) {
    Fail("an accepted config fails ValidateFields");
  }
  if (c.links.signing_key && c.links.signing_key->Reveal().size() < 32) {
    Fail("an accepted link key is shorter than 32 bytes");
  }
  for (const auto& [name, spec] : c.providers) {
    if (name != spec.name) {
      Fail("a provider's name differs from its key", name);
    }
  }
  CheckCallers(c.auth.callers);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const absl::string_view yaml(reinterpret_cast<const char*>(data), size);
  for (const absl::string_view special : {"/dev", "/proc", "/sys"}) {
    if (absl::StrContains(yaml, special)) {
      return -1;  // not added to the corpus
    }
  }

  absl::StatusOr<tb::config::Config> config = tb::config::ParseConfig(yaml, Lookup);
  absl::StatusOr<std::vector<tb::auth::CallerRule>> callers =
      tb::config::ParseCallers(yaml, "callers.yaml");
  static const bool verbose = std::getenv("FUZZ_CONFIG_PRINT") != nullptr;
  if (verbose) {
    std::printf("config: %s\ncallers: %s\n", config.status().ToString().c_str(),
                callers.status().ToString().c_str());
  }
  if (config.ok()) {
    CheckConfig(*config);
    // A link key read through the lookup is one of its values, newline-trimmed.
    if (config->links.signing_key && !absl::StrContains(yaml, "signing_key_file")) {
      bool known = false;
      for (const auto& [name, value] : Env()) {
        known = known || config->links.signing_key->Reveal() == Trimmed(value);
      }
      if (!known) {
        Fail("links.signing_key is none of the environment's values");
      }
    }
  } else {
    CheckError(config.status(), yaml);
  }

  if (callers.ok()) {
    CheckCallers(*callers);
  } else {
    CheckError(callers.status(), yaml);
  }
  return 0;
}
