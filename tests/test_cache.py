"""End-to-end tests of the cache: a real mitmdump running addons/all.py, a counting origin, curl.

Most tests share one proxy (module scope) and use their own origin, so their
keys never collide; tests that need other options start their own proxy.
"""
from __future__ import annotations

import email.utils
import json
import os
import signal
import socket
import threading
import time
from pathlib import Path

import pytest

from harness import (CLOSE, RESET, ROOT, Origin, Proxy, cache_rows, closed_port, curl, curl_status, peak_rss_mb,
                     scripted_server, wait_stored)

ETAG = '"v1"'
LM = "Mon, 02 Nov 2026 10:00:00 GMT"


@pytest.fixture(scope="module")
def cproxy(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cacheproxy")
    # max_stale 0: stale copies only where the origin or the client allows them (stale-if-error,
    # max-stale), which the tests below check; Squid's default (a week) has its own test
    p = Proxy(tmp, options={"cache_dir": str(tmp / "cache"), "negative_ttl": 30, "max_stale": 0})
    yield p
    p.stop()


def fetch(proxy, url, *args, head=False):
    """(status, headers, body) of one request through the proxy."""
    r = curl("-I" if head else "-i", "-x", proxy.url, *args, url)
    raw = r.stdout
    head_part, _, body = raw.partition(b"\r\n\r\n")
    lines = head_part.decode("latin-1").split("\r\n")
    assert lines and lines[0].startswith("HTTP/"), (raw[:300], r.stderr)
    headers: dict[str, str] = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers.setdefault(k.strip().lower(), v.strip())
    return int(lines[0].split()[1]), headers, body


def codes(proxy, url_part: str, n: int, timeout: float = 10) -> list[str]:
    """The 'CODE/status' fields of the access-log lines about url_part, waiting for n of them."""
    end = time.monotonic() + timeout
    found: list[str] = []
    while time.monotonic() < end:
        lines = proxy.log_lines(1, timeout=0.1)
        found = [l.split()[3] for l in lines if f" {url_part} " in l or f" {url_part}?" in l]
        if len(found) >= n:
            return found
        time.sleep(0.05)
    return found


def lines_for(proxy, url_part: str) -> list[str]:
    return [l for l in proxy.log_lines(1, timeout=0.5) if f" {url_part} " in l or f" {url_part}?" in l]


def conditional_route(origin, path, *, cc="max-age=60", etag=ETAG, lm=LM, body=b"payload", extra=None):
    """A route answering 304 to a matching If-None-Match / If-Modified-Since."""
    state = {"etag": etag, "body": body, "cc": cc}

    def fn(seen):
        headers = {"Content-Type": "text/plain", "Cache-Control": state["cc"], "ETag": state["etag"],
                   "Last-Modified": lm, **(extra or {})}
        if seen.headers.get("if-none-match") == state["etag"]:
            return 304, headers, b""
        return 200, headers, state["body"]
    origin.route(path, fn)
    return state


# --- basics: MISS, MEM_HIT, HEAD, conditionals -----------------------------------

def test_miss_then_mem_hit(cproxy, origin):
    url = f"{origin.url}/a?h.Cache-Control=max-age=60"
    s1, h1, b1 = fetch(cproxy, url)
    s2, h2, b2 = fetch(cproxy, url)
    assert (s1, b1) == (s2, b2) == (200, b"hello /a")
    assert origin.hits["/a"] == 1
    assert h1["x-cache"].startswith("MISS") and h2["x-cache"].startswith("HIT")
    assert "age" in h2
    assert codes(cproxy, f"{origin.url}/a", 2) == ["TCP_MISS/200", "TCP_MEM_HIT/200"]
    miss, hit = lines_for(cproxy, f"{origin.url}/a")
    assert "HIER_DIRECT/127.0.0.1" in miss and "HIER_NONE/-" in hit


def test_connection_header_from_origin_is_stored_without_what_it_lists(cproxy, origin):
    def route(seen):
        return 200, {"Connection": "keep-alive, x-hop", "X-Hop": "1", "X-End": "2",
                     "Cache-Control": "max-age=60"}, b"conn"
    origin.route("/conn", route)
    fetch(cproxy, f"{origin.url}/conn")
    s2, h2, b2 = fetch(cproxy, f"{origin.url}/conn")
    assert (s2, b2, origin.hits["/conn"]) == (200, b"conn", 1)
    assert h2["x-end"] == "2" and "x-hop" not in h2


def test_head_answered_from_stored_get(cproxy, origin):
    url = f"{origin.url}/size/1000?h.Cache-Control=max-age=60"
    fetch(cproxy, url)
    status, headers, body = fetch(cproxy, url, head=True)
    assert status == 200 and headers["content-length"] == "1000" and body == b""
    assert origin.hits["/size/1000"] == 1
    assert codes(cproxy, f"{origin.url}/size/1000", 2)[1] == "TCP_MEM_HIT/200"


def test_head_response_updates_the_stored_get(cproxy, origin):
    """4.3.5: a 200 to a HEAD freshens the stored GET it describes; one that describes another
    representation (another ETag) invalidates it."""
    state = {"v": "1", "cc": "max-age=1", "etag": '"a"'}

    def route(seen):
        return 200, {"Cache-Control": state["cc"], "X-V": state["v"], "ETag": state["etag"],
                     "Content-Length": "4"}, b"body"
    origin.route("/headupd", route)
    url = f"{origin.url}/headupd"
    fetch(cproxy, url)
    time.sleep(1.5)                        # stale
    state.update(v="2", cc="max-age=600")
    status, headers, _ = fetch(cproxy, url, head=True)
    assert status == 200 and headers["x-v"] == "2"
    s, h, body = fetch(cproxy, url)         # fresh again, with the HEAD's fields
    assert (s, body, h["x-v"]) == (200, b"body", "2")
    assert [r.method for r in origin.requests if r.path == "/headupd"] == ["GET", "HEAD"]
    state.update(etag='"b"', cc="max-age=0")
    time.sleep(0.1)
    fetch(cproxy, url, "-H", "Cache-Control: no-cache", head=True)   # a HEAD describing another body
    fetch(cproxy, url)
    assert [r.method for r in origin.requests if r.path == "/headupd"] == ["GET", "HEAD", "HEAD", "GET"]


def test_a_reload_of_a_head_goes_to_the_origin_as_a_miss_and_freshens_the_stored_get(cproxy, origin):
    state = {"cc": "max-age=1", "v": "1"}
    origin.route("/headreload", lambda seen: (200, {"Cache-Control": state["cc"], "ETag": '"h"', "X-V": state["v"],
                                                    "Content-Length": "4"}, b"body"))
    url = f"{origin.url}/headreload"
    fetch(cproxy, url)
    state.update(cc="max-age=600", v="2")
    status, headers, _ = fetch(cproxy, url, "-H", "Cache-Control: no-cache", head=True)
    assert (status, headers["x-v"], headers["x-cache"].split()[0]) == (200, "2", "MISS")
    time.sleep(1.5)  # the GET stored first would be stale by now; the HEAD's fields made it fresh for 600 s
    s, h, body = fetch(cproxy, url)
    assert (s, body, h["x-v"]) == (200, b"body", "2")
    assert [r.method for r in origin.requests if r.path == "/headreload"] == ["GET", "HEAD"]
    assert codes(cproxy, url, 3) == ["TCP_MISS/200", "TCP_MISS/200", "TCP_MEM_HIT/200"]


def test_client_conditionals_answered_304(cproxy, origin):
    conditional_route(origin, "/cond")
    url = f"{origin.url}/cond"
    assert fetch(cproxy, url)[0] == 200
    assert fetch(cproxy, url, "-H", "If-Modified-Since: Tue, 03 Nov 2026 10:00:00 GMT")[0] == 304
    assert fetch(cproxy, url, "-H", f"If-None-Match: {ETAG}")[0] == 304
    status, _, body = fetch(cproxy, url, "-H", 'If-None-Match: "other"')
    assert status == 200 and body == b"payload"
    assert origin.hits["/cond"] == 1
    assert codes(cproxy, url, 4)[:3] == ["TCP_MISS/200", "TCP_IMS_HIT/304", "TCP_INM_HIT/304"]


# --- revalidation ------------------------------------------------------------------

def test_client_max_age_0_revalidates_refresh_unmodified(cproxy, origin):
    conditional_route(origin, "/reval")
    url = f"{origin.url}/reval"
    fetch(cproxy, url)
    status, _, body = fetch(cproxy, url, "-H", "Cache-Control: max-age=0")
    assert (status, body) == (200, b"payload")
    assert origin.hits["/reval"] == 2
    assert origin.requests[-1].headers.get("if-none-match") == ETAG
    assert origin.requests[-1].headers.get("if-modified-since") == LM
    assert codes(cproxy, url, 2) == ["TCP_MISS/200", "TCP_REFRESH_UNMODIFIED/200"]
    assert "HIER_DIRECT/127.0.0.1" in lines_for(cproxy, url)[-1]


def test_stale_entry_refresh_unmodified_then_modified(cproxy, origin):
    state = conditional_route(origin, "/obj", cc="max-age=1")
    url = f"{origin.url}/obj"
    fetch(cproxy, url)
    time.sleep(1.3)
    assert fetch(cproxy, url)[2] == b"payload"          # 304 from origin, stored body served
    time.sleep(1.3)
    state.update(etag='"v2"', body=b"new payload", cc="max-age=60")  # fresh for the hit below, even on a slow machine
    assert fetch(cproxy, url)[2] == b"new payload"      # 200 replaces the entry
    assert fetch(cproxy, url)[2] == b"new payload"      # fresh again: a hit
    assert origin.hits["/obj"] == 3
    assert codes(cproxy, url, 4) == ["TCP_MISS/200", "TCP_REFRESH_UNMODIFIED/200",
                                     "TCP_REFRESH_MODIFIED/200", "TCP_MEM_HIT/200"]


def test_request_no_cache_goes_to_origin(cproxy, origin):
    url = f"{origin.url}/nc?h.Cache-Control=max-age=60"
    fetch(cproxy, url)
    fetch(cproxy, url, "-H", "Cache-Control: no-cache")
    fetch(cproxy, url, "-H", "Pragma: no-cache")
    assert origin.hits["/nc"] == 3
    assert codes(cproxy, f"{origin.url}/nc", 3) == ["TCP_MISS/200"] * 3


def test_reload_into_ims_validates_a_reload_instead_of_fetching_it_whole(tmp_path, origin):
    seen_conditionals = []

    def etagged(seen):
        seen_conditionals.append(seen.headers.get("if-none-match"))
        if seen.headers.get("if-none-match") == '"v1"':
            return 304, {"ETag": '"v1"', "Cache-Control": "max-age=60"}, b""
        return 200, {"ETag": '"v1"', "Cache-Control": "max-age=60"}, b"payload"
    origin.route("/rims", etagged)
    origin.route("/rims-nv", lambda seen: (200, {"Cache-Control": "max-age=60"}, b"no validator"))
    p = Proxy(tmp_path, options={"cache_dir": str(tmp_path / "cache"), "reload_into_ims": True})
    try:
        url = f"{origin.url}/rims"
        assert fetch(p, url)[2] == b"payload"
        assert fetch(p, url, "-H", "Cache-Control: no-cache")[:3:2] == (200, b"payload")
        assert fetch(p, url, "-H", "Pragma: no-cache")[:3:2] == (200, b"payload")
        assert seen_conditionals == [None, '"v1"', '"v1"']
        assert codes(p, url, 3) == ["TCP_MISS/200"] + ["TCP_REFRESH_UNMODIFIED/200"] * 2
        nv = f"{origin.url}/rims-nv"  # nothing to validate with: the reload goes to the origin whole
        for _ in range(2):
            fetch(p, nv, "-H", "Cache-Control: no-cache")
        assert codes(p, nv, 2) == ["TCP_MISS/200"] * 2
    finally:
        p.stop()


def test_heuristic_freshness_from_last_modified(cproxy, origin):
    # no explicit freshness: 10% of (Date - Last-Modified), refresh_pattern of policies/cache.yaml
    origin.route("/lm", lambda seen: (200, {"Last-Modified": "Mon, 02 Nov 2020 10:00:00 GMT"}, b"old"))
    origin.route("/lmq", lambda seen: (200, {"Last-Modified": "Mon, 02 Nov 2020 10:00:00 GMT"}, b"old"))
    for _ in range(2):
        fetch(cproxy, f"{origin.url}/lm")
        fetch(cproxy, f"{origin.url}/lmq?x=1")  # Squid's "-i (/cgi-bin/|\?) 0 0% 0": not heuristically fresh
    assert origin.hits["/lm"] == 1 and origin.hits["/lmq"] == 2


# --- what is not stored -----------------------------------------------------------------

@pytest.mark.parametrize("path,query,extra", [
    ("/nostore", "h.Cache-Control=max-age=60,no-store", ()),
    ("/private", "h.Cache-Control=max-age=60,private", ()),
    ("/auth", "h.Cache-Control=max-age=60", ("-H", "Authorization: Basic YTpi")),
    ("/plain", "", ()),                                   # no freshness, no validator
    ("/s500", "status=500", ()),                          # 5xx without explicit freshness
    ("/vstar", "h.Cache-Control=max-age=60&h.Vary=*", ()),
    ("/reqnostore", "h.Cache-Control=max-age=60", ("-H", "Cache-Control: no-store")),
])
def test_not_stored(cproxy, origin, path, query, extra):
    url = f"{origin.url}{path}?{query}"
    fetch(cproxy, url, *extra)
    fetch(cproxy, url, *extra)
    assert origin.hits[path] == 2


def test_authorization_with_public_is_stored(cproxy, origin):
    url = f"{origin.url}/authpub?h.Cache-Control=public,max-age=60"
    fetch(cproxy, url, "-H", "Authorization: Basic YTpi")
    fetch(cproxy, url, "-H", "Authorization: Basic YTpi")
    assert origin.hits["/authpub"] == 1


def test_explicit_freshness_on_5xx_is_honoured(cproxy, origin):
    url = f"{origin.url}/e503?status=503&h.Cache-Control=max-age=60"
    fetch(cproxy, url)
    assert fetch(cproxy, url)[0] == 503
    assert origin.hits["/e503"] == 1
    assert codes(cproxy, f"{origin.url}/e503", 2)[1] == "TCP_NEGATIVE_HIT/503"


# --- Vary ----------------------------------------------------------------------------------

def test_vary_secondary_keys(cproxy, origin):
    def fn(seen):
        lang = seen.headers.get("accept-language", "none")
        return 200, {"Cache-Control": "max-age=60", "Vary": "Accept-Language"}, f"lang={lang}".encode()
    origin.route("/vary", fn)
    url = f"{origin.url}/vary"
    assert fetch(cproxy, url, "-H", "Accept-Language: fr")[2] == b"lang=fr"
    assert fetch(cproxy, url, "-H", "Accept-Language: en")[2] == b"lang=en"
    assert fetch(cproxy, url, "-H", "Accept-Language: fr")[2] == b"lang=fr"
    assert fetch(cproxy, url, "-H", "Accept-Language: en")[2] == b"lang=en"
    assert fetch(cproxy, url)[2] == b"lang=none"
    assert origin.hits["/vary"] == 3
    assert codes(cproxy, url, 5) == ["TCP_MISS/200", "TCP_MISS/200", "TCP_MEM_HIT/200",
                                     "TCP_MEM_HIT/200", "TCP_MISS/200"]


# --- invalidation ------------------------------------------------------------------------------

def test_unsafe_methods_invalidate(cproxy, origin):
    url = f"{origin.url}/inv?h.Cache-Control=max-age=60"
    other = f"{origin.url}/other?h.Cache-Control=max-age=60"
    fetch(cproxy, url)
    fetch(cproxy, other)
    origin.route("/inv-post", lambda seen: (201, {"Location": "/other?h.Cache-Control=max-age=60"}, b""))
    fetch(cproxy, url, "-X", "POST", "-d", "x=1")                       # POST to the URL itself
    fetch(cproxy, f"{origin.url}/inv-post", "-X", "PUT", "-d", "y")    # Location of the same origin
    fetch(cproxy, url)
    fetch(cproxy, other)
    assert origin.hits["/inv"] == 3 and origin.hits["/other"] == 2


def test_post_response_describing_its_target_answers_later_gets(cproxy, origin):
    """RFC 9110 9.3.3: explicit freshness + Content-Location equal to the target URI."""
    def route(seen):
        headers = {"Cache-Control": "max-age=60"}
        if seen.method == "POST" and "with=" in seen.path:
            headers["Content-Location"] = seen.path
        return 200, headers, f"{seen.method} answer".encode()
    origin.route("/post-cl", route)
    for query in ("?with=1", "?without=1"):
        url = f"{origin.url}/post-cl{query}"
        fetch(cproxy, url, "-X", "POST", "-d", "x=1")
        assert fetch(cproxy, url)[2] == (b"POST answer" if query == "?with=1" else b"GET answer")
    assert [r.method for r in origin.requests if r.path.startswith("/post-cl")] == ["POST", "POST", "GET"]


def test_failed_post_does_not_invalidate(cproxy, origin):
    url = f"{origin.url}/inv2?h.Cache-Control=max-age=60"
    fetch(cproxy, url)
    fetch(cproxy, f"{origin.url}/inv2?status=500&h.Cache-Control=max-age=60", "-X", "POST", "-d", "x")
    fetch(cproxy, url)
    assert origin.hits["/inv2"] == 2  # the GET twice would be 2 only if the entry survived (1 GET + 1 POST)


# --- only-if-cached, Range ---------------------------------------------------------------------

def test_only_if_cached(cproxy, origin):
    url = f"{origin.url}/oic?h.Cache-Control=max-age=60"
    assert fetch(cproxy, url, "-H", "Cache-Control: only-if-cached")[0] == 504
    assert origin.hits.get("/oic", 0) == 0
    fetch(cproxy, url)
    assert fetch(cproxy, url, "-H", "Cache-Control: only-if-cached")[2] == b"hello /oic"
    assert codes(cproxy, f"{origin.url}/oic", 3) == ["TCP_MISS/504", "TCP_MISS/200", "TCP_MEM_HIT/200"]


def test_range_from_stored_full_response(cproxy, origin):
    url = f"{origin.url}/size/100?h.Cache-Control=max-age=60"
    status, headers, body = fetch(cproxy, url, "-H", "Range: bytes=0-9")
    assert status == 200 or status == 206  # the origin ignores Range: a full 200, stored
    status, headers, body = fetch(cproxy, url, "-H", "Range: bytes=10-19")
    assert status == 206 and body == b"x" * 10 and headers["content-range"] == "bytes 10-19/100"
    assert fetch(cproxy, url, "-H", "Range: bytes=500-")[0] == 416
    assert origin.hits["/size/100"] == 1


def ranged(representation: bytes, length_known: bool = True):
    """An origin route that answers a single byte range with a 206 (Content-Range), anything else
    with the whole representation; every answer may be stored for a minute."""
    def fn(seen):
        asked = {k.lower(): v for k, v in seen.headers.items()}.get("range")
        cc = {"Cache-Control": "max-age=60", "ETag": '"r1"'}
        if not asked:
            return 200, cc, representation
        spec = asked.split("=", 1)[1]
        first_s, last_s = spec.split("-")
        n = len(representation)
        first, last = (n - int(last_s), n - 1) if not first_s else (int(first_s), min(int(last_s or n - 1), n - 1))
        total = str(n) if length_known else "*"
        return 206, {**cc, "Content-Range": f"bytes {first}-{last}/{total}"}, representation[first:last + 1]
    return fn


def test_stored_partial_response_answers_the_ranges_it_holds(cproxy, origin):
    """RFC 9111 3.3: a 206 is kept for the ranges it holds, and never answers as the whole."""
    origin.route("/partial", ranged(b"0123456789"))
    url = f"{origin.url}/partial"

    def get(*headers):
        args = [a for h in headers for a in ("-H", h)]
        status, resp_headers, body = fetch(cproxy, url, *args)
        return status, resp_headers.get("content-range"), body
    assert get("Range: bytes=-5") == (206, "bytes 5-9/10", b"56789")
    assert get("Range: bytes=-5") == (206, "bytes 5-9/10", b"56789")  # stored
    assert get("Range: bytes=6-8") == (206, "bytes 6-8/10", b"678")
    assert get("Range: bytes=7-") == (206, "bytes 7-9/10", b"789")
    assert get("Range: bytes=-2") == (206, "bytes 8-9/10", b"89")
    assert origin.hits["/partial"] == 1
    assert get("Range: bytes=6-8", 'If-None-Match: "r0"') == (206, "bytes 6-8/10", b"678")  # the origin's to judge
    assert get("Range: bytes=0-3") == (206, "bytes 0-3/10", b"0123")  # not held: the origin's, stored instead
    assert get("Range: bytes=1-2") == (206, "bytes 1-2/10", b"12")
    assert origin.hits["/partial"] == 3
    assert get() == (200, None, b"0123456789")  # a partial response never answers for the whole
    assert get("Range: bytes=-5") == (206, "bytes 5-9/10", b"56789")  # now from the complete one
    assert origin.hits["/partial"] == 4
    assert codes(cproxy, url, 10) == ["TCP_MISS/206"] + ["TCP_MEM_HIT/206"] * 4 + ["TCP_MISS/206", "TCP_MISS/206",
                                      "TCP_MEM_HIT/206", "TCP_MISS/200", "TCP_MEM_HIT/206"]


def test_a_206_with_another_etag_to_a_revalidation_replaces_the_stored_response(cproxy, origin):
    """The stale complete response was revalidated for a range and the origin sent a 206 of another
    representation: the old one must never answer again (a resumed download would mix the two)."""
    state = {"body": b"0123456789", "etag": '"v1"', "cc": "max-age=1"}

    def route(seen):
        asked = {k.lower(): v for k, v in seen.headers.items()}.get("range")
        headers = {"Cache-Control": state["cc"], "ETag": state["etag"]}
        if not asked:
            return 200, headers, state["body"]
        first, last = (int(x) for x in asked.split("=")[1].split("-"))
        return 206, {**headers, "Content-Range": f"bytes {first}-{last}/10"}, state["body"][first:last + 1]
    origin.route("/reval-206", route)
    url = f"{origin.url}/reval-206"
    assert fetch(cproxy, url)[2] == b"0123456789"
    time.sleep(1.3)
    state.update(body=b"abcdefghij", etag='"v2"', cc="max-age=60")
    assert fetch(cproxy, url, "-H", "Range: bytes=0-2")[2] == b"abc"
    assert fetch(cproxy, url, "-H", "Range: bytes=0-2")[2] == b"abc"  # the new partial one, stored
    assert fetch(cproxy, url, "-H", "Range: bytes=5-7")[2] == b"fgh"  # not the old one's "567"
    assert codes(cproxy, url, 4)[1:] == ["TCP_REFRESH_MODIFIED/206", "TCP_MEM_HIT/206", "TCP_MISS/206"]


def test_purge_and_unsafe_methods_remove_a_partial_response_from_disk(tmp_path, origin):
    """A partial response of a resource without Vary is found on disk under its own key: PURGE and a
    POST remove it too, also after a restart."""
    p = Proxy(tmp_path, options={"cache_dir": str(tmp_path / "c"), "cache_mem": 0})
    origin.route("/partial-disk", ranged(b"0123456789"))
    url = f"{origin.url}/partial-disk"
    try:
        for how in ("PURGE", "POST", "PURGE after a restart"):
            fetch(p, url, "-H", "Range: bytes=2-4")
            wait_stored(tmp_path / "c", "/partial-disk")
            if how.endswith("restart"):
                p.stop()
                p = Proxy(tmp_path, options={"cache_dir": str(tmp_path / "c"), "cache_mem": 0})
            before = origin.hits["/partial-disk"]
            assert fetch(p, url, "-H", "Range: bytes=2-4")[2] == b"234"
            assert origin.hits["/partial-disk"] == before  # stored
            assert fetch(p, url, "-X", how.split()[0])[0] == 200
            fetch(p, url, "-H", "Range: bytes=2-4")
            assert origin.hits["/partial-disk"] == before + (2 if how == "POST" else 1), how  # gone
    finally:
        p.stop()


def test_partial_response_of_unknown_length_is_not_stored(cproxy, origin):
    origin.route("/partial-star", ranged(b"0123456789", length_known=False))
    url = f"{origin.url}/partial-star"
    for _ in range(2):
        assert fetch(cproxy, url, "-H", "Range: bytes=2-4")[2] == b"234"
    assert origin.hits["/partial-star"] == 2


# --- negative caching ---------------------------------------------------------------------------

def test_negative_caching_of_404(cproxy, origin):
    url = f"{origin.url}/status/404"
    assert fetch(cproxy, url)[0] == 404
    assert fetch(cproxy, url)[0] == 404
    assert origin.hits["/status/404"] == 1
    assert codes(cproxy, url, 2) == ["TCP_MISS/404", "TCP_NEGATIVE_HIT/404"]


def test_404_with_max_age_is_negative_hit(cproxy, origin):
    url = f"{origin.url}/status/410?h.Cache-Control=max-age=60"
    fetch(cproxy, url)
    fetch(cproxy, url)
    assert origin.hits["/status/410"] == 1
    assert codes(cproxy, f"{origin.url}/status/410", 2)[1] == "TCP_NEGATIVE_HIT/410"


def test_negative_caching_of_refused_origin(cproxy):
    with closed_port() as (port, s):
        url = f"http://127.0.0.1:{port}/down"
        s1, h1, _ = fetch(cproxy, url)
        s2, h2, _ = fetch(cproxy, f"http://127.0.0.1:{port}/other")
        assert s1 == s2 == 503
        assert h1["x-squid-error"].startswith("ERR_CONNECT_FAIL") and h2["x-squid-error"].startswith("ERR_CONNECT_FAIL")
        assert codes(cproxy, url, 1) == ["TCP_MISS/503"]
        assert codes(cproxy, f"http://127.0.0.1:{port}/other", 1) == ["TCP_NEGATIVE_HIT/503"]
        # the origin comes up, but the failure is remembered for negative_ttl
        s.listen()
        assert fetch(cproxy, url)[0] == 503
    assert codes(cproxy, url, 2)[1] == "TCP_NEGATIVE_HIT/503"


def test_a_client_reload_is_not_answered_from_a_remembered_failure(start_proxy):
    """A reload (Cache-Control: no-cache) takes nothing stored without asking the origin, a remembered
    failure included (a user retrying an origin that came back); its success ends the failure."""
    p = start_proxy(options={"cache_dir": "none"})
    with closed_port() as (port, _):
        url = f"http://127.0.0.1:{port}/back"
        assert fetch(p, url)[0] == 503
    origin = Origin(port=port)
    try:
        assert fetch(p, url)[0] == 503
        assert fetch(p, url, "-H", "Cache-Control: no-cache")[0] == 200
        assert fetch(p, f"http://127.0.0.1:{port}/other")[0] == 200
    finally:
        origin.close()
    assert codes(p, url, 3) == ["TCP_MISS/503", "TCP_NEGATIVE_HIT/503", "TCP_MISS/200"]
    assert origin.hits["/back"] == 1


def test_an_upload_to_an_origin_remembered_down_is_answered_without_holding_its_body(start_proxy, tmp_path,
                                                                                     refused_port):
    """The remembered failure answers the upload at once: its body is read and dropped as it comes
    (mitmproxy alone holds a whole body in memory before an answer given at requestheaders)."""
    p = start_proxy(options={"cache_dir": "none"})
    url = f"http://127.0.0.1:{refused_port}/"
    assert fetch(p, f"{url}first")[0] == 503
    body = tmp_path / "body.bin"
    body.write_bytes(b"x" * (64 * 1024 * 1024))
    before = peak_rss_mb(p.proc.pid)
    r = curl("-o", "/dev/null", "-w", "%{http_code}", "-x", p.url, "-H", "Expect:", "--data-binary", f"@{body}",
             f"{url}upload", timeout=60)
    assert r.stdout == b"503"
    assert peak_rss_mb(p.proc.pid) - before < 32, "the body was held in memory"
    assert codes(p, f"{url}upload", 1) == ["TCP_NEGATIVE_HIT/503"]


def test_negative_ttl_0_disables(start_proxy, origin, tmp_path, refused_port):
    p = start_proxy(options={"cache_dir": "none", "negative_ttl": 0})
    url = f"{origin.url}/status/404"
    fetch(p, url)
    fetch(p, url)
    assert origin.hits["/status/404"] == 2
    port = refused_port
    fetch(p, f"http://127.0.0.1:{port}/x")
    fetch(p, f"http://127.0.0.1:{port}/x")
    assert codes(p, f"http://127.0.0.1:{port}/x", 2) == ["TCP_MISS/503", "TCP_MISS/503"]


# --- stale-if-error -------------------------------------------------------------------------------

def test_stale_if_error_when_origin_is_down(cproxy):
    origin = Origin()
    url = f"{origin.url}/sie?h.Cache-Control=max-age=1,stale-if-error=60"
    try:
        fetch(cproxy, url)
    finally:
        origin.close()
    time.sleep(2.3)  # stale, and past the errors addon's connect_check_ttl (2 s) so it checks again
    status, headers, body = fetch(cproxy, url)
    assert (status, body) == (200, b"hello /sie")
    assert "111" in headers.get("warning", "")
    status, again, body = fetch(cproxy, url)  # the origin is remembered as down: stale again, no new attempt
    assert (status, body) == (200, b"hello /sie")
    assert headers["x-cache"] == again["x-cache"] == f"HIT from {socket.gethostname()}"  # as Squid, for both
    assert codes(cproxy, f"{origin.url}/sie", 3)[1:] == ["TCP_REFRESH_FAIL_OLD/200"] * 2


def good_then_broken(cache_control: str):
    """An origin route that answers 200 once, then 503."""
    calls = []

    def fn(seen):
        calls.append(1)
        if len(calls) == 1:
            return 200, {"Cache-Control": cache_control}, b"good"
        return 503, {"Content-Type": "text/plain"}, b"broken"
    return fn


def test_stale_if_error_on_origin_5xx(cproxy, origin):
    origin.route("/sie5", good_then_broken("max-age=1, stale-if-error=60"))
    url = f"{origin.url}/sie5"
    fetch(cproxy, url)
    time.sleep(1.3)
    assert fetch(cproxy, url)[2] == b"good"
    assert codes(cproxy, url, 2)[1] == "TCP_REFRESH_FAIL_OLD/200"


def good_then_gone(cache_control: str, how):
    """An origin route that answers 200 once, then accepts requests and ends the connection unanswered
    (how: CLOSE or RESET), or cuts its new 200 short (how: CUT)."""
    calls = []

    def fn(seen):
        calls.append(1)
        if len(calls) == 1:
            return 200, {"Cache-Control": cache_control}, b"good"
        if how is CUT:  # 10 of the 5000 bytes it promises, then the connection ends
            return 200, {"Cache-Control": cache_control, "Content-Length": "5000"}, lambda: iter([b"y" * 10])
        return 0, {}, how
    return fn


CUT = object()


@pytest.mark.parametrize("how", [CLOSE, RESET], ids=["closed", "reset"])
def test_stale_if_error_when_origin_ends_the_connection_unanswered(cproxy, origin, how):
    """Squid serves the stale copy when the origin accepted the revalidation and then closed or reset
    the connection; mitmproxy would send its own 502 after the error hook (recover.py)."""
    path = f"/siegone-{len(origin.routes)}"
    origin.route(path, good_then_gone("max-age=1, stale-if-error=60", how))
    url = f"{origin.url}{path}"
    fetch(cproxy, url)
    time.sleep(1.3)
    status, headers, body = fetch(cproxy, url)
    assert (status, body) == (200, b"good")
    assert "111" in headers.get("warning", "")
    assert origin.hits[path] == 2  # it was asked, and failed
    assert codes(cproxy, url, 2) == ["TCP_MISS/200", "TCP_REFRESH_FAIL_OLD/200"]
    assert len(lines_for(cproxy, url)) == 2  # one line for the answered failure, not two


@pytest.mark.parametrize("cc", ["max-age=1, stale-if-error=60", "max-age=1"])
def test_a_client_leaving_during_a_revalidation_is_logged_and_not_answered(cproxy, origin, cc):
    """The client gives up while the origin is slow to revalidate: the error is the client's, so
    no stale copy is served to nobody, and the request is logged as any abandoned one."""
    path = f"/slowreval-{len(origin.routes)}"
    calls = []

    def route(seen):
        calls.append(1)
        if len(calls) > 1:
            time.sleep(3)
        return 200, {"Cache-Control": cc, "ETag": '"v1"'}, b"good"
    origin.route(path, route)
    url = f"{origin.url}{path}"
    assert fetch(cproxy, url)[2] == b"good"
    time.sleep(1.3)
    assert curl("-x", cproxy.url, "--max-time", "1", url, timeout=1).returncode == 28  # curl gave up
    assert codes(cproxy, url, 2) == ["TCP_MISS/200", "TCP_MISS_ABORTED/000"]


def test_stale_if_error_while_the_request_body_streams_keeps_the_connection_usable(tmp_path, origin, held_ports):
    """With stream_large_bodies a GET's large body goes upstream as it arrives; the origin refusing
    then is answered by mitmproxy as it would be (the request is not all in, the stream cannot end
    well with a stale copy), and the client's connection still serves its next request."""
    origin.route("/bigbody", lambda seen: (200, {"Cache-Control": "max-age=1, stale-if-error=60"}, b"good"))
    p = Proxy(tmp_path, options={"cache_dir": str(tmp_path / "cache"), "stream_large_bodies": "1k"})
    try:
        url = f"{origin.url}/bigbody"
        assert fetch(p, url)[2] == b"good"
        port = origin.port
        origin.close()  # refused from now on
        held_ports(port)
        time.sleep(1.3)
        body = tmp_path / "body"
        body.write_bytes(b"x" * 100_000)
        r = curl("-i", "-x", p.url, "-X", "GET", "-H", "Expect:", "--data-binary", f"@{body}", url,
                 "--next", "-i", "--max-time", "5", "-x", p.url, f"http://127.0.0.1:{port}/bigbody", timeout=8)
        assert r.stdout.count(b"HTTP/1.1 ") == 2, r.stdout  # both requests got an answer
    finally:
        p.stop()


def test_origin_ending_the_connection_without_stale_if_error_is_squids_502(cproxy, origin):
    origin.route("/gone-nosie", good_then_gone("max-age=1", CLOSE))
    url = f"{origin.url}/gone-nosie"
    fetch(cproxy, url)
    time.sleep(1.3)
    status, headers, _ = fetch(cproxy, url)
    assert status == 502 and headers["x-squid-error"].startswith("ERR_ZERO_SIZE_OBJECT")
    assert codes(cproxy, url, 2)[1] == "TCP_REFRESH_FAIL_ERR/502"  # a failed revalidation, as Squid logs it


@pytest.mark.parametrize("streamed", [False, True], ids=["buffered", "streamed"])
def test_a_response_cut_short_gets_squids_502_unless_it_was_streamed(start_proxy, origin, tmp_path, streamed):
    """An origin that closes the connection in the middle of a response: while mitmproxy buffers the
    response, none of it has reached the client, which gets Squid's 502 ERR_READ_ERROR, not
    mitmproxy's page, and keeps its connection; a streamed one has gone out in part and ends cut short,
    as Squid's would. Neither is stored."""
    cut = b"HTTP/1.1 200 OK\r\nCache-Control: max-age=60\r\nContent-Length: 5000\r\n\r\n" + b"y" * 2000
    options = {"cache_dir": str(tmp_path / "c"), **({"stream_large_bodies": "1k"} if streamed else {})}
    p = start_proxy(options=options)
    with scripted_server(cut, cut) as port:
        url = f"http://127.0.0.1:{port}/cut"
        if streamed:
            r = curl("-i", "-x", p.url, url)
            assert r.stdout.startswith(b"HTTP/1.1 200") and r.returncode == 18, (r.returncode, r.stdout[:300])
            assert r.stdout.endswith(b"y" * 2000)
            assert codes(p, url, 1) == ["TCP_MISS_ABORTED/200"]
        else:
            r = curl("-v", "-i", "-x", p.url, url, f"{origin.url}/after-cut")
            assert r.stdout.startswith(b"HTTP/1.1 502") and b"X-Squid-Error: ERR_READ_ERROR" in r.stdout, r.stdout[:300]
            assert b"expected 5000" in r.stdout and b"mitmproxy" not in r.stdout  # the origin's failure, in Squid's page
            assert r.stdout.endswith(b"hello /after-cut") and b"Re-using existing connection" in r.stderr
            assert [l.split()[3:5] + l.split()[8:9] for l in lines_for(p, url)] == \
                [["TCP_MISS/502", str(len(r.stdout.split(b"HTTP/1.1 200")[0])), "HIER_DIRECT/127.0.0.1"]]
        assert curl("-i", "-x", p.url, url).stdout.startswith(b"HTTP/1.1 502" if not streamed else b"HTTP/1.1 200")
    # asked again, and failing the same way: nothing was stored
    assert codes(p, url, 2) == ["TCP_MISS_ABORTED/200" if streamed else "TCP_MISS/502"] * 2
    assert "has crashed" not in p.text()


def test_origin_answering_garbage_gets_squids_502_and_the_client_connection_stays(cproxy, origin):
    with scripted_server(b"garbage, not HTTP\r\n\r\n") as port:
        # one curl, one client connection: the page, then the next request on it
        r = curl("-v", "-i", "-x", cproxy.url, f"http://127.0.0.1:{port}/g", f"{origin.url}/after-garbage")
    assert b"X-Squid-Error: ERR_INVALID_RESP" in r.stdout and b"hello /after-garbage" in r.stdout
    assert b"Re-using existing connection" in r.stderr
    assert "has crashed" not in cproxy.text()  # the origin's close, after the hook answered, finds a done stream


@pytest.mark.parametrize("how", ["503", "closed"])
def test_max_stale_serves_stale_when_the_origin_fails_without_stale_if_error(tmp_path, origin, how):
    """Squid's max_stale: the operator allows stale copies up to that age when revalidation fails,
    whatever the origin said (must-revalidate aside)."""
    p = Proxy(tmp_path, options={"cache_dir": str(tmp_path / "cache"), "max_stale": 60})
    try:
        for path, cc in ((f"/ms-{how}", "max-age=1"), (f"/ms-mr-{how}", "max-age=1, must-revalidate")):
            origin.route(path, good_then_broken(cc) if how == "503" else good_then_gone(cc, CLOSE))
            url = f"{origin.url}{path}"
            fetch(p, url)
        time.sleep(1.3)
        status, headers, body = fetch(p, f"{origin.url}/ms-{how}")
        assert (status, body) == (200, b"good") and "111" in headers.get("warning", "")
        assert fetch(p, f"{origin.url}/ms-mr-{how}")[0] == (503 if how == "503" else 502)
        assert codes(p, f"{origin.url}/ms-{how}", 2)[1] == "TCP_REFRESH_FAIL_OLD/200"
    finally:
        p.stop()


@pytest.mark.parametrize("how", ["503", "closed", "cut", "down"])
def test_stale_copies_are_served_when_the_origin_fails_by_default_as_in_squid(tmp_path, origin, how):
    """Squid's default max_stale is a week: without any option a stale copy answers for an origin
    that fails, with Warning 111; must-revalidate still forbids it, and the error is logged
    TCP_REFRESH_FAIL_ERR whether the origin sent it, closed the connection, cut its new response
    short (none of it was sent on: mitmproxy buffers it), or was down."""
    p = Proxy(tmp_path, options={"cache_dir": str(tmp_path / "cache")})
    down = Origin() if how == "down" else None
    try:
        urls = []
        for name, cc in (("plain", "max-age=1"), ("mr", "max-age=1,must-revalidate")):
            if down:
                urls.append(f"{down.url}/d-{name}?h.Cache-Control={cc}")
            else:
                origin.route(f"/d-{how}-{name}", good_then_broken(cc) if how == "503"
                             else good_then_gone(cc, CUT if how == "cut" else CLOSE))
                urls.append(f"{origin.url}/d-{how}-{name}")
            assert fetch(p, urls[-1])[0] == 200
        if down:
            down.close()
        time.sleep(2.3)  # stale, and past the errors addon's connect_check_ttl (2 s)
        failed = 502 if how in ("closed", "cut") else 503
        status, headers, _ = fetch(p, urls[1])
        assert status == failed
        if how == "cut":  # Squid's page, not mitmproxy's
            assert headers["x-squid-error"].startswith("ERR_READ_ERROR")
        # the error passed on for a revalidation that may not fall back, as Squid logs it
        assert codes(p, urls[1].split("?")[0], 2)[1] == f"TCP_REFRESH_FAIL_ERR/{failed}"
        status, headers, body = fetch(p, urls[0])  # (a down origin is remembered as down by now)
        assert status == 200 and body.startswith(b"hello" if down else b"good")
        assert "111" in headers.get("warning", "")
        assert codes(p, urls[0].split("?")[0], 2)[1] == "TCP_REFRESH_FAIL_OLD/200"
    finally:
        p.stop()


def test_stale_without_stale_if_error_shows_error(cproxy, origin):
    origin.route("/nosie", good_then_broken("max-age=1"))
    url = f"{origin.url}/nosie"
    fetch(cproxy, url)
    time.sleep(1.3)
    assert fetch(cproxy, url)[0] == 503


# --- collapsed forwarding -------------------------------------------------------------------------

def fetch_at_once(proxy, url: str, n: int, gap: float = 0.02) -> list:
    """n clients fetching url at (nearly) the same time, each `gap` seconds after the last; their results."""
    results = []
    threads = [threading.Thread(target=lambda: results.append(fetch(proxy, url))) for _ in range(n)]
    for t in threads:
        t.start()
        time.sleep(gap)
    for t in threads:
        t.join(20)
    return results


def test_collapsed_forwarding(cproxy, origin):
    def slow(seen):
        time.sleep(1.0)
        return 200, {"Cache-Control": "max-age=60", "Content-Type": "text/plain"}, b"slow body"
    origin.route("/collapse", slow)
    url = f"{origin.url}/collapse"
    results = fetch_at_once(cproxy, url, 6)
    assert [r[2] for r in results] == [b"slow body"] * 6
    assert origin.hits["/collapse"] == 1
    found = codes(cproxy, url, 6)
    assert found.count("TCP_MISS/200") == 1 and found.count("TCP_MEM_HIT/200") == 5


@pytest.mark.parametrize("answer", [304, 200])
def test_collapsed_forwarding_of_the_revalidation_of_a_stale_object(cproxy, origin, answer):
    """Squid's collapsed_forwarding also collapses revalidations: when a popular object goes stale, one
    conditional request reaches the origin and the other clients get its outcome from the store."""
    path = f"/collapse-stale-{answer}"

    def fn(seen):
        if {k.lower(): v for k, v in seen.headers.items()}.get("if-none-match") == '"v1"':
            time.sleep(1.0)
            if answer == 304:
                return 304, {"ETag": '"v1"', "Cache-Control": "max-age=60"}, b""
            return 200, {"ETag": '"v2"', "Cache-Control": "max-age=60", "Content-Type": "text/plain"}, b"new body"
        return 200, {"ETag": '"v1"', "Cache-Control": "max-age=1", "Content-Type": "text/plain"}, b"old body"
    origin.route(path, fn)
    url = f"{origin.url}{path}"
    fetch(cproxy, url)
    time.sleep(1.5)  # stale
    results = fetch_at_once(cproxy, url, 6)
    body = b"old body" if answer == 304 else b"new body"
    assert [r[2] for r in results] == [body] * 6
    assert origin.hits[path] == 2
    found = codes(cproxy, url, 7)[1:]
    first = "TCP_REFRESH_UNMODIFIED/200" if answer == 304 else "TCP_REFRESH_MODIFIED/200"
    assert found.count(first) == 1 and found.count("TCP_MEM_HIT/200") == 5, found


@pytest.mark.parametrize("options", [{"cache_mem": "0"}, {"stream_large_bodies": "10k"}],
                         ids=["disk-only", "streamed"])
def test_collapsed_forwarding_when_the_answer_goes_to_disk_only(start_proxy, origin, tmp_path, options):
    """The waiting clients are served from the leader's answer once the disk writer has it, even when
    it does not go through RAM (cache_mem 0, or a body streamed to disk)."""
    p = start_proxy(options={"cache_dir": str(tmp_path / "c"), **options})

    def slow(seen):
        time.sleep(1.0)
        return 200, {"Cache-Control": "max-age=60", "Content-Type": "text/plain"}, b"d" * 50_000
    origin.route("/collapse-disk", slow)
    url = f"{origin.url}/collapse-disk"
    results = fetch_at_once(p, url, 5, gap=0.05)
    assert [r[2] for r in results] == [b"d" * 50_000] * 5
    assert origin.hits["/collapse-disk"] == 1


def test_a_client_that_leaves_while_its_miss_waits_for_another_is_logged_once(start_proxy, origin, tmp_path):
    """A collapsed miss waits in the cache's hook, before the access log's own hook: the client
    that gives up meanwhile gets its aborted line only, not also "closed before a request"."""
    p = start_proxy(options={"cache_dir": "none"})

    def slow(seen):
        time.sleep(2)
        return 200, {"Cache-Control": "max-age=60", "Content-Type": "text/plain"}, b"slow body"
    origin.route("/collapse-leave", slow)
    url = f"{origin.url}/collapse-leave"
    p.wait_lines("error:transaction-end-before-headers")  # the harness's own check that the port is open
    before = len(p.log_lines(0, timeout=0))
    first = threading.Thread(target=lambda: curl("-x", p.url, url))
    first.start()
    end = time.monotonic() + 10
    while not origin.hits.get("/collapse-leave") and time.monotonic() < end:  # the first one is upstream
        time.sleep(0.02)
    curl("-x", p.url, url, "--max-time", "0.6")  # waits for the first one's answer, gives up before it
    first.join(20)
    found = codes(p, url, 2)
    time.sleep(0.5)
    lines = p.log_lines(0, timeout=0)[before:]
    assert sorted(found) == ["TCP_MEM_HIT_ABORTED/200", "TCP_MISS/200"], lines
    assert len(lines) == 2, lines
    assert origin.hits["/collapse-leave"] == 1


# --- HTTPS interception and reverse mode keys --------------------------------------------------------

def test_intercepted_https_is_cached_separately(start_proxy, tls_origin, tmp_path):
    p = start_proxy(options={"cache_dir": str(tmp_path / "c")})
    url = f"{tls_origin.url}/tls?h.Cache-Control=max-age=60"
    for _ in range(2):
        r = curl("--cacert", p.ca, "-x", p.url, url)
        assert r.stdout == b"hello /tls", r.stderr
    assert tls_origin.hits["/tls"] == 1
    lines = p.wait_lines("/tls", 2)
    assert [l.split()[3] for l in lines] == ["TCP_MISS/200", "TCP_MEM_HIT/200"]
    assert lines[0].split()[6].startswith("https://")


@pytest.mark.parametrize("strategy", ["eager", "lazy"])
def test_intercepted_https_when_the_origin_dies_per_connection_strategy(start_proxy, cert, tmp_path, strategy,
                                                                       held_ports):
    """Eagerly, mitmproxy connects to the origin at CONNECT time, before any request: a dead origin
    fails the CONNECT itself (Squid's 503), so a stale copy cannot be served. Lazily, the request
    reaches the cache, and the copy stale-if-error allows is served when the connection fails."""
    origin = Origin(tls=cert)
    p = start_proxy(options={"cache_dir": str(tmp_path / "c"), "connection_strategy": strategy})
    url = f"{origin.url}/tls-sie?h.Cache-Control=max-age=1,stale-if-error=60"
    try:
        assert curl("--cacert", p.ca, "-x", p.url, url).stdout == b"hello /tls-sie"
    finally:
        origin.close()
    held_ports(origin.port)
    time.sleep(1.3)
    r = curl("-i", "--cacert", p.ca, "-x", p.url, url)
    if strategy == "eager":
        assert r.returncode != 0 and b"HTTP/1.1 503" in r.stdout  # curl shows the refused CONNECT
        p.log_line(f" NONE_NONE/503 0 CONNECT 127.0.0.1:{origin.port} ")
    else:
        assert r.returncode == 0 and r.stdout.endswith(b"hello /tls-sie"), (r.stdout, r.stderr)
        assert b"111" in r.stdout  # Warning: 111 - "Revalidation Failed"
        assert [l.split()[3] for l in p.wait_lines("/tls-sie", 2)] == ["TCP_MISS/200", "TCP_REFRESH_FAIL_OLD/200"]


def test_reverse_mode_key_cannot_be_poisoned_across_listeners_by_the_host_header(start_proxy, tmp_path):
    a, b = Origin(), Origin()
    try:
        a.route("/r", lambda s: (200, {"Cache-Control": "max-age=60"}, b"from a"))
        b.route("/r", lambda s: (200, {"Cache-Control": "max-age=60"}, b"from b"))
        p = start_proxy(modes=(f"reverse:{a.url}", f"reverse:{b.url}"),
                        options={"cache_dir": str(tmp_path / "c"), "keep_host_header": True})
        pa, pb = p.ports
        # poisoning attempt: ask reverse proxy A with the Host header B's clients send
        r = curl("-H", f"Host: 127.0.0.1:{pb}", f"http://127.0.0.1:{pa}/r")
        assert r.stdout == b"from a"
        assert curl(f"http://127.0.0.1:{pb}/r").stdout == b"from b"
        assert curl(f"http://127.0.0.1:{pb}/r").stdout == b"from b"
        assert curl("-H", "Host: evil.example", f"http://127.0.0.1:{pa}/r").stdout == b"from a"
        assert curl("-H", "Host: evil.example", f"http://127.0.0.1:{pa}/r").stdout == b"from a"
        assert b.hits["/r"] == 1  # never answered for another listener's target
        assert a.hits["/r"] == 2  # once per Host it saw (keep_host_header: the backend answers per site)
    finally:
        a.close()
        b.close()


def test_a_host_header_that_differs_from_the_url_cannot_poison_the_urls_entry(start_proxy, origin, tmp_path):
    """The cache alone: mitmproxy passes a client's Host on as sent, and a name-based origin answers for
    that site (here it echoes the Host it saw): such an answer is cached apart, never for the URL's own
    site. (addons/all.py replaces such a Host by the URL's first: the hops addon, tests/test_hops.py.)"""
    p = start_proxy(script="addons/cache.py", options={"cache_dir": str(tmp_path / "c")})
    url = f"{origin.url}/headers?hostkey=1&h.Cache-Control=max-age=60"
    seen = lambda body: json.loads(body)["headers"]["host"]  # noqa: E731
    assert seen(fetch(p, url, "-H", "Host: evil.example")[2]) == "evil.example"
    assert seen(fetch(p, url)[2]) == f"127.0.0.1:{origin.port}"
    assert seen(fetch(p, url)[2]) == f"127.0.0.1:{origin.port}"
    assert seen(fetch(p, url, "-H", "Host: evil.example")[2]) == "evil.example"
    assert seen(fetch(p, url, "-H", "Host: 127.0.0.1:%d" % origin.port)[2]) == f"127.0.0.1:{origin.port}"
    assert origin.hits["/headers"] == 2


def test_with_the_whole_suite_a_foreign_host_header_gets_the_urls_entry(cproxy, origin):
    url = f"{origin.url}/headers?hostkey=2&h.Cache-Control=max-age=60"
    seen = lambda body: json.loads(body)["headers"]["host"]  # noqa: E731
    assert seen(fetch(cproxy, url, "-H", "Host: evil.example")[2]) == f"127.0.0.1:{origin.port}"
    assert seen(fetch(cproxy, url)[2]) == f"127.0.0.1:{origin.port}"
    assert codes(cproxy, f"{origin.url}/headers", 2) == ["TCP_MISS/200", "TCP_MEM_HIT/200"]


def test_an_absolute_url_sent_to_a_reverse_proxy_cannot_poison_the_targets_entry(start_proxy, origin, tmp_path):
    """mitmproxy forwards an absolute-form request target to a reverse-mode backend as it came, and the
    backend answers for that URL's site (RFC 9112 3.2.2): that answer is cached apart."""
    origin.route("/absr", lambda s: (200, {"Cache-Control": "max-age=60"}, s.path.encode()))
    p = start_proxy(modes=(f"reverse:{origin.url}",), options={"cache_dir": str(tmp_path / "c")})
    with socket.create_connection(("127.0.0.1", p.port), timeout=10) as c:
        c.sendall(b"GET http://admin.internal/absr HTTP/1.1\r\nHost: whatever\r\nConnection: close\r\n\r\n")
        got = b""
        while chunk := c.recv(65536):
            got += chunk
    assert got.endswith(b"http://admin.internal/absr")
    for _ in range(2):
        assert curl(f"http://127.0.0.1:{p.port}/absr").stdout == b"/absr"
    assert origin.hits["/absr"] == 2
    assert [l.split()[3] for l in p.wait_lines("/absr", 3)] == ["TCP_MISS/200", "TCP_MISS/200", "TCP_MEM_HIT/200"]


def test_a_path_beyond_ascii_is_cached_on_disk_under_one_key(start_proxy, origin, tmp_path):
    """Raw bytes that are not UTF-8 in a path (mitmproxy keeps them as lone surrogates, which the disk
    tier's SQLite refuses) are stored and served from disk; the percent-encoded path, as a browser
    sends it, is the same resource."""
    p = start_proxy(modes=(f"reverse:{origin.url}",), options={"cache_dir": str(tmp_path / "c"), "cache_mem": 0})

    def raw_get(target: bytes) -> bytes:
        with socket.create_connection(("127.0.0.1", p.port), timeout=10) as s:
            s.sendall(b"GET %s HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" % target)
            answer = b""
            while chunk := s.recv(65536):
                answer += chunk
        return answer
    query = b"?h.Cache-Control=max-age=60"
    for target in (b"/raw/caf\xe9" + query, b"/raw/caf\xe9" + query, b"/raw/caf%E9" + query):
        answer = raw_get(target)
        assert answer.startswith(b"HTTP/1.1 200") and answer.endswith("hello /raw/café".encode())  # the first
        wait_stored(tmp_path / "c", "/raw/caf%E9")  # the disk writer stores it meanwhile
    assert sum(n for path, n in origin.hits.items() if path.startswith("/raw/caf")) == 1
    assert [line.split()[3] for line in p.log_lines(3) if "/raw/caf" in line] == \
        ["TCP_MISS/200", "TCP_HIT/200", "TCP_HIT/200"]
    assert "failed" not in p.text()


def test_cdn_cache_control_rules_in_reverse_mode_only(start_proxy, origin, tmp_path):
    """RFC 9213: a reverse proxy is the site's CDN; CDN-Cache-Control replaces Cache-Control and
    Expires for it, and a forward proxy ignores it."""
    origin.route("/cdn-fresh", lambda s: (200, {"Cache-Control": "no-store", "CDN-Cache-Control": "max-age=600"},
                                          b"cdn"))
    origin.route("/cdn-nostore", lambda s: (200, {"Cache-Control": "max-age=600", "CDN-Cache-Control": "no-store"},
                                            b"cdn"))
    origin.route("/cdn-bad", lambda s: (200, {"Cache-Control": "max-age=600", "CDN-Cache-Control": "max-age=\"x"},
                                        b"cdn"))
    p = start_proxy(modes=(f"reverse:{origin.url}", "regular"), options={"cache_dir": str(tmp_path / "c")})
    rev, fwd = p.ports
    for path in ("/cdn-fresh", "/cdn-nostore", "/cdn-bad"):
        for _ in range(2):
            r = curl("-i", f"http://127.0.0.1:{rev}{path}")
            assert b"CDN-Cache-Control" in r.stdout, "clients still get the field"
    assert origin.hits["/cdn-fresh"] == 1        # stored for max-age=600 despite no-store
    assert origin.hits["/cdn-nostore"] == 2      # not stored despite max-age=600
    assert origin.hits["/cdn-bad"] == 1          # not a valid Dictionary: ignored, Cache-Control rules
    for _ in range(2):
        curl("-x", f"http://127.0.0.1:{fwd}", f"{origin.url}/cdn-nostore?fwd")
    assert origin.hits["/cdn-nostore"] == 3      # a forward proxy is no CDN: max-age=600 applies


CACHE_RULES_ACLS = """
  private_area: urlpath_regex ^/private/
  nohit: req_header X-No-Hit .
  nostore: req_header X-No-Store .
"""
CACHE_RULES = """
cache:
  - deny private_area
send_hit:
  - deny nohit
store_miss:
  - deny nostore
"""


def rules_proxy(start_proxy, tmp_path, script="addons/all.py", **extra):
    """A proxy whose cache policy has Squid's cache / send_hit / store_miss rules on acls of its access policy."""
    access = tmp_path / "access.yaml"
    access.write_text((ROOT / "tests" / "policies" / "test.yaml").read_text().replace("acls:\n", "acls:" + CACHE_RULES_ACLS, 1))
    rules = tmp_path / "cache.yaml"
    rules.write_text((ROOT / "policies" / "cache.yaml").read_text().split("\ncache: []")[0] + CACHE_RULES)
    options = {"cache_dir": str(tmp_path / "c"), "cache_policy": str(rules), **extra}
    if script == "addons/all.py":
        options["policy"] = str(access)
    return start_proxy(script=script, options=options)


def test_cache_send_hit_and_store_miss_rules_as_in_squid(start_proxy, origin, tmp_path):
    for path in ("/private/a", "/public/a", "/s", "/n"):
        origin.route(path, lambda s: (200, {"Cache-Control": "max-age=600"}, b"body"))
    p = rules_proxy(start_proxy, tmp_path)
    # cache deny: neither answered from the cache nor stored
    for _ in range(2):
        assert fetch(p, f"{origin.url}/private/a")[0] == 200
        fetch(p, f"{origin.url}/public/a")
    assert origin.hits["/private/a"] == 2 and origin.hits["/public/a"] == 1
    assert codes(p, f"{origin.url}/private/a", 2) == ["TCP_MISS/200", "TCP_MISS/200"]
    # send_hit deny: goes to the origin even when stored, and its response is stored
    fetch(p, f"{origin.url}/s", "-H", "X-No-Hit: 1")
    fetch(p, f"{origin.url}/s", "-H", "X-No-Hit: 1")
    assert origin.hits["/s"] == 2
    assert fetch(p, f"{origin.url}/s")[1]["x-cache"].startswith("HIT") and origin.hits["/s"] == 2
    # store_miss deny: not stored, but a stored response answers it
    fetch(p, f"{origin.url}/n", "-H", "X-No-Store: 1")
    fetch(p, f"{origin.url}/n")
    assert origin.hits["/n"] == 2
    assert fetch(p, f"{origin.url}/n", "-H", "X-No-Store: 1")[1]["x-cache"].startswith("HIT")
    assert origin.hits["/n"] == 2
    assert codes(p, f"{origin.url}/n", 3) == ["TCP_MISS/200", "TCP_MISS/200", "TCP_MEM_HIT/200"]


def test_an_edited_cache_policy_applies_without_a_restart_and_a_broken_edit_keeps_the_last_good(
        start_proxy, origin, tmp_path):
    for path in ("/w1", "/w2", "/w3"):
        origin.route(path, lambda s: (200, {"Cache-Control": "max-age=600"}, b"body"))
    p = rules_proxy(start_proxy, tmp_path)
    for _ in range(2):
        fetch(p, f"{origin.url}/w1")
    assert origin.hits["/w1"] == 1
    rules = tmp_path / "cache.yaml"
    rules.write_text(rules.read_text().replace("  - deny private_area", "  - deny all"))
    time.sleep(1.2)  # the file is looked at once a second
    for _ in range(2):
        fetch(p, f"{origin.url}/w2")
    fetch(p, f"{origin.url}/w1")
    assert origin.hits["/w2"] == 2 and origin.hits["/w1"] == 2  # nothing stored, nothing answered
    rules.write_text(rules.read_text() + "  - perhaps all\n")
    time.sleep(1.2)
    for _ in range(2):
        fetch(p, f"{origin.url}/w3")
    assert origin.hits["/w3"] == 2  # the last good policy (deny all) stays
    p.wait_output("policy not reloaded, keeping the last good one")


def test_a_broken_edit_of_the_cache_policy_is_reported_on_an_idle_proxy(start_proxy, tmp_path):
    """The file is looked at while no request comes: the operator sees the error when saving, not at the
    next request; then the fix is taken the same way."""
    p = rules_proxy(start_proxy, tmp_path)
    rules = tmp_path / "cache.yaml"
    good = rules.read_text()
    rules.write_text(good + "  - perhaps all\n")
    p.wait_output(f"policy not reloaded, keeping the last good one: cache_policy: {rules}:")
    rules.write_text(good.replace("  - deny private_area", "  - deny all"))
    p.wait_output("cache: policy reloaded")


def test_a_cache_rule_naming_an_acl_the_access_policy_lacks_is_reported_once_per_policy(
        start_proxy, origin, tmp_path):
    """Squid refuses `cache deny QEURY` when no acl QEURY exists; Relais can only check once a request brings
    the access policy's acl names: it warns then, naming the file and line, and again after a reload."""
    origin.route("/typo", lambda s: (200, {"Cache-Control": "max-age=600"}, b"body"))
    p = rules_proxy(start_proxy, tmp_path)
    rules = tmp_path / "cache.yaml"
    rules.write_text(rules.read_text().replace("  - deny nostore", "  - deny nostore\n  - deny !all QEURY"))
    time.sleep(1.2)  # the file is looked at once a second
    p.wait_output("cache: policy reloaded")
    for _ in range(3):
        fetch(p, f"{origin.url}/typo")
    assert origin.hits["/typo"] == 1  # the rule never matches: stored and served as before
    line = rules.read_text().split("\n").index("  - deny !all QEURY") + 1
    warning = (f"cache_policy: {rules}:{line}: store_miss deny !all QEURY names acl 'QEURY', which "
               f"{tmp_path / 'access.yaml'} does not define: it never matches")
    p.wait_output(warning)
    assert p.text().count("names acl") == 1, p.text()[-3000:]
    rules.write_text(rules.read_text() + "\n")  # reloaded: checked again at the next request
    time.sleep(1.2)
    fetch(p, f"{origin.url}/typo")
    deadline = time.monotonic() + 5
    while p.text().count(warning) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert p.text().count(warning) == 2, p.text()[-3000:]
    assert "names acl 'nostore'" not in p.text() and "names acl 'all'" not in p.text()


def test_a_streamed_body_the_rules_keep_out_is_not_stored_and_leaves_no_file(start_proxy, origin, tmp_path):
    p = rules_proxy(start_proxy, tmp_path, stream_large_bodies="10k")
    url = f"{origin.url}/size/50000?h.Cache-Control=max-age=600"
    assert len(fetch(p, url, "-H", "X-No-Store: 1")[2]) == 50000
    time.sleep(1)  # the disk writer commits within 0.2 s of a store
    stored = "SELECT 1 FROM Cache WHERE key >= 'm|' AND key < 'm}' AND instr(key, '/size/50000') > 0"
    assert cache_rows(tmp_path / "c", stored) == []
    assert list((tmp_path / "c" / "incoming").rglob("body-*")) == []
    assert len(fetch(p, url)[2]) == 50000  # allowed: stored
    wait_stored(tmp_path / "c", "/size/50000")
    assert len(fetch(p, url)[2]) == 50000
    assert codes(p, f"{origin.url}/size/50000", 3) == ["TCP_MISS/200", "TCP_MISS/200", "TCP_HIT/200"]


def test_cache_rules_without_the_acl_addon_keep_the_cache_out_and_say_why(start_proxy, origin, tmp_path):
    origin.route("/public/b", lambda s: (200, {"Cache-Control": "max-age=600"}, b"body"))
    p = rules_proxy(start_proxy, tmp_path, script="addons/cache.py")
    for _ in range(2):
        assert fetch(p, f"{origin.url}/public/b")[0] == 200
    assert origin.hits["/public/b"] == 2
    p.wait_output("is the acl addon loaded")


# --- storage: disk tier, persistence, streaming, crash safety ----------------------------------------

def test_disk_hit_after_restart(start_proxy, origin, tmp_path):
    opts = {"cache_dir": str(tmp_path / "persist")}
    url = f"{origin.url}/size/5000?h.Cache-Control=max-age=600"
    p1 = start_proxy(options=opts)
    fetch(p1, url)
    p1.stop()
    p2 = start_proxy(options=opts)
    status, _, body = fetch(p2, url)
    assert status == 200 and body == b"x" * 5000
    fetch(p2, url)
    assert origin.hits["/size/5000"] == 1
    assert codes(p2, f"{origin.url}/size/5000", 2) == ["TCP_HIT/200", "TCP_MEM_HIT/200"]


def test_large_objects_skip_ram_and_respect_maximum_object_size(start_proxy, origin, tmp_path):
    p = start_proxy(options={"cache_dir": str(tmp_path / "c"), "maximum_object_size_in_memory": "10 KB",
                             "maximum_object_size": "100 KB"})
    big = f"{origin.url}/size/50000?h.Cache-Control=max-age=600"
    huge = f"{origin.url}/size/200000?h.Cache-Control=max-age=600"
    fetch(p, big)
    wait_stored(tmp_path / "c", "/size/50000")  # the background writer puts it on disk
    assert fetch(p, big)[2] == b"x" * 50000
    fetch(p, huge)
    fetch(p, huge)
    assert origin.hits["/size/50000"] == 1 and origin.hits["/size/200000"] == 2
    assert codes(p, f"{origin.url}/size/50000", 2)[1] == "TCP_HIT/200"


def test_ram_only_cache(start_proxy, origin):
    p = start_proxy(options={"cache_dir": "none", "cache_mem": "1 MB"})
    url = f"{origin.url}/ram?h.Cache-Control=max-age=60"
    fetch(p, url)
    fetch(p, url)
    assert origin.hits["/ram"] == 1


def test_streamed_large_body_stored_and_served(start_proxy, origin, tmp_path):
    p = start_proxy(options={"cache_dir": str(tmp_path / "c"), "stream_large_bodies": "100k",
                             "maximum_object_size": "10 MB"})
    size = 3 * 1024 * 1024
    url = f"{origin.url}/size/{size}?h.Cache-Control=max-age=600"
    assert len(fetch(p, url)[2]) == size
    wait_stored(tmp_path / "c", f"/size/{size}")
    body = fetch(p, url)[2]
    assert body == b"x" * size
    assert origin.hits[f"/size/{size}"] == 1
    assert codes(p, f"{origin.url}/size/{size}", 2) == ["TCP_MISS/200", "TCP_HIT/200"]


def test_a_streamed_body_with_no_room_for_its_copy_is_relayed_and_logged_whole(start_proxy, origin, tmp_path):
    """The folder for streamed bodies removed while the proxy runs is made anew; one that cannot be
    made (a file in its place) leaves streamed bodies relayed without being stored, with a warning,
    and the access log still counts their bytes."""
    import shutil
    p = start_proxy(options={"cache_dir": str(tmp_path / "c"), "stream_large_bodies": "10k"})
    size = 200_000
    shutil.rmtree(tmp_path / "c" / "incoming")
    url = f"{origin.url}/size/{size}?h.Cache-Control=max-age=600"
    assert len(fetch(p, url)[2]) == size
    wait_stored(tmp_path / "c", f"/size/{size}")
    assert fetch(p, url)[2] == b"x" * size
    assert origin.hits[f"/size/{size}"] == 1
    shutil.rmtree(tmp_path / "c" / "incoming")
    (tmp_path / "c" / "incoming").write_text("in the way")
    url2 = f"{origin.url}/size/{size + 1}?h.Cache-Control=max-age=600"
    for _ in range(2):
        assert len(fetch(p, url2)[2]) == size + 1
    assert origin.hits[f"/size/{size + 1}"] == 2
    assert codes(p, f"{origin.url}/size/{size + 1}", 2) == ["TCP_MISS/200"] * 2
    lines = [l for l in p.log_lines(1) if f"/size/{size + 1} " in l]
    assert all(int(l.split()[4]) > size for l in lines), lines  # the bytes sent, headers included
    text = p.text()
    assert "cannot create a file for a streamed body" in text and "Addon error" not in text


def test_aborted_stream_is_not_stored(start_proxy, origin, tmp_path):
    p = start_proxy(options={"cache_dir": str(tmp_path / "c"), "stream_large_bodies": "10k"})
    url = f"{origin.url}/slow/60000?rate=3000&h.Cache-Control=max-age=600"  # 2 s of body
    curl("-x", p.url, url, timeout=1)   # the client gives up after 1 s, mid-body
    time.sleep(1.5)
    body = fetch(p, url)[2]
    assert body == b"x" * 60000
    assert origin.hits["/slow/60000"] == 2
    assert codes(p, f"{origin.url}/slow/60000", 2) == ["TCP_MISS_ABORTED/200", "TCP_MISS/200"]


def test_truncated_origin_body_is_not_stored(start_proxy, origin, tmp_path):
    def short(seen):
        def chunks():
            yield b"y" * 1000  # promises 5000 bytes, sends 1000 and closes
        return 200, {"Content-Length": "5000", "Cache-Control": "max-age=60"}, chunks
    origin.route("/short", short)
    p = start_proxy(options={"cache_dir": str(tmp_path / "c"), "stream_large_bodies": "100"})
    url = f"{origin.url}/short"
    curl("-x", p.url, url, timeout=5)
    curl("-x", p.url, url, timeout=5)
    assert origin.hits["/short"] == 2


@pytest.mark.parametrize("chunked", [False, True], ids=["length", "chunked"])
def test_a_streamed_error_during_revalidation_is_what_the_client_gets_and_leaves_no_file(
        start_proxy, origin, tmp_path, chunked):
    """A stale entry with stale-if-error, revalidated while the origin answers a 500 large enough to be
    streamed (mitmproxy 11 streams it whatever a hook says): the 500 went out as it came, so it is what
    the log says, as Squid names an error passed on, and the copy the cache was writing of it leaves no
    file behind. It is then stored (explicit freshness)."""
    state = {"n": 0}

    def flip(seen):
        state["n"] += 1
        if state["n"] == 1:
            return 200, {"Cache-Control": "max-age=1, stale-if-error=600", "ETag": '"e1"'}, b"good"
        if chunked:  # its length unknown: mitmproxy starts streaming it once 1k is buffered, after the hooks
            return 500, {"Cache-Control": "max-age=600", "Transfer-Encoding": "chunked"}, _chunked(b"e" * 5000)
        return 500, {"Cache-Control": "max-age=600"}, b"e" * 5000
    origin.route("/flip", flip)
    p = start_proxy(options={"cache_dir": str(tmp_path / "c"), "stream_large_bodies": "1k"})
    url = f"{origin.url}/flip"
    assert fetch(p, url)[2] == b"good"
    time.sleep(2.2)  # stale now
    for i in range(3):
        sent = time.time()
        status, _, body = fetch(p, url)
        assert (status, body) == (500, b"e" * 5000)
        if i == 0:
            wait_stored(tmp_path / "c", "/flip", since=sent)  # the disk writer takes the stored 500 meanwhile
    assert codes(p, url, 4)[1:] == ["TCP_REFRESH_FAIL_ERR/500", "TCP_NEGATIVE_HIT/500", "TCP_NEGATIVE_HIT/500"]
    assert list((tmp_path / "c" / "incoming").rglob("body-*")) == []


def body_files(cache_dir) -> list[Path]:
    """The body files of the entries committed in cache_dir's disk cache. A file written by a batch
    the kill cut short before its commit is named by no row: damaging it would test nothing."""
    return sorted(Path(cache_dir) / f for (f,) in cache_rows(cache_dir, "SELECT filename FROM Cache "
                                                                         "WHERE filename IS NOT NULL"))


def test_kill_9_during_writes_then_no_corrupt_body(start_proxy, origin, tmp_path):
    opts = {"cache_dir": str(tmp_path / "crash"), "cache_mem": "0", "access_log": "none"}
    p1 = start_proxy(options=opts)
    n = 60
    urls = [f"{origin.url}/size/{40000 + i}?h.Cache-Control=max-age=600" for i in range(n)]
    stop = threading.Event()

    def load(part):
        for u in part:
            if stop.is_set():
                return
            curl("-x", p1.url, u, "-o", "/dev/null", timeout=5)
    threads = [threading.Thread(target=load, args=(urls[i::4],)) for i in range(4)]
    for t in threads:
        t.start()
    end = time.monotonic() + 10
    while not body_files(opts["cache_dir"]) and time.monotonic() < end:  # a first batch committed
        time.sleep(0.05)
    os.killpg(p1.proc.pid, signal.SIGKILL)   # kill -9 in the middle of the writes
    stop.set()
    for t in threads:
        t.join(10)
    p1.proc.wait(5)
    # damage one stored body file on purpose: it must be detected, dropped and logged
    files = body_files(opts["cache_dir"])
    assert files, "bodies of 40 KB and more are files in diskcache"
    with open(files[0], "r+b") as f:
        f.truncate(100)
    p2 = start_proxy(options={**opts, "access_log": str(tmp_path / "access2.log")})
    for i, u in enumerate(urls):
        status, _, body = fetch(p2, u)
        assert status == 200 and body == b"x" * (40000 + i), f"bad body for {u}"
    p2.stop()
    assert "corrupt disk entry" in p2.text()
    # Squid's code for a stored copy that could not be read: one line for each dropped entry
    swapfails = [l for l in p2.log_lines(path=tmp_path / "access2.log") if " TCP_SWAPFAIL_MISS/200 " in l]
    assert swapfails and len(swapfails) == p2.text().count("corrupt disk entry"), swapfails


# --- PURGE and commands ------------------------------------------------------------------------------

def test_purge_method(cproxy, origin):
    url = f"{origin.url}/purge?h.Cache-Control=max-age=60"
    fetch(cproxy, url)
    assert fetch(cproxy, url, "-X", "PURGE")[0] == 200
    assert fetch(cproxy, url, "-X", "PURGE")[0] == 404
    fetch(cproxy, url)
    assert origin.hits["/purge"] == 2


def test_purge_refused_outside_purge_from(start_proxy, origin):
    # the cache alone (no access-control addon): its own purge_from option decides
    p = start_proxy(script="addons/cache.py", options={"cache_dir": "none", "purge_from": "10.0.0.0/8"})
    url = f"{origin.url}/pp?h.Cache-Control=max-age=60"
    curl("-x", p.url, url)
    assert fetch(p, url, "-X", "PURGE")[0] == 403
    curl("-x", p.url, url)
    assert origin.hits["/pp"] == 1


def test_stale_while_revalidate(cproxy, origin):
    n = []

    def fn(seen):
        n.append(1)
        max_age = 2 if len(n) == 1 else 600  # the refreshed version stays fresh, however slow the machine
        return 200, {"Cache-Control": f"max-age={max_age}, stale-while-revalidate=60"}, f"version {len(n)}".encode()
    origin.route("/swr", fn)
    url = f"{origin.url}/swr"
    assert fetch(cproxy, url)[2] == b"version 1"
    time.sleep(2.3)  # stale (Date has a 1 s resolution: max-age=1 could already be stale when stored)
    status, headers, body = fetch(cproxy, url)    # stale: served at once, refreshed in the background
    assert body == b"version 1" and "110" in headers.get("warning", "")
    end = time.monotonic() + 10  # stored once the proxy has the origin's answer (max-stale never asks the origin)
    while fetch(cproxy, url, "-H", "Cache-Control: max-stale")[2] != b"version 2" and time.monotonic() < end:
        time.sleep(0.05)
    assert fetch(cproxy, url)[2] == b"version 2"
    assert origin.hits["/swr"] == 2
    found = codes(cproxy, url, 4)
    assert found[:2] == ["TCP_MISS/200", "TCP_MEM_HIT/200"] and set(found[2:]) == {"TCP_MEM_HIT/200"}


def test_an_object_too_large_for_ram_is_a_hit_while_it_waits_for_the_disk_writer(cproxy, origin):
    """Over maximum_object_size_in_memory (512 KB), an object lives on disk only, written by batches
    every 0.2 s: the requests right after the miss are hits on it, not new fetches."""
    path = "/size/1000001"  # a size of its own: the log shows URLs without their query
    for _ in range(3):
        status, _, body = fetch(cproxy, f"{origin.url}{path}?h.Cache-Control=max-age=60")
        assert (status, len(body)) == (200, 1000001)
    assert origin.hits[path] == 1
    assert codes(cproxy, origin.url + path, 3) == ["TCP_MISS/200", "TCP_HIT/200", "TCP_HIT/200"]


def test_a_background_refresh_asks_as_the_client_it_serves_would(cproxy, origin):
    """The refresh of a stale-while-revalidate entry carries the fields of the client request that
    found it stale (an origin may answer on User-Agent, Accept-Language or Cookie without a Vary),
    with the stored response's validator in place of the client's own preconditions."""
    seen = []

    def fn(s):
        seen.append(s.headers)
        if "user-agent" not in {k.lower() for k in s.headers}:  # a WAF's answer to a bare request
            return 403, {"Cache-Control": "max-age=600"}, b"no user agent, forbidden"
        max_age = 2 if len(seen) == 1 else 600
        return 200, {"Cache-Control": f"max-age={max_age}, stale-while-revalidate=60", "ETag": '"v1"'}, b"ok"
    origin.route("/swr-fields", fn)
    url = f"{origin.url}/swr-fields"
    client = ("-H", "User-Agent: relais-test/1", "-H", "Accept-Language: fr", "-H", "Cookie: a=1",
              "-H", "Cookie: b=2", "-H", 'If-None-Match: "client-own"', "-H", "X-Trace: t1",
              "-H", "X-Name: José 東京")
    assert fetch(cproxy, url, *client)[:3:2] == (200, b"ok")
    time.sleep(2.3)  # stale
    assert fetch(cproxy, url, *client)[:3:2] == (200, b"ok")  # served stale, refreshed in the background
    end = time.monotonic() + 10
    while len(seen) < 2 and time.monotonic() < end:
        time.sleep(0.05)
    assert len(seen) == 2
    refresh = {k.lower(): v for k, v in seen[1].items()}
    assert refresh["user-agent"] == "relais-test/1" and refresh["accept-language"] == "fr"
    assert refresh["x-trace"] == "t1" and refresh["cookie"] == "a=1; b=2"
    assert refresh["x-name"] == {k.lower(): v for k, v in seen[0].items()}["x-name"]  # the client's bytes
    assert refresh["if-none-match"] == '"v1"'  # the stored response's validator, not the client's
    time.sleep(0.3)
    assert fetch(cproxy, url, *client)[:3:2] == (200, b"ok")  # the refreshed copy, not a 403
    assert len(seen) == 2


@pytest.mark.parametrize("keep", [True, False])
def test_set_cookie_is_sent_with_hits_unless_hit_set_cookie_is_off(start_proxy, origin, tmp_path, keep):
    """RFC 9111 7.3: a Set-Cookie does not stop a shared cache from reusing a response (the default);
    with hit_set_cookie false, as Squid does, only the client whose request reached the origin gets
    it, also after a revalidation whose 304 repeats it, and from what was stored before the option
    changed (a restart on the same disk cache)."""
    p = start_proxy(options={"cache_dir": str(tmp_path / "c"), "hit_set_cookie": keep})
    n = []

    def fn(seen):
        n.append(1)
        if {k.lower(): v for k, v in seen.headers.items()}.get("if-none-match") == '"c1"':
            return 304, {"ETag": '"c1"', "Set-Cookie": "session=again", "Cache-Control": "max-age=60"}, b""
        return 200, {"Cache-Control": "max-age=600", "ETag": '"c1"', "Set-Cookie": "session=first-client"}, b"page"
    origin.route("/cookie", fn)
    url = f"{origin.url}/cookie"
    assert fetch(p, url)[1]["set-cookie"] == "session=first-client"
    hit = fetch(p, url)[1]
    refreshed = fetch(p, url, "-H", "Cache-Control: max-age=0")[1]  # revalidated: 304
    assert codes(p, url, 3) == ["TCP_MISS/200", "TCP_MEM_HIT/200", "TCP_REFRESH_UNMODIFIED/200"] and len(n) == 2
    if keep:
        assert hit["set-cookie"] == "session=first-client" and refreshed["set-cookie"] == "session=again"
    else:
        assert "set-cookie" not in hit and "set-cookie" not in refreshed
    wait_stored(tmp_path / "c", "/cookie")
    p.stop()
    p = start_proxy(options={"cache_dir": str(tmp_path / "c"), "hit_set_cookie": not keep})
    after = fetch(p, url)[1]
    assert codes(p, url, 1) == ["TCP_HIT/200"] and len(n) == 2
    assert ("set-cookie" in after) is (not keep)


def test_a_response_without_date_gets_one_from_the_cache(cproxy):
    """RFC 9110 6.6.1: a cache with a clock adds the Date an origin left out, to the response it
    forwards and to the copy it stores (so that hits carry it too)."""
    answer = b"HTTP/1.1 200 OK\r\nCache-Control: max-age=60\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
    with scripted_server(answer) as port:
        url = f"http://127.0.0.1:{port}/no-date"
        before = time.time()
        status, first, body = fetch(cproxy, url)
        assert (status, body) == (200, b"ok")
        date = email.utils.parsedate_to_datetime(first["date"]).timestamp()
        assert before - 1 <= date <= time.time() + 1
        status, hit, body = fetch(cproxy, url)
        assert (status, body, hit["date"]) == (200, b"ok", first["date"])
        assert codes(cproxy, url, 2) == ["TCP_MISS/200", "TCP_MEM_HIT/200"]


def test_stale_while_revalidate_refreshes_through_the_upstream_proxy(start_proxy, origin, tmp_path):
    """In upstream mode the background refresh goes through the upstream proxy too (here the origin
    plays the proxy: the host name exists nowhere else)."""
    n = []

    def fn(seen):
        n.append(seen.path)
        max_age = 2 if len(n) == 1 else 600  # the refreshed version stays fresh, however slow the machine
        return 200, {"Cache-Control": f"max-age={max_age}, stale-while-revalidate=60"}, f"version {len(n)}".encode()
    origin.route("/swr-up", fn)
    p = start_proxy(modes=(f"upstream:{origin.url}",), options={"cache_dir": "none"})
    url = "http://only-upstream-knows.invalid/swr-up"
    assert fetch(p, url)[2] == b"version 1"
    time.sleep(2.3)
    assert fetch(p, url)[2] == b"version 1"      # stale, refreshed in the background
    end = time.monotonic() + 10
    while fetch(p, url, "-H", "Cache-Control: max-stale")[2] != b"version 2" and time.monotonic() < end:
        time.sleep(0.05)
    assert fetch(p, url)[2] == b"version 2"
    assert n == [url, url], "both requests, the refresh too, reached the upstream proxy in absolute form"


def test_hung_background_refreshes_stall_neither_name_lookups_nor_the_exit(start_proxy, origin):
    """Refreshes of stale-while-revalidate entries whose origins hang keep their own threads, at
    most two per origin: asyncio's default pool (at most 32 threads), which resolves the host names
    of new upstream connections, stays free, and the proxy still exits at once on Ctrl-C."""
    release = threading.Event()
    seen_paths: list[tuple[str, str]] = []

    def fn(seen):
        where = (seen.headers.get("host", ""), seen.path)
        first = where not in seen_paths
        seen_paths.append(where)
        if not first:
            release.wait(20)  # the refresh hangs until the test ends
        return 200, {"Cache-Control": "max-age=1, stale-while-revalidate=60"}, b"v"
    origins = [Origin(host=f"127.0.0.{i}") for i in range(2, 19)]  # 17 origins, two refreshes each
    p = start_proxy(options={"cache_dir": "none"})
    try:
        for o in origins:
            o.route("/swr-hang", fn)
        urls = [f"{o.url}/swr-hang?k={i}" for o in origins for i in range(3)]
        for u in urls:
            fetch(p, u)
        time.sleep(2.2)
        for u in urls:
            assert fetch(p, u)[2] == b"v"  # served stale; two per origin start a refresh that hangs
        end = time.monotonic() + 5
        while len(seen_paths) < len(urls) + 2 * len(origins) and time.monotonic() < end:
            time.sleep(0.05)
        # "localhost": a name, which mitmproxy resolves in asyncio's default thread pool
        assert curl_status("-x", p.url, f"http://localhost:{origin.port}/after-hang", timeout=8) == 200
        p.proc.send_signal(signal.SIGINT)
        p.proc.wait(8)  # refreshes still hung: the exit does not wait for them
    finally:
        release.set()
        for o in origins:
            o.close()


def test_a_304_that_changes_vary_drops_the_stored_response_instead_of_keeping_it_under_its_old_key(cproxy, origin):
    def fn(seen):
        if seen.headers.get("if-none-match") == '"x"':
            return 304, {"ETag": '"x"', "Vary": "User-Agent", "Cache-Control": "max-age=600"}, b""
        ua = seen.headers.get("user-agent", "")
        return 200, {"ETag": '"x"', "Vary": "Accept-Encoding", "Cache-Control": "max-age=1"}, f"for {ua}".encode()
    origin.route("/vary-change", fn)
    url = f"{origin.url}/vary-change"
    assert fetch(cproxy, url, "-A", "alice")[2] == b"for alice"
    time.sleep(2.2)
    assert fetch(cproxy, url, "-A", "alice")[2] == b"for alice"  # revalidated: 304, now Vary: User-Agent
    assert fetch(cproxy, url, "-A", "bob")[2] == b"for bob"      # not alice's, kept under the old key
    assert origin.hits["/vary-change"] == 3


def test_only_if_cached_on_stale_entry_is_504(cproxy, origin):
    url = f"{origin.url}/oics?h.Cache-Control=max-age=1"
    fetch(cproxy, url)
    time.sleep(1.3)
    assert fetch(cproxy, url, "-H", "Cache-Control: only-if-cached")[0] == 504
    assert fetch(cproxy, url, "-H", "Cache-Control: only-if-cached, max-stale")[0] == 200
    assert origin.hits["/oics"] == 1


def test_a_websocket_upgrade_is_never_answered_from_the_cache(cproxy):
    """A protocol switch is the origin's to accept: a stored response to the same URL must not answer it."""
    o = Origin()
    try:
        o.route("/ws", lambda s: (200, {"Cache-Control": "max-age=60"}, b"page"))
        url = f"{o.url}/ws"
        assert fetch(cproxy, url)[2] == b"page"
        assert fetch(cproxy, url)[2] == b"page"
        assert o.hits["/ws"] == 1  # stored
        upgrade = ("-H", "Connection: Upgrade", "-H", "Upgrade: websocket", "-H", "Sec-WebSocket-Version: 13",
                   "-H", "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==")
        fetch(cproxy, url, *upgrade)
        assert o.hits["/ws"] == 2
        assert o.requests[-1].headers.get("upgrade") == "websocket"
    finally:
        o.close()


def test_hits_to_http2_clients_have_lower_case_field_names(start_proxy, tls_origin, tmp_path):
    """RFC 9113 8.2.1: a field name with upper case makes an HTTP/2 response malformed. With
    normalize_outbound_headers off mitmproxy sends the cache's fields as they are: a hit with
    `Age` or `X-Cache` was a stream error for the client."""
    p = start_proxy(options={"cache_dir": str(tmp_path / "c"), "connection_strategy": "lazy",
                             "normalize_outbound_headers": False})
    url = f"{tls_origin.url}/h2?h.Cache-Control=max-age=60"
    for _ in range(2):
        r = curl("--http2", "-s", "-D", "-", "--cacert", p.ca, "-x", p.url, url)
        assert r.returncode == 0 and b"\r\n\r\nHTTP/2 200" in r.stdout, (r.returncode, r.stdout[:300], r.stderr)
        assert r.stdout.endswith(b"hello /h2")
    assert tls_origin.hits["/h2"] == 1
    assert [l.split()[3] for l in p.wait_lines("/h2", 2)] == ["TCP_MISS/200", "TCP_MEM_HIT/200"]


def _chunked(body: bytes):
    return lambda: iter([b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)])


