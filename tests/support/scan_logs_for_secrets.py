#!/usr/bin/python3
"""Proves that no secret created by the test run reached a log.

Reads every secrets-*.txt (one secret per line, written by tests through NewTestSecret) and every
*.log in the given directory (all log lines of all test processes, at trace level), and fails if
any log contains a secret in raw, URL-encoded or JSON-escaped form. It also fails when there is
nothing to check (no secrets or no log lines), so that it cannot pass vacuously.
"""
import json
import pathlib
import sys
import urllib.parse


def forms(secret):
    """The encodings in which a secret could reach a log line, by name."""
    return {
        "raw": secret,
        "url-encoded": urllib.parse.quote(secret, safe=""),
        "form-encoded": urllib.parse.quote_plus(secret, safe=""),
        "json-escaped": json.dumps(secret)[1:-1],
        "json-escaped-slash": json.dumps(secret)[1:-1].replace("/", "\\/"),
    }


def main():
    root = pathlib.Path(sys.argv[1])
    secrets = set()
    for f in sorted(root.glob("secrets-*.txt")):
        secrets.update(line for line in f.read_text().splitlines() if line)
    logs = sorted(root.glob("*.log"))
    lines = 0
    hits = []
    for log in logs:
        text = log.read_text(errors="replace")
        lines += text.count("\n")
        for s in secrets:
            for name, form in forms(s).items():
                if form in text:
                    hits.append(f"{log.name}: contains a '{s.split('/')[0]}' test secret, {name}")
    if not secrets or lines == 0:
        print(f"secret scan: nothing to check ({len(secrets)} secrets, {lines} log lines): "
              "the tests must run first, with TB_TEST_LOG_DIR set")
        return 1
    if hits:
        print("secret scan: FAILED")
        print("\n".join(sorted(set(hits))))
        return 1
    print(f"secret scan: {len(secrets)} secrets, {len(logs)} log files, {lines} lines: no secret")
    return 0


if __name__ == "__main__":
    sys.exit(main())
