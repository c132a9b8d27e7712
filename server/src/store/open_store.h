#ifndef TB_STORE_OPEN_STORE_H_
#define TB_STORE_OPEN_STORE_H_

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "server/src/common/clock.h"
#include "server/src/core/cipher.h"
#include "server/src/core/flow_store.h"
#include "server/src/core/token_store.h"

namespace tb::store {

struct StoreOptions {
  // memory:, sqlite:///abs/path/tokens.db or postgres(ql)://...
  std::string url;
  size_t pool_size = 4;                                 // postgres
  absl::Duration statement_timeout = absl::Seconds(5);  // postgres
  const Clock* clock = nullptr;                         // null: the system clock
};

// The token store and the flow store of one backend (durable backends are one object serving
// both ports). Owns them; destroy after every user.
struct Stores {
  core::TokenStore* tokens = nullptr;
  core::FlowStore* flows = nullptr;
  std::shared_ptr<void> owner;
};

// Opens the backend `options.url` names. `cipher` seals every secret of durable backends and
// must outlive the stores; memory: takes none. Errors: INVALID_ARGUMENT (unknown scheme, no
// cipher for a durable store) and the backend's Open errors (clear messages: lock held, schema
// too new, key missing...).
absl::StatusOr<Stores> OpenStores(const StoreOptions& options, const core::Cipher* cipher);

}  // namespace tb::store

#endif  // TB_STORE_OPEN_STORE_H_
