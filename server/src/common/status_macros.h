#ifndef TB_COMMON_STATUS_MACROS_H_
#define TB_COMMON_STATUS_MACROS_H_

// Abseil 20220623 has no ABSL_RETURN_IF_ERROR / ABSL_ASSIGN_OR_RETURN; these two stand in until
// Debian ships an LTS that has them.

#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

#define TB_RETURN_IF_ERROR(expr)                    \
  do {                                              \
    if (absl::Status tb_s_ = (expr); !tb_s_.ok()) { \
      return tb_s_;                                 \
    }                                               \
  } while (false)

#define TB_CONCAT_(a, b) a##b
#define TB_CONCAT(a, b) TB_CONCAT_(a, b)
#define TB_ASSIGN_OR_RETURN(lhs, rexpr) TB_AOR_(TB_CONCAT(tb_or_, __LINE__), lhs, rexpr)
#define TB_AOR_(tmp, lhs, rexpr)    \
  auto tmp = (rexpr);               \
  if (!tmp.ok()) {                  \
    return std::move(tmp).status(); \
  }                                 \
  lhs = *std::move(tmp)

#endif  // TB_COMMON_STATUS_MACROS_H_
