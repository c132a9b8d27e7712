#include "server/src/config/config.h"

#include <yaml-cpp/yaml.h>

#include <fstream>
#include <functional>
#include <map>
#include <sstream>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "server/src/common/status_macros.h"
#include "server/src/core/connection.h"
#include "server/src/core/provider_presets.h"

namespace tb::config {

namespace {

// yaml-cpp reports errors by throwing; nothing here lets an exception out.
using FieldSetter = std::function<absl::Status(const YAML::Node&, const std::string& path)>;

absl::Status ReadString(const YAML::Node& node, const std::string& path, std::string* out) {
  if (!node.IsScalar()) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": expected a string"));
  }
  *out = node.Scalar();
  return absl::OkStatus();
}

absl::Status ReadInt(const YAML::Node& node, const std::string& path, int* out) {
  if (!node.IsScalar() || !absl::SimpleAtoi(node.Scalar(), out)) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": expected an integer"));
  }
  return absl::OkStatus();
}

// Applies `fields` to the mapping `node`; any key not in `fields` is an error.
absl::Status ReadSection(const YAML::Node& node, const std::string& path,
                         const std::map<std::string, FieldSetter>& fields) {
  if (node.IsNull()) {
    return absl::OkStatus();
  }
  if (!node.IsMap()) {
    return absl::InvalidArgumentError(
        absl::StrCat(path.empty() ? "top level" : path, ": expected a mapping"));
  }
  for (const auto& kv : node) {
    const std::string key = kv.first.Scalar();
    const std::string child = path.empty() ? key : absl::StrCat(path, ".", key);
    const auto it = fields.find(key);
    if (it == fields.end()) {
      std::vector<std::string> known;
      for (const auto& [name, setter] : fields) {
        known.push_back(name);
      }
      return absl::InvalidArgumentError(
          absl::StrCat("unknown key '", child, "'; known keys here: ", absl::StrJoin(known, ", ")));
    }
    TB_RETURN_IF_ERROR(it->second(kv.second, child));
  }
  return absl::OkStatus();
}

FieldSetter Bool(bool* out) {
  return [out](const YAML::Node& n, const std::string& p) -> absl::Status {
    if (n.IsScalar() && (n.Scalar() == "true" || n.Scalar() == "false")) {
      *out = n.Scalar() == "true";
      return absl::OkStatus();
    }
    return absl::InvalidArgumentError(absl::StrCat(p, ": expected true or false"));
  };
}
FieldSetter OptString(std::optional<std::string>* out) {
  return [out](const YAML::Node& n, const std::string& p) {
    std::string v;
    TB_RETURN_IF_ERROR(ReadString(n, p, &v));
    *out = std::move(v);
    return absl::OkStatus();
  };
}
FieldSetter OptInt64(std::optional<int64_t>* out) {
  return [out](const YAML::Node& n, const std::string& p) -> absl::Status {
    int64_t v = 0;
    if (!n.IsScalar() || !absl::SimpleAtoi(n.Scalar(), &v)) {
      return absl::InvalidArgumentError(absl::StrCat(p, ": expected an integer"));
    }
    *out = v;
    return absl::OkStatus();
  };
}
FieldSetter Duration(absl::Duration* out) {
  return [out](const YAML::Node& n, const std::string& p) -> absl::Status {
    if (!n.IsScalar() || !absl::ParseDuration(n.Scalar(), out) || *out < absl::ZeroDuration()) {
      return absl::InvalidArgumentError(
          absl::StrCat(p, ": expected a duration such as 30s, 10m or 72h"));
    }
    return absl::OkStatus();
  };
}
FieldSetter StringList(std::optional<std::vector<std::string>>* out) {
  return [out](const YAML::Node& n, const std::string& p) -> absl::Status {
    if (!n.IsSequence()) {
      return absl::InvalidArgumentError(absl::StrCat(p, ": expected a list of strings"));
    }
    std::vector<std::string> v;
    for (const auto& item : n) {
      if (!item.IsScalar()) {
        return absl::InvalidArgumentError(absl::StrCat(p, ": expected a list of strings"));
      }
      v.push_back(item.Scalar());
    }
    *out = std::move(v);
    return absl::OkStatus();
  };
}
FieldSetter StringMap(std::map<std::string, std::string>* out) {
  return [out](const YAML::Node& n, const std::string& p) -> absl::Status {
    if (!n.IsMap()) {
      return absl::InvalidArgumentError(absl::StrCat(p, ": expected a mapping of strings"));
    }
    for (const auto& kv : n) {
      if (!kv.second.IsScalar()) {
        return absl::InvalidArgumentError(
            absl::StrCat(p, ".", kv.first.Scalar(), ": expected a string"));
      }
      (*out)[kv.first.Scalar()] = kv.second.Scalar();
    }
    return absl::OkStatus();
  };
}

