"""Transparent mode: a client in its own network namespace, its port 80/443
traffic redirected by iptables on a router namespace to mitmdump.

Needs root (CI runs as root); it fails, never skips, without it.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from harness import Proxy
from netns import CLIENT_IP, ECHO_PORT, ROUTER_IN, SERVER_IP, Topology

PROXY_PORT = 8080
FORWARD_PORT = 3128  # the router's forward-proxy listener, in the same process
BLACKHOLE = 8082  # a Safe_port


@pytest.fixture(scope="module")
def lan(tmp_path_factory, cert):
    assert os.geteuid() == 0, "transparent-mode tests need root for network namespaces and iptables"
    tmp = tmp_path_factory.mktemp("transparent")
    topo = Topology()
    try:
        topo.up(PROXY_PORT)
        topo.serve(80)
        topo.serve(443, *cert)
        topo.serve(ECHO_PORT, "echo")
        # A port that silently drops connections, for the connect-timeout case.
        subprocess.run(topo.ns(topo.server, "iptables", "-A", "INPUT", "-p", "tcp", "--dport", str(BLACKHOLE),
                               "-j", "DROP"), check=True)
        proxy = Proxy(tmp, modes=("transparent", "regular"), ports=[PROXY_PORT, FORWARD_PORT],
                      listen_host="0.0.0.0", prefix=topo.ns(topo.router), options={"connect_timeout": 2})
        yield topo, proxy
        proxy.stop()
    finally:
        topo.down()


def test_http_is_redirected_through_the_proxy(lan):
    topo, proxy = lan
    r = topo.curl("-H", "Host: www.example.test", f"http://{SERVER_IP}/t1")
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"hello /t1"
    line = proxy.log_line("/t1")
    # Logged with the client's own address and the name from the Host header.
    assert f" {CLIENT_IP} TCP_MISS/200 " in line
    assert " GET http://www.example.test/t1 - HIER_DIRECT/10.231.2.2 text/plain" in line


def test_https_is_intercepted_with_the_proxy_ca(lan):
    topo, proxy = lan
    r = topo.curl("--cacert", proxy.ca, "--resolve", f"secure.example.test:443:{SERVER_IP}",
                    "https://secure.example.test/t2")
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"hello /t2"
    line = proxy.log_line("/t2")
    assert f" {CLIENT_IP} TCP_MISS/200 " in line and " GET https://secure.example.test/t2 " in line


def test_without_the_redirect_the_proxy_sees_nothing(lan):
    """Control: traffic to another port is routed, not intercepted, so the proxy logs nothing for it."""
    topo, proxy = lan
    before = len(proxy.log_lines(0))
    r = topo.curl("--connect-timeout", "2", f"http://{SERVER_IP}:81/t3")
    assert r.returncode != 0  # nothing listens on :81
    time.sleep(0.5)
    assert not any("/t3" in l for l in proxy.log_lines(0)[before:])


def test_raw_tcp_stream_is_relayed_and_logged_as_a_tunnel(lan):
    topo, proxy = lan
    script = ("import socket; s = socket.create_connection(('%s', %d), timeout=10); "
              "s.sendall(b'ping\\n'); print(s.recv(100).decode(), end=''); s.close()" % (SERVER_IP, ECHO_PORT))
    r = subprocess.run(topo.ns(topo.client, sys.executable, "-c", script), capture_output=True, timeout=30)
    assert r.stdout == b"echo: ping\n", r.stderr
    line = proxy.log_line(f":{ECHO_PORT} ")
    assert f" {CLIENT_IP} TCP_TUNNEL/200 11 CONNECT {SERVER_IP}:{ECHO_PORT} - HIER_DIRECT/{SERVER_IP} -" in line


def test_connect_timeout_gets_squid_503(lan):
    """An origin that never answers the handshake: 503 ERR_CONNECT_FAIL (ETIMEDOUT) after connect_timeout."""
    topo, proxy = lan
    start = time.monotonic()
    r = topo.curl("-D", "-", "-o", "/dev/null", "-x", f"http://{ROUTER_IN}:{FORWARD_PORT}",
                    f"http://{SERVER_IP}:{BLACKHOLE}/t5")
    took = time.monotonic() - start
    assert b" 503 " in r.stdout.split(b"\r\n")[0], r.stdout
    assert b"X-Squid-Error: ERR_CONNECT_FAIL 110" in r.stdout
    assert took < 12  # it is the proxy's connect_timeout (2 s) that answered, not curl giving up
    line = proxy.log_line("/t5")
    assert f" {CLIENT_IP} TCP_MISS/503 " in line and f" HIER_DIRECT/{SERVER_IP} text/html" in line


def test_transparent_requests_are_cached(lan):
    topo, proxy = lan
    url = f"http://{SERVER_IP}/cached?h.Cache-Control=max-age%3D60"
    for _ in range(2):
        r = topo.curl("-H", "Host: cache.example.test", url)
        assert r.stdout == b"hello /cached"
    lines = proxy.wait_lines("/cached", 2)
    assert " TCP_MISS/200 " in lines[-2] and " TCP_MEM_HIT/200 " in lines[-1]
    assert " GET http://cache.example.test/cached? - HIER_NONE/- text/plain" in lines[-1]


def test_sites_that_share_an_address_get_their_own_entries(lan):
    """A transparent client connects to an address, and the origin answers for the site its Host
    names (here it echoes it): sites on one address never answer for each other from the cache."""
    topo, proxy = lan
    url = f"http://{SERVER_IP}/headers?shared=1&h.Cache-Control=max-age%3D60"
    for site in ("a.example.test", "b.example.test", "a.example.test", "b.example.test"):
        r = topo.curl("-H", f"Host: {site}", url)
        assert json.loads(r.stdout)["headers"]["host"] == site
    lines = proxy.wait_lines("/headers", 4)
    assert [l.split()[3] for l in lines] == ["TCP_MISS/200", "TCP_MISS/200", "TCP_MEM_HIT/200", "TCP_MEM_HIT/200"]
