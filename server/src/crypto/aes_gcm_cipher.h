#ifndef TB_CRYPTO_AES_GCM_CIPHER_H_
#define TB_CRYPTO_AES_GCM_CIPHER_H_

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "server/src/core/cipher.h"
#include "server/src/core/random.h"
#include "server/src/crypto/key_ring.h"

namespace tb::crypto {

// core::Cipher with AES-256-GCM through OpenSSL's EVP interface, over the keys of a KeyRing:
// the ring's newest key seals, every key opens.
//
// Seal draws a fresh 96-bit nonce for every call and appends the 128-bit tag to the
// ciphertext. The GCM authenticated data is internal::EncodeAssociatedData(key id,
// associated_data) (internal/aes_gcm.h), so a value opens only under the id it was sealed with,
// even if two ids were ever given the same key bytes.
//
// Random nonces bound how much one key may seal: NIST SP 800-38D allows 2^32 random-nonce
// seals per key, far beyond what storing OAuth grants needs, and rotation resets the count.
//
// Error messages name key ids, never plaintext, associated data, nonces or key bytes.
//
// Thread-safe: immutable after construction; every call uses its own OpenSSL context.
class AesGcmCipher final : public core::Cipher {
 public:
  // Nonces come from OpenSSL's RAND_bytes.
  explicit AesGcmCipher(KeyRing keys);
  // Nonces come from `nonces`, which must outlive this cipher. For known-answer tests only:
  // reusing a nonce under one key reveals the XOR of the two plaintexts and lets anyone forge
  // tags, so production wiring must use the constructor above.
  AesGcmCipher(KeyRing keys, core::Random& nonces);

  // Errors: INTERNAL (random source or OpenSSL failure).
  absl::StatusOr<core::Sealed> Seal(absl::string_view plaintext,
                                    absl::string_view associated_data) const override;
  // Errors: DATA_LOSS if `sealed.key_id` is not in the ring (the message names it and the
  // configured ids), if the nonce is not 96 bits, or if authentication fails (wrong key,
  // tampered ciphertext, nonce or associated data; the message names the key id).
  // INTERNAL on an OpenSSL failure.
  absl::StatusOr<std::string> Open(const core::Sealed& sealed,
                                   absl::string_view associated_data) const override;
  std::string current_key_id() const override;
  std::vector<std::string> key_ids() const override;
  // Lower-case hex of the first 16 bytes of HMAC-SHA-256(key, "token-broker key check v1"):
  // stable for a key, different between keys, and useless for recovering the key.
  // Errors: NOT_FOUND (no key `key_id`), INTERNAL (OpenSSL failure).
  absl::StatusOr<std::string> KeyCheck(absl::string_view key_id) const override;

 private:
  const KeyRing keys_;
  core::Random* const nonces_;  // null: RAND_bytes
};

}  // namespace tb::crypto

#endif  // TB_CRYPTO_AES_GCM_CIPHER_H_
