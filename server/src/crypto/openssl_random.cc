#include "server/src/crypto/openssl_random.h"

#include <openssl/rand.h>

#include <cstdlib>

namespace tb::crypto {

void OpenSslRandom::Fill(absl::Span<uint8_t> out) {
  if (out.empty()) {
    return;
  }
  if (RAND_bytes(out.data(), static_cast<int>(out.size())) != 1) {
    std::abort();
  }
}

}  // namespace tb::crypto
