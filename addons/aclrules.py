"""Squid's access-control model, compiled: acl elements and http_access rules.

Pure code: loading reads the policy file (and the list files it names), but a
decision (`Policy.check`) does no I/O at all. The addon (acl.py) builds a
`Request` from a flow and asks the policy.

A policy in YAML (see policies/README.md for the full language)::

    acls:
      SSL_ports: port 443
      Safe_ports: port 80 21 443 70 210 1025-65535 280 488 591 777
      blocked: dstdomain "/etc/relais/blocked.txt"   # one item per line
      office: [src 10.0.0.0/8, src 192.168.0.0/16]    # several lines are ORed
    http_access:
      - deny !Safe_ports
      - deny CONNECT !SSL_ports
      - deny blocked
      - allow office
      - deny all
    ssl_bump:
      - splice banks
      - bump all

The same acl/http_access/ssl_bump lines can be read from a squid.conf
(`load_squid_conf`). Semantics follow Squid: acl names on a rule are ANDed,
`!` negates, the first matching rule decides, and when none matches the
answer is the opposite of the last rule (deny when there is no rule).
"""
from __future__ import annotations

import bisect
import dataclasses
import datetime as _dt
import functools
import glob
import ipaddress
import os
import re
from pathlib import Path
from typing import Callable, Iterable, Mapping

import yaml

from addons import policyfile

ALLOW, DENY = "allow", "deny"
BUMP_ACTIONS = ("splice", "bump", "terminate", "peek", "stare", "client-first", "server-first", "none")


class PolicyError(ValueError):
    """A policy that cannot be loaded: `file:line: reason`."""

    def __init__(self, reason: str, file: str | None = None, line: int | None = None):
        self.reason, self.file, self.line = reason, file, line
        where = f"{file or '<policy>'}:{line}" if line else (file or "<policy>")
        super().__init__(f"{where}: {reason}")


# --- the request as the acls see it ------------------------------------------

@dataclasses.dataclass
class Request:
    """What a decision is made on. Fields that are unknown stay None/empty.

    `host` is the name the client asked for (URL host, Host header in
    transparent mode, CONNECT host, SNI); `dst_ips` the addresses it resolves
    to, or None when not resolved (then `dst` acls do not match).
    As Squid, the acls see the URL host in lower case: `host` and the host
    part of `url` are lowercased (the path is not).
    `server_names` are the names in the server's certificate (CN and
    subjectAltNames) when known; ssl::server_name --server-provided needs them.
    """
    src: str | None = None
    method: str = "GET"
    proto: str = "HTTP"            # HTTP, HTTPS, NONE (CONNECT and raw TCP), ...
    host: str = ""
    port: int = 0
    path: str = ""                 # URL path with query; "" for CONNECT
    url: str = ""                  # the URL as Squid logs it (host:port for CONNECT)
    headers: Mapping[str, str] | None = None
    user: str | None = None
    sni: str | None = None
    port_names: tuple[str, ...] = ("regular",)   # myportname candidates: mode name, full spec, port
    local_port: int | None = None
    dst_ips: tuple[str, ...] | None = None
    rdns: tuple[str, ...] | None = None   # names of an IP host (reverse DNS; ("none",) if it failed)
    conns: int = 1                 # open connections from this client address (this one included)
    now: _dt.datetime | None = None
    server_names: tuple[str, ...] | None = None

    def __post_init__(self):
        # Squid parses the URL host to lower case: dstdom_regex, url_regex, ssl::server_name* never
        # see the client's capitals (differential test: http://LOCALHOST/ does not match ^LOCALHOST$).
        if self.host:
            self.host = self.host.lower()
        if self.url:
            self.url = _lower_url_host(self.url)

    def header(self, name: str) -> str | None:
        h = self.headers
        if h is None:
            return None
        if name.lower() == "cookie" and hasattr(h, "get_all"):  # HTTP/2 may send one field per cookie
            return "; ".join(h.get_all(name)) or None          # (RFC 9113 8.2.3), joined as the origin gets them
        v = h.get(name)
        if v is None and isinstance(h, dict):
            lname = name.lower()
            for k, val in h.items():
                if k.lower() == lname:
                    return val
        return v


class NeedAuth(Exception):
    """A proxy_auth acl was reached without an authenticated user (Squid asks for credentials)."""


# --- compiled matchers --------------------------------------------------------

def merge_ranges(ranges: Iterable[tuple[int, int]]) -> tuple[list[int], list[int]]:
    """Sorted, non-overlapping (starts, ends) of inclusive integer ranges, for bisect lookups."""
    merged: list[list[int]] = []
    for lo, hi in sorted(ranges):
        if merged and lo <= merged[-1][1] + 1:
            merged[-1][1] = max(merged[-1][1], hi)
        else:
            merged.append([lo, hi])
    return [m[0] for m in merged], [m[1] for m in merged]


class IPTable:
    """Sorted, merged address ranges per family; a lookup is one bisect."""

    def __init__(self, ranges: Iterable[tuple[int, int, int]] = ()):
        by = {4: [], 6: []}
        for ver, lo, hi in ranges:
            by[ver].append((lo, hi))
        self.starts, self.ends = {}, {}
        for ver, rs in by.items():
            self.starts[ver], self.ends[ver] = merge_ranges(rs)

    def __contains__(self, ip: str) -> bool:
        parsed = _ip_number(ip)
        if parsed is None:
            return False
        version, n = parsed
        i = bisect.bisect_right(self.starts[version], n) - 1
        return i >= 0 and n <= self.ends[version][i]


@functools.lru_cache(maxsize=4096)  # the same client and server addresses come back request after request
def _ip_number(ip: str) -> tuple[int, int] | None:
    """(version, integer) of an address (IPv4-mapped IPv6 as IPv4), or None if it is not one."""
    try:
        a = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return None
    if a.version == 6 and a.ipv4_mapped:
        a = a.ipv4_mapped
    return a.version, int(a)


