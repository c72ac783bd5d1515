"""An answer given in `requestheaders` to a request whose body mitmproxy streams.

With stream_large_bodies set, mitmproxy decides to stream a large request body before the
`requestheaders` hook; an addon that answers the request there (access control denying it,
the cache answering from a remembered failure) then makes mitmproxy 11's HTTP layer raise
("Can't set a response and enable streaming at the same time"): the client gets nothing
and waits until it gives up. Squid reads and discards the body of a request it refused.

While `install()` is in effect (the addons that answer at `requestheaders` call it at load),
such a body is read and dropped as it arrives, never held in memory, and the answer is sent
once the body has ended, after the `request` and `responseheaders` hooks, as mitmproxy does
for an answered request whose body it buffered; the flow keeps no request body (mitmweb shows
it missing, and it cannot be replayed). `refuse_body(flow)` asks for that also without
stream_large_bodies, where mitmproxy would hold the whole body in memory first. Nothing else
changes. Not an addon: a helper the addons that answer use.

A client that sent `Expect: 100-continue` waits for a "100 Continue" before it sends the
body; an answer made at `requestheaders` invites no body, so it is sent at once (RFC 9110
10.1.1: a final status instead of the 100), as Squid does, instead of after the client's
wait and upload (curl waits a second, then sends it all). The `request` hook then runs
before any body came (none is kept), and the flow ends with the answer. Over HTTP/1 the
answer asks the client to close the connection (`Connection: close`); what body it sends
anyway is read and dropped, and the connection closes at its end.
"""
from __future__ import annotations

import sys
import time
import types
import weakref
from pathlib import Path

from mitmproxy import flow as mflow

try:  # mitmproxy's internal HTTP layer: if it moves, nothing is changed and install() says so
    from mitmproxy.proxy.layers.http import (HttpErrorHook, HttpRequestHook, HttpResponseHeadersHook, HttpStream,
                                             RequestEndOfMessage, RequestTrailers, ResponseProtocolError,
                                             SendHttp)
    PATCHABLE = all(callable(getattr(HttpStream, name, None))
                    for name in ("start_request_stream", "send_response", "check_killed", "state_done",
                                 "state_errored"))
except ImportError:  # pragma: no cover - another mitmproxy
    PATCHABLE = False

try:
    from addons import errorpage, meta
    from addons.recover import BAD_GATEWAY, Hold, Patch
except ImportError:  # loaded by path without the project installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from addons import errorpage, meta
    from addons.recover import BAD_GATEWAY, Hold, Patch


def install() -> bool:
    """Drop the streamed body of an answered request (see the module's text)."""
    return _PATCH.install()


def hold() -> Hold:
    """An addon's use of install()/uninstall(): `hold().take()` at load, `.release()` at done."""
    return Hold(install, uninstall)


def refuse_body(flow) -> None:
    """For an addon answering a request at `requestheaders`: its body is not invited (no "100
    Continue"), and what the client sends anyway is read and dropped as it comes, never held in
    memory (while install() is in effect)."""
    expects = flow.request.headers.pop("expect", "")
    if _PATCH.users and flow.request.method != "CONNECT":  # (a CONNECT has no body)
        flow.request.stream = True
        if expects.strip().lower() == "100-continue":
            _WAITING.add(flow)  # the client waits for a 100 that will not come: answered at once


def refuse(flow, page: str, by: str, why: str, url: str | None = None, detail: str | None = None,
           status: int | None = None, code: str | None = "NONE_NONE", body_too: bool = True) -> None:
    """Answer a request with Squid's error page `page` (errorpage.PAGES) instead of forwarding it.
    The page shows `url` (default: the request's) and `detail` (default: `why`). With `body_too` (an
    answer made at requestheaders) the request's body is refused as by refuse_body. The metadata say
    that addon `by` answered (meta.LOCAL), with `code` (meta.CODE; None: left to the addons after it)
    and `page` (meta.ERROR); mitmweb's comment says "refused: <why>"."""
    flow.response = errorpage.make(page, flow.request.pretty_url if url is None else url,
                                   detail=why if detail is None else detail, status=status)
    if body_too:
        refuse_body(flow)
    flow.metadata[meta.LOCAL] = by
    if code is not None:
        flow.metadata[meta.CODE] = code
    flow.metadata[meta.ERROR] = page
    meta.add_comment(flow, f"refused: {why}")


def uninstall() -> None:
    _PATCH.uninstall()


_WAITING: weakref.WeakSet = weakref.WeakSet()  # answered flows whose client waits for a 100 Continue


def start_request_stream(self):
    """HttpStream.start_request_stream, except for a request already answered: its body is dropped."""
    if self.flow.response is None:
        return (yield from _PATCH.original(self))
    if self.flow in _WAITING:
        _WAITING.discard(self.flow)
        if not (self.flow.request.is_http2 or self.flow.request.is_http3):
            self.flow.response.headers["connection"] = "close"  # the body that may still come is not read on
        # done with the client's side: send_response ends the flow and drops the stream, whose body, if the
        # client sends it anyway, mitmproxy's HTTP layer then discards; a client that leaves fires no error hook
        self.client_state = self.state_done
        yield from _answer(self)
        return
    self.client_state = types.MethodType(_drop_request_body, self)


def _drop_request_body(self, event):
    """The client state of an answered request whose body still arrives: each chunk is dropped;
    at its end, the hooks and the answer, as state_consume_request_body has them."""
    if isinstance(event, RequestTrailers):
        self.flow.request.trailers = event.trailers
    if not isinstance(event, RequestEndOfMessage):
        return
    self.flow.request.timestamp_end = time.time()
    self.client_state = self.state_done
    yield from _answer(self)


def _answer(self):
    """The hooks and the answer of a request whose body is not kept, as state_consume_request_body has them."""
    yield HttpRequestHook(self.flow)
    if (yield from self.check_killed(True)):
        return
    if self.flow.response is None:  # a script took the answer back: the body it would need is gone
        msg = "the request was answered, then not, and its body was not kept"
        self.flow.error = mflow.Error(msg)
        yield HttpErrorHook(self.flow)
        yield SendHttp(ResponseProtocolError(self.stream_id, msg, BAD_GATEWAY), self.context.client)
        self.client_state = self.state_errored
        self.flow.live = False
        return
    self.flow.response.timestamp_start = time.time()
    yield HttpResponseHeadersHook(self.flow)
    if (yield from self.check_killed(True)):
        return
    yield from self.send_response()


_PATCH = Patch(HttpStream if PATCHABLE else None, "start_request_stream", start_request_stream,
               "this mitmproxy's HTTP layer is not the one expected: a request refused while its body is "
               "streamed (stream_large_bodies) may get no answer")
