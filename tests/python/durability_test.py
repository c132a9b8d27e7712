#!/usr/bin/python3
"""Durability of the real token-broker binary on its default store (SQLite, encrypted), against
the real fake_provider binary (Zendesk-like, single-use refresh tokens).

RestartTest: an account connected through the browser flow survives SIGTERM and a restart: the
broker answers the same access token and generation without calling the provider, the token is
still live at the provider, and the raw database files hold none of the tokens, keys or secrets.

CrashSafetyTest (issue 5's key test): a few connections with 2-second tokens refresh
continuously while the broker is killed with SIGKILL at random moments (some rounds aimed at the
moment a refresh starts, some right after start-up, when expired tokens are refreshed at once),
then started again on the same files. After every restart each connection must either serve a
token the provider accepts (kept) or say FAILED_PRECONDITION / ROTATION_LOST (the kill fell
between the provider's rotation and the answer reaching the disk, and the broker detected it);
anything else is a failure: NEEDS_REAUTH, a token the provider rejects while it is promised
valid, a generation lower than one already handed out, two tokens for one generation, an error
that does not clear, or ROTATION_LOST when no refresh of that connection can have been in flight.
Lost connections are reconnected (a reconnect link) so later rounds keep exercising them.

Usage: /usr/bin/python3 durability_test.py <token-broker> <fake_provider> [--rounds=N]
                                           [unittest arguments, e.g. CrashSafetyTest]
       The round count also comes from TB_CRASH_ROUNDS (default 50); TB_CRASH_SEED fixes the
       random kill moments. PYTHONPATH must hold the generated stubs. With TB_TEST_LOG_DIR set,
       every log goes there and every secret seen is recorded for the end-of-run scan.
"""
import base64
import http.cookiejar
import json
import os
import random
import re
import select
import shutil
import signal
import socket
import ssl
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
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2
from google.rpc import status_pb2
from tokenbroker.v1 import token_broker_pb2 as pb
from tokenbroker.v1 import token_broker_pb2_grpc as pb_grpc

BROKER = FAKE_PROVIDER = ""
ROUNDS = int(os.environ.get("TB_CRASH_ROUNDS", "50"))
SEED = os.environ.get("TB_CRASH_SEED", "")
START_TIMEOUT_S = 30
RPC_TIMEOUT_S = 10
SETTLE_S = 8          # how long an error after a restart may take to clear
SHORT_LIFETIME_S = 2  # expires_in of the crash test's tokens
CONNECTIONS = 5
# A ROTATION_LOST is plausible only if the kill came at most this long before the promise of the
# newest token we had seen ran out (a refresh of generation N never starts before valid_until(N);
# the slack covers a watcher thread that was slow to take a newer generation in).
IN_FLIGHT_SLACK_S = 0.25


def log_dir():
    return os.environ.get("TB_TEST_LOG_DIR", "")


def free_port():
    """A port free now and below the kernel's ephemeral range: a port the kernel hands out
    (bind to 0) can be taken by any outbound connection of a process running in parallel before
    the broker binds it, which failed a run with "bind: Address already in use"."""
    hi = 32767
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            hi = min(hi, int(f.read().split()[0]) - 1)
    except (OSError, ValueError, IndexError):
        pass
    lo = max(1024, hi - 12000)
    for _ in range(1000):
        port = random.randint(lo, hi)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {lo}-{hi}")


_recorded = set()
_recorded_lock = threading.Lock()


def record_secret(value):
    """Adds a secret to the end-of-run log scan (tests/support/scan_logs_for_secrets.py)."""
    if not value or not log_dir():
        return
    with _recorded_lock:
        if value in _recorded:
            return
        _recorded.add(value)
        with open(os.path.join(log_dir(), f"secrets-{os.getpid()}.txt"), "a") as f:
            f.write(value + "\n")


_counter = [0]


