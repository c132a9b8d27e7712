#!/usr/bin/env bash
# Starts the development setup from an existing build: the development OAuth provider (the
# tests' fake provider, behaving like Zendesk, on https://127.0.0.1:$DEV_PROVIDER_PORT with its
# own test CA) and token-broker configured for it, then mints and prints a connect link.
# With ZENDESK_SUBDOMAIN, ZENDESK_CLIENT_ID and ZENDESK_CLIENT_SECRET set, it configures the real
# Zendesk instead and starts no development provider (register the printed redirect URL with
# your Zendesk OAuth client).
#
# usage: dev-up.sh BUILD_DIR RUN_DIR     (scripts/run.sh calls it after building)
# Ports come from DEV_GRPC_PORT (8443), DEV_PROBE_PORT (8081), DEV_PUBLIC_PORT (8080),
# DEV_ADMIN_PORT (9090), DEV_PROVIDER_PORT (8444). Runs in the foreground; Ctrl-C stops both.
set -euo pipefail
build=$(realpath "${1:?usage: dev-up.sh BUILD_DIR RUN_DIR}")
run=${2:?usage: dev-up.sh BUILD_DIR RUN_DIR}
mkdir -p "$run"
run=$(realpath "$run")
grpc_port=${DEV_GRPC_PORT:-8443}
probe_port=${DEV_PROBE_PORT:-8081}
public_port=${DEV_PUBLIC_PORT:-8080}
admin_port=${DEV_ADMIN_PORT:-9090}
provider_port=${DEV_PROVIDER_PORT:-8444}
broker=$build/server/src/token-broker
tokenctl=$build/client/tokenctl
provider_bin=$build/tests/fake_provider/fake_provider

umask 077
# Development secrets, generated once per run directory (never committed).
[[ -s $run/link-key ]] || head -c 48 /dev/urandom | base64 -w0 >"$run/link-key"
# The store's encryption key ring: "<key-id> <base64 of 32 bytes>" per line, the newest last.
[[ -s $run/store-keys ]] || echo "dev-1 $(head -c 32 /dev/urandom | base64 -w0)" >"$run/store-keys"

pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT
trap 'exit 0' INT TERM

cat >"$run/config.yaml" <<YAML
# Development only: no TLS and no caller authentication on the (loopback) gRPC port, so that
# tokenctl needs no credentials. Production configures grpc.tls and auth.callers instead.
grpc: {listen: "127.0.0.1:$grpc_port", probe_listen: "127.0.0.1:$probe_port", insecure: true}
http: {public_listen: "127.0.0.1:$public_port", admin_listen: "127.0.0.1:$admin_port"}
public_base_url: "http://127.0.0.1:$public_port"
links: {signing_key_file: "$run/link-key"}
store: {url: "sqlite://$run/tokens.db", encryption_keys_file: "$run/store-keys"}
providers:
YAML

if [[ -n ${ZENDESK_SUBDOMAIN:-} && -n ${ZENDESK_CLIENT_ID:-} && -n ${ZENDESK_CLIENT_SECRET:-} ]]; then
  provider=zendesk
  connection=${ZENDESK_SUBDOMAIN}
  params="subdomain=${ZENDESK_SUBDOMAIN}"
  cat >>"$run/config.yaml" <<YAML
  zendesk:
    preset: zendesk
    client_id: "$ZENDESK_CLIENT_ID"
    client_secret_env: ZENDESK_CLIENT_SECRET
YAML
else
  provider=dev-zendesk
  connection=dev-acme
  params="subdomain=acme"
  [[ -s $run/dev-client-secret ]] || head -c 24 /dev/urandom | base64 -w0 >"$run/dev-client-secret"
  "$provider_bin" --port="$provider_port" --ca_file="$run/dev-provider-ca.pem" \
    --client_id=token-broker-dev --client_secret_file="$run/dev-client-secret" \
    >"$run/dev-provider.log" 2>&1 &
  pids+=($!)
  for _ in $(seq 100); do [[ -s $run/dev-provider-ca.pem ]] && break; sleep 0.1; done
  base="https://127.0.0.1:$provider_port"
  cat >>"$run/config.yaml" <<YAML
  dev-zendesk:
    preset: zendesk
    client_id: token-broker-dev
    client_secret_file: "$run/dev-client-secret"
    authorize_url: "$base/oauth/authorizations/new"
    token_url: "$base/oauth/tokens"
    token_info_url: "$base/api/v2/oauth/tokens/current.json"
    revoke_url: "$base/api/v2/oauth/tokens/{token_id}.json"
    ca_file: "$run/dev-provider-ca.pem"
YAML
fi

"$broker" --config="$run/config.yaml" &
pids+=($!)
for _ in $(seq 300); do
  if "$tokenctl" --target="127.0.0.1:$grpc_port" --timeout=1s health >/dev/null 2>&1; then break; fi
  if ! kill -0 "${pids[-1]}" 2>/dev/null; then echo "dev-up: token-broker exited" >&2; exit 1; fi
  sleep 0.1
done

reconnect=()
if "$tokenctl" --target="127.0.0.1:$grpc_port" show "$connection" 2>/dev/null | grep -q 'status: ACTIVE'; then
  reconnect=(--reconnect)
fi
link=$("$tokenctl" --target="127.0.0.1:$grpc_port" link "$connection" --provider="$provider" \
  --params="$params" "${reconnect[@]}" 2>/dev/null)
cat <<MSG

token-broker is running (gRPC 127.0.0.1:$grpc_port, admin http://127.0.0.1:$admin_port/readyz).
Open this connect link in a browser and approve:

  connect link: $link

MSG
if [[ $provider == dev-zendesk ]]; then
  echo "  (the development provider uses a self-signed test certificate: accept the browser's warning)"
fi
cat <<MSG
Then:  $tokenctl --target=127.0.0.1:$grpc_port get $connection
Ctrl-C stops everything.
MSG
wait -n "${pids[@]}"
