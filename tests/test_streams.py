"""addons/streams.py: wrapping a body's stream now, or when mitmproxy streams it after the hooks."""
from __future__ import annotations

from mitmproxy import http
from mitmproxy.test import tflow

from addons import streams


def tagger(tag: str, seen: list):
    def wrapper(inner):
        seen.append(tag)
        return lambda chunk: (inner(chunk) if inner else chunk) + tag.encode()
    return wrapper


def test_a_streamed_response_is_wrapped_at_once_around_its_callable():
    r = http.Response.make(200, b"")
    r.stream = lambda chunk: chunk.upper()
    seen: list = []
    streams.wrap(r, tagger("a", seen))
    assert seen == ["a"] and r.stream(b"x") == b"Xa"


def test_a_response_streamed_later_gets_the_wrappers_in_order_when_mitmproxy_sets_true():
    r = http.Response.make(200, b"")
    seen: list = []
    streams.wrap(r, tagger("a", seen))
    streams.wrap(r, tagger("b", seen))
    assert r.stream is False and seen == []  # not streamed: mitmproxy keeps buffering
    r.stream = True  # what mitmproxy does past stream_large_bodies
    assert seen == ["a", "b"] and r.stream(b"x") == b"xab"
    assert isinstance(r, http.Response)


def test_a_failing_wrapper_is_skipped_not_raised_into_mitmproxy(caplog):
    r = http.Response.make(200, b"")

    def broken(inner):
        raise OSError("disk full")
    streams.wrap(r, broken)
    streams.wrap(r, tagger("b", []))
    r.stream = True
    assert r.stream(b"x") == b"xb" and "disk full" in caplog.text


def test_a_flow_with_such_a_response_still_copies_and_serializes():
    f = tflow.tflow(resp=True)
    streams.wrap(f.response, tagger("a", []))
    g = f.copy()
    assert g.response.content == f.response.content and g.response.stream is False
    assert f.get_state()["response"]["status_code"] == 200
