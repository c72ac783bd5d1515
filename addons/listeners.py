"""This proxy's own listening addresses, and whether a request is addressed to one of them.

Not an addon: a helper for the addons that must recognise a request for the proxy itself
(errors.py refuses it as a forwarding loop; manager.py answers Squid's cache manager pages
there). Call `running()` from the addon's `running` hook.
"""
from __future__ import annotations

import ipaddress
import socket

from mitmproxy import ctx

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
WILDCARDS = ("", "0.0.0.0", "::")  # a listener on every address
HOSTNAME = socket.gethostname().lower()


class Listeners:
    def __init__(self) -> None:
        self.known: frozenset[tuple[str, int]] | None = None  # (host, port) of the TCP listeners, read once
        self.tracking = False  # mitmproxy tells us when its listeners change: `known` may be kept

    def running(self) -> None:
        try:
            ctx.master.addons.get("proxyserver").servers.changed.connect(self._changed)
            self.tracking = True
        except Exception:  # another mitmproxy version: the listeners are read for each request instead
            pass

    def _changed(self) -> None:
        self.known = None

    def addresses(self) -> frozenset[tuple[str, int]]:
        """(host, port) of this proxy's TCP listeners, read from mitmproxy's servers once per change of
        them (reading them costs a system call per socket)."""
        if self.known is not None:
            return self.known
        try:
            servers = ctx.master.addons.get("proxyserver").servers
            found = frozenset((str(addr[0]), addr[1]) for server in servers
                              if server.mode.transport_protocol == "tcp" for addr in server.listen_addrs)
        except Exception:  # another mitmproxy version, or no master: nothing is known to be ours
            return frozenset()
        if self.tracking and not servers.is_updating:
            self.known = found
        return found

    def is_self(self, host: str, port: int) -> bool:
        """True when host:port is one of this proxy's listeners: mitmproxy's rule (the listener's
        address, or localhost, 127.0.0.1, ::1 on its port), with the spellings of those that reach
        it too (LOCALHOST, a trailing dot, ::ffff:127.0.0.1), and, for a listener on every address,
        any loopback address and this machine's name."""
        listeners = [h for h, p in self.addresses() if p == port]
        if not listeners:
            return False
        host = _plain(host)
        return any(host == _plain(h) or host in LOOPBACK_NAMES or (h in WILDCARDS and _local(host))
                   for h in listeners)


def _plain(host: str) -> str:
    """A host as one spelling: lower case, no trailing dot, an IPv4-mapped IPv6 address as IPv4."""
    host = host.lower().rstrip(".")
    if host.startswith("::ffff:"):
        try:
            return str(ipaddress.IPv6Address(host).ipv4_mapped or host)
        except ValueError:
            pass
    return host


def _local(host: str) -> bool:
    """An address or name of this machine that a listener on every address answers."""
    return host == HOSTNAME or host.endswith(".localhost") or is_loopback(host)  # RFC 6761: *.localhost


def is_loopback(ip: str) -> bool:
    """A loopback IP address (127.0.0.0/8, ::1)."""
    try:
        return ipaddress.ip_address(ip).is_loopback
    except ValueError:
        return False
