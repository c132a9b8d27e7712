#include "server/src/crypto/openssl_digest.h"

#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/sha.h>

#include <cstdlib>

namespace tb::crypto {

std::string OpenSslDigest::Sha256(absl::string_view data) const {
  std::string out(SHA256_DIGEST_LENGTH, '\0');
  SHA256(reinterpret_cast<const unsigned char*>(data.data()), data.size(),
         reinterpret_cast<unsigned char*>(out.data()));
  return out;
}

std::string OpenSslDigest::HmacSha256(absl::string_view key, absl::string_view data) const {
  std::string out(EVP_MAX_MD_SIZE, '\0');
  unsigned int len = 0;
  if (HMAC(EVP_sha256(), key.data(), static_cast<int>(key.size()),
           reinterpret_cast<const unsigned char*>(data.data()), data.size(),
           reinterpret_cast<unsigned char*>(out.data()), &len) == nullptr) {
    std::abort();  // only on allocation failure; nothing sensible to return
  }
  out.resize(len);
  return out;
}

}  // namespace tb::crypto
