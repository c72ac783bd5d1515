"""Access control in transparent mode: a client namespace whose traffic a router namespace redirects
(iptables REDIRECT) to mitmdump, as on a Squid interception router (see netns.py).

Domain acls see the Host header / SNI (the request host is the original IP); denied raw streams are
closed promptly, also when refused before connecting upstream (the eager strategy). Needs root.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness import Proxy
from netns import CLIENT_IP, SERVER_IP, Topology, sh

HERE = Path(__file__).resolve().parent
PROXY_PORT = 8080

POLICY = """
acls:
  lan: src 10.0.0.0/8
  Safe_ports: port 80 443
  SSL_ports: port 443
  blocked: dstdomain .blocked.test
  badsni: ssl::server_name .denied.test
http_access:
  - deny !Safe_ports
  - deny blocked
  - deny badsni
  - deny CONNECT !SSL_ports
  - allow lan
  - deny all
"""

# Connects from the client namespace, optionally sends, and reports how the connection ended.
CLIENT = r"""
import socket, sys, time
host, port, payload = sys.argv[1], int(sys.argv[2]), sys.argv[3].encode()
t = time.monotonic()
s = socket.create_connection((host, port), timeout=10)
if payload:
    s.sendall(payload)
try:
    data = s.recv(4096)
    print("eof" if not data else "data", round(time.monotonic() - t, 3))
except ConnectionResetError:
    print("reset", round(time.monotonic() - t, 3))
except socket.timeout:
    print("open", round(time.monotonic() - t, 3))
"""


@pytest.fixture(scope="module")
def lan(tmp_path_factory, cert):
    assert os.geteuid() == 0, "transparent-mode tests need root for network namespaces and iptables"
    tmp = tmp_path_factory.mktemp("acl_transparent")
    (tmp / "policy.yaml").write_text(POLICY)
    topo = Topology("a")  # not test_transparent.py's names
    try:
        topo.up(PROXY_PORT)
        # also intercept port 25, which the policy refuses from connection facts alone
        sh(*topo.ns(topo.router, "iptables", "-t", "nat", "-A", "PREROUTING", "-s", CLIENT_IP, "-p", "tcp",
                    "--dport", "25", "-j", "REDIRECT", "--to-port", str(PROXY_PORT)))
        topo.serve(80)
        topo.serve(443, *cert)
        proxy = Proxy(tmp / "proxy", modes=("transparent",), ports=[PROXY_PORT], listen_host="0.0.0.0",
                      prefix=topo.ns(topo.router), options={"policy": str(tmp / "policy.yaml")})
        yield topo, proxy
        proxy.stop()
    finally:
        topo.down()


def client_connect(topo, port: int, payload: bytes = b"") -> tuple[str, float]:
    r = subprocess.run(topo.ns(topo.client, sys.executable, "-c", CLIENT, SERVER_IP, str(port), payload.decode()),
                       capture_output=True, text=True, timeout=30)
    how, seconds = r.stdout.split()
    return how, float(seconds)


def test_http_allowed_and_denied_by_host_header(lan):
    topo, proxy = lan
    r = topo.curl("-H", "Host: www.ok.test", f"http://{SERVER_IP}/acl-ok")
    assert r.stdout == b"hello /acl-ok", r.stderr
    r = topo.curl("-i", "-H", "Host: www.blocked.test", f"http://{SERVER_IP}/acl-no")
    assert r.stdout.startswith(b"HTTP/1.1 403") and b"http_access deny blocked" in r.stdout
    line = proxy.log_line("/acl-no")
    assert f" {CLIENT_IP} TCP_DENIED/403 " in line and " GET http://www.blocked.test/acl-no " in line


def test_raw_stream_denied_at_tcp_start_is_closed_promptly(lan):
    topo, proxy = lan
    how, seconds = client_connect(topo, 80, b"\x01\x02 not http\r\n")
    assert how in ("eof", "reset") and seconds < 2
    line = proxy.log_line(f"CONNECT {SERVER_IP}:80")
    assert f" {CLIENT_IP} TCP_DENIED/403 0 CONNECT {SERVER_IP}:80 " in line


@pytest.mark.parametrize("payload", [b"", b"EHLO client\r\n"])
def test_refused_before_connecting_upstream_closes_the_client_promptly(lan, payload):
    """The case where mitmproxy's own refusal (data.server.error under the eager strategy) leaves the client hanging."""
    topo, proxy = lan
    before = proxy.text().count("killed before connect")
    how, seconds = client_connect(topo, 25, payload)
    assert how in ("eof", "reset") and seconds < 2, (how, seconds)
    line = proxy.log_line(f"CONNECT {SERVER_IP}:25")
    assert " TCP_DENIED/403 0 " in line and " HIER_NONE/- " in line
    assert proxy.text().count("killed before connect") > before  # never connected upstream


def test_tls_decided_by_sni(lan):
    topo, proxy = lan
    t = time.monotonic()
    r = topo.curl("--cacert", proxy.ca, "--resolve", f"www.denied.test:443:{SERVER_IP}",
                    "https://www.denied.test/sni-no")
    assert r.returncode != 0 and time.monotonic() - t < 5
    assert " TCP_DENIED/403 0 CONNECT www.denied.test:443 " in proxy.log_line("www.denied.test:443")
    r = topo.curl("--cacert", proxy.ca, "--resolve", f"ok.test:443:{SERVER_IP}", "https://ok.test/sni-ok")
    assert r.stdout == b"hello /sni-ok", r.stderr