// A secret named in the config: the path of a file holding it, or an environment variable.
struct SecretRef {
  std::string file;
  std::string env;
};

// What a providers.<name> section says before it is merged onto its preset.
struct RawProvider {
  std::string preset;
  std::optional<std::string> authorize_url, token_url, revoke_url, token_info_url;
  std::optional<std::vector<std::string>> scopes;
  std::string client_id;
  SecretRef client_secret;
  std::optional<std::string> body_encoding, client_auth;
  std::optional<bool> pkce;
  std::optional<int64_t> expires_in, refresh_token_expires_in;
  std::map<std::string, std::string> extra_authorize_params, extra_token_params;
  std::string ca_file;
  std::optional<absl::Duration> connect_timeout, request_timeout;
};

FieldSetter String(std::string* out) {
  return [out](const YAML::Node& n, const std::string& p) { return ReadString(n, p, out); };
}
FieldSetter Int(int* out) {
  return [out](const YAML::Node& n, const std::string& p) { return ReadInt(n, p, out); };
}
FieldSetter Section(std::map<std::string, FieldSetter> fields) {
  return [fields = std::move(fields)](const YAML::Node& n, const std::string& p) {
    return ReadSection(n, p, fields);
  };
}
FieldSetter StringVec(std::vector<std::string>* out) {
  return [out](const YAML::Node& n, const std::string& p) -> absl::Status {
    std::optional<std::vector<std::string>> v;
    TB_RETURN_IF_ERROR(StringList(&v)(n, p));
    *out = *std::move(v);
    return absl::OkStatus();
  };
}
FieldSetter Tls(std::optional<TlsFiles>* out, bool with_client_ca) {
  return [out, with_client_ca](const YAML::Node& n, const std::string& p) -> absl::Status {
    TlsFiles t;
    std::map<std::string, FieldSetter> fields = {
        {"cert_file", String(&t.cert_file)},
        {"key_file", String(&t.key_file)},
        {"reload_interval", Duration(&t.reload_interval)},
    };
    if (with_client_ca) {
      fields["client_ca_file"] = String(&t.client_ca_file);
    }
    TB_RETURN_IF_ERROR(ReadSection(n, p, fields));
    if (t.cert_file.empty() || t.key_file.empty()) {
      return absl::InvalidArgumentError(absl::StrCat(p, ": cert_file and key_file are required"));
    }
    if (t.reload_interval < absl::Seconds(1)) {
      return absl::InvalidArgumentError(absl::StrCat(p, ".reload_interval must be at least 1s"));
    }
    *out = std::move(t);
    return absl::OkStatus();
  };
}

// One entry of a callers list.
absl::StatusOr<auth::CallerRule> ReadCaller(const YAML::Node& n, const std::string& p) {
  auth::CallerRule r;
  std::vector<std::string> rpcs;
  TB_RETURN_IF_ERROR(ReadSection(n, p,
                                 {{"name", String(&r.name)},
                                  {"uri_sans", StringVec(&r.uri_sans)},
                                  {"common_names", StringVec(&r.common_names)},
                                  {"api_key_sha256", StringVec(&r.api_key_sha256)},
                                  {"connections", StringVec(&r.connections)},
                                  {"rpcs", StringVec(&rpcs)}}));
  for (const std::string& rpc : rpcs) {
    std::optional<auth::Permission> perm = auth::ParsePermission(rpc);
    if (!perm) {
      return absl::InvalidArgumentError(absl::StrCat(
          p, ".rpcs: '", rpc, "' is not one of GetToken, WatchToken, Refresh, Revoke, Admin"));
    }
    r.permissions.push_back(*perm);
  }
  for (std::string& h : r.api_key_sha256) {
    h = absl::AsciiStrToLower(h);
  }
  return r;
}

