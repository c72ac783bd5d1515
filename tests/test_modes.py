"""The four proxy modes, end to end: real mitmdump, real origins, real clients.

Each test checks what the client received and the access-log line.
"""
from __future__ import annotations

import re
import time

import httpx
import pytest

from harness import curl, scripted_server

LINE = re.compile(r"^\d{10}\.\d{3} +\d+ (\S+) (\S+)/(\d{3}) (\d+) (\S+) (\S+) (\S+) (\S+)/(\S+) (\S+)$")


def fields(line: str) -> dict:
    m = LINE.match(line)
    assert m, f"not a Squid native line: {line!r}"
    keys = ("client", "code", "status", "bytes", "method", "url", "user", "hier", "peer", "mime")
    return dict(zip(keys, m.groups()))


def find(proxy, **want) -> dict:
    """The first access-log line with these fields, waiting up to 10 s for it."""
    end = time.monotonic() + 10
    while True:
        lines = proxy.log_lines(0, timeout=0)
        for line in lines:
            f = fields(line)
            if all(f[k] == v for k, v in want.items()):
                return f
        if time.monotonic() > end:
            raise AssertionError(f"no line with {want} in:\n" + "\n".join(lines))
        time.sleep(0.05)


# --- regular ------------------------------------------------------------------

def test_regular_plain_http(proxy, origin):
    r = curl("-x", proxy.url, f"{origin.url}/size/1000")
    assert r.returncode == 0 and r.stdout == b"x" * 1000
    f = find(proxy, url=f"{origin.url}/size/1000")
    assert (f["client"], f["code"], f["status"], f["method"]) == ("127.0.0.1", "TCP_MISS", "200", "GET")
    assert (f["hier"], f["peer"], f["mime"]) == ("HIER_DIRECT", "127.0.0.1", "application/octet-stream")
    assert int(f["bytes"]) > 1000  # body plus headers


def test_regular_https_connect_is_intercepted(start_proxy, tls_origin):
    proxy = start_proxy()
    url = f"https://localhost:{tls_origin.port}/secret"
    r = curl("--cacert", proxy.ca, "-x", proxy.url, url)
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"hello /secret"
    # The decrypted request is logged with its https URL; the origin saw the plain request.
    find(proxy, code="TCP_MISS", status="200", method="GET", url=url, hier="HIER_DIRECT")
    find(proxy, method="CONNECT", url=f"localhost:{tls_origin.port}", status="200")
    assert tls_origin.hits["/secret"] == 1


def test_several_modes_in_one_process(start_proxy, origin):
    proxy = start_proxy(modes=("regular", "socks5"))
    http_port, socks_port = proxy.ports
    a = curl("-x", f"http://127.0.0.1:{http_port}", f"{origin.url}/via-http")
    b = curl("--socks5-hostname", f"127.0.0.1:{socks_port}", f"{origin.url}/via-socks")
    assert a.stdout == b"hello /via-http" and b.stdout == b"hello /via-socks"
    find(proxy, url=f"{origin.url}/via-http", code="TCP_MISS")
    find(proxy, url=f"{origin.url}/via-socks", code="TCP_MISS")


# --- socks5 ---------------------------------------------------------------------

def test_socks5_http_and_https(start_proxy, origin, tls_origin):
    proxy = start_proxy(modes=("socks5",))
    socks = f"127.0.0.1:{proxy.port}"
    assert curl("--socks5-hostname", socks, f"{origin.url}/s").stdout == b"hello /s"
    url = f"https://localhost:{tls_origin.port}/st"
    r = curl("--socks5-hostname", socks, "--cacert", proxy.ca, url)
    assert r.stdout == b"hello /st", r.stderr
    find(proxy, url=f"{origin.url}/s", code="TCP_MISS", status="200")
    find(proxy, url=url, code="TCP_MISS", status="200")


