#!/usr/bin/python3
"""The README's first command, as a newcomer uses it: scripts/dev-up.sh (what scripts/run.sh
runs after building) starts the development provider and token-broker and prints a connect
link; opening it, approving on the provider's page and returning to the broker connects the
account; `tokenctl get` then prints a token.

Usage: /usr/bin/python3 dev_run_test.py <repo root> <build dir>
"""
import http.cookiejar
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import unittest
import urllib.error
import urllib.parse
import urllib.request

ROOT = BUILD = ""


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


class DevRunTest(unittest.TestCase):
    def setUp(self):
        self.run_dir = tempfile.mkdtemp(prefix="tb-dev-run-")
        self.ports = {k: free_port() for k in ("GRPC", "PROBE", "PUBLIC", "ADMIN", "PROVIDER")}
        env = dict(os.environ)
        for k, v in self.ports.items():
            env[f"DEV_{k}_PORT"] = str(v)
        for k in ("ZENDESK_SUBDOMAIN", "ZENDESK_CLIENT_ID", "ZENDESK_CLIENT_SECRET"):
            env.pop(k, None)
        self.proc = subprocess.Popen(
            ["bash", os.path.join(ROOT, "scripts/dev-up.sh"), BUILD, self.run_dir],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, start_new_session=True)

    def tearDown(self):
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def read_link(self):
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline().decode()
            if not line:
                self.fail("dev-up.sh ended before printing a connect link")
            m = re.search(r"connect link: (\S+)", line)
            if m:
                return m.group(1)
        self.fail("no connect link within 60 s")

    def test_connect_link_approve_then_tokenctl_get(self):
        link = self.read_link()
        self.assertTrue(link.startswith(f"http://127.0.0.1:{self.ports['PUBLIC']}/oauth/start?"))
        ctx = ssl.create_default_context(cafile=os.path.join(self.run_dir, "dev-provider-ca.pem"))
        jar = http.cookiejar.CookieJar()
        opener = urllib.request.build_opener(
            NoRedirect, urllib.request.HTTPCookieProcessor(jar),
            urllib.request.HTTPSHandler(context=ctx))

        def get(url):
            try:
                with opener.open(url, timeout=10) as r:
                    return r.status, r.headers, r.read().decode()
            except urllib.error.HTTPError as e:
                return e.code, e.headers, e.read().decode()

        status, headers, _ = get(link)
        self.assertEqual(status, 302)
        authorize = headers["Location"]
        status, _, page = get(authorize)  # the provider's consent page
        self.assertEqual(status, 200)
        self.assertIn("Approve", page)
        query = urllib.parse.urlsplit(authorize).query
        status, headers, _ = get(f"https://127.0.0.1:{self.ports['PROVIDER']}"
                                 f"/oauth/authorizations/decide?{query}&decision=approve")
        self.assertEqual(status, 302)
        status, _, page = get(headers["Location"])  # back to the broker's callback
        self.assertEqual(status, 200, page)
        self.assertIn("dev-acme", page)

        token = subprocess.run(
            [os.path.join(BUILD, "client/tokenctl"), f"--target=127.0.0.1:{self.ports['GRPC']}",
             "get", "dev-acme"], capture_output=True, timeout=30)
        self.assertEqual(token.returncode, 0, token.stderr)
        self.assertGreater(len(token.stdout.strip()), 100)


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit("usage: dev_run_test.py <repo root> <build dir> [unittest arguments]")
    ROOT, BUILD = sys.argv.pop(1), sys.argv.pop(1)
    unittest.main()
