#ifndef TB_CACHE_CONNECTION_CACHE_H_
#define TB_CACHE_CONNECTION_CACHE_H_

#include <array>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/hash/hash.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "server/src/common/mutex.h"
#include "server/src/core/connection.h"

namespace tb::cache {

// The published, in-memory view of every connection: the GetToken path reads only this.
//
// Thread-safe. Never performs I/O. Entries are immutable snapshots behind shared_ptr, so a
// reader copies one pointer under a shard's reader lock and works on it lock-free; writers
// replace whole snapshots. 64 shards keep readers of different connections off each other's
// cache lines and writers from blocking unrelated readers: there is no global lock.
class ConnectionCache {
 public:
  using Entry = std::shared_ptr<const core::Connection>;
  // Called with the new snapshot after each change, nullptr when the connection is erased.
  // Runs on the writer's thread, after the shard lock is released: it must not block.
  using Watcher = std::function<void(const Entry&)>;

  struct Filter {
    std::string provider;                          // empty: any
    std::optional<core::ConnectionStatus> status;  // nullopt: any
  };
  struct Page {
    std::vector<Entry> entries;  // ordered by id
    std::string next_after;      // id to continue after; empty when this was the last page
  };

  ConnectionCache() = default;
  ConnectionCache(const ConnectionCache&) = delete;
  ConnectionCache& operator=(const ConnectionCache&) = delete;

  // The current snapshot of `id`, nullptr if there is none.
  Entry Get(const core::ConnectionId& id) const;
  // Get() for a caller that uses the token: also records `now` as the connection's last use
  // (second resolution; a relaxed atomic store at most once a second per connection, so
  // concurrent readers of one hot connection do not fight over a cache line).
  Entry Use(const core::ConnectionId& id, absl::Time now) const;
  // When `id` was last Use()d; InfinitePast() if never (or unknown id). Survives Publish.
  absl::Time LastUsed(const core::ConnectionId& id) const;

  // Publishes `next` only if the current entry of next->id is still `expected` (pointer
  // identity; nullptr means "absent"). Returns false, publishing nothing, when another writer
  // got there first. Writers read, decide, persist, then publish with this check, so a slow
  // writer can never resurrect a deleted connection or hide a newer snapshot.
  bool PublishIf(const Entry& expected, Entry next);
  // Publishes unconditionally (loading at start).
  void Publish(Entry next);
  // Makes room for `connections` more entries, spread over the shards, so that a load of that
  // many publishes without growing a table. Growing rehashes every slot, and hashing a slot
  // reads its id through two pointers: at a million connections that was a fifth of the
  // loading thread's time.
  void Reserve(size_t connections);
  // Removes `id` if its entry is still `expected`. Returns false otherwise.
  bool EraseIf(const core::ConnectionId& id, const Entry& expected);

  size_t size() const;
  // Slots allocated over all the shards (size() plus the room left before a table grows).
  size_t capacity() const;

  // Calls `fn` with every entry, shard by shard under each shard's reader lock (so `fn` must be
  // quick and must not call back into the cache). For metrics at scrape time.
  void ForEach(const std::function<void(const core::Connection&)>& fn) const;

  // Every entry, shard by shard (in no order): what a walk over all connections needs without
  // the sorted index (Refresher::Start at a million connections).
  std::vector<Entry> All() const;

  // Up to `page_size` entries with id > `after` that match `filter`, in id order. Walks a
  // sorted index of the ids, built on first use and rebuilt only after ids were added or
  // removed, so that paging through N connections costs O(N log N) once, not O(N) per page
  // (the admin API pages through every connection). The index is dropped when a
  // walk reaches the last page.
  Page List(const Filter& filter, size_t page_size, absl::string_view after) const
      ABSL_LOCKS_EXCLUDED(index_mu_);

  // Registers `watcher` for changes of `id`; returns a handle for Unsubscribe.
  uint64_t Subscribe(const core::ConnectionId& id, Watcher watcher);
  void Unsubscribe(const core::ConnectionId& id, uint64_t handle);

 private:
  static constexpr size_t kShards = 64;
  // A published snapshot and its last use, in unix seconds (kNeverUsed: never).
  //
  // The table is a set keyed by the snapshot's own id, so a connection costs one 24-byte slot
  // and no second copy of its id (at a million connections, a map with the id as key and the
  // atomic behind a pointer cost about 100 bytes more per connection). Writers replace `entry`
  // only with a snapshot of the same id, so the key never changes under the table. Readers store
  // to `last_used` under the shard's reader lock; the table moves slots only when it grows or
  // erases, under the writer lock, which is why a move may read the atomic plainly.
  static constexpr int64_t kNeverUsed = INT64_MIN;
  struct Slot {
    explicit Slot(Entry e) : entry(std::move(e)) {}
    Slot(Slot&& o) noexcept
        : entry(std::move(o.entry)), last_used(o.last_used.load(std::memory_order_relaxed)) {}
    Slot& operator=(Slot&& o) noexcept {
      entry = std::move(o.entry);
      last_used.store(o.last_used.load(std::memory_order_relaxed), std::memory_order_relaxed);
      return *this;
    }
    mutable Entry entry;  // never nullptr while in the table
    mutable std::atomic<int64_t> last_used{kNeverUsed};
  };
  // Hash and equality on the id alone, so lookups take the id without building a Slot.
  struct SlotHash {
    using is_transparent = void;
    size_t operator()(absl::string_view id) const { return absl::HashOf(id); }
    size_t operator()(const Slot& s) const { return absl::HashOf(absl::string_view(s.entry->id)); }
  };
  struct SlotEq {
    using is_transparent = void;
    static absl::string_view Id(absl::string_view id) { return id; }
    static absl::string_view Id(const Slot& s) { return s.entry->id; }
    template <typename A, typename B>
    bool operator()(const A& a, const B& b) const {
      return Id(a) == Id(b);
    }
  };
  struct Shard {
    mutable SharedMutex mu;
    absl::flat_hash_set<Slot, SlotHash, SlotEq> entries ABSL_GUARDED_BY(mu);
    absl::flat_hash_map<core::ConnectionId, absl::flat_hash_map<uint64_t, Watcher>> watchers
        ABSL_GUARDED_BY(mu);
  };

  Shard& ShardFor(absl::string_view id);
  const Shard& ShardFor(absl::string_view id) const;
  // Copies of the watchers of `id`, taken under the lock so they can be called outside it.
  static std::vector<Watcher> WatchersOf(const Shard& shard, const core::ConnectionId& id)
      ABSL_SHARED_LOCKS_REQUIRED(shard.mu);

  std::array<Shard, kShards> shards_;
  std::atomic<uint64_t> next_handle_{1};

  // List's index: every id, sorted, as of ids_version_ == index_version_. Writers bump
  // ids_version_ when they add or remove an id (never when they replace an entry); readers of
  // single entries never touch any of this.
  std::atomic<uint64_t> ids_version_{1};
  mutable Mutex index_mu_;
  mutable std::vector<core::ConnectionId> index_ ABSL_GUARDED_BY(index_mu_);
  mutable uint64_t index_version_ ABSL_GUARDED_BY(index_mu_) = 0;
};

}  // namespace tb::cache

#endif  // TB_CACHE_CONNECTION_CACHE_H_
