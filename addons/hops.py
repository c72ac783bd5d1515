"""Hop-by-hop fields and Max-Forwards, as a proxy must handle them (RFC 9110 7.6), as Squid does.

mitmproxy passes on what a client or an origin names in its Connection field as meant for
the next hop only (`Connection: keep-alive, X-Hop` sends X-Hop on), and Keep-Alive. This
addon removes those fields from requests and responses (and an HTTP/1 request's TE, which
invites trailers), and their names from Connection,
which keeps only the options mitmproxy itself reads there (close, keep-alive, upgrade).
Framing and routing fields (Host, Content-Length, Transfer-Encoding, Upgrade) are never
removed, whoever names them: mitmproxy has already framed the message by them; nor are
Expect and Max-Forwards, which the proxy acts on itself.

TRACE and OPTIONS with `Max-Forwards: 0` are answered here (RFC 9110 7.6.2): TRACE with
the request as received (message/http; without its hop-by-hop fields, credentials and
cookies), OPTIONS
with 200 and the methods the proxy relays; with a larger value, the request goes on with
the value decreased by one. Other methods' Max-Forwards is left alone, as RFC 9110 allows.
Answers are logged TCP_MISS/200 with HIER_NONE, as Squid logs them.

A forward proxy's request in absolute form (`GET http://site/ HTTP/1.1`) names its target in
the URL: a Host field that names another (or more than one Host field) is replaced by the
URL's (RFC 9112 3.2.2), as Squid does (not inside a CONNECT tunnel: there Host names the
site); mitmproxy would send it on, and the origin would answer for a site the client did not
ask for (and the log, the access rules and the cache would name another).

An HTTP/1.0 client asking to keep its connection gets `Connection: keep-alive` on answers
whose length it knows (mitmproxy keeps the connection but does not say so). An answer to HEAD
goes without a body, whoever made it (mitmproxy would send the body of the proxy's own pages,
and a client keeping its connection would read it as the next response).

As Squid, it refuses requests whose header fields pass `request_header_max_size` (431
ERR_TOO_BIG), URLs longer than 8 KB (414 ERR_TOO_BIG), a NUL in a field (400), a method that is
no token (400) and another major HTTP version (505 ERR_UNSUP_HTTPVERSION; HTTP/1.2 goes on as
HTTP/1.1); it unfolds folded lines (obs-fold, RFC 9112 5.2), and replaces a response whose
fields pass `reply_header_max_size` by 502 ERR_TOO_BIG. A standard method written in lower
case (`get`) goes on in upper case, as the rest of Relais reads it and as Squid sends it.

    mitmdump -s addons/hops.py
"""
from __future__ import annotations

import re
import sys
from itertools import chain
from pathlib import Path

from mitmproxy import ctx, http
from mitmproxy.net.http.url import hostport

try:
    from addons import answered, meta
except ImportError:  # loaded by path without the project installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from addons import answered, meta

OPTIONS_READ = frozenset({"close", "keep-alive", "upgrade"})  # connection options mitmproxy acts on itself
# fields the proxy itself acts on before forwarding (framing, routing, 100-continue, Max-Forwards)
NEVER_REMOVED = frozenset({"host", "content-length", "transfer-encoding", "upgrade", "expect", "max-forwards"})
ALWAYS_HOP = ("keep-alive",)  # hop-by-hop even when not named (RFC 9110 7.6.1); Proxy-Connection: anonymize
# and TE of an HTTP/1 request, as Squid removes it: it invites trailers, which mitmproxy 11 cannot relay
# over HTTP/1 (it drops the connection); HTTP/2 allows only "TE: trailers", which gRPC needs end to end
HTTP1_REQUEST_HOP = ("keep-alive", "te")
NOT_TRACED = frozenset({"authorization", "proxy-authorization", "cookie"})  # RFC 9110 9.3.8: sensitive
ALLOW = "GET, HEAD, POST, PUT, DELETE, PATCH, OPTIONS, TRACE, CONNECT"
# the field names that call for a look at all (most messages have none: one pass over raw names)
REQUEST_SIGNS = frozenset({b"connection", b"keep-alive", b"te", b"max-forwards"})
RESPONSE_SIGNS = frozenset({b"connection", b"keep-alive"})
# methods of RFC 9110 and WebDAV: sent on in upper case whatever case the client wrote (mitmproxy's
# Request.method, which the rules, the cache and the log read, is upper case already), as Squid does
KNOWN_METHODS = frozenset({b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"CONNECT", b"OPTIONS", b"TRACE", b"PATCH",
                           b"PROPFIND", b"PROPPATCH", b"MKCOL", b"COPY", b"MOVE", b"LOCK", b"UNLOCK", b"PURGE"})
