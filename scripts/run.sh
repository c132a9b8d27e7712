#!/usr/bin/env bash
# The README's first command: install what is missing, build the release binaries, start
# token-broker on its embedded default (every listener on loopback, in-memory store).
# Extra arguments go to token-broker (e.g. --config=FILE).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
bash scripts/build.sh release token-broker tokenctl
echo "run: token-broker starting; try: build/release/client/tokenctl health --target=127.0.0.1:8443"
exec build/release/server/src/token-broker "$@"
