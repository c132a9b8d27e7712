#include "tokenbroker/client.h"

#include <grpcpp/client_context.h>

#include <algorithm>
#include <utility>

#include "absl/cleanup/cleanup.h"
#include "absl/hash/hash.h"
#include "absl/random/distributions.h"
#include "absl/random/random.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"

namespace tokenbroker {
namespace {

constexpr absl::Duration kFirstReconnectDelay = absl::Milliseconds(200);
// A stream that stayed up this long was healthy: its backoff starts afresh. A shorter one
// (accepted, then cut at once, e.g. by a proxy) keeps growing it, so it cannot spin.
constexpr absl::Duration kHealthyStream = absl::Seconds(10);

const tb::SystemClock kSystemClock;

// The broker ended the stream because the connection stopped serving, or this caller may not
// see it: the cached token must go, and reopening the stream would only be refused again.
bool EndsTheConnection(absl::StatusCode code) {
  return code == absl::StatusCode::kNotFound || code == absl::StatusCode::kFailedPrecondition ||
         code == absl::StatusCode::kPermissionDenied || code == absl::StatusCode::kDataLoss;
}

}  // namespace

// One connection's WatchToken stream on its own thread, reopened with backoff until the client
// is destroyed or the broker says the connection stopped serving. A thread per watched
// connection (at most max_watches): services watch the handful of accounts they talk to, and a
// blocking stream loop is far simpler to get right than a callback reactor.
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

  // Whether the stream is open and has delivered the connection's current token.
  bool live() const { return live_.load(std::memory_order_acquire); }
  // Whether the stream ended for good (the connection stopped serving).
  bool finished() const { return finished_.load(std::memory_order_acquire); }

 private:
  void Run() {
    const absl::Duration first =
        std::min(kFirstReconnectDelay, client_.options_.max_reconnect_delay);
    absl::Duration delay = first;
    absl::BitGen random;
    for (;;) {
      grpc::ClientContext ctx;
      {
        tb::MutexLock lock(&mu_);
        if (stop_) {
          return;
        }
        ctx_ = &ctx;
      }
      const absl::Time opened = absl::Now();
      const absl::Status s = client_.rpc_->Watch(
          id_,
          [&](const v1::Token& t) {
            client_.Put(client_.FromProto(t, /*watched=*/true, /*short_lived=*/false),
                        /*asked_after=*/0);
            live_.store(true, std::memory_order_release);
            client_.watch_updates_.fetch_add(1, std::memory_order_release);
            return true;
          },
          ctx);
      live_.store(false, std::memory_order_release);
      tb::MutexLock lock(&mu_);
      ctx_ = nullptr;
      if (stop_) {
        return;
      }
      if (EndsTheConnection(s.code())) {
        client_.Drop(id_, s.code());
        finished_.store(true, std::memory_order_release);
        return;
      }
      // Nobody pushes to this connection's token now: it is used at most unwatched_recheck
      // more before Get asks the broker again.
      client_.CapUnwatched(id_);
      if (absl::Now() - opened >= kHealthyStream) {
        delay = first;
      } else {
        delay = std::min(delay * 2, client_.options_.max_reconnect_delay);
      }
      // Refused for load or credentials: waiting less would only be refused again.
      if (s.code() == absl::StatusCode::kResourceExhausted ||
          s.code() == absl::StatusCode::kUnauthenticated) {
        delay = client_.options_.max_reconnect_delay;
      }
      // Jitter, so that the instances of a service do not all come back at the same moment.
      const absl::Duration wait = delay * absl::Uniform(random, 0.5, 1.0);
      cv_.WaitFor(&mu_, absl::ToChronoMilliseconds(wait));
    }
  }

  Client& client_;
  const std::string id_;
  std::atomic<bool> live_{false};
  std::atomic<bool> finished_{false};
  tb::Mutex mu_;
  tb::CondVar cv_;
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  grpc::ClientContext* ctx_ ABSL_GUARDED_BY(mu_) = nullptr;  // the open stream's
  std::thread thread_;
};

