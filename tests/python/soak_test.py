#!/usr/bin/python3
"""Issue 7's soak on the real binaries: N connections with short tokens under GetToken load with
min_ttl > 0, for a while, against the real fake_provider binary (Zendesk-like: single-use
refresh tokens, a refresh kills the previous access token at once).

One token-broker on its default store (SQLite, encrypted), every connection made through the
browser flow on a generic provider with `expires_in` LIFETIME seconds. THREADS client threads
call GetToken(min_ttl) round-robin over the connections for DURATION seconds. Printed, and
judged:
  errors                    GetToken calls that failed, any code (must be 0)
  served inside min_ttl     tokens that did not live min_ttl more at the provider after they were
                            handed out (must be 0), found two ways:
                            - by the provider itself: one answer in CHECK_EVERY is checked at the
                              fake (current.json, keep-alive) just before its min_ttl runs out,
                              and must still be live there;
                            - from the broker's own numbers, for every answer: valid_for must be
                              at least min_ttl, the token's expiry at least min_ttl away, and the
                              refresh that replaced its generation (the successor's expires_at
                              minus the lifetime is when that request was sent, read before
                              sending) must not have started before the last answer of the
                              generation plus min_ttl
                            Every min_ttl counts from when the test sent the request (the broker
                            answered later, so that moment is always covered by the promise).
  RSS                       the broker's resident memory at the start and the end of the load
                            (printed only)
Also reported: answers per second, latency percentiles, refreshes at the provider, refresh
tokens presented twice (must be 0: a lost grant at Zendesk).

Usage: /usr/bin/python3 soak_test.py <token-broker> <fake_provider> [--connections=1000]
           [--seconds=600] [--lifetime=5] [--min_ttl=1] [--threads=8] [--check_every=20]
       scripts/soak.sh runs the full soak; CI (ctest python_soak_test) a 30-second one with 100
       connections. Exit status 0 only when every must-be-0 is 0. PYTHONPATH must hold the
       generated stubs. With TB_TEST_LOG_DIR set, logs go there and secrets are recorded for the
       end-of-run scan.
"""
import argparse
import collections
import heapq
import http.client
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse

import grpc
from google.protobuf import duration_pb2
from tokenbroker.v1 import token_broker_pb2 as pb
from tokenbroker.v1 import token_broker_pb2_grpc as pb_grpc

# The fake provider process, secret recording and the browser-flow helpers of the durability
# test.
import durability_test as dt

RPC_TIMEOUT_S = 10
CONNECT_THREADS = 4
# Clock reads of the test and the broker on one machine: a few milliseconds apart at most.
SLACK_S = 0.005
# A provider check goes out this long before the answer's min_ttl runs out.
CHECK_LEAD_S = 0.1
PROGRESS_EVERY_S = 30


def log_dir():
    return os.environ.get("TB_TEST_LOG_DIR", "")


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return -1


def percentile(values, p):
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(p / 100 * len(s)))]


def epoch(ts):
    return ts.seconds + ts.nanos / 1e9


def seconds(d):
    return d.seconds + d.nanos / 1e9


class State:
    """Keys, link key and config of the broker (durability_test.Broker's helpers read .config
    and .path)."""

    def __init__(self, fake, lifetime):
        self.path = tempfile.mkdtemp(prefix="tb-soak-")
        keys = dt.write_key_ring(self.path)
        link_key = dt.new_test_secret("soak-link-key")
        link_key_file = os.path.join(self.path, "link-key")
        with open(link_key_file, "w") as f:
            f.write(link_key)
        b = fake.base
        self.config = os.path.join(self.path, "config.yaml")
        with open(self.config, "w") as f:
            f.write(f"""\
store: {{url: "sqlite://{self.path}/tokens.db", encryption_keys_file: "{keys}"}}
links: {{signing_key_file: "{link_key_file}"}}
grpc: {{insecure: true}}  # loopback only; the soak is about refreshes, not the callers
refresh: {{provider_timeout: 10s, retry_delay: 1s, retry_max: 5s}}
shutdown: {{drain_delay: 0s}}
http: {{rate_limit_per_minute: 0}}  # every connect flow comes from 127.0.0.1
providers:
  short:
    preset: generic
    client_id: "{fake.client_id}"
    client_secret_file: "{fake.secret_file}"
    authorize_url: "{b}/oauth/authorizations/new"
    token_url: "{b}/oauth/tokens"
    revoke_url: "{b}/oauth/revoke"
    ca_file: "{fake.ca_file}"
    expires_in: {lifetime}
""")

    def remove(self):
        shutil.rmtree(self.path, ignore_errors=True)


