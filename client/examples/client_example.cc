// An internal service's use of tokenbroker::Client: get a token before each Zendesk call, and
// on a 401 invalidate that generation to get a fresh one. Here the "Zendesk call" is printed.
//
//   client_example --target=token-broker:8443 --ca_file=/tls/ca.crt --connection=acme
//   (the API key from $TB_API_KEY)

#include <cstdio>
#include <cstdlib>
#include <string>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/time/clock.h"
#include "tokenbroker/client.h"

ABSL_FLAG(std::string, target, "127.0.0.1:8443", "token-broker's gRPC address");
ABSL_FLAG(std::string, ca_file, "", "TLS: the broker's CA (PEM); empty: plaintext (loopback)");
ABSL_FLAG(std::string, connection, "acme", "the connection to use");
ABSL_FLAG(int, calls, 5, "how many outbound calls to make");

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  tokenbroker::ClientOptions options;
  options.broker.target = absl::GetFlag(FLAGS_target);
  options.broker.ca_file = absl::GetFlag(FLAGS_ca_file);
  if (const char* key = std::getenv("TB_API_KEY"); key != nullptr) {
    options.broker.api_key = key;
  }
  absl::StatusOr<std::unique_ptr<tokenbroker::Client>> client =
      tokenbroker::Client::Create(options);
  if (!client.ok()) {
    std::fprintf(stderr, "client_example: %s\n", std::string(client.status().message()).c_str());
    return 2;
  }
  const std::string id = absl::GetFlag(FLAGS_connection);
  for (int i = 0; i < absl::GetFlag(FLAGS_calls); ++i) {
    absl::StatusOr<std::shared_ptr<const tokenbroker::Token>> t = (*client)->Get(id);
    if (!t.ok()) {
      std::fprintf(stderr, "client_example: %s (%s)\n", std::string(t.status().message()).c_str(),
                   tb::client::ErrorReason(t.status()).c_str());
      return 1;
    }
    // Here a real service sends `Authorization: Bearer <(*t)->access_token>` to Zendesk. On a
    // 401 it would call (*client)->Invalidate(id, (*t)->generation) and retry once.
    std::printf("call %d: generation %llu\n", i + 1,
                static_cast<unsigned long long>((*t)->generation));
    absl::SleepFor(absl::Milliseconds(200));
  }
  const tokenbroker::Client::Stats s = (*client)->stats();
  std::printf("cache hits %llu, RPCs %llu\n", static_cast<unsigned long long>(s.cache_hits),
              static_cast<unsigned long long>(s.rpcs));
  return 0;
}
