"""End-to-end access control: a real mitmdump with addons/all.py, real clients (curl, sockets).

Regular, socks5 and reverse listeners share one proxy; authentication and reload use their own.
Flow metadata is read through a small probe addon loaded after the suite (one JSON line per flow).
"""
from __future__ import annotations

import json
import socket
import ssl
import struct
import subprocess
import threading
import time
from pathlib import Path

import pytest

from harness import Origin, Proxy, curl, peak_rss_mb, write_htpasswd

PROBE = '''
import json
from mitmproxy import ctx

class Probe:
    def __init__(self):
        self.out = None
    def _write(self, flow, kind):
        if self.out is None:
            self.out = open(PATH, "a")
        m = flow.metadata
        rec = {"kind": kind, "acl": m.get("relais.acl"), "acls": m.get("relais.acls"), "code": m.get("relais.code"),
               "error": m.get("relais.error"), "local": m.get("relais.local"), "user": m.get("relais.user"),
               "comment": flow.comment}
        if kind == "http":
            rec["url"] = flow.request.pretty_url if flow.request.method != "CONNECT" else f"{flow.request.host}:{flow.request.port}"
            rec["method"] = flow.request.method
        else:
            rec["url"] = "%s:%s" % (flow.client_conn.sni or flow.server_conn.address[0], flow.server_conn.address[1])
        self.out.write(json.dumps(rec) + "\\n")
        self.out.flush()
    def response(self, flow):
        self._write(flow, "http")
    def http_connect(self, flow):
        if flow.response:
            self._write(flow, "http")
    def tcp_end(self, flow):
        self._write(flow, "tcp")
    def tcp_error(self, flow):
        self._write(flow, "tcp")

addons = [Probe()]
'''


def start(tmp: Path, policy: str, modes, options=None) -> Proxy:
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "policy.yaml").write_text(policy)
    probe = tmp / "probe.py"
    probe.write_text(f"PATH = {str(tmp / 'probe.jsonl')!r}\n" + PROBE)
    opts = {"policy": str(tmp / "policy.yaml"), **(options or {})}
    p = Proxy(tmp / "proxy", modes=modes, options=opts, args=["-s", str(probe)])
    p.probe_file = tmp / "probe.jsonl"
    return p


def probes(proxy: Proxy, pred, timeout: float = 10.0) -> dict:
    """The first probe record matching pred, waiting for it."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            for line in proxy.probe_file.read_text().splitlines():
                rec = json.loads(line)
                if pred(rec):
                    return rec
        except FileNotFoundError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"no probe record matched; have:\n{proxy.probe_file.read_text() if proxy.probe_file.exists() else ''}")


class Echo:
    """A raw TCP echo server that records what it received."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.port = self.sock.getsockname()[1]
        self.received = b""
        self.accepted = 0
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    def _serve(self, c):
        with c:
            while True:
                try:
                    d = c.recv(4096)
                except OSError:
                    return
                if not d:
                    return
                self.received += d
                c.sendall(d)

    def close(self):
        self.sock.close()


def socks5(port: int, host: str, dport: int, user: str | None = None, password: str = "") -> socket.socket:
    """A minimal SOCKS5 client: returns the connected socket (or raises ConnectionError)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    if user:
        s.sendall(b"\x05\x01\x02")
        assert s.recv(2) == b"\x05\x02"
        s.sendall(b"\x01" + bytes([len(user)]) + user.encode() + bytes([len(password)]) + password.encode())
        assert s.recv(2) == b"\x01\x00"
    else:
        s.sendall(b"\x05\x01\x00")
        assert s.recv(2) == b"\x05\x00"
    s.sendall(b"\x05\x01\x00\x03" + bytes([len(host)]) + host.encode() + struct.pack("!H", dport))
    reply = s.recv(10)
    if len(reply) < 2 or reply[1] != 0:
        s.close()
        raise ConnectionError(f"SOCKS5 refused: {reply!r}")
    return s


def eof_within(s: socket.socket, seconds: float) -> float:
    """Seconds until the peer closed (EOF or reset); fails if it stays open longer."""
    t = time.monotonic()
    s.settimeout(seconds)
    try:
        while True:
            d = s.recv(4096)
            if not d:
                break
    except ConnectionResetError:
        pass
    except socket.timeout:
        raise AssertionError(f"connection still open after {seconds}s")
    return time.monotonic() - t


# --- the shared proxy: regular + socks5 + reverse ---------------------------------

@pytest.fixture(scope="module")
def env(tmp_path_factory, cert):
    origin, tls_origin, echo = Origin(), Origin(tls=cert), Echo()
    policy = f"""
