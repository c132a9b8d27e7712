// seed_store: writes N active connections into the store a broker config names, through the
// broker's own lifecycle calls (Broker::CreatePending + Activate over the real, encrypted
// store: the records are exactly what token-broker writes), so that the real token-broker can
// then load them (bench only; issue 8's 1M-connection and refresh-churn measurements).
//
//   seed_store --config=broker.yaml --store_url=sqlite:///dev/shm/x/tokens.db --count=1000000
//              --provider=zd --token_bytes=1024
//
// Two kinds of grants:
//   - synthetic (default): access tokens of --token_bytes random characters, 64-character
//     refresh tokens, --lifetime long (0: no expiry). The provider is never called, so such
//     connections must not come due during a measurement.
//   - --from_provider: each grant is a real one from the provider the config names (the fake
//     provider, auto-approving): authorize request, then the code exchange through the broker's
//     own HttpsProviderClient, on --threads threads. Its refresh tokens work at the provider.
//
// Write the database on a tmpfs (/dev/shm) for speed: SQLite syncs every write; copy the file
// afterwards. Prints "seeded <n> connections in <s> s (<rate>/s)".

#include <atomic>
#include <cstdio>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "server/src/cache/connection_cache.h"
#include "server/src/common/clock.h"
#include "server/src/common/logging.h"
#include "server/src/common/mutex.h"
#include "server/src/config/config.h"
#include "server/src/crypto/aes_gcm_cipher.h"
#include "server/src/crypto/key_ring.h"
#include "server/src/oauth/broker.h"
#include "server/src/provider/http_client.h"
#include "server/src/provider/https_provider_client.h"
#include "server/src/store/open_store.h"

ABSL_FLAG(std::string, config, "", "the broker's YAML config (store, keys, providers)");
ABSL_FLAG(std::string, store_url, "", "override store.url (e.g. a file on /dev/shm)");
ABSL_FLAG(int, count, 1000, "connections to write");
ABSL_FLAG(std::string, id_format, "bench-%06d", "connection ids: absl::StrFormat pattern of i");
ABSL_FLAG(int, id_offset, 0, "first id number");
ABSL_FLAG(std::string, provider, "", "provider name (from the config) of every connection");
ABSL_FLAG(std::string, params, "", "connection parameters, k=v,k=v (e.g. subdomain=acme)");
ABSL_FLAG(int, token_bytes, 1024, "synthetic access token length");
ABSL_FLAG(int, refresh_token_bytes, 64, "synthetic refresh token length");
ABSL_FLAG(absl::Duration, lifetime, absl::Hours(24), "synthetic token lifetime; 0: no expiry");
ABSL_FLAG(bool, from_provider, false, "real grants from the provider (authorize + exchange)");
ABSL_FLAG(int, threads, 4, "with --from_provider: provider calls in parallel");
ABSL_FLAG(std::string, redirect_uri, "http://127.0.0.1:1/oauth/callback",
          "with --from_provider: the redirect_uri of the authorize request and the exchange");