absl::StatusOr<std::vector<auth::CallerRule>> ReadCallers(const YAML::Node& n,
                                                          const std::string& p) {
  if (!n.IsSequence()) {
    return absl::InvalidArgumentError(absl::StrCat(p, ": expected a list of callers"));
  }
  std::vector<auth::CallerRule> out;
  int i = 0;
  for (const auto& item : n) {
    TB_ASSIGN_OR_RETURN(auth::CallerRule r, ReadCaller(item, absl::StrCat(p, "[", i++, "]")));
    out.push_back(std::move(r));
  }
  if (absl::Status s = auth::ValidateRules(out); !s.ok()) {
    return absl::InvalidArgumentError(absl::StrCat(p, ": ", s.message()));
  }
  return out;
}

FieldSetter Callers(std::vector<auth::CallerRule>* out) {
  return [out](const YAML::Node& n, const std::string& p) -> absl::Status {
    TB_ASSIGN_OR_RETURN(*out, ReadCallers(n, p));
    return absl::OkStatus();
  };
}

absl::StatusOr<std::string> ReadSecret(const SecretRef& ref, const std::string& path,
                                       const EnvLookup& env) {
  if (!ref.file.empty() && !ref.env.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": give either ", path, "_file or ", path, "_env, not both"));
  }
  std::string value;
  if (!ref.file.empty()) {
    std::ifstream in(ref.file);
    if (!in) {
      return absl::InvalidArgumentError(absl::StrCat(path, "_file: cannot read ", ref.file));
    }
    std::stringstream buf;
    buf << in.rdbuf();
    value = buf.str();
  } else if (!ref.env.empty()) {
    std::optional<std::string> v = env ? env(ref.env) : std::nullopt;
    if (!v) {
      return absl::InvalidArgumentError(
          absl::StrCat(path, "_env: environment variable ", ref.env, " is not set"));
    }
    value = *std::move(v);
  }
  while (!value.empty() && (value.back() == '\n' || value.back() == '\r')) {
    value.pop_back();
  }
  return value;
}

absl::StatusOr<core::ProviderSpec> BuildProvider(const std::string& name, RawProvider raw,
                                                 const EnvLookup& env) {
  const std::string path = absl::StrCat("providers.", name);
  if (raw.preset.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ".preset is required (zendesk, zendesk-chat or generic)"));
  }
  absl::StatusOr<core::ProviderSpec> preset = core::PresetSpec(raw.preset);
  if (!preset.ok()) {
    return absl::InvalidArgumentError(absl::StrCat(path, ".preset: ", preset.status().message()));
  }
  core::ProviderSpec s = *std::move(preset);
  s.name = name;
  if (raw.authorize_url) {
    s.authorize_url = *raw.authorize_url;
  }
  if (raw.token_url) {
    s.token_url = *raw.token_url;
  }
  if (raw.revoke_url) {
    s.revoke_url = *raw.revoke_url;
  }
  if (raw.token_info_url) {
    s.token_info_url = *raw.token_info_url;
  }
  if (raw.scopes) {
    s.scopes = *raw.scopes;
  }
  s.client_id = raw.client_id;
  TB_ASSIGN_OR_RETURN(std::string secret,
                      ReadSecret(raw.client_secret, absl::StrCat(path, ".client_secret"), env));
  s.client_secret = ClientSecret(std::move(secret));
  if (raw.body_encoding) {
    if (*raw.body_encoding == "json") {
      s.body_encoding = core::BodyEncoding::kJson;
    } else if (*raw.body_encoding == "form") {
      s.body_encoding = core::BodyEncoding::kForm;
    } else {
      return absl::InvalidArgumentError(absl::StrCat(path, ".body_encoding must be json or form"));
    }
  }
  if (raw.client_auth) {
    if (*raw.client_auth == "client_secret_post") {
      s.client_auth = core::ClientAuth::kSecretPost;
    } else if (*raw.client_auth == "client_secret_basic") {
      s.client_auth = core::ClientAuth::kSecretBasic;
    } else {
      return absl::InvalidArgumentError(
          absl::StrCat(path, ".client_auth must be client_secret_post or client_secret_basic"));
    }
  }
  if (raw.pkce) {
    s.pkce = *raw.pkce;
  }
  if (raw.expires_in) {
    s.expires_in = *raw.expires_in;
  }
  if (raw.refresh_token_expires_in) {
    s.refresh_token_expires_in = *raw.refresh_token_expires_in;
  }
  for (const auto& [k, v] : raw.extra_authorize_params) s.extra_authorize_params[k] = v;
  for (const auto& [k, v] : raw.extra_token_params) s.extra_token_params[k] = v;
  s.ca_file = raw.ca_file;
  if (raw.connect_timeout) {
    s.connect_timeout = *raw.connect_timeout;
  }
  if (raw.request_timeout) {
    s.request_timeout = *raw.request_timeout;
  }
  TB_RETURN_IF_ERROR(core::ValidateSpec(s));
  return s;
}

