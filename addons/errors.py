"""Squid-like answers when the origin cannot be reached.

mitmproxy answers a failed upstream connection with its own 502 page, sent
after the `error` hook. Squid answers 503 ERR_CONNECT_FAIL (refused,
unreachable, timeout) or 503 ERR_DNS_FAIL. So, before a request goes
upstream on a new connection, this addon checks that the origin resolves and
accepts connections (remembering a success for `connect_check_ttl` seconds,
so a busy origin costs one extra handshake per interval: requests that find it
unchecked while a check is in progress wait for that one), and answers with
Squid's page when it does not; an origin that fails mitmproxy's own
connection within that time gets the same page from the `error` hook
(addons/recover.py sends it instead of mitmproxy's 502). An origin that
accepts the request and then sends nothing usable gets Squid's 502 the same
way: ERR_ZERO_SIZE_OBJECT when it closes or resets the connection (mitmproxy
does not tell the two apart), ERR_INVALID_RESP when its answer is not HTTP,
ERR_READ_ERROR when it cuts short a response none of which was sent on yet
(one that mitmproxy buffers; a streamed one ends cut short for the client); a
failed TLS handshake with it (its certificate refused) gets 503 ERR_SECURE_CONNECT_FAIL.
Through a parent proxy (upstream mode) the same failures get the same pages,
the parent's answer to the CONNECT of intercepted HTTPS included, except that
a parent that cannot be reached gets 503 ERR_CANNOT_FORWARD, and one that
refuses the CONNECT gets mitmproxy's 502, which says with what status.
A request for the proxy's own address (a forwarding loop, which mitmproxy
refuses with a 502 of its own) gets Squid's 403 ERR_ACCESS_DENIED, as Squid
answers a loop. It also turns a failed CONNECT into Squid's 503, and runs
reverse-only proxies with the lazy connection strategy, so that a dead
backend gets an answer instead of a closed connection.

    mitmdump -s addons/errors.py
"""
from __future__ import annotations

import asyncio
import errno as errnos
import logging
import re
import socket
import sys
import time
from pathlib import Path

from mitmproxy import ctx, exceptions, http
from mitmproxy.proxy.mode_specs import ProxyMode

try:
    from addons import errorpage, listeners, meta, recover
except ImportError:  # loaded by path without the project installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from addons import errorpage, listeners, meta, recover


logger = logging.getLogger(__name__)


def only_reverse(modes) -> bool:
    """True when every listener is a reverse proxy."""
    try:
        parsed = [ProxyMode.parse(m) for m in modes]
    except ValueError:  # mitmproxy's proxyserver reports bad modes itself
        return False
    return bool(parsed) and all(m.type_name == "reverse" for m in parsed)


class Failure(Exception):
    def __init__(self, page: str, errno: int, reason: str, address: str | None):
        super().__init__(reason)
        self.page, self.errno, self.address = page, errno, address


async def check_origin(host: str, port: int, timeout: float) -> str:
    """Resolve and connect once; return the address, or raise Failure."""
    loop = asyncio.get_running_loop()
    try:
        infos = await asyncio.wait_for(
            loop.getaddrinfo(host, port, type=socket.SOCK_STREAM), timeout)
    except (socket.gaierror, UnicodeError, asyncio.TimeoutError) as e:
        raise Failure("ERR_DNS_FAIL", 0, f"cannot resolve {host}: {e}", None) from e
    last: Failure | None = None
    for _, _, _, _, sockaddr in infos:
        address = sockaddr[0]
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(address, port), timeout)
        except asyncio.TimeoutError:
            last = Failure("ERR_CONNECT_FAIL", errnos.ETIMEDOUT, "connection timed out", address)
            continue
        except OSError as e:
            last = Failure("ERR_CONNECT_FAIL", e.errno or 0, e.strerror or str(e), address)
            continue
        writer.close()
        return address
    raise last or Failure("ERR_DNS_FAIL", 0, f"no address for {host}", None)