def test_socks5_with_username_and_password(start_proxy, origin):
    proxy = start_proxy(modes=("socks5",), options={"proxyauth": "alice:secret"})
    ok = curl("-x", f"socks5h://alice:secret@127.0.0.1:{proxy.port}", f"{origin.url}/auth")
    assert ok.stdout == b"hello /auth", ok.stderr
    bad = curl("-x", f"socks5h://alice:wrong@127.0.0.1:{proxy.port}", f"{origin.url}/auth")
    assert bad.returncode != 0 and bad.stdout == b""
    none = curl("--socks5-hostname", f"127.0.0.1:{proxy.port}", f"{origin.url}/auth")
    assert none.returncode != 0
    assert origin.hits["/auth"] == 1
    f = find(proxy, url=f"{origin.url}/auth")
    assert f["user"] == "alice"
    # the refused login is logged, as HTTP's 407 is (it makes no flow)
    line = proxy.log_line("error:socks5-authentication")
    assert " TCP_DENIED/407 0 - error:socks5-authentication alice " in line, line


def test_socks5_httpx_client(start_proxy, origin):
    proxy = start_proxy(modes=("socks5",))
    with httpx.Client(proxy=f"socks5://127.0.0.1:{proxy.port}", timeout=10) as client:
        r = client.get(f"{origin.url}/httpx")
    assert r.status_code == 200 and r.text == "hello /httpx"


# --- reverse ----------------------------------------------------------------------

def test_reverse_to_http_origin(start_proxy, origin):
    proxy = start_proxy(modes=(f"reverse:{origin.url}",))
    r = curl(f"http://127.0.0.1:{proxy.port}/r?q=1")
    assert r.stdout == b"hello /r"
    f = find(proxy, code="TCP_MISS")
    assert f["url"] == f"http://127.0.0.1:{origin.port}/r?"  # the origin's URL, query stripped
    assert (f["hier"], f["peer"]) == ("HIER_DIRECT", "127.0.0.1")


@pytest.mark.parametrize("upstream", ["http", "https"])
def test_reverse_with_tls_from_client(start_proxy, origin, tls_origin, upstream):
    target = origin if upstream == "http" else tls_origin
    proxy = start_proxy(modes=(f"reverse:{target.url}",))
    r = curl("--cacert", proxy.ca, f"https://localhost:{proxy.port}/tls")
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"hello /tls"
    assert target.hits["/tls"] == 1
    find(proxy, code="TCP_MISS", status="200", method="GET")


# --- failures ---------------------------------------------------------------------

def test_refused_origin_gets_squid_503(proxy, refused_port):
    port = refused_port
    r = curl("-D", "-", "-o", "/dev/null", "-x", proxy.url, f"http://127.0.0.1:{port}/nothing")
    assert b"503" in r.stdout.split(b"\r\n")[0]
    assert b"X-Squid-Error: ERR_CONNECT_FAIL 111" in r.stdout
    f = find(proxy, url=f"http://127.0.0.1:{port}/nothing")
    assert (f["code"], f["status"], f["hier"], f["peer"], f["mime"]) == (
        "TCP_MISS", "503", "HIER_DIRECT", "127.0.0.1", "text/html")


def test_a_request_for_the_proxy_itself_is_a_forwarding_loop_denied_as_squid_does(start_proxy):
    proxy = start_proxy()
    # mitmproxy refuses to connect to its own listener with a 502 of its own, logged as an abort;
    # Squid answers a forwarding loop with 403 ERR_ACCESS_DENIED
    # (also as other spellings of the same address, which mitmproxy's own check misses: the request
    # came back through the proxy and waited behind its own cache miss until the client gave up)
    for host in ("127.0.0.1", "localhost", "LOCALHOST", "localhost.", "[::ffff:127.0.0.1]"):
        url = f"http://{host}:{proxy.port}/loop"
        r = curl("-D", "-", "-o", "/dev/null", "-x", proxy.url, url)
        assert b" 403 " in r.stdout.split(b"\r\n")[0] and b"X-Squid-Error: ERR_ACCESS_DENIED" in r.stdout, r.stdout
        f = find(proxy, url=url)
        assert (f["code"], f["status"], f["hier"]) == ("TCP_MISS", "403", "HIER_NONE")
    assert "forwarding loop" in proxy.text()
    # nothing else reached the log (a probe of the proxy by itself, an inner hop) but the line of the
    # harness's own check that the proxy listens: a connection without a request
    others = [line for line in proxy.log_lines(2) if "/loop" not in line]
    assert len(others) == 1 and "NONE_NONE/000 0 - error:transaction-end-before-headers" in others[0], others


