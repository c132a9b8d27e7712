#include "server/src/common/secret.h"

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/rand.h>

#include <atomic>
#include <cstdlib>
#include <deque>
#include <string>

#include "absl/strings/escaping.h"
#include "server/src/common/mutex.h"

namespace tb {

namespace {

// The key, behind an atomic pointer: set once at start (or made at first use), then only read.
// Every key ever made stays in `Keys()` for the life of the process, because another thread may
// still be using an older one; keeping them reachable (not leaked) keeps LeakSanitizer quiet.
std::atomic<const std::string*> g_key{nullptr};

struct KeyStore {
  Mutex mu;
  std::deque<std::string> keys ABSL_GUARDED_BY(mu);  // elements never move on push_back
};

KeyStore& Keys() {
  static auto* store = new KeyStore();
  return *store;
}

const std::string* Install(std::string key, bool only_if_unset) {
  KeyStore& store = Keys();
  MutexLock lock(&store.mu);
  if (only_if_unset) {
    if (const std::string* k = g_key.load(std::memory_order_acquire); k != nullptr) {
      return k;
    }
  }
  store.keys.push_back(std::move(key));
  const std::string* k = &store.keys.back();
  g_key.store(k, std::memory_order_release);
  return k;
}

const std::string& Key() {
  if (const std::string* k = g_key.load(std::memory_order_acquire); k != nullptr) {
    return *k;
  }
  std::string fresh(32, '\0');
  if (RAND_bytes(reinterpret_cast<unsigned char*>(fresh.data()), 32) != 1) {
    std::abort();  // no randomness: nothing secret can be handled safely
  }
  const std::string* k = Install(fresh, /*only_if_unset=*/true);
  OPENSSL_cleanse(fresh.data(), fresh.size());
  return *k;
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
  Install(std::string(key), /*only_if_unset=*/false);
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