class Broker:
    """token-broker at log level info (a trace line per GetToken would dominate a long soak),
    otherwise durability_test.Broker: same ports, wait_ready, connect and stop."""

    wait_ready = dt.Broker.wait_ready
    connect = dt.Broker.connect
    stop = dt.Broker.stop

    def __init__(self, state):
        self.state = state
        self.ports = {name: dt.free_port() for name in ("grpc", "probe", "public", "admin")}
        self.public_base_url = f"http://127.0.0.1:{self.ports['public']}"
        self.log_path = os.path.join(log_dir() or state.path,
                                     f"token-broker-soak-{os.getpid()}-{time.time_ns()}.log")
        self.proc = subprocess.Popen(
            [dt.BROKER, f"--config={state.config}", *dt.listen_args(self.ports, self.public_base_url),
             "--log_level=info",
             f"--log_file={self.log_path}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.ports['grpc']}")
        self.tokens = pb_grpc.TokenBrokerStub(self.channel)
        self.admin = pb_grpc.ConnectionAdminStub(self.channel)


class ProviderChecks:
    """Checks sampled answers at the fake provider just before their min_ttl runs out: a heap of
    due checks, worked off by two threads on keep-alive HTTPS connections of their own."""

    def __init__(self, fake):
        self.fake = fake
        host, port = urllib.parse.urlsplit(fake.base).netloc.rsplit(":", 1)
        self.host, self.port = host, int(port)
        self.cv = threading.Condition()
        self.heap = []  # (due, seq, cid, generation, access token, must live until)
        self.seq = 0
        self.stopping = False
        self.live = self.dead = self.late = 0
        self.dead_examples = []
        self.failures = []
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(2)]
        for t in self.threads:
            t.start()

    def add(self, cid, generation, token, until):
        with self.cv:
            self.seq += 1
            heapq.heappush(self.heap, (until - CHECK_LEAD_S, self.seq, cid, generation, token,
                                       until))
            self.cv.notify()

    def _status(self, conn, token):
        for attempt in range(2):
            try:
                conn.request("GET", "/api/v2/oauth/tokens/current.json",
                             headers={"Authorization": f"Bearer {token}"})
                r = conn.getresponse()
                r.read()
                return conn, r.status
            except (http.client.HTTPException, OSError):
                conn.close()
                conn = self._connect()
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def _connect(self):
        return http.client.HTTPSConnection(self.host, self.port, context=self.fake.ssl,
                                           timeout=RPC_TIMEOUT_S)

    def _run(self):
        conn = self._connect()
        while True:
            with self.cv:
                while not self.stopping and (not self.heap or self.heap[0][0] > time.time()):
                    wait = None if not self.heap else max(0.0, self.heap[0][0] - time.time())
                    self.cv.wait(wait)
                if not self.heap or (self.stopping and self.heap[0][0] > time.time()):
                    if self.stopping:
                        break
                    continue
                _, _, cid, generation, token, until = heapq.heappop(self.heap)
            try:
                conn, status = self._status(conn, token)
            except (http.client.HTTPException, OSError) as e:
                with self.cv:
                    self.failures.append(f"provider check of {cid}: {e!r}")
                continue
            done = time.time()
            with self.cv:
                if status == 200:
                    self.live += 1
                elif done < until:
                    self.dead += 1
                    if len(self.dead_examples) < 10:
                        self.dead_examples.append(
                            f"{cid} generation {generation}: the provider answered {status} "
                            f"{until - done:.3f} s before its min_ttl ran out")
                else:
                    self.late += 1  # checked only after min_ttl ran out: not judged
        conn.close()

    def stop(self):
        """Lets every check already due run, drops the rest, and joins."""
        with self.cv:
            self.stopping = True
            self.cv.notify_all()
        for t in self.threads:
            t.join(30)