def test_a_304_the_cache_makes_from_a_new_chunked_200_has_no_body_framing(start_proxy, tmp_path):
    """The client's If-None-Match matched the origin's new 200 (chunked): the cache answers 304, which has no
    body (RFC 9112 6.3). Labelled chunked, it was followed by a last-chunk that broke the client's next response."""
    import http.client
    o = Origin()
    try:
        def cs(seen):  # the first answer goes stale; the second stays fresh for the request after it
            cc = "max-age=60" if o.hits["/cs"] > 1 else "max-age=1"
            return 200, {"Cache-Control": cc, "ETag": '"cs"', "Transfer-Encoding": "chunked"}, _chunked(b"chunked body")
        o.route("/cs", cs)
        p = start_proxy(options={"cache_dir": str(tmp_path / "c")})
        url = f"{o.url}/cs"
        conn = http.client.HTTPConnection("127.0.0.1", p.port, timeout=10)
        try:
            conn.request("GET", url)
            assert conn.getresponse().read() == b"chunked body"
            time.sleep(1.5)  # stale: revalidated, and the origin answers 200 again
            conn.request("GET", url, headers={"If-None-Match": '"cs"'})
            r = conn.getresponse()
            assert r.status == 304 and r.read() == b""
            assert r.getheader("Transfer-Encoding") is None and r.getheader("Content-Length") is None
            conn.request("GET", url)  # the same connection reads the next response cleanly
            r = conn.getresponse()
            assert (r.status, r.read()) == (200, b"chunked body")
        finally:
            conn.close()
        assert o.hits["/cs"] == 2
    finally:
        o.close()


