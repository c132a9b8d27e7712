#include "server/src/store/in_memory_token_store.h"

#include <utility>

#include "absl/strings/str_cat.h"

namespace tb::store {

size_t InMemoryTokenStore::ConnectionCountHint() {
  MutexLock lock(&mu_);
  return rows_.size();
}

absl::StatusOr<std::vector<core::Connection>> InMemoryTokenStore::LoadAll() {
  MutexLock lock(&mu_);
  if (down_) {
    return absl::UnavailableError("store down (test)");
  }
  std::vector<core::Connection> out;
  out.reserve(rows_.size());
  for (const auto& [id, c] : rows_) {
    out.push_back(c);
  }
  return out;
}

absl::StatusOr<core::Connection> InMemoryTokenStore::Load(const core::ConnectionId& id) {
  MutexLock lock(&mu_);
  ++loads_;
  if (down_) {
    return absl::UnavailableError("store down (test)");
  }
  const auto it = rows_.find(id);
  if (it == rows_.end()) {
    return absl::NotFoundError("no such connection");
  }
  return it->second;
}

absl::Status InMemoryTokenStore::TakeInjectedFailure() {
  if (down_) {
    return absl::UnavailableError("store down (test)");
  }
  return std::exchange(next_write_failure_, absl::OkStatus());
}

void InMemoryTokenStore::SetDown(bool down) {
  MutexLock lock(&mu_);
  down_ = down;
}

absl::Status InMemoryTokenStore::Create(const core::Connection& c) {
  MutexLock lock(&mu_);
  if (absl::Status s = TakeInjectedFailure(); !s.ok()) {
    return s;
  }
  if (!rows_.emplace(c.id, c).second) {
    return absl::AlreadyExistsError("connection already exists");
  }
  ++writes_;
  return absl::OkStatus();
}

absl::Status InMemoryTokenStore::Update(const core::Connection& c, uint64_t expected_revision,
                                        const core::Lease*) {
  MutexLock lock(&mu_);
  if (absl::Status s = TakeInjectedFailure(); !s.ok()) {
    return s;
  }
  const auto it = rows_.find(c.id);
  if (it == rows_.end()) {
    return absl::NotFoundError("no such connection");
  }
  if (it->second.revision != expected_revision) {
    return absl::AbortedError("connection changed concurrently; reload and retry");
  }
  it->second = c;
  ++writes_;
  return absl::OkStatus();
}

absl::Status InMemoryTokenStore::Delete(const core::ConnectionId& id) {
  MutexLock lock(&mu_);
  if (absl::Status s = TakeInjectedFailure(); !s.ok()) {
    return s;
  }
  if (rows_.erase(id) == 0) {
    return absl::NotFoundError("no such connection");
  }
  ++writes_;
  return absl::OkStatus();
}

absl::StatusOr<std::optional<core::Lease>> InMemoryTokenStore::AcquireLease(
    const core::ConnectionId& id, absl::Duration ttl) {
  {
    MutexLock lock(&mu_);
    if (leases_held_elsewhere_) {
      return std::nullopt;
    }
  }
  core::Lease lease;
  lease.id = id;
  lease.owner = "memory";
  lease.fence = 1;
  (void)ttl;
  lease.expires_at = absl::InfiniteFuture();  // nobody else could ever take it
  return lease;
}

absl::Status InMemoryTokenStore::ReleaseLease(const core::Lease&) { return absl::OkStatus(); }

void InMemoryTokenStore::SetLeasesHeldElsewhere(bool held) {
  MutexLock lock(&mu_);
  leases_held_elsewhere_ = held;
}

void InMemoryTokenStore::FailNextWrite(absl::Status status) {
  MutexLock lock(&mu_);
  next_write_failure_ = std::move(status);
}

bool InMemoryTokenStore::HasOtherWriters() const {
  MutexLock lock(&mu_);
  return has_other_writers_;
}

void InMemoryTokenStore::SetHasOtherWriters(bool has) {
  MutexLock lock(&mu_);
  has_other_writers_ = has;
}

size_t InMemoryTokenStore::loads() const {
  MutexLock lock(&mu_);
  return loads_;
}

size_t InMemoryTokenStore::writes() const {
  MutexLock lock(&mu_);
  return writes_;
}

}  // namespace tb::store
