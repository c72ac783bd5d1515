"""RFC 9111 (HTTP Caching) decisions for a *shared* cache, plus RFC 5861.

Pure logic: no I/O, no clock, no mitmproxy. Every function takes header
collections and times as arguments and returns a decision, so each RFC
section can be unit-tested on its own (tests/test_rfc9111.py).

Headers may be anything with ``get_all(name) -> list[str]`` (mitmproxy's
``Headers``), a mapping, or a list of ``(name, value)`` pairs.

No maintained Python library implements the shared-cache rules completely
(CacheControl and hishel are private/client caches without s-maxage,
refresh_pattern or negative caching), so they are written here, section by
section.
"""
from __future__ import annotations

import calendar
import email.utils
import math
import re
import time
from dataclasses import dataclass, field
from typing import Iterable
from urllib.parse import urljoin, urlsplit

# RFC 9111 1.2.2: delta-seconds too large to represent become 2^31.
DELTA_MAX = 2147483648
POSITION_MAX = 10 ** 18  # a byte position past any body

# RFC 9110 15.1: heuristically cacheable status codes.
HEURISTIC_STATUSES = frozenset({200, 203, 204, 206, 300, 301, 308, 404, 405, 410, 414, 501})
# The error statuses among them: Squid's negative_ttl applies to these.
NEGATIVE_STATUSES = frozenset({404, 405, 410, 414, 501})
# Answers about the request rather than the resource (a failed precondition, an unsatisfiable range,
# an expectation refused): never stored, as in Squid, even with explicit freshness.
REQUEST_SPECIFIC_STATUSES = frozenset({412, 416, 417})
# Final statuses whose semantics this cache understands (RFC 9111 3, must-understand).
UNDERSTOOD_STATUSES = frozenset(
    {200, 201, 202, 203, 204, 205, 300, 301, 302, 303, 307, 308,
     400, 401, 403, 404, 405, 406, 407, 408, 409, 410, 411, 412, 413, 414, 415, 416, 417, 421, 422,
     426, 429, 431, 451, 500, 501, 502, 503, 504, 505})
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})
# RFC 9111 3.1 / RFC 9110 7.6.1: never stored, never updated from a 304.
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "te", "transfer-encoding",
                        "upgrade", "trailer", "proxy-authenticate", "proxy-authorization"})
# Vary normalisation: fields whose values are case-insensitive tokens (RFC 9110 12.5).
CASE_INSENSITIVE_FIELDS = frozenset({"accept-encoding", "accept-charset", "accept-language", "te"})


# --- headers -------------------------------------------------------------

_BYTE_NAMES: dict[str, bytes] = {}  # field name -> its lower-cased bytes (mitmproxy Headers fast path)


def _byte_name(name: str) -> bytes:
    n = _BYTE_NAMES.get(name)
    if n is None:
        n = name.encode("utf-8", "surrogateescape").lower()
        if len(_BYTE_NAMES) < 4096:
            _BYTE_NAMES[name] = n
    return n


def get_all(headers, name: str) -> list[str]:
    """All values of one field, in order, case-insensitively."""
    if headers is None:
        return []
    if headers.__class__ is Fields:  # indexed: the common case inside one response's decisions
        return headers.get_all(name)
    fields = getattr(headers, "fields", None)
    if fields.__class__ is tuple and hasattr(headers, "get_all"):
        # mitmproxy Headers: the same as headers.get_all(name), without its per-call overhead
        n = _byte_name(name)
        return [v.decode("utf-8", "surrogateescape") for k, v in fields if k.lower() == n]
    if hasattr(headers, "get_all"):
        return list(headers.get_all(name))
    name = name.lower()
    items = headers.items() if hasattr(headers, "items") else headers
    return [v for k, v in items if k.lower() == name]


class Fields(list):
    """(name, value) pairs with an index of their lower-cased names, for the many look-ups made
    in one response (get_all uses it)."""

    def __init__(self, items: Iterable[tuple[str, str]] = ()):
        super().__init__(items)
        self.cc: CacheControl | None = None  # cache_control() of these fields, once asked
        self.lows = [k.lower() for k, _ in self]  # the names in lower case, in order
        self.index: dict[str, list[str]] = {}
        for low, (_, v) in zip(self.lows, self):
            self.index.setdefault(low, []).append(v)

    def get_all(self, name: str) -> list[str]:
        return list(self.index.get(name.lower(), ()))  # a copy: the index stays as built

    @classmethod
    def of(cls, headers) -> "Fields":
        """The fields of mitmproxy Headers, decoded as Headers.items(multi=True) does."""
        return cls([(k.decode("utf-8", "surrogateescape"), v.decode("utf-8", "surrogateescape"))
                    for k, v in headers.fields])


def get(headers, name: str) -> str | None:
    values = get_all(headers, name)
    return values[0] if values else None