acls:
  Safe_ports: port 80 443 1025-65535
  SSL_ports: port 443
  tls_origin: port {tls_origin.port}
  secret: urlpath_regex -i ^/secret
  blocked: dstdomain .blocked.test
  bot: browser -i evilbot
  rev: myportname reverse
  admin: urlpath_regex ^/admin
  badsni: ssl::server_name .denied.test
  spliced: ssl::server_name localhost
  doomed: ssl::server_name .terminate.test
http_access:
  - deny !Safe_ports
  - deny secret
  - deny blocked
  - deny bot
  - deny rev admin
  - deny badsni
  - allow CONNECT tls_origin
  - deny CONNECT !SSL_ports
  - allow localhost
  - deny all
ssl_bump:
  - splice spliced
  - terminate doomed
  - bump all
"""
    tmp = tmp_path_factory.mktemp("acl_e2e")
    proxy = start(tmp, policy, ("regular", "socks5", f"reverse:http://127.0.0.1:{origin.port}"))
    yield proxy, origin, tls_origin, echo
    proxy.stop()
    origin.close()
    tls_origin.close()
    echo.close()


def test_regular_allowed_request_carries_the_allowing_rule(env):
    proxy, origin, *_ = env
    r = curl("-x", proxy.url, f"{origin.url}/ok1")
    assert r.stdout == b"hello /ok1"
    assert " TCP_MISS/200 " in proxy.log_line("/ok1")
    rec = probes(proxy, lambda r: r["url"].endswith("/ok1"))
    assert rec["acl"]["action"] == "allow" and rec["acl"]["rule"] == "http_access allow localhost"
    assert rec["acl"]["policy"].endswith("policy.yaml")
    assert rec["comment"] == "allowed by: http_access allow localhost"
    assert {"all", "localhost", "Safe_ports", "tls_origin"} - {"tls_origin"} <= set(rec["acls"])
    assert rec["acls"] == sorted(rec["acls"]) and "secret" not in rec["acls"]


def test_regular_denied_request_gets_the_page_log_line_and_metadata(env):
    proxy, origin, *_ = env
    r = curl("-i", "-x", proxy.url, f"{origin.url}/SECRET/x?q=1")
    head, _, body = r.stdout.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 403")
    assert b"X-Squid-Error: ERR_ACCESS_DENIED 0" in head
    assert b"http_access deny secret" in body and b"ERR_ACCESS_DENIED" in body
    line = proxy.log_line("/SECRET/x")
    assert " TCP_DENIED/403 " in line and f" GET {origin.url}/SECRET/x? - HIER_NONE/- text/html" in line
    rec = probes(proxy, lambda r: "/SECRET/x" in r["url"])
    assert rec["code"] == "TCP_DENIED" and rec["local"] == "acl" and rec["error"] == "ERR_ACCESS_DENIED"
    assert rec["acl"] == {"action": "deny", "rule": "http_access deny secret", "policy": rec["acl"]["policy"]}
    assert rec["comment"] == "denied by: http_access deny secret"
    assert "secret" in rec["acls"]
    assert "/SECRET/x" not in origin.hits  # never forwarded


def test_a_url_that_is_not_utf8_is_denied_like_any_other(env):
    """Bytes that are not UTF-8 in the path (mitmproxy keeps them as lone surrogates) neither break
    the deny page nor let the request through: the rule still decides, and the log still writes."""
    proxy, origin, *_ = env
    for path in (b"/secret/caf\xe9", b"/ok-caf\xe9"):  # through the reverse listener: in a proxy
        # request's absolute URL, mitmproxy itself refuses such bytes (400)
        s = socket.create_connection(("127.0.0.1", proxy.ports[2]), timeout=10)
        s.sendall(b"GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n" % path)
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
        s.close()
        if path.startswith(b"/secret"):
            assert answer.startswith(b"HTTP/1.1 403") and b"http_access deny secret" in answer
        else:
            assert answer.startswith(b"HTTP/1.1 200")
    assert not any(h.startswith("/secret/caf") for h in origin.hits)  # never forwarded
    assert " TCP_DENIED/403 " in proxy.log_line("/secret/caf\udce9")  # the byte as the client sent it
    assert " TCP_MISS/200 " in proxy.log_line("/ok-caf\udce9")
    r = curl("-x", proxy.url, f"{origin.url}/after-caf")  # the log goes on writing
    assert r.stdout == b"hello /after-caf" and proxy.log_line("/after-caf")


def test_denied_before_the_body_is_read(env):
    """curl sends Expect: 100-continue and waits for the verdict (here up to 60 s, longer than --max-time):
    the 403 comes at once, as from Squid (RFC 9110 10.1.1), and not one byte of the body is sent."""
    proxy, origin, *_ = env
    body = b"x" * 2_000_000
    r = subprocess.run(["curl", "-v", "-sS", "-o", "/dev/null", "-w", "%{http_code} %{size_upload}",
                        "--expect100-timeout", "60", "--max-time", "20",
                        "-x", proxy.url, "--data-binary", "@-", f"{origin.url}/secret/upload"],
                       input=body, capture_output=True, timeout=30)
    assert r.stdout == b"403 0", r.stderr[-500:]
    assert b"Expect: 100-continue" in r.stderr and b"< HTTP/1.1 100" not in r.stderr  # the body was not invited
    assert b"< Connection: close" in r.stderr  # what the client might still send is not read on
    assert "/secret/upload" not in origin.hits
    assert proxy.log_line("/secret/upload").split()[3] == "TCP_DENIED/403"


def test_an_early_answer_ends_its_flow_so_a_client_leaving_is_no_error(start_proxy, origin):
    """The 403 sent before the body is the flow's end: the client then closing without the body it announced
    is not reported as the flow's error (mitmweb would show a denied request as failed)."""
    p = start_proxy()
    r = curl("-o", "/dev/null", "-w", "%{http_code} %{size_upload}", "--expect100-timeout", "60", "-x", p.url,
             "--data-binary", "@-", "http://127.0.0.1:1/early", input_bytes=b"x" * 2_000_000)
    assert r.stdout == b"403 0"
    assert p.wait_lines("/early", 1)[0].split()[3] == "TCP_DENIED/403"
    time.sleep(0.5)  # what mitmproxy prints of a flow's error comes after its line
    assert "protocol error" not in p.text() and "Addon error" not in p.text(), p.text()[-2000:]


