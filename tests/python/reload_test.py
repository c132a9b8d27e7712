#!/usr/bin/python3
"""Issue 7's SIGHUP on the real binaries: providers, callers and the log level reload without a
restart and without dropping a connection.

One token-broker (default SQLite store, API-key callers over loopback) against the real
fake_provider binary. A connection with 4-second tokens refreshes continuously while one
WatchToken stream stays open across three configurations, each applied by editing the file and
sending SIGHUP:

  v1  caller A; provider `short`; log level info.
  v2  caller B added; provider `later` added; `short` given a wrong client secret; log level
      debug.
  v3  `short`'s secret restored.

Must hold:
  - before v2, caller B is UNAUTHENTICATED and provider `later` is unknown (INVALID_ARGUMENT);
    after it, B is served and an account connects through `later`;
  - under v2, `short`'s refresh is refused by the provider (invalid_client): the broker counts
    it as misconfigured and calls the provider no more for it;
  - under v3, the refresh that came due meanwhile runs by itself and the connection serves a
    token of a newer generation that the provider accepts;
  - the WatchToken stream opened under v1 is still open after both reloads and delivers that
    generation;
  - the admin server's per-request debug line appears only after the reload to debug;
  - a configuration that does not load (a typo) changes nothing: the broker keeps serving;
  - SIGTERM then exits 0.

Usage: /usr/bin/python3 reload_test.py <token-broker> <fake_provider> [unittest args]
       PYTHONPATH must hold the generated stubs. With TB_TEST_LOG_DIR set, every log goes there
       and secrets are recorded for the end-of-run scan.
"""
import collections
import hashlib
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import unittest
import urllib.request

import grpc
from tokenbroker.v1 import token_broker_pb2 as pb
from tokenbroker.v1 import token_broker_pb2_grpc as pb_grpc

# The fake provider, broker process and browser-flow helpers of the durability test.
import durability_test as dt

LIFETIME_S = 4
WAIT_S = 30


class _Details(collections.namedtuple(
        "_Details", ("method", "timeout", "metadata", "credentials", "wait_for_ready",
                     "compression")), grpc.ClientCallDetails):
    pass


