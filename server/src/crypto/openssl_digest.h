#ifndef TB_CRYPTO_OPENSSL_DIGEST_H_
#define TB_CRYPTO_OPENSSL_DIGEST_H_

#include "server/src/core/digest.h"

namespace tb::crypto {

// core::Digest over OpenSSL's one-shot SHA256() and HMAC(). Thread-safe.
class OpenSslDigest final : public core::Digest {
 public:
  std::string Sha256(absl::string_view data) const override;
  std::string HmacSha256(absl::string_view key, absl::string_view data) const override;
};

}  // namespace tb::crypto

#endif  // TB_CRYPTO_OPENSSL_DIGEST_H_
