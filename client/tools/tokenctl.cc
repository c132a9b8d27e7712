// tokenctl: a command-line client for token-broker's gRPC API, for operators and scripts.
//
//   tokenctl [--target=host:port] [--timeout=5s] <command> [args] [flags]
//
// `get` prints only the access token on stdout, so that
//   curl -H "Authorization: Bearer $(tokenctl get acme)" ...
// works; the token never goes to stderr. Errors are one line on stderr that says what to do.
// Exit codes: 0 ok, 1 the RPC failed (or health is not SERVING), 2 usage error.

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "absl/flags/commandlineflag.h"
#include "absl/flags/flag.h"
#include "absl/flags/reflection.h"
#include "absl/status/status.h"
#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/string_view.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "tb/client/token_client.h"

ABSL_FLAG(std::string, target, "127.0.0.1:8443", "token-broker's gRPC address, host:port");
ABSL_FLAG(absl::Duration, timeout, absl::Seconds(5), "deadline of each RPC");
ABSL_FLAG(std::string, ca_file, "", "TLS: the CA (PEM) the broker's certificate chains to");
ABSL_FLAG(bool, tls, false, "TLS with the system's CAs (implied by --ca_file)");
ABSL_FLAG(std::string, cert_file, "", "mTLS: this client's certificate (PEM)");
ABSL_FLAG(std::string, key_file, "", "mTLS: this client's private key (PEM)");
ABSL_FLAG(std::string, api_key_file, "", "a file holding the API key sent as Bearer");
ABSL_FLAG(std::string, api_key_env, "TB_API_KEY",
          "an environment variable holding the API key (when --api_key_file is not given)");
ABSL_FLAG(bool, verbose, false,
          "get: also print the token's generation, validity and expiry on stderr");
ABSL_FLAG(absl::Duration, min_ttl, absl::Seconds(60),
          "get: the token must stay valid at least this long");
ABSL_FLAG(std::string, provider, "", "list: only connections of this provider");
ABSL_FLAG(std::string, status, "",
          "list: only connections in this status: pending|active|needs_reauth|revoked");
ABSL_FLAG(int, page_size, 0, "list: connections per request, 1 to 1000 (0: the server's default)");
ABSL_FLAG(int, limit, 0, "list: stop after this many connections (0: all)");
ABSL_FLAG(std::string, service, "", "health: the health service to check (empty: the server)");
ABSL_FLAG(std::vector<std::string>, params, {},
          "link: provider parameters as name=value, comma-separated (e.g. subdomain=acme)");
ABSL_FLAG(absl::Duration, ttl, absl::ZeroDuration(), "link: how long the link works (0: default)");
ABSL_FLAG(bool, reconnect, false, "link: allow the link to replace an active grant");
ABSL_FLAG(std::string, return_url, "",
          "link: where the result page sends the admin afterwards (on links.return_url_allowlist)");
ABSL_FLAG(uint64_t, if_generation, 0,
          "refresh: only if the current generation is still this one (0: unconditionally)");
ABSL_FLAG(int, count, 0, "watch: stop after this many tokens (0: until the stream ends)");
ABSL_FLAG(int, batch, 500, "rotate-keys: rows re-encrypted per request, 1 to 10000");

