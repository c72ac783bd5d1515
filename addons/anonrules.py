"""Anonymization rules: the policy file and the header edits it implies.

Pure functions, no I/O and no mitmproxy: `load_policy(text, source)` parses
and checks policies/anonymize.yaml, `choose_level` picks the level for a
request, `plan_request` / `plan_response` turn headers + rules into a list
of edits `(name, value)`, where value None deletes every field of that name
and a string replaces them with one field. addons/anonymize.py applies them.

Levels (weakest to strongest), as the shipped policy defines them:

    transparent  Squid's defaults (via on, forwarded_for on): adds Via and
                 appends the client address to X-Forwarded-For.
    anonymous    no client address anywhere (forwarded_for delete); Via kept.
    elite        no trace of a proxy nor of the client: no Via, no
                 X-Forwarded-For/Forwarded/X-Real-IP/... , no From; a
                 cross-site Referer is cut to its origin.
    paranoid     elite + a common User-Agent, a normalised Accept-Language,
                 no cross-site Referer, cookies stripped for listed domains.
"""
from __future__ import annotations

import ipaddress
import functools
import re
from dataclasses import dataclass
from urllib.parse import urlsplit

from addons import policyfile
from addons.policyfile import Map, PolicyError, Seq

LEVELS = ("transparent", "anonymous", "elite", "paranoid")
AUTO = "auto"
# Squid's forwarded_for values: on appends the client address, off appends
# "unknown", transparent leaves the header as the client sent it, delete
# removes it, truncate replaces it with the client address alone.
FORWARDED_FOR = ("on", "off", "transparent", "delete", "truncate")
# via: on adds ours (after any existing), off adds nothing, delete removes all.
VIA = ("on", "off", "delete")
REFERER = ("keep", "origin-when-cross-site", "remove-when-cross-site", "origin", "remove")
FORWARD_MODES_DEFAULT = "elite"
REVERSE_DEFAULT = "transparent"

# What the policy may never remove or replace: the request must still work,
# and the cache must see the same validators and directives the origin sees.
PROTECTED = ("host", "authorization", "content-*", "if-*", "range", "cache-control", "pragma",
             "transfer-encoding", "connection", "upgrade", "te", "trailer", "expect")
_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")


@functools.lru_cache(maxsize=1024)  # asked for every header a policy names, on every request
def is_protected(name: str) -> bool:
    n = name.lower()
    return any(n.startswith(p[:-1]) if p.endswith("*") else n == p for p in PROTECTED)


@dataclass(frozen=True)
class LevelRules:
    name: str
    via: str = "off"
    forwarded_for: str = "transparent"
    remove: tuple[str, ...] = ()            # lower-case header names
    set: tuple[tuple[str, str], ...] = ()   # (Name, value), always sent
    referer: str = "keep"
    strip_cookies: tuple[str, ...] = ()     # domains (and their subdomains); "*" is every domain


@dataclass(frozen=True)
class Override:
    acl: str
    level: str
    line: int | None = None


@dataclass(frozen=True)
class Policy:
    levels: dict[str, LevelRules]
    overrides: tuple[Override, ...] = ()
    visible_hostname: str | None = None
    via_comment: str = "relais"
    strip_response: tuple[str, ...] = ()    # lower-case names removed from reverse-mode responses
    source: str = "<policy>"


# --- loading ----------------------------------------------------------------

TOP_KEYS = ("lists", "visible_hostname", "via_comment", "levels", "overrides", "reverse")
LEVEL_KEYS = ("like", "via", "forwarded_for", "remove", "set", "referer", "strip_cookies")


def load_policy(text: str, source: str = "<policy>") -> Policy:
    """Parse and check a policy; raises PolicyError(source, line, reason)."""
    return _Checker(source).policy(policyfile.load(text, source))


