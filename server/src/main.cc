// token-broker: the composition root. Reads the configuration, builds every component from its
// own slice of it, serves until SIGTERM/SIGINT, then drains. The only file that knows every
// concrete type.

#include <signal.h>
#include <sys/prctl.h>
#include <sys/resource.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <limits>
#include <memory>
#include <optional>
#include <string>
#include <thread>

#include <spdlog/spdlog.h>

#include "absl/container/flat_hash_map.h"
#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "server/src/auth/authorizer.h"
#include "server/src/cache/connection_cache.h"
#include "server/src/common/absl_mutex_mode.h"
#include "server/src/common/clock.h"
#include "server/src/common/logging.h"
#include "server/src/common/metrics.h"
#include "server/src/common/mutex.h"
#include "server/src/common/secret.h"
#include "server/src/common/secret_format.h"
#include "server/src/common/work_pool.h"
#include "server/src/config/config.h"
#include "server/src/core/oauth_state.h"
#include "server/src/crypto/aes_gcm_cipher.h"
#include "server/src/crypto/key_ring.h"
#include "server/src/crypto/openssl_digest.h"
#include "server/src/crypto/openssl_random.h"
#include "server/src/grpc/grpc_server.h"
#include "server/src/http/admin_routes.h"
#include "server/src/http/http_server.h"
#include "server/src/http/oauth_routes.h"
#include "server/src/http/rate_limiter.h"
#include "server/src/oauth/authorization_flow.h"
#include "server/src/oauth/broker.h"
#include "server/src/oauth/refresher.h"
#include "server/src/oauth/revoker.h"
#include "server/src/provider/https_provider_client.h"
#include "server/src/store/open_store.h"

ABSL_FLAG(std::string, config, "", "YAML config file; empty: the embedded development defaults");
ABSL_FLAG(std::string, grpc_listen, "", "Override grpc.listen (host:port)");
ABSL_FLAG(std::string, probe_listen, "", "Override grpc.probe_listen (host:port)");
ABSL_FLAG(std::string, public_listen, "", "Override http.public_listen (host:port)");
ABSL_FLAG(std::string, admin_listen, "", "Override http.admin_listen (host:port)");
ABSL_FLAG(std::string, log_level, "", "Override log.level");
ABSL_FLAG(std::string, log_file, "", "Append logs to this file instead of stderr");
ABSL_FLAG(std::string, public_base_url, "", "Override public_base_url");
ABSL_FLAG(std::string, store_url, "", "Override store.url");
ABSL_FLAG(bool, allow_insecure_grpc_on_non_loopback, false,
          "Allow grpc.insecure (no TLS, no authentication) on a non-loopback listener. Anyone who "
          "reaches the port gets every token: never in production");