def write_key_ring(directory):
    """A store key file in `directory` holding one fresh AES-256 key "k1" (recorded for the
    scan). Returns its path."""
    key = base64.b64encode(os.urandom(32)).decode()
    record_secret(key)
    path = os.path.join(directory, "keys")
    with open(path, "w") as f:
        f.write(f"k1 {key}\n")
    return path


def listen_args(ports, public_base_url):
    """token-broker's listener flags for `ports` (grpc, probe, public, admin) on loopback."""
    return [f"--grpc_listen=127.0.0.1:{ports['grpc']}",
            f"--probe_listen=127.0.0.1:{ports['probe']}",
            f"--public_listen=127.0.0.1:{ports['public']}",
            f"--admin_listen=127.0.0.1:{ports['admin']}",
            f"--public_base_url={public_base_url}"]


def new_test_secret(label):
    """A secret shaped as tests/support/test_secrets.h's NewTestSecret makes them,
    "<label>/<16 random hex digits>+<n>=", recorded: the scan then finds even its random part."""
    with _recorded_lock:
        _counter[0] += 1
        n = _counter[0]
    value = f"{label}/{os.urandom(8).hex()}+{n}="
    record_secret(value)
    return value


def error_reason(err):
    """The google.rpc.ErrorInfo reason in an RpcError's grpc-status-details-bin trailer, or ""."""
    raw = dict(err.trailing_metadata() or ()).get("grpc-status-details-bin")
    if raw is None:
        return ""
    for detail in status_pb2.Status.FromString(raw).details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info.reason
    return ""


def seconds(d):
    return d.seconds + d.nanos / 1e9


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


class FakeProvider:
    """The fake_provider binary on a free port, auto-approving authorizations. It records every
    code and token it issues in secrets-<its pid>.txt under TB_TEST_LOG_DIR (or a private folder
    when that is unset, or always with `private_secrets`), which tells a test the refresh
    tokens it never sees otherwise."""

    def __init__(self, directory, label="durability", private_secrets=False, log_level="debug"):
        self.secret = new_test_secret(f"{label}-client-secret")
        self.client_id = "token-broker-test"
        self.secret_file = os.path.join(directory, "client-secret")
        with open(self.secret_file, "w") as f:
            f.write(self.secret + "\n")
        self.ca_file = os.path.join(directory, "fake-provider-ca.pem")
        self.secrets_dir = ("" if private_secrets else log_dir()) or os.path.join(
            directory, "fake-secrets")
        os.makedirs(self.secrets_dir, exist_ok=True)
        env = dict(os.environ, TB_TEST_LOG_DIR=self.secrets_dir)
        out = os.path.join(log_dir() or directory, f"fake-provider-{label}-{os.getpid()}-"
                                                   f"{time.time_ns()}.log")
        self.log = open(out, "wb")
        self.proc = subprocess.Popen(
            [FAKE_PROVIDER, "--port=0", f"--ca_file={self.ca_file}", "--auto_approve=true",
             f"--client_id={self.client_id}", f"--client_secret_file={self.secret_file}",
             "--stats_endpoint=true", f"--log_level={log_level}"],
            stdout=subprocess.PIPE, stderr=self.log, env=env)
        try:
            self.base = self._read_base_url()
        except BaseException:
            self.stop()
            raise
        self.ssl = ssl.create_default_context(cafile=self.ca_file)
        self._local = threading.local()

    def _read_base_url(self):
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + START_TIMEOUT_S
        buf = b""
        while b"\n" not in buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("fake_provider printed no listening line")
            if select.select([fd], [], [], left)[0]:
                chunk = os.read(fd, 4096)
                if not chunk:
                    raise RuntimeError(f"fake_provider exited with {self.proc.wait()}")
                buf += chunk
        m = re.search(rb"listening on (https://\S+)", buf)
        if not m:
            raise RuntimeError(f"unexpected line from fake_provider: {buf!r}")
        return m.group(1).decode()

    def token_status(self, access_token):
        """HTTP status of GET /api/v2/oauth/tokens/current.json with this Bearer token: 200 only
        while the token is live."""
        req = urllib.request.Request(f"{self.base}/api/v2/oauth/tokens/current.json",
                                     headers={"Authorization": f"Bearer {access_token}"})
        try:
            with urllib.request.urlopen(req, timeout=RPC_TIMEOUT_S, context=self.ssl) as r:
                r.read()
                return r.status
        except urllib.error.HTTPError as e:
            e.read()
            return e.code

    def stats(self):
        """GET /_fake/stats: {"calls": {"token_refresh": n, ...},
        "refresh_token_reuse_attempts": n, "reused_token_ids": [...]}."""
        with urllib.request.urlopen(f"{self.base}/_fake/stats", timeout=RPC_TIMEOUT_S,
                                    context=self.ssl) as r:
            return json.loads(r.read())

    def issued(self):
        """Every value the fake recorded as secret: codes, access and refresh tokens, the client
        secret."""
        path = os.path.join(self.secrets_dir, f"secrets-{self.proc.pid}.txt")
        with open(path) as f:
            return [line for line in f.read().splitlines() if len(line) >= 8]

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc.stdout.close()
        self.log.close()