def test_a_stored_204_is_served_without_a_content_length(cproxy):
    """RFC 9110 8.6: a 204 never carries Content-Length; the cache must not add one to its hits."""
    o = Origin()
    try:
        o.route("/nc", lambda s: (204, {"Cache-Control": "max-age=60"}, lambda: iter(())))
        url = f"{o.url}/nc"
        for _ in range(2):
            status, headers, body = fetch(cproxy, url)
            assert (status, body) == (204, b"") and "content-length" not in headers, headers
        assert o.hits["/nc"] == 1
    finally:
        o.close()


def test_a_large_body_of_unknown_length_is_stored_while_streamed_and_logged_with_its_size(start_proxy, tmp_path):
    """Chunked, past stream_large_bodies: mitmproxy starts streaming it only once that much is buffered,
    after the hooks. It was neither stored nor counted (logged with its head's size alone)."""
    body = bytes(range(256)) * 1200  # 307,200 bytes
    o = Origin()
    try:
        o.route("/chunked-big", lambda s: (200, {"Cache-Control": "max-age=600", "Transfer-Encoding": "chunked"},
                                           lambda: iter([b"%x\r\n%s\r\n" % (len(body[i:i + 65536]), body[i:i + 65536])
                                                         for i in range(0, len(body), 65536)] + [b"0\r\n\r\n"])))
        p = start_proxy(options={"cache_dir": str(tmp_path / "c"), "stream_large_bodies": "100k"})
        url = f"{o.url}/chunked-big"
        for _ in range(2):
            assert curl("-x", p.url, url).stdout == body
            wait_stored(tmp_path / "c", "/chunked-big")  # streamed bodies are stored on disk, in the writer's next batch
        assert o.hits["/chunked-big"] == 1
        lines = p.wait_lines("/chunked-big", 2)
        assert [l.split()[3] for l in lines] == ["TCP_MISS/200", "TCP_HIT/200"]
        assert all(len(body) < int(l.split()[4]) < len(body) + 500 for l in lines), lines
    finally:
        o.close()