FieldSetter Providers(core::ProviderRegistry* out, const EnvLookup& env) {
  return [out, &env](const YAML::Node& n, const std::string& p) -> absl::Status {
    if (!n.IsMap()) {
      return absl::InvalidArgumentError(absl::StrCat(p, ": expected a mapping of providers"));
    }
    for (const auto& kv : n) {
      const std::string name = kv.first.Scalar();
      if (!core::ValidateConnectionId(name).ok()) {
        return absl::InvalidArgumentError(
            absl::StrCat(p, ": provider name '", name, "' must be like a connection id"));
      }
      RawProvider r;
      bool pkce = true;
      bool pkce_set = false;
      absl::Duration connect = absl::ZeroDuration(), request = absl::ZeroDuration();
      bool connect_set = false, request_set = false;
      const std::string path = absl::StrCat(p, ".", name);
      TB_RETURN_IF_ERROR(
          ReadSection(kv.second, path,
                      {
                          {"preset", String(&r.preset)},
                          {"authorize_url", OptString(&r.authorize_url)},
                          {"token_url", OptString(&r.token_url)},
                          {"revoke_url", OptString(&r.revoke_url)},
                          {"token_info_url", OptString(&r.token_info_url)},
                          {"scopes", StringList(&r.scopes)},
                          {"client_id", String(&r.client_id)},
                          {"client_secret_file", String(&r.client_secret.file)},
                          {"client_secret_env", String(&r.client_secret.env)},
                          {"body_encoding", OptString(&r.body_encoding)},
                          {"client_auth", OptString(&r.client_auth)},
                          {"pkce",
                           [&](const YAML::Node& v, const std::string& vp) {
                             pkce_set = true;
                             return Bool(&pkce)(v, vp);
                           }},
                          {"expires_in", OptInt64(&r.expires_in)},
                          {"refresh_token_expires_in", OptInt64(&r.refresh_token_expires_in)},
                          {"extra_authorize_params", StringMap(&r.extra_authorize_params)},
                          {"extra_token_params", StringMap(&r.extra_token_params)},
                          {"ca_file", String(&r.ca_file)},
                          {"connect_timeout",
                           [&](const YAML::Node& v, const std::string& vp) {
                             connect_set = true;
                             return Duration(&connect)(v, vp);
                           }},
                          {"request_timeout",
                           [&](const YAML::Node& v, const std::string& vp) {
                             request_set = true;
                             return Duration(&request)(v, vp);
                           }},
                      }));
      if (pkce_set) {
        r.pkce = pkce;
      }
      if (connect_set) {
        r.connect_timeout = connect;
      }
      if (request_set) {
        r.request_timeout = request;
      }
      TB_ASSIGN_OR_RETURN(core::ProviderSpec spec, BuildProvider(name, std::move(r), env));
      (*out)[name] = std::move(spec);
    }
    return absl::OkStatus();
  };
}