class StateDir:
    """A broker's data directory: store key ring, link signing key, config with a Zendesk-preset
    provider (default lifetimes) and a generic-preset one with 2-second tokens, both on the fake.
    Listen addresses and the public base URL are flags of each broker process."""

    def __init__(self, fake):
        self.path = tempfile.mkdtemp(prefix="tb-durability-test-")
        self.key_raw = os.urandom(32)
        self.key = base64.b64encode(self.key_raw).decode()
        record_secret(self.key)
        self.keys = os.path.join(self.path, "keys")
        with open(self.keys, "w") as f:
            f.write(f"k1 {self.key}\n")
        self.link_key = new_test_secret("durability-link-signing-key")
        self.link_key_file = os.path.join(self.path, "link-key")
        with open(self.link_key_file, "w") as f:
            f.write(self.link_key)
        self.db = os.path.join(self.path, "tokens.db")
        b = fake.base
        self.config = os.path.join(self.path, "config.yaml")
        with open(self.config, "w") as f:
            f.write(f"""\
store: {{url: "sqlite://{self.db}", encryption_keys_file: "{self.keys}"}}
links: {{signing_key_file: "{self.link_key_file}"}}
grpc: {{insecure: true}}  # loopback only; these tests are about the store, not the callers
refresh: {{retry_delay: 1s}}
shutdown: {{drain_delay: 0s}}   # no load balancer to wait for: SIGTERM drains at once
http: {{rate_limit_per_minute: 0}}  # every connect flow comes from 127.0.0.1
providers:
  zd:
    preset: zendesk
    client_id: "{fake.client_id}"
    client_secret_file: "{fake.secret_file}"
    authorize_url: "{b}/oauth/authorizations/new"
    token_url: "{b}/oauth/tokens"
    token_info_url: "{b}/api/v2/oauth/tokens/current.json"
    revoke_url: "{b}/api/v2/oauth/tokens/{{token_id}}.json"
    ca_file: "{fake.ca_file}"
  short:
    preset: generic
    client_id: "{fake.client_id}"
    client_secret_file: "{fake.secret_file}"
    authorize_url: "{b}/oauth/authorizations/new"
    token_url: "{b}/oauth/tokens"
    revoke_url: "{b}/oauth/revoke"
    ca_file: "{fake.ca_file}"
    expires_in: {SHORT_LIFETIME_S}
""")

    def raw_files(self):
        """The database file and its WAL/journal as bytes, whichever exist."""
        out = {}
        for suffix in ("", "-wal", "-journal"):
            path = self.db + suffix
            if os.path.exists(path):
                with open(path, "rb") as f:
                    out[path] = f.read()
        return out

    def remove(self):
        shutil.rmtree(self.path, ignore_errors=True)