def test_unresolvable_host_gets_dns_error(proxy):
    r = curl("-D", "-", "-o", "/dev/null", "-x", proxy.url, "http://nosuchhost.invalid/")
    assert b"X-Squid-Error: ERR_DNS_FAIL" in r.stdout
    f = find(proxy, url="http://nosuchhost.invalid/")
    assert (f["code"], f["status"], f["hier"], f["peer"]) == ("TCP_MISS", "503", "HIER_NONE", "-")


def test_reverse_proxy_answers_squid_503_when_the_backend_is_down(start_proxy, refused_port):
    dead = refused_port
    proxy = start_proxy(modes=(f"reverse:http://127.0.0.1:{dead}",))
    r = curl("-D", "-", "-o", "/dev/null", f"http://127.0.0.1:{proxy.port}/down")
    assert r.returncode == 0, r.stderr  # an answer, not a dropped connection
    assert b" 503 " in r.stdout.split(b"\r\n")[0] and b"X-Squid-Error: ERR_CONNECT_FAIL" in r.stdout
    f = find(proxy, code="TCP_MISS", status="503")
    assert f["url"] == f"http://127.0.0.1:{dead}/down"


def test_a_backend_that_dies_while_trusted_gets_squids_503_not_mitmproxys_502(start_proxy, held_ports):
    """Within connect_check_ttl the backend is not checked: mitmproxy's own connection fails, and the
    errors addon answers in the error hook (recover.py) with the page it answers a failed check with."""
    from harness import Origin
    origin = Origin()
    proxy = start_proxy(modes=(f"reverse:{origin.url}",), options={"connect_check_ttl": 30, "cache_dir": "none"})
    assert curl(f"http://127.0.0.1:{proxy.port}/alive").stdout == b"hello /alive"
    origin.close()
    held_ports(origin.port)
    # the second is answered by the cache's negative caching of that failure (negative_ttl)
    for path, code in (("/trusted", "TCP_MISS/503"), ("/again", "TCP_NEGATIVE_HIT/503")):
        r = curl("-D", "-", "-o", "/dev/null", f"http://127.0.0.1:{proxy.port}{path}")
        assert b" 503 " in r.stdout.split(b"\r\n")[0] and b"X-Squid-Error: ERR_CONNECT_FAIL" in r.stdout, r.stdout
        assert f" {code} " in proxy.log_line(path)


@pytest.mark.parametrize("message, page, errno", [
    ("[Errno 111] Connect call failed ('127.0.0.1', 9)", "ERR_CONNECT_FAIL", 111),
    ("[Errno -2] Name or service not known", "ERR_DNS_FAIL", 0),
    ("Connection timed out", "ERR_CONNECT_FAIL", 0)])
def test_squids_page_for_mitmproxys_own_connection_failure(message, page, errno):
    from addons.errors import _connect_failure
    f = _connect_failure(message)
    assert (f.page, f.errno, str(f)) == (page, errno, message)


@pytest.mark.parametrize("message, page", [
    ("server closed connection", "ERR_ZERO_SIZE_OBJECT"),  # mitmproxy's words for a close and for a reset
    ("Cannot parse HTTP response: Bad HTTP response line: b'x'", "ERR_INVALID_RESP"),
    ("unexpected server response: b'hello'", "ERR_INVALID_RESP"),
    ("unexpected server response: b'server closed connection'", "ERR_INVALID_RESP"),  # the origin's bytes
    ("something else", "ERR_READ_ERROR")])
def test_squids_page_for_an_origin_that_answered_nothing_usable(message, page):
    from addons.errors import _read_failure
    f = _read_failure(message, ("127.0.0.1", 80))
    assert (f.page, str(f), f.address) == (page, message, "127.0.0.1")