class Load:
    """THREADS threads calling GetToken(min_ttl) round-robin over the connections."""

    def __init__(self, broker, ids, lifetime, min_ttl, threads, check_every, checks):
        self.broker = broker
        self.ids = ids
        self.lifetime = lifetime
        self.min_ttl = min_ttl
        self.check_every = check_every
        self.checks = checks
        self.stop_event = threading.Event()
        self.lock = threading.Lock()
        self.answers = 0
        self.errors = collections.Counter()
        self.error_examples = []
        self.latencies = []            # a sample of answer latencies, seconds
        self.short_promise = []        # answers with valid_for below min_ttl (examples)
        self.short_promise_count = 0
        # (cid, generation) -> [issued_at, expires_at, last t_send]
        self.generations = {}
        self.failures = []
        self.threads = [threading.Thread(target=self._run, args=(i, threads), daemon=True)
                        for i in range(threads)]

    def start(self):
        self.started = time.time()
        for t in self.threads:
            t.start()
        return self

    def stop(self):
        self.stop_event.set()
        for t in self.threads:
            t.join(RPC_TIMEOUT_S + 5)
        self.stopped = time.time()

    def _run(self, idx, threads):
        req_ttl = duration_pb2.Duration(seconds=int(self.min_ttl),
                                        nanos=int(round((self.min_ttl % 1) * 1e9)))
        n = len(self.ids)
        i = idx * max(1, n // threads)
        calls = 0
        answers, latencies, errors = 0, [], collections.Counter()
        gens = {}
        try:
            while not self.stop_event.is_set():
                i += 1
                cid = self.ids[i % n]
                t_send = time.time()
                try:
                    tok = self.broker.tokens.GetToken(
                        pb.GetTokenRequest(connection_id=cid, min_ttl=req_ttl),
                        timeout=RPC_TIMEOUT_S).token
                except grpc.RpcError as err:
                    errors[err.code().name] += 1
                    with self.lock:
                        if len(self.error_examples) < 10:
                            self.error_examples.append(
                                f"{cid}: {err.code().name} {dt.error_reason(err)} "
                                f"'{err.details()}' after {time.time() - t_send:.3f} s")
                    continue
                t_recv = time.time()
                answers += 1
                calls += 1
                if calls % 16 == 0:
                    latencies.append(t_recv - t_send)
                if calls % 50 == 1:
                    dt.record_secret(tok.access_token)
                key = (cid, tok.generation)
                g = gens.get(key)
                if g is None:
                    gens[key] = [epoch(tok.expires_at) - self.lifetime, epoch(tok.expires_at),
                                 t_send]
                else:
                    g[2] = max(g[2], t_send)
                # From t_send, not t_recv: the broker answered in between, and on a busy machine
                # its answer can take hundreds of milliseconds to arrive.
                if seconds(tok.valid_for) < self.min_ttl - 1e-6 or \
                        epoch(tok.valid_until) < t_send + self.min_ttl - SLACK_S:
                    with self.lock:
                        self.short_promise_count += 1
                        if len(self.short_promise) < 10:
                            self.short_promise.append(
                                f"{cid} generation {tok.generation}: valid_for "
                                f"{seconds(tok.valid_for):.3f} s, valid_until "
                                f"{epoch(tok.valid_until) - t_send:+.3f} s from the request")
                if calls % self.check_every == 0:
                    self.checks.add(cid, tok.generation, tok.access_token,
                                    t_send + self.min_ttl)
                if answers % 256 == 0:
                    self._merge(answers, latencies, errors, gens)
                    answers, latencies, errors, gens = 0, [], collections.Counter(), {}
        except Exception as e:  # a broken client is a failed run, not a silent thread
            with self.lock:
                self.failures.append(f"client thread {idx}: {e!r}")
        finally:
            self._merge(answers, latencies, errors, gens)

    def _merge(self, answers, latencies, errors, gens):
        with self.lock:
            self.answers += answers
            self.latencies.extend(latencies)
            self.errors.update(errors)
            for key, (issued, expires, last) in gens.items():
                g = self.generations.get(key)
                if g is None:
                    self.generations[key] = [issued, expires, last]
                else:
                    g[2] = max(g[2], last)

    def progress(self):
        with self.lock:
            return self.answers, sum(self.errors.values())

    def analyse(self):
        """(answers served inside min_ttl by the broker's own numbers, examples, how many
        generations had a known successor)."""
        bad, examples, judged = 0, [], 0
        for (cid, gen), (issued, expires, last) in self.generations.items():
            need = last + self.min_ttl
            if expires < need - SLACK_S:
                bad += 1
                if len(examples) < 10:
                    examples.append(f"{cid} generation {gen} expires {need - expires:.3f} s "
                                    "before its last answer's min_ttl ran out")
            succ = self.generations.get((cid, gen + 1))
            if succ is not None:
                judged += 1
                if succ[0] < need - SLACK_S:
                    bad += 1
                    if len(examples) < 10:
                        examples.append(f"{cid} generation {gen} was refreshed {need - succ[0]:.3f}"
                                        " s before its last answer's min_ttl ran out")
        return bad, examples, judged


def run(args):
    tmp = tempfile.mkdtemp(prefix="tb-soak-fake-")
    fake = state = broker = load = checks = None
    started = time.monotonic()
    try:
        fake = dt.FakeProvider(tmp)
        state = State(fake, args.lifetime)
        broker = Broker(state).wait_ready()
        ids = [f"soak-{i:05d}" for i in range(args.connections)]
        t = time.monotonic()
        jobs = list(ids)
        lock = threading.Lock()
        connect_errors = []

        def connector():
            while True:
                with lock:
                    if not jobs or connect_errors:
                        return
                    cid = jobs.pop()
                try:
                    broker.connect(fake, cid, "short")
                except Exception as e:
                    with lock:
                        connect_errors.append(f"{cid}: {e!r}")

        pool = [threading.Thread(target=connector) for _ in range(CONNECT_THREADS)]
        for p in pool:
            p.start()
        for p in pool:
            p.join()
        if connect_errors:
            print(f"soak: connecting failed: {connect_errors[:5]}", flush=True)
            return 1
        print(f"soak: {len(ids)} connections made through the browser flow in "
              f"{time.monotonic() - t:.1f} s; {args.lifetime}-second tokens, GetToken with "
              f"min_ttl {args.min_ttl} s from {args.threads} threads for {args.seconds:.0f} s",
              flush=True)

        checks = ProviderChecks(fake)
        load = Load(broker, ids, args.lifetime, args.min_ttl, args.threads, args.check_every,
                    checks)
        rss_start = rss_kib(broker.proc.pid)
        load.start()
        end = time.time() + args.seconds
        next_report = time.time() + PROGRESS_EVERY_S
        while time.time() < end and broker.proc.poll() is None:
            time.sleep(min(1.0, max(0.0, end - time.time())))
            if time.time() >= next_report:
                answers, errors = load.progress()
                print(f"  {time.time() - load.started:5.0f} s: {answers} answers, {errors} errors, "
                      f"{checks.live} provider checks live, {checks.dead} dead, RSS "
                      f"{rss_kib(broker.proc.pid) / 1024:.1f} MiB", flush=True)
                next_report += PROGRESS_EVERY_S
        exited = broker.proc.poll()
        rss_end = rss_kib(broker.proc.pid) if exited is None else -1
        load.stop()
        checks.stop()
        stats = fake.stats()
        code = broker.stop(signal.SIGTERM) if exited is None else exited
        broker = None

        inside, inside_examples, judged = load.analyse()
        elapsed = load.stopped - load.started
        lat = load.latencies
        errors = sum(load.errors.values())
        served_inside = inside + checks.dead + load.short_promise_count
        reuse = stats["refresh_token_reuse_attempts"]
        print(f"soak summary after {elapsed:.1f} s ({time.monotonic() - started:.1f} s in all):\n"
              f"  GetToken answers:                 {load.answers} "
              f"({load.answers / max(elapsed, 1e-9):.0f}/s), latency p50 "
              f"{percentile(lat, 50) * 1000:.1f} ms, p99 {percentile(lat, 99) * 1000:.1f} ms, "
              f"max {max(lat, default=0) * 1000:.0f} ms (sampled)\n"
              f"  errors:                           {errors} {dict(load.errors)}\n"
              f"  served inside min_ttl:            {served_inside} (provider checks: "
              f"{checks.dead} dead of {checks.live + checks.dead}, {checks.late} checked too late "
              f"to judge; broker's numbers: {load.short_promise_count} answers promised less than "
              f"min_ttl, {inside} generations refreshed or expiring inside an answer's min_ttl, "
              f"{judged} of {len(load.generations)} generations with a known successor)\n"
              f"  refreshes at the provider:        {stats['calls']['token_refresh']}, refresh "
              f"tokens presented twice: {reuse}\n"
              f"  broker RSS:                       start {rss_start / 1024:.1f} MiB, end "
              f"{rss_end / 1024:.1f} MiB; exit code {code}", flush=True)
        for line in (load.failures + checks.failures + load.error_examples + load.short_promise + inside_examples +
                     checks.dead_examples)[:30]:
            print(f"  FAILURE {line}", flush=True)
        ok = (errors == 0 and served_inside == 0 and reuse == 0 and not load.failures and
              not checks.failures and
              code == 0 and exited is None and checks.live > 0)
        if checks.live == 0:
            print("  FAILURE no provider check ran: the soak proved nothing", flush=True)
        print(f"soak: {'PASSED' if ok else 'FAILED'}", flush=True)
        return 0 if ok else 1
    finally:
        if load is not None:
            load.stop_event.set()
        if checks is not None:
            checks.stop()
        if broker is not None:
            broker.stop(signal.SIGKILL)
        if fake is not None:
            fake.stop()
        if state is not None:
            state.remove()
        shutil.rmtree(tmp, ignore_errors=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("broker")
    parser.add_argument("fake_provider")
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=600)
    parser.add_argument("--lifetime", type=int, default=5, help="expires_in of every token")
    parser.add_argument("--min_ttl", type=float, default=1.0, help="GetToken's min_ttl, seconds")
    parser.add_argument("--threads", type=int, default=8, help="GetToken client threads")
    parser.add_argument("--check_every", type=int, default=20,
                        help="one answer in this many is checked at the provider")
    args = parser.parse_args()
    if args.min_ttl <= 0 or args.min_ttl * 2 > args.lifetime:
        parser.error("min_ttl must be above 0 and at most half the lifetime (the promise)")
    dt.BROKER, dt.FAKE_PROVIDER = args.broker, args.fake_provider
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