def test_a_denied_client_that_sends_its_body_anyway_gets_one_answer(env):
    """A client may send its body without waiting for the 100 (RFC 9110 10.1.1): the 403 already sent
    is the only answer, the body is dropped, and the connection then ends."""
    proxy, origin, *_ = env
    host = f"127.0.0.1:{origin.port}"
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as s:
        s.sendall(f"POST {origin.url}/secret/eager HTTP/1.1\r\nHost: {host}\r\nExpect: 100-continue\r\n"
                  f"Content-Length: 300000\r\n\r\n".encode() + b"y" * 300000)
        got = b""
        while chunk := s.recv(65536):
            got += chunk
    assert got.startswith(b"HTTP/1.1 403") and got.count(b"HTTP/1.1 ") == 1, got[:300]
    assert "/secret/eager" not in origin.hits
    assert [line.split()[3] for line in proxy.wait_lines("/secret/eager", 1)] == ["TCP_DENIED/403"]


def test_dstdomain_and_browser_deny_without_dns(env):
    proxy, origin, *_ = env
    r = curl("-i", "-x", proxy.url, "http://www.blocked.test/page")
    assert r.stdout.startswith(b"HTTP/1.1 403") and b"http_access deny blocked" in r.stdout
    r = curl("-i", "-x", proxy.url, "-A", "EvilBot/2.0", f"{origin.url}/bot")
    assert r.stdout.startswith(b"HTTP/1.1 403") and b"http_access deny bot" in r.stdout
    assert "/bot" not in origin.hits


def test_connect_denied_gets_403_and_no_tunnel(env):
    proxy, origin, *_ = env
    r = curl("-o", "/dev/null", "-w", "%{http_connect}", "-k", "-x", proxy.url, f"https://127.0.0.1:{origin.port}/t")
    assert r.stdout == b"403"
    line = proxy.log_line(f"CONNECT 127.0.0.1:{origin.port}")
    assert " TCP_DENIED/403 " in line and " HIER_NONE/- " in line
    rec = probes(proxy, lambda r: r.get("method") == "CONNECT" and r["url"] == f"127.0.0.1:{origin.port}")
    assert rec["acl"]["rule"] == "http_access deny CONNECT !SSL_ports" and rec["code"] == "TCP_DENIED"
    assert "/t" not in origin.hits


def test_connect_allowed_is_bumped_and_inner_requests_checked(env):
    proxy, _, tls_origin, _ = env
    r = curl("-v", "-k", "-x", proxy.url, f"https://127.0.0.1:{tls_origin.port}/inner")
    assert r.stdout == b"hello /inner"
    assert b"mitmproxy" in r.stderr  # the certificate was made by the proxy: intercepted
    r = curl("-i", "-k", "-x", proxy.url, f"https://127.0.0.1:{tls_origin.port}/secret")
    assert b"\r\n\r\nHTTP/1.1 403 " in r.stdout  # after the CONNECT's 200: decrypted requests go through http_access too
    line = proxy.log_line(f"https://127.0.0.1:{tls_origin.port}/secret")
    assert " TCP_DENIED/403 " in line


def test_ssl_bump_splice_passes_tls_through(env):
    proxy, _, tls_origin, _ = env
    r = curl("-v", "-k", "-x", proxy.url, f"https://localhost:{tls_origin.port}/spliced")
    assert r.stdout == b"hello /spliced", r.stderr
    assert b"issuer: CN=127.0.0.1" in r.stderr and b"mitmproxy" not in r.stderr.split(b"issuer:")[1][:80]
    # Logged once, as the tunnel it is, with the bytes the server sent (certificate and response).
    line = proxy.log_line(f"CONNECT localhost:{tls_origin.port}")
    assert " TCP_TUNNEL/200 " in line and int(line.split()[4]) > 1000, line


