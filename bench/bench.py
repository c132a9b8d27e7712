#!/usr/bin/env python3
"""token-broker's benchmark driver (issue 8). Run it through scripts/bench.sh.

  bench.py rpc     the broker beside bench/echo_server, cached GetToken at 1/16/64/256 in flight
                   over 1 and 4 channels, with 1000 WatchToken subscribers, with refresh churn;
                   prints the ratios
  bench.py scale   1M connections in SQLite: load rate and RSS of the real token-broker
  bench.py churn   100k connections with 60-second tokens refreshing against the fake provider:
                   on time?, served past valid_until?, durable before publication?, provider
                   connections reused?, CPU time per refresh
  bench.py client  tokenbroker::Client's cached Get (Google Benchmark) and metrics_bench
  bench.py smoke   a few seconds of each of the above, proving they run (scripts/test.sh)
  bench.py report  regenerate bench/RESULTS.md from bench/results/*.json

Every server is the real binary from the build directory, started as in production: TLS on the
main port, an API key, metrics on, an encrypted SQLite store. Nothing here asserts a speed:
"smoke" only checks that every program runs and that no call fails.

Standard library only (Debian's /usr/bin/python3)."""

import argparse
import base64
import datetime
import hashlib
import json
import os
import platform
import re
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(ROOT, "bench", "results")
TICK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
VOID_ECHO_RPS = 60000  # issue 8: an echo run below this at 1 channel x 16 in flight is void


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def loadavg():
    with open("/proc/loadavg") as f:
        return [float(x) for x in f.read().split()[:3]]


def cpu_ticks():
    """The machine's CPU time so far, from /proc/stat's first line: user nice system idle
    iowait irq softirq steal (guest time is already inside user)."""
    with open("/proc/stat") as f:
        return [int(x) for x in f.readline().split()[1:9]]


def steal_pct(since, until=None):
    """Share of the CPU time between two cpu_ticks() that the hypervisor gave to other guests.
    The load average cannot see it: a guest whose host is oversubscribed looks idle and runs
    slowly."""
    d = [b - a for a, b in zip(since, until or cpu_ticks())]
    return round(100.0 * d[7] / sum(d), 1) if sum(d) > 0 else 0.0


