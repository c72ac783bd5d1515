"""Hop-by-hop fields and Max-Forwards (addons/hops.py): the rules alone, then through addons/all.py
with a real origin and real clients."""
from __future__ import annotations

import json
import socket

import pytest
from mitmproxy import http
from mitmproxy.test import tflow

from addons import hops, meta
from harness import curl, scripted_server


def headers(*fields: tuple[str, str]) -> http.Headers:
    return http.Headers([(k.encode(), v.encode()) for k, v in fields])


# --- the rules ----------------------------------------------------------------------------------------

def test_named_fields_and_keep_alive_go_and_connection_keeps_what_mitmproxy_reads():
    h = headers(("Connection", "keep-alive, X-Hop"), ("connection", "X-Other , close"), ("X-Hop", "secret"),
                ("X-Other", "1"), ("Keep-Alive", "timeout=5"), ("X-End", "kept"))
    assert sorted(hops.strip_hop_fields(h)) == ["keep-alive", "x-hop", "x-other"]
    assert h.fields == ((b"Connection", b"keep-alive, close"), (b"X-End", b"kept"))


def test_framing_and_routing_fields_stay_whoever_names_them():
    h = headers(("Connection", "Content-Length, Transfer-Encoding, Host, Upgrade"), ("Host", "a"),
                ("Content-Length", "3"), ("Upgrade", "websocket"))
    assert hops.strip_hop_fields(h) == []
    assert h.get("content-length") == "3" and h.get("host") == "a" and h.get("upgrade") == "websocket"
    assert h["connection"] == "Upgrade"  # the only option mitmproxy acts on; the others named no hop field


def test_a_connection_left_naming_nothing_mitmproxy_reads_goes():
    h = headers(("Connection", "X-Hop"), ("X-Hop", "1"), ("X-End", "kept"))
    assert hops.strip_hop_fields(h) == ["x-hop"] and h.fields == ((b"X-End", b"kept"),)


def test_connection_naming_only_options_is_left_as_it_is():
    h = headers(("Connection", "Upgrade"), ("Upgrade", "websocket"))
    assert hops.strip_hop_fields(h) == [] and h.fields == ((b"Connection", b"Upgrade"), (b"Upgrade", b"websocket"))


@pytest.mark.parametrize("value,parsed", [("0", 0), (" 3 ", 3), ("-1", None), ("x", None), ("", None),
                                          ("\u00b2", None), ("9" * 5000, None)])
def test_max_forwards_is_read_only_when_it_is_a_number(value, parsed):
    assert hops.max_forwards(headers(("Max-Forwards", value))) == parsed


def test_a_trace_echo_leaves_out_credentials_and_cookies():
    f = tflow.tflow()
    f.request.method = "TRACE"
    f.request.headers["Authorization"] = "Basic c2VjcmV0"
    f.request.headers["Cookie"] = "id=1"
    f.request.headers["X-Seen"] = "yes"
    body = hops.trace_body(f.request, absolute=False).decode()
    assert body.startswith("TRACE ") and "X-Seen: yes\r\n" in body and body.endswith("\r\n\r\n")
    assert "c2VjcmV0" not in body and "id=1" not in body


# --- through the suite ------------------------------------------------------------------------------

