#ifndef TB_COMMON_CLOCK_H_
#define TB_COMMON_CLOCK_H_

#include "absl/time/clock.h"
#include "absl/time/time.h"

namespace tb {

// The source of "now". Injected everywhere so that tests drive time. Thread-safe.
class Clock {
 public:
  virtual ~Clock() = default;
  virtual absl::Time Now() const = 0;
};

// Wall clock. Thread-safe.
class SystemClock final : public Clock {
 public:
  absl::Time Now() const override { return absl::Now(); }
};

}  // namespace tb

#endif  // TB_COMMON_CLOCK_H_
