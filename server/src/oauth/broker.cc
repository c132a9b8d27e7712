#include "server/src/oauth/broker.h"

#include <utility>

#include "absl/strings/str_cat.h"
#include "server/src/common/status_macros.h"
#include "server/src/core/errors.h"

namespace tb::oauth {

namespace {
constexpr size_t kMaxPageSize = 1000;
}  // namespace

Broker::Broker(const Clock& clock, core::TokenStore& store, cache::ConnectionCache& cache,
               BrokerOptions options)
    : clock_(clock), store_(store), cache_(cache), options_(std::move(options)) {}

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
  std::vector<std::shared_ptr<const core::Connection>> out;
  std::string after;
  for (;;) {
    cache::ConnectionCache::Page page = cache_.List({}, 10'000, after);
    out.insert(out.end(), page.entries.begin(), page.entries.end());
    if (page.next_after.empty()) {
      return out;
    }
    after = page.next_after;
  }
}

absl::Status Broker::Load() {
  TB_ASSIGN_OR_RETURN(std::vector<core::Connection> all, store_.LoadAll());
  for (core::Connection& c : all) {
    auto entry = std::make_shared<const core::Connection>(std::move(c));
    cache_.Publish(entry);
    Changed(entry, entry->id);
  }
  return absl::OkStatus();
}

absl::StatusOr<TokenView> Broker::GetToken(const core::ConnectionId& id,
                                           absl::Duration min_ttl) const {
  std::shared_ptr<const core::Connection> c = cache_.Get(id);
  if (c == nullptr) {
    return absl::NotFoundError("unknown connection");
  }
  TB_RETURN_IF_ERROR(core::StatusErrorFor(*c));
  if (!c->grant) {
    return absl::InternalError("active connection without a grant");
  }
  const absl::Time now = clock_.Now();
  const absl::Time valid_until = c->grant->ValidUntil();
  const absl::Duration valid_for =
      valid_until == absl::InfiniteFuture() ? absl::InfiniteDuration() : valid_until - now;
  if (valid_for <= absl::ZeroDuration() || valid_for < min_ttl) {
    return absl::UnavailableError("no token with the requested lifetime left");
  }
  return TokenView{std::move(c), valid_until, valid_for};
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
  TB_RETURN_IF_ERROR(store_.Create(*c));
  if (!cache_.PublishIf(nullptr, c)) {
    return absl::AbortedError("connection changed concurrently; retry");
  }
  Changed(c, id);
  return std::shared_ptr<const core::Connection>(std::move(c));
}

absl::Status Broker::Replace(const std::shared_ptr<const core::Connection>& current,
                             std::shared_ptr<core::Connection> next) {
  next->revision = current->revision + 1;
  TB_RETURN_IF_ERROR(store_.Update(*next, current->revision, nullptr));
  const core::ConnectionId id = next->id;
  std::shared_ptr<const core::Connection> published = next;
  if (!cache_.PublishIf(current, std::move(next))) {
    // The store accepted our write, so the cache can only have moved on through a delete
    // that came after it; the delete wins in both places.
    return absl::AbortedError("connection changed concurrently; retry");
  }
  Changed(published, id);
  return absl::OkStatus();
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

absl::StatusOr<bool> Broker::RecordRefreshIntent(const core::ConnectionId& id,
                                                 uint64_t generation) {
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
  TB_RETURN_IF_ERROR(Replace(current, std::move(next)));
  return false;
}

absl::StatusOr<std::shared_ptr<const core::Connection>> Broker::Rotate(const core::ConnectionId& id,
                                                                       uint64_t expected_generation,
                                                                       core::Grant grant) {
  std::shared_ptr<const core::Connection> current = cache_.Get(id);
  if (current == nullptr) {
    return absl::NotFoundError("unknown connection");
  }
  if (current->status != core::ConnectionStatus::kActive ||
      current->generation() != expected_generation || !current->grant) {
    return absl::AbortedError("connection was revoked, reconnected or refreshed meanwhile");
  }
  if (!grant.refresh_token || grant.refresh_token->empty()) {
    grant.refresh_token = current->grant->refresh_token;  // the provider kept the old one
  }
  if (grant.scopes.empty()) {
    grant.scopes = current->grant->scopes;
  }
  grant.generation = expected_generation + 1;
  Schedule(grant);
  auto next = std::make_shared<core::Connection>(*current);
  next->grant = std::move(grant);
  next->refresh_intent.reset();
  next->updated_at = clock_.Now();
  std::shared_ptr<const core::Connection> published = next;
  TB_RETURN_IF_ERROR(Replace(current, std::move(next)));
  return published;
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
  // Keep the generation so that compare-and-set stays monotonic, but drop every secret.
  if (next->grant) {
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
  TB_RETURN_IF_ERROR(store_.Delete(id));
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
