"""Squid's ipcache: the host names Relais connects to, resolved with dnspython and remembered.

mitmproxy resolves the name of every new upstream connection through the system's resolver
and remembers nothing. With this addon loaded, the proxy's event loop resolves names as Squid
does (its `getaddrinfo`, which mitmproxy's connections, the errors addon's origin check and
`dst` acls all use, answers from this cache; addresses, service names and flags still go to
the system's):

- the hosts file first (mitmproxy's `dns_use_hosts_file`, on by default), then the name
  servers of mitmproxy's `dns_name_servers` (`IP` or `IP:port`; the system's when empty), A
  and AAAA at once, IPv4 addresses first (a connection tries them in turn, as before);
- an answer is kept for its DNS TTL, at most `positive_dns_ttl` and at least
  `negative_dns_ttl` seconds (Squid's bounds); a failed lookup (no such name, no address, no
  answer within `dns_timeout`) is kept for `negative_dns_ttl`, so that a bad name is not asked
  again and again: its requests get Squid's 503 ERR_DNS_FAIL at once;
- at most `ipcache_size` names are kept, the least recently used dropped first; concurrent
  lookups of one name make one query.

Commands: `dns.stats` and `dns.flush`.

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
RESOLV_CONF = "/etc/resolv.conf"


class LookupFailed(Exception):
    """A name that has no address, and why (the words that end on Squid's ERR_DNS_FAIL page)."""

    def __init__(self, name: str, reason: str):
        super().__init__(f"cannot resolve {name}: {reason}")
        self.reason = reason


class Answer:
    """A name's addresses (IPv4 first), or why it has none, until `expires` (time.monotonic())."""
    __slots__ = ("expires", "addresses", "error")  # (not a dataclass: mitmproxy loads scripts outside sys.modules)

    def __init__(self, expires: float, addresses: tuple[str, ...], error: str | None = None):
        self.expires, self.addresses, self.error = expires, addresses, error


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


def _attempts(path: str) -> int:
    """resolv.conf's `options attempts:N` (the C library's default: 2)."""
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return 2
    found = [w.split(":", 1)[1] for line in text.splitlines() if line.split()[:1] == ["options"]
             for w in line.split()[1:] if w.startswith("attempts:")]
    return max(1, int(found[-1])) if found and found[-1].isdigit() else 2


def _ipv4_first(addresses) -> tuple[str, ...]:
    unique = tuple(dict.fromkeys(addresses))
    return tuple(a for a in unique if ":" not in a) + tuple(a for a in unique if ":" in a)


class DnsCache:
    name = "dnscache"

    def __init__(self):
        self.answers: OrderedDict[str, Answer] = OrderedDict()
        self.hosts: dict[str, tuple[str, ...]] = {}
        self.resolver: dns.asyncresolver.Resolver | None = None  # None: the system's getaddrinfo
        self.queries: dict[str, asyncio.Future] = {}  # lookups in progress
        self.counts: Counter = Counter()
        self.loop = self.system = None  # the event loop whose getaddrinfo is ours, and what it was
        self.saved = None  # a getaddrinfo the loop object had of its own before ours (someone else's)

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
        servers = list(getattr(o, "dns_name_servers", None) or [])  # mitmproxy's (its DNS mode's) option
        use_hosts = getattr(o, "dns_use_hosts_file", True)
        if self.resolver is None or {"dns_name_servers", "dns_use_hosts_file"} & set(updated):
            try:
                parsed = [parse_name_server(s) for s in servers]
            except ValueError as e:
                raise exceptions.OptionsError(f"dns_name_servers: {e}") from None
            self.resolver = self._resolver(parsed)
            self.hosts = self._read_hosts() if use_hosts else {}
            self.answers.clear()
        if {"positive_dns_ttl", "negative_dns_ttl", "ipcache_size"} & set(updated):
            self.answers.clear()
        try:
            self._install(asyncio.get_running_loop())
        except RuntimeError:  # no event loop yet: `running` installs it
            pass

    def done(self):
        self._uninstall()

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
        # the system's servers are given up on as the C library gives up on them (options timeout: and
        # attempts:, each server in turn), as mitmproxy did without this addon; dns_timeout at most
        r.lifetime = r.timeout * _attempts(RESOLV_CONF) * len(r.nameservers)
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
                raise LookupFailed(name, known.error)
            return known.addresses
        query = self.queries.get(name)
        if query is None:
            query = self.queries[name] = asyncio.ensure_future(self._query(name))
            query.add_done_callback(lambda done: self.queries.pop(name) if self.queries.get(name) is done else None)
        answer = await asyncio.shield(query)  # a client that leaves does not cancel the others' lookup
        if answer.error:
            raise LookupFailed(name, answer.error)
        return answer.addresses

    async def _query(self, name: str) -> Answer:
        self.counts["misses"] += 1
        o = ctx.options
        if self.resolver is None:
            addresses, ttl, error = await _system_lookup(self.system or asyncio.get_running_loop().getaddrinfo,
                                                         name, o.dns_timeout)
        else:
            addresses, ttl, error = await self._dns_lookup(name, o.dns_timeout)
        if error:
            self.counts["failures"] += 1
            keep = o.negative_dns_ttl
        else:
            keep = kept_for(ttl, o.positive_dns_ttl, o.negative_dns_ttl)
        answer = Answer(time.monotonic() + keep, addresses, error)
        self.answers[name] = answer
        self.answers.move_to_end(name)
        while len(self.answers) > o.ipcache_size:
            self.answers.popitem(last=False)
        return answer

    async def _dns_lookup(self, name: str, timeout: int) -> tuple[tuple[str, ...], int, str | None]:
        lifetime = min(timeout, self.resolver.lifetime)
        results = await asyncio.gather(
            *(self.resolver.resolve(name, rdtype, raise_on_no_answer=False, lifetime=lifetime)
              for rdtype in ("A", "AAAA")), return_exceptions=True)
        addresses, ttls, errors = [], [], []
        for r in results:
            if isinstance(r, BaseException):
                if not isinstance(r, (dns.exception.DNSException, OSError)):  # (OSError: a server unreachable)
                    raise r
                errors.append(r)
            elif r.rrset is not None:
                addresses += [rd.address for rd in r.rrset]
                ttls.append(r.rrset.ttl)
        if addresses:
            return _ipv4_first(addresses), min(ttls), None
        return (), 0, _why(errors)

    # --- the event loop's resolver ------------------------------------------------------
    def running(self):
        self._install(asyncio.get_running_loop())

    def _install(self, loop: asyncio.AbstractEventLoop) -> None:
        if self.loop is loop:
            return
        self._uninstall()
        self.loop, self.system, self.saved = loop, loop.getaddrinfo, vars(loop).get("getaddrinfo")
        loop.getaddrinfo = self.getaddrinfo  # an attribute of this loop object: it wins over the method

    def _uninstall(self) -> None:
        if self.loop is not None and vars(self.loop).get("getaddrinfo") == self.getaddrinfo:
            if self.saved is None:
                del self.loop.getaddrinfo  # the loop's own method again
            else:
                self.loop.getaddrinfo = self.saved
        self.loop = self.system = self.saved = None

    async def getaddrinfo(self, host, port, *, family=0, type=0, proto=0, flags=0):
        """loop.getaddrinfo with the names answered from the cache; anything else (an address, a
        service name, flags) goes to the system's, as before."""
        if not isinstance(host, str) or is_ip(host) or flags or not _is_port(port):
            system = self.system or asyncio.get_running_loop().getaddrinfo  # (ours was just removed)
            return await system(host, port, family=family, type=type, proto=proto, flags=flags)
        try:
            addresses = await self.resolve(host)
        except LookupFailed as e:
            raise socket.gaierror(socket.EAI_NONAME, e.reason) from None
        types = [type] if type else [socket.SOCK_STREAM, socket.SOCK_DGRAM]
        infos = []
        for address in addresses:
            fam = socket.AF_INET6 if ":" in address else socket.AF_INET
            if family not in (0, socket.AF_UNSPEC, fam):
                continue
            sockaddr = (address, int(port or 0)) if fam == socket.AF_INET else (address, int(port or 0), 0, 0)
            infos += [(fam, t, proto or _PROTO[t], "", sockaddr) for t in types]
        if not infos:
            raise socket.gaierror(socket.EAI_NONAME, "no address of that family")
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
        """Forget every DNS answer (the hosts file is kept)."""
        self.answers.clear()
        logger.info("dnscache: flushed")


def _why(errors: list[BaseException]) -> str:
    """Squid's words for a failed lookup, the most telling first."""
    kinds = [type(e) for e in errors]
    if dns.resolver.NXDOMAIN in kinds:
        return "no such name (NXDOMAIN)"
    if any(issubclass(k, dns.exception.Timeout) for k in kinds):
        return "no answer from the name servers (timeout)"
    if dns.resolver.NoNameservers in kinds:
        return "the name servers failed (SERVFAIL or refused)"
    unreachable = [e for e in errors if isinstance(e, OSError)]
    if unreachable:
        return f"the name servers cannot be reached ({unreachable[0].strerror or unreachable[0]})"
    if errors:
        return str(errors[0]) or type(errors[0]).__name__
    return "no address (no A or AAAA record)"


async def _system_lookup(system, name: str, timeout: int) -> tuple[tuple[str, ...], int, str | None]:
    """getaddrinfo, for lack of name servers dnspython can ask; it gives no TTL (0: the least is kept)."""
    try:
        infos = await asyncio.wait_for(
            system(name, None, type=socket.SOCK_STREAM), timeout)
    except (OSError, UnicodeError) as e:
        return (), 0, e.strerror if isinstance(e, OSError) and e.strerror else str(e)
    except asyncio.TimeoutError:
        return (), 0, "no answer from the resolver (timeout)"
    return _ipv4_first(i[4][0] for i in infos), 0, None


_PROTO = {socket.SOCK_STREAM: socket.IPPROTO_TCP, socket.SOCK_DGRAM: socket.IPPROTO_UDP}


def _is_port(port) -> bool:
    return port is None or isinstance(port, int) or (isinstance(port, (str, bytes)) and port.isdigit())


addons = [DnsCache()]
