#!/usr/bin/python3
"""The real token-broker binary, as the README's first command starts it.

Starts token-broker on free loopback ports with its default store (SQLite, encrypted) and checks
that every listener answers as documented (admin HTTP /healthz and /readyz, the public port's 404
with security headers, gRPC health on the probe port, the main port's contract), that SIGTERM
drains and exits 0, that what it stored survives a restart, that a second process on the same
database file and a missing encryption key are refused, and that bad configuration is refused at
start with a message naming the problem.

Usage: /usr/bin/python3 binary_test.py <path to token-broker> [unittest arguments]
"""
import base64
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import unittest
import urllib.error
import urllib.request

import grpc
from grpc_health.v1 import health_pb2
from grpc_health.v1 import health_pb2_grpc
from tokenbroker.v1 import token_broker_pb2 as pb
from tokenbroker.v1 import token_broker_pb2_grpc as pb_grpc

BROKER = ""
START_TIMEOUT_S = 30
MAX_HEADER_BYTES = 2048  # the default is 8 KiB
RATE_LIMIT_BURST = 4
MAX_CONCURRENT_REFRESHES = 12  # the default is 16
RETURN_URL_PREFIX = "https://admin.example.com/zendesk/"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(port, path):
    """(status, headers, body) of GET http://127.0.0.1:port/path."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.headers, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read().decode()


def record_secret(value):
    """Adds a secret to the end-of-run log scan (tests/support/scan_logs_for_secrets.py)."""
    log_dir = os.environ.get("TB_TEST_LOG_DIR", "")
    if log_dir:
        with open(os.path.join(log_dir, f"secrets-{os.getpid()}.txt"), "a") as f:
            f.write(value + "\n")


class StateDir:
    """A data directory as an operator sets it up: an encryption key file, a config naming it
    and the default SQLite store inside the directory."""

    def __init__(self, drain_delay="0s"):
        self.path = tempfile.mkdtemp(prefix="tb-binary-test-")
        key = base64.b64encode(os.urandom(32)).decode()
        record_secret(key)
        self.keys = os.path.join(self.path, "keys")
        with open(self.keys, "w") as f:
            f.write(f"k1 {key}\n")
        self.db = os.path.join(self.path, "tokens.db")
        self.config = os.path.join(self.path, "config.yaml")
        self.client_secret = os.path.join(self.path, "client_secret")
        with open(self.client_secret, "w") as f:
            secret = base64.urlsafe_b64encode(os.urandom(24)).decode()
            record_secret(secret)
            f.write(secret)
        # One caller, authenticated by an API key (the config holds only its SHA-256).
        self.api_key = base64.urlsafe_b64encode(os.urandom(24)).decode()
        record_secret(self.api_key)
        digest = hashlib.sha256(self.api_key.encode()).hexdigest()
        with open(self.config, "w") as f:
            f.write(f'store: {{url: "sqlite://{self.db}", encryption_keys_file: "{self.keys}"}}\n')
            f.write("auth:\n  callers:\n")
            f.write(f'    - {{name: tests, api_key_sha256: ["{digest}"], connections: ["*"],\n')
            f.write("       rpcs: [GetToken, Refresh, Revoke, Admin]}\n")
            f.write(f"shutdown: {{drain_delay: {drain_delay}, grace: 5s}}\n")
            # The public front's limits and the return-URL allow-list, set away from their
            # defaults so that the tests see main pass them on.
            f.write(f"http: {{max_header_bytes: {MAX_HEADER_BYTES}, rate_limit_per_minute: 6, "
                    f"rate_limit_burst: {RATE_LIMIT_BURST}}}\n")
            f.write(f'links: {{return_url_allowlist: ["{RETURN_URL_PREFIX}"]}}\n')
            f.write(f"refresh: {{max_concurrent: {MAX_CONCURRENT_REFRESHES}}}\n")
            # A provider for minting links; nothing here ever calls it.
            f.write("providers:\n  acme:\n    preset: generic\n    client_id: tests\n")
            f.write(f'    client_secret_file: "{self.client_secret}"\n')
            f.write('    authorize_url: "https://127.0.0.1:9/authorize"\n')
            f.write('    token_url: "https://127.0.0.1:9/token"\n')
            f.write('    revoke_url: "https://127.0.0.1:9/revoke"\n')

    def credentials(self):
        return [("authorization", f"Bearer {self.api_key}")]

    def remove(self):
        shutil.rmtree(self.path, ignore_errors=True)


class Broker:
    """token-broker in a child process on free ports, on the store of `state`."""

    def __init__(self, state, *extra):
        self.ports = {name: free_port() for name in ("grpc", "probe", "public", "admin")}
        # The log goes to the whole-run secret scan's directory when there is one.
        log_dir = os.environ.get("TB_TEST_LOG_DIR", "") or state.path
        self.log_path = os.path.join(log_dir, f"token-broker-{os.getpid()}-{time.time_ns()}.log")
        args = [BROKER, f"--config={state.config}",
                f"--grpc_listen=127.0.0.1:{self.ports['grpc']}",
                f"--probe_listen=127.0.0.1:{self.ports['probe']}",
                f"--public_listen=127.0.0.1:{self.ports['public']}",
                f"--admin_listen=127.0.0.1:{self.ports['admin']}",
                "--log_level=trace", f"--log_file={self.log_path}", *extra]
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def wait_ready(self):
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"token-broker exited with {self.proc.returncode}: "
                                   f"{self.proc.stderr.read().decode()}")
            try:
                if http_get(self.ports["admin"], "/readyz")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise TimeoutError("token-broker did not become ready")

    def stop(self, sig=signal.SIGTERM, timeout=15):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise
        return self.proc.returncode


class BinaryTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.state = StateDir()
        cls.broker = Broker(cls.state)
        try:
            cls.broker.wait_ready()
        except BaseException:
            cls.broker.stop(signal.SIGKILL)
            raise

    @classmethod
    def tearDownClass(cls):
        if cls.broker.proc.poll() is None:
            cls.broker.stop(signal.SIGKILL)
        cls.state.remove()

    def channel(self, port):
        return grpc.insecure_channel(f"127.0.0.1:{port}")

    def test_admin_port_serves_health_endpoints(self):
        self.assertEqual(http_get(self.broker.ports["admin"], "/healthz")[0], 200)
        self.assertEqual(http_get(self.broker.ports["admin"], "/readyz")[0], 200)
        self.assertEqual(http_get(self.broker.ports["admin"], "/nothing")[0], 404)

    def test_public_port_serves_nothing_operational(self):
        for path in ("/healthz", "/readyz", "/metrics", "/"):
            status, headers, _ = http_get(self.broker.ports["public"], path)
            self.assertEqual(status, 404, path)
            self.assertEqual(headers["X-Content-Type-Options"], "nosniff")
            self.assertEqual(headers["Referrer-Policy"], "no-referrer")

    def test_probe_port_reports_liveness_and_readiness(self):
        with self.channel(self.broker.ports["probe"]) as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            for service in ("liveness", "", "tokenbroker.v1.TokenBroker"):
                resp = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
                self.assertEqual(resp.status, health_pb2.HealthCheckResponse.SERVING, service)

    def test_main_port_answers_the_contract(self):
        with self.channel(self.broker.ports["grpc"]) as ch:
            stub = pb_grpc.TokenBrokerStub(ch)
            md = self.state.credentials()
            with self.assertRaises(grpc.RpcError) as err:
                stub.GetToken(pb.GetTokenRequest(connection_id="acme"), timeout=5, metadata=md)
            self.assertEqual(err.exception.code(), grpc.StatusCode.NOT_FOUND)
            admin = pb_grpc.ConnectionAdminStub(ch)
            self.assertEqual(len(admin.ListConnections(pb.ListConnectionsRequest(), timeout=5,
                                                       metadata=md).connections), 0)

    def test_failed_get_tokens_are_logged_at_debug_without_caller_garbage(self):
        with self.channel(self.broker.ports["grpc"]) as ch:
            stub = pb_grpc.TokenBrokerStub(ch)
            md = self.state.credentials()
            for connection_id in ("nobody-logged", "forged\n2026-01-01 I a fake line"):
                with self.assertRaises(grpc.RpcError):
                    stub.GetToken(pb.GetTokenRequest(connection_id=connection_id), timeout=5,
                                  metadata=md)
        with open(self.broker.log_path) as f:
            log = f.read()
        self.assertIn("GetToken failed connection=nobody-logged code=NOT_FOUND", log)
        self.assertIn("GetToken failed connection=(not a valid id) code=INVALID_ARGUMENT "
                      "message=connection id must be", log)
        self.assertNotIn("a fake line", log)

    def test_main_port_refuses_callers_without_a_known_key(self):
        with self.channel(self.broker.ports["grpc"]) as ch:
            stub = pb_grpc.TokenBrokerStub(ch)
            for md in ([], [("authorization", "Bearer not-a-configured-key")]):
                with self.assertRaises(grpc.RpcError) as err:
                    stub.GetToken(pb.GetTokenRequest(connection_id="acme"), timeout=5,
                                  metadata=md)
                self.assertEqual(err.exception.code(), grpc.StatusCode.UNAUTHENTICATED)
                admin = pb_grpc.ConnectionAdminStub(ch)
                with self.assertRaises(grpc.RpcError) as err:
                    admin.ListConnections(pb.ListConnectionsRequest(), timeout=5, metadata=md)
                self.assertEqual(err.exception.code(), grpc.StatusCode.UNAUTHENTICATED)
            # Health needs no credentials, on the main port too.
            health = health_pb2_grpc.HealthStub(ch)
            resp = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
            self.assertEqual(resp.status, health_pb2.HealthCheckResponse.SERVING)

    def test_metrics_are_served_in_prometheus_format(self):
        with self.channel(self.broker.ports["grpc"]) as ch:
            stub = pb_grpc.TokenBrokerStub(ch)
            with self.assertRaises(grpc.RpcError):
                stub.GetToken(pb.GetTokenRequest(connection_id="nobody"), timeout=5,
                              metadata=self.state.credentials())
        status, headers, body = http_get(self.broker.ports["admin"], "/metrics")
        self.assertEqual(status, 200)
        self.assertIn("text/plain", headers["Content-Type"])
        self.assertIn('tb_grpc_requests_total{method="GetToken",code="NOT_FOUND"}', body)
        self.assertIn("# TYPE tb_grpc_request_duration_seconds histogram", body)
        self.assertIn('tb_connections{status="active"} 0', body)
        self.assertIn("tb_store_up 1", body)
        # The provider client reports into the same registry.
        self.assertIn("# TYPE tb_provider_http_request_duration_seconds histogram", body)
        self.assertNotIn("nobody", body)  # no connection id as a label

    def test_public_port_applies_the_configured_header_limit(self):
        # 4 KiB of header: within the default limit, over the configured one.
        with socket.create_connection(("127.0.0.1", self.broker.ports["public"]), 5) as s:
            s.sendall(b"GET /oauth/start HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 4096 +
                      b"\r\n\r\n")
            head = s.recv(4096).decode(errors="replace")
        self.assertTrue(head.startswith("HTTP/1.1 431"), head[:200])

    def test_oauth_routes_are_rate_limited_per_client_ip(self):
        # Burst of RATE_LIMIT_BURST, refilled at 6 a minute: a quick run of requests from one
        # address gets its answers (400: no link) and then 429 with Retry-After. No other test
        # reaches the OAuth handler. Other paths are not limited.
        statuses, retry_after = [], None
        for _ in range(RATE_LIMIT_BURST + 3):
            status, headers, _ = http_get(self.broker.ports["public"], "/oauth/start")
            statuses.append(status)
            if status == 429:
                retry_after = headers["Retry-After"]
        self.assertEqual(statuses[:RATE_LIMIT_BURST], [400] * RATE_LIMIT_BURST, statuses)
        self.assertEqual(statuses[-1], 429, statuses)
        self.assertIsNotNone(retry_after)
        self.assertGreaterEqual(int(retry_after), 1)
        self.assertEqual(http_get(self.broker.ports["public"], "/elsewhere")[0], 404)

    def test_connect_link_return_url_must_be_on_the_allow_list(self):
        with self.channel(self.broker.ports["grpc"]) as ch:
            admin = pb_grpc.ConnectionAdminStub(ch)
            md = self.state.credentials()
            link = admin.CreateConnectLink(
                pb.CreateConnectLinkRequest(connection_id="return-url-ok", provider="acme",
                                            return_url=RETURN_URL_PREFIX + "done"),
                timeout=5, metadata=md)
            self.assertIn("/oauth/start?link=", link.url)
            for bad in ("https://evil.example.com/zendesk/done",
                        "https://admin.example.com/elsewhere", "javascript:alert(1)"):
                with self.assertRaises(grpc.RpcError) as err:
                    admin.CreateConnectLink(
                        pb.CreateConnectLinkRequest(connection_id="return-url-bad",
                                                    provider="acme", return_url=bad),
                        timeout=5, metadata=md)
                self.assertEqual(err.exception.code(), grpc.StatusCode.INVALID_ARGUMENT, bad)
                self.assertRegex(err.exception.details().lower(), "return[ _]url", bad)
            # Nothing was created for the refused links.
            with self.assertRaises(grpc.RpcError) as err:
                admin.GetConnection(pb.GetConnectionRequest(connection_id="return-url-bad"),
                                    timeout=5, metadata=md)
            self.assertEqual(err.exception.code(), grpc.StatusCode.NOT_FOUND)
            # Leaves no connection behind for the other tests of this broker.
            admin.DeleteConnection(pb.DeleteConnectionRequest(connection_id="return-url-ok"),
                                   timeout=5, metadata=md)

    def test_the_work_pool_has_a_thread_for_each_refresh_in_flight_and_four_more(self):
        # Each scheduled refresh holds a work thread through its provider call and store writes:
        # with fewer threads than refresh.max_concurrent, the setting would be a lie.
        tasks = f"/proc/{self.broker.proc.pid}/task"
        names = []
        for tid in os.listdir(tasks):
            try:
                with open(f"{tasks}/{tid}/comm") as f:
                    names.append(f.read().strip())
            except FileNotFoundError:
                pass  # a thread that ended meanwhile
        self.assertEqual(names.count("work"), MAX_CONCURRENT_REFRESHES + 4, sorted(set(names)))

    def test_no_core_dumps(self):
        with open(f"/proc/{self.broker.proc.pid}/limits") as f:
            line = next(l for l in f if l.startswith("Max core file size"))
        self.assertEqual(line.split()[4:6], ["0", "0"])  # soft and hard limits

    def test_zz_sigterm_drains_and_exits_zero(self):  # runs last: it stops the shared broker
        started = time.monotonic()
        self.assertEqual(self.broker.stop(signal.SIGTERM), 0)
        self.assertLess(time.monotonic() - started, 15)


class SigtermUnderLoadTest(unittest.TestCase):
    """A rollout: callers keep calling until their load balancer sees readiness go away."""

    def test_sigterm_during_load_fails_no_in_flight_call(self):
        import threading
        state = StateDir(drain_delay="2s")
        broker = Broker(state)
        try:
            broker.wait_ready()
            stop = threading.Event()
            failures = []
            answered = [0]
            lock = threading.Lock()

            def caller():
                with grpc.insecure_channel(f"127.0.0.1:{broker.ports['grpc']}") as ch:
                    stub = pb_grpc.TokenBrokerStub(ch)
                    while not stop.is_set():
                        try:
                            stub.GetToken(pb.GetTokenRequest(connection_id="acme"), timeout=5,
                                          metadata=state.credentials())
                        except grpc.RpcError as e:
                            # NOT_FOUND is the broker's answer (no such connection): the call
                            # was served. Anything else is a failed call.
                            with lock:
                                if e.code() == grpc.StatusCode.NOT_FOUND:
                                    answered[0] += 1
                                else:
                                    failures.append(e.code())

            threads = [threading.Thread(target=caller) for _ in range(4)]
            for t in threads:
                t.start()
            time.sleep(0.5)
            broker.proc.send_signal(signal.SIGTERM)
            # The load balancer watches readiness on the probe port and stops sending when it
            # goes NOT_SERVING (within the drain delay).
            with grpc.insecure_channel(f"127.0.0.1:{broker.ports['probe']}") as ch:
                health = health_pb2_grpc.HealthStub(ch)
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline:
                    resp = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
                    if resp.status == health_pb2.HealthCheckResponse.NOT_SERVING:
                        live = health.Check(health_pb2.HealthCheckRequest(service="liveness"),
                                            timeout=5)
                        self.assertEqual(live.status, health_pb2.HealthCheckResponse.SERVING)
                        break
                    time.sleep(0.05)
                else:
                    self.fail("readiness never went NOT_SERVING")
            stop.set()
            for t in threads:
                t.join()
            self.assertEqual(broker.proc.wait(30), 0)
            self.assertEqual(failures, [])
            self.assertGreater(answered[0], 0)
        finally:
            if broker.proc.poll() is None:
                broker.stop(signal.SIGKILL)
            state.remove()


class DurableStoreTest(unittest.TestCase):
    def setUp(self):
        self.state = StateDir()

    def tearDown(self):
        self.state.remove()

    def test_a_second_process_on_the_same_file_is_refused(self):
        first = Broker(self.state)
        try:
            first.wait_ready()
            second = Broker(self.state)
            code = second.proc.wait(30)
            err = second.proc.stderr.read().decode()
            self.assertNotEqual(code, 0)
            self.assertIn(self.state.db, err)
            self.assertIn(str(first.proc.pid), err)  # names the process that owns it
        finally:
            self.assertEqual(first.stop(), 0)
        again = Broker(self.state)  # once the owner has exited, the file opens again
        try:
            again.wait_ready()
        finally:
            self.assertEqual(again.stop(), 0)

    def test_a_missing_or_wrong_key_is_a_clear_start_up_error(self):
        first = Broker(self.state)
        first.wait_ready()
        self.assertEqual(first.stop(), 0)
        # The store remembers which key sealed it: another key under the same id is refused.
        other = base64.b64encode(os.urandom(32)).decode()
        record_secret(other)
        with open(self.state.keys, "w") as f:
            f.write(f"k1 {other}\n")
        proc = subprocess.run([BROKER, f"--config={self.state.config}",
                               "--grpc_listen=127.0.0.1:0", "--probe_listen=127.0.0.1:0",
                               "--public_listen=127.0.0.1:0", "--admin_listen=127.0.0.1:0"],
                              capture_output=True, timeout=30)
        self.assertNotEqual(proc.returncode, 0)
        self.assertIn("k1", proc.stderr.decode())
        os.remove(self.state.keys)
        proc = subprocess.run([BROKER, f"--config={self.state.config}"], capture_output=True,
                              timeout=30)
        self.assertNotEqual(proc.returncode, 0)
        self.assertIn(self.state.keys, proc.stderr.decode())


class StartupErrorTest(unittest.TestCase):
    def run_broker(self, *args):
        proc = subprocess.run([BROKER, *args], capture_output=True, timeout=30)
        return proc.returncode, proc.stderr.decode()

    def test_unknown_config_key_is_refused_naming_it(self):
        with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
            f.write("grpc:\n  listne: 127.0.0.1:0\n")
            f.flush()
            code, err = self.run_broker(f"--config={f.name}")
        self.assertNotEqual(code, 0)
        self.assertIn("grpc.listne", err)

    def test_a_durable_store_without_encryption_keys_is_refused(self):
        code, err = self.run_broker("--grpc_listen=127.0.0.1:0", "--probe_listen=127.0.0.1:0",
                                    "--public_listen=127.0.0.1:0", "--admin_listen=127.0.0.1:0")
        self.assertNotEqual(code, 0)
        self.assertIn("encryption_keys_file", err)

    def test_plaintext_or_insecure_grpc_on_a_non_loopback_listener_is_refused(self):
        state = StateDir()
        try:
            for extra, mentions in (([], "grpc.tls"),
                                    (["--config=" + state.config + ".insecure"],
                                     "--allow_insecure_grpc_on_non_loopback")):
                with open(state.config + ".insecure", "w") as f:
                    f.write(open(state.config).read())
                    f.write("grpc: {insecure: true}\n")
                args = extra or [f"--config={state.config}"]
                code, err = self.run_broker(*args, "--grpc_listen=0.0.0.0:0",
                                            "--probe_listen=127.0.0.1:0",
                                            "--public_listen=127.0.0.1:0",
                                            "--admin_listen=127.0.0.1:0")
                self.assertNotEqual(code, 0)
                self.assertIn(mentions, err)
        finally:
            state.remove()

    def test_missing_config_file_is_refused(self):
        code, err = self.run_broker("--config=/nonexistent/token-broker.yaml")
        self.assertNotEqual(code, 0)
        self.assertIn("/nonexistent/token-broker.yaml", err)

    def test_port_in_use_is_refused(self):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            s.listen()
            port = s.getsockname()[1]
            code, err = self.run_broker("--store_url=memory:", f"--admin_listen=127.0.0.1:{port}",
                                        "--grpc_listen=127.0.0.1:0", "--probe_listen=127.0.0.1:0",
                                        "--public_listen=127.0.0.1:0")
        self.assertNotEqual(code, 0)
        self.assertIn(str(port), err)


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: binary_test.py <path to token-broker> [unittest arguments]")
    BROKER = sys.argv.pop(1)
    unittest.main()