def test_http2_on_both_sides_stays_valid_http2_with_the_cache_and_anonymize(start_proxy, cert, tmp_path):
    """With normalize_outbound_headers off, mitmproxy sends fields as the addons leave them: an upper-case
    X-Cache on a miss, or Via / X-Forwarded-For added to the request, made the stream malformed
    (RFC 9113 8.2.1) for the client or the origin."""
    from harness import H2Origin
    o = H2Origin(cert)
    try:
        p = start_proxy(options={"cache_dir": str(tmp_path / "c"), "normalize_outbound_headers": False,
                                 "anonymize": "transparent"})
        for _ in range(2):
            r = curl("--http2", "-s", "-D", "-", "--cacert", p.ca, "-x", p.url, f"{o.url}/both")
            assert r.returncode == 0 and b"\r\n\r\nHTTP/2 200" in r.stdout, (r.returncode, r.stdout[:300], r.stderr)
            assert r.stdout.endswith(b"h2 hello /both")
        assert o.errors == [] and len(o.requests) == 1
        assert any(k == "via" for k, _ in o.requests[0])  # anonymize's transparent level adds it
        assert [l.split()[3] for l in p.wait_lines("/both", 2)] == ["TCP_MISS/200", "TCP_MEM_HIT/200"]
    finally:
        o.close()


