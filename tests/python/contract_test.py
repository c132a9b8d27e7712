#!/usr/bin/python3
"""token-broker's gRPC contract, seen from Python with stubs generated from the .proto files.

Starts the real servers over a seeded broker (the seeded_broker binary, tests/support/seed.h)
and checks what a client in another language relies on: codes, the google.rpc.ErrorInfo reason
in the `grpc-status-details-bin` trailer, and the health service on the probe port.

Usage: /usr/bin/python3 contract_test.py <path to seeded_broker> [unittest arguments]
       (or set TB_SEEDED_BROKER). PYTHONPATH must hold the generated stubs; TB_TEST_LOG_DIR,
       if set, is passed on to seeded_broker for the secret scan.
"""
import os
import select
import signal
import subprocess
import sys
import time
import unittest

import grpc
from google.rpc import error_details_pb2
from google.rpc import status_pb2
from grpc_health.v1 import health_pb2
from grpc_health.v1 import health_pb2_grpc
from tokenbroker.v1 import token_broker_pb2 as pb
from tokenbroker.v1 import token_broker_pb2_grpc as pb_grpc

SEEDED_BROKER = os.environ.get("TB_SEEDED_BROKER", "")
START_TIMEOUT_S = 30
STOP_TIMEOUT_S = 10
RPC_TIMEOUT_S = 10
ERROR_DOMAIN = "tokenbroker.v1"
SEEDED_IDS = ["active-co", "expired-co", "forever-co", "lost-co", "pending-co", "reauth-co",
              "revoked-co"]


class SeededBroker:
    """seeded_broker in a child process; stop() ends and reaps it."""

    def __init__(self, path, *flags):
        # stdin is a pipe we hold: seeded_broker exits when it closes, even if we are killed.
        self.proc = subprocess.Popen([path, *flags], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE)
        try:
            self.ports = self._read_ports()
        except BaseException:
            self.stop()
            raise

    def _read_ports(self):
        """Parses the one line `ports grpc=<p> probe=<p> admin=<p>`."""
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + START_TIMEOUT_S
        buf = b""
        while b"\n" not in buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"seeded_broker printed no ports line in {START_TIMEOUT_S} s")
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                continue
            chunk = os.read(fd, 4096)
            if not chunk:
                raise RuntimeError("seeded_broker exited before printing its ports "
                                   f"(exit code {self.proc.wait()})")
            buf += chunk
        line = buf.split(b"\n", 1)[0].decode()
        words = line.split()
        if not words or words[0] != "ports":
            raise RuntimeError(f"unexpected first line from seeded_broker: {line!r}")
        ports = {k: int(v) for k, v in (w.split("=", 1) for w in words[1:])}
        for name in ("grpc", "probe"):
            if ports.get(name, 0) <= 0:
                raise RuntimeError(f"no {name} port in {line!r}")
        return ports

    def stop(self):
        """Closes stdin, sends SIGTERM, kills after a grace period; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None and not pipe.closed:
                pipe.close()
        return self.proc.returncode


def error_info(err):
    """The ErrorInfo in an RpcError's grpc-status-details-bin trailer, or None."""
    trailers = dict(err.trailing_metadata() or ())
    raw = trailers.get("grpc-status-details-bin")
    if raw is None:
        return None
    status = status_pb2.Status.FromString(raw)
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return status, info
    return status, None


