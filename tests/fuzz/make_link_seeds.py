#!/usr/bin/env python3
"""Writes the connect-link seeds of fuzz_connect_link (and the /oauth/start seeds' links).

The links are signed with the fuzz targets' fixed keys, in the format of
server/src/core/connect_link.cc ("tblink1" payload, HMAC-SHA-256, unpadded base64url), so the
fuzzer starts from tokens VerifyLink accepts and from their tampered, expired and re-keyed
variants. Run it again if the format or a key changes:
    python3 tests/fuzz/make_link_seeds.py
"""
import base64
import hashlib
import hmac
import os

HERE = os.path.dirname(os.path.abspath(__file__))
KEY = b"fuzz-link-key-0123456789abcdefghijklmnopqrstuvwxyz"   # fuzz_connect_link.cc kKey
OTHER = b"another-key-that-is-not-the-fuzz-target-key-0123456"
EXPIRES_2030 = 1893456000   # the target's "now" is 2023-11-14
EXPIRED = 1699990000


def b64(b):
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def payload(link_id, conn, provider, expires, reconnect, params, return_url=""):
    ps = ",".join(f"{b64(k.encode())}:{b64(v.encode())}" for k, v in sorted(params.items()))
    fields = ["tblink2" if return_url else "tblink1", b64(link_id), b64(conn.encode()),
              b64(provider.encode()), str(expires), "1" if reconnect else "0", ps]
    if return_url:
        fields.append(b64(return_url.encode()))
    return ".".join(fields)


def sign(p, key=KEY):
    return f"{b64(p.encode())}.{b64(hmac.new(key, p.encode(), hashlib.sha256).digest())}"


def write(name, text):
    path = os.path.join(HERE, "corpus", "fuzz_connect_link", name)
    with open(path, "w") as f:
        f.write(text)


lid = bytes(range(16))
acme = payload(lid, "acme", "zendesk", EXPIRES_2030, False, {"subdomain": "acme"})
write("valid_zendesk", sign(acme))
write("valid_reconnect", sign(payload(b"\xff" * 16, "zd-acme-prod", "zendesk", EXPIRES_2030,
                                      True, {"subdomain": "acme-prod"})))
write("valid_no_params",
      sign(payload(b"link-1", "chat-7", "zendesk-chat", EXPIRES_2030, False, {})))
write("valid_return_url", sign(payload(lid, "acme", "zendesk", EXPIRES_2030, False,
                                       {"subdomain": "acme"},
                                       "https://app.example.com/settings/zendesk?tab=zd")))
write("v2_empty_return_url", sign(payload(lid, "acme", "zendesk", EXPIRES_2030, False,
                                          {"subdomain": "acme"}).replace("tblink1", "tblink2")
                                  + "."))
write("expired", sign(payload(lid, "acme", "zendesk", EXPIRED, False, {"subdomain": "acme"})))
write("other_key", sign(acme, OTHER))
t = sign(acme)
write("tampered_mac", t[:-1] + ("A" if t[-1] != "A" else "B"))
body, mac = t.split(".")
write("tampered_payload", body[:20] + ("B" if body[20] != "B" else "C") + body[21:] + "." + mac)
write("padded", body + "=." + mac)
write("three_parts", t + ".x")
write("not_a_link", "hello")
# Return URLs, for CheckReturnUrl (allow-list: https://app.example.com/settings/ and
# http://127.0.0.1:3000/done).
for name, url in [("return_ok", "https://app.example.com/settings/zendesk?tab=1#top"),
                  ("return_case_port", "HTTPS://App.Example.COM:443/settings/x"),
                  ("return_dotdot", "https://app.example.com/settings/%2e%2E/admin"),
                  ("return_userinfo", "https://app.example.com@evil.example/settings/"),
                  ("return_prefix", "http://127.0.0.1:3000/doneevil"),
                  ("return_ipv6", "https://[::1]:8443/settings/"),
                  ("return_backslash", "https://app.example.com\\@evil.example/settings/")]:
    write(name, url)
write("url_form", "https://broker.example.com/oauth/start?link=" + t)