def start_broker(state, attempts=3):
    """Broker(state).wait_ready(), on new ports again if one was taken between free_port()'s
    check and the broker's bind (a process of a test running in parallel may bind it meanwhile;
    it failed a CI run with "bind: Address already in use")."""
    for attempt in range(attempts):
        broker = Broker(state)
        try:
            return broker.wait_ready()
        except RuntimeError as e:
            broker.stop()
            if "Address already in use" not in str(e) or attempt == attempts - 1:
                raise


class Broker:
    """token-broker in a child process on free ports (new ones for every process, so a restart
    never depends on the killed process's ports being free again) and the state's store."""

    def __init__(self, state):
        self.state = state
        self.ports = {name: free_port() for name in ("grpc", "probe", "public", "admin")}
        self.public_base_url = f"http://127.0.0.1:{self.ports['public']}"
        args = [BROKER, f"--config={state.config}",
                *listen_args(self.ports, self.public_base_url),
                "--log_level=trace",
                # Always a file: trace logs on an unread stderr pipe would block the broker.
                f"--log_file={log_dir() or state.path}/token-broker-{os.getpid()}-"
                f"{time.time_ns()}.log"]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.ports['grpc']}")
        self.tokens = pb_grpc.TokenBrokerStub(self.channel)
        self.admin = pb_grpc.ConnectionAdminStub(self.channel)

    def wait_ready(self):
        deadline = time.monotonic() + START_TIMEOUT_S
        url = f"http://127.0.0.1:{self.ports['admin']}/readyz"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"token-broker exited with {self.proc.returncode}: "
                                   f"{self.proc.stderr.read().decode()}")
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200:
                        return self
            except (OSError, urllib.error.HTTPError):
                pass
            time.sleep(0.02)
        raise TimeoutError("token-broker did not become ready")

    def stop(self, sig=signal.SIGTERM, timeout=15):
        self.channel.close()
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise
        self.proc.stderr.close()
        return self.proc.returncode

    def get_token(self, connection_id, min_ttl_s=0.0):
        req = pb.GetTokenRequest(connection_id=connection_id)
        if min_ttl_s:
            req.min_ttl.CopyFrom(duration_pb2.Duration(nanos=int(min_ttl_s * 1e9)))
        token = self.tokens.GetToken(req, timeout=RPC_TIMEOUT_S).token
        record_secret(token.access_token)
        return token

    def connect(self, fake, connection_id, provider, params=None, reconnect=False):
        """Connects an account as a browser does: mint a link, open it, follow /oauth/start's
        redirect to the provider (which approves at once), follow its redirect to the callback
        with the binding cookie. Returns the callback page."""
        link = self.admin.CreateConnectLink(
            pb.CreateConnectLinkRequest(connection_id=connection_id, provider=provider,
                                        params=params or {}, reconnect=reconnect),
            timeout=RPC_TIMEOUT_S)
        for value in urllib.parse.parse_qs(urllib.parse.urlsplit(link.url).query).values():
            for v in value:
                record_secret(v)
        jar = http.cookiejar.CookieJar()
        opener = urllib.request.build_opener(NoRedirect, urllib.request.HTTPCookieProcessor(jar),
                                             urllib.request.HTTPSHandler(context=fake.ssl))

        def get(url):
            try:
                with opener.open(url, timeout=RPC_TIMEOUT_S) as r:
                    return r.status, r.headers, r.read().decode()
            except urllib.error.HTTPError as e:
                return e.code, e.headers, e.read().decode()

        status, headers, body = get(link.url)
        if status != 302:
            raise AssertionError(f"/oauth/start answered {status}: {body}")
        for cookie in jar:
            record_secret(cookie.value)
        authorize = headers["Location"]
        if not authorize.startswith(fake.base):
            raise AssertionError(f"/oauth/start redirected to {authorize}")
        status, headers, body = get(authorize)
        if status != 302:
            raise AssertionError(f"the provider's authorize answered {status}: {body}")
        callback = headers["Location"]
        for value in urllib.parse.parse_qs(urllib.parse.urlsplit(callback).query).values():
            for v in value:
                record_secret(v)  # code and state
        if not callback.startswith(f"{self.public_base_url}/oauth/callback?"):
            raise AssertionError(f"the provider redirected to {callback}")
        status, _, body = get(callback)
        if status != 200:
            raise AssertionError(f"/oauth/callback answered {status}: {body}")
        return body