class Errors:
    def __init__(self) -> None:
        self.reachable: dict[tuple[str, int], float] = {}
        self.suspect: set[tuple[str, int]] = set()  # upstream proxies a flow failed through: checked until one passes
        # checks in progress: the requests that find an origin unchecked meanwhile wait for the same one
        # (under load, every client connection open when the trust ran out would make its own)
        self.checking: dict[tuple[str, int], asyncio.Future] = {}
        self.listeners = listeners.Listeners()  # this proxy's own addresses: a request for them is a loop
        self.recovering = recover.hold()  # Squid's page can answer mitmproxy's own failures

    def load(self, loader):
        loader.add_option(
            "connect_timeout", int, 30,
            "Squid connect_timeout: seconds to wait for an origin to accept a connection before answering "
            "503 ERR_CONNECT_FAIL.",
        )
        loader.add_option(
            "connect_check_ttl", int, 2,
            "Seconds an origin that accepted a connection is trusted before it is checked again; "
            "0 checks before every new upstream connection.",
        )
        # an origin that fails mitmproxy's own connection gets Squid's page too (error hook)
        self.recovering.take()

    def configure(self, updated):
        for name in ("connect_timeout", "connect_check_ttl"):
            if name in updated and getattr(ctx.options, name) < 0:
                raise exceptions.OptionsError(f"{name}: must be 0 or more, not {getattr(ctx.options, name)}")
        if "connect_timeout" in updated and ctx.options.connect_timeout == 0:
            raise exceptions.OptionsError("connect_timeout: must be more than 0, not 0")
        if ("mode" in updated or "connection_strategy" in updated) and only_reverse(ctx.options.mode) \
                and ctx.options.connection_strategy == "eager":
            # Eagerly, mitmproxy connects to the backend before any HTTP hook and drops the
            # client when that fails; lazily, the request reaches the hooks, so a dead
            # backend gets Squid's 503 page, or a stale copy from the cache.
            logger.info("reverse proxy: connection_strategy set to lazy so a dead backend gets an answer")
            ctx.options.update(connection_strategy="lazy")

    def done(self):
        self.recovering.release()

    def running(self):
        self.listeners.running()

    def _to_self(self, flow: http.HTTPFlow) -> bool:
        """True when the request would go to one of this proxy's own listeners."""
        if flow.server_conn.timestamp_tcp_setup is not None or _parent(flow) is not None:
            return False
        return self.listeners.is_self(flow.request.host, flow.request.port)

    def request(self, flow: http.HTTPFlow):
        # Not a coroutine function: most requests need no check, and mitmproxy awaits what a hook
        # returns only when it is awaitable, so those cost no coroutine.
        if flow.response or flow.error or not flow.live:
            return None
        if self._to_self(flow):
            # mitmproxy refuses to connect to its own listeners (its 502 "destination unknown"); Squid
            # answers a forwarding loop with 403 ERR_ACCESS_DENIED
            logger.warning("forwarding loop: %s is this proxy's own address; denied", flow.request.pretty_url)
            answer(flow, Failure("ERR_ACCESS_DENIED", 0, "forwarding loop: the request is for this proxy itself",
                                 None))
            return None
        parent = _parent(flow)
        if parent is not None:  # checked only once a flow through it failed: each check is a connection
            return self._check(flow, parent, parent=True) if parent in self.suspect else None
        if flow.server_conn.timestamp_tcp_setup is not None:  # an intercepted or reverse flow may hold its own
            return None
        key = (flow.request.host, flow.request.port)
        if self.reachable.get(key, 0) > time.monotonic():
            return None
        return self._check(flow, key)

    async def _check(self, flow: http.HTTPFlow, key: tuple[str, int], parent: bool = False) -> None:
        check = self.checking.get(key)
        if check is None:
            check = self.checking[key] = asyncio.ensure_future(
                check_origin(*key, timeout=ctx.options.connect_timeout))
            check.add_done_callback(lambda done: self._checked(key, done))
        try:
            await asyncio.shield(check)  # a client that leaves does not cancel the others' check
        except Failure as f:
            self.reachable.pop(key, None)
            if parent:  # Squid's page when no parent takes the request; not remembered per origin by the cache
                f = Failure("ERR_CANNOT_FORWARD", f.errno, f"upstream proxy {key[0]}:{key[1]}: {f}", None)
            answer(flow, f)
            return
        if parent:
            self.suspect.discard(key)
            return
        if len(self.reachable) > 10000:  # a forward proxy sees many origins: stay bounded
            self.reachable.clear()
        self.reachable[key] = time.monotonic() + ctx.options.connect_check_ttl

    def _checked(self, key: tuple[str, int], done: asyncio.Future) -> None:
        if self.checking.get(key) is done:
            del self.checking[key]
        if not done.cancelled():
            done.exception()  # retrieved, even when every request waiting for it has gone

    def error(self, flow: http.HTTPFlow) -> None:
        # mitmproxy could not connect (an origin that died within connect_check_ttl of its last check, a
        # parent proxy): the next request checks again. The failure gets Squid's page now (sent by
        # recover.py instead of mitmproxy's 502), unless the cache answered with a stale copy. A
        # recoverable flow's response is that copy, or the head of a response cut short (recover.CUT).
        if flow.response is not None and not flow.metadata.get(meta.RECOVERABLE):
            return
        message = flow.error.msg if flow.error else ""
        parent = _parent(flow)
        if flow.metadata.get(meta.RECOVERABLE) == recover.CUT:  # the origin, or the parent, was reached
            peer = parent or flow.server_conn.peername
            failure = Failure("ERR_READ_ERROR", 0, message, str(peer[0]) if peer else None)
        elif parent is not None:
            failure = _parent_failure(message, parent)
            if failure is not None and failure.page == "ERR_CANNOT_FORWARD" and _origin_tls_failed(flow, message):
                failure = Failure("ERR_SECURE_CONNECT_FAIL", 0, message, parent[0])  # the origin's, through it
            else:
                self.suspect.add(parent)
        elif flow.server_conn.timestamp_tcp_setup is None or _ERRNO.search(message):
            # no connection, or an intercepted HTTPS flow whose connection mitmproxy opened again and could not
            self.reachable.pop((flow.request.host, flow.request.port), None)
            failure = _connect_failure(message)
        elif _origin_tls_failed(flow, message):
            peer = flow.server_conn.peername
            failure = Failure("ERR_SECURE_CONNECT_FAIL", 0, message, str(peer[0]) if peer else None)
        else:  # connected, then no usable response (closed, reset, garbage)
            failure = _read_failure(message, flow.server_conn.peername)
        if failure is None or not flow.metadata.get(meta.RECOVERABLE) or flow.metadata.get(meta.RECOVERED):
            return
        answer(flow, failure)
        if parent is not None and failure.address:  # the parent answered nothing usable: forwarded to it
            flow.metadata[meta.HIER] = meta.forwarded(flow)
        flow.metadata[meta.RECOVERED] = True

    def http_connect_error(self, flow: http.HTTPFlow) -> None:
        # mitmproxy's 502 "Cannot connect" becomes Squid's 503, logged NONE_NONE/503;
        # a refusal another addon made (a 403 from access control...) stays as it is.
        if flow.metadata.get(meta.LOCAL) or not flow.response or flow.response.status_code != 502:
            return
        detail = flow.response.get_text(strict=False)[:200]
        page = _connect_failure(detail).page  # ERR_DNS_FAIL for a name that does not resolve
        flow.response = errorpage.make(page, meta.hostport(flow.request.host, flow.request.port), detail=detail)
        flow.metadata[meta.CODE] = "NONE_NONE"
        flow.metadata[meta.ERROR] = page


