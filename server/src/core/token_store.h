#ifndef TB_CORE_TOKEN_STORE_H_
#define TB_CORE_TOKEN_STORE_H_

#include <cstdint>
#include <optional>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "server/src/core/connection.h"

namespace tb::core {

// Where connections and their grants live durably. Implementations are thread-safe.
// Every write is compare-and-set on a per-connection revision so a stale writer never overwrites
// a newer record.
// Errors: kNotFound (no such connection), kAborted (revision conflict: reload and retry),
// kAlreadyExists (Create of an existing id), kUnavailable (store unreachable, retryable),
// kDataLoss (a record that cannot be read back).
class TokenStore {
 public:
  virtual ~TokenStore() = default;

  // Every stored connection, for loading the cache at start.
  virtual absl::StatusOr<std::vector<Connection>> LoadAll() = 0;
  virtual absl::StatusOr<Connection> Load(const ConnectionId& id) = 0;

  // Inserts a connection that must not exist yet.
  virtual absl::Status Create(const Connection& c) = 0;
  // Replaces `c.id` only if its stored generation equals `expected_generation` and its stored
  // status equals `expected_status`, so a concurrent lifecycle change is never lost.
  virtual absl::Status Update(const Connection& c, uint64_t expected_generation,
                              ConnectionStatus expected_status) = 0;
  virtual absl::Status Delete(const ConnectionId& id) = 0;
};

}  // namespace tb::core

#endif  // TB_CORE_TOKEN_STORE_H_