class _Checker:
    def __init__(self, source: str):
        self.source = source

    def fail(self, line, reason):
        raise PolicyError(self.source, line, reason)

    @staticmethod
    def line_of(parent, key):
        if isinstance(parent, list) and not isinstance(parent, Seq):
            return None
        return policyfile.line_of(parent, key)

    def mapping(self, value, where, line, keys=None) -> Map:
        if not isinstance(value, dict):
            self.fail(line, f"{where} must be a mapping, not {type(value).__name__}")
        if keys is not None:
            for k in value:
                if k not in keys:
                    self.fail(self.line_of(value, k), f"{where}: unknown key {k!r} (known: {', '.join(keys)})")
        return value

    def string(self, value, where, line, allow_none=False):
        if value is None and allow_none:
            return None
        if not isinstance(value, str) or not value.strip():
            self.fail(line, f"{where} must be a non-empty string, not {value!r}")
        if "\r" in value or "\n" in value:
            self.fail(line, f"{where} must not contain line breaks")
        return value.strip()

    def choice(self, value, where, line, choices):
        if value is True:   # YAML 1.1 reads a bare on as true
            value = "on"
        elif value is False:
            value = "off"
        if value not in choices:
            self.fail(line, f"{where}: {value!r} is not one of {', '.join(choices)}")
        return value

    def items(self, value, where, line):
        """A list of strings; nested lists (YAML aliases of shared lists) are flattened."""
        if value is None:
            return []
        if not isinstance(value, list):
            self.fail(line, f"{where} must be a list, not {type(value).__name__}")
        out = []
        for i, item in enumerate(value):
            item_line = self.line_of(value, i)
            if isinstance(item, list):
                out.extend(self.items(item, where, item_line))
            else:
                out.append((self.string(item, f"{where} item", item_line), item_line))
        return out

    def header_names(self, value, where, line, protect=True, check=None):
        names = []
        for name, item_line in self.items(value, where, line):
            self.header_name(name, where, item_line, protect, check)
            if name.lower() not in names:
                names.append(name.lower())
        return names

    def header_name(self, name, where, line, protect=True, check=None):
        if not isinstance(name, str) or not _TOKEN.match(name):
            self.fail(line, f"{where}: {name!r} is not a header name")
        if protect and is_protected(name):
            self.fail(line, f"{where}: {name} is protected and never removed or replaced "
                            f"(the request must still work: {', '.join(PROTECTED)})")
        reason = check(name.lower()) if check else None
        if reason:
            self.fail(line, f"{where}: {name} {reason}")

    def policy(self, doc) -> Policy:
        if doc is None:
            self.fail(1, "the policy is empty")
        doc = self.mapping(doc, "the policy", 1, TOP_KEYS)
        if "lists" in doc:   # a place for YAML anchors of shared header lists
            lists = self.mapping(doc["lists"], "lists", self.line_of(doc, "lists"))
            for k, v in lists.items():
                self.header_names(v, f"lists.{k}", self.line_of(lists, k), protect=False)
        hostname = self.string(doc.get("visible_hostname"), "visible_hostname",
                               self.line_of(doc, "visible_hostname"), allow_none=True)
        if hostname and not re.match(r"^[A-Za-z0-9.\-_:\[\]]+$", hostname):
            self.fail(self.line_of(doc, "visible_hostname"), f"visible_hostname: {hostname!r} is not a host name")
        comment = self.string(doc.get("via_comment", "relais"), "via_comment", self.line_of(doc, "via_comment"))
        if "(" in comment or ")" in comment:
            self.fail(self.line_of(doc, "via_comment"), "via_comment must not contain parentheses")
        if "levels" not in doc:
            self.fail(doc.line, f"levels: missing (define {', '.join(LEVELS)})")
        levels = self.levels(doc["levels"], self.line_of(doc, "levels"))
        overrides = self.overrides(doc.get("overrides"), self.line_of(doc, "overrides"))
        strip = []
        if doc.get("reverse") is not None:
            rev = self.mapping(doc["reverse"], "reverse", self.line_of(doc, "reverse"), ("strip_response",))
            strip = self.header_names(
                rev.get("strip_response"), "reverse.strip_response", self.line_of(rev, "strip_response"),
                protect=False, check=lambda n: "is needed to read the response" if n.startswith("content-")
                or n in ("transfer-encoding", "connection", "trailer") else None)
        return Policy(levels=levels, overrides=tuple(overrides), visible_hostname=hostname,
                      via_comment=comment, strip_response=tuple(strip), source=self.source)

    def levels(self, value, line) -> dict[str, LevelRules]:
        value = self.mapping(value, "levels", line, LEVELS)
        for name in LEVELS:
            if name not in value:
                self.fail(line, f"levels: missing level {name!r}")
        done: dict[str, LevelRules] = {}

        def build(name, chain=()):
            if name in done:
                return done[name]
            where, lline = f"levels.{name}", self.line_of(value, name)
            spec = self.mapping(value[name] or Map(), where, lline, LEVEL_KEYS)
            base = LevelRules(name)
            if "like" in spec:
                parent = self.choice(spec["like"], f"{where}.like", self.line_of(spec, "like"), LEVELS)
                if parent in chain + (name,):
                    self.fail(self.line_of(spec, "like"),
                              f"{where}.like: 'like' loops ({' -> '.join(chain + (name, parent))})")
                base = build(parent, chain + (name,))
            remove = list(base.remove)
            for n in self.header_names(spec.get("remove"), f"{where}.remove", self.line_of(spec, "remove")):
                if n not in remove:
                    remove.append(n)
            sets = dict((k.lower(), (k, v)) for k, v in base.set)
            if spec.get("set") is not None:
                smap = self.mapping(spec["set"], f"{where}.set", self.line_of(spec, "set"))
                for k, v in smap.items():
                    kline = self.line_of(smap, k)
                    self.header_name(k, f"{where}.set", kline)
                    sets[str(k).lower()] = (str(k), self.string(v, f"{where}.set.{k}", kline))
            cookies = list(base.strip_cookies)
            for d, dline in self.items(spec.get("strip_cookies"), f"{where}.strip_cookies",
                                       self.line_of(spec, "strip_cookies")):
                d = d.lower().lstrip(".")
                if d != "*" and not re.match(r"^[a-z0-9\-_.:\[\]]+$", d):
                    self.fail(dline, f"{where}.strip_cookies: {d!r} is not a domain")
                if d not in cookies:
                    cookies.append(d)
            rules = LevelRules(
                name=name,
                via=self.choice(spec.get("via", base.via), f"{where}.via", self.line_of(spec, "via"), VIA),
                forwarded_for=self.choice(spec.get("forwarded_for", base.forwarded_for), f"{where}.forwarded_for",
                                          self.line_of(spec, "forwarded_for"), FORWARDED_FOR),
                remove=tuple(remove),
                set=tuple(sets.values()),
                referer=self.choice(spec.get("referer", base.referer), f"{where}.referer",
                                    self.line_of(spec, "referer"), REFERER),
                strip_cookies=tuple(cookies),
            )
            done[name] = rules
            return rules

        return {name: build(name) for name in LEVELS}

    def overrides(self, value, line) -> list[Override]:
        if value is None:
            return []
        if not isinstance(value, list):
            self.fail(line, f"overrides must be a list, not {type(value).__name__}")
        out = []
        for i, item in enumerate(value):
            iline = self.line_of(value, i)
            item = self.mapping(item, f"overrides[{i}]", iline, ("acl", "level"))
            for k in ("acl", "level"):
                if k not in item:
                    self.fail(iline, f"overrides[{i}]: missing {k!r}")
            acl = self.string(item["acl"], f"overrides[{i}].acl", self.line_of(item, "acl"))
            level = self.choice(item["level"], f"overrides[{i}].level", self.line_of(item, "level"), LEVELS)
            out.append(Override(acl, level, iline))
        return out


