#!/usr/bin/env bash
# A throwaway PostgreSQL 15 for the tests (the house rule: tests talk to a real PostgreSQL and
# fail, never skip, when it is missing). The cluster lives in a temporary folder, listens on
# 127.0.0.1 only at a free port (its unix socket inside the folder), trusts loopback and the
# socket only, runs as an unprivileged user, and keeps fsync on, since the tests exercise
# durability.
#
# usage: postgres.sh start     start it (if not running yet) and print its environment
#        postgres.sh env       print `export TB_TEST_POSTGRES_URL=postgresql://...`
#        postgres.sh restart   restart the server on the same folder and port (tests of
#                              reconnection use this on a private instance, see TB_PG_DIR)
#        postgres.sh pause     stop the server but keep the folder: `start` brings the same
#                              cluster back on the same port (tests of an outage use this)
#        postgres.sh stop      stop it and remove the folder (nothing to do if not running)
#
#   eval "$(bash scripts/postgres.sh start)"
#
# As root (CI), initdb refuses to run, so the server runs as the system user `tbpg`, created
# with useradd when missing. As a normal user it runs as that user.
# The folder is ${TB_PG_DIR:-$TMPDIR/token-broker-pg.<uid>.<hash of this checkout>}: one
# instance per checkout and user, shared by whoever runs tests there (each test creates its own
# database). Setting TB_PG_DIR gives a separate instance.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd -P)
bin=/usr/lib/postgresql/15/bin
role=tbtest   # the superuser the tests connect as
pg_user=tbpg  # the system user the server runs as when we are root

checkout_hash=$(printf '%s' "$repo" | sha256sum | cut -c1-12)
dir=${TB_PG_DIR:-${TMPDIR:-/tmp}/token-broker-pg.$(id -u).$checkout_hash}
data=$dir/data

die() {
  echo "postgres.sh: $*" >&2
  exit 1
}
log() { echo "postgres.sh: $*" >&2; }

[[ -x $bin/initdb && -x $bin/pg_ctl ]] ||
  die "PostgreSQL 15 is not installed ($bin/initdb); run: bash scripts/install-deps.sh"

# Runs a command as the server's user, from the instance folder (root's home is not readable).
if [[ $(id -u) -eq 0 ]]; then
  as_pg() {
    if command -v runuser >/dev/null; then
      (cd "$dir" && runuser -u "$pg_user" -- "$@")
    else
      (cd "$dir" && setpriv --reuid="$pg_user" --regid="$pg_user" --init-groups -- "$@")
    fi
  }
else
  as_pg() { (cd "$dir" && "$@"); }
fi

ensure_pg_user() {
  [[ $(id -u) -eq 0 ]] || return 0
  if ! id -u "$pg_user" >/dev/null 2>&1; then
    useradd --system --user-group --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin "$pg_user"
  fi
}

# The folder must be ours (or, as root, the server user's) and not a symlink: it is in /tmp.
check_dir_owner() {
  [[ -L $dir ]] && die "$dir is a symlink; refusing to use it"
  local want owner
  want=$(id -un)
  [[ $(id -u) -eq 0 ]] && want=$pg_user
  owner=$(stat -c %U "$dir")
  [[ $owner == "$want" ]] || die "$dir belongs to $owner, not $want; remove it or set TB_PG_DIR"
}

running() {
  [[ -d $data ]] || return 1
  check_dir_owner
  as_pg "$bin/pg_ctl" -D "$data" status >/dev/null 2>&1
}

print_env() {
  local port
  port=$(cat "$dir/port")
  echo "export TB_TEST_POSTGRES_URL=postgresql://$role@127.0.0.1:$port/postgres"
}

