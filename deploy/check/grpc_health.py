#!/usr/bin/python3
"""Asks grpc.health.v1.Health/Check over plaintext gRPC, as a Kubernetes gRPC probe does.

usage: grpc_health.py HOST:PORT [SERVICE ...] [--wait=SECONDS]
Prints "<service> <STATUS>" per service and exits 0 only if every one is SERVING. With --wait it
retries (every 0.2 s) until all are SERVING or the time is up. The messages are encoded by hand
(HealthCheckRequest {string service = 1}, HealthCheckResponse {enum status = 1}), so only
python3-grpcio is needed.
"""
import sys
import time

import grpc

STATUSES = {0: "UNKNOWN", 1: "SERVING", 2: "NOT_SERVING", 3: "SERVICE_UNKNOWN"}


def encode_request(service: str) -> bytes:
    raw = service.encode()
    if not raw:
        return b""
    if len(raw) > 127:
        raise ValueError("service name too long for this encoder")
    return b"\x0a" + bytes([len(raw)]) + raw


def decode_status(response: bytes) -> int:
    # An empty message is status 0 (UNKNOWN); otherwise field 1, varint (< 128 here).
    if not response:
        return 0
    if response[0] != 0x08 or len(response) < 2:
        raise ValueError(f"unexpected HealthCheckResponse bytes {response!r}")
    return response[1]


def check(channel, service: str) -> str:
    call = channel.unary_unary(
        "/grpc.health.v1.Health/Check",
        request_serializer=lambda b: b,
        response_deserializer=lambda b: b,
    )
    try:
        return STATUSES.get(decode_status(call(encode_request(service), timeout=2)), "?")
    except grpc.RpcError as e:
        return f"RPC_ERROR({e.code().name})"


def main(argv):
    wait = 0.0
    args = []
    for a in argv[1:]:
        if a.startswith("--wait="):
            wait = float(a.split("=", 1)[1])
        else:
            args.append(a)
    if not args:
        print(__doc__, file=sys.stderr)
        return 2
    target, services = args[0], args[1:] or [""]
    deadline = time.monotonic() + wait
    with grpc.insecure_channel(target) as channel:
        while True:
            results = {s: check(channel, s) for s in services}
            if all(r == "SERVING" for r in results.values()) or time.monotonic() >= deadline:
                break
            time.sleep(0.2)
    for s, r in results.items():
        name = s or '""'
        print(f"{name} {r}")
    return 0 if all(r == "SERVING" for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