# --- decisions ----------------------------------------------------------------

def check_level_option(value: str) -> str:
    """The `anonymize` option value, or ValueError."""
    if value not in (AUTO, *LEVELS):
        raise ValueError(f"{value!r} is not a level; use one of {AUTO}, {', '.join(LEVELS)}")
    return value


def choose_level(option: str, mode: str, acls, policy: Policy) -> tuple[str, Override | None]:
    """The level for one request: the first override whose acl matched wins,
    else the option; `auto` is transparent for reverse proxies, elite otherwise."""
    matched = set(acls) if acls and policy.overrides else ()
    if matched:
        for ov in policy.overrides:
            if ov.acl in matched:
                return ov.level, ov
    if option == AUTO:
        return (REVERSE_DEFAULT if mode == "reverse" else FORWARD_MODES_DEFAULT), None
    return option, None


def site(scheme: str, host: str) -> tuple[str, str]:
    """The "schemeful site" of a URL: scheme + registrable domain (the host for IPs and unknown suffixes)."""
    host = (host or "").lower().strip("[]").rstrip(".")
    try:
        ipaddress.ip_address(host)
        return scheme.lower(), host
    except ValueError:
        pass
    try:
        from publicsuffix2 import get_sld  # shipped with mitmproxy
        sld = get_sld(host, strict=True)
    except Exception:
        sld = None
    return scheme.lower(), sld or host  # unknown suffix (localhost, .lan...): the host alone


def cross_site(referer: str, scheme: str, host: str) -> bool:
    try:
        ref = urlsplit(referer)
        rhost = ref.hostname or ""
    except ValueError:
        return True
    if not ref.scheme or not rhost:
        return True
    return site(ref.scheme, rhost) != site(scheme, host)


def origin_of(url: str) -> str | None:
    """`scheme://host[:port]/` of a URL, as browsers send a cut Referer."""
    try:
        u = urlsplit(url)
        if not u.scheme or not u.hostname:
            return None
        host = f"[{u.hostname}]" if ":" in u.hostname else u.hostname
        port = f":{u.port}" if u.port else ""
    except ValueError:
        return None
    return f"{u.scheme}://{host}{port}/"


def domain_matches(host: str, domains) -> bool:
    host = (host or "").lower().rstrip(".")
    return any(d == "*" or host == d or host.endswith("." + d) for d in domains)


def via_value(http_version: str, hostname: str, comment: str) -> str:
    """`1.1 host (relais)`: the protocol the request was received with, as RFC 9110 7.6.3 says."""
    v = (http_version or "HTTP/1.1").upper().replace("HTTP/", "")
    if v in ("2.0", "3.0"):
        v = v[0]
    return f"{v} {hostname} ({comment})"