def test_virtual_hosts_behind_a_reverse_proxy_with_keep_host_header_get_their_own_entries(start_proxy, tmp_path):
    """keep_host_header: the backend sees the client's Host and answers for that site. Each site is cached on
    its own (PURGE included), and its background refresh asks the backend with the same Host."""
    o = Origin()
    try:
        o.route("/page", lambda s: (200, {"Cache-Control": "max-age=6, stale-while-revalidate=60"},
                                    f"site={s.headers['host']}".encode()))
        p = start_proxy(modes=(f"reverse:{o.url}",), options={"cache_dir": str(tmp_path / "c"),
                                                               "keep_host_header": True})
        get = lambda site, *a: curl("-H", f"Host: {site}", *a, f"http://127.0.0.1:{p.port}/page").stdout  # noqa: E731
        first = get("a.example")
        stored = time.time()  # its Date is no later
        assert [first, get("b.example"), get("a.example")] == [b"site=a.example", b"site=b.example",
                                                               b"site=a.example"]
        assert o.hits["/page"] == 2
        assert curl_status("-X", "PURGE", "-H", "Host: b.example", f"http://127.0.0.1:{p.port}/page") == 200
        assert get("a.example") == b"site=a.example" and o.hits["/page"] == 2  # a.example's entry stays
        time.sleep(max(0.0, stored + 6.3 - time.time()))  # stale: served, and refreshed in the background
        assert get("a.example") == b"site=a.example"
        end = time.monotonic() + 10
        while o.hits["/page"] < 3 and time.monotonic() < end:
            time.sleep(0.05)
        assert o.requests[-1].headers["host"] == "a.example"
    finally:
        o.close()


