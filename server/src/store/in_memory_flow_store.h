#ifndef TB_STORE_IN_MEMORY_FLOW_STORE_H_
#define TB_STORE_IN_MEMORY_FLOW_STORE_H_

#include <cstddef>
#include <string>

#include "absl/container/flat_hash_map.h"
#include "server/src/common/mutex.h"
#include "server/src/core/flow_store.h"

namespace tb::store {

// FlowStore in process memory (the `memory:` store). In-flight authorizations are capped so
// that a flood of /oauth/start requests cannot grow memory without bound; expired ones are
// purged when the cap is reached. Thread-safe.
class InMemoryFlowStore final : public core::FlowStore {
 public:
  explicit InMemoryFlowStore(size_t max_pending = 100'000) : max_pending_(max_pending) {}

  absl::Status PutLink(const core::LinkRecord& record) override ABSL_LOCKS_EXCLUDED(mu_);
  absl::StatusOr<core::LinkRecord> GetLink(const std::string& link_id) override
      ABSL_LOCKS_EXCLUDED(mu_);
  absl::Status RevokeLink(const std::string& link_id) override ABSL_LOCKS_EXCLUDED(mu_);
  absl::Status MarkLinkUsed(const std::string& link_id, absl::Time when) override
      ABSL_LOCKS_EXCLUDED(mu_);
  absl::Status PutAuthorization(const core::PendingAuthorization& auth, absl::Time now) override
      ABSL_LOCKS_EXCLUDED(mu_);
  absl::StatusOr<core::PendingAuthorization> TakeAuthorization(absl::string_view state,
                                                               absl::Time now) override
      ABSL_LOCKS_EXCLUDED(mu_);

  size_t pending() const ABSL_LOCKS_EXCLUDED(mu_);

 private:
  const size_t max_pending_;
  mutable Mutex mu_;
  absl::flat_hash_map<std::string, core::LinkRecord> links_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_map<std::string, core::PendingAuthorization> pending_ ABSL_GUARDED_BY(mu_);
};

}  // namespace tb::store

#endif  // TB_STORE_IN_MEMORY_FLOW_STORE_H_
