"""In-process tests of addons/cache.py: options, keys, commands (cache.purge, cache.clear, cache.stats)."""
from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import pytest
from mitmproxy import exceptions, http
from mitmproxy.proxy.mode_specs import ProxyMode
from mitmproxy.test import taddons, tflow, tutils

from addons import cache as cachemod
from addons import meta


def stored_flow(url="http://example.com/a", cc="max-age=60", body=b"hello", status=200):
    f = tflow.tflow(req=tutils.treq(method=b"GET"), resp=tutils.tresp(status_code=status))
    f.request.url = url
    f.response.headers.clear()
    f.response.headers["Cache-Control"] = cc
    f.response.set_content(body)
    f.request.timestamp_start = f.response.timestamp_start = time.time()
    return f


def request_flow(url="http://example.com/a", method="GET", **headers):
    f = tflow.tflow(req=tutils.treq(method=method.encode()))
    f.request.url = url
    for k, v in headers.items():
        f.request.headers[k.replace("_", "-")] = v
    return f


@pytest.fixture
def cache(tmp_path):
    c = cachemod.Cache()
    with taddons.context(c) as tctx:
        tctx.configure(c, cache_dir=str(tmp_path / "c"))
        yield c, tctx
    c.done()


def test_store_and_hit(cache):
    c, _ = cache
    c.response(stored_flow())
    f = request_flow()
    c.requestheaders(f)
    assert f.response is not None and f.response.content == b"hello"
    assert f.metadata[meta.LOCAL] == "cache" and f.metadata[meta.CODE] == "TCP_MEM_HIT"
    assert f.metadata[meta.CACHE] == {"status": "HIT", "tier": "mem"}
    assert f.metadata[meta.HIER] == "HIER_NONE"
    assert "TCP_MEM_HIT" in f.comment


def test_the_flow_comment_keeps_what_earlier_addons_wrote(cache):
    """mitmweb shows the access rule and the cache's outcome (which used to replace the rule)."""
    c, _ = cache
    c.response(stored_flow())
    f = request_flow()
    f.comment = "allowed by: http_access allow localhost"
    c.requestheaders(f)
    assert f.comment == "allowed by: http_access allow localhost\ncache: TCP_MEM_HIT (mem)"


@pytest.mark.parametrize("version,status,reason,body", [
    (b"HTTP/1.1", 200, b"OK", b"hello"), (b"HTTP/2.0", 304, b"Not Modified", b""),
    (b"HTTP/1.1", 206, b"Partial Content", b"ell"), (b"HTTP/1.1", 404, b"", b"gone")])
def test_make_response_is_the_constructor_without_its_checks(version, status, reason, body):
    from mitmproxy import http
    headers = ((b"Content-Type", b"text/plain"), (b"Age", b"3"))
    fast = cachemod.make_response(version, status, reason, http.Headers(headers), body, 1234.5)
    slow = http.Response(version, status, reason, http.Headers(headers), body, None, 1234.5, 1234.5)
    assert type(fast) is http.Response and fast.get_state() == slow.get_state()
    assert fast.stream == slow.stream and vars(fast).keys() == vars(slow).keys()
    fast.headers["X"] = "1"  # its own objects, not the template's
    assert "X" not in cachemod.make_response(version, status, reason, http.Headers(headers), body, 1.0).headers


def test_headers_of_is_the_constructor_without_its_checks():
    from mitmproxy import http
    fields = ((b"Content-Type", b"text/plain"), (b"Age", b"3"), (b"age", b"4"))
    fast, slow = cachemod.headers_of(fields), http.Headers(fields)
    assert type(fast) is http.Headers and fast == slow and fast.get_state() == slow.get_state()
    assert fast.get_all("AGE") == ["3", "4"] and fast.fields == slow.fields


def test_own_answers_and_other_addons_answers_not_stored(cache):
    c, _ = cache
    f = stored_flow()
    f.metadata[meta.LOCAL] = "acl"
    c.response(f)
    g = request_flow()
    c.requestheaders(g)
    assert g.response is None


def test_commands(cache):
    c, tctx = cache
    c.response(stored_flow("http://example.com/a"))
    c.response(stored_flow("https://example.com/b"))
    stats = json.loads(tctx.master.commands.call("cache.stats"))
    assert stats["mem"]["entries"] == 2 and stats["mem"]["bytes"] > 0
    assert tctx.master.commands.call("cache.purge", "http://example.com/a") == 1
    assert tctx.master.commands.call("cache.purge", "http://example.com/a") == 0
    f = request_flow("http://example.com/a")
    c.requestheaders(f)
    assert f.response is None
    f = request_flow("https://example.com/b")
    c.requestheaders(f)
    assert f.response is not None
    stats = json.loads(tctx.master.commands.call("cache.stats"))
    assert stats["hits"] == 1 and stats["misses"] == 1 and stats["hit_ratio"] == 0.5
    tctx.master.commands.call("cache.clear")
    f = request_flow("https://example.com/b")
    c.requestheaders(f)
    assert f.response is None
    with pytest.raises(exceptions.CommandError):
        c.purge("not a url")


def test_stats_right_after_a_clear_count_nothing_on_disk(cache):
    """The disk tier is emptied by its writer process, a moment later; meanwhile it answers nothing,
    and cache.stats says so (it showed the old entries for a second or two)."""
    c, tctx = cache
    c.response(stored_flow("http://example.com/on-disk"))
    c.store.disk.flush()
    assert json.loads(tctx.master.commands.call("cache.stats"))["disk"]["entries"] == 1
    tctx.master.commands.call("cache.clear")
    stats = json.loads(tctx.master.commands.call("cache.stats"))
    assert stats["disk"]["entries"] == 0 and stats["disk"]["bytes"] == 0, stats


def test_http_and_https_never_mix(cache):
    c, _ = cache
    c.response(stored_flow("https://example.com:8443/x"))
    f = request_flow("http://example.com:8443/x")
    c.requestheaders(f)
    assert f.response is None
    assert cachemod.primary_key(request_flow("https://Example.com/x?q=1")) == "https://example.com:443/x?q=1"


def test_reverse_key_uses_the_target_not_the_host_header():
    with taddons.context():  # primary_key reads mitmproxy's options (keep_host_header)
        f = request_flow("http://evil.example/x")
        f.client_conn.proxy_mode = ProxyMode.parse("reverse:http://10.0.0.1:8080")
        assert cachemod.primary_key(f) == "http://10.0.0.1:8080/x"


@pytest.mark.parametrize("location, relative", [
    ("http://www.example.com/t", "/t"), ("https://WWW.example.com:443/a?b=1", "/a?b=1"),
    ("http://www.example.com:80?q=1", "/?q=1"), ("http://www.example.com:8081/x", None),
    ("http://other.example/x", None), ("http://www.example.com:99999/x", None), ("/rel", "/rel")])
def test_a_location_naming_the_virtual_host_by_its_public_name_is_made_relative(location, relative):
    out = cachemod.site_relative("http://www.example.com@127.0.0.1:8080/p", [("Location", location)])
    assert out == [("Location", relative or location)]
    assert cachemod.site_relative("http://127.0.0.1:8080/p", h := [("Location", location)]) is h