namespace {

int Fail(const absl::Status& s) {
  std::fprintf(stderr, "token-broker: %s\n", std::string(s.message()).c_str());
  return 1;
}

void Override(std::string* field, const absl::Flag<std::string>& flag) {
  if (std::string v = absl::GetFlag(flag); !v.empty()) {
    *field = std::move(v);
  }
}

// The one place that reads the environment: secrets named by *_env keys and the proxy.
std::optional<std::string> Getenv(const std::string& name) {
  const char* v = std::getenv(name.c_str());
  return v == nullptr ? std::nullopt : std::optional<std::string>(v);
}

std::string EnvOr(std::initializer_list<const char*> names) {
  for (const char* n : names) {
    if (std::optional<std::string> v = Getenv(n); v && !v->empty()) {
      return *v;
    }
  }
  return "";
}

absl::Status CheckGrpcExposure(const tb::config::Config& c);

absl::StatusOr<tb::config::Config> ReadConfig() {
  tb::config::Config c;
  if (const std::string path = absl::GetFlag(FLAGS_config); !path.empty()) {
    absl::StatusOr<tb::config::Config> loaded = tb::config::LoadConfigFile(path, &Getenv);
    if (!loaded.ok()) {
      return loaded.status();
    }
    c = *std::move(loaded);
  }
  Override(&c.grpc.listen, FLAGS_grpc_listen);
  Override(&c.grpc.probe_listen, FLAGS_probe_listen);
  Override(&c.http.public_listen, FLAGS_public_listen);
  Override(&c.http.admin_listen, FLAGS_admin_listen);
  Override(&c.log.level, FLAGS_log_level);
  Override(&c.public_base_url, FLAGS_public_base_url);
  Override(&c.store.url, FLAGS_store_url);
  if (absl::Status s = tb::config::Validate(c); !s.ok()) {
    return s;
  }
  if (absl::Status s = CheckGrpcExposure(c); !s.ok()) {
    return s;
  }
  return c;
}

// Inline callers plus those of the callers file.
absl::StatusOr<std::vector<tb::auth::CallerRule>> CallerRules(const tb::config::Config& c) {
  std::vector<tb::auth::CallerRule> rules = c.auth.callers;
  if (!c.auth.callers_file.empty()) {
    absl::StatusOr<std::vector<tb::auth::CallerRule>> from_file =
        tb::config::LoadCallersFile(c.auth.callers_file);
    if (!from_file.ok()) {
      return from_file.status();
    }
    rules.insert(rules.end(), from_file->begin(), from_file->end());
  }
  return rules;
}

std::optional<std::filesystem::file_time_type> ModifiedAt(const std::string& path) {
  std::error_code ec;
  const std::filesystem::file_time_type t = std::filesystem::last_write_time(path, ec);
  return ec ? std::nullopt : std::optional(t);
}

bool IsLoopback(const std::string& listen) {
  absl::StatusOr<tb::config::HostPort> hp = tb::config::ParseHostPort(listen);
  return hp.ok() &&
         (hp->host == "localhost" || hp->host == "::1" || absl::StartsWith(hp->host, "127."));
}

// The rules that keep the main port from being left open by mistake.
absl::Status CheckGrpcExposure(const tb::config::Config& c) {
  const bool loopback = IsLoopback(c.grpc.listen);
  if (c.grpc.insecure && !loopback && !absl::GetFlag(FLAGS_allow_insecure_grpc_on_non_loopback)) {
    return absl::FailedPreconditionError(absl::StrCat(
        "grpc.insecure is set and grpc.listen (", c.grpc.listen,
        ") is not a loopback address: that would hand every token to anyone on the network. "
        "Configure grpc.tls and callers, or pass --allow_insecure_grpc_on_non_loopback if you "
        "really mean it"));
  }
  if (!c.grpc.insecure && !c.grpc.tls && !loopback) {
    return absl::FailedPreconditionError(absl::StrCat(
        "grpc.listen (", c.grpc.listen,
        ") is not a loopback address: configure grpc.tls (cert_file, key_file, and "
        "client_ca_file for mTLS) so that API keys and tokens never cross the network in clear"));
  }
  return absl::OkStatus();
}

// A store URL for the log: a postgres:// password, if the URL carries one, is not printed.
std::string RedactedStoreUrl(const std::string& url) {
  const size_t scheme = url.find("://");
  const size_t at = url.find('@');
  if (scheme == std::string::npos || at == std::string::npos || at < scheme) {
    return url;
  }
  const size_t colon = url.find(':', scheme + 3);
  if (colon == std::string::npos || colon > at) {
    return url;
  }
  return absl::StrCat(url.substr(0, colon), ":<redacted>", url.substr(at));
}

absl::StatusOr<tb::http::HttpServerOptions> HttpOptions(const std::string& listen, int threads,
                                                        const char* name) {
  absl::StatusOr<tb::config::HostPort> hp = tb::config::ParseHostPort(listen);
  if (!hp.ok()) {
    return hp.status();
  }
  tb::http::HttpServerOptions o;
  o.address = hp->host;
  o.port = hp->port;
  o.threads = threads;
  o.name = name;
  return o;
}

}  // namespace

