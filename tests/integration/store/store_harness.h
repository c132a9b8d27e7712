#ifndef TB_TESTS_INTEGRATION_STORE_STORE_HARNESS_H_
#define TB_TESTS_INTEGRATION_STORE_STORE_HARNESS_H_

// How a store backend plugs into the contract suites of token_store_contract.h.

#include <cstddef>
#include <functional>
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "gtest/gtest.h"
#include "server/src/core/flow_store.h"
#include "server/src/core/token_store.h"

namespace tb::store::testing {

struct BackendOptions {
  size_t max_pending_authorizations = 100'000;
};

// One store under test, owning whatever it needs (files, ciphers, servers).
class StoreHarness {
 public:
  virtual ~StoreHarness() = default;
  virtual core::TokenStore& tokens() = 0;
  virtual core::FlowStore& flows() = 0;
  // Durable backends: closes the store and opens the same database again. The references
  // from tokens() and flows() change.
  virtual absl::Status Reopen() { return absl::UnimplementedError("not a durable store"); }
  // Durable backends: damages the stored ciphertext of connection `id` behind the store's
  // back, as a disk error or a bad restore would.
  virtual absl::Status CorruptConnectionSecrets(const core::ConnectionId& id) {
    (void)id;
    return absl::UnimplementedError("not a durable store");
  }
};

struct StoreBackend {
  std::string name;
  std::function<std::unique_ptr<StoreHarness>(const BackendOptions&)> make;
};

inline std::string BackendName(const ::testing::TestParamInfo<StoreBackend>& info) {
  return info.param.name;
}

}  // namespace tb::store::testing

#endif  // TB_TESTS_INTEGRATION_STORE_STORE_HARNESS_H_
