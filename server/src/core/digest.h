#ifndef TB_CORE_DIGEST_H_
#define TB_CORE_DIGEST_H_

#include <string>

#include "absl/strings/string_view.h"

namespace tb::core {

// SHA-256 and HMAC-SHA-256, raw 32-byte outputs. crypto/ implements it with OpenSSL; the core
// uses it for PKCE challenges and link signatures. Thread-safe.
class Digest {
 public:
  virtual ~Digest() = default;
  virtual std::string Sha256(absl::string_view data) const = 0;
  virtual std::string HmacSha256(absl::string_view key, absl::string_view data) const = 0;
};

}  // namespace tb::core

#endif  // TB_CORE_DIGEST_H_