int main(int argc, char** argv) {
  tb::UseReleaseAbslMutexMode();
  absl::SetProgramUsageMessage("token-broker [--config=FILE] [overrides]");
  absl::ParseCommandLine(argc, argv);
  // No core dumps: one would hold every token, refresh token and key in memory.
  const rlimit no_core{0, 0};
  setrlimit(RLIMIT_CORE, &no_core);
  prctl(PR_SET_DUMPABLE, 0, 0, 0, 0);

  absl::StatusOr<tb::config::Config> config = ReadConfig();
  if (!config.ok()) {
    return Fail(config.status());
  }
  if (absl::Status s =
          tb::InitLogging({config->log.level, config->log.format, absl::GetFlag(FLAGS_log_file)});
      !s.ok()) {
    return Fail(s);
  }

  // Block the stop signals before any thread starts, so that only sigwait below sees them.
  sigset_t stop_signals;
  sigemptyset(&stop_signals);
  sigaddset(&stop_signals, SIGTERM);
  sigaddset(&stop_signals, SIGINT);
  sigaddset(&stop_signals, SIGHUP);
  pthread_sigmask(SIG_BLOCK, &stop_signals, nullptr);

  tb::SystemClock clock;
  tb::crypto::OpenSslRandom random;
  tb::crypto::OpenSslDigest digest;
  // Log fingerprints of secrets are keyed; with a configured link key, replicas and restarts
  // agree on them (otherwise each process draws its own key).
  if (config->links.signing_key) {
    tb::SetFingerprintKey(
        digest.HmacSha256(config->links.signing_key->Reveal(), "token-broker fingerprints v1"));
  }
  // Encryption at rest: every secret a durable store holds is sealed with the newest key.
  std::unique_ptr<tb::crypto::AesGcmCipher> cipher;
  if (config->store.encryption_keys) {
    absl::StatusOr<tb::crypto::KeyRing> keys = tb::crypto::KeyRing::Parse(
        config->store.encryption_keys->Reveal(), config->store.encryption_keys_source);
    if (!keys.ok()) {
      return Fail(keys.status());
    }
    cipher = std::make_unique<tb::crypto::AesGcmCipher>(*std::move(keys));
    spdlog::info("encryption keys: {} (newest, sealing: {})",
                 absl::StrJoin(cipher->key_ids(), ", "), cipher->current_key_id());
  }
  tb::store::StoreOptions store_options;
  store_options.url = config->store.url;
  store_options.pool_size = static_cast<size_t>(config->store.pool_size);
  store_options.statement_timeout = config->store.statement_timeout;
  store_options.clock = &clock;
  absl::StatusOr<tb::store::Stores> stores = tb::store::OpenStores(store_options, cipher.get());
  if (!stores.ok()) {
    return Fail(stores.status());
  }
  tb::core::TokenStore& store = *stores->tokens;
  tb::core::FlowStore& flow_store = *stores->flows;
  tb::cache::ConnectionCache cache;
  // Prometheus metrics, served on the admin port's /metrics.
  tb::metrics::Registry metrics;
  // The refresh scheduler follows every published change from the store's load on (set just
  // before Broker::Load, so the load's publishes are tracked as they happen); read by writers
  // on any thread.
  std::atomic<tb::oauth::Refresher*> refresher_hook{nullptr};
  tb::oauth::BrokerOptions broker_options;
  broker_options.refresh.margin = config->refresh.margin;
  broker_options.refresh.max_jitter = config->refresh.max_jitter;
  broker_options.max_min_ttl = config->refresh.max_min_ttl;
  const int64_t max_jitter_ms =
      std::max<int64_t>(1, absl::ToInt64Milliseconds(config->refresh.max_jitter));
  broker_options.jitter = [&random, max_jitter_ms] {
    uint8_t b[4];
    random.Fill(absl::MakeSpan(b));
    const uint32_t r = uint32_t{b[0]} << 24 | uint32_t{b[1]} << 16 | uint32_t{b[2]} << 8 | b[3];
    return absl::Milliseconds(r % max_jitter_ms);
  };
  broker_options.on_change = [&refresher_hook](const auto& c, const auto& id) {
    if (tb::oauth::Refresher* r = refresher_hook.load(std::memory_order_acquire); r != nullptr) {
      r->Track(c, id);
    }
  };
  broker_options.events = [](absl::string_view event, const tb::core::ConnectionId& id,
                             const absl::Status& s) {
    spdlog::error("store {} connection={}: {}", std::string(event), id, s.ToString());
  };
  broker_options.metrics = &metrics;
  tb::oauth::Broker broker(clock, store, cache, broker_options);

  tb::provider::HttpClientOptions outbound;
  outbound.https_proxy =
      config->outbound.https_proxy.value_or(EnvOr({"HTTPS_PROXY", "https_proxy"}));
  outbound.no_proxy = config->outbound.no_proxy.value_or(EnvOr({"NO_PROXY", "no_proxy"}));
  std::vector<tb::core::ProviderSpec> specs;
  for (const auto& [name, spec] : config->providers) {
    specs.push_back(spec);
    spdlog::info("provider {}: preset {}, client id {}, secret {}", name, spec.preset,
                 spec.client_id, spec.client_secret);
  }
  absl::StatusOr<std::unique_ptr<tb::provider::HttpsProviderClient>> provider_client =
      tb::provider::HttpsProviderClient::Create(outbound, specs, clock,
                                                &tb::provider::HttpClient::Create,
                                                tb::provider::ProviderGateOptions{}, &metrics);
  if (!provider_client.ok()) {
    return Fail(provider_client.status());
  }

  tb::oauth::FlowOptions flow_options;
  flow_options.public_base_url = config->public_base_url;
  flow_options.default_link_ttl = config->links.default_ttl;
  flow_options.max_link_ttl = config->links.max_ttl;
  flow_options.return_url_allowlist = config->links.return_url_allowlist;
  if (absl::Status s = tb::oauth::AuthorizationFlow::ValidateOptions(flow_options); !s.ok()) {
    return Fail(s);
  }
  if (config->links.signing_key) {
    flow_options.link_key = *config->links.signing_key;
  } else {
    flow_options.link_key = tb::KeyMaterial(tb::core::RandomToken(random, 48));
    spdlog::warn(
        "links.signing_key is not configured: using a random key, so connect links stop "
        "working when this process exits (set links.signing_key_file in production)");
  }
  // Background and flow events of the domain, which does not log itself.
  const tb::oauth::EventSink events = [](absl::string_view event, const tb::core::ConnectionId& id,
                                         const absl::Status& s) {
    if (s.ok()) {
      spdlog::info("oauth {} connection={}", std::string(event), id);
    } else {
      spdlog::warn("oauth {} connection={}: {}", std::string(event), id, s.ToString());
    }
    // What changed a connection's access, for the audit trail.
    static const absl::flat_hash_map<absl::string_view, absl::string_view>* const kAudited =
        new absl::flat_hash_map<absl::string_view, absl::string_view>{
            {"connected", "connect"},
            {"previous_grant_revoked", "reconnect"},
            {"connection_revoked", "revoke"},
            {"connection_deleted", "delete"},
            {"needs_reauth", "needs_reauth"},
            {"rotation_lost", "needs_reauth"},
            {"provider_misconfigured", "provider_misconfigured"},
            {"revoked_at_provider", "revoked_at_provider"},
        };
    if (const auto it = kAudited->find(event); it != kAudited->end()) {
      tb::Audit(it->second, {{"connection", id},
                             {"event", event},
                             {"outcome", s.ok() ? "ok" : std::string(s.message())}});
    }
  };
  tb::oauth::RevokerOptions revoker_options;
  revoker_options.provider_timeout = config->refresh.provider_timeout;
  // Replaced as a whole on SIGHUP; flows and refreshes in flight keep the definitions they began
  // with.
  tb::core::ProviderDirectory providers(config->providers);
  tb::oauth::Revoker revoker(revoker_options, providers, clock, broker, **provider_client, events);
  tb::oauth::AuthorizationFlow flow(flow_options, providers, clock, random, digest, flow_store,
                                    **provider_client, broker, revoker, events);
  // Blocking domain work (provider calls, store writes) runs here, never on io or gRPC threads:
  // a thread for each scheduled refresh that may be in flight (each holds its thread through
  // the provider call and two store writes), and kOtherWork more for connect callbacks,
  // revocations and refreshes on use (these do not count against max_concurrent, so at peaks
  // they can still queue).
  constexpr int kOtherWork = 4;
  tb::WorkPool work(config->refresh.max_concurrent + kOtherWork, "work");
  const tb::RunBlocking run_blocking = [&work](std::function<void()> task) {
    work.Post(std::move(task));
  };

  tb::oauth::RefresherOptions refresher_options;
  refresher_options.provider_timeout = config->refresh.provider_timeout;
  refresher_options.caller_refresh_interval = config->refresh.caller_refresh_interval;
  refresher_options.max_concurrent = static_cast<size_t>(config->refresh.max_concurrent);
  refresher_options.hot_window = config->refresh.hot_window;
  refresher_options.retry_delay = config->refresh.retry_delay;
  refresher_options.retry_max = config->refresh.retry_max;
  refresher_options.store_outage_margin = config->refresh.store_outage_margin;
  refresher_options.metrics = &metrics;
  refresher_options.max_wait = config->refresh.max_wait;
  refresher_options.jitter = [&random] {  // full jitter for retry backoff: (0, 1]
    uint8_t b[4];
    random.Fill(absl::MakeSpan(b));
    const uint32_t r = uint32_t{b[0]} << 24 | uint32_t{b[1]} << 16 | uint32_t{b[2]} << 8 | b[3];
    return (static_cast<double>(r) + 1.0) / 4294967296.0;
  };
  tb::oauth::Refresher refresher(refresher_options, providers, clock, broker, **provider_client,
                                 revoker, run_blocking, events);

  // Who may call the main port. Insecure mode (development only) lets everyone do everything.
  std::unique_ptr<tb::auth::Authorizer> authorizer;
  if (config->grpc.insecure) {
    spdlog::warn(
        "!!! grpc.insecure is set: the main gRPC port on {} has NO TLS and NO caller "
        "authentication; anyone who reaches it gets every token. Development only. !!!",
        config->grpc.listen);
  } else {
    absl::StatusOr<std::vector<tb::auth::CallerRule>> rules = CallerRules(*config);
    if (!rules.ok()) {
      return Fail(rules.status());
    }
    absl::StatusOr<std::unique_ptr<tb::auth::Authorizer>> created =
        tb::auth::Authorizer::Create(*std::move(rules));
    if (!created.ok()) {
      return Fail(created.status());
    }
    authorizer = *std::move(created);
    if (authorizer->callers() == 0) {
      spdlog::warn(
          "no gRPC callers are configured (auth.callers, auth.callers_file): every call "
          "to the main port is refused as UNAUTHENTICATED");
    }
  }
  tb::grpc_api::GrpcServerOptions grpc_options;
  grpc_options.listen = config->grpc.listen;
  grpc_options.probe_listen = config->grpc.probe_listen;
  grpc_options.cq_threads = config->grpc.threads;
  grpc_options.max_watch_streams = static_cast<size_t>(config->grpc.max_watch_streams);
  grpc_options.max_watch_streams_per_caller =
      static_cast<size_t>(config->grpc.max_watch_streams_per_caller);
  grpc_options.reflection = config->grpc.reflection;
  grpc_options.metrics = &metrics;
  if (config->grpc.tls) {
    grpc_options.tls = tb::grpc_api::GrpcTlsOptions{
        config->grpc.tls->cert_file, config->grpc.tls->key_file, config->grpc.tls->client_ca_file,
        config->grpc.tls->reload_interval};
  }
  tb::grpc_api::GrpcDomain grpc_domain{broker,    cache,        flow,
                                       refresher, run_blocking, authorizer.get()};
  absl::StatusOr<std::unique_ptr<tb::grpc_api::GrpcServer>> grpc_server =
      tb::grpc_api::GrpcServer::Start(grpc_options, grpc_domain);
  if (!grpc_server.ok()) {
    return Fail(grpc_server.status());
  }
  tb::grpc_api::GrpcServer* grpc = grpc_server->get();

  absl::StatusOr<tb::http::HttpServerOptions> admin_opts =
      HttpOptions(config->http.admin_listen, 1, "admin");
  absl::StatusOr<tb::http::HttpServerOptions> public_opts =
      HttpOptions(config->http.public_listen, config->http.threads, "public");
  if (!admin_opts.ok() || !public_opts.ok()) {
    return Fail(!admin_opts.ok() ? admin_opts.status() : public_opts.status());
  }
  // The public front faces the internet: its limits and TLS come from http.*.
  public_opts->max_header_bytes = static_cast<size_t>(config->http.max_header_bytes);
  public_opts->max_body_bytes = static_cast<size_t>(config->http.max_body_bytes);
  public_opts->read_timeout = config->http.read_timeout;
  public_opts->idle_timeout = config->http.idle_timeout;
  public_opts->max_connections = static_cast<size_t>(config->http.max_connections);
  if (config->http.tls) {
    public_opts->tls = tb::http::HttpTlsOptions{
        config->http.tls->cert_file, config->http.tls->key_file, config->http.tls->reload_interval};
  }
  // Values computed when Prometheus scrapes. No connection id is ever a label (cardinality).
  std::vector<tb::metrics::CallbackHandle> scraped;
  scraped.push_back(metrics.AddCallbackFamily(
      "tb_connections", "Connections by status.", tb::metrics::MetricType::kGauge, {"status"},
      [&cache](tb::metrics::SampleSink& out) {
        size_t counts[4] = {0, 0, 0, 0};
        cache.ForEach([&](const tb::core::Connection& c) { ++counts[static_cast<int>(c.status)]; });
        for (const auto s :
             {tb::core::ConnectionStatus::kPending, tb::core::ConnectionStatus::kActive,
              tb::core::ConnectionStatus::kNeedsReauth, tb::core::ConnectionStatus::kRevoked}) {
          out.Add({std::string(tb::core::ConnectionStatusName(s))},
                  static_cast<double>(counts[static_cast<int>(s)]));
        }
      }));
  scraped.push_back(metrics.AddCallbackGauge(
      "tb_token_soonest_expiry_seconds",
      "Seconds until the soonest expiry of an active connection's token (+Inf: none expires).",
      [&cache, &clock] {
        absl::Time soonest = absl::InfiniteFuture();
        cache.ForEach([&](const tb::core::Connection& c) {
          if (c.status == tb::core::ConnectionStatus::kActive && c.grant && c.grant->expires_at) {
            soonest = std::min(soonest, *c.grant->expires_at);
          }
        });
        return soonest == absl::InfiniteFuture() ? std::numeric_limits<double>::infinity()
                                                 : absl::ToDoubleSeconds(soonest - clock.Now());
      }));
  scraped.push_back(
      metrics.AddCallbackGauge("tb_store_up", "1 while the store answers, else 0.",
                               [&broker] { return broker.store_healthy() ? 1.0 : 0.0; }));
  scraped.push_back(metrics.AddCallbackGauge(
      "tb_store_unwritten_grants",
      "Rotated grants served from memory that the store has not taken yet (it was down).",
      [&broker] { return static_cast<double>(broker.unwritten()); }));
  scraped.push_back(metrics.AddCallbackGauge(
      "tb_store_unreadable_records", "Stored records that could not be decrypted at start.",
      [&broker] { return static_cast<double>(broker.data_loss_count()); }));
  scraped.push_back(metrics.AddCallbackGauge(
      "tb_gettoken_waiting", "GetToken calls waiting for a refresh or a generation.",
      [&refresher] { return static_cast<double>(refresher.waiters()); }));
  scraped.push_back(metrics.AddCallbackFamily(
      "tb_provider_gate_events_total",
      "Provider calls held back or let through by the per-host gate, by provider and event.",
      tb::metrics::MetricType::kCounter, {"provider", "event"},
      [&provider_client](tb::metrics::SampleSink& out) {
        const tb::provider::ProviderGateStats st = (*provider_client)->gate_stats();
        for (const auto& [name, c] : st.providers) {
          out.Add({name, "rate_limited"}, static_cast<double>(c.rate_limited));
          out.Add({name, "blocked_by_retry_after"}, static_cast<double>(c.blocked_by_retry_after));
          out.Add({name, "blocked_by_circuit"}, static_cast<double>(c.blocked_by_circuit));
          out.Add({name, "circuit_opened"}, static_cast<double>(c.circuit_opened));
          out.Add({name, "slot_waits"}, static_cast<double>(c.slot_waits));
        }
      }));
  tb::http::AdminState admin_state;
  admin_state.live = [] { return true; };
  admin_state.ready = [grpc] { return grpc->ready(); };
  admin_state.metrics = [&metrics] { return metrics.Render(); };
  absl::StatusOr<std::unique_ptr<tb::http::HttpServer>> admin_http =
      tb::http::HttpServer::Start(*admin_opts, tb::http::MakeAdminHandler(admin_state));
  if (!admin_http.ok()) {
    return Fail(admin_http.status());
  }
  tb::http::OAuthRoutesOptions routes;
  routes.secure_cookies = absl::StartsWith(config->public_base_url, "https://");
  if (config->http.rate_limit_per_minute > 0) {
    tb::http::RateLimitOptions limit;
    limit.per_minute = config->http.rate_limit_per_minute;
    limit.burst = config->http.rate_limit_burst;
    limit.client_ip.trusted_proxy_header = config->http.trusted_proxy_header;
    limit.client_ip.trusted_proxies = config->http.trusted_proxies;
    absl::StatusOr<std::shared_ptr<tb::http::ClientRateLimiter>> limiter =
        tb::http::ClientRateLimiter::Create(std::move(limit), clock);
    if (!limiter.ok()) {
      return Fail(limiter.status());
    }
    routes.rate_limiter = *std::move(limiter);
  }
  absl::StatusOr<std::unique_ptr<tb::http::HttpServer>> public_http = tb::http::HttpServer::Start(
      *public_opts, tb::http::MakeOAuthHandler(flow, run_blocking, routes));
  if (!public_http.ok()) {
    return Fail(public_http.status());
  }

  // Room for the whole store, counted once, in the cache and in the refresher. Every change
  // reaches the refresher as it is published, from the load on: the loaded connections are
  // tracked by the loading thread as it publishes them (while its second thread decodes the next
  // page), and a connect flow finishing during the load is tracked too.
  const size_t stored = store.ConnectionCountHint();
  cache.Reserve(stored);
  refresher.Reserve(stored);
  refresher_hook.store(&refresher, std::memory_order_release);
  if (absl::Status s = broker.Load(); !s.ok()) {
    return Fail(s);
  }
  // Other replicas' writes (PostgreSQL): reloaded on the work pool, never on the store's thread.
  store.WatchRemoteChanges([&work, &broker](const tb::core::ConnectionId& id) {
    work.Post([&broker, id] {
      if (absl::Status s = broker.Reload(id); !s.ok()) {
        spdlog::warn("reload of a connection another replica changed failed connection={}: {}", id,
                     s.ToString());
      }
    });
  });
  refresher.Start(tb::oauth::Refresher::Backlog::kAlreadyTracked);
  grpc->SetReady(true);
  spdlog::info(
      "token-broker ready: {} connections ({} unreadable), {} providers, store {}, OAuth "
      "callback {}",
      cache.size(), broker.data_loss_count(), config->providers.size(),
      RedactedStoreUrl(config->store.url), flow.redirect_uri());

  // Housekeeping every 2 s: the callers file (reloaded without a restart when it changes), and
  // the store (probed while it is down; rotated grants it missed written once it is back).
  tb::Mutex house_mu;
  tb::CondVar house_cv;
  bool house_stop = false;
  const auto reload_callers = [&](absl::string_view why) {
    absl::StatusOr<std::vector<tb::auth::CallerRule>> rules = CallerRules(*config);
    absl::Status s = rules.ok() ? authorizer->Replace(*std::move(rules)) : rules.status();
    if (s.ok()) {
      spdlog::info("callers reloaded ({}): {} callers", std::string(why), authorizer->callers());
    } else {
      spdlog::error("callers not reloaded ({}), keeping the previous rules: {}", std::string(why),
                    s.ToString());
    }
    tb::Audit("callers_reloaded", {{"file", config->auth.callers_file},
                                   {"trigger", why},
                                   {"outcome", s.ok() ? "ok" : std::string(s.message())}});
  };
  std::thread housekeeping([&] {
    std::optional<std::filesystem::file_time_type> seen;
    if (!config->auth.callers_file.empty()) {
      seen = ModifiedAt(config->auth.callers_file);
    }
    bool store_was_healthy = true;
    tb::MutexLock lock(&house_mu);
    while (!house_stop) {
      house_cv.WaitFor(&house_mu, std::chrono::seconds(2));
      if (house_stop) {
        break;
      }
      if (authorizer != nullptr && !config->auth.callers_file.empty()) {
        const std::optional<std::filesystem::file_time_type> now =
            ModifiedAt(config->auth.callers_file);
        if (now != seen) {
          seen = now;
          reload_callers("file changed");
        }
      }
      if (!broker.store_healthy() || broker.unwritten() > 0) {
        (void)broker.ProbeStore();
      }
      if (broker.store_healthy() && broker.unwritten() > 0) {
        const size_t left = broker.FlushUnwritten();
        spdlog::info("store is back: {} rotated grants still unwritten", left);
      }
      const bool healthy = broker.store_healthy();
      if (healthy != store_was_healthy) {
        store_was_healthy = healthy;
        grpc->SetHealth(tb::grpc_api::kStoreService, healthy);
        if (healthy) {
          spdlog::info("store reachable again");
        } else {
          spdlog::error("store unreachable: serving from memory; scheduled refreshes paused");
        }
      }
    }
  });

  // A reloaded configuration's providers: checked first (each gets its outbound HTTPS client,
  // so an unreadable CA file keeps the previous definitions), then swapped in at once.
  const auto reload_providers = [&](const tb::core::ProviderRegistry& next) {
    for (const auto& [name, spec] : next) {
      if (absl::StatusOr<tb::provider::HttpClient*> http = (*provider_client)->ClientFor(spec);
          !http.ok()) {
        spdlog::error("SIGHUP: providers not reloaded, keeping the previous ones: provider {}: {}",
                      name, http.status().ToString());
        tb::Audit("providers_reloaded",
                  {{"trigger", "SIGHUP"}, {"outcome", std::string(http.status().message())}});
        return;
      }
    }
    const std::shared_ptr<const tb::core::ProviderRegistry> before = providers.Snapshot();
    const std::vector<std::string> changed = providers.Replace(next);
    for (const std::string& name : changed) {
      const auto it = next.find(name);
      if (it == next.end()) {
        spdlog::warn(
            "provider {} removed: its connections keep their tokens but cannot refresh "
            "or connect until it is configured again",
            name);
      } else {
        spdlog::info("provider {} {}: preset {}, client id {}, secret {}", name,
                     before->contains(name) ? "changed" : "added", it->second.preset,
                     it->second.client_id, it->second.client_secret);
      }
    }
    refresher.ProvidersChanged(changed);
    spdlog::info("providers reloaded: {} configured, {} changed", next.size(), changed.size());
    tb::Audit("providers_reloaded",
              {{"trigger", "SIGHUP"}, {"changed", absl::StrJoin(changed, ",")}, {"outcome", "ok"}});
  };

  // SIGHUP reloads what can change without a restart (log level, providers, callers); SIGTERM
  // and SIGINT drain and exit.
  int sig = 0;
  for (;;) {
    sigwait(&stop_signals, &sig);
    if (sig != SIGHUP) {
      break;
    }
    spdlog::info("SIGHUP: reloading the log level, the providers and the callers");
    if (const std::string path = absl::GetFlag(FLAGS_config); !path.empty()) {
      absl::StatusOr<tb::config::Config> fresh = tb::config::LoadConfigFile(path, &Getenv);
      if (!fresh.ok()) {
        spdlog::error("SIGHUP: {} not reloaded: {}", path, fresh.status().ToString());
        continue;
      }
      std::string level = fresh->log.level;
      Override(&level, FLAGS_log_level);
      spdlog::set_level(spdlog::level::from_str(level));
      spdlog::info("log level {}", level);
      reload_providers(fresh->providers);
      tb::MutexLock lock(&house_mu);  // the housekeeping thread reads the callers too
      config->auth.callers = fresh->auth.callers;
      if (authorizer != nullptr) {
        reload_callers("SIGHUP");
      }
    } else if (authorizer != nullptr) {
      tb::MutexLock lock(&house_mu);
      reload_callers("SIGHUP");
    }
  }
  spdlog::info("signal {}: draining", sig);
  // Readiness first, so that load balancers stop sending; liveness stays SERVING to the end.
  grpc->SetReady(false);
  absl::SleepFor(config->shutdown.drain_delay);
  {
    tb::MutexLock lock(&house_mu);
    house_stop = true;
  }
  house_cv.SignalAll();
  housekeeping.join();
  refresher.Stop();
  grpc->Shutdown(absl::Now() + config->shutdown.grace);  // in-flight calls finish, streams end
  (*public_http)->Stop();  // waits for callbacks still on the work pool
  (*admin_http)->Stop();
  work.Stop();  // in-flight refreshes finish and are stored
  if (broker.unwritten() > 0) {
    if (broker.FlushUnwritten() > 0) {
      spdlog::error("exiting with {} rotated grants the store did not take", broker.unwritten());
    }
  }
  stores->owner.reset();  // closes the store (and its change feed) while all else still lives
  spdlog::info("token-broker stopped");
  return 0;
}