def raw(port: int, data: bytes) -> bytes:
    """Send one request on its own connection (Connection: close) and read the whole answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(data)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return out


def test_fields_a_client_names_in_connection_never_reach_the_origin(proxy, origin):
    host = f"127.0.0.1:{origin.port}"
    out = raw(proxy.port, f"GET {origin.url}/headers HTTP/1.1\r\nHost: {host}\r\nConnection: close, X-Hop\r\n"
                          f"X-Hop: secret\r\nKeep-Alive: 300\r\nTE: trailers\r\nX-End: kept\r\n\r\n".encode())
    assert out.startswith(b"HTTP/1.1 200"), out[:200]
    seen = {k.lower(): v for k, v in json.loads(out.split(b"\r\n\r\n", 1)[1])["headers"].items()}
    assert seen["x-end"] == "kept" and "x-hop" not in seen and "keep-alive" not in seen and "te" not in seen
    assert "x-hop" not in seen.get("connection", "").lower()


@pytest.mark.parametrize("named", ["evil.example", "evil.example:8080", "[::1]"])
def test_a_host_naming_another_site_than_the_url_is_replaced_by_the_urls(proxy, origin, named):
    """RFC 9112 3.2.2: a proxy ignores the Host of an absolute-form request and sends the URL's."""
    out = raw(proxy.port, f"GET {origin.url}/headers HTTP/1.1\r\nHost: {named}\r\nConnection: close\r\n\r\n".encode())
    assert out.startswith(b"HTTP/1.1 200"), out[:200]
    seen = {k.lower(): v for k, v in json.loads(out.split(b"\r\n\r\n", 1)[1])["headers"].items()}
    assert seen["host"] == f"127.0.0.1:{origin.port}"
    assert proxy.log_line("/headers").split()[6] == f"{origin.url}/headers"


def test_two_host_fields_leave_one_the_urls(proxy, origin):
    out = raw(proxy.port, f"GET {origin.url}/headers HTTP/1.1\r\nHost: evil.example\r\nHost: 127.0.0.1:{origin.port}\r\n"
                          f"Connection: close\r\n\r\n".encode())
    assert out.startswith(b"HTTP/1.1 200"), out[:200]
    assert [v for k, v in origin.requests[-1].header_list if k.lower() == "host"] == [f"127.0.0.1:{origin.port}"]


def test_inside_a_connect_tunnel_the_host_field_names_the_site_and_is_left_alone(proxy, origin):
    """Requests inside a tunnel are in origin form: their Host names the site (virtual hosts on the
    address the CONNECT named), as a browser sends them."""
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as s:
        s.sendall(f"CONNECT 127.0.0.1:{origin.port} HTTP/1.1\r\nHost: 127.0.0.1:{origin.port}\r\n\r\n".encode())
        assert s.recv(4096).startswith(b"HTTP/1.1 200")
        s.sendall(f"GET /headers HTTP/1.1\r\nHost: www.example.test:{origin.port}\r\nConnection: close\r\n\r\n".encode())
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    assert out.startswith(b"HTTP/1.1 200"), out[:300]
    seen = {k.lower(): v for k, v in json.loads(out.split(b"\r\n\r\n", 1)[1])["headers"].items()}
    assert seen["host"] == f"www.example.test:{origin.port}"


@pytest.mark.parametrize("named", ["{host}", "{host}:80", "EXAMPLE.com"])
def test_a_host_naming_the_urls_site_is_left_as_sent(named):
    f = tflow.tflow()
    f.request.url = "http://example.com/x"
    f.request.headers["Host"] = named.format(host="example.com")
    assert hops.foreign_host(f, f.request.headers["Host"].encode()) is None
    f.request.headers["Host"] = "other.example"
    assert hops.foreign_host(f, b"other.example") == "example.com"


def test_fields_an_origin_names_in_connection_never_reach_the_client(proxy, origin):
    origin.route("/hop-response", lambda s: (200, {"Content-Type": "text/plain", "Connection": "X-Secret",
                                                   "X-Secret": "backend-1", "Keep-Alive": "timeout=5",
                                                   "X-Public": "yes"}, b"body"))
    r = curl("-i", "-x", proxy.url, f"{origin.url}/hop-response")
    head = r.stdout.split(b"\r\n\r\n", 1)[0].lower()
    assert b"x-public: yes" in head and b"x-secret" not in head and b"keep-alive: timeout" not in head, head