def test_ssl_bump_splice_through_socks5_is_logged_with_its_size(env):
    proxy, _, tls_origin, _ = env
    needle = f"CONNECT localhost:{tls_origin.port}"
    before = sum(needle in l for l in proxy.log_lines(0, timeout=0))
    r = curl("-k", "--socks5-hostname", f"127.0.0.1:{proxy.ports[1]}", f"https://localhost:{tls_origin.port}/sp5")
    assert r.stdout == b"hello /sp5", r.stderr
    new = proxy.wait_lines(needle, before + 1)[before:]
    assert len(new) == 1 and " TCP_TUNNEL/200 " in new[0] and int(new[0].split()[4]) > 1000, new


def test_ssl_bump_terminate_closes_and_logs(env):
    proxy, _, tls_origin, _ = env
    r = curl("-k", "--socks5", f"127.0.0.1:{proxy.ports[1]}", "--resolve",
             f"x.terminate.test:{tls_origin.port}:127.0.0.1", f"https://x.terminate.test:{tls_origin.port}/t")
    assert r.returncode != 0
    assert " TCP_DENIED/403 0 " in proxy.log_line(f"CONNECT x.terminate.test:{tls_origin.port}")
    rec = probes(proxy, lambda r: r["url"] == f"x.terminate.test:{tls_origin.port}")
    assert rec["acl"]["rule"] == "ssl_bump terminate doomed" and rec["acl"]["action"] == "deny"


def test_socks5_http_allow_and_deny(env):
    proxy, origin, *_ = env
    socks = proxy.ports[1]
    r = curl("--socks5-hostname", f"127.0.0.1:{socks}", f"{origin.url}/viasocks")
    assert r.stdout == b"hello /viasocks"
    r = curl("-i", "--socks5-hostname", f"127.0.0.1:{socks}", f"{origin.url}/secret/socks")
    assert r.stdout.startswith(b"HTTP/1.1 403") and b"http_access deny secret" in r.stdout
    assert " TCP_DENIED/403 " in proxy.log_line("/secret/socks")


def test_a_host_header_that_names_no_host_is_refused_where_the_rules_read_it(env):
    """In socks5 (and transparent, reverse) mode the acls judge the URL the Host header makes: one that
    names no host[:port] (Host: x/y) would show them another URL than the request's. Squid's 400."""
    proxy, origin, *_ = env
    r = curl("-i", "--socks5", f"127.0.0.1:{proxy.ports[1]}", "-H", "Host: x/y", f"{origin.url}/badhost")
    assert r.stdout.startswith(b"HTTP/1.1 400 ") and b"X-Squid-Error: ERR_INVALID_REQ" in r.stdout
    assert b"invalid Host header: &#x27;x/y&#x27;" in r.stdout
    assert " NONE_NONE/400 " in proxy.log_line("/badhost")
    assert origin.hits.get("/badhost") is None
    for host in ("Example.ORG:8080", "example.org:", "[::1]:80"):  # (an empty port is the scheme's)
        r = curl("--socks5", f"127.0.0.1:{proxy.ports[1]}", "-H", f"Host: {host}", f"{origin.url}/goodhost")
        assert r.stdout == b"hello /goodhost", host  # a valid one is judged as before


def test_socks5_raw_tcp_denied_is_really_closed(env):
    proxy, _, _, echo = env
    s = socks5(proxy.ports[1], "127.0.0.1", echo.port)
    s.sendall(b"not http at all\x00\x01")
    assert eof_within(s, 3) < 2
    s.close()
    line = proxy.log_line(f"CONNECT 127.0.0.1:{echo.port}")
    assert " TCP_DENIED/403 0 CONNECT " in line
    rec = probes(proxy, lambda r: r["kind"] == "tcp" and r["url"] == f"127.0.0.1:{echo.port}")
    assert rec["code"] == "TCP_DENIED" and rec["acl"]["rule"] == "http_access deny CONNECT !SSL_ports"
    assert rec["comment"].startswith("denied by: ")
    time.sleep(0.3)
    assert echo.received == b""  # nothing the client sent reached the server


def test_socks5_denied_before_connecting_is_told_not_allowed_by_ruleset(env):
    """Decided on the connection alone (port 21 is not in Safe_ports): the SOCKS5 client gets
    reply 0x02, "connection not allowed by ruleset" (RFC 1928), then the connection closes."""
    proxy, *_ = env
    with pytest.raises(ConnectionError) as refused:
        socks5(proxy.ports[1], "127.0.0.1", 21)
    assert "b'\\x05\\x02\\x00\\x01" in str(refused.value)
    assert " TCP_DENIED/403 0 CONNECT 127.0.0.1:21 " in proxy.log_line("CONNECT 127.0.0.1:21 ")


