"""Replay the requests behind a real Squid 5.7's access.log through Relais and
compare the lines field by field.

../shared/reference/squid-5.7-access.log holds the lines Squid wrote, one per
case of squid-5.7-access.annotated.txt (same order). The origin here serves the
same objects as the nginx there (1k, 100k, reval/obj, neg/..., auth/x, slow/100k;
405 to POST), and the policy has the same rules (tests/policies/reference.yaml).
Ports are mapped: 31081 origin, 31443 TLS origin, 31099 a closed port.

Compared: client, code, status, method, URL, user, hierarchy, peer, MIME type.
Not compared: time, elapsed time, and the byte count, which depends on each
proxy's own headers (checked only for being 0 where Squid's is 0, or larger
than the body). Documented differences are asserted as such below.
"""
from __future__ import annotations

import email.utils
import socket
import time

import pytest

from harness import ROOT, SHARED, Origin, Proxy, closed_port, curl

REF = SHARED / "reference" / "squid-5.7-access.log"
ETAG_1K, ETAG_100K, ETAG_REVAL = '"6b08e857-400"', '"6b08e857-19000"', '"6b08e857-e"'
LAST_MODIFIED = email.utils.formatdate(time.time() - 3600, usegmt=True)

# What Relais answers differently from that particular Squid run, and why.
DIFFERENT = {
    # Squid there had only a hosts file and no DNS server: it timed out reading
    # (502 ERR_READ_ERROR). A DNS failure proper is 503 ERR_DNS_FAIL, as Relais answers.
    24: {"status": "503"},
    # Squid streams every body: 20 KB had reached the client when it gave up. mitmproxy
    # buffers bodies smaller than stream_large_bodies, so none of this one had been sent.
    28: {"bytes": "0"},
}


def static(body: bytes, etag: str, ctype="application/octet-stream", extra=None):
    def respond(seen):
        if seen.method == "POST":
            return 405, {"Content-Type": "text/html"}, b"<html><body>405 Not Allowed</body></html>"
        headers = {"Content-Type": ctype, "ETag": etag, "Last-Modified": LAST_MODIFIED, **(extra or {})}
        if seen.headers.get("if-none-match") == etag or seen.headers.get("if-modified-since") == LAST_MODIFIED:
            return 304, {k: v for k, v in headers.items() if k != "Content-Type"}, b""
        return 200, headers, body
    return respond


def make_origin(cert=None) -> Origin:
    o = Origin(tls=cert)
    o.route("/1k", static(b"k" * 1024, ETAG_1K))
    o.route("/100k", static(b"h" * 102400, ETAG_100K))
    o.route("/reval/obj", static(b"revalidate me\n", ETAG_REVAL, extra={"Cache-Control": "max-age=1"}))
    o.route("/neg/plain/a", lambda s: (404, {"Content-Type": "text/plain"}, b"not found\n"))
    o.route("/neg/maxage/a", lambda s: (404, {"Content-Type": "text/plain", "Cache-Control": "max-age=60"},
                                        b"not found\n"))
    o.route("/auth/x", lambda s: (200, {"Content-Type": "text/plain"}, b"secret\n"))

    def slow(seen):  # 100 KiB at 20 KB/s, like the nginx limit_rate there
        def chunks():
            for _ in range(50):
                yield b"s" * 2048
                time.sleep(0.1)
        return 200, {"Content-Type": "application/octet-stream", "Content-Length": str(102400)}, chunks
    o.route("/slow/100k", slow)
    return o


@pytest.fixture(scope="module")
def replay(tmp_path_factory, cert):
    tmp = tmp_path_factory.mktemp("reference")
    origin, tls_origin = make_origin(), make_origin(cert)
    proxy = Proxy(tmp, options={
        "policy": str(ROOT / "tests" / "policies" / "reference.yaml"),
        "negative_ttl": 60, "cache_dir": str(tmp / "cache"), "proxyauth": "alice:secret",
        "ignore_hosts": f"127\\.0\\.0\\.1:{tls_origin.port}"})
    try:
        with closed_port() as (dead, _):  # refuses connections, and no other process can take it
            lines = run_cases(proxy, origin, tls_origin, dead)
        yield proxy, origin, tls_origin, dead, lines
    finally:
        proxy.stop()
        origin.close()
        tls_origin.close()