@pytest.mark.parametrize("site", ["a.example:8080", "[::1]:8080"])
def test_a_virtual_host_with_a_port_or_an_ipv6_address_is_invalidated_by_an_unsafe_request(start_proxy, tmp_path,
                                                                                           site):
    o = Origin()
    try:
        o.route("/v", lambda s: (200, {"Cache-Control": "max-age=60"}, f"{s.method} {s.headers['host']}".encode()))
        p = start_proxy(modes=(f"reverse:{o.url}",), options={"cache_dir": str(tmp_path / "c"),
                                                               "keep_host_header": True})
        url = f"http://127.0.0.1:{p.port}/v"
        assert curl("-H", f"Host: {site}", url).stdout == f"GET {site}".encode()
        assert curl("-H", f"Host: {site}", url).stdout == f"GET {site}".encode()
        assert curl("-H", f"Host: {site}", "-X", "POST", "-d", "x", url).stdout == f"POST {site}".encode()
        assert curl("-H", f"Host: {site}", url).stdout == f"GET {site}".encode()
        assert o.hits["/v"] == 3  # stored, invalidated by the POST, fetched again
        assert len(p.wait_lines("/v", 4)) == 4  # the POST is logged
    finally:
        o.close()


@pytest.mark.parametrize("location", ["http://www.example.com/item", "https://WWW.example.com/item", "/item"])
def test_a_virtual_hosts_location_by_its_public_name_invalidates_its_entry(start_proxy, tmp_path, location):
    """RFC 9111 4.4: the Location of a POST's answer, the backend naming the site by the name its clients use."""
    o = Origin()
    try:
        o.route("/item", lambda s: (200, {"Cache-Control": "max-age=60"}, f"item {len(o.requests)}".encode()))
        o.route("/items", lambda s: (201, {"Location": location}, b"created"))
        p = start_proxy(modes=(f"reverse:{o.url}",), options={"cache_dir": str(tmp_path / "c"),
                                                               "keep_host_header": True})
        url = f"http://127.0.0.1:{p.port}"
        get = lambda: curl("-H", "Host: www.example.com", f"{url}/item").stdout  # noqa: E731
        assert get() == get() == b"item 1"
        assert curl("-H", "Host: www.example.com", "-X", "POST", "-d", "x", f"{url}/items").stdout == b"created"
        assert get() == b"item 3" and o.hits["/item"] == 2
    finally:
        o.close()