def test_socks5_tls_decided_by_sni(env):
    proxy, _, tls_origin, _ = env
    socks = proxy.ports[1]
    t = time.monotonic()
    r = curl("-k", "--socks5", f"127.0.0.1:{socks}", "--resolve", f"www.denied.test:{tls_origin.port}:127.0.0.1",
             f"https://www.denied.test:{tls_origin.port}/sni")
    assert r.returncode != 0 and time.monotonic() - t < 5
    line = proxy.log_line(f"CONNECT www.denied.test:{tls_origin.port}")
    assert " TCP_DENIED/403 0 " in line
    rec = probes(proxy, lambda r: r["url"] == f"www.denied.test:{tls_origin.port}")
    assert rec["acl"]["rule"] == "http_access deny badsni"
    r = curl("-k", "--socks5", f"127.0.0.1:{socks}", "--resolve", f"ok.test:{tls_origin.port}:127.0.0.1",
             f"https://ok.test:{tls_origin.port}/sni-ok")
    assert r.stdout == b"hello /sni-ok"


def test_inside_an_intercepted_tunnel_a_request_is_judged_by_its_host_not_the_connect_or_sni(env):
    """Domain fronting: CONNECT and SNI name an allowed site, the request inside names a denied one.
    Squid builds a bumped request's URL from its Host: it is judged (and denied) as that site."""
    proxy, _, tls_origin, _ = env
    port = tls_origin.port
    front = ("-k", "-x", proxy.url, "--connect-to", f"ok.test:{port}:127.0.0.1:{port}")
    r = curl("-i", *front, "-H", f"Host: www.blocked.test:{port}", f"https://ok.test:{port}/fronted")
    answer = r.stdout.split(b"HTTP/1.1 200 Connection established\r\n\r\n", 1)[-1]
    assert answer.startswith(b"HTTP/1.1 403") and b"http_access deny blocked" in answer, r.stdout[:300]
    assert curl(*front, f"https://ok.test:{port}/not-fronted").stdout == b"hello /not-fronted"
    assert "/fronted" not in tls_origin.hits


def test_a_socks5_request_naming_a_host_is_judged_by_that_name_before_connecting(tmp_path):
    """The SOCKS request names where the connection goes: that name is judged, before any connection
    is made (a denied host is not contacted, as for an address), and a Host field naming another site
    does not get a denied name through."""
    echo = Echo()
    p = start(tmp_path, "acls:\n  badhost: dstdomain localhost\nhttp_access:\n  - deny badhost\n  - allow all\n",
              ("socks5",))
    try:
        for extra in ((), ("-H", "Host: ok.test")):
            r = curl("-s", "-o", "/dev/null", "-w", "%{http_code}", "--socks5-hostname", f"127.0.0.1:{p.port}", *extra,
                     f"http://localhost:{echo.port}/named")
            assert r.stdout != b"200", extra
        assert echo.accepted == 0
        assert " TCP_DENIED/403 0 CONNECT localhost:" in p.log_line(f"CONNECT localhost:{echo.port}")
    finally:
        p.stop()
        echo.close()


def test_an_absolute_form_request_inside_a_tunnel_is_judged_by_its_url(env):
    """The origin takes an absolute-form target's authority over Host (RFC 9112 3.2.2): a request
    `GET https://denied/...` with an allowed Host is judged as the denied site."""
    proxy, _, tls_origin, _ = env
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as s:
        s.sendall(f"CONNECT 127.0.0.1:{tls_origin.port} HTTP/1.1\r\nHost: 127.0.0.1:{tls_origin.port}\r\n\r\n".encode())
        assert s.recv(4096).startswith(b"HTTP/1.1 200")
        with ctx.wrap_socket(s, server_hostname="ok.test") as t:
            t.sendall(f"GET https://www.blocked.test:{tls_origin.port}/absolute HTTP/1.1\r\nHost: ok.test\r\n"
                      f"Connection: close\r\n\r\n".encode())
            out = b""
            while chunk := t.recv(65536):
                out += chunk
    assert out.startswith(b"HTTP/1.1 403") and b"http_access deny blocked" in out, out[:300]
    assert "/absolute" not in tls_origin.hits


