#ifndef TB_STORE_SCHEMA_VERSION_H_
#define TB_STORE_SCHEMA_VERSION_H_

// The expand/contract rule every durable backend follows. Migrations only add (tables,
// nullable columns, indexes) in the release that introduces them and remove only in a later
// release, once no supported binary reads what they remove. So binary N runs on schema N and on
// schema N+1 (written by the next release, kept after a rollback), and refuses anything newer.

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace tb::store {

// Whether a binary that knows schema versions up to `binary_version` may use a database at
// `db_version` (after applying its own migrations, when db_version < binary_version).
// Errors: FAILED_PRECONDITION naming both versions.
inline absl::Status CheckSchemaVersion(int db_version, int binary_version) {
  if (db_version <= binary_version + 1) {
    return absl::OkStatus();
  }
  return absl::FailedPreconditionError(absl::StrCat(
      "the database schema is at version ", db_version, ", but this token-broker supports only ",
      binary_version, " and ", binary_version + 1,
      ": run a newer token-broker (a rollback by more than one release is not supported)"));
}

}  // namespace tb::store

#endif  // TB_STORE_SCHEMA_VERSION_H_