absl::StatusOr<std::unique_ptr<Client>> Client::Create(ClientOptions options) {
  if (options.broker.target.empty()) {
    return absl::InvalidArgumentError("broker.target is empty: set the broker's host:port");
  }
  if (options.margin < absl::ZeroDuration() || options.margin > absl::Hours(1)) {
    return absl::InvalidArgumentError(
        "margin must be between 0 and 1h (the broker's largest min_ttl)");
  }
  if (options.rpc_timeout == absl::InfiniteDuration()) {
    return absl::InvalidArgumentError("rpc_timeout must be finite: every RPC has a deadline");
  }
  if (options.rpc_timeout <= absl::ZeroDuration() ||
      options.max_reconnect_delay <= absl::ZeroDuration() ||
      options.unwatched_recheck <= absl::ZeroDuration() ||
      options.refused_recheck <= absl::ZeroDuration()) {
    return absl::InvalidArgumentError(
        "rpc_timeout, max_reconnect_delay, unwatched_recheck and refused_recheck must be "
        "positive");
  }
  absl::StatusOr<std::unique_ptr<tb::client::TokenClient>> rpc =
      tb::client::TokenClient::Create(options.broker);
  if (!rpc.ok()) {
    return rpc.status();
  }
  return std::unique_ptr<Client>(new Client(std::move(options), *std::move(rpc)));
}

Client::Client(ClientOptions options, std::unique_ptr<tb::client::TokenClient> rpc)
    : options_(std::move(options)),
      clock_(options_.clock != nullptr ? *options_.clock : kSystemClock),
      rpc_(std::move(rpc)) {}

Client::~Client() {
  absl::flat_hash_map<std::string, std::unique_ptr<Watch>> watches;
  {
    tb::MutexLock lock(&watch_mu_);
    stopping_ = true;
    watches = std::move(watches_);
  }
  watches.clear();  // joins their threads, outside the lock they do not take
}

Client::Shard& Client::ShardFor(absl::string_view id) const {
  return shards_[absl::HashOf(id) % shards_.size()];
}

Client::TokenPtr Client::FromProto(const v1::Token& t, bool watched, bool short_lived) const {
  auto out = std::make_shared<Token>();
  out->connection_id = t.connection_id();
  out->access_token = t.access_token();
  out->token_type = t.token_type();
  out->generation = t.generation();
  const absl::Time now = clock_.Now();
  if (t.has_valid_for()) {
    // valid_for was measured on the broker's clock when it answered; counting it from now on
    // ours only ever shortens it (the answer took time to arrive).
    const absl::Duration valid_for =
        absl::Seconds(t.valid_for().seconds()) + absl::Nanoseconds(t.valid_for().nanos());
    out->use_until = now + (short_lived ? valid_for / 2 : valid_for - options_.margin);
  }
  if (!watched) {
    out->use_until = std::min(out->use_until, now + options_.unwatched_recheck);
  }
  return out;
}

Client::TokenPtr Client::Cached(absl::string_view id) const {
  const Shard& shard = ShardFor(id);
  tb::ReaderLock lock(&shard.mu);
  if (const auto it = shard.entries.find(id); it != shard.entries.end() &&
                                              it->second.token != nullptr &&
                                              clock_.Now() < it->second.token->use_until) {
    return it->second.token;
  }
  return nullptr;
}

Client::TokenPtr Client::Put(const TokenPtr& t, uint64_t asked_after) {
  Shard& shard = ShardFor(t->connection_id);
  tb::WriterLock lock(&shard.mu);
  Entry& e = shard.entries[t->connection_id];
  const absl::Time now = clock_.Now();
  TokenPtr token = t;
  if (t->generation <= e.refused_through) {
    if (t->generation < e.refused_through && e.refused_seq <= asked_after) {
      // The broker's current generation, asked for after the refusal, is older than the
      // refused one: the connection was deleted and created again, and counts from 1.
      e.ForgetRefusals();
    } else if (const absl::Time hold = now + options_.refused_recheck; t->use_until > hold) {
      // The broker still serves the refused generation (it could not refresh yet), or this
      // answer left before the refusal: use it briefly, then ask again.
      auto held = std::make_shared<Token>(*t);
      held->use_until = hold;
      token = std::move(held);
    }
  }
  // Of two copies of one generation (one from GetToken, one from the watch), the one usable
  // longer wins: an unwatched copy must not cut short the watched one.
  if (e.token == nullptr || now >= e.token->use_until || e.token->generation < token->generation ||
      (e.token->generation == token->generation && token->use_until >= e.token->use_until)) {
    e.token = token;
  }
  return token;
}