def test_trace_with_max_forwards_0_is_answered_by_the_proxy(proxy, origin):
    url = f"{origin.url}/traced"
    r = curl("-i", "-x", proxy.url, "-X", "TRACE", "-H", "Max-Forwards: 0", "-H", "Cookie: id=1",
             "-H", "X-Seen: yes", url)
    head, _, body = r.stdout.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"message/http" in head.lower(), head
    assert body.startswith(f"TRACE {url} HTTP/1.1\r\n".encode()) and b"X-Seen: yes" in body and b"id=1" not in body
    assert origin.hits.get("/traced", 0) == 0
    line = proxy.wait_lines("/traced", 1)[0].split()
    assert (line[3], line[5], line[8]) == ("TCP_MISS/200", "TRACE", "HIER_NONE/-")


@pytest.mark.parametrize("method", ["OPTIONS", "TRACE"])
def test_max_forwards_above_0_is_decreased_on_the_way(proxy, origin, method):
    seen = {}

    def record(s):
        seen.update({k.lower(): v for k, v in s.headers.items()})
        return 200, {"Content-Type": "text/plain"}, b"origin"
    origin.route(f"/mf-{method}", record)
    r = curl("-i", "-x", proxy.url, "-X", method, "-H", "Max-Forwards: 2", f"{origin.url}/mf-{method}")
    assert r.stdout.endswith(b"origin") and seen["max-forwards"] == "1"


def test_a_max_forwards_that_is_no_number_goes_on_and_the_rest_of_the_suite_still_runs(proxy, origin):
    """"²" passes str.isdigit; an error here would skip every later addon (anonymization included)."""
    host = f"127.0.0.1:{origin.port}"
    out = raw(proxy.port, f"OPTIONS {origin.url}/headers HTTP/1.1\r\nHost: {host}\r\nMax-Forwards: \u00b2\r\n"
                          f"X-Forwarded-For: 10.9.9.9\r\nConnection: close\r\n\r\n".encode())
    seen = json.loads(out.split(b"\r\n\r\n", 1)[1])["headers"]
    assert seen["max-forwards"] == "\u00b2".encode().decode("latin-1") and "x-forwarded-for" not in seen


def test_options_with_max_forwards_0_says_what_the_proxy_relays(proxy, origin):
    r = curl("-i", "-x", proxy.url, "-X", "OPTIONS", "-H", "Max-Forwards: 0", f"{origin.url}/opt")
    head = r.stdout.split(b"\r\n\r\n", 1)[0]
    assert head.startswith(b"HTTP/1.1 200") and b"Allow: GET, HEAD, POST" in head, head
    assert origin.hits.get("/opt", 0) == 0


def test_a_denied_trace_is_denied_not_answered(start_proxy, refused_port):
    """Access control comes first: a TRACE to a port the policy refuses gets its 403."""
    p = start_proxy()
    r = curl("-i", "-x", p.url, "-X", "TRACE", "-H", "Max-Forwards: 0", "http://127.0.0.1:1/denied")
    assert r.stdout.startswith(b"HTTP/1.1 403"), r.stdout[:200]
    assert p.wait_lines("/denied", 1)[0].split()[3] == "TCP_DENIED/403"


def test_a_local_answer_says_who_made_it():
    f = tflow.tflow()
    f.request.method = "TRACE"
    f.request.headers["Max-Forwards"] = "0"
    hops.Hops().requestheaders(f)
    assert f.response.status_code == 200 and f.metadata[meta.LOCAL] == "hops"


def test_an_http_1_0_client_asking_for_keep_alive_is_told_it_and_keeps_its_connection(proxy, origin):
    """ab -k and other HTTP/1.0 clients close a connection the answer does not say is kept (as Squid says)."""
    origin.route("/ka", lambda s: (200, {"Cache-Control": "max-age=600", "Content-Type": "text/plain"}, b"hello"))
    heads = []
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as s:
        for _ in range(3):  # a miss, then hits: all on one connection
            s.sendall(f"GET {origin.url}/ka HTTP/1.0\r\nConnection: keep-alive\r\n\r\n".encode())
            data = b""
            while not (b"\r\n\r\n" in data and data.endswith(b"hello")):
                chunk = s.recv(65536)
                assert chunk, data
                data += chunk
            heads.append(data.split(b"\r\n\r\n", 1)[0].lower())
    assert all(b"\r\nconnection: keep-alive" in h for h in heads), heads
    assert [h.split(b"x-cache: ")[1].split(b" ")[0] for h in heads] == [b"miss", b"hit", b"hit"]
    # without asking, nothing is promised
    out = raw(proxy.port, f"GET {origin.url}/ka HTTP/1.0\r\n\r\n".encode())
    assert b"\r\nConnection: keep-alive" not in out.split(b"\r\n\r\n", 1)[0]


