// The store contracts against the SQLite store: every case, durable ones included.

#include "tests/integration/store/sqlite_test_support.h"
#include "tests/integration/store/token_store_contract.h"

namespace tb::store::testing {
namespace {

INSTANTIATE_TEST_SUITE_P(Sqlite, TokenStoreContractTest, ::testing::Values(SqliteBackend()),
                         BackendName);
INSTANTIATE_TEST_SUITE_P(Sqlite, DurableStoreContractTest, ::testing::Values(SqliteBackend()),
                         BackendName);

}  // namespace
}  // namespace tb::store::testing
