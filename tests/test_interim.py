"""1xx interim responses from an HTTP/1 origin (addons/interim.py), end to end.

A raw loopback origin sends interim heads before its final response, in the ways a real one
can (its own write, the same write as the final head, a head split over two writes); curl
shows every head it receives (-D -). Without the addon mitmproxy takes the first 1xx as the
final response (the first test checks that this is still what mitmproxy does alone, so the
addon is not dead code).
"""
from __future__ import annotations

import socket
import threading
import time

import pytest
from mitmproxy.test import taddons

from harness import Proxy, curl

FINAL = (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n"
         b"Cache-Control: max-age=3600\r\n\r\nfinal")
HINTS = b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\nX-Hint: only-here\r\nConnection: x-hop\r\nX-Hop: 1\r\n\r\n"


class RawOrigin:
    """Answers each request with `script[path]`: a list of byte strings, written with a short pause
    between; None closes the connection."""

    def __init__(self, script: dict[str, list[bytes]]):
        self.script = script
        self.hits: dict[str, int] = {}
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.running = True
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while self.running:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn):
        conn.settimeout(10)
        buf = b""
        with conn:
            while self.running:
                while b"\r\n\r\n" not in buf:
                    try:
                        data = conn.recv(65536)
                    except OSError:
                        return
                    if not data:
                        return
                    buf += data
                head, _, buf = buf.partition(b"\r\n\r\n")
                path = head.split(b" ")[1].decode().split("?")[0]
                self.hits[path] = self.hits.get(path, 0) + 1
                for i, part in enumerate(self.script[path]):
                    if i:
                        time.sleep(0.05)
                    if part is None:  # close the connection here
                        return
                    conn.sendall(part)

    def close(self):
        self.running = False
        self.sock.close()


@pytest.fixture
def origin():
    o = RawOrigin({
        "/hints": [HINTS, FINAL],
        "/together": [b"HTTP/1.1 102 Processing\r\n\r\n" + HINTS + FINAL],
        "/split": [HINTS[:20], HINTS[20:], FINAL],
        "/continue": [b"HTTP/1.1 100 Continue\r\n\r\n", FINAL],
        "/hints-then-close": [HINTS, None],
        "/blank-line": [HINTS + b"\r\n" + FINAL],
        "/bad": [b"HTTP/1.1 103 Early Hints\r\nno colon here\r\n\r\n", FINAL],
    })
    yield o
    o.close()


def heads(output: bytes) -> list[str]:
    """The status lines curl -D - wrote, in order."""
    return [line.decode().strip() for line in output.split(b"\r\n") if line.startswith(b"HTTP/")]


def get(proxy, url, *args):
    r = curl("-D", "-", "-x", proxy.url, *args, url)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_mitmproxy_alone_takes_the_interim_response_as_final(tmp_path, origin):
    p = Proxy(tmp_path, script=None)
    try:
        r = curl("-D", "-", "-x", p.url, origin.url + "/hints", timeout=3)
        assert heads(r.stdout)[:1] == ["HTTP/1.1 103 Early Hints"]
        assert b"final" not in r.stdout  # the real response never arrived
    finally:
        p.stop()


def test_interim_relayed_then_the_final_response_is_cached_without_it(tmp_path, origin):
    p = Proxy(tmp_path, options={"cache_dir": str(tmp_path / "cache")})
    try:
        out = get(p, origin.url + "/hints")
        assert heads(out) == ["HTTP/1.1 103 Early Hints", "HTTP/1.1 200 OK"]
        interim, _, final = out.partition(b"HTTP/1.1 200 OK")
        assert b"Link: </style.css>; rel=preload" in interim
        assert b"x-hop" not in interim.lower() and b"connection:" not in interim.lower()  # hop-by-hop
        assert final.endswith(b"final") and b"X-Hint" not in final

        again = get(p, origin.url + "/hints")  # from the cache: no interim, no interim header
        assert heads(again) == ["HTTP/1.1 200 OK"]
        assert again.endswith(b"final") and b"X-Hint" not in again
        assert origin.hits["/hints"] == 1
        codes = [line.split()[3] for line in p.wait_lines("/hints", 2)]
        assert codes == ["TCP_MISS/200", "TCP_MEM_HIT/200"]
    finally:
        p.stop()


@pytest.mark.parametrize("path, expected", [
    ("/together", ["HTTP/1.1 102 Processing", "HTTP/1.1 103 Early Hints", "HTTP/1.1 200 OK"]),
    ("/split", ["HTTP/1.1 103 Early Hints", "HTTP/1.1 200 OK"]),
    ("/continue", ["HTTP/1.1 200 OK"]),  # mitmproxy answers Expect itself: the origin's 100 is not passed on
    ("/blank-line", ["HTTP/1.1 103 Early Hints", "HTTP/1.1 200 OK"]),  # a stray empty line after the 1xx
])
def test_interim_heads_however_they_arrive(tmp_path, origin, path, expected):
    p = Proxy(tmp_path, script="addons/interim.py")
    try:
        out = get(p, origin.url + path)
        assert heads(out) == expected
        assert out.endswith(b"final")
    finally:
        p.stop()


def test_no_interim_to_an_http10_client_nor_when_relaying_is_off(start_proxy, origin):
    p = start_proxy(script="addons/interim.py")  # both stopped after the test, even if the second fails to start
    q = start_proxy(script="addons/interim.py", options={"relay_interim": False})
    out = get(p, origin.url + "/hints", "--http1.0")
    assert heads(out) == ["HTTP/1.1 200 OK"] and out.endswith(b"final")
    out = get(q, origin.url + "/hints")
    assert heads(out) == ["HTTP/1.1 200 OK"] and out.endswith(b"final")