def parse_ip_item(item: str) -> tuple[int, int, int]:
    """Squid src/dst forms: a.b.c.d, net/len, net/mask, lo-hi[/mask], IPv6 likewise, `all`."""
    if item == "all":
        raise _All
    mask = None
    if "/" in item:
        item, mask = item.split("/", 1)
    if "-" in item:
        lo_s, hi_s = item.split("-", 1)
        lo, hi = ipaddress.ip_address(lo_s), ipaddress.ip_address(hi_s)
        if lo.version != hi.version or int(lo) > int(hi):
            raise ValueError(f"bad address range {item!r}")
        return lo.version, int(lo), int(hi)
    addr = ipaddress.ip_address(item)
    if mask is None:
        return addr.version, int(addr), int(addr)
    if mask.isdigit():
        net = ipaddress.ip_network(f"{item}/{mask}", strict=False)
    else:
        net = ipaddress.ip_network(f"{item}/{ipaddress.ip_address(mask)}", strict=False)
    return net.version, int(net.network_address), int(net.broadcast_address)


class _All(Exception):
    pass


class DomainSet:
    """dstdomain: exact names plus `.suffix` entries, matched label by label."""

    def __init__(self, items: Iterable[str]):
        self.exact: set[str] = set()
        self.suffix: set[str] = set()
        for d in items:
            d = d.lower().rstrip(".")
            if d.startswith("."):
                self.suffix.add(d[1:])
            else:
                self.exact.add(d)

    def match(self, host: str) -> bool:
        if not host:
            return False
        host = host.lower().rstrip(".")
        if host in self.exact or host in self.suffix:
            return True
        suffix = self.suffix
        i = host.find(".")
        while i >= 0:
            host = host[i + 1:]
            if host in suffix:
                return True
            i = host.find(".")
        return False


class RegexSet:
    """Regexes with Squid's -i/+i toggles, combined into at most two compiled patterns."""

    def __init__(self, patterns: Iterable[tuple[str, bool]]):
        ci = [p for p, icase in patterns if icase]
        cs = [p for p, icase in patterns if not icase]
        self.compiled = []
        if cs:
            self.compiled.append(re.compile("|".join(f"(?:{p})" for p in cs)))
        if ci:
            self.compiled.append(re.compile("|".join(f"(?:{p})" for p in ci), re.IGNORECASE))

    def search(self, text: str | None) -> bool:
        if text is None:
            return False
        for r in self.compiled:
            if r.search(text):
                return True
        return False


class PortSet:
    def __init__(self, ranges: Iterable[tuple[int, int]]):
        self.starts, self.ends = merge_ranges(ranges)

    def __contains__(self, port: int) -> bool:
        i = bisect.bisect_right(self.starts, port) - 1
        return i >= 0 and port <= self.ends[i]


# --- acl types ----------------------------------------------------------------

DAYS = {"S": 6, "M": 0, "T": 1, "W": 2, "H": 3, "F": 4, "A": 5}  # letter -> datetime.weekday()

# type -> (flags it accepts, description). Order matters only for docs.
TYPES = {
    "all": "always matches",
    "src": "client address: IP, net/len, net/mask, lo-hi",
    "dst": "destination address (the URL host resolved)",
    "dstdomain": "destination host name; .example.com matches it and its subdomains",
    "dstdom_regex": "regex on the destination host [-i]",
    "url_regex": "regex on the whole URL [-i]",
    "urlpath_regex": "regex on the URL path and query [-i]",
    "port": "destination port or lo-hi range",
    "localport": "port the client connected to",
    "myportname": "listener: mitmproxy mode name (regular, socks5, reverse...), full mode spec, or port",
    "proto": "request protocol: HTTP, HTTPS, NONE (CONNECT, raw TCP)...",
    "method": "request method (case-sensitive)",
    "time": "days (SMTWHFA) and/or HH:MM-HH:MM",
    "browser": "regex on User-Agent [-i]",
    "referer_regex": "regex on Referer [-i]",
    "req_header": "header-name [-i] regex",
    "proxy_auth": "authenticated user names, or REQUIRED for any user [-i]",
    "proxy_auth_regex": "regex on the authenticated user name [-i]",
    "maxconn": "more than N open connections from the client address",
    "ssl::server_name": "TLS SNI or CONNECT host, dstdomain syntax",
    "ssl::server_name_regex": "regex on the TLS SNI or CONNECT host [-i]",
}
REGEX_TYPES = {"dstdom_regex", "url_regex", "urlpath_regex", "browser", "referer_regex",
               "proxy_auth_regex", "ssl::server_name_regex"}
DOMAIN_TYPES = {"dstdomain", "ssl::server_name"}
AUTH_TYPES = {"proxy_auth", "proxy_auth_regex"}
SERVER_NAME_OPTIONS = ("--client-requested", "--server-provided", "--consensus")
# What each acl type reads of a Request: a verdict is a pure function of these fields
# (and of the minute, for time acls), so Policy.verdict can remember it.
READS = {
    "all": (), "src": ("src",), "dst": ("host", "dst_ips"), "dstdomain": ("host", "rdns"),
    "dstdom_regex": ("host", "rdns"), "url_regex": ("url",), "urlpath_regex": ("path",), "port": ("port",),
    "localport": ("local_port",), "myportname": ("port_names",), "proto": ("proto",), "method": ("method",),
    "time": ("now",), "browser": ("headers",), "referer_regex": ("headers",), "req_header": ("headers",),
    "proxy_auth": ("user",), "proxy_auth_regex": ("user",), "maxconn": ("conns",),
    "ssl::server_name": ("sni", "host", "server_names"), "ssl::server_name_regex": ("sni", "host", "server_names"),
}
MEMO_SIZE = 4096  # verdicts remembered per policy
# acl types that key the verdict memo by their result (a pure regex on one field, never NeedAuth)
KEYED_BY_RESULT = frozenset({"url_regex", "urlpath_regex", "referer_regex"})

# acl types that can be decided from a connection alone (no request, no protocol yet)
CONNECTION_TYPES = frozenset({"all", "src", "dst", "port", "localport", "myportname", "time", "maxconn",
                              "proxy_auth", "proxy_auth_regex"})
NAMED_CONNECTION_TYPES = CONNECTION_TYPES | {"dstdomain", "dstdom_regex"}  # a connection to a named host


@dataclasses.dataclass
class AclLine:
    """One `acl` definition line before compiling: where it came from and its tokens."""
    type: str
    values: list[tuple[str, str | None, int | None]]   # (token, file, line) -- a token's origin
    file: str | None
    line: int | None