void Client::Drop(absl::string_view id, absl::StatusCode why) {
  Shard& shard = ShardFor(id);
  tb::WriterLock lock(&shard.mu);
  if (const auto it = shard.entries.find(id); it != shard.entries.end()) {
    if (why == absl::StatusCode::kNotFound) {
      shard.entries.erase(it);  // deleted: a connection created again counts from 1
    } else {
      it->second.token = nullptr;  // it may serve again, and its refused generations stay so
    }
  }
}

void Client::CapUnwatched(absl::string_view id) {
  Shard& shard = ShardFor(id);
  tb::WriterLock lock(&shard.mu);
  const auto it = shard.entries.find(id);
  if (it == shard.entries.end() || it->second.token == nullptr) {
    return;
  }
  const absl::Time cap = clock_.Now() + options_.unwatched_recheck;
  if (it->second.token->use_until > cap) {
    auto capped = std::make_shared<Token>(*it->second.token);
    capped->use_until = cap;
    it->second.token = std::move(capped);
  }
}

absl::StatusOr<Client::TokenPtr> Client::Shared(
    const std::string& key, const std::function<absl::StatusOr<TokenPtr>()>& rpc) {
  std::shared_ptr<Flight> flight;
  {
    tb::MutexLock lock(&flights_mu_);
    auto [it, leader] = flights_.try_emplace(key);
    if (!leader) {
      flight = it->second;
      shared_.fetch_add(1, std::memory_order_relaxed);
      while (!flight->done) {
        flights_cv_.Wait(&flights_mu_);
      }
      return flight->result;
    }
    it->second = flight = std::make_shared<Flight>();
  }
  // However rpc() ends (it may throw: std::thread in EnsureWatch, bad_alloc), the flight is
  // answered and forgotten, or its followers and every later call of the key would hang.
  absl::StatusOr<TokenPtr> result = absl::InternalError("the call ended by an exception");
  {
    absl::Cleanup finish = [&] {
      {
        tb::MutexLock lock(&flights_mu_);
        flight->result = result;
        flight->done = true;
        flights_.erase(key);
      }
      flights_cv_.SignalAll();
    };
    result = rpc();
  }  // answered here, before `result` can be moved into the return value
  return result;
}

absl::StatusOr<std::shared_ptr<const Token>> Client::Get(absl::string_view connection_id) {
  if (TokenPtr t = Cached(connection_id); t != nullptr) {
    hits_.fetch_add(1, std::memory_order_relaxed);
    return t;
  }
  return Shared(absl::StrCat("get/", connection_id), [&]() -> absl::StatusOr<TokenPtr> {
    // Another caller's RPC may have filled the cache between the miss and this flight.
    if (TokenPtr t = Cached(connection_id); t != nullptr) {
      return t;
    }
    return Fetch(connection_id);
  });
}

absl::StatusOr<Client::TokenPtr> Client::Fetch(absl::string_view connection_id) {
  rpcs_.fetch_add(1, std::memory_order_relaxed);
  // Ask for a token that lives past the margin. If the current one does not, the broker waits
  // for its scheduled refresh, so that call gets `margin` more time.
  bool short_lived = false;
  const uint64_t asked_after = refusals_.load(std::memory_order_acquire);
  absl::StatusOr<v1::Token> t =
      rpc_->GetToken(connection_id, options_.margin, options_.rpc_timeout + options_.margin);
  if (t.status().code() == absl::StatusCode::kOutOfRange) {
    // No token of this connection will live that long (it cannot be refreshed): take the
    // current one, and ask again when half of what is left of it has gone.
    rpcs_.fetch_add(1, std::memory_order_relaxed);
    short_lived = true;
    t = rpc_->GetToken(connection_id, absl::ZeroDuration(), options_.rpc_timeout);
  }
  if (!t.ok()) {
    if (EndsTheConnection(t.status().code())) {
      Drop(connection_id, t.status().code());
    }
    return t.status();
  }
  return Store(connection_id, *t, short_lived, asked_after);
}

