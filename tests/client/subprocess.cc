#include "tests/client/subprocess.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <optional>
#include <thread>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

extern char** environ;

namespace tb::testing {

namespace {

// A pipe whose ends are close-on-exec, so that no other child inherits them: a stray copy of a
// child's stdin write end would keep it from ever seeing EOF.
struct Pipe {
  int read = -1;
  int write = -1;
};

absl::StatusOr<Pipe> MakePipe() {
  int fds[2];
  if (pipe2(fds, O_CLOEXEC) != 0) {
    return absl::InternalError(absl::StrCat("pipe2: ", std::strerror(errno)));
  }
  return Pipe{fds[0], fds[1]};
}

void CloseFd(int& fd) {
  if (fd >= 0) {
    close(fd);
    fd = -1;
  }
}

int ExitCodeOf(int wait_status) {
  if (WIFEXITED(wait_status)) {
    return WEXITSTATUS(wait_status);
  }
  if (WIFSIGNALED(wait_status)) {
    return 128 + WTERMSIG(wait_status);
  }
  return -1;
}

int MillisUntil(absl::Time deadline) {
  const absl::Duration left = deadline - absl::Now();
  if (left <= absl::ZeroDuration()) {
    return 0;
  }
  return static_cast<int>(absl::ToInt64Milliseconds(left)) + 1;
}

// Spawns argv with the given fds as its stdin/stdout/stderr (-1: inherit).
absl::StatusOr<pid_t> Spawn(const std::vector<std::string>& argv, int in, int out, int err) {
  if (argv.empty()) {
    return absl::InternalError("empty argv");
  }
  std::vector<char*> c_argv;
  for (const std::string& a : argv) {
    c_argv.push_back(const_cast<char*>(a.c_str()));
  }
  c_argv.push_back(nullptr);
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  const int targets[] = {0, 1, 2};
  const int fds[] = {in, out, err};
  for (int i = 0; i < 3; ++i) {
    if (fds[i] >= 0) {
      posix_spawn_file_actions_adddup2(&actions, fds[i], targets[i]);
    }
  }
  pid_t pid = -1;
  const int rc = posix_spawn(&pid, c_argv[0], &actions, nullptr, c_argv.data(), environ);
  posix_spawn_file_actions_destroy(&actions);
  if (rc != 0) {
    return absl::InternalError(absl::StrCat("posix_spawn ", argv[0], ": ", std::strerror(rc)));
  }
  return pid;
}

// The exit code of `pid` once it has ended, or nullopt if it still runs at `deadline`.
std::optional<int> WaitUntil(pid_t pid, absl::Time deadline) {
  while (true) {
    int wait_status = 0;
    const pid_t r = waitpid(pid, &wait_status, WNOHANG);
    if (r == pid) {
      return ExitCodeOf(wait_status);
    }
    if (r < 0 && errno != EINTR) {
      return -1;  // not our child any more (already reaped): nothing to wait for
    }
    if (absl::Now() >= deadline) {
      return std::nullopt;
    }
    // No portable way to wait for a child with a timeout without a signal handler; a short poll
    // keeps this simple and costs nothing measurable in a test.
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
}

// Waits up to `grace`, then kills `pid` and waits for it.
int ReapWithin(pid_t pid, absl::Duration grace) {
  if (std::optional<int> code = WaitUntil(pid, absl::Now() + grace); code) {
    return *code;
  }
  kill(pid, SIGKILL);
  int wait_status = 0;
  while (waitpid(pid, &wait_status, 0) < 0) {
    if (errno != EINTR) {
      return -1;
    }
  }
  return ExitCodeOf(wait_status);
}

}  // namespace

absl::StatusOr<RunResult> RunToCompletion(const std::vector<std::string>& argv,
                                          absl::Duration timeout) {
  const int dev_null = open("/dev/null", O_RDONLY | O_CLOEXEC);
  if (dev_null < 0) {
    return absl::InternalError(absl::StrCat("open /dev/null: ", std::strerror(errno)));
  }
  absl::StatusOr<Pipe> out = MakePipe();
  absl::StatusOr<Pipe> err = MakePipe();
  int in_fd = dev_null;
  if (!out.ok() || !err.ok()) {
    CloseFd(in_fd);
    return out.ok() ? err.status() : out.status();
  }
  absl::StatusOr<pid_t> pid = Spawn(argv, in_fd, out->write, err->write);
  CloseFd(in_fd);
  CloseFd(out->write);
  CloseFd(err->write);
  if (!pid.ok()) {
    CloseFd(out->read);
    CloseFd(err->read);
    return pid.status();
  }

  // Drain both pipes together: a child that fills one while we block on the other would hang.
  RunResult result;
  const absl::Time deadline = absl::Now() + timeout;
  bool killed = false;
  pollfd fds[2] = {{out->read, POLLIN, 0}, {err->read, POLLIN, 0}};
  std::string* sinks[2] = {&result.out, &result.err};
  while (fds[0].fd >= 0 || fds[1].fd >= 0) {
    const int ready = poll(fds, 2, killed ? 1000 : MillisUntil(deadline));
    if (ready < 0 && errno == EINTR) {
      continue;
    }
    if (ready == 0 && !killed) {
      kill(*pid, SIGKILL);
      killed = true;
      continue;
    }
    if (ready <= 0) {
      break;  // killed and still silent: a grandchild holds the pipe; stop reading
    }
    for (int i = 0; i < 2; ++i) {
      if (fds[i].fd < 0 || fds[i].revents == 0) {
        continue;
      }
      char buf[4096];
      const ssize_t n = read(fds[i].fd, buf, sizeof buf);
      if (n > 0) {
        sinks[i]->append(buf, static_cast<size_t>(n));
      } else if (n == 0 || errno != EINTR) {
        close(fds[i].fd);
        fds[i].fd = -1;
      }
    }
  }
  for (const pollfd& p : fds) {
    if (p.fd >= 0) {
      close(p.fd);
    }
  }
  result.exit_code = ReapWithin(*pid, absl::Seconds(10));
  return result;
}

absl::StatusOr<std::unique_ptr<ChildProcess>> ChildProcess::Start(
    const std::vector<std::string>& argv) {
  absl::StatusOr<Pipe> in = MakePipe();
  if (!in.ok()) {
    return in.status();
  }
  absl::StatusOr<Pipe> out = MakePipe();
  if (!out.ok()) {
    CloseFd(in->read);
    CloseFd(in->write);
    return out.status();
  }
  absl::StatusOr<pid_t> pid = Spawn(argv, in->read, out->write, -1);
  CloseFd(in->read);
  CloseFd(out->write);
  if (!pid.ok()) {
    CloseFd(in->write);
    CloseFd(out->read);
    return pid.status();
  }
  return std::unique_ptr<ChildProcess>(new ChildProcess(*pid, in->write, out->read));
}

ChildProcess::~ChildProcess() {
  Stop();
  CloseFd(stdout_fd_);
}

absl::StatusOr<std::string> ChildProcess::ReadLine(absl::Duration timeout) {
  const absl::Time deadline = absl::Now() + timeout;
  while (true) {
    if (const size_t nl = buffer_.find('\n'); nl != std::string::npos) {
      std::string line = buffer_.substr(0, nl);
      buffer_.erase(0, nl + 1);
      return line;
    }
    if (stdout_fd_ < 0) {
      return absl::OutOfRangeError("the child's stdout is closed");
    }
    pollfd p = {stdout_fd_, POLLIN, 0};
    const int ready = poll(&p, 1, MillisUntil(deadline));
    if (ready < 0 && errno == EINTR) {
      continue;
    }
    if (ready < 0) {
      return absl::InternalError(absl::StrCat("poll: ", std::strerror(errno)));
    }
    if (ready == 0) {
      return absl::DeadlineExceededError(
          absl::StrCat("no line from pid ", pid_, " within ", absl::FormatDuration(timeout)));
    }
    char buf[4096];
    const ssize_t n = read(stdout_fd_, buf, sizeof buf);
    if (n > 0) {
      buffer_.append(buf, static_cast<size_t>(n));
    } else if (n == 0 || errno != EINTR) {
      CloseFd(stdout_fd_);
    }
  }
}

int ChildProcess::Stop(absl::Duration grace) {
  if (reaped_) {
    return exit_code_;
  }
  // Closing stdin alone stops seeded_broker; SIGTERM covers children that ignore stdin.
  CloseFd(stdin_fd_);
  kill(pid_, SIGTERM);
  exit_code_ = ReapWithin(pid_, grace);
  reaped_ = true;
  return exit_code_;
}

}  // namespace tb::testing