class ApiKey(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """Sends `authorization: Bearer <key>` with every call of a channel."""

    def __init__(self, key):
        self.metadata = [("authorization", f"Bearer {key}")]

    def _with_key(self, d):
        return _Details(d.method, d.timeout, list(d.metadata or []) + self.metadata,
                        d.credentials, d.wait_for_ready, d.compression)

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._with_key(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._with_key(details), request)


def new_key(label):
    key = dt.new_test_secret(label)
    return key, hashlib.sha256(key.encode()).hexdigest()


class Config:
    """The broker's data directory and its config file, rewritten for each version."""

    def __init__(self, fake):
        self.fake = fake
        self.path = tempfile.mkdtemp(prefix="tb-reload-test-")
        self.keys = dt.write_key_ring(self.path)
        self.wrong_secret_file = os.path.join(self.path, "wrong-client-secret")
        with open(self.wrong_secret_file, "w") as f:
            f.write(dt.new_test_secret("reload-wrong-client-secret") + "\n")
        self.file = os.path.join(self.path, "config.yaml")
        self.log = os.path.join(dt.log_dir() or self.path,
                                f"token-broker-reload-{os.getpid()}-{time.time_ns()}.log")
        self.db = os.path.join(self.path, "tokens.db")

    def provider(self, name, secret_file):
        b = self.fake.base
        return f"""\
  {name}:
    preset: generic
    client_id: "{self.fake.client_id}"
    client_secret_file: "{secret_file}"
    authorize_url: "{b}/oauth/authorizations/new"
    token_url: "{b}/oauth/tokens"
    revoke_url: "{b}/oauth/revoke"
    ca_file: "{self.fake.ca_file}"
    expires_in: {LIFETIME_S}
"""

    def write(self, callers, level, providers):
        text = f"""\
store: {{url: "sqlite://{self.db}", encryption_keys_file: "{self.keys}"}}
log: {{level: {level}}}
refresh: {{retry_delay: 1s}}
shutdown: {{drain_delay: 0s}}
http: {{rate_limit_per_minute: 0}}  # every connect flow comes from 127.0.0.1
auth:
  callers:
"""
        for name, digest in callers:
            text += (f'    - {{name: {name}, api_key_sha256: ["{digest}"], connections: ["*"],\n'
                     "       rpcs: [GetToken, Refresh, Revoke, Admin]}\n")
        text += "providers:\n" + "".join(providers)
        tmp = self.file + ".tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, self.file)  # as a ConfigMap update does: never half a file


class Broker(dt.Broker):
    """token-broker on free ports with the config's log level (no --log_level flag, which
    would win over the file), calling as the caller whose API key is given."""

    def __init__(self, config, api_key):
        self.state = config
        self.ports = {name: dt.free_port() for name in ("grpc", "probe", "public", "admin")}
        self.public_base_url = f"http://127.0.0.1:{self.ports['public']}"
        self.proc = subprocess.Popen(
            [dt.BROKER, f"--config={config.file}", *dt.listen_args(self.ports, self.public_base_url),
             f"--log_file={config.log}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.channel = self.open_channel(api_key)
        self.tokens = pb_grpc.TokenBrokerStub(self.channel)
        self.admin = pb_grpc.ConnectionAdminStub(self.channel)

    def open_channel(self, api_key):
        return grpc.intercept_channel(grpc.insecure_channel(f"127.0.0.1:{self.ports['grpc']}"),
                                      ApiKey(api_key))

    def metric(self, name, **labels):
        """The value of one sample on /metrics (0 when absent)."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.ports['admin']}/metrics",
                                    timeout=dt.RPC_TIMEOUT_S) as r:
            text = r.read().decode()
        want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        for line in text.splitlines():
            m = re.match(r"^(\w+)(?:\{(.*)\})? (\S+)$", line)
            if m and m.group(1) == name and ",".join(sorted((m.group(2) or "").split(","))) == want:
                return float(m.group(3))
        return 0.0


class Watch:
    """One WatchToken stream, read on a thread: every generation seen, and how it ended."""

    def __init__(self, stub, connection_id):
        self.call = stub.WatchToken(pb.WatchTokenRequest(connection_id=connection_id))
        self.generations = []
        self.ended = None
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        try:
            for resp in self.call:
                dt.record_secret(resp.token.access_token)
                with self.lock:
                    self.generations.append(resp.token.generation)
            ended = "stream ended"
        except grpc.RpcError as e:
            ended = (e.code(), e.details())
        with self.lock:
            self.ended = ended

    def snapshot(self):
        with self.lock:
            return list(self.generations), self.ended

    def cancel(self):
        self.call.cancel()
        self.thread.join(10)


def http_status(port, path):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=dt.RPC_TIMEOUT_S) as r:
        r.read()
        return r.status


def wait_for(what, predicate, timeout=WAIT_S, state=lambda: ""):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what} {state()}")


class ReloadTest(unittest.TestCase):
    def setUp(self):
        self.fake = dt.FakeProvider(tempfile.mkdtemp(prefix="tb-reload-fake-"))
        self.config = Config(self.fake)
        self.broker = None

    def tearDown(self):
        if self.broker is not None and self.broker.proc.poll() is None:
            self.broker.stop(signal.SIGKILL)
        self.fake.stop()

    def reload(self, marker_count):
        """SIGHUP, then waits until the broker logged its `marker_count`-th reload outcome."""
        self.broker.proc.send_signal(signal.SIGHUP)

        def reloaded():
            with open(self.config.log) as f:
                return len(re.findall(r"providers reloaded|not reloaded", f.read())) >= marker_count

        wait_for(f"reload #{marker_count}", reloaded)

    def test_sighup_reloads_providers_callers_and_level_without_dropping_connections(self):
        key_a, digest_a = new_key("reload-api-key-a")
        key_b, digest_b = new_key("reload-api-key-b")
        good, wrong = self.fake.secret_file, self.config.wrong_secret_file
        cfg = self.config
        cfg.write([("a", digest_a)], "info", [cfg.provider("short", good)])
        self.broker = broker = Broker(cfg, key_a).wait_ready()
        as_b = broker.open_channel(key_b)
        tokens_b = pb_grpc.TokenBrokerStub(as_b)

        # v1: A serves; B is unknown; `later` is unknown; no per-request debug lines.
        broker.connect(self.fake, "c1", "short")
        first = broker.get_token("c1")
        watch = Watch(broker.tokens, "c1")
        with self.assertRaises(grpc.RpcError) as err:
            tokens_b.GetToken(pb.GetTokenRequest(connection_id="c1"), timeout=dt.RPC_TIMEOUT_S)
        self.assertEqual(err.exception.code(), grpc.StatusCode.UNAUTHENTICATED)
        with self.assertRaises(grpc.RpcError) as err:
            broker.admin.CreateConnectLink(
                pb.CreateConnectLinkRequest(connection_id="c2", provider="later"),
                timeout=dt.RPC_TIMEOUT_S)
        self.assertEqual(err.exception.code(), grpc.StatusCode.INVALID_ARGUMENT)
        self.assertEqual(http_status(broker.ports["admin"], "/healthz"), 200)

        # A file that does not load changes nothing.
        with open(cfg.file, "a") as f:
            f.write("no_such_key: 1\n")
        self.reload(1)
        self.assertGreaterEqual(broker.get_token("c1").generation, first.generation)

        # v2: caller B, provider `later`, a wrong secret for `short`, debug.
        cfg.write([("a", digest_a), ("b", digest_b)], "debug",
                  [cfg.provider("short", wrong), cfg.provider("later", good)])
        self.reload(2)
        served_b = tokens_b.GetToken(pb.GetTokenRequest(connection_id="c1"),
                                     timeout=dt.RPC_TIMEOUT_S).token
        dt.record_secret(served_b.access_token)
        broker.connect(self.fake, "c2", "later")
        self.assertEqual(self.fake.token_status(broker.get_token("c2").access_token), 200)
        self.assertEqual(http_status(broker.ports["admin"], "/healthz"), 200)
        wait_for("a refresh refused as misconfigured",
                 lambda: broker.metric("tb_refresh_attempts_total", provider="short",
                                       outcome="misconfigured") >= 1)
        stuck, _ = watch.snapshot()
        time.sleep(LIFETIME_S / 2)  # no retry storm: no further call, no new token
        self.assertEqual(watch.snapshot()[0][-1], stuck[-1])
        self.assertEqual(broker.metric("tb_refresh_attempts_total", provider="short",
                                       outcome="misconfigured"), 1)

        # v3: the right secret again; the due refresh runs by itself.
        cfg.write([("a", digest_a), ("b", digest_b)], "debug",
                  [cfg.provider("short", good), cfg.provider("later", good)])
        self.reload(3)
        wait_for("a newer generation on the open stream",
                 lambda: watch.snapshot()[0][-1] > stuck[-1],
                 state=lambda: f"(stream: generations, end: {watch.snapshot()})")
        generations, ended = watch.snapshot()
        self.assertIsNone(ended, "the WatchToken stream ended across a reload")
        self.assertEqual(generations, sorted(generations))
        now = broker.get_token("c1")
        self.assertGreater(now.generation, stuck[-1])
        self.assertEqual(self.fake.token_status(now.access_token), 200)
        self.assertEqual(self.fake.stats()["refresh_token_reuse_attempts"], 0)
        watch.cancel()
        as_b.close()

        self.assertEqual(broker.stop(signal.SIGTERM), 0)
        with open(cfg.log) as f:
            log = f.read()
        first_reload = log.index("SIGHUP: reloading")
        debug_line = "http server admin: GET /healthz"
        self.assertNotIn(debug_line, log[:first_reload])
        self.assertIn(debug_line, log[first_reload:])
        self.assertIn("provider later added", log)
        self.assertIn("provider short changed", log)
        self.assertIn("not reloaded", log)


if __name__ == "__main__":
    dt.BROKER = sys.argv[1]
    dt.FAKE_PROVIDER = sys.argv[2]
    unittest.main(argv=[sys.argv[0]] + sys.argv[3:])