def _parent(flow: http.HTTPFlow) -> tuple[str, int] | None:
    """The upstream proxy of an upstream-mode listener, or None."""
    mode = getattr(flow.client_conn, "proxy_mode", None)
    return tuple(mode.address) if getattr(mode, "type_name", "") == "upstream" else None


_ERRNO = re.compile(r"\[Errno (-?\d+)\]")  # how mitmproxy words an OSError of its own connection


def _connect_failure(message: str) -> Failure:
    """Squid's page for mitmproxy's own failed connection, from its message ("[Errno 111] Connect call
    failed ...", "[Errno -2] Name or service not known"...)."""
    m = _ERRNO.search(message)
    errno = int(m.group(1)) if m else 0
    dns = errno < 0 or any(w in message.lower() for w in ("name or service", "getaddrinfo", "resolve"))
    return Failure("ERR_DNS_FAIL" if dns else "ERR_CONNECT_FAIL", 0 if dns else errno, message or "connection failed",
                   None)


def _origin_tls_failed(flow: http.HTTPFlow, message: str) -> bool:
    """The TLS handshake with the origin failed (its certificate refused, no TLS, no common version):
    Squid's 503 ERR_SECURE_CONNECT_FAIL. Through a parent proxy, only when the parent is reached in
    plain HTTP: the TLS that failed was then the origin's, inside the parent's tunnel."""
    s = flow.server_conn
    if not s.tls or s.timestamp_tls_setup is not None or not _TLS_WORDS.search(message) or _ERRNO.search(message):
        return False
    mode = getattr(flow.client_conn, "proxy_mode", None)
    if getattr(mode, "type_name", "") == "upstream":  # (its server_conn, inside the tunnel, has no TCP of its own)
        return getattr(mode, "scheme", "http") == "http"
    return s.timestamp_tcp_setup is not None


