#ifndef TB_COMMON_ABSL_MUTEX_MODE_H_
#define TB_COMMON_ABSL_MUTEX_MODE_H_

#include "absl/synchronization/mutex.h"

namespace tb {

// Debian's Abseil is built without NDEBUG, so every absl::Mutex runs its debug-only deadlock
// detection: on each Lock it looks the mutex up in a process-wide lock graph under a global
// spinlock. gRPC takes several absl::Mutexes per call, and under GetToken load that was about a
// tenth of the server's CPU (perf: GraphCycles::GetId and the absl synchronization library).
// The broker and the benchmark binaries turn it off first thing, which is what an NDEBUG build of
// Abseil does by default. None of our own locks is an absl::Mutex (tb::Mutex is std::mutex);
// their order is checked by clang's -Wthread-safety and by the TSan run.
inline void UseReleaseAbslMutexMode() {
  absl::SetMutexDeadlockDetectionMode(absl::OnDeadlockCycle::kIgnore);
}

}  // namespace tb

#endif  // TB_COMMON_ABSL_MUTEX_MODE_H_
