// The store contracts against the `memory:` stores: only the cases a store without durability
// can show (TokenStoreContractTest).

#include <memory>

#include "server/src/store/in_memory_flow_store.h"
#include "server/src/store/in_memory_token_store.h"
#include "tests/integration/store/token_store_contract.h"

namespace tb::store::testing {
namespace {

class MemoryHarness final : public StoreHarness {
 public:
  explicit MemoryHarness(const BackendOptions& options)
      : flows_(options.max_pending_authorizations) {}
  core::TokenStore& tokens() override { return tokens_; }
  core::FlowStore& flows() override { return flows_; }

 private:
  InMemoryTokenStore tokens_;
  InMemoryFlowStore flows_;
};

StoreBackend MemoryBackend() {
  return StoreBackend{"Memory", [](const BackendOptions& options) {
                        return std::make_unique<MemoryHarness>(options);
                      }};
}

INSTANTIATE_TEST_SUITE_P(Memory, TokenStoreContractTest, ::testing::Values(MemoryBackend()),
                         BackendName);

}  // namespace
}  // namespace tb::store::testing
