#!/usr/bin/python3
"""Issue 7's store outage on the real binaries: PostgreSQL stopped and started again mid-run.

One token-broker on a private PostgreSQL 15 (scripts/postgres.sh with TB_PG_DIR pointing to a
folder of this test, so the shared test server is untouched), against the real fake_provider
binary. Five connections get 4-second tokens (generic preset, refreshed every 2 s), three get
1-hour ones. GetToken load from a few threads, and the probe port's gRPC health (readiness "",
and tokenbroker.v1.Store) polled every 100 ms, while PostgreSQL is paused (pg_ctl stop -m fast)
for STORE_OUTAGE_S seconds and then started again on the same folder and port.

Must hold:
  - no GetToken fails for a token still valid: the long-lived connections never fail; a
    short-lived one may answer UNAVAILABLE (the provider cannot be called without the store's
    lease) only once the newest token it was handed is past its expiry, or DEADLINE_EXCEEDED
    (the call waited for a refresh that did not finish within the caller's 3 s, as can happen
    just after the store is back) only if that token had expired when the call was sent; every
    token handed out is promised (valid_until not passed) and not expired;
  - tokenbroker.v1.Store says NOT_SERVING during the outage (and tb_store_up 0 on /metrics),
    SERVING before it and again after it; readiness ("") says SERVING at every poll;
  - refreshes resume by themselves: every short-lived connection gets new generations after
    the store is back, every connection is still active and serves a token the provider takes,
    and no refresh token was ever presented twice;
  - SIGTERM then exits 0.

Usage: /usr/bin/python3 store_outage_test.py <token-broker> <fake_provider> [unittest args]
       PYTHONPATH must hold the generated stubs; PostgreSQL 15 must be installed
       (scripts/install-deps.sh). With TB_TEST_LOG_DIR set, every log goes there and secrets are
       recorded for the end-of-run scan. TB_STORE_OUTAGE_SECONDS (10) sets the outage.
"""
import collections
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import unittest
import urllib.request

import grpc
from grpc_health.v1 import health_pb2
from grpc_health.v1 import health_pb2_grpc
from tokenbroker.v1 import token_broker_pb2 as pb

# The fake provider, broker process and browser-flow helpers of the durability test.
import durability_test as dt

HERE = os.path.dirname(os.path.abspath(__file__))
POSTGRES_SH = os.path.join(HERE, "..", "..", "scripts", "postgres.sh")
PSQL = shutil.which("psql") or "/usr/lib/postgresql/15/bin/psql"
STORE_OUTAGE_S = float(os.environ.get("TB_STORE_OUTAGE_SECONDS", "10"))
SHORT_LIFETIME_S = 4
SHORT, LONG = 5, 3
CLIENT_THREADS = 4
RPC_TIMEOUT_S = 3
RECOVERY_TIMEOUT_S = 45
# An error for a short-lived connection is judged against the newest token handed out before the
# call was sent: it must have expired by the time the answer came back (clock reads of the test
# and the broker differ by a few milliseconds).
EXPIRY_SLACK_S = 0.05
STORE_SERVICE = "tokenbroker.v1.Store"


def postgres(command, pg_dir):
    """Runs scripts/postgres.sh `command` on the private instance; its stdout."""
    proc = subprocess.run(["bash", POSTGRES_SH, command], capture_output=True, text=True,
                          env=dict(os.environ, TB_PG_DIR=pg_dir), timeout=120)
    if proc.returncode != 0:
        raise AssertionError(f"postgres.sh {command} failed ({proc.returncode}): {proc.stderr}")
    return proc.stdout


