// fake_provider: a local stand-in for Zendesk's OAuth server, for trying the broker's
// authorization-code flow in a browser (see README). Serves HTTPS with a freshly generated test
// CA, writes the CA certificate to --ca_file (give it to the broker as the provider's CA file, or
// import it into a browser), prints one line
//   fake_provider listening on https://127.0.0.1:<port> (CA: <path>)
// and serves until SIGTERM or SIGINT. With --stats_endpoint, GET /_fake/stats answers its
// counters (calls by kind, refresh tokens presented again) as JSON.

#include <signal.h>

#include <cstdio>
#include <fstream>
#include <sstream>
#include <string>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/str_cat.h"
#include "server/src/common/logging.h"
#include "tests/fake_provider/fake_provider.h"

ABSL_FLAG(int, port, 8444, "port to listen on (0: any free port)");
ABSL_FLAG(std::string, address, "127.0.0.1", "IP address to listen on");
ABSL_FLAG(std::string, ca_file, "./fake-provider-ca.pem",
          "where to write the test CA certificate (PEM)");
ABSL_FLAG(std::string, client_id, "token-broker-dev", "the registered OAuth client id");
ABSL_FLAG(std::string, client_secret_file, "",
          "file holding the client secret (trailing newline ignored); empty: \"dev-secret\"");
ABSL_FLAG(bool, auto_approve, false,
          "approve authorization requests at once instead of showing the Approve/Deny page");
ABSL_FLAG(bool, stats_endpoint, false,
          "serve GET /_fake/stats: call counters and refresh-token reuse attempts as JSON, for "
          "tests that drive this binary");
ABSL_FLAG(std::string, log_level, "info", "spdlog level (debug shows every request)");

namespace {

int Fail(const std::string& message) {
  std::fprintf(stderr, "fake_provider: %s\n", message.c_str());
  return 1;
}

}  // namespace

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  tb::LogOptions log;
  log.level = absl::GetFlag(FLAGS_log_level);
  if (absl::Status s = tb::InitLogging(log); !s.ok()) {
    return Fail(std::string(s.message()));
  }

  std::string secret = "dev-secret";
  if (const std::string path = absl::GetFlag(FLAGS_client_secret_file); !path.empty()) {
    std::ifstream in(path);
    if (!in) {
      return Fail(absl::StrCat("cannot read --client_secret_file ", path));
    }
    std::ostringstream contents;
    contents << in.rdbuf();
    secret = contents.str();
    while (!secret.empty() && (secret.back() == '\n' || secret.back() == '\r')) {
      secret.pop_back();
    }
    if (secret.empty()) {
      return Fail(absl::StrCat("--client_secret_file ", path, " is empty"));
    }
  }

  // Blocked before any thread starts, so every thread inherits the mask and sigwait() below is
  // the only receiver.
  sigset_t stop_signals;
  sigemptyset(&stop_signals);
  sigaddset(&stop_signals, SIGTERM);
  sigaddset(&stop_signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &stop_signals, nullptr);

  tb::testing::FakeProviderOptions options;
  options.address = absl::GetFlag(FLAGS_address);
  options.port = absl::GetFlag(FLAGS_port);
  options.ca_file_path = absl::GetFlag(FLAGS_ca_file);
  options.auto_approve = absl::GetFlag(FLAGS_auto_approve);
  options.stats_endpoint = absl::GetFlag(FLAGS_stats_endpoint);
  if (options.ca_file_path.empty()) {
    return Fail("--ca_file must not be empty");
  }
  auto provider = tb::testing::FakeProvider::Start(options);
  if (!provider.ok()) {
    return Fail(provider.status().ToString());
  }
  (*provider)->AddClient(absl::GetFlag(FLAGS_client_id), std::move(secret));
  std::printf("fake_provider listening on %s (CA: %s)\n", (*provider)->base_url().c_str(),
              (*provider)->ca_file().c_str());
  std::fflush(stdout);

  int sig = 0;
  sigwait(&stop_signals, &sig);
  (*provider)->Stop();
  return 0;
}
