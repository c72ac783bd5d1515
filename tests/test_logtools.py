"""Real Squid log tools read Relais' access log.

One mitmdump with regular, socks5 and reverse listeners serves a scenario
that makes every code the foundation writes (MISS, intercepted CONNECT,
TCP_TUNNEL, refused origin and CONNECT, DNS failure, empty connection,
garbage request, client abort...). goaccess and calamaris (Debian packages)
must accept every line, and a strict regex checks the exact layout, since
both tools let a '-' byte count or a fractional elapsed time through.
"""
from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess

import pytest

from harness import Proxy, closed_port, curl
from test_accesslog import STRICT

FULL = "%x.%^ %~%L %h %^ %b %^ %U %^ %^ %M"       # every field goaccess can take from a native line
WITH_STATUS = "%x.%^ %~%L %h %^/%s %b %m %U %^ %^ %M"  # also status and method


@pytest.fixture(scope="module")
def scenario(tmp_path_factory, cert):
    from harness import Origin
    tmp = tmp_path_factory.mktemp("logtools")
    origin, tls_origin, passthrough = Origin(), Origin(tls=cert), Origin(tls=cert)
    proxy = Proxy(tmp, modes=("regular", "socks5", f"reverse:{origin.url}"),
                  options={"ignore_hosts": f"127\\.0\\.0\\.1:{passthrough.port}"})
    http, socks, reverse = (f"127.0.0.1:{p}" for p in proxy.ports)
    try:
        curl("-x", http, f"{origin.url}/miss")
        curl("-x", http, "-d", "a=b", f"{origin.url}/post")
        curl("-x", http, "--cacert", proxy.ca, f"https://localhost:{tls_origin.port}/intercepted")
        curl("-x", http, "-k", f"https://127.0.0.1:{passthrough.port}/tunnel")
        curl("--socks5-hostname", socks, f"{origin.url}/socks")
        curl("--socks5-hostname", socks, "-k", f"https://127.0.0.1:{passthrough.port}/socks-tunnel")
        curl(f"http://{reverse}/reverse")
        with closed_port() as (dead, _):  # refuses connections, and no other process can take it
            curl("-x", http, f"http://127.0.0.1:{dead}/refused")
            curl("-x", http, "-k", f"https://127.0.0.1:{dead}/")
        curl("-x", http, "http://nosuchhost.invalid/")
        socket.create_connection(("127.0.0.1", proxy.port)).close()
        with socket.create_connection(("127.0.0.1", proxy.port)) as s:
            s.sendall(b"GARBAGE\r\n\r\n")
            s.recv(4096)
        curl("-x", http, f"{origin.url}/slow/100000?rate=2000", timeout=1)
        proxy.log_line("/slow/", timeout=15)  # the last transaction of the scenario
        lines = proxy.log_lines(16)
        log = tmp / "access.log"
        yield log, lines
    finally:
        proxy.stop()
        for o in (origin, tls_origin, passthrough):
            o.close()


def codes(lines):
    return {re.split(r"\s+", l)[3] for l in lines}


def test_scenario_made_every_code(scenario):
    _, lines = scenario
    got = codes(lines)
    for want in ("TCP_MISS/200", "NONE_NONE/200", "TCP_TUNNEL/200", "TCP_MISS/503", "NONE_NONE/503",
                 "NONE_NONE/000", "NONE_NONE/400", "TCP_MISS_ABORTED/200"):
        assert want in got, f"{want} missing from\n" + "\n".join(lines)
    tunnel = [l for l in lines if "TCP_TUNNEL/200" in l]
    assert len(tunnel) == 2 and all(int(l.split()[4]) > 2000 for l in tunnel)  # real byte counts
    # one line per CONNECT: a tunnel is not logged again from its CONNECT
    assert sum(" CONNECT 127.0.0.1:" in l and "/200 " in l for l in lines) == 2
    bumped = next(l for l in lines if "NONE_NONE/200" in l)
    assert " 0 CONNECT localhost:" in bumped
    garbage = next(l for l in lines if "NONE_NONE/400" in l)
    assert " GARBAGE error:invalid-request - HIER_NONE/- text/html" in garbage


def test_every_line_has_the_exact_squid_layout(scenario):
    _, lines = scenario
    for line in lines:
        assert STRICT.match(line), line


def goaccess(log, fmt, tmp):
    out, invalid = tmp / "ga.json", tmp / "invalid.txt"
    subprocess.run(["goaccess", str(log), f"--log-format={fmt}", "--date-format=%s", "--time-format=%s",
                    "-o", str(out), f"--invalid-requests={invalid}"], check=True, capture_output=True, timeout=60)
    return json.loads(out.read_text())["general"], invalid.read_text().splitlines()


def test_goaccess_accepts_every_line(scenario, tmp_path):
    assert shutil.which("goaccess"), "goaccess is installed by ./run.sh test"
    log, lines = scenario
    general, invalid = goaccess(log, FULL, tmp_path)
    assert invalid == [] and general["failed_requests"] == 0
    assert general["valid_requests"] == len(lines)


def test_goaccess_with_status_and_method_rejects_only_what_squid_lines_also_fail(scenario, tmp_path):
    """goaccess refuses status 000 and unknown methods: exactly the error: lines, as for Squid's own log."""
    log, lines = scenario
    _, invalid = goaccess(log, WITH_STATUS, tmp_path)
    assert sorted(invalid) == sorted(l for l in lines if " error:" in l)


def test_calamaris_reads_every_line(scenario):
    assert shutil.which("calamaris"), "calamaris is installed by ./run.sh test"
    log, lines = scenario
    out = subprocess.run(["calamaris", "-a"], stdin=open(log), capture_output=True, text=True, timeout=60).stdout
    parsed = int(re.search(r"lines parsed:\s+lines\s+(\d+)", out).group(1))
    invalid = int(re.search(r"invalid lines:\s+lines\s+(\d+)", out).group(1))
    assert (parsed, invalid) == (len(lines), 0)
