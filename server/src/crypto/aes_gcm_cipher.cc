#include "server/src/crypto/aes_gcm_cipher.h"

#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/rand.h>

#include <algorithm>
#include <cassert>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/types/span.h"
#include "server/src/common/status_macros.h"
#include "server/src/crypto/internal/aes_gcm.h"

namespace tb::crypto {
namespace internal {
namespace {

// Owns an EVP_CIPHER_CTX, so that every return path frees it; EVP_CIPHER_CTX_free also wipes
// the expanded key schedule it holds.
struct CipherCtxDeleter {
  void operator()(EVP_CIPHER_CTX* ctx) const { EVP_CIPHER_CTX_free(ctx); }
};
using CipherCtx = std::unique_ptr<EVP_CIPHER_CTX, CipherCtxDeleter>;

const unsigned char* Bytes(absl::string_view s) {
  return reinterpret_cast<const unsigned char*>(s.data());
}

// INTERNAL naming the failed step and OpenSSL's reason (which never contains data). It also
// empties this thread's OpenSSL error queue, which would otherwise confuse the next OpenSSL
// user on the thread (a TLS read that checks ERR_get_error, say).
absl::Status OpenSslError(absl::string_view what) {
  char reason[256] = "no reason given";
  if (const unsigned long code = ERR_get_error(); code != 0) {
    ERR_error_string_n(code, reason, sizeof(reason));
  }
  ERR_clear_error();
  return absl::InternalError(absl::StrCat(what, ": ", reason));
}

// AES-256-GCM's implementation, fetched from OpenSSL's default provider once for the process.
// EVP_aes_256_gcm() makes OpenSSL 3 fetch it again (a name lookup under a lock) on every
// EVP_CipherInit_ex: a twentieth of a million-connection load. Never freed: it lives as long as
// the process, as the one EVP_aes_256_gcm() returns does.
const EVP_CIPHER* Aes256Gcm() {
  static const EVP_CIPHER* const cipher = [] {
    const EVP_CIPHER* fetched = EVP_CIPHER_fetch(nullptr, "AES-256-GCM", nullptr);
    if (fetched == nullptr) {
      ERR_clear_error();
      return EVP_aes_256_gcm();  // the init then reports why it cannot be had
    }
    return fetched;
  }();
  return cipher;
}

// A context set up for AES-256-GCM with `key` and a 96-bit `nonce`, encrypting or decrypting.
absl::StatusOr<CipherCtx> NewGcmContext(absl::string_view key, absl::string_view nonce,
                                        bool encrypt) {
  if (key.size() != kAes256GcmKeySize) {
    return absl::InvalidArgumentError(
        absl::StrCat("AES-256-GCM key is ", key.size(), " bytes, want ", kAes256GcmKeySize));
  }
  if (nonce.size() != kGcmNonceSize) {
    return absl::InvalidArgumentError(
        absl::StrCat("AES-256-GCM nonce is ", nonce.size(), " bytes, want ", kGcmNonceSize));
  }
  CipherCtx ctx(EVP_CIPHER_CTX_new());
  if (ctx == nullptr) {
    return OpenSslError("EVP_CIPHER_CTX_new");
  }
  const int enc = encrypt ? 1 : 0;
  // Three steps because GCM's IV length must be set after the cipher is chosen and before the
  // IV is given. 12 is OpenSSL's default, but saying so keeps the nonce size a property of this
  // code rather than of a library default.
  if (EVP_CipherInit_ex(ctx.get(), Aes256Gcm(), nullptr, nullptr, nullptr, enc) != 1 ||
      EVP_CIPHER_CTX_ctrl(ctx.get(), EVP_CTRL_GCM_SET_IVLEN, static_cast<int>(kGcmNonceSize),
                          nullptr) != 1 ||
      EVP_CipherInit_ex(ctx.get(), nullptr, nullptr, Bytes(key), Bytes(nonce), enc) != 1) {
    return OpenSslError("AES-256-GCM setup");
  }
  return ctx;
}

// EVP_CipherUpdate takes an int length, so larger inputs go in pieces (GCM itself allows up to
// 64 GiB per nonce).
constexpr size_t kMaxUpdate = size_t{1} << 30;

// Feeds `in` through `ctx`: as authenticated data when `out` is null, otherwise as text whose
// result is written to `out`, `*written` counting the bytes. GCM is a stream mode, so OpenSSL
// writes as many bytes as it is given; callers still check the count rather than assume it.
bool Update(EVP_CIPHER_CTX* ctx, absl::string_view in, unsigned char* out, size_t* written) {
  while (!in.empty()) {
    const size_t n = std::min(in.size(), kMaxUpdate);
    int len = 0;
    if (EVP_CipherUpdate(ctx, out == nullptr ? nullptr : out + *written, &len, Bytes(in),
                         static_cast<int>(n)) != 1) {
      return false;
    }
    *written += static_cast<size_t>(len);
    in.remove_prefix(n);
  }
  return true;
}

}  // namespace

std::string EncodeAssociatedData(absl::string_view key_id, absl::string_view associated_data) {
  // The 0x00 after the label keeps labels of later versions from being read as this one plus
  // a prefix of the length (".. v1" against ".. v10"). The length prefix on the key id keeps
  // ("a", "bc") and ("ab", "c") apart; the caller's data is last, so it needs none.
  assert(key_id.size() <= std::numeric_limits<uint32_t>::max());
  const auto id_size = static_cast<uint32_t>(key_id.size());
  std::string out;
  out.reserve(kAssociatedDataLabel.size() + 1 + 4 + key_id.size() + associated_data.size());
  out.append(kAssociatedDataLabel.data(), kAssociatedDataLabel.size());
  out.push_back('\0');
  for (int shift = 24; shift >= 0; shift -= 8) {
    out.push_back(static_cast<char>((id_size >> shift) & 0xff));
  }
  out.append(key_id.data(), key_id.size());
  out.append(associated_data.data(), associated_data.size());
  return out;
}

absl::StatusOr<std::string> Aes256GcmSeal(absl::string_view key, absl::string_view nonce,
                                          absl::string_view plaintext, absl::string_view aad) {
  TB_ASSIGN_OR_RETURN(CipherCtx ctx, NewGcmContext(key, nonce, /*encrypt=*/true));
  std::string out(plaintext.size() + kGcmTagSize, '\0');
  auto* bytes = reinterpret_cast<unsigned char*>(out.data());
  size_t aad_written = 0;
  size_t written = 0;
  if (!Update(ctx.get(), aad, nullptr, &aad_written) ||
      !Update(ctx.get(), plaintext, bytes, &written)) {
    return OpenSslError("AES-256-GCM encrypt");
  }
  int final_len = 0;
  if (EVP_CipherFinal_ex(ctx.get(), bytes + written, &final_len) != 1) {
    return OpenSslError("AES-256-GCM encrypt final");
  }
  written += static_cast<size_t>(final_len);
  if (written != plaintext.size()) {
    return absl::InternalError("AES-256-GCM encrypt wrote an unexpected length");
  }
  if (EVP_CIPHER_CTX_ctrl(ctx.get(), EVP_CTRL_GCM_GET_TAG, static_cast<int>(kGcmTagSize),
                          bytes + written) != 1) {
    return OpenSslError("AES-256-GCM get tag");
  }
  return out;
}

absl::StatusOr<std::string> Aes256GcmOpen(absl::string_view key, absl::string_view nonce,
                                          absl::string_view ciphertext_and_tag,
                                          absl::string_view aad) {
  if (ciphertext_and_tag.size() < kGcmTagSize) {
    return absl::DataLossError("AES-256-GCM value is shorter than its tag");
  }
  const absl::string_view ciphertext =
      ciphertext_and_tag.substr(0, ciphertext_and_tag.size() - kGcmTagSize);
  // A copy because EVP_CTRL_GCM_SET_TAG takes a non-const pointer (it only reads it).
  unsigned char tag[kGcmTagSize];
  std::memcpy(tag, ciphertext_and_tag.data() + ciphertext.size(), kGcmTagSize);

  TB_ASSIGN_OR_RETURN(CipherCtx ctx, NewGcmContext(key, nonce, /*encrypt=*/false));
  std::string out(ciphertext.size(), '\0');
  auto* bytes = reinterpret_cast<unsigned char*>(out.data());
  // GCM decrypts before it authenticates, so on failure `out` holds plaintext that nobody
  // vouches for (possibly attacker-chosen XOR the real one). Wipe it rather than leave it in
  // freed heap memory.
  const auto fail = [&out](absl::Status status) {
    OPENSSL_cleanse(out.data(), out.size());
    return status;
  };
  size_t aad_written = 0;
  size_t written = 0;
  if (!Update(ctx.get(), aad, nullptr, &aad_written) ||
      !Update(ctx.get(), ciphertext, bytes, &written)) {
    return fail(OpenSslError("AES-256-GCM decrypt"));
  }
  if (EVP_CIPHER_CTX_ctrl(ctx.get(), EVP_CTRL_GCM_SET_TAG, static_cast<int>(kGcmTagSize), tag) !=
      1) {
    return fail(OpenSslError("AES-256-GCM set tag"));
  }
  int final_len = 0;
  if (EVP_CipherFinal_ex(ctx.get(), bytes + written, &final_len) != 1) {
    // The tag did not match: the one failure that is about the data, not the library.
    // OpenSSL may or may not queue an error for it; drop whatever it queued.
    ERR_clear_error();
    return fail(absl::DataLossError("AES-256-GCM authentication failed"));
  }
  written += static_cast<size_t>(final_len);
  if (written != ciphertext.size()) {
    return fail(absl::InternalError("AES-256-GCM decrypt wrote an unexpected length"));
  }
  return out;
}

}  // namespace internal

namespace {

constexpr absl::string_view kKeyCheckLabel = "token-broker key check v1";
constexpr size_t kKeyCheckSize = 16;

// "key 'k1'" for messages. A key id read back from storage is only echoed if it is well formed,
// so that a corrupted row cannot put arbitrary bytes (or another column's data) into a log.
std::string Describe(absl::string_view key_id) {
  if (KeyRing::IsValidId(key_id)) {
    return absl::StrCat("key '", key_id, "'");
  }
  return absl::StrCat("a malformed key id (", key_id.size(), " bytes)");
}

}  // namespace

AesGcmCipher::AesGcmCipher(KeyRing keys) : keys_(std::move(keys)), nonces_(nullptr) {
  assert(!keys_.ids().empty());
}

AesGcmCipher::AesGcmCipher(KeyRing keys, core::Random& nonces)
    : keys_(std::move(keys)), nonces_(&nonces) {
  assert(!keys_.ids().empty());
}

absl::StatusOr<core::Sealed> AesGcmCipher::Seal(absl::string_view plaintext,
                                                absl::string_view associated_data) const {
  const std::string& key_id = keys_.current_id();
  const KeyMaterial* key = keys_.Find(key_id);
  assert(key != nullptr);

  std::string nonce(internal::kGcmNonceSize, '\0');
  auto* nonce_bytes = reinterpret_cast<uint8_t*>(nonce.data());
  if (nonces_ != nullptr) {
    nonces_->Fill(absl::MakeSpan(nonce_bytes, nonce.size()));
  } else if (RAND_bytes(nonce_bytes, static_cast<int>(nonce.size())) != 1) {
    // Never fall back to anything weaker: a repeated nonce breaks GCM outright.
    return internal::OpenSslError("RAND_bytes for an AES-256-GCM nonce");
  }

  absl::StatusOr<std::string> ciphertext = internal::Aes256GcmSeal(
      key->Reveal(), nonce, plaintext, internal::EncodeAssociatedData(key_id, associated_data));
  if (!ciphertext.ok()) {
    return absl::InternalError(absl::StrCat("sealing with ", Describe(key_id),
                                            " failed: ", ciphertext.status().message()));
  }
  return core::Sealed{key_id, std::move(nonce), *std::move(ciphertext)};
}

absl::StatusOr<std::string> AesGcmCipher::Open(const core::Sealed& sealed,
                                               absl::string_view associated_data) const {
  const KeyMaterial* key = keys_.Find(sealed.key_id);
  if (key == nullptr) {
    return absl::DataLossError(absl::StrCat("sealed with ", Describe(sealed.key_id),
                                            ", which is not among the configured keys (",
                                            absl::StrJoin(keys_.ids(), ", "), ")"));
  }
  if (sealed.nonce.size() != internal::kGcmNonceSize) {
    return absl::DataLossError(absl::StrCat("value sealed with ", Describe(sealed.key_id),
                                            " has a ", sealed.nonce.size(), "-byte nonce, want ",
                                            internal::kGcmNonceSize));
  }
  absl::StatusOr<std::string> plaintext =
      internal::Aes256GcmOpen(key->Reveal(), sealed.nonce, sealed.ciphertext,
                              internal::EncodeAssociatedData(sealed.key_id, associated_data));
  if (absl::IsDataLoss(plaintext.status())) {
    return absl::DataLossError(absl::StrCat(
        "value sealed with ", Describe(sealed.key_id),
        " does not open: the configured key for that id is not the one that sealed it, or the "
        "ciphertext, nonce or associated data changed"));
  }
  if (!plaintext.ok()) {
    return absl::InternalError(absl::StrCat("opening a value sealed with ", Describe(sealed.key_id),
                                            " failed: ", plaintext.status().message()));
  }
  return plaintext;
}

std::string AesGcmCipher::current_key_id() const { return keys_.current_id(); }

std::vector<std::string> AesGcmCipher::key_ids() const { return keys_.ids(); }

absl::StatusOr<std::string> AesGcmCipher::KeyCheck(absl::string_view key_id) const {
  const KeyMaterial* key = keys_.Find(key_id);
  if (key == nullptr) {
    return absl::NotFoundError(absl::StrCat("no ", Describe(key_id), " among the configured keys"));
  }
  // A MAC of a constant rather than, say, a hash of the key: it is keyed, so it says nothing
  // about the key to someone without it, and the label keeps it apart from any other use of
  // the same key.
  unsigned char mac[EVP_MAX_MD_SIZE];
  unsigned int mac_size = 0;
  const absl::string_view raw = key->Reveal();
  if (HMAC(EVP_sha256(), raw.data(), static_cast<int>(raw.size()), internal::Bytes(kKeyCheckLabel),
           kKeyCheckLabel.size(), mac, &mac_size) == nullptr ||
      mac_size < kKeyCheckSize) {
    return internal::OpenSslError("HMAC-SHA-256 key check");
  }
  return absl::BytesToHexString(
      absl::string_view(reinterpret_cast<const char*>(mac), kKeyCheckSize));
}

}  // namespace tb::crypto