class Acl:
    """A named acl: all its lines of one type, compiled into one matcher."""

    def __init__(self, name: str, type_: str, lines: list[AclLine]):
        self.name, self.type, self.lines = name, type_, lines
        self.file, self.line = lines[0].file, lines[0].line
        # Squid's -n: no reverse lookup of IP hosts for dstdomain/dstdom_regex (and no lookup for dst)
        self.noresolve = any(tok == "-n" for ln in lines for tok, _, _ in ln.values)
        self.matcher: Callable[[Request], bool] = self._compile()

    def __repr__(self):
        return f"Acl({self.name!r}, {self.type!r})"

    def _err(self, reason: str, file=None, line=None):
        return PolicyError(f"acl {self.name} ({self.type}): {reason}", file or self.file, line or self.line)

    def _tokens(self, flags: set[str] = frozenset(), toggles=False):
        """Yields (token, icase, file, line), handling -i/+i toggles and `--`."""
        for ln in self.lines:
            icase = False
            options_done = False
            for tok, f, l in ln.values:
                if not options_done and tok.startswith(("-", "+")) and len(tok) > 1:
                    if tok == "--":
                        options_done = True
                        continue
                    if toggles and tok in ("-i", "+i"):
                        icase = tok == "-i"
                        continue
                    if tok in flags:
                        if tok == "-i":
                            icase = True
                        continue
                    if not (tok[1:].isdigit() or "-" in tok[1:]):  # "-5" is no flag
                        raise self._err(f"unknown option {tok!r}", f or ln.file, l or ln.line)
                yield tok, icase, f or ln.file, l or ln.line

    def _compile(self) -> Callable[[Request], bool]:
        t = self.type
        if t == "all":
            return lambda r: True
        if t in ("src", "dst"):
            ranges, everything = [], False
            for tok, _, f, l in self._tokens({"-n"}):
                try:
                    ranges.append(parse_ip_item(tok))
                except _All:
                    everything = True
                except ValueError as e:
                    raise self._err(f"bad address {tok!r} ({e})", f, l) from None
            table = IPTable(ranges)
            if t == "src":
                return (lambda r: True) if everything else (lambda r: r.src is not None and r.src in table)
            if everything:
                return lambda r: bool(r.dst_ips) or _is_ip(r.host)
            return lambda r: any(ip in table for ip in _dst_addresses(r))
        if t in DOMAIN_TYPES:
            items = []
            for tok, _, f, l in self._tokens({"-n", *SERVER_NAME_OPTIONS}):
                if not re.fullmatch(r"\.?[A-Za-z0-9_*:\[\]\-.]+", tok) or tok in (".", ".."):
                    raise self._err(f"bad domain {tok!r}", f, l)
                items.append(tok)
            ds = DomainSet(items)
            if t == "dstdomain":
                if self.noresolve:
                    return lambda r: ds.match(r.host)
                return lambda r: ds.match(r.host) or (r.rdns is not None and _is_ip(r.host)
                                                       and any(ds.match(n) for n in r.rdns))
            return self._server_name(ds.match)
        if t in REGEX_TYPES:
            pats = []
            flags = {"-n", *SERVER_NAME_OPTIONS} if t == "ssl::server_name_regex" else {"-n"}
            for tok, icase, f, l in self._tokens(flags, toggles=True):
                try:
                    re.compile(tok)
                except re.error as e:
                    raise self._err(f"bad regex {tok!r}: {e}", f, l) from None
                pats.append((tok, icase))
            rs = RegexSet(pats)
            if t == "ssl::server_name_regex":
                return self._server_name(rs.search)
            if t == "dstdom_regex" and not self.noresolve:
                return lambda r: rs.search(r.host) or (r.rdns is not None and _is_ip(r.host)
                                                       and any(rs.search(n) for n in r.rdns))
            field = {
                "dstdom_regex": lambda r: r.host,
                "url_regex": lambda r: r.url,
                "urlpath_regex": lambda r: r.path,
                "browser": lambda r: r.header("user-agent"),
                "referer_regex": lambda r: r.header("referer"),
                "proxy_auth_regex": lambda r: _need_user(r),
            }[t]
            return lambda r: rs.search(field(r))
        if t == "req_header":
            # header-name [-i] regex...: the name comes first, then Squid's regex options.
            by_header: dict[str, list[tuple[str, bool]]] = {}
            for ln in self.lines:
                if not ln.values:
                    raise self._err("needs a header name and a regex", ln.file, ln.line)
                name = ln.values[0][0]
                if not re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", name):
                    raise self._err(f"bad header name {name!r}", ln.values[0][1] or ln.file, ln.values[0][2] or ln.line)
                icase = False
                pats = by_header.setdefault(name.lower(), [])
                rest = ln.values[1:]
                if not rest:
                    raise self._err(f"header {name}: needs a regex", ln.file, ln.line)
                for tok, f, l in rest:
                    if tok in ("-i", "+i"):
                        icase = tok == "-i"
                        continue
                    try:
                        re.compile(tok)
                    except re.error as e:
                        raise self._err(f"bad regex {tok!r}: {e}", f or ln.file, l or ln.line) from None
                    pats.append((tok, icase))
            sets = {h: RegexSet(p) for h, p in by_header.items()}
            return lambda r: any(rs.search(r.header(h)) for h, rs in sets.items())
        if t in ("port", "localport"):
            ranges = []
            for tok, _, f, l in self._tokens():
                m = re.fullmatch(r"(\d+)(?:-(\d+))?", tok)
                if not m or int(m.group(1)) > 65535 or (m.group(2) and not int(m.group(1)) <= int(m.group(2)) <= 65535):
                    raise self._err(f"bad port {tok!r}", f, l)
                ranges.append((int(m.group(1)), int(m.group(2) or m.group(1))))
            ps = PortSet(ranges)
            if t == "port":
                return lambda r: r.port in ps
            return lambda r: r.local_port is not None and r.local_port in ps
        if t == "myportname":
            names = {tok for tok, *_ in self._tokens()}
            return lambda r: any(n in names for n in r.port_names)
        if t == "proto":
            protos = {tok.upper() for tok, *_ in self._tokens()}
            return lambda r: r.proto.upper() in protos
        if t == "method":
            methods = set()
            for tok, _, f, l in self._tokens():
                if not re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", tok):
                    raise self._err(f"bad method {tok!r}", f, l)
                methods.add(tok)
            return lambda r: r.method in methods
        if t == "time":
            specs = []
            for ln in self.lines:
                days, start, stop = None, 0, 24 * 60 - 1
                for tok, f, l in ln.values:
                    f, l = f or ln.file, l or ln.line
                    m = re.fullmatch(r"(\d{1,2}):(\d{2})-(\d{1,2}):(\d{2})", tok)
                    if m:
                        h1, m1, h2, m2 = map(int, m.groups())
                        if h1 > 24 or h2 > 24 or m1 > 59 or m2 > 59:
                            raise self._err(f"bad time {tok!r}", f, l)
                        start, stop = h1 * 60 + m1, h2 * 60 + m2
                        if start > stop:
                            raise self._err(f"bad time {tok!r}: h1:m1 must be less than h2:m2", f, l)
                    elif re.fullmatch(r"[SMTWHFA]+", tok):
                        days = (days or set()) | {DAYS[c] for c in tok}
                    else:
                        raise self._err(f"bad time element {tok!r} (days SMTWHFA, HH:MM-HH:MM)", f, l)
                specs.append((frozenset(days) if days is not None else frozenset(range(7)), start, stop))

            def match_time(r: Request) -> bool:
                now = r.now or _dt.datetime.now()
                minute = now.hour * 60 + now.minute
                wd = now.weekday()
                return any(wd in d and s <= minute <= e for d, s, e in specs)
            return match_time
        if t == "proxy_auth":
            names, required, icase = set(), False, False
            for tok, ic, f, l in self._tokens({"-i"}):
                icase = icase or ic
                if tok == "REQUIRED":
                    required = True
                else:
                    names.add(tok)
            if icase:
                names = {n.lower() for n in names}
            if required:
                return lambda r: bool(_need_user(r))
            return lambda r: ((_need_user(r).lower() if icase else _need_user(r)) in names)
        if t == "maxconn":
            toks = [tok for tok, *_ in self._tokens()]
            if len(toks) != 1 or not toks[0].isdigit():
                raise self._err(f"needs one number, not {' '.join(toks)!r}")
            limit = int(toks[0])
            return lambda r: r.conns > limit
        raise self._err(f"unknown acl type {t!r}")  # pragma: no cover - checked earlier

    def _server_name(self, match: Callable[[str], bool]) -> Callable[[Request], bool]:
        """ssl::server_name[_regex] as Squid's ServerNameCheck: the client-requested name is the SNI,
        else the URL/CONNECT host; the server-provided names are the certificate's, when known.
        No option: the certificate's names if known, else the client's name. --client-requested:
        the client's name. --server-provided: the certificate's names, else the name "none".
        --consensus: the client's name if there is no certificate or the certificate is valid
        for it, else "none"."""
        opts = [tok for ln in self.lines for tok, _, _ in ln.values if tok in SERVER_NAME_OPTIONS]
        if len(set(opts)) > 1:
            raise self._err(f"at most one of {', '.join(SERVER_NAME_OPTIONS)}")
        opt = opts[0] if opts else None

        def names(r: Request) -> Iterable[str]:
            client = r.sni or r.host or None
            certs = r.server_names
            if opt == "--client-requested":
                return (client or "none",)
            if opt == "--consensus":
                ok = client and (certs is None or any(_cert_name_matches(c, client) for c in certs))
                return (client if ok else "none",)
            if certs is not None:
                return certs
            return ("none",) if opt == "--server-provided" or not client else (client,)
        return lambda r: any(match(n) for n in names(r))

    def match(self, r: Request) -> bool:
        return self.matcher(r)

    def headers(self) -> set[str]:
        """Lower-case names of the request headers this acl reads."""
        if self.type == "browser":
            return {"user-agent"}
        if self.type == "referer_regex":
            return {"referer"}
        if self.type == "req_header":
            return {ln.values[0][0].lower() for ln in self.lines if ln.values}
        return set()