def sample_steal(seconds=5):
    t0 = cpu_ticks()
    time.sleep(seconds)
    return steal_pct(t0)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proc:
    """A child process we started; stopped by its own pid only."""

    def __init__(self, name, args, log_path, env=None, stdout=subprocess.PIPE):
        self.name = name
        self.args = args
        self.log_file = open(log_path, "ab")
        self.p = subprocess.Popen(args, stdout=stdout, stderr=self.log_file,
                                  env=env, stdin=subprocess.DEVNULL)
        self.pid = self.p.pid
        self.started = time.monotonic()

    def read_line(self, pattern, timeout=60):
        """The first stdout line matching `pattern` (a regex), as a match object."""
        deadline = time.monotonic() + timeout
        buf = b""
        fd = self.p.stdout.fileno()
        import select
        while time.monotonic() < deadline:
            if self.p.poll() is not None and not select.select([fd], [], [], 0)[0]:
                raise RuntimeError(f"{self.name} exited with {self.p.returncode}")
            if select.select([fd], [], [], 0.1)[0]:
                chunk = os.read(fd, 4096)
                if not chunk:
                    continue
                buf += chunk
                for line in buf.decode(errors="replace").splitlines():
                    m = re.search(pattern, line)
                    if m:
                        return m
        raise TimeoutError(f"{self.name} printed no line matching {pattern!r}")

    def cpu(self):
        """utime + stime in seconds (all threads)."""
        with open(f"/proc/{self.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICK

    def status(self, key):
        """A /proc/<pid>/status field in bytes (VmRSS, VmHWM)."""
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
        return 0

    def alive(self):
        return self.p.poll() is None

    def stop(self, sig=signal.SIGTERM, timeout=30):
        if self.p.poll() is None:
            os.kill(self.pid, sig)
            try:
                self.p.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
                self.p.wait()
        if self.p.stdout:
            self.p.stdout.close()
        self.log_file.close()
        return self.p.returncode


class Env:
    """A work directory with TLS files, an API key, a key ring, a link key, and the binaries."""

    def __init__(self, build, workdir=None, keep=False):
        self.build = os.path.abspath(build)
        self.bin = {
            "broker": os.path.join(self.build, "server/src/token-broker"),
            "fake": os.path.join(self.build, "tests/fake_provider/fake_provider"),
            "echo": os.path.join(self.build, "bench/echo_server"),
            "load": os.path.join(self.build, "bench/load_gen"),
            "seed": os.path.join(self.build, "bench/seed_store"),
            "client_bench": os.path.join(self.build, "bench/client_bench"),
            "metrics_bench": os.path.join(self.build, "bench/metrics_bench"),
        }
        for name, path in self.bin.items():
            if not os.access(path, os.X_OK):
                raise SystemExit(f"bench.py: {path} is missing: build the bench targets first")
        self.dir = workdir or tempfile.mkdtemp(prefix="tb-bench-", dir="/var/tmp")
        os.makedirs(self.dir, exist_ok=True)
        self.keep = keep
        self.procs = []
        self.tls()
        self.api_key = secrets.token_hex(24)
        self.api_key_file = self.path("api-key")
        with open(self.api_key_file, "w") as f:
            f.write(self.api_key + "\n")
        self.keys_file = self.path("keys")
        with open(self.keys_file, "w") as f:
            f.write("k1 " + base64.b64encode(os.urandom(32)).decode() + "\n")
        self.link_key_file = self.path("link-key")
        with open(self.link_key_file, "w") as f:
            f.write(secrets.token_hex(32))
        self.client_secret_file = self.path("client-secret")
        with open(self.client_secret_file, "w") as f:
            f.write(secrets.token_hex(16) + "\n")
        self.fake = None

    def path(self, *p):
        return os.path.join(self.dir, *p)

    def tls(self):
        """A CA and a server certificate for 127.0.0.1 (openssl CLI)."""
        self.ca = self.path("ca.pem")
        self.cert = self.path("server.pem")
        self.key = self.path("server.key")
        if os.path.exists(self.cert):
            return
        q = dict(stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                        "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", self.path("ca.key"),
                        "-out", self.ca, "-days", "30", "-subj", "/CN=tb-bench-ca"], **q)
        subprocess.run(["openssl", "req", "-newkey", "ec", "-pkeyopt",
                        "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", self.key,
                        "-out", self.path("server.csr"), "-subj", "/CN=127.0.0.1"], **q)
        with open(self.path("san.ext"), "w") as f:
            f.write("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
        subprocess.run(["openssl", "x509", "-req", "-in", self.path("server.csr"), "-CA", self.ca,
                        "-CAkey", self.path("ca.key"), "-CAcreateserial", "-out", self.cert,
                        "-days", "30", "-extfile", self.path("san.ext")], **q)

    def start(self, name, args, **kw):
        p = Proc(name, args, self.path(f"{name}.log"), **kw)
        self.procs.append(p)
        return p

    def close(self):
        for p in reversed(self.procs):
            try:
                p.stop(timeout=10)
            except Exception:  # noqa: BLE001 - best effort at exit
                pass
        if not self.keep:
            shutil.rmtree(self.dir, ignore_errors=True)

    # --- the fake provider -------------------------------------------------------------------
    def start_fake(self):
        if self.fake:
            return self.fake
        env = dict(os.environ, TB_TEST_LOG_DIR=self.path("fake-secrets"))
        os.makedirs(env["TB_TEST_LOG_DIR"], exist_ok=True)
        p = self.start("fake_provider", [
            self.bin["fake"], "--port=0", f"--ca_file={self.path('fake-ca.pem')}",
            "--auto_approve=true", "--client_id=token-broker-bench",
            f"--client_secret_file={self.client_secret_file}", "--stats_endpoint=true",
            "--log_level=warn"], env=env)
        m = p.read_line(r"listening on (https://\S+)")
        self.fake = {"proc": p, "base": m.group(1), "ca": self.path("fake-ca.pem"),
                     "port": int(m.group(1).rsplit(":", 1)[1])}
        return self.fake

    def fake_stats(self):
        import ssl
        ctx = ssl.create_default_context(cafile=self.fake["ca"])
        with urllib.request.urlopen(self.fake["base"] + "/_fake/stats", timeout=10,
                                    context=ctx) as r:
            return json.loads(r.read())

    # --- configs -----------------------------------------------------------------------------
    def config(self, name, db, refresh="", providers=None, extra=""):
        """A production-shaped broker config: TLS, one API-key caller, encrypted SQLite."""
        digest = hashlib.sha256(self.api_key.encode()).hexdigest()
        ports = {k: free_port() for k in ("grpc", "probe", "public", "admin")}
        text = f"""\
grpc:
  listen: "127.0.0.1:{ports['grpc']}"
  probe_listen: "127.0.0.1:{ports['probe']}"
  tls: {{cert_file: "{self.cert}", key_file: "{self.key}"}}
  max_watch_streams: 20000
  max_watch_streams_per_caller: 20000
http: {{public_listen: "127.0.0.1:{ports['public']}", admin_listen: "127.0.0.1:{ports['admin']}"}}
auth:
  callers:
    - {{name: bench, api_key_sha256: ["{digest}"], connections: ["bench-*", "churn-*"],
       rpcs: [GetToken, Refresh]}}
store: {{url: "sqlite://{db}", encryption_keys_file: "{self.keys_file}"}}
links: {{signing_key_file: "{self.link_key_file}"}}
log: {{level: info}}
shutdown: {{drain_delay: 0s, grace: 5s}}
{refresh}
{extra}
providers:
"""
        fake = self.fake
        base = fake["base"] if fake else "https://127.0.0.1:9"
        ca = f'\n    ca_file: "{fake["ca"]}"' if fake else ""
        for pname, expires_in in (providers or {"zd": None}).items():
            text += f"""\
  {pname}:
    preset: generic
    client_id: token-broker-bench
    client_secret_file: "{self.client_secret_file}"
    authorize_url: "{base}/oauth/authorizations/new"
    token_url: "{base}/oauth/tokens"
    revoke_url: "{base}/oauth/revoke"
    pkce: false{ca}
"""
            if expires_in:
                text += f"    expires_in: {expires_in}\n"
        path = self.path(f"{name}.yaml")
        with open(path, "w") as f:
            f.write(text)
        return path, ports

    def seed(self, config, db, count, id_format="bench-%06d", provider="zd", from_provider=False,
             token_bytes=1024, lifetime="24h", threads=4):
        """Adds `count` connections to `db` (written on /dev/shm, where SQLite's syncs cost
        nothing, then copied back)."""
        shm = tempfile.mkdtemp(prefix="tb-bench-seed-", dir="/dev/shm")
        try:
            tmp_db = os.path.join(shm, "tokens.db")
            if os.path.exists(db):
                shutil.copyfile(db, tmp_db)
            args = [self.bin["seed"], f"--config={config}", f"--store_url=sqlite://{tmp_db}",
                    f"--count={count}", f"--id_format={id_format}", f"--provider={provider}",
                    f"--token_bytes={token_bytes}", f"--lifetime={lifetime}",
                    f"--threads={threads}"]
            if from_provider:
                args.append("--from_provider")
            t0 = time.monotonic()
            out = subprocess.run(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            if out.returncode != 0:
                raise RuntimeError(f"seed_store failed: {out.stderr.strip()[-2000:]}")
            log("  " + out.stdout.strip())
            shutil.copyfile(tmp_db, db)
            return {"count": count, "seconds": round(time.monotonic() - t0, 1),
                    "line": out.stdout.strip()}
        finally:
            shutil.rmtree(shm, ignore_errors=True)

    # --- servers -----------------------------------------------------------------------------
    def start_broker(self, name, config, ports, timeout=600):
        p = self.start(name, [self.bin["broker"], f"--config={config}",
                              f"--log_file={self.path(name + '-broker.log')}"],
                       stdout=subprocess.DEVNULL)
        t0 = time.monotonic()
        url = f"http://127.0.0.1:{ports['admin']}/readyz"
        while time.monotonic() - t0 < timeout:
            if not p.alive():
                raise RuntimeError(f"token-broker exited: see {self.path(name + '-broker.log')}")
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            time.sleep(0.01)
        else:
            raise TimeoutError("token-broker did not become ready")
        p.ready_after = time.monotonic() - t0
        p.ports = ports
        return p

    def start_echo(self):
        p = self.start("echo_server", [self.bin["echo"], "--listen=127.0.0.1:0",
                                       f"--tls_cert={self.cert}", f"--tls_key={self.key}",
                                       "--token_bytes=1024"])
        p.port = int(p.read_line(r"port=(\d+)").group(1))
        return p

    def metrics(self, broker):
        with urllib.request.urlopen(f"http://127.0.0.1:{broker.ports['admin']}/metrics",
                                    timeout=30) as r:
            return r.read().decode()

    # --- load --------------------------------------------------------------------------------
    def load(self, port, server=None, label="", **flags):
        """One load_gen run; returns its JSON plus the server's CPU time per call over the same
        window (sampled at load_gen's window markers)."""
        args = [self.bin["load"], f"--target=127.0.0.1:{port}", f"--ca_file={self.ca}",
                f"--api_key_file={self.api_key_file}", "--json", f"--label={label}"]
        args += [f"--{k}={v}" for k, v in flags.items()]
        p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        cpu = {}
        errs = []
        for line in p.stderr:
            if "window begins" in line and server:
                cpu["begin"] = (server.cpu(), time.monotonic())
            elif "window ends" in line and server:
                cpu["end"] = (server.cpu(), time.monotonic())
            else:
                errs.append(line.rstrip())
        out = p.stdout.read()
        p.wait()
        try:
            r = json.loads(out.strip().splitlines()[-1])
        except (IndexError, ValueError):
            raise RuntimeError(f"load_gen printed no result: {' | '.join(errs[-5:])}")
        r["exit"] = p.returncode
        if server and "begin" in cpu and "end" in cpu and r["calls"] > 0:
            used = cpu["end"][0] - cpu["begin"][0]
            r["server_cpu_us_per_call"] = round(used * 1e6 / r["calls"], 2)
            r["server_cores"] = round(used / (cpu["end"][1] - cpu["begin"][1]), 2)
        if errs:
            r["stderr"] = errs[-3:]
        return r


def machine():
    def sh(cmd):
        try:
            return subprocess.run(cmd, shell=True, stdout=subprocess.PIPE,
                                  stderr=subprocess.DEVNULL, text=True).stdout.strip()
        except OSError:
            return ""
    return {
        "cpu": sh("lscpu | sed -n 's/^Model name: *//p'"),
        "cores": os.cpu_count(),
        "hypervisor": sh("lscpu | sed -n 's/^Hypervisor vendor: *//p'"),
        "memory_gib": round(os.sysconf("SC_PHYS_PAGES") * PAGE / 2**30, 1),
        "kernel": platform.release(),
        "os": sh(". /etc/os-release && echo $PRETTY_NAME"),
        "compiler": sh("g++ --version | head -1"),
        "grpc": sh("dpkg-query -W -f='${Version}' libgrpc++-dev 2>/dev/null"),
        "commit": sh(f"git -C {ROOT} rev-parse --short HEAD"),
        "dirty": bool(sh(f"git -C {ROOT} status --porcelain --untracked-files=no")),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def wait_for_quiet(max_wait, threshold, max_steal):
    """Waits (up to max_wait s) until the 1-minute load average is below threshold and the
    hypervisor steals less than max_steal percent of the CPU (sampled over 5 s).
    Returns (load average, steal percent)."""
    t0 = time.monotonic()
    while True:
        steal = sample_steal()
        if (loadavg()[0] < threshold and steal < max_steal) or time.monotonic() - t0 >= max_wait:
            return loadavg(), steal
        log(f"  load average {loadavg()}, {steal}% of the CPU stolen by the hypervisor: "
            "waiting for a quieter machine")
        time.sleep(10)


def save(name, data):
    os.makedirs(RESULTS_DIR, exist_ok=True)
    path = os.path.join(RESULTS_DIR, f"{name}.json")
    with open(path, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.write("\n")
    log(f"wrote {os.path.relpath(path, ROOT)}")


def metric_values(text, name):
    """{labels-string: value} of one metric family in Prometheus text."""
    out = {}
    for line in text.splitlines():
        if line.startswith(name):
            m = re.match(r"^(\S+?)(\{[^}]*\})?\s+(\S+)$", line)
            if m and m.group(1) == name:
                out[m.group(2) or ""] = float(m.group(3))
    return out


# ===================================== rpc ======================================================

RPC_CACHED = [(1, 1), (1, 16), (1, 64), (1, 256), (4, 1), (4, 16), (4, 64), (4, 256)]
RPC_TARGETED = [(1, 16), (1, 64)]


def pair_runs(env, echo, broker, channels, inflight, reps, window, warmup, connections,
              label, echo_extra=None, broker_extra=None, broker_ids=None):
    """reps x (echo, broker) alternately at one setting; medians of each."""
    runs = {"echo": [], "broker": []}
    ticks0 = cpu_ticks()
    for _ in range(reps):
        for kind, server in (("echo", echo), ("broker", broker)):
            extra = dict((echo_extra if kind == "echo" else broker_extra) or {})
            ids = dict(connections=connections)
            if kind == "broker" and broker_ids:
                ids = broker_ids
            r = env.load(server.port, server, label=f"{label} {kind}", channels=channels,
                         inflight=inflight, duration=window, warmup=warmup, **ids, **extra)
            runs[kind].append(r)
            log(f"    {kind:6} {label:10} ch={channels} inflight={inflight:3} "
                f"rps={r['rps']:8.0f} p50={r['p50_us']:6.0f}us p99={r['p99_us']:6.0f}us "
                f"p999={r['p999_us']:6.0f}us srv_cpu={r.get('server_cpu_us_per_call', 0):5.1f}us "
                f"err={r['errors']}")
    steal = steal_pct(ticks0)
    if steal:
        log(f"    {steal}% of the CPU was stolen by the hypervisor during these runs")
    med = {}
    for kind in runs:
        rs = runs[kind]
        med[kind] = {k: statistics.median(r[k] for r in rs)
                     for k in ("rps", "p50_us", "p99_us", "p999_us")}
        med[kind]["server_cpu_us_per_call"] = statistics.median(
            r.get("server_cpu_us_per_call", 0) for r in rs)
        med[kind]["errors"] = sum(r["errors"] for r in rs)
    return {
        "channels": channels, "inflight": inflight, "label": label,
        "echo": med["echo"], "broker": med["broker"],
        "rps_ratio": round(med["broker"]["rps"] / med["echo"]["rps"], 3)
        if med["echo"]["rps"] else 0,
        "p99_ratio": round(med["broker"]["p99_us"] / med["echo"]["p99_us"], 3)
        if med["echo"]["p99_us"] else 0,
        "steal_pct": steal,
        "runs": runs,
    }


def cmd_rpc(args):
    env = Env(args.build, keep=args.keep)
    result = {"kind": "rpc", "machine": machine(), "attempts": []}
    try:
        n = args.connections
        log(f"rpc: seeding {n} connections (1 KB tokens) for the cached scenarios")
        stable_cfg, stable_ports = env.config("stable", env.path("stable.db"))
        result["seed"] = env.seed(stable_cfg, env.path("stable.db"), n)
        # Churn: short-lived tokens from the fake provider, refreshing all the time.
        fake = env.start_fake()
        churn_cfg, churn_ports = env.config(
            "churn", env.path("churn.db"), providers={"zd": None, "short": args.churn_lifetime},
            refresh="refresh: {margin: 2s, max_jitter: 1s, retry_delay: 1s}")
        env.seed(churn_cfg, env.path("churn.db"), n)
        result["churn_seed"] = env.seed(churn_cfg, env.path("churn.db"), args.churn_connections,
                                        id_format="churn-%06d", provider="short",
                                        from_provider=True, threads=4)
        echo = env.start_echo()
        attempt = 0
        while True:
            attempt += 1
            before, steal = wait_for_quiet(args.quiet_wait, args.quiet_load, args.quiet_steal)
            log(f"rpc: attempt {attempt}, load average {before}, {steal}% stolen")
            att = {"load_before": before, "steal_pct_before": steal, "started": machine()["date"]}
            ticks0 = cpu_ticks()
            broker = env.start_broker("stable", stable_cfg, stable_ports)
            broker.port = stable_ports["grpc"]
            att["broker_ready_s"] = round(broker.ready_after, 2)
            sanity = env.load(echo.port, echo, label="sanity", channels=1, inflight=16,
                              duration="3s", warmup="1s", connections=n)
            att["echo_sanity_rps"] = sanity["rps"]
            if sanity["rps"] < args.void_below and not args.smoke:
                log(f"  echo gave {sanity['rps']:.0f} RPS at 1x16 (< {VOID_ECHO_RPS}): void, "
                    "the machine is busy or slower than issue 8's; retrying")
                att["void"] = "echo sanity below 60k RPS"
                result["attempts"].append(att)
                broker.stop()
                if attempt >= args.attempts:
                    break
                time.sleep(30)
                continue
            reps, window, warmup = args.reps, args.window, args.warmup
            att["cached"] = [pair_runs(env, echo, broker, ch, inf, reps, window, warmup, n,
                                       "cached") for ch, inf in RPC_CACHED]
            # 1000 WatchToken subscribers attached (to both servers), idle streams.
            att["watchers"] = [pair_runs(
                env, echo, broker, ch, inf, reps, window, warmup, n, "watch1000",
                echo_extra={"watchers": args.watchers}, broker_extra={"watchers": args.watchers})
                for ch, inf in RPC_TARGETED]
            broker_metrics = env.metrics(broker)
            broker.stop()
            # Refresh churn: another broker over the churning connections.
            churn = env.start_broker("churn", churn_cfg, churn_ports)
            churn.port = churn_ports["grpc"]
            # The short tokens expired while the other scenarios ran: let the first round of
            # refreshes pass, so that the runs see the steady churn.
            time.sleep(args.churn_lifetime)
            stats0 = env.fake_stats()["calls"].get("token_refresh", 0)
            t0 = time.monotonic()
            att["churn"] = [pair_runs(
                env, echo, churn, ch, inf, reps, window, warmup, n, "churn",
                broker_ids={"connections": args.churn_connections, "id_format": "churn-%06d"})
                for ch, inf in RPC_TARGETED]
            refreshes = env.fake_stats()["calls"].get("token_refresh", 0) - stats0
            att["churn_refreshes_per_s"] = round(refreshes / (time.monotonic() - t0), 1)
            churn_metrics = env.metrics(churn)
            churn.stop()
            att["load_after"] = loadavg()
            att["steal_pct"] = steal_pct(ticks0)
            att["echo_1x16_rps"] = next(p["echo"]["rps"] for p in att["cached"]
                                        if p["channels"] == 1 and p["inflight"] == 16)
            att["broker_metrics_sample"] = [
                line for line in broker_metrics.splitlines()
                if line.startswith(("tb_grpc_requests_total", "tb_token_cache_total"))]
            att["churn_refresh_outcomes"] = metric_values(churn_metrics,
                                                          "tb_refresh_attempts_total")
            if att["echo_1x16_rps"] < args.void_below and not args.smoke:
                att["void"] = "echo below 60k RPS at 1x16 during the run"
            elif att["steal_pct"] > args.void_steal and not args.smoke:
                att["void"] = f"the hypervisor stole {att['steal_pct']}% of the CPU during the run"
            if "void" in att:
                log(f"  void: {att['void']}; retrying")
                result["attempts"].append(att)
                if attempt >= args.attempts:
                    break
                time.sleep(30)
                continue
            result["attempts"].append(att)
            break
        result["final"] = next((a for a in reversed(result["attempts"]) if "void" not in a),
                               None)
        result["settings"] = {"void_below_rps": args.void_below, "reps": args.reps,
                              "window": args.window, "warmup": args.warmup,
                              "connections": n, "watchers": args.watchers,
                              "churn_connections": args.churn_connections,
                              "churn_lifetime_s": args.churn_lifetime,
                              "load_gen_threads": 2, "void_steal_pct": args.void_steal}
        print_rpc(result)
        if not args.smoke:
            # A run with no valid attempt keeps the last figures and is recorded beside them.
            save("rpc" if result["final"] else "rpc-void", result)
        return result
    finally:
        env.close()


def print_rpc(result):
    final = result.get("final")
    if not final:
        log("rpc: every attempt was void (the machine stayed busy or slow): no figures")
        return
    print("\nGetToken, broker / echo (medians of "
          f"{result['settings']['reps']} alternating runs each):")
    print(f"{'scenario':12} {'ch':>2} {'inflight':>8} {'RPS ratio':>9} {'p99 ratio':>9} "
          f"{'echo RPS':>9} {'broker RPS':>10} {'echo p99':>9} {'broker p99':>10} "
          f"{'srv CPU/call e/b':>17}")
    for group in ("cached", "watchers", "churn"):
        for p in final.get(group, []):
            e, b = p["echo"], p["broker"]
            print(f"{p['label']:12} {p['channels']:>2} {p['inflight']:>8} {p['rps_ratio']:>9.2f} "
                  f"{p['p99_ratio']:>9.2f} {e['rps']:>9.0f} {b['rps']:>10.0f} "
                  f"{e['p99_us']:>7.0f}us {b['p99_us']:>8.0f}us "
                  f"{e['server_cpu_us_per_call']:>7.1f}/{b['server_cpu_us_per_call']:<6.1f}us")
    print(f"load average before {final['load_before']}, after {final['load_after']}; "
          f"churn: {final.get('churn_refreshes_per_s')} refreshes/s")


# ===================================== scale ====================================================

# Connection ids as services often name them: UUIDs (36 bytes, past std::string's 15-byte
# inline buffer, so every copy of an id is a heap allocation).
UUID_ID_FORMAT = "%08d-0000-4000-8000-000000000000"


def cmd_scale(args):
    env = Env(args.build, keep=args.keep)
    result = {"kind": "scale", "machine": machine(), "runs": []}
    plan = [(tb, "bench-%06d") for tb in args.token_bytes]
    plan += [(tb, UUID_ID_FORMAT) for tb in args.uuid_token_bytes]
    try:
        for token_bytes, id_format in plan:
            name = f"scale-{token_bytes}-{len(id_format % 0)}"
            id_bytes = len(id_format % 0)
            db = env.path(f"{name}.db")
            cfg, ports = env.config(name, db)
            log(f"scale: seeding {args.count} connections with {token_bytes}-byte access tokens "
                f"and {id_bytes}-byte ids")
            seed = env.seed(cfg, db, args.count, id_format=id_format, token_bytes=token_bytes)
            db_bytes = os.path.getsize(db)
            # Warm the page cache as the seeding left it, then start the real broker.
            with open(db, "rb") as f:
                while f.read(1 << 24):
                    pass
            before = loadavg()
            ticks0 = cpu_ticks()
            # The same file loaded `loads` times (the machine's speed wanders by a third within
            # minutes here): the median is the figure, the last broker is the one measured on.
            load_runs = []
            for i in range(args.loads):
                run_name = f"{name}-{i}"
                broker = env.start_broker(run_name, cfg, ports)
                load_runs.append(broker_load_seconds(env.path(f"{run_name}-broker.log")))
                if i + 1 < args.loads:
                    broker.stop()
            load_s = sorted(load_runs)[len(load_runs) // 2]
            rss_ready = broker.status("VmRSS")
            hwm = broker.status("VmHWM")
            cpu_ready = broker.cpu()
            time.sleep(5)
            rss_idle = broker.status("VmRSS")
            # It serves: a short cached GetToken run over all connections.
            probe = env.load(ports["grpc"], broker, label="scale probe", channels=1, inflight=16,
                             duration="2s", warmup="1s", connections=args.count,
                             id_format=id_format)
            broker.stop()
            steal = steal_pct(ticks0)
            run = {
                "connections": args.count, "token_bytes": token_bytes, "refresh_token_bytes": 64,
                "id_format": id_format, "id_bytes": id_bytes,
                "seed": seed, "db_bytes": db_bytes, "load_before": before,
                "ready_after_s": round(broker.ready_after, 2), "load_s": load_s,
                "load_s_runs": load_runs,
                "load_rate_per_s": round(args.count / load_s) if load_s else None,
                "rss_ready_bytes": rss_ready, "rss_after_5s_bytes": rss_idle,
                "rss_peak_bytes": hwm, "cpu_s_at_ready": round(cpu_ready, 2),
                "rss_per_connection_bytes": round(rss_idle / max(1, args.count)),
                "probe_rps": probe["rps"], "probe_errors": probe["errors"], "steal_pct": steal,
            }
            log(f"  {token_bytes} B tokens, {id_bytes} B ids: ready after {run['ready_after_s']} s "
                f"(load {load_s} s: {run['load_rate_per_s']}/s, median of {load_runs}), RSS {rss_idle / 2**20:.0f} MiB "
                f"(peak {hwm / 2**20:.0f} MiB), probe {probe['rps']:.0f} RPS")
            result["runs"].append(run)
            os.remove(db)
        if not args.smoke:
            save("scale", result)
        return result
    finally:
        env.close()


def broker_load_seconds(log_path):
    """From the broker's log: the store load is what happens between the last listener line
    before it and "token-broker ready" (both HTTP servers start before Broker::Load)."""
    stamps = []
    with open(log_path, errors="replace") as f:
        for line in f:
            m = re.match(r"^\[?(\d{4}-\d\d-\d\d[ T]\d\d:\d\d:\d\d\.\d+)", line)
            if not m:
                continue
            t = datetime.datetime.fromisoformat(m.group(1).replace("T", " "))
            stamps.append((t, line))
    ready = next((t for t, line in stamps if "token-broker ready" in line), None)
    before = [t for t, line in stamps if ready and t <= ready and "listening" in line]
    if not ready or not before:
        return None
    return round((ready - before[-1]).total_seconds(), 3)


# ===================================== churn ====================================================

def histogram_quantiles(text, name, qs=(0.5, 0.99, 0.999, 1.0)):
    """Upper bucket bounds at quantiles of a Prometheus histogram (cumulative buckets)."""
    buckets = []
    for labels, v in metric_values(text, name + "_bucket").items():
        m = re.search(r'le="([^"]+)"', labels)
        if m:
            buckets.append((float("inf") if m.group(1) == "+Inf" else float(m.group(1)), v))
    buckets.sort()
    total = buckets[-1][1] if buckets else 0
    out = {}
    for q in qs:
        out[str(q)] = next((le for le, c in buckets if c >= q * total), None) if total else None
    return out, buckets


def bucket_delta(b1, b0):
    d0 = dict(b0)
    return [(le, c - d0.get(le, 0)) for le, c in b1]


def quantiles_of(buckets, qs=(0.5, 0.99, 0.999, 1.0)):
    total = buckets[-1][1] if buckets else 0
    return {str(q): (next((le for le, c in buckets if c >= q * total), None) if total else None)
            for q in qs}


def cmd_churn(args):
    env = Env(args.build, keep=args.keep)
    result = {"kind": "churn", "machine": machine(), "settings": vars(args).copy()}
    result["settings"].pop("func", None)
    try:
        fake = env.start_fake()
        lifetime = args.lifetime
        cfg, ports = env.config(
            "churn100k", env.path("churn.db"), providers={"churn": lifetime},
            refresh=f"refresh: {{margin: {args.margin}, max_jitter: {args.jitter}, "
                    f"max_concurrent: {args.max_concurrent}}}")
        log(f"churn: seeding {args.count} connections with real {lifetime}-second grants")
        result["seed"] = env.seed(cfg, env.path("churn.db"), args.count, id_format="churn-%06d",
                                  provider="churn", from_provider=True, threads=args.seed_threads)
        result["load_before"] = loadavg()
        ticks0 = cpu_ticks()
        broker = env.start_broker("churn", cfg, ports)
        result["ready_after_s"] = round(broker.ready_after, 2)
        # Let the start-up backlog (grants that aged while seeding) clear, then measure.
        time.sleep(args.settle)
        m0, s0, c0, t0 = env.metrics(broker), env.fake_stats(), broker.cpu(), time.monotonic()
        fake_c0 = fake["proc"].cpu()
        gens = env.path("generations-during.txt")
        # A caller asking for random connections all along, checking every answer.
        verifier = threading.Thread(target=lambda: result.__setitem__("verifier", env.load(
            ports["grpc"], None, label="churn verifier", channels=1, inflight=8,
            rate=args.verify_rate, duration=f"{args.window}s", warmup="0s",
            connections=args.count, id_format="churn-%06d", check="true",
            generations_out=gens)))
        verifier.start()
        conns = []
        for _ in range(max(1, args.window // 10)):
            time.sleep(min(10, args.window))
            conns.append(provider_connections(fake["port"], broker.pid))
        verifier.join()
        m1, s1, c1, t1 = env.metrics(broker), env.fake_stats(), broker.cpu(), time.monotonic()
        fake_c1 = fake["proc"].cpu()
        refreshes = s1["calls"].get("token_refresh", 0) - s0["calls"].get("token_refresh", 0)
        seconds = t1 - t0
        _, lb0 = histogram_quantiles(m0, "tb_refresh_lateness_seconds")
        _, lb1 = histogram_quantiles(m1, "tb_refresh_lateness_seconds")
        late = bucket_delta(lb1, lb0)
        outcomes0 = metric_values(m0, "tb_refresh_attempts_total")
        outcomes1 = metric_values(m1, "tb_refresh_attempts_total")
        result["window"] = {
            "seconds": round(seconds, 1),
            "refreshes": refreshes,
            "refreshes_per_s": round(refreshes / seconds, 1),
            "expected_per_s": round(args.count / expected_period(lifetime, args), 1),
            "broker_cpu_s": round(c1 - c0, 2),
            "broker_cores": round((c1 - c0) / seconds, 2),
            "broker_cpu_us_per_refresh": round((c1 - c0) * 1e6 / refreshes, 1) if refreshes else None,
            "fake_cpu_us_per_refresh": round((fake_c1 - fake_c0) * 1e6 / refreshes, 1)
            if refreshes else None,
            "lateness_quantiles_s": quantiles_of(late),
            "lateness_buckets": late,
            "outcomes": {k: outcomes1[k] - outcomes0.get(k, 0) for k in outcomes1},
            "refresh_token_reuse_attempts": s1.get("refresh_token_reuse_attempts"),
            "provider_connections": conns,
            "rss_bytes": broker.status("VmRSS"),
        }
        # Prometheus buckets are cumulative: the +Inf one counts every refresh of the window.
        total_due = late[-1][1] if late else 0

        def later_than(bound):
            return total_due - max((c for le, c in late if le <= bound), default=0)
        result["window"]["late_over_1s"] = later_than(1.0)
        result["window"]["late_over_margin"] = later_than(parse_seconds(args.margin))
        # Durable before publication: kill -9, restart on the same file, and every connection
        # must come back with at least the generation any caller saw (or ROTATION_LOST, the
        # documented in-doubt window).
        final = env.path("generations-before-kill.txt")
        result["sweep_before_kill"] = env.load(
            ports["grpc"], None, label="sweep", channels=1, inflight=64, sweep="true",
            duration="300s", connections=args.count, id_format="churn-%06d", check="true",
            generations_out=final)
        broker.stop(sig=signal.SIGKILL)
        result["load_after"] = loadavg()
        result["steal_pct"] = steal_pct(ticks0)
        broker2 = env.start_broker("churn-restart", cfg, ports)
        after = env.path("generations-after-restart.txt")
        result["sweep_after_restart"] = env.load(
            ports["grpc"], None, label="sweep", channels=1, inflight=64, sweep="true",
            duration="300s", connections=args.count, id_format="churn-%06d", check="true",
            generations_out=after)
        broker2.stop()
        seen = {}
        for path in (gens, final):
            for k, g in read_generations(path).items():
                seen[k] = max(seen.get(k, 0), g)
        back = read_generations(after)
        lost = [k for k, g in seen.items() if k in back and back[k] < g]
        missing = [k for k in seen if k not in back]
        result["durability"] = {
            "connections_seen": len(seen),
            "came_back_older": len(lost),
            "did_not_answer_after_restart": len(missing),
            "after_restart_codes": result["sweep_after_restart"].get("codes"),
        }
        result["verdict"] = churn_verdict(result)
        print_churn(result)
        if not args.smoke:
            save("churn", result)
        return result
    finally:
        env.close()


def parse_seconds(s):
    m = re.match(r"^(\d+(?:\.\d+)?)(ms|s|m)$", s)
    v = float(m.group(1))
    return {"ms": v / 1000, "s": v, "m": v * 60}[m.group(2)]


def expected_period(lifetime, args):
    """The mean refresh period of a grant: max(half, lifetime - margin) + mean jitter."""
    j = min(parse_seconds(args.jitter), lifetime / 10)
    return max(lifetime / 2, lifetime - parse_seconds(args.margin)) + j / 2


def read_generations(path):
    out = {}
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                k, g = line.split()
                out[k] = int(g)
    return out


def provider_connections(port, pid):
    """TCP connections from the broker to the fake provider: established, and in TIME-WAIT
    (many TIME-WAIT sockets would mean connections are not reused)."""
    def count(state):
        out = subprocess.run(["ss", "-tanH", "state", state, f"dport = :{port}"],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True).stdout
        return len([line for line in out.splitlines() if line.strip()])
    return {"established": count("established"), "time_wait": count("time-wait")}


def churn_verdict(r):
    w = r["window"]
    v = r.get("verifier", {})
    return {
        "rate_ok": w["refreshes_per_s"] >= 0.9 * w["expected_per_s"],
        "on_time": w["late_over_margin"] == 0,
        "served_past_valid_until": v.get("violations"),
        "verifier_errors": v.get("errors"),
        "durable_before_publication": r["durability"]["came_back_older"] == 0,
        "provider_connections_reused": all(c["established"] <= 16 for c in w["provider_connections"])
        and all(c["time_wait"] < 100 for c in w["provider_connections"]),
        "refresh_token_reuse": w["refresh_token_reuse_attempts"],
    }


def print_churn(r):
    w = r["window"]
    print(f"\nRefresh churn: {r['settings']['count']} connections, {r['settings']['lifetime']} s "
          f"tokens, window {w['seconds']} s")
    print(f"  refreshes/s {w['refreshes_per_s']} (expected {w['expected_per_s']}), broker CPU "
          f"{w['broker_cpu_us_per_refresh']} us/refresh ({w['broker_cores']} cores), fake "
          f"{w['fake_cpu_us_per_refresh']} us/refresh")
    print(f"  lateness quantiles (bucket bounds, s): {w['lateness_quantiles_s']}; "
          f"> 1 s: {w['late_over_1s']}, > margin: {w['late_over_margin']}")
    print(f"  outcomes {w['outcomes']}; provider connections {w['provider_connections'][-1:]}")
    print(f"  verifier: {r.get('verifier', {}).get('calls')} calls, "
          f"{r.get('verifier', {}).get('violations')} violations, "
          f"{r.get('verifier', {}).get('errors')} errors {r.get('verifier', {}).get('codes')}")
    print(f"  durability after kill -9: {r['durability']}")
    print(f"  verdict: {r['verdict']}")


# ===================================== client ===================================================

def cmd_client(args):
    env = Env(args.build, keep=args.keep)
    try:
        out = {"kind": "client", "machine": machine(), "load_before": loadavg()}
        ticks0 = cpu_ticks()
        for name in ("client_bench", "metrics_bench"):
            p = subprocess.run([env.bin[name], f"--benchmark_min_time={args.min_time}",
                                "--benchmark_format=json"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
            if p.returncode != 0:
                raise RuntimeError(f"{name} failed: {p.stderr[-2000:]}")
            data = json.loads(p.stdout)
            out[name] = [{"name": b["name"], "real_ns": round(b["real_time"], 1),
                          "cpu_ns": round(b["cpu_time"], 1)} for b in data["benchmarks"]]
            for b in out[name]:
                log(f"  {b['name']:50} {b['real_ns']:8.1f} ns")
        out["load_after"] = loadavg()
        out["steal_pct"] = steal_pct(ticks0)
        if not args.smoke:
            save("client", out)
        return out
    finally:
        env.close()


# ===================================== smoke ====================================================

def cmd_smoke(args):
    """A few seconds of each benchmark: they run, nothing fails. No speed is checked."""
    t0 = time.monotonic()
    a = argparse.Namespace(**vars(args))
    a.smoke = True
    a.min_time = 0.01
    cmd_client(a)
    a.connections, a.reps, a.window, a.warmup, a.watchers = 50, 1, "1s", "0.2s", 20
    a.churn_connections, a.churn_lifetime, a.attempts = 20, 4, 1
    a.quiet_wait, a.quiet_load, a.quiet_steal, a.void_steal, a.void_below = 0, 99, 100, 100, 0
    rpc = cmd_rpc(a)
    a.count, a.token_bytes, a.uuid_token_bytes, a.loads = 2000, [1024], [64], 2
    cmd_scale(a)
    a.count, a.lifetime, a.margin, a.jitter, a.max_concurrent = 40, 4, "1s", "1s", 16
    a.seed_threads, a.settle, a.window, a.verify_rate = 2, 1, 4, 200
    churn = cmd_churn(a)
    bad = []
    final = rpc.get("final") or {}
    for group in ("cached", "watchers", "churn"):
        for p in final.get(group, []):
            for kind in ("echo", "broker"):
                if p[kind]["errors"]:
                    bad.append(f"rpc {group} {kind} {p['channels']}x{p['inflight']}: errors")
    if churn["durability"]["came_back_older"]:
        bad.append("churn: a connection came back older after kill -9")
    if churn.get("verifier", {}).get("violations"):
        bad.append("churn: a token was served past its validity")
    took = time.monotonic() - t0
    if bad:
        raise SystemExit("bench smoke FAILED: " + "; ".join(bad))
    print(f"bench smoke: every benchmark ran, no call failed ({took:.0f} s)")


# ===================================== report ===================================================

def cmd_report(args):
    import importlib.util
    spec = importlib.util.spec_from_file_location(
        "results_md", os.path.join(ROOT, "bench", "results_md.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.write(RESULTS_DIR, os.path.join(ROOT, "bench", "RESULTS.md"))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--build", default=os.path.join(ROOT, "build", "h-bench"))
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    sub = ap.add_subparsers(dest="cmd", required=True)

    r = sub.add_parser("rpc")
    r.add_argument("--connections", type=int, default=1000)
    r.add_argument("--reps", type=int, default=5)
    r.add_argument("--window", default="5s")
    r.add_argument("--warmup", default="1s")
    r.add_argument("--watchers", type=int, default=1000)
    r.add_argument("--churn_connections", type=int, default=2000)
    r.add_argument("--churn_lifetime", type=int, default=10, help="seconds")
    r.add_argument("--attempts", type=int, default=3)
    r.add_argument("--quiet_wait", type=int, default=600)
    r.add_argument("--quiet_load", type=float, default=1.0)
    r.add_argument("--quiet_steal", type=float, default=5.0,
                   help="wait until the hypervisor steals less than this percent of the CPU")
    r.add_argument("--void_steal", type=float, default=10.0,
                   help="a run during which the hypervisor stole more than this percent of "
                        "the CPU is void")
    r.add_argument("--void_below", type=float, default=VOID_ECHO_RPS,
                   help="echo RPS at 1x16 below which a run is void (issue 8: 60000); a "
                        "lower value records the run anyway and RESULTS.md marks it void by "
                        "the issue's rule")
    r.set_defaults(func=cmd_rpc, smoke=False)

    s = sub.add_parser("scale")
    s.add_argument("--count", type=int, default=1_000_000)
    s.add_argument("--token_bytes", type=int, nargs="+", default=[1024, 64])
    s.add_argument("--uuid_token_bytes", type=int, nargs="*", default=[64],
                   help="token sizes run again with 36-byte UUID-shaped ids")
    s.add_argument("--loads", type=int, default=3,
                   help="starts of the broker on each file; the median load is reported")
    s.set_defaults(func=cmd_scale, smoke=False)

    c = sub.add_parser("churn")
    c.add_argument("--count", type=int, default=100_000)
    c.add_argument("--lifetime", type=int, default=60, help="token lifetime, seconds")
    c.add_argument("--margin", default="10s")
    c.add_argument("--jitter", default="6s")
    c.add_argument("--max_concurrent", type=int, default=16)
    c.add_argument("--seed_threads", type=int, default=4)
    c.add_argument("--settle", type=int, default=90, help="seconds before the window")
    c.add_argument("--window", type=int, default=120, help="seconds")
    c.add_argument("--verify_rate", type=float, default=200)
    c.set_defaults(func=cmd_churn, smoke=False)

    cl = sub.add_parser("client")
    cl.add_argument("--min_time", type=float, default=0.5)
    cl.set_defaults(func=cmd_client, smoke=False)

    sm = sub.add_parser("smoke")
    sm.set_defaults(func=cmd_smoke)

    rp = sub.add_parser("report")
    rp.set_defaults(func=cmd_report)

    args = ap.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
