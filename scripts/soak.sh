#!/usr/bin/env bash
# Soak (issue 7): tests/python/soak_test.py with the full numbers: CONNECTIONS connections with
# LIFETIME-second tokens, refreshed continuously against the fake provider, under GetToken load
# with min_ttl MIN_TTL, for DURATION seconds. Prints errors (must be 0), tokens served inside
# their min_ttl, i.e. that did not live min_ttl more at the provider (must be 0), refresh tokens
# presented twice (must be 0), and the broker's RSS at the start and the end; exits non-zero
# when a must-be-0 is not. CI runs a 30-second version with 100 connections (ctest
# python_soak_test).
#
# usage: bash scripts/soak.sh [BUILD_DIR]          (default: build/release, built)
#   CONNECTIONS=1000 DURATION=600 LIFETIME=5 MIN_TTL=1 THREADS=8 (the defaults)
# The logs and recorded secrets go to a temporary folder, kept (and named) when the soak fails,
# removed when it passes.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=$(realpath "${1:-$root/build/release}")
broker=$build/server/src/token-broker
fake=$build/tests/fake_provider/fake_provider
stubs=$build/tests/python/gen
for f in "$broker" "$fake" "$stubs/tokenbroker/v1/token_broker_pb2.py"; do
  if [[ ! -e $f ]]; then
    echo "soak: $f is missing: build first (bash scripts/build.sh release)" >&2
    exit 1
  fi
done

logs=$(mktemp -d /tmp/tb-soak-XXXXXX)
status=0
# Debian's python3-grpcio and python3-protobuf live under /usr/bin/python3.
TB_TEST_LOG_DIR=$logs PYTHONPATH=$stubs /usr/bin/python3 "$root/tests/python/soak_test.py" \
  "$broker" "$fake" --connections="${CONNECTIONS:-1000}" --seconds="${DURATION:-600}" \
  --lifetime="${LIFETIME:-5}" --min_ttl="${MIN_TTL:-1}" --threads="${THREADS:-8}" || status=$?
if [[ $status -eq 0 ]]; then
  rm -rf "$logs"
else
  echo "soak: FAILED; logs of the broker and the fake provider: $logs" >&2
fi
exit "$status"