def test_a_host_field_that_is_no_utf8_gets_a_key_of_its_own():
    f = request_flow("http://example.com/")
    f.request.data.authority = b""  # origin-form: the Host field names the site
    f.request.headers.fields = ((b"Host", b"ex\xffample.com"),)
    assert cachemod.primary_key(f) == "http://ex%ffample.com@example.com:80/"


@pytest.mark.parametrize("value,expected", [
    ("67108864", 67108864), ("64 MB", 64 * 1024 ** 2), ("512 KB", 512 * 1024), ("4m", 4 * 1024 ** 2),
    ("1.5 GB", int(1.5 * 1024 ** 3)), ("0", 0)])
def test_sizes(value, expected):
    assert cachemod.parse_size(value, "x") == expected


@pytest.mark.parametrize("option,value", [
    ("cache_mem", "lots"), ("maximum_object_size", "-1 MB"), ("cache_dir_size", 0), ("negative_ttl", -1),
    ("purge_from", ["not-a-net"]), ("cache_policy", "/nonexistent/cache.yaml"), ("cache_dir", " ")])
def test_bad_options(tmp_path, option, value):
    c = cachemod.Cache()
    with taddons.context(c) as tctx:
        with pytest.raises(exceptions.OptionsError) as e:
            tctx.configure(c, **{option: value})
        assert option in str(e.value)
    c.done()


@pytest.mark.parametrize("targets", ["CDN-Cache-Control", "[bad name]", "[1]"])
def test_bad_targeted_fields_named(tmp_path, targets):
    pol = tmp_path / "cache.yaml"
    pol.write_text(f"targeted_fields: {targets}\n")
    c = cachemod.Cache()
    with taddons.context(c) as tctx:
        with pytest.raises(exceptions.OptionsError, match=r"targeted_fields must be a list of header field names"):
            tctx.configure(c, cache_dir="none", cache_policy=str(pol))
    c.done()