def test_a_socks5_request_naming_a_host_is_judged_by_that_name_with_tls_too(tmp_path, cert):
    """Once its ClientHello was allowed, a SOCKS5 connection to a named host carries requests judged by
    that name, not by their Host (rules that need the request, here its method, decide then)."""
    origin = Origin(tls=cert)
    policy = ("acls:\n  bad: dstdomain localhost\n  get: method GET\nhttp_access:\n  - deny bad get\n"
              "  - allow all\n")
    p = start(tmp_path, policy, ("socks5",), options={"ssl_insecure": True})
    try:
        r = curl("-k", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--socks5-hostname", f"127.0.0.1:{p.port}",
                 "-H", "Host: allowed.example", f"https://localhost:{origin.port}/tls-named")
        assert r.stdout == b"403"
        assert "/tls-named" not in origin.hits
    finally:
        p.stop()
        origin.close()


def test_reverse_mode_uses_the_same_rules_and_myportname(env):
    proxy, origin, *_ = env
    rev = f"http://127.0.0.1:{proxy.ports[2]}"
    assert curl(f"{rev}/rev-ok").stdout == b"hello /rev-ok"
    r = curl("-i", f"{rev}/admin/x")
    assert r.stdout.startswith(b"HTTP/1.1 403") and b"http_access deny rev admin" in r.stdout
    assert " TCP_DENIED/403 " in proxy.log_line("/admin/x")
    r = curl("-i", f"{rev}/secret/rev")
    assert r.stdout.startswith(b"HTTP/1.1 403")
    # the same path through the regular listener is not denied: myportname tells them apart
    assert curl("-x", proxy.url, f"{origin.url}/admin/y").stdout == b"hello /admin/y"


# --- authentication ------------------------------------------------------------------

@pytest.fixture(scope="module")
def auth_env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("acl_auth")
    write_htpasswd(tmp / "users.htpasswd", {"alice": "apw", "bob": "bpw"})
    origin, echo = Origin(), Echo()
    policy = """
acls:
  free: urlpath_regex ^/free
  users: proxy_auth REQUIRED
  admins: proxy_auth alice
  adminpath: urlpath_regex ^/admin
  site: myportname reverse
http_access:
  - allow free
  - allow site !adminpath
  - deny adminpath !admins
  - allow users
  - deny all
"""
    proxy = start(tmp, policy, ("regular", "socks5", f"reverse:http://127.0.0.1:{origin.port}"),
                  {"proxyauth": f"@{tmp / 'users.htpasswd'}"})
    yield proxy, origin, echo
    proxy.stop()
    origin.close()
    echo.close()


def test_no_credentials_needed_before_a_proxy_auth_acl(auth_env):
    proxy, origin, _ = auth_env
    assert curl("-x", proxy.url, f"{origin.url}/free/a").stdout == b"hello /free/a"


def test_proxy_auth_required_gives_407_then_allows_users(auth_env):
    proxy, origin, _ = auth_env
    r = curl("-i", "-x", proxy.url, f"{origin.url}/private")
    assert r.stdout.startswith(b"HTTP/1.1 407")
    assert b'Proxy-Authenticate: Basic realm="relais"' in r.stdout
    assert b"X-Squid-Error: ERR_CACHE_ACCESS_DENIED 0" in r.stdout
    assert " TCP_DENIED/407 " in proxy.log_line("/private")
    r = curl("-x", proxy.url, "-U", "bob:bpw", f"{origin.url}/private2")
    assert r.stdout == b"hello /private2"
    line = proxy.log_line("/private2")
    assert " TCP_MISS/200 " in line and " bob HIER_DIRECT/" in line
    r = curl("-i", "-x", proxy.url, "-U", "bob:wrong", f"{origin.url}/private3")
    assert r.stdout.startswith(b"HTTP/1.1 407")


def test_deny_decided_by_a_user_acl_asks_again_like_squid(auth_env):
    proxy, origin, _ = auth_env
    r = curl("-i", "-x", proxy.url, "-U", "bob:bpw", f"{origin.url}/admin/1")
    assert r.stdout.startswith(b"HTTP/1.1 407")
    line = proxy.log_line("/admin/1")
    assert " TCP_DENIED/407 " in line and " bob " in line
    assert curl("-x", proxy.url, "-U", "alice:apw", f"{origin.url}/admin/2").stdout == b"hello /admin/2"


def test_per_listener_authentication_through_the_policy(auth_env):
    """proxyauth is global in mitmproxy; with a policy, a reverse listener asks only where the rules say."""
    proxy, origin, _ = auth_env
    rev = f"http://127.0.0.1:{proxy.ports[2]}"
    assert curl(f"{rev}/public").stdout == b"hello /public"
    r = curl("-i", f"{rev}/admin/r")
    assert r.stdout.startswith(b"HTTP/1.1 401 Unauthorized\r\n") and b'WWW-Authenticate: Basic realm="relais"' in r.stdout
    assert " TCP_DENIED/401 " in proxy.log_line("/admin/r")
    assert curl("-u", "alice:apw", f"{rev}/admin/r2").stdout == b"hello /admin/r2"