def test_header_fields_larger_than_request_header_max_size_are_refused_before_going_on(proxy, origin):
    """Squid's request_header_max_size (64 KB): mitmproxy alone read and sent on 2 MB of fields."""
    out = raw(proxy.port, f"GET {origin.url}/big HTTP/1.1\r\nHost: 127.0.0.1:{origin.port}\r\n"
                          f"X-Big: {'x' * 70_000}\r\nConnection: close\r\n\r\n".encode())
    assert out.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n"), out[:300]
    assert b"X-Squid-Error: ERR_TOO_BIG" in out
    assert "/big" not in origin.hits
    assert " NONE_NONE/431 " in proxy.log_line("/big")
    ok = raw(proxy.port, f"GET {origin.url}/fits HTTP/1.1\r\nHost: 127.0.0.1:{origin.port}\r\n"
                         f"X-Big: {'x' * 30_000}\r\nConnection: close\r\n\r\n".encode())
    assert ok.startswith(b"HTTP/1.1 200")


def test_a_nul_in_a_field_is_refused_and_a_folded_line_is_unfolded(proxy, origin):
    """RFC 9110 5.5 and RFC 9112 5.2, as Squid: 400 for NUL; obs-fold replaced by one space."""
    out = raw(proxy.port, f"GET {origin.url}/nul HTTP/1.1\r\nHost: 127.0.0.1:{origin.port}\r\nX-N: a\x00b\r\n"
                          f"Connection: close\r\n\r\n".encode())
    assert out.startswith(b"HTTP/1.1 400 ") and b"ERR_INVALID_REQ" in out, out[:300]
    assert "/nul" not in origin.hits
    out = raw(proxy.port, f"GET {origin.url}/headers HTTP/1.1\r\nHost: 127.0.0.1:{origin.port}\r\nX-A: a\r\n"
                          f"  folded\r\nConnection: close\r\n\r\n".encode())
    assert out.startswith(b"HTTP/1.1 200"), out[:300]
    seen = {k.lower(): v for k, v in json.loads(out.split(b"\r\n\r\n", 1)[1])["headers"].items()}
    assert seen["x-a"] == "a folded"


@pytest.mark.parametrize("value", ["lots", "-1 KB"])
def test_a_bad_request_header_max_size_is_refused_naming_it(value):
    from mitmproxy import exceptions
    from mitmproxy.test import taddons
    h = hops.Hops()
    with taddons.context(h) as tctx:
        with pytest.raises(exceptions.OptionsError, match="request_header_max_size"):
            tctx.configure(h, request_header_max_size=value)


def test_a_standard_method_in_lower_case_goes_on_as_the_rules_and_the_log_read_it(proxy, origin):
    """mitmproxy's Request.method is upper case (what the acls, the cache and the log see) but it sent
    `get` on as written, which origins refuse (501); Squid sends GET."""
    out = raw(proxy.port, f"get {origin.url}/lower HTTP/1.1\r\nHost: 127.0.0.1:{origin.port}\r\nConnection: close\r\n\r\n".encode())
    assert out.startswith(b"HTTP/1.1 200"), out[:200]
    assert origin.requests[-1].method == "GET"


