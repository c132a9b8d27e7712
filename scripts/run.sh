#!/usr/bin/env bash
# The README's first command: install what is missing, build the release binaries, and start
# the development setup (scripts/dev-up.sh): a local OAuth provider that behaves like Zendesk
# and token-broker configured for it, printing a connect link to open in a browser. With
# ZENDESK_SUBDOMAIN, ZENDESK_CLIENT_ID and ZENDESK_CLIENT_SECRET set it talks to Zendesk instead.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
bash scripts/build.sh release token-broker tokenctl fake_provider
exec bash scripts/dev-up.sh build/release .run