def _lower_url_host(url: str) -> str:
    """The URL with its scheme and host in lower case (host:port alone for CONNECT)."""
    m = _URL_HEAD.match(url)
    if m:
        return m.group(0).lower() + url[m.end():]
    return url.lower() if "/" not in url else url


_URL_HEAD = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^/?#]*")


def _cert_name_matches(pattern: str, host: str) -> bool:
    """A certificate name (with a leading `*.` wildcard for one label) against a host name."""
    pattern, host = pattern.lower().rstrip("."), host.lower().rstrip(".")
    if pattern.startswith("*."):
        head, dot, rest = host.partition(".")
        return bool(head) and dot == "." and rest == pattern[2:]
    return pattern == host


def _need_user(r: Request) -> str:
    if not r.user:
        raise NeedAuth()
    return r.user


@functools.lru_cache(maxsize=4096)
def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
        return True
    except ValueError:
        return False


def _dst_addresses(r: Request) -> tuple[str, ...]:
    if r.dst_ips:
        return r.dst_ips
    h = r.host.strip("[]")
    return (h,) if _is_ip(h) else ()


# --- rules and policy -----------------------------------------------------------

@dataclasses.dataclass
class Rule:
    action: str
    terms: list[tuple[bool, Acl]]       # (negated, acl)
    text: str                           # e.g. "http_access deny !Safe_ports"
    file: str | None = None
    line: int | None = None


@dataclasses.dataclass
class Decision:
    action: str                # "allow" / "deny" (http_access), or the ssl_bump action
    rule: str                  # the rule text, "... (implicit)" when no rule matched
    line: int | None = None
    auth: bool = False         # answer 407: credentials needed (missing, or a deny decided by proxy_auth)
    matched: dict[str, bool] = dataclasses.field(default_factory=dict)   # acl name -> result, as evaluated

    @property
    def allowed(self) -> bool:
        return self.action == ALLOW


PREDEFINED = [
    ("all", "src", ["all"]),
    ("manager", "url_regex", ["-i", "^cache_object://", "+i", "^https?://[^/]+/squid-internal-mgr/"]),
    ("localhost", "src", ["127.0.0.1/32", "::1"]),
    ("to_localhost", "dst", ["127.0.0.0/8", "0.0.0.0/32", "::1/128", "::/128"]),
    ("to_linklocal", "dst", ["169.254.0.0/16", "fe80::/10"]),
    ("CONNECT", "method", ["CONNECT"]),
]