# how mitmproxy's TLS layer words a failed handshake ("Certificate verify failed: ...", "OpenSSL Error(...)",
# "The remote server does not speak TLS.", "tlsv1 alert unknown ca", "sslv3 alert bad certificate"...)
_TLS_WORDS = re.compile(r"certificate|TLS|SSL|alert", re.IGNORECASE)


def _read_page(message: str, connect: bool = False) -> str | None:
    """Squid's 502 page for an answer that never came, or that is not HTTP, from mitmproxy's words for
    them; with `connect`, also from its words for a parent's answer to a CONNECT (in
    proxy/tunnel.py and proxy/layers/http/_upstream_proxy.py). None for another failure."""
    if message == "server closed connection" or (connect and message == "connection closed"):
        return "ERR_ZERO_SIZE_OBJECT"  # (a close and a reset: mitmproxy says the same of both)
    if message.startswith(("Cannot parse HTTP response", "unexpected server response")) or \
            (connect and message.startswith("Error connecting to")):
        return "ERR_INVALID_RESP"
    return None


def _read_failure(message: str, peer) -> Failure:
    """Squid's page for an origin that accepted the request and sent no usable response."""
    return Failure(_read_page(message) or "ERR_READ_ERROR", 0, message or "no response",
                   str(peer[0]) if peer else None)


def _parent_failure(message: str, parent: tuple[str, int]) -> Failure | None:
    """Squid's page for a parent proxy that took the request, or the CONNECT of an HTTPS one, and sent
    nothing usable (a 502 page), or that could not be reached (503 ERR_CANNOT_FORWARD: no parent takes
    the request). None for a parent that refused the CONNECT: mitmproxy's 502 says with what status.
    (In upstream mode the flow's server_conn says nothing of the connection to the parent.)"""
    if "refused HTTP CONNECT request" in message:
        return None
    page = _read_page(message, connect=True)
    if page:
        return Failure(page, 0, message, parent[0])
    errno = _connect_failure(message).errno
    return Failure("ERR_CANNOT_FORWARD", errno, f"upstream proxy {parent[0]}:{parent[1]}: {message}", None)


def answer(flow: http.HTTPFlow, f: Failure) -> None:
    flow.response = errorpage.make(f.page, flow.request.pretty_url, detail=str(f), errno=f.errno)
    flow.metadata[meta.LOCAL] = "errors"
    flow.metadata[meta.ERROR] = f.page
    if f.address:
        flow.metadata[meta.PEER] = f.address
        flow.metadata[meta.HIER] = "HIER_DIRECT"


addons = [Errors()]