def test_a_streamed_200_that_matches_the_clients_conditional_is_logged_as_the_200_it_was(start_proxy, tmp_path):
    """The client's If-None-Match matches the origin's new response, but that one was streamed (past
    stream_large_bodies): it already went out as a 200, and stays one in the flow the log is written from."""
    n = {"v": 0}

    def page(seen):
        n["v"] += 1
        if n["v"] == 1:
            return 200, {"Cache-Control": "max-age=1", "ETag": '"e1"'}, b"small"
        return 200, {"Cache-Control": "max-age=1", "ETag": '"e2"', "Transfer-Encoding": "chunked"}, _chunked(b"b" * 5000)
    o = Origin()
    try:
        o.route("/cond-big", page)
        p = start_proxy(options={"cache_dir": str(tmp_path / "c"), "stream_large_bodies": "1k"})
        url = f"{o.url}/cond-big"
        assert fetch(p, url)[2] == b"small"
        time.sleep(1.5)
        status, _, body = fetch(p, url, "-H", 'If-None-Match: "e2"')
        assert (status, body) == (200, b"b" * 5000)
        assert codes(p, url, 2) == ["TCP_MISS/200", "TCP_REFRESH_MODIFIED/200"]
    finally:
        o.close()


# --- a review of edge cases (session 19) ------------------------------------------------------------

