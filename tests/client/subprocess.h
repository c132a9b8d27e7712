#ifndef TB_TESTS_CLIENT_SUBPROCESS_H_
#define TB_TESTS_CLIENT_SUBPROCESS_H_

// Child processes for tests that drive real binaries (seeded_broker, tokenctl).

#include <sys/types.h>

#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"

namespace tb::testing {

// How a finished process ended and what it wrote.
struct RunResult {
  int exit_code = -1;  // the exit status, or 128 + signal number if a signal ended it
  std::string out;     // everything written to stdout
  std::string err;     // everything written to stderr
};

// Runs `argv` (argv[0] is a path) with stdin from /dev/null and the current environment,
// collects stdout and stderr, and waits for it to exit. After `timeout` the child is killed
// (its exit_code then says SIGKILL). Errors: INTERNAL (it could not be started).
absl::StatusOr<RunResult> RunToCompletion(const std::vector<std::string>& argv,
                                          absl::Duration timeout);

// A long-running child with a pipe to its stdin and one from its stdout; stderr is inherited, so
// its complaints show in the test's output. Destruction stops and reaps it (Stop), so no child
// outlives a failed assertion. Confined to one thread.
class ChildProcess {
 public:
  // Errors: INTERNAL (it could not be started).
  static absl::StatusOr<std::unique_ptr<ChildProcess>> Start(const std::vector<std::string>& argv);

  ChildProcess(const ChildProcess&) = delete;
  ChildProcess& operator=(const ChildProcess&) = delete;
  ~ChildProcess();

  // The next line of the child's stdout, without its '\n'.
  // Errors: DEADLINE_EXCEEDED (no full line within `timeout`), OUT_OF_RANGE (stdout closed),
  // INTERNAL.
  absl::StatusOr<std::string> ReadLine(absl::Duration timeout);

  // Closes the child's stdin, sends SIGTERM, waits up to `grace` for it to exit, then kills it.
  // Returns its exit code as in RunResult. Idempotent: later calls return the same code.
  int Stop(absl::Duration grace = absl::Seconds(10));

  pid_t pid() const { return pid_; }

 private:
  ChildProcess(pid_t pid, int stdin_fd, int stdout_fd)
      : pid_(pid), stdin_fd_(stdin_fd), stdout_fd_(stdout_fd) {}

  pid_t pid_;
  int stdin_fd_;   // write end of the child's stdin; -1 once closed
  int stdout_fd_;  // read end of the child's stdout; -1 once closed
  std::string buffer_;
  int exit_code_ = -1;
  bool reaped_ = false;
};

}  // namespace tb::testing

#endif  // TB_TESTS_CLIENT_SUBPROCESS_H_
