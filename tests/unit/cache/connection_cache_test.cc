#include "server/src/cache/connection_cache.h"

#include <atomic>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"

namespace tb::cache {
namespace {

using Entry = ConnectionCache::Entry;

Entry Make(const std::string& id, uint64_t generation,
           core::ConnectionStatus status = core::ConnectionStatus::kActive,
           const std::string& provider = "zendesk") {
  auto c = std::make_shared<core::Connection>();
  c->id = id;
  c->provider = provider;
  c->status = status;
  core::Grant g;
  g.generation = generation;
  c->grant = g;
  return c;
}

TEST(ConnectionCacheTest, GetReturnsWhatWasPublished) {
  ConnectionCache cache;
  EXPECT_EQ(cache.Get("acme"), nullptr);
  Entry e = Make("acme", 1);
  cache.Publish(e);
  EXPECT_EQ(cache.Get("acme"), e);
  EXPECT_EQ(cache.size(), 1u);
}

TEST(ConnectionCacheTest, UseRecordsTheLastUseAcrossPublishes) {
  ConnectionCache cache;
  const absl::Time t0 = absl::FromUnixSeconds(1'700'000'000);
  EXPECT_EQ(cache.Use("acme", t0), nullptr);
  cache.Publish(Make("acme", 1));
  EXPECT_EQ(cache.LastUsed("acme"), absl::InfinitePast());
  EXPECT_NE(cache.Use("acme", t0), nullptr);
  EXPECT_EQ(cache.LastUsed("acme"), t0);
  cache.Publish(Make("acme", 2));  // a new snapshot keeps the record of use
  EXPECT_EQ(cache.LastUsed("acme"), t0);
  cache.Use("acme", t0 + absl::Seconds(90));
  EXPECT_EQ(cache.LastUsed("acme"), t0 + absl::Seconds(90));
  EXPECT_EQ(cache.LastUsed("other"), absl::InfinitePast());
}

TEST(ConnectionCacheTest, EntriesAndTheirLastUseSurviveTheTableGrowing) {
  // Slots move when a shard's table grows or erases: each must keep its snapshot and its use.
  ConnectionCache cache;
  const absl::Time t0 = absl::FromUnixSeconds(1'700'000'000);
  std::vector<Entry> first;
  for (int i = 0; i < 100; ++i) {
    first.push_back(Make(absl::StrCat("c", i), 1));
    cache.Publish(first.back());
    cache.Use(first.back()->id, t0 + absl::Seconds(i));
  }
  for (int i = 100; i < 20'000; ++i) {
    cache.Publish(Make(absl::StrCat("c", i), 1));
  }
  for (int i = 100; i < 20'000; i += 2) {
    const std::string id = absl::StrCat("c", i);
    ASSERT_TRUE(cache.EraseIf(id, cache.Get(id)));
  }
  EXPECT_EQ(cache.size(), 10'050u);  // 100 + 9 950 odd ones of the rest
  for (int i = 0; i < 100; ++i) {
    EXPECT_EQ(cache.Get(first[i]->id), first[i]);
    EXPECT_EQ(cache.LastUsed(first[i]->id), t0 + absl::Seconds(i));
  }
  EXPECT_EQ(cache.Get("c100"), nullptr);
  ASSERT_NE(cache.Get("c101"), nullptr);
  EXPECT_EQ(cache.Get("c101")->id, "c101");
  EXPECT_EQ(cache.LastUsed("c101"), absl::InfinitePast());
}

TEST(ConnectionCacheTest, ReserveMakesRoomForALoadOfThatManyWithoutGrowingATable) {
  ConnectionCache cache;
  const Entry before = Make("before", 1);
  cache.Publish(before);
  constexpr int kLoad = 50'000;
  cache.Reserve(kLoad);
  const size_t reserved = cache.capacity();
  EXPECT_GE(reserved, static_cast<size_t>(kLoad) + 1);
  EXPECT_EQ(cache.Get("before"), before);  // what was there stays
  for (int i = 0; i < kLoad; ++i) {
    cache.Publish(Make(absl::StrCat("load-", i), 1));
  }
  EXPECT_EQ(cache.size(), static_cast<size_t>(kLoad) + 1);
  EXPECT_EQ(cache.capacity(), reserved);  // no shard grew
  EXPECT_EQ(cache.Get("load-49999")->id, "load-49999");
  cache.Reserve(0);  // nothing to make room for: nothing changes
  EXPECT_EQ(cache.capacity(), reserved);
}

TEST(ConnectionCacheTest, PublishIfRejectsAStaleWriter) {
  ConnectionCache cache;
  Entry v1 = Make("acme", 1);
  ASSERT_TRUE(cache.PublishIf(nullptr, v1));
  EXPECT_FALSE(cache.PublishIf(nullptr, Make("acme", 9)));  // not absent any more
  Entry v2 = Make("acme", 2);
  ASSERT_TRUE(cache.PublishIf(v1, v2));
  EXPECT_FALSE(cache.PublishIf(v1, Make("acme", 3)));  // wrote against v1, v2 is current
  EXPECT_EQ(cache.Get("acme")->generation(), 2u);
}

TEST(ConnectionCacheTest, EraseIfDoesNotRemoveANewerEntry) {
  ConnectionCache cache;
  Entry v1 = Make("acme", 1);
  cache.Publish(v1);
  Entry v2 = Make("acme", 2);
  cache.Publish(v2);
  EXPECT_FALSE(cache.EraseIf("acme", v1));
  EXPECT_NE(cache.Get("acme"), nullptr);
  EXPECT_TRUE(cache.EraseIf("acme", v2));
  EXPECT_EQ(cache.Get("acme"), nullptr);
  // A writer that read v2 cannot resurrect it.
  EXPECT_FALSE(cache.PublishIf(v2, Make("acme", 3)));
  EXPECT_EQ(cache.Get("acme"), nullptr);
}

TEST(ConnectionCacheTest, ListPagesInIdOrderWithFilters) {
  ConnectionCache cache;
  for (int i = 0; i < 250; ++i) {
    cache.Publish(
        Make(absl::StrCat("c", 1000 + i), 1,
             i % 2 == 0 ? core::ConnectionStatus::kActive : core::ConnectionStatus::kPending,
             i % 5 == 0 ? "zendesk-chat" : "zendesk"));
  }
  std::vector<std::string> seen;
  std::string after;
  do {
    ConnectionCache::Page page = cache.List({}, 40, after);
    ASSERT_LE(page.entries.size(), 40u);
    for (const Entry& e : page.entries) {
      seen.push_back(e->id);
    }
    after = page.next_after;
  } while (!after.empty());
  ASSERT_EQ(seen.size(), 250u);
  EXPECT_TRUE(std::is_sorted(seen.begin(), seen.end()));
  EXPECT_EQ(std::adjacent_find(seen.begin(), seen.end()), seen.end());

  ConnectionCache::Filter active;
  active.status = core::ConnectionStatus::kActive;
  EXPECT_EQ(cache.List(active, 1000, "").entries.size(), 125u);
  ConnectionCache::Filter chat;
  chat.provider = "zendesk-chat";
  EXPECT_EQ(cache.List(chat, 1000, "").entries.size(), 50u);
  active.provider = "zendesk-chat";
  EXPECT_EQ(cache.List(active, 1000, "").entries.size(), 25u);
}

TEST(ConnectionCacheTest, ListSeesIdsAddedAndRemovedBetweenPages) {
  // List walks a sorted index of the ids; changes between pages must show in the next one.
  ConnectionCache cache;
  for (const char* id : {"b", "d", "f", "h"}) {
    cache.Publish(Make(id, 1));
  }
  ConnectionCache::Page first = cache.List({}, 2, "");
  ASSERT_EQ(first.entries.size(), 2u);
  EXPECT_EQ(first.next_after, "d");
  cache.Publish(Make("e", 1));                      // added after the cursor: seen
  cache.Publish(Make("a", 1));                      // added before it: not this walk's business
  ASSERT_TRUE(cache.EraseIf("f", cache.Get("f")));  // removed: skipped
  cache.Publish(Make("h", 2));                      // replaced: seen in its new version
  ConnectionCache::Page second = cache.List({}, 10, first.next_after);
  std::vector<std::string> ids;
  for (const Entry& e : second.entries) {
    ids.push_back(e->id);
  }
  EXPECT_EQ(ids, (std::vector<std::string>{"e", "h"}));
  EXPECT_EQ(second.entries.back()->generation(), 2u);
  EXPECT_TRUE(second.next_after.empty());
  // A new walk from the start sees everything there is now.
  EXPECT_EQ(cache.List({}, 10, "").entries.size(), 5u);
}

TEST(ConnectionCacheTest, WatchersSeeEveryChangeAndErase) {
  ConnectionCache cache;
  std::vector<uint64_t> generations;
  const uint64_t h = cache.Subscribe(
      "acme", [&](const Entry& e) { generations.push_back(e == nullptr ? 0 : e->generation()); });
  cache.Publish(Make("other", 7));
  Entry v1 = Make("acme", 1);
  cache.Publish(v1);
  Entry v2 = Make("acme", 2);
  ASSERT_TRUE(cache.PublishIf(v1, v2));
  ASSERT_TRUE(cache.EraseIf("acme", v2));
  EXPECT_EQ(generations, (std::vector<uint64_t>{1, 2, 0}));
  cache.Unsubscribe("acme", h);
  cache.Publish(Make("acme", 3));
  EXPECT_EQ(generations.size(), 3u);
}

// Readers and writers on many connections at once: every read sees a whole snapshot (its id
// matches the key, its generation never goes backwards), and the map ends with every writer's
// last value. Run under ThreadSanitizer in CI.
TEST(ConnectionCacheTest, ConcurrentReadersAndWritersSeeConsistentSnapshots) {
  ConnectionCache cache;
  constexpr int kConnections = 256;
  constexpr int kWriters = 4;
  constexpr int kGenerations = 200;
  for (int i = 0; i < kConnections; ++i) {
    cache.Publish(Make(absl::StrCat("conn-", i), 0));
  }
  std::atomic<bool> stop{false};
  std::atomic<int> bad{0};
  std::vector<std::thread> readers;
  for (int r = 0; r < 4; ++r) {
    readers.emplace_back([&, r] {
      std::vector<uint64_t> last(kConnections, 0);
      while (!stop.load(std::memory_order_relaxed)) {
        for (int i = r; i < kConnections; i += 3) {
          const std::string id = absl::StrCat("conn-", i);
          Entry e = cache.Get(id);
          if (e == nullptr || e->id != id || e->generation() < last[i]) {
            bad.fetch_add(1);
            continue;
          }
          last[i] = e->generation();
        }
      }
    });
  }
  std::vector<std::thread> writers;
  for (int w = 0; w < kWriters; ++w) {
    writers.emplace_back([&, w] {
      for (uint64_t g = 1; g <= kGenerations; ++g) {
        for (int i = w; i < kConnections; i += kWriters) {
          const std::string id = absl::StrCat("conn-", i);
          Entry current = cache.Get(id);
          ASSERT_TRUE(cache.PublishIf(current, Make(id, g)));
        }
      }
    });
  }
  for (std::thread& t : writers) {
    t.join();
  }
  stop = true;
  for (std::thread& t : readers) {
    t.join();
  }
  EXPECT_EQ(bad.load(), 0);
  for (int i = 0; i < kConnections; ++i) {
    EXPECT_EQ(cache.Get(absl::StrCat("conn-", i))->generation(), uint64_t{kGenerations});
  }
}

}  // namespace
}  // namespace tb::cache
