// seeded_broker: the real gRPC and admin HTTP servers over a broker seeded with one connection
// of every lifecycle state (tests/support/seed.h) plus --bulk active ones. For tests in other
// processes and languages (tokenctl, Python). Prints one line
//   ports grpc=<port> probe=<port> admin=<port>
// on stdout once serving, then serves until SIGTERM/SIGINT or until stdin closes.

#include <signal.h>
#include <unistd.h>

#include <cstdio>
#include <thread>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/str_cat.h"
#include "server/src/cache/connection_cache.h"
#include "server/src/common/clock.h"
#include "server/src/common/logging.h"
#include "server/src/grpc/grpc_server.h"
#include "server/src/http/admin_routes.h"
#include "server/src/http/http_server.h"
#include "server/src/oauth/broker.h"
#include "server/src/store/in_memory_token_store.h"
#include "tests/support/flow_parts.h"
#include "tests/support/seed.h"

ABSL_FLAG(int, bulk, 0, "extra active connections to seed");

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  tb::LogOptions log;
  log.level = "trace";
  if (const char* dir = std::getenv("TB_TEST_LOG_DIR"); dir != nullptr && *dir != '\0') {
    log.file = absl::StrCat(dir, "/seeded_broker-", getpid(), ".log");
  }
  if (absl::Status s = tb::InitLogging(log); !s.ok()) {
    std::fprintf(stderr, "seeded_broker: %s\n", std::string(s.message()).c_str());
    return 1;
  }
  sigset_t stop_signals;
  sigemptyset(&stop_signals);
  sigaddset(&stop_signals, SIGTERM);
  sigaddset(&stop_signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &stop_signals, nullptr);

  tb::SystemClock clock;
  tb::store::InMemoryTokenStore store;
  tb::cache::ConnectionCache cache;
  tb::oauth::Broker broker(clock, store, cache);
  if (absl::Status s = tb::testing::SeedEveryStatus(broker, clock.Now()); !s.ok()) {
    std::fprintf(stderr, "seeded_broker: seeding failed: %s\n", s.ToString().c_str());
    return 1;
  }
  if (absl::Status s = tb::testing::SeedBulk(broker, clock.Now(), absl::GetFlag(FLAGS_bulk));
      !s.ok()) {
    std::fprintf(stderr, "seeded_broker: seeding failed: %s\n", s.ToString().c_str());
    return 1;
  }
  tb::testing::FlowParts flow_parts(clock, broker);
  auto grpc = tb::grpc_api::GrpcServer::Start(
      {}, {broker, cache, flow_parts.flow, flow_parts.refresher, flow_parts.run_blocking()});
  if (!grpc.ok()) {
    std::fprintf(stderr, "seeded_broker: %s\n", grpc.status().ToString().c_str());
    return 1;
  }
  tb::http::AdminState admin;
  admin.live = [] { return true; };
  tb::grpc_api::GrpcServer* g = grpc->get();
  admin.ready = [g] { return g->ready(); };
  auto http = tb::http::HttpServer::Start({}, tb::http::MakeAdminHandler(admin));
  if (!http.ok()) {
    std::fprintf(stderr, "seeded_broker: %s\n", http.status().ToString().c_str());
    return 1;
  }
  g->SetReady(true);
  std::printf("ports grpc=%d probe=%d admin=%d\n", g->port(), g->probe_port(), (*http)->port());
  std::fflush(stdout);

  // Either a signal or stdin closing (the parent test died) ends the process.
  std::thread stdin_watch([] {
    char buf[64];
    while (read(0, buf, sizeof buf) > 0) {
    }
    kill(getpid(), SIGTERM);
  });
  stdin_watch.detach();
  int sig = 0;
  sigwait(&stop_signals, &sig);
  g->SetReady(false);
  g->Shutdown(absl::Now() + absl::Seconds(2));
  (*http)->Stop();
  return 0;
}