@pytest.mark.parametrize("message, page", [  # mitmproxy's words, 11.0.2 and 12.3.1 (proxy/tunnel.py, layers/http/_upstream_proxy.py)
    ("server closed connection", "ERR_ZERO_SIZE_OBJECT"),
    ("connection closed", "ERR_ZERO_SIZE_OBJECT"),  # during the CONNECT to the parent
    ("Cannot parse HTTP response: Bad HTTP response line: b'x'", "ERR_INVALID_RESP"),
    ("Error connecting to 10.0.0.1:3128: Bad HTTP response line: b'x'", "ERR_INVALID_RESP"),  # its CONNECT answer
    ("[Errno 111] Connect call failed ('10.0.0.1', 3128)", "ERR_CANNOT_FORWARD"),
    ("[Errno -2] Name or service not known", "ERR_CANNOT_FORWARD"),
    ("Certificate verify failed: unable to get local issuer certificate", "ERR_CANNOT_FORWARD"),
    ("Upstream proxy 10.0.0.1:3128 refused HTTP CONNECT request: 403 Forbidden", None)])
def test_squids_page_for_a_parent_proxy_that_failed(message, page):
    from addons.errors import _parent_failure
    f = _parent_failure(message, ("10.0.0.1", 3128))
    assert (f and f.page) == page
    if page == "ERR_CANNOT_FORWARD":  # no answer from it: not logged as forwarded there
        assert f.address is None and str(f) == f"upstream proxy 10.0.0.1:3128: {message}"
    elif page:
        assert f.address == "10.0.0.1" and str(f) == message


@pytest.mark.parametrize("check_ttl", [0, 30], ids=["checked", "trusted"])
def test_reverse_proxy_serves_stale_when_the_backend_dies(start_proxy, tmp_path, check_ttl, held_ports):
    """With connect_check_ttl 30 the backend was checked less than that ago when it died: mitmproxy's own
    connection fails, and the cache answers in the error hook (recover.py) instead of mitmproxy's 502."""
    from harness import Origin
    origin = Origin()
    origin.route("/page", lambda s: (200, {"Content-Type": "text/plain",
                                          "Cache-Control": "max-age=1, stale-if-error=600"}, b"kept"))
    proxy = start_proxy(modes=(f"reverse:{origin.url}",),
                        options={"cache_dir": str(tmp_path / "cache"), "connect_check_ttl": check_ttl})
    assert curl(f"http://127.0.0.1:{proxy.port}/page").stdout == b"kept"
    origin.close()
    held_ports(origin.port)
    time.sleep(1.5)  # now stale, and the backend is gone
    for _ in range(2):
        r = curl("-i", f"http://127.0.0.1:{proxy.port}/page")
        assert r.stdout.startswith(b"HTTP/1.1 200") and r.stdout.endswith(b"kept"), r.stdout
    assert [line.split()[3] for line in proxy.wait_lines("/page", 3)] == \
        ["TCP_MISS/200"] + ["TCP_REFRESH_FAIL_OLD/200"] * 2
    # the failure marked the backend for a new check (errors.py): an uncached page gets Squid's 503
    r = curl("-D", "-", "-o", "/dev/null", f"http://127.0.0.1:{proxy.port}/other")
    assert b" 503 " in r.stdout.split(b"\r\n")[0] and b"ERR_CONNECT_FAIL" in r.stdout, r.stdout


def test_socks5_requests_are_cached(start_proxy, origin, tmp_path):
    proxy = start_proxy(modes=("socks5",), options={"cache_dir": str(tmp_path / "cache")})
    url = f"{origin.url}/socks-cached?h.Cache-Control=max-age%3D60"
    for _ in range(2):
        assert curl("--socks5-hostname", f"127.0.0.1:{proxy.port}", url).stdout == b"hello /socks-cached"
    assert origin.hits["/socks-cached"] == 1
    find(proxy, code="TCP_MEM_HIT", status="200", hier="HIER_NONE")


