#!/usr/bin/python3
"""Issue 5's multi-replica tests: three real token-broker processes on one PostgreSQL database,
against the real fake_provider binary (Zendesk-like, single-use refresh tokens, 2-second tokens).

Both tests first connect 100 accounts through the browser flow: the link minted, /oauth/start
and /oauth/callback each on any replica (all 27 combinations), as a load balancer would route
them; every flow must succeed.

ThreeReplicasTest: then 30 seconds of GetToken round-robin over the three replicas from a few
client threads. The provider must see exactly one refresh per connection per generation (no
refresh token ever presented twice, and its refresh count equals the generations the store
advanced); no GetToken may fail or take longer than a few seconds; every token handed out must
be promised (valid_until not yet passed), the same token and the same valid_until for a
generation on every replica, live at the provider when checked right away (one answer in three,
with current.json), no generation may be refreshed before its valid_until (a token's
expires_at tells when its refresh request was sent), and no replica may hand out a generation
once a newer one has been handed out anywhere.

LeaseHolderKillTest: the same cluster under the same load; a replica is killed with SIGKILL at
a moment it holds refresh leases (read from the database). The survivors must take each of its
connections over once its lease has expired, at most the lease TTL (refresh.provider_timeout
5 s + 2 x 10 s) plus a few seconds after the kill, never before the expiry; keep serving every other connection without an error, lose nothing (no
NEEDS_REAUTH; ROTATION_LOST only for connections whose lease the dead replica held), and the
provider sees no refresh token twice except once per such in-doubt connection.

Usage: /usr/bin/python3 replicas_test.py <token-broker> <fake_provider> [unittest arguments]
       TB_TEST_POSTGRES_URL must name the test server (eval "$(bash scripts/postgres.sh start)");
       without it the tests fail. PYTHONPATH must hold the generated stubs. With
       TB_TEST_LOG_DIR set, every log goes there and secrets are recorded for the end-of-run scan.
       TB_REPLICAS_CONNECTIONS (100) and TB_REPLICAS_SECONDS (30) size the runs.
"""
import base64
import bisect
import collections
import hashlib
import http.client
import http.cookiejar
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import unittest
import urllib.error
import urllib.parse
import urllib.request

import grpc
from tokenbroker.v1 import token_broker_pb2 as pb
from tokenbroker.v1 import token_broker_pb2_grpc as pb_grpc

# The secret recording, port and gRPC error helpers and the fake provider of the durability test.
import durability_test
from durability_test import (NoRedirect, error_reason, free_port, log_dir, new_test_secret,
                             record_secret, seconds)

BROKER = FAKE_PROVIDER = ""
PSQL = shutil.which("psql") or "/usr/lib/postgresql/15/bin/psql"
REPLICAS = 3
CONNECTIONS = int(os.environ.get("TB_REPLICAS_CONNECTIONS", "100"))
LOAD_S = float(os.environ.get("TB_REPLICAS_SECONDS", "30"))
LIFETIME_S = 2            # expires_in of every token
PROVIDER_TIMEOUT_S = 5    # refresh.provider_timeout
LEASE_MARGIN_S = 10       # the refresher's lease_margin (built in)
LEASE_TTL_S = PROVIDER_TIMEOUT_S + 2 * LEASE_MARGIN_S
CLIENT_THREADS = 6
CHECK_EVERY = 3           # one GetToken answer in this many is checked at the provider at once
CLIENT_RPC_TIMEOUT_S = 3
RPC_TIMEOUT_S = 10
START_TIMEOUT_S = 60
# How long after the dead replica's lease expired a survivor may take to refresh: its retry is
# due lease TTL after it found the lease held (which was after the holder took it), a use of the
# connection tries again at most a second apart, and the refresh itself takes a moment.
TAKEOVER_SLACK_S = 8
# A GetToken that waits for another replica's refresh waits for the change feed (LISTEN/NOTIFY,
# polling every 2 s as the fallback); none may take longer than this.
MAX_GET_TOKEN_S = 5


def epoch(ts):
    return ts.seconds + ts.nanos / 1e9


def epoch_us(ts):
    return ts.seconds * 10**6 + ts.nanos // 1000


def percentile(values, p):
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(p / 100 * len(s)))]


# --- PostgreSQL ---------------------------------------------------------------------------------

def server_url():
    url = os.environ.get("TB_TEST_POSTGRES_URL", "")
    if not url:
        raise AssertionError('TB_TEST_POSTGRES_URL is not set: start the test server with '
                             'eval "$(bash scripts/postgres.sh start)" (scripts/test.sh does)')
    return url


def url_with_database(url, name):
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, "/" + name, "", ""))


