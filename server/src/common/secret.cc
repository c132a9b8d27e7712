#include "server/src/common/secret.h"

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/rand.h>

#include <atomic>
#include <cstdlib>
#include <memory>
#include <string>

#include "absl/strings/escaping.h"

namespace tb {

namespace {

// The key, behind an atomic pointer: set once at start (or made at first use), then only read.
std::atomic<const std::string*> g_key{nullptr};

const std::string& Key() {
  const std::string* k = g_key.load(std::memory_order_acquire);
  if (k != nullptr) {
    return *k;
  }
  auto fresh = std::make_unique<std::string>(32, '\0');
  if (RAND_bytes(reinterpret_cast<unsigned char*>(fresh->data()), 32) != 1) {
    std::abort();  // no randomness: nothing secret can be handled safely
  }
  const std::string* expected = nullptr;
  if (g_key.compare_exchange_strong(expected, fresh.get(), std::memory_order_acq_rel)) {
    return *fresh.release();  // lives for the process
  }
  return *expected;
}

}  // namespace

namespace internal {
void Cleanse(void* p, size_t n) {
  if (p != nullptr && n > 0) {
    OPENSSL_cleanse(p, n);
  }
}
}  // namespace internal

void SetFingerprintKey(absl::string_view key) {
  // The previous key (if any) is leaked on purpose: another thread may still be using it.
  g_key.store(new std::string(key), std::memory_order_release);
}

std::string Fingerprint(absl::string_view value) {
  const std::string& key = Key();
  unsigned char digest[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  if (HMAC(EVP_sha256(), key.data(), static_cast<int>(key.size()),
           reinterpret_cast<const unsigned char*>(value.data()), value.size(), digest,
           &len) == nullptr ||
      len < 4) {
    return "????????";
  }
  return absl::BytesToHexString(absl::string_view(reinterpret_cast<const char*>(digest), 4));
}

}  // namespace tb