namespace {

namespace v1 = tokenbroker::v1;
using HealthStatus = grpc::health::v1::HealthCheckResponse;

constexpr int kExitOk = 0;
constexpr int kExitRpcError = 1;
constexpr int kExitUsage = 2;

constexpr char kUsage[] =
    R"(usage: tokenctl [--target=host:port] [--timeout=5s] <command> [arguments] [flags]

commands:
  get <connection-id> [--min_ttl=60s] [--verbose]
      print a valid access token, and only it, on stdout
  list [--provider=NAME] [--status=pending|active|needs_reauth|revoked] [--page_size=N] [--limit=N]
      list connections (every page, or the first --limit)
  show <connection-id>
      print one connection's metadata, one "key: value" per line
  delete <connection-id>
      revoke and remove a connection
  health [--service=NAME]
      print SERVING or NOT_SERVING; exit 0 only if SERVING
  link <connection-id> --provider=NAME [--params=subdomain=acme] [--ttl=72h] [--reconnect]
                          [--return_url=https://...]
      mint a connect link for an account admin; prints the URL on stdout
  revoke-link <link-id>
      withdraw a connect link
  refresh <connection-id> [--if_generation=N]
      get a new token (after a 401); prints it on stdout
  revoke <connection-id>
      stop serving the connection and revoke its grant at the provider
  watch <connection-id> [--count=N]
      print "<generation> <token>" for the current token and each new one
  rotate-keys [--batch=N]
      re-encrypt every stored row under the newest encryption key, printing progress

connection and credentials (all commands):
  --target=host:port  --timeout=5s  --tls | --ca_file=ca.pem  [--cert_file=c.pem --key_file=k.pem]
  --api_key_file=FILE, or the API key in $TB_API_KEY (--api_key_env=NAME)

flags:
)";

constexpr char kCommandList[] =
    "get, list, show, delete, health, link, revoke-link, refresh, revoke, watch, rotate-keys";

// Flags by the commands they apply to; the global ones apply to all.
const std::set<std::string>& GlobalFlags() {
  static const auto* const kFlags =
      new std::set<std::string>{"target",    "timeout",  "verbose",      "ca_file",    "tls",
                                "cert_file", "key_file", "api_key_file", "api_key_env"};
  return *kFlags;
}

const std::map<std::string, std::set<std::string>>& CommandFlags() {
  static const auto* const kFlags = new std::map<std::string, std::set<std::string>>{
      {"get", {"min_ttl"}},
      {"list", {"provider", "status", "page_size", "limit"}},
      {"show", {}},
      {"delete", {}},
      {"health", {"service"}},
      {"link", {"provider", "params", "ttl", "reconnect", "return_url"}},
      {"revoke-link", {}},
      {"refresh", {"if_generation"}},
      {"revoke", {}},
      {"watch", {"count"}},
      {"rotate-keys", {"batch"}},
  };
  return *kFlags;
}

// Keeps text from the server or the command line on one line and free of terminal controls.
std::string Printable(absl::string_view s) {
  std::string out;
  for (const char c : s) {
    const auto u = static_cast<unsigned char>(c);
    if (u < 0x20 || u == 0x7f) {
      absl::StrAppendFormat(&out, "\\x%02x", u);
    } else {
      out.push_back(c);
    }
  }
  return out;
}

std::string Quoted(absl::string_view s) { return absl::StrCat("\"", Printable(s), "\""); }

// Prints "tokenctl: <message>" on stderr and returns `exit_code`.
int Fail(int exit_code, absl::string_view message) {
  absl::FPrintF(stderr, "tokenctl: %s\n", message);
  return exit_code;
}

void PrintUsage(std::FILE* out) {
  std::fputs(kUsage, out);
  std::vector<std::string> names(GlobalFlags().begin(), GlobalFlags().end());
  for (const auto& [command, flags] : CommandFlags()) {
    names.insert(names.end(), flags.begin(), flags.end());
  }
  std::sort(names.begin(), names.end());
  for (const std::string& name : names) {
    const absl::CommandLineFlag* flag = absl::FindCommandLineFlag(name);
    if (flag != nullptr) {
      absl::FPrintF(out, "  --%s (default %s)\n      %s\n", name,
                    flag->DefaultValue().empty() ? "\"\"" : flag->DefaultValue(), flag->Help());
    }
  }
}

struct Args {
  std::vector<std::string> positional;
  std::set<std::string> flags_seen;
  bool help = false;
};

// Parses flags (--name=value, --name value, --bool, --nobool; one dash works too; "--" ends
// flags) anywhere on the command line into the ABSL_FLAGs above. Hand-rolled over absl's public
// flag reflection because absl::ParseCommandLine exits 1 on a bad flag, and 1 means "the RPC
// failed" here: scripts must be able to tell a typo from a broker error.
std::optional<std::string> ParseArgs(int argc, char** argv, Args& args) {
  std::set<std::string> known = GlobalFlags();
  for (const auto& [command, flags] : CommandFlags()) {
    known.insert(flags.begin(), flags.end());
  }
  bool flags_done = false;
  for (int i = 1; i < argc; ++i) {
    const absl::string_view arg = argv[i];
    if (flags_done || arg.size() < 2 || arg[0] != '-') {
      args.positional.emplace_back(arg);
      continue;
    }
    if (arg == "--") {
      flags_done = true;
      continue;
    }
    absl::string_view body = arg.substr(absl::StartsWith(arg, "--") ? 2 : 1);
    std::optional<absl::string_view> value;
    if (const size_t eq = body.find('='); eq != absl::string_view::npos) {
      value = body.substr(eq + 1);
      body = body.substr(0, eq);
    }
    std::string name(body);
    if (name == "help" || name == "h") {
      args.help = true;
      continue;
    }
    bool negated = false;
    if (!known.contains(name) && absl::StartsWith(name, "no") && known.contains(name.substr(2))) {
      name = name.substr(2);
      negated = true;
    }
    absl::CommandLineFlag* flag = known.contains(name) ? absl::FindCommandLineFlag(name) : nullptr;
    if (flag == nullptr) {
      return absl::StrFormat("unknown flag %s; see tokenctl --help", Quoted(arg));
    }
    std::string text;
    if (flag->IsOfType<bool>()) {
      if (negated && value) {
        return absl::StrFormat("flag --no%s takes no value", name);
      }
      text = value ? std::string(*value) : (negated ? "false" : "true");
    } else if (negated) {
      return absl::StrFormat("unknown flag %s; see tokenctl --help", Quoted(arg));
    } else if (value) {
      text = std::string(*value);
    } else if (i + 1 < argc) {
      text = argv[++i];
    } else {
      return absl::StrFormat("flag --%s needs a value", name);
    }
    if (std::string error; !flag->ParseFrom(text, &error)) {
      return absl::StrFormat("bad value %s for --%s: %s", Quoted(text), name, Printable(error));
    }
    args.flags_seen.insert(name);
  }
  return std::nullopt;
}

absl::Time ToTime(const google::protobuf::Timestamp& t) {
  return absl::FromUnixSeconds(t.seconds()) + absl::Nanoseconds(t.nanos());
}

// RFC 3339 in UTC, or "-" when the field is unset.
std::string FormatTimestamp(bool set, const google::protobuf::Timestamp& t) {
  if (!set) {
    return "-";
  }
  return absl::FormatTime("%Y-%m-%dT%H:%M:%SZ", ToTime(t), absl::UTCTimeZone());
}

std::string OrDash(absl::string_view s) { return s.empty() ? "-" : Printable(s); }

std::string StatusName(v1::ConnectionStatus s) {
  switch (s) {
    case v1::CONNECTION_STATUS_PENDING:
      return "pending";
    case v1::CONNECTION_STATUS_ACTIVE:
      return "active";
    case v1::CONNECTION_STATUS_NEEDS_REAUTH:
      return "needs_reauth";
    case v1::CONNECTION_STATUS_REVOKED:
      return "revoked";
    default:
      return absl::StrCat("status(", static_cast<int>(s), ")");
  }
}

std::optional<v1::ConnectionStatus> ParseStatus(absl::string_view text) {
  const std::string s = absl::AsciiStrToLower(text);
  if (s.empty()) {
    return v1::CONNECTION_STATUS_UNSPECIFIED;
  }
  for (const v1::ConnectionStatus status :
       {v1::CONNECTION_STATUS_PENDING, v1::CONNECTION_STATUS_ACTIVE,
        v1::CONNECTION_STATUS_NEEDS_REAUTH, v1::CONNECTION_STATUS_REVOKED}) {
    if (s == StatusName(status)) {
      return status;
    }
  }
  return std::nullopt;
}

// What the failed call was about, for the error message.
struct Call {
  std::string target;
  std::string command;
  std::string connection_id;  // empty for list and health
  std::string service;        // health only
  absl::Duration timeout;
};

// One actionable line for a failed RPC: what happened, the code (and reason) to search for, and
// what to do about it.
std::string Describe(const Call& call, const absl::Status& status) {
  const std::string code = absl::StatusCodeToString(status.code());
  const std::string reason = tb::client::ErrorReason(status);
  const std::string id = Quoted(call.connection_id);
  const std::string detail =
      status.message().empty() ? "" : absl::StrCat(": ", Printable(status.message()));
  if (reason == "NOT_CONNECTED") {
    return absl::StrFormat(
        "connection %s is not connected yet (NOT_CONNECTED): the account admin must open its "
        "connect link and approve",
        id);
  }
  if (reason == "NEEDS_REAUTH") {
    return absl::StrFormat(
        "connection %s needs re-authorization (NEEDS_REAUTH): mint a reconnect link", id);
  }
  if (reason == "ROTATION_LOST") {
    return absl::StrFormat(
        "connection %s lost its grant during a token refresh (ROTATION_LOST): mint a reconnect "
        "link",
        id);
  }
  if (reason == "REVOKED") {
    return absl::StrFormat(
        "connection %s was revoked (REVOKED): mint a connect link to connect it again", id);
  }
  if (reason == "NOT_REFRESHABLE") {
    return absl::StrFormat(
        "connection %s has an expired token and no refresh token (NOT_REFRESHABLE): mint a "
        "reconnect link",
        id);
  }
  if (reason == "PROVIDER_MISCONFIGURED") {
    return absl::StrFormat(
        "the provider of connection %s rejected the broker's client credentials "
        "(PROVIDER_MISCONFIGURED): fix the provider's client id and secret in token-broker's "
        "configuration",
        id);
  }
  if (!reason.empty()) {
    return absl::StrFormat("%s failed (%s, %s)%s", call.command, code, Printable(reason), detail);
  }
  switch (status.code()) {
    case absl::StatusCode::kUnavailable:
      if (tb::client::IsUnreachable(status)) {
        return absl::StrFormat(
            "cannot reach token-broker at %s (UNAVAILABLE): is it running? check --target",
            Printable(call.target));
      }
      if (call.command == "get") {
        return absl::StrFormat(
            "token-broker has no token for %s that lasts --min_ttl=%s (UNAVAILABLE)%s; retry "
            "later or lower --min_ttl",
            id, absl::FormatDuration(absl::GetFlag(FLAGS_min_ttl)), detail);
      }
      return absl::StrFormat("token-broker at %s cannot answer now (UNAVAILABLE)%s; retry later",
                             Printable(call.target), detail);
    case absl::StatusCode::kDeadlineExceeded:
      return absl::StrFormat(
          "no answer from token-broker at %s within %s (DEADLINE_EXCEEDED): check --target, or "
          "raise --timeout",
          Printable(call.target), absl::FormatDuration(call.timeout));
    case absl::StatusCode::kNotFound:
      if (call.command == "health") {
        return absl::StrFormat("token-broker does not know health service %s (NOT_FOUND)",
                               Quoted(call.service));
      }
      if (!call.connection_id.empty()) {
        return absl::StrFormat("no connection %s (NOT_FOUND)", id);
      }
      break;
    case absl::StatusCode::kInvalidArgument:
      return absl::StrFormat("token-broker rejected the request (INVALID_ARGUMENT)%s", detail);
    case absl::StatusCode::kUnauthenticated:
      return absl::StrFormat(
          "token-broker at %s did not accept our credentials (UNAUTHENTICATED)%s",
          Printable(call.target), detail);
    case absl::StatusCode::kPermissionDenied:
      return absl::StrFormat("not allowed to %s%s (PERMISSION_DENIED)%s", call.command,
                             call.connection_id.empty() ? "" : absl::StrCat(" ", id), detail);
    case absl::StatusCode::kUnimplemented:
      return absl::StrFormat(
          "token-broker at %s does not serve this call (UNIMPLEMENTED): is --target the main "
          "gRPC port? the probe port serves health only",
          Printable(call.target));
    default:
      break;
  }
  return absl::StrFormat("%s failed (%s)%s", call.command, code, detail);
}

int RpcFailure(const Call& call, const absl::Status& status) {
  return Fail(kExitRpcError, Describe(call, status));
}

int RunGet(tb::client::TokenClient& client, const Call& call) {
  const absl::Duration min_ttl = absl::GetFlag(FLAGS_min_ttl);
  if (min_ttl < absl::ZeroDuration()) {
    return Fail(kExitUsage, "--min_ttl must not be negative");
  }
  absl::StatusOr<v1::Token> token = client.GetToken(call.connection_id, min_ttl, call.timeout);
  if (!token.ok()) {
    return RpcFailure(call, token.status());
  }
  if (token->access_token().empty()) {
    return Fail(kExitRpcError, absl::StrFormat("token-broker answered with an empty token for %s",
                                               Quoted(call.connection_id)));
  }
  // The token goes to stdout only; stderr gets metadata, never the secret.
  absl::PrintF("%s\n", token->access_token());
  if (absl::GetFlag(FLAGS_verbose)) {
    absl::FPrintF(
        stderr, "generation: %d\nvalid_for: %s\nvalid_until: %s\nexpires_at: %s\nscopes: %s\n",
        token->generation(),
        token->has_valid_for() ? absl::FormatDuration(absl::Seconds(token->valid_for().seconds()))
                               : "until revoked",
        FormatTimestamp(token->has_valid_until(), token->valid_until()),
        FormatTimestamp(token->has_expires_at(), token->expires_at()),
        OrDash(absl::StrJoin(token->scopes(), " ")));
  }
  return kExitOk;
}

int RunList(tb::client::TokenClient& client, const Call& call) {
  const std::optional<v1::ConnectionStatus> status = ParseStatus(absl::GetFlag(FLAGS_status));
  if (!status) {
    return Fail(kExitUsage, absl::StrFormat("bad --status %s; use pending, active, needs_reauth "
                                            "or revoked",
                                            Quoted(absl::GetFlag(FLAGS_status))));
  }
  const int limit = absl::GetFlag(FLAGS_limit);
  int page_size = absl::GetFlag(FLAGS_page_size);
  if (page_size < 0 || page_size > 1000) {
    return Fail(kExitUsage, "--page_size must be 0 (server default) to 1000");
  }
  if (limit < 0) {
    return Fail(kExitUsage, "--limit must not be negative");
  }
  if (page_size == 0 && limit > 0) {
    page_size = std::min(limit, 1000);
  }
  const std::string provider = absl::GetFlag(FLAGS_provider);

  std::vector<std::vector<std::string>> rows = {
      {"ID", "PROVIDER", "STATUS", "REASON", "GENERATION", "EXPIRES_AT"}};
  std::string page_token;
  bool done = false;
  while (!done) {
    absl::StatusOr<v1::ListConnectionsResponse> page =
        client.ListConnections(page_size, page_token, provider, *status, call.timeout);
    if (!page.ok()) {
      return RpcFailure(call, page.status());
    }
    for (const v1::Connection& c : page->connections()) {
      rows.push_back({Printable(c.id()), OrDash(c.provider()), StatusName(c.status()),
                      OrDash(c.reason()), absl::StrCat(c.generation()),
                      FormatTimestamp(c.has_expires_at(), c.expires_at())});
      if (limit > 0 && static_cast<int>(rows.size()) - 1 >= limit) {
        break;
      }
    }
    if (!page_token.empty() && page->next_page_token() == page_token) {
      return Fail(kExitRpcError, "token-broker returned the same page twice; list stopped");
    }
    page_token = page->next_page_token();
    done = page_token.empty() || (limit > 0 && static_cast<int>(rows.size()) - 1 >= limit);
  }

  std::vector<size_t> widths(rows.front().size(), 0);
  for (const std::vector<std::string>& row : rows) {
    for (size_t i = 0; i < row.size(); ++i) {
      widths[i] = std::max(widths[i], row[i].size());
    }
  }
  for (const std::vector<std::string>& row : rows) {
    std::string line;
    for (size_t i = 0; i < row.size(); ++i) {
      absl::StrAppend(&line, row[i]);
      if (i + 1 < row.size()) {
        line.append(widths[i] - row[i].size() + 2, ' ');
      }
    }
    absl::PrintF("%s\n", line);
  }
  return kExitOk;
}

int RunShow(tb::client::TokenClient& client, const Call& call) {
  absl::StatusOr<v1::Connection> c = client.GetConnection(call.connection_id, call.timeout);
  if (!c.ok()) {
    return RpcFailure(call, c.status());
  }
  std::vector<std::pair<std::string, std::string>> fields = {
      {"id", Printable(c->id())},
      {"provider", OrDash(c->provider())},
      {"status", StatusName(c->status())},
      {"reason", OrDash(c->reason())},
      {"last_error", OrDash(c->last_error())},
      {"scopes", OrDash(absl::StrJoin(c->scopes(), " "))},
      {"generation", absl::StrCat(c->generation())},
      {"expires_at", FormatTimestamp(c->has_expires_at(), c->expires_at())},
      {"refresh_at", FormatTimestamp(c->has_refresh_at(), c->refresh_at())},
      {"refreshable", c->refreshable() ? "true" : "false"},
      {"created_at", FormatTimestamp(c->has_created_at(), c->created_at())},
      {"updated_at", FormatTimestamp(c->has_updated_at(), c->updated_at())},
  };
  // Sorted, so that the output is stable (a proto map has no order).
  const std::map<std::string, std::string> params(c->params().begin(), c->params().end());
  if (params.empty()) {
    fields.emplace_back("params", "-");
  }
  for (const auto& [key, value] : params) {
    fields.emplace_back(absl::StrCat("params.", Printable(key)), OrDash(value));
  }
  for (const auto& [key, value] : fields) {
    absl::PrintF("%s: %s\n", key, value);
  }
  return kExitOk;
}

int RunDelete(tb::client::TokenClient& client, const Call& call) {
  if (absl::Status s = client.DeleteConnection(call.connection_id, call.timeout); !s.ok()) {
    return RpcFailure(call, s);
  }
  absl::PrintF("deleted connection %s\n", Quoted(call.connection_id));
  return kExitOk;
}

int RunLink(tb::client::TokenClient& client, const Call& call) {
  const std::string provider = absl::GetFlag(FLAGS_provider);
  if (provider.empty()) {
    return Fail(kExitUsage, "link needs --provider=NAME (a provider from the broker's config)");
  }
  std::map<std::string, std::string> params;
  for (const std::string& p : absl::GetFlag(FLAGS_params)) {
    const size_t eq = p.find('=');
    if (eq == std::string::npos || eq == 0) {
      return Fail(kExitUsage,
                  absl::StrFormat("--params takes name=value pairs, got %s", Quoted(p)));
    }
    params[p.substr(0, eq)] = p.substr(eq + 1);
  }
  const absl::Duration ttl = absl::GetFlag(FLAGS_ttl);
  if (ttl < absl::ZeroDuration()) {
    return Fail(kExitUsage, "--ttl must not be negative");
  }
  absl::StatusOr<v1::CreateConnectLinkResponse> link = client.CreateConnectLink(
      call.connection_id, provider, params, ttl, absl::GetFlag(FLAGS_reconnect),
      absl::GetFlag(FLAGS_return_url), call.timeout);
  if (!link.ok()) {
    return RpcFailure(call, link.status());
  }
  absl::PrintF("%s\n", link->url());
  absl::FPrintF(
      stderr, "link id %s, expires %s\n", link->link_id(),
      absl::FormatTime(absl::RFC3339_sec, absl::FromUnixSeconds(link->expires_at().seconds()),
                       absl::UTCTimeZone()));
  return kExitOk;
}

int RunRevokeLink(tb::client::TokenClient& client, const Call& call) {
  if (absl::Status s = client.RevokeConnectLink(call.connection_id, call.timeout); !s.ok()) {
    return RpcFailure(call, s);
  }
  absl::PrintF("revoked link %s\n", Quoted(call.connection_id));
  return kExitOk;
}

int RunRefresh(tb::client::TokenClient& client, const Call& call) {
  absl::StatusOr<v1::Token> token =
      client.Refresh(call.connection_id, absl::GetFlag(FLAGS_if_generation), call.timeout);
  if (!token.ok()) {
    return RpcFailure(call, token.status());
  }
  absl::PrintF("%s\n", token->access_token());
  if (absl::GetFlag(FLAGS_verbose)) {
    absl::FPrintF(stderr, "generation %d, valid for %ds\n", token->generation(),
                  token->valid_for().seconds());
  }
  return kExitOk;
}

int RunRevoke(tb::client::TokenClient& client, const Call& call) {
  absl::StatusOr<bool> confirmed = client.Revoke(call.connection_id, call.timeout);
  if (!confirmed.ok()) {
    return RpcFailure(call, confirmed.status());
  }
  if (*confirmed) {
    absl::PrintF("revoked connection %s (the provider confirmed)\n", Quoted(call.connection_id));
  } else {
    absl::PrintF(
        "revoked connection %s; the provider has not confirmed yet: the broker retries until "
        "it does (run the command again to retry now)\n",
        Quoted(call.connection_id));
  }
  return kExitOk;
}

// Calls RotateKeys until every readable row is under the newest key; the broker keeps serving.
int RunRotateKeys(tb::client::TokenClient& client, const Call& call) {
  const int batch = absl::GetFlag(FLAGS_batch);
  if (batch < 1 || batch > 10'000) {
    return Fail(kExitUsage, "--batch must be 1 to 10000");
  }
  uint64_t total = 0;
  for (;;) {
    absl::StatusOr<tokenbroker::v1::RotateKeysResponse> r = client.RotateKeys(batch, call.timeout);
    if (!r.ok()) {
      return RpcFailure(call, r.status());
    }
    total += r->reencrypted();
    absl::PrintF("re-encrypted %d rows, %d still under an older key (%d unreadable)\n", total,
                 r->remaining(), r->unreadable());
    std::fflush(stdout);
    if (r->remaining() <= r->unreadable()) {
      break;
    }
    if (r->reencrypted() == 0) {
      // Rows changed under us (concurrent writes win) or are being written: try again shortly.
      absl::SleepFor(absl::Milliseconds(200));
    }
  }
  absl::PrintF("done: every readable row is under the newest key\n");
  return kExitOk;
}

int RunWatch(tb::client::TokenClient& client, const Call& call) {
  const int count = absl::GetFlag(FLAGS_count);
  if (count < 0) {
    return Fail(kExitUsage, "--count must not be negative");
  }
  int seen = 0;
  const absl::Status s = client.Watch(call.connection_id, [&](const v1::Token& t) {
    absl::PrintF("%d %s\n", t.generation(), t.access_token());
    std::fflush(stdout);
    return count == 0 || ++seen < count;
  });
  if (!s.ok()) {
    return RpcFailure(call, s);
  }
  return kExitOk;
}

int RunHealth(tb::client::TokenClient& client, const Call& call) {
  absl::StatusOr<HealthStatus::ServingStatus> status = client.Check(call.service, call.timeout);
  if (!status.ok()) {
    return RpcFailure(call, status.status());
  }
  const std::string name = HealthStatus::ServingStatus_Name(*status);
  absl::PrintF("%s\n", name.empty() ? absl::StrCat("STATUS_", static_cast<int>(*status)) : name);
  return *status == HealthStatus::SERVING ? kExitOk : kExitRpcError;
}

int Run(int argc, char** argv) {
  Args args;
  if (std::optional<std::string> error = ParseArgs(argc, argv, args); error) {
    return Fail(kExitUsage, *error);
  }
  if (args.help || (!args.positional.empty() && args.positional.front() == "help")) {
    PrintUsage(stdout);
    return kExitOk;
  }
  if (args.positional.empty()) {
    PrintUsage(stderr);
    return Fail(kExitUsage, absl::StrFormat("no command; commands: %s", kCommandList));
  }
  Call call;
  call.command = args.positional.front();
  const auto command = CommandFlags().find(call.command);
  if (command == CommandFlags().end()) {
    return Fail(kExitUsage, absl::StrFormat("unknown command %s; commands: %s",
                                            Quoted(call.command), kCommandList));
  }
  for (const std::string& flag : args.flags_seen) {
    if (!GlobalFlags().contains(flag) && !command->second.contains(flag)) {
      return Fail(kExitUsage, absl::StrFormat("--%s does not apply to %s", flag, call.command));
    }
  }
  const std::vector<std::string> operands(args.positional.begin() + 1, args.positional.end());
  const bool takes_id = call.command == "get" || call.command == "show" ||
                        call.command == "delete" || call.command == "link" ||
                        call.command == "revoke-link" || call.command == "refresh" ||
                        call.command == "revoke" || call.command == "watch";
  if (takes_id) {
    if (operands.empty()) {
      return Fail(kExitUsage, absl::StrFormat("missing connection id: tokenctl %s <connection-id>",
                                              call.command));
    }
    if (operands.size() > 1 || operands.front().empty()) {
      return Fail(kExitUsage,
                  absl::StrFormat("%s takes exactly one non-empty connection id, got %s",
                                  call.command, Quoted(absl::StrJoin(operands, " "))));
    }
    call.connection_id = operands.front();
  } else if (!operands.empty()) {
    return Fail(kExitUsage, absl::StrFormat("%s takes no arguments, got %s", call.command,
                                            Quoted(absl::StrJoin(operands, " "))));
  }
  call.target = absl::GetFlag(FLAGS_target);
  call.timeout = absl::GetFlag(FLAGS_timeout);
  call.service = absl::GetFlag(FLAGS_service);
  if (call.target.empty()) {
    return Fail(kExitUsage, "--target must not be empty");
  }
  if (call.timeout <= absl::ZeroDuration()) {
    return Fail(kExitUsage, "--timeout must be positive");
  }

  tb::client::ClientOptions client_options;
  client_options.target = call.target;
  client_options.tls = absl::GetFlag(FLAGS_tls);
  client_options.ca_file = absl::GetFlag(FLAGS_ca_file);
  client_options.cert_file = absl::GetFlag(FLAGS_cert_file);
  client_options.key_file = absl::GetFlag(FLAGS_key_file);
  if (const std::string key_file = absl::GetFlag(FLAGS_api_key_file); !key_file.empty()) {
    std::ifstream in(key_file);
    if (!in || !std::getline(in, client_options.api_key) || client_options.api_key.empty()) {
      return Fail(kExitUsage, absl::StrFormat("cannot read an API key from %s", Quoted(key_file)));
    }
  } else if (const std::string env = absl::GetFlag(FLAGS_api_key_env); !env.empty()) {
    if (const char* v = std::getenv(env.c_str()); v != nullptr) {
      client_options.api_key = v;
    }
  }
  absl::StatusOr<std::unique_ptr<tb::client::TokenClient>> created =
      tb::client::TokenClient::Create(client_options);
  if (!created.ok()) {
    return Fail(kExitUsage, created.status().message());
  }
  const std::unique_ptr<tb::client::TokenClient> client = *std::move(created);
  int rc = kExitUsage;
  if (call.command == "get") {
    rc = RunGet(*client, call);
  } else if (call.command == "list") {
    rc = RunList(*client, call);
  } else if (call.command == "show") {
    rc = RunShow(*client, call);
  } else if (call.command == "delete") {
    rc = RunDelete(*client, call);
  } else if (call.command == "health") {
    rc = RunHealth(*client, call);
  } else if (call.command == "link") {
    rc = RunLink(*client, call);
  } else if (call.command == "revoke-link") {
    rc = RunRevokeLink(*client, call);
  } else if (call.command == "refresh") {
    rc = RunRefresh(*client, call);
  } else if (call.command == "revoke") {
    rc = RunRevoke(*client, call);
  } else if (call.command == "watch") {
    rc = RunWatch(*client, call);
  } else if (call.command == "rotate-keys") {
    rc = RunRotateKeys(*client, call);
  }
  // A script reading `$(tokenctl get ...)` must not take a truncated token for a good one.
  if (std::fflush(stdout) != 0 || std::ferror(stdout)) {
    return Fail(kExitRpcError, "cannot write to stdout");
  }
  return rc;
}

}  // namespace

int main(int argc, char** argv) { return Run(argc, argv); }
