// echo_server: the ceiling for GetToken (issue 8). A bare gRPC server in the fastest model gRPC
// offers here, built the way the broker's main port is built, that does no work of its own:
//   - completion-queue async API, one CQ and one thread per core, 64 calls armed per CQ (as
//     server/src/grpc/token_service.cc);
//   - the same channel arguments (no SO_REUSEPORT, the keepalive policy) and, with
//     --tls_cert/--tls_key, the same server credentials (TlsServerCredentials over a
//     FileWatcherCertificateProvider, no client certificate requested);
//   - tokenbroker.v1.TokenBroker/GetToken with the real messages: every answer is a Token whose
//     access_token is --token_bytes long (1 KB: a Zendesk JWT) with the fields the broker fills,
//     so both servers put the same bytes on the wire and one load generator drives both.
//   - WatchToken: sends one token and holds the stream open until the client cancels, so the
//     "1000 subscribers attached" scenario can be run against the ceiling too.
// Metadata (authorization) is accepted and ignored.
//
// Prints "echo_server listening port=<port>" once serving; serves until SIGTERM/SIGINT.
//
//   echo_server --listen=127.0.0.1:0 --tls_cert=cert.pem --tls_key=key.pem

#include <grpcpp/grpcpp.h>
#include <grpcpp/security/server_credentials.h>
#include <grpcpp/security/tls_certificate_provider.h>
#include <grpcpp/security/tls_credentials_options.h>
#include <signal.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "server/src/common/absl_mutex_mode.h"
#include "tokenbroker/v1/token_broker.grpc.pb.h"

ABSL_FLAG(std::string, listen, "127.0.0.1:0", "host:port to serve on (port 0: any free port)");
ABSL_FLAG(int, threads, 0, "completion queues, one thread each; 0: one per core");
ABSL_FLAG(int, token_bytes, 1024, "length of the access_token in every answer");
ABSL_FLAG(std::string, tls_cert, "", "server certificate (PEM); empty: plaintext");
ABSL_FLAG(std::string, tls_key, "", "server private key (PEM)");

namespace {

namespace v1 = tokenbroker::v1;

using Service = v1::TokenBroker::WithAsyncMethod_GetToken<
    v1::TokenBroker::WithAsyncMethod_WatchToken<v1::TokenBroker::Service>>;

constexpr int kPendingCallsPerQueue = 64;  // as the broker's token_service.cc

// What every answer carries: the fields the broker's ToProto fills for a cached token.
struct Answer {
  std::string access_token;
  std::vector<std::string> scopes = {"read", "write"};
};

void Fill(const Answer& a, const std::string& connection_id, v1::Token* t) {
  const absl::Time now = absl::Now();
  t->set_connection_id(connection_id);
  t->set_access_token(a.access_token);
  t->set_token_type("Bearer");
  for (const std::string& s : a.scopes) {
    t->add_scopes(s);
  }
  const int64_t expires = absl::ToUnixSeconds(now) + 3600;
  t->mutable_expires_at()->set_seconds(expires);
  t->mutable_valid_until()->set_seconds(expires - 300);
  t->mutable_valid_for()->set_seconds(3300);
  t->set_generation(1);
}

// A CQ event's owner: the loop calls Proceed and deletes the object when it returns false.
class Tagged {
 public:
  virtual ~Tagged() = default;
  virtual bool Proceed(bool ok) = 0;
};

class GetTokenCall final : public Tagged {
 public:
  GetTokenCall(Service& service, grpc::ServerCompletionQueue* cq, const Answer& answer)
      : service_(service), cq_(cq), answer_(answer), responder_(&ctx_) {
    service_.RequestGetToken(&ctx_, &request_, &responder_, cq_, cq_, this);
  }

  bool Proceed(bool ok) override {
    if (finishing_ || !ok) {
      return false;
    }
    new GetTokenCall(service_, cq_, answer_);  // keep a request armed
    finishing_ = true;
    Fill(answer_, request_.connection_id(), response_.mutable_token());
    responder_.Finish(response_, grpc::Status::OK, this);
    return true;
  }

 private:
  Service& service_;
  grpc::ServerCompletionQueue* const cq_;
  const Answer& answer_;
  grpc::ServerContext ctx_;
  v1::GetTokenRequest request_;
  v1::GetTokenResponse response_;
  grpc::ServerAsyncResponseWriter<v1::GetTokenResponse> responder_;
  bool finishing_ = false;
};

// WatchToken: one write, then the stream is held open until the client cancels (or the server
// shuts down). The call deletes itself once both its write and its done notification are back;
// all its tags come back on its own CQ, i.e. on one thread.
class WatchCall {
 public:
  WatchCall(Service& service, grpc::ServerCompletionQueue* cq, const Answer& answer)
      : service_(service), cq_(cq), answer_(answer), writer_(&ctx_) {
    ctx_.AsyncNotifyWhenDone(&done_);
    service_.RequestWatchToken(&ctx_, &request_, &writer_, cq_, cq_, &requested_);
  }