absl::StatusOr<std::shared_ptr<const Token>> Client::Invalidate(absl::string_view connection_id,
                                                                uint64_t generation) {
  if (generation == 0) {
    return absl::InvalidArgumentError("generation 0 is no token's: pass the refused token's");
  }
  {
    Shard& shard = ShardFor(connection_id);
    tb::WriterLock lock(&shard.mu);
    Entry& e = shard.entries[connection_id];
    if (e.token != nullptr && e.token->generation > std::max(generation, e.refused_through) &&
        clock_.Now() < e.token->use_until) {
      hits_.fetch_add(1, std::memory_order_relaxed);
      return e.token;  // a newer generation, not refused, has arrived already
    }
    if (generation <= e.refused_through && !e.refresh_failed.ok() &&
        clock_.Now() < e.failed_until) {
      // Refresh past a refused generation failed moments ago: the broker would say the same
      // (RESOURCE_EXHAUSTED, NOT_REFRESHABLE...). A caller's every 401 is not another RPC.
      return e.refresh_failed;
    }
    if (generation > e.refused_through) {
      e.refresh_failed = absl::OkStatus();
    }
    if (generation >= e.refused_through) {
      e.refused_through = generation;
      e.refused_seq = refusals_.fetch_add(1, std::memory_order_acq_rel) + 1;
    }
    if (e.token != nullptr && e.token->generation <= generation) {
      e.token = nullptr;
    }
  }
  return Shared(absl::StrCat("refresh/", generation, "/", connection_id),
                [&]() -> absl::StatusOr<TokenPtr> {
                  rpcs_.fetch_add(1, std::memory_order_relaxed);
                  const uint64_t asked_after = refusals_.load(std::memory_order_acquire);
                  absl::StatusOr<v1::Token> t =
                      rpc_->Refresh(connection_id, generation, options_.rpc_timeout);
                  if (!t.ok()) {
                    // Only a deletion drops anything here: FAILED_PRECONDITION from Refresh
                    // (not refreshable, provider misconfigured) does not end serving.
                    if (t.status().code() == absl::StatusCode::kNotFound) {
                      Drop(connection_id, absl::StatusCode::kNotFound);
                    } else {
                      RefreshFailed(connection_id, generation, t.status());
                    }
                    return t.status();
                  }
                  // Older than the refused one, asked after the refusal: Put takes it for
                  // the token of a connection deleted and created again.
                  return Store(connection_id, *t, /*short_lived=*/false, asked_after);
                });
}

Client::TokenPtr Client::Store(absl::string_view connection_id, const v1::Token& t,
                               bool short_lived, uint64_t asked_after) {
  const bool watched = options_.watch && EnsureWatch(connection_id);
  TokenPtr token = Put(FromProto(t, watched, short_lived), asked_after);
  // The stream may have ended between EnsureWatch and Put (revoked: it dropped the entry
  // before our Put). Then the token just cached must not be used as if watched.
  if (watched && !EnsureWatch(connection_id)) {
    CapUnwatched(connection_id);
  }
  return token;
}

void Client::RefreshFailed(absl::string_view id, uint64_t generation, const absl::Status& why) {
  Shard& shard = ShardFor(id);
  tb::WriterLock lock(&shard.mu);
  if (const auto it = shard.entries.find(id);
      it != shard.entries.end() && it->second.refused_through == generation) {
    it->second.refresh_failed = why;
    it->second.failed_until = clock_.Now() + options_.refused_recheck;
  }
}

bool Client::EnsureWatch(absl::string_view connection_id) {
  tb::MutexLock lock(&watch_mu_);
  if (stopping_) {
    return false;
  }
  if (const auto it = watches_.find(connection_id); it != watches_.end()) {
    if (!it->second->finished()) {
      return it->second->live();
    }
    watches_.erase(it);  // the connection serves again (reconnected): watch it afresh
  }
  if (watches_.size() >= options_.max_watches) {
    // Finished streams do not count against the limit.
    absl::erase_if(watches_, [](const auto& w) { return w.second->finished(); });
    if (watches_.size() >= options_.max_watches) {
      return false;
    }
  }
  watches_.emplace(connection_id, std::make_unique<Watch>(*this, std::string(connection_id)));
  return false;  // not live before its first message, which replaces this token
}

Client::Stats Client::stats() const {
  Stats s;
  s.cache_hits = hits_.load(std::memory_order_relaxed);
  s.rpcs = rpcs_.load(std::memory_order_relaxed);
  s.shared = shared_.load(std::memory_order_relaxed);
  s.watch_updates = watch_updates_.load(std::memory_order_relaxed);
  tb::MutexLock lock(&watch_mu_);
  s.watches = static_cast<uint64_t>(std::count_if(
      watches_.begin(), watches_.end(), [](const auto& w) { return !w.second->finished(); }));
  return s;
}

}  // namespace tokenbroker