def split_list(values: Iterable[str]) -> list[str]:
    """Split comma-separated field values (RFC 9110 5.6.1), keeping quoted strings whole."""
    out: list[str] = []
    for value in values:
        if '"' not in value:  # the common case: no quoted string, so every comma separates
            out.extend(s for s in (p.strip() for p in value.split(",")) if s)
            continue
        item, quoted, escaped = [], False, False
        for ch in value:
            if escaped:
                item.append(ch)
                escaped = False
            elif ch == "\\" and quoted:
                item.append(ch)
                escaped = True
            elif ch == '"':
                item.append(ch)
                quoted = not quoted
            elif ch == "," and not quoted:
                s = "".join(item).strip()
                if s:
                    out.append(s)
                item = []
            else:
                item.append(ch)
        s = "".join(item).strip()
        if s:
            out.append(s)
    return out


def unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == '"' and value[-1] == '"':
        return re.sub(r"\\(.)", r"\1", value[1:-1])
    return value


# --- RFC 9111 5.2: Cache-Control ------------------------------------------

INVALID = object()  # a directive whose argument is not valid delta-seconds
_ABSENT = object()
_LEADING_DIGITS = re.compile(r"[0-9]+")
_MALFORMED = "\x00malformed"  # the argument of a directive written with spaces around "="


@dataclass
class CacheControl:
    """Parsed Cache-Control directives (names lower-cased, arguments unquoted)."""
    directives: dict[str, str | None] = field(default_factory=dict)

    def __contains__(self, name: str) -> bool:
        return name in self.directives

    def arg(self, name: str) -> str | None:
        return self.directives.get(name)

    def delta(self, name: str):
        """delta-seconds argument of `name`: int, None if absent, INVALID if malformed.

        RFC 9111 1.2.2: a non-negative integer, capped at 2^31. Like Squid, the
        leading digits of a value such as "3600.5" or "3600a" are used; a value
        that does not start with a digit is invalid. 4.2.1: of duplicates, the
        first occurrence is used (as Squid does).
        """
        value = self.directives.get(name, _ABSENT)
        if value is _ABSENT:
            return None
        m = _LEADING_DIGITS.match(value) if value is not None else None
        if m is None:
            return INVALID
        return delta_seconds(m.group())

    def field_names(self, name: str) -> list[str] | None:
        """Qualified form (no-cache="a, b" / private="a"): the field names, or None if unqualified."""
        value = self.directives.get(name)
        if value is None or value == _MALFORMED:  # "no-cache = x": read as the stricter, plain form
            return None
        return [f.strip().lower() for f in value.split(",") if f.strip()]


def parse_cache_control(values: Iterable[str] | str | None) -> CacheControl:
    """RFC 9111 5.2: directives are case-insensitive, arguments token or quoted-string."""
    if values is None:
        return CacheControl()
    if isinstance(values, str):
        values = [values]
    cc = CacheControl()
    for item in split_list(values):
        name, sep, arg = item.partition("=")
        stripped = name.strip().lower()
        if not stripped:
            continue
        if sep and (name != name.rstrip() or arg[:1].isspace()):
            value = _MALFORMED  # "max-age =5", "max-age= 5": no whitespace is allowed around "="
        else:
            value = unquote(arg.strip()) if sep else None
        name = stripped
        if name in cc.directives:
            continue  # the first occurrence wins
        cc.directives[name] = value
    return cc


_CC_MEMO: dict[tuple[str, ...], CacheControl] = {}


def cache_control(headers) -> CacheControl:
    """The parsed Cache-Control of `headers`. Parsed once per distinct field value: the result is
    shared, so callers must not modify it."""
    if isinstance(headers, Fields):  # read once per response however many questions are asked
        if headers.cc is None:
            headers.cc = _cache_control_of(tuple(headers.index.get("cache-control", ())))
        return headers.cc
    return _cache_control_of(tuple(get_all(headers, "cache-control")))


def _cache_control_of(values: tuple[str, ...]) -> CacheControl:
    cc = _CC_MEMO.get(values)
    if cc is None:
        cc = parse_cache_control(values)
        if len(_CC_MEMO) >= 4096:
            _CC_MEMO.clear()
        _CC_MEMO[values] = cc
    return cc


NO_DIRECTIVES = parse_cache_control(())


# --- RFC 9213: targeted cache control (CDN-Cache-Control) ---------------------

_SF_KEY = r"[a-z*][a-z0-9_.*-]*"
_SF_ITEM = (r'(?:-?[0-9]{1,15}(?:\.[0-9]{1,3})?|"(?:[^"\\\x00-\x1f\x7f]|\\["\\])*"'
            r"|[A-Za-z*][!#$%&'*+.^_`|~:/0-9A-Za-z-]*|:[A-Za-z0-9+/=]*:|\?[01])")
_SF_MEMBER = re.compile(rf"({_SF_KEY})(?:=({_SF_ITEM}))?((?:;[ ]*{_SF_KEY}(?:={_SF_ITEM})?)*)")


def targeted_directives(values: Iterable[str]) -> str | None:
    """RFC 9213 2.1: a targeted field (CDN-Cache-Control...) is a Structured Fields Dictionary
    (RFC 8941). Returns its directives as Cache-Control text, or None when the field is not a
    valid, non-empty Dictionary (then it is ignored, 2.1). Members whose value has the wrong type
    for a cache directive (a string, a decimal...) are ignored, as are false booleans; a field
    left with none counts as empty."""
    out = []
    for member in split_list(values):
        m = _SF_MEMBER.fullmatch(member)
        if m is None:
            return None
        key, item = m.group(1), m.group(2)
        if item is None or item == "?1":
            out.append(key)
        elif item.lstrip("-").isdigit():
            out.append(f"{key}={item}")
    return ", ".join(out) or None