class RestartTest(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="tb-durability-fake-")
        self.fake = FakeProvider(self.tmp)
        self.state = StateDir(self.fake)
        self.broker = None

    def tearDown(self):
        if self.broker is not None:
            self.broker.stop(signal.SIGKILL)
        self.fake.stop()
        self.state.remove()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def assert_no_secret_on_disk(self, secrets, when):
        files = self.state.raw_files()
        self.assertIn(self.state.db, files)
        for path, data in files.items():
            for name, value in secrets:
                self.assertNotIn(value, data, f"{name} in plaintext in {path} ({when})")

    def test_restart_serves_the_stored_token_without_a_provider_call(self):
        self.broker = start_broker(self.state)
        page = self.broker.connect(self.fake, "acme", "zd", {"subdomain": "acme"})
        self.assertIn("acme", page)
        first = self.broker.get_token("acme")
        self.assertGreater(len(first.access_token), 100)
        self.assertEqual(self.fake.token_status(first.access_token), 200)
        self.assertGreater(seconds(first.valid_for), 300)  # 30-minute Zendesk tokens
        self.assertEqual(self.fake.stats()["calls"]["token_code"], 1)

        # Everything the fake issued (the code, the access token, the refresh token) and every
        # key we hold must be absent from the raw files, while running and after the stop.
        issued = self.fake.issued()
        self.assertIn(first.access_token, issued)
        self.assertGreaterEqual(len(issued), 3)  # client secret, code, access, refresh token
        secrets = [("issued by the provider", v.encode()) for v in issued]
        secrets += [("access token", first.access_token.encode()),
                    ("encryption key (base64)", self.state.key.encode()),
                    ("encryption key (raw)", self.state.key_raw),
                    ("link signing key", self.state.link_key.encode()),
                    ("client secret", self.fake.secret.encode())]
        self.assert_no_secret_on_disk(secrets, "while running")

        started = time.monotonic()
        self.assertEqual(self.broker.stop(signal.SIGTERM), 0)
        self.assertLess(time.monotonic() - started, 15)
        self.broker = None
        self.assert_no_secret_on_disk(secrets, "after SIGTERM")

        self.broker = start_broker(self.state)
        again = self.broker.get_token("acme")
        self.assertEqual(again.access_token, first.access_token)
        self.assertEqual(again.generation, first.generation)
        # The same promise (the store keeps microseconds), never a later one.
        first_us = first.valid_until.seconds * 10**6 + first.valid_until.nanos // 1000
        again_us = again.valid_until.seconds * 10**6 + again.valid_until.nanos // 1000
        self.assertEqual(again_us, first_us)
        self.assertLessEqual(again.valid_until.ToNanoseconds(), first.valid_until.ToNanoseconds())
        # No refresh happened: it would have rotated the token and killed this one.
        self.assertEqual(self.fake.token_status(again.access_token), 200)
        self.assertEqual(len(self.fake.issued()), len(issued))  # nothing new issued
        stats = self.fake.stats()
        self.assertEqual(stats["calls"]["token_refresh"], 0)
        self.assertEqual(stats["calls"]["token_code"], 1)
        conn = self.broker.admin.GetConnection(pb.GetConnectionRequest(connection_id="acme"),
                                               timeout=RPC_TIMEOUT_S)
        self.assertEqual(conn.status, pb.CONNECTION_STATUS_ACTIVE)
        self.assertEqual(conn.generation, first.generation)
        self.assertEqual(self.broker.stop(signal.SIGTERM), 0)
        self.broker = None
        self.assert_no_secret_on_disk(secrets, "after the second run")


