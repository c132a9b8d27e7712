#ifndef TB_TESTS_FAKES_FAKE_CLOCK_H_
#define TB_TESTS_FAKES_FAKE_CLOCK_H_

#include "server/src/common/clock.h"
#include "server/src/common/mutex.h"

namespace tb::testing {

// A clock that moves only when told. Thread-safe.
class FakeClock final : public tb::Clock {
 public:
  absl::Time Now() const override {
    MutexLock lock(&mu_);
    return now_;
  }
  void Advance(absl::Duration d) {
    MutexLock lock(&mu_);
    now_ += d;
  }
  void Set(absl::Time t) {
    MutexLock lock(&mu_);
    now_ = t;
  }

 private:
  mutable Mutex mu_;
  absl::Time now_ ABSL_GUARDED_BY(mu_) = absl::FromUnixSeconds(1'700'000'000);
};

}  // namespace tb::testing

#endif  // TB_TESTS_FAKES_FAKE_CLOCK_H_