def test_a_precondition_failure_or_an_unsatisfiable_range_is_never_stored(cproxy, origin):
    """412 and 416 answer one request's If-Match or Range, not the resource: stored (the origin sent
    max-age, as `add_header ... always` does), they would answer every later client. Squid never stores them."""
    def route(seen):
        headers = {"Cache-Control": "max-age=600", "Content-Type": "text/plain"}
        if "if-match" in seen.headers:
            return 412, headers, b""
        if seen.headers.get("range") == "bytes=500-600":
            return 416, {**headers, "Content-Range": "bytes */4"}, b""
        return 200, headers, b"body"
    origin.route("/precond", route)
    url = f"{origin.url}/precond"
    assert fetch(cproxy, url, "-H", 'If-Match: "nope"')[0] == 412
    assert fetch(cproxy, url)[:3:2] == (200, b"body")
    assert fetch(cproxy, url + "?r", "-r", "500-600")[0] == 416
    assert fetch(cproxy, url + "?r")[:3:2] == (200, b"body")
    assert origin.hits["/precond"] == 4


def test_a_newer_response_that_may_not_be_stored_replaces_the_stored_one(cproxy, origin):
    """RFC 9111 4: the most recent response is the one to use. A reload that gets `no-store` (or a body
    over maximum_object_size) leaves no older copy to be served afterwards, as Squid drops it."""
    state = {"cc": "max-age=600", "body": b"old"}
    origin.route("/newer", lambda seen: (200, {"Cache-Control": state["cc"]}, state["body"]))
    url = f"{origin.url}/newer"
    fetch(cproxy, url)
    assert fetch(cproxy, url)[2] == b"old" and origin.hits["/newer"] == 1  # stored
    state.update(cc="no-store", body=b"new")
    assert fetch(cproxy, url, "-H", "Cache-Control: no-cache")[2] == b"new"
    assert fetch(cproxy, url)[2] == b"new" and origin.hits["/newer"] == 3
    assert codes(cproxy, url, 4)[-1] == "TCP_MISS/200"


def test_invalidation_needs_only_the_status_of_the_unsafe_requests_answer(cproxy):
    """RFC 9111 4.4: a POST answered 200 changed the resource even if its answer's body is then cut off."""
    full = b"HTTP/1.1 200 OK\r\nCache-Control: max-age=600\r\nContent-Length: 3\r\nConnection: close\r\n\r\n"
    cut = b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\nConnection: close\r\n\r\n0123456789"
    with scripted_server(full + b"old", cut, full + b"new") as port:
        url = f"http://127.0.0.1:{port}/cut-post"
        assert fetch(cproxy, url)[2] == b"old"
        assert fetch(cproxy, url)[2] == b"old"  # a hit: the server has no second answer for a GET
        curl("-x", cproxy.url, "-X", "POST", "-d", "x=1", url)  # the client gets an error
        assert fetch(cproxy, url)[2] == b"new"
        assert codes(cproxy, url, 4)[-1] == "TCP_MISS/200"


def test_waiting_clients_get_a_new_leader_when_the_first_client_leaves(cproxy, origin):
    """Collapsed forwarding: the first client's request is in flight, three more wait for its answer;
    it leaves before the answer. One of the three asks the origin in its place, the other two get
    that answer from the store (they used to go to the origin each)."""
    gate = threading.Event()

    def route(seen):
        if origin.hits["/leader-left"] == 1:
            gate.wait(20)  # the first request is answered only once its client has gone
        return 200, {"Cache-Control": "max-age=600"}, b"answer"
    origin.route("/leader-left", route)
    url = f"{origin.url}/leader-left"
    first = socket.create_connection(("127.0.0.1", cproxy.port))
    first.sendall(f"GET {url} HTTP/1.1\r\nHost: 127.0.0.1:{origin.port}\r\n\r\n".encode())
    end = time.monotonic() + 10
    while origin.hits.get("/leader-left", 0) < 1 and time.monotonic() < end:
        time.sleep(0.02)
    results = []
    threads = [threading.Thread(target=lambda: results.append(fetch(cproxy, url))) for _ in range(3)]
    for t in threads:
        t.start()
    time.sleep(0.5)  # they have joined the first one's request
    first.close()
    for t in threads:
        t.join(20)
    gate.set()
    assert [r[2] for r in results] == [b"answer"] * 3
    assert origin.hits["/leader-left"] == 2


def test_a_reload_does_not_wait_for_another_clients_answer(cproxy, origin):
    """A request that would go to the origin anyway (Cache-Control: no-cache) is not collapsed onto a
    request in flight for the same URL: it reaches the origin while the other still waits."""
    gate = threading.Event()

    def route(seen):
        gate.wait(20)
        return 200, {"Cache-Control": "max-age=600"}, b"answer"
    origin.route("/reload-in-flight", route)
    url = f"{origin.url}/reload-in-flight"
    threads = [threading.Thread(target=fetch, args=(cproxy, url))]
    threads[0].start()
    end = time.monotonic() + 10
    while origin.hits.get("/reload-in-flight", 0) < 1 and time.monotonic() < end:
        time.sleep(0.02)
    threads.append(threading.Thread(target=fetch, args=(cproxy, url, "-H", "Cache-Control: no-cache")))
    threads[1].start()
    end = time.monotonic() + 10
    while origin.hits.get("/reload-in-flight", 0) < 2 and time.monotonic() < end:
        time.sleep(0.02)
    reached = origin.hits["/reload-in-flight"]
    gate.set()
    for t in threads:
        t.join(20)
    assert reached == 2


def test_a_range_on_a_head_is_ignored(cproxy, origin):
    """RFC 9110 14.2: Range is defined for GET only; a HEAD with one gets the whole response's header."""
    url = f"{origin.url}/head-range?h.Cache-Control=max-age=600"
    fetch(cproxy, url)
    status, headers, _ = fetch(cproxy, url, "-H", "Range: bytes=0-3", head=True)
    assert status == 200 and "content-range" not in headers and headers["content-length"] == "17"
    assert fetch(cproxy, url, "-r", "0-3")[:3:2] == (206, b"hell")


def test_an_object_larger_than_the_disk_tier_evicts_nothing(start_proxy, origin, tmp_path):
    """As Squid's cache_dir, the disk tier takes no object larger than itself: storing one would only
    evict everything else (cache_dir_size 1 MB here, maximum_object_size 4 MB)."""
    p = start_proxy(options={"cache_dir": str(tmp_path / "c"), "cache_dir_size": 1, "maximum_object_size": "4 MB",
                             "maximum_object_size_in_memory": "10 KB"})
    for i in range(10):
        fetch(p, f"{origin.url}/size/50000?n={i}&h.Cache-Control=max-age=600")
    fetch(p, f"{origin.url}/size/2000000?h.Cache-Control=max-age=600")

    def disk_entries() -> int:
        page = curl(f"{p.url}/squid-internal-mgr/storedir").stdout.decode()
        return int(page.split("Current entries: ")[1].split()[0])
    end = time.monotonic() + 10
    while disk_entries() < 10 and time.monotonic() < end:  # the disk writer puts them in the background
        time.sleep(0.1)
    time.sleep(0.5)  # and would have culled them for the big one
    assert disk_entries() == 10
    for i in range(10):
        fetch(p, f"{origin.url}/size/50000?n={i}&h.Cache-Control=max-age=600")
    assert origin.hits["/size/50000"] == 10  # all hits


def test_a_private_answer_for_one_variant_leaves_the_others(cproxy, origin):
    """Only the copy a newer response supersedes goes: a logged-in user's private answer (Vary: Cookie)
    does not remove the public one that anonymous users get."""
    def route(seen):
        if "cookie" in seen.headers:
            return 200, {"Cache-Control": "private", "Vary": "Cookie"}, b"yours"
        return 200, {"Cache-Control": "max-age=600", "Vary": "Cookie"}, b"public"
    origin.route("/variants", route)
    url = f"{origin.url}/variants"
    assert fetch(cproxy, url)[2] == b"public"
    assert fetch(cproxy, url, "-H", "Cookie: session=1")[2] == b"yours"
    assert fetch(cproxy, url)[2] == b"public"
    assert origin.hits["/variants"] == 2 and codes(cproxy, url, 3)[-1] == "TCP_MEM_HIT/200"
