#ifndef TB_CORE_RANDOM_H_
#define TB_CORE_RANDOM_H_

#include <cstdint>
#include <string>

#include "absl/types/span.h"

namespace tb::core {

// Cryptographically secure randomness (state, PKCE verifiers, nonces, jitter). Thread-safe.
// crypto/ implements it with OpenSSL RAND_bytes; tests inject fixed bytes.
class Random {
 public:
  virtual ~Random() = default;
  virtual void Fill(absl::Span<uint8_t> out) = 0;
};

}  // namespace tb::core

#endif  // TB_CORE_RANDOM_H_
