"""The flow.metadata keys Relais addons use to talk to each other.

This module is the contract in code; addons/README.md explains each key.
An addon writes only the keys it owns and reads the others; nothing else
is shared between addons.
"""
from __future__ import annotations

import re

from mitmproxy import ctx, exceptions
from mitmproxy.net.http.url import default_port, parse_authority

CODE = "relais.code"          # Squid result code for the log, e.g. "TCP_DENIED", "TCP_MEM_HIT"
HIER = "relais.hier"          # Squid hierarchy code, e.g. "HIER_NONE" when the origin was not contacted
LOCAL = "relais.local"        # name of the addon that answered the request itself
ERROR = "relais.error"        # Squid error page name sent, e.g. "ERR_ACCESS_DENIED"
ACL = "relais.acl"            # {"action": "allow"|"deny", "rule": str, "policy": str}
USER = "relais.user"          # authenticated user name (HTTP and raw TCP/UDP flows)
CACHE = "relais.cache"        # cache outcome: {"status": "HIT"|"MISS"|..., "tier": "mem"|"disk"|None}
APP = "relais.app"            # detected/blocked application name
ANONYMIZE = "relais.anonymize"  # anonymization level applied to the upstream request
SENT_BYTES = "relais.sent_bytes"  # body bytes actually sent to the client (streamed bodies)
PASSTHROUGH = "relais.passthrough"  # raw stream relayed untouched (ignore_hosts); only its size is kept
PEER = "relais.peer"          # upstream address tried when no connection was made (e.g. refused)
ACLS = "relais.acls"          # sorted names of the policy's acls that match the request (acl.py)
ACL_NAMES = "relais.acl_names"  # sorted names of every acl the access policy defines, predefined included (acl.py)
RECOVERABLE = "relais.recoverable"  # set by recover.py during an error hook whose answer it would send:
# True, or "cut" (recover.CUT) when the origin cut its response short (flow.response holds its head)
RECOVERED = "relais.recovered"  # the origin failed and an addon answered in the error hook (recover.py)


# HTTP versions whose field names must be lower case (RFC 9113 8.2.1, RFC 9114 4.2)
LOWER_CASE_VERSIONS = frozenset({b"HTTP/2.0", b"HTTP/3"})
MAX_URL = 8192  # Squid's MAX_URL: a longer URL is refused (414), and no log line holds more of one
HTTP1_VERSIONS = frozenset({b"HTTP/1.1", b"HTTP/1.0"})  # (what mitmproxy writes as http_version: bytes)


def add_comment(flow, text: str) -> None:
    """Add a line to the flow's mitmweb comment, after what earlier addons wrote there."""
    flow.comment = f"{flow.comment}\n{text}" if flow.comment else text


def client_ip(flow) -> str:
    """The client's address as Squid prints it (IPv4-mapped IPv6 unwrapped)."""
    peer = getattr(flow.client_conn, "peername", None)
    if not peer:
        return "-"
    ip = str(peer[0])
    return ip[7:] if ip.startswith("::ffff:") else ip


def peer(flow) -> str | None:
    """The upstream address connected to (the upstream proxy's in upstream mode; or tried, see PEER), or None."""
    conn = getattr(flow, "server_conn", None)
    peer = getattr(conn, "peername", None) if conn else None
    if not peer:
        if _through_parent(flow):  # upstream mode: the flow's server_conn never holds that connection itself
            return str(conn.via[1][0])
        return flow.metadata.get(PEER)
    ip = str(peer[0])
    return ip[7:] if ip.startswith("::ffff:") else ip


def forwarded(flow) -> str:
    """Squid's hierarchy code of a request sent on: FIRSTUP_PARENT through an upstream proxy, else HIER_DIRECT."""
    conn = getattr(flow, "server_conn", None)
    return "FIRSTUP_PARENT" if getattr(conn, "via", None) else "HIER_DIRECT"


