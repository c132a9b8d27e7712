#include "server/src/common/secret.h"

#include <openssl/sha.h>

#include "absl/strings/escaping.h"

namespace tb {

std::string Fingerprint(absl::string_view value) {
  unsigned char digest[SHA256_DIGEST_LENGTH];
  SHA256(reinterpret_cast<const unsigned char*>(value.data()), value.size(), digest);
  return absl::BytesToHexString(absl::string_view(reinterpret_cast<const char*>(digest), 4));
}

}  // namespace tb