class Policy:
    """Compiled acls plus the ordered http_access and ssl_bump rules."""

    def __init__(self, acls: dict[str, Acl], http_access: list[Rule], ssl_bump: list[Rule],
                 source: str = "<policy>"):
        self.acls, self.http_access, self.ssl_bump, self.source = acls, http_access, ssl_bump, source
        self.includes: tuple[str, ...] = ()  # what a squid.conf included (files, glob folders): reloads watch it
        self.notes: tuple[str, ...] = ()  # squid.conf lines read but not applied, for a warning
        # relais.acl_names: other policies' rules name these acls (a tuple: flows are saved as plain data)
        self.names = tuple(sorted(acls))
        used = {a.name for rule in http_access + ssl_bump for _, a in rule.terms}
        self.uses_dst = any(self.acls[n].type == "dst" for n in used)
        self.uses_rdns = any(self.acls[n].type in ("dstdomain", "dstdom_regex") and not self.acls[n].noresolve
                             for n in used)
        self.exports_dst = any(a.type == "dst" for a in acls.values())
        self.uses_maxconn = any(a.type == "maxconn" for a in acls.values())
        # The memo key holds what the acls read, except that acls on text new with almost every request
        # (the URL, its path, the Referer) enter it by their result: keyed by the URL, the memo would
        # miss on every new URL (the predefined `manager` acl is a url_regex).
        by_input = [a for a in acls.values() if a.type not in KEYED_BY_RESULT]
        reads = {f for a in by_input for f in READS[a.type]}
        self.key_fields = tuple(sorted(reads - {"now", "headers"}))
        self.key_headers = tuple(sorted({h for a in by_input for h in a.headers()}))
        self.key_minute = "now" in reads
        self.key_acls = tuple(a for a in acls.values() if a.type in KEYED_BY_RESULT)
        self.memo: dict[tuple, tuple[Decision, list[str]]] = {}

    def verdict(self, r: Request) -> tuple[Decision, list[str]]:
        """check(r) and matching(r), remembered: the same request facts get the same answer."""
        key = tuple([getattr(r, f) for f in self.key_fields])
        if self.key_acls:
            key += tuple([a.matcher(r) for a in self.key_acls])
        if self.key_headers:
            key += tuple([r.header(h) for h in self.key_headers])
        if self.key_minute:
            if r.now is None:
                r.now = _dt.datetime.now()
            key += (r.now.replace(second=0, microsecond=0),)
        hit = self.memo.get(key)
        if hit is None:
            d = self.check(r)
            hit = (d, self.matching(r, d.matched))
            if len(self.memo) >= MEMO_SIZE:
                self.memo.clear()
            self.memo[key] = hit
        return hit

    # Squid: when no rule matches, the answer is the opposite of the last rule; deny without rules.
    def _implicit(self, rules: list[Rule], directive: str) -> tuple[str, str]:
        if not rules:
            return DENY, f"{directive} deny all (implicit: no {directive} rules)"
        last = rules[-1]
        action = ALLOW if last.action == DENY else DENY
        return action, f"{directive} {action} all (implicit: opposite of the last rule, line {last.line})"

    def check(self, r: Request) -> Decision:
        """The http_access decision for one request."""
        memo: dict[str, bool] = {}
        last_type = None
        for rule in self.http_access:
            ok = True
            for neg, acl in rule.terms:
                v = memo.get(acl.name)
                if v is None:
                    try:
                        v = acl.match(r)
                    except NeedAuth:
                        return Decision(DENY, rule.text, rule.line, auth=True, matched=memo)
                    memo[acl.name] = v
                last_type = acl.type
                if v == neg:
                    ok = False
                    break
            if ok:
                auth = rule.action == DENY and last_type in AUTH_TYPES and bool(rule.terms)
                return Decision(rule.action, rule.text, rule.line, auth=auth, matched=memo)
        action, text = self._implicit(self.http_access, "http_access")
        return Decision(action, text, None, auth=action == DENY and last_type in AUTH_TYPES, matched=memo)

    def precheck(self, r: Request, known: frozenset[str] = CONNECTION_TYPES) -> Decision | None:
        """The decision if it is certain from connection-level facts alone, else None.

        Acls whose type is not in `known` are unknown (three-valued logic): the
        rules that may match and the first that certainly matches (or the
        implicit last rule) are the possible outcomes; the answer is certain
        when they all have the same action.
        Used before connecting upstream in transparent/socks5 mode, when
        neither the protocol nor the request is known yet.
        """
        memo: dict[str, bool] = {}
        possible: set[str] = set()
        for rule in self.http_access:
            state: bool | None = True
            for neg, acl in rule.terms:
                if acl.type not in known:
                    state = None
                    continue
                v = memo.get(acl.name)
                if v is None:
                    try:
                        v = memo[acl.name] = acl.match(r)
                    except NeedAuth:
                        state = None
                        continue
                if v == neg:
                    state = False
                    break
            if state is None:
                possible.add(rule.action)
            elif state:
                possible.add(rule.action)
                return Decision(rule.action, rule.text, rule.line, matched=memo) if len(possible) == 1 else None
        action, text = self._implicit(self.http_access, "http_access")
        possible.add(action)
        return Decision(action, text, None, matched=memo) if len(possible) == 1 else None

    def bump(self, r: Request) -> Decision | None:
        """The ssl_bump action (splice, bump, terminate) or None when the policy has no ssl_bump rules."""
        if not self.ssl_bump:
            return None
        memo: dict[str, bool] = {}
        for rule in self.ssl_bump:
            if rule.action in ("peek", "stare"):   # one-step model: SNI is already known
                continue
            ok = True
            for neg, acl in rule.terms:
                if acl.name not in memo:
                    try:
                        memo[acl.name] = acl.match(r)
                    except NeedAuth:
                        memo[acl.name] = False
                if memo[acl.name] == neg:
                    ok = False
                    break
            if ok:
                action = {"none": "splice", "client-first": "bump", "server-first": "bump"}.get(rule.action, rule.action)
                return Decision(action, rule.text, rule.line)
        return Decision("splice", "ssl_bump splice all (implicit: Squid's default)")

    def matching(self, r: Request, known: Mapping[str, bool] | None = None) -> list[str]:
        """Sorted names of the acls that match `r` (for relais.acls).

        All acl types are evaluated except: `dst` when the host was not
        resolved (no DNS just for this), and `proxy_auth*` without a user
        (they do not match then). `all` and the other predefined acls are
        included when they match.
        """
        out = []
        for name, acl in self.acls.items():
            v = known.get(name) if known else None
            if v is None:
                if acl.type == "dst" and r.dst_ips is None and not _is_ip(r.host):
                    continue
                try:
                    v = acl.match(r)
                except NeedAuth:
                    v = False
            if v:
                out.append(name)
        return sorted(out)