def test_policy_resolved_against_project_root(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    c = cachemod.Cache()
    with taddons.context(c) as tctx:
        tctx.configure(c, cache_dir="none", cache_policy="policies/cache.yaml")
        assert c.policy_file.endswith("policies/cache.yaml")
        assert [r.pattern for r in c.rules][-1] == "."
        assert c.targets == ("cdn-cache-control",)
    c.done()


def test_purge_method_checks_purge_from(cache):
    c, tctx = cache
    c.response(stored_flow())
    f = request_flow(method="PURGE")
    f.client_conn.peername = ("192.0.2.1", 5000)
    c.requestheaders(f)
    assert f.response.status_code == 403 and f.metadata[meta.CODE] == "TCP_DENIED"
    f = request_flow(method="PURGE")
    f.client_conn.peername = ("127.0.0.1", 5000)
    c.requestheaders(f)
    assert f.response.status_code == 200


def test_keys_percent_encode_the_bytes_of_a_path_beyond_ascii():
    """Raw or percent-encoded, one resource has one key, which holds no lone surrogate (the disk tier's
    SQLite refuses them): a purge by URL finds what a request stored."""
    f = tflow.tflow(req=tutils.treq(method=b"GET", path=b"/caf\xe9/\xc3\xa9?q=\xff"))
    assert cachemod.primary_key(f) == "http://address:22/caf%E9/%C3%A9?q=%FF"
    assert cachemod.url_key("http://ADDRESS:22/caf\udce9/é?q=\udcff") == cachemod.primary_key(f)
    assert cachemod.primary_key(tflow.tflow(req=tutils.treq(path=b"/plain?a=%E9"))) == "http://address:22/plain?a=%E9"
    assert cachemod.url_key("http://h/odd\ud800") == "http://h:80/odd%ED%A0%80"  # no byte behind it: no error


def test_a_hit_replays_the_origins_reason_phrase_bytes(cache):
    c, _ = cache
    f = stored_flow()
    f.response.data.reason = b"Fine \xff"  # mitmproxy reads a reason as ISO-8859-1
    c.response(f)
    hit = request_flow()
    c.requestheaders(hit)
    assert hit.metadata[meta.CODE] == "TCP_MEM_HIT" and hit.response.data.reason == b"Fine \xff"


@pytest.mark.parametrize("key, origin", [
    ("http://h:80/x?q", "http://h:80"), ("http://h:80*", "http://h:80"),  # OPTIONS *
    ("http://h:80", "http://h:80"), ("https://h:443?q", "https://h:443")])
def test_the_origin_of_any_key(key, origin):
    assert cachemod.origin_of(key) == origin


@pytest.mark.parametrize("location", ["http://[::1", "http://example.com:99999/a", "/a"])
def test_a_post_whose_content_location_is_no_url_describes_nothing(cache, location):
    c, _ = cache
    f = stored_flow(cc="max-age=60")
    f.request.method = "POST"
    f.response.headers["Content-Location"] = location
    c.response(f)  # no error
    hit = request_flow()
    c.requestheaders(hit)
    assert (hit.response is not None) == (location == "/a")  # only a real URL of the target answers GETs


def test_background_refreshes_are_bounded(cache, monkeypatch):
    """Past REFRESH_MAX refreshes at once, or REFRESH_PER_ORIGIN for one origin, a stale entry is
    served without starting another. (Port 9 of loopback: a refresh that starts is refused at once.)"""
    c, _ = cache
    monkeypatch.setattr(cachemod, "REFRESH_MAX", 3)
    url, key = "http://127.0.0.1:9/r", "http://127.0.0.1:9/r"
    c.response(stored_flow(url))
    entry, _ = c.lookup(key, request_flow(url).request.headers)
    assert entry is not None

    async def refresh(busy: dict[str, str]) -> set[str]:
        c.refreshing = dict(busy)
        c._refresh_in_background(key, entry, request_flow(url))
        return set(c.refreshing)
    here, there = "http://127.0.0.1:9", "http://127.0.0.2:80"
    assert asyncio.run(refresh({"k1": there, "k2": there, "k3": there})) == {"k1", "k2", "k3"}  # at the bound
    assert asyncio.run(refresh({"k1": here, "k2": here})) == {"k1", "k2"}  # at its origin's bound
    assert asyncio.run(refresh({"k1": here, "k2": there})) == {"k1", "k2", key}  # below both: it starts


def streamed_flow(url="http://example.com/big", body=b"0123456789"):
    f = stored_flow(url, body=b"")
    f.response.headers["Content-Length"] = str(len(body))
    f.response.stream = True  # as mitmproxy sets it past stream_large_bodies
    return f, body


def test_a_streamed_copy_that_is_not_stored_leaves_no_temp_file(cache, monkeypatch):
    """Whatever stops a streamed response from being stored (here an error in the cache's own response
    handling), its temp file does not stay in cache_dir/incoming."""
    c, _ = cache
    incoming = c.store.disk.tmpdir
    f, body = streamed_flow()
    c.responseheaders(f)
    assert callable(f.response.stream) and len(list(incoming.glob("body-*"))) == 1
    f.response.stream(body)

    def broken(*args):
        raise RuntimeError("a bug")
    monkeypatch.setattr(c, "_response", broken)
    with pytest.raises(RuntimeError):
        c.response(f)
    assert list(incoming.glob("body-*")) == []


def test_a_streamed_copy_that_is_stored_is_handed_to_the_store(cache):
    c, _ = cache
    f, body = streamed_flow()
    c.responseheaders(f)
    f.response.stream(body)
    c.response(f)
    c.store.disk.flush()
    g = request_flow("http://example.com/big")
    c.requestheaders(g)
    assert g.response is not None and g.response.content == body
    assert list(c.store.disk.tmpdir.glob("body-*")) == []


def test_purge_logs_a_url_with_a_lone_surrogate_in_a_form_the_console_can_write(cache, caplog):
    c, _ = cache
    caplog.set_level("INFO")
    assert c.purge("http://example.com/\ud800") == 0
    assert "cache.purge http://example.com/\\ud800: not cached" in caplog.text
    caplog.text.encode("utf-8")  # mitmproxy's console writes UTF-8: a lone surrogate would raise there


def raw_origin(answer, got: list | None = None):
    """A loopback origin that reads a request (into `got`) and calls answer(conn) on each connection;
    returns its URL and its listening socket."""
    server = socket.create_server(("127.0.0.1", 0))

    def serve():
        for _ in range(4):  # bounded: a test makes a request or two
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                request = conn.recv(65536)
                if got is not None:
                    got.append(request)
                try:
                    answer(conn)
                except OSError:  # the client cut the connection
                    pass
    threading.Thread(target=serve, daemon=True).start()
    return f"http://127.0.0.1:{server.getsockname()[1]}", server


def trickle(head: bytes, then: bytes):
    def answer(conn):
        conn.sendall(head)
        for _ in range(200):  # a byte every 0.05 s for 10 s at most
            conn.sendall(then)
            time.sleep(0.05)
    return answer


@pytest.mark.parametrize("answer", [
    trickle(b"HTTP/1.1 200 OK\r\nX-Slow: ", b"a"),                     # the headers never end
    trickle(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n", b"x"),    # a body that ends at close
    trickle(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n", b"x"),
], ids=["headers", "body-until-close", "body-with-length"])
def test_a_refresh_gives_up_on_an_origin_that_trickles_its_answer(monkeypatch, answer):
    """Whatever the origin trickles, the refresh ends in an error at its deadline: neither a thread
    held for ever nor a body cut short and taken as whole."""
    monkeypatch.setattr(cachemod, "REFRESH_DEADLINE", 0.5)
    url, server = raw_origin(answer)
    try:
        start = time.monotonic()
        with pytest.raises(TimeoutError):
            cachemod.fetch(url + "/slow", {}, {}, False, 1 << 20)
        assert time.monotonic() - start < 5  # at its deadline, not when the origin stops
    finally:
        server.close()


def test_a_refresh_takes_errors_and_redirects_as_answers():
    def answer(conn):
        path = "/moved" if not hasattr(answer, "n") else "/gone"
        answer.n = 1
        if path == "/moved":
            conn.sendall(b"HTTP/1.1 301 Moved\r\nLocation: /elsewhere\r\nContent-Length: 2\r\n\r\nmv")
        else:
            conn.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: 4\r\n\r\ngone")
    url, server = raw_origin(answer)
    try:
        _, status, headers, body = cachemod.fetch(url + "/a", {}, {}, False, 1 << 20)
        assert (status, body, dict(headers)["Location"]) == (301, b"mv", "/elsewhere")  # not followed
        _, status, _, body = cachemod.fetch(url + "/b", {}, {}, False, 3)
        assert (status, body) == (404, b"gon")  # at most the limit
    finally:
        server.close()


def test_a_refresh_reaches_an_https_origin_through_the_deadline_handlers(cert):
    from harness import Origin
    o = Origin(tls=cert)
    try:
        _, status, _, body = cachemod.fetch(f"{o.url}/tls-refresh", {}, {}, True, 1 << 20)
        assert (status, body) == (200, b"hello /tls-refresh")
    finally:
        o.close()


def test_refreshes_still_queued_when_the_cache_closes_are_cancelled_not_left_pending():
    async def scenario():
        r = cachemod.Refresher(1)
        started, gate = threading.Event(), threading.Event()
        running = r.run(lambda: started.set() or (gate.wait(5) and "done"))
        queued = r.run(lambda: "never run")
        assert started.wait(5)  # the worker took the first job (the second stays queued)
        r.close()
        gate.set()
        assert await asyncio.wait_for(running, 5) == "done"  # a running fetch ends as it would
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(queued, 5)
    asyncio.run(scenario())


def refresh_against(cache, answer, cc="max-age=60, stale-while-revalidate=60", etag='"v1"', vary=None,
                    req_headers=None):
    """Store a response of a loopback origin, refresh it in the background against answer(conn);
    returns (what the origin received, the entry stored afterwards)."""
    c, _ = cache
    got: list[bytes] = []
    url, server = raw_origin(answer, got)
    url += "/swr"
    f = stored_flow(url, cc=cc, body=b"old body")
    f.response.headers["ETag"] = etag
    if vary:
        f.response.headers["Vary"] = vary
    for k, v in (req_headers or {}).items():
        f.request.headers[k] = v
    c.response(f)
    key = cachemod.primary_key(f)
    entry, _ = c.lookup(key, f.request.headers)
    assert entry is not None

    async def go():
        c._refresh_in_background(key, entry, f)
        for _ in range(100):
            if not c.refreshing:
                return
            await asyncio.sleep(0.05)
    try:
        asyncio.run(go())
    finally:
        server.close()
    after, _ = c.lookup(key, f.request.headers)
    return (got[0] if got else b""), after


def test_a_refresh_whose_body_is_cut_short_keeps_the_stored_response(cache):
    _, after = refresh_against(cache, lambda conn: conn.sendall(
        b"HTTP/1.1 200 OK\r\nCache-Control: max-age=60\r\nContent-Length: 1000\r\n\r\n" + b"n" * 100))
    assert after is not None and after.body == b"old body"


def test_a_refresh_answered_304_with_another_etag_does_not_freshen_the_stored_response(cache):
    _, after = refresh_against(cache, lambda conn: conn.sendall(
        b'HTTP/1.1 304 Not Modified\r\nETag: "v2"\r\nCache-Control: max-age=600\r\n\r\n'))
    assert after.body == b"old body" and dict(after.meta.headers)["ETag"] == '"v1"'
    assert after.meta.lifetime == 60


def test_a_refresh_keeps_the_bytes_of_the_fields_it_gets(cache):
    """http.client reads field values as Latin-1; the store holds them as mitmproxy does (UTF-8 with
    surrogateescape): a hit sends the origin's bytes, and an ETag with obs-text matches its own 304."""
    etag = '"\u00e9"'  # as mitmproxy holds the bytes "\xc3\xa9"
    c, _ = cache
    _, after = refresh_against(cache, lambda conn: conn.sendall(
        b'HTTP/1.1 304 Not Modified\r\nETag: "\xc3\xa9"\r\nCache-Control: max-age=600\r\n'
        b'Content-Disposition: attachment; filename="caf\xc3\xa9.txt"\r\n\r\n'), etag=etag)
    assert after.meta.lifetime == 600  # the 304 selected the stored response
    g = request_flow(after.meta.url.replace(":80/", "/", 1))
    c.requestheaders(g)
    assert g.response.headers.fields[[k for k, _ in g.response.headers.fields].index(b"Content-Disposition")][1] \
        == b'attachment; filename="caf\xc3\xa9.txt"'


def per_user_answer(c, method, req_headers, status, resp_headers, cc="max-age=1"):
    """A stored, stale-or-reloaded response; a user's request reaches the origin, which answers with
    resp_headers. Returns what the user gets, and what another user then gets from the cache (None:
    nothing stored)."""
    f = stored_flow(cc=cc, body=b"page")
    f.response.headers["ETag"] = '"v1"'
    if cc == "max-age=1":
        f.request.timestamp_start = f.response.timestamp_start = time.time() - 100  # stale
    c.response(f)
    user = request_flow(method=method, **req_headers)
    c.requestheaders(user)
    assert user.response is None  # forwarded
    user.response = http.Response.make(status, b"", resp_headers)
    user.request.timestamp_start = user.response.timestamp_start = time.time()
    c.responseheaders(user)
    c.response(user)
    other = request_flow()
    c.requestheaders(other)
    return user.response, other.response


def test_a_304_to_a_request_with_authorization_neither_updates_nor_drops_the_shared_entry(cache):
    """RFC 9111 3.5: what a user's authorized request got may be that user's; the stored response stays
    as it was for the others (dropping it would let any client force full fetches)."""
    c, _ = cache
    per_user_answer(c, "GET", {"Authorization": "Basic YWxpY2U6eA=="}, 304,
                    {"ETag": '"v1"', "Cache-Control": "max-age=600", "X-User": "alice"})
    entry, _ = c.lookup(cachemod.primary_key(request_flow()), request_flow().request.headers)
    assert entry is not None and entry.meta.lifetime == 1 and "X-User" not in dict(entry.meta.headers)


@pytest.mark.parametrize("cc, collapsed", [("max-age=1", True), ("no-cache, max-age=600", False)])
def test_only_the_revalidation_of_an_object_past_its_lifetime_is_collapsed(cache, cc, collapsed):
    """One revalidating a no-cache object for another client would not spare this one its own."""
    c, _ = cache
    f = stored_flow(cc=cc, body=b"page")
    f.response.headers["ETag"] = '"v1"'
    f.request.timestamp_start = f.response.timestamp_start = time.time() - 100
    c.response(f)

    async def two():
        first, second = request_flow(), request_flow()
        assert c.requestheaders(first) is None and first.id in c.pending  # revalidates
        res = c.requestheaders(second)
        if res is not None:
            res.close()
        return res, second
    res, second = asyncio.run(two())
    assert (res is not None) is collapsed
    assert (second.id in c.pending) is not collapsed


def test_a_304_naming_another_etag_answers_this_once_and_the_next_request_fetches_whole(cache):
    """RFC 9111 4.3.4: such a 304 selects no stored response; revalidating that one again would get the
    same answer for ever."""
    c, _ = cache
    own, got = per_user_answer(c, "GET", {}, 304, {"ETag": '"v2"', "Cache-Control": "max-age=600"})
    assert own.content == b"page" and own.headers["ETag"] == '"v1"'
    assert got is None
    again = request_flow()
    c.requestheaders(again)
    assert again.response is None and "If-None-Match" not in again.request.headers  # a miss, not a revalidation


def test_a_304_never_puts_fields_it_names_no_cache_into_the_shared_entry(cache):
    """RFC 9111 3.2: the fields 3.1 keeps out of storage stay out when a 304 updates the stored ones."""
    c, _ = cache
    own, got = per_user_answer(c, "GET", {"Cookie": "sid=ALICE"}, 304, {
        "ETag": '"v1"', "Cache-Control": 'max-age=600, no-cache="Set-Cookie, X-User"',
        "Set-Cookie": "sid=ALICE-SESSION", "X-User": "alice", "X-Build": "2", "Connection": "X-Hop", "X-Hop": "1"})
    assert got is not None and got.content == b"page" and got.headers["X-Build"] == "2"  # freshened
    assert "Set-Cookie" not in got.headers and "X-User" not in got.headers
    # the user whose request reached the origin gets the whole updated response
    assert own.content == b"page" and own.headers["Set-Cookie"] == "sid=ALICE-SESSION"
    assert own.headers["X-User"] == "alice" and own.headers["X-Build"] == "2" and "X-Hop" not in own.headers


def test_with_hit_set_cookie_false_a_revalidated_answer_carries_no_cookie_as_from_squid(tmp_path):
    c = cachemod.Cache()
    with taddons.context(c) as tctx:
        tctx.configure(c, cache_dir="none", hit_set_cookie=False)
        own, got = per_user_answer(c, "GET", {}, 304, {"ETag": '"v1"', "Cache-Control": "max-age=600",
                                                      "Set-Cookie": "sid=NEW", "X-Build": "2"})
        assert "Set-Cookie" not in own.headers and own.headers["X-Build"] == "2"
        assert "Set-Cookie" not in got.headers
    c.done()


@pytest.mark.parametrize("method, status", [("GET", 304), ("HEAD", 200)])
@pytest.mark.parametrize("cc", ["private, max-age=600", "no-store"])
def test_a_304_or_head_saying_private_or_no_store_drops_the_shared_entry(cache, method, status, cc):
    """RFC 9111 3.5, 5.2.2.7: a response a shared cache may not store does not update (and so keep
    serving) a stored one: Alice's personal answer never reaches Bob."""
    c, _ = cache
    resp = {"ETag": '"v1"', "Cache-Control": cc, "Set-Cookie": "sid=ALICE-SESSION", "X-User": "alice"}
    req = {"Authorization": "Basic YWxpY2U6eA=="} if method == "HEAD" else {}
    if method == "HEAD":  # a reload (the stored GET is fresh): the origin's 200 to the HEAD freshens it
        req["Cache-Control"] = "no-cache"
        resp["Content-Length"] = "4"
    _, got = per_user_answer(c, method, req, status, resp, cc="max-age=600" if method == "HEAD" else "max-age=1")
    assert got is None


def test_a_refresh_answered_with_a_5xx_keeps_the_stale_entry_for_stale_if_error(cache):
    _, after = refresh_against(cache, lambda conn: conn.sendall(
        b"HTTP/1.1 503 Unavailable\r\nContent-Length: 4\r\n\r\ndown"),
        cc="max-age=60, stale-while-revalidate=60, stale-if-error=600")
    assert after is not None and after.body == b"old body"


@pytest.mark.parametrize("field", ["User-Agent", "Accept-Encoding"])
def test_a_refresh_sends_no_field_the_stored_variant_was_chosen_without(cache, field):
    """urllib's own User-Agent and http.client's own Accept-Encoding are not sent: the origin varies on them."""
    got, after = refresh_against(cache, lambda conn: conn.sendall(
        b'HTTP/1.1 304 Not Modified\r\nETag: "v1"\r\nCache-Control: max-age=600\r\n\r\n'), vary=field)
    assert got.startswith(b"GET /swr") and field.lower().encode() not in got.lower()
    assert after.meta.lifetime == 600  # refreshed


def test_a_variant_chosen_without_a_field_urllib_always_sends_is_not_refreshed_in_the_background(cache):
    c, _ = cache
    got, after = refresh_against(cache, lambda conn: None, vary="Connection")
    assert got == b"" and not c.refreshing


def test_a_response_to_a_request_of_unknown_date_is_stored_after_a_clear(cache):
    c, _ = cache
    c.clear()
    f = stored_flow("http://example.com/undated", body=b"kept")
    f.request.timestamp_start = None
    c.response(f)
    g = request_flow("http://example.com/undated")
    c.requestheaders(g)
    assert g.response is not None and g.response.content == b"kept"


@pytest.mark.parametrize("change", ["purge", "clear", "post"])
def test_an_answer_to_a_request_made_before_an_invalidation_is_not_stored(cache, change):
    """A response that was on its way while its URL was purged, cleared or invalidated by an unsafe
    method may be the old one: it is served, not stored. One asked for afterwards is stored."""
    c, tctx = cache
    url = "http://example.com/inflight"
    before = stored_flow(url, body=b"old")  # its request is made now
    time.sleep(0.01)
    if change == "purge":
        c.purge(url)
    elif change == "clear":
        c.clear()
    else:
        post = stored_flow(url, body=b"")
        post.request.method = "POST"
        c.responseheaders(post)  # (invalidated there, as soon as the status is known)
        c.response(post)
    c.response(before)
    f = request_flow(url)
    c.requestheaders(f)
    assert f.response is None  # the old answer was not stored
    after = stored_flow(url, body=b"new")
    c.response(after)
    f = request_flow(url)
    c.requestheaders(f)
    assert f.response is not None and f.response.content == b"new"


def test_an_invalidation_time_ahead_of_the_clock_does_not_stop_storing(cache):
    """The clock was set back after a purge: answers are stored again at once, not once the clock
    has caught up."""
    c, _ = cache
    url = "http://example.com/clock"
    c.purge(url)
    c.invalidated["http://example.com:80/clock"] = time.time() + 3600
    c.response(stored_flow(url, body=b"stored"))
    f = request_flow(url)
    c.requestheaders(f)
    assert f.response is not None and f.response.content == b"stored"


def test_a_refresh_answered_304_with_another_vary_drops_the_stored_response(cache):
    _, after = refresh_against(cache, lambda conn: conn.sendall(
        b'HTTP/1.1 304 Not Modified\r\nETag: "v1"\r\nVary: User-Agent\r\nCache-Control: max-age=600\r\n\r\n'),
        vary="Accept-Encoding")
    assert after is None


@pytest.mark.parametrize("text,line,reason", [
    ('refresh_patterns:\n  - ". 0 10% 60"\n', 1, "unknown key 'refresh_patterns'"),
    ("- a\n- b\n", 1, "a cache policy is a mapping"),
    ('refresh_pattern: ". 0 10% 60"\n', 1, "refresh_pattern must be a list"),
    ('refresh_pattern:\n  - ". 0 10% 60"\n  - "( 1 1% 1"\n', 3, "bad regex"),
    ("refresh_pattern:\n  - {a: 1}\n", 2, "a refresh_pattern rule is a string"),
    ('refresh_pattern:\n  - ". nan 10% 60"\n', 2, "finite numbers"),
    ('refresh_pattern:\n  - ". 60 10% 1"\n', 2, "min (60) is more than max (1)"),
    ('refresh_pattern:\n  - ". 0 10% 60 override-expire"\n', 2, "option 'override-expire' is not supported"),
    ("targeted_fields: []\ntargeted_fields: []\n", 2, "duplicate key 'targeted_fields'"),
    ("targeted_fields: [a b]\n", 1, "targeted_fields must be a list of header field names"),
    ("cache: deny QUERY\n", 1, "cache must be a list of rules"),
    ('cache:\n  - "refuse QUERY"\n', 2, 'cache: a rule is "allow" or "deny" and one or more acl names'),
    ('send_hit:\n  - "deny"\n', 2, 'send_hit: a rule is "allow" or "deny"'),
    ('store_miss:\n  - "allow a"\n  - "deny b/c"\n', 3, "store_miss: bad acl name 'b/c'"),
    ("cache:\n  - {deny: QUERY}\n", 2, 'cache: a rule is a string such as "deny QUERY"'),
])
def test_a_broken_cache_policy_is_refused_with_its_file_line_and_reason(tmp_path, text, line, reason):
    pol = tmp_path / "cache.yaml"
    pol.write_text(text)
    c = cachemod.Cache()
    with taddons.context(c) as tctx:
        with pytest.raises(exceptions.OptionsError) as e:
            tctx.configure(c, cache_dir="none", cache_policy=str(pol))
        assert f"cache_policy: {pol}:{line}: " in str(e.value) and reason in str(e.value), str(e.value)
    c.done()


def test_a_cache_policy_that_is_not_utf8_is_refused_by_name_and_a_failed_reload_keeps_the_rules(tmp_path):
    good, bad = tmp_path / "good.yaml", tmp_path / "bad.yaml"
    good.write_text('refresh_pattern:\n  - "^http://a/ 5 10% 60"\n')
    bad.write_bytes(b"refresh_pattern:\n  - \"\xff\xfe 0 10% 60\"\n")
    c = cachemod.Cache()
    with taddons.context(c) as tctx:
        tctx.configure(c, cache_dir="none", cache_policy=str(good))
        with pytest.raises(exceptions.OptionsError, match=f"cache_policy: cannot read '{bad}'"):
            tctx.configure(c, cache_policy=str(bad))
        assert [r.pattern for r in c.rules] == ["^http://a/"] and c.policy_file == str(good)
    c.done()


def test_a_cache_dir_set_live_that_cannot_be_opened_is_refused(tmp_path):
    """At start-up an unusable cache_dir leaves a RAM cache (the proxy must start); set live, it is refused,
    so that mitmproxy keeps the one that works."""
    c = cachemod.Cache()
    with taddons.context(c) as tctx:
        tctx.configure(c, cache_dir=str(tmp_path / "c"))
        assert c.store.disk is not None
        with pytest.raises(exceptions.OptionsError, match="cache_dir: cannot open '/proc/relais-cache'"):
            tctx.configure(c, cache_dir="/proc/relais-cache")
    c.done()


def _reload_setup(cache, cc="max-age=60", **options):
    c, tctx = cache
    tctx.configure(c, reload_into_ims=True, **options)
    f = stored_flow("http://example.com/rl", cc=cc)
    f.response.headers["ETag"] = '"v1"'
    c.response(f)
    return c


def _answer(c, f, status, body=b"", **headers):
    f.response = tutils.tresp(status_code=status)
    f.response.headers.clear()
    for k, v in headers.items():
        f.response.headers[k.replace("_", "-")] = v
    f.response.set_content(body)
    f.response.timestamp_start = time.time()
    c.responseheaders(f)
    c.response(f)


def test_a_revalidated_reload_is_counted_once_as_a_refresh(cache):
    c = _reload_setup(cache)
    f = request_flow("http://example.com/rl", Cache_Control="no-cache")
    c.requestheaders(f)
    assert f.request.headers.get("If-None-Match") == '"v1"'  # revalidated, not fetched whole
    _answer(c, f, 304, ETag='"v1"', Cache_Control="max-age=60")
    assert f.metadata[meta.CODE] == "TCP_REFRESH_UNMODIFIED"
    assert c.counts["reload"] == 0 and c.counts["TCP_REFRESH_UNMODIFIED"] == 1


@pytest.mark.parametrize("options, cc", [({"max_stale": 3600}, "max-age=60"), ({}, "max-age=60, stale-if-error=60")])
def test_a_revalidated_reload_gets_the_origins_error_not_the_stored_copy(cache, options, cc):
    """The client asked for no stored copy (no-cache): stale-if-error and max_stale are not its say."""
    c = _reload_setup(cache, cc=cc, **options)
    f = request_flow("http://example.com/rl", Cache_Control="no-cache")
    c.requestheaders(f)
    _answer(c, f, 503, b"down")
    assert f.response.status_code == 503 and f.response.content == b"down"
    g = request_flow("http://example.com/rl", Cache_Control="no-cache, stale-if-error=60")  # unless it says so
    c.requestheaders(g)
    _answer(c, g, 503, b"down")
    assert g.response.status_code == 200 and g.metadata[meta.CODE] == "TCP_REFRESH_FAIL_OLD"


def test_no_cache_with_only_if_cached_is_a_504(cache):
    c = _reload_setup(cache)
    f = request_flow("http://example.com/rl", Cache_Control="no-cache, only-if-cached")
    c.requestheaders(f)
    assert f.response is not None and f.response.status_code == 504


@pytest.mark.parametrize("rules,acls,allowed", [
    ([], [], True),                                             # no rules: everything allowed
    (["deny QUERY"], ["QUERY", "all"], False),
    (["deny QUERY"], ["all"], True),                             # none applies: the opposite of the last
    (["allow lan"], ["all"], False),
    (["allow lan !CONNECT", "deny all"], ["lan", "all"], True),  # all terms of a line must hold
    (["allow lan !CONNECT", "deny all"], ["lan", "CONNECT", "all"], False),
    (["deny a", "allow b", "deny all"], ["a", "b"], False),      # the first line that applies decides
])
def test_access_rules_are_judged_as_squid_judges_an_access_list(rules, acls, allowed):
    parsed = [cachemod.parse_access_rule(r) for r in rules]
    assert cachemod.access_allows(parsed, acls)[0] is allowed


def test_cache_rules_say_in_the_flow_comment_which_rule_kept_the_cache_out(tmp_path):
    pol = tmp_path / "cache.yaml"
    pol.write_text('cache:\n  - "deny QUERY"\nsend_hit:\n  - "deny nohit"\n')
    c = cachemod.Cache()
    with taddons.context(c) as tctx:
        tctx.configure(c, cache_dir="none", cache_policy=str(pol))
        c.response(stored_flow(url="http://example.com/q"))  # no acl list: not stored
        f = request_flow(url="http://example.com/q")
        f.metadata[meta.ACLS] = ["all"]
        c.requestheaders(f)
        assert f.response is None
        stored = stored_flow(url="http://example.com/q")
        stored.metadata[meta.ACLS] = ["QUERY", "all"]
        c.response(stored)
        assert stored.comment == "cache: not cached (cache deny QUERY)"
        stored.metadata[meta.ACLS] = ["all"]
        c.response(stored)
        f = request_flow(url="http://example.com/q")
        f.metadata[meta.ACLS] = ["nohit", "all"]
        c.requestheaders(f)
        assert f.response is None and f.comment == "cache: not served from the cache (send_hit deny nohit)"
        f = request_flow(url="http://example.com/q")
        f.metadata[meta.ACLS] = ["all"]
        c.requestheaders(f)
        assert f.response is not None and f.metadata[meta.CODE] == "TCP_MEM_HIT"
    c.done()


SQUID_CONF = """# a squid.conf: the cache policy reads its refresh_pattern, cache, send_hit and store_miss lines
http_port 3128
acl QUERY urlpath_regex \\?
cache deny QUERY   # no answers from the cache for queries
send_hit deny \\
    nohit
refresh_pattern ^ftp:		1440	20%	10080
refresh_pattern -i (/cgi-bin/|\\?) 0	0%	0
store_miss deny !localnet CONNECT
"""


def test_a_squid_conf_gives_the_cache_its_refresh_patterns_and_rules(tmp_path):
    conf = tmp_path / "squid.conf"
    conf.write_text(SQUID_CONF)
    c = cachemod.Cache()
    with taddons.context(c) as tctx:
        tctx.configure(c, cache_dir="none", cache_policy=str(conf))
        assert [(r.pattern, r.min, r.percent, r.max) for r in c.rules] == [
            ("^ftp:", 1440 * 60, 0.2, 10080 * 60), ("(/cgi-bin/|\\?)", 0, 0, 0)]
        assert {k: [(r.text, r.line) for r in v] for k, v in c.access.items()} == {
            "cache": [("deny QUERY", 4)], "send_hit": [("deny nohit", 6)],
            "store_miss": [("deny !localnet CONNECT", 9)]}
        assert c.targets == ("cdn-cache-control",)
    c.done()


def test_a_squid_conf_refresh_pattern_is_read_without_the_options_that_break_rfc_9111(tmp_path, caplog):
    conf = tmp_path / "squid.conf"
    conf.write_text("refresh_pattern -i \\.(gif|png)$ 1440 90% 43200 override-expire ignore-no-store\n")
    c = cachemod.Cache()
    with taddons.context(c) as tctx:
        tctx.configure(c, cache_dir="none", cache_policy=str(conf))
        assert [(r.pattern, r.min, r.percent, r.max) for r in c.rules] == [("\\.(gif|png)$", 1440 * 60, 0.9, 43200 * 60)]
    assert f"{conf}:1: refresh_pattern options not supported, ignored" in caplog.text and "override-expire ignore-no-store" \
        in caplog.text
    c.done()


@pytest.mark.parametrize("line,reason", [
    ("refresh_pattern . 0 20%", "refresh_pattern needs: [-i] regex min percent max"),
    ("cache maybe QUERY", 'cache: a rule is "allow" or "deny"'),
    ("store_miss deny", 'store_miss: a rule is "allow" or "deny"'),
])
def test_a_squid_conf_mistake_is_refused_with_its_line(tmp_path, line, reason):
    conf = tmp_path / "squid.conf"
    conf.write_text(f"http_port 3128\nacl QUERY urlpath_regex \\?\n{line}\n")
    c = cachemod.Cache()
    with taddons.context(c) as tctx:
        with pytest.raises(exceptions.OptionsError) as e:
            tctx.configure(c, cache_dir="none", cache_policy=str(conf))
        assert f"cache_policy: {conf}:3: {reason}" in str(e.value), str(e.value)
    c.done()


def rules_cache(tmp_path, text):
    pol = tmp_path / "cache.yaml"
    pol.write_text(text)
    c = cachemod.Cache()
    return c, pol


def with_acls(f, *acls):
    f.metadata[meta.ACLS] = list(acls)
    return f


def test_store_miss_deny_starts_no_background_refresh_and_leads_no_collapse(tmp_path):
    c, pol = rules_cache(tmp_path, 'store_miss:\n  - "deny nostore"\n')
    started = []
    c._refresh_in_background = lambda key, entry, flow: started.append(key)

    async def run():
        with taddons.context(c) as tctx:
            tctx.configure(c, cache_dir="none", cache_policy=str(pol))
            s = with_acls(stored_flow(url="http://example.com/swr", cc="max-age=1, stale-while-revalidate=600"), "all")
            s.request.timestamp_start = s.response.timestamp_start = time.time() - 10
            c.response(s)
            f = with_acls(request_flow(url="http://example.com/swr"), "nostore", "all")
            c.requestheaders(f)
            assert f.metadata[meta.CODE] == "TCP_MEM_HIT" and started == []  # served stale; not refreshed
            f = with_acls(request_flow(url="http://example.com/swr"), "all")
            c.requestheaders(f)
            assert started == ["http://example.com:80/swr"]
            leader = with_acls(request_flow(url="http://example.com/c"), "nostore", "all")
            assert c.requestheaders(leader) is None and c.inflight == {}  # others do not wait for it
    asyncio.run(run())
    c.done()


def test_cache_rules_keep_remembered_failures_out_too(tmp_path):
    c, pol = rules_cache(tmp_path, 'cache:\n  - "deny nocache"\n')
    with taddons.context(c) as tctx:
        tctx.configure(c, cache_dir="none", cache_policy=str(pol))
        f = with_acls(request_flow(url="http://down.example/x"), "nocache", "all")
        c.requestheaders(f)
        f.response = tutils.tresp(status_code=503)
        f.metadata[meta.LOCAL], f.metadata[meta.ERROR] = "errors", "ERR_CONNECT_FAIL"
        c.response(f)
        assert c.failures == {}  # a denied request's failure is not remembered
        f = with_acls(request_flow(url="http://down.example/x"), "all")
        c.requestheaders(f)
        f.response = tutils.tresp(status_code=503)
        f.metadata[meta.LOCAL], f.metadata[meta.ERROR] = "errors", "ERR_CONNECT_FAIL"
        c.response(f)
        assert list(c.failures) == ["http://down.example:80"]
        for method in ("GET", "POST"):
            denied = with_acls(request_flow(url="http://down.example/y", method=method), "nocache", "all")
            c.requestheaders(denied)
            assert denied.response is None, method  # goes to the origin, not TCP_NEGATIVE_HIT
            allowed = with_acls(request_flow(url="http://down.example/y", method=method), "all")
            c.requestheaders(allowed)
            assert allowed.metadata[meta.CODE] == "TCP_NEGATIVE_HIT", method
    c.done()


@pytest.mark.parametrize("text", ['store_miss:\n  - "deny x"\n', 'send_hit:\n  - "deny x"\n'])
def test_without_an_acl_list_any_rules_keep_the_cache_out_entirely(tmp_path, caplog, text):
    c, pol = rules_cache(tmp_path, text)
    with taddons.context(c) as tctx:
        tctx.configure(c, cache_dir="none", cache_policy=str(pol))
        c.response(stored_flow(url="http://example.com/a"))
        c.response(with_acls(stored_flow(url="http://example.com/b"), "all"))
        a, b = request_flow(url="http://example.com/a"), request_flow(url="http://example.com/b")
        c.requestheaders(a)
        c.requestheaders(b)
        assert a.response is None and b.response is None  # neither stored (a) nor served (b)
    assert caplog.text.count("is the acl addon loaded") == 1
    c.done()


def test_a_head_the_rules_keep_from_the_cache_gets_the_origins_answer_and_invalidates_the_stored_get(tmp_path):
    """RFC 9111 4.3.5 lets a HEAD's 200 update or invalidate the stored GET; when the rules forbid answering
    from the cache, the origin's answer goes to the client and the stored GET is dropped, as Squid does."""
    c, pol = rules_cache(tmp_path, 'send_hit:\n  - "deny nohit"\n')
    with taddons.context(c) as tctx:
        tctx.configure(c, cache_dir="none", cache_policy=str(pol))
        s = with_acls(stored_flow(url="http://example.com/h"), "all")
        s.response.headers["ETag"] = '"v1"'
        s.response.headers["X-Stored"] = "old"
        c.response(s)
        head = with_acls(request_flow(url="http://example.com/h", method="HEAD"), "nohit", "all")
        c.requestheaders(head)
        assert head.response is None
        head.response = tutils.tresp(status_code=200)
        head.response.headers.clear()
        head.response.headers.update({"ETag": '"v1"', "Cache-Control": "max-age=60", "X-Stored": "new"})
        c.response(head)
        assert head.response.headers["X-Stored"] == "new" and meta.CODE not in head.metadata  # the origin's
        get = with_acls(request_flow(url="http://example.com/h"), "all")
        c.requestheaders(get)
        assert get.response is None and c.counts["invalidated"] == 1
    c.done()


@pytest.mark.parametrize("value", ["false", "0", '""', "{}"])
def test_a_rule_list_that_is_not_a_list_is_refused(tmp_path, value):
    c, pol = rules_cache(tmp_path, f"cache: {value}\n")
    with taddons.context(c) as tctx:
        with pytest.raises(exceptions.OptionsError, match=":1: cache must be a list of rules"):
            tctx.configure(c, cache_dir="none", cache_policy=str(pol))
    c.done()


def test_the_cache_policy_is_reloaded_when_its_file_changes_and_a_broken_one_keeps_the_last_good(tmp_path, caplog):
    caplog.set_level("INFO")
    pol = tmp_path / "cache.yaml"
    pol.write_text('refresh_pattern:\n  - ". 0 10% 60"\n')
    c = cachemod.Cache()
    with taddons.context(c) as tctx:
        tctx.configure(c, cache_dir="none", cache_policy=str(pol))
        assert c.access == {}
        pol.write_text('refresh_pattern:\n  - ". 0 10% 60"\ncache:\n  - "deny all"\n')
        c.watch.next = 0  # (a second later)
        c.requestheaders(with_acls(request_flow(), "all"))
        assert [r.text for r in c.access["cache"]] == ["deny all"] and "cache: policy reloaded" in caplog.text
        pol.write_text('cache:\n  - "deny all"\n  - "perhaps"\n')
        with pytest.raises(exceptions.CommandError, match=f"kept the previous policy: cache_policy: {pol}:3"):
            c.reload()
        c.watch.next = 0
        c.requestheaders(with_acls(request_flow(), "all"))  # the same broken file is not tried again
        assert caplog.text.count("policy not reloaded") == 1
        assert [r.text for r in c.access["cache"]] == ["deny all"] and c.policy_file == str(pol)
        tctx.configure(c, cache_policy="none")
        assert c.access == {} and c.policy_file is None
    c.done()


def test_a_relative_cache_policy_stays_that_file_while_it_is_replaced(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "policies").mkdir()
    mine = tmp_path / "policies" / "cache.yaml"  # the same relative name as the shipped policy
    mine.write_text('cache:\n  - "deny all"\n')
    c = cachemod.Cache()
    with taddons.context(c) as tctx:
        tctx.configure(c, cache_dir="none", cache_policy="policies/cache.yaml")
        assert c.policy_file == str(mine) and "cache" in c.access
        mine.unlink()  # an editor replacing the file
        c.watch.next = 0
        c.requestheaders(with_acls(request_flow(), "all"))
        assert c.policy_file == str(mine) and "cache" in c.access and "not reloaded" not in caplog.text
        mine.write_text("[" * 5000)  # nested too deep for the YAML parser: still an error that names the file
        with pytest.raises(exceptions.CommandError, match=f"kept the previous policy: cache_policy: {mine}: nested"):
            c.reload()
        assert "cache" in c.access
    c.done()


def test_a_refresh_whose_new_response_the_rules_keep_out_drops_the_superseded_copy(tmp_path):
    c, pol = rules_cache(tmp_path, 'store_miss:\n  - "deny nostore"\n')
    with taddons.context(c) as tctx:
        tctx.configure(c, cache_dir="none", cache_policy=str(pol))
        s = with_acls(stored_flow(url="http://example.com/x", cc="max-age=1"), "all")
        s.response.headers["ETag"] = '"v1"'
        s.request.timestamp_start = s.response.timestamp_start = time.time() - 10
        c.response(s)
        f = with_acls(request_flow(url="http://example.com/x"), "nostore", "all")
        c.requestheaders(f)
        assert f.response is None and f.request.headers["If-None-Match"] == '"v1"'  # revalidated
        f.response = tutils.tresp(status_code=200)  # a new version, which store_miss keeps out
        c.response(f)
        assert f.metadata[meta.CODE] == "TCP_REFRESH_MODIFIED" and c.counts["invalidated"] == 1
        g = with_acls(request_flow(url="http://example.com/x"), "all")
        c.requestheaders(g)
        assert g.response is None and "If-None-Match" not in g.request.headers  # a plain miss now, as in Squid
    c.done()


@pytest.mark.parametrize("fields", [0, 12])
def test_cache_mem_bounds_the_memory_the_ram_tier_really_takes(fields):
    """cache_mem counts what entries take in the proxy, hits' encoded fields included, not only
    their bytes on the wire: 1 KB objects once took more than twice cache_mem."""
    import gc
    import tracemalloc
    limit = 1 << 20
    c = cachemod.Cache()
    with taddons.context(c) as tctx:
        tctx.configure(c, cache_dir="none", cache_mem=str(limit))
        urls = [f"http://example.com/small?n={i}" for i in range(3000)]  # far more than fit
        gc.collect()
        tracemalloc.start()
        try:
            for url in urls:
                f = stored_flow(url=url, cc="max-age=600", body=b"x" * 1000)
                for k in range(fields):
                    f.response.headers[f"X-Field-{k}"] = f"value {k} of a response field"
                c.response(f)
            for url in urls:  # a hit each, for those still in RAM
                c.requestheaders(request_flow(url))
            del f
            gc.collect()
            held = tracemalloc.get_traced_memory()[0]
            mem = c.store.mem
            assert len(mem.items) < len(urls) and 0.9 * limit < mem.bytes <= limit  # full, and evicting
            mem.clear()
            gc.collect()
            entries = held - tracemalloc.get_traced_memory()[0]  # what the RAM tier's entries took
        finally:
            tracemalloc.stop()
        assert entries <= 1.05 * limit, entries
    c.done()


def test_a_squid_conf_include_is_followed_and_its_mistakes_are_refused_with_their_file_and_line(tmp_path):
    conf = tmp_path / "squid.conf"
    extra = tmp_path / "extra.conf"
    extra.write_text("refresh_pattern -i \\.css$ 60 50% 600\ncache deny QUERY\n")
    conf.write_text("acl QUERY urlpath_regex \\?\ninclude extra.conf\nrefresh_pattern . 0 20% 4320\n")
    c = cachemod.Cache()
    with taddons.context(c) as tctx:
        tctx.configure(c, cache_dir="none", cache_policy=str(conf))
        assert [r.pattern for r in c.rules] == ["\\.css$", "."]  # in the order Squid reads them
        assert [(r.text, r.line) for r in c.access["cache"]] == [("deny QUERY", 2)]
        extra.write_text("cache maybe QUERY\n")
        with pytest.raises(exceptions.OptionsError) as e:
            tctx.configure(c, cache_policy=str(tmp_path / "squid.conf "))  # (a new value: read anew)
        assert f"cache_policy: {extra}:1: cache: a rule is" in str(e.value), str(e.value)
        extra.unlink()
        with pytest.raises(exceptions.OptionsError) as e:
            tctx.configure(c, cache_policy=str(conf))
        assert f"cache_policy: {conf}:2: include: cannot read {extra}" in str(e.value), str(e.value)
    c.done()


def test_the_cache_policy_watch_sees_new_included_files_and_the_fix_of_a_refused_include(tmp_path, caplog):
    import os

    def touch(p, n):  # a new mtime whatever the file system's resolution
        os.utime(p, ns=(os.stat(p).st_mtime_ns + n * 10**9,) * 2)

    def ask(c):  # a request, a second after the last look at the files
        c.watch.next = 0
        c.requestheaders(with_acls(request_flow(), "all"))
        return {k: [r.text for r in v] for k, v in c.access.items()}

    (tmp_path / "conf.d").mkdir()
    (tmp_path / "conf.d" / "10.conf").write_text("refresh_pattern . 0 20% 4320\n")
    conf = tmp_path / "squid.conf"
    conf.write_text("include conf.d/*.conf\n")
    c = cachemod.Cache()
    with taddons.context(c) as tctx:
        tctx.configure(c, cache_dir="none", cache_policy=str(conf))
        assert ask(c) == {}
        (tmp_path / "conf.d" / "20.conf").write_text("cache deny all\n")
        touch(tmp_path / "conf.d", 1)
        assert ask(c) == {"cache": ["deny all"]}  # the file added beside the glob's others
        conf.write_text(conf.read_text() + "include extra.conf\n")  # not there yet: refused
        touch(conf, 2)
        assert ask(c) == {"cache": ["deny all"]} and caplog.text.count("policy not reloaded") == 1
        assert ask(c) == {"cache": ["deny all"]} and caplog.text.count("policy not reloaded") == 1
        (tmp_path / "extra.conf").write_text("send_hit deny all\n")
        assert ask(c) == {"cache": ["deny all"], "send_hit": ["deny all"]}
    c.done()


def test_a_streamed_copy_that_cannot_be_written_is_dropped_logged_and_the_chunks_still_go(tmp_path, caplog):
    class FullDisk:
        name = str(tmp_path / "body-x")

        def write(self, chunk):
            raise OSError(28, "No space left on device")

        def close(self):
            pass
    (tmp_path / "body-x").write_bytes(b"")
    copy = cachemod.StreamCopy(FullDisk(), 1000, None)
    cachemod.cachestore._WARNED.said.clear()
    assert copy(b"abc") == b"abc" and copy(b"def") == b"def"
    assert not copy.finish() and not (tmp_path / "body-x").exists()
    assert "No space left on device" in caplog.text

    class FullAtClose(FullDisk):  # the buffered bytes meet the full disk when the file is closed
        def write(self, chunk):
            return len(chunk)

        def close(self):
            raise OSError(27, "File too large")
    (tmp_path / "body-x").write_bytes(b"")
    cachemod.cachestore._WARNED.said.clear()
    copy = cachemod.StreamCopy(FullAtClose(), 1000, None)
    assert copy(b"abc") == b"abc"
    assert not copy.finish() and not (tmp_path / "body-x").exists()
    assert "File too large" in caplog.text
