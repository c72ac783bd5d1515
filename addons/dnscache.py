"""Squid's ipcache: the host names Relais connects to, resolved with dnspython and remembered.

mitmproxy resolves the name of every new upstream TCP connection through the system's
resolver and remembers nothing. With this addon loaded, the proxy's event loop resolves names
as Squid does (its `getaddrinfo`, which mitmproxy's TCP connections, the errors addon's origin
check and `dst` acls all use, answers from this cache; addresses, service names and flags still
go to the system's; mitmproxy's UDP connections resolve in Rust, without it):

- the hosts file first (mitmproxy's `dns_use_hosts_file`, on by default), then the name
  servers of mitmproxy's `dns_name_servers` (`IP` or `IP:port`), A and AAAA at once, IPv4
  addresses first (a connection tries them in turn, as before). When that option is empty, the
  system's /etc/resolv.conf, read as the C library reads it (search domains, timeout and
  attempts), and a name it does not resolve is asked of the system's resolver too (names that
  other sources of the system know: mDNS, myhostname...);
- an answer is kept for its DNS TTL (its CNAMEs' included), at most `positive_dns_ttl` and at
  least `negative_dns_ttl` seconds (Squid's bounds); a failed lookup (no such name, no
  address, no answer within `dns_timeout`) is kept for `negative_dns_ttl`, so that a bad name
  is not asked again and again: its requests get Squid's 503 ERR_DNS_FAIL at once;
- at most `ipcache_size` names are kept, the least recently used dropped first; concurrent
  lookups of one name make one query.

Commands: `dns.stats` and `dns.flush` (which also reads the hosts file again).

    mitmdump -s addons/dnscache.py
"""
from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import time
from collections import Counter, OrderedDict
from pathlib import Path

import dns.asyncresolver
import dns.exception
import dns.nameserver
import dns.resolver
from mitmproxy import command, ctx, exceptions

logger = logging.getLogger(__name__)
HOSTS_FILE = "/etc/hosts"
EAI_NODATA = getattr(socket, "EAI_NODATA", socket.EAI_NONAME)  # (not on every system)
RESOLV_CONF = "/etc/resolv.conf"


class LookupFailed(Exception):
    """A name that has no address, and why (the words that end on Squid's ERR_DNS_FAIL page)."""

    def __init__(self, name: str, reason: str, code: int = socket.EAI_NONAME):
        super().__init__(f"cannot resolve {name}: {reason}")
        self.reason, self.code = reason, code  # code: getaddrinfo's (EAI_NONAME, EAI_AGAIN...)


class Answer:
    """A name's addresses (IPv4 first), or why it has none, until `expires` (time.monotonic())."""
    __slots__ = ("expires", "addresses", "error", "code")  # (not a dataclass: mitmproxy loads scripts outside sys.modules)

    def __init__(self, expires: float, addresses: tuple[str, ...], error: str | None = None, code: int = 0):
        self.expires, self.addresses, self.error, self.code = expires, addresses, error, code


def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
        return True
    except ValueError:
        return False


def parse_hosts(text: str) -> dict[str, tuple[str, ...]]:
    """name -> addresses of a hosts file, in file order (lines that are not an address and names
    are skipped, as resolvers do)."""
    hosts: dict[str, list[str]] = {}
    for line in text.splitlines():
        fields = line.split("#", 1)[0].split()
        if len(fields) < 2 or not is_ip(fields[0]):
            continue
        for name in fields[1:]:
            hosts.setdefault(name.lower().rstrip("."), []).append(fields[0])
    return {name: _ipv4_first(addrs) for name, addrs in hosts.items()}


def parse_name_server(spec: str) -> tuple[str, int]:
    """'IP', 'IP:port', '[IPv6]:port' -> (IP, port); ValueError naming the value otherwise."""
    spec = spec.strip()
    host, port = spec, 53
    if spec.startswith("["):
        host, sep, rest = spec[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"{spec!r} is not IP or IP:port")
        port = rest[1:] or "53"
    elif spec.count(":") == 1:
        host, port = spec.split(":")
    try:
        ip, port = str(ipaddress.ip_address(host)), int(port)
    except ValueError:
        raise ValueError(f"{spec!r} is not IP or IP:port") from None
    if not 0 < port < 65536:
        raise ValueError(f"{spec!r}: port {port} is out of range")
    return ip, port


def kept_for(ttl: int, positive_ttl: int, negative_ttl: int) -> int:
    """Seconds an answer with this DNS TTL is kept: Squid's positive_dns_ttl is the most, and
    negative_dns_ttl also the least."""
    return max(negative_ttl, min(ttl, positive_ttl))


