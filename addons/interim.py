"""Interim (1xx) responses from origins, relayed to the client as Squid relays them.

mitmproxy (11 and, at the time of writing, its newest release) reads the first response
head an HTTP/1 origin sends as the final response. A `103 Early Hints` or `102 Processing`
sent before the real answer then becomes the answer: its headers are relayed as if final,
the real response is dropped, and the client waits for a body that never comes. The cache
would store the interim as the response. RFC 9110 15.2 says a proxy MUST forward 1xx
responses (unless it asked for them itself) and that a cache never stores them.

While this addon is loaded, mitmproxy's HTTP/1 client skips interim heads (101 aside,
which switches protocols) and reads the final response after them. Each interim response
is sent to the client, minus its hop-by-hop fields (RFC 9110 7.6.1), when `relay_interim`
is on and the client speaks HTTP/1.1 or HTTP/2 (RFC 9110 15.2 forbids 1xx to an HTTP/1.0
client). `100 Continue` is never relayed: mitmproxy answers a client's
`Expect: 100-continue` itself and does not pass the expectation on. No flow hook sees an
interim response; the final one is answered, stored and logged as usual. An HTTP/1 client
that got an interim response still gets the error page if the origin then fails.

An HTTP/2 origin's interim responses, which mitmproxy's HTTP/2 client drops, are relayed
the same way to HTTP/2 clients and to HTTP/1.1 clients that negotiated http/1.1 by ALPN.

    mitmdump -s addons/interim.py
"""
from __future__ import annotations

import logging
import re
import sys
import time
from pathlib import Path

from mitmproxy import http
from mitmproxy.net.http import http1, status_codes
from mitmproxy.proxy import events

try:  # mitmproxy's internal HTTP layers: what moved in another version is left to mitmproxy
    from mitmproxy.proxy.commands import CloseConnection, SendData
    from mitmproxy.proxy.layers.http import ReceiveHttp, ResponseHeaders, ResponseProtocolError, SendHttp
    from mitmproxy.proxy.layers.http import _http1, _http2
    import h2.events
except ImportError:  # pragma: no cover - another mitmproxy
    _http1 = _http2 = None
Http1Client = getattr(_http1, "Http1Client", None)
Http2Client = getattr(_http2, "Http2Client", None)
H1_READ, H2_EVENT = (Http1Client, "read_headers"), (Http2Client, "handle_h2_event")  # keys of Interim.originals

try:
    from addons.recover import BAD_GATEWAY
    from addons.rfc9111 import HOP_BY_HOP
except ImportError:  # loaded by path without the project installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from addons.recover import BAD_GATEWAY
    from addons.rfc9111 import HOP_BY_HOP

logger = logging.getLogger(__name__)

# "HTTP/1.x 1nn " where nn is not 01 (101 Switching Protocols ends HTTP/1 on the connection)
INTERIM = re.compile(rb"HTTP/1\.[01] 1(?!01)\d\d[ \r\n]")


def interim_next(buf) -> bool:
    """True if the next response head in mitmproxy's receive buffer is a 1xx other than 101."""
    data = getattr(buf, "_data", None)  # h11's ReceiveBuffer keeps a bytearray: look without copying it all
    start = bytes(data[:13]) if data is not None else bytes(buf)[:13]
    return INTERIM.match(start) is not None


def relayed(status: int) -> bool:
    """The interim responses passed on: not 100 Continue (mitmproxy answers a client's Expect itself),
    not 101 Switching Protocols (it ends HTTP/1 on the connection, and HTTP/2 forbids it)."""
    return 102 <= status < 200


def strip_hop_by_hop(response) -> None:
    listed = {t.strip().lower() for v in response.headers.get_all("connection") for t in v.split(",")}
    for name in HOP_BY_HOP | listed:
        response.headers.pop(name, None)


def to_client(context, stream_id: int, response, http2_client: bool):
    """The command that sends an interim response to the client, minus its hop-by-hop fields."""
    strip_hop_by_hop(response)
    if http2_client:  # its own HEADERS frame on the client's stream
        return SendHttp(ResponseHeaders(stream_id, response), context.client)
    # HTTP/1.1: written as is, since mitmproxy's HTTP/1 server would take it for the response's
    # head and then send no error page if the origin failed
    response.http_version = "HTTP/1.1"
    response.reason = response.reason or status_codes.RESPONSES.get(response.status_code, "")
    return SendData(context.client, http1.assemble_response_head(response))