def test_a_malformed_interim_head_is_a_bad_gateway(tmp_path, origin):
    p = Proxy(tmp_path, script="addons/interim.py")
    try:
        r = curl("-D", "-", "-x", p.url, origin.url + "/bad")
        assert heads(r.stdout) == ["HTTP/1.1 502 Bad Gateway"]
        assert b"Cannot parse HTTP response" in r.stdout
        assert "Traceback" not in p.text()  # the addon's own parse failure is mitmproxy's 502, not a crash
    finally:
        p.stop()


def test_an_origin_failing_after_an_interim_response_gets_the_client_an_error_page(tmp_path, origin):
    p = Proxy(tmp_path, script="addons/interim.py")
    try:
        r = curl("-D", "-", "-x", p.url, origin.url + "/hints-then-close")
        assert heads(r.stdout) == ["HTTP/1.1 103 Early Hints", "HTTP/1.1 502 Bad Gateway"]
    finally:
        p.stop()


def test_interim_relayed_to_an_http2_client(tmp_path, origin):
    p = Proxy(tmp_path, modes=(f"reverse:{origin.url}",), script="addons/interim.py")  # TLS with mitmproxy's CA
    try:
        r = curl("-D", "-", "--http2", "-k", f"https://127.0.0.1:{p.port}/hints")
        assert r.returncode == 0, r.stderr
        assert heads(r.stdout) == ["HTTP/2 103", "HTTP/2 200"]
        assert b"link: </style.css>; rel=preload" in r.stdout.lower()
        assert r.stdout.endswith(b"final")
    finally:
        p.stop()


def test_unloading_keeps_live_connections_working():
    """A live HTTP/1 connection holds the patched read_headers as its bound state: after the addon
    is unloaded (a script reload, the proxy's exit), that state must still reach mitmproxy's method."""
    from addons import interim
    from mitmproxy.proxy import context, events
    from mitmproxy.proxy.layers.http import _http1
    from mitmproxy.test import tflow
    # mitmproxy's method, even if an earlier test loaded the addon without unloading it (test_readme)
    original = interim.Interim.originals.get((_http1.Http1Client, "read_headers"), _http1.Http1Client.read_headers)
    addon = interim.Interim()
    with taddons.context(addon) as tctx:
        ctx = context.Context(tflow.tclient_conn(), tctx.options)
        ctx.server = tflow.tserver_conn()
        layer = _http1.Http1Client(ctx)
        state = layer.read_headers  # bound now, as mitmproxy binds it when the connection starts
        assert state.__func__ is interim.read_headers
        addon.done()
    assert _http1.Http1Client.read_headers is original  # restored for new connections
    assert list(state(events.ConnectionClosed(ctx.server))) == []  # the old binding still works


def test_an_http2_origins_interim_response_reaches_an_http2_client(tmp_path, cert):
    from harness import H2Origin
    o = H2Origin(cert)
    p = Proxy(tmp_path, script="addons/interim.py")
    try:
        r = curl("-D", "-", "--http2", "--cacert", p.ca, "-x", p.url, f"{o.url}/hints")
        assert r.returncode == 0, r.stderr
        assert heads(r.stdout) == ["HTTP/1.1 200 Connection established", "HTTP/2 103", "HTTP/2 200"]
        assert b"link: </s.css>; rel=preload" in r.stdout.lower()
        assert r.stdout.endswith(b"h2 hello /hints")
        r = curl("-D", "-", "--http2", "--cacert", p.ca, "-x", p.url, f"{o.url}/switch")  # 101: not in HTTP/2
        assert r.returncode == 0 and heads(r.stdout)[1:] == ["HTTP/2 200"], (r.stdout, r.stderr)
    finally:
        p.stop()
        o.sock.close()


def test_an_http2_origins_interim_response_reaches_an_http11_client(tmp_path, cert):
    """The client's ALPN list puts http/1.1 first and the origin, connected later (lazily), picks h2."""
    import socket
    import ssl
    from harness import H2Origin
    o = H2Origin(cert)
    p = Proxy(tmp_path, script="addons/interim.py", options={"connection_strategy": "lazy"})
    try:
        with socket.create_connection(("127.0.0.1", p.port), timeout=10) as raw:
            raw.sendall(f"CONNECT 127.0.0.1:{o.port} HTTP/1.1\r\nHost: 127.0.0.1:{o.port}\r\n\r\n".encode())
            assert raw.recv(4096).startswith(b"HTTP/1.1 200")
            tls = ssl.create_default_context(cafile=p.ca)
            tls.set_alpn_protocols(["http/1.1", "h2"])
            with tls.wrap_socket(raw, server_hostname="127.0.0.1") as s:
                assert s.selected_alpn_protocol() == "http/1.1"
                s.sendall(b"GET /hints HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
                answer = b""
                while chunk := s.recv(65536):
                    answer += chunk
        assert heads(answer) == ["HTTP/1.1 103 Early Hints", "HTTP/1.1 200 OK"], answer
        assert answer.endswith(b"h2 hello /hints")
        assert any(dict(r).get(":path") == "/hints" for r in o.requests)  # it did reach the origin over HTTP/2
    finally:
        p.stop()
        o.sock.close()