def test_upstream_mode_logs_the_parent_and_answers_squids_503_when_it_is_down(start_proxy, origin):
    """FIRSTUP_PARENT as Squid logs it. A parent that went down gets Squid's 503 ERR_CANNOT_FORWARD (the first
    request from mitmproxy's failed connection, through addons/recover.py, not mitmproxy's 502), on a client
    connection kept alive across its fall too; then it is checked on each request until it answers again.
    Nothing is remembered against the origins meanwhile: they were never asked."""
    parent = start_proxy(script=None)  # a plain mitmdump as the parent proxy
    port = parent.port
    p = start_proxy(modes=(f"upstream:http://127.0.0.1:{port}",))
    with httpx.Client(proxy=p.url, timeout=10) as client:  # one client connection, kept alive throughout
        assert client.get(f"{origin.url}/via-parent").text == "hello /via-parent"
        f = find(p, url=f"{origin.url}/via-parent")
        assert (f["code"], f["status"], f["hier"], f["peer"]) == ("TCP_MISS", "200", "FIRSTUP_PARENT", "127.0.0.1")
        parent.stop()
        for _ in range(2):  # mitmproxy's own connection fails, then the errors addon's check
            r = client.get(f"{origin.url}/parent-down")
            assert r.status_code == 503 and r.headers["X-Squid-Error"].startswith("ERR_CANNOT_FORWARD"), r.text[:300]
            assert f"upstream proxy 127.0.0.1:{port}" in r.text
    lines = [fields(l) for l in p.wait_lines("/parent-down", 2)]
    assert [(f["code"], f["status"], f["hier"]) for f in lines] == [("TCP_MISS", "503", "HIER_NONE")] * 2
    start_proxy(script=None, ports=[port])  # back
    assert curl("-x", p.url, f"{origin.url}/parent-down").stdout == b"hello /parent-down"


@pytest.mark.parametrize("through", ["direct", "parent"])
def test_an_origin_whose_certificate_is_refused_gets_squids_secure_connect_fail(start_proxy, tls_origin, origin,
                                                                                 through):
    """Squid's 503 ERR_SECURE_CONNECT_FAIL, not a read error; through a parent reached in plain HTTP the
    TLS that failed is the origin's, inside the parent's tunnel: the parent is not blamed (ERR_CANNOT_FORWARD)."""
    options = {"ssl_insecure": "false", "cache_dir": "none"}  # the test origin's certificate is self-signed
    if through == "parent":
        parent = start_proxy(script=None, options={"ignore_hosts": f"127\\.0\\.0\\.1:{tls_origin.port}"})
        p = start_proxy(modes=(f"upstream:http://127.0.0.1:{parent.port}",), options=options)
    else:
        p = start_proxy(options=options)
    r = curl("-k", "-i", "--http1.1", "-x", p.url, f"{tls_origin.url}/untrusted")
    head = r.stdout.split(b"\r\n\r\n", 1)[1]  # after the proxy's answer to curl's CONNECT
    assert head.startswith(b"HTTP/1.1 503") and b"X-Squid-Error: ERR_SECURE_CONNECT_FAIL" in head, r.stdout[:400]
    assert b"self-signed certificate" in head and b"upstream proxy" not in head and b"\r\nDate: " in head
    f = find(p, url=f"{tls_origin.url}/untrusted")
    hier = "FIRSTUP_PARENT" if through == "parent" else "HIER_DIRECT"
    assert (f["code"], f["status"], f["hier"], f["peer"]) == ("TCP_MISS", "503", hier, "127.0.0.1")
    # the connection works otherwise: plain HTTP goes through at once (the parent was not marked down)
    assert curl("-x", p.url, f"{origin.url}/after").stdout == b"hello /after"


