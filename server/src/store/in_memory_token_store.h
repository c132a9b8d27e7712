#ifndef TB_STORE_IN_MEMORY_TOKEN_STORE_H_
#define TB_STORE_IN_MEMORY_TOKEN_STORE_H_

#include <cstdint>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "server/src/common/mutex.h"
#include "server/src/core/token_store.h"

namespace tb::store {

// A TokenStore that keeps everything in process memory: the `memory:` store URL. Nothing
// survives a restart, so it is for development and tests; the durable backends implement the
// same compare-and-set contract. Thread-safe.
class InMemoryTokenStore final : public core::TokenStore {
 public:
  absl::StatusOr<std::vector<core::Connection>> LoadAll() override ABSL_LOCKS_EXCLUDED(mu_);
  size_t ConnectionCountHint() override ABSL_LOCKS_EXCLUDED(mu_);
  absl::StatusOr<core::Connection> Load(const core::ConnectionId& id) override
      ABSL_LOCKS_EXCLUDED(mu_);
  absl::Status Create(const core::Connection& c) override ABSL_LOCKS_EXCLUDED(mu_);
  absl::Status Update(const core::Connection& c, uint64_t expected_revision,
                      const core::Lease* fence) override ABSL_LOCKS_EXCLUDED(mu_);
  absl::Status Delete(const core::ConnectionId& id) override ABSL_LOCKS_EXCLUDED(mu_);
  // One process owns the memory: every lease is granted.
  absl::StatusOr<std::optional<core::Lease>> AcquireLease(const core::ConnectionId& id,
                                                          absl::Duration ttl) override
      ABSL_LOCKS_EXCLUDED(mu_);
  absl::Status ReleaseLease(const core::Lease& lease) override;
  // True unless SetHasOtherWriters(false): the tests play the other replicas by writing here.
  bool HasOtherWriters() const override ABSL_LOCKS_EXCLUDED(mu_);

  // Test knob: the store is unreachable; every call but AcquireLease fails UNAVAILABLE.
  void SetDown(bool down) ABSL_LOCKS_EXCLUDED(mu_);
  // Test knob: another process holds every lease (AcquireLease answers nullopt).
  void SetLeasesHeldElsewhere(bool held) ABSL_LOCKS_EXCLUDED(mu_);
  // Test knob: the next write fails with `status` (then writes work again).
  void FailNextWrite(absl::Status status) ABSL_LOCKS_EXCLUDED(mu_);
  size_t writes() const ABSL_LOCKS_EXCLUDED(mu_);
  // Test knob: what HasOtherWriters answers.
  void SetHasOtherWriters(bool has) ABSL_LOCKS_EXCLUDED(mu_);
  // Load calls so far.
  size_t loads() const ABSL_LOCKS_EXCLUDED(mu_);

 private:
  absl::Status TakeInjectedFailure() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  mutable Mutex mu_;
  absl::flat_hash_map<core::ConnectionId, core::Connection> rows_ ABSL_GUARDED_BY(mu_);
  absl::Status next_write_failure_ ABSL_GUARDED_BY(mu_);
  size_t writes_ ABSL_GUARDED_BY(mu_) = 0;
  size_t loads_ ABSL_GUARDED_BY(mu_) = 0;
  bool has_other_writers_ ABSL_GUARDED_BY(mu_) = true;
  bool leases_held_elsewhere_ ABSL_GUARDED_BY(mu_) = false;
  bool down_ ABSL_GUARDED_BY(mu_) = false;
};

}  // namespace tb::store

#endif  // TB_STORE_IN_MEMORY_TOKEN_STORE_H_
