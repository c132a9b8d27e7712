#ifndef TB_STORE_RECORD_CODEC_H_
#define TB_STORE_RECORD_CODEC_H_

// How a connection, a link and an in-flight authorization become database rows, shared by the
// SQLite and PostgreSQL backends. Every secret (access and refresh tokens, also those awaiting
// revocation; PKCE verifiers; browser bindings) goes into one sealed blob per row; what an
// operator lists and filters on (id, provider, status, generation, revision, times) stays in
// plaintext columns and a plaintext metadata blob. Blobs are private protobuf messages
// (proto/tokenbroker/storage/v1/records.proto): a binary that meets fields written by a newer
// one keeps them when it rewrites the row, which is what lets binary N run on schema N+1.
//
// The sealed blob's associated data binds the row's identity (connection id and generation,
// or link id, or state hash) and the key id, so a ciphertext copied into another row does not
// open.

#include <cstdint>
#include <optional>
#include <string>

#include "absl/status/statusor.h"
#include "server/src/core/cipher.h"
#include "server/src/core/connection.h"
#include "server/src/core/flow_store.h"

namespace tb::store {

// One row of the `connections` table.
struct ConnectionRow {
  std::string id;
  std::string provider;
  int status = 0;  // core::ConnectionStatus as a stable number: 0 pending, 1 active,
                   // 2 needs_reauth, 3 revoked
  uint64_t generation = 0;
  uint64_t revision = 0;
  std::optional<int64_t> refresh_at_unix_ms;  // for operators' queries; the truth is in meta
  int64_t updated_at_unix_ms = 0;
  std::string meta;     // serialized storage.v1.ConnectionMeta (no secret)
  core::Sealed sealed;  // serialized storage.v1.ConnectionSecrets, sealed
};

// Errors: INTERNAL (cipher).
absl::StatusOr<ConnectionRow> EncodeConnection(const core::Connection& c,
                                               const core::Cipher& cipher);
// As above, for a write that replaces `previous` (the row as stored; may be null): the fields
// of its metadata and of its secrets that this binary does not know (written by a newer
// release) are carried over, so that running binary N on schema N+1 loses nothing. Fields
// inside repeated elements (to_revoke) are not carried over. A previous row that does not
// decode is simply not merged. Errors: INTERNAL (cipher).
absl::StatusOr<ConnectionRow> EncodeConnection(const core::Connection& c,
                                               const core::Cipher& cipher,
                                               const ConnectionRow* previous);
// Never fails on the secrets: a sealed blob that does not open gives a Connection with its
// metadata and `data_loss` set (the caller logs and counts it). Errors: DATA_LOSS only when
// the metadata itself is unreadable (then nothing about the row can be trusted).
absl::StatusOr<core::Connection> DecodeConnection(const ConnectionRow& row,
                                                  const core::Cipher& cipher);
// What a store returns for a row whose metadata does not decode (DecodeConnection failed with
// `why`): the id, provider, status, generation and revision from the plaintext columns, and
// `data_loss` saying why, so that this connection alone answers DATA_LOSS and is never
// dropped silently.
core::Connection UnreadableConnection(const ConnectionRow& row, const absl::Status& why);
// DecodeConnection, or UnreadableConnection when that fails: what every load returns per row.
core::Connection DecodeOrUnreadable(const ConnectionRow& row, const core::Cipher& cipher);

// One row of the `links` table (no secret in a link record, but sealed all the same so that
// the same code path protects everything a store holds).
struct LinkRow {
  std::string link_id;
  std::string connection_id;
  int64_t expires_at_unix_ms = 0;
  core::Sealed sealed;  // serialized storage.v1.LinkRecord
};
absl::StatusOr<LinkRow> EncodeLink(const core::LinkRecord& record, const core::Cipher& cipher);
// Errors: DATA_LOSS.
absl::StatusOr<core::LinkRecord> DecodeLink(const LinkRow& row, const core::Cipher& cipher);

// One row of the `authorizations` table. The state is the lookup key, but only its SHA-256
// is stored, so a database reader cannot complete someone's flow.
struct AuthorizationRow {
  std::string state_hash;  // raw 32 bytes, SHA-256 of the state
  int64_t expires_at_unix_ms = 0;
  core::Sealed sealed;  // serialized storage.v1.PendingAuthorization
};
std::string StateHash(absl::string_view state);  // SHA-256, raw bytes
absl::StatusOr<AuthorizationRow> EncodeAuthorization(const core::PendingAuthorization& auth,
                                                     const core::Cipher& cipher);
// The raw state is stored nowhere, not even sealed, so the result's `state` is empty: the
// caller, who looked the row up by the state, sets it (or uses the overload below).
// Errors: DATA_LOSS.
absl::StatusOr<core::PendingAuthorization> DecodeAuthorization(const AuthorizationRow& row,
                                                               const core::Cipher& cipher);
// As above, with `state` the value the row was looked up by: sets it in the result.
// Errors: DATA_LOSS (also when StateHash(state) is not the row's state_hash).
absl::StatusOr<core::PendingAuthorization> DecodeAuthorization(const AuthorizationRow& row,
                                                               absl::string_view state,
                                                               const core::Cipher& cipher);

// Key rotation: the row's sealed blob opened and sealed again under the cipher's current key,
// its plaintext unchanged byte for byte (fields a newer release wrote included).
// Errors: DATA_LOSS (the blob, or for a connection its metadata, does not open: the row must
// be left as it is), INTERNAL (cipher).
absl::StatusOr<core::Sealed> ResealConnection(const ConnectionRow& row, const core::Cipher& cipher);
absl::StatusOr<core::Sealed> ResealLink(const LinkRow& row, const core::Cipher& cipher);
absl::StatusOr<core::Sealed> ResealAuthorization(const AuthorizationRow& row,
                                                 const core::Cipher& cipher);

}  // namespace tb::store

#endif  // TB_STORE_RECORD_CODEC_H_
