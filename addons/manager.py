"""Squid's cache manager pages, at the proxy's own address (/squid-internal-mgr/, Squid's well-known path).

    curl http://127.0.0.1:3128/squid-internal-mgr/info
    curl -x http://127.0.0.1:3128 http://127.0.0.1:3128/squid-internal-mgr/menu
    squidclient -p 3128 http://127.0.0.1:3128/squid-internal-mgr/info

(squidclient's `mgr:info` shorthand asks for cache_object://127.0.0.1/info, a scheme Squid
deprecates and mitmproxy's HTTP parser refuses with a 400 before any addon sees the request.)

A request for /squid-internal-mgr/<page> addressed to one of this proxy's listeners is
answered here, in `requestheaders`, as Squid answers it, instead of being refused as a
forwarding loop. Pages: `menu`, `info` (general runtime information) and `storedir` (the
cache's tiers), in Squid's text layout; the cache's figures come from its `cache.stats`
command, so they are missing when the cache is not loaded. A page Squid has and Relais does
not, like any unknown page, gets Squid's 404 ERR_INVALID_URL. The figures count since the
proxy started: Relais keeps no 5 and 60 minute windows, and the labels say so.

Who may read them is the access policy's decision, through the predefined `manager` acl
(policies/default.yaml: `allow localhost manager`, `deny manager`), so the access-control
addon sits before this one. Loaded without it, only loopback clients get the pages.
Logged as Squid logs them: TCP_MISS/200 with HIER_NONE/- and text/plain.

    mitmdump -s addons/manager.py
"""
from __future__ import annotations

import json
import logging
import os
import resource
import sys
import time
from email.utils import formatdate
from importlib import metadata
from pathlib import Path

from mitmproxy import ctx, http, version

try:
    from addons import answered, listeners, meta
except ImportError:  # loaded by path without the project installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from addons import answered, listeners, meta

log = logging.getLogger(__name__)

PREFIX = b"/squid-internal-mgr/"
MENU = {  # page -> Squid's description of it
    "menu": "Cache Manager Menu",
    "info": "General Runtime Information",
    "storedir": "Store Directory Stats",
}


def process_start() -> float:
    """When this process started (the script may be loaded again later: the figures are the process's)."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):  # not Linux
        return time.time()


def relais_version() -> str:
    try:
        return metadata.version("relais")
    except metadata.PackageNotFoundError:  # a checkout that is not installed
        return "(not installed)"


def page_name(path: str) -> str:
    """The page a /squid-internal-mgr/ path asks for (the query, like squidclient's parameters, ignored)."""
    return path[len(PREFIX):].split("?", 1)[0]


def percent(part: float, whole: float) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "0.0%"


def menu_page() -> str:
    return "".join(f" {name:<22}\t{text:<32}\tpublic\n" for name, text in MENU.items())


def info_page(started: float, now: float, stats: dict | None) -> str:
    """Squid's mgr:info layout, with the figures Relais has. `stats`: cache.stats, or None without a cache."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu = usage.ru_utime + usage.ru_stime
    up = max(now - started, 1e-6)
    lines = [
        f"Squid Object Cache: Version relais {relais_version()} (mitmproxy {version.VERSION})",
        "Service Name: relais",
        f"Start Time:\t{formatdate(started, usegmt=True)}",
        f"Current Time:\t{formatdate(now, usegmt=True)}",
    ]
    if stats is not None:
        mem, disk = stats["mem"], stats["disk"]
        hits = stats["hits"]
        entries, volume = stored(stats)
        lines += [
            "Cache information for relais (since start):",
            f"\tHits as % of all requests:\t{100 * stats['hit_ratio']:.1f}%",
            f"\tMemory hits as % of hit requests:\t{percent(stats['mem_hits'], hits)}",
            f"\tDisk hits as % of hit requests:\t{percent(stats['disk_hits'], hits)}",
            f"\tStorage Swap size:\t{disk['bytes'] // 1024} KB",
            f"\tStorage Swap capacity:\t{_capacity(disk['bytes'], disk['limit'])}",
            f"\tStorage Mem size:\t{mem['bytes'] // 1024} KB",
            f"\tStorage Mem capacity:\t{_capacity(mem['bytes'], mem['limit'])}",
            f"\tMean Object Size:\t{volume / 1024 / entries if entries else 0:.2f} KB",
        ]
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    lines += [
        "Resource usage for relais:",
        f"\tUP Time:\t{up:.3f} seconds",
        f"\tCPU Time:\t{cpu:.3f} seconds",
        f"\tCPU Usage:\t{100 * cpu / up:.2f}%",
        f"\tMaximum Resident Size: {usage.ru_maxrss} KB",  # kilobytes on Linux
        "File descriptor usage for relais:",
        f"\tMaximum number of file descriptors:   {soft}",
        f"\tNumber of file desc currently in use: {_open_files()}",
    ]
    if stats is not None:
        lines += [
            "Internal Data Structures:",
            f"\t{entries:6d} StoreEntries",
            f"\t{stats['mem']['entries']:6d} Hot Object Cache Items",
            f"\t{stats['disk']['entries']:6d} on-disk objects",
        ]
    return "\n".join(lines) + "\n"


def stored(stats: dict) -> tuple[int, int]:
    """(objects, bytes) the cache holds: the disk tier's when there is one (every object stored in RAM
    is also written there), else the RAM tier's."""
    mem, disk = stats["mem"], stats["disk"]
    return (disk["entries"], disk["bytes"]) if disk["cache_dir_size"] else (mem["entries"], mem["bytes"])