# --- building a policy -----------------------------------------------------------

class Builder:
    """Collects acl lines and rules (from YAML or squid.conf), then compiles."""

    def __init__(self, source: str, base: Path | None = None, predefined: bool = True):
        self.source = source
        self.base = base or Path(".")
        self.lines: dict[str, list[AclLine]] = {}
        self.http_access: list[tuple[str, list[str], str, int | None, str]] = []
        self.ssl_bump: list[tuple[str, list[str], str, int | None, str]] = []
        self.predefined: set[str] = set()
        if predefined:
            for name, t, vals in PREDEFINED:
                self.lines[name] = [AclLine(t, [(v, None, None) for v in vals], "<predefined>", None)]
                self.predefined.add(name)

    def acl(self, name: str, tokens: list[str], file: str | None, line: int | None,
            base: Path | None = None) -> None:
        """`base`: the folder relative list files are read from (the policy's, by default)."""
        if not re.fullmatch(r"[A-Za-z0-9_.:\-]+", name or ""):
            raise PolicyError(f"bad acl name {name!r}", file, line)
        if not tokens:
            raise PolicyError(f"acl {name}: missing type", file, line)
        t, args = tokens[0], tokens[1:]
        if t not in TYPES:
            raise PolicyError(f"acl {name}: unknown acl type {t!r} (known: {', '.join(TYPES)})", file, line)
        if name in self.predefined:   # redefining a predefined acl replaces it
            self.predefined.discard(name)
            self.lines.pop(name, None)
        existing = self.lines.get(name)
        if existing and existing[0].type != t:
            first = existing[0]
            where = f"line {first.line}" if first.file == file else f"{first.file}:{first.line}"
            raise PolicyError(f"acl {name}: type {t!r} differs from its first definition "
                              f"({first.type!r}, {where})", file, line)
        values: list[tuple[str, str | None, int | None]] = []
        for a in args:
            if len(a) >= 2 and a[0] == '"' and a[-1] == '"':
                values.extend(self._file_items(name, a[1:-1], file, line, base or self.base))
            else:
                values.append((a, None, None))
        if not values and t not in ("all", "time"):
            raise PolicyError(f"acl {name} ({t}): no values", file, line)
        self.lines.setdefault(name, []).append(AclLine(t, values, file, line))

    def _file_items(self, name, path: str, file, line, base: Path):
        p = Path(path)
        if not p.is_absolute():
            p = base / p
        try:
            text = p.read_text(encoding="utf-8", errors="replace")
        except OSError as e:
            raise PolicyError(f"acl {name}: cannot read list file {str(p)!r}: {e.strerror or e}", file, line) from None
        out = []
        for i, raw in enumerate(text.splitlines(), 1):
            item = raw.split("#", 1)[0].strip() if not raw.lstrip().startswith("#") else ""
            if item:
                for tok in item.split():
                    out.append((tok, str(p), i))
        return out

    def rule(self, directive: str, text: str, file: str | None, line: int | None) -> None:
        try:
            tokens = text.split()
        except Exception:  # pragma: no cover
            tokens = []
        if not tokens:
            raise PolicyError(f"empty {directive} rule", file, line)
        action = tokens[0]
        valid = (ALLOW, DENY) if directive == "http_access" else BUMP_ACTIONS
        if action not in valid:
            raise PolicyError(f"{directive}: action must be one of {', '.join(valid)}, not {action!r}", file, line)
        names = tokens[1:]
        if directive == "http_access" and not names:
            raise PolicyError(f"{directive} {action}: needs at least one acl name (use 'all')", file, line)
        target = self.http_access if directive == "http_access" else self.ssl_bump
        target.append((action, names, f"{directive} {' '.join(tokens)}", line, file))

    def build(self) -> Policy:
        acls: dict[str, Acl] = {}
        for name, lines in self.lines.items():
            acls[name] = Acl(name, lines[0].type, lines)

        def rules(raw, directive):
            out = []
            for action, names, text, line, file in raw:
                terms = []
                for n in names:
                    neg = n.startswith("!")
                    n = n[1:] if neg else n
                    if not n:
                        raise PolicyError(f"{directive}: '!' must be followed by an acl name", file, line)
                    if n not in acls:
                        raise PolicyError(f"{directive}: unknown acl {n!r}", file, line)
                    terms.append((neg, acls[n]))
                out.append(Rule(action, terms, text, file, line))
            return out
        return Policy(acls, rules(self.http_access, "http_access"), rules(self.ssl_bump, "ssl_bump"), self.source)


def split_squid(text: str) -> list[str]:
    """Squid's tokens: whitespace separated, "quoted" kept with quotes (for "/path/file")."""
    out, cur, i, n = [], "", 0, len(text)
    while i < n:
        c = text[i]
        if c.isspace():
            if cur:
                out.append(cur)
                cur = ""
        elif c == '"' and not cur:
            j = text.find('"', i + 1)
            if j < 0:
                raise ValueError("unterminated quote")
            out.append(text[i:j + 1])
            i = j
        else:
            cur += c
        i += 1
    if cur:
        out.append(cur)
    return out


# --- YAML ----------------------------------------------------------------------

TOP_KEYS = ("acls", "http_access", "ssl_bump")


def _scalar(node, file, what) -> str:
    if not isinstance(node, yaml.ScalarNode):
        raise PolicyError(f"{what}: expected a string", file, node.start_mark.line + 1)
    return str(node.value)


