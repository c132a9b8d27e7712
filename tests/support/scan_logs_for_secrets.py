#!/usr/bin/python3
"""Proves that no secret created by the test run reached a log.

Reads every secrets-*.txt (one secret per line, written by tests through NewTestSecret as
"<label>/<16 random hex digits>+<n>=") and every *.log in the given directory (all log lines of
all test processes, at trace level), and fails if any log contains a secret in raw, URL-encoded,
form-encoded or JSON-escaped form, or even just its 64 random bits (which survive any encoding).
It also fails when there is nothing to check (no secrets or no log lines), so that it cannot pass
vacuously.
"""
import json
import pathlib
import re
import sys
import urllib.parse

RANDOM_PART = re.compile(r"/([0-9a-f]{16})\+")
HEX_WINDOW = re.compile(r"(?=([0-9a-f]{16}))")


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
    by_random = {}
    others = set()  # recorded with RecordTestSecret: searched for by their encoded forms
    for f in sorted(root.glob("secrets-*.txt")):
        for line in f.read_text().splitlines():
            m = RANDOM_PART.search(line)
            if m:
                by_random[m.group(1)] = line
            elif len(line) >= 8:
                others.add(line)
    logs = sorted(root.glob("*.log"))
    lines = 0
    hits = set()
    for log in logs:
        text = log.read_text(errors="replace")
        lines += text.count("\n")
        for m in HEX_WINDOW.finditer(text):
            secret = by_random.get(m.group(1))
            if secret is None:
                continue
            found = [name for name, form in forms(secret).items() if form in text]
            how = ", ".join(found) if found else "its random part"
            hits.add(f"{log.name}: contains a '{secret.split('/')[0]}' test secret ({how})")
        for secret in others:
            for name, form in forms(secret).items():
                if form in text:
                    hits.add(f"{log.name}: contains a recorded secret ({name})")
    if not by_random or lines == 0:
        print(f"secret scan: nothing to check ({len(by_random)} secrets, {lines} log lines): "
              "the tests must run first, with TB_TEST_LOG_DIR set")
        return 1
    if hits:
        print("secret scan: FAILED")
        print("\n".join(sorted(hits)))
        return 1
    print(f"secret scan: {len(by_random)} test secrets, {len(others)} recorded secrets, "
          f"{len(logs)} log files, {lines} lines: no secret")
    return 0


if __name__ == "__main__":
    sys.exit(main())
