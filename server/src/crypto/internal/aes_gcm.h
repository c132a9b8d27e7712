#ifndef TB_CRYPTO_INTERNAL_AES_GCM_H_
#define TB_CRYPTO_INTERNAL_AES_GCM_H_

// The raw AES-256-GCM primitive and the associated-data encoding under AesGcmCipher, exposed
// for known-answer tests only (defined in aes_gcm_cipher.cc). Everything else uses
// crypto::AesGcmCipher, which picks keys and nonces and binds the key id.

#include <cstddef>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace tb::crypto::internal {

inline constexpr size_t kAes256GcmKeySize = 32;
inline constexpr size_t kGcmNonceSize = 12;  // 96 bits: GCM's fast path, no GHASH of the IV
inline constexpr size_t kGcmTagSize = 16;    // 128 bits, the full tag

// The label that starts every authenticated-data string, naming the format version.
inline constexpr absl::string_view kAssociatedDataLabel = "token-broker aes-256-gcm v1";

// The authenticated data AesGcmCipher passes to GCM for a value sealed under `key_id` with the
// caller's `associated_data`:
//   kAssociatedDataLabel || 0x00 || uint32 big-endian length of key_id || key_id ||
//   associated_data
// The fixed label and the length prefix make the split unambiguous: no other (key_id,
// associated_data) pair produces the same bytes. Pure; thread-safe.
std::string EncodeAssociatedData(absl::string_view key_id, absl::string_view associated_data);

// AES-256-GCM encryption: returns ciphertext || 16-byte tag. `key` must be 32 bytes and `nonce`
// 12. Errors: INVALID_ARGUMENT (sizes), INTERNAL (OpenSSL failure). Thread-safe.
absl::StatusOr<std::string> Aes256GcmSeal(absl::string_view key, absl::string_view nonce,
                                          absl::string_view plaintext, absl::string_view aad);

// AES-256-GCM decryption of ciphertext || tag. Errors: DATA_LOSS (authentication failed, or
// too short to hold a tag), INVALID_ARGUMENT (key or nonce size), INTERNAL (OpenSSL failure).
// Messages never contain data. Thread-safe.
absl::StatusOr<std::string> Aes256GcmOpen(absl::string_view key, absl::string_view nonce,
                                          absl::string_view ciphertext_and_tag,
                                          absl::string_view aad);

}  // namespace tb::crypto::internal

#endif  // TB_CRYPTO_INTERNAL_AES_GCM_H_