def psql(url, sql):
    proc = subprocess.run([PSQL, "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-d", url,
                           "-c", sql], capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise AssertionError(f"psql failed on {sql!r}: {proc.stderr}")
    return proc.stdout


class PrivatePostgres:
    """A PostgreSQL 15 of this test alone, in a folder directly under the temporary directory
    (the server's user must be able to reach it when we are root)."""

    def __init__(self):
        base = os.environ.get("TMPDIR", "/tmp")
        self.dir = os.path.join(base, f"tb-store-outage-pg.{os.getpid()}.{os.urandom(4).hex()}")
        out = postgres("start", self.dir)
        m = re.search(r"TB_TEST_POSTGRES_URL=(\S+)", out)
        if not m:
            raise AssertionError(f"postgres.sh start printed no URL: {out!r}")
        server = m.group(1)
        psql(server, "CREATE DATABASE tb_outage")
        self.url = server.rsplit("/", 1)[0] + "/tb_outage"

    def pause(self):
        postgres("pause", self.dir)

    def resume(self):
        postgres("start", self.dir)

    def stop(self):
        try:
            postgres("stop", self.dir)
        finally:
            try:
                os.remove(self.dir + ".lock")
            except FileNotFoundError:
                pass


class State:
    """Config, keys and link key for the broker (durability_test.Broker reads .config and
    .path)."""

    def __init__(self, fake, pg):
        self.path = tempfile.mkdtemp(prefix="tb-store-outage-test-")
        self.keys = dt.write_key_ring(self.path)
        link_key = dt.new_test_secret("store-outage-link-key")
        link_key_file = os.path.join(self.path, "link-key")
        with open(link_key_file, "w") as f:
            f.write(link_key)
        b = fake.base
        provider = f"""\
    preset: generic
    client_id: "{fake.client_id}"
    client_secret_file: "{fake.secret_file}"
    authorize_url: "{b}/oauth/authorizations/new"
    token_url: "{b}/oauth/tokens"
    revoke_url: "{b}/oauth/revoke"
    ca_file: "{fake.ca_file}"
"""
        self.config = os.path.join(self.path, "config.yaml")
        with open(self.config, "w") as f:
            f.write(f"""\
store: {{url: "{pg.url}", encryption_keys_file: "{self.keys}", statement_timeout: 2s}}
links: {{signing_key_file: "{link_key_file}"}}
grpc: {{insecure: true}}  # loopback only; this test is about the store, not the callers
refresh: {{provider_timeout: 5s, retry_delay: 1s, retry_max: 2s}}
shutdown: {{drain_delay: 0s}}
http: {{rate_limit_per_minute: 0}}  # every connect flow comes from 127.0.0.1
providers:
  short:
{provider}    expires_in: {SHORT_LIFETIME_S}
  long:
{provider}    expires_in: 3600
""")

    def remove(self):
        shutil.rmtree(self.path, ignore_errors=True)


def epoch(ts):
    return ts.seconds + ts.nanos / 1e9


class Load:
    """CLIENT_THREADS threads calling GetToken round-robin over every connection."""

    Obs = collections.namedtuple("Obs", "cid generation valid_until expires_at t_send t_recv")
    Error = collections.namedtuple("Error", "cid code reason details t_send t_recv")

    def __init__(self, broker, ids):
        self.broker = broker
        self.ids = ids
        self.stop_event = threading.Event()
        self.lock = threading.Lock()
        self.obs = []
        self.errors = []
        self.failures = []
        self.latest = {}  # cid -> newest Obs so far (for the test's progress checks)
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True)
                        for i in range(CLIENT_THREADS)]

    def start(self):
        for t in self.threads:
            t.start()
        return self

    def stop(self):
        self.stop_event.set()
        for t in self.threads:
            t.join(30)

    def _run(self, idx):
        i = idx
        try:
            while not self.stop_event.is_set():
                i += 1
                cid = self.ids[i % len(self.ids)]
                t_send = time.time()
                try:
                    tok = self.broker.tokens.GetToken(pb.GetTokenRequest(connection_id=cid),
                                                      timeout=RPC_TIMEOUT_S).token
                except grpc.RpcError as err:
                    t_recv = time.time()
                    with self.lock:
                        self.errors.append(Load.Error(cid, err.code().name, dt.error_reason(err),
                                                      err.details(), t_send, t_recv))
                    time.sleep(0.05)
                    continue
                t_recv = time.time()
                dt.record_secret(tok.access_token)
                o = Load.Obs(cid, tok.generation, epoch(tok.valid_until), epoch(tok.expires_at),
                             t_send, t_recv)
                with self.lock:
                    self.obs.append(o)
                    if cid not in self.latest or self.latest[cid].generation < o.generation:
                        self.latest[cid] = o
                time.sleep(0.005)
        except Exception as e:  # a broken client is a failed test, not a silent thread
            self.failures.append(f"client thread {idx}: {e!r}")

    def generations(self):
        with self.lock:
            return {cid: o.generation for cid, o in self.latest.items()}


