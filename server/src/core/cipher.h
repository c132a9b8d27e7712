#ifndef TB_CORE_CIPHER_H_
#define TB_CORE_CIPHER_H_

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace tb::core {

// A sealed (encrypted and authenticated) value as it is stored.
struct Sealed {
  std::string key_id;      // which key sealed it
  std::string nonce;       // raw bytes (96-bit for AES-GCM)
  std::string ciphertext;  // raw bytes, authentication tag included

  friend bool operator==(const Sealed&, const Sealed&) = default;
};

// Authenticated encryption of secrets at rest (crypto/ implements it with AES-256-GCM through
// OpenSSL; tests may inject their own). Several keys, each with an id: the newest seals, every
// key opens. `associated_data` is authenticated but not encrypted; callers bind the row's
// identity in it (connection id, generation) so that a ciphertext moved to another row does not
// open. Implementations also bind the key id.
//
// Thread-safe.
class Cipher {
 public:
  virtual ~Cipher() = default;

  // Seals under the newest key with a fresh random nonce. Errors: INTERNAL (crypto library).
  virtual absl::StatusOr<Sealed> Seal(absl::string_view plaintext,
                                      absl::string_view associated_data) const = 0;
  // Errors: DATA_LOSS (unknown key id, wrong key, tampered ciphertext or associated data),
  // naming the key id and never the data.
  virtual absl::StatusOr<std::string> Open(const Sealed& sealed,
                                           absl::string_view associated_data) const = 0;
  // Id of the key that Seal uses.
  virtual std::string current_key_id() const = 0;
  // Ids of every key that Open accepts, oldest first.
  virtual std::vector<std::string> key_ids() const = 0;
  // A value that identifies key `key_id` without revealing it (a keyed digest of a constant),
  // stored beside the data so that a wrong key under a known id is a clear start-up error
  // instead of every row failing to open. Errors: NOT_FOUND (no such key).
  virtual absl::StatusOr<std::string> KeyCheck(absl::string_view key_id) const = 0;
};

}  // namespace tb::core

#endif  // TB_CORE_CIPHER_H_