def targeted_view(headers, targets: Iterable[str]):
    """RFC 9213 2.1: the response headers as a cache with this target list reads them for its
    policy: the first targeted field with a valid value replaces Cache-Control, and Expires is
    ignored. `headers` itself when no targeted field applies."""
    for name in targets:
        values = get_all(headers, name)
        if not values:
            continue
        directives = targeted_directives(values)
        if directives is None:
            continue
        kept = [(k, v) for k, v in _items(headers) if k.lower() not in ("cache-control", "expires")]
        return kept + [("Cache-Control", directives)]
    return headers


def _items(headers) -> list[tuple[str, str]]:
    if hasattr(headers, "fields"):
        return list(headers.items(multi=True))
    return list(headers.items()) if hasattr(headers, "items") else list(headers)


# --- RFC 9110 5.6.7: HTTP-date ------------------------------------------

_MONTHS = {m: i for i, m in enumerate(
    ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"), 1)}
_IMF = re.compile(r"^(?:mon|tue|wed|thu|fri|sat|sun), (\d\d) ([a-z]{3}) (\d{4}) (\d\d):(\d\d):(\d\d) gmt$")
_RFC850 = re.compile(r"^(?:monday|tuesday|wednesday|thursday|friday|saturday|sunday), "
                     r"(\d\d)-([a-z]{3})-(\d\d) (\d\d):(\d\d):(\d\d) gmt$")
_ASCTIME = re.compile(r"^(?:mon|tue|wed|thu|fri|sat|sun) ([a-z]{3}) ([ \d]\d) (\d\d):(\d\d):(\d\d) (\d{4})$")


_DATES: dict[str, float] = {}


def parse_http_date(value: str | None, now: float | None = None) -> float | None:
    """Epoch seconds of an HTTP-date in any of the three formats, or None if invalid.

    RFC 850 two-digit years more than 50 years in the future are in the past
    century (RFC 9110 5.6.7).
    """
    if not value:
        return None
    seen = _DATES.get(value)
    if seen is not None:
        return seen
    v = value.strip().lower()  # the formats' spacing is exact: "18  Aug" is no date
    try:
        if m := _IMF.match(v):
            d, mon, y, hh, mm, ss = m.groups()
            memo = True  # the result depends on the text alone (an RFC 850 year depends on today)
        elif m := _RFC850.match(v):
            d, mon, yy, hh, mm, ss = m.groups()
            memo = False
            this_year = time.gmtime(now).tm_year if now is not None else time.gmtime().tm_year
            y = 2000 + int(yy)
            if y > this_year + 50:
                y -= 100
        elif m := _ASCTIME.match(v):
            mon, d, hh, mm, ss, y = m.groups()
            memo = True
        else:
            return None
        month = _MONTHS.get(mon)
        if month is None:
            return None
        d, y, hh, mm, ss = int(d), int(y), int(hh), int(mm), int(ss)
        if not (1 <= d <= 31 and hh < 24 and mm < 60 and ss < 61):
            return None
        t = float(calendar.timegm((y, month, d, hh, mm, min(ss, 59), 0, 0, 0)))
        if memo:  # responses of the same second carry the same Date: parsed once
            if len(_DATES) >= 4096:
                _DATES.clear()
            _DATES[value] = t
        return t
    except (ValueError, OverflowError):
        return None


def format_http_date(ts: float) -> str:
    return email.utils.formatdate(ts, usegmt=True)


# --- RFC 9111 3: storing responses ---------------------------------------

@dataclass(frozen=True)
class RefreshRule:
    """One Squid refresh_pattern line: heuristic freshness for matching URLs.

    min/max in seconds, percent as a fraction (0.1 = 10%).
    """
    pattern: str
    min: float = 0.0
    percent: float = 0.1
    max: float = 4320 * 60.0
    icase: bool = False
    options: frozenset[str] = frozenset()

    def __post_init__(self):
        object.__setattr__(self, "_re", re.compile(self.pattern, re.I if self.icase else 0))

    def matches(self, url: str) -> bool:
        return self._re.search(url) is not None  # type: ignore[attr-defined]


DEFAULT_RULE = RefreshRule(".", 0, 0.1, 4320 * 60)


def parse_refresh_pattern(line: str) -> RefreshRule:
    """Squid syntax: ``[-i] regex min percent% max`` (min and max in minutes); Squid's options after max
    (override-expire, ignore-no-store...) are refused here."""
    parts = line.split()
    icase = False
    if parts and parts[0] == "-i":
        icase, parts = True, parts[1:]
    if len(parts) < 4:
        raise ValueError(f"refresh_pattern needs: [-i] regex min percent max: {line!r}")
    regex, mn, pct, mx, *opts = parts
    try:
        re.compile(regex)
    except re.error as e:
        raise ValueError(f"refresh_pattern: bad regex {regex!r}: {e}") from e
    try:
        mn_f, mx_f = float(mn), float(mx)
        pct_f = float(pct.rstrip("%")) / 100.0
    except ValueError as e:
        raise ValueError(f"refresh_pattern: min, percent and max must be numbers: {line!r}") from e
    if not all(math.isfinite(x) for x in (mn_f, mx_f, pct_f)):
        raise ValueError(f"refresh_pattern: min, percent and max must be finite numbers: {line!r}")
    if mn_f < 0 or mx_f < 0 or pct_f < 0:
        raise ValueError(f"refresh_pattern: negative value: {line!r}")
    if mn_f > mx_f:
        raise ValueError(f"refresh_pattern: min ({mn}) is more than max ({mx}): {line!r}")
    if opts:  # Squid's override-expire, ignore-no-store...: they break RFC 9111, which the cache follows
        raise ValueError(f"refresh_pattern: option {opts[0]!r} is not supported: {line!r}")
    return RefreshRule(regex, mn_f * 60, pct_f, mx_f * 60, icase)


def pick_rule(rules: Iterable[RefreshRule], url: str) -> RefreshRule:
    for rule in rules:
        if rule.matches(url):
            return rule
    return DEFAULT_RULE


def has_explicit_freshness(resp_headers, shared: bool = True) -> bool:
    cc = cache_control(resp_headers)
    return (("s-maxage" in cc and shared) or "max-age" in cc
            or bool(get_all(resp_headers, "expires")))


def storable(method: str, status: int, req_headers, resp_headers, *, shared: bool = True,
             negative_ttl: float = 30.0, partial: bool = False) -> tuple[bool, str]:
    """RFC 9111 3 (and 3.5 for Authorization): may this response be stored? -> (ok, reason).

    Only GET responses are stored (HEAD is answered from a stored GET);
    304 never is, and partial content (206) only with `partial` (3.3: kept
    apart, for the ranges it holds, never as a complete response).
    """
    if method != "GET":
        return False, f"method {method}"
    req_cc = cache_control(req_headers)
    resp_cc = cache_control(resp_headers)
    if status < 200 or status == 304 or (status == 206 and not partial):
        return False, f"status {status}"
    if status in REQUEST_SPECIFIC_STATUSES:  # as Squid: reused, they would answer requests that asked otherwise
        return False, f"status {status} answers this request's preconditions, range or expectation"
    if "must-understand" in resp_cc:
        if status not in UNDERSTOOD_STATUSES:
            return False, "must-understand with unknown status"
        # 5.2.2.3: must-understand overrides no-store for understood statuses
    elif "no-store" in resp_cc:
        return False, "no-store"
    if "no-store" in req_cc:
        return False, "request no-store"
    if "private" in resp_cc and shared:
        return False, "private"
    if shared and get_all(req_headers, "authorization"):
        if not ("public" in resp_cc or "s-maxage" in resp_cc or "must-revalidate" in resp_cc):
            return False, "authorization"
    vary = vary_fields(resp_headers)
    if vary is None:
        return False, "Vary: *"
    if has_explicit_freshness(resp_headers, shared) or "public" in resp_cc:
        return True, "explicit"
    if status in NEGATIVE_STATUSES:
        return (negative_ttl > 0), "negative_ttl" if negative_ttl > 0 else "negative_ttl disabled"
    if status in HEURISTIC_STATUSES:
        return True, "heuristic"
    return False, f"status {status} without explicit freshness"


def supersedes(status: int, req_headers) -> bool:
    """RFC 9111 4 (the most recent response is the one to use): True when this final response to a GET
    replaces what is stored for its URL, whether it is stored itself or not (no-store, private, too
    large...). Not an error (5xx: stale-if-error may still want the stored copy), nor a partial,
    conditional or request-specific answer, nor one to a request with Authorization (a user's own
    view, 3.5)."""
    return ((200 <= status < 400 and status not in (206, 304)) or status in (404, 410)) \
        and not get_all(req_headers, "authorization")


def reuses_nothing(req_headers) -> bool:
    """The request will not take a stored response without asking the origin (5.2.1: no-cache,
    Pragma: no-cache, max-age=0) or lets nothing be stored (no-store): another client's response,
    just stored, would not answer it."""
    cc = cache_control(req_headers)
    return "no-cache" in cc or "no-store" in cc or cc.delta("max-age") == 0 or pragma_no_cache(req_headers)


# --- RFC 9111 4.2: freshness ------------------------------------------------

def freshness_lifetime(status: int, resp_headers, response_time: float, *, url="",
                       rules: Iterable[RefreshRule] = (), shared: bool = True,
                       negative_ttl: float = 30.0) -> tuple[float, str]:
    """RFC 9111 4.2.1 (s-maxage > max-age > Expires) and 4.2.2 (heuristics) -> (seconds, source).

    Invalid max-age/s-maxage make the response stale (0);
    an invalid Expires ("0" included) means already expired (5.3).
    Heuristics: negative_ttl for 404/405/410/414/501, else Squid's
    refresh_pattern (percent of Date - Last-Modified bounded by min/max;
    min when there is no Last-Modified). `url` (for refresh_pattern) may be a
    callable returning it, called only when a heuristic needs it.
    """
    cc = cache_control(resp_headers)
    if shared:
        s = cc.delta("s-maxage")
        if s is INVALID:
            return 0.0, "s-maxage invalid"
        if s is not None:
            return float(s), "s-maxage"
    m = cc.delta("max-age")
    if m is INVALID:
        return 0.0, "max-age invalid"
    if m is not None:
        return float(m), "max-age"
    expires = get_all(resp_headers, "expires")
    if expires:
        if len(set(e.strip() for e in expires)) > 1:
            return 0.0, "Expires conflicting"
        exp = parse_http_date(expires[0])
        if exp is None:
            return 0.0, "Expires invalid"
        date = parse_http_date(get(resp_headers, "date")) or response_time
        return max(0.0, exp - date), "Expires"
    if status not in HEURISTIC_STATUSES and "public" not in cc:
        return 0.0, "not heuristically cacheable"
    if status in NEGATIVE_STATUSES:
        return float(max(0.0, negative_ttl)), "negative_ttl"
    rule = pick_rule(rules, url() if callable(url) else url)
    lm = parse_http_date(get(resp_headers, "last-modified"))
    if lm is None:
        return rule.min, "heuristic (min)"
    date = parse_http_date(get(resp_headers, "date")) or response_time
    lifetime = max(0.0, date - lm) * rule.percent
    return max(rule.min, min(rule.max, lifetime)), "heuristic (Last-Modified)"


def age_value(resp_headers) -> float:
    """RFC 9111 5.1: the Age field; invalid values are ignored (0), huge ones capped.

    Of a list ("7200, 0", or several lines) the first member is used, as 5.1
    says; parameters ("7200;foo=bar") are ignored.
    """
    value = get(resp_headers, "age")
    if value is None:
        return 0.0
    value = value.split(",", 1)[0].split(";", 1)[0].strip()
    if not value.isdigit() or not value.isascii():
        return 0.0
    return float(delta_seconds(value))


def delta_seconds(digits: str) -> int:
    """1.2.2: a delta-seconds value (ASCII digits) too large to represent is 2^31."""
    return _at_most(digits, DELTA_MAX)


def _at_most(digits: str, cap: int) -> int:
    """min(int(digits), cap), also for more digits than int() takes (4300): those are never converted."""
    digits = digits.lstrip("0") or "0"
    return cap if len(digits) > len(str(cap)) else min(int(digits), cap)


def initial_age(resp_headers, request_time: float, response_time: float) -> float:
    """RFC 9111 4.2.3: corrected_initial_age, computed once when the response is received."""
    date = parse_http_date(get(resp_headers, "date"))
    apparent_age = max(0.0, response_time - date) if date is not None else 0.0
    response_delay = max(0.0, response_time - request_time)
    corrected_age_value = age_value(resp_headers) + response_delay
    return max(apparent_age, corrected_age_value)


def current_age(resp_headers, request_time: float, response_time: float, now: float) -> float:
    """RFC 9111 4.2.3: current_age = corrected_initial_age + resident_time."""
    return initial_age(resp_headers, request_time, response_time) + max(0.0, now - response_time)


def age_header(age: float) -> str:
    return str(min(int(age), DELTA_MAX))


# --- RFC 9111 4 + 5.2.1: may a stored response answer this request? ---------

FRESH, STALE_OK, REVALIDATE, RELOAD, SWR = "fresh", "stale", "revalidate", "reload", "stale-while-revalidate"


@dataclass
class Decision:
    action: str          # FRESH, STALE_OK (served stale, allowed), SWR, REVALIDATE, RELOAD
    reason: str
    staleness: float = 0.0

    @property
    def serve(self) -> bool:
        return self.action in (FRESH, STALE_OK, SWR)


def pragma_no_cache(req_headers) -> bool:
    """RFC 9111 5.4: Pragma: no-cache counts only when there is no Cache-Control."""
    if get_all(req_headers, "cache-control"):
        return False
    return any(p.lower() == "no-cache" for p in split_list(get_all(req_headers, "pragma")))


def must_revalidate_when_stale(resp_cc: CacheControl, shared: bool = True) -> bool:
    """5.2.2.2 must-revalidate, 5.2.2.8 proxy-revalidate and 5.2.2.10 s-maxage forbid serving stale."""
    return ("must-revalidate" in resp_cc or _unqualified_no_cache(resp_cc)
            or (shared and ("proxy-revalidate" in resp_cc or "s-maxage" in resp_cc)))


def _unqualified_no_cache(resp_cc: CacheControl) -> bool:
    """5.2.2.4: plain no-cache means "revalidate first"; the qualified form (no-cache="Set-Cookie")
    only keeps the fields it names out of stored responses (storable_headers drops them)."""
    return "no-cache" in resp_cc and resp_cc.field_names("no-cache") is None


def decide(req_headers, resp_headers, age: float, lifetime: float, shared: bool = True,
           resp_cc: CacheControl | None = None) -> Decision:
    """RFC 9111 4 (constructing responses from caches) with the request directives of 5.2.1.

    RELOAD: the client asked the origin be contacted (no-cache / Pragma);
    REVALIDATE: a conditional request must be sent first;
    FRESH / STALE_OK / SWR: the stored response may be sent now (SWR: and
    refreshed in the background, RFC 5861 3).
    """
    req_cc = cache_control(req_headers) if req_headers else NO_DIRECTIVES  # no fields: nothing asked
    if resp_cc is None:  # callers may pass cache_control(resp_headers), parsed before
        resp_cc = cache_control(resp_headers)
    staleness = age - lifetime
    if "no-cache" in req_cc or (req_headers and pragma_no_cache(req_headers)):
        return Decision(RELOAD, "request no-cache", staleness)
    if _unqualified_no_cache(resp_cc):
        return Decision(REVALIDATE, "response no-cache", staleness)
    max_age = req_cc.delta("max-age")
    if max_age is INVALID:
        return Decision(REVALIDATE, "request max-age invalid", staleness)
    if max_age is not None and age > max_age:
        return Decision(REVALIDATE, f"age {age:.0f} > request max-age {max_age}", staleness)
    min_fresh = req_cc.delta("min-fresh")
    if min_fresh is INVALID:
        return Decision(REVALIDATE, "request min-fresh invalid", staleness)
    if min_fresh is not None and lifetime - age < min_fresh:
        return Decision(REVALIDATE, f"not fresh for min-fresh {min_fresh}", staleness)
    if staleness < 0:
        return Decision(FRESH, "fresh", staleness)
    if must_revalidate_when_stale(resp_cc, shared):
        return Decision(REVALIDATE, "stale, must revalidate", staleness)
    if "max-stale" in req_cc:
        max_stale = req_cc.delta("max-stale")
        if req_cc.arg("max-stale") is None or (max_stale is not INVALID and staleness <= max_stale):
            return Decision(STALE_OK, "stale within max-stale", staleness)
    swr = resp_cc.delta("stale-while-revalidate")
    if swr is not None and swr is not INVALID and staleness <= swr:
        return Decision(SWR, "stale-while-revalidate", staleness)
    return Decision(REVALIDATE, "stale", staleness)


def only_if_cached(req_headers) -> bool:
    return "only-if-cached" in cache_control(req_headers)


def stale_if_error_ok(req_headers, resp_headers, staleness: float, shared: bool = True,
                      max_stale: float = 0.0) -> bool:
    """RFC 5861 4: may a stale response be served because the origin failed?

    The request's or the response's stale-if-error bounds the staleness, as
    does a request max-stale; must-revalidate (and its shared-cache
    relatives) still forbids it. `max_stale` is the operator's own bound
    (Squid's max_stale; RFC 9111 4.2.4 allows serving stale when configured
    "in accordance with an out-of-band contract"): 0 allows nothing more.
    """
    resp_cc = cache_control(resp_headers)
    if must_revalidate_when_stale(resp_cc, shared):
        return False
    limit = resp_cc.delta("stale-if-error")
    if limit is not None and limit is not INVALID and staleness > limit:
        max_stale = 0  # the origin's own bound wins over the operator's, as in Squid
    if max_stale > 0 and staleness <= max_stale:
        return True
    req_cc = cache_control(req_headers)
    for cc in (req_cc, resp_cc):
        limit = cc.delta("stale-if-error")
        if limit is not None and limit is not INVALID and staleness <= limit:
            return True
    if "max-stale" in req_cc:
        limit = req_cc.delta("max-stale")
        if req_cc.arg("max-stale") is None or (limit is not INVALID and staleness <= limit):
            return True
    return False


# --- RFC 9111 4.1: Vary --------------------------------------------------------

def vary_fields(resp_headers) -> tuple[str, ...] | None:
    """The request fields a response varies on, lower-cased and sorted; None for `Vary: *`."""
    values = get_all(resp_headers, "vary")
    if not values:  # most responses: asked twice for each one stored
        return ()
    names = [n.lower() for n in split_list(values)]
    if "*" in names:
        return None
    return tuple(sorted(set(names)))


def normalize_field(name: str, values: list[str]) -> str | None:
    """4.1: combine field lines, drop optional whitespace, lower-case case-insensitive fields.

    An absent field is None: it only matches another absent field.
    """
    if not values:
        return None
    joined = ",".join(split_list(values)) if values else ""
    joined = " ".join(joined.split())
    if name.lower() in CASE_INSENSITIVE_FIELDS:
        joined = joined.lower().replace("; ", ";").replace(" ;", ";")
    return joined


def vary_values(fields: Iterable[str], req_headers) -> tuple[tuple[str, str | None], ...]:
    """The secondary cache key: each Vary field's normalized value in this request."""
    return tuple((f, normalize_field(f, get_all(req_headers, f))) for f in fields)


# --- RFC 9111 4.3: validation --------------------------------------------------

def validators(resp_headers) -> list[tuple[str, str]]:
    """4.3.1: conditional headers to revalidate a stored response."""
    out = []
    etag = get(resp_headers, "etag")
    if etag:
        out.append(("If-None-Match", etag.strip()))
    lm = get(resp_headers, "last-modified")
    if lm and parse_http_date(lm) is not None:
        out.append(("If-Modified-Since", lm.strip()))
    return out


CONDITIONAL_FIELDS = ("if-none-match", "if-modified-since", "if-match", "if-unmodified-since", "if-range")
# a client's fields that a revalidation the cache sends on its own leaves out: the client's preconditions
# and range are its own, the cache decides on its own caching, and the framing is of another message
_NOT_REFRESHED = HOP_BY_HOP | frozenset(CONDITIONAL_FIELDS) | {
    "host", "content-length", "expect", "range", "cache-control", "pragma"}


def revalidation_headers(req_headers, stored_headers) -> dict[str, str]:
    """4.3.1: the fields of a revalidation that the cache sends on its own, while it serves the stale
    response (RFC 5861 stale-while-revalidate): those of the client request it serves, as the origin
    would get them in a revalidation on the request's path (User-Agent, Accept..., Cookie; an origin
    may answer on them without Vary), minus that client's own preconditions, range, cache directives
    and hop-by-hop fields, plus the stored response's validators. One value per name (repeated lines
    joined, Cookie's with "; ")."""
    items = _items(req_headers)
    drop = _NOT_REFRESHED | {n.lower() for n in split_list(v for k, v in items if k.lower() == "connection")}
    out: dict[str, str] = {}
    names: dict[str, str] = {}  # lower-case name -> the name as first sent
    for k, v in items:
        low = k.lower()
        if low in drop:
            continue
        if low in names:
            out[names[low]] += ("; " if low == "cookie" else ", ") + v
        else:
            names[low] = k
            out[k] = v
    for k, v in validators(stored_headers):
        out[k] = v
    return out


def _etag_opaque(tag: str) -> tuple[bool, str]:
    tag = tag.strip()
    weak = tag.startswith("W/")
    return weak, tag[2:] if weak else tag


def weak_match(a: str, b: str) -> bool:
    return _etag_opaque(a)[1] == _etag_opaque(b)[1]


def strong_match(a: str, b: str) -> bool:
    wa, oa = _etag_opaque(a)
    wb, ob = _etag_opaque(b)
    return not wa and not wb and oa == ob


def conditional_result(method: str, req_headers, stored_headers) -> str | None:
    """4.3.2: evaluate a client's conditional request against a stored response.

    Returns "INM" or "IMS" when the answer is 304 Not Modified, None for a
    full response. If-None-Match takes precedence (RFC 9110 13.2.2); a
    list or `*` is accepted; If-Modified-Since compares with Last-Modified,
    or Date when there is none, and applies only to GET/HEAD.
    """
    if method not in ("GET", "HEAD"):
        return None
    inm = get_all(req_headers, "if-none-match")
    if inm:
        etag = get(stored_headers, "etag")
        tags = split_list(inm)
        if "*" in tags or (etag and any(weak_match(t, etag) for t in tags)):
            return "INM"
        return None
    ims = parse_http_date(get(req_headers, "if-modified-since"))
    if ims is None:
        return None
    last = parse_http_date(get(stored_headers, "last-modified")) or parse_http_date(get(stored_headers, "date"))
    if last is not None and last <= ims:
        return "IMS"
    return None


def cache_can_evaluate(req_headers) -> bool:
    """4.3.2: If-Match / If-Unmodified-Since are for the origin: such requests are forwarded."""
    return not (get_all(req_headers, "if-match") or get_all(req_headers, "if-unmodified-since"))


def has_client_conditionals(req_headers) -> bool:
    return any(get_all(req_headers, f) for f in ("if-none-match", "if-modified-since"))


def freshen_headers(stored: list[tuple[str, str]], new) -> list[tuple[str, str]]:
    """3.2 / 4.3.4: the stored header list updated with the fields of a 304 (or HEAD) response.

    Each field present in `new` replaces the stored field of that name, except Content-Length
    and those 3.1 keeps out of storage (hop-by-hop, Connection-listed, named by private="..." or
    no-cache="..."), in `new` and in the result: a 304's per-user fields are never stored.
    """
    new_items = storable_headers(new)
    replace = {k.lower() for k, _ in new_items} - {"content-length"}
    out = [(k, v) for k, v in stored if k.lower() not in replace]
    out += [(k, v) for k, v in new_items if k.lower() in replace]
    return storable_headers(out)


def validator_mismatch(stored_headers, new_headers) -> bool:
    """4.3.4: a 304 whose validator differs from the stored response's does not select it: its ETag,
    or, when it has none, its Last-Modified (a response modified at another time is another one)."""
    new_etag = get(new_headers, "etag")
    old_etag = get(stored_headers, "etag")
    if new_etag and old_etag:
        return not weak_match(new_etag, old_etag)
    if new_etag:  # "no stored response has it": a strong one selects none (4.3.4)
        return not new_etag.lstrip().startswith("W/")
    new_lm = parse_http_date(get(new_headers, "last-modified"))
    old_lm = parse_http_date(get(stored_headers, "last-modified"))
    return new_lm is not None and old_lm is not None and new_lm != old_lm


def head_mismatch(stored_headers, head_headers) -> bool:
    """4.3.5: does a 200 to a HEAD describe another representation than the stored GET response
    (a different ETag, Last-Modified or Content-Length, where both have one)?"""
    for name in ("etag", "last-modified", "content-length"):
        old, new = get(stored_headers, name), get(head_headers, name)
        if old is not None and new is not None and old.strip() != new.strip():
            return True
    return False


def storable_headers(headers, also_drop: frozenset[str] = frozenset(), named: bool = True) -> list[tuple[str, str]]:
    """3.1: the header fields kept with a stored response (hop-by-hop and Connection-listed removed,
    the lower-case names in `also_drop`, and, unless `named` is false, those its private="..." and
    no-cache="..." name: with named=False, the end-to-end fields of RFC 9110 7.6.1)."""
    items = headers if isinstance(headers, Fields) else Fields(_items(headers))
    lows = items.lows
    drop = HOP_BY_HOP | also_drop if also_drop else HOP_BY_HOP
    if "connection" in lows:
        drop = drop | {n.lower() for n in split_list(v for (k, v), low in zip(items, lows) if low == "connection")}
    if named and "cache-control" in lows:
        cc = cache_control(items)
        # 5.2.2.7: a shared cache does not store the fields named by private="..."; 5.2.2.4: nor those
        # named by no-cache="...", which must not be sent without revalidation
        for name in ("private", "no-cache"):
            if name in cc:
                drop = drop | set(cc.field_names(name) or ())
    return [(k, v) for (k, v), low in zip(items, lows) if low not in drop]


# --- RFC 9111 4.4: invalidation ------------------------------------------------

def invalidation_targets(method: str, status: int, url: str, resp_headers) -> list[str]:
    """4.4: an unsafe method with a non-error response invalidates the target URI and the
    Location / Content-Location URIs of the same origin."""
    if method.upper() in SAFE_METHODS or not (200 <= status < 400):
        return []
    targets = [url]
    base = urlsplit(url)
    for name in ("location", "content-location"):
        value = get(resp_headers, name)
        if not value:
            continue
        try:
            target = urljoin(url, value.strip())
            t = urlsplit(target)
            same = (t.scheme, t.hostname, t.port or _default_port(t.scheme)) == (
                base.scheme, base.hostname, base.port or _default_port(base.scheme))
        except ValueError:  # not a URL (a bad IPv6 literal, a port out of range): nothing to invalidate
            continue
        if same:
            targets.append(target)
    return targets


def _default_port(scheme: str) -> int:
    return 443 if scheme == "https" else 80


# --- RFC 9110 14: ranges from a stored response ------------------------------

# The last part of a stored partial response's secondary key (3.3): a request looks it up only for
# a range, so it never answers as a complete response.
PARTIAL = ("\x00partial", None)


def content_range(value: str | None) -> tuple[int, int, int] | None:
    """RFC 9110 14.4: a 206's `Content-Range: bytes first-last/length` -> (first, last, length).

    None for anything else: other units, an unknown length (`*`), a range
    past the length, or no field (a multipart/byteranges answer).
    """
    if not value:
        return None
    unit, _, rest = value.strip().partition(" ")
    span, slash, length_s = rest.strip().partition("/")
    first_s, dash, last_s = span.partition("-")
    digits = (first_s, last_s, length_s)
    if unit.lower() != "bytes" or not slash or not dash or not all(d.isascii() and d.isdigit() for d in digits):
        return None
    first, last, length = (_at_most(d, POSITION_MAX) for d in digits)
    if first > last or last >= length:
        return None
    return first, last, length


UNSATISFIABLE = "unsatisfiable"


def parse_range(value: str | None, length: int):
    """A single byte range of a `length`-byte body -> (first, last), UNSATISFIABLE, or None.

    None means "ignore the Range header and send the whole response" (invalid
    syntax, other units, or several ranges, which a cache may answer with 200).
    """
    if not value:
        return None
    unit, sep, spec = value.partition("=")
    if not sep or unit.strip().lower() != "bytes":
        return None
    ranges = [r.strip() for r in spec.split(",") if r.strip()]
    if len(ranges) != 1:
        return None
    first_s, dash, last_s = ranges[0].partition("-")
    first_s, last_s = first_s.strip(), last_s.strip()
    if not dash or not (first_s + last_s).isascii() or (first_s and not first_s.isdigit()) \
            or (last_s and not last_s.isdigit()):  # isdigit() alone takes "²", which int() refuses
        return None
    if not first_s:  # suffix range
        if not last_s:
            return None
        n = _at_most(last_s, POSITION_MAX)
        if n == 0 or length == 0:
            return UNSATISFIABLE
        return max(0, length - n), length - 1
    first = _at_most(first_s, POSITION_MAX)
    last = _at_most(last_s, POSITION_MAX) if last_s else length - 1
    if last_s and last < first:
        return None
    if first >= length:
        return UNSATISFIABLE
    return first, min(last, length - 1)


def if_range_ok(value: str | None, stored_headers) -> bool:
    """RFC 9110 13.1.5: If-Range needs a strong ETag match or an exact Last-Modified date."""
    if value is None:
        return True
    value = value.strip()
    if value.startswith(('"', "W/")):
        etag = get(stored_headers, "etag")
        return bool(etag) and strong_match(value, etag)
    when = parse_http_date(value)
    lm = parse_http_date(get(stored_headers, "last-modified"))
    return when is not None and lm is not None and when == lm