class HealthPoller:
    """Polls readiness ("") and tokenbroker.v1.Store on the probe port every 100 ms."""

    def __init__(self, port):
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.stub = health_pb2_grpc.HealthStub(self.channel)
        self.samples = []  # (time, readiness status name or error, store status name or error)
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def start(self):
        self.thread.start()
        return self

    def _check(self, service):
        try:
            resp = self.stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
            return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
        except grpc.RpcError as err:
            return f"error {err.code().name}"

    def _run(self):
        while not self.stop_event.is_set():
            t = time.time()
            self.samples.append((t, self._check(""), self._check(STORE_SERVICE)))
            self.stop_event.wait(0.1)

    def store_status(self):
        return self.samples[-1][2] if self.samples else None

    def stop(self):
        self.stop_event.set()
        self.thread.join(10)
        self.channel.close()


class StoreOutageTest(unittest.TestCase):
    def setUp(self):
        self.t0 = time.monotonic()
        self.tmp = tempfile.mkdtemp(prefix="tb-store-outage-fake-")
        self.pg = self.fake = self.state = self.broker = self.load = self.health = None
        self.pg = PrivatePostgres()
        self.fake = dt.FakeProvider(self.tmp)
        self.state = State(self.fake, self.pg)

    def tearDown(self):
        if self.load is not None:
            self.load.stop()
        if self.health is not None:
            self.health.stop()
        if self.broker is not None:
            self.broker.stop(signal.SIGKILL)
        if self.fake is not None:
            self.fake.stop()
        if self.state is not None:
            self.state.remove()
        if self.pg is not None:
            self.pg.stop()
        shutil.rmtree(self.tmp, ignore_errors=True)
        print(f"  (took {time.monotonic() - self.t0:.1f} s)", flush=True)

    def metric(self, name):
        url = f"http://127.0.0.1:{self.broker.ports['admin']}/metrics"
        with urllib.request.urlopen(url, timeout=5) as r:
            text = r.read().decode()
        m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
        return float(m.group(1)) if m else None

    def wait_for(self, what, predicate, timeout):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if predicate():
                return time.time()
            time.sleep(0.1)
        self.fail(f"{what} within {timeout} s")

    def test_postgres_stopped_and_started_again_serves_valid_tokens_and_recovers(self):
        self.broker = dt.start_broker(self.state)
        short = [f"short-{i}" for i in range(SHORT)]
        long_ = [f"long-{i}" for i in range(LONG)]
        for cid in short:
            self.broker.connect(self.fake, cid, "short")
        for cid in long_:
            self.broker.connect(self.fake, cid, "long")
        ids = short + long_
        self.health = HealthPoller(self.broker.ports["probe"]).start()
        self.load = Load(self.broker, ids).start()

        # Refreshes under way on the database before the outage.
        self.wait_for("every short-lived connection refreshed twice",
                      lambda: all(self.load.generations().get(c, 0) >= 3 for c in short), 20)
        self.wait_for("tokenbroker.v1.Store SERVING",
                      lambda: self.health.store_status() == "SERVING", 5)
        before = self.load.generations()

        t_pause = time.time()
        self.pg.pause()
        t_paused = time.time()
        # Mid-outage: the store's degradation shows in health and metrics.
        t_down = self.wait_for("tokenbroker.v1.Store NOT_SERVING during the outage",
                               lambda: self.health.store_status() == "NOT_SERVING",
                               STORE_OUTAGE_S)
        store_up_during = self.metric("tb_store_up")
        time.sleep(max(0.0, t_pause + STORE_OUTAGE_S - time.time()))
        during = self.load.generations()
        t_resume = time.time()
        self.pg.resume()
        t_resumed = time.time()

        t_up = self.wait_for("tokenbroker.v1.Store SERVING after the outage",
                             lambda: self.health.store_status() == "SERVING", RECOVERY_TIMEOUT_S)
        t_refreshed = self.wait_for(
            "a new generation of every short-lived connection after the outage",
            lambda: all(self.load.generations().get(c, 0) > during.get(c, 0) + 1 for c in short),
            RECOVERY_TIMEOUT_S)
        time.sleep(3)  # a little more load on the recovered broker
        self.load.stop()
        self.health.stop()
        after = self.load.generations()
        store_up_after = self.metric("tb_store_up")

        # Every connection: active and serving a token the provider takes.
        final_errors = []
        for cid in ids:
            try:
                tok = self.broker.get_token(cid)
                status = self.fake.token_status(tok.access_token)
                if status != 200:
                    final_errors.append(f"{cid}: the provider answers {status} for generation "
                                        f"{tok.generation}")
            except grpc.RpcError as err:
                final_errors.append(f"{cid}: {err.code().name} {dt.error_reason(err)}")
        statuses = {}
        for cid in ids:
            c = self.broker.admin.GetConnection(pb.GetConnectionRequest(connection_id=cid),
                                                timeout=dt.RPC_TIMEOUT_S)
            statuses[cid] = pb.ConnectionStatus.Name(c.status)
        stats = self.fake.stats()
        code = self.broker.stop(signal.SIGTERM)
        self.broker = None

        failures = list(self.load.failures)
        # Answers: promised and not expired.
        for o in self.load.obs:
            if o.valid_until < o.t_send - 0.001:
                failures.append(f"{o.cid} generation {o.generation} handed out "
                                f"{o.t_send - o.valid_until:.3f} s past its valid_until")
            if o.expires_at < o.t_send:
                failures.append(f"{o.cid} generation {o.generation} handed out expired")
        # Errors: never for a long-lived connection; for a short-lived one only UNAVAILABLE once
        # the newest token handed out before the call had expired.
        obs_by_cid = collections.defaultdict(list)
        for o in self.load.obs:
            obs_by_cid[o.cid].append(o)
        bad_errors, allowed = [], collections.Counter()
        # Failures while the newest token was past its promise (valid_until) but not expired:
        # counted apart in the report, since they say what the broker does once a refresh is
        # due and cannot run.
        past_promise = collections.Counter()
        for e in self.load.errors:
            seen = [o for o in obs_by_cid[e.cid] if o.t_recv <= e.t_send]
            newest_expiry = max(o.expires_at for o in seen) if seen else 0.0
            newest_promise = max(o.valid_until for o in seen) if seen else 0.0
            # DEADLINE_EXCEEDED: the broker held the call for a refresh; fair only if nothing
            # valid was left to serve when the call arrived.
            valid_past = e.t_send if e.code == "DEADLINE_EXCEEDED" else e.t_recv
            if e.cid in long_:
                why = "a long-lived connection failed"
            elif e.code not in ("UNAVAILABLE", "DEADLINE_EXCEEDED"):
                why = f"{e.code} instead of UNAVAILABLE or DEADLINE_EXCEEDED"
            elif newest_expiry > valid_past + EXPIRY_SLACK_S:
                why = (f"failed while the token handed out before was valid "
                       f"{newest_expiry - valid_past:.3f} s more (its promise "
                       f"{'ran out' if newest_promise <= e.t_send else 'ran out later'} "
                       f"{abs(e.t_send - newest_promise):.3f} s "
                       f"{'before' if newest_promise <= e.t_send else 'after'} the call)")
                if newest_promise <= e.t_send:
                    past_promise[e.cid] += 1
            else:
                allowed[f"{e.cid} {e.code}"] += 1
                continue
            bad_errors.append(f"{e.cid} {e.code} {e.reason} '{e.details}' sent "
                              f"{e.t_send - t_pause:+.3f} s from the pause: {why}")
        # Health.
        ready_bad = [(t - t_pause, r) for t, r, _ in self.health.samples if r != "SERVING"]
        store_before = {s for t, _, s in self.health.samples if t < t_pause}
        store_down = [t for t, _, s in self.health.samples
                      if s == "NOT_SERVING" and t_pause <= t <= t_resumed]
        store_last = self.health.samples[-1][2]

        print(f"\n  PostgreSQL paused {t_pause - t_pause:+.1f}..{t_paused - t_pause:+.1f} s, "
              f"started again {t_resume - t_pause:+.1f}..{t_resumed - t_pause:+.1f} s; "
              f"Store NOT_SERVING seen at {t_down - t_pause:+.1f} s, SERVING again at "
              f"{t_up - t_pause:+.1f} s; every short connection refreshed again by "
              f"{t_refreshed - t_pause:+.1f} s", flush=True)
        print(f"  GetToken: {len(self.load.obs)} answers, {len(self.load.errors)} errors "
              f"(allowed, past expiry: {dict(allowed)}); health polls: "
              f"{len(self.health.samples)}, readiness not SERVING: {len(ready_bad)}; "
              f"tb_store_up during {store_up_during}, after {store_up_after}", flush=True)
        print(f"  generations before the outage {before}, at its end {during}, final {after}; "
              f"provider: {stats['calls']['token_refresh']} refreshes, "
              f"{stats['refresh_token_reuse_attempts']} refresh tokens presented again",
              flush=True)
        if bad_errors:
            print(f"  {len(bad_errors)} GetToken failures not allowed, "
                  f"{sum(past_promise.values())} of them past the token's promise (valid_until) "
                  f"but before its expiry: {dict(past_promise)}", flush=True)
        for f in (failures + bad_errors[:10] + final_errors)[:30]:
            print(f"  FAILURE {f}", flush=True)

        # Every check, then one assertion per check, so that a failure shows all of them.
        load_during = {cid: sum(1 for o in obs_by_cid[cid] if t_paused < o.t_send < t_resume)
                       for cid in long_}
        checks = [
            ("answers promised and not expired", failures, []),
            ("no GetToken failure for a token still valid", bad_errors[:10], []),
            ("every connection serves a live token at the end", final_errors, []),
            ("readiness SERVING at every poll", ready_bad, []),
            ("Store SERVING before the outage", store_before, {"SERVING"}),
            ("Store NOT_SERVING seen while PostgreSQL was down", bool(store_down), True),
            ("Store SERVING at the end", store_last, "SERVING"),
            ("tb_store_up during / after", (store_up_during, store_up_after), (0, 1)),
            ("every connection active", set(statuses.values()), {"CONNECTION_STATUS_ACTIVE"}),
            ("long-lived connections under load during the outage (>10 answers each)",
             all(n > 10 for n in load_during.values()), True),
            ("short-lived connections refreshed again after the outage",
             [c for c in short if after[c] <= during[c] + 1], []),
            ("no refresh token presented twice", stats["refresh_token_reuse_attempts"], 0),
            ("SIGTERM exit code", code, 0),
        ]
        broken = [name for name, got, want in checks if got != want]
        if broken:
            print(f"  checks failed: {broken}", flush=True)
        for name, got, want in checks:
            self.assertEqual(got, want, name)


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit("usage: store_outage_test.py <token-broker> <fake_provider> [unittest args]")
    dt.BROKER, dt.FAKE_PROVIDER = sys.argv.pop(1), sys.argv.pop(1)
    unittest.main()