_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110 5.6.2: what a method must be
# the HTTP version each kind of client connection carries, by its ALPN (mitmproxy picks its HTTP layer so)
ALPN_VERSIONS = {b"h2": b"HTTP/2.0", b"h3": b"HTTP/3"}
_FOLD = re.compile(rb"[ \t]*(?:\r\n|\r|\n)[ \t]*")  # a folded line (obs-fold), or a bare CR or LF: one space


def _has_any(headers: http.Headers, names: frozenset) -> bool:
    return any(k.lower() in names for k, _ in headers.fields)  # (Headers' own `in` costs a few us a name)


def _scan(headers: http.Headers, names: frozenset) -> tuple[bool, bytes | None, int]:
    """One pass over the raw fields: is any of `names` there, the (first) Host field's value, and
    how many Host fields there are."""
    sign, host, hosts = False, None, 0
    for k, v in headers.fields:
        low = k.lower()
        if low in names:
            sign = True
        elif low == b"host":
            hosts += 1
            if host is None:
                host = v
    return sign, host, hosts


def foreign_host(flow: http.HTTPFlow, host: bytes | None, hosts: int = 1, tunnels=()) -> str | None:
    """The URL's authority when the request came in absolute form to a forward proxy (plain HTTP/1,
    on a connection that made no CONNECT tunnel, whose requests name their site by Host) with a
    Host field naming another, or with more than one; else None."""
    req = flow.request
    data = req.data
    if host is None or data.http_version not in meta.HTTP1_VERSIONS:
        return None
    named = host.decode("utf-8", "surrogateescape")
    if hosts == 1 and (named == data.host or named == f"{data.host}:{data.port}"):
        return None  # (the usual case, decided first)
    client = flow.client_conn
    if client.tls or client.id in tunnels or meta.mode_name(flow) not in ("regular", "upstream"):
        return None
    want = hostport(req.scheme, data.host, data.port)
    return None if hosts == 1 and named.lower() == want.lower() else want


def header_size(headers: http.Headers, blob: bytes | None = None) -> int:
    """The size Squid's *_header_max_size limits: names and values, with ": " and CRLF each
    (`blob`: the fields joined, if the caller has them)."""
    if blob is None:
        blob = b"".join(chain.from_iterable(headers.fields))
    return len(blob) + 4 * len(headers.fields)


def strip_hop_fields(headers: http.Headers, always=ALWAYS_HOP) -> list[str]:
    """Remove the fields `headers` name in Connection and those in `always`; Connection keeps the
    options mitmproxy reads. Returns the names of the fields removed."""
    removed = [name for name in always if name in headers]
    for name in removed:
        del headers[name]
    if "connection" not in headers:
        return removed
    options = [o.strip() for value in headers.get_all("connection") for o in value.split(",") if o.strip()]
    kept = [o for o in options if o.lower() in OPTIONS_READ]
    for name in {o.lower() for o in options} - OPTIONS_READ:
        if name not in NEVER_REMOVED and name in headers:
            del headers[name]
            removed.append(name)
    if kept != options:
        if kept:
            headers["connection"] = ", ".join(kept)
        else:
            del headers["connection"]
    return removed


def max_forwards(headers: http.Headers) -> int | None:
    """The Max-Forwards value, or None when absent or not a number (then left as it is)."""
    value = headers.get("max-forwards", "").strip()
    return int(value) if value.isascii() and value.isdigit() and len(value) < 10 else None  # 1*DIGIT ("²" is no digit)


def trace_body(request: http.Request, absolute: bool) -> bytes:
    """A TRACE request as received, for its answer (message/http), minus credentials and cookies;
    `absolute`: its target in absolute form, as a client sends it to a forward proxy."""
    lines = [f"{request.method} {request.url if absolute else request.path} {request.http_version}"]
    lines += [f"{k}: {v}" for k, v in request.headers.items(multi=True) if k.lower() not in NOT_TRACED]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape")


def keep_alive_for_1_0(req: http.Request, resp: http.Response) -> None:
    """An HTTP/1.0 client that asked to keep its connection (`Connection: keep-alive`) keeps it only
    if the answer says so (RFC 9112 9.3, 1.0's keep-alive), as Squid's does; mitmproxy keeps such a
    connection open but does not say it, and the client (ab -k...) closes it. Only for an answer
    whose end the client can tell without the connection closing."""
    if not any(o.strip().lower() == "keep-alive" for v in req.headers.get_all("connection") for o in v.split(",")):
        return
    if "connection" in resp.headers:  # close (an early answer), or keep-alive already
        return
    if "content-length" in resp.headers or req.method == "HEAD" or resp.status_code in (204, 304) \
            or resp.status_code < 200:
        resp.headers["Connection"] = "keep-alive"