class Watcher:
    """WatchToken on every connection while one broker process runs: the newest generation each
    connection published, its promise, and when we learned it."""

    def __init__(self, broker, ids):
        self.lock = threading.Lock()
        self.latest = {}  # id -> (generation, valid_until as epoch seconds, access token)
        self.seen = []    # (id, generation, access token) in arrival order
        self.calls = []
        self.threads = []
        for cid in ids:
            call = broker.tokens.WatchToken(pb.WatchTokenRequest(connection_id=cid))
            self.calls.append(call)
            t = threading.Thread(target=self._run, args=(cid, call), daemon=True)
            t.start()
            self.threads.append(t)

    def _run(self, cid, call):
        try:
            for msg in call:
                t = msg.token
                record_secret(t.access_token)
                until = t.valid_until.seconds + t.valid_until.nanos / 1e9
                with self.lock:
                    self.latest[cid] = (t.generation, until, t.access_token)
                    self.seen.append((cid, t.generation, t.access_token))
        except grpc.RpcError:
            pass  # the broker was killed, the connection stopped serving, or we cancelled

    def snapshot(self):
        with self.lock:
            return dict(self.latest), list(self.seen)

    def stop(self):
        for call in self.calls:
            call.cancel()
        for t in self.threads:
            t.join(10)