# A port nothing listens on yet, outside Linux's ephemeral range (32768-60999) so that outgoing
# connections do not take it in the meantime. Start retries with another one if it is taken.
pick_port() {
  local port
  for _ in $(seq 50); do
    port=$((15000 + RANDOM % 17000))
    if ! (: <"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      echo "$port"
      return 0
    fi
  done
  die "found no free port"
}

init_cluster() {
  rm -rf "$dir"
  mkdir -m 700 "$dir"
  if [[ $(id -u) -eq 0 ]]; then
    chown "$pg_user:$pg_user" "$dir"
  fi
  as_pg "$bin/initdb" -D "$data" -U "$role" --auth=trust --encoding=UTF8 --locale=C.UTF-8 \
    >"$dir/initdb.log" 2>&1 || {
    cat "$dir/initdb.log" >&2
    die "initdb failed"
  }
  # Loopback and the socket (inside a 0700 folder) only.
  as_pg tee "$data/pg_hba.conf" >/dev/null <<HBA
# token-broker test cluster: trust on loopback only
local all all              trust
host  all all 127.0.0.1/32 trust
HBA
}

write_conf() {
  as_pg tee "$data/postgresql.auto.conf" >/dev/null <<CONF
# written by scripts/postgres.sh
listen_addresses = '127.0.0.1'
port = $1
unix_socket_directories = '$dir'
fsync = on
synchronous_commit = on
full_page_writes = on
max_connections = 300
log_min_messages = warning
log_connections = off
CONF
}

start() {
  ensure_pg_user
  if [[ -d $dir ]] && running; then
    print_env
    return 0
  fi
  # A paused cluster comes back as it was, on its port.
  if [[ -d $data && -s $dir/port ]] &&
    as_pg "$bin/pg_ctl" -D "$data" -l "$dir/postgres.log" -w -t 60 start >/dev/null 2>&1 9>&-; then
    log "PostgreSQL 15 resumed on 127.0.0.1:$(cat "$dir/port")"
    print_env
    return 0
  fi
  log "initializing a PostgreSQL 15 cluster in $dir"
  init_cluster
  local port
  for _ in 1 2 3 4 5; do
    port=$(pick_port)
    write_conf "$port"
    # 9>&-: the server must not inherit (and hold forever) the lock below.
    if as_pg "$bin/pg_ctl" -D "$data" -l "$dir/postgres.log" -w -t 60 start >/dev/null 2>&1 9>&-; then
      echo "$port" >"$dir/port"
      log "PostgreSQL 15 listening on 127.0.0.1:$port (role $role, socket in $dir)"
      print_env
      return 0
    fi
    if ! grep -q -e 'could not bind' -e 'could not create any TCP/IP sockets' \
      "$dir/postgres.log" 2>/dev/null; then
      cat "$dir/postgres.log" >&2 || true
      die "the server did not start"
    fi
    log "port $port is taken, trying another"
  done
  die "the server did not start (no free port)"
}

stop() {
  [[ -d $dir ]] || return 0
  if running; then
    as_pg "$bin/pg_ctl" -D "$data" -m fast -w -t 60 stop >/dev/null
  fi
  rm -rf "$dir"
  log "stopped and removed $dir"
}

cmd=${1:-}
case $cmd in
  start | stop | restart | pause | env) ;;
  *) die "usage: postgres.sh start|stop|env|restart|pause" ;;
esac

# One command at a time per instance: two concurrent starts must not both initdb.
exec 9>"$dir.lock"
flock 9

case $cmd in
  start) start ;;
  stop) stop ;;
  env)
    running || die "not running; start it with: eval \"\$(bash scripts/postgres.sh start)\""
    print_env
    ;;
  pause)
    if running; then
      as_pg "$bin/pg_ctl" -D "$data" -m fast -w -t 60 stop >/dev/null
    fi
    ;;
  restart)
    running || die "not running; start it with: eval \"\$(bash scripts/postgres.sh start)\""
    as_pg "$bin/pg_ctl" -D "$data" -l "$dir/postgres.log" -m fast -w -t 60 restart >/dev/null 9>&-
    ;;
esac
