#include "tokenbroker/client.h"

#include <grpcpp/client_context.h>

#include <utility>

#include "absl/hash/hash.h"
#include "absl/time/clock.h"

namespace tokenbroker {

// One connection's WatchToken stream on its own thread, reopened with backoff until the client
// is destroyed. A thread per watched connection: services watch the handful of accounts they
// talk to, and a blocking stream loop is far simpler to get right than a callback reactor.
class Client::Watch {
 public:
  Watch(Client& client, std::string id) : client_(client), id_(std::move(id)) {
    thread_ = std::thread([this] { Run(); });
  }
  ~Watch() {
    {
      tb::MutexLock lock(&mu_);
      stop_ = true;
      if (ctx_ != nullptr) {
        ctx_->TryCancel();
      }
    }
    cv_.SignalAll();
    thread_.join();
  }

 private:
  void Run() {
    absl::Duration delay = absl::Milliseconds(200);
    for (;;) {
      grpc::ClientContext ctx;
      {
        tb::MutexLock lock(&mu_);
        if (stop_) {
          return;
        }
        ctx_ = &ctx;
      }
      bool got_any = false;
      const absl::Status s = client_.rpc_->Watch(
          id_,
          [&](const v1::Token& t) {
            got_any = true;
            client_.watch_updates_.fetch_add(1, std::memory_order_relaxed);
            client_.Put(client_.FromProto(t));
            return true;
          },
          ctx);
      tb::MutexLock lock(&mu_);
      ctx_ = nullptr;
      if (stop_) {
        return;
      }
      // A stream that ended with the connection's own error (revoked, deleted...) is not
      // reopened in a hurry; one that worked for a while starts its backoff afresh.
      delay = got_any ? absl::Milliseconds(200)
                      : std::min(delay * 2, client_.options_.max_reconnect_delay);
      if (s.code() == absl::StatusCode::kFailedPrecondition ||
          s.code() == absl::StatusCode::kNotFound ||
          s.code() == absl::StatusCode::kPermissionDenied) {
        delay = client_.options_.max_reconnect_delay;
      }
      cv_.WaitFor(&mu_, absl::ToChronoMilliseconds(delay));
    }
  }

  Client& client_;
  const std::string id_;
  tb::Mutex mu_;
  tb::CondVar cv_;
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  grpc::ClientContext* ctx_ ABSL_GUARDED_BY(mu_) = nullptr;  // the open stream's
  std::thread thread_;
};

absl::StatusOr<std::unique_ptr<Client>> Client::Create(ClientOptions options) {
  absl::StatusOr<std::unique_ptr<tb::client::TokenClient>> rpc =
      tb::client::TokenClient::Create(options.broker);
  if (!rpc.ok()) {
    return rpc.status();
  }
  return std::unique_ptr<Client>(new Client(std::move(options), *std::move(rpc)));
}

Client::Client(ClientOptions options, std::unique_ptr<tb::client::TokenClient> rpc)
    : options_(std::move(options)), rpc_(std::move(rpc)) {}

Client::~Client() {
  std::vector<std::unique_ptr<Watch>> watches;
  {
    tb::MutexLock lock(&watch_mu_);
    stopping_ = true;
    watches = std::move(watches_);
  }
  watches.clear();  // joins their threads, outside the lock they do not take
}

Client::Shard& Client::ShardFor(absl::string_view id) {
  return shards_[absl::HashOf(id) % shards_.size()];
}

std::shared_ptr<const Token> Client::FromProto(const v1::Token& t) const {
  auto out = std::make_shared<Token>();
  out->connection_id = t.connection_id();
  out->access_token = t.access_token();
  out->token_type = t.token_type();
  out->generation = t.generation();
  if (t.has_valid_for()) {
    // valid_for was measured on the broker's clock when it answered; counting it from now on
    // ours only ever shortens it (the answer took time to arrive).
    const absl::Duration valid_for =
        absl::Seconds(t.valid_for().seconds()) + absl::Nanoseconds(t.valid_for().nanos());
    out->use_until = absl::Now() + valid_for - options_.margin;
  }
  return out;
}

void Client::Put(std::shared_ptr<const Token> t) {
  Shard& shard = ShardFor(t->connection_id);
  tb::WriterLock lock(&shard.mu);
  auto [it, inserted] = shard.tokens.try_emplace(t->connection_id, t);
  if (!inserted && it->second->generation <= t->generation) {
    it->second = std::move(t);
  }
}

absl::StatusOr<std::shared_ptr<const Token>> Client::Get(absl::string_view connection_id) {
  {
    Shard& shard = ShardFor(connection_id);
    tb::ReaderLock lock(&shard.mu);
    if (const auto it = shard.tokens.find(connection_id);
        it != shard.tokens.end() && absl::Now() < it->second->use_until) {
      hits_.fetch_add(1, std::memory_order_relaxed);
      return it->second;
    }
  }
  rpcs_.fetch_add(1, std::memory_order_relaxed);
  // Ask for a token that lives past the margin (the broker waits for its scheduled refresh if
  // the current one is nearly over); connections whose tokens are never promised that long get
  // whatever is current.
  absl::StatusOr<v1::Token> t =
      rpc_->GetToken(connection_id, options_.margin, options_.rpc_timeout);
  if (t.status().code() == absl::StatusCode::kOutOfRange) {
    t = rpc_->GetToken(connection_id, absl::ZeroDuration(), options_.rpc_timeout);
  }
  if (!t.ok()) {
    return t.status();
  }
  std::shared_ptr<const Token> token = FromProto(*t);
  Put(token);
  if (options_.watch) {
    EnsureWatch(connection_id);
  }
  return token;
}

absl::StatusOr<std::shared_ptr<const Token>> Client::Invalidate(absl::string_view connection_id,
                                                                uint64_t generation) {
  {
    Shard& shard = ShardFor(connection_id);
    tb::WriterLock lock(&shard.mu);
    if (const auto it = shard.tokens.find(connection_id);
        it != shard.tokens.end() && it->second->generation <= generation) {
      shard.tokens.erase(it);
    }
  }
  rpcs_.fetch_add(1, std::memory_order_relaxed);
  absl::StatusOr<v1::Token> t = rpc_->Refresh(connection_id, generation, options_.rpc_timeout);
  if (!t.ok()) {
    return t.status();
  }
  std::shared_ptr<const Token> token = FromProto(*t);
  Put(token);
  return token;
}

void Client::EnsureWatch(absl::string_view connection_id) {
  tb::MutexLock lock(&watch_mu_);
  if (stopping_ || !watched_.insert(std::string(connection_id)).second) {
    return;
  }
  watches_.push_back(std::make_unique<Watch>(*this, std::string(connection_id)));
}

Client::Stats Client::stats() const {
  return {hits_.load(std::memory_order_relaxed), rpcs_.load(std::memory_order_relaxed),
          watch_updates_.load(std::memory_order_relaxed)};
}

}  // namespace tokenbroker