def run_cases(proxy, origin, tls_origin, dead) -> dict[int, str]:
    """Send each case's request; return {case number: the Relais log line it made}."""
    x = ("-x", proxy.url)
    o = origin.url
    sends = {
        1: lambda: curl(*x, f"{o}/1k"),
        2: lambda: curl(*x, f"{o}/1k"),
        3: lambda: curl(*x, "-I", f"{o}/1k"),
        4: lambda: curl(*x, "-H", f"If-Modified-Since: {LAST_MODIFIED}", f"{o}/1k"),
        5: lambda: curl(*x, "-H", f"If-None-Match: {ETAG_1K}", f"{o}/1k"),
        6: lambda: curl(*x, "-H", "Cache-Control: no-cache", f"{o}/1k"),
        7: lambda: curl(*x, "-H", "Cache-Control: max-age=0", f"{o}/1k"),
        8: lambda: curl(*x, f"{o}/reval/obj"),
        9: lambda: (time.sleep(2), curl(*x, f"{o}/reval/obj")),
        10: lambda: curl(*x, f"{o}/100k"),
        11: lambda: curl(*x, f"{o}/100k"),
        12: lambda: curl(*x, f"{o}/1k?user=alice&token=secret"),
        13: lambda: curl(*x, f"{o}/neg/plain/a"),
        14: lambda: curl(*x, f"{o}/neg/plain/a"),
        15: lambda: curl(*x, f"{o}/neg/maxage/a"),
        16: lambda: curl(*x, f"{o}/neg/maxage/a"),
        17: lambda: curl(*x, "http://www.blocked.test/page"),
        18: lambda: curl("--interface", "127.0.0.2", *x, f"{o}/1k"),
        19: lambda: curl(*x, f"{o}/auth/x"),
        20: lambda: curl(*x, "-U", "alice:secret", f"{o}/auth/x"),
        21: lambda: curl(*x, "-k", f"https://127.0.0.1:{tls_origin.port}/1k"),
        22: lambda: curl(*x, f"http://127.0.0.1:{dead}/nothing"),
        23: lambda: curl(*x, "-k", f"https://127.0.0.1:{dead}/"),
        24: lambda: curl(*x, "http://nosuchhost.invalid/"),
        25: lambda: curl(*x, "-d", "a=b", f"{o}/1k"),
        26: lambda: socket.create_connection(("127.0.0.1", proxy.port)).close(),
        27: lambda: garbage(proxy.port),
        28: lambda: curl(*x, f"{o}/slow/100k", timeout=1),
    }
    lines: dict[int, str] = {}
    proxy.wait_lines("error:transaction-end-before-headers")  # the harness's readiness probe, logged first
    for case, send in sends.items():
        before = len(proxy.log_lines(0))
        send()
        new = proxy.log_lines(before + 1, timeout=10)[before:]
        assert new, f"case {case}: no log line"
        lines[case] = new[-1]
    return lines


def garbage(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"GARBAGE\r\n\r\n")
        s.recv(4096)


FIELDS = ("client", "code", "status", "bytes", "method", "url", "user", "hier", "peer", "mime")


def parse(line: str) -> dict[str, str]:
    parts = line.split()
    code, status = parts[3].split("/")
    hier, peer = parts[8].split("/", 1)
    return dict(zip(FIELDS, (parts[2], code, status, parts[4], parts[5], parts[6], parts[7], hier, peer, parts[9])))


def squid_lines() -> list[str]:
    return [l for l in REF.read_text().splitlines() if l.strip()]


CASES = list(range(1, len(squid_lines()) + 1)) if REF.exists() else []


def test_the_reference_has_every_case():
    assert len(CASES) == 28


@pytest.mark.parametrize("case", CASES)
def test_line_matches_squids_field_by_field(replay, case):
    proxy, origin, tls_origin, dead, lines = replay
    ours, theirs = parse(lines[case]), parse(squid_lines()[case - 1])
    ports = {"31081": str(origin.port), "31443": str(tls_origin.port), "31099": str(dead)}
    for old, new in ports.items():
        theirs["url"] = theirs["url"].replace(f":{old}", f":{new}")
    theirs.update(DIFFERENT.get(case, {}))
    for field in FIELDS:
        if field == "bytes" and field not in DIFFERENT.get(case, {}):
            continue
        assert ours[field] == theirs[field], f"case {case} {field}: ours {lines[case]!r}"
    if theirs["bytes"] == "0":
        assert ours["bytes"] == "0", lines[case]
    else:
        assert int(ours["bytes"]) > 0, lines[case]
