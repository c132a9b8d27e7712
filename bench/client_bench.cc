// tokenbroker::Client's cached Get (issue 8: 200 ns or less). The client talks to an in-process
// gRPC server that answers GetToken with a 1 KB token valid for an hour; after the first Get of
// each connection every Get is answered from the client's cache, which is what is measured:
// a shard's reader lock, one hash lookup, a clock read and a shared_ptr copy.
//
//   build/<dir>/bench/client_bench --benchmark_min_time=0.5
//
// Watching is off (watch = false) so that no stream thread runs beside the measurement; a
// watched connection's Get takes the same path.

#include <grpcpp/grpcpp.h>

#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_format.h"
#include "benchmark/benchmark.h"
#include "tokenbroker/client.h"
#include "tokenbroker/v1/token_broker.grpc.pb.h"

namespace {

namespace v1 = tokenbroker::v1;

class FixedTokens final : public v1::TokenBroker::Service {
 public:
  grpc::Status GetToken(grpc::ServerContext*, const v1::GetTokenRequest* req,
                        v1::GetTokenResponse* resp) override {
    v1::Token* t = resp->mutable_token();
    t->set_connection_id(req->connection_id());
    t->set_access_token(std::string(1024, 'a'));
    t->set_token_type("Bearer");
    t->set_generation(1);
    t->mutable_valid_for()->set_seconds(3600);
    return grpc::Status::OK;
  }
};

// One server and one client for the whole binary (benchmarks run their threads against it).
struct Fixture {
  Fixture() {
    grpc::ServerBuilder b;
    int port = 0;
    b.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
    b.RegisterService(&service);
    server = b.BuildAndStart();
    tokenbroker::ClientOptions o;
    o.broker.target = absl::StrFormat("127.0.0.1:%d", port);
    o.watch = false;                       // the bench server has no WatchToken
    o.unwatched_recheck = absl::Hours(1);  // so a run of any length measures cached Gets
    client = *tokenbroker::Client::Create(o);
    for (int i = 0; i < 1000; ++i) {
      ids.push_back(absl::StrFormat("conn-%04d", i));
      if (!client->Get(ids.back()).ok()) {
        std::abort();
      }
    }
  }
  FixedTokens service;
  std::unique_ptr<grpc::Server> server;
  std::unique_ptr<tokenbroker::Client> client;
  std::vector<std::string> ids;
};

Fixture& F() {
  static Fixture* f = new Fixture();
  return *f;
}

// One hot connection, as a service that talks to one account.
void BM_CachedGet(benchmark::State& state) {
  tokenbroker::Client& c = *F().client;
  const std::string& id = F().ids[0];
  for (auto _ : state) {
    auto t = c.Get(id);
    benchmark::DoNotOptimize(t);
  }
  if (state.thread_index() == 0 && c.stats().rpcs != F().ids.size()) {
    state.SkipWithError("a Get went to the broker: not a cached Get");
  }
}
BENCHMARK(BM_CachedGet)->Threads(1)->Threads(2)->UseRealTime();

// 1000 connections visited in turn (more cache lines, more shards).
void BM_CachedGetManyConnections(benchmark::State& state) {
  tokenbroker::Client& c = *F().client;
  const std::vector<std::string>& ids = F().ids;
  size_t i = static_cast<size_t>(state.thread_index()) * 500;
  for (auto _ : state) {
    auto t = c.Get(ids[i]);
    benchmark::DoNotOptimize(t);
    i = i + 1 == ids.size() ? 0 : i + 1;
  }
}
BENCHMARK(BM_CachedGetManyConnections)->Threads(1)->Threads(2)->UseRealTime();

}  // namespace

BENCHMARK_MAIN();