def load_yaml_text(text: str, file: str = "<policy>", base: Path | None = None) -> Policy:
    try:
        root = yaml.compose(text, Loader=policyfile.CheckedLoader)  # refuses alias bombs
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        raise PolicyError(f"YAML: {e.problem or e.context}", file, mark.line + 1 if mark else None) from None
    except yaml.YAMLError as e:
        raise PolicyError(f"YAML: {e}", file) from None
    except (ValueError, RecursionError) as e:  # e.g. odd characters
        raise PolicyError(f"YAML: {e}", file) from None
    if root is None:
        raise PolicyError("empty policy (needs at least http_access rules)", file, 1)
    if not isinstance(root, yaml.MappingNode):
        raise PolicyError("a policy is a mapping with keys acls, http_access, ssl_bump", file, root.start_mark.line + 1)
    b = Builder(file, base)
    seen: set[str] = set()
    sections = {}
    for k, v in root.value:
        key = _scalar(k, file, "top-level key")
        line = k.start_mark.line + 1
        if key not in TOP_KEYS:
            raise PolicyError(f"unknown key {key!r} (expected {', '.join(TOP_KEYS)})", file, line)
        if key in seen:
            raise PolicyError(f"duplicate key {key!r}", file, line)
        seen.add(key)
        sections[key] = v
    if "http_access" not in sections:
        raise PolicyError("no http_access rules: a policy must say who may use the proxy", file, 1)
    acls = sections.get("acls")
    if acls is not None and not (isinstance(acls, yaml.ScalarNode) and acls.value in ("", "~", "null")):
        if not isinstance(acls, yaml.MappingNode):
            raise PolicyError("acls: expected a mapping of acl name -> definition", file, acls.start_mark.line + 1)
        names_seen = set()
        for k, v in acls.value:
            name = _scalar(k, file, "acl name")
            line = k.start_mark.line + 1
            if name in names_seen:
                raise PolicyError(f"acl {name}: defined twice (use a list for several lines)", file, line)
            names_seen.add(name)
            _yaml_acl(b, name, v, file)
    for directive in ("http_access", "ssl_bump"):
        node = sections.get(directive)
        if node is None or (isinstance(node, yaml.ScalarNode) and node.value in ("", "~", "null") and directive == "ssl_bump"):
            continue
        if not isinstance(node, yaml.SequenceNode):
            raise PolicyError(f"{directive}: expected a list of rules like '- allow localnet'", file,
                              node.start_mark.line + 1)
        for item in node.value:
            b.rule(directive, _scalar(item, file, f"{directive} rule"), file, item.start_mark.line + 1)
    return b.build()


def _yaml_acl(b: Builder, name: str, node, file: str) -> None:
    line = node.start_mark.line + 1
    if isinstance(node, yaml.ScalarNode):
        try:
            b.acl(name, split_squid(str(node.value)), file, line)
        except ValueError as e:
            if isinstance(e, PolicyError):
                raise
            raise PolicyError(f"acl {name}: {e}", file, line) from None
    elif isinstance(node, yaml.SequenceNode):
        if not node.value:
            raise PolicyError(f"acl {name}: empty list", file, line)
        for item in node.value:
            _yaml_acl(b, name, item, file)
    elif isinstance(node, yaml.MappingNode):
        fields = {}
        for k, v in node.value:
            fields[_scalar(k, file, f"acl {name} key")] = v
        unknown = set(fields) - {"type", "values", "flags", "file", "files"}
        if unknown:
            raise PolicyError(f"acl {name}: unknown keys {sorted(unknown)} (type, flags, values, file)", file, line)
        if "type" not in fields:
            raise PolicyError(f"acl {name}: missing 'type'", file, line)
        tokens = [_scalar(fields["type"], file, f"acl {name} type")]
        for key in ("flags", "values", "file", "files"):
            v = fields.get(key)
            if v is None:
                continue
            items = v.value if isinstance(v, yaml.SequenceNode) else [v]
            for it in items:
                s = _scalar(it, file, f"acl {name} {key}")
                tokens.append(f'"{s}"' if key in ("file", "files") else s)
        b.acl(name, tokens, file, line)
    else:  # pragma: no cover - aliases resolve to the above
        raise PolicyError(f"acl {name}: unsupported definition", file, line)


# --- squid.conf subset -----------------------------------------------------------

def load_squid_text(text: str, file: str = "<squid.conf>", base: Path | None = None) -> Policy:
    """`acl`, `http_access` and `ssl_bump` lines of a squid.conf and of the files it includes; other
    directives are ignored."""
    b = Builder(file, base)
    included: list[str] = []
    notes: list[str] = []
    try:
        for src, no, line in squid_directives(text, file, base, included):
            try:
                tokens = split_squid(line)
            except ValueError as e:
                raise PolicyError(str(e), src, no) from None
            directive = tokens[0]
            if directive == "acl":
                if len(tokens) < 3:
                    raise PolicyError("acl: needs a name and a type", src, no)
                # list files named in an included file are read from its folder, as its includes are
                b.acl(tokens[1], tokens[2:], src, no, base=Path(src).parent if src != file else None)
            elif directive in ("http_access", "ssl_bump"):
                b.rule(directive, " ".join(tokens[1:]), src, no)
            elif directive in NOT_APPLIED:
                notes.append(f"{src}:{no}: {directive} is not applied by Relais ({NOT_APPLIED[directive]})")
        policy = b.build()
    except PolicyError as e:
        e.includes = tuple(included)  # what a refused reload watches for the fix
        raise
    policy.includes = tuple(included)
    policy.notes = tuple(notes)
    return policy


# squid.conf directives that restrict or rewrite what is allowed, which Relais does not read: a
# warning names each line (a policy relying on one is less strict here than in Squid)
NOT_APPLIED = {
    "http_reply_access": "responses are not judged",
    "adapted_http_access": "requests are judged once, before any adaptation",
    "deny_info": "denials get Squid's ERR_ACCESS_DENIED page",
    "miss_access": "only http_access decides",
    "request_header_access": "the anonymize addon's policy decides what headers go on",
    "reply_header_access": "the anonymize addon's policy (reverse.strip_response) decides",
    "request_header_replace": "the anonymize addon's policy decides",
    "forwarded_for": "the anonymize option decides",
    "via": "the anonymize option decides",
    "follow_x_forwarded_for": "acls see the connection's address",
    "external_acl_type": "no external helpers",
    "url_rewrite_access": "no URL rewriting",
    "cache_peer_access": "no cache peers (mitmproxy's upstream mode has one parent)",
    "always_direct": "no cache peers",
    "never_direct": "no cache peers",
}


INCLUDE_DEPTH = 16  # Squid's limit on nested includes (what stops a file that includes itself)