class Interim:
    name = "interim"
    originals: dict = {}  # (class, method name) -> mitmproxy's method, kept once replaced (see done)

    def load(self, loader):
        loader.add_option(
            "relay_interim", bool, True,
            "Send origins' 1xx interim responses (102 Processing, 103 Early Hints) on to HTTP/1.1 and "
            "HTTP/2 clients, as Squid does; off drops them. Either way the final response that follows "
            "is the one answered, cached and logged (mitmproxy alone would take an HTTP/1 origin's 1xx "
            "for the final response, and drop an HTTP/2 origin's).",
        )
        patches = ((Http1Client, "read_headers", read_headers, "HTTP/1"),
                   (Http2Client, "handle_h2_event", h2_event, "HTTP/2"))
        for cls, name, ours, layer in patches:
            if not callable(getattr(cls, name, None)) or \
                    (layer == "HTTP/2" and not callable(getattr(_http2, "parse_h2_response_headers", None))):
                logger.warning("interim: this mitmproxy's %s layer is not the one expected; 1xx interim "
                               "responses from %s origins are left to mitmproxy", layer, layer)
                continue
            if getattr(cls, name) is not ours:
                Interim.originals.setdefault((cls, name), getattr(cls, name))
                setattr(cls, name, ours)

    def done(self):
        # The originals are kept: a live connection holds our read_headers as its bound `state`
        # and still calls it (and the original through it) after this.
        for (cls, name), original in Interim.originals.items():
            setattr(cls, name, original)


def read_headers(self, event):
    """Http1Client.read_headers, with interim response heads taken off the front first.

    A plain function: without an interim head next (nearly always) it returns mitmproxy's own
    generator, so the response is read with no extra generator layer in between."""
    if isinstance(event, events.DataReceived) and self.request is not None and self.buf and interim_next(self.buf):
        return _skip_interim(self, event)
    return Interim.originals[H1_READ](self, event)


def _skip_interim(self, event):
    while self.buf and interim_next(self.buf):
        lines = self.buf.maybe_extract_lines()
        if lines is None:
            return  # the interim head is not complete yet: wait for more
        try:
            response = http1.read_response_head([bytes(x) for x in lines])
        except ValueError as e:
            yield CloseConnection(self.conn)
            yield ReceiveHttp(ResponseProtocolError(self.stream_id, f"Cannot parse HTTP response: {e}", BAD_GATEWAY))
            return
        # (an HTTP/3 client would take a second HEADERS frame as an error: mitmproxy 11 never
        # pairs one with an HTTP/1 origin anyway; RFC 9110 15.2: none to an HTTP/1.0 client)
        version = self.request.http_version
        if (getattr(self.context.options, "relay_interim", False) and relayed(response.status_code)
                and version in ("HTTP/1.1", "HTTP/2.0")):
            yield to_client(self.context, self.stream_id, response, http2_client=version == "HTTP/2.0")
        while self.buf and bytes(self.buf)[:1] in (b"\r", b"\n") and self.buf.maybe_extract_lines() == []:
            pass  # a stray empty line after the interim head
    if self.buf:
        yield from Interim.originals[H1_READ](self, event)


def h2_event(self, event):
    """Http2Client.handle_h2_event, relaying an informational response to the client."""
    if not isinstance(event, h2.events.InformationalResponseReceived):
        return (yield from Interim.originals[H2_EVENT](self, event))
    stream = self.their_stream_id.get(event.stream_id)
    alpn = self.context.client.alpn
    try:
        status, headers = _http2.parse_h2_response_headers(event.headers)
    except ValueError:
        status = 0
    # an HTTP/1.1 client meets an HTTP/2 origin when its ALPN list puts http/1.1 first and the
    # origin is connected later (lazily); a client without ALPN may be HTTP/1.0: none for it
    if (not getattr(self.context.options, "relay_interim", False) or stream is None
            or not relayed(status) or alpn not in (b"h2", b"http/1.1")):
        return (yield from Interim.originals[H2_EVENT](self, event))
    response = http.Response(b"HTTP/2.0", status, b"", headers, None, None, time.time(), None)
    yield to_client(self.context, stream, response, http2_client=alpn == b"h2")
    return False


addons = [Interim()]
