#ifndef TB_CRYPTO_OPENSSL_RANDOM_H_
#define TB_CRYPTO_OPENSSL_RANDOM_H_

#include "server/src/core/random.h"

namespace tb::crypto {

// core::Random over OpenSSL's RAND_bytes (the OS CSPRNG, reseeded). Thread-safe.
class OpenSslRandom final : public core::Random {
 public:
  // Aborts if the CSPRNG fails: nothing secure can be done without it.
  void Fill(absl::Span<uint8_t> out) override;
};

}  // namespace tb::crypto

#endif  // TB_CRYPTO_OPENSSL_RANDOM_H_
