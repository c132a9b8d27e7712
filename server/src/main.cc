// token-broker: the composition root. Reads the configuration, builds every component from its
// own slice of it, serves until SIGTERM/SIGINT, then drains. The only file that knows every
// concrete type.

#include <signal.h>

#include <cstdio>
#include <memory>
#include <string>

#include <spdlog/spdlog.h>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "server/src/cache/connection_cache.h"
#include "server/src/common/clock.h"
#include "server/src/common/logging.h"
#include "server/src/config/config.h"
#include "server/src/grpc/grpc_server.h"
#include "server/src/http/admin_routes.h"
#include "server/src/http/http_server.h"
#include "server/src/oauth/broker.h"
#include "server/src/store/in_memory_token_store.h"

ABSL_FLAG(std::string, config, "", "YAML config file; empty: the embedded development defaults");
ABSL_FLAG(std::string, grpc_listen, "", "Override grpc.listen (host:port)");
ABSL_FLAG(std::string, probe_listen, "", "Override grpc.probe_listen (host:port)");
ABSL_FLAG(std::string, public_listen, "", "Override http.public_listen (host:port)");
ABSL_FLAG(std::string, admin_listen, "", "Override http.admin_listen (host:port)");
ABSL_FLAG(std::string, log_level, "", "Override log.level");
ABSL_FLAG(std::string, log_file, "", "Append logs to this file instead of stderr");

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

absl::StatusOr<tb::config::Config> ReadConfig() {
  tb::config::Config c;
  if (const std::string path = absl::GetFlag(FLAGS_config); !path.empty()) {
    absl::StatusOr<tb::config::Config> loaded = tb::config::LoadConfigFile(path);
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
  if (absl::Status s = tb::config::Validate(c); !s.ok()) {
    return s;
  }
  return c;
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
  absl::SetProgramUsageMessage("token-broker [--config=FILE] [overrides]");
  absl::ParseCommandLine(argc, argv);

  absl::StatusOr<tb::config::Config> config = ReadConfig();
  if (!config.ok()) {
    return Fail(config.status());
  }
  if (absl::Status s = tb::InitLogging({config->log.level, config->log.format,
                                        absl::GetFlag(FLAGS_log_file)});
      !s.ok()) {
    return Fail(s);
  }

  // Block the stop signals before any thread starts, so that only sigwait below sees them.
  sigset_t stop_signals;
  sigemptyset(&stop_signals);
  sigaddset(&stop_signals, SIGTERM);
  sigaddset(&stop_signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &stop_signals, nullptr);

  tb::SystemClock clock;
  tb::store::InMemoryTokenStore store;
  tb::cache::ConnectionCache cache;
  tb::oauth::Broker broker(clock, store, cache);

  absl::StatusOr<std::unique_ptr<tb::grpc_api::GrpcServer>> grpc_server =
      tb::grpc_api::GrpcServer::Start(
          {config->grpc.listen, config->grpc.probe_listen, config->grpc.threads}, broker, cache);
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
  tb::http::AdminState admin_state;
  admin_state.live = [] { return true; };
  admin_state.ready = [grpc] { return grpc->ready(); };
  absl::StatusOr<std::unique_ptr<tb::http::HttpServer>> admin_http =
      tb::http::HttpServer::Start(*admin_opts, tb::http::MakeAdminHandler(admin_state));
  if (!admin_http.ok()) {
    return Fail(admin_http.status());
  }
  absl::StatusOr<std::unique_ptr<tb::http::HttpServer>> public_http =
      tb::http::HttpServer::Start(*public_opts, tb::http::MakePublicHandler());
  if (!public_http.ok()) {
    return Fail(public_http.status());
  }

  if (absl::Status s = broker.Load(); !s.ok()) {
    return Fail(s);
  }
  grpc->SetReady(true);
  spdlog::info("token-broker ready: {} connections, store {}", cache.size(), config->store.url);

  int sig = 0;
  sigwait(&stop_signals, &sig);
  spdlog::info("signal {}: draining", sig);
  grpc->SetReady(false);
  grpc->Shutdown(absl::Now() + absl::Seconds(10));
  (*public_http)->Stop();
  (*admin_http)->Stop();
  spdlog::info("token-broker stopped");
  return 0;
}