def _resolv_options(path: str) -> dict[str, str]:
    """resolv.conf's `options` (timeout:N, attempts:N...), the last of each winning, as the C library reads them."""
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return {}
    return {k: v for line in text.splitlines() if line.split()[:1] == ["options"]
            for k, _, v in (w.partition(":") for w in line.split()[1:])}


def _ipv4_first(addresses) -> tuple[str, ...]:
    unique = tuple(dict.fromkeys(addresses))
    return tuple(a for a in unique if ":" not in a) + tuple(a for a in unique if ":" in a)


AAAA_GRACE = 0.5  # seconds the other family's answer is awaited once one family gave addresses


class DnsCache:
    name = "dnscache"

    def __init__(self):
        self.answers: OrderedDict[str, Answer] = OrderedDict()
        self.hosts: dict[str, tuple[str, ...]] = {}
        self.resolver: dns.asyncresolver.Resolver | None = None  # None: the system's getaddrinfo
        self.system_config = True  # the servers are the system's (resolv.conf), not dns_name_servers
        self.configured = False
        self.queries: dict[str, asyncio.Future] = {}  # lookups in progress
        self.generation = 0  # bumped when the answers are forgotten: lookups begun before are not kept
        self.counts: Counter = Counter()
        self.loop = self.system = None  # the event loop whose getaddrinfo is ours, and what it was
        self.saved = None  # a getaddrinfo the loop object had of its own before ours (someone else's)
        self.on = False  # ours answers names; off, it passes everything to `system` (someone patched over it)

    def load(self, loader):
        loader.add_option("positive_dns_ttl", int, 21600,
                          "Squid positive_dns_ttl: most seconds a DNS answer is kept, whatever its TTL.")
        loader.add_option("negative_dns_ttl", int, 60,
                          "Squid negative_dns_ttl: seconds a failed DNS lookup is kept (its requests get "
                          "ERR_DNS_FAIL without a new query); also the fewest seconds an answer is kept.")
        loader.add_option("dns_timeout", int, 30,
                          "Squid dns_timeout: seconds a DNS lookup may take before it counts as failed.")
        loader.add_option("ipcache_size", int, 1024,
                          "Squid ipcache_size: most host names whose DNS answers are kept.")

    def configure(self, updated):
        o = ctx.options
        for name, least in (("positive_dns_ttl", 0), ("negative_dns_ttl", 1), ("dns_timeout", 1),
                            ("ipcache_size", 1)):
            if name in updated and getattr(o, name) < least:
                raise exceptions.OptionsError(f"{name}: must be {least} or more, not {getattr(o, name)}")
        if not self.configured or {"dns_name_servers", "dns_use_hosts_file"} & set(updated):
            servers = list(getattr(o, "dns_name_servers", None) or [])  # mitmproxy's (its DNS mode's) option
            try:
                parsed = [parse_name_server(s) for s in servers]
            except ValueError as e:
                raise exceptions.OptionsError(f"dns_name_servers: {e}") from None
            self.resolver, self.system_config = self._resolver(parsed), not parsed
            self.hosts = self._read_hosts() if getattr(o, "dns_use_hosts_file", True) else {}
            self.configured = True
            self._forget()
        if {"positive_dns_ttl", "negative_dns_ttl", "ipcache_size"} & set(updated):
            self._forget()
        try:
            self._install(asyncio.get_running_loop())
        except RuntimeError:  # no event loop yet: `running` installs it
            pass

    def done(self):
        self._uninstall()

    def _forget(self) -> None:
        self.answers.clear()
        self.queries.clear()  # those in progress finish for their own callers only
        self.generation += 1

    @staticmethod
    def _resolver(servers: list[tuple[str, int]]) -> dns.asyncresolver.Resolver | None:
        if servers:
            r = dns.asyncresolver.Resolver(configure=False)
            r.nameservers = [dns.nameserver.Do53Nameserver(ip, port) for ip, port in servers]
            r.lifetime = float("inf")  # dns_timeout alone
            return r
        try:
            r = dns.asyncresolver.Resolver(filename=RESOLV_CONF)
        except dns.resolver.NoResolverConfiguration as e:
            logger.warning("dnscache: no name servers in the system's configuration (%s): names are resolved "
                           "by the system's resolver; set dns_name_servers to use the cache", e)
            return None
        # as the C library reads the file: its search domains and ndots for short names, and its servers
        # each tried `attempts` times for `timeout` seconds (5 and 2 when not given), dns_timeout at most
        r.use_search_by_default = True
        opts = _resolv_options(RESOLV_CONF)
        r.timeout = float(opts["timeout"]) if opts.get("timeout", "").isdigit() else 5.0
        attempts = max(1, int(opts["attempts"])) if opts.get("attempts", "").isdigit() else 2
        r.lifetime = r.timeout * attempts * len(r.nameservers)
        return r

    @staticmethod
    def _read_hosts() -> dict[str, tuple[str, ...]]:
        try:
            return parse_hosts(Path(HOSTS_FILE).read_text(encoding="utf-8", errors="replace"))
        except OSError as e:
            logger.warning("dnscache: cannot read %s (%s)", HOSTS_FILE, e)
            return {}

    # --- lookups -------------------------------------------------------------------
    async def resolve(self, host: str) -> tuple[str, ...]:
        """The addresses of a host name (IPv4 first); LookupFailed if it has none."""
        name = host.lower().rstrip(".")
        if is_ip(name):
            return (name.strip("[]"),)
        if name in self.hosts:
            return self.hosts[name]
        known = self.answers.get(name)
        if known is not None and known.expires > time.monotonic():
            self.answers.move_to_end(name)
            self.counts["hits"] += 1
            if known.error:
                self.counts["negative_hits"] += 1
                raise LookupFailed(name, known.error, known.code)
            return known.addresses
        query = self.queries.get(name)
        if query is None:
            query = self.queries[name] = asyncio.ensure_future(self._query(name))
            query.add_done_callback(lambda done: self._queried(name, done))
        answer = await asyncio.shield(query)  # a client that leaves does not cancel the others' lookup
        if answer.error:
            raise LookupFailed(name, answer.error, answer.code)
        return answer.addresses

    def _queried(self, name: str, done: asyncio.Future) -> None:
        if self.queries.get(name) is done:
            del self.queries[name]
        if not done.cancelled():
            done.exception()  # retrieved, even when every lookup waiting for it has gone

    async def _query(self, name: str) -> Answer:
        self.counts["misses"] += 1
        generation = self.generation
        o = ctx.options
        addresses, ttl, error, code = (), 0, None, socket.EAI_NONAME
        if self.resolver is not None:
            addresses, ttl, error, code = await self._dns_lookup(name, o.dns_timeout)
        if self.resolver is None or (error and self.system_config and code != socket.EAI_AGAIN):
            # the system's lookup, as mitmproxy did before: names its other sources know (nsswitch: mDNS,
            # myhostname...), or no name servers dnspython can use (not for servers that did not answer:
            # it would wait for them as long again). It gives no TTL (0: the least is kept).
            addresses, ttl, error, code = await _system_lookup(self.system or asyncio.get_running_loop().getaddrinfo,
                                                               name, o.dns_timeout)
        if error:
            self.counts["failures"] += 1
            keep = o.negative_dns_ttl
        else:
            keep = kept_for(ttl, o.positive_dns_ttl, o.negative_dns_ttl)
        answer = Answer(time.monotonic() + keep, addresses, error, code)
        if generation == self.generation:  # (not after a flush or a new configuration)
            self.answers[name] = answer
            self.answers.move_to_end(name)
            while len(self.answers) > o.ipcache_size:
                self.answers.popitem(last=False)
        return answer

    async def _dns_lookup(self, name: str, timeout: int) -> tuple[tuple[str, ...], int, str | None, int]:
        lifetime = min(timeout, self.resolver.lifetime)
        lookups = [asyncio.ensure_future(self.resolver.resolve(name, rdtype, raise_on_no_answer=False,
                                                               lifetime=lifetime))
                   for rdtype in ("A", "AAAA")]
        done, pending = await asyncio.wait(lookups, return_when=asyncio.FIRST_COMPLETED)
        if pending:
            # one family answered: the other gets a moment, not the whole lifetime (a server that drops
            # AAAA queries would hold every new name for it)
            answered = any(not t.exception() and t.result().rrset is not None for t in done)
            await asyncio.wait(pending, timeout=AAAA_GRACE if answered else None)
        addresses, ttls, errors = [], [], []
        for t in lookups:
            if not t.done():
                t.cancel()
                continue
            e = t.exception()
            if e is not None:
                if not isinstance(e, (dns.exception.DNSException, OSError)):  # (OSError: a server unreachable)
                    raise e
                errors.append(e)
            elif t.result().rrset is not None:
                r = t.result()
                addresses += [rd.address for rd in r.rrset]
                ttls.append(r.chaining_result.minimum_ttl)  # the CNAMEs' TTLs count too
        if addresses:
            return _ipv4_first(addresses), min(ttls), None, 0
        reason, code = _why(errors)
        return (), 0, reason, code

    # --- the event loop's resolver ------------------------------------------------------
    def running(self):
        self._install(asyncio.get_running_loop())

    def _install(self, loop: asyncio.AbstractEventLoop) -> None:
        if self.loop is loop and self.on:
            return
        self._uninstall()
        current = vars(loop).get("getaddrinfo")
        if isinstance(getattr(current, "__self__", None), DnsCache):
            logger.warning("dnscache: another DNS cache already resolves this proxy's names (the addon is loaded "
                           "twice?); this one stays off")
            return
        self.loop, self.system, self.saved, self.on = loop, loop.getaddrinfo, current, True
        loop.getaddrinfo = self.getaddrinfo  # an attribute of this loop object: it wins over the method

    def _uninstall(self) -> None:
        if self.loop is not None and vars(self.loop).get("getaddrinfo") == self.getaddrinfo:
            if self.saved is None:
                del self.loop.getaddrinfo  # the loop's own method again
            else:
                self.loop.getaddrinfo = self.saved
            self.loop = self.system = self.saved = None
        # else someone patched the loop over ours and may still call it: it passes everything on
        self.on = False

    async def getaddrinfo(self, host, port, *, family=0, type=0, proto=0, flags=0):
        """loop.getaddrinfo with the names answered from the cache; anything else (an address, a
        service name, flags, a socket type other than stream and datagram) goes to the system's, as before."""
        if (not self.on or not isinstance(host, str) or is_ip(host) or flags or not _is_port(port)
                or type not in (0, *_PROTO)):
            system = self.system or asyncio.get_running_loop().getaddrinfo
            return await system(host, port, family=family, type=type, proto=proto, flags=flags)
        try:
            addresses = await self.resolve(host)
        except LookupFailed as e:
            raise socket.gaierror(e.code, e.reason) from None
        types = [type] if type else list(_PROTO)
        infos = []
        for address in addresses:
            fam = socket.AF_INET6 if ":" in address else socket.AF_INET
            if family not in (0, socket.AF_UNSPEC, fam):
                continue
            sockaddr = (address, int(port or 0)) if fam == socket.AF_INET else (address, int(port or 0), 0, 0)
            infos += [(fam, t, proto or _PROTO[t], "", sockaddr) for t in types]
        if not infos:
            raise socket.gaierror(EAI_NODATA, "no address of that family")
        return infos

    # --- commands --------------------------------------------------------------------
    @command.command("dns.stats")
    def stats(self) -> str:
        """The DNS cache's names, lookups answered from it, queries sent and failures."""
        now = time.monotonic()
        live = [a for a in self.answers.values() if a.expires > now]
        return (f"names {len(live)} (negative {sum(1 for a in live if a.error)}), answered from the cache "
                f"{self.counts['hits']} (negative {self.counts['negative_hits']}), queries {self.counts['misses']} "
                f"(failed {self.counts['failures']}), hosts file names {len(self.hosts)}")

    @command.command("dns.flush")
    def flush(self) -> None:
        """Forget every DNS answer, and read the hosts file again."""
        self._forget()
        if getattr(ctx.options, "dns_use_hosts_file", True):
            self.hosts = self._read_hosts()
        logger.info("dnscache: flushed")