def test_socks5_user_feeds_acls_and_log_of_raw_streams(auth_env):
    proxy, _, echo = auth_env
    s = socks5(proxy.ports[1], "127.0.0.1", echo.port, "bob", "bpw")
    s.sendall(b"ping\x00")
    s.settimeout(5)
    assert s.recv(100) == b"ping\x00"
    s.close()
    line = proxy.log_line(f"CONNECT 127.0.0.1:{echo.port}")
    assert " TCP_TUNNEL/200 " in line and " bob " in line
    rec = probes(proxy, lambda r: r["kind"] == "tcp" and r["url"] == f"127.0.0.1:{echo.port}")
    assert rec["user"] == "bob" and rec["acl"]["rule"] == "http_access allow users"


# --- operations: reload, bad files ----------------------------------------------------

GOOD = """
acls:
  blocked: urlpath_regex ^/{path}
http_access:
  - deny blocked
  - allow localhost
"""


def test_policy_file_is_watched_and_a_broken_edit_keeps_the_last_good_policy(tmp_path):
    origin = Origin()
    try:
        proxy = start(tmp_path, GOOD.format(path="one"), ("regular",), {"policy_watch": 0.2})
        policy = tmp_path / "policy.yaml"
        try:
            assert curl("-x", proxy.url, f"{origin.url}/two").stdout == b"hello /two"
            policy.write_text(GOOD.format(path="two"))
            end = time.monotonic() + 10
            while curl("-o", "/dev/null", "-w", "%{http_code}", "-x", proxy.url, f"{origin.url}/two").stdout != b"403":
                assert time.monotonic() < end, proxy.text()
                time.sleep(0.2)
            policy.write_text("acls:\n  blocked: urlpath_regex ^/one\nhttp_access:\n  - deny blocked\n  - allow nobody\n")
            end = time.monotonic() + 10
            while "last good policy" not in proxy.text():
                assert time.monotonic() < end, proxy.text()
                time.sleep(0.1)
            assert f"{policy}:5: http_access: unknown acl 'nobody'" in proxy.text()
            assert curl("-o", "/dev/null", "-w", "%{http_code}", "-x", proxy.url, f"{origin.url}/two").stdout == b"403"
            assert curl("-x", proxy.url, f"{origin.url}/one").stdout == b"hello /one"
        finally:
            proxy.stop()
    finally:
        origin.close()


def test_a_squid_conf_policy_follows_its_includes_and_watches_them(tmp_path):
    """Debian's squid.conf ends in `include /etc/squid/conf.d/*.conf`: access control and the cache
    read the included files (each its own directives), and an edit to one of them is applied live."""
    (tmp_path / "conf.d").mkdir()
    rules = tmp_path / "conf.d" / "local.conf"
    rules.write_text("acl blocked urlpath_regex ^/one\nacl nocache urlpath_regex ^/fresh\n"
                     "http_access deny blocked\ncache deny nocache\n")
    conf = tmp_path / "squid.conf"
    conf.write_text("http_port 3128\ninclude conf.d/*.conf\nhttp_access allow localhost\nhttp_access deny all\n")
    origin = Origin()
    origin.route("/fresh", lambda req: (200, {"Cache-Control": "max-age=600"}, b"fresh"))
    proxy = Proxy(tmp_path / "p", options={"policy": str(conf), "cache_policy": str(conf), "policy_watch": 0.2,
                                           "cache_dir": "none"})
    try:
        def code(path):
            return curl("-o", "/dev/null", "-w", "%{http_code}", "-x", proxy.url, f"{origin.url}{path}").stdout
        assert code("/one") == b"403" and code("/two") == b"200"
        assert " TCP_DENIED/403 " in proxy.log_line("/one")
        for _ in range(2):
            assert code("/fresh") == b"200"
        assert proxy.wait_lines("/fresh", 2)[1].split()[3] == "TCP_MISS/200"  # cache deny nocache
        text = rules.read_text().replace("^/one", "^/two").replace("cache deny", "cache allow")
        rules.write_text(text)
        end = time.monotonic() + 10
        while code("/two") != b"403":
            assert time.monotonic() < end, proxy.text()
            time.sleep(0.2)
        assert code("/one") == b"200"
        time.sleep(1.1)  # the cache looks at its policy files once a second, from a request
        for _ in range(3):
            assert code("/fresh") == b"200"
        assert proxy.wait_lines("/fresh", 5)[-1].split()[3] == "TCP_MEM_HIT/200", proxy.text()
    finally:
        proxy.stop()
        origin.close()