def test_an_http2_requests_host_fields_give_way_to_its_authority():
    """RFC 9113 8.3.1: the rules judged :authority; a host field (h2 checks only the last one against it)
    would be sent on to an HTTP/1 origin in its place: it goes, and mitmproxy makes Host of :authority."""
    from mitmproxy.test import taddons
    h = hops.Hops()
    with taddons.context(h):
        f = tflow.tflow()
        f.request.http_version = "HTTP/2.0"
        f.client_conn.alpn = b"h2"
        f.request.data.authority = b"allowed.example"
        f.request.headers.fields = ((b"host", b"denied.example"), (b"host", b"allowed.example"), (b"x-a", b"1"))
        h.requestheaders(f)
        assert f.request.headers.fields == ((b"x-a", b"1"),) and f.response is None


@pytest.mark.parametrize("value, sent", [(b"a\r\n  folded", b"a folded"), (b"a\rb", b"a b"), (b"a\nb", b"a b")])
def test_a_folded_line_or_a_bare_cr_or_lf_in_a_field_becomes_one_space(value, sent):
    from mitmproxy.test import taddons
    h = hops.Hops()
    with taddons.context(h):
        f = tflow.tflow()
        f.request.headers.fields = ((b"Host", b"address:22"), (b"X-A", value))
        h.requestheaders(f)
        assert f.request.headers.fields[1] == (b"X-A", sent) and "replaced by a space" in f.comment


def test_the_proxys_own_answers_to_head_have_no_body_and_the_connection_goes_on(proxy, origin, refused_port):
    """RFC 9110 9.3.2: the proxy's own pages answer HEAD without their body (mitmproxy sent it, and a
    client keeping its connection read it as the next response): a denial (port 9), an unreachable
    origin (the errors addon's check), an origin that closes unanswered (answered from the error hook),
    each with its page's Content-Length; then a GET on the same connection gets its own answer."""
    with scripted_server(b"") as closing, socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as s:
        for port, status, page in ((9, 403, "ERR_ACCESS_DENIED"), (refused_port, 503, "ERR_CONNECT_FAIL"),
                                   (closing, 502, "ERR_ZERO_SIZE_OBJECT")):
            s.sendall(f"HEAD http://127.0.0.1:{port}/h HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
            head = b""
            while b"\r\n\r\n" not in head:
                head += s.recv(1)  # byte by byte: what follows the head is the next response's
            assert head.startswith(f"HTTP/1.1 {status} ".encode()) and f"X-Squid-Error: {page}".encode() in head
            assert int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0]) > 0  # the page's, as for GET
        s.sendall(f"GET {origin.url}/after-head HTTP/1.1\r\nHost: 127.0.0.1:{origin.port}\r\n"
                  f"Connection: close\r\n\r\n".encode())
        rest = b""
        while chunk := s.recv(65536):
            rest += chunk
    assert rest.startswith(b"HTTP/1.1 200 ") and rest.endswith(b"\r\n\r\nhello /after-head"), rest[:300]


def send_line(proxy, origin, method: str, path: str, version: str) -> bytes:
    """One request with this request line to the origin through the proxy; the whole answer."""
    return raw(proxy.port, f"{method} {origin.url}{path} {version}\r\nHost: 127.0.0.1:{origin.port}\r\n"
                           f"Connection: close\r\n\r\n".encode())


def assert_refused(proxy, origin, out: bytes, path: str, status: int, page: str) -> None:
    assert out.startswith(f"HTTP/1.1 {status} ".encode()) and f"X-Squid-Error: {page}".encode() in out, out[:300]
    assert path not in origin.hits
    assert f" NONE_NONE/{status} " in proxy.log_line(path)


def test_a_method_that_is_no_token_is_refused_and_an_unknown_token_goes_on(proxy, origin):
    """RFC 9110 9.1, as Squid's parser: 400 for `GE(T` (mitmproxy alone sent it on); an extension
    method is the origin's to judge."""
    assert_refused(proxy, origin, send_line(proxy, origin, "GE(T", "/paren", "HTTP/1.1"), "/paren", 400,
                   "ERR_INVALID_REQ")
    out = send_line(proxy, origin, "FROB", "/frob", "HTTP/1.1")
    # the origin's own answer (http.server has no FROB: its 501)
    assert out.startswith(b"HTTP/1.1 501 ") and b"Server: BaseHTTP" in out, out[:300]