@dataclass
class RequestInfo:
    client: str                 # the client's address
    scheme: str                 # of the request as sent upstream
    host: str                   # the host the request is for (Host header / authority)
    http_version: str = "HTTP/1.1"
    keep: tuple[str, ...] = ()  # lower-case names never touched (e.g. an upstream_auth Proxy-Authorization)


Edit = tuple[str, "str | None"]


def _get_all(fields, name: str) -> list[str]:
    n = name.lower()
    return [v for k, v in fields if k.lower() == n]


@functools.lru_cache(maxsize=64)
def _lowered(names: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    return tuple((n, n.lower()) for n in names)


def plan_request(fields, rules: LevelRules, info: RequestInfo, hostname: str, comment: str = "relais") -> list[Edit]:
    """The edits that make a request with header `fields` [(name, value)...] follow `rules`.

    Returns [(name, value|None)...] in order: None deletes all fields of
    name, a value replaces them with one. Protected headers are never in it.
    """
    fields = list(fields)
    edits: dict[str, Edit] = {}
    present = {k.lower() for k, _ in fields}
    keep = set(info.keep)

    def put(name, value):
        low = name.lower()
        if value is None and low not in present:  # nothing to delete: the common case, first
            edits.pop(low, None)
            return
        if low in keep or is_protected(name):
            return
        edits[low] = (name, value)

    for name, low in _lowered(rules.remove):
        if low in present:  # put(name, None) does nothing for an absent field
            put(name, None)

    xff = ", ".join(v.strip() for v in _get_all(fields, "X-Forwarded-For") if v.strip())
    ff = rules.forwarded_for
    if ff == "on":
        put("X-Forwarded-For", f"{xff}, {info.client}" if xff else info.client)
    elif ff == "off":
        put("X-Forwarded-For", f"{xff}, unknown" if xff else "unknown")
    elif ff == "truncate":
        put("X-Forwarded-For", info.client)
    elif ff == "delete":
        put("X-Forwarded-For", None)

    if rules.via == "on":
        ours = via_value(info.http_version, hostname, comment)
        via = ", ".join(v.strip() for v in _get_all(fields, "Via") if v.strip())
        put("Via", f"{via}, {ours}" if via else ours)
    elif rules.via == "delete":
        put("Via", None)

    referer = _get_all(fields, "Referer")
    if referer and rules.referer != "keep":
        ref = referer[0].strip()
        crosses = cross_site(ref, info.scheme, info.host)
        mode = rules.referer
        if mode == "remove" or (mode == "remove-when-cross-site" and crosses):
            put("Referer", None)
        elif mode == "origin" or (mode == "origin-when-cross-site" and crosses):
            cut = origin_of(ref)
            put("Referer", cut)  # None when unparsable: removed

    for name, value in rules.set:
        put(name, value)

    if rules.strip_cookies and domain_matches(info.host, rules.strip_cookies):
        put("Cookie", None)

    return list(edits.values())


def plan_response(fields, host: str, rules: LevelRules | None, strip_backend: tuple[str, ...] = ()) -> list[Edit]:
    """Edits for a response: backend identity headers (reverse mode) and Set-Cookie of stripped domains."""
    fields = list(fields)
    present = {k.lower() for k, _ in fields}
    edits = [(n, None) for n in strip_backend if n in present]
    if rules and rules.strip_cookies and domain_matches(host, rules.strip_cookies):
        for n in ("set-cookie", "set-cookie2"):
            if n in present:
                edits.append((n, None))
    return edits


def apply(edits, headers) -> None:
    """Apply plan edits to a mutable headers mapping (mitmproxy Headers or a dict)."""
    if not edits:
        return
    fields = getattr(headers, "fields", None)
    if fields.__class__ is tuple and hasattr(headers, "set_all"):
        headers.fields = _apply_fields(edits, fields)
        return
    for name, value in edits:
        if value is None:
            if name in headers:
                del headers[name]
        else:
            headers[name] = value


def _enc(x: str) -> bytes:
    return x.encode("utf-8", "surrogateescape")


def _apply_fields(edits, fields: tuple) -> tuple:
    """`apply` on mitmproxy Headers' raw fields: what `del headers[name]` and `headers[name] = value`
    do (a value replaces the first field of that name in place and drops the others, or is appended),
    in one pass per edit without the MultiDict call overhead."""
    for name, value in edits:
        key = _enc(name).lower()
        if value is None:
            fields = tuple(f for f in fields if f[0].lower() != key)
            continue
        out, done = [], False
        for f in fields:
            if f[0].lower() == key:
                if not done:
                    out.append((f[0], _enc(value)))
                    done = True
            else:
                out.append(f)
        if not done:
            out.append((_enc(name), _enc(value)))
        fields = tuple(out)
    return fields
