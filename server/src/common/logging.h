#ifndef TB_COMMON_LOGGING_H_
#define TB_COMMON_LOGGING_H_

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <random>
#include <string>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"

namespace tb {

struct LogOptions {
  std::string level = "info";   // spdlog level name
  std::string format = "text";  // "text" or "json" (one JSON object per line)
  std::string file;             // empty: stderr; else append to this file
};

// Installs the process-wide spdlog logger. Errors: INVALID_ARGUMENT (level/format),
// UNAVAILABLE (file cannot be opened).
//
// Every line written while a thread handles a request (inside a ScopedRequestId, below) carries
// that request's id: in the text format as "request_id=<id> " before the message, in JSON as a
// "request_id" field after "thread". Lines outside any request (startup, background refreshes)
// have neither.
absl::Status InitLogging(const LogOptions& options);

// --- Request ids ------------------------------------------------------------------------------
// A request id ties together the log lines of one HTTP request or gRPC call. The adapters open a
// ScopedRequestId where they start handling one (with the caller's `x-request-id` header or
// metadata when it is well-formed, else a new random id) and carry it into the work they post
// (WithCurrentRequestId). Per thread, nothing shared: no lock, no allocation. Header-only, so
// that adapters which do not link tb_logging can set ids (InitLogging's formatter reads them).

inline constexpr size_t kMaxRequestIdLength = 64;

// True for an id a caller may choose: 1 to 64 characters of [A-Za-z0-9._:-] (a UUID, 16 hex
// digits, "req-42"...). Anything else (spaces, quotes, control characters, longer) could break or
// forge a log line, so it is replaced by a new id.
bool IsWellFormedRequestId(absl::string_view id);

// A new request id: 16 random lowercase hex digits (64 bits from a per-thread generator seeded by
// std::random_device; unique enough to find lines, not a secret).
std::string NewRequestId();

// The calling thread's current request id; "" outside any request. The view is valid until the
// thread's innermost ScopedRequestId ends: copy it (std::string) to keep or carry it.
absl::string_view CurrentRequestId();

// Makes a request id the calling thread's current one for its lifetime; the destructor puts the
// previous one back (scopes nest). Confined to the thread that created it: create and destroy it
// on the same thread, innermost first, as a local variable.
class ScopedRequestId {
 public:
  // A new random id (NewRequestId).
  ScopedRequestId();
  // `from_caller` (an x-request-id header or metadata value, possibly empty) if well-formed,
  // else a new random id.
  explicit ScopedRequestId(absl::string_view from_caller);
  // `id` verbatim, "" meaning none: an id captured with CurrentRequestId() on the thread that
  // posted some work, re-installed by the thread that runs it.
  static ScopedRequestId Resume(absl::string_view id) { return ScopedRequestId(id, kResume); }

  ~ScopedRequestId();
  ScopedRequestId(const ScopedRequestId&) = delete;
  ScopedRequestId& operator=(const ScopedRequestId&) = delete;

 private:
  enum ResumeTag { kResume };
  ScopedRequestId(absl::string_view id, ResumeTag);

  struct Slot {
    uint8_t size = 0;
    char data[kMaxRequestIdLength] = {};
  };
  static Slot& Current();
  static void Set(Slot& slot, absl::string_view id);
  static void SetNew(Slot& slot);
  friend absl::string_view CurrentRequestId();
  friend std::string NewRequestId();

  Slot previous_;
};

// `f` wrapped so that it runs under the request id current now (on the calling thread), on
// whatever thread calls it later: for tasks posted to the work pool and for completion
// callbacks. The wrapper forwards arguments and the result.
template <typename F>
auto WithCurrentRequestId(F f) {
  return [id = std::string(CurrentRequestId()), f = std::move(f)](auto&&... args) mutable {
    const ScopedRequestId scope = ScopedRequestId::Resume(id);
    return f(std::forward<decltype(args)>(args)...);
  };
}

inline ScopedRequestId::Slot& ScopedRequestId::Current() {
  // Constant-initialized, so access needs no guard.
  static thread_local Slot current;
  return current;
}

inline void ScopedRequestId::Set(Slot& slot, absl::string_view id) {
  const size_t n = std::min(id.size(), kMaxRequestIdLength);
  std::memcpy(slot.data, id.data(), n);
  slot.size = static_cast<uint8_t>(n);
}

inline void ScopedRequestId::SetNew(Slot& slot) {
  // splitmix64 over a per-thread counter seeded once from std::random_device.
  static thread_local uint64_t state = [] {
    std::random_device rd;
    return (uint64_t{rd()} << 32) ^ rd();
  }();
  uint64_t z = (state += 0x9e3779b97f4a7c15ULL);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  z ^= z >> 31;
  static constexpr char kHex[] = "0123456789abcdef";
  for (int i = 15; i >= 0; --i) {
    slot.data[i] = kHex[z & 0xf];
    z >>= 4;
  }
  slot.size = 16;
}

inline bool IsWellFormedRequestId(absl::string_view id) {
  if (id.empty() || id.size() > kMaxRequestIdLength) {
    return false;
  }
  return std::all_of(id.begin(), id.end(), [](char c) {
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '.' ||
           c == '_' || c == ':' || c == '-';
  });
}

inline std::string NewRequestId() {
  ScopedRequestId::Slot slot;
  ScopedRequestId::SetNew(slot);
  return std::string(slot.data, slot.size);
}

inline absl::string_view CurrentRequestId() {
  const ScopedRequestId::Slot& slot = ScopedRequestId::Current();
  return absl::string_view(slot.data, slot.size);
}

inline ScopedRequestId::ScopedRequestId() : previous_(Current()) { SetNew(Current()); }

inline ScopedRequestId::ScopedRequestId(absl::string_view from_caller) : previous_(Current()) {
  if (IsWellFormedRequestId(from_caller)) {
    Set(Current(), from_caller);
  } else {
    SetNew(Current());
  }
}

inline ScopedRequestId::ScopedRequestId(absl::string_view id, ResumeTag) : previous_(Current()) {
  Set(Current(), id);
}

inline ScopedRequestId::~ScopedRequestId() { Current() = previous_; }

// Writes one audit event as a JSON line, {"time":...,"audit":"<event>","k":"v",...}, to the same
// destination as the log, whatever the log format and level (audit lines are never filtered);
// inside a request, "request_id" follows "audit".
// Events: connect, reconnect, revoke, needs_reauth, permission_denied, unauthenticated,
// key_rotation... Values must never be secrets (pass Redacted() forms). Thread-safe; before
// InitLogging it writes to stderr.
void Audit(absl::string_view event,
           std::initializer_list<std::pair<absl::string_view, absl::string_view>> fields);

}  // namespace tb

#endif  // TB_COMMON_LOGGING_H_
