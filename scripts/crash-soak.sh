#!/usr/bin/env bash
# Crash-safety soak: tests/python/durability_test.py's CrashSafetyTest alone, with many more
# rounds than CI's 50: kill -9 token-broker at random moments while 2-second tokens refresh
# against the fake provider, restart it on the same SQLite files, and check that no connection
# is ever lost except as ROTATION_LOST. Prints how many kills fell in each case and how many
# connections were lost.
#
# usage: ROUNDS=500 bash scripts/crash-soak.sh [BUILD_DIR]    (default: build/release, built)
# TB_CRASH_SEED=N repeats a run's kill moments. The logs and recorded secrets go to a temporary
# folder, kept (and named) when the soak fails, removed when it passes.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=$(realpath "${1:-$root/build/release}")
rounds=${ROUNDS:-500}
broker=$build/server/src/token-broker
fake=$build/tests/fake_provider/fake_provider
stubs=$build/tests/python/gen
for f in "$broker" "$fake" "$stubs/tokenbroker/v1/token_broker_pb2.py"; do
  if [[ ! -e $f ]]; then
    echo "crash-soak: $f is missing: build first (bash scripts/build.sh release)" >&2
    exit 1
  fi
done

logs=$(mktemp -d /tmp/tb-crash-soak-XXXXXX)
status=0
# Debian's python3-grpcio and python3-protobuf live under /usr/bin/python3.
TB_TEST_LOG_DIR=$logs PYTHONPATH=$stubs /usr/bin/python3 "$root/tests/python/durability_test.py" \
  "$broker" "$fake" --rounds="$rounds" CrashSafetyTest || status=$?
if [[ $status -eq 0 ]]; then
  rm -rf "$logs"
else
  echo "crash-soak: FAILED; logs of every broker run and the fake provider: $logs" >&2
fi
exit "$status"
