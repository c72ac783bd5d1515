"""Wrapping a response body's stream, also when mitmproxy starts streaming it after the hooks.

An addon that copies (the cache) or counts (the access log) a streamed body sets
flow.response.stream to a callable in `responseheaders`. mitmproxy 11 also streams a
body of unknown length (chunked, HTTP/1.0 read up to the close, HTTP/2 without
Content-Length) once more than `stream_large_bodies` of it has been buffered: it sets
`stream = True` itself then, after the hooks have run, and that body would go by
unseen. `wrap` covers both cases: for a response not streamed yet, it turns the
response into a `_Late` (a subclass of http.Response, nothing else changed) whose
`stream` applies the registered wrappers to whatever is set, mitmproxy's True
included.
"""
from __future__ import annotations

import logging

from mitmproxy import http

log = logging.getLogger(__name__)


def may_stream(response: http.Response, late: bool) -> bool:
    """True if the response is streamed, or may be later: `late` (stream_large_bodies is set) and its
    length is unknown. Otherwise its body is buffered whole and wrapping it is useless."""
    return bool(response.stream) or (late and "content-length" not in response.headers)


def wrap(response: http.Response, wrapper) -> None:
    """Make `wrapper(inner)` the response's stream callable, `inner` being the callable it had (or
    None): now if the response is streamed, else when it is (wrappers apply in the order given). A
    wrapper may return None: it wraps nothing this time, and the stream stays as it was."""
    stream = response.stream
    if stream:
        response.stream = wrapper(stream if callable(stream) else None) or stream  # None: nothing to wrap in
        return
    if type(response) is http.Response:
        try:
            response.__class__ = _Late
        except TypeError:  # a layout that will not take it: such a body goes by unwrapped, as before
            return
    if isinstance(response, _Late):
        response.__dict__.setdefault("_wrappers", []).append(wrapper)


class _Late(http.Response):
    """An http.Response that may be switched to streaming after the hooks: see the module's text."""

    @property
    def stream(self):
        return self.__dict__.get("_stream", False)

    @stream.setter
    def stream(self, value):
        wrappers = self.__dict__.pop("_wrappers", None) if value else None
        if wrappers:  # set from inside mitmproxy's HTTP layer: a wrapper that fails is skipped, not raised
            fn = value if callable(value) else None
            for w in wrappers:
                try:
                    fn = w(fn)
                except Exception as e:
                    log.error("stream wrapper %s failed: %s", getattr(w, "__qualname__", w), e)
            value = fn or value
        self.__dict__["_stream"] = value