def squid_directives(text: str, file: str, base: Path | None = None, included: list[str] | None = None,
                     depth: int = 0):
    """(file, line, directive) for each directive of a squid.conf (squid_lines), in order, an `include`
    line replaced by the directives of the files it names, as Squid reads them: a list of paths, quoted
    or not, glob patterns expanded in sorted order (Debian's squid.conf has `include
    /etc/squid/conf.d/*.conf`). A relative path is taken from the folder of the file that includes it
    (`base` for the top one). A pattern that matches no file, a file that cannot be read and includes
    nested more than 16 deep are errors at the include line, as in Squid. What a reload must watch is
    added to `included`: each file named (read or not), and the folder of each glob pattern (a file
    added there changes what it matches)."""
    for no, line in enumerate(squid_lines(text), 1):
        if not line:
            continue
        if line.split(None, 1)[0] != "include":
            yield file, no, line
            continue
        try:
            patterns = split_squid(line)[1:]
        except ValueError as e:
            raise PolicyError(str(e), file, no) from None
        if not patterns:
            raise PolicyError("include: needs a file name", file, no)
        if depth >= INCLUDE_DEPTH:
            raise PolicyError(f"include: nested more than {INCLUDE_DEPTH} deep (does a file include itself?)",
                              file, no)
        folder = base if base is not None else Path(file).parent
        for pattern in patterns:
            if len(pattern) > 1 and pattern[0] == pattern[-1] == '"':
                pattern = pattern[1:-1]
            full = str(folder / pattern)  # an absolute pattern stays itself
            if any(c in pattern for c in "*?["):
                # the folder's own name is no pattern, whatever characters it has
                names = sorted(glob.glob(pattern if Path(pattern).is_absolute()
                                         else os.path.join(glob.escape(str(folder)), pattern)))
                if included is not None and not any(c in str(Path(pattern).parent) for c in "*?["):
                    included.append(str(Path(full).parent))
            else:
                names = [full]
            if not names:
                raise PolicyError(f"include: no file matches {pattern!r}", file, no)
            for name in names:
                if included is not None:
                    included.append(name)
                try:
                    sub = Path(name).read_text(encoding="utf-8")
                except UnicodeDecodeError as e:
                    raise PolicyError(f"include: {name} is not UTF-8 text: {e.reason}", file, no) from None
                except OSError as e:
                    raise PolicyError(f"include: cannot read {name}: {e.strerror or e}", file, no) from None
                yield from squid_directives(sub, name, Path(name).parent, included, depth + 1)


def squid_lines(text: str) -> list[str]:
    """The directives of a squid.conf, one per line number (line numbers stay those of the file): a
    line continued with a backslash joined into its last line, and "" for everything else. As in
    Squid, comment and empty lines are skipped, also inside a continued line, so that neither
    "# C:\\squid\\" nor a commented-out value ends or swallows a directive; a trailing comment
    after the values is removed."""
    out, pending = [], ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            out.append("")
            continue
        if raw.endswith("\\"):
            pending += raw[:-1] + " "
            out.append("")
            continue
        out.append(_without_comment(pending + raw))
        pending = ""
    if pending:
        out.append(_without_comment(pending))
    return out


def _without_comment(line: str) -> str:
    return re.sub(r"\s#.*$", "", line.strip())


def load(path: str | Path) -> Policy:
    """A policy file: YAML (.yaml/.yml, or anything else) or squid.conf (.conf)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise PolicyError(f"not UTF-8 text: {e.reason}", str(p)) from None
    except OSError as e:
        raise PolicyError(f"cannot read: {e.strerror or e}", str(p)) from None
    if p.suffix == ".conf":
        return load_squid_text(text, str(p), p.parent)
    return load_yaml_text(text, str(p), p.parent)


def squid_to_yaml(text: str, base: Path | None = None) -> str:
    """Converts the acl/http_access/ssl_bump lines of a squid.conf (and of the files it includes) to a
    Relais YAML policy (comments and other directives are dropped; list files stay references)."""
    load_squid_text(text, base=base)  # validates
    acls: dict[str, list[str]] = {}
    rules: dict[str, list[str]] = {"http_access": [], "ssl_bump": []}
    for _, _, line in squid_directives(text, "<squid.conf>", base):
        tokens = split_squid(line)
        if tokens[0] == "acl":
            acls.setdefault(tokens[1], []).append(" ".join(tokens[2:]))
        elif tokens[0] in rules:
            rules[tokens[0]].append(" ".join(tokens[1:]))
    out = ["# converted from squid.conf by relais (addons/aclrules.py)", "acls:"]
    for name, lines in acls.items():
        if len(lines) == 1:
            out.append(f"  {name}: {_yaml_str(lines[0])}")
        else:
            out.append(f"  {name}:")
            out.extend(f"    - {_yaml_str(l)}" for l in lines)
    if not acls:
        out[-1] = "acls: {}"
    for d in ("http_access", "ssl_bump"):
        if rules[d]:
            out.append(f"{d}:")
            out.extend(f"  - {_yaml_str(r)}" for r in rules[d])
    if not rules["http_access"]:
        out.append("http_access: []")
    return "\n".join(out) + "\n"


def _yaml_str(s: str) -> str:
    dumped = yaml.safe_dump(s, default_style=None, width=1 << 30).strip()
    if dumped.endswith("\n...") or dumped.endswith("..."):
        dumped = dumped.rsplit("\n...", 1)[0]
    return dumped


def main(argv: list[str] | None = None) -> int:
    """python -m addons.aclrules check FILE... | convert SQUID_CONF  (prints the YAML policy)."""
    import sys
    args = sys.argv[1:] if argv is None else argv
    if len(args) >= 2 and args[0] == "check":
        rc = 0
        for f in args[1:]:
            try:
                p = load(f)
                print(f"{f}: OK ({len(p.acls)} acls, {len(p.http_access)} http_access, {len(p.ssl_bump)} ssl_bump rules)")
                for note in p.notes:
                    print(f"warning: {note}")
            except PolicyError as e:
                print(e, file=sys.stderr)
                rc = 1
        return rc
    if len(args) == 2 and args[0] == "convert":
        try:
            text = Path(args[1]).read_text(encoding="utf-8")
            sys.stdout.write(squid_to_yaml_checked(text, args[1]))
        except (PolicyError, OSError) as e:
            print(e, file=sys.stderr)
            return 1
        return 0
    print(main.__doc__, file=sys.stderr)
    return 2


def squid_to_yaml_checked(text: str, file: str) -> str:
    return squid_to_yaml(text, Path(file).parent)


if __name__ == "__main__":
    raise SystemExit(main())
