#include "server/src/store/open_store.h"

#include <utility>

#include "absl/strings/match.h"
#include "server/src/store/in_memory_flow_store.h"
#include "server/src/store/in_memory_token_store.h"
#include "server/src/store/postgres_store.h"
#include "server/src/store/sqlite_store.h"

namespace tb::store {

namespace {

template <typename T>
Stores Both(std::unique_ptr<T> store) {
  Stores s;
  s.tokens = store.get();
  s.flows = store.get();
  s.owner = std::shared_ptr<T>(std::move(store));
  return s;
}

}  // namespace

absl::StatusOr<Stores> OpenStores(const StoreOptions& options, const core::Cipher* cipher) {
  if (options.url == "memory:") {
    struct Memory {
      InMemoryTokenStore tokens;
      InMemoryFlowStore flows;
    };
    auto m = std::make_shared<Memory>();
    Stores s;
    s.tokens = &m->tokens;
    s.flows = &m->flows;
    s.owner = std::move(m);
    return s;
  }
  if (cipher == nullptr) {
    return absl::InvalidArgumentError("a durable store needs the encryption keys");
  }
  if (absl::StartsWith(options.url, "sqlite:")) {
    SqliteStoreOptions o;
    o.clock = options.clock;
    absl::StatusOr<std::unique_ptr<SqliteStore>> s = SqliteStore::Open(options.url, *cipher, o);
    if (!s.ok()) {
      return s.status();
    }
    return Both(*std::move(s));
  }
  if (absl::StartsWith(options.url, "postgres://") ||
      absl::StartsWith(options.url, "postgresql://")) {
    PostgresStoreOptions o;
    o.pool_size = options.pool_size;
    o.statement_timeout = options.statement_timeout;
    o.clock = options.clock;
    absl::StatusOr<std::unique_ptr<PostgresStore>> s = PostgresStore::Open(options.url, *cipher, o);
    if (!s.ok()) {
      return s.status();
    }
    return Both(*std::move(s));
  }
  return absl::InvalidArgumentError(
      "store.url must be sqlite:///absolute/path/tokens.db, postgres://... or memory:");
}

}  // namespace tb::store