def test_another_major_http_version_gets_505_and_a_higher_minor_goes_on_as_http_1_1(proxy, origin):
    """RFC 9112 2.6, as Squid: mitmproxy alone sent `HTTP/9.9` on to the origin, and `HTTP/1.2` as it came."""
    assert_refused(proxy, origin, send_line(proxy, origin, "GET", "/nine", "HTTP/9.9"), "/nine", 505,
                   "ERR_UNSUP_HTTPVERSION")
    # an HTTP/2 version in an HTTP/1 request line
    assert_refused(proxy, origin, send_line(proxy, origin, "GET", "/two", "HTTP/2.0"), "/two", 505,
                   "ERR_UNSUP_HTTPVERSION")
    out = raw(proxy.port, f"CONNECT 127.0.0.1:{origin.port} HTTP/9.9\r\nHost: 127.0.0.1:{origin.port}\r\n\r\n".encode())
    assert out.startswith(b"HTTP/1.1 505 "), out[:300]  # (mitmproxy alone: HTTP/9.9 200 Connection established)
    out = send_line(proxy, origin, "GET", "/minor", "HTTP/1.2")
    assert out.startswith(b"HTTP/1.1 200"), out[:300]
    assert origin.requests[-1].path.endswith("/minor") and origin.requests[-1].version == "HTTP/1.1"


def test_a_url_longer_than_8_kb_gets_414_and_a_bounded_log_line(proxy, origin):
    """Squid's MAX_URL: mitmproxy alone sent a 1 MB URL on, and the access log took it whole."""
    path = "/long/" + "a" * 1_000_000
    out = send_line(proxy, origin, "GET", path, "HTTP/1.1")
    assert out.startswith(b"HTTP/1.1 414 ") and b"X-Squid-Error: ERR_TOO_BIG" in out, out[:300]
    assert len(out) < 10_000  # the page shows the URL's start only
    assert not any(p.startswith("/long/") for p in origin.hits)
    line = proxy.log_line("/long/aaaa")
    assert " NONE_NONE/414 " in line and len(line) < 9000
    assert send_line(proxy, origin, "GET", "/long/" + "a" * 8000, "HTTP/1.1").startswith(b"HTTP/1.1 200")


@pytest.mark.parametrize("size", [5, 2_000_000])
def test_a_response_whose_header_fields_pass_reply_header_max_size_is_replaced_by_502(proxy, origin, size):
    """Squid's reply_header_max_size (64 KB): mitmproxy alone relayed 70 KB of fields; none of the
    origin's fields or body bytes go out, small body or large."""
    origin.route("/big-head", lambda s: (200, {"X-Big": "x" * 70_000, "Content-Type": "text/plain"}, b"y" * size))
    out = send_line(proxy, origin, "GET", "/big-head", "HTTP/1.1")
    head, _, body = out.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 502 ") and b"X-Squid-Error: ERR_TOO_BIG" in head, out[:300]
    assert b"X-Big" not in out and b"yyyyy" not in out
    assert body.startswith(b"<!DOCTYPE html>") and b"reply_header_max_size" in body
    assert int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0]) == len(body)
    assert " TCP_MISS/502 " in proxy.log_line("/big-head")
    head, _, body = send_line(proxy, origin, "HEAD", "/big-head", "HTTP/1.1").partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 502 ") and body == b""  # (an answer to HEAD has no body)
    origin.route("/fits-head", lambda s: (200, {"X-Big": "x" * 30_000}, b"ok"))
    assert send_line(proxy, origin, "GET", "/fits-head", "HTTP/1.1").startswith(b"HTTP/1.1 200")