def storedir_page(stats: dict | None) -> str:
    """Squid's mgr:storedir layout: the disk tier (Squid's cache_dir) and the memory tier."""
    if stats is None:
        return "Store Directory Statistics:\nNo cache is loaded.\n"
    mem, disk = stats["mem"], stats["disk"]
    state = f"off: {disk['off']}" if disk["off"] else "on" if disk["cache_dir_size"] else "none (cache_dir none)"
    return (
        "Store Directory Statistics:\n"
        f"Store Entries          : {stored(stats)[0]}\n"
        f"Maximum Swap Size      : {disk['limit'] // 1024} KB\n"
        f"Current Store Swap Size: {disk['bytes'] / 1024:.2f} KB\n"
        f"Current Capacity       : {_capacity(disk['bytes'], disk['limit'], precision=2)}\n"
        "\n"
        f"Store Directory #0 (diskcache): {ctx.options.cache_dir}\n"
        f"State: {state}\n"
        f"Maximum Size: {disk['limit'] // 1024} KB\n"
        f"Current Size: {disk['bytes'] / 1024:.2f} KB\n"
        f"Current entries: {disk['entries']}\n"
        f"Damaged entries dropped: {disk['corrupt_dropped']}\n"
        "\n"
        "Memory tier (cache_mem):\n"
        f"Maximum Size: {mem['limit'] // 1024} KB\n"
        f"Current Size: {mem['bytes'] / 1024:.2f} KB\n"
        f"Current entries: {mem['entries']}\n"
    )


def _capacity(used: int, limit: int, precision: int = 1) -> str:
    if not limit:
        return f"{0:.{precision}f}% used, {0:.{precision}f}% free"
    share = 100 * used / limit
    return f"{share:.{precision}f}% used, {100 - share:.{precision}f}% free"


def _open_files() -> int:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:  # not Linux
        return 0


class Manager:
    def __init__(self) -> None:
        self.listeners = listeners.Listeners()
        self.started = process_start()
        self.answering = answered.hold()

    def load(self, loader) -> None:
        self.answering.take()  # a request body is dropped once its page is sent

    def running(self) -> None:
        self.listeners.running()

    def done(self) -> None:
        self.answering.release()

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        req = flow.request
        if not req.data.path.startswith(PREFIX) or flow.response is not None:
            return
        if not self.listeners.is_self(req.host, req.port):
            return  # a page of some other server: not ours to answer
        if meta.ACL in flow.metadata and "manager" not in flow.metadata.get(meta.ACLS, ()):
            return  # access control judged another URL (a Host header naming some other place)
        page = page_name(req.path)
        flow.metadata[meta.LOCAL] = "manager"
        answered.refuse_body(flow)
        if meta.ACL not in flow.metadata and not listeners.is_loopback(meta.client_ip(flow)):
            # no access policy judged it (loaded without the acl addon): loopback clients only
            answered.refuse(flow, "ERR_ACCESS_DENIED", "manager",
                            "cache manager: loopback clients only without an access policy", code="TCP_DENIED")
            return
        if page not in MENU:  # Squid's answer to an unknown page: 404
            answered.refuse(flow, "ERR_INVALID_URL", "manager", f"no such cache manager page: {page or '(none)'}",
                            status=404, code=None)
            return
        if page == "menu":
            text = menu_page()
        elif page == "info":
            text = info_page(self.started, time.time(), self._cache_stats())
        else:
            text = storedir_page(self._cache_stats())
        now = formatdate(usegmt=True)
        flow.response = http.Response.make(200, text.encode(), {
            "Server": "relais", "Mime-Version": "1.0", "Content-Type": "text/plain;charset=utf-8",
            "Date": now, "Expires": now, "Last-Modified": now, "Cache-Control": "no-store"})
        meta.add_comment(flow, f"cache manager page: {page}")

    @staticmethod
    def _cache_stats() -> dict | None:
        """The cache's figures, through its command (None when no cache is loaded)."""
        commands = ctx.master.commands
        if "cache.stats" not in commands.commands:
            return None
        try:
            return json.loads(commands.call("cache.stats"))
        except Exception as e:  # the page still shows what else is known
            log.warning("cache manager: cache.stats failed: %s", e)
            return None


addons = [Manager()]