class Hops:
    def __init__(self) -> None:
        self.answering = answered.hold()
        # client connections that asked for a CONNECT tunnel: the requests inside name their site by Host
        self.tunnels: set[str] = set()
        self.header_max = 64 * 1024
        self.reply_max = 64 * 1024

    def load(self, loader) -> None:
        loader.add_option(
            "request_header_max_size", str, "64 KB",
            "Squid's request_header_max_size: a request whose header fields (names and values) are larger "
            "is refused with 431 ERR_TOO_BIG instead of being sent on (mitmproxy reads any size). 0: no limit.",
        )
        loader.add_option(
            "reply_header_max_size", str, "64 KB",
            "Squid's reply_header_max_size: a response whose header fields (names and values) are larger is "
            "replaced by 502 ERR_TOO_BIG, none of it sent on (mitmproxy relays any size). 0: no limit.",
        )
        self.answering.take()  # a TRACE's body, if any, is dropped once it is answered

    def configure(self, updated) -> None:
        if "request_header_max_size" in updated:
            self.header_max = meta.parse_size(ctx.options.request_header_max_size, "request_header_max_size")
        if "reply_header_max_size" in updated:
            self.reply_max = meta.parse_size(ctx.options.reply_header_max_size, "reply_header_max_size")

    def done(self) -> None:
        self.answering.release()

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        req = flow.request
        if flow.response is not None or flow.error:  # (mitmproxy refused it already: its own 400 goes)
            return
        data = req.data
        if data.method not in KNOWN_METHODS and not self._method(flow):
            return None
        if data.http_version not in meta.HTTP1_VERSIONS and not self._version(flow):
            return None
        if len(data.path) + len(data.host) > meta.MAX_URL:
            url = req.pretty_url
            return answered.refuse(flow, "ERR_TOO_BIG", "hops", f"URL longer than {meta.MAX_URL} bytes",
                                   url=f"{url[:200]}... ({len(url)} characters)", status=414)
        blob = b"".join(chain.from_iterable(req.headers.fields))  # one look at every byte of the fields, in C
        if self.header_max and header_size(req.headers, blob) > self.header_max:
            return answered.refuse(flow, "ERR_TOO_BIG", "hops", "header fields larger than request_header_max_size "
                                   f"({self.header_max} bytes)", status=431)
        if (b"\n" in blob or b"\r" in blob or b"\x00" in blob) and not self._clean(flow):  # (memchr each)
            return None
        sign, host, hosts = _scan(req.headers, REQUEST_SIGNS)
        if hosts and data.authority and data.http_version in meta.LOWER_CASE_VERSIONS:
            # RFC 9113 8.3.1: :authority names the site (the rules judged it); a host field, which mitmproxy
            # would send on to an HTTP/1 origin in its place, goes (mitmproxy then makes Host of :authority)
            del req.headers["host"]
            host, hosts = None, 0
        if (want := foreign_host(flow, host, hosts, self.tunnels)) is not None:
            req.host_header = want
            meta.add_comment(flow, f"Host {host.decode('utf-8', 'backslashreplace')!r} replaced by the URL's {want}")
        if not sign:
            return
        always = ALWAYS_HOP if req.is_http2 or req.is_http3 else HTTP1_REQUEST_HOP
        if removed := strip_hop_fields(req.headers, always):
            meta.add_comment(flow, f"hop-by-hop, not sent on: {', '.join(removed)}")
        if "max-forwards" in req.headers and req.method in ("TRACE", "OPTIONS"):
            self._max_forwards(flow)

    @staticmethod
    def _method(flow: http.HTTPFlow) -> bool:
        """A known method in lower case goes on in upper case; a method that is no token (RFC 9110 9.1,
        5.6.2) gets 400, as from Squid's parser (mitmproxy sent on `GE(T`). False when refused."""
        data = flow.request.data
        if data.method.upper() in KNOWN_METHODS:
            data.method = data.method.upper()
        elif not _TOKEN.fullmatch(data.method):
            answered.refuse(flow, "ERR_INVALID_REQ", "hops",
                            f"the method {data.method.decode('latin-1')!r} is no token (RFC 9110 9.1)")
            return False
        return True

    @staticmethod
    def _version(flow: http.HTTPFlow) -> bool:
        """RFC 9112 2.6: HTTP/1.x with a higher minor version is taken, and sent on, as HTTP/1.1; another
        major version (HTTP/9.9, or HTTP/2.0 in an HTTP/1 request line, which mitmproxy sent on) gets
        Squid's 505. HTTP/2 and HTTP/3 come on connections that chose them (ALPN). False when refused."""
        data = flow.request.data
        alpn = flow.client_conn.alpn
        if data.http_version == ALPN_VERSIONS.get(b"h3" if alpn and alpn.startswith(b"h3") else alpn):
            return True
        if data.http_version[:7] == b"HTTP/1." and data.http_version[7:].isdigit():
            meta.add_comment(flow, f"{data.http_version.decode()} taken as HTTP/1.1")
            data.http_version = b"HTTP/1.1"
            return True
        answered.refuse(flow, "ERR_UNSUP_HTTPVERSION", "hops",
                        f"HTTP version {data.http_version.decode('latin-1')!r} is not supported")
        return False

    def _clean(self, flow: http.HTTPFlow) -> bool:
        """RFC 9110 5.5 / RFC 9112 5.2: a field value with NUL is refused (400, as Squid); a folded
        line (obs-fold) is unfolded to one space before it is sent on. False when refused."""
        headers = flow.request.headers
        if any(b"\x00" in v for _, v in headers.fields):
            answered.refuse(flow, "ERR_INVALID_REQ", "hops", "a header field contains a NUL character")
            return False
        fields = tuple((k, _FOLD.sub(b" ", v)) for k, v in headers.fields)
        if fields != headers.fields:
            headers.fields = fields
            meta.add_comment(flow, "folded header lines (or a bare CR or LF) replaced by a space")
        return True

    def http_connect(self, flow: http.HTTPFlow) -> None:
        self.tunnels.add(flow.client_conn.id)
        # (mitmproxy's 200 would repeat the client's version: HTTP/9.9 200 Connection established)
        if flow.response is None and flow.request.data.http_version not in meta.HTTP1_VERSIONS:
            self._version(flow)

    def client_disconnected(self, client) -> None:
        self.tunnels.discard(client.id)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        resp = flow.response
        if resp is None:
            return
        if self.reply_max and meta.LOCAL not in flow.metadata and header_size(resp.headers) > self.reply_max:
            return self._refuse_reply(flow)
        if flow.request.data.http_version == b"HTTP/1.0":
            keep_alive_for_1_0(flow.request, resp)
        if meta.LOCAL in flow.metadata or not _has_any(resp.headers, RESPONSE_SIGNS):
            return
        strip_hop_fields(resp.headers)

    def response(self, flow: http.HTTPFlow) -> None:
        # RFC 9110 9.3.2: an answer to HEAD has no body, and mitmproxy sends whatever body the flow holds:
        # the proxy's own pages (an error, a denial) are made whole. The body goes; its length stays.
        resp = flow.response
        if resp is not None and resp.raw_content and flow.request.data.method == b"HEAD":
            resp.raw_content = b""

    def _refuse_reply(self, flow: http.HTTPFlow) -> None:
        """Squid's 502 ERR_TOO_BIG in place of a response whose header fields pass reply_header_max_size.
        The page replaces the response before its body is read, and goes out as that body's stream: the
        origin's bytes are dropped as they come (a page put in place alone would be sent with them)."""
        answered.refuse(flow, "ERR_TOO_BIG", "hops", "the response's header fields are larger than "
                        f"reply_header_max_size ({self.reply_max} bytes)", status=502, code="TCP_MISS", body_too=False)
        flow.metadata[meta.HIER] = meta.forwarded(flow)
        page = flow.response
        body = [page.content]  # (an answer to HEAD: none goes, see `response`)

        def instead(chunk: bytes) -> bytes:
            return body.pop() if body else b""
        page.stream = instead

    @staticmethod
    def _max_forwards(flow: http.HTTPFlow) -> None:
        req = flow.request
        hops = max_forwards(req.headers)
        if hops is None:
            return
        if hops > 0:
            req.headers["max-forwards"] = str(hops - 1)
            return
        if req.method == "TRACE":
            # a forward proxy's plain-HTTP request came in absolute form; one inside a CONNECT tunnel did not
            absolute = meta.mode_name(flow) in ("regular", "upstream") and req.scheme == "http"
            flow.response = http.Response.make(200, trace_body(req, absolute), {"Content-Type": "message/http"})
        else:
            flow.response = http.Response.make(200, b"", {"Allow": ALLOW})
        answered.refuse_body(flow)
        flow.metadata[meta.LOCAL] = "hops"
        meta.add_comment(flow, f"{req.method} with Max-Forwards: 0: answered by the proxy")


addons = [Hops()]