namespace {

int Fail(const std::string& what, const absl::Status& s) {
  std::fprintf(stderr, "seed_store: %s: %s\n", what.c_str(), s.ToString().c_str());
  return 1;
}

std::string RandomToken(std::mt19937_64& rng, int n) {
  static constexpr char kAlphabet[] =
      "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
  std::string s(static_cast<size_t>(std::max(0, n)), 'x');
  uint64_t bits = 0;
  int left = 0;
  for (char& c : s) {
    if (left == 0) {
      bits = rng();
      left = 10;
    }
    c = kAlphabet[bits & 63];
    bits >>= 6;
    --left;
  }
  return s;
}

std::string PercentEncode(absl::string_view s) {
  std::string out;
  for (const unsigned char c : s) {
    if (absl::ascii_isalnum(c) || c == '-' || c == '_' || c == '.' || c == '~') {
      out += static_cast<char>(c);
    } else {
      absl::StrAppendFormat(&out, "%%%02X", c);
    }
  }
  return out;
}

// A real grant from the provider: the authorize request (the fake approves at once and
// redirects with a code), then the code exchange through the broker's provider client.
absl::StatusOr<tb::core::Grant> GrantFromProvider(tb::provider::HttpClient& http,
                                                  tb::provider::HttpsProviderClient& client,
                                                  const tb::core::ProviderSpec& spec,
                                                  const tb::core::Connection& c, int i) {
  const std::string redirect = absl::GetFlag(FLAGS_redirect_uri);
  absl::StatusOr<std::string> base = tb::core::ExpandUrl(spec.authorize_url, c.params);
  if (!base.ok()) {
    return base.status();
  }
  std::string url =
      absl::StrCat(*base, "?response_type=code&client_id=", PercentEncode(spec.client_id),
                   "&redirect_uri=", PercentEncode(redirect), "&state=seed", i);
  if (!spec.scopes.empty()) {
    absl::StrAppend(&url, "&scope=", PercentEncode(absl::StrJoin(spec.scopes, " ")));
  }
  const absl::Time deadline = absl::Now() + absl::Seconds(30);
  absl::StatusOr<tb::provider::HttpResponse> r = http.Send({"GET", url, {}, ""}, deadline);
  if (!r.ok()) {
    return r.status();
  }
  const std::string location = r->Header("Location");
  const size_t at = location.find("code=");
  if (r->status != 302 || at == std::string::npos) {
    return absl::InternalError(
        absl::StrCat("authorize answered ", r->status, " without a code in Location"));
  }
  std::string code = location.substr(at + 5);
  code = code.substr(0, code.find('&'));
  return client.ExchangeCode(spec, c, tb::AuthCode(code), tb::PkceVerifier(), redirect, deadline);
}

}  // namespace

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  if (absl::Status s = tb::InitLogging({"warn", "text", ""}); !s.ok()) {
    return Fail("logging", s);
  }
  const std::string config_path = absl::GetFlag(FLAGS_config);
  if (config_path.empty()) {
    return Fail("flags", absl::InvalidArgumentError("--config is required"));
  }
  absl::StatusOr<tb::config::Config> config = tb::config::LoadConfigFile(config_path);
  if (!config.ok()) {
    return Fail(config_path, config.status());
  }
  if (const std::string url = absl::GetFlag(FLAGS_store_url); !url.empty()) {
    config->store.url = url;
  }
  const std::string provider = absl::GetFlag(FLAGS_provider);
  const auto spec_it = config->providers.find(provider);
  if (spec_it == config->providers.end()) {
    return Fail("flags", absl::InvalidArgumentError(
                             absl::StrCat("--provider ", provider, " is not in the config")));
  }
  const tb::core::ProviderSpec& spec = spec_it->second;
  std::map<std::string, std::string> params;
  for (absl::string_view kv : absl::StrSplit(absl::GetFlag(FLAGS_params), ',', absl::SkipEmpty())) {
    const std::pair<std::string, std::string> p = absl::StrSplit(kv, absl::MaxSplits('=', 1));
    params[p.first] = p.second;
  }

  std::unique_ptr<tb::crypto::AesGcmCipher> cipher;
  if (config->store.encryption_keys) {
    absl::StatusOr<tb::crypto::KeyRing> keys = tb::crypto::KeyRing::Parse(
        config->store.encryption_keys->Reveal(), config->store.encryption_keys_source);
    if (!keys.ok()) {
      return Fail("keys", keys.status());
    }
    cipher = std::make_unique<tb::crypto::AesGcmCipher>(*std::move(keys));
  }
  tb::SystemClock clock;
  tb::store::StoreOptions store_options;
  store_options.url = config->store.url;
  store_options.clock = &clock;
  absl::StatusOr<tb::store::Stores> stores = tb::store::OpenStores(store_options, cipher.get());
  if (!stores.ok()) {
    return Fail("store", stores.status());
  }
  tb::cache::ConnectionCache cache;
  tb::oauth::BrokerOptions broker_options;
  broker_options.refresh.margin = config->refresh.margin;
  broker_options.refresh.max_jitter = config->refresh.max_jitter;
  const int64_t max_jitter_ms =
      std::max<int64_t>(1, absl::ToInt64Milliseconds(config->refresh.max_jitter));
  tb::Mutex jitter_mu;
  std::mt19937_64 jitter_rng(42);
  broker_options.jitter = [&] {
    tb::MutexLock lock(&jitter_mu);
    return absl::Milliseconds(static_cast<int64_t>(jitter_rng() % max_jitter_ms));
  };
  tb::oauth::Broker broker(clock, *stores->tokens, cache, broker_options);

  const int count = absl::GetFlag(FLAGS_count);
  const int offset = absl::GetFlag(FLAGS_id_offset);
  const auto format = absl::ParsedFormat<'d'>::New(absl::GetFlag(FLAGS_id_format));
  if (format == nullptr) {
    return Fail("flags", absl::InvalidArgumentError("--id_format must take one %d"));
  }
  const absl::Time started = absl::Now();

  if (!absl::GetFlag(FLAGS_from_provider)) {
    std::mt19937_64 rng(std::random_device{}());
    const absl::Duration lifetime = absl::GetFlag(FLAGS_lifetime);
    for (int i = 0; i < count; ++i) {
      const std::string id = absl::StrFormat(*format, i + offset);
      if (absl::Status s = broker.CreatePending(id, provider, params).status(); !s.ok()) {
        return Fail(id, s);
      }
      tb::core::Grant g;
      g.access_token = tb::AccessToken(RandomToken(rng, absl::GetFlag(FLAGS_token_bytes)));
      g.refresh_token =
          tb::RefreshToken(RandomToken(rng, absl::GetFlag(FLAGS_refresh_token_bytes)));
      g.scopes = {"read", "write"};
      g.issued_at = clock.Now();
      if (lifetime > absl::ZeroDuration()) {
        g.expires_at = g.issued_at + lifetime;
      }
      g.provider_token_id = absl::StrCat(1000000 + i);
      if (absl::Status s = broker.Activate(id, std::move(g)).status(); !s.ok()) {
        return Fail(id, s);
      }
      if ((i + 1) % 100000 == 0) {
        std::fprintf(stderr, "seed_store: %d\n", i + 1);
      }
    }
  } else {
    tb::provider::HttpClientOptions http_options;
    http_options.ca_file = spec.ca_file;
    absl::StatusOr<std::unique_ptr<tb::provider::HttpClient>> http =
        tb::provider::HttpClient::Create(http_options);
    if (!http.ok()) {
      return Fail("http client", http.status());
    }
    absl::StatusOr<std::unique_ptr<tb::provider::HttpsProviderClient>> client =
        tb::provider::HttpsProviderClient::Create({}, {spec}, clock);
    if (!client.ok()) {
      return Fail("provider client", client.status());
    }
    std::atomic<int> next{0};
    std::atomic<bool> failed{false};
    std::vector<std::thread> threads;
    for (int t = 0; t < std::max(1, absl::GetFlag(FLAGS_threads)); ++t) {
      threads.emplace_back([&] {
        for (int i = next++; i < count && !failed; i = next++) {
          const std::string id = absl::StrFormat(*format, i + offset);
          absl::StatusOr<std::shared_ptr<const tb::core::Connection>> pending =
              broker.CreatePending(id, provider, params);
          absl::Status s = pending.status();
          if (s.ok()) {
            absl::StatusOr<tb::core::Grant> g =
                GrantFromProvider(**http, **client, spec, **pending, i);
            s = g.ok() ? broker.Activate(id, *std::move(g)).status() : g.status();
          }
          if (!s.ok()) {
            std::fprintf(stderr, "seed_store: %s: %s\n", id.c_str(), s.ToString().c_str());
            failed = true;
            return;
          }
          if ((i + 1) % 10000 == 0) {
            std::fprintf(stderr, "seed_store: %d\n", i + 1);
          }
        }
      });
    }
    for (std::thread& t : threads) {
      t.join();
    }
    if (failed) {
      return 1;
    }
  }
  const double secs = absl::ToDoubleSeconds(absl::Now() - started);
  std::printf("seeded %d connections in %.1f s (%.0f/s) into %s\n", count, secs,
              static_cast<double>(count) / secs, config->store.url.c_str());
  return 0;
}
