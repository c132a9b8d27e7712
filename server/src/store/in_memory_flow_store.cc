#include "server/src/store/in_memory_flow_store.h"

#include <utility>

namespace tb::store {

absl::Status InMemoryFlowStore::PutLink(const core::LinkRecord& record) {
  MutexLock lock(&mu_);
  links_.insert_or_assign(record.link.id, record);
  return absl::OkStatus();
}

absl::StatusOr<core::LinkRecord> InMemoryFlowStore::GetLink(const std::string& link_id) {
  MutexLock lock(&mu_);
  const auto it = links_.find(link_id);
  if (it == links_.end()) {
    return absl::NotFoundError("no such link");
  }
  return it->second;
}

absl::Status InMemoryFlowStore::RevokeLink(const std::string& link_id) {
  MutexLock lock(&mu_);
  const auto it = links_.find(link_id);
  if (it == links_.end()) {
    return absl::NotFoundError("no such link");
  }
  it->second.revoked = true;
  return absl::OkStatus();
}

absl::Status InMemoryFlowStore::MarkLinkUsed(const std::string& link_id, absl::Time when) {
  MutexLock lock(&mu_);
  const auto it = links_.find(link_id);
  if (it == links_.end()) {
    return absl::NotFoundError("no such link");
  }
  it->second.used_at = when;
  return absl::OkStatus();
}

absl::Status InMemoryFlowStore::PutAuthorization(const core::PendingAuthorization& auth,
                                                 absl::Time now) {
  MutexLock lock(&mu_);
  if (pending_.size() >= max_pending_) {
    absl::erase_if(pending_, [now](const auto& kv) { return kv.second.expires_at <= now; });
    if (pending_.size() >= max_pending_) {
      return absl::ResourceExhaustedError("too many authorizations in flight; try again later");
    }
  }
  pending_.insert_or_assign(std::string(auth.state.Reveal()), auth);
  return absl::OkStatus();
}

absl::StatusOr<core::PendingAuthorization> InMemoryFlowStore::TakeAuthorization(
    absl::string_view state, absl::Time now) {
  MutexLock lock(&mu_);
  const auto it = pending_.find(state);
  if (it == pending_.end()) {
    return absl::NotFoundError("unknown state");
  }
  core::PendingAuthorization auth = std::move(it->second);
  pending_.erase(it);
  if (auth.expires_at <= now) {
    return absl::NotFoundError("expired state");
  }
  return auth;
}

size_t InMemoryFlowStore::pending() const {
  MutexLock lock(&mu_);
  return pending_.size();
}

}  // namespace tb::store
