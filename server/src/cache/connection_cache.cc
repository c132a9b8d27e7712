#include "server/src/cache/connection_cache.h"

#include <algorithm>
#include <cmath>
#include <string>
#include <utility>
#include <vector>

#include "absl/hash/hash.h"

namespace tb::cache {

namespace {
// The shard comes from the hash's top bits: a shard's table uses the low bits (the low seven
// for its control bytes, the next ones for the slot), and picking the shard from those would
// leave every id in a shard with nearly the same control byte, so that each lookup compares
// many more keys than it should.
size_t ShardIndex(absl::string_view id, size_t shards) { return (absl::HashOf(id) >> 48) % shards; }
}  // namespace

ConnectionCache::Shard& ConnectionCache::ShardFor(absl::string_view id) {
  return shards_[ShardIndex(id, kShards)];
}

const ConnectionCache::Shard& ConnectionCache::ShardFor(absl::string_view id) const {
  return shards_[ShardIndex(id, kShards)];
}

ConnectionCache::Entry ConnectionCache::Get(const core::ConnectionId& id) const {
  const Shard& shard = ShardFor(id);
  ReaderLock lock(&shard.mu);
  const auto it = shard.entries.find(id);
  return it == shard.entries.end() ? nullptr : it->entry;
}

ConnectionCache::Entry ConnectionCache::Use(const core::ConnectionId& id, absl::Time now) const {
  const int64_t now_s = absl::ToUnixSeconds(now);
  const Shard& shard = ShardFor(id);
  ReaderLock lock(&shard.mu);
  const auto it = shard.entries.find(id);
  if (it == shard.entries.end()) {
    return nullptr;
  }
  std::atomic<int64_t>& last = it->last_used;
  if (last.load(std::memory_order_relaxed) != now_s) {
    last.store(now_s, std::memory_order_relaxed);
  }
  return it->entry;
}

absl::Time ConnectionCache::LastUsed(const core::ConnectionId& id) const {
  const Shard& shard = ShardFor(id);
  ReaderLock lock(&shard.mu);
  const auto it = shard.entries.find(id);
  if (it == shard.entries.end()) {
    return absl::InfinitePast();
  }
  const int64_t s = it->last_used.load(std::memory_order_relaxed);
  return s == kNeverUsed ? absl::InfinitePast() : absl::FromUnixSeconds(s);
}

std::vector<ConnectionCache::Watcher> ConnectionCache::WatchersOf(const Shard& shard,
                                                                  const core::ConnectionId& id) {
  std::vector<Watcher> out;
  if (shard.watchers.empty()) {
    return out;  // the common case, and at load always: no hash of the id
  }
  const auto it = shard.watchers.find(id);
  if (it != shard.watchers.end()) {
    out.reserve(it->second.size());
    for (const auto& [handle, w] : it->second) {
      out.push_back(w);
    }
  }
  return out;
}

bool ConnectionCache::PublishIf(const Entry& expected, Entry next) {
  Shard& shard = ShardFor(next->id);
  std::vector<Watcher> to_notify;
  {
    WriterLock lock(&shard.mu);
    auto it = shard.entries.find(next->id);
    const Entry current = it == shard.entries.end() ? nullptr : it->entry;
    if (current != expected) {
      return false;
    }
    if (it == shard.entries.end()) {
      shard.entries.insert(Slot(next));
      ids_version_.fetch_add(1, std::memory_order_release);
    } else {
      it->entry = next;
    }
    to_notify = WatchersOf(shard, next->id);
  }
  for (const Watcher& w : to_notify) {
    w(next);
  }
  return true;
}

void ConnectionCache::Publish(Entry next) {
  Shard& shard = ShardFor(next->id);
  std::vector<Watcher> to_notify;
  {
    WriterLock lock(&shard.mu);
    // One probe: insert, or replace the snapshot of the slot that is already there.
    if (auto [it, inserted] = shard.entries.insert(Slot(next)); inserted) {
      ids_version_.fetch_add(1, std::memory_order_release);
    } else {
      it->entry = next;
    }
    to_notify = WatchersOf(shard, next->id);
  }
  for (const Watcher& w : to_notify) {
    w(next);
  }
}

void ConnectionCache::Reserve(size_t connections) {
  // Ids spread over the shards binomially: the mean plus four standard deviations covers every
  // shard but about one in 30 000 loads, and that one grows once.
  const double mean = static_cast<double>(connections) / kShards;
  const size_t per_shard =
      connections == 0 ? 0 : static_cast<size_t>(mean + 4 * std::sqrt(mean)) + 1;
  for (Shard& shard : shards_) {
    WriterLock lock(&shard.mu);
    shard.entries.reserve(shard.entries.size() + per_shard);
  }
}

bool ConnectionCache::EraseIf(const core::ConnectionId& id, const Entry& expected) {
  Shard& shard = ShardFor(id);
  std::vector<Watcher> to_notify;
  {
    WriterLock lock(&shard.mu);
    auto it = shard.entries.find(id);
    if (it == shard.entries.end() || it->entry != expected) {
      return false;
    }
    shard.entries.erase(it);
    ids_version_.fetch_add(1, std::memory_order_release);
    to_notify = WatchersOf(shard, id);
  }
  for (const Watcher& w : to_notify) {
    w(nullptr);
  }
  return true;
}

size_t ConnectionCache::size() const {
  size_t n = 0;
  for (const Shard& shard : shards_) {
    ReaderLock lock(&shard.mu);
    n += shard.entries.size();
  }
  return n;
}

size_t ConnectionCache::capacity() const {
  size_t n = 0;
  for (const Shard& shard : shards_) {
    ReaderLock lock(&shard.mu);
    n += shard.entries.capacity();
  }
  return n;
}

void ConnectionCache::ForEach(const std::function<void(const core::Connection&)>& fn) const {
  for (const Shard& shard : shards_) {
    ReaderLock lock(&shard.mu);
    for (const Slot& slot : shard.entries) {
      fn(*slot.entry);
    }
  }
}

std::vector<ConnectionCache::Entry> ConnectionCache::All() const {
  std::vector<Entry> out;
  out.reserve(size());
  for (const Shard& shard : shards_) {
    ReaderLock lock(&shard.mu);
    for (const Slot& slot : shard.entries) {
      out.push_back(slot.entry);
    }
  }
  return out;
}

ConnectionCache::Page ConnectionCache::List(const Filter& filter, size_t page_size,
                                            absl::string_view after) const {
  // Each entry is read under its own shard's lock; a page is consistent per entry, which is
  // all a paged listing of a live map can promise. An id added while a walk is under way may
  // be missed by it (as it may by any scan), one removed is skipped.
  MutexLock lock(&index_mu_);
  const uint64_t version = ids_version_.load(std::memory_order_acquire);
  if (index_version_ != version) {
    index_.clear();
    for (const Shard& shard : shards_) {
      ReaderLock shard_lock(&shard.mu);
      for (const Slot& slot : shard.entries) {
        index_.push_back(slot.entry->id);
      }
    }
    std::sort(index_.begin(), index_.end());
    index_version_ = version;
  }
  const auto matches = [&filter](const Entry& e) {
    return e != nullptr && (filter.provider.empty() || e->provider == filter.provider) &&
           (!filter.status || e->status == *filter.status);
  };
  Page page;
  auto it = after.empty() ? index_.begin()
                          : std::upper_bound(index_.begin(), index_.end(), after,
                                             [](absl::string_view a, const std::string& b) {
                                               return a < absl::string_view(b);
                                             });
  for (; it != index_.end() && page.entries.size() < page_size; ++it) {
    if (Entry e = Get(*it); matches(e)) {
      page.entries.push_back(std::move(e));
    }
  }
  // A next page only if there is one more match.
  for (; it != index_.end() && !page.entries.empty(); ++it) {
    if (matches(Get(*it))) {
      page.next_after = page.entries.back()->id;
      break;
    }
  }
  if (page.next_after.empty()) {
    // The walk is over: do not keep a copy of every id for the next one.
    std::vector<core::ConnectionId>().swap(index_);
    index_version_ = 0;
  }
  return page;
}

uint64_t ConnectionCache::Subscribe(const core::ConnectionId& id, Watcher watcher) {
  const uint64_t handle = next_handle_.fetch_add(1, std::memory_order_relaxed);
  Shard& shard = ShardFor(id);
  WriterLock lock(&shard.mu);
  shard.watchers[id].emplace(handle, std::move(watcher));
  return handle;
}

void ConnectionCache::Unsubscribe(const core::ConnectionId& id, uint64_t handle) {
  Shard& shard = ShardFor(id);
  WriterLock lock(&shard.mu);
  auto it = shard.watchers.find(id);
  if (it == shard.watchers.end()) {
    return;
  }
  it->second.erase(handle);
  if (it->second.empty()) {
    shard.watchers.erase(it);
  }
}

}  // namespace tb::cache
