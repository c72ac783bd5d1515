"""Differential test: Squid's cache / send_hit / store_miss rules in a real Squid and in Relais.

One squid.conf holds the acls and the three rules. Squid reads all of it; Relais reads the same
file twice: its acl and http_access lines as the access policy (`policy`), its cache, send_hit,
store_miss (and refresh_pattern) lines as the cache policy (`cache_policy`). The same requests go
through both, each to its own origin, and the access-log result codes and the requests each
origin received must be the same.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


from harness import Origin, Proxy, curl, stop_group
from squid import common_conf, start_squid_on_free_port

RULES = ["cache deny private_area", "send_hit deny nohit", "store_miss deny nostore"]

# (path, extra request header, method): every path answers 200 with Cache-Control: max-age=600
STEPS = [
    ("/private/a", None, "GET"), ("/private/a", None, "GET"),      # cache deny: never a hit, never stored
    ("/private/a", None, "HEAD"),
    ("/public/a", None, "GET"), ("/public/a", None, "GET"),        # no rule: stored, then a hit
    ("/public/a", None, "HEAD"),
    ("/s", "X-No-Hit: 1", "GET"), ("/s", "X-No-Hit: 1", "GET"),    # send_hit deny: stored, not a hit
    ("/s", "X-No-Hit: 1", "HEAD"), ("/s", None, "GET"),
    ("/n", "X-No-Store: 1", "GET"), ("/n", None, "GET"),           # store_miss deny: not stored
    ("/n", "X-No-Store: 1", "GET"), ("/n", "X-No-Store: 1", "HEAD"),
    ("/both", "X-No-Store: 1", "GET"), ("/both", "X-No-Hit: 1", "GET"), ("/both", None, "GET"),
    # a stored copy that a response the rules keep out supersedes (a reload here) is dropped
    ("/r", None, "GET"), ("/r", "X-No-Store: 1|Cache-Control: no-cache", "GET"), ("/r", None, "GET"),
]


def conf(tmp: Path, port: int) -> str:
    return f"""
http_port 127.0.0.1:{port}
{common_conf(tmp)}
acl private_area urlpath_regex /private/
acl nohit req_header X-No-Hit .
acl nostore req_header X-No-Store .
http_access allow localhost
http_access deny all
""" + "\n".join(RULES) + "\n"


def run_steps(port: int, origin: Origin) -> None:
    for path in {p for p, _, _ in STEPS}:
        origin.route(path, lambda seen: (200, {"Cache-Control": "max-age=600", "Content-Type": "text/plain"}, b"body"))
    for path, header, method in STEPS:
        r = curl("-s", "-o", "/dev/null", "-w", "%{http_code}", "-x", f"http://127.0.0.1:{port}",
                 *[a for h in (header or "").split("|") if h for a in ("-H", h)], *(["-I"] if method == "HEAD" else []),
                 f"{origin.url}{path}")
        assert r.stdout == b"200", (path, r.stdout, r.stderr)


def codes(lines: list[str], origin: Origin) -> list[str]:
    """'method path code' of each access-log line about this origin, in order."""
    out = []
    for line in lines:
        f = line.split()
        if len(f) > 6 and f[6].startswith(origin.url):
            out.append(f"{f[5]} {f[6][len(origin.url):]} {f[3].split('/')[0]}")
    return out


def test_cache_rules_as_squid_applies_them(tmp_path_factory):
    assert os.geteuid() == 0, "the Squid differential test runs Squid as root (cache_effective_user proxy)"
    tmp = Path(tempfile.mkdtemp(prefix="relais-squid-cache-"))  # readable by the proxy user, unlike pytest's tmp
    os.chmod(tmp, 0o755)
    squid_origin, relais_origin = Origin(), Origin()
    squid = relais = None
    try:
        squid, port = start_squid_on_free_port(tmp, lambda port: conf(tmp, port))
        relais = Proxy(tmp_path_factory.mktemp("relais"),
                       options={"policy": str(tmp / "squid.conf"), "cache_policy": str(tmp / "squid.conf"),
                                "cache_dir": "none"})
        run_steps(port, squid_origin)
        run_steps(relais.port, relais_origin)
        expected = codes(relais.wait_lines(squid_origin.url, len(STEPS), path=tmp / "access.log"), squid_origin)
        got = codes(relais.wait_lines(relais_origin.url, len(STEPS)), relais_origin)
        assert got == expected, [(g, e) for g, e in zip(got, expected) if g != e]
        assert relais_origin.hits == squid_origin.hits
        # what Squid 5.7 does with these rules (a HEAD it may not answer from the cache invalidates the stored
        # GET), so that a Squid that cached nothing cannot pass
        assert expected.count("GET /public/a TCP_MEM_HIT") == 1
        assert squid_origin.hits == {"/private/a": 3, "/public/a": 1, "/s": 4, "/n": 2, "/both": 2, "/r": 3}
    finally:
        if relais:
            relais.stop()
        if squid:
            stop_group(squid)
        squid_origin.close()
        relais_origin.close()
        shutil.rmtree(tmp, ignore_errors=True)