def psql(url, sql):
    """Rows of one statement, as lists of text columns."""
    proc = subprocess.run([PSQL, "-X", "-q", "-A", "-t", "-F", "\t", "-v", "ON_ERROR_STOP=1",
                           "-d", url, "-c", sql], capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise AssertionError(f"psql failed ({proc.returncode}) on {sql!r}: {proc.stderr}")
    return [line.split("\t") for line in proc.stdout.splitlines() if line]


class TestDatabase:
    """A database of its own on the test server, dropped (WITH FORCE) by drop()."""

    def __init__(self):
        self.server = server_url()
        self.name = f"tb_replicas_{os.getpid()}_{time.time_ns() % 10**9}_{os.urandom(3).hex()}"
        psql(self.server, f"CREATE DATABASE {self.name}")
        self.url = url_with_database(self.server, self.name)

    def query(self, sql):
        return psql(self.url, sql)

    def drop(self):
        psql(self.server, f"DROP DATABASE IF EXISTS {self.name} WITH (FORCE)")


def tcp_ports_of(pid, remote_port):
    """Local ports of the TCP connections process `pid` has open to `remote_port` (its database
    connections): the socket inodes among its file descriptors, looked up in /proc/net/tcp{,6}."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue  # closed meanwhile
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            next(f)
            for line in f:
                fields = line.split()
                if fields[9] in inodes and int(fields[2].rsplit(":", 1)[1], 16) == remote_port:
                    ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


class PsqlSession:
    """One psql process kept open, for queries that must answer within a millisecond or two
    (which replica holds leases right now)."""

    def __init__(self, url, err_path):
        self.err = open(err_path, "w")
        self.proc = subprocess.Popen([PSQL, "-X", "-q", "-A", "-t", "-F", "\t", "-d", url],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.err, text=True, bufsize=1)

    def query(self, sql):
        self.proc.stdin.write(sql.rstrip().rstrip(";") + ";\n\\echo __tb_end__\n")
        self.proc.stdin.flush()
        rows = []
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise AssertionError(f"psql session ended ({self.proc.wait()})")
            line = line.rstrip("\n")
            if line == "__tb_end__":
                return rows
            if line:
                rows.append(line.split("\t"))

    def close(self):
        try:
            self.proc.stdin.close()
            self.proc.wait(10)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()
        self.err.close()


# --- The fake provider ----------------------------------------------------------------------------

class FakeProvider(durability_test.FakeProvider):
    """durability_test's fake provider, with its stats endpoint, recording every code and token
    it issues under a private folder (there are thousands: the test scans its own logs for all
    of them, and hands a sample to the end-of-run scan, whose cost grows with secrets x log
    bytes), plus keep-alive token checks."""

    def __init__(self, directory):
        super().__init__(directory, label="replicas", private_secrets=True, log_level="info")
        self.host, self.port = urllib.parse.urlsplit(self.base).netloc.rsplit(":", 1)

    def connection(self):
        """A keep-alive HTTPS connection of the caller's own (one per thread)."""
        return http.client.HTTPSConnection(self.host, int(self.port), context=self.ssl,
                                           timeout=RPC_TIMEOUT_S)

    def token_info(self, conn, access_token):
        """(HTTP status, token id or None) of GET /api/v2/oauth/tokens/current.json with this
        Bearer token on `conn` (re-opened once if the server closed it): 200 only while the
        token is live."""
        for attempt in range(2):
            try:
                conn.request("GET", "/api/v2/oauth/tokens/current.json",
                             headers={"Authorization": f"Bearer {access_token}"})
                r = conn.getresponse()
                body = r.read()
                token_id = json.loads(body)["token"]["id"] if r.status == 200 else None
                return r.status, token_id
            except (http.client.HTTPException, OSError):
                conn.close()
                if attempt:
                    raise
        raise AssertionError("unreachable")


# --- The brokers ----------------------------------------------------------------------------------

class Broker:
    """One token-broker replica in a child process on ports of its own."""

    def __init__(self, cluster, name):
        self.name = name
        self.ports = {k: free_port() for k in ("grpc", "probe", "public", "admin")}
        stem = os.path.join(log_dir() or cluster.dir,
                            f"token-broker-replicas-{os.getpid()}-{name}-{time.time_ns()}")
        self.log_path = stem + ".log"
        self.stderr = open(stem + "-stderr.log", "wb")
        self.proc = subprocess.Popen(
            [BROKER, f"--config={cluster.config}",
             f"--grpc_listen=127.0.0.1:{self.ports['grpc']}",
             f"--probe_listen=127.0.0.1:{self.ports['probe']}",
             f"--public_listen=127.0.0.1:{self.ports['public']}",
             f"--admin_listen=127.0.0.1:{self.ports['admin']}",
             "--log_level=trace", f"--log_file={self.log_path}"],
            stdout=subprocess.DEVNULL, stderr=self.stderr)
        self.pid = self.proc.pid
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.ports['grpc']}")
        self.tokens = pb_grpc.TokenBrokerStub(self.channel)
        self.admin = pb_grpc.ConnectionAdminStub(self.channel)

    def wait_ready(self):
        deadline = time.monotonic() + START_TIMEOUT_S
        url = f"http://127.0.0.1:{self.ports['admin']}/readyz"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.stderr.flush()
                with open(self.stderr.name, errors="replace") as f:
                    raise RuntimeError(f"token-broker {self.name} exited with "
                                       f"{self.proc.returncode}: {f.read()[-2000:]}")
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200:
                        return self
            except (OSError, urllib.error.HTTPError):
                pass
            time.sleep(0.05)
        raise TimeoutError(f"token-broker {self.name} did not become ready")

    def kill(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def terminate(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def wait(self, timeout=30):
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise

    def close(self):
        self.channel.close()
        if self.proc.poll() is None:
            self.kill()
        self.stderr.close()

    def log_counts(self):
        """Provider refresh calls by outcome in this replica's log (for the report only)."""
        counts = collections.Counter()
        try:
            with open(self.log_path, errors="replace") as f:
                for line in f:
                    m = re.search(r'provider call: provider=\S+ op="refresh" http_status=(\d+)',
                                  line)
                    if m:
                        counts["refresh " + m.group(1)] += 1
                    elif 'provider call failed: provider=' in line and 'op="refresh"' in line:
                        counts["refresh failed"] += 1
                    elif "oauth rotation_lost" in line:
                        counts["rotation_lost"] += 1
                    elif "oauth needs_reauth" in line:
                        counts["needs_reauth"] += 1
        except FileNotFoundError:
            pass
        return counts


class Cluster:
    """One test database, one fake provider, and REPLICAS brokers on that database with the same
    key ring, link signing key and public base URL (the address of a load balancer in front of
    them: the test routes each browser request to the replica it chooses)."""

    def __init__(self, refresh_config):
        self.dir = tempfile.mkdtemp(prefix="tb-replicas-test-")
        self.brokers = []
        self.db = None
        self.fake = None
        try:
            self.db = TestDatabase()
            self.fake = FakeProvider(self.dir)
            self.key_raw = os.urandom(32)
            self.key = base64.b64encode(self.key_raw).decode()
            record_secret(self.key)
            self.keys = os.path.join(self.dir, "keys")
            with open(self.keys, "w") as f:
                f.write(f"k1 {self.key}\n")
            self.link_key = new_test_secret("replicas-link-signing-key")
            self.link_key_file = os.path.join(self.dir, "link-key")
            with open(self.link_key_file, "w") as f:
                f.write(self.link_key)
            self.public_base_url = f"http://127.0.0.1:{free_port()}"
            # One caller, authenticated by an API key (the config holds only its SHA-256).
            self.api_key = base64.urlsafe_b64encode(os.urandom(24)).decode()
            record_secret(self.api_key)
            self.md = [("authorization", f"Bearer {self.api_key}")]
            digest = hashlib.sha256(self.api_key.encode()).hexdigest()
            b = self.fake.base
            self.config = os.path.join(self.dir, "config.yaml")
            with open(self.config, "w") as f:
                f.write(f"""\
store: {{url: "{self.db.url}", encryption_keys_file: "{self.keys}"}}
public_base_url: "{self.public_base_url}"
links: {{signing_key_file: "{self.link_key_file}"}}
http: {{rate_limit_per_minute: 0}}  # every connect flow comes from 127.0.0.1
refresh: {{{refresh_config}}}
auth:
  callers:
    - {{name: tests, api_key_sha256: ["{digest}"], connections: ["*"],
       rpcs: [GetToken, Refresh, Revoke, Admin]}}
providers:
  short:
    preset: generic
    client_id: "{self.fake.client_id}"
    client_secret_file: "{self.fake.secret_file}"
    authorize_url: "{b}/oauth/authorizations/new"
    token_url: "{b}/oauth/tokens"
    revoke_url: "{b}/oauth/revoke"
    ca_file: "{self.fake.ca_file}"
    expires_in: {LIFETIME_S}
""")
            # Started together: their migrations meet under the database's lock.
            self.brokers = [Broker(self, f"r{i}") for i in range(REPLICAS)]
            for broker in self.brokers:
                broker.wait_ready()
        except BaseException:
            self.close()
            raise

    def add_replica(self):
        broker = Broker(self, f"r{len(self.brokers)}")
        self.brokers.append(broker)
        return broker.wait_ready()

    def routed(self, url, broker):
        """`url` (on the public base URL) as the load balancer sends it to `broker`."""
        if not url.startswith(self.public_base_url + "/"):
            raise AssertionError(f"{url} is not on the public base URL {self.public_base_url}")
        return f"http://127.0.0.1:{broker.ports['public']}{url[len(self.public_base_url):]}"

    def connect(self, cid, mint, start, callback):
        """Connects an account as a browser does: the link minted on replica `mint`, opened on
        `start` (which redirects to the provider, which approves at once), the provider's
        redirect followed to `callback` with the binding cookie. Returns the callback page."""
        link = self.brokers[mint].admin.CreateConnectLink(
            pb.CreateConnectLinkRequest(connection_id=cid, provider="short"),
            timeout=RPC_TIMEOUT_S, metadata=self.md)
        for values in urllib.parse.parse_qs(urllib.parse.urlsplit(link.url).query).values():
            for v in values:
                record_secret(v)
        jar = http.cookiejar.CookieJar()
        opener = urllib.request.build_opener(NoRedirect, urllib.request.HTTPCookieProcessor(jar),
                                             urllib.request.HTTPSHandler(context=self.fake.ssl))

        def get(url):
            try:
                with opener.open(url, timeout=RPC_TIMEOUT_S) as r:
                    return r.status, r.headers, r.read().decode()
            except urllib.error.HTTPError as e:
                return e.code, e.headers, e.read().decode()

        status, headers, body = get(self.routed(link.url, self.brokers[start]))
        if status != 302:
            raise AssertionError(f"/oauth/start on r{start} answered {status}: {body}")
        for cookie in jar:
            record_secret(cookie.value)
        authorize = headers["Location"]
        if not authorize.startswith(self.fake.base):
            raise AssertionError(f"/oauth/start redirected to {authorize}")
        status, headers, body = get(authorize)
        if status != 302:
            raise AssertionError(f"the provider's authorize answered {status}: {body}")
        back = headers["Location"]
        for values in urllib.parse.parse_qs(urllib.parse.urlsplit(back).query).values():
            for v in values:
                record_secret(v)  # code and state
        if not back.startswith(f"{self.public_base_url}/oauth/callback?"):
            raise AssertionError(f"the provider redirected to {back}")
        status, _, body = get(self.routed(back, self.brokers[callback]))
        if status != 200:
            raise AssertionError(f"/oauth/callback on r{callback} (started on r{start}) "
                                 f"answered {status}: {body}")
        return body

    def connect_all(self, ids, threads=4):
        """Connects every id, 4 at a time; the replicas minting, starting and completing each
        flow go through all 27 combinations. A flow that fails is recorded and tried once more
        from the link, as its error page tells the admin to (so that the rest of the test
        runs); the caller asserts that none failed. Returns (how many callbacks landed on
        another replica than their start, the failures)."""
        jobs = list(enumerate(ids))
        lock = threading.Lock()
        errors = []
        failed = []
        crossed = [0]

        def worker():
            while True:
                with lock:
                    if not jobs or errors:
                        return
                    n, cid = jobs.pop(0)
                mint, start, callback = n % 3, (n // 3) % 3, (n // 9) % 3
                for attempt in range(2):
                    try:
                        page = self.connect(cid, mint, start, callback)
                        if cid not in page:
                            raise AssertionError(f"the callback page does not name {cid}: {page}")
                        break
                    except Exception as e:
                        with lock:
                            if attempt:
                                errors.append(f"{cid}: {e!r}")
                                return
                            failed.append(f"{cid} (link minted on r{mint}, started on "
                                          f"r{start}, callback on r{callback}) at "
                                          f"{time.time():.3f}: {str(e)[:300]}")
                        time.sleep(0.5)  # the admin opens the link again
                if start != callback:
                    with lock:
                        crossed[0] += 1

        pool = [threading.Thread(target=worker) for _ in range(threads)]
        for t in pool:
            t.start()
        for t in pool:
            t.join()
        if errors:
            raise AssertionError("connecting failed twice: " + "; ".join(errors + failed))
        return crossed[0], failed

    def generations(self):
        """{connection id: (generation, status code, updated_at unix seconds)} from the
        database."""
        return {row[0]: (int(row[1]), int(row[2]), int(row[3]) / 1000) for row in self.db.query(
            "SELECT id, generation, status, updated_at_unix_ms FROM connections ORDER BY id")}

    def list_connections(self, broker):
        out = {}
        token = ""
        while True:
            resp = broker.admin.ListConnections(
                pb.ListConnectionsRequest(page_size=1000, page_token=token), timeout=RPC_TIMEOUT_S,
                metadata=self.md)
            for c in resp.connections:
                out[c.id] = c
            token = resp.next_page_token
            if not token:
                return out

    def stop_all(self, brokers):
        """SIGTERM to each at once, then the exit codes."""
        for b in brokers:
            b.terminate()
        return {b.name: b.wait() for b in brokers}

    def close(self):
        for b in self.brokers:
            b.close()
        if self.fake is not None:
            self.fake.stop()
        if self.db is not None:
            self.db.drop()
        shutil.rmtree(self.dir, ignore_errors=True)


# --- The load -------------------------------------------------------------------------------------

class Load:
    """CLIENT_THREADS threads calling GetToken round-robin over the connections and the live
    replicas, each checking one answer in CHECK_EVERY at the provider at once (current.json on a
    keep-alive connection of its own). Everything observed is kept for analyse()."""

    Obs = collections.namedtuple(
        "Obs", "replica cid generation valid_until_us valid_until valid_for expires_at t_send "
               "t_recv")
    Check = collections.namedtuple("Check", "replica cid generation status token_id t_recv "
                                            "t_done valid_until")
    Error = collections.namedtuple("Error", "replica cid code reason details t_send t_recv")

    def __init__(self, cluster, ids):
        self.cluster = cluster
        self.ids = ids
        self.alive = list(range(len(cluster.brokers)))
        self.killed_at = {}  # replica index -> time.time() of its kill
        self.stop_event = threading.Event()
        self.lock = threading.Lock()
        self.obs = []
        self.checks = []
        self.errors = []
        self.tokens = {}      # (cid, generation) -> access token
        self.failures = []
        self.early = []       # (cid, generation, valid_until, refreshed at) found by analyse()
        self.backoff = {}     # cid -> time before which no thread calls it (after an error)
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True)
                        for i in range(CLIENT_THREADS)]

    def start(self):
        self.started = time.time()
        for t in self.threads:
            t.start()
        return self

    def stop(self):
        self.stop_event.set()
        for t in self.threads:
            t.join(60)
        self.stopped = time.time()

    def kill(self, index, killed_at):
        """Takes a replica out of the rotation (as the load balancer would) as it is killed."""
        with self.lock:
            self.alive = [i for i in self.alive if i != index]
            self.killed_at[index] = killed_at

    def add(self, index):
        with self.lock:
            self.alive = self.alive + [index]

    def _run(self, idx):
        conn = self.cluster.fake.connection()
        brokers = self.cluster.brokers
        n = len(self.ids)
        i = idx * (n // CLIENT_THREADS + 1)
        calls = 0
        obs, checks, errors, tokens = [], [], [], {}
        try:
            while not self.stop_event.is_set():
                i += 1
                cid = self.ids[i % n]
                alive = self.alive
                replica = alive[(i // n + i) % len(alive)]
                if self.backoff.get(cid, 0) > time.time():
                    continue
                t_send = time.time()
                try:
                    resp = brokers[replica].tokens.GetToken(
                        pb.GetTokenRequest(connection_id=cid), timeout=CLIENT_RPC_TIMEOUT_S,
                        metadata=self.cluster.md)
                except grpc.RpcError as err:
                    t_recv = time.time()
                    errors.append(Load.Error(replica, cid, err.code().name, error_reason(err),
                                             err.details(), t_send, t_recv))
                    # A connection that makes callers wait is left alone a little longer.
                    self.backoff[cid] = t_recv + (
                        2.0 if err.code() == grpc.StatusCode.DEADLINE_EXCEEDED else 0.5)
                    continue
                t_recv = time.time()
                tok = resp.token
                obs.append(Load.Obs(replica, cid, tok.generation, epoch_us(tok.valid_until),
                                    epoch(tok.valid_until), seconds(tok.valid_for),
                                    epoch(tok.expires_at), t_send, t_recv))
                key = (cid, tok.generation)
                known = tokens.setdefault(key, tok.access_token)
                if known != tok.access_token:
                    self.failures.append(f"{cid} generation {tok.generation}: two different "
                                         f"access tokens (the second from r{replica})")
                calls += 1
                if calls % CHECK_EVERY == 0:
                    status, token_id = self.cluster.fake.token_info(conn, tok.access_token)
                    checks.append(Load.Check(replica, cid, tok.generation, status, token_id,
                                             t_recv, time.time(), epoch(tok.valid_until)))
        except Exception as e:  # a broken client is a failed test, not a silent thread
            self.failures.append(f"client thread {idx}: {e!r}")
        finally:
            conn.close()
            with self.lock:
                self.obs.extend(obs)
                self.checks.extend(checks)
                self.errors.extend(errors)
                for key, token in tokens.items():
                    known = self.tokens.setdefault(key, token)
                    if known != token:
                        self.failures.append(f"{key[0]} generation {key[1]}: two different "
                                             "access tokens (seen by two client threads)")

    def errors_in_order(self):
        return sorted(self.errors, key=lambda e: e.t_send)

    def analyse(self):
        """(failures, report lines) over everything observed: each answer promised, one token and
        one valid_until per generation on every replica, no generation handed out after a newer
        one had been, every token checked at once live at the provider."""
        failures = list(self.failures)
        report = []
        first_recv = {}
        until = collections.defaultdict(set)
        zero_valid_for = 0
        for o in self.obs:
            if o.valid_for < 0:
                failures.append(f"r{o.replica} handed out {o.cid} generation {o.generation} with "
                                f"valid_for {o.valid_for:.6f} s")
            elif o.valid_for == 0:
                zero_valid_for += 1  # less than a microsecond left (the wire's precision)
            if o.valid_until < o.t_send - 0.001:
                failures.append(f"r{o.replica} handed out {o.cid} generation {o.generation} "
                                f"past its valid_until ({o.t_send - o.valid_until:.3f} s late)")
            key = (o.cid, o.generation)
            first_recv[key] = min(first_recv.get(key, o.t_recv), o.t_recv)
            until[key].add(o.valid_until_us)
        for (cid, gen), values in sorted(until.items()):
            if max(values) - min(values) > 1:
                failures.append(f"{cid} generation {gen}: the replicas announce different "
                                f"valid_until ({sorted(values)} us)")
        # No refresh before the promise ran out: a token's expires_at is its refresh request's
        # send time (read before sending) plus the lifetime, so generation g + 1's refresh was
        # sent at expires_at - lifetime, which must not come before valid_until(g).
        sent = {}
        for o in self.obs:
            sent[(o.cid, o.generation)] = o.expires_at - LIFETIME_S
        early = 0
        for (cid, gen), t in sorted(sent.items()):
            prev = until.get((cid, gen - 1))
            if prev and t < min(prev) / 1e6 - 0.005:
                early += 1
                self.early.append((cid, gen - 1, min(prev) / 1e6, t))
                if early <= 10:
                    failures.append(f"{cid} generation {gen - 1} was refreshed "
                                    f"{min(prev) / 1e6 - t:.3f} s before its valid_until "
                                    f"(generation {gen} requested at {t:.3f})")
        if early > 10:
            failures.append(f"... {early} early refreshes in all")
        # A generation handed out after a newer one had been handed out (by any replica) before
        # the request was even sent: that replica kept serving past the promise.
        newest = collections.defaultdict(list)  # cid -> [(first t_recv, generation)]
        for (cid, gen), t in first_recv.items():
            newest[cid].append((t, gen))
        prefix = {}
        for cid, entries in newest.items():
            entries.sort()
            times, best, m = [], [], 0
            for t, gen in entries:
                m = max(m, gen)
                times.append(t)
                best.append(m)
            prefix[cid] = (times, best)
        stale = 0
        for o in self.obs:
            times, best = prefix[o.cid]
            k = bisect.bisect_left(times, o.t_send) - 1
            if k >= 0 and best[k] > o.generation:
                stale += 1
                if stale <= 10:
                    failures.append(f"r{o.replica} handed out {o.cid} generation {o.generation} "
                                    f"{o.t_send - times[k]:.3f} s after generation {best[k]} had "
                                    "been handed out")
        if stale > 10:
            failures.append(f"... {stale} stale answers in all")
        live = late = 0
        for c in self.checks:
            if c.status == 200:
                live += 1
            elif c.t_done < c.valid_until:
                failures.append(f"r{c.replica} handed out {c.cid} generation {c.generation}, "
                                f"promised until {c.valid_until:.3f}, and the provider answered "
                                f"{c.status} for it at {c.t_done:.3f} (checked at once)")
            else:
                late += 1
        # Report: calls, latencies and how soon each replica served each new generation.
        by_replica = collections.defaultdict(list)
        for o in self.obs:
            by_replica[o.replica].append(o.t_recv - o.t_send)
        first_on = {}
        for o in self.obs:
            k = (o.replica, o.cid, o.generation)
            first_on[k] = min(first_on.get(k, o.t_recv), o.t_recv)
        lag = collections.defaultdict(list)
        for (replica, cid, gen), t in first_on.items():
            lag[replica].append(t - first_recv[(cid, gen)])
        elapsed = max(1e-9, getattr(self, "stopped", time.time()) - self.started)
        report.append(f"GetToken: {len(self.obs)} answers ({len(self.obs) / elapsed:.0f}/s), "
                      f"{len(self.errors)} errors, {zero_valid_for} with valid_for 0, "
                      f"{len(first_recv)} (connection, generation) "
                      f"pairs seen; provider checks: {live} live, {late} checked after the "
                      "promise ran out (not judged)")
        for replica in sorted(by_replica):
            lat = by_replica[replica]
            report.append(f"  r{replica}: {len(lat)} answers, latency p50 "
                          f"{percentile(lat, 50) * 1000:.1f} ms, p99 "
                          f"{percentile(lat, 99) * 1000:.1f} ms, max {max(lat) * 1000:.0f} ms; "
                          f"first served a new generation after the first replica: p50 "
                          f"{percentile(lag[replica], 50) * 1000:.0f} ms, p99 "
                          f"{percentile(lag[replica], 99) * 1000:.0f} ms (sampling included)")
        return failures, report, live


def scan_own_logs(paths, issued):
    """Log files containing any value the provider issued. Tokens and codes are base64url (with
    dots) or hex, so every encoding of them is the raw form: one pass over each log collects
    every 24-character window of such runs, and each issued value's first 24 characters are
    looked up."""
    prefixes = {v[:24]: v for v in issued if len(v) >= 24}
    run = re.compile(r"[A-Za-z0-9_.\-]{24,}")
    hits = []
    for path in paths:
        try:
            with open(path, errors="replace") as f:
                text = f.read()
        except FileNotFoundError:
            continue
        for m in run.finditer(text):
            s = m.group(0)
            for k in range(len(s) - 23):
                v = prefixes.get(s[k:k + 24])
                if v is not None and v in text:
                    hits.append(f"{os.path.basename(path)}: contains a value the provider issued")
                    break
    return sorted(set(hits))


# --- Tests ----------------------------------------------------------------------------------------

class ReplicaTestBase(unittest.TestCase):
    REFRESH = f"provider_timeout: {PROVIDER_TIMEOUT_S}s, retry_delay: 1s"

    def setUp(self):
        self.t0 = time.monotonic()
        self.cluster = Cluster(self.REFRESH)
        self.ids = [f"rep-{i:03d}" for i in range(CONNECTIONS)]
        self.load = None
        self.session = None

    def tearDown(self):
        if self.load is not None:
            self.load.stop_event.set()
            for t in self.load.threads:
                t.join(30)
        if self.session is not None:
            self.session.close()
        self.cluster.close()
        print(f"  ({type(self).__name__} took {time.monotonic() - self.t0:.1f} s)", flush=True)

    def connect(self):
        t = time.monotonic()
        crossed, self.connect_failures = self.cluster.connect_all(self.ids)
        print(f"\n  connected {len(self.ids)} accounts in {time.monotonic() - t:.1f} s "
              f"({crossed} callbacks on another replica than their start; "
              f"{len(self.connect_failures)} flows failed the first time)", flush=True)
        for f in self.connect_failures:
            print(f"  CONNECT FAILED {f}", flush=True)
        self.assertGreater(crossed, 0)
        for b in self.cluster.brokers:
            self.assertEqual(len(self.cluster.list_connections(b)), len(self.ids), b.name)

    def record_sample(self, issued):
        """Hands 200 of the provider's values to the end-of-run scan (the test has scanned its
        own logs for all of them)."""
        for v in random.Random(len(issued)).sample(issued, min(200, len(issued))):
            record_secret(v)

    def refresh_report(self, brokers):
        lines = []
        for b in brokers:
            counts = b.log_counts()
            lines.append(f"  {b.name} (pid {b.pid}): {counts.get('refresh 200', 0)} refreshes; "
                         + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())
                                     if k != "refresh 200"))
        return lines

    def explain(self, stats, errors):
        """Prints what the test knows about each refresh token presented again (the connection
        and generation the provider's token id belongs to, from the checks), each early refresh
        and each error: the connection's answers around it, on every replica."""
        by_token_id = {c.token_id: (c.cid, c.generation) for c in self.load.checks
                       if c.token_id is not None}
        until = {(o.cid, o.generation): o.valid_until for o in self.load.obs}
        windows = [(cid, t - 0.3, valid_until + 0.3)
                   for cid, gen, valid_until, t in self.load.early[:3]]
        reuse_windows = []
        for n, token_id in enumerate(stats["reused_token_ids"]):
            where = by_token_id.get(token_id)
            if n < 12:
                print(f"  REUSE the refresh token of provider token id {token_id}: "
                      f"{'%s generation %d' % where if where else 'not among the checked tokens'}",
                      flush=True)
            if where and where in until:
                reuse_windows.append((where[0], until[where] - 0.3, until[where] + 0.6))
        for e in errors[:10]:
            print(f"  ERROR r{e.replica} {e.cid} {e.code} {e.reason} '{e.details}' "
                  f"sent {e.t_send:.3f}, answered after {(e.t_recv - e.t_send) * 1000:.1f} ms",
                  flush=True)
            if len(windows) < 6:
                windows.append((e.cid, e.t_send - 1.5, e.t_send + 0.3))
        windows += reuse_windows[:2]
        for cid, t_from, t_to in windows[:8]:
            events = [(o.t_send, (o.replica, o.generation),
                       f"r{o.replica} generation {o.generation} (valid_until {o.valid_until:.3f}, "
                       f"requested {o.expires_at - LIFETIME_S:.3f}) in "
                       f"{(o.t_recv - o.t_send) * 1000:.1f} ms")
                      for o in self.load.obs if o.cid == cid and t_from <= o.t_send <= t_to]
            events += [(e.t_send, (e.replica, e.code), f"r{e.replica} {e.code} {e.reason}")
                       for e in errors if e.cid == cid and t_from <= e.t_send <= t_to]
            events += [(c.t_done, ("check", c.t_done),
                        f"provider check of generation {c.generation} from r{c.replica}: "
                        f"{c.status}")
                       for c in self.load.checks
                       if c.cid == cid and t_from <= c.t_done <= t_to and c.status != 200]
            events.sort()
            print(f"  {cid} from {t_from:.3f} to {t_to:.3f} (first answer of each kind per "
                  "replica):", flush=True)
            last = {}
            for t, key, what in events:
                if last.get(key[0]) != key:
                    print(f"    {t:.3f} {what}", flush=True)
                last[key[0]] = key

    def assert_secrets_absent(self):
        issued = self.cluster.fake.issued()
        paths = [b.log_path for b in self.cluster.brokers] + [b.stderr.name
                                                                for b in self.cluster.brokers]
        self.assertEqual(scan_own_logs(paths, issued), [])
        for b in self.cluster.brokers:
            with open(b.log_path, errors="replace") as f:
                text = f.read()
            self.assertNotIn(self.cluster.key, text)
            self.assertNotIn(self.cluster.link_key, text)
            self.assertNotIn(self.cluster.fake.secret, text)
        self.record_sample(issued)
        return len(issued)


class ThreeReplicasTest(ReplicaTestBase):
    def test_three_replicas_one_refresh_per_generation_and_only_live_tokens(self):
        c = self.cluster
        self.connect()
        before = c.generations()
        self.load = Load(c, self.ids).start()
        deadline = time.time() + LOAD_S
        while time.time() < deadline and not self.load.failures:
            time.sleep(0.5)  # the run's length; nothing waits on this
        self.load.stop()
        after_load = c.generations()
        statuses = {b.name: {cid: conn.status for cid, conn in c.list_connections(b).items()}
                    for b in c.brokers}
        codes = c.stop_all(c.brokers)
        final = c.generations()
        stats = c.fake.stats()

        failures, report, live = self.load.analyse()
        refresh_calls = stats["calls"]["token_refresh"]
        reuse = stats["refresh_token_reuse_attempts"]
        advanced = sum(g - 1 for g, _, _ in final.values())
        during = {cid: after_load[cid][0] - before[cid][0] for cid in self.ids}
        print(f"  {len(self.ids)} connections, {LIFETIME_S}-second tokens, {LOAD_S:.0f} s of "
              f"load on {REPLICAS} replicas:", flush=True)
        for line in report + self.refresh_report(c.brokers):
            print("  " + line, flush=True)
        print(f"  provider: {refresh_calls} refresh calls, {reuse} refresh tokens presented "
              f"again {stats['reused_token_ids'][:10]}; store: {advanced} generations advanced "
              f"(during the load: min {min(during.values())}, max {max(during.values())} per "
              "connection)", flush=True)
        for f in failures[:40]:
            print(f"  FAILURE {f}", flush=True)
        self.explain(stats, self.load.errors_in_order())

        self.assertEqual(failures, [])
        self.assertEqual(self.load.errors, [])
        self.assertEqual(self.connect_failures, [], "a connect flow failed")
        self.assertEqual(reuse, 0, "a refresh token was presented twice: two replicas refreshed "
                                   "the same generation")
        self.assertEqual(refresh_calls, advanced,
                         "the provider's refreshes and the generations stored differ")
        self.assertEqual(stats["calls"]["token_code"], len(self.ids))
        self.assertEqual(codes, {b.name: 0 for b in c.brokers})
        for name, by_id in statuses.items():
            self.assertEqual(set(by_id.values()), {pb.CONNECTION_STATUS_ACTIVE}, name)
        # Refreshes ran all along: each connection at least a generation every two lifetimes.
        self.assertGreaterEqual(min(during.values()), LOAD_S / (2 * LIFETIME_S))
        self.assertGreater(live, 100)
        lat = [o.t_recv - o.t_send for o in self.load.obs]
        self.assertLess(max(lat), MAX_GET_TOKEN_S)
        print(f"  {self.assert_secrets_absent()} provider-issued values: none in the logs",
              flush=True)


class LeaseHolderKillTest(ReplicaTestBase):
    LIVE_LEASES = ("SELECT connection_id, owner, extract(epoch from expires_at), fence "
                   "FROM refresh_leases WHERE expires_at > clock_timestamp()")

    def replica_of(self, owner):
        for i, b in enumerate(self.cluster.brokers):
            if f":{b.pid}:" in owner and b.proc.poll() is None:
                return i
        return None

    def wait_for_backends_to_end(self, client_ports, timeout=30):
        """Waits until no database backend serves one of these client ports; returns how long
        that took."""
        t0 = time.time()
        if not client_ports:
            return 0.0
        ports = ",".join(str(p) for p in sorted(client_ports))
        while time.time() < t0 + timeout:
            if not self.session.query(
                    f"SELECT pid FROM pg_stat_activity WHERE client_port IN ({ports})"):
                return time.time() - t0
            time.sleep(0.01)
        self.fail(f"the killed replica's database backends still run after {timeout} s")

    def kill_a_lease_holder(self):
        """Kills, with SIGKILL, a replica at a moment it holds refresh leases. Returns (index,
        kill time, {connection id: lease expiry} of the leases it held when it died). A replica
        that happens to have released them all by the time the signal lands is replaced by a
        new one and another is tried, a few times."""
        c = self.cluster
        for attempt in range(5):
            deadline = time.time() + 20
            victim = None
            while time.time() < deadline and victim is None:
                held = collections.Counter()
                for cid, owner, _, _ in self.session.query(self.LIVE_LEASES):
                    r = self.replica_of(owner)
                    if r is not None:
                        held[r] += 1
                if held:
                    victim = held.most_common(1)[0][0]
            self.assertIsNotNone(victim, "no replica held a refresh lease for 20 s")
            b = c.brokers[victim]
            ports = tcp_ports_of(b.pid, urllib.parse.urlsplit(c.db.url).port)
            b.proc.send_signal(signal.SIGKILL)
            killed_at = time.time()
            self.load.kill(victim, killed_at)
            b.proc.wait()
            # Statements the replica wrote to its sockets before the signal still run: the
            # database reads them before it sees the connection close. A lease release among
            # them lands after the kill, so the leases it held are known only once its
            # backends have ended.
            waited = self.wait_for_backends_to_end(ports)
            print(f"  {b.name}'s {len(ports)} database connections ended {waited * 1000:.0f} ms "
                  "after the kill was seen", flush=True)
            rows = self.session.query(
                "SELECT connection_id, extract(epoch from expires_at) FROM refresh_leases "
                f"WHERE owner LIKE '%:{b.pid}:%' AND expires_at > clock_timestamp()")
            held = {cid: float(exp) for cid, exp in rows}
            if held:
                return victim, killed_at, held, attempt
            print(f"  {b.name} had released its leases when it died: a new replica replaces it",
                  flush=True)
            c.add_replica()
            self.load.add(len(c.brokers) - 1)
        self.fail("5 kills in a row missed every lease")

    def test_kill_9_of_the_lease_holder_survivors_take_over_within_the_lease_ttl(self):
        c = self.cluster
        self.connect()
        self.session = PsqlSession(c.db.url, os.path.join(c.dir, "psql-session.err"))
        self.load = Load(c, self.ids).start()
        # Refreshes under way on every replica before the kill.
        start = c.generations()
        deadline = time.time() + 30
        while time.time() < deadline:
            now = c.generations()
            if min(now[cid][0] - start[cid][0] for cid in self.ids) >= 2:
                break
            time.sleep(0.2)
        else:
            self.fail("the connections did not refresh twice within 30 s")

        victim, killed_at, held, attempts = self.kill_a_lease_holder()
        at_kill = c.generations()
        dead = c.brokers[victim]
        print(f"  killed {dead.name} (pid {dead.pid}) holding {len(held)} leases "
              f"({attempts} earlier kills missed): {sorted(held)}; lease expiry in "
              f"{min(held.values()) - killed_at:.1f} to {max(held.values()) - killed_at:.1f} s",
              flush=True)

        # Each of its connections is refreshed by a survivor once its lease has expired (or,
        # if the provider had rotated and the answer died with the replica, found lost).
        survivors = [b for b in c.brokers if b.proc.poll() is None]
        taken = {}
        deadline = max(held.values()) + TAKEOVER_SLACK_S + 5
        while time.time() < deadline and len(taken) < len(held):
            now = c.generations()
            for cid in held:
                gen, status, updated = now[cid]
                if cid not in taken and (gen > at_kill[cid][0] or status != at_kill[cid][1]):
                    taken[cid] = (updated, gen, status)
            time.sleep(0.1)
        # A few more seconds of load on the survivors after the takeover.
        settle = time.time() + 3
        while time.time() < settle:
            time.sleep(0.2)
        self.load.stop()

        # Every connection from every survivor: a live token, or ROTATION_LOST.
        conn = c.fake.connection()
        lost, final_errors = set(), []
        for b in survivors:
            for cid in self.ids:
                try:
                    tok = b.tokens.GetToken(pb.GetTokenRequest(connection_id=cid),
                                            timeout=RPC_TIMEOUT_S, metadata=c.md).token
                    t_recv = time.time()
                    status, _ = c.fake.token_info(conn, tok.access_token)
                    if status != 200 and time.time() < epoch(tok.valid_until):
                        final_errors.append(f"{b.name} {cid}: provider answers {status}")
                    elif status != 200 and t_recv >= epoch(tok.valid_until):
                        final_errors.append(f"{b.name} {cid}: promise expired before the check")
                except grpc.RpcError as err:
                    reason = error_reason(err)
                    if (err.code() == grpc.StatusCode.FAILED_PRECONDITION and
                            reason == "ROTATION_LOST"):
                        lost.add(cid)
                    else:
                        final_errors.append(f"{b.name} {cid}: {err.code().name} {reason} "
                                            f"{err.details()}")
        conn.close()
        statuses = {b.name: c.list_connections(b) for b in survivors}
        codes = c.stop_all(survivors)
        final = c.generations()
        stats = c.fake.stats()

        failures, report, _ = self.load.analyse()
        reuse = stats["refresh_token_reuse_attempts"]
        refresh_calls = stats["calls"]["token_refresh"]
        advanced = sum(g - 1 for g, _, _ in final.values())
        takeover = {cid: t[0] - killed_at for cid, t in taken.items()}
        after_expiry = {cid: t[0] - held[cid] for cid, t in taken.items()}
        # Errors the survivors gave for connections the dead replica did not hold (or for its
        # connections before the kill), and any error a killed replica answered before it was
        # killed. Calls in flight at a kill fail by the kill: the lease holder's, and those of
        # an earlier replica killed when it held no lease (kill_a_lease_holder's missed tries).
        def bad(e):
            replica_killed_at = self.load.killed_at.get(e.replica)
            if replica_killed_at is not None:
                return e.t_recv < replica_killed_at
            return e.cid not in held or e.t_recv < killed_at

        bad_errors = [e for e in sorted(self.load.errors, key=lambda e: e.t_send) if bad(e)]
        held_errors = collections.Counter(e.code for e in self.load.errors
                                          if e.replica != victim and e.cid in held)
        for line in report + self.refresh_report(c.brokers):
            print("  " + line, flush=True)
        print(f"  takeover after the kill: {', '.join(f'{k} {v:.1f} s' for k, v in sorted(takeover.items()))}"
              f" (after lease expiry: "
              f"{', '.join(f'{v:+.2f} s' for _, v in sorted(after_expiry.items()))}); "
              f"in the meantime the survivors answered {dict(held_errors)} for them", flush=True)
        print(f"  ROTATION_LOST (in doubt at the kill): {len(lost)} {sorted(lost)}; provider: "
              f"{refresh_calls} refresh calls, {reuse} refresh tokens presented again; store: "
              f"{advanced} generations advanced", flush=True)
        for f in (failures + final_errors)[:40]:
            print(f"  FAILURE {f}", flush=True)
        print(f"  errors: {len(bad_errors)} where none may be, first at "
              f"{', '.join(f'{e.t_send - killed_at:+.2f} s' for e in bad_errors[:10])} from the "
              "kill", flush=True)
        self.explain(stats, bad_errors)

        self.assertEqual(failures, [])
        self.assertEqual(final_errors, [])
        self.assertEqual(self.connect_failures, [], "a connect flow failed")
        self.assertEqual(bad_errors, [])
        self.assertEqual(set(taken), set(held), "connections of the dead replica not taken over")
        for cid in held:
            self.assertGreater(after_expiry[cid], -0.5,
                               f"{cid} was refreshed while the dead replica's lease still held")
            self.assertLess(takeover[cid], LEASE_TTL_S + TAKEOVER_SLACK_S, cid)
        self.assertLessEqual(lost, set(held))
        self.assertEqual(reuse, len(lost),
                         "a refresh token was presented twice outside the in-doubt window")
        # Every provider refresh is a stored generation, except the dead replica's rotated-but-
        # lost ones, each followed by the survivor's rejected attempt.
        self.assertEqual(refresh_calls, advanced + 2 * len(lost))
        for name, by_id in statuses.items():
            for cid, conn in by_id.items():
                if cid in lost:
                    self.assertEqual((conn.status, conn.reason),
                                     (pb.CONNECTION_STATUS_NEEDS_REAUTH, "ROTATION_LOST"), cid)
                else:
                    self.assertEqual(conn.status, pb.CONNECTION_STATUS_ACTIVE, (name, cid))
        self.assertEqual(codes, {b.name: 0 for b in survivors})
        print(f"  {self.assert_secrets_absent()} provider-issued values: none in the logs",
              flush=True)


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit("usage: replicas_test.py <token-broker> <fake_provider> [unittest arguments]")
    BROKER, FAKE_PROVIDER = sys.argv.pop(1), sys.argv.pop(1)
    durability_test.FAKE_PROVIDER = FAKE_PROVIDER
    unittest.main()
