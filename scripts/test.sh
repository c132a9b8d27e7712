#!/usr/bin/env bash
# The README's second command, and what CI runs: install what is missing, build, and run every
# test, on 2 cores within 90 minutes:
#   1. release build, warning-free under -Wall -Wextra -Werror (everything, incl. benchmarks),
#      and a few seconds of each benchmark (scripts/bench.sh smoke: they run, nothing fails)
#   2. the whole suite under AddressSanitizer + UndefinedBehaviorSanitizer
#   3. a clang build with -Wthread-safety -Werror and ThreadSanitizer, running the threaded
#      domain tests (label "domain": no in-process gRPC servers, since Debian's gRPC and Abseil
#      are not instrumented and give false reports)
#   4. the libFuzzer targets of tests/fuzz (scripts/fuzz.sh: a clang tree in build/fuzz), 60 s
#      each on copies of their seed corpora, plus their kept regression inputs
#   5. the deployment check (scripts/deploy-check.sh: image, Helm chart, Kubernetes manifests)
# The tests run against a private PostgreSQL 15 (scripts/postgres.sh), started after the
# dependencies are installed and stopped on exit.
# Prints each phase's time; fails if the whole run passes 75 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."

start=$(date +%s)
limit=$((75 * 60))
phase_start=$start

phase_done() {
  local now
  now=$(date +%s)
  printf '== phase %-28s %4ds (total %4ds)\n' "$1" $((now - phase_start)) $((now - start))
  phase_start=$now
  if ((now - start > limit)); then
    echo "test.sh: FAILED: the run took more than 75 minutes (after phase '$1'); CI allows 90." >&2
    echo "test.sh: make the build or the suite faster before adding more to it." >&2
    exit 1
  fi
}

jobs=$(nproc)

bash scripts/install-deps.sh
phase_done "install dependencies"

# A private PostgreSQL 15 for the store tests (they fail without it), stopped however we exit.
trap 'bash scripts/postgres.sh stop || true' EXIT
pg_env=$(bash scripts/postgres.sh start)  # a separate assignment, so that set -e sees a failure
eval "$pg_env"
export TB_TEST_POSTGRES_URL
phase_done "start postgresql"

bash scripts/build.sh release
phase_done "release build (-Werror)"

# A few seconds of every benchmark of bench/ on the release tree: they run and no call fails
# (no speed is checked here; bench/RESULTS.md has the figures).
bash scripts/bench.sh --build build/release --no-build smoke
phase_done "benchmark smoke"

bash scripts/build.sh asan
phase_done "asan+ubsan build"
export ASAN_OPTIONS=detect_leaks=1:abort_on_error=1:detect_stack_use_after_return=1
export LSAN_OPTIONS=suppressions=$PWD/tests/support/lsan.supp:print_suppressions=0
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
ctest --test-dir build/asan -j"$jobs" --output-on-failure --timeout 600
phase_done "asan+ubsan tests"

bash scripts/build.sh tsan
phase_done "clang thread-safety+tsan build"
export TSAN_OPTIONS=halt_on_error=1:second_deadlock_stack=1:suppressions=$PWD/tests/support/tsan.supp
ctest --test-dir build/tsan -j"$jobs" -L domain --output-on-failure --timeout 600
phase_done "tsan domain tests"

bash scripts/fuzz.sh 60
phase_done "fuzz (4 x 60 s)"

# The container image, the Helm chart and the Kubernetes examples (scripts/deploy-check.sh).
bash scripts/deploy-check.sh
phase_done "deployment check (image, chart)"

echo "test.sh: all phases passed in $(($(date +%s) - start))s"