 private:
  enum class Event { kRequested, kWritten, kDone };
  struct Tag final : Tagged {
    Tag(WatchCall* c, Event e) : call(c), event(e) {}
    bool Proceed(bool ok) override {
      call->On(event, ok);
      return true;  // a member of the call: never deleted by the loop
    }
    WatchCall* call;
    Event event;
  };

  void On(Event e, bool ok) {
    switch (e) {
      case Event::kRequested:
        if (!ok) {
          return;  // shutting down before a client came: left for the process exit
        }
        new WatchCall(service_, cq_, answer_);  // keep a request armed
        outstanding_ = 2;                       // the write and the done notification
        Fill(answer_, request_.connection_id(), response_.mutable_token());
        writer_.Write(response_, &written_);
        return;
      case Event::kWritten:
      case Event::kDone:
        if (--outstanding_ == 0) {
          delete this;
        }
        return;
    }
  }

  Service& service_;
  grpc::ServerCompletionQueue* const cq_;
  const Answer& answer_;
  grpc::ServerContext ctx_;
  v1::WatchTokenRequest request_;
  v1::WatchTokenResponse response_;
  grpc::ServerAsyncWriter<v1::WatchTokenResponse> writer_;
  Tag requested_{this, Event::kRequested};
  Tag written_{this, Event::kWritten};
  Tag done_{this, Event::kDone};
  int outstanding_ = 0;
};

std::shared_ptr<grpc::ServerCredentials> Credentials() {
  const std::string cert = absl::GetFlag(FLAGS_tls_cert);
  if (cert.empty()) {
    return grpc::InsecureServerCredentials();
  }
  // As server/src/grpc/grpc_server.cc's MainCredentials without a client CA.
  auto provider = std::make_shared<grpc::experimental::FileWatcherCertificateProvider>(
      absl::GetFlag(FLAGS_tls_key), cert, 60);
  grpc::experimental::TlsServerCredentialsOptions options(provider);
  options.watch_identity_key_cert_pairs();
  options.set_cert_request_type(GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE);
  return grpc::experimental::TlsServerCredentials(options);
}

}  // namespace

int main(int argc, char** argv) {
  tb::UseReleaseAbslMutexMode();
  absl::ParseCommandLine(argc, argv);
  sigset_t stop_signals;
  sigemptyset(&stop_signals);
  sigaddset(&stop_signals, SIGTERM);
  sigaddset(&stop_signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &stop_signals, nullptr);

  Answer answer;
  answer.access_token.assign(static_cast<size_t>(std::max(0, absl::GetFlag(FLAGS_token_bytes))),
                             'x');
  for (size_t i = 0; i < answer.access_token.size(); ++i) {
    answer.access_token[i] =
        "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"[i % 64];
  }
  int threads = absl::GetFlag(FLAGS_threads);
  if (threads <= 0) {
    threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  }

  Service service;
  grpc::EnableDefaultHealthCheckService(false);
  grpc::ServerBuilder builder;
  // The broker's channel arguments, at its defaults (server/src/grpc/grpc_server.cc).
  builder.AddChannelArgument(GRPC_ARG_ALLOW_REUSEPORT, 0);
  builder.AddChannelArgument(GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS, 10'000);
  builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_TIME_MS, 60'000);
  builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_TIMEOUT_MS, 20'000);
  builder.AddChannelArgument(GRPC_ARG_HTTP2_MAX_PINGS_WITHOUT_DATA, 0);
  int port = 0;
  builder.AddListeningPort(absl::GetFlag(FLAGS_listen), Credentials(), &port);
  builder.RegisterService(&service);
  std::vector<std::unique_ptr<grpc::ServerCompletionQueue>> cqs;
  for (int i = 0; i < threads; ++i) {
    cqs.push_back(builder.AddCompletionQueue());
  }
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (server == nullptr || port == 0) {
    std::fprintf(stderr, "echo_server: cannot listen on %s\n", absl::GetFlag(FLAGS_listen).c_str());
    return 1;
  }
  std::vector<std::thread> loops;
  for (auto& cq : cqs) {
    for (int i = 0; i < kPendingCallsPerQueue; ++i) {
      new GetTokenCall(service, cq.get(), answer);
    }
    new WatchCall(service, cq.get(), answer);
    loops.emplace_back([q = cq.get()] {
      void* tag = nullptr;
      bool ok = false;
      while (q->Next(&tag, &ok)) {
        auto* t = static_cast<Tagged*>(tag);
        if (!t->Proceed(ok)) {
          delete t;
        }
      }
    });
  }
  std::printf("echo_server listening port=%d threads=%d token_bytes=%zu\n", port, threads,
              answer.access_token.size());
  std::fflush(stdout);

  int sig = 0;
  sigwait(&stop_signals, &sig);
  server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(1));
  for (auto& cq : cqs) {
    cq->Shutdown();
  }
  for (std::thread& t : loops) {
    t.join();
  }
  return 0;
}