@pytest.mark.parametrize("reply,page", [(b"", "ERR_ZERO_SIZE_OBJECT"), (b"garbage, not HTTP\r\n\r\n", "ERR_INVALID_RESP"),
                                        (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\ncut short", "ERR_READ_ERROR")],
                         ids=["closed", "garbage", "cut"])
def test_a_parent_that_answers_nothing_usable_gets_squids_502(start_proxy, origin, reply, page):
    """A parent proxy that takes the request and then closes the connection, answers what is not
    HTTP, or cuts its answer short: Squid's 502 page, logged as forwarded to that parent, and the
    client's connection stays."""
    # the first request gets `reply`, the next one a real answer
    with scripted_server(reply, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok") as port:
        p = start_proxy(modes=(f"upstream:http://127.0.0.1:{port}",))
        r = curl("-v", "-i", "-x", p.url, f"{origin.url}/bad-parent", f"{origin.url}/bad-parent-2")
    assert r.stdout.startswith(b"HTTP/1.1 502") and f"X-Squid-Error: {page}".encode() in r.stdout, r.stdout[:300]
    assert r.stdout.endswith(b"ok") and b"Re-using existing connection" in r.stderr  # the next request, on it
    f = find(p, url=f"{origin.url}/bad-parent")
    assert (f["code"], f["status"], f["hier"], f["peer"]) == ("TCP_MISS", "502", "FIRSTUP_PARENT", "127.0.0.1")


@pytest.mark.parametrize("reply,page", [(b"", "ERR_ZERO_SIZE_OBJECT"), (b"garbage, not HTTP\r\n\r\n", "ERR_INVALID_RESP"),
                                        (b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n", None)],
                         ids=["closed", "garbage", "refused"])
def test_a_parent_that_fails_the_connect_of_intercepted_https(start_proxy, tls_origin, reply, page):
    """Intercepted HTTPS goes through the parent in a CONNECT tunnel: a parent that closes the
    connection, or answers the CONNECT with what is not HTTP, gets the same 502 pages; one that
    refuses the CONNECT gets mitmproxy's 502, which names the parent's answer."""
    with scripted_server(reply, reply) as port:  # (eagerly, mitmproxy opens a tunnel at the client's CONNECT too)
        p = start_proxy(modes=(f"upstream:http://127.0.0.1:{port}",))
        r = curl("-k", "-i", "--http1.1", "-x", p.url, f"{tls_origin.url}/bad-tunnel")
    head = r.stdout.split(b"\r\n\r\n", 1)[1]  # after the proxy's answer to curl's CONNECT
    assert head.startswith(b"HTTP/1.1 502"), r.stdout[:300]
    if page:
        assert f"X-Squid-Error: {page}".encode() in head, head[:300]
        f = find(p, url=f"{tls_origin.url}/bad-tunnel")
        assert (f["code"], f["status"], f["hier"], f["peer"]) == ("TCP_MISS", "502", "FIRSTUP_PARENT", "127.0.0.1")
    else:
        assert b"X-Squid-Error" not in head and b"refused HTTP CONNECT request: 403 Forbidden" in head


@pytest.mark.parametrize("target", ["127.0.0.1:{closed}", "nosuchhost.invalid:80"], ids=["refused", "dns"])
def test_a_socks5_connection_that_fails_before_any_flow_is_logged(start_proxy, refused_port, target):
    """Eagerly (the default), mitmproxy connects when the SOCKS handshake asks, before any flow: a failure
    made no flow and no log line."""
    target = target.format(closed=refused_port)
    proxy = start_proxy(modes=("socks5",))
    r = curl("--socks5-hostname", f"127.0.0.1:{proxy.port}", f"http://{target}/x")
    assert r.returncode != 0
    f = find(proxy, url=target)
    assert (f["code"], f["status"], f["method"], f["hier"]) == ("NONE_NONE", "503", "CONNECT", "HIER_NONE")
    time.sleep(0.5)
    assert len([l for l in proxy.log_lines(0, timeout=0) if target in l]) == 1


def test_a_tunnel_through_a_parent_proxy_that_is_down_is_not_logged_as_forwarded(start_proxy, tls_origin,
                                                                                  refused_port):
    p = start_proxy(modes=(f"upstream:http://127.0.0.1:{refused_port}",), options={"ignore_hosts": "127.0.0.1"})
    r = curl("-k", "-x", p.url, f"{tls_origin.url}/t")
    assert r.returncode != 0
    f = find(p, method="CONNECT")
    assert (f["hier"], f["peer"]) == ("HIER_NONE", "-"), f