def _why(errors: list[BaseException]) -> tuple[str, int]:
    """Squid's words for a failed lookup, the most telling first, and getaddrinfo's code for it."""
    kinds = [type(e) for e in errors]
    if dns.resolver.NXDOMAIN in kinds:
        return "no such name (NXDOMAIN)", socket.EAI_NONAME
    if any(issubclass(k, dns.exception.Timeout) for k in kinds):
        return "no answer from the name servers (timeout)", socket.EAI_AGAIN
    if dns.resolver.NoNameservers in kinds:
        return "the name servers failed (SERVFAIL or refused)", socket.EAI_FAIL
    unreachable = [e for e in errors if isinstance(e, OSError)]
    if unreachable:
        return f"the name servers cannot be reached ({unreachable[0].strerror or unreachable[0]})", socket.EAI_AGAIN
    if errors:
        return str(errors[0]) or type(errors[0]).__name__, socket.EAI_NONAME
    return "no address (no A or AAAA record)", EAI_NODATA


async def _system_lookup(system, name: str, timeout: int) -> tuple[tuple[str, ...], int, str | None, int]:
    """The system's getaddrinfo; it gives no TTL (0: the least is kept)."""
    try:
        infos = await asyncio.wait_for(system(name, None, type=socket.SOCK_STREAM), timeout)
    except socket.gaierror as e:
        return (), 0, e.strerror or str(e), e.errno
    except (OSError, UnicodeError) as e:
        return (), 0, getattr(e, "strerror", None) or str(e), socket.EAI_FAIL
    except asyncio.TimeoutError:
        return (), 0, "no answer from the resolver (timeout)", socket.EAI_AGAIN
    return _ipv4_first(i[4][0] for i in infos), 0, None, 0


_PROTO = {socket.SOCK_STREAM: socket.IPPROTO_TCP, socket.SOCK_DGRAM: socket.IPPROTO_UDP}


def _is_port(port) -> bool:
    return port is None or isinstance(port, int) or (isinstance(port, (str, bytes)) and port.isdigit())


addons = [DnsCache()]
