"""The cache: an RFC 9111 shared HTTP cache in RAM and on disk, with negative caching.

    mitmdump -s addons/cache.py --set cache_mem="64 MB" --set cache_dir=var/cache

Decisions (storable? fresh? may it answer this request?) are in rfc9111.py;
bytes live in cachestore.py (RAM LRU + diskcache). This addon wires them to
mitmproxy's hooks:

- requestheaders: PURGE; Squid's cache / send_hit rules (cache policy, on the acls in
  relais.acls); lookups. A hit is answered right here (flow.response
  set, relais.local="cache", relais.code TCP_MEM_HIT / TCP_HIT /
  TCP_NEGATIVE_HIT / TCP_IMS_HIT / TCP_INM_HIT, HIER_NONE). A stale entry is
  revalidated (If-None-Match / If-Modified-Since added). Concurrent misses for
  one URL wait for the first (collapsed forwarding). Origins that could not
  be reached are remembered for negative_ttl (TCP_NEGATIVE_HIT).
- responseheaders: unsafe methods invalidate (RFC 9111 4.4), once the status
  is known; streamed responses (stream_large_bodies) are copied to a
  temporary file chunk by chunk, by wrapping flow.response.stream.
- response: 304 to a revalidation -> stored headers updated and the stored
  body served (TCP_REFRESH_UNMODIFIED); 200 -> replaced
  (TCP_REFRESH_MODIFIED); origin failure (its 5xx, or the errors addon's page)
  -> stale-if-error, or the error (TCP_REFRESH_FAIL_ERR); storable responses stored (a single-range 206 apart, for
  the ranges it holds), unless Squid's cache / store_miss rules keep them out; a newer
  response that is not stored drops the stored one (RFC 9111 4).
- error: an aborted transfer is never stored. A revalidation the origin failed
  before any response (refused mitmproxy's connection, closed or reset it) is
  answered with the stale entry stale-if-error or max_stale allows
  (TCP_REFRESH_FAIL_OLD), which addons/recover.py sends instead of mitmproxy's 502;
  else the error page that follows is logged TCP_REFRESH_FAIL_ERR, as Squid does.

Commands: cache.purge URL, cache.clear, cache.stats, cache.reload (re-reads the cache policy,
also done when its file changes; a broken file is refused and the last good policy stays).
"""
from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import ipaddress
import json
import logging
import os
import queue
import re
import socket
import ssl
import sys
import threading
import time
import urllib.request
from http.client import responses
from collections import Counter, OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple
from urllib.parse import quote, unquote, urljoin, urlsplit, urlunsplit

from mitmproxy import command, connection, ctx, exceptions, http
from mitmproxy.net.http.url import parse_authority
from mitmproxy.proxy.mode_specs import ReverseMode

try:
    from addons import aclrules, answered, cachestore, errorpage, meta, policyfile, recover, rfc9111, streams
except ImportError:  # loaded by path without the project installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from addons import aclrules, answered, cachestore, errorpage, meta, policyfile, recover, rfc9111, streams

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[1]
HOSTNAME = errorpage.HOSTNAME

# Stale-while-revalidate refreshes run in threads of their own, never in asyncio's default pool:
# that pool also resolves host names (mitmproxy's upstream connections, the ACL's DNS lookups), and a
# few slow origins would stall them all. Past these limits a stale entry is served unrefreshed (a later
# request asks again): refreshes queued or running at once, and per origin, so that one hung origin
# holds at most REFRESH_PER_ORIGIN of the threads.
REFRESH_THREADS = 4
REFRESH_MAX = 256
REFRESH_PER_ORIGIN = 2
# Request fields urllib sends whether asked or not: a variant stored for a request without one of
# them (and whose response varies on it) is not refreshed in the background.
ADDED_BY_URLLIB = frozenset({"connection", "host"})
INVALIDATED_MAX = 10_000  # invalidation times remembered (see Cache.invalidated)
REFRESH_TIMEOUT = 10   # seconds a refresh waits for any one read from the origin
REFRESH_DEADLINE = 30  # seconds a refresh may take in all (an origin could trickle its answer)
COLLAPSE_WAIT = 900  # seconds a collapsed request waits for the one it joined (Squid's read_timeout)

parse_size = meta.parse_size  # (Squid-style sizes, shared with other addons)


def resolve(path: str) -> Path:
    """A relative path as given if it exists from the cwd, else from the project root."""
    p = Path(path)
    if p.is_absolute() or p.exists():
        return p
    return ROOT / p


def primary_key(flow: http.HTTPFlow) -> str:
    """scheme://host:port/path?query of the resource, as the origin sees it.

    host:port is where the request goes: the URL's, the CONNECT or SOCKS target, the address a
    transparent client connected to, or in reverse mode the configured target. The origin answers
    for the site the request names (RFC 9112 3.2.2: an absolute-form target's authority, else
    Host), and a client chooses that name: when it is not host:port itself, it is part of the key,
    as the URL's user information (http://www.example.org@10.0.0.1:80/path, which no request path
    has). So a Host that differs from the URL, an absolute URL sent to a reverse-mode target, or
    sites sharing a transparent destination address never share entries, and no client can store
    one site's answer under another's key (in reverse mode, mitmproxy rewrites Host to the
    target unless keep_host_header passes the client's on: then each site has its own entries).
    """
    req = flow.request
    data = req.data
    mode = getattr(flow.client_conn, "proxy_mode", None)
    if isinstance(mode, ReverseMode):
        scheme = "https" if mode.scheme in ("https", "tls", "http3", "quic") else "http"
        host, port = mode.address
    else:
        scheme, host, port = data.scheme.decode(), data.host, data.port
    if data.authority and data.http_version in meta.HTTP1_VERSIONS:  # absolute-form, as mitmproxy forwards it
        named = data.authority.decode("utf-8", "surrogateescape")
    else:
        named = req.host_header
    if named and named != host and named != f"{host}:{port}":
        h, p = parse_authority(named, check=False)
        if h.lower() != host.lower() or (p or (443 if scheme == "https" else 80)) != port:
            # its ':' and '[]' quoted too, and bytes that are no UTF-8
            host = f"{quote(named.lower().encode('utf-8', 'surrogateescape'), safe='.-')}@{host}"
    path = req.path
    return f"{scheme}://{host.lower()}:{port}{path if path.isascii() else ascii_path(path)}"