@pytest.mark.parametrize("text, expect", [
    ("acls:\n  a: src 10.0.0.0/8\n  b: port eighty\nhttp_access:\n  - allow a\n", ":3: acl b (port): bad port 'eighty'"),
    ("acls: {a: src 10.0.0.1\nhttp_access: []\n", ":2: YAML"),
])
def test_a_bad_policy_stops_the_proxy_at_start_up_with_file_line_reason(tmp_path, text, expect):
    (tmp_path / "bad.yaml").write_text(text)
    p = Proxy(tmp_path / "p", options={"policy": str(tmp_path / "bad.yaml")}, wait=False)
    try:
        assert p.proc.wait(20) != 0
    finally:
        p.stop()
    out = p.text()
    assert f"{tmp_path / 'bad.yaml'}{expect}" in out, out


def test_bad_option_values_are_refused(tmp_path):
    p = Proxy(tmp_path / "p", options={"policy_watch": -1}, wait=False)
    try:
        assert p.proc.wait(20) != 0
    finally:
        p.stop()
    assert "policy_watch: must be a number of seconds, 0 or more, not '-1'" in p.text()
    p = Proxy(tmp_path / "q", options={"policy": str(tmp_path / "missing.yaml")}, wait=False)
    try:
        assert p.proc.wait(20) != 0
    finally:
        p.stop()
    assert "missing.yaml: cannot read" in p.text()


def test_default_policy_is_found_from_any_folder_and_refuses_connect_to_high_ports(tmp_path, cert):
    tls_origin = Origin(tls=cert)
    try:
        p = Proxy(tmp_path / "p", options={"policy": "policies/default.yaml"})
        try:
            r = curl("-o", "/dev/null", "-w", "%{http_connect}", "-k", "-x", p.url,
                     f"https://127.0.0.1:{tls_origin.port}/")
            assert r.stdout == b"403"
            assert "policies/default.yaml" in p.text()
        finally:
            p.stop()
    finally:
        tls_origin.close()


@pytest.mark.parametrize("stream_large_bodies", ["64k", None])
def test_a_denied_request_gets_its_403_and_its_body_is_dropped(tmp_path, stream_large_bodies):
    """The body of a denied request is read and dropped, never held (the proxy's memory does not
    grow by it), then the 403 goes. With stream_large_bodies, mitmproxy decides to stream a large
    body before access control denies the request: mitmproxy 11 alone then answers nothing and
    the client waits; without it, mitmproxy alone holds the whole body in memory first."""
    origin = Origin()
    proxy = Proxy(tmp_path / "p", options={"stream_large_bodies": stream_large_bodies, "cache_dir": "none"})
    body = tmp_path / "body.bin"
    body.write_bytes(b"x" * (64 * 1024 * 1024))
    try:
        def post(url, *extra):
            return curl("-o", "/dev/null", "-w", "%{http_code}", "-x", proxy.url, "-H", "Expect:",
                        "--data-binary", f"@{body}", *extra, url, timeout=60).stdout
        before = peak_rss_mb(proxy.proc.pid)
        assert post("http://127.0.0.1:1/denied") == b"403"  # a port the policy refuses
        assert peak_rss_mb(proxy.proc.pid) - before < 32, "the denied body was held in memory"
        assert post("http://127.0.0.1:1/chunked", "-H", "Transfer-Encoding: chunked") == b"403"
        for what in ("/denied", "/chunked"):
            assert " TCP_DENIED/403 " in proxy.log_line(what)
        small = curl("-x", proxy.url, "-H", "Expect:", "--data-binary", "hello", f"{origin.url}/small")
        assert small.stdout == b"hello /small" and origin.requests[-1].body == b"hello"  # still serving
        assert post(f"{origin.url}/allowed") == b"200"  # an allowed upload goes through
        assert " TCP_MISS/200 " in proxy.log_line("/allowed")
        assert len(origin.requests[-1].body) == body.stat().st_size
    finally:
        proxy.stop()
        origin.close()


TAKE_BACK = """
from mitmproxy import http

def requestheaders(flow):
    if flow.request.path.startswith("/take-back"):
        flow.response = http.Response.make(299, b"answered")

def request(flow):
    if flow.request.path.startswith("/take-back"):
        flow.response = None  # (the body it would need to go on was dropped)
"""


def test_an_answer_taken_back_after_the_body_was_dropped_is_a_502_and_the_proxy_goes_on(tmp_path):
    script = tmp_path / "take_back.py"
    script.write_text(TAKE_BACK)
    body = tmp_path / "body.bin"
    body.write_bytes(b"x" * 200_000)
    origin = Origin()
    proxy = Proxy(tmp_path / "p", options={"stream_large_bodies": "64k", "cache_dir": "none"}, args=["-s", str(script)])
    try:
        r = curl("-o", "/dev/null", "-w", "%{http_code}", "-x", proxy.url, "-H", "Expect:",
                 "--data-binary", f"@{body}", f"{origin.url}/take-back")
        assert r.stdout == b"502" and not origin.requests
        assert curl("-x", proxy.url, f"{origin.url}/after").stdout == b"hello /after"
        assert "has crashed" not in proxy.text()
    finally:
        proxy.stop()
        origin.close()
