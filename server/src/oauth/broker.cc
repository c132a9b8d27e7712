#include "server/src/oauth/broker.h"

#include <algorithm>
#include <functional>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "server/src/common/status_macros.h"
#include "server/src/core/errors.h"

namespace tb::oauth {

namespace {
constexpr size_t kMaxPageSize = 1000;
}  // namespace

Broker::Broker(const Clock& clock, core::TokenStore& store, cache::ConnectionCache& cache,
               BrokerOptions options)
    : clock_(clock), store_(store), cache_(cache), options_(std::move(options)) {
  if (options_.metrics != nullptr) {
    auto& latency = options_.metrics->AddHistogramFamily(
        "tb_store_operation_duration_seconds", "Store calls made by the broker, by operation.",
        {"op"}, metrics::ExponentialBuckets(100e-6, 2, 16));
    auto& errors = options_.metrics->AddCounterFamily(
        "tb_store_errors_total", "Store calls that failed (unreachable, timed out), by operation.",
        {"op"});
    for (const char* op : {"update", "create", "delete", "load", "probe"}) {
      store_ops_[op] = {&latency.WithLabels({op}), &errors.WithLabels({op})};
    }
  }
}

void Broker::Schedule(core::Grant& grant) const {
  const absl::Duration jitter = options_.jitter ? options_.jitter() : absl::ZeroDuration();
  grant.refresh_at = core::RefreshAt(grant, options_.refresh, jitter);
}

void Broker::Changed(const std::shared_ptr<const core::Connection>& c,
                     const core::ConnectionId& id) const {
  if (options_.on_change) {
    options_.on_change(c, id);
  }
}

std::vector<std::shared_ptr<const core::Connection>> Broker::Snapshot() const {
  return cache_.All();
}

absl::StatusOr<core::RotationProgress> Broker::RotateKeys(size_t batch) {
  if (batch == 0 || batch > 10'000) {
    return absl::InvalidArgumentError("batch_size must be 1 to 10000");
  }
  return store_.ReencryptBatch(batch);
}

absl::Status Broker::Load() {
  // One at a time: a million connections are never held twice (a vector and the cache).
  return store_.LoadEach([this](core::Connection&& c) {
    if (!c.data_loss.empty()) {
      data_loss_.fetch_add(1, std::memory_order_relaxed);
      if (options_.events) {
        options_.events("data_loss", c.id, absl::DataLossError(c.data_loss.get()));
      }
    }
    auto entry = std::make_shared<const core::Connection>(std::move(c));
    cache_.Publish(entry);
    Changed(entry, entry->id);
  });
}

absl::Status Broker::Reload(const core::ConnectionId& id) {
  const absl::Time started = absl::Now();
  absl::StatusOr<core::Connection> loaded = store_.Load(id);
  RecordStoreOutcome(
      loaded.status().code() == absl::StatusCode::kNotFound ? absl::OkStatus() : loaded.status(),
      "load", absl::Now() - started);
  if (!loaded.ok() && loaded.status().code() != absl::StatusCode::kNotFound) {
    return loaded.status();
  }
  // A few attempts: a local writer may publish between our read of the cache and our publish.
  for (int i = 0; i < 5; ++i) {
    std::shared_ptr<const core::Connection> current = cache_.Get(id);
    if (!loaded.ok()) {  // deleted elsewhere
      if (current == nullptr) {
        return absl::OkStatus();
      }
      if (cache_.EraseIf(id, current)) {
        Changed(nullptr, id);
        return absl::OkStatus();
      }
      continue;
    }
    if (current != nullptr && current->revision >= loaded->revision) {
      return absl::OkStatus();  // what we serve is as new
    }
    auto next = std::make_shared<const core::Connection>(*loaded);
    if (cache_.PublishIf(current, next)) {
      Changed(next, id);
      return absl::OkStatus();
    }
  }
  return absl::AbortedError("connection kept changing while it was reloaded");
}

absl::StatusOr<std::optional<core::Lease>> Broker::AcquireRefreshLease(const core::ConnectionId& id,
                                                                       absl::Duration ttl) {
  return store_.AcquireLease(id, ttl);
}

void Broker::ReleaseRefreshLease(const core::Lease& lease) { (void)store_.ReleaseLease(lease); }

TokenLookup Broker::Lookup(const core::ConnectionId& id, absl::Duration min_ttl,
                           uint64_t min_generation) const {
  TokenLookup out;
  if (min_ttl < absl::ZeroDuration() || min_ttl > options_.max_min_ttl) {
    out.error = absl::InvalidArgumentError(
        absl::StrCat("min_ttl must be between 0 and ", absl::FormatDuration(options_.max_min_ttl)));
    return out;
  }
  const absl::Time now = clock_.Now();
  std::shared_ptr<const core::Connection> c = cache_.Use(id, now);
  if (c == nullptr) {
    out.error = absl::NotFoundError("unknown connection");
    return out;
  }
  if (absl::Status s = core::StatusErrorFor(*c); !s.ok()) {
    out.error = std::move(s);
    return out;
  }
  if (!c->grant) {
    out.error = absl::InternalError("active connection without a grant");
    return out;
  }
  const core::Grant& g = *c->grant;
  if (g.generation < min_generation) {
    out.kind = TokenLookup::Kind::kAwaitGeneration;
    return out;
  }
  const absl::Time valid_until = g.ValidUntil();
  const absl::Duration valid_for =
      valid_until == absl::InfiniteFuture() ? absl::InfiniteDuration() : valid_until - now;
  if (valid_for > absl::ZeroDuration() && valid_for >= min_ttl) {
    out.kind = TokenLookup::Kind::kServe;
    out.view = TokenView{std::move(c), valid_until, valid_for};
    return out;
  }
  // Not enough life left. Say now if waiting cannot help.
  const bool refreshable = g.refresh_token && !g.refresh_token->empty();
  if (!refreshable) {
    out.error = valid_for <= absl::ZeroDuration()
                    ? core::ReasonError(absl::StatusCode::kFailedPrecondition,
                                        core::Reason::kNotRefreshable,
                                        "the token expired and the grant has no refresh token; "
                                        "reconnect the account")
                    : absl::OutOfRangeError(
                          absl::StrCat("the token lives ", absl::FormatDuration(valid_for),
                                       " more and cannot be refreshed; ask for a smaller min_ttl"));
    return out;
  }
  // A fresh token of this connection is promised for about as long as the current one was.
  const absl::Duration promised = valid_until - g.issued_at;
  if (min_ttl > promised) {
    out.error = absl::OutOfRangeError(
        absl::StrCat("tokens of this connection are promised for at most ",
                     absl::FormatDuration(promised), "; ask for a smaller min_ttl"));
    return out;
  }
  out.kind = TokenLookup::Kind::kAwaitRefresh;
  out.refresh_due = !g.refresh_at || now >= *g.refresh_at;
  return out;
}

absl::StatusOr<TokenView> Broker::GetToken(const core::ConnectionId& id,
                                           absl::Duration min_ttl) const {
  TokenLookup l = Lookup(id, min_ttl, 0);
  switch (l.kind) {
    case TokenLookup::Kind::kServe:
      return std::move(l.view);
    case TokenLookup::Kind::kError:
      return std::move(l.error);
    case TokenLookup::Kind::kAwaitGeneration:
    case TokenLookup::Kind::kAwaitRefresh:
      break;
  }
  return absl::UnavailableError("no token with the requested lifetime left");
}

absl::StatusOr<std::shared_ptr<const core::Connection>> Broker::GetConnection(
    const core::ConnectionId& id) const {
  std::shared_ptr<const core::Connection> c = cache_.Get(id);
  if (c == nullptr) {
    return absl::NotFoundError("unknown connection");
  }
  return c;
}

absl::StatusOr<cache::ConnectionCache::Page> Broker::ListConnections(
    const cache::ConnectionCache::Filter& filter, size_t page_size, absl::string_view after) const {
  if (page_size == 0 || page_size > kMaxPageSize) {
    return absl::InvalidArgumentError(absl::StrCat("page_size must be 1 to ", kMaxPageSize));
  }
  return cache_.List(filter, page_size, after);
}

absl::StatusOr<std::shared_ptr<const core::Connection>> Broker::CreatePending(
    const core::ConnectionId& id, const std::string& provider,
    std::map<std::string, std::string> params) {
  TB_RETURN_IF_ERROR(core::ValidateConnectionId(id));
  if (provider.empty()) {
    return absl::InvalidArgumentError("provider is required");
  }
  if (cache_.Get(id) != nullptr) {
    return absl::AlreadyExistsError("connection already exists");
  }
  auto c = std::make_shared<core::Connection>();
  c->id = id;
  c->provider = provider;
  c->params = std::move(params);
  c->status = core::ConnectionStatus::kPending;
  c->reason = core::Reason::kNotConnected;
  c->created_at = c->updated_at = clock_.Now();
  const absl::Time started = absl::Now();
  const absl::Status created = store_.Create(*c);
  RecordStoreOutcome(created, "create", absl::Now() - started);
  TB_RETURN_IF_ERROR(created);
  if (!cache_.PublishIf(nullptr, c)) {
    return absl::AbortedError("connection changed concurrently; retry");
  }
  Changed(c, id);
  return std::shared_ptr<const core::Connection>(std::move(c));
}

namespace {
bool StoreDown(const absl::Status& s) {
  return s.code() == absl::StatusCode::kUnavailable ||
         s.code() == absl::StatusCode::kDeadlineExceeded;
}
}  // namespace

void Broker::RecordStoreOutcome(const absl::Status& s, absl::string_view op,
                                absl::Duration elapsed) {
  if (const auto it = store_ops_.find(op); it != store_ops_.end()) {
    it->second.latency->Observe(elapsed);
    if (StoreDown(s)) {
      it->second.errors->Increment();
    }
  }
  if (StoreDown(s)) {
    store_healthy_.store(false, std::memory_order_relaxed);
    store_errors_.fetch_add(1, std::memory_order_relaxed);
  } else {
    store_healthy_.store(true, std::memory_order_relaxed);
  }
}

absl::Status Broker::Replace(const std::shared_ptr<const core::Connection>& current,
                             std::shared_ptr<core::Connection> next, const core::Lease* fence,
                             bool keep_if_store_down) {
  const core::ConnectionId id = next->id;
  next->revision = current->revision + 1;
  // A connection whose last write only reached memory is still at an older revision in the
  // store: write over that one (this write carries everything the unwritten one had).
  uint64_t stored_revision = current->revision;
  {
    MutexLock lock(&unwritten_mu_);
    if (const auto it = unwritten_.find(id); it != unwritten_.end()) {
      stored_revision = it->second;
    }
  }
  const absl::Time started = absl::Now();
  const absl::Status written = store_.Update(*next, stored_revision, fence);
  RecordStoreOutcome(written, "update", absl::Now() - started);
  if (!written.ok() && !(keep_if_store_down && StoreDown(written))) {
    return written;
  }
  std::shared_ptr<const core::Connection> published = next;
  if (!cache_.PublishIf(current, std::move(next))) {
    // The store accepted our write (or is down), so the cache can only have moved on through a
    // delete that came after it; the delete wins.
    return absl::AbortedError("connection changed concurrently; retry");
  }
  {
    MutexLock lock(&unwritten_mu_);
    if (written.ok()) {
      unwritten_.erase(id);
    } else {
      unwritten_.try_emplace(id, stored_revision);  // served from memory until FlushUnwritten
    }
  }
  Changed(published, id);
  return absl::OkStatus();
}

size_t Broker::unwritten() const {
  MutexLock lock(&unwritten_mu_);
  return unwritten_.size();
}

size_t Broker::FlushUnwritten() {
  std::vector<std::pair<core::ConnectionId, uint64_t>> pending;
  {
    MutexLock lock(&unwritten_mu_);
    pending.assign(unwritten_.begin(), unwritten_.end());
  }
  for (const auto& [id, stored_revision] : pending) {
    std::shared_ptr<const core::Connection> current = cache_.Get(id);
    if (current == nullptr) {
      MutexLock lock(&unwritten_mu_);
      unwritten_.erase(id);  // deleted meanwhile (its delete reached the store)
      continue;
    }
    const absl::Status s = store_.Update(*current, stored_revision, nullptr);
    RecordStoreOutcome(s);
    if (s.ok() || s.code() == absl::StatusCode::kAborted ||
        s.code() == absl::StatusCode::kNotFound) {
      // Written; or someone else changed the row meanwhile (another replica: its write is the
      // newer truth, and a reload follows); or it is gone.
      MutexLock lock(&unwritten_mu_);
      if (const auto it = unwritten_.find(id);
          it != unwritten_.end() && it->second == stored_revision) {
        unwritten_.erase(it);
      }
      if (!s.ok()) {
        (void)Reload(id);
      }
    }
  }
  return unwritten();
}

absl::Status Broker::ProbeStore() {
  // Any read answers whether the store is reachable; an id that cannot exist keeps it cheap.
  const absl::Time started = absl::Now();
  absl::StatusOr<core::Connection> probe = store_.Load("-store-probe");
  const absl::Status s =
      probe.status().code() == absl::StatusCode::kNotFound ? absl::OkStatus() : probe.status();
  RecordStoreOutcome(s, "probe", absl::Now() - started);
  return StoreDown(s) ? s : absl::OkStatus();
}

absl::StatusOr<std::shared_ptr<const core::Connection>> Broker::Activate(
    const core::ConnectionId& id, core::Grant grant) {
  std::shared_ptr<const core::Connection> current = cache_.Get(id);
  if (current == nullptr) {
    return absl::NotFoundError("unknown connection");
  }
  auto next = std::make_shared<core::Connection>(*current);
  grant.generation = current->generation() + 1;
  Schedule(grant);
  if (current->grant && !current->grant->access_token.empty()) {
    next->to_revoke.mutable_value().push_back(
        *current->grant);  // the reconnected account's old grant
  }
  next->data_loss.clear();
  next->grant = std::move(grant);
  next->refresh_intent.reset();
  next->status = core::ConnectionStatus::kActive;
  next->reason = core::Reason::kNone;
  next->last_error.clear();
  next->updated_at = clock_.Now();
  std::shared_ptr<const core::Connection> published = next;
  TB_RETURN_IF_ERROR(Replace(current, std::move(next)));
  return published;
}

absl::StatusOr<bool> Broker::RecordRefreshIntent(const core::ConnectionId& id, uint64_t generation,
                                                 const core::Lease* fence) {
  std::shared_ptr<const core::Connection> current = cache_.Get(id);
  if (current == nullptr) {
    return absl::NotFoundError("unknown connection");
  }
  if (current->status != core::ConnectionStatus::kActive || current->generation() != generation) {
    return absl::AbortedError("connection changed before the refresh");
  }
  const bool earlier_unknown =
      current->refresh_intent && current->refresh_intent->generation == generation;
  if (earlier_unknown) {
    return true;  // already recorded: nothing to write
  }
  auto next = std::make_shared<core::Connection>(*current);
  core::RefreshIntent intent;
  intent.generation = generation;
  if (current->grant && current->grant->refresh_token) {
    intent.refresh_token_fingerprint = Fingerprint(current->grant->refresh_token->Reveal());
  }
  intent.recorded_at = clock_.Now();
  next->refresh_intent = std::move(intent);
  TB_RETURN_IF_ERROR(Replace(current, std::move(next), fence));
  return false;
}

absl::StatusOr<std::shared_ptr<const core::Connection>> Broker::Rotate(const core::ConnectionId& id,
                                                                       uint64_t expected_generation,
                                                                       core::Grant grant,
                                                                       const core::Lease* fence) {
  // The provider has rotated already: this grant is the only live one, so a write that lost
  // the compare-and-set to a change that kept the grant (a reschedule, a revocation
  // bookkeeping write) is retried on top of it. Only a revoke, reconnect or delete wins.
  absl::Status last;
  for (int attempt = 0; attempt < 5; ++attempt) {
    std::shared_ptr<const core::Connection> current = cache_.Get(id);
    if (current == nullptr) {
      return absl::NotFoundError("unknown connection");
    }
    if (current->status != core::ConnectionStatus::kActive ||
        current->generation() != expected_generation || !current->grant) {
      return absl::AbortedError("connection was revoked, reconnected or refreshed meanwhile");
    }
    core::Grant next_grant = grant;
    if (!next_grant.refresh_token || next_grant.refresh_token->empty()) {
      next_grant.refresh_token = current->grant->refresh_token;  // the provider kept the old one
    }
    if (next_grant.scopes.empty()) {
      next_grant.scopes = current->grant->scopes;
    }
    next_grant.generation = expected_generation + 1;
    Schedule(next_grant);
    auto next = std::make_shared<core::Connection>(*current);
    next->grant = std::move(next_grant);
    next->refresh_intent.reset();
    next->updated_at = clock_.Now();
    std::shared_ptr<const core::Connection> published = next;
    // Kept in memory if the store is down: the provider has rotated, so this grant is the
    // only one that works; FlushUnwritten writes it when the store is back.
    last = Replace(current, std::move(next), fence, /*keep_if_store_down=*/true);
    if (last.ok()) {
      return published;
    }
    if (last.code() != absl::StatusCode::kAborted) {
      return last;
    }
  }
  return last;
}

absl::Status Broker::Modify(const core::ConnectionId& id,
                            const std::function<bool(core::Connection&)>& change,
                            bool keep_if_store_down) {
  // A handful of attempts: conflicts come from a concurrent refresh or revoke of the same
  // connection, which settle quickly.
  constexpr int kAttempts = 5;
  absl::Status last;
  for (int i = 0; i < kAttempts; ++i) {
    std::shared_ptr<const core::Connection> current = cache_.Get(id);
    if (current == nullptr) {
      return absl::NotFoundError("unknown connection");
    }
    auto next = std::make_shared<core::Connection>(*current);
    if (!change(*next)) {
      return absl::OkStatus();
    }
    next->updated_at = clock_.Now();
    last = Replace(current, std::move(next), /*fence=*/nullptr, keep_if_store_down);
    if (last.code() != absl::StatusCode::kAborted) {
      return last;
    }
  }
  return last;
}

absl::Status Broker::Reschedule(const core::ConnectionId& id, uint64_t generation, absl::Time at) {
  // Kept in memory if the store is down (and written by FlushUnwritten): a failed refresh moves
  // the promise along with its retry, and an outage must not turn a token that is still valid
  // into UNAVAILABLE answers.
  absl::Status wrong_grant = absl::OkStatus();
  absl::Status s = Modify(
      id,
      [&](core::Connection& c) {
        if (c.status != core::ConnectionStatus::kActive || !c.grant ||
            c.generation() != generation) {
          wrong_grant = absl::AbortedError("the grant changed before its refresh was rescheduled");
          return false;
        }
        if (c.grant->expires_at) {
          at = std::min(at, *c.grant->expires_at);
        }
        if (c.grant->refresh_at == at) {
          return false;
        }
        c.grant->refresh_at = at;
        return true;
      },
      /*keep_if_store_down=*/true);
  return s.ok() ? wrong_grant : s;
}

namespace {
// Revocation entries are told apart by their access token.
bool SameGrant(const core::Grant& a, const core::Grant& b) {
  return a.access_token == b.access_token;
}
}  // namespace

absl::Status Broker::AddRevocation(const core::ConnectionId& id, core::Grant grant) {
  return Modify(id, [&](core::Connection& c) {
    for (const core::Grant& g : c.to_revoke) {
      if (SameGrant(g, grant)) {
        return false;
      }
    }
    c.to_revoke.mutable_value().push_back(grant);
    return true;
  });
}

absl::Status Broker::ReplaceRevocation(const core::ConnectionId& id, const core::Grant& old,
                                       core::Grant replacement) {
  return Modify(id, [&](core::Connection& c) {
    for (core::Grant& g : c.to_revoke.mutable_value()) {
      if (SameGrant(g, old)) {
        g = replacement;
        return true;
      }
    }
    c.to_revoke.mutable_value().push_back(
        replacement);  // whatever became of `old`, this one is owed too
    return true;
  });
}

absl::Status Broker::ResolveRevocation(const core::ConnectionId& id, const core::Grant& revoked) {
  return Modify(id, [&](core::Connection& c) {
    if (c.to_revoke.empty()) {
      return false;
    }
    const bool resolved = std::erase_if(c.to_revoke.mutable_value(), [&](const core::Grant& g) {
                            return SameGrant(g, revoked);
                          }) > 0;
    if (c.to_revoke.empty()) {
      c.to_revoke.clear();  // give the box back
    }
    return resolved;
  });
}

absl::Status Broker::MarkNeedsReauth(const core::ConnectionId& id, core::Reason reason,
                                     std::string last_error) {
  if (reason != core::Reason::kNeedsReauth && reason != core::Reason::kRotationLost) {
    return absl::InvalidArgumentError("reason must be NEEDS_REAUTH or ROTATION_LOST");
  }
  std::shared_ptr<const core::Connection> current = cache_.Get(id);
  if (current == nullptr) {
    return absl::NotFoundError("unknown connection");
  }
  auto next = std::make_shared<core::Connection>(*current);
  next->status = core::ConnectionStatus::kNeedsReauth;
  next->reason = reason;
  next->last_error = std::move(last_error);
  next->updated_at = clock_.Now();
  return Replace(current, std::move(next));
}

absl::Status Broker::MarkRevoked(const core::ConnectionId& id) {
  std::shared_ptr<const core::Connection> current = cache_.Get(id);
  if (current == nullptr) {
    return absl::NotFoundError("unknown connection");
  }
  auto next = std::make_shared<core::Connection>(*current);
  next->status = core::ConnectionStatus::kRevoked;
  next->reason = core::Reason::kRevoked;
  // Keep the generation so that compare-and-set stays monotonic; the tokens move to to_revoke
  // until the provider confirms their revocation.
  if (next->grant) {
    if (!next->grant->access_token.empty()) {
      next->to_revoke.mutable_value().push_back(*next->grant);
    }
    core::Grant tombstone;
    tombstone.generation = next->grant->generation;
    tombstone.scopes = next->grant->scopes;
    next->grant = std::move(tombstone);
  }
  next->updated_at = clock_.Now();
  return Replace(current, std::move(next));
}

absl::Status Broker::Delete(const core::ConnectionId& id) {
  std::shared_ptr<const core::Connection> current = cache_.Get(id);
  if (current == nullptr) {
    return absl::NotFoundError("unknown connection");
  }
  const absl::Time started = absl::Now();
  const absl::Status deleted = store_.Delete(id);
  RecordStoreOutcome(deleted, "delete", absl::Now() - started);
  TB_RETURN_IF_ERROR(deleted);
  {
    MutexLock lock(&unwritten_mu_);
    unwritten_.erase(id);
  }
  // A writer that raced us may have published after our read; the delete wins, so erase
  // whatever snapshot is there now.
  for (std::shared_ptr<const core::Connection> c = current; c != nullptr; c = cache_.Get(id)) {
    if (cache_.EraseIf(id, c)) {
      break;
    }
  }
  Changed(nullptr, id);
  return absl::OkStatus();
}

}  // namespace tb::oauth