def _through_parent(flow) -> bool:
    """An upstream-mode flow the parent answered. mitmproxy names the parent (server_conn.via) on every
    flow of such a listener, sent on or not: a response from upstream is what says it went there."""
    if not getattr(getattr(flow, "server_conn", None), "via", None) or flow.metadata.get(LOCAL):
        return False
    if hasattr(flow, "request"):  # HTTP: a CONNECT is answered by mitmproxy itself
        return flow.response is not None and flow.request.method != "CONNECT"
    return any(not m.from_client for m in flow.messages)  # a raw stream: something came back through it


def user(flow) -> str | None:
    """The authenticated user: ours first, then mitmproxy's proxyauth.

    proxyauth records users of HTTP flows in flow.metadata["proxyauth"], but
    not for raw TCP flows; for those, its per-connection table is asked.
    """
    name = flow.metadata.get(USER)
    if name:
        return name
    auth = flow.metadata.get("proxyauth")
    if auth:
        return auth[0]
    try:
        pa = ctx.master.addons.get("proxyauth")
        table = pa.authenticated if pa else None
        auth = table.get(flow.client_conn) if table else None  # empty without proxy auth: skip the hash
    except Exception:  # no master (unit tests) or a proxyauth without the table
        auth = None
    return auth[0] if auth else None


def hostport(host: str, port: int) -> str:
    """host:port as a URL writes it: an IPv6 address in brackets (RFC 3986 3.2.2), as Squid logs it."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def request_url(request) -> str:
    """request.url of a request that is not CONNECT, computed from request.data directly (the property
    passes through six others: 1.7 us, on every request), and with an IPv6 host in brackets, which
    mitmproxy leaves out (http://::1:8080/). tests/test_suite.py checks both agree otherwise."""
    d = request.data
    return _url(d.scheme.decode("utf-8", "surrogateescape"), d.host, d.port,
                d.path.decode("utf-8", "surrogateescape"))


def named_site(request) -> tuple[str, int] | None:
    """(host, port) of the site the request names: the authority of an absolute-form target (RFC 9112
    3.2.2: the origin takes it over Host) or HTTP/2's :authority, else the Host header; None without
    one; ValueError when it names no host[:port]. An empty port is the scheme's (RFC 3986 3.2.3)."""
    raw = request.data.authority
    authority = raw.decode("utf-8", "surrogateescape") if raw else request.host_header
    if not authority:
        return None
    host, port = parse_authority(authority[:-1] if authority.endswith(":") else authority, check=True)
    return host, port or default_port(request.scheme) or 443


def pretty_url(request, site: tuple[str, int] | None = None) -> str:
    """request.pretty_url (the URL of the site the Host header names) of a request that is not CONNECT,
    with an IPv6 host in brackets. `site`: named_site(request), when the caller has it already."""
    if site is None:
        try:
            site = named_site(request)
        except ValueError:  # as mitmproxy: the field as it is
            site = (request.host_header, default_port(request.scheme) or 443)
        if site is None:
            return request_url(request)
    return _url(request.scheme, site[0], site[1], request.path)


def _url(scheme: str, host: str, port: int, path: str) -> str:
    if path == "*":
        path = ""
    if (scheme == "http" and port == 80) or (scheme == "https" and port == 443):
        return f"{scheme}://[{host}]{path}" if ":" in host else f"{scheme}://{host}{path}"
    return f"{scheme}://{hostport(host, port)}{path}"


def mode_name(flow) -> str:
    """The listener the flow came through, e.g. "regular", "socks5", "reverse"."""
    mode = getattr(flow.client_conn, "proxy_mode", None)
    return getattr(mode, "type_name", None) or "regular"


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b(?:ytes?)?)?\s*$", re.I)
_UNITS = {"": 1, "k": 1024, "m": 1024 ** 2, "g": 1024 ** 3, "t": 1024 ** 4}


def parse_size(value, name: str) -> int:
    """Squid-style sizes for an option: 67108864, "64 MB", "512 KB", "4m", "1.5 GB" (1 KB = 1024 bytes)."""
    m = _SIZE.match(str(value))
    if not m:
        raise exceptions.OptionsError(f"{name}: cannot read size {value!r}; use e.g. 67108864, '64 MB', '512 KB'")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])
