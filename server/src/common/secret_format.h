#ifndef TB_COMMON_SECRET_FORMAT_H_
#define TB_COMMON_SECRET_FORMAT_H_

// fmt (and so spdlog) formatting for tb::Secret: prints the redacted form only. Without this
// header, formatting a Secret with fmt does not compile, so no log call can print one raw.

#include <fmt/format.h>

#include "server/src/common/secret.h"

template <typename Tag>
struct fmt::formatter<tb::Secret<Tag>> : fmt::formatter<std::string_view> {
  template <typename FormatContext>
  auto format(const tb::Secret<Tag>& s, FormatContext& ctx) const {
    const std::string redacted = s.Redacted();
    return fmt::formatter<std::string_view>::format(std::string_view(redacted), ctx);
  }
};

#endif  // TB_COMMON_SECRET_FORMAT_H_
