#ifndef TB_CRYPTO_KEY_RING_H_
#define TB_CRYPTO_KEY_RING_H_

#include <cstddef>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "server/src/common/secret.h"

namespace tb::crypto {

// The configured encryption-at-rest keys: AES-256 keys of exactly kKeySize bytes, each under an
// id matching [A-Za-z0-9._-]{1,64}, in the order they were configured. The last key is the
// newest: it seals; every key opens. Rotation is appending a key, then (once nothing sealed
// under an old key remains) removing that one.
//
// A KeyRing always holds at least one key. Immutable once built, so thread-safe for concurrent
// reads. Copyable and movable; a moved-from ring may be destroyed or assigned to, nothing else.
class KeyRing {
 public:
  static constexpr size_t kKeySize = 32;
  static constexpr size_t kMaxIdLength = 64;

  // Parses the key-file format: one key per line, `<key-id> <base64 of exactly 32 bytes>`,
  // separated by spaces or tabs. The base64 may be standard (as `openssl rand -base64 32`
  // prints it) or URL-safe, padded or not, but must be canonical. Blank lines and lines whose
  // first non-blank character is '#' are ignored; whitespace around a line (including a '\r'
  // from CRLF files) is trimmed.
  //
  // `source` names where `text` came from (a file path, an env var name) and is only used in
  // error messages; it is not retained.
  //
  // Errors: INVALID_ARGUMENT for a malformed line, a bad key id, bad base64, a key that is not
  // 32 bytes, a duplicate id, or no key at all. The message names `source`, the 1-based line
  // number and the key id where there is one; it never contains key bytes, the base64 text or
  // the raw line. (An "id" that itself looks like a base64 key, as when the two fields are
  // swapped, is not named either.)
  static absl::StatusOr<KeyRing> Parse(absl::string_view text, absl::string_view source);

  // Builds a ring from (id, key) pairs, oldest first, with the same rules as Parse.
  // Errors: INVALID_ARGUMENT (bad or duplicate id, key not 32 bytes, no keys); messages never
  // contain key bytes.
  static absl::StatusOr<KeyRing> FromKeys(std::vector<std::pair<std::string, KeyMaterial>> keys);

  // Id of the newest key, the one that seals.
  const std::string& current_id() const { return ids_.back(); }
  // Every key id, oldest first (the order of the file).
  const std::vector<std::string>& ids() const { return ids_; }
  // The key with id `id`, or nullptr if there is none. The pointer is valid as long as this
  // ring is alive and not assigned to.
  const KeyMaterial* Find(absl::string_view id) const;

  // True if `id` matches [A-Za-z0-9._-]{1,64}.
  static bool IsValidId(absl::string_view id);

 private:
  KeyRing(std::vector<std::string> ids, std::vector<KeyMaterial> keys)
      : ids_(std::move(ids)), keys_(std::move(keys)) {}

  // Parallel vectors; a ring has a handful of keys, so Find scans.
  std::vector<std::string> ids_;
  std::vector<KeyMaterial> keys_;
};

}  // namespace tb::crypto

#endif  // TB_CRYPTO_KEY_RING_H_