def ascii_path(path: str) -> str:
    """The bytes of a path beyond ASCII percent-encoded (%XX, upper case), as a browser sends them:
    the raw bytes and that form are one key, and the key can go to the disk tier. mitmproxy keeps
    bytes that are not UTF-8 as lone surrogates, which SQLite refuses."""
    try:
        raw = path.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a surrogate that stands for no byte (a command's argument): kept apart
        raw = path.encode("utf-8", "surrogatepass")
    return "".join(chr(b) if b < 0x80 else f"%{b:02X}" for b in raw)


def url_key(url: str, base: str | None = None) -> str | None:
    """The primary key of an absolute URL, or of a reference relative to `base` (cache.purge,
    Location invalidation); None if it is no URL."""
    try:
        u = urlsplit(urljoin(base, url.strip()) if base else url.strip())
        port = u.port or (443 if u.scheme == "https" else 80)
    except ValueError:
        return None
    if u.scheme not in ("http", "https") or not u.hostname:
        return None
    path = u.path or "/"
    if u.query:
        path += "?" + u.query
    vhost = f"{u.username.lower()}@" if u.username else ""  # a virtual host of a reverse-mode key (primary_key)
    return f"{u.scheme}://{vhost}{u.hostname.lower()}:{port}{ascii_path(path)}"


_VHOST = re.compile(r"https?://([^/@]*)@")


def site_relative(key: str, headers):
    """A virtual host's key (reverse mode with keep_host_header: scheme://site@target/...) names the
    site the client asked for; the backend's absolute Location or Content-Location naming that site
    (by its public name, over http or https) is the same origin (RFC 9111 4.4): made relative, it
    resolves to that site's key. Other keys and fields are left as they are."""
    m = _VHOST.match(key)
    if m is None:
        return headers
    site = _host_port(unquote(m[1]))
    out = []
    for k, v in headers.items(multi=True) if hasattr(headers, "items") else headers:
        if k.lower() in ("location", "content-location"):
            try:
                u = urlsplit(v.strip())
                default = 80 if u.scheme == "http" else 443
                if u.scheme in ("http", "https") and u.hostname == site[0] and (u.port or default) == (
                        site[1] or default):  # (a site named without its port: the URL's scheme's)
                    v = urlunsplit(("", "", u.path or "/", u.query, u.fragment))
            except ValueError:  # a bad port: it names no site
                pass
        out.append((k, v))
    return out


def _host_port(authority: str) -> tuple[str, int | None]:
    """('example.com', 8080) from 'example.com:8080', ('::1', None) from '[::1]'; lower case."""
    try:
        u = urlsplit(f"//{authority}")
        return (u.hostname or "", u.port)
    except ValueError:
        return (authority.lower(), None)


_ORIGIN = re.compile(r"[^/]*//[^/*?]*")


def origin_of(key: str) -> str:
    """scheme://host:port of a key; its path may be "*" (OPTIONS *) or empty (OPTIONS to a host)."""
    m = _ORIGIN.match(key)
    return m.group() if m else key


Pending, Failure = cachestore.Pending, cachestore.Failure
_X_CACHE_MISS = f"MISS from {HOSTNAME}".encode("utf-8", "surrogateescape")
_X_CACHE_HIT = f"HIT from {HOSTNAME}".encode("utf-8", "surrogateescape")  # any answer from the store, as Squid


class Refresher:
    """A few daemon threads that run blocking fetches for the event loop. Daemon threads: a refresh
    hung on a slow origin never holds up the proxy's exit, as a ThreadPoolExecutor's would."""

    def __init__(self, threads: int):
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.closed = False
        for i in range(threads):
            threading.Thread(target=self._work, name=f"relais-cache-refresh-{i}", daemon=True).start()

    def run(self, fn) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self.jobs.put((loop, fut, fn))
        return fut

    def close(self) -> None:
        self.closed = True  # jobs still queued are cancelled; each thread ends at its next job
        self.jobs.put(None)

    def _work(self) -> None:
        while (job := self.jobs.get()) is not None:
            loop, fut, fn = job
            result, error, skipped = None, None, self.closed
            if not skipped:
                try:
                    result = fn()
                except Exception as e:
                    error = e
            try:
                loop.call_soon_threadsafe(_settle, fut, result, error, skipped)
            except RuntimeError:  # the event loop is closed
                pass
        self.jobs.put(None)  # for the next thread


class Deadline:
    """Cuts the connections of one fetch when its time is up, whatever it is waiting for (the status
    line, headers or body an origin sends a byte now and then): a refresh thread is never held longer."""

    def __init__(self, seconds: float):
        self.sockets: list = []
        self.expired = False
        self.timer = threading.Timer(seconds, self._expire)
        self.timer.daemon = True

    def __enter__(self):
        self.timer.start()
        return self

    def __exit__(self, *exc) -> None:
        self.timer.cancel()

    def _expire(self) -> None:
        self.expired = True
        for sock in self.sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def handler(self, base, **kw):
        """An instance of urllib's HTTP(S)Handler `base` whose connections this deadline can cut."""
        deadline = self

        class Tracked(base):
            def do_open(self, http_class, req, **args):
                class Connection(http_class):
                    def connect(self):
                        super().connect()
                        deadline.sockets.append(self.sock)

                    def putrequest(self, method, url, skip_host=False, skip_accept_encoding=False):
                        # no "Accept-Encoding: identity" of http.client's own: the origin may vary on it,
                        # and the refresh sends the client's fields (rfc9111.revalidation_headers), no others
                        super().putrequest(method, url, skip_host=skip_host, skip_accept_encoding=True)
                return super().do_open(Connection, req, **args)
        return Tracked(**kw)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A refresh revalidates this URL: a redirect is its answer (to store or not), not a page to follow."""

    def redirect_request(self, *args, **kw):
        return None


def fetch(url: str, headers: dict, proxies: dict, insecure: bool, limit: int) -> tuple:
    """GET url for a background refresh: (request time, status, header list, at most `limit` body
    bytes); an error past REFRESH_DEADLINE seconds in all. `headers` as mitmproxy holds them: their
    values are sent as the bytes the client sent."""
    request_time = time.time()
    # mitmproxy decodes field values as UTF-8 (surrogateescape), http.client encodes them as Latin-1
    headers = {k: v.encode("utf-8", "surrogateescape").decode("latin-1") for k, v in headers.items()}
    with Deadline(REFRESH_DEADLINE) as deadline:
        context = ssl._create_unverified_context() if insecure else None
        opener = urllib.request.build_opener(
            urllib.request.ProxyHandler(proxies), _NoRedirect(),
            deadline.handler(urllib.request.HTTPHandler),
            deadline.handler(urllib.request.HTTPSHandler, context=context))
        opener.addheaders = []  # no "Python-urllib" User-Agent: the origin may vary on it
        try:
            try:
                resp = opener.open(urllib.request.Request(url, headers=headers), timeout=REFRESH_TIMEOUT)
            except urllib.error.HTTPError as e:  # a status urllib calls an error is an answer too
                resp = e
            with resp:
                fields = [(k.encode("latin-1").decode("utf-8", "surrogateescape"),  # (http.client: Latin-1)
                           v.encode("latin-1").decode("utf-8", "surrogateescape")) for k, v in resp.headers.items()]
                result = request_time, resp.code, fields, resp.read(limit)
                _check_length(resp, result[3], limit)
        except Exception as e:
            if deadline.expired:
                raise TimeoutError(f"no whole answer in {REFRESH_DEADLINE} s") from e
            raise
        if deadline.expired:  # the body may have been cut where the connection was
            raise TimeoutError(f"no whole answer in {REFRESH_DEADLINE} s")
        return result


def _check_length(resp, body: bytes, limit: int) -> None:
    """ValueError for a body shorter than its Content-Length (http.client returns what came before
    the connection closed, without a word)."""
    if resp.code in (204, 304) or "chunked" in (resp.headers.get("Transfer-Encoding") or "").lower():
        return
    try:
        expected = int(resp.headers.get("Content-Length") or -1)
    except ValueError:
        return
    if 0 <= expected and len(body) < min(expected, limit):
        raise ValueError(f"the body ended after {len(body)} of its {expected} bytes")


def _settle(fut: asyncio.Future, result, error, cancel: bool = False) -> None:
    if fut.done():  # the awaiting task was cancelled meanwhile
        return
    if cancel:
        fut.cancel()
    elif error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(result)


class StreamCopy:
    """Wraps flow.response.stream: copies each chunk to a temp file while it is relayed."""

    def __init__(self, fileobj, limit: int, expected: int | None):
        self.f = fileobj
        self.path = fileobj.name
        self.limit, self.expected = limit, expected
        self.h = hashlib.blake2b(digest_size=16)
        self.n = 0
        self.ok = True
        self.handed = False  # the file went to the store, which owns it now

    def __call__(self, chunk: bytes):
        if self.ok and chunk:
            self.n += len(chunk)
            if self.n > self.limit:
                self.abort()
            else:
                try:
                    self.f.write(chunk)
                    self.h.update(chunk)
                except OSError as e:  # a full disk: relayed all the same, not stored
                    self._failed(e)
        return chunk

    def _failed(self, e: OSError) -> None:
        self.abort()
        cachestore.warn_now_and_then("stream", "cache: cannot write a streamed body's copy to %s (%s); not stored",
                                     self.path, e)

    def abort(self) -> None:
        self.ok = False
        try:
            self.f.close()
        except OSError:
            pass
        cachestore._unlink(self.path)

    def finish(self) -> bool:
        if not self.ok:
            return False
        try:
            self.f.close()  # writes what is buffered: a full disk may fail here
        except OSError as e:
            self._failed(e)
            return False
        if self.expected is not None and self.n != self.expected:
            cachestore._unlink(self.path)
            return False
        return True


def _say(flow: http.HTTPFlow, line: str) -> None:
    """The cache's outcome in the flow's mitmweb comment: after what other addons wrote there, in place
    of an earlier outcome of its own (a revalidation's, then its answer's)."""
    if _SAID in flow.comment:
        flow.comment = "\n".join(x for x in flow.comment.split("\n") if not x.startswith(_SAID))
    meta.add_comment(flow, line)


_SAID = "cache: TCP_"


def _names(headers: http.Headers) -> set[bytes]:
    """The lower-cased names of the fields present (one pass, for many presence checks)."""
    return {k.lower() for k, _ in headers.fields}


_RECOMPUTED = frozenset({"x-cache", "age", "content-length"})  # stored headers without these fields
_REQUEST_REFUSALS = frozenset({"request no-store", "authorization"})  # storable()'s, about the request
_STALE = frozenset({"stale", "stale, must revalidate"})  # decide()'s reasons for an object past its lifetime
_NOT_OWN = frozenset({"content-length", "age", "x-cache"})  # a 304's fields its client's answer does not take
_COOKIES = frozenset({b"set-cookie", b"set-cookie2"})  # not sent from the store with hit_set_cookie false
_NONE = frozenset()
_CONDITIONALS = frozenset({b"if-none-match", b"if-modified-since", b"if-match", b"if-unmodified-since"})
_SAFE_OR_CONNECT = frozenset({m.encode() for m in rfc9111.SAFE_METHODS} | {b"CONNECT"})  # they invalidate nothing


class _Derived:
    """What answering from a stored entry needs from its headers, computed once per headers list."""
    __slots__ = ("headers", "fields", "plain", "cc", "drop")

    def __init__(self, headers: list[tuple[str, str]], policy, drop: frozenset[bytes] = _NONE):
        self.headers, self.drop = headers, drop
        self.fields = tuple(f for f in ((k.encode("utf-8", "surrogateescape"), v.encode("utf-8", "surrogateescape"))
                                        for k, v in headers) if not drop or f[0].lower() not in drop)
        self.plain = not any(k.lower() in (b"age", b"x-cache") for k, _ in self.fields)
        self.cc = rfc9111.cache_control(policy)


_VERSIONS = frozenset({b"HTTP/1.1", b"HTTP/2.0", b"HTTP/3"})  # a hit answers in the request's version, or 1.1
_TEMPLATE = http.Response.make(200)


def make_response(version: bytes, status: int, reason: bytes, headers: http.Headers, body: bytes,
                  now: float) -> http.Response:
    """http.Response(version, status, reason, headers, body, None, now, now), for a cache hit.

    The constructor type-checks every field (mitmproxy's dataclass __post_init__ when Python runs
    without -O), which cost more than all the rest of a memory hit. The values here have their
    types by construction, so a copy of a checked template takes them as they are.
    tests/test_cache_addon.py checks that both ways give the same response.
    """
    r = object.__new__(http.Response)
    r.__dict__.update(_TEMPLATE.__dict__)
    d = r.data = object.__new__(type(_TEMPLATE.data))
    d.__dict__.update(_TEMPLATE.data.__dict__)
    d.http_version, d.status_code, d.reason, d.headers, d.content = version, status, reason, headers, body
    d.trailers, d.timestamp_start, d.timestamp_end = None, now, now
    return r


POLICY_KEYS = ("refresh_pattern", "targeted_fields", "cache", "send_hit", "store_miss")
ACCESS_KEYS = ("cache", "send_hit", "store_miss")
_ACL_NAME = re.compile(r"!?[A-Za-z0-9_.:-]+")
_NOT = {"cache": "not cached", "send_hit": "not served from the cache", "store_miss": "not stored"}


class AccessRule(NamedTuple):
    """One line of Squid's cache / send_hit / store_miss lists: allow or deny when all its acls match."""
    allow: bool
    terms: tuple[tuple[bool, str], ...]  # (negated, acl name)
    text: str
    line: int | None = None
    source: str | None = None  # the file it was read from


class CachePolicy(NamedTuple):  # (not dataclasses: mitmproxy loads this file as a script, outside sys.modules)
    rules: list[rfc9111.RefreshRule]
    targets: tuple[str, ...] = ()
    access: dict[str, tuple[AccessRule, ...]] = {}  # never mutated
    notes: tuple[str, ...] = ()  # what was read but not applied, for a warning
    includes: tuple[str, ...] = ()  # the files a squid.conf included (watched for changes with it)


def parse_access_rule(text: str, line: int | None = None, source: str | None = None) -> AccessRule:
    """'deny QUERY', 'allow localnet !CONNECT': Squid's syntax, on the acl names of the access policy."""
    words = text.split()
    if len(words) < 2 or words[0] not in ("allow", "deny"):
        raise ValueError(f'a rule is "allow" or "deny" and one or more acl names, such as "deny QUERY": {text!r}')
    for w in words[1:]:
        if not _ACL_NAME.fullmatch(w):
            raise ValueError(f"bad acl name {w!r} in {text!r}")
    return AccessRule(words[0] == "allow", tuple((w.startswith("!"), w.lstrip("!")) for w in words[1:]),
                      " ".join(words), line, source)


def access_allows(rules: Sequence[AccessRule], acls) -> tuple[bool, AccessRule | None]:
    """Squid's check of an access list against the names of the acls a request matched: the first
    rule whose terms all hold decides; when none does, the opposite of the last rule; no rules allow."""
    for r in rules:
        if all((name in acls) != neg for neg, name in r.terms):
            return r.allow, r
    return (not rules[-1].allow, None) if rules else (True, None)


def load_policy(text: str, source: str = "<policy>") -> CachePolicy:
    """The refresh_pattern rules, targeted fields and cache / send_hit / store_miss rules of a cache policy
    (policies/cache.yaml); a mistake raises policyfile.PolicyError with its file and line."""
    doc = policyfile.load(text, source)
    if doc is None:
        doc = policyfile.Map()
    if not isinstance(doc, dict):
        raise policyfile.PolicyError(source, getattr(doc, "line", 1), f"a cache policy is a mapping of "
                                     f"{', '.join(POLICY_KEYS)}, not a {type(doc).__name__}")
    for key in doc:
        if key not in POLICY_KEYS:
            raise policyfile.PolicyError(source, policyfile.line_of(doc, key),
                                         f"unknown key {key!r}; the keys are {', '.join(POLICY_KEYS)}")
    patterns = doc.get("refresh_pattern") or []
    if not isinstance(patterns, list):
        raise policyfile.PolicyError(source, policyfile.line_of(doc, "refresh_pattern"),
                                     'refresh_pattern must be a list of rules such as ". 0 10% 4320"')
    rules = []
    for i, item in enumerate(patterns):
        line = policyfile.line_of(patterns, i)
        if not isinstance(item, str):
            raise policyfile.PolicyError(source, line, f'a refresh_pattern rule is a string such as "^ftp: 1440 20% '
                                         f'10080", not {item!r}')
        try:
            rules.append(rfc9111.parse_refresh_pattern(item))
        except ValueError as e:
            raise policyfile.PolicyError(source, line, str(e)) from None
    targets = doc.get("targeted_fields") or []
    if not isinstance(targets, list) or not all(isinstance(t, str) and re.fullmatch(r"[A-Za-z0-9-]+", t)
                                                for t in targets):
        raise policyfile.PolicyError(source, policyfile.line_of(doc, "targeted_fields"),
                                     f"targeted_fields must be a list of header field names, not {targets!r}")
    access = {}
    for key in ACCESS_KEYS:
        items = doc.get(key)
        if items is None:
            items = []
        if not isinstance(items, list):
            raise policyfile.PolicyError(source, policyfile.line_of(doc, key),
                                         f'{key} must be a list of rules such as "deny QUERY"')
        parsed = []
        for i, item in enumerate(items):
            line = policyfile.line_of(items, i)
            try:
                if not isinstance(item, str):
                    raise ValueError(f'a rule is a string such as "deny QUERY", not {item!r}')
                parsed.append(parse_access_rule(item, line, source))
            except ValueError as e:
                raise policyfile.PolicyError(source, line, f"{key}: {e}") from None
        if parsed:
            access[key] = tuple(parsed)
    return CachePolicy(rules or [rfc9111.DEFAULT_RULE], tuple(t.lower() for t in targets), access)


SHIPPED_TARGETS = ("cdn-cache-control",)  # policies/cache.yaml's; a squid.conf cannot name any


def load_squid_policy(text: str, source: str = "<squid.conf>", base: Path | None = None) -> CachePolicy:
    """The refresh_pattern, cache, send_hit and store_miss lines of a squid.conf and of the files it
    includes (the rest is ignored, as the acl addon reads the acl and http_access lines of the same
    files); a mistake raises policyfile.PolicyError with its file and line."""
    refresh, access, notes, included = [], {}, [], []
    try:
        for src, no, line in aclrules.squid_directives(text, source, base, included):
            directive, _, rest = line.replace("\t", " ").partition(" ")
            if directive not in ("refresh_pattern",) + ACCESS_KEYS:
                continue
            try:
                if directive == "refresh_pattern":
                    words = rest.split()
                    head = 5 if words[:1] == ["-i"] else 4
                    refresh.append(rfc9111.parse_refresh_pattern(" ".join(words[:head])))
                    if words[head:]:  # override-expire, ignore-no-store...: read as far as RFC 9111 goes
                        notes.append(f"{src}:{no}: refresh_pattern options not supported, ignored (the "
                                     f"cache follows RFC 9111): {' '.join(words[head:])}")
                else:
                    access.setdefault(directive, []).append(parse_access_rule(rest, no, src))
            except ValueError as e:  # (refresh_pattern's own messages name it)
                msg = str(e) if directive == "refresh_pattern" else f"{directive}: {e}"
                raise policyfile.PolicyError(src, no, msg) from None
    except aclrules.PolicyError as e:  # an include that cannot be followed
        err = policyfile.PolicyError(e.file or source, e.line, e.reason)
        err.includes = tuple(included)  # what a refused reload watches for the fix
        raise err from None
    except policyfile.PolicyError as e:
        e.includes = tuple(included)
        raise
    return CachePolicy(refresh or [rfc9111.DEFAULT_RULE], SHIPPED_TARGETS,
                       {k: tuple(v) for k, v in access.items()}, tuple(notes), tuple(included))


def _add_length(headers: list[tuple[str, str]], status: int, n: int) -> list[tuple[str, str]]:
    """A stored response's fields get its body's Content-Length, except a 204 (RFC 9110 8.6: never sent)."""
    if status != 204:
        headers.append(("Content-Length", str(n)))
    return headers


def headers_of(fields: tuple[tuple[bytes, bytes], ...]) -> http.Headers:
    """http.Headers(fields) for (bytes, bytes) pairs that are tuples by construction: the constructor
    copies each pair and checks its types, over a microsecond of a memory hit."""
    h = object.__new__(http.Headers)
    h.fields = fields
    return h


class Cache:
    def __init__(self) -> None:
        self.store: cachestore.Store | None = None
        self.rules: list[rfc9111.RefreshRule] = [rfc9111.DEFAULT_RULE]
        self.targets: tuple[str, ...] = ()           # RFC 9213 targeted fields obeyed in reverse mode
        self.access: dict[str, tuple[AccessRule, ...]] = {}  # Squid's cache / send_hit / store_miss rules
        self.checks: dict[str, list] = {}
        self.acl_names = policyfile.AclNames(self._acl_uses, lambda msg: log.warning("cache_policy: %s", msg))
        self.warned_no_acls = False
        self.watch = policyfile.Watch()            # the cache policy file, re-read when it changes
        self.poller: asyncio.Task | None = None    # looks at it while the proxy is idle
        self.inflight: dict[str, asyncio.Future] = {}
        self.leader: dict[str, str] = {}            # flow id -> key it leads
        self.pending: dict[str, Pending] = {}       # flow id -> revalidation
        self.hit_drop = _NONE                      # fields left out of answers from the store
        self.streams: dict[str, tuple[str, StreamCopy, cachestore.Meta]] = {}
        self.failures: dict[str, Failure] = {}      # origin -> failure
        self.refreshing: dict[str, str] = {}        # keys refreshed in the background (SWR) -> their origin
        # when keys were invalidated or purged (the last INVALIDATED_MAX): a response to a request
        # made before then may be the old one, and is not stored
        self.invalidated: OrderedDict[str, float] = OrderedDict()
        self.cleared_at = 0.0
        self.refresher: Refresher | None = None
        self.counts: Counter = Counter()
        self.purge_nets: list = []
        self.negative_ttl = 30.0
        self.max_stale = 604800.0
        self.reload_into_ims = False
        self.object_max = 4 * 1024 * 1024
        self.sizes: dict[str, int] = {}
        self.late_streams = False
        self.disk_error: str | None = None  # why the disk tier is off, when cache_dir could not be opened
        self.recovering = recover.hold()  # answers made in the error hook are sent
        self.answering = answered.hold()

    # --- options -------------------------------------------------------
    def load(self, loader):
        loader.add_option("cache_mem", str, "64 MB",
                          "Squid cache_mem: RAM for hot cached objects (bytes, or e.g. '64 MB'), counted as the memory "
                          "each takes in the proxy (body, fields and bookkeeping); 0 disables the RAM tier.")
        loader.add_option("maximum_object_size_in_memory", str, "512 KB",
                          "Squid maximum_object_size_in_memory: larger objects are kept on disk only.")
        loader.add_option("maximum_object_size", str, "4 MB",
                          "Squid maximum_object_size: larger responses are never cached.")
        loader.add_option("cache_dir", str, "var/cache",
                          "Squid cache_dir: folder of the disk cache (diskcache); 'none' keeps the cache in RAM only.")
        loader.add_option("cache_dir_size", int, 3200,
                          "Size of the disk cache in megabytes (Squid's cache_dir Mbytes); the least recently stored "
                          "objects are evicted after each batch of writes (over by 1/16 and one object at most, "
                          "meanwhile); where the file system has room for less, the tier keeps to that room, "
                          "leaving a 50th of it free (512 KB at least).")
        loader.add_option("negative_ttl", int, 30,
                          "Squid negative_ttl: seconds errors without explicit freshness (404, 405, 410, 414, 501) "
                          "and unreachable origins are remembered; 0 disables negative caching.")
        loader.add_option("cache_policy", str, "policies/cache.yaml",
                          "Cache policy: a YAML file (refresh_pattern table, targeted_fields such as "
                          "CDN-Cache-Control, Squid's cache / send_hit / store_miss rules) or a squid.conf (*.conf: "
                          "its refresh_pattern, cache, send_hit and store_miss lines, and those of the files it "
                          "includes), relative to the cwd or the Relais folder; re-read when it (or a file it "
                          "includes) changes, and by cache.reload.")
        loader.add_option("purge_from", Sequence[str], ["127.0.0.1/8", "::1"],
                          "Client networks allowed to use the PURGE method.")
        loader.add_option("max_stale", int, 604800,
                          "Squid max_stale: seconds past its freshness a stored response may still be served, with "
                          "Warning 111, when the origin fails (unreachable, 5xx, connection closed), even without "
                          "stale-if-error; must-revalidate, proxy-revalidate, s-maxage and no-cache still forbid it, "
                          "and an origin's own stale-if-error bounds it. "
                          "One week by default, as in Squid; 0 serves stale only where RFC 9111 and RFC 5861 let "
                          "the origin or the client allow it.")
        loader.add_option("reload_into_ims", bool, False,
                          "Squid reload_into_ims: a client's reload (Cache-Control: no-cache, Pragma: no-cache) of a "
                          "stored response with validators is revalidated with If-None-Match / If-Modified-Since "
                          "(answered TCP_REFRESH_UNMODIFIED from the store when the origin says 304) instead of "
                          "fetched whole; RFC 9111 allows either. Off, as in Squid: the reload goes to the origin "
                          "unconditionally (TCP_MISS).")
        loader.add_option("hit_set_cookie", bool, True,
                          "Send a stored response's Set-Cookie and Set-Cookie2 fields with the answers made from it "
                          "(hits, revalidated hits, collapsed requests): RFC 9111 (7.3) lets a shared cache reuse such "
                          "a response, and an origin marks per-user ones private or no-cache=\"Set-Cookie\". false: "
                          "only the client whose request reached the origin gets its cookies, as Squid removes them "
                          "from hits.")
        loader.add_option("collapsed_forwarding", bool, True,
                          "Squid collapsed_forwarding: concurrent misses, or revalidations of a stale object, for one "
                          "URL make one upstream request; the others wait for its answer.")
        # an origin that closes or resets the connection before responding: answered stale (error hook)
        self.recovering.take()
        # a request answered at requestheaders (a remembered failure) while its body is streamed
        self.answering.take()

    def configure(self, updated):
        o = ctx.options
        sizes = {}
        for name in ("cache_mem", "maximum_object_size_in_memory", "maximum_object_size"):
            sizes[name] = parse_size(getattr(o, name), name)
        if o.cache_dir_size <= 0:
            raise exceptions.OptionsError(f"cache_dir_size: must be more than 0 megabytes, not {o.cache_dir_size}")
        if o.negative_ttl < 0:
            raise exceptions.OptionsError(f"negative_ttl: must be 0 or more seconds, not {o.negative_ttl}")
        if o.max_stale < 0:
            raise exceptions.OptionsError(f"max_stale: must be 0 or more seconds, not {o.max_stale}")
        if not o.cache_dir.strip():
            raise exceptions.OptionsError("cache_dir: empty; use 'none' for a RAM-only cache")
        first = not getattr(self, "_configured", False)
        self._configured = True
        if "purge_from" in updated or first:
            nets = []
            for spec in o.purge_from:
                try:
                    nets.append(ipaddress.ip_network(spec.strip(), strict=False))
                except ValueError as e:
                    raise exceptions.OptionsError(f"purge_from: bad network {spec!r}: {e}") from e
            self.purge_nets = nets
        if "cache_policy" in updated or first:
            self._use(self._load_policy(o.cache_policy))
        self.negative_ttl = float(o.negative_ttl)
        self.max_stale = float(o.max_stale)
        self.reload_into_ims = o.reload_into_ims
        self.collapse = o.collapsed_forwarding
        self.hit_drop = _NONE if o.hit_set_cookie else _COOKIES
        self.late_streams = bool(getattr(o, "stream_large_bodies", None))  # see addons/streams.py
        self.object_max = sizes["maximum_object_size"]
        store_opts = {"cache_mem", "maximum_object_size_in_memory", "maximum_object_size", "cache_dir",
                      "cache_dir_size"}
        if self.store is None or store_opts & set(updated):
            disk = None if o.cache_dir.strip().lower() == "none" else o.cache_dir
            if disk is not None and os.path.isfile(disk):  # (False, not an error, for a path it cannot reach)
                raise exceptions.OptionsError(f"cache_dir: {o.cache_dir!r} is not a folder")
            starting = self.store is None
            if self.store is not None:
                self.store.close()
            args = (sizes["cache_mem"], sizes["maximum_object_size_in_memory"], sizes["maximum_object_size"])
            self.disk_error = None
            try:
                self.store = cachestore.Store(*args, disk, o.cache_dir_size * 1024 * 1024)
            except Exception as e:
                if not starting:  # set live: refused, and mitmproxy reconfigures the cache_dir that worked
                    self.store = None
                    raise exceptions.OptionsError(f"cache_dir: cannot open {o.cache_dir!r}: {e}") from e
                self.disk_error = f"cannot open {o.cache_dir!r}: {e}"
                # a full or read-only disk, a folder without access: the proxy serves on, from RAM (a warning:
                # mitmdump exits on an error logged while it starts)
                log.warning("cache: cannot open the disk cache in %r (%s); caching in RAM only until the "
                            "proxy is restarted with a usable cache_dir", o.cache_dir, e)
                self.store = cachestore.Store(*args, None, 0)
            self.sizes = sizes

    def _load_policy(self, value: str) -> CachePolicy:
        """The policy the cache_policy option names; OptionsError with its file, line and reason."""
        if not value or value == "none":
            self.watch = policyfile.Watch()
            return CachePolicy([rfc9111.DEFAULT_RULE])
        path = resolve(value).absolute()  # reloads read this file, whatever the cwd holds meanwhile
        try:
            stamp = policyfile.stamp(path)
            text = path.read_text(encoding="utf-8")
            policy = (load_squid_policy(text, str(path), path.parent) if path.suffix == ".conf"
                      else load_policy(text, str(path)))
        except (OSError, UnicodeDecodeError) as e:
            raise exceptions.OptionsError(f"cache_policy: cannot read {value!r}: {e}") from e
        except policyfile.PolicyError as e:
            err = exceptions.OptionsError(f"cache_policy: {e}")
            err.includes = getattr(e, "includes", ())  # (reload watches them too)
            raise err from e
        except Exception as e:  # what a parser may still raise on odd input (a YAML nested too deep)
            raise exceptions.OptionsError(f"cache_policy: cannot read {value!r}: {type(e).__name__}: {e}") from e
        self.watch = policyfile.Watch(path, stamp, also=policy.includes)
        for note in policy.notes:
            log.warning("cache_policy: %s", note)
        return policy

    def _use(self, policy: CachePolicy) -> None:
        self.rules, self.targets, self.access = policy.rules, policy.targets, policy.access
        # what each question asks, in order: Squid's `cache` list first, then send_hit or store_miss
        self.checks = {d: [(n, policy.access[n]) for n in ("cache", d) if n in policy.access]
                       for d in ("send_hit", "store_miss")}
        self.acl_names.reset()  # these rules are checked anew

    @command.command("cache.reload")
    def reload(self) -> None:
        """Re-read the cache policy (also done when its file changes); if it is broken, keep the current
        one and say why."""
        if self.policy_file is None:
            return
        try:
            self._use(self._load_policy(self.policy_file))
        except exceptions.OptionsError as e:
            self.watch.refused(also=getattr(e, "includes", ()))
            log.error("cache: policy not reloaded, keeping the last good one: %s", e)
            raise exceptions.CommandError(f"cache.reload: kept the previous policy: {e}") from None
        log.info("cache: policy reloaded from %s", self.policy_file)

    def _check_policy(self) -> None:
        if self.watch.changed():
            try:
                self.reload()
            except exceptions.CommandError:
                pass  # logged; the last good policy stays

    def running(self) -> None:
        self.poller = policyfile.poll(self._check_policy)

    @property
    def policy_file(self) -> str | None:
        return str(self.watch.path) if self.watch.path else None

    def done(self):
        if self.poller is not None:
            self.poller.cancel()
            self.poller = None
        self.recovering.release()
        self.answering.release()
        if self.refresher is not None:
            self.refresher.close()
            self.refresher = None
        if self.store is not None:
            self.store.close()
            self.store = None

    # --- RFC 9213 targeted fields -------------------------------------------
    def _view(self, flow: http.HTTPFlow, headers):
        """Response headers as read for caching policy. In reverse mode Relais is the site's CDN:
        a valid targeted field (the policy's targeted_fields, CDN-Cache-Control) replaces
        Cache-Control and Expires; forward modes are no CDN and ignore them."""
        if self.targets and meta.mode_name(flow) == "reverse":
            return rfc9111.targeted_view(headers, self.targets)
        return headers

    def _policy(self, m: cachestore.Meta, headers=None):
        """The policy view of a stored response's headers (or of `headers` replacing them)."""
        headers = m.headers if headers is None else headers
        return rfc9111.targeted_view(headers, self.targets) if m.targeted and self.targets else headers

    def _derived(self, entry: cachestore.Entry) -> _Derived:
        d = entry.derived
        if d is None or d.headers is not entry.meta.headers or d.drop is not self.hit_drop:  # (or new options)
            d = entry.derived = _Derived(entry.meta.headers, self._policy(entry.meta), self.hit_drop)
        return d

    # --- lookups ----------------------------------------------------------
    def lookup(self, key: str, req_headers, partial: bool = False) -> tuple[cachestore.Entry | None, str | None]:
        """The stored response for this request (with `partial`, the stored partial one instead)."""
        store = self.store
        failed = None
        for fields in store.vary_sets(key):
            vk = rfc9111.vary_values(fields, req_headers) if fields else ()
            if partial:
                vk = (*vk, rfc9111.PARTIAL)
            entry, tier = store.get(key, cachestore.vary_hash(vk))
            if entry is not None:
                return entry, tier
            failed = failed or tier  # cachestore.SWAPFAIL: stored, but its body could not be read
        return None, failed

    def requestheaders(self, flow: http.HTTPFlow):
        if flow.response or flow.error or self.store is None:
            return None
        self._check_policy()  # (also polled while idle; a request may come first)
        method = flow.request.method
        if method == "CONNECT":
            return None
        if method == "PURGE":
            self._purge(flow)
            return None
        key = primary_key(flow)
        if not self._allowed(flow, "send_hit"):  # nothing from the cache, failures included
            if method in ("GET", "HEAD"):
                if rfc9111.only_if_cached(flow.request.headers):
                    return self._only_if_cached(flow)
                self.counts["miss"] += 1
            return None
        failure = self._failure(key)
        if failure and rfc9111.reuses_nothing(flow.request.headers):
            failure = None  # a reload asks the origin, as for anything stored (RFC 9111 5.2.1.4)
        if method not in ("GET", "HEAD"):
            if failure:
                self._answer_failure(flow, failure)
            return None
        return self._lookup_and_answer(flow, key, failure, collapse=True)

    def _allowed(self, flow: http.HTTPFlow, directive: str) -> bool:
        """Squid's `cache` rules, then its `send_hit` (may a stored response answer the request?) or
        `store_miss` (may the response be stored?), on the acls the request matched (relais.acls, from
        the acl addon). Without that list the rules cannot be judged, and the cache stays out of it."""
        if not self.access:
            return True
        acls = flow.metadata.get(meta.ACLS)
        if acls is None:
            if not self.warned_no_acls:
                self.warned_no_acls = True
                log.warning("cache: the cache policy has cache/send_hit/store_miss rules, and %s has no acl list "
                            "(relais.acls: is the acl addon loaded, before the cache, with a policy?); such "
                            "requests are neither answered from the cache nor stored", flow.request.pretty_url)
            return False
        self.acl_names.check(flow.metadata.get(meta.ACL_NAMES), flow.metadata.get(meta.ACL))
        for name, rules in self.checks[directive]:
            ok, rule = access_allows(rules, acls)
            if not ok:
                why = f"{name} {rule.text}" if rule else f"{name}: no rule matched, so the opposite of the last"
                note = f"cache: {_NOT[name]} ({why})"
                if note not in flow.comment:  # `cache` rules are asked at the request and at the response
                    meta.add_comment(flow, note)
                return False
        return True

    def _acl_uses(self) -> list[tuple[str, str]]:
        return [(f"{r.source}:{r.line}: {key} {r.text}", name)
                for key, rules in self.access.items() for r in rules for _, name in r.terms]

    def _lookup_and_answer(self, flow: http.HTTPFlow, key: str, failure: Failure | None, collapse: bool):
        req = flow.request
        names = _names(req.headers)
        if b"upgrade" in names:  # a protocol switch (WebSocket) is the origin's to accept or refuse
            self.counts["miss"] += 1
            return None
        entry, tier = self.lookup(key, req.headers)
        if entry is None and b"range" in names and self._answer_partial(flow, key, names):
            return None
        if entry is None:
            if b"cache-control" in names and rfc9111.only_if_cached(req.headers):
                return self._only_if_cached(flow)
            if failure:
                return self._answer_failure(flow, failure)
            if collapse and (waiting := self._collapse(flow, key, names)) is not None:
                return waiting
            if tier == cachestore.SWAPFAIL:  # Squid's name for a stored copy that could not be read
                flow.metadata[meta.CODE] = "TCP_SWAPFAIL_MISS"
                flow.metadata[meta.CACHE] = {"status": "SWAPFAIL_MISS", "tier": "disk"}
                _say(flow, "cache: TCP_SWAPFAIL_MISS (the stored copy could not be read, or was damaged)")
                self.counts["TCP_SWAPFAIL_MISS"] += 1
            self.counts["miss"] += 1
            return None
        now = time.time()
        m = entry.meta
        age = m.age(now)
        # without Cache-Control or Pragma the request asks nothing: decide() need not read its fields
        asks = req.headers if b"cache-control" in names or b"pragma" in names else ()
        d = rfc9111.decide(asks, m.headers, age, m.lifetime, resp_cc=self._derived(entry).cc)
        if d.action == rfc9111.RELOAD:
            if rfc9111.only_if_cached(req.headers):  # no stored copy without validation, and none of that
                return self._only_if_cached(flow)
            if self.reload_into_ims and rfc9111.validators(m.headers):
                self._revalidate(flow, key, entry, tier, reload=True)  # RFC 9111 5.2.1.4: validated, not refetched
                if flow.id in self.pending:
                    return None
            self.counts["reload"] += 1
            return None  # Squid 5.7: a client reload skips the lookup (TCP_MISS)
        if d.serve:
            if (b"if-match" in names or b"if-unmodified-since" in names) and \
                    not rfc9111.cache_can_evaluate(req.headers):
                return None  # If-Match / If-Unmodified-Since: the origin decides
            self._serve(flow, entry, tier, age, stale=d.staleness >= 0, names=names)
            if d.action == rfc9111.SWR and self._allowed(flow, "store_miss"):
                self._refresh_in_background(key, entry, flow)
            return None
        # must revalidate
        if failure and rfc9111.stale_if_error_ok(req.headers, self._policy(m), d.staleness, max_stale=self.max_stale):
            self._serve(flow, entry, tier, age, stale=True, code="TCP_REFRESH_FAIL_OLD",
                        warning='111 - "Revalidation Failed"')
            return None
        if rfc9111.only_if_cached(req.headers):
            return self._only_if_cached(flow)
        if failure:
            return self._answer_failure(flow, failure)
        # as Squid's collapsed_forwarding: one revalidation of a popular object that went stale (not of
        # one that needs it at each use, no-cache, or for this request's max-age: waiting would not spare it)
        if collapse and d.reason in _STALE and (waiting := self._collapse(flow, key, names)) is not None:
            return waiting
        return self._revalidate(flow, key, entry, tier)

    def _answer_partial(self, flow: http.HTTPFlow, key: str, names: set[bytes]) -> bool:
        """RFC 9111 3.3: a range that a fresh stored partial response (a 206) holds is answered from
        it. Anything else (a conditional, a range it lacks, a stale one) goes to the origin, whose
        206 then replaces it: partial responses are neither revalidated nor combined."""
        if names & _CONDITIONALS or flow.request.method != "GET":
            return False
        entry, tier = self.lookup(key, flow.request.headers, partial=True)
        if entry is None:
            return False
        req, m = flow.request, entry.meta
        part = rfc9111.content_range(rfc9111.get(m.headers, "content-range"))
        r = rfc9111.parse_range(req.headers.get("range"), part[2]) if part else None
        if r is None or r == rfc9111.UNSATISFIABLE or not part[0] <= r[0] <= r[1] <= part[1] \
                or not rfc9111.if_range_ok(req.headers.get("if-range"), m.headers):
            return False
        age = m.age(time.time())
        asks = req.headers if b"cache-control" in names or b"pragma" in names else ()
        d = rfc9111.decide(asks, m.headers, age, m.lifetime, resp_cc=self._derived(entry).cc)
        if not d.serve or d.action == rfc9111.SWR:  # (a partial one is never refreshed in the background)
            return False
        self._serve(flow, entry, tier, age, stale=d.staleness >= 0, names=names)
        return True

    def _revalidate(self, flow: http.HTTPFlow, key: str, entry: cachestore.Entry, tier: str,
                    reload: bool = False) -> None:
        """4.3.1: the request goes to the origin with the entry's validators (the client's own
        conditionals are kept aside); response() then freshens or replaces the entry."""
        req = flow.request
        m = entry.meta
        saved = []
        for name in ("If-None-Match", "If-Modified-Since"):
            for v in req.headers.get_all(name):
                saved.append((name, v))
            req.headers.pop(name, None)
        if not rfc9111.cache_can_evaluate(req.headers):
            for name, v in saved:
                req.headers.add(name, v)
            return None
        for name, v in rfc9111.validators(m.headers):
            req.headers[name] = v
        self.pending[flow.id] = Pending(key, entry, tier, saved, reload)
        return None

    def _collapse(self, flow: http.HTTPFlow, key: str, names: set[bytes]):
        """Collapsed forwarding: while another request asks the origin for `key` (a miss or a
        revalidation), one that may wait for its answer gets an awaitable that waits and answers it;
        else None, and this request, if it may, is the one the next ones wait for."""
        if not (self._collapsible(flow, names) and self._allowed(flow, "store_miss")):
            return None
        fut = self.inflight.get(key)
        if fut is not None and not fut.done():
            return self._wait_collapsed(flow, key, fut)
        try:
            self.inflight[key] = asyncio.get_running_loop().create_future()
            self.leader[flow.id] = key
        except RuntimeError:  # no event loop (in-process tests): nothing to collapse with
            pass
        return None

    def _collapsible(self, flow: http.HTTPFlow, names: set[bytes] | None = None) -> bool:
        req = flow.request
        if names is None:
            names = _names(req.headers)
        return (self.collapse and req.method == "GET"
                and b"range" not in names and b"authorization" not in names
                and not (b"if-none-match" in names or b"if-modified-since" in names)
                # one that would go to the origin anyway need not wait for another's answer
                and not ((b"cache-control" in names or b"pragma" in names) and rfc9111.reuses_nothing(req.headers)))

    async def _wait_collapsed(self, flow: http.HTTPFlow, key: str, fut: asyncio.Future) -> None:
        """Until the request this one collapsed onto has its answer (COLLAPSE_WAIT at most), then from the
        store; an answer that was not stored sends each waiting request to the origin. If the first
        request's client left before its answer came, one waiting request asks the origin in its place
        and the others wait for it; if the origin failed it, each goes on its own."""
        deadline = time.monotonic() + COLLAPSE_WAIT
        client_left = False
        while True:
            try:
                client_left = await asyncio.wait_for(asyncio.shield(fut), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                client_left = False
            if flow.response or flow.error:
                return
            fut = self.inflight.get(key)
            if not (client_left and fut is not None and not fut.done()):
                break  # (else another waiting request has taken the first one's place: wait for it)
        self.counts["collapsed"] += 1
        before = flow.metadata.get(meta.CODE)
        # with client_left, nothing is in flight: this request takes the first one's place
        res = self._lookup_and_answer(flow, key, self._failure(key), collapse=client_left)
        if res is not None:
            await res
        if flow.metadata.get(meta.LOCAL) == "cache" and before is None:
            flow.metadata[meta.CACHE]["collapsed"] = True

    def _release(self, flow: http.HTTPFlow, client_left: bool = False) -> None:
        """The leader of collapsed requests has its answer, or has none because its client left."""
        key = self.leader.pop(flow.id, None)
        if key is not None:
            fut = self.inflight.pop(key, None)
            if fut is not None and not fut.done():
                fut.set_result(client_left)

    # --- answers -------------------------------------------------------------
    def _tag(self, flow: http.HTTPFlow, code: str, status: str, tier: str | None,
             hier: str = "HIER_NONE") -> None:
        flow.metadata[meta.LOCAL] = "cache"
        flow.metadata[meta.CODE] = code
        flow.metadata[meta.HIER] = hier
        flow.metadata[meta.CACHE] = {"status": status, "tier": tier}
        _say(flow, f"cache: {code} ({tier})" if tier else f"cache: {code}")
        self.counts[code] += 1

    def _build(self, flow: http.HTTPFlow, entry: cachestore.Entry, age: float,
               warning: str | None = None,
               names: set[bytes] | None = None) -> tuple[http.Response, str | None]:
        """A response from a stored entry for this request: 200, 206/416 for Range, 304 for conditionals."""
        req = flow.request
        if names is None:
            names = _names(req.headers)
        m = entry.meta
        derived = self._derived(entry)
        if derived.plain:  # no stored Age / X-Cache: the fields below are appended, as h[name] = value does
            extra = [(b"Age", rfc9111.age_header(age).encode())]
            if warning:
                extra.append((b"Warning", warning.encode("utf-8", "surrogateescape")))
            extra.append((b"X-Cache", _X_CACHE_HIT))
            headers = headers_of(derived.fields + tuple(extra))
        else:
            headers = headers_of(derived.fields)
            headers["Age"] = rfc9111.age_header(age)
            if warning:
                headers.add("Warning", warning)
            headers["X-Cache"] = _X_CACHE_HIT
        status, reason, body = m.status, m.reason, entry.body
        cond = None
        if m.status == 200 and (b"if-none-match" in names or b"if-modified-since" in names):
            cond = rfc9111.conditional_result(req.method, req.headers, m.headers)
            if cond:
                status, reason, body = 304, "Not Modified", b""
                headers.pop("Content-Length", None)
        if cond is None and m.status in (200, 206) and b"range" in names and req.method == "GET" and \
                rfc9111.if_range_ok(req.headers.get("if-range"), m.headers):  # RFC 9110 14.2: GET only
            start, length = 0, len(body)
            if m.status == 206:  # a stored partial response, which holds the range (_answer_partial)
                start, _, length = rfc9111.content_range(rfc9111.get(m.headers, "content-range"))
            r = rfc9111.parse_range(req.headers.get("range"), length)
            if r == rfc9111.UNSATISFIABLE:
                status, reason = 416, "Range Not Satisfiable"
                headers["Content-Range"] = f"bytes */{length}"
                body = b""
                headers["Content-Length"] = "0"
            elif r is not None:
                first, last = r
                status, reason = 206, "Partial Content"
                headers["Content-Range"] = f"bytes {first}-{last}/{length}"
                body = body[first - start:last - start + 1]
                headers["Content-Length"] = str(len(body))
        if req.method == "HEAD":
            body = b""
        version = req.data.http_version if req.data.http_version in _VERSIONS else b"HTTP/1.1"
        if version in meta.LOWER_CASE_VERSIONS:  # an upper-case name makes the field malformed
            headers = headers_of(tuple((k.lower(), v) for k, v in headers.fields))
        # stored as mitmproxy reads it (ISO-8859-1): the origin's bytes back, whatever they were
        reason = reason.encode("iso-8859-1", "replace") if isinstance(reason, str) else reason
        return make_response(version, status, reason, headers, body, time.time()), cond

    def _serve(self, flow: http.HTTPFlow, entry: cachestore.Entry, tier: str, age: float, stale: bool,
               code: str | None = None, warning: str | None = None, names: set[bytes] | None = None) -> None:
        if stale and warning is None:
            warning = '110 - "Response is Stale"'
        flow.response, cond = self._build(flow, entry, age, warning, names=names)
        if code is None:
            if cond == "IMS":
                code = "TCP_IMS_HIT"
            elif cond == "INM":
                code = "TCP_INM_HIT"
            elif entry.meta.status >= 400:
                code = "TCP_NEGATIVE_HIT"
            else:
                code = "TCP_MEM_HIT" if tier == "mem" else "TCP_HIT"
        self._tag(flow, code, "STALE" if stale else "HIT", tier)
        self.counts["hit"] += 1
        self.counts[f"hit_{tier}"] += 1

    def _only_if_cached(self, flow: http.HTTPFlow) -> None:
        flow.response = errorpage.make("ERR_ONLY_IF_CACHED_MISS", flow.request.pretty_url)
        answered.refuse_body(flow)
        flow.metadata[meta.ERROR] = "ERR_ONLY_IF_CACHED_MISS"
        self._tag(flow, "TCP_MISS", "MISS", None)
        return None

    # --- negative caching of unreachable origins ---------------------------
    def _failure(self, key: str) -> Failure | None:
        if not self.failures:
            return None
        origin = origin_of(key)
        f = self.failures.get(origin)
        if f is None:
            return None
        if f.until <= time.time():
            del self.failures[origin]
            return None
        return f

    def _remember_failure(self, flow: http.HTTPFlow, key: str) -> None:
        page = flow.metadata.get(meta.ERROR)
        if self.negative_ttl <= 0 or page not in ("ERR_CONNECT_FAIL", "ERR_DNS_FAIL") or flow.response is None:
            return
        r = flow.response
        self.failures[origin_of(key)] = Failure(time.time() + self.negative_ttl, r.status_code,
                                                list(r.headers.fields), r.raw_content or b"", page)
        if len(self.failures) > 10000:
            self.failures.pop(next(iter(self.failures)))

    def _answer_failure(self, flow: http.HTTPFlow, f: Failure) -> None:
        now = time.time()
        headers = http.Headers(list(f.headers))
        flow.response = http.Response("HTTP/1.1", f.status, b"Service Unavailable", headers,
                                      b"" if flow.request.method == "HEAD" else f.body, None, now, now)
        answered.refuse_body(flow)  # (an upload to an origin that is down)
        flow.metadata[meta.ERROR] = f.page
        self._tag(flow, "TCP_NEGATIVE_HIT", "NEGATIVE_HIT", "mem")
        return None

    # --- PURGE -------------------------------------------------------------------
    def _purge_allowed(self, flow: http.HTTPFlow) -> bool:
        try:
            ip = ipaddress.ip_address(meta.client_ip(flow))
        except ValueError:
            return False
        return any(ip.version == n.version and ip in n for n in self.purge_nets)

    def _purge(self, flow: http.HTTPFlow) -> None:
        answered.refuse_body(flow)  # answered here, either way
        if not self._purge_allowed(flow):
            flow.response = errorpage.make("ERR_ACCESS_DENIED", flow.request.pretty_url,
                                           detail="PURGE is not allowed from this address (purge_from)")
            flow.metadata[meta.ERROR] = "ERR_ACCESS_DENIED"
            self._tag(flow, "TCP_DENIED", "DENIED", None)
            return
        n = self._forget(primary_key(flow))
        now = time.time()
        flow.response = http.Response.make(200 if n else 404, b"", {"Server": "relais", "Content-Length": "0"})
        flow.response.timestamp_start = flow.response.timestamp_end = now
        self._tag(flow, "TCP_MISS", "PURGED" if n else "NOT_FOUND", None)

    # --- responses -------------------------------------------------------------
    def responseheaders(self, flow: http.HTTPFlow) -> None:
        local = flow.metadata.get(meta.LOCAL)
        if local or self.store is None:
            return
        resp = flow.response
        if flow.request.data.method not in _SAFE_OR_CONNECT:
            # RFC 9111 4.4: once the status is known, whether the body then arrives whole or not
            key = primary_key(flow)
            if key is not None:
                self._invalidate(flow, key)
        h = resp.headers
        names = _names(h)
        lower = resp.data.http_version in meta.LOWER_CASE_VERSIONS
        if b"x-cache" in names:
            h["X-Cache"] = _X_CACHE_MISS
        else:  # what h["X-Cache"] = ... does for an absent field, minus its overhead
            h.fields = (*h.fields, (b"x-cache" if lower else b"X-Cache", _X_CACHE_MISS))
        if b"date" not in names:  # RFC 9110 6.6.1: a cache with a clock adds the Date an origin left out
            date = rfc9111.format_http_date(resp.timestamp_start or time.time()).encode()
            h.fields = (*h.fields, (b"date" if lower else b"Date", date))
        if not streams.may_stream(resp, self.late_streams):
            return  # buffered whole: response() stores it
        if flow.request.method != "GET" or self.store.disk is None:
            return
        if flow.id in self.pending and resp.status_code == 304:
            return
        if not self._allowed(flow, "store_miss"):
            return
        key = primary_key(flow)
        ok, _ = rfc9111.storable("GET", resp.status_code, flow.request.headers, self._view(flow, resp.headers),
                                 negative_ttl=self.negative_ttl)
        try:
            expected = int(resp.headers["content-length"]) if "content-length" in resp.headers else None
        except ValueError:
            ok = False
            expected = None
        if not ok or (expected is not None and expected > self.store.disk_object_max):
            return
        m = self._meta(flow, key, length=0, digest="")
        if m is None:
            return

        def copying(inner):  # now, or when mitmproxy streams a body of unknown length past stream_large_bodies
            f = self.store.new_tempfile()
            if f is None:  # no room for a copy (logged): relayed, not stored
                return inner
            copy = StreamCopy(f, self.store.disk_object_max, expected)
            self.streams[flow.id] = (key, copy, m)
            return (lambda chunk: copy(inner(chunk))) if inner else copy
        streams.wrap(resp, copying)

    def _meta(self, flow: http.HTTPFlow, key: str, length: int, digest: str,
              rh: rfc9111.Fields | None = None, partial: bool = False) -> cachestore.Meta | None:
        req, resp = flow.request, flow.response
        if rh is None:
            rh = rfc9111.Fields.of(resp.headers)
        fields = rfc9111.vary_fields(rh)
        if fields is None:
            return None
        request_time = req.timestamp_start or time.time()
        response_time = resp.timestamp_start or time.time()
        policy = self._view(flow, rh)
        lifetime, source = rfc9111.freshness_lifetime(
            resp.status_code, policy, response_time, url=lambda: flow.request.pretty_url,
            rules=self.rules, negative_ttl=self.negative_ttl)
        if lifetime <= 0 and not rfc9111.validators(rh):
            return None  # never fresh and cannot be revalidated: storing it is useless
        # Age and X-Cache are recomputed when served; Content-Length is the stored body's, added by the caller
        headers = rfc9111.storable_headers(rh, also_drop=_RECOMPUTED)
        vary_key = rfc9111.vary_values(fields, req.headers) if fields else ()
        m = cachestore.Meta(
            url=key, status=resp.status_code, reason=resp.reason or "", http_version=resp.http_version,
            headers=headers, request_time=request_time, response_time=response_time,
            lifetime=lifetime, lifetime_source=source, vary=fields,
            vary_key=(*vary_key, rfc9111.PARTIAL) if partial else vary_key, length=length, digest=digest)
        m.initial_age = rfc9111.initial_age(rh, request_time, response_time)
        m.targeted = policy is not rh
        return m

    def response(self, flow: http.HTTPFlow) -> None:
        stream = self.streams.pop(flow.id, None)
        try:
            self._response(flow, stream)
        finally:
            self._release(flow)
            if stream is not None and not stream[1].handed:  # not stored: no temp file is left behind
                stream[1].abort()

    def _response(self, flow: http.HTTPFlow, stream: tuple[str, StreamCopy, cachestore.Meta] | None) -> None:
        if self.store is None:
            return
        pending = self.pending.pop(flow.id, None)
        local = flow.metadata.get(meta.LOCAL)
        if local == "cache":
            return
        req = flow.request
        method = req.method  # a property that decodes on every read
        key = primary_key(flow) if method != "CONNECT" else None
        if key is None:
            return
        if local == "errors":
            if self._allowed(flow, "store_miss"):
                self._remember_failure(flow, key)
            # the origin failed (a 5xx page; a forwarding loop's 403 is no failure of the origin)
            failed = pending is not None and flow.response.status_code >= 500
            if failed and self._stale_if_error(flow, pending):
                self._restore_conditionals(flow, pending)
                self._serve_revalidated(flow, pending, "TCP_REFRESH_FAIL_OLD", "HIER_NONE",
                                        warning='111 - "Revalidation Failed"')
            elif failed:  # as Squid logs its own error page for a revalidation that may not fall back
                self._refreshed(flow, "TCP_REFRESH_FAIL_ERR")
            return
        if local:
            return
        resp = flow.response
        if resp is None:
            return
        self.failures.pop(origin_of(key), None) if self.failures else None
        may_store = self._allowed(flow, "store_miss")
        if method == "HEAD" and resp.status_code == 200:
            if may_store and self._allowed(flow, "send_hit"):
                if self._update_from_head(flow, key, pending):
                    return
            elif self._forget(key):  # RFC 9111 4.3.5: update or invalidate; the rules forbid answering: as Squid
                self.counts["invalidated"] += 1
        if pending is not None:
            if resp.status_code == 304:
                self._freshen(flow, pending)
                return
            # A streamed error already went to the client: too late to answer with the stale entry.
            # (mitmproxy 11 streams a body over stream_large_bodies even if a hook says not to.)
            if resp.status_code >= 500 and not resp.stream and self._stale_if_error(flow, pending):
                self._restore_conditionals(flow, pending)
                self._serve_revalidated(flow, pending, "TCP_REFRESH_FAIL_OLD", meta.forwarded(flow),
                                        warning='111 - "Revalidation Failed"')
                return
            if resp.status_code == 206 and rfc9111.validator_mismatch(pending.entry.meta.headers, resp.headers):
                # 4.3.3: the stored response is not the current one; never serve it again (max_stale)
                self.store.remove(key)
            # Squid's names: a new response replaces the entry; an error that could not be answered stale
            self._refreshed(flow, "TCP_REFRESH_FAIL_ERR" if resp.status_code >= 500 else "TCP_REFRESH_MODIFIED")
        if method not in ("GET", "HEAD"):  # (invalidated at responseheaders)
            if method == "POST" and may_store and self._describes_target(flow, key):
                self._store(flow, key, since=time.time())  # as a response to GET; after its own invalidation
            return
        if method == "GET":
            stored = None
            if may_store:
                stored = self._store_stream(flow, *stream) if stream is not None else self._store(flow, key)
            # a newer response that is not stored (the rules keep it out, or it is not storable) supersedes
            # the copy this request would have been answered from, as in Squid (RFC 9111 4)
            if (not may_store or (stored is False and rfc9111.supersedes(resp.status_code, req.headers))) \
                    and (pending is not None or self.lookup(key, req.headers)[0] is not None) and self._forget(key):
                self.counts["invalidated"] += 1
        if pending is not None and pending.client_conditionals:
            # the client's own conditionals, stripped for our revalidation, answered from the new response
            self._restore_conditionals(flow, pending)
            if resp.status_code == 200 and not resp.stream and \
                    rfc9111.conditional_result(method, req.headers, resp.headers):  # (a streamed body went out)
                flow.response = http.Response(resp.http_version, 304, b"Not Modified", resp.headers.copy(),
                                              b"", None, resp.timestamp_start, resp.timestamp_end)
                for name in ("Content-Length", "Transfer-Encoding"):  # a 304 has no body (RFC 9112 6.3)
                    flow.response.headers.pop(name, None)
        if not flow.metadata.get(meta.CODE) and resp.status_code < 400:
            flow.metadata[meta.CACHE] = {"status": "MISS", "tier": None}

    def _refreshed(self, flow: http.HTTPFlow, code: str) -> None:
        """Tag the answer to a revalidation that is not the stored response (a new one, or an error)."""
        flow.metadata[meta.CODE] = code
        flow.metadata[meta.CACHE] = {"status": code[4:], "tier": None}
        _say(flow, f"cache: {code}")
        self.counts[code] += 1

    def _stale_if_error(self, flow: http.HTTPFlow, pending: Pending) -> bool:
        m = pending.entry.meta
        staleness = m.age(time.time()) - m.lifetime
        if pending.reload and not rfc9111.stale_if_error_ok(flow.request.headers, (), staleness):
            return False  # a client that asked for no stored copy gets one only if it says so itself
        return rfc9111.stale_if_error_ok(flow.request.headers, self._policy(m), staleness, max_stale=self.max_stale)

    def _restore_conditionals(self, flow: http.HTTPFlow, pending: Pending) -> None:
        for name in ("If-None-Match", "If-Modified-Since"):
            flow.request.headers.pop(name, None)
        for name, v in pending.client_conditionals:
            flow.request.headers.add(name, v)

    def _freshen(self, flow: http.HTTPFlow, pending: Pending) -> None:
        """4.3.4: a 304 answers our revalidation: update the stored headers, serve the stored body."""
        entry = pending.entry
        resp = flow.response
        own = None
        if not rfc9111.validator_mismatch(entry.meta.headers, resp.headers):
            new = self._freshened(pending.key, entry, resp.headers, flow.request.timestamp_start or time.time(),
                                  resp.timestamp_start or time.time(), flow.request.pretty_url, flow.request.headers)
            entry = cachestore.Entry(new, entry.body)
            own = resp.headers
        else:  # a 304 naming another validator selects no stored response (4.3.4): the stored one answers
            self._forget(pending.key)  # this time, and the next request fetches the whole response
        self._restore_conditionals(flow, pending)
        pending = Pending(pending.key, entry, pending.tier, pending.client_conditionals, pending.reload)
        self._serve_revalidated(flow, pending, "TCP_REFRESH_UNMODIFIED", meta.forwarded(flow))
        if own is not None:
            # this client's request reached the origin: it gets the whole updated response, with the
            # fields kept out of the store (what no-cache="..." names) (4.3.4); its cookies only if
            # hits may carry them (hit_set_cookie: Squid strips them from revalidated hits too)
            for name in {k.lower() for k, _ in rfc9111.storable_headers(own.items(multi=True), named=False)} - _NOT_OWN:
                if name.encode() not in self.hit_drop:
                    flow.response.headers.set_all(name, own.get_all(name))

    def _freshened(self, key: str, entry: cachestore.Entry, headers, request_time: float, response_time: float,
                   url: str, req_headers) -> cachestore.Meta:
        """4.3.4: the stored response's metadata updated by the fields of a 304 (or of a HEAD 200),
        stored in its place; dropped instead if it no longer varies on what it was stored under, or
        may no longer be stored (the origin now says private or no-store...: 3.2, 3.5)."""
        old = entry.meta
        new_headers = [(k, v) for k, v in rfc9111.freshen_headers(old.headers, headers)
                       if k.lower() not in ("x-cache", "age")]
        policy = self._policy(old, new_headers)
        lifetime, source = rfc9111.freshness_lifetime(old.status, policy, response_time,
                                                      url=url, rules=self.rules, negative_ttl=self.negative_ttl)
        new = dataclasses.replace(old, headers=new_headers, request_time=request_time,
                                  response_time=response_time, lifetime=lifetime, lifetime_source=source)
        new.initial_age = rfc9111.initial_age(headers, request_time, response_time)
        ok, why = rfc9111.storable("GET", old.status, req_headers, policy, negative_ttl=self.negative_ttl,
                                   partial=old.status == 206)
        if rfc9111.vary_fields(new_headers) != old.vary or not (ok or why in _REQUEST_REFUSALS):
            self._forget(key)  # stored under a key it no longer has, or not to be kept any more
        elif ok and not self._stale_answer(key, request_time):
            self.store.update_meta(key, new, entry.body)
        # (refused for the request alone: its no-store, or its Authorization, whose answer may be that
        # user's: the stored response stays as it was, for the others)
        return new

    def _update_from_head(self, flow: http.HTTPFlow, key: str, pending: Pending | None) -> bool:
        """4.3.5: a 200 to a HEAD updates the stored GET response it describes (same validators and
        length), which then answers it; one it no longer describes is invalidated."""
        resp = flow.response
        entry = pending.entry if pending else self.lookup(key, flow.request.headers)[0]
        if entry is None:
            return False
        if rfc9111.head_mismatch(entry.meta.headers, resp.headers):
            if self._forget(key):
                self.counts["invalidated"] += 1
            return False
        if pending is None:  # a client's reload: the origin's answer goes to it (TCP_MISS), and freshens the GET
            if not rfc9111.validator_mismatch(entry.meta.headers, resp.headers):
                self._freshened(key, entry, resp.headers, flow.request.timestamp_start or time.time(),
                                resp.timestamp_start or time.time(), flow.request.pretty_url, flow.request.headers)
            return True
        self._freshen(flow, pending)
        return True

    def _serve_revalidated(self, flow: http.HTTPFlow, pending: Pending, code: str, hier: str,
                           warning: str | None = None) -> None:
        entry = pending.entry
        age = entry.meta.age(time.time())
        flow.response, cond = self._build(flow, entry, age, warning)  # X-Cache: HIT, as Squid for both codes
        status = code.replace("TCP_", "")
        self._tag(flow, code, status, pending.tier, hier=hier)

    def _describes_target(self, flow: http.HTTPFlow, key: str) -> bool:
        """RFC 9110 9.3.3: a POST response with explicit freshness and a Content-Location equal to
        the target URI is a representation of that URI, reusable for later GETs."""
        location = flow.response.headers.get("content-location")
        return (location is not None and url_key(location, base=key) == key
                and rfc9111.has_explicit_freshness(self._view(flow, flow.response.headers)))

    def _store(self, flow: http.HTTPFlow, key: str, since: float | None = None) -> bool | None:
        """Store the response to a GET (or a POST response that describes the GET target, RFC 9110 9.3.3).
        True: stored; False: a whole response that is not (not storable, too large, no room); None: no
        whole response to judge (cut off, failed, or older than an invalidation of its URL)."""
        req, resp = flow.request, flow.response
        body = resp.raw_content
        if flow.error or self._stale_answer(key, since or req.timestamp_start):
            return None
        if body is None:  # streamed, and not copied by responseheaders: not storable, too large, no disk tier
            return False  # (or no room for a temporary file)
        fields = rfc9111.Fields.of(resp.headers)  # indexed once for the many look-ups below
        cl = fields.index.get("content-length")
        if cl is not None and "transfer-encoding" not in fields.index:
            try:
                if int(", ".join(cl)) != len(body):
                    return None  # truncated
            except ValueError:
                return None
        partial = resp.status_code == 206
        if partial:  # RFC 9111 3.3: kept for the ranges it holds, if it says which (one range, known length)
            part = rfc9111.content_range(", ".join(fields.index.get("content-range", ())))
            if part is None or part[1] - part[0] + 1 != len(body) or "range" not in req.headers:
                return False
        ok, reason = rfc9111.storable("GET", resp.status_code, req.headers, self._view(flow, fields),
                                      negative_ttl=self.negative_ttl, partial=partial)
        if not ok or len(body) > self.object_max:
            return False
        m = self._meta(flow, key, len(body), cachestore.digest(body), fields, partial=partial)
        if m is None:
            return False
        _add_length(m.headers, m.status, len(body))
        tier = self.store.put(key, m, body)
        if tier:
            self.counts["stored"] += 1
        return bool(tier)

    def _store_stream(self, flow: http.HTTPFlow, key: str, copy: StreamCopy, m: cachestore.Meta) -> bool | None:
        """As _store, for a body copied while it streamed."""
        if flow.error or self._stale_answer(key, flow.request.timestamp_start):
            return None  # not handed: response() removes the temp file
        if not copy.finish():  # larger than maximum_object_size: refused; else cut off, or no room for the copy
            return False if copy.n > copy.limit else None
        copy.handed = True
        m.length = copy.n
        m.digest = copy.h.hexdigest()
        _add_length(m.headers, m.status, copy.n)
        if self.store.put_file(key, m, copy.path):
            self.counts["stored"] += 1
            self.counts["stored_streamed"] += 1
            return True
        return False

    def _forget(self, key: str) -> int:
        """Remove a key's stored responses (invalidation, PURGE), and remember when."""
        self.invalidated[key] = time.time()
        self.invalidated.move_to_end(key)
        if len(self.invalidated) > INVALIDATED_MAX:
            self.invalidated.popitem(last=False)
        return self.store.remove(key)

    def _stale_answer(self, key: str, since: float | None) -> bool:
        """True if key was invalidated, or the cache cleared, after `since` (when the request that got
        this answer was made): the answer may predate the change that invalidated it."""
        if not since:  # a request of unknown date: as one made now
            return False
        now = time.time()
        # a time ahead of now: the clock was set back since; better store than refuse for that long
        return any(since < t <= now for t in (self.cleared_at, self.invalidated.get(key, 0.0)))

    def _invalidate(self, flow: http.HTTPFlow, key: str) -> None:
        resp = flow.response
        targets = rfc9111.invalidation_targets(flow.request.method, resp.status_code, key,
                                               site_relative(key, resp.headers))
        for url in targets:
            k = url_key(url)
            if k and self._forget(k):
                self.counts["invalidated"] += 1

    def error(self, flow: http.HTTPFlow) -> None:
        pending = self.pending.pop(flow.id, None)
        stream = self.streams.pop(flow.id, None)
        if stream:
            stream[1].abort()  # an aborted transfer is never stored
        # a client that left (mitmproxy closed its connection): the origin may be fine, another waiting
        # request asks it; an origin that failed is not asked again by each waiting request in turn
        self._release(flow, client_left=not flow.client_conn.state & connection.ConnectionState.CAN_WRITE)
        # The origin failed a revalidation before any of its response was sent on (refused mitmproxy's own
        # connection, accepted it and closed or reset it, or cut short a response mitmproxy was buffering):
        # stale-if-error, as for an origin the errors addon found unreachable (recover.py sends this
        # answer instead of mitmproxy's 502).
        if pending is None or not flow.metadata.get(meta.RECOVERABLE) or flow.metadata.get(meta.LOCAL):
            return
        if not self._stale_if_error(flow, pending):
            self._refreshed(flow, "TCP_REFRESH_FAIL_ERR")  # the error page that follows is the answer
            return
        failure = flow.error.msg if flow.error else "no response"
        self._restore_conditionals(flow, pending)
        self._serve_revalidated(flow, pending, "TCP_REFRESH_FAIL_OLD", meta.forwarded(flow),
                                warning='111 - "Revalidation Failed"')
        flow.metadata[meta.RECOVERED] = True
        flow.comment += f" (origin: {failure})"

    # --- stale-while-revalidate -------------------------------------------------
    def _refresh_in_background(self, key: str, entry: cachestore.Entry, flow: http.HTTPFlow) -> None:
        if key in self.refreshing or len(self.refreshing) >= REFRESH_MAX:
            return  # served stale all the same; a later request asks for the refresh again
        origin = origin_of(key)
        if sum(o == origin for o in self.refreshing.values()) >= REFRESH_PER_ORIGIN:
            return
        started = time.time()
        m = entry.meta
        url = re.sub(r"^(http://[^/]+):80/|^(https://[^/]+):443/", lambda g: (g[1] or g[2]) + "/", m.url)
        headers = rfc9111.revalidation_headers(flow.request.headers, m.headers)
        vhost = re.match(r"[a-z]+://([^/@]*)@", url)
        if vhost:  # a virtual host of the reverse-mode target (primary_key): sent as its Host
            url = url.replace(vhost[1] + "@", "", 1)
            headers["Host"] = unquote(vhost[1])
        if any(value is None and name.lower() in ADDED_BY_URLLIB for name, value in m.vary_key):
            return  # the variant had none of a field urllib sends, and the origin varies on it
        insecure = getattr(ctx.options, "ssl_insecure", False)
        # the way the flow went: through the upstream proxy of an upstream-mode listener, else direct
        mode = getattr(flow.client_conn, "proxy_mode", None)
        proxies = {}
        if getattr(mode, "type_name", "") == "upstream":
            proxies = {"http": mode.data, "https": mode.data}
            auth = getattr(ctx.options, "upstream_auth", None)
            if auth:
                headers["Proxy-Authorization"] = "Basic " + base64.b64encode(auth.encode()).decode()

        self.refreshing[key] = origin

        async def run():
            try:
                if self.store is None:  # the addon is done (mitmproxy exits, or the script was reloaded)
                    return
                if self.refresher is None:
                    self.refresher = Refresher(REFRESH_THREADS)
                request_time, status, headers_list, body = await self.refresher.run(
                    lambda: fetch(url, headers, proxies, insecure, self.object_max + 1))
                if self.store is None or self._stale_answer(key, started):  # done, or purged meanwhile
                    return
                response_time = time.time()
                self.counts["background_refresh"] += 1
                if not any(k.lower() == "date" for k, _ in headers_list):  # RFC 9110 6.6.1, as responseheaders
                    headers_list.append(("Date", rfc9111.format_http_date(response_time)))
                if status == 304:
                    if not rfc9111.validator_mismatch(m.headers, headers_list):  # else not the stored response's
                        self._freshened(key, entry, headers_list, request_time, response_time, url, headers)
                else:
                    if status >= 500:  # a failure: the stale entry stays for stale-if-error
                        return
                    policy = self._policy(m, headers_list)
                    ok, _ = rfc9111.storable("GET", status, headers, policy, negative_ttl=self.negative_ttl)
                    if not ok or len(body) > self.object_max:
                        self._forget(key)
                        return
                    lifetime, source = rfc9111.freshness_lifetime(status, policy, response_time, url=url,
                                                                  rules=self.rules, negative_ttl=self.negative_ttl)
                    hl = _add_length(rfc9111.storable_headers(headers_list, also_drop=_RECOMPUTED), status,
                                     len(body))
                    fields = rfc9111.vary_fields(headers_list)
                    if fields is None:
                        self._forget(key)
                        return
                    new = cachestore.Meta(url=key, status=status, reason="", http_version="HTTP/1.1",
                                          headers=hl, request_time=request_time, response_time=response_time,
                                          lifetime=lifetime, lifetime_source=source, vary=fields,
                                          vary_key=m.vary_key if fields == m.vary else (),
                                          length=len(body), digest=cachestore.digest(body))
                    new.initial_age = rfc9111.initial_age(headers_list, request_time, response_time)
                    new.reason = responses.get(status, "")
                    new.targeted = policy is not headers_list
                    if fields == m.vary:
                        self.store.put(key, new, body)
            except Exception as e:
                log.info("cache: background revalidation of %s failed: %s", url, e)
            finally:
                self.refreshing.pop(key, None)

        asyncio.get_running_loop().create_task(run())

    # --- commands -----------------------------------------------------------------
    @command.command("cache.purge")
    def purge(self, url: str) -> int:
        """Remove every stored variant of URL (absolute http:// or https:// URL); returns how many URLs went."""
        key = url_key(url)
        if key is None:
            raise exceptions.CommandError(f"cache.purge: not an absolute http(s) URL: {url!r}")
        n = self._forget(key) if self.store else 0
        shown = url.encode("utf-8", "backslashreplace").decode()  # a surrogate would break the console's log
        log.info("cache.purge %s: %s", shown, "removed" if n else "not cached")
        return 1 if n else 0

    @command.command("cache.clear")
    def clear(self) -> None:
        """Empty the cache (both tiers) and forget unreachable origins."""
        if self.store:
            self.store.clear()
            self.cleared_at = time.time()
        self.failures.clear()
        log.info("cache.clear: cache emptied")

    @command.command("cache.stats")
    def stats(self) -> str:
        """Entries and bytes per tier, hits, misses and hit ratios (JSON)."""
        s = self.store
        hits, misses = self.counts["hit"], self.counts["miss"] + self.counts["reload"]
        lookups = hits + misses + sum(self.counts[c] for c in (
            "TCP_REFRESH_UNMODIFIED", "TCP_REFRESH_MODIFIED", "TCP_REFRESH_FAIL_ERR"))
        data = {
            "mem": {"entries": len(s.mem.items) if s else 0, "bytes": s.mem.bytes if s else 0,
                    "limit": s.mem.limit if s else 0},
            "disk": {"entries": s.disk.count() if s and s.disk else 0,
                     "bytes": s.disk.volume() if s and s.disk else 0,
                     "limit": s.disk.limit_now() if s and s.disk else 0,  # less than cache_dir_size on a full disk
                     "cache_dir_size": int(s.disk.dc.size_limit) if s and s.disk else 0,
                     "corrupt_dropped": s.disk.corrupt if s and s.disk else 0,
                     "off": self.disk_error or (s.disk.off_reason if s and s.disk else None)},
            "negative_origins": len(self.failures),
            "hits": hits, "mem_hits": self.counts["hit_mem"], "disk_hits": self.counts["hit_disk"],
            "misses": misses,
            "hit_ratio": round(hits / lookups, 4) if lookups else 0.0,
            "mem_hit_ratio": round(self.counts["hit_mem"] / lookups, 4) if lookups else 0.0,
            "codes": {k: v for k, v in self.counts.items() if k.startswith("TCP_")},
            "stored": self.counts["stored"], "collapsed": self.counts["collapsed"],
            "invalidated": self.counts["invalidated"],
        }
        text = json.dumps(data, sort_keys=True)
        log.info("cache.stats %s", text)
        return text


addons = [Cache()]