class CrashSafetyTest(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="tb-durability-fake-")
        self.fake = FakeProvider(self.tmp)
        self.state = StateDir(self.fake)
        self.broker = None
        self.watcher = None

    def tearDown(self):
        if self.watcher is not None:
            self.watcher.stop()
        if self.broker is not None:
            self.broker.stop(signal.SIGKILL)
        self.fake.stop()
        self.state.remove()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def test_kill_9_at_random_moments_never_loses_a_grant_silently(self):
        seed = int(SEED) if SEED else random.randrange(1 << 30)
        rng = random.Random(seed)
        print(f"\ncrash safety: {ROUNDS} rounds, {CONNECTIONS} connections, "
              f"{SHORT_LIFETIME_S}-second tokens, seed {seed} (TB_CRASH_SEED)", flush=True)
        ids = [f"crash-{i}" for i in range(CONNECTIONS)]
        started = time.monotonic()
        self.broker = start_broker(self.state)
        for cid in ids:
            self.broker.connect(self.fake, cid, "short")
        # Highest generation handed out per connection, and the token of every generation.
        max_gen = {}
        token_of = {cid: {} for cid in ids}
        failures = []
        per_conn = {"kept": 0, "rotation_lost": 0}
        per_kill = {"kept": 0, "rotation_lost": 0, "failure": 0}
        by_mode = {}
        kills_in_refresh = 0
        start_times = []
        reconnects = 0

        generations = [0]  # distinct (connection, generation) pairs seen: refreshes + grants

        def saw(cid, generation, access_token, where):
            if generation not in token_of[cid]:
                generations[0] += 1
            known = token_of[cid].setdefault(generation, access_token)
            if known != access_token:
                failures.append(f"{where}: {cid} generation {generation} came with two "
                                "different access tokens")
            max_gen[cid] = max(max_gen.get(cid, 0), generation)

        for cid in ids:
            t = self.broker.get_token(cid)
            self.assertEqual(self.fake.token_status(t.access_token), 200)
            self.assertLessEqual(seconds(t.valid_for), SHORT_LIFETIME_S)
            saw(cid, t.generation, t.access_token, "connect")
        self.watcher = Watcher(self.broker, ids)
        reuses = self.fake.stats()["refresh_token_reuse_attempts"]
        self.assertEqual(reuses, 0)

        for rnd in range(1, ROUNDS + 1):
            # When to kill. "early": right after start-up, while the tokens that expired during
            # the restart are refreshed; "refresh": at a moment a scheduled refresh starts
            # (valid_until of the newest token of some connection); "random": anywhere.
            mode = rng.choice(["early", "refresh", "refresh", "random", "random"])
            if mode == "early":
                time.sleep(rng.uniform(0.0, 0.15))
            elif mode == "random":
                time.sleep(rng.uniform(0.0, 2.0))
            else:
                time.sleep(rng.uniform(0.0, 0.5))
                latest, _ = self.watcher.snapshot()
                now = time.time()
                upcoming = sorted(u for (_, u, _) in latest.values() if u > now + 0.01)
                if upcoming:
                    target = upcoming[0] + rng.uniform(-0.005, 0.03)
                    time.sleep(max(0.0, target - time.time()))
            latest, seen = self.watcher.snapshot()
            killed_at = time.time()
            self.broker.proc.send_signal(signal.SIGKILL)
            self.broker.proc.wait()
            self.watcher.stop()
            self.watcher = None
            self.broker.stop()
            self.broker = None
            by_mode[mode] = by_mode.get(mode, 0) + 1
            for cid, generation, access_token in seen:
                saw(cid, generation, access_token, f"round {rnd} (watch)")
            in_flight = {cid: cid not in latest or killed_at >= latest[cid][1] - IN_FLIGHT_SLACK_S
                         for cid in ids}
            if any(cid in latest and killed_at >= latest[cid][1] for cid in ids):
                kills_in_refresh += 1

            t0 = time.monotonic()
            self.broker = start_broker(self.state)
            start_times.append(time.monotonic() - t0)

            outcome = {}
            for cid in ids:
                result, detail = self.classify(cid, max_gen.get(cid, 0), in_flight[cid],
                                               killed_at, latest.get(cid))
                if result == "kept":
                    generation, access_token = detail
                    saw(cid, generation, access_token, f"round {rnd}")
                elif result == "failure":
                    failures.append(f"round {rnd} ({mode}, killed at {killed_at:.3f}): "
                                    f"{cid}: {detail}")
                outcome[cid] = result
            for cid, result in outcome.items():
                if result != "failure":
                    per_conn[result] += 1
            if "failure" in outcome.values():
                per_kill["failure"] += 1
            elif "rotation_lost" in outcome.values():
                per_kill["rotation_lost"] += 1
            else:
                per_kill["kept"] += 1
            if failures:
                break  # the broker's files now show the failure: stop and report it
            for cid in [c for c, r in outcome.items() if r == "rotation_lost"]:
                self.broker.connect(self.fake, cid, "short", reconnect=True)
                reconnects += 1
                t = self.broker.get_token(cid)
                if self.fake.token_status(t.access_token) != 200:
                    failures.append(f"round {rnd}: {cid}: the reconnected grant's token is "
                                    "rejected by the provider")
                # A reconnect is a new grant: its generations are compared among themselves.
                token_of[cid] = {}
                max_gen[cid] = 0
                saw(cid, t.generation, t.access_token, f"round {rnd} (reconnect)")
            # Each lost connection presented its rotated refresh token exactly once (the
            # provider answered invalid_grant and the broker stopped); a kept connection never
            # presents a used one: that would be a stale grant in use.
            now_reuses = self.fake.stats()["refresh_token_reuse_attempts"]
            lost = sum(1 for r in outcome.values() if r == "rotation_lost")
            if now_reuses - reuses != lost:
                failures.append(f"round {rnd} ({mode}, killed at {killed_at:.3f}): the provider "
                                f"saw {now_reuses - reuses} used refresh tokens presented again, "
                                f"for {lost} connections lost")
                break
            reuses = now_reuses
            self.watcher = Watcher(self.broker, ids)
            if rnd % 10 == 0:
                print(f"  round {rnd}: {per_kill}", flush=True)

        if self.watcher is not None:  # None when a failure ended the rounds early
            self.watcher.stop()
            self.watcher = None
        self.assertEqual(self.broker.stop(signal.SIGTERM), 0)
        self.broker = None
        elapsed = time.monotonic() - started
        refreshes = generations[0] - len(ids) - reconnects
        kills = sum(per_kill.values())
        print(f"crash safety summary after {kills} kills "
              f"({', '.join(f'{k} {v}' for k, v in sorted(by_mode.items()))}; "
              f"{kills_in_refresh} with a refresh due or in flight), {elapsed:.1f} s:\n"
              f"  kills that lost nothing:               {per_kill['kept']}\n"
              f"  kills in the in-doubt window:          {per_kill['rotation_lost']}"
              f" (ROTATION_LOST, detected)\n"
              f"  kills with a failure:                  {per_kill['failure']}\n"
              f"  connections kept / lost (ROTATION_LOST): {per_conn['kept']} / "
              f"{per_conn['rotation_lost']} (reconnected {reconnects}); used refresh tokens "
              f"presented again: {reuses}\n"
              f"  refreshes seen (new generations): {refreshes}; broker start to ready: "
              f"median {sorted(start_times)[len(start_times) // 2]:.2f} s, "
              f"max {max(start_times):.2f} s", flush=True)
        for f in failures:
            print(f"  FAILURE {f}", flush=True)
        self.assertEqual(failures, [])
        self.assertGreater(refreshes, ROUNDS)  # the kills did land among refreshes

        issued = [v.encode() for v in self.fake.issued()]
        for path, data in self.state.raw_files().items():
            leaked = sum(1 for v in issued if v in data)
            self.assertEqual(leaked, 0, f"{leaked} provider-issued values in plaintext in {path}")
            self.assertNotIn(self.state.key.encode(), data)
            self.assertNotIn(self.state.key_raw, data)

    def classify(self, cid, seen_gen, in_flight, killed_at, latest):
        """("kept", (generation, token)), ("rotation_lost", None) or ("failure", why)."""
        deadline = time.monotonic() + SETTLE_S
        last = "no answer"
        while time.monotonic() < deadline:
            t0 = time.monotonic()
            try:
                # min_ttl: a token that stays promised long enough to be checked at the provider.
                token = self.broker.get_token(cid, min_ttl_s=0.4)
            except grpc.RpcError as err:
                reason = error_reason(err)
                if err.code() == grpc.StatusCode.FAILED_PRECONDITION and reason == "ROTATION_LOST":
                    if not in_flight:
                        return ("failure", "ROTATION_LOST although no refresh can have been in "
                                f"flight (newest token seen: generation {latest[0]}, valid until "
                                f"{latest[1]:.3f})")
                    return ("rotation_lost", None)
                if err.code() == grpc.StatusCode.FAILED_PRECONDITION:
                    return ("failure", f"FAILED_PRECONDITION {reason}: {err.details()}")
                last = f"{err.code().name} {reason}: {err.details()}"
                time.sleep(0.05)
                continue
            if token.generation < seen_gen:
                return ("failure", f"generation {token.generation} after {seen_gen} was handed out")
            status = self.fake.token_status(token.access_token)
            if status == 200:
                return ("kept", (token.generation, token.access_token))
            if time.monotonic() - t0 < seconds(token.valid_for):
                return ("failure", f"the provider answers {status} for generation "
                                   f"{token.generation}, promised valid for "
                                   f"{seconds(token.valid_for):.3f} s more")
            last = f"generation {token.generation} checked too late to judge"
        return ("failure", f"did not settle within {SETTLE_S} s: {last}")


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit("usage: durability_test.py <token-broker> <fake_provider> [--rounds=N] "
                 "[unittest arguments]")
    BROKER, FAKE_PROVIDER = sys.argv.pop(1), sys.argv.pop(1)
    for arg in list(sys.argv[1:]):
        if arg.startswith("--rounds="):
            ROUNDS = int(arg.split("=", 1)[1])
            sys.argv.remove(arg)
    unittest.main()