absl::Status ParseInto(const YAML::Node& root, Config& c, const EnvLookup& env) {
  SecretRef link_key;
  SecretRef store_keys;
  TB_RETURN_IF_ERROR(ReadSection(
      root, "",
      {
          {"grpc",
           Section({{"listen", String(&c.grpc.listen)},
                    {"probe_listen", String(&c.grpc.probe_listen)},
                    {"threads", Int(&c.grpc.threads)},
                    {"max_watch_streams", Int(&c.grpc.max_watch_streams)},
                    {"max_watch_streams_per_caller", Int(&c.grpc.max_watch_streams_per_caller)},
                    {"tls", Tls(&c.grpc.tls, /*with_client_ca=*/true)},
                    {"insecure", Bool(&c.grpc.insecure)},
                    {"reflection", Bool(&c.grpc.reflection)}})},
          {"http", Section({{"public_listen", String(&c.http.public_listen)},
                            {"admin_listen", String(&c.http.admin_listen)},
                            {"threads", Int(&c.http.threads)},
                            {"max_header_bytes", Int(&c.http.max_header_bytes)},
                            {"max_body_bytes", Int(&c.http.max_body_bytes)},
                            {"read_timeout", Duration(&c.http.read_timeout)},
                            {"idle_timeout", Duration(&c.http.idle_timeout)},
                            {"max_connections", Int(&c.http.max_connections)},
                            {"rate_limit_per_minute", Int(&c.http.rate_limit_per_minute)},
                            {"rate_limit_burst", Int(&c.http.rate_limit_burst)},
                            {"trusted_proxy_header", String(&c.http.trusted_proxy_header)},
                            {"trusted_proxies", StringVec(&c.http.trusted_proxies)},
                            {"tls", Tls(&c.http.tls, /*with_client_ca=*/false)}})},
          {"shutdown", Section({{"drain_delay", Duration(&c.shutdown.drain_delay)},
                                {"grace", Duration(&c.shutdown.grace)}})},
          {"auth", Section({{"callers_file", String(&c.auth.callers_file)},
                            {"callers", Callers(&c.auth.callers)}})},
          {"store", Section({{"url", String(&c.store.url)},
                             {"encryption_keys_file", String(&store_keys.file)},
                             {"encryption_keys_env", String(&store_keys.env)},
                             {"pool_size", Int(&c.store.pool_size)},
                             {"statement_timeout", Duration(&c.store.statement_timeout)}})},
          {"log", Section({{"level", String(&c.log.level)}, {"format", String(&c.log.format)}})},
          {"refresh",
           Section({{"margin", Duration(&c.refresh.margin)},
                    {"max_jitter", Duration(&c.refresh.max_jitter)},
                    {"hot_window", Duration(&c.refresh.hot_window)},
                    {"provider_timeout", Duration(&c.refresh.provider_timeout)},
                    {"caller_refresh_interval", Duration(&c.refresh.caller_refresh_interval)},
                    {"retry_delay", Duration(&c.refresh.retry_delay)},
                    {"retry_max", Duration(&c.refresh.retry_max)},
                    {"store_outage_margin", Duration(&c.refresh.store_outage_margin)},
                    {"max_concurrent", Int(&c.refresh.max_concurrent)},
                    {"max_min_ttl", Duration(&c.refresh.max_min_ttl)},
                    {"max_wait", Duration(&c.refresh.max_wait)}})},
          {"public_base_url", String(&c.public_base_url)},
          {"links", Section({{"signing_key_file", String(&link_key.file)},
                             {"signing_key_env", String(&link_key.env)},
                             {"default_ttl", Duration(&c.links.default_ttl)},
                             {"max_ttl", Duration(&c.links.max_ttl)},
                             {"return_url_allowlist", StringVec(&c.links.return_url_allowlist)}})},
          {"outbound", Section({{"https_proxy", OptString(&c.outbound.https_proxy)},
                                {"no_proxy", OptString(&c.outbound.no_proxy)}})},
          {"providers", Providers(&c.providers, env)},
      }));
  if (!store_keys.file.empty() || !store_keys.env.empty()) {
    TB_ASSIGN_OR_RETURN(std::string keys, ReadSecret(store_keys, "store.encryption_keys", env));
    c.store.encryption_keys = KeyMaterial(std::move(keys));
    c.store.encryption_keys_source =
        !store_keys.file.empty() ? store_keys.file : absl::StrCat("env ", store_keys.env);
  }
  if (!link_key.file.empty() || !link_key.env.empty()) {
    TB_ASSIGN_OR_RETURN(std::string key, ReadSecret(link_key, "links.signing_key", env));
    if (key.size() < 32) {
      return absl::InvalidArgumentError(
          "links.signing_key: the key must be at least 32 bytes (e.g. openssl rand -base64 48)");
    }
    c.links.signing_key = KeyMaterial(std::move(key));
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<HostPort> ParseHostPort(absl::string_view address) {
  const auto bad = [&](absl::string_view why) {
    return absl::InvalidArgumentError(absl::StrCat("'", address, "' is not host:port (", why, ")"));
  };
  const size_t colon = address.rfind(':');
  if (colon == absl::string_view::npos || colon == 0) {
    return bad("missing host or port");
  }
  HostPort hp;
  hp.host = std::string(address.substr(0, colon));
  if (hp.host.front() == '[') {
    if (hp.host.back() != ']') {
      return bad("unterminated IPv6 bracket");
    }
    hp.host = hp.host.substr(1, hp.host.size() - 2);
  }
  if (hp.host.empty()) {
    return bad("empty host");
  }
  if (!absl::SimpleAtoi(address.substr(colon + 1), &hp.port) || hp.port < 0 || hp.port > 65535) {
    return bad("port must be 0 to 65535");
  }
  return hp;
}

absl::Status ValidateFields(const Config& c) {
  for (const auto& [name, value] :
       {std::pair<const char*, const std::string&>{"grpc.listen", c.grpc.listen},
        {"grpc.probe_listen", c.grpc.probe_listen},
        {"http.public_listen", c.http.public_listen},
        {"http.admin_listen", c.http.admin_listen}}) {
    if (absl::StatusOr<HostPort> hp = ParseHostPort(value); !hp.ok()) {
      return absl::InvalidArgumentError(absl::StrCat(name, ": ", hp.status().message()));
    }
  }
  if (c.grpc.threads < 0 || c.grpc.threads > 256) {
    return absl::InvalidArgumentError("grpc.threads must be 0 (one per core) to 256");
  }
  if (c.grpc.max_watch_streams < 1 || c.grpc.max_watch_streams_per_caller < 1 ||
      c.grpc.max_watch_streams_per_caller > c.grpc.max_watch_streams) {
    return absl::InvalidArgumentError(
        "grpc.max_watch_streams and grpc.max_watch_streams_per_caller must be at least 1, the "
        "per-caller limit no larger than the total");
  }
  if (c.store.url != "memory:" && !absl::StartsWith(c.store.url, "sqlite:///") &&
      !absl::StartsWith(c.store.url, "postgres://") &&
      !absl::StartsWith(c.store.url, "postgresql://")) {
    return absl::InvalidArgumentError(
        "store.url must be sqlite:///absolute/path/tokens.db, postgres://... or memory:");
  }
  if (c.store.pool_size < 1 || c.store.pool_size > 64) {
    return absl::InvalidArgumentError("store.pool_size must be 1 to 64");
  }
  if (c.store.statement_timeout <= absl::ZeroDuration()) {
    return absl::InvalidArgumentError("store.statement_timeout must be positive");
  }
  const RefreshConfig& r = c.refresh;
  for (const auto& [name, d] : {std::pair<const char*, absl::Duration>{"margin", r.margin},
                                {"max_jitter", r.max_jitter},
                                {"hot_window", r.hot_window}}) {
    if (d < absl::ZeroDuration()) {
      return absl::InvalidArgumentError(absl::StrCat("refresh.", name, " must not be negative"));
    }
  }
  for (const auto& [name, d] :
       {std::pair<const char*, absl::Duration>{"provider_timeout", r.provider_timeout},
        {"caller_refresh_interval", r.caller_refresh_interval},
        {"retry_delay", r.retry_delay},
        {"retry_max", r.retry_max},
        {"max_min_ttl", r.max_min_ttl},
        {"max_wait", r.max_wait}}) {
    if (d <= absl::ZeroDuration()) {
      return absl::InvalidArgumentError(absl::StrCat("refresh.", name, " must be positive"));
    }
  }
  if (r.max_concurrent < 1 || r.max_concurrent > 1'000) {
    return absl::InvalidArgumentError(
        "refresh.max_concurrent must be 1 to 1000 (each refresh in flight holds a thread)");
  }
  const HttpConfig& h = c.http;
  if (h.max_header_bytes < 1024 || h.max_header_bytes > 1 << 20 || h.max_body_bytes < 0 ||
      h.max_body_bytes > 1 << 20) {
    return absl::InvalidArgumentError(
        "http.max_header_bytes must be 1024 to 1048576 and http.max_body_bytes 0 to 1048576");
  }
  if (h.read_timeout <= absl::ZeroDuration() || h.idle_timeout <= absl::ZeroDuration()) {
    return absl::InvalidArgumentError("http.read_timeout and http.idle_timeout must be positive");
  }
  if (h.max_connections < 1 || h.rate_limit_per_minute < 0 || h.rate_limit_burst < 1) {
    return absl::InvalidArgumentError(
        "http.max_connections and http.rate_limit_burst must be at least 1, "
        "http.rate_limit_per_minute at least 0");
  }
  if (!h.trusted_proxies.empty() && h.trusted_proxy_header.empty()) {
    return absl::InvalidArgumentError(
        "http.trusted_proxies needs http.trusted_proxy_header (e.g. X-Forwarded-For)");
  }
  for (const std::string& prefix : c.links.return_url_allowlist) {
    if (!absl::StartsWith(prefix, "https://") && !absl::StartsWith(prefix, "http://")) {
      return absl::InvalidArgumentError(absl::StrCat("links.return_url_allowlist: '", prefix,
                                                     "' must be an http(s):// URL prefix"));
    }
  }
  if (c.http.threads < 1 || c.http.threads > 256) {
    return absl::InvalidArgumentError("http.threads must be 1 to 256");
  }
  if (!absl::StartsWith(c.public_base_url, "https://") &&
      !absl::StartsWith(c.public_base_url, "http://")) {
    return absl::InvalidArgumentError(
        "public_base_url must be an http:// or https:// origin, e.g. https://broker.example.com");
  }
  if (c.links.default_ttl < absl::Minutes(1) || c.links.default_ttl > c.links.max_ttl) {
    return absl::InvalidArgumentError("links.default_ttl must be 1m to links.max_ttl");
  }
  static const char* const kLevels[] = {"trace", "debug",    "info", "warn",
                                        "error", "critical", "off"};
  if (std::find(std::begin(kLevels), std::end(kLevels), c.log.level) == std::end(kLevels)) {
    return absl::InvalidArgumentError(absl::StrCat("log.level '", c.log.level, "' must be one of ",
                                                   absl::StrJoin(kLevels, ", ")));
  }
  if (c.log.format != "text" && c.log.format != "json") {
    return absl::InvalidArgumentError("log.format must be text or json");
  }
  return absl::OkStatus();
}

absl::Status Validate(const Config& c) {
  TB_RETURN_IF_ERROR(ValidateFields(c));
  if (c.store.url != "memory:" && !c.store.encryption_keys) {
    return absl::InvalidArgumentError(
        "store.encryption_keys_file (or store.encryption_keys_env) is required: tokens are "
        "stored encrypted. Create a key file with one line per key, the newest last: "
        "echo \"k1 $(openssl rand -base64 32)\" > keys");
  }
  return absl::OkStatus();
}

absl::StatusOr<Config> ParseConfig(absl::string_view yaml, const EnvLookup& env) {
  Config c;
  try {
    const YAML::Node root = YAML::Load(std::string(yaml));
    TB_RETURN_IF_ERROR(ParseInto(root, c, env));
  } catch (const YAML::Exception& e) {
    return absl::InvalidArgumentError(absl::StrCat("config is not valid YAML: line ",
                                                   e.mark.line + 1, ", column ", e.mark.column + 1,
                                                   ": ", e.msg));
  }
  TB_RETURN_IF_ERROR(ValidateFields(c));
  return c;
}

absl::StatusOr<Config> LoadConfigFile(const std::string& path, const EnvLookup& env) {
  std::ifstream in(path);
  if (!in) {
    return absl::NotFoundError(absl::StrCat("cannot read config file ", path));
  }
  std::stringstream buf;
  buf << in.rdbuf();
  absl::StatusOr<Config> c = ParseConfig(buf.str(), env);
  if (!c.ok()) {
    return absl::Status(c.status().code(), absl::StrCat(path, ": ", c.status().message()));
  }
  return c;
}

absl::StatusOr<std::vector<auth::CallerRule>> ParseCallers(absl::string_view yaml,
                                                           absl::string_view source) {
  try {
    const YAML::Node root = YAML::Load(std::string(yaml));
    return ReadCallers(root, std::string(source));
  } catch (const YAML::Exception& e) {
    return absl::InvalidArgumentError(
        absl::StrCat(source, " is not valid YAML: line ", e.mark.line + 1, ": ", e.msg));
  }
}

absl::StatusOr<std::vector<auth::CallerRule>> LoadCallersFile(const std::string& path) {
  std::ifstream in(path);
  if (!in) {
    return absl::NotFoundError(absl::StrCat("cannot read callers file ", path));
  }
  std::stringstream buf;
  buf << in.rdbuf();
  return ParseCallers(buf.str(), path);
}

}  // namespace tb::config