class ContractTest(unittest.TestCase):
    """Read-only checks, so one broker serves the whole class."""

    @classmethod
    def setUpClass(cls):
        if not SEEDED_BROKER:
            raise RuntimeError("pass the seeded_broker path as the first argument "
                               "or in TB_SEEDED_BROKER")
        cls.broker = SeededBroker(SEEDED_BROKER)
        cls.addClassCleanup(cls.stop_broker)
        cls.channel = grpc.insecure_channel(f"127.0.0.1:{cls.broker.ports['grpc']}")
        cls.addClassCleanup(cls.channel.close)
        cls.probe_channel = grpc.insecure_channel(f"127.0.0.1:{cls.broker.ports['probe']}")
        cls.addClassCleanup(cls.probe_channel.close)
        cls.tokens = pb_grpc.TokenBrokerStub(cls.channel)
        cls.admin = pb_grpc.ConnectionAdminStub(cls.channel)

    @classmethod
    def stop_broker(cls):
        code = cls.broker.stop()
        if code != 0:
            raise AssertionError(f"seeded_broker exited with {code}, not 0")

    def get_token_error(self, connection_id, stub=None):
        stub = stub or self.tokens
        with self.assertRaises(grpc.RpcError) as cm:
            stub.GetToken(pb.GetTokenRequest(connection_id=connection_id),
                          timeout=RPC_TIMEOUT_S)
        return cm.exception

    def test_get_token_of_active_connection(self):
        resp = self.tokens.GetToken(pb.GetTokenRequest(connection_id="active-co"),
                                    timeout=RPC_TIMEOUT_S)
        token = resp.token
        # Never print the token itself: assertions name only its metadata.
        self.assertTrue(token.access_token, "empty access token")
        self.assertEqual(token.connection_id, "active-co")
        self.assertEqual(token.generation, 1)
        self.assertTrue(token.HasField("valid_for"))
        self.assertGreater(token.valid_for.seconds, 0)
        self.assertTrue(token.HasField("expires_at"))

    def test_token_without_expiry_has_no_valid_for(self):
        token = self.tokens.GetToken(pb.GetTokenRequest(connection_id="forever-co"),
                                     timeout=RPC_TIMEOUT_S).token
        self.assertTrue(token.access_token, "empty access token")
        self.assertFalse(token.HasField("valid_for"))
        self.assertFalse(token.HasField("expires_at"))

    def test_pending_connection_fails_with_not_connected_error_info(self):
        err = self.get_token_error("pending-co")
        self.assertEqual(err.code(), grpc.StatusCode.FAILED_PRECONDITION)
        found = error_info(err)
        self.assertIsNotNone(found, "no grpc-status-details-bin trailer")
        status, info = found
        self.assertEqual(status.code, grpc.StatusCode.FAILED_PRECONDITION.value[0])
        self.assertIsNotNone(info, "google.rpc.Status carries no ErrorInfo")
        self.assertEqual(info.reason, "NOT_CONNECTED")
        self.assertEqual(info.domain, ERROR_DOMAIN)
        self.assertEqual(info.reason, pb.ErrorReason.Name(pb.NOT_CONNECTED))

    def test_every_unservable_connection_names_its_reason(self):
        for connection_id, reason in [("reauth-co", "NEEDS_REAUTH"),
                                      ("lost-co", "ROTATION_LOST"),
                                      ("revoked-co", "REVOKED")]:
            with self.subTest(connection_id=connection_id):
                err = self.get_token_error(connection_id)
                self.assertEqual(err.code(), grpc.StatusCode.FAILED_PRECONDITION)
                found = error_info(err)
                self.assertIsNotNone(found)
                self.assertIsNotNone(found[1])
                self.assertEqual(found[1].reason, reason)
                self.assertEqual(found[1].domain, ERROR_DOMAIN)

    def test_unknown_and_deleted_connections_are_not_found(self):
        for connection_id in ("no-such-co", "deleted-co"):
            with self.subTest(connection_id=connection_id):
                err = self.get_token_error(connection_id)
                self.assertEqual(err.code(), grpc.StatusCode.NOT_FOUND)

    def test_list_connections_returns_every_seeded_connection_in_id_order(self):
        ids = []
        page_token = ""
        while True:
            resp = self.admin.ListConnections(
                pb.ListConnectionsRequest(page_size=3, page_token=page_token),
                timeout=RPC_TIMEOUT_S)
            ids.extend(c.id for c in resp.connections)
            page_token = resp.next_page_token
            if not page_token:
                break
        self.assertEqual(ids, SEEDED_IDS)

    def test_get_connection_reports_status_and_reason(self):
        conn = self.admin.GetConnection(pb.GetConnectionRequest(connection_id="pending-co"),
                                        timeout=RPC_TIMEOUT_S)
        self.assertEqual(conn.status, pb.CONNECTION_STATUS_PENDING)
        self.assertEqual(conn.reason, "NOT_CONNECTED")

    def test_probe_port_health_is_serving(self):
        health = health_pb2_grpc.HealthStub(self.probe_channel)
        for service in ("liveness", ""):
            with self.subTest(service=service):
                resp = health.Check(health_pb2.HealthCheckRequest(service=service),
                                    timeout=RPC_TIMEOUT_S)
                self.assertEqual(resp.status, health_pb2.HealthCheckResponse.SERVING)

    def test_probe_port_does_not_know_other_health_services(self):
        health = health_pb2_grpc.HealthStub(self.probe_channel)
        with self.assertRaises(grpc.RpcError) as cm:
            health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"),
                         timeout=RPC_TIMEOUT_S)
        self.assertEqual(cm.exception.code(), grpc.StatusCode.NOT_FOUND)

    def test_probe_port_does_not_serve_token_broker(self):
        err = self.get_token_error("active-co", pb_grpc.TokenBrokerStub(self.probe_channel))
        self.assertEqual(err.code(), grpc.StatusCode.UNIMPLEMENTED)
        with self.assertRaises(grpc.RpcError) as cm:
            pb_grpc.ConnectionAdminStub(self.probe_channel).ListConnections(
                pb.ListConnectionsRequest(), timeout=RPC_TIMEOUT_S)
        self.assertEqual(cm.exception.code(), grpc.StatusCode.UNIMPLEMENTED)


if __name__ == "__main__":
    if len(sys.argv) > 1 and not sys.argv[1].startswith("-"):
        SEEDED_BROKER = sys.argv.pop(1)
    unittest.main()
